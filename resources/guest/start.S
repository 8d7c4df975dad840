/*
 * PVH entry for the probe guest.
 *
 * Entered in 32-bit protected mode, flat segments, paging off, interrupts
 * off, EBX = physical address of struct hvm_start_info (Xen PVH ABI).
 * No int3/int n, no SSE/XSAVE: this machine's KVM (PVM) emulates every
 * kernel-mode instruction and fails on those.
 */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4			/* n_namesz: "Xen\0" */
	.long 4			/* n_descsz */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long _start		/* 32-bit physical entry point */
	.balign 4

	.section .text.start, "ax"
	.code32
	.globl _start
_start:
	cli
	cld
	movl	$stack_top, %esp
	xorl	%ebp, %ebp
	pushl	%ebx			/* hvm_start_info * */
	call	probe_main
	/* probe_main does not return; fall through to the final stop */
	.globl	probe_stop
probe_stop:
	cli
	movb	$0xfe, %al		/* i8042: pulse reset line */
	outb	%al, $0x64
	lidt	null_idt		/* fallback: triple fault */
	ud2
1:	hlt
	jmp	1b

/*
 * void enter_user(void (*fn)(void *), void *arg, void *stack_top)
 * Switch to CPL3 (via sysexit) with IOPL=3 (port I/O allowed) and interrupts off, call
 * fn(arg) on stack_top; fn returns into probe_stop (its outb to 0x64 is
 * allowed at IOPL 3). On this machine's PVM KVM, CPL3 code runs natively
 * instead of through KVM's instruction emulator.
 */
	.globl	enter_user
enter_user:
	lgdt	gdt_desc
	movl	4(%esp), %ecx		/* fn */
	movl	8(%esp), %edx		/* arg */
	movl	12(%esp), %eax		/* user stack top */
	movl	%edx, -4(%eax)		/* fn's argument */
	movl	$probe_stop, -8(%eax)	/* fn's return address */
	subl	$8, %eax
	movw	$0x23, %dx		/* user data, RPL 3 */
	movw	%dx, %ds
	movw	%dx, %es
	movw	%dx, %fs
	movw	%dx, %gs
	/*
	 * KVM's instruction emulator (which runs all our CPL0 code on PVM)
	 * cannot iret or lret to an outer privilege level, but it does
	 * emulate sysexit: CS = SYSENTER_CS + 16 (0x1b), SS = CS + 8 (0x23),
	 * EIP = EDX, ESP = ECX. EFLAGS are kept, so set IOPL first.
	 */
	movl	%eax, %esi		/* user stack */
	movl	%ecx, %edi		/* fn */
	pushl	$0x3002			/* EFLAGS: IOPL=3, IF=0 */
	popfl
	movl	$0x174, %ecx		/* IA32_SYSENTER_CS */
	movl	$0x08, %eax
	xorl	%edx, %edx
	wrmsr
	movl	%esi, %ecx
	movl	%edi, %edx
	sysexit

	.section .rodata
	.balign 8
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff	/* 0x08 kernel code */
	.quad 0x00cf92000000ffff	/* 0x10 kernel data */
	.quad 0x00cffa000000ffff	/* 0x18 user code (DPL 3) */
	.quad 0x00cff2000000ffff	/* 0x20 user data (DPL 3) */
gdt_end:
	.balign 8
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt
	.balign 8
null_idt:
	.word 0
	.long 0

	.section .bss
	.balign 16
stack:
	.skip 16384
stack_top:
	.globl	user_stack_top
user_stack:
	.skip 4096
user_stack_top:
