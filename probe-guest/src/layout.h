/* Constants shared by the assembly boot code and the C code. */
#ifndef PROBE_LAYOUT_H
#define PROBE_LAYOUT_H

#define SEL_CODE32 0x08
#define SEL_DATA 0x10
#define SEL_CODE64 0x18

/* CPUs beyond this many are started but parked (no stack, no work). */
#define MAX_CPUS 64
#define STACK_SHIFT 14
#define STACK_SIZE (1 << STACK_SHIFT)

/* Real-mode AP trampoline: SIPI vector 0x08 starts APs at 0x8000. */
#define TRAMPOLINE_PADDR 0x8000
#define SIPI_VECTOR (TRAMPOLINE_PADDR >> 12)

/* The VMM's PCI hot-plug controller: one 4 KiB page of 32-bit registers (hotplug.c). */
#define PCI_HOTPLUG_PADDR 0xfeb00000

#endif
