//! The QEMU Machine Protocol (QMP) monitor: `--qmp unix:PATH[,server=on][,wait=off]`.
//!
//! A self-contained server speaking QMP as QEMU 7.2 does ([`qmp`]): greeting, capabilities
//! negotiation, `{"execute", "arguments", "id"}` requests, `{"return"}`/`{"error"}` replies
//! with QEMU's error classes and texts, and events with timestamps. The machine plugs in
//! through [`VmControl`] and reports state changes through an [`EventSink`].
//!
//! ```text
//! let (server, events) = QmpServer::start(&path, backend)?;   // own threads
//! events.stop();                                               // from any thread
//! server.shutdown();                                           // flush events, close
//! ```
//!
//! Commands ([`commands`]): `qmp_capabilities`, `query-status`, `cont`, `stop`,
//! `system_reset`, `quit`, `query-pci`, `device_add`, `device_del`, `query-compat`,
//! `save-compat`, `query-machine`, `dump-machine`, `query-stats` and `query-stats-schemas`
//! ([`stats`]), `human-monitor-command` ([`hmp`]: `info pci`, `info qtree`, `info status`,
//! `info virtio`, `info gsi`, `info stats`, ...), `query-version`, `query-commands`.
//!
//! One client at a time, like a QEMU socket chardev: a second client's connection waits in
//! the listen backlog and is greeted when the first one leaves.

pub mod client;
pub mod commands;
pub mod control;
pub mod hmp;
pub mod option;
pub mod qmp;
pub mod stats;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use control::{
    CommandError, GsiInfo, PciBridgeInfo, PciFunctionInfo, PciRegionInfo, RegionKind, RunState,
    VmControl,
};
pub use option::parse_qmp_option;
pub use qmp::{EventSink, QmpServer, ThreadInit, ThreadSetup, MAX_MESSAGE_SIZE};
