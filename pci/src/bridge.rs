//! QEMU's `pci-bridge`: a conventional PCI-to-PCI bridge (1b36:0001, class 0604, header type 1).
//!
//! The function is its type-1 configuration space plus nothing else: configuration cycles for
//! the buses behind it are routed by the root complex ([`crate::root`]) from the bus numbers
//! programmed here, as hardware routes type-1 cycles.
//!
//! What QEMU's `pci-bridge` has and this one has, register for register (see
//! [`ConfigSpaceBuilder`]'s type-1 constructor for the masks): the bus number registers, the
//! I/O (16-bit), memory and prefetchable (64-bit) windows, bridge control, and the Slot
//! Identification capability (ID 04h at 0x40: "first in chassis", no expansion slots, the
//! chassis number, which the guest may rewrite as in QEMU).
//!
//! What it leaves out, so it looks like QEMU's `-device pci-bridge,chassis_nr=N,shpc=off,
//! msi=off`: the SHPC hot-plug controller (its 256-byte BAR 0 and interrupt pin A) and the MSI
//! capability QEMU adds only for the SHPC. Hot-plug behind bridges, when it comes, goes through
//! ACPI (as QEMU's `acpi-pci-hotplug-with-bridge-support`), which needs neither.
//!
//! Invariants: the function never changes its own routing; only guest writes (through the
//! masks) and [`PciBridge::program`] (the VMM acting as firmware, before the guest runs) set the
//! bus numbers and windows. Reading them is one atomic load per dword.

use std::fmt;

use crate::config::{bridge as reg, ConfigSpace, ConfigSpaceBuilder, HEADER_TYPE_BRIDGE};
use crate::root::PciFunction;

/// Vendor ID of QEMU's `pci-bridge` (Red Hat).
pub const BRIDGE_VENDOR: u16 = 0x1b36;
/// Device ID of QEMU's `pci-bridge`.
pub const BRIDGE_DEVICE: u16 = 0x0001;
/// Capability ID of Slot Identification.
pub const CAP_ID_SLOTID: u8 = 0x04;
/// Slot ID expansion slot register: first in chassis.
const SLOTID_ESR_FIC: u8 = 0x20;

/// What the firmware (here: the VMM) programs into a bridge: its bus numbers and the memory
/// and prefetchable windows the buses behind it decode. The I/O window is left disabled (base
/// above limit), as no function here has I/O BARs; a disabled prefetchable window (machines
/// without a 64-bit window) leaves prefetchable BARs in the memory window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeSetup {
    /// The bus the bridge sits on.
    pub primary: u8,
    /// The bus right behind it.
    pub secondary: u8,
    /// The highest bus number behind it.
    pub subordinate: u8,
    /// The memory window `(base, limit)` (inclusive, 1 MiB aligned, below 4 GiB), or `None`
    /// for a disabled window.
    pub memory: Option<(u32, u32)>,
    /// The 64-bit prefetchable window `(base, limit)` (inclusive, 1 MiB aligned), or `None` for
    /// a disabled window.
    pub prefetchable: Option<(u64, u64)>,
}

/// A bridge's windows as the guest has programmed them, decoded like QEMU's
/// `pci_bridge_get_base` / `pci_bridge_get_limit` (a window whose base is above its limit is
/// disabled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BridgeWindows {
    /// I/O window (base, limit).
    pub io: (u64, u64),
    /// Memory window (base, limit).
    pub memory: (u64, u64),
    /// Prefetchable memory window (base, limit).
    pub prefetchable: (u64, u64),
}

/// Whether `config` is a type-1 (bridge) header.
pub fn is_bridge(config: &ConfigSpace) -> bool {
    config.header_type() & 0x7f == HEADER_TYPE_BRIDGE
}

/// (primary, secondary, subordinate) bus numbers of a bridge's config space.
pub fn bus_numbers(config: &ConfigSpace) -> (u8, u8, u8) {
    let v = config.read_u32(reg::PRIMARY_BUS / 4);
    (v as u8, (v >> 8) as u8, (v >> 16) as u8)
}

/// The windows of a bridge's config space.
pub fn windows(config: &ConfigSpace) -> BridgeWindows {
    let io_base = u64::from(config.read_u8(reg::IO_BASE) & 0xf0) << 8;
    let io_limit = (u64::from(config.read_u8(reg::IO_LIMIT) & 0xf0) << 8) | 0xfff;
    let mem = |off: usize| u64::from(config.read_u16(off) & 0xfff0) << 16;
    let upper = |off: usize| u64::from(config.read_u32(off / 4)) << 32;
    let pref64 = config.read_u16(reg::PREF_BASE) & 0xf == 1;
    let (pb_hi, pl_hi) = if pref64 {
        (
            upper(reg::PREF_BASE_UPPER32),
            upper(reg::PREF_LIMIT_UPPER32),
        )
    } else {
        (0, 0)
    };
    BridgeWindows {
        io: (io_base, io_limit),
        memory: (mem(reg::MEMORY_BASE), mem(reg::MEMORY_LIMIT) | 0xfffff),
        prefetchable: (
            mem(reg::PREF_BASE) | pb_hi,
            mem(reg::PREF_LIMIT) | pl_hi | 0xfffff,
        ),
    }
}

/// QEMU's `pci-bridge` (without SHPC and MSI; see the module docs).
pub struct PciBridge {
    config: ConfigSpace,
}

impl PciBridge {
    /// A bridge with chassis number `chassis_nr` (1..=255; QEMU refuses 0 before building one)
    /// and the multifunction bit as given.
    pub fn new(chassis_nr: u8, multifunction: bool) -> Self {
        let mut b = ConfigSpaceBuilder::new_bridge(BRIDGE_VENDOR, BRIDGE_DEVICE);
        b.multifunction(multifunction);
        // The body never exceeds the header area: 4 bytes at 0x40 cannot fail.
        let _ = b.capability(CAP_ID_SLOTID, &[SLOTID_ESR_FIC, chassis_nr], &[0x00, 0xff]);
        Self { config: b.finish() }
    }

    /// Programs bus numbers and windows as firmware does before the guest runs (bypassing the
    /// masks; each register is one atomic store). Disabled windows read base above limit: I/O
    /// f000-0fff, memory and prefetchable fff00000-000fffff (prefetchable upper halves 0).
    pub fn program(&self, setup: &BridgeSetup) {
        let c = &self.config;
        c.set_raw(
            reg::PRIMARY_BUS,
            &[setup.primary, setup.secondary, setup.subordinate, 0],
        );
        c.set_raw(reg::IO_BASE, &[0xf0, 0x00]);
        let (mb, ml) = match setup.memory {
            Some((base, limit)) => ((base >> 16) as u16 & 0xfff0, (limit >> 16) as u16 & 0xfff0),
            None => (0xfff0, 0x0000),
        };
        c.set_raw(reg::MEMORY_BASE, &mb.to_le_bytes());
        c.set_raw(reg::MEMORY_LIMIT, &ml.to_le_bytes());
        // Bits 3:0 read 1: a 64-bit prefetchable window.
        let (pb, pl) = match setup.prefetchable {
            Some((base, limit)) => (base, limit),
            None => (0xfff0_0000, 0),
        };
        let low = |v: u64| ((v >> 16) as u16 & 0xfff0) | 1;
        c.set_raw(reg::PREF_BASE, &low(pb).to_le_bytes());
        c.set_raw(reg::PREF_LIMIT, &low(pl).to_le_bytes());
        c.set_raw(reg::PREF_BASE_UPPER32, &((pb >> 32) as u32).to_le_bytes());
        c.set_raw(reg::PREF_LIMIT_UPPER32, &((pl >> 32) as u32).to_le_bytes());
    }

    /// The chassis number (Slot ID capability).
    pub fn chassis_nr(&self) -> u8 {
        self.config.read_u8(0x43)
    }
}

impl fmt::Debug for PciBridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciBridge")
            .field("buses", &bus_numbers(&self.config))
            .finish_non_exhaustive()
    }
}

impl PciFunction for PciBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn name(&self) -> &str {
        "pci-bridge"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PCI_CAPABILITY_LIST, PCI_COMMAND, PCI_STATUS};

    fn w(c: &ConfigSpace, off: usize, v: &[u8]) {
        c.write(off, v);
    }

    #[test]
    fn identity_and_header_as_qemu() {
        let b = PciBridge::new(7, false);
        let c = b.config();
        assert_eq!((c.vendor_id(), c.device_id()), (0x1b36, 0x0001));
        assert_eq!(c.class_code(), 0x06_0400);
        assert_eq!(c.revision(), 0);
        assert_eq!(c.header_type(), 0x01);
        assert!(is_bridge(c));
        assert_eq!(c.status(), 0x00b0);
        assert_eq!(c.read_u16(reg::SEC_STATUS), 0x00a0);
        assert_eq!(c.interrupt_pin(), 0);
        assert_eq!(
            c.read_u32(0x2c / 4),
            0,
            "no subsystem IDs in a type-1 header"
        );
        // Slot ID capability: the only one.
        assert_eq!(c.read_u8(PCI_CAPABILITY_LIST), 0x40);
        assert_eq!(c.read_u32(0x40 / 4), 0x0720_0004);
        assert_eq!(b.chassis_nr(), 7);
        assert_eq!(PciBridge::new(1, true).config().header_type(), 0x81);
        // Power-on: I/O 16-bit, prefetchable 64-bit, bus numbers 0.
        assert_eq!(bus_numbers(c), (0, 0, 0));
        assert_eq!(c.read_u16(reg::PREF_BASE), 0x0001);
    }

    #[test]
    fn register_masks_as_qemu() {
        let b = PciBridge::new(1, false);
        let c = b.config();
        w(c, reg::PRIMARY_BUS, &[0xff; 4]);
        assert_eq!(c.read_u32(reg::PRIMARY_BUS / 4), 0xffff_ffff);
        w(c, reg::IO_BASE, &[0xff, 0xff]);
        assert_eq!(c.read_u16(reg::IO_BASE), 0xf0f0);
        w(c, 0x30, &[0xff; 4]);
        assert_eq!(
            c.read_u32(0x30 / 4),
            0,
            "16-bit I/O: upper halves read-only 0"
        );
        w(c, reg::MEMORY_BASE, &[0xff; 4]);
        assert_eq!(c.read_u32(reg::MEMORY_BASE / 4), 0xfff0_fff0);
        w(c, reg::PREF_BASE, &[0xff; 4]);
        assert_eq!(c.read_u32(reg::PREF_BASE / 4), 0xfff1_fff1);
        w(c, reg::PREF_BASE_UPPER32, &[0xff; 4]);
        w(c, reg::PREF_LIMIT_UPPER32, &[0xff; 4]);
        assert_eq!(c.read_u32(reg::PREF_LIMIT_UPPER32 / 4), u32::MAX);
        // No BARs, no ROM.
        for off in [0x10, 0x14, 0x38] {
            w(c, off, &[0xff; 4]);
            assert_eq!(c.read_u32(off / 4), 0, "{off:#x}");
        }
        w(c, reg::CONTROL, &[0xff, 0xff]);
        assert_eq!(c.read_u16(reg::CONTROL), 0x0bff);
        w(c, PCI_COMMAND, &[0xff, 0xff]);
        assert_eq!(c.command(), 0x0547);
        // Secondary status is read-only; the chassis number is writable, the ESR not.
        w(c, reg::SEC_STATUS, &[0xff, 0xff]);
        assert_eq!(c.read_u16(reg::SEC_STATUS), 0x00a0);
        w(c, 0x42, &[0x00, 0x09]);
        assert_eq!(c.read_u16(0x42), 0x0920);
        w(c, PCI_STATUS, &[0xff, 0xff]);
        assert_eq!(c.status(), 0x00b0);
        let win = windows(c);
        assert_eq!(win.memory, (0xfff0_0000, 0xffff_ffff));
        assert_eq!(win.io, (0xf000, 0xffff));
        assert_eq!(win.prefetchable, (0xffff_ffff_fff0_0000, u64::MAX));
    }

    #[test]
    fn programmed_by_firmware() {
        let b = PciBridge::new(1, false);
        b.program(&BridgeSetup {
            primary: 0,
            secondary: 1,
            subordinate: 3,
            memory: Some((0xc400_0000, 0xc57f_ffff)),
            prefetchable: None,
        });
        let c = b.config();
        assert_eq!(bus_numbers(c), (0, 1, 3));
        let win = windows(c);
        assert_eq!(win.memory, (0xc400_0000, 0xc57f_ffff));
        assert!(win.io.0 > win.io.1, "I/O window disabled: {:x?}", win.io);
        assert!(win.prefetchable.0 > win.prefetchable.1);
        assert_eq!(c.read_u16(reg::PREF_BASE), 0xfff1);
        b.program(&BridgeSetup {
            primary: 1,
            secondary: 2,
            subordinate: 2,
            memory: None,
            prefetchable: Some((0x40_2000_0000, 0x40_5fff_ffff)),
        });
        let c = b.config();
        let win = windows(c);
        assert!(win.memory.0 > win.memory.1);
        assert_eq!(win.prefetchable, (0x40_2000_0000, 0x40_5fff_ffff));
        assert_eq!(c.read_u16(reg::PREF_BASE), 0x2001);
        assert_eq!(c.read_u16(reg::PREF_LIMIT), 0x5ff1);
        assert_eq!(c.read_u32(reg::PREF_BASE_UPPER32 / 4), 0x40);
        assert_eq!(c.read_u32(reg::PREF_LIMIT_UPPER32 / 4), 0x40);
    }
}
