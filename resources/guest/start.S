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

	.section .rodata
	.balign 8
null_idt:
	.word 0
	.long 0

	.section .bss
	.balign 16
stack:
	.skip 16384
stack_top:
