/*
 * idx_pool.c: the indexer's parse pool: a few threads that, together with the consuming
 * thread, run one function over the items of a batch (read, hash and parse each object), so
 * a batch's file work uses every core while the database is idle. One run at a time; the
 * pool is created and freed by the consuming thread, which is also the only one to call run.
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
};

/* Take indices until none are left. */
static void drain(idx_pool *p, void (*fn)(void *, size_t), void *ctx, size_t n)
{
    for (;;) {
        size_t i = atomic_fetch_add(&p->next, 1);
        if (i >= n)
            return;
        fn(ctx, i);
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
    if (threads <= 0)
        return LC_OK;
    idx_pool *p = calloc(1, sizeof(*p));
    if (!p || !(p->threads = calloc((size_t)threads, sizeof(pthread_t)))) {
        free(p);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start, NULL);
    pthread_cond_init(&p->done, NULL);
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
    pthread_mutex_lock(&p->mu);
    p->quit = 1;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->start);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p);
}

void idx_pool_run(idx_pool *p, size_t n, void (*fn)(void *ctx, size_t i), void *ctx)
{
    if (!p || n < 2) {
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
