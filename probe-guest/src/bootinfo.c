/* hvm_start_info, the PVH memmap and the command line. */
#include "probe.h"

#define HVM_START_MAGIC 0x336ec578
#define CMDLINE_MAX 1024
#define DEFAULT_RAM_END (64 * MIB)

struct config cfg;
struct ram_map ram;
static char cmdline[CMDLINE_MAX];

static void ram_add(u64 start, u64 end)
{
	if (end <= start || ram.count >= MAX_MEMMAP)
		return;
	/* Insertion sort by start. */
	u32 i = ram.count++;
	while (i && ram.r[i - 1].start > start) {
		ram.r[i] = ram.r[i - 1];
		i--;
	}
	ram.r[i].start = start;
	ram.r[i].end = end;
}

/* Copy what we need out of hvm_start_info before anything can overwrite it. */
static bool read_start_info(u64 si)
{
	if (!si || si >= 4 * GIB || phys_rd32(si) != HVM_START_MAGIC)
		return false;
	u32 version = phys_rd32(si + 4);
	u64 cl = phys_rd64(si + 24);
	if (cl && cl < 4 * GIB) {
		const char *src = (const char *)(uintptr_t)cl;
		u32 n = 0;
		while (n < CMDLINE_MAX - 1 && src[n]) {
			cmdline[n] = src[n];
			n++;
		}
		cmdline[n] = 0;
	}
	if (version >= 1) {
		u64 mm = phys_rd64(si + 40);
		u32 entries = phys_rd32(si + 48);
		if (mm && mm < 4 * GIB) {
			for (u32 i = 0; i < entries && i < MAX_MEMMAP; i++) {
				u64 e = mm + 24ULL * i;
				if (phys_rd32(e + 16) == 1)
					ram_add(phys_rd64(e), phys_rd64(e) + phys_rd64(e + 8));
			}
		}
		ram.from_pvh = ram.count > 0;
	}
	return true;
}

static bool parse_u64(const char *s, u32 n, u64 *out)
{
	u64 v = 0;
	u32 i = 0;
	u32 base = 10;
	if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	}
	if (i >= n)
		return false;
	for (; i < n; i++) {
		char c = s[i];
		u32 d;
		if (c >= '0' && c <= '9')
			d = (u32)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = (u32)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = (u32)(c - 'A' + 10);
		else
			return false;
		if (v > (~0ULL - d) / base)
			return false;
		v = v * base + d;
	}
	*out = v;
	return true;
}

/* A dotted quad, four decimal numbers 0-255. */
static bool parse_ipv4(const char *s, u32 n, u8 out[4])
{
	u32 part = 0, digits = 0, v = 0;
	for (u32 i = 0; i <= n; i++) {
		if (i == n || s[i] == '.') {
			if (!digits || part > 3 || (i == n) != (part == 3))
				return false;
			out[part++] = (u8)v;
			v = 0;
			digits = 0;
		} else if (s[i] >= '0' && s[i] <= '9' && digits < 3) {
			v = v * 10 + (u32)(s[i] - '0');
			digits++;
			if (v > 255)
				return false;
		} else {
			return false;
		}
	}
	return true;
}

static bool key_is(const char *k, u32 klen, const char *name)
{
	return strlen(name) == klen && !__builtin_memcmp(k, name, klen);
}

static void note_unknown(const char *k, u32 klen)
{
	if (cfg.unknown_len && cfg.unknown_len < sizeof(cfg.unknown) - 1)
		cfg.unknown[cfg.unknown_len++] = ',';
	for (u32 i = 0; i < klen && cfg.unknown_len < sizeof(cfg.unknown) - 1; i++) {
		char c = k[i];
		/* Keep the banner parseable: no spaces, '=' or control bytes. */
		cfg.unknown[cfg.unknown_len++] = (c > ' ' && c < 0x7f && c != '=' && c != ',') ? c : '_';
	}
	cfg.unknown[cfg.unknown_len] = 0;
}

void config_parse(void)
{
	cfg.fill = 50;
	cfg.status_ms = 1000;
	cfg.net_udp_port = 7;
	cfg.vsock_port = 1234;
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		if (!*p)
			break;
		const char *tok = p;
		while (*p && *p != ' ' && *p != '\t' && *p != '\n')
			p++;
		u32 len = (u32)(p - tok);
		u32 klen = 0;
		while (klen < len && tok[klen] != '=')
			klen++;
		const char *val = tok + klen + 1;
		u32 vlen = klen < len ? len - klen - 1 : 0;
		u64 v = 0;
		u8 ip[4];
		bool has_val = klen < len && parse_u64(val, vlen, &v);
		if (key_is(tok, klen, "fill") && has_val && v <= 100)
			cfg.fill = v;
		else if (key_is(tok, klen, "status_ms") && has_val && v >= 1 && v <= 3600000)
			cfg.status_ms = v;
		else if (key_is(tok, klen, "reboot_after") && has_val)
			cfg.reboot_after = v;
		else if (key_is(tok, klen, "corrupt_at") && has_val) {
			cfg.corrupt_at = v & ~7ULL;
			cfg.corrupt = true;
		} else if (key_is(tok, klen, "virtio") && has_val && v <= 1)
			cfg.virtio = v;
		else if (key_is(tok, klen, "blk_io") && has_val && v <= 1)
			cfg.blk_io = v;
		else if (key_is(tok, klen, "userdev") && has_val && v <= 2) {
			cfg.userdev = v != 0;
			cfg.userdev_rescan = v == 2;
		}
		else if (key_is(tok, klen, "userdev_ack") && has_val && v <= 1)
			cfg.userdev_ack = v;
		else if (key_is(tok, klen, "edu") && has_val && v <= 1)
			cfg.edu = v;
		else if (key_is(tok, klen, "hotplug") && has_val && v <= 1)
			cfg.hotplug = v;
		else if (key_is(tok, klen, "net") && has_val && v <= 1)
			cfg.net = v;
		else if (key_is(tok, klen, "net_ip") && klen < len && parse_ipv4(val, vlen, ip)) {
			memcpy(cfg.net_ip, ip, 4);
			cfg.net_ip_set = true;
		}
		else if (key_is(tok, klen, "net_udp_port") && has_val && v >= 1 && v <= 65535)
			cfg.net_udp_port = v;
		else if (key_is(tok, klen, "vsock") && has_val && v <= 1)
			cfg.vsock = v;
		/* vsock ports are 32-bit; 0xffffffff is VMADDR_PORT_ANY. */
		else if (key_is(tok, klen, "vsock_port") && has_val && v >= 1 && v < 0xffffffffULL)
			cfg.vsock_port = v;
		else if (key_is(tok, klen, "vsock_connect") && has_val && v < 0xffffffffULL)
			cfg.vsock_connect = v;
		else if (key_is(tok, klen, "vsock_bytes") && has_val)
			cfg.vsock_bytes = v;
		else if (key_is(tok, klen, "heartbeat") && has_val && v <= 1)
			cfg.heartbeat = v;
		else if (key_is(tok, klen, "heartbeat_us") && has_val && v <= 1000000)
			cfg.heartbeat_us = v;
		else
			note_unknown(tok, len);	/* unknown key or bad value */
	}
	if (!cfg.heartbeat)
		cfg.heartbeat_us = 0;
	if (cfg.heartbeat)
		cfg.fill = 0;	/* only the TSC stamps: every loop turn is a few instructions */
}


/*
 * Reads hvm_start_info at start_info (cmdline, memmap, RSDP). Without a
 * memmap, RAM defaults to [0, 0x9f000) and [1 MiB, 64 MiB), said on COM1.
 */
bool bootinfo_read(u64 start_info, u64 *rsdp)
{
	bool ok = read_start_info(start_info);
	*rsdp = ok ? phys_rd64(start_info + 32) : 0;
	if (!ok)
		say("note no valid hvm_start_info, empty command line");
	if (!ram.from_pvh) {
		ram.count = 0;
		ram_add(0, 0x9f000);
		ram_add(MIB, DEFAULT_RAM_END);
		say("note no memmap, assuming ram=0x0-0x9f000,0x100000-0x4000000");
	}
	return ok;
}
