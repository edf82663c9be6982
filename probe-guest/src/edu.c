/*
 * What `edu=1` does: drive QEMU's edu teaching device (PCI 1234:11e8), which
 * the VMM passes through with kernel VFIO. Register layout from QEMU's
 * docs/specs/edu.rst: 0x00 identification 0xRRrr00ed, 0x04 liveness (reads
 * back the inverse of what was written), 0x24 interrupt status, 0x64
 * interrupt acknowledge, 0x80/0x88/0x90 DMA source, destination, count, 0x98
 * DMA command (bit 0 start/busy, bit 1 device-to-RAM, bit 2 raise interrupt
 * 0x100 when done). The device's DMA buffer is at 0x40000 in its own address
 * space; it only reaches 28-bit bus addresses, which our .bss is below.
 *
 * At boot: check the identification and liveness registers, leave a mark in
 * the liveness register, program MSI, and run EDU_BOOT_ROUNDS round trips
 * (RAM -> device buffer -> RAM, each transfer with an interrupt). Each status
 * interval: one more round trip, then the line
 *   probe: edu id=0x.. live=ok|bad dma=N irqs=M errors=E
 * with, before errors, mark=ok|lost (the liveness register still holds the
 * mark), cmd=0x.. (the PCI command register: a device reset would clear its
 * memory and bus-master bits, and MSI with it), pause_dma=P pause_irqs=Q
 * pause_gap_us=G pause_irq_wait_us=W. dma counts transfers that completed (two per round trip,
 * the data compared after the second), irqs the MSIs taken, errors everything
 * else (timeouts, data mismatches, missing interrupts, a lost mark).
 *
 * A transfer is polled every 100 us. When the poll that sees it done comes
 * more than EDU_PAUSE_MS after the poll that saw it busy, the vCPU did not run
 * in between (a live update's pause): the device finished the transfer, and
 * raised its MSI, while the guest was paused (or in the 100 us before).
 * pause_dma counts those transfers, pause_irqs their MSIs taken afterwards,
 * pause_gap_us is the last such gap and pause_irq_wait_us how long after the
 * done poll its MSI was pending (KVM injects a signal that waited in the
 * eventfd from a work queue once the irqfd is registered again).
 *
 * Interrupts stay disabled in the probe except for a short window per
 * transfer: once the transfer's vector is pending in the IRR, the probe lets
 * it in (edu_msi_entry counts it), sends the EOI and acknowledges the
 * device, so one vector serves every transfer and none can merge with the
 * next.
 *
 * With hotplug=1 (hotplug.c) the device can go and come back: edu_release
 * waits for the transfer in flight, turns MSI, memory decoding and bus
 * mastering off and marks it absent; edu_insert starts it again as at boot.
 * dma, irqs and errors carry on across; the line gains present=0|1,
 * unplugs=N and plugs=N, and is still printed (frozen) while it is absent.
 */
#include "edu.h"
#include "hotplug.h"
#include "virtio.h"

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8
#define EDU_ID 0x00
#define EDU_LIVENESS 0x04
#define EDU_MARK 0x5eedcafeU
#define EDU_PAUSE_MS 50
#define PCI_COMMAND 0x04
#define EDU_IRQ_STATUS 0x24
#define EDU_IRQ_ACK 0x64
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_COUNT 0x90
#define EDU_DMA_CMD 0x98
#define EDU_CMD_START 0x1
#define EDU_CMD_TO_RAM 0x2
#define EDU_CMD_IRQ 0x4
#define EDU_DEV_BUF 0x40000
#define EDU_XFER 1024
#define EDU_BOOT_ROUNDS 4
#define EDU_TIMEOUT_MS 5000
#define PCI_CAP_ID_MSI 0x05
#define MSI_ADDRESS 0xfee00000U
#define EDU_VECTOR 0x51

/* Source and destination of the round trips: .bss, inside the probe image. */
static volatile u8 edu_src[EDU_XFER] __attribute__((aligned(4096)));
static volatile u8 edu_dst[EDU_XFER] __attribute__((aligned(4096)));
static volatile u8 *edu_regs;
static u8 edu_slot;
static u8 edu_msi_data;	/* offset of the MSI data register, 0 without MSI */
static u8 edu_msi_cap;	/* offset of the MSI capability, 0 without MSI */
static bool edu_seen;	/* started at least once: the line is printed while it is absent */
static u16 edu_cmd_absent;	/* the command register as left at the last release */
static u64 edu_unplugs, edu_plugs;
static u32 edu_id;
static bool edu_live, edu_mark_lost;
static u64 edu_khz;
static u64 dma_done, irqs_seen, edu_errors, round_seq;
static u64 pause_dma, pause_irqs, pause_gap, pause_irq_wait;
/* MSIs taken by edu_msi_entry. */
volatile u64 edu_msis;
void edu_msi_entry(void);
__asm__(".text\n"
	".globl edu_msi_entry\n"
	"edu_msi_entry:\n"
	"	lock incq edu_msis(%rip)\n"
	"	iretq\n");

static void say_edu(const char *what)
{
	struct line l;
	line_start(&l, "edu ");
	line_str(&l, what);
	line_emit(&l);
}

/* Lets the pending vector in (a few exits: KVM injects at an entry); true if taken. */
static bool edu_take_msi(void)
{
	u64 before = edu_msis;
	__asm__ volatile("sti" : : : "memory");
	for (int i = 0; i < 100 && edu_msis == before; i++)
		(void)lapic_irr_pending(EDU_VECTOR);
	__asm__ volatile("cli" : : : "memory");
	if (edu_msis == before)
		return false;
	lapic_eoi();
	return true;
}

/* Finds the MSI capability, points it at CPU 0 and enables one vector. */
static bool edu_msi_enable(void)
{
	for (u8 cap = pci_cap_next(edu_slot, 0); cap; cap = pci_cap_next(edu_slot, cap)) {
		if (pci_read8(edu_slot, cap) != PCI_CAP_ID_MSI)
			continue;
		u16 control = pci_read16(edu_slot, (u8)(cap + 2));
		bool wide = control & 0x80;
		pci_write16(edu_slot, (u8)(cap + 4), (u16)MSI_ADDRESS);
		pci_write16(edu_slot, (u8)(cap + 6), (u16)(MSI_ADDRESS >> 16));
		if (wide) {
			pci_write16(edu_slot, (u8)(cap + 8), 0);
			pci_write16(edu_slot, (u8)(cap + 10), 0);
		}
		edu_msi_cap = cap;
		edu_msi_data = (u8)(cap + (wide ? 12 : 8));
		pci_write16(edu_slot, edu_msi_data, EDU_VECTOR);
		pci_write16(edu_slot, (u8)(cap + 2), (u16)((control & ~0x70) | 1));
		return true;
	}
	return false;
}

static u64 ms_to_ticks(u64 ms)
{
	return ms * (edu_khz ? edu_khz : 2000000);
}

/* One transfer; returns false (and counts an error) on a timeout. */
static bool edu_transfer(u64 src, u64 dst, u32 cmd)
{
	bool msi = edu_msi_data != 0;
	if (msi)
		cmd |= EDU_CMD_IRQ;
	mmio_wr32(edu_regs, EDU_DMA_SRC, (u32)src);
	mmio_wr32(edu_regs, EDU_DMA_DST, (u32)dst);
	mmio_wr32(edu_regs, EDU_DMA_COUNT, EDU_XFER);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	mmio_wr32(edu_regs, EDU_DMA_CMD, cmd | EDU_CMD_START);
	u64 deadline = rdtsc() + ms_to_ticks(EDU_TIMEOUT_MS);
	u64 pause = ms_to_ticks(EDU_PAUSE_MS);
	/*
	 * The VMM samples the register while handling the read's exit, before it
	 * may pause the vCPU: a read that took no pause saw the device after any
	 * pause before it, and the busy read before it saw the device before.
	 */
	u64 busy_at = rdtsc(), gap = 0;
	for (;;) {
		u64 start = rdtsc();
		bool busy = mmio_rd32(edu_regs, EDU_DMA_CMD) & EDU_CMD_START;
		u64 end = rdtsc();
		if (!busy) {
			if (end - start < pause)
				gap = start - busy_at;
			break;
		}
		/* A pause is not the device's time. */
		if (end - busy_at > pause)
			deadline += end - busy_at;
		busy_at = start;
		if (end > deadline) {
			say_edu("error dma timeout");
			edu_errors++;
			return false;
		}
		/* Each poll is an exit to the VMM: poll every 100 us, not flat out. */
		u64 next = rdtsc() + ms_to_ticks(1) / 10;
		while (rdtsc() < next)
			cpu_relax();
	}
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	dma_done++;
	bool in_pause = gap > pause;
	if (in_pause) {
		pause_dma++;
		pause_gap = gap;
	}
	if (!msi)
		return true;
	u64 done_at = rdtsc();
	deadline = done_at + ms_to_ticks(EDU_TIMEOUT_MS);
	while (!lapic_irr_pending(EDU_VECTOR)) {
		if (rdtsc() > deadline) {
			say_edu("error no interrupt");
			edu_errors++;
			break;
		}
		cpu_relax();
	}
	if (lapic_irr_pending(EDU_VECTOR)) {
		if (in_pause)
			pause_irq_wait = rdtsc() - done_at;
		if (edu_take_msi()) {
			irqs_seen++;
			if (in_pause)
				pause_irqs++;
		} else {
			say_edu("error msi pending but not taken");
			edu_errors++;
		}
	}
	u32 status = mmio_rd32(edu_regs, EDU_IRQ_STATUS);
	if (status)
		mmio_wr32(edu_regs, EDU_IRQ_ACK, status);
	return true;
}

/* RAM -> device buffer -> RAM, then compare. */
static void edu_round_trip(void)
{
	round_seq++;
	for (u32 i = 0; i < EDU_XFER; i++) {
		edu_src[i] = (u8)(i * 7 + round_seq * 13 + 1);
		edu_dst[i] = 0;
	}
	u64 src = (u64)(uintptr_t)edu_src;
	u64 dst = (u64)(uintptr_t)edu_dst;
	if (!edu_transfer(src, EDU_DEV_BUF, 0))
		return;
	if (!edu_transfer(EDU_DEV_BUF, dst, EDU_CMD_TO_RAM))
		return;
	for (u32 i = 0; i < EDU_XFER; i++) {
		if (edu_dst[i] != edu_src[i]) {
			struct line l;
			line_start(&l, "edu error dma mismatch");
			line_kv_dec(&l, "offset", i);
			line_kv_hex(&l, "got", edu_dst[i]);
			line_kv_hex(&l, "want", edu_src[i]);
			line_emit(&l);
			edu_errors++;
			return;
		}
	}
}

static void edu_report(void)
{
	struct line l;
	line_start(&l, "edu");
	line_kv_hex(&l, "id", edu_id);
	line_kv_str(&l, "live", edu_live ? "ok" : "bad");
	line_kv_dec(&l, "dma", dma_done);
	line_kv_dec(&l, "irqs", irqs_seen);
	line_kv_str(&l, "mark", edu_mark_lost ? "lost" : "ok");
	line_kv_hex(&l, "cmd", edu_regs ? pci_read16(edu_slot, PCI_COMMAND) : edu_cmd_absent);
	line_kv_dec(&l, "pause_dma", pause_dma);
	line_kv_dec(&l, "pause_irqs", pause_irqs);
	line_kv_dec(&l, "pause_gap_us", edu_khz ? pause_gap * 1000 / edu_khz : 0);
	line_kv_dec(&l, "pause_irq_wait_us", edu_khz ? pause_irq_wait * 1000 / edu_khz : 0);
	line_kv_dec(&l, "errors", edu_errors);
	if (cfg.hotplug) {
		line_kv_dec(&l, "present", edu_regs != NULL);
		line_kv_dec(&l, "unplugs", edu_unplugs);
		line_kv_dec(&l, "plugs", edu_plugs);
	}
	line_emit(&l);
}

static bool is_edu(u8 slot)
{
	u32 ids = pci_read32(slot, 0);
	return (u16)ids == EDU_VENDOR && (u16)(ids >> 16) == EDU_DEVICE;
}

/* Checks and starts the edu in `slot` (BAR, identification, liveness, MSI); false if unusable. */
static bool edu_start(u8 slot)
{
	edu_slot = slot;
	u64 bar = pci_bar_address(edu_slot, 0);
	if (!bar) {
		say_edu("error no bar");
		return false;
	}
	pci_enable(edu_slot);
	volatile u8 *regs = (volatile u8 *)(uintptr_t)bar;
	edu_id = mmio_rd32(regs, EDU_ID);
	if ((edu_id & 0xffff) != 0x00ed) {
		struct line l;
		line_start(&l, "edu error bad id");
		line_kv_hex(&l, "id", edu_id);
		line_emit(&l);
		return false;
	}
	edu_live = true;
	static const u32 probes[] = { 0x12345678, 0xa5a5f00f, 0 };
	for (u32 i = 0; i < sizeof(probes) / sizeof(probes[0]); i++) {
		mmio_wr32(regs, EDU_LIVENESS, probes[i]);
		if (mmio_rd32(regs, EDU_LIVENESS) != ~probes[i])
			edu_live = false;
	}
	if (!edu_live)
		edu_errors++;
	/* Stays until the device is reset or the guest writes again: checked every tick. */
	mmio_wr32(regs, EDU_LIVENESS, EDU_MARK);
	idt_set_handler(EDU_VECTOR, edu_msi_entry);
	/*
	 * The MSI window opens interrupts: mask the 8259s, whose timer IRQ would
	 * otherwise come in as vector 0 through LINT0 (the PIC is never set up).
	 */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	edu_msi_cap = 0;
	edu_msi_data = 0;
	if (!edu_msi_enable()) {
		say_edu("error no msi");
		edu_errors++;
	}
	edu_regs = regs;
	edu_seen = true;
	struct line l;
	line_start(&l, "edu started");
	line_kv_dec(&l, "slot", edu_slot);
	line_kv_hex(&l, "bar", bar);
	line_kv_hex(&l, "src", (u64)(uintptr_t)edu_src);
	line_kv_hex(&l, "dst", (u64)(uintptr_t)edu_dst);
	line_emit(&l);
	return true;
}

void edu_init(u64 tsc_khz)
{
	edu_khz = tsc_khz;
	int slot = pci_find(EDU_VENDOR, EDU_DEVICE, EDU_DEVICE, 0);
	if (slot < 0) {
		say_edu("absent");
		return;
	}
	if (!edu_start((u8)slot))
		return;
	for (u32 i = 0; i < EDU_BOOT_ROUNDS; i++)
		edu_round_trip();
	edu_report();
}

int edu_driven_slot(void)
{
	return edu_regs ? edu_slot : -1;
}

void edu_release(void)
{
	if (!edu_regs)
		return;
	/* Transfers run to completion inside a tick; one that timed out may still be busy. */
	u64 deadline = rdtsc() + ms_to_ticks(EDU_TIMEOUT_MS);
	while (mmio_rd32(edu_regs, EDU_DMA_CMD) & EDU_CMD_START) {
		if (rdtsc() > deadline) {
			say_edu("error dma busy at release");
			edu_errors++;
			break;
		}
		u64 next = rdtsc() + ms_to_ticks(1) / 10;
		while (rdtsc() < next)
			cpu_relax();
	}
	/* A late MSI (of a transfer that timed out) must not count for the next device's first. */
	if (edu_msi_data && lapic_irr_pending(EDU_VECTOR))
		(void)edu_take_msi();
	u32 status = mmio_rd32(edu_regs, EDU_IRQ_STATUS);
	if (status)
		mmio_wr32(edu_regs, EDU_IRQ_ACK, status);
	edu_cmd_absent = hotplug_pci_quiesce(edu_slot, edu_msi_cap);
	edu_regs = NULL;
	edu_msi_cap = 0;
	edu_msi_data = 0;
	edu_unplugs++;
}

enum hp_insert edu_insert(u8 slot)
{
	if (!is_edu(slot))
		return HP_NOT_MINE;
	if (edu_regs)
		return slot == edu_slot ? HP_RUNNING : HP_NOT_MINE;	/* one edu at a time */
	if (!edu_start(slot))
		return HP_FAILED;
	edu_plugs++;
	return HP_STARTED;
}

void edu_tick(void)
{
	if (!edu_regs) {
		/* Absent after an unplug: the counters as they were, nothing touched. */
		if (cfg.hotplug && edu_seen)
			edu_report();
		return;
	}
	if (!edu_mark_lost && mmio_rd32(edu_regs, EDU_LIVENESS) != ~EDU_MARK) {
		say_edu("error liveness mark lost");
		edu_mark_lost = true;
		edu_errors++;
	}
	edu_round_trip();
	edu_report();
}
