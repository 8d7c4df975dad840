//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT, MCFG and a DSDT with the PCI host
//! bridge, written at [`ACPI_START`].
//!
//! With them Linux finds the vCPUs and the IO-APIC (MADT), uses ECAM (MCFG, with the window
//! also claimed by a PNP0C02 motherboard device), honours our BAR placement (the host bridge's
//! `_CRS` windows), enables MSI-X, and powers off or resets through the PM port of
//! [`devices::legacy::AcpiPm`].
//!
//! With [`AcpiOptions::pci_hotplug`] the DSDT also describes ACPI PCI hot-plug on bus 0, the way
//! QEMU does: slot objects `S08`..`SF8` under `\_SB.PCI0` with `_EJ0`, the register block of
//! [`devices::legacy::PciHotplug`] and a Generic Event Device (`\_SB.GED0`, ACPI0013) whose
//! interrupt runs `\_SB.PCI0.PCNT`. Without it the tables are byte for byte what they were
//! before hot-plug existed.

use acpi_tables::aml;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use devices::legacy::{
    slots_in, ACPI_PM_PORT, B0EJ_OFFSET, BNUM_OFFSET, BRIDGE_HOTPLUG_SLOTS, GED_GSI,
    GED_PCI_HOTPLUG, GED_PORT, GED_PORT_LEN, HOTPLUG_SLOTS, PCID_OFFSET, PCIU_OFFSET,
    PCI_HOTPLUG_PORT, PCI_HOTPLUG_PORT_LEN, PCI_RMV_OFFSET, RESET_OFFSET, RESET_VALUE,
    S5_SLEEP_TYPE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;
use crate::Error;

const OEM_ID: [u8; 6] = *b"VMMPCI";
const OEM_TABLE: [u8; 8] = *b"VMMPCI  ";

/// A bridge the DSDT describes for hot-plug behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiBridge {
    /// Its secondary bus number (also its bus's hot-plug selector value, `BSEL`).
    pub bus: u8,
    /// The number of the bus it sits on.
    pub parent: u8,
    /// Its devfn there.
    pub devfn: u8,
    /// Its own bus takes hot-plugged devices (the bus has hot-plug registers): the bridge gets
    /// an object with its bus selector and slot objects. Without, the bridge is only kept out
    /// of its parent bus's hot-pluggable slots (a bridge is never hot-pluggable itself).
    pub hotplug: bool,
}

/// What the tables describe beyond the fixed machine. The default is the machine without
/// hot-plug, as machines were before each option existed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiOptions {
    /// ACPI PCI hot-plug on bus 0: slot objects with `_EJ0`, the hot-plug registers at
    /// [`PCI_HOTPLUG_PORT`] and the GED at [`GED_PORT`] (interrupt [`GED_GSI`]). The vmm must
    /// then put [`devices::legacy::PciHotplug`] and [`devices::legacy::Ged`] on the port bus.
    pub pci_hotplug: bool,
    /// The machine has PCI bridges: the host bridge decodes buses 0-255 (`_CRS` bus range,
    /// MCFG end bus, the ECAM window claimed in full). Without bridges the tables are the ones
    /// a machine always had (bus 0 only).
    pub pci_bridges: bool,
    /// The bridges with hot-plug behind them (only with `pci_hotplug`; the device manager
    /// lists them once the buses are numbered, none unless hot-plug behind bridges is on,
    /// [`crate::device_manager::DeviceManager::acpi_hotplug_bridges`]): each gets an object
    /// with its bus selector and slot objects ([`bridge_device`]). Empty: the DSDT of bus-0
    /// hot-plug, byte for byte.
    pub bridges: Vec<AcpiBridge>,
    /// The machine has the 64-bit PCI window: the host bridge's `_CRS` has a QWordMemory
    /// range [`PCI_MMIO64_START`], [`PCI_MMIO64_SIZE`] bytes (cacheable, as QEMU's 64-bit
    /// hole). Without it the `_CRS` is what it always was.
    pub pci_mmio64: bool,
    /// The machine has the type-1 config ports (machine property `pci_config_ports`; on by
    /// default): the host bridge's `_CRS` claims 0xcf8-0xcff, as it always did. Off, it does
    /// not, and the guest reaches config space through the MCFG's ECAM alone.
    pub config_ports: bool,
}

impl Default for AcpiOptions {
    fn default() -> Self {
        AcpiOptions {
            pci_hotplug: false,
            pci_bridges: false,
            bridges: Vec::new(),
            pci_mmio64: false,
            config_ports: true,
        }
    }
}

/// The GSI a slot's INTx pin is wired to (IO-APIC pins 16..23, swizzled like QEMU's i440fx).
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    16 + ((u32::from(slot) + u32::from(pin)) % 8)
}

/// A Generic Address Structure for an I/O port register of `bytes` width.
fn gas_io(port: u64, bytes: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = bytes * 8;
    g[3] = bytes; // access size: 1 byte, 2 word, ...
    g[4..12].copy_from_slice(&port.to_le_bytes());
    g
}

fn fadt(dsdt: u64) -> Sdt {
    let mut t = Sdt::new(*b"FACP", 276, 6, OEM_ID, OEM_TABLE, 1);
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const RESET_REG_SUP: u32 = 1 << 10;
    t.write_u32(112, HW_REDUCED_ACPI | RESET_REG_SUP);
    t.write_bytes(116, &gas_io(ACPI_PM_PORT + RESET_OFFSET, 1));
    t.write_u8(128, RESET_VALUE);
    t.write_u8(131, 5); // FADT minor version
    t.write_u64(140, dsdt); // X_DSDT
    t.write_bytes(244, &gas_io(ACPI_PM_PORT, 1)); // sleep control register
    t.write_bytes(256, &gas_io(ACPI_PM_PORT + 1, 1)); // sleep status register
    t.write_bytes(268, b"VMMPCI\0\0"); // hypervisor vendor identity
    t.update_checksum();
    t
}

fn madt(cpus: u8) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 4, OEM_ID, OEM_TABLE, 1);
    t.write_u32(36, LAPIC_START as u32);
    t.write_u32(40, 1); // PCAT_COMPAT: there are 8259s too
    for id in 0..cpus {
        t.append_slice(&[0, 8, id, id, 1, 0, 0, 0]); // processor local APIC, enabled
    }
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    t.append_slice(&ioapic);
    // The serial port's ISA IRQ 4 is GSI 4 (flags 0: as the ISA bus, edge, active high). On a
    // hardware-reduced machine Linux maps no ISA IRQs by itself; what makes its UART work is
    // COM1's own ACPI device in the DSDT (see `dsdt`), this entry only states the wiring.
    let mut iso = vec![2, 10, 0, devices::legacy::SERIAL_IRQ as u8];
    iso.extend_from_slice(&devices::legacy::SERIAL_IRQ.to_le_bytes());
    iso.extend_from_slice(&0u16.to_le_bytes());
    t.append_slice(&iso);
    t.update_checksum();
    t
}

fn mcfg(opts: &AcpiOptions) -> Sdt {
    let mut t = Sdt::new(*b"MCFG", 44, 1, OEM_ID, OEM_TABLE, 1);
    let mut e = Vec::with_capacity(16);
    e.extend_from_slice(&ECAM_START.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes()); // segment
    e.push(0); // first bus
    e.push(((ecam_size(opts.pci_bridges) >> 20) - 1) as u8); // last bus
    e.extend_from_slice(&[0; 4]);
    t.append_slice(&e);
    t.update_checksum();
    t
}

fn dsdt(opts: &AcpiOptions) -> Sdt {
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);

    // The host bridge: bus 0, the type-1 ports, all other I/O ports, the 32-bit BAR window.
    let last_bus = ((ecam_size(opts.pci_bridges) >> 20) - 1) as u16;
    let bus = aml::AddressSpace::new_bus_number(0u16, last_bus);
    let cfg_io = aml::IO::new(PCI_CONFIG_PORT as u16, PCI_CONFIG_PORT as u16, 1, 8);
    let io_lo = aml::AddressSpace::new_io(0u16, 0x0cf7u16, None);
    let io_hi = aml::AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let mem32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let mem64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::Cacheable,
        true,
        PCI_MMIO64_START,
        PCI_MMIO64_START + PCI_MMIO64_SIZE - 1,
        None,
    );
    let mut crs: Vec<&dyn Aml> = vec![&bus];
    if opts.config_ports {
        crs.push(&cfg_io);
    }
    crs.extend([&io_lo as &dyn Aml, &io_hi, &mem32]);
    if opts.pci_mmio64 {
        crs.push(&mem64);
    }
    let crs = aml::ResourceTemplate::new(crs);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);

    // _PRT: every slot's INTA..INTD to its IO-APIC pin.
    let mut prt_rows: Vec<(u32, u8, u32)> = Vec::new();
    for slot in 1..32u8 {
        for pin in 0..4u8 {
            prt_rows.push(((u32::from(slot) << 16) | 0xffff, pin, intx_gsi(slot, pin)));
        }
    }
    let prt_pkgs: Vec<aml::Package> = prt_rows
        .iter()
        .map(|(adr, pin, gsi)| aml::Package::new(vec![adr, pin, &aml::ZERO, gsi]))
        .collect();
    let prt_refs: Vec<&dyn Aml> = prt_pkgs.iter().map(|p| p as &dyn Aml).collect();
    let prt = aml::Package::new(prt_refs);
    let prt = aml::Name::new("_PRT".into(), &prt);
    let hotplug = opts
        .pci_hotplug
        .then(|| (pci0_hotplug(&opts.bridges), hotplug_devices()));
    let mut pci0_children: Vec<&dyn Aml> = vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt];
    if let Some((in_pci0, _)) = &hotplug {
        pci0_children.push(in_pci0);
    }
    let pci0 = aml::Device::new("PCI0".into(), pci0_children);

    // The ECAM window, claimed as a motherboard resource so Linux trusts the MCFG.
    let ecam =
        aml::Memory32Fixed::new(false, ECAM_START as u32, ecam_size(opts.pci_bridges) as u32);
    let res_crs = aml::ResourceTemplate::new(vec![&ecam]);
    let res_crs = aml::Name::new("_CRS".into(), &res_crs);
    let res_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
    let res_uid = aml::Name::new("_UID".into(), &aml::ONE);
    let res = aml::Device::new("RES0".into(), vec![&res_hid, &res_uid, &res_crs]);

    // COM1 as an ACPI device: on a hardware-reduced machine Linux maps no legacy ISA IRQs by
    // itself, so the UART's interrupt must come from here (8250_pnp binds to it).
    let com_io = aml::IO::new(
        devices::legacy::SERIAL_PORT as u16,
        devices::legacy::SERIAL_PORT as u16,
        1,
        devices::legacy::SERIAL_PORT_LEN as u8,
    );
    let com_irq = aml::Interrupt::new(true, true, false, false, devices::legacy::SERIAL_IRQ);
    let com_crs = aml::ResourceTemplate::new(vec![&com_io, &com_irq]);
    let com_crs = aml::Name::new("_CRS".into(), &com_crs);
    let com_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1 = aml::Device::new("COM1".into(), vec![&com_hid, &com_uid, &com_crs]);

    // The CMOS clock as an ACPI device. Without one Linux registers a platform device with ISA
    // IRQ 8, which a hardware-reduced machine never maps, and rtc_cmos fails (-EINVAL): no
    // /dev/rtc0, no clock read at boot. The clock raises no interrupts, so _CRS has no IRQ
    // (rtc_cmos then runs without alarms).
    let rtc_io = aml::IO::new(
        devices::legacy::RTC_PORT as u16,
        devices::legacy::RTC_PORT as u16,
        1,
        devices::legacy::RTC_PORT_LEN as u8,
    );
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io]);
    let rtc_crs = aml::Name::new("_CRS".into(), &rtc_crs);
    let rtc_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00"));
    let rtc_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let rtc = aml::Device::new("RTC_".into(), vec![&rtc_hid, &rtc_uid, &rtc_crs]);

    let mut sb_children: Vec<&dyn Aml> = vec![&pci0, &res, &com1, &rtc];
    if let Some((_, in_sb)) = &hotplug {
        sb_children.push(in_sb);
    }
    // Serialised into a Vec and appended at once: `Sdt` as an AML sink updates its length and
    // checksum after every byte, which is quadratic in the table's size (minutes for the
    // 100 KiB DSDT of a machine with many bridges).
    let mut body = Vec::new();
    let sb = aml::Scope::new("\\_SB_".into(), sb_children);
    sb.to_aml_bytes(&mut body);
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    t.append_slice(&body);
    let len = t.len() as u32;
    t.write_u32(4, len);
    t.update_checksum();
    t
}

/// AML already serialised: lets parts of the DSDT be built by functions of their own.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

// The Field in `pci0_hotplug` lists the registers in this order, 32 bits each.
const _: () = assert!(
    PCIU_OFFSET == 0
        && PCID_OFFSET == 4
        && B0EJ_OFFSET == 8
        && PCI_RMV_OFFSET == 0xc
        && BNUM_OFFSET == 0x10
        && PCI_HOTPLUG_PORT_LEN == 0x14
);

/// QEMU's name for the slot object of `slot` on a bus: `S` and the devfn in two hex digits
/// (`S08` for slot 1; AML pads it to `S08_`).
fn slot_object(slot: u8) -> String {
    device_object(slot << 3)
}

/// QEMU's name for the object of the function `devfn` on a bus (`SF1_` for 1e.1).
fn device_object(devfn: u8) -> String {
    format!("S{devfn:02X}_")
}

const DEVICE_CHECK: u8 = 1;
const EJECT_REQUEST: u8 = 3;

/// The bridges on bus `bus`, by devfn (every one, with hot-plug behind it or not).
fn bridges_on(bridges: &[AcpiBridge], bus: u8) -> Vec<&AcpiBridge> {
    let mut on: Vec<&AcpiBridge> = bridges.iter().filter(|b| b.parent == bus).collect();
    on.sort_by_key(|b| b.devfn);
    on
}

/// A hot-pluggable slot's object: `Device (Sxx) { Name (_SUN, slot); Name (_ADR, slot << 16);
/// Method (_EJ0, 1) { PCEJ (BSEL, _SUN) } }` (`BSEL` is found in the bus's scope).
fn slot_device(slot: u8, out: &mut Vec<u8>) {
    aml::Device::new(
        slot_object(slot).as_str().into(),
        vec![
            &aml::Name::new("_SUN".into(), &slot),
            &aml::Name::new("_ADR".into(), &(u32::from(slot) << 16)),
            &aml::Method::new(
                "_EJ0".into(),
                1,
                false,
                vec![&aml::MethodCall::new(
                    "PCEJ".into(),
                    vec![&aml::Path::new("BSEL"), &aml::Path::new("_SUN")],
                )],
            ),
        ],
    )
    .to_aml_bytes(out);
}

/// `Method (DVNT, 2) { If (Arg0 & (1 << slot)) { Notify (Sxx, Arg1) } ... }` for `slots`.
fn dvnt(slots: impl Iterator<Item = u8>, out: &mut Vec<u8>) {
    let mut body = Vec::new();
    for slot in slots {
        let bit = 1u32 << slot;
        aml::If::new(
            &aml::And::new(&aml::ZERO, &aml::Arg(0), &bit),
            vec![&aml::Notify::new(
                &aml::Path::new(&slot_object(slot)),
                &aml::Arg(1),
            )],
        )
        .to_aml_bytes(&mut body);
    }
    aml::Method::new("DVNT".into(), 2, false, vec![&Raw(body)]).to_aml_bytes(out);
}

/// The objects of bus `bus`'s slots and bridges, in slot order: each slot of `slots` (bit N =
/// slot N) without a bridge is a hot-pluggable slot object; a slot with a bridge in it is not
/// hot-pluggable (no `_SUN`, no `_EJ0`), and each of its bridges with hot-plug behind it gets
/// its own object there ([`bridge_device`]), function 0 first. `scope` is the bus's absolute
/// ACPI path. Returns the slots that are hot-pluggable (for DVNT).
fn bus_slots(
    bridges: &[AcpiBridge],
    bus: u8,
    slots: u32,
    scope: &str,
    out: &mut Vec<u8>,
) -> Vec<u8> {
    let on = bridges_on(bridges, bus);
    let mut pluggable = Vec::new();
    for slot in slots_in(slots) {
        if !on.iter().any(|b| b.devfn == slot << 3) {
            slot_device(slot, out);
            pluggable.push(slot);
        }
        // The bridges in this slot with hot-plug behind them, function 0 first.
        for b in on.iter().filter(|b| b.devfn >> 3 == slot && b.hotplug) {
            bridge_device(bridges, b, scope, out);
        }
    }
    pluggable
}

/// The absolute paths of the PCNT methods of the bridges on bus `bus` (in `scope`).
fn child_pcnts(bridges: &[AcpiBridge], bus: u8, scope: &str) -> Vec<String> {
    bridges_on(bridges, bus)
        .iter()
        .filter(|b| b.hotplug)
        .map(|b| format!("{scope}.{}.PCNT", device_object(b.devfn)))
        .collect()
}

/// A bridge's object with hot-plug behind it, after QEMU's `build_append_pci_bus_devices` for a
/// cold-plugged bridge with `acpi-pci-hotplug-with-bridge-support`:
///
/// ```text
/// Device (SF0) {                        // the bridge at devfn 0xf0 of its bus
///     Name (_ADR, 0x001E0000)
///     Name (BSEL, 1)                    // its bus's selector value: the secondary bus number
///     Device (S00) { Name (_SUN, 0); Name (_ADR, 0); Method (_EJ0, 1) { PCEJ (BSEL, _SUN) } }
///     ... one per slot 0..31 (a bridge behind it in its slot's place, recursively)
///     Method (DVNT, 2) { If (Arg0 & 1) { Notify (S00, Arg1) } ... }
///     Method (PCNT) { BNUM = BSEL; DVNT (PCIU, 1); DVNT (PCID, 3); \_SB.PCI0.SF0.S18.PCNT () ... }
/// }
/// ```
///
/// PCNT runs under `\_SB.PCI0.PCNT`'s lock (BLCK), which calls it. Names it does not define
/// (PCEJ, PCIU, PCID, BNUM) resolve upwards to `\_SB.PCI0`'s.
fn bridge_device(bridges: &[AcpiBridge], b: &AcpiBridge, parent_scope: &str, out: &mut Vec<u8>) {
    let name = device_object(b.devfn);
    let scope = format!("{parent_scope}.{name}");
    let adr = (u32::from(b.devfn >> 3) << 16) | u32::from(b.devfn & 7);
    let mut body = Vec::new();
    aml::Name::new("_ADR".into(), &adr).to_aml_bytes(&mut body);
    aml::Name::new("BSEL".into(), &b.bus).to_aml_bytes(&mut body);
    let pluggable = bus_slots(bridges, b.bus, BRIDGE_HOTPLUG_SLOTS, &scope, &mut body);
    dvnt(pluggable.into_iter(), &mut body);
    pcnt(bridges, b.bus, &scope, None, &mut body);
    aml::Device::new(name.as_str().into(), vec![&Raw(body)]).to_aml_bytes(out);
}

/// The PCNT method of bus `bus` (whose object is `scope`): select the bus (`BNUM = BSEL`),
/// device check for its PCIU slots, eject request for its PCID slots, then the PCNT of each
/// bridge with hot-plug on the bus. Bus 0's takes the lock (`lock`: its Acquire and Release);
/// the bridges' run under it.
fn pcnt(
    bridges: &[AcpiBridge],
    bus: u8,
    scope: &str,
    lock: Option<(&aml::Acquire, &aml::Release)>,
    out: &mut Vec<u8>,
) {
    let calls: Vec<aml::MethodCall> = child_pcnts(bridges, bus, scope)
        .iter()
        .map(|p| aml::MethodCall::new(p.as_str().into(), vec![]))
        .collect();
    let (bnum, bsel) = (aml::Path::new("BNUM"), aml::Path::new("BSEL"));
    let store = aml::Store::new(&bnum, &bsel);
    let (pciu, pcid) = (aml::Path::new("PCIU"), aml::Path::new("PCID"));
    let up = aml::MethodCall::new("DVNT".into(), vec![&pciu, &DEVICE_CHECK]);
    let down = aml::MethodCall::new("DVNT".into(), vec![&pcid, &EJECT_REQUEST]);
    let mut body: Vec<&dyn Aml> = Vec::new();
    if let Some((acquire, _)) = lock {
        body.push(acquire);
    }
    body.extend([&store as &dyn Aml, &up, &down]);
    body.extend(calls.iter().map(|c| c as &dyn Aml));
    if let Some((_, release)) = lock {
        body.push(release);
    }
    aml::Method::new("PCNT".into(), 0, false, body).to_aml_bytes(out);
}

/// What hot-plug adds inside `\_SB.PCI0`, after QEMU (`hw/i386/acpi-build.c`):
///
/// ```text
/// Name (BSEL, 0)                        // this bus's selector value
/// OperationRegion (PCST, SystemIO, 0xAE00, 0x14)
/// Field (PCST, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32, B0EJ, 32, , 32, BNUM, 32 }
/// Mutex (BLCK, 0)                       // guards BNUM and the accesses it selects
/// Method (PCEJ, 2) { Acquire (BLCK, 0xFFFF); BNUM = Arg0; B0EJ = 1 << Arg1; Release (BLCK) }
/// Method (DVNT, 2) { If (Arg0 & 0x02) { Notify (S08, Arg1) } ... up to slot 31 (SF8) }
/// Method (PCNT) { Acquire (BLCK, 0xFFFF); BNUM = BSEL; DVNT (PCIU, 1); DVNT (PCID, 3);
///                 \_SB.PCI0.SF0.PCNT () ...; Release (BLCK) }
/// Device (S08) { Name (_SUN, 1); Name (_ADR, 0x00010000); Method (_EJ0, 1) { PCEJ (BSEL, _SUN) } }
/// ... one Device per slot 1..31
/// ```
///
/// PCNT reads PCIU (which clears on read) and PCID once each: device check (1) for each slot
/// with a new device, eject request (3) for each slot whose removal the monitor requested.
/// Linux's acpiphp binds to the slot objects (they have `_ADR` and `_EJ0`).
///
/// With `bridges` (hot-plug behind bridges), each bridge on bus 0 takes its slot's place with
/// the object [`bridge_device`] builds (its slot leaves DVNT), and PCNT calls each one's PCNT
/// after its own, which select their buses in turn. Without, the bytes are those bus-0
/// hot-plug always had.
fn pci0_hotplug(bridges: &[AcpiBridge]) -> Raw {
    use aml::{FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, OpRegionSpace};
    let mut out = Vec::new();
    let port = PCI_HOTPLUG_PORT as u32;
    let len = PCI_HOTPLUG_PORT_LEN as u32;
    let acquire = aml::Acquire::new("BLCK".into(), 0xffff);
    let release = aml::Release::new("BLCK".into());
    let bnum = aml::Path::new("BNUM");

    aml::Name::new("BSEL".into(), &aml::ZERO).to_aml_bytes(&mut out);
    aml::OpRegion::new("PCST".into(), OpRegionSpace::SystemIO, &port, &len).to_aml_bytes(&mut out);
    aml::Field::new(
        "PCST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
            FieldEntry::Reserved(32), // PCI_RMV: unused by the AML, as in QEMU
            FieldEntry::Named(*b"BNUM", 32),
        ],
    )
    .to_aml_bytes(&mut out);
    aml::Mutex::new("BLCK".into(), 0).to_aml_bytes(&mut out);

    aml::Method::new(
        "PCEJ".into(),
        2,
        false,
        vec![
            &acquire,
            &aml::Store::new(&bnum, &aml::Arg(0)),
            &aml::ShiftLeft::new(&aml::Path::new("B0EJ"), &aml::ONE, &aml::Arg(1)),
            &release,
            &aml::Return::new(&aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut out);

    // The slot objects first (into their own buffer): they tell which slots are hot-pluggable.
    let mut slots = Vec::new();
    let pluggable = bus_slots(bridges, 0, HOTPLUG_SLOTS, "\\_SB_.PCI0", &mut slots);
    dvnt(pluggable.into_iter(), &mut out);
    pcnt(
        bridges,
        0,
        "\\_SB_.PCI0",
        Some((&acquire, &release)),
        &mut out,
    );

    out.extend_from_slice(&slots);
    Raw(out)
}

/// What hot-plug adds in `\_SB`:
///
/// ```text
/// Device (PHPR) {                       // claims the register ports inside PCI0's I/O window
///     Name (_HID, EisaId ("PNP0C02")); Name (_UID, 2)
///     Name (_CRS, ResourceTemplate () { IO (Decode16, 0xAE00, 0xAE00, 1, 0x14)
///                                       IO (Decode16, 0xAF00, 0xAF00, 1, 4) })
/// }
/// Device (GED0) {
///     Name (_HID, "ACPI0013"); Name (_UID, 0)
///     Name (_CRS, ResourceTemplate () { Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 9 } })
///     OperationRegion (GDST, SystemIO, 0xAF00, 4)
///     Field (GDST, DWordAcc, NoLock, WriteAsZeros) { GDAT, 32 }
///     Method (_EVT, 1, Serialized) { Local0 = GDAT; If (Local0 & 1) { \_SB.PCI0.PCNT () } }
/// }
/// ```
///
/// The ports are claimed by a motherboard-resource device (Linux's PNP system driver reserves
/// them, so no I/O BAR is ever placed on them) rather than in the GED's `_CRS`: Linux's GED
/// driver expects nothing but interrupts there. The GED reads its event register once per
/// interrupt (the read clears it).
fn hotplug_devices() -> Raw {
    use aml::{FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, OpRegionSpace};
    let mut out = Vec::new();
    let hp_io = aml::IO::new(
        PCI_HOTPLUG_PORT as u16,
        PCI_HOTPLUG_PORT as u16,
        1,
        PCI_HOTPLUG_PORT_LEN as u8,
    );
    let ged_io = aml::IO::new(GED_PORT as u16, GED_PORT as u16, 1, GED_PORT_LEN as u8);
    aml::Device::new(
        "PHPR".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &2u8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&hp_io, &ged_io]),
            ),
        ],
    )
    .to_aml_bytes(&mut out);

    let irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let port = GED_PORT as u32;
    let len = GED_PORT_LEN as u32;
    aml::Device::new(
        "GED0".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq])),
            &aml::OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &port, &len),
            &aml::Field::new(
                "GDST".into(),
                FieldAccessType::DWord,
                FieldLockRule::NoLock,
                FieldUpdateRule::WriteAsZeroes,
                vec![FieldEntry::Named(*b"GDAT", 32)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &aml::Path::new("GDAT")),
                    &aml::If::new(
                        &aml::And::new(&aml::ZERO, &aml::Local(0), &GED_PCI_HOTPLUG),
                        vec![&aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![])],
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut out);
    Raw(out)
}

fn xsdt(entries: &[u64]) -> Sdt {
    let mut t = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE, 1);
    for e in entries {
        t.append_slice(&e.to_le_bytes());
    }
    t.update_checksum();
    t
}

fn rsdp(xsdt: u64) -> [u8; 36] {
    let mut r = [0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(&OEM_ID);
    r[15] = 2; // revision: ACPI 2.0+
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// Lays out every table from [`ACPI_START`] for the machine without hot-plug; returns
/// (address, bytes) pairs, RSDP first. Same as [`tables_with`] and default options.
pub fn tables(cpus: u8) -> Result<Vec<(u64, Vec<u8>)>, Error> {
    tables_with(cpus, &AcpiOptions::default())
}

/// Lays out every table from [`ACPI_START`]; returns (address, bytes) pairs, RSDP first.
pub fn tables_with(cpus: u8, opts: &AcpiOptions) -> Result<Vec<(u64, Vec<u8>)>, Error> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = ACPI_START + 64; // the RSDP goes first, at ACPI_START
    let mut place = |bytes: Vec<u8>, out: &mut Vec<(u64, Vec<u8>)>| {
        let addr = next;
        next = (next + bytes.len() as u64 + 15) & !15;
        out.push((addr, bytes));
        addr
    };
    let dsdt = place(dsdt(opts).as_slice().to_vec(), &mut out);
    let fadt = place(fadt(dsdt).as_slice().to_vec(), &mut out);
    let madt = place(madt(cpus).as_slice().to_vec(), &mut out);
    let mcfg = place(mcfg(opts).as_slice().to_vec(), &mut out);
    let xsdt = place(xsdt(&[fadt, madt, mcfg]).as_slice().to_vec(), &mut out);
    if next > ACPI_END {
        return Err(Error::Config("ACPI tables do not fit".into()));
    }
    out.insert(0, (ACPI_START, rsdp(xsdt).to_vec()));
    Ok(out)
}

/// Writes the tables of the machine without hot-plug into guest memory; returns the RSDP's
/// address. Same as [`write_tables_with`] and default options.
pub fn write_tables(mem: &GuestMemoryMmap, cpus: u8) -> Result<u64, Error> {
    write_tables_with(mem, cpus, &AcpiOptions::default())
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn write_tables_with(
    mem: &GuestMemoryMmap,
    cpus: u8,
    opts: &AcpiOptions,
) -> Result<u64, Error> {
    for (addr, bytes) in tables_with(cpus, opts)? {
        mem.write_slice(&bytes, GuestAddress(addr))?;
    }
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `needle` occurs in `hay`.
    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// The tables for `cpus` CPUs and `opts`, each but the RSDP (the first) with a zero
    /// checksum and the length its header says.
    fn sound_tables(cpus: u8, opts: &AcpiOptions) -> Vec<(u64, Vec<u8>)> {
        let t = tables_with(cpus, opts).unwrap_or_else(|e| panic!("{e}"));
        for (_, b) in &t[1..] {
            assert_eq!(checksum(b), 0);
            assert_eq!(
                u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
                b.len()
            );
        }
        t
    }

    /// An iasl listing without its comments (`//` and the `/* \\_SB_.PCI0.BSEL */` kind),
    /// whitespace squeezed to single spaces.
    fn squeeze_dsl(dsl: &str) -> String {
        let mut text = dsl
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        while let Some(start) = text.find("/*") {
            let end = text[start..]
                .find("*/")
                .map_or(text.len(), |e| start + e + 2);
            text.replace_range(start..end, " ");
        }
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn every_table_checksums_to_zero_and_is_reachable_from_the_rsdp() {
        let t = tables(2).unwrap();
        let find = |addr: u64| t.iter().find(|(a, _)| *a == addr).map(|(_, b)| b).unwrap();
        let rsdp = find(ACPI_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(checksum(&rsdp[..20]), 0);
        assert_eq!(checksum(rsdp), 0);
        let xsdt = find(u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut sigs = Vec::new();
        for i in 0..(xsdt.len() - 36) / 8 {
            let table = find(u64_at(xsdt, 36 + 8 * i));
            assert_eq!(checksum(table), 0);
            assert_eq!(
                u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize,
                table.len()
            );
            sigs.push(String::from_utf8_lossy(&table[..4]).to_string());
            if &table[..4] == b"FACP" {
                let dsdt = find(u64_at(table, 140));
                assert_eq!(&dsdt[..4], b"DSDT");
                assert_eq!(checksum(dsdt), 0);
            }
        }
        assert_eq!(sigs, ["FACP", "APIC", "MCFG"]);
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let m = madt(3);
        let b = m.as_slice();
        let mut apic_ids = Vec::new();
        let mut ioapics = 0;
        let mut overrides = Vec::new();
        let mut off = 44;
        while off < b.len() {
            match b[off] {
                0 => apic_ids.push(b[off + 3]),
                1 => ioapics += 1,
                2 => overrides.push((b[off + 3], b[off + 4])),
                _ => {}
            }
            off += b[off + 1] as usize;
        }
        assert_eq!(apic_ids, [0, 1, 2]);
        assert_eq!(ioapics, 1);
        assert_eq!(overrides, [(4, 4)], "the serial IRQ is mapped explicitly");
    }

    /// The DSDT names each ACPI device with its _HID (an EISA id, compressed to 4 bytes).
    #[test]
    fn dsdt_describes_the_host_bridge_com1_and_the_clock() {
        let d = dsdt(&AcpiOptions::default());
        let b = d.as_slice();
        let has = |bytes: &[u8]| contains(b, bytes);
        for (name, hid) in [
            (b"PCI0", "PNP0A08"),
            (b"RES0", "PNP0C02"),
            (b"COM1", "PNP0501"),
            (b"RTC_", "PNP0B00"),
        ] {
            assert!(has(name), "no device {}", String::from_utf8_lossy(name));
            let mut id = Vec::new();
            aml::EISAName::new(hid).to_aml_bytes(&mut id);
            assert!(has(&id), "no _HID {hid}");
        }
        // The clock's ports: an IO descriptor for 0x70..0x71 (min, max, alignment 1, length 2).
        assert!(has(&[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02]));
    }

    #[test]
    fn mcfg_points_at_the_ecam_window() {
        let m = mcfg(&AcpiOptions::default());
        assert_eq!(u64_at(m.as_slice(), 44), ECAM_START);
    }

    /// FNV-1a over every table and its address.
    fn fingerprint(tables: &[(u64, Vec<u8>)]) -> (u64, usize) {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut n = 0;
        for (addr, bytes) in tables {
            for b in addr.to_le_bytes().iter().chain(bytes) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
                n += 1;
            }
        }
        (h, n)
    }

    /// Without hot-plug the tables are the bytes the code produced before hot-plug existed
    /// (captured from main at e04c682 for 2 vCPUs; the DSDT was 1902 bytes long).
    #[test]
    fn tables_without_hotplug_are_unchanged() {
        let old = tables(2).unwrap();
        assert_eq!(fingerprint(&old), (0xa580_e333_6785_1652, 2464));
        assert_eq!(old, tables_with(2, &AcpiOptions::default()).unwrap());
        assert_eq!(dsdt(&AcpiOptions::default()).as_slice().len(), 1902);
        let with = tables_with(
            2,
            &AcpiOptions {
                pci_hotplug: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_ne!(fingerprint(&with), fingerprint(&old));
    }

    /// Bus-0 hot-plug without bridges: the bytes bus-0 hot-plug had before hot-plug behind
    /// bridges (checked against the previous `pci0_hotplug`, main at 331b006, byte for byte).
    #[test]
    fn hotplug_tables_without_bridges_are_unchanged() {
        let opts = AcpiOptions {
            pci_hotplug: true,
            ..Default::default()
        };
        let t = tables_with(2, &opts).unwrap();
        assert_eq!(fingerprint(&t), (0xbefb_c4f5_dd2a_9ea5, 4562));
        assert_eq!(dsdt(&opts).as_slice().len(), 4000);
    }

    /// The DSDT of `changed` against the default machine's: `descriptor` is in one `_CRS` and
    /// not the other (in `changed`'s when `added`), it is the whole difference in length, and
    /// `changed`'s tables are sound.
    fn assert_crs_descriptor_toggled(changed: &AcpiOptions, descriptor: &[u8], added: bool) {
        let base = dsdt(&AcpiOptions::default());
        let other = dsdt(changed);
        let (with, without) = if added {
            (&other, &base)
        } else {
            (&base, &other)
        };
        assert!(contains(with.as_slice(), descriptor));
        assert!(!contains(without.as_slice(), descriptor));
        assert_eq!(
            with.as_slice().len(),
            without.as_slice().len() + descriptor.len()
        );
        sound_tables(2, changed);
    }

    #[test]
    fn an_ecam_only_machine_does_not_claim_the_config_ports() {
        // I/O port descriptor (0x47): 16-bit decode, min = max = 0xcf8, alignment 1, 8 ports.
        let io = [0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08];
        let ecam_only = AcpiOptions {
            config_ports: false,
            ..Default::default()
        };
        assert_crs_descriptor_toggled(&ecam_only, &io, false);
    }

    #[test]
    fn the_64_bit_window_is_a_qword_range_in_the_host_bridges_crs() {
        // QWord address space descriptor (0x8a, length 43): memory, min/max fixed, cacheable
        // read-write, granularity 0, min, max, translation 0, length.
        let mut q = vec![0x8a, 43, 0, 0, 0b1100, 0b011];
        q.extend_from_slice(&0u64.to_le_bytes());
        q.extend_from_slice(&PCI_MMIO64_START.to_le_bytes());
        q.extend_from_slice(&(PCI_MMIO64_START + PCI_MMIO64_SIZE - 1).to_le_bytes());
        q.extend_from_slice(&0u64.to_le_bytes());
        q.extend_from_slice(&PCI_MMIO64_SIZE.to_le_bytes());
        assert_eq!(q.len(), 46);
        let mmio64 = AcpiOptions {
            pci_mmio64: true,
            ..Default::default()
        };
        assert_crs_descriptor_toggled(&mmio64, &q, true);
    }

    #[test]
    fn hotplug_tables_checksum_and_fit() {
        sound_tables(
            8,
            &AcpiOptions {
                pci_hotplug: true,
                ..Default::default()
            },
        );
        let d = dsdt(&AcpiOptions {
            pci_hotplug: true,
            ..Default::default()
        });
        let b = d.as_slice();
        let has = |bytes: &[u8]| contains(b, bytes);
        // The GED's interrupt: an extended IRQ descriptor, consumer, edge, active high,
        // exclusive, one GSI.
        let mut irq = vec![0x89, 6, 0, 0b0011, 1];
        irq.extend_from_slice(&GED_GSI.to_le_bytes());
        assert!(has(&irq));
        // The register ports, claimed: IO descriptors for 0xae00+0x14 and 0xaf00+4.
        assert!(has(&[0x47, 0x01, 0x00, 0xae, 0x00, 0xae, 0x01, 0x14]));
        assert!(has(&[0x47, 0x01, 0x00, 0xaf, 0x00, 0xaf, 0x01, 0x04]));
    }

    #[test]
    fn slot_objects_are_named_like_qemu() {
        assert_eq!(slot_object(1), "S08_");
        assert_eq!(slot_object(2), "S10_");
        assert_eq!(slot_object(0x1f), "SF8_");
    }

    /// A fresh temporary directory holding `dsdt` as `dsdt.aml`.
    fn scratch_dir(name: &str, dsdt: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-acpi-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dsdt.aml"), dsdt).unwrap();
        dir
    }

    /// Runs ACPICA's iasl (the reference AML tools) on `dsdt`: disassembles it (`iasl -d`), then
    /// recompiles the listing. Returns the listing and the compiler's summary line
    /// (`Compilation successful. 0 Errors, ...`). Fails unless both steps succeed without
    /// errors; fails loudly when iasl is missing.
    fn iasl_round_trip(name: &str, dsdt: &[u8]) -> (String, String) {
        use std::process::Command;
        assert!(
            Command::new("iasl").arg("-v").output().is_ok(),
            "iasl not found: install acpica-tools (apt-get install -y acpica-tools)"
        );
        let dir = scratch_dir(name, dsdt);
        let run = |args: &[&str]| {
            let out = Command::new("iasl")
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success(), text)
        };
        let (ok, log) = run(&["-d", "dsdt.aml"]);
        assert!(ok, "iasl -d failed:\n{log}");
        assert!(!log.contains("Error"), "iasl -d reported errors:\n{log}");
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        let (ok, log) = run(&["-p", "recompiled", "dsdt.dsl"]);
        assert!(ok, "iasl could not recompile the listing:\n{log}");
        let summary = log
            .lines()
            .find(|l| l.contains(" Errors,"))
            .unwrap_or_else(|| panic!("no iasl summary in:\n{log}"))
            .to_string();
        assert!(
            summary.contains(" 0 Errors,"),
            "iasl reported errors:\n{log}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        (dsl, summary)
    }

    /// The hot-plug DSDT through iasl: the objects the guest needs are there, and it compiles
    /// back with no error and no warning beyond those of the DSDT without hot-plug.
    #[test]
    fn iasl_accepts_the_hotplug_dsdt() {
        let (dsl, summary) = iasl_round_trip(
            "hotplug",
            dsdt(&AcpiOptions {
                pci_hotplug: true,
                ..Default::default()
            })
            .as_slice(),
        );
        let (_, summary_off) = iasl_round_trip("plain", dsdt(&AcpiOptions::default()).as_slice());
        let warnings = |s: &str| {
            s.split(',')
                .find(|p| p.contains("Warnings"))
                .map(str::trim)
                .map(str::to_string)
        };
        assert_eq!(
            warnings(&summary),
            warnings(&summary_off),
            "hot-plug adds iasl warnings: {summary}"
        );
        let squeezed = squeeze_dsl(&dsl);
        let missing: Vec<&str> = [
            "Scope (\\_SB)",
            "Device (PCI0)",
            "Name (BSEL, Zero)",
            "OperationRegion (PCST, SystemIO, 0xAE00, 0x14)",
            "PCIU, 32, PCID, 32, B0EJ, 32, Offset (0x10), BNUM, 32",
            "Mutex (BLCK, 0x00)",
            "Method (PCEJ, 2, NotSerialized)",
            "BNUM = Arg0",
            "B0EJ = (One << Arg1)",
            "Method (DVNT, 2, NotSerialized)",
            "Notify (S08, Arg1)",
            "Notify (SF8, Arg1)",
            "Method (PCNT, 0, NotSerialized)",
            "DVNT (PCIU, One)",
            "DVNT (PCID, 0x03)",
            "Device (S08) { Name (_SUN, One) Name (_ADR, 0x00010000)",
            "Method (_EJ0, 1, NotSerialized) { PCEJ (BSEL, _SUN) }",
            "Device (S10) { Name (_SUN, 0x02) Name (_ADR, 0x00020000)",
            "Device (SF8) { Name (_SUN, 0x1F) Name (_ADR, 0x001F0000)",
            "Device (PHPR)",
            "Device (GED0)",
            "Name (_HID, \"ACPI0013\"",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000009, }",
            "OperationRegion (GDST, SystemIO, 0xAF00, 0x04)",
            "Method (_EVT, 1, Serialized)",
            "Local0 = GDAT If ((Local0 & One)) { \\_SB.PCI0.PCNT () }",
            "Method (PCNT, 0, NotSerialized) { Acquire (BLCK, 0xFFFF) BNUM = BSEL \
             DVNT (PCIU, One) DVNT (PCID, 0x03) Release (BLCK) }",
            "Device (PHPR) { Name (_HID, EisaId (\"PNP0C02\")",
        ]
        .into_iter()
        .filter(|needle| !squeezed.contains(needle))
        .collect();
        assert!(missing.is_empty(), "missing {missing:#?} in:\n{dsl}");
        assert_eq!(squeezed.matches("Method (_EJ0, 1").count(), 31);
        assert!(
            !squeezed.contains("Device (S00)"),
            "slot 0 is the host bridge"
        );
    }

    /// Runs the hot-plug DSDT in ACPICA's interpreter (acpiexec, from acpica-tools) with the
    /// registers preset by `init` (lines `\\_SB.PCI0.PCIU 0x6`: acpiexec simulates the I/O
    /// regions as plain storage), evaluates `commands` and returns its output.
    fn acpiexec(name: &str, init: &str, commands: &str) -> String {
        acpiexec_with(
            name,
            &AcpiOptions {
                pci_hotplug: true,
                ..Default::default()
            },
            init,
            commands,
        )
    }

    /// [`acpiexec`] on the DSDT of `opts`.
    fn acpiexec_with(name: &str, opts: &AcpiOptions, init: &str, commands: &str) -> String {
        use std::process::Command;
        let dir = scratch_dir(name, dsdt(opts).as_slice());
        std::fs::write(dir.join("init.txt"), init).unwrap();
        let out = Command::new("acpiexec")
            .args(["-fi", "init.txt", "-b", commands, "dsdt.aml"])
            .current_dir(&dir)
            .output()
            .expect("acpiexec not found: install acpica-tools (apt-get install -y acpica-tools)");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "acpiexec failed:\n{log}");
        for bad in ["Exception", "ACPI Error", "AE_"] {
            assert!(!log.contains(bad), "acpiexec reported `{bad}`:\n{log}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        log
    }

    /// (object, value) of every Notify acpiexec received.
    fn notifies(log: &str) -> Vec<(String, u8)> {
        log.lines()
            .filter_map(|l| {
                let rest = l.split("Received a System Notify on [").nth(1)?;
                let (object, rest) = rest.split_once(']')?;
                let value = rest.split("Value 0x").nth(1)?.get(..2)?;
                Some((object.to_string(), u8::from_str_radix(value, 16).ok()?))
            })
            .collect()
    }

    /// The whole guest-side path in ACPICA's interpreter: the GED's `_EVT` reads its event
    /// register and, for the PCI hot-plug bit only, runs PCNT, which sends device check (1) to
    /// each PCIU slot and eject request (3) to each PCID slot.
    #[test]
    fn acpiexec_ged_event_notifies_the_plugged_and_unplugged_slots() {
        let want: Vec<(String, u8)> = [("S08_", 1), ("S10_", 1), ("SF8_", 1), ("S20_", 3)]
            .iter()
            .map(|(o, v)| (o.to_string(), *v))
            .collect();
        // acpiexec prints notifications from deferred threads and may exit before all of them
        // are printed: every printed one must be right, and together a few runs must show all.
        let mut seen: Vec<(String, u8)> = Vec::new();
        for run in 0..8 {
            let log = acpiexec(
                &format!("evt{run}"),
                "\\_SB.PCI0.PCIU 0x80000006\n\\_SB.PCI0.PCID 0x10\n\\_SB.GED0.GDAT 1\n",
                "execute \\_SB.GED0._EVT 9",
            );
            for n in notifies(&log) {
                assert!(want.contains(&n), "unexpected notify {n:?}:\n{log}");
                if !seen.contains(&n) {
                    seen.push(n);
                }
            }
            if seen.len() == want.len() {
                break;
            }
        }
        seen.sort();
        let mut sorted = want.clone();
        sorted.sort();
        assert_eq!(seen, sorted);

        // Another event bit: PCNT does not run.
        let log = acpiexec(
            "evt-other",
            "\\_SB.PCI0.PCIU 0x2\n\\_SB.GED0.GDAT 0x6\n",
            "execute \\_SB.GED0._EVT 9",
        );
        assert!(log.contains("Evaluating \\_SB.GED0._EVT"), "{log}");
        assert_eq!(notifies(&log), [], "{log}");
    }

    /// A slot's `_EJ0` selects bus 0 and writes the slot's bit to B0EJ.
    #[test]
    fn acpiexec_ej0_writes_the_slot_bit_to_b0ej() {
        let log = acpiexec(
            "ej0",
            "\\_SB.PCI0.BNUM 7\n",
            "execute \\_SB.PCI0.SF8._EJ0 1; execute \\_SB.PCI0.B0EJ; execute \\_SB.PCI0.BNUM; \
             execute \\_SB.PCI0.S28._EJ0 1; execute \\_SB.PCI0.B0EJ",
        );
        let values: Vec<&str> = log
            .lines()
            .filter_map(|l| l.trim().strip_prefix("[Integer] = "))
            .collect();
        assert_eq!(
            values,
            ["0000000080000000", "0000000000000000", "0000000000000020"],
            "{log}"
        );
    }

    /// Two bridges on bus 0 (00:1e.0 -> bus 1, 00:05.0 -> bus 3), one behind the first
    /// (01:02.0 -> bus 2), and one at function 1 of bus 0's slot 6 (00:06.1 -> bus 4).
    fn bridged() -> AcpiOptions {
        AcpiOptions {
            pci_hotplug: true,
            pci_bridges: true,
            pci_mmio64: false,
            config_ports: true,
            bridges: vec![
                AcpiBridge {
                    bus: 1,
                    parent: 0,
                    devfn: 0xf0,
                    hotplug: true,
                },
                AcpiBridge {
                    bus: 2,
                    parent: 1,
                    devfn: 0x10,
                    hotplug: true,
                },
                AcpiBridge {
                    bus: 3,
                    parent: 0,
                    devfn: 0x28,
                    hotplug: true,
                },
                AcpiBridge {
                    bus: 4,
                    parent: 0,
                    devfn: 0x31,
                    hotplug: true,
                },
            ],
        }
    }

    /// The DSDT of a machine with hot-plug behind four bridges (two levels), byte for byte as
    /// the build before `pcnt()` built every PCNT method wrote it (fingerprint taken there).
    #[test]
    fn the_bridged_hotplug_dsdt_is_pinned() {
        let d = dsdt(&bridged());
        assert_eq!(
            fingerprint(&[(0, d.as_slice().to_vec())]),
            (0x2794_a0c5_b5de_7e59, 11555)
        );
    }

    /// The bridges' hot-plug objects come from the bridge list alone: with none listed (what
    /// the device manager gives with hot-plug behind bridges off) a bridged machine's DSDT
    /// names one bus selector, bus 0's; with four listed, five.
    #[test]
    fn bridge_hotplug_objects_come_from_the_list_alone() {
        let selectors = |o: &AcpiOptions| {
            let d = dsdt(o);
            // NameOp 'BSEL'
            d.as_slice().windows(5).filter(|w| w == b"\x08BSEL").count()
        };
        let listed = bridged();
        let unlisted = AcpiOptions {
            bridges: Vec::new(),
            ..listed.clone()
        };
        assert_eq!(selectors(&unlisted), 1);
        assert_eq!(selectors(&listed), 1 + listed.bridges.len());
    }

    /// The DSDT with bridges through iasl: each bridge an object at its _ADR with its BSEL, 32
    /// slot objects, DVNT and PCNT; nested; the bridges' slots on bus 0 without _EJ0.
    #[test]
    fn iasl_accepts_the_bridge_hotplug_dsdt() {
        let (dsl, summary) = iasl_round_trip("bridges", dsdt(&bridged()).as_slice());
        let (_, summary_off) = iasl_round_trip("plain2", dsdt(&AcpiOptions::default()).as_slice());
        let warnings = |s: &str| {
            s.split(',')
                .find(|p| p.contains("Warnings"))
                .map(str::trim)
                .map(str::to_string)
        };
        assert_eq!(warnings(&summary), warnings(&summary_off), "{summary}");
        let sq = squeeze_dsl(&dsl);
        let missing: Vec<&str> = [
            "Device (SF0) { Name (_ADR, 0x001E0000) Name (BSEL, One) Device (S00) { Name (_SUN, Zero) Name (_ADR, Zero) Method (_EJ0, 1, NotSerialized) { PCEJ (BSEL, _SUN) } }",
            "Device (S10) { Name (_ADR, 0x00020000) Name (BSEL, 0x02) Device (S00)",
            "Device (S28) { Name (_ADR, 0x00050000) Name (BSEL, 0x03)",
            "Device (S31) { Name (_ADR, 0x00060001) Name (BSEL, 0x04)",
            "Method (PCNT, 0, NotSerialized) { BNUM = BSEL DVNT (PCIU, One) DVNT (PCID, 0x03) \\_SB.PCI0.SF0.S10.PCNT () }",
            "Method (PCNT, 0, NotSerialized) { Acquire (BLCK, 0xFFFF) BNUM = BSEL DVNT (PCIU, One) DVNT (PCID, 0x03) \\_SB.PCI0.S28.PCNT () \\_SB.PCI0.S31.PCNT () \\_SB.PCI0.SF0.PCNT () Release (BLCK) }",
            "Device (S30) { Name (_SUN, 0x06) Name (_ADR, 0x00060000)",
            "Device (SF8) { Name (_SUN, 0x1F) Name (_ADR, 0x001F0000)",
        ]
        .into_iter()
        .filter(|needle| !sq.contains(needle))
        .collect();
        assert!(missing.is_empty(), "missing {missing:#?} in:\n{dsl}");
        // Bus 0: 31 slots less the two bridges' at function 0 (1e, 05); buses 1..4: 32 each,
        // less bus 1's slot 2 (a bridge).
        assert_eq!(sq.matches("Method (_EJ0, 1").count(), 29 + 31 + 32 * 3);
        assert_eq!(sq.matches("Method (DVNT, 2").count(), 5);
        assert_eq!(sq.matches("Method (PCNT, 0").count(), 5);
        // Bus 0's DVNT (the first one, in PCI0) skips the bridges' slots 1e and 05.
        let dvnt0 = sq.split("Method (DVNT, 2").nth(1).unwrap();
        let dvnt0 = &dvnt0[..dvnt0.find("Method (PCNT").unwrap()];
        assert!(dvnt0.contains("Notify (S08, Arg1)"), "{dvnt0}");
        assert!(!dvnt0.contains("Notify (SF0, Arg1)"), "{dvnt0}");
        assert!(!dvnt0.contains("Notify (S28, Arg1)"), "{dvnt0}");
        assert!(
            dvnt0.contains("Notify (S30, Arg1)"),
            "slot 6's function 0 is still a slot"
        );
    }

    /// In ACPICA's interpreter: the GED event runs PCNT, which selects every bus in turn and
    /// notifies the slots behind the bridges (acpiexec's simulated registers read what was
    /// preset, on every bus alike); a slot's `_EJ0` behind a bridge selects its bus.
    #[test]
    fn acpiexec_bridge_slots_are_notified_and_eject_on_their_bus() {
        // acpiexec names a notified object by its last segment and its address: slots 1 (S08)
        // and 3 (S18) of each of the 5 buses are 5 distinct objects of each name.
        let mut seen: Vec<(String, String)> = Vec::new();
        for run in 0..10 {
            // acpiexec's registers are plain storage: every bus reads PCIU 0xa (slots 1, 3).
            let log = acpiexec_with(
                &format!("brevt{run}"),
                &bridged(),
                "\\_SB.PCI0.PCIU 0xa\n\\_SB.GED0.GDAT 1\n",
                "execute \\_SB.GED0._EVT 9",
            );
            for l in log.lines() {
                let Some(rest) = l.split("Received a System Notify on [").nth(1) else {
                    continue;
                };
                let (object, rest) = rest.split_once(']').unwrap();
                let addr = rest.split_whitespace().next().unwrap().to_string();
                assert!(rest.contains("Value 0x01"), "{l}");
                assert!(
                    ["S08_", "S18_"].contains(&object),
                    "unexpected notify {l}:\n{log}"
                );
                if !seen.contains(&(object.to_string(), addr.clone())) {
                    seen.push((object.to_string(), addr));
                }
            }
            if seen.len() == 10 {
                break;
            }
        }
        for name in ["S08_", "S18_"] {
            assert_eq!(
                seen.iter().filter(|(o, _)| o == name).count(),
                5,
                "{name} on each bus: {seen:?}"
            );
        }

        let log = acpiexec_with(
            "brej0",
            &bridged(),
            "\\_SB.PCI0.BNUM 0\n",
            "execute \\_SB.PCI0.SF0.S10.S18._EJ0 1; execute \\_SB.PCI0.BNUM; execute \\_SB.PCI0.B0EJ; \
             execute \\_SB.PCI0.S31.S00._EJ0 1; execute \\_SB.PCI0.BNUM; execute \\_SB.PCI0.B0EJ",
        );
        let values: Vec<&str> = log
            .lines()
            .filter_map(|l| l.trim().strip_prefix("[Integer] = "))
            .collect();
        assert_eq!(
            values,
            [
                "0000000000000002",
                "0000000000000008",
                "0000000000000004",
                "0000000000000001"
            ],
            "{log}"
        );
    }

    /// A bridge whose own bus takes no hot-plug (no BAR window there) still keeps its slot on
    /// its parent bus from being a hot-pluggable slot: no slot object, no `_EJ0`, no object of
    /// its own.
    #[test]
    fn a_bridge_without_hot_plug_behind_it_is_not_an_ejectable_slot() {
        let count = |o: &AcpiOptions, what: &[u8]| {
            let d = dsdt(o);
            d.as_slice()
                .windows(what.len())
                .filter(|w| w == &what)
                .count()
        };
        let base = bridged();
        let mut more = base.clone();
        // 00:1e.0 -> bus 1 has hot-plug; put a bridge without at 01:07.0 (bus 5).
        more.bridges.push(AcpiBridge {
            bus: 5,
            parent: 1,
            devfn: 0x38,
            hotplug: false,
        });
        assert_eq!(count(&more, b"_EJ0"), count(&base, b"_EJ0") - 1);
        assert_eq!(count(&more, b"\x08BSEL"), count(&base, b"\x08BSEL"));
    }

    /// The most bridges with hot-plug a machine can have (every bus with a BAR window, 1..=56,
    /// each with its own slot objects) still fit the ACPI area.
    #[test]
    fn tables_with_every_windowed_bus_behind_a_bridge_fit() {
        // A chain as deep as it goes, and a flat row: the two extreme shapes.
        let chain: Vec<AcpiBridge> = (1..=MAX_WINDOWED_BUS)
            .map(|bus| AcpiBridge {
                bus,
                parent: bus - 1,
                devfn: 0xf0,
                hotplug: true,
            })
            .collect();
        let mut row: Vec<AcpiBridge> = (1..=30u8)
            .map(|slot| AcpiBridge {
                bus: slot,
                parent: 0,
                devfn: slot << 3,
                hotplug: true,
            })
            .collect();
        row.extend((31..=MAX_WINDOWED_BUS).map(|bus| AcpiBridge {
            bus,
            parent: 1,
            devfn: (bus - 31) << 3,
            hotplug: true,
        }));
        for bridges in [chain, row] {
            let opts = AcpiOptions {
                bridges,
                ..bridged()
            };
            let t = sound_tables(8, &opts);
            let end = t.iter().map(|(a, b)| a + b.len() as u64).max().unwrap();
            assert!(end <= ACPI_END, "{end:#x}");
            eprintln!(
                "DSDT with {} bridges: {} bytes",
                opts.bridges.len(),
                dsdt(&opts).as_slice().len()
            );
        }
    }
}
