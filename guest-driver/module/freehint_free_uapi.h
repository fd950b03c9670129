/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * freehint_free: the interface of /dev/freehint_free, shared by the kernel
 * module and the guest agent.
 *
 * One ioctl, FREEHINT_IOC_FREE_RANGES, fills a caller's array with the
 * guest's free memory as PFN ranges: a snapshot of the buddy allocator's
 * free lists, zone by zone under each zone's lock, for every order from
 * min_order up. The module allocates none of the pages it reports and
 * writes none of them. Ranges are merged within a zone and across
 * adjacent zones, and are in increasing PFN order within a zone.
 */
#ifndef FREEHINT_FREE_UAPI_H
#define FREEHINT_FREE_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* The version of struct freehint_free_request this module speaks. */
#define FREEHINT_FREE_VERSION 1

/* Most ranges one request may ask for (16 bytes each: 64 MiB). */
#define FREEHINT_FREE_MAX_CAPACITY (1u << 22)

/* Set in flags when the array was full before every free range was in it. */
#define FREEHINT_FREE_TRUNCATED 1u
/*
 * Set in flags when the guest's kernel zeroes every page it frees
 * (init_on_free=1): a free page reads as zeros.
 */
#define FREEHINT_FREE_ZEROED 2u
/*
 * Set in flags when the guest's kernel poisons every page it frees
 * (page_poison=1) with FREEHINT_FREE_POISON_BYTE, and checks the poison
 * when it hands the page out again. Poisoning takes precedence over
 * init_on_free in the kernel, so at most one of the two is set.
 */
#define FREEHINT_FREE_POISONED 4u
/* The byte a poisoned free page is filled with (the kernel's PAGE_POISON). */
#define FREEHINT_FREE_POISON_BYTE 0xaa

/* pages free pages from first_pfn on. */
struct freehint_pfn_range {
	__u64 first_pfn;
	__u64 pages;
};

struct freehint_free_request {
	__u32 version;   /* in: FREEHINT_FREE_VERSION */
	__u32 min_order; /* in: smallest buddy order reported (0: every page) */
	__u64 ranges;    /* in: user address of capacity struct freehint_pfn_range */
	__u32 capacity;  /* in: 1..FREEHINT_FREE_MAX_CAPACITY */
	__u32 count;     /* out: ranges written */
	__u64 pages;     /* out: pages in the ranges written */
	__u64 lock_ns;   /* out: the longest one zone's lock was held */
	__u64 took_ns;   /* out: the whole request */
	__u32 flags;     /* out: FREEHINT_FREE_TRUNCATED, _ZEROED, _POISONED */
	__u32 reserved;  /* in: 0 */
};

#define FREEHINT_IOC_FREE_RANGES _IOWR('f', 1, struct freehint_free_request)

#endif /* FREEHINT_FREE_UAPI_H */
