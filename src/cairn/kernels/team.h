/* A team of threads that runs a whole decode step together (step.c opens one OpenMP parallel region per step and
 * passes this to the kernels' _team entry points), with its own barrier instead of OpenMP's.
 *
 * Why not OpenMP's barriers: a step has some 180 points where every thread must wait for the others (a product's
 * output is read by the next), a few microseconds apart. libgomp's waiting threads spin only briefly and then sleep in
 * the kernel whenever more OpenMP threads exist in the process than CPUs — which is the case in cairn, where the
 * engine thread and the main thread (or a server's worker threads) each keep a pool — and waking a sleeping thread
 * costs more than the work between two barriers (measured: a step's attention phase took 10 us of synchronisation
 * around 2 us of work). Here a waiting thread spins (with the CPU's pause hint) for up to ~0.1 ms, which covers the
 * usual wait of a balanced phase, and only then sleeps on a futex until the last thread arrives and wakes it: on a
 * quiet machine no thread sleeps, and on a busy one (more runnable threads than cores, when a thread of the team can
 * lose its core for a whole time slice) the waiting thread gives its core away instead of spinning it out. Between
 * steps the team is OpenMP's: its other threads wait in libgomp's pool, spinning up to GOMP_SPINCOUNT times before
 * they sleep (measured: by default they spun through the engine's Python between two steps; cairn.openmp shortens
 * the spin for the decoding commands).
 *
 * Every thread of the team calls the same sequence of team functions; `id` is the thread's number (0 .. n - 1). */
#ifndef CAIRN_TEAM_H
#define CAIRN_TEAM_H
#include <limits.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
long syscall(long number, ...); /* unistd.h declares it only with _DEFAULT_SOURCE, which -std=c11 leaves out */
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CAIRN_PAUSE() _mm_pause()
#else
#define CAIRN_PAUSE() ((void)0)
#endif

struct cairn_team {
    int n;                     /* threads */
    _Alignas(64) atomic_int arrived;
    _Alignas(64) atomic_int generation;  /* a futex word: +1 each time every thread has arrived */
    atomic_int sleepers;                 /* threads asleep (or about to be) on it */
    _Alignas(64) atomic_llong next;      /* the next task of a dynamically shared loop */
    _Alignas(64) void *shared;           /* what thread 0 hands the others at a barrier */
};

#define CAIRN_SPINS 4096 /* pause-spins before a waiting thread sleeps (~0.1 ms: a pause is 40-140 cycles) */

static inline void team_barrier(struct cairn_team *t) {
    if (t->n <= 1) return;
    const int gen = atomic_load(&t->generation);
    if (atomic_fetch_add(&t->arrived, 1) == t->n - 1) {
        atomic_store(&t->arrived, 0);
        atomic_fetch_add(&t->generation, 1);
        if (atomic_load(&t->sleepers) > 0) {
#ifdef __linux__
            syscall(SYS_futex, &t->generation, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#endif
        }
        return;
    }
    for (int spins = 0; spins < CAIRN_SPINS; spins++) {
        if (atomic_load_explicit(&t->generation, memory_order_acquire) != gen) return;
        CAIRN_PAUSE();
    }
    /* sleepers is raised before the generation is read again by the kernel (seq_cst on both sides): either the last
     * thread sees a sleeper and wakes the futex, or the futex call sees the new generation and returns at once */
    atomic_fetch_add(&t->sleepers, 1);
    while (atomic_load(&t->generation) == gen) {
#ifdef __linux__
        syscall(SYS_futex, &t->generation, FUTEX_WAIT_PRIVATE, gen, NULL, NULL, 0);
#else
        sched_yield();
#endif
    }
    atomic_fetch_sub(&t->sleepers, 1);
}

/* thread id's share [*lo, *hi) of n items, in contiguous blocks of near-equal size */
static inline void team_range(int64_t n, int id, int threads, int64_t *lo, int64_t *hi) {
    *lo = n * id / threads;
    *hi = n * (id + 1) / threads;
}
#endif
