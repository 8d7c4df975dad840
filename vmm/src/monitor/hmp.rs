//! `human-monitor-command`: the HMP commands this monitor knows, printing as QEMU's do.
//!
//! Like QEMU's, the output's line ends are `\r\n` (QEMU's monitor turns every `\n` into
//! `\r\n`, also for output returned through QMP).

use std::fmt::Write;

use super::control::{class_desc, sorted};
use super::control::{GsiInfo, PciFunctionInfo, RegionKind, RunState, VmControl};
use super::option::split_opts;

/// `(name, params, help)`, as QEMU's `help` prints them.
const COMMANDS: &[(&str, &str, &str)] = &[
    ("cont|c", "", "resume emulation"),
    (
        "device_add",
        "driver[,prop=value][,...]",
        "add device, like -device on the command line",
    ),
    ("device_del", "device", "remove device"),
    ("help|?", "[cmd]", "show the help"),
    (
        "info",
        "[subcommand]",
        "show various information about the system state",
    ),
    ("quit|q", "", "quit the emulator"),
    ("stop", "", "stop emulation"),
    ("system_reset", "", "reset the system"),
];

const INFO: &[(&str, &str, &str)] = &[
    (
        "gsi",
        "",
        "show the interrupt wiring (MSI GSIs, KVM GSI routes, INTx lines)",
    ),
    ("pci", "", "show PCI info"),
    ("qtree", "", "show device tree"),
    (
        "stats",
        "target [names] [provider]",
        "show statistics for the given target (vm or vcpu); optionally filter by name (comma-separated list, or '*' for all) and provider",
    ),
    ("status", "", "show the current VM status (running|paused)"),
    (
        "virtio",
        "",
        "show virtio devices' state (status, MSI-X vectors, queue rings)",
    ),
];

/// Runs one HMP command line, returns its output (`\r\n` line ends). `quit` is not run here:
/// it sets `*quit` so that the caller calls [`VmControl::quit`] once the reply is written.
pub fn run(backend: &dyn VmControl, line: &str, quit: &mut bool) -> String {
    let out = run_lf(backend, line, quit);
    out.replace('\n', "\r\n")
}

fn find<'a>(table: &'a [(&'a str, &'a str, &'a str)], name: &str) -> Option<&'a str> {
    table
        .iter()
        .map(|c| c.0)
        .find(|n| n.split('|').any(|a| a == name))
}

fn help_list(prefix: &str, table: &[(&str, &str, &str)], only: Option<&str>) -> String {
    let mut s = String::new();
    for (name, params, help) in table {
        if only.is_some_and(|o| !name.split('|').any(|a| a == o)) {
            continue;
        }
        let _ = writeln!(s, "{prefix}{name} {params} -- {help}");
    }
    s
}

fn run_lf(backend: &dyn VmControl, line: &str, quit: &mut bool) -> String {
    let line = line.trim_start();
    let (cmd, rest) = match line.find(char::is_whitespace) {
        Some(i) => (&line[..i], line[i..].trim()),
        None => (line, ""),
    };
    if cmd.is_empty() {
        return String::new();
    }
    let Some(name) = find(COMMANDS, cmd) else {
        return format!("unknown command: '{cmd}'\n");
    };
    let done = |r: Result<(), super::CommandError>| match r {
        Ok(()) => String::new(),
        Err(e) => format!("Error: {}\n", e.desc),
    };
    let no_args = ["cont|c", "stop", "system_reset", "quit|q"];
    if no_args.contains(&name) && !rest.is_empty() {
        return format!("{cmd}: extraneous characters at the end of line\n");
    }
    match name {
        "cont|c" => done(backend.cont()),
        "stop" => done(backend.stop()),
        "system_reset" => done(backend.system_reset()),
        "quit|q" => {
            *quit = true;
            String::new()
        }
        "help|?" => {
            if rest.is_empty() {
                help_list("", COMMANDS, None)
            } else if rest == "info" {
                help_list("info ", INFO, None)
            } else if let Some(sub) = rest.strip_prefix("info ") {
                help_list("info ", INFO, Some(sub.trim()))
            } else if find(COMMANDS, rest).is_some() {
                help_list("", COMMANDS, Some(rest))
            } else {
                format!("unknown command: '{rest}'\n")
            }
        }
        "device_add" => {
            if rest.is_empty() {
                return "Error: Parameter 'driver' is missing\n".to_string();
            }
            // HMP's argument is `--device` text: every value a string, as QEMU's HMP gives
            // them to device_add.
            let mut parts = split_opts(rest).into_iter();
            let first = parts.next().unwrap_or_default();
            let driver = first
                .strip_prefix("driver=")
                .map(str::to_string)
                .unwrap_or(first);
            let mut args = serde_json::Map::new();
            args.insert("driver".into(), driver.into());
            for kv in parts {
                let (k, v) = match kv.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (kv, "on".to_string()),
                };
                if args.insert(k.clone(), v.into()).is_some() {
                    return format!("Error: Parameter '{k}' given more than once\n");
                }
            }
            done(backend.device_add(&args))
        }
        "device_del" => {
            if rest.is_empty() {
                return "Error: Parameter 'id' is missing\n".to_string();
            }
            done(backend.device_del(rest))
        }
        "info" => {
            if rest.is_empty() {
                return help_list("info ", INFO, None);
            }
            let (sub, extra) = match rest.find(char::is_whitespace) {
                Some(i) => (&rest[..i], rest[i..].trim()),
                None => (rest, ""),
            };
            let Some(found) = find(INFO, sub) else {
                return format!("unknown command: 'info {sub}'\n");
            };
            if found == "stats" {
                let args: Vec<&str> = extra.split_whitespace().collect();
                return super::stats::info_stats(backend, &args);
            }
            if !extra.is_empty() {
                return format!("{sub}: extraneous characters at the end of line\n");
            }
            match found {
                "pci" => info_pci(&backend.pci_functions()),
                "qtree" => info_qtree(&backend.pci_functions()),
                "virtio" => info_virtio(&backend.device_reports()),
                "gsi" => info_gsi(backend.gsi_info().as_ref()),
                _ => info_status(backend.status()),
            }
        }
        _ => format!("unknown command: '{cmd}'\n"),
    }
}

/// `info status`.
pub fn info_status(s: RunState) -> String {
    match s {
        RunState::Running => "VM status: running\n".to_string(),
        RunState::Paused => "VM status: paused\n".to_string(),
        other => format!("VM status: paused ({})\n", other.as_str()),
    }
}

/// `info pci` (QEMU 7.2's layout; `\n` line ends).
pub fn info_pci(functions: &[PciFunctionInfo]) -> String {
    let mut s = String::new();
    info_pci_bus(&mut s, functions, 0);
    s
}

/// The functions of bus `bus`, each bridge followed by the bus behind it (QEMU's
/// `hmp_info_pci_device` recursion).
fn info_pci_bus(s: &mut String, functions: &[PciFunctionInfo], bus: u8) {
    for f in sorted(functions).into_iter().filter(|f| f.bus == bus) {
        let _ = writeln!(
            s,
            "  Bus {:2}, device {:3}, function {}:",
            f.bus, f.slot, f.function
        );
        match class_desc(f.class) {
            Some(d) => s.push_str(&format!("    {d}")),
            // QEMU prints the class in decimal here ("Class %04" PRId64).
            None => s.push_str(&format!("    Class {:04}", f.class)),
        }
        let _ = writeln!(s, ": PCI device {:04x}:{:04x}", f.vendor, f.device);
        if f.bridge.is_none() {
            let _ = writeln!(
                s,
                "      PCI subsystem {:04x}:{:04x}",
                f.subsystem_vendor, f.subsystem
            );
        }
        if f.irq_pin != 0 {
            let pin = (b'A' + f.irq_pin.saturating_sub(1).min(25)) as char;
            let _ = writeln!(s, "      IRQ {}, pin {pin}", f.irq_line);
        }
        if let Some(b) = &f.bridge {
            let _ = writeln!(s, "      BUS {}.", b.number);
            let _ = writeln!(s, "      secondary bus {}.", b.secondary);
            let _ = writeln!(s, "      subordinate bus {}.", b.subordinate);
            let _ = writeln!(
                s,
                "      IO range [0x{:04x}, 0x{:04x}]",
                b.io_range.0, b.io_range.1
            );
            let _ = writeln!(
                s,
                "      memory range [0x{:08x}, 0x{:08x}]",
                b.memory_range.0, b.memory_range.1
            );
            let _ = writeln!(
                s,
                "      prefetchable memory range [0x{:08x}, 0x{:08x}]",
                b.prefetchable_range.0, b.prefetchable_range.1
            );
        }
        for r in &f.regions {
            let _ = write!(s, "      BAR{}: ", r.bar);
            let end = r.address.wrapping_add(r.size).wrapping_sub(1);
            let mapped = r.address != u64::MAX;
            match (r.kind, mapped) {
                (RegionKind::Io, true) => {
                    let _ = writeln!(s, "I/O at 0x{:04x} [0x{end:04x}].", r.address);
                }
                (RegionKind::Io, false) => s.push_str("I/O (not mapped)\n"),
                (RegionKind::Memory, m) => {
                    let bits = if r.mem_type_64 { 64 } else { 32 };
                    let pf = if r.prefetch { " prefetchable" } else { "" };
                    if m {
                        let _ = writeln!(
                            s,
                            "{bits} bit{pf} memory at 0x{:08x} [0x{end:08x}].",
                            r.address
                        );
                    } else {
                        let _ = writeln!(s, "{bits} bit{pf} memory (not mapped)");
                    }
                }
            }
        }
        let _ = writeln!(s, "      id \"{}\"", f.qdev_id);
        if let Some(b) = &f.bridge {
            if b.secondary > bus {
                info_pci_bus(s, functions, b.secondary);
            }
        }
    }
}

/// `info virtio` (our layout, not QEMU's): each virtio function by address with its id, then
/// the report of its transport, in address order.
pub fn info_virtio(reports: &[(pci::PciAddress, String, String)]) -> String {
    let mut sorted: Vec<_> = reports.iter().collect();
    sorted.sort_by_key(|(addr, _, _)| *addr);
    let mut out = String::new();
    for (addr, id, report) in sorted {
        out += &format!("{addr} id \"{id}\"\n{report}");
    }
    if out.is_empty() {
        out = "no virtio devices\n".into();
    }
    out
}

/// `info gsi` (ours, not QEMU's): the GSIs allocated to MSI-X vectors (`*`: routed now), the
/// size of KVM's GSI routing table and the INTx lines, one `name: count` per line.
pub fn info_gsi(info: Option<&GsiInfo>) -> String {
    let Some(info) = info else {
        return "no interrupt wiring to report\n".into();
    };
    let list: Vec<String> = info
        .msi
        .iter()
        .map(|(gsi, routed)| format!("{gsi}{}", if *routed { "*" } else { "" }))
        .collect();
    let routed = info.msi.iter().filter(|(_, r)| *r).count();
    let mut s = format!("MSI GSIs allocated: {}", info.msi.len());
    if !list.is_empty() {
        let _ = write!(s, " ({})", list.join(" "));
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "MSI GSIs routed: {routed}");
    let _ = writeln!(s, "KVM GSI routes: {}", info.routes);
    let _ = writeln!(s, "INTx lines: {}", info.intx_lines);
    s
}

/// `info qtree`, simplified: the PCIe host with its bus and the PCI functions on it, each
/// bridge's bus (named by its id, `type PCI`) nested under it with the functions behind it,
/// as QEMU prints it (functions in address order).
pub fn info_qtree(functions: &[PciFunctionInfo]) -> String {
    let mut s = String::new();
    s.push_str("bus: main-system-bus\n  type System\n");
    s.push_str("  dev: gpex-pcihost, id \"\"\n");
    s.push_str("    bus: pci.0\n      type PCIE\n");
    qtree_bus(&mut s, functions, 0, 6);
    s
}

/// The functions of bus `bus` at `indent`, each bridge followed by its bus.
fn qtree_bus(s: &mut String, functions: &[PciFunctionInfo], bus: u8, indent: usize) {
    let dev = " ".repeat(indent);
    let ind = " ".repeat(indent + 2);
    for f in sorted(functions).into_iter().filter(|f| f.bus == bus) {
        let _ = writeln!(s, "{dev}dev: {}, id \"{}\"", f.driver, f.qdev_id);
        let _ = writeln!(s, "{ind}addr = {:02x}.{:x}", f.slot, f.function);
        for (k, v) in &f.props {
            if k != "addr" {
                let _ = writeln!(s, "{ind}{k} = {v}");
            }
        }
        let ctxt = match class_desc(f.class) {
            Some(d) => d.to_string(),
            None => format!("Class {:04x}", f.class),
        };
        let _ = writeln!(
            s,
            "{ind}class {ctxt}, addr {:02x}:{:02x}.{:x}, pci id {:04x}:{:04x} (sub {:04x}:{:04x})",
            f.bus, f.slot, f.function, f.vendor, f.device, f.subsystem_vendor, f.subsystem
        );
        for r in &f.regions {
            let kind = match r.kind {
                RegionKind::Io => "i/o",
                RegionKind::Memory => "mem",
            };
            let end = r.address.wrapping_add(r.size).wrapping_sub(1);
            let _ = writeln!(
                s,
                "{ind}bar {}: {kind} at 0x{:x} [0x{end:x}]",
                r.bar, r.address
            );
        }
        if let Some(b) = &f.bridge {
            let _ = writeln!(s, "{ind}bus: {}\n{ind}  type PCI", f.qdev_id);
            // Only buses above the bridge's own: a guest's numbering cannot loop us.
            if b.secondary > bus {
                qtree_bus(s, functions, b.secondary, indent + 4);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> PciFunctionInfo {
        crate::monitor::testing::virtio_rng_info()
    }

    #[test]
    fn info_pci_layout() {
        assert_eq!(
            info_pci(&[rng()]),
            "  Bus  0, device   5, function 0:\n    Class 0255: PCI device 1af4:1044\n      PCI subsystem 1af4:1100\n      IRQ 0, pin A\n      BAR1: 32 bit memory at 0xc0008000 [0xc0008fff].\n      BAR4: 64 bit prefetchable memory at 0xc000c000 [0xc000ffff].\n      id \"rng0\"\n"
        );
    }

    #[test]
    fn bridges_nest_in_info_pci_and_query_pci() {
        use crate::monitor::control::PciBridgeInfo;
        let bridge = |bus: u8, slot: u8, sec: u8, sub: u8, id: &str| PciFunctionInfo {
            bus,
            slot,
            class: 0x0604,
            vendor: 0x1b36,
            device: 0x0001,
            qdev_id: id.into(),
            driver: "pci-bridge".into(),
            bridge: Some(PciBridgeInfo {
                number: bus,
                secondary: sec,
                subordinate: sub,
                io_range: (0xf000, 0x0fff),
                memory_range: (0xc400_0000, 0xc4ff_ffff),
                prefetchable_range: (0xffff_ffff_fff0_0000, 0x000f_ffff),
            }),
            ..Default::default()
        };
        let mut behind = rng();
        behind.bus = 2;
        behind.slot = 4;
        let list = [
            behind,
            bridge(1, 3, 2, 2, "br2"),
            bridge(0, 0x1e, 1, 2, "br1"),
            rng(),
        ];
        let text = info_pci(&list);
        let want = "  Bus  0, device   5, function 0:\n    Class 0255: PCI device 1af4:1044\n      PCI subsystem 1af4:1100\n      IRQ 0, pin A\n      BAR1: 32 bit memory at 0xc0008000 [0xc0008fff].\n      BAR4: 64 bit prefetchable memory at 0xc000c000 [0xc000ffff].\n      id \"rng0\"\n  Bus  0, device  30, function 0:\n    PCI bridge: PCI device 1b36:0001\n      BUS 0.\n      secondary bus 1.\n      subordinate bus 2.\n      IO range [0xf000, 0x0fff]\n      memory range [0xc4000000, 0xc4ffffff]\n      prefetchable memory range [0xfffffffffff00000, 0x000fffff]\n      id \"br1\"\n  Bus  1, device   3, function 0:\n    PCI bridge: PCI device 1b36:0001\n      BUS 1.\n      secondary bus 2.\n      subordinate bus 2.\n";
        assert!(text.starts_with(want), "{text}");
        assert!(text.ends_with("      id \"br2\"\n  Bus  2, device   4, function 0:\n    Class 0255: PCI device 1af4:1044\n      PCI subsystem 1af4:1100\n      IRQ 0, pin A\n      BAR1: 32 bit memory at 0xc0008000 [0xc0008fff].\n      BAR4: 64 bit prefetchable memory at 0xc000c000 [0xc000ffff].\n      id \"rng0\"\n"), "{text}");
        // info qtree: each bridge's bus (its id, type PCI) nested under it, QEMU's layout.
        let t = info_qtree(&list);
        let want = "    bus: pci.0\n      type PCIE\n      dev: virtio-rng-pci, id \"rng0\"\n        addr = 05.0\n        class Class 00ff, addr 00:05.0, pci id 1af4:1044 (sub 1af4:1100)\n        bar 1: mem at 0xc0008000 [0xc0008fff]\n        bar 4: mem at 0xc000c000 [0xc000ffff]\n      dev: pci-bridge, id \"br1\"\n        addr = 1e.0\n        class PCI bridge, addr 00:1e.0, pci id 1b36:0001 (sub 0000:0000)\n        bus: br1\n          type PCI\n          dev: pci-bridge, id \"br2\"\n            addr = 03.0\n            class PCI bridge, addr 01:03.0, pci id 1b36:0001 (sub 0000:0000)\n            bus: br2\n              type PCI\n              dev: virtio-rng-pci, id \"rng0\"\n                addr = 04.0\n                class Class 00ff, addr 02:04.0, pci id 1af4:1044 (sub 1af4:1100)\n                bar 1: mem at 0xc0008000 [0xc0008fff]\n                bar 4: mem at 0xc000c000 [0xc000ffff]\n";
        assert!(t.ends_with(want), "{t}");
        let q = crate::monitor::commands::query_pci(&list);
        let top = q.as_array().unwrap();
        assert_eq!(top.len(), 1, "one PciInfo: the root bus");
        let devs = top[0]["devices"].as_array().unwrap();
        assert_eq!(devs.len(), 2);
        let br1 = &devs[1];
        assert_eq!(
            br1["id"],
            serde_json::json!({"device": 1, "vendor": 0x1b36})
        );
        let bus = &br1["pci_bridge"]["bus"];
        assert_eq!(
            (
                bus["number"].clone(),
                bus["secondary"].clone(),
                bus["subordinate"].clone()
            ),
            (0.into(), 1.into(), 2.into())
        );
        assert_eq!(
            bus["memory_range"],
            serde_json::json!({"base": 0xc400_0000u32, "limit": 0xc4ff_ffffu32})
        );
        let inner = &br1["pci_bridge"]["devices"].as_array().unwrap()[0];
        assert_eq!(
            (inner["bus"].clone(), inner["slot"].clone()),
            (1.into(), 3.into())
        );
        let leaf = &inner["pci_bridge"]["devices"].as_array().unwrap()[0];
        assert_eq!(
            (
                leaf["bus"].clone(),
                leaf["slot"].clone(),
                leaf["qdev_id"].clone()
            ),
            (2.into(), 4.into(), "rng0".into())
        );
    }

    #[test]
    fn info_qtree_layout() {
        let t = info_qtree(&[rng()]);
        assert!(t.contains("      dev: virtio-rng-pci, id \"rng0\"\n        addr = 05.0\n        class Class 00ff, addr 00:05.0, pci id 1af4:1044 (sub 1af4:1100)\n        bar 1: mem at 0xc0008000 [0xc0008fff]\n        bar 4: mem at 0xc000c000 [0xc000ffff]\n"), "{t}");
    }

    #[test]
    fn info_gsi_layout() {
        let info = GsiInfo {
            msi: vec![(24, true), (25, false), (31, true)],
            routes: 41,
            intx_lines: 2,
        };
        assert_eq!(
            info_gsi(Some(&info)),
            "MSI GSIs allocated: 3 (24* 25 31*)\nMSI GSIs routed: 2\nKVM GSI routes: 41\nINTx lines: 2\n"
        );
        assert_eq!(
            info_gsi(Some(&GsiInfo::default())),
            "MSI GSIs allocated: 0\nMSI GSIs routed: 0\nKVM GSI routes: 0\nINTx lines: 0\n"
        );
        assert_eq!(info_gsi(None), "no interrupt wiring to report\n");
    }

    #[test]
    fn status_text() {
        assert_eq!(
            info_status(RunState::Prelaunch),
            "VM status: paused (prelaunch)\n"
        );
        assert_eq!(info_status(RunState::Running), "VM status: running\n");
    }
}
