/*
 * jobs.h: the job state machine of design.md, shared by the indexer (creates jobs), the
 * workers (claim, renew, finish) and the gateway (reads, later retries and cancels).
 *   queued -> running -> succeeded
 *                     -> failed (transient error, attempts left) -> queued after a backoff
 *                     -> dead   (permanent error, or attempts exhausted)
 *   queued | running -> cancelled
 * Every transition is a guarded UPDATE (WHERE state = ... AND lease_owner = ...), so a
 * redelivered event or a second worker changes nothing, and each one writes a job.status event
 * to the outbox in the same transaction. Running jobs hold a lease that the worker renews; the
 * reconciler re-queues expired leases and re-publishes queued jobs whose event went missing.
 * Functions taking an lc_db run their own transaction unless documented "inside a transaction".
 */
#ifndef LC_JOBS_H
#define LC_JOBS_H

#include <stdatomic.h>
#include <pthread.h>
#include <cjson/cJSON.h>
#include "lc/db.h"
#include "lc/rc.h"

typedef enum lc_job_state {
    LC_JOB_QUEUED = 0,
    LC_JOB_RUNNING,
    LC_JOB_SUCCEEDED,
    LC_JOB_FAILED,
    LC_JOB_DEAD,
    LC_JOB_CANCELLED,
} lc_job_state;

const char *lc_job_state_name(lc_job_state s); /* "queued", ... */
int lc_job_state_parse(const char *s);         /* -1 when unknown */

typedef struct lc_job {
    char id[37];
    char kind[16]; /* "upload", "segment" */
    char *study_uid;
    lc_job_state state;
    cJSON *params; /* owned, never NULL (an empty object when none) */
    int attempts;  /* including the current one */
    int max_attempts;
} lc_job;
void lc_job_free(lc_job *job);

/* Inside a transaction: insert a queued job and its job.<kind> event (topic prefix+"job."
 * +kind) into the outbox. dedupe_key (may be NULL) makes creation idempotent: when a job with
 * that key exists, nothing is written, *created is 0 and id_out holds the existing id.
 * params is borrowed. source is the CloudEvents source of the service creating it. */
lc_rc lc_job_create(lc_db *db, const char *prefix, const char *source, const char *kind,
                    const char *study_uid, const cJSON *params, const char *dedupe_key,
                    int max_attempts, char id_out[37], int *created, lc_err *err);

/* Worker identity: "host:pid:random", stable for the process. */
typedef struct lc_job_worker {
    char owner[128];
    const char *prefix; /* topic prefix, borrowed */
    const char *source; /* CloudEvents source, borrowed */
    int lease_s;
    int max_attempts;
} lc_job_worker;
void lc_job_worker_init(lc_job_worker *w, const char *prefix, const char *source, int lease_s,
                        int max_attempts);

/* queued -> running for this worker with a fresh lease and attempts+1; publishes job.status.
 * LC_ERR_CONFLICT when the job is not queued (already running elsewhere, finished, cancelled,
 * or not due yet): the caller skips the event. LC_ERR_NOT_FOUND for an unknown id. */
lc_rc lc_job_claim(lc_db *db, const lc_job_worker *w, const char *job_id, lc_job **out,
                   lc_err *err);
/* Extend the lease. LC_ERR_CONFLICT when this worker no longer holds the job (cancelled or
 * re-queued by the reconciler): the worker must stop working on it. */
lc_rc lc_job_renew(lc_db *db, const lc_job_worker *w, const char *job_id, lc_err *err);
/* Record progress (borrowed JSON object, e.g. {"done":3,"total":28,"unit":"instances"}) and
 * publish job.status. LC_ERR_CONFLICT as for renew. */
lc_rc lc_job_progress(lc_db *db, const lc_job_worker *w, const lc_job *job, const cJSON *progress,
                      lc_err *err);
/* Record an artifact of a job (name unique per job; a second call replaces it), alone or
 * inside the caller's transaction. */
lc_rc lc_job_add_artifact(lc_db *db, const char *job_id, const char *name, const char *store_key,
                          long long size, const char *media_type, lc_err *err);
/* running -> succeeded (result: borrowed JSON object or NULL); publishes job.status. */
lc_rc lc_job_succeed(lc_db *db, const lc_job_worker *w, const lc_job *job, const cJSON *result,
                     lc_err *err);
/* running -> failed with retry_at = now + backoff (transient and attempts left) or dead
 * (permanent, or attempts exhausted); error is stored and published. */
lc_rc lc_job_fail(lc_db *db, const lc_job_worker *w, const lc_job *job, const char *error,
                  int transient, lc_err *err);
/* running -> queued without counting the attempt (graceful shutdown): the job is published
 * again at once for another worker. */
lc_rc lc_job_release(lc_db *db, const lc_job_worker *w, const lc_job *job, lc_err *err);

/* queued | running -> cancelled (for the API): finished_at set, the lease dropped, reason
 * (may be NULL) stored as the error; publishes job.status. A worker running the job finds
 * out through its lease keeper (the next renew no longer matches: lc_job_lease_lost), and its
 * own transitions then fail with LC_ERR_CONFLICT. LC_ERR_CONFLICT when the job is in another
 * state, LC_ERR_NOT_FOUND for an unknown id. */
lc_rc lc_job_cancel(lc_db *db, const char *prefix, const char *source, const char *job_id,
                    const char *reason, lc_err *err);
/* failed | dead | cancelled -> queued (for the API): attempts start again from 0, error,
 * result, progress and retry_at are cleared; publishes the job.<kind> event and job.status.
 * LC_ERR_CONFLICT when the job is queued, running or succeeded; LC_ERR_NOT_FOUND for an
 * unknown id. */
lc_rc lc_job_retry(lc_db *db, const char *prefix, const char *source, const char *job_id,
                   lc_err *err);

/* One reconciler pass for jobs of kind (NULL: all kinds):
 *  - running jobs whose lease expired: re-queued (or dead when attempts are exhausted);
 *  - failed jobs whose retry_at passed: re-queued;
 *  - queued jobs last published more than republish_after_s ago: published again.
 * Each re-queue writes the job event and a job.status event to the outbox. */
typedef struct lc_job_reconcile_stats {
    int requeued_expired;
    int requeued_retry;
    int republished;
    int dead;
} lc_job_reconcile_stats;
lc_rc lc_jobs_reconcile(lc_db *db, const char *prefix, const char *source, const char *kind,
                        int republish_after_s, lc_job_reconcile_stats *st, lc_err *err);

/* Lease keeper: a thread that renews the lease every lease_s/3 seconds on its own
 * connection and sets *lost when the job was taken away (cancel or reconciler). */
typedef struct lc_job_lease lc_job_lease;
lc_rc lc_job_lease_start(const char *db_url, const lc_job_worker *w, const char *job_id,
                         lc_job_lease **out, lc_err *err);
/* 1 once the lease was lost; the worker should abandon the job. */
int lc_job_lease_lost(const lc_job_lease *l);
void lc_job_lease_stop(lc_job_lease *l); /* accepts NULL */

#endif
