//! PCI logic for the VMM: function addresses, the lock-free configuration
//! space, MSI-X tables, the slot allocator and the root complex's
//! configuration-access decoding (type-1 ports and ECAM).
//!
//! The guest-visible behaviour (register masks, BAR sizing, capability list
//! order, error wording) follows QEMU so that guests see a stable PCI ABI.
//!
//! - [`address`]: [`PciAddress`] (parsing, display, serde, ECAM/CF8) and
//!   QEMU's `addr=` syntax ([`parse_qemu_addr`]).
//! - [`config`]: [`ConfigSpace`], built once by [`ConfigSpaceBuilder`];
//!   guest writes go through immutable masks with one atomic update per
//!   dword and report a [`WriteEffect`].
//! - [`msix`]: [`MsixTable`] (table + PBA, atomics) and the delivery
//!   decision [`Delivery`].
//! - [`slots`]: [`SlotAllocator`] with explicit [`SlotState`]s and QEMU's
//!   error messages.
//! - [`root`]: [`PciRoot`], the function tables of bus 0 and of the buses
//!   behind bridges, behind an `ArcSwap` (lock-free readers), plus type-1 and
//!   ECAM decoding with type-1 forwarding through bridges; [`HostBridge`].
//! - [`bridge`]: [`PciBridge`], QEMU's `pci-bridge` (type-1 header).
//!
//! Nothing here panics on guest- or user-controlled input: invalid config,
//! table or port accesses read all-ones and drop writes.
//!
//! ```
//! use std::sync::Arc;
//! use pci::{BarKind, ConfigSpace, ConfigSpaceBuilder, Owner, PciFunction, PciRoot, SlotAllocator};
//!
//! struct Rng(ConfigSpace);
//! impl PciFunction for Rng {
//!     fn config(&self) -> &ConfigSpace { &self.0 }
//!     fn name(&self) -> &str { "virtio-rng-pci" }
//! }
//!
//! let mut slots = SlotAllocator::new();
//! let addr = slots.auto(&Owner::new("virtio-rng-pci")).unwrap();
//! slots.validate().unwrap();
//!
//! let mut b = ConfigSpaceBuilder::new(0x1af4, 0x1044);
//! b.class(0x00, 0xff, 0x00).subsystem(0x1af4, 0x1100);
//! b.bar(4, BarKind::Mem64 { prefetchable: true }, 0x4000).unwrap();
//! b.msix_capability(2, 4, 0x2000, 4, 0x3000).unwrap();
//! let root = PciRoot::new();
//! root.add(addr, Arc::new(Rng(b.build().unwrap()))).unwrap();
//!
//! // The guest sizes BAR 4 through ECAM.
//! let bar4 = addr.ecam_offset() + 0x20;
//! let (_, effect) = root.ecam_write(bar4, &u32::MAX.to_le_bytes()).unwrap();
//! assert!(effect.bar_changed(4));
//! let mut data = [0; 4];
//! root.ecam_read(bar4, &mut data);
//! assert_eq!(u32::from_le_bytes(data), 0xffff_c00c);
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod address;
pub mod bridge;
pub mod config;
pub mod msix;
pub mod record;
pub mod root;
pub mod slots;

pub use address::{parse_qemu_addr, AddressError, PciAddress};
pub use bridge::{BridgeSetup, BridgeWindows, PciBridge};
pub use config::{
    BarInfo, BarKind, CapInfo, ConfigError, ConfigSpace, ConfigSpaceBuilder, MsixCapInfo,
    WriteEffect,
};
pub use msix::{Delivery, MsixMessage, MsixTable};
pub use root::{ExtendedConfig, HostBridge, PciFunction, PciRoot, RootError};
pub use slots::{Owner, SlotAllocator, SlotError, SlotState};
