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

use crate::device_config::check_prop;
use crate::device_config::{parse_prop, RawValue};
use crate::device_manager::{DeviceError, DeviceSpec, Hint, Realized, ROOT_BUS};
use crate::drivers::driver;
use crate::layout::{ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START};

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

/// The machine part of every record this build writes.
pub fn machine_record(pci_hotplug: bool) -> MachineRecord {
    MachineRecord {
        pci_hotplug,
        host_bridge_vendor: pci::root::HOST_BRIDGE_VENDOR,
        host_bridge_device: pci::root::HOST_BRIDGE_DEVICE,
        ecam_base: ECAM_START,
        mmio32_window: (PCI_MMIO32_START, PCI_MMIO32_SIZE),
    }
}

/// The record of the realized devices.
pub fn record_of(devices: &[Realized], pci_hotplug: bool) -> CompatRecord {
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
    CompatRecord::new(machine_record(pci_hotplug), devices)
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
            machine_record(true),
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
}
