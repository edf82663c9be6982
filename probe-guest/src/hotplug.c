/*
 * What `hotplug=1` does: poll the VMM's PCI hot-plug controller, a page of
 * 32-bit registers at PCI_HOTPLUG_PADDR where bit n stands for bus 0 slot n:
 * 0x00 INSERTED and 0x04 REMOVE_REQUESTED (reading clears them), 0x08 EJECT
 * (write: the guest released these slots) and 0x0C PRESENT. A guest with ACPI
 * gets an interrupt and runs the DSDT's methods; the probe has no ACPI
 * interpreter, so it reads both event registers at every input poll.
 *
 * A remove request for the slot of a device the probe drives: the driver
 * quiesces it (no new work, the work in flight finished, MSI, memory
 * decoding and bus mastering off) and marks it absent; then
 * `probe: hotplug remove slot=N dev=edu|userdev` and the EJECT write. A slot
 * the probe does not drive is ejected at once (dev=other). An inserted slot
 * is offered to the drivers, which start their device as at boot; then
 * `probe: hotplug insert slot=N dev=edu|userdev|other|none`.
 */
#include "hotplug.h"
#include "virtio.h"

#define HP_INSERTED 0x00
#define HP_REMOVE_REQUESTED 0x04
#define HP_EJECT 0x08
#define HP_PRESENT 0x0c
/* Slot 0 is the host bridge: never a hot-plug slot. */
#define HP_SLOTS_MASK 0xfffffffeU
/* Unclaimed MMIO reads as all-ones on our VMM. */
#define HP_NOTHING 0xffffffffU
#define PCI_COMMAND 0x04
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4

static volatile u8 *const hp_regs = (volatile u8 *)(uintptr_t)PCI_HOTPLUG_PADDR;
static bool hp_found, hp_vanished_noted;
/* Ejected slots whose device PRESENT still shows. */
static u32 hp_leaving;
u64 hotplug_removes, hotplug_inserts;

void hotplug_init(void)
{
	u32 present = mmio_rd32(hp_regs, HP_PRESENT);
	struct line l;
	if (present == HP_NOTHING) {
		say("hotplug absent");
		return;
	}
	hp_found = true;
	line_start(&l, "hotplug ready");
	line_kv_hex(&l, "present", present);
	line_emit(&l);
}

bool hotplug_slot_leaving(u8 slot)
{
	return slot < PCI_SLOTS && (hp_leaving & (1U << slot));
}

u16 hotplug_pci_quiesce(u8 slot, u8 msi_cap)
{
	if (msi_cap) {
		u16 control = pci_read16(slot, (u8)(msi_cap + 2));
		pci_write16(slot, (u8)(msi_cap + 2), (u16)(control & ~1));
	}
	u16 cmd = pci_read16(slot, PCI_COMMAND);
	pci_write16(slot, PCI_COMMAND, (u16)(cmd & ~(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)));
	return pci_read16(slot, PCI_COMMAND);
}

static void hp_event_line(const char *what, u32 slot, const char *dev, const char *note)
{
	struct line l;
	line_start(&l, what);
	line_kv_dec(&l, "slot", slot);
	line_kv_str(&l, "dev", dev);
	if (note)
		line_kv_str(&l, "note", note);
	line_emit(&l);
}

static void hp_remove(u8 slot)
{
	const char *dev = "other";
	if (cfg.edu && edu_driven_slot() == slot) {
		edu_release();
		dev = "edu";
	} else if (cfg.userdev && userdev_driven_slot() == slot) {
		userdev_release();
		dev = "userdev";
	}
	hotplug_removes++;
	hp_event_line("hotplug remove", slot, dev, NULL);
	hp_leaving |= 1U << slot;
	mmio_wr32(hp_regs, HP_EJECT, 1U << slot);
}

static void hp_insert(u8 slot)
{
	hp_leaving &= ~(1U << slot);
	enum hp_insert r = HP_NOT_MINE;
	const char *dev = (u16)pci_read32(slot, 0) == 0xffff ? "none" : "other";
	if (cfg.edu && (r = edu_insert(slot)) != HP_NOT_MINE)
		dev = "edu";
	else if (cfg.userdev && (r = userdev_insert(slot)) != HP_NOT_MINE)
		dev = "userdev";
	const char *note = NULL;
	if (r == HP_RUNNING)
		note = "already_running";
	else if (r == HP_FAILED)
		note = "unusable";
	hotplug_inserts++;
	hp_event_line("hotplug insert", slot, dev, note);
}

void hotplug_poll(void)
{
	if (!hp_found)
		return;
	/* Each read clears its register: one read each, then every bit is acted on. */
	u32 removed = mmio_rd32(hp_regs, HP_REMOVE_REQUESTED);
	u32 inserted = mmio_rd32(hp_regs, HP_INSERTED);
	if (removed == HP_NOTHING && inserted == HP_NOTHING) {
		/* The controller went away (e.g. a VMM without one took over). */
		if (!hp_vanished_noted)
			say("note hotplug controller reads all-ones, ignored");
		hp_vanished_noted = true;
		return;
	}
	removed &= HP_SLOTS_MASK;
	inserted &= HP_SLOTS_MASK;
	/* Removals first, so a device that moved to another slot is free to start there. */
	for (u8 slot = 1; slot < PCI_SLOTS; slot++)
		if (removed & (1U << slot))
			hp_remove(slot);
	for (u8 slot = 1; slot < PCI_SLOTS; slot++) {
		u32 bit = 1U << slot;
		if (!(inserted & bit))
			continue;
		if (removed & bit) {
			/* Added, then asked back before this poll: ejected above, not started. */
			hotplug_inserts++;
			hp_event_line("hotplug insert", slot, "other", "asked_back");
		} else {
			hp_insert(slot);
		}
	}
	if (hp_leaving) {
		u32 present = mmio_rd32(hp_regs, HP_PRESENT);
		if (present != HP_NOTHING)
			hp_leaving &= present;
	}
}
