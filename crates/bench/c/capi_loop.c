/* capi_loop: the least a C program can do per I/O through the libblkio API, to measure
 * the C API's own cost against `vireo perf` (crates/bench/benches/capi_fio.rs).
 *
 * usage: capi_loop DRIVER PATH QUEUE_DEPTH SECONDS
 * 4 KiB random reads over the whole device on one poll queue, QUEUE_DEPTH in flight,
 * each completion resubmitted at once with its buffer; prints "iops N ios N seconds S".
 * Exit status 1 on any error (with libblkio's message).
 */
#include <blkio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define BS 4096u

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t next_rand(void)
{
    /* xorshift64*: cheap, so the loop measures the library, not the generator */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545f4914f6cdd1dull;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int fail(const char *what, int r)
{
    fprintf(stderr, "capi_loop: %s: %d: %s\n", what, r, blkio_get_error_msg());
    return 1;
}

int main(int argc, char **argv)
{
    struct blkio *b;
    struct blkio_mem_region region;
    struct blkio_completion comps[1024];
    uint64_t capacity, blocks, ios = 0;
    int qd, r, i;
    double seconds, t0, t1;

    if (argc != 5) {
        fprintf(stderr, "usage: capi_loop DRIVER PATH QUEUE_DEPTH SECONDS\n");
        return 2;
    }
    qd = atoi(argv[3]);
    seconds = atof(argv[4]);
    if (qd < 1 || qd > 1024 || seconds <= 0) {
        fprintf(stderr, "capi_loop: QUEUE_DEPTH 1..1024, SECONDS > 0\n");
        return 2;
    }
    if ((r = blkio_create(argv[1], &b)))
        return fail("blkio_create", r);
    if ((r = blkio_set_str(b, "path", argv[2])) || (r = blkio_connect(b)))
        return fail("connect", r);
    if ((r = blkio_set_int(b, "num-queues", 0)) || (r = blkio_set_int(b, "num-poll-queues", 1)))
        return fail("queues", r);
    if ((r = blkio_start(b)))
        return fail("blkio_start", r);
    if ((r = blkio_get_uint64(b, "capacity", &capacity)))
        return fail("capacity", r);
    blocks = capacity / BS;
    if (blocks == 0) {
        fprintf(stderr, "capi_loop: device smaller than one 4 KiB block\n");
        return 1;
    }
    if ((r = blkio_alloc_mem_region(b, &region, (size_t)qd * BS)) ||
        (r = blkio_map_mem_region(b, &region)))
        return fail("memory region", r);
    struct blkioq *q = blkio_get_poll_queue(b, 0);
    if (!q)
        return fail("blkio_get_poll_queue", -1);
    char *base = region.addr;
    for (i = 0; i < qd; i++)
        blkioq_read(q, (next_rand() % blocks) * BS, base + (size_t)i * BS, BS,
                    (void *)(uintptr_t)i, 0);
    t0 = now();
    t1 = t0;
    for (;;) {
        int n = blkioq_do_io(q, comps, 1, qd, NULL);
        if (n < 0)
            return fail("blkioq_do_io", n);
        for (i = 0; i < n; i++) {
            uintptr_t slot = (uintptr_t)comps[i].user_data;
            if (comps[i].ret != 0)
                return fail("read", comps[i].ret);
            blkioq_read(q, (next_rand() % blocks) * BS, base + slot * BS, BS, (void *)slot, 0);
        }
        ios += (uint64_t)n;
        if ((ios & 4095) < (uint64_t)n) {
            t1 = now();
            if (t1 - t0 >= seconds)
                break;
        }
    }
    /* what is still in flight completes before the instance goes */
    for (i = 0; i < qd;) {
        int n = blkioq_do_io(q, comps, 1, qd, NULL);
        if (n < 0)
            return fail("blkioq_do_io", n);
        i += n;
    }
    printf("iops %.0f ios %llu seconds %.3f\n", (double)ios / (t1 - t0), (unsigned long long)ios,
           t1 - t0);
    blkio_destroy(&b);
    return 0;
}
