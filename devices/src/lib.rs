//! Devices a guest talks to, and the lock-free bus that routes guest exits to them.
//!
//! - [`bus`]: the lock-free bus (PIO and MMIO) every exit goes through.
//! - [`legacy`]: the 8250 UART, the i8042 reset line, the ACPI PM port, the ACPI PCI hot-plug
//!   registers and the GED.
//! - [`pci_host`]: PCI config access from the buses, BAR mapping.
//! - [`virtio`]: the virtio-pci transport and the virtio devices.
#![deny(missing_docs)]

pub mod bus;
pub mod legacy;
pub mod pci_host;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// A vm-superio trigger backed by an eventfd (an irqfd or an event the VMM waits on).
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
