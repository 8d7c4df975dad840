//! The machine as QMP sees it: [`MachineControl`] implements the monitor's [`VmControl`] over
//! [`crate::machine::Machine`] and emits the events. The monitor knows nothing of the machine;
//! this adapter is the only place the two meet.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::device_config::{DeviceError, DeviceSpec};
use crate::machine::Machine;
use crate::monitor::{
    CommandError, EventSink, GsiInfo, PciBridgeInfo, PciFunctionInfo, PciRegionInfo, RegionKind,
    RunState, VmControl,
};
use crate::stop::{ResetSource, StopReason};

/// QMP's handle on a machine.
pub struct MachineControl {
    machine: Arc<Machine>,
    events: OnceLock<EventSink>,
}

impl MachineControl {
    /// A backend for `machine`; events go nowhere until [`MachineControl::set_events`].
    pub fn new(machine: Arc<Machine>) -> Self {
        MachineControl {
            machine,
            events: OnceLock::new(),
        }
    }

    /// Where events go (the server's sink, known once the server runs).
    pub fn set_events(&self, sink: EventSink) {
        self.machine.set_events(sink.clone());
        let _ = self.events.set(sink);
    }

    /// The event sink (a disconnected one before [`MachineControl::set_events`]).
    pub fn events(&self) -> EventSink {
        self.events
            .get()
            .cloned()
            .unwrap_or_else(EventSink::disconnected)
    }
}

/// The qdev id and driver of the device at `addr` in `ids` (`Machine::device_ids`); empty for
/// functions no `--device` made (the host bridge).
fn id_and_driver(
    ids: &[(pci::PciAddress, String, String)],
    addr: pci::PciAddress,
) -> (String, String) {
    ids.iter()
        .find(|(a, _, _)| *a == addr)
        .map(|(_, id, d)| (id.clone(), d.clone()))
        .unwrap_or_default()
}

fn generic(e: impl std::fmt::Display) -> CommandError {
    CommandError::generic(e.to_string())
}

/// QEMU's error class for a machine error: `DeviceNotFound` for an unknown device id, else
/// `GenericError` (QEMU's other classes name situations we do not have).
fn command_error(e: crate::Error) -> CommandError {
    match e {
        crate::Error::Device(DeviceError::NotFound(id)) => CommandError::device_not_found(&id),
        other => generic(other),
    }
}

impl VmControl for MachineControl {
    fn status(&self) -> RunState {
        self.machine.run_state()
    }

    fn cont(&self) -> Result<(), CommandError> {
        let was = self.machine.run_state();
        self.machine.cont().map_err(command_error)?;
        if was != RunState::Running {
            self.events().resume();
        }
        Ok(())
    }

    fn stop(&self) -> Result<(), CommandError> {
        let was = self.machine.run_state();
        self.machine.pause().map_err(command_error)?;
        if was == RunState::Running {
            self.events().stop();
        }
        Ok(())
    }

    fn system_reset(&self) -> Result<(), CommandError> {
        // The run loop reboots the guest in place and emits RESET, or with --no-reboot ends
        // the machine (SHUTDOWN, reason host-qmp-system-reset), as QEMU does.
        self.machine.stop.stop(StopReason::Reset(ResetSource::Qmp));
        Ok(())
    }

    fn quit(&self) {
        self.machine.stop.stop(StopReason::Quit);
    }

    fn pci_functions(&self) -> Vec<PciFunctionInfo> {
        let ids = self.machine.device_ids();
        self.machine
            .functions()
            .into_iter()
            .map(|(addr, f)| {
                let cfg = f.config();
                let class = cfg.class_code();
                let (qdev_id, driver) = id_and_driver(&ids, addr);
                let regions = cfg
                    .bars()
                    .iter()
                    .map(|b| {
                        let io = !b.kind.is_memory();
                        let decoded = if io {
                            cfg.io_enabled()
                        } else {
                            cfg.mem_enabled()
                        };
                        PciRegionInfo {
                            bar: b.index as u8,
                            kind: if io {
                                RegionKind::Io
                            } else {
                                RegionKind::Memory
                            },
                            address: if decoded {
                                cfg.bar_address(b.index).unwrap_or(u64::MAX)
                            } else {
                                u64::MAX
                            },
                            size: b.size,
                            prefetch: matches!(
                                b.kind,
                                pci::config::BarKind::Mem32 { prefetchable: true }
                                    | pci::config::BarKind::Mem64 { prefetchable: true }
                            ),
                            mem_type_64: matches!(b.kind, pci::config::BarKind::Mem64 { .. }),
                        }
                    })
                    .collect();
                PciFunctionInfo {
                    bus: addr.bus(),
                    slot: addr.device(),
                    function: addr.function(),
                    class: (class >> 8) as u16,
                    prog_if: class as u8,
                    revision: cfg.revision(),
                    vendor: cfg.vendor_id(),
                    device: cfg.device_id(),
                    subsystem_vendor: cfg.subsystem_vendor_id(),
                    subsystem: cfg.subsystem_id(),
                    irq_pin: cfg.interrupt_pin(),
                    irq_line: cfg.interrupt_line(),
                    qdev_id,
                    driver: if driver.is_empty() {
                        f.name().to_string()
                    } else {
                        driver
                    },
                    regions,
                    props: Vec::new(),
                    bridge: pci::bridge::is_bridge(cfg).then(|| {
                        let (number, secondary, subordinate) = pci::bridge::bus_numbers(cfg);
                        let w = pci::bridge::windows(cfg);
                        PciBridgeInfo {
                            number,
                            secondary,
                            subordinate,
                            io_range: w.io,
                            memory_range: w.memory,
                            prefetchable_range: w.prefetchable,
                        }
                    }),
                }
            })
            .collect()
    }

    fn device_reports(&self) -> Vec<(pci::PciAddress, String, String)> {
        let ids = self.machine.device_ids();
        self.machine
            .functions()
            .into_iter()
            .filter_map(|(addr, f)| {
                let report = f.state_report()?;
                Some((addr, id_and_driver(&ids, addr).0, report))
            })
            .collect()
    }

    fn gsi_info(&self) -> Option<GsiInfo> {
        self.machine.with_guest(|g| {
            let vm = g.vm();
            let (msi, routes) = vm.msi_gsis();
            GsiInfo {
                msi,
                routes,
                intx_lines: vm.intx_lines(),
            }
        })
    }

    fn device_add(&self, args: &serde_json::Map<String, Value>) -> Result<(), CommandError> {
        let spec = DeviceSpec::from_qmp(args).map_err(generic)?;
        self.machine
            .device_add(spec)
            .map(|_| ())
            .map_err(command_error)
    }

    fn device_del(&self, id: &str) -> Result<(), CommandError> {
        // DEVICE_DELETED comes from the machine: at once for a cold-unplug, after the guest's
        // eject for a hot-unplug.
        self.machine
            .device_del(id)
            .map(|_| ())
            .map_err(command_error)
    }

    fn stats(
        &self,
        target: crate::monitor::stats::StatsTarget,
    ) -> Result<Vec<crate::monitor::stats::StatsSource>, CommandError> {
        self.machine
            .with_guest(|g| g.stats().read(target))
            .unwrap_or_else(|| Err("the guest is gone".into()))
            .map_err(CommandError::generic)
    }

    fn query_compat(&self) -> Result<Value, CommandError> {
        serde_json::to_value(self.machine.record()).map_err(generic)
    }

    fn save_compat(&self, path: &str) -> Result<(), CommandError> {
        self.machine
            .save_record(Path::new(path))
            .map_err(command_error)
    }

    fn query_machine(&self) -> Result<Value, CommandError> {
        serde_json::to_value(self.machine.description()).map_err(generic)
    }

    fn dump_machine(&self, path: &str) -> Result<(), CommandError> {
        self.machine
            .save_description(Path::new(path))
            .map_err(command_error)
    }
}
