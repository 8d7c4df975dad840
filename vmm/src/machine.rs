//! One machine from command line to running vCPUs.
//!
//! [`run`]: validate the configuration, create the VM, put the legacy devices on the buses,
//! load the kernel and describe the machine to it, start one thread per vCPU, then wait on the
//! console input and the stop signal.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use devices::bus::Bus;
use devices::legacy::{
    AcpiPm, PowerCallback, PowerEvent, Serial, ACPI_PM_PORT, ACPI_PM_PORT_LEN, I8042,
    I8042_COMMAND_PORT, I8042_DATA_PORT, SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_LEN,
};
use devices::pci_host::{BarMapper, ConfigPorts, Ecam};
use pci::PciRoot;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, Entry};
use crate::cli::RunArgs;
use crate::layout::*;
use crate::stop::{Stop, StopReason};
use crate::vcpu::Vcpu;
use crate::vm::Vm;
use crate::{acpi, cpu, device_manager, Error};

/// Smallest guest memory we accept, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest vCPU count.
pub const MAX_CPUS: u8 = 32;

/// The validated machine configuration.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// RAM in bytes.
    pub mem_size: u64,
    /// vCPU count.
    pub cpus: u8,
}

impl MachineConfig {
    /// Checks the sizes given on the command line.
    pub fn from_args(args: &RunArgs) -> Result<Self, Error> {
        if args.memory < MIN_MEMORY_MIB {
            return Err(Error::Config(format!(
                "invalid memory size {} MiB: at least {MIN_MEMORY_MIB} MiB is needed",
                args.memory
            )));
        }
        if args.memory > (1 << 20) {
            return Err(Error::Config(format!(
                "invalid memory size {} MiB: at most 1 TiB",
                args.memory
            )));
        }
        if args.cpus == 0 || args.cpus > MAX_CPUS {
            return Err(Error::Config(format!(
                "invalid number of CPUs {}: between 1 and {MAX_CPUS}",
                args.cpus
            )));
        }
        Ok(MachineConfig {
            mem_size: args.memory << 20,
            cpus: args.cpus,
        })
    }
}

/// Boots the guest described by `args` and runs it to the end. Returns the exit status.
pub fn run(args: &RunArgs) -> Result<i32, Error> {
    let config = MachineConfig::from_args(args)?;
    let specs = args
        .devices
        .iter()
        .map(|d| device_manager::parse_device(d))
        .collect::<Result<Vec<_>, _>>()?;
    let placed = device_manager::place(&specs, &Default::default())?;
    // Check the files before the (comparatively slow) VM creation, so bad input fails fast.
    let initrd = match &args.initrd {
        Some(p) => Some(std::fs::read(p).map_err(|e| Error::Initrd {
            path: p.display().to_string(),
            reason: e.to_string(),
        })?),
        None => None,
    };
    File::open(&args.kernel).map_err(|e| Error::Kernel {
        path: args.kernel.display().to_string(),
        reason: e.to_string(),
    })?;

    let stop = Arc::new(Stop::new()?);
    block_stop_signals(&stop)?;
    let vm = Arc::new(Vm::new(config.mem_size)?);
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());

    let power: PowerCallback = {
        let stop = stop.clone();
        Arc::new(move |e| {
            stop.stop(match e {
                PowerEvent::Reset => StopReason::Reset("guest reset"),
                PowerEvent::PowerOff => StopReason::PowerOff("ACPI S5"),
            })
        })
    };
    let serial_irq = EventFd::new(0)?;
    vm.fd
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|e| Error::Kvm(format!("irqfd for the serial port: {e}")))?;
    let serial = Arc::new(Serial::new(serial_irq, Box::new(std::io::stdout())));
    let i8042 = Arc::new(I8042::new(power.clone()));
    let bus_err = |e| Error::Config(format!("port bus: {e}"));
    pio.insert(SERIAL_PORT, SERIAL_PORT_LEN, serial.clone())
        .map_err(bus_err)?;
    pio.insert(I8042_DATA_PORT, 1, i8042.clone())
        .map_err(bus_err)?;
    pio.insert(I8042_COMMAND_PORT, 1, i8042).map_err(bus_err)?;
    pio.insert(ACPI_PM_PORT, ACPI_PM_PORT_LEN, Arc::new(AcpiPm::new(power)))
        .map_err(bus_err)?;

    let root = Arc::new(PciRoot::new());
    let mapper = Arc::new(BarMapper::new(root.clone(), &pio, &mmio));
    pio.insert(
        PCI_CONFIG_PORT,
        PCI_CONFIG_PORT_LEN,
        Arc::new(ConfigPorts::new(root.clone(), mapper.clone())),
    )
    .map_err(bus_err)?;
    mmio.insert(
        ECAM_START,
        ECAM_SIZE,
        Arc::new(Ecam::new(root.clone(), mapper.clone())),
    )
    .map_err(|e| Error::Config(format!("MMIO bus: {e}")))?;
    let realized = device_manager::realize(&placed, &root, &vm.mem, vm.clone())?;
    for r in &realized {
        tracing::info!(
            "{} {} at {}",
            r.placed.spec.driver,
            r.placed.id,
            r.placed.addr
        );
    }

    let kernel = boot::load_kernel(&vm.mem, &args.kernel)?;
    boot::write_cmdline(&vm.mem, &args.append)?;
    boot::write_reset_vector(&vm.mem)?;
    let initrd = match initrd {
        Some(bytes) => {
            let max = kernel.header.map_or(0x7fff_ffff, |h| {
                u64::from(h.initrd_addr_max).max(0x37ff_ffff)
            });
            let addr = boot::initrd_address(config.mem_size, bytes.len() as u64, kernel.end, max)?;
            vm.mem.write_slice(&bytes, GuestAddress(addr))?;
            Some((addr, bytes.len() as u64))
        }
        None => None,
    };
    let rsdp = acpi::write_tables(&vm.mem, config.cpus)?;
    let e820 = boot::e820_map(config.mem_size);
    match kernel.entry {
        Entry::Linux64 { .. } => {
            let params = boot::zero_page(kernel.header, args.append.len() + 1, initrd, &e820, rsdp);
            vm.mem.write_obj(params, GuestAddress(ZERO_PAGE))?;
        }
        Entry::Pvh { .. } => boot::write_pvh_info(&vm.mem, initrd, &e820, rsdp)?,
    }

    let supported = vm
        .kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        let fd = vm
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::Kvm(format!("KVM_CREATE_VCPU {id}: {e}")))?;
        let mut cpuid = supported.clone();
        cpu::filter_cpuid(&mut cpuid, id, config.cpus);
        fd.set_cpuid2(&cpuid)
            .map_err(|e| Error::Vcpu(format!("KVM_SET_CPUID2: {e}")))?;
        cpu::set_msrs(&fd)?;
        cpu::set_fpu(&fd)?;
        cpu::set_lint(&fd)?;
        if id == 0 {
            cpu::set_boot_registers(&fd, &vm.mem, kernel.entry)?;
        }
        vcpus.push(Vcpu {
            fd,
            id,
            pio: pio.clone(),
            mmio: mmio.clone(),
            mem: vm.mem.clone(),
            stop: stop.clone(),
        });
    }
    for v in vcpus {
        let name = format!("vcpu{}", v.id);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || v.run())?;
    }
    let reason = console_loop(&serial, &stop)?;
    let _ = std::io::stdout().flush();
    match &reason {
        StopReason::Error(msg) => eprintln!("vmm: {msg}"),
        other => tracing::info!("guest stopped: {other:?}"),
    }
    // The vCPU threads may be inside KVM_RUN; the process exit ends them.
    Ok(reason.exit_code())
}

/// Forwards stdin to the UART until the VM stops.
fn console_loop(serial: &Serial, stop: &Stop) -> Result<StopReason, Error> {
    const STOP: u64 = 0;
    const STDIN: u64 = 1;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        stop.event().as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP),
    )?;
    let stdin = std::io::stdin();
    let mut stdin_open = epoll
        .ctl(
            ControlOperation::Add,
            stdin.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STDIN),
        )
        .is_ok();
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        if let Some(reason) = stop.reason() {
            return Ok(reason);
        }
        // With the UART's FIFO full, poll again shortly instead of reading more.
        let room = serial.input_room();
        let timeout = if stdin_open && room == 0 { 10 } else { -1 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            if ev.data() == STDIN && room > 0 {
                let mut buf = [0u8; 64];
                let want = room.min(buf.len());
                match stdin.lock().read(&mut buf[..want]) {
                    Ok(0) | Err(_) => {
                        let _ = epoll.ctl(
                            ControlOperation::Delete,
                            stdin.as_raw_fd(),
                            EpollEvent::default(),
                        );
                        stdin_open = false;
                    }
                    Ok(k) => {
                        serial.enqueue_input(&buf[..k]);
                    }
                }
            }
        }
    }
}

/// Blocks SIGINT and SIGTERM in every thread and turns them into a clean stop.
fn block_stop_signals(stop: &Arc<Stop>) -> Result<(), Error> {
    // SAFETY: sigset_t is plain data; the libc calls only read and write the local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let stop = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` is a valid, initialised signal set and `sig` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                stop.stop(StopReason::Signal(sig));
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(memory: u64, cpus: u8) -> RunArgs {
        RunArgs {
            kernel: "k".into(),
            initrd: None,
            append: String::new(),
            memory,
            cpus,
            devices: vec![],
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
        assert_eq!(c.mem_size, 256 << 20);
    }
}
