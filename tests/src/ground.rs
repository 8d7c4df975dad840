//! The test ground for real Linux guests: runs a *host scenario* (a POSIX sh script that calls
//! `$VMM` one or more times) on a host with a real KVM, via `resources/linux/run-scenario.sh`.
//! That is this machine itself when it has hardware virtualisation, or else an L1 Linux booted
//! under QEMU TCG with emulated SVM (nested KVM), see `/work/shared/TEST-GROUND.md`.
//!
//! Tests need the release binary first: `cargo build --release -p vmm` (or set `VMM_BIN`).
//! Nothing here skips silently: when the ground cannot run, the functions return `Err` with the
//! reason and tests are expected to panic on it (`.expect(...)`).
//!
//! The host scenario sees `VMM`, `GUEST_KERNEL`, `GUEST_INITRD` (the guest's base initramfs) and
//! `TMPDIR`, and has `mkguestinitrd OUT SCRIPT` and `vmmwatch [--retry] [--qmp SOCKET] SECONDS
//! CMD...` on its PATH (resources/linux/vmmwatch: a deadline for a vmm run; a hung vmm's
//! threads, KVM counters and trace, and `info virtio` are printed before it is stopped). The guest's `/init` prints
//! `=== GUEST-READY ===`, then runs the guest script between `=== SCENARIO-BEGIN ===` and
//! `=== SCENARIO-END rc=N ===` (or, without one, `lspci -n`, `lspci -nn`, `lspci -vvv -nn` in the
//! sections `LSPCI-N`, `LSPCI-NN`, `LSPCI-VVV`) and resets the machine (`reboot -f`).

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

/// Kernel command line used by [`guest_boot`]. `reboot=t`: the guest's `reboot -f` triple-faults
/// (KVM_EXIT_SHUTDOWN) at once; the default chain (ACPI, i8042, then a real-mode BIOS jump) raced
/// with QEMU's reset handling under nested KVM and once ended in a KVM emulation failure.
pub const DEFAULT_APPEND: &str = "console=ttyS0 quiet panic=-1 reboot=t";
/// Guest memory (MiB) used by [`guest_boot`].
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// Seconds a guest boot may take (a boot with its scenario takes 5 to 30 s here). A boot still
/// running then is reported (`vmmwatch`) and run once more; see [`run_host_scenario`].
pub const BOOT_DEADLINE_SECS: u32 = 120;
/// Marker `vmmwatch --retry` prints before running a hung vmm again.
pub const HANG_RETRY_MARKER: &str = "=== VMM-HANG-RETRY ===";

/// What a host scenario printed.
#[derive(Debug, Clone)]
pub struct ScenarioOutput {
    /// Everything run-scenario.sh printed on stdout (serial console of L1 in L1 mode), `\r` removed.
    pub stdout: String,
    /// The host scenario's exit status.
    pub rc: i32,
    /// `direct` or `l1`.
    pub mode: String,
}

impl ScenarioOutput {
    /// The text between the `NAME` markers (see [`section`]).
    pub fn section(&self, name: &str) -> Option<String> {
        section(&self.stdout, name)
    }
}

/// The repository root (`tests/..`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The vmm binary: `$VMM_BIN`, else `target/release/vmm`. Err if it does not exist.
pub fn vmm_binary() -> Result<PathBuf, String> {
    let path = match std::env::var_os("VMM_BIN") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("target/release/vmm"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "vmm binary {} not found: run `cargo build --release -p vmm` first (or set VMM_BIN)",
            path.display()
        ))
    }
}

/// Run `script` as a host scenario and return its output. Err when the ground could not run it
/// (no vmm binary, build failure, no /dev/kvm in L1, L1 timeout, scenario never finished); a
/// scenario that ran and failed is Ok with a non-zero `rc`.
pub fn run_host_scenario(script: &str) -> Result<ScenarioOutput, String> {
    run_host_scenario_with(script, &[])
}

/// [`run_host_scenario`] with extra tools for L1: each of `extra_cpio` (a gzip'd cpio, e.g. from
/// [`build_part`]) is unpacked over the L1 image. In direct mode they are not used: the
/// scenario finds the tools on this host.
pub fn run_host_scenario_with(
    script: &str,
    extra_cpio: &[PathBuf],
) -> Result<ScenarioOutput, String> {
    run_host_scenario_env(script, extra_cpio, &[])
}

/// [`run_host_scenario_with`] with extra environment for run-scenario.sh (e.g.
/// `L1_STALL_SECS`).
pub fn run_host_scenario_env(
    script: &str,
    extra_cpio: &[PathBuf],
    env: &[(&str, &str)],
) -> Result<ScenarioOutput, String> {
    let vmm = vmm_binary()?;
    let runner = repo_root().join("resources/linux/run-scenario.sh");
    if !runner.is_file() {
        return Err(format!("{} missing", runner.display()));
    }
    let mut file = tempfile()?;
    file.1
        .write_all(script.as_bytes())
        .map_err(|e| format!("writing {}: {e}", file.0.display()))?;
    drop(file.1);
    // After any the caller's environment already names.
    let mut extra: Vec<String> = std::env::var("L1_EXTRA_CPIO")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    extra.extend(extra_cpio.iter().map(|p| p.display().to_string()));
    let result = Command::new("bash")
        .envs(env.iter().copied())
        .env("L1_EXTRA_CPIO", extra.join(" "))
        .arg(&runner)
        .arg("--vmm")
        .arg(&vmm)
        .arg(&file.0)
        .output();
    let _ = std::fs::remove_file(&file.0);
    let out = result.map_err(|e| format!("cannot run {}: {e}", runner.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown by `cargo test -- --nocapture` or when the test fails.
    eprintln!("----- run-scenario stdout -----\n{stdout}----- stderr -----\n{stderr}-----");
    report_hangs(&stdout, &stderr);
    // After a wedged L1, run-scenario.sh ran the whole scenario again: only that run counts.
    let stdout = match stdout.rfind(L1_RETRY_MARKER) {
        Some(at) => stdout[at..].to_string(),
        None => stdout,
    };
    let fail = |why: &str| {
        Err(format!(
            "{why}\n--- stderr ---\n{stderr}\n--- stdout (tail) ---\n{}",
            tail(&stdout, 60)
        ))
    };
    if stdout.contains("/dev/kvm MISSING") {
        return fail("the L1 host has no /dev/kvm");
    }
    let Some(rc) = end_rc(&stdout, "HOST-SCENARIO") else {
        return fail(&format!(
            "the host scenario did not finish (run-scenario exit {:?})",
            out.status.code()
        ));
    };
    let mode = stdout
        .lines()
        .find_map(|l| l.split("run-scenario: mode=").nth(1))
        .and_then(|m| m.split_whitespace().next())
        .unwrap_or("unknown")
        .to_string();
    Ok(ScenarioOutput { stdout, rc, mode })
}

/// Runs a host scenario whose driver is Python in L1 (the part of `build-python-part.sh`):
/// writes each of `files` (name, text) into `$W` (`$TMPDIR/<workdir>`), then runs `body`
/// (sh, sees `$W`). Panics when the ground cannot run it; a scenario that ran and failed is
/// returned with its `rc`.
pub fn run_python_scenario(workdir: &str, files: &[(&str, &str)], body: &str) -> ScenarioOutput {
    let python = build_part("build-python-part.sh").unwrap_or_else(|e| panic!("{e}"));
    let mut script = format!("W=\"$TMPDIR/{workdir}\"; mkdir -p \"$W\"\n");
    for (name, text) in files {
        assert!(
            !text.contains("PY_EOF"),
            "{name} contains the here-document's end marker"
        );
        let newline = if text.ends_with('\n') { "" } else { "\n" };
        script += &format!("cat > \"$W/{name}\" <<'PY_EOF'\n{text}{newline}PY_EOF\n");
    }
    script += body;
    run_host_scenario_with(&host_script(&[script]), &[python])
        .unwrap_or_else(|e| panic!("test ground: {e}"))
}

/// Runs `resources/linux/<script>` (a build-*-part.sh script that packs tools for L1 and prints
/// the path of the cpio it wrote on its last line) and returns that path.
pub fn build_part(script: &str) -> Result<PathBuf, String> {
    let path = repo_root().join("resources/linux").join(script);
    let out = Command::new("bash")
        .arg(&path)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let cpio = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    if cpio.is_file() {
        Ok(cpio)
    } else {
        Err(format!("{} printed no cpio path: {stdout}", path.display()))
    }
}

/// The part of `text` after the last [`HANG_RETRY_MARKER`] (all of it when there is none): the
/// output of the last attempt of a scenario that runs a hung step once more itself. (Boots
/// from [`guest_boot`] need no cutting: vmmwatch defuses a hung run's markers.)
pub fn last_attempt(text: &str) -> &str {
    text.rsplit(HANG_RETRY_MARKER).next().unwrap_or(text)
}

/// The line run-scenario.sh prints before it runs a scenario again after a wedged L1: what
/// came before it is void.
pub const L1_RETRY_MARKER: &str = "##### run-scenario: RETRY:";

/// run-scenario.sh's reports of a wedged L1 (no heartbeat from its second serial port; the
/// CPU state QEMU's monitor gave), each from its first line to its closing one, and its lines
/// about a silent L1 it pressed a key in (on stderr) and about one that resumed.
fn l1_wedges(stdout: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in stdout.lines() {
        if let Some(lines) = current.as_mut() {
            lines.push(line);
            if line.contains("##### run-scenario: L1 WEDGED report end") {
                found.push(lines.join("\n"));
                current = None;
            }
        } else if line.contains("##### run-scenario: L1 WEDGED:") {
            current = Some(vec![line]);
        } else if line.contains("##### run-scenario: L1 STALLED:")
            || line.contains("##### run-scenario: L1 RESUMED")
        {
            found.push(line.to_string());
        }
    }
    found.extend(current.map(|l| l.join("\n")));
    found
}

/// File (under `target/`) where every vmm hang is recorded; `resources/test.sh` prints it at the
/// end of a run, so a hang never goes unnoticed even when the test passed on a retry.
pub fn hang_log() -> PathBuf {
    repo_root().join("target/test-ground-hangs.log")
}

/// A vmm that hung (vmmwatch's report), whether it was run again or its test failed anyway:
/// say so on stderr and append the reports to [`hang_log`], so a passing test cannot hide it.
/// Only reports about a vmm run count (the ground's own test of vmmwatch watches `sleep`).
fn report_hangs(stdout: &str, stderr: &str) {
    let mut reports: Vec<String> = sections(stdout, "VMM-HANG")
        .into_iter()
        .filter(|r| r.lines().next().is_some_and(|l| l.contains("vmm run ")))
        .collect();
    reports.extend(l1_wedges(stdout));
    reports.extend(l1_wedges(stderr));
    if reports.is_empty() {
        return;
    }
    let reports = reports.join("\n----\n");
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string();
    eprintln!("!!!!! test ground: a vmm or the L1 host hung ({test}):\n{reports}\n!!!!!");
    let entry = format!("##### {test}\n{reports}\n");
    let log = hang_log();
    let written = log
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
        })
        .and_then(|mut f| f.write_all(entry.as_bytes()));
    if let Err(e) = written {
        eprintln!(
            "!!!!! test ground: cannot record the hang in {}: {e}",
            log.display()
        );
    }
}

/// The lines between `=== NAME-BEGIN ===` and `=== NAME-END ===` / `=== NAME-END rc=N ===`
/// (first occurrence), joined with `\n`. Markers may be preceded by other output on their line.
pub fn section(text: &str, name: &str) -> Option<String> {
    sections(text, name).into_iter().next()
}

/// Every `NAME` section in `text`, in order (e.g. one per guest boot).
pub fn sections(text: &str, name: &str) -> Vec<String> {
    let begin = format!("=== {name}-BEGIN ===");
    let mut found = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(lines) = current.as_mut() {
            if is_end(line, name) {
                found.push(lines.join("\n"));
                current = None;
            } else {
                lines.push(line);
            }
        } else if line.contains(&begin) {
            current = Some(Vec::new());
        }
    }
    found
}

/// The `rc=N` of the first `=== NAME-END rc=N ===` marker.
pub fn end_rc(text: &str, name: &str) -> Option<i32> {
    let end = format!("=== {name}-END rc=");
    text.lines().find_map(|l| {
        l.split(&end)
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

fn is_end(line: &str, name: &str) -> bool {
    line.contains(&format!("=== {name}-END ===")) || line.contains(&format!("=== {name}-END rc="))
}

/// A host-scenario fragment that boots the guest once, in a section `BOOT-<label>`:
/// `$VMM run --no-reboot --kernel $GUEST_KERNEL --initrd <initrd> --append DEFAULT_APPEND --memory 256 <vmm_args>`.
/// With `guest_script`, the initrd is the base one plus that script as /scenario (its output lands
/// in the `SCENARIO` section inside `BOOT-<label>`); without, the guest prints the LSPCI sections.
/// `vmm_args` is shell text (e.g. `--device virtio-rng-pci,id=rng0,addr=05.0`).
pub fn guest_boot(label: &str, vmm_args: &str, guest_script: Option<&str>) -> String {
    guest_boot_with(
        label,
        DEFAULT_APPEND,
        DEFAULT_MEMORY_MIB,
        vmm_args,
        guest_script,
    )
}

/// [`guest_boot`] with an explicit kernel command line and memory size.
pub fn guest_boot_with(
    label: &str,
    append: &str,
    memory_mib: u32,
    vmm_args: &str,
    guest_script: Option<&str>,
) -> String {
    let mut s = format!("echo '=== BOOT-{label}-BEGIN ==='\n");
    let initrd = match guest_script {
        Some(g) => {
            s += &format!(
                "cat > \"$TMPDIR/guest-{label}.sh\" <<'GUEST_SCRIPT_EOF'\n{g}\nGUEST_SCRIPT_EOF\n\
                 mkguestinitrd \"$TMPDIR/guest-{label}.cpio.gz\" \"$TMPDIR/guest-{label}.sh\" || exit 90\n"
            );
            format!("\"$TMPDIR/guest-{label}.cpio.gz\"")
        }
        None => "\"$GUEST_INITRD\"".to_string(),
    };
    // A QMP socket (unless the boot brings its own), so that a hang report has `info virtio`.
    let (watch, qmp) = if vmm_args.contains("--qmp") {
        (String::new(), String::new())
    } else {
        let sock = format!("$TMPDIR/qmp-{label}.sock");
        (
            format!(" --qmp \"{sock}\""),
            format!(" --qmp \"unix:{sock},server=on,wait=off\""),
        )
    };
    s += &format!(
        "vmmwatch --retry{watch} {BOOT_DEADLINE_SECS} \"$VMM\" run --no-reboot --kernel \"$GUEST_KERNEL\" --initrd {initrd} --append {} --memory {memory_mib} {vmm_args}{qmp}\n\
         echo \"=== BOOT-{label}-END rc=$? ===\"\n",
        shell_quote(append)
    );
    s
}

/// A whole host script: the given fragments (e.g. from [`guest_boot`]) in order. The script's
/// rc is 0; each boot's vmm exit status is in its `BOOT-<label>-END rc=N` marker ([`end_rc`]).
pub fn host_script(fragments: &[String]) -> String {
    let mut s = String::from("# generated by tests/src/ground.rs\nTMPDIR=${TMPDIR:-/tmp}\n");
    for f in fragments {
        s += f;
    }
    s
}

/// Single-quote `s` for sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn tempfile() -> Result<(PathBuf, std::fs::File), String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "vmm-host-scenario-{}-{}.sh",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let f =
        std::fs::File::create(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    Ok((path, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "noise\n\x1b[2J=== LSPCI-N-BEGIN ===\n00:00.0 0600: 1b36:0008\r\n\
        00:05.0 00ff: 1af4:1005\n=== LSPCI-N-END rc=0 ===\n=== LSPCI-NN-BEGIN ===\nx\n\
        === LSPCI-NN-END ===\n=== HOST-SCENARIO-END rc=3 ===\n";

    #[test]
    fn sections_are_cut_exactly() {
        assert_eq!(
            section(OUT, "LSPCI-N").unwrap(),
            "00:00.0 0600: 1b36:0008\n00:05.0 00ff: 1af4:1005"
        );
        assert_eq!(section(OUT, "LSPCI-NN").unwrap(), "x");
        assert_eq!(section(OUT, "LSPCI-VVV"), None);
        assert_eq!(end_rc(OUT, "HOST-SCENARIO"), Some(3));
        assert_eq!(end_rc(OUT, "LSPCI-N"), Some(0));
    }

    #[test]
    fn guest_boot_fragment() {
        let s = host_script(&[guest_boot(
            "a",
            "--device virtio-rng-pci,id=r0",
            Some("lspci -n"),
        )]);
        assert!(s.contains("mkguestinitrd \"$TMPDIR/guest-a.cpio.gz\""));
        assert!(s.contains("vmmwatch --retry --qmp \"$TMPDIR/qmp-a.sock\" 120 \"$VMM\" run "));
        assert!(s.contains("--append 'console=ttyS0 quiet panic=-1 reboot=t' --memory 256 --device virtio-rng-pci,id=r0 --qmp \"unix:$TMPDIR/qmp-a.sock,server=on,wait=off\"\n"));
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    /// A silent L1 (played by stopping its heartbeat) gets a key press every `L1_KICK_SECS`
    /// (what wakes an L1 that QEMU's lost-interrupt race left halted); one that stays silent
    /// for `L1_STALL_SECS` is reported with its CPU state and the whole scenario runs again,
    /// only the second run's output counting. In the second run the heartbeat comes back after
    /// a while: L1 is reported resumed, and its keyboard interrupt (IRQ 1) count went up.
    #[test]
    fn a_silent_l1_gets_a_key_press_and_a_wedged_one_is_reported_and_run_again() {
        let script = "echo \"=== RUN-BEGIN ===\"\necho \"attempt $L1_ATTEMPT\"\n\
            hb=$(cat /tmp/.l1-heartbeat.pid)\n\
            [ \"$L1_ATTEMPT\" = 1 ] && { kill -STOP $hb; sleep 600; }\n\
            keys() { awk '$1 == \"1:\" { print $2 }' /proc/interrupts; }\n\
            before=$(keys)\n\
            kill -STOP $hb; sleep 16; kill -CONT $hb; sleep 6\n\
            echo \"keys $before $(keys)\"\n\
            echo \"=== RUN-END ===\"\n";
        let out = run_host_scenario_env(
            script,
            &[],
            &[("L1_STALL_SECS", "30"), ("L1_KICK_SECS", "10")],
        )
        .expect("test ground");
        if out.mode == "direct" {
            eprintln!(
                "!!!!! NOT RUN HERE: direct mode (hardware virtualisation) has no L1 to wedge"
            );
            return;
        }
        assert_eq!(out.rc, 0, "{}", out.stdout);
        let run = out.section("RUN").unwrap_or_default();
        assert_eq!(run.lines().next(), Some("attempt 2"), "{}", out.stdout);
        let keys: Vec<u64> = run
            .lines()
            .find_map(|l| l.strip_prefix("keys "))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            keys.len() == 2 && keys[1] > keys[0],
            "L1's i8042 interrupt count did not go up: {keys:?}\n{}",
            out.stdout
        );
        assert!(out.stdout.starts_with(L1_RETRY_MARKER), "{}", out.stdout);
        let hang = std::fs::read_to_string(hang_log()).unwrap_or_default();
        assert!(
            hang.contains("no heartbeat from L1 for 30s (attempt 1)")
                && hang.contains("RIP=")
                && hang.contains("(attempt 2): VM status: running RIP=")
                && hang.contains(" IRR ")
                && hang.contains("L1 RESUMED after "),
            "the wedge, the key presses and the CPU's registers are in {}:\n{hang}",
            hang_log().display()
        );
    }

    /// The ground itself: a host with /dev/kvm, the guest kernel and initramfs, mkguestinitrd.
    /// Needs the vmm binary to exist (it is packed into the L1 image) but does not run it.
    #[test]
    fn ground_runs_a_host_scenario() {
        let script = "set -e\ntest -c /dev/kvm\ntest -s \"$GUEST_KERNEL\"\ntest -x \"$VMM\"\n\
            echo 'echo hi' > \"$TMPDIR/g.sh\"\nmkguestinitrd \"$TMPDIR/g.gz\" \"$TMPDIR/g.sh\"\n\
            test \"$(wc -c < \"$TMPDIR/g.gz\")\" -gt \"$(wc -c < \"$GUEST_INITRD\")\"\n\
            echo '=== CHECK-BEGIN ==='\necho ground ok\necho '=== CHECK-END ==='\n\
            set +e\nvmmwatch 5 sh -c 'exit 3'\necho \"=== QUICK-END rc=$? ===\"\n\
            vmmwatch 1 sleep 30\necho \"=== SLOW-END rc=$? ===\"\n\
            m='===' vmmwatch --retry 1 sh -c '[ -e $TMPDIR/once ] || { touch $TMPDIR/once; echo \"$m TRY-BEGIN $m\"; echo first; sleep 30; }; echo \"$m TRY-BEGIN $m\"; echo second; echo \"$m TRY-END $m\"'\n\
            echo \"=== RETRIED-END rc=$? ===\"\nexit 7\n";
        let out = run_host_scenario(script).expect("test ground");
        assert_eq!(out.rc, 7, "{}", out.stdout);
        assert_eq!(out.section("CHECK").as_deref(), Some("ground ok"));
        // vmmwatch passes a status through, and reports and stops what runs past its deadline.
        assert_eq!(end_rc(&out.stdout, "QUICK"), Some(3), "{}", out.stdout);
        assert_eq!(end_rc(&out.stdout, "SLOW"), Some(124), "{}", out.stdout);
        let hang = out
            .section("VMM-HANG")
            .unwrap_or_else(|| panic!("{}", out.stdout));
        assert!(hang.contains("still running after 1s: sleep 30"), "{hang}");
        assert!(hang.contains("'sleep' state=S"), "{hang}");
        // --retry: the second run's status, and its sections are the only ones found.
        assert_eq!(end_rc(&out.stdout, "RETRIED"), Some(0), "{}", out.stdout);
        assert!(out.stdout.contains(HANG_RETRY_MARKER), "{}", out.stdout);
        assert_eq!(
            out.section("TRY").as_deref(),
            Some("second"),
            "{}",
            out.stdout
        );
        assert!(out.stdout.contains("    | first"), "{}", out.stdout);
        assert!(
            out.mode == "l1" || out.mode == "direct",
            "mode {}",
            out.mode
        );
    }
}
