//! PCI function addresses (`bus:device.function`, domain always 0).
//!
//! [`PciAddress`] is the one type that owns parsing, display, serde and the
//! translations to and from the two configuration access mechanisms (ECAM
//! offsets and the type-1 `CONFIG_ADDRESS` register at port 0xcf8).
//!
//! Invariant: a `PciAddress` always holds `device <= 0x1f` and
//! `function <= 7`; the fields are private so no other value can exist.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Highest device (slot) number on a bus.
pub const MAX_DEVICE: u8 = 0x1f;
/// Highest function number in a slot.
pub const MAX_FUNCTION: u8 = 7;

/// Errors from building or parsing a [`PciAddress`] or a QEMU `addr=` value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    /// The device (slot) number is above 0x1f.
    #[error("PCI device (slot) number {0:#x} out of range (max 0x1f)")]
    DeviceOutOfRange(u32),
    /// The function number is above 7.
    #[error("PCI function number {0:#x} out of range (max 7)")]
    FunctionOutOfRange(u32),
    /// The bus number is above 0xff.
    #[error("PCI bus number {0:#x} out of range (max 0xff)")]
    BusOutOfRange(u32),
    /// Only PCI domain (segment) 0 exists.
    #[error("PCI domain {0:#x} not supported (only domain 0 exists)")]
    DomainNotSupported(u32),
    /// The text is not a valid address.
    #[error("invalid PCI address '{0}'")]
    Invalid(String),
}

/// A PCI function address on domain 0.
///
/// Invariant: `device() <= 0x1f` and `function() <= 7`.
///
/// ```
/// use pci::PciAddress;
///
/// let a: PciAddress = "00:05.0".parse().unwrap();
/// assert_eq!(a, PciAddress::new(0, 5, 0).unwrap());
/// assert_eq!(a.to_string(), "00:05.0");
/// assert_eq!(format!("{a:#}"), "0000:00:05.0");
/// assert_eq!("0000:00:05.0".parse::<PciAddress>().unwrap(), a);
/// assert_eq!(a.ecam_offset(), 5 << 15);
/// assert_eq!(PciAddress::from_ecam_offset(0x2_8010), (a, 0x10));
/// assert!(PciAddress::new(0, 0x20, 0).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    bus: u8,
    device: u8,
    function: u8,
}

impl PciAddress {
    /// 00:00.0, the host bridge.
    pub const HOST_BRIDGE: PciAddress = PciAddress {
        bus: 0,
        device: 0,
        function: 0,
    };

    /// Builds an address, checking `device <= 0x1f` and `function <= 7`.
    pub fn new(bus: u8, device: u8, function: u8) -> Result<Self, AddressError> {
        if device > MAX_DEVICE {
            return Err(AddressError::DeviceOutOfRange(device.into()));
        }
        if function > MAX_FUNCTION {
            return Err(AddressError::FunctionOutOfRange(function.into()));
        }
        Ok(Self {
            bus,
            device,
            function,
        })
    }

    /// Bus number.
    pub fn bus(&self) -> u8 {
        self.bus
    }

    /// Device (slot) number, `0..=0x1f`.
    pub fn device(&self) -> u8 {
        self.device
    }

    /// Function number, `0..=7`.
    pub fn function(&self) -> u8 {
        self.function
    }

    /// The 8-bit `devfn` (`device << 3 | function`), an index into a bus's
    /// 256-entry function table.
    pub fn devfn(&self) -> u8 {
        (self.device << 3) | self.function
    }

    /// The address of `devfn` on `bus` (always valid: every `u8` is a devfn).
    pub fn from_devfn(bus: u8, devfn: u8) -> Self {
        Self {
            bus,
            device: devfn >> 3,
            function: devfn & 7,
        }
    }

    /// Offset of this function's 4 KiB configuration space in an ECAM window
    /// (`bus << 20 | device << 15 | function << 12`).
    pub fn ecam_offset(&self) -> u64 {
        (u64::from(self.bus) << 20)
            | (u64::from(self.device) << 15)
            | (u64::from(self.function) << 12)
    }

    /// Splits an ECAM window offset into the function address and the
    /// register offset (0..0x1000). Bits above bit 27 are ignored.
    pub fn from_ecam_offset(offset: u64) -> (Self, u16) {
        let addr = Self {
            bus: ((offset >> 20) & 0xff) as u8,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
        };
        (addr, (offset & 0xfff) as u16)
    }

    /// Decodes a type-1 `CONFIG_ADDRESS` (port 0xcf8) value into the function
    /// and the dword-aligned register offset (bits 7:2; only the first 256
    /// bytes of configuration space are reachable this way).
    ///
    /// Returns `None` when the enable bit (31) is clear.
    pub fn from_config_address(cf8: u32) -> Option<(Self, u16)> {
        if cf8 & 0x8000_0000 == 0 {
            return None;
        }
        let addr = Self {
            bus: ((cf8 >> 16) & 0xff) as u8,
            device: ((cf8 >> 11) & 0x1f) as u8,
            function: ((cf8 >> 8) & 0x7) as u8,
        };
        Some((addr, (cf8 & 0xfc) as u16))
    }

    /// The type-1 `CONFIG_ADDRESS` value (enable bit set) selecting
    /// `register` (only bits 7:2 are used) of this function.
    pub fn config_address(&self, register: u8) -> u32 {
        0x8000_0000
            | (u32::from(self.bus) << 16)
            | (u32::from(self.device) << 11)
            | (u32::from(self.function) << 8)
            | u32::from(register & 0xfc)
    }
}

impl fmt::Display for PciAddress {
    /// `00:05.0`; the alternate form `{:#}` adds the domain: `0000:00:05.0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            write!(f, "0000:")?;
        }
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// Parses 1..=`max_digits` hex digits (no sign, no prefix, no spaces).
fn parse_hex_field(s: &str, max_digits: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl FromStr for PciAddress {
    type Err = AddressError;

    /// Accepts `bb:dd.f` and `dddd:bb:dd.f` (hex; the domain must be 0).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || AddressError::Invalid(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [bus, devfn] => (None, *bus, *devfn),
            [domain, bus, devfn] => (Some(*domain), *bus, *devfn),
            _ => return Err(invalid()),
        };
        if let Some(domain) = domain {
            let domain = parse_hex_field(domain, 4).ok_or_else(invalid)?;
            if domain != 0 {
                return Err(AddressError::DomainNotSupported(domain));
            }
        }
        let bus = parse_hex_field(bus, 2).ok_or_else(invalid)?;
        let (device, function) = devfn.split_once('.').ok_or_else(invalid)?;
        let device = parse_hex_field(device, 2).ok_or_else(invalid)?;
        let function = parse_hex_field(function, 1).ok_or_else(invalid)?;
        let bus = u8::try_from(bus).map_err(|_| AddressError::BusOutOfRange(bus))?;
        if device > u32::from(MAX_DEVICE) {
            return Err(AddressError::DeviceOutOfRange(device));
        }
        if function > u32::from(MAX_FUNCTION) {
            return Err(AddressError::FunctionOutOfRange(function));
        }
        // Both checked above, so the conversions cannot fail.
        Self::new(bus, device as u8, function as u8)
    }
}

impl Serialize for PciAddress {
    /// Serializes as the short string form, `"00:05.0"`.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    /// Accepts `"00:05.0"` and `"0000:00:05.0"`.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses one QEMU `addr=` number: hex, with an optional `0x`/`0X` prefix.
fn parse_qemu_number(s: &str) -> Option<u32> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    // 8 hex digits fit in a u32; longer values are out of range anyway.
    parse_hex_field(digits, 8)
}

/// Parses the value of QEMU's `-device ...,addr=` property: `slot` or
/// `slot.function`, each hex with an optional `0x` prefix (`5`, `05`, `5.0`,
/// `0x5.0x1`, `1f.7`).
///
/// Returns the slot (`<= 0x1f`) and the function (`<= 7`) if one was given.
/// Empty parts, junk, spaces, signs and extra parts are rejected.
pub fn parse_qemu_addr(s: &str) -> Result<(u8, Option<u8>), AddressError> {
    let invalid = || AddressError::Invalid(s.to_string());
    let (slot, function) = match s.split_once('.') {
        Some((slot, function)) => (slot, Some(function)),
        None => (s, None),
    };
    let slot = parse_qemu_number(slot).ok_or_else(invalid)?;
    if slot > u32::from(MAX_DEVICE) {
        return Err(AddressError::DeviceOutOfRange(slot));
    }
    let function = match function {
        None => None,
        Some(f) => {
            let f = parse_qemu_number(f).ok_or_else(invalid)?;
            if f > u32::from(MAX_FUNCTION) {
                return Err(AddressError::FunctionOutOfRange(f));
            }
            Some(f as u8)
        }
    };
    Ok((slot as u8, function))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(b: u8, d: u8, f: u8) -> PciAddress {
        PciAddress::new(b, d, f).unwrap()
    }

    #[test]
    fn new_checks_ranges() {
        assert!(PciAddress::new(0xff, 0x1f, 7).is_ok());
        assert_eq!(
            PciAddress::new(0, 0x20, 0),
            Err(AddressError::DeviceOutOfRange(0x20))
        );
        assert_eq!(
            PciAddress::new(0, 0, 8),
            Err(AddressError::FunctionOutOfRange(8))
        );
    }

    #[test]
    fn display() {
        assert_eq!(a(0, 5, 0).to_string(), "00:05.0");
        assert_eq!(a(0x1a, 0x1f, 7).to_string(), "1a:1f.7");
        assert_eq!(format!("{:#}", a(0, 5, 0)), "0000:00:05.0");
    }

    #[test]
    fn from_str_good() {
        assert_eq!("00:05.0".parse(), Ok(a(0, 5, 0)));
        assert_eq!("0000:00:05.0".parse(), Ok(a(0, 5, 0)));
        assert_eq!("ff:1f.7".parse(), Ok(a(0xff, 0x1f, 7)));
        assert_eq!("0:1F.7".parse(), Ok(a(0, 0x1f, 7)));
    }

    #[test]
    fn from_str_bad() {
        for s in [
            "",
            "00",
            "00:05",
            "00:05.",
            ":05.0",
            "00:.0",
            "00:05.0.1",
            "00:05.8",
            "00:20.0",
            "100:05.0",
            "0001:00:05.0",
            "00000:00:05.0",
            "0:0:0:0.0",
            " 00:05.0",
            "00:05.0 ",
            "00:+5.0",
            "00:0x5.0",
            "zz:05.0",
            "00:05.10",
        ] {
            assert!(s.parse::<PciAddress>().is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn serde_round_trip() {
        let addr = a(0, 5, 1);
        let json = serde_json::to_string(&addr).unwrap();
        assert_eq!(json, "\"00:05.1\"");
        assert_eq!(serde_json::from_str::<PciAddress>(&json).unwrap(), addr);
        assert_eq!(
            serde_json::from_str::<PciAddress>("\"0000:00:05.1\"").unwrap(),
            addr
        );
        assert!(serde_json::from_str::<PciAddress>("\"00:25.1\"").is_err());
        assert!(serde_json::from_str::<PciAddress>("5").is_err());
    }

    #[test]
    fn qemu_addr_forms() {
        assert_eq!(parse_qemu_addr("5"), Ok((5, None)));
        assert_eq!(parse_qemu_addr("05"), Ok((5, None)));
        assert_eq!(parse_qemu_addr("5.0"), Ok((5, Some(0))));
        assert_eq!(parse_qemu_addr("0x5.0x1"), Ok((5, Some(1))));
        assert_eq!(parse_qemu_addr("1f.7"), Ok((0x1f, Some(7))));
        assert_eq!(parse_qemu_addr("0X1F"), Ok((0x1f, None)));
        assert_eq!(parse_qemu_addr("10"), Ok((0x10, None)));
        assert_eq!(parse_qemu_addr("00000005"), Ok((5, None)));
    }

    #[test]
    fn qemu_addr_bad() {
        for s in [
            "",
            ".",
            "5.",
            ".1",
            "0x",
            "0x.1",
            "5.0.0",
            "5 ",
            " 5",
            "5. 0",
            "-1",
            "+5",
            "g",
            "20",
            "5.8",
            "0x20",
            "1f.0x8",
            "5:0",
            "5,0",
            "ffffffffffff",
            "0x0x5",
        ] {
            assert!(parse_qemu_addr(s).is_err(), "{s:?} accepted");
        }
        assert_eq!(
            parse_qemu_addr("20"),
            Err(AddressError::DeviceOutOfRange(0x20))
        );
        assert_eq!(
            parse_qemu_addr("1.8"),
            Err(AddressError::FunctionOutOfRange(8))
        );
    }

    #[test]
    fn ecam() {
        let addr = a(1, 0x1f, 7);
        assert_eq!(addr.ecam_offset(), (1 << 20) | (0x1f << 15) | (7 << 12));
        assert_eq!(
            PciAddress::from_ecam_offset(addr.ecam_offset() + 0xffc),
            (addr, 0xffc)
        );
        // Bits above the 256-bus window are ignored, never panic.
        assert_eq!(
            PciAddress::from_ecam_offset(u64::MAX),
            (a(0xff, 0x1f, 7), 0xfff)
        );
    }

    #[test]
    fn config_address() {
        assert_eq!(PciAddress::from_config_address(0x0000_2810), None);
        let addr = a(0, 5, 0);
        let cf8 = addr.config_address(0x13);
        assert_eq!(cf8, 0x8000_2810);
        assert_eq!(PciAddress::from_config_address(cf8), Some((addr, 0x10)));
        // Reserved bits 30:24 and the low type bits are ignored.
        assert_eq!(
            PciAddress::from_config_address(0xff01_ffff),
            Some((a(1, 0x1f, 7), 0xfc))
        );
    }

    #[test]
    fn devfn() {
        let addr = a(0, 5, 3);
        assert_eq!(addr.devfn(), 0x2b);
        assert_eq!(PciAddress::from_devfn(0, 0x2b), addr);
    }
}
