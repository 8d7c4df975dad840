//! Issue 15, disks that fail: the compat record and the machine dump on a full filesystem (a
//! tmpfs of a few KiB, filled to ENOSPC). At start the vmm refuses with an error naming the
//! file and the cause and leaves the old file as it was; at run time `save-compat`,
//! `dump-machine` and a hot-plug's record rewrite get a QMP `GenericError`, the old file stays,
//! and the guest runs on. (virtio-blk's own I/O errors: unit tests in devices/src/virtio/blk.rs.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use integration_tests::ground::vmm_binary;
use integration_tests::probe::{probe_elf, require_kvm, vmm};
use integration_tests::qmp::Client;
use integration_tests::tmpfs::Tmpfs;
use serde_json::{json, Value};

const ENOSPC: &str = "No space left on device";
/// A guest that runs until the test quits it.
const LONG: &str = "mode=bench op=null n=2000000000";

fn tmpdir(name: &str) -> PathBuf {
    integration_tests::scratch_dir(&format!("disks-{name}"))
}

fn probe_args(cmdline: &str) -> Vec<String> {
    let elf = probe_elf();
    [
        "run",
        "--no-reboot",
        "--kernel",
        elf.to_str().unwrap(),
        "--append",
        cmdline,
        "--device",
        "virtio-rng-pci,id=rng0,addr=5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(extra: &[&str]) -> (bool, String, String) {
    let mut args = probe_args("mode=hello");
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = vmm(&args, 60);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_start_on_a_full_disk_is_refused_and_the_old_files_stay() {
    require_kvm();
    let fs = Tmpfs::mount("start", 64);
    let rec = fs.path().join("rec.json");
    let dump = fs.path().join("machine.json");
    let (ok, out, err) = run(&[
        "--compat",
        rec.to_str().unwrap(),
        "--dump-machine",
        dump.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("Hello"), "first run: {err}");
    let (old_rec, old_dump) = (read(&rec), read(&dump));
    assert!(old_rec.len() > 100 && old_dump.len() > 100);
    fs.fill();
    let before = fs.names();

    // The record on the full disk.
    let (ok, out, err) = run(&["--compat", rec.to_str().unwrap()]);
    assert!(!ok, "the vmm must refuse to start: {err}");
    assert!(!out.contains("Hello"), "the guest must not run: {out}");
    assert!(
        err.contains(&format!("'{}'", rec.display())) && err.contains(ENOSPC),
        "the error names the record and ENOSPC: {err}"
    );
    assert_eq!(read(&rec), old_rec, "the old record is byte-identical");

    // The machine dump on the full disk (the record elsewhere).
    let other = tmpdir("start").join("rec.json");
    let (ok, out, err) = run(&[
        "--compat",
        other.to_str().unwrap(),
        "--dump-machine",
        dump.to_str().unwrap(),
    ]);
    assert!(!ok, "the vmm must refuse to start: {err}");
    assert!(!out.contains("Hello"), "the guest must not run: {out}");
    assert!(
        err.contains(&format!("'{}'", dump.display())) && err.contains(ENOSPC),
        "the error names the dump and ENOSPC: {err}"
    );
    assert_eq!(read(&dump), old_dump, "the old dump is byte-identical");
    assert_eq!(fs.names(), before, "no temporary file left behind");
}

struct Vm {
    child: Child,
    sock: PathBuf,
}

impl Vm {
    fn start(name: &str, extra: &[&str]) -> Vm {
        require_kvm();
        let sock = tmpdir(name).join("qmp.sock");
        let child = Command::new(vmm_binary().unwrap())
            .args(probe_args(LONG))
            .arg("-S")
            .arg("--qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        for _ in 0..1000 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(sock.exists(), "the QMP socket never appeared");
        Vm { child, sock }
    }

    /// Quits through QMP; the vmm must end with status 0.
    fn quit(mut self, c: &mut Client) -> String {
        assert_eq!(c.cmd(json!({"execute": "quit"}))["return"], json!({}));
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        stderr
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The error of a reply that must be a GenericError.
fn generic_error(r: &Value) -> String {
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    r["error"]["desc"].as_str().unwrap().to_string()
}

#[test]
fn save_compat_and_dump_machine_on_a_full_disk_fail_and_the_guest_runs_on() {
    let fs = Tmpfs::mount("save", 64);
    let rec = fs.path().join("rec.json");
    let dump = fs.path().join("machine.json");
    let vm = Vm::start("save", &[]);
    let mut c = Client::negotiated(&vm.sock);
    assert_eq!(c.cmd(json!({"execute": "cont"}))["return"], json!({}));
    let save = |c: &mut Client| {
        c.cmd(json!({"execute": "save-compat", "arguments": {"path": rec.to_str().unwrap()}}))
    };
    let dump_cmd = |c: &mut Client| {
        c.cmd(json!({"execute": "dump-machine", "arguments": {"path": dump.to_str().unwrap()}}))
    };
    assert_eq!(save(&mut c)["return"], json!({}));
    assert_eq!(dump_cmd(&mut c)["return"], json!({}));
    let (old_rec, old_dump) = (read(&rec), read(&dump));
    fs.fill();
    let before = fs.names();

    let e = generic_error(&save(&mut c));
    assert!(
        e.contains(&format!("'{}'", rec.display())) && e.contains(ENOSPC),
        "{e}"
    );
    let e = generic_error(&dump_cmd(&mut c));
    assert!(
        e.contains(&format!("'{}'", dump.display())) && e.contains(ENOSPC),
        "{e}"
    );
    assert_eq!(read(&rec), old_rec, "the record is untouched");
    assert_eq!(read(&dump), old_dump, "the dump is untouched");
    assert_eq!(fs.names(), before, "no temporary file left behind");
    assert_eq!(c.status(), "running", "the guest runs on");
    vm.quit(&mut c);
}

#[test]
fn a_hot_plug_whose_record_rewrite_fails_says_so_and_keeps_the_old_record() {
    let fs = Tmpfs::mount("hotplug", 64);
    let rec = fs.path().join("rec.json");
    let vm = Vm::start("hotplug", &["--compat", rec.to_str().unwrap()]);
    let mut c = Client::negotiated(&vm.sock);
    // cont writes the record (the disk has room yet).
    assert_eq!(c.cmd(json!({"execute": "cont"}))["return"], json!({}));
    let old = read(&rec);
    assert!(String::from_utf8_lossy(&old).contains("rng0"));
    fs.fill();
    let before = fs.names();

    let r = c.cmd(json!({"execute": "device_add",
        "arguments": {"driver": "virtio-rng-pci", "id": "hot", "addr": "0x9"}}));
    let e = generic_error(&r);
    assert!(
        e.starts_with("device 'hot' was added, but the compat record was not written"),
        "{e}"
    );
    assert!(
        e.contains(&format!("'{}'", rec.display())) && e.contains(ENOSPC),
        "{e}"
    );
    assert_eq!(read(&rec), old, "the old record is byte-identical");
    assert_eq!(fs.names(), before, "no temporary file left behind");
    // The device is there (as the error says) and the guest runs on.
    let pci = c.cmd(json!({"execute": "query-pci"}));
    let devs = pci["return"][0]["devices"].as_array().unwrap();
    assert!(
        devs.iter().any(|d| d["slot"] == 9 && d["qdev_id"] == "hot"),
        "{pci}"
    );
    assert_eq!(c.status(), "running");
    vm.quit(&mut c);
}
