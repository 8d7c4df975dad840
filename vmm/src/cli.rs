//! The command line: `vmm run ...`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// A KVM virtual machine monitor with a stable guest-visible PCI ABI.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest.
    #[command(after_help = crate::device_manager::device_help())]
    Run(RunArgs),
}

/// `vmm run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Kernel: a bzImage, an ELF vmlinux, or an ELF with a Xen PVH note.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub append: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Number of vCPUs (1 to 32).
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Add a PCI device, QEMU syntax: DRIVER[,id=ID][,addr=SS[.F]][,PROP=VALUE...]
    /// (repeatable; drivers and properties are listed below).
    #[arg(long = "device", value_name = "DEVICE")]
    pub devices: Vec<String>,
}
