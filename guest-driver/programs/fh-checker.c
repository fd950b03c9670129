/* fh-checker MIB: fills MIB MiB with a known pattern, then verifies all of
 * it every 500 ms and prints "freehint-check ok N" (or "freehint-check
 * FAIL page P" and exits 1). After a migration, "ok" lines that go on mean
 * the region arrived intact and the process still runs. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static uint64_t word(size_t page, int i) { return (page + 1) * 0xC2B2AE3D27D4EB4Full ^ (uint64_t)i; }

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: fh-checker MIB\n");
        return 2;
    }
    size_t pages = (strtoul(argv[1], NULL, 10) << 20) / 4096;
    uint64_t *p = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("fh-checker: mmap");
        return 1;
    }
    for (size_t pg = 0; pg < pages; pg++)
        for (int i = 0; i < 512; i++)
            p[pg * 512 + i] = word(pg, i);
    struct timespec ts = {0, 500 * 1000 * 1000};
    for (unsigned long n = 0;; n++) {
        for (size_t pg = 0; pg < pages; pg++)
            for (int i = 0; i < 512; i++)
                if (p[pg * 512 + i] != word(pg, i)) {
                    printf("freehint-check FAIL page %zu\n", pg);
                    fflush(stdout);
                    return 1;
                }
        printf("freehint-check ok %lu\n", n);
        fflush(stdout);
        nanosleep(&ts, NULL);
    }
}
