//! The PCI host: puts the root complex's config mechanisms (ports 0xcf8-0xcff, the ECAM
//! window) on the buses, and keeps every function's BARs mapped where the guest programmed them.
//!
//! One exit, end to end: `KVM_RUN` -> [`crate::bus::Bus`] -> [`ConfigPorts`] / [`Ecam`] ->
//! [`pci::PciRoot`] -> the function's [`pci::config::ConfigSpace`]. A config write that changes
//! a BAR or the decode bits comes back as a [`WriteEffect`]; [`BarMapper::remap`] then
//! publishes new bus tables before the exit returns, so the guest's next access already goes to
//! the new place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use pci::config::WriteEffect;
use pci::{PciAddress, PciFunction, PciRoot};

use crate::bus::{Bus, BusDevice, BusRange};

/// One BAR of one function, as a bus device.
struct BarRegion {
    function: Arc<dyn PciFunction>,
    bar: usize,
}

impl BusDevice for BarRegion {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        self.function.bar_read(self.bar, offset, data)
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        self.function.bar_write(self.bar, offset, data)
    }
}

/// Keeps BAR mappings on the port and MMIO buses in step with the functions' config space.
/// Only called on config writes and device changes (never on the read path).
pub struct BarMapper {
    root: Arc<PciRoot>,
    pio: Weak<Bus>,
    mmio: Weak<Bus>,
    /// Per function: the (is_io, base) of every range currently mapped.
    mapped: Mutex<HashMap<PciAddress, Vec<(bool, u64)>>>,
}

impl BarMapper {
    /// A mapper for `root`'s functions onto `pio` and `mmio`.
    pub fn new(root: Arc<PciRoot>, pio: &Arc<Bus>, mmio: &Arc<Bus>) -> Self {
        BarMapper {
            root,
            pio: Arc::downgrade(pio),
            mmio: Arc::downgrade(mmio),
            mapped: Mutex::new(HashMap::new()),
        }
    }

    /// Maps the BARs of the function at `addr` where its config space says, or unmaps them
    /// when decoding is off, the address is zero, or the function is gone. A BAR the guest put
    /// over another device's range stays unmapped (logged) until moved somewhere free.
    pub fn remap(&self, addr: PciAddress) {
        let (Some(pio), Some(mmio)) = (self.pio.upgrade(), self.mmio.upgrade()) else {
            return;
        };
        let mut mapped = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        let old = mapped.remove(&addr).unwrap_or_default();
        // (is_io, range, device, BAR index) of every BAR that should decode.
        let mut want: Vec<(bool, BusRange, Arc<dyn BusDevice>, usize)> = Vec::new();
        if let Some(f) = self.root.get(addr) {
            let cfg = f.config();
            for bar in cfg.bars() {
                let is_io = !bar.kind.is_memory();
                let enabled = if is_io {
                    cfg.io_enabled()
                } else {
                    cfg.mem_enabled()
                };
                let base = cfg.bar_address(bar.index).unwrap_or(0);
                if !enabled || base == 0 || base.checked_add(bar.size).is_none() {
                    continue;
                }
                let device: Arc<dyn BusDevice> = Arc::new(BarRegion {
                    function: f.clone(),
                    bar: bar.index,
                });
                let range = BusRange {
                    base,
                    len: bar.size,
                };
                want.push((is_io, range, device, bar.index));
            }
        }
        let old_of = |io: bool| -> Vec<u64> {
            old.iter()
                .filter(|(i, _)| *i == io)
                .map(|(_, b)| *b)
                .collect()
        };
        // (is_io, base, BAR index) of what is really on the buses now.
        let mut now: Vec<(bool, u64, usize)> = Vec::new();
        for (is_io, bus) in [(true, &pio), (false, &mmio)] {
            let mine: Vec<&(bool, BusRange, Arc<dyn BusDevice>, usize)> =
                want.iter().filter(|w| w.0 == is_io).collect();
            let ranges: Vec<(BusRange, Arc<dyn BusDevice>)> =
                mine.iter().map(|w| (w.1, w.2.clone())).collect();
            let old_bases = old_of(is_io);
            if ranges.is_empty() && old_bases.is_empty() {
                continue;
            }
            match bus.replace_ranges(&old_bases, ranges) {
                Ok(()) => now.extend(mine.iter().map(|w| (is_io, w.1.base, w.3))),
                Err(e) => {
                    // Map what fits, one by one; a clash leaves that BAR unmapped.
                    tracing::warn!("PCI {addr}: BAR placement clashes ({e}); mapping what fits");
                    let _ = bus.replace_ranges(&old_bases, Vec::new());
                    for w in mine {
                        if bus.insert(w.1.base, w.1.len, w.2.clone()).is_ok() {
                            now.push((is_io, w.1.base, w.3));
                        }
                    }
                }
            }
        }
        // Tell the function where each BAR really decodes.
        if let Some(f) = self.root.get(addr) {
            for bar in f.config().bars() {
                let base = now
                    .iter()
                    .find(|(_, _, idx)| *idx == bar.index)
                    .map(|(_, base, _)| *base);
                f.bar_mapped(bar.index, base);
            }
        }
        if !now.is_empty() {
            mapped.insert(addr, now.iter().map(|(io, b, _)| (*io, *b)).collect());
        }
    }

    /// Reacts to a config write's effect.
    pub fn written(&self, result: Option<(PciAddress, WriteEffect)>) {
        if let Some((addr, effect)) = result {
            if effect.bars_changed != 0 || effect.decode_changed {
                self.remap(addr);
            }
        }
    }
}

/// The type-1 config ports 0xcf8-0xcff.
pub struct ConfigPorts {
    root: Arc<PciRoot>,
    mapper: Arc<BarMapper>,
}

impl ConfigPorts {
    /// Config ports decoding onto `root`, remapping BARs through `mapper`.
    pub fn new(root: Arc<PciRoot>, mapper: Arc<BarMapper>) -> Self {
        ConfigPorts { root, mapper }
    }
}

impl BusDevice for ConfigPorts {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        self.root.pio_read(offset, data)
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        self.mapper.written(self.root.pio_write(offset, data))
    }
}

/// The ECAM window of bus 0.
pub struct Ecam {
    root: Arc<PciRoot>,
    mapper: Arc<BarMapper>,
}

impl Ecam {
    /// An ECAM window decoding onto `root`, remapping BARs through `mapper`.
    pub fn new(root: Arc<PciRoot>, mapper: Arc<BarMapper>) -> Self {
        Ecam { root, mapper }
    }
}

impl BusDevice for Ecam {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        self.root.ecam_read(offset, data)
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        self.mapper.written(self.root.ecam_write(offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pci::config::{BarKind, ConfigSpace, ConfigSpaceBuilder};

    struct Dev {
        cfg: ConfigSpace,
    }

    impl PciFunction for Dev {
        fn config(&self) -> &ConfigSpace {
            &self.cfg
        }
        fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(0);
            data[0] = bar as u8;
            if data.len() > 1 {
                data[1] = offset as u8;
            }
        }
        fn name(&self) -> &str {
            "test"
        }
    }

    fn setup() -> (Arc<PciRoot>, Arc<Bus>, Arc<Bus>, ConfigPorts, PciAddress) {
        let root = Arc::new(PciRoot::new());
        let mut b = ConfigSpaceBuilder::new(0x1234, 0x5678);
        b.bar(
            0,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0x1000,
        )
        .unwrap();
        b.bar(2, BarKind::Io, 0x20).unwrap();
        let addr = PciAddress::new(0, 3, 0).unwrap();
        root.add(
            addr,
            Arc::new(Dev {
                cfg: b.build().unwrap(),
            }),
        )
        .unwrap();
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let mapper = Arc::new(BarMapper::new(root.clone(), &pio, &mmio));
        let ports = ConfigPorts::new(root.clone(), mapper);
        (root, pio, mmio, ports, addr)
    }

    fn cfg_write(p: &ConfigPorts, addr: PciAddress, reg: u8, v: u32) {
        p.write(0xcf8, 0, &addr.config_address(reg).to_le_bytes());
        p.write(0xcf8, 4, &v.to_le_bytes());
    }

    #[test]
    fn bars_follow_guest_programming_and_decode_bits() {
        let (_root, pio, mmio, ports, addr) = setup();
        cfg_write(&ports, addr, 0x10, 0xc000_0000);
        cfg_write(&ports, addr, 0x18, 0x1000);
        // Decoding off: nothing mapped.
        assert!(mmio.ranges().is_empty());
        cfg_write(&ports, addr, 0x04, 0x3); // IO + MEM
        let mut d = [0u8; 2];
        assert!(mmio.read(0xc000_0010, &mut d));
        assert_eq!(d, [0, 0x10]);
        assert!(pio.read(0x1004, &mut d));
        assert_eq!(d, [2, 4]);
        // Move BAR0: the old range is gone at once, the new one answers.
        cfg_write(&ports, addr, 0x10, 0xc010_0000);
        assert!(!mmio.read(0xc000_0010, &mut d));
        assert!(mmio.read(0xc010_0010, &mut d));
        // Memory decode off unmaps BAR0 but keeps the I/O BAR.
        cfg_write(&ports, addr, 0x04, 0x1);
        assert!(mmio.ranges().is_empty());
        assert!(pio.read(0x1004, &mut d));
    }

    #[test]
    fn a_bar_moved_over_another_range_stays_unmapped() {
        let (_root, _pio, mmio, ports, addr) = setup();
        struct Other;
        impl BusDevice for Other {
            fn read(&self, _: u64, _: u64, d: &mut [u8]) {
                d.fill(0xaa);
            }
            fn write(&self, _: u64, _: u64, _: &[u8]) {}
        }
        mmio.insert(0xd000_0000, 0x1000, Arc::new(Other)).unwrap();
        cfg_write(&ports, addr, 0x04, 0x2);
        cfg_write(&ports, addr, 0x10, 0xd000_0000);
        let mut d = [0u8; 1];
        assert!(mmio.read(0xd000_0000, &mut d));
        assert_eq!(d, [0xaa], "the existing device keeps its range");
        cfg_write(&ports, addr, 0x10, 0xc000_0000);
        assert!(mmio.read(0xc000_0000, &mut d));
        assert_eq!(d, [0]);
    }
}
