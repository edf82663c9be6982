/* The few libc routines gcc may emit calls to in freestanding mode. */
#include "probe.h"

/*
 * Eight bytes a move where possible: on a host whose KVM emulates guest memory accesses one
 * by one (this project's development machines), each access costs about a microsecond.
 * x86 takes unaligned 8-byte moves; the copies go through a may_alias type.
 */
typedef u64 __attribute__((may_alias, aligned(1))) u64_any;

void *memset(void *dst, int c, size_t n)
{
	u8 *d = dst;
	u64 word = 0x0101010101010101ULL * (u8)c;
	for (; n >= 8; n -= 8, d += 8)
		*(u64_any *)d = word;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;
	for (; n >= 8; n -= 8, d += 8, s += 8)
		*(u64_any *)d = *(const u64_any *)s;
	while (n--)
		*d++ = *s++;
	return dst;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}
