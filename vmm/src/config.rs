//! The machine's configuration: the command line over the machine file, checked once.

use std::path::PathBuf;

use crate::cli::RunArgs;
use crate::compat::AskedProps;
use crate::device_manager::{self, DeviceSpec};
use crate::machine_file::{merge_devices, MachineFile};
use crate::Error;

/// Smallest guest memory we accept, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest vCPU count.
pub const MAX_CPUS: u8 = 32;
/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// The validated machine configuration (command line over machine file).
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// How RAM is backed on the host (`--mem-path`, `--mem-prealloc`; not guest-visible).
    pub ram: crate::memory::RamBacking,
    /// vCPU count.
    pub cpus: u8,
    /// Devices, as specs (machine file devices merged with `--device`).
    pub devices: Vec<DeviceSpec>,
    /// The guest-visible machine properties as the command line (over the machine file) asks
    /// for them; each `None` resolves to what the compat record says, else the new machine's
    /// ([`crate::compat::MachineProps::resolve`]).
    pub props: AskedProps,
}

impl MachineConfig {
    /// Resolves and checks the configuration.
    pub fn from_args(args: &RunArgs) -> Result<Self, Error> {
        let file = match &args.machine_file {
            Some(p) => MachineFile::load(p)?,
            None => MachineFile::new(),
        };
        let file_devices = file.device_specs().map_err(Error::Config)?;
        let cli_devices = args
            .devices
            .iter()
            .map(|d| device_manager::parse_device(d))
            .collect::<Result<Vec<_>, _>>()?;
        let kernel = args.kernel.clone().or(file.kernel).ok_or_else(|| {
            Error::Config("no kernel: give --kernel or a machine file that names one".into())
        })?;
        let memory_mib = args
            .memory
            .or(file.memory_mib)
            .unwrap_or(DEFAULT_MEMORY_MIB);
        let cpus = args.cpus.or(file.cpus).unwrap_or(1);
        if memory_mib < MIN_MEMORY_MIB {
            return Err(Error::Config(format!(
                "invalid memory size {memory_mib} MiB: at least {MIN_MEMORY_MIB} MiB is needed"
            )));
        }
        if memory_mib > (1 << 20) {
            return Err(Error::Config(format!(
                "invalid memory size {memory_mib} MiB: at most 1 TiB"
            )));
        }
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(Error::Config(format!(
                "invalid number of CPUs {cpus}: between 1 and {MAX_CPUS}"
            )));
        }
        Ok(MachineConfig {
            kernel,
            initrd: args.initrd.clone().or(file.initrd),
            cmdline: args.append.clone().or(file.cmdline).unwrap_or_default(),
            memory_mib,
            ram: crate::memory::RamBacking {
                mem_path: args.mem_path.clone(),
                prealloc: args.mem_prealloc,
            },
            cpus,
            props: AskedProps {
                pci_hotplug: args.hotplug.or(file.pci_hotplug),
                pci_hotplug_bridges: args.hotplug_bridges.or(file.pci_hotplug_bridges),
                extended_config: file.extended_config,
                mmio64: file.mmio64_window,
                pci_config_ports: args.pci_config_ports.or(file.pci_config_ports),
            },
            devices: merge_devices(&file_devices, cli_devices),
        })
    }

    /// RAM in bytes.
    pub fn mem_size(&self) -> u64 {
        self.memory_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(memory: u64, cpus: u8) -> RunArgs {
        RunArgs {
            kernel: Some("k".into()),
            memory: Some(memory),
            cpus: Some(cpus),
            ..Default::default()
        }
    }

    #[test]
    fn sizes_are_validated() {
        assert!(MachineConfig::from_args(&args(0, 1))
            .unwrap_err()
            .to_string()
            .contains("invalid memory size 0 MiB"));
        assert!(MachineConfig::from_args(&args(256, 0)).is_err());
        assert!(MachineConfig::from_args(&args(256, 33)).is_err());
        let c = MachineConfig::from_args(&args(256, 8)).unwrap();
        assert_eq!(c.mem_size(), 256 << 20);
        assert!(MachineConfig::from_args(&RunArgs::default())
            .unwrap_err()
            .to_string()
            .contains("no kernel"));
    }
}
