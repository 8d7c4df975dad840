//! The guest-physical and port address map. Everything the guest sees at a fixed address is
//! named here, once.
//!
//! ```text
//! 0x0000_0500  GDT, IDT (boot only)
//! 0x0000_6000  PVH start_info and its memory map
//! 0x0000_7000  zero page (Linux boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  identity page tables (PML4, PDPT, PD: first 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x000e_0000  ACPI tables (RSDP first), reserved in e820
//! 0x0010_0000  kernel
//! ...          RAM up to min(size, 3 GiB); the rest of RAM starts at 4 GiB
//! 0xc000_0000  32-bit PCI memory window (BARs), up to the ECAM window:
//!              0xc000_0000 bus 0 (256 KiB per function, by devfn),
//!              0xc400_0000 buses 1..=56 behind bridges (8 MiB per bus by bus number,
//!              32 KiB per function by devfn)
//! 0xe000_0000  ECAM (PCIe config space of bus 0, 1 MiB; of buses 0-255, 256 MiB, when the
//!              machine has bridges), reserved in e820, described by MCFG
//! 0xfec0_0000  IO-APIC
//! 0xfee0_0000  local APICs
//! 0x1_0000_0000      RAM beyond 3 GiB (up to 252 GiB of it with the 64-bit window)
//! 0x40_0000_0000     64-bit PCI memory window (128 GiB, machines with the `mmio64_window`
//!                    property): 64-bit BARs, 512 MiB per bus by bus number, 2 MiB per
//!                    function by devfn
//! 0x60_0000_0000     end of the 64-bit window (384 GiB: below 2^39, the smallest physical
//!                    address width of current x86-64 hosts)
//! ```

/// GDT used for boot.
pub const BOOT_GDT: u64 = 0x500;
/// IDT used for boot (empty).
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO: u64 = 0x6000;
/// PVH memory map, right after the start info.
pub const PVH_MEMMAP: u64 = 0x6100;
/// PVH module list (the initrd).
pub const PVH_MODLIST: u64 = 0x6f00;
/// Linux zero page.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the identity map used for the 64-bit entry.
pub const PML4: u64 = 0x9000;
/// PDPT of the identity map.
pub const PDPT: u64 = 0xa000;
/// Page directory of the identity map (2 MiB pages, first 1 GiB).
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x2_0000;
/// Room for the command line, terminator included.
pub const CMDLINE_MAX: usize = 4096;
/// ACPI tables start here (RSDP first). Linux also scans this area for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the ACPI area (exclusive).
pub const ACPI_END: u64 = 0x10_0000;
/// End of the low conventional memory (EBDA and BIOS area above it).
pub const EBDA_START: u64 = 0x9_fc00;
/// The x86 reset vector (CS:IP F000:FFF0). A guest that "reboots through the BIOS" jumps here.
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// Where the kernel is loaded; also the start of "high" memory for the loaders.
pub const HIMEM_START: u64 = 0x10_0000;
/// Highest RAM address below 4 GiB (exclusive); RAM beyond it moves above 4 GiB.
pub const LOW_RAM_END: u64 = 0xc000_0000;
/// Start of RAM above 4 GiB.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// 32-bit PCI memory window for BARs.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit PCI memory window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// Bytes of the 32-bit PCI window reserved for each function's BARs on bus 0: each function's
/// BARs live in a window of their own at `PCI_MMIO32_START + devfn * size`.
pub const BUS0_FUNCTION_WINDOW: u64 = 0x4_0000;
/// Start of the windows of the buses behind bridges (right after bus 0's 256 functions).
pub const BRIDGED_MMIO_START: u64 = PCI_MMIO32_START + 256 * BUS0_FUNCTION_WINDOW;
/// Bytes of the 32-bit PCI window for each bus behind a bridge, by bus number: bus N (N >= 1)
/// has `BRIDGED_MMIO_START + (N - 1) * size` (a multiple of the bridges' 1 MiB granularity, so
/// a bridge's window is exactly the windows of its buses, which depth-first numbering makes
/// contiguous).
pub const BRIDGED_BUS_WINDOW: u64 = 0x80_0000;
/// Bytes for each function's BARs on a bus behind a bridge, by devfn.
pub const BRIDGED_FUNCTION_WINDOW: u64 = BRIDGED_BUS_WINDOW / 256;
/// The highest bus number that has a memory window (higher buses hold bridges only).
pub const MAX_WINDOWED_BUS: u8 =
    ((PCI_MMIO32_START + PCI_MMIO32_SIZE - BRIDGED_MMIO_START) / BRIDGED_BUS_WINDOW) as u8;
/// ECAM window of bus 0.
pub const ECAM_START: u64 = 0xe000_0000;
/// ECAM size: one bus.
pub const ECAM_SIZE: u64 = 0x10_0000;
/// ECAM size of a machine with bridges: all 256 buses.
pub const ECAM_ALL_BUSES_SIZE: u64 = 0x1000_0000;

/// The ECAM window's size: bus 0 only, or all buses for a machine with bridges (a machine
/// without bridges keeps the window, MCFG, e820 map and DSDT it always had).
pub fn ecam_size(bridges: bool) -> u64 {
    if bridges {
        ECAM_ALL_BUSES_SIZE
    } else {
        ECAM_SIZE
    }
}

/// The BAR window `(base, size)` of the function `devfn` on bus `bus`: a function of its
/// address alone. `None` for buses above [`MAX_WINDOWED_BUS`].
pub fn function_window(bus: u8, devfn: u8) -> Option<(u64, u64)> {
    if bus == 0 {
        return Some((
            PCI_MMIO32_START + u64::from(devfn) * BUS0_FUNCTION_WINDOW,
            BUS0_FUNCTION_WINDOW,
        ));
    }
    let (base, _) = bus_window(bus)?;
    Some((
        base + u64::from(devfn) * BRIDGED_FUNCTION_WINDOW,
        BRIDGED_FUNCTION_WINDOW,
    ))
}

/// The memory window `(base, size)` of bus `bus` behind a bridge (`None` for bus 0 and buses
/// above [`MAX_WINDOWED_BUS`]).
pub fn bus_window(bus: u8) -> Option<(u64, u64)> {
    if bus == 0 || bus > MAX_WINDOWED_BUS {
        return None;
    }
    Some((
        BRIDGED_MMIO_START + u64::from(bus - 1) * BRIDGED_BUS_WINDOW,
        BRIDGED_BUS_WINDOW,
    ))
}

/// The memory window `(base, limit)` (inclusive) of a bridge whose buses are
/// `secondary..=subordinate`: the windows of those buses that have one.
pub fn bridge_window(secondary: u8, subordinate: u8) -> Option<(u32, u32)> {
    let (base, _) = bus_window(secondary)?;
    let (last, size) = bus_window(subordinate.min(MAX_WINDOWED_BUS))?;
    Some((base as u32, (last + size - 1) as u32))
}
/// The 64-bit PCI memory window (prefetchable BARs above 4 GiB). Fixed, not after the end of
/// RAM as QEMU's `pci-hole64` is: RAM size is not part of a machine's record and may change
/// between restarts, while BAR addresses must not. 256 GiB keeps it above any RAM this machine
/// accepts with the window (at most [`MAX_RAM_WITH_MMIO64`]) and its end (384 GiB) below 2^39,
/// the smallest physical address width of current x86-64 CPUs (so a guest can reach it on any
/// host; QEMU's TCG `-cpu max` has 40 bits).
pub const PCI_MMIO64_START: u64 = 0x40_0000_0000;
/// Size of the 64-bit PCI memory window (128 GiB).
pub const PCI_MMIO64_SIZE: u64 = 0x20_0000_0000;
/// Bytes of the 64-bit window for each bus, by bus number (all 256 buses have one).
pub const MMIO64_BUS_WINDOW: u64 = PCI_MMIO64_SIZE / 256;
/// Bytes of the 64-bit window for each function's 64-bit BARs, by devfn.
pub const MMIO64_FUNCTION_WINDOW: u64 = MMIO64_BUS_WINDOW / 256;
/// Most RAM a machine with the 64-bit window can have: RAM above 4 GiB ends at the window.
pub const MAX_RAM_WITH_MMIO64: u64 = PCI_MMIO64_START - HIGH_RAM_START + LOW_RAM_END;

/// The 64-bit BAR window `(base, size)` of the function `devfn` on bus `bus`: a function of its
/// address alone.
pub fn function_window64(bus: u8, devfn: u8) -> (u64, u64) {
    let (base, _) = bus_window64(bus);
    (
        base + u64::from(devfn) * MMIO64_FUNCTION_WINDOW,
        MMIO64_FUNCTION_WINDOW,
    )
}

/// The 64-bit window `(base, size)` of bus `bus`.
pub fn bus_window64(bus: u8) -> (u64, u64) {
    (
        PCI_MMIO64_START + u64::from(bus) * MMIO64_BUS_WINDOW,
        MMIO64_BUS_WINDOW,
    )
}

/// The prefetchable window `(base, limit)` (inclusive) of a bridge whose buses are
/// `secondary..=subordinate`: their 64-bit windows (contiguous by depth-first numbering).
pub fn bridge_window64(secondary: u8, subordinate: u8) -> (u64, u64) {
    let (base, _) = bus_window64(secondary);
    let (last, size) = bus_window64(subordinate.max(secondary));
    (base, last + size - 1)
}

/// IO-APIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages, must not overlap RAM or MMIO in use).
pub const KVM_TSS: u64 = 0xfffb_d000;
/// KVM's identity map page (just below the TSS).
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;
/// PCI type-1 configuration ports 0xcf8..0xd00.
pub const PCI_CONFIG_PORT: u64 = 0xcf8;
/// Number of type-1 configuration ports.
pub const PCI_CONFIG_PORT_LEN: u64 = 8;
/// Number of IO-APIC pins.
pub const IOAPIC_PINS: u32 = 24;

/// The guest RAM ranges for `size` bytes of memory: below 3 GiB, then from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= LOW_RAM_END {
        vec![(0, size)]
    } else {
        vec![(0, LOW_RAM_END), (HIGH_RAM_START, size - LOW_RAM_END)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_pci_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(LOW_RAM_END), vec![(0, LOW_RAM_END)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, LOW_RAM_END), (HIGH_RAM_START, (4 << 30) - LOW_RAM_END)]
        );
    }

    #[test]
    fn bus_windows_tile_the_32_bit_window() {
        assert_eq!(MAX_WINDOWED_BUS, 56);
        assert_eq!(function_window(0, 0x28), Some((0xc0a0_0000, 0x4_0000)));
        assert_eq!(
            function_window(0, 0xff).map(|(b, s)| b + s),
            Some(BRIDGED_MMIO_START)
        );
        assert_eq!(function_window(1, 0), Some((0xc400_0000, 0x8000)));
        assert_eq!(function_window(1, 0x10), Some((0xc408_0000, 0x8000)));
        assert_eq!(function_window(2, 0), Some((0xc480_0000, 0x8000)));
        let (b, s) = function_window(56, 0xff).unwrap();
        assert_eq!(b + s, PCI_MMIO32_START + PCI_MMIO32_SIZE);
        assert_eq!(function_window(57, 0), None);
        assert_eq!(bridge_window(1, 3), Some((0xc400_0000, 0xc57f_ffff)));
        assert_eq!(bridge_window(56, 200), Some((0xdf80_0000, 0xdfff_ffff)));
        assert_eq!(bridge_window(57, 57), None);
        // Whole 1 MiB units, as a bridge decodes.
        assert_eq!(BRIDGED_MMIO_START % (1 << 20), 0);
        assert_eq!(BRIDGED_BUS_WINDOW % (1 << 20), 0);
        // virtio-pci's BARs (4 KiB MSI-X, 16 KiB virtio) fit a bridged function's window.
        const { assert!(0x4000 + 0x4000 <= BRIDGED_FUNCTION_WINDOW) };
    }

    #[test]
    fn the_64_bit_window_is_tiled_by_bus_and_devfn() {
        assert_eq!(MMIO64_BUS_WINDOW, 512 << 20);
        assert_eq!(MMIO64_FUNCTION_WINDOW, 2 << 20);
        assert_eq!(function_window64(0, 0), (PCI_MMIO64_START, 2 << 20));
        assert_eq!(function_window64(0, 0x28), (0x40_0500_0000, 2 << 20));
        assert_eq!(function_window64(1, 0x08), (0x40_2100_0000, 2 << 20));
        let (b, s) = function_window64(255, 255);
        assert_eq!(b + s, PCI_MMIO64_START + PCI_MMIO64_SIZE);
        assert_eq!(bridge_window64(1, 2), (0x40_2000_0000, 0x40_5fff_ffff));
        assert_eq!(bridge_window64(2, 2), (0x40_4000_0000, 0x40_5fff_ffff));
        // 1 MiB granularity of a bridge's prefetchable window; below 2^39; above all RAM.
        assert_eq!(MMIO64_BUS_WINDOW % (1 << 20), 0);
        const { assert!(PCI_MMIO64_START + PCI_MMIO64_SIZE <= 1 << 39) };
        assert_eq!(MAX_RAM_WITH_MMIO64, 255 << 30);
        let ranges = ram_ranges(MAX_RAM_WITH_MMIO64);
        let (base, size) = ranges[1];
        assert_eq!(base + size, PCI_MMIO64_START);
    }

    #[test]
    fn fixed_windows_do_not_overlap() {
        let windows = [
            (PCI_MMIO32_START, PCI_MMIO32_SIZE),
            (ECAM_START, ECAM_ALL_BUSES_SIZE),
            (IOAPIC_START, 0x1000),
            (LAPIC_START, 0x1000),
            (KVM_IDENTITY_MAP, 0x4000),
        ];
        for (i, a) in windows.iter().enumerate() {
            for b in &windows[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }
}
