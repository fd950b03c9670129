/* fh-diskcheck [DIR]: verifies the files of a disk, over and over.
 *
 * DIR (default /mnt/disk) holds MANIFEST, one line per file:
 *   NAME SIZE CHECKSUM
 * NAME relative to DIR (no spaces), SIZE in bytes (decimal), CHECKSUM the
 * 64-bit FNV-1a of the file's bytes as 16 hex digits (offset basis
 * 0xcbf29ce484222325, prime 0x100000001b3, one byte at a time: h ^= b;
 * h *= prime). tests/demo/src/disk.rs writes the disk and computes the same.
 *
 * Each pass first drops the page cache (3 > /proc/sys/vm/drop_caches) so
 * the files really come from the virtual disk, then reads and checks every
 * file. A pass that found every file intact prints
 *   freehint-disk ok N (F files, B bytes, T ms)
 * (N counts passes from 0); a file that differs prints
 *   freehint-disk FAIL NAME ...what differs...
 * and that pass prints no "ok"; the passes go on. Prints
 * "freehint-disk start F files B bytes" once the MANIFEST is read. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define FNV_BASIS 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull
#define BUF (1u << 20)
#define MAX_FILES 4096

struct entry {
    char name[256];
    uint64_t size, sum;
};

static struct entry files[MAX_FILES];
static uint8_t buf[BUF] __attribute__((aligned(64)));

/* FNV-1a 64 over n bytes, continuing from h. Loads 8 bytes at a time and
 * feeds them in memory order (little-endian x86): the same hash, fewer
 * loads under TCG. */
static uint64_t fnv1a(uint64_t h, const uint8_t *p, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        for (int k = 0; k < 8; k++) {
            h ^= w & 0xff;
            h *= FNV_PRIME;
            w >>= 8;
        }
    }
    for (; i < n; i++) {
        h ^= p[i];
        h *= FNV_PRIME;
    }
    return h;
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void drop_caches(void) {
    int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (fd < 0 || write(fd, "3", 1) != 1) {
        printf("freehint-disk FAIL drop_caches: %s\n", strerror(errno));
        fflush(stdout);
    }
    if (fd >= 0)
        close(fd);
}

/* Reads and checks one file; prints a FAIL line and returns 0 if it
 * differs from its MANIFEST line. */
static int check(const struct entry *e) {
    int fd = open(e->name, O_RDONLY);
    if (fd < 0) {
        printf("freehint-disk FAIL %s open: %s\n", e->name, strerror(errno));
        return 0;
    }
    uint64_t h = FNV_BASIS, size = 0;
    for (;;) {
        ssize_t n = read(fd, buf, BUF);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            printf("freehint-disk FAIL %s read at %" PRIu64 ": %s\n", e->name, size, strerror(errno));
            close(fd);
            return 0;
        }
        if (n == 0)
            break;
        h = fnv1a(h, buf, (size_t)n);
        size += (uint64_t)n;
    }
    close(fd);
    if (size != e->size || h != e->sum) {
        printf("freehint-disk FAIL %s size %" PRIu64 " checksum %016" PRIx64 " expected size %" PRIu64
               " checksum %016" PRIx64 "\n",
               e->name, size, h, e->size, e->sum);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc > 2) {
        fprintf(stderr, "usage: fh-diskcheck [DIR]\n");
        return 2;
    }
    const char *dir = argc == 2 ? argv[1] : "/mnt/disk";
    if (chdir(dir) != 0) {
        printf("freehint-disk FAIL %s: %s\n", dir, strerror(errno));
        return 1;
    }
    FILE *m = fopen("MANIFEST", "r");
    if (!m) {
        printf("freehint-disk FAIL MANIFEST open: %s\n", strerror(errno));
        return 1;
    }
    size_t count = 0;
    uint64_t total = 0;
    char line[512];
    while (fgets(line, sizeof line, m)) {
        if (line[0] == '\n' || line[0] == '#')
            continue;
        struct entry *e = &files[count];
        if (count == MAX_FILES ||
            sscanf(line, "%255s %" SCNu64 " %" SCNx64, e->name, &e->size, &e->sum) != 3) {
            printf("freehint-disk FAIL MANIFEST line %zu unreadable or too many files\n", count + 1);
            return 1;
        }
        total += e->size;
        count++;
    }
    fclose(m);
    if (count == 0) {
        printf("freehint-disk FAIL MANIFEST lists no files\n");
        return 1;
    }
    printf("freehint-disk start %zu files %" PRIu64 " bytes\n", count, total);
    fflush(stdout);
    for (unsigned long pass = 0;; pass++) {
        uint64_t t = now_ms();
        drop_caches();
        int ok = 1;
        for (size_t i = 0; i < count; i++)
            ok &= check(&files[i]);
        if (ok)
            printf("freehint-disk ok %lu (%zu files, %" PRIu64 " bytes, %" PRIu64 " ms)\n", pass, count,
                   total, now_ms() - t);
        fflush(stdout);
    }
}
