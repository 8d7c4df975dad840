//! Issue 11, point 6: removing a device gives back everything adding it took. A paused machine
//! (`-S`, the probe guest never runs) goes through 200 cold-plug `device_add` / `device_del`
//! cycles over QMP (virtio-rng-pci, virtio-blk-pci on a small image, virtio-console-pci writing
//! to a file; INTx-only `vectors=0` and MSI-X with 1 to 4 vectors), and the vmm ends up with
//! the open file descriptors, threads, MSI GSIs, KVM GSI routes and INTx lines it started with.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use integration_tests::ground::vmm_binary;
use integration_tests::probe::{probe_elf, require_kvm};
use integration_tests::qmp::Client;
use serde_json::json;

/// What the vmm holds: open fds, threads, and `info gsi`'s counts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holdings {
    fds: usize,
    threads: usize,
    msi_gsis: usize,
    routes: usize,
    intx_lines: usize,
}

/// The number in `info gsi`'s line `name: N ...`.
fn gsi_count(text: &str, name: &str) -> usize {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name:?} in info gsi:\n{text}"))
}

fn holdings(pid: u32, c: &mut Client) -> Holdings {
    let count = |dir: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{dir}"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/{dir}: {e}"))
            .count()
    };
    let gsi = c.hmp("info gsi");
    Holdings {
        fds: count("fd"),
        threads: count("task"),
        msi_gsis: gsi_count(&gsi, "MSI GSIs allocated"),
        routes: gsi_count(&gsi, "KVM GSI routes"),
        intx_lines: gsi_count(&gsi, "INTx lines"),
    }
}

/// Where each fd points and each thread's name: printed when the counts differ.
fn inventory(pid: u32) -> String {
    let mut out = String::new();
    let mut fds: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    fds.sort_by_key(|e| e.file_name());
    for e in fds {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        out += &format!("fd {:?} -> {}\n", e.file_name(), target.display());
    }
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    for t in tasks {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        out += &format!("task {:?} {}", t.file_name(), comm);
    }
    out
}

/// Waits until the vmm has settled after start-up: its main thread waits in its console loop
/// (`epoll_wait`) and every other thread is blocked in a wait too. Whatever it creates at
/// start-up (the QMP threads, the console loop's epoll and stdin, the hot-plug thread's epoll,
/// made on that thread) exists by then, while its QMP socket exists before all of that.
fn wait_until_settled(pid: u32) {
    // epoll_wait, epoll_pwait, epoll_pwait2.
    const EPOLL_WAIT: [&str; 3] = ["232", "281", "441"];
    // read, poll, accept, accept4, recvfrom, recvmsg, futex, rt_sigtimedwait, ppoll, and the
    // epoll waits.
    const WAITS: [&str; 12] = [
        "0", "7", "43", "288", "45", "47", "202", "128", "271", "232", "281", "441",
    ];
    let syscall = |task: &str| {
        let path = format!("/proc/{pid}/task/{task}/syscall");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let nr = |text: &str| text.split_whitespace().next().unwrap_or("").to_string();
    // Only catches a vmm that never settles.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let main = syscall(&pid.to_string());
        let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|t| t.file_name().to_string_lossy().to_string())
            .collect();
        let busy: Vec<String> = tasks
            .iter()
            .map(|t| (t, syscall(t)))
            .filter(|(_, s)| !WAITS.contains(&nr(s).as_str()))
            .map(|(t, s)| format!("{t}: {s}"))
            .collect();
        if EPOLL_WAIT.contains(&nr(&main).as_str()) && busy.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the vmm never settled: main thread {main}, busy {busy:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Vmm {
    child: Child,
    dir: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn two_hundred_cold_plug_cycles_leave_fds_threads_and_gsis_as_they_were() {
    require_kvm();
    let dir = integration_tests::scratch_dir("leaks");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 64 << 10]).unwrap();
    let sock = dir.join("qmp.sock");
    let elf = probe_elf();
    let child = Command::new(vmm_binary().unwrap())
        .args(["run", "--no-reboot", "--kernel"])
        .arg(&elf)
        .args(["--append", "mode=probe", "-S", "--qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let vmm = Vmm {
        child,
        dir: dir.clone(),
    };
    let pid = vmm.child.id();
    // Only catches a vmm that never listens.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "no QMP socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Client::negotiated(&sock);
    wait_until_settled(pid);
    let status = c.cmd(json!({"execute": "query-status"}));
    assert_eq!(status["return"]["status"], "prelaunch", "{status}");

    let start = holdings(pid, &mut c);
    assert_eq!(
        (start.msi_gsis, start.intx_lines),
        (0, 0),
        "no device yet: {start:?}"
    );
    let image = image.to_str().unwrap();
    let console_out = dir.join("console.out");
    let console_out = console_out.to_str().unwrap();
    for i in 0..200u16 {
        // INTx only (vectors=0) every third cycle, else 1 to 4 MSI-X vectors.
        let vectors = |k: u16| {
            if (i + k).is_multiple_of(3) {
                0
            } else {
                1 + (i + k) % 4
            }
        };
        let (vr, vb) = (vectors(0), vectors(1));
        let mut added = vec![format!("rng{i}"), format!("blk{i}")];
        c.ok(json!({"execute": "device_add", "arguments": {
            "driver": "virtio-rng-pci", "id": added[0], "vectors": vr}}));
        c.ok(json!({"execute": "device_add", "arguments": {
            "driver": "virtio-blk-pci", "id": added[1], "file": image,
            "vectors": vb.to_string()}}));
        let mut want_msi = usize::from(vr + vb);
        if i.is_multiple_of(10) {
            let vc = vectors(2);
            added.push(format!("con{i}"));
            c.ok(json!({"execute": "device_add", "arguments": {
                "driver": "virtio-console-pci", "id": added[2], "path": console_out,
                "vectors": vc}}));
            want_msi += usize::from(vc);
        }
        let during = holdings(pid, &mut c);
        // The count really follows the devices (so that the end check means something).
        assert_eq!(
            (during.msi_gsis, during.intx_lines),
            (start.msi_gsis + want_msi, start.intx_lines + added.len()),
            "cycle {i} with its devices: {during:?}"
        );
        assert!(during.fds > start.fds, "cycle {i}: {during:?} vs {start:?}");
        // Removed in another order than added, now and then.
        if i % 2 == 1 {
            added.reverse();
        }
        for id in &added {
            c.ok(json!({"execute": "device_del", "arguments": {"id": id}}));
        }
        if i % 50 == 49 {
            let now = holdings(pid, &mut c);
            assert_eq!(now, start, "after {} cycles\n{}", i + 1, inventory(pid));
        }
    }
    let end = holdings(pid, &mut c);
    assert_eq!(end, start, "after 200 cycles\n{}", inventory(pid));
    c.ok(json!({"execute": "quit"}));
    drop(vmm);
}
