//! The lock-free PCI configuration space of one function.
//!
//! A [`ConfigSpace`] holds the 4 KiB configuration space as 1024 `AtomicU32`
//! plus two masks built once by [`ConfigSpaceBuilder`] and immutable
//! afterwards: the guest-writable bits and the write-1-to-clear bits of each
//! dword of the 256-byte header/capability area.
//!
//! Invariants:
//! - Guest writes ([`ConfigSpace::write`]) only ever change writable bits
//!   (set/clear) and W1C bits (clear); every other bit keeps the value the
//!   builder or the device side (`set_*` methods) gave it.
//! - Each access touches exactly one dword and is applied with one atomic
//!   read-modify-write, so concurrent readers see either the old or the new
//!   dword, never a mix; guest writes and device-side updates (for example
//!   setting a status bit) never lose each other's bits.
//! - The extended space (0x100..0x1000) holds 0 and drops writes (no
//!   extended capabilities). What the guest reads there is the root's choice
//!   ([`crate::root::ExtendedConfig`]): all-ones as QEMU for a new machine,
//!   these zeros for one recorded before that was a property.
//! - Invalid accesses (size other than 1, 2 or 4, not naturally aligned, or
//!   beyond 4 KiB) read all-ones and are dropped on write; nothing panics.
//!
//! Header semantics follow QEMU: the ID, class, header type, subsystem,
//! interrupt pin and capability pointer are read-only; the command register
//! has IO, MEM, MASTER, PARITY, SERR and INTX_DISABLE writable; status bits
//! 8 and 11..15 are write-1-to-clear; cache line size and interrupt line are
//! writable; the expansion ROM BAR reads 0. BARs are sized by the mask alone:
//! writing all-ones and reading back yields `!(size - 1) | type bits`.
//! Bytes of the device-specific area (0x40..0x100) that no capability covers
//! are guest-writable scratch, and capabilities are linked newest first, both
//! as QEMU does.

use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;

/// Size of a function's configuration space in bytes.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the conventional (header + capabilities) part in bytes.
pub const HEADER_SIZE: usize = 256;
const HEADER_DWORDS: usize = HEADER_SIZE / 4;
const CONFIG_DWORDS: usize = CONFIG_SPACE_SIZE / 4;
/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Vendor ID register offset.
pub const PCI_VENDOR_ID: usize = 0x00;
/// Device ID register offset.
pub const PCI_DEVICE_ID: usize = 0x02;
/// Command register offset.
pub const PCI_COMMAND: usize = 0x04;
/// Status register offset.
pub const PCI_STATUS: usize = 0x06;
/// Revision ID register offset.
pub const PCI_REVISION_ID: usize = 0x08;
/// Class code (prog-if, subclass, class) offset.
pub const PCI_CLASS_PROG: usize = 0x09;
/// Cache line size register offset.
pub const PCI_CACHE_LINE_SIZE: usize = 0x0c;
/// Header type register offset.
pub const PCI_HEADER_TYPE: usize = 0x0e;
/// First BAR register offset.
pub const PCI_BASE_ADDRESS_0: usize = 0x10;
/// Subsystem vendor ID register offset.
pub const PCI_SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// Subsystem ID register offset.
pub const PCI_SUBSYSTEM_ID: usize = 0x2e;
/// Expansion ROM BAR offset (not implemented: reads 0).
pub const PCI_ROM_ADDRESS: usize = 0x30;
/// Capability list pointer offset.
pub const PCI_CAPABILITY_LIST: usize = 0x34;
/// Interrupt line register offset.
pub const PCI_INTERRUPT_LINE: usize = 0x3c;
/// Interrupt pin register offset.
pub const PCI_INTERRUPT_PIN: usize = 0x3d;
/// Offset of the first capability placed by the builder.
pub const FIRST_CAPABILITY: usize = 0x40;

/// Command: I/O space decode enable.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command: memory space decode enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus master enable.
pub const COMMAND_MASTER: u16 = 1 << 2;
/// Command: parity error response.
pub const COMMAND_PARITY: u16 = 1 << 6;
/// Command: SERR# enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command: INTx emulation disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Guest-writable command bits (as QEMU).
pub const COMMAND_WRITABLE: u16 = COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;
/// Status: INTx pending (read-only to the guest, set by the device).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status: capability list present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Write-1-to-clear status bits (8, 11..15, as QEMU).
pub const STATUS_W1C: u16 = 0xf900;
/// Header type bit: multifunction device.
pub const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;
/// Header type 1: PCI-to-PCI bridge.
pub const HEADER_TYPE_BRIDGE: u8 = 0x01;

/// Type-1 (PCI-to-PCI bridge) header register offsets and bits.
pub mod bridge {
    /// Primary bus number.
    pub const PRIMARY_BUS: usize = 0x18;
    /// Secondary bus number.
    pub const SECONDARY_BUS: usize = 0x19;
    /// Subordinate bus number.
    pub const SUBORDINATE_BUS: usize = 0x1a;
    /// Secondary latency timer.
    pub const SEC_LATENCY_TIMER: usize = 0x1b;
    /// I/O base (bits 7:4 are address bits 15:12).
    pub const IO_BASE: usize = 0x1c;
    /// I/O limit.
    pub const IO_LIMIT: usize = 0x1d;
    /// Secondary status.
    pub const SEC_STATUS: usize = 0x1e;
    /// Memory base (bits 15:4 are address bits 31:20).
    pub const MEMORY_BASE: usize = 0x20;
    /// Memory limit.
    pub const MEMORY_LIMIT: usize = 0x22;
    /// Prefetchable memory base (bits 3:0: 1 = 64-bit).
    pub const PREF_BASE: usize = 0x24;
    /// Prefetchable memory limit.
    pub const PREF_LIMIT: usize = 0x26;
    /// Prefetchable base, upper 32 bits.
    pub const PREF_BASE_UPPER32: usize = 0x28;
    /// Prefetchable limit, upper 32 bits.
    pub const PREF_LIMIT_UPPER32: usize = 0x2c;
    /// Bridge control.
    pub const CONTROL: usize = 0x3e;
    /// Bridge control bits the guest may write (QEMU: parity, SERR, ISA, VGA,
    /// VGA 16-bit, master abort, bus reset, fast back-to-back, both discard
    /// timers, discard SERR).
    pub const CONTROL_WRITABLE: u16 = 0x0bff;
    /// Bridge control: discard timer status (write 1 to clear).
    pub const CONTROL_DISCARD_STATUS: u16 = 0x0400;
}

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// MSI-X message control: function mask bit.
pub const MSIX_CONTROL_MASKALL: u16 = 1 << 14;
/// MSI-X message control: MSI-X enable bit.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Largest MSI-X table (entries).
pub const MSIX_MAX_VECTORS: u16 = 2048;

/// QEMU's default subsystem vendor ID (Red Hat / Qumranet).
pub const DEFAULT_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// QEMU's default subsystem ID.
pub const DEFAULT_SUBSYSTEM_ID: u16 = 0x1100;

/// Errors from building a configuration space or assigning BAR addresses.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// BAR index is not 0..=5 (or 0..=4 for a 64-bit BAR).
    #[error("BAR index {0} out of range")]
    BarIndex(usize),
    /// The BAR register is already used by another BAR.
    #[error("BAR {0} overlaps an already defined BAR")]
    BarInUse(usize),
    /// The size is not a power of two or outside the kind's limits.
    #[error("invalid size {size:#x} for BAR {index}")]
    BarSize {
        /// BAR index.
        index: usize,
        /// Rejected size.
        size: u64,
    },
    /// No BAR is defined at this index.
    #[error("BAR {0} is not defined")]
    NoSuchBar(usize),
    /// The address is not aligned to the BAR size or does not fit the BAR.
    #[error("address {addr:#x} invalid for BAR {index}")]
    BarAddress {
        /// BAR index.
        index: usize,
        /// Rejected address.
        addr: u64,
    },
    /// `writable` and `body` of a capability differ in length.
    #[error("capability mask length {mask} differs from body length {body}")]
    CapabilityMaskLength {
        /// Body length.
        body: usize,
        /// Mask length.
        mask: usize,
    },
    /// The capability does not fit below offset 0x100.
    #[error("no room for capability {id:#04x} of {len} bytes")]
    NoCapabilitySpace {
        /// Capability ID.
        id: u8,
        /// Length including the 2-byte header.
        len: usize,
    },
    /// MSI-X table size is not 1..=2048.
    #[error("invalid MSI-X table size {0}")]
    MsixTableSize(u16),
    /// MSI-X BAR indicator is not 0..=5.
    #[error("invalid MSI-X BAR indicator {0}")]
    MsixBir(u8),
    /// MSI-X table or PBA offset is not 8-byte aligned.
    #[error("MSI-X offset {0:#x} not 8-byte aligned")]
    MsixOffset(u32),
    /// Only one MSI-X capability per function.
    #[error("MSI-X capability already present")]
    MsixDuplicate,
    /// The MSI-X table or PBA BAR is not a defined memory BAR.
    #[error("MSI-X structure in BAR {0}, which is not a memory BAR")]
    MsixBar(u8),
    /// The MSI-X table or PBA does not fit in its BAR.
    #[error("MSI-X structure at {offset:#x}+{len:#x} does not fit BAR {bar}")]
    MsixRegion {
        /// BAR index.
        bar: u8,
        /// Offset in the BAR.
        offset: u32,
        /// Length of the structure.
        len: u64,
    },
    /// Interrupt pin is not 0..=4.
    #[error("invalid interrupt pin {0}")]
    InterruptPin(u8),
}

/// The kind of a base address register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// I/O space BAR.
    Io,
    /// 32-bit memory BAR.
    Mem32 {
        /// Prefetchable bit.
        prefetchable: bool,
    },
    /// 64-bit memory BAR (uses registers `index` and `index + 1`).
    Mem64 {
        /// Prefetchable bit.
        prefetchable: bool,
    },
}

impl BarKind {
    /// The read-only low type bits of the BAR register.
    pub fn type_bits(&self) -> u32 {
        match *self {
            BarKind::Io => 0x1,
            BarKind::Mem32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Mem64 { prefetchable } => 0x4 | (u32::from(prefetchable) << 3),
        }
    }

    /// Whether this is a memory BAR (32- or 64-bit).
    pub fn is_memory(&self) -> bool {
        !matches!(self, BarKind::Io)
    }

    fn min_size(&self) -> u64 {
        match self {
            BarKind::Io => 4,
            _ => 16,
        }
    }

    fn max_size(&self) -> u64 {
        match self {
            BarKind::Io => 1 << 16,
            BarKind::Mem32 { .. } => 1 << 31,
            BarKind::Mem64 { .. } => 1 << 63,
        }
    }

    fn addr_mask(&self) -> u64 {
        match self {
            BarKind::Io => 0xffff_fffc,
            BarKind::Mem32 { .. } => 0xffff_fff0,
            BarKind::Mem64 { .. } => !0xf,
        }
    }
}

/// A BAR as declared by the builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BarInfo {
    /// BAR index (first register for a 64-bit BAR).
    pub index: usize,
    /// Kind.
    pub kind: BarKind,
    /// Size in bytes (a power of two).
    pub size: u64,
}

/// A capability in the list, in list order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CapInfo {
    /// Capability ID.
    pub id: u8,
    /// Offset in configuration space.
    pub offset: u8,
    /// Length in bytes, including the 2-byte ID/next header.
    pub len: u8,
}

/// The MSI-X capability's layout, as declared by the builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsixCapInfo {
    /// Offset of the capability in configuration space.
    pub offset: u8,
    /// Number of vectors.
    pub table_size: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Table offset in that BAR.
    pub table_offset: u32,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// PBA offset in that BAR.
    pub pba_offset: u32,
}

impl MsixCapInfo {
    /// Offset of the message control register in configuration space.
    pub fn control_offset(&self) -> usize {
        usize::from(self.offset) + 2
    }
}

/// What a guest configuration write changed, so the caller can react.
///
/// Invariant: `old` and `new` are the whole dword `dword` before and after the
/// atomic update; for a dropped (invalid) access `old == new` and nothing else
/// is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteEffect {
    /// Byte offset of the access.
    pub offset: usize,
    /// Length of the access in bytes.
    pub len: usize,
    /// Index of the touched dword (`offset / 4`).
    pub dword: usize,
    /// Dword value before the write.
    pub old: u32,
    /// Dword value after the write.
    pub new: u32,
    /// Bit `i` set when the BAR with [`BarInfo::index`] `i` changed value
    /// (either dword of a 64-bit BAR).
    pub bars_changed: u8,
    /// The command register's IO or MEM decode bit changed.
    pub decode_changed: bool,
}

impl WriteEffect {
    fn dropped(offset: usize, len: usize) -> Self {
        Self {
            offset,
            len,
            dword: offset / 4,
            ..Self::default()
        }
    }

    /// Whether the dword changed value.
    pub fn changed(&self) -> bool {
        self.old != self.new
    }

    /// Whether BAR `index` changed value.
    pub fn bar_changed(&self, index: usize) -> bool {
        index < NUM_BARS && self.bars_changed & (1 << index) != 0
    }

    /// Whether the access overlapped the byte range `start..start + len`.
    pub fn touches(&self, start: usize, len: usize) -> bool {
        self.len != 0
            && self.offset < start.saturating_add(len)
            && start < self.offset.saturating_add(self.len)
    }
}

/// Builder of a [`ConfigSpace`]; the masks are fixed by [`build`](Self::build).
#[derive(Debug, Clone)]
pub struct ConfigSpaceBuilder {
    bytes: [u8; HEADER_SIZE],
    wmask: [u8; HEADER_SIZE],
    w1cmask: [u8; HEADER_SIZE],
    bars: Vec<BarInfo>,
    bar_used: [bool; NUM_BARS],
    caps: Vec<CapInfo>,
    next_cap: usize,
    msix: Option<MsixCapInfo>,
}

impl ConfigSpaceBuilder {
    /// Starts a type-0 header with the given IDs; subsystem defaults to
    /// QEMU's 1af4:1100.
    pub fn new(vendor: u16, device: u16) -> Self {
        let mut b = Self {
            bytes: [0; HEADER_SIZE],
            wmask: [0; HEADER_SIZE],
            w1cmask: [0; HEADER_SIZE],
            bars: Vec::new(),
            bar_used: [false; NUM_BARS],
            caps: Vec::new(),
            next_cap: FIRST_CAPABILITY,
            msix: None,
        };
        b.put16(PCI_VENDOR_ID, vendor);
        b.put16(PCI_DEVICE_ID, device);
        b.subsystem(DEFAULT_SUBSYSTEM_VENDOR_ID, DEFAULT_SUBSYSTEM_ID);
        let cmd = COMMAND_WRITABLE.to_le_bytes();
        b.wmask[PCI_COMMAND..PCI_COMMAND + 2].copy_from_slice(&cmd);
        let w1c = STATUS_W1C.to_le_bytes();
        b.w1cmask[PCI_STATUS..PCI_STATUS + 2].copy_from_slice(&w1c);
        b.wmask[PCI_CACHE_LINE_SIZE] = 0xff;
        b.wmask[PCI_INTERRUPT_LINE] = 0xff;
        // As QEMU's pci_init_wmask: the device-specific area is writable
        // until a capability claims its bytes.
        b.wmask[FIRST_CAPABILITY..].fill(0xff);
        b
    }

    /// Starts a type-1 (PCI-to-PCI bridge) header with QEMU's masks
    /// (`pci_init_mask_bridge`, `pci_bridge_initfn`): bus numbers and the
    /// secondary latency timer writable; I/O window 16-bit (bits 7:4 of base
    /// and limit writable); memory and prefetchable windows in 1 MiB units
    /// (bits 15:4 writable), the prefetchable one 64-bit (upper dwords
    /// writable); bridge control as QEMU; status and secondary status 66 MHz
    /// and fast back-to-back capable; no BARs, no expansion ROM, no subsystem
    /// IDs (those are type-0 registers). Class 0604.
    pub(crate) fn new_bridge(vendor: u16, device: u16) -> Self {
        let mut b = Self::new(vendor, device);
        b.put16(PCI_SUBSYSTEM_VENDOR_ID, 0);
        b.put16(PCI_SUBSYSTEM_ID, 0);
        b.class(0x06, 0x04, 0x00);
        b.bytes[PCI_HEADER_TYPE] = HEADER_TYPE_BRIDGE;
        // 66 MHz capable, fast back-to-back capable.
        b.bytes[PCI_STATUS] |= 0xa0;
        b.bytes[bridge::SEC_STATUS] = 0xa0;
        b.wmask[bridge::PRIMARY_BUS..bridge::PRIMARY_BUS + 4].fill(0xff);
        b.wmask[bridge::IO_BASE] = 0xf0;
        b.wmask[bridge::IO_LIMIT] = 0xf0;
        for off in [
            bridge::MEMORY_BASE,
            bridge::MEMORY_LIMIT,
            bridge::PREF_BASE,
            bridge::PREF_LIMIT,
        ] {
            b.wmask[off..off + 2].copy_from_slice(&0xfff0u16.to_le_bytes());
        }
        b.wmask[bridge::PREF_BASE_UPPER32..bridge::PREF_BASE_UPPER32 + 8].fill(0xff);
        // Prefetchable window: 64-bit decoding.
        b.bytes[bridge::PREF_BASE] = 0x01;
        b.bytes[bridge::PREF_LIMIT] = 0x01;
        let ctl = bridge::CONTROL_WRITABLE.to_le_bytes();
        b.wmask[bridge::CONTROL..bridge::CONTROL + 2].copy_from_slice(&ctl);
        let w1c = bridge::CONTROL_DISCARD_STATUS.to_le_bytes();
        b.w1cmask[bridge::CONTROL..bridge::CONTROL + 2].copy_from_slice(&w1c);
        b
    }

    fn put16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets the class code.
    pub fn class(&mut self, class: u8, subclass: u8, prog_if: u8) -> &mut Self {
        self.bytes[PCI_CLASS_PROG] = prog_if;
        self.bytes[PCI_CLASS_PROG + 1] = subclass;
        self.bytes[PCI_CLASS_PROG + 2] = class;
        self
    }

    /// Sets the revision ID.
    pub fn revision(&mut self, revision: u8) -> &mut Self {
        self.bytes[PCI_REVISION_ID] = revision;
        self
    }

    /// Sets the subsystem vendor and subsystem IDs.
    pub fn subsystem(&mut self, vendor: u16, id: u16) -> &mut Self {
        self.put16(PCI_SUBSYSTEM_VENDOR_ID, vendor);
        self.put16(PCI_SUBSYSTEM_ID, id);
        self
    }

    /// Sets the multifunction bit of the header type (bit 7), keeping the
    /// layout (type 0 or 1).
    pub fn multifunction(&mut self, on: bool) -> &mut Self {
        let layout = self.bytes[PCI_HEADER_TYPE] & !HEADER_TYPE_MULTIFUNCTION;
        self.bytes[PCI_HEADER_TYPE] = layout | if on { HEADER_TYPE_MULTIFUNCTION } else { 0 };
        self
    }

    /// Sets the interrupt pin (0 none, 1 INTA .. 4 INTD).
    pub fn interrupt_pin(&mut self, pin: u8) -> Result<&mut Self, ConfigError> {
        if pin > 4 {
            return Err(ConfigError::InterruptPin(pin));
        }
        self.bytes[PCI_INTERRUPT_PIN] = pin;
        Ok(self)
    }

    /// Declares BAR `index` (and `index + 1` for a 64-bit BAR).
    ///
    /// `size` must be a power of two, at least 4 for I/O (at most 64 KiB) and
    /// 16 for memory (at most 2 GiB for 32-bit BARs).
    pub fn bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
    ) -> Result<&mut Self, ConfigError> {
        let regs = if matches!(kind, BarKind::Mem64 { .. }) {
            2
        } else {
            1
        };
        if index.checked_add(regs).is_none_or(|end| end > NUM_BARS) {
            return Err(ConfigError::BarIndex(index));
        }
        if self.bar_used[index..index + regs].iter().any(|u| *u) {
            return Err(ConfigError::BarInUse(index));
        }
        if !size.is_power_of_two() || size < kind.min_size() || size > kind.max_size() {
            return Err(ConfigError::BarSize { index, size });
        }
        let off = PCI_BASE_ADDRESS_0 + 4 * index;
        let mask = !(size - 1) & kind.addr_mask();
        self.put32(off, kind.type_bits());
        self.wmask[off..off + 4].copy_from_slice(&(mask as u32).to_le_bytes());
        if regs == 2 {
            self.put32(off + 4, 0);
            self.wmask[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        for used in &mut self.bar_used[index..index + regs] {
            *used = true;
        }
        self.bars.push(BarInfo { index, kind, size });
        self.bars.sort_by_key(|b| b.index);
        Ok(self)
    }

    /// Adds a capability and returns its offset. Capabilities are placed in
    /// memory one after the other from 0x40 (each dword aligned), but, like
    /// QEMU's `pci_add_capability`, each new one is linked at the *head* of
    /// the list: the capability pointer (0x34) points to the last one added
    /// and the guest walks them newest first. `body` is the capability after
    /// the ID/next bytes; `writable` is the guest-writable bit mask of each
    /// body byte (the ID/next bytes are read-only).
    pub fn capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> Result<u8, ConfigError> {
        if body.len() != writable.len() {
            return Err(ConfigError::CapabilityMaskLength {
                body: body.len(),
                mask: writable.len(),
            });
        }
        let offset = self.next_cap;
        let len = body.len() + 2;
        let end = offset + len;
        if end > HEADER_SIZE {
            return Err(ConfigError::NoCapabilitySpace { id, len });
        }
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..end].copy_from_slice(body);
        self.wmask[offset] = 0;
        self.wmask[offset + 1] = 0;
        self.wmask[offset + 2..end].copy_from_slice(writable);
        // offset < 0x100 and len <= 0xc0 were checked above.
        let (offset8, len8) = (offset as u8, len as u8);
        self.bytes[offset + 1] = self.bytes[PCI_CAPABILITY_LIST];
        self.bytes[PCI_CAPABILITY_LIST] = offset8;
        self.bytes[PCI_STATUS] |= STATUS_CAP_LIST as u8;
        self.caps.insert(
            0,
            CapInfo {
                id,
                offset: offset8,
                len: len8,
            },
        );
        self.next_cap = (end + 3) & !3;
        Ok(offset8)
    }

    /// Appends an MSI-X capability. Message control holds `table_size - 1`
    /// (read-only) with the function mask (bit 14) and enable (bit 15) bits
    /// writable. The BARs must be declared (before [`build`](Self::build))
    /// as memory BARs large enough for the table and PBA.
    pub fn msix_capability(
        &mut self,
        table_size: u16,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Result<u8, ConfigError> {
        if self.msix.is_some() {
            return Err(ConfigError::MsixDuplicate);
        }
        if table_size == 0 || table_size > MSIX_MAX_VECTORS {
            return Err(ConfigError::MsixTableSize(table_size));
        }
        for bir in [table_bar, pba_bar] {
            if usize::from(bir) >= NUM_BARS {
                return Err(ConfigError::MsixBir(bir));
            }
        }
        for off in [table_offset, pba_offset] {
            if off & 7 != 0 {
                return Err(ConfigError::MsixOffset(off));
            }
        }
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(table_size - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(table_bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(pba_bar)).to_le_bytes());
        let mut writable = [0u8; 10];
        writable[1] = ((MSIX_CONTROL_ENABLE | MSIX_CONTROL_MASKALL) >> 8) as u8;
        let offset = self.capability(CAP_ID_MSIX, &body, &writable)?;
        self.msix = Some(MsixCapInfo {
            offset,
            table_size,
            table_bar,
            table_offset,
            pba_bar,
            pba_offset,
        });
        Ok(offset)
    }

    fn check_msix_region(&self, bar: u8, offset: u32, len: u64) -> Result<(), ConfigError> {
        let info = self
            .bars
            .iter()
            .find(|b| b.index == usize::from(bar) && b.kind.is_memory())
            .ok_or(ConfigError::MsixBar(bar))?;
        if u64::from(offset) + len > info.size {
            return Err(ConfigError::MsixRegion { bar, offset, len });
        }
        Ok(())
    }

    /// Builds the configuration space; the masks are immutable afterwards.
    pub fn build(&self) -> Result<ConfigSpace, ConfigError> {
        if let Some(m) = &self.msix {
            let n = u64::from(m.table_size);
            self.check_msix_region(m.table_bar, m.table_offset, n * 16)?;
            self.check_msix_region(m.pba_bar, m.pba_offset, n.div_ceil(64) * 8)?;
        }
        Ok(self.finish())
    }

    /// Builds without the MSI-X layout checks (for headers without MSI-X,
    /// where building cannot fail).
    pub(crate) fn finish(&self) -> ConfigSpace {
        let dword = |a: &[u8; HEADER_SIZE], i: usize| {
            u32::from_le_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
        };
        let init: Box<[u32]> = (0..HEADER_DWORDS).map(|i| dword(&self.bytes, i)).collect();
        let regs = (0..CONFIG_DWORDS)
            .map(|i| AtomicU32::new(init.get(i).copied().unwrap_or(0)))
            .collect();
        ConfigSpace {
            regs,
            wmask: (0..HEADER_DWORDS).map(|i| dword(&self.wmask, i)).collect(),
            w1cmask: (0..HEADER_DWORDS)
                .map(|i| dword(&self.w1cmask, i))
                .collect(),
            init,
            bars: self.bars.clone(),
            caps: self.caps.clone(),
            msix: self.msix,
        }
    }
}

/// The configuration space of one function. See the module docs for the
/// invariants.
#[derive(Debug)]
pub struct ConfigSpace {
    /// 1024 dwords (4 KiB).
    regs: Box<[AtomicU32]>,
    /// Writable bits of the first 64 dwords; zero elsewhere.
    wmask: Box<[u32]>,
    /// Write-1-to-clear bits of the first 64 dwords; zero elsewhere.
    w1cmask: Box<[u32]>,
    /// Values at build time, restored by [`ConfigSpace::reset`].
    init: Box<[u32]>,
    bars: Vec<BarInfo>,
    caps: Vec<CapInfo>,
    msix: Option<MsixCapInfo>,
}

/// Validates an access and returns (dword index, bit shift, lane mask).
fn access(offset: usize, len: usize) -> Option<(usize, u32, u32)> {
    // `len` is a power of two here: alignment is a mask test (no division on the read path).
    if !matches!(len, 1 | 2 | 4)
        || offset & (len - 1) != 0
        || offset.checked_add(len)? > CONFIG_SPACE_SIZE
    {
        return None;
    }
    let shift = (offset % 4) as u32 * 8;
    let lanes = if len == 4 {
        u32::MAX
    } else {
        ((1u32 << (8 * len)) - 1) << shift
    };
    Some((offset / 4, shift, lanes))
}

fn bytes_to_u32(data: &[u8]) -> u32 {
    data.iter()
        .take(4)
        .enumerate()
        .fold(0, |v, (i, b)| v | (u32::from(*b) << (8 * i)))
}

impl ConfigSpace {
    /// Reads 1, 2 or 4 naturally aligned bytes at `offset`; invalid accesses
    /// fill `data` with 0xff. Lock-free.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        let value = access(offset, data.len())
            .and_then(|(dw, shift, _)| Some(self.regs.get(dw)?.load(Ordering::Acquire) >> shift));
        match value {
            // `access` took `data.len()` as 1, 2 or 4; fixed sizes compile to one store each.
            Some(v) => match data.len() {
                1 => data[0] = v as u8,
                2 => data.copy_from_slice(&(v as u16).to_le_bytes()),
                4 => data.copy_from_slice(&v.to_le_bytes()),
                _ => data.fill(0xff),
            },
            None => data.fill(0xff),
        }
    }

    /// Reads dword `index` (0..1024); out of range reads all-ones.
    pub fn read_u32(&self, index: usize) -> u32 {
        self.regs
            .get(index)
            .map_or(u32::MAX, |r| r.load(Ordering::Acquire))
    }

    /// Reads the 16-bit register at `offset` (all-ones if invalid).
    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads the byte at `offset` (0xff if out of range).
    pub fn read_u8(&self, offset: usize) -> u8 {
        let mut b = [0u8; 1];
        self.read(offset, &mut b);
        b[0]
    }

    /// Applies a guest write of 1, 2 or 4 naturally aligned bytes through the
    /// masks with one atomic update of the dword, and reports what changed.
    /// Invalid accesses are dropped (the effect reports no change).
    pub fn write(&self, offset: usize, data: &[u8]) -> WriteEffect {
        let Some((dw, shift, lanes)) = access(offset, data.len()) else {
            return WriteEffect::dropped(offset, data.len());
        };
        let Some(reg) = self.regs.get(dw) else {
            return WriteEffect::dropped(offset, data.len());
        };
        let wmask = self.wmask.get(dw).copied().unwrap_or(0) & lanes;
        let w1c = self.w1cmask.get(dw).copied().unwrap_or(0) & lanes;
        let val = bytes_to_u32(data) << shift;
        let apply = |old: u32| ((old & !wmask) | (val & wmask)) & !(val & w1c);
        let old =
            match reg.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| Some(apply(old))) {
                Ok(old) | Err(old) => old,
            };
        let new = apply(old);
        let mut effect = WriteEffect {
            offset,
            len: data.len(),
            dword: dw,
            old,
            new,
            bars_changed: 0,
            decode_changed: false,
        };
        if old != new {
            if dw == PCI_COMMAND / 4 {
                effect.decode_changed = (old ^ new) & u32::from(COMMAND_IO | COMMAND_MEMORY) != 0;
            }
            let first_bar = PCI_BASE_ADDRESS_0 / 4;
            if (first_bar..first_bar + NUM_BARS).contains(&dw) {
                let reg_index = dw - first_bar;
                if let Some(bar) = self.bars.iter().find(|b| {
                    b.index == reg_index
                        || (matches!(b.kind, BarKind::Mem64 { .. }) && b.index + 1 == reg_index)
                }) {
                    effect.bars_changed = 1 << bar.index;
                }
            }
        }
        effect
    }

    /// Device-side write of 1, 2 or 4 naturally aligned bytes that bypasses
    /// the masks (atomic per dword). Returns false for an invalid access.
    pub fn set_raw(&self, offset: usize, data: &[u8]) -> bool {
        let Some((dw, shift, lanes)) = access(offset, data.len()) else {
            return false;
        };
        let Some(reg) = self.regs.get(dw) else {
            return false;
        };
        let val = (bytes_to_u32(data) << shift) & lanes;
        let _ = reg.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
            Some((old & !lanes) | val)
        });
        true
    }

    /// Device-side: sets status register bits (for example [`STATUS_INTERRUPT`]).
    pub fn set_status_bits(&self, bits: u16) {
        self.regs[PCI_COMMAND / 4].fetch_or(u32::from(bits) << 16, Ordering::AcqRel);
    }

    /// Device-side: clears status register bits.
    pub fn clear_status_bits(&self, bits: u16) {
        self.regs[PCI_COMMAND / 4].fetch_and(!(u32::from(bits) << 16), Ordering::AcqRel);
    }

    /// Restores the values at build time (command 0, BAR addresses 0,
    /// capabilities' writable fields at their initial values), like a PCI
    /// function reset.
    pub fn reset(&self) {
        for (reg, init) in self.regs.iter().zip(self.init.iter()) {
            reg.store(*init, Ordering::Release);
        }
    }

    /// The BAR declared at `index` (the first register of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<&BarInfo> {
        self.bars.iter().find(|b| b.index == index)
    }

    /// The declared BARs, by index.
    pub fn bars(&self) -> &[BarInfo] {
        &self.bars
    }

    /// VMM-side address assignment of BAR `index`, bypassing the masks.
    /// `addr` must be aligned to the BAR size and fit the BAR kind. The two
    /// dwords of a 64-bit BAR are stored separately: do this before the
    /// guest can read the BAR.
    pub fn set_bar_address(&self, index: usize, addr: u64) -> Result<(), ConfigError> {
        let bar = *self.bar(index).ok_or(ConfigError::NoSuchBar(index))?;
        if addr & (bar.size - 1) != 0 || addr & !bar.kind.addr_mask() != 0 {
            return Err(ConfigError::BarAddress { index, addr });
        }
        let dw = PCI_BASE_ADDRESS_0 / 4 + index;
        self.regs[dw].store(addr as u32 | bar.kind.type_bits(), Ordering::Release);
        if matches!(bar.kind, BarKind::Mem64 { .. }) {
            self.regs[dw + 1].store((addr >> 32) as u32, Ordering::Release);
        }
        Ok(())
    }

    /// The address currently programmed in BAR `index` (both dwords for a
    /// 64-bit BAR), without the type bits; `None` if no BAR is declared at
    /// `index`. Whether it decodes depends on [`io_enabled`](Self::io_enabled)
    /// / [`mem_enabled`](Self::mem_enabled).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let dw = PCI_BASE_ADDRESS_0 / 4 + index;
        let mut raw = u64::from(self.read_u32(dw));
        if matches!(bar.kind, BarKind::Mem64 { .. }) {
            raw |= u64::from(self.read_u32(dw + 1)) << 32;
        }
        Some(raw & bar.kind.addr_mask())
    }

    /// The capabilities, in guest list order (newest first, as QEMU).
    pub fn capabilities(&self) -> &[CapInfo] {
        &self.caps
    }

    /// The MSI-X capability layout, if any.
    pub fn msix(&self) -> Option<&MsixCapInfo> {
        self.msix.as_ref()
    }

    fn msix_control(&self) -> u16 {
        self.msix.map_or(0, |m| self.read_u16(m.control_offset()))
    }

    /// MSI-X enable bit (false without an MSI-X capability).
    pub fn msix_enabled(&self) -> bool {
        self.msix_control() & MSIX_CONTROL_ENABLE != 0
    }

    /// MSI-X function mask bit (false without an MSI-X capability).
    pub fn msix_function_masked(&self) -> bool {
        self.msix_control() & MSIX_CONTROL_MASKALL != 0
    }

    /// Command register.
    pub fn command(&self) -> u16 {
        self.read_u32(PCI_COMMAND / 4) as u16
    }

    /// Status register.
    pub fn status(&self) -> u16 {
        (self.read_u32(PCI_STATUS / 4) >> 16) as u16
    }

    /// I/O decode enabled.
    pub fn io_enabled(&self) -> bool {
        self.command() & COMMAND_IO != 0
    }

    /// Memory decode enabled.
    pub fn mem_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// Bus mastering (DMA, MSI) enabled.
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & COMMAND_MASTER != 0
    }

    /// INTx disabled by the guest.
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE != 0
    }

    /// Vendor ID.
    pub fn vendor_id(&self) -> u16 {
        self.read_u16(PCI_VENDOR_ID)
    }

    /// Device ID.
    pub fn device_id(&self) -> u16 {
        self.read_u16(PCI_DEVICE_ID)
    }

    /// Revision ID.
    pub fn revision(&self) -> u8 {
        self.read_u8(PCI_REVISION_ID)
    }

    /// Class code as `class << 16 | subclass << 8 | prog_if`.
    pub fn class_code(&self) -> u32 {
        self.read_u32(PCI_REVISION_ID / 4) >> 8
    }

    /// Header type byte (bit 7: multifunction).
    pub fn header_type(&self) -> u8 {
        self.read_u8(PCI_HEADER_TYPE)
    }

    /// Subsystem vendor ID.
    pub fn subsystem_vendor_id(&self) -> u16 {
        self.read_u16(PCI_SUBSYSTEM_VENDOR_ID)
    }

    /// Subsystem ID.
    pub fn subsystem_id(&self) -> u16 {
        self.read_u16(PCI_SUBSYSTEM_ID)
    }

    /// Interrupt pin (0 none, 1 INTA ..).
    pub fn interrupt_pin(&self) -> u8 {
        self.read_u8(PCI_INTERRUPT_PIN)
    }

    /// Interrupt line (guest-written).
    pub fn interrupt_line(&self) -> u8 {
        self.read_u8(PCI_INTERRUPT_LINE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic() -> ConfigSpace {
        let mut b = ConfigSpaceBuilder::new(0x1af4, 0x1041);
        b.class(0x02, 0x00, 0x00)
            .revision(1)
            .subsystem(0x1af4, 0x1100);
        b.interrupt_pin(1).unwrap();
        b.bar(0, BarKind::Io, 0x20).unwrap();
        b.bar(
            1,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0x1000,
        )
        .unwrap();
        b.bar(4, BarKind::Mem64 { prefetchable: true }, 0x4000)
            .unwrap();
        b.build().unwrap()
    }

    fn w32(c: &ConfigSpace, off: usize, v: u32) -> WriteEffect {
        c.write(off, &v.to_le_bytes())
    }

    #[test]
    fn ids_read_only() {
        let c = basic();
        assert_eq!(c.read_u32(0), 0x1041_1af4);
        assert_eq!(c.class_code(), 0x02_0000);
        assert_eq!(c.revision(), 1);
        w32(&c, 0, 0xffff_ffff);
        w32(&c, 8, 0xffff_ffff);
        w32(&c, 0x2c, 0xffff_ffff);
        c.write(PCI_HEADER_TYPE, &[0x80]);
        c.write(PCI_INTERRUPT_PIN, &[3]);
        c.write(PCI_CAPABILITY_LIST, &[0x40]);
        assert_eq!(c.read_u32(0), 0x1041_1af4);
        assert_eq!(c.read_u32(2), 0x0200_0001);
        assert_eq!(c.subsystem_vendor_id(), 0x1af4);
        assert_eq!(c.subsystem_id(), 0x1100);
        assert_eq!(c.header_type(), 0);
        assert_eq!(c.interrupt_pin(), 1);
        assert_eq!(c.read_u8(PCI_CAPABILITY_LIST), 0);
        // Expansion ROM reads 0 and is not writable.
        w32(&c, PCI_ROM_ADDRESS, 0xffff_ffff);
        assert_eq!(c.read_u32(PCI_ROM_ADDRESS / 4), 0);
    }

    #[test]
    fn writable_bytes() {
        let c = basic();
        c.write(PCI_CACHE_LINE_SIZE, &[0x10]);
        c.write(PCI_INTERRUPT_LINE, &[0x0b]);
        // Latency timer is read-only (as QEMU).
        c.write(PCI_CACHE_LINE_SIZE + 1, &[0x40]);
        assert_eq!(c.read_u8(PCI_CACHE_LINE_SIZE), 0x10);
        assert_eq!(c.read_u8(PCI_CACHE_LINE_SIZE + 1), 0);
        assert_eq!(c.interrupt_line(), 0x0b);
    }

    #[test]
    fn command_bits() {
        let c = basic();
        let e = c.write(PCI_COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_WRITABLE);
        assert_eq!(c.command(), 0x0547);
        assert!(e.decode_changed && e.changed());
        assert!(c.io_enabled() && c.mem_enabled() && c.bus_master_enabled() && c.intx_disabled());
        let e = c.write(PCI_COMMAND, &[COMMAND_MEMORY as u8]);
        assert!(e.decode_changed);
        assert!(!c.io_enabled() && c.mem_enabled());
        // Byte write to the high command byte only touches that lane.
        let e = c.write(PCI_COMMAND + 1, &[0]);
        assert!(!e.decode_changed);
        assert_eq!(c.command(), COMMAND_MEMORY);
    }

    #[test]
    fn status_w1c() {
        let c = basic();
        c.set_status_bits(0xf900 | STATUS_INTERRUPT);
        assert_eq!(c.status(), 0xf908);
        // Writing zeros clears nothing; RO bits ignore writes.
        c.write(PCI_STATUS, &0u16.to_le_bytes());
        assert_eq!(c.status(), 0xf908);
        c.write(PCI_STATUS, &0x0108u16.to_le_bytes());
        assert_eq!(c.status(), 0xf808);
        // A dword write to command also clears status bits written as 1.
        w32(&c, PCI_COMMAND, 0x8000_0002);
        assert_eq!(c.status(), 0x7808);
        assert_eq!(c.command(), COMMAND_MEMORY);
        c.clear_status_bits(STATUS_INTERRUPT);
        assert_eq!(c.status(), 0x7800);
    }

    #[test]
    fn bar_sizing() {
        let c = basic();
        // I/O, 32 bytes.
        let e = w32(&c, 0x10, 0xffff_ffff);
        assert_eq!(c.read_u32(4), 0xffff_ffe1);
        assert!(e.bar_changed(0));
        // Mem32, 4 KiB, not prefetchable.
        w32(&c, 0x14, 0xffff_ffff);
        assert_eq!(c.read_u32(5), 0xffff_f000);
        // Unused BARs stay 0.
        w32(&c, 0x18, 0xffff_ffff);
        assert_eq!(c.read_u32(6), 0);
        // Mem64 prefetchable, 16 KiB.
        w32(&c, 0x20, 0xffff_ffff);
        let e = w32(&c, 0x24, 0xffff_ffff);
        assert_eq!(c.read_u32(8), 0xffff_c00c);
        assert_eq!(c.read_u32(9), 0xffff_ffff);
        assert_eq!(e.bars_changed, 1 << 4);
        // Program addresses.
        w32(&c, 0x20, 0xe000_0000);
        w32(&c, 0x24, 0x1);
        assert_eq!(c.bar_address(4), Some(0x1_e000_0000));
        assert_eq!(c.bar_address(5), None);
        w32(&c, 0x10, 0xc040);
        assert_eq!(c.bar_address(0), Some(0xc040));
        let e = w32(&c, 0x10, 0xc040);
        assert!(!e.changed() && e.bars_changed == 0);
    }

    #[test]
    fn bar_builder_errors() {
        let mut b = ConfigSpaceBuilder::new(1, 2);
        assert_eq!(
            b.bar(6, BarKind::Io, 4).err(),
            Some(ConfigError::BarIndex(6))
        );
        let wide = BarKind::Mem64 {
            prefetchable: false,
        };
        assert_eq!(
            b.bar(usize::MAX, wide, 16).err(),
            Some(ConfigError::BarIndex(usize::MAX))
        );
        assert_eq!(
            b.bar(
                5,
                BarKind::Mem64 {
                    prefetchable: false
                },
                16
            )
            .err(),
            Some(ConfigError::BarIndex(5))
        );
        assert!(matches!(
            b.bar(0, BarKind::Io, 2),
            Err(ConfigError::BarSize { .. })
        ));
        assert!(matches!(
            b.bar(
                0,
                BarKind::Mem32 {
                    prefetchable: false
                },
                8
            ),
            Err(ConfigError::BarSize { .. })
        ));
        assert!(matches!(
            b.bar(
                0,
                BarKind::Mem32 {
                    prefetchable: false
                },
                0x3000
            ),
            Err(ConfigError::BarSize { .. })
        ));
        assert!(matches!(
            b.bar(0, BarKind::Io, 0),
            Err(ConfigError::BarSize { .. })
        ));
        b.bar(
            2,
            BarKind::Mem64 {
                prefetchable: false,
            },
            1 << 40,
        )
        .unwrap();
        assert_eq!(
            b.bar(3, BarKind::Io, 4).err(),
            Some(ConfigError::BarInUse(3))
        );
        assert_eq!(
            b.bar(
                1,
                BarKind::Mem64 {
                    prefetchable: false
                },
                16
            )
            .err(),
            Some(ConfigError::BarInUse(1))
        );
        let c = b.build().unwrap();
        // A BAR larger than 4 GiB: upper dword partly read-only.
        w32(&c, 0x18, 0xffff_ffff);
        w32(&c, 0x1c, 0xffff_ffff);
        assert_eq!(c.read_u32(6), 0x4);
        assert_eq!(c.read_u32(7), 0xffff_ff00);
    }

    #[test]
    fn set_bar_address() {
        let c = basic();
        c.set_bar_address(1, 0xfebf_0000).unwrap();
        assert_eq!(c.read_u32(5), 0xfebf_0000);
        c.set_bar_address(4, 0x80_0000_4000).unwrap();
        assert_eq!(c.read_u32(8), 0x4000 | 0xc);
        assert_eq!(c.read_u32(9), 0x80);
        assert_eq!(c.bar_address(4), Some(0x80_0000_4000));
        assert!(c.set_bar_address(1, 0xfebf_0800).is_err());
        assert!(c.set_bar_address(1, 0x1_0000_0000).is_err());
        assert_eq!(c.set_bar_address(2, 0), Err(ConfigError::NoSuchBar(2)));
    }

    #[test]
    fn capability_list_walk() {
        let mut b = ConfigSpaceBuilder::new(1, 2);
        b.bar(
            2,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0x4000,
        )
        .unwrap();
        let a = b
            .capability(0x09, &[0xaa, 0xbb, 0xcc], &[0xff, 0, 0])
            .unwrap();
        let m = b.msix_capability(3, 2, 0, 2, 0x2000).unwrap();
        let v = b.capability(0x09, &[1; 14], &[0; 14]).unwrap();
        assert_eq!((a, m, v), (0x40, 0x48, 0x54));
        let c = b.build().unwrap();
        assert_ne!(c.status() & STATUS_CAP_LIST, 0);
        // Walk the list like a guest.
        let mut found = vec![];
        let mut ptr = c.read_u8(PCI_CAPABILITY_LIST);
        while ptr != 0 && found.len() < 48 {
            found.push((c.read_u8(ptr.into()), ptr));
            ptr = c.read_u8(usize::from(ptr) + 1);
        }
        // Newest first, like QEMU.
        assert_eq!(found, vec![(0x09, 0x54), (0x11, 0x48), (0x09, 0x40)]);
        assert_eq!(c.read_u8(PCI_CAPABILITY_LIST), 0x54);
        let caps: Vec<_> = c
            .capabilities()
            .iter()
            .map(|c| (c.id, c.offset, c.len))
            .collect();
        assert_eq!(
            caps,
            vec![(0x09, 0x54, 16), (0x11, 0x48, 12), (0x09, 0x40, 5)]
        );
        // ID/next bytes are read-only; the padding after the 5-byte
        // capability at 0x40 and the free area are writable, as QEMU.
        c.write(0x40, &[0xff, 0xff]);
        c.write(0x45, &[0x77]);
        c.write(0xfc, &0x1234_5678u32.to_le_bytes());
        assert_eq!(c.read_u16(0x40), 0x0009);
        assert_eq!(c.read_u8(0x45), 0x77);
        assert_eq!(c.read_u32(0xfc / 4), 0x1234_5678);
        // Per-byte writable mask of a capability body.
        let e = c.write(0x42, &[0x12]);
        assert!(e.touches(0x42, 1) && !e.touches(0x43, 2));
        c.write(0x43, &[0x34]);
        assert_eq!(c.read_u32(0x40 / 4), 0xbb12_0009);
        // MSI-X layout and control bits.
        assert_eq!(c.read_u32(0x48 / 4), 0x0002_4011);
        assert_eq!(c.read_u32(0x4c / 4), 2);
        assert_eq!(c.read_u32(0x50 / 4), 0x2002);
        let e = c.write(0x4a, &0xffffu16.to_le_bytes());
        assert!(e.touches(c.msix().unwrap().control_offset(), 2));
        assert_eq!(c.read_u16(0x4a), 0xc002);
        assert!(c.msix_enabled() && c.msix_function_masked());
        // Reset restores everything written.
        c.reset();
        assert_eq!(c.read_u16(0x4a), 2);
        assert_eq!(c.read_u32(0x40 / 4), 0xbb_aa_00_09);
        assert_eq!(c.read_u8(0x45), 0);
    }

    #[test]
    fn capability_errors() {
        let mut b = ConfigSpaceBuilder::new(1, 2);
        assert!(matches!(
            b.capability(9, &[0; 2], &[0; 3]),
            Err(ConfigError::CapabilityMaskLength { .. })
        ));
        b.capability(9, &[0; 180], &[0; 180]).unwrap();
        assert!(matches!(
            b.capability(9, &[0; 20], &[0; 20]),
            Err(ConfigError::NoCapabilitySpace { .. })
        ));
        let mut b = ConfigSpaceBuilder::new(1, 2);
        assert_eq!(
            b.msix_capability(0, 0, 0, 0, 0),
            Err(ConfigError::MsixTableSize(0))
        );
        assert_eq!(
            b.msix_capability(2049, 0, 0, 0, 0),
            Err(ConfigError::MsixTableSize(2049))
        );
        assert_eq!(
            b.msix_capability(1, 6, 0, 0, 0),
            Err(ConfigError::MsixBir(6))
        );
        assert_eq!(
            b.msix_capability(1, 0, 4, 0, 0),
            Err(ConfigError::MsixOffset(4))
        );
        b.msix_capability(64, 0, 0, 0, 0x400).unwrap();
        assert_eq!(
            b.msix_capability(1, 0, 0, 0, 0),
            Err(ConfigError::MsixDuplicate)
        );
        assert_eq!(b.build().err(), Some(ConfigError::MsixBar(0)));
        b.bar(
            0,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0x400,
        )
        .unwrap();
        assert!(matches!(b.build(), Err(ConfigError::MsixRegion { .. })));
        let mut b = ConfigSpaceBuilder::new(1, 2);
        b.bar(
            0,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0x800,
        )
        .unwrap();
        b.msix_capability(64, 0, 0, 0, 0x400).unwrap();
        assert!(b.build().is_ok());
        assert_eq!(
            ConfigSpaceBuilder::new(1, 2).interrupt_pin(5).err(),
            Some(ConfigError::InterruptPin(5))
        );
    }

    #[test]
    fn invalid_accesses() {
        let c = basic();
        let mut d = [0u8; 4];
        c.read(1, &mut d[..2]);
        assert_eq!(d[..2], [0xff, 0xff]);
        c.read(2, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut d3 = [0u8; 3];
        c.read(0, &mut d3);
        assert_eq!(d3, [0xff; 3]);
        c.read(4096, &mut d[..1]);
        assert_eq!(d[0], 0xff);
        c.read(usize::MAX, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut empty = [0u8; 0];
        c.read(0, &mut empty);
        assert_eq!(c.read_u32(1024), u32::MAX);
        let e = c.write(usize::MAX - 1, &[1, 2]);
        assert!(!e.changed());
        assert!(e.touches(usize::MAX - 1, 1) && !e.touches(0, 4));
        let e = c.write(5, &[0xff, 0xff]);
        assert!(!e.changed());
        assert_eq!(c.command(), 0);
        assert!(!c.write(4, &[]).changed());
        assert!(!c.write(4, &[1; 8]).changed());
        assert!(!c.set_raw(3, &[0, 0]));
        assert_eq!(c.read_u8(4095), 0);
    }

    #[test]
    fn extended_space_reads_zero() {
        let c = basic();
        w32(&c, 0x100, 0xffff_ffff);
        w32(&c, 0xffc, 0xffff_ffff);
        assert_eq!(c.read_u32(0x100 / 4), 0);
        assert_eq!(c.read_u32(0xffc / 4), 0);
    }

    #[test]
    fn set_raw_bypasses_masks() {
        let c = basic();
        assert!(c.set_raw(PCI_VENDOR_ID, &[0x34, 0x12]));
        assert_eq!(c.vendor_id(), 0x1234);
        assert_eq!(c.device_id(), 0x1041);
    }

    #[test]
    fn concurrent_w1c_and_device_updates() {
        let c = std::sync::Arc::new(basic());
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            for _ in 0..10_000 {
                c2.write(PCI_COMMAND, &[COMMAND_MEMORY as u8]);
                c2.write(PCI_COMMAND, &[0]);
            }
        });
        for _ in 0..10_000 {
            c.set_status_bits(STATUS_INTERRUPT);
        }
        t.join().unwrap();
        assert_eq!(c.status(), STATUS_INTERRUPT);
        assert_eq!(c.command(), 0);
    }
}
