/* Weights onto transparent huge pages, in place.
 *
 * The kernels stream weights at memory speed only with few TLB misses:
 * software prefetches that miss the TLB are dropped, so on 4 KiB pages every
 * page starts with demand misses (one core: 4-bit rows at 11-14 GB/s on 4 KiB
 * pages, 18-19 on 2 MiB pages). MLX allocates with malloc, which advises no
 * huge pages (THP "madvise" mode, the common default), and collapsing pages
 * in place (MADV_COLLAPSE) runs at ~0.5 GB/s here. Instead the whole 2 MiB
 * pages of a buffer are copied into a fresh mapping advised MADV_HUGEPAGE and
 * that mapping is moved over the old range with mremap: the same addresses,
 * the same bytes, now on huge pages, at memcpy speed. The buffer's owner
 * (MLX, the expert store) sees nothing change; freeing it unmaps whatever
 * mappings cover its range. Weights only: nothing may write the range while
 * it is copied. */
#include "fm_cpu.h"

#if defined(__linux__)
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define HUGE_PAGE ((uintptr_t)2 << 20)

/* Bytes of [p, p+len) now on a huge-page mapping (the whole 2 MiB pages inside it),
 * 0 when there are none, -1 on failure (the range is then unchanged). */
int64_t fm_huge_remap(void *p, int64_t len) {
    const uintptr_t a = ((uintptr_t)p + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    const uintptr_t e = ((uintptr_t)p + (uintptr_t)len) & ~(HUGE_PAGE - 1);
    if (len <= 0 || e <= a) return 0;
    const size_t n = e - a;
    char *m = mmap(NULL, n + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return -1;
    char *h = (char *)(((uintptr_t)m + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1));
    if (h > m) munmap(m, h - m);
    if (m + n + HUGE_PAGE > h + n) munmap(h + n, (m + n + HUGE_PAGE) - (h + n));
    madvise(h, n, MADV_HUGEPAGE);
    memcpy(h, (const void *)a, n);
    if (mremap(h, n, n, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)a) == MAP_FAILED) {
        munmap(h, n);
        return -1;
    }
    return (int64_t)n;
}
#else
int64_t fm_huge_remap(void *p, int64_t len) {
    (void)p;
    (void)len;
    return 0;
}
#endif
