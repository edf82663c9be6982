/*
 * What `virtio=1` and `blk_io=1` do with the virtio devices: one rng request,
 * blk capacity/read/write/read-back, one console line, and one blk read per
 * status interval.
 */
#include "virtio.h"

#define REQ_TIMEOUT_MS 2000
#define BLK_IO_WAIT_MS 50
#define SECTOR_SIZE 512
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_S_OK 0
#define BLK_STATUS_UNSET 0xff
#define RNG_BYTES 16
#define CONSOLE_TXQ 1
#define MARKER "probe-wrote-"

/* Rings and buffers live in .bss: inside the image, below the pattern. */
static u8 ring_rng[PAGE_SIZE] __attribute__((aligned(4096)));
static u8 ring_blk[PAGE_SIZE] __attribute__((aligned(4096)));
static u8 ring_console[PAGE_SIZE] __attribute__((aligned(4096)));
static struct {
	u32 type;
	u32 reserved;
	u64 sector;
} blk_header __attribute__((aligned(16)));
static u8 blk_data[SECTOR_SIZE] __attribute__((aligned(4096)));
static u8 blk_marker[SECTOR_SIZE];
static volatile u8 blk_status;
static u8 rng_buf[RNG_BYTES];
static const char console_hello[] = "probe: hello from virtio-console\n";

static struct vdev blk_dev;
static bool blk_ready;
static bool blk_tried;
u64 blk_io_ok, blk_io_err;

/* `probe: virtio <dev> <what>`, optionally followed by more text. */
static void report(const char *dev, const char *what, const char *more)
{
	struct line l;
	line_start(&l, "virtio ");
	line_str(&l, dev);
	line_str(&l, " ");
	line_str(&l, what);
	if (more) {
		line_str(&l, " ");
		line_str(&l, more);
	}
	line_emit(&l);
}

/* Opens device `type` with the queues in `mask`; prints absent or the error. */
static bool open_device(struct vdev *d, u32 type, const char *name, u32 mask, void *const rings[VQ_MAX],
			u64 mapped_end, u64 tsc_khz)
{
	const char *why = "unknown";
	int found = virtio_open(d, type, mapped_end, tsc_khz, &why);
	if (found == 0) {
		report(name, "absent", NULL);
		return false;
	}
	bool ok = found > 0;
	for (u16 i = 0; ok && i < VQ_MAX; i++)
		if (mask & (1U << i))
			ok = virtio_queue_setup(d, i, rings[i], &why);
	if (ok)
		ok = virtio_driver_ok(d, &why);
	if (!ok) {
		if (found > 0)
			virtio_reset(d);
		report(name, "error", why);
	}
	return ok;
}

static void rng_check(u64 mapped_end, u64 tsc_khz)
{
	struct vdev d;
	void *const rings[VQ_MAX] = { ring_rng, NULL };
	if (!open_device(&d, VIRTIO_ID_RNG, "rng", 1, rings, mapped_end, tsc_khz))
		return;
	struct vbuf b = { (u64)(uintptr_t)rng_buf, RNG_BYTES, true };
	u32 len = 0;
	if (!vq_submit(&d.q[0], &b, 1)) {
		report("rng", "error", "submit");
		return;
	}
	if (!vq_wait(&d.q[0], &len, REQ_TIMEOUT_MS, tsc_khz)) {
		report("rng", "error", "timeout");
		return;
	}
	struct line l;
	line_start(&l, len == RNG_BYTES ? "virtio rng ok" : "virtio rng error short");
	line_kv_dec(&l, "bytes", len);
	line_emit(&l);
}

/* Starts one request on the blk queue; data goes from/to blk_data. */
static bool blk_submit(u32 type, u64 sector)
{
	blk_header.type = type;
	blk_header.reserved = 0;
	blk_header.sector = sector;
	blk_status = BLK_STATUS_UNSET;
	struct vbuf b[3] = {
		{ (u64)(uintptr_t)&blk_header, sizeof(blk_header), false },
		{ (u64)(uintptr_t)blk_data, SECTOR_SIZE, type == BLK_T_IN },
		{ (u64)(uintptr_t)&blk_status, 1, true },
	};
	return vq_submit(&blk_dev.q[0], b, 3);
}

/* One synchronous request: the status byte, or -1 on timeout, -2 if it could not start. */
static int blk_rw(u32 type, u64 sector, u64 tsc_khz)
{
	u32 len;
	if (!blk_submit(type, sector))
		return -2;
	if (!vq_wait(&blk_dev.q[0], &len, REQ_TIMEOUT_MS, tsc_khz))
		return -1;
	return blk_status;
}

static void blk_rw_error(const char *what, int status)
{
	struct line l;
	line_start(&l, "virtio blk ");
	line_str(&l, what);
	line_str(&l, " error");
	if (status == -1)
		line_str(&l, " timeout");
	else if (status == -2)
		line_str(&l, " busy");
	else
		line_kv_dec(&l, "status", (u64)status);
	line_emit(&l);
}

static bool blk_open(u64 mapped_end, u64 tsc_khz)
{
	if (!blk_tried) {
		void *const rings[VQ_MAX] = { ring_blk, NULL };
		blk_tried = true;
		blk_ready = open_device(&blk_dev, VIRTIO_ID_BLOCK, "blk", 1, rings, mapped_end, tsc_khz);
		if (blk_ready && !blk_dev.devcfg) {
			report("blk", "error", "no_device_cfg");
			blk_ready = false;
		}
	}
	return blk_ready;
}

/* The sequence number in a marker sector written by an earlier boot, or 0. */
static u64 old_marker_seq(const u8 *sector)
{
	u32 n = (u32)strlen(MARKER);
	if (memcmp(sector, MARKER, n))
		return 0;
	u64 v = 0;
	for (u32 i = n; i < 32 && sector[i] >= '0' && sector[i] <= '9'; i++)
		v = v * 10 + (u64)(sector[i] - '0');
	return v;
}

static void blk_check(u64 mapped_end, u64 tsc_khz)
{
	if (!blk_open(mapped_end, tsc_khz))
		return;
	u64 capacity = mmio_rd32(blk_dev.devcfg, 0) | (u64)mmio_rd32(blk_dev.devcfg, 4) << 32;
	int st = blk_rw(BLK_T_IN, 0, tsc_khz);
	if (st != BLK_S_OK) {
		blk_rw_error("read", st);
		return;
	}
	struct line l;
	line_start(&l, "virtio blk ok");
	line_kv_dec(&l, "capacity", capacity);
	line_str(&l, " sector0=");
	for (u32 i = 0; i < 16; i++) {
		char hex[3] = { "0123456789abcdef"[blk_data[i] >> 4], "0123456789abcdef"[blk_data[i] & 15], 0 };
		line_str(&l, hex);
	}
	line_emit(&l);

	if (capacity < 2) {
		report("blk", "write error", "capacity");
		return;
	}
	st = blk_rw(BLK_T_IN, 1, tsc_khz);
	if (st != BLK_S_OK) {
		blk_rw_error("write", st);
		return;
	}
	/* probe-wrote-<seq>, NUL padded; seq counts the boots that wrote this disk. */
	u64 seq = old_marker_seq(blk_data) + 1;
	memset(blk_marker, 0, sizeof(blk_marker));
	u32 at = (u32)strlen(MARKER);
	memcpy(blk_marker, MARKER, at);
	char digits[20];
	u32 nd = 0;
	do {
		digits[nd++] = (char)('0' + seq % 10);
		seq /= 10;
	} while (seq);
	while (nd)
		blk_marker[at++] = (u8)digits[--nd];
	memcpy(blk_data, blk_marker, SECTOR_SIZE);
	st = blk_rw(BLK_T_OUT, 1, tsc_khz);
	if (st != BLK_S_OK) {
		blk_rw_error("write", st);
		return;
	}
	memset(blk_data, 0, SECTOR_SIZE);
	st = blk_rw(BLK_T_IN, 1, tsc_khz);
	if (st != BLK_S_OK) {
		blk_rw_error("write readback", st);
		return;
	}
	if (memcmp(blk_data, blk_marker, SECTOR_SIZE)) {
		report("blk", "write error", "readback_mismatch");
		return;
	}
	report("blk", "write ok", NULL);
}

static void console_check(u64 mapped_end, u64 tsc_khz)
{
	struct vdev d;
	void *const rings[VQ_MAX] = { NULL, ring_console };
	if (!open_device(&d, VIRTIO_ID_CONSOLE, "console", 1U << CONSOLE_TXQ, rings, mapped_end, tsc_khz))
		return;
	u32 n = (u32)strlen(console_hello);
	struct vbuf b = { (u64)(uintptr_t)console_hello, n, false };
	u32 len;
	if (!vq_submit(&d.q[CONSOLE_TXQ], &b, 1)) {
		report("console", "error", "submit");
		return;
	}
	if (!vq_wait(&d.q[CONSOLE_TXQ], &len, REQ_TIMEOUT_MS, tsc_khz)) {
		report("console", "error", "timeout");
		return;
	}
	struct line l;
	line_start(&l, "virtio console ok");
	line_kv_dec(&l, "bytes", n);
	line_emit(&l);
}

void virtio_selftest(u64 mapped_end, u64 tsc_khz)
{
	u64 start = rdtsc();
	rng_check(mapped_end, tsc_khz);
	blk_check(mapped_end, tsc_khz);
	console_check(mapped_end, tsc_khz);
	struct line l;
	line_start(&l, "virtio done");
	line_kv_dec(&l, "ms", (rdtsc() - start) / tsc_khz);
	line_emit(&l);
}

void blk_io_init(u64 mapped_end, u64 tsc_khz)
{
	blk_open(mapped_end, tsc_khz);
}

static void blk_io_count(void)
{
	if (blk_status == BLK_S_OK)
		blk_io_ok++;
	else
		blk_io_err++;
}

/*
 * One read of sector 0 per call. A request still in flight (e.g. across a
 * pause) is only collected, never abandoned, so none is counted twice or lost.
 */
void blk_io_tick(u64 tsc_khz)
{
	u32 len;
	if (!blk_ready)
		return;
	struct virtq *q = &blk_dev.q[0];
	if (q->in_flight) {
		if (!vq_poll(q, &len))
			return;
		blk_io_count();
	}
	if (!blk_submit(BLK_T_IN, 0)) {
		blk_io_err++;
		return;
	}
	if (vq_wait(q, &len, BLK_IO_WAIT_MS, tsc_khz))
		blk_io_count();
}
