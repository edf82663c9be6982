/*
 * PVH entry (32-bit protected mode, paging off, EBX = hvm_start_info),
 * the switch to long mode, the AP real-mode trampoline and the exception
 * stubs. Everything else is C.
 */
#include "layout.h"

/* XEN_ELFNOTE_PHYS32_ENTRY: name "Xen", type 18, desc = 32-bit entry. */
	.section .note.Xen, "a"
	.balign 4
	.long 4
	.long 4
	.long 18
	.asciz "Xen"
	.long pvh_entry

/*
 * Four zero bytes right after the note in the file: QEMU reads the desc
 * of a 64-bit ELF as 8 bytes, so the upper half must be zero.
 */
	.section .pvh_pad, "a", @progbits
	.long 0

.macro ENTER_LONG_MODE target
	/* %eax = CR3 on entry. */
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax			/* CR4.PAE */
	movl %eax, %cr4
	movl $0xC0000080, %ecx		/* IA32_EFER */
	rdmsr
	orl $0x100, %eax		/* EFER.LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax		/* CR0.PG | CR0.PE */
	movl %eax, %cr0
	ljmpl $SEL_CODE64, $\target
.endm

.macro LOAD_DATA_SEGMENTS
	movw $SEL_DATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
.endm

	.section .text.boot, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	cli
	cld
	movl %ebx, %esi			/* keep start_info across setup */
	lgdtl gdt_ptr
	ljmpl $SEL_CODE32, $1f
1:	LOAD_DATA_SEGMENTS

	/* Zero .bss: loaders need not, and RAM is not zero after reboot. */
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	shrl $2, %ecx
	xorl %eax, %eax
	rep stosl

	/* Boot page tables: identity map 0-4 GiB with 2 MiB pages. */
	movl $boot_pd, %edi
	movl $0x83, %eax		/* present, writable, 2 MiB */
	movl $2048, %ecx
2:	movl %eax, (%edi)
	movl $0, 4(%edi)
	addl $0x200000, %eax
	addl $8, %edi
	loop 2b
	movl $boot_pdpt, %edi
	movl $boot_pd + 3, %eax
	movl $4, %ecx
3:	movl %eax, (%edi)
	addl $4096, %eax
	addl $8, %edi
	loop 3b
	movl $boot_pdpt + 3, boot_pml4
	movl $boot_pml4, %eax
	ENTER_LONG_MODE bsp_entry64

	.code64
bsp_entry64:
	LOAD_DATA_SEGMENTS
	leaq cpu_stacks + STACK_SIZE(%rip), %rsp
	movl %esi, %edi
	call probe_main
4:	cli
	hlt
	jmp 4b

/*
 * AP real-mode trampoline, copied to TRAMPOLINE_PADDR. Starts with
 * CS = TRAMPOLINE_PADDR >> 4, IP = 0; only reaches protected mode and
 * jumps into the image, which is above 1 MiB.
 */
	.code16
	.balign 16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl ap_tramp_gdtr - ap_tramp_start
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $SEL_CODE32, $ap_entry32
	.balign 8
ap_tramp_gdtr:
	.word gdt_end - gdt - 1
	.long gdt
ap_tramp_end:

	.code32
ap_entry32:
	LOAD_DATA_SEGMENTS
	movl final_cr3, %eax
	ENTER_LONG_MODE ap_entry64

	.code64
ap_entry64:
	LOAD_DATA_SEGMENTS
	movl $1, %eax
	lock xaddl %eax, ap_next_index(%rip)
	cmpl $MAX_CPUS, %eax
	jae 6f
	movl %eax, %edi
	leaq 1(%rdi), %rax
	shlq $STACK_SHIFT, %rax
	leaq cpu_stacks(%rip), %rsp
	addq %rax, %rsp
	call ap_main
6:	cli
	hlt
	jmp 6b

/* 32 exception stubs, 16 bytes apart: push (error code or 0), vector. */
	.text
	.balign 16
	.globl exc_stubs
exc_stubs:
	.set vec, 0
	.rept 32
	.balign 16
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp exc_common
	.set vec, vec + 1
	.endr

exc_common:
	movq %rsp, %rdi
	andq $-16, %rsp
	call probe_exception
7:	cli
	hlt
	jmp 7b

	.data
	.balign 16
gdt:
	.quad 0
	.quad 0x00CF9B000000FFFF	/* SEL_CODE32 */
	.quad 0x00CF93000000FFFF	/* SEL_DATA */
	.quad 0x00AF9B000000FFFF	/* SEL_CODE64 */
gdt_end:
	.balign 8
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt

	.bss
	.balign 4096
	.globl boot_pml4, boot_pdpt, boot_pd, cpu_stacks
boot_pml4:
	.skip 4096
boot_pdpt:
	.skip 4096
boot_pd:
	.skip 4 * 4096
cpu_stacks:
	.skip MAX_CPUS * STACK_SIZE
