//! Slot/function allocation on bus 0 with explicit per-function states.
//!
//! Every one of the 32 x 8 functions is in exactly one [`SlotState`]:
//! `Free`, `Reserved` (held for the host bridge or for a device placed
//! later) or `Allocated` to an [`Owner`]. Claims follow QEMU's order of
//! checks and its error wording: availability first, then the multifunction
//! rules against the functions already claimed in the slot. Because claims
//! are checked incrementally (like QEMU realizing devices one by one),
//! [`SlotAllocator::validate`] runs once after all claims to catch what only
//! the final layout shows (a function > 0 whose slot never got function 0).

use std::fmt;

use thiserror::Error;

use crate::address::{AddressError, PciAddress, MAX_DEVICE, MAX_FUNCTION};

/// Who holds the host bridge's reservation of 00.0.
pub const HOST_BRIDGE_OWNER: &str = "the host bridge";

const FUNCTIONS: usize = MAX_FUNCTION as usize + 1;
const SLOTS: usize = MAX_DEVICE as usize + 1;

/// The device claiming a function: QEMU's driver name, `id=` and
/// `multifunction=` properties.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Driver name, e.g. `virtio-blk-pci`.
    pub driver: String,
    /// The `id=` property, if any.
    pub id: Option<String>,
    /// The `multifunction=` property.
    pub multifunction: bool,
}

impl Owner {
    /// An owner without id, single function.
    pub fn new(driver: impl Into<String>) -> Self {
        Self {
            driver: driver.into(),
            id: None,
            multifunction: false,
        }
    }
}

impl fmt::Display for Owner {
    /// `driver,id=ID`, or just `driver` without an id.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.driver)?;
        if let Some(id) = &self.id {
            write!(f, ",id={id}")?;
        }
        Ok(())
    }
}

/// State of one function of one slot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SlotState {
    /// Available.
    #[default]
    Free,
    /// Held for someone (`by` is shown in errors, e.g. "the host bridge").
    Reserved {
        /// Holder of the reservation.
        by: String,
    },
    /// Claimed by a device.
    Allocated {
        /// The device.
        owner: Owner,
    },
}

/// Slot allocation errors; `Display` is QEMU's wording where QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SlotError {
    /// The function is allocated to another device.
    #[error(
        "PCI: slot {slot} function {function} not available for {requester}, in use by {holder}"
    )]
    InUse {
        /// Slot (printed in decimal, as QEMU).
        slot: u8,
        /// Function.
        function: u8,
        /// Driver name of the requester.
        requester: String,
        /// Current holder (`driver,id=ID`).
        holder: String,
    },
    /// The function is reserved.
    #[error(
        "PCI: slot {slot} function {function} not available for {requester}, reserved for {by}"
    )]
    Reserved {
        /// Slot.
        slot: u8,
        /// Function.
        function: u8,
        /// Driver name of the requester.
        requester: String,
        /// Holder of the reservation.
        by: String,
    },
    /// Automatic placement found no entirely free slot.
    #[error("PCI: no slot/function available for {0}, all in use or reserved")]
    NoSlot(String),
    /// Function > 0 in a slot whose function 0 is single function.
    #[error("PCI: single function device can't be populated in function {slot:x}.{function:x}")]
    SingleFunction {
        /// Slot.
        slot: u8,
        /// Function.
        function: u8,
    },
    /// Single-function function 0 in a slot with functions > 0.
    #[error("PCI: {slot:x}.0 indicates single function, but {slot:x}.{function:x} is already populated.")]
    AlreadyPopulated {
        /// Slot.
        slot: u8,
        /// The populated function > 0.
        function: u8,
    },
    /// A function > 0 without function 0 (found by `validate`).
    #[error(
        "PCI: function 0 missing for {slot:x}.{function:x}: a multifunction slot needs function 0"
    )]
    Function0Missing {
        /// Slot.
        slot: u8,
        /// The populated function > 0.
        function: u8,
    },
    /// Slot or function out of range.
    #[error(transparent)]
    Address(#[from] AddressError),
}

/// The allocator of one bus's 32 slots x 8 functions (bus 0, or the bus behind a bridge).
/// Addresses it returns are on bus 0; the caller puts them on their bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAllocator {
    /// Indexed by devfn; always 256 entries.
    states: Vec<SlotState>,
    /// Where automatic placement starts: 1 on bus 0 (00.0 is the host bridge's), 0 behind a
    /// bridge (as QEMU's secondary buses, whose lowest devfn is 0).
    first_auto_slot: u8,
}

impl Default for SlotAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl SlotAllocator {
    /// All free except 00.0, reserved for the host bridge.
    pub fn new() -> Self {
        let mut states = vec![SlotState::Free; SLOTS * FUNCTIONS];
        states[0] = SlotState::Reserved {
            by: HOST_BRIDGE_OWNER.to_string(),
        };
        Self {
            states,
            first_auto_slot: 1,
        }
    }

    /// The allocator of a bus behind a bridge: all 32 slots free, automatic placement from
    /// slot 0.
    pub fn secondary() -> Self {
        Self {
            states: vec![SlotState::Free; SLOTS * FUNCTIONS],
            first_auto_slot: 0,
        }
    }

    fn at(&self, slot: u8, function: u8) -> &SlotState {
        self.states
            .get(usize::from(slot) * FUNCTIONS + usize::from(function))
            .unwrap_or(&SlotState::Free)
    }

    fn set(&mut self, addr: PciAddress, state: SlotState) -> SlotState {
        match self.states.get_mut(usize::from(addr.devfn())) {
            Some(s) => std::mem::replace(s, state),
            None => SlotState::Free,
        }
    }

    /// The state of `addr` (bus is ignored: only bus 0 exists).
    pub fn state(&self, addr: PciAddress) -> &SlotState {
        self.at(addr.device(), addr.function())
    }

    /// The allocated functions in address order.
    pub fn allocations(&self) -> Vec<(PciAddress, &Owner)> {
        self.states
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                SlotState::Allocated { owner } => Some((PciAddress::from_devfn(0, i as u8), owner)),
                _ => None,
            })
            .collect()
    }

    fn check_available(
        &self,
        addr: PciAddress,
        requester: &str,
        owner: Option<&Owner>,
    ) -> Result<(), SlotError> {
        let (slot, function) = (addr.device(), addr.function());
        match self.state(addr) {
            SlotState::Free => Ok(()),
            // A reservation made for this very device may be claimed by it.
            SlotState::Reserved { by } if owner.is_some_and(|o| o.to_string() == *by) => Ok(()),
            SlotState::Reserved { by } => Err(SlotError::Reserved {
                slot,
                function,
                requester: requester.to_string(),
                by: by.clone(),
            }),
            SlotState::Allocated { owner } => Err(SlotError::InUse {
                slot,
                function,
                requester: requester.to_string(),
                holder: owner.to_string(),
            }),
        }
    }

    fn allocated(&self, slot: u8, function: u8) -> Option<&Owner> {
        match self.at(slot, function) {
            SlotState::Allocated { owner } => Some(owner),
            _ => None,
        }
    }

    /// Claims `slot.function` for `owner`, checking availability and then
    /// QEMU's multifunction rules against the functions already claimed.
    /// A function reserved with `by` equal to the owner's `driver,id=ID` text
    /// may be claimed by that owner.
    pub fn claim(
        &mut self,
        slot: u8,
        function: u8,
        owner: &Owner,
    ) -> Result<PciAddress, SlotError> {
        let addr = PciAddress::new(0, slot, function)?;
        self.check_available(addr, &owner.driver, Some(owner))?;
        if function > 0 {
            if self.allocated(slot, 0).is_some_and(|f0| !f0.multifunction) {
                return Err(SlotError::SingleFunction { slot, function });
            }
        } else if !owner.multifunction {
            if let Some(f) = (1..=MAX_FUNCTION).find(|f| self.allocated(slot, *f).is_some()) {
                return Err(SlotError::AlreadyPopulated { slot, function: f });
            }
        }
        self.set(
            addr,
            SlotState::Allocated {
                owner: owner.clone(),
            },
        );
        Ok(addr)
    }

    /// Claims function 0 of the first entirely free slot, from slot 1 up on bus 0 (from 0
    /// behind a bridge).
    pub fn auto(&mut self, owner: &Owner) -> Result<PciAddress, SlotError> {
        let slot = (self.first_auto_slot..=MAX_DEVICE)
            .find(|s| (0..=MAX_FUNCTION).all(|f| *self.at(*s, f) == SlotState::Free))
            .ok_or_else(|| SlotError::NoSlot(owner.driver.clone()))?;
        self.claim(slot, 0, owner)
    }

    /// Reserves a free `slot.function` for `by` (e.g. `virtio-net-pci,id=n0`,
    /// an address hinted for a device placed later).
    pub fn reserve(&mut self, slot: u8, function: u8, by: &str) -> Result<PciAddress, SlotError> {
        let addr = PciAddress::new(0, slot, function)?;
        self.check_available(addr, by, None)?;
        self.set(addr, SlotState::Reserved { by: by.to_string() });
        Ok(addr)
    }

    /// Frees `addr` and returns its previous state.
    pub fn release(&mut self, addr: PciAddress) -> SlotState {
        self.set(addr, SlotState::Free)
    }

    /// Checks the multifunction rules on the final layout: every function
    /// > 0 needs an allocated function 0 with `multifunction` on.
    pub fn validate(&self) -> Result<(), SlotError> {
        for slot in 0..=MAX_DEVICE {
            for function in 1..=MAX_FUNCTION {
                if self.allocated(slot, function).is_none() {
                    continue;
                }
                match self.allocated(slot, 0) {
                    None => return Err(SlotError::Function0Missing { slot, function }),
                    Some(f0) if !f0.multifunction => {
                        return Err(SlotError::SingleFunction { slot, function })
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(driver: &str, id: Option<&str>, mf: bool) -> Owner {
        Owner {
            driver: driver.into(),
            id: id.map(Into::into),
            multifunction: mf,
        }
    }

    fn a(d: u8, f: u8) -> PciAddress {
        PciAddress::new(0, d, f).unwrap()
    }

    #[test]
    fn explicit_and_conflicts() {
        let mut s = SlotAllocator::new();
        let blk = owner("virtio-blk-pci", Some("disk0"), false);
        let rng = Owner::new("virtio-rng-pci");
        assert_eq!(s.claim(5, 0, &blk), Ok(a(5, 0)));
        assert_eq!(
            s.claim(5, 0, &rng).unwrap_err().to_string(),
            "PCI: slot 5 function 0 not available for virtio-rng-pci, in use by virtio-blk-pci,id=disk0"
        );
        s.claim(6, 0, &rng).unwrap();
        assert_eq!(
            s.claim(6, 0, &blk).unwrap_err().to_string(),
            "PCI: slot 6 function 0 not available for virtio-blk-pci, in use by virtio-rng-pci"
        );
        // Slots print in decimal in this message, as QEMU's %d.
        s.claim(0x1f, 0, &blk).unwrap();
        assert_eq!(
            s.claim(0x1f, 0, &rng).unwrap_err().to_string(),
            "PCI: slot 31 function 0 not available for virtio-rng-pci, in use by virtio-blk-pci,id=disk0"
        );
        assert_eq!(
            s.claim(0, 0, &rng).unwrap_err().to_string(),
            "PCI: slot 0 function 0 not available for virtio-rng-pci, reserved for the host bridge"
        );
        assert!(matches!(s.claim(0x20, 0, &rng), Err(SlotError::Address(_))));
        assert!(matches!(s.claim(1, 8, &rng), Err(SlotError::Address(_))));
        assert_eq!(
            s.state(a(5, 0)),
            &SlotState::Allocated { owner: blk.clone() }
        );
        assert_eq!(
            s.release(a(5, 0)),
            SlotState::Allocated { owner: blk.clone() }
        );
        assert_eq!(s.claim(5, 0, &rng), Ok(a(5, 0)));
        assert!(s.validate().is_ok());
    }

    #[test]
    fn automatic_in_order() {
        let mut s = SlotAllocator::new();
        let o = Owner::new("virtio-rng-pci");
        assert_eq!(s.auto(&o), Ok(a(1, 0)));
        assert_eq!(s.auto(&o), Ok(a(2, 0)));
        s.claim(3, 0, &o).unwrap();
        // Partly used and reserved slots are skipped.
        s.reserve(4, 2, "virtio-net-pci,id=net0").unwrap();
        s.claim(5, 3, &o).unwrap();
        assert_eq!(s.auto(&o), Ok(a(6, 0)));
        let addrs: Vec<_> = s.allocations().into_iter().map(|(a, _)| a).collect();
        assert_eq!(addrs, vec![a(1, 0), a(2, 0), a(3, 0), a(5, 3), a(6, 0)]);
    }

    #[test]
    fn a_secondary_bus_starts_at_slot_0() {
        let mut s = SlotAllocator::secondary();
        let a = s.auto(&Owner::new("virtio-rng-pci")).unwrap();
        assert_eq!(a.to_string(), "00:00.0");
        assert_eq!(s.auto(&Owner::new("x")).unwrap().to_string(), "00:01.0");
        for _ in 2..32 {
            s.auto(&Owner::new("x")).unwrap();
        }
        assert_eq!(
            s.auto(&Owner::new("virtio-blk-pci"))
                .unwrap_err()
                .to_string(),
            "PCI: no slot/function available for virtio-blk-pci, all in use or reserved"
        );
    }

    #[test]
    fn full_bus() {
        let mut s = SlotAllocator::new();
        let o = Owner::new("virtio-blk-pci");
        for slot in 1..=0x1f {
            assert_eq!(s.auto(&o), Ok(a(slot, 0)));
        }
        assert_eq!(
            s.auto(&Owner::new("virtio-rng-pci"))
                .unwrap_err()
                .to_string(),
            "PCI: no slot/function available for virtio-rng-pci, all in use or reserved"
        );
    }

    #[test]
    fn reservations() {
        let mut s = SlotAllocator::new();
        let net = owner("virtio-net-pci", Some("net0"), false);
        s.reserve(7, 0, "virtio-net-pci,id=net0").unwrap();
        assert_eq!(
            s.claim(7, 0, &Owner::new("virtio-rng-pci")).unwrap_err().to_string(),
            "PCI: slot 7 function 0 not available for virtio-rng-pci, reserved for virtio-net-pci,id=net0"
        );
        assert_eq!(s.claim(7, 0, &net), Ok(a(7, 0)));
        assert!(s.reserve(7, 0, "x").is_err());
        assert!(matches!(s.release(a(0, 0)), SlotState::Reserved { .. }));
    }

    #[test]
    fn multifunction_rules() {
        let mut s = SlotAllocator::new();
        let single = Owner::new("virtio-blk-pci");
        let multi = owner("virtio-blk-pci", Some("f0"), true);
        // Single-function function 0 first, then function 1.
        s.claim(5, 0, &single).unwrap();
        assert_eq!(
            s.claim(5, 1, &single).unwrap_err().to_string(),
            "PCI: single function device can't be populated in function 5.1"
        );
        // Function 1 first, then a single-function function 0.
        s.claim(0x1a, 1, &single).unwrap();
        assert_eq!(
            s.claim(0x1a, 0, &single).unwrap_err().to_string(),
            "PCI: 1a.0 indicates single function, but 1a.1 is already populated."
        );
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "PCI: function 0 missing for 1a.1: a multifunction slot needs function 0"
        );
        // multifunction=on on function 0 makes the slot valid; functions > 0
        // need not set it (QEMU accepts both interpretations).
        s.claim(0x1a, 0, &multi).unwrap();
        s.claim(0x1a, 7, &single).unwrap();
        assert!(s.validate().is_ok());
        s.claim(9, 0, &multi).unwrap();
        assert!(s.validate().is_ok());
    }

    #[test]
    fn validate_single_function_after_release() {
        let mut s = SlotAllocator::new();
        let multi = owner("a", None, true);
        s.claim(2, 0, &multi).unwrap();
        s.claim(2, 3, &Owner::new("b")).unwrap();
        s.release(a(2, 0));
        assert_eq!(
            s.validate(),
            Err(SlotError::Function0Missing {
                slot: 2,
                function: 3
            })
        );
    }
}
