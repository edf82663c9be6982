/* Probe guest entry: bring-up, status lines, serial input, reboot. */
#include "probe.h"
#include "virtio.h"
#include "edu.h"
#include "hotplug.h"
#include "net.h"
#include "vsock.h"

#define INPUT_POLL_US 10000
#define SMP_QUIET_MS 200
#define SMP_QUIET_FW_MS 20
#define SMP_MAX_WAIT_MS 3000

static u32 cpus_working;
static u32 go;
static u64 boot_tsc;
static struct tsc_info tsc;
void (*volatile io_poll_hook)(void);

/* The pollers behind io_poll_hook; one is called directly, several through io_poll_all. */
#define IO_POLL_MAX 4
static void (*io_poll_fns[IO_POLL_MAX])(void);
static u32 io_poll_n;

static void io_poll_all(void)
{
	u32 n = __atomic_load_n(&io_poll_n, __ATOMIC_ACQUIRE);
	for (u32 i = 0; i < n; i++)
		io_poll_fns[i]();
}

void io_poll_add(void (*fn)(void))
{
	u32 n = io_poll_n;
	if (n >= IO_POLL_MAX)
		return;
	io_poll_fns[n] = fn;
	__atomic_store_n(&io_poll_n, n + 1, __ATOMIC_RELEASE);
	io_poll_hook = n ? io_poll_all : fn;
}

void ap_main(u32 cpu);
void ap_main(u32 cpu)
{
	struct worker w;
	idt_load();
	while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
		cpu_relax();
	if (cpu >= cpus_working)
		return;	/* too late for a slice: park */
	worker_init(&w, cpu);
	for (;;)
		worker_step(&w);
}

static u64 ticks_to_us(u64 t)
{
	return t * 1000 / tsc.khz;
}

static void print_banner(u64 total_pages, u32 fw_cpus, const char *fw, bool gib_pages)
{
	struct line l;
	u64 ram_bytes = 0;
	for (u32 i = 0; i < ram.count; i++)
		ram_bytes += ram.r[i].end - ram.r[i].start;
	line_start(&l, "start");
	line_kv_dec(&l, "cpus", cpus_working);
	line_kv_dec(&l, "cpus_fw", fw_cpus);
	line_kv_str(&l, "fw", fw);
	line_kv_dec(&l, "ram_mib", ram_bytes / MIB);
	line_str(&l, " pattern=");
	for (u32 i = 0; i < extent_count; i++) {
		if (i)
			line_str(&l, ",");
		line_hex(&l, extents[i].start);
		line_str(&l, "-");
		line_hex(&l, extents[i].end);
	}
	if (!extent_count)
		line_str(&l, "none");
	line_kv_dec(&l, "pattern_mib", total_pages * PAGE_SIZE / MIB);
	line_kv_dec(&l, "fill", cfg.fill);
	line_kv_dec(&l, "status_ms", cfg.status_ms);
	if (cfg.heartbeat)
		line_kv_dec(&l, "heartbeat", 1);
	if (cfg.heartbeat_us)
		line_kv_dec(&l, "heartbeat_us", cfg.heartbeat_us);
	line_kv_dec(&l, "tsc_khz", tsc.khz);
	line_kv_str(&l, "clock", tsc.source);
	line_kv_dec(&l, "pit_khz", tsc.pit_khz);
	line_kv_str(&l, "paging", gib_pages ? "1g" : "2m");
	line_kv_str(&l, "memmap", ram.from_pvh ? "pvh" : "default");
	if (cfg.unknown_len)
		line_kv_str(&l, "unknown", cfg.unknown);
	line_emit(&l);
}

static void print_status(u64 seq, u64 now)
{
	struct line l;
	u64 iter = 0, pages = 0, stall = 0, stall_max = 0, back = 0;
	for (u32 c = 0; c < cpus_working; c++) {
		iter += load_relaxed(&stats[c].passes);
		pages += load_relaxed(&stats[c].pages);
		back += load_relaxed(&stats[c].tsc_backwards);
		u64 s = __atomic_exchange_n(&stats[c].stall_interval_max, 0, __ATOMIC_RELAXED);
		u64 m = load_relaxed(&stats[c].stall_boot_max);
		if (s > stall)
			stall = s;
		if (m > stall_max)
			stall_max = m;
	}
	line_start(&l, "status");
	line_kv_dec(&l, "seq", seq);
	line_kv_dec(&l, "cpus", cpus_working);
	line_kv_dec(&l, "iter", iter);
	line_kv_dec(&l, "pages", pages);
	line_kv_dec(&l, "errors", load_relaxed(&errors));
	line_kv_dec(&l, "stall_us", ticks_to_us(stall));
	line_kv_dec(&l, "max_stall_us", ticks_to_us(stall_max));
	line_kv_dec(&l, "tsc_back", back);
	line_kv_dec(&l, "uptime_ms", (now - boot_tsc) / tsc.khz);
	if (cfg.heartbeat)
		line_kv_dec(&l, "hb_gap_us", ticks_to_us(heartbeat_take()));
	if (cfg.blk_io) {
		line_kv_dec(&l, "blk_ok", blk_io_ok);
		line_kv_dec(&l, "blk_err", blk_io_err);
	}
	if (cfg.hotplug) {
		line_kv_dec(&l, "hotplug_removes", hotplug_removes);
		line_kv_dec(&l, "hotplug_inserts", hotplug_inserts);
	}
	if (cfg.net && net_ready())
		net_status(&l);
	if (cfg.vsock && vsock_ready())
		vsock_status(&l);
	line_emit(&l);
}

static void print_mismatch(void)
{
	u64 addr, got, want;
	struct line l;
	if (!mismatch_take(&addr, &got, &want))
		return;
	line_start(&l, "mismatch");
	line_kv_hex(&l, "addr", addr);
	line_kv_hex(&l, "got", got);
	line_kv_hex(&l, "want", want);
	line_emit(&l);
}

static void do_reboot(void)
{
	say("reboot");
	reboot();
}

static void poll_input(void)
{
	for (int i = 0; i < 16; i++) {
		int c = serial_getc();
		if (c < 0)
			return;
		struct line l;
		line_start(&l, "input");
		line_str(&l, " ");
		line_hex(&l, (u64)c);
		line_emit(&l);
		if (c == 'r')
			do_reboot();
	}
}

/*
 * Start the APs; wait until the firmware's CPU count has arrived and 20 ms
 * passed without a new one, or 200 ms without one when the count is unknown.
 */
static void start_aps(u32 fw_cpus)
{
	extern char ap_tramp_start[], ap_tramp_end[];
	memcpy((void *)(uintptr_t)TRAMPOLINE_PADDR, ap_tramp_start,
	       (size_t)(ap_tramp_end - ap_tramp_start));
	__atomic_store_n(&ap_next_index, 1, __ATOMIC_RELEASE);
	u64 start = rdtsc();
	smp_send_init_sipi(tsc.khz);
	u32 seen = 1;
	u64 last_change = rdtsc();
	for (;;) {
		u32 n = __atomic_load_n(&ap_next_index, __ATOMIC_ACQUIRE);
		u64 now = rdtsc();
		if (n != seen) {
			seen = n;
			last_change = now;
		}
		/* Firmware tables can undercount (SeaBIOS's MP table lists one CPU
		 * with acpi=off), so even after the count a short quiet time. */
		u64 quiet = fw_cpus && n >= fw_cpus ? SMP_QUIET_FW_MS : SMP_QUIET_MS;
		if (now - last_change > quiet * tsc.khz)
			break;
		if (now - start > SMP_MAX_WAIT_MS * tsc.khz)
			break;
		cpu_relax();
	}
}

void probe_main(u32 start_info);
void probe_main(u32 start_info)
{
	boot_tsc = rdtsc();
	serial_init();
	idt_load();
	u64 rsdp;
	bootinfo_read(start_info, &rsdp);
	config_parse();
	tsc_calibrate(&tsc);
	bool gib = cpu_has_gib_pages();
	u64 mapped = paging_init(&ram, gib);
	const char *fw;
	u32 fw_cpus = fw_count_cpus(rsdp, &fw);
	start_aps(fw_cpus);

	u32 n = __atomic_load_n(&ap_next_index, __ATOMIC_ACQUIRE);
	cpus_working = n > MAX_CPUS ? MAX_CPUS : n;
	u64 total_pages = pattern_setup(mapped, cpus_working);
	if (cfg.corrupt) {
		bool inside = false;
		for (u32 i = 0; i < extent_count; i++)
			inside |= cfg.corrupt_at >= extents[i].start && cfg.corrupt_at < extents[i].end;
		if (!inside) {
			say("note corrupt_at outside the pattern, ignored");
			cfg.corrupt = false;
		}
	}
	print_banner(total_pages, fw_cpus, fw, gib);
	if (n > MAX_CPUS) {
		struct line l;
		line_start(&l, "note cpus over the limit are parked");
		line_kv_dec(&l, "parked", n - MAX_CPUS);
		line_emit(&l);
	}
	if (cfg.heartbeat_us)
		heartbeat_timer_init();
	__atomic_store_n(&go, 1, __ATOMIC_RELEASE);

	/* Before the BSP's first TSC sample, so this time is not counted as a stall. */
	if (cfg.virtio)
		virtio_selftest(mapped, tsc.khz);
	if (cfg.blk_io)
		blk_io_init(mapped, tsc.khz);
	if (cfg.userdev)
		userdev_init();
	if (cfg.edu)
		edu_init(tsc.khz);
	if (cfg.hotplug)
		hotplug_init();
	if (cfg.net)
		net_init(mapped, tsc.khz);
	if (cfg.vsock)
		vsock_init(mapped, tsc.khz);

	struct worker w;
	worker_init(&w, 0);
	u64 status_ticks = cfg.status_ms * tsc.khz;
	u64 poll_ticks = INPUT_POLL_US * tsc.khz / 1000;
	u64 next_status = w.last_tsc + status_ticks;
	u64 next_poll = w.last_tsc;
	u64 seq = 0;
	for (;;) {
		u64 now = worker_step(&w);
		/* Between pages too (an empty slice has no chunks): echo latency is measured. */
		if (io_poll_hook)
			io_poll_hook();
		if (due(now, next_poll, poll_ticks)) {
			poll_input();
			if (cfg.userdev)
				userdev_poll();
			if (cfg.hotplug)
				hotplug_poll();
			next_poll = now + poll_ticks;
		}
		if (due(now, next_status, status_ticks)) {
			print_mismatch();
			if (cfg.blk_io)
				blk_io_tick(tsc.khz);
			if (cfg.userdev)
				userdev_tick();
			if (cfg.edu)
				edu_tick();
			if (cfg.vsock)
				vsock_tick();
			print_status(++seq, now);
			next_status += status_ticks;
			if (due(now, next_status, status_ticks))
				next_status = now + status_ticks;	/* after a long stall: no burst */
			if (cfg.reboot_after && seq >= cfg.reboot_after)
				do_reboot();
		}
	}
}
