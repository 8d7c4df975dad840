//! The ACPI hot-plug registers a guest reaches through port I/O: QEMU's PCI hot-plug block
//! (`PciHotplug`, PCIU/PCID/B0EJ/PCI_RMV/BNUM) and the GED event register (`Ged`), both on a
//! port bus as the vmm maps them. Guest accesses of any size and alignment, anywhere in and
//! just past both blocks, interleaved with the monitor's side (plug, unplug request, GED
//! notify, machine reset), checked against a model of the registers.

use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::legacy::{
    Ged, PciHotplug, B0EJ_OFFSET, BNUM_OFFSET, GED_PCI_HOTPLUG, GED_PORT, GED_PORT_LEN,
    HOTPLUG_SLOTS, PCID_OFFSET, PCIU_OFFSET, PCI_HOTPLUG_PORT, PCI_HOTPLUG_PORT_LEN,
    PCI_RMV_OFFSET,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Input;

/// What the registers should hold.
#[derive(Default)]
struct Model {
    up: u32,
    down: u32,
    select: u32,
    events: u32,
    /// GED interrupt edges not yet counted.
    edges: u64,
}

impl Model {
    fn bus0(&self) -> bool {
        self.select == 0
    }

    /// The value of a 32-bit read at `off` of the hot-plug block (and its side effect).
    fn hotplug_read(&mut self, off: u64) -> u32 {
        match off {
            PCIU_OFFSET if self.bus0() => std::mem::take(&mut self.up),
            PCID_OFFSET if self.bus0() => self.down,
            PCI_RMV_OFFSET if self.bus0() => HOTPLUG_SLOTS,
            BNUM_OFFSET => self.select,
            _ => 0,
        }
    }

    /// A 32-bit write at `off` of the hot-plug block; returns the slots it ejects.
    fn hotplug_write(&mut self, off: u64, v: u32) -> Vec<u8> {
        match off {
            B0EJ_OFFSET if self.bus0() => {
                let ejected = self.down & v & HOTPLUG_SLOTS;
                self.down &= !ejected;
                self.up &= !ejected;
                (1..32u8).filter(|s| ejected & (1 << s) != 0).collect()
            }
            BNUM_OFFSET => {
                self.select = v;
                Vec::new()
            }
            _ => Vec::new(),
        }
    }
}

/// An access size: mostly 4, sometimes what a hostile guest tries.
fn size(inp: &mut Input) -> usize {
    inp.pick(&[4, 4, 4, 1, 2, 8, 3])
}

/// A port in or just past one of the blocks; returns (port, block is GED).
fn port(inp: &mut Input) -> (u64, bool) {
    if inp.below(4) == 0 {
        (GED_PORT + inp.below(GED_PORT_LEN as usize + 4) as u64, true)
    } else {
        let off = match inp.below(4) {
            0 => inp.below(PCI_HOTPLUG_PORT_LEN as usize + 4) as u64,
            _ => inp.below(5) as u64 * 4,
        };
        (PCI_HOTPLUG_PORT + off, false)
    }
}

/// A slot number, valid (1..=31) or not (0, 32, 255).
fn slot(inp: &mut Input) -> u8 {
    match inp.below(8) {
        0 => inp.pick(&[0, 32, 255]),
        _ => 1 + inp.below(31) as u8,
    }
}

/// A B0EJ / BNUM value.
fn value(inp: &mut Input, m: &Model) -> u32 {
    match inp.below(6) {
        0 => m.down,
        1 => 1 << inp.below(32),
        2 => 0,
        3 => u32::MAX,
        _ => inp.u32(),
    }
}

/// Target: ACPI PCI hot-plug and GED registers.
pub fn target_acpi_hotplug(data: &[u8]) {
    let mut inp = Input::new(data);
    let ejected: Arc<Mutex<Vec<u8>>> = Arc::default();
    let sink = ejected.clone();
    let hp = Arc::new(PciHotplug::new(Arc::new(move |_, s| {
        sink.lock().unwrap_or_else(|p| p.into_inner()).push(s)
    })));
    let ged = Arc::new(Ged::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let bus = Bus::new();
    bus.insert(PCI_HOTPLUG_PORT, PCI_HOTPLUG_PORT_LEN, hp.clone())
        .expect("hot-plug ports");
    bus.insert(GED_PORT, GED_PORT_LEN, ged.clone())
        .expect("GED port");
    let take_ejected = || std::mem::take(&mut *ejected.lock().unwrap_or_else(|p| p.into_inner()));
    let mut m = Model::default();
    let mut ops = 0;
    while !inp.is_empty() && ops < 512 {
        ops += 1;
        match inp.below(10) {
            0 => {
                let s = slot(&mut inp);
                let r = hp.plugged(0, s);
                assert_eq!(r.is_ok(), (1..=31).contains(&s), "plugged({s}): {r:?}");
                if r.is_ok() {
                    m.up |= 1 << s;
                }
            }
            1 => {
                let s = slot(&mut inp);
                let r = hp.unplug_request(0, s);
                assert_eq!(
                    r.is_ok(),
                    (1..=31).contains(&s),
                    "unplug_request({s}): {r:?}"
                );
                if r.is_ok() {
                    m.down |= 1 << s;
                }
            }
            2 => {
                let bits = match inp.below(3) {
                    0 => 0,
                    1 => GED_PCI_HOTPLUG,
                    _ => inp.u32(),
                };
                ged.notify(bits).expect("GED notify");
                m.events |= bits;
                m.edges += u64::from(bits != 0);
            }
            3 if inp.below(4) == 0 => {
                let want: Vec<(u8, u32)> =
                    (m.down != 0).then_some((0, m.down)).into_iter().collect();
                assert_eq!(hp.reset(), want, "reset: pending removals (bus 0 only)");
                ged.reset();
                m = Model {
                    edges: m.edges,
                    ..Model::default()
                };
            }
            3..=6 => {
                let (p, is_ged) = port(&mut inp);
                let n = size(&mut inp);
                let mut buf = [0xa5u8; 8];
                let claimed = bus.read(p, &mut buf[..n]);
                let (base, len) = if is_ged {
                    (GED_PORT, GED_PORT_LEN)
                } else {
                    (PCI_HOTPLUG_PORT, PCI_HOTPLUG_PORT_LEN)
                };
                let off = p - base;
                assert_eq!(claimed, off < len, "read of port {p:#x}: claimed");
                let mut want = [0xa5u8; 8];
                if claimed {
                    want[..n].fill(0);
                    if n == 4 && off % 4 == 0 {
                        let v = if is_ged {
                            std::mem::take(&mut m.events)
                        } else {
                            m.hotplug_read(off)
                        };
                        want[..4].copy_from_slice(&v.to_le_bytes());
                    }
                }
                assert_eq!(buf, want, "{n}-byte read of port {p:#x}");
            }
            _ => {
                let (p, is_ged) = port(&mut inp);
                let n = size(&mut inp);
                let v = value(&mut inp, &m);
                let mut buf = [0u8; 8];
                buf[..4].copy_from_slice(&v.to_le_bytes());
                buf[4..].copy_from_slice(&v.to_le_bytes());
                let claimed = bus.write(p, &buf[..n]);
                let want = if !claimed || is_ged || n != 4 || p % 4 != 0 {
                    Vec::new()
                } else {
                    m.hotplug_write(p - PCI_HOTPLUG_PORT, v)
                };
                assert_eq!(
                    take_ejected(),
                    want,
                    "{n}-byte write {v:#x} to port {p:#x}: ejected slots"
                );
            }
        }
        assert_eq!(hp.pending_removals(0), m.down, "pending removals");
        let s = slot(&mut inp);
        assert_eq!(
            hp.removal_pending(0, s),
            (1..=31).contains(&s) && m.down & (1 << s) != 0,
            "removal_pending({s})"
        );
        assert_eq!(ged.pending(), m.events, "GED pending events");
        let edges = ged.irq().read().unwrap_or(0);
        assert_eq!(edges, std::mem::take(&mut m.edges), "GED interrupt edges");
    }
    // Racing ejects (two vCPUs running _EJ0 for the same slots): each requested slot is
    // ejected exactly once.
    if inp.bool() {
        let wanted = (m.down | inp.u32()) & HOTPLUG_SLOTS;
        for s in 1..32u8 {
            if wanted & (1 << s) != 0 {
                hp.unplug_request(0, s).expect("valid slot");
            }
        }
        let bus = Arc::new(bus);
        bus.write(PCI_HOTPLUG_PORT + BNUM_OFFSET, &0u32.to_le_bytes());
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for s in 1..32u32 {
                        bus.write(PCI_HOTPLUG_PORT + B0EJ_OFFSET, &(1u32 << s).to_le_bytes());
                    }
                    bus.write(PCI_HOTPLUG_PORT + B0EJ_OFFSET, &u32::MAX.to_le_bytes());
                })
            })
            .collect();
        for t in threads {
            t.join().expect("eject thread");
        }
        let mut got = take_ejected();
        got.sort_unstable();
        let want: Vec<u8> = (1..32u8).filter(|s| wanted & (1 << s) != 0).collect();
        assert_eq!(got, want, "racing ejects: each requested slot once");
        assert_eq!(hp.pending_removals(0), 0, "racing ejects: nothing pending");
    }
}
