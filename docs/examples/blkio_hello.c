/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause */
/*
 * blkio_hello: the libblkio API through vireo's libblkio.so.1, as any libblkio program
 * uses it. Connects DRIVER to PATH, writes a block of text at byte 0, flushes, reads it
 * back and compares.
 *
 *   cc -Wall -Wextra -Werror -o blkio_hello blkio_hello.c $(pkg-config --cflags --libs blkio)
 *   ./blkio_hello virtio-blk-vhost-user /tmp/vhost.0
 */
#include <blkio.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, int ret)
{
    fprintf(stderr, "%s: %s: %s\n", what, strerror(-ret), blkio_get_error_msg());
    return 1;
}

/* Wait for the one request in flight; its completion's ret. */
static int wait_one(struct blkioq *q)
{
    struct blkio_completion c;
    int n = blkioq_do_io(q, &c, 1, 1, NULL);
    return n == 1 ? c.ret : (n < 0 ? n : -EIO);
}

int main(int argc, char **argv)
{
    struct blkio *b;
    struct blkio_mem_region region;
    struct blkioq *q;
    uint64_t capacity;
    int block, ret;

    if (argc != 3) {
        fprintf(stderr, "usage: %s DRIVER PATH\n", argv[0]);
        return 2;
    }
    if ((ret = blkio_create(argv[1], &b)) < 0)
        return fail("blkio_create", ret);
    if ((ret = blkio_set_str(b, "path", argv[2])) < 0 || (ret = blkio_connect(b)) < 0 ||
        (ret = blkio_get_uint64(b, "capacity", &capacity)) < 0 ||
        (ret = blkio_get_int(b, "request-alignment", &block)) < 0 ||
        (ret = blkio_start(b)) < 0)
        return fail("connect", ret);
    if ((ret = blkio_alloc_mem_region(b, &region, 2 * 4096)) < 0 ||
        (ret = blkio_map_mem_region(b, &region)) < 0)
        return fail("memory", ret);
    q = blkio_get_queue(b, 0);

    char *out = region.addr, *in = (char *)region.addr + 4096;
    memset(out, 0, block);
    snprintf(out, block, "hello from %s through vireo", argv[1]);
    if ((ret = (blkioq_write(q, 0, out, block, NULL, 0), wait_one(q))) < 0 ||
        (ret = (blkioq_flush(q, NULL, 0), wait_one(q))) < 0 ||
        (ret = (blkioq_read(q, 0, in, block, NULL, 0), wait_one(q))) < 0)
        return fail("I/O", ret);
    if (memcmp(in, out, block) != 0) {
        fprintf(stderr, "read back something else\n");
        return 1;
    }
    printf("%s: %llu bytes, %d-byte blocks; read back: \"%s\"\n", argv[2],
           (unsigned long long)capacity, block, in);
    blkio_destroy(&b);
    return 0;
}
