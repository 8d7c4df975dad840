//! Issue 15, the soak run, short: `tests/soak_e2e.py` (the driver of
//! `resources/bench/soak.sh`, reusing `tests/hotplug_e2e.py`) in one L1 boot with small numbers.
//! One Linux guest with a virtio-blk, a virtio-net on a tap, a virtio-console and a virtio-rng runs
//! disk, network and console loops while the driver does [`CYCLES`] hot-plug/unplug cycles
//! (virtio-rng, every fourth a virtio-blk) and rounds of QMP clients that connect and vanish, for
//! at least [`LOAD_SECS`] seconds. Asserted at the end: every device_add/device_del answered
//! with success and every DEVICE_DELETED arrived; every vanishing client was served in turn and
//! the monitor answers afterwards; the vmm's fds, threads and `info gsi` are what they were after
//! boot (plus one warm-up cycle of each kind), its own memory grew by less than the bound; the
//! guest's loops ran with no disk error, no lost ping, and every console line arrived (serial and
//! virtio-console file); the vmm ends with status 0 on the guest's power-off.

use integration_tests::ground::{run_python_scenario, section};
use serde_json::Value;

const CYCLES: u32 = 20;
const LOAD_SECS: u32 = 30;
/// vmmwatch's deadline for the vmm: only catches a hang.
const DEADLINE_SECS: u32 = 600;

#[test]
fn linux_soak_short() {
    let out = run_python_scenario(
        "soak",
        &[
            ("hotplug_e2e.py", include_str!("../hotplug_e2e.py")),
            ("soak_e2e.py", include_str!("../soak_e2e.py")),
        ],
        &format!(
            r#"t0=$(cut -d' ' -f1 /proc/uptime)
echo "=== SOAK-BEGIN ==="
python3 "$W/soak_e2e.py" --vmm "$VMM" --kernel "$GUEST_KERNEL" --workdir "$W" --seconds {LOAD_SECS} --cycles {CYCLES} --deadline {DEADLINE_SECS} 2>&1
echo "=== SOAK-END rc=$? ==="
t1=$(cut -d' ' -f1 /proc/uptime)
echo "soak timing: $t0..$t1 s (L1 uptime)"
"#
        ),
    );
    let text = section(&out.stdout, "SOAK").unwrap_or_else(|| panic!("{}", out.stdout));
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if let Some(f) = lines.iter().find(|v| v.get("failure").is_some()) {
        panic!("soak_e2e.py gave up: {f}\n{text}");
    }
    let summary = lines
        .iter()
        .find(|v| v["soak"] == "summary")
        .unwrap_or_else(|| panic!("no summary:\n{text}"));
    let checks = summary["checks"].as_array().expect("checks");
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != true).collect();
    assert!(failed.is_empty(), "soak checks failed: {failed:#?}\n{text}");

    // The same facts again from the numbers (so a driver that checks too little fails here).
    let counts = &summary["counts"];
    let n = u64::from(CYCLES) + 2; // plus the warm-up cycles
    assert_eq!(counts["cycles"], CYCLES, "{counts}");
    for key in [
        "device_add",
        "device_add_ok",
        "device_del",
        "device_del_ok",
        "deleted_events",
    ] {
        assert_eq!(counts[key], n, "{key}: {counts}");
    }
    assert!(
        counts["load_seconds"].as_f64().unwrap() >= f64::from(LOAD_SECS),
        "{counts}"
    );
    let vanished = counts["vanished_clients"].as_u64().unwrap();
    assert!(vanished >= 6 * 3, "vanishing clients: {counts}");
    assert_eq!(
        counts["vanished_greeted"], counts["vanished_greetings_expected"],
        "{counts}"
    );
    let snap = |name: &str| {
        lines
            .iter()
            .find(|v| v["host"] == name)
            .unwrap_or_else(|| panic!("no {name} snapshot:\n{text}"))
    };
    let (base, end) = (snap("baseline"), snap("end"));
    eprintln!(
        "soak: after boot {}, baseline {base}, end {end}",
        snap("after-boot")
    );
    for key in ["fds", "threads", "gsi"] {
        assert_eq!(base[key], end[key], "{key}: baseline {base} end {end}");
    }
    let gsi = end["gsi"].as_object().expect("info gsi parsed");
    assert!(!gsi.is_empty(), "info gsi: {end}");
    let grew = end["own_kib"].as_i64().unwrap() - base["own_kib"].as_i64().unwrap();
    assert!(
        grew <= 8 * 1024,
        "vmm memory (VmRSS minus guest RAM) grew {grew} KiB"
    );
    let check = |name: &str| {
        checks
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no check {name}"))["detail"]
            .as_str()
            .unwrap()
            .to_string()
    };
    eprintln!(
        "soak: blk {}; net {}; console {}",
        check("guest blk loop"),
        check("guest net loop"),
        check("guest console (serial)")
    );
    assert!(text.contains("SOAK PASS"), "{text}");
    assert!(
        out.stdout.contains("=== SOAK-END rc=0 ==="),
        "{}",
        out.stdout
    );
}
