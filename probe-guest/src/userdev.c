/*
 * What `userdev=1` does: drive the vfio-user test device (PCI 1234:5aa5,
 * vfio_user::testdev). At boot: enable it, point its MSI at vector 0x41 of
 * CPU 0, and start its DMA engine into a buffer of ours. Each status interval:
 * `probe: userdev counter=N irqs=M msi_pending=0|1`, where counter is what the
 * device last wrote into our buffer, irqs its interrupt count register, and
 * msi_pending whether the LAPIC holds our vector in its IRR (interrupts stay
 * disabled, so a delivered MSI stays pending there).
 *
 * `userdev_ack=1` (with userdev) counts the MSIs one by one: the device runs
 * in acknowledge mode (CONTROL bit 1: its next interrupt waits for our write
 * to IRQ_ACK), one interrupt per 100 records (100 ms). Every 10 ms (the input
 * poll) and before each status line, if vector 0x41 is pending in the IRR, the
 * probe opens a short interrupt window (the 8259s are masked, so nothing else
 * comes) in which a handler counts it; then EOI and IRQ_ACK. The line adds
 * `msis=K`, the MSIs taken: equal to irqs, or one behind with an interrupt in
 * flight. An MSI lost for good stops both (the device waits for an ack that
 * never comes).
 * Every line also has `client=C`, the device's CLIENT_SEQ register.
 *
 * `userdev=2` also rescans the PCI bus before each status line while the
 * device is absent (the VMM has no ACPI to announce a hot-added device), and
 * starts it when it appears.
 *
 * With hotplug=1 (hotplug.c) the device can go and come back: userdev_release
 * stops its DMA engine, turns MSI, memory decoding and bus mastering off and
 * marks it absent; userdev_insert starts it again as at boot (the buffer
 * keeps the last record; counter and irqs are the device's own, so a device
 * that starts over counts from 0 again). The line gains present=0|1,
 * unplugs=N and plugs=N, and is still printed, with the values last read,
 * while the device is absent. A rescan skips a slot ejected but not yet gone.
 */
#include "virtio.h"
#include "hotplug.h"

#define USERDEV_VENDOR 0x1234
#define USERDEV_DEVICE 0x5aa5
#define USERDEV_MAGIC 0x55444556
#define REG_ID 0x00
#define REG_CONTROL 0x04
#define REG_DMA_ADDR_LO 0x08
#define REG_DMA_ADDR_HI 0x0c
#define REG_DMA_LEN 0x10
#define REG_RATE_HZ 0x14
#define REG_IRQ_COUNT 0x20
#define REG_BATCH 0x24
#define REG_STATUS 0x28
#define REG_CLIENT_SEQ 0x2c
#define REG_IRQ_ACK 0x30
#define CONTROL_ENABLE 1
#define CONTROL_ACK_IRQS 2
#define STATUS_RUNNING 1
#define USERDEV_STOP_POLLS 1000
#define PCI_CAP_ID_MSI 0x05
#define MSI_VECTOR 0x41
#define MSI_ADDRESS 0xfee00000U
#define USERDEV_RATE_HZ 1000
#define USERDEV_BATCH 10
/* userdev_ack=1: one MSI per 100 ms, and the probe takes each within 10 ms. */
#define USERDEV_ACK_BATCH 100

/* The DMA buffer lives in .bss: inside the image, below the pattern. */
static volatile u64 userdev_buf[2] __attribute__((aligned(64)));
static volatile u8 *userdev_bar;
/* MSIs taken by userdev_msi_entry (userdev_ack=1). */
volatile u64 userdev_msis;
void userdev_msi_entry(void);
/* Counts one MSI; EOI and acknowledgement follow in userdev_take_msi. */
__asm__(".text\n"
	".globl userdev_msi_entry\n"
	"userdev_msi_entry:\n"
	"	lock incq userdev_msis(%rip)\n"
	"	iretq\n");
/* Found but unusable: do not rescan (and complain) again. */
static bool userdev_broken;
static u8 userdev_slot, userdev_msi_cap;
/* Started at least once: the line is printed while it is absent. */
static bool userdev_seen;
/* The device's registers as last read before a release, shown while it is absent. */
static u64 absent_counter;
static u32 absent_irqs, absent_client;
static u64 userdev_unplugs, userdev_plugs;

static void say_userdev(const char *what)
{
	struct line l;
	line_start(&l, "userdev ");
	line_str(&l, what);
	line_emit(&l);
}

/* Programs the MSI capability; false if the device has none. */
static bool msi_setup(u8 slot)
{
	for (u8 cap = pci_cap_next(slot, 0); cap; cap = pci_cap_next(slot, cap)) {
		if (pci_read8(slot, cap) != PCI_CAP_ID_MSI)
			continue;
		userdev_msi_cap = cap;
		u16 control = pci_read16(slot, (u8)(cap + 2));
		bool is_64bit = control & 0x80;
		pci_write16(slot, (u8)(cap + 4), (u16)MSI_ADDRESS);
		pci_write16(slot, (u8)(cap + 6), (u16)(MSI_ADDRESS >> 16));
		u8 data = is_64bit ? 12 : 8;
		if (is_64bit) {
			pci_write16(slot, (u8)(cap + 8), 0);
			pci_write16(slot, (u8)(cap + 10), 0);
		}
		pci_write16(slot, (u8)(cap + data), MSI_VECTOR);
		/* One vector (multiple message enable 0), MSI on. */
		pci_write16(slot, (u8)(cap + 2), (u16)((control & ~0x70) | 1));
		return true;
	}
	return false;
}

static bool is_userdev(u8 slot)
{
	u32 ids = pci_read32(slot, 0);
	return (u16)ids == USERDEV_VENDOR && (u16)(ids >> 16) == USERDEV_DEVICE;
}

/* Starts the device in `slot`; false (and userdev_broken) if it is unusable. */
static bool userdev_start_at(u8 slot)
{
	userdev_broken = true;
	userdev_msi_cap = 0;
	u64 bar = pci_bar_address(slot, 0);
	if (!bar) {
		say_userdev("error no bar");
		return true;
	}
	pci_enable(slot);
	volatile u8 *regs = (volatile u8 *)(uintptr_t)bar;
	if (mmio_rd32(regs, REG_ID) != USERDEV_MAGIC) {
		say_userdev("error bad id");
		return true;
	}
	if (!msi_setup(slot)) {
		say_userdev("error no msi");
		return true;
	}
	u64 buf = (u64)(uintptr_t)userdev_buf;
	/* After an unplug the last record stays until the device writes the next. */
	if (!userdev_seen) {
		userdev_buf[0] = 0;
		userdev_buf[1] = 0;
	}
	mmio_wr32(regs, REG_DMA_ADDR_LO, (u32)buf);
	mmio_wr32(regs, REG_DMA_ADDR_HI, (u32)(buf >> 32));
	mmio_wr32(regs, REG_DMA_LEN, sizeof(userdev_buf));
	mmio_wr32(regs, REG_RATE_HZ, USERDEV_RATE_HZ);
	mmio_wr32(regs, REG_BATCH, cfg.userdev_ack ? USERDEV_ACK_BATCH : USERDEV_BATCH);
	if (cfg.userdev_ack) {
		idt_set_handler(MSI_VECTOR, userdev_msi_entry);
		/* Only our MSI may come in the window: mask the 8259s (the PIT ticks). */
		outb(0x21, 0xff);
		outb(0xa1, 0xff);
	}
	mmio_wr32(regs, REG_CONTROL,
		  CONTROL_ENABLE | (cfg.userdev_ack ? CONTROL_ACK_IRQS : 0));
	userdev_bar = regs;
	userdev_slot = slot;
	userdev_seen = true;
	struct line l;
	line_start(&l, "userdev started");
	line_kv_dec(&l, "slot", (u64)slot);
	line_kv_hex(&l, "bar", bar);
	line_kv_hex(&l, "buf", buf);
	line_emit(&l);
	userdev_broken = false;
	return true;
}

/* Finds and starts the device; false if it is not on the bus. */
static bool userdev_start(void)
{
	for (u8 slot = 0; slot < PCI_SLOTS; slot++) {
		if (!is_userdev(slot) || hotplug_slot_leaving(slot))
			continue;
		/* A rescan that finds it again after an unplug is a plug as well. */
		bool again = userdev_seen;
		if (userdev_start_at(slot) && again)
			userdev_plugs++;
		return true;
	}
	return false;
}

void userdev_init(void)
{
	if (!userdev_start())
		say_userdev("absent");
}

/* Lets a pending MSI in for one instruction; if it came, EOI and acknowledge. */
static void userdev_take_msi(void)
{
	u64 before = userdev_msis;
	if (!lapic_irr_pending(MSI_VECTOR))
		return;
	/*
	 * KVM injects at a VM entry: each IRR read in the window is an exit, so
	 * the pending vector is taken within a few rounds.
	 */
	__asm__ volatile("sti" : : : "memory");
	for (int i = 0; i < 100 && userdev_msis == before; i++)
		(void)lapic_irr_pending(MSI_VECTOR);
	__asm__ volatile("cli" : : : "memory");
	if (userdev_msis == before)
		return;
	lapic_eoi();
	mmio_wr32(userdev_bar, REG_IRQ_ACK, 1);
}

/* Every input poll (10 ms): with userdev_ack=1, take the MSI if one came. */
void userdev_poll(void)
{
	if (userdev_bar && cfg.userdev_ack)
		userdev_take_msi();
}

int userdev_driven_slot(void)
{
	return userdev_bar ? userdev_slot : -1;
}

void userdev_release(void)
{
	if (!userdev_bar)
		return;
	if (cfg.userdev_ack)
		userdev_take_msi();
	/* No new records: the write is answered after any record in progress. */
	mmio_wr32(userdev_bar, REG_CONTROL, 0);
	for (u32 i = 0; i < USERDEV_STOP_POLLS; i++)
		if (!(mmio_rd32(userdev_bar, REG_STATUS) & STATUS_RUNNING))
			break;
	absent_counter = userdev_buf[0];
	absent_irqs = mmio_rd32(userdev_bar, REG_IRQ_COUNT);
	absent_client = mmio_rd32(userdev_bar, REG_CLIENT_SEQ);
	(void)hotplug_pci_quiesce(userdev_slot, userdev_msi_cap);
	userdev_bar = NULL;
	userdev_unplugs++;
}

enum hp_insert userdev_insert(u8 slot)
{
	if (!is_userdev(slot))
		return HP_NOT_MINE;
	if (userdev_bar)
		return slot == userdev_slot ? HP_RUNNING : HP_NOT_MINE;	/* one at a time */
	if (!userdev_start_at(slot))
		return HP_FAILED;
	userdev_plugs++;
	return HP_STARTED;
}

void userdev_tick(void)
{
	bool present = userdev_bar != NULL;
	if (!present) {
		if (cfg.userdev_rescan && !userdev_broken && userdev_start())
			return;
		if (!cfg.hotplug || !userdev_seen)
			return;
	}
	if (present && cfg.userdev_ack)
		userdev_take_msi();
	/* Our count before the device's: the device's is never behind it. */
	u64 msis = userdev_msis;
	struct line l;
	line_start(&l, "userdev");
	line_kv_dec(&l, "counter", present ? userdev_buf[0] : absent_counter);
	line_kv_dec(&l, "irqs", present ? mmio_rd32(userdev_bar, REG_IRQ_COUNT) : absent_irqs);
	line_kv_dec(&l, "msi_pending", lapic_irr_pending(MSI_VECTOR));
	if (cfg.userdev_ack)
		line_kv_dec(&l, "msis", msis);
	line_kv_dec(&l, "client", present ? mmio_rd32(userdev_bar, REG_CLIENT_SEQ) : absent_client);
	if (cfg.hotplug) {
		line_kv_dec(&l, "present", present);
		line_kv_dec(&l, "unplugs", userdev_unplugs);
		line_kv_dec(&l, "plugs", userdev_plugs);
	}
	line_emit(&l);
}
