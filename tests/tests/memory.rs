//! Guest RAM backing on the host (issue 14: "an option for hugetlbfs/prefault"): QEMU's
//! `--mem-path DIR` and `--mem-prealloc`. Not guest-visible; what is checked is what the host
//! sees: the RAM is an unlinked file in DIR (huge pages on hugetlbfs, reserved at start),
//! allocated before the guest runs, given back at every reboot, and refused clearly when the
//! host is short of it.

use std::io::{BufRead, BufReader};
use std::process::Command;

use integration_tests::ground::{guest_boot, host_script, run_host_scenario, section};
use integration_tests::probe::{probe_elf, require_kvm, spawn_rebooting_probe, vmm};

/// The probe guest rebooting in place with RAM in a tmpfs directory, preallocated, under the
/// default seccomp filters (the main thread maps the file again at every reboot): at each boot
/// the vmm holds one such mapping, all of it resident, and the directory stays empty.
#[test]
fn mem_path_prealloc_ram_is_a_resident_unlinked_file_at_every_reboot() {
    let dir = std::path::PathBuf::from(format!("/dev/shm/vmm-mem-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = spawn_rebooting_probe(&[
        "--memory",
        "64",
        "--mem-prealloc",
        "--mem-path",
        dir.to_str().unwrap(),
    ]);
    let pid = child.id();
    let console = BufReader::new(child.stdout.take().unwrap());
    let mut boots = 0;
    let mut seen = Vec::new();
    for line in console.lines() {
        let Ok(line) = line else { break };
        if !line.contains("Hello from the probe guest") {
            continue;
        }
        boots += 1;
        // The RAM mappings from the directory, with their resident KiB.
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        let mut ram = Vec::new();
        let mut lines = smaps.lines();
        while let Some(l) = lines.next() {
            if l.contains(dir.to_str().unwrap()) {
                let rss: u64 = lines
                    .by_ref()
                    .find_map(|l| l.strip_prefix("Rss:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap_or(0);
                ram.push((l.to_string(), rss));
            }
        }
        seen.push(ram);
        if boots == 6 {
            break;
        }
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(
        boots, 6,
        "the guest stopped rebooting after {boots} boots: {stderr}"
    );
    assert!(status.success(), "vmm after SIGTERM: {status}: {stderr}");
    for (i, ram) in seen.iter().enumerate() {
        // One live mapping of 64 MiB (a reboot in flight may still hold the previous one).
        assert!(!ram.is_empty() && ram.len() <= 2, "boot {i}: {ram:#?}");
        let (header, rss) = ram.last().unwrap();
        assert!(header.ends_with("(deleted)"), "boot {i}: {header}");
        assert_eq!(*rss, 64 << 10, "boot {i}: {header}: not all resident");
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "files left in {}",
        dir.display()
    );
    std::fs::remove_dir(&dir).unwrap();
}

#[test]
fn a_missing_mem_path_is_a_clear_error() {
    require_kvm();
    let elf = probe_elf();
    let out = vmm(
        &[
            "run",
            "--no-reboot",
            "--kernel",
            elf.to_str().unwrap(),
            "--mem-path",
            "/nonexistent/hugepages",
        ],
        30,
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "vmm: cannot allocate guest memory: can't open backing store /nonexistent/hugepages for \
         guest RAM: No such file or directory (os error 2)"
    );
}

/// Real Linux on hugetlbfs: with too few huge pages the vmm refuses to start (the pages are
/// reserved when the RAM is mapped, not found missing later); with enough, the guest boots to
/// its lspci while its 256 MiB take 128 huge pages of the host, and gives them back at exit.
#[test]
fn linux_boots_on_hugetlbfs_and_a_short_host_refuses_to_start() {
    let args = "--mem-path /dev/hugepages --mem-prealloc --device virtio-rng-pci,id=r,addr=04.0";
    let free = "sed -n 's/^HugePages_Free: *//p' /proc/meminfo";
    let script = host_script(&[
        "mkdir -p /dev/hugepages && mount -t hugetlbfs none /dev/hugepages || exit 91\n\
         echo 64 > /proc/sys/vm/nr_hugepages\n"
            .to_string(),
        guest_boot("SHORT", args, Some("lspci -n")),
        format!(
            "echo 160 > /proc/sys/vm/nr_hugepages\n\
             echo \"=== BEFORE-BEGIN ===\"; {free}; echo \"=== BEFORE-END ===\"\n\
             (while :; do {free}; sleep 0.5; done > \"$TMPDIR/free.log\") & sampler=$!\n"
        ),
        guest_boot("HUGE", args, Some("lspci -n")),
        format!(
            "kill $sampler\n\
             echo \"=== LOWEST-BEGIN ===\"; sort -n \"$TMPDIR/free.log\" | head -n1; echo \"=== LOWEST-END ===\"\n\
             echo \"=== AFTER-BEGIN ===\"; {free}; echo \"=== AFTER-END ===\"\n"
        ),
    ]);
    let out = run_host_scenario(&script).unwrap_or_else(|e| panic!("test ground: {e}"));
    let n = |name: &str| -> u64 {
        section(&out.stdout, name)
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} count:\n{}", out.stdout))
    };
    assert!(
        out.stdout.contains("=== BOOT-SHORT-END rc=1 ==="),
        "64 huge pages for 256 MiB:\n{}",
        out.stdout
    );
    let short = section(&out.stdout, "BOOT-SHORT").unwrap();
    assert!(
        short.contains("vmm: cannot allocate guest memory: mmap of 268435456 bytes of the backing file: Cannot allocate memory"),
        "{short}"
    );
    assert!(
        out.stdout.contains("=== BOOT-HUGE-END rc=0 ==="),
        "{}",
        out.stdout
    );
    let huge = section(&out.stdout, "BOOT-HUGE").unwrap();
    assert!(huge.contains("00:04.0 00ff: 1af4:1044"), "{huge}");
    assert_eq!(n("BEFORE"), 160);
    assert!(
        n("LOWEST") <= 160 - 128,
        "huge pages free while the guest ran: {}",
        n("LOWEST")
    );
    assert_eq!(n("AFTER"), 160, "huge pages given back");
}
