/* vsock.c: a polled virtio-vsock driver: an echo listener and a pattern client (`vsock=1`). */
#ifndef PROBE_VSOCK_H
#define PROBE_VSOCK_H

#include "probe.h"

/* Finds and starts the device (`probe: vsock ready|absent|error`); adds vsock_poll to io_poll_hook. */
void vsock_init(u64 mapped_end, u64 tsc_khz);
/* Whether the device is up (the status line then gains the vsock counters). */
bool vsock_ready(void);
/* Handles used buffers, due timers and pending sends; cheap when there is nothing to do. Any CPU. */
void vsock_poll(void);
/* Before a status line (BSP): `probe: vsock transport_reset ...` if the device reset the transport. */
void vsock_tick(void);
/* Appends ` vsock_conns=.. vsock_accepted=.. ... vsock_reconnects=..`. */
void vsock_status(struct line *l);

#endif
