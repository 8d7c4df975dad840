//! The command line: `vmm run ...` and `vmm abi ...`.

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
    Run(Box<RunArgs>),
    /// Show or compare compat records.
    #[command(subcommand)]
    Abi(AbiCommand),
    /// A minimal QMP client: negotiate, send each COMMAND (a JSON object, or a bare command
    /// name), print the replies as JSON lines. Exit 1 if a command failed.
    Qmp {
        /// The monitor's unix socket.
        socket: PathBuf,
        /// Commands, in order.
        commands: Vec<String>,
    },
}

/// `vmm abi ...`.
#[derive(Subcommand, Debug)]
pub enum AbiCommand {
    /// Show a record: an `lspci -n`-like view plus each device's fingerprint.
    Show {
        /// The record.
        record: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare two records. Exit 0 when no device present in both changed, 1 when one did,
    /// 2 on error.
    Diff {
        /// The old record.
        old: PathBuf,
        /// The new record.
        new: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `vmm run`.
#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Kernel: a bzImage, an ELF vmlinux, or an ELF with a Xen PVH note (required unless the
    /// machine file names one).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    pub append: Option<String>,
    /// Guest memory in MiB (default 256).
    #[arg(long)]
    pub memory: Option<u64>,
    /// Back guest RAM with a file in this directory (QEMU's -mem-path): on hugetlbfs, huge
    /// pages reserved at start (the size must be a multiple of their size).
    #[arg(long, value_name = "DIR")]
    pub mem_path: Option<PathBuf>,
    /// Allocate all guest RAM before the guest runs (QEMU's -mem-prealloc).
    #[arg(long)]
    pub mem_prealloc: bool,
    /// Number of vCPUs, 1 to 32 (default 1).
    #[arg(long)]
    pub cpus: Option<u8>,
    /// Add a PCI device, QEMU syntax: DRIVER[,id=ID][,addr=SS[.F]][,PROP=VALUE...]
    /// (repeatable; drivers and properties are listed below).
    #[arg(long = "device", value_name = "DEVICE")]
    pub devices: Vec<String>,
    /// Change a property's default for every device of a driver: DRIVER.PROP=VALUE
    /// (repeatable). Devices listed in the compat record keep their recorded value.
    #[arg(long = "global", value_name = "DRIVER.PROP=VALUE")]
    pub globals: Vec<String>,
    /// Compat record: read as hints when it exists (recorded addresses and ABI properties),
    /// rewritten atomically for the machine that starts.
    #[arg(long, value_name = "PATH")]
    pub compat: Option<PathBuf>,
    /// Refuse to start when a device in the compat record would change address or fingerprint.
    #[arg(long, requires = "compat")]
    pub compat_strict: bool,
    /// Start the machine described by this JSON file; other options add to or override it.
    #[arg(long, value_name = "PATH")]
    pub machine_file: Option<PathBuf>,
    /// Write the fully resolved description of the machine that starts.
    #[arg(long, value_name = "PATH")]
    pub dump_machine: Option<PathBuf>,
    /// QMP monitor: unix:PATH[,server=on,wait=off].
    #[arg(long, value_name = "unix:PATH")]
    pub qmp: Option<String>,
    /// Start paused: devices are realized, vCPUs wait for the QMP command `cont`.
    #[arg(short = 'S')]
    pub paused: bool,
    /// ACPI PCI hot-plug on bus 0 (QMP device_add/device_del while the guest runs). It is
    /// guest-visible ABI: default on for a new machine, and what the compat record says for an
    /// existing one (off for a record written before hot-plug existed).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub hotplug: Option<bool>,
    /// ACPI PCI hot-plug behind PCI bridges too (QEMU's acpi-pci-hotplug-with-bridge-support:
    /// device_add/device_del with bus=BRIDGE). Guest-visible ABI (slot objects behind the
    /// bridges): default on for a new machine with hot-plug, what the compat record says for
    /// an existing one (off for a record written before it existed).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub hotplug_bridges: Option<bool>,
    /// The PCI type-1 config ports 0xcf8-0xcff. Off, the guest reaches config space through
    /// ECAM alone (as on QEMU's microvm): one exit per config access instead of two. Linux
    /// then logs "PCI: Fatal: No config space access function found" early in boot, as on
    /// microvm, and takes the ECAM window from ACPI (MCFG) a moment later.
    /// Guest-visible ABI: default on for a new machine, what the compat record says for an
    /// existing one (on for a record written before it existed).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub pci_config_ports: Option<bool>,
    /// A guest reset ends the process with status 0 instead of restarting the guest in place
    /// (QEMU's `-no-reboot`).
    #[arg(long)]
    pub no_reboot: bool,
    /// seccomp filters on every thread (vCPUs, devices, main, QMP, signals, hot-plug): `kill` (a forbidden syscall kills the
    /// process), `log` (allowed, logged by the kernel), `off`.
    #[arg(long, value_enum, default_value_t = SeccompLevel::Kill)]
    pub seccomp: SeccompLevel,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("'{s}': expected 'on' or 'off'")),
    }
}

/// `--seccomp`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SeccompLevel {
    /// A forbidden syscall kills the process.
    #[default]
    Kill,
    /// Forbidden syscalls are allowed and logged.
    Log,
    /// No filters.
    Off,
}
