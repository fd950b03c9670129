/* fh-hotset MIB MIB_PER_S: keeps a hot set of MIB MiB and rewrites it at
 * MIB_PER_S MiB/s (a slice every 100 ms, round and round), forever: the
 * benchmark's `busy-idle` profile, a mostly idle guest whose small working
 * set keeps changing during the migration. Prints "freehint-hotset ready"
 * once the set is written. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: fh-hotset MIB MIB_PER_S\n");
        return 2;
    }
    size_t len = strtoul(argv[1], NULL, 10) << 20;
    size_t slice = (strtoul(argv[2], NULL, 10) << 20) / 10;
    if (len == 0) {
        fprintf(stderr, "fh-hotset: the set must not be empty\n");
        return 2;
    }
    uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("fh-hotset: mmap");
        return 1;
    }
    size_t words = len / 8, at = 0;
    for (size_t i = 0; i < words; i++)
        p[i] = i;
    printf("freehint-hotset ready %zu\n", len >> 20);
    fflush(stdout);
    struct timespec tick = {0, 100 * 1000 * 1000};
    for (uint64_t gen = 1;; gen++) {
        for (size_t n = 0; n < slice / 8; n++) {
            p[at] = gen ^ at;
            at = (at + 1) % words;
        }
        nanosleep(&tick, NULL);
    }
}
