//! Fuzz targets for everything a guest or a client can send the VMM, and a small
//! self-contained mutation fuzzer to drive them (no cargo-fuzz, no nightly, no instrumentation).
//!
//! Each target is a plain `fn(&[u8])` ([`TARGETS`]) that panics when an invariant breaks. The
//! invariant common to all: nothing panics, on any thread, whatever the input (the VMM must
//! never panic because of what a guest or client sent); each target adds its own checks.
//!
//! - `cargo test -p fuzz` replays the saved corpus `fuzz/corpus/<target>/` (seeds plus inputs
//!   worth keeping) and runs a bounded fuzz loop per target (a fixed number of iterations, a
//!   new seed per run unless `FUZZ_SEED` is set). A failing input is saved under
//!   `fuzz/artifacts/<target>/` and the test fails, naming the file.
//! - Longer runs: `cargo run --release -p fuzz -- TARGET [ITERATIONS] [SEED]`, or in the tests
//!   `FUZZ_ITERATIONS=N` (per target) and `FUZZ_SEED=S`.
//! - Replay one input: `cargo run --release -p fuzz -- --replay TARGET FILE`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod input;
pub mod mutate;
pub mod targets;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

pub use input::Input;
pub use mutate::{mutate, XorShift};

/// A fuzz target: panics when an invariant is broken.
pub type Target = fn(&[u8]);

/// One registered target.
pub struct TargetInfo {
    /// Name: also the corpus directory name.
    pub name: &'static str,
    /// The function.
    pub run: Target,
    /// Iterations of the bounded fuzz loop in `cargo test`.
    pub ci_iterations: u64,
    /// Largest input the mutator makes.
    pub max_len: usize,
    /// Tokens the mutator splices in.
    pub dict: &'static [&'static [u8]],
    /// What is fuzzed (one line, for the README).
    pub what: &'static str,
    /// Strings for structure-aware JSON mutation (empty: the input is not JSON).
    pub json_strings: &'static [&'static str],
    /// The input is JSON documents one per line (a stream), not one document.
    pub json_lines: bool,
}

/// Every target.
pub const TARGETS: &[TargetInfo] = &[
    TargetInfo {
        name: "config_space",
        run: targets::pci::target_config_space,
        ci_iterations: 12000,
        max_len: 512,
        dict: &[],
        what: "CF8/CFC and ECAM access sequences (all sizes, lanes, alignments) on host bridge + 4 virtio-rng + a 2-queue virtio-console; checks host bridge IDs both ways, read-only header and capability lists, BAR sizing answers, config mechanisms never displaced, no stale BAR mappings, ioeventfds only in mapped notify areas, MSI routes = MSI-X table",
        json_strings: &[],
        json_lines: false,
    },
    TargetInfo {
        name: "bar_mmio",
        run: targets::pci::target_bar_mmio,
        ci_iterations: 8000,
        max_len: 768,
        dict: &[],
        what: "after a firmware-like set-up: BAR moves (over each other, RAM, ECAM, MSI window) and decode toggles mixed with MMIO to MSI-X tables/PBA and virtio common/ISR/device/notify regions, and driver bring-ups with fuzzed rings (device workers run); same checks, worker panics caught",
        json_strings: &[],
        json_lines: false,
    },
    TargetInfo {
        name: "virtq_rng",
        run: targets::virtq::target_virtq_rng,
        ci_iterations: 6000,
        max_len: 1024,
        dict: &[],
        what: "virtio-rng worker on fuzzed split queues (chains direct/linked/indirect/looping/out of memory, bad heads and avail index, event-idx); then the same device must serve a clean request after reset",
        json_strings: &[],
        json_lines: false,
    },
    TargetInfo {
        name: "virtq_blk",
        run: targets::virtq::target_virtq_blk,
        ci_iterations: 6000,
        max_len: 1024,
        dict: &[],
        what: "virtio-blk worker on fuzzed queues and request headers (any type and sector, read-only or not, serials) over a 32 KiB image, plus device-config reads",
        json_strings: &[],
        json_lines: false,
    },
    TargetInfo {
        name: "virtq_net",
        run: targets::virtq::target_virtq_net,
        ci_iterations: 2000,
        max_len: 1024,
        dict: &[],
        what: "virtio-net worker on fuzzed receive and transmit queues over a real tap (down: transmitted frames are dropped, none arrive), device-config reads; then a clean transmit after reset (needs root and /dev/net/tun)",
        json_strings: &[],
        json_lines: false,
    },
    TargetInfo {
        name: "virtq_console",
        run: targets::virtq::target_virtq_console,
        ci_iterations: 3000,
        max_len: 1024,
        dict: &[],
        what: "virtio-console worker (file backend) on fuzzed receive and transmit queues, device-config reads; then a clean transmit after reset",
        json_strings: &[],
        json_lines: false,
    },
    TargetInfo {
        name: "acpi_hotplug",
        run: targets::acpi::target_acpi_hotplug,
        ci_iterations: 20000,
        max_len: 512,
        dict: &[],
        what: "ACPI PCI hot-plug registers (PCIU/PCID/B0EJ/PCI_RMV/BNUM) and the GED event register on a port bus: guest accesses of any size/offset mixed with plug, unplug request, GED notify and reset, against a model (reads, ejects, GED edges); racing B0EJ writers eject each slot once",
        json_strings: &[],
        json_lines: false,
    },
    TargetInfo {
        name: "device_option",
        run: targets::text::target_device_option,
        ci_iterations: 60000,
        max_len: 256,
        dict: targets::text::DEVICE_DICT,
        what: "--device parser (parse_device) with parse-print-parse round trip, then place() with hints; checks ids/addresses unique, explicit addresses kept",
        json_strings: &[],
        json_lines: false,
    },
    TargetInfo {
        name: "compat_record",
        run: targets::text::target_compat_record,
        ci_iterations: 30000,
        max_len: 8192,
        dict: targets::text::JSON_DICT,
        what: "CompatRecord::from_json, to_json round trip, diff against itself is empty",
        json_strings: targets::text::JSON_STRINGS,
        json_lines: false,
    },
    TargetInfo {
        name: "machine_file",
        run: targets::text::target_machine_file,
        ci_iterations: 60000,
        max_len: 8192,
        dict: targets::text::JSON_DICT,
        what: "MachineFile::from_json, to_json round trip, device_specs and place() of its devices",
        json_strings: targets::text::JSON_STRINGS,
        json_lines: false,
    },
    TargetInfo {
        name: "cli_options",
        run: targets::text::target_cli_options,
        ci_iterations: 40000,
        max_len: 256,
        dict: targets::text::DEVICE_DICT,
        what: "--global (Globals::parse), --qmp (parse_qmp_option), PCI address parsing (BB:DD.F with display round trip, QEMU addr= with round trip), HMP command lines",
        json_strings: &[],
        json_lines: false,
    },
    TargetInfo {
        name: "hotplug",
        run: targets::text::target_hotplug,
        ci_iterations: 4000,
        max_len: 512,
        dict: targets::text::DEVICE_DICT,
        what: "device_add/device_del sequences on a DeviceSet (cold-plug): failed adds change nothing, bus == set, every function > 0 has a multi-function function 0",
        json_strings: &[],
        json_lines: false,
    },
    TargetInfo {
        name: "qmp",
        run: targets::qmp::target_qmp,
        ci_iterations: 40000,
        max_len: 1024,
        dict: targets::qmp::QMP_DICT,
        what: "QMP byte stream: Streamer framing (random chunking), parse_message, dispatch (incl. HMP) on a stub VmControl; every reply is {return} or {error: class, desc}",
        json_strings: targets::qmp::QMP_STRINGS,
        json_lines: true,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static TargetInfo> {
    TARGETS.iter().find(|t| t.name == name)
}

static PANICS: AtomicUsize = AtomicUsize::new(0);
static HOOK: Once = Once::new();

/// Installs (once) a panic hook that counts panics on every thread (device workers too), then
/// calls the default hook.
pub fn install_panic_counter() {
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info);
        }));
    });
}

/// Runs `t` on `data`. Err: it panicked (on this thread or any other, e.g. a device worker).
pub fn run_one(t: &TargetInfo, data: &[u8]) -> Result<(), String> {
    install_panic_counter();
    let before = PANICS.load(Ordering::SeqCst);
    let r = std::panic::catch_unwind(|| (t.run)(data));
    let after = PANICS.load(Ordering::SeqCst);
    match r {
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Err(format!("{}: panicked: {msg}", t.name))
        }
        Ok(()) if after != before => Err(format!(
            "{}: a thread started by the target panicked (see the panic message above)",
            t.name
        )),
        Ok(()) => Ok(()),
    }
}

/// `fuzz/` (this crate's directory).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `fuzz/corpus/<name>/`.
pub fn corpus_dir(name: &str) -> PathBuf {
    crate_dir().join("corpus").join(name)
}

/// The corpus of `name`, sorted by file name.
pub fn load_corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(corpus_dir(name)) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_file() {
                if let Ok(b) = std::fs::read(&p) {
                    out.push((p, b));
                }
            }
        }
    }
    out.sort();
    out
}

/// A 64-bit FNV-1a hash (names artifacts).
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Saves a failing input under `fuzz/artifacts/<name>/crash-<hash>`; returns its path.
pub fn save_artifact(name: &str, data: &[u8]) -> PathBuf {
    let dir = crate_dir().join("artifacts").join(name);
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(format!("crash-{:016x}", fnv(data)));
    let _ = std::fs::write(&p, data);
    p
}

/// The seed: `FUZZ_SEED` if set, else from the clock and the pid.
pub fn seed_from_env() -> u64 {
    if let Some(s) = std::env::var("FUZZ_SEED").ok().and_then(|s| parse_u64(&s)) {
        return s;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    t ^ (u64::from(std::process::id()) << 32) | 1
}

/// Decimal or `0x` hex.
pub fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// What a fuzz run did.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Inputs run.
    pub iterations: u64,
    /// Wall time.
    pub elapsed: std::time::Duration,
}

/// A failing input found by [`fuzz`].
#[derive(Debug, Clone)]
pub struct Failure {
    /// Where it was saved.
    pub artifact: PathBuf,
    /// What broke.
    pub message: String,
    /// The seed of the run.
    pub seed: u64,
}

/// Runs `iterations` mutated inputs through `t`, starting from its corpus. Stops at the first
/// failure, saved under `fuzz/artifacts/`.
pub fn fuzz(t: &TargetInfo, iterations: u64, seed: u64) -> Result<Stats, Failure> {
    let start = std::time::Instant::now();
    let mut rng = XorShift::new(seed);
    let mut pool: Vec<Vec<u8>> = load_corpus(t.name).into_iter().map(|(_, b)| b).collect();
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let corpus_len = pool.len();
    for i in 0..iterations {
        let base = &pool[rng.below(pool.len() as u64) as usize];
        let mut data = base.clone();
        let structured = !t.json_strings.is_empty() && rng.below(4) != 0 && {
            if t.json_lines {
                mutate::mutate_json_lines(&mut data, &mut rng, t.json_strings)
            } else {
                mutate::mutate_json(&mut data, &mut rng, t.json_strings)
            }
        };
        if !structured {
            mutate(&mut data, &mut rng, &pool, t.dict, t.max_len);
        }
        if let Err(message) = run_one(t, &data) {
            let artifact = save_artifact(t.name, &data);
            return Err(Failure {
                artifact,
                message,
                seed,
            });
        }
        // Keep some mutants as new starting points (no coverage feedback: a random walk that
        // lets inputs drift away from the seeds), bounded.
        // JSON targets keep only mutants that are still JSON (the rest fail at the parser).
        let keep =
            t.json_strings.is_empty() || serde_json::from_slice::<serde_json::Value>(&data).is_ok();
        if keep && rng.below(16) == 0 {
            if pool.len() < corpus_len + 256 {
                pool.push(data);
            } else {
                let j = corpus_len + rng.below(256) as usize;
                pool[j] = data;
            }
        }
        let _ = i;
    }
    Ok(Stats {
        iterations,
        elapsed: start.elapsed(),
    })
}

/// Iterations for the bounded loop in tests: `FUZZ_ITERATIONS` or the target's CI budget.
pub fn iterations_for(t: &TargetInfo) -> u64 {
    std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|s| parse_u64(&s))
        .unwrap_or(t.ci_iterations)
}

/// Whether `p` is inside the corpus of `name` (for messages).
pub fn in_corpus(name: &str, p: &Path) -> bool {
    p.starts_with(corpus_dir(name))
}

/// `fuzz/libfuzzer/`: the cargo-fuzz crate with one libFuzzer entry per target.
pub fn libfuzzer_dir() -> PathBuf {
    crate_dir().join("libfuzzer")
}

/// `fuzz/libfuzzer/dicts/<name>.dict`: the target's libFuzzer dictionary (`-dict=`), if it has
/// tokens.
pub fn libfuzzer_dict_path(name: &str) -> PathBuf {
    libfuzzer_dir().join("dicts").join(format!("{name}.dict"))
}

/// The libFuzzer dictionary of `t`: its mutation tokens, then its JSON strings as quoted JSON
/// strings, one `"..."` entry a line (bytes outside printable ASCII, `"` and `\` as `\xNN`).
/// None when it has neither.
pub fn libfuzzer_dict(t: &TargetInfo) -> Option<String> {
    if t.dict.is_empty() && t.json_strings.is_empty() {
        return None;
    }
    let mut tokens: Vec<Vec<u8>> = t.dict.iter().map(|d| d.to_vec()).collect();
    for s in t.json_strings {
        let quoted = serde_json::to_vec(s).expect("a string serializes");
        if !tokens.contains(&quoted) {
            tokens.push(quoted);
        }
    }
    let mut out = format!(
        "# libFuzzer dictionary of `{}`, generated from fuzz::TARGETS: cargo run -p fuzz -- libfuzzer-dicts\n",
        t.name
    );
    for tok in tokens {
        out.push('"');
        for b in tok {
            match b {
                b'"' | b'\\' => out.push_str(&format!("\\x{b:02x}")),
                0x20..=0x7e => out.push(char::from(b)),
                _ => out.push_str(&format!("\\x{b:02x}")),
            }
        }
        out.push_str("\"\n");
    }
    Some(out)
}
