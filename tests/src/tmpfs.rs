//! A small tmpfs for full-disk tests: mounted in a fresh directory, filled on demand, unmounted
//! when dropped (also when the test panics). Mounting needs root (the tests run as root here
//! and in CI); a failed mount panics saying why.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs of a fixed size.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `kib` KiB on a new directory named after `name`.
    pub fn mount(name: &str, kib: u32) -> Tmpfs {
        let dir = std::env::temp_dir().join(format!("vmm-tmpfs-{name}-{}", std::process::id()));
        let _ = Command::new("umount").arg(&dir).output();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount(8): {e}"));
        if !out.status.success() {
            let _ = std::fs::remove_dir(&dir);
            panic!(
                "these tests need a small tmpfs (they run as root here and in CI): mount -t tmpfs on {} failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Tmpfs { dir }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Fills the filesystem: writes a filler file until the kernel says ENOSPC, then checks
    /// that a new file cannot take a single byte. Panics otherwise.
    pub fn fill(&self) {
        let filler = self.dir.join("filler");
        let mut f =
            std::fs::File::create(&filler).unwrap_or_else(|e| panic!("{}: {e}", filler.display()));
        let block = [0x5au8; 4096];
        let err = loop {
            if let Err(e) = f.write_all(&block) {
                break e;
            }
        };
        assert_eq!(
            err.raw_os_error(),
            Some(28),
            "filling {}: expected ENOSPC, got {err}",
            self.dir.display()
        );
        drop(f);
        let probe = self.dir.join("probe");
        let one = std::fs::File::create(&probe).and_then(|mut p| {
            p.write_all(b"x")?;
            p.sync_all()
        });
        let _ = std::fs::remove_file(&probe);
        assert!(one.is_err(), "{} is not full", self.dir.display());
    }

    /// The names in the mount point (to see that nothing was left behind).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily if something (a vmm of a failed test) still has files open there.
        let plain = Command::new("umount").arg(&self.dir).output();
        let done = match plain {
            Ok(o) if o.status.success() => Ok(o),
            _ => Command::new("umount").arg("-l").arg(&self.dir).output(),
        };
        match done {
            Ok(o) if o.status.success() => {
                let _ = std::fs::remove_dir(&self.dir);
            }
            Ok(o) => eprintln!(
                "umount {} failed: {}",
                self.dir.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("cannot run umount(8): {e}"),
        }
    }
}
