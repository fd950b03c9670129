/* fh-memwork MIB: writes MIB MiB of patterned memory page by page, then
 * frees it. Leaves the guest with free memory that holds old data, the case
 * where free-page hints pay off. Prints "freehint-memwork done MIB". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: fh-memwork MIB\n");
        return 2;
    }
    size_t mib = strtoul(argv[1], NULL, 10);
    size_t len = mib << 20;
    uint8_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("fh-memwork: mmap");
        return 1;
    }
    for (size_t off = 0; off < len; off += 4096) {
        uint64_t *w = (uint64_t *)(p + off);
        for (int i = 0; i < 512; i++)
            w[i] = (off >> 12) * 0x9E3779B97F4A7C15ull + i + 1;
    }
    munmap(p, len);
    printf("freehint-memwork done %zu\n", mib);
    fflush(stdout);
    return 0;
}
