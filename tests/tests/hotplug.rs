//! Issue 12, ACPI PCI hot-plug, end to end.
//!
//! - Real Linux on the test ground (one L1 boot): `tests/hotplug_e2e.py` (QEMU's `qemu.qmp`
//!   client, inside L1) runs one vmm with a QMP socket, `--compat`, and a cold-plugged
//!   virtio-rng at 04.0, and talks to the guest through a command loop on its serial console.
//!   It hot-plugs a virtio-blk at 07.0 (the guest binds it and a write/read round trip works
//!   from both sides), unplugs the cold-plugged rng (answered at once, `DEVICE_DELETED` only
//!   after the guest ejects, id and slot taken until then), reboots the guest in the same process
//!   (the same `lspci -vvv`), runs 50 add/del cycles (the vmm's fds and threads come back), and
//!   powers off (status 0). A second vmm then starts from the record with its hot-plug field
//!   removed (a record from before the property): no hot-plug slots, device_add refused.
//! - The probe guest on the local KVM (`mode=hotplug`): random accesses to the hot-plug
//!   registers and the GED remove nothing and leave every device as it was (also with two
//!   levels of bridges and hostile bus selectors, `hpbuses=N`); and its eject path completes a
//!   QMP `device_del`.
//! - Issue 13, real Linux (`tests/brhp_e2e.py`): hot-plug and unplug of a virtio-blk behind a
//!   pci-bridge at 00:1e.0 (`bus=br1,addr=03.0`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use integration_tests::ground::{run_python_scenario, section, vmm_binary};
use integration_tests::probe::{
    dumps, lspci_decode, parse_dump, probe_elf, require_kvm, run_probe_checked,
    spawn_rebooting_probe, vmm, FunctionDump,
};
use serde_json::{json, Value};

/// Seconds the whole hot-plug session (two guest boots, 50 cycles) may take before vmmwatch
/// reports the vmm as hung; a deadline that only catches hangs.
const SESSION_DEADLINE_SECS: u32 = 600;
const CYCLES: u32 = 50;

/// The JSON lines hotplug_e2e.py printed in one section.
struct Run {
    text: String,
    lines: Vec<Value>,
}

impl Run {
    fn new(text: String) -> Run {
        let lines = text
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        Run { text, lines }
    }
    fn find(&self, key: &str, name: &str) -> &Value {
        self.lines
            .iter()
            .find(|v| v[key] == name)
            .unwrap_or_else(|| panic!("no {key} {name:?} in:\n{}", self.text))
    }
    /// A guest command's output (asserting it exited 0).
    fn guest(&self, name: &str) -> String {
        let v = self.find("guest", name);
        assert_eq!(v["rc"], 0, "guest command {name} failed: {v}");
        v["out"].as_str().unwrap().to_string()
    }
    fn qmp(&self, name: &str) -> &Value {
        self.find("qmp", name)
    }
    fn ok(&self, name: &str) {
        let v = self.qmp(name);
        assert_eq!(v["return"], json!({}), "{name}: {v}");
    }
    fn error(&self, name: &str) -> (String, String) {
        let v = self.qmp(name);
        let e = &v["error"];
        assert!(e.is_object(), "{name} should have failed: {v}");
        (
            e["class"].as_str().unwrap().to_string(),
            e["desc"].as_str().unwrap().to_string(),
        )
    }
    fn host(&self, name: &str) -> &Value {
        self.find("host", name)
    }
    fn host_out(&self, name: &str) -> String {
        let v = self.host(name);
        assert_eq!(v["rc"], 0, "{name}: {v}");
        v["out"].as_str().unwrap().to_string()
    }
    fn events(&self, name: &str) -> Vec<&Value> {
        self.lines.iter().filter(|v| v["event"] == name).collect()
    }
    fn exit(&self) -> i64 {
        self.lines
            .iter()
            .find_map(|v| v["exit"].as_i64())
            .unwrap_or_else(|| panic!("the vmm never ended:\n{}", self.text))
    }
    fn no_failure(&self) {
        if let Some(f) = self.lines.iter().find(|v| v.get("failure").is_some()) {
            panic!("hotplug_e2e.py gave up: {f}\n{}", self.text);
        }
    }
}

/// `lspci -vvv` text with what Linux chooses itself for a hot-plugged function masked out:
/// the BAR addresses in `Region N: Memory at ADDR` and IRQ numbers.
fn mask_linux_choices(text: &str) -> String {
    text.lines()
        .map(|l| {
            let mut words: Vec<String> = Vec::new();
            let mut prev = "";
            for w in l.split(' ') {
                let masked = match prev {
                    "at" if l.contains("Region ") => "ADDR",
                    "IRQ" => "N",
                    _ => w,
                };
                words.push(masked.trim_end_matches(',').to_string());
                prev = w;
            }
            words.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The hot-plugged disk `dev` did I/O both ways: the guest read the host's pattern (same md5),
/// and what it wrote (read back twice in the guest) is in the image on the host. Returns the md5
/// of what it wrote.
fn assert_disk_io_both_ways(s: &Run, dev: &str) -> String {
    let host_md5 = s.host("host-pattern")["md5"].as_str().unwrap().to_string();
    assert_eq!(md5_line(&s.guest(&format!("{dev}-read-host"))), host_md5);
    let write = s.guest(&format!("{dev}-write"));
    let disk = s.host("disk-after-guest-write");
    let want = disk["want"].as_str().unwrap();
    assert_eq!(
        write.lines().map(md5_line).collect::<Vec<_>>(),
        [want, want],
        "guest write / read back: {write}"
    );
    assert_eq!(disk["md5"], want, "the image on the host: {disk}");
    want.to_string()
}

fn md5_line(out: &str) -> &str {
    out.split_whitespace().next().unwrap_or("")
}

fn line_with<'a>(text: &'a str, a: &str, b: &str) -> Option<&'a str> {
    text.lines().find(|l| l.contains(a) && l.contains(b))
}

#[test]
fn linux_hot_plugs_unplugs_reboots_and_keeps_its_view() {
    let out = run_python_scenario(
        "hp",
        &[("hp.py", include_str!("../hotplug_e2e.py"))],
        &format!(
            r#"python3 "$W/hp.py" guest-script > "$W/guest.sh" || exit 91
mkguestinitrd "$W/guest.cpio.gz" "$W/guest.sh" || exit 90
t0=$(cut -d' ' -f1 /proc/uptime)
echo "=== SESSION-BEGIN ==="
python3 "$W/hp.py" session --vmm "$VMM" --kernel "$GUEST_KERNEL" --initrd "$W/guest.cpio.gz" --workdir "$W" --deadline {SESSION_DEADLINE_SECS} --cycles {CYCLES} 2>&1
echo "=== SESSION-END rc=$? ==="
t1=$(cut -d' ' -f1 /proc/uptime)
echo "=== OLDREC-BEGIN ==="
python3 "$W/hp.py" oldrec --vmm "$VMM" --kernel "$GUEST_KERNEL" --initrd "$W/guest.cpio.gz" --workdir "$W" --deadline 180 2>&1
echo "=== OLDREC-END rc=$? ==="
t2=$(cut -d' ' -f1 /proc/uptime)
echo "hotplug timing: session $t0..$t1 s, old record $t1..$t2 s (L1 uptime)"
"#,
        ),
    );
    let s = Run::new(section(&out.stdout, "SESSION").unwrap_or_else(|| panic!("{}", out.stdout)));
    s.no_failure();
    assert!(
        out.stdout.contains("=== SESSION-END rc=0 ==="),
        "{}",
        s.text
    );

    // Boot 1: the cold-plugged rng at 04.0 sits in an ACPI slot.
    let nn = s.guest("boot1-lspci-nn");
    assert!(line_with(&nn, "00:04.0 ", "[1af4:1044]").is_some(), "{nn}");
    let v04 = s.guest("boot1-lspci-v-04");
    assert!(v04.contains("Physical Slot: 4"), "{v04}");
    let slots = s.guest("boot1-slots");
    let slots: Vec<&str> = slots.split_whitespace().collect();
    assert!(
        slots.contains(&"4") && slots.contains(&"7") && slots.contains(&"31"),
        "ACPI slots in /sys/bus/pci/slots: {slots:?}"
    );
    assert_eq!(s.guest("boot1-drv-04"), "virtio-pci");

    // Hot-plug a virtio-blk at 07.0: bound, the disk reads what the host wrote, and what the
    // guest writes lands in the image.
    s.ok("add-hd1");
    let bound = s.guest("hd1-bound");
    assert_eq!(
        bound.lines().collect::<Vec<_>>(),
        ["virtio-pci", "32768"],
        "{bound}"
    );
    let nn = s.guest("hd1-lspci-nn");
    assert!(line_with(&nn, "00:07.0 ", "[1af4:1042]").is_some(), "{nn}");
    assert!(line_with(&nn, "00:04.0 ", "[1af4:1044]").is_some(), "{nn}");
    let v07 = s.guest("hd1-lspci-v-07");
    assert!(v07.contains("Physical Slot: 7"), "{v07}");
    assert!(v07.contains("Kernel driver in use: virtio-pci"), "{v07}");
    let want = assert_disk_io_both_ways(&s, "hd1");
    let abi = s.host_out("abi-after-add");
    assert!(
        line_with(&abi, "00:07.0 0100: 1af4:1042", "id=hd1").is_some(),
        "{abi}"
    );

    // Errors.
    let (class, desc) = s.error("add-fn1");
    assert_eq!(class, "GenericError", "{desc}");
    assert_eq!(
        s.error("del-unknown"),
        (
            "DeviceNotFound".to_string(),
            "Device 'nosuch' not found".to_string()
        )
    );

    // Unplug rng0 while paused: answered, still there, id and slot taken, no event.
    s.ok("stop");
    s.ok("del-rng0");
    s.ok("del-rng0-again");
    let (_, same_id) = s.error("readd-rng0-same-id");
    assert!(
        same_id.contains("'rng0'") || same_id.contains("slot 4"),
        "{same_id}"
    );
    let (_, same_slot) = s.error("readd-other-id-same-slot");
    assert!(
        same_slot.contains("slot 4") && same_slot.contains("rng0"),
        "{same_slot}"
    );
    let devs = &s.qmp("query-pci-paused")["return"][0]["devices"];
    assert!(
        devs.as_array()
            .unwrap()
            .iter()
            .any(|d| d["qdev_id"] == "rng0" && d["slot"] == 4),
        "rng0 must stay until the guest ejects it: {devs}"
    );
    assert_eq!(
        s.host("deleted-while-paused")["events"],
        json!([]),
        "DEVICE_DELETED before the guest could eject"
    );
    s.ok("cont");
    let deleted = s.events("DEVICE_DELETED");
    let rng0: Vec<_> = deleted
        .iter()
        .filter(|e| e["data"]["device"] == "rng0")
        .collect();
    assert_eq!(rng0.len(), 1, "one DEVICE_DELETED for rng0: {deleted:?}");
    assert_eq!(rng0[0]["step"], "del-rng0-cont", "{:?}", rng0[0]);
    assert!(
        rng0[0]["data"]["path"]
            .as_str()
            .is_some_and(|p| !p.is_empty()),
        "{:?}",
        rng0[0]
    );
    assert_eq!(s.error("del-rng0-after-event").0, "DeviceNotFound");
    let gone = s.guest("rng0-gone");
    assert!(
        !gone.contains("00:04.0") && gone.contains("00:07.0"),
        "{gone}"
    );
    let abi = s.host_out("abi-after-del");
    assert!(!abi.contains("id=rng0") && abi.contains("id=hd1"), "{abi}");
    s.ok("readd-rng0");
    assert_eq!(s.guest("rng0-back"), "virtio-pci");

    // Unplug while running.
    s.ok("add-tmp");
    assert_eq!(s.guest("tmp-bound"), "virtio-pci");
    s.ok("del-tmp");
    let tmp: Vec<_> = deleted
        .iter()
        .filter(|e| e["data"]["device"] == "tmp")
        .collect();
    assert_eq!(tmp.len(), 1, "{deleted:?}");
    assert_eq!(tmp[0]["step"], "running-del");
    assert!(!s.guest("tmp-gone").contains("00:09.0"));
    let abi = s.host_out("abi-before-reboot");
    for want in ["00:04.0 00ff: 1af4:1044", "00:07.0 0100: 1af4:1042"] {
        assert!(abi.contains(want), "{want}: {abi}");
    }
    assert!(!abi.contains("00:09.0") && !abi.contains("id=tmp"), "{abi}");

    // Reboot in place: the same view, hot-plugged devices included.
    let first = s.guest("boot1-lspci-vvv");
    let second = s.guest("boot2-lspci-vvv");
    assert!(
        first.contains("Physical Slot: 7") && first.contains("00:07.0 SCSI storage"),
        "{first}"
    );
    // Linux gives a hot-plugged function BAR addresses of its own (acpiphp assigns them; the
    // vmm's per-function addresses are what the next boot finds, as SeaBIOS's are in QEMU), and
    // numbers IRQs in the order it meets them. Everything else is the same.
    assert_eq!(
        mask_linux_choices(&first),
        mask_linux_choices(&second),
        "lspci -nn -vvv changed across the reboot in place (beyond BAR addresses and IRQ numbers)"
    );
    // From boot to boot (both started with every device present), byte for byte.
    let third = s.guest("boot3-lspci-vvv");
    assert_eq!(
        second, third,
        "lspci -nn -vvv changed across a reboot in place (QMP system_reset)"
    );
    let qmp_reset = &s.host("reset-events-qmp")["events"];
    assert_eq!(
        qmp_reset[0]["data"]["guest"],
        json!(false),
        "RESET after system_reset: {qmp_reset}"
    );
    assert!(
        !s.host("reset-events")["events"]
            .as_array()
            .unwrap()
            .is_empty(),
        "no RESET event for the guest's reboot"
    );
    assert_eq!(md5_line(&s.guest("boot2-read-pattern")), want);

    // 50 add/del cycles: every one completed, the vmm's fds and threads are back.
    let cyc = deleted
        .iter()
        .filter(|e| e["data"]["device"] == "cyc")
        .count();
    assert_eq!(cyc, CYCLES as usize, "DEVICE_DELETED for the cycles");
    let res = s.host("resources");
    // After the first cycle and after the last: no growth per cycle. (What the first cycle
    // adds for good is printed: lazily created things are allowed.)
    eprintln!(
        "hotplug cycles: [fds, threads] before {} after the first {} after {CYCLES} {}",
        res["before"], res["after_first"], res["after"]
    );
    assert_eq!(
        res["after_first"], res["after"],
        "the vmm's [fds, threads] after the first and after {CYCLES} add/del cycles; fds by kind after the first {} after the last {}",
        res["fd_kinds_after_first"], res["fd_kinds_after"]
    );
    assert_eq!(
        res["before"][1], res["after"][1],
        "threads before and after the cycles"
    );
    assert!(!s.guest("cycles-lspci").contains("00:09.0"));
    assert!(!s.host_out("abi-after-cycles").contains("id=cyc"));

    // Power-off ends the vmm with status 0; the record has what was there at the end.
    assert_eq!(s.exit(), 0, "vmm exit status after poweroff -f");
    let abi = s.host_out("abi-final");
    assert!(
        line_with(&abi, "00:04.0 00ff: 1af4:1044", "id=rng0").is_some()
            && line_with(&abi, "00:07.0 0100: 1af4:1042", "id=hd1").is_some(),
        "{abi}"
    );

    // A record from before the hot-plug property: no hot-plug.
    let o = Run::new(section(&out.stdout, "OLDREC").unwrap_or_else(|| panic!("{}", out.stdout)));
    o.no_failure();
    let dropped = &o.host("old-record")["dropped"];
    assert!(
        dropped.as_array().is_some_and(|d| !d.is_empty()),
        "the record has no hot-plug field to drop: {}",
        o.host("old-record")
    );
    let v = o.guest("old-lspci-v");
    assert!(v.contains("00:04.0 ") && v.contains("00:07.0 "), "{v}");
    assert!(!v.contains("Physical Slot"), "{v}");
    assert_eq!(o.guest("old-slots"), "0");
    assert_eq!(
        o.error("old-add"),
        (
            "GenericError".to_string(),
            "Bus 'pci.0' does not support hotplugging".to_string()
        )
    );
    assert_eq!(o.exit(), 0);
    assert!(out.stdout.contains("=== OLDREC-END rc=0 ==="));
}

// ---- the probe guest on the local KVM ----

const SPARE_IMG_LEN: u64 = 1 << 20;

fn scratch(name: &str) -> PathBuf {
    integration_tests::scratch_dir(&format!("hotplug-{name}"))
}

/// Devices at fixed addresses (a multi-function slot, a disk), `--hotplug on`, a record.
fn probe_devices(dir: &Path) -> Vec<String> {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(SPARE_IMG_LEN))
        .unwrap();
    let mut args: Vec<String> = [
        "virtio-rng-pci,id=p1,addr=4".to_string(),
        "virtio-rng-pci,id=p2,addr=6.0,multifunction=on".into(),
        "virtio-rng-pci,id=p3,addr=6.1".into(),
        format!("virtio-blk-pci,id=p4,file={},addr=7", img.display()),
        "virtio-rng-pci,id=p5,addr=1f".into(),
    ]
    .into_iter()
    .flat_map(|d| ["--device".to_string(), d])
    .collect();
    args.extend([
        "--compat".to_string(),
        dir.join("rec.json").display().to_string(),
    ]);
    args
}

const PROBE_FUNCTIONS: [&str; 6] = [
    "00:00.0", "00:04.0", "00:06.0", "00:06.1", "00:07.0", "00:1f.0",
];

/// Runs the probe's hot-plug register hammering `cmdline` on `devices` and asserts that it left
/// nothing behind: the registers said nothing happened and say so at the end, and the CF8 and
/// ECAM views are the baseline's, byte for byte. Returns the two dumps.
fn hammer_leaves_nothing(
    cmdline: &str,
    devices: &[String],
    base_cf8: &[FunctionDump],
    base_ecam: &[FunctionDump],
) -> (String, String) {
    let out = run_probe_checked(cmdline, devices).0;
    assert!(out.contains("=== HOTPLUG done ==="), "{cmdline}:\n{out}");
    assert!(
        out.contains("hotplug: anomalies 0\n"),
        "{cmdline}: the registers said something happened:\n{out}"
    );
    assert!(
        out.contains(
            "hotplug: final PCIU 0x00000000 PCID 0x00000000 PCI_RMV 0xfffffffe BNUM 0x00000000 GED 0x00000000"
        ),
        "{cmdline}:\n{out}"
    );
    let (cf8, ecam) = dumps(&out);
    assert_eq!(
        parse_dump(&cf8),
        base_cf8,
        "{cmdline}: the CF8 view changed"
    );
    assert_eq!(
        parse_dump(&ecam),
        base_ecam,
        "{cmdline}: the ECAM view changed"
    );
    (cf8, ecam)
}

/// `mode=hotplug`: random widths, offsets and values on the hot-plug registers and the GED,
/// other bus selectors, ejects of empty slots and of occupied slots nobody asked to remove,
/// GED read floods. The vmm lives, the registers keep saying "nothing happened", every device
/// of the command line is still there, byte for byte, and the dumps decode with `lspci -F`.
#[test]
fn probe_hammering_the_hotplug_registers_removes_nothing() {
    require_kvm();
    let dir = scratch("hammer");
    let mut devices = probe_devices(&dir);
    devices.extend(["--hotplug".to_string(), "on".to_string()]);
    let base = run_probe_checked("mode=probe", &devices).0;
    let (cf8, ecam) = dumps(&base);
    let (base_cf8, base_ecam) = (parse_dump(&cf8), parse_dump(&ecam));
    let present: Vec<&str> = base_cf8.iter().map(|f| f.addr.as_str()).collect();
    assert_eq!(present, PROBE_FUNCTIONS, "the baseline run");

    let mut seeds = vec![1u32, 7, 42, 2026];
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() | 1)
        .unwrap_or(99);
    seeds.push(t);
    for seed in seeds {
        let cmdline = format!("mode=hotplug seed={seed} n=2000");
        eprintln!("hotplug probe run: {cmdline}");
        let (cf8, ecam) = hammer_leaves_nothing(&cmdline, &devices, &base_cf8, &base_ecam);
        for dump in [&cf8, &ecam] {
            let decoded = lspci_decode(dump, &["-nn"]);
            for addr in &PROBE_FUNCTIONS[1..] {
                let short = &addr[3..];
                assert!(
                    decoded.contains(&format!("{short} ")),
                    "{cmdline}: {addr} in lspci -F:\n{decoded}"
                );
            }
        }
    }
    // The record still lists every device at its address.
    let out = vmm(&["abi", "show", dir.join("rec.json").to_str().unwrap()], 30);
    let abi = String::from_utf8_lossy(&out.stdout);
    for (addr, id) in [
        ("00:04.0", "p1"),
        ("00:06.0", "p2"),
        ("00:06.1", "p3"),
        ("00:07.0", "p4"),
        ("00:1f.0", "p5"),
    ] {
        assert!(
            line_with(&abi, addr, &format!("id={id} ")).is_some(),
            "{addr} {id}: {abi}"
        );
    }
    // Without hot-plug nothing decodes those ports; the guest's accesses change nothing either.
    let mut off = probe_devices(&scratch("hammer-off"));
    off.extend(["--hotplug".to_string(), "off".to_string()]);
    let out = run_probe_checked("mode=hotplug seed=3 n=500", &off).0;
    assert!(
        out.contains("hotplug: final PCIU 0xffffffff PCID 0xffffffff PCI_RMV 0xffffffff BNUM 0xffffffff GED 0xffffffff"),
        "--hotplug off: no hot-plug registers and no GED on the port bus:\n{out}"
    );
    let (cf8, _) = dumps(&out);
    assert_eq!(parse_dump(&cf8), base_cf8, "--hotplug off: the CF8 view");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `mode=hotplug hpbuses=2` on a machine with two levels of bridges (buses 1 and 2 with
/// hot-plug registers): selectors of the bridges' buses, of buses that do not exist, above 255
/// and aliasing the bridges' modulo 256; ejects on each. Nothing is ever pending or ejected,
/// the vmm lives, and every function (behind the bridges too) is still there, byte for byte.
#[test]
fn probe_hammering_bridge_bus_selectors_removes_nothing() {
    require_kvm();
    let dir = scratch("hammer-br");
    let mut devices = probe_devices(&dir);
    devices.extend(
        [
            "pci-bridge,id=br1,chassis_nr=1,addr=1e.0",
            "pci-bridge,id=br2,chassis_nr=2,bus=br1,addr=2",
            "virtio-rng-pci,id=b1,bus=br1,addr=0",
            "virtio-rng-pci,id=b2,bus=br2,addr=3",
        ]
        .iter()
        .flat_map(|d| ["--device".to_string(), d.to_string()]),
    );
    devices.extend(["--hotplug".to_string(), "on".to_string()]);
    let base = run_probe_checked("mode=probe", &devices).0;
    let (cf8, ecam) = dumps(&base);
    let (base_cf8, base_ecam) = (parse_dump(&cf8), parse_dump(&ecam));
    for seed in [5u32, 11, 2027] {
        let cmdline = format!("mode=hotplug seed={seed} n=3000 hpbuses=2");
        eprintln!("bridge hotplug probe run: {cmdline}");
        hammer_leaves_nothing(&cmdline, &devices, &base_cf8, &base_ecam);
    }
    // The probe's expectations are right: told that bus 1 has no registers, it sees them.
    let out = run_probe_checked("mode=hotplug seed=5 n=3000 hpbuses=0", &devices).0;
    assert!(
        out.contains("hotplug: BAD PCI_RMV (bus != 0) read 0xffffffff expected 0x00000000"),
        "the bridges' buses answer PCI_RMV:\n{out}"
    );
    // Without hot-plug behind bridges (an old record's machine) the bridges' buses have none.
    let mut off = devices.clone();
    off.extend(["--hotplug-bridges".to_string(), "off".to_string()]);
    let _ = std::fs::remove_file(dir.join("rec.json"));
    let out = run_probe_checked("mode=hotplug seed=5 n=3000 hpbuses=0", &off).0;
    assert!(out.contains("hotplug: anomalies 0\n"), "{out}");
    let abi = vmm(&["abi", "show", dir.join("rec.json").to_str().unwrap()], 30);
    let abi = String::from_utf8_lossy(&abi.stdout);
    assert!(line_with(&abi, "02:03.0", "id=b2 ").is_some(), "{abi}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The probe as a minimal ACPI-less OS: it polls PCID, and ejects what QMP's `device_del`
/// asked for (one B0EJ write per slot, like `_EJ0`). `device_del` answers at once,
/// `DEVICE_DELETED` follows the eject, the function is gone from the guest's bus and from the
/// record, and the others stay.
#[test]
fn probe_guest_ejects_what_device_del_asked_for() {
    require_kvm();
    let dir = scratch("eject");
    let sock = dir.join("qmp.sock");
    let elf = probe_elf();
    let mut child: Child = Command::new(vmm_binary().unwrap())
        .args([
            "run",
            "--no-reboot",
            "--kernel",
            elf.to_str().unwrap(),
            "--append",
            "mode=hotplug seed=9 n=300 wait=3000000",
        ])
        .arg("--qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .args(probe_devices(&dir))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut console = BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    let mut read_until = |marker: &str, text: &mut String| loop {
        let mut l = String::new();
        if console.read_line(&mut l).unwrap() == 0 {
            panic!("the vmm ended before {marker:?}:\n{text}");
        }
        text.push_str(&l);
        if l.contains(marker) {
            return;
        }
    };
    read_until("hotplug: waiting for an eject request", &mut text);
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut next = || {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        serde_json::from_str::<Value>(&l).unwrap_or_else(|e| panic!("{l:?}: {e}"))
    };
    assert!(next()["QMP"].is_object());
    let mut events = vec![];
    let mut cmd = |v: Value, events: &mut Vec<Value>| {
        w.write_all(format!("{v}\n").as_bytes()).unwrap();
        loop {
            let v = next();
            if v.get("event").is_some() {
                events.push(v);
            } else {
                return v;
            }
        }
    };
    assert_eq!(
        cmd(json!({"execute": "qmp_capabilities"}), &mut events)["return"],
        json!({})
    );
    let del = cmd(
        json!({"execute": "device_del", "arguments": {"id": "p1"}}),
        &mut events,
    );
    assert_eq!(del["return"], json!({}), "{del}");
    read_until("=== PROBE-DONE ===", &mut text);
    // The guest's reset ends the vmm (--no-reboot); the event came before.
    while !events.iter().any(|e| e["event"] == "DEVICE_DELETED") {
        let v = next();
        assert!(v.get("event").is_some(), "{v}");
        events.push(v);
    }
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}\n{text}");
    assert!(
        text.contains("hotplug: eject request 0x00000010"),
        "PCID should have had slot 4 only:\n{text}"
    );
    assert!(text.contains("hotplug: ejected slot 04"), "{text}");
    assert!(
        text.contains("hotplug: after eject PCID 0x00000000"),
        "{text}"
    );
    assert!(text.contains("hotplug: anomalies 0\n"), "{text}");
    let deleted: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "DEVICE_DELETED")
        .collect();
    assert_eq!(deleted.len(), 1, "{events:?}");
    assert_eq!(deleted[0]["data"]["device"], "p1", "{events:?}");
    let (cf8, _) = dumps(&text);
    let present: Vec<String> = parse_dump(&cf8).into_iter().map(|f| f.addr).collect();
    assert_eq!(
        present,
        ["00:00.0", "00:06.0", "00:06.1", "00:07.0", "00:1f.0"],
        "after the eject"
    );
    let out = vmm(&["abi", "show", dir.join("rec.json").to_str().unwrap()], 30);
    let abi = String::from_utf8_lossy(&out.stdout);
    assert!(
        !abi.contains("id=p1 ") && abi.contains("id=p4 "),
        "the record after the removal: {abi}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `(threads, fds)` of a process.
fn task_and_fd_counts(pid: u32) -> (usize, usize) {
    let count = |d: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{d}"))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    (count("task"), count("fd"))
}

/// Reboot in place, many times in a row, with a guest that resets within milliseconds of
/// starting (the probe's `mode=hello`): the vmm keeps rebooting (a reset reported by the new
/// run while the old one's was still being taken once left it waiting with no vCPU), and its
/// threads and fds stay where they were (each reboot used to leave an `intx-resample` thread
/// with its eventfds behind).
#[test]
fn reboots_in_place_keep_going_and_leave_nothing_behind() {
    let mut child = spawn_rebooting_probe(&[
        "--device",
        "virtio-rng-pci,id=a,addr=4",
        "--device",
        "virtio-rng-pci,id=b,addr=5",
    ]);
    drop(child.stderr.take());
    let pid = child.id();
    let console = BufReader::new(child.stdout.take().unwrap());
    // A deadline that only catches a hang: the vmm is stopped, and the count below falls short.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(120)).is_err() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    });
    // Samples at boots 5-14 and 71-80. The guest resets within milliseconds, so a sample can
    // land in the middle of a reboot: devices half torn down (fewer) or two runs' worth for a
    // moment (more). The most of the early samples bounds what a run holds; a leak would lift
    // even the least of the late ones above it.
    let (mut boots, mut early, mut late) = (0, (0, 0), (usize::MAX, usize::MAX));
    for line in console.lines() {
        let Ok(line) = line else { break };
        if !line.contains("Hello from the probe guest") {
            continue;
        }
        boots += 1;
        if (5..15).contains(&boots) {
            let (t, f) = task_and_fd_counts(pid);
            early = (early.0.max(t), early.1.max(f));
        }
        if (71..=80).contains(&boots) {
            let (t, f) = task_and_fd_counts(pid);
            late = (late.0.min(t), late.1.min(f));
        }
        if boots == 80 {
            break;
        }
    }
    let _ = done_tx.send(());
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let status = child.wait().unwrap();
    watchdog.join().unwrap();
    assert_eq!(boots, 80, "the guest stopped rebooting after {boots} boots");
    assert!(status.success(), "vmm after SIGTERM: {status}");
    assert!(
        late.0 <= early.0 && late.1 <= early.1,
        "(threads, fds): the most at boots 5-14 {early:?}, the least at boots 71-80 {late:?}"
    );
}

/// Whether `DEVICE_DELETED` for `id` (with its QOM path) arrived during step `step`.
fn deleted_in(s: &Run, id: &str, step: &str) -> bool {
    s.events("DEVICE_DELETED").iter().any(|e| {
        e["data"]["device"] == id
            && e["data"]["path"] == format!("/machine/peripheral/{id}")
            && e["step"] == step
    })
}

/// Issue 13: hot-plug behind a pci-bridge with real Linux (`tests/brhp_e2e.py`, one L1 boot).
/// A bridge at 00:1e.0 (bus 1), a virtio-rng behind it at 01:01.0 and one at 00:04.0; a
/// virtio-blk hot-plugged at bus=br1,addr=03.0 is bound and does I/O both ways, sits in an
/// ACPI slot, unplugs (DEVICE_DELETED, gone from lspci), comes back, stays at 01:03.0 across a
/// reboot and unplugs again on the new run; a removal pending at a reset completes with it;
/// nothing else ever moves.
#[test]
fn linux_hot_plugs_behind_a_bridge() {
    let out = run_python_scenario(
        "brhp",
        &[
            ("hotplug_e2e.py", include_str!("../hotplug_e2e.py")),
            ("brhp_e2e.py", include_str!("../brhp_e2e.py")),
        ],
        &format!(
            r#"python3 "$W/brhp_e2e.py" guest-script > "$W/guest.sh" || exit 91
mkguestinitrd "$W/guest.cpio.gz" "$W/guest.sh" || exit 90
echo "=== BRHP-BEGIN ==="
python3 "$W/brhp_e2e.py" session --vmm "$VMM" --kernel "$GUEST_KERNEL" --initrd "$W/guest.cpio.gz" --workdir "$W" --deadline {SESSION_DEADLINE_SECS} 2>&1
echo "=== BRHP-END rc=$? ==="
"#,
        ),
    );
    let s = Run::new(section(&out.stdout, "BRHP").unwrap_or_else(|| panic!("{}", out.stdout)));
    s.no_failure();
    assert!(out.stdout.contains("=== BRHP-END rc=0 ==="), "{}", s.text);

    // Before: the bridge, the device behind it, the one on bus 0.
    let before = s.guest("before-lspci-n");
    assert!(
        line_with(&before, "00:1e.0 ", "1b36:0001").is_some(),
        "{before}"
    );
    assert!(
        line_with(&before, "01:01.0 ", "1af4:1044").is_some(),
        "{before}"
    );
    assert!(
        line_with(&before, "00:04.0 ", "1af4:1044").is_some(),
        "{before}"
    );
    assert_eq!(s.guest("before-bound"), "virtio-pci\nvirtio-pci");
    // ACPI slots behind the bridge too (slot objects with _SUN/_EJ0 under the bridge's).
    let slots = s.guest("before-slots");
    assert!(
        slots.lines().any(|l| l.ends_with(" 0000:01:03")),
        "no ACPI slot for 01:03 in /sys/bus/pci/slots:\n{slots}"
    );
    assert!(
        slots.lines().any(|l| l.ends_with(" 0000:00:04")),
        "bus 0's slots are still there:\n{slots}"
    );
    assert!(
        !slots.lines().any(|l| l.ends_with(" 0000:00:1e")),
        "the bridge's own slot is not hot-pluggable:\n{slots}"
    );

    // Added at 01:03.0: bound, in a slot, I/O both ways.
    s.ok("add-hdb");
    let bound = s.guest("hdb-bound");
    assert_eq!(
        bound.lines().collect::<Vec<_>>(),
        ["virtio-pci", "32768"],
        "{bound}"
    );
    let added = s.guest("added-lspci-n");
    assert!(
        line_with(&added, "01:03.0 ", "1af4:1042").is_some(),
        "{added}"
    );
    for l in before.lines() {
        assert!(
            added.lines().any(|a| a == l),
            "{l:?} moved or changed:\n{added}"
        );
    }
    let v = s.guest("added-lspci-v");
    assert!(v.contains("Physical Slot: 3"), "{v}");
    assert!(v.contains("Kernel driver in use: virtio-pci"), "{v}");
    assert_disk_io_both_ways(&s, "hdb");
    let abi = s.host_out("abi-after-add");
    assert!(line_with(&abi, "01:03.0 ", "id=hdb").is_some(), "{abi}");
    assert!(line_with(&abi, "01:01.0 ", "id=rngb").is_some(), "{abi}");
    assert!(line_with(&abi, "00:04.0 ", "id=rng0").is_some(), "{abi}");
    // Bridges stay cold-plug only.
    for name in ["add-bridge", "del-bridge"] {
        let (_, desc) = s.error(name);
        assert!(
            desc.contains("PCI bridges can only be added before the guest runs"),
            "{name}: {desc}"
        );
    }

    // Unplugged: DEVICE_DELETED, gone from lspci, the others where they were, the record too.
    assert!(
        deleted_in(&s, "hdb", "del"),
        "{:?}",
        s.events("DEVICE_DELETED")
    );
    let gone = s.guest("hdb-gone");
    assert_eq!(
        gone, before,
        "after the unplug lspci -n is what it was before the add"
    );
    let abi = s.host_out("abi-after-del");
    assert!(!abi.contains("id=hdb"), "{abi}");
    assert!(line_with(&abi, "01:01.0 ", "id=rngb").is_some(), "{abi}");

    // Added again, then a reboot: same place, same view.
    s.ok("readd-hdb");
    assert_eq!(s.guest("readd-bound").lines().next(), Some("virtio-pci"));
    assert_eq!(
        s.guest("readd-read"),
        s.guest("hdb-write").lines().nth(1).unwrap()
    );
    assert_eq!(s.guest("boot2-lspci-n"), s.guest("before-reboot-lspci-n"));
    let b2 = s.guest("boot2-lspci-n");
    assert!(line_with(&b2, "01:03.0 ", "1af4:1042").is_some(), "{b2}");
    assert_eq!(
        mask_linux_choices(&s.guest("boot2-lspci-vvv")),
        mask_linux_choices(&s.guest("before-reboot-lspci-vvv")),
        "lspci -vvv across the reboot"
    );
    assert_eq!(s.guest("boot2-read"), s.guest("readd-read"));
    // And unplugged on the new run.
    s.ok("boot2-del-hdb");
    assert_eq!(s.guest("boot2-gone"), before);
    // A removal pending at a reset completes with it; the next boot sees the machine without.
    s.ok("boot2-readd-hdb");
    assert_eq!(
        s.guest("boot2-readd-bound").lines().next(),
        Some("virtio-pci")
    );
    s.ok("pending-del-hdb");
    assert_eq!(
        s.host("deleted-while-paused")["events"],
        json!([]),
        "paused, the guest cannot eject"
    );
    s.ok("system-reset");
    assert!(
        deleted_in(&s, "hdb", "pending-at-reset"),
        "DEVICE_DELETED at the reset: {:?}",
        s.events("DEVICE_DELETED")
    );
    assert_eq!(s.guest("boot3-lspci-n"), before);
    let abi = s.host_out("abi-final");
    assert!(!abi.contains("id=hdb"), "{abi}");
    assert_eq!(s.exit(), 0);
}
