/*
 * vsock-tool: checksummed echo streams over AF_VSOCK (inside a Linux guest) and over
 * cloud-hypervisor's hybrid vsock UNIX sockets (on the host). Built static
 * (gcc -static -O2) so one binary runs in the small guest and in the test bed.
 *
 *   vsock-tool listen PORT [opts]              AF_VSOCK listener on PORT: echo every byte
 *   vsock-tool listen-unix PATH [opts]         the same on a UNIX socket (the host end of a
 *                                              guest connection to port P listens at SOCKET_P)
 *   vsock-tool send CID PORT BYTES [opts]      connect, stream BYTES, verify the echo
 *   vsock-tool send-unix PATH PORT BYTES [opts] connect to the VMM's socket PATH, write
 *                                              "CONNECT PORT\n", wait for "OK <port>\n", stream
 *
 * The stream is deterministic: byte i of a stream with seed S is byte (i % 8) of
 * splitmix64(S ^ (i / 8)), so either end can check any byte. The seed is the destination port
 * unless --seed says otherwise (listen-unix takes it from a "_N" suffix of PATH).
 *
 * A listener forks one child per connection and prints, when it ends:
 *   VSOCK-CONN tag=T n=K result=eof|reset|timeout|error bytes=N sum=HEX verified=yes|no@OFF
 *       max_gap_ms=G secs=S
 * A sender prints once connected and at the end:
 *   VSOCK-CONNECTED tag=T connect_ms=C
 *   VSOCK-SEND tag=T result=ok|reset|timeout|eof|mismatch|error sent=N echoed=N bytes=B
 *       sum=HEX secs=S mbps=X max_gap_ms=G
 * sum is FNV-1a 64 of the bytes received (listener) or sent (sender); max_gap_ms the longest
 * wait between two reads of echo (of data, for a listener), not counting a --hold wait of the
 * sender. connect_ms runs from connect() to "OK" (send-unix) or to the connection (send).
 * The sender exits 0 only with result=ok.
 *
 * Options:
 *   --tag T          name printed on every line (default: the port)
 *   --seed N         stream seed
 *   --timeout S      give up after S seconds without progress, a --hold wait included
 *                    (default 120)
 *   --pace MS        after --burst bytes, write 16 KiB chunks MS milliseconds apart
 *   --burst N        bytes written at once before pacing starts (default 0)
 *   --hold FILE      hold the last 256 KiB (all, for shorter streams) back until FILE exists;
 *                    once it exists, the rest goes at full speed (no more pacing)
 *   --progress FILE  keep "<sent> <echoed>" (listener: "<bytes>") up to date in FILE
 * After the last byte the sender shuts its write side; the listener echoes what is left, sees
 * the end of the stream and closes, so the sender ends on EOF with every byte echoed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define CHUNK 16384
#define HOLD_TAIL (256 * 1024)

static const char *tag = "";
static uint64_t seed;
static int seed_set;
static int timeout_s = 120;
static int pace_ms;
static uint64_t burst;
static const char *hold_file;
static const char *progress_file;
static int progress_fd = -1;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Fills buf with stream bytes [off, off + len). */
static void stream_bytes(uint64_t off, unsigned char *buf, size_t len)
{
    uint64_t block = UINT64_MAX, word = 0;
    for (size_t i = 0; i < len; i++, off++) {
        if (off / 8 != block) {
            block = off / 8;
            word = splitmix64(seed ^ block);
        }
        buf[i] = (unsigned char)(word >> ((off % 8) * 8));
    }
}

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n)
{
    while (n--) {
        h ^= *p++;
        h *= 0x100000001b3ULL;
    }
    return h;
}
#define FNV_START 0xcbf29ce484222325ULL

static void progress(uint64_t a, uint64_t b, int two)
{
    char line[64];
    int n;
    if (progress_fd < 0)
        return;
    n = two ? snprintf(line, sizeof line, "%llu %llu\n", (unsigned long long)a, (unsigned long long)b)
            : snprintf(line, sizeof line, "%llu\n", (unsigned long long)a);
    /* Written over the old line, then cut to it: a reader never finds the file empty (the
     * counts only grow, so the cut is a no-op but for a shorter line). */
    if (pwrite(progress_fd, line, n, 0) < 0 || ftruncate(progress_fd, n) != 0)
        progress_fd = -1;
}

static void die(const char *what)
{
    fprintf(stderr, "vsock-tool %s: %s: %s\n", tag, what, strerror(errno));
    exit(2);
}

static const char *errno_result(int e)
{
    return (e == ECONNRESET || e == EPIPE || e == ENOTCONN || e == ESHUTDOWN) ? "reset" : "error";
}

/* The error pending on socket fd (a reset shows here before read says anything), or 0. */
static int socket_error(int fd)
{
    int e = 0;
    socklen_t len = sizeof e;
    return getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &len) == 0 ? e : 0;
}

/* ---- listening ---------------------------------------------------------------------------- */

static void serve(int fd, int n)
{
    static unsigned char buf[65536], want[65536];
    uint64_t bytes = 0, sum = FNV_START, bad = UINT64_MAX;
    double start = now_s(), last = 0, gap = 0;
    const char *result = "eof";
    int e;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    for (;;) {
        int r = poll(&p, 1, timeout_s * 1000);
        if (r == 0) {
            result = "timeout";
            break;
        }
        if (r < 0) {
            if (errno == EINTR)
                continue;
            result = "error";
            break;
        }
        if (p.revents & POLLERR && (e = socket_error(fd))) {
            result = errno_result(e);
            break;
        }
        ssize_t got = read(fd, buf, sizeof buf);
        if (got == 0)
            break;
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            result = errno_result(errno);
            break;
        }
        double t = now_s();
        if (last > 0 && t - last > gap)
            gap = t - last;
        last = t;
        if (bad == UINT64_MAX) {
            stream_bytes(bytes, want, got);
            for (ssize_t i = 0; i < got; i++)
                if (buf[i] != want[i]) {
                    bad = bytes + i;
                    break;
                }
        }
        sum = fnv(sum, buf, got);
        bytes += got;
        for (ssize_t off = 0; off < got;) {
            ssize_t w = write(fd, buf + off, got - off);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                result = errno_result(errno);
                goto out;
            }
            off += w;
        }
        progress(bytes, 0, 0);
    }
out:;
    char verified[40] = "yes";
    if (bad != UINT64_MAX)
        snprintf(verified, sizeof verified, "no@%llu", (unsigned long long)bad);
    printf("VSOCK-CONN tag=%s n=%d result=%s bytes=%llu sum=%016llx verified=%s max_gap_ms=%.0f "
           "secs=%.2f\n",
           tag, n, result, (unsigned long long)bytes, (unsigned long long)sum, verified,
           gap * 1000, now_s() - start);
    fflush(stdout);
}

static int do_listen(int lfd, const char *what)
{
    if (listen(lfd, 16) < 0)
        die("listen");
    printf("VSOCK-LISTENING tag=%s %s\n", tag, what);
    fflush(stdout);
    signal(SIGCHLD, SIG_IGN);
    for (int n = 1;; n++) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) {
                n--;
                continue;
            }
            die("accept");
        }
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            close(lfd);
            serve(fd, n);
            _exit(0);
        }
        close(fd);
    }
}

/* ---- sending ------------------------------------------------------------------------------- */

/* Reads the hybrid vsock answer "OK <port>\n" byte by byte (nothing of the stream after it). */
static int read_ok_line(int fd)
{
    char line[64];
    size_t n = 0;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    while (n < sizeof line - 1) {
        if (poll(&p, 1, timeout_s * 1000) <= 0)
            return -1;
        ssize_t r = read(fd, line + n, 1);
        if (r <= 0)
            return -1;
        if (line[n] == '\n')
            break;
        n++;
    }
    line[n] = 0;
    if (strncmp(line, "OK ", 3) != 0) {
        fprintf(stderr, "vsock-tool %s: the VMM answered '%s', not OK <port>\n", tag, line);
        return -1;
    }
    return 0;
}

static int stream(int fd, uint64_t total, double t_connect)
{
    static unsigned char out[CHUNK], in[65536], want[65536];
    uint64_t sent = 0, echoed = 0, sum = FNV_START;
    double start = now_s(), last_progress = start, last_read = 0, gap = 0, next_chunk = start;
    const char *result = "ok";
    int shut = 0, e;

    printf("VSOCK-CONNECTED tag=%s connect_ms=%.0f\n", tag, t_connect * 1000);
    fflush(stdout);
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0)
        die("fcntl");
    for (;;) {
        double t = now_s();
        uint64_t limit = total;
        int released = 0;
        if (hold_file) {
            released = access(hold_file, F_OK) == 0;
            if (!released)
                limit = total > HOLD_TAIL ? total - HOLD_TAIL : 0;
        }
        if (sent == total && !shut) {
            /* The listener echoes as it reads: our end of stream is its cue to finish. */
            shutdown(fd, SHUT_WR);
            shut = 1;
        }
        int paced = pace_ms && sent >= burst && !released;
        int may_send = sent < limit && (!paced || t >= next_chunk);
        int wait_ms = 1000;
        if (sent < limit && !may_send)
            wait_ms = (int)((next_chunk - t) * 1000) + 1;
        else if (sent < total && sent == limit)
            wait_ms = 50; /* held: look for the file again soon */
        struct pollfd p = {.fd = fd, .events = POLLIN | (may_send ? POLLOUT : 0)};
        int r = poll(&p, 1, wait_ms);
        if (r < 0 && errno != EINTR)
            die("poll");
        if (r > 0 && p.revents & POLLERR && (e = socket_error(fd))) {
            result = errno_result(e);
            break;
        }
        if (r > 0 && p.revents & (POLLIN | POLLERR | POLLHUP)) {
            ssize_t got = read(fd, in, sizeof in);
            if (got == 0) {
                if (echoed < total)
                    result = "eof";
                break;
            }
            if (got < 0 && errno != EAGAIN && errno != EINTR) {
                result = errno_result(errno);
                break;
            }
            if (got > 0) {
                stream_bytes(echoed, want, got);
                if (echoed + got > sent || memcmp(in, want, got) != 0) {
                    result = "mismatch";
                    break;
                }
                double tr = now_s();
                if (last_read > 0 && tr - last_read > gap)
                    gap = tr - last_read;
                last_read = tr;
                echoed += got;
                last_progress = tr;
                progress(sent, echoed, 1);
            }
        }
        if (r > 0 && may_send && p.revents & POLLOUT) {
            uint64_t n = limit - sent;
            if (n > CHUNK)
                n = CHUNK;
            stream_bytes(sent, out, n);
            ssize_t w = write(fd, out, n);
            if (w < 0 && errno != EAGAIN && errno != EINTR) {
                result = errno_result(errno);
                break;
            }
            if (w > 0) {
                sum = fnv(sum, out, w);
                sent += w;
                last_progress = now_s();
                if (paced)
                    next_chunk = last_progress + pace_ms / 1000.0;
                progress(sent, echoed, 1);
            }
        }
        if (sent == limit && limit < total && echoed == sent)
            /* Held back with everything echoed: the gap until the next echo is ours. */
            last_read = 0;
        if (now_s() - last_progress > timeout_s) {
            result = "timeout";
            break;
        }
    }
    double secs = now_s() - start;
    printf("VSOCK-SEND tag=%s result=%s sent=%llu echoed=%llu bytes=%llu sum=%016llx secs=%.2f "
           "mbps=%.2f max_gap_ms=%.0f\n",
           tag, result, (unsigned long long)sent, (unsigned long long)echoed,
           (unsigned long long)total, (unsigned long long)sum, secs,
           secs > 0 ? echoed / secs / 1e6 : 0.0, gap * 1000);
    fflush(stdout);
    return strcmp(result, "ok") == 0 ? 0 : 1;
}

/* ---- main ---------------------------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr, "usage: vsock-tool listen PORT | listen-unix PATH | send CID PORT BYTES |\n"
                    "       send-unix PATH PORT BYTES  [--tag T] [--seed N] [--timeout S]\n"
                    "       [--pace MS] [--burst N] [--hold FILE] [--progress FILE]\n");
    exit(2);
}

static uint64_t number(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end)
        usage();
    return v;
}

static void unix_address(struct sockaddr_un *a, const char *path)
{
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof a->sun_path) {
        fprintf(stderr, "vsock-tool: socket path too long: %s\n", path);
        exit(2);
    }
    strcpy(a->sun_path, path);
}

int main(int argc, char **argv)
{
    char *pos[4];
    int npos = 0;
    char tagbuf[32];

    signal(SIGPIPE, SIG_IGN);
    if (argc < 2)
        usage();
    const char *mode = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *o = argv[i];
        if (o[0] == '-' && o[1] == '-') {
            if (i + 1 >= argc)
                usage();
            const char *v = argv[++i];
            if (!strcmp(o, "--tag"))
                tag = v;
            else if (!strcmp(o, "--seed"))
                seed = number(v), seed_set = 1;
            else if (!strcmp(o, "--timeout"))
                timeout_s = (int)number(v);
            else if (!strcmp(o, "--pace"))
                pace_ms = (int)number(v);
            else if (!strcmp(o, "--burst"))
                burst = number(v);
            else if (!strcmp(o, "--hold"))
                hold_file = v;
            else if (!strcmp(o, "--progress"))
                progress_file = v;
            else
                usage();
            continue;
        }
        if (npos == 4)
            usage();
        pos[npos++] = argv[i];
    }
    if (progress_file) {
        progress_fd = open(progress_file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (progress_fd < 0)
            die("open --progress file");
    }

    if (!strcmp(mode, "listen") && npos == 1) {
        unsigned port = (unsigned)number(pos[0]);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
        if (!seed_set)
            seed = port;
        if (!*tag)
            tag = pos[0];
        int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket(AF_VSOCK)");
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
            die("bind");
        return do_listen(fd, pos[0]);
    }
    if (!strcmp(mode, "listen-unix") && npos == 1) {
        struct sockaddr_un a;
        const char *u = strrchr(pos[0], '_');
        if (!seed_set && u)
            seed = strtoull(u + 1, NULL, 10);
        if (!*tag)
            tag = pos[0];
        unix_address(&a, pos[0]);
        unlink(pos[0]);
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket(AF_UNIX)");
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
            die("bind");
        return do_listen(fd, pos[0]);
    }
    if ((!strcmp(mode, "send") || !strcmp(mode, "send-unix")) && npos == 3) {
        unsigned port = (unsigned)number(pos[1]);
        uint64_t total = number(pos[2]);
        int fd, hybrid = !strcmp(mode, "send-unix");
        if (!seed_set)
            seed = port;
        if (!*tag) {
            snprintf(tagbuf, sizeof tagbuf, "%u", port);
            tag = tagbuf;
        }
        double t0 = now_s();
        if (hybrid) {
            struct sockaddr_un a;
            unix_address(&a, pos[0]);
            fd = socket(AF_UNIX, SOCK_STREAM, 0);
            if (fd < 0)
                die("socket(AF_UNIX)");
            if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
                die("connect");
            dprintf(fd, "CONNECT %u\n", port);
            if (read_ok_line(fd) < 0) {
                printf("VSOCK-SEND tag=%s result=refused sent=0 echoed=0 bytes=%llu\n", tag,
                       (unsigned long long)total);
                return 1;
            }
        } else {
            struct sockaddr_vm a = {.svm_family = AF_VSOCK,
                                    .svm_cid = (unsigned)number(pos[0]),
                                    .svm_port = port};
            fd = socket(AF_VSOCK, SOCK_STREAM, 0);
            if (fd < 0)
                die("socket(AF_VSOCK)");
            if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
                printf("VSOCK-SEND tag=%s result=refused(%s) sent=0 echoed=0 bytes=%llu\n", tag,
                       strerror(errno), (unsigned long long)total);
                return 1;
            }
        }
        return stream(fd, total, now_s() - t0);
    }
    usage();
}
