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
//! `save-compat`, `query-machine`, `dump-machine`, `human-monitor-command` ([`hmp`]: `info
//! pci`, `info qtree`, `info status`, ...), `query-version`, `query-commands`.
//!
//! One client at a time, like a QEMU socket chardev: a second client's connection waits in
//! the listen backlog and is greeted when the first one leaves.

pub mod backend;
pub mod client;
pub mod commands;
pub mod hmp;
pub mod qmp;
pub mod testing;

use std::path::PathBuf;

pub use qmp::{EventSink, QmpServer, MAX_MESSAGE_SIZE};

/// QEMU's run states as far as this monitor reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Created but not started (`-S`): waiting for `cont`.
    Prelaunch,
    /// vCPUs running.
    Running,
    /// Stopped by `stop`.
    Paused,
    /// The guest shut down (or `quit` is under way).
    Shutdown,
}

impl RunState {
    /// QEMU's name (`query-status`'s `status`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
        }
    }
}

/// The kind of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RegionKind {
    /// Port I/O.
    Io,
    /// Memory-mapped.
    #[default]
    Memory,
}

/// One implemented BAR (or ROM, bar 6) of a PCI function.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PciRegionInfo {
    /// BAR index (0-5, 6 for the expansion ROM).
    pub bar: u8,
    /// I/O or memory.
    pub kind: RegionKind,
    /// Guest address; `u64::MAX` when not mapped (QEMU reports -1).
    pub address: u64,
    /// Size in bytes (non-zero).
    pub size: u64,
    /// Prefetchable (memory only).
    pub prefetch: bool,
    /// 64-bit BAR (memory only).
    pub mem_type_64: bool,
}

/// What the monitor needs to know of one PCI function (neutral data, no device types).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PciFunctionInfo {
    /// Bus number.
    pub bus: u8,
    /// Slot (device) number.
    pub slot: u8,
    /// Function number.
    pub function: u8,
    /// Class and subclass: config bytes 0x0b..0x0a as one word (e.g. 0x0600 host bridge).
    pub class: u16,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision ID.
    pub revision: u8,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
    /// Interrupt pin (0 none, 1 = INTA# ...).
    pub irq_pin: u8,
    /// Interrupt line register.
    pub irq_line: u8,
    /// qdev id (`id=`, or "" for devices without one, e.g. the host bridge).
    pub qdev_id: String,
    /// Driver (QEMU type) name, e.g. `virtio-rng-pci`, `gpex-root`.
    pub driver: String,
    /// Implemented regions, by BAR index.
    pub regions: Vec<PciRegionInfo>,
    /// Properties shown by `info qtree` (`name = value`, in order; values as they print).
    pub props: Vec<(String, String)>,
}

/// A failed command: QEMU's error class (`GenericError`, `DeviceNotFound`, ...) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// QMP error class.
    pub class: String,
    /// Human-readable description (QEMU's text where QEMU has one).
    pub desc: String,
}

impl CommandError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        CommandError {
            class: "GenericError".into(),
            desc: desc.into(),
        }
    }

    /// An error of class `class`.
    pub fn new(class: impl Into<String>, desc: impl Into<String>) -> Self {
        CommandError {
            class: class.into(),
            desc: desc.into(),
        }
    }

    /// QEMU's `DeviceNotFound`: `Device 'ID' not found`.
    pub fn device_not_found(id: &str) -> Self {
        CommandError::new("DeviceNotFound", format!("Device '{id}' not found"))
    }
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for CommandError {}

/// The machine as the monitor drives it. Called from the monitor's thread, one command at a
/// time; implementations must not block for long (state changes are requests: e.g. `quit`
/// asks the machine to stop and returns; the reply is sent before it is called).
pub trait VmControl: Send + Sync {
    /// Current run state.
    fn status(&self) -> RunState;
    /// `cont`: start (from prelaunch) or resume the vCPUs. Emit `RESUME` when they run.
    fn cont(&self) -> Result<(), CommandError>;
    /// `stop`: pause the vCPUs. Emit `STOP` when paused.
    fn stop(&self) -> Result<(), CommandError>;
    /// `system_reset`: reset the machine. Emit `RESET` (`guest: false`, `host-qmp-system-reset`).
    fn system_reset(&self) -> Result<(), CommandError>;
    /// `quit`: end the monitor's VM. Called after the reply has been written. Emit `SHUTDOWN`
    /// (`guest: false`, `reason: host-qmp-quit`), then [`QmpServer::shutdown`] to flush it.
    fn quit(&self);
    /// All PCI functions, any order (the monitor sorts them by bus, slot and function).
    fn pci_functions(&self) -> Vec<PciFunctionInfo>;
    /// `device_add`: add a device. `args` are the QMP arguments as given (`driver` a string,
    /// the properties JSON values of their type or strings), e.g. `{"driver":
    /// "virtio-rng-pci", "id": "rng1", "addr": "05.0", "vectors": 4}`; parse them with
    /// [`crate::device_config::DeviceSpec::from_qmp`] (the `--device` rules and texts).
    fn device_add(
        &self,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), CommandError>;
    /// `device_del`: remove the device `id` ([`CommandError::device_not_found`] if none).
    /// Emit `DEVICE_DELETED` when it is gone.
    fn device_del(&self, id: &str) -> Result<(), CommandError>;
    /// `query-compat`: the compat record of the running machine (any JSON value).
    fn query_compat(&self) -> Result<serde_json::Value, CommandError>;
    /// `save-compat`: write the compat record to `path`.
    fn save_compat(&self, path: &str) -> Result<(), CommandError>;
    /// `query-machine`: the machine description (any JSON value).
    fn query_machine(&self) -> Result<serde_json::Value, CommandError>;
    /// `dump-machine`: write the machine description to `path`.
    fn dump_machine(&self, path: &str) -> Result<(), CommandError>;
    /// The internal state of each function that reports one (virtio devices: status, MSI-X
    /// vectors, queue rings as they are in guest memory), as (address, qdev id, report text),
    /// for HMP `info virtio`.
    fn device_reports(&self) -> Vec<(pci::PciAddress, String, String)>;
}

/// Parses the value of `--qmp`: `unix:PATH[,server[=on]][,wait=off|,nowait]`, returns PATH.
///
/// Only a listening unix socket that does not wait for a client is supported; other forms get
/// a QEMU-like error text.
pub fn parse_qmp_option(s: &str) -> Result<PathBuf, String> {
    let mut parts = split_opts(s).into_iter();
    let first = parts.next().unwrap_or_default();
    let Some(path) = first.strip_prefix("unix:") else {
        let backend = first.split(':').next().unwrap_or_default();
        return Err(match backend {
            "" => "chardev: empty QMP option".to_string(),
            "tcp" | "telnet" | "udp" | "stdio" | "pty" | "null" | "vc" | "file" | "pipe"
            | "mon" | "websocket" | "serial" | "chardev" => format!(
                "'{backend}' is not supported for --qmp: use unix:PATH[,server=on,wait=off]"
            ),
            _ => format!("'{first}' is not a valid char driver"),
        });
    };
    if path.is_empty() {
        return Err("chardev: socket: no local path given (unix:PATH)".to_string());
    }
    for opt in parts {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match opt.strip_prefix("no") {
                Some(k) if k == "wait" || k == "server" => (k.to_string(), "off".to_string()),
                _ => (opt.clone(), "on".to_string()),
            },
        };
        if k != "server" && k != "wait" {
            return Err(format!("Invalid parameter '{k}'"));
        }
        let on = match v.as_str() {
            "on" | "yes" | "true" => true,
            "off" | "no" | "false" => false,
            _ => return Err(format!("Parameter '{k}' expects 'on' or 'off'")),
        };
        match k.as_str() {
            "server" if on => {}
            "server" => return Err("--qmp: only server mode (server=on) is supported".to_string()),
            "wait" if !on => {}
            "wait" => {
                return Err(
                    "--qmp: wait=on is not supported: use wait=off (start with -S to wait)"
                        .to_string(),
                )
            }
            _ => {}
        }
    }
    Ok(PathBuf::from(path))
}

/// Splits QemuOpts-style `a,b=c` on single commas; `,,` stands for a literal comma.
pub(crate) fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_option_forms() {
        assert_eq!(
            parse_qmp_option("unix:/tmp/q.sock").unwrap(),
            PathBuf::from("/tmp/q.sock")
        );
        assert_eq!(
            parse_qmp_option("unix:/tmp/q.sock,server=on,wait=off").unwrap(),
            PathBuf::from("/tmp/q.sock")
        );
        assert_eq!(
            parse_qmp_option("unix:/tmp/q.sock,server,nowait").unwrap(),
            PathBuf::from("/tmp/q.sock")
        );
        assert_eq!(
            parse_qmp_option("unix:/tmp/a,,b.sock").unwrap(),
            PathBuf::from("/tmp/a,b.sock")
        );
        assert!(parse_qmp_option("tcp:localhost:4444")
            .unwrap_err()
            .contains("'tcp' is not supported"));
        assert!(parse_qmp_option("unix:").is_err());
        assert!(parse_qmp_option("unix:/x,server=off").is_err());
        assert!(parse_qmp_option("unix:/x,wait=on").is_err());
        assert_eq!(
            parse_qmp_option("unix:/x,server=maybe").unwrap_err(),
            "Parameter 'server' expects 'on' or 'off'"
        );
        assert_eq!(
            parse_qmp_option("unix:/x,foo=on").unwrap_err(),
            "Invalid parameter 'foo'"
        );
        assert!(parse_qmp_option("bogus").is_err());
    }
}
