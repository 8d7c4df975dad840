//! The ACPI power-management port of a hardware-reduced ACPI machine.
//!
//! The FADT names port [`ACPI_PM_PORT`] as the sleep control register and the reset register.
//! Writing `SLP_TYP=5 | SLP_EN` (S5) powers the machine off; writing the reset value resets it.

use super::PowerCallback;
use crate::bus::BusDevice;

/// The port of the sleep control / sleep status / reset registers.
pub const ACPI_PM_PORT: u64 = 0x600;
/// Ports decoded: 0x600 sleep control, 0x601 sleep status, 0x602 reset.
pub const ACPI_PM_PORT_LEN: u64 = 3;
/// Offset of the reset register and the value that resets.
pub const RESET_OFFSET: u64 = 2;
/// The value written to the reset register to reset.
pub const RESET_VALUE: u8 = 0x01;
/// The S5 sleep type (soft off) the DSDT's `_S5_` object names.
pub const S5_SLEEP_TYPE: u8 = 5;

/// What the guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// S5: power off.
    PowerOff,
    /// Reset.
    Reset,
}

/// The ACPI PM port: reports power-off and reset requests.
pub struct AcpiPm {
    power: PowerCallback,
}

impl AcpiPm {
    /// A PM port that reports to `power`.
    pub fn new(power: PowerCallback) -> Self {
        AcpiPm { power }
    }

    /// Decodes a write to the PM ports.
    pub fn decode(offset: u64, value: u8) -> Option<PowerEvent> {
        const SLP_EN: u8 = 1 << 5;
        match offset {
            0 if value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE => {
                Some(PowerEvent::PowerOff)
            }
            RESET_OFFSET if value == RESET_VALUE => Some(PowerEvent::Reset),
            _ => None,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        tracing::debug!("acpi pm: write {v:#x} at offset {offset}");
        if let Some(event) = Self::decode(offset, v) {
            (self.power)(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_s5_and_reset_only() {
        assert_eq!(
            AcpiPm::decode(0, (5 << 2) | (1 << 5)),
            Some(PowerEvent::PowerOff)
        );
        assert_eq!(AcpiPm::decode(0, 5 << 2), None);
        assert_eq!(AcpiPm::decode(0, (3 << 2) | (1 << 5)), None);
        assert_eq!(AcpiPm::decode(2, 1), Some(PowerEvent::Reset));
        assert_eq!(AcpiPm::decode(2, 0), None);
        assert_eq!(AcpiPm::decode(1, 0xff), None);
    }
}
