use clap::Parser;
use vmm::cli::{Cli, Command};

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => match vmm::machine::run(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("vmm: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}
