//! Test doubles for unit tests, benches and the fuzzer: a [`VirtioHost`] without KVM and a
//! [`VirtioInterrupt`] that counts what it is asked to do.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use super::pci::VirtioHost;
use super::VirtioInterrupt;

/// Host services for a transport outside a VM: fresh eventfds and GSIs (counting up from
/// `next_gsi`, never reused), notifications, routes and releases accepted and ignored, no
/// INTx, lifecycle work inline
/// ([`super::DeviceWork::inline`]).
#[derive(Debug, Default)]
pub struct NullHost {
    /// The GSI the next [`VirtioHost::allocate_msi`] hands out.
    pub next_gsi: AtomicU32,
}

impl VirtioHost for NullHost {
    fn register_ioevent(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
        Ok(())
    }

    fn unregister_ioevent(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
        Ok(())
    }

    fn allocate_msi(&self) -> std::io::Result<(u32, EventFd)> {
        Ok((
            self.next_gsi.fetch_add(1, Ordering::Relaxed),
            EventFd::new(0)?,
        ))
    }

    fn release_msi(&self, _: u32, _: &EventFd) -> std::io::Result<()> {
        Ok(())
    }

    fn set_msi_route(&self, _: u32, _: Option<(u64, u32)>) -> std::io::Result<()> {
        Ok(())
    }

    /// Lifecycle work runs at once on the thread that writes the status (no vCPUs here).
    fn device_work(&self) -> super::DeviceWork {
        super::DeviceWork::inline()
    }
}

/// Counts queue interrupts and NEEDS_RESET requests.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    /// Queue interrupts signalled.
    pub queue: AtomicU32,
    /// Times the device asked for a reset.
    pub reset: AtomicU32,
}

impl VirtioInterrupt for CountingInterrupt {
    fn signal_queue(&self, _index: u16) {
        self.queue.fetch_add(1, Ordering::SeqCst);
    }

    fn signal_config(&self) {}

    fn needs_reset(&self) {
        self.reset.fetch_add(1, Ordering::SeqCst);
    }
}

/// A virtio-rng-pci function with two MSI-X vectors over `mem`, its services from `host`: the
/// function the dispatch bench, the allocation test and the transport's unit tests work on.
pub fn rng_function(
    mem: vm_memory::GuestMemoryMmap,
    host: std::sync::Arc<dyn VirtioHost>,
) -> super::pci::VirtioPciDevice {
    super::pci::VirtioPciDevice::new(
        "virtio-rng-pci",
        std::sync::Arc::new(super::rng::Rng::new()),
        super::pci::TransportProps {
            vectors: 2,
            multifunction: false,
        },
        mem,
        host,
    )
    .expect("a virtio-rng-pci transport with two vectors")
}
