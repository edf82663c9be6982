/* hotplug.c: the VMM's PCI hot-plug controller, polled (`hotplug=1`). */
#ifndef PROBE_HOTPLUG_H
#define PROBE_HOTPLUG_H

#include "probe.h"

/* What a driver made of a slot the controller reported inserted. */
enum hp_insert {
	HP_NOT_MINE,	/* not a device this driver takes (or it drives another one) */
	HP_STARTED,	/* found and started */
	HP_RUNNING,	/* the device it drives already, nothing done */
	HP_FAILED,	/* its device, but unusable (an error line said why) */
};

/* Finds the controller (`probe: hotplug ready|absent`). */
void hotplug_init(void);
/* Every input poll: reads INSERTED and REMOVE_REQUESTED once each and handles every bit. */
void hotplug_poll(void);
/* The slot was ejected and its device is still on the bus: a rescan must not take it. */
bool hotplug_slot_leaving(u8 slot);
/* Events handled since boot, all slots (the status line's hotplug_removes/inserts). */
extern u64 hotplug_removes, hotplug_inserts;
/*
 * Turns off MSI (capability at msi_cap; 0: none), memory decoding and bus
 * mastering; returns the command register read back.
 */
u16 hotplug_pci_quiesce(u8 slot, u8 msi_cap);

/* Driver hooks, edu.c (edu=1). */
int edu_driven_slot(void);	/* slot of the edu being driven, -1 if none */
void edu_release(void);	/* quiesce it for an eject; absent afterwards */
enum hp_insert edu_insert(u8 slot);

/* Driver hooks, userdev.c (userdev=1|2). */
int userdev_driven_slot(void);
void userdev_release(void);
enum hp_insert userdev_insert(u8 slot);

#endif
