//! Issue "Compat record": the same guest-visible PCI across restarts, with the record as hints;
//! `--global` pinned by the record; `--compat-strict`; crash-safe record writes; `abi diff`;
//! machine description files.

use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::ground::{guest_boot, host_script, run_host_scenario, section};
use integration_tests::probe::{dumps, lspci_decode, parse_dump, probe_elf, run_probe, vmm};

fn tmpdir(name: &str) -> PathBuf {
    integration_tests::scratch_dir(&format!("compat-{name}"))
}

fn devices(list: &[&str]) -> Vec<String> {
    list.iter()
        .flat_map(|d| ["--device".to_string(), d.to_string()])
        .collect()
}

/// Boots the probe with `extra` args; returns the CF8 dump decoded by `lspci -n`.
fn probe_lspci(extra: &[String]) -> String {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let out = run_probe("mode=probe ecam=0", &extra);
    let cf8 = cf8_dump(&out);
    lspci_decode(&cf8, &["-n"])
}

/// The probe's CF8 dump section (these runs skip ECAM).
fn cf8_dump(out: &str) -> String {
    integration_tests::ground::section(out, "PROBE-CF8").expect("cf8 dump")
}

fn rec_arg(p: &Path) -> Vec<String> {
    vec!["--compat".into(), p.display().to_string()]
}

#[test]
fn survivors_keep_their_addresses_and_new_devices_go_around_them() {
    let d = tmpdir("restart");
    let rec = d.join("rec.json");
    let mut a = devices(&[
        "virtio-rng-pci,id=a",
        "virtio-rng-pci,id=b",
        "virtio-rng-pci,id=c",
    ]);
    a.extend(rec_arg(&rec));
    let first = probe_lspci(&a);
    assert!(first.contains("00:01.0") && first.contains("00:02.0") && first.contains("00:03.0"));
    // Restart: b removed, d added *before* c on the command line.
    let mut b = devices(&[
        "virtio-rng-pci,id=d",
        "virtio-rng-pci,id=a",
        "virtio-rng-pci,id=c",
    ]);
    b.extend(rec_arg(&rec));
    probe_lspci(&b);
    let out = vmm(&["abi", "show", rec.to_str().unwrap()], 10);
    let show = String::from_utf8_lossy(&out.stdout);
    assert!(
        show.contains("00:01.0 00ff: 1af4:1044 (rev 01)  id=a"),
        "{show}"
    );
    assert!(
        show.contains("00:03.0 00ff: 1af4:1044 (rev 01)  id=c"),
        "{show}"
    );
    assert!(
        show.contains("00:02.0 00ff: 1af4:1044 (rev 01)  id=d"),
        "{show}"
    );
    assert!(!show.contains("id=b"), "{show}");
}

#[test]
fn global_defaults_do_not_change_recorded_devices() {
    let d = tmpdir("global");
    let rec = d.join("rec.json");
    let mut a = devices(&["virtio-rng-pci,id=old"]);
    a.extend(rec_arg(&rec));
    probe_lspci(&a);
    let mut b = devices(&["virtio-rng-pci,id=old", "virtio-rng-pci,id=new"]);
    b.extend(rec_arg(&rec));
    b.extend([
        "--global".to_string(),
        "virtio-rng-pci.vectors=4".to_string(),
    ]);
    let bargs: Vec<&str> = b.iter().map(String::as_str).collect();
    let out = run_probe("mode=probe ecam=0", &bargs);
    let cf8 = cf8_dump(&out);
    let old = lspci_decode(&cf8, &["-vv", "-s", "01.0"]);
    let new = lspci_decode(&cf8, &["-vv", "-s", "02.0"]);
    assert!(old.contains("MSI-X: Enable- Count=2"), "{old}");
    assert!(new.contains("MSI-X: Enable- Count=4"), "{new}");
}

#[test]
fn compat_strict_refuses_a_moved_device_and_leaves_the_record() {
    let d = tmpdir("strict");
    let rec = d.join("rec.json");
    let mut a = devices(&["virtio-rng-pci,id=a", "virtio-rng-pci,id=b"]);
    a.extend(rec_arg(&rec));
    probe_lspci(&a);
    let before = std::fs::read(&rec).unwrap();
    let elf = probe_elf();
    let out = vmm(
        &[
            "run",
            "--no-reboot",
            "--kernel",
            elf.to_str().unwrap(),
            "--device",
            "virtio-rng-pci,id=a,addr=9",
            "--device",
            "virtio-rng-pci,id=b,vectors=3",
            "--compat",
            rec.to_str().unwrap(),
            "--compat-strict",
        ],
        30,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "the guest must not run");
    assert!(err.contains("--compat-strict"), "{err}");
    assert!(err.contains("moved   a: 00:01.0 -> 00:09.0"), "{err}");
    assert!(err.contains("changed b: msix_table_size: 2 -> 3"), "{err}");
    assert_eq!(std::fs::read(&rec).unwrap(), before, "record untouched");
}

#[test]
fn a_kill_during_the_record_write_leaves_a_valid_record() {
    let d = tmpdir("kill");
    let rec = d.join("rec.json");
    let mut a = devices(&["virtio-rng-pci,id=a"]);
    a.extend(rec_arg(&rec));
    probe_lspci(&a);
    let old = std::fs::read_to_string(&rec).unwrap();
    let vmm_bin = integration_tests::ground::vmm_binary().unwrap();
    let elf = probe_elf();
    // A preloaded shim makes rename(2) slow: the vmm has written and synced the temporary file
    // and waits to rename it when it is killed.
    let mut child = Command::new(&vmm_bin)
        .args([
            "run",
            "--no-reboot",
            "--kernel",
            elf.to_str().unwrap(),
            "--append",
            "mode=hello",
        ])
        .args([
            "--device",
            "virtio-rng-pci,id=a",
            "--device",
            "virtio-rng-pci,id=b",
        ])
        .args(["--compat", rec.to_str().unwrap()])
        .env("LD_PRELOAD", integration_tests::shim::slow_rename())
        .env("SLOW_RENAME_MS", "3000")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the temporary file to exist, then kill -9.
    let mut saw_tmp = false;
    for _ in 0..200 {
        if std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".tmp."))
        {
            saw_tmp = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(saw_tmp, "the writer never reached the pause");
    let now = std::fs::read_to_string(&rec).unwrap();
    assert_eq!(
        now, old,
        "the old record is intact after kill -9 before the rename"
    );
    let out = vmm(&["abi", "show", rec.to_str().unwrap()], 10);
    assert!(out.status.success());
    // And a full write afterwards produces the new one.
    let mut b = devices(&["virtio-rng-pci,id=a", "virtio-rng-pci,id=b"]);
    b.extend(rec_arg(&rec));
    probe_lspci(&b);
    let out = vmm(&["abi", "show", rec.to_str().unwrap()], 10);
    assert!(String::from_utf8_lossy(&out.stdout).contains("id=b"));
}

/// Boots the probe from machine file `m1`, dumping to `m2`; asserts the dump is `m1` byte for
/// byte and returns the probe's output.
fn refeed(m1: &Path, m2: &Path) -> String {
    let out = run_probe(
        "mode=probe",
        &[
            "--machine-file",
            m1.to_str().unwrap(),
            "--dump-machine",
            m2.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(m1).unwrap(),
        std::fs::read_to_string(m2).unwrap()
    );
    out
}

fn write(p: &Path, s: &str) {
    std::fs::write(p, s).unwrap();
}

#[test]
fn abi_diff_on_hand_made_records() {
    let d = tmpdir("diff");
    let fp = |vectors: u32, rev: u32| {
        format!(
            r#"{{"vendor":6900,"device":4164,"subsystem_vendor":6900,"subsystem":4352,"class":65280,"revision":{rev},"header_type":0,"interrupt_pin":1,"bars":[{{"index":1,"kind":"mem32","prefetchable":false,"size":4096}}],"capabilities":[{{"id":17,"offset":136,"len":12}}],"msix_table_size":{vectors},"props":{{"vectors":"{vectors}"}}}}"#
        )
    };
    let rec = |devs: &[(&str, &str, String)]| {
        let body: Vec<String> = devs
            .iter()
            .map(|(id, addr, fp)| {
                format!(
                    r#""{id}":{{"driver":"virtio-rng-pci","addr":"{addr}","fingerprint":{fp}}}"#
                )
            })
            .collect();
        format!(
            r#"{{"format":"vmm-pci-compat","version":1,"machine":{{"host_bridge_vendor":6966,"host_bridge_device":8,"ecam_base":3758096384,"mmio32_window":[3221225472,536870912]}},"devices":{{{}}}}}"#,
            body.join(",")
        )
    };
    let old = d.join("old.json");
    write(
        &old,
        &rec(&[
            ("a", "00:01.0", fp(2, 1)),
            ("b", "00:02.0", fp(2, 1)),
            ("c", "00:03.0", fp(2, 1)),
        ]),
    );
    let run = |new: &str, json: bool| {
        let p = d.join("new.json");
        write(&p, new);
        let mut args = vec!["abi", "diff", old.to_str().unwrap(), p.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let out = vmm(&args, 10);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    // Same: exit 0.
    let (c, o) = run(&std::fs::read_to_string(&old).unwrap(), false);
    assert_eq!((c, o.trim()), (Some(0), "no differences"));
    // Added and removed only: exit 0 (no device present in both changed).
    let (c, o) = run(
        &rec(&[
            ("a", "00:01.0", fp(2, 1)),
            ("b", "00:02.0", fp(2, 1)),
            ("z", "00:09.0", fp(2, 1)),
        ]),
        false,
    );
    assert_eq!(c, Some(0), "{o}");
    assert!(
        o.contains("removed c from 00:03.0") && o.contains("added   z at 00:09.0"),
        "{o}"
    );
    // Moved: exit 1.
    let (c, o) = run(
        &rec(&[
            ("a", "00:04.0", fp(2, 1)),
            ("b", "00:02.0", fp(2, 1)),
            ("c", "00:03.0", fp(2, 1)),
        ]),
        false,
    );
    assert_eq!(c, Some(1));
    assert!(o.contains("moved   a: 00:01.0 -> 00:04.0"), "{o}");
    // Changed fields: exit 1, old -> new.
    let (c, o) = run(
        &rec(&[
            ("a", "00:01.0", fp(4, 1)),
            ("b", "00:02.0", fp(2, 2)),
            ("c", "00:03.0", fp(2, 1)),
        ]),
        false,
    );
    assert_eq!(c, Some(1));
    assert!(o.contains("changed a: msix_table_size: 2 -> 4"), "{o}");
    assert!(o.contains("changed a: props.vectors: 2 -> 4"), "{o}");
    assert!(o.contains("changed b: revision: 1 -> 2"), "{o}");
    // JSON for tools.
    let (c, o) = run(&rec(&[("a", "00:01.0", fp(4, 1))]), true);
    assert_eq!(c, Some(1));
    let v: serde_json::Value = serde_json::from_str(&o).unwrap();
    assert_eq!(v["abi_changed"], true);
    let kinds: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["change"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"changed") && kinds.contains(&"removed"),
        "{kinds:?}"
    );
    // Errors: exit 2.
    let (c, _) = run("not json", false);
    assert_eq!(c, Some(2));
}

#[test]
fn bad_records_and_machine_files_are_refused_and_left_alone() {
    let d = tmpdir("bad");
    let elf = probe_elf();
    let cases = [
        ("garbage", "not a valid record"),
        (
            r#"{"format":"vmm-pci-compat","version":99}"#,
            "unsupported format",
        ),
        (
            "{\"format\":\"vmm-pci-compat\",\"version\":1",
            "not a valid record",
        ),
    ];
    for (text, want) in cases {
        let rec = d.join("rec.json");
        write(&rec, text);
        let out = vmm(
            &[
                "run",
                "--no-reboot",
                "--kernel",
                elf.to_str().unwrap(),
                "--compat",
                rec.to_str().unwrap(),
            ],
            30,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("compat record '{}'", rec.display())),
            "{err}"
        );
        assert!(err.contains(want), "{err}");
        assert_eq!(
            std::fs::read_to_string(&rec).unwrap(),
            text,
            "left as it was"
        );
    }
    let mf = d.join("m.json");
    for (text, want) in [
        ("[]", "unsupported format"),
        (
            r#"{"format":"vmm-machine","version":1,"devices":[{"driver":"virtio-rng-pci","id":"x"},{"driver":"virtio-rng-pci","id":"x"}]}"#,
            "duplicate device id 'x'",
        ),
        (
            r#"{"format":"vmm-machine","version":1,"devices":[{"driver":"virtio-rng-pci","addr":"3"},{"driver":"virtio-rng-pci","addr":"3"}]}"#,
            "two devices at address 03.0",
        ),
        (
            r#"{"format":"vmm-machine","version":1,"devices":[{"driver":"virtio-rng-pci","addr":"33"}]}"#,
            "invalid PCI address",
        ),
    ] {
        write(&mf, text);
        let out = vmm(
            &["run", "--no-reboot", "--machine-file", mf.to_str().unwrap()],
            30,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("machine file '{}'", mf.display())),
            "{err}"
        );
        assert!(err.contains(want), "{err}");
        assert_eq!(std::fs::read_to_string(&mf).unwrap(), text);
    }
    let out = vmm(
        &[
            "run",
            "--no-reboot",
            "--machine-file",
            d.join("missing.json").to_str().unwrap(),
        ],
        30,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.json"));
}

#[test]
fn a_dumped_machine_fed_back_is_the_same_machine() {
    let d = tmpdir("dump");
    let m1 = d.join("m1.json");
    let m2 = d.join("m2.json");
    let elf = probe_elf();
    let mut a: Vec<String> = vec!["--dump-machine".into(), m1.display().to_string()];
    a.extend(devices(&[
        "virtio-rng-pci,id=x,addr=7",
        "virtio-rng-pci",
        "virtio-rng-pci,id=f0,addr=4.0,multifunction=on",
        "virtio-rng-pci,id=f1,addr=4.3,vectors=5",
    ]));
    let args: Vec<&str> = a.iter().map(String::as_str).collect();
    let first = run_probe("mode=probe", &args);
    let out = refeed(&m1, &m2);
    let (c1, e1) = dumps(&first);
    let (c2, e2) = dumps(&out);
    assert_eq!(parse_dump(&c1), parse_dump(&c2));
    assert_eq!(parse_dump(&e1), parse_dump(&e2));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&m1).unwrap()).unwrap();
    assert_eq!(
        m["kernel"],
        elf.canonicalize().unwrap().display().to_string()
    );
    // Options beside the file override it: another command line and one more device.
    let out = run_probe(
        "mode=hello",
        &[
            "--machine-file",
            m1.to_str().unwrap(),
            "--device",
            "virtio-rng-pci,id=x,addr=9",
            "--dump-machine",
            m2.to_str().unwrap(),
        ],
    );
    assert!(out.contains("Hello"));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&m2).unwrap()).unwrap();
    let x = m["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "x")
        .unwrap();
    assert_eq!(x["addr"], "00:09.0");
    assert_eq!(m["cmdline"], "mode=hello");
}

/// Issue 11: a value containing a comma (`,,` in `--device` text) is one value all the way: the
/// disk and the console file are opened under their real names, the dump writes typed JSON
/// values (never joined option text), and dump -> machine file -> dump is byte-identical.
#[test]
fn a_path_with_a_comma_is_opened_dumped_and_fed_back() {
    let d = tmpdir("comma");
    let dir = d.join("x,y");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("a,b.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let console = dir.join("con,out");
    let esc = |p: &Path| p.to_str().unwrap().replace(',', ",,");
    let (m1, m2) = (d.join("m1.json"), d.join("m2.json"));
    let mut a: Vec<String> = vec!["--dump-machine".into(), m1.display().to_string()];
    a.extend(devices(&[
        "virtio-rng-pci,id=r0,addr=3",
        &format!(
            "virtio-blk-pci,id=disk0,addr=5,file={},readonly=on,serial=s,,1",
            esc(&img)
        ),
        &format!("virtio-console-pci,id=con0,path={}", esc(&console)),
        "virtio-rng-pci,vectors=4",
    ]));
    let args: Vec<&str> = a.iter().map(String::as_str).collect();
    let first = run_probe("mode=probe", &args);
    // Realized: a virtio-blk function (1af4:1042) at 00:05.0.
    let (c1, e1) = dumps(&first);
    let blk = parse_dump(&c1)
        .into_iter()
        .find(|f| f.addr == "00:05.0")
        .expect("a function at 00:05.0");
    assert_eq!(
        blk.bytes[..4],
        [0xf4, 0x1a, 0x42, 0x10],
        "virtio-blk at 05.0"
    );
    // The console's file was created under its whole name, and nothing under a cut-off one.
    assert!(console.exists(), "{} not created", console.display());
    assert!(!dir.join("con").exists());
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&m1).unwrap()).unwrap();
    let by_id = |id: &str| {
        m["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap_or_else(|| panic!("no {id} in {m}"))
            .clone()
    };
    let disk = by_id("disk0");
    assert_eq!(disk["addr"], "00:05.0");
    assert_eq!(
        disk["props"],
        serde_json::json!({"file": img.to_str().unwrap(), "readonly": true,
            "serial": "s,1", "vectors": 2}),
        "typed values, the comma kept"
    );
    assert_eq!(by_id("con0")["props"]["path"], console.to_str().unwrap());
    std::fs::remove_file(&console).unwrap();
    let out = refeed(&m1, &m2);
    assert!(
        console.exists(),
        "the machine file's console path was not opened"
    );
    let (c2, e2) = dumps(&out);
    assert_eq!(parse_dump(&c1), parse_dump(&c2));
    assert_eq!(parse_dump(&e1), parse_dump(&e2));
    // The disk is opened under the whole name: a missing one is reported with its comma.
    let missing = dir.join("no,such.img");
    let elf = probe_elf();
    let out = vmm(
        &[
            "run",
            "--no-reboot",
            "--kernel",
            elf.to_str().unwrap(),
            "--device",
            &format!("virtio-blk-pci,id=d9,file={}", esc(&missing)),
        ],
        30,
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "vmm: d9: Could not open '{}': No such file or directory",
            missing.display()
        )
    );
}

/// Real Linux, several restarts in one KVM-host image: (a) survivors keep their addresses in
/// the guest's lspci, (b) --global pinned by the record, (d) `lspci -vvv -nn` of the survivors
/// is byte-identical across restarts (no line masked: BAR addresses depend only on the
/// device's own address, IRQ lines on its slot).
#[test]
fn linux_sees_the_same_pci_across_restarts() {
    let guest = "lspci -n; for s in 01.0 02.0 03.0 04.0; do echo \"=== VVV-$s-BEGIN ===\"; lspci -vvv -nn -s $s; echo \"=== VVV-$s-END ===\"; done";
    let rec = "--compat \"$TMPDIR/rec.json\"";
    let script = host_script(&[
        guest_boot("A", &format!("--device virtio-rng-pci,id=a --device virtio-rng-pci,id=b --device virtio-rng-pci,id=c {rec}"), Some(guest)),
        guest_boot("B", &format!("--device virtio-rng-pci,id=d --device virtio-rng-pci,id=a --device virtio-rng-pci,id=c {rec}"), Some(guest)),
        guest_boot("C", &format!("--global virtio-rng-pci.vectors=4 --device virtio-rng-pci,id=a --device virtio-rng-pci,id=c --device virtio-rng-pci,id=d --device virtio-rng-pci,id=e {rec}"), Some(guest)),
    ]);
    let out = run_host_scenario(&script).unwrap_or_else(|e| panic!("test ground: {e}"));
    let boot = |l: &str| {
        assert!(
            out.stdout.contains(&format!("=== BOOT-{l}-END rc=0 ===")),
            "boot {l}:\n{}",
            out.stdout
        );
        section(&out.stdout, &format!("BOOT-{l}")).unwrap()
    };
    let (a, b, c) = (boot("A"), boot("B"), boot("C"));
    let vvv = |boot: &str, s: &str| {
        section(boot, &format!("VVV-{s}")).unwrap_or_else(|| panic!("{boot}"))
    };
    // (a) a and c stay at 01.0 and 03.0; d takes the free slot 02.0.
    for s in [
        "00:01.0 00ff: 1af4:1044",
        "00:02.0 00ff: 1af4:1044",
        "00:03.0 00ff: 1af4:1044",
    ] {
        assert!(a.contains(s) && b.contains(s), "{s}\nA:\n{a}\nB:\n{b}");
    }
    assert!(!b.contains("00:04.0"), "{b}");
    // (d) identical lspci -vvv -nn for the survivors.
    for s in ["01.0", "03.0"] {
        assert_eq!(
            vvv(&a, s),
            vvv(&b, s),
            "lspci -vvv -nn of {s} changed across a restart"
        );
        assert_eq!(
            vvv(&a, s),
            vvv(&c, s),
            "lspci -vvv -nn of {s} changed with --global"
        );
        assert!(vvv(&a, s).contains("MSI-X: Enable+ Count=2"));
    }
    // (b) the new device e gets the global's 4 vectors, the recorded ones keep 2.
    assert!(
        vvv(&c, "02.0").contains("MSI-X: Enable+ Count=2"),
        "d is recorded"
    );
    assert!(
        vvv(&c, "04.0").contains("MSI-X: Enable+ Count=4"),
        "{}",
        vvv(&c, "04.0")
    );
}
