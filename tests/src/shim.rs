//! LD_PRELOAD shims that slow a system call down, so a test can act at the worst moment
//! without any test hook in the vmm itself (sources in `tests/shim/`).

use std::path::PathBuf;
use std::process::Command;

use crate::ground::repo_root;

/// Builds (once per test process) `tests/shim/slow_rename.c` into a shared object and returns
/// its path. With it in `LD_PRELOAD`, `rename(2)` first sleeps `SLOW_RENAME_MS` milliseconds.
pub fn slow_rename() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = repo_root().join("target/shim");
            std::fs::create_dir_all(&dir).expect("create target/shim");
            let so = dir.join(format!("slow_rename-{}.so", std::process::id()));
            let src = repo_root().join("tests/shim/slow_rename.c");
            let out = Command::new("gcc")
                .args(["-shared", "-fPIC", "-O2", "-o"])
                .arg(&so)
                .arg(&src)
                .arg("-ldl")
                .output()
                .expect("gcc (install gcc: resources/test.sh does)");
            assert!(
                out.status.success(),
                "building {}: {}",
                src.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            so
        })
        .clone()
}
