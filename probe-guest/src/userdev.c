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
 */
#include "virtio.h"

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
#define REG_CLIENT_SEQ 0x2c
#define REG_IRQ_ACK 0x30
#define CONTROL_ENABLE 1
#define CONTROL_ACK_IRQS 2
#define LAPIC_EOI 0xb0
#define PCI_CAP_ID_MSI 0x05
#define MSI_VECTOR 0x41
#define MSI_ADDRESS 0xfee00000U
#define USERDEV_RATE_HZ 1000
#define USERDEV_BATCH 10
/* userdev_ack=1: one MSI per 100 ms, and the probe takes each within 10 ms. */
#define USERDEV_ACK_BATCH 100
#define MSR_APIC_BASE 0x1b
#define X2APIC_MSR_BASE 0x800

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

/* Finds and starts the device; false if it is not on the bus. */
static bool userdev_start(void)
{
	int slot = pci_find(USERDEV_VENDOR, USERDEV_DEVICE, USERDEV_DEVICE, 0);
	if (slot < 0)
		return false;
	userdev_broken = true;
	u64 bar = pci_bar_address((u8)slot, 0);
	if (!bar) {
		say_userdev("error no bar");
		return true;
	}
	pci_enable((u8)slot);
	volatile u8 *regs = (volatile u8 *)(uintptr_t)bar;
	if (mmio_rd32(regs, REG_ID) != USERDEV_MAGIC) {
		say_userdev("error bad id");
		return true;
	}
	if (!msi_setup((u8)slot)) {
		say_userdev("error no msi");
		return true;
	}
	u64 buf = (u64)(uintptr_t)userdev_buf;
	userdev_buf[0] = 0;
	userdev_buf[1] = 0;
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
	struct line l;
	line_start(&l, "userdev started");
	line_kv_dec(&l, "slot", (u64)slot);
	line_kv_hex(&l, "bar", bar);
	line_kv_hex(&l, "buf", buf);
	line_emit(&l);
	userdev_broken = false;
	return true;
}

void userdev_init(void)
{
	if (!userdev_start())
		say_userdev("absent");
}

/* Whether the LAPIC's IRR holds `vector` (xAPIC MMIO or x2APIC MSRs). */
static bool irr_pending(u32 vector)
{
	u64 base = rdmsr(MSR_APIC_BASE);
	u32 word;
	if (base & (1ULL << 10)) {
		word = (u32)rdmsr(X2APIC_MSR_BASE + 0x20 + vector / 32);
	} else {
		volatile u32 *apic = (volatile u32 *)(uintptr_t)(base & 0xffffff000ULL);
		word = apic[(0x200 + (vector / 32) * 0x10) / 4];
	}
	return word & (1U << (vector % 32));
}

/* Writes the LAPIC's EOI register (xAPIC MMIO or x2APIC MSR). */
static void lapic_eoi(void)
{
	u64 base = rdmsr(MSR_APIC_BASE);
	if (base & (1ULL << 10)) {
		wrmsr(X2APIC_MSR_BASE + (LAPIC_EOI >> 4), 0);
	} else {
		volatile u32 *apic = (volatile u32 *)(uintptr_t)(base & 0xffffff000ULL);
		apic[LAPIC_EOI / 4] = 0;
	}
}

/* Lets a pending MSI in for one instruction; if it came, EOI and acknowledge. */
static void userdev_take_msi(void)
{
	u64 before = userdev_msis;
	if (!irr_pending(MSI_VECTOR))
		return;
	/*
	 * KVM injects at a VM entry: each IRR read in the window is an exit, so
	 * the pending vector is taken within a few rounds.
	 */
	__asm__ volatile("sti" : : : "memory");
	for (int i = 0; i < 100 && userdev_msis == before; i++)
		(void)irr_pending(MSI_VECTOR);
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

void userdev_tick(void)
{
	if (!userdev_bar) {
		if (cfg.userdev_rescan && !userdev_broken)
			userdev_start();
		return;
	}
	if (cfg.userdev_ack)
		userdev_take_msi();
	/* Our count before the device's: the device's is never behind it. */
	u64 msis = userdev_msis;
	struct line l;
	line_start(&l, "userdev");
	line_kv_dec(&l, "counter", userdev_buf[0]);
	line_kv_dec(&l, "irqs", mmio_rd32(userdev_bar, REG_IRQ_COUNT));
	line_kv_dec(&l, "msi_pending", irr_pending(MSI_VECTOR));
	if (cfg.userdev_ack)
		line_kv_dec(&l, "msis", msis);
	line_kv_dec(&l, "client", mmio_rd32(userdev_bar, REG_CLIENT_SEQ));
	line_emit(&l);
}
