//! Compat hints: what a compat record and `--global` options change about the devices of a
//! new start, and the record written back afterwards.
//!
//! Precedence of a device property, strongest first:
//! 1. set on the command line (`--device ...,vectors=4`): it wins, and when it differs from the
//!    record a warning names both values;
//! 2. pinned by the compat record for that device id (same driver);
//! 3. `--global DRIVER.PROP=VALUE`;
//! 4. the driver's default.
//!
//! Addresses: an explicit `addr=` wins; otherwise a device whose id is in the record gets the
//! recorded address (see [`crate::device_manager::place`]). Record entries for ids that are gone,
//! or that now name another driver, are ignored.

use std::collections::{BTreeMap, HashMap};

use pci::record::{diff, Change, CompatRecord, DeviceRecord, Fingerprint, MachineRecord};
use pci::ExtendedConfig;

use crate::device_config::check_prop;
use crate::device_config::{parse_prop, RawValue};
use crate::device_manager::{DeviceError, DeviceSpec, Hint, Realized, ROOT_BUS};
use crate::drivers::driver;
use crate::layout::{
    ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START, PCI_MMIO64_SIZE, PCI_MMIO64_START,
};

/// `--global DRIVER.PROP=VALUE` defaults, by driver then property.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Globals(BTreeMap<String, BTreeMap<String, String>>);

impl Globals {
    /// Parses and checks every `--global` option.
    pub fn parse(options: &[String]) -> Result<Self, DeviceError> {
        let mut g = Globals::default();
        for o in options {
            let bad = || DeviceError::BadGlobal(o.clone());
            let (key, value) = o.split_once('=').ok_or_else(bad)?;
            let (drv, prop) = key.split_once('.').ok_or_else(bad)?;
            let info = driver(drv).ok_or_else(|| DeviceError::UnknownDriver(drv.to_string()))?;
            if !info.props.iter().any(|p| p.name == prop) {
                return Err(DeviceError::UnknownProperty {
                    driver: drv.into(),
                    prop: prop.into(),
                });
            }
            check_prop(drv, prop, value)?;
            g.0.entry(drv.to_string())
                .or_default()
                .insert(prop.to_string(), value.to_string());
        }
        Ok(g)
    }

    /// The global value of `driver.prop`, if any.
    pub fn get(&self, driver: &str, prop: &str) -> Option<&str> {
        self.0.get(driver)?.get(prop).map(String::as_str)
    }
}

/// The recorded entry for a device, when the record has one for this id and driver.
fn recorded<'a>(
    record: Option<&'a CompatRecord>,
    id: Option<&str>,
    drv: &str,
) -> Option<&'a DeviceRecord> {
    record?.devices.get(id?).filter(|d| d.driver == drv)
}

/// Applies record pins and globals to the specs' ABI-shaping properties (see the module docs
/// for the order). Returns the resolved specs and the warnings to show.
pub fn resolve_props(
    specs: &[DeviceSpec],
    record: Option<&CompatRecord>,
    globals: &Globals,
) -> (Vec<DeviceSpec>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut out = Vec::with_capacity(specs.len());
    for s in specs {
        let mut s = s.clone();
        let info = s.config.info();
        let rec = recorded(record, s.id.as_deref(), info.name);
        // A recorded multifunction function 0 (header type bit 7) stays one: its other
        // functions go back to their recorded places, and the guest sees the same header.
        if rec.is_some_and(|r| r.fingerprint.header_type & 0x80 != 0) {
            s.multifunction = true;
        }
        for p in info.props.iter().filter(|p| p.abi) {
            // Recorded values are strings (the fingerprint's shape); a value this build cannot
            // read is ignored with a warning.
            let pinned = rec
                .and_then(|r| r.fingerprint.props.get(p.name))
                .and_then(
                    |old| match parse_prop(info.name, p.name, RawValue::Text(old)) {
                        Ok(v) => Some(v),
                        Err(e) => {
                            warnings.push(format!(
                                "{}: ignoring the compat record's {}: {e}",
                                s.id.as_deref().unwrap_or(info.name),
                                p.name
                            ));
                            None
                        }
                    },
                );
            match (s.config.get(p.name), pinned) {
                (Some(explicit), Some(old)) if explicit != old => warnings.push(format!(
                    "{}: {}={} on the command line differs from the compat record ({}); using {}",
                    s.id.as_deref().unwrap_or(info.name),
                    p.name,
                    explicit.to_text(),
                    old.to_text(),
                    explicit.to_text()
                )),
                (Some(_), _) => {}
                (None, Some(old)) => {
                    s.config.set(p.name, old);
                }
                (None, None) => {
                    let global = globals
                        .get(info.name, p.name)
                        .and_then(|v| parse_prop(info.name, p.name, RawValue::Text(v)).ok());
                    if let Some(v) = global {
                        s.config.set(p.name, v);
                    }
                }
            }
        }
        out.push(s);
    }
    (out, warnings)
}

/// Recorded places (bus by name, slot, function) by device id, for devices that still exist
/// with the same driver.
pub fn hints(specs: &[DeviceSpec], record: Option<&CompatRecord>) -> HashMap<String, Hint> {
    specs
        .iter()
        .filter_map(|s| {
            let r = recorded(record, s.id.as_deref(), s.driver())?;
            let hint = Hint {
                bus: r.bus.clone().unwrap_or_else(|| ROOT_BUS.to_string()),
                slot: r.addr.device(),
                function: r.addr.function(),
            };
            Some((s.id.clone()?, hint))
        })
        .collect()
}

/// The guest-visible machine properties a machine keeps across restarts (its compat record's
/// machine part, beyond the fixed layout): each one is what the command line or machine file
/// asks for, else what the record says (the old behaviour for a record from before the
/// property), else the new behaviour for a new machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineProps {
    /// ACPI PCI hot-plug on bus 0.
    pub pci_hotplug: bool,
    /// ACPI PCI hot-plug behind bridges too (only with `pci_hotplug`).
    pub pci_hotplug_bridges: bool,
    /// What the extended config space of the functions reads.
    pub extended_config: ExtendedConfig,
    /// The 64-bit PCI window: 64-bit BARs above 4 GiB, in the host bridge's `_CRS` and the
    /// bridges' prefetchable windows.
    pub mmio64: bool,
    /// The type-1 config ports 0xcf8-0xcff (off: config space through ECAM alone).
    pub pci_config_ports: bool,
}

/// The machine properties as the command line or machine file ask for them; `None`: not
/// asked for (the record's value, else the new machine's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AskedProps {
    /// `--hotplug`, machine file `pci_hotplug`.
    pub pci_hotplug: Option<bool>,
    /// `--hotplug-bridges`, machine file `pci_hotplug_bridges`.
    pub pci_hotplug_bridges: Option<bool>,
    /// Machine file `extended_config`.
    pub extended_config: Option<ExtendedConfig>,
    /// Machine file `mmio64_window`.
    pub mmio64: Option<bool>,
    /// `--pci-config-ports`, machine file `pci_config_ports`.
    pub pci_config_ports: Option<bool>,
}

impl MachineProps {
    /// A new machine's properties.
    pub const NEW: MachineProps = MachineProps {
        pci_hotplug: true,
        pci_hotplug_bridges: true,
        extended_config: ExtendedConfig::AllOnes,
        mmio64: true,
        pci_config_ports: true,
    };

    /// Resolves each property: `asked` (command line / machine file) over `record` over
    /// [`MachineProps::NEW`]. Hot-plug behind bridges needs hot-plug: without hot-plug it is
    /// off (a record without hot-plug says nothing about bridges), and asking for it on a
    /// machine without hot-plug is an error.
    pub fn resolve(
        asked: &AskedProps,
        record: Option<&MachineRecord>,
    ) -> Result<MachineProps, String> {
        let new = MachineProps::NEW;
        let hotplug = asked
            .pci_hotplug
            .or(record.map(|r| r.pci_hotplug))
            .unwrap_or(new.pci_hotplug);
        if !hotplug && asked.pci_hotplug_bridges == Some(true) {
            return Err(
                "hot-plug behind bridges (--hotplug-bridges on) needs ACPI PCI hot-plug (--hotplug on)"
                    .into(),
            );
        }
        Ok(MachineProps {
            pci_hotplug: hotplug,
            pci_hotplug_bridges: hotplug
                && asked
                    .pci_hotplug_bridges
                    .or(record
                        .filter(|r| r.pci_hotplug)
                        .map(|r| r.pci_hotplug_bridges))
                    .unwrap_or(new.pci_hotplug_bridges),
            extended_config: asked
                .extended_config
                .or(record.map(|r| r.extended_config))
                .unwrap_or(new.extended_config),
            mmio64: asked
                .mmio64
                .or(record.map(|r| r.mmio64_window.is_some()))
                .unwrap_or(new.mmio64),
            pci_config_ports: asked
                .pci_config_ports
                .or(record.map(|r| r.pci_config_ports))
                .unwrap_or(new.pci_config_ports),
        })
    }
}

/// The machine part of every record this build writes.
pub fn machine_record(props: MachineProps) -> MachineRecord {
    MachineRecord {
        pci_hotplug: props.pci_hotplug,
        pci_hotplug_bridges: props.pci_hotplug_bridges,
        extended_config: props.extended_config,
        mmio64_window: props.mmio64.then_some((PCI_MMIO64_START, PCI_MMIO64_SIZE)),
        pci_config_ports: props.pci_config_ports,
        host_bridge_vendor: pci::root::HOST_BRIDGE_VENDOR,
        host_bridge_device: pci::root::HOST_BRIDGE_DEVICE,
        ecam_base: ECAM_START,
        mmio32_window: (PCI_MMIO32_START, PCI_MMIO32_SIZE),
    }
}

/// The record of the realized devices.
pub fn record_of(devices: &[Realized], props: MachineProps) -> CompatRecord {
    let devices = devices
        .iter()
        .map(|r| {
            (
                r.placed.id.clone(),
                DeviceRecord {
                    driver: r.placed.spec.driver().to_string(),
                    bus: (r.placed.bus != ROOT_BUS).then(|| r.placed.bus.clone()),
                    addr: r.placed.addr,
                    fingerprint: Fingerprint::of(r.function.config(), r.abi.clone()),
                },
            )
        })
        .collect();
    CompatRecord::new(machine_record(props), devices)
}

/// `--compat-strict`: every change to a device present in both records (or to the machine),
/// or `Ok` when there is none.
pub fn strict_check(old: &CompatRecord, new: &CompatRecord) -> Result<(), Vec<Change>> {
    let breaking: Vec<Change> = diff(old, new)
        .into_iter()
        .filter(Change::breaks_abi)
        .collect();
    if breaking.is_empty() {
        Ok(())
    } else {
        Err(breaking)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_config::PropValue;
    use crate::device_manager::parse_device;
    use pci::PciAddress;

    fn rec(id: &str, vectors: &str) -> CompatRecord {
        let fp = Fingerprint {
            vendor: 0x1af4,
            device: 0x1044,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
            class: 0xff00,
            revision: 1,
            header_type: 0,
            interrupt_pin: 1,
            bars: vec![],
            capabilities: vec![],
            msix_table_size: None,
            props: [("vectors".to_string(), vectors.to_string())].into(),
        };
        CompatRecord::new(
            machine_record(MachineProps::NEW),
            [(
                id.to_string(),
                DeviceRecord {
                    driver: "virtio-rng-pci".into(),
                    bus: None,
                    addr: PciAddress::new(0, 7, 0).unwrap(),
                    fingerprint: fp,
                },
            )]
            .into(),
        )
    }

    fn specs(list: &[&str]) -> Vec<DeviceSpec> {
        list.iter().map(|s| parse_device(s).unwrap()).collect()
    }

    #[test]
    fn hotplug_props_come_from_the_command_line_then_the_record_then_on() {
        let r = |hp, br| (hp, br);
        let resolve = |hp, br, rec: Option<&MachineRecord>| {
            let asked = AskedProps {
                pci_hotplug: hp,
                pci_hotplug_bridges: br,
                ..AskedProps::default()
            };
            MachineProps::resolve(&asked, rec).map(|p| (p.pci_hotplug, p.pci_hotplug_bridges))
        };
        let rec = |hp, br| {
            machine_record(MachineProps {
                pci_hotplug: hp,
                pci_hotplug_bridges: br,
                ..MachineProps::NEW
            })
        };
        // A new machine: both on.
        assert_eq!(resolve(None, None, None), Ok(r(true, true)));
        // A record from before bridge hot-plug (hot-plug on, the property absent = false).
        let old: MachineRecord = serde_json::from_value(serde_json::json!({
            "host_bridge_vendor": 0x1b36, "host_bridge_device": 8,
            "ecam_base": 0xe000_0000u64, "mmio32_window": [0xc000_0000u64, 0x2000_0000u64],
            "pci_hotplug": true
        }))
        .unwrap();
        assert!(!old.pci_hotplug_bridges, "absent means off");
        assert_eq!(
            resolve(None, None, Some(&old)),
            Ok(r(true, false)),
            "an old record keeps no slot objects behind bridges"
        );
        assert_eq!(resolve(None, Some(true), Some(&old)), Ok(r(true, true)));
        assert_eq!(
            resolve(None, None, Some(&rec(true, true))),
            Ok(r(true, true))
        );
        // Without hot-plug there is none behind bridges either.
        assert_eq!(resolve(Some(false), None, None), Ok(r(false, false)));
        assert_eq!(
            resolve(None, None, Some(&rec(false, false))),
            Ok(r(false, false))
        );
        assert_eq!(
            resolve(Some(true), None, Some(&rec(false, false))),
            Ok(r(true, true)),
            "a record without hot-plug says nothing about bridges"
        );
        assert!(resolve(Some(false), Some(true), None)
            .unwrap_err()
            .contains("--hotplug-bridges on"));
        assert_eq!(resolve(Some(false), Some(false), None), Ok(r(false, false)));
    }

    #[test]
    fn precedence_explicit_then_record_then_global() {
        let g = Globals::parse(&["virtio-rng-pci.vectors=4".to_string()]).unwrap();
        let r = rec("old", "2");
        let (s, w) = resolve_props(
            &specs(&[
                "virtio-rng-pci,id=old",
                "virtio-rng-pci,id=new",
                "virtio-rng-pci,id=x,vectors=3",
            ]),
            Some(&r),
            &g,
        );
        assert_eq!(
            s[0].config.vectors(),
            Some(2),
            "the record pins the old value"
        );
        assert_eq!(
            s[1].config.vectors(),
            Some(4),
            "a new device takes the global"
        );
        assert_eq!(s[2].config.vectors(), Some(3), "explicit wins");
        assert!(w.is_empty());
        // The same number in another spelling is no change.
        let (s, w) = resolve_props(&specs(&["virtio-rng-pci,id=old,vectors=0x2"]), Some(&r), &g);
        assert_eq!(s[0].config.vectors(), Some(2));
        assert!(w.is_empty(), "{w:?}");
        let (s, w) = resolve_props(&specs(&["virtio-rng-pci,id=old,vectors=5"]), Some(&r), &g);
        assert_eq!(s[0].config.vectors(), Some(5));
        assert_eq!(
            w,
            ["old: vectors=5 on the command line differs from the compat record (2); using 5"]
        );
    }

    #[test]
    fn typed_globals_and_unreadable_record_values() {
        let g = Globals::parse(&["virtio-blk-pci.readonly=on".to_string()]).unwrap();
        let (s, _) = resolve_props(
            &specs(&[
                "virtio-blk-pci,file=/a,,b",
                "virtio-blk-pci,file=/c,readonly=off",
            ]),
            None,
            &g,
        );
        assert_eq!(s[0].config.get("readonly"), Some(PropValue::Bool(true)));
        assert_eq!(s[1].config.get("readonly"), Some(PropValue::Bool(false)));
        let (s, w) = resolve_props(
            &specs(&["virtio-rng-pci,id=old"]),
            Some(&rec("old", "x")),
            &g,
        );
        assert_eq!(s[0].config.vectors(), None, "the default applies");
        assert_eq!(w.len(), 1);
        assert!(
            w[0].starts_with("old: ignoring the compat record's vectors: "),
            "{w:?}"
        );
    }

    #[test]
    fn a_recorded_multifunction_function_0_stays_one() {
        let mut r = rec("f0", "2");
        let g = Globals::default();
        let (s, _) = resolve_props(&specs(&["virtio-rng-pci,id=f0"]), Some(&r), &g);
        assert!(!s[0].multifunction);
        r.devices.get_mut("f0").unwrap().fingerprint.header_type = 0x80;
        let (s, w) = resolve_props(
            &specs(&["virtio-rng-pci,id=f0", "virtio-rng-pci,id=new"]),
            Some(&r),
            &g,
        );
        assert!(s[0].multifunction, "the record's header type");
        assert!(!s[1].multifunction);
        assert!(w.is_empty());
    }

    #[test]
    fn hints_only_for_surviving_ids_with_the_same_driver() {
        let r = rec("a", "2");
        let h = hints(
            &specs(&["virtio-rng-pci,id=a", "virtio-rng-pci,id=b"]),
            Some(&r),
        );
        assert_eq!(h.len(), 1);
        assert_eq!(h["a"], Hint::root(PciAddress::new(0, 7, 0).unwrap()));
        assert!(hints(&specs(&["virtio-rng-pci"]), Some(&r)).is_empty());
    }

    #[test]
    fn bad_globals_are_refused() {
        let e = |s: &str| Globals::parse(&[s.to_string()]).unwrap_err().to_string();
        assert_eq!(
            e("virtio-rng-pci.nosuch=1"),
            "Property 'virtio-rng-pci.nosuch' not found"
        );
        assert_eq!(
            e("nosuch.vectors=1"),
            "'nosuch' is not a valid device model name"
        );
        assert!(e("virtio-rng-pci.vectors=x").contains("can't take value 'x'"));
        assert!(e("novalue").contains("DRIVER.PROP=VALUE"));
    }

    #[test]
    fn machine_props_asked_then_recorded_then_new() {
        let none = AskedProps::default();
        let new = MachineProps::resolve(&none, None).unwrap();
        assert_eq!(new, MachineProps::NEW);
        assert_eq!(new.extended_config, ExtendedConfig::AllOnes);
        assert!(new.pci_config_ports, "a new machine has the type-1 ports");
        let mut old = machine_record(MachineProps::NEW);
        old.pci_hotplug = false;
        old.extended_config = ExtendedConfig::Zero;
        old.mmio64_window = None;
        old.pci_config_ports = false;
        let kept = MachineProps::resolve(&none, Some(&old)).unwrap();
        assert!(!kept.pci_config_ports);
        assert!(!machine_record(kept).pci_config_ports);
        assert_eq!(
            (kept.pci_hotplug, kept.extended_config, kept.mmio64),
            (false, ExtendedConfig::Zero, false)
        );
        assert_eq!(machine_record(kept).mmio64_window, None);
        assert_eq!(
            machine_record(MachineProps::NEW).mmio64_window,
            Some((0x40_0000_0000, 0x20_0000_0000))
        );
        let asked = MachineProps::resolve(
            &AskedProps {
                pci_hotplug: Some(true),
                extended_config: Some(ExtendedConfig::AllOnes),
                mmio64: Some(true),
                pci_config_ports: Some(true),
                ..AskedProps::default()
            },
            Some(&old),
        )
        .unwrap();
        assert_eq!(asked, MachineProps::NEW);
        assert_eq!(
            machine_record(asked).extended_config,
            ExtendedConfig::AllOnes
        );
        assert_eq!(machine_record(kept).extended_config, ExtendedConfig::Zero);
    }
}
