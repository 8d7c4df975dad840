//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT, MCFG and a DSDT with the PCI host
//! bridge, written at [`ACPI_START`].
//!
//! With them Linux finds the vCPUs and the IO-APIC (MADT), uses ECAM (MCFG, with the window
//! also claimed by a PNP0C02 motherboard device), honours our BAR placement (the host bridge's
//! `_CRS` windows), enables MSI-X, and powers off or resets through the PM port of
//! [`devices::legacy::AcpiPm`].

use acpi_tables::aml;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use devices::legacy::{ACPI_PM_PORT, RESET_OFFSET, RESET_VALUE, S5_SLEEP_TYPE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;
use crate::Error;

const OEM_ID: [u8; 6] = *b"VMMPCI";
const OEM_TABLE: [u8; 8] = *b"VMMPCI  ";

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

fn mcfg() -> Sdt {
    let mut t = Sdt::new(*b"MCFG", 44, 1, OEM_ID, OEM_TABLE, 1);
    let mut e = Vec::with_capacity(16);
    e.extend_from_slice(&ECAM_START.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes()); // segment
    e.push(0); // first bus
    e.push(((ECAM_SIZE >> 20) - 1) as u8); // last bus
    e.extend_from_slice(&[0; 4]);
    t.append_slice(&e);
    t.update_checksum();
    t
}

fn dsdt() -> Sdt {
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);

    // The host bridge: bus 0, the type-1 ports, all other I/O ports, the 32-bit BAR window.
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
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
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io_lo, &io_hi, &mem32]);
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
    let pci0 = aml::Device::new(
        "PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt],
    );

    // The ECAM window, claimed as a motherboard resource so Linux trusts the MCFG.
    let ecam = aml::Memory32Fixed::new(false, ECAM_START as u32, ECAM_SIZE as u32);
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

    let sb = aml::Scope::new("\\_SB_".into(), vec![&pci0, &res, &com1, &rtc]);
    sb.to_aml_bytes(&mut t);
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut t);
    let len = t.len() as u32;
    t.write_u32(4, len);
    t.update_checksum();
    t
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

/// Lays out every table from [`ACPI_START`]; returns (address, bytes) pairs, RSDP first.
pub fn tables(cpus: u8) -> Result<Vec<(u64, Vec<u8>)>, Error> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = ACPI_START + 64; // the RSDP goes first, at ACPI_START
    let mut place = |bytes: Vec<u8>, out: &mut Vec<(u64, Vec<u8>)>| {
        let addr = next;
        next = (next + bytes.len() as u64 + 15) & !15;
        out.push((addr, bytes));
        addr
    };
    let dsdt = place(dsdt().as_slice().to_vec(), &mut out);
    let fadt = place(fadt(dsdt).as_slice().to_vec(), &mut out);
    let madt = place(madt(cpus).as_slice().to_vec(), &mut out);
    let mcfg = place(mcfg().as_slice().to_vec(), &mut out);
    let xsdt = place(xsdt(&[fadt, madt, mcfg]).as_slice().to_vec(), &mut out);
    if next > ACPI_END {
        return Err(Error::Config("ACPI tables do not fit".into()));
    }
    out.insert(0, (ACPI_START, rsdp(xsdt).to_vec()));
    Ok(out)
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn write_tables(mem: &GuestMemoryMmap, cpus: u8) -> Result<u64, Error> {
    for (addr, bytes) in tables(cpus)? {
        mem.write_slice(&bytes, GuestAddress(addr))?;
    }
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let d = dsdt();
        let b = d.as_slice();
        let has = |bytes: &[u8]| b.windows(bytes.len()).any(|w| w == bytes);
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
        let m = mcfg();
        assert_eq!(u64_at(m.as_slice(), 44), ECAM_START);
    }
}
