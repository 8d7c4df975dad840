//! The KVM VM: guest memory, the in-kernel irqchip and PIT, GSI routing for MSI, irqfds.

use std::sync::Mutex;

use devices::virtio::pci::VirtioHost;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::*;
use crate::{kvm_err, Error};

/// First GSI handed out for MSI vectors (the IO-APIC owns 0..24).
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;

/// A KVM VM with its memory.
pub struct Vm {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// The VM.
    pub fd: VmFd,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    routing: Mutex<Routing>,
    /// The INTx resampler, while any INTx line is registered.
    intx: Mutex<Option<Resampler>>,
    /// Where virtio activations and resets run (never on a vCPU thread).
    work: devices::virtio::DeviceWork,
}

/// Re-raises level-triggered INTx lines: KVM lowers an irqfd-with-resample line at the guest's
/// EOI and signals the resample eventfd; this thread then asks the device whether it is still
/// pending. Never on a vCPU thread; a thread of its own, started with the first INTx line and
/// ended (joined) when the last one is released or the VM goes, under the device workers'
/// seccomp filter.
struct Resampler {
    shared: std::sync::Arc<ResamplerShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct ResamplerShared {
    epoll: vmm_sys_util::epoll::Epoll,
    /// The lines by epoll token, and the next token.
    lines: Mutex<(std::collections::BTreeMap<u64, IntxLine>, u64)>,
    /// Ends the thread.
    stop: EventFd,
}

/// The epoll token of [`ResamplerShared::stop`].
const STOP_TOKEN: u64 = u64::MAX;

struct IntxLine {
    gsi: u32,
    /// The fd number of the trigger eventfd (names the line on release). It cannot be reused
    /// while the line is registered: the line holds the eventfd itself (`trigger`).
    key: std::os::fd::RawFd,
    resample: EventFd,
    /// The device's own trigger (shared, not a duplicate: one descriptor per line).
    trigger: std::sync::Arc<EventFd>,
    still_pending: Box<dyn Fn() -> bool + Send + Sync>,
}

impl Resampler {
    fn start() -> std::io::Result<Resampler> {
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        let shared = std::sync::Arc::new(ResamplerShared {
            epoll: vmm_sys_util::epoll::Epoll::new()?,
            lines: Mutex::new((Default::default(), 0)),
            stop: EventFd::new(0)?,
        });
        shared.epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&shared.stop),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        let me = shared.clone();
        let (ready, set_up) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("intx-resample".into())
            .spawn(move || {
                // It only waits on and signals eventfds: the device workers' seccomp filter.
                let init = devices::virtio::run_thread_init();
                let ok = init.is_ok();
                let _ = ready.send(init);
                if ok {
                    me.run()
                }
            })?;
        // Without its thread no INTx line would ever be raised again: fail the device instead.
        match set_up.recv() {
            Ok(Ok(())) => Ok(Resampler {
                shared,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(std::io::Error::other(format!(
                    "INTx resampler thread set-up: {e}"
                )))
            }
            Err(_) => Err(std::io::Error::other("INTx resampler thread ended")),
        }
    }
}

impl Drop for Resampler {
    /// Ends the thread and waits for it (it holds no lock the dropper may hold).
    fn drop(&mut self) {
        let _ = self.shared.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl ResamplerShared {
    fn run(&self) {
        use vmm_sys_util::epoll::EpollEvent;
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("INTx resampler: epoll_wait failed, stopping: {e}");
                    return;
                }
            };
            let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            for ev in &events[..n] {
                if ev.data() == STOP_TOKEN {
                    return;
                }
                if let Some(l) = lines.0.get(&ev.data()) {
                    let _ = l.resample.read();
                    if (l.still_pending)() {
                        let _ = l.trigger.write(1);
                    }
                }
            }
        }
    }
}

/// An MSI message: (address, data).
type MsiMessage = (u64, u32);

/// The GSI routing table as KVM has it, kept here so that a change touches one entry.
///
/// Invariants: `entries` starts with the fixed irqchip routes (PIC and IO-APIC pins), then
/// holds one MSI entry per routed GSI; `msi` maps every allocated MSI GSI to its entry's index
/// in `entries` and its message (None while unrouted); a released GSI is in `free` and nowhere
/// else.
struct Routing {
    entries: Vec<kvm_irq_routing_entry>,
    msi: std::collections::BTreeMap<u32, Option<(usize, MsiMessage)>>,
    free: Vec<u32>,
    next_gsi: u32,
}

impl Routing {
    fn new() -> Self {
        let mut entries = Vec::new();
        for pin in 0..IOAPIC_PINS {
            if pin < 16 && pin != 2 {
                let (chip, p) = if pin < 8 {
                    (KVM_IRQCHIP_PIC_MASTER, pin)
                } else {
                    (KVM_IRQCHIP_PIC_SLAVE, pin - 8)
                };
                entries.push(irqchip_route(pin, chip, p));
            }
            entries.push(irqchip_route(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        Routing {
            entries,
            msi: Default::default(),
            free: Vec::new(),
            next_gsi: FIRST_MSI_GSI,
        }
    }

    /// Removes the MSI entry at `index`, keeping the index map right.
    fn remove_entry(&mut self, index: usize) {
        self.entries.swap_remove(index);
        if let Some(moved) = self.entries.get(index) {
            if let Some(Some((i, _))) = self.msi.get_mut(&moved.gsi) {
                *i = index;
            }
        }
    }

    /// Sets one GSI's route; returns whether the table changed.
    fn set(&mut self, gsi: u32, msg: Option<(u64, u32)>) -> bool {
        let Some(&slot) = self.msi.get(&gsi) else {
            return false;
        };
        match (slot, msg) {
            (None, None) => false,
            (Some((i, _)), None) => {
                self.msi.insert(gsi, None);
                self.remove_entry(i);
                true
            }
            (slot, Some((address, data))) => {
                let mut e = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi.address_lo = address as u32;
                e.u.msi.address_hi = (address >> 32) as u32;
                e.u.msi.data = data;
                match slot {
                    Some((_, old)) if old == (address, data) => return false,
                    Some((i, _)) => {
                        self.entries[i] = e;
                        self.msi.insert(gsi, Some((i, (address, data))));
                    }
                    None => {
                        self.entries.push(e);
                        let i = self.entries.len() - 1;
                        self.msi.insert(gsi, Some((i, (address, data))));
                    }
                }
                true
            }
        }
    }
}

impl Vm {
    /// Opens /dev/kvm, creates the VM with `mem_size` bytes of RAM backed as `backing` says,
    /// the irqchip and the PIT.
    pub fn new(mem_size: u64, backing: &crate::memory::RamBacking) -> Result<Vm, Error> {
        let kvm = Kvm::new().map_err(kvm_err("cannot open /dev/kvm"))?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // 2 MiB-aligned, huge pages (host side only: the guest sees the same map).
        let (mem, ranges) = crate::memory::guest_ram(&ram_ranges(mem_size), backing)?;
        for r in &ranges {
            tracing::debug!(
                "guest RAM {:#x}+{:#x} at host {:#x}: {:?}",
                r.guest,
                r.size,
                r.host,
                r.thp
            );
        }
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| Error::MemoryAlloc(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the Vm keeps for as long
            // as the VM fd exists; the guest range does not overlap another slot.
            unsafe { fd.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        fd.set_tss_address(KVM_TSS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Vm {
            kvm,
            fd,
            mem,
            routing: Mutex::new(Routing::new()),
            intx: Mutex::new(None),
            work: devices::virtio::DeviceWork::start()
                .map_err(|e| Error::Config(format!("device-work thread: {e}")))?,
        })
    }

    /// Reserves a GSI for an MSI vector (routed nowhere until [`Vm::set_msi_route`]).
    pub fn allocate_msi_gsi(&self) -> u32 {
        let mut r = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        let gsi = match r.free.pop() {
            Some(g) => g,
            None => {
                r.next_gsi += 1;
                r.next_gsi - 1
            }
        };
        r.msi.insert(gsi, None);
        gsi
    }

    /// Gives back an MSI GSI: its route goes, and it may be handed out again.
    pub fn release_msi_gsi(&self, gsi: u32) -> Result<(), Error> {
        let mut r = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        let changed = r.set(gsi, None);
        if r.msi.remove(&gsi).is_some() {
            r.free.push(gsi);
        }
        if changed {
            self.publish(&r)?;
        }
        Ok(())
    }

    /// Routes `gsi` to the MSI message (`address`, `data`), or removes its route with `None`.
    /// Only that entry changes; KVM gets the table only when it did change. When KVM does not
    /// take the new table (more than `KVM_MAX_IRQ_ROUTES` routes: about 2,000 functions with
    /// two vectors each), the entry goes back to what it was, so this table stays KVM's and the
    /// other routes keep working (before, every later change failed too, releases included).
    pub fn set_msi_route(&self, gsi: u32, msg: Option<(u64, u32)>) -> Result<(), Error> {
        let mut r = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        let old = r.msi.get(&gsi).copied().flatten().map(|(_, m)| m);
        if r.set(gsi, msg) {
            if let Err(e) = self.publish(&r) {
                r.set(gsi, old);
                return Err(e);
            }
        }
        Ok(())
    }

    /// (allocated MSI GSIs, routes in KVM's table): for leak checks and diagnostics.
    pub fn gsi_counts(&self) -> (usize, usize) {
        let r = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        (r.msi.len(), r.entries.len())
    }

    /// The allocated MSI GSIs in order, each with whether it is routed, and the number of
    /// entries in KVM's routing table (HMP `info gsi`).
    pub fn msi_gsis(&self) -> (Vec<(u32, bool)>, usize) {
        let r = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        let msi = r.msi.iter().map(|(g, e)| (*g, e.is_some())).collect();
        (msi, r.entries.len())
    }

    /// The INTx lines registered ([`VirtioHost::register_intx`] and not released).
    pub fn intx_lines(&self) -> usize {
        self.intx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |r| {
                r.shared
                    .lines
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .0
                    .len()
            })
    }

    /// KVM_SET_GSI_ROUTING replaces the whole table: hand it the one we keep.
    fn publish(&self, r: &Routing) -> Result<(), Error> {
        if r.entries.len() > KVM_MAX_IRQ_ROUTES {
            return Err(Error::Config(format!(
                "GSI routing table full: KVM takes at most {KVM_MAX_IRQ_ROUTES} routes \
                 (interrupt controller pins and MSI vectors)"
            )));
        }
        let table = KvmIrqRouting::from_entries(&r.entries)
            .map_err(|e| Error::MemoryAlloc(format!("GSI routing table: {e:?}")))?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(kvm_err("KVM_SET_GSI_ROUTING"))
    }
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

/// KVM-backed host services for virtio-pci: ioeventfds, MSI GSIs with irqfds, MSI routes.
impl VirtioHost for Vm {
    fn register_ioevent(&self, event: &EventFd, addr: u64) -> std::io::Result<()> {
        self.fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister_ioevent(&self, event: &EventFd, addr: u64) -> std::io::Result<()> {
        self.fd
            .unregister_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn allocate_msi(&self) -> std::io::Result<(u32, EventFd)> {
        let fd = EventFd::new(0)?;
        let gsi = self.allocate_msi_gsi();
        if let Err(e) = self.fd.register_irqfd(&fd, gsi) {
            let _ = self.release_msi_gsi(gsi);
            return Err(std::io::Error::from_raw_os_error(e.errno()));
        }
        Ok((gsi, fd))
    }

    /// Detaches the irqfd (KVM_IRQFD deassign), then removes the route and frees the GSI.
    fn release_msi(&self, gsi: u32, event: &EventFd) -> std::io::Result<()> {
        let detached = self
            .fd
            .unregister_irqfd(event, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
        self.release_msi_gsi(gsi).map_err(std::io::Error::other)?;
        detached
    }

    fn set_msi_route(&self, gsi: u32, msg: Option<(u64, u32)>) -> std::io::Result<()> {
        Vm::set_msi_route(self, gsi, msg).map_err(std::io::Error::other)
    }

    fn device_work(&self) -> devices::virtio::DeviceWork {
        self.work.clone()
    }

    fn register_intx(
        &self,
        gsi: u32,
        still_pending: Box<dyn Fn() -> bool + Send + Sync>,
    ) -> std::io::Result<std::sync::Arc<EventFd>> {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        let trigger = std::sync::Arc::new(EventFd::new(0)?);
        let resample = EventFd::new(0)?;
        let line = IntxLine {
            gsi,
            key: trigger.as_raw_fd(),
            trigger: trigger.clone(),
            resample,
            still_pending,
        };
        self.fd
            .register_irqfd_with_resample(&trigger, &line.resample, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let mut slot = self.intx.lock().unwrap_or_else(|p| p.into_inner());
        let added = (|| {
            if slot.is_none() {
                *slot = Some(Resampler::start()?);
            }
            let r = slot
                .as_ref()
                .ok_or_else(|| std::io::Error::other("INTx resampler not started"))?;
            let mut lines = r.shared.lines.lock().unwrap_or_else(|p| p.into_inner());
            let token = lines.1;
            r.shared.epoll.ctl(
                ControlOperation::Add,
                line.resample.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )?;
            lines.1 += 1;
            lines.0.insert(token, line);
            Ok(())
        })();
        if let Err(e) = added {
            let _ = self.fd.unregister_irqfd(&trigger, gsi);
            return Err(e);
        }
        Ok(trigger)
    }

    /// Detaches the irqfd (KVM_IRQFD deassign), takes the line off the resampler (its epoll
    /// entry, eventfds and `still_pending` go) and ends the resampler thread with the last line.
    fn release_intx(&self, gsi: u32, trigger: &EventFd) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent};
        let detached = self
            .fd
            .unregister_irqfd(trigger, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
        let mut slot = self.intx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = slot.as_ref() else {
            return detached;
        };
        let mut lines = r.shared.lines.lock().unwrap_or_else(|p| p.into_inner());
        let key = trigger.as_raw_fd();
        let token = lines
            .0
            .iter()
            .find(|(_, l)| l.gsi == gsi && l.key == key)
            .map(|(t, _)| *t);
        // Unwatched before its eventfds close, under the lock the thread serves lines under.
        let unwatched = match token.and_then(|t| lines.0.remove(&t)) {
            Some(l) => r.shared.epoll.ctl(
                ControlOperation::Delete,
                l.resample.as_raw_fd(),
                EpollEvent::default(),
            ),
            None => Ok(()),
        };
        let last = lines.0.is_empty();
        drop(lines);
        if last {
            // Joins the thread (dropped outside the lock, which it never takes).
            let r = slot.take();
            drop(slot);
            drop(r);
        }
        detached.and(unwatched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The INTx resampler thread runs the device threads' set-up (the seccomp filter in the
    /// VMM) before it serves anything.
    #[test]
    fn the_resampler_thread_runs_the_device_thread_set_up() {
        static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
        devices::virtio::set_thread_init(|| {
            let name = std::thread::current().name().unwrap_or("").to_string();
            SEEN.lock().unwrap().push(name);
            Ok(())
        });
        let vm = Vm::new(16 << 20, &Default::default()).expect("a VM on /dev/kvm");
        let _line = vm
            .register_intx(20, Box::new(|| false))
            .expect("an INTx line");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !SEEN.lock().unwrap().iter().any(|n| n == "intx-resample") {
            assert!(
                std::time::Instant::now() < deadline,
                "not run: {:?}",
                SEEN.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// MSI vectors and INTx lines given back leave the GSI counts where they were, their GSIs
    /// are handed out again, and the resampler thread ends with the last INTx line.
    #[test]
    fn released_msi_vectors_and_intx_lines_leave_nothing_behind() {
        let vm = Vm::new(16 << 20, &Default::default()).expect("a VM on /dev/kvm");
        let before = vm.gsi_counts();
        let (g1, f1) = vm.allocate_msi().unwrap();
        let (g2, f2) = vm.allocate_msi().unwrap();
        Vm::set_msi_route(&vm, g1, Some((0xfee0_0000, 0x31))).unwrap();
        assert_eq!(vm.gsi_counts(), (before.0 + 2, before.1 + 1));
        let t1 = vm.register_intx(20, Box::new(|| false)).unwrap();
        let t2 = vm.register_intx(21, Box::new(|| false)).unwrap();
        let lines = |vm: &Vm| {
            vm.intx
                .lock()
                .unwrap()
                .as_ref()
                .map(|r| r.shared.lines.lock().unwrap().0.len())
        };
        assert_eq!(lines(&vm), Some(2));

        vm.release_msi(g1, &f1).unwrap();
        vm.release_msi(g2, &f2).unwrap();
        assert_eq!(vm.gsi_counts(), before);
        vm.release_intx(20, &t1).unwrap();
        assert_eq!(lines(&vm), Some(1));
        vm.release_intx(21, &t2).unwrap();
        assert_eq!(lines(&vm), None, "the resampler ended with its last line");
        // Given back twice (KVM ignores the second deassign): nothing changes, and the GSI
        // is not free twice.
        let _ = vm.release_intx(21, &t2);
        let _ = vm.release_msi(g2, &f2);
        assert_eq!(vm.gsi_counts(), before);
        assert_eq!(lines(&vm), None);

        let (g3, _f3) = vm.allocate_msi().unwrap();
        let (g4, _f4) = vm.allocate_msi().unwrap();
        let (g5, _f5) = vm.allocate_msi().unwrap();
        let mut reused = [g3, g4];
        reused.sort();
        assert_eq!(reused, [g1, g2], "released GSIs are handed out again");
        assert!(g5 > g1.max(g2), "each once: {g5}");
        let _t3 = vm.register_intx(20, Box::new(|| false)).unwrap();
        assert_eq!(lines(&vm), Some(1), "a new resampler for a new line");
    }

    /// KVM takes at most `KVM_MAX_IRQ_ROUTES` routes (4096 here: the 39 irqchip pins and 4057
    /// MSI vectors, about 2,000 virtio functions with two vectors each, which
    /// resources/bench/scale.sh reaches with the probe's `msix=1`). The route that does not
    /// fit is refused with a clear error and leaves the table as KVM has it: the routes
    /// already there can still be changed and released, and the refused one fits once another
    /// one is gone. (The table used to keep the refused entry, and every later change failed.)
    #[test]
    fn a_full_gsi_routing_table_refuses_one_route_and_keeps_working() {
        let vm = Vm::new(16 << 20, &Default::default()).expect("a VM on /dev/kvm");
        let fixed = vm.gsi_counts().1;
        let msg = |g: u32| Some((0xfee0_0000u64, 0x40 + (g & 0x7f)));
        let gsis: Vec<u32> = (0..=KVM_MAX_IRQ_ROUTES - fixed)
            .map(|_| vm.allocate_msi_gsi())
            .collect();
        let (last, fit) = gsis.split_last().unwrap();
        for &g in fit {
            Vm::set_msi_route(&vm, g, msg(g)).unwrap_or_else(|e| panic!("GSI {g}: {e}"));
        }
        assert_eq!(vm.gsi_counts().1, KVM_MAX_IRQ_ROUTES);
        let err = Vm::set_msi_route(&vm, *last, msg(*last)).unwrap_err();
        assert!(
            err.to_string()
                .contains("GSI routing table full: KVM takes at most 4096 routes"),
            "{err}"
        );
        assert_eq!(
            vm.gsi_counts().1,
            KVM_MAX_IRQ_ROUTES,
            "the refused route stays out"
        );
        // The routes there still change and go (each a KVM_SET_GSI_ROUTING of its own).
        Vm::set_msi_route(&vm, fit[0], Some((0xfee0_1000, 0x99))).unwrap();
        vm.release_msi_gsi(fit[1]).unwrap();
        Vm::set_msi_route(&vm, *last, msg(*last)).unwrap();
        assert_eq!(vm.gsi_counts().1, KVM_MAX_IRQ_ROUTES);
    }
}
