//! Issue "Foundation": the monitor boots our probe guest on the local KVM and a Debian Linux
//! guest on the test ground; bad input gets a clear error and a non-zero status.

use integration_tests::ground::{
    guest_boot_with, host_script, run_host_scenario, section, DEFAULT_APPEND,
};
use integration_tests::probe::{probe_elf, run_probe, vmm};

#[test]
fn probe_guest_says_hello_and_resets() {
    let out = run_probe("mode=hello", &[]);
    assert!(out.contains("Hello from the probe guest"), "{out}");
}

fn stderr_of(args: &[&str]) -> (Option<i32>, String) {
    let out = vmm(args, 30);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let (code, err) = stderr_of(&["run", "--no-reboot", "--kernel", "/nonexistent/vmlinuz"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("cannot load kernel '/nonexistent/vmlinuz': No such file or directory"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn unreadable_kernel_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("vmm-boot-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (code, err) = stderr_of(&["run", "--no-reboot", "--kernel", dir.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot load kernel"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_file_that_is_no_kernel_is_refused() {
    let (code, err) = stderr_of(&["run", "--no-reboot", "--kernel", "/etc/hostname"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not an ELF or bzImage kernel"), "{err}");
}

#[test]
fn initrd_larger_than_memory_is_refused() {
    let big = std::env::temp_dir().join(format!("vmm-big-initrd-{}", std::process::id()));
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(40 << 20).unwrap();
    let elf = probe_elf();
    let (code, err) = stderr_of(&[
        "run",
        "--no-reboot",
        "--kernel",
        elf.to_str().unwrap(),
        "--initrd",
        big.to_str().unwrap(),
        "--memory",
        "32",
    ]);
    let _ = std::fs::remove_file(&big);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("does not fit in 33554432 bytes of guest memory"),
        "{err}"
    );
}

#[test]
fn missing_initrd_and_zero_memory_are_refused() {
    let elf = probe_elf();
    let elf = elf.to_str().unwrap();
    let (code, err) = stderr_of(&[
        "run",
        "--no-reboot",
        "--kernel",
        elf,
        "--initrd",
        "/nonexistent",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot load initrd '/nonexistent'"), "{err}");
    let (code, err) = stderr_of(&["run", "--no-reboot", "--kernel", elf, "--memory", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid memory size 0 MiB"), "{err}");
    let (code, err) = stderr_of(&["run", "--no-reboot", "--kernel", elf, "--cpus", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid number of CPUs 0"), "{err}");
}

/// Real Linux under a real KVM: two boots in one KVM-host image (1 and 2 vCPUs).
#[test]
fn debian_linux_boots_to_its_init_with_one_and_two_cpus() {
    let guest =
        "echo \"uname: $(uname -r)\"; echo \"processors: $(grep -c ^processor /proc/cpuinfo)\"\n\
        echo \"rtc: $(cat /sys/class/rtc/rtc0/name) $(cat /sys/class/rtc/rtc0/date)\"";
    let script = host_script(&[
        "echo \"L1-DATE $(date -u +%F)\"\n".to_string(),
        guest_boot_with("ONE", DEFAULT_APPEND, 256, "--cpus 1", Some(guest)),
        guest_boot_with("TWO", DEFAULT_APPEND, 256, "--cpus 2", Some(guest)),
    ]);
    let out = run_host_scenario(&script).unwrap_or_else(|e| panic!("test ground: {e}"));
    for (label, cpus) in [("ONE", 1), ("TWO", 2)] {
        let boot = section(&out.stdout, &format!("BOOT-{label}"))
            .unwrap_or_else(|| panic!("no BOOT-{label} section:\n{}", out.stdout));
        assert!(
            boot.contains(&format!("BOOT-{label}-END rc=0"))
                || out
                    .stdout
                    .contains(&format!("=== BOOT-{label}-END rc=0 ===")),
            "vmm did not exit 0 for {label}:\n{boot}"
        );
        assert!(boot.contains("=== GUEST-READY ==="), "{boot}");
        let scen =
            section(&boot, "SCENARIO").unwrap_or_else(|| panic!("no scenario output:\n{boot}"));
        assert!(scen.contains("uname: 6."), "{scen}");
        assert!(scen.contains("-cloud-amd64"), "{scen}");
        assert!(scen.contains(&format!("processors: {cpus}")), "{scen}");
        // The CMOS clock is Linux's rtc0 (an ACPI PNP0B00 device) and tells the host's date.
        let l1_date = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("L1-DATE "))
            .unwrap_or_else(|| panic!("no L1-DATE:\n{}", out.stdout));
        assert!(
            scen.lines()
                .any(|l| l.starts_with("rtc: rtc_cmos ") && l.ends_with(l1_date.trim())),
            "{scen}"
        );
    }
}

/// A minimal ELF64 with a Xen PVH note whose entry (in 32-bit protected mode at 1 MiB) runs
/// `code`.
fn tiny_pvh_elf(code: &[u8]) -> Vec<u8> {
    const ENTRY: u64 = 0x10_0000;
    let note_off = 64 + 2 * 56;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(ENTRY as u32).to_le_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&ENTRY.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 2, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let phdr =
        |f: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
            f.extend_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(&flags.to_le_bytes());
            for v in [off, addr, addr, size, size, align] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        };
    phdr(&mut f, 1, 5, 0x1000, ENTRY, code.len() as u64, 0x1000);
    phdr(&mut f, 4, 4, note_off as u64, 0, note.len() as u64, 4);
    f.extend_from_slice(&note);
    f.resize(0x1000, 0);
    f.extend_from_slice(code);
    f
}

#[test]
fn a_kvm_internal_error_is_reported_with_rip_and_status_1() {
    // mov eax, 0xd0000000; jmp eax: execute from an address with no memory behind it (inside
    // the PCI hole), which KVM cannot emulate.
    let elf = tiny_pvh_elf(&[0xb8, 0x00, 0x00, 0x00, 0xd0, 0xff, 0xe0]);
    let path = std::env::temp_dir().join(format!("vmm-crash-{}.elf", std::process::id()));
    std::fs::write(&path, elf).unwrap();
    integration_tests::probe::require_kvm();
    let (code, err) = stderr_of(&["run", "--no-reboot", "--kernel", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("KVM internal error") || err.contains("unhandled exit"),
        "{err}"
    );
    assert!(err.contains("on vCPU 0 at RIP 0xd0000000"), "{err}");
    assert!(err.contains("instruction bytes:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn sigterm_ends_the_vmm_cleanly() {
    // A long benchmark loop keeps the guest busy until the signal.
    let child = spawn_probe(&[
        "--no-reboot",
        "--append",
        "mode=bench op=null n=100000000",
        "--device",
        "virtio-rng-pci",
    ]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("=== BENCH op=null"),
        "the guest ran"
    );
}

/// Without `--no-reboot` a guest reset restarts the guest in the same process: the probe guest
/// (which says hello and resets through the i8042) says hello again and again until SIGTERM
/// ends the vmm with status 0. (Linux on the test ground checks that lspci stays identical.)
#[test]
fn a_reset_reboots_in_place_until_sigterm() {
    use std::io::Read;
    let mut child = spawn_probe(&[
        "--append",
        "mode=hello",
        "--device",
        "virtio-rng-pci,id=r,addr=07.0",
    ]);
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if seen.matches("Hello from the probe guest").count() >= 3 {
                break;
            }
        }
        let _ = tx.send(seen);
    });
    // A hang guard, not a measurement: three boots take well under a second.
    let seen = rx.recv_timeout(std::time::Duration::from_secs(60));
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let seen = seen.unwrap_or_else(|_| panic!("the guest did not boot three times:\n{err}"));
    assert_eq!(
        seen.matches("Hello from the probe guest").count(),
        3,
        "{seen}"
    );
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `vmm run --kernel PROBE ARGS...` with stdout and stderr piped.
fn spawn_probe(args: &[&str]) -> std::process::Child {
    integration_tests::probe::require_kvm();
    let vmm = integration_tests::ground::vmm_binary().unwrap();
    let elf = probe_elf();
    std::process::Command::new(&vmm)
        .args(["run", "--kernel", elf.to_str().unwrap()])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// `--device` options for `functions` virtio-rng-pci functions at slots 3 and on of bus 0.
fn rng_devices(functions: u8) -> Vec<String> {
    (3..3 + functions)
        .flat_map(|slot| {
            [
                "--device".to_string(),
                format!("virtio-rng-pci,addr={slot:x}.0"),
            ]
        })
        .collect()
}

/// Runs the probe guest (`mode=hello`) with `functions` virtio-rng-pci functions (slots 3 and
/// on) under the shell's `ulimit LIMITS` (e.g. `-Sn 64`): (exit status, stdout, stderr).
fn probe_with_open_files_limit(limits: &str, functions: u8) -> (Option<i32>, String, String) {
    integration_tests::probe::require_kvm();
    let vmm = integration_tests::ground::vmm_binary().unwrap_or_else(|e| panic!("{e}"));
    let elf = probe_elf();
    let mut cmd = std::process::Command::new("timeout");
    cmd.args([
        "60",
        "sh",
        "-c",
        &format!("ulimit {limits} && exec \"$0\" \"$@\""),
    ])
    .arg(&vmm)
    .args(["run", "--no-reboot", "--kernel"])
    .arg(&elf)
    .args(["--append", "mode=hello"]);
    cmd.args(rng_devices(functions));
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", vmm.display()));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// 20 virtio functions take ~120 descriptors, past a soft open-files limit of 64: the vmm
/// raises the soft limit to the hard one (as QEMU does) and the machine starts. (Without the
/// raise it stopped with "device[8]: host resources: Too many open files".)
#[test]
fn a_machine_past_the_soft_open_files_limit_starts() {
    let (code, out, err) = probe_with_open_files_limit("-Sn 64", 20);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("Hello from the probe guest"), "{out}");
}

/// With the hard limit at 64 too, the machine does not fit: refused before the guest runs,
/// with an error that names the limit to raise.
#[test]
fn a_machine_past_the_hard_open_files_limit_is_refused_naming_the_limit() {
    let (code, out, err) = probe_with_open_files_limit("-n 64", 20);
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.is_empty(), "the guest must not run:\n{out}");
    assert!(
        err.contains("Too many open files") && err.contains("`ulimit -n`"),
        "{err}"
    );
}

/// Kills and reaps the vmm when dropped, also when an assertion fails first.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The eventfds a paused vmm (`-S`, the guest never runs) with `functions` virtio-rng-pci
/// functions at slots 3 and on holds once its QMP socket is up. Every eventfd exists by then
/// (the machine is built first); descriptors of other kinds (the console's epolls, the QMP
/// socket's) come and go around that moment and are not counted.
fn eventfds_with(functions: u8) -> usize {
    integration_tests::probe::require_kvm();
    let vmm = integration_tests::ground::vmm_binary().unwrap_or_else(|e| panic!("{e}"));
    let dir = integration_tests::scratch_dir(&format!("fds{functions}"));
    let sock = dir.join("qmp.sock");
    let mut cmd = std::process::Command::new(&vmm);
    cmd.args(["run", "--kernel"])
        .arg(probe_elf())
        .args(["--append", "mode=hello", "-S", "--qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()));
    cmd.args(rng_devices(functions));
    let child = Reaped(
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", vmm.display())),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no QMP socket after 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let fd_dir = format!("/proc/{}/fd", child.0.id());
    let eventfds = std::fs::read_dir(&fd_dir)
        .unwrap_or_else(|e| panic!("{fd_dir}: {e}"))
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy() == "anon_inode:[eventfd]")
        .count();
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    eventfds
}

/// What a virtio function costs in descriptors (README "Scale"): 20 virtio-rng functions hold
/// exactly 50 eventfds more than 10 do: each has its queue's ioeventfd, two MSI-X irqfds, and
/// the INTx trigger and resample eventfds. The trigger is shared with the INTx resampler, not duplicated (it was:
/// 6 per function).
#[test]
fn a_virtio_function_holds_five_descriptors() {
    let ten = eventfds_with(10);
    let twenty = eventfds_with(20);
    assert_eq!(
        twenty - ten,
        50,
        "10 functions: {ten} eventfds, 20 functions: {twenty} eventfds"
    );
}
