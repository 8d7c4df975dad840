//! The machine description file: a whole machine (kernel, initrd, command line, memory, vCPUs,
//! devices with addresses and properties) as JSON.
//!
//! `vmm run --machine-file PATH` starts it; `--dump-machine PATH` writes the fully resolved
//! description of the machine that runs (every device with its final address and every
//! ABI-shaping property), so feeding a dump back reproduces the same machine.
//!
//! Options given beside `--machine-file` override it: `--kernel`, `--initrd`, `--append`,
//! `--memory` and `--cpus` replace the file's values; each `--device` is added, and replaces the
//! file's device with the same `id=`.
//!
//! A device is `{"driver", "id", "addr", "multifunction", "props": {...}}`. Version 2 (written
//! by this build) keeps each property's JSON type: `{"file": "/a,b.img", "readonly": true,
//! "vectors": 2}`; version 1 files (every value a string: `"vectors": "2"`) still load, since a
//! property takes its value as a string too (as QMP `device_add` does). Values are never
//! joined into `--device` text, so any character, a comma included, survives a round trip.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use pci::{ExtendedConfig, PciAddress};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::device_config::DeviceError;
use crate::device_config::{DeviceSpec, RawValue, ROOT_BUS};

/// The `format` field.
pub const MACHINE_FORMAT: &str = "vmm-machine";
/// The version this build writes.
pub const MACHINE_VERSION: u32 = 2;
/// The versions this build reads.
pub const MACHINE_VERSIONS_READ: &[u32] = &[1, 2];

/// A device in a machine description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// Driver name.
    pub driver: String,
    /// `id=`; absent for an anonymous device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `bus=`: the id of the `pci-bridge` the device sits behind; absent for the root bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// `addr=` in any QEMU form, e.g. `05.0`, or `00:05.0` on the root bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// `multifunction=on`.
    #[serde(default)]
    pub multifunction: bool,
    /// Driver-specific properties, typed (`"vectors": 2`) or as strings (`"vectors": "2"`).
    #[serde(default)]
    pub props: Map<String, Value>,
}

impl DeviceEntry {
    /// The entry for `spec`, at `addr` when given (else the spec's own `addr=`, if any): on
    /// the root bus written `00:SS.F`, behind a bridge `SS.F`; `bus` is the spec's.
    pub fn from_spec(spec: &DeviceSpec, addr: Option<PciAddress>) -> Self {
        let bus = spec.bus.clone();
        let addr = addr
            .map(|a| match spec.bus_name() {
                ROOT_BUS => a.to_string(),
                _ => format!("{:02x}.{}", a.device(), a.function()),
            })
            .or_else(|| {
                spec.addr.map(|(slot, f)| match f {
                    Some(f) => format!("{slot:02x}.{f}"),
                    None => format!("{slot:02x}"),
                })
            });
        DeviceEntry {
            driver: spec.driver().to_string(),
            id: spec.id.clone(),
            bus,
            addr,
            multifunction: spec.multifunction,
            props: spec.props_json(),
        }
    }

    /// The spec this entry stands for, checked like a QMP `device_add`.
    pub fn to_spec(&self) -> Result<DeviceSpec, DeviceError> {
        let mut common: Vec<(&str, RawValue<'_>)> = Vec::new();
        if let Some(id) = &self.id {
            common.push(("id", RawValue::Text(id)));
        }
        if let Some(b) = &self.bus {
            common.push(("bus", RawValue::Text(b)));
        }
        if let Some(a) = &self.addr {
            common.push(("addr", RawValue::Text(a)));
        }
        if self.multifunction {
            common.push(("multifunction", RawValue::Text("on")));
        }
        let props = self
            .props
            .iter()
            .map(|(k, v)| (k.as_str(), RawValue::Json(v)));
        DeviceSpec::from_props(&self.driver, common.into_iter().chain(props))
    }
}

/// A machine description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineFile {
    /// Always [`MACHINE_FORMAT`].
    pub format: String,
    /// [`MACHINE_VERSION`] when written; one of [`MACHINE_VERSIONS_READ`] when read.
    pub version: u32,
    /// Kernel path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Initrd path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u8>,
    /// ACPI PCI hot-plug on bus 0 (guest-visible; see `vmm run --help`, `--hotplug`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_hotplug: Option<bool>,
    /// ACPI PCI hot-plug behind bridges (guest-visible; see `vmm run --help`,
    /// `--hotplug-bridges`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_hotplug_bridges: Option<bool>,
    /// What the extended config space (0x100-0xfff) of the PCI functions reads (guest-visible):
    /// `all-ones` (QEMU's behaviour, a new machine's) or `zero` (machines recorded before it
    /// was a property). None: what the compat record says, else `all-ones`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended_config: Option<ExtendedConfig>,
    /// The 64-bit PCI window (guest-visible): 64-bit BARs above 4 GiB. None: what the compat
    /// record says, else on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmio64_window: Option<bool>,
    /// The PCI type-1 config ports 0xcf8-0xcff (guest-visible; see `vmm run --help`,
    /// `--pci-config-ports`). None: what the compat record says, else on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_config_ports: Option<bool>,
    /// Devices.
    #[serde(default)]
    pub devices: Vec<DeviceEntry>,
}

/// A problem with a machine file; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("machine file '{path}': {reason}")]
pub struct MachineFileError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl MachineFile {
    /// An empty description of this build's format.
    pub fn new() -> Self {
        MachineFile {
            format: MACHINE_FORMAT.into(),
            version: MACHINE_VERSION,
            kernel: None,
            initrd: None,
            cmdline: None,
            memory_mib: None,
            cpus: None,
            pci_hotplug: None,
            pci_hotplug_bridges: None,
            extended_config: None,
            mmio64_window: None,
            pci_config_ports: None,
            devices: Vec::new(),
        }
    }

    /// Reads and checks a machine file.
    pub fn load(path: &Path) -> Result<Self, MachineFileError> {
        let name = path.display().to_string();
        let err = |reason: String| MachineFileError {
            path: name.clone(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::from_json(&text).map_err(err)
    }

    /// Parses and checks a description.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let format = v.get("format").and_then(|f| f.as_str()).unwrap_or_default();
        let version = v.get("version").and_then(|f| f.as_u64()).unwrap_or(0);
        if format != MACHINE_FORMAT
            || !MACHINE_VERSIONS_READ
                .iter()
                .any(|v| u64::from(*v) == version)
        {
            return Err(format!(
                "unsupported format '{format}' version {version} (this build reads '{MACHINE_FORMAT}' versions 1 and {MACHINE_VERSION})"
            ));
        }
        let m: MachineFile =
            serde_json::from_value(v).map_err(|e| format!("not a machine description: {e}"))?;
        m.device_specs()?;
        Ok(m)
    }

    /// The devices as specs, checked like `--device` options, with duplicate ids and
    /// addresses refused.
    pub fn device_specs(&self) -> Result<Vec<DeviceSpec>, String> {
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        let mut out = Vec::new();
        for (i, d) in self.devices.iter().enumerate() {
            let spec = d.to_spec().map_err(|e| format!("device {i}: {e}"))?;
            if let Some(id) = &spec.id {
                if !ids.insert(id.clone()) {
                    return Err(format!("duplicate device id '{id}'"));
                }
            }
            if let Some((slot, f)) = spec.addr {
                if !addrs.insert((spec.bus_name().to_string(), slot, f.unwrap_or(0))) {
                    let on = match spec.bus_name() {
                        ROOT_BUS => String::new(),
                        bus => format!(" on bus '{bus}'"),
                    };
                    return Err(format!(
                        "two devices at address {:02x}.{}{on}",
                        slot,
                        f.unwrap_or(0)
                    ));
                }
            }
            out.push(spec);
        }
        Ok(out)
    }

    /// The description as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

impl Default for MachineFile {
    fn default() -> Self {
        Self::new()
    }
}

/// Merges `--device` options into the file's devices: a CLI device whose id matches replaces
/// the file's entry in place; the others are appended.
pub fn merge_devices(file: &[DeviceSpec], cli: Vec<DeviceSpec>) -> Vec<DeviceSpec> {
    let mut out: Vec<DeviceSpec> = file.to_vec();
    let mut added = Vec::new();
    for d in cli {
        // Only the file's devices are replaced: two --device options with one id stay two
        // devices, and placement reports the duplicate id.
        match out[..file.len()]
            .iter_mut()
            .find(|f| f.id.is_some() && f.id == d.id)
        {
            Some(slot) => *slot = d,
            None => added.push(d),
        }
    }
    out.extend(added);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_config::{parse_device, BlkConfig, DriverConfig};

    fn file(devs: &str) -> String {
        format!(
            r#"{{"format":"vmm-machine","version":1,"kernel":"/k","memory_mib":128,"devices":[{devs}]}}"#
        )
    }

    #[test]
    fn parses_and_round_trips() {
        let m = MachineFile::from_json(&file(
            r#"{"driver":"virtio-rng-pci","id":"a","addr":"00:05.0","props":{"vectors":"3"}},{"driver":"virtio-rng-pci"}"#,
        ))
        .unwrap();
        assert_eq!(m.memory_mib, Some(128));
        let specs = m.device_specs().unwrap();
        assert_eq!(specs[0].addr, Some((5, Some(0))));
        assert_eq!(specs[0].config.vectors(), Some(3));
        assert_eq!(MachineFile::from_json(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn hotplug_is_optional_and_round_trips() {
        let m = MachineFile::from_json(&file("")).unwrap();
        assert_eq!(
            m.pci_hotplug, None,
            "a file without it leaves it to the record"
        );
        assert_eq!(m.pci_hotplug_bridges, None);
        let mut off = m.clone();
        off.pci_hotplug = Some(false);
        let json = off.to_json();
        assert!(json.contains("\"pci_hotplug\": false"), "{json}");
        assert!(!json.contains("pci_hotplug_bridges"), "{json}");
        assert_eq!(MachineFile::from_json(&json).unwrap(), off);
        let mut on = m.clone();
        on.pci_hotplug = Some(true);
        on.pci_hotplug_bridges = Some(true);
        let json = on.to_json();
        assert!(json.contains("\"pci_hotplug_bridges\": true"), "{json}");
        assert_eq!(MachineFile::from_json(&json).unwrap(), on);
    }

    #[test]
    fn extended_config_is_optional_and_round_trips() {
        let m = MachineFile::from_json(&file("")).unwrap();
        assert_eq!(
            m.extended_config, None,
            "a file without it leaves it to the record"
        );
        assert!(!m.to_json().contains("extended_config"));
        for (v, text) in [
            (ExtendedConfig::Zero, "\"extended_config\": \"zero\""),
            (ExtendedConfig::AllOnes, "\"extended_config\": \"all-ones\""),
        ] {
            let mut m2 = m.clone();
            m2.extended_config = Some(v);
            let json = m2.to_json();
            assert!(json.contains(text), "{json}");
            assert_eq!(MachineFile::from_json(&json).unwrap(), m2);
        }
        let mut off = m.clone();
        off.mmio64_window = Some(false);
        let json = off.to_json();
        assert!(json.contains("\"mmio64_window\": false"), "{json}");
        assert_eq!(MachineFile::from_json(&json).unwrap(), off);
        assert!(!m.to_json().contains("pci_config_ports"));
        let mut ecam_only = m.clone();
        ecam_only.pci_config_ports = Some(false);
        let json = ecam_only.to_json();
        assert!(json.contains("\"pci_config_ports\": false"), "{json}");
        assert_eq!(MachineFile::from_json(&json).unwrap(), ecam_only);
        let bad = file("").replace("\"devices\"", "\"extended_config\":\"ones\",\"devices\"");
        let e = MachineFile::from_json(&bad).unwrap_err();
        assert!(
            e.contains("not a machine description") && e.contains("unknown variant `ones`"),
            "{e}"
        );
    }

    #[test]
    fn version_1_string_values_and_version_2_typed_values_are_the_same_devices() {
        let v1 = MachineFile::from_json(&file(
            r#"{"driver":"virtio-blk-pci","id":"d","addr":"00:05.0","multifunction":false,
                "props":{"file":"/a,b.img","readonly":"on","serial":"s,1","vectors":"3"}}"#,
        ))
        .unwrap();
        let v2 = MachineFile::from_json(
            &file(
                r#"{"driver":"virtio-blk-pci","id":"d","addr":"00:05.0","multifunction":false,
                "props":{"file":"/a,b.img","readonly":true,"serial":"s,1","vectors":3}}"#,
            )
            .replace("\"version\":1", "\"version\":2"),
        )
        .unwrap();
        assert_eq!(v2.version, 2);
        let spec = v1.device_specs().unwrap().remove(0);
        assert_eq!(v2.device_specs().unwrap(), std::slice::from_ref(&spec));
        assert_eq!(
            spec.config,
            DriverConfig::Blk(BlkConfig {
                file: "/a,b.img".into(),
                readonly: Some(true),
                serial: Some("s,1".into()),
                vectors: Some(3),
            })
        );
        assert_eq!(
            parse_device(
                "virtio-blk-pci,id=d,addr=5.0,file=/a,,b.img,readonly=on,serial=s,,1,vectors=3"
            )
            .unwrap(),
            spec
        );
    }

    #[test]
    fn a_written_description_has_typed_values_and_reads_back_byte_identical() {
        let specs: Vec<DeviceSpec> = [
            "virtio-blk-pci,id=d,file=/tmp/x/a,,b.img,readonly=on,vectors=3",
            "virtio-console-pci,id=c,path=/tmp/c,,out",
            "virtio-net-pci,tap=tap0,mac=52:54:00:12:34:56",
            "virtio-rng-pci,addr=6.0,multifunction=on",
        ]
        .iter()
        .map(|s| parse_device(s).unwrap())
        .collect();
        let mut m = MachineFile::new();
        m.devices = specs
            .iter()
            .enumerate()
            .map(|(i, s)| DeviceEntry::from_spec(s, PciAddress::new(0, i as u8 + 1, 0).ok()))
            .collect();
        let text = m.to_json();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 2);
        assert_eq!(
            v["devices"][0]["props"],
            serde_json::json!({"file": "/tmp/x/a,b.img", "readonly": true, "vectors": 3})
        );
        assert_eq!(
            v["devices"][1]["props"],
            serde_json::json!({"path": "/tmp/c,out"})
        );
        assert_eq!(v["devices"][0]["addr"], "00:01.0");
        let again = MachineFile::from_json(&text).unwrap();
        let back = again.device_specs().unwrap();
        for (a, b) in specs.iter().zip(&back) {
            assert_eq!(a.config, b.config);
            assert_eq!((&a.id, a.multifunction), (&b.id, b.multifunction));
        }
        let mut m2 = MachineFile::new();
        m2.devices = back
            .iter()
            .map(|s| {
                let (slot, f) = s.addr.unwrap();
                DeviceEntry::from_spec(s, PciAddress::new(0, slot, f.unwrap_or(0)).ok())
            })
            .collect();
        assert_eq!(m2.to_json(), text);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let e = |t: &str| MachineFile::from_json(t).unwrap_err();
        assert!(e("{").contains("not valid JSON"));
        assert!(e(r#"{"format":"vmm-machine","version":3}"#).contains("unsupported format"));
        assert!(e(&file(
            r#"{"driver":"virtio-rng-pci","props":{"vectors":[2]}}"#
        ))
        .contains("device 0: Invalid parameter type for 'vectors', expected: integer"));
        assert!(e(&file(
            r#"{"driver":"virtio-rng-pci","id":"a","props":{"id":"b"}}"#
        ))
        .contains("Parameter 'id' given more than once"));
        assert!(e(&file(r#"{"driver":"virtio-blk-pci"}"#))
            .contains("device 0: virtio-blk-pci: 'file' property is required"));
        assert!(e(&file(
            r#"{"driver":"virtio-rng-pci","id":"a"},{"driver":"virtio-rng-pci","id":"a"}"#
        ))
        .contains("duplicate device id 'a'"));
        assert!(e(&file(
            r#"{"driver":"virtio-rng-pci","addr":"5"},{"driver":"virtio-rng-pci","addr":"05.0"}"#
        ))
        .contains("two devices at address 05.0"));
        assert!(
            e(&file(r#"{"driver":"virtio-rng-pci","addr":"40"}"#)).contains("invalid PCI address")
        );
        assert!(e(&file(r#"{"driver":"nosuch"}"#)).contains("not a valid device model name"));
        assert!(
            e(r#"{"format":"vmm-machine","version":1,"memory_mib":"lots"}"#)
                .contains("not a machine description")
        );
    }

    #[test]
    fn cli_devices_replace_by_id_or_append() {
        let f: Vec<DeviceSpec> = ["virtio-rng-pci,id=a,addr=5", "virtio-rng-pci,id=b"]
            .iter()
            .map(|s| parse_device(s).unwrap())
            .collect();
        let c = vec![
            parse_device("virtio-rng-pci,id=a,addr=7").unwrap(),
            parse_device("virtio-rng-pci,id=c").unwrap(),
        ];
        let m = merge_devices(&f, c);
        let got: Vec<String> = m
            .iter()
            .map(|d| format!("{}@{:?}", d.id.clone().unwrap(), d.addr))
            .collect();
        assert_eq!(got, ["a@Some((7, None))", "b@None", "c@None"]);
        // Duplicates on the command line are not merged away.
        let twice = vec![
            parse_device("virtio-rng-pci,id=z").unwrap(),
            parse_device("virtio-rng-pci,id=z").unwrap(),
        ];
        assert_eq!(merge_devices(&[], twice).len(), 2);
    }
}
