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
//! narrow lock; the ISR is an atomic. Queue notifications normally never reach this code: they
//! are KVM ioeventfds, re-registered whenever the guest moves BAR4 or toggles memory decode.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use pci::config::{BarKind, ConfigSpace, ConfigSpaceBuilder, WriteEffect};
use pci::{Delivery, MsixTable, PciFunction};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, Activation, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

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
    /// line. The line drops at the guest's EOI; the host then asks `still_pending` and raises it
    /// again if the device still wants service. Hosts without INTx keep the default (refused).
    fn register_intx(
        &self,
        _gsi: u32,
        _still_pending: Box<dyn Fn() -> bool + Send + Sync>,
    ) -> std::io::Result<EventFd> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The config space could not be built.
    #[error("config space: {0}")]
    Config(#[from] pci::config::ConfigError),
    /// A host resource (eventfd, GSI) could not be had.
    #[error("host resources: {0}")]
    Host(#[from] std::io::Error),
    /// A property out of range.
    #[error("{0}")]
    Property(String),
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
    activated: bool,
}

/// State shared with the device's worker thread for interrupts.
struct Interrupts {
    config: ConfigSpace,
    msix: MsixTable,
    isr: AtomicU8,
    /// Per MSI-X vector: its GSI and irqfd.
    vectors: Vec<(u32, EventFd)>,
    /// Per queue: its MSI-X vector, fixed at activation.
    queue_vectors: Mutex<Vec<u16>>,
    config_vector: std::sync::atomic::AtomicU16,
    status: AtomicU8,
    /// Raises the INTx line, once connected ([`VirtioPciDevice::connect_intx`]).
    intx: std::sync::OnceLock<EventFd>,
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
        if let Some(t) = self.intx.get() {
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
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(usize::from(index))
            .copied()
            .unwrap_or(NO_VECTOR);
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

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    name: String,
    device: Arc<dyn VirtioDevice>,
    irq: Arc<Interrupts>,
    common: Mutex<Common>,
    queue_events: Vec<EventFd>,
    queue_max: Vec<u16>,
    host: Arc<dyn VirtioHost>,
    mem: GuestMemoryMmap,
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
        let mut vectors = Vec::with_capacity(usize::from(props.vectors));
        for _ in 0..props.vectors {
            vectors.push(host.allocate_msi()?);
        }
        let queue_events = queue_max
            .iter()
            .map(|_| EventFd::new(0))
            .collect::<Result<Vec<_>, _>>()?;
        let irq = Arc::new(Interrupts {
            config,
            msix: MsixTable::new(props.vectors),
            isr: AtomicU8::new(0),
            vectors,
            queue_vectors: Mutex::new(vec![NO_VECTOR; queue_max.len()]),
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
        Ok(VirtioPciDevice {
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
            }),
            queue_events,
            queue_max,
            host,
            mem,
            notify_base: Mutex::new(None),
            pci_cfg_cap,
        })
    }

    /// Wires the function's INTx pin to `gsi` (level-triggered, with re-assertion after EOI
    /// while the ISR is non-zero). Without it interrupts need MSI-X.
    pub fn connect_intx(&self, gsi: u32) {
        let weak = Arc::downgrade(&self.irq);
        let pending = Box::new(move || weak.upgrade().is_some_and(|i| i.intx_pending()));
        match self.host.register_intx(gsi, pending) {
            Ok(trigger) => {
                let _ = self.irq.intx.set(trigger);
            }
            Err(e) => tracing::warn!("{}: no INTx on GSI {gsi}: {e}", self.name),
        }
    }

    /// The ABI-shaping properties of this function as realized: MSI-X vectors, queue count,
    /// queue sizes and offered feature bits (recorded in compat fingerprints).
    pub fn abi_props(&self) -> std::collections::BTreeMap<String, String> {
        let mut m = std::collections::BTreeMap::new();
        m.insert("vectors".into(), self.irq.vectors.len().to_string());
        m.insert("queues".into(), self.queue_max.len().to_string());
        let sizes: Vec<String> = self.queue_max.iter().map(|s| s.to_string()).collect();
        m.insert("queue_sizes".into(), sizes.join(","));
        m.insert("features".into(), format!("{:#x}", self.device.features()));
        m
    }

    /// Registers or moves the queue ioeventfds to where BAR4 decodes on the bus now (`None`:
    /// nowhere). Only called with what the BAR mapper actually mapped, so a notify area can
    /// never cover another device's range. All or nothing: if one registration fails the others
    /// are undone, and notifications go through [`PciFunction::bar_write`] instead.
    fn sync_notify(&self, bar_base: Option<u64>) {
        let want = bar_base.map(|a| a + NOTIFY_OFFSET);
        let mut cur = self.notify_base.lock().unwrap_or_else(|p| p.into_inner());
        if *cur == want {
            return;
        }
        let addr = |base: u64, i: usize| base + i as u64 * u64::from(NOTIFY_MULTIPLIER);
        if let Some(old) = cur.take() {
            for (i, e) in self.queue_events.iter().enumerate() {
                let _ = self.host.unregister_ioevent(e, addr(old, i));
            }
        }
        if let Some(base) = want {
            for (i, e) in self.queue_events.iter().enumerate() {
                if let Err(err) = self.host.register_ioevent(e, addr(base, i)) {
                    tracing::warn!("{}: ioeventfd at {:#x}: {err}", self.name, addr(base, i));
                    for (j, e) in self.queue_events.iter().enumerate().take(i) {
                        let _ = self.host.unregister_ioevent(e, addr(base, j));
                    }
                    return;
                }
            }
            *cur = Some(base);
        }
    }

    fn reset_device(&self, c: &mut Common) {
        if c.activated {
            self.device.reset();
        }
        c.activated = false;
        c.status = 0;
        c.driver_features = 0;
        c.device_feature_select = 0;
        c.driver_feature_select = 0;
        c.queue_select = 0;
        for (q, &m) in c.queues.iter_mut().zip(&self.queue_max) {
            *q = QueueRegs {
                size: m,
                vector: NO_VECTOR,
                ..Default::default()
            };
        }
        self.irq.isr.store(0, Ordering::Release);
        self.irq.status.store(0, Ordering::Release);
        self.irq.config_vector.store(NO_VECTOR, Ordering::Release);
    }

    fn activate(&self, c: &mut Common) {
        let mut queues = Vec::new();
        for (i, r) in c.queues.iter().enumerate() {
            if !r.enabled {
                continue;
            }
            let q = (|| -> Result<Queue, virtio_queue::Error> {
                let mut q = Queue::new(self.queue_max[i])?;
                q.try_set_size(r.size)?;
                q.try_set_desc_table_address(vm_memory::GuestAddress(r.desc))?;
                q.try_set_avail_ring_address(vm_memory::GuestAddress(r.driver))?;
                q.try_set_used_ring_address(vm_memory::GuestAddress(r.device))?;
                q.set_event_idx(c.driver_features & super::VIRTIO_RING_F_EVENT_IDX != 0);
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
                _ => {
                    tracing::warn!("{}: queue {i} set up with bad addresses or size", self.name);
                    c.status |= status::DEVICE_NEEDS_RESET;
                    return;
                }
            }
        }
        *self
            .irq
            .queue_vectors
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = c.queues.iter().map(|q| q.vector).collect();
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            driver_features: c.driver_features,
            interrupt: self.irq.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => c.activated = true,
            Err(e) => {
                tracing::warn!("{}: activation failed: {e}", self.name);
                c.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let c = self.common.lock().unwrap_or_else(|p| p.into_inner());
        let q = c.queues.get(usize::from(c.queue_select));
        let status = c.status | self.irq.status.load(Ordering::Acquire);
        let features = self.device.features();
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
            0x10 => u64::from(self.irq.config_vector.load(Ordering::Acquire)),
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
        let mut c = self.common.lock().unwrap_or_else(|p| p.into_inner());
        let features = self.device.features();
        let sel = usize::from(c.queue_select);
        // Queue registers may only change before the driver is done (virtio 1.x, 4.1.4.3).
        let setup = c.status & status::DRIVER_OK == 0;
        let vectors = self.irq.vectors.len() as u64;
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
            0x10 => self.irq.config_vector.store(vector(v), Ordering::Release),
            0x14 => {
                let new = v as u8;
                if new == 0 {
                    self.reset_device(&mut c);
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
                if new & status::DRIVER_OK != 0 && !was_ok && !c.activated {
                    self.activate(&mut c);
                }
            }
            0x16 => c.queue_select = v as u16,
            _ if !setup => {}
            0x18 => {
                if let (Some(q), Some(&max)) = (c.queues.get_mut(sel), self.queue_max.get(sel)) {
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
        let msix = &self.irq.msix;
        if offset >= MSIX_PBA_OFFSET {
            return; // the PBA is read-only
        }
        if let Some(v) = msix.write_table(offset, data) {
            self.update_route(v);
        }
    }

    fn update_route(&self, v: u16) {
        let msix = &self.irq.msix;
        let (Some(e), Some((gsi, fd))) = (msix.entry(v), self.irq.vectors.get(usize::from(v)))
        else {
            return;
        };
        if let Err(err) = self.host.set_msi_route(*gsi, Some((e.address, e.data))) {
            tracing::warn!("{}: MSI route for vector {v}: {err}", self.name);
        }
        // MSI-X off: the pending bit stays for when it is enabled (config_written delivers it).
        if self.irq.config.msix_enabled()
            && msix.take_pending_if_unmasked(v, self.irq.config.msix_function_masked())
        {
            let _ = fd.write(1);
        }
    }

    fn pci_cfg_window(&self) -> (usize, u64, usize) {
        let base = usize::from(self.pci_cfg_cap);
        let cfg = &self.irq.config;
        let bar = usize::from(cfg.read_u8(base + 4));
        let offset = u64::from(cfg.read_u32((base + 8) / 4));
        let len = cfg.read_u32((base + 12) / 4) as usize;
        (bar, offset, len)
    }
}

impl PciFunction for VirtioPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.irq.config
    }

    fn config_written(&self, effect: &WriteEffect) {
        if let Some(m) = self.irq.config.msix() {
            if effect.touches(m.control_offset(), 2) && self.irq.config.msix_enabled() {
                for v in 0..self.irq.msix.vectors() {
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
            self.irq.config.read(cap + 16, &mut d);
            self.bar_write(bar, offset, &d[..len]);
        } else if effect.touches(cap + 4, 12) {
            let mut d = [0u8; 4];
            self.bar_read(bar, offset, &mut d[..len]);
            self.irq.config.set_raw(cap + 16, &d);
        }
    }

    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (bar, offset) {
            (MSIX_BAR, o) if o < MSIX_PBA_OFFSET => self.irq.msix.read_table(o, data),
            (MSIX_BAR, o) => self.irq.msix.read_pba(o - MSIX_PBA_OFFSET, data),
            (VIRTIO_BAR, o) if o < ISR_OFFSET => self.common_read(o, data),
            (VIRTIO_BAR, o) if o < DEVICE_CFG_OFFSET => {
                // Reading the ISR clears it (and the interrupt status; the INTx line drops
                // at the guest's EOI).
                if let Some(b) = data.first_mut() {
                    *b = self.irq.isr.swap(0, Ordering::AcqRel);
                    self.irq
                        .config
                        .clear_status_bits(pci::config::STATUS_INTERRUPT);
                }
            }
            (VIRTIO_BAR, o) if o < NOTIFY_OFFSET => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]) {
        match (bar, offset) {
            (MSIX_BAR, o) => self.msix_write(o, data),
            (VIRTIO_BAR, o) if o < ISR_OFFSET => self.common_write(o, data),
            (VIRTIO_BAR, o) if (DEVICE_CFG_OFFSET..NOTIFY_OFFSET).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            (VIRTIO_BAR, o) if o >= NOTIFY_OFFSET => {
                // Only reached when no ioeventfd is registered for this address.
                let q = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                if let Some(e) = self.queue_events.get(q as usize) {
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
        &self.name
    }

    fn state_report(&self) -> Option<String> {
        use std::fmt::Write as _;
        use vm_memory::{Bytes, GuestAddress};
        let irq = &self.irq;
        let mut out = String::new();
        // Never wait for the common config: a vCPU stuck in a device reset holds it, and this
        // report is for finding such things.
        let common = match self.common.try_lock() {
            Ok(c) => Some(c),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        let _ = match &common {
            Some(c) => write!(
                out,
                "  status {:#04x}{}, driver features {:#x}",
                c.status | irq.status.load(Ordering::Acquire),
                if c.activated { " (activated)" } else { "" },
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
                .and_then(|a| self.mem.read_obj::<u16>(GuestAddress(a)).ok())
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

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.sync_notify(None);
        self.device.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{rng_function, NullHost};
    use vm_memory::GuestAddress;

    /// Keeps a clone of every MSI irqfd handed out, to count what was delivered.
    #[derive(Default)]
    struct RecordingHost {
        null: NullHost,
        fds: Mutex<Vec<EventFd>>,
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
        fn set_msi_route(&self, g: u32, m: Option<(u64, u32)>) -> std::io::Result<()> {
            self.null.set_msi_route(g, m)
        }
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
            let _held = dev.common.lock().unwrap();
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
        dev.irq.fire(0);
        assert!(dev.irq.msix.pending(0));
        assert_eq!(delivered(&host, 0), 0);
        // MSI-X off, then the guest unmasks vector 0 (entry 0's vector control word).
        control(&dev, 0);
        dev.bar_write(MSIX_BAR, 12, &0u32.to_le_bytes());
        assert_eq!(delivered(&host, 0), 0, "not delivered with MSI-X off");
        assert!(dev.irq.msix.pending(0), "still pending");
        // MSI-X on again: delivered once.
        control(&dev, ENABLE);
        assert_eq!(delivered(&host, 0), 1);
        assert!(!dev.irq.msix.pending(0));
    }
}
