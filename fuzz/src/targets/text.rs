//! Text a user or a file gives the VMM: `--device` options, compat records, machine files.

use std::collections::{HashMap, HashSet};

use devices::virtio::console::ConsoleBackend;
use pci::record::{diff, CompatRecord};
use pci::PciAddress;
use vmm::device_config::{ConsoleConfig, DriverConfig};
use vmm::device_manager::{parse_device, place, DeviceSpec};
use vmm::machine_file::{DeviceEntry, MachineFile};

/// Tokens for `--device` strings.
pub const DEVICE_DICT: &[&[u8]] = &[
    b"virtio-rng-pci",
    b"virtio-blk-pci",
    b"virtio-console-pci",
    b"virtio-net-pci",
    b"driver=",
    b",id=",
    b",addr=",
    b",multifunction=on",
    b",multifunction=off",
    b",bus=pci.0",
    b",vectors=",
    b",file=/dev/null",
    b",file=/tmp/a,,b",
    b",,",
    b",readonly=on",
    b",serial=",
    b",path=",
    b",socket=",
    b",ifname=tap0",
    b",mac=52:54:00:12:34:56",
    b"\n",
    b"0x1f.0x7",
    b"1f.7",
    b"05",
    b".",
    b"=",
    b",",
    b"\ndel ",
    b"\ndel a",
    b"\ndel device[0]",
    b",id=a",
    b",id=b",
];

/// Tokens for JSON documents.
pub const JSON_DICT: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
    b"\"format\"",
    b"\"version\"",
    b"\"vmm-pci-compat\"",
    b"\"vmm-machine\"",
    b"\"devices\"",
    b"\"machine\"",
    b"\"driver\"",
    b"\"addr\"",
    b"\"00:05.0\"",
    b"\"05.0\"",
    b"\"fingerprint\"",
    b"\"props\"",
    b"\"id\"",
    b"\"multifunction\"",
    b"true",
    b"null",
    b"1",
    b"-1",
    b"4294967296",
    b"1e999",
    b"\"\\u0000\"",
    b"\"virtio-rng-pci\"",
];

/// Strings for structure-aware mutation of compat records and machine files.
pub const JSON_STRINGS: &[&str] = &[
    "vmm-pci-compat",
    "vmm-machine",
    "virtio-rng-pci",
    "virtio-blk-pci",
    "virtio-net-pci",
    "virtio-console-pci",
    "00:05.0",
    "00:00.0",
    "01:05.0",
    "00:1f.7",
    "00:20.0",
    "05.0",
    "1f.7",
    "0",
    "",
    "rng0",
    "a,b=c",
    "/tmp/a,b.img",
    "on",
    "off",
    "vectors",
    "file",
    "readonly",
    "serial",
    "id",
    "addr",
    "driver",
    "props",
    "devices",
    "fingerprint",
    "multifunction",
    "/dev/null",
];

/// The `--device` string for `spec` (what a user would type to get it back; values with a
/// comma have it doubled).
pub fn print_spec(spec: &DeviceSpec) -> String {
    spec.to_option()
}

/// Target: `--device` options (one per line), round trip, then placement with hints.
pub fn target_device_option(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    // The first line, if it parses as hex pairs, gives compat hints: "id=SS.F ...".
    let mut hints = HashMap::new();
    let mut specs = Vec::new();
    for (n, line) in lines.by_ref().enumerate() {
        if let Some(h) = line.strip_prefix("#hints ") {
            for w in h.split(' ') {
                if let Some((id, a)) = w.split_once('=') {
                    if let Ok((slot, f)) = pci::parse_qemu_addr(a) {
                        if let Ok(addr) = PciAddress::new(0, slot, f.unwrap_or(0)) {
                            hints.insert(id.to_string(), vmm::device_manager::Hint::root(addr));
                        }
                    }
                }
            }
            continue;
        }
        if n > 40 {
            break;
        }
        let Ok(spec) = parse_device(line) else {
            continue;
        };
        let printed = print_spec(&spec);
        let again = parse_device(&printed)
            .unwrap_or_else(|e| panic!("{line:?} parsed, its print {printed:?} does not: {e}"));
        assert_eq!(again, spec, "round trip of {line:?} via {printed:?}");
        let entry = DeviceEntry::from_spec(&spec, None);
        let back = entry
            .to_spec()
            .unwrap_or_else(|e| panic!("{line:?} parsed, its JSON {entry:?} does not: {e}"));
        assert_eq!(back, spec, "JSON round trip of {line:?} via {entry:?}");
        specs.push(spec);
    }
    let Ok(placed) = place(&specs, &hints) else {
        return;
    };
    assert_eq!(placed.len(), specs.len(), "place dropped devices");
    let mut ids = HashSet::new();
    let mut addrs = HashSet::new();
    for p in &placed {
        assert!(ids.insert(p.id.clone()), "id {} given twice", p.id);
        assert!(addrs.insert(p.addr), "address {} given twice", p.addr);
        assert!(
            p.addr.bus() != 0 || p.addr.device() != 0,
            "{} placed on the host bridge's slot",
            p.id
        );
        assert_eq!(
            p.addr.bus() == 0,
            p.bus == "pci.0",
            "{} on bus {}",
            p.id,
            p.bus
        );
        if let Some((slot, f)) = p.spec.addr {
            assert_eq!(
                (p.addr.device(), p.addr.function()),
                (slot, f.unwrap_or(0)),
                "explicit addr= not kept"
            );
        }
    }
}

/// Target: compat records.
pub fn target_compat_record(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(r) = CompatRecord::from_json(&text, "fuzz.json") else {
        return;
    };
    let json = r.to_json();
    let again = CompatRecord::from_json(&json, "fuzz.json")
        .unwrap_or_else(|e| panic!("a valid record does not re-read after to_json: {e}\n{json}"));
    assert_eq!(again, r, "compat record round trip");
    assert!(diff(&r, &r).is_empty(), "a record differs from itself");
    let _ = vmm::compat::strict_check(&r, &again);
    let empty = CompatRecord::new(r.machine.clone(), Default::default());
    for c in diff(&r, &empty).iter().chain(diff(&empty, &r).iter()) {
        let _ = c.to_string();
        let _ = c.breaks_abi();
    }
}

/// Target: machine description files.
pub fn target_machine_file(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(m) = MachineFile::from_json(&text) else {
        return;
    };
    let json = m.to_json();
    let again = MachineFile::from_json(&json).unwrap_or_else(|e| {
        panic!("a valid machine file does not re-read after to_json: {e}\n{json}")
    });
    assert_eq!(again, m, "machine file round trip");
    let specs = m
        .device_specs()
        .expect("device_specs of an accepted machine file");
    // Typed values written back read as the same devices.
    for s in &specs {
        let entry = DeviceEntry::from_spec(s, None);
        assert_eq!(
            entry.to_spec().as_ref(),
            Ok(s),
            "typed JSON of {s:?}: {entry:?}"
        );
    }
    let _ = place(&specs, &HashMap::new());
    let _ = vmm::machine_file::merge_devices(&specs, specs.clone());
}

/// Target: the smaller option parsers and HMP command lines, one per line; the first byte of
/// a line picks the parser (`g` --global, `q` --qmp, `a` BB:DD.F, `p` addr=, `h` HMP).
pub fn target_cli_options(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut globals = Vec::new();
    for line in text.split('\n').take(32) {
        let Some(kind) = line.chars().next() else {
            continue;
        };
        let rest = &line[kind.len_utf8()..];
        match kind {
            'g' => globals.push(rest.to_string()),
            'q' => {
                let _ = vmm::monitor::parse_qmp_option(rest);
            }
            'a' => {
                if let Ok(a) = rest.parse::<PciAddress>() {
                    assert_eq!(a.to_string().parse::<PciAddress>(), Ok(a), "{rest:?}");
                    assert_eq!(format!("{a:#}").parse::<PciAddress>(), Ok(a), "{rest:?}");
                    assert_eq!(PciAddress::from_devfn(a.bus(), a.devfn()), a);
                }
            }
            'p' => {
                if let Ok((slot, f)) = pci::parse_qemu_addr(rest) {
                    let printed = match f {
                        Some(f) => format!("{slot:x}.{f:x}"),
                        None => format!("{slot:x}"),
                    };
                    assert_eq!(
                        pci::parse_qemu_addr(&printed),
                        Ok((slot, f)),
                        "{rest:?} printed as {printed:?}"
                    );
                    assert!(slot < 32 && f.unwrap_or(0) < 8, "{rest:?} -> {slot}.{f:?}");
                }
            }
            'h' => {
                let mut quit = false;
                let _ = vmm::monitor::hmp::run(&super::qmp::Stub, rest, &mut quit);
            }
            _ => {}
        }
    }
    if let Ok(g) = vmm::compat::Globals::parse(&globals) {
        for o in &globals {
            if let Some((key, value)) = o.split_once('=') {
                if let Some((drv, prop)) = key.split_once('.') {
                    // The last setting of a property wins.
                    let last = globals
                        .iter()
                        .rev()
                        .find_map(|x| x.strip_prefix(&format!("{drv}.{prop}=")))
                        .unwrap_or(value);
                    assert_eq!(g.get(drv, prop), Some(last), "--global {o}");
                }
            }
        }
    }
}

fn strict_hotplug() -> bool {
    static STRICT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("FUZZ_STRICT_HOTPLUG").is_none_or(|v| v != "0"))
}

/// Target: cold-plug sequences on a `DeviceSet` (what `device_add` / `device_del` do before the
/// guest runs): fuzzed `--device` strings (virtio-rng, and virtio-blk/console on /dev/null)
/// and removals by id. A failed add changes nothing; the root complex always holds exactly
/// the set's devices; with `FUZZ_STRICT_HOTPLUG=1` also: every function > 0 on the bus has a
/// multi-function function 0 (else the guest never sees it).
pub fn target_hotplug(data: &[u8]) {
    use std::sync::Arc;
    let root = pci::PciRoot::new();
    let mem =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])
            .expect("guest memory");
    let host = Arc::new(super::pci::FuzzHost::default());
    let mut set = vmm::device_manager::DeviceSet::new();
    let text = String::from_utf8_lossy(data);
    for line in text.split('\n').take(24) {
        let before: Vec<PciAddress> = root.functions().into_iter().map(|(a, _)| a).collect();
        if let Some(id) = line.strip_prefix("del ") {
            let _ = set.remove(id, &root);
        } else {
            // Only backends that need nothing from the host.
            let line = line
                .replace("file=", "file=/dev/null,x=")
                .replace("path=", "path=/dev/null,x=");
            let Ok(mut spec) = parse_device(&line) else {
                continue;
            };
            // A bare `path` or `file` means "on" (QEMU's implied value): never create files.
            match &mut spec.config {
                DriverConfig::Net(_)
                | DriverConfig::Console(ConsoleConfig {
                    backend: ConsoleBackend::Socket(_),
                    ..
                }) => continue,
                DriverConfig::Blk(c) => c.file = "/dev/null".into(),
                DriverConfig::Console(c) => c.backend = ConsoleBackend::File("/dev/null".into()),
                DriverConfig::Rng(_) | DriverConfig::Bridge(_) => {}
            }
            let r = set.add(&[spec], &HashMap::new(), &root, &mem, host.clone());
            let after: Vec<PciAddress> = root.functions().into_iter().map(|(a, _)| a).collect();
            if r.is_err() {
                assert_eq!(
                    before, after,
                    "a failed device_add {line:?} changed the bus"
                );
            }
        }
        // The bus holds the host bridge and exactly the set's devices.
        let mut on_bus: Vec<PciAddress> = root.functions().into_iter().map(|(a, _)| a).collect();
        on_bus.sort();
        let mut want: Vec<PciAddress> = set.devices().iter().map(|r| r.placed.addr).collect();
        want.push(PciAddress::HOST_BRIDGE);
        want.sort();
        assert_eq!(on_bus, want, "bus and device set disagree after {line:?}");
        // Removed and failed devices gave their MSI GSIs back, and only theirs.
        let vectors: usize = set
            .devices()
            .iter()
            .map(|r| {
                r.abi
                    .get("vectors")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0)
            })
            .sum();
        let allocated = host
            .allocated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        assert_eq!(allocated, vectors, "MSI GSIs held after {line:?}");
        assert_eq!(
            host.bad_msi.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "a GSI released twice or routed after its release (after {line:?})"
        );
        // DeviceSet::remove refuses to take function 0 while other functions of its slot stay
        // (FUZZ_STRICT_HOTPLUG=0 turns this check off).
        for a in on_bus.iter().filter(|_| strict_hotplug()) {
            if a.function() > 0 {
                let f0 = PciAddress::new(a.bus(), a.device(), 0).expect("address");
                let hdr = root.get(f0).map(|f| f.config().header_type());
                assert!(
                    hdr.is_some_and(|h| h & 0x80 != 0),
                    "{a} is on the bus without a multi-function function 0 (after {line:?}): the guest cannot see it"
                );
            }
        }
    }
}
