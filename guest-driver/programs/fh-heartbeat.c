/* fh-heartbeat: prints "freehint-heartbeat N free KIB" on stdout every
 * 200 ms, KIB being the guest's MemFree. Run in the guest; the host reads
 * the serial console to see the guest is alive, that N goes on after a
 * migration, and how much memory the guest holds just before it. */
#include <stdio.h>
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

int main(void) {
    struct timespec ts = {0, 200 * 1000 * 1000};
    for (unsigned long n = 0;; n++) {
        printf("freehint-heartbeat %lu free %ld\n", n, mem_free_kib());
        fflush(stdout);
        nanosleep(&ts, NULL);
    }
}
