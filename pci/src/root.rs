//! The root complex: the function tables of bus 0 and of every bus behind a PCI-to-PCI bridge,
//! and configuration access decoding (type-1 ports 0xcf8/0xcfc and an ECAM window), lock-free
//! on the read side.
//!
//! Invariants:
//! - The table (one 256-entry function table per bus, bus 0 first, each with the list of the
//!   bridges on it and the table of each bridge's secondary bus) is immutable once published in
//!   an [`ArcSwap`]; readers (vCPU threads decoding config accesses) read it through their
//!   thread's cache of it (one relaxed pointer comparison per access, which notices every
//!   publication) or a `load()` guard: no lock, no `Arc` clone, and they see either the table
//!   before or after a concurrent [`PciRoot::add`]/[`PciRoot::remove`], never a partial one.
//! - Buses behind bridges have no number of their own: an access to bus N != 0 is routed as
//!   hardware routes a type-1 cycle, from bus 0 down through the bridge whose programmed
//!   secondary..=subordinate range holds N, until a bridge's secondary bus is N (then the access
//!   goes to that bus's table, as a type-0 cycle). The bus numbers are read from the bridges'
//!   config space (atomics) on every such access, so a guest that renumbers its buses is
//!   followed at once. Routing only ever descends the tree, so it ends after at most as many
//!   steps as the tree is deep, whatever the guest programs. Bus 0 accesses never look at
//!   bridges.
//! - Writers (`add`, `remove`) copy the table, change the copy and publish it; a mutex
//!   serializes writers only, so concurrent adds never lose each other's updates. Readers never
//!   touch that mutex. `add`/`get`/`remove` resolve an address's bus number by the same
//!   routing, so the VMM programs a bridge's bus numbers before adding functions behind it.
//! - A function may still receive an access through a guard loaded just before its removal;
//!   functions must tolerate that (they are `Arc`s and stay alive while referenced).
//! - Absent functions and buses no bridge routes to read all-ones; writes to them are
//!   dropped.
//! - Every function here is a conventional PCI function (a 256-byte configuration space): with
//!   [`ExtendedConfig::AllOnes`] (QEMU's behaviour, the default) its extended space
//!   (0x100..0x1000, reachable through ECAM only) reads all-ones and drops writes without
//!   touching the function, as QEMU's `pcie_mmcfg_data_read`/`_write` do for a function whose
//!   config size is 256; with [`ExtendedConfig::Zero`] (machines recorded before this was a
//!   property) it reads what the function's [`ConfigSpace`] holds there: zeros. The mode is
//!   fixed when the root is made (a plain field: no atomic, no lock on the read path). Config writes to present functions go through the function's
//!   [`ConfigSpace`] masks, then [`PciFunction::config_written`] is called,
//!   then the [`WriteEffect`] is returned so the VMM can move BARs.
//! - The `CONFIG_ADDRESS` latch is one `AtomicU32` shared by all vCPUs, as on
//!   hardware: the guest serializes 0xcf8/0xcfc pairs itself.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::address::PciAddress;
use crate::bridge;
use crate::config::{ConfigSpace, ConfigSpaceBuilder, WriteEffect, HEADER_SIZE};

/// Size of the ECAM window covering bus 0 (1 MiB).
pub const ECAM_BUS0_SIZE: u64 = 1 << 20;
/// Size of an ECAM window covering all 256 buses (256 MiB).
pub const ECAM_ALL_BUSES_SIZE: u64 = 256 << 20;
/// Size of the type-1 port range starting at 0xcf8.
pub const PIO_CONFIG_SIZE: u64 = 8;
/// Host bridge vendor ID (Red Hat, as QEMU's PCIe host bridge).
pub const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
/// Host bridge device ID (QEMU PCIe host bridge).
pub const HOST_BRIDGE_DEVICE: u16 = 0x0008;
const TABLE_SIZE: usize = 256;

/// What the extended configuration space (offsets 0x100..0x1000) of a conventional PCI
/// function reads: a machine property (guest-visible, recorded), fixed per [`PciRoot`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExtendedConfig {
    /// All-ones, writes dropped: what QEMU returns for a function whose config size is 256
    /// (every function on its root bus or behind a `pci-bridge`, the host bridge included).
    #[default]
    AllOnes,
    /// Zeros, writes dropped: what this monitor returned before the property existed.
    Zero,
}

impl ExtendedConfig {
    /// The behaviour of a machine whose compat record predates the property (what a record
    /// without the field reads as).
    pub fn legacy() -> Self {
        ExtendedConfig::Zero
    }

    /// The name used in records, machine files and `abi diff`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtendedConfig::AllOnes => "all-ones",
            ExtendedConfig::Zero => "zero",
        }
    }
}

impl fmt::Display for ExtendedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A PCI function on the root bus or behind a bridge.
pub trait PciFunction: Send + Sync {
    /// The function's configuration space.
    fn config(&self) -> &ConfigSpace;

    /// Called after a guest configuration write was applied (including
    /// writes that changed nothing), so the device can react to its own
    /// capability registers (e.g. MSI-X message control).
    fn config_written(&self, _effect: &WriteEffect) {}

    /// Guest read at `offset` in BAR `bar`; defaults to all-ones.
    fn bar_read(&self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// Guest write at `offset` in BAR `bar`; defaults to dropping it.
    fn bar_write(&self, _bar: usize, _offset: u64, _data: &[u8]) {}

    /// The VMM's BAR mapper decided where BAR `bar` decodes on the bus: at `base`, or nowhere
    /// (decoding off, address zero, or a clash with another range). Whatever a device attaches
    /// to its BAR addresses outside the bus (e.g. KVM ioeventfds) must follow this, not the
    /// BAR register, which the guest may point anywhere.
    fn bar_mapped(&self, _bar: usize, _base: Option<u64>) {}

    /// Name for logs and errors (QEMU driver name).
    fn name(&self) -> &str;

    /// The device's internal state as text, for the monitor's diagnostics (HMP `info virtio`);
    /// `None` when the function has nothing to report. Never called on a vCPU's path.
    fn state_report(&self) -> Option<String> {
        None
    }
}

/// Errors from changing the function table.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RootError {
    /// No bridge routes to this bus number.
    #[error("PCI bus {0:#04x} does not exist")]
    NoSuchBus(u8),
    /// The address already holds a function.
    #[error("PCI address {addr} already holds {name}")]
    InUse {
        /// The address.
        addr: PciAddress,
        /// The present function's name.
        name: String,
    },
}

/// The host bridge at 00:00.0, like QEMU's PCIe host bridge (gpex-root):
/// vendor 1b36, device 0008, class 0600, revision 0, no BARs.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    /// Address of the host bridge.
    pub const ADDRESS: PciAddress = PciAddress::HOST_BRIDGE;

    /// A host bridge with QEMU's identity.
    pub fn new() -> Self {
        let mut b = ConfigSpaceBuilder::new(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE);
        b.class(0x06, 0x00, 0x00).revision(0);
        Self { config: b.finish() }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for HostBridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostBridge").finish_non_exhaustive()
    }
}

impl PciFunction for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn name(&self) -> &str {
        "gpex-root"
    }
}

/// One bus: its functions by devfn and the bridges on it.
#[derive(Clone)]
struct BusTable {
    funcs: Vec<Option<Arc<dyn PciFunction>>>,
    /// (devfn of a bridge on this bus, index of its secondary bus in [`Table::buses`]), in
    /// devfn order.
    bridges: Vec<(u8, usize)>,
}

impl BusTable {
    fn empty() -> Self {
        Self {
            funcs: vec![None; TABLE_SIZE],
            bridges: Vec::new(),
        }
    }
}

/// An immutable snapshot of every bus. `buses[0]` is bus 0; the others are reached only
/// through the bridges that own them.
#[derive(Clone)]
struct Table {
    buses: Vec<BusTable>,
}

impl Table {
    /// The index of the bus the number `nr` routes to (see the module docs).
    fn route(&self, nr: u8) -> Option<usize> {
        let mut cur = 0;
        if nr == 0 {
            return Some(cur);
        }
        // Each step descends one level of a tree of at most `buses.len()` buses.
        for _ in 0..self.buses.len() {
            let bus = self.buses.get(cur)?;
            let mut next = None;
            for &(devfn, child) in &bus.bridges {
                let Some(Some(f)) = bus.funcs.get(usize::from(devfn)) else {
                    continue;
                };
                let (_, secondary, subordinate) = bridge::bus_numbers(f.config());
                if secondary == nr {
                    return Some(child);
                }
                if secondary < nr && nr <= subordinate {
                    next = Some(child);
                    break;
                }
            }
            cur = next?;
        }
        None
    }

    fn get(&self, addr: PciAddress) -> Option<&Arc<dyn PciFunction>> {
        let bus = self.buses.get(self.route(addr.bus())?)?;
        bus.funcs.get(usize::from(addr.devfn()))?.as_ref()
    }

    /// Every function with the address the current bus numbers give it, depth first.
    fn walk(
        &self,
        bus: usize,
        nr: u8,
        depth: usize,
        out: &mut Vec<(PciAddress, Arc<dyn PciFunction>)>,
    ) {
        let Some(table) = self.buses.get(bus) else {
            return;
        };
        for (devfn, f) in table.funcs.iter().enumerate() {
            let Some(f) = f else { continue };
            out.push((PciAddress::from_devfn(nr, devfn as u8), f.clone()));
            if depth < self.buses.len() {
                if let Some(&(_, child)) =
                    table.bridges.iter().find(|(d, _)| usize::from(*d) == devfn)
                {
                    let (_, secondary, _) = bridge::bus_numbers(f.config());
                    self.walk(child, secondary, depth + 1, out);
                }
            }
        }
    }
}

/// The root complex. See the module docs for the invariants.
pub struct PciRoot {
    table: Arc<ArcSwap<Table>>,
    /// Serializes writers of `table`; never taken by readers.
    writer: Mutex<()>,
    /// The type-1 `CONFIG_ADDRESS` latch (port 0xcf8).
    config_address: AtomicU32,
    /// What the extended configuration space of every function reads (fixed).
    extended: ExtendedConfig,
}

impl fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let funcs: Vec<_> = self
            .functions()
            .into_iter()
            .map(|(a, func)| format!("{a} {}", func.name()))
            .collect();
        f.debug_struct("PciRoot")
            .field("functions", &funcs)
            .field(
                "config_address",
                &self.config_address.load(Ordering::Relaxed),
            )
            .field("extended", &self.extended)
            .finish()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A root complex with the [`HostBridge`] at 00:00.0, extended config space as QEMU's
    /// ([`ExtendedConfig::AllOnes`]).
    pub fn new() -> Self {
        Self::with_extended_config(ExtendedConfig::default())
    }

    /// A root complex with the [`HostBridge`] at 00:00.0 whose functions' extended config space
    /// reads as `extended` says.
    pub fn with_extended_config(extended: ExtendedConfig) -> Self {
        let mut root = Self::empty();
        root.extended = extended;
        let mut bus0 = BusTable::empty();
        bus0.funcs[0] = Some(Arc::new(HostBridge::new()) as Arc<dyn PciFunction>);
        root.table.store(Arc::new(Table { buses: vec![bus0] }));
        root
    }

    /// A root complex with no function at all (not even the host bridge).
    pub fn empty() -> Self {
        Self {
            table: Arc::new(ArcSwap::from_pointee(Table {
                buses: vec![BusTable::empty()],
            })),
            writer: Mutex::new(()),
            config_address: AtomicU32::new(0),
            extended: ExtendedConfig::default(),
        }
    }

    /// What the functions' extended config space reads.
    pub fn extended_config(&self) -> ExtendedConfig {
        self.extended
    }

    /// Whether an access at `register` is in the extended space of a conventional function
    /// and so answered by the root alone (all-ones, writes dropped).
    #[inline]
    fn beyond_config_size(&self, register: usize) -> bool {
        register >= HEADER_SIZE && self.extended == ExtendedConfig::AllOnes
    }

    /// Publishes a copy of the table changed by `f` (writers serialized).
    fn update<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        let _guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut table = Table::clone(&self.table.load());
        let r = f(&mut table);
        self.table.store(Arc::new(table));
        r
    }

    /// Adds `function` at `addr` (the address must be free, its bus reachable: bus 0 or the
    /// secondary bus of a bridge, by the bus numbers programmed now). A function with a type-1
    /// header gets a new, empty secondary bus behind it.
    pub fn add(&self, addr: PciAddress, function: Arc<dyn PciFunction>) -> Result<(), RootError> {
        self.update(|t| {
            let bus = t
                .route(addr.bus())
                .ok_or(RootError::NoSuchBus(addr.bus()))?;
            let devfn = addr.devfn();
            let is_bridge = bridge::is_bridge(function.config());
            let child = t.buses.len();
            let table = t
                .buses
                .get_mut(bus)
                .ok_or(RootError::NoSuchBus(addr.bus()))?;
            match table.funcs.get_mut(usize::from(devfn)) {
                Some(Some(present)) => {
                    return Err(RootError::InUse {
                        addr,
                        name: present.name().to_string(),
                    })
                }
                Some(slot) => *slot = Some(function),
                None => return Err(RootError::NoSuchBus(addr.bus())),
            }
            if is_bridge {
                table.bridges.push((devfn, child));
                table.bridges.sort_unstable();
                t.buses.push(BusTable::empty());
            }
            Ok(())
        })
    }

    /// Removes and returns the function at `addr`, if any. Removing a bridge makes the bus
    /// behind it (and whatever is on it) unreachable.
    pub fn remove(&self, addr: PciAddress) -> Option<Arc<dyn PciFunction>> {
        self.update(|t| {
            let bus = t.route(addr.bus())?;
            let table = t.buses.get_mut(bus)?;
            let removed = table.funcs.get_mut(usize::from(addr.devfn()))?.take()?;
            if let Some(i) = table.bridges.iter().position(|(d, _)| *d == addr.devfn()) {
                let (_, child) = table.bridges.remove(i);
                if let Some(c) = t.buses.get_mut(child) {
                    *c = BusTable::empty();
                }
            }
            Some(removed)
        })
    }

    /// The function at `addr`, if any.
    pub fn get(&self, addr: PciAddress) -> Option<Arc<dyn PciFunction>> {
        self.table.load().get(addr).cloned()
    }

    /// All functions, each at the address the current bus numbers give it: bus 0 in devfn
    /// order, each bridge followed by the functions behind it.
    pub fn functions(&self) -> Vec<(PciAddress, Arc<dyn PciFunction>)> {
        let table = self.table.load();
        let mut out = Vec::new();
        table.walk(0, 0, 0, &mut out);
        out
    }

    /// Runs `f` on the current table through this thread's cache of it: a vCPU thread reads
    /// the same root on every config exit, and a cached table costs one relaxed pointer
    /// comparison instead of an arc-swap guard. The cache holds a few roots per thread and
    /// always checks for a newer table first, so readers still see every publication.
    #[inline]
    fn with_table<R>(&self, mut f: impl FnMut(&Table) -> R) -> R {
        type Reader = arc_swap::Cache<Arc<ArcSwap<Table>>, Arc<Table>>;
        const CACHED_ROOTS: usize = 4;
        thread_local! {
            static READERS: std::cell::RefCell<Vec<(usize, Reader)>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        let key = Arc::as_ptr(&self.table) as usize;
        let table = &self.table;
        READERS
            .try_with(|r| match r.try_borrow_mut() {
                Ok(mut r) => {
                    let i = match r.iter().position(|(k, _)| *k == key) {
                        Some(i) => i,
                        None => {
                            if r.len() == CACHED_ROOTS {
                                r.remove(0);
                            }
                            r.push((key, arc_swap::Cache::new(table.clone())));
                            r.len() - 1
                        }
                    };
                    f(r[i].1.load())
                }
                Err(_) => f(&table.load()),
            })
            .unwrap_or_else(|_| f(&self.table.load()))
    }

    /// Reads configuration register `register` of `addr`; absent functions, buses no bridge
    /// routes to and (with [`ExtendedConfig::AllOnes`]) the extended space read all-ones.
    pub fn config_read(&self, addr: PciAddress, register: usize, data: &mut [u8]) {
        if self.beyond_config_size(register) {
            data.fill(0xff);
            return;
        }
        self.with_table(|table| match table.get(addr) {
            Some(f) => f.config().read(register, data),
            None => data.fill(0xff),
        })
    }

    /// Writes configuration register `register` of `addr`, notifies the
    /// function and returns the effect; `None` (write dropped) for absent
    /// functions, buses no bridge routes to and (with [`ExtendedConfig::AllOnes`]) the
    /// extended space.
    pub fn config_write(
        &self,
        addr: PciAddress,
        register: usize,
        data: &[u8],
    ) -> Option<(PciAddress, WriteEffect)> {
        if self.beyond_config_size(register) {
            return None;
        }
        let table = self.table.load();
        let f = table.get(addr)?;
        let effect = f.config().write(register, data);
        f.config_written(&effect);
        Some((addr, effect))
    }

    /// The current `CONFIG_ADDRESS` latch value.
    pub fn config_address(&self) -> u32 {
        self.config_address.load(Ordering::Acquire)
    }

    /// Resolves a data-port access to (function, register), or `None` when
    /// the latch's enable bit is clear or the access crosses the data port.
    fn data_target(&self, port_offset: u64, len: usize) -> Option<(PciAddress, usize)> {
        let lane = port_offset.checked_sub(4)?;
        if lane.checked_add(len as u64)? > 4 {
            return None;
        }
        let (addr, register) = PciAddress::from_config_address(self.config_address())?;
        Some((addr, usize::from(register) + lane as usize))
    }

    /// Guest read of the type-1 ports; `port_offset` is relative to 0xcf8
    /// (0..4 `CONFIG_ADDRESS`, 4..8 `CONFIG_DATA`).
    ///
    /// Like QEMU, a read of `CONFIG_ADDRESS` of any size returns the low
    /// bytes of the latch. A data read with the enable bit clear, or crossing
    /// the data port, reads all-ones.
    pub fn pio_read(&self, port_offset: u64, data: &mut [u8]) {
        if port_offset < 4 {
            let v = self.config_address();
            for (i, b) in data.iter_mut().enumerate() {
                *b = if i < 4 { (v >> (8 * i)) as u8 } else { 0xff };
            }
            return;
        }
        match self.data_target(port_offset, data.len()) {
            Some((addr, register)) => self.config_read(addr, register, data),
            None => data.fill(0xff),
        }
    }

    /// Guest write of the type-1 ports. `CONFIG_ADDRESS` takes only 32-bit
    /// writes at offset 0 (others are dropped, as QEMU); data writes go to
    /// the latched register plus the byte lane (`port_offset - 4`).
    pub fn pio_write(&self, port_offset: u64, data: &[u8]) -> Option<(PciAddress, WriteEffect)> {
        if port_offset < 4 {
            if let (0, Ok(bytes)) = (port_offset, <[u8; 4]>::try_from(data)) {
                self.config_address
                    .store(u32::from_le_bytes(bytes), Ordering::Release);
            }
            return None;
        }
        let (addr, register) = self.data_target(port_offset, data.len())?;
        self.config_write(addr, register, data)
    }

    /// Guest read of the ECAM window (`bus << 20 | devfn << 12 | register`; the bus is routed
    /// like a type-1 cycle). Offsets beyond 256 MiB read all-ones; the VMM decides how much of
    /// the window the guest can reach at all.
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        if offset >= ECAM_ALL_BUSES_SIZE {
            data.fill(0xff);
            return;
        }
        let (addr, register) = PciAddress::from_ecam_offset(offset);
        self.config_read(addr, usize::from(register), data);
    }

    /// Guest write of the ECAM window (see [`PciRoot::ecam_read`]).
    pub fn ecam_write(&self, offset: u64, data: &[u8]) -> Option<(PciAddress, WriteEffect)> {
        if offset >= ECAM_ALL_BUSES_SIZE {
            return None;
        }
        let (addr, register) = PciAddress::from_ecam_offset(offset);
        self.config_write(addr, usize::from(register), data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BarKind, COMMAND_MEMORY, PCI_COMMAND};
    use std::sync::atomic::AtomicUsize;

    struct Dev {
        config: ConfigSpace,
        written: AtomicUsize,
    }

    impl Dev {
        fn new(device: u16) -> Arc<Self> {
            let mut b = ConfigSpaceBuilder::new(0x1af4, device);
            b.class(0x02, 0, 0);
            b.bar(
                0,
                BarKind::Mem32 {
                    prefetchable: false,
                },
                0x1000,
            )
            .unwrap();
            Arc::new(Self {
                config: b.build().unwrap(),
                written: AtomicUsize::new(0),
            })
        }
    }

    impl PciFunction for Dev {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_written(&self, _effect: &WriteEffect) {
            self.written.fetch_add(1, Ordering::SeqCst);
        }
        fn name(&self) -> &str {
            "test-dev"
        }
    }

    fn a(d: u8, f: u8) -> PciAddress {
        PciAddress::new(0, d, f).unwrap()
    }

    fn pio_read32(root: &PciRoot, off: u64) -> u32 {
        let mut d = [0; 4];
        root.pio_read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn host_bridge() {
        let root = PciRoot::new();
        let hb = root.get(HostBridge::ADDRESS).unwrap();
        let c = hb.config();
        assert_eq!((c.vendor_id(), c.device_id()), (0x1b36, 0x0008));
        assert_eq!(c.class_code(), 0x06_0000);
        assert_eq!(c.revision(), 0);
        assert_eq!(c.header_type(), 0);
        assert!(PciRoot::empty().get(HostBridge::ADDRESS).is_none());
    }

    #[test]
    fn table_changes() {
        let root = PciRoot::new();
        let dev = Dev::new(0x1041);
        root.add(a(5, 0), dev.clone()).unwrap();
        assert_eq!(
            root.add(a(5, 0), Dev::new(1)).unwrap_err().to_string(),
            "PCI address 00:05.0 already holds test-dev"
        );
        let other_bus = PciAddress::new(1, 0, 0).unwrap();
        assert_eq!(
            root.add(other_bus, Dev::new(1)),
            Err(RootError::NoSuchBus(1))
        );
        root.add(a(2, 1), Dev::new(2)).unwrap();
        let addrs: Vec<_> = root.functions().into_iter().map(|(a, _)| a).collect();
        assert_eq!(addrs, vec![a(0, 0), a(2, 1), a(5, 0)]);
        assert!(root.remove(a(2, 1)).is_some());
        assert!(root.remove(a(2, 1)).is_none());
        assert!(root.remove(other_bus).is_none());
        assert!(root.get(a(2, 1)).is_none());
        assert_eq!(root.functions().len(), 2);
    }

    #[test]
    fn type1_decoding() {
        let root = PciRoot::new();
        let dev = Dev::new(0x1041);
        root.add(a(5, 0), dev.clone()).unwrap();
        // Latch: 32-bit at offset 0 only.
        root.pio_write(0, &a(5, 0).config_address(0).to_le_bytes());
        assert_eq!(pio_read32(&root, 0), 0x8000_2800);
        root.pio_write(1, &[0; 2]);
        root.pio_write(0, &[0; 2]);
        root.pio_write(3, &[0x1]);
        assert_eq!(pio_read32(&root, 0), 0x8000_2800);
        let mut b = [0u8; 1];
        root.pio_read(3, &mut b);
        assert_eq!(b[0], 0x00); // QEMU: low byte of the latch, unshifted
                                // Dword, word and byte data reads.
        assert_eq!(pio_read32(&root, 4), 0x1041_1af4);
        let mut w = [0u8; 2];
        root.pio_read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1041);
        root.pio_read(7, &mut b);
        assert_eq!(b[0], 0x10);
        // Crossing the data port.
        root.pio_read(7, &mut w);
        assert_eq!(w, [0xff; 2]);
        // Class dword via register 8.
        root.pio_write(0, &a(5, 0).config_address(8).to_le_bytes());
        root.pio_read(7, &mut b);
        assert_eq!(b[0], 0x02);
        // Writes: command word at register 4.
        root.pio_write(0, &a(5, 0).config_address(4).to_le_bytes());
        let (addr, e) = root.pio_write(4, &[COMMAND_MEMORY as u8, 0]).unwrap();
        assert_eq!(addr, a(5, 0));
        assert!(e.decode_changed);
        assert!(dev.config.mem_enabled());
        assert_eq!(dev.written.load(Ordering::SeqCst), 1);
        // BAR sizing through the data port.
        root.pio_write(0, &a(5, 0).config_address(0x10).to_le_bytes());
        let (_, e) = root.pio_write(4, &u32::MAX.to_le_bytes()).unwrap();
        assert!(e.bar_changed(0));
        assert_eq!(pio_read32(&root, 4), 0xffff_f000);
        // Enable bit clear: all-ones, writes dropped.
        root.pio_write(0, &0x0000_2810u32.to_le_bytes());
        assert_eq!(pio_read32(&root, 4), u32::MAX);
        assert!(root.pio_write(4, &[0; 4]).is_none());
        // Absent function and other bus.
        root.pio_write(0, &a(6, 0).config_address(0).to_le_bytes());
        assert_eq!(pio_read32(&root, 4), u32::MAX);
        assert!(root.pio_write(4, &[0; 4]).is_none());
        root.pio_write(
            0,
            &PciAddress::new(1, 5, 0)
                .unwrap()
                .config_address(0)
                .to_le_bytes(),
        );
        assert_eq!(pio_read32(&root, 4), u32::MAX);
        // Out-of-range port offsets never panic.
        assert_eq!(pio_read32(&root, 8), u32::MAX);
        assert_eq!(pio_read32(&root, u64::MAX), u32::MAX);
        assert!(root.pio_write(u64::MAX, &[0; 4]).is_none());
    }

    #[test]
    fn ecam_decoding() {
        let root = PciRoot::new();
        let dev = Dev::new(0x1042);
        root.add(a(3, 2), dev.clone()).unwrap();
        let base = a(3, 2).ecam_offset();
        let mut d = [0u8; 4];
        root.ecam_read(base, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
        let mut w = [0u8; 2];
        root.ecam_read(base + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
        // Host bridge at offset 0.
        root.ecam_read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        // Extended space reads all-ones on present functions (QEMU: config size 256).
        root.ecam_read(base + 0x100, &mut d);
        assert_eq!(d, [0xff; 4]);
        let (addr, e) = root
            .ecam_write(base + PCI_COMMAND as u64, &[COMMAND_MEMORY as u8])
            .unwrap();
        assert_eq!(addr, a(3, 2));
        assert!(e.decode_changed);
        assert_eq!(dev.written.load(Ordering::SeqCst), 1);
        // Absent function, other bus, beyond the window.
        root.ecam_read(a(3, 3).ecam_offset(), &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(root.ecam_write(a(3, 3).ecam_offset() + 4, &[1]).is_none());
        root.ecam_read(1 << 20, &mut d);
        assert_eq!(d, [0xff; 4]);
        root.ecam_read(u64::MAX, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(root.ecam_write(1 << 20 | 4, &[1]).is_none());
    }

    /// Dword, word and byte ECAM reads at the start, middle and end of the extended space.
    fn extended_reads(root: &PciRoot, addr: PciAddress) -> Vec<u32> {
        let mut out = Vec::new();
        for (reg, len) in [
            (0x100, 4),
            (0x104, 4),
            (0xffc, 4),
            (0x100, 2),
            (0x102, 2),
            (0xffe, 2),
            (0x100, 1),
            (0x103, 1),
            (0xfff, 1),
        ] {
            let mut d = [0u8; 4];
            root.ecam_read(addr.ecam_offset() + reg, &mut d[..len]);
            out.push(u32::from_le_bytes(d));
        }
        out
    }

    #[test]
    fn extended_config_space_as_qemu_and_as_recorded_before() {
        let ones = [
            0xffff_ffff,
            0xffff_ffff,
            0xffff_ffff,
            0xffff,
            0xffff,
            0xffff,
            0xff,
            0xff,
            0xff,
        ];
        for (mode, want) in [
            (ExtendedConfig::AllOnes, ones.to_vec()),
            (ExtendedConfig::Zero, vec![0; 9]),
        ] {
            let root = PciRoot::with_extended_config(mode);
            assert_eq!(root.extended_config(), mode);
            assert_eq!(PciRoot::new().extended_config(), ExtendedConfig::AllOnes);
            let dev = Dev::new(0x1042);
            root.add(a(3, 0), dev.clone()).unwrap();
            root.add(a(0x1e, 0), bridged(0, 1, 1)).unwrap();
            let behind = PciAddress::new(1, 1, 0).unwrap();
            let dev1 = Dev::new(0x1043);
            root.add(behind, dev1.clone()).unwrap();
            // The host bridge, a device, the bridge and a device behind it: all conventional.
            for addr in [HostBridge::ADDRESS, a(3, 0), a(0x1e, 0), behind] {
                assert_eq!(extended_reads(&root, addr), want, "{mode} {addr}");
            }
            // Writes there change nothing, at any width.
            let before = dev.written.load(Ordering::SeqCst);
            for (reg, data) in [
                (0x100u64, &[0x78u8, 0x56, 0x34, 0x12][..]),
                (0x104, &[0xcd, 0xab]),
                (0xfff, &[0x5a]),
            ] {
                let effect = root.ecam_write(a(3, 0).ecam_offset() + reg, data);
                match mode {
                    // Dropped before the function, as QEMU does.
                    ExtendedConfig::AllOnes => assert!(effect.is_none()),
                    // Delivered as before: the masks drop it.
                    ExtendedConfig::Zero => assert!(!effect.unwrap().1.changed()),
                }
                root.ecam_write(behind.ecam_offset() + reg, data);
            }
            let delivered = dev.written.load(Ordering::SeqCst) - before;
            assert_eq!(delivered, if mode == ExtendedConfig::Zero { 3 } else { 0 });
            for addr in [a(3, 0), behind] {
                assert_eq!(
                    extended_reads(&root, addr),
                    want,
                    "{mode} {addr} after writes"
                );
            }
            // The header is untouched and still reachable.
            assert_eq!(ecam32(&root, a(3, 0), 0), 0x1042_1af4);
            assert_eq!(ecam32(&root, behind, 0), 0x1043_1af4);
            // Absent functions read all-ones in both modes.
            assert_eq!(extended_reads(&root, a(4, 0)), ones.to_vec());
            // Invalid accesses stay all-ones.
            let mut d = [0u8; 4];
            root.ecam_read(a(3, 0).ecam_offset() + 0x101, &mut d[..2]);
            assert_eq!(d[..2], [0xff; 2]);
            let mut d3 = [0u8; 3];
            root.ecam_read(a(3, 0).ecam_offset() + 0x100, &mut d3);
            assert_eq!(d3, [0xff; 3]);
            // Through CF8 only the first 256 bytes are reachable, whatever the mode.
            root.pio_write(0, &a(3, 0).config_address(0xfc).to_le_bytes());
            assert_eq!(pio_read32(&root, 4), 0);
        }
        assert_eq!(ExtendedConfig::default(), ExtendedConfig::AllOnes);
        assert_eq!(ExtendedConfig::legacy(), ExtendedConfig::Zero);
        assert_eq!(
            serde_json::to_string(&ExtendedConfig::AllOnes).unwrap(),
            "\"all-ones\""
        );
        assert_eq!(
            serde_json::from_str::<ExtendedConfig>("\"zero\"").unwrap(),
            ExtendedConfig::Zero
        );
        assert_eq!(ExtendedConfig::AllOnes.to_string(), "all-ones");
    }

    fn bridged(primary: u8, secondary: u8, subordinate: u8) -> Arc<crate::PciBridge> {
        let b = Arc::new(crate::PciBridge::new(secondary.max(1), false));
        b.program(&crate::BridgeSetup {
            primary,
            secondary,
            subordinate,
            memory: None,
            prefetchable: None,
        });
        b
    }

    fn ecam32(root: &PciRoot, addr: PciAddress, reg: u64) -> u32 {
        let mut d = [0u8; 4];
        root.ecam_read(addr.ecam_offset() + reg, &mut d);
        u32::from_le_bytes(d)
    }

    fn cf8_32(root: &PciRoot, addr: PciAddress, reg: u8) -> u32 {
        root.pio_write(0, &addr.config_address(reg).to_le_bytes());
        pio_read32(root, 4)
    }

    #[test]
    fn type1_forwarding_through_two_levels_of_bridges() {
        let root = PciRoot::new();
        let at = |b, d, f| PciAddress::new(b, d, f).unwrap();
        // 00:1e.0 -> bus 1 (1..=2); 01:03.0 -> bus 2; 00:1f.0 -> bus 3.
        root.add(at(0, 0x1e, 0), bridged(0, 1, 2)).unwrap();
        root.add(at(1, 3, 0), bridged(1, 2, 2)).unwrap();
        root.add(at(0, 0x1f, 0), bridged(0, 3, 3)).unwrap();
        root.add(at(1, 1, 0), Dev::new(0x1001)).unwrap();
        root.add(at(2, 0, 0), Dev::new(0x1002)).unwrap();
        root.add(at(3, 5, 1), Dev::new(0x1003)).unwrap();
        assert_eq!(
            root.add(at(4, 0, 0), Dev::new(1)),
            Err(RootError::NoSuchBus(4))
        );
        for (addr, id) in [
            (at(1, 1, 0), 0x1001),
            (at(2, 0, 0), 0x1002),
            (at(3, 5, 1), 0x1003),
        ] {
            let want = (id << 16) | 0x1af4;
            assert_eq!(ecam32(&root, addr, 0), want, "ECAM {addr}");
            assert_eq!(cf8_32(&root, addr, 0), want, "CF8 {addr}");
        }
        assert_eq!(ecam32(&root, at(1, 3, 0), 0), 0x0001_1b36);
        for absent in [at(1, 2, 0), at(2, 1, 0), at(4, 0, 0), at(0xff, 0, 0)] {
            assert_eq!(ecam32(&root, absent, 0), u32::MAX, "{absent}");
            assert_eq!(cf8_32(&root, absent, 0), u32::MAX, "{absent}");
            assert!(root.ecam_write(absent.ecam_offset() + 4, &[2]).is_none());
        }
        let addrs: Vec<String> = root
            .functions()
            .iter()
            .map(|(a, _)| a.to_string())
            .collect();
        assert_eq!(
            addrs,
            ["00:00.0", "00:1e.0", "01:01.0", "01:03.0", "02:00.0", "00:1f.0", "03:05.1"]
        );
        // A write behind two bridges reaches the function and reports its address.
        let (a, e) = root
            .ecam_write(
                at(2, 0, 0).ecam_offset() + PCI_COMMAND as u64,
                &[COMMAND_MEMORY as u8],
            )
            .unwrap();
        assert_eq!(a, at(2, 0, 0));
        assert!(e.decode_changed);
        // The guest renumbers: bus 2 becomes bus 7 (1e.0 now covers 1..=7); routing follows.
        let set = |addr: PciAddress, reg: u64, v: u8| {
            root.ecam_write(addr.ecam_offset() + reg, &[v]).unwrap();
        };
        set(at(0, 0x1e, 0), 0x1a, 7);
        set(at(1, 3, 0), 0x19, 7);
        set(at(1, 3, 0), 0x1a, 7);
        assert_eq!(ecam32(&root, at(7, 0, 0), 0), 0x1002_1af4);
        assert_eq!(ecam32(&root, at(2, 0, 0), 0), u32::MAX);
        // Nonsense numbering (secondary 0, a loop-like range) still ends and reads all-ones.
        set(at(0, 0x1f, 0), 0x19, 0);
        set(at(0, 0x1f, 0), 0x1a, 0xff);
        assert_eq!(ecam32(&root, at(0xfe, 0, 0), 0), u32::MAX);
        // Removing a bridge cuts off its buses.
        assert!(root.remove(at(0, 0x1e, 0)).is_some());
        assert_eq!(ecam32(&root, at(1, 1, 0), 0), u32::MAX);
        assert_eq!(ecam32(&root, at(7, 0, 0), 0), u32::MAX);
        assert!(root.get(at(1, 1, 0)).is_none());
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let root = PciRoot::new();
        let dev = Dev::new(0x1041);
        root.add(a(1, 0), dev.clone()).unwrap();
        let table = crate::msix::MsixTable::new(3);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..100_000 {
            let r = next();
            let len = [0usize, 1, 2, 3, 4, 8, 16][(r % 7) as usize];
            let data = next().to_le_bytes().repeat(2);
            let off = match (r >> 3) % 4 {
                0 => next(),
                1 => next() % 0x1_0000,
                2 => a(1, 0).ecam_offset() + next() % 0x1000,
                _ => next() % 16,
            };
            let mut buf = vec![0u8; len];
            root.ecam_write(off, &data[..len]);
            root.ecam_read(off, &mut buf);
            root.pio_write(off % 16, &data[..len]);
            root.pio_read(off, &mut buf);
            table.write_table(off % 64, &data[..len]);
            table.read_table(off, &mut buf);
            table.read_pba(off % 16, &mut buf);
            dev.config.write(off as usize, &data[..len]);
        }
        let c = dev.config();
        assert_eq!(
            (c.vendor_id(), c.device_id(), c.class_code()),
            (0x1af4, 0x1041, 0x02_0000)
        );
        assert_eq!(root.get(a(0, 0)).unwrap().config().device_id(), 0x0008);
    }

    #[test]
    fn concurrent_reader_while_adding() {
        let root = Arc::new(PciRoot::new());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (root, stop) = (root.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seen = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        for slot in 1..=4u8 {
                            let mut d = [0u8; 4];
                            root.ecam_read(a(slot, 0).ecam_offset(), &mut d);
                            let v = u32::from_le_bytes(d);
                            let expected = 0x1000_1af4 | (u32::from(slot) << 16);
                            assert!(v == u32::MAX || v == expected, "{v:#x}");
                            seen += u64::from(v != u32::MAX);
                        }
                    }
                    seen
                })
            })
            .collect();
        let writers: Vec<_> = (1..=4u8)
            .map(|slot| {
                let root = root.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        root.add(a(slot, 0), Dev::new(0x1000 | u16::from(slot)))
                            .unwrap();
                        root.remove(a(slot, 0)).unwrap();
                    }
                    root.add(a(slot, 0), Dev::new(0x1000 | u16::from(slot)))
                        .unwrap();
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Release);
        for r in readers {
            r.join().unwrap();
        }
        // Serialized writers lost no update.
        assert_eq!(root.functions().len(), 5);
    }

    #[test]
    fn a_threads_cached_table_sees_every_publication() {
        let root = PciRoot::new();
        let other = PciRoot::new();
        let a = PciAddress::new(0, 4, 0).unwrap();
        let mut d = [0u8; 2];
        root.config_read(a, 0, &mut d);
        other.config_read(a, 0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        root.add(a, Arc::new(HostBridge::new())).unwrap();
        root.config_read(a, 0, &mut d);
        assert_eq!(
            u16::from_le_bytes(d),
            HOST_BRIDGE_VENDOR,
            "added: seen at once"
        );
        other.config_read(a, 0, &mut d);
        assert_eq!(d, [0xff, 0xff], "each root has its own table");
        root.remove(a);
        root.config_read(a, 0, &mut d);
        assert_eq!(d, [0xff, 0xff], "removed: seen at once");
        // More roots than the per-thread cache holds still read correctly.
        let many: Vec<PciRoot> = (0..10).map(|_| PciRoot::new()).collect();
        for r in &many {
            r.config_read(PciAddress::HOST_BRIDGE, 0, &mut d);
            assert_eq!(u16::from_le_bytes(d), HOST_BRIDGE_VENDOR);
        }
    }
}
