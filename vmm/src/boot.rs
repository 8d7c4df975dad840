//! Loading a kernel and describing the machine to it: the zero page (Linux boot protocol), the
//! PVH start info, the e820 map, the command line and the initrd.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;
use crate::Error;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
/// e820 reserved.
pub const E820_RESERVED: u32 = 2;

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit long mode at `rip`, RSI = zero page (bzImage or ELF vmlinux without PVH).
    Linux64 {
        /// Entry point.
        rip: u64,
    },
    /// 32-bit protected mode at `rip`, EBX = PVH start info.
    Pvh {
        /// Entry point.
        rip: u64,
    },
}

/// A loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// How to enter it.
    pub entry: Entry,
    /// First guest address after the kernel image.
    pub end: u64,
    /// The bzImage setup header, when it was one.
    pub header: Option<setup_header>,
}

/// An e820 entry (our own copy, so the map can be built and tested without boot_params).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The e820 map of a guest with `mem_size` bytes of RAM (ECAM of bus 0 reserved).
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    e820_map_with(mem_size, ECAM_SIZE)
}

/// The e820 map of a guest with `mem_size` bytes of RAM and an ECAM window of `ecam_size`
/// bytes (see [`crate::layout::ecam_size`]).
pub fn e820_map_with(mem_size: u64, ecam_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in ram_ranges(mem_size) {
        let start = start.max(HIMEM_START);
        let end = if start >= HIGH_RAM_START {
            start + size
        } else {
            size
        };
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map.push(E820Entry {
        addr: ECAM_START,
        size: ecam_size,
        kind: E820_RESERVED,
    });
    map.sort_by_key(|e| e.addr);
    map
}

/// Where the initrd goes: page-aligned at the top of low memory (below `addr_max`, the
/// kernel's `initrd_addr_max`), above the kernel.
pub fn initrd_address(
    mem_size: u64,
    initrd_size: u64,
    kernel_end: u64,
    addr_max: u64,
) -> Result<u64, Error> {
    let low_top = mem_size.min(LOW_RAM_END).min(addr_max.saturating_add(1));
    let too_big = || Error::InitrdTooLarge {
        size: initrd_size,
        mem: mem_size,
    };
    let addr = low_top.checked_sub(initrd_size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    Ok(addr)
}

/// Loads the kernel at `path` into guest memory: an ELF (PVH entry when it carries the Xen PVH
/// note) or a bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, Error> {
    let open_err = |e: std::io::Error| Error::Kernel {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut f = File::open(path).map_err(open_err)?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(open_err)?;
    f.seek(SeekFrom::Start(0)).map_err(open_err)?;
    let bad = |reason: String| Error::Kernel {
        path: path.display().to_string(),
        reason,
    };
    if n == 4 && magic == *b"\x7fELF" {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| bad(format!("cannot load ELF kernel: {e}")))?;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => Entry::Pvh { rip: a.0 },
            _ => Entry::Linux64 {
                rip: r.kernel_load.0,
            },
        };
        return Ok(LoadedKernel {
            entry,
            end: r.kernel_end,
            header: None,
        });
    }
    let r = BzImage::load(
        mem,
        Some(GuestAddress(HIMEM_START)),
        &mut f,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| bad(format!("not an ELF or bzImage kernel ({e})")))?;
    Ok(LoadedKernel {
        // The 64-bit entry point of a bzImage is 0x200 past the start of its protected-mode code.
        entry: Entry::Linux64 {
            rip: r.kernel_load.0 + 0x200,
        },
        end: r.kernel_end,
        header: r.setup_header,
    })
}

/// The boot_params (zero page) for a 64-bit Linux entry.
pub fn zero_page(
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp: u64,
) -> boot_params {
    let mut params = boot_params {
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    params.hdr = header.unwrap_or_else(|| {
        // An ELF vmlinux has no setup header: fill in what the boot protocol requires.
        setup_header {
            boot_flag: 0xaa55,
            header: 0x5372_6448, // "HdrS"
            kernel_alignment: 0x0100_0000,
            ..Default::default()
        }
    });
    params.hdr.type_of_loader = 0xff;
    params.hdr.loadflags |= 0x01; // LOADED_HIGH
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    params
}

/// Writes the PVH start info, memory map and module list (the initrd) for a PVH entry.
pub fn write_pvh_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp: u64,
) -> Result<(), Error> {
    const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&(initrd.is_some() as u32).to_le_bytes()); // nr_modules
    info.extend_from_slice(&PVH_MODLIST.to_le_bytes());
    info.extend_from_slice(&CMDLINE.to_le_bytes());
    info.extend_from_slice(&rsdp.to_le_bytes());
    info.extend_from_slice(&PVH_MEMMAP.to_le_bytes());
    info.extend_from_slice(&(e820.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&info, GuestAddress(PVH_INFO))?;

    let mut map = Vec::with_capacity(e820.len() * 24);
    for e in e820 {
        map.extend_from_slice(&e.addr.to_le_bytes());
        map.extend_from_slice(&e.size.to_le_bytes());
        map.extend_from_slice(&e.kind.to_le_bytes());
        map.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&map, GuestAddress(PVH_MEMMAP))?;

    if let Some((addr, size)) = initrd {
        let mut m = Vec::with_capacity(32);
        m.extend_from_slice(&addr.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(&[0u8; 16]);
        mem.write_slice(&m, GuestAddress(PVH_MODLIST))?;
    }
    Ok(())
}

/// The only "firmware" we have: real-mode code at the reset vector that resets the machine
/// through the i8042 (`mov al, 0xfe; out 0x64, al; hlt; jmp $-1`).
///
/// Linux on a hardware-reduced ACPI machine without EFI reboots by jumping to the BIOS reset
/// vector (its EFI reboot falls back to BOOT_BIOS); with this stub that ends in a reset the VMM
/// sees, instead of a vCPU running through zeroed memory forever.
pub const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Writes [`RESET_STUB`] at [`RESET_VECTOR`].
pub fn write_reset_vector(mem: &GuestMemoryMmap) -> Result<(), Error> {
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))?;
    Ok(())
}

/// Writes the NUL-terminated command line.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), Error> {
    if cmdline.len() >= CMDLINE_MAX || cmdline.contains('\0') {
        return Err(Error::Cmdline(format!(
            "the command line must be under {CMDLINE_MAX} bytes and contain no NUL"
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn e820_for_small_guest() {
        let map = e820_map(256 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: ACPI_START,
                    size: 0x20000,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: 255 * MIB,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: ECAM_START,
                    size: ECAM_SIZE,
                    kind: E820_RESERVED
                },
            ]
        );
    }

    #[test]
    fn e820_for_large_guest_moves_ram_above_4g() {
        let map = e820_map(4096 * MIB);
        let ram: Vec<_> = map.iter().filter(|e| e.kind == E820_RAM).collect();
        assert_eq!(ram.len(), 3);
        assert_eq!(ram[1].addr + ram[1].size, LOW_RAM_END);
        assert_eq!(ram[2].addr, HIGH_RAM_START);
        assert_eq!(ram[2].size, 4096 * MIB - LOW_RAM_END);
        let total: u64 = ram.iter().map(|e| e.size).sum();
        assert_eq!(total, 4096 * MIB - HIMEM_START + EBDA_START);
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory_page_aligned() {
        let a = initrd_address(256 * MIB, 10 * MIB + 5, 20 * MIB, u64::MAX).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 10 * MIB + 5 <= 256 * MIB);
        assert!(256 * MIB - (a + 10 * MIB + 5) < 4096);
        // initrd_addr_max caps it.
        let a = initrd_address(256 * MIB, MIB, 20 * MIB, 0x7fff_ffff).unwrap();
        assert!(a + MIB <= 256 * MIB);
        let a = initrd_address(4096 * MIB, MIB, 20 * MIB, 0x7fff_ffff).unwrap();
        assert_eq!(a, 0x8000_0000 - MIB);
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        assert!(initrd_address(64 * MIB, 65 * MIB, 2 * MIB, u64::MAX).is_err());
        // Fits in RAM but would overlap the kernel.
        assert!(initrd_address(64 * MIB, 60 * MIB, 10 * MIB, u64::MAX).is_err());
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_e820_and_rsdp() {
        let e820 = e820_map(256 * MIB);
        let p = zero_page(None, 12, Some((0x800_0000, 0x1234)), &e820, ACPI_START);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE as u32);
        assert_eq!({ p.hdr.cmdline_size }, 12);
        assert_eq!({ p.hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(p.e820_entries as usize, e820.len());
        assert_eq!({ p.e820_table[2].addr }, HIMEM_START);
        assert_eq!({ p.e820_table[2].r#type }, E820_RAM);
    }

    #[test]
    fn cmdline_is_nul_terminated_and_bounded() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_cmdline(&mem, "console=ttyS0").unwrap();
        let mut buf = [0xffu8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert!(write_cmdline(&mem, &"x".repeat(CMDLINE_MAX)).is_err());
        assert!(write_cmdline(&mem, "a\0b").is_err());
    }
}
