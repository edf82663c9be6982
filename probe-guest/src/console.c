/* COM1 output (polled, bounded waits) and line formatting. */
#include "probe.h"

#define COM1 0x3f8
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY 0x20
#define THR_SPIN_LIMIT 200000
#define LOCK_SPIN_LIMIT 100000000ULL
/* Characters between two calls of io_poll_hook: each one is a VM exit, a line hundreds. */
#define POLL_EVERY_CHARS 16

/* Once a wait for THR-empty times out we stop waiting: no hang without a UART. */
static bool uart_no_wait;
static u32 console_lock;

void serial_init(void)
{
	outb(COM1 + 1, 0x00);	/* no interrupts */
	outb(COM1 + 3, 0x80);	/* DLAB */
	outb(COM1 + 0, 0x01);	/* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);	/* 8N1 */
	outb(COM1 + 2, 0x07);	/* FIFO on, cleared */
	outb(COM1 + 4, 0x03);	/* DTR, RTS */
}

static void serial_putc(char c)
{
	if (!uart_no_wait) {
		u32 spins = 0;
		while (!(inb(COM1 + 5) & LSR_THR_EMPTY)) {
			if (++spins >= THR_SPIN_LIMIT) {
				uart_no_wait = true;
				break;
			}
			cpu_relax();
		}
	}
	outb(COM1, (u8)c);
}

/* Returns the next received byte, or -1. 0xff in LSR means no UART. */
int serial_getc(void)
{
	u8 lsr = inb(COM1 + 5);
	if (lsr == 0xff || !(lsr & LSR_DATA_READY))
		return -1;
	return inb(COM1);
}

void line_str(struct line *l, const char *s)
{
	while (*s && l->len < sizeof(l->buf) - 2)
		l->buf[l->len++] = *s++;
}

void line_start(struct line *l, const char *what)
{
	l->len = 0;
	line_str(l, "probe: ");
	line_str(l, what);
}

void line_dec(struct line *l, u64 v)
{
	char tmp[24];
	int n = 0;
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n && l->len < sizeof(l->buf) - 2)
		l->buf[l->len++] = tmp[--n];
}

void line_hex(struct line *l, u64 v)
{
	char tmp[20];
	int n = 0;
	do {
		tmp[n++] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v);
	line_str(l, "0x");
	while (n && l->len < sizeof(l->buf) - 2)
		l->buf[l->len++] = tmp[--n];
}

static void line_key(struct line *l, const char *key)
{
	line_str(l, " ");
	line_str(l, key);
	line_str(l, "=");
}

void line_kv_dec(struct line *l, const char *key, u64 v)
{
	line_key(l, key);
	line_dec(l, v);
}

void line_kv_hex(struct line *l, const char *key, u64 v)
{
	line_key(l, key);
	line_hex(l, v);
}

void line_kv_str(struct line *l, const char *key, const char *v)
{
	line_key(l, key);
	line_str(l, v);
}

void line_emit(struct line *l)
{
	l->buf[l->len++] = '\n';
	/* Bounded: a CPU that died holding the lock must not silence the rest. */
	for (u64 spins = 0; spins < LOCK_SPIN_LIMIT; spins++) {
		if (!__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
			break;
		cpu_relax();
	}
	for (u32 i = 0; i < l->len; i++) {
		serial_putc(l->buf[i]);
		if (io_poll_hook && i % POLL_EVERY_CHARS == POLL_EVERY_CHARS - 1)
			io_poll_hook();
	}
	__atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
	l->len = 0;
}

void say(const char *msg)
{
	struct line l;
	line_start(&l, msg);
	line_emit(&l);
}
