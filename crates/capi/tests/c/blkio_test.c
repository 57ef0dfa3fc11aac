/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause */
/*
 * blkio_test: a C program of libblkio's API, run against a real device through
 * vireo's libblkio.so.1 (crates/capi/tests/c_programs.rs runs it).
 *
 *   blkio_test DRIVER PATH MODE [TARGET LUN]
 *
 * DRIVER is a libblkio driver name (virtio-blk-vhost-user, virtio-scsi-vhost-user, ...),
 * PATH its "path" property, TARGET and LUN the scsi drivers' "target" and "lun".
 * MODE picks how completions are waited for:
 *   poll  a poll queue (num-queues 0, num-poll-queues 1, blkio_get_poll_queue), and
 *         blkioq_do_io() spinning with min_completions;
 *   fd    a regular queue with its completion fd enabled: poll(2) on the fd, read its
 *         8 bytes, then blkioq_do_io() with min_completions 0; and once with the fd
 *         switched to blocking mode, a blocking read(2) instead of poll(2), as fio's
 *         libblkio_wait_mode=eventfd does.
 *
 * A wait for completions that lasts HANG_S seconds is reported as a FAIL line naming the
 * step, and the program exits 1.
 *
 * It prints one line per check ("ok - ..." or "FAIL - ...") and a count, and exits 0
 * only when every check passed. It writes to the device: give it a scratch disk.
 *
 * Where the expected error is libblkio's own behaviour rather than its documentation,
 * the check says so; libblkio 1.5's answers:
 *   - a property read before blkio_connect() (e.g. "capacity"): -ENODEV ("Device must
 *     be connected"), not -EBUSY or -ENOENT;
 *   - setting a read-only property: -EACCES; setting one in the wrong state: -EBUSY;
 *   - a request flag the request type does not take, or an unknown flag bit: the
 *     request completes with -EINVAL.
 */
#define _GNU_SOURCE /* memfd_create */

#include <blkio.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* How long one wait for completions may last before the program calls it hung, says
 * which step and exits: a hang guard (SIGALRM), not a performance bound. */
#define HANG_S 120

/* The step the guard names: written before each wait, read by the signal handler. */
static char hang_msg[512];
static volatile size_t hang_len;

static void on_alarm(int sig)
{
    (void)sig;
    ssize_t w = write(STDOUT_FILENO, hang_msg, hang_len);
    (void)w;
    _exit(1);
}

/* Arm the guard for the step `what`; disarm with guard(NULL). */
static void guard(const char *what)
{
    if (!what) {
        alarm(0);
        return;
    }
    int n = snprintf(hang_msg, sizeof(hang_msg),
                     "FAIL - %s: no completion in %d s (hang)\nblkio_test: hung\n", what,
                     HANG_S);
    hang_len = n < 0 ? 0 : (size_t)n < sizeof(hang_msg) ? (size_t)n : sizeof(hang_msg) - 1;
    alarm(HANG_S);
}

static int passed;
static int failed;

static bool check(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool check(bool ok, const char *fmt, ...)
{
    va_list ap;

    printf("%s - ", ok ? "ok" : "FAIL");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    if (ok) {
        passed++;
    } else {
        failed++;
    }
    return ok;
}

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...)
{
    va_list ap;

    printf("# ");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

static int summary(const char *driver, const char *mode)
{
    printf("blkio_test %s %s: %d checks passed, %d failed\n", driver, mode, passed, failed);
    return failed == 0 && passed > 0 ? 0 : 1;
}

static const char *msg(void)
{
    const char *m = blkio_get_error_msg();
    return m ? m : "(NULL)";
}

static const char *errname(int ret)
{
    switch (-ret) {
    case 0: return "0";
    case EINVAL: return "-EINVAL";
    case ENOENT: return "-ENOENT";
    case EBUSY: return "-EBUSY";
    case ENOTTY: return "-ENOTTY";
    case ENODEV: return "-ENODEV";
    case EACCES: return "-EACCES";
    case EBADF: return "-EBADF";
    case ENOTSUP: return "-ENOTSUP";
    case EIO: return "-EIO";
    case ETIME: return "-ETIME";
    case ENOSPC: return "-ENOSPC";
    case EPERM: return "-EPERM";
    default: return strerror(ret < 0 ? -ret : ret);
    }
}

/* ---------------------------------------------------------------------------------- */
/* The instance under test. */

struct cfg {
    const char *driver;
    const char *path;
    const char *mode;
    bool poll;
    bool scsi;
    int target;
    int lun;
};

struct props {
    uint64_t capacity;
    uint64_t mem_region_alignment;
    uint64_t max_mem_regions;
    uint64_t max_discard_len;
    uint64_t max_write_zeroes_len;
    int request_alignment;
    int buf_alignment;
    int optimal_io_alignment;
    int max_queues;
    int num_queues;
    int num_poll_queues;
    int queue_size;
    int max_queue_size;
    int max_transfer;
    int max_segments;
    int discard_alignment;
    int discard_alignment_offset;
    bool supports_poll_queues;
    bool needs_mem_regions;
    bool needs_mem_region_fd;
    bool read_only;
};

struct ctx {
    struct blkio *b;
    struct blkioq *q;
    bool poll;
    int cfd; /* fd mode: the completion fd */
    struct props p;
    size_t io;     /* bytes per test request: a multiple of request-alignment */
    char *buf;     /* the allocated region */
    size_t buf_len;
};

/* Slot i of the allocated region, io bytes each. */
static char *slot(struct ctx *c, int i)
{
    return c->buf + (size_t)i * c->io;
}

/* ---------------------------------------------------------------------------------- */
/* Data patterns. */

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void fill(void *buf, size_t len, uint64_t seed)
{
    uint64_t *p = buf;

    for (size_t i = 0; i < len / 8; i++) {
        p[i] = mix(seed * 0x100000001b3ull + i);
    }
}

/* Compare buf with fill(len, seed); the offset of the first difference or -1. */
static long long differs(const void *buf, size_t len, uint64_t seed)
{
    const uint64_t *p = buf;

    for (size_t i = 0; i < len / 8; i++) {
        if (p[i] != mix(seed * 0x100000001b3ull + i)) {
            return (long long)(i * 8);
        }
    }
    return -1;
}

static long long nonzero(const void *buf, size_t len)
{
    const unsigned char *p = buf;

    for (size_t i = 0; i < len; i++) {
        if (p[i]) {
            return (long long)i;
        }
    }
    return -1;
}

/* ---------------------------------------------------------------------------------- */
/* Requests. */

enum op {
    OP_READ,
    OP_WRITE,
    OP_READV,
    OP_WRITEV,
    OP_WRITE_ZEROES,
    OP_DISCARD,
    OP_FLUSH,
    OP_REPORT_ZONES,
    OP_RESET_ZONE,
    OP_OPEN_ALL_ZONES,
};

struct req {
    enum op op;
    uint64_t start;
    void *buf;
    size_t len;
    struct iovec *iov;
    int iovcnt;
    uint32_t flags;
    /* filled in on completion */
    bool done;
    int ret;
    const char *error_msg;
};

static void queue_req(struct ctx *c, struct req *r)
{
    static struct blkio_zone zones[4];

    r->done = false;
    r->ret = 1;
    switch (r->op) {
    case OP_READ:
        blkioq_read(c->q, r->start, r->buf, r->len, r, r->flags);
        break;
    case OP_WRITE:
        blkioq_write(c->q, r->start, r->buf, r->len, r, r->flags);
        break;
    case OP_READV:
        blkioq_readv(c->q, r->start, r->iov, r->iovcnt, r, r->flags);
        break;
    case OP_WRITEV:
        blkioq_writev(c->q, r->start, r->iov, r->iovcnt, r, r->flags);
        break;
    case OP_WRITE_ZEROES:
        blkioq_write_zeroes(c->q, r->start, r->len, r, r->flags);
        break;
    case OP_DISCARD:
        blkioq_discard(c->q, r->start, r->len, r, r->flags);
        break;
    case OP_FLUSH:
        blkioq_flush(c->q, r, r->flags);
        break;
    case OP_REPORT_ZONES:
        blkioq_report_zones(c->q, r->start, zones, 4, r, r->flags);
        break;
    case OP_RESET_ZONE:
        blkioq_reset_zone(c->q, r->start, r, r->flags);
        break;
    case OP_OPEN_ALL_ZONES:
        blkioq_open_all_zones(c->q, r, r->flags);
        break;
    }
}

/* Record one completion against the batch reqs[0..n); false when its user_data is
 * not one of them or was completed already. */
static bool take(struct req *reqs, int n, const struct blkio_completion *cp, const char *what)
{
    uintptr_t off = (uintptr_t)cp->user_data - (uintptr_t)reqs;

    if ((uintptr_t)cp->user_data < (uintptr_t)reqs || off % sizeof(*reqs) != 0 ||
        off / sizeof(*reqs) >= (uintptr_t)n) {
        check(false, "%s: a completion with user_data %p that no request of the batch has",
              what, cp->user_data);
        return false;
    }
    struct req *r = &reqs[off / sizeof(*reqs)];
    if (r->done) {
        check(false, "%s: request %d completed twice", what, (int)(r - reqs));
        return false;
    }
    r->done = true;
    r->ret = cp->ret;
    r->error_msg = cp->error_msg;
    if (cp->ret == 0 && cp->error_msg != NULL) {
        check(false, "%s: request %d succeeded with error_msg \"%s\" (libblkio: NULL when ret is 0)",
              what, (int)(r - reqs), cp->error_msg);
        return false;
    }
    return true;
}

/* Submit what is queued and wait for the n requests of reqs[]; false (reported) when
 * the queue fails or hangs, or a completion does not belong to the batch. */
static bool collect(struct ctx *c, struct req *reqs, int n, const char *what)
{
    struct blkio_completion comps[32];
    int got = 0;

    if (n > 32) {
        abort();
    }
    if (c->poll) {
        while (got < n) {
            int r = blkioq_do_io(c->q, comps, n - got, n - got, NULL);
            if (r < 0) {
                return check(false, "%s: blkioq_do_io(min %d) = %s: %s", what, n - got,
                             errname(r), msg());
            }
            if (r < n - got) {
                return check(false, "%s: blkioq_do_io(min %d) returned %d completions", what,
                             n - got, r);
            }
            for (int i = 0; i < r; i++) {
                if (!take(reqs, n, &comps[i], what)) {
                    return false;
                }
            }
            got += r;
        }
        return true;
    }

    /* fd mode: submit without waiting, then wait on the completion fd. */
    int r = blkioq_do_io(c->q, comps, 0, n, NULL);
    if (r < 0) {
        return check(false, "%s: blkioq_do_io(min 0) = %s: %s", what, errname(r), msg());
    }
    for (int i = 0; i < r; i++) {
        if (!take(reqs, n, &comps[i], what)) {
            return false;
        }
    }
    got = r;
    while (got < n) {
        struct pollfd pfd = { .fd = c->cfd, .events = POLLIN };
        int pr = poll(&pfd, 1, -1);
        if (pr < 0 && errno == EINTR) {
            continue;
        }
        if (pr < 0) {
            return check(false, "%s: poll(completion fd): %s", what, strerror(errno));
        }
        uint64_t event;
        ssize_t rd = read(c->cfd, &event, sizeof(event));
        if (rd != (ssize_t)sizeof(event) && !(rd < 0 && errno == EAGAIN)) {
            return check(false, "%s: read(completion fd) = %zd: %s", what, rd,
                         rd < 0 ? strerror(errno) : "short read");
        }
        r = blkioq_do_io(c->q, comps, 0, n - got, NULL);
        if (r < 0) {
            return check(false, "%s: blkioq_do_io(min 0) = %s: %s", what, errname(r), msg());
        }
        for (int i = 0; i < r; i++) {
            if (!take(reqs, n, &comps[i], what)) {
                return false;
            }
        }
        got += r;
    }
    return true;
}

/* Queue reqs[0..n) all at once, then wait for them. */
static bool run(struct ctx *c, struct req *reqs, int n, const char *what)
{
    guard(what);
    for (int i = 0; i < n; i++) {
        queue_req(c, &reqs[i]);
    }
    bool ok = collect(c, reqs, n, what);
    guard(NULL);
    return ok;
}

/* One request; its completion's ret, or 1 when it was not collected (reported). */
static int run1(struct ctx *c, struct req r, const char *what)
{
    if (!run(c, &r, 1, what)) {
        return 1;
    }
    return r.ret;
}

static bool all_ok(struct req *reqs, int n, const char *what)
{
    for (int i = 0; i < n; i++) {
        if (reqs[i].ret != 0) {
            return check(false, "%s: request %d (start %" PRIu64 ") = %s: %s", what, i,
                         reqs[i].start, errname(reqs[i].ret),
                         reqs[i].error_msg ? reqs[i].error_msg : "(no message)");
        }
    }
    return true;
}

/* ---------------------------------------------------------------------------------- */
/* Properties. */

static bool get_bool(struct blkio *b, const char *name, bool *v)
{
    int r = blkio_get_bool(b, name, v);
    if (r != 0) {
        return check(false, "blkio_get_bool(\"%s\") = %s: %s", name, errname(r), msg());
    }
    note("%s = %s", name, *v ? "true" : "false");
    return true;
}

static bool get_int(struct blkio *b, const char *name, int *v)
{
    int r = blkio_get_int(b, name, v);
    if (r != 0) {
        return check(false, "blkio_get_int(\"%s\") = %s: %s", name, errname(r), msg());
    }
    note("%s = %d", name, *v);
    return true;
}

static bool get_u64(struct blkio *b, const char *name, uint64_t *v)
{
    int r = blkio_get_uint64(b, name, v);
    if (r != 0) {
        return check(false, "blkio_get_uint64(\"%s\") = %s: %s", name, errname(r), msg());
    }
    note("%s = %" PRIu64, name, *v);
    return true;
}

static bool get_str(struct blkio *b, const char *name, char **v)
{
    int r = blkio_get_str(b, name, v);
    if (r != 0) {
        *v = NULL;
        return check(false, "blkio_get_str(\"%s\") = %s: %s", name, errname(r), msg());
    }
    note("%s = \"%s\"", name, *v);
    return true;
}

static bool is_pow2(long long v)
{
    return v > 0 && (v & (v - 1)) == 0;
}

/* Every property the contract names, read with its type; fills c->p. */
static void read_properties(struct ctx *c, const struct cfg *cfg)
{
    struct props *p = &c->p;
    bool ok = true, bv;
    int iv;
    char *sv;

    static const char *bools[] = {
        "can-add-queues", "may-pin-mem-regions", "supports-fua-natively", "can-grow",
        "flush-needed", "direct", NULL,
    };
    static const char *ints[] = {
        "optimal-io-size", "optimal-buf-alignment", "max-segment-len", NULL,
    };

    ok &= get_u64(c->b, "capacity", &p->capacity);
    ok &= get_u64(c->b, "mem-region-alignment", &p->mem_region_alignment);
    ok &= get_u64(c->b, "max-mem-regions", &p->max_mem_regions);
    ok &= get_u64(c->b, "max-discard-len", &p->max_discard_len);
    ok &= get_u64(c->b, "max-write-zeroes-len", &p->max_write_zeroes_len);
    ok &= get_int(c->b, "request-alignment", &p->request_alignment);
    ok &= get_int(c->b, "buf-alignment", &p->buf_alignment);
    ok &= get_int(c->b, "optimal-io-alignment", &p->optimal_io_alignment);
    ok &= get_int(c->b, "max-queues", &p->max_queues);
    ok &= get_int(c->b, "num-queues", &p->num_queues);
    ok &= get_int(c->b, "num-poll-queues", &p->num_poll_queues);
    ok &= get_int(c->b, "queue-size", &p->queue_size);
    ok &= get_int(c->b, "max-queue-size", &p->max_queue_size);
    ok &= get_int(c->b, "max-transfer", &p->max_transfer);
    ok &= get_int(c->b, "max-segments", &p->max_segments);
    ok &= get_int(c->b, "discard-alignment", &p->discard_alignment);
    ok &= get_int(c->b, "discard-alignment-offset", &p->discard_alignment_offset);
    ok &= get_bool(c->b, "supports-poll-queues", &p->supports_poll_queues);
    ok &= get_bool(c->b, "needs-mem-regions", &p->needs_mem_regions);
    ok &= get_bool(c->b, "needs-mem-region-fd", &p->needs_mem_region_fd);
    ok &= get_bool(c->b, "read-only", &p->read_only);
    for (int i = 0; bools[i]; i++) {
        ok &= get_bool(c->b, bools[i], &bv);
    }
    for (int i = 0; ints[i]; i++) {
        ok &= get_int(c->b, ints[i], &iv);
    }
    if (cfg->scsi) {
        ok &= get_int(c->b, "target", &iv);
        ok &= get_int(c->b, "lun", &iv);
    }
    if (get_str(c->b, "driver", &sv)) {
        ok &= check(strcmp(sv, cfg->driver) == 0, "\"driver\" is \"%s\" after connect", sv);
        free(sv);
    } else {
        ok = false;
    }
    if (get_str(c->b, "path", &sv)) {
        ok &= check(strcmp(sv, cfg->path) == 0, "\"path\" reads back as set");
        free(sv);
    } else {
        ok = false;
    }
    check(ok, "every property reads with its type after connect");

    check(p->capacity > 0 && p->request_alignment > 0 &&
          p->capacity % (uint64_t)p->request_alignment == 0,
          "capacity %" PRIu64 " is a positive multiple of request-alignment %d", p->capacity,
          p->request_alignment);
    check(is_pow2(p->request_alignment), "request-alignment %d is a power of two",
          p->request_alignment);
    check(p->buf_alignment > 0 && p->mem_region_alignment % (uint64_t)p->buf_alignment == 0,
          "mem-region-alignment %" PRIu64 " is a multiple of buf-alignment %d",
          p->mem_region_alignment, p->buf_alignment);
    check(p->optimal_io_alignment > 0 && p->optimal_io_alignment % p->request_alignment == 0,
          "optimal-io-alignment %d is a multiple of request-alignment",
          p->optimal_io_alignment);
    check(p->num_queues == 1 && p->num_poll_queues == 0,
          "num-queues defaults to 1 (%d), num-poll-queues to 0 (%d)", p->num_queues,
          p->num_poll_queues);
    check(p->max_queues >= 1, "max-queues %d >= 1", p->max_queues);
    check(p->supports_poll_queues, "supports-poll-queues is true");
    check(!p->needs_mem_regions, "needs-mem-regions is false (unmapped buffers are bounced)");
    if (strstr(cfg->driver, "vhost-user")) {
        check(p->needs_mem_region_fd, "needs-mem-region-fd is true for vhost-user");
    }
    check(p->queue_size > 0 && p->queue_size <= p->max_queue_size,
          "queue-size %d is within max-queue-size %d", p->queue_size, p->max_queue_size);
    check(!p->read_only, "read-only is false as set");
}

/* ---------------------------------------------------------------------------------- */
/* Phases. */

static bool set_path(struct blkio *b, const struct cfg *cfg)
{
    int r = blkio_set_str(b, "path", cfg->path);
    if (!check(r == 0, "blkio_set_str(\"path\", \"%s\") = %s %s", cfg->path, errname(r),
               r ? msg() : "")) {
        return false;
    }
    if (cfg->scsi) {
        r = blkio_set_int(b, "target", cfg->target);
        if (!check(r == 0, "blkio_set_int(\"target\", %d) = %s %s", cfg->target,
                   errname(r), r ? msg() : "")) {
            return false;
        }
        r = blkio_set_int(b, "lun", cfg->lun);
        if (!check(r == 0, "blkio_set_int(\"lun\", %d) = %s %s", cfg->lun, errname(r),
                   r ? msg() : "")) {
            return false;
        }
    }
    return true;
}

/* Checks in the created state. */
static void created_state(struct blkio *b, const struct cfg *cfg)
{
    int r, iv;
    bool bv;
    uint64_t uv;
    char *sv;

    r = blkio_get_str(b, "driver", &sv);
    if (check(r == 0, "blkio_get_str(\"driver\") before connect = %s", errname(r))) {
        check(strcmp(sv, cfg->driver) == 0, "\"driver\" is \"%s\"", sv);
        free(sv);
    }
    r = blkio_get_bool(b, "can-add-queues", &bv);
    check(r == 0, "blkio_get_bool(\"can-add-queues\") before connect = %s (%s)", errname(r),
          r == 0 ? (bv ? "true" : "false") : msg());

    r = blkio_get_uint64(b, "capacity", &uv);
    check(r == -ENODEV,
          "blkio_get_uint64(\"capacity\") before connect = %s (libblkio: -ENODEV, "
          "\"Device must be connected\"): %s", errname(r), msg());
    const char *m = blkio_get_error_msg();
    check(m != NULL && m[0] != '\0', "blkio_get_error_msg() after that failure: \"%s\"",
          m ? m : "(NULL)");

    r = blkio_get_int(b, "no-such-property", &iv);
    check(r == -ENOENT, "blkio_get_int(\"no-such-property\") = %s (want -ENOENT): %s",
          errname(r), msg());
    r = blkio_set_int(b, "no-such-property", 1);
    check(r == -ENOENT, "blkio_set_int(\"no-such-property\") = %s (want -ENOENT): %s",
          errname(r), msg());
    r = blkio_get_int(b, "read-only", &iv);
    check(r == -ENOTTY, "blkio_get_int(\"read-only\"), a bool = %s (want -ENOTTY): %s",
          errname(r), msg());
    r = blkio_set_uint64(b, "read-only", 1);
    check(r == -ENOTTY, "blkio_set_uint64(\"read-only\"), a bool = %s (want -ENOTTY): %s",
          errname(r), msg());
    r = blkio_set_str(b, "read-only", "maybe");
    check(r == -EINVAL, "blkio_set_str(\"read-only\", \"maybe\") = %s (want -EINVAL): %s",
          errname(r), msg());

    /* A connect-time property set before connect: the same answer as text or int. */
    r = blkio_set_str(b, "num-queues", "2");
    int r2 = blkio_set_int(b, "num-queues", 2);
    check(r == r2 && r == -ENODEV,
          "blkio_set_str(\"num-queues\", \"2\") = %s, blkio_set_int = %s before connect "
          "(want -ENODEV both): %s", errname(r), errname(r2), msg());

    r = blkio_set_bool(b, "read-only", false);
    check(r == 0, "blkio_set_bool(\"read-only\", false) = %s %s", errname(r), r ? msg() : "");
    /* fio sets "direct" and accepts -ENOENT; the contract says vireo accepts it. */
    r = blkio_set_bool(b, "direct", true);
    check(r == 0, "blkio_set_bool(\"direct\", true) = %s %s", errname(r), r ? msg() : "");

    check(blkio_get_queue(b, 0) == NULL, "blkio_get_queue(0) before start is NULL");
    r = blkio_start(b);
    check(r < 0, "blkio_start() before connect fails: %s: %s", errname(r), msg());
}

/* Checks in the connected state; then sets the queues for the mode. */
static bool connected_state(struct ctx *c, const struct cfg *cfg)
{
    int r;
    char *sv;

    read_properties(c, cfg);

    r = blkio_get_str(c->b, "request-alignment", &sv);
    if (check(r == 0, "blkio_get_str() of an int property = %s", errname(r))) {
        char want[32];
        snprintf(want, sizeof(want), "%d", c->p.request_alignment);
        check(strcmp(sv, want) == 0, "blkio_get_str(\"request-alignment\") = \"%s\" (want "
              "\"%s\")", sv, want);
        free(sv);
    }
    r = blkio_get_str(c->b, "supports-poll-queues", &sv);
    if (check(r == 0, "blkio_get_str() of a bool property = %s", errname(r))) {
        check(strcmp(sv, "true") == 0, "blkio_get_str(\"supports-poll-queues\") = \"%s\"",
              sv);
        free(sv);
    }

    r = blkio_set_bool(c->b, "read-only", true);
    check(r == -EBUSY, "blkio_set_bool(\"read-only\") after connect = %s (want -EBUSY): %s",
          errname(r), msg());
    r = blkio_set_uint64(c->b, "capacity", 4096);
    check(r == -EACCES, "blkio_set_uint64(\"capacity\"), read-only = %s (libblkio: -EACCES): "
          "%s", errname(r), msg());
    r = blkio_set_int(c->b, "num-queues", -1);
    check(r == -EINVAL, "blkio_set_int(\"num-queues\", -1) = %s (want -EINVAL): %s",
          errname(r), msg());

    if (c->p.max_queue_size >= 64) {
        int qs = 0;
        r = blkio_set_int(c->b, "queue-size", 64);
        if (r == 0) {
            blkio_get_int(c->b, "queue-size", &qs);
        }
        check(r == 0 && qs == 64, "blkio_set_int(\"queue-size\", 64) = %s, reads back %d",
              errname(r), qs);
    }

    /* fio's libblkio_pre_start_props set properties as strings. */
    if (c->poll) {
        r = blkio_set_str(c->b, "num-queues", "0");
        check(r == 0, "blkio_set_str(\"num-queues\", \"0\") = %s %s", errname(r),
              r ? msg() : "");
        r = blkio_set_int(c->b, "num-poll-queues", 1);
        check(r == 0, "blkio_set_int(\"num-poll-queues\", 1) = %s %s", errname(r),
              r ? msg() : "");
    } else {
        r = blkio_set_str(c->b, "num-queues", "1");
        check(r == 0, "blkio_set_str(\"num-queues\", \"1\") = %s %s", errname(r),
              r ? msg() : "");
        r = blkio_set_int(c->b, "num-poll-queues", 0);
        check(r == 0, "blkio_set_int(\"num-poll-queues\", 0) = %s %s", errname(r),
              r ? msg() : "");
    }
    return true;
}

/* Checks in the started state: queues and the completion fd. */
static bool started_state(struct ctx *c)
{
    int r;
    struct timespec ts = { .tv_sec = 5 };
    sigset_t none;

    r = blkio_set_int(c->b, "num-queues", 2);
    check(r == -EBUSY, "blkio_set_int(\"num-queues\") after start = %s (want -EBUSY): %s",
          errname(r), msg());
    const char *m = blkio_get_error_msg();
    check(m != NULL && m[0] != '\0', "blkio_get_error_msg() after that failure: \"%s\"",
          m ? m : "(NULL)");

    check(blkio_get_queue(c->b, -1) == NULL, "blkio_get_queue(-1) is NULL");
    check(blkio_get_poll_queue(c->b, 1) == NULL, "blkio_get_poll_queue(1) is NULL (one at most)");
    if (c->poll) {
        c->q = blkio_get_poll_queue(c->b, 0);
        if (!check(c->q != NULL, "blkio_get_poll_queue(0) with num-poll-queues 1")) {
            return false;
        }
        check(blkio_get_queue(c->b, 0) == NULL, "blkio_get_queue(0) with num-queues 0 is NULL");
        r = blkioq_get_completion_fd(c->q);
        check(r == -1, "blkioq_get_completion_fd() of a poll queue = %d (want -1)", r);
        blkioq_set_completion_fd_enabled(c->q, true); /* no effect on poll queues */
        sigemptyset(&none);
        r = blkioq_do_io_interruptible(c->q, NULL, 0, 0, NULL, &none);
        check(r == -ENOTSUP, "blkioq_do_io_interruptible() on a poll queue = %s (want "
              "-ENOTSUP)", errname(r));
    } else {
        c->q = blkio_get_queue(c->b, 0);
        if (!check(c->q != NULL, "blkio_get_queue(0)")) {
            return false;
        }
        check(blkio_get_queue(c->b, 1) == NULL, "blkio_get_queue(1) with num-queues 1 is NULL");
        check(blkio_get_poll_queue(c->b, 0) == NULL,
              "blkio_get_poll_queue(0) with num-poll-queues 0 is NULL");
        c->cfd = blkioq_get_completion_fd(c->q);
        if (!check(c->cfd >= 0, "blkioq_get_completion_fd() = %d", c->cfd)) {
            return false;
        }
        int fl = fcntl(c->cfd, F_GETFL);
        check(fl >= 0 && (fl & O_NONBLOCK), "the completion fd is O_NONBLOCK");
        blkioq_set_completion_fd_enabled(c->q, true);
        sigemptyset(&none);
        r = blkioq_do_io_interruptible(c->q, NULL, 0, 0, NULL, &none);
        check(r == 0, "blkioq_do_io_interruptible() with nothing to do = %s", errname(r));
    }
    /* libblkio: min_completions above the requests in flight is -EINVAL. The timeout only
     * keeps a library that waits instead from hanging the test. */
    guard("blkioq_do_io(min 1 > max 0)");
    r = blkioq_do_io(c->q, NULL, 1, 0, &ts);
    check(r == -EINVAL, "blkioq_do_io(min 1 > max 0) = %s (want -EINVAL)", errname(r));
    struct blkio_completion comp;
    ts.tv_sec = 5;
    guard("blkioq_do_io(min 1) with nothing in flight");
    r = blkioq_do_io(c->q, &comp, 1, 1, &ts);
    guard(NULL);
    check(r == -EINVAL, "blkioq_do_io(min 1) with nothing in flight = %s (libblkio: -EINVAL)",
          errname(r));
    return true;
}

/* ---------------------------------------------------------------------------------- */
/* I/O. */

#define NLBA 8
#define DEPTH 16

/* Byte offsets spread over the disk, io-aligned and distinct. */
static void spread(const struct ctx *c, uint64_t out[NLBA])
{
    uint64_t io = c->io, cap = c->p.capacity;
    uint64_t n = cap / io; /* slots of io bytes on the disk */

    out[0] = 0;
    out[1] = 1 * io;
    out[2] = 7 * io;
    out[3] = (n / 3) * io;
    out[4] = (n / 2) * io;
    out[5] = (n / 2 + 1) * io;
    out[6] = (n - 3) * io;
    out[7] = (n - 1) * io;
}

static void verified_io(struct ctx *c, uint64_t seed)
{
    uint64_t at[NLBA];
    struct req w[NLBA], rd[NLBA];
    uint64_t io = c->io;

    spread(c, at);

    /* 1. Writes to NLBA places, every other one with FUA, all in flight together. */
    for (int i = 0; i < NLBA; i++) {
        fill(slot(c, i), io, seed + at[i]);
        w[i] = (struct req){ .op = OP_WRITE, .start = at[i], .buf = slot(c, i), .len = io,
                             .flags = (i % 2) ? BLKIO_REQ_FUA : 0 };
    }
    if (run(c, w, NLBA, "write") && all_ok(w, NLBA, "write")) {
        check(true, "%d writes of %" PRIu64 " bytes (4 with BLKIO_REQ_FUA), in flight together",
              NLBA, io);
    }

    /* 2. Flush. */
    int r = run1(c, (struct req){ .op = OP_FLUSH }, "flush");
    check(r == 0, "flush = %s", errname(r));

    /* 3. Read back and compare. */
    for (int i = 0; i < NLBA; i++) {
        memset(slot(c, NLBA + i), 0xa5, io);
        rd[i] = (struct req){ .op = OP_READ, .start = at[i], .buf = slot(c, NLBA + i),
                              .len = io };
    }
    if (run(c, rd, NLBA, "read") && all_ok(rd, NLBA, "read")) {
        bool same = true;
        for (int i = 0; i < NLBA; i++) {
            long long d = differs(slot(c, NLBA + i), io, seed + at[i]);
            if (d >= 0) {
                same = check(false, "read of %" PRIu64 " differs from what was written at "
                             "byte %lld", at[i], d);
            }
        }
        if (same) {
            check(true, "%d reads return what was written", NLBA);
        }
    }
}

/* writev/readv with 3 iovecs each, split differently; the first write iovec is in the
 * caller's own mapped memfd memory. */
static void vectored_io(struct ctx *c, char *caller_mem, uint64_t seed)
{
    uint64_t io = c->io;
    uint64_t start = (c->p.capacity / io / 4) * io;
    char *src = slot(c, 32), *dst = slot(c, 40);
    struct iovec wv[3], rv[3];

    /* Source bytes: 4*io of pattern; iovecs io (caller memory), 2*io, io. */
    fill(src, 4 * io, seed + start);
    memcpy(caller_mem, src, io);
    wv[0] = (struct iovec){ caller_mem, io };
    wv[1] = (struct iovec){ slot(c, 50), 2 * io };
    memcpy(slot(c, 50), src + io, 2 * io);
    wv[2] = (struct iovec){ slot(c, 53), io };
    memcpy(slot(c, 53), src + 3 * io, io);
    int r = run1(c, (struct req){ .op = OP_WRITEV, .start = start, .iov = wv, .iovcnt = 3 },
                 "writev");
    check(r == 0, "writev of 3 iovecs (%" PRIu64 ", %" PRIu64 ", %" PRIu64 " bytes) = %s", io,
          2 * io, io, errname(r));

    /* Read it as 2*io, io, io. */
    memset(dst, 0, 4 * io);
    rv[0] = (struct iovec){ slot(c, 60), 2 * io };
    rv[1] = (struct iovec){ slot(c, 63), io };
    rv[2] = (struct iovec){ slot(c, 65), io };
    r = run1(c, (struct req){ .op = OP_READV, .start = start, .iov = rv, .iovcnt = 3 },
             "readv");
    if (check(r == 0, "readv of 3 iovecs = %s", errname(r))) {
        memcpy(dst, slot(c, 60), 2 * io);
        memcpy(dst + 2 * io, slot(c, 63), io);
        memcpy(dst + 3 * io, slot(c, 65), io);
        long long d = differs(dst, 4 * io, seed + start);
        check(d < 0, "readv returns what writev wrote (first difference at %lld)", d);
    }
    /* And a plain read of the whole range. */
    r = run1(c, (struct req){ .op = OP_READ, .start = start, .buf = dst, .len = 4 * io },
             "read");
    if (check(r == 0, "read of the writev range = %s", errname(r))) {
        long long d = differs(dst, 4 * io, seed + start);
        check(d < 0, "a plain read returns what writev wrote (first difference at %lld)", d);
    }
}

static void zeroes_and_discard(struct ctx *c, uint64_t seed)
{
    uint64_t io = c->io;
    uint64_t start = (c->p.capacity / io / 5) * io;
    uint64_t len = 4 * io;
    char *buf = slot(c, 70);
    int r;

    fill(buf, len, seed + start);
    r = run1(c, (struct req){ .op = OP_WRITE, .start = start, .buf = buf, .len = len },
             "write");
    check(r == 0, "write of a range to zero = %s", errname(r));
    r = run1(c, (struct req){ .op = OP_WRITE_ZEROES, .start = start, .len = len },
             "write_zeroes");
    if (r == -ENOTSUP) {
        note("write_zeroes completed with -ENOTSUP: the device has no write zeroes "
             "(max-write-zeroes-len %" PRIu64 ")", c->p.max_write_zeroes_len);
        check(true, "write_zeroes: -ENOTSUP accepted");
    } else if (check(r == 0, "write_zeroes of %" PRIu64 " bytes = %s", len, errname(r))) {
        memset(buf, 0xa5, len);
        r = run1(c, (struct req){ .op = OP_READ, .start = start, .buf = buf, .len = len },
                 "read");
        if (check(r == 0, "read after write_zeroes = %s", errname(r))) {
            long long d = nonzero(buf, len);
            check(d < 0, "write_zeroes leaves zeroes (first non-zero byte at %lld)", d);
        }
    }

    /* Discard: a range on the device's discard granularity, within max-discard-len. */
    uint64_t g = c->p.discard_alignment > 0 ? (uint64_t)c->p.discard_alignment : io;
    if (g < io) {
        g = io;
    }
    /* Three quarters in: no other data of the test is there. */
    uint64_t dstart = (c->p.capacity / 4 * 3 / g) * g + (uint64_t)c->p.discard_alignment_offset;
    uint64_t dlen = g;
    if (dstart + dlen > c->p.capacity) {
        dstart = 0;
    }
    r = run1(c, (struct req){ .op = OP_DISCARD, .start = dstart, .len = dlen }, "discard");
    if (r == -ENOTSUP) {
        note("discard completed with -ENOTSUP: the device has no discard (max-discard-len "
             "%" PRIu64 ")", c->p.max_discard_len);
        check(true, "discard: -ENOTSUP accepted");
    } else {
        check(r == 0, "discard of %" PRIu64 " bytes at %" PRIu64 " = %s", dlen, dstart,
              errname(r));
    }
}

/* DEPTH writes in flight, then DEPTH reads in flight; user_data told apart by collect(). */
static void deep_queue(struct ctx *c, uint64_t seed)
{
    struct req w[DEPTH], rd[DEPTH];
    uint64_t io = c->io;
    uint64_t base = (c->p.capacity / io / 8) * io;

    for (int i = 0; i < DEPTH; i++) {
        uint64_t at = base + (uint64_t)i * 2 * io;
        fill(slot(c, 80 + i), io, seed + at);
        w[i] = (struct req){ .op = OP_WRITE, .start = at, .buf = slot(c, 80 + i), .len = io };
    }
    if (run(c, w, DEPTH, "queue depth 16 writes") && all_ok(w, DEPTH, "queue depth 16 writes")) {
        check(true, "%d writes in flight together, each user_data completed once", DEPTH);
    }
    for (int i = 0; i < DEPTH; i++) {
        memset(slot(c, 100 + i), 0, io);
        rd[i] = (struct req){ .op = OP_READ, .start = w[i].start, .buf = slot(c, 100 + i),
                              .len = io };
    }
    if (run(c, rd, DEPTH, "queue depth 16 reads") && all_ok(rd, DEPTH, "queue depth 16 reads")) {
        bool same = true;
        for (int i = 0; i < DEPTH; i++) {
            long long d = differs(slot(c, 100 + i), io, seed + rd[i].start);
            if (d >= 0) {
                same = check(false, "queue depth read %d differs at byte %lld", i, d);
            }
        }
        if (same) {
            check(true, "%d reads in flight together return what was written", DEPTH);
        }
    }
}

/* fio's libblkio_wait_mode=eventfd: the completion fd switched to blocking mode (libblkio:
 * "The application may switch the file descriptor to blocking mode"); 64 writes kept 16
 * in flight, each wait as fio's getevents(min 1): blkioq_do_io() with min_completions 0,
 * then while nothing came back a blocking read(2) of the fd's 8 bytes and
 * blkioq_do_io() again. */
static void blocking_completion_fd(struct ctx *c, uint64_t seed)
{
    enum { TOTAL = 64 };
    struct req w[TOTAL];
    struct blkio_completion comps[DEPTH];
    uint64_t io = c->io;
    uint64_t base = (c->p.capacity / io / 7) * io;
    const char *what = "blocking completion fd (fio's eventfd mode)";
    int fl = fcntl(c->cfd, F_GETFL);
    int queued = 0, done = 0;
    bool ok = true;

    if (fl < 0 || fcntl(c->cfd, F_SETFL, fl & ~O_NONBLOCK) != 0) {
        check(false, "%s: fcntl: %s", what, strerror(errno));
        return;
    }
    guard(what);
    while (ok && done < TOTAL) {
        while (queued < TOTAL && queued - done < DEPTH) {
            /* Slot by position in the window: a request's buffer is free once it is done. */
            char *buf = slot(c, 120 + queued % DEPTH);
            fill(buf, io, seed + base + (uint64_t)queued * io);
            w[queued] = (struct req){ .op = OP_WRITE, .start = base + (uint64_t)queued * io,
                                      .buf = buf, .len = io };
            queue_req(c, &w[queued]);
            queued++;
        }
        int n = blkioq_do_io(c->q, comps, 0, queued - done, NULL);
        while (n == 0) {
            uint64_t event;
            ssize_t rd = read(c->cfd, &event, sizeof(event));
            if (rd != (ssize_t)sizeof(event)) {
                ok = check(false, "%s: read(completion fd) = %zd: %s", what, rd,
                           rd < 0 ? strerror(errno) : "short read");
                break;
            }
            n = blkioq_do_io(c->q, comps, 0, queued - done, NULL);
        }
        if (ok && n < 0) {
            ok = check(false, "%s: blkioq_do_io(min 0) = %s: %s", what, errname(n), msg());
        }
        for (int i = 0; ok && i < n; i++) {
            ok = take(w, queued, &comps[i], what);
        }
        if (ok) {
            done += n;
        }
    }
    guard(NULL);
    fcntl(c->cfd, F_SETFL, fl);
    if (ok && all_ok(w, TOTAL, what)) {
        check(true, "%s: %d writes, %d in flight, completed", what, TOTAL, DEPTH);
    }
}

/* Buffers in no mapped region: bounced by the library (needs-mem-regions false). */
static void unmapped_buffers(struct ctx *c, uint64_t seed)
{
    uint64_t io = c->io;
    uint64_t at = (c->p.capacity / io / 6) * io;
    void *wb = NULL, *rb = NULL;

    if (posix_memalign(&wb, 4096, io) || posix_memalign(&rb, 4096, io)) {
        check(false, "posix_memalign");
        return;
    }
    fill(wb, io, seed + at);
    int r = run1(c, (struct req){ .op = OP_WRITE, .start = at, .buf = wb, .len = io,
                                  .flags = BLKIO_REQ_FUA }, "unmapped write");
    check(r == 0, "write (FUA) from an unmapped heap buffer = %s", errname(r));
    memset(rb, 0, io);
    r = run1(c, (struct req){ .op = OP_READ, .start = at, .buf = rb, .len = io },
             "unmapped read");
    if (check(r == 0, "read into an unmapped heap buffer = %s", errname(r))) {
        long long d = differs(rb, io, seed + at);
        check(d < 0, "the unmapped read returns the unmapped write (first difference at "
              "%lld)", d);
    }
    free(wb);
    free(rb);
}

/* Requests that must fail, and the calls that must complete with an error. */
static void bad_requests(struct ctx *c)
{
    uint64_t io = c->io;
    int ra = c->p.request_alignment;
    int r;

    if (ra > 1) {
        r = run1(c, (struct req){ .op = OP_READ, .start = (uint64_t)ra / 2, .buf = slot(c, 0),
                                  .len = io }, "misaligned read");
        check(r == -EINVAL, "read at byte %d (request-alignment %d) completes with %s (want "
              "-EINVAL)", ra / 2, ra, errname(r));
        r = run1(c, (struct req){ .op = OP_READ, .start = 0, .buf = slot(c, 0),
                                  .len = (size_t)ra + (size_t)ra / 2 }, "misaligned read");
        check(r == -EINVAL, "read of %d bytes completes with %s (want -EINVAL)", ra + ra / 2,
              errname(r));
        r = run1(c, (struct req){ .op = OP_WRITE, .start = (uint64_t)ra / 2, .buf = slot(c, 0),
                                  .len = io }, "misaligned write");
        check(r == -EINVAL, "write at byte %d completes with %s (want -EINVAL)", ra / 2,
              errname(r));
    }
    r = run1(c, (struct req){ .op = OP_READ, .start = c->p.capacity, .buf = slot(c, 0),
                              .len = io }, "read past the end");
    check(r < 0 && r != 1, "read at the capacity (can-grow false) fails: %s", errname(r));

    r = run1(c, (struct req){ .op = OP_READ, .start = 0, .buf = slot(c, 0), .len = io,
                              .flags = BLKIO_REQ_FUA }, "read with FUA");
    check(r == -EINVAL, "read with BLKIO_REQ_FUA completes with %s (libblkio: -EINVAL)",
          errname(r));
    r = run1(c, (struct req){ .op = OP_WRITE, .start = 0, .buf = slot(c, 0), .len = io,
                              .flags = 1u << 7 }, "unknown flag");
    check(r == -EINVAL, "write with an unknown flag bit completes with %s (libblkio: -EINVAL)",
          errname(r));

    r = run1(c, (struct req){ .op = OP_REPORT_ZONES, .start = 0 }, "report_zones");
    check(r == -ENOTSUP, "blkioq_report_zones completes with %s (want -ENOTSUP)", errname(r));
    r = run1(c, (struct req){ .op = OP_RESET_ZONE, .start = 0 }, "reset_zone");
    check(r == -ENOTSUP, "blkioq_reset_zone completes with %s (want -ENOTSUP)", errname(r));
    r = run1(c, (struct req){ .op = OP_OPEN_ALL_ZONES }, "open_all_zones");
    check(r == -ENOTSUP, "blkioq_open_all_zones completes with %s (want -ENOTSUP)", errname(r));
}

/* ---------------------------------------------------------------------------------- */

static bool create(struct blkio **bp, const struct cfg *cfg)
{
    int r = blkio_create(cfg->driver, bp);
    return check(r == 0 && *bp != NULL, "blkio_create(\"%s\") = %s %s", cfg->driver,
                 errname(r), r ? msg() : "");
}

static bool setup_region(struct ctx *c)
{
    uint64_t a = c->p.mem_region_alignment;
    size_t len = (size_t)(((1u << 20) + a - 1) / a * a);
    struct blkio_mem_region region;
    int r;

    memset(&region, 0xff, sizeof(region));
    r = blkio_alloc_mem_region(c->b, &region, len);
    if (!check(r == 0, "blkio_alloc_mem_region(%zu) = %s %s", len, errname(r), r ? msg() : "")) {
        return false;
    }
    check(region.addr != NULL && (uintptr_t)region.addr % a == 0 && region.len == len &&
          region.iova == 0 && region.flags == 0 && region.fd >= 0,
          "the allocated region: addr %p aligned, len %zu, iova 0, flags 0, fd %d",
          region.addr, region.len, region.fd);
    r = blkio_map_mem_region(c->b, &region);
    if (!check(r == 0, "blkio_map_mem_region(allocated) = %s %s", errname(r), r ? msg() : "")) {
        return false;
    }
    r = blkio_map_mem_region(c->b, &region);
    check(r < 0, "mapping it again fails (libblkio: already mapped): %s", errname(r));
    c->buf = region.addr;
    c->buf_len = region.len;
    /* The I/O below needs 136 slots of io bytes. */
    if (c->buf_len < 136 * c->io) {
        check(false, "region of %zu bytes too small for 136 * %zu", c->buf_len, c->io);
        return false;
    }
    return true;
}

/* libblkio allows blkio_alloc_mem_region from blkio_connect on (its own get-completion-fd
 * test allocates before blkio_start); vireo does too, but for a PCI function, whose DMA
 * memory is made at start. The region must still work after start. */
static bool early_region(struct ctx *c, const struct cfg *cfg, struct blkio_mem_region *region)
{
    bool pci = strstr(cfg->driver, "pci") != NULL;
    size_t len = (size_t)c->p.mem_region_alignment > 65536 ? (size_t)c->p.mem_region_alignment
                                                           : 65536;
    int r = blkio_alloc_mem_region(c->b, region, len);
    if (pci) {
        check(r == -EBUSY, "%s: blkio_alloc_mem_region before start = %s (want -EBUSY): %s",
              cfg->driver, errname(r), msg());
        return false;
    }
    return check(r == 0, "blkio_alloc_mem_region between connect and start = %s %s",
                 errname(r), r ? msg() : "");
}

static void use_early_region(struct ctx *c, struct blkio_mem_region *region, uint64_t seed)
{
    int r = blkio_map_mem_region(c->b, region);
    if (!check(r == 0, "blkio_map_mem_region(allocated before start) = %s %s", errname(r),
               r ? msg() : "")) {
        return;
    }
    uint64_t at = c->p.capacity - 2 * c->io;
    fill(region->addr, c->io, seed ^ 0x5eed);
    r = run1(c, (struct req){ .op = OP_WRITE, .start = at, .buf = region->addr, .len = c->io },
             "write from the early region");
    check(r == 0, "a write from the region allocated before start = %s", errname(r));
    memset(slot(c, 0), 0, c->io);
    r = run1(c, (struct req){ .op = OP_READ, .start = at, .buf = slot(c, 0), .len = c->io },
             "read back");
    check(r == 0 && memcmp(slot(c, 0), region->addr, c->io) == 0,
          "the data written from the region allocated before start reads back = %s",
          errname(r));
    blkio_unmap_mem_region(c->b, region);
    blkio_free_mem_region(c->b, region);
}

/* Memory the caller allocates: a memfd, mapped, its fd closed after the map (libblkio:
 * the library does not keep region->fd). */
static char *caller_region(struct ctx *c, struct blkio_mem_region *region)
{
    size_t len = (size_t)c->p.mem_region_alignment > 65536 ? (size_t)c->p.mem_region_alignment
                                                           : 65536;
    int fd = memfd_create("blkio_test", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)len) != 0) {
        check(false, "memfd_create: %s", strerror(errno));
        return NULL;
    }
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        check(false, "mmap: %s", strerror(errno));
        close(fd);
        return NULL;
    }
    *region = (struct blkio_mem_region){ .addr = p, .len = len, .fd = fd };
    int r = blkio_map_mem_region(c->b, region);
    close(fd);
    if (!check(r == 0, "blkio_map_mem_region(the caller's memfd memory) = %s %s", errname(r),
               r ? msg() : "")) {
        munmap(p, len);
        return NULL;
    }
    return p;
}

/* fio's setup(): create, connect, read the capacity, destroy without starting. */
static void connect_only(const struct cfg *cfg, uint64_t want_capacity)
{
    struct blkio *b = NULL;
    uint64_t cap = 0;

    if (!create(&b, cfg) || !set_path(b, cfg)) {
        blkio_destroy(&b);
        return;
    }
    int r = blkio_connect(b);
    if (check(r == 0, "again: blkio_connect() = %s %s", errname(r), r ? msg() : "")) {
        r = blkio_get_uint64(b, "capacity", &cap);
        check(r == 0 && cap == want_capacity, "again: capacity %" PRIu64, cap);
    }
    blkio_destroy(&b);
    check(b == NULL, "blkio_destroy() without start sets the pointer to NULL");
}

/* Another instance after the first is gone, read-only: the data is there, writes fail. */
static void read_only_instance(const struct cfg *cfg, uint64_t seed)
{
    struct ctx c = { .poll = cfg->poll, .cfd = -1 };
    int r;

    if (!create(&c.b, cfg) || !set_path(c.b, cfg)) {
        blkio_destroy(&c.b);
        return;
    }
    r = blkio_set_bool(c.b, "read-only", true);
    check(r == 0, "read-only: blkio_set_bool(\"read-only\", true) = %s", errname(r));
    r = blkio_connect(c.b);
    if (!check(r == 0, "read-only: blkio_connect() = %s %s", errname(r), r ? msg() : "")) {
        blkio_destroy(&c.b);
        return;
    }
    bool ro = false;
    blkio_get_bool(c.b, "read-only", &ro);
    check(ro, "read-only: \"read-only\" reads true after connect");
    blkio_get_uint64(c.b, "capacity", &c.p.capacity);
    blkio_get_uint64(c.b, "mem-region-alignment", &c.p.mem_region_alignment);
    blkio_get_int(c.b, "request-alignment", &c.p.request_alignment);
    c.io = c.p.request_alignment > 4096 ? (size_t)c.p.request_alignment : 4096;
    if (c.poll) {
        blkio_set_int(c.b, "num-queues", 0);
        blkio_set_int(c.b, "num-poll-queues", 1);
    }
    r = blkio_start(c.b);
    if (!check(r == 0, "read-only: blkio_start() = %s %s", errname(r), r ? msg() : "")) {
        blkio_destroy(&c.b);
        return;
    }
    c.q = c.poll ? blkio_get_poll_queue(c.b, 0) : blkio_get_queue(c.b, 0);
    if (!check(c.q != NULL, "read-only: a queue")) {
        blkio_destroy(&c.b);
        return;
    }
    if (!c.poll) {
        c.cfd = blkioq_get_completion_fd(c.q);
        blkioq_set_completion_fd_enabled(c.q, true);
    }
    struct blkio_mem_region region;
    r = blkio_alloc_mem_region(c.b, &region, (size_t)c.p.mem_region_alignment > 65536
                                                 ? (size_t)c.p.mem_region_alignment
                                                 : 65536);
    if (!check(r == 0, "read-only: blkio_alloc_mem_region() = %s", errname(r))) {
        blkio_destroy(&c.b);
        return;
    }
    r = blkio_map_mem_region(c.b, &region);
    check(r == 0, "read-only: blkio_map_mem_region() = %s", errname(r));
    c.buf = region.addr;
    c.buf_len = region.len;

    uint64_t at[NLBA];
    spread(&c, at);
    r = run1(&c, (struct req){ .op = OP_READ, .start = at[2], .buf = slot(&c, 0), .len = c.io },
             "read-only read");
    if (check(r == 0, "read-only: read = %s", errname(r))) {
        long long d = differs(slot(&c, 0), c.io, seed + at[2]);
        check(d < 0, "read-only: the data the first instance wrote is there (first "
              "difference at %lld)", d);
    }
    r = run1(&c, (struct req){ .op = OP_WRITE, .start = at[2], .buf = slot(&c, 1), .len = c.io },
             "read-only write");
    check(r == -EBADF, "read-only: write completes with %s (want -EBADF)", errname(r));
    r = run1(&c, (struct req){ .op = OP_WRITE_ZEROES, .start = at[2], .len = c.io },
             "read-only write_zeroes");
    check(r == -EBADF, "read-only: write_zeroes completes with %s (want -EBADF)", errname(r));
    r = run1(&c, (struct req){ .op = OP_DISCARD, .start = at[2], .len = c.io },
             "read-only discard");
    check(r == -EBADF, "read-only: discard completes with %s (want -EBADF)", errname(r));
    r = run1(&c, (struct req){ .op = OP_FLUSH }, "read-only flush");
    check(r == 0, "read-only: flush = %s (libblkio: reads and flushes are allowed)",
          errname(r));
    r = run1(&c, (struct req){ .op = OP_READ, .start = at[2], .buf = slot(&c, 0), .len = c.io },
             "read-only read");
    if (check(r == 0, "read-only: read after the refused write = %s", errname(r))) {
        long long d = differs(slot(&c, 0), c.io, seed + at[2]);
        check(d < 0, "read-only: the refused write changed nothing (first difference at "
              "%lld)", d);
    }
    blkio_unmap_mem_region(c.b, &region);
    blkio_free_mem_region(c.b, &region);
    blkio_destroy(&c.b);
    check(c.b == NULL, "read-only: blkio_destroy() sets the pointer to NULL");
}

static void usage(const char *argv0)
{
    fprintf(stderr, "usage: %s DRIVER PATH poll|fd [TARGET LUN]\n", argv0);
    exit(2);
}

int main(int argc, char **argv)
{
    struct cfg cfg = { 0 };
    struct ctx c = { .cfd = -1 };
    struct blkio *nb = NULL;
    int r;

    if (argc != 4 && argc != 6) {
        usage(argv[0]);
    }
    cfg.driver = argv[1];
    cfg.path = argv[2];
    cfg.mode = argv[3];
    if (strcmp(cfg.mode, "poll") == 0) {
        cfg.poll = true;
    } else if (strcmp(cfg.mode, "fd") != 0) {
        usage(argv[0]);
    }
    cfg.scsi = strncmp(cfg.driver, "virtio-scsi-", 12) == 0;
    if (argc == 6) {
        cfg.target = atoi(argv[4]);
        cfg.lun = atoi(argv[5]);
    }
    c.poll = cfg.poll;
    struct sigaction sa = { .sa_handler = on_alarm };
    sigaction(SIGALRM, &sa, NULL);
    /* A seed per run: data from an earlier run never passes for this run's. */
    uint64_t seed = mix((uint64_t)getpid() ^ ((uint64_t)time(NULL) << 20));
    note("blkio_test %s %s %s target %d lun %d", cfg.driver, cfg.path, cfg.mode, cfg.target,
         cfg.lun);

    r = blkio_create("no-such-driver", &nb);
    check(r == -ENOENT, "blkio_create(\"no-such-driver\") = %s (want -ENOENT): %s",
          errname(r), msg());

    if (!create(&c.b, &cfg)) {
        return summary(cfg.driver, cfg.mode);
    }
    created_state(c.b, &cfg);
    if (!set_path(c.b, &cfg)) {
        blkio_destroy(&c.b);
        return summary(cfg.driver, cfg.mode);
    }
    r = blkio_connect(c.b);
    if (!check(r == 0, "blkio_connect() = %s %s", errname(r), r ? msg() : "")) {
        blkio_destroy(&c.b);
        return summary(cfg.driver, cfg.mode);
    }
    connected_state(&c, &cfg);
    c.io = c.p.request_alignment > 4096 ? (size_t)c.p.request_alignment : 4096;
    if (c.p.capacity < 256 * c.io) {
        check(false, "capacity %" PRIu64 " too small for the test (256 * %zu)", c.p.capacity,
              c.io);
        blkio_destroy(&c.b);
        return summary(cfg.driver, cfg.mode);
    }
    struct blkio_mem_region early;
    bool have_early = early_region(&c, &cfg, &early);
    r = blkio_start(c.b);
    if (!check(r == 0, "blkio_start() = %s %s", errname(r), r ? msg() : "")) {
        blkio_destroy(&c.b);
        return summary(cfg.driver, cfg.mode);
    }
    if (!started_state(&c) || !setup_region(&c)) {
        blkio_destroy(&c.b);
        return summary(cfg.driver, cfg.mode);
    }
    if (have_early) {
        use_early_region(&c, &early, seed);
    }
    struct blkio_mem_region caller;
    char *caller_mem = caller_region(&c, &caller);

    verified_io(&c, seed);
    if (caller_mem) {
        vectored_io(&c, caller_mem, seed);
    }
    zeroes_and_discard(&c, seed);
    deep_queue(&c, seed);
    unmapped_buffers(&c, seed);
    if (!c.poll) {
        blocking_completion_fd(&c, seed);
    }
    bad_requests(&c);
    /* After the failures, the queue still works. */
    r = run1(&c, (struct req){ .op = OP_FLUSH }, "flush");
    check(r == 0, "flush after the failed requests = %s", errname(r));

    if (caller_mem) {
        blkio_unmap_mem_region(c.b, &caller);
        munmap(caller_mem, caller.len);
    }
    uint64_t capacity = c.p.capacity;
    blkio_destroy(&c.b);
    check(c.b == NULL, "blkio_destroy() sets the pointer to NULL");

    /* What fio does: its setup() connects and destroys, then each job starts anew. */
    connect_only(&cfg, capacity);
    read_only_instance(&cfg, seed);

    return summary(cfg.driver, cfg.mode);
}
