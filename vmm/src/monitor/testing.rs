//! A sample for tests of the monitor (HMP text layouts, the QMP protocol tests' machine): what
//! [`VmControl::pci_functions`](super::VmControl::pci_functions) reports for a virtio-rng-pci
//! at 00:05.0 with BAR1 and BAR4 placed where the VMM puts them for slot 5.

use super::control::{PciFunctionInfo, PciRegionInfo, RegionKind};

/// virtio-rng-pci `rng0` at 00:05.0: class 00ff, 1af4:1044 (subsystem 1af4:1100), pin A,
/// BAR1 (MSI-X, 4 KiB) at 0xc0008000 and BAR4 (64-bit prefetchable, 16 KiB) at 0xc000c000.
pub fn virtio_rng_info() -> PciFunctionInfo {
    PciFunctionInfo {
        slot: 5,
        class: 0x00ff,
        vendor: 0x1af4,
        device: 0x1044,
        subsystem_vendor: 0x1af4,
        subsystem: 0x1100,
        irq_pin: 1,
        irq_line: 0,
        qdev_id: "rng0".into(),
        driver: "virtio-rng-pci".into(),
        regions: vec![
            PciRegionInfo {
                bar: 1,
                kind: RegionKind::Memory,
                address: 0xc000_8000,
                size: 0x1000,
                prefetch: false,
                mem_type_64: false,
            },
            PciRegionInfo {
                bar: 4,
                kind: RegionKind::Memory,
                address: 0xc000_c000,
                size: 0x4000,
                prefetch: true,
                mem_type_64: true,
            },
        ],
        ..Default::default()
    }
}
