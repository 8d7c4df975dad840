//! x86 vCPU set-up: CPUID, MSRs, FPU, LAPIC and the registers of the boot entry.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::Entry;
use crate::layout::*;
use crate::Error;

/// Filters the host-supported CPUID for vCPU `id` of `count`.
///
/// XSAVE and everything whose state lives only in XSAVE areas (AVX, AVX-512, AMX, PKU, PT) is
/// hidden, and leaf 0xD cleared: nested setups (KVM under TCG) report an XSAVE leaf that
/// disagrees with XCR0, and a consistent FXSAVE-only picture boots everywhere.
pub fn filter_cpuid(cpuid: &mut CpuId, id: u8, count: u8) {
    for e in cpuid.as_mut_slice() {
        match (e.function, e.index) {
            (0x1, _) => {
                // Initial APIC id, logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                // Hypervisor present; no XSAVE/OSXSAVE/AVX/FMA/F16C.
                e.ecx |= 1 << 31;
                e.ecx &= !((1 << 26) | (1 << 27) | (1 << 28) | (1 << 12) | (1 << 29));
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count in ebx is valid
                }
            }
            (0x7, 0) => {
                // AVX2, AVX-512 family, Intel PT.
                e.ebx &= !((1 << 5)
                    | (1 << 16)
                    | (1 << 17)
                    | (1 << 21)
                    | (1 << 25)
                    | (1 << 26)
                    | (1 << 27)
                    | (1 << 28)
                    | (1 << 30)
                    | (1 << 31));
                // PKU/OSPKE, AVX-512 VBMI/VBMI2/VNNI/BITALG/VPOPCNTDQ, VAES, VPCLMULQDQ.
                e.ecx &= !((1 << 1)
                    | (1 << 3)
                    | (1 << 4)
                    | (1 << 6)
                    | (1 << 9)
                    | (1 << 10)
                    | (1 << 11)
                    | (1 << 12)
                    | (1 << 14));
                // AVX-512 4VNNIW/4FMAPS/VP2INTERSECT/FP16, AMX.
                e.edx &= !((1 << 2) | (1 << 3) | (1 << 8) | (1 << 22) | (1 << 23) | (1 << 24));
                e.edx &= !(1 << 25);
            }
            (0x7, 1) => {
                // AVX-VNNI, AVX512_BF16, and the rest of the AVX additions.
                e.eax &= !((1 << 4) | (1 << 5) | (1 << 23));
            }
            (0xb, _) | (0x1f, _) => {
                e.edx = u32::from(id);
            }
            (0xd, _) | (0x14, _) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

/// The MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, 1),          // fast strings
        e(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs enabled, default write-back
    ]
}

/// Sets the boot MSRs, checking that KVM took every one.
pub fn set_msrs(vcpu: &VcpuFd) -> Result<(), Error> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Vcpu(format!("msrs: {e:?}")))?;
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(crate::kvm_err("KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(Error::Vcpu(format!(
            "KVM_SET_MSRS set {n} of {} MSRs; MSR {:#x} was refused",
            entries.len(),
            entries[n].index
        )));
    }
    Ok(())
}

/// FPU defaults (x87 control word and MXCSR as after FINIT/reset).
pub fn set_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(crate::kvm_err("KVM_SET_FPU"))
}

/// LAPIC LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware leaves them.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(crate::kvm_err("KVM_GET_LAPIC"))?;
    let set = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as std::os::raw::c_char;
        }
    };
    set(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(crate::kvm_err("KVM_SET_LAPIC"))
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn gdt_entry(seg: &kvm_segment) -> u64 {
    let base = seg.base;
    let limit = u64::from(seg.limit >> 12);
    (base & 0xff00_0000) << 32
        | (base & 0x00ff_ffff) << 16
        | (limit & 0x000f_0000) << 32
        | (limit & 0xffff)
        | u64::from(seg.g) << 55
        | u64::from(seg.db) << 54
        | u64::from(seg.l) << 53
        | u64::from(seg.present) << 47
        | u64::from(seg.dpl) << 45
        | u64::from(seg.s) << 44
        | u64::from(seg.type_) << 40
}

/// Sets up the boot vCPU's registers for `entry`: flat segments, and for the 64-bit entry an
/// identity map of the first GiB.
pub fn set_boot_registers(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: Entry) -> Result<(), Error> {
    let vcpu_err = |what: &str, source: kvm_ioctls::Error| Error::Kvm {
        what: what.to_string(),
        source,
    };
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|e| vcpu_err("KVM_GET_SREGS", e))?;
    let long = matches!(entry, Entry::Linux64 { .. });
    let code = segment(0x10, 0xb, long);
    let data = segment(0x18, 0x3, false);
    let gdt = [0u64, 0, gdt_entry(&code), gdt_entry(&data)];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT))?;
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Pvh { rip } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rbx = PVH_INFO;
        }
        Entry::Linux64 { rip } => {
            // PML4[0] -> PDPT, PDPT[0] -> PD, PD: 512 x 2 MiB identity pages.
            mem.write_obj(PDPT | 0x3, GuestAddress(PML4))?;
            mem.write_obj(PD | 0x3, GuestAddress(PDPT))?;
            for i in 0..512u64 {
                mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))?;
            }
            sregs.cr3 = PML4;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsi = ZERO_PAGE;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| vcpu_err("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| vcpu_err("KVM_SET_REGS", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_flat_segments() {
        // The classic flat 64-bit code segment and 32-bit data segment descriptors.
        assert_eq!(gdt_entry(&segment(0x10, 0xb, true)), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(&segment(0x18, 0x3, false)), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(&segment(0x10, 0xb, false)), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn cpuid_filter_hides_xsave_and_sets_apic_id() {
        let mut cpuid = CpuId::new(3).unwrap();
        {
            let s = cpuid.as_mut_slice();
            s[0].function = 1;
            s[0].ecx = (1 << 26) | (1 << 27) | (1 << 28);
            s[0].ebx = 0xffff_ffff;
            s[1].function = 0xd;
            s[1].eax = 7;
            s[2].function = 7;
            s[2].ebx = 1 << 5;
        }
        filter_cpuid(&mut cpuid, 3, 4);
        let s = cpuid.as_slice();
        assert_eq!(s[0].ecx & ((1 << 26) | (1 << 27) | (1 << 28)), 0);
        assert_ne!(s[0].ecx & (1 << 31), 0);
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[1].eax, 0);
        assert_eq!(s[2].ebx, 0);
    }
}
