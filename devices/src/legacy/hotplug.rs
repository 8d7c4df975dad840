//! The guest-visible hardware of ACPI PCI hot-plug: QEMU's PCI hot-plug register block
//! ([`PciHotplug`], port [`PCI_HOTPLUG_PORT`]) and an ACPI Generic Event Device register
//! ([`Ged`], port [`GED_PORT`], interrupt [`GED_GSI`]).
//!
//! How the pieces talk (the DSDT's side is built by the vmm's `acpi` module):
//!
//! - Plug: the monitor makes the new function visible on its bus, calls
//!   [`PciHotplug::plugged`] and then [`Ged::notify`]`(`[`GED_PCI_HOTPLUG`]`)`. The guest's GED
//!   driver runs `_EVT`, which calls `\_SB.PCI0.PCNT`: PCNT selects each bus with hot-plug in
//!   turn (BNUM), reads its PCIU (clearing it) and sends a device-check notification to each
//!   slot set there; the guest rescans those slots.
//! - Unplug: the monitor calls [`PciHotplug::unplug_request`] and [`Ged::notify`]. PCNT reads
//!   PCID and sends an eject request to each slot set there. The guest unbinds its driver and
//!   runs the slot's `_EJ0`, which selects the slot's bus and writes the slot's bit to B0EJ. For each slot whose removal was
//!   requested this clears the slot's PCIU/PCID bits and calls the [`EjectCallback`]; the
//!   monitor then removes the device. A slot stays in PCID until the guest ejects it (or the
//!   machine resets, see [`PciHotplug::reset`]).
//!
//! Both devices keep their state in atomics and take `&self`: vCPU threads dispatch to them
//! lock-free and allocation-free, concurrently with the monitor thread.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
/// Slots 0..=31 of a bus behind a bridge: every slot.
pub const BRIDGE_HOTPLUG_SLOTS: u32 = u32::MAX;
/// Bus selector values: one per bus number (the selector of a bus is its number: bus 0 is 0,
/// the bus behind a bridge is the bridge's secondary bus number). Only the buses the monitor
/// enabled ([`PciHotplug::enable_bus`]) have registers; bus 0 always has them.
pub const HOTPLUG_BUSES: usize = 256;

/// First port of the GED event register.
pub const GED_PORT: u64 = 0xaf00;
/// Ports decoded by [`Ged`]: one 32-bit register.
pub const GED_PORT_LEN: u64 = 4;
/// The GSI of the GED interrupt: edge-triggered, active high (as QEMU's microvm GED). Outside
/// the INTx pins 16..=23 and the serial port's 4; a hardware-reduced machine has no SCI on it.
pub const GED_GSI: u32 = 9;
/// GED event bit: a PCI hot-plug event (PCIU or PCID has news).
pub const GED_PCI_HOTPLUG: u32 = 1 << 0;

/// Called with the bus number and the slot number of each slot the guest ejected (slot
/// 1..=31 on bus 0, 0..=31 on a bridge's bus).
///
/// It runs on the vCPU thread that wrote B0EJ, in the middle of a port exit: it must only post
/// a message (e.g. set a bit and write an eventfd) and return. It must not take locks the
/// monitor holds while it waits for vCPUs, remove devices, allocate much or block.
pub type EjectCallback = Arc<dyn Fn(u8, u8) + Send + Sync>;

/// A monitor-side request named a slot that cannot be hot-plugged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("slot {slot} of bus {bus} is not hot-pluggable (slots 1..=31 of bus 0 and 0..=31 of the bridges' buses with hot-plug are)")]
pub struct BadSlot {
    /// The bus number.
    pub bus: u8,
    /// The slot.
    pub slot: u8,
}

/// The hot-pluggable slots of bus `bus` (a bitmap, bit N = slot N).
fn bus_slots(bus: u8) -> u32 {
    if bus == 0 {
        HOTPLUG_SLOTS
    } else {
        BRIDGE_HOTPLUG_SLOTS
    }
}

/// The slot numbers set in `bitmap` (bit N = slot N), in ascending order.
pub fn slots_in(bitmap: u32) -> impl Iterator<Item = u8> {
    (0..32u8).filter(move |&slot| bitmap & (1 << slot) != 0)
}

/// The up/down bitmaps of one bus.
#[derive(Default)]
struct BusStatus {
    up: AtomicU32,
    down: AtomicU32,
}

/// QEMU's ACPI PCI hot-plug register block (`hw/acpi/pcihp.c`, non-legacy mode, with
/// `acpi-pci-hotplug-with-bridge-support`), at [`PCI_HOTPLUG_PORT`]:
///
/// | offset | name    | read                                   | write                     |
/// |--------|---------|----------------------------------------|---------------------------|
/// | 0x00   | PCIU    | slots with a device added; then clears | ignored                   |
/// | 0x04   | PCID    | slots whose removal is requested       | ignored                   |
/// | 0x08   | B0EJ    | 0                                      | eject the slots set       |
/// | 0x0c   | PCI_RMV | hot-pluggable slots of the bus         | ignored                   |
/// | 0x10   | BNUM    | the bus selector                       | select a bus              |
///
/// PCIU, PCID, B0EJ and PCI_RMV refer to the bus BNUM selects. A bus's selector is its bus
/// number; bus 0 always has registers, a bridge's bus only once the monitor enabled it
/// ([`PciHotplug::enable_bus`]). PCI_RMV reads [`HOTPLUG_SLOTS`] on bus 0 and
/// [`BRIDGE_HOTPLUG_SLOTS`] on an enabled bridge's bus. Any other selector (a bus that does not
/// exist or has no hot-plug, a value above 255: the guest may write anything) reads zero
/// bitmaps and its ejects are ignored, as QEMU does for a selector it does not know.
///
/// Every register is 32 bits wide and only 32-bit accesses at these offsets do anything (QEMU
/// accepts only 4-byte accesses): any other access reads 0 and changes nothing.
///
/// Eject (a B0EJ write) removes only slots whose removal was requested (PCID set). A write with
/// several bits ejects every requested slot among them, in slot order; QEMU ejects only the
/// lowest set bit per write, which makes no difference to a guest whose `_EJ0` writes one bit
/// (ours and QEMU's both do). Bits of empty slots, of slots nobody asked to remove, and bit 0
/// of bus 0 (the host bridge) are ignored with a debug message. A slot is ejected at most once
/// per request even when vCPUs race: the PCID bit is taken atomically.
pub struct PciHotplug {
    buses: Box<[BusStatus]>,
    /// Which buses have registers (bit N of word N / 64 = bus N); bus 0 always.
    enabled: [AtomicU64; HOTPLUG_BUSES / 64],
    select: AtomicU32,
    eject: EjectCallback,
}

impl PciHotplug {
    /// A register block in its power-on state with bus 0 only; `eject` hears of every slot the
    /// guest ejects.
    pub fn new(eject: EjectCallback) -> Self {
        PciHotplug {
            buses: (0..HOTPLUG_BUSES).map(|_| BusStatus::default()).collect(),
            enabled: std::array::from_fn(|word| AtomicU64::new(u64::from(word == 0))),
            select: AtomicU32::new(0),
            eject,
        }
    }

    /// Monitor side: gives bus `bus` (a bridge's secondary bus) hot-plug registers, selector
    /// value `bus`. Done when the machine's bridges are set up, before the guest runs.
    pub fn enable_bus(&self, bus: u8) {
        self.enabled[usize::from(bus / 64)].fetch_or(1 << (bus % 64), Ordering::AcqRel);
    }

    /// Whether bus `bus` has hot-plug registers.
    pub fn bus_enabled(&self, bus: u8) -> bool {
        self.enabled[usize::from(bus / 64)].load(Ordering::Acquire) & (1 << (bus % 64)) != 0
    }

    /// The status of bus `bus` and the bit of `slot` there, if that slot can be hot-plugged.
    fn slot(&self, bus: u8, slot: u8) -> Result<(&BusStatus, u32), BadSlot> {
        let bit = 1u32.checked_shl(u32::from(slot)).unwrap_or(0) & bus_slots(bus);
        if bit == 0 || !self.bus_enabled(bus) {
            return Err(BadSlot { bus, slot });
        }
        Ok((&self.buses[usize::from(bus)], bit))
    }

    /// Monitor side: a device was added at `slot` of bus `bus`. Raise the GED event afterwards.
    pub fn plugged(&self, bus: u8, slot: u8) -> Result<(), BadSlot> {
        let (status, bit) = self.slot(bus, slot)?;
        status.up.fetch_or(bit, Ordering::AcqRel);
        Ok(())
    }

    /// Monitor side: ask the guest to release `slot` of bus `bus`. Raise the GED event
    /// afterwards.
    pub fn unplug_request(&self, bus: u8, slot: u8) -> Result<(), BadSlot> {
        let (status, bit) = self.slot(bus, slot)?;
        status.down.fetch_or(bit, Ordering::AcqRel);
        Ok(())
    }

    /// Whether the removal of `slot` on bus `bus` is pending. False for slots that cannot be
    /// hot-plugged.
    pub fn removal_pending(&self, bus: u8, slot: u8) -> bool {
        self.slot(bus, slot)
            .is_ok_and(|(s, bit)| s.down.load(Ordering::Acquire) & bit != 0)
    }

    /// The slots of bus `bus` whose removal is pending (bit N = slot N).
    pub fn pending_removals(&self, bus: u8) -> u32 {
        self.buses[usize::from(bus)].down.load(Ordering::Acquire)
    }

    /// Back to the power-on state, for a machine reset: clears PCIU, PCID and the selector of
    /// every bus, and returns the slots whose removal was still pending, as (bus, bitmap of
    /// slots) for each bus with some. The buses enabled stay enabled (the bridges stay).
    ///
    /// QEMU completes every pending removal on reset (`acpi_pcihp_reset` ejects each PCID slot
    /// without asking the guest: no driver owns the device any more). The monitor should do the
    /// same with the returned slots: remove those devices before the vCPUs run again and report
    /// `DEVICE_DELETED`. The eject callback is not called for them (the monitor already has
    /// the answer in hand). Slots still in PCIU need nothing: the guest finds them when it
    /// enumerates the bus at boot. (QEMU leaves PCIU as it is, which at most costs the guest a
    /// redundant device check.)
    pub fn reset(&self) -> Vec<(u8, u32)> {
        self.select.store(0, Ordering::Release);
        let mut pending = Vec::new();
        for (n, bus) in self.buses.iter().enumerate() {
            bus.up.store(0, Ordering::Release);
            let down = bus.down.swap(0, Ordering::AcqRel);
            if down != 0 {
                pending.push((n as u8, down));
            }
        }
        pending
    }

    /// The selected bus's number and status, if it has registers.
    fn selected(&self) -> Option<(u8, &BusStatus)> {
        let sel = u8::try_from(self.select.load(Ordering::Acquire)).ok()?;
        self.bus_enabled(sel)
            .then(|| (sel, &self.buses[usize::from(sel)]))
    }

    /// Decodes a 32-bit register read.
    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            PCIU_OFFSET => self
                .selected()
                .map_or(0, |(_, b)| b.up.swap(0, Ordering::AcqRel)),
            PCID_OFFSET => self
                .selected()
                .map_or(0, |(_, b)| b.down.load(Ordering::Acquire)),
            PCI_RMV_OFFSET => self.selected().map_or(0, |(n, _)| bus_slots(n)),
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
        let Some((n, bus)) = self.selected() else {
            let sel = self.select.load(Ordering::Acquire);
            tracing::debug!("pci hotplug: eject {value:#x} on bus selector {sel}: no such bus");
            return;
        };
        let wanted = value & bus_slots(n);
        // Take the requested slots' PCID bits: a racing vCPU cannot eject them a second time.
        let ejected = bus.down.fetch_and(!wanted, Ordering::AcqRel) & wanted;
        let ignored = value & !ejected;
        if ignored != 0 {
            tracing::debug!(
                "pci hotplug: eject {value:#x} on bus {n}: ignoring slots {ignored:#x} (no removal requested)"
            );
        }
        if ejected == 0 {
            return;
        }
        bus.up.fetch_and(!ejected, Ordering::AcqRel);
        for slot in slots_in(ejected) {
            (self.eject)(n, slot);
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
        let dev = PciHotplug::new(Arc::new(move |bus, slot| {
            assert_eq!(bus, 0, "bus 0 only in these tests");
            l.lock().unwrap().push(slot)
        }));
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
        d.plugged(0, 5).unwrap();
        d.plugged(0, 31).unwrap();
        assert_eq!(rd(&*d, PCIU_OFFSET), (1 << 5) | (1 << 31));
        assert_eq!(rd(&*d, PCIU_OFFSET), 0, "PCIU clears on read");
        assert_eq!(rd(&*d, PCID_OFFSET), 0);
        assert!(ejected(&log).is_empty());
    }

    #[test]
    fn monitor_side_refuses_slot_0_and_slots_past_31() {
        let (d, _) = hp();
        for slot in [0u8, 32, 255] {
            assert_eq!(d.plugged(0, slot), Err(BadSlot { bus: 0, slot }));
            assert_eq!(d.unplug_request(0, slot), Err(BadSlot { bus: 0, slot }));
            assert!(!d.removal_pending(0, slot));
        }
        assert_eq!(rd(&*d, PCIU_OFFSET), 0);
        assert_eq!(rd(&*d, PCID_OFFSET), 0);
        assert_eq!(
            BadSlot { bus: 0, slot: 0 }.to_string(),
            "slot 0 of bus 0 is not hot-pluggable (slots 1..=31 of bus 0 and 0..=31 of the bridges' buses with hot-plug are)"
        );
    }

    #[test]
    fn pcid_stays_until_the_guest_ejects_and_eject_clears_both_bitmaps() {
        let (d, log) = hp();
        d.plugged(0, 3).unwrap();
        d.unplug_request(0, 3).unwrap();
        assert!(d.removal_pending(0, 3));
        assert!(!d.removal_pending(0, 4));
        for _ in 0..3 {
            assert_eq!(rd(&*d, PCID_OFFSET), 1 << 3, "PCID does not clear on read");
        }
        wr(&*d, B0EJ_OFFSET, 1 << 3);
        assert_eq!(ejected(&log), [3]);
        assert!(!d.removal_pending(0, 3));
        assert_eq!(rd(&*d, PCID_OFFSET), 0);
        assert_eq!(rd(&*d, PCIU_OFFSET), 0, "the ejected slot left PCIU too");
        // A second eject of the same slot finds nothing to do.
        wr(&*d, B0EJ_OFFSET, 1 << 3);
        assert!(ejected(&log).is_empty());
    }

    #[test]
    fn eject_only_removes_requested_slots() {
        let (d, log) = hp();
        d.plugged(0, 7).unwrap(); // plugged, nobody asked to remove it

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

        d.unplug_request(0, 2).unwrap();
        d.unplug_request(0, 9).unwrap();
        d.unplug_request(0, 30).unwrap();
        // Several bits: every requested slot among them goes, in slot order, once each;
        // unrequested bits (4, 0) are ignored and 30 (not in the write) stays pending.
        wr(&*d, B0EJ_OFFSET, (1 << 9) | (1 << 2) | (1 << 4) | 1);
        assert_eq!(ejected(&log), [2, 9]);
        assert_eq!(d.pending_removals(0), 1 << 30);
        wr(&*d, B0EJ_OFFSET, u32::MAX);
        assert_eq!(ejected(&log), [30]);
        assert_eq!(d.pending_removals(0), 0);
    }

    #[test]
    fn rmv_lists_slots_1_to_31_and_other_buses_are_empty() {
        let (d, log) = hp();
        assert_eq!(rd(&*d, PCI_RMV_OFFSET), 0xffff_fffe);
        assert_eq!(rd(&*d, BNUM_OFFSET), 0);
        assert_eq!(rd(&*d, B0EJ_OFFSET), 0);
        d.plugged(0, 1).unwrap();
        d.unplug_request(0, 6).unwrap();
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
        d.plugged(0, 4).unwrap();
        d.unplug_request(0, 5).unwrap();
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
        d.plugged(0, 8).unwrap();
        d.unplug_request(0, 8).unwrap();
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
        d.plugged(0, 10).unwrap();
        d.unplug_request(0, 11).unwrap();
        d.unplug_request(0, 12).unwrap();
        wr(&*d, BNUM_OFFSET, 3);
        assert_eq!(d.reset(), [(0, (1 << 11) | (1 << 12))]);
        assert!(
            ejected(&log).is_empty(),
            "reset does not call the eject callback"
        );
        assert_eq!(rd(&*d, BNUM_OFFSET), 0);
        assert_eq!(rd(&*d, PCIU_OFFSET), 0);
        assert_eq!(rd(&*d, PCID_OFFSET), 0);
        assert_eq!(rd(&*d, PCI_RMV_OFFSET), HOTPLUG_SLOTS);
        assert!(!d.removal_pending(0, 11));
        assert_eq!(d.reset(), []);
        // Works as before afterwards.
        d.unplug_request(0, 11).unwrap();
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
        let d = Arc::new(PciHotplug::new(Arc::new(move |_, slot| {
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
                while d.removal_pending(0, slot) {
                    wr(&*d, B0EJ_OFFSET, 1 << slot);
                }
                d.plugged(0, slot).unwrap();
                d.unplug_request(0, slot).unwrap();
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
        assert_eq!(d.pending_removals(0), 0);
    }

    /// Every (bus, slot) an eject callback was called with.
    type EjectLog = Arc<Mutex<Vec<(u8, u8)>>>;

    /// A register block whose eject callback records every (bus, slot).
    fn hp_buses() -> (Arc<PciHotplug>, EjectLog) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let dev = PciHotplug::new(Arc::new(move |bus, slot| {
            l.lock().unwrap().push((bus, slot))
        }));
        (Arc::new(dev), log)
    }

    fn ejected_on(log: &Mutex<Vec<(u8, u8)>>) -> Vec<(u8, u8)> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    /// Buses behind bridges: selected by their bus number once enabled, every slot (0 too)
    /// hot-pluggable, each bus's bitmaps its own; ejects report the bus.
    #[test]
    fn bridge_buses_have_registers_of_their_own() {
        let (d, log) = hp_buses();
        assert!(d.bus_enabled(0));
        assert!(!d.bus_enabled(1));
        assert_eq!(d.plugged(1, 3), Err(BadSlot { bus: 1, slot: 3 }));
        assert_eq!(d.unplug_request(2, 0), Err(BadSlot { bus: 2, slot: 0 }));
        d.enable_bus(1);
        d.enable_bus(64);
        d.enable_bus(255);
        assert!(d.bus_enabled(1) && d.bus_enabled(64) && d.bus_enabled(255));
        assert!(!d.bus_enabled(2) && !d.bus_enabled(63) && !d.bus_enabled(65));
        d.plugged(1, 0).unwrap();
        d.plugged(1, 3).unwrap();
        d.plugged(64, 31).unwrap();
        d.unplug_request(255, 0).unwrap();
        d.unplug_request(1, 5).unwrap();
        assert_eq!(d.plugged(1, 32), Err(BadSlot { bus: 1, slot: 32 }));
        assert_eq!(d.plugged(0, 0), Err(BadSlot { bus: 0, slot: 0 }));
        assert!(d.removal_pending(1, 5) && !d.removal_pending(1, 3));
        assert!(!d.removal_pending(0, 5), "bus 0 is another bus");
        // Bus 0 sees nothing of it.
        assert_eq!(rd(&*d, PCIU_OFFSET), 0);
        assert_eq!(rd(&*d, PCID_OFFSET), 0);
        wr(&*d, BNUM_OFFSET, 1);
        assert_eq!(rd(&*d, BNUM_OFFSET), 1);
        assert_eq!(
            rd(&*d, PCI_RMV_OFFSET),
            u32::MAX,
            "slot 0 too behind a bridge"
        );
        assert_eq!(rd(&*d, PCIU_OFFSET), 0b1001);
        assert_eq!(rd(&*d, PCIU_OFFSET), 0, "clears on read");
        assert_eq!(rd(&*d, PCID_OFFSET), 1 << 5);
        wr(&*d, B0EJ_OFFSET, (1 << 5) | (1 << 3) | 1);
        assert_eq!(ejected_on(&log), [(1, 5)], "only the requested slot");
        assert_eq!(d.pending_removals(1), 0);
        wr(&*d, BNUM_OFFSET, 64);
        assert_eq!(rd(&*d, PCIU_OFFSET), 1 << 31);
        wr(&*d, BNUM_OFFSET, 255);
        assert_eq!(rd(&*d, PCID_OFFSET), 1);
        wr(&*d, B0EJ_OFFSET, 1);
        assert_eq!(ejected_on(&log), [(255, 0)], "slot 0 of a bridge's bus");
        // Reset: pending removals of every bus come back; the buses stay enabled.
        d.unplug_request(64, 7).unwrap();
        d.unplug_request(0, 9).unwrap();
        assert_eq!(d.reset(), [(0, 1 << 9), (64, 1 << 7)]);
        assert_eq!(rd(&*d, BNUM_OFFSET), 0);
        assert!(d.bus_enabled(64));
        assert!(ejected_on(&log).is_empty());
    }

    /// A hostile guest writes every kind of selector: buses that do not exist, buses without
    /// hot-plug, values far above 255. They read zero bitmaps, eject nothing, never panic, and
    /// leave the real buses' state alone.
    #[test]
    fn hostile_selectors_read_zero_and_eject_nothing() {
        let (d, log) = hp_buses();
        d.enable_bus(1);
        d.enable_bus(3);
        d.unplug_request(1, 2).unwrap();
        d.unplug_request(3, 0).unwrap();
        d.plugged(3, 4).unwrap();
        d.unplug_request(0, 6).unwrap();
        let selectors = [
            2u32,
            4,
            63,
            64,
            200,
            254,
            255,
            256,
            257,
            0x101, // 1 + 256: must not alias bus 1
            0x103,
            0x1_0000,
            0x8000_0000,
            u32::MAX,
        ];
        for sel in selectors {
            wr(&*d, BNUM_OFFSET, sel);
            assert_eq!(rd(&*d, BNUM_OFFSET), sel, "the selector reads back");
            for off in [PCIU_OFFSET, PCID_OFFSET, PCI_RMV_OFFSET, B0EJ_OFFSET] {
                assert_eq!(rd(&*d, off), 0, "selector {sel:#x} offset {off:#x}");
            }
            for v in [0, 1, 1 << 2, 1 << 6, u32::MAX] {
                wr(&*d, B0EJ_OFFSET, v);
            }
            assert!(ejected_on(&log).is_empty(), "selector {sel:#x}");
        }
        assert_eq!(d.pending_removals(1), 1 << 2);
        assert_eq!(d.pending_removals(3), 1);
        assert_eq!(d.pending_removals(0), 1 << 6);
        wr(&*d, BNUM_OFFSET, 3);
        assert_eq!(rd(&*d, PCIU_OFFSET), 1 << 4, "PCIU of bus 3 untouched");
        // The monitor side refuses what the guest cannot reach either.
        for bus in [2u8, 4, 255] {
            assert!(d.plugged(bus, 1).is_err());
            assert!(d.unplug_request(bus, 1).is_err());
            assert!(!d.removal_pending(bus, 1));
        }
    }

    /// vCPUs switch the selector between real and bogus buses and eject at random while the
    /// monitor requests removals on two bridge buses and bus 0: every request is served
    /// exactly once, on the right bus, and nothing else is ever ejected.
    #[test]
    fn flooding_vcpus_across_buses_eject_each_request_once() {
        let counts: Arc<Vec<AtomicUsize>> =
            Arc::new((0..3 * 32).map(|_| AtomicUsize::new(0)).collect());
        let c = counts.clone();
        let d = Arc::new(PciHotplug::new(Arc::new(move |bus, slot| {
            let i = match bus {
                0 => 0,
                1 => 1,
                7 => 2,
                _ => panic!("eject on bus {bus}"),
            };
            c[i * 32 + usize::from(slot)].fetch_add(1, Ordering::SeqCst);
        })));
        d.enable_bus(1);
        d.enable_bus(7);
        let vcpus: Vec<_> = (0..3)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        let sel = [0, 1, 7, 2, 256 + 1, u32::MAX][(i as usize + t) % 6];
                        wr(&*d, BNUM_OFFSET, sel);
                        let _ = rd(&*d, PCID_OFFSET);
                        wr(
                            &*d,
                            B0EJ_OFFSET,
                            i.wrapping_mul(0x9e37_79b9).rotate_left(t as u32),
                        );
                        let _ = rd(&*d, PCIU_OFFSET);
                    }
                })
            })
            .collect();
        let rounds = 50;
        for _ in 0..rounds {
            for (bus, slots) in [(0u8, 1..32u8), (1, 0..32), (7, 0..32)] {
                for slot in slots {
                    while d.removal_pending(bus, slot) {
                        std::thread::yield_now();
                        if vcpus.iter().all(|v| v.is_finished()) {
                            wr(&*d, BNUM_OFFSET, u32::from(bus));
                            wr(&*d, B0EJ_OFFSET, 1 << slot);
                        }
                    }
                    d.unplug_request(bus, slot).unwrap();
                }
            }
        }
        for v in vcpus {
            v.join().unwrap();
        }
        for bus in [0u32, 1, 7] {
            wr(&*d, BNUM_OFFSET, bus);
            wr(&*d, B0EJ_OFFSET, u32::MAX);
        }
        assert_eq!(
            counts[0].load(Ordering::SeqCst),
            0,
            "slot 0 of bus 0 never ejected"
        );
        for i in 1..3 * 32 {
            assert_eq!(
                counts[i].load(Ordering::SeqCst),
                rounds,
                "bus index {} slot {}",
                i / 32,
                i % 32
            );
        }
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
