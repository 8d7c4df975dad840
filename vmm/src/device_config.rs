//! Device configuration, parsed once: one typed config per driver ([`DriverConfig`]) inside a
//! [`DeviceSpec`] with the properties every PCI device has.
//!
//! Three front ends give the same result:
//! - `--device` text ([`parse_device`]) with QEMU's escaping: `,,` inside a value is a literal
//!   comma (`file=/tmp/a,,b.img` is the path `/tmp/a,b.img`), a bare `key` means `key=on`;
//! - QMP `device_add` arguments ([`DeviceSpec::from_qmp`]), which keep their JSON types: an
//!   integer property takes `4` or `"4"`, a boolean `true` or `"on"`, as in QEMU; other types
//!   are refused with QEMU's `Invalid parameter type for 'P', expected: T`;
//! - machine-file entries ([`DeviceSpec::from_entry`]): the same JSON values as QMP.
//!
//! Every consumer then reads typed fields; nothing is joined back into `driver,k=v` text and
//! split again. The way back out: [`DeviceSpec::to_option`] (escaped `--device` text, for
//! messages and the fuzzer's round trip) and [`DeviceSpec::props_json`] (typed JSON, for the
//! machine description).
//!
//! Properties whose value shapes the guest-visible ABI (`vectors`, `readonly`, `serial`,
//! `mac`) are `Option`s: "not given" must stay distinguishable from the default, because a
//! compat record or `--global` may fill it in ([`crate::compat::resolve_props`]).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;

use devices::virtio::console::ConsoleBackend;
use devices::virtio::net::{parse_mac, valid_ifname};
use pci::parse_qemu_addr;
use serde_json::{Map, Value};

use crate::drivers::{driver, DriverInfo, DEFAULT_VECTORS};

/// Errors in device options and placement. Texts follow QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Unknown driver.
    #[error("'{0}' is not a valid device model name")]
    UnknownDriver(String),
    /// Unknown property.
    #[error("Property '{driver}.{prop}' not found")]
    UnknownProperty {
        /// Driver.
        driver: String,
        /// Property.
        prop: String,
    },
    /// A property value that does not parse.
    #[error("Property '{driver}.{prop}' can't take value '{value}': {reason}")]
    BadValue {
        /// Driver.
        driver: String,
        /// Property.
        prop: String,
        /// The value given.
        value: String,
        /// Why not.
        reason: String,
    },
    /// The same id twice.
    #[error("Duplicate ID '{0}' for device")]
    DuplicateId(String),
    /// An id that is not an identifier.
    #[error("Parameter 'id' expects an identifier")]
    BadId,
    /// A bus that is neither pci.0 nor a bridge's (QEMU's text, also for `bus=` naming a
    /// device that is not a bridge, or a bridge put behind itself).
    #[error("Bus '{0}' not found")]
    NoBus(String),
    /// A bus that does not take hot-plugged devices (QEMU's text).
    #[error("Bus '{0}' does not support hotplugging")]
    NoHotplugBus(String),
    /// A pci-bridge without a chassis number, or chassis 0 (QEMU's text).
    #[error("Bridge chassis not specified. Each bridge is required to be assigned a unique chassis id > 0.")]
    NoChassis,
    /// Two bridges with one chassis number.
    #[error("Bridge chassis {chassis} is already used by '{holder}'. Each bridge is required to be assigned a unique chassis id > 0.")]
    DuplicateChassis {
        /// The chassis number.
        chassis: u8,
        /// The id of the bridge that has it.
        holder: String,
    },
    /// More bridges than bus numbers.
    #[error(
        "PCI: no bus number left for pci-bridge,id={0}: a machine has at most 256 buses (0-255)"
    )]
    TooManyBuses(String),
    /// Bridges are set up before the guest runs only (bus numbers, windows, ECAM).
    #[error("{0}: PCI bridges can only be added before the guest runs (--device, a machine file, or device_add before the first cont) and are not removed")]
    BridgeNotPluggable(String),
    /// Function 0 of a slot whose other functions stay.
    #[error("PCI: function 0 of slot {slot:x} cannot be removed while {slot:x}.{function:x} is populated")]
    Function0Busy {
        /// The slot.
        slot: u8,
        /// A populated function above 0.
        function: u8,
    },
    /// No device with that id.
    #[error("Device '{0}' not found")]
    NotFound(String),
    /// A malformed `--global`.
    #[error("Invalid --global '{0}': expected DRIVER.PROP=VALUE")]
    BadGlobal(String),
    /// A property given twice in one --device.
    #[error("Parameter '{0}' given more than once")]
    RepeatedProperty(String),
    /// A required parameter (QMP `driver`) is missing.
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    /// A QMP / machine-file value of the wrong JSON type.
    #[error("Invalid parameter type for '{prop}', expected: {expected}")]
    InvalidType {
        /// Property.
        prop: String,
        /// The JSON type it takes: `string`, `integer`, `boolean`.
        expected: &'static str,
    },
    /// A device whose driver lacks a required property or backend.
    #[error("{device}: {reason}")]
    Incomplete {
        /// Its id, or the driver when it has none.
        device: String,
        /// What is missing.
        reason: String,
    },
    /// The slot allocator refused.
    #[error("{0}")]
    Slot(#[from] pci::SlotError),
    /// BARs do not fit in the PCI window.
    #[error("PCI: no room for BAR {bar} of {device} in the 32-bit PCI window")]
    NoBarSpace {
        /// Device id.
        device: String,
        /// BAR index.
        bar: usize,
    },
    /// The device could not be built.
    #[error("{id}: {reason}")]
    Realize {
        /// Device id.
        id: String,
        /// What failed.
        reason: String,
    },
}

/// Checks the text value of a driver-specific property (`--global`).
pub fn check_prop(driver: &str, prop: &str, v: &str) -> Result<(), DeviceError> {
    parse_prop(driver, prop, RawValue::Text(v)).map(|_| ())
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// `virtio-rng-pci`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RngConfig {
    /// `vectors=`: MSI-X vectors.
    pub vectors: Option<u16>,
}

/// `virtio-blk-pci`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// `file=`: the raw image (required).
    pub file: PathBuf,
    /// `readonly=`.
    pub readonly: Option<bool>,
    /// `serial=`: what get-id returns.
    pub serial: Option<String>,
    /// `vectors=`.
    pub vectors: Option<u16>,
}

/// `virtio-net-pci`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// `tap=`: the host interface (required).
    pub tap: String,
    /// `mac=`; the default derives from the device id.
    pub mac: Option<MacAddr>,
    /// `vectors=`.
    pub vectors: Option<u16>,
}

/// `virtio-console-pci`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// `path=` (a file) or `socket=` (a unix socket the VMM listens on): exactly one.
    pub backend: ConsoleBackend,
    /// `vectors=`.
    pub vectors: Option<u16>,
}

/// `pci-bridge`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// `chassis_nr=`: 1..=255, required.
    pub chassis_nr: u8,
}

/// The driver and its own properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverConfig {
    /// `pci-bridge`.
    Bridge(BridgeConfig),
    /// `virtio-rng-pci`.
    Rng(RngConfig),
    /// `virtio-blk-pci`.
    Blk(BlkConfig),
    /// `virtio-net-pci`.
    Net(NetConfig),
    /// `virtio-console-pci`.
    Console(ConsoleConfig),
}

/// One device: the properties every PCI device has, and its driver's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// `id=`, if given.
    pub id: Option<String>,
    /// `addr=`: slot and optional function.
    pub addr: Option<(u8, Option<u8>)>,
    /// `multifunction=`.
    pub multifunction: bool,
    /// `bus=`: `pci.0` or a bridge's id, checked when the device is placed; `None` when not
    /// given (the root bus, unless a compat record puts the device elsewhere).
    pub bus: Option<String>,
    /// The driver and its properties.
    pub config: DriverConfig,
}

/// A property value as a front end gives it.
#[derive(Debug, Clone, Copy)]
pub enum RawValue<'a> {
    /// From `--device` text (or `--global`, or a compat record): parsed like QEMU's QemuOpts.
    Text(&'a str),
    /// From QMP or a machine file: a JSON value; strings are parsed as text.
    Json(&'a Value),
}

/// A typed value of a driver property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropValue {
    /// An integer property (`vectors`).
    U16(u16),
    /// A boolean property (`readonly`).
    Bool(bool),
    /// A string property (`serial`, `tap`).
    Str(String),
    /// A file name (`file`, `path`, `socket`).
    Path(PathBuf),
    /// A MAC address (`mac`).
    Mac(MacAddr),
}

impl PropValue {
    /// The value as `--device` text (unescaped): integers in decimal, booleans `on`/`off`.
    pub fn to_text(&self) -> String {
        match self {
            PropValue::U16(n) => n.to_string(),
            PropValue::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            PropValue::Str(s) => s.clone(),
            PropValue::Path(p) => p.to_string_lossy().into_owned(),
            PropValue::Mac(m) => m.to_string(),
        }
    }

    /// The value as JSON: integers as numbers, booleans as `true`/`false`, the rest strings.
    pub fn to_json(&self) -> Value {
        match self {
            PropValue::U16(n) => Value::from(*n),
            PropValue::Bool(b) => Value::Bool(*b),
            other => Value::String(other.to_text()),
        }
    }
}

fn type_error(prop: &str, expected: &'static str) -> DeviceError {
    DeviceError::InvalidType {
        prop: prop.to_string(),
        expected,
    }
}

fn bad_value(driver: &str, prop: &str, value: &str, reason: impl Into<String>) -> DeviceError {
    DeviceError::BadValue {
        driver: driver.into(),
        prop: prop.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// The text of a string-typed value (a JSON string, or text).
fn as_str<'a>(prop: &str, v: RawValue<'a>) -> Result<&'a str, DeviceError> {
    match v {
        RawValue::Text(s) => Ok(s),
        RawValue::Json(Value::String(s)) => Ok(s),
        RawValue::Json(_) => Err(type_error(prop, "string")),
    }
}

/// Parses an on/off value (`on|yes|true`, `off|no|false`; JSON `true`/`false` too).
pub fn parse_bool(driver: &str, prop: &str, v: RawValue<'_>) -> Result<bool, DeviceError> {
    let text = match v {
        RawValue::Json(Value::Bool(b)) => return Ok(*b),
        RawValue::Json(Value::String(s)) => s.as_str(),
        RawValue::Text(s) => s,
        RawValue::Json(_) => return Err(type_error(prop, "boolean")),
    };
    match text {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(bad_value(driver, prop, text, "expected 'on' or 'off'")),
    }
}

/// Parses a number the way QEMU's integer properties do: decimal or `0x` hex text, or a JSON
/// integer, from 0 to `max`.
pub fn parse_u16(driver: &str, prop: &str, v: RawValue<'_>, max: u16) -> Result<u16, DeviceError> {
    let range = |value: &str| {
        bad_value(
            driver,
            prop,
            value,
            format!("expected a number from 0 to {max}"),
        )
    };
    let text = match v {
        RawValue::Json(Value::Number(n)) => {
            return match n.as_u64() {
                Some(n) if n <= u64::from(max) => Ok(n as u16),
                Some(_) => Err(range(&n.to_string())),
                // Negative or fractional.
                None if n.is_i64() => Err(range(&n.to_string())),
                None => Err(type_error(prop, "integer")),
            };
        }
        RawValue::Json(Value::String(s)) => s.as_str(),
        RawValue::Text(s) => s,
        RawValue::Json(_) => return Err(type_error(prop, "integer")),
    };
    let n = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => text.parse::<u32>().ok(),
    };
    match n {
        Some(n) if n <= u32::from(max) => Ok(n as u16),
        _ => Err(range(text)),
    }
}

/// Parses and checks the value of the driver property `prop` (one of `driver`'s).
pub fn parse_prop(driver: &str, prop: &str, v: RawValue<'_>) -> Result<PropValue, DeviceError> {
    match prop {
        "vectors" => {
            parse_u16(driver, prop, v, devices::virtio::pci::MAX_VECTORS).map(PropValue::U16)
        }
        "chassis_nr" => parse_u16(driver, prop, v, 255).map(PropValue::U16),
        "readonly" => parse_bool(driver, prop, v).map(PropValue::Bool),
        "file" | "path" | "socket" => match as_str(prop, v)? {
            "" => Err(bad_value(driver, prop, "", "expected a file name")),
            s => Ok(PropValue::Path(s.into())),
        },
        "tap" => match as_str(prop, v)? {
            s if valid_ifname(s) => Ok(PropValue::Str(s.into())),
            s => Err(bad_value(
                driver,
                prop,
                s,
                "expected an interface name (1 to 15 characters, no '/')",
            )),
        },
        "mac" => {
            let s = as_str(prop, v)?;
            parse_mac(s)
                .map(|m| PropValue::Mac(MacAddr(m)))
                .ok_or_else(|| {
                    bad_value(
                        driver,
                        prop,
                        s,
                        "expected a unicast MAC address such as 52:54:00:12:34:56",
                    )
                })
        }
        _ => as_str(prop, v).map(|s| PropValue::Str(s.into())),
    }
}

fn valid_id(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '-' | '.' | '_'))
}

/// `addr=`: `SS[.F]` in QEMU's forms, or (JSON) a devfn number as QEMU takes it.
fn parse_addr(driver: &str, v: RawValue<'_>) -> Result<(u8, Option<u8>), DeviceError> {
    let text = match v {
        RawValue::Json(Value::Number(n)) => {
            return match n.as_u64() {
                Some(devfn) if devfn < 256 => Ok(((devfn >> 3) as u8, Some((devfn & 7) as u8))),
                _ => Err(bad_value(
                    driver,
                    "addr",
                    &n.to_string(),
                    "invalid PCI address",
                )),
            }
        }
        RawValue::Json(Value::String(s)) => s.as_str(),
        RawValue::Text(s) => s,
        RawValue::Json(_) => return Err(type_error("addr", "string")),
    };
    // The lspci form of bus 0 too (machine files written by older builds use it): 00:05.0.
    let text_addr = text.strip_prefix("00:").unwrap_or(text);
    parse_qemu_addr(text_addr).map_err(|_| bad_value(driver, "addr", text, "invalid PCI address"))
}

impl DriverConfig {
    /// The driver's name, e.g. `virtio-blk-pci`.
    pub fn driver(&self) -> &'static str {
        match self {
            DriverConfig::Bridge(_) => crate::drivers::PCI_BRIDGE,
            DriverConfig::Rng(_) => "virtio-rng-pci",
            DriverConfig::Blk(_) => "virtio-blk-pci",
            DriverConfig::Net(_) => "virtio-net-pci",
            DriverConfig::Console(_) => "virtio-console-pci",
        }
    }

    /// The driver's table entry (properties, help).
    pub fn info(&self) -> &'static DriverInfo {
        driver(self.driver()).expect("every DriverConfig has a DRIVERS entry")
    }

    /// `vectors=` if given.
    pub fn vectors(&self) -> Option<u16> {
        match self {
            DriverConfig::Bridge(_) => None,
            DriverConfig::Rng(c) => c.vectors,
            DriverConfig::Blk(c) => c.vectors,
            DriverConfig::Net(c) => c.vectors,
            DriverConfig::Console(c) => c.vectors,
        }
    }

    /// The MSI-X vector count the device gets (`vectors=`, else the default).
    pub fn effective_vectors(&self) -> u16 {
        self.vectors().unwrap_or(DEFAULT_VECTORS)
    }

    /// Builds the config of driver `info` from its parsed properties; `who` names the device
    /// in errors (its id, else the driver).
    fn from_props(
        info: &DriverInfo,
        mut p: BTreeMap<&'static str, PropValue>,
        who: &str,
    ) -> Result<Self, DeviceError> {
        let missing = |name: &str| DeviceError::Incomplete {
            device: who.to_string(),
            reason: format!("'{name}' property is required"),
        };
        let mut take = |name: &str| p.remove(name);
        let vectors = match take("vectors") {
            Some(PropValue::U16(n)) => Some(n),
            _ => None,
        };
        Ok(match info.name {
            crate::drivers::PCI_BRIDGE => match take("chassis_nr") {
                Some(PropValue::U16(n)) if (1..=255).contains(&n) => {
                    DriverConfig::Bridge(BridgeConfig {
                        chassis_nr: n as u8,
                    })
                }
                _ => return Err(DeviceError::NoChassis),
            },
            "virtio-rng-pci" => DriverConfig::Rng(RngConfig { vectors }),
            "virtio-blk-pci" => DriverConfig::Blk(BlkConfig {
                file: match take("file") {
                    Some(PropValue::Path(f)) => f,
                    _ => return Err(missing("file")),
                },
                readonly: match take("readonly") {
                    Some(PropValue::Bool(b)) => Some(b),
                    _ => None,
                },
                serial: match take("serial") {
                    Some(PropValue::Str(s)) => Some(s),
                    _ => None,
                },
                vectors,
            }),
            "virtio-net-pci" => DriverConfig::Net(NetConfig {
                tap: match take("tap") {
                    Some(PropValue::Str(t)) => t,
                    _ => return Err(missing("tap")),
                },
                mac: match take("mac") {
                    Some(PropValue::Mac(m)) => Some(m),
                    _ => None,
                },
                vectors,
            }),
            "virtio-console-pci" => {
                let backend = match (take("path"), take("socket")) {
                    (Some(PropValue::Path(p)), None) => ConsoleBackend::File(p),
                    (None, Some(PropValue::Path(s))) => ConsoleBackend::Socket(s),
                    _ => {
                        return Err(DeviceError::Incomplete {
                            device: who.to_string(),
                            reason: "give exactly one of 'path' or 'socket'".into(),
                        })
                    }
                };
                DriverConfig::Console(ConsoleConfig { backend, vectors })
            }
            other => return Err(DeviceError::UnknownDriver(other.to_string())),
        })
    }

    /// The properties that are set, in the driver table's order.
    pub fn props(&self) -> Vec<(&'static str, PropValue)> {
        let mut out = Vec::new();
        let mut put = |name: &'static str, v: Option<PropValue>| {
            if let Some(v) = v {
                out.push((name, v));
            }
        };
        match self {
            DriverConfig::Bridge(c) => put("chassis_nr", Some(PropValue::U16(c.chassis_nr.into()))),
            DriverConfig::Rng(_) => {}
            DriverConfig::Blk(c) => {
                put("file", Some(PropValue::Path(c.file.clone())));
                put("readonly", c.readonly.map(PropValue::Bool));
                put("serial", c.serial.clone().map(PropValue::Str));
            }
            DriverConfig::Net(c) => {
                put("tap", Some(PropValue::Str(c.tap.clone())));
                put("mac", c.mac.map(PropValue::Mac));
            }
            DriverConfig::Console(c) => match &c.backend {
                ConsoleBackend::File(p) => put("path", Some(PropValue::Path(p.clone()))),
                ConsoleBackend::Socket(p) => put("socket", Some(PropValue::Path(p.clone()))),
            },
        }
        put("vectors", self.vectors().map(PropValue::U16));
        out
    }

    /// The value of property `name`, if set.
    pub fn get(&self, name: &str) -> Option<PropValue> {
        self.props()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    /// Sets an optional (ABI-shaping) property; returns whether this driver has it with that
    /// type. Required properties (`file`, `tap`, the console backend) are not changed here.
    pub fn set(&mut self, name: &str, value: PropValue) -> bool {
        match (self, name, value) {
            (DriverConfig::Rng(c), "vectors", PropValue::U16(n)) => c.vectors = Some(n),
            (DriverConfig::Blk(c), "vectors", PropValue::U16(n)) => c.vectors = Some(n),
            (DriverConfig::Net(c), "vectors", PropValue::U16(n)) => c.vectors = Some(n),
            (DriverConfig::Console(c), "vectors", PropValue::U16(n)) => c.vectors = Some(n),
            (DriverConfig::Blk(c), "readonly", PropValue::Bool(b)) => c.readonly = Some(b),
            (DriverConfig::Blk(c), "serial", PropValue::Str(s)) => c.serial = Some(s),
            (DriverConfig::Net(c), "mac", PropValue::Mac(m)) => c.mac = Some(m),
            _ => return false,
        }
        true
    }
}

/// QEMU's name of the root bus.
pub const ROOT_BUS: &str = "pci.0";

/// Escapes a `--device` value: a comma is doubled.
fn escape(s: &str) -> String {
    s.replace(',', ",,")
}

impl DeviceSpec {
    /// The driver's name.
    pub fn driver(&self) -> &'static str {
        self.config.driver()
    }

    /// Whether this is a PCI-to-PCI bridge.
    pub fn is_bridge(&self) -> bool {
        matches!(self.config, DriverConfig::Bridge(_))
    }

    /// The bus it goes on: `bus=`, else `pci.0`.
    pub fn bus_name(&self) -> &str {
        self.bus.as_deref().unwrap_or(ROOT_BUS)
    }

    /// Builds a spec of `driver` from its properties, as any front end gives them: `id`,
    /// `addr`, `multifunction`, `bus` and the driver's own. Each property may appear once.
    pub fn from_props<'a>(
        driver_name: &str,
        props: impl IntoIterator<Item = (&'a str, RawValue<'a>)>,
    ) -> Result<Self, DeviceError> {
        let info = driver(driver_name)
            .ok_or_else(|| DeviceError::UnknownDriver(driver_name.to_string()))?;
        let mut id = None;
        let mut addr = None;
        let mut multifunction = false;
        let mut bus = None;
        let mut typed = BTreeMap::new();
        let mut seen = HashSet::new();
        for (k, v) in props {
            if !seen.insert(k) {
                return Err(DeviceError::RepeatedProperty(k.to_string()));
            }
            match k {
                "id" => {
                    let s = as_str(k, v)?;
                    if !valid_id(s) {
                        return Err(DeviceError::BadId);
                    }
                    id = Some(s.to_string());
                }
                "addr" => addr = Some(parse_addr(info.name, v)?),
                "multifunction" => multifunction = parse_bool(info.name, k, v)?,
                "bus" => match as_str(k, v)? {
                    "" => return Err(DeviceError::NoBus(String::new())),
                    name => bus = Some(name.to_string()),
                },
                _ => {
                    let p = info.props.iter().find(|p| p.name == k).ok_or_else(|| {
                        DeviceError::UnknownProperty {
                            driver: info.name.into(),
                            prop: k.into(),
                        }
                    })?;
                    typed.insert(p.name, parse_prop(info.name, p.name, v)?);
                }
            }
        }
        let config = DriverConfig::from_props(info, typed, id.as_deref().unwrap_or(info.name))?;
        Ok(DeviceSpec {
            id,
            addr,
            multifunction,
            bus,
            config,
        })
    }

    /// This spec with every ABI-shaping driver property it leaves unset filled in from `abi`,
    /// the realized device's values (`Realized::abi`, strings as in the compat record): what
    /// the machine description writes, so a dump fed back pins the defaults too.
    pub fn with_abi(&self, abi: &BTreeMap<String, String>) -> DeviceSpec {
        let mut spec = self.clone();
        let info = spec.config.info();
        for p in info.props.iter().filter(|p| p.abi) {
            if let (None, Some(v)) = (spec.config.get(p.name), abi.get(p.name)) {
                if let Ok(v) = parse_prop(info.name, p.name, RawValue::Text(v)) {
                    spec.config.set(p.name, v);
                }
            }
        }
        spec
    }

    /// QMP `device_add` arguments: `driver` (a string, required) and the properties, each a
    /// JSON value of its type or a string.
    pub fn from_qmp(args: &Map<String, Value>) -> Result<Self, DeviceError> {
        let name = match args.get("driver") {
            None => return Err(DeviceError::Missing("driver".into())),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(type_error("driver", "string")),
        };
        Self::from_props(
            name,
            args.iter()
                .filter(|(k, _)| *k != "driver")
                .map(|(k, v)| (k.as_str(), RawValue::Json(v))),
        )
    }

    /// The `--device` text for this spec (values escaped): [`parse_device`] gives it back.
    pub fn to_option(&self) -> String {
        let mut s = self.driver().to_string();
        if let Some(id) = &self.id {
            s += &format!(",id={}", escape(id));
        }
        if let Some(bus) = &self.bus {
            s += &format!(",bus={}", escape(bus));
        }
        match self.addr {
            Some((slot, None)) => s += &format!(",addr={slot:02x}"),
            Some((slot, Some(f))) => s += &format!(",addr={slot:02x}.{f}"),
            None => {}
        }
        if self.multifunction {
            s += ",multifunction=on";
        }
        for (k, v) in self.config.props() {
            s += &format!(",{k}={}", escape(&v.to_text()));
        }
        s
    }

    /// The driver's properties that are set, as typed JSON (`"vectors": 2`, `"readonly":
    /// true`, `"file": "/a,b.img"`).
    pub fn props_json(&self) -> Map<String, Value> {
        self.config
            .props()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_json()))
            .collect()
    }
}

/// Parses `--device DRIVER[,id=ID][,addr=SS[.F]][,multifunction=on|off][,bus=pci.0]
/// [,PROP=VALUE...]` (also `driver=DRIVER,...`). `,,` in a value is a comma; a bare `PROP`
/// means `PROP=on`.
pub fn parse_device(s: &str) -> Result<DeviceSpec, DeviceError> {
    // QemuOpts splitting: `,,` stands for a literal comma (the same rule as `--qmp`).
    let parts = crate::monitor::option::split_opts(s);
    let first = parts.first().map(String::as_str).unwrap_or_default();
    let name = first.strip_prefix("driver=").unwrap_or(first);
    let kvs: Vec<(&str, &str)> = parts[1..]
        .iter()
        .map(|kv| kv.split_once('=').unwrap_or((kv.as_str(), "on")))
        .collect();
    DeviceSpec::from_props(name, kvs.into_iter().map(|(k, v)| (k, RawValue::Text(v))))
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
            let info = crate::drivers::driver(d).unwrap();
            assert!(info.props.iter().any(|p| p.name == "vectors"), "{d}");
        }
    }

    use serde_json::json;

    fn qmp(v: Value) -> Result<DeviceSpec, String> {
        DeviceSpec::from_qmp(v.as_object().unwrap()).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_qemu_device_syntax() {
        let s = parse_device(
            "virtio-rng-pci,id=rng0,addr=0x5.0x1,multifunction=on,bus=pci.0,vectors=4",
        )
        .unwrap();
        assert_eq!(s.driver(), "virtio-rng-pci");
        assert_eq!(s.id.as_deref(), Some("rng0"));
        assert_eq!(s.addr, Some((5, Some(1))));
        assert!(s.multifunction);
        assert_eq!(s.config, DriverConfig::Rng(RngConfig { vectors: Some(4) }));
        assert_eq!(
            parse_device("driver=virtio-rng-pci").unwrap().driver(),
            "virtio-rng-pci"
        );
    }

    #[test]
    fn bridges_and_buses() {
        let b = parse_device("pci-bridge,id=br1,chassis_nr=3,addr=1e.0").unwrap();
        assert!(b.is_bridge());
        assert_eq!(
            b.config,
            DriverConfig::Bridge(BridgeConfig { chassis_nr: 3 })
        );
        assert_eq!(b.bus_name(), "pci.0");
        assert_eq!(b.to_option(), "pci-bridge,id=br1,addr=1e.0,chassis_nr=3");
        let d = parse_device("virtio-rng-pci,id=r,bus=br1,addr=1.0").unwrap();
        assert_eq!(
            (d.bus.as_deref(), d.addr),
            (Some("br1"), Some((1, Some(0))))
        );
        assert_eq!(d.to_option(), "virtio-rng-pci,id=r,bus=br1,addr=01.0");
        assert_eq!(parse_device(&d.to_option()).unwrap(), d);
        let q = qmp(json!({"driver": "pci-bridge", "id": "b2", "chassis_nr": 2, "bus": "br1"}))
            .unwrap();
        assert_eq!(q.bus_name(), "br1");
    }

    #[test]
    fn a_doubled_comma_is_a_comma_in_the_value() {
        let s =
            parse_device("virtio-blk-pci,id=d0,file=/tmp/x/a,,b.img,serial=s,,1,readonly").unwrap();
        assert_eq!(
            s.config,
            DriverConfig::Blk(BlkConfig {
                file: "/tmp/x/a,b.img".into(),
                readonly: Some(true),
                serial: Some("s,1".into()),
                vectors: None,
            })
        );
        assert_eq!(
            s.to_option(),
            "virtio-blk-pci,id=d0,file=/tmp/x/a,,b.img,readonly=on,serial=s,,1"
        );
        assert_eq!(parse_device(&s.to_option()).unwrap(), s);
        assert_eq!(
            s.props_json(),
            *json!({"file": "/tmp/x/a,b.img", "readonly": true, "serial": "s,1"})
                .as_object()
                .unwrap()
        );
        // A single comma still separates: "b.img" is then an unknown property.
        assert_eq!(
            parse_device("virtio-blk-pci,file=/tmp/a,b.img")
                .unwrap_err()
                .to_string(),
            "Property 'virtio-blk-pci.b.img' not found"
        );
    }

    #[test]
    fn every_driver_has_a_typed_config() {
        let net =
            parse_device("virtio-net-pci,tap=tap0,mac=52:54:00:ab:cd:ef,vectors=0x3").unwrap();
        assert_eq!(
            net.config,
            DriverConfig::Net(NetConfig {
                tap: "tap0".into(),
                mac: Some(MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0xef])),
                vectors: Some(3),
            })
        );
        let con = parse_device("virtio-console-pci,socket=/tmp/c.sock").unwrap();
        assert_eq!(
            con.config,
            DriverConfig::Console(ConsoleConfig {
                backend: ConsoleBackend::Socket("/tmp/c.sock".into()),
                vectors: None,
            })
        );
        for s in [
            "virtio-net-pci,tap=tap0,mac=52:54:00:ab:cd:ef,vectors=3",
            "virtio-console-pci,id=c,socket=/tmp/c.sock",
            "virtio-console-pci,path=/tmp/o,,ut",
            "virtio-rng-pci,addr=06.1",
        ] {
            let spec = parse_device(s).unwrap();
            assert_eq!(spec.to_option(), s);
        }
    }

    #[test]
    fn required_properties_and_backends() {
        let err = |s: &str| parse_device(s).unwrap_err().to_string();
        assert_eq!(
            err("virtio-blk-pci,id=d0"),
            "d0: 'file' property is required"
        );
        assert_eq!(
            err("virtio-blk-pci"),
            "virtio-blk-pci: 'file' property is required"
        );
        assert_eq!(err("virtio-net-pci,id=n"), "n: 'tap' property is required");
        assert_eq!(
            err("virtio-console-pci,id=c0"),
            "c0: give exactly one of 'path' or 'socket'"
        );
        assert_eq!(
            err("virtio-console-pci,id=c0,path=/a,socket=/b"),
            "c0: give exactly one of 'path' or 'socket'"
        );
    }

    #[test]
    fn bad_device_options_have_qemu_messages() {
        let err = |s: &str| parse_device(s).unwrap_err().to_string();
        assert_eq!(
            err("virtio-rng-pci,addr=zz"),
            "Property 'virtio-rng-pci.addr' can't take value 'zz': invalid PCI address"
        );
        assert_eq!(
            err("virtio-rng-pci,addr=20"),
            "Property 'virtio-rng-pci.addr' can't take value '20': invalid PCI address"
        );
        assert_eq!(
            err("virtio-rng-pci,foo=1"),
            "Property 'virtio-rng-pci.foo' not found"
        );
        assert_eq!(
            err("nosuch-pci"),
            "'nosuch-pci' is not a valid device model name"
        );
        assert_eq!(err("virtio-rng-pci,bus="), "Bus '' not found");
        assert_eq!(
            err("pci-bridge,id=br1"),
            "Bridge chassis not specified. Each bridge is required to be assigned a unique chassis id > 0."
        );
        assert_eq!(
            err("pci-bridge,id=br1,chassis_nr=0"),
            err("pci-bridge,id=br1")
        );
        assert!(err("pci-bridge,id=br1,chassis_nr=256")
            .starts_with("Property 'pci-bridge.chassis_nr' can't take value '256'"));
        assert_eq!(
            err("pci-bridge,id=br1,chassis_nr=1,vectors=2"),
            "Property 'pci-bridge.vectors' not found"
        );
        assert_eq!(
            err("virtio-rng-pci,id=0bad"),
            "Parameter 'id' expects an identifier"
        );
        assert_eq!(
            err("virtio-rng-pci,id=a,id=b"),
            "Parameter 'id' given more than once"
        );
        assert!(err("virtio-rng-pci,vectors=9999")
            .starts_with("Property 'virtio-rng-pci.vectors' can't take value '9999'"));
        assert!(err("virtio-rng-pci,multifunction=maybe").contains("multifunction"));
        assert_eq!(
            err("virtio-blk-pci,file=x,readonly=maybe"),
            "Property 'virtio-blk-pci.readonly' can't take value 'maybe': expected 'on' or 'off'"
        );
        assert!(err("virtio-blk-pci,file=").contains("expected a file name"));
        assert!(err("virtio-net-pci,tap=a-very-long-interface").contains("interface name"));
        assert!(err("virtio-net-pci,tap=t,mac=ff:ff:ff:ff:ff:ff").contains("unicast MAC"));
    }

    #[test]
    fn qmp_arguments_keep_their_json_types() {
        let a = qmp(
            json!({"driver": "virtio-blk-pci", "id": "d", "file": "/a,b.img",
            "vectors": 4, "readonly": true, "addr": "06.0", "multifunction": true}),
        )
        .unwrap();
        let b = qmp(
            json!({"driver": "virtio-blk-pci", "id": "d", "file": "/a,b.img",
            "vectors": "4", "readonly": "on", "addr": "06.0", "multifunction": "on"}),
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.addr, Some((6, Some(0))));
        assert!(a.multifunction);
        let DriverConfig::Blk(c) = &a.config else {
            panic!("{a:?}")
        };
        assert_eq!(c.file, PathBuf::from("/a,b.img"));
        assert_eq!((c.readonly, c.vectors), (Some(true), Some(4)));
        // The same device as the text form, whose comma is escaped.
        assert_eq!(
            parse_device("virtio-blk-pci,id=d,file=/a,,b.img,vectors=4,readonly=on,addr=06.0,multifunction=on")
                .unwrap(),
            a
        );
        // QEMU takes a devfn number for addr too.
        let n = qmp(json!({"driver": "virtio-rng-pci", "addr": 0x31})).unwrap();
        assert_eq!(n.addr, Some((6, Some(1))));
    }

    #[test]
    fn qmp_arguments_of_the_wrong_type_are_refused() {
        let e = |v: Value| qmp(v).unwrap_err();
        assert_eq!(e(json!({"id": "x"})), "Parameter 'driver' is missing");
        assert_eq!(
            e(json!({"driver": 1})),
            "Invalid parameter type for 'driver', expected: string"
        );
        assert_eq!(
            e(json!({"driver": "virtio-rng-pci", "id": 5})),
            "Invalid parameter type for 'id', expected: string"
        );
        assert_eq!(
            e(json!({"driver": "virtio-rng-pci", "vectors": [4]})),
            "Invalid parameter type for 'vectors', expected: integer"
        );
        assert_eq!(
            e(json!({"driver": "virtio-rng-pci", "vectors": 2.5})),
            "Invalid parameter type for 'vectors', expected: integer"
        );
        assert_eq!(
            e(json!({"driver": "virtio-rng-pci", "vectors": -1})),
            format!(
                "Property 'virtio-rng-pci.vectors' can't take value '-1': expected a number from 0 to {}",
                devices::virtio::pci::MAX_VECTORS
            )
        );
        assert!(e(json!({"driver": "virtio-rng-pci", "vectors": 100000}))
            .starts_with("Property 'virtio-rng-pci.vectors' can't take value '100000'"));
        assert_eq!(
            e(json!({"driver": "virtio-blk-pci", "file": "/x", "readonly": 1})),
            "Invalid parameter type for 'readonly', expected: boolean"
        );
        assert_eq!(
            e(json!({"driver": "virtio-blk-pci", "file": "/x", "readonly": "maybe"})),
            "Property 'virtio-blk-pci.readonly' can't take value 'maybe': expected 'on' or 'off'"
        );
        assert_eq!(
            e(json!({"driver": "virtio-blk-pci", "file": 7})),
            "Invalid parameter type for 'file', expected: string"
        );
        assert_eq!(
            e(json!({"driver": "virtio-blk-pci", "file": "/x", "serial": null})),
            "Invalid parameter type for 'serial', expected: string"
        );
        assert_eq!(
            e(json!({"driver": "virtio-rng-pci", "multifunction": {}})),
            "Invalid parameter type for 'multifunction', expected: boolean"
        );
        assert_eq!(
            e(json!({"driver": "virtio-rng-pci", "addr": 256})),
            "Property 'virtio-rng-pci.addr' can't take value '256': invalid PCI address"
        );
        assert_eq!(
            e(json!({"driver": "virtio-rng-pci", "bus": 1})),
            "Invalid parameter type for 'bus', expected: string"
        );
        assert_eq!(
            e(json!({"driver": "virtio-rng-pci", "nosuch": 1})),
            "Property 'virtio-rng-pci.nosuch' not found"
        );
    }

    #[test]
    fn realized_abi_values_fill_only_what_is_unset() {
        let abi: BTreeMap<String, String> =
            [("vectors", "2"), ("features", "0x1"), ("readonly", "x")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let s = parse_device("virtio-blk-pci,file=/f")
            .unwrap()
            .with_abi(&abi);
        assert_eq!(s.to_option(), "virtio-blk-pci,file=/f,vectors=2");
        let s = parse_device("virtio-rng-pci,vectors=5")
            .unwrap()
            .with_abi(&abi);
        assert_eq!(s.config.vectors(), Some(5));
    }

    #[test]
    fn optional_props_can_be_set_and_read_back() {
        let mut s = parse_device("virtio-blk-pci,file=/f").unwrap();
        assert_eq!(s.config.get("readonly"), None);
        assert!(s.config.set("readonly", PropValue::Bool(true)));
        assert!(s.config.set("vectors", PropValue::U16(7)));
        assert!(!s.config.set("mac", PropValue::Str("x".into())));
        assert!(!s.config.set("file", PropValue::Path("/g".into())));
        assert_eq!(s.config.get("readonly"), Some(PropValue::Bool(true)));
        assert_eq!(s.config.effective_vectors(), 7);
        assert_eq!(
            s.to_option(),
            "virtio-blk-pci,file=/f,readonly=on,vectors=7"
        );
    }
}
