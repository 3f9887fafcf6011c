/*
 * LD_PRELOAD shim for bench/run.sh (BENCH_SLOW_FLUSH_US): after every
 * fsync, fdatasync or syncfs, the calling process also holds one
 * machine-wide lock for SLOW_FLUSH_US microseconds. That models a disk
 * whose cache flush takes that long and that flushes one request at a time
 * (a busy or slow disk, like the one the first figures came from:
 * Postfix at ~69 msg/s there, ~800 here), for every server alike, so their
 * ratio can be compared on such a disk without owning one.
 *
 * Only the timing is simulated: the real call still runs first, so
 * durability is unchanged. Lock file: SLOW_FLUSH_LOCK (created 0666 by
 * run.sh, since Postfix's delivery agents run as nobody).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

static void hold_the_disk(void) {
    const char *us_text = getenv("SLOW_FLUSH_US");
    const char *lock = getenv("SLOW_FLUSH_LOCK");
    long us = us_text ? atol(us_text) : 0;
    if (us <= 0 || !lock)
        return;
    int fd = open(lock, O_RDWR | O_CLOEXEC);
    if (fd >= 0)
        flock(fd, LOCK_EX);
    struct timespec left = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&left, &left) != 0) {
    }
    if (fd >= 0)
        close(fd); /* releases the lock */
}

#define SLOW(name)                                                         \
    int name(int fd) {                                                     \
        static int (*real)(int);                                           \
        if (!real)                                                         \
            real = (int (*)(int))dlsym(RTLD_NEXT, #name);                  \
        int rc = real(fd);                                                 \
        hold_the_disk();                                                   \
        return rc;                                                         \
    }

SLOW(fsync)
SLOW(fdatasync)
SLOW(syncfs)
