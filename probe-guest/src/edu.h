/* edu.c: QEMU's edu device assigned through kernel VFIO (`edu=1`). */
#ifndef EDU_H
#define EDU_H

#include "probe.h"

void edu_init(u64 tsc_khz);
void edu_tick(void);

#endif
