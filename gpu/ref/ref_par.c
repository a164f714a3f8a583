/*
 * ref_par.c: see ref_par.h. Threads are started per call and joined before it returns: the
 * kernels stream whole volumes, so the start-up cost (tens of microseconds) is noise, and no
 * pool outlives a call. Part boundaries are multiples of 64 voxels so two threads never write
 * the same cache line of a u8 mask.
 */
#include <pthread.h>
#include "ref_par.h"

#define ALIGN 64

typedef struct part {
    ref_part_fn fn;
    void *arg;
    int index;
    size_t begin, end;
    pthread_t tid;
    int started;
} part;

static int parts_of(int threads, size_t units, size_t min_units)
{
    size_t by_size = units / (min_units ? min_units : 1);
    if (threads > REF_MAX_THREADS)
        threads = REF_MAX_THREADS;
    if (threads < 1 || by_size < 2)
        return 1;
    return by_size < (size_t)threads ? (int)by_size : threads;
}

int ref_parts(int threads, size_t n)
{
    return parts_of(threads, n, REF_MIN_PART);
}

int ref_units_parts(int threads, size_t units, size_t min_units)
{
    return parts_of(threads, units, min_units);
}

static void *part_main(void *p)
{
    part *pt = p;
    pt->fn(pt->arg, pt->index, pt->begin, pt->end);
    return NULL;
}

/* Runs np parts of [0, n) of `chunk` units each (the last gets the rest), part 0 on the
 * calling thread. */
static void run_parts(int np, size_t n, size_t chunk, ref_part_fn fn, void *arg)
{
    part parts[REF_MAX_THREADS];

    if (np == 1) {
        fn(arg, 0, 0, n);
        return;
    }
    for (int i = 0; i < np; i++) {
        size_t b = chunk * (size_t)i, e = chunk * (size_t)(i + 1);
        parts[i] = (part){.fn = fn, .arg = arg, .index = i};
        parts[i].begin = b < n ? b : n;
        parts[i].end = i == np - 1 || e > n ? n : e;
    }
    for (int i = 1; i < np; i++)
        parts[i].started = pthread_create(&parts[i].tid, NULL, part_main, &parts[i]) == 0;
    part_main(&parts[0]);
    for (int i = 1; i < np; i++) {
        if (parts[i].started)
            pthread_join(parts[i].tid, NULL);
        else
            part_main(&parts[i]);
    }
}

void ref_run(int threads, size_t n, ref_part_fn fn, void *arg)
{
    int np = ref_parts(threads, n);
    run_parts(np, n, (n / (size_t)np + ALIGN - 1) / ALIGN * ALIGN, fn, arg);
}

void ref_run_units(int threads, size_t units, size_t min_units, ref_part_fn fn, void *arg)
{
    int np = ref_units_parts(threads, units, min_units);
    run_parts(np, units, units / (size_t)np, fn, arg);
}
