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
    let (code, err) = stderr_of(&["run", "--kernel", "/nonexistent/vmlinuz"]);
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
    let (code, err) = stderr_of(&["run", "--kernel", dir.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot load kernel"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_file_that_is_no_kernel_is_refused() {
    let (code, err) = stderr_of(&["run", "--kernel", "/etc/hostname"]);
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
    let (code, err) = stderr_of(&["run", "--kernel", elf, "--initrd", "/nonexistent"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot load initrd '/nonexistent'"), "{err}");
    let (code, err) = stderr_of(&["run", "--kernel", elf, "--memory", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid memory size 0 MiB"), "{err}");
    let (code, err) = stderr_of(&["run", "--kernel", elf, "--cpus", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid number of CPUs 0"), "{err}");
}

/// Real Linux under a real KVM: two boots in one KVM-host image (1 and 2 vCPUs).
#[test]
fn debian_linux_boots_to_its_init_with_one_and_two_cpus() {
    let guest =
        "echo \"uname: $(uname -r)\"; echo \"processors: $(grep -c ^processor /proc/cpuinfo)\"";
    let script = host_script(&[
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
    }
}
