//! The guest-visible PCI ABI across binary upgrades, pinned by files that a build wrote and
//! that are checked in under `tests/golden/` (its README.md says how each was made).
//!
//! One machine with a device of each kind: virtio-rng at 04.0, a virtio-blk, a virtio-net
//! and a virtio-console placed by the vmm, and a multifunction slot 06 (the second function
//! INTx-only, `vectors=0`). The probe guest dumps the config space of every function it
//! reaches (bus 0, and the buses behind bridges) through CF8 and ECAM.
//!
//! - `round1/`: the compat record and the probe's output under the round-one binary (commit
//!   e04c682). Fed that record, this build must give the guest the same bytes, and the record
//!   it writes back must describe the same machine (`vmm abi diff`: no differences).
//! - `new-machine/` and `new-machine-bridged/` (the machine plus two levels of pci-bridges):
//!   the same for a new machine (no record) under the build that made the files. A change
//!   that alters them changes what a new machine looks like: deliberate ones are refreshed
//!   with `VMM_BLESS=1` (see the README); old records must keep their bytes.

use std::path::{Path, PathBuf};

use integration_tests::ground::repo_root;
use integration_tests::probe::{dumps, require_kvm, require_tun, run_probe_checked, vmm};

fn golden(name: &str) -> PathBuf {
    repo_root().join("tests/golden").join(name)
}

/// The machine's `--device` options, with its disk image, tap and console file in `dir`.
fn machine(dir: &Path, tap: &str) -> Vec<String> {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk image");
    [
        "virtio-rng-pci,id=rng0,addr=04.0".to_string(),
        format!(
            "virtio-blk-pci,id=disk0,file={},serial=golden",
            img.display()
        ),
        format!("virtio-net-pci,id=net0,tap={tap}"),
        format!(
            "virtio-console-pci,id=con0,path={}",
            dir.join("console.out").display()
        ),
        "virtio-rng-pci,id=f0,addr=06.0,multifunction=on".into(),
        "virtio-rng-pci,id=f1,addr=06.1,vectors=0".into(),
    ]
    .into_iter()
    .flat_map(|d| ["--device".to_string(), d])
    .collect()
}

/// Boots the probe on the machine plus the devices `extra`, with `record` as its compat record
/// (read if it exists, written at the end); returns the probe's output.
fn probe_with_record(dir: &Path, tap: &str, record: &Path, extra: &[&str]) -> String {
    require_kvm();
    require_tun();
    let mut args = machine(dir, tap);
    for d in extra {
        args.extend(["--device".to_string(), d.to_string()]);
    }
    args.extend(["--compat".to_string(), record.display().to_string()]);
    run_probe_checked("mode=probe", &args).0
}

/// Asserts two dump sections are equal; on a difference, shows the first lines that differ.
fn assert_same_dump(what: &str, want: &str, got: &str) {
    if want == got {
        return;
    }
    let diff: Vec<String> = want
        .lines()
        .zip(got.lines())
        .filter(|(a, b)| a != b)
        .take(8)
        .map(|(a, b)| format!("  golden: {a}\n  now:    {b}"))
        .collect();
    panic!(
        "{what}: the guest sees other config space than the golden file says \
         ({} lines golden, {} now); first differences:\n{}\n\
         A deliberate change for new machines is a recorded machine property (old records keep \
         their bytes); then refresh tests/golden/new-machine (tests/golden/README.md).",
        want.lines().count(),
        got.lines().count(),
        diff.join("\n")
    );
}

/// `vmm abi diff OLD NEW` must find no difference at all.
fn assert_same_record(old: &Path, new: &Path) {
    let out = vmm(
        &[
            "abi",
            "diff",
            old.to_str().expect("utf-8"),
            new.to_str().expect("utf-8"),
        ],
        30,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.trim() == "no differences",
        "vmm abi diff {} {}: {}\n{text}{}",
        old.display(),
        new.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts a run's probe output and written record match the golden directory `name`: the
/// same CF8 and ECAM dumps, and no difference between the records.
fn assert_as_golden(name: &str, out: &str, record: &Path) {
    let want = std::fs::read_to_string(golden(&format!("{name}/probe-stdout.txt")))
        .expect("golden output");
    let (want_cf8, want_ecam) = dumps(&want);
    let (cf8, ecam) = dumps(out);
    assert_same_dump(&format!("{name}, CF8"), &want_cf8, &cf8);
    assert_same_dump(&format!("{name}, ECAM"), &want_ecam, &ecam);
    assert_same_record(&golden(&format!("{name}/record.json")), record);
}

fn tap_name(n: u32) -> String {
    format!("vmmup{}{n}", std::process::id() % 100_000)
}

#[test]
fn a_round_one_record_gives_the_round_one_config_space() {
    let dir = integration_tests::scratch_dir("upgrade-r1");
    let record = dir.join("record.json");
    std::fs::copy(golden("round1/record.json"), &record).expect("copy the golden record");
    let out = probe_with_record(&dir, &tap_name(1), &record, &[]);
    assert_as_golden("round1", &out, &record);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A new machine (no record) under this build against the golden directory `name`, which
/// `VMM_BLESS=1` rewrites first (tests/golden/README.md).
fn new_machine_as_golden(name: &str, tap: u32, extra: &[&str]) {
    let dir = integration_tests::scratch_dir(&format!("upgrade-{name}"));
    let record = dir.join("record.json");
    let out = probe_with_record(&dir, &tap_name(tap), &record, extra);
    if std::env::var("VMM_BLESS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(golden(name)).expect("golden directory");
        std::fs::copy(&record, golden(&format!("{name}/record.json"))).expect("bless the record");
        std::fs::write(golden(&format!("{name}/probe-stdout.txt")), &out)
            .expect("bless the output");
        eprintln!("VMM_BLESS: tests/golden/{name} rewritten by this build");
    }
    assert_as_golden(name, &out, &record);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_new_machine_gives_the_config_space_of_its_golden_files() {
    new_machine_as_golden("new-machine", 2, &[]);
}

/// The same machine with two levels of pci-bridges (00:1e.0 -> bus 1, 01:03.0 -> bus 2) and a
/// virtio-rng behind each (the one on bus 2 INTx-only): bus numbers, windows, the 64-bit
/// window by bus and INTx swizzling are pinned with the rest.
#[test]
fn a_new_machine_with_bridges_gives_the_config_space_of_its_golden_files() {
    new_machine_as_golden(
        "new-machine-bridged",
        3,
        &[
            "pci-bridge,id=br1,chassis_nr=1,addr=1e.0",
            "virtio-rng-pci,id=b1,bus=br1,addr=01.0",
            "pci-bridge,id=br2,chassis_nr=2,bus=br1,addr=03.0",
            "virtio-rng-pci,id=b2,bus=br2,addr=04.0,vectors=0",
        ],
    );
}

/// The golden files themselves: the round-one record is from before the machine properties
/// (none of their fields), round one and a new machine differ where new machines differ (so
/// neither test could pass by comparing a file with itself), and the bridged machine has its
/// bridges and the device behind both.
#[test]
fn the_golden_files_are_what_their_readme_says() {
    let r1: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden("round1/record.json")).expect("round-one record"),
    )
    .expect("round-one record JSON");
    for later in [
        "extended_config",
        "mmio64_window",
        "pci_hotplug",
        "pci_config_ports",
    ] {
        assert!(
            r1["machine"].get(later).is_none(),
            "the round-one record has {later}: not written by round one"
        );
    }
    let out = vmm(
        &[
            "abi",
            "diff",
            golden("round1/record.json").to_str().expect("utf-8"),
            golden("new-machine/record.json").to_str().expect("utf-8"),
        ],
        30,
    );
    let diff = String::from_utf8_lossy(&out.stdout);
    assert!(
        diff.contains("machine: extended_config: zero -> all-ones"),
        "round one and a new machine should differ in the extended config space:\n{diff}"
    );
    let bridged: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden("new-machine-bridged/record.json"))
            .expect("bridged record"),
    )
    .expect("bridged record JSON");
    for (id, addr) in [("br1", "00:1e.0"), ("br2", "01:03.0"), ("b2", "02:04.0")] {
        assert_eq!(
            bridged["devices"][id]["addr"], addr,
            "{id} in the bridged golden record"
        );
    }
}
