//! Devices from the command line to the PCI bus, and the [`DeviceManager`] that owns them.
//!
//! `--device` strings / QMP / machine file -> [`DeviceSpec`]s ([`crate::device_config`]) -> ids
//! and addresses
//! ([`place`]: explicit addresses first, then hinted ones, then the first free slot in
//! command-line order) -> realized functions on the root complex ([`realize`]).
//!
//! Device ids: `id=` when given; a device without one is `device[N]`, N counting the id-less
//! devices in command-line order (QEMU's `/machine/peripheral-anon/device[N]`). An anonymous
//! device keeps its identity only as long as its position does: give ids to devices whose
//! address must survive edits of the command line.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

pub use crate::device_config::{parse_device, DeviceError, DeviceSpec, DriverConfig};

use devices::bus::{Bus, BusDevice};
use devices::legacy::{
    AcpiPm, EjectCallback, Ged, PciHotplug, PowerCallback, Rtc, Serial, ACPI_PM_PORT,
    ACPI_PM_PORT_LEN, GED_GSI, GED_PCI_HOTPLUG, GED_PORT, GED_PORT_LEN, I8042, I8042_COMMAND_PORT,
    I8042_DATA_PORT, PCI_HOTPLUG_PORT, PCI_HOTPLUG_PORT_LEN, RTC_PORT, RTC_PORT_LEN, SERIAL_IRQ,
    SERIAL_PORT, SERIAL_PORT_LEN,
};
use devices::pci_host::{BarMapper, ConfigPorts, Ecam};
use devices::virtio::blk::{Block, BlockConfig};
use devices::virtio::console::Console;
use devices::virtio::net::{default_mac, Net, Tap};
use devices::virtio::pci::{TransportProps, VirtioHost, VirtioPciDevice};
use devices::virtio::rng::Rng;
use devices::virtio::VirtioDevice;
use pci::config::{BarKind, PCI_INTERRUPT_LINE};
use pci::{Owner, PciAddress, PciFunction, PciRoot, SlotAllocator};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::drivers;
use crate::layout::{
    ECAM_SIZE, ECAM_START, PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN, PCI_MMIO32_SIZE, PCI_MMIO32_START,
};
use crate::vm::Vm;

/// A device with its id and address decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The spec it came from.
    pub spec: DeviceSpec,
    /// Its id (given, or `device[N]`).
    pub id: String,
    /// Where it sits.
    pub addr: PciAddress,
}

/// Gives every spec an id and an address on an empty bus (see [`DeviceSet::add`]).
pub fn place(
    specs: &[DeviceSpec],
    hints: &HashMap<String, PciAddress>,
) -> Result<Vec<Placed>, DeviceError> {
    place_into(
        &mut SlotAllocator::new(),
        &mut 0,
        &HashSet::new(),
        specs,
        hints,
    )
}

/// Gives every spec an id and an address, claiming slots in `slots`.
///
/// Order: explicit `addr=` first, then devices whose id has a hinted address (from a compat
/// record) when that address is still free, then everything else in command-line order, each
/// at function 0 of the first free slot from 1 up. `anon` counts the id-less devices so far;
/// `taken` holds the ids already in use.
pub fn place_into(
    slots: &mut SlotAllocator,
    anon: &mut usize,
    taken: &HashSet<String>,
    specs: &[DeviceSpec],
    hints: &HashMap<String, PciAddress>,
) -> Result<Vec<Placed>, DeviceError> {
    let mut ids = Vec::with_capacity(specs.len());
    let mut seen = taken.clone();
    for s in specs {
        let id = match &s.id {
            Some(id) => id.clone(),
            None => {
                *anon += 1;
                format!("device[{}]", *anon - 1)
            }
        };
        if !seen.insert(id.clone()) {
            return Err(DeviceError::DuplicateId(id));
        }
        ids.push(id);
    }
    let owner = |s: &DeviceSpec| Owner {
        driver: s.driver().to_string(),
        id: s.id.clone(),
        multifunction: s.multifunction,
    };
    let mut addrs: Vec<Option<PciAddress>> = vec![None; specs.len()];
    for (i, s) in specs.iter().enumerate() {
        if let Some((slot, func)) = s.addr {
            addrs[i] = Some(slots.claim(slot, func.unwrap_or(0), &owner(s))?);
        }
    }
    for (i, s) in specs.iter().enumerate() {
        if addrs[i].is_some() {
            continue;
        }
        if let Some(h) = hints.get(&ids[i]) {
            match slots.claim(h.device(), h.function(), &owner(s)) {
                Ok(a) => addrs[i] = Some(a),
                Err(e) => tracing::warn!("{}: recorded address {h} not usable ({e})", ids[i]),
            }
        }
    }
    for (i, s) in specs.iter().enumerate() {
        if addrs[i].is_none() {
            addrs[i] = Some(slots.auto(&owner(s))?);
        }
    }
    slots.validate()?;
    Ok(specs
        .iter()
        .zip(ids)
        .zip(addrs)
        .filter_map(|((s, id), a)| {
            a.map(|addr| Placed {
                spec: s.clone(),
                id,
                addr,
            })
        })
        .collect())
}

/// The devices of one machine: the slot allocator's state and every realized device.
/// Changes are all-or-nothing: a failed [`DeviceSet::add`] leaves the set as it was.
#[derive(Default)]
pub struct DeviceSet {
    slots: SlotAllocator,
    anon: usize,
    realized: Vec<Realized>,
}

impl DeviceSet {
    /// An empty set (the host bridge's slot reserved).
    pub fn new() -> Self {
        Self::default()
    }

    /// Places and realizes `specs` onto `root`, around the devices already there.
    pub fn add(
        &mut self,
        specs: &[DeviceSpec],
        hints: &HashMap<String, PciAddress>,
        root: &PciRoot,
        mem: &GuestMemoryMmap,
        host: Arc<dyn VirtioHost>,
    ) -> Result<Vec<PciAddress>, DeviceError> {
        let mut slots = self.slots.clone();
        let mut anon = self.anon;
        let taken: HashSet<String> = self.realized.iter().map(|r| r.placed.id.clone()).collect();
        let placed = place_into(&mut slots, &mut anon, &taken, specs, hints)?;
        let mut sorted: Vec<&Placed> = placed.iter().collect();
        sorted.sort_by_key(|p| p.addr);
        let mut new = Vec::new();
        for p in sorted {
            match realize_one(p, root, mem, host.clone()) {
                Ok(r) => new.push(r),
                Err(e) => {
                    for r in &new {
                        root.remove(r.placed.addr);
                    }
                    return Err(e);
                }
            }
        }
        let addrs = new.iter().map(|r| r.placed.addr).collect();
        self.slots = slots;
        self.anon = anon;
        self.realized.extend(new);
        self.realized.sort_by_key(|r| r.placed.addr);
        Ok(addrs)
    }

    /// Removes the device `id` from `root` and frees its slot. The device gives back its host
    /// resources when the returned [`Realized`] is dropped.
    pub fn remove(&mut self, id: &str, root: &PciRoot) -> Result<Realized, DeviceError> {
        let i = self
            .realized
            .iter()
            .position(|r| r.placed.id == id)
            .ok_or_else(|| DeviceError::NotFound(id.to_string()))?;
        let addr = self.realized[i].placed.addr;
        if addr.function() == 0 {
            if let Some(other) = self
                .realized
                .iter()
                .find(|r| r.placed.addr.device() == addr.device() && r.placed.addr.function() > 0)
            {
                return Err(DeviceError::Function0Busy {
                    slot: addr.device(),
                    function: other.placed.addr.function(),
                });
            }
        }
        let r = self.realized.remove(i);
        root.remove(r.placed.addr);
        self.slots.release(r.placed.addr);
        Ok(r)
    }

    /// The realized devices in address order.
    pub fn devices(&self) -> &[Realized] {
        &self.realized
    }

    /// Where every device sits, without the devices themselves.
    pub fn placement(&self) -> Placement {
        Placement {
            slots: self.slots.clone(),
            anon: self.anon,
            placed: self.realized.iter().map(|r| r.placed.clone()).collect(),
        }
    }

    /// Realizes every device of `placement` again, at its address, at its power-on state
    /// (a reboot). All or nothing.
    pub fn realize_placement(
        placement: &Placement,
        root: &PciRoot,
        mem: &GuestMemoryMmap,
        host: Arc<dyn VirtioHost>,
    ) -> Result<DeviceSet, DeviceError> {
        let mut realized = Vec::with_capacity(placement.placed.len());
        for p in &placement.placed {
            match realize_one(p, root, mem, host.clone()) {
                Ok(r) => realized.push(r),
                Err(e) => {
                    for r in &realized {
                        root.remove(r.placed.addr);
                    }
                    return Err(e);
                }
            }
        }
        Ok(DeviceSet {
            slots: placement.slots.clone(),
            anon: placement.anon,
            realized,
        })
    }
}

/// Every device's id, spec and address and the slot allocator's state: what outlives one run
/// of the guest (see [`DeviceManager::rebuilt`]).
#[derive(Clone)]
pub struct Placement {
    slots: SlotAllocator,
    anon: usize,
    placed: Vec<Placed>,
}

/// Errors of the device manager: device options and placement in QEMU's words, or the host
/// resources (buses, KVM) a device needed, with their source.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// A device option, placement or realization error (QEMU's wording).
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A fixed device could not be put on a bus.
    #[error("{what}: {source}")]
    Bus {
        /// Which device.
        what: &'static str,
        /// The bus's refusal.
        #[source]
        source: devices::bus::BusError,
    },
    /// A KVM call for a device failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being set up.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A host resource (an eventfd) could not be had.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Owns everything devices live in: the port and MMIO buses, the PCI root complex and its
/// config mechanisms, the BAR mapper, the placed and realized PCI devices, and the fixed
/// legacy devices (COM1, i8042, CMOS clock, ACPI PM port).
///
/// Its two verbs, [`DeviceManager::add`] and [`DeviceManager::remove`], serve start-up,
/// cold-plug and hot-plug alike. Both are all-or-nothing, and both run on the monitor's or the
/// main thread, never on a vCPU: vCPUs only read the buses through their own readers.
pub struct DeviceManager {
    vm: Arc<Vm>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    root: Arc<PciRoot>,
    mapper: Arc<BarMapper>,
    set: Mutex<DeviceSet>,
    serial: Arc<Serial>,
    hotplug: Option<HotplugHardware>,
}

/// The guest-visible side of ACPI PCI hot-plug: QEMU's register block (PCIU/PCID/B0EJ) and the
/// Generic Event Device whose interrupt makes the guest read it.
struct HotplugHardware {
    regs: Arc<PciHotplug>,
    ged: Arc<Ged>,
}

impl DeviceManager {
    /// The fixed devices of the machine on fresh buses: COM1 (guest output to `console`), the
    /// i8042 and ACPI PM port (reporting to `power`), the CMOS clock, and the PCI host bridge
    /// with its CF8/CFC ports and ECAM window. No PCI device yet.
    ///
    /// With `eject` (ACPI PCI hot-plug on), the hot-plug registers and the GED are on the port
    /// bus too; `eject` is called on a vCPU thread with the slot the guest ejected (it must only
    /// post and return).
    pub fn new(
        vm: Arc<Vm>,
        power: PowerCallback,
        console: Box<dyn std::io::Write + Send>,
        eject: Option<EjectCallback>,
    ) -> Result<Self, DeviceManagerError> {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let serial_irq = EventFd::new(0)?;
        vm.fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|source| DeviceManagerError::Kvm {
                what: "irqfd for the serial port",
                source,
            })?;
        let serial = Arc::new(Serial::new(serial_irq, console));
        let i8042 = Arc::new(I8042::new(power.clone()));
        let on_pio = |what: &'static str, base: u64, len: u64, dev: Arc<dyn BusDevice>| {
            pio.insert(base, len, dev)
                .map_err(|source| DeviceManagerError::Bus { what, source })
        };
        on_pio("COM1", SERIAL_PORT, SERIAL_PORT_LEN, serial.clone())?;
        on_pio("i8042", I8042_DATA_PORT, 1, i8042.clone())?;
        on_pio("i8042", I8042_COMMAND_PORT, 1, i8042)?;
        on_pio("CMOS clock", RTC_PORT, RTC_PORT_LEN, Arc::new(Rtc::new()))?;
        on_pio(
            "ACPI PM",
            ACPI_PM_PORT,
            ACPI_PM_PORT_LEN,
            Arc::new(AcpiPm::new(power)),
        )?;
        let root = Arc::new(PciRoot::new());
        let mapper = Arc::new(BarMapper::new(root.clone(), &pio, &mmio));
        on_pio(
            "PCI config ports",
            PCI_CONFIG_PORT,
            PCI_CONFIG_PORT_LEN,
            Arc::new(ConfigPorts::new(root.clone(), mapper.clone())),
        )?;
        mmio.insert(
            ECAM_START,
            ECAM_SIZE,
            Arc::new(Ecam::new(root.clone(), mapper.clone())),
        )
        .map_err(|source| DeviceManagerError::Bus {
            what: "ECAM",
            source,
        })?;
        let hotplug = match eject {
            Some(eject) => {
                let regs = Arc::new(PciHotplug::new(eject));
                on_pio(
                    "PCI hot-plug registers",
                    PCI_HOTPLUG_PORT,
                    PCI_HOTPLUG_PORT_LEN,
                    regs.clone(),
                )?;
                let irq = EventFd::new(0)?;
                vm.fd
                    .register_irqfd(&irq, GED_GSI)
                    .map_err(|source| DeviceManagerError::Kvm {
                        what: "irqfd for the generic event device",
                        source,
                    })?;
                let ged = Arc::new(Ged::new(irq));
                on_pio("ACPI GED", GED_PORT, GED_PORT_LEN, ged.clone())?;
                Some(HotplugHardware { regs, ged })
            }
            None => None,
        };
        Ok(DeviceManager {
            vm,
            pio,
            mmio,
            root,
            mapper,
            set: Mutex::new(DeviceSet::new()),
            serial,
            hotplug,
        })
    }

    /// Tells the guest that slot `slot` has a new device (PCIU bit, GED interrupt). Nothing
    /// without hot-plug hardware.
    pub fn notify_plugged(&self, slot: u8) -> Result<(), DeviceManagerError> {
        if let Some(h) = &self.hotplug {
            h.regs.plugged(slot).map_err(std::io::Error::other)?;
            h.ged.notify(GED_PCI_HOTPLUG)?;
        }
        Ok(())
    }

    /// Asks the guest to eject slot `slot` (PCID bit, stays set until the eject; GED
    /// interrupt). Asking again is harmless.
    pub fn request_unplug(&self, slot: u8) -> Result<(), DeviceManagerError> {
        if let Some(h) = &self.hotplug {
            h.regs.unplug_request(slot).map_err(std::io::Error::other)?;
            h.ged.notify(GED_PCI_HOTPLUG)?;
        }
        Ok(())
    }

    /// Whether the guest has an eject of `slot` outstanding (asked, not yet ejected).
    pub fn unplug_pending(&self, slot: u8) -> bool {
        self.hotplug
            .as_ref()
            .is_some_and(|h| h.regs.removal_pending(slot))
    }

    /// Whether the guest has GED events it has not read yet (its interrupt may have been lost,
    /// e.g. raised before its driver was up).
    pub fn events_unread(&self) -> bool {
        self.hotplug.as_ref().is_some_and(|h| h.ged.pending() != 0)
    }

    /// Raises the GED interrupt again for events still unread.
    pub fn renotify(&self) -> Result<(), DeviceManagerError> {
        if let Some(h) = &self.hotplug {
            let pending = h.ged.pending();
            if pending != 0 {
                h.ged.notify(pending)?;
            }
        }
        Ok(())
    }

    /// A device manager for a new run of the guest on `vm`: fresh fixed devices, and every PCI
    /// device of `placement` realized again at its address, at its power-on state.
    pub fn rebuilt(
        vm: Arc<Vm>,
        power: PowerCallback,
        console: Box<dyn std::io::Write + Send>,
        eject: Option<EjectCallback>,
        placement: &Placement,
    ) -> Result<Self, DeviceManagerError> {
        let dm = DeviceManager::new(vm, power, console, eject)?;
        let set = DeviceSet::realize_placement(placement, &dm.root, &dm.vm.mem, dm.vm.clone())?;
        let addrs: Vec<PciAddress> = set.devices().iter().map(|r| r.placed.addr).collect();
        *dm.set() = set;
        for a in addrs {
            dm.mapper.remap(a);
        }
        Ok(dm)
    }

    /// Where every device sits (to rebuild them after a reset).
    pub fn placement(&self) -> Placement {
        self.set().placement()
    }

    fn set(&self) -> std::sync::MutexGuard<'_, DeviceSet> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Places `specs` around the devices already there (explicit addresses, then `hints`,
    /// then the first free slot), realizes them and maps their BARs. Returns the new devices'
    /// ids and addresses in address order. On error nothing was added.
    pub fn add(
        &self,
        specs: &[DeviceSpec],
        hints: &HashMap<String, PciAddress>,
    ) -> Result<Vec<(String, PciAddress)>, DeviceManagerError> {
        let mut set = self.set();
        let addrs = set.add(specs, hints, &self.root, &self.vm.mem, self.vm.clone())?;
        for a in &addrs {
            self.mapper.remap(*a);
        }
        let ids = set
            .devices()
            .iter()
            .filter(|r| addrs.contains(&r.placed.addr))
            .map(|r| (r.placed.addr, r.placed.id.clone()))
            .collect::<HashMap<_, _>>();
        Ok(addrs
            .iter()
            .filter_map(|a| ids.get(a).map(|id| (id.clone(), *a)))
            .collect())
    }

    /// Removes the device `id`: off the root complex, its BARs unmapped, its slot free, and
    /// everything it took from the host given back (MSI GSIs and routes, irqfds, its INTx
    /// line, ioeventfds, its worker thread, its files) before this returns.
    pub fn remove(&self, id: &str) -> Result<(), DeviceManagerError> {
        let mut set = self.set();
        let r = set.remove(id, &self.root)?;
        self.mapper.remap(r.placed.addr);
        drop(r);
        Ok(())
    }

    /// Calls `f` with the realized devices in address order.
    pub fn with_devices<R>(&self, f: impl FnOnce(&[Realized]) -> R) -> R {
        f(self.set().devices())
    }

    /// The root complex (every function, the host bridge included).
    pub fn root(&self) -> &Arc<PciRoot> {
        &self.root
    }

    /// The port I/O bus.
    pub fn pio(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// The MMIO bus.
    pub fn mmio(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// COM1, the guest console.
    pub fn serial(&self) -> &Arc<Serial> {
        &self.serial
    }
}

/// Builds the virtio device for a config. `id` is the device's id (given or `device[N]`), from
/// which defaults such as a MAC address derive.
pub fn build_device(config: &DriverConfig, id: &str) -> Result<Arc<dyn VirtioDevice>, String> {
    match config {
        DriverConfig::Rng(_) => Ok(Arc::new(Rng::new())),
        DriverConfig::Blk(c) => Ok(Arc::new(Block::new(&BlockConfig {
            path: c.file.clone(),
            readonly: c.readonly.unwrap_or(false),
            serial: c.serial.clone(),
        })?)),
        DriverConfig::Console(c) => Ok(Arc::new(Console::new(&c.backend)?)),
        DriverConfig::Net(c) => {
            let mac = c.mac.map_or_else(|| default_mac(id), |m| m.0);
            let tap = Tap::open(&c.tap)?;
            Ok(Arc::new(Net::new(tap, mac)))
        }
    }
}

/// A device realized on the bus. Dropping it gives back what the device took from the host
/// ([`VirtioPciDevice::release`]: GSIs, irqfds, ioeventfds, worker, files), on the thread
/// that drops it: the device set's owner (monitor or main thread), never a vCPU.
pub struct Realized {
    /// Its placement.
    pub placed: Placed,
    /// The function on the root complex.
    pub function: Arc<dyn PciFunction>,
    /// The ABI-shaping properties the realized device has (recorded in fingerprints).
    pub abi: BTreeMap<String, String>,
    /// The same function as a virtio transport (to release it).
    transport: Arc<VirtioPciDevice>,
}

impl Drop for Realized {
    fn drop(&mut self) {
        self.transport.release();
    }
}

fn transport_props(p: &Placed) -> TransportProps {
    TransportProps {
        vectors: p.spec.config.effective_vectors(),
        multifunction: p.spec.multifunction,
    }
}

/// Bytes of the 32-bit PCI window reserved for each function's BARs.
///
/// Each function's BARs live in a window of their own at `PCI_MMIO32_START + devfn * size`, so a
/// device's BAR addresses depend on its address only: adding or removing other devices never
/// moves them (the guest's `lspci -vvv` stays identical).
pub const FUNCTION_BAR_WINDOW: u64 = 0x4_0000;

/// Builds one placed device, gives its BARs their addresses in the function's own window, and
/// adds it to `root`.
pub fn realize_one(
    p: &Placed,
    root: &PciRoot,
    mem: &GuestMemoryMmap,
    host: Arc<dyn VirtioHost>,
) -> Result<Realized, DeviceError> {
    let realize_err = |reason: String| DeviceError::Realize {
        id: p.id.clone(),
        reason,
    };
    let device = build_device(&p.spec.config, &p.id).map_err(realize_err)?;
    let f = VirtioPciDevice::new(
        p.spec.driver(),
        device,
        transport_props(p),
        mem.clone(),
        host,
    )
    .map_err(|e| realize_err(e.to_string()))?;
    let abi = f.abi_props();
    let cfg = f.config();
    let pin = cfg.interrupt_pin();
    if pin > 0 {
        let gsi = crate::acpi::intx_gsi(p.addr.device(), pin - 1);
        cfg.set_raw(PCI_INTERRUPT_LINE, &[gsi as u8]);
        f.connect_intx(gsi);
    }
    let window = PCI_MMIO32_START + u64::from(p.addr.devfn()) * FUNCTION_BAR_WINDOW;
    let mut next = window;
    for bar in cfg.bars() {
        let base = next.next_multiple_of(bar.size);
        if matches!(bar.kind, BarKind::Io) || base + bar.size > window + FUNCTION_BAR_WINDOW {
            return Err(DeviceError::NoBarSpace {
                device: p.id.clone(),
                bar: bar.index,
            });
        }
        cfg.set_bar_address(bar.index, base)
            .map_err(|e| realize_err(e.to_string()))?;
        next = base + bar.size;
    }
    debug_assert!(window + FUNCTION_BAR_WINDOW <= PCI_MMIO32_START + PCI_MMIO32_SIZE);
    let transport = Arc::new(f);
    let function: Arc<dyn PciFunction> = transport.clone();
    root.add(p.addr, function.clone())
        .map_err(|e| realize_err(e.to_string()))?;
    Ok(Realized {
        placed: p.clone(),
        function,
        abi,
        transport,
    })
}

/// The `--help` text describing `--device`.
pub fn device_help() -> String {
    let mut s = String::from(
        "Devices (--device DRIVER[,id=ID][,addr=SS[.F]][,multifunction=on|off][,bus=pci.0][,PROP=VALUE...]):\n",
    );
    s.push_str("  Properties of every device:\n");
    for p in drivers::COMMON_PROPS {
        s.push_str(&format!("    {:<14} {}\n", p.name, p.help));
    }
    for d in drivers::DRIVERS {
        s.push_str(&format!("  {}: {}\n", d.name, d.help));
        for p in d.props {
            s.push_str(&format!("    {:<14} {}\n", p.name, p.help));
        }
    }
    s.push_str(
        "  Devices without addr= take function 0 of the first free slot from 1 up, in\n  \
         command-line order, after every explicit address is reserved. Devices without id=\n  \
         are called device[0], device[1], ... in command-line order. A doubled comma in a value\n  \
         is a comma: file=/img/a,,b.raw opens /img/a,b.raw.\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(list: &[&str]) -> Vec<DeviceSpec> {
        list.iter().map(|s| parse_device(s).unwrap()).collect()
    }

    fn placed(list: &[&str]) -> Result<Vec<(String, String)>, String> {
        place(&specs(list), &HashMap::new())
            .map(|v| v.into_iter().map(|p| (p.id, p.addr.to_string())).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn explicit_addresses_first_then_first_free_slot_in_order() {
        let p = placed(&[
            "virtio-rng-pci,id=rng0,addr=05.0",
            "virtio-rng-pci,id=rng1",
            "virtio-rng-pci,id=rng2,addr=1f.0",
            "virtio-rng-pci",
            "virtio-rng-pci,addr=1",
        ])
        .unwrap();
        let got: Vec<(&str, &str)> = p.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(
            got,
            [
                ("rng0", "00:05.0"),
                ("rng1", "00:02.0"),
                ("rng2", "00:1f.0"),
                ("device[0]", "00:03.0"),
                ("device[1]", "00:01.0"),
            ]
        );
    }

    #[test]
    fn placement_errors_have_qemu_messages() {
        assert_eq!(
            placed(&["virtio-rng-pci,id=disk0,addr=5", "virtio-rng-pci,addr=5"]).unwrap_err(),
            "PCI: slot 5 function 0 not available for virtio-rng-pci, in use by virtio-rng-pci,id=disk0"
        );
        assert_eq!(
            placed(&["virtio-rng-pci,id=a", "virtio-rng-pci,id=a"]).unwrap_err(),
            "Duplicate ID 'a' for device"
        );
        assert_eq!(
            placed(&["virtio-rng-pci,addr=5", "virtio-rng-pci,addr=5.1"]).unwrap_err(),
            "PCI: single function device can't be populated in function 5.1"
        );
        assert_eq!(
            placed(&["virtio-rng-pci,addr=5.1"]).unwrap_err(),
            "PCI: function 0 missing for 5.1: a multifunction slot needs function 0"
        );
        assert!(placed(&["virtio-rng-pci,addr=0"])
            .unwrap_err()
            .contains("host bridge"));
        let full: Vec<String> = (0..32).map(|_| "virtio-rng-pci".to_string()).collect();
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        assert_eq!(
            placed(&full).unwrap_err(),
            "PCI: no slot/function available for virtio-rng-pci, all in use or reserved"
        );
    }

    #[test]
    fn multifunction_slot() {
        let p = placed(&[
            "virtio-rng-pci,id=f0,addr=6.0,multifunction=on",
            "virtio-rng-pci,id=f1,addr=6.1",
            "virtio-rng-pci,id=x",
        ])
        .unwrap();
        assert_eq!(p[1].1, "00:06.1");
        assert_eq!(p[2].1, "00:01.0");
        assert!(placed(&["virtio-rng-pci,id=f1,addr=6.1"]).is_err());
    }

    #[test]
    fn hints_are_honoured_and_new_devices_go_around_them() {
        let mut hints = HashMap::new();
        hints.insert("b".to_string(), PciAddress::new(0, 1, 0).unwrap());
        hints.insert("c".to_string(), PciAddress::new(0, 3, 0).unwrap());
        let p = place(
            &specs(&[
                "virtio-rng-pci,id=new",
                "virtio-rng-pci,id=c",
                "virtio-rng-pci,id=b",
            ]),
            &hints,
        )
        .unwrap();
        let got: Vec<String> = p.iter().map(|p| format!("{}@{}", p.id, p.addr)).collect();
        assert_eq!(got, ["new@00:02.0", "c@00:03.0", "b@00:01.0"]);
        // An explicit address wins over a hint.
        let p = place(&specs(&["virtio-rng-pci,id=b,addr=7"]), &hints).unwrap();
        assert_eq!(p[0].addr.to_string(), "00:07.0");
    }

    /// Property: over random sequences of restarts that remove and add devices (ids only, no
    /// addresses), with each start's addresses fed back as hints, no surviving device ever moves
    /// and every start succeeds while the bus has room.
    #[test]
    fn random_restarts_never_move_a_survivor() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _case in 0..200 {
            let mut next_id = 0;
            let mut live: Vec<String> = Vec::new();
            let mut hints: HashMap<String, PciAddress> = HashMap::new();
            for _restart in 0..12 {
                live.retain(|_| rand(4) != 0);
                for _ in 0..rand(5) {
                    if live.len() < 28 {
                        live.push(format!("d{next_id}"));
                        next_id += 1;
                    }
                }
                // Shuffle the command-line order too: it must not matter for survivors.
                for i in (1..live.len()).rev() {
                    live.swap(i, rand(i as u64 + 1) as usize);
                }
                let specs: Vec<DeviceSpec> = live
                    .iter()
                    .map(|id| parse_device(&format!("virtio-rng-pci,id={id}")).unwrap())
                    .collect();
                let placed = place(&specs, &hints).unwrap();
                for p in &placed {
                    if let Some(old) = hints.get(&p.id) {
                        assert_eq!(*old, p.addr, "{} moved", p.id);
                    }
                }
                hints = placed.into_iter().map(|p| (p.id, p.addr)).collect();
            }
        }
    }

    fn config(s: &str) -> DriverConfig {
        parse_device(s).unwrap().config
    }

    #[test]
    fn build_checks_backends() {
        let e = |s: &str| build_device(&config(s), "x").err().unwrap();
        assert_eq!(
            e("virtio-blk-pci,file=/nonexistent/a.img"),
            "Could not open '/nonexistent/a.img': No such file or directory"
        );
        assert_eq!(
            e("virtio-console-pci,path=/nonexistent/dir/o"),
            "Could not open '/nonexistent/dir/o': No such file or directory"
        );
        let dir = std::env::temp_dir().join(format!("drivers-test-{},x", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A comma in the path: escaped in the option, a plain comma in the file name opened.
        let img = dir.join("a,b.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let path = img.to_str().unwrap().replace(',', ",,");
        let rw = build_device(&config(&format!("virtio-blk-pci,file={path}")), "d0").unwrap();
        let ro = build_device(
            &config(&format!("virtio-blk-pci,file={path},readonly=on")),
            "d1",
        )
        .unwrap();
        let ro_bit = devices::virtio::blk::F_RO;
        assert_eq!(rw.features() & ro_bit, 0);
        assert_ne!(ro.features() & ro_bit, 0);
        let mut cap = [0u8; 8];
        rw.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
