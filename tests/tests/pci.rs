//! Issue "PCI root complex": the probe guest on the local KVM (decoded by the real `lspci -F`)
//! and real Linux on the test ground see every device at its address with the right identity.

use std::sync::OnceLock;

use integration_tests::ground::{
    guest_boot, guest_boot_with, host_script, run_host_scenario, section, ScenarioOutput,
    DEFAULT_APPEND,
};
use integration_tests::probe::{
    dumps, lspci_decode, parse_dump, refused_probe_run, run_probe, vmm, FunctionDump,
};

const DEVICES: &[&str] = &[
    "--device",
    "virtio-rng-pci,id=rng0,addr=05.0",
    "--device",
    "virtio-rng-pci,id=rng1",
    "--device",
    "virtio-rng-pci,id=f0,addr=6.0,multifunction=on",
    "--device",
    "virtio-rng-pci,id=f1,addr=6.1,vectors=4",
    "--device",
    "virtio-rng-pci,id=rng2,addr=1f.0",
];

fn probe_run() -> &'static str {
    static OUT: OnceLock<String> = OnceLock::new();
    OUT.get_or_init(|| run_probe("mode=probe", DEVICES))
}

/// The functions of a probe run's CF8 and ECAM dumps: the same addresses (`want`), the same
/// 256 bytes of config space, and an extended space of all-ones (every function here is
/// conventional PCI, as in QEMU).
fn assert_cf8_and_ecam_agree(out: &str, want: &[&str]) {
    let (cf8, ecam) = dumps(out);
    let (a, b) = (parse_dump(&cf8), parse_dump(&ecam));
    let addrs = |d: &[FunctionDump]| -> Vec<String> { d.iter().map(|f| f.addr.clone()).collect() };
    assert_eq!(addrs(&a), want);
    assert_eq!(addrs(&b), want);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.bytes.len(), y.bytes.len()), (256, 4096), "{}", x.addr);
        assert_eq!(
            x.bytes[..],
            y.bytes[..256],
            "{}: CF8 and ECAM differ",
            x.addr
        );
        assert!(
            y.bytes[256..].iter().all(|&b| b == 0xff),
            "{}: extended space",
            y.addr
        );
    }
}

#[test]
fn cf8_and_ecam_enumerations_are_identical() {
    assert_cf8_and_ecam_agree(
        probe_run(),
        &[
            "00:00.0", "00:01.0", "00:05.0", "00:06.0", "00:06.1", "00:1f.0",
        ],
    );
}

#[test]
fn without_config_ports_the_same_functions_are_reached_through_ecam_alone() {
    // Bus 0 alone, and two levels of bridges (config cycles routed by the bridges' numbers).
    for (devices, with_ports) in [(DEVICES, probe_run()), (BRIDGED, bridged_run())] {
        let mut args = devices.to_vec();
        args.extend(["--pci-config-ports", "off"]);
        let out = run_probe("mode=probe", &args);
        let (cf8, ecam) = dumps(&out);
        assert_eq!(
            parse_dump(&cf8),
            Vec::new(),
            "CF8/CFC answer nothing (all-ones) without the ports:\n{cf8}"
        );
        assert_eq!(parse_dump(&ecam).len(), 6, "{ecam}");
        assert_eq!(
            ecam,
            dumps(with_ports).1,
            "ECAM sees what it sees with the ports"
        );
    }
}

/// `pci_config_ports` is a recorded machine property: a machine started without the ports
/// keeps them off when it restarts from its record or from its description, and turning them
/// back on is an ABI change `--compat-strict` refuses.
#[test]
fn a_machine_without_config_ports_stays_so_from_its_record_and_its_description() {
    let dir = integration_tests::scratch_dir("cfgports");
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let with = |extra: &[&str]| -> Vec<String> {
        DEVICES.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let probe = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_probe("mode=probe", &args);
        let (cf8, ecam) = dumps(&out);
        (parse_dump(&cf8).len(), parse_dump(&ecam).len())
    };
    let (rec, m) = (p("rec.json"), p("m.json"));
    let first = with(&[
        "--pci-config-ports",
        "off",
        "--compat",
        &rec,
        "--dump-machine",
        &m,
    ]);
    assert_eq!(probe(&first), (0, 6), "CF8 finds nothing, ECAM all six");
    let json = |path: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    assert_eq!(json(&rec)["machine"]["pci_config_ports"], false);
    assert_eq!(json(&m)["pci_config_ports"], false);
    assert_eq!(probe(&with(&["--compat", &rec])), (0, 6), "from the record");
    assert_eq!(
        probe(&["--machine-file".to_string(), m.clone()]),
        (0, 6),
        "from the description"
    );
    let strict = with(&[
        "--compat",
        &rec,
        "--compat-strict",
        "--pci-config-ports",
        "on",
    ]);
    let err = refused_probe_run(&strict.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("machine: pci_config_ports: false -> true"),
        "{err}"
    );
    // A new machine has the ports.
    assert_eq!(probe(&with(&["--compat", &p("new.json")])), (6, 6));
    assert_eq!(json(&p("new.json"))["machine"]["pci_config_ports"], true);
}

#[test]
fn lspci_decodes_host_bridge_and_devices_at_their_addresses() {
    let (cf8, _) = dumps(probe_run());
    let nn = lspci_decode(&cf8, &["-nn"]);
    let lines: Vec<&str> = nn.lines().collect();
    assert_eq!(lines.len(), 6, "{nn}");
    assert!(
        lines[0].starts_with("00:00.0 Host bridge [0600]") && lines[0].contains("[1b36:0008]"),
        "{nn}"
    );
    for (line, addr) in lines[1..]
        .iter()
        .zip(["00:01.0", "00:05.0", "00:06.0", "00:06.1", "00:1f.0"])
    {
        assert!(line.starts_with(addr), "{nn}");
        assert!(line.contains("Unclassified device [00ff]"), "{line}");
        assert!(line.contains("[1af4:1044] (rev 01)"), "{line}");
    }
}

#[test]
fn lspci_decodes_bars_and_capabilities() {
    let (_, ecam) = dumps(probe_run());
    let v = lspci_decode(&ecam, &["-vvv", "-nn", "-s", "05.0"]);
    assert!(
        v.contains("Subsystem: Red Hat, Inc. Device [1af4:1100]"),
        "{v}"
    );
    assert!(v.contains("Interrupt: pin A"), "{v}");
    // Sizes come from the BAR sizing protocol as lspci sees it in the dump.
    assert!(
        v.contains("Region 1: Memory at") && v.contains("(32-bit, non-prefetchable)"),
        "{v}"
    );
    assert!(
        v.contains("Region 4: Memory at") && v.contains("(64-bit, prefetchable)"),
        "{v}"
    );
    assert!(v.contains("MSI-X: Enable- Count=2 Masked-"), "{v}");
    assert!(v.contains("Vector table: BAR=1 offset=00000000"), "{v}");
    assert!(v.contains("PBA: BAR=1 offset=00000800"), "{v}");
    for cap in ["CommonCfg", "ISR", "Notify"] {
        assert!(v.contains(&format!("VirtIO: {cap}")), "missing {cap}: {v}");
    }
    let f1 = lspci_decode(&ecam, &["-vv", "-s", "06.1"]);
    assert!(
        f1.contains("MSI-X: Enable- Count=4"),
        "vectors=4 on 06.1: {f1}"
    );
}

#[test]
fn multifunction_bit_is_set_on_function_0_only() {
    let (cf8, _) = dumps(probe_run());
    let d = parse_dump(&cf8);
    let header = |a: &str| d.iter().find(|f| f.addr == a).unwrap().bytes[0x0e];
    assert_eq!(header("00:06.0"), 0x80);
    assert_eq!(header("00:06.1"), 0x00);
    assert_eq!(header("00:05.0"), 0x00);
}

/// Two levels of bridges: 00:1e.0 (bus 1, buses 1-2) with a device at 01:01.0 and a bridge at
/// 01:03.0 (bus 2) with a device at 02:04.0; rng0 stays at 00:05.0 as in [`DEVICES`].
const BRIDGED: &[&str] = &[
    "--device",
    "virtio-rng-pci,id=b,bus=br2,addr=4.0",
    "--device",
    "virtio-rng-pci,id=rng0,addr=05.0",
    "--device",
    "pci-bridge,id=br1,chassis_nr=1,addr=1e.0",
    "--device",
    "virtio-rng-pci,id=a,bus=br1,addr=1.0",
    "--device",
    "pci-bridge,id=br2,chassis_nr=2,bus=br1,addr=3",
];

fn bridged_run() -> &'static str {
    static OUT: OnceLock<String> = OnceLock::new();
    OUT.get_or_init(|| run_probe("mode=probe", BRIDGED))
}

#[test]
fn bridges_cf8_and_ecam_enumerations_through_two_levels_agree() {
    assert_cf8_and_ecam_agree(
        bridged_run(),
        &[
            "00:00.0", "00:05.0", "00:1e.0", "01:01.0", "01:03.0", "02:04.0",
        ],
    );
    // A bus-0 device's config space (BAR addresses included) is the same as on the machine
    // without bridges: its BARs depend on its own address only.
    let bridged = parse_dump(&dumps(bridged_run()).1);
    let plain = parse_dump(&dumps(probe_run()).1);
    let find =
        |d: &[FunctionDump], at: &str| d.iter().find(|f| f.addr == at).unwrap().bytes.clone();
    assert_eq!(find(&bridged, "00:05.0"), find(&plain, "00:05.0"));
}

#[test]
fn lspci_decodes_bridges_their_bus_numbers_and_windows() {
    let (_, ecam) = dumps(bridged_run());
    let tree = lspci_decode(&ecam, &["-t"]);
    assert_eq!(
        tree.trim_end(),
        "-[0000:00]-+-00.0\n           +-05.0\n           \\-1e.0-[01-02]--+-01.0\n                           \\-03.0-[02]----04.0",
        "{tree}"
    );
    let nn = lspci_decode(&ecam, &["-nn", "-s", "1e.0"]);
    assert!(
        nn.contains("00:1e.0 PCI bridge [0604]: Red Hat, Inc. QEMU PCI-PCI bridge [1b36:0001]"),
        "{nn}"
    );
    let br1 = lspci_decode(&ecam, &["-vvv", "-s", "00:1e.0"]);
    for want in [
        "Bus: primary=00, secondary=01, subordinate=02, sec-latency=0",
        "I/O behind bridge: f000-0fff [disabled]",
        "Memory behind bridge: c4000000-c4ffffff [size=16M]",
        // The 64-bit window of buses 1-2 (512 MiB each, by bus number).
        "Prefetchable memory behind bridge: 0000004020000000-000000405fffffff [size=1G]",
        "Capabilities: [40] Slot ID: 0 slots, First+, chassis 01",
    ] {
        assert!(br1.contains(want), "{want:?} not in:\n{br1}");
    }
    let br2 = lspci_decode(&ecam, &["-vvv", "-s", "01:03.0"]);
    for want in [
        "Bus: primary=01, secondary=02, subordinate=02",
        "Memory behind bridge: c4800000-c4ffffff [size=8M]",
        "Prefetchable memory behind bridge: 0000004040000000-000000405fffffff [size=512M]",
        "chassis 02",
    ] {
        assert!(br2.contains(want), "{want:?} not in:\n{br2}");
    }
    // Each function's BARs in its bus's window, at its devfn's place: bus 1 at 0xc4000000,
    // bus 2 at 0xc4800000, 32 KiB per devfn; 64-bit BARs in the 64-bit window, bus 1 at
    // 0x4020000000, 2 MiB per devfn; INTx swizzled through both bridges to bus 0.
    let a = lspci_decode(&ecam, &["-vv", "-s", "01:01.0"]);
    assert!(a.contains("Region 1: Memory at c4040000 (32-bit"), "{a}");
    assert!(
        a.contains("Region 4: Memory at 4021000000 (64-bit, prefetchable)"),
        "{a}"
    );
    let b = lspci_decode(&ecam, &["-vv", "-s", "02:04.0"]);
    assert!(b.contains("Region 1: Memory at c4900000 (32-bit"), "{b}");
    assert!(b.contains("pin A routed to IRQ 17"), "{b}");
}

/// Runs the vmm with `devices`, a compat record and a machine dump to write; on a device error
/// nothing runs and nothing is written. Returns the exit status and stderr.
fn vmm_err(devices: &[&str]) -> (Option<i32>, String) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vmm-pci-err-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (rec, dump) = (dir.join("rec.json"), dir.join("m.json"));
    let elf = integration_tests::probe::probe_elf();
    let mut args = vec!["run", "--no-reboot", "--kernel", elf.to_str().unwrap()];
    for d in devices {
        args.push("--device");
        args.push(d);
    }
    args.extend([
        "--compat",
        rec.to_str().unwrap(),
        "--dump-machine",
        dump.to_str().unwrap(),
    ]);
    let out = vmm(&args, 30);
    assert!(out.stdout.is_empty(), "nothing may run on a device error");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{devices:?}: files written: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn device_errors_have_qemu_wording_and_stop_before_anything_runs() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["virtio-rng-pci,id=disk0,addr=5", "virtio-rng-pci,addr=5"],
            "vmm: PCI: slot 5 function 0 not available for virtio-rng-pci, in use by virtio-rng-pci,id=disk0",
        ),
        (
            &["virtio-rng-pci,addr=5", "virtio-rng-pci,addr=5.1"],
            "vmm: PCI: single function device can't be populated in function 5.1",
        ),
        (
            &["virtio-rng-pci,addr=zz"],
            "vmm: Property 'virtio-rng-pci.addr' can't take value 'zz': invalid PCI address",
        ),
        (&["virtio-rng-pci,id=a", "virtio-rng-pci,id=a"], "vmm: Duplicate ID 'a' for device"),
        (
            &["virtio-rng-pci,addr=0"],
            "vmm: PCI: slot 0 function 0 not available for virtio-rng-pci, reserved for the host bridge",
        ),
        (&["virtio-rng-pci,nosuch=1"], "vmm: Property 'virtio-rng-pci.nosuch' not found"),
        (&["virtio-nosuch-pci"], "vmm: 'virtio-nosuch-pci' is not a valid device model name"),
    ];
    for (devices, want) in cases {
        let (code, err) = vmm_err(devices);
        assert_eq!(code, Some(1), "{devices:?}: {err}");
        assert_eq!(&err, want, "{devices:?}");
    }
    let br = "pci-bridge,id=br1,chassis_nr=1,addr=1e.0";
    let bridge_cases: &[(&[&str], &str)] = &[
        (&["virtio-rng-pci,bus=br9"], "vmm: Bus 'br9' not found"),
        (&[br, "virtio-rng-pci,bus=br9"], "vmm: Bus 'br9' not found"),
        (&["virtio-rng-pci,id=r", "virtio-rng-pci,bus=r"], "vmm: Bus 'r' not found"),
        (&["pci-bridge,id=me,chassis_nr=1,bus=me"], "vmm: Bus 'me' not found"),
        (
            &["pci-bridge,id=x,chassis_nr=1,bus=y", "pci-bridge,id=y,chassis_nr=2,bus=x"],
            "vmm: Bus 'y' not found",
        ),
        (
            &["pci-bridge,id=br1"],
            "vmm: Bridge chassis not specified. Each bridge is required to be assigned a unique chassis id > 0.",
        ),
        (
            &[br, "pci-bridge,id=br2,chassis_nr=1"],
            "vmm: Bridge chassis 1 is already used by 'br1'. Each bridge is required to be assigned a unique chassis id > 0.",
        ),
        (
            &[br, "virtio-rng-pci,id=x,bus=br1,addr=2", "virtio-rng-pci,bus=br1,addr=2"],
            "vmm: PCI: slot 2 function 0 not available for virtio-rng-pci, in use by virtio-rng-pci,id=x",
        ),
    ];
    for (devices, want) in bridge_cases {
        let (code, err) = vmm_err(devices);
        assert_eq!(code, Some(1), "{devices:?}: {err}");
        assert_eq!(&err, want, "{devices:?}");
    }
    let mut behind: Vec<String> = vec![br.to_string()];
    behind.extend((0..33).map(|i| format!("virtio-rng-pci,id=d{i},bus=br1")));
    let behind: Vec<&str> = behind.iter().map(String::as_str).collect();
    let (code, err) = vmm_err(&behind);
    assert_eq!(code, Some(1));
    assert_eq!(
        err,
        "vmm: PCI: no slot/function available for virtio-rng-pci, all in use or reserved"
    );
    // More than 255 buses: 256 bridges (31 on bus 0, the others behind them; chassis numbers
    // are 8-bit, so one repeats, but the bus count is what is said).
    let bridges: Vec<String> = (0..256u32)
        .map(|i| {
            let bus = match i {
                0..31 => "pci.0".to_string(),
                _ => format!("b{}", i % 31),
            };
            format!("pci-bridge,id=b{i},chassis_nr={},bus={bus}", i % 255 + 1)
        })
        .collect();
    let bridges: Vec<&str> = bridges.iter().map(String::as_str).collect();
    let (code, err) = vmm_err(&bridges);
    assert_eq!(code, Some(1));
    assert_eq!(
        err,
        "vmm: PCI: no bus number left for pci-bridge,id=b247: a machine has at most 256 buses (0-255)"
    );
    let full: Vec<String> = (0..32).map(|_| "virtio-rng-pci".to_string()).collect();
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let (code, err) = vmm_err(&full);
    assert_eq!(code, Some(1));
    assert_eq!(
        err,
        "vmm: PCI: no slot/function available for virtio-rng-pci, all in use or reserved"
    );
}

#[test]
fn help_documents_device_drivers_and_properties() {
    let out = vmm(&["run", "--help"], 10);
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--device",
        "virtio-rng-pci",
        "addr",
        "multifunction",
        "vectors",
        "device[0]",
    ] {
        assert!(help.contains(word), "help lacks {word}:\n{help}");
    }
}

/// The issue's device set, as the Linux boots `RNG` and `ECAM` take it.
const RNG_DEVICES: &str = "--device virtio-rng-pci,id=rng0,addr=05.0 --device virtio-rng-pci,id=rng1 --device virtio-rng-pci,id=rng2,addr=1f.0";

/// The guest's report of how it reaches config space: what Linux logged about type 1 and
/// MMCONFIG, and whether its DSDT's host bridge `_CRS` claims 0xcf8-0xcff (the I/O descriptor
/// `47 01 f8 0c f8 0c 01 08`).
const CONFIG_REPORT: &str = r#"echo "=== CONFIG-BEGIN ==="; dmesg | grep -E "PCI: Using configuration type|MMCONFIG for domain|No config space access"
if od -An -tx1 -v /sys/firmware/acpi/tables/DSDT | tr -d ' \n' | grep -q 4701f80cf80c0108; then echo "DSDT claims CF8"; else echo "DSDT leaves CF8"; fi
echo "=== CONFIG-END ===""#;

/// One KVM-host image, one Linux boot with the issue's device set plus a multifunction slot.
fn linux() -> &'static ScenarioOutput {
    static OUT: OnceLock<ScenarioOutput> = OnceLock::new();
    OUT.get_or_init(|| {
        let guest = r#"
echo "=== LSPCI-N-BEGIN ==="; lspci -n; echo "=== LSPCI-N-END ==="
echo "=== LSPCI-VV-BEGIN ==="; lspci -vv; echo "=== LSPCI-VV-END ==="
echo "=== DRIVERS-BEGIN ==="
for d in /sys/bus/pci/devices/*; do echo "$(basename $d) $(basename $(readlink $d/driver 2>/dev/null) 2>/dev/null)"; done
ls /sys/bus/virtio/drivers/virtio_rng/ 2>&1
echo "=== DRIVERS-END ==="
echo "=== HWRNG-BEGIN ==="; cat /sys/class/misc/hw_random/rng_available; dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n'; echo; echo "=== HWRNG-END ==="
"#;
        let guest = format!("{guest}{CONFIG_REPORT}\n");
        let script = host_script(&[
            guest_boot("RNG", RNG_DEVICES, Some(&guest)),
            // INTx: MSI disabled in the guest, and a device without MSI-X at all.
            guest_boot_with(
                "INTX",
                &format!("{DEFAULT_APPEND} pci=nomsi"),
                256,
                "--device virtio-rng-pci,id=rng0,addr=05.0,vectors=0",
                Some(
                    "dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n'; echo; \
                     grep virtio /proc/interrupts",
                ),
            ),
            // The same devices on a machine without the CF8/CFC ports (ECAM alone, issue 14).
            guest_boot(
                "ECAM",
                &format!("{RNG_DEVICES} --pci-config-ports off"),
                Some(&format!(
                    r#"echo "=== LSPCI-VV-BEGIN ==="; lspci -vv; echo "=== LSPCI-VV-END ==="
echo "=== HWRNG-BEGIN ==="; dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n'; echo; echo "=== HWRNG-END ==="
{CONFIG_REPORT}"#
                )),
            ),
            guest_boot(
                "MF",
                "--device virtio-rng-pci,id=f0,addr=6.0,multifunction=on --device virtio-rng-pci,id=f1,addr=6.1",
                Some("lspci -n"),
            ),
            // A bridge at 00:1e.0 with devices at 01:01.0 and 01:02.0 (issue 13).
            guest_boot(
                "BRIDGE",
                "--device virtio-rng-pci,id=rng0,addr=05.0 --device pci-bridge,id=br1,chassis_nr=1,addr=1e.0 \
                 --device virtio-rng-pci,id=a,bus=br1,addr=01.0 --device virtio-rng-pci,id=b,bus=br1,addr=02.0",
                Some(
                    r#"echo "=== LSPCI-N-BEGIN ==="; lspci -n; echo "=== LSPCI-N-END ==="
echo "=== DRIVERS-BEGIN ==="
for d in /sys/bus/pci/devices/*; do echo "$(basename $d) $(basename $(readlink $d/driver 2>/dev/null) 2>/dev/null)"; done
echo "=== DRIVERS-END ==="
echo "=== BRIDGE-BEGIN ==="; lspci -vv -s 00:1e.0; lspci -xxx -s 00:1e.0; echo "=== BRIDGE-END ==="
echo "=== BEHIND-BEGIN ==="; lspci -vvv -s 01:01.0; echo "=== BEHIND-END ==="
echo "=== DMESG-BEGIN ==="; dmesg | grep -iE "pci 0000:00:1e|bus 01|busn|bridge|reassign|can't|conflict|root bus resource|no space|failed to assign"; echo "=== DMESG-END ===""#,
                ),
            ),
        ]);
        run_host_scenario(&script).unwrap_or_else(|e| panic!("test ground: {e}"))
    })
}

fn boot_section(label: &str, name: &str) -> String {
    let out = linux();
    assert!(
        out.stdout
            .contains(&format!("=== BOOT-{label}-END rc=0 ===")),
        "vmm did not exit 0 for {label}:\n{}",
        out.stdout
    );
    let boot = section(&out.stdout, &format!("BOOT-{label}")).expect("boot section");
    section(&boot, name).unwrap_or_else(|| panic!("no {name} in boot {label}:\n{boot}"))
}

/// The non-empty lines of `text`, trimmed.
fn trimmed_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn linux_lspci_lists_exactly_the_requested_addresses() {
    let n = boot_section("RNG", "LSPCI-N");
    let got = trimmed_lines(&n);
    assert_eq!(
        got,
        [
            "00:00.0 0600: 1b36:0008",
            "00:01.0 00ff: 1af4:1044 (rev 01)",
            "00:05.0 00ff: 1af4:1044 (rev 01)",
            "00:1f.0 00ff: 1af4:1044 (rev 01)",
        ]
    );
}

#[test]
fn linux_without_config_ports_uses_ecam_alone_and_sees_the_same_lspci() {
    let with_ports = boot_section("RNG", "CONFIG");
    let without = boot_section("ECAM", "CONFIG");
    assert!(
        with_ports.contains("PCI: Using configuration type 1 for base access"),
        "{with_ports}"
    );
    assert!(
        !without.contains("configuration type"),
        "no type-1 access without the ports:\n{without}"
    );
    for text in [&with_ports, &without] {
        assert!(text.contains("MMCONFIG for domain 0000"), "{text}");
    }
    // Linux's early MMCONFIG set-up needs type 1 to check the window against e820, so it says
    // so (at KERN_ERR, as on QEMU's microvm) and takes the MCFG later, from ACPI.
    assert!(
        without.contains("PCI: Fatal: No config space access function found")
            && !with_ports.contains("No config space access"),
        "{with_ports}\n{without}"
    );
    // The host bridge's _CRS in the guest's own DSDT: the I/O descriptor of 0xcf8-0xcff.
    assert!(with_ports.contains("DSDT claims CF8"), "{with_ports}");
    assert!(without.contains("DSDT leaves CF8"), "{without}");
    assert_eq!(
        boot_section("ECAM", "LSPCI-VV"),
        boot_section("RNG", "LSPCI-VV"),
        "the guest's lspci -vv differs without the config ports"
    );
    let rng = boot_section("ECAM", "HWRNG");
    assert_eq!(rng.trim().len(), 64, "32 bytes from virtio-rng: {rng}");
}

#[test]
fn linux_binds_virtio_rng_and_reads_entropy_over_msix() {
    let drivers = boot_section("RNG", "DRIVERS");
    for a in [
        "0000:00:01.0 virtio-pci",
        "0000:00:05.0 virtio-pci",
        "0000:00:1f.0 virtio-pci",
    ] {
        assert!(drivers.contains(a), "{a} not bound:\n{drivers}");
    }
    assert!(
        drivers.contains("virtio0"),
        "virtio_rng bound to no device:\n{drivers}"
    );
    let vv = boot_section("RNG", "LSPCI-VV");
    assert_eq!(vv.matches("MSI-X: Enable+ Count=2").count(), 3, "{vv}");
    // The virtio BAR (64-bit) in the 64-bit window above 4 GiB, where the vmm put it (2 MiB per
    // devfn from 0x4000000000), kept by Linux; the drivers above work through it.
    for (addr, bar) in [
        ("00:01.0", "4001000000"),
        ("00:05.0", "4005000000"),
        ("00:1f.0", "401f000000"),
    ] {
        let dev = vv
            .split("\n\n")
            .find(|d| d.starts_with(addr))
            .unwrap_or_else(|| panic!("no {addr} in:\n{vv}"));
        assert!(
            dev.contains(&format!(
                "Region 4: Memory at {bar} (64-bit, prefetchable) [size=16K]"
            )),
            "{addr}: {dev}"
        );
    }
    let hw = boot_section("RNG", "HWRNG");
    assert!(hw.contains("virtio_rng"), "{hw}");
    let hex = hw.lines().last().unwrap_or_default().trim().to_string();
    assert_eq!(hex.len(), 64, "32 bytes from /dev/hwrng: {hw}");
    assert_ne!(hex, "0".repeat(64), "entropy is not all zero");
}

#[test]
fn linux_keeps_the_bridge_bus_numbers_and_binds_devices_behind_it() {
    let n = boot_section("BRIDGE", "LSPCI-N");
    let got = trimmed_lines(&n);
    assert_eq!(
        got,
        [
            "00:00.0 0600: 1b36:0008",
            "00:05.0 00ff: 1af4:1044 (rev 01)",
            "00:1e.0 0604: 1b36:0001",
            "01:01.0 00ff: 1af4:1044 (rev 01)",
            "01:02.0 00ff: 1af4:1044 (rev 01)",
        ]
    );
    let drivers = boot_section("BRIDGE", "DRIVERS");
    for a in [
        "0000:00:05.0 virtio-pci",
        "0000:01:01.0 virtio-pci",
        "0000:01:02.0 virtio-pci",
    ] {
        assert!(drivers.contains(a), "{a} not bound:\n{drivers}");
    }
    let br = boot_section("BRIDGE", "BRIDGE");
    // Linux kept what the vmm programmed (bus numbers and the memory window).
    assert!(
        br.contains("Bus: primary=00, secondary=01, subordinate=01"),
        "{br}"
    );
    assert!(
        br.contains("Memory behind bridge: c4000000-c47fffff"),
        "{br}"
    );
    // The prefetchable window: bus 1's part of the 64-bit window, with 01:01.0's 64-bit BAR.
    // (lspci 3.9 prints the kernel's view of a bridge window from sysfs and calls it
    // "[32-bit]"; the registers say 64-bit: bits 3:0 of both halves read 1, upper halves 0x40.)
    assert!(
        br.contains("Prefetchable memory behind bridge: 4020000000-403fffffff [size=512M]"),
        "{br}"
    );
    assert!(
        br.contains("20: 00 c4 70 c4 01 20 f1 3f 40 00 00 00 40 00 00 00"),
        "{br}"
    );
    let behind = boot_section("BRIDGE", "BEHIND");
    assert!(
        behind.contains("Region 4: Memory at 4021000000 (64-bit, prefetchable) [size=16K]"),
        "{behind}"
    );
    assert!(
        behind.contains("Kernel driver in use: virtio-pci"),
        "{behind}"
    );
    let dmesg = boot_section("BRIDGE", "DMESG");
    assert!(
        dmesg.contains("root bus resource [mem 0x4000000000-0x5fffffffff window]")
            && dmesg.contains("bridge window [mem 0x4020000000-0x403fffffff 64bit pref]"),
        "{dmesg}"
    );
    for bad in ["no space", "failed to assign", "reassign", "can't claim"] {
        assert!(!dmesg.contains(bad), "{bad}: {dmesg}");
    }
}

#[test]
fn linux_sees_a_multifunction_slot() {
    let out = linux();
    let boot = section(&out.stdout, "BOOT-MF").expect("boot MF");
    let scen = section(&boot, "SCENARIO").unwrap_or_else(|| panic!("{boot}"));
    assert!(scen.contains("00:06.0 00ff: 1af4:1044"), "{scen}");
    assert!(scen.contains("00:06.1 00ff: 1af4:1044"), "{scen}");
}

#[test]
fn linux_gets_level_triggered_intx_without_msix() {
    let out = linux();
    assert!(
        out.stdout.contains("=== BOOT-INTX-END rc=0 ==="),
        "{}",
        out.stdout
    );
    let boot = section(&out.stdout, "BOOT-INTX").expect("boot INTX");
    let scen = section(&boot, "SCENARIO").unwrap_or_else(|| panic!("{boot}"));
    let hex = scen.lines().next().unwrap_or_default().trim().to_string();
    assert_eq!(hex.len(), 64, "32 bytes from /dev/hwrng over INTx: {scen}");
    let line = scen
        .lines()
        .find(|l| l.contains("virtio0"))
        .unwrap_or_else(|| panic!("no virtio interrupt line: {scen}"));
    assert!(
        line.contains("IO-APIC") && line.contains("fasteoi"),
        "{line}"
    );
    let count: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    assert!(count > 0, "INTx interrupts were delivered: {line}");
}

/// The record and machine file carry bridges and buses: a device without `bus=` keeps its
/// recorded place behind a bridge, a dump restarts the same machine, `abi diff` reports a moved
/// bridge, `query-pci`-style nesting aside (unit-tested in the monitor).
#[test]
fn records_keep_bus_slot_function_and_abi_diff_reports_a_moved_bridge() {
    let dir = integration_tests::scratch_dir("bridges");
    let elf = integration_tests::probe::probe_elf();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let run = |devices: &[&str], extra: &[&str]| {
        let mut args = vec![
            "run".to_string(),
            "--no-reboot".into(),
            "--kernel".into(),
            elf.to_str().unwrap().into(),
            "--append".into(),
            "mode=hello".into(),
        ];
        for d in devices {
            args.push("--device".into());
            args.push(d.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = vmm(&args, 60);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let first = [
        "virtio-rng-pci,id=rng0,addr=05.0",
        "pci-bridge,id=br1,chassis_nr=1,addr=1e.0",
        "virtio-rng-pci,id=a,bus=br1,addr=1.0",
        "pci-bridge,id=br2,chassis_nr=2,bus=br1,addr=3",
        "virtio-rng-pci,id=b,bus=br2",
    ];
    run(
        &first,
        &["--compat", &p("rec.json"), "--dump-machine", &p("m.json")],
    );
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("rec.json")).unwrap()).unwrap();
    assert_eq!(rec["devices"]["b"]["addr"], "02:00.0");
    assert_eq!(rec["devices"]["b"]["bus"], "br2");
    assert_eq!(rec["devices"]["rng0"].get("bus"), None, "root bus unsaid");
    assert_eq!(
        rec["devices"]["br2"]["fingerprint"]["props"]["secondary_bus"],
        "2"
    );
    std::fs::copy(p("rec.json"), p("old.json")).unwrap();
    // b without bus=: the record puts it back at 02:00.0; br1 moves to 1d.0.
    let moved = [
        "virtio-rng-pci,id=rng0,addr=05.0",
        "pci-bridge,id=br1,chassis_nr=1,addr=1d.0",
        "virtio-rng-pci,id=a,bus=br1,addr=1.0",
        "pci-bridge,id=br2,chassis_nr=2,bus=br1,addr=3",
        "virtio-rng-pci,id=b",
    ];
    run(&moved, &["--compat", &p("rec.json")]);
    let out = vmm(&["abi", "diff", &p("old.json"), &p("rec.json")], 10);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "moved   br1: 00:1e.0 -> 00:1d.0"
    );
    // The dumped description restarts the first machine exactly.
    run(
        &[],
        &["--machine-file", &p("m.json"), "--compat", &p("m.rec")],
    );
    let out = vmm(&["abi", "diff", &p("old.json"), &p("m.rec")], 10);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The largest machine of `resources/bench/scale.sh`: pci-bridges at 00:1c.0-00:1f.0 (buses
/// 1-4) with 248 virtio-rng-pci functions behind each (slots 01-1f, 8 functions each) and 8 at
/// 00:01.0-01.7: 1,000 devices, 1,005 functions with the host bridge and the bridges.
fn thousand_functions() -> Vec<String> {
    let mut args = Vec::new();
    let mut dev = |d: String| {
        args.push("--device".to_string());
        args.push(d);
    };
    for b in 1..=4 {
        dev(format!(
            "pci-bridge,id=br{b},chassis_nr={b},addr={:02x}.0",
            0x1b + b
        ));
    }
    let bus = |b: u32| {
        if b == 0 {
            String::new()
        } else {
            format!(",bus=br{b}")
        }
    };
    for (b, n) in [(0, 8), (1, 248), (2, 248), (3, 248), (4, 248)] {
        for i in 0..n {
            let (slot, f) = (1 + i / 8, i % 8);
            let mf = if f == 0 { ",multifunction=on" } else { "" };
            dev(format!(
                "virtio-rng-pci,id=r{b}_{i}{},addr={slot:02x}.{f}{mf}",
                bus(b)
            ));
        }
    }
    args
}

/// Runs the probe's `mode=enum` with `append` on [`thousand_functions`] (vmm warnings on
/// stderr) and returns its `=== ENUM ... done ... ===` line and stderr.
fn enum_thousand(append: &str) -> (String, String) {
    integration_tests::probe::require_kvm();
    let elf = integration_tests::probe::probe_elf();
    let vmm = integration_tests::ground::vmm_binary().unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new("timeout")
        .arg("300")
        .arg(&vmm)
        .args(["run", "--no-reboot", "--memory", "64", "--kernel"])
        .arg(&elf)
        .args(["--append", append])
        .args(thousand_functions())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success() && stdout.contains("=== PROBE-DONE ==="),
        "{append}: vmm {} :\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let done = stdout
        .lines()
        .find(|l| l.starts_with("=== ENUM op=") && l.contains(" done "))
        .unwrap_or_else(|| panic!("{append}: no ENUM done line:\n{stdout}"))
        .to_string();
    (done, stderr)
}

/// Issue 13, scale: 1,000 functions behind bridges start, and the probe's full enumeration
/// (every function's 256 bytes, the bridges renumbered depth first with the numbers the vmm
/// gave them) finds all of them through CF8 and through ECAM, with the same bytes. With every
/// endpoint's memory decoding on (as drivers do), each of the 1,000 virtio notify areas gets
/// its ioeventfd: KVM counts ioeventfds apart from its 1,000-device limit per bus (a failed
/// registration would fall back to exits with a warning, which this asserts there is none of).
#[test]
fn a_thousand_functions_behind_bridges_enumerate_and_get_their_ioeventfds() {
    let (cf8, _) = enum_thousand("mode=enum op=cf8 ring=3");
    let (ecam, stderr) = enum_thousand("mode=enum op=ecam ring=3 decode=1");
    let fields = |l: &str| -> Vec<String> {
        l.split_whitespace()
            .filter(|w| w.split_once('=').is_some_and(|(k, _)| !k.is_empty()))
            .map(str::to_string)
            .collect()
    };
    let (c, e) = (fields(&cf8), fields(&ecam));
    assert_eq!(
        c[..4],
        ["op=cf8", "functions=1005", "bridges=4", "buses=5"],
        "{cf8}"
    );
    assert!(c[4].starts_with("sum=0x"), "{cf8}");
    assert_eq!(
        c[1..5],
        e[1..5],
        "CF8 and ECAM enumerations differ:\n{cf8}\n{ecam}"
    );
    assert_eq!(
        e.get(5).map(String::as_str),
        Some("decoding=1001"),
        "{ecam}"
    );
    assert!(
        !stderr.contains("ioeventfd") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// What QEMU 7.2 answers in the probe's `mode=extcfg` for every function (after its address and
/// IDs): checked with `-M microvm,pcie=on` and `-M q35`, with virtio-rng/blk/net-pci on bus 0 and
/// virtio-rng-pci behind two levels of `pci-bridge`, the host bridges (gpex-root, q35's mch)
/// and the bridges themselves: all conventional PCI functions (config size 256), so
/// `pcie_mmcfg_data_read` answers all-ones at every width and `_write` drops the writes.
const QEMU_EXTCFG: &str = "d100=ffffffff d104=ffffffff dffc=ffffffff w100=ffff w102=ffff \
wffe=ffff b100=ff b103=ff bfff=ff after d100=ffffffff w104=ffff bfff=ff header same";
/// What a machine recorded before the property existed keeps answering.
const OLD_EXTCFG: &str = "d100=00000000 d104=00000000 dffc=00000000 w100=0000 w102=0000 \
wffe=0000 b100=00 b103=00 bfff=00 after d100=00000000 w104=0000 bfff=00 header same";

/// The probe's `extcfg:` lines as (address, answers after the IDs); checks the end marker.
fn extcfg_lines(out: &str) -> Vec<(String, String)> {
    assert!(
        out.contains(&"=== EXTCFG done functions=6 ===".to_string()),
        "{out}"
    );
    out.lines()
        .filter_map(|l| l.trim_end().strip_prefix("extcfg: "))
        .map(|l| {
            let mut it = l.splitn(3, ' ');
            let addr = it.next().unwrap_or_default().to_string();
            let _ids = it.next();
            (addr, it.next().unwrap_or_default().to_string())
        })
        .collect()
}

const BRIDGED_ADDRS: [&str; 6] = [
    "00:00.0", "00:05.0", "00:1e.0", "01:01.0", "01:03.0", "02:04.0",
];

#[test]
fn extended_config_space_reads_what_qemu_returns() {
    let out = run_probe("mode=extcfg", BRIDGED);
    let lines = extcfg_lines(&out);
    let addrs: Vec<&str> = lines.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(addrs, BRIDGED_ADDRS, "{out}");
    for (addr, answers) in &lines {
        assert_eq!(answers, QEMU_EXTCFG, "{addr}");
    }
}

/// A machine whose compat record predates the property keeps reading zeros there (and says so
/// in its record and description from then on); `--compat-strict` refuses to change it and
/// `abi diff` reports it.
#[test]
fn an_old_record_keeps_a_zero_extended_config_space() {
    let dir = integration_tests::scratch_dir("extcfg");
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    // A record as the build before the property wrote it: no extended_config.
    let old = r#"{"format":"vmm-pci-compat","version":1,"machine":{"host_bridge_vendor":6966,"host_bridge_device":8,"ecam_base":3758096384,"mmio32_window":[3221225472,536870912],"pci_hotplug":true},"devices":{}}"#;
    std::fs::write(p("rec.json"), old).unwrap();
    fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut v: Vec<&str> = BRIDGED.to_vec();
        v.extend_from_slice(extra);
        v
    }
    let out = run_probe(
        "mode=extcfg",
        &with(&["--compat", &p("rec.json"), "--dump-machine", &p("m.json")]),
    );
    let lines = extcfg_lines(&out);
    let addrs: Vec<&str> = lines.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(addrs, BRIDGED_ADDRS, "{out}");
    for (addr, answers) in &lines {
        assert_eq!(answers, OLD_EXTCFG, "{addr}");
    }
    let json = |n: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p(n)).unwrap()).unwrap()
    };
    assert_eq!(json("rec.json")["machine"]["extended_config"], "zero");
    assert_eq!(json("m.json")["extended_config"], "zero");
    let show = vmm(&["abi", "show", &p("rec.json")], 10);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains("machine: pci_hotplug on, extended_config zero, mmio64_window none"),
        "{show}"
    );
    // The whole extended space, through the ECAM dump, on the next start from that record.
    let out = run_probe("mode=probe", &with(&["--compat", &p("rec.json")]));
    let ecam = parse_dump(&dumps(&out).1);
    assert_eq!(ecam.len(), 6);
    for f in &ecam {
        assert!(
            f.bytes[256..].iter().all(|&b| b == 0),
            "{}: extended space of an old machine",
            f.addr
        );
    }
    // A new machine (no record) with the same devices reads all-ones; its record says so.
    run_probe("mode=hello", &with(&["--compat", &p("new.json")]));
    assert_eq!(json("new.json")["machine"]["extended_config"], "all-ones");
    let out = vmm(&["abi", "diff", &p("rec.json"), &p("new.json")], 10);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "machine: extended_config: zero -> all-ones\nmachine: mmio64_window: none -> [274877906944, 137438953472]\n\
         machine: pci_hotplug_bridges: false -> true",
        "the old record is from before these properties"
    );
    // Asking the old machine for QEMU's behaviour is an ABI change: --compat-strict refuses.
    std::fs::write(
        p("ones.json"),
        r#"{"format":"vmm-machine","version":2,"extended_config":"all-ones"}"#,
    )
    .unwrap();
    let before = std::fs::read(p("rec.json")).unwrap();
    let strict = [
        "--machine-file",
        &p("ones.json"),
        "--compat",
        &p("rec.json"),
        "--compat-strict",
    ];
    let err = refused_probe_run(&with(&strict));
    assert!(
        err.contains("--compat-strict")
            && err.contains("machine: extended_config: zero -> all-ones"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(p("rec.json")).unwrap(),
        before,
        "record untouched"
    );
    // Without --compat-strict the machine file wins, and the record follows it.
    let out = run_probe(
        "mode=extcfg",
        &with(&[
            "--machine-file",
            &p("ones.json"),
            "--compat",
            &p("rec.json"),
        ]),
    );
    for (addr, answers) in &extcfg_lines(&out) {
        assert_eq!(answers, QEMU_EXTCFG, "{addr}");
    }
    assert_eq!(json("rec.json")["machine"]["extended_config"], "all-ones");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The 64-bit window: a new machine puts 64-bit BARs above 4 GiB (a function of the address:
/// 0x4000000000 + bus * 512 MiB + devfn * 2 MiB) and gives bridges a prefetchable window over
/// their buses' parts; a machine recorded before the property (or a machine file with
/// `"mmio64_window": false`) keeps every BAR in the 32-bit window and the prefetchable windows
/// disabled; `abi diff` reports the change; RAM that would reach the window is refused.
#[test]
fn an_old_record_keeps_64_bit_bars_below_4_gib() {
    let dir = integration_tests::scratch_dir("mmio64");
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    // A record as the build before the property wrote it: no mmio64_window.
    let old = r#"{"format":"vmm-pci-compat","version":1,"machine":{"host_bridge_vendor":6966,"host_bridge_device":8,"ecam_base":3758096384,"mmio32_window":[3221225472,536870912],"pci_hotplug":true,"extended_config":"all-ones"},"devices":{}}"#;
    std::fs::write(p("rec.json"), old).unwrap();
    std::fs::write(
        p("off.json"),
        r#"{"format":"vmm-machine","version":2,"mmio64_window":false}"#,
    )
    .unwrap();
    fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut v: Vec<&str> = BRIDGED.to_vec();
        v.extend_from_slice(extra);
        v
    }
    let decode = |out: &str, at: &str| lspci_decode(&dumps(out).1, &["-vvv", "-s", at]);
    let old_runs = [
        run_probe("mode=probe", &with(&["--compat", &p("rec.json")])),
        run_probe("mode=probe", &with(&["--machine-file", &p("off.json")])),
    ];
    for out in &old_runs {
        let a = decode(out, "01:01.0");
        assert!(
            a.contains("Region 4: Memory at c4044000 (64-bit, prefetchable)"),
            "{a}"
        );
        let r = decode(out, "00:05.0");
        assert!(
            r.contains("Region 4: Memory at c0a04000 (64-bit, prefetchable)"),
            "{r}"
        );
        let br = decode(out, "00:1e.0");
        assert!(
            br.contains(
                "Prefetchable memory behind bridge: 00000000fff00000-00000000000fffff [disabled]"
            ),
            "{br}"
        );
    }
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("rec.json")).unwrap()).unwrap();
    assert_eq!(rec["machine"]["mmio64_window"], serde_json::Value::Null);
    // The same devices on a new machine.
    let out = run_probe("mode=probe", &with(&["--compat", &p("new.json")]));
    let r = decode(&out, "00:05.0");
    assert!(
        r.contains("Region 1: Memory at c0a00000 (32-bit, non-prefetchable)")
            && r.contains("Region 4: Memory at 4005000000 (64-bit, prefetchable)"),
        "{r}"
    );
    let b = decode(&out, "02:04.0");
    assert!(
        b.contains("Region 4: Memory at 4044000000 (64-bit, prefetchable)"),
        "{b}"
    );
    let out = vmm(&["abi", "diff", &p("rec.json"), &p("new.json")], 10);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "machine: mmio64_window: none -> [274877906944, 137438953472]\n\
         machine: pci_hotplug_bridges: false -> true",
        "the old record is from before these properties"
    );
    // RAM above 4 GiB ends where the window starts: 255 GiB at most with it.
    let elf = integration_tests::probe::probe_elf();
    let out = vmm(
        &[
            "run",
            "--no-reboot",
            "--kernel",
            elf.to_str().unwrap(),
            "--memory",
            "261121",
        ],
        30,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("invalid memory size 261121 MiB: at most 261120 MiB on a machine with the 64-bit PCI window"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The full machine of issue 13's Linux test: bus 0 filled (slots 1-31: a multifunction slot
/// 02.0/02.1, two virtio-blk, a virtio-net, virtio-rng elsewhere, the bridge at 1e.0) and two
/// devices behind the bridge at 01:01.0 and 01:02.0. Explicit addresses; `$TMPDIR` is L1's.
fn full_bus0_devices() -> Vec<String> {
    let mut d = vec![
        "virtio-blk-pci,id=blk1,addr=01.0,file=$TMPDIR/b1.img".to_string(),
        "virtio-rng-pci,id=mf0,addr=02.0,multifunction=on".into(),
        "virtio-rng-pci,id=mf1,addr=02.1".into(),
        "virtio-net-pci,id=net0,addr=03.0,tap=vmmtap0".into(),
        "virtio-blk-pci,id=blk4,addr=04.0,file=$TMPDIR/b4.img".into(),
    ];
    d.extend((5..=0x1d).map(|s| format!("virtio-rng-pci,id=r{s:02x},addr={s:02x}.0")));
    d.push("virtio-rng-pci,id=r1f,addr=1f.0".into());
    d.push("pci-bridge,id=br1,chassis_nr=1,addr=1e.0".into());
    d.push("virtio-rng-pci,id=a,bus=br1,addr=01.0".into());
    d.push("virtio-blk-pci,id=b,bus=br1,addr=02.0,file=$TMPDIR/b.img".into());
    d
}

/// `--device` arguments (shell text).
fn device_args(devices: &[String]) -> String {
    devices
        .iter()
        .map(|d| format!("--device {d}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Splits `lspci -vvv` into its functions' blocks by address.
fn lspci_blocks(vvv: &str) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for block in vvv.split("\n\n") {
        let block = block.trim_matches('\n');
        if let Some(addr) = block.split_whitespace().next() {
            out.insert(addr.to_string(), block.to_string());
        }
    }
    out
}

/// Issue 13, real Linux: a pci-bridge at 00:1e.0 with devices at 01:01.0 and 01:02.0, and bus 0
/// full (31 slots, one of them multifunction). A: every function at its address with its
/// driver bound; B: restarted with the record (devices in reverse order, no `addr=`/`bus=`/
/// `multifunction=`: the record puts them back), a byte-identical `lspci -vvv`; C: B without
/// 01:01.0, every other function's `lspci -vvv` block unchanged.
#[test]
fn linux_full_bus0_and_a_bridge_keep_their_lspci_across_restarts() {
    let full = full_bus0_devices();
    let mut bare: Vec<String> = full
        .iter()
        .map(|d| {
            d.split(',')
                .filter(|p| {
                    !p.starts_with("addr=") && !p.starts_with("bus=") && *p != "multifunction=on"
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    bare.reverse();
    let without_a: Vec<String> = bare
        .iter()
        .filter(|d| !d.contains(",id=a"))
        .cloned()
        .collect();
    assert_eq!(without_a.len() + 1, bare.len());
    let guest = r#"echo "=== LSPCI-N-BEGIN ==="; lspci -n; echo "=== LSPCI-N-END ==="
echo "=== DRIVERS-BEGIN ==="
for d in /sys/bus/pci/devices/*; do echo "pci $(basename $d) $(basename "$(readlink $d/driver)")"; done
for d in /sys/bus/virtio/devices/*; do p=$(readlink -f $d); p=${p%/*}; echo "virtio ${p##*/} $(basename "$(readlink $d/driver)")"; done
echo "=== DRIVERS-END ==="
echo "=== VVV-BEGIN ==="; lspci -vvv; echo "=== VVV-END ===""#;
    let rec = "--compat \"$TMPDIR/rec.json\"";
    let setup =
        "for f in b1 b4 b; do dd if=/dev/zero of=$TMPDIR/$f.img bs=1M count=1 2>/dev/null; done\n\
                 rm -f $TMPDIR/rec.json\n"
            .to_string();
    let script = host_script(&[
        setup,
        guest_boot("A", &format!("{} {rec}", device_args(&full)), Some(guest)),
        guest_boot("B", &format!("{} {rec}", device_args(&bare)), Some(guest)),
        guest_boot(
            "C",
            &format!("{} {rec}", device_args(&without_a)),
            Some(guest),
        ),
    ]);
    let out = run_host_scenario(&script).unwrap_or_else(|e| panic!("test ground: {e}"));
    let part = |label: &str, name: &str| {
        assert!(
            out.stdout
                .contains(&format!("=== BOOT-{label}-END rc=0 ===")),
            "vmm did not exit 0 for {label}:\n{}",
            out.stdout
        );
        let boot = section(&out.stdout, &format!("BOOT-{label}")).expect("boot section");
        section(&boot, name).unwrap_or_else(|| panic!("no {name} in boot {label}:\n{boot}"))
    };
    // A: every function at its address, with its identity.
    let n = part("A", "LSPCI-N");
    let got: Vec<&str> = n.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut want = vec!["00:00.0 0600: 1b36:0008".to_string()];
    let rng = "00ff: 1af4:1044 (rev 01)";
    let blk = "0100: 1af4:1042 (rev 01)";
    let net = "0200: 1af4:1041 (rev 01)";
    want.push(format!("00:01.0 {blk}"));
    want.push(format!("00:02.0 {rng}"));
    want.push(format!("00:02.1 {rng}"));
    want.push(format!("00:03.0 {net}"));
    want.push(format!("00:04.0 {blk}"));
    want.extend((5..=0x1d).map(|s| format!("00:{s:02x}.0 {rng}")));
    want.push("00:1e.0 0604: 1b36:0001".into());
    want.push(format!("00:1f.0 {rng}"));
    want.push(format!("01:01.0 {rng}"));
    want.push(format!("01:02.0 {blk}"));
    assert_eq!(got, want, "lspci -n:\n{n}");
    assert_eq!(got.iter().filter(|l| l.starts_with("00:")).count(), 33);
    // Drivers: virtio-pci on every virtio function, and the virtio driver of its kind.
    let drivers = part("A", "DRIVERS");
    for line in &want[1..] {
        let addr = &line[..7];
        if addr == "00:1e.0" {
            continue;
        }
        let pci = format!("pci 0000:{addr} virtio-pci");
        assert!(drivers.contains(&pci), "{pci} not bound:\n{drivers}");
        let kind = if line.ends_with(blk) {
            "virtio_blk"
        } else if line.ends_with(net) {
            "virtio_net"
        } else {
            "virtio_rng"
        };
        let virtio = format!("virtio 0000:{addr} {kind}");
        assert!(drivers.contains(&virtio), "{virtio} not bound:\n{drivers}");
    }
    // B: the same lspci -vvv, byte for byte, the bridge's bus numbers and window as programmed.
    let (a, b) = (part("A", "VVV"), part("B", "VVV"));
    assert!(
        a.contains("Bus: primary=00, secondary=01, subordinate=01"),
        "{a}"
    );
    assert!(a.contains("Memory behind bridge: c4000000-c47fffff"), "{a}");
    assert_eq!(a, b, "lspci -vvv changed across a restart with the record");
    // C: 01:01.0 gone, nothing else moved or changed.
    let (mut before, after) = (lspci_blocks(&a), lspci_blocks(&part("C", "VVV")));
    assert_eq!(before.len(), 35, "{a}");
    assert!(before.remove("01:01.0").is_some());
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (addr, block) in &before {
        assert_eq!(Some(block), after.get(addr), "{addr} changed");
    }
}
