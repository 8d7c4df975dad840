//! The config-space hot path allocates nothing: a counting global allocator around a burst of
//! 10,000 rounds of exits, dispatched exactly as the vCPU loop does
//! (`vmm/src/vcpu.rs`: `Bus::read` / `Bus::write` on the port and MMIO buses):
//!
//! - a type-1 config read: CF8 write + CFC read, `Bus` -> `ConfigPorts` -> `PciRoot` ->
//!   `ConfigSpace`;
//! - an ECAM dword read: `Bus` -> `Ecam` -> `PciRoot` -> `ConfigSpace`;
//! - an MSI-X table read and a PBA read in BAR1: `Bus` -> `BarRegion` ->
//!   `VirtioPciDevice::bar_read` -> `MsixTable`;
//! - a config write through CF8/CFC that moves no BAR (the interrupt line register);
//! - a read nobody claims (the bus miss).
//!
//! Only allocations made on the dispatching thread while the burst runs are counted. One warm-up
//! round runs first: arc-swap gives each thread a debt node on its first `load` (one
//! allocation per thread for the life of the process, not per exit).
//!
//! # No lock on the read path (why, by the code; not something a test can observe)
//!
//! - `devices/src/bus.rs`, `Bus::read`/`Bus::write`: `self.table.load()` is an
//!   `arc_swap::ArcSwap::load` (a thread-local debt slot, no lock, no refcount traffic on the
//!   fast path), then `partition_point` over an immutable `Vec`. The bus's `writer` mutex is
//!   taken only by `Bus::update` (insert/remove/replace).
//! - `devices/src/pci_host.rs`, `ConfigPorts::read` -> `PciRoot::pio_read`; `Ecam::read` ->
//!   `PciRoot::ecam_read`; `BarRegion::read` -> `PciFunction::bar_read`. The write side,
//!   `ConfigPorts::write`, calls `BarMapper::written`, which locks `BarMapper::mapped` only when
//!   the `WriteEffect` says a BAR or a decode bit changed (never for a CF8 latch write, which
//!   returns `None`).
//! - `pci/src/root.rs`: `config_address` is an `AtomicU32` (Acquire/Release);
//!   `PciRoot::config_read` does `self.table.load()` (arc-swap) and indexes a 256-entry `Vec`;
//!   `PciRoot::writer` is taken only by `add`/`remove`.
//! - `pci/src/config.rs`, `ConfigSpace::read`: one `AtomicU32::load(Acquire)`; masks are
//!   immutable after the builder.
//! - `pci/src/msix.rs`, `MsixTable::read_table` / `read_pba`: `AtomicU32` / `AtomicU64` loads.
//! - `devices/src/virtio/pci.rs`, `VirtioPciDevice::bar_read`: the MSI-X BAR arms go straight to
//!   the `MsixTable`. Locks in that file sit elsewhere: `common` (BAR4 common config: driver
//!   set-up only), `notify_base` (`sync_notify`, on BAR4/decode changes). Signalling a queue
//!   (`Interrupts::signal_queue`, on a device worker) looks its MSI-X vector up in atomics,
//!   without a lock.
//! - `vmm/src/vcpu.rs`: an unclaimed access only fills all-ones and hits a disabled
//!   `tracing::debug!` callsite (an atomic interest check).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use devices::bus::{Bus, BusDevice};
use devices::pci_host::{BarMapper, ConfigPorts, Ecam};
use devices::virtio::pci::MSIX_PBA_OFFSET;

use devices::virtio::testing::{rng_function, NullHost};
use pci::{PciAddress, PciRoot};
use vm_memory::{GuestAddress, GuestMemoryMmap};

struct Counting;

thread_local! {
    /// Allocations made by this thread while counting (`None`: not counting). Per thread, so
    /// tests running in parallel do not see each other's allocations.
    static ALLOCS: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note() {
    // `try_with`: the allocator can be called while thread-locals are being torn down.
    let _ = ALLOCS.try_with(|c| c.set(c.get().map(|n| n + 1)));
}

/// Runs `f` and returns its result with the number of allocations it made on this thread.
fn count_allocs<R>(f: impl FnOnce() -> R) -> (R, usize) {
    ALLOCS.with(|c| c.set(Some(0)));
    let r = f();
    let n = ALLOCS.with(|c| c.take()).unwrap_or(0);
    (r, n)
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: `ptr` came from this allocator (i.e. System) with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (i.e. System) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ECAM_BASE: u64 = 0xe000_0000;
const BAR1_BASE: u64 = 0xc000_0000;

struct Machine {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    rng: PciAddress,
}

fn machine() -> Machine {
    let root = Arc::new(PciRoot::new());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let host = Arc::new(NullHost {
        next_gsi: AtomicU32::new(24),
    });
    let rng = Arc::new(rng_function(mem, host));
    let addr = PciAddress::new(0, 5, 0).unwrap();
    root.add(addr, rng).unwrap();
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let mapper = Arc::new(BarMapper::new(root.clone(), &pio, &mmio));
    let ports: Arc<dyn BusDevice> = Arc::new(ConfigPorts::new(root.clone(), mapper.clone()));
    let ecam: Arc<dyn BusDevice> = Arc::new(Ecam::new(root, mapper));
    pio.insert(0xcf8, 8, ports).unwrap();
    mmio.insert(ECAM_BASE, pci::root::ECAM_BUS0_SIZE, ecam)
        .unwrap();
    // Guest set-up (allowed to allocate): BAR1 at BAR1_BASE, memory decode on.
    for (reg, v) in [(0x14u8, BAR1_BASE as u32), (0x04, 0x2)] {
        pio.write(0xcf8, &addr.config_address(reg).to_le_bytes());
        pio.write(0xcfc, &v.to_le_bytes());
    }
    Machine {
        pio,
        mmio,
        rng: addr,
    }
}

/// One round of hot-path exits; returns a checksum so nothing is optimised away.
fn round(m: &Machine, latch: &[u8; 4], ecam: u64) -> u64 {
    let mut sum = 0u64;
    let mut d = [0u8; 4];
    // Type-1 config read.
    assert!(m.pio.write(0xcf8, latch));
    assert!(m.pio.read(0xcfc, &mut d));
    sum += u64::from(u32::from_le_bytes(d));
    // A byte read through the data port (lane 2: device ID low byte).
    let mut b = [0u8; 1];
    assert!(m.pio.read(0xcfe, &mut b));
    sum += u64::from(b[0]);
    // ECAM.
    assert!(m.mmio.read(ecam, &mut d));
    sum += u64::from(u32::from_le_bytes(d));
    // MSI-X table (vector 0 control) and PBA, qword and dword.
    assert!(m.mmio.read(BAR1_BASE + 12, &mut d));
    sum += u64::from(u32::from_le_bytes(d));
    let mut q = [0u8; 8];
    assert!(m.mmio.read(BAR1_BASE, &mut q));
    sum += u64::from_le_bytes(q);
    assert!(m.mmio.read(BAR1_BASE + MSIX_PBA_OFFSET, &mut d));
    sum += u64::from(u32::from_le_bytes(d));
    // A config write that changes nothing the VMM reacts to (interrupt line, byte lane 0):
    // `WriteEffect` without BAR/decode changes, so `BarMapper::written` does nothing and
    // `VirtioPciDevice::config_written` only reads its pci-cfg window registers.
    assert!(m
        .pio
        .write(0xcf8, &m.rng.config_address(0x3c).to_le_bytes()));
    assert!(m.pio.write(0xcfc, &[0x0b]));
    // Nobody there (what the vCPU loop answers with all-ones).
    assert!(!m.pio.read(0x2f0, &mut b));
    sum
}

#[test]
fn config_space_hot_path_allocates_nothing() {
    let m = machine();
    let latch = m.rng.config_address(0).to_le_bytes();
    let ecam = ECAM_BASE + m.rng.ecam_offset();
    let expect = round(&m, &latch, ecam); // warm-up: arc-swap's per-thread debt node
    assert_eq!(
        expect,
        2 * 0x1044_1af4 + 0x44 + 1,
        "virtio-rng IDs (CFC, ECAM), device ID low byte, MSI-X vector 0 masked, PBA clear"
    );

    let (total, allocs) = count_allocs(|| {
        let mut total = 0u64;
        for _ in 0..10_000 {
            total = total.wrapping_add(std::hint::black_box(round(&m, &latch, ecam)));
        }
        total
    });

    assert_eq!(total, expect.wrapping_mul(10_000));
    assert_eq!(
        allocs, 0,
        "{allocs} allocations in 10,000 rounds of config/ECAM/MSI-X exits"
    );
}

#[test]
fn the_counter_counts() {
    // The allocator really sees this thread's allocations (so a zero above means something).
    let (v, n) = count_allocs(|| std::hint::black_box(vec![1u8; 64]));
    drop(v);
    assert!(n >= 1);
}
