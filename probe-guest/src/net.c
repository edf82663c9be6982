/*
 * What `net=1` does: drive a virtio-net device (polled, like the other virtio
 * devices) and answer, for the address `net_ip`, ARP requests, ICMP echo
 * requests and UDP datagrams to port `net_udp_port` (echoed back). A host test
 * measures echo latency and loss through the VMM's device with this.
 *
 * Features: VERSION_1 (required) and MAC (when offered); nothing else, so
 * every frame has the 12-byte virtio_net_hdr_v1 in front, written zero on TX
 * and skipped on RX, and the device delivers whole frames with complete
 * checksums into one buffer each.
 *
 * Queue 0 (receiveq) is kept full of device-writable 2 KiB buffers, one
 * descriptor each (descriptor i is buffer i); each used one is handled and
 * made available again at once, and queue 0 is notified once per poll that
 * reposted any. Queue 1 (transmitq): a free list of 2 KiB buffers, many in
 * flight, taken back from the used ring at each poll; one notification per
 * poll that queued any.
 *
 * Interrupts stay off, so net_poll runs through io_poll_hook: after each
 * chunk of the BSP's page work, while lines are printed, and while a
 * virtqueue is waited for. It compares the used indexes first, so an idle
 * poll costs two memory reads. A try-lock keeps it on one CPU at a time.
 */
#include "net.h"
#include "virtio.h"

#define NET_RXQ 0
#define NET_TXQ 1
#define NET_QSIZE 128	/* entries per queue (fewer if the device offers fewer) */
#define NET_BUF_SIZE 2048	/* >= 12 + 1514; a power of two, so no buffer straddles a page */
#define NET_HDR_LEN 12	/* struct virtio_net_hdr_v1, with num_buffers */
#define NET_F_MAC (1U << 5)
#define NET_TX_FULL_WAIT_US 50000	/* a busy host may take tens of ms to complete them */
#define ETH_ALEN 6
#define ETH_HLEN 14
#define ETH_MIN_FRAME 60	/* without FCS: short replies are padded with zeros */
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ARP_LEN 28
#define ARP_REQUEST 1
#define ARP_REPLY 2
#define IP_HLEN 20
#define IP_TTL 64
#define IP_PROTO_ICMP 1
#define IP_PROTO_UDP 17
#define IP_FRAG_MASK 0x3fff	/* MF and fragment offset */
#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO_REQUEST 8
#define ICMP_HLEN 8
#define UDP_HLEN 8
#define UDP_SEQ_LEN 8

/* Rings and buffers live in .bss: inside the image, below the pattern. */
static u8 rx_ring[PAGE_SIZE] __attribute__((aligned(4096)));
static u8 tx_ring[PAGE_SIZE] __attribute__((aligned(4096)));
static u8 rx_bufs[NET_QSIZE][NET_BUF_SIZE] __attribute__((aligned(4096)));
static u8 tx_bufs[NET_QSIZE][NET_BUF_SIZE] __attribute__((aligned(4096)));
/* Without VIRTIO_NET_F_MAC: a locally administered unicast address. */
static const u8 default_mac[ETH_ALEN] = { 0x02, 0, 0, 0, 0, 0x01 };

static struct vdev dev;
static bool up;
static u8 mac[ETH_ALEN];
static u8 ip[4];
static u64 khz;
static u32 busy;	/* try-lock of net_poll */
static u16 tx_free[NET_QSIZE];
static u32 tx_free_n;
static bool tx_unkicked;	/* TX buffers queued since the last notification */

/* Counters of the status line. */
static u64 n_rx, n_tx, n_arp, n_icmp, n_udp, n_drop;
static u64 udp_next, udp_lost, udp_late;
static bool udp_seq_seen;

static u16 rd16(const u8 *p)
{
	return (u16)(p[0] << 8 | p[1]);
}

static void wr16(u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

static u64 rd64le(const u8 *p)
{
	u64 v;
	memcpy(&v, p, sizeof(v));	/* x86 is little-endian */
	return v;
}

/* Internet checksum: one's complement sum of big-endian 16-bit words. */
static u16 csum(const u8 *p, u32 n)
{
	u32 sum = 0;
	for (u32 i = 0; i + 1 < n; i += 2)
		sum += rd16(p + i);
	if (n & 1)
		sum += (u32)p[n - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

static void tx_reclaim(void)
{
	struct virtq *q = &dev.q[NET_TXQ];
	u32 id, len;
	while (vq_take(q, &id, &len)) {
		if (id < q->size && tx_free_n < q->size) {
			tx_free[tx_free_n++] = (u16)id;
			n_tx++;
		}
	}
}

/*
 * A free TX buffer: its header zeroed, *id set, the frame area returned. When
 * all are in flight, the device is notified and given up to
 * NET_TX_FULL_WAIT_US to complete one; NULL after that.
 */
static u8 *tx_alloc(u16 *id)
{
	if (!tx_free_n)
		tx_reclaim();
	if (!tx_free_n) {
		if (tx_unkicked)
			vq_notify(&dev.q[NET_TXQ]);
		tx_unkicked = false;
		u64 start = rdtsc();
		while (!tx_free_n && rdtsc() - start < NET_TX_FULL_WAIT_US * khz / 1000) {
			cpu_relax();
			tx_reclaim();
		}
		if (!tx_free_n)
			return NULL;
	}
	*id = tx_free[--tx_free_n];
	memset(tx_bufs[*id], 0, NET_HDR_LEN);
	return tx_bufs[*id] + NET_HDR_LEN;
}

/* Queues the frame built in buffer id; the notification comes at the end of the poll. */
static void tx_send(u16 id, u32 len)
{
	u8 *frame = tx_bufs[id] + NET_HDR_LEN;
	if (len < ETH_MIN_FRAME) {
		memset(frame + len, 0, ETH_MIN_FRAME - len);
		len = ETH_MIN_FRAME;
	}
	struct virtq *q = &dev.q[NET_TXQ];
	vq_set_desc(q, id, (u64)(uintptr_t)tx_bufs[id], NET_HDR_LEN + len, false);
	vq_publish(q, id);
	tx_unkicked = true;
}

/* Ethernet header of a reply: back to the sender of `req` (its MAC learnt from the frame). */
static void eth_reply(u8 *t, const u8 *req, u16 type)
{
	memcpy(t, req + ETH_ALEN, ETH_ALEN);
	memcpy(t + ETH_ALEN, mac, ETH_ALEN);
	wr16(t + 12, type);
}

static bool arp(const u8 *f, u32 len)
{
	const u8 *a = f + ETH_HLEN;
	if (len < ETH_HLEN + ARP_LEN || rd16(a) != 1 || rd16(a + 2) != ETH_P_IP || a[4] != ETH_ALEN ||
	    a[5] != 4 || rd16(a + 6) != ARP_REQUEST || memcmp(a + 24, ip, 4))
		return false;
	u16 id;
	u8 *t = tx_alloc(&id);
	if (!t)
		return false;
	eth_reply(t, f, ETH_P_ARP);
	u8 *r = t + ETH_HLEN;
	memcpy(r, a, 6);	/* htype, ptype, hlen, plen */
	wr16(r + 6, ARP_REPLY);
	memcpy(r + 8, mac, ETH_ALEN);
	memcpy(r + 14, ip, 4);
	memcpy(r + 18, a + 8, ETH_ALEN + 4);	/* target: the requester's MAC and IP */
	tx_send(id, ETH_HLEN + ARP_LEN);
	n_arp++;
	return true;
}

/* IPv4 header of a reply to `req` carrying `payload` bytes (no options). */
static void ip_reply(u8 *r, const u8 *req, u8 proto, u32 payload)
{
	memset(r, 0, IP_HLEN);
	r[0] = 0x45;
	wr16(r + 2, (u16)(IP_HLEN + payload));
	memcpy(r + 4, req + 4, 2);	/* identification */
	r[8] = IP_TTL;
	r[9] = proto;
	memcpy(r + 12, ip, 4);
	memcpy(r + 16, req + 12, 4);
	wr16(r + 10, csum(r, IP_HLEN));
}

static bool icmp(const u8 *f, const u8 *h, const u8 *p, u32 plen)
{
	if (plen < ICMP_HLEN || p[0] != ICMP_ECHO_REQUEST || p[1] != 0 || csum(p, plen))
		return false;
	u16 id;
	u8 *t = tx_alloc(&id);
	if (!t)
		return false;
	eth_reply(t, f, ETH_P_IP);
	ip_reply(t + ETH_HLEN, h, IP_PROTO_ICMP, plen);
	u8 *r = t + ETH_HLEN + IP_HLEN;
	memcpy(r, p, plen);	/* id, sequence and payload stay */
	r[0] = ICMP_ECHO_REPLY;
	wr16(r + 2, 0);
	wr16(r + 2, csum(r, plen));
	tx_send(id, ETH_HLEN + IP_HLEN + plen);
	n_icmp++;
	return true;
}

/* The sender's sequence numbers: a gap is loss, a step back is late (reordered or duplicate). */
static void udp_seq(u64 seq)
{
	if (!udp_seq_seen) {
		udp_seq_seen = true;
		udp_next = seq;
	}
	if (seq > udp_next)
		udp_lost += seq - udp_next;
	else if (seq < udp_next)
		udp_late++;
	if (seq + 1 > udp_next)
		udp_next = seq + 1;
}

static bool udp(const u8 *f, const u8 *h, const u8 *p, u32 plen)
{
	if (plen < UDP_HLEN)
		return false;
	u32 ulen = rd16(p + 4);
	if (ulen < UDP_HLEN || ulen > plen || rd16(p + 2) != cfg.net_udp_port)
		return false;
	/* Counted on arrival, so a reply the TX ring cannot take is not a gap. */
	if (ulen - UDP_HLEN >= UDP_SEQ_LEN)
		udp_seq(rd64le(p + UDP_HLEN));
	u16 id;
	u8 *t = tx_alloc(&id);
	if (!t)
		return false;
	eth_reply(t, f, ETH_P_IP);
	ip_reply(t + ETH_HLEN, h, IP_PROTO_UDP, ulen);
	u8 *r = t + ETH_HLEN + IP_HLEN;
	memcpy(r, p, ulen);
	/* Ports swapped; the checksum stays as sent: swapping both addresses and both ports keeps the sum. */
	memcpy(r, p + 2, 2);
	memcpy(r + 2, p, 2);
	tx_send(id, ETH_HLEN + IP_HLEN + ulen);
	n_udp++;
	return true;
}

static bool ipv4(const u8 *f, u32 len)
{
	const u8 *h = f + ETH_HLEN;
	if (len < ETH_HLEN + IP_HLEN || h[0] >> 4 != 4)
		return false;
	u32 hlen = (h[0] & 15) * 4U;
	u32 total = rd16(h + 2);
	/* Frames can be padded: the IP total length is the datagram's size. */
	if (hlen < IP_HLEN || total < hlen || total > len - ETH_HLEN || csum(h, hlen) ||
	    (rd16(h + 6) & IP_FRAG_MASK) || memcmp(h + 16, ip, 4))
		return false;
	if (h[9] == IP_PROTO_ICMP)
		return icmp(f, h, h + hlen, total - hlen);
	if (h[9] == IP_PROTO_UDP)
		return udp(f, h, h + hlen, total - hlen);
	return false;
}

static void frame(const u8 *f, u32 len)
{
	static const u8 broadcast[ETH_ALEN] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	bool answered = false;
	if (len >= ETH_HLEN) {
		bool mine = !memcmp(f, mac, ETH_ALEN);
		u16 type = rd16(f + 12);
		if (type == ETH_P_ARP && (mine || !memcmp(f, broadcast, ETH_ALEN)))
			answered = arp(f, len);
		else if (type == ETH_P_IP && mine)
			answered = ipv4(f, len);
	}
	if (!answered)
		n_drop++;
}

static void service(void)
{
	struct virtq *rx = &dev.q[NET_RXQ];
	bool reposted = false;
	u32 id, len;
	tx_reclaim();
	/* At most one ring's worth per poll, so a flood cannot hold the BSP forever. */
	for (u32 n = 0; n < rx->size && vq_take(rx, &id, &len); n++) {
		n_rx++;
		if (id >= rx->size) {
			n_drop++;	/* not a buffer of ours: nothing to repost */
			continue;
		}
		if (len >= NET_HDR_LEN && len <= NET_BUF_SIZE)
			frame(rx_bufs[id] + NET_HDR_LEN, len - NET_HDR_LEN);
		else
			n_drop++;
		vq_publish(rx, (u16)id);
		reposted = true;
	}
	/* The device may be waiting for RX buffers, and for our replies. */
	if (reposted)
		vq_notify(rx);
	if (tx_unkicked) {
		vq_notify(&dev.q[NET_TXQ]);
		tx_unkicked = false;
	}
}

void net_poll(void)
{
	if (!up || (!vq_used_pending(&dev.q[NET_RXQ]) && !vq_used_pending(&dev.q[NET_TXQ])))
		return;
	if (__atomic_exchange_n(&busy, 1, __ATOMIC_ACQUIRE))
		return;	/* another CPU (or an outer call) is at it */
	service();
	__atomic_store_n(&busy, 0, __ATOMIC_RELEASE);
}

bool net_ready(void)
{
	return up;
}

static void line_mac(struct line *l, const u8 *m)
{
	for (u32 i = 0; i < ETH_ALEN; i++) {
		char hex[4] = { ':', "0123456789abcdef"[m[i] >> 4], "0123456789abcdef"[m[i] & 15], 0 };
		line_str(l, i ? hex : hex + 1);
	}
}

static void line_ip(struct line *l, const u8 *a)
{
	for (u32 i = 0; i < 4; i++) {
		if (i)
			line_str(l, ".");
		line_dec(l, a[i]);
	}
}

static void net_error(const char *why)
{
	struct line l;
	line_start(&l, "net error ");
	line_str(&l, why);
	line_emit(&l);
}

void net_init(u64 mapped_end, u64 tsc_khz)
{
	if (!cfg.net_ip_set) {
		net_error("no_ip");
		return;
	}
	memcpy(ip, cfg.net_ip, 4);
	khz = tsc_khz;
	const char *why = "unknown";
	u32 got = 0;
	int found = virtio_open_features(&dev, VIRTIO_ID_NET, NET_F_MAC, &got, mapped_end, tsc_khz, &why);
	if (found == 0) {
		say("net absent");
		return;
	}
	bool ok = found > 0;
	if (ok && (got & NET_F_MAC) && !dev.devcfg) {
		why = "no_device_cfg";
		ok = false;
	}
	if (ok && (got & NET_F_MAC))
		virtio_cfg_read(&dev, 0, mac, ETH_ALEN);	/* struct virtio_net_config.mac */
	else
		memcpy(mac, default_mac, ETH_ALEN);
	ok = ok && virtio_queue_setup_sized(&dev, NET_RXQ, rx_ring, sizeof(rx_ring), NET_QSIZE, &why);
	ok = ok && virtio_queue_setup_sized(&dev, NET_TXQ, tx_ring, sizeof(tx_ring), NET_QSIZE, &why);
	if (ok) {
		/* Buffers go in before DRIVER_OK; the notification only after it (spec). */
		struct virtq *rx = &dev.q[NET_RXQ];
		for (u16 i = 0; i < rx->size; i++) {
			vq_set_desc(rx, i, (u64)(uintptr_t)rx_bufs[i], NET_BUF_SIZE, true);
			vq_publish(rx, i);
		}
		for (u16 i = dev.q[NET_TXQ].size; i > 0; i--)
			tx_free[tx_free_n++] = (u16)(i - 1);
		ok = virtio_driver_ok(&dev, &why);
	}
	if (!ok) {
		if (found > 0)
			virtio_reset(&dev);
		net_error(why);
		return;
	}
	vq_notify(&dev.q[NET_RXQ]);
	if (!(got & NET_F_MAC))
		say("note net device offers no mac, using 02:00:00:00:00:01");
	struct line l;
	line_start(&l, "net ready");
	line_kv_dec(&l, "slot", dev.slot);
	line_str(&l, " mac=");
	line_mac(&l, mac);
	line_str(&l, " ip=");
	line_ip(&l, ip);
	line_kv_dec(&l, "rxq", dev.q[NET_RXQ].size);
	line_kv_dec(&l, "txq", dev.q[NET_TXQ].size);
	line_emit(&l);
	up = true;
	io_poll_add(net_poll);
}

void net_status(struct line *l)
{
	line_kv_dec(l, "net_rx", load_relaxed(&n_rx));
	line_kv_dec(l, "net_tx", load_relaxed(&n_tx));
	line_kv_dec(l, "arp", load_relaxed(&n_arp));
	line_kv_dec(l, "icmp", load_relaxed(&n_icmp));
	line_kv_dec(l, "udp", load_relaxed(&n_udp));
	line_kv_dec(l, "udp_lost", load_relaxed(&udp_lost));
	line_kv_dec(l, "udp_late", load_relaxed(&udp_late));
	line_kv_dec(l, "net_drop", load_relaxed(&n_drop));
}
