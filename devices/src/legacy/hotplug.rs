//! The guest-visible hardware of ACPI PCI hot-plug: QEMU's PCI hot-plug register block
//! ([`PciHotplug`], port [`PCI_HOTPLUG_PORT`]) and an ACPI Generic Event Device register
//! ([`Ged`], port [`GED_PORT`], interrupt [`GED_GSI`]).
//!
//! How the pieces talk (the DSDT's side is built by the vmm's `acpi` module):
//!
//! - Plug: the monitor makes the new function visible on bus 0, calls
//!   [`PciHotplug::plugged`] and then [`Ged::notify`]`(`[`GED_PCI_HOTPLUG`]`)`. The guest's GED
//!   driver runs `_EVT`, which calls `\_SB.PCI0.PCNT`: PCNT reads PCIU (clearing it) and sends
//!   a device-check notification to each slot set there; the guest rescans those slots.
//! - Unplug: the monitor calls [`PciHotplug::unplug_request`] and [`Ged::notify`]. PCNT reads
//!   PCID and sends an eject request to each slot set there. The guest unbinds its driver and
//!   runs the slot's `_EJ0`, which writes the slot's bit to B0EJ. For each slot whose removal was
//!   requested this clears the slot's PCIU/PCID bits and calls the [`EjectCallback`]; the
//!   monitor then removes the device. A slot stays in PCID until the guest ejects it (or the
//!   machine resets, see [`PciHotplug::reset`]).
//!
//! Both devices keep their state in atomics and take `&self`: vCPU threads dispatch to them
//! lock-free and allocation-free, concurrently with the monitor thread.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// First port of the PCI hot-plug register block (QEMU's `ACPI_PCIHP_ADDR`).
pub const PCI_HOTPLUG_PORT: u64 = 0xae00;
/// Ports decoded by [`PciHotplug`] (QEMU's `ACPI_PCIHP_SIZE`).
pub const PCI_HOTPLUG_PORT_LEN: u64 = 0x14;
/// PCIU: slots where a device was added; cleared when read.
pub const PCIU_OFFSET: u64 = 0x00;
/// PCID: slots whose removal the monitor requested; set until the guest ejects them.
pub const PCID_OFFSET: u64 = 0x04;
/// B0EJ: a write ejects the slots whose bits are set (reads 0).
pub const B0EJ_OFFSET: u64 = 0x08;
/// PCI_RMV: the hot-pluggable slots of the selected bus.
pub const PCI_RMV_OFFSET: u64 = 0x0c;
/// BNUM (QEMU's SEL): the bus the other registers refer to.
pub const BNUM_OFFSET: u64 = 0x10;
/// Slots 1..=31 of bus 0: every slot but the host bridge's.
pub const HOTPLUG_SLOTS: u32 = !1;
/// Buses with hot-plug registers: bus 0 only (the selector value is the index; bridges would
/// get the next ones).
pub const HOTPLUG_BUSES: usize = 1;

/// First port of the GED event register.
pub const GED_PORT: u64 = 0xaf00;
/// Ports decoded by [`Ged`]: one 32-bit register.
pub const GED_PORT_LEN: u64 = 4;
/// The GSI of the GED interrupt: edge-triggered, active high (as QEMU's microvm GED). Outside
/// the INTx pins 16..=23 and the serial port's 4; a hardware-reduced machine has no SCI on it.
pub const GED_GSI: u32 = 9;
/// GED event bit: a PCI hot-plug event (PCIU or PCID has news).
pub const GED_PCI_HOTPLUG: u32 = 1 << 0;

/// Called with the slot number (1..=31) of each slot the guest ejected.
///
/// It runs on the vCPU thread that wrote B0EJ, in the middle of a port exit: it must only post
/// a message (e.g. push to a queue and write an eventfd) and return. It must not take locks the
/// monitor holds while it waits for vCPUs, remove devices, allocate much or block.
pub type EjectCallback = Arc<dyn Fn(u8) + Send + Sync>;

/// A monitor-side request named a slot that cannot be hot-plugged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("slot {0} is not hot-pluggable (slots 1..=31 of bus 0 are)")]
pub struct BadSlot(pub u8);

fn slot_bit(slot: u8) -> Result<u32, BadSlot> {
    match slot {
        1..=31 => Ok(1 << slot),
        _ => Err(BadSlot(slot)),
    }
}

/// The up/down bitmaps of one bus.
#[derive(Default)]
struct BusStatus {
    up: AtomicU32,
    down: AtomicU32,
}

/// QEMU's ACPI PCI hot-plug register block (`hw/acpi/pcihp.c`, non-legacy mode), at
/// [`PCI_HOTPLUG_PORT`]:
///
/// | offset | name    | read                                   | write                     |
/// |--------|---------|----------------------------------------|---------------------------|
/// | 0x00   | PCIU    | slots with a device added; then clears | ignored                   |
/// | 0x04   | PCID    | slots whose removal is requested       | ignored                   |
/// | 0x08   | B0EJ    | 0                                      | eject the slots set       |
/// | 0x0c   | PCI_RMV | hot-pluggable slots ([`HOTPLUG_SLOTS`])| ignored                   |
/// | 0x10   | BNUM    | the bus selector                       | select a bus              |
///
/// Every register is 32 bits wide and only 32-bit accesses at these offsets do anything (QEMU
/// accepts only 4-byte accesses): any other access reads 0 and changes nothing. A selector other
/// than 0 reads zero bitmaps and its ejects are ignored (only bus 0 exists today).
///
/// Eject (a B0EJ write) removes only slots whose removal was requested (PCID set). A write with
/// several bits ejects every requested slot among them, in slot order; QEMU ejects only the
/// lowest set bit per write, which makes no difference to a guest whose `_EJ0` writes one bit
/// (ours and QEMU's both do). Bits of empty slots, of slots nobody asked to remove, and bit 0
/// (the host bridge) are ignored with a debug message. A slot is ejected at most once per
/// request even when vCPUs race: the PCID bit is taken atomically.
pub struct PciHotplug {
    buses: [BusStatus; HOTPLUG_BUSES],
    select: AtomicU32,
    eject: EjectCallback,
}

impl PciHotplug {
    /// A register block in its power-on state; `eject` hears of every slot the guest ejects.
    pub fn new(eject: EjectCallback) -> Self {
        PciHotplug {
            buses: Default::default(),
            select: AtomicU32::new(0),
            eject,
        }
    }

    fn bus0(&self) -> &BusStatus {
        &self.buses[0]
    }

    /// Monitor side: a device was added at `slot` of bus 0 (sets its PCIU bit). Raise the GED
    /// event afterwards.
    pub fn plugged(&self, slot: u8) -> Result<(), BadSlot> {
        let bit = slot_bit(slot)?;
        self.bus0().up.fetch_or(bit, Ordering::AcqRel);
        Ok(())
    }

    /// Monitor side: ask the guest to release `slot` of bus 0 (sets its PCID bit until the guest
    /// ejects the slot). Raise the GED event afterwards.
    pub fn unplug_request(&self, slot: u8) -> Result<(), BadSlot> {
        let bit = slot_bit(slot)?;
        self.bus0().down.fetch_or(bit, Ordering::AcqRel);
        Ok(())
    }

    /// Whether the removal of `slot` on bus 0 was requested and the guest has not ejected it
    /// yet. False for slots that cannot be hot-plugged.
    pub fn removal_pending(&self, slot: u8) -> bool {
        slot_bit(slot).is_ok_and(|bit| self.bus0().down.load(Ordering::Acquire) & bit != 0)
    }

    /// The slots of bus 0 whose removal is pending (bit N = slot N).
    pub fn pending_removals(&self) -> u32 {
        self.bus0().down.load(Ordering::Acquire)
    }

    /// Back to the power-on state, for a machine reset: clears PCIU, PCID and the selector, and
    /// returns the slots of bus 0 whose removal was still pending (bit N = slot N).
    ///
    /// QEMU completes every pending removal on reset (`acpi_pcihp_reset` ejects each PCID slot
    /// without asking the guest: no driver owns the device any more). The monitor should do the
    /// same with the returned slots: remove those devices before the vCPUs run again and report
    /// `DEVICE_DELETED`. The eject callback is not called for them (the monitor already has
    /// the answer in hand). Slots still in PCIU need nothing: the guest finds them when it
    /// enumerates the bus at boot. (QEMU leaves PCIU as it is, which at most costs the guest a
    /// redundant device check.)
    pub fn reset(&self) -> u32 {
        self.select.store(0, Ordering::Release);
        for bus in &self.buses {
            bus.up.store(0, Ordering::Release);
        }
        let pending = self.bus0().down.swap(0, Ordering::AcqRel);
        for bus in &self.buses[1..] {
            bus.down.store(0, Ordering::Release);
        }
        pending
    }

    fn selected(&self) -> Option<&BusStatus> {
        let sel = self.select.load(Ordering::Acquire);
        self.buses.get(usize::try_from(sel).ok()?)
    }

    /// Decodes a 32-bit register read.
    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            PCIU_OFFSET => self
                .selected()
                .map_or(0, |b| b.up.swap(0, Ordering::AcqRel)),
            PCID_OFFSET => self
                .selected()
                .map_or(0, |b| b.down.load(Ordering::Acquire)),
            PCI_RMV_OFFSET => match self.select.load(Ordering::Acquire) {
                0 => HOTPLUG_SLOTS,
                _ => 0,
            },
            BNUM_OFFSET => self.select.load(Ordering::Acquire),
            _ => 0, // B0EJ reads 0 ("no feature defined yet" in QEMU)
        }
    }

    /// Decodes a 32-bit register write.
    fn write_reg(&self, offset: u64, value: u32) {
        match offset {
            B0EJ_OFFSET => self.eject_write(value),
            BNUM_OFFSET => self.select.store(value, Ordering::Release),
            _ => tracing::debug!("pci hotplug: write {value:#x} at read-only offset {offset:#x}"),
        }
    }

    fn eject_write(&self, value: u32) {
        let sel = self.select.load(Ordering::Acquire);
        let Some(bus) = self.selected() else {
            tracing::debug!("pci hotplug: eject {value:#x} on bus selector {sel}: no such bus");
            return;
        };
        let wanted = value & HOTPLUG_SLOTS;
        // Take the requested slots' PCID bits: a racing vCPU cannot eject them a second time.
        let ejected = bus.down.fetch_and(!wanted, Ordering::AcqRel) & wanted;
        let ignored = value & !ejected;
        if ignored != 0 {
            tracing::debug!(
                "pci hotplug: eject {value:#x}: ignoring slots {ignored:#x} (no removal requested)"
            );
        }
        if ejected == 0 {
            return;
        }
        bus.up.fetch_and(!ejected, Ordering::AcqRel);
        let mut rest = ejected;
        while rest != 0 {
            let slot = rest.trailing_zeros() as u8;
            rest &= rest - 1;
            (self.eject)(slot);
        }
    }
}

/// A 32-bit register access: `Some(offset)` for an aligned 4-byte access inside the block.
fn dword_access(offset: u64, len: usize, block_len: u64) -> Option<u64> {
    (len == 4 && offset.is_multiple_of(4) && offset < block_len).then_some(offset)
}

impl BusDevice for PciHotplug {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len();
        match (
            dword_access(offset, len, PCI_HOTPLUG_PORT_LEN),
            <&mut [u8; 4]>::try_from(data),
        ) {
            (Some(off), Ok(d)) => *d = self.read_reg(off).to_le_bytes(),
            _ => tracing::debug!("pci hotplug: ignored {len}-byte read at offset {offset:#x}"),
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        match (
            dword_access(offset, data.len(), PCI_HOTPLUG_PORT_LEN),
            data.try_into(),
        ) {
            (Some(off), Ok(bytes)) => self.write_reg(off, u32::from_le_bytes(bytes)),
            _ => tracing::debug!(
                "pci hotplug: ignored {}-byte write at offset {offset:#x}",
                data.len()
            ),
        }
    }
}

/// An ACPI Generic Event Device's event register (ACPI0013 in the DSDT), at [`GED_PORT`].
///
/// A 32-bit read at offset 0 returns the pending event bits and clears them in one atomic swap
/// (no event is lost between the read and the clear). Every other access reads 0 and changes
/// nothing; writes are ignored. The monitor raises events with [`Ged::notify`], which sets bits
/// and pulses the interrupt: an eventfd the vmm registers as a KVM irqfd on [`GED_GSI`]
/// (edge-triggered: each write is one edge).
///
/// Event bits: [`GED_PCI_HOTPLUG`].
pub struct Ged {
    events: AtomicU32,
    irq: EventFd,
}

impl Ged {
    /// A GED whose interrupt is `irq` (register it as an irqfd for [`GED_GSI`], e.g. on a
    /// `try_clone` of it, or through [`Ged::irq`]).
    pub fn new(irq: EventFd) -> Self {
        Ged {
            events: AtomicU32::new(0),
            irq,
        }
    }

    /// The interrupt eventfd.
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }

    /// Monitor side: sets the event `bits` and interrupts the guest. Bits already pending stay
    /// set; `bits == 0` does nothing. The bits are set before the interrupt, so the guest's
    /// `_EVT` always finds them.
    pub fn notify(&self, bits: u32) -> std::io::Result<()> {
        if bits == 0 {
            return Ok(());
        }
        self.events.fetch_or(bits, Ordering::AcqRel);
        self.irq.write(1)
    }

    /// The events the guest has not read yet (does not clear them).
    pub fn pending(&self) -> u32 {
        self.events.load(Ordering::Acquire)
    }

    /// Power-on state for a machine reset: no pending event. (An edge already sent is gone with
    /// the guest that would have handled it.)
    pub fn reset(&self) {
        self.events.store(0, Ordering::Release);
    }
}

impl BusDevice for Ged {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len();
        match (
            dword_access(offset, len, GED_PORT_LEN),
            <&mut [u8; 4]>::try_from(data),
        ) {
            (Some(0), Ok(d)) => *d = self.events.swap(0, Ordering::AcqRel).to_le_bytes(),
            _ => tracing::debug!("ged: ignored {len}-byte read at offset {offset:#x}"),
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        tracing::debug!(
            "ged: ignored {}-byte write at offset {offset:#x}",
            data.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// A register block whose eject callback records every slot it is called with.
    fn hp() -> (Arc<PciHotplug>, Arc<Mutex<Vec<u8>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let dev = PciHotplug::new(Arc::new(move |slot| l.lock().unwrap().push(slot)));
        (Arc::new(dev), log)
    }

    fn rd(d: &dyn BusDevice, off: u64) -> u32 {
        let mut b = [0xaa; 4];
        d.read(PCI_HOTPLUG_PORT, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(d: &dyn BusDevice, off: u64, v: u32) {
        d.write(PCI_HOTPLUG_PORT, off, &v.to_le_bytes());
    }

    fn ejected(log: &Mutex<Vec<u8>>) -> Vec<u8> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[test]
    fn pciu_reports_plugged_slots_once() {
        let (d, log) = hp();
        assert_eq!(rd(&*d, PCIU_OFFSET), 0);
        d.plugged(5).unwrap();
        d.plugged(31).unwrap();
        assert_eq!(rd(&*d, PCIU_OFFSET), (1 << 5) | (1 << 31));
        assert_eq!(rd(&*d, PCIU_OFFSET), 0, "PCIU clears on read");
        assert_eq!(rd(&*d, PCID_OFFSET), 0);
        assert!(ejected(&log).is_empty());
    }

    #[test]
    fn monitor_side_refuses_slot_0_and_slots_past_31() {
        let (d, _) = hp();
        for slot in [0u8, 32, 255] {
            assert_eq!(d.plugged(slot), Err(BadSlot(slot)));
            assert_eq!(d.unplug_request(slot), Err(BadSlot(slot)));
            assert!(!d.removal_pending(slot));
        }
        assert_eq!(rd(&*d, PCIU_OFFSET), 0);
        assert_eq!(rd(&*d, PCID_OFFSET), 0);
        assert_eq!(
            BadSlot(0).to_string(),
            "slot 0 is not hot-pluggable (slots 1..=31 of bus 0 are)"
        );
    }

    #[test]
    fn pcid_stays_until_the_guest_ejects_and_eject_clears_both_bitmaps() {
        let (d, log) = hp();
        d.plugged(3).unwrap();
        d.unplug_request(3).unwrap();
        assert!(d.removal_pending(3));
        assert!(!d.removal_pending(4));
        for _ in 0..3 {
            assert_eq!(rd(&*d, PCID_OFFSET), 1 << 3, "PCID does not clear on read");
        }
        wr(&*d, B0EJ_OFFSET, 1 << 3);
        assert_eq!(ejected(&log), [3]);
        assert!(!d.removal_pending(3));
        assert_eq!(rd(&*d, PCID_OFFSET), 0);
        assert_eq!(rd(&*d, PCIU_OFFSET), 0, "the ejected slot left PCIU too");
        // A second eject of the same slot finds nothing to do.
        wr(&*d, B0EJ_OFFSET, 1 << 3);
        assert!(ejected(&log).is_empty());
    }

    #[test]
    fn eject_only_removes_requested_slots() {
        let (d, log) = hp();
        d.plugged(7).unwrap(); // plugged, nobody asked to remove it
                               // Empty slots, a plugged slot without request, bit 0, every bit: nothing happens.
        for v in [1 << 9, 1 << 7, 1, 0, u32::MAX, 0x8000_0000] {
            wr(&*d, B0EJ_OFFSET, v);
        }
        assert!(ejected(&log).is_empty());
        assert_eq!(
            rd(&*d, PCIU_OFFSET),
            1 << 7,
            "PCIU untouched by refused ejects"
        );

        d.unplug_request(2).unwrap();
        d.unplug_request(9).unwrap();
        d.unplug_request(30).unwrap();
        // Several bits: every requested slot among them goes, in slot order, once each;
        // unrequested bits (4, 0) are ignored and 30 (not in the write) stays pending.
        wr(&*d, B0EJ_OFFSET, (1 << 9) | (1 << 2) | (1 << 4) | 1);
        assert_eq!(ejected(&log), [2, 9]);
        assert_eq!(d.pending_removals(), 1 << 30);
        wr(&*d, B0EJ_OFFSET, u32::MAX);
        assert_eq!(ejected(&log), [30]);
        assert_eq!(d.pending_removals(), 0);
    }

    #[test]
    fn rmv_lists_slots_1_to_31_and_other_buses_are_empty() {
        let (d, log) = hp();
        assert_eq!(rd(&*d, PCI_RMV_OFFSET), 0xffff_fffe);
        assert_eq!(rd(&*d, BNUM_OFFSET), 0);
        assert_eq!(rd(&*d, B0EJ_OFFSET), 0);
        d.plugged(1).unwrap();
        d.unplug_request(6).unwrap();
        for sel in [1u32, 2, 255, 0x8000_0000, u32::MAX] {
            wr(&*d, BNUM_OFFSET, sel);
            assert_eq!(rd(&*d, BNUM_OFFSET), sel);
            assert_eq!(rd(&*d, PCIU_OFFSET), 0);
            assert_eq!(rd(&*d, PCID_OFFSET), 0);
            assert_eq!(rd(&*d, PCI_RMV_OFFSET), 0);
            wr(&*d, B0EJ_OFFSET, 1 << 6);
            assert!(ejected(&log).is_empty(), "ejects on bus {sel} are ignored");
        }
        wr(&*d, BNUM_OFFSET, 0);
        assert_eq!(rd(&*d, PCID_OFFSET), 1 << 6);
        assert_eq!(
            rd(&*d, PCIU_OFFSET),
            1 << 1,
            "other selectors did not clear bus 0's PCIU"
        );
        wr(&*d, B0EJ_OFFSET, 1 << 6);
        assert_eq!(ejected(&log), [6]);
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let (d, log) = hp();
        d.plugged(4).unwrap();
        d.unplug_request(5).unwrap();
        for off in [PCIU_OFFSET, PCID_OFFSET, PCI_RMV_OFFSET] {
            wr(&*d, off, 0);
            wr(&*d, off, u32::MAX);
        }
        assert_eq!(rd(&*d, PCI_RMV_OFFSET), HOTPLUG_SLOTS);
        assert_eq!(rd(&*d, PCID_OFFSET), 1 << 5);
        assert_eq!(rd(&*d, PCIU_OFFSET), 1 << 4);
        assert!(ejected(&log).is_empty());
    }

    /// Only aligned 4-byte accesses inside the block do anything: every other width and
    /// offset reads 0 (the whole buffer), writes nothing, and never clears PCIU.
    #[test]
    fn odd_widths_and_offsets_read_zero_and_change_nothing() {
        let (d, log) = hp();
        d.plugged(8).unwrap();
        d.unplug_request(8).unwrap();
        wr(&*d, BNUM_OFFSET, 0);
        for len in [0usize, 1, 2, 3, 5, 8, 16] {
            for off in 0..0x20u64 {
                let mut b = vec![0xaau8; len];
                d.read(PCI_HOTPLUG_PORT, off, &mut b);
                assert!(b.iter().all(|&x| x == 0), "{len} bytes at {off:#x}: {b:x?}");
                d.write(PCI_HOTPLUG_PORT, off, &vec![0xff; len]);
            }
        }
        for off in (0x01..0x20u64).filter(|o| !o.is_multiple_of(4) || *o >= PCI_HOTPLUG_PORT_LEN) {
            assert_eq!(rd(&*d, off), 0, "4 bytes at {off:#x}");
            wr(&*d, off, u32::MAX);
        }
        assert!(ejected(&log).is_empty());
        assert_eq!(rd(&*d, BNUM_OFFSET), 0, "the selector was not changed");
        assert_eq!(rd(&*d, PCID_OFFSET), 1 << 8);
        assert_eq!(rd(&*d, PCIU_OFFSET), 1 << 8, "PCIU survived the odd reads");
    }

    #[test]
    fn reset_clears_everything_and_returns_pending_removals() {
        let (d, log) = hp();
        d.plugged(10).unwrap();
        d.unplug_request(11).unwrap();
        d.unplug_request(12).unwrap();
        wr(&*d, BNUM_OFFSET, 3);
        assert_eq!(d.reset(), (1 << 11) | (1 << 12));
        assert!(
            ejected(&log).is_empty(),
            "reset does not call the eject callback"
        );
        assert_eq!(rd(&*d, BNUM_OFFSET), 0);
        assert_eq!(rd(&*d, PCIU_OFFSET), 0);
        assert_eq!(rd(&*d, PCID_OFFSET), 0);
        assert_eq!(rd(&*d, PCI_RMV_OFFSET), HOTPLUG_SLOTS);
        assert!(!d.removal_pending(11));
        assert_eq!(d.reset(), 0);
        // Works as before afterwards.
        d.unplug_request(11).unwrap();
        wr(&*d, B0EJ_OFFSET, 1 << 11);
        assert_eq!(ejected(&log), [11]);
    }

    /// vCPUs flood the block (eject storms, PCIU reads, selector writes) while the monitor
    /// requests removals: each requested slot is ejected exactly once, nothing else ever is.
    #[test]
    fn flooding_vcpus_eject_each_requested_slot_exactly_once() {
        let counts: Arc<Vec<AtomicUsize>> =
            Arc::new((0..32).map(|_| AtomicUsize::new(0)).collect());
        let c = counts.clone();
        let d = Arc::new(PciHotplug::new(Arc::new(move |slot| {
            c[usize::from(slot)].fetch_add(1, Ordering::SeqCst);
        })));
        let rounds = 200;
        let vcpus: Vec<_> = (0..3)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        wr(&*d, B0EJ_OFFSET, i.wrapping_mul(0x9e37_79b9).rotate_left(t));
                        let _ = rd(&*d, PCIU_OFFSET);
                        let _ = rd(&*d, PCID_OFFSET);
                        let mut b = [0u8; 2];
                        d.read(PCI_HOTPLUG_PORT, u64::from(i % 0x20), &mut b);
                        d.write(PCI_HOTPLUG_PORT, u64::from(i % 0x20), &[0xff]);
                    }
                })
            })
            .collect();
        for _ in 0..rounds {
            for slot in 1..32u8 {
                // Request again only once the previous request was served.
                while d.removal_pending(slot) {
                    wr(&*d, B0EJ_OFFSET, 1 << slot);
                }
                d.plugged(slot).unwrap();
                d.unplug_request(slot).unwrap();
            }
        }
        for v in vcpus {
            v.join().unwrap();
        }
        wr(&*d, B0EJ_OFFSET, u32::MAX);
        assert_eq!(counts[0].load(Ordering::SeqCst), 0, "slot 0 never ejected");
        for slot in 1..32 {
            assert_eq!(counts[slot].load(Ordering::SeqCst), rounds, "slot {slot}");
        }
        assert_eq!(d.pending_removals(), 0);
    }

    fn ged() -> (Ged, EventFd) {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = fd.try_clone().unwrap();
        (Ged::new(fd), irq)
    }

    fn ged_rd(g: &Ged) -> u32 {
        let mut b = [0xaa; 4];
        g.read(GED_PORT, 0, &mut b);
        u32::from_le_bytes(b)
    }

    /// The number of interrupts signalled since the last call (0 when none).
    fn edges(irq: &EventFd) -> u64 {
        irq.read().unwrap_or(0)
    }

    #[test]
    fn ged_notify_sets_bits_and_interrupts_and_a_read_takes_them() {
        let (g, irq) = ged();
        assert_eq!(ged_rd(&g), 0);
        assert_eq!(edges(&irq), 0);
        g.notify(GED_PCI_HOTPLUG).unwrap();
        assert_eq!(edges(&irq), 1);
        g.notify(1 << 3).unwrap();
        g.notify(GED_PCI_HOTPLUG).unwrap();
        assert_eq!(edges(&irq), 2, "one interrupt per notify");
        assert_eq!(g.pending(), GED_PCI_HOTPLUG | (1 << 3));
        assert_eq!(ged_rd(&g), GED_PCI_HOTPLUG | (1 << 3));
        assert_eq!(ged_rd(&g), 0, "read clears");
        g.notify(0).unwrap();
        assert_eq!(edges(&irq), 0, "no event, no interrupt");
        g.irq().write(1).unwrap();
        assert_eq!(edges(&irq), 1, "irq() is the interrupt eventfd");
    }

    #[test]
    fn ged_odd_accesses_and_writes_change_nothing() {
        let (g, irq) = ged();
        g.notify(0b101).unwrap();
        for len in [0usize, 1, 2, 3, 5, 8] {
            for off in 0..8u64 {
                let mut b = vec![0xaau8; len];
                g.read(GED_PORT, off, &mut b);
                assert!(b.iter().all(|&x| x == 0), "{len} bytes at {off}");
                g.write(GED_PORT, off, &vec![0xff; len]);
            }
        }
        for off in 1..8u64 {
            let mut b = [0xaa; 4];
            g.read(GED_PORT, off, &mut b);
            assert_eq!(b, [0; 4]);
        }
        g.write(GED_PORT, 0, &0u32.to_le_bytes());
        assert_eq!(ged_rd(&g), 0b101, "nothing cleared the events but the read");
        assert_eq!(edges(&irq), 1, "guest accesses raise no interrupt");
        g.notify(2).unwrap();
        g.reset();
        assert_eq!(ged_rd(&g), 0);
    }

    /// A notifier floods events while vCPUs read: every bit set is read exactly once or still
    /// pending at the end, and each notify is one interrupt.
    #[test]
    fn ged_flooding_loses_no_event() {
        let (g, irq) = ged();
        let g = Arc::new(g);
        let seen = Arc::new(AtomicU32::new(0));
        let n = 30_000u32;
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (g, seen) = (g.clone(), seen.clone());
                std::thread::spawn(move || {
                    for _ in 0..n {
                        let v = ged_rd(&g);
                        seen.fetch_or(v, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let mut sent = 0u32;
        let mut notifies = 0u64;
        for i in 0..n {
            let bit = 1 << (i % 32);
            sent |= bit;
            g.notify(bit).unwrap();
            notifies += 1;
        }
        for r in readers {
            r.join().unwrap();
        }
        seen.fetch_or(ged_rd(&g), Ordering::SeqCst);
        assert_eq!(seen.load(Ordering::SeqCst), sent);
        assert_eq!(edges(&irq), notifies);
    }
}
