/* Live heap bytes of a process, for bench_memory.py: loaded with LD_PRELOAD, it wraps the malloc
 * family and keeps the bytes in use (malloc_usable_size of every block not yet freed) and their peak.
 * The process reads them with ctypes: kf_mem_current(), kf_mem_peak(), kf_mem_reset_peak().
 *
 * Counts what goes through malloc: torch's CPU tensors (posix_memalign), oneDNN's scratch, kfuse's C
 * kernels, Python objects over 512 bytes. Not counted: memory mapped directly (pymalloc's arenas of
 * small objects, thread stacks) and stack arrays.
 *
 *     gcc -O2 -shared -fPIC memtrack.c -o memtrack.so -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <stddef.h>
#include <string.h>

static long current, peak;    /* bytes; signed, so a block we never saw allocated cannot wrap them */

static void *(*real_malloc)(size_t);
static void (*real_free)(void *);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static void *(*real_memalign)(size_t, size_t);
static void *(*real_valloc)(size_t);
static void *(*real_pvalloc)(size_t);

/* dlsym may allocate (calloc of its error buffer) before the real functions are known: those few
 * bytes come from here and are never handed to the real free. */
static char boot[8192] __attribute__((aligned(64)));
static size_t boot_used;
static int resolving;

static int in_boot(void *p) { return (char *)p >= boot && (char *)p < boot + sizeof boot; }

static void *boot_alloc(size_t n) {
    size_t at = __atomic_fetch_add(&boot_used, (n + 63) & ~(size_t)63, __ATOMIC_RELAXED);
    return at + n <= sizeof boot ? boot + at : NULL;    /* boot is zeroed: fine for calloc too */
}

static void resolve(void) {
    resolving = 1;
    real_malloc = dlsym(RTLD_NEXT, "malloc");
    real_free = dlsym(RTLD_NEXT, "free");
    real_calloc = dlsym(RTLD_NEXT, "calloc");
    real_realloc = dlsym(RTLD_NEXT, "realloc");
    real_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
    real_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
    real_memalign = dlsym(RTLD_NEXT, "memalign");
    real_valloc = dlsym(RTLD_NEXT, "valloc");
    real_pvalloc = dlsym(RTLD_NEXT, "pvalloc");
    resolving = 0;
}

/* The first call comes from the loader, before any thread exists. */
#define READY(fallback) do { if (!real_free) { if (resolving) return fallback; resolve(); } } while (0)

static void *added(void *p) {
    if (p) {
        long now = __atomic_add_fetch(&current, (long)malloc_usable_size(p), __ATOMIC_RELAXED);
        long top = __atomic_load_n(&peak, __ATOMIC_RELAXED);
        while (now > top && !__atomic_compare_exchange_n(&peak, &top, now, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            ;
    }
    return p;
}

static void removed(void *p) {
    if (p) __atomic_sub_fetch(&current, (long)malloc_usable_size(p), __ATOMIC_RELAXED);
}

long kf_mem_current(void) { return __atomic_load_n(&current, __ATOMIC_RELAXED); }
long kf_mem_peak(void) { return __atomic_load_n(&peak, __ATOMIC_RELAXED); }
void kf_mem_reset_peak(void) { __atomic_store_n(&peak, kf_mem_current(), __ATOMIC_RELAXED); }

void *malloc(size_t n) { READY(boot_alloc(n)); return added(real_malloc(n)); }
void *calloc(size_t k, size_t n) { READY(boot_alloc(k * n)); return added(real_calloc(k, n)); }
void *aligned_alloc(size_t a, size_t n) { READY(NULL); return added(real_aligned_alloc(a, n)); }
void *memalign(size_t a, size_t n) { READY(NULL); return added(real_memalign(a, n)); }
void *valloc(size_t n) { READY(NULL); return added(real_valloc(n)); }
void *pvalloc(size_t n) { READY(NULL); return added(real_pvalloc(n)); }

void free(void *p) {
    if (!p || in_boot(p)) return;
    READY();
    removed(p);
    real_free(p);
}

int posix_memalign(void **out, size_t a, size_t n) {
    READY(ENOMEM);
    int rc = real_posix_memalign(out, a, n);
    if (rc == 0) added(*out);
    return rc;
}

void *realloc(void *p, size_t n) {
    READY(boot_alloc(n));
    if (in_boot(p)) {             /* a boot block moves to the real heap; its old size is unknown */
        void *q = malloc(n);
        if (q) memcpy(q, p, n < (size_t)(boot + sizeof boot - (char *)p) ? n : (size_t)(boot + sizeof boot - (char *)p));
        return q;
    }
    size_t old = p ? malloc_usable_size(p) : 0;
    void *q = real_realloc(p, n);
    if (!q && n) return NULL;     /* failed: p is untouched */
    __atomic_sub_fetch(&current, (long)old, __ATOMIC_RELAXED);
    return added(q);
}
