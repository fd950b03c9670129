/* fh-fragment MIB: touches MIB MiB of memory page by page (4 KiB writes),
 * then unmaps every other 64 KiB of it. Leaves the guest with about MIB/2
 * MiB held and MIB/2 MiB free in pieces far smaller than the 4 MiB blocks
 * free page hinting reports: the benchmark's `fragmented` profile. The
 * held half stays with a child process that sleeps forever. Prints
 * "freehint-fragment done MIB". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define CHUNK (64u << 10)

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: fh-fragment MIB\n");
        return 2;
    }
    size_t len = strtoul(argv[1], NULL, 10) << 20;
    uint8_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("fh-fragment: mmap");
        return 1;
    }
    /* No transparent huge pages: the point is 4 KiB pages scattered over
     * the guest's memory. */
    madvise(p, len, MADV_NOHUGEPAGE);
    for (size_t off = 0; off < len; off += 4096) {
        uint64_t *w = (uint64_t *)(p + off);
        for (int i = 0; i < 512; i++)
            w[i] = (off >> 12) * 0x9E3779B97F4A7C15ull + i + 1;
    }
    for (size_t off = CHUNK; off + CHUNK <= len; off += 2 * CHUNK)
        if (munmap(p + off, CHUNK) != 0) {
            perror("fh-fragment: munmap");
            return 1;
        }
    if (fork() == 0)
        for (;;)
            pause();
    printf("freehint-fragment done %zu\n", len >> 20);
    fflush(stdout);
    return 0;
}
