//! The device drivers `--device` knows: their properties and how each device is built.
//!
//! To add a driver: a [`DriverInfo`] entry in [`DRIVERS`], a value check in [`check_prop`] for
//! each new property, and a case in [`build`]. Placement, ids, compat hints and the PCI
//! transport are the device manager's business ([`crate::device_manager`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use devices::virtio::blk::{Block, BlockConfig};
use devices::virtio::console::{Console, ConsoleBackend};
use devices::virtio::net::{default_mac, parse_mac, valid_ifname, Net, Tap};
use devices::virtio::rng::Rng;
use devices::virtio::VirtioDevice;

use crate::device_manager::{parse_bool, DeviceError};

/// A driver property.
#[derive(Debug, Clone, Copy)]
pub struct PropInfo {
    /// Name.
    pub name: &'static str,
    /// What it does, for `--help`.
    pub help: &'static str,
    /// Whether it shapes the guest-visible ABI (recorded and pinned by compat records).
    pub abi: bool,
}

/// A device driver we can realize.
#[derive(Debug, Clone, Copy)]
pub struct DriverInfo {
    /// QEMU's driver name.
    pub name: &'static str,
    /// One line for `--help`.
    pub help: &'static str,
    /// Its own properties (besides id, addr, multifunction, bus).
    pub props: &'static [PropInfo],
}

/// Properties every PCI device has.
pub const COMMON_PROPS: &[PropInfo] = &[
    PropInfo {
        name: "id",
        help: "stable device id (an identifier)",
        abi: false,
    },
    PropInfo {
        name: "addr",
        help: "PCI slot[.function] on bus 0, hex: 5, 05, 5.0, 0x5.0x1, 1f.7",
        abi: false,
    },
    PropInfo {
        name: "multifunction",
        help: "on|off: function 0 announces more functions in its slot",
        abi: true,
    },
    PropInfo {
        name: "bus",
        help: "pci.0 (the only bus)",
        abi: false,
    },
];

const VECTORS: PropInfo = PropInfo {
    name: "vectors",
    help: "number of MSI-X vectors (0: no MSI-X, the device interrupts through INTx; default 2)",
    abi: true,
};

/// Every driver.
pub const DRIVERS: &[DriverInfo] = &[
    DriverInfo {
        name: "virtio-rng-pci",
        help: "virtio entropy source (1af4:1044), fed by the host's getrandom",
        props: &[VECTORS],
    },
    DriverInfo {
        name: "virtio-blk-pci",
        help: "virtio block device (1af4:1042) over a raw image file",
        props: &[
            PropInfo {
                name: "file",
                help: "PATH of the raw disk image (required; opened when the VM starts)",
                abi: false,
            },
            PropInfo {
                name: "readonly",
                help: "on|off: the guest sees a read-only disk and writes fail (default off)",
                abi: true,
            },
            PropInfo {
                name: "serial",
                help: "STR returned by the get-id request (at most 20 bytes used)",
                abi: true,
            },
            VECTORS,
        ],
    },
    DriverInfo {
        name: "virtio-console-pci",
        help: "virtio console (1af4:1043), one port: the guest's /dev/hvc0",
        props: &[
            PropInfo {
                name: "path",
                help: "PATH: guest output is written to this file (created or truncated)",
                abi: false,
            },
            PropInfo {
                name: "socket",
                help: "PATH: the vmm listens on this unix socket (one client at a time: \
                       guest output to it, its input to the guest); give path= or socket=",
                abi: false,
            },
            VECTORS,
        ],
    },
    DriverInfo {
        name: "virtio-net-pci",
        help: "virtio network card (1af4:1041) on a host TAP interface",
        props: &[
            PropInfo {
                name: "tap",
                help: "NAME of the tap interface, opened or created (needs CAP_NET_ADMIN)",
                abi: false,
            },
            PropInfo {
                name: "mac",
                help: "MAC address xx:xx:xx:xx:xx:xx (default: 52:54:00 and a hash of the id)",
                abi: true,
            },
            VECTORS,
        ],
    },
];

/// The driver called `name`.
pub fn driver(name: &str) -> Option<&'static DriverInfo> {
    DRIVERS.iter().find(|d| d.name == name)
}

/// Parses a number the way QEMU's integer properties do (decimal, or hex with 0x).
pub(crate) fn parse_u16(driver: &str, prop: &str, v: &str, max: u16) -> Result<u16, DeviceError> {
    let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => v.parse::<u32>().ok(),
    };
    match n {
        Some(n) if n <= u32::from(max) => Ok(n as u16),
        _ => Err(DeviceError::BadValue {
            driver: driver.into(),
            prop: prop.into(),
            value: v.into(),
            reason: format!("expected a number from 0 to {max}"),
        }),
    }
}

/// Checks the value of a driver-specific property.
pub fn check_prop(driver: &str, prop: &str, v: &str) -> Result<(), DeviceError> {
    match prop {
        "vectors" => parse_u16(driver, prop, v, devices::virtio::pci::MAX_VECTORS).map(|_| ()),
        "readonly" => parse_bool(driver, prop, v).map(|_| ()),
        "file" | "path" | "socket" if v.is_empty() => Err(DeviceError::BadValue {
            driver: driver.into(),
            prop: prop.into(),
            value: v.into(),
            reason: "expected a file name".into(),
        }),
        "tap" if !valid_ifname(v) => Err(DeviceError::BadValue {
            driver: driver.into(),
            prop: prop.into(),
            value: v.into(),
            reason: "expected an interface name (1 to 15 characters, no '/')".into(),
        }),
        "mac" if parse_mac(v).is_none() => Err(DeviceError::BadValue {
            driver: driver.into(),
            prop: prop.into(),
            value: v.into(),
            reason: "expected a unicast MAC address such as 52:54:00:12:34:56".into(),
        }),
        _ => Ok(()),
    }
}

/// The MSI-X vector count of a device (`vectors=`, else the driver's default).
pub fn vectors(driver: &str, props: &BTreeMap<String, String>) -> u16 {
    props
        .get("vectors")
        .and_then(|v| parse_u16(driver, "vectors", v, u16::MAX).ok())
        .unwrap_or(DEFAULT_VECTORS)
}

/// MSI-X vectors when `vectors=` is not given.
pub const DEFAULT_VECTORS: u16 = 2;

fn flag(driver: &str, props: &BTreeMap<String, String>, name: &str) -> bool {
    props
        .get(name)
        .is_some_and(|v| parse_bool(driver, name, v).unwrap_or(false))
}

fn required<'a>(props: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, String> {
    props
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("'{name}' property is required"))
}

/// Builds the virtio device behind a `driver` with its (validated) properties. `id` is the
/// device's id (given or `device[N]`), from which defaults such as a MAC address derive.
pub fn build(
    driver: &str,
    props: &BTreeMap<String, String>,
    id: &str,
) -> Result<Arc<dyn VirtioDevice>, String> {
    match driver {
        "virtio-rng-pci" => Ok(Arc::new(Rng::new())),
        "virtio-blk-pci" => Ok(Arc::new(Block::new(&BlockConfig {
            path: required(props, "file")?.into(),
            readonly: flag(driver, props, "readonly"),
            serial: props.get("serial").cloned(),
        })?)),
        "virtio-console-pci" => {
            let backend = match (props.get("path"), props.get("socket")) {
                (Some(p), None) => ConsoleBackend::File(p.into()),
                (None, Some(s)) => ConsoleBackend::Socket(s.into()),
                _ => return Err("give exactly one of 'path' or 'socket'".into()),
            };
            Ok(Arc::new(Console::new(&backend)?))
        }
        "virtio-net-pci" => {
            let mac = props
                .get("mac")
                .and_then(|m| parse_mac(m))
                .unwrap_or_else(|| default_mac(id));
            let tap = Tap::open(required(props, "tap")?)?;
            Ok(Arc::new(Net::new(tap, mac)))
        }
        other => Err(format!("'{other}' is not a valid device model name")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(list: &[(&str, &str)]) -> BTreeMap<String, String> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn new_properties_are_checked() {
        let err = |d: &str, p: &str, v: &str| check_prop(d, p, v).unwrap_err().to_string();
        assert!(check_prop("virtio-blk-pci", "readonly", "on").is_ok());
        assert_eq!(
            err("virtio-blk-pci", "readonly", "maybe"),
            "Property 'virtio-blk-pci.readonly' can't take value 'maybe': expected 'on' or 'off'"
        );
        assert!(err("virtio-blk-pci", "file", "").contains("expected a file name"));
        assert!(check_prop("virtio-net-pci", "tap", "tap0").is_ok());
        assert!(err("virtio-net-pci", "tap", "a-very-long-interface").contains("interface name"));
        assert!(check_prop("virtio-net-pci", "mac", "52:54:00:ab:cd:ef").is_ok());
        assert!(err("virtio-net-pci", "mac", "ff:ff:ff:ff:ff:ff").contains("unicast MAC"));
        for d in ["virtio-blk-pci", "virtio-net-pci", "virtio-console-pci"] {
            let info = driver(d).unwrap();
            assert!(info.props.iter().any(|p| p.name == "vectors"), "{d}");
        }
    }

    #[test]
    fn build_checks_backends() {
        let e = |d: &str, p: &[(&str, &str)]| build(d, &props(p), "x").err().unwrap();
        assert_eq!(e("virtio-blk-pci", &[]), "'file' property is required");
        assert_eq!(
            e("virtio-blk-pci", &[("file", "/nonexistent/a.img")]),
            "Could not open '/nonexistent/a.img': No such file or directory"
        );
        assert_eq!(
            e("virtio-console-pci", &[]),
            "give exactly one of 'path' or 'socket'"
        );
        assert_eq!(
            e("virtio-console-pci", &[("path", "/a"), ("socket", "/b")]),
            "give exactly one of 'path' or 'socket'"
        );
        assert_eq!(e("virtio-net-pci", &[]), "'tap' property is required");
        let img = std::env::temp_dir().join(format!("drivers-test-{}.img", std::process::id()));
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let path = img.to_str().unwrap();
        let rw = build("virtio-blk-pci", &props(&[("file", path)]), "d0").unwrap();
        let ro = build(
            "virtio-blk-pci",
            &props(&[("file", path), ("readonly", "on")]),
            "d1",
        )
        .unwrap();
        let ro_bit = devices::virtio::blk::F_RO;
        assert_eq!(rw.features() & ro_bit, 0);
        assert_ne!(ro.features() & ro_bit, 0);
        let mut cap = [0u8; 8];
        rw.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        std::fs::remove_file(img).unwrap();
    }
}
