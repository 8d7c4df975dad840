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
//! 0xc000_0000  32-bit PCI memory window (BARs), up to the ECAM window
//! 0xe000_0000  ECAM (PCIe config space of bus 0, 1 MiB), reserved in e820, described by MCFG
//! 0xfec0_0000  IO-APIC
//! 0xfee0_0000  local APICs
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
/// ECAM window of bus 0.
pub const ECAM_START: u64 = 0xe000_0000;
/// ECAM size: one bus.
pub const ECAM_SIZE: u64 = 0x10_0000;
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
    fn fixed_windows_do_not_overlap() {
        let windows = [
            (PCI_MMIO32_START, PCI_MMIO32_SIZE),
            (ECAM_START, ECAM_SIZE),
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
