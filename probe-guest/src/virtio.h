/* PCI configuration mechanism #1 and a polled virtio-pci (modern) driver. */
#ifndef PROBE_VIRTIO_H
#define PROBE_VIRTIO_H

#include "probe.h"

static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outw(u16 port, u16 v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outl(u16 port, u32 v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

/* MMIO: one plain mov of the access size each (no string or SIMD ops). */
static inline u8 mmio_rd8(volatile u8 *base, u32 off)
{
	return *(volatile u8 *)(base + off);
}

static inline u16 mmio_rd16(volatile u8 *base, u32 off)
{
	return *(volatile u16 *)(base + off);
}

static inline u32 mmio_rd32(volatile u8 *base, u32 off)
{
	return *(volatile u32 *)(base + off);
}

static inline void mmio_wr8(volatile u8 *base, u32 off, u8 v)
{
	*(volatile u8 *)(base + off) = v;
}

static inline void mmio_wr16(volatile u8 *base, u32 off, u16 v)
{
	*(volatile u16 *)(base + off) = v;
}

static inline void mmio_wr32(volatile u8 *base, u32 off, u32 v)
{
	*(volatile u32 *)(base + off) = v;
}

#define barrier() __asm__ volatile("" ::: "memory")

/* pci.c: bus 0, function 0 of each slot only. */
#define PCI_SLOTS 32
#define PCI_CAP_ID_VENDOR 0x09
u32 pci_read32(u8 slot, u8 off);
u16 pci_read16(u8 slot, u8 off);
u8 pci_read8(u8 slot, u8 off);
void pci_write16(u8 slot, u8 off, u16 v);
/* First slot >= `from` whose ids match one of the two device ids, or -1. */
int pci_find(u16 vendor, u16 device_a, u16 device_b, u8 from);
/* Memory BAR `bar`'s address (64-bit BARs combined); 0 for I/O, absent or unset BARs. */
u64 pci_bar_address(u8 slot, u8 bar);
/* Offset of the next capability after `prev` (0: the first); 0 at the end. */
u8 pci_cap_next(u8 slot, u8 prev);
/* Turns on memory space decoding and bus mastering. */
void pci_enable(u8 slot);

/* virtio.c: transport (virtio 1.x over PCI, modern interface) and split virtqueues. */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_VSOCK 19
/* Queue size the probe uses; one request in flight per queue is all it needs. */
#define VQ_SIZE 8
#define VQ_MAX_BUFS 4
#define VQ_MAX 3	/* virtio-vsock has three queues */

struct virtq {
	u16 index;
	u16 size;
	bool ready;
	volatile u8 *desc;	/* 16 bytes per descriptor */
	volatile u8 *avail;	/* flags, idx, ring[size], used_event */
	volatile u8 *used;	/* flags, idx, {id u32, len u32}[size], avail_event */
	volatile u16 *notify;
	u16 avail_idx;		/* next avail->idx to publish */
	u16 used_seen;		/* used->idx consumed so far */
	u16 in_flight;		/* requests submitted and not yet seen in the used ring */
};

/* One guest buffer of a request. */
struct vbuf {
	u64 addr;
	u32 len;
	bool device_writes;
};

struct vdev {
	u8 slot;
	volatile u8 *common;
	volatile u8 *isr;
	volatile u8 *devcfg;
	volatile u8 *notify_base;
	u32 notify_mult;
	struct virtq q[VQ_MAX];
};

/*
 * Finds a virtio device of `type` (modern id 0x1040 + type, or its transitional
 * id), maps its capabilities, resets it and negotiates VERSION_1 only, up to
 * FEATURES_OK. Returns 1 when found and ready for queue setup, 0 when absent,
 * -1 on error with *why set.
 */
int virtio_open(struct vdev *d, u32 type, u64 mapped_end, u64 tsc_khz, const char **why);
/*
 * The same, also accepting those of feature bits 0-31 in `want` that the
 * device offers; *got = the ones accepted.
 */
int virtio_open_features(struct vdev *d, u32 type, u32 want, u32 *got, u64 mapped_end, u64 tsc_khz,
			 const char **why);
/* Reads `n` bytes of the device config at `off` (byte accesses, config generation checked). */
void virtio_cfg_read(struct vdev *d, u32 off, u8 *out, u32 n);
/* Reads a 64-bit device config field at `off` as two aligned 32-bit reads (generation checked). */
u64 virtio_cfg_read64(struct vdev *d, u32 off);
/* Sets up queue `index` (VQ_SIZE entries at most) in `ring` (one 4 KiB page the probe owns). */
bool virtio_queue_setup(struct vdev *d, u16 index, void *ring, const char **why);
/* The same with up to `want` entries (a power of two) in `ring_bytes` of page-aligned memory. */
bool virtio_queue_setup_sized(struct vdev *d, u16 index, void *ring, u32 ring_bytes, u16 want,
			      const char **why);
/* Sets DRIVER_OK and checks the device did not ask for a reset. */
bool virtio_driver_ok(struct vdev *d, const char **why);
/* Resets the device (status 0), e.g. after a failure. */
void virtio_reset(struct vdev *d);
/* Publishes one chain of `n` buffers and notifies the device. */
bool vq_submit(struct virtq *q, const struct vbuf *bufs, u32 n);
/* Takes one completion if there is one; returns whether it did. */
bool vq_poll(struct virtq *q, u32 *used_len);
/* Polls until a completion arrives or `timeout_ms` pass (calling io_poll_hook meanwhile). */
bool vq_wait(struct virtq *q, u32 *used_len, u64 timeout_ms, u64 tsc_khz);

/*
 * Many requests in flight (net.c): one descriptor per buffer, descriptor ids
 * chosen by the caller, no chains. vq_publish makes a head available without
 * notifying; vq_notify tells the device; vq_take returns the next used
 * element's head id and length.
 */
void vq_set_desc(struct virtq *q, u16 id, u64 addr, u32 len, bool device_writes);
void vq_publish(struct virtq *q, u16 id);
void vq_notify(struct virtq *q);
bool vq_take(struct virtq *q, u32 *id, u32 *used_len);

/* Whether the device has used buffers not yet taken: the cheap check of a poll. */
static inline bool vq_used_pending(const struct virtq *q)
{
	return *(volatile u16 *)(q->used + 2) != q->used_seen;
}

/* vdev.c: what `virtio=1` and `blk_io=1` do with the devices. */
void virtio_selftest(u64 mapped_end, u64 tsc_khz);
void blk_io_init(u64 mapped_end, u64 tsc_khz);
void blk_io_tick(u64 tsc_khz);

/* userdev.c: the vfio-user test device (`userdev=1`). */
void userdev_init(void);
void userdev_tick(void);
void userdev_poll(void);
extern u64 blk_io_ok, blk_io_err;

#endif
