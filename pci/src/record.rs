//! The compat record: what a machine's guest-visible PCI ABI is, written after every start and
//! read back as hints on the next one, and the differences between two records.
//!
//! A record is taken from realized devices ([`Fingerprint::of`] reads a function's config
//! space), never from the command line, so it describes what the guest can actually see.
//!
//! On disk it is JSON with a format name and version ([`RECORD_FORMAT`], [`RECORD_VERSION`]).
//! [`CompatRecord::save`] writes it atomically (temporary file, fsync, rename, directory fsync):
//! a crash leaves the old record or the new one, never a mix.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::address::PciAddress;
use crate::config::{BarKind, ConfigSpace};
use crate::root::ExtendedConfig;

/// The `format` field of every record.
pub const RECORD_FORMAT: &str = "vmm-pci-compat";
/// The record version this build writes and reads.
pub const RECORD_VERSION: u32 = 1;
/// Vendor-specific capability ID (virtio uses it for its structures).
const CAP_VENDOR: u8 = 0x09;

/// Errors reading or writing a record. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file could not be read or written.
    #[error("compat record '{path}': {reason}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// Not JSON, or not a record.
    #[error("compat record '{path}': not a valid record: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said.
        reason: String,
    },
    /// A format or version we do not read.
    #[error("compat record '{path}': unsupported format '{format}' version {version} (this build reads '{RECORD_FORMAT}' version {RECORD_VERSION})")]
    Version {
        /// The file.
        path: String,
        /// Its format field.
        format: String,
        /// Its version field.
        version: u32,
    },
    /// Consistent JSON describing an impossible machine.
    #[error("compat record '{path}': {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// One BAR as the guest sizes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarPrint {
    /// BAR index.
    pub index: u8,
    /// `io`, `mem32` or `mem64`.
    pub kind: String,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// Size in bytes.
    pub size: u64,
}

/// A virtio structure named by a vendor capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioCapPrint {
    /// `cfg_type` (1 common, 2 notify, 3 ISR, 4 device, 5 pci-cfg).
    pub cfg_type: u8,
    /// BAR holding it.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u32,
    /// Length.
    pub length: u32,
}

/// One capability in list order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapPrint {
    /// Capability ID.
    pub id: u8,
    /// Offset in config space.
    pub offset: u8,
    /// Length in bytes.
    pub len: u8,
    /// For virtio vendor capabilities: the structure it points at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtio: Option<VirtioCapPrint>,
}

/// A function's guest-visible identity: what `lspci -vvv -nn` would show that must not change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
    /// Class code (class << 16 | subclass << 8 | prog-if).
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
    /// Header type, multi-function bit included.
    pub header_type: u8,
    /// Interrupt pin (0 none, 1 INTA, ...).
    pub interrupt_pin: u8,
    /// BARs in index order.
    pub bars: Vec<BarPrint>,
    /// Capabilities in list order.
    pub capabilities: Vec<CapPrint>,
    /// MSI-X table size (vectors), if the function has MSI-X.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msix_table_size: Option<u16>,
    /// Device properties that shape the ABI (e.g. `vectors`, `queues`, `queue_size`,
    /// `features`), as strings.
    #[serde(default)]
    pub props: BTreeMap<String, String>,
}

impl Fingerprint {
    /// Reads a fingerprint off a realized function's config space plus its ABI properties.
    pub fn of(config: &ConfigSpace, props: BTreeMap<String, String>) -> Self {
        let bars = config
            .bars()
            .iter()
            .map(|b| BarPrint {
                index: b.index as u8,
                kind: match b.kind {
                    BarKind::Io => "io",
                    BarKind::Mem32 { .. } => "mem32",
                    BarKind::Mem64 { .. } => "mem64",
                }
                .to_string(),
                prefetchable: matches!(
                    b.kind,
                    BarKind::Mem32 { prefetchable: true } | BarKind::Mem64 { prefetchable: true }
                ),
                size: b.size,
            })
            .collect();
        let capabilities = config
            .capabilities()
            .iter()
            .map(|c| {
                let at = usize::from(c.offset);
                let virtio = (c.id == CAP_VENDOR && c.len >= 16).then(|| VirtioCapPrint {
                    cfg_type: config.read_u8(at + 3),
                    bar: config.read_u8(at + 4),
                    offset: read_u32(config, at + 8),
                    length: read_u32(config, at + 12),
                });
                CapPrint {
                    id: c.id,
                    offset: c.offset,
                    len: c.len,
                    virtio,
                }
            })
            .collect();
        // A type-1 header has no subsystem IDs: 0x2c/0x2e hold a bridge's prefetchable limit
        // (upper 32 bits), which is bus layout, not identity.
        let (subsystem_vendor, subsystem) = if crate::bridge::is_bridge(config) {
            (0, 0)
        } else {
            (config.subsystem_vendor_id(), config.subsystem_id())
        };
        Fingerprint {
            vendor: config.vendor_id(),
            device: config.device_id(),
            subsystem_vendor,
            subsystem,
            class: config.class_code(),
            revision: config.revision(),
            header_type: config.header_type(),
            interrupt_pin: config.interrupt_pin(),
            bars,
            capabilities,
            msix_table_size: config.msix().map(|m| m.table_size),
            props,
        }
    }
}

fn read_u32(config: &ConfigSpace, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    config.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// One device in a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Driver name.
    pub driver: String,
    /// The bus it sits on by name, when that is not the root bus `pci.0`: the id of the
    /// `pci-bridge` in front of it. Records of machines without bridges have none (and read
    /// as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// Address (with the bus number the machine gave the bus).
    pub addr: PciAddress,
    /// What the guest sees.
    pub fingerprint: Fingerprint,
}

/// The machine-level part of the ABI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// Host bridge vendor ID.
    pub host_bridge_vendor: u16,
    /// Host bridge device ID.
    pub host_bridge_device: u16,
    /// ECAM base address.
    pub ecam_base: u64,
    /// 32-bit PCI memory window (base, size).
    pub mmio32_window: (u64, u64),
    /// ACPI PCI hot-plug on bus 0 (slot objects with `_SUN`/`_EJ0`: the guest sees
    /// `Physical Slot: N` and names NICs after slots). A record written before this property
    /// existed has none: off, so that machine keeps the guest view it had.
    #[serde(default)]
    pub pci_hotplug: bool,
    /// ACPI PCI hot-plug behind bridges too (QEMU's `acpi-pci-hotplug-with-bridge-support`):
    /// each bridge's ACPI object carries a bus selector and slot objects with `_SUN`/`_EJ0`
    /// (the guest sees `Physical Slot` on functions behind bridges), and the bridge's own
    /// slot on its bus loses its `_EJ0` (bridges are not hot-pluggable). A record written
    /// before this property existed has none: off, so that machine keeps the guest view it had
    /// (no slot objects behind bridges).
    #[serde(default)]
    pub pci_hotplug_bridges: bool,
    /// What the extended config space (0x100-0xfff) of the machine's (conventional) functions
    /// reads: `all-ones` as QEMU, or `zero`. A record written before this property existed has
    /// none: `zero`, what that machine's guest saw.
    #[serde(default = "ExtendedConfig::legacy")]
    pub extended_config: ExtendedConfig,
    /// The 64-bit PCI memory window (base, size) where 64-bit BARs go, or none (64-bit BARs in
    /// the 32-bit window). A record written before this property existed has none: that
    /// machine keeps its 32-bit BAR placement.
    #[serde(default)]
    pub mmio64_window: Option<(u64, u64)>,
    /// The type-1 config mechanism (ports 0xcf8-0xcff, in the host bridge's `_CRS`): on as
    /// QEMU's `pc`/`q35`, or off as QEMU's `microvm` (the guest reaches config space through
    /// ECAM alone: one exit per access instead of two). A record written before this property
    /// existed has none: on, what that machine's guest saw.
    #[serde(default = "config_ports_legacy")]
    pub pci_config_ports: bool,
}

/// What a record written before `pci_config_ports` existed had: the ports.
fn config_ports_legacy() -> bool {
    true
}

/// A compat record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompatRecord {
    /// Always [`RECORD_FORMAT`].
    pub format: String,
    /// Always [`RECORD_VERSION`] when written by this build.
    pub version: u32,
    /// The machine.
    pub machine: MachineRecord,
    /// Devices by id.
    pub devices: BTreeMap<String, DeviceRecord>,
}

impl CompatRecord {
    /// A record for `machine` with `devices`.
    pub fn new(machine: MachineRecord, devices: BTreeMap<String, DeviceRecord>) -> Self {
        CompatRecord {
            format: RECORD_FORMAT.to_string(),
            version: RECORD_VERSION,
            machine,
            devices,
        }
    }

    /// Parses and validates a record; `path` only names the source in errors.
    pub fn from_json(text: &str, path: &str) -> Result<Self, RecordError> {
        #[derive(Deserialize)]
        struct Head {
            format: Option<String>,
            version: Option<u32>,
        }
        let head: Head = serde_json::from_str(text).map_err(|e| RecordError::Parse {
            path: path.into(),
            reason: e.to_string(),
        })?;
        let (format, version) = (head.format.unwrap_or_default(), head.version.unwrap_or(0));
        if format != RECORD_FORMAT || version != RECORD_VERSION {
            return Err(RecordError::Version {
                path: path.into(),
                format,
                version,
            });
        }
        let r: CompatRecord = serde_json::from_str(text).map_err(|e| RecordError::Parse {
            path: path.into(),
            reason: e.to_string(),
        })?;
        r.validate(path)?;
        Ok(r)
    }

    fn validate(&self, path: &str) -> Result<(), RecordError> {
        let mut seen: BTreeMap<PciAddress, &str> = BTreeMap::new();
        for (id, d) in &self.devices {
            if id.is_empty() {
                return Err(RecordError::Invalid {
                    path: path.into(),
                    reason: "a device has an empty id".into(),
                });
            }
            let on_root = d.bus.is_none();
            if on_root && (d.addr.bus() != 0 || d.addr.device() == 0) {
                return Err(RecordError::Invalid {
                    path: path.into(),
                    reason: format!(
                        "device '{id}' has address {} outside bus 0 slots 1-31",
                        d.addr
                    ),
                });
            }
            if !on_root && d.addr.bus() == 0 {
                return Err(RecordError::Invalid {
                    path: path.into(),
                    reason: format!(
                        "device '{id}' is behind a bridge but has address {} on bus 0",
                        d.addr
                    ),
                });
            }
            if let Some(other) = seen.insert(d.addr, id) {
                return Err(RecordError::Invalid {
                    path: path.into(),
                    reason: format!("devices '{other}' and '{id}' share address {}", d.addr),
                });
            }
        }
        Ok(())
    }

    /// Reads a record file.
    pub fn load(path: &Path) -> Result<Self, RecordError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| RecordError::Io {
            path: name.clone(),
            reason: e.to_string(),
        })?;
        Self::from_json(&text, &name)
    }

    /// The record as pretty JSON.
    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// Writes the record atomically: a temporary file beside `path`, fsync, rename over `path`,
    /// fsync of the directory. A crash at any point leaves either the old record or the new one.
    pub fn save(&self, path: &Path) -> Result<(), RecordError> {
        write_atomically(path, self.to_json().as_bytes()).map_err(|e| RecordError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }
}

/// Writes `bytes` to `path` atomically (see [`CompatRecord::save`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?
        .to_string_lossy()
        .to_string();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// One difference between two records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum Change {
    /// A device only in the new record.
    Added {
        /// Device id.
        id: String,
        /// Its address.
        addr: PciAddress,
    },
    /// A device only in the old record.
    Removed {
        /// Device id.
        id: String,
        /// Its address.
        addr: PciAddress,
    },
    /// A device in both, at another address.
    Moved {
        /// Device id.
        id: String,
        /// Old address.
        old: PciAddress,
        /// New address.
        new: PciAddress,
    },
    /// A device in both whose fingerprint (or driver) differs in `field`.
    Changed {
        /// Device id.
        id: String,
        /// Field path, e.g. `msix_table_size` or `bars[4].size`.
        field: String,
        /// Old value.
        old: String,
        /// New value.
        new: String,
    },
    /// A machine-level field differs.
    Machine {
        /// Field.
        field: String,
        /// Old value.
        old: String,
        /// New value.
        new: String,
    },
}

impl Change {
    /// Whether this change breaks the ABI of a device present in both records (or the machine).
    pub fn breaks_abi(&self) -> bool {
        !matches!(self, Change::Added { .. } | Change::Removed { .. })
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Added { id, addr } => write!(f, "added   {id} at {addr}"),
            Change::Removed { id, addr } => write!(f, "removed {id} from {addr}"),
            Change::Moved { id, old, new } => write!(f, "moved   {id}: {old} -> {new}"),
            Change::Changed {
                id,
                field,
                old,
                new,
            } => {
                write!(f, "changed {id}: {field}: {old} -> {new}")
            }
            Change::Machine { field, old, new } => write!(f, "machine: {field}: {old} -> {new}"),
        }
    }
}

/// Flattens a JSON value into `path -> scalar text` pairs.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        // A tuple of scalars (a window's base and size) is one value.
        serde_json::Value::Array(a)
            if !a.is_empty()
                && a.iter().all(|v| {
                    !matches!(
                        v,
                        serde_json::Value::Object(_) | serde_json::Value::Array(_)
                    )
                }) =>
        {
            let items: Vec<String> = a.iter().map(|v| v.to_string()).collect();
            out.insert(prefix.to_string(), format!("[{}]", items.join(", ")));
        }
        serde_json::Value::Array(a) => {
            out.insert(format!("{prefix}.len"), a.len().to_string());
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        serde_json::Value::Null => {
            out.insert(prefix.to_string(), "none".into());
        }
        serde_json::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn field_changes(
    old: &serde_json::Value,
    new: &serde_json::Value,
) -> Vec<(String, String, String)> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", old, &mut a);
    flatten("", new, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k), b.get(k));
            (x != y).then(|| {
                (
                    k.clone(),
                    x.cloned().unwrap_or_else(|| "absent".into()),
                    y.cloned().unwrap_or_else(|| "absent".into()),
                )
            })
        })
        .collect()
}

/// Every difference from `old` to `new`: machine fields, then devices by id.
pub fn diff(old: &CompatRecord, new: &CompatRecord) -> Vec<Change> {
    let mut out = Vec::new();
    let j = |v: &MachineRecord| serde_json::to_value(v).unwrap_or_default();
    for (field, old, new) in field_changes(&j(&old.machine), &j(&new.machine)) {
        out.push(Change::Machine { field, old, new });
    }
    for (id, o) in &old.devices {
        match new.devices.get(id) {
            None => out.push(Change::Removed {
                id: id.clone(),
                addr: o.addr,
            }),
            Some(n) => {
                if o.addr != n.addr || o.bus != n.bus {
                    out.push(Change::Moved {
                        id: id.clone(),
                        old: o.addr,
                        new: n.addr,
                    });
                }
                if o.driver != n.driver {
                    out.push(Change::Changed {
                        id: id.clone(),
                        field: "driver".into(),
                        old: o.driver.clone(),
                        new: n.driver.clone(),
                    });
                }
                let f = |d: &DeviceRecord| serde_json::to_value(&d.fingerprint).unwrap_or_default();
                for (field, old, new) in field_changes(&f(o), &f(n)) {
                    out.push(Change::Changed {
                        id: id.clone(),
                        field,
                        old,
                        new,
                    });
                }
            }
        }
    }
    for (id, n) in &new.devices {
        if !old.devices.contains_key(id) {
            out.push(Change::Added {
                id: id.clone(),
                addr: n.addr,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSpaceBuilder;

    fn fp(vectors: u16) -> Fingerprint {
        let mut b = ConfigSpaceBuilder::new(0x1af4, 0x1044);
        b.class(0, 0xff, 0).revision(1);
        b.bar(
            1,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0x1000,
        )
        .unwrap();
        b.bar(4, BarKind::Mem64 { prefetchable: true }, 0x4000)
            .unwrap();
        let body = [16u8, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0];
        b.capability(CAP_VENDOR, &body, &[0; 14]).unwrap();
        b.msix_capability(vectors, 1, 0, 1, 0x800).unwrap();
        let mut props = BTreeMap::new();
        props.insert("vectors".to_string(), vectors.to_string());
        Fingerprint::of(&b.build().unwrap(), props)
    }

    fn machine() -> MachineRecord {
        MachineRecord {
            pci_hotplug: true,
            pci_hotplug_bridges: true,
            extended_config: ExtendedConfig::AllOnes,
            mmio64_window: Some((0x40_0000_0000, 0x20_0000_0000)),
            pci_config_ports: false,
            host_bridge_vendor: 0x1b36,
            host_bridge_device: 8,
            ecam_base: 0xe000_0000,
            mmio32_window: (0xc000_0000, 0x2000_0000),
        }
    }

    fn record(devs: &[(&str, u8, u16)]) -> CompatRecord {
        CompatRecord::new(
            machine(),
            devs.iter()
                .map(|&(id, slot, vectors)| {
                    (
                        id.to_string(),
                        DeviceRecord {
                            driver: "virtio-rng-pci".into(),
                            bus: None,
                            addr: PciAddress::new(0, slot, 0).unwrap(),
                            fingerprint: fp(vectors),
                        },
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn fingerprint_reads_the_realized_config_space() {
        let f = fp(2);
        assert_eq!((f.vendor, f.device, f.revision), (0x1af4, 0x1044, 1));
        assert_eq!(f.class, 0x00ff00);
        assert_eq!(f.bars.len(), 2);
        assert_eq!(f.bars[1].kind, "mem64");
        assert!(f.bars[1].prefetchable);
        assert_eq!(f.bars[1].size, 0x4000);
        assert_eq!(f.msix_table_size, Some(2));
        let v = f
            .capabilities
            .iter()
            .find_map(|c| c.virtio.clone())
            .unwrap();
        assert_eq!((v.cfg_type, v.bar, v.length), (1, 4, 0x1000));
    }

    #[test]
    fn json_round_trip_and_validation() {
        let r = record(&[("rng0", 5, 2), ("rng1", 1, 2)]);
        let back = CompatRecord::from_json(&r.to_json(), "x").unwrap();
        assert_eq!(back, r);
        let err = |t: &str| {
            CompatRecord::from_json(t, "rec.json")
                .unwrap_err()
                .to_string()
        };
        assert!(err("not json").contains("rec.json': not a valid record"));
        assert!(err("{\"format\":\"vmm-pci-compat\",\"version\":9}").contains("unsupported format"));
        assert!(err("{\"format\":\"other\",\"version\":1}").contains("unsupported format 'other'"));
        let dup = r.to_json().replace("\"00:01.0\"", "\"00:05.0\"");
        assert!(err(&dup).contains("share address 00:05.0"));
        let slot0 = r.to_json().replace("\"00:01.0\"", "\"00:00.0\"");
        assert!(err(&slot0).contains("outside bus 0 slots 1-31"));
        let bad_addr = r.to_json().replace("\"00:01.0\"", "\"00:40.0\"");
        assert!(err(&bad_addr).contains("not a valid record"));
    }

    /// A record from before hot-plug behind bridges reads as "off"; turning it on is a machine
    /// change `abi diff` reports and `--compat-strict` refuses.
    #[test]
    fn hotplug_bridges_defaults_off_and_a_change_is_reported() {
        let new = record(&[("a", 1, 2)]);
        let mut json: serde_json::Value = serde_json::from_str(&new.to_json()).unwrap();
        assert_eq!(json["machine"]["pci_hotplug_bridges"], true);
        json["machine"]
            .as_object_mut()
            .unwrap()
            .remove("pci_hotplug_bridges");
        let old = CompatRecord::from_json(&json.to_string(), "old.json").unwrap();
        assert!(!old.machine.pci_hotplug_bridges);
        assert!(old.machine.pci_hotplug);
        let d = diff(&old, &new);
        let text: Vec<String> = d.iter().map(|c| c.to_string()).collect();
        assert_eq!(text, ["machine: pci_hotplug_bridges: false -> true"]);
        assert!(d[0].breaks_abi());
    }

    #[test]
    fn a_record_without_machine_properties_reads_as_the_machine_it_was() {
        let r = record(&[("a", 1, 2)]);
        let json = r.to_json();
        assert!(json.contains("\"extended_config\": \"all-ones\""), "{json}");
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let m = v["machine"].as_object_mut().unwrap();
        m.remove("extended_config");
        m.remove("mmio64_window");
        m.remove("pci_hotplug");
        m.remove("pci_config_ports");
        let old = v.to_string();
        let back = CompatRecord::from_json(&old, "old.json").unwrap();
        assert_eq!(back.machine.extended_config, ExtendedConfig::Zero);
        assert_eq!(back.machine.mmio64_window, None);
        assert!(!back.machine.pci_hotplug);
        assert!(
            back.machine.pci_config_ports,
            "absent: the ports were there"
        );
        let text: Vec<String> = diff(&back, &r).iter().map(|c| c.to_string()).collect();
        assert!(
            text.contains(&"machine: extended_config: zero -> all-ones".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(
                &"machine: mmio64_window: none -> [274877906944, 137438953472]".to_string()
            ),
            "{text:?}"
        );
        assert!(
            text.contains(&"machine: pci_config_ports: true -> false".to_string()),
            "{text:?}"
        );
        assert!(diff(&back, &r).iter().all(Change::breaks_abi));
        let bad = json.replace("\"all-ones\"", "\"sometimes\"");
        assert!(CompatRecord::from_json(&bad, "x")
            .unwrap_err()
            .to_string()
            .contains("not a valid record"));
    }

    #[test]
    fn diff_reports_every_kind_of_change() {
        let old = record(&[("a", 1, 2), ("b", 2, 2), ("c", 3, 2)]);
        let mut new = record(&[("a", 1, 2), ("c", 4, 4), ("d", 2, 2)]);
        new.machine.ecam_base = 0xb000_0000;
        new.devices.get_mut("a").unwrap().driver = "virtio-blk-pci".into();
        let d = diff(&old, &new);
        let text: Vec<String> = d.iter().map(|c| c.to_string()).collect();
        assert!(
            text.contains(&"machine: ecam_base: 3758096384 -> 2952790016".to_string()),
            "{text:?}"
        );
        assert!(text.contains(&"removed b from 00:02.0".to_string()));
        assert!(text.contains(&"added   d at 00:02.0".to_string()));
        assert!(text.contains(&"moved   c: 00:03.0 -> 00:04.0".to_string()));
        assert!(
            text.contains(&"changed c: msix_table_size: 2 -> 4".to_string()),
            "{text:?}"
        );
        assert!(text.contains(&"changed c: props.vectors: 2 -> 4".to_string()));
        assert!(text.contains(&"changed a: driver: virtio-rng-pci -> virtio-blk-pci".to_string()));
        assert!(d.iter().any(|c| c.breaks_abi()));
        assert!(diff(&old, &old).is_empty());
        let only_added = diff(
            &record(&[("a", 1, 2)]),
            &record(&[("a", 1, 2), ("z", 9, 2)]),
        );
        assert!(only_added.iter().all(|c| !c.breaks_abi()));
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let dir = std::env::temp_dir().join(format!("record-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("rec.json");
        let r = record(&[("a", 1, 2)]);
        r.save(&p).unwrap();
        assert_eq!(CompatRecord::load(&p).unwrap(), r);
        let r2 = record(&[("a", 1, 2), ("b", 2, 2)]);
        r2.save(&p).unwrap();
        assert_eq!(CompatRecord::load(&p).unwrap(), r2);
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
        assert!(CompatRecord::load(&dir.join("missing.json"))
            .unwrap_err()
            .to_string()
            .contains("missing.json"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
