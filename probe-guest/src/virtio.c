/*
 * Polled virtio-pci transport (virtio 1.x, modern interface) and split
 * virtqueues. No interrupts: MSI-X stays disabled, vectors stay at
 * NO_VECTOR, the driver polls the used ring.
 */
#include "virtio.h"

#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_MODERN_BASE 0x1040

/* Capability cfg_type values. */
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR 3
#define CAP_DEVICE 4
#define CAP_WALK_LIMIT 48

/* Common configuration registers. */
#define CC_DFSELECT 0x00
#define CC_DF 0x04
#define CC_GFSELECT 0x08
#define CC_GF 0x0c
#define CC_STATUS 0x14
#define CC_CFG_GENERATION 0x15
#define CC_Q_SELECT 0x16
#define CC_Q_SIZE 0x18
#define CC_Q_MSIX 0x1a
#define CC_Q_ENABLE 0x1c
#define CC_Q_NOFF 0x1e
#define CC_Q_DESC 0x20
#define CC_Q_DRIVER 0x28
#define CC_Q_DEVICE 0x30
#define COMMON_LEN 0x38

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

#define NO_VECTOR 0xffff
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define RESET_TIMEOUT_MS 1000

/* Ring layout inside the queue's page (VQ_SIZE descriptors at most); bigger queues are packed. */
#define RING_DESC_OFF 0
#define RING_AVAIL_OFF 0x400
#define RING_USED_OFF 0x800

struct cap_found {
	bool present;
	u8 bar;
	u32 offset;
	u32 length;
	u32 extra;	/* notify_off_multiplier */
};

/* Maps one capability's window; NULL if its BAR is unset or not mapped. */
static volatile u8 *cap_map(u8 slot, const struct cap_found *c, u64 mapped_end)
{
	u64 bar = pci_bar_address(slot, c->bar);
	if (!bar)
		return NULL;
	u64 start = bar + c->offset;
	if (start < bar || start + c->length > mapped_end || start + c->length < start)
		return NULL;
	return (volatile u8 *)(uintptr_t)start;
}

static void find_caps(u8 slot, struct cap_found caps[5])
{
	u8 off = 0;
	for (u32 n = 0; n < CAP_WALK_LIMIT; n++) {
		off = pci_cap_next(slot, off);
		if (!off)
			return;
		if (pci_read8(slot, off) != PCI_CAP_ID_VENDOR)
			continue;
		u8 type = pci_read8(slot, (u8)(off + 3));
		u8 bar = pci_read8(slot, (u8)(off + 4));
		/* The first capability of each type that names a real BAR wins. */
		if (type < CAP_COMMON || type > CAP_DEVICE || bar > 5 || caps[type].present)
			continue;
		caps[type].present = true;
		caps[type].bar = bar;
		caps[type].offset = pci_read32(slot, (u8)(off + 8));
		caps[type].length = pci_read32(slot, (u8)(off + 12));
		if (type == CAP_NOTIFY)
			caps[type].extra = pci_read32(slot, (u8)(off + 16));
	}
}

static void set_status(struct vdev *d, u8 bits)
{
	u8 s = mmio_rd8(d->common, CC_STATUS);
	mmio_wr8(d->common, CC_STATUS, s | bits);
}

void virtio_reset(struct vdev *d)
{
	mmio_wr8(d->common, CC_STATUS, 0);
}

static bool reset_and_wait(struct vdev *d, u64 tsc_khz)
{
	virtio_reset(d);
	u64 start = rdtsc();
	while (mmio_rd8(d->common, CC_STATUS) != 0) {
		if (rdtsc() - start > RESET_TIMEOUT_MS * tsc_khz)
			return false;
		cpu_relax();
	}
	return true;
}

/* Transitional (legacy-capable) device ids, which also carry the modern capabilities. */
static u16 transitional_id(u32 type)
{
	switch (type) {
	case VIRTIO_ID_NET:
		return 0x1000;
	case VIRTIO_ID_BLOCK:
		return 0x1001;
	case VIRTIO_ID_CONSOLE:
		return 0x1003;
	case VIRTIO_ID_RNG:
		return 0x1005;
	default:
		return 0xffff;
	}
}

int virtio_open(struct vdev *d, u32 type, u64 mapped_end, u64 tsc_khz, const char **why)
{
	u32 got;
	return virtio_open_features(d, type, 0, &got, mapped_end, tsc_khz, why);
}

int virtio_open_features(struct vdev *d, u32 type, u32 want, u32 *got, u64 mapped_end, u64 tsc_khz,
			 const char **why)
{
	*got = 0;
	memset(d, 0, sizeof(*d));
	int slot = pci_find(VIRTIO_VENDOR, (u16)(VIRTIO_MODERN_BASE + type),
			    transitional_id(type), 0);
	if (slot < 0)
		return 0;
	d->slot = (u8)slot;
	struct cap_found caps[5];
	memset(caps, 0, sizeof(caps));
	find_caps(d->slot, caps);
	if (!caps[CAP_COMMON].present || !caps[CAP_NOTIFY].present || !caps[CAP_ISR].present) {
		*why = "missing_capability";
		return -1;
	}
	if (caps[CAP_COMMON].length < COMMON_LEN) {
		*why = "common_cfg_too_short";
		return -1;
	}
	pci_enable(d->slot);
	d->common = cap_map(d->slot, &caps[CAP_COMMON], mapped_end);
	d->isr = cap_map(d->slot, &caps[CAP_ISR], mapped_end);
	d->notify_base = cap_map(d->slot, &caps[CAP_NOTIFY], mapped_end);
	d->notify_mult = caps[CAP_NOTIFY].extra;
	if (caps[CAP_DEVICE].present)
		d->devcfg = cap_map(d->slot, &caps[CAP_DEVICE], mapped_end);
	if (!d->common || !d->isr || !d->notify_base ||
	    (caps[CAP_DEVICE].present && !d->devcfg)) {
		*why = "bar_unmapped";
		return -1;
	}
	if (!reset_and_wait(d, tsc_khz)) {
		*why = "reset_timeout";
		return -1;
	}
	set_status(d, S_ACKNOWLEDGE);
	set_status(d, S_DRIVER);
	mmio_wr32(d->common, CC_DFSELECT, 1);
	u32 high = mmio_rd32(d->common, CC_DF);
	if (!(high & 1)) {
		set_status(d, S_FAILED);
		*why = "no_version_1";
		return -1;
	}
	/* VERSION_1 (bit 32), and of the low 32 bits those the caller wants and the device offers. */
	mmio_wr32(d->common, CC_DFSELECT, 0);
	u32 low = mmio_rd32(d->common, CC_DF) & want;
	mmio_wr32(d->common, CC_GFSELECT, 0);
	mmio_wr32(d->common, CC_GF, low);
	mmio_wr32(d->common, CC_GFSELECT, 1);
	mmio_wr32(d->common, CC_GF, 1);
	set_status(d, S_FEATURES_OK);
	if (!(mmio_rd8(d->common, CC_STATUS) & S_FEATURES_OK)) {
		set_status(d, S_FAILED);
		*why = "features_refused";
		return -1;
	}
	*got = low;
	return 1;
}

void virtio_cfg_read(struct vdev *d, u32 off, u8 *out, u32 n)
{
	/* Retry while the generation moves: a multi-byte field may change under us. */
	for (u32 tries = 0; tries < 100; tries++) {
		u8 gen = mmio_rd8(d->common, CC_CFG_GENERATION);
		for (u32 i = 0; i < n; i++)
			out[i] = mmio_rd8(d->devcfg, off + i);
		if (mmio_rd8(d->common, CC_CFG_GENERATION) == gen)
			return;
	}
}

u64 virtio_cfg_read64(struct vdev *d, u32 off)
{
	/* 32-bit accesses for 32- and 64-bit fields (virtio 1.x, 4.1.3.1), low half first. */
	u64 v = 0;
	for (u32 tries = 0; tries < 100; tries++) {
		u8 gen = mmio_rd8(d->common, CC_CFG_GENERATION);
		v = mmio_rd32(d->devcfg, off) | (u64)mmio_rd32(d->devcfg, off + 4) << 32;
		if (mmio_rd8(d->common, CC_CFG_GENERATION) == gen)
			break;
	}
	return v;
}

static void wr64(volatile u8 *base, u32 off, u64 v)
{
	mmio_wr32(base, off, (u32)v);
	mmio_wr32(base, off + 4, (u32)(v >> 32));
}

/*
 * Sets up queue `index` with at most `want` entries (a power of two) in `ring`
 * (`ring_bytes`, page aligned). The 8-entry queues keep the fixed layout the
 * README documents; bigger ones are packed: descriptors, available ring, used
 * ring (4-byte aligned).
 */
static bool queue_setup(struct vdev *d, u16 index, void *ring, u32 ring_bytes, u16 want,
			const char **why)
{
	if (index >= VQ_MAX) {
		*why = "queue_index";
		return false;
	}
	mmio_wr16(d->common, CC_Q_SELECT, index);
	u16 max = mmio_rd16(d->common, CC_Q_SIZE);
	if (!max) {
		*why = "queue_unavailable";
		return false;
	}
	if (mmio_rd16(d->common, CC_Q_ENABLE)) {
		*why = "queue_already_enabled";
		return false;
	}
	u16 size = want;
	while (size > max)
		size >>= 1;
	u32 desc_off = RING_DESC_OFF, avail_off = RING_AVAIL_OFF, used_off = RING_USED_OFF;
	if (want > VQ_SIZE) {
		avail_off = 16U * size;
		used_off = (avail_off + 6 + 2U * size + 3) & ~3U;
	}
	if (used_off + 6 + 8U * size > ring_bytes) {
		*why = "queue_too_big";
		return false;
	}
	struct virtq *q = &d->q[index];
	memset(ring, 0, ring_bytes);
	u8 *base = ring;
	q->index = index;
	q->size = size;
	q->desc = base + desc_off;
	q->avail = base + avail_off;
	q->used = base + used_off;
	q->avail_idx = 0;
	q->used_seen = 0;
	q->in_flight = 0;
	*(volatile u16 *)q->avail = AVAIL_F_NO_INTERRUPT;

	mmio_wr16(d->common, CC_Q_SIZE, size);
	mmio_wr16(d->common, CC_Q_MSIX, NO_VECTOR);
	wr64(d->common, CC_Q_DESC, (u64)(uintptr_t)q->desc);
	wr64(d->common, CC_Q_DRIVER, (u64)(uintptr_t)q->avail);
	wr64(d->common, CC_Q_DEVICE, (u64)(uintptr_t)q->used);
	u16 noff = mmio_rd16(d->common, CC_Q_NOFF);
	u64 notify_at = (u64)noff * d->notify_mult;
	q->notify = (volatile u16 *)(d->notify_base + notify_at);
	mmio_wr16(d->common, CC_Q_ENABLE, 1);
	q->ready = true;
	return true;
}

bool virtio_queue_setup(struct vdev *d, u16 index, void *ring, const char **why)
{
	return queue_setup(d, index, ring, (u32)PAGE_SIZE, VQ_SIZE, why);
}

bool virtio_queue_setup_sized(struct vdev *d, u16 index, void *ring, u32 ring_bytes, u16 want,
			      const char **why)
{
	return queue_setup(d, index, ring, ring_bytes, want, why);
}

bool virtio_driver_ok(struct vdev *d, const char **why)
{
	set_status(d, S_DRIVER_OK);
	u8 s = mmio_rd8(d->common, CC_STATUS);
	if (s & S_NEEDS_RESET) {
		*why = "needs_reset";
		return false;
	}
	if (!(s & S_DRIVER_OK)) {
		*why = "driver_ok_refused";
		return false;
	}
	return true;
}

bool vq_submit(struct virtq *q, const struct vbuf *bufs, u32 n)
{
	if (!q->ready || n == 0 || n > VQ_MAX_BUFS || n > q->size || q->in_flight)
		return false;
	/* One request at a time: its chain always starts at descriptor 0. */
	for (u32 i = 0; i < n; i++) {
		volatile u8 *desc = q->desc + 16 * i;
		u16 flags = (u16)((i + 1 < n ? DESC_F_NEXT : 0) |
				  (bufs[i].device_writes ? DESC_F_WRITE : 0));
		*(volatile u64 *)(desc + 0) = bufs[i].addr;
		*(volatile u32 *)(desc + 8) = bufs[i].len;
		*(volatile u16 *)(desc + 12) = flags;
		*(volatile u16 *)(desc + 14) = (u16)(i + 1 < n ? i + 1 : 0);
	}
	u16 slot = (u16)(q->avail_idx & (q->size - 1));
	*(volatile u16 *)(q->avail + 4 + 2 * slot) = 0;
	barrier();	/* x86 keeps stores in order; the compiler must too */
	q->avail_idx++;
	*(volatile u16 *)(q->avail + 2) = q->avail_idx;
	q->in_flight++;
	barrier();
	*q->notify = q->index;
	return true;
}

bool vq_poll(struct virtq *q, u32 *used_len)
{
	if (!q->ready)
		return false;
	u16 idx = *(volatile u16 *)(q->used + 2);
	if (idx == q->used_seen)
		return false;
	barrier();
	u16 slot = (u16)(q->used_seen & (q->size - 1));
	*used_len = *(volatile u32 *)(q->used + 4 + 8 * slot + 4);
	q->used_seen++;
	if (q->in_flight)
		q->in_flight--;
	return true;
}

bool vq_wait(struct virtq *q, u32 *used_len, u64 timeout_ms, u64 tsc_khz)
{
	u64 start = rdtsc();
	while (!vq_poll(q, used_len)) {
		if (rdtsc() - start > timeout_ms * tsc_khz)
			return false;
		if (io_poll_hook)
			io_poll_hook();	/* e.g. blk_io's 50 ms wait must not starve the net device */
		cpu_relax();
	}
	return true;
}

/*
 * Many requests in flight (virtio-net): the caller owns the descriptors, one
 * per buffer, and hands heads to the device in any order.
 */
void vq_set_desc(struct virtq *q, u16 id, u64 addr, u32 len, bool device_writes)
{
	volatile u8 *desc = q->desc + 16 * (u32)id;
	*(volatile u64 *)(desc + 0) = addr;
	*(volatile u32 *)(desc + 8) = len;
	*(volatile u16 *)(desc + 12) = device_writes ? DESC_F_WRITE : 0;
	*(volatile u16 *)(desc + 14) = 0;
}

void vq_publish(struct virtq *q, u16 id)
{
	u16 slot = (u16)(q->avail_idx & (q->size - 1));
	*(volatile u16 *)(q->avail + 4 + 2 * slot) = id;
	barrier();	/* the entry before the index that publishes it */
	q->avail_idx++;
	*(volatile u16 *)(q->avail + 2) = q->avail_idx;
	q->in_flight++;
}

/* The device is busy on the queue, or serves it on another trigger: no notify needed. */
#define VRING_USED_F_NO_NOTIFY 1

void vq_notify(struct virtq *q)
{
	/*
	 * A full fence between publishing the avail index and reading the used ring's flags
	 * (virtio 1.x, 2.7.13): the device may be clearing VRING_USED_F_NO_NOTIFY right now.
	 */
	__asm__ volatile("mfence" ::: "memory");
	if (*(volatile u16 *)q->used & VRING_USED_F_NO_NOTIFY)
		return;
	*q->notify = q->index;
}

bool vq_take(struct virtq *q, u32 *id, u32 *used_len)
{
	if (!q->ready || !vq_used_pending(q))
		return false;
	barrier();	/* the index before the element it covers */
	u16 slot = (u16)(q->used_seen & (q->size - 1));
	*id = *(volatile u32 *)(q->used + 4 + 8 * slot);
	*used_len = *(volatile u32 *)(q->used + 4 + 8 * slot + 4);
	q->used_seen++;
	if (q->in_flight)
		q->in_flight--;
	return true;
}
