//! The modern (virtio 1.x, non-transitional) virtio-pci transport.
//!
//! Guest-visible layout, modelled on QEMU's so lspci output looks familiar:
//! - vendor 0x1af4, device 0x1040 + type, revision 1, subsystem 1af4:1100;
//! - BAR1: 4 KiB 32-bit memory: MSI-X table at 0, PBA at 0x800;
//! - BAR4: 16 KiB 64-bit prefetchable memory: common config at 0x0, ISR at 0x1000, device
//!   config at 0x2000, notifications at 0x3000 (4 bytes per queue);
//! - capabilities: common, ISR, device (when the device has config), notify, pci-cfg, MSI-X.
//!
//! Concurrency: config-space reads are lock-free ([`ConfigSpace`]); MSI-X table accesses are
//! lock-free ([`MsixTable`]); the common config registers (driver set-up only) sit behind one
//! narrow lock; the ISR and the queue -> MSI-X vector map are atomics, so signalling a queue
//! takes no lock. Queue notifications normally never reach this code: they are KVM
//! ioeventfds, re-registered whenever the guest moves BAR4 or toggles memory decode.
//!
//! Lifecycle: a status write that activates (`DRIVER_OK`) or resets (0) the device only records
//! the request and posts the function to the machine's [`DeviceWork`] executor; the worker
//! thread is started or joined there, never on the vCPU thread that made the write. Until a
//! reset has been carried out, reads of `device_status` return the status from before it (a
//! driver polls for 0, virtio 1.x 4.1.4.3.2). A notification that arrives before the worker
//! runs stays counted in the queue's eventfd and is served when the worker starts.
//!
//! Removal: [`VirtioPciDevice::release`] (the device manager's, on the monitor's or the main
//! thread) gives back the queue ioeventfds, the vectors' GSIs and irqfds and the INTx line, and
//! has the executor reset the device and close its backend, before it returns.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use pci::config::{BarKind, ConfigSpace, ConfigSpaceBuilder, WriteEffect};
use pci::{Delivery, MsixTable, PciFunction};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::work::{DeviceJob, DeviceWork};
use super::{
    status, ActivateError, Activation, ActiveQueue, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

/// Red Hat / virtio vendor ID.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// Subsystem device ID QEMU uses for modern virtio devices.
pub const VIRTIO_PCI_SUBSYSTEM: u16 = 0x1100;
/// BAR of the MSI-X table and PBA.
pub const MSIX_BAR: usize = 1;
/// Size of [`MSIX_BAR`].
pub const MSIX_BAR_SIZE: u64 = 0x1000;
/// PBA offset in [`MSIX_BAR`].
pub const MSIX_PBA_OFFSET: u64 = 0x800;
/// BAR of the virtio structures.
pub const VIRTIO_BAR: usize = 4;
/// Size of [`VIRTIO_BAR`].
pub const VIRTIO_BAR_SIZE: u64 = 0x4000;
/// Common config offset in [`VIRTIO_BAR`].
pub const COMMON_OFFSET: u64 = 0;
/// ISR offset in [`VIRTIO_BAR`].
pub const ISR_OFFSET: u64 = 0x1000;
/// Device config offset in [`VIRTIO_BAR`].
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Notification area offset in [`VIRTIO_BAR`].
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// Size of each region in [`VIRTIO_BAR`].
pub const REGION_SIZE: u64 = 0x1000;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;
/// Most MSI-X vectors a function may have here (the table must fit below the PBA).
pub const MAX_VECTORS: u16 = (MSIX_PBA_OFFSET / 16) as u16;

const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

/// Host services the transport needs: ioeventfds for notifications, GSI routes and irqfds
/// for MSI-X vectors. Implemented by the VMM over KVM.
pub trait VirtioHost: Send + Sync {
    /// Makes a guest write to `addr` signal `event` without an exit (KVM ioeventfd).
    fn register_ioevent(&self, event: &EventFd, addr: u64) -> std::io::Result<()>;
    /// Undoes [`VirtioHost::register_ioevent`].
    fn unregister_ioevent(&self, event: &EventFd, addr: u64) -> std::io::Result<()>;
    /// A fresh GSI with an irqfd attached: signalling the eventfd injects the GSI's MSI route.
    fn allocate_msi(&self) -> std::io::Result<(u32, EventFd)>;
    /// Points `gsi` at an MSI message (address, data), or nowhere.
    fn set_msi_route(&self, gsi: u32, msg: Option<(u64, u32)>) -> std::io::Result<()>;
    /// A level-triggered legacy interrupt (INTx) on `gsi`. Returns the eventfd that raises the
    /// line, shared with the host (which raises it again itself: one descriptor for both). The
    /// line drops at the guest's EOI; the host then asks `still_pending` and raises it again if
    /// the device still wants service. Hosts without INTx keep the default (refused).
    fn register_intx(
        &self,
        _gsi: u32,
        _still_pending: Box<dyn Fn() -> bool + Send + Sync>,
    ) -> std::io::Result<Arc<EventFd>> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
    /// Gives back what [`VirtioHost::allocate_msi`] handed out: `event` no longer injects
    /// anything (its irqfd is detached), the route of `gsi` goes and the GSI may be handed out
    /// again. Called once per vector when the function leaves the machine, never on a vCPU.
    fn release_msi(&self, gsi: u32, event: &EventFd) -> std::io::Result<()>;
    /// Gives back an INTx line of [`VirtioHost::register_intx`]: `trigger` (the eventfd it
    /// returned) no longer raises `gsi`, and the host forgets the line (its resample eventfd
    /// and `still_pending`). Called once when the function leaves the machine, never on a vCPU.
    fn release_intx(&self, _gsi: u32, _trigger: &EventFd) -> std::io::Result<()> {
        Ok(())
    }
    /// Where the functions' lifecycle work (activation, reset) runs: the machine's executor
    /// ([`DeviceWork::start`]); [`DeviceWork::inline`] only for hosts without vCPUs (tests, the
    /// fuzzer). Asked once per function, when it is built.
    fn device_work(&self) -> DeviceWork;
}

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The config space could not be built.
    #[error("config space: {0}")]
    Config(#[from] pci::config::ConfigError),
    /// A host resource (eventfd, GSI) could not be had.
    #[error("host resources: {0}{hint}", hint = open_files_hint(.0))]
    Host(#[from] std::io::Error),
    /// A property out of range.
    #[error("{0}")]
    Property(String),
}

/// What to add to an error of the open-files limit: which limit, and why a machine reaches it.
fn open_files_hint(e: &std::io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EMFILE) {
        " (the open-files limit, `ulimit -n`, is too low for this machine: a virtio-rng function \
         takes 5 descriptors, more with more queues, vectors or a backend; the vmm raises the \
         soft limit only as far as the hard one)"
    } else {
        ""
    }
}

/// The ABI-shaping properties of a virtio-pci function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportProps {
    /// Number of MSI-X vectors (0 disables MSI-X entirely).
    pub vectors: u16,
    /// Whether the function sets the multi-function bit.
    pub multifunction: bool,
}

#[derive(Default, Clone, Copy)]
struct QueueRegs {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

struct Common {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    /// Whether the device runs (set by the executor).
    activated: bool,
    /// Posted to the executor, not yet taken: reset the device (first), then activate it with
    /// the queue registers as they are when the executor takes the request.
    want_reset: bool,
    want_activate: bool,
    /// Resets the driver asked for so far (wrapping); [`Shared::reset_done`] says which the
    /// executor has carried out.
    reset_gen: u32,
    /// Posted to the executor: after the reset, the device gives back its backend for good
    /// ([`VirtioDevice::release`]).
    want_release: bool,
    /// What `device_status` reads return while a reset is in progress.
    status_before_reset: u8,
}

/// State shared with the device's worker thread for interrupts.
struct Interrupts {
    config: ConfigSpace,
    msix: MsixTable,
    isr: AtomicU8,
    /// Per MSI-X vector: its GSI and irqfd.
    vectors: Vec<(u32, EventFd)>,
    /// Per queue: its MSI-X vector, fixed at `DRIVER_OK` (read without a lock when a queue is
    /// signalled).
    queue_vectors: Box<[AtomicU16]>,
    config_vector: std::sync::atomic::AtomicU16,
    status: AtomicU8,
    /// The INTx line's GSI and the eventfd that raises it, once connected
    /// ([`VirtioPciDevice::connect_intx`]).
    intx: std::sync::OnceLock<(u32, Arc<EventFd>)>,
}

impl Interrupts {
    fn fire(&self, vector: u16) {
        if !self.config.msix_enabled() {
            self.assert_intx();
            return;
        }
        match self.msix.signal(vector, &self.config) {
            Delivery::Now(_) => {
                if let Some((_, fd)) = self.vectors.get(usize::from(vector)) {
                    let _ = fd.write(1);
                }
            }
            Delivery::Pending | Delivery::Dropped => {}
            Delivery::Intx => self.assert_intx(),
        }
    }

    /// Raises INTx (level) unless the guest disabled it; the ISR says why.
    fn assert_intx(&self) {
        if self.config.intx_disabled() {
            return;
        }
        if let Some((_, t)) = self.intx.get() {
            self.config.set_status_bits(pci::config::STATUS_INTERRUPT);
            let _ = t.write(1);
        }
    }

    /// Whether the INTx line must stay up after an EOI: something is pending in the ISR.
    fn intx_pending(&self) -> bool {
        self.isr.load(Ordering::Acquire) != 0
            && !self.config.intx_disabled()
            && !self.config.msix_enabled()
    }
}

impl VirtioInterrupt for Interrupts {
    fn signal_queue(&self, index: u16) {
        self.isr.fetch_or(1, Ordering::AcqRel);
        let v = self
            .queue_vectors
            .get(usize::from(index))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        self.fire(v);
    }

    fn signal_config(&self) {
        self.isr.fetch_or(2, Ordering::AcqRel);
        self.fire(self.config_vector.load(Ordering::Acquire));
    }

    fn needs_reset(&self) {
        self.status
            .fetch_or(status::DEVICE_NEEDS_RESET, Ordering::AcqRel);
        self.signal_config();
    }
}

/// What the transport shares with the executor ([`DeviceJob`]): everything lifecycle work needs.
struct Shared {
    name: String,
    device: Arc<dyn VirtioDevice>,
    irq: Arc<Interrupts>,
    common: Mutex<Common>,
    queue_events: Vec<EventFd>,
    queue_max: Vec<u16>,
    mem: GuestMemoryMmap,
    /// In the executor's queue (each function is queued at most once).
    queued: AtomicBool,
    /// The last reset (`Common::reset_gen`) the executor carried out.
    reset_done: AtomicU32,
    /// The function left the machine ([`VirtioPciDevice::release`]): it is never activated
    /// again and touches no host resource any more.
    released: AtomicBool,
    /// Threads in [`VirtioPciDevice::update_route`] right now (a vCPU holding a stale
    /// reference may still be in one): the release waits for none before giving back the GSIs.
    route_users: AtomicU32,
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    s: Arc<Shared>,
    host: Arc<dyn VirtioHost>,
    work: DeviceWork,
    /// Base of the notification area whose ioeventfds are registered, if any.
    notify_base: Mutex<Option<u64>>,
    pci_cfg_cap: u8,
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> (Vec<u8>, Vec<u8>) {
    // virtio_pci_cap after the ID/next bytes: cap_len, cfg_type, bar, id, padding[2],
    // offset, length, then `extra`.
    let len = 16 + extra.len();
    let mut body = vec![len as u8, cfg_type, VIRTIO_BAR as u8, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    let writable = vec![0u8; body.len()];
    (body, writable)
}

impl VirtioPciDevice {
    /// Builds the transport for `device`. `name` is the driver name (e.g. `virtio-rng-pci`).
    pub fn new(
        name: &str,
        device: Arc<dyn VirtioDevice>,
        props: TransportProps,
        mem: GuestMemoryMmap,
        host: Arc<dyn VirtioHost>,
    ) -> Result<Self, TransportError> {
        if props.vectors > MAX_VECTORS {
            return Err(TransportError::Property(format!(
                "vectors must be at most {MAX_VECTORS}"
            )));
        }
        let queue_max = device.queue_max_sizes();
        let dtype = device.device_type();
        let mut b =
            ConfigSpaceBuilder::new(VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BASE + dtype as u16);
        let (class, sub) = match dtype {
            super::types::NET => (0x02, 0x00),
            super::types::BLOCK => (0x01, 0x00),
            super::types::CONSOLE => (0x07, 0x80),
            _ => (0x00, 0xff), // "unclassified", as QEMU for virtio-rng
        };
        b.class(class, sub, 0)
            .revision(1)
            .subsystem(VIRTIO_PCI_VENDOR, VIRTIO_PCI_SUBSYSTEM)
            .multifunction(props.multifunction);
        b.interrupt_pin(1)?;
        if props.vectors > 0 {
            b.bar(
                MSIX_BAR,
                BarKind::Mem32 {
                    prefetchable: false,
                },
                MSIX_BAR_SIZE,
            )?;
        }
        b.bar(
            VIRTIO_BAR,
            BarKind::Mem64 { prefetchable: true },
            VIRTIO_BAR_SIZE,
        )?;
        let caps = [
            (CFG_COMMON, COMMON_OFFSET, REGION_SIZE, vec![]),
            (CFG_ISR, ISR_OFFSET, REGION_SIZE, vec![]),
        ];
        for (t, off, len, extra) in caps {
            let (body, w) = vendor_cap(t, off, len, &extra);
            b.capability(CAP_VENDOR, &body, &w)?;
        }
        if device.config_size() > 0 {
            let (body, w) = vendor_cap(CFG_DEVICE, DEVICE_CFG_OFFSET, REGION_SIZE, &[]);
            b.capability(CAP_VENDOR, &body, &w)?;
        }
        let (body, w) = vendor_cap(
            CFG_NOTIFY,
            NOTIFY_OFFSET,
            REGION_SIZE,
            &NOTIFY_MULTIPLIER.to_le_bytes(),
        );
        b.capability(CAP_VENDOR, &body, &w)?;
        // pci-cfg: the window's bar, offset, length and data are driver-writable.
        let (mut body, _) = vendor_cap(CFG_PCI, 0, 0, &[0; 4]);
        body[2] = 0;
        let mut w = vec![0u8; body.len()];
        w[2] = 0xff; // bar
        for x in &mut w[6..18] {
            *x = 0xff; // offset, length, data
        }
        let pci_cfg_cap = b.capability(CAP_VENDOR, &body, &w)?;
        if props.vectors > 0 {
            b.msix_capability(
                props.vectors,
                MSIX_BAR as u8,
                0,
                MSIX_BAR as u8,
                MSIX_PBA_OFFSET as u32,
            )?;
        }
        let config = b.build()?;
        let queue_events = queue_max
            .iter()
            .map(|_| EventFd::new(0))
            .collect::<Result<Vec<_>, _>>()?;
        // Last, as nothing after it fails: a vector that cannot be had gives the others back.
        let mut vectors = Vec::with_capacity(usize::from(props.vectors));
        for _ in 0..props.vectors {
            match host.allocate_msi() {
                Ok(v) => vectors.push(v),
                Err(e) => {
                    for (gsi, fd) in &vectors {
                        let _ = host.release_msi(*gsi, fd);
                    }
                    return Err(e.into());
                }
            }
        }
        let irq = Arc::new(Interrupts {
            config,
            msix: MsixTable::new(props.vectors),
            isr: AtomicU8::new(0),
            vectors,
            queue_vectors: queue_max
                .iter()
                .map(|_| AtomicU16::new(NO_VECTOR))
                .collect(),
            config_vector: NO_VECTOR.into(),
            status: AtomicU8::new(0),
            intx: std::sync::OnceLock::new(),
        });
        let queues = queue_max
            .iter()
            .map(|&m| QueueRegs {
                size: m,
                vector: NO_VECTOR,
                ..Default::default()
            })
            .collect();
        let work = host.device_work();
        Ok(VirtioPciDevice {
            s: Arc::new(Shared {
                name: name.to_string(),
                device,
                irq,
                common: Mutex::new(Common {
                    device_feature_select: 0,
                    driver_feature_select: 0,
                    driver_features: 0,
                    status: 0,
                    queue_select: 0,
                    queues,
                    activated: false,
                    want_reset: false,
                    want_activate: false,
                    reset_gen: 0,
                    want_release: false,
                    status_before_reset: 0,
                }),
                queue_events,
                queue_max,
                mem,
                queued: AtomicBool::new(false),
                reset_done: AtomicU32::new(0),
                released: AtomicBool::new(false),
                route_users: AtomicU32::new(0),
            }),
            host,
            work,
            notify_base: Mutex::new(None),
            pci_cfg_cap,
        })
    }

    /// Wires the function's INTx pin to `gsi` (level-triggered, with re-assertion after EOI
    /// while the ISR is non-zero). Without it interrupts need MSI-X. A host without INTx
    /// ([`std::io::ErrorKind::Unsupported`], the trait's default) leaves the pin unwired; any
    /// other refusal (out of descriptors) is an error: the guest would see a pin that never
    /// raises anything.
    pub fn connect_intx(&self, gsi: u32) -> Result<(), TransportError> {
        let weak = Arc::downgrade(&self.s.irq);
        let pending = Box::new(move || weak.upgrade().is_some_and(|i| i.intx_pending()));
        if self.s.irq.intx.get().is_some() || self.s.released.load(Ordering::Acquire) {
            return Ok(()); // one line per function, and none once released
        }
        match self.host.register_intx(gsi, pending) {
            Ok(trigger) => {
                if let Err((gsi, trigger)) = self.s.irq.intx.set((gsi, trigger)) {
                    let _ = self.host.release_intx(gsi, &trigger);
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                tracing::warn!("{}: no INTx on GSI {gsi}: {e}", self.s.name);
                Ok(())
            }
            Err(e) => Err(TransportError::Host(e)),
        }
    }

    /// The ABI-shaping properties of this function as realized: MSI-X vectors, queue count,
    /// queue sizes and offered feature bits (recorded in compat fingerprints).
    pub fn abi_props(&self) -> std::collections::BTreeMap<String, String> {
        let mut m = std::collections::BTreeMap::new();
        m.insert("vectors".into(), self.s.irq.vectors.len().to_string());
        m.insert("queues".into(), self.s.queue_max.len().to_string());
        let sizes: Vec<String> = self.s.queue_max.iter().map(|s| s.to_string()).collect();
        m.insert("queue_sizes".into(), sizes.join(","));
        m.insert(
            "features".into(),
            format!("{:#x}", self.s.device.features()),
        );
        m
    }

    /// Registers or moves the queue ioeventfds to where BAR4 decodes on the bus now (`None`:
    /// nowhere). Only called with what the BAR mapper actually mapped, so a notify area can
    /// never cover another device's range. All or nothing: if one registration fails the others
    /// are undone, and notifications go through [`PciFunction::bar_write`] instead.
    fn sync_notify(&self, bar_base: Option<u64>) {
        let mut cur = self.notify_base.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock that [`VirtioPciDevice::release`] takes after setting it: a
        // released function registers nothing again.
        let want = bar_base
            .filter(|_| !self.s.released.load(Ordering::Acquire))
            .map(|a| a + NOTIFY_OFFSET);
        if *cur == want {
            return;
        }
        let addr = |base: u64, i: usize| base + i as u64 * u64::from(NOTIFY_MULTIPLIER);
        if let Some(old) = cur.take() {
            for (i, e) in self.s.queue_events.iter().enumerate() {
                let _ = self.host.unregister_ioevent(e, addr(old, i));
            }
        }
        if let Some(base) = want {
            for (i, e) in self.s.queue_events.iter().enumerate() {
                if let Err(err) = self.host.register_ioevent(e, addr(base, i)) {
                    tracing::warn!("{}: ioeventfd at {:#x}: {err}", self.s.name, addr(base, i));
                    for (j, e) in self.s.queue_events.iter().enumerate().take(i) {
                        let _ = self.host.unregister_ioevent(e, addr(base, j));
                    }
                    return;
                }
            }
            *cur = Some(base);
        }
    }

    /// Status 0: clears the driver-visible registers now and posts the device reset (the
    /// worker is stopped and joined on the executor). `device_status` reads return the old
    /// status until the executor has done it.
    fn request_reset(&self, c: &mut Common) {
        // With a reset still in progress, reads go on returning what they returned before it.
        if self.s.reset_done.load(Ordering::Acquire) == c.reset_gen {
            c.status_before_reset = c.status | self.s.irq.status.load(Ordering::Acquire);
        }
        c.reset_gen = c.reset_gen.wrapping_add(1);
        c.want_reset = true;
        c.want_activate = false;
        c.status = 0;
        c.driver_features = 0;
        c.device_feature_select = 0;
        c.driver_feature_select = 0;
        c.queue_select = 0;
        for (q, &m) in c.queues.iter_mut().zip(&self.s.queue_max) {
            *q = QueueRegs {
                size: m,
                vector: NO_VECTOR,
                ..Default::default()
            };
        }
        self.s.irq.config_vector.store(NO_VECTOR, Ordering::Release);
    }

    /// `DRIVER_OK`: fixes the queues' MSI-X vectors and posts the activation.
    fn request_activation(&self, c: &mut Common) {
        for (v, q) in self.s.irq.queue_vectors.iter().zip(&c.queues) {
            v.store(q.vector, Ordering::Release);
        }
        c.want_activate = true;
    }

    /// Hands the function to the executor unless it is queued already. Called without the
    /// common config lock (an inline executor runs the job at once, and the job takes it).
    fn post(&self) {
        if !self.s.queued.swap(true, Ordering::AcqRel) {
            self.work.post(self.s.clone());
        }
    }

    /// Waits until the lifecycle work posted so far has been carried out (tests; inline
    /// executors have nothing to wait for).
    pub fn flush_lifecycle(&self) {
        self.work.flush();
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let c = self.s.common.lock().unwrap_or_else(|p| p.into_inner());
        let q = c.queues.get(usize::from(c.queue_select));
        let status = if self.s.reset_done.load(Ordering::Acquire) != c.reset_gen {
            c.status_before_reset // the reset is still being carried out
        } else {
            c.status | self.s.irq.status.load(Ordering::Acquire)
        };
        let features = self.s.device.features();
        let v: u64 = match offset {
            0x00 => u64::from(c.device_feature_select),
            0x04 => match c.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            0x08 => u64::from(c.driver_feature_select),
            0x0c => match c.driver_feature_select {
                0 => c.driver_features & 0xffff_ffff,
                1 => c.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.s.irq.config_vector.load(Ordering::Acquire)),
            0x12 => c.queues.len() as u64,
            0x14 => u64::from(status),
            0x15 => 0, // config generation
            0x16 => u64::from(c.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.enabled)),
            0x1e => u64::from(c.queue_select), // notify offset = queue index
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.driver),
            0x2c => q.map_or(0, |q| q.driver >> 32),
            0x30 => q.map_or(0, |q| q.device),
            0x34 => q.map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = (v >> (8 * i)) as u8;
        }
    }

    fn common_write(&self, offset: u64, data: &[u8]) {
        let v = data
            .iter()
            .enumerate()
            .fold(0u64, |a, (i, b)| a | (u64::from(*b) << (8 * i)));
        let mut c = self.s.common.lock().unwrap_or_else(|p| p.into_inner());
        let features = self.s.device.features();
        let sel = usize::from(c.queue_select);
        // Queue registers may only change before the driver is done (virtio 1.x, 4.1.4.3).
        let setup = c.status & status::DRIVER_OK == 0;
        let vectors = self.s.irq.vectors.len() as u64;
        let vector = |v: u64| {
            if v < vectors {
                v as u16
            } else {
                NO_VECTOR
            }
        };
        match offset {
            0x00 => c.device_feature_select = v as u32,
            0x08 => c.driver_feature_select = v as u32,
            0x0c => {
                let shift = match c.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                c.driver_features = (c.driver_features & !mask) | ((v << shift) & mask & features);
            }
            0x10 => self.s.irq.config_vector.store(vector(v), Ordering::Release),
            0x14 => {
                let new = v as u8;
                if new == 0 {
                    self.request_reset(&mut c);
                    drop(c);
                    self.post();
                    return;
                }
                let mut new = new;
                if new & status::FEATURES_OK != 0
                    && c.status & status::FEATURES_OK == 0
                    && c.driver_features & VIRTIO_F_VERSION_1 == 0
                {
                    new &= !status::FEATURES_OK; // a legacy driver: refuse, as the spec says
                }
                let was_ok = c.status & status::DRIVER_OK != 0;
                c.status = new;
                if new & status::DRIVER_OK != 0 && !was_ok {
                    self.request_activation(&mut c);
                    drop(c);
                    self.post();
                }
            }
            0x16 => c.queue_select = v as u16,
            _ if !setup => {}
            0x18 => {
                if let (Some(q), Some(&max)) = (c.queues.get_mut(sel), self.s.queue_max.get(sel)) {
                    let n = v as u16;
                    if n.is_power_of_two() && n <= max {
                        q.size = n;
                    }
                }
            }
            0x1a => {
                if let Some(q) = c.queues.get_mut(sel) {
                    q.vector = vector(v);
                }
            }
            0x1c => {
                if let Some(q) = c.queues.get_mut(sel) {
                    q.enabled = v & 1 == 1;
                }
            }
            0x20..=0x37 => {
                if let Some(q) = c.queues.get_mut(sel) {
                    let field = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.driver,
                        _ => &mut q.device,
                    };
                    let shift = (offset & 7) * 8;
                    let mask = if data.len() >= 8 {
                        u64::MAX
                    } else {
                        ((1u64 << (data.len() * 8)) - 1) << shift
                    };
                    *field = (*field & !mask) | ((v << shift) & mask);
                }
            }
            _ => {}
        }
    }

    fn msix_write(&self, offset: u64, data: &[u8]) {
        let msix = &self.s.irq.msix;
        if offset >= MSIX_PBA_OFFSET {
            return; // the PBA is read-only
        }
        if let Some(v) = msix.write_table(offset, data) {
            self.update_route(v);
        }
    }

    /// Points vector `v`'s GSI at its MSI-X table entry, unless the function was released
    /// (its GSI may belong to another function by now): [`VirtioPciDevice::release`] waits
    /// for calls in progress. No lock: two atomics.
    fn update_route(&self, v: u16) {
        self.s.route_users.fetch_add(1, Ordering::SeqCst);
        if !self.s.released.load(Ordering::SeqCst) {
            self.route_to_entry(v);
        }
        self.s.route_users.fetch_sub(1, Ordering::SeqCst);
    }

    fn route_to_entry(&self, v: u16) {
        let msix = &self.s.irq.msix;
        let (Some(e), Some((gsi, fd))) = (msix.entry(v), self.s.irq.vectors.get(usize::from(v)))
        else {
            return;
        };
        if let Err(err) = self.host.set_msi_route(*gsi, Some((e.address, e.data))) {
            tracing::warn!("{}: MSI route for vector {v}: {err}", self.s.name);
        }
        // MSI-X off: the pending bit stays for when it is enabled (config_written delivers it).
        if self.s.irq.config.msix_enabled()
            && msix.take_pending_if_unmasked(v, self.s.irq.config.msix_function_masked())
        {
            let _ = fd.write(1);
        }
    }

    fn pci_cfg_window(&self) -> (usize, u64, usize) {
        let base = usize::from(self.pci_cfg_cap);
        let cfg = &self.s.irq.config;
        let bar = usize::from(cfg.read_u8(base + 4));
        let offset = u64::from(cfg.read_u32((base + 8) / 4));
        let len = cfg.read_u32((base + 12) / 4) as usize;
        (bar, offset, len)
    }
}

impl PciFunction for VirtioPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.s.irq.config
    }

    fn config_written(&self, effect: &WriteEffect) {
        if let Some(m) = self.s.irq.config.msix() {
            if effect.touches(m.control_offset(), 2) && self.s.irq.config.msix_enabled() {
                for v in 0..self.s.irq.msix.vectors() {
                    self.update_route(v);
                }
            }
        }
        // pci-cfg access window: a write to its data field writes the BAR; moving the window
        // loads the data field with what the BAR holds there.
        let cap = usize::from(self.pci_cfg_cap);
        let (bar, offset, len) = self.pci_cfg_window();
        if !matches!(len, 1 | 2 | 4) {
            return;
        }
        if effect.touches(cap + 16, 4) {
            let mut d = [0u8; 4];
            self.s.irq.config.read(cap + 16, &mut d);
            self.bar_write(bar, offset, &d[..len]);
        } else if effect.touches(cap + 4, 12) {
            let mut d = [0u8; 4];
            self.bar_read(bar, offset, &mut d[..len]);
            self.s.irq.config.set_raw(cap + 16, &d);
        }
    }

    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (bar, offset) {
            (MSIX_BAR, o) if o < MSIX_PBA_OFFSET => self.s.irq.msix.read_table(o, data),
            (MSIX_BAR, o) => self.s.irq.msix.read_pba(o - MSIX_PBA_OFFSET, data),
            (VIRTIO_BAR, o) if o < ISR_OFFSET => self.common_read(o, data),
            (VIRTIO_BAR, o) if o < DEVICE_CFG_OFFSET => {
                // Reading the ISR clears it (and the interrupt status; the INTx line drops
                // at the guest's EOI).
                if let Some(b) = data.first_mut() {
                    *b = self.s.irq.isr.swap(0, Ordering::AcqRel);
                    self.s
                        .irq
                        .config
                        .clear_status_bits(pci::config::STATUS_INTERRUPT);
                }
            }
            (VIRTIO_BAR, o) if o < NOTIFY_OFFSET => {
                self.s.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]) {
        match (bar, offset) {
            (MSIX_BAR, o) => self.msix_write(o, data),
            (VIRTIO_BAR, o) if o < ISR_OFFSET => self.common_write(o, data),
            (VIRTIO_BAR, o) if (DEVICE_CFG_OFFSET..NOTIFY_OFFSET).contains(&o) => {
                self.s.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            (VIRTIO_BAR, o) if o >= NOTIFY_OFFSET => {
                // Only reached when no ioeventfd is registered for this address.
                let q = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                if let Some(e) = self.s.queue_events.get(q as usize) {
                    let _ = e.write(1);
                }
            }
            _ => {}
        }
    }

    fn bar_mapped(&self, bar: usize, base: Option<u64>) {
        if bar == VIRTIO_BAR {
            self.sync_notify(base);
        }
    }

    fn name(&self) -> &str {
        &self.s.name
    }

    fn state_report(&self) -> Option<String> {
        use std::fmt::Write as _;
        use vm_memory::{Bytes, GuestAddress};
        let irq = &self.s.irq;
        let mut out = String::new();
        // Never wait for the common config: a vCPU stuck in a device reset holds it, and this
        // report is for finding such things.
        let common = match self.s.common.try_lock() {
            Ok(c) => Some(c),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        let _ = match &common {
            Some(c) => write!(
                out,
                "  status {:#04x}{}{}, driver features {:#x}",
                c.status | irq.status.load(Ordering::Acquire),
                if c.activated { " (activated)" } else { "" },
                match (
                    self.s.reset_done.load(Ordering::Acquire) != c.reset_gen,
                    c.want_activate
                ) {
                    (true, _) => " (reset pending)",
                    (false, true) => " (activation pending)",
                    (false, false) => "",
                },
                c.driver_features,
            ),
            None => write!(out, "  common config busy (held by a vCPU)"),
        };
        let _ = writeln!(
            out,
            ", isr {:#x}, config vector {}",
            irq.isr.load(Ordering::Acquire),
            irq.config_vector.load(Ordering::Acquire),
        );
        let cfg = &irq.config;
        let _ = write!(
            out,
            "  msi-x {}{}, intx {}:",
            if cfg.msix_enabled() { "on" } else { "off" },
            if cfg.msix_function_masked() {
                " (function masked)"
            } else {
                ""
            },
            if cfg.intx_disabled() {
                "disabled"
            } else {
                "enabled"
            },
        );
        for v in 0..irq.msix.vectors() {
            let _ = write!(
                out,
                " v{v}={}{}",
                if irq.msix.masked(v) {
                    "masked"
                } else {
                    "unmasked"
                },
                if irq.msix.pending(v) { "+pending" } else { "" }
            );
        }
        out.push('\n');
        // The u16 at `base + off` in guest memory, "?" when there is none (no overflow).
        let u16_at = |base: u64, off: u64| {
            base.checked_add(off)
                .and_then(|a| self.s.mem.read_obj::<u16>(GuestAddress(a)).ok())
                .map_or_else(|| "?".to_string(), |v| v.to_string())
        };
        let queues = common.as_ref().map_or(&[][..], |c| &c.queues[..]);
        for (i, q) in queues.iter().enumerate() {
            if !q.enabled {
                let _ = writeln!(out, "  queue {i}: disabled");
                continue;
            }
            // The rings' flags and indexes as they are in guest memory now.
            let _ = writeln!(
                out,
                "  queue {i}: size {} vector {} desc {:#x} avail {:#x} (flags {} idx {}) used {:#x} (flags {} idx {})",
                q.size,
                q.vector,
                q.desc,
                q.driver,
                u16_at(q.driver, 0),
                u16_at(q.driver, 2),
                q.device,
                u16_at(q.device, 0),
                u16_at(q.device, 2),
            );
        }
        Some(out)
    }
}

impl VirtioPciDevice {
    /// Gives back everything the function took when it was built, for good: its queue
    /// ioeventfds, every MSI-X vector's irqfd and GSI (route removed, GSI free for reuse), its
    /// INTx line; the device is reset (its worker joined) and its backend's files closed
    /// ([`VirtioDevice::release`]) on the executor, and this waits for that unless called on
    /// the executor itself.
    ///
    /// The device manager calls it when the function leaves the machine, on the monitor's or
    /// the main thread (the host's irqfd calls are not allowed on a vCPU): a vCPU may still
    /// hold a reference through its cached bus tables, and when it drops it, nothing is left
    /// to do. Guest accesses through such a reference reach a dead function that changes
    /// nothing on the host and is never activated again. Runs once; later calls (and the drop)
    /// do nothing.
    pub fn release(&self) {
        if self.s.released.swap(true, Ordering::SeqCst) {
            return;
        }
        // A route update that saw the function alive finishes before its GSIs go.
        while self.s.route_users.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        self.sync_notify(None);
        for (gsi, fd) in &self.s.irq.vectors {
            if let Err(e) = self.host.release_msi(*gsi, fd) {
                tracing::warn!("{}: releasing MSI GSI {gsi}: {e}", self.s.name);
            }
        }
        if let Some((gsi, trigger)) = self.s.irq.intx.get() {
            if let Err(e) = self.host.release_intx(*gsi, trigger) {
                tracing::warn!("{}: releasing INTx GSI {gsi}: {e}", self.s.name);
            }
        }
        let mut c = self.s.common.lock().unwrap_or_else(|p| p.into_inner());
        self.request_reset(&mut c);
        c.want_release = true;
        drop(c);
        self.post();
        self.work.flush();
    }

    /// Whether [`VirtioPciDevice::release`] ran.
    pub fn is_released(&self) -> bool {
        self.s.released.load(Ordering::Acquire)
    }
}

impl Drop for VirtioPciDevice {
    /// Releases the function if nobody did ([`VirtioPciDevice::release`]): the VMM always
    /// does before the last reference can end up on a vCPU thread.
    fn drop(&mut self) {
        self.release();
    }
}

impl DeviceJob for Shared {
    fn run(&self) {
        // Before taking the request: a request recorded after this point posts again.
        self.queued.store(false, Ordering::Release);
        let (reset, gen, activation, release) = {
            let mut c = self.common.lock().unwrap_or_else(|p| p.into_inner());
            let reset = std::mem::take(&mut c.want_reset);
            let activate =
                std::mem::take(&mut c.want_activate) && !self.released.load(Ordering::Acquire);
            let release = std::mem::take(&mut c.want_release);
            let was_active = c.activated;
            if reset {
                c.activated = false;
            }
            // An activation when the device already runs (DRIVER_OK cleared and set again
            // without a reset) changes nothing, as before.
            let activation =
                (activate && !c.activated).then(|| (c.queues.clone(), c.driver_features));
            (
                reset.then_some(was_active),
                c.reset_gen,
                activation,
                release,
            )
        };
        if let Some(was_active) = reset {
            if was_active {
                self.device.reset();
            }
            // The worker is gone: nothing sets these behind the reset's back any more.
            self.irq.isr.store(0, Ordering::Release);
            self.irq.status.store(0, Ordering::Release);
            self.reset_done.store(gen, Ordering::Release);
        }
        if release {
            self.device.release();
        }
        let Some((regs, features)) = activation else {
            return;
        };
        let result = self
            .activation(&regs, features)
            .and_then(|a| self.device.activate(a));
        match result {
            Ok(()) => {
                self.common
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .activated = true;
            }
            Err(e) => {
                tracing::warn!("{}: activation failed: {e}", self.name);
                self.irq.needs_reset();
            }
        }
    }
}

impl Shared {
    /// The activation for the queues the driver enabled (on the executor: it duplicates the
    /// queues' eventfds). Err: a queue set up with bad addresses or size.
    fn activation(&self, regs: &[QueueRegs], features: u64) -> Result<Activation, ActivateError> {
        let mut queues = Vec::new();
        for (i, r) in regs.iter().enumerate() {
            if !r.enabled {
                continue;
            }
            let q = (|| -> Result<Queue, virtio_queue::Error> {
                let mut q = Queue::new(self.queue_max[i])?;
                q.try_set_size(r.size)?;
                q.try_set_desc_table_address(vm_memory::GuestAddress(r.desc))?;
                q.try_set_avail_ring_address(vm_memory::GuestAddress(r.driver))?;
                q.try_set_used_ring_address(vm_memory::GuestAddress(r.device))?;
                q.set_event_idx(features & super::VIRTIO_RING_F_EVENT_IDX != 0);
                q.set_ready(true);
                Ok(q)
            })();
            let event = self.queue_events[i].try_clone();
            match (q, event) {
                (Ok(q), Ok(event)) if q.is_valid(&self.mem) => queues.push(ActiveQueue {
                    index: i as u16,
                    queue: q,
                    event,
                }),
                (_, Err(e)) => {
                    return Err(ActivateError::Host {
                        what: "queue eventfd",
                        source: e,
                    })
                }
                _ => return Err(ActivateError::BadQueue(i as u16)),
            }
        }
        Ok(Activation {
            mem: self.mem.clone(),
            queues,
            driver_features: features,
            interrupt: self.irq.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{rng_function, NullHost};
    use vm_memory::GuestAddress;

    #[test]
    fn running_out_of_descriptors_names_the_open_files_limit() {
        let full = TransportError::Host(std::io::Error::from_raw_os_error(libc::EMFILE));
        let msg = full.to_string();
        assert!(
            msg.starts_with("host resources: Too many open files"),
            "{msg}"
        );
        assert!(msg.contains("`ulimit -n`"), "{msg}");
        let other = TransportError::Host(std::io::Error::from_raw_os_error(libc::ENOMEM));
        assert_eq!(
            other.to_string(),
            "host resources: Cannot allocate memory (os error 12)"
        );
    }

    /// Keeps a clone of every MSI irqfd handed out, to count what was delivered.
    #[derive(Default)]
    struct RecordingHost {
        null: NullHost,
        fds: Mutex<Vec<EventFd>>,
        /// The executor to use (none: inline).
        work: Option<DeviceWork>,
        /// GSIs given back.
        released: Mutex<Vec<u32>>,
        /// Route changes asked for (GSIs).
        routes: Mutex<Vec<u32>>,
        /// `register_intx` fails with this errno (none: the default, unsupported).
        intx_errno: Option<i32>,
    }

    impl VirtioHost for RecordingHost {
        fn register_ioevent(&self, e: &EventFd, a: u64) -> std::io::Result<()> {
            self.null.register_ioevent(e, a)
        }
        fn unregister_ioevent(&self, e: &EventFd, a: u64) -> std::io::Result<()> {
            self.null.unregister_ioevent(e, a)
        }
        fn allocate_msi(&self) -> std::io::Result<(u32, EventFd)> {
            let (gsi, fd) = self.null.allocate_msi()?;
            self.fds.lock().unwrap().push(fd.try_clone()?);
            Ok((gsi, fd))
        }
        fn release_msi(&self, g: u32, e: &EventFd) -> std::io::Result<()> {
            self.released.lock().unwrap().push(g);
            self.null.release_msi(g, e)
        }
        fn set_msi_route(&self, g: u32, m: Option<(u64, u32)>) -> std::io::Result<()> {
            self.routes.lock().unwrap().push(g);
            self.null.set_msi_route(g, m)
        }
        fn device_work(&self) -> DeviceWork {
            self.work.clone().unwrap_or_else(|| self.null.device_work())
        }
        fn register_intx(
            &self,
            gsi: u32,
            still_pending: Box<dyn Fn() -> bool + Send + Sync>,
        ) -> std::io::Result<Arc<EventFd>> {
            match self.intx_errno {
                Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
                None => self.null.register_intx(gsi, still_pending),
            }
        }
    }

    /// A host without INTx leaves the pin unwired (the function still works over MSI-X); a
    /// host that runs out of descriptors makes it an error that names the limit, not a pin
    /// that silently never raises anything.
    #[test]
    fn intx_is_left_out_without_host_support_and_refused_without_descriptors() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let unsupported = rng_function(mem.clone(), Arc::new(RecordingHost::default()));
        assert!(unsupported.connect_intx(20).is_ok());
        let full = rng_function(
            mem,
            Arc::new(RecordingHost {
                intx_errno: Some(libc::EMFILE),
                ..Default::default()
            }),
        );
        let e = full.connect_intx(20).unwrap_err().to_string();
        assert!(
            e.starts_with("host resources: Too many open files") && e.contains("`ulimit -n`"),
            "{e}"
        );
    }

    fn delivered(host: &RecordingHost, v: usize) -> u64 {
        let fds = host.fds.lock().unwrap();
        let fd = &fds[v];
        // The eventfd blocks on read when zero: read only when poll says it is readable.
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(fd),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        if ready == 1 {
            fd.read().unwrap()
        } else {
            0
        }
    }

    fn control(dev: &VirtioPciDevice, value: u16) {
        let off = dev.config().msix().unwrap().control_offset();
        let effect = dev.config().write(off, &value.to_le_bytes());
        dev.config_written(&effect);
    }

    /// The diagnostic report shows the transport's status, the vectors and each enabled queue's
    /// rings as they are in guest memory.
    #[test]
    fn state_report_shows_status_vectors_and_ring_indexes() {
        use vm_memory::Bytes;
        let host = Arc::new(RecordingHost::default());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = rng_function(mem.clone(), host);
        let w32 = |off: u64, v: u32| dev.bar_write(VIRTIO_BAR, off, &v.to_le_bytes());
        w32(0x20, 0x1000); // queue 0 (selected at reset): descriptors, avail, used
        w32(0x28, 0x2000);
        w32(0x30, 0x3000);
        dev.bar_write(VIRTIO_BAR, 0x1c, &1u16.to_le_bytes());
        mem.write_obj(3u16, GuestAddress(0x2002)).unwrap(); // avail.idx
        mem.write_obj(1u16, GuestAddress(0x3000)).unwrap(); // used.flags: NO_NOTIFY
        mem.write_obj(2u16, GuestAddress(0x3002)).unwrap(); // used.idx
        dev.bar_write(VIRTIO_BAR, 0x14, &[1]); // status: ACKNOWLEDGE
        let r = dev.state_report().unwrap();
        assert!(r.contains("status 0x01, driver features 0x0"), "{r}");
        assert!(
            r.contains("msi-x off, intx enabled: v0=masked v1=masked"),
            "{r}"
        );
        assert!(
            r.contains("queue 0: size 256 vector 65535 desc 0x1000 avail 0x2000 (flags 0 idx 3) used 0x3000 (flags 1 idx 2)"),
            "{r}"
        );
        // A vCPU holding the common config (e.g. stuck in a device reset) does not block it.
        {
            let _held = dev.s.common.lock().unwrap();
            let r = dev.state_report().unwrap();
            assert!(
                r.contains("common config busy (held by a vCPU), isr 0x0"),
                "{r}"
            );
            assert!(r.contains("v0=masked v1=masked"), "{r}");
        }
        // Rings wherever the guest put them (here: the very top of the address space) are
        // reported as unreadable, never a panic.
        w32(0x28, u32::MAX);
        w32(0x2c, u32::MAX);
        let r = dev.state_report().unwrap();
        assert!(
            r.contains("avail 0xffffffffffffffff (flags ? idx ?)"),
            "{r}"
        );
    }

    /// An interrupt left pending while MSI-X was on stays pending when the guest unmasks its
    /// vector with MSI-X off, and is delivered when MSI-X comes back on (it used to be lost).
    #[test]
    fn a_pending_vector_survives_an_unmask_while_msix_is_off() {
        let host = Arc::new(RecordingHost::default());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = rng_function(mem, host.clone());
        const ENABLE: u16 = 1 << 15;
        control(&dev, ENABLE);
        // Vector 0 is masked (as at reset): the interrupt becomes pending.
        dev.s.irq.fire(0);
        assert!(dev.s.irq.msix.pending(0));
        assert_eq!(delivered(&host, 0), 0);
        // MSI-X off, then the guest unmasks vector 0 (entry 0's vector control word).
        control(&dev, 0);
        dev.bar_write(MSIX_BAR, 12, &0u32.to_le_bytes());
        assert_eq!(delivered(&host, 0), 0, "not delivered with MSI-X off");
        assert!(dev.s.irq.msix.pending(0), "still pending");
        // MSI-X on again: delivered once.
        control(&dev, ENABLE);
        assert_eq!(delivered(&host, 0), 1);
        assert!(!dev.s.irq.msix.pending(0));
    }

    /// Holds the executor busy until released (queues jobs behind it).
    struct Hold(Mutex<std::sync::mpsc::Receiver<()>>);

    impl DeviceJob for Hold {
        fn run(&self) {
            let _ = self
                .0
                .lock()
                .unwrap()
                .recv_timeout(std::time::Duration::from_secs(10));
        }
    }

    fn hold(work: &DeviceWork) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        work.post(Arc::new(Hold(Mutex::new(rx))));
        tx
    }

    /// A one-queue device that records where it is activated and reset; its reset waits for
    /// the test's go.
    struct Gated {
        go: Mutex<std::sync::mpsc::Receiver<()>>,
        activated_on: Mutex<Vec<std::thread::ThreadId>>,
        reset_on: Mutex<Vec<std::thread::ThreadId>>,
        released_on: Mutex<Vec<std::thread::ThreadId>>,
    }

    impl VirtioDevice for Gated {
        fn device_type(&self) -> u32 {
            super::super::types::RNG
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![8]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn activate(&self, _: Activation) -> Result<(), ActivateError> {
            self.activated_on
                .lock()
                .unwrap()
                .push(std::thread::current().id());
            Ok(())
        }
        fn reset(&self) {
            self.reset_on
                .lock()
                .unwrap()
                .push(std::thread::current().id());
            let _ = self
                .go
                .lock()
                .unwrap()
                .recv_timeout(std::time::Duration::from_secs(10));
        }
        fn release(&self) {
            self.released_on
                .lock()
                .unwrap()
                .push(std::thread::current().id());
        }
    }

    fn gated() -> (std::sync::mpsc::Sender<()>, Arc<Gated>) {
        let (go, gate) = std::sync::mpsc::channel();
        let gated = Arc::new(Gated {
            go: Mutex::new(gate),
            activated_on: Mutex::new(Vec::new()),
            reset_on: Mutex::new(Vec::new()),
            released_on: Mutex::new(Vec::new()),
        });
        (go, gated)
    }

    /// A driver's bring-up of queue 0 (size 8, rings at 0x1000/0x2000/0x3000, MSI-X vector
    /// `vector`) up to DRIVER_OK.
    fn bring_up(dev: &VirtioPciDevice, vector: u16) {
        let w8 = |off: u64, v: u8| dev.bar_write(VIRTIO_BAR, off, &[v]);
        let w16 = |off: u64, v: u16| dev.bar_write(VIRTIO_BAR, off, &v.to_le_bytes());
        let w32 = |off: u64, v: u32| dev.bar_write(VIRTIO_BAR, off, &v.to_le_bytes());
        w8(0x14, 0);
        w8(0x14, status::ACKNOWLEDGE | status::DRIVER);
        w32(0x08, 1);
        w32(0x0c, 1); // VIRTIO_F_VERSION_1
        w8(
            0x14,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w16(0x16, 0);
        w16(0x18, 8);
        w16(0x1a, vector);
        for (off, a) in [(0x20, 0x1000u32), (0x28, 0x2000), (0x30, 0x3000)] {
            w32(off, a);
            w32(off + 4, 0);
        }
        w16(0x1c, 1);
        w8(0x14, 0xf);
    }

    fn status_now(dev: &VirtioPciDevice) -> u8 {
        let mut b = [0u8];
        dev.bar_read(VIRTIO_BAR, 0x14, &mut b);
        b[0]
    }

    /// DRIVER_OK and a reset only post work: the device is activated and reset on the executor
    /// thread, never on the thread that wrote the status, and `device_status` reads the old
    /// value until the reset has been carried out, then 0.
    #[test]
    fn lifecycle_runs_on_the_executor_and_a_reset_reads_the_old_status_until_done() {
        let work = DeviceWork::start().unwrap();
        let host = Arc::new(RecordingHost {
            work: Some(work.clone()),
            ..Default::default()
        });
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (go, gated) = gated();
        let dev = VirtioPciDevice::new(
            "virtio-rng-pci",
            gated.clone(),
            TransportProps {
                vectors: 2,
                multifunction: false,
            },
            mem,
            host,
        )
        .unwrap();
        let me = std::thread::current().id();
        bring_up(&dev, 0);
        dev.flush_lifecycle();
        assert_eq!(gated.activated_on.lock().unwrap().len(), 1);
        assert_ne!(gated.activated_on.lock().unwrap()[0], me);
        assert_eq!(status_now(&dev), 0xf);
        assert!(dev
            .state_report()
            .unwrap()
            .contains("status 0x0f (activated),"));

        // The reset blocks on the executor (until `go`): the write returns regardless.
        dev.bar_write(VIRTIO_BAR, 0x14, &[0]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while gated.reset_on.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "reset never started");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_ne!(gated.reset_on.lock().unwrap()[0], me);
        for _ in 0..3 {
            assert_eq!(status_now(&dev), 0xf, "the old status while the reset runs");
        }
        assert!(dev.state_report().unwrap().contains("(reset pending)"));
        go.send(()).unwrap();
        dev.flush_lifecycle();
        assert_eq!(status_now(&dev), 0, "0 once the reset is done");

        // Up again, reset again: one more activation and one more reset.
        bring_up(&dev, 0); // its first reset has no device reset to do: nothing runs
        dev.flush_lifecycle();
        assert_eq!(gated.activated_on.lock().unwrap().len(), 2);
        assert_eq!(status_now(&dev), 0xf);
        go.send(()).unwrap();
        dev.bar_write(VIRTIO_BAR, 0x14, &[0]);
        dev.flush_lifecycle();
        assert_eq!(status_now(&dev), 0);
        assert_eq!(gated.reset_on.lock().unwrap().len(), 2);
    }

    /// A notification that arrives before the worker runs is served once it does, and the
    /// used buffer is signalled through the queue's MSI-X vector (looked up without a lock).
    #[test]
    fn a_kick_before_the_worker_starts_is_served_and_signalled() {
        use vm_memory::Bytes;
        let work = DeviceWork::start().unwrap();
        let host = Arc::new(RecordingHost {
            work: Some(work.clone()),
            ..Default::default()
        });
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = rng_function(mem.clone(), host.clone());
        const ENABLE: u16 = 1 << 15;
        control(&dev, ENABLE);
        dev.bar_write(MSIX_BAR, 16 + 12, &0u32.to_le_bytes()); // unmask vector 1
                                                               // One 16-byte writable buffer at 0x8000, made available.
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&0x8000u64.to_le_bytes());
        d[8..12].copy_from_slice(&16u32.to_le_bytes());
        d[12..14].copy_from_slice(&2u16.to_le_bytes()); // WRITE
        mem.write_slice(&d, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x2004)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        let release = hold(&work);
        bring_up(&dev, 1);
        // The kick (no ioeventfd here: the notify write reaches the transport).
        dev.bar_write(VIRTIO_BAR, NOTIFY_OFFSET, &0u16.to_le_bytes());
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 0);
        assert!(
            dev.state_report().unwrap().contains("(reset pending)"),
            "the reset at the start of the bring-up, then the activation"
        );
        release.send(()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap() == 0 {
            assert!(std::time::Instant::now() < deadline, "the kick was lost");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut got = 0;
        while got == 0 {
            assert!(std::time::Instant::now() < deadline, "no MSI-X interrupt");
            got = delivered(&host, 1);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(got, 1);
        assert_eq!(
            delivered(&host, 0),
            0,
            "vector 0 is the config vector's, unused"
        );
        dev.bar_write(VIRTIO_BAR, 0x14, &[0]);
        dev.flush_lifecycle();
        assert_eq!(status_now(&dev), 0);
    }

    /// Release gives back each vector's GSI once (dropping the function afterwards gives
    /// nothing more), resets the running device and releases its backend on the executor
    /// before it returns; the released function changes no route and is never activated again.
    #[test]
    fn release_gives_everything_back_once_and_the_function_stays_dead() {
        let work = DeviceWork::start().unwrap();
        let host = Arc::new(RecordingHost {
            work: Some(work.clone()),
            ..Default::default()
        });
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (go, gated) = gated();
        let dev = VirtioPciDevice::new(
            "virtio-rng-pci",
            gated.clone(),
            TransportProps {
                vectors: 3,
                multifunction: false,
            },
            mem,
            host.clone(),
        )
        .unwrap();
        const ENABLE: u16 = 1 << 15;
        control(&dev, ENABLE);
        assert_eq!(
            *host.routes.lock().unwrap(),
            [0, 1, 2],
            "MSI-X on routes each"
        );
        bring_up(&dev, 0);
        dev.flush_lifecycle();
        assert_eq!(gated.activated_on.lock().unwrap().len(), 1);
        go.send(()).unwrap(); // lets the release's reset through

        dev.release();
        assert!(dev.is_released());
        assert_eq!(*host.released.lock().unwrap(), [0, 1, 2]);
        let me = std::thread::current().id();
        assert_eq!(
            gated.reset_on.lock().unwrap().len(),
            1,
            "reset before return"
        );
        let released_on = gated.released_on.lock().unwrap().clone();
        assert_eq!(released_on.len(), 1, "backend released before return");
        assert_ne!(released_on[0], me, "on the executor");

        // A guest still holding the function (a vCPU's stale table) reaches a dead one.
        control(&dev, 0);
        control(&dev, ENABLE);
        dev.bar_write(MSIX_BAR, 0, &0xfee0_0000u32.to_le_bytes());
        assert_eq!(host.routes.lock().unwrap().len(), 3, "no route changed");
        bring_up(&dev, 0);
        dev.flush_lifecycle();
        assert_eq!(
            gated.activated_on.lock().unwrap().len(),
            1,
            "never activated"
        );

        dev.release();
        drop(dev);
        assert_eq!(host.released.lock().unwrap().len(), 3, "given back once");
        assert_eq!(gated.released_on.lock().unwrap().len(), 1);
    }
}
