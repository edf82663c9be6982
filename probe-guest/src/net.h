/* net.c: a polled virtio-net driver that answers ARP, ping and UDP echo (`net=1`). */
#ifndef PROBE_NET_H
#define PROBE_NET_H

#include "probe.h"

/* Finds and starts the device (`probe: net ready|absent|error`); sets io_poll_hook. */
void net_init(u64 mapped_end, u64 tsc_khz);
/* Whether the device is up (the status line then gains the net counters). */
bool net_ready(void);
/* Handles every used RX and TX buffer; cheap when there is none. Any CPU. */
void net_poll(void);
/* Appends ` net_rx=.. net_tx=.. arp=.. icmp=.. udp=.. udp_lost=.. udp_late=.. net_drop=..`. */
void net_status(struct line *l);

#endif
