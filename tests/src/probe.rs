//! The probe guest on the local KVM: build it, boot it under our `vmm`, cut out its config-space
//! dumps and decode them with the real `lspci -F` (pciutils).
//!
//! Nothing here skips: a missing tool or /dev/kvm is an `Err` (or a panic in the helpers
//! meant for tests) that says what is missing and how to get it.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use crate::ground::{repo_root, section, vmm_binary};

/// Builds `target/guest/probe.elf` once per test process and returns its path.
pub fn probe_elf() -> PathBuf {
    static ELF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ELF.get_or_init(|| {
        let out = repo_root().join("target/guest");
        let status = Command::new("bash")
            .arg(repo_root().join("resources/guest/build.sh"))
            .arg(&out)
            .status()
            .map_err(|e| format!("cannot run resources/guest/build.sh: {e}"))?;
        if !status.success() {
            return Err(format!("resources/guest/build.sh failed: {status}"));
        }
        Ok(out.join("probe.elf"))
    })
    .clone()
    .unwrap_or_else(|e| panic!("probe guest: {e}"))
}

/// Runs `vmm` with `args` (a timeout of `secs` seconds) and returns its output.
pub fn vmm(args: &[&str], secs: u64) -> Output {
    let vmm = vmm_binary().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new("timeout")
        .arg(secs.to_string())
        .arg(&vmm)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", vmm.display()));
    assert_ne!(
        out.status.code(),
        Some(124),
        "vmm {args:?} did not finish in {secs} s; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// Starts `vmm run` on the probe guest with `mode=hello` and `extra` arguments and without
/// `--no-reboot`: the guest resets within milliseconds of starting and the vmm reboots it in
/// place, again and again, printing one hello line per boot on its piped stdout (stderr piped
/// too). The caller stops it (SIGTERM) and waits for it.
pub fn spawn_rebooting_probe(extra: &[&str]) -> std::process::Child {
    require_kvm();
    let elf = probe_elf();
    Command::new(vmm_binary().unwrap_or_else(|e| panic!("{e}")))
        .args(["run", "--kernel", elf.to_str().expect("utf-8 path")])
        .args(["--append", "mode=hello"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the vmm: {e}"))
}

/// Asserts the local /dev/kvm is usable; panics loudly otherwise.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests boot the probe guest on the local KVM and need /dev/kvm: {e}");
    }
}

/// Asserts a virtio-net-pci with `tap=` can create its tap here (/dev/net/tun); panics loudly
/// otherwise.
pub fn require_tun() {
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "virtio-net-pci,tap= needs /dev/net/tun (modprobe tun) to create its tap"
    );
}

/// Boots the probe with `cmdline` and the given extra vmm arguments; returns its serial output.
/// Panics unless the vmm exits 0 (the probe resets at the end).
pub fn run_probe(cmdline: &str, extra: &[&str]) -> String {
    require_kvm();
    let elf = probe_elf();
    let elf = elf.to_str().expect("utf-8 path");
    let mut args = vec!["run", "--no-reboot", "--kernel", elf, "--append", cmdline];
    args.extend_from_slice(extra);
    let out = vmm(&args, 120);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "vmm failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("=== PROBE-DONE ==="),
        "the probe did not finish:\n{stdout}"
    );
    stdout
}

/// Runs the probe guest (`mode=hello`) with `extra` vmm arguments that must be refused before
/// it starts: exit status 1 and nothing on stdout (the guest never ran). Returns the vmm's
/// stderr.
pub fn refused_probe_run(extra: &[&str]) -> String {
    let elf = probe_elf();
    let mut args = vec![
        "run",
        "--no-reboot",
        "--kernel",
        elf.to_str().expect("utf-8 path"),
    ];
    args.extend(["--append", "mode=hello"]);
    args.extend_from_slice(extra);
    let out = vmm(&args, 30);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "not refused: {extra:?}\n{err}");
    assert!(out.stdout.is_empty(), "the guest must not run: {extra:?}");
    err
}

/// One function of a dump: its address line and the bytes of its config space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionDump {
    /// `BB:DD.F`.
    pub addr: String,
    /// Config space bytes in order (256 for CF8, 4096 for ECAM).
    pub bytes: Vec<u8>,
}

/// Parses an `lspci -xxxx`-format dump (what the probe prints between its markers).
pub fn parse_dump(text: &str) -> Vec<FunctionDump> {
    let mut out: Vec<FunctionDump> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.len() >= 7 && line.as_bytes().get(2) == Some(&b':') && line.as_bytes()[5] == b'.' {
            out.push(FunctionDump {
                addr: line[..7].to_string(),
                bytes: Vec::new(),
            });
        } else if let (Some(f), Some((_, hex))) = (out.last_mut(), line.split_once(": ")) {
            f.bytes.extend(
                hex.split_whitespace()
                    .filter_map(|b| u8::from_str_radix(b, 16).ok()),
            );
        }
    }
    out
}

/// Boots the probe with `cmdline` and `extra` vmm arguments and checks the run: the vmm exits
/// 0, never panicked, and the probe reached its end. Returns (stdout, stderr).
pub fn run_probe_checked(cmdline: &str, extra: &[String]) -> (String, String) {
    require_kvm();
    let elf = probe_elf();
    let mut args: Vec<&str> = vec![
        "run",
        "--no-reboot",
        "--kernel",
        elf.to_str().expect("utf-8 path"),
        "--append",
        cmdline,
    ];
    args.extend(extra.iter().map(String::as_str));
    let out = vmm(&args, 120);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "{cmdline}: vmm failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        !stderr.contains("panicked"),
        "{cmdline}: the VMM panicked:\n{stderr}"
    );
    assert!(
        stdout.contains("=== PROBE-DONE ==="),
        "{cmdline}: the probe did not finish:\n{stdout}"
    );
    (stdout, stderr)
}

/// Decodes a dump section with the real `lspci -F FILE` plus `lspci_args`.
pub fn lspci_decode(dump: &str, lspci_args: &[&str]) -> String {
    let path = std::env::temp_dir().join(format!(
        "probe-dump-{}-{:?}.txt",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, dump).expect("write dump");
    let out = Command::new("lspci")
        .arg("-F")
        .arg(&path)
        .args(lspci_args)
        .output()
        .unwrap_or_else(|e| {
            panic!("lspci (pciutils) is needed to decode the probe's dumps: {e}; apt-get install pciutils")
        });
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "lspci -F failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The CF8 and ECAM dump sections of a probe run.
pub fn dumps(stdout: &str) -> (String, String) {
    let cf8 = section(stdout, "PROBE-CF8").expect("CF8 dump section");
    let ecam = section(stdout, "PROBE-ECAM").expect("ECAM dump section");
    (cf8, ecam)
}
