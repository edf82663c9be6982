/* Shared declarations of the probe guest. */
#ifndef PROBE_H
#define PROBE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define PAGE_SIZE 4096ULL
#define MIB (1ULL << 20)
#define GIB (1ULL << 30)
#define MAX_MEMMAP 128
#define MAX_EXTENTS 16

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/*
 * Whether deadline `next`, set at most `period` ticks ahead, is due at `now`. One further ahead
 * was set before the TSC went back (a VM restored on a host whose KVM does not keep a guest's
 * TSC): it is due at once, rather than when the old time comes round again.
 */
static inline bool due(u64 now, u64 next, u64 period)
{
	return now >= next || next - now > period;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

#define load_relaxed(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define store_relaxed(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

/* One RAM range, [start, end). */
struct range {
	u64 start;
	u64 end;
};

/* RAM as reported by the PVH memmap (type 1 only, sorted, clipped). */
struct ram_map {
	struct range r[MAX_MEMMAP];
	u32 count;
	bool from_pvh;
};

/* lib.c */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
size_t strlen(const char *s);
int memcmp(const void *a, const void *b, size_t n);

/* console.c: lines are built in a buffer and written under a lock. */
struct line {
	char buf[1200];
	u32 len;
};
void serial_init(void);
int serial_getc(void);
void line_start(struct line *l, const char *what);
void line_str(struct line *l, const char *s);
void line_dec(struct line *l, u64 v);
void line_hex(struct line *l, u64 v);
void line_kv_dec(struct line *l, const char *key, u64 v);
void line_kv_hex(struct line *l, const char *key, u64 v);
void line_kv_str(struct line *l, const char *key, const char *v);
void line_emit(struct line *l);
void say(const char *msg);

/* platform.c */
struct tsc_info {
	u64 khz;
	const char *source;
	u64 pit_khz;
};
void tsc_calibrate(struct tsc_info *out);
bool cpu_has_gib_pages(void);
u64 paging_init(const struct ram_map *ram, bool gib_pages);
void idt_load(void);
void idt_set_handler(u8 v, void (*handler)(void));
u32 fw_count_cpus(u64 rsdp_paddr, const char **source);
void smp_send_init_sipi(u64 tsc_khz);
bool lapic_irr_pending(u32 vector);
void lapic_eoi(void);
void lapic_write(u32 reg, u32 value);
void reboot(void) __attribute__((noreturn));
/*
 * Work that must not wait for the status loop (net=1, vsock=1: their virtqueues).
 * NULL unless set; called by the BSP between chunks of its page work, and by
 * any CPU while it prints or waits for a virtqueue. Cheap when idle, and safe
 * on any CPU at any time (it takes its own try-lock).
 */
extern void (*volatile io_poll_hook)(void);
/* main.c: adds a poller to io_poll_hook (net.c, vsock.c; at most 4, at boot on the BSP). */
void io_poll_add(void (*fn)(void));
void delay_us(u64 us, u64 tsc_khz);

extern u32 final_cr3;
extern volatile u32 ap_next_index;
extern char __image_start[], __image_end[];

static inline u32 phys_rd32(u64 paddr)
{
	u32 v;
	memcpy(&v, (const void *)(uintptr_t)paddr, 4);
	return v;
}

static inline u64 phys_rd64(u64 paddr)
{
	u64 v;
	memcpy(&v, (const void *)(uintptr_t)paddr, 8);
	return v;
}

/* bootinfo.c: hvm_start_info, memmap and command line. */
/* Command-line options (see README.md). */
struct config {
	u64 fill;
	u64 status_ms;
	u64 reboot_after;
	u64 corrupt_at;
	bool corrupt;
	bool virtio;
	bool blk_io;
	bool userdev;
	bool userdev_ack;	/* userdev_ack=1: take each device MSI, acknowledge it, count it */
	bool userdev_rescan;	/* userdev=2: look for a hot-added device each interval */
	bool edu;	/* edu=1: drive QEMU's edu device (edu.c) */
	bool hotplug;	/* hotplug=1: poll the VMM's PCI hot-plug controller (hotplug.c) */
	bool net;	/* net=1: answer ARP, ping and UDP echo on the virtio-net device (net.c) */
	bool net_ip_set;
	u8 net_ip[4];	/* net_ip=A.B.C.D */
	u64 net_udp_port;	/* net_udp_port=<n>, default 7 */
	bool vsock;	/* vsock=1: drive the virtio-vsock device (vsock.c) */
	u64 vsock_port;	/* vsock_port=<n>: the echo listener's port, default 1234 */
	u64 vsock_connect;	/* vsock_connect=<n>: host port the pattern client connects to; 0 = off */
	u64 vsock_bytes;	/* vsock_bytes=<n>: bytes per client stream; 0 = unlimited */
	bool heartbeat;	/* heartbeat=1: no pattern, every CPU only stamps its TSC (hb_gap_us) */
	u64 heartbeat_us;	/* heartbeat_us=<n>: halt between stamps, woken every n us (0: spin) */
	char unknown[128];
	u32 unknown_len;
};

extern struct config cfg;
extern struct ram_map ram;
bool bootinfo_read(u64 start_info, u64 *rsdp);
void config_parse(void);

/* worker.c: the memory pattern and the per-CPU verify/rewrite loop. */
/* Per-CPU counters, one cache line each; only the owner writes except resets. */
struct cpu_stats {
	u64 passes;
	u64 pages;
	u64 stall_interval_max;	/* TSC ticks; BSP swaps it to 0 per status line */
	u64 stall_boot_max;
	u64 tsc_backwards;
	u64 pad[3];
} __attribute__((aligned(64)));


/* One CPU's position in its slice. */
struct worker {
	u32 cpu;
	u32 ext;
	u64 off;
	u64 done;	/* pages done in this pass */
	u64 gen;
	u64 last_tsc;
	bool owns_corrupt;
	bool hb_timer;	/* heartbeat_us: this CPU's LAPIC timer is set up */
};

extern struct cpu_stats stats[MAX_CPUS];
extern u64 errors;
u64 heartbeat_take(void);
void heartbeat_timer_init(void);
extern struct range extents[MAX_EXTENTS];
extern u32 extent_count;
u64 pattern_setup(u64 mapped_end, u32 cpus);
bool mismatch_take(u64 *addr, u64 *got, u64 *want);
void worker_init(struct worker *w, u32 cpu);
u64 worker_step(struct worker *w);

#endif
