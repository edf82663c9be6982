/* The memory pattern: extents, per-CPU slices, verify-then-rewrite. */
#include "probe.h"

#define PATTERN_SALT 0x9e3779b97f4a7c15ULL

/* A CPU's share of the pattern: `pages` pages from (extent, offset). */
struct slice {
	u32 extent;
	u64 offset;
	u64 pages;
};

struct range extents[MAX_EXTENTS];
u32 extent_count;
static struct slice slices[MAX_CPUS];
struct cpu_stats stats[MAX_CPUS];
u64 errors;

/* Last mismatch, for the `probe: mismatch` line; guarded by mismatch_lock. */
static u32 mismatch_lock;
static u64 mismatch_seq;
static u64 mismatch_addr, mismatch_got, mismatch_want;

/* The documented pattern: word at physical address addr in generation gen. */
static u64 pattern(u64 addr, u64 gen)
{
	return addr ^ (gen * PATTERN_SALT);
}

/*
 * Pattern extents: from every RAM range above the image (2 MiB aligned),
 * below the mapped limit, its first fill% rounded down to whole pages.
 */
static u64 build_extents(u64 mapped_end)
{
	u64 floor = ((u64)(uintptr_t)__image_end + 2 * MIB - 1) & ~(2 * MIB - 1);
	u64 total = 0;
	for (u32 i = 0; i < ram.count && extent_count < MAX_EXTENTS; i++) {
		u64 s = ram.r[i].start < floor ? floor : ram.r[i].start;
		u64 e = ram.r[i].end > mapped_end ? mapped_end : ram.r[i].end;
		s = (s + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
		e &= ~(PAGE_SIZE - 1);
		if (e <= s)
			continue;
		u64 pages = (e - s) / PAGE_SIZE * cfg.fill / 100;
		if (!pages)
			continue;
		/* Merge with the previous extent when contiguous. */
		if (extent_count && extents[extent_count - 1].end == s) {
			extents[extent_count - 1].end = s + pages * PAGE_SIZE;
		} else {
			extents[extent_count].start = s;
			extents[extent_count].end = s + pages * PAGE_SIZE;
			extent_count++;
		}
		total += pages;
	}
	return total;
}

static void build_slices(u64 total_pages, u32 n)
{
	u32 ext = 0;
	u64 off = 0;
	for (u32 c = 0; c < n; c++) {
		u64 first = total_pages * c / n;
		u64 next = total_pages * (c + 1) / n;
		slices[c].extent = ext;
		slices[c].offset = off;
		slices[c].pages = next - first;
		/* Advance (ext, off) by this slice's pages. */
		u64 left = next - first;
		while (left && ext < extent_count) {
			u64 room = (extents[ext].end - extents[ext].start) / PAGE_SIZE - off / PAGE_SIZE;
			if (left < room) {
				off += left * PAGE_SIZE;
				left = 0;
			} else {
				left -= room;
				ext++;
				off = 0;
			}
		}
	}
}

static void record_mismatch(u64 addr, u64 got, u64 want)
{
	while (__atomic_exchange_n(&mismatch_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
	mismatch_addr = addr;
	mismatch_got = got;
	mismatch_want = want;
	mismatch_seq++;
	__atomic_store_n(&mismatch_lock, 0, __ATOMIC_RELEASE);
}

/*
 * Words between two calls of io_poll_hook on the BSP: a page takes microseconds
 * under KVM and TCG, but far longer where guest writes are slow, and the net
 * device must be polled at least every ~100 us.
 */
#define POLL_CHUNK_WORDS 64

/*
 * Verify the page against gen (unless gen is 0), then rewrite it with gen + 1;
 * `poll` (if set) runs between chunks.
 */
static void process_page(u64 addr, u64 gen, void (*poll)(void))
{
	u64 *p = (u64 *)(uintptr_t)addr;
	u64 bad = 0;
	for (u32 c = 0; c < PAGE_SIZE / 8; c += POLL_CHUNK_WORDS) {
		for (u32 i = c; i < c + POLL_CHUNK_WORDS; i++) {
			u64 a = addr + 8ULL * i;
			u64 v = __atomic_load_n(&p[i], __ATOMIC_RELAXED);
			if (gen && v != pattern(a, gen)) {
				if (!bad)
					record_mismatch(a, v, pattern(a, gen));
				bad++;
			}
			__atomic_store_n(&p[i], pattern(a, gen + 1), __ATOMIC_RELAXED);
		}
		if (poll)
			poll();
	}
	if (bad)
		__atomic_fetch_add(&errors, bad, __ATOMIC_RELAXED);
}

void worker_init(struct worker *w, u32 cpu)
{
	memset(w, 0, sizeof(*w));
	w->cpu = cpu;
	w->ext = slices[cpu].extent;
	w->off = slices[cpu].offset;
	w->last_tsc = rdtsc();
}

static void stall_sample(struct worker *w, u64 now)
{
	struct cpu_stats *st = &stats[w->cpu];
	if ((int64_t)(now - w->last_tsc) < 0) {
		store_relaxed(&st->tsc_backwards, st->tsc_backwards + 1);
		w->last_tsc = now;
		return;
	}
	u64 gap = now - w->last_tsc;
	w->last_tsc = now;
	u64 cur = load_relaxed(&st->stall_interval_max);
	while (gap > cur &&
	       !__atomic_compare_exchange_n(&st->stall_interval_max, &cur, gap, false,
					    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
		;
	if (gap > st->stall_boot_max)
		store_relaxed(&st->stall_boot_max, gap);
}

/*
 * heartbeat=1: the VM-wide heartbeat. hb_last is the newest TSC stamp of any CPU;
 * a CPU that moves it on from `prev` saw a time `now - prev` in which no CPU ran
 * (every vCPU paused: a VM pause, not one vCPU descheduled by the host).
 */
static u64 hb_last;
static u64 hb_interval_max;

static void heartbeat_sample(u64 now)
{
	u64 prev = __atomic_load_n(&hb_last, __ATOMIC_RELAXED);
	if ((int64_t)(now - prev) <= 0)
		return;
	/* One attempt: a CPU that loses the race stamped after another did, so its gap is shorter. */
	if (!__atomic_compare_exchange_n(&hb_last, &prev, now, false, __ATOMIC_RELAXED,
					 __ATOMIC_RELAXED))
		return;
	if (!prev)
		return;	/* the first stamp */
	u64 gap = now - prev;
	u64 cur = load_relaxed(&hb_interval_max);
	while (gap > cur &&
	       !__atomic_compare_exchange_n(&hb_interval_max, &cur, gap, false,
					    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
		;
}

/*
 * heartbeat_us=N: between stamps a CPU halts until its LAPIC timer (one-shot, divide by 1:
 * N us at KVM's 1 GHz APIC bus; only a wake-up, the TSC measures) raises HB_VECTOR, so an
 * idle VM costs the host little. Interrupts are enabled only around the hlt.
 */
#define HB_VECTOR 0x61
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0

void hb_timer_entry(void);
__asm__(".text\n"
	".globl hb_timer_entry\n"
	"hb_timer_entry:\n"
	"	iretq\n");

/* Once, on the BSP before the APs start working: the gate, and the 8259s masked. */
void heartbeat_timer_init(void)
{
	idt_set_handler(HB_VECTOR, hb_timer_entry);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

static void heartbeat_wait(struct worker *w)
{
	if (!w->hb_timer) {
		lapic_write(LAPIC_SVR, 0x1ff);	/* software-enabled, spurious vector 0xff */
		lapic_write(LAPIC_TIMER_DIV, 0xb);	/* divide by 1 */
		lapic_write(LAPIC_LVT_TIMER, HB_VECTOR);	/* one-shot, unmasked */
		w->hb_timer = true;
	}
	lapic_write(LAPIC_TIMER_INIT, (u32)(cfg.heartbeat_us * 1000));
	/* sti's shadow covers the hlt: a timer that fired already wakes it at once. */
	__asm__ volatile("sti; hlt; cli" : : : "memory");
	lapic_eoi();
}

/* The longest VM-wide heartbeat gap (TSC ticks) since the previous call. */
u64 heartbeat_take(void)
{
	return __atomic_exchange_n(&hb_interval_max, 0, __ATOMIC_RELAXED);
}

/*
 * Do one page of this CPU's slice (or nothing if empty); returns the timestamp.
 * The BSP's caller also runs io_poll_hook after each step.
 */
u64 worker_step(struct worker *w)
{
	const struct slice *sl = &slices[w->cpu];
	struct cpu_stats *st = &stats[w->cpu];
	if (sl->pages) {
		u64 addr = extents[w->ext].start + w->off;
		process_page(addr, w->gen, w->cpu == 0 ? io_poll_hook : NULL);
		if (cfg.corrupt && addr == (cfg.corrupt_at & ~(PAGE_SIZE - 1)))
			w->owns_corrupt = true;
		store_relaxed(&st->pages, st->pages + 1);
		w->off += PAGE_SIZE;
		if (extents[w->ext].start + w->off >= extents[w->ext].end) {
			w->ext++;
			w->off = 0;
		}
		if (++w->done == sl->pages) {
			w->done = 0;
			w->ext = sl->extent;
			w->off = sl->offset;
			w->gen++;
			store_relaxed(&st->passes, st->passes + 1);
			if (w->gen == 1 && w->owns_corrupt) {
				/* Test hook: flip one bit; the next pass must report it. */
				u64 *target = (u64 *)(uintptr_t)cfg.corrupt_at;
				*target ^= 1;
				struct line l;
				line_start(&l, "corrupt");
				line_kv_hex(&l, "addr", cfg.corrupt_at);
				line_kv_dec(&l, "cpu", w->cpu);
				line_emit(&l);
			}
		}
	} else if (cfg.heartbeat_us) {
		heartbeat_wait(w);
	} else {
		cpu_relax();
	}
	u64 now = rdtsc();
	stall_sample(w, now);
	if (cfg.heartbeat)
		heartbeat_sample(now);
	return now;
}

/* Builds the pattern extents and splits them among cpus; returns total pages. */
u64 pattern_setup(u64 mapped_end, u32 cpus)
{
	u64 total = build_extents(mapped_end);
	build_slices(total, cpus);
	return total;
}

/* Copies out the last mismatch; false if none since the previous call. */
bool mismatch_take(u64 *addr, u64 *got, u64 *want)
{
	static u64 taken_seq;
	while (__atomic_exchange_n(&mismatch_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
	u64 seq = mismatch_seq;
	*addr = mismatch_addr;
	*got = mismatch_got;
	*want = mismatch_want;
	__atomic_store_n(&mismatch_lock, 0, __ATOMIC_RELEASE);
	if (seq == taken_seq)
		return false;
	taken_seq = seq;
	return true;
}
