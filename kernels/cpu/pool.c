/* A persistent thread pool: fm_parallel(fn, ctx, n) runs fn(ctx, i) for
 * i in [0, n) on all threads, the caller included, and returns when all
 * tasks are done.
 *
 * The caller waits for tasks, not for threads: a worker that is asleep or
 * descheduled (these machines are shared) when a call starts simply misses
 * it, and the caller and the awake workers do its share. A worker that
 * wakes into a call announces itself (`active`) and checks the call is
 * still open; the caller closes the call and then waits only for announced
 * workers, so nobody touches a finished call's context.
 *
 * Workers spin for a while (FLASHMOE_CPU_SPIN_US, default 300 us) before
 * sleeping: back-to-back kernel calls (gate/up then down, consecutive
 * projections) find them awake, while MLX's own work between calls (which
 * may use every core: BLAS threads) does not compete with spinning workers
 * for long; measured in a decode step, 2000 us made MLX's ops 2-4x slower. */
#include "fm_cpu.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define FM_MAX_THREADS 256

static struct {
    int n_threads; /* the caller included */
    long spin_ns;
    pthread_mutex_t mu;
    pthread_mutex_t call_mu; /* one call at a time: ctypes lets Python threads in concurrently */
    pthread_cond_t wake;
    atomic_uint generation; /* the current call */
    atomic_uint closed;     /* the last call whose tasks are all claimed and done */
    atomic_int active;      /* workers inside a call */
    atomic_long next;       /* next task index to claim */
    atomic_long done;       /* tasks finished */
    long n_tasks;
    fm_task_fn fn;
    void *ctx;
} pool = {.n_threads = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .call_mu = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER};

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void run_tasks(void) {
    long i, mine = 0;
    while ((i = atomic_fetch_add_explicit(&pool.next, 1, memory_order_relaxed)) < pool.n_tasks) {
        pool.fn(pool.ctx, i);
        mine++;
    }
    if (mine) atomic_fetch_add_explicit(&pool.done, mine, memory_order_release);
}

static void *worker(void *arg) {
    (void)arg;
    unsigned seen = atomic_load(&pool.generation);
    for (;;) {
        unsigned g;
        long start = now_ns();
        for (int spins = 0; (g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen; spins++) {
            cpu_relax();
            if ((spins & 255) == 255 && now_ns() - start > pool.spin_ns) {
                pthread_mutex_lock(&pool.mu);
                while ((g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen)
                    pthread_cond_wait(&pool.wake, &pool.mu);
                pthread_mutex_unlock(&pool.mu);
                break;
            }
        }
        seen = g;
        atomic_fetch_add(&pool.active, 1);             /* seq_cst: pairs with the caller's close */
        if (atomic_load(&pool.closed) != g) run_tasks(); /* else: missed it, the others did the work */
        atomic_fetch_sub_explicit(&pool.active, 1, memory_order_release);
    }
    return NULL;
}

int fm_set_threads(int n, long spin_us) {
    if (pool.n_threads > 1) return pool.n_threads; /* started once per process */
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    if (n > FM_MAX_THREADS) n = FM_MAX_THREADS;
    pool.spin_ns = (spin_us >= 0 ? spin_us : 300) * 1000L;
    int started = 1;
    for (int t = 1; t < n; t++) {
        pthread_t th;
        if (pthread_create(&th, NULL, worker, NULL) != 0) break;
        pthread_detach(th);
        started++;
    }
    pool.n_threads = started;
    return started;
}

int fm_threads(void) { return pool.n_threads; }

void fm_parallel(fm_task_fn fn, void *ctx, long n_tasks) {
    if (n_tasks <= 0) return;
    if (pool.n_threads == 1 || n_tasks == 1) {
        for (long i = 0; i < n_tasks; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&pool.call_mu);
    /* No worker is inside a call here (the previous call waited for them). */
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_tasks = n_tasks;
    atomic_store_explicit(&pool.next, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    pthread_mutex_lock(&pool.mu);
    unsigned g = atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release) + 1;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    run_tasks();
    for (long spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < n_tasks; spins++) {
        if (spins < 100000) cpu_relax();
        else sched_yield(); /* a worker holding a task was descheduled: give it the core */
    }
    atomic_store(&pool.closed, g); /* seq_cst: late workers now skip this call */
    while (atomic_load(&pool.active) > 0) cpu_relax();
    pthread_mutex_unlock(&pool.call_mu);
}
