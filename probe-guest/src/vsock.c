/*
 * What `vsock=1` does: drive a virtio-vsock device (virtio 1.x, 5.10 "Socket
 * Device"; polled, like the other virtio devices) with stream connections only:
 *
 * - a listener on `vsock_port` that accepts up to LISTEN_SLOTS connections
 *   from the host and echoes every byte back on the same connection, in
 *   order, within the peer's credit;
 * - with `vsock_connect=<port>`, a client that connects to the host (CID 2)
 *   on that port, streams the pattern byte i = (u8)(i * 131 + 7) as fast as
 *   credit allows (up to `vsock_bytes`, 0 = no limit) and checks what comes
 *   back against the same pattern (the host echoes it).
 *
 * Features: VERSION_1 only. Queue 0 (rx) is kept full of device-writable
 * 4 KiB buffers, one descriptor each (descriptor i is buffer i); each takes one
 * packet, header and payload. Queue 1 (tx): one descriptor per packet, header
 * and payload together; the lower half of its descriptors own 4 KiB data
 * buffers (RW packets), the upper half 64-byte control buffers (everything
 * else), so control packets never wait behind data. Queue 2 (event) holds a
 * few small buffers; TRANSPORT_RESET drops every connection.
 *
 * Credit (per connection, u32 counters that wrap): we advertise buf_alloc =
 * BUF_ALLOC and fwd_cnt = bytes consumed (echoed, or checked by the client)
 * in every packet; we send at most peer_buf_alloc - (tx_cnt - peer_fwd_cnt).
 * The echo ring holds what was received and not yet sent back: BUF_ALLOC
 * bytes, so a peer within its credit cannot overflow it. While the ring is
 * empty and the peer's credit allows, a packet is echoed straight from its rx
 * buffer (one copy instead of two).
 *
 * Everything runs from vsock_poll (io_poll_hook) under a try-lock; an idle
 * poll reads two used indexes and the TSC. Work per poll is bounded by about
 * POLL_BUDGET / 2 payload bytes each way. Payload bytes are moved and compared
 * with string instructions (see copy_fast): on the development host each
 * guest instruction costs about a microsecond.
 */
#include "vsock.h"
#include "virtio.h"

#define VQ_RX 0
#define VQ_TX 1
#define VQ_EVENT 2
#define RXQ_WANT 32	/* rx buffers (fewer if the device's queue is smaller) */
#define TXQ_WANT 64	/* tx descriptors: half data, half control */
#define TX_DATA_MAX (TXQ_WANT / 2)
#define TX_CTRL_MAX (TXQ_WANT / 2)
#define EVQ_BUFS 4
#define EV_BUF_SIZE 8
#define BUF_SIZE 4096	/* rx and tx data buffers; a power of two: none straddles a page */
#define CTRL_BUF_SIZE 64
#define HDR_LEN 44
#define MAX_PAYLOAD (BUF_SIZE - HDR_LEN)	/* 4052 */
#define BUF_ALLOC 65536	/* per connection, advertised; the echo ring's size (a power of two) */
#define LISTEN_SLOTS 4
#define CLIENT_SLOT LISTEN_SLOTS
#define SLOTS (LISTEN_SLOTS + 1)
#define RSTQ_LEN 16
#define HOST_CID 2
#define CLIENT_PORT_BASE 49152	/* the client's local port: base + attempt number (mod 16384) */
#define PAT_PERIOD 256	/* the client pattern repeats every 256 bytes */

#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUT_RCV 1	/* the sender will receive no more */
#define SHUT_SEND 2	/* the sender will send no more */
#define EVENT_TRANSPORT_RESET 0

#define RECONNECT_MS 100
#define CONNECT_TIMEOUT_MS 2000	/* REQUEST without RESPONSE: RST, then reconnect */
#define CLOSE_TIMEOUT_MS 2000	/* our SHUTDOWN without the peer's RST: RST */
#define CREDIT_REQUEST_MS 1000	/* data waiting, no credit: CREDIT_REQUEST this often */
#define IDLE_SERVICE_MS 50	/* the event queue is looked at least this often */
#define POLL_BUDGET 16384	/* payload bytes copied per poll, at least one packet */
#define PACKET_COST 1024	/* what sending a packet counts against the budget besides copies */

/* Connection states. */
#define C_FREE 0
#define C_CONNECTING 1	/* client: REQUEST sent (or pending), no RESPONSE yet */
#define C_OPEN 2
#define C_CLOSING 3	/* listener: our SHUTDOWN sent (or pending), waiting for the peer's RST */

/* Control packets a connection still has to send (sent in this order). */
#define P_REQUEST 1
#define P_RESPONSE 2
#define P_SHUTDOWN 4
#define P_CREDIT_UPDATE 8
#define P_CREDIT_REQUEST 16

struct vsock_hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
} __attribute__((packed));
_Static_assert(sizeof(struct vsock_hdr) == HDR_LEN, "virtio_vsock_hdr is 44 bytes");

struct conn {
	u8 state;
	u8 pend;	/* P_* */
	bool client;
	bool peer_sends_no_more;	/* the peer's SHUTDOWN had SHUT_SEND */
	u32 peer_port;
	u32 local_port;
	u32 peer_buf_alloc;
	u32 peer_fwd_cnt;
	u32 rx_cnt;	/* payload bytes received */
	u32 fwd_cnt;	/* payload bytes consumed: echoed (listener) or checked (client) */
	u32 fwd_sent;	/* fwd_cnt as last advertised */
	u32 tx_cnt;	/* payload bytes sent */
	u64 peer_cid;
	u64 deadline;	/* C_CONNECTING, C_CLOSING: TSC */
	u64 stall_tsc;	/* when data first waited for credit; 0: not waiting */
	u64 stream_tx;	/* client: pattern bytes sent in this stream */
	u64 stream_rx;	/* client: bytes received back in this stream */
	u8 *ring;	/* listener: BUF_ALLOC bytes, [fwd_cnt, rx_cnt) still to echo */
};

struct rst_req {
	u64 cid;
	u32 dst_port;
	u32 src_port;
	u16 type;
};

/* Rings and buffers live in .bss: inside the image, below the pattern. */
static u8 rx_ring[PAGE_SIZE] __attribute__((aligned(4096)));
static u8 tx_ring[PAGE_SIZE] __attribute__((aligned(4096)));
static u8 ev_ring[PAGE_SIZE] __attribute__((aligned(4096)));
static u8 rx_bufs[RXQ_WANT][BUF_SIZE] __attribute__((aligned(4096)));
static u8 tx_data[TX_DATA_MAX][BUF_SIZE] __attribute__((aligned(4096)));
static u8 tx_ctrl[TX_CTRL_MAX][CTRL_BUF_SIZE] __attribute__((aligned(64)));
static u8 ev_bufs[EVQ_BUFS][EV_BUF_SIZE] __attribute__((aligned(8)));
static u8 echo_rings[LISTEN_SLOTS][BUF_ALLOC] __attribute__((aligned(4096)));

static struct vdev dev;
static bool up;
static u64 khz;
static u64 guest_cid;
static u32 busy;	/* try-lock of vsock_poll */
static u64 next_service;	/* TSC at which a poll serves even without used buffers; 0 = next poll */
static u64 now;	/* TSC at the start of the current service */
static u32 budget;	/* payload bytes the current service may still copy */
static u32 rr;	/* round-robin start over the connections */

static u16 data_n;	/* tx descriptors [0, data_n) are data, [data_n, size) control */
static u16 data_free[TX_DATA_MAX], ctrl_free[TX_CTRL_MAX];
static u32 data_free_n, ctrl_free_n;
static bool tx_out[TXQ_WANT];	/* tx descriptor handed to the device */
/* Data buffer payload already holding this many pattern bytes from a stream offset of 0 mod 256. */
static u16 pat_ready[TX_DATA_MAX];
static u16 ev_n;
static bool tx_unkicked;

static struct conn conns[SLOTS];
static struct rst_req rstq[RSTQ_LEN];
static u32 rstq_head, rstq_len;
static u64 client_at;	/* TSC of the client's next connection attempt; 0 = none planned */
static u64 client_attempts;

/* Counters of the status line. */
static u64 n_open, n_accepted, n_rx, n_tx, n_rst, n_err, n_client_tx, n_client_ok, n_reconnects;
static u64 n_resets, resets_reported;

static u64 ms_ticks(u64 ms)
{
	return ms * khz;
}

static u32 min32(u32 a, u32 b)
{
	return a < b ? a : b;
}

/*
 * Copies and compares with x86 string instructions. On the development host
 * every guest instruction costs about a microsecond, so per-byte work limits
 * the throughput; a `rep movsq` or `repe cmpsq` over 4 KiB took about 0.6 ms
 * there, an unrolled word loop about 2 ms. (RAM only: MMIO keeps plain moves.)
 */
static void copy_fast(u8 *d, const u8 *s, u32 n)
{
	u64 words = n / 8;
	__asm__ volatile("cld\n\trep movsq" : "+D"(d), "+S"(s), "+c"(words) : : "memory", "cc");
	for (u32 i = 0; i < (n & 7); i++)	/* rep advanced d and s */
		d[i] = s[i];
}

/* How many of the n bytes at p equal those at t: one compare when all do, bytes otherwise. */
static u32 match_fast(const u8 *p, const u8 *t, u32 n)
{
	u64 words = n / 8;
	const u8 *a = p, *b = t;
	bool equal = true;
	if (words)
		__asm__ volatile("cld\n\trepe cmpsq"
				 : "=@ccz"(equal), "+D"(a), "+S"(b), "+c"(words)
				 : : "memory");
	u32 ok = 0, i = 0;
	if (equal)
		ok = i = n & ~7U;
	for (; i < n; i++)	/* the tail, or everything after a mismatch */
		ok += p[i] == t[i];
	return ok;
}

/*
 * The client's pattern: byte i = (u8)(i * 131 + 7), so it repeats every 256
 * bytes. pat_table holds it from byte 0 far enough that the bytes of any packet
 * are one slice of it, starting at (stream offset mod 256).
 */
#define PAT_SLICE 4096	/* >= MAX_PAYLOAD */
static u8 pat_table[PAT_SLICE + PAT_PERIOD] __attribute__((aligned(8)));

static void pat_table_init(void)
{
	for (u32 i = 0; i < PAT_PERIOD; i++)
		pat_table[i] = (u8)(i * 131 + 7);
	for (u32 at = PAT_PERIOD; at < sizeof(pat_table); at += PAT_PERIOD)
		copy_fast(pat_table + at, pat_table, PAT_PERIOD);
}

/* The n pattern bytes from stream offset off, into p. */
static void pat_fill(u8 *p, u32 n, u64 off)
{
	for (u32 done = 0; done < n;) {
		u32 m = min32(n - done, PAT_SLICE);
		copy_fast(p + done, pat_table + ((off + done) & (PAT_PERIOD - 1)), m);
		done += m;
	}
}

/* How many of the n bytes at p equal the pattern from stream offset off. */
static u32 pat_check(const u8 *p, u32 n, u64 off)
{
	u32 ok = 0;
	for (u32 done = 0; done < n;) {
		u32 m = min32(n - done, PAT_SLICE);
		ok += match_fast(p + done, pat_table + ((off + done) & (PAT_PERIOD - 1)), m);
		done += m;
	}
	return ok;
}

static bool cid_valid(u64 cid)
{
	return cid > HOST_CID && cid < 0xffffffffULL;
}

/* ---- transmit ---- */

static u8 *tx_buf(u16 id)
{
	return id < data_n ? tx_data[id] : tx_ctrl[id - data_n];
}

static void tx_reclaim(void)
{
	struct virtq *q = &dev.q[VQ_TX];
	u32 id, len;
	while (vq_take(q, &id, &len)) {
		if (id >= q->size || !tx_out[id]) {
			n_err++;	/* not a buffer the device had */
			continue;
		}
		tx_out[id] = false;
		if (id < data_n)
			data_free[data_free_n++] = (u16)id;
		else
			ctrl_free[ctrl_free_n++] = (u16)id;
	}
}

/* The header of a packet of connection c (or, for c NULL, of an RST to a tuple without one). */
static void hdr_put(u8 *buf, struct conn *c, u64 dst_cid, u32 dst_port, u32 src_port, u16 type,
		    u16 op, u32 flags, u32 len)
{
	struct vsock_hdr *h = (struct vsock_hdr *)buf;
	h->src_cid = guest_cid;
	h->dst_cid = dst_cid;
	h->src_port = src_port;
	h->dst_port = dst_port;
	h->len = len;
	h->type = type;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = c ? BUF_ALLOC : 0;
	h->fwd_cnt = c ? c->fwd_cnt : 0;
	if (c) {
		/* Every packet carries our credit: no separate update needed after this one. */
		c->fwd_sent = c->fwd_cnt;
		c->pend &= (u8)~P_CREDIT_UPDATE;
	}
}

/* Hands descriptor id (len bytes) to the device; the notification comes at the end of the poll. */
static void tx_publish(u16 id, u32 len)
{
	struct virtq *q = &dev.q[VQ_TX];
	vq_set_desc(q, id, (u64)(uintptr_t)tx_buf(id), len, false);
	tx_out[id] = true;
	vq_publish(q, id);
	tx_unkicked = true;
}

static bool ctrl_take(u16 *id)
{
	if (!ctrl_free_n)
		tx_reclaim();
	if (!ctrl_free_n)
		return false;
	*id = ctrl_free[--ctrl_free_n];
	return true;
}

/* A control packet (no payload) of connection c; false when no control buffer is free. */
static bool send_ctrl(struct conn *c, u16 op, u32 flags)
{
	u16 id;
	if (!ctrl_take(&id))
		return false;
	hdr_put(tx_buf(id), c, c->peer_cid, c->peer_port, c->local_port, TYPE_STREAM, op, flags, 0);
	tx_publish(id, HDR_LEN);
	return true;
}

static void rst_queue(u64 cid, u32 dst_port, u32 src_port, u16 type)
{
	if (rstq_len == RSTQ_LEN) {
		n_err++;	/* more RSTs owed than we keep: this one is dropped */
		return;
	}
	struct rst_req *r = &rstq[(rstq_head + rstq_len++) % RSTQ_LEN];
	r->cid = cid;
	r->dst_port = dst_port;
	r->src_port = src_port;
	r->type = type;
}

static void rst_flush(void)
{
	u16 id;
	while (rstq_len && ctrl_take(&id)) {
		struct rst_req *r = &rstq[rstq_head];
		hdr_put(tx_buf(id), NULL, r->cid, r->dst_port, r->src_port, r->type, OP_RST, 0, 0);
		tx_publish(id, HDR_LEN);
		n_rst++;
		rstq_head = (rstq_head + 1) % RSTQ_LEN;
		rstq_len--;
	}
}

/* Bytes we may still send on c: the peer's buffer less what it has not consumed. */
static u32 credit(const struct conn *c)
{
	u32 unconsumed = c->tx_cnt - c->peer_fwd_cnt;
	return unconsumed >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - unconsumed;
}

/*
 * Sends n payload bytes, already in data buffer id, as an RW packet; `consumed`
 * bytes of ours count as consumed from then on (the packet advertises them). A
 * packet beyond the peer's credit is never sent: that would be our bug, counted.
 */
static bool send_rw(struct conn *c, u16 id, u32 n, u32 consumed)
{
	if (n > credit(c)) {
		n_err++;
		data_free[data_free_n++] = id;
		return false;
	}
	c->fwd_cnt += consumed;
	hdr_put(tx_buf(id), c, c->peer_cid, c->peer_port, c->local_port, TYPE_STREAM, OP_RW, 0, n);
	tx_publish(id, HDR_LEN + n);
	c->tx_cnt += n;
	n_tx += n;
	budget -= min32(budget, PACKET_COST);
	return true;
}

static bool data_take(u16 *id)
{
	if (!data_free_n)
		tx_reclaim();
	if (!data_free_n)
		return false;
	*id = data_free[--data_free_n];
	return true;
}

/* Listener: one RW packet of echo from the ring; false when nothing could be sent. */
static bool echo_one(struct conn *c)
{
	u32 n = min32(min32(c->rx_cnt - c->fwd_cnt, credit(c)), MAX_PAYLOAD);
	u16 id;
	if (!n || !data_take(&id))
		return false;
	u8 *p = tx_buf(id) + HDR_LEN;
	u32 at = c->fwd_cnt & (BUF_ALLOC - 1);
	u32 first = min32(n, BUF_ALLOC - at);
	copy_fast(p, c->ring + at, first);
	if (first < n)
		copy_fast(p + first, c->ring, n - first);
	pat_ready[id] = 0;
	budget -= min32(budget, n);
	return send_rw(c, id, n, n);	/* echoed bytes leave the ring: consumed */
}

/* Bytes the client's stream still has to send (~0 without a limit). */
static u64 client_left(const struct conn *c)
{
	if (!cfg.vsock_bytes)
		return ~0ULL;
	return cfg.vsock_bytes > c->stream_tx ? cfg.vsock_bytes - c->stream_tx : 0;
}

/*
 * Client: one RW packet of the pattern; false when nothing could be sent.
 * Packets end on a multiple of 256 stream bytes where credit allows, so they
 * start at the same place in the pattern and a buffer filled once serves again
 * without being written (only a packet after an odd-sized one is filled anew).
 */
static bool client_one(struct conn *c)
{
	u64 left = client_left(c);
	u32 n = min32(credit(c), MAX_PAYLOAD);
	u16 id;
	u32 odd = (u32)((c->stream_tx + n) & (PAT_PERIOD - 1));
	if (n >= left)
		n = (u32)left;	/* the stream's last packet */
	else if (n > odd)
		n -= odd;	/* end on a period */
	if (!n || !data_take(&id))
		return false;
	u8 *p = tx_buf(id) + HDR_LEN;
	if (c->stream_tx & (PAT_PERIOD - 1)) {
		pat_fill(p, n, c->stream_tx);
		pat_ready[id] = 0;
		budget -= min32(budget, n);
	} else if (pat_ready[id] < n) {
		pat_fill(p, MAX_PAYLOAD, 0);
		pat_ready[id] = MAX_PAYLOAD;
		budget -= min32(budget, MAX_PAYLOAD);
	}
	if (!send_rw(c, id, n, 0))
		return false;
	c->stream_tx += n;
	n_client_tx += n;
	return true;
}

/* ---- connections ---- */

static struct conn *conn_find(u64 cid, u32 peer_port, u32 local_port)
{
	for (u32 i = 0; i < SLOTS; i++) {
		struct conn *c = &conns[i];
		if (c->state != C_FREE && c->peer_cid == cid && c->peer_port == peer_port &&
		    c->local_port == local_port)
			return c;
	}
	return NULL;
}

static void conn_init(struct conn *c, u64 cid, u32 peer_port, u32 local_port, u8 state, u8 pend)
{
	u8 *ring = c->ring;
	bool client = c->client;
	memset(c, 0, sizeof(*c));
	c->ring = ring;
	c->client = client;
	c->state = state;
	c->pend = pend;
	c->peer_cid = cid;
	c->peer_port = peer_port;
	c->local_port = local_port;
}

/* Frees c, with an RST to the peer if `rst`; a lost client connection is retried in 100 ms. */
static void conn_close(struct conn *c, bool rst)
{
	if (rst)
		rst_queue(c->peer_cid, c->peer_port, c->local_port, TYPE_STREAM);
	if (c->state == C_OPEN || c->state == C_CLOSING)
		n_open--;
	if (c->client)
		client_at = now + ms_ticks(RECONNECT_MS);
	c->state = C_FREE;
	c->pend = 0;
}

static void client_connect(void)
{
	struct conn *c = &conns[CLIENT_SLOT];
	client_at = 0;
	if (client_attempts++)
		n_reconnects++;
	u32 port = CLIENT_PORT_BASE + (u32)(client_attempts % 16384);
	if (port == cfg.vsock_port)
		port++;
	conn_init(c, HOST_CID, (u32)cfg.vsock_connect, port, C_CONNECTING, P_REQUEST);
	c->deadline = now + ms_ticks(CONNECT_TIMEOUT_MS);
}

/* The peer's credit fields, carried by every packet. */
static void peer_credit(struct conn *c, const struct vsock_hdr *h)
{
	u32 fwd = h->fwd_cnt;
	c->peer_buf_alloc = h->buf_alloc;
	if ((int32_t)(c->tx_cnt - fwd) < 0 || (int32_t)(fwd - c->peer_fwd_cnt) < 0) {
		n_err++;	/* consumed more than we sent, or went back: keep what we know */
		return;
	}
	c->peer_fwd_cnt = fwd;
}

static void listener_accept(const struct vsock_hdr *h)
{
	struct conn *c = NULL;
	for (u32 i = 0; i < LISTEN_SLOTS && !c; i++)
		if (conns[i].state == C_FREE)
			c = &conns[i];
	if (!c) {
		rst_queue(h->src_cid, h->src_port, h->dst_port, TYPE_STREAM);	/* all slots busy */
		return;
	}
	conn_init(c, h->src_cid, h->src_port, h->dst_port, C_OPEN, P_RESPONSE);
	peer_credit(c, h);
	n_open++;
	n_accepted++;
}

static void rx_data(struct conn *c, const u8 *p, u32 len)
{
	/* The peer may have sent at most BUF_ALLOC - (rx_cnt - fwd_cnt as last advertised). */
	if ((u64)(u32)(c->rx_cnt - c->fwd_sent) + len > BUF_ALLOC)
		n_err++;
	n_rx += len;
	budget -= min32(budget, len);
	if (c->client) {
		u32 ok = pat_check(p, len, c->stream_rx);
		n_client_ok += ok;
		if (ok != len || c->stream_rx + len > c->stream_tx)
			n_err++;	/* not the pattern, or more than we sent */
		c->stream_rx += len;
		c->rx_cnt += len;
		c->fwd_cnt += len;	/* checked: consumed */
		return;
	}
	u16 id;
	if (len && c->rx_cnt == c->fwd_cnt && !(c->pend & P_RESPONSE) && credit(c) >= len &&
	    data_take(&id)) {
		/* Nothing waits in the ring and the peer can take it all: echo at once, one copy. */
		copy_fast(tx_buf(id) + HDR_LEN, p, len);
		pat_ready[id] = 0;
		c->rx_cnt += len;
		send_rw(c, id, len, len);
		return;
	}
	if ((u64)(u32)(c->rx_cnt - c->fwd_cnt) + len > BUF_ALLOC) {
		conn_close(c, true);	/* the echo ring would overflow (counted above) */
		return;
	}
	u32 at = c->rx_cnt & (BUF_ALLOC - 1);
	u32 first = min32(len, BUF_ALLOC - at);
	copy_fast(c->ring + at, p, first);
	if (first < len)
		copy_fast(c->ring, p + first, len - first);
	c->rx_cnt += len;
}

static void rx_packet(const u8 *buf, u32 used)
{
	const struct vsock_hdr *h = (const struct vsock_hdr *)buf;
	if (used < HDR_LEN || used > BUF_SIZE) {
		n_err++;
		return;
	}
	u32 len = h->len;
	u16 op = h->op, type = h->type;
	if (len > used - HDR_LEN || h->dst_cid != guest_cid) {
		n_err++;
		return;
	}
	if (op == OP_RST)
		n_rst++;
	if (type != TYPE_STREAM) {
		n_err++;	/* only streams exist without F_SEQPACKET */
		if (op != OP_RST)
			rst_queue(h->src_cid, h->src_port, h->dst_port, type);
		return;
	}
	struct conn *c = conn_find(h->src_cid, h->src_port, h->dst_port);
	if (!c) {
		if (op == OP_REQUEST && h->dst_port == cfg.vsock_port)
			listener_accept(h);
		else if (op != OP_RST)
			rst_queue(h->src_cid, h->src_port, h->dst_port, TYPE_STREAM);
		return;
	}
	peer_credit(c, h);
	switch (op) {
	case OP_RST:
		conn_close(c, false);
		break;
	case OP_RESPONSE:
		if (c->state != C_CONNECTING) {
			n_err++;
			conn_close(c, true);
			break;
		}
		c->state = C_OPEN;
		n_open++;
		break;
	case OP_SHUTDOWN:
		/*
		 * Full shutdown (or the client's peer leaving): answer with RST, as the spec's
		 * clean disconnect wants. SEND only: echo what is left, then SHUTDOWN ourselves.
		 */
		if (c->client || c->state != C_OPEN || (h->flags & SHUT_RCV))
			conn_close(c, true);
		else if (h->flags & SHUT_SEND)
			c->peer_sends_no_more = true;
		break;
	case OP_RW:
		if (c->state == C_CONNECTING || c->peer_sends_no_more) {
			n_err++;
			conn_close(c, true);
			break;
		}
		rx_data(c, buf + HDR_LEN, len);
		break;
	case OP_CREDIT_UPDATE:
		break;	/* peer_credit took it */
	case OP_CREDIT_REQUEST:
		c->pend |= P_CREDIT_UPDATE;
		break;
	case OP_REQUEST:	/* again, on a connection that exists */
	default:
		n_err++;
		conn_close(c, true);
		break;
	}
}

/* TRANSPORT_RESET: every connection is gone (no RSTs), the CID may have changed. */
static void transport_reset(void)
{
	for (u32 i = 0; i < SLOTS; i++) {
		conns[i].state = C_FREE;
		conns[i].pend = 0;
	}
	n_open = 0;
	rstq_len = 0;
	if (cfg.vsock_connect)
		client_at = now + ms_ticks(RECONNECT_MS);
	u64 cid = virtio_cfg_read64(&dev, 0);
	if (cid_valid(cid))
		guest_cid = cid;
	else
		n_err++;
	n_resets++;
}

static void events(void)
{
	struct virtq *q = &dev.q[VQ_EVENT];
	bool reposted = false;
	u32 id, len;
	while (vq_take(q, &id, &len)) {
		if (id >= ev_n) {
			n_err++;
			continue;
		}
		u32 ev = *(volatile u32 *)ev_bufs[id];	/* struct virtio_vsock_event.id */
		if (len >= sizeof(ev) && ev == EVENT_TRANSPORT_RESET)
			transport_reset();
		else if (len < sizeof(ev))
			n_err++;
		vq_publish(q, (u16)id);
		reposted = true;
	}
	if (reposted)
		vq_notify(q);
}

/* Deadlines and the credit-request interval of each connection; the client's next attempt. */
static void timers(void)
{
	if (client_at && now >= client_at)
		client_connect();
	for (u32 i = 0; i < SLOTS; i++) {
		struct conn *c = &conns[i];
		if ((c->state == C_CONNECTING || c->state == C_CLOSING) && now >= c->deadline) {
			conn_close(c, true);
			continue;
		}
		if (c->state == C_OPEN && c->stall_tsc &&
		    now - c->stall_tsc >= ms_ticks(CREDIT_REQUEST_MS)) {
			c->pend |= P_CREDIT_REQUEST;
			c->stall_tsc = now;
		}
	}
}

/* Whether the peer, by what we advertised last, sees less than half our buffer free. */
static bool credit_low(const struct conn *c)
{
	return c->fwd_cnt != c->fwd_sent && c->rx_cnt - c->fwd_sent > BUF_ALLOC / 2;
}

/* Sends what c has to send, in order; stops at the first packet that finds no buffer. */
static void conn_work(struct conn *c)
{
	if (c->pend & P_REQUEST) {
		if (!send_ctrl(c, OP_REQUEST, 0))
			return;
		c->pend &= (u8)~P_REQUEST;
	}
	if (c->pend & P_RESPONSE) {
		if (!send_ctrl(c, OP_RESPONSE, 0))
			return;
		c->pend &= (u8)~P_RESPONSE;
	}
	if (c->state == C_OPEN) {
		while (budget && (c->client ? client_one(c) : echo_one(c)))
			;
		bool waiting = c->client ? client_left(c) != 0 : c->rx_cnt != c->fwd_cnt;
		if (waiting && !credit(c)) {
			if (!c->stall_tsc)
				c->stall_tsc = now;
		} else {
			c->stall_tsc = 0;
		}
		if (!c->client && c->peer_sends_no_more && c->rx_cnt == c->fwd_cnt) {
			/* All echoed and the peer sends no more: our half closes too. */
			c->state = C_CLOSING;
			c->deadline = now + ms_ticks(CLOSE_TIMEOUT_MS);
			c->pend |= P_SHUTDOWN;
			c->stall_tsc = 0;
		}
		if (credit_low(c))
			c->pend |= P_CREDIT_UPDATE;
	}
	if (c->pend & P_SHUTDOWN) {
		if (!send_ctrl(c, OP_SHUTDOWN, SHUT_RCV | SHUT_SEND))
			return;
		c->pend &= (u8)~P_SHUTDOWN;
	}
	if ((c->pend & P_CREDIT_UPDATE) && !send_ctrl(c, OP_CREDIT_UPDATE, 0))
		return;	/* hdr_put cleared the flag when it went */
	if (c->pend & P_CREDIT_REQUEST) {
		if (!send_ctrl(c, OP_CREDIT_REQUEST, 0))
			return;
		c->pend &= (u8)~P_CREDIT_REQUEST;
	}
}

/* When the next poll must serve even with no used buffer: the earliest deadline. */
static void plan(void)
{
	u64 t = now + ms_ticks(IDLE_SERVICE_MS);
	if (client_at && client_at < t)
		t = client_at;
	for (u32 i = 0; i < SLOTS; i++) {
		const struct conn *c = &conns[i];
		if ((c->state == C_CONNECTING || c->state == C_CLOSING) && c->deadline < t)
			t = c->deadline;
		if (c->state == C_OPEN && c->stall_tsc &&
		    c->stall_tsc + ms_ticks(CREDIT_REQUEST_MS) < t)
			t = c->stall_tsc + ms_ticks(CREDIT_REQUEST_MS);
	}
	if (!budget)
		t = 0;	/* stopped for the budget with work left: go on at the next poll */
	store_relaxed(&next_service, t);
}

static void service(void)
{
	struct virtq *rx = &dev.q[VQ_RX];
	bool reposted = false;
	u32 id, len;
	now = rdtsc();
	budget = POLL_BUDGET / 2;	/* half for receiving */
	tx_reclaim();
	/* Events first: packets handled after a reset must not be wiped by it. */
	events();
	/* At most one ring's worth per poll, and the byte budget. */
	for (u32 n = 0; n < rx->size && budget && vq_take(rx, &id, &len); n++) {
		if (id >= rx->size) {
			n_err++;	/* not a buffer of ours: nothing to repost */
			continue;
		}
		rx_packet(rx_bufs[id], len);
		vq_publish(rx, (u16)id);
		reposted = true;
	}
	timers();
	rst_flush();
	budget = POLL_BUDGET / 2;	/* half for sending */
	for (u32 k = 0; k < SLOTS; k++) {
		struct conn *c = &conns[(rr + k) % SLOTS];
		if (c->state != C_FREE)
			conn_work(c);
	}
	rr = (rr + 1) % SLOTS;
	if (reposted)
		vq_notify(rx);
	if (tx_unkicked) {
		vq_notify(&dev.q[VQ_TX]);
		tx_unkicked = false;
	}
	plan();
}

void vsock_poll(void)
{
	if (!up || (!vq_used_pending(&dev.q[VQ_RX]) && !vq_used_pending(&dev.q[VQ_TX]) &&
		    !due(rdtsc(), load_relaxed(&next_service), ms_ticks(IDLE_SERVICE_MS))))
		return;
	if (__atomic_exchange_n(&busy, 1, __ATOMIC_ACQUIRE))
		return;	/* another CPU (or an outer call) is at it */
	service();
	__atomic_store_n(&busy, 0, __ATOMIC_RELEASE);
}

bool vsock_ready(void)
{
	return up;
}

static void vsock_error(const char *why)
{
	struct line l;
	line_start(&l, "vsock error ");
	line_str(&l, why);
	line_emit(&l);
}

void vsock_init(u64 mapped_end, u64 tsc_khz)
{
	khz = tsc_khz;
	pat_table_init();
	const char *why = "unknown";
	u32 got = 0;
	int found = virtio_open_features(&dev, VIRTIO_ID_VSOCK, 0, &got, mapped_end, tsc_khz, &why);
	if (found == 0) {
		say("vsock absent");
		return;
	}
	bool ok = found > 0;
	if (ok && !dev.devcfg) {
		why = "no_device_cfg";
		ok = false;
	}
	if (ok) {
		guest_cid = virtio_cfg_read64(&dev, 0);	/* struct virtio_vsock_config.guest_cid */
		if (!cid_valid(guest_cid)) {
			why = "bad_cid";
			ok = false;
		}
	}
	/* Spec order: CID, then event buffers, then rx buffers (all before DRIVER_OK). */
	ok = ok && virtio_queue_setup_sized(&dev, VQ_RX, rx_ring, sizeof(rx_ring), RXQ_WANT, &why);
	ok = ok && virtio_queue_setup_sized(&dev, VQ_TX, tx_ring, sizeof(tx_ring), TXQ_WANT, &why);
	ok = ok && virtio_queue_setup(&dev, VQ_EVENT, ev_ring, &why);
	if (ok && dev.q[VQ_TX].size < 2) {
		why = "queue_too_small";
		ok = false;
	}
	if (ok) {
		struct virtq *ev = &dev.q[VQ_EVENT], *rx = &dev.q[VQ_RX];
		ev_n = ev->size < EVQ_BUFS ? ev->size : EVQ_BUFS;
		for (u16 i = 0; i < ev_n; i++) {
			vq_set_desc(ev, i, (u64)(uintptr_t)ev_bufs[i], EV_BUF_SIZE, true);
			vq_publish(ev, i);
		}
		for (u16 i = 0; i < rx->size; i++) {
			vq_set_desc(rx, i, (u64)(uintptr_t)rx_bufs[i], BUF_SIZE, true);
			vq_publish(rx, i);
		}
		u16 size = dev.q[VQ_TX].size;
		data_n = size / 2;
		for (u16 i = data_n; i > 0; i--)
			data_free[data_free_n++] = (u16)(i - 1);
		for (u16 i = size; i > data_n; i--)
			ctrl_free[ctrl_free_n++] = (u16)(i - 1);
		ok = virtio_driver_ok(&dev, &why);
	}
	if (!ok) {
		if (found > 0)
			virtio_reset(&dev);
		vsock_error(why);
		return;
	}
	vq_notify(&dev.q[VQ_EVENT]);
	vq_notify(&dev.q[VQ_RX]);
	struct line l;
	line_start(&l, "vsock ready");
	line_kv_dec(&l, "slot", dev.slot);
	line_kv_dec(&l, "cid", guest_cid);
	line_kv_dec(&l, "rxq", dev.q[VQ_RX].size);
	line_kv_dec(&l, "txq", dev.q[VQ_TX].size);
	line_emit(&l);
	for (u32 i = 0; i < LISTEN_SLOTS; i++)
		conns[i].ring = echo_rings[i];
	conns[CLIENT_SLOT].client = true;
	if (cfg.vsock_connect)
		client_at = rdtsc();	/* the first poll connects */
	next_service = 0;
	up = true;
	io_poll_add(vsock_poll);
}

void vsock_tick(void)
{
	u64 resets = load_relaxed(&n_resets);
	if (!up || resets == resets_reported)
		return;
	resets_reported = resets;
	struct line l;
	line_start(&l, "vsock transport_reset");
	line_kv_dec(&l, "count", resets);
	line_kv_dec(&l, "cid", load_relaxed(&guest_cid));
	line_emit(&l);
}

void vsock_status(struct line *l)
{
	line_kv_dec(l, "vsock_conns", load_relaxed(&n_open));
	line_kv_dec(l, "vsock_accepted", load_relaxed(&n_accepted));
	line_kv_dec(l, "vsock_rx", load_relaxed(&n_rx));
	line_kv_dec(l, "vsock_tx", load_relaxed(&n_tx));
	line_kv_dec(l, "vsock_rst", load_relaxed(&n_rst));
	line_kv_dec(l, "vsock_err", load_relaxed(&n_err));
	line_kv_dec(l, "vsock_client_tx", load_relaxed(&n_client_tx));
	line_kv_dec(l, "vsock_client_ok", load_relaxed(&n_client_ok));
	line_kv_dec(l, "vsock_reconnects", load_relaxed(&n_reconnects));
}
