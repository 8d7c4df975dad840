//! The device drivers `--device` knows: their names, properties and defaults (a table that
//! imports nothing of the crate: the option parser and the device manager read it).
//!
//! To add a driver: a [`DriverInfo`] entry in [`DRIVERS`], a typed config and the parsing of
//! each new property in `device_config.rs` (`parse_prop`, `DriverConfig`), and a case in
//! `device_manager.rs`'s `build_device`.

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
        help: "PCI slot[.function] on its bus, hex: 5, 05, 5.0, 0x5.0x1, 1f.7",
        abi: false,
    },
    PropInfo {
        name: "multifunction",
        help: "on|off: function 0 announces more functions in its slot",
        abi: true,
    },
    PropInfo {
        name: "bus",
        help: "pci.0 (the root bus, default) or the id of a pci-bridge",
        abi: false,
    },
];

const VECTORS: PropInfo = PropInfo {
    name: "vectors",
    help: "number of MSI-X vectors (0: no MSI-X, the device interrupts through INTx; default 2)",
    abi: true,
};

/// QEMU's PCI-to-PCI bridge.
pub const PCI_BRIDGE: &str = "pci-bridge";

/// Every driver.
pub const DRIVERS: &[DriverInfo] = &[
    DriverInfo {
        name: PCI_BRIDGE,
        help: "PCI-to-PCI bridge (1b36:0001) with a bus of 32 slots behind it, named by its id \
               (devices go there with bus=ID); bus numbers and windows are set at start-up",
        props: &[PropInfo {
            name: "chassis_nr",
            help: "chassis number, 1-255, unique per machine (required, as in QEMU)",
            abi: true,
        }],
    },
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

/// MSI-X vectors when `vectors=` is not given.
pub const DEFAULT_VECTORS: u16 = 2;
