/* PCI configuration space through mechanism #1 (ports 0xcf8/0xcfc), bus 0. */
#include "virtio.h"

#define PCI_ADDR_PORT 0xcf8
#define PCI_DATA_PORT 0xcfc
#define PCI_ENABLE (1U << 31)
#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_CAP_PTR 0x34
#define PCI_BAR0 0x10
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4

static void pci_select(u8 slot, u8 off)
{
	outl(PCI_ADDR_PORT, PCI_ENABLE | ((u32)(slot & 0x1f) << 11) | (off & 0xfc));
}

/* Only dword reads: every host bridge implements them. */
u32 pci_read32(u8 slot, u8 off)
{
	pci_select(slot, off);
	return inl(PCI_DATA_PORT);
}

u16 pci_read16(u8 slot, u8 off)
{
	return (u16)(pci_read32(slot, off) >> ((off & 2) * 8));
}

u8 pci_read8(u8 slot, u8 off)
{
	return (u8)(pci_read32(slot, off) >> ((off & 3) * 8));
}

/* A 16-bit write, so the neighbouring word (e.g. the RW1C status) is untouched. */
void pci_write16(u8 slot, u8 off, u16 v)
{
	pci_select(slot, off);
	outw((u16)(PCI_DATA_PORT + (off & 2)), v);
}

int pci_find(u16 vendor, u16 device_a, u16 device_b, u8 from)
{
	for (u32 slot = from; slot < PCI_SLOTS; slot++) {
		u32 ids = pci_read32((u8)slot, 0);
		if ((u16)ids != vendor)
			continue;
		u16 device = (u16)(ids >> 16);
		if (device == device_a || device == device_b)
			return (int)slot;
	}
	return -1;
}

u64 pci_bar_address(u8 slot, u8 bar)
{
	if (bar > 5)
		return 0;
	u8 off = (u8)(PCI_BAR0 + 4 * bar);
	u32 lo = pci_read32(slot, off);
	if (lo & 1)
		return 0;	/* I/O BAR */
	u64 addr = lo & ~0xfULL;
	if (((lo >> 1) & 3) == 2 && bar < 5)
		addr |= (u64)pci_read32(slot, (u8)(off + 4)) << 32;
	return addr;
}

u8 pci_cap_next(u8 slot, u8 prev)
{
	u8 next;
	if (!prev) {
		if (!(pci_read16(slot, PCI_STATUS) & PCI_STATUS_CAP_LIST))
			return 0;
		next = pci_read8(slot, PCI_CAP_PTR);
	} else {
		next = pci_read8(slot, (u8)(prev + 1));
	}
	next &= 0xfc;
	/* Capabilities live above the standard header; anything else ends the list. */
	return next >= 0x40 ? next : 0;
}

void pci_enable(u8 slot)
{
	u16 cmd = pci_read16(slot, PCI_COMMAND);
	pci_write16(slot, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
}
