/*
 * worker.c: the job loop of storage-uploader and gpu-segmenter (see worker.h). Runs on the
 * main thread: one job event at a time, claim -> lease thread -> job function -> outcome ->
 * offset commit; the reconciler for the worker's job kind runs from the consumer's tick.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lc/event.h"
#include "lc/log.h"
#include "lc/util.h"
#include "lc/worker.h"

#define OFF(f) offsetof(lc_worker_cfg, f)

const lc_cfg_var lc_worker_cfg_vars[] = {
    {"RADPIPE_JOB_LEASE_SECONDS", LC_CFG_INT, "30", 2, 3600, 0, NULL,
     "lease a worker holds on a running job; renewed every third of it", OFF(lease_seconds)},
    {"RADPIPE_JOB_MAX_ATTEMPTS", LC_CFG_INT, "5", 1, 100, 0, NULL,
     "attempts before a job that keeps failing is dead", OFF(max_attempts)},
    {"RADPIPE_RECONCILE_INTERVAL_SECONDS", LC_CFG_INT, "5", 1, 3600, 0, NULL,
     "how often the reconciler looks for expired leases and due retries",
     OFF(reconcile_interval_seconds)},
    {"RADPIPE_REPUBLISH_AFTER_SECONDS", LC_CFG_INT, "60", 1, 86400, 0, NULL,
     "a queued job whose event is older than this is published again",
     OFF(republish_after_seconds)},
};
const size_t lc_worker_cfg_nvars = sizeof(lc_worker_cfg_vars) / sizeof(lc_worker_cfg_vars[0]);

typedef struct worker_ctx {
    lc_service *s;
    const lc_worker_cfg *cfg;
    const char *kind;
    lc_worker_fn fn;
    void *fn_ctx;
    lc_job_worker w;
    int64_t next_reconcile_ms;
    lc_counter *succeeded, *failed, *released, *abandoned, *skipped, *poison;
    lc_histogram *duration;
} worker_ctx;

int lc_worker_job_should_stop(lc_worker_job *j)
{
    if (lc_job_lease_lost(j->lease))
        return 1;
    if (!lc_service_stopping(j->svc))
        return 0;
    if (!j->drain_deadline_ms)
        j->drain_deadline_ms = lc_now_ms() + j->svc->cfg.drain_seconds * 1000;
    return lc_now_ms() >= j->drain_deadline_ms;
}

void lc_worker_job_progress(lc_worker_job *j, long long done, long long total, const char *unit)
{
    lc_err e;
    cJSON *p = cJSON_CreateObject();
    if (!p)
        return;
    cJSON_AddNumberToObject(p, "done", (double)done);
    cJSON_AddNumberToObject(p, "total", (double)total);
    cJSON_AddStringToObject(p, "unit", unit ? unit : "items");
    if (lc_job_progress(j->db, j->w, j->job, p, &e) != LC_OK)
        lc_log_warn("could not record job progress", LC_LS("job_id", j->job->id),
                    LC_LS("error", e.msg));
    cJSON_Delete(p);
}

/* A message that is not a valid job event goes to the DLQ; the partition moves on. */
static lc_rc dead_letter(worker_ctx *c, const lc_kafka_msg *m, const char *why, lc_err *err)
{
    lc_db *db = c->s->db;
    lc_rc rc = lc_db_begin(db, err);
    if (rc == LC_OK)
        rc = lc_outbox_add_dlq(db, c->s->cfg.topic_prefix, c->s->def->name, m->topic, m->partition,
                               m->offset, m->key, m->key_len, m->payload, m->len, why, err);
    if (rc == LC_OK)
        rc = lc_db_commit(db, err);
    else
        lc_db_rollback(db);
    if (rc == LC_OK) {
        lc_counter_inc(c->poison);
        lc_log_warn("message sent to the dead-letter topic", LC_LS("topic", m->topic),
                    LC_LI("partition", m->partition), LC_LI("offset", m->offset),
                    LC_LS("reason", why));
    }
    return rc;
}

static void run_job(worker_ctx *c, lc_job *job)
{
    lc_err e = {0};
    cJSON *result = NULL;
    lc_worker_job j = {.job = job, .svc = c->s, .db = c->s->db, .w = &c->w};
    int64_t t0 = lc_now_ms();
    lc_rc rc = lc_job_lease_start(c->s->cfg.database_url, &c->w, job->id, &j.lease, &e);

    lc_log_info("job started", LC_LS("job_id", job->id), LC_LS("kind", job->kind),
                LC_LI("attempt", job->attempts));
    if (rc == LC_OK)
        rc = c->fn(c->fn_ctx, &j, &result, &e);
    int lost = lc_job_lease_lost(j.lease);
    lc_job_lease_stop(j.lease);
    lc_histogram_observe(c->duration, (double)(lc_now_ms() - t0) / 1000.0);

    lc_err fe;
    lc_rc frc = LC_OK;
    if (lost) {
        /* cancelled, or re-queued after our lease expired: someone else owns it now */
        lc_counter_inc(c->abandoned);
        lc_log_warn("job abandoned: lease lost", LC_LS("job_id", job->id));
    } else if (rc == LC_OK) {
        frc = lc_job_succeed(c->s->db, &c->w, job, result, &fe);
        if (frc == LC_OK) {
            lc_counter_inc(c->succeeded);
            lc_log_info("job succeeded", LC_LS("job_id", job->id), LC_LS("kind", job->kind),
                        LC_LD("seconds", (double)(lc_now_ms() - t0) / 1000.0));
        }
    } else if (rc == LC_ERR_CANCELLED) {
        frc = lc_job_release(c->s->db, &c->w, job, &fe);
        if (frc == LC_OK) {
            lc_counter_inc(c->released);
            lc_log_info("job released for another worker", LC_LS("job_id", job->id));
        }
    } else {
        frc = lc_job_fail(c->s->db, &c->w, job, lc_err_msg(&e), lc_rc_is_transient(rc), &fe);
        if (frc == LC_OK)
            lc_counter_inc(c->failed);
    }
    if (frc != LC_OK) /* the lease will expire and the reconciler re-queues the job */
        lc_log_error("could not record the job outcome", LC_LS("job_id", job->id),
                     LC_LS("error", fe.msg));
    cJSON_Delete(result);
}

static lc_rc handle_batch(void *arg, const lc_kafka_msg *msgs, size_t n, lc_err *err)
{
    worker_ctx *c = arg;
    for (size_t i = 0; i < n; i++) {
        const lc_kafka_msg *m = &msgs[i];
        lc_event *ev = NULL;
        lc_job *job = NULL;
        lc_err e;
        lc_rc rc;

        if ((rc = lc_db_ensure(c->s->db, err)) != LC_OK)
            return rc;
        if (lc_event_parse(m->payload, m->len, &ev, &e) != LC_OK) {
            if ((rc = dead_letter(c, m, e.msg, err)) != LC_OK)
                return rc;
            continue;
        }
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(ev->data, "job_id");
        const cJSON *kind = cJSON_GetObjectItemCaseSensitive(ev->data, "kind");
        if (!cJSON_IsString(id) || !cJSON_IsString(kind) ||
            strcmp(kind->valuestring, c->kind) != 0) {
            rc = dead_letter(c, m, "not a job event for this worker", err);
            lc_event_free(ev);
            if (rc != LC_OK)
                return rc;
            continue;
        }
        rc = lc_job_claim(c->s->db, &c->w, id->valuestring, &job, &e);
        lc_event_free(ev);
        if (rc == LC_ERR_CONFLICT || rc == LC_ERR_NOT_FOUND) {
            /* redelivered or stale event: the job is someone else's or finished */
            lc_counter_inc(c->skipped);
            lc_log_debug("job event skipped", LC_LS("reason", e.msg));
            continue;
        }
        if (rc != LC_OK) {
            lc_err_set(err, rc, "%s", e.msg);
            return rc; /* database trouble: the batch is redelivered */
        }
        run_job(c, job);
        lc_job_free(job);
    }
    return LC_OK;
}

static void tick(void *arg)
{
    worker_ctx *c = arg;
    lc_job_reconcile_stats st;
    lc_err e;
    if (lc_now_ms() < c->next_reconcile_ms)
        return;
    c->next_reconcile_ms = lc_now_ms() + c->cfg->reconcile_interval_seconds * 1000;
    if (lc_db_ensure(c->s->db, &e) != LC_OK ||
        lc_jobs_reconcile(c->s->db, c->s->cfg.topic_prefix, c->s->source, c->kind,
                          (int)c->cfg->republish_after_seconds, &st, &e) != LC_OK)
        lc_log_warn("reconciler pass failed", LC_LS("error", e.msg));
}

lc_rc lc_worker_run(lc_service *s, const lc_worker_cfg *cfg, const char *kind, lc_topic topic,
                    lc_worker_fn fn, void *ctx, lc_err *err)
{
    worker_ctx c = {.s = s, .cfg = cfg, .kind = kind, .fn = fn, .fn_ctx = ctx};
    lc_kafka_consumer *cons = NULL;
    char group[160], labels[64];
    lc_rc rc;

    lc_job_worker_init(&c.w, s->cfg.topic_prefix, s->source, (int)cfg->lease_seconds,
                       (int)cfg->max_attempts);
    snprintf(labels, sizeof(labels), "kind=\"%s\"", kind);
    static const char help[] = "jobs finished by this worker, by outcome";
    char l2[128];
#define OUTCOME(var, name)                                                                         \
    snprintf(l2, sizeof(l2), "%s,outcome=\"%s\"", labels, name);                                   \
    c.var = lc_metrics_counter(s->metrics, "radpipe_jobs_total", help, l2)
    OUTCOME(succeeded, "succeeded");
    OUTCOME(failed, "failed");
    OUTCOME(released, "released");
    OUTCOME(abandoned, "abandoned");
#undef OUTCOME
    c.skipped = lc_metrics_counter(s->metrics, "radpipe_job_events_skipped_total",
                                   "job events for jobs that were not queued", labels);
    c.poison = lc_metrics_counter(s->metrics, "radpipe_dlq_messages_total",
                                  "messages sent to the dead-letter topic", NULL);
    c.duration = lc_metrics_histogram(s->metrics, "radpipe_job_duration_seconds",
                                      "time from claim to outcome", labels, NULL, 0);

    snprintf(group, sizeof(group), "%s%s", s->cfg.topic_prefix, s->def->name);
    /* a handler call lasts as long as one job: allow up to 6 hours between polls */
    rc = lc_kafka_consumer_new(&s->kconf, group, &topic, 1, 6 * 3600 * 1000, &cons, err);
    if (rc != LC_OK)
        return rc;
    lc_log_info("worker ready", LC_LS("kind", kind), LC_LS("owner", c.w.owner),
                LC_LS("group", group));
    lc_kafka_run_opts opts = {.max_batch = 1, .batch_wait_ms = 0, .tick = tick, .idle_ms = 500};
    rc = lc_kafka_consumer_run(cons, &opts, handle_batch, &c, &s->stop, err);
    lc_kafka_consumer_free(cons);
    return rc;
}
