/*
 * jobs.c: the job state machine (see jobs.h). Every transition is one guarded UPDATE whose
 * RETURNING row feeds the job.status (and, for re-queues, job.<kind>) events written to the
 * outbox in the same transaction, so the database and the event stream never disagree.
 * Functions are reentrant; an lc_job_lease owns a thread and a connection of its own.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "lc/event.h"
#include "lc/jobs.h"
#include "lc/kafka.h"
#include "lc/log.h"
#include "lc/outbox.h"
#include "lc/util.h"

static const char *const state_names[] = {"queued", "running", "succeeded",
                                          "failed", "dead",    "cancelled"};

const char *lc_job_state_name(lc_job_state s)
{
    if ((int)s < 0 || (size_t)s >= sizeof(state_names) / sizeof(state_names[0]))
        return "unknown";
    return state_names[s];
}

int lc_job_state_parse(const char *s)
{
    for (size_t i = 0; s && i < sizeof(state_names) / sizeof(state_names[0]); i++)
        if (strcmp(s, state_names[i]) == 0)
            return (int)i;
    return -1;
}

void lc_job_free(lc_job *job)
{
    if (!job)
        return;
    free(job->study_uid);
    cJSON_Delete(job->params);
    free(job);
}

static int kind_topic(const char *kind, lc_topic *t, const char **type)
{
    if (strcmp(kind, "upload") == 0) {
        *t = LC_TOPIC_JOB_UPLOAD;
        *type = LC_EV_JOB_UPLOAD;
        return 1;
    }
    if (strcmp(kind, "segment") == 0) {
        *t = LC_TOPIC_JOB_SEGMENT;
        *type = LC_EV_JOB_SEGMENT;
        return 1;
    }
    return 0;
}

/* The job.<kind> event that wakes a worker. params_json: the job's params as JSON text. */
static lc_rc emit_job(lc_db *db, const char *prefix, const char *source, const char *id,
                      const char *kind, const char *study_uid, const char *params_json, int attempt,
                      lc_err *err)
{
    lc_topic t;
    const char *type;
    lc_event *ev = NULL;
    lc_rc rc;
    if (!kind_topic(kind, &t, &type))
        return lc_err_set(err, LC_ERR_INVALID, "unknown job kind \"%s\"", kind);
    cJSON *data = cJSON_CreateObject();
    cJSON *params = cJSON_Parse(params_json ? params_json : "{}");
    if (!data || !params) {
        cJSON_Delete(data);
        cJSON_Delete(params);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory building a job event");
    }
    cJSON_AddStringToObject(data, "job_id", id);
    cJSON_AddStringToObject(data, "study_instance_uid", study_uid);
    cJSON_AddStringToObject(data, "kind", kind);
    cJSON_AddItemToObject(data, "params", params);
    cJSON_AddNumberToObject(data, "attempt", attempt);
    if ((rc = lc_event_new(type, source, study_uid, data, &ev, err)) != LC_OK)
        return rc;
    rc = lc_outbox_add_event(db, prefix, t, ev, err);
    lc_event_free(ev);
    return rc;
}

/* job.status for a transition; progress/error/artifacts are optional. */
static lc_rc emit_status(lc_db *db, const char *prefix, const char *source, const char *id,
                         const char *kind, const char *study_uid, const char *state, int attempt,
                         const cJSON *progress, const char *error, cJSON *artifacts, lc_err *err)
{
    lc_event *ev = NULL;
    lc_rc rc;
    cJSON *data = cJSON_CreateObject();
    if (!data) {
        cJSON_Delete(artifacts);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory building a job status event");
    }
    cJSON_AddStringToObject(data, "job_id", id);
    cJSON_AddStringToObject(data, "study_instance_uid", study_uid);
    cJSON_AddStringToObject(data, "kind", kind);
    cJSON_AddStringToObject(data, "state", state);
    cJSON_AddNumberToObject(data, "attempt", attempt);
    if (progress)
        cJSON_AddItemToObject(data, "progress", cJSON_Duplicate(progress, 1));
    if (error)
        cJSON_AddStringToObject(data, "error", error);
    if (artifacts)
        cJSON_AddItemToObject(data, "artifacts", artifacts);
    if ((rc = lc_event_new(LC_EV_JOB_STATUS, source, study_uid, data, &ev, err)) != LC_OK)
        return rc;
    rc = lc_outbox_add_event(db, prefix, LC_TOPIC_JOB_STATUS, ev, err);
    lc_event_free(ev);
    return rc;
}

lc_rc lc_job_create(lc_db *db, const char *prefix, const char *source, const char *kind,
                    const char *study_uid, const cJSON *params, const char *dedupe_key,
                    int max_attempts, char id_out[37], int *created, lc_err *err)
{
    lc_topic t;
    const char *type;
    char id[37], maxs[16];
    char *params_json = NULL;
    PGresult *res = NULL;
    lc_rc rc;

    *created = 0;
    if (!kind_topic(kind, &t, &type))
        return lc_err_set(err, LC_ERR_INVALID, "unknown job kind \"%s\"", kind);
    params_json = params ? cJSON_PrintUnformatted(params) : strdup("{}");
    if (!params_json)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    lc_uuid_v4(id);
    snprintf(maxs, sizeof(maxs), "%d", max_attempts > 0 ? max_attempts : 5);
    const char *p[6] = {id, kind, study_uid, params_json, dedupe_key, maxs};
    rc = lc_db_exec(db,
                    "INSERT INTO jobs (id, kind, study_uid, params, dedupe_key, max_attempts) "
                    "VALUES ($1, $2, $3, $4::jsonb, $5, $6) "
                    "ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
                    6, p, &res, err);
    if (rc != LC_OK)
        goto out;
    if (PQntuples(res) == 0) {
        /* a job with this dedupe key exists: report it and write nothing */
        PQclear(res);
        res = NULL;
        const char *q[1] = {dedupe_key};
        rc = lc_db_exec(db, "SELECT id FROM jobs WHERE dedupe_key = $1", 1, q, &res, err);
        if (rc != LC_OK)
            goto out;
        if (PQntuples(res) != 1) {
            rc = lc_err_set(err, LC_ERR_CONFLICT, "job with key \"%s\" vanished", dedupe_key);
            goto out;
        }
        lc_strlcpy(id_out, PQgetvalue(res, 0, 0), 37);
        goto out;
    }
    lc_strlcpy(id_out, id, 37);
    *created = 1;
    if ((rc = emit_job(db, prefix, source, id, kind, study_uid, params_json, 0, err)) != LC_OK)
        goto out;
    rc = emit_status(db, prefix, source, id, kind, study_uid, "queued", 0, NULL, NULL, NULL, err);
out:
    PQclear(res);
    free(params_json);
    return rc;
}

void lc_job_worker_init(lc_job_worker *w, const char *prefix, const char *source, int lease_s,
                        int max_attempts)
{
    char host[64] = "localhost", rnd[37];
    gethostname(host, sizeof(host) - 1);
    host[sizeof(host) - 1] = '\0';
    lc_uuid_v4(rnd);
    rnd[8] = '\0';
    snprintf(w->owner, sizeof(w->owner), "%s:%d:%s", host, (int)getpid(), rnd);
    w->prefix = prefix;
    w->source = source;
    w->lease_s = lease_s > 0 ? lease_s : 30;
    w->max_attempts = max_attempts > 0 ? max_attempts : 5;
}

/* Why a guarded transition matched no row: LC_ERR_NOT_FOUND or LC_ERR_CONFLICT. */
static lc_rc explain_miss(lc_db *db, const char *id, const char *what, lc_err *err)
{
    PGresult *res = NULL;
    const char *p[1] = {id};
    lc_rc rc = lc_db_exec(db, "SELECT state FROM jobs WHERE id = $1", 1, p, &res, err);
    if (rc != LC_OK)
        return rc;
    if (PQntuples(res) == 0)
        rc = lc_err_set(err, LC_ERR_NOT_FOUND, "job %s does not exist", id);
    else
        rc = lc_err_set(err, LC_ERR_CONFLICT, "could not %s job %s: it is %s", what, id,
                        PQgetvalue(res, 0, 0));
    PQclear(res);
    return rc;
}

typedef struct claim_ctx {
    const lc_job_worker *w;
    const char *id;
    lc_job *job;
} claim_ctx;

static lc_rc claim_tx(lc_db *db, void *arg, lc_err *err)
{
    claim_ctx *c = arg;
    PGresult *res = NULL;
    char lease[16];
    lc_rc rc;
    snprintf(lease, sizeof(lease), "%d", c->w->lease_s);
    const char *p[3] = {c->id, c->w->owner, lease};
    rc = lc_db_exec(db,
                    "UPDATE jobs SET state = 'running', lease_owner = $2, "
                    "lease_expires_at = now() + make_interval(secs => $3::int), "
                    "attempts = attempts + 1, started_at = now(), updated_at = now(), "
                    "retry_at = NULL, progress = NULL "
                    "WHERE id = $1 AND state = 'queued' "
                    "RETURNING kind, study_uid, params::text, attempts, max_attempts",
                    3, p, &res, err);
    if (rc != LC_OK)
        return rc;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return explain_miss(db, c->id, "claim", err);
    }
    lc_job *job = calloc(1, sizeof(*job));
    if (!job) {
        PQclear(res);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    lc_strlcpy(job->id, c->id, sizeof(job->id));
    lc_strlcpy(job->kind, PQgetvalue(res, 0, 0), sizeof(job->kind));
    job->study_uid = strdup(PQgetvalue(res, 0, 1));
    job->params = cJSON_Parse(PQgetvalue(res, 0, 2));
    job->attempts = atoi(PQgetvalue(res, 0, 3));
    job->max_attempts = atoi(PQgetvalue(res, 0, 4));
    job->state = LC_JOB_RUNNING;
    PQclear(res);
    if (!job->study_uid || !job->params) {
        lc_job_free(job);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    rc = emit_status(db, c->w->prefix, c->w->source, job->id, job->kind, job->study_uid, "running",
                     job->attempts, NULL, NULL, NULL, err);
    if (rc != LC_OK) {
        lc_job_free(job);
        return rc;
    }
    lc_job_free(c->job); /* from an earlier, retried attempt */
    c->job = job;
    return LC_OK;
}

lc_rc lc_job_claim(lc_db *db, const lc_job_worker *w, const char *job_id, lc_job **out, lc_err *err)
{
    claim_ctx c = {w, job_id, NULL};
    *out = NULL;
    if (!lc_uuid_valid(job_id))
        return lc_err_set(err, LC_ERR_INVALID, "invalid job id \"%.40s\"", job_id);
    lc_rc rc = lc_db_tx(db, 3, claim_tx, &c, err);
    if (rc != LC_OK) {
        lc_job_free(c.job);
        return rc;
    }
    *out = c.job;
    return LC_OK;
}

lc_rc lc_job_renew(lc_db *db, const lc_job_worker *w, const char *job_id, lc_err *err)
{
    PGresult *res = NULL;
    char lease[16];
    snprintf(lease, sizeof(lease), "%d", w->lease_s);
    const char *p[3] = {job_id, w->owner, lease};
    lc_rc rc = lc_db_exec(db,
                          "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => "
                          "$3::int), updated_at = now() "
                          "WHERE id = $1 AND lease_owner = $2 AND state = 'running' RETURNING id",
                          3, p, &res, err);
    if (rc != LC_OK)
        return rc;
    int n = PQntuples(res);
    PQclear(res);
    return n == 1 ? LC_OK : explain_miss(db, job_id, "renew the lease of", err);
}

typedef struct progress_ctx {
    const lc_job_worker *w;
    const lc_job *job;
    const cJSON *progress;
} progress_ctx;

static lc_rc progress_tx(lc_db *db, void *arg, lc_err *err)
{
    progress_ctx *c = arg;
    PGresult *res = NULL;
    char *json = cJSON_PrintUnformatted(c->progress);
    if (!json)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    const char *p[3] = {c->job->id, c->w->owner, json};
    lc_rc rc = lc_db_exec(db,
                          "UPDATE jobs SET progress = $3::jsonb, updated_at = now() "
                          "WHERE id = $1 AND lease_owner = $2 AND state = 'running' RETURNING id",
                          3, p, &res, err);
    free(json);
    if (rc != LC_OK)
        return rc;
    int n = PQntuples(res);
    PQclear(res);
    if (n != 1)
        return explain_miss(db, c->job->id, "record progress of", err);
    return emit_status(db, c->w->prefix, c->w->source, c->job->id, c->job->kind, c->job->study_uid,
                       "running", c->job->attempts, c->progress, NULL, NULL, err);
}

lc_rc lc_job_progress(lc_db *db, const lc_job_worker *w, const lc_job *job, const cJSON *progress,
                      lc_err *err)
{
    progress_ctx c = {w, job, progress};
    return lc_db_tx(db, 3, progress_tx, &c, err);
}

lc_rc lc_job_add_artifact(lc_db *db, const char *job_id, const char *name, const char *store_key,
                          long long size, const char *media_type, lc_err *err)
{
    char sz[32];
    snprintf(sz, sizeof(sz), "%lld", size);
    const char *p[5] = {job_id, name, store_key, sz, media_type};
    return lc_db_exec(db,
                      "INSERT INTO job_artifacts (job_id, name, store_key, size_bytes, media_type) "
                      "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (job_id, name) DO UPDATE SET "
                      "store_key = EXCLUDED.store_key, size_bytes = EXCLUDED.size_bytes, "
                      "media_type = EXCLUDED.media_type, created_at = now()",
                      5, p, NULL, err);
}

/* The artifacts of a job as a JSON array [{name,size,media_type}] (caller owns). */
static lc_rc artifacts_json(lc_db *db, const char *job_id, cJSON **out, lc_err *err)
{
    PGresult *res = NULL;
    const char *p[1] = {job_id};
    lc_rc rc = lc_db_exec(db,
                          "SELECT name, size_bytes, media_type FROM job_artifacts "
                          "WHERE job_id = $1 ORDER BY name",
                          1, p, &res, err);
    if (rc != LC_OK)
        return rc;
    cJSON *arr = cJSON_CreateArray();
    for (int i = 0; arr && i < PQntuples(res); i++) {
        cJSON *a = cJSON_CreateObject();
        cJSON_AddStringToObject(a, "name", PQgetvalue(res, i, 0));
        cJSON_AddNumberToObject(a, "size", strtod(PQgetvalue(res, i, 1), NULL));
        cJSON_AddStringToObject(a, "media_type", PQgetvalue(res, i, 2));
        cJSON_AddItemToArray(arr, a);
    }
    PQclear(res);
    if (!arr)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    *out = arr;
    return LC_OK;
}

typedef struct finish_ctx {
    const lc_job_worker *w;
    const lc_job *job;
    const cJSON *result;
    const char *error;
    int transient;
    char state[16]; /* out: the state the job ended in */
} finish_ctx;

static lc_rc succeed_tx(lc_db *db, void *arg, lc_err *err)
{
    finish_ctx *c = arg;
    PGresult *res = NULL;
    cJSON *arts = NULL;
    char *json = c->result ? cJSON_PrintUnformatted(c->result) : NULL;
    if (c->result && !json)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    const char *p[3] = {c->job->id, c->w->owner, json};
    lc_rc rc = lc_db_exec(db,
                          "UPDATE jobs SET state = 'succeeded', result = $3::jsonb, error = NULL, "
                          "lease_owner = NULL, lease_expires_at = NULL, finished_at = now(), "
                          "updated_at = now() "
                          "WHERE id = $1 AND lease_owner = $2 AND state = 'running' RETURNING id",
                          3, p, &res, err);
    free(json);
    if (rc != LC_OK)
        return rc;
    int n = PQntuples(res);
    PQclear(res);
    if (n != 1)
        return explain_miss(db, c->job->id, "complete", err);
    if ((rc = artifacts_json(db, c->job->id, &arts, err)) != LC_OK)
        return rc;
    lc_strlcpy(c->state, "succeeded", sizeof(c->state));
    return emit_status(db, c->w->prefix, c->w->source, c->job->id, c->job->kind, c->job->study_uid,
                       "succeeded", c->job->attempts, NULL, NULL, arts, err);
}

lc_rc lc_job_succeed(lc_db *db, const lc_job_worker *w, const lc_job *job, const cJSON *result,
                     lc_err *err)
{
    finish_ctx c = {.w = w, .job = job, .result = result};
    return lc_db_tx(db, 3, succeed_tx, &c, err);
}

/* Retry backoff: 5 s doubling per attempt, capped at 10 minutes, with 50-100 % jitter so
 * jobs that failed together do not retry together. */
static int backoff_seconds(int attempts)
{
    unsigned int r = 0;
    int base = 5;
    for (int i = 1; i < attempts && base < 600; i++)
        base *= 2;
    if (base > 600)
        base = 600;
    lc_random_bytes(&r, sizeof(r));
    return base / 2 + (int)(r % (unsigned int)(base / 2 + 1));
}

static lc_rc fail_tx(lc_db *db, void *arg, lc_err *err)
{
    finish_ctx *c = arg;
    PGresult *res = NULL;
    char backoff[16];
    snprintf(backoff, sizeof(backoff), "%d", backoff_seconds(c->job->attempts));
    const char *p[5] = {c->job->id, c->w->owner, c->error, c->transient ? "true" : "false",
                        backoff};
    lc_rc rc = lc_db_exec(
        db,
        "UPDATE jobs SET "
        "state = CASE WHEN $4::bool AND attempts < max_attempts THEN 'failed' ELSE 'dead' END, "
        "retry_at = CASE WHEN $4::bool AND attempts < max_attempts "
        "  THEN now() + make_interval(secs => $5::int) END, "
        "finished_at = CASE WHEN $4::bool AND attempts < max_attempts THEN NULL ELSE now() END, "
        "error = $3, lease_owner = NULL, lease_expires_at = NULL, updated_at = now() "
        "WHERE id = $1 AND lease_owner = $2 AND state = 'running' RETURNING state",
        5, p, &res, err);
    if (rc != LC_OK)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return explain_miss(db, c->job->id, "fail", err);
    }
    lc_strlcpy(c->state, PQgetvalue(res, 0, 0), sizeof(c->state));
    PQclear(res);
    return emit_status(db, c->w->prefix, c->w->source, c->job->id, c->job->kind, c->job->study_uid,
                       c->state, c->job->attempts, NULL, c->error, NULL, err);
}

lc_rc lc_job_fail(lc_db *db, const lc_job_worker *w, const lc_job *job, const char *error,
                  int transient, lc_err *err)
{
    finish_ctx c = {
        .w = w, .job = job, .error = error ? error : "unknown error", .transient = transient};
    lc_rc rc = lc_db_tx(db, 3, fail_tx, &c, err);
    if (rc == LC_OK)
        lc_log_warn("job failed", LC_LS("job_id", job->id), LC_LS("kind", job->kind),
                    LC_LS("state", c.state), LC_LI("attempt", job->attempts),
                    LC_LS("error", c.error));
    return rc;
}

static lc_rc release_tx(lc_db *db, void *arg, lc_err *err)
{
    finish_ctx *c = arg;
    PGresult *res = NULL;
    const char *p[2] = {c->job->id, c->w->owner};
    lc_rc rc = lc_db_exec(db,
                          "UPDATE jobs SET state = 'queued', attempts = greatest(attempts - 1, 0), "
                          "lease_owner = NULL, lease_expires_at = NULL, published_at = now(), "
                          "updated_at = now() "
                          "WHERE id = $1 AND lease_owner = $2 AND state = 'running' "
                          "RETURNING params::text, attempts",
                          2, p, &res, err);
    if (rc != LC_OK)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return explain_miss(db, c->job->id, "release", err);
    }
    int attempts = atoi(PQgetvalue(res, 0, 1));
    rc = emit_job(db, c->w->prefix, c->w->source, c->job->id, c->job->kind, c->job->study_uid,
                  PQgetvalue(res, 0, 0), attempts, err);
    PQclear(res);
    if (rc != LC_OK)
        return rc;
    return emit_status(db, c->w->prefix, c->w->source, c->job->id, c->job->kind, c->job->study_uid,
                       "queued", attempts, NULL, NULL, NULL, err);
}

lc_rc lc_job_release(lc_db *db, const lc_job_worker *w, const lc_job *job, lc_err *err)
{
    finish_ctx c = {.w = w, .job = job};
    return lc_db_tx(db, 3, release_tx, &c, err);
}

/* --- API transitions: cancel, retry ---------------------------------------------------- */

typedef struct api_ctx {
    const char *prefix, *source, *id, *reason;
} api_ctx;

static lc_rc cancel_tx(lc_db *db, void *arg, lc_err *err)
{
    api_ctx *c = arg;
    PGresult *res = NULL;
    const char *p[2] = {c->id, c->reason};
    lc_rc rc = lc_db_exec(db,
                          "UPDATE jobs SET state = 'cancelled', error = coalesce($2, error), "
                          "lease_owner = NULL, lease_expires_at = NULL, retry_at = NULL, "
                          "finished_at = now(), updated_at = now() "
                          "WHERE id = $1 AND state IN ('queued', 'running') "
                          "RETURNING kind, study_uid, attempts, error",
                          2, p, &res, err);
    if (rc != LC_OK)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return explain_miss(db, c->id, "cancel", err);
    }
    rc = emit_status(db, c->prefix, c->source, c->id, PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1),
                     "cancelled", atoi(PQgetvalue(res, 0, 2)), NULL,
                     PQgetisnull(res, 0, 3) ? NULL : PQgetvalue(res, 0, 3), NULL, err);
    PQclear(res);
    return rc;
}

lc_rc lc_job_cancel(lc_db *db, const char *prefix, const char *source, const char *job_id,
                    const char *reason, lc_err *err)
{
    api_ctx c = {prefix, source, job_id, reason};
    if (!lc_uuid_valid(job_id))
        return lc_err_set(err, LC_ERR_INVALID, "invalid job id \"%.40s\"", job_id);
    return lc_db_tx(db, 3, cancel_tx, &c, err);
}

static lc_rc retry_tx(lc_db *db, void *arg, lc_err *err)
{
    api_ctx *c = arg;
    PGresult *res = NULL;
    const char *p[1] = {c->id};
    lc_rc rc = lc_db_exec(db,
                          "UPDATE jobs SET state = 'queued', attempts = 0, error = NULL, "
                          "result = NULL, progress = NULL, retry_at = NULL, started_at = NULL, "
                          "finished_at = NULL, lease_owner = NULL, lease_expires_at = NULL, "
                          "published_at = now(), updated_at = now() "
                          "WHERE id = $1 AND state IN ('failed', 'dead', 'cancelled') "
                          "RETURNING kind, study_uid, params::text",
                          1, p, &res, err);
    if (rc != LC_OK)
        return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return explain_miss(db, c->id, "retry", err);
    }
    const char *kind = PQgetvalue(res, 0, 0), *study = PQgetvalue(res, 0, 1);
    rc = emit_job(db, c->prefix, c->source, c->id, kind, study, PQgetvalue(res, 0, 2), 0, err);
    if (rc == LC_OK)
        rc = emit_status(db, c->prefix, c->source, c->id, kind, study, "queued", 0, NULL, NULL,
                         NULL, err);
    PQclear(res);
    return rc;
}

lc_rc lc_job_retry(lc_db *db, const char *prefix, const char *source, const char *job_id,
                   lc_err *err)
{
    api_ctx c = {prefix, source, job_id, NULL};
    if (!lc_uuid_valid(job_id))
        return lc_err_set(err, LC_ERR_INVALID, "invalid job id \"%.40s\"", job_id);
    return lc_db_tx(db, 3, retry_tx, &c, err);
}

/* --- reconciler ------------------------------------------------------------------------ */

typedef struct reconcile_ctx {
    const char *prefix, *source, *kind;
    int republish_after_s;
    lc_job_reconcile_stats st;
} reconcile_ctx;

/* For each returned row (id, kind, study_uid, params, attempts, state): the job event when
 * queued and the status event. */
static lc_rc publish_rows(lc_db *db, reconcile_ctx *c, PGresult *res, const char *why, lc_err *err)
{
    for (int i = 0; i < PQntuples(res); i++) {
        const char *id = PQgetvalue(res, i, 0), *kind = PQgetvalue(res, i, 1);
        const char *study = PQgetvalue(res, i, 2), *params = PQgetvalue(res, i, 3);
        const char *state = PQgetvalue(res, i, 5);
        int attempts = atoi(PQgetvalue(res, i, 4));
        lc_rc rc;
        if (strcmp(state, "queued") == 0) {
            rc = emit_job(db, c->prefix, c->source, id, kind, study, params, attempts, err);
            if (rc != LC_OK)
                return rc;
        }
        rc = emit_status(db, c->prefix, c->source, id, kind, study, state, attempts, NULL,
                         PQgetisnull(res, i, 6) ? NULL : PQgetvalue(res, i, 6), NULL, err);
        if (rc != LC_OK)
            return rc;
        lc_log_info("reconciler", LC_LS("action", why), LC_LS("job_id", id), LC_LS("kind", kind),
                    LC_LS("state", state));
    }
    return LC_OK;
}

static lc_rc reconcile_tx(lc_db *db, void *arg, lc_err *err)
{
    reconcile_ctx *c = arg;
    PGresult *res = NULL;
    char after[16];
    lc_rc rc;
    memset(&c->st, 0, sizeof(c->st));
    snprintf(after, sizeof(after), "%d", c->republish_after_s);
    const char *p1[1] = {c->kind};
    /* 1. running jobs whose worker stopped renewing its lease */
    rc = lc_db_exec(
        db,
        "UPDATE jobs SET "
        "state = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'queued' END, "
        "finished_at = CASE WHEN attempts >= max_attempts THEN now() END, "
        "error = 'lease expired: worker ' || coalesce(lease_owner, '?') || ' stopped renewing', "
        "lease_owner = NULL, lease_expires_at = NULL, published_at = now(), updated_at = now() "
        "WHERE id IN (SELECT id FROM jobs WHERE state = 'running' AND lease_expires_at < now() "
        "  AND ($1::text IS NULL OR kind = $1) ORDER BY lease_expires_at LIMIT 100 "
        "  FOR UPDATE SKIP LOCKED) "
        "RETURNING id, kind, study_uid, params::text, attempts, state, error",
        1, p1, &res, err);
    if (rc != LC_OK)
        return rc;
    for (int i = 0; i < PQntuples(res); i++) {
        if (strcmp(PQgetvalue(res, i, 5), "dead") == 0)
            c->st.dead++;
        else
            c->st.requeued_expired++;
    }
    rc = publish_rows(db, c, res, "lease expired", err);
    PQclear(res);
    if (rc != LC_OK)
        return rc;
    /* 2. failed jobs whose retry time has come */
    rc = lc_db_exec(db,
                    "UPDATE jobs SET state = 'queued', retry_at = NULL, published_at = now(), "
                    "updated_at = now() "
                    "WHERE id IN (SELECT id FROM jobs WHERE state = 'failed' AND retry_at <= now() "
                    "  AND ($1::text IS NULL OR kind = $1) ORDER BY retry_at LIMIT 100 "
                    "  FOR UPDATE SKIP LOCKED) "
                    "RETURNING id, kind, study_uid, params::text, attempts, state, NULL::text",
                    1, p1, &res, err);
    if (rc != LC_OK)
        return rc;
    c->st.requeued_retry = PQntuples(res);
    rc = publish_rows(db, c, res, "retry", err);
    PQclear(res);
    if (rc != LC_OK)
        return rc;
    /* 3. queued jobs whose event may have been lost */
    const char *p3[2] = {c->kind, after};
    rc = lc_db_exec(db,
                    "UPDATE jobs SET published_at = now() "
                    "WHERE id IN (SELECT id FROM jobs WHERE state = 'queued' "
                    "  AND published_at < now() - make_interval(secs => $2::int) "
                    "  AND ($1::text IS NULL OR kind = $1) ORDER BY published_at LIMIT 100 "
                    "  FOR UPDATE SKIP LOCKED) "
                    "RETURNING id, kind, study_uid, params::text, attempts, state, NULL::text",
                    2, p3, &res, err);
    if (rc != LC_OK)
        return rc;
    c->st.republished = PQntuples(res);
    rc = publish_rows(db, c, res, "republish", err);
    PQclear(res);
    return rc;
}

lc_rc lc_jobs_reconcile(lc_db *db, const char *prefix, const char *source, const char *kind,
                        int republish_after_s, lc_job_reconcile_stats *st, lc_err *err)
{
    reconcile_ctx c = {prefix, source, kind, republish_after_s, {0}};
    lc_rc rc = lc_db_tx(db, 3, reconcile_tx, &c, err);
    if (st)
        *st = c.st;
    return rc;
}

/* --- lease keeper ---------------------------------------------------------------------- */

struct lc_job_lease {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stopping;
    atomic_int lost;
    lc_db *db;
    const lc_job_worker *w;
    char job_id[37];
};

static void *lease_main(void *arg)
{
    lc_job_lease *l = arg;
    int period_ms = l->w->lease_s * 1000 / 3;
    if (period_ms < 200)
        period_ms = 200;
    pthread_mutex_lock(&l->mu);
    while (!l->stopping) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += period_ms / 1000;
        ts.tv_nsec += (long)(period_ms % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&l->cv, &l->mu, &ts);
        if (l->stopping)
            break;
        pthread_mutex_unlock(&l->mu);
        lc_err e;
        lc_rc rc = lc_db_ensure(l->db, &e);
        if (rc == LC_OK)
            rc = lc_job_renew(l->db, l->w, l->job_id, &e);
        pthread_mutex_lock(&l->mu);
        if (rc == LC_ERR_CONFLICT || rc == LC_ERR_NOT_FOUND) {
            atomic_store(&l->lost, 1);
            lc_log_warn("job lease lost", LC_LS("job_id", l->job_id), LC_LS("error", e.msg));
            break;
        }
        if (rc != LC_OK) /* database unreachable: keep trying until the lease is really gone */
            lc_log_warn("could not renew job lease", LC_LS("job_id", l->job_id),
                        LC_LS("error", e.msg));
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

lc_rc lc_job_lease_start(const char *db_url, const lc_job_worker *w, const char *job_id,
                         lc_job_lease **out, lc_err *err)
{
    lc_job_lease *l = calloc(1, sizeof(*l));
    if (!l)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    lc_rc rc = lc_db_connect(db_url, 10000, NULL, &l->db, err);
    if (rc != LC_OK) {
        free(l);
        return rc;
    }
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
    atomic_init(&l->lost, 0);
    l->w = w;
    lc_strlcpy(l->job_id, job_id, sizeof(l->job_id));
    if (pthread_create(&l->thread, NULL, lease_main, l) != 0) {
        lc_db_free(l->db);
        pthread_mutex_destroy(&l->mu);
        pthread_cond_destroy(&l->cv);
        free(l);
        return lc_err_set(err, LC_ERR_INTERNAL, "could not start the lease thread");
    }
    *out = l;
    return LC_OK;
}

int lc_job_lease_lost(const lc_job_lease *l)
{
    return l && atomic_load(&l->lost);
}

void lc_job_lease_stop(lc_job_lease *l)
{
    if (!l)
        return;
    pthread_mutex_lock(&l->mu);
    l->stopping = 1;
    pthread_cond_signal(&l->cv);
    pthread_mutex_unlock(&l->mu);
    pthread_join(l->thread, NULL);
    lc_db_free(l->db);
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv);
    free(l);
}
