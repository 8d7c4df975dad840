//! A KVM virtual machine monitor whose guest-visible PCI ABI is stable and verifiable.
//!
//! Start with [`run::run`]: it builds the [`machine::Machine`] (the [`vm::Vm`], the
//! [`device_manager::DeviceManager`] with its devices, the kernel loaded by [`boot`] with the
//! tables of [`acpi`], the vCPUs of [`vcpu`]), wires the QMP [`monitor`] to it through
//! [`qmp_control`], and runs the guest.
//!
//! Modules import one way: `run` -> `machine` -> `device_manager` -> `drivers` -> the
//! `devices` and `pci` crates; `qmp_control` joins `machine` and `monitor`, and `monitor`
//! imports nothing of the machine (it owns the [`monitor::VmControl`] trait).
#![deny(missing_docs)]

pub mod abi;
pub mod acpi;
pub mod boot;
pub mod cli;
pub mod compat;
pub mod config;
pub mod console;
pub mod cpu;
pub mod device_config;
pub mod device_manager;
pub mod drivers;
pub mod layout;
pub mod machine;
pub mod machine_file;
pub mod memory;
pub mod monitor;
pub mod qmp_control;
pub mod run;
pub mod seccomp;
pub mod signals;
pub mod stats;
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
    /// Bad machine configuration or request (memory, vCPUs, run state, ...): the user's input.
    #[error("{0}")]
    Config(String),
    /// A KVM ioctl failed.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// The call and what it was for.
        what: String,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU is not in the state the VMM needs (an MSR KVM refused, a vCPU that will not stop).
    #[error("vCPU set-up: {0}")]
    Vcpu(String),
    /// Guest memory could not be written.
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// Guest memory could not be allocated or mapped.
    #[error("cannot allocate guest memory: {0}")]
    MemoryAlloc(String),
    /// A compat record or machine description could not be read or written.
    #[error("{0}")]
    Record(#[from] pci::record::RecordError),
    /// A machine file could not be read.
    #[error("{0}")]
    MachineFile(#[from] machine_file::MachineFileError),
    /// A seccomp filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccomp::Error),
    /// A device option or placement error (QEMU's wording).
    #[error("{0}")]
    Device(#[from] device_manager::DeviceError),
    /// A device could not be set up (its host resources).
    #[error("{0}")]
    DeviceManager(device_manager::DeviceManagerError),
    /// A host I/O error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// `map_err` helper: a KVM ioctl error with what it was for.
pub(crate) fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    let what = what.into();
    move |source| Error::Kvm { what, source }
}

impl From<device_manager::DeviceManagerError> for Error {
    fn from(e: device_manager::DeviceManagerError) -> Self {
        match e {
            device_manager::DeviceManagerError::Device(d) => Error::Device(d),
            other => Error::DeviceManager(other),
        }
    }
}
