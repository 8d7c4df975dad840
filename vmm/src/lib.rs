//! A KVM virtual machine monitor whose guest-visible PCI ABI is stable and verifiable.
//!
//! Start with [`machine::run`]: it builds the [`vm::Vm`], the devices, loads the kernel
//! ([`boot`]), describes the machine ([`acpi`]) and runs the vCPUs ([`vcpu`]).
#![deny(missing_docs)]

pub mod abi;
pub mod acpi;
pub mod boot;
pub mod cli;
pub mod compat;
pub mod cpu;
pub mod device_config;
pub mod device_manager;
pub mod drivers;
pub mod layout;
pub mod machine;
pub mod machine_file;
pub mod monitor;
pub mod seccomp;
pub mod stop;
pub mod vcpu;
pub mod vm;

/// Errors of the monitor. Each message is meant for the user as it stands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel could not be loaded.
    #[error("cannot load kernel '{path}': {reason}")]
    Kernel {
        /// The path given.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The initrd could not be read.
    #[error("cannot load initrd '{path}': {reason}")]
    Initrd {
        /// The path given.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The initrd does not fit.
    #[error("initrd of {size} bytes does not fit in {mem} bytes of guest memory")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// Guest memory size.
        mem: u64,
    },
    /// Bad kernel command line.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Bad machine configuration (memory, vCPUs, ...).
    #[error("{0}")]
    Config(String),
    /// A KVM ioctl failed.
    #[error("KVM: {0}")]
    Kvm(String),
    /// A vCPU set-up step failed.
    #[error("vCPU set-up: {0}")]
    Vcpu(String),
    /// Guest memory could not be set up or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A device option or placement error (QEMU's wording).
    #[error("{0}")]
    Device(#[from] device_manager::DeviceError),
    /// A host I/O error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<vm_memory::GuestMemoryError> for Error {
    fn from(e: vm_memory::GuestMemoryError) -> Self {
        Error::Memory(e.to_string())
    }
}
