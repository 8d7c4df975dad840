//! `vmm abi show RECORD` and `vmm abi diff OLD NEW`: compat records for people and tools.

use std::path::Path;

use pci::record::{diff, Change, CompatRecord};

/// `vmm abi show`: an `lspci -n`-like line per device plus its fingerprint. Exit status.
pub fn show(path: &Path, json: bool) -> i32 {
    let r = match CompatRecord::load(path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm: {e}");
            return 2;
        }
    };
    if json {
        print!("{}", r.to_json());
        return 0;
    }
    println!(
        "00:00.0 0600: {:04x}:{:04x} (host bridge; ECAM at {:#x})",
        r.machine.host_bridge_vendor, r.machine.host_bridge_device, r.machine.ecam_base
    );
    println!(
        "        machine: pci_hotplug {}, extended_config {}, mmio64_window {}, pci_config_ports {}",
        if r.machine.pci_hotplug { "on" } else { "off" },
        r.machine.extended_config,
        match r.machine.mmio64_window {
            Some((base, size)) => format!("{base:#x} size {size:#x}"),
            None => "none".to_string(),
        },
        if r.machine.pci_config_ports { "on" } else { "off" },
    );
    let mut devices: Vec<_> = r.devices.iter().collect();
    devices.sort_by_key(|(_, d)| d.addr);
    for (id, d) in devices {
        let f = &d.fingerprint;
        println!(
            "{} {:04x}: {:04x}:{:04x} (rev {:02x})  id={id} driver={}",
            d.addr,
            f.class >> 8,
            f.vendor,
            f.device,
            f.revision,
            d.driver
        );
        println!(
            "        subsystem {:04x}:{:04x}, header {:#04x}, pin {}{}",
            f.subsystem_vendor,
            f.subsystem,
            f.header_type,
            f.interrupt_pin,
            f.msix_table_size
                .map(|n| format!(", MSI-X {n} vectors"))
                .unwrap_or_default()
        );
        for b in &f.bars {
            println!(
                "        BAR{} {}{} size {:#x}",
                b.index,
                b.kind,
                if b.prefetchable { " prefetchable" } else { "" },
                b.size
            );
        }
        for c in &f.capabilities {
            match &c.virtio {
                Some(v) => println!(
                    "        cap [{:02x}] id {:#04x} len {} virtio cfg_type {} bar {} offset {:#x} length {:#x}",
                    c.offset, c.id, c.len, v.cfg_type, v.bar, v.offset, v.length
                ),
                None => println!("        cap [{:02x}] id {:#04x} len {}", c.offset, c.id, c.len),
            }
        }
        if !f.props.is_empty() {
            let props: Vec<String> = f.props.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("        props {}", props.join(" "));
        }
    }
    0
}

/// `vmm abi diff`: exit 0 when no device present in both records changed (nor the machine),
/// 1 when one did, 2 on error.
pub fn diff_records(old: &Path, new: &Path, json: bool) -> i32 {
    let (a, b) = match (CompatRecord::load(old), CompatRecord::load(new)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vmm: {e}");
            return 2;
        }
    };
    let changes = diff(&a, &b);
    let breaking = changes.iter().any(Change::breaks_abi);
    if json {
        let v = serde_json::json!({ "abi_changed": breaking, "changes": changes });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if changes.is_empty() {
        println!("no differences");
    } else {
        for c in &changes {
            println!("{c}");
        }
    }
    i32::from(breaking)
}
