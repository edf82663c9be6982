/*
 * What `userdev=1` does: drive the vfio-user test device (PCI 1234:5aa5,
 * vfio_user::testdev). At boot: enable it, point its MSI at vector 0x41 of
 * CPU 0, and start its DMA engine into a buffer of ours. Each status interval:
 * `probe: userdev counter=N irqs=M msi_pending=0|1`, where counter is what the
 * device last wrote into our buffer, irqs its interrupt count register, and
 * msi_pending whether the LAPIC holds our vector in its IRR (interrupts stay
 * disabled, so a delivered MSI stays pending there).
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
#define PCI_CAP_ID_MSI 0x05
#define MSI_VECTOR 0x41
#define MSI_ADDRESS 0xfee00000U
#define USERDEV_RATE_HZ 1000
#define USERDEV_BATCH 10
#define MSR_APIC_BASE 0x1b
#define X2APIC_MSR_BASE 0x800

/* The DMA buffer lives in .bss: inside the image, below the pattern. */
static volatile u64 userdev_buf[2] __attribute__((aligned(64)));
static volatile u8 *userdev_bar;

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

void userdev_init(void)
{
	int slot = pci_find(USERDEV_VENDOR, USERDEV_DEVICE, USERDEV_DEVICE, 0);
	if (slot < 0) {
		say_userdev("absent");
		return;
	}
	u64 bar = pci_bar_address((u8)slot, 0);
	if (!bar) {
		say_userdev("error no bar");
		return;
	}
	pci_enable((u8)slot);
	volatile u8 *regs = (volatile u8 *)(uintptr_t)bar;
	if (mmio_rd32(regs, REG_ID) != USERDEV_MAGIC) {
		say_userdev("error bad id");
		return;
	}
	if (!msi_setup((u8)slot)) {
		say_userdev("error no msi");
		return;
	}
	u64 buf = (u64)(uintptr_t)userdev_buf;
	userdev_buf[0] = 0;
	userdev_buf[1] = 0;
	mmio_wr32(regs, REG_DMA_ADDR_LO, (u32)buf);
	mmio_wr32(regs, REG_DMA_ADDR_HI, (u32)(buf >> 32));
	mmio_wr32(regs, REG_DMA_LEN, sizeof(userdev_buf));
	mmio_wr32(regs, REG_RATE_HZ, USERDEV_RATE_HZ);
	mmio_wr32(regs, REG_BATCH, USERDEV_BATCH);
	mmio_wr32(regs, REG_CONTROL, 1);
	userdev_bar = regs;
	struct line l;
	line_start(&l, "userdev started");
	line_kv_dec(&l, "slot", (u64)slot);
	line_kv_hex(&l, "bar", bar);
	line_kv_hex(&l, "buf", buf);
	line_emit(&l);
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

void userdev_tick(void)
{
	if (!userdev_bar)
		return;
	struct line l;
	line_start(&l, "userdev");
	line_kv_dec(&l, "counter", userdev_buf[0]);
	line_kv_dec(&l, "irqs", mmio_rd32(userdev_bar, REG_IRQ_COUNT));
	line_kv_dec(&l, "msi_pending", irr_pending(MSI_VECTOR));
	line_emit(&l);
}
