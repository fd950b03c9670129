/* fh-heartbeat: prints "freehint-heartbeat N" on stdout every 200 ms.
 * Run in the guest; the host reads the serial console to see the guest
 * is alive, and that N goes on after a migration. */
#include <stdio.h>
#include <time.h>

int main(void) {
    struct timespec ts = {0, 200 * 1000 * 1000};
    for (unsigned long n = 0;; n++) {
        printf("freehint-heartbeat %lu\n", n);
        fflush(stdout);
        nanosleep(&ts, NULL);
    }
}
