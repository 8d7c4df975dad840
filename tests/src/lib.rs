//! End-to-end test helpers: the probe guest on the local KVM, real Linux on the test ground.
#![forbid(unsafe_code)]

pub mod ground;
pub mod probe;
pub mod qmp;
pub mod shim;
pub mod tmpfs;

/// A fresh, empty directory for one test: `$TMPDIR/vmm-NAME-PID` (whatever a previous run of
/// the same test left there is removed first).
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}
