/*
 * idx_pool.c: the indexer's parse pool: a few threads that, together with the consuming
 * thread, run one function over the items of a batch (read, hash and parse each object).
 * idx_pool_run does it all before returning; idx_pool_start returns at once, so the
 * consuming thread can write the first items to the database while the helpers still parse
 * the later ones (idx_pool_wait for a range, helping with what nobody took yet). Indices are
 * taken in order. One run at a time; the pool is created and freed by the consuming thread,
 * which is also the only one to call run, start, wait and finish.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include "idx.h"

struct idx_pool {
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    pthread_t *threads;
    int nthreads;
    int quit;
    unsigned long generation; /* bumped by each run */
    int busy;                 /* helpers still inside the current run */
    /* the current run */
    void (*fn)(void *ctx, size_t i);
    void *ctx;
    size_t n;
    atomic_size_t next;
    unsigned char *finished; /* started runs: [i] once fn(ctx, i) returned (under mu) */
    pthread_cond_t progress; /* an index of a started run is done */
    int active;              /* a started run has not been finished */
};

/* Record that index i of a started run is done. */
static void mark_done(idx_pool *p, size_t i)
{
    pthread_mutex_lock(&p->mu);
    p->finished[i] = 1;
    pthread_cond_broadcast(&p->progress);
    pthread_mutex_unlock(&p->mu);
}

/* Take indices until none are left. */
static void drain(idx_pool *p, void (*fn)(void *, size_t), void *ctx, size_t n)
{
    for (;;) {
        size_t i = atomic_fetch_add(&p->next, 1);
        if (i >= n)
            return;
        fn(ctx, i);
        if (p->finished)
            mark_done(p, i);
    }
}

static void *helper(void *arg)
{
    idx_pool *p = arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->quit && p->generation == seen)
            pthread_cond_wait(&p->start, &p->mu);
        if (p->quit)
            break;
        seen = p->generation;
        void (*fn)(void *, size_t) = p->fn;
        void *ctx = p->ctx;
        size_t n = p->n;
        pthread_mutex_unlock(&p->mu);
        drain(p, fn, ctx, n);
        pthread_mutex_lock(&p->mu);
        if (--p->busy == 0)
            pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

lc_rc idx_pool_new(int threads, idx_pool **out, lc_err *err)
{
    *out = NULL;
    if (threads < 0)
        threads = 0;
    idx_pool *p = calloc(1, sizeof(*p));
    if (!p || !(p->threads = calloc((size_t)threads + 1, sizeof(pthread_t)))) {
        free(p);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start, NULL);
    pthread_cond_init(&p->done, NULL);
    pthread_cond_init(&p->progress, NULL);
    atomic_init(&p->next, 0);
    for (int i = 0; i < threads; i++) {
        if (pthread_create(&p->threads[i], NULL, helper, p) != 0) {
            idx_pool_free(p);
            return lc_err_set(err, LC_ERR_INTERNAL, "could not start parse thread %d", i + 1);
        }
        p->nthreads++;
    }
    *out = p;
    return LC_OK;
}

void idx_pool_free(idx_pool *p)
{
    if (!p)
        return;
    idx_pool_finish(p);
    pthread_mutex_lock(&p->mu);
    p->quit = 1;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->start);
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->progress);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p);
}

void idx_pool_run(idx_pool *p, size_t n, void (*fn)(void *ctx, size_t i), void *ctx)
{
    if (!p || p->nthreads == 0 || n < 2) {
        for (size_t i = 0; i < n; i++)
            fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    atomic_store(&p->next, 0);
    p->busy = p->nthreads;
    p->generation++;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    drain(p, fn, ctx, n);
    pthread_mutex_lock(&p->mu);
    while (p->busy > 0)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

void idx_pool_start(idx_pool *p, size_t n, void (*fn)(void *ctx, size_t i), void *ctx)
{
    if (!p) {
        for (size_t i = 0; i < n; i++)
            fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    atomic_store(&p->next, 0);
    /* without flags (out of memory) the run is finished before start returns */
    p->finished = n ? calloc(n, 1) : NULL;
    p->active = p->finished != NULL;
    if (p->active && p->nthreads > 0) {
        p->busy = p->nthreads;
        p->generation++;
        pthread_cond_broadcast(&p->start);
    }
    pthread_mutex_unlock(&p->mu);
    if (!p->active)
        drain(p, fn, ctx, n);
}

void idx_pool_wait(idx_pool *p, size_t from, size_t to)
{
    if (!p || !p->active)
        return;
    if (to > p->n)
        to = p->n;
    /* help with the indices of the range nobody took yet, in order */
    for (size_t i = atomic_load(&p->next); i < to; i = atomic_load(&p->next)) {
        if (!atomic_compare_exchange_weak(&p->next, &i, i + 1))
            continue;
        p->fn(p->ctx, i);
        mark_done(p, i);
    }
    pthread_mutex_lock(&p->mu);
    for (size_t i = from; i < to; i++)
        while (!p->finished[i])
            pthread_cond_wait(&p->progress, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

void idx_pool_finish(idx_pool *p)
{
    if (!p || !p->active)
        return;
    idx_pool_wait(p, 0, p->n);
    pthread_mutex_lock(&p->mu);
    while (p->nthreads > 0 && p->busy > 0)
        pthread_cond_wait(&p->done, &p->mu);
    free(p->finished);
    p->finished = NULL;
    p->active = 0;
    pthread_mutex_unlock(&p->mu);
}
