//! Lock-free MSI-X table and pending bit array (PBA).
//!
//! The table holds one 16-byte entry per vector (address low, address high,
//! data, vector control with the mask bit 0); the PBA holds one bit per
//! vector and is read-only to the guest.
//!
//! Invariants:
//! - All state is atomics behind `&self`: the guest (through BAR accesses)
//!   and device threads (signalling interrupts) never take a lock.
//! - At creation and after [`MsixTable::reset`] every entry is masked and no
//!   bit is pending, as the PCI spec requires.
//! - Only naturally aligned 4- and 8-byte accesses inside the table/PBA are
//!   valid; other reads return all-ones and other writes are dropped.
//! - Entries are stored as written, like QEMU (the reserved bits of vector
//!   control are kept).
//! - An interrupt raised while its vector (or the function) is masked sets
//!   the pending bit; it is delivered (and the bit cleared) exactly once, by
//!   whoever first observes the vector unmasked with the bit set
//!   ([`MsixTable::take_pending_if_unmasked`]).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::config::{ConfigSpace, MSIX_MAX_VECTORS};

/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Vector control: mask bit.
pub const MSIX_VECTOR_MASKED: u32 = 1;

const ENTRY_ADDR_LO: usize = 0;
const ENTRY_ADDR_HI: usize = 1;
const ENTRY_DATA: usize = 2;
const ENTRY_CTRL: usize = 3;

/// One MSI-X message as programmed by the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsixMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector mask bit.
    pub masked: bool,
}

/// What the device should do with an interrupt on a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Send this message now.
    Now(MsixMessage),
    /// Masked: the pending bit was set; it is sent when unmasked.
    Pending,
    /// MSI-X is disabled: use the legacy INTx pin instead.
    Intx,
    /// The vector does not exist (for example virtio's "no vector" 0xffff):
    /// nothing to send.
    Dropped,
}

/// MSI-X table and PBA of one function.
#[derive(Debug)]
pub struct MsixTable {
    /// 4 dwords per vector.
    entries: Box<[AtomicU32]>,
    /// One bit per vector.
    pba: Box<[AtomicU64]>,
    vectors: u16,
}

/// Validates a 4- or 8-byte naturally aligned access within `size` bytes.
fn valid(offset: u64, len: usize, size: u64) -> bool {
    matches!(len, 4 | 8)
        && offset.is_multiple_of(len as u64)
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
}

fn le_bytes_to_u64(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |v, (i, b)| v | (u64::from(*b) << (8 * i)))
}

impl MsixTable {
    /// A table of `vectors` entries (clamped to 2048, the MSI-X maximum), all
    /// masked, none pending.
    pub fn new(vectors: u16) -> Self {
        let vectors = vectors.min(MSIX_MAX_VECTORS);
        let n = usize::from(vectors);
        let entries = (0..n * 4)
            .map(|i| {
                AtomicU32::new(if i % 4 == ENTRY_CTRL {
                    MSIX_VECTOR_MASKED
                } else {
                    0
                })
            })
            .collect();
        let pba = (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self {
            entries,
            pba,
            vectors,
        }
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.vectors
    }

    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }

    /// Size of the PBA in bytes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// Masks every entry, clears addresses, data and pending bits.
    pub fn reset(&self) {
        for (i, e) in self.entries.iter().enumerate() {
            let v = if i % 4 == ENTRY_CTRL {
                MSIX_VECTOR_MASKED
            } else {
                0
            };
            e.store(v, Ordering::Release);
        }
        for p in self.pba.iter() {
            p.store(0, Ordering::Release);
        }
    }

    /// Guest read of the table at `offset` (4 or 8 bytes, aligned); invalid
    /// accesses read all-ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        if !valid(offset, data.len(), self.table_size()) {
            data.fill(0xff);
            return;
        }
        let first = (offset / 4) as usize;
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let v = self
                .entries
                .get(first + i)
                .map_or(u32::MAX, |e| e.load(Ordering::Acquire));
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Guest write of the table at `offset` (4 or 8 bytes, aligned); invalid
    /// accesses are dropped. Returns the vector whose entry changed value, so
    /// the caller can react (for example deliver a pending interrupt with
    /// [`take_pending_if_unmasked`](Self::take_pending_if_unmasked)).
    pub fn write_table(&self, offset: u64, data: &[u8]) -> Option<u16> {
        if !valid(offset, data.len(), self.table_size()) {
            return None;
        }
        let first = (offset / 4) as usize;
        let mut changed = false;
        for (i, chunk) in data.chunks(4).enumerate() {
            let v = le_bytes_to_u64(chunk) as u32;
            if let Some(e) = self.entries.get(first + i) {
                changed |= e.swap(v, Ordering::AcqRel) != v;
            }
        }
        // offset < table_size <= 2048 * 16, so the vector fits in u16.
        changed.then_some((offset / MSIX_ENTRY_SIZE) as u16)
    }

    /// Guest read of the PBA at `offset` (4 or 8 bytes, aligned); invalid
    /// accesses read all-ones. The PBA is read-only: there is no write.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        if !valid(offset, data.len(), self.pba_size()) {
            data.fill(0xff);
            return;
        }
        let q = self
            .pba
            .get((offset / 8) as usize)
            .map_or(u64::MAX, |p| p.load(Ordering::Acquire));
        let v = q >> ((offset % 8) * 8);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (v >> (8 * i)) as u8;
        }
    }

    fn word(&self, v: u16, w: usize) -> Option<&AtomicU32> {
        if v >= self.vectors {
            return None;
        }
        self.entries.get(usize::from(v) * 4 + w)
    }

    /// The entry of vector `v`, or `None` if `v` is out of range.
    pub fn entry(&self, v: u16) -> Option<MsixMessage> {
        let lo = self.word(v, ENTRY_ADDR_LO)?.load(Ordering::Acquire);
        let hi = self.word(v, ENTRY_ADDR_HI)?.load(Ordering::Acquire);
        let data = self.word(v, ENTRY_DATA)?.load(Ordering::Acquire);
        let ctrl = self.word(v, ENTRY_CTRL)?.load(Ordering::Acquire);
        Some(MsixMessage {
            address: u64::from(lo) | (u64::from(hi) << 32),
            data,
            masked: ctrl & MSIX_VECTOR_MASKED != 0,
        })
    }

    /// Whether vector `v` is masked (true for out-of-range vectors).
    pub fn masked(&self, v: u16) -> bool {
        self.word(v, ENTRY_CTRL)
            .is_none_or(|c| c.load(Ordering::Acquire) & MSIX_VECTOR_MASKED != 0)
    }

    fn pba_bit(&self, v: u16) -> Option<(&AtomicU64, u64)> {
        if v >= self.vectors {
            return None;
        }
        let q = self.pba.get(usize::from(v / 64))?;
        Some((q, 1u64 << (v % 64)))
    }

    /// Sets or clears the pending bit of `v` (ignored if out of range).
    pub fn set_pending(&self, v: u16, pending: bool) {
        if let Some((q, bit)) = self.pba_bit(v) {
            if pending {
                q.fetch_or(bit, Ordering::AcqRel);
            } else {
                q.fetch_and(!bit, Ordering::AcqRel);
            }
        }
    }

    /// Whether `v` is pending (false if out of range).
    pub fn pending(&self, v: u16) -> bool {
        self.pba_bit(v)
            .is_some_and(|(q, bit)| q.load(Ordering::Acquire) & bit != 0)
    }

    /// If `v` and the function are unmasked and `v` is pending, clears the
    /// pending bit and returns true: the caller must then deliver `v`'s
    /// message. Call it after the guest unmasks a vector (a
    /// [`write_table`](Self::write_table) result) or clears the function
    /// mask (for every vector). Exactly one caller wins the bit.
    pub fn take_pending_if_unmasked(&self, v: u16, function_masked: bool) -> bool {
        if function_masked || self.masked(v) {
            return false;
        }
        self.pba_bit(v)
            .is_some_and(|(q, bit)| q.fetch_and(!bit, Ordering::AcqRel) & bit != 0)
    }

    /// [`take_pending_if_unmasked`](Self::take_pending_if_unmasked) for every
    /// vector: the messages the caller must deliver now, in vector order.
    /// Call it when the guest clears the function mask or enables MSI-X
    /// (QEMU's `msix_write_config`).
    pub fn take_all_pending_unmasked(&self, function_masked: bool) -> Vec<(u16, MsixMessage)> {
        if function_masked {
            return Vec::new();
        }
        (0..self.vectors)
            .filter(|v| self.take_pending_if_unmasked(*v, false))
            .filter_map(|v| Some((v, self.entry(v)?)))
            .collect()
    }

    /// The signalling decision for an interrupt on vector `v`, given the
    /// MSI-X enable and function mask bits of message control.
    ///
    /// Side effect: when the vector or the function is masked, the pending
    /// bit is set and [`Delivery::Pending`] returned. If the vector was
    /// unmasked concurrently (between the mask check and setting the bit),
    /// the bit is taken back and the message returned, so no interrupt is
    /// lost. Prefer [`signal`](Self::signal), which also re-reads the
    /// function mask.
    pub fn should_deliver(&self, v: u16, msix_enabled: bool, function_masked: bool) -> Delivery {
        let Some(entry) = self.entry(v) else {
            return Delivery::Dropped;
        };
        if !msix_enabled {
            return Delivery::Intx;
        }
        if !entry.masked && !function_masked {
            return Delivery::Now(entry);
        }
        self.set_pending(v, true);
        self.recheck(v, function_masked)
    }

    fn recheck(&self, v: u16, function_masked: bool) -> Delivery {
        if self.take_pending_if_unmasked(v, function_masked) {
            match self.entry(v) {
                Some(e) => Delivery::Now(e),
                None => Delivery::Dropped,
            }
        } else {
            Delivery::Pending
        }
    }

    /// [`should_deliver`](Self::should_deliver) with the enable and function
    /// mask bits read from `config`'s MSI-X capability; after setting a
    /// pending bit the function mask is read again, so a concurrent guest
    /// unmask cannot strand the interrupt.
    pub fn signal(&self, v: u16, config: &ConfigSpace) -> Delivery {
        match self.should_deliver(v, config.msix_enabled(), config.msix_function_masked()) {
            Delivery::Pending => self.recheck(v, config.msix_function_masked()),
            d => d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BarKind, ConfigSpaceBuilder};

    fn write32(t: &MsixTable, off: u64, v: u32) -> Option<u16> {
        t.write_table(off, &v.to_le_bytes())
    }

    fn read32(t: &MsixTable, off: u64) -> u32 {
        let mut d = [0; 4];
        t.read_table(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn program(t: &MsixTable, v: u16, addr: u64, data: u32) {
        let base = u64::from(v) * 16;
        t.write_table(base, &addr.to_le_bytes());
        write32(t, base + 8, data);
    }

    #[test]
    fn reset_state_masked() {
        let t = MsixTable::new(3);
        for v in 0..3 {
            assert_eq!(
                t.entry(v),
                Some(MsixMessage {
                    address: 0,
                    data: 0,
                    masked: true
                })
            );
            assert!(!t.pending(v));
        }
        assert_eq!(t.entry(3), None);
        assert_eq!(read32(&t, 12), 1);
        assert_eq!(t.table_size(), 48);
        assert_eq!(t.pba_size(), 8);
    }

    #[test]
    fn table_access() {
        let t = MsixTable::new(2);
        assert_eq!(t.write_table(16, &0xfee0_1000u64.to_le_bytes()), Some(1));
        assert_eq!(write32(&t, 24, 0x4041), Some(1));
        assert_eq!(write32(&t, 24, 0x4041), None);
        assert_eq!(write32(&t, 28, 0), Some(1));
        assert_eq!(
            t.entry(1),
            Some(MsixMessage {
                address: 0xfee0_1000,
                data: 0x4041,
                masked: false
            })
        );
        let mut d = [0u8; 8];
        t.read_table(16, &mut d);
        assert_eq!(u64::from_le_bytes(d), 0xfee0_1000);
        t.read_table(24, &mut d);
        assert_eq!(u64::from_le_bytes(d), 0x4041);
        // Reserved vector control bits are kept, like QEMU.
        write32(&t, 12, 0xffff_fffe);
        assert_eq!(read32(&t, 12), 0xffff_fffe);
        assert!(!t.masked(0));
    }

    #[test]
    fn bad_accesses() {
        let t = MsixTable::new(2);
        let mut d = [0u8; 2];
        t.read_table(0, &mut d);
        assert_eq!(d, [0xff; 2]);
        let mut d = [0u8; 8];
        t.read_table(4, &mut d);
        assert_eq!(d, [0xff; 8]);
        assert_eq!(read32(&t, 2), u32::MAX);
        assert_eq!(read32(&t, 32), u32::MAX);
        assert_eq!(read32(&t, u64::MAX - 3), u32::MAX);
        assert_eq!(t.write_table(4, &[0; 8]), None);
        assert_eq!(t.write_table(0, &[0; 2]), None);
        assert_eq!(t.write_table(0, &[0; 16]), None);
        assert_eq!(t.write_table(32, &[0; 4]), None);
        assert_eq!(t.write_table(u64::MAX - 3, &[0; 4]), None);
        let mut d = [0u8; 4];
        t.read_pba(8, &mut d);
        assert_eq!(d, [0xff; 4]);
        t.read_pba(1, &mut d);
        assert_eq!(d, [0xff; 4]);
        let empty = MsixTable::new(0);
        assert_eq!(empty.should_deliver(0, true, false), Delivery::Dropped);
        assert_eq!(MsixTable::new(u16::MAX).vectors(), 2048);
    }

    #[test]
    fn pba() {
        let t = MsixTable::new(100);
        t.set_pending(0, true);
        t.set_pending(65, true);
        t.set_pending(100, true); // out of range: ignored
        let mut d = [0u8; 8];
        t.read_pba(0, &mut d);
        assert_eq!(u64::from_le_bytes(d), 1);
        let mut d4 = [0u8; 4];
        t.read_pba(12, &mut d4);
        assert_eq!(u32::from_le_bytes(d4), 0);
        t.read_pba(8, &mut d4);
        assert_eq!(u32::from_le_bytes(d4), 2);
        assert!(t.pending(65) && !t.pending(100));
        t.set_pending(65, false);
        assert!(!t.pending(65));
        t.reset();
        assert!(!t.pending(0));
    }

    #[test]
    fn delivery_and_masking() {
        let t = MsixTable::new(4);
        program(&t, 2, 0xfee0_0000, 0x30);
        // Masked at reset: pending.
        assert_eq!(t.should_deliver(2, true, false), Delivery::Pending);
        assert!(t.pending(2));
        // Disabled: INTx; bad vector: dropped.
        assert_eq!(t.should_deliver(2, false, false), Delivery::Intx);
        assert_eq!(t.should_deliver(4, true, false), Delivery::Dropped);
        assert_eq!(t.should_deliver(0xffff, true, false), Delivery::Dropped);
        // Unmasking with the function masked keeps it pending.
        assert_eq!(write32(&t, 2 * 16 + 12, 0), Some(2));
        assert!(!t.take_pending_if_unmasked(2, true));
        assert_eq!(t.should_deliver(2, true, true), Delivery::Pending);
        // Function unmasked: taken exactly once.
        assert!(t.take_pending_if_unmasked(2, false));
        assert!(!t.pending(2));
        assert!(!t.take_pending_if_unmasked(2, false));
        let msg = MsixMessage {
            address: 0xfee0_0000,
            data: 0x30,
            masked: false,
        };
        assert_eq!(t.should_deliver(2, true, false), Delivery::Now(msg));
        assert!(!t.pending(2));
    }

    #[test]
    fn signal_reads_config() {
        let mut b = ConfigSpaceBuilder::new(0x1af4, 0x1041);
        b.bar(
            1,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0x1000,
        )
        .unwrap();
        let cap = b.msix_capability(2, 1, 0, 1, 0x800).unwrap();
        let cfg = b.build().unwrap();
        let ctrl = usize::from(cap) + 2;
        let t = MsixTable::new(2);
        program(&t, 0, 0xfee0_0000, 0x21);
        write32(&t, 12, 0);
        assert_eq!(t.signal(0, &cfg), Delivery::Intx);
        cfg.write(ctrl, &0xc000u16.to_le_bytes());
        assert_eq!(t.signal(0, &cfg), Delivery::Pending);
        cfg.write(ctrl, &0x8000u16.to_le_bytes());
        assert!(matches!(t.signal(0, &cfg), Delivery::Now(_)));
        // The earlier pending bit is still there for the unmask handler.
        assert!(t.pending(0));
        assert_eq!(t.take_all_pending_unmasked(true), vec![]);
        let msg = t.entry(0).unwrap();
        assert_eq!(
            t.take_all_pending_unmasked(cfg.msix_function_masked()),
            vec![(0, msg)]
        );
        assert!(!t.pending(0));
    }

    #[test]
    fn concurrent_unmask_never_loses_interrupts() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        for _ in 0..200 {
            let t = Arc::new(MsixTable::new(1));
            let delivered = Arc::new(AtomicUsize::new(0));
            let (t2, d2) = (t.clone(), delivered.clone());
            let dev = std::thread::spawn(move || {
                if let Delivery::Now(_) = t2.should_deliver(0, true, false) {
                    d2.fetch_add(1, Ordering::SeqCst);
                }
            });
            write32(&t, 12, 0);
            if t.take_pending_if_unmasked(0, false) {
                delivered.fetch_add(1, Ordering::SeqCst);
            }
            dev.join().unwrap();
            assert_eq!(delivered.load(Ordering::SeqCst), 1);
            assert!(!t.pending(0));
        }
    }
}
