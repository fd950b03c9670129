/* fh-memwork MIB [KEEP_MIB]: writes MIB MiB of patterned memory page by
 * page, then frees all of it but the first KEEP_MIB MiB. Leaves the guest
 * with free memory that holds old data, the case where free-page hints pay
 * off. The kept part (an application's resident data) stays with a child
 * process that sleeps forever. Prints "freehint-memwork done MIB kept KEEP". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: fh-memwork MIB [KEEP_MIB]\n");
        return 2;
    }
    size_t mib = strtoul(argv[1], NULL, 10);
    size_t keep = argc == 3 ? strtoul(argv[2], NULL, 10) : 0;
    if (keep > mib)
        keep = mib;
    size_t len = mib << 20, keep_len = keep << 20;
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
    munmap(p + keep_len, len - keep_len);
    if (keep_len > 0 && fork() == 0)
        for (;;)
            pause();
    printf("freehint-memwork done %zu kept %zu\n", mib, keep);
    fflush(stdout);
    return 0;
}
