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

pub use crate::device_config::{parse_device, DeviceError, DeviceSpec, DriverConfig, ROOT_BUS};

use devices::bus::{Bus, BusDevice};
use devices::legacy::{
    slots_in, AcpiPm, EjectCallback, Ged, PciHotplug, PowerCallback, Rtc, Serial, ACPI_PM_PORT,
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
use pci::{BridgeSetup, Owner, PciAddress, PciBridge, PciFunction, PciRoot, SlotAllocator};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::compat::MachineProps;
use crate::drivers;
use crate::layout::{
    ecam_size, ECAM_START, PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN, PCI_MMIO32_SIZE, PCI_MMIO32_START,
};
use crate::vm::Vm;

/// A device with its id and address decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The spec it came from.
    pub spec: DeviceSpec,
    /// Its id (given, or `device[N]`).
    pub id: String,
    /// The bus it sits on: `pci.0` or a bridge's id (`bus=`, else the recorded bus).
    pub bus: String,
    /// Where it sits, with its bus's number.
    pub addr: PciAddress,
}

/// A recorded place for a device id: the bus by name and the slot and function on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    /// `pci.0` or a bridge's id.
    pub bus: String,
    /// Slot.
    pub slot: u8,
    /// Function.
    pub function: u8,
}

impl Hint {
    /// A hint for `slot.function` on the root bus.
    pub fn root(addr: PciAddress) -> Self {
        Hint {
            bus: ROOT_BUS.to_string(),
            slot: addr.device(),
            function: addr.function(),
        }
    }
}

/// One bus as placement numbered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusInfo {
    /// Its number (0 for `pci.0`).
    pub number: u8,
    /// The highest bus number behind it (its own number when no bridge is behind it).
    pub subordinate: u8,
    /// For a bridge's bus: the bus the bridge sits on and the bridge's devfn there.
    pub upstream: Option<(String, u8)>,
    /// For a bridge's bus: the bridge's chassis number.
    pub chassis: u8,
}

/// Every bus of a machine: its slot allocator and its number.
///
/// Bus numbers are assigned as firmware does for QEMU (SeaBIOS, OVMF), depth first: starting
/// from bus 0, each bus's bridges in devfn order get the next free number for their secondary
/// bus, then the buses behind that bridge are numbered before its next sibling; a bridge's
/// subordinate number is the last number given behind it. The numbers thus depend only on
/// where the bridges are (their addresses), never on the other devices, their order on the
/// command line or their ids: adding or removing an endpoint renumbers nothing; adding or
/// removing a bridge renumbers the bridges after it in that order, exactly as it does under
/// QEMU and its firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buses {
    slots: BTreeMap<String, SlotAllocator>,
    info: BTreeMap<String, BusInfo>,
}

impl Default for Buses {
    fn default() -> Self {
        Buses {
            slots: [(ROOT_BUS.to_string(), SlotAllocator::new())].into(),
            info: [(
                ROOT_BUS.to_string(),
                BusInfo {
                    number: 0,
                    subordinate: 0,
                    upstream: None,
                    chassis: 0,
                },
            )]
            .into(),
        }
    }
}

impl Buses {
    /// The bus called `name`.
    pub fn get(&self, name: &str) -> Option<&BusInfo> {
        self.info.get(name)
    }

    /// Whether any bridge is there.
    pub fn has_bridges(&self) -> bool {
        self.info.len() > 1
    }

    /// Where INTx pin `pin` (0 = INTA) of slot `slot` on bus `bus` arrives on bus 0: the
    /// (slot, pin) of bus 0 after the standard swizzle at every bridge
    /// (`pin = (pin + slot) % 4`, then the bridge's own slot), as Linux and firmware assume for
    /// bridges without their own `_PRT`.
    pub fn intx_on_root(&self, bus: &str, slot: u8, pin: u8) -> (u8, u8) {
        let (mut name, mut slot, mut pin) = (bus.to_string(), slot, pin);
        for _ in 0..self.info.len() {
            match self.info.get(&name).and_then(|i| i.upstream.clone()) {
                Some((parent, devfn)) => {
                    pin = (pin + slot) % 4;
                    slot = devfn >> 3;
                    name = parent;
                }
                None => break,
            }
        }
        (slot, pin)
    }

    /// Numbers every bus depth first (see the type's docs); `bridges` maps each bridge's id to
    /// (its bus, its devfn, its chassis).
    fn number(&mut self, bridges: &BTreeMap<String, (String, u8, u8)>) -> Result<(), DeviceError> {
        let mut children: BTreeMap<&str, Vec<(u8, &str)>> = BTreeMap::new();
        for (id, (bus, devfn, _)) in bridges {
            children.entry(bus).or_default().push((*devfn, id));
        }
        for c in children.values_mut() {
            c.sort_unstable();
        }
        fn visit(
            bus: &str,
            children: &BTreeMap<&str, Vec<(u8, &str)>>,
            next: &mut u16,
            out: &mut Vec<(String, u8, u8, String, u8)>,
        ) -> Result<(), DeviceError> {
            for (devfn, child) in children.get(bus).map(Vec::as_slice).unwrap_or_default() {
                *next += 1;
                let secondary = u8::try_from(*next)
                    .map_err(|_| DeviceError::TooManyBuses(child.to_string()))?;
                visit(child, children, next, out)?;
                // `next` is at most 255 here: the visit would have failed otherwise.
                let subordinate = u8::try_from(*next).unwrap_or(u8::MAX);
                out.push((
                    child.to_string(),
                    secondary,
                    subordinate,
                    bus.to_string(),
                    *devfn,
                ));
            }
            Ok(())
        }
        let mut next = 0u16;
        let mut out = Vec::new();
        visit(ROOT_BUS, &children, &mut next, &mut out)?;
        let mut info: BTreeMap<String, BusInfo> = BTreeMap::new();
        info.insert(
            ROOT_BUS.to_string(),
            BusInfo {
                number: 0,
                subordinate: u8::try_from(next).unwrap_or(u8::MAX),
                upstream: None,
                chassis: 0,
            },
        );
        for (id, number, subordinate, bus, devfn) in out {
            let chassis = bridges.get(&id).map_or(0, |b| b.2);
            info.insert(
                id,
                BusInfo {
                    number,
                    subordinate,
                    upstream: Some((bus, devfn)),
                    chassis,
                },
            );
        }
        self.info = info;
        Ok(())
    }
}

/// Gives every spec an id and an address on an empty machine (see [`DeviceSet::add`]).
pub fn place(
    specs: &[DeviceSpec],
    hints: &HashMap<String, Hint>,
) -> Result<Vec<Placed>, DeviceError> {
    place_into(&mut Buses::default(), &mut 0, &HashSet::new(), specs, hints)
}

/// Gives every spec an id, a bus and an address, claiming slots in `buses` and numbering the
/// buses of new bridges.
///
/// Buses: `bus=` names `pci.0` or a bridge (one already there or one among `specs`, in any
/// order); anything else, a device that is not a bridge, or a bridge behind itself is QEMU's
/// "Bus '...' not found". Order of claims, on each device's bus: explicit `addr=` first, then
/// devices whose id has a hinted place (from a compat record) when its bus exists and the
/// place is still free (a given `bus=` must match it), then everything else in command-line
/// order, each at function 0 of the first free slot (from 1 on bus 0, from 0 behind a
/// bridge). `anon` counts the id-less devices so far; `taken` holds the ids already in use.
pub fn place_into(
    buses: &mut Buses,
    anon: &mut usize,
    taken: &HashSet<String>,
    specs: &[DeviceSpec],
    hints: &HashMap<String, Hint>,
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
        if !seen.insert(id.clone()) || (s.is_bridge() && buses.slots.contains_key(&id)) {
            return Err(DeviceError::DuplicateId(id));
        }
        ids.push(id);
    }
    // The buses of new bridges exist from now on (a device may name one given after it).
    for (s, id) in specs.iter().zip(&ids) {
        if s.is_bridge() {
            buses.slots.insert(id.clone(), SlotAllocator::secondary());
        }
    }
    let owner = |s: &DeviceSpec| Owner {
        driver: s.driver().to_string(),
        id: s.id.clone(),
        multifunction: s.multifunction,
    };
    // Each device's bus and, when a hint places it, its hinted slot.
    let mut bus_of: Vec<String> = Vec::with_capacity(specs.len());
    let mut hinted: Vec<Option<&Hint>> = vec![None; specs.len()];
    for (i, s) in specs.iter().enumerate() {
        let hint = hints
            .get(&ids[i])
            .filter(|h| s.addr.is_none() && s.bus.as_ref().is_none_or(|b| *b == h.bus));
        let bus = match (&s.bus, hint) {
            (Some(b), _) => b.clone(),
            (None, Some(h)) if buses.slots.contains_key(&h.bus) => h.bus.clone(),
            (None, Some(h)) => {
                tracing::warn!("{}: recorded bus '{}' does not exist", ids[i], h.bus);
                ROOT_BUS.to_string()
            }
            (None, None) => ROOT_BUS.to_string(),
        };
        if !buses.slots.contains_key(&bus) {
            return Err(DeviceError::NoBus(bus));
        }
        hinted[i] = hint.filter(|h| h.bus == bus);
        bus_of.push(bus);
    }
    // A bridge must not sit behind itself: follow each new bridge's buses up to pci.0.
    let parent_of = |bus: &str| -> Option<String> {
        match specs
            .iter()
            .zip(&ids)
            .position(|(s, id)| s.is_bridge() && id == bus)
        {
            Some(j) => Some(bus_of[j].clone()),
            None => buses
                .info
                .get(bus)
                .and_then(|i| i.upstream.clone())
                .map(|u| u.0),
        }
    };
    for (i, s) in specs.iter().enumerate() {
        if !s.is_bridge() {
            continue;
        }
        let mut bus = bus_of[i].clone();
        for _ in 0..=specs.len() + buses.info.len() {
            if bus == ids[i] {
                return Err(DeviceError::NoBus(bus_of[i].clone()));
            }
            match parent_of(&bus) {
                Some(p) => bus = p,
                None => break,
            }
        }
        if bus != ROOT_BUS {
            return Err(DeviceError::NoBus(bus_of[i].clone()));
        }
    }
    let mut claimed: Vec<Option<PciAddress>> = vec![None; specs.len()];
    for (i, s) in specs.iter().enumerate() {
        if let Some((slot, func)) = s.addr {
            let slots = buses
                .slots
                .get_mut(&bus_of[i])
                .ok_or_else(|| DeviceError::NoBus(bus_of[i].clone()))?;
            claimed[i] = Some(slots.claim(slot, func.unwrap_or(0), &owner(s))?);
        }
    }
    for (i, s) in specs.iter().enumerate() {
        let (None, Some(h)) = (claimed[i], hinted[i]) else {
            continue;
        };
        let Some(slots) = buses.slots.get_mut(&bus_of[i]) else {
            continue;
        };
        match slots.claim(h.slot, h.function, &owner(s)) {
            Ok(a) => claimed[i] = Some(a),
            Err(e) => tracing::warn!(
                "{}: recorded address {}:{:02x}.{} not usable ({e})",
                ids[i],
                h.bus,
                h.slot,
                h.function
            ),
        }
    }
    for (i, s) in specs.iter().enumerate() {
        if claimed[i].is_none() {
            let slots = buses
                .slots
                .get_mut(&bus_of[i])
                .ok_or_else(|| DeviceError::NoBus(bus_of[i].clone()))?;
            claimed[i] = Some(slots.auto(&owner(s))?);
        }
    }
    for slots in buses.slots.values() {
        slots.validate()?;
    }
    // Every bus gets its number (too many buses is the error to report first: more than 255
    // bridges always repeat a chassis number); then chassis numbers are unique.
    let mut bridges: BTreeMap<String, (String, u8, u8)> = buses
        .info
        .iter()
        .filter_map(|(id, i)| {
            let (bus, devfn) = i.upstream.clone()?;
            Some((id.clone(), (bus, devfn, i.chassis)))
        })
        .collect();
    let mut duplicate = None;
    for (i, s) in specs.iter().enumerate() {
        if let (DriverConfig::Bridge(c), Some(a)) = (&s.config, claimed[i]) {
            if let Some((holder, _)) = bridges.iter().find(|(_, b)| b.2 == c.chassis_nr) {
                duplicate.get_or_insert(DeviceError::DuplicateChassis {
                    chassis: c.chassis_nr,
                    holder: holder.clone(),
                });
            }
            bridges.insert(ids[i].clone(), (bus_of[i].clone(), a.devfn(), c.chassis_nr));
        }
    }
    buses.number(&bridges)?;
    if let Some(e) = duplicate {
        return Err(e);
    }
    let mut out = Vec::with_capacity(specs.len());
    for (((s, id), bus), a) in specs.iter().zip(ids).zip(bus_of).zip(claimed) {
        let Some(a) = a else { continue };
        let number = buses.get(&bus).map_or(0, |b| b.number);
        out.push(Placed {
            spec: s.clone(),
            id,
            bus,
            addr: PciAddress::from_devfn(number, a.devfn()),
        });
    }
    Ok(out)
}

/// The devices of one machine: its buses with their slot allocators and every realized
/// device. Changes are all-or-nothing: a failed [`DeviceSet::add`] leaves the set as it was.
#[derive(Default)]
pub struct DeviceSet {
    buses: Buses,
    anon: usize,
    realized: Vec<Realized>,
    /// 64-bit BARs go to the 64-bit window (a recorded machine property).
    mmio64: bool,
}

impl DeviceSet {
    /// An empty set (the host bridge's slot reserved), 64-bit BARs in the 32-bit window.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set whose 64-bit BARs go to the 64-bit window when `mmio64` is set.
    pub fn with_mmio64(mmio64: bool) -> Self {
        Self {
            mmio64,
            ..Self::default()
        }
    }

    /// Places and realizes `specs` onto `root`, around the devices already there. Bridges come
    /// only with the first devices (the machine's), as their bus numbers, windows and the ECAM
    /// window are fixed before the guest runs.
    pub fn add(
        &mut self,
        specs: &[DeviceSpec],
        hints: &HashMap<String, Hint>,
        root: &PciRoot,
        mem: &GuestMemoryMmap,
        host: Arc<dyn VirtioHost>,
    ) -> Result<Vec<PciAddress>, DeviceError> {
        if !self.realized.is_empty() {
            if let Some(b) = specs.iter().find(|s| s.is_bridge()) {
                return Err(DeviceError::BridgeNotPluggable(
                    b.id.clone().unwrap_or_else(|| b.driver().to_string()),
                ));
            }
        }
        let mut buses = self.buses.clone();
        let mut anon = self.anon;
        let taken: HashSet<String> = self.realized.iter().map(|r| r.placed.id.clone()).collect();
        let placed = place_into(&mut buses, &mut anon, &taken, specs, hints)?;
        let mut sorted: Vec<&Placed> = placed.iter().collect();
        sorted.sort_by_key(|p| p.addr);
        let mut new: Vec<Realized> = Vec::new();
        for p in sorted {
            match realize_one(p, &buses, self.mmio64, root, mem, host.clone()) {
                Ok(r) => new.push(r),
                Err(e) => {
                    for r in new.iter().rev() {
                        root.remove(r.placed.addr);
                    }
                    return Err(e);
                }
            }
        }
        let addrs = new.iter().map(|r| r.placed.addr).collect();
        self.buses = buses;
        self.anon = anon;
        self.realized.extend(new);
        self.realized.sort_by_key(|r| r.placed.addr);
        Ok(addrs)
    }

    /// Removes the device `id` from `root` and frees its slot. The device gives back its host
    /// resources when the returned [`Realized`] is dropped. Bridges stay (see
    /// [`DeviceSet::add`]).
    pub fn remove(&mut self, id: &str, root: &PciRoot) -> Result<Realized, DeviceError> {
        let i = self
            .realized
            .iter()
            .position(|r| r.placed.id == id)
            .ok_or_else(|| DeviceError::NotFound(id.to_string()))?;
        let placed = &self.realized[i].placed;
        if placed.spec.is_bridge() {
            return Err(DeviceError::BridgeNotPluggable(id.to_string()));
        }
        let addr = placed.addr;
        if addr.function() == 0 {
            if let Some(other) = self.realized.iter().find(|r| {
                r.placed.addr.bus() == addr.bus()
                    && r.placed.addr.device() == addr.device()
                    && r.placed.addr.function() > 0
            }) {
                return Err(DeviceError::Function0Busy {
                    slot: addr.device(),
                    function: other.placed.addr.function(),
                });
            }
        }
        let r = self.realized.remove(i);
        root.remove(r.placed.addr);
        if let Some(slots) = self.buses.slots.get_mut(&r.placed.bus) {
            slots.release(PciAddress::from_devfn(0, r.placed.addr.devfn()));
        }
        Ok(r)
    }

    /// The realized devices in address order.
    pub fn devices(&self) -> &[Realized] {
        &self.realized
    }

    /// The buses.
    pub fn buses(&self) -> &Buses {
        &self.buses
    }

    /// Where every device sits, without the devices themselves.
    pub fn placement(&self) -> Placement {
        Placement {
            buses: self.buses.clone(),
            anon: self.anon,
            placed: self.realized.iter().map(|r| r.placed.clone()).collect(),
            mmio64: self.mmio64,
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
        let mut realized: Vec<Realized> = Vec::with_capacity(placement.placed.len());
        for p in &placement.placed {
            match realize_one(
                p,
                &placement.buses,
                placement.mmio64,
                root,
                mem,
                host.clone(),
            ) {
                Ok(r) => realized.push(r),
                Err(e) => {
                    for r in realized.iter().rev() {
                        root.remove(r.placed.addr);
                    }
                    return Err(e);
                }
            }
        }
        Ok(DeviceSet {
            buses: placement.buses.clone(),
            anon: placement.anon,
            realized,
            mmio64: placement.mmio64,
        })
    }
}

/// Every device's id, spec and address and the buses' state: what outlives one run of the
/// guest (see [`DeviceManager::rebuilt`]).
#[derive(Clone)]
pub struct Placement {
    buses: Buses,
    anon: usize,
    placed: Vec<Placed>,
    mmio64: bool,
}

impl Placement {
    /// Whether the machine has bridges (and so an ECAM window for every bus).
    pub fn has_bridges(&self) -> bool {
        self.buses.has_bridges()
    }

    /// This placement with `specs` (bridges among them) added, placed again from an empty
    /// machine: every device keeps its id, bus and slot.function (a bus's number may change,
    /// as bridges are numbered by where they are), the new ones are placed around them as by
    /// [`DeviceSet::add`] with `hints`. Returns the new placement, in address order (bridges
    /// before the buses behind them), and the new devices' ids. Nothing changes on error.
    pub fn with(
        &self,
        specs: &[DeviceSpec],
        hints: &HashMap<String, Hint>,
    ) -> Result<(Placement, Vec<String>), DeviceError> {
        let mut all: Vec<DeviceSpec> = self
            .placed
            .iter()
            .map(|p| {
                let mut s = p.spec.clone();
                s.id = Some(p.id.clone());
                s.bus = Some(p.bus.clone());
                s.addr = Some((p.addr.device(), Some(p.addr.function())));
                s
            })
            .collect();
        all.extend(specs.iter().cloned());
        let mut buses = Buses::default();
        let mut anon = self.anon;
        let mut placed = place_into(&mut buses, &mut anon, &HashSet::new(), &all, hints)?;
        // The specs as given (an id-less device stays id-less in descriptions).
        for (p, old) in placed.iter_mut().zip(&self.placed) {
            p.spec = old.spec.clone();
        }
        let new = placed[self.placed.len()..]
            .iter()
            .map(|p| p.id.clone())
            .collect();
        placed.sort_by_key(|p| p.addr);
        Ok((
            Placement {
                buses,
                anon,
                placed,
                mmio64: self.mmio64,
            },
            new,
        ))
    }

    /// The buses.
    pub fn buses(&self) -> &Buses {
        &self.buses
    }
}

/// The bridges the DSDT describes for hot-plug behind bridges: every bridge, with the bus it
/// sits on, its devfn there and whether its own bus can take hot-plugged devices
/// ([`hotplug_bridge_buses`]; a bridge whose bus cannot still sits in its parent's slot).
fn acpi_bridges(buses: &Buses) -> Vec<crate::acpi::AcpiBridge> {
    let hotplug = hotplug_bridge_buses(buses);
    buses
        .info
        .values()
        .filter_map(|b| {
            let (up, devfn) = b.upstream.as_ref()?;
            Some(crate::acpi::AcpiBridge {
                bus: b.number,
                parent: buses.info.get(up)?.number,
                devfn: *devfn,
                hotplug: hotplug.contains(&b.number),
            })
        })
        .collect()
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
    /// The machine properties it was built with.
    props: MachineProps,
    /// The ECAM window covers all 256 buses (the machine has bridges).
    bridges: bool,
}

/// The guest-visible side of ACPI PCI hot-plug: QEMU's register block (PCIU/PCID/B0EJ) and the
/// Generic Event Device whose interrupt makes the guest read it.
struct HotplugHardware {
    regs: Arc<PciHotplug>,
    ged: Arc<Ged>,
    /// Hot-plug behind bridges: each bridge's bus with a BAR window gets registers.
    bridges: bool,
}

/// ACPI PCI hot-plug of a machine: who hears of ejects, and whether the buses behind bridges
/// have hot-plug too.
#[derive(Clone)]
pub struct HotplugSetup {
    /// Called on a vCPU thread with the (bus, slot) the guest ejected (it must only post and
    /// return).
    pub eject: EjectCallback,
    /// Hot-plug behind bridges (the machine property `pci_hotplug_bridges`).
    pub bridges: bool,
}

/// The bus numbers of `buses` that can take hot-plugged devices when hot-plug behind bridges
/// is on: every bridge's bus with a BAR window (buses up to
/// [`crate::layout::MAX_WINDOWED_BUS`]; the buses above hold bridges only). Bus 0 not included.
pub fn hotplug_bridge_buses(buses: &Buses) -> Vec<u8> {
    buses
        .info
        .values()
        // None for bus 0 (the root bus) and for the buses above MAX_WINDOWED_BUS.
        .filter(|b| crate::layout::bus_window(b.number).is_some())
        .map(|b| b.number)
        .collect()
}

impl DeviceManager {
    /// The fixed devices of the machine on fresh buses: COM1 (guest output to `console`), the
    /// i8042 and ACPI PM port (reporting to `power`), the CMOS clock, and the PCI host bridge
    /// with its ECAM window and (unless `props` say otherwise) its CF8/CFC ports. No PCI
    /// device yet.
    ///
    /// With `hotplug` (ACPI PCI hot-plug on), the hot-plug registers and the GED are on the port
    /// bus too; its `eject` is called on a vCPU thread with the bus and slot the guest ejected
    /// (it must only post and return). With `bridges`, the ECAM window covers all 256 buses
    /// ([`crate::layout::ecam_size`]). `props` are the recorded machine properties: what the
    /// functions' extended config space reads, whether 64-bit BARs go above 4 GiB.
    pub fn new(
        vm: Arc<Vm>,
        power: PowerCallback,
        console: Box<dyn std::io::Write + Send>,
        hotplug: Option<HotplugSetup>,
        bridges: bool,
        props: MachineProps,
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
        let root = Arc::new(PciRoot::with_extended_config(props.extended_config));
        let mapper = Arc::new(BarMapper::new(root.clone(), &pio, &mmio));
        if props.pci_config_ports {
            on_pio(
                "PCI config ports",
                PCI_CONFIG_PORT,
                PCI_CONFIG_PORT_LEN,
                Arc::new(ConfigPorts::new(root.clone(), mapper.clone())),
            )?;
        }
        mmio.insert(
            ECAM_START,
            ecam_size(bridges),
            Arc::new(Ecam::new(root.clone(), mapper.clone())),
        )
        .map_err(|source| DeviceManagerError::Bus {
            what: "ECAM",
            source,
        })?;
        let hotplug = match hotplug {
            Some(HotplugSetup {
                eject,
                bridges: on_bridges,
            }) => {
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
                Some(HotplugHardware {
                    regs,
                    ged,
                    bridges: on_bridges,
                })
            }
            None => None,
        };
        Ok(DeviceManager {
            vm,
            pio,
            mmio,
            root,
            mapper,
            set: Mutex::new(DeviceSet::with_mmio64(props.mmio64)),
            serial,
            hotplug,
            props,
            bridges,
        })
    }

    /// Gives every bridge's bus with a BAR window among `buses` (the device set's, whose lock
    /// the caller holds) hot-plug registers, when hot-plug behind bridges is on (the bridges
    /// are all there: they come with the machine's first devices).
    fn enable_bridge_hotplug(&self, buses: &Buses) {
        if let Some(h) = self.hotplug.as_ref().filter(|h| h.bridges) {
            for bus in hotplug_bridge_buses(buses) {
                h.regs.enable_bus(bus);
            }
        }
    }

    /// What the ACPI tables must say of this machine: the hardware built here (hot-plug
    /// registers, the ECAM window, the config ports, the 64-bit window) and, with hot-plug
    /// behind bridges, every bridge as numbered now, each marked whether its own bus takes
    /// hot-plugged devices ([`acpi_bridges`]; without, no bridge: the DSDT of bus-0 hot-plug,
    /// byte for byte).
    pub fn acpi_options(&self) -> crate::acpi::AcpiOptions {
        crate::acpi::AcpiOptions {
            pci_hotplug: self.hotplug.is_some(),
            pci_bridges: self.bridges,
            bridges: if self.hotplug.as_ref().is_some_and(|h| h.bridges) {
                acpi_bridges(self.set().buses())
            } else {
                Vec::new()
            },
            pci_mmio64: self.props.mmio64,
            config_ports: self.props.pci_config_ports,
        }
    }

    /// Whether devices can be hot-plugged on the bus called `name` (`pci.0` or a bridge's id):
    /// hot-plug is on, and for a bridge's bus, hot-plug behind bridges is on and the bus has
    /// registers.
    pub fn bus_hotpluggable(&self, name: &str) -> bool {
        let Some(h) = &self.hotplug else {
            return false;
        };
        self.with_buses(|b| b.get(name).map(|i| i.number))
            .is_some_and(|n| h.regs.bus_enabled(n))
    }

    /// Tells the guest that slot `slot` of bus number `bus` has a new device (PCIU bit, GED
    /// interrupt). Nothing without hot-plug hardware.
    pub fn notify_plugged(&self, bus: u8, slot: u8) -> Result<(), DeviceManagerError> {
        if let Some(h) = &self.hotplug {
            h.regs.plugged(bus, slot).map_err(std::io::Error::other)?;
            h.ged.notify(GED_PCI_HOTPLUG)?;
        }
        Ok(())
    }

    /// Asks the guest to release the slot of device `id` (QMP `device_del` while the guest
    /// runs): sets the slot's PCID bit and raises the GED event. Refused, with QEMU's words,
    /// for a device that does not exist, a bridge, a device on a bus without hot-plug, and a
    /// device whose slot holds a bridge in another function (bridges are cold-plugged only).
    /// Asking again is harmless.
    pub fn request_unplug(&self, id: &str) -> Result<(), DeviceManagerError> {
        let (addr, bus, bridge_in_slot) = self.with_devices(|list| -> Result<_, DeviceError> {
            let r = list
                .iter()
                .find(|r| r.placed.id == id)
                .ok_or_else(|| DeviceError::NotFound(id.to_string()))?;
            if r.placed.spec.is_bridge() {
                return Err(DeviceError::BridgeNotPluggable(id.to_string()));
            }
            let addr = r.placed.addr;
            let bridge_in_slot = list
                .iter()
                .find(|b| {
                    b.placed.spec.is_bridge()
                        && b.placed.addr.bus() == addr.bus()
                        && b.placed.addr.device() == addr.device()
                })
                .map(|b| b.placed.id.clone());
            Ok((addr, r.placed.bus.clone(), bridge_in_slot))
        })?;
        if !self.bus_hotpluggable(&bus) {
            return Err(DeviceError::NoHotplugBus(bus).into());
        }
        if let Some(b) = bridge_in_slot {
            return Err(DeviceError::BridgeNotPluggable(b).into());
        }
        if let Some(h) = &self.hotplug {
            h.regs
                .unplug_request(addr.bus(), addr.device())
                .map_err(std::io::Error::other)?;
            h.ged.notify(GED_PCI_HOTPLUG)?;
        }
        Ok(())
    }

    /// Whether the guest has an eject of `slot` of bus `bus` outstanding (asked, not yet
    /// ejected).
    pub fn unplug_pending(&self, bus: u8, slot: u8) -> bool {
        self.hotplug
            .as_ref()
            .is_some_and(|h| h.regs.removal_pending(bus, slot))
    }

    /// Every (bus, slot) whose eject the guest has outstanding.
    pub fn pending_unplugs(&self) -> Vec<(u8, u8)> {
        let Some(h) = &self.hotplug else {
            return Vec::new();
        };
        (0..=255u8)
            .flat_map(|bus| slots_in(h.regs.pending_removals(bus)).map(move |s| (bus, s)))
            .collect()
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
        hotplug: Option<HotplugSetup>,
        placement: &Placement,
        props: MachineProps,
    ) -> Result<Self, DeviceManagerError> {
        let dm = DeviceManager::new(vm, power, console, hotplug, placement.has_bridges(), props)?;
        let set = DeviceSet::realize_placement(placement, &dm.root, &dm.vm.mem, dm.vm.clone())?;
        let addrs: Vec<PciAddress> = set.devices().iter().map(|r| r.placed.addr).collect();
        *dm.set() = set;
        for a in addrs {
            dm.mapper.remap(a);
        }
        dm.enable_bridge_hotplug(dm.set().buses());
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
        hints: &HashMap<String, Hint>,
    ) -> Result<Vec<(String, PciAddress)>, DeviceManagerError> {
        let mut set = self.set();
        let addrs = set.add(specs, hints, &self.root, &self.vm.mem, self.vm.clone())?;
        for a in &addrs {
            self.mapper.remap(*a);
        }
        if specs.iter().any(DeviceSpec::is_bridge) {
            self.enable_bridge_hotplug(set.buses());
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

    /// Calls `f` with the buses.
    pub fn with_buses<R>(&self, f: impl FnOnce(&Buses) -> R) -> R {
        f(self.set().buses())
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
        DriverConfig::Bridge(_) => Err("a PCI bridge is not a virtio device".into()),
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
    /// The same function as a virtio transport (to release it); none for a bridge.
    transport: Option<Arc<VirtioPciDevice>>,
}

impl Drop for Realized {
    fn drop(&mut self) {
        if let Some(t) = &self.transport {
            t.release();
        }
    }
}

fn transport_props(p: &Placed) -> TransportProps {
    TransportProps {
        vectors: p.spec.config.effective_vectors(),
        multifunction: p.spec.multifunction,
    }
}

/// Bytes of the 32-bit PCI window reserved for each function's BARs on bus 0.
///
/// Each function's BARs live in a window of their own at `PCI_MMIO32_START + devfn * size` (on
/// bus 0; behind bridges see [`crate::layout::function_window`]), so a device's BAR addresses
/// depend on its address only: adding or removing other devices never moves them (the guest's
/// `lspci -vvv` stays identical).
pub const FUNCTION_BAR_WINDOW: u64 = crate::layout::BUS0_FUNCTION_WINDOW;

/// Builds one placed device, gives its BARs their addresses in the function's own window (a
/// bridge: its bus numbers and windows), and adds it to `root`. Devices behind a bridge need
/// the bridge on `root` (programmed) first.
pub fn realize_one(
    p: &Placed,
    buses: &Buses,
    mmio64: bool,
    root: &PciRoot,
    mem: &GuestMemoryMmap,
    host: Arc<dyn VirtioHost>,
) -> Result<Realized, DeviceError> {
    let realize_err = |reason: String| DeviceError::Realize {
        id: p.id.clone(),
        reason,
    };
    if let DriverConfig::Bridge(c) = &p.spec.config {
        let own = buses
            .get(&p.id)
            .ok_or_else(|| realize_err("its bus was not numbered".into()))?;
        let bridge = PciBridge::new(c.chassis_nr, p.spec.multifunction);
        bridge.program(&BridgeSetup {
            primary: p.addr.bus(),
            secondary: own.number,
            subordinate: own.subordinate,
            memory: crate::layout::bridge_window(own.number, own.subordinate),
            prefetchable: mmio64
                .then(|| crate::layout::bridge_window64(own.number, own.subordinate)),
        });
        let abi: BTreeMap<String, String> = [
            ("chassis_nr".to_string(), c.chassis_nr.to_string()),
            ("secondary_bus".to_string(), own.number.to_string()),
            ("subordinate_bus".to_string(), own.subordinate.to_string()),
        ]
        .into();
        let function: Arc<dyn PciFunction> = Arc::new(bridge);
        root.add(p.addr, function.clone())
            .map_err(|e| realize_err(e.to_string()))?;
        return Ok(Realized {
            placed: p.clone(),
            function,
            abi,
            transport: None,
        });
    }
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
        let (slot, pin) = buses.intx_on_root(&p.bus, p.addr.device(), pin - 1);
        let gsi = crate::acpi::intx_gsi(slot, pin);
        cfg.set_raw(PCI_INTERRUPT_LINE, &[gsi as u8]);
        f.connect_intx(gsi)
            .map_err(|e| realize_err(e.to_string()))?;
    }
    let no_room = |bar: usize| DeviceError::NoBarSpace {
        device: p.id.clone(),
        bar,
    };
    let first = cfg.bars().first().map_or(0, |b| b.index);
    let (window, size) =
        crate::layout::function_window(p.addr.bus(), p.addr.devfn()).ok_or(no_room(first))?;
    // With the 64-bit window, 64-bit BARs go to the function's own part of it (by bus and
    // devfn, like the 32-bit one), the others stay in the 32-bit window.
    let (window64, size64) = crate::layout::function_window64(p.addr.bus(), p.addr.devfn());
    let (mut next32, mut next64) = (window, window64);
    for bar in cfg.bars() {
        let high = mmio64 && matches!(bar.kind, BarKind::Mem64 { .. });
        let (next, start, len) = if high {
            (&mut next64, window64, size64)
        } else {
            (&mut next32, window, size)
        };
        let base = next.next_multiple_of(bar.size);
        if matches!(bar.kind, BarKind::Io) || base + bar.size > start + len {
            return Err(no_room(bar.index));
        }
        cfg.set_bar_address(bar.index, base)
            .map_err(|e| realize_err(e.to_string()))?;
        *next = base + bar.size;
    }
    debug_assert!(window + size <= PCI_MMIO32_START + PCI_MMIO32_SIZE);
    let transport = Arc::new(f);
    let function: Arc<dyn PciFunction> = transport.clone();
    root.add(p.addr, function.clone())
        .map_err(|e| realize_err(e.to_string()))?;
    Ok(Realized {
        placed: p.clone(),
        function,
        abi,
        transport: Some(transport),
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
        hints.insert(
            "b".to_string(),
            Hint::root(PciAddress::new(0, 1, 0).unwrap()),
        );
        hints.insert(
            "c".to_string(),
            Hint::root(PciAddress::new(0, 3, 0).unwrap()),
        );
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
            let mut hints: HashMap<String, Hint> = HashMap::new();
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
                        assert_eq!(*old, Hint::root(p.addr), "{} moved", p.id);
                    }
                }
                hints = placed
                    .into_iter()
                    .map(|p| (p.id, Hint::root(p.addr)))
                    .collect();
            }
        }
    }

    #[test]
    fn devices_behind_bridges_and_depth_first_bus_numbers() {
        // Command-line order does not matter: a device may name a bridge given after it.
        let p = placed(&[
            "virtio-rng-pci,id=a,bus=br1,addr=01.0",
            "virtio-rng-pci,id=b,bus=br1,addr=2",
            "pci-bridge,id=br1,chassis_nr=1,addr=1e.0",
            "pci-bridge,id=br2,chassis_nr=2,bus=br1,addr=3",
            "pci-bridge,id=br0,chassis_nr=3,addr=5",
            "virtio-rng-pci,id=c,bus=br2",
            "virtio-rng-pci,id=d,bus=br0",
            "virtio-rng-pci,id=e",
            "pci-bridge,id=br3,chassis_nr=4,bus=br2,addr=1f",
        ])
        .unwrap();
        let got: Vec<String> = p.iter().map(|(id, a)| format!("{id}@{a}")).collect();
        // Depth first in devfn order: 00:05.0 -> bus 1, 00:1e.0 -> bus 2, its 02:03.0 -> bus 3,
        // and 03:1f.0 -> bus 4. Behind a bridge automatic placement starts at slot 0.
        assert_eq!(
            got,
            [
                "a@02:01.0",
                "b@02:02.0",
                "br1@00:1e.0",
                "br2@02:03.0",
                "br0@00:05.0",
                "c@03:00.0",
                "d@01:00.0",
                "e@00:01.0",
                "br3@03:1f.0",
            ]
        );
        let mut buses = Buses::default();
        place_into(
            &mut buses,
            &mut 0,
            &HashSet::new(),
            &specs(&[
                "pci-bridge,id=br1,chassis_nr=1,addr=1e.0",
                "pci-bridge,id=br2,chassis_nr=2,bus=br1,addr=3",
                "pci-bridge,id=br0,chassis_nr=3,addr=5",
            ]),
            &HashMap::new(),
        )
        .unwrap();
        let info = |n: &str| {
            let i = buses.get(n).unwrap();
            (i.number, i.subordinate)
        };
        assert_eq!(info("pci.0"), (0, 3));
        assert_eq!(info("br0"), (1, 1));
        assert_eq!(info("br1"), (2, 3));
        assert_eq!(info("br2"), (3, 3));
        // INTx swizzle: slot 1 INTA behind br2 (02:03.0) behind br1 (00:1e.0).
        assert_eq!(buses.intx_on_root("br2", 1, 0), (0x1e, (1 + 3) % 4));
        assert_eq!(buses.intx_on_root("pci.0", 7, 2), (7, 2));
        // Endpoints never change bus numbers: only bridges count.
        let with_more = placed(&[
            "virtio-rng-pci,id=x",
            "pci-bridge,id=br1,chassis_nr=1,addr=1e.0",
            "virtio-rng-pci,id=y,bus=br1",
        ])
        .unwrap();
        assert_eq!(with_more[2].1, "01:00.0");
    }

    #[test]
    fn a_placement_takes_new_bridges_and_keeps_every_place() {
        let first = specs(&[
            "pci-bridge,id=br1,chassis_nr=1,addr=1e.0",
            "virtio-rng-pci,bus=br1",
            "virtio-rng-pci,id=r",
        ]);
        let mut buses = Buses::default();
        let mut anon = 0;
        let placed = place_into(
            &mut buses,
            &mut anon,
            &HashSet::new(),
            &first,
            &HashMap::new(),
        )
        .unwrap();
        let before = Placement {
            buses,
            anon,
            placed,
            mmio64: true,
        };
        // br0 at 00:05.0 comes first in numbering order: br1's bus becomes 2.
        let (after, new) = before
            .with(
                &specs(&["pci-bridge,id=br0,chassis_nr=2,addr=5", "virtio-rng-pci"]),
                &HashMap::new(),
            )
            .unwrap();
        assert_eq!(new, ["br0", "device[1]"]);
        let got: Vec<(String, String, Option<String>)> = after
            .placed
            .iter()
            .map(|p| (p.id.clone(), p.addr.to_string(), p.spec.id.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "r".to_string(),
                    "00:01.0".to_string(),
                    Some("r".to_string())
                ),
                ("device[1]".into(), "00:02.0".into(), None),
                ("br0".into(), "00:05.0".into(), Some("br0".into())),
                ("br1".into(), "00:1e.0".into(), Some("br1".into())),
                ("device[0]".into(), "02:00.0".into(), None),
            ]
        );
        assert_eq!(after.buses.get("br1").unwrap().number, 2);
        assert!(after.has_bridges());
        // A refused addition changes nothing.
        let e = before
            .with(&specs(&["pci-bridge,id=x,chassis_nr=1"]), &HashMap::new())
            .err()
            .unwrap();
        assert!(e
            .to_string()
            .starts_with("Bridge chassis 1 is already used by 'br1'"));
        assert_eq!(before.placed.len(), 3);
    }

    #[test]
    fn bridge_errors_have_qemu_messages() {
        let err = |l: &[&str]| placed(l).unwrap_err();
        assert_eq!(err(&["virtio-rng-pci,bus=br9"]), "Bus 'br9' not found");
        assert_eq!(
            err(&["virtio-rng-pci,id=r", "virtio-rng-pci,bus=r"]),
            "Bus 'r' not found",
            "bus= naming a device that is not a bridge"
        );
        assert_eq!(
            err(&["pci-bridge,id=br1,chassis_nr=1,bus=br1"]),
            "Bus 'br1' not found",
            "a bridge behind itself"
        );
        assert_eq!(
            err(&[
                "pci-bridge,id=a,chassis_nr=1,bus=b",
                "pci-bridge,id=b,chassis_nr=2,bus=a"
            ]),
            "Bus 'b' not found",
            "two bridges behind each other"
        );
        assert_eq!(
            err(&["pci-bridge,id=a,chassis_nr=1", "pci-bridge,id=b,chassis_nr=1"]),
            "Bridge chassis 1 is already used by 'a'. Each bridge is required to be assigned a unique chassis id > 0."
        );
        assert_eq!(
            err(&[
                "pci-bridge,id=a,chassis_nr=1",
                "virtio-rng-pci,id=x,bus=a,addr=4",
                "virtio-rng-pci,id=y,bus=a,addr=4"
            ]),
            "PCI: slot 4 function 0 not available for virtio-rng-pci, in use by virtio-rng-pci,id=x"
        );
        let mut full = vec!["pci-bridge,id=a,chassis_nr=1".to_string()];
        full.extend((0..33).map(|i| format!("virtio-rng-pci,id=d{i},bus=a")));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        assert_eq!(
            err(&full),
            "PCI: no slot/function available for virtio-rng-pci, all in use or reserved"
        );
        // 255 bridges fit (buses 1-255): 31 on bus 0, the others spread behind them.
        let bridge = |i: u32| {
            let bus = match i {
                0..31 => "pci.0".to_string(),
                _ => format!("b{}", i % 31),
            };
            format!("pci-bridge,id=b{i},chassis_nr={},bus={bus}", i + 1)
        };
        let many: Vec<String> = (0..255).map(bridge).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let p = placed(&many).unwrap();
        assert!(p.iter().all(|(_, a)| a != "00:00.0"));
        // A 256th bridge: too many buses (named: the last bridge in numbering order), said
        // before the repeated chassis number.
        let mut too_many = many.clone();
        too_many.push("pci-bridge,id=last,chassis_nr=1,bus=b40");
        assert_eq!(
            err(&too_many),
            "PCI: no bus number left for pci-bridge,id=b247: a machine has at most 256 buses (0-255)"
        );
        // Chassis numbers are 8-bit, so 256 bridges always repeat one: the bus limit on its
        // own, through the numbering.
        let mut b = Buses::default();
        let mut bridges: BTreeMap<String, (String, u8, u8)> = (0..256u32)
            .map(|i| {
                let bus = match i {
                    0..31 => "pci.0".to_string(),
                    _ => format!("b{:03}", i % 31),
                };
                (format!("b{i:03}"), (bus, (i / 31 * 8) as u8, 1))
            })
            .collect();
        let e = b.number(&bridges).unwrap_err().to_string();
        assert!(
            e.starts_with("PCI: no bus number left for pci-bridge,id=b"),
            "{e}"
        );
        assert!(
            e.ends_with(": a machine has at most 256 buses (0-255)"),
            "{e}"
        );
        bridges.remove("b255");
        b.number(&bridges).unwrap();
        assert_eq!(b.get("pci.0").unwrap().subordinate, 255);
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
