//! The KVM VM: guest memory, the in-kernel irqchip and PIT, GSI routing for MSI, irqfds.

use std::sync::Mutex;

use devices::virtio::pci::VirtioHost;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
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
    intx: std::sync::OnceLock<std::sync::Arc<Resampler>>,
    /// Where virtio activations and resets run (never on a vCPU thread).
    work: devices::virtio::DeviceWork,
}

/// Re-raises level-triggered INTx lines: KVM lowers an irqfd-with-resample line at the guest's
/// EOI and signals the resample eventfd; this thread then asks the device whether it is still
/// pending. Never on a vCPU thread; a thread of its own, started with the first INTx line,
/// under the device workers' seccomp filter.
struct Resampler {
    epoll: vmm_sys_util::epoll::Epoll,
    lines: Mutex<Vec<IntxLine>>,
    /// Ends the thread (the VM is gone: a reboot builds a new one with its own resampler).
    quit: EventFd,
}

/// The epoll token of [`Resampler::quit`] (line tokens are indices).
const RESAMPLER_QUIT: u64 = u64::MAX;

struct IntxLine {
    resample: EventFd,
    trigger: EventFd,
    still_pending: Box<dyn Fn() -> bool + Send + Sync>,
}

impl Resampler {
    fn start() -> std::io::Result<std::sync::Arc<Resampler>> {
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        let r = std::sync::Arc::new(Resampler {
            epoll: vmm_sys_util::epoll::Epoll::new()?,
            lines: Mutex::new(Vec::new()),
            quit: EventFd::new(0)?,
        });
        r.epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&r.quit),
            EpollEvent::new(EventSet::IN, RESAMPLER_QUIT),
        )?;
        let me = r.clone();
        let (ready, set_up) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
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
            Ok(Ok(())) => Ok(r),
            Ok(Err(e)) => Err(std::io::Error::other(format!(
                "INTx resampler thread set-up: {e}"
            ))),
            Err(_) => Err(std::io::Error::other("INTx resampler thread ended")),
        }
    }

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
            if events[..n].iter().any(|ev| ev.data() == RESAMPLER_QUIT) {
                return;
            }
            let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            for ev in &events[..n] {
                if let Some(l) = lines.get(ev.data() as usize) {
                    let _ = l.resample.read();
                    if (l.still_pending)() {
                        let _ = l.trigger.write(1);
                    }
                }
            }
        }
    }
}

/// Without this the resampler thread (and its epoll, and every INTx line's eventfds) outlived
/// the VM: one more `intx-resample` thread per reboot in place.
impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(r) = self.intx.get() {
            let _ = r.quit.write(1);
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
    /// Opens /dev/kvm, creates the VM with `mem_size` bytes of RAM, the irqchip and the PIT.
    pub fn new(mem_size: u64) -> Result<Vm, Error> {
        let kvm = Kvm::new().map_err(kvm_err("cannot open /dev/kvm"))?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        let mem =
            GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::MemoryAlloc(e.to_string()))?;
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
            intx: std::sync::OnceLock::new(),
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
    /// Only that entry changes; KVM gets the table only when it did change.
    pub fn set_msi_route(&self, gsi: u32, msg: Option<(u64, u32)>) -> Result<(), Error> {
        let mut r = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        if r.set(gsi, msg) {
            self.publish(&r)?;
        }
        Ok(())
    }

    /// (allocated MSI GSIs, routes in KVM's table): for leak checks and diagnostics.
    pub fn gsi_counts(&self) -> (usize, usize) {
        let r = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        (r.msi.len(), r.entries.len())
    }

    /// KVM_SET_GSI_ROUTING replaces the whole table: hand it the one we keep.
    fn publish(&self, r: &Routing) -> Result<(), Error> {
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
        let gsi = self.allocate_msi_gsi();
        let fd = EventFd::new(0)?;
        self.fd
            .register_irqfd(&fd, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok((gsi, fd))
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
    ) -> std::io::Result<EventFd> {
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        let trigger = EventFd::new(0)?;
        let resample = EventFd::new(0)?;
        self.fd
            .register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if self.intx.get().is_none() {
            let _ = self.intx.set(Resampler::start()?);
        }
        let r = self
            .intx
            .get()
            .ok_or_else(|| std::io::Error::other("INTx resampler not started"))?;
        let mut lines = r.lines.lock().unwrap_or_else(|p| p.into_inner());
        r.epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&resample),
            EpollEvent::new(EventSet::IN, lines.len() as u64),
        )?;
        lines.push(IntxLine {
            resample,
            trigger: trigger.try_clone()?,
            still_pending,
        });
        Ok(trigger)
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
        let vm = Vm::new(16 << 20).expect("a VM on /dev/kvm");
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
}
