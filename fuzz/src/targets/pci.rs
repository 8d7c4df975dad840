//! Config-space and BAR/MMIO targets against a realized device set, dispatched exactly as the
//! vCPU loop does (`Bus::read`/`Bus::write` on the port and MMIO buses -> `ConfigPorts` /
//! `Ecam` / `BarRegion`).
//!
//! The machine: `PciRoot` with its host bridge (00:00.0) and four virtio-rng functions
//! (00:03.0 with 2 MSI-X vectors, 00:04.0 multi-function with 8, 00:04.1 without MSI-X,
//! 00:1f.0 with 1) and a two-queue virtio-console (00:08.0, output to /dev/null), 1 MiB of guest memory, the config ports at 0xcf8 and ECAM at
//! [`ECAM_BASE`]. A [`FuzzHost`] stands in for KVM and refuses duplicate ioeventfds as KVM
//! does.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusDevice};
use devices::pci_host::{BarMapper, ConfigPorts, Ecam};
use devices::virtio::console::{Console, ConsoleBackend};
use devices::virtio::pci::{
    TransportProps, VirtioHost, VirtioPciDevice, MSIX_BAR, MSIX_PBA_OFFSET, NOTIFY_MULTIPLIER,
    NOTIFY_OFFSET, VIRTIO_BAR,
};
use devices::virtio::rng::Rng;
use pci::{PciAddress, PciFunction, PciRoot};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Input;

/// ECAM window base (as in the VMM's layout).
pub const ECAM_BASE: u64 = 0xe000_0000;
/// Guest RAM size.
pub const MEM_SIZE: u64 = 1 << 20;

/// KVM stand-in: ioeventfds by address (duplicates refused with EEXIST, like KVM), MSI routes.
#[derive(Default)]
pub struct FuzzHost {
    next_gsi: AtomicU32,
    /// Registered ioeventfd addresses.
    pub ioevents: Mutex<HashMap<u64, ()>>,
    /// Unregistrations of addresses that were not registered.
    pub bad_unregister: AtomicU32,
    /// Registrations refused (EEXIST).
    pub refused: AtomicU32,
    /// MSI routes by GSI, as last set.
    pub routes: Mutex<HashMap<u32, Option<(u64, u32)>>>,
    /// MSI GSIs handed out and not given back.
    pub allocated: Mutex<HashSet<u32>>,
    /// Releases of GSIs not handed out (or given back twice), and routes set on them.
    pub bad_msi: AtomicU32,
}

impl VirtioHost for FuzzHost {
    fn register_ioevent(&self, _: &EventFd, addr: u64) -> std::io::Result<()> {
        let mut m = self.ioevents.lock().unwrap_or_else(|p| p.into_inner());
        if m.contains_key(&addr) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
        }
        m.insert(addr, ());
        Ok(())
    }
    fn unregister_ioevent(&self, _: &EventFd, addr: u64) -> std::io::Result<()> {
        let mut m = self.ioevents.lock().unwrap_or_else(|p| p.into_inner());
        if m.remove(&addr).is_none() {
            self.bad_unregister.fetch_add(1, Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(())
    }
    fn allocate_msi(&self) -> std::io::Result<(u32, EventFd)> {
        let gsi = 24 + self.next_gsi.fetch_add(1, Ordering::Relaxed);
        self.allocated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(gsi);
        Ok((gsi, EventFd::new(EFD_NONBLOCK)?))
    }
    fn release_msi(&self, gsi: u32, _: &EventFd) -> std::io::Result<()> {
        let known = self
            .allocated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&gsi);
        if !known {
            self.bad_msi.fetch_add(1, Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        }
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&gsi);
        Ok(())
    }
    fn set_msi_route(&self, gsi: u32, msg: Option<(u64, u32)>) -> std::io::Result<()> {
        if !self
            .allocated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&gsi)
        {
            self.bad_msi.fetch_add(1, Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        }
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(gsi, msg);
        Ok(())
    }
    /// Lifecycle work inline: deterministic runs.
    fn device_work(&self) -> devices::virtio::DeviceWork {
        devices::virtio::DeviceWork::inline()
    }
}

/// The ioeventfd checks: `leak` checks ioeventfds also after a refused registration, `clash`
/// also requires every ioeventfd to sit in a BAR the mapper really mapped. Both on (they were
/// bugs in devices/src/virtio/pci.rs, fixed; the corpus keeps an input for each);
/// `FUZZ_STRICT_IOEVENTFD=leak|clash` keeps only one, `=0` neither.
fn strict(what: &str) -> bool {
    static STRICT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let v = STRICT.get_or_init(|| std::env::var("FUZZ_STRICT_IOEVENTFD").unwrap_or("1".into()));
    v == "1" || v == what
}

/// One device of the machine.
pub struct Dev {
    /// Where it sits.
    pub addr: PciAddress,
    /// The transport.
    pub dev: Arc<VirtioPciDevice>,
    /// Its number of queues.
    pub queues: u64,
    /// The GSIs of its MSI-X vectors, by vector.
    pub gsis: Vec<u32>,
}

/// Read-only facts of a function: address, read-only header bytes, (offset, id, next) of
/// each capability.
type Snapshot = (PciAddress, Vec<u8>, Vec<(u8, u8, u8)>);

/// The machine the PCI targets poke at.
pub struct PciMachine {
    /// The root complex.
    pub root: Arc<PciRoot>,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// The KVM stand-in.
    pub host: Arc<FuzzHost>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The virtio functions.
    pub devs: Vec<Dev>,
    /// Read-only facts of every function taken at start: (address, header bytes, cap chain).
    snapshot: Vec<Snapshot>,
}

/// Header registers no guest write may change: IDs, revision, class, header type, subsystem,
/// capability pointer, interrupt pin.
const READ_ONLY: &[usize] = &[
    0x00, 0x01, 0x02, 0x03, 0x08, 0x09, 0x0a, 0x0b, 0x0e, 0x2c, 0x2d, 0x2e, 0x2f, 0x34, 0x3d,
];

fn cap_chain(root: &PciRoot, addr: PciAddress) -> Vec<(u8, u8, u8)> {
    let mut out = Vec::new();
    let mut b = [0u8];
    root.config_read(addr, 0x34, &mut b);
    let mut ptr = b[0] & 0xfc;
    while ptr != 0 {
        assert!(
            out.len() < 48 && ptr >= 0x40,
            "{addr}: capability list loops or points into the header ({ptr:#x})"
        );
        let mut c = [0u8; 2];
        root.config_read(addr, usize::from(ptr), &mut c);
        out.push((ptr, c[0], c[1]));
        ptr = c[1] & 0xfc;
    }
    out
}

impl PciMachine {
    /// Builds the machine.
    pub fn new() -> Self {
        let root = Arc::new(PciRoot::new());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let host = Arc::new(FuzzHost::default());
        let mut devs = Vec::new();
        let gsi_now = |h: &FuzzHost| 24 + h.next_gsi.load(Ordering::Relaxed);
        for (slot, func, vectors, multifunction) in [
            (3u8, 0u8, 2u16, false),
            (4, 0, 8, true),
            (4, 1, 0, false),
            (0x1f, 0, 1, false),
        ] {
            let first = gsi_now(&host);
            let dev = Arc::new(
                VirtioPciDevice::new(
                    "virtio-rng-pci",
                    Arc::new(Rng::new()),
                    TransportProps {
                        vectors,
                        multifunction,
                    },
                    mem.clone(),
                    host.clone(),
                )
                .expect("virtio-rng-pci"),
            );
            let addr = PciAddress::new(0, slot, func).expect("address");
            root.add(addr, dev.clone()).expect("add");
            devs.push(Dev {
                addr,
                dev,
                queues: 1,
                gsis: (first..gsi_now(&host)).collect(),
            });
        }
        // A two-queue device (virtio-console writing to /dev/null) at 00:08.0.
        let first = gsi_now(&host);
        let console = Arc::new(
            VirtioPciDevice::new(
                "virtio-console-pci",
                Arc::new(Console::new(&ConsoleBackend::File("/dev/null".into())).expect("console")),
                TransportProps {
                    vectors: 3,
                    multifunction: false,
                },
                mem.clone(),
                host.clone(),
            )
            .expect("virtio-console-pci"),
        );
        let addr = PciAddress::new(0, 8, 0).expect("address");
        root.add(addr, console.clone()).expect("add");
        devs.push(Dev {
            addr,
            dev: console,
            queues: 2,
            gsis: (first..gsi_now(&host)).collect(),
        });
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let mapper = Arc::new(BarMapper::new(root.clone(), &pio, &mmio));
        let ports: Arc<dyn BusDevice> = Arc::new(ConfigPorts::new(root.clone(), mapper.clone()));
        let ecam: Arc<dyn BusDevice> = Arc::new(Ecam::new(root.clone(), mapper));
        pio.insert(0xcf8, 8, ports).expect("config ports");
        mmio.insert(ECAM_BASE, pci::root::ECAM_BUS0_SIZE, ecam)
            .expect("ecam");
        let mut m = PciMachine {
            root,
            pio,
            mmio,
            host,
            mem,
            devs,
            snapshot: Vec::new(),
        };
        m.snapshot = m
            .root
            .functions()
            .into_iter()
            .map(|(a, f)| {
                let mut hdr = [0u8; 0x40];
                f.config().read(0, &mut hdr);
                let ro = READ_ONLY.iter().map(|&o| hdr[o]).collect();
                (a, ro, cap_chain(&m.root, a))
            })
            .collect();
        m
    }

    /// Latches `addr`/`reg` into CF8 and reads `size` bytes at CFC+lane.
    pub fn cf8_read(&self, addr: PciAddress, reg: u8, size: usize) -> u64 {
        self.pio
            .write(0xcf8, &addr.config_address(reg).to_le_bytes());
        let lane = u64::from(reg & 3);
        let mut d = [0u8; 8];
        self.pio.read(0xcfc + lane, &mut d[..size]);
        u64::from_le_bytes(d)
    }

    /// Latches `addr`/`reg` into CF8 and writes `size` bytes of `v` at CFC+lane.
    pub fn cf8_write(&self, addr: PciAddress, reg: u8, size: usize, v: u64) {
        self.pio
            .write(0xcf8, &addr.config_address(reg).to_le_bytes());
        let lane = u64::from(reg & 3);
        self.pio.write(0xcfc + lane, &v.to_le_bytes()[..size]);
    }

    /// ECAM read of `size` bytes at `reg` of `addr`.
    pub fn ecam_read(&self, addr: PciAddress, reg: u16, size: usize) -> u64 {
        let mut d = [0u8; 8];
        self.mmio.read(
            ECAM_BASE + addr.ecam_offset() + u64::from(reg),
            &mut d[..size],
        );
        u64::from_le_bytes(d)
    }

    /// ECAM write.
    pub fn ecam_write(&self, addr: PciAddress, reg: u16, size: usize, v: u64) {
        self.mmio.write(
            ECAM_BASE + addr.ecam_offset() + u64::from(reg),
            &v.to_le_bytes()[..size],
        );
    }

    /// A config write through CF8/CFC or ECAM (`ecam`), dword-aligned `reg`.
    pub fn cfg_write(&self, ecam: bool, addr: PciAddress, reg: u16, size: usize, v: u64) {
        if ecam {
            self.ecam_write(addr, reg, size, v)
        } else {
            self.cf8_write(addr, reg as u8, size.min(4), v)
        }
    }

    /// Like a firmware: BAR 1 and BAR 4 of every function at distinct addresses, decode on.
    pub fn firmware_setup(&self) {
        for (i, d) in self.devs.iter().enumerate() {
            let base = 0xc000_0000u64 + (i as u64) * 0x10_0000;
            self.cf8_write(d.addr, 0x14, 4, base);
            self.cf8_write(d.addr, 0x20, 4, base + 0x8_0000);
            self.cf8_write(d.addr, 0x24, 4, 0);
            self.cf8_write(d.addr, 0x04, 2, 0x6);
        }
    }

    /// Where BAR `bar` of device `i` currently is (0 when unprogrammed).
    pub fn bar(&self, i: usize, bar: usize) -> u64 {
        self.devs[i].dev.config().bar_address(bar).unwrap_or(0)
    }

    /// Checks every invariant; panics on a violation.
    pub fn check(&self) {
        // The host bridge answers with its IDs, both ways.
        let hb = PciAddress::HOST_BRIDGE;
        assert_eq!(
            self.cf8_read(hb, 0, 4),
            0x0008_1b36,
            "host bridge IDs through CF8/CFC"
        );
        assert_eq!(
            self.ecam_read(hb, 0, 4),
            0x0008_1b36,
            "host bridge IDs through ECAM"
        );
        // Read-only registers and capability chains unchanged.
        for (a, ro, caps) in &self.snapshot {
            let f = self.root.get(*a).expect("function still present");
            let mut hdr = [0u8; 0x40];
            f.config().read(0, &mut hdr);
            let now: Vec<u8> = READ_ONLY.iter().map(|&o| hdr[o]).collect();
            assert_eq!(&now, ro, "{a}: read-only header registers changed");
            assert_eq!(
                &cap_chain(&self.root, *a),
                caps,
                "{a}: capability list changed"
            );
        }
        // The config mechanisms are still on the buses, where they were.
        assert!(
            self.mmio
                .ranges()
                .iter()
                .any(|r| r.base == ECAM_BASE && r.len == pci::root::ECAM_BUS0_SIZE),
            "the ECAM window was displaced"
        );
        assert!(
            self.pio
                .ranges()
                .iter()
                .any(|r| r.base == 0xcf8 && r.len == 8),
            "the config ports were displaced"
        );
        // MSI routes: a vector's GSI, once routed, points at what its table entry says now.
        let routes = self.host.routes.lock().unwrap_or_else(|p| p.into_inner());
        for d in &self.devs {
            for (v, gsi) in d.gsis.iter().enumerate() {
                let Some(Some((addr, data))) = routes.get(gsi).copied() else {
                    continue;
                };
                let mut e = [0u8; 16];
                for k in 0..4 {
                    d.dev.bar_read(
                        MSIX_BAR,
                        v as u64 * 16 + 4 * k,
                        &mut e[4 * k as usize..][..4],
                    );
                }
                let want_addr = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
                let want_data = u32::from_le_bytes(e[8..12].try_into().unwrap_or_default());
                assert_eq!(
                    (addr, data),
                    (want_addr, want_data),
                    "{} vector {v}: MSI route of GSI {gsi} is stale",
                    d.addr
                );
            }
        }
        drop(routes);
        // No stale mapping: every MMIO range but ECAM is a memory BAR of a function, exactly
        // where its config space puts it, with memory decoding on; the port bus holds only
        // the config ports (no function has I/O BARs).
        for r in self.mmio.ranges() {
            if r.base == ECAM_BASE {
                continue;
            }
            let owned = self.devs.iter().any(|d| {
                let cfg = d.dev.config();
                cfg.mem_enabled()
                    && cfg.bars().iter().any(|b| {
                        b.kind.is_memory()
                            && b.size == r.len
                            && cfg.bar_address(b.index) == Some(r.base)
                    })
            });
            assert!(
                owned,
                "MMIO range {:#x}+{:#x} is mapped but no enabled BAR is there",
                r.base, r.len
            );
        }
        assert_eq!(
            self.pio.ranges().len(),
            1,
            "port ranges: {:?}",
            self.pio.ranges()
        );
        for bus in [&self.pio, &self.mmio] {
            let r = bus.ranges();
            for w in r.windows(2) {
                assert!(
                    w[0].base
                        .checked_add(w[0].len)
                        .is_some_and(|e| e <= w[1].base),
                    "bus ranges overlap: {:?}",
                    w
                );
            }
        }
        // Every registered ioeventfd sits in the notify area of a function whose memory
        // decoding is on and whose BAR 4 is there (a stale one would swallow guest writes).
        //
        // Also after a refused registration (two notify areas on one address): `sync_notify`
        // in devices/src/virtio/pci.rs must undo the queues it did register.
        let ioevents = self.host.ioevents.lock().unwrap_or_else(|p| p.into_inner());
        let refused = self.host.refused.load(Ordering::SeqCst) > 0;
        for &a in ioevents.keys().filter(|_| strict("leak") || !refused) {
            let owner = self.devs.iter().any(|d| {
                let cfg = d.dev.config();
                let Some(base) = cfg.bar_address(VIRTIO_BAR).filter(|&b| b != 0) else {
                    return false;
                };
                let notify = base + NOTIFY_OFFSET;
                cfg.mem_enabled()
                    && a >= notify
                    && (a - notify).is_multiple_of(u64::from(NOTIFY_MULTIPLIER))
                    && (a - notify) / u64::from(NOTIFY_MULTIPLIER) < d.queues
            });
            assert!(owner, "ioeventfd at {a:#x} belongs to no notify area");
            if strict("clash") {
                // Stricter: the owner's BAR 4 is really on the bus (not left unmapped by the
                // mapper because it clashed with another range).
                let mapped = self.devs.iter().any(|d| {
                    let cfg = d.dev.config();
                    let Some(base) = cfg.bar_address(VIRTIO_BAR).filter(|&b| b != 0) else {
                        return false;
                    };
                    let notify = base + NOTIFY_OFFSET;
                    a >= notify
                        && (a - notify) / u64::from(NOTIFY_MULTIPLIER) < d.queues
                        && self.mmio.ranges().iter().any(|r| {
                            r.base == base && r.len == devices::virtio::pci::VIRTIO_BAR_SIZE
                        })
                });
                assert!(
                    mapped,
                    "ioeventfd at {a:#x} is registered for a BAR 4 the mapper left unmapped (a clash): it swallows writes to whatever is mapped there"
                );
            }
        }
    }
}

impl Default for PciMachine {
    fn default() -> Self {
        Self::new()
    }
}

/// Values worth writing into config registers.
fn palette(m: &PciMachine, inp: &mut Input) -> u64 {
    match inp.below(12) {
        0 => 0,
        1 => u64::MAX,
        2 => ECAM_BASE,
        3 => ECAM_BASE + 0x1_8000,
        4 => 0x1000, // over RAM
        5 => 0xcf8,  // over the config ports (an I/O BAR would land there)
        6 => 0xc000_0000 + (inp.below(8) as u64) * 0x1000,
        7 => {
            // Over another function's BAR.
            let i = inp.below(m.devs.len());
            let b = inp.pick(&[MSIX_BAR, VIRTIO_BAR]);
            m.bar(i, b)
        }
        8 => 0xfee0_0000, // the MSI window
        9 => u64::from(inp.u16()),
        10 => 0xffff_f000,
        _ => inp.u64(),
    }
}

/// Registers worth writing.
fn interesting_reg(m: &PciMachine, i: usize, inp: &mut Input) -> u16 {
    let msix = m.devs[i].dev.config().msix().map(|c| c.offset as u16);
    match inp.below(10) {
        0 => 0x04,
        1 => 0x06,
        2 => 0x10 + 4 * inp.below(6) as u16,
        3 => 0x30,
        4 => 0x34,
        5 => 0x3c,
        6 => msix.map_or(0x40, |o| o + 2),
        7 => msix.map_or(0x44, |o| o + 4 * inp.below(3) as u16),
        8 => 0x40 + inp.below(0xc0) as u16,
        _ => inp.below(0x1000) as u16 & !3,
    }
}

fn any_addr(m: &PciMachine, inp: &mut Input) -> PciAddress {
    match inp.below(8) {
        0 => PciAddress::HOST_BRIDGE,
        1..=5 => m.devs[inp.below(m.devs.len())].addr,
        _ => PciAddress::from_devfn(0, inp.u8()),
    }
}

fn size(inp: &mut Input, max8: bool) -> usize {
    [1usize, 2, 4, 8, 3][inp.below(if max8 { 5 } else { 3 })]
}

/// What a BAR register reads after all-ones was written to it.
fn sizing_answer(cfg: &pci::ConfigSpace, index: usize) -> u32 {
    for b in cfg.bars() {
        let mask = !(b.size - 1);
        if b.index == index {
            let low = if b.kind.is_memory() {
                mask as u32 & !0xf
            } else {
                mask as u32 & !0x3
            };
            return low | b.kind.type_bits();
        }
        if matches!(b.kind, pci::BarKind::Mem64 { .. }) && b.index + 1 == index {
            return (mask >> 32) as u32;
        }
    }
    0
}

/// One config-space operation (shared by both targets).
fn config_op(m: &PciMachine, inp: &mut Input, alone: bool) {
    match inp.below(8) {
        // CF8 latch (well-formed or raw).
        0 => {
            let v = if inp.bool() {
                any_addr(m, inp).config_address(inp.u8())
            } else {
                inp.u32()
            };
            m.pio.write(0xcf8, &v.to_le_bytes());
        }
        // CFC data port read / write, any lane and size.
        1 | 2 => {
            let port = 0xcf8 + inp.below(8) as u64;
            let n = size(inp, false);
            let mut d = [0u8; 8];
            if inp.bool() {
                m.pio.read(port, &mut d[..n]);
            } else {
                d[..4].copy_from_slice(&inp.u32().to_le_bytes());
                m.pio.write(port, &d[..n]);
            }
        }
        // ECAM read / write, any register, size and alignment.
        3 | 4 => {
            let a = any_addr(m, inp);
            let reg = inp.below(0x1000) as u64;
            let n = size(inp, true);
            let at = ECAM_BASE + a.ecam_offset() + reg;
            let mut d = [0u8; 8];
            if inp.bool() {
                m.mmio.read(at, &mut d[..n]);
            } else {
                d.copy_from_slice(&palette(m, inp).to_le_bytes());
                m.mmio.write(at, &d[..n]);
            }
        }
        // A write that matters (command, BARs, ROM, capability pointer, MSI-X) with a value
        // that hurts, through either mechanism.
        5 | 6 => {
            let i = inp.below(m.devs.len());
            let reg = interesting_reg(m, i, inp);
            let n = [4usize, 2, 1][inp.below(3)];
            let reg = reg & !(n as u16 - 1);
            let v = palette(m, inp);
            let addr = if inp.below(8) == 0 {
                PciAddress::HOST_BRIDGE
            } else {
                m.devs[i].addr
            };
            m.cfg_write(inp.bool(), addr, reg, n, v);
        }
        // Sizing: all-ones to a BAR, read back, restore something.
        _ => {
            let i = inp.below(m.devs.len());
            let reg = 0x10 + 4 * inp.below(7) as u8;
            let old = m.cf8_read(m.devs[i].addr, reg, 4);
            m.cf8_write(m.devs[i].addr, reg, 4, 0xffff_ffff);
            let got = m.ecam_read(m.devs[i].addr, u16::from(reg), 4) as u32;
            if alone && reg < 0x28 {
                let want = sizing_answer(m.devs[i].dev.config(), usize::from(reg - 0x10) / 4);
                assert_eq!(
                    got, want,
                    "{}: BAR register {reg:#x} answered {got:#x} to sizing, expected {want:#x}",
                    m.devs[i].addr
                );
            }
            let v = if inp.bool() { old } else { palette(m, inp) };
            m.cf8_write(m.devs[i].addr, reg, 4, v);
        }
    }
}

/// Target: sequences of config accesses through CF8/CFC and ECAM.
pub fn target_config_space(data: &[u8]) {
    let m = PciMachine::new();
    let mut inp = Input::new(data);
    let mut ops = 0;
    while !inp.is_empty() && ops < 256 {
        config_op(&m, &mut inp, true);
        ops += 1;
    }
    m.check();
}

/// Offsets worth touching in BAR 1 (MSI-X) and BAR 4 (virtio regions).
fn bar_offset(inp: &mut Input, bar: usize) -> u64 {
    if bar == MSIX_BAR {
        match inp.below(4) {
            0 => inp.below(8) as u64 * 16 + inp.below(16) as u64,
            1 => MSIX_PBA_OFFSET + inp.below(16) as u64,
            2 => inp.below(0x1000) as u64,
            _ => inp.u16() as u64,
        }
    } else {
        match inp.below(8) {
            0..=2 => inp.below(0x38) as u64,
            3 => 0x1000 + inp.below(8) as u64,
            4 => 0x2000 + inp.below(16) as u64,
            5 => 0x3000 + inp.below(16) as u64,
            6 => inp.below(0x4000) as u64,
            _ => inp.u32() as u64,
        }
    }
}

/// A driver bringing a queue up: status, features, queue registers (rings somewhere in RAM or
/// not), DRIVER_OK, a notify. The ring memory gets fuzz bytes.
fn driver_bringup(m: &PciMachine, i: usize, inp: &mut Input) {
    let base = m.bar(i, VIRTIO_BAR);
    if base == 0 {
        return;
    }
    let w = |off: u64, n: usize, v: u64| {
        m.mmio.write(base + off, &v.to_le_bytes()[..n]);
    };
    w(0x14, 1, 0);
    w(0x14, 1, 1);
    w(0x14, 1, 3);
    w(0x08, 4, 1);
    w(0x0c, 4, 1); // VIRTIO_F_VERSION_1 (bit 32)
    w(0x08, 4, 0);
    w(0x0c, 4, u64::from(inp.u32()));
    w(0x14, 1, 0xb);
    w(0x16, 2, u64::from(inp.below(2) as u16));
    w(0x18, 2, u64::from(inp.pick(&[16u16, 256, 0, 3, 512])));
    w(0x1a, 2, u64::from(inp.pick(&[0u16, 1, 0xffff, 7])));
    let ring = |inp: &mut Input| -> u64 {
        match inp.below(4) {
            0 => MEM_SIZE - 0x100,
            1 => inp.u64(),
            _ => 0x1_0000 + (inp.below(0x40) as u64) * 0x1000,
        }
    };
    let (desc, drv, dev) = (ring(inp), ring(inp), ring(inp));
    w(0x20, 8, desc);
    w(0x28, 8, drv);
    w(0x30, 8, dev);
    // Ring contents: fuzz bytes at the descriptor table and avail ring.
    let bytes = inp.bytes(128);
    let _ = m.mem.write_slice(bytes, GuestAddress(desc));
    let bytes = inp.bytes(32);
    let _ = m.mem.write_slice(bytes, GuestAddress(drv));
    w(0x1c, 2, 1);
    w(
        0x14,
        1,
        if inp.below(4) == 0 {
            u64::from(inp.u8())
        } else {
            0xf
        },
    );
    w(0x3000, 2, 0);
}

/// Target: BAR moves and decode toggles, then MMIO accesses to MSI-X tables and virtio
/// regions (a firmware-like set-up first, so most inputs reach the BARs).
pub fn target_bar_mmio(data: &[u8]) {
    let m = PciMachine::new();
    m.firmware_setup();
    let mut inp = Input::new(data);
    let mut ops = 0;
    while !inp.is_empty() && ops < 256 {
        ops += 1;
        bar_mmio_op(&m, &mut inp, true);
    }
    m.check();
    m.quiesce();
}

impl PciMachine {
    /// Resets every virtio function whose common config is reachable (its worker stops and
    /// is joined; a panic there is caught by the panic counter).
    pub fn quiesce(&self) {
        for d in &self.devs {
            if let Some(base) = d.dev.config().bar_address(VIRTIO_BAR).filter(|&b| b != 0) {
                if d.dev.config().mem_enabled() {
                    self.mmio.write(base + 0x14, &[0]);
                }
            }
        }
    }
}

/// One operation of the BAR/MMIO target: a config access, a driver bring-up or an access in a
/// BAR. `alone`: no other thread uses the machine (the sizing check is only valid then).
/// Public for the concurrency stress test.
pub fn bar_mmio_op(m: &PciMachine, inp: &mut Input, alone: bool) {
    match inp.below(10) {
        0..=2 => config_op(m, inp, alone),
        3 => {
            let i = inp.below(m.devs.len());
            driver_bringup(m, i, inp);
        }
        _ => {
            let i = inp.below(m.devs.len());
            let bar = inp.pick(&[MSIX_BAR, VIRTIO_BAR]);
            let at = m.bar(i, bar).wrapping_add(bar_offset(inp, bar));
            let n = size(inp, true);
            let mut d = [0u8; 8];
            if inp.bool() {
                m.mmio.read(at, &mut d[..n]);
            } else {
                d.copy_from_slice(&palette(m, inp).to_le_bytes());
                m.mmio.write(at, &d[..n]);
            }
        }
    }
}
