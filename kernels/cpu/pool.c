/* A persistent thread pool: fm_parallel(fn, ctx, n) runs fn(ctx, i) for
 * i in [0, n) on all threads, the caller included, and returns when all
 * are done. Workers spin briefly before sleeping: the gaps between kernel
 * calls of one decode step are tens of microseconds, a futex wake-up is
 * about as long, and the machine may be shared, so the spin stays short. */
#include "fm_cpu.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
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
#define SPIN_ROUNDS 20000 /* ~ tens of microseconds of pause instructions */

static struct {
    int n_threads; /* the caller included */
    pthread_t threads[FM_MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t wake;
    atomic_uint generation; /* bumped once per fm_parallel call */
    atomic_long next;       /* next task index to claim */
    atomic_int busy;        /* workers still inside the current call */
    long n_tasks;
    fm_task_fn fn;
    void *ctx;
} pool = {.n_threads = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static void run_tasks(void) {
    long i;
    while ((i = atomic_fetch_add_explicit(&pool.next, 1, memory_order_relaxed)) < pool.n_tasks)
        pool.fn(pool.ctx, i);
}

static void *worker(void *arg) {
    (void)arg;
    unsigned seen = atomic_load(&pool.generation);
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen) {
            if (++spins < SPIN_ROUNDS) { cpu_relax(); continue; }
            pthread_mutex_lock(&pool.mu);
            while ((g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen)
                pthread_cond_wait(&pool.wake, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
            break;
        }
        seen = g;
        run_tasks();
        atomic_fetch_sub_explicit(&pool.busy, 1, memory_order_release);
    }
    return NULL;
}

int fm_set_threads(int n) {
    if (pool.n_threads > 1) return pool.n_threads; /* started once per process */
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    if (n > FM_MAX_THREADS) n = FM_MAX_THREADS;
    int started = 1;
    for (int t = 1; t < n; t++) {
        if (pthread_create(&pool.threads[t], NULL, worker, NULL) != 0) break;
        pthread_detach(pool.threads[t]);
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
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_tasks = n_tasks;
    atomic_store_explicit(&pool.next, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.busy, pool.n_threads - 1, memory_order_relaxed);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    run_tasks();
    /* A worker that was descheduled (shared machine) must get the core back. */
    for (long spins = 0; atomic_load_explicit(&pool.busy, memory_order_acquire) > 0; spins++) {
        if (spins < SPIN_ROUNDS) cpu_relax();
        else sched_yield();
    }
}
