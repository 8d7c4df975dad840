//! Longer fuzz runs and replays:
//!
//! ```text
//! cargo run --release -p fuzz -- list
//! cargo run --release -p fuzz -- TARGET|all [ITERATIONS] [SEED]
//! cargo run --release -p fuzz -- --replay TARGET FILE...
//! cargo run -p fuzz -- libfuzzer-dicts   # writes fuzz/libfuzzer/dicts/ from TARGETS
//! ```
//!
//! A failing input is saved under `fuzz/artifacts/TARGET/`; copy it into `fuzz/corpus/TARGET/`
//! once fixed so the corpus test keeps it fixed.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("-h" | "--help") => {
            eprintln!(
                "usage: fuzz list | fuzz TARGET|all [ITERATIONS] [SEED] | fuzz --replay TARGET FILE... | fuzz libfuzzer-dicts"
            );
            ExitCode::from(2)
        }
        Some("list") => {
            for t in fuzz::TARGETS {
                println!(
                    "{:14} {:>6} iterations in CI: {}",
                    t.name, t.ci_iterations, t.what
                );
            }
            ExitCode::SUCCESS
        }
        Some("libfuzzer-dicts") => {
            for t in fuzz::TARGETS {
                let p = fuzz::libfuzzer_dict_path(t.name);
                let r = match fuzz::libfuzzer_dict(t) {
                    Some(d) => std::fs::create_dir_all(p.parent().expect("a parent"))
                        .and_then(|()| std::fs::write(&p, d)),
                    None => std::fs::remove_file(&p).or_else(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => Ok(()),
                        _ => Err(e),
                    }),
                };
                if let Err(e) = r {
                    eprintln!("{}: {e}", p.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Some("--replay") => {
            let Some(t) = args.get(1).and_then(|n| fuzz::target(n)) else {
                eprintln!("unknown target");
                return ExitCode::from(2);
            };
            let mut failed = false;
            for f in &args[2..] {
                let data = match std::fs::read(f) {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("{f}: {e}");
                        failed = true;
                        continue;
                    }
                };
                match fuzz::run_one(t, &data) {
                    Ok(()) => println!("{f}: ok"),
                    Err(e) => {
                        println!("{f}: FAILED: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Some(name) => {
            let targets: Vec<&fuzz::TargetInfo> = if name == "all" {
                fuzz::TARGETS.iter().collect()
            } else {
                match fuzz::target(name) {
                    Some(t) => vec![t],
                    None => {
                        eprintln!("unknown target {name}; try `list`");
                        return ExitCode::from(2);
                    }
                }
            };
            let iterations = args.get(1).and_then(|s| fuzz::parse_u64(s));
            let seed = args
                .get(2)
                .and_then(|s| fuzz::parse_u64(s))
                .unwrap_or_else(fuzz::seed_from_env);
            let mut code = ExitCode::SUCCESS;
            for t in targets {
                let n = iterations.unwrap_or(t.ci_iterations * 100);
                eprintln!("{}: {n} iterations, seed {seed:#x}", t.name);
                match fuzz::fuzz(t, n, seed) {
                    Ok(s) => eprintln!(
                        "{}: ok, {} inputs in {:.1} s",
                        t.name,
                        s.iterations,
                        s.elapsed.as_secs_f64()
                    ),
                    Err(f) => {
                        eprintln!(
                            "{}: FAILED: {}\n  input saved as {}",
                            t.name,
                            f.message,
                            f.artifact.display()
                        );
                        code = ExitCode::FAILURE;
                    }
                }
            }
            code
        }
    }
}
