/* CPU and platform plumbing: TSC, paging, IDT, ACPI MADT, INIT-SIPI, reset. */
#include "probe.h"

#define PIT_HZ 1193182ULL
#define PIT_WINDOW_MS 10
#define PIT_MAX_WINDOWS 21
#define PTE_PRESENT 0x1ULL
#define PTE_WRITE 0x2ULL
#define PTE_PWT 0x8ULL
#define PTE_PCD 0x10ULL
#define PTE_LARGE 0x80ULL
#define MAX_GIB_2M 64
#define MAX_GIB_1G 512

u32 final_cr3;
volatile u32 ap_next_index;

static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 pds[MAX_GIB_2M][512] __attribute__((aligned(4096)));

struct idt_gate {
	u16 off_lo;
	u16 sel;
	u8 ist;
	u8 type;
	u16 off_mid;
	u32 off_hi;
	u32 zero;
} __attribute__((packed));

/* 32 exception gates, then interrupt vectors a driver claims (idt_set_handler). */
static struct idt_gate idt[256] __attribute__((aligned(16)));
extern char exc_stubs[];

void delay_us(u64 us, u64 tsc_khz)
{
	u64 start = rdtsc();
	u64 ticks = us * tsc_khz / 1000;
	while (rdtsc() - start < ticks)
		cpu_relax();
}

/* TSC ticks per PIT_WINDOW_MS of PIT input clock, or 0 if no PIT seen. */
static u64 pit_window_limit(void)
{
	/* The window at 20 GHz, so a PIT that never moves cannot hang us. */
	return 20000000ULL * PIT_WINDOW_MS;
}

/* Channel 2 one-shot with the gate on port 0x61; OUT2 is bit 5 of 0x61. */
static u64 pit_ch2_window(void)
{
	const u32 count = (u32)(PIT_HZ * PIT_WINDOW_MS / 1000);
	u8 port61 = inb(0x61);

	outb(0x61, port61 & ~0x03);		/* gate off, speaker off */
	outb(0x43, 0xb0);			/* ch2, lo/hi, mode 0, binary */
	outb(0x42, count & 0xff);
	outb(0x42, count >> 8);
	outb(0x61, (port61 & ~0x02) | 0x01);	/* gate on: counting starts */
	u64 t0 = rdtsc();
	u64 t1;
	for (;;) {
		t1 = rdtsc();
		if (inb(0x61) & 0x20)
			break;
		if (t1 - t0 > pit_window_limit())
			return 0;
	}
	outb(0x61, port61 & ~0x03);
	return t1 - t0;
}

static u16 pit_ch0_read(void)
{
	outb(0x43, 0x00);	/* latch channel 0 */
	u8 lo = inb(0x40);
	u8 hi = inb(0x40);
	return (u16)(lo | (hi << 8));
}

/* Channel 0 free-running (mode 2, period 65536) polled through the latch. */
static u64 pit_ch0_window(void)
{
	const u32 count = (u32)(PIT_HZ * PIT_WINDOW_MS / 1000);
	outb(0x43, 0x34);	/* ch0, lo/hi, mode 2, binary */
	outb(0x40, 0);
	outb(0x40, 0);
	pit_ch0_read();		/* let the new count load */
	u16 prev = pit_ch0_read();
	u64 t0 = rdtsc();
	u32 elapsed = 0;
	for (;;) {
		u16 cur = pit_ch0_read();
		u64 t1 = rdtsc();
		elapsed += (u16)(prev - cur);	/* counts down, wraps at 65536 */
		prev = cur;
		if (elapsed >= count)
			return (t1 - t0) * count / elapsed;
		if (t1 - t0 > pit_window_limit())
			return 0;
	}
}

/*
 * Host load makes single windows wrong in both directions (seen under TCG),
 * so take windows until three agree within 0.1%; else use the median.
 */
static u64 pit_calibrate_khz(u64 (*window)(void))
{
	u64 s[PIT_MAX_WINDOWS];
	u32 n = 0;
	u64 ticks = 0;
	while (n < PIT_MAX_WINDOWS && !ticks) {
		u64 t = window();
		if (!t)
			return 0;
		/* Insertion sort: agreeing windows end up adjacent. */
		u32 j = n++;
		while (j && s[j - 1] > t) {
			s[j] = s[j - 1];
			j--;
		}
		s[j] = t;
		for (u32 i = 0; i + 2 < n && !ticks; i++)
			if ((s[i + 2] - s[i]) * 1000 <= s[i + 2])
				ticks = s[i + 1];
	}
	if (!ticks)
		ticks = s[n / 2];
	u64 khz = ticks / PIT_WINDOW_MS;
	/* Below 100 MHz means no PIT (port 0x61 read as 0xff) or garbage. */
	return khz < 100000 ? 0 : khz;
}

void tsc_calibrate(struct tsc_info *out)
{
	u32 a, b, c, d;
	out->khz = 0;
	out->source = "default";
	const char *pit_source = "pit";
	out->pit_khz = pit_calibrate_khz(pit_ch2_window);
	if (!out->pit_khz) {
		/* No port 0x61 (e.g. QEMU microvm): poll channel 0 instead. */
		pit_source = "pit_ch0";
		out->pit_khz = pit_calibrate_khz(pit_ch0_window);
	}

	cpuid(1, 0, &a, &b, &c, &d);
	if (c & (1U << 31)) {	/* hypervisor present */
		cpuid(0x40000000, 0, &a, &b, &c, &d);
		if (a >= 0x40000010 && a < 0x40010000) {
			cpuid(0x40000010, 0, &a, &b, &c, &d);
			if (a) {
				out->khz = a;
				out->source = "cpuid40000010";
				return;
			}
		}
	}
	cpuid(0, 0, &a, &b, &c, &d);
	if (a >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);
		if (a && b && c) {
			out->khz = (u64)c * b / a / 1000;
			out->source = "cpuid15";
			return;
		}
	}
	if (out->pit_khz) {
		out->khz = out->pit_khz;
		out->source = pit_source;
		return;
	}
	out->khz = 2000000;	/* documented fallback: 2 GHz */
}

bool cpu_has_gib_pages(void)
{
	u32 a, b, c, d;
	cpuid(0x80000000, 0, &a, &b, &c, &d);
	if (a < 0x80000001)
		return false;
	cpuid(0x80000001, 0, &a, &b, &c, &d);
	return d & (1U << 26);
}

static bool overlaps_ram(const struct ram_map *ram, u64 start, u64 size)
{
	for (u32 i = 0; i < ram->count; i++)
		if (ram->r[i].start < start + size && start < ram->r[i].end)
			return true;
	return false;
}

/*
 * Identity map [0, max(4 GiB, top of RAM)) and switch to it. Large pages
 * without RAM (the MMIO hole, LAPIC) are uncached. Returns the mapped size.
 */
u64 paging_init(const struct ram_map *ram, bool gib_pages)
{
	u64 top = 4 * GIB;
	for (u32 i = 0; i < ram->count; i++)
		if (ram->r[i].end > top)
			top = ram->r[i].end;
	u64 ngib = (top + GIB - 1) / GIB;
	u64 max = gib_pages ? MAX_GIB_1G : MAX_GIB_2M;
	if (ngib > max)
		ngib = max;

	pml4[0] = (u64)(uintptr_t)pdpt | PTE_PRESENT | PTE_WRITE;
	for (u64 g = 0; g < ngib; g++) {
		u64 base = g * GIB;
		if (gib_pages) {
			u64 cache = overlaps_ram(ram, base, GIB) ? 0 : PTE_PCD | PTE_PWT;
			pdpt[g] = base | PTE_PRESENT | PTE_WRITE | PTE_LARGE | cache;
			continue;
		}
		for (u64 j = 0; j < 512; j++) {
			u64 addr = base + j * 2 * MIB;
			u64 cache = overlaps_ram(ram, addr, 2 * MIB) ? 0 : PTE_PCD | PTE_PWT;
			pds[g][j] = addr | PTE_PRESENT | PTE_WRITE | PTE_LARGE | cache;
		}
		pdpt[g] = (u64)(uintptr_t)pds[g] | PTE_PRESENT | PTE_WRITE;
	}
	final_cr3 = (u32)(uintptr_t)pml4;
	__asm__ volatile("mov %0, %%cr3" : : "r"((u64)final_cr3) : "memory");
	return ngib * GIB;
}

static void idt_set(u32 v, u64 a)
{
	idt[v].off_lo = (u16)a;
	idt[v].sel = SEL_CODE64;
	idt[v].ist = 0;
	idt[v].off_mid = (u16)(a >> 16);
	idt[v].off_hi = (u32)(a >> 32);
	idt[v].zero = 0;
	__atomic_store_n(&idt[v].type, 0x8e, __ATOMIC_RELEASE);
}

/* Points interrupt vector `v` (32..255) at `handler`, which must end in iretq. */
void idt_set_handler(u8 v, void (*handler)(void))
{
	if (v >= 32)
		idt_set(v, (u64)(uintptr_t)handler);
}

void idt_load(void)
{
	if (!idt[0].type) {
		for (u32 v = 0; v < 32; v++)
			idt_set(v, (u64)(uintptr_t)(exc_stubs + 16 * v));
	}
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)(uintptr_t)idt };
	__asm__ volatile("lidt %0" : : "m"(idtr));
}

struct exc_frame {
	u64 vector;
	u64 error;
	u64 rip;
	u64 cs;
	u64 rflags;
	u64 rsp;
	u64 ss;
};

void probe_exception(struct exc_frame *f);
void probe_exception(struct exc_frame *f)
{
	u64 cr2;
	struct line l;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	line_start(&l, "panic");
	line_kv_dec(&l, "vector", f->vector);
	line_kv_hex(&l, "error", f->error);
	line_kv_hex(&l, "rip", f->rip);
	line_kv_hex(&l, "rsp", f->rsp);
	line_kv_hex(&l, "cr2", cr2);
	line_emit(&l);
}

static bool checksum_ok(const u8 *p, u32 len)
{
	u8 sum = 0;
	for (u32 i = 0; i < len; i++)
		sum += p[i];
	return sum == 0;
}

static u64 rsdp_scan(void)
{
	for (u64 a = 0xe0000; a < 0x100000; a += 16) {
		const char *p = (const char *)(uintptr_t)a;
		if (p[0] == 'R' && p[1] == 'S' && p[2] == 'D' && p[3] == ' ' && p[4] == 'P' &&
		    p[5] == 'T' && p[6] == 'R' && p[7] == ' ' && checksum_ok((const u8 *)p, 20))
			return a;
	}
	return 0;
}

static u32 madt_count(u64 madt)
{
	u32 len = phys_rd32(madt + 4);
	u32 n = 0;
	if (len > 64 * 1024)
		return 0;
	for (u64 p = madt + 44; p + 2 <= madt + len;) {
		u8 type = *(const u8 *)(uintptr_t)p;
		u8 elen = *(const u8 *)(uintptr_t)(p + 1);
		if (elen < 2)
			break;
		if (type == 0 && elen >= 8 && (phys_rd32(p + 4) & 1))
			n++;
		if (type == 9 && elen >= 16 && (phys_rd32(p + 8) & 1))
			n++;
		p += elen;
	}
	return n;
}

/* Enabled CPUs in the ACPI MADT, or 0 when there is no usable ACPI. */
static u32 acpi_count_cpus(u64 rsdp)
{
	if (!rsdp)
		rsdp = rsdp_scan();
	if (!rsdp || rsdp >= 4 * GIB || phys_rd64(rsdp) != 0x2052545020445352ULL)
		return 0;
	u8 rev = *(const u8 *)(uintptr_t)(rsdp + 15);
	u64 xsdt = rev >= 2 ? phys_rd64(rsdp + 24) : 0;
	u64 sdt = xsdt ? xsdt : phys_rd32(rsdp + 16);
	u32 esz = xsdt ? 8 : 4;
	if (!sdt || sdt >= 4 * GIB)
		return 0;
	u32 len = phys_rd32(sdt + 4);
	if (len < 36 || len > 64 * 1024)
		return 0;
	for (u64 p = sdt + 36; p + esz <= sdt + len; p += esz) {
		u64 t = esz == 8 ? phys_rd64(p) : phys_rd32(p);
		if (t && t < 4 * GIB && phys_rd32(t) == 0x43495041) /* "APIC" */
			return madt_count(t);
	}
	return 0;
}

static u64 mp_scan(u64 start, u64 len)
{
	for (u64 a = start; a + 16 <= start + len; a += 16)
		if (phys_rd32(a) == 0x5f504d5f && checksum_ok((const u8 *)(uintptr_t)a, 16)) /* "_MP_" */
			return a;
	return 0;
}

/* Enabled processor entries of the Intel MP configuration table, or 0. */
static u32 mptable_count_cpus(void)
{
	u64 ebda = (u64)(phys_rd32(0x40c) >> 16) << 4;	/* BDA word at 0x40e */
	u64 fp = 0;
	if (ebda >= 0x80000 && ebda < 0xa0000)
		fp = mp_scan(ebda, 1024);
	if (!fp)
		fp = mp_scan(0x9fc00, 1024);
	if (!fp)
		fp = mp_scan(0xf0000, 0x10000);
	if (!fp)
		return 0;
	u64 table = phys_rd32(fp + 4);
	if (!table || table >= 4 * GIB || phys_rd32(table) != 0x504d4350) /* "PCMP" */
		return 0;
	u64 end = table + (phys_rd32(table + 4) & 0xffff);
	u32 entries = phys_rd32(table + 34) & 0xffff;
	u32 n = 0;
	u64 p = table + 44;
	for (u32 i = 0; i < entries && p < end; i++) {
		u8 type = *(const u8 *)(uintptr_t)p;
		if (type == 0) {
			if (*(const u8 *)(uintptr_t)(p + 3) & 1)
				n++;
			p += 20;
		} else if (type <= 4) {
			p += 8;
		} else {
			break;
		}
	}
	return n;
}

/* CPUs the firmware tables announce (ACPI MADT first, then the MP table). */
u32 fw_count_cpus(u64 rsdp, const char **source)
{
	u32 n = acpi_count_cpus(rsdp);
	*source = "acpi";
	if (!n) {
		n = mptable_count_cpus();
		*source = "mptable";
	}
	if (!n)
		*source = "none";
	return n;
}

#define MSR_APIC_BASE 0x1b
#define X2APIC_MSR_BASE 0x800
#define LAPIC_IRR 0x200
#define LAPIC_EOI 0xb0

/* Whether this CPU's LAPIC has `vector` pending in its IRR (xAPIC MMIO or x2APIC MSRs). */
bool lapic_irr_pending(u32 vector)
{
	u64 base = rdmsr(MSR_APIC_BASE);
	u32 word;
	if (base & (1ULL << 10)) {
		word = (u32)rdmsr(X2APIC_MSR_BASE + LAPIC_IRR / 0x10 + vector / 32);
	} else {
		volatile u32 *apic = (volatile u32 *)(uintptr_t)(base & 0xffffff000ULL);
		word = apic[(LAPIC_IRR + (vector / 32) * 0x10) / 4];
	}
	return word & (1U << (vector % 32));
}

/* Writes register `reg` (its xAPIC offset) of this CPU's LAPIC (xAPIC MMIO or x2APIC MSR). */
void lapic_write(u32 reg, u32 value)
{
	u64 base = rdmsr(MSR_APIC_BASE);
	if (base & (1ULL << 10)) {
		wrmsr(X2APIC_MSR_BASE + reg / 0x10, value);
	} else {
		volatile u32 *apic = (volatile u32 *)(uintptr_t)(base & 0xffffff000ULL);
		apic[reg / 4] = value;
	}
}

/* Writes this CPU's LAPIC EOI register (xAPIC MMIO or x2APIC MSR). */
void lapic_eoi(void)
{
	lapic_write(LAPIC_EOI, 0);
}

/* Broadcast INIT, SIPI, SIPI to all but self (xAPIC MMIO, or x2APIC MSRs). */
void smp_send_init_sipi(u64 tsc_khz)
{
	u64 base_msr = rdmsr(0x1b);
	bool x2apic = base_msr & (1ULL << 10);
	if (!(base_msr & (1ULL << 11)))
		wrmsr(0x1b, base_msr | (1ULL << 11));
	volatile u32 *apic = (volatile u32 *)(uintptr_t)(base_msr & 0xffffff000ULL);
	const u32 icr_cmds[3] = {
		0x000c4500,			/* INIT, assert, all excluding self */
		0x000c4600 | SIPI_VECTOR,	/* STARTUP */
		0x000c4600 | SIPI_VECTOR,
	};
	const u64 delays_us[3] = { 10000, 200, 200 };

	if (x2apic)
		wrmsr(0x80f, rdmsr(0x80f) | 0x1ff);
	else
		apic[0xf0 / 4] |= 0x1ff;	/* SVR: software enable */
	for (int i = 0; i < 3; i++) {
		if (x2apic) {
			wrmsr(0x830, icr_cmds[i]);
		} else {
			apic[0x310 / 4] = 0;
			apic[0x300 / 4] = icr_cmds[i];
			for (u32 spins = 0; spins < 1000000 && (apic[0x300 / 4] & (1U << 12)); spins++)
				cpu_relax();
		}
		delay_us(delays_us[i], tsc_khz);
	}
}

/* i8042 pulse reset; if that returns, triple-fault with an empty IDT. */
void reboot(void)
{
	outb(0x64, 0xfe);
	for (int i = 0; i < 100000; i++)
		cpu_relax();
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) idtr = { 0, 0 };
	__asm__ volatile("lidt %0; int3" : : "m"(idtr));
	for (;;)
		__asm__ volatile("cli; hlt");
}
