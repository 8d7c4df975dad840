//! Legacy PC devices: the 8250 UART, the i8042 reset line, the CMOS clock, the ACPI
//! power-management port and the ACPI PCI hot-plug registers (with their GED).

mod hotplug;
mod pm;
mod rtc;
mod serial;

pub use hotplug::{
    slots_in, BadSlot, EjectCallback, Ged, PciHotplug, B0EJ_OFFSET, BNUM_OFFSET,
    BRIDGE_HOTPLUG_SLOTS, GED_GSI, GED_PCI_HOTPLUG, GED_PORT, GED_PORT_LEN, HOTPLUG_BUSES,
    HOTPLUG_SLOTS, PCID_OFFSET, PCIU_OFFSET, PCI_HOTPLUG_PORT, PCI_HOTPLUG_PORT_LEN,
    PCI_RMV_OFFSET,
};
pub use pm::{
    AcpiPm, PowerEvent, ACPI_PM_PORT, ACPI_PM_PORT_LEN, RESET_OFFSET, RESET_VALUE, S5_SLEEP_TYPE,
};
pub use rtc::{Rtc, RTC_PORT, RTC_PORT_LEN};
pub use serial::{Serial, SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_LEN};

use std::sync::Mutex;

use vm_superio::I8042Device;

use crate::bus::BusDevice;

/// Called when the guest asks to power off or reset.
pub type PowerCallback = std::sync::Arc<dyn Fn(PowerEvent) + Send + Sync>;

/// A vm-superio trigger that reports a reset through a [`PowerCallback`].
pub struct ResetTrigger(PowerCallback);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        (self.0)(PowerEvent::Reset);
        Ok(())
    }
}

/// The i8042 controller, reduced to what a guest uses to reset the machine (command 0xFE).
///
/// Registered at port 0x60 (data) and 0x64 (command/status).
pub struct I8042 {
    inner: Mutex<I8042Device<ResetTrigger>>,
}

/// The i8042 data port.
pub const I8042_DATA_PORT: u64 = 0x60;
/// The i8042 command/status port.
pub const I8042_COMMAND_PORT: u64 = 0x64;

impl I8042 {
    /// An i8042 whose reset command calls `power`.
    pub fn new(power: PowerCallback) -> Self {
        I8042 {
            inner: Mutex::new(I8042Device::new(ResetTrigger(power))),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        let port = base + offset;
        let value = match self.inner.lock() {
            Ok(mut d) => d.read((port - I8042_DATA_PORT) as u8),
            Err(_) => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        let port = base + offset;
        tracing::debug!("i8042: write {data:x?} to port {port:#x}");
        if let (Some(&v), Ok(mut d)) = (data.first(), self.inner.lock()) {
            if let Err(e) = d.write((port - I8042_DATA_PORT) as u8, v) {
                tracing::warn!("i8042: failed to signal reset: {e}");
            }
        }
    }
}
