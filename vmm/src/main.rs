use clap::Parser;
use vmm::cli::{AbiCommand, Cli, Command};

fn main() {
    // Before any thread exists (see the function).
    vmm::seccomp::prepare_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => match vmm::run::run(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("vmm: {e}");
                1
            }
        },
        Command::Abi(AbiCommand::Show { record, json }) => vmm::abi::show(&record, json),
        Command::Abi(AbiCommand::Diff { old, new, json }) => {
            vmm::abi::diff_records(&old, &new, json)
        }
        Command::Qmp { socket, commands } => vmm::monitor::client::run(&socket, &commands),
    };
    std::process::exit(code);
}
