/* fh-heartbeat: prints "freehint-heartbeat N free KIB pgalloc P" on stdout
 * every 200 ms, KIB being the guest's MemFree and P the pages its kernel
 * has allocated since boot (the pgalloc_* counters of /proc/vmstat). Run in
 * the guest; the host reads the serial console to see the guest is alive,
 * that N goes on after a migration, how much memory the guest holds just
 * before it, and how many pages the guest allocated during it (the stock
 * balloon driver allocates every block it hints, and with init_on_alloc
 * the kernel zeroes each such page). */
#include <stdio.h>
#include <string.h>
#include <time.h>

static long mem_free_kib(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    char line[128];
    long kib = -1;
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemFree: %ld kB", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

static unsigned long long pages_allocated(void) {
    FILE *f = fopen("/proc/vmstat", "r");
    char name[64];
    unsigned long long v, sum = 0;
    if (!f)
        return 0;
    while (fscanf(f, "%63s %llu", name, &v) == 2)
        if (strncmp(name, "pgalloc_", 8) == 0)
            sum += v;
    fclose(f);
    return sum;
}

int main(void) {
    struct timespec ts = {0, 200 * 1000 * 1000};
    for (unsigned long n = 0;; n++) {
        printf("freehint-heartbeat %lu free %ld pgalloc %llu\n", n, mem_free_kib(),
               pages_allocated());
        fflush(stdout);
        nanosleep(&ts, NULL);
    }
}
