//! PCI logic for the VMM: function addresses, the lock-free configuration
//! space, MSI-X tables, the slot allocator and the root complex's
//! configuration-access decoding (type-1 ports and ECAM).
//!
//! The guest-visible behaviour (register masks, sizing, error wording)
//! follows QEMU so that guests see a stable PCI ABI.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod address;

pub use address::{parse_qemu_addr, AddressError, PciAddress};
pub mod config;

pub use config::{
    BarInfo, BarKind, CapInfo, ConfigError, ConfigSpace, ConfigSpaceBuilder, MsixCapInfo,
    WriteEffect,
};
pub mod msix;

pub use msix::{Delivery, MsixMessage, MsixTable};
pub mod slots;

pub use slots::{Owner, SlotAllocator, SlotError, SlotState};
pub mod root;

pub use root::{HostBridge, PciFunction, PciRoot, RootError};
