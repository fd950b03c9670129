// fh-freeranges MIN_ORDER: asks the freehint_free module for the guest's
// free memory (orders >= MIN_ORDER) and checks what it says against the
// kernel's own count, printing one line:
//
//   freehint-free order=O ranges=N pages=P memfree_pages=F overlaps=X
//     truncated=T lock_us=L took_us=U
//
// memfree_pages is /proc/meminfo's MemFree read just before the request
// (the buddy allocator's free pages); overlaps counts ranges that overlap
// or touch the previous one in PFN order (the module merges touching
// ranges, so both are errors). Exit status 1 when the device cannot be
// used.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "../module/freehint_free_uapi.h"

static unsigned long long memfree_pages(void)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[256];
	unsigned long long kib = 0;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "MemFree: %llu kB", &kib) == 1)
			break;
	fclose(f);
	return kib * 1024 / (unsigned long long)sysconf(_SC_PAGESIZE);
}

static int by_first_pfn(const void *a, const void *b)
{
	const struct freehint_pfn_range *x = a, *y = b;

	return x->first_pfn < y->first_pfn ? -1 : x->first_pfn > y->first_pfn;
}

int main(int argc, char **argv)
{
	unsigned int order = argc > 1 ? (unsigned int)atoi(argv[1]) : 0;
	const uint32_t capacity = 1u << 18;
	struct freehint_pfn_range *ranges = calloc(capacity, sizeof(*ranges));
	struct freehint_free_request req;
	unsigned long long before, overlaps = 0, pages = 0;
	int fd;
	uint32_t i;

	if (!ranges) {
		printf("freehint-free FAIL no memory for %u ranges\n", capacity);
		return 1;
	}
	fd = open("/dev/freehint_free", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		printf("freehint-free FAIL /dev/freehint_free: %m\n");
		return 1;
	}
	memset(&req, 0, sizeof(req));
	req.version = FREEHINT_FREE_VERSION;
	req.min_order = order;
	req.ranges = (uintptr_t)ranges;
	req.capacity = capacity;
	before = memfree_pages();
	if (ioctl(fd, FREEHINT_IOC_FREE_RANGES, &req) < 0) {
		printf("freehint-free FAIL ioctl: %m\n");
		return 1;
	}
	qsort(ranges, req.count, sizeof(*ranges), by_first_pfn);
	for (i = 0; i < req.count; i++) {
		pages += ranges[i].pages;
		if (i > 0 && ranges[i].first_pfn <=
				     ranges[i - 1].first_pfn + ranges[i - 1].pages)
			overlaps++;
	}
	if (pages != req.pages)
		printf("freehint-free FAIL the ranges hold %llu pages, the module says %llu\n",
		       pages, (unsigned long long)req.pages);
	printf("freehint-free order=%u ranges=%u pages=%llu memfree_pages=%llu overlaps=%llu truncated=%u content=%s lock_us=%llu took_us=%llu\n",
	       order, req.count, pages, before, overlaps,
	       req.flags & FREEHINT_FREE_TRUNCATED ? 1u : 0u,
	       req.flags & FREEHINT_FREE_POISONED ? "poison" :
	       req.flags & FREEHINT_FREE_ZEROED ? "zero" : "undefined",
	       (unsigned long long)req.lock_ns / 1000,
	       (unsigned long long)req.took_ns / 1000);
	close(fd);
	return 0;
}
