/*
 * idx_complete.c: study completion. A study stays dirty while instances arrive; once it has
 * been quiet for RADPIPE_STUDY_QUIET_SECONDS one transaction bumps its completed_version and
 * writes the study.completed event and its upload and segment jobs (deduplicated per version,
 * so a retried pass creates nothing twice). SKIP LOCKED lets several indexers share the work.
 * Runs on the consuming thread from the consumer's tick.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "idx.h"
#include "lc/jobs.h"
#include "lc/log.h"
#include "lc/outbox.h"
#include "lc/util.h"

#define PAGE          100 /* studies per completion transaction */
#define TICK_EVERY_MS 1000
#define TX_ATTEMPTS   3

static const char complete_sql[] =
    "WITH c AS ("
    " UPDATE studies SET dirty = false, completed_version = completed_version + 1,"
    " completed_at = now(), updated_at = now()"
    " WHERE study_uid IN (SELECT study_uid FROM studies WHERE dirty"
    "  AND last_instance_at <= now() - make_interval(secs => $1::float8)"
    "  ORDER BY last_instance_at LIMIT $2::int FOR UPDATE SKIP LOCKED)"
    " RETURNING study_uid, completed_version, num_series, num_instances, last_instance_at)"
    " SELECT c.study_uid, c.completed_version, c.num_series, c.num_instances,"
    " COALESCE((SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object("
    "   'series_instance_uid', se.series_uid, 'modality', se.modality,"
    "   'num_instances', se.num_instances)) ORDER BY se.series_number NULLS LAST, se.series_uid)"
    "  FROM series se WHERE se.study_uid = c.study_uid), '[]'::jsonb)::text"
    " FROM c ORDER BY c.last_instance_at, c.study_uid";

typedef struct done_study {
    char uid[65];
    int version;
} done_study;

typedef struct complete_tx {
    idx_ctx *x;
    int n; /* studies completed by the latest attempt */
    done_study done[PAGE];
} complete_tx;

static lc_rc emit_completed(lc_db *db, idx_ctx *x, const char *uid, int version, int nseries,
                            int ninstances, const char *series_json, lc_err *err)
{
    lc_event *ev = NULL;
    lc_err verr = {0};
    cJSON *data = cJSON_CreateObject();
    cJSON *series = cJSON_Parse(series_json);
    if (!data || !series || !cJSON_AddItemToObject(data, "series", series)) {
        cJSON_Delete(series);
        cJSON_Delete(data);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory building a study.completed event");
    }
    if (!cJSON_AddStringToObject(data, "study_instance_uid", uid) ||
        !cJSON_AddNumberToObject(data, "version", version) ||
        !cJSON_AddBoolToObject(data, "amended", version > 1) ||
        !cJSON_AddNumberToObject(data, "num_series", nseries) ||
        !cJSON_AddNumberToObject(data, "num_instances", ninstances) ||
        !cJSON_AddStringToObject(data, "reason", "quiet")) {
        cJSON_Delete(data);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory building a study.completed event");
    }
    /* our own events must pass the checks every consumer applies */
    lc_rc rc = lc_event_validate_data(LC_EV_STUDY_COMPLETED, data, &verr);
    if (rc != LC_OK) {
        cJSON_Delete(data);
        return lc_err_set(err, LC_ERR_INTERNAL, "study.completed event is invalid: %s",
                          lc_err_msg(&verr));
    }
    if ((rc = lc_event_new(LC_EV_STUDY_COMPLETED, x->source, uid, data, &ev, err)) != LC_OK)
        return rc;
    rc = lc_outbox_add_event(db, x->prefix, LC_TOPIC_STUDY_COMPLETED, ev, err);
    lc_event_free(ev);
    return rc;
}

static lc_rc create_jobs(lc_db *db, idx_ctx *x, const char *uid, int version, lc_err *err)
{
    static const char *const kinds[] = {"upload", "segment"};
    lc_rc rc = LC_OK;
    cJSON *params = cJSON_CreateObject();
    if (!params)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]) && rc == LC_OK; k++) {
        char key[256], id[37];
        int created = 0;
        snprintf(key, sizeof(key), "%s:v%d:%s", uid, version, kinds[k]);
        rc = lc_job_create(db, x->prefix, x->source, kinds[k], uid, params, key,
                           (int)x->cfg.job_max_attempts, id, &created, err);
    }
    cJSON_Delete(params);
    return rc;
}

static lc_rc complete_fn(lc_db *db, void *ctx, lc_err *err)
{
    complete_tx *t = ctx;
    idx_ctx *x = t->x;
    PGresult *res = NULL;
    char quiet[32], page[16];
    snprintf(quiet, sizeof(quiet), "%lld", x->cfg.quiet_seconds);
    snprintf(page, sizeof(page), "%d", PAGE);
    const char *p[2] = {quiet, page};
    t->n = 0;
    lc_rc rc = lc_db_exec(db, complete_sql, 2, p, &res, err);
    for (int r = 0; rc == LC_OK && r < PQntuples(res) && r < PAGE; r++) {
        const char *uid = PQgetvalue(res, r, 0);
        int version = atoi(PQgetvalue(res, r, 1));
        rc = emit_completed(db, x, uid, version, atoi(PQgetvalue(res, r, 2)),
                            atoi(PQgetvalue(res, r, 3)), PQgetvalue(res, r, 4), err);
        if (rc == LC_OK)
            rc = create_jobs(db, x, uid, version, err);
        if (rc == LC_OK) {
            lc_strlcpy(t->done[t->n].uid, uid, sizeof(t->done[t->n].uid));
            t->done[t->n++].version = version;
        }
    }
    PQclear(res);
    return rc;
}

lc_rc idx_complete_run(idx_ctx *x, int *completed, lc_err *err)
{
    complete_tx *t = calloc(1, sizeof(*t));
    if (completed)
        *completed = 0;
    if (!t)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    t->x = x;
    lc_rc rc = lc_db_tx(x->db, TX_ATTEMPTS, complete_fn, t, err);
    if (rc != LC_OK) {
        lc_err_wrap(err, "could not complete studies");
        goto out;
    }
    for (int i = 0; i < t->n; i++)
        lc_log_info("study completed", LC_LS("study_uid", t->done[i].uid),
                    LC_LI("version", t->done[i].version), LC_LS("reason", "quiet"));
    lc_counter_add(x->m_completed, t->n);
    if (completed)
        *completed = t->n;
out:
    free(t);
    return rc;
}

void idx_tick(void *ctx)
{
    idx_ctx *x = ctx;
    int64_t now = lc_now_ms();
    int n = 0;
    lc_err err = {0};
    if (now < x->next_complete_ms)
        return;
    lc_rc rc = idx_complete_run(x, &n, &err);
    if (rc != LC_OK)
        lc_log_warn("study completion failed, retrying later", LC_LS("error", lc_err_msg(&err)));
    /* a full page means more are waiting: go on at the next tick */
    x->next_complete_ms = rc == LC_OK && n == PAGE ? now : now + TICK_EVERY_MS;
}
