/*
 * worker.h: the job loop shared by storage-uploader and gpu-segmenter. It consumes the job
 * topic one event at a time, claims the job (a redelivered or stale event is skipped), keeps
 * the lease alive on a thread, calls the service's job function and records the outcome:
 * LC_OK -> succeeded; a transient error -> failed and retried with backoff; any other error ->
 * dead; LC_ERR_CANCELLED -> released (shutdown) or abandoned (lease lost). Between events it
 * runs the reconciler for its job kind. The offset is committed after the outcome is stored.
 */
#ifndef LC_WORKER_H
#define LC_WORKER_H

#include <stdint.h>
#include <cjson/cJSON.h>
#include "lc/jobs.h"
#include "lc/service.h"

typedef struct lc_worker_cfg {
    long long lease_seconds;
    long long max_attempts;
    long long reconcile_interval_seconds;
    long long republish_after_seconds;
} lc_worker_cfg;

extern const lc_cfg_var lc_worker_cfg_vars[];
extern const size_t lc_worker_cfg_nvars;

typedef struct lc_worker_job {
    lc_job *job;     /* borrowed */
    lc_service *svc; /* borrowed */
    lc_db *db;       /* the worker's connection, free for the job function to use */
    const lc_job_worker *w;
    lc_job_lease *lease;
    int64_t drain_deadline_ms; /* set once stop is requested: lc_now_ms() + drain */
} lc_worker_job;

/* 1 when the job function must stop now and return LC_ERR_CANCELLED: the lease was lost, or
 * the service is stopping and its drain time is over. Cheap: call it between steps. */
int lc_worker_job_should_stop(lc_worker_job *j);
/* Record progress {"done","total","unit"} and publish job.status (errors are logged only). */
void lc_worker_job_progress(lc_worker_job *j, long long done, long long total, const char *unit);

/* The job function: on LC_OK, *result (may stay NULL) is stored with the job. */
typedef lc_rc (*lc_worker_fn)(void *ctx, lc_worker_job *j, cJSON **result, lc_err *err);

/* Run until the service stops. kind: "upload" or "segment"; topic: its job topic. */
lc_rc lc_worker_run(lc_service *s, const lc_worker_cfg *cfg, const char *kind, lc_topic topic,
                    lc_worker_fn fn, void *ctx, lc_err *err);

#endif
