//! The device drivers `--device` knows: their properties and how each device is built.
//!
//! To add a driver: a [`DriverInfo`] entry in [`DRIVERS`], a typed config and the parsing of
//! each new property in [`crate::device_config`] ([`crate::device_config::parse_prop`],
//! [`crate::device_config::DriverConfig`]), and a case in [`build`]. Placement, ids, compat
//! hints and the PCI transport are the device manager's business ([`crate::device_manager`]).

use std::sync::Arc;

use devices::virtio::blk::{Block, BlockConfig};
use devices::virtio::console::Console;
use devices::virtio::net::{default_mac, Net, Tap};
use devices::virtio::rng::Rng;
use devices::virtio::VirtioDevice;

use crate::device_config::{parse_prop, DriverConfig, RawValue};
use crate::device_manager::DeviceError;

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

/// Checks the text value of a driver-specific property (`--global`).
pub fn check_prop(driver: &str, prop: &str, v: &str) -> Result<(), DeviceError> {
    parse_prop(driver, prop, RawValue::Text(v)).map(|_| ())
}

/// MSI-X vectors when `vectors=` is not given.
pub const DEFAULT_VECTORS: u16 = 2;

/// Builds the virtio device for a config. `id` is the device's id (given or `device[N]`), from
/// which defaults such as a MAC address derive.
pub fn build(config: &DriverConfig, id: &str) -> Result<Arc<dyn VirtioDevice>, String> {
    match config {
        DriverConfig::Rng(_) => Ok(Arc::new(Rng::new())),
        DriverConfig::Blk(c) => Ok(Arc::new(Block::new(&BlockConfig {
            path: c.file.clone(),
            readonly: c.readonly.unwrap_or(false),
            serial: c.serial.clone(),
        })?)),
        DriverConfig::Console(c) => Ok(Arc::new(Console::new(&c.backend)?)),
        DriverConfig::Net(c) => {
            let mac = c.mac.map_or_else(|| default_mac(id), |m| m.0);
            let tap = Tap::open(&c.tap)?;
            Ok(Arc::new(Net::new(tap, mac)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn config(s: &str) -> DriverConfig {
        crate::device_config::parse_device(s).unwrap().config
    }

    #[test]
    fn build_checks_backends() {
        let e = |s: &str| build(&config(s), "x").err().unwrap();
        assert_eq!(
            e("virtio-blk-pci,file=/nonexistent/a.img"),
            "Could not open '/nonexistent/a.img': No such file or directory"
        );
        assert_eq!(
            e("virtio-console-pci,path=/nonexistent/dir/o"),
            "Could not open '/nonexistent/dir/o': No such file or directory"
        );
        let dir = std::env::temp_dir().join(format!("drivers-test-{},x", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A comma in the path: escaped in the option, a plain comma in the file name opened.
        let img = dir.join("a,b.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let path = img.to_str().unwrap().replace(',', ",,");
        let rw = build(&config(&format!("virtio-blk-pci,file={path}")), "d0").unwrap();
        let ro = build(
            &config(&format!("virtio-blk-pci,file={path},readonly=on")),
            "d1",
        )
        .unwrap();
        let ro_bit = devices::virtio::blk::F_RO;
        assert_eq!(rw.features() & ro_bit, 0);
        assert_ne!(ro.features() & ro_bit, 0);
        let mut cap = [0u8; 8];
        rw.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
