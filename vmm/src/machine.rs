//! One machine: the KVM VM, its devices and vCPUs, from build to the end of the guest.
//!
//! [`Machine::build`] composes: configuration ([`crate::config`]), compat-record hints
//! ([`crate::compat`]), the [`Vm`], the [`DeviceManager`] with every device placed and realized,
//! the kernel loaded ([`crate::boot`]) with its ACPI tables ([`crate::acpi`]), and the vCPUs
//! ([`VcpuSet`]). [`Machine::start`] checks and writes the record and starts the vCPUs; QMP
//! drives the rest through [`crate::qmp_control`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use devices::legacy::{slots_in, EjectCallback, PowerCallback, PowerEvent, HOTPLUG_BUSES};
use pci::record::CompatRecord;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::AcpiOptions;
use crate::boot::{self, Entry};
use crate::cli::RunArgs;
use crate::compat::{self, Globals, MachineProps};
use crate::config::MachineConfig;
use crate::device_manager::{self, DeviceError, DeviceManager, DeviceSpec, HotplugSetup, Realized};
use crate::layout::ZERO_PAGE;
use crate::machine_file::{DeviceEntry, MachineFile};
use crate::monitor::{EventSink, RunState};
use crate::stats::{GuestStats, KvmStatsFile};
use crate::stop::{ResetSource, Stop, StopReason};
use crate::vcpu::{RunGate, Vcpu, VcpuSet};
use crate::vm::Vm;
use crate::{acpi, cpu, Error};

/// Where the compat record lives and what it said when we started.
struct CompatState {
    path: PathBuf,
    strict: bool,
    old: Option<CompatRecord>,
}

/// One run of the guest: the KVM VM, the devices in it and its vCPUs. A reboot replaces it
/// with a new one built from the same configuration and device placement.
pub struct Guest {
    vm: Arc<Vm>,
    devices: DeviceManager,
    vcpus: VcpuSet,
    /// KVM's statistics files of the VM and each vCPU, opened with them (read by the monitor).
    stats: GuestStats,
}

impl Guest {
    /// Creates the VM, lets `make_devices` put the devices on it, loads the kernel, initrd and
    /// the ACPI tables of what they built, and creates the vCPUs (not running).
    fn build(
        config: &MachineConfig,
        stop: &Arc<Stop>,
        make_devices: impl FnOnce(Arc<Vm>, PowerCallback) -> Result<DeviceManager, Error>,
    ) -> Result<Guest, Error> {
        let initrd = read_initrd(config)?;
        let vm = Arc::new(Vm::new(config.mem_size(), &config.ram)?);
        let mut stats = GuestStats {
            vm: KvmStatsFile::open(&vm.fd),
            vcpus: Vec::new(),
        };
        let power: PowerCallback = {
            let stop = stop.clone();
            Arc::new(move |e| {
                stop.stop(match e {
                    PowerEvent::Reset => StopReason::Reset(ResetSource::Guest),
                    PowerEvent::PowerOff => StopReason::PowerOff("ACPI S5"),
                })
            })
        };
        let devices = make_devices(vm.clone(), power)?;
        let acpi = &devices.acpi_options();
        devices.with_devices(|list| {
            for r in list {
                tracing::info!(
                    "{} {} at {}",
                    r.placed.spec.driver(),
                    r.placed.id,
                    r.placed.addr
                );
            }
        });
        let entry = load_guest(&vm, config, acpi, initrd.as_deref())?;
        let gate = Arc::new(RunGate::new());
        let vcpus = create_vcpus(&vm, config, entry, &devices, stop, &gate, &mut stats)?;
        if let Err(e) = &stats.vm {
            tracing::info!("no KVM statistics (query-stats): {e}");
        }
        Ok(Guest {
            vm,
            devices,
            vcpus: VcpuSet::new(gate, vcpus),
            stats,
        })
    }

    /// The device manager (buses, root complex, devices).
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// KVM's statistics files of this run (the VM's and each vCPU's).
    pub fn stats(&self) -> &GuestStats {
        &self.stats
    }
}

/// A built machine: its configuration and state, and the current run of its guest.
pub struct Machine {
    config: MachineConfig,
    /// The current run of the guest; None only while a reboot replaces it (under the write
    /// lock) or after a reboot failed.
    guest: RwLock<Option<Guest>>,
    /// The stop signal.
    pub stop: Arc<Stop>,
    state: Mutex<RunState>,
    compat: Option<CompatState>,
    dump_machine: Option<PathBuf>,
    globals: Globals,
    seccomp: Option<crate::seccomp::Filter>,
    /// The recorded machine properties (ACPI PCI hot-plug on bus 0 and behind bridges,
    /// extended config space, the 64-bit PCI window).
    props: MachineProps,
    /// Slots the guest ejected, posted by vCPUs for the hot-plug thread.
    ejects: Arc<Ejects>,
    /// Where events go (QMP), once the monitor runs.
    events: OnceLock<EventSink>,
    /// Held while the compat record is read off the devices and written: rewrites come from
    /// the QMP thread (device_add, save-compat) and the hot-plug thread (ejects) and share one
    /// temporary file name, so two at once made one fail ("No such file or directory") and
    /// could rename a half-written file into place.
    record_lock: Mutex<()>,
}

/// Slots the guest ejected (B0EJ writes), from the vCPU threads to the hot-plug thread: an
/// atomic bitmap of slots per bus number and an eventfd, so the vCPU side neither locks nor
/// allocates.
struct Ejects {
    slots: Box<[AtomicU32]>,
    wake: EventFd,
}

impl Ejects {
    fn new() -> std::io::Result<Self> {
        Ok(Ejects {
            slots: (0..HOTPLUG_BUSES).map(|_| AtomicU32::new(0)).collect(),
            wake: EventFd::new(0)?,
        })
    }

    fn callback(self: &Arc<Self>) -> EjectCallback {
        let me = self.clone();
        Arc::new(move |bus: u8, slot: u8| {
            me.slots[usize::from(bus)].fetch_or(1 << (slot & 31), Ordering::AcqRel);
            let _ = me.wake.write(1);
        })
    }

    /// Takes every posted (bus, slot).
    fn take(&self) -> Vec<(u8, u8)> {
        let mut out = Vec::new();
        for (bus, slots) in (0..=255u8).zip(self.slots.iter()) {
            out.extend(slots_in(slots.swap(0, Ordering::AcqRel)).map(|slot| (bus, slot)));
        }
        out
    }

    fn clear(&self) {
        for s in self.slots.iter() {
            s.store(0, Ordering::Release);
        }
    }
}

/// What `device_del` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The device is gone (before the guest ran: cold-unplug); DEVICE_DELETED was sent.
    Done,
    /// The guest was asked to eject it; DEVICE_DELETED follows the eject.
    Requested,
}

/// QEMU's text for hot-plug on a machine without it.
const NO_HOTPLUG: &str = "Bus 'pci.0' does not support hotplugging";

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
                    Some(CompatRecord::load(path)?)
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
        // Fail on bad placement before the (slower) VM creation; the device manager places
        // again.
        device_manager::place(&specs, &hints)?;
        // Check the kernel before creating the VM, so bad input fails fast (Guest::build reads
        // the initrd before it creates the VM).
        File::open(&config.kernel).map_err(|e| Error::Kernel {
            path: config.kernel.display().to_string(),
            reason: e.to_string(),
        })?;

        // Guest-visible: the command line or machine file, else what the record says (the old
        // behaviour for a record from before a property), else the new machine's.
        let props =
            MachineProps::resolve(&config.props, old.map(|r| &r.machine)).map_err(Error::Config)?;
        if props.mmio64 && config.mem_size() > crate::layout::MAX_RAM_WITH_MMIO64 {
            return Err(Error::Config(format!(
                "invalid memory size {} MiB: at most {} MiB on a machine with the 64-bit PCI window (machine file: \"mmio64_window\": false lifts it)",
                config.memory_mib,
                crate::layout::MAX_RAM_WITH_MMIO64 >> 20
            )));
        }
        let ejects = Arc::new(Ejects::new()?);
        let setup = props.pci_hotplug.then(|| HotplugSetup {
            eject: ejects.callback(),
            bridges: props.pci_hotplug_bridges,
        });
        let stop = Arc::new(Stop::new()?);
        let pci_bridges = specs.iter().any(DeviceSpec::is_bridge);
        let guest = Guest::build(&config, &stop, |vm, power| {
            let devices = DeviceManager::new(
                vm,
                power,
                Box::new(std::io::stdout()),
                setup,
                pci_bridges,
                props,
            )?;
            devices.add(&specs, &hints)?;
            Ok(devices)
        })?;
        let machine = Arc::new(Machine {
            config,
            guest: RwLock::new(Some(guest)),
            stop,
            state: Mutex::new(RunState::Prelaunch),
            compat,
            dump_machine: args.dump_machine.clone(),
            globals,
            seccomp,
            props,
            ejects,
            events: OnceLock::new(),
            record_lock: Mutex::new(()),
        });
        if props.pci_hotplug {
            let weak = Arc::downgrade(&machine);
            let filter =
                crate::seccomp::filter_for(args.seccomp, crate::seccomp::hotplug_filter_with)?;
            crate::seccomp::spawn_confined("hotplug", filter, move || hotplug_thread(weak))?;
        }
        Ok(machine)
    }

    /// Where the machine's events (DEVICE_DELETED) go.
    pub fn set_events(&self, sink: EventSink) {
        let _ = self.events.set(sink);
    }

    fn events(&self) -> EventSink {
        self.events
            .get()
            .cloned()
            .unwrap_or_else(EventSink::disconnected)
    }

    /// Rewrites the compat record (after a completed hot-plug or removal), if there is one.
    fn rewrite_record(&self) -> Result<(), Error> {
        match &self.compat {
            Some(c) => self.save_record(&c.path),
            None => Ok(()),
        }
    }

    /// Removes every device in `slot` of bus number `bus` (the guest ejected it), sends
    /// DEVICE_DELETED for each and rewrites the record. Runs on the hot-plug thread (or during
    /// a reboot), never on a vCPU.
    fn complete_eject(&self, bus: u8, slot: u8) {
        let removed = self
            .with_guest(|g| remove_slot(&g.devices, bus, slot))
            .unwrap_or_default();
        self.announce_removed(&removed);
    }

    fn announce_removed(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        // The record first: a client that reads it on DEVICE_DELETED finds the device gone.
        if let Err(e) = self.rewrite_record() {
            tracing::error!("compat record not rewritten after a removal: {e}");
        }
        for id in ids {
            tracing::info!("device {id} removed");
            self.events().device_deleted(Some(id), &qom_path(id));
        }
    }

    /// The run state.
    pub fn run_state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `f` with the current run of the guest (None while a reboot failed).
    pub fn with_guest<R>(&self, f: impl FnOnce(&Guest) -> R) -> Option<R> {
        self.guest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(f)
    }

    /// Calls `f` with the realized devices in address order (none while a reboot failed).
    pub fn with_devices<R: Default>(&self, f: impl FnOnce(&[Realized]) -> R) -> R {
        self.with_guest(|g| g.devices.with_devices(f))
            .unwrap_or_default()
    }

    /// Every function on the root complex, the host bridge included (none while a reboot
    /// failed).
    pub fn functions(&self) -> Vec<(pci::PciAddress, Arc<dyn pci::PciFunction>)> {
        self.with_guest(|g| g.devices.root().functions())
            .unwrap_or_default()
    }

    /// COM1 of the current run of the guest.
    pub fn serial(&self) -> Option<Arc<devices::legacy::Serial>> {
        self.with_guest(|g| g.devices.serial().clone())
    }

    /// The compat record of the devices as they are now.
    pub fn record(&self) -> CompatRecord {
        let props = self.props;
        self.with_guest(|g| g.devices.with_devices(|l| compat::record_of(l, props)))
            .unwrap_or_else(|| compat::record_of(&[], props))
    }

    /// The fully resolved machine description.
    pub fn description(&self) -> MachineFile {
        let mut m = MachineFile::new();
        m.kernel = Some(absolute(&self.config.kernel));
        m.initrd = self.config.initrd.as_deref().map(absolute);
        m.cmdline = Some(self.config.cmdline.clone());
        m.memory_mib = Some(self.config.memory_mib);
        m.cpus = Some(self.config.cpus);
        m.pci_hotplug = Some(self.props.pci_hotplug);
        m.pci_hotplug_bridges = Some(self.props.pci_hotplug_bridges);
        m.extended_config = Some(self.props.extended_config);
        m.mmio64_window = Some(self.props.mmio64);
        m.pci_config_ports = Some(self.props.pci_config_ports);
        m.devices = self.with_devices(|list| {
            list.iter()
                // Every ABI-shaping property with its value, defaults included.
                .map(|r| {
                    let mut spec = r.placed.spec.with_abi(&r.abi);
                    // The bus it is on (a recorded one too); the root bus goes unsaid, as
                    // in every description written before bridges.
                    spec.bus = Some(r.placed.bus.clone()).filter(|b| b != device_manager::ROOT_BUS);
                    DeviceEntry::from_spec(&spec, Some(r.placed.addr))
                })
                .collect()
        });
        m
    }

    /// Writes the compat record (atomically) to `path`.
    pub fn save_record(&self, path: &Path) -> Result<(), Error> {
        let _one_writer = self.record_lock.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.record().save(path)?)
    }

    /// Writes the machine description to `path` (atomically).
    pub fn save_description(&self, path: &Path) -> Result<(), Error> {
        pci::record::write_atomically(path, self.description().to_json().as_bytes()).map_err(|e| {
            Error::Config(format!(
                "cannot write machine description '{}': {e}",
                path.display()
            ))
        })
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
        self.with_guest(|g| g.vcpus.start(self.seccomp.clone(), &self.stop))
            .ok_or_else(|| Error::Config("the guest is gone".into()))??;
        *state = RunState::Running;
        Ok(())
    }

    /// Resumes a paused machine, or starts a prelaunch one.
    pub fn cont(&self) -> Result<(), Error> {
        match self.run_state() {
            RunState::Prelaunch => self.start(),
            RunState::Paused => {
                // After a reboot while paused the new vCPUs have no threads yet: start them.
                self.with_guest(|g| g.vcpus.start(self.seccomp.clone(), &self.stop))
                    .transpose()?;
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
        if self.with_guest(|g| g.vcpus.pause()) == Some(false) {
            return Err(Error::Vcpu("vCPUs did not stop within a second".into()));
        }
        *state = RunState::Paused;
        Ok(())
    }

    /// Adds a device (QMP `device_add`): cold-plug before the guest first runs (for a bridge
    /// the run is built again, as at start-up), hot-plug afterwards (ACPI, bus 0, function 0
    /// of a free slot): the device is fully wired, then the guest is notified and the record
    /// rewritten. Returns its id.
    pub fn device_add(&self, spec: DeviceSpec) -> Result<String, Error> {
        let hot = self.run_state() != RunState::Prelaunch;
        if hot && spec.is_bridge() {
            let name = spec.id.clone().unwrap_or_else(|| spec.driver().to_string());
            return Err(DeviceError::BridgeNotPluggable(name).into());
        }
        if hot && !self.props.pci_hotplug {
            return Err(Error::Config(NO_HOTPLUG.into()));
        }
        let bus = spec.bus_name().to_string();
        if hot && bus != device_manager::ROOT_BUS {
            // A bus that does not exist is "not found" (from the placement below); one that
            // exists without hot-plug says so.
            let (exists, pluggable) = self
                .with_guest(|g| {
                    (
                        g.devices.with_buses(|b| b.get(&bus).is_some()),
                        g.devices.bus_hotpluggable(&bus),
                    )
                })
                .unwrap_or_default();
            if exists && !pluggable {
                return Err(DeviceError::NoHotplugBus(bus).into());
            }
        }
        if let (true, Some((slot, Some(f)))) = (hot, spec.addr) {
            if f != 0 {
                return Err(Error::Config(format!(
                    "PCI: hot-plug of function {slot:x}.{f:x} is not supported: only function 0 of an empty slot can be hot-plugged"
                )));
            }
        }
        let old = self.compat.as_ref().and_then(|c| c.old.as_ref());
        let (specs, warnings) = compat::resolve_props(&[spec], old, &self.globals);
        for w in warnings {
            eprintln!("vmm: warning: {w}");
        }
        let mut hints = compat::hints(&specs, old);
        if specs.iter().any(DeviceSpec::is_bridge) {
            return Ok(self
                .cold_plug_bridge(&specs, &hints)?
                .into_iter()
                .next()
                .unwrap_or_default());
        }
        let added = self
            .with_guest(|g| -> Result<_, Error> {
                if hot {
                    // Hot-plug goes only where it can: a recorded place on a bus without
                    // hot-plug (behind a bridge, without hot-plug behind bridges) does not
                    // apply. Filtered on the guest the device goes into (bridges, refused hot
                    // above, never get here hot).
                    hints.retain(|_, h| g.devices.bus_hotpluggable(&h.bus));
                }
                let added = g.devices.add(&specs, &hints)?;
                if hot {
                    for (_, addr) in &added {
                        g.devices.notify_plugged(addr.bus(), addr.device())?;
                    }
                }
                Ok(added)
            })
            .ok_or_else(|| Error::Config("the guest is gone".into()))??;
        let id = added
            .into_iter()
            .next()
            .map(|(id, _)| id)
            .unwrap_or_default();
        if hot {
            // The device is in the guest already: say so, and that the record is the old one.
            self.rewrite_record().map_err(|e| {
                Error::Config(format!(
                    "device '{id}' was added, but the compat record was not written (it still describes the machine without it): {e}"
                ))
            })?;
        }
        Ok(id)
    }

    /// Removes a device (QMP `device_del`): at once before the guest first runs; afterwards
    /// the guest is asked to eject its slot (again, if asked before) and the device goes when
    /// it does.
    pub fn device_del(&self, id: &str) -> Result<Removal, Error> {
        let hot = self.run_state() != RunState::Prelaunch;
        if hot && !self.props.pci_hotplug {
            return Err(Error::Config(NO_HOTPLUG.into()));
        }
        let removal = self
            .with_guest(|g| -> Result<Removal, Error> {
                if hot {
                    g.devices.request_unplug(id)?;
                    Ok(Removal::Requested)
                } else {
                    g.devices.remove(id)?;
                    Ok(Removal::Done)
                }
            })
            .ok_or_else(|| Error::Config("the guest is gone".into()))??;
        if removal == Removal::Done {
            self.events().device_deleted(Some(id), &qom_path(id));
        }
        Ok(removal)
    }

    /// The realized devices' ids and drivers by address (for queries).
    pub fn device_ids(&self) -> Vec<(pci::PciAddress, String, String)> {
        self.with_devices(|list| {
            list.iter()
                .map(|r| {
                    (
                        r.placed.addr,
                        r.placed.id.clone(),
                        r.placed.spec.driver().to_string(),
                    )
                })
                .collect()
        })
    }

    /// Marks the machine shut down and ends the vCPU threads.
    pub fn shut_down(&self) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = RunState::Shutdown;
        self.with_guest(|g| g.vcpus.end());
    }

    /// Restarts the guest in place after a reset: the vCPUs end, the old run's devices, files
    /// and KVM VM go, and a new run is built with the same devices at the same addresses, each
    /// at its power-on state, the kernel and initrd loaded again; its vCPUs start (or wait,
    /// if the machine was paused or never started).
    pub fn reboot(&self) -> Result<Option<ResetSource>, Error> {
        // Lock order: the run state is never locked while the guest is held for writing
        // (start and pause lock the state, then read the guest).
        let running = self.run_state() == RunState::Running;
        let mut slot = self.guest.write().unwrap_or_else(|p| p.into_inner());
        let Some(old) = slot.take() else {
            return Err(Error::Config("the guest is gone".into()));
        };
        old.vcpus.end();
        // The reset that ended the old run, taken once its vCPUs are gone and before the new
        // run's start: a reset the new run reports at once (a guest that reboots in
        // milliseconds) must stay pending, or the main thread would wait for a stop that
        // already happened while no vCPU runs. (None: a reason that ends the process came in;
        // the console loop returns it at once.)
        let source = self.stop.take_reset();
        // Removals the guest did not complete happen now, as in QEMU.
        let removed: Vec<String> = old
            .devices
            .pending_unplugs()
            .into_iter()
            .flat_map(|(bus, s)| remove_slot(&old.devices, bus, s))
            .collect();
        let placement = old.devices.placement();
        // Before the new run opens them again: files, sockets, taps, worker threads, the VM.
        drop(old);
        // Ejects posted by the old run's vCPUs are moot: those devices are gone or rebuilt.
        self.ejects.clear();
        let guest = self.build_run(&placement)?;
        if running {
            guest.vcpus.start(self.seccomp.clone(), &self.stop)?;
        }
        *slot = Some(guest);
        drop(slot);
        self.announce_removed(&removed);
        Ok(source)
    }
}

impl Machine {
    /// A new run of the guest (a new VM, its kernel loaded, its tables written) with the
    /// devices of `placement` realized at their power-on state; its vCPUs wait.
    fn build_run(&self, placement: &device_manager::Placement) -> Result<Guest, Error> {
        let setup = self.props.pci_hotplug.then(|| HotplugSetup {
            eject: self.ejects.callback(),
            bridges: self.props.pci_hotplug_bridges,
        });
        Guest::build(&self.config, &self.stop, |vm, power| {
            Ok(DeviceManager::rebuilt(
                vm,
                power,
                Box::new(std::io::stdout()),
                setup,
                placement,
                self.props,
            )?)
        })
    }

    /// Cold-plugs `specs` with a bridge among them (QMP `device_add` before the first `cont`):
    /// bus numbers, bridge windows, the ECAM window and the ACPI tables are set before the
    /// guest runs, so the run is built again, as at start-up, with every device at its place
    /// and the new ones placed around them. A placement error changes nothing; a device that
    /// cannot be realized again (a file gone meanwhile) leaves the machine without a guest,
    /// as a failed reboot does. Returns the new devices' ids.
    fn cold_plug_bridge(
        &self,
        specs: &[DeviceSpec],
        hints: &std::collections::HashMap<String, device_manager::Hint>,
    ) -> Result<Vec<String>, Error> {
        let mut slot = self.guest.write().unwrap_or_else(|p| p.into_inner());
        let Some(old) = slot.take() else {
            return Err(Error::Config("the guest is gone".into()));
        };
        let (placement, ids) = match old.devices.placement().with(specs, hints) {
            Ok(p) => p,
            Err(e) => {
                *slot = Some(old);
                return Err(e.into());
            }
        };
        old.vcpus.end();
        // Before the new run opens them again: files, sockets, taps, worker threads, the VM.
        drop(old);
        *slot = Some(self.build_run(&placement)?);
        Ok(ids)
    }
}

/// Removes every device in `slot` of bus number `bus`, functions above 0 first; returns their
/// ids.
fn remove_slot(devices: &DeviceManager, bus: u8, slot: u8) -> Vec<String> {
    let mut in_slot: Vec<(u8, String)> = devices.with_devices(|l| {
        l.iter()
            .filter(|r| r.placed.addr.bus() == bus && r.placed.addr.device() == slot)
            .map(|r| (r.placed.addr.function(), r.placed.id.clone()))
            .collect()
    });
    in_slot.sort_by_key(|(f, _)| std::cmp::Reverse(*f));
    let mut removed = Vec::new();
    for (_, id) in in_slot {
        match devices.remove(&id) {
            Ok(()) => removed.push(id),
            Err(e) => tracing::error!("ejecting {id}: {e}"),
        }
    }
    removed
}

/// QEMU's QOM path of a device: `/machine/peripheral/ID`, or for an id-less device
/// (`device[N]`) `/machine/peripheral-anon/device[N]`.
fn qom_path(id: &str) -> String {
    if id.starts_with("device[") {
        format!("/machine/peripheral-anon/{id}")
    } else {
        format!("/machine/peripheral/{id}")
    }
}

/// The hot-plug thread: completes the ejects the vCPUs post, and raises the GED interrupt
/// again while the guest leaves events unread (an interrupt raised before its GED driver was
/// up is lost: requests made right after `cont` must not be). Ends with the machine.
fn hotplug_thread(machine: std::sync::Weak<Machine>) {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let Some(m) = machine.upgrade() else { return };
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("hot-plug thread: epoll: {e}");
            return;
        }
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&m.ejects.wake);
    if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0)) {
        tracing::error!("hot-plug thread: epoll: {e}");
        return;
    }
    drop(m);
    let mut events = [EpollEvent::default(); 1];
    loop {
        let n = epoll.wait(1000, &mut events).unwrap_or(0);
        let Some(m) = machine.upgrade() else { return };
        if m.run_state() == RunState::Shutdown {
            return;
        }
        if n > 0 {
            let _ = m.ejects.wake.read();
        }
        for (bus, slot) in m.ejects.take() {
            m.complete_eject(bus, slot);
        }
        if n == 0 && m.run_state() == RunState::Running {
            let _ = m.with_guest(|g| {
                if g.devices.events_unread() {
                    tracing::debug!("GED events unread: raising its interrupt again");
                    let _ = g.devices.renotify();
                }
            });
        }
    }
}

/// Reads the initrd (at start and at every reboot).
fn read_initrd(config: &MachineConfig) -> Result<Option<Vec<u8>>, Error> {
    match &config.initrd {
        Some(p) => Ok(Some(std::fs::read(p).map_err(|e| Error::Initrd {
            path: p.display().to_string(),
            reason: e.to_string(),
        })?)),
        None => Ok(None),
    }
}

/// Loads the kernel, command line, initrd, ACPI tables and boot parameters into guest memory.
/// Returns the kernel's entry.
fn load_guest(
    vm: &Vm,
    config: &MachineConfig,
    acpi: &AcpiOptions,
    initrd: Option<&[u8]>,
) -> Result<Entry, Error> {
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
            vm.mem.write_slice(bytes, GuestAddress(addr))?;
            Some((addr, bytes.len() as u64))
        }
        None => None,
    };
    let rsdp = acpi::write_tables_with(&vm.mem, config.cpus, acpi)?;
    let e820 = boot::e820_map_with(
        config.mem_size(),
        crate::layout::ecam_size(acpi.pci_bridges),
    );
    match kernel.entry {
        Entry::Linux64 { .. } => {
            let params =
                boot::zero_page(kernel.header, config.cmdline.len() + 1, initrd, &e820, rsdp);
            vm.mem.write_obj(params, GuestAddress(ZERO_PAGE))?;
        }
        Entry::Pvh { .. } => boot::write_pvh_info(&vm.mem, initrd, &e820, rsdp)?,
    }
    Ok(kernel.entry)
}

/// Creates the vCPUs with their CPUID, MSRs, FPU and LAPIC set up, and the boot vCPU's
/// registers pointing at `entry`.
fn create_vcpus(
    vm: &Vm,
    config: &MachineConfig,
    entry: Entry,
    devices: &DeviceManager,
    stop: &Arc<Stop>,
    gate: &Arc<RunGate>,
    stats: &mut GuestStats,
) -> Result<Vec<Vcpu>, Error> {
    let supported = vm
        .kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(crate::kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        let fd = vm
            .fd
            .create_vcpu(u64::from(id))
            .map_err(crate::kvm_err(format!("KVM_CREATE_VCPU {id}")))?;
        // Opened here: the vCPU fd moves into its thread, the monitor reads this file.
        stats.vcpus.push(KvmStatsFile::open(&fd));
        let mut cpuid = supported.clone();
        cpu::filter_cpuid(&mut cpuid, id, config.cpus);
        fd.set_cpuid2(&cpuid)
            .map_err(crate::kvm_err("KVM_SET_CPUID2"))?;
        cpu::set_msrs(&fd)?;
        cpu::set_fpu(&fd)?;
        cpu::set_lint(&fd)?;
        if id == 0 {
            cpu::set_boot_registers(&fd, &vm.mem, entry)?;
        }
        vcpus.push(Vcpu {
            fd,
            id,
            pio: devices.pio().reader(),
            mmio: devices.mmio().reader(),
            mem: vm.mem.clone(),
            stop: stop.clone(),
            gate: gate.clone(),
        });
    }
    Ok(vcpus)
}

/// Builds the vCPU filter and installs the device-worker and executor filters for `level`.
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
    let vcpu = crate::seccomp::vcpu_filter_with(action.clone())?;
    let device = crate::seccomp::device_filter_with(action.clone())?;
    let executor = crate::seccomp::executor_filter_with(action)?;
    devices::virtio::set_thread_init(move || {
        crate::seccomp::apply(&device).map_err(|e| e.to_string())
    });
    devices::virtio::set_executor_init(move || {
        crate::seccomp::apply(&executor).map_err(|e| e.to_string())
    });
    Ok(Some(vcpu))
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}
