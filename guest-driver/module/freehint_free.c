// SPDX-License-Identifier: GPL-2.0
/*
 * freehint_free: reports the guest's free memory to the freehint agent,
 * without allocating or writing any of it.
 *
 * The stock virtio_balloon driver hints a free block by allocating it
 * (order 10) and holding it until the host is done: with init_on_alloc
 * the allocation zeroes every hinted page, and free memory in blocks
 * smaller than 4 MiB is never hinted. This module instead takes a
 * snapshot of the buddy allocator's free lists, zone by zone under each
 * zone's lock, for every order from the caller's minimum up, and returns
 * merged PFN ranges through one ioctl on /dev/freehint_free (the
 * interface is in freehint_free_uapi.h).
 *
 * A page reported free may be allocated and written right after the
 * snapshot: the host's dirty log catches that write, as it catches any
 * other, so a stale report costs nothing but one resent page. What the
 * module must never do is report a page that was not free at the
 * snapshot; every uncertain case (a block outside the zone's span as
 * seen when the bitmap was sized, an isolated page block) is left out.
 *
 * How: per zone, a bitmap over the zone's PFN span is cleared, the zone
 * lock is taken (interrupts off, as the allocator itself does), every
 * free block of the wanted orders sets its pages' bits, the lock is
 * dropped, and the bitmap is turned into ranges and copied out. The
 * lock is held only for the list walk; free memory sits mostly in high
 * orders, so the walk is short (lock_ns in the reply says how short).
 * The nodes and zones are walked through node_data and node_states,
 * which this kernel exports (first_online_pgdat and next_zone are not).
 */

#include <linux/bitmap.h>
#include <linux/capability.h>
#include <linux/fs.h>
#include <linux/ktime.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmzone.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/nodemask.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "freehint_free_uapi.h"

/* Ranges gathered before one copy to the caller. */
#define FREEHINT_CHUNK_RANGES 256

/* One request at a time: bounds the module's memory to one bitmap. */
static DEFINE_MUTEX(freehint_request_lock);

/* One request's state while it walks the zones. */
struct freehint_walk {
	/* One bit per page of the largest zone span seen before the walk. */
	unsigned long *bits;
	unsigned long nbits;
	u32 min_order;

	struct freehint_pfn_range __user *out;
	u32 capacity;
	u32 count;
	u64 pages;
	bool truncated;
	u64 lock_ns;

	/* The last range, kept open so that the next one may extend it. */
	struct freehint_pfn_range open;
	bool have_open;
	struct freehint_pfn_range chunk[FREEHINT_CHUNK_RANGES];
	u32 in_chunk;
};

/* Copies the gathered ranges out; 0 or -EFAULT. */
static int freehint_flush_chunk(struct freehint_walk *w)
{
	size_t bytes = w->in_chunk * sizeof(w->chunk[0]);

	if (!w->in_chunk)
		return 0;
	if (copy_to_user(w->out + w->count, w->chunk, bytes))
		return -EFAULT;
	w->count += w->in_chunk;
	w->in_chunk = 0;
	return 0;
}

/* Closes the open range: into the chunk if the caller has room for it. */
static int freehint_close_open(struct freehint_walk *w)
{
	if (!w->have_open)
		return 0;
	w->have_open = false;
	if (w->count + w->in_chunk >= w->capacity) {
		w->truncated = true;
		return 0;
	}
	w->chunk[w->in_chunk++] = w->open;
	w->pages += w->open.pages;
	if (w->in_chunk == FREEHINT_CHUNK_RANGES)
		return freehint_flush_chunk(w);
	return 0;
}

/* Adds pages free pages from first_pfn on, merging with the open range. */
static int freehint_emit(struct freehint_walk *w, u64 first_pfn, u64 pages)
{
	int ret;

	if (w->have_open && w->open.first_pfn + w->open.pages == first_pfn) {
		w->open.pages += pages;
		return 0;
	}
	ret = freehint_close_open(w);
	if (ret)
		return ret;
	w->open.first_pfn = first_pfn;
	w->open.pages = pages;
	w->have_open = true;
	return 0;
}

/* Marks the free blocks of zone in the bitmap, under the zone's lock;
 * returns the zone's first PFN and how many bits it may have set. */
static unsigned long freehint_mark_zone(struct freehint_walk *w,
					struct zone *zone,
					unsigned long *span_bits)
{
	unsigned long flags, start, span;
	unsigned int order;
	int mt;
	u64 t0, held;

	spin_lock_irqsave(&zone->lock, flags);
	t0 = ktime_get_ns();
	start = zone->zone_start_pfn;
	span = min(zone->spanned_pages, w->nbits);
	for (order = w->min_order; order < MAX_ORDER; order++) {
		struct free_area *area = &zone->free_area[order];
		unsigned long block_pages = 1UL << order;

		for (mt = 0; mt < MIGRATE_TYPES; mt++) {
			struct page *page;

#ifdef CONFIG_MEMORY_ISOLATION
			/* Being taken out of the allocator: not ours to report. */
			if (mt == MIGRATE_ISOLATE)
				continue;
#endif
			list_for_each_entry(page, &area->free_list[mt], buddy_list) {
				unsigned long pfn = page_to_pfn(page);

				if (pfn < start || pfn - start + block_pages > span)
					continue;
				bitmap_set(w->bits, pfn - start, block_pages);
			}
		}
	}
	held = ktime_get_ns() - t0;
	spin_unlock_irqrestore(&zone->lock, flags);
	if (held > w->lock_ns)
		w->lock_ns = held;
	*span_bits = span;
	return start;
}

/* Reports one zone's free pages. */
static int freehint_walk_zone(struct freehint_walk *w, struct zone *zone)
{
	unsigned long start, span, first, end;
	int ret;

	bitmap_zero(w->bits, w->nbits);
	start = freehint_mark_zone(w, zone, &span);
	for (first = find_next_bit(w->bits, span, 0); first < span;
	     first = find_next_bit(w->bits, span, end)) {
		end = find_next_zero_bit(w->bits, span, first);
		ret = freehint_emit(w, start + first, end - first);
		if (ret)
			return ret;
		if (w->truncated)
			return 0;
	}
	return 0;
}

/* The largest span of a populated zone, in pages. */
static unsigned long freehint_largest_span(void)
{
	unsigned long largest = 0;
	int nid, z;

	for_each_online_node(nid) {
		pg_data_t *pgdat = NODE_DATA(nid);

		for (z = 0; z < MAX_NR_ZONES; z++) {
			struct zone *zone = &pgdat->node_zones[z];

			if (populated_zone(zone))
				largest = max(largest, READ_ONCE(zone->spanned_pages));
		}
	}
	return largest;
}

/*
 * What a free page holds, as this kernel defines it: page poisoning is
 * checked first because it wins over init_on_free (mm_core_init turns
 * init_on_free off when poisoning is on).
 */
static u32 freehint_content_flags(void)
{
	if (page_poisoning_enabled_static())
		return FREEHINT_FREE_POISONED;
	if (want_init_on_free())
		return FREEHINT_FREE_ZEROED;
	return 0;
}

static int freehint_report(struct freehint_free_request *req)
{
	struct freehint_walk *w;
	u64 t0 = ktime_get_ns();
	int nid, z, ret = 0;

	w = kzalloc(sizeof(*w), GFP_KERNEL);
	if (!w)
		return -ENOMEM;
	w->nbits = freehint_largest_span();
	w->bits = kvmalloc_array(BITS_TO_LONGS(max(w->nbits, 1UL)),
				 sizeof(unsigned long), GFP_KERNEL);
	if (!w->bits) {
		kfree(w);
		return -ENOMEM;
	}
	w->min_order = req->min_order;
	w->out = u64_to_user_ptr(req->ranges);
	w->capacity = req->capacity;

	for_each_online_node(nid) {
		pg_data_t *pgdat = NODE_DATA(nid);

		for (z = 0; z < MAX_NR_ZONES && !w->truncated; z++) {
			struct zone *zone = &pgdat->node_zones[z];

			if (!populated_zone(zone))
				continue;
			ret = freehint_walk_zone(w, zone);
			if (ret)
				goto out;
			if (fatal_signal_pending(current)) {
				ret = -EINTR;
				goto out;
			}
			cond_resched();
		}
	}
	ret = freehint_close_open(w);
	if (!ret)
		ret = freehint_flush_chunk(w);
	if (!ret) {
		req->count = w->count;
		req->pages = w->pages;
		req->lock_ns = w->lock_ns;
		req->flags = (w->truncated ? FREEHINT_FREE_TRUNCATED : 0) |
			     freehint_content_flags();
		req->took_ns = ktime_get_ns() - t0;
	}
out:
	kvfree(w->bits);
	kfree(w);
	return ret;
}

static long freehint_ioctl(struct file *file, unsigned int cmd,
			   unsigned long arg)
{
	struct freehint_free_request req;
	void __user *uarg = (void __user *)arg;
	int ret;

	if (cmd != FREEHINT_IOC_FREE_RANGES)
		return -ENOTTY;
	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (req.version != FREEHINT_FREE_VERSION || req.reserved ||
	    req.min_order >= MAX_ORDER || !req.capacity ||
	    req.capacity > FREEHINT_FREE_MAX_CAPACITY)
		return -EINVAL;
	if (!access_ok(u64_to_user_ptr(req.ranges),
		       (size_t)req.capacity * sizeof(struct freehint_pfn_range)))
		return -EFAULT;
	if (mutex_lock_interruptible(&freehint_request_lock))
		return -EINTR;
	ret = freehint_report(&req);
	mutex_unlock(&freehint_request_lock);
	if (ret)
		return ret;
	if (copy_to_user(uarg, &req, sizeof(req)))
		return -EFAULT;
	return 0;
}

static int freehint_open(struct inode *inode, struct file *file)
{
	/* The physical layout of free memory is not for every user. */
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	return 0;
}

static const struct file_operations freehint_fops = {
	.owner = THIS_MODULE,
	.open = freehint_open,
	.unlocked_ioctl = freehint_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice freehint_device = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "freehint_free",
	.fops = &freehint_fops,
	.mode = 0600,
};

static int __init freehint_init(void)
{
	return misc_register(&freehint_device);
}

static void __exit freehint_exit(void)
{
	misc_deregister(&freehint_device);
}

module_init(freehint_init);
module_exit(freehint_exit);

MODULE_DESCRIPTION("freehint: the guest's free memory as PFN ranges, from the buddy allocator's free lists");
MODULE_LICENSE("GPL");
