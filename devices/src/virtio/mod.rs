//! Virtio devices: the modern virtio-pci transport ([`pci`]) and one file per device.
//!
//! A device ([`VirtioDevice`]) knows its type, features, queues and config; the transport
//! owns everything guest-visible on PCI (config space, capabilities, MSI-X, the common config
//! registers, ISR, notifications). When the driver sets DRIVER_OK the transport posts the
//! activation to the machine's [`DeviceWork`] executor, which hands the device its queues (a
//! reset is posted the same way): the vCPU thread that made the write only records it. The
//! device processes its queues on a worker thread of its own (never on a vCPU thread), woken by
//! the queues' ioeventfds, and signals used buffers through [`VirtioInterrupt`].

pub mod blk;
pub mod console;
pub mod net;
pub mod pci;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod work;
pub mod worker;

pub use work::{set_executor_init, DeviceJob, DeviceWork};
pub use worker::{run_thread_init, set_thread_init, QueueHandler, QueueWorker};

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: a modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_RING_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Virtio device types (virtio 1.x, 5).
pub mod types {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
}

/// How a device tells the driver about used buffers or a config change.
pub trait VirtioInterrupt: Send + Sync {
    /// Signals that queue `index` has new used buffers.
    fn signal_queue(&self, index: u16);
    /// Signals a configuration change.
    fn signal_config(&self);
    /// Marks the device DEVICE_NEEDS_RESET (it met something it cannot go on from, such as
    /// a queue in bad guest memory) and tells the driver.
    fn needs_reset(&self);

    /// Reports how serving queue `index` went (what [`worker::serve_queue`] returned):
    /// interrupts the driver when it asks for it, or marks `device` DEVICE_NEEDS_RESET when the
    /// queue itself is unusable.
    fn served(&self, device: &str, index: u16, result: Result<bool, virtio_queue::Error>) {
        match result {
            Ok(true) => self.signal_queue(index),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!("{device}: queue {index} unusable: {e}");
                self.needs_reset();
            }
        }
    }
}

/// A queue handed to an activated device.
pub struct ActiveQueue {
    /// Index of the queue.
    pub index: u16,
    /// The queue, validated against guest memory.
    pub queue: Queue,
    /// Signalled when the driver notifies the queue.
    pub event: EventFd,
}

/// What a device gets at DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues the driver enabled.
    pub queues: Vec<ActiveQueue>,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// Where to signal used buffers.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

/// Why a device could not be activated (DRIVER_OK). The transport then sets
/// DEVICE_NEEDS_RESET and tells the driver; the guest never takes the vmm down.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the driver enabled has a bad size or ring addresses.
    #[error("queue {0} set up with bad addresses or size")]
    BadQueue(u16),
    /// A host resource (eventfd, epoll, a backend's poller) could not be had.
    #[error("{what}: {source}")]
    Host {
        /// What was being set up.
        what: &'static str,
        /// The host's error.
        #[source]
        source: std::io::Error,
    },
    /// The worker thread could not be started.
    #[error("cannot start the worker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The device was released (removed) and has no backend any more.
    #[error("the device was released")]
    Released,
}

impl ActivateError {
    /// `map_err` helper for a host resource.
    pub fn host(what: &'static str) -> impl FnOnce(std::io::Error) -> ActivateError {
        move |source| ActivateError::Host { what, source }
    }
}

/// A virtio device behind a transport. Methods take `&self`; state lives inside.
pub trait VirtioDevice: Send + Sync {
    /// The virtio device type ([`types`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Size of the device-specific config area (0: none).
    fn config_size(&self) -> u64 {
        0
    }
    /// Reads the device-specific config.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// Writes the device-specific config.
    fn write_config(&self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the queues the driver set up.
    fn activate(&self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device (driver reset); it may be activated again later.
    fn reset(&self);
    /// Gives back the backend's host resources for good (image file, tap, console file or
    /// socket): the device left the machine. Called once, on the executor, after the last
    /// [`VirtioDevice::reset`]; the device is never activated again.
    fn release(&self) {}
}
