//! Virtio lifecycle under `--seccomp kill` on the local KVM: the probe's `mode=lifecycle` brings
//! every virtio function up (reset, features, queue 0, DRIVER_OK, a kick), resets it (polling
//! the status until it reads 0), brings it up again and resets it again.
//!
//! Activation starts a worker thread and a reset joins it; the vCPU filter allows neither
//! `clone` nor `open`, so this only survives if that work runs on the device-work executor.
//! Every device class takes part: virtio-rng (MSI-X and, with `vectors=0`, INTx), virtio-blk
//! over a file, virtio-console with `path=`, virtio-net over a tap the vmm creates (the tests
//! run as root; a tap that cannot be created fails the test, saying why).

use integration_tests::probe::{probe_elf, require_kvm, require_tun, vmm};

#[test]
fn every_device_class_survives_activate_reset_reactivate_under_seccomp_kill() {
    require_kvm();
    require_tun();
    let pid = std::process::id();
    let dir = std::env::temp_dir();
    let img = dir.join(format!("lifecycle-{pid}.img"));
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk image");
    let console = dir.join(format!("lifecycle-{pid}.console"));
    let tap = format!("vmmlc{}", pid % 1_000_000);
    let devices = [
        "virtio-rng-pci,id=rng0,addr=3".to_string(),
        format!("virtio-blk-pci,id=blk0,file={},addr=4", img.display()),
        format!(
            "virtio-console-pci,id=con0,path={},addr=5",
            console.display()
        ),
        format!("virtio-net-pci,id=net0,tap={tap},addr=6"),
        "virtio-rng-pci,id=rng1,vectors=0,addr=7".into(),
    ];
    let elf = probe_elf();
    let mut args: Vec<&str> = vec![
        "run",
        "--no-reboot",
        "--kernel",
        elf.to_str().expect("utf-8 path"),
        "--append",
        "mode=lifecycle",
        "--seccomp",
        "kill",
    ];
    for d in &devices {
        args.extend(["--device", d.as_str()]);
    }
    let out = vmm(&args, 120);
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_file(&console);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !stderr.contains("/dev/net/tun"),
        "the vmm could not create tap {tap} (run as root with /dev/net/tun):\n{stderr}"
    );
    assert!(
        out.status.success(),
        "vmm failed ({}; SIGSYS is a syscall the seccomp filters refused):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "the vmm panicked:\n{stderr}");
    for (addr, id, irq, what) in [
        ("00:03.0", "1af4:1044", "msi-x", "served"),
        ("00:04.0", "1af4:1042", "intx", "served"),
        ("00:05.0", "1af4:1043", "msi-x", "kicked"),
        ("00:06.0", "1af4:1041", "intx", "kicked"),
        ("00:07.0", "1af4:1044", "intx", "served"),
    ] {
        let line = format!("lifecycle: {addr} {id} {irq} up {what} reset up {what} reset ok");
        assert!(
            stdout.lines().any(|l| l == line),
            "no `{line}` in the guest's output:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    assert!(
        stdout.contains("=== LIFECYCLE done functions=5 ok=5 ==="),
        "the guest did not finish every function:\n{stdout}"
    );
    assert!(
        stdout.contains("=== PROBE-DONE ==="),
        "the probe did not finish:\n{stdout}"
    );
    assert!(
        !std::path::Path::new("/sys/class/net").join(&tap).exists(),
        "the vmm's tap {tap} outlived it"
    );
}
