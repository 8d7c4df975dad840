//! The lock-free I/O bus: where a guest exit finds its device.
//!
//! A [`Bus`] maps address ranges (port I/O or guest-physical MMIO) to devices.
//!
//! # Invariants
//! - The range table is an immutable, sorted, non-overlapping `Vec` inside an `Arc`, published
//!   through [`arc_swap::ArcSwap`]. A reader calls [`Bus::read`] / [`Bus::write`]: it takes an
//!   arc-swap guard (no lock, no reference-count traffic on the fast path, no allocation),
//!   binary-searches the table and calls the device with `&self`.
//! - A vCPU thread reads through its own [`BusReader`] instead: it keeps the current table and
//!   only compares one pointer per exit (a relaxed atomic load) to notice a new one, so an
//!   unchanged table costs no atomic read-modify-write at all.
//! - Every change ([`Bus::insert`], [`Bus::remove`], [`Bus::replace_ranges`]) builds a new table
//!   and publishes it with one atomic store. Writers are serialised by a mutex that readers never
//!   touch, so there is exactly one writer at a time and no update is lost.
//! - When a change returns, every later lookup on any thread sees the new table. A lookup already
//!   in flight may finish on the old table; the old devices stay alive until it is done.
//! - Devices keep their own state (atomics or narrow locks of their own); the bus never locks a
//!   device.

use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Cache};

/// A device reachable through a [`Bus`]. Called on vCPU threads; takes `&self`.
pub trait BusDevice: Send + Sync {
    /// Reads `data.len()` bytes at `offset` from the start of the range `base`.
    fn read(&self, base: u64, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the start of the range `base`.
    fn write(&self, base: u64, offset: u64, data: &[u8]);
}

/// A half-open address range `[base, base + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BusRange {
    /// First address of the range.
    pub base: u64,
    /// Length in bytes, never zero.
    pub len: u64,
}

impl BusRange {
    /// Last address inside the range (`len` is never zero on a bus).
    pub fn last(&self) -> u64 {
        self.base.saturating_add(self.len.saturating_sub(1))
    }

    /// Whether `addr` falls in the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

/// Errors of bus updates.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("range {new_base:#x}+{new_len:#x} overlaps {old_base:#x}+{old_len:#x}")]
    Overlap {
        /// Base of the range that was to be inserted.
        new_base: u64,
        /// Length of the range that was to be inserted.
        new_len: u64,
        /// Base of the range already present.
        old_base: u64,
        /// Length of the range already present.
        old_len: u64,
    },
    /// A range of length zero.
    #[error("empty range at {0:#x}")]
    Empty(u64),
}

#[derive(Clone)]
struct Entry {
    range: BusRange,
    device: Arc<dyn BusDevice>,
}

/// An immutable snapshot of the bus: sorted, non-overlapping ranges.
#[derive(Clone, Default)]
struct Table {
    entries: Vec<Entry>,
}

impl Table {
    fn find(&self, addr: u64) -> Option<&Entry> {
        // Index of the first entry whose base is > addr; the candidate is the one before it.
        let idx = self.entries.partition_point(|e| e.range.base <= addr);
        let entry = self.entries.get(idx.checked_sub(1)?)?;
        entry.range.contains(addr).then_some(entry)
    }

    fn insert(&mut self, range: BusRange, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        if range.len == 0 {
            return Err(BusError::Empty(range.base));
        }
        if let Some(old) = self.entries.iter().find(|e| e.range.overlaps(&range)) {
            return Err(BusError::Overlap {
                new_base: range.base,
                new_len: range.len,
                old_base: old.range.base,
                old_len: old.range.len,
            });
        }
        let idx = self.entries.partition_point(|e| e.range.base < range.base);
        self.entries.insert(idx, Entry { range, device });
        Ok(())
    }
}

/// A lock-free bus; see the module documentation for its invariants.
pub struct Bus {
    table: Arc<ArcSwap<Table>>,
    writer: Mutex<()>,
}

/// One thread's reading handle on a [`Bus`] (a vCPU keeps one per bus). It sees every table
/// the bus publishes: each lookup first compares the cached table with the published one.
pub struct BusReader {
    cache: Cache<Arc<ArcSwap<Table>>, Arc<Table>>,
}

impl BusReader {
    /// Dispatches a read. Returns false (and leaves `data` untouched) when nothing claims
    /// `addr`.
    #[inline]
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.cache.load().find(addr) {
            Some(e) => {
                e.device.read(e.range.base, addr - e.range.base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when nothing claims `addr`.
    #[inline]
    pub fn write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.cache.load().find(addr) {
            Some(e) => {
                e.device.write(e.range.base, addr - e.range.base, data);
                true
            }
            None => false,
        }
    }
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus {
            table: Arc::new(ArcSwap::from_pointee(Table::default())),
            writer: Mutex::new(()),
        }
    }

    /// A reading handle for one thread (see [`BusReader`]).
    pub fn reader(&self) -> BusReader {
        BusReader {
            cache: Cache::new(self.table.clone()),
        }
    }

    /// Dispatches a read. Returns false (and leaves `data` untouched) when nothing claims `addr`.
    #[inline]
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let table = self.table.load();
        match table.find(addr) {
            Some(e) => {
                e.device.read(e.range.base, addr - e.range.base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when nothing claims `addr`.
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let table = self.table.load();
        match table.find(addr) {
            Some(e) => {
                e.device.write(e.range.base, addr - e.range.base, data);
                true
            }
            None => false,
        }
    }

    /// Publishes a table with `device` added at `[base, base + len)`.
    pub fn insert(&self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        self.update(|t| t.insert(BusRange { base, len }, device))
    }

    /// Publishes a table without the range that starts at `base`. Returns whether one was there.
    pub fn remove(&self, base: u64) -> bool {
        let mut found = false;
        let _ = self.update(|t| {
            let before = t.entries.len();
            t.entries.retain(|e| e.range.base != base);
            found = t.entries.len() != before;
            Ok(())
        });
        found
    }

    /// Atomically replaces every range in `old` (by base) with the ranges in `new`: one
    /// publication, so no reader ever sees a half-moved device. On error nothing changes.
    pub fn replace_ranges(
        &self,
        old: &[u64],
        new: Vec<(BusRange, Arc<dyn BusDevice>)>,
    ) -> Result<(), BusError> {
        self.update(|t| {
            t.entries.retain(|e| !old.contains(&e.range.base));
            for (range, device) in new {
                t.insert(range, device)?;
            }
            Ok(())
        })
    }

    /// The ranges currently published, in address order.
    pub fn ranges(&self) -> Vec<BusRange> {
        self.table.load().entries.iter().map(|e| e.range).collect()
    }

    fn update(&self, f: impl FnOnce(&mut Table) -> Result<(), BusError>) -> Result<(), BusError> {
        // A poisoned writer lock only means another writer panicked; the published table is
        // still consistent because it is replaced whole.
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Table::clone(&self.table.load());
        f(&mut next)?;
        self.table.store(Arc::new(next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Recorder {
        tag: u8,
        last_write: AtomicU64,
    }

    impl BusDevice for Recorder {
        fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(self.tag);
            if let Some(b) = data.first_mut() {
                *b = offset as u8;
            }
        }
        fn write(&self, _base: u64, offset: u64, _data: &[u8]) {
            self.last_write.store(offset, Ordering::SeqCst);
        }
    }

    fn dev(tag: u8) -> Arc<Recorder> {
        Arc::new(Recorder {
            tag,
            last_write: AtomicU64::new(u64::MAX),
        })
    }

    #[test]
    fn dispatch_finds_range_and_offset() {
        let bus = Bus::new();
        bus.insert(0x100, 0x10, dev(1)).unwrap();
        bus.insert(0x200, 0x8, dev(2)).unwrap();
        let mut d = [0u8; 2];
        assert!(bus.read(0x10f, &mut d));
        assert_eq!(d, [0x0f, 1]);
        assert!(bus.read(0x200, &mut d));
        assert_eq!(d, [0, 2]);
        assert!(!bus.read(0x110, &mut d));
        assert!(!bus.read(0xff, &mut d));
        assert!(!bus.read(0x208, &mut d));
    }

    #[test]
    fn overlap_and_empty_are_refused() {
        let bus = Bus::new();
        bus.insert(0x100, 0x10, dev(1)).unwrap();
        assert!(matches!(
            bus.insert(0x10f, 1, dev(2)),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xf0, 0x11, dev(2)),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(bus.insert(0x300, 0, dev(2)), Err(BusError::Empty(0x300)));
        bus.insert(0xf0, 0x10, dev(2)).unwrap();
        assert_eq!(bus.ranges().len(), 2);
    }

    #[test]
    fn top_of_address_space_does_not_overflow() {
        let bus = Bus::new();
        bus.insert(u64::MAX - 0xf, 0x10, dev(1)).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(u64::MAX, &mut d));
        assert_eq!(d[0], 0xf);
    }

    #[test]
    fn replace_is_all_or_nothing() {
        let bus = Bus::new();
        let a = dev(1);
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        bus.insert(0x3000, 0x100, dev(3)).unwrap();
        // Moving onto an occupied range fails and leaves the old mapping.
        let r = bus.replace_ranges(
            &[0x1000],
            vec![(
                BusRange {
                    base: 0x3080,
                    len: 0x100,
                },
                a.clone(),
            )],
        );
        assert!(r.is_err());
        assert_eq!(bus.ranges()[0].base, 0x1000);
        bus.replace_ranges(
            &[0x1000],
            vec![(
                BusRange {
                    base: 0x2000,
                    len: 0x100,
                },
                a.clone(),
            )],
        )
        .unwrap();
        assert!(bus.write(0x2004, &[0]));
        assert_eq!(a.last_write.load(Ordering::SeqCst), 4);
        assert!(!bus.write(0x1004, &[0]));
        assert!(bus.remove(0x2000));
        assert!(!bus.remove(0x2000));
    }

    #[test]
    fn readers_run_while_a_writer_publishes() {
        let bus = Arc::new(Bus::new());
        bus.insert(0, 0x10, dev(7)).unwrap();
        let reader = {
            let bus = bus.clone();
            std::thread::spawn(move || {
                let mut d = [0u8; 2];
                for _ in 0..200_000 {
                    // The stable range is always there, whatever the writer does.
                    assert!(bus.read(0x1, &mut d));
                    assert_eq!(d, [1, 7]);
                }
            })
        };
        for i in 0..2_000u64 {
            let base = 0x1000 + (i % 16) * 0x100;
            bus.insert(base, 0x100, dev(9)).unwrap();
            assert!(bus.remove(base));
        }
        reader.join().unwrap();
    }

    #[test]
    fn a_reader_sees_every_published_table() {
        let bus = Bus::new();
        let mut r = bus.reader();
        let mut d = [0u8; 2];
        assert!(!r.read(0x100, &mut d));
        bus.insert(0x100, 0x10, dev(1)).unwrap();
        assert!(r.read(0x104, &mut d), "the reader sees the insert at once");
        assert_eq!(d, [4, 1]);
        assert!(bus.remove(0x100));
        assert!(!r.write(0x104, &[0]), "and the removal");
    }
}
