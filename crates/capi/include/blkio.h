/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause */
/*
 * blkio.h: vireo's implementation of libblkio 1.5's C API.
 *
 * Programs written for libblkio (fio's libblkio engine, QEMU's blkio block driver,
 * nbdkit's blkio plugin) build against this header and run with vireo's
 * libblkio.so.1 unchanged. Layouts, flags and semantics are libblkio's; the text is
 * vireo's own. docs/capi.md describes the drivers and properties.
 *
 * Conventions: functions return 0 (or a count) on success and a negative errno on
 * failure; after a failure blkio_get_error_msg() gives this thread's message.
 * States: blkio_create() -> created; blkio_connect() -> connected; blkio_start() ->
 * started. A property or call used in the wrong state fails with -EBUSY, an unknown
 * property with -ENOENT, a property of another type with -ENOTTY.
 */
#ifndef BLKIO_H
#define BLKIO_H

#ifdef __cplusplus
extern "C" {
#endif

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <time.h>

struct blkio;
struct blkioq;

/* Memory that holds I/O buffers. Fields are used as given; iova and flags must be 0. */
struct blkio_mem_region {
    void *addr;          /* start address, a multiple of "mem-region-alignment" */
    size_t len;          /* bytes, a multiple of "mem-region-alignment" */
    uint64_t iova;       /* reserved: 0 */
    int64_t fd_offset;   /* offset of addr's memory in fd */
    int fd;              /* the file backing the memory, or -1 */
    uint32_t flags;      /* reserved: 0 */
};

/* One finished request. */
struct blkio_completion {
    void *user_data;       /* as passed when the request was queued */
    const char *error_msg; /* NULL on success; may be NULL on failure */
    int ret;               /* 0 or a negative errno */
    uint8_t reserved_[12];
};

/* The calling thread's message for the last failed call. */
const char *blkio_get_error_msg(void);

/* Life of an instance. */
int blkio_create(const char *driver, struct blkio **bp);
int blkio_connect(struct blkio *b);
int blkio_start(struct blkio *b);
void blkio_destroy(struct blkio **bp);

/* Properties. blkio_get_str's *value is the caller's to free(3). */
int blkio_get_bool(struct blkio *b, const char *name, bool *value);
int blkio_get_int(struct blkio *b, const char *name, int *value);
int blkio_get_uint64(struct blkio *b, const char *name, uint64_t *value);
int blkio_get_str(struct blkio *b, const char *name, char **value);

int blkio_set_bool(struct blkio *b, const char *name, bool value);
int blkio_set_int(struct blkio *b, const char *name, int value);
int blkio_set_uint64(struct blkio *b, const char *name, uint64_t value);
int blkio_set_str(struct blkio *b, const char *name, const char *value);

/* Memory regions. */
int blkio_alloc_mem_region(struct blkio *b, struct blkio_mem_region *region, size_t len);
void blkio_free_mem_region(struct blkio *b, const struct blkio_mem_region *region);
int blkio_map_mem_region(struct blkio *b, const struct blkio_mem_region *region);
void blkio_unmap_mem_region(struct blkio *b, const struct blkio_mem_region *region);

/* Queues: NULL when there is no such queue. */
struct blkioq *blkio_get_queue(struct blkio *b, int index);
struct blkioq *blkio_get_poll_queue(struct blkio *b, int index);

int blkio_add_queue(struct blkio *b);
int blkio_add_poll_queue(struct blkio *b);

int blkio_remove_queue(struct blkio *b, int index);
int blkio_remove_poll_queue(struct blkio *b, int index);

/* Request flags. */
enum {
    BLKIO_REQ_FUA = 1 << 0,         /* the data is durable when the request completes */
    BLKIO_REQ_NO_UNMAP = 1 << 1,    /* write zeroes without deallocating */
    BLKIO_REQ_NO_FALLBACK = 1 << 2, /* write zeroes, or fail with -ENOTSUP */
};

/* Requests: queued now, seen by the device by the next blkioq_do_io() at the latest.
 * start and lengths are in bytes. */
void blkioq_read(struct blkioq *q, uint64_t start, void *buf, size_t len,
                 void *user_data, uint32_t flags);
void blkioq_write(struct blkioq *q, uint64_t start, const void *buf, size_t len,
                  void *user_data, uint32_t flags);
void blkioq_readv(struct blkioq *q, uint64_t start, const struct iovec *iovec,
                  int iovcnt, void *user_data, uint32_t flags);
void blkioq_writev(struct blkioq *q, uint64_t start, struct iovec *iovec,
                   int iovcnt, void *user_data, uint32_t flags);
void blkioq_write_zeroes(struct blkioq *q, uint64_t start, uint64_t len,
                         void *user_data, uint32_t flags);
void blkioq_discard(struct blkioq *q, uint64_t start, uint64_t len,
                    void *user_data, uint32_t flags);
void blkioq_flush(struct blkioq *q, void *user_data, uint32_t flags);

/* Zoned storage: no vireo driver has zoned devices; these requests complete with
 * -ENOTSUP. */
enum {
    BLKIO_ZONE_TYPE_CONVENTIONAL = 0x1,
    BLKIO_ZONE_TYPE_SEQWRITE_REQ = 0x2,
    BLKIO_ZONE_TYPE_SEQWRITE_PREF = 0x3,
};

enum {
    BLKIO_ZONE_STATE_EMPTY = 0x1,
    BLKIO_ZONE_STATE_IMP_OPEN = 0x2,
    BLKIO_ZONE_STATE_EXP_OPEN = 0x3,
    BLKIO_ZONE_STATE_CLOSED = 0x4,
    BLKIO_ZONE_STATE_READONLY = 0xD,
    BLKIO_ZONE_STATE_FULL = 0xE,
    BLKIO_ZONE_STATE_OFFLINE = 0xF,
};

struct blkio_zone {
    uint64_t start;
    uint64_t len;
    uint64_t capacity;
    uint64_t write_pointer;
    uint8_t zone_type;
    uint8_t zone_state;
    uint8_t reset;
    uint8_t reserved_[29];
};

void blkioq_report_zones(struct blkioq *q, uint64_t offset, struct blkio_zone *zones,
                         uint32_t nr_zones, void *user_data, uint32_t flags);
void blkioq_close_zone(struct blkioq *q, uint64_t offset, void *user_data, uint32_t flags);
void blkioq_finish_zone(struct blkioq *q, uint64_t offset, void *user_data, uint32_t flags);
void blkioq_open_zone(struct blkioq *q, uint64_t offset, void *user_data, uint32_t flags);
void blkioq_reset_zone(struct blkioq *q, uint64_t offset, void *user_data, uint32_t flags);
void blkioq_close_all_zones(struct blkioq *q, void *user_data, uint32_t flags);
void blkioq_finish_all_zones(struct blkioq *q, void *user_data, uint32_t flags);
void blkioq_open_all_zones(struct blkioq *q, void *user_data, uint32_t flags);
void blkioq_reset_all_zones(struct blkioq *q, void *user_data, uint32_t flags);

/* Submit queued requests and reap at least min_completions (at most max_completions)
 * into completions. timeout (may be NULL) bounds the wait and is updated with the
 * time left; -ETIME when it passes first. */
int blkioq_do_io(struct blkioq *q, struct blkio_completion *completions,
                 int min_completions, int max_completions, struct timespec *timeout);
/* The same, with sig as the signal mask while waiting: -EINTR on a signal. Not on
 * poll queues (-ENOTSUP). */
int blkioq_do_io_interruptible(struct blkioq *q, struct blkio_completion *completions,
                               int min_completions, int max_completions,
                               struct timespec *timeout, const sigset_t *sig);
/* A non-blocking eventfd that becomes readable when blkioq_do_io() has work; -1 on
 * poll queues. */
int blkioq_get_completion_fd(struct blkioq *q);
void blkioq_set_completion_fd_enabled(struct blkioq *q, bool enable);

#ifdef __cplusplus
}
#endif

#endif /* BLKIO_H */
