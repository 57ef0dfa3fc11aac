/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause */
/*
 * abi.c: blkio.h's layouts and constants are libblkio 1.5's (x86-64 / LP64), so
 * programs built against libblkio's header run with vireo's libblkio.so.1 and the
 * other way round. Compiling this file is the test:
 *
 *   cc -std=c11 -Wall -Wextra -Werror -I crates/capi/include -c abi.c -o /dev/null
 *
 * The numbers are those of libblkio's include/blkio.h.
 *
 * blkio.h uses POSIX types (sigset_t, struct iovec): under -std=c11 a program asks
 * for them with _POSIX_C_SOURCE, as with libblkio's header (-std=gnu11 needs nothing).
 */
#define _POSIX_C_SOURCE 200809L

#include <blkio.h>

#include <stddef.h>

#define SIZE(type, n) _Static_assert(sizeof(type) == (n), "expected sizeof(" #type ") == " #n)
#define AT(type, field, n) \
    _Static_assert(offsetof(type, field) == (n), "expected offsetof(" #type ", " #field ") == " #n)

_Static_assert(sizeof(void *) == 8 && sizeof(size_t) == 8 && sizeof(int) == 4,
               "these layouts are for LP64 targets");

/* struct blkio_mem_region: addr, len, iova, fd_offset, fd, flags */
SIZE(struct blkio_mem_region, 40);
AT(struct blkio_mem_region, addr, 0);
AT(struct blkio_mem_region, len, 8);
AT(struct blkio_mem_region, iova, 16);
AT(struct blkio_mem_region, fd_offset, 24);
AT(struct blkio_mem_region, fd, 32);
AT(struct blkio_mem_region, flags, 36);

/* struct blkio_completion: user_data, error_msg, ret, 12 reserved bytes */
SIZE(struct blkio_completion, 32);
AT(struct blkio_completion, user_data, 0);
AT(struct blkio_completion, error_msg, 8);
AT(struct blkio_completion, ret, 16);
AT(struct blkio_completion, reserved_, 20);

/* struct blkio_zone: four u64, three u8, 29 reserved bytes */
SIZE(struct blkio_zone, 64);
AT(struct blkio_zone, start, 0);
AT(struct blkio_zone, len, 8);
AT(struct blkio_zone, capacity, 16);
AT(struct blkio_zone, write_pointer, 24);
AT(struct blkio_zone, zone_type, 32);
AT(struct blkio_zone, zone_state, 33);
AT(struct blkio_zone, reset, 34);
AT(struct blkio_zone, reserved_, 35);

/* Request flags. */
_Static_assert(BLKIO_REQ_FUA == 1, "BLKIO_REQ_FUA");
_Static_assert(BLKIO_REQ_NO_UNMAP == 2, "BLKIO_REQ_NO_UNMAP");
_Static_assert(BLKIO_REQ_NO_FALLBACK == 4, "BLKIO_REQ_NO_FALLBACK");

/* Zone types and states. */
_Static_assert(BLKIO_ZONE_TYPE_CONVENTIONAL == 0x1, "BLKIO_ZONE_TYPE_CONVENTIONAL");
_Static_assert(BLKIO_ZONE_TYPE_SEQWRITE_REQ == 0x2, "BLKIO_ZONE_TYPE_SEQWRITE_REQ");
_Static_assert(BLKIO_ZONE_TYPE_SEQWRITE_PREF == 0x3, "BLKIO_ZONE_TYPE_SEQWRITE_PREF");
_Static_assert(BLKIO_ZONE_STATE_EMPTY == 0x1, "BLKIO_ZONE_STATE_EMPTY");
_Static_assert(BLKIO_ZONE_STATE_IMP_OPEN == 0x2, "BLKIO_ZONE_STATE_IMP_OPEN");
_Static_assert(BLKIO_ZONE_STATE_EXP_OPEN == 0x3, "BLKIO_ZONE_STATE_EXP_OPEN");
_Static_assert(BLKIO_ZONE_STATE_CLOSED == 0x4, "BLKIO_ZONE_STATE_CLOSED");
_Static_assert(BLKIO_ZONE_STATE_READONLY == 0xD, "BLKIO_ZONE_STATE_READONLY");
_Static_assert(BLKIO_ZONE_STATE_FULL == 0xE, "BLKIO_ZONE_STATE_FULL");
_Static_assert(BLKIO_ZONE_STATE_OFFLINE == 0xF, "BLKIO_ZONE_STATE_OFFLINE");

/* The function types programs take the address of (fio's engine, QEMU's driver). */
static int (*const do_io)(struct blkioq *, struct blkio_completion *, int, int,
                          struct timespec *) = blkioq_do_io;
static void (*const write_fn)(struct blkioq *, uint64_t, const void *, size_t, void *,
                              uint32_t) = blkioq_write;
static void (*const readv_fn)(struct blkioq *, uint64_t, const struct iovec *, int, void *,
                              uint32_t) = blkioq_readv;

/* A translation unit must declare something; this also keeps the pointers used. */
int blkio_abi_checked(void);
int blkio_abi_checked(void)
{
    return do_io != NULL && write_fn != NULL && readv_fn != NULL;
}
