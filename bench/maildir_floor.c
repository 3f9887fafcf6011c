/*
 * The kernel's floor for Maildir delivery on this machine: what any server
 * pays per message to put it in Maildir/new durably, with the same batching
 * as Tern (create in tmp/, write, one syncfs per batch, rename into new/, one
 * fsync of new/ per batch) and nothing else: no SMTP, no spool, no parsing.
 * Its CPU per file is a lower bound on the delivery part of any server's
 * end-to-end cost (bench/README.md, "How far 10x Postfix end to end is").
 *
 *   cc -O2 -o /tmp/maildir_floor bench/maildir_floor.c
 *   /tmp/maildir_floor DIR FILES BATCH SIZE     # DIR must not exist yet
 *
 * Use a fresh file system (or one without many recently deleted files):
 * ext4 without a journal rescans recently freed inodes on every create.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 4096

static int open_sub(const char *dir, const char *sub) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, sub);
    if (mkdir(p, 0700) != 0) {
        perror(p);
        exit(1);
    }
    int fd = open(p, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        perror(p);
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s DIR FILES BATCH SIZE\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    int files = atoi(argv[2]), batch = atoi(argv[3]), size = atoi(argv[4]);
    if (files <= 0 || batch <= 0 || batch > MAX_BATCH || size <= 0) {
        fprintf(stderr, "FILES, SIZE > 0; 0 < BATCH <= %d\n", MAX_BATCH);
        return 2;
    }
    if (mkdir(dir, 0700) != 0) {
        perror(dir);
        return 1;
    }
    int tmp = open_sub(dir, "tmp"), new = open_sub(dir, "new");
    char *body = malloc(size);
    static char names[MAX_BATCH][96];
    static int fds[MAX_BATCH];
    if (!body)
        return 1;
    memset(body, 'x', size);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < files; i += batch) {
        int m = files - i < batch ? files - i : batch;
        for (int j = 0; j < m; j++) {
            /* Names shaped like Tern's (time.MusecPpidQseq.host,S=size). */
            snprintf(names[j], sizeof names[j], "1763900000.M%06dP%dQ%d.bench.test,S=%d", j,
                     (int)getpid(), i + j, size);
            fds[j] = openat(tmp, names[j], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
            if (fds[j] < 0 || write(fds[j], body, size) != size) {
                perror("create/write");
                return 1;
            }
        }
        if (syncfs(fds[0]) != 0) {
            perror("syncfs");
            return 1;
        }
        for (int j = 0; j < m; j++) {
            close(fds[j]);
            if (renameat(tmp, names[j], new, names[j]) != 0) {
                perror("renameat");
                return 1;
            }
        }
        if (fsync(new) != 0) {
            perror("fsync new/");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double wall = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%d files of %d B, batches of %d: %.0f files/s, CPU user %.1f + sys %.1f us per file\n",
           files, size, batch, files / wall,
           (ru.ru_utime.tv_sec * 1e6 + ru.ru_utime.tv_usec) / files,
           (ru.ru_stime.tv_sec * 1e6 + ru.ru_stime.tv_usec) / files);
    return 0;
}
