//! One machine from command line to running vCPUs.
//!
//! [`run`]: resolve the configuration (command line over machine file), read the compat record,
//! build the [`Machine`] (VM, buses, legacy devices, PCI devices placed with the record's hints,
//! kernel loaded, vCPUs created), then [`Machine::start`] it (strict check, record and machine
//! dump written, vCPU threads started) unless `-S` leaves that to QMP's `cont`, and wait on the
//! console and the stop signal.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::legacy::{
    AcpiPm, PowerCallback, PowerEvent, Rtc, Serial, ACPI_PM_PORT, ACPI_PM_PORT_LEN, I8042,
    I8042_COMMAND_PORT, I8042_DATA_PORT, RTC_PORT, RTC_PORT_LEN, SERIAL_IRQ, SERIAL_PORT,
    SERIAL_PORT_LEN,
};
use devices::pci_host::{BarMapper, ConfigPorts, Ecam};
use pci::record::CompatRecord;
use pci::PciRoot;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, Entry};
use crate::cli::RunArgs;
use crate::compat::{self, Globals};
use crate::device_manager::{self, DeviceSet, DeviceSpec};
use crate::layout::*;
use crate::machine_file::{merge_devices, DeviceEntry, MachineFile};
use crate::monitor::backend::MachineControl;
use crate::monitor::{parse_qmp_option, QmpServer, RunState};
use crate::stop::{Stop, StopReason};
use crate::vcpu::{install_kick_handler, RunGate, Vcpu};
use crate::vm::Vm;
use crate::{acpi, cpu, Error};

/// Smallest guest memory we accept, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest vCPU count.
pub const MAX_CPUS: u8 = 32;
/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Test-only switch: milliseconds to sleep between writing the compat record's temporary file
/// and renaming it into place (lets a test kill the VMM at the worst moment).
pub const RECORD_PAUSE_ENV: &str = "VMM_TEST_RECORD_WRITE_PAUSE_MS";

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
    /// vCPU count.
    pub cpus: u8,
    /// Devices, as specs (machine file devices merged with `--device`).
    pub devices: Vec<DeviceSpec>,
}

impl MachineConfig {
    /// Resolves and checks the configuration.
    pub fn from_args(args: &RunArgs) -> Result<Self, Error> {
        let file = match &args.machine_file {
            Some(p) => MachineFile::load(p).map_err(|e| Error::Config(e.to_string()))?,
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
            cpus,
            devices: merge_devices(&file_devices, cli_devices),
        })
    }

    /// RAM in bytes.
    pub fn mem_size(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// Where the compat record lives and what it said when we started.
struct CompatState {
    path: PathBuf,
    strict: bool,
    old: Option<CompatRecord>,
}

/// A built machine.
pub struct Machine {
    config: MachineConfig,
    vm: Arc<Vm>,
    /// The buses; the BAR mapper only holds them weakly, the vCPUs through readers.
    _buses: (Arc<Bus>, Arc<Bus>),
    root: Arc<PciRoot>,
    mapper: Arc<BarMapper>,
    devices: Mutex<DeviceSet>,
    serial: Arc<Serial>,
    /// The stop signal.
    pub stop: Arc<Stop>,
    gate: Arc<RunGate>,
    state: Mutex<RunState>,
    vcpus: Mutex<Vec<Vcpu>>,
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    compat: Option<CompatState>,
    dump_machine: Option<PathBuf>,
    globals: Globals,
    seccomp: Option<crate::seccomp::Filter>,
}

impl Machine {
    /// Builds the machine: everything but running the vCPUs.
    pub fn build(args: &RunArgs) -> Result<Arc<Machine>, Error> {
        let config = MachineConfig::from_args(args)?;
        let globals = Globals::parse(&args.globals)?;
        // Before any device exists: device threads started from now on (workers, the INTx
        // resampler) install the device filter first.
        let seccomp = seccomp_filters(args.seccomp)?;
        let compat = match &args.compat {
            Some(path) => {
                let old = if path.exists() {
                    Some(CompatRecord::load(path).map_err(|e| Error::Config(e.to_string()))?)
                } else {
                    None
                };
                Some(CompatState {
                    path: path.clone(),
                    strict: args.compat_strict,
                    old,
                })
            }
            None => None,
        };
        let old = compat.as_ref().and_then(|c| c.old.as_ref());
        let (specs, warnings) = compat::resolve_props(&config.devices, old, &globals);
        for w in warnings {
            eprintln!("vmm: warning: {w}");
        }
        let hints = compat::hints(&specs, old);
        // Fail on bad placement before the (slower) VM creation; realizing places again.
        device_manager::place(&specs, &hints)?;
        // Check the files before creating the VM, so bad input fails fast.
        let initrd = match &config.initrd {
            Some(p) => Some(std::fs::read(p).map_err(|e| Error::Initrd {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        File::open(&config.kernel).map_err(|e| Error::Kernel {
            path: config.kernel.display().to_string(),
            reason: e.to_string(),
        })?;

        let stop = Arc::new(Stop::new()?);
        let vm = Arc::new(Vm::new(config.mem_size())?);
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
        pio.insert(RTC_PORT, RTC_PORT_LEN, Arc::new(Rtc::new()))
            .map_err(bus_err)?;
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
        let mut devices = DeviceSet::new();
        devices.add(&specs, &hints, &root, &vm.mem, vm.clone())?;
        for r in devices.devices() {
            tracing::info!(
                "{} {} at {}",
                r.placed.spec.driver(),
                r.placed.id,
                r.placed.addr
            );
        }

        let kernel = boot::load_kernel(&vm.mem, &config.kernel)?;
        boot::write_cmdline(&vm.mem, &config.cmdline)?;
        boot::write_reset_vector(&vm.mem)?;
        let initrd = match initrd {
            Some(bytes) => {
                let max = kernel.header.map_or(0x7fff_ffff, |h| {
                    u64::from(h.initrd_addr_max).max(0x37ff_ffff)
                });
                let addr =
                    boot::initrd_address(config.mem_size(), bytes.len() as u64, kernel.end, max)?;
                vm.mem.write_slice(&bytes, GuestAddress(addr))?;
                Some((addr, bytes.len() as u64))
            }
            None => None,
        };
        let rsdp = acpi::write_tables(&vm.mem, config.cpus)?;
        let e820 = boot::e820_map(config.mem_size());
        match kernel.entry {
            Entry::Linux64 { .. } => {
                let params =
                    boot::zero_page(kernel.header, config.cmdline.len() + 1, initrd, &e820, rsdp);
                vm.mem.write_obj(params, GuestAddress(ZERO_PAGE))?;
            }
            Entry::Pvh { .. } => boot::write_pvh_info(&vm.mem, initrd, &e820, rsdp)?,
        }

        let gate = Arc::new(RunGate::new());
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
                pio: pio.reader(),
                mmio: mmio.reader(),
                mem: vm.mem.clone(),
                stop: stop.clone(),
                gate: gate.clone(),
            });
        }
        Ok(Arc::new(Machine {
            config,
            vm,
            _buses: (pio, mmio),
            root,
            mapper,
            devices: Mutex::new(devices),
            serial,
            stop,
            gate,
            state: Mutex::new(RunState::Prelaunch),
            vcpus: Mutex::new(vcpus),
            vcpu_threads: Mutex::new(Vec::new()),
            compat,
            dump_machine: args.dump_machine.clone(),
            globals,
            seccomp,
        }))
    }

    /// The run state.
    pub fn run_state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The compat record of the devices as they are now.
    pub fn record(&self) -> CompatRecord {
        compat::record_of(
            self.devices
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .devices(),
        )
    }

    /// The fully resolved machine description.
    pub fn description(&self) -> MachineFile {
        let devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let mut m = MachineFile::new();
        m.kernel = Some(absolute(&self.config.kernel));
        m.initrd = self.config.initrd.as_deref().map(absolute);
        m.cmdline = Some(self.config.cmdline.clone());
        m.memory_mib = Some(self.config.memory_mib);
        m.cpus = Some(self.config.cpus);
        m.devices = devices
            .devices()
            .iter()
            .map(|r| {
                // Every ABI-shaping property with its value, defaults included.
                DeviceEntry::from_spec(&r.placed.spec.with_abi(&r.abi), Some(r.placed.addr))
            })
            .collect();
        m
    }

    /// Writes the compat record (atomically) to `path`.
    pub fn save_record(&self, path: &Path) -> Result<(), Error> {
        let pause = std::env::var(RECORD_PAUSE_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis);
        self.record()
            .save(path, pause)
            .map_err(|e| Error::Config(e.to_string()))
    }

    /// Writes the machine description to `path` (atomically).
    pub fn save_description(&self, path: &Path) -> Result<(), Error> {
        pci::record::write_atomically(path, self.description().to_json().as_bytes(), None).map_err(
            |e| {
                Error::Config(format!(
                    "cannot write machine description '{}': {e}",
                    path.display()
                ))
            },
        )
    }

    /// Starts the guest: checks the compat record (`--compat-strict`), writes the record and
    /// the machine dump, then runs the vCPUs. Only from prelaunch.
    pub fn start(&self) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *state != RunState::Prelaunch {
            return Err(Error::Config("the machine was already started".into()));
        }
        if let Some(c) = &self.compat {
            let new = self.record();
            if let (true, Some(old)) = (c.strict, &c.old) {
                if let Err(changes) = compat::strict_check(old, &new) {
                    let list: Vec<String> = changes.iter().map(|c| format!("  {c}")).collect();
                    return Err(Error::Config(format!(
                        "--compat-strict: the guest-visible PCI ABI recorded in '{}' would change:\n{}",
                        c.path.display(),
                        list.join("\n")
                    )));
                }
            }
            self.save_record(&c.path)?;
        }
        if let Some(p) = &self.dump_machine {
            self.save_description(p)?;
        }
        let vcpus = std::mem::take(&mut *self.vcpus.lock().unwrap_or_else(|p| p.into_inner()));
        let mut threads = self.vcpu_threads.lock().unwrap_or_else(|p| p.into_inner());
        for v in vcpus {
            let name = format!("vcpu{}", v.id);
            let filter = self.seccomp.clone();
            let stop = self.stop.clone();
            let h = std::thread::Builder::new().name(name).spawn(move || {
                // The vCPU filter also covers the device workers a vCPU starts (DRIVER_OK).
                if let Some(f) = filter {
                    if let Err(e) = crate::seccomp::apply(&f) {
                        stop.stop(StopReason::Error(format!("seccomp: {e}")));
                        return;
                    }
                }
                v.run()
            })?;
            threads.push(h.as_pthread_t());
        }
        self.gate.open();
        *state = RunState::Running;
        Ok(())
    }

    /// Resumes a paused machine, or starts a prelaunch one.
    pub fn cont(&self) -> Result<(), Error> {
        match self.run_state() {
            RunState::Prelaunch => self.start(),
            RunState::Paused => {
                self.gate.open();
                *self.state.lock().unwrap_or_else(|p| p.into_inner()) = RunState::Running;
                Ok(())
            }
            RunState::Running => Ok(()),
            RunState::Shutdown => Err(Error::Config("the guest has shut down".into())),
        }
    }

    /// Pauses a running machine (every vCPU out of `KVM_RUN`, waiting).
    pub fn pause(&self) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *state != RunState::Running {
            return Ok(());
        }
        let threads = self.vcpu_threads.lock().unwrap_or_else(|p| p.into_inner());
        if !self.gate.close(&threads) {
            return Err(Error::Vcpu("vCPUs did not stop within a second".into()));
        }
        *state = RunState::Paused;
        Ok(())
    }

    /// Adds a device (QMP `device_add`): only before the guest first runs (cold-plug).
    pub fn device_add(&self, spec: DeviceSpec) -> Result<String, Error> {
        if self.run_state() != RunState::Prelaunch {
            return Err(Error::Config(
                "device_add: hot-plug is not supported; add devices before the first 'cont' (-S)"
                    .into(),
            ));
        }
        let old = self.compat.as_ref().and_then(|c| c.old.as_ref());
        let (specs, warnings) = compat::resolve_props(&[spec], old, &self.globals);
        for w in warnings {
            eprintln!("vmm: warning: {w}");
        }
        let hints = compat::hints(&specs, old);
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let addrs = devices.add(&specs, &hints, &self.root, &self.vm.mem, self.vm.clone())?;
        for a in &addrs {
            self.mapper.remap(*a);
        }
        let id = devices
            .devices()
            .iter()
            .find(|r| Some(r.placed.addr) == addrs.first().copied())
            .map(|r| r.placed.id.clone())
            .unwrap_or_default();
        Ok(id)
    }

    /// Removes a device (QMP `device_del`): only before the guest first runs.
    pub fn device_del(&self, id: &str) -> Result<(), Error> {
        if self.run_state() != RunState::Prelaunch {
            return Err(Error::Config(
                "device_del: hot-unplug is not supported once the guest runs".into(),
            ));
        }
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let r = devices.remove(id, &self.root)?;
        self.mapper.remap(r.placed.addr);
        Ok(())
    }

    /// The root complex (for queries).
    pub fn root(&self) -> &Arc<PciRoot> {
        &self.root
    }

    /// The realized devices' ids by address (for queries).
    pub fn device_ids(&self) -> Vec<(pci::PciAddress, String, String)> {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .devices()
            .iter()
            .map(|r| {
                (
                    r.placed.addr,
                    r.placed.id.clone(),
                    r.placed.spec.driver().to_string(),
                )
            })
            .collect()
    }

    /// Marks the machine shut down.
    pub fn set_shutdown(&self) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = RunState::Shutdown;
    }
}

/// Builds the vCPU filter and installs the device-worker filter for `level`.
fn seccomp_filters(
    level: crate::cli::SeccompLevel,
) -> Result<Option<crate::seccomp::Filter>, Error> {
    use crate::cli::SeccompLevel;
    use seccompiler::SeccompAction;
    let action = match level {
        SeccompLevel::Off => return Ok(None),
        SeccompLevel::Kill => SeccompAction::KillProcess,
        SeccompLevel::Log => SeccompAction::Log,
    };
    let err = |e: crate::seccomp::Error| Error::Config(format!("seccomp: {e}"));
    let vcpu = crate::seccomp::vcpu_filter_with(action.clone()).map_err(err)?;
    let device = crate::seccomp::device_filter_with(action).map_err(err)?;
    devices::virtio::set_thread_init(move || {
        crate::seccomp::apply(&device).map_err(|e| e.to_string())
    });
    Ok(Some(vcpu))
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Boots the guest described by `args` and runs it to the end. Returns the exit status.
pub fn run(args: &RunArgs) -> Result<i32, Error> {
    let qmp_path = match &args.qmp {
        Some(o) => Some(parse_qmp_option(o).map_err(Error::Config)?),
        None => None,
    };
    if args.paused && qmp_path.is_none() {
        return Err(Error::Config(
            "-S needs --qmp: nothing else can start the guest".into(),
        ));
    }
    // Before any other thread starts (building the machine starts some), so that they all
    // inherit the signal mask.
    let signals = block_stop_signals();
    let machine = Machine::build(args)?;
    install_kick_handler()?;
    handle_stop_signals(signals, &machine.stop)?;
    let control = Arc::new(MachineControl::new(machine.clone()));
    let server = match &qmp_path {
        Some(p) => {
            let (server, sink) = QmpServer::start(p, control.clone())
                .map_err(|e| Error::Config(format!("--qmp: {e}")))?;
            control.set_events(sink);
            Some(server)
        }
        None => None,
    };
    if !args.paused {
        machine.start()?;
    }
    let reason = console_loop(&machine.serial, &machine.stop)?;
    machine.set_shutdown();
    let (guest, why) = match &reason {
        StopReason::Reset(w) if w.starts_with("QMP") => (false, "host-qmp-system-reset"),
        StopReason::Reset(_) => (true, "guest-reset"),
        StopReason::PowerOff(_) => (true, "guest-shutdown"),
        StopReason::Signal(_) => (false, "host-signal"),
        StopReason::Quit => (false, "host-qmp-quit"),
        StopReason::Error(_) => (false, "host-error"),
    };
    control.events().shutdown(guest, why);
    if let Some(s) = server {
        s.shutdown();
    }
    let _ = std::io::stdout().flush();
    match &reason {
        StopReason::Error(msg) => eprintln!("vmm: {msg}"),
        other => tracing::info!("guest stopped: {other:?}"),
    }
    // The vCPU threads may be inside KVM_RUN; the process exit ends them.
    Ok(reason.exit_code())
}

/// Puts a terminal on stdin into raw mode (keys go to the guest as typed, as with QEMU's
/// `-nographic`) and restores it when dropped. Does nothing when stdin is not a terminal.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn new() -> Self {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty/tcgetattr/tcsetattr only read and write the termios struct we own.
        unsafe {
            if libc::isatty(fd) != 1 {
                return RawTerminal(None);
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) != 0 {
                return RawTerminal(None);
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            t.c_oflag |= libc::OPOST | libc::ONLCR; // keep "\n" -> "\r\n" for the guest's output
            if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
                return RawTerminal(None);
            }
            RawTerminal(Some(saved))
        }
    }

    fn is_raw(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the attributes read in `new` on the same fd.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        }
    }
}

/// Ctrl-A, the escape key of QEMU's console multiplexer (`Ctrl-A x` quits).
const ESCAPE: u8 = 0x01;

/// Forwards stdin to the UART until the VM stops. On a terminal, `Ctrl-A x` ends the VM and
/// `Ctrl-A Ctrl-A` sends one Ctrl-A, as in QEMU.
fn console_loop(serial: &Serial, stop: &Stop) -> Result<StopReason, Error> {
    const STOP: u64 = 0;
    const STDIN: u64 = 1;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        stop.event().as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP),
    )?;
    // Unbuffered reads from the fd: a buffered reader could keep bytes epoll no longer reports.
    let mut input = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .ok();
    let mut stdin_open = input.as_ref().is_some_and(|f| {
        epoll
            .ctl(
                ControlOperation::Add,
                f.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STDIN),
            )
            .is_ok()
    });
    let terminal = RawTerminal::new();
    let mut escaped = false;
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
            let (STDIN, true, Some(f)) = (ev.data(), room > 0, input.as_mut()) else {
                continue;
            };
            let mut buf = [0u8; 64];
            let want = room.min(buf.len());
            match f.read(&mut buf[..want]) {
                Ok(0) | Err(_) => {
                    let _ = epoll.ctl(
                        ControlOperation::Delete,
                        f.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    stdin_open = false;
                    input = None;
                }
                Ok(k) if terminal.is_raw() => {
                    let mut out = Vec::with_capacity(k);
                    for &b in &buf[..k] {
                        match (escaped, b) {
                            (false, ESCAPE) => escaped = true,
                            (true, b'x') => {
                                stop.stop(StopReason::Quit);
                                escaped = false;
                            }
                            (true, _) => {
                                out.push(b);
                                escaped = false;
                            }
                            (false, _) => out.push(b),
                        }
                    }
                    serial.enqueue_input(&out);
                }
                Ok(k) => {
                    serial.enqueue_input(&buf[..k]);
                }
            }
        }
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread, and so in every thread it creates later:
/// they stay pending until [`handle_stop_signals`] waits for them.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; the libc calls only read and write the local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Turns SIGINT and SIGTERM (blocked by [`block_stop_signals`]) into a clean stop.
fn handle_stop_signals(set: libc::sigset_t, stop: &Arc<Stop>) -> Result<(), Error> {
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
