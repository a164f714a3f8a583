/*
 * idx_complete.c: study completion. A study stays dirty while instances arrive; a pass about
 * once a second completes dirty studies whose completion settings (the first "completion"
 * entry of the rules matching the study's source, else RADPIPE_STUDY_QUIET_SECONDS) say so:
 * an explicit close, the listed series received, the expected counts reached, or the quiet
 * period over. One transaction locks them (FOR UPDATE SKIP LOCKED, so replicas share the
 * work), bumps completed_version, records which series are new in this version, writes
 * study.completed and the jobs the routing rules plan (deduplicated per version, rule and
 * action). Also the SIGHUP reload of the rules. Runs on the consuming thread from its tick.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "idx.h"
#include "idx_rules.h"
#include "lc/jobs.h"
#include "lc/log.h"
#include "lc/outbox.h"
#include "lc/util.h"

#define PAGE          100  /* studies per completion transaction */
#define CANDIDATES    1000 /* dirty studies looked at per pass (oldest first) */
#define TICK_EVERY_MS 1000
#define TX_ATTEMPTS   3

static const char cand_sql[] =
    "SELECT s.study_uid, c.source_kind, c.source_name,"
    " extract(epoch FROM now() - s.last_instance_at)::float8,"
    " c.close_requested_at IS NOT NULL, COALESCE(c.series_listed_done, false)"
    " FROM studies s LEFT JOIN study_completion c ON c.study_uid = s.study_uid"
    " WHERE s.dirty ORDER BY s.last_instance_at, s.study_uid LIMIT $1::int";

static const char descs_sql[] =
    "SELECT se.study_uid, jsonb_agg(se.series_description)::text FROM series se"
    " WHERE se.study_uid = ANY (ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))"
    " AND se.num_instances > 0 GROUP BY se.study_uid";

/* Studies of $1 whose every series has an expected count it has reached. A series' count is
 * expected from consistent header hints only: ImagesInAcquisition (all instances agree, one
 * AcquisitionNumber at most) and NumberOfTemporalPositions x distinct ImagePositionPatient
 * (all agree, > 1, every instance positioned); when both exist they must agree. */
#define HINT(tag)                                                                                  \
    "CASE WHEN (m.json->'" tag "'->'Value'->>0) ~ '^[0-9]{1,9}$'"                                  \
    " THEN (m.json->'" tag "'->'Value'->>0)::int END"
static const char counts_sql[] =
    "WITH u AS (SELECT ARRAY(SELECT jsonb_array_elements_text($1::jsonb)) AS uids),"
    " per AS (SELECT i.study_uid, i.series_uid, count(*) AS n,"
    "  count(*) FILTER (WHERE h.iia IS NULL) AS iia_missing, min(h.iia) AS iia_min,"
    "  max(h.iia) AS iia_max, count(*) FILTER (WHERE h.ntp IS NULL) AS ntp_missing,"
    "  min(h.ntp) AS ntp_min, max(h.ntp) AS ntp_max, count(DISTINCT h.acq) AS nacq,"
    "  count(DISTINCT i.image_position) AS npos, count(i.image_position) AS with_pos"
    "  FROM instances i LEFT JOIN instance_metadata m ON m.sop_uid = i.sop_uid"
    "  CROSS JOIN LATERAL (SELECT " HINT("00201002") " AS iia, " HINT(
        "00200105") " AS ntp,"
                    "   m.json->'00200012'->'Value'->>0 AS acq) h"
                    "  WHERE i.study_uid = ANY ((SELECT uids FROM u)::text[])"
                    "  GROUP BY i.study_uid, i.series_uid),"
                    " e AS (SELECT study_uid, n,"
                    "  CASE WHEN iia_missing = 0 AND iia_min = iia_max AND iia_min > 0 AND nacq <= "
                    "1"
                    "   THEN iia_min END AS e1,"
                    "  CASE WHEN ntp_missing = 0 AND ntp_min = ntp_max AND ntp_min > 1 AND "
                    "with_pos = n"
                    "   THEN ntp_min * npos END AS e2 FROM per)"
                    " SELECT study_uid FROM e GROUP BY study_uid"
                    " HAVING bool_and(COALESCE(e1, e2) IS NOT NULL AND (e1 IS NULL OR e2 IS NULL "
                    "OR e1 = e2)"
                    "  AND n = COALESCE(e1, e2))";

static const char lock_sql[] =
    "SELECT study_uid FROM studies WHERE dirty"
    " AND study_uid = ANY (ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))"
    " ORDER BY last_instance_at, study_uid FOR UPDATE SKIP LOCKED";

static const char bump_sql[] =
    "UPDATE studies SET dirty = false, completed_version = completed_version + 1,"
    " completed_at = now(), updated_at = now() WHERE study_uid = $1"
    " RETURNING completed_version, num_series, num_instances";

/* Every series with its instance count and fingerprint now and at its latest version. */
static const char series_sql[] =
    "SELECT se.series_uid, se.modality, f.n, f.r, p.num_instances, p.replaced_sum"
    " FROM series se"
    " CROSS JOIN LATERAL (SELECT count(*)::int AS n,"
    "  COALESCE(sum(i.replaced_count), 0)::bigint AS r"
    "  FROM instances i WHERE i.series_uid = se.series_uid) f"
    " LEFT JOIN LATERAL (SELECT v.num_instances, v.replaced_sum FROM series_versions v"
    "  WHERE v.series_uid = se.series_uid ORDER BY v.version DESC LIMIT 1) p ON true"
    " WHERE se.study_uid = $1 ORDER BY se.series_number NULLS LAST, se.series_uid";

static const char record_sql[] =
    "INSERT INTO series_versions (series_uid, study_uid, version, num_instances, replaced_sum)"
    " SELECT r.series_uid, $1, $2::int, r.n, r.r"
    " FROM jsonb_to_recordset($3::jsonb) AS r(series_uid text, n int, r bigint)"
    " ON CONFLICT (series_uid, version) DO NOTHING";

/* After a completion: the close it applied is done; remember that the listed series held. */
static const char state_sql[] =
    "INSERT INTO study_completion AS c (study_uid, series_listed_done) VALUES ($1, $2::boolean)"
    " ON CONFLICT (study_uid) DO UPDATE SET"
    " series_listed_done = c.series_listed_done OR EXCLUDED.series_listed_done,"
    " close_reason = CASE WHEN c.close_requested_at <= now() THEN NULL ELSE c.close_reason END,"
    " close_requested_at = CASE WHEN c.close_requested_at <= now() THEN NULL"
    "  ELSE c.close_requested_at END, updated_at = now()";

static const char job_meta_sql[] = "UPDATE jobs SET priority = $2::int, rule = NULLIF($3, '')"
                                   " WHERE id = $1::uuid";

typedef struct cand {
    char uid[65];
    char *kind, *name; /* the study's source, NULL when unknown */
    double age;        /* seconds since its last new instance */
    int close, listed_done;
    const idx_completion *c; /* NULL: defaults */
    int listed;              /* 1: the listed series are all there (-1: no list) */
    int counts;              /* 1: expected counts reached */
    const char *reason;      /* set when due */
} cand;

typedef struct done_study {
    char uid[65];
    int version;
    const char *reason;
    int new_series;
    int jobs;
} done_study;

typedef struct complete_tx {
    idx_ctx *x;
    cand *cands;
    size_t ncands;
    int n; /* studies completed by the latest attempt */
    done_study done[PAGE];
} complete_tx;

static void cands_free(complete_tx *t)
{
    for (size_t i = 0; i < t->ncands; i++) {
        free(t->cands[i].kind);
        free(t->cands[i].name);
    }
    free(t->cands);
    t->cands = NULL;
    t->ncands = 0;
}

static cand *find_cand(complete_tx *t, const char *uid)
{
    for (size_t i = 0; i < t->ncands; i++)
        if (strcmp(t->cands[i].uid, uid) == 0)
            return &t->cands[i];
    return NULL;
}

/* JSON array text of the uids of the candidates pred selects; NULL when none (or ENOMEM:
 * *nomem set). */
static char *uid_array(complete_tx *t, int (*pred)(const cand *), int *nomem)
{
    cJSON *a = cJSON_CreateArray();
    int any = 0;
    for (size_t i = 0; a && i < t->ncands; i++) {
        if (!pred(&t->cands[i]))
            continue;
        cJSON *s = cJSON_CreateString(t->cands[i].uid);
        if (!s || !cJSON_AddItemToArray(a, s)) {
            cJSON_Delete(s);
            cJSON_Delete(a);
            a = NULL;
        }
        any = 1;
    }
    char *out = a && any ? cJSON_PrintUnformatted(a) : NULL;
    *nomem = !a || (any && !out);
    cJSON_Delete(a);
    return out;
}

static int wants_listed(const cand *c)
{
    return c->c && c->c->series_needed && !c->listed_done;
}

static int wants_counts(const cand *c)
{
    return c->c && c->c->expected_counts && !c->close;
}

static int is_due(const cand *c)
{
    return c->reason != NULL;
}

static lc_rc load_cands(lc_db *db, complete_tx *t, lc_err *err)
{
    PGresult *res = NULL;
    char lim[16];
    snprintf(lim, sizeof(lim), "%d", CANDIDATES);
    const char *p[1] = {lim};
    lc_rc rc = lc_db_exec(db, cand_sql, 1, p, &res, err);
    if (rc != LC_OK)
        return rc;
    int n = PQntuples(res);
    if (n > 0 && !(t->cands = calloc((size_t)n, sizeof(*t->cands)))) {
        PQclear(res);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    for (int r = 0; r < n; r++) {
        cand *c = &t->cands[t->ncands++];
        lc_strlcpy(c->uid, PQgetvalue(res, r, 0), sizeof(c->uid));
        if ((!PQgetisnull(res, r, 1) && !(c->kind = strdup(PQgetvalue(res, r, 1)))) ||
            (!PQgetisnull(res, r, 2) && !(c->name = strdup(PQgetvalue(res, r, 2))))) {
            PQclear(res);
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        }
        c->age = atof(PQgetvalue(res, r, 3));
        c->close = PQgetvalue(res, r, 4)[0] == 't';
        c->listed_done = PQgetvalue(res, r, 5)[0] == 't';
        c->c = idx_rules_completion_for(t->x->rules, c->kind, c->name);
        c->listed = -1;
    }
    PQclear(res);
    return LC_OK;
}

/* c->listed for the candidates with a series list not yet satisfied. */
static lc_rc check_listed(lc_db *db, complete_tx *t, lc_err *err)
{
    int nomem = 0;
    PGresult *res = NULL;
    char *uids = uid_array(t, wants_listed, &nomem);
    if (nomem)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    if (!uids)
        return LC_OK;
    for (size_t i = 0; i < t->ncands; i++)
        if (wants_listed(&t->cands[i]))
            t->cands[i].listed = 0;
    const char *p[1] = {uids};
    lc_rc rc = lc_db_exec(db, descs_sql, 1, p, &res, err);
    for (int r = 0; rc == LC_OK && r < PQntuples(res); r++) {
        cand *c = find_cand(t, PQgetvalue(res, r, 0));
        cJSON *a = cJSON_Parse(PQgetvalue(res, r, 1));
        size_t n = (size_t)cJSON_GetArraySize(a), k = 0;
        char **descs = calloc(n ? n : 1, sizeof(*descs));
        if (!a || !descs) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        } else if (c) {
            const cJSON *e;
            cJSON_ArrayForEach(e, a) descs[k++] = cJSON_IsString(e) ? e->valuestring : NULL;
            c->listed = idx_sexpr_match(c->c->series_needed, descs, n);
        }
        free(descs);
        cJSON_Delete(a);
    }
    PQclear(res);
    free(uids);
    return rc;
}

static lc_rc check_counts(lc_db *db, complete_tx *t, lc_err *err)
{
    int nomem = 0;
    PGresult *res = NULL;
    char *uids = uid_array(t, wants_counts, &nomem);
    if (nomem)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    if (!uids)
        return LC_OK;
    const char *p[1] = {uids};
    lc_rc rc = lc_db_exec(db, counts_sql, 1, p, &res, err);
    for (int r = 0; rc == LC_OK && r < PQntuples(res); r++) {
        cand *c = find_cand(t, PQgetvalue(res, r, 0));
        if (c)
            c->counts = 1;
    }
    PQclear(res);
    free(uids);
    return rc;
}

/* Which candidates are due, and why (first reason wins: closed, series_listed, counts,
 * quiet); at most PAGE of them. */
static void decide(complete_tx *t)
{
    int due = 0;
    for (size_t i = 0; i < t->ncands; i++) {
        cand *c = &t->cands[i];
        long long quiet =
            c->c && c->c->quiet_seconds >= 0 ? c->c->quiet_seconds : t->x->cfg.quiet_seconds;
        c->reason = c->close                  ? "closed"
                    : c->listed == 1          ? "series_listed"
                    : c->counts               ? "counts"
                    : c->age >= (double)quiet ? "quiet"
                                              : NULL;
        if (c->reason && ++due > PAGE)
            c->reason = NULL;
    }
}

static lc_rc emit_completed(lc_db *db, idx_ctx *x, const cand *c, int version, int nseries,
                            int ninstances, cJSON *series, cJSON *new_series, lc_err *err)
{
    lc_event *ev = NULL;
    lc_err verr = {0};
    cJSON *data = cJSON_CreateObject();
    int ok = data && cJSON_AddItemToObject(data, "series", series);
    if (!ok)
        cJSON_Delete(series);
    ok = ok && cJSON_AddStringToObject(data, "study_instance_uid", c->uid) &&
         cJSON_AddNumberToObject(data, "version", version) &&
         cJSON_AddBoolToObject(data, "amended", version > 1) &&
         cJSON_AddNumberToObject(data, "num_series", nseries) &&
         cJSON_AddNumberToObject(data, "num_instances", ninstances) &&
         cJSON_AddStringToObject(data, "reason", c->reason);
    if (ok && version > 1) {
        cJSON *ns = cJSON_Duplicate(new_series, 1);
        ok = ns && cJSON_AddItemToObject(data, "new_series", ns);
        if (!ok)
            cJSON_Delete(ns);
    }
    if (ok && (c->kind || c->name)) {
        cJSON *src = cJSON_AddObjectToObject(data, "source");
        ok = src && (!c->kind || cJSON_AddStringToObject(src, "kind", c->kind)) &&
             (!c->name || cJSON_AddStringToObject(src, "name", c->name));
    }
    if (!ok) {
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
    if ((rc = lc_event_new(LC_EV_STUDY_COMPLETED, x->source, c->uid, data, &ev, err)) != LC_OK)
        return rc;
    rc = lc_outbox_add_event(db, x->prefix, LC_TOPIC_STUDY_COMPLETED, ev, err);
    lc_event_free(ev);
    return rc;
}

/* The series list of the event, the new series of this version and their fingerprints;
 * records the fingerprints in series_versions. */
static lc_rc series_of_version(lc_db *db, const char *uid, int version, cJSON **series_out,
                               cJSON **new_out, lc_err *err)
{
    PGresult *res = NULL;
    char *rows_s = NULL, vs[16];
    cJSON *series = cJSON_CreateArray(), *news = cJSON_CreateArray(), *rows = cJSON_CreateArray();
    const char *p[3] = {uid, vs, NULL};
    lc_rc rc = LC_OK;
    snprintf(vs, sizeof(vs), "%d", version);
    if (!series || !news || !rows)
        goto nomem;
    if ((rc = lc_db_exec(db, series_sql, 1, p, &res, err)) != LC_OK)
        goto out;
    int nrows = 0;
    for (int r = 0; r < PQntuples(res); r++) {
        const char *suid = PQgetvalue(res, r, 0);
        int n = atoi(PQgetvalue(res, r, 2));
        long long rep = atoll(PQgetvalue(res, r, 3));
        int changed = PQgetisnull(res, r, 4) || atoi(PQgetvalue(res, r, 4)) != n ||
                      atoll(PQgetvalue(res, r, 5)) != rep;
        if (n > 0) {
            cJSON *o = cJSON_CreateObject();
            if (!o || !cJSON_AddItemToArray(series, o)) {
                cJSON_Delete(o);
                goto nomem;
            }
            if (!cJSON_AddStringToObject(o, "series_instance_uid", suid) ||
                (!PQgetisnull(res, r, 1) &&
                 !cJSON_AddStringToObject(o, "modality", PQgetvalue(res, r, 1))) ||
                !cJSON_AddNumberToObject(o, "num_instances", n))
                goto nomem;
        }
        if (!changed || (n == 0 && PQgetisnull(res, r, 4)))
            continue;
        if (n > 0 && !cJSON_AddItemToArray(news, cJSON_CreateString(suid)))
            goto nomem;
        cJSON *row = cJSON_CreateObject();
        if (!row || !cJSON_AddItemToArray(rows, row)) {
            cJSON_Delete(row);
            goto nomem;
        }
        if (!cJSON_AddStringToObject(row, "series_uid", suid) ||
            !cJSON_AddNumberToObject(row, "n", n) ||
            !cJSON_AddNumberToObject(row, "r", (double)rep))
            goto nomem;
        nrows++;
    }
    if (nrows > 0) {
        if (!(rows_s = cJSON_PrintUnformatted(rows)))
            goto nomem;
        p[2] = rows_s;
        if ((rc = lc_db_exec(db, record_sql, 3, p, NULL, err)) != LC_OK)
            goto out;
    }
    *series_out = series;
    *new_out = news;
    series = news = NULL;
    goto out;
nomem:
    rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory listing the series of a study");
out:
    PQclear(res);
    cJSON_Delete(series);
    cJSON_Delete(news);
    cJSON_Delete(rows);
    free(rows_s);
    return rc;
}

/* Plan and create the version's jobs; *njobs gets how many were new. */
static lc_rc create_jobs(lc_db *db, idx_ctx *x, const char *uid, int version,
                         const cJSON *new_series, int *njobs, lc_err *err)
{
    idx_rstudy *s = NULL;
    idx_jobplan plan = {0};
    char *scope = version > 1 ? cJSON_PrintUnformatted(new_series) : NULL;
    lc_rc rc;
    *njobs = 0;
    if (version > 1 && !scope)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    if ((rc = idx_rules_load_study(db, x->rules, uid, version, scope, &s, err)) != LC_OK ||
        (rc = idx_rules_plan(x->rules, s, &plan, err)) != LC_OK)
        goto out;
    for (size_t i = 0; i < plan.n && rc == LC_OK; i++) {
        const idx_jobspec *j = &plan.v[i];
        char id[37], prio[16];
        int created = 0;
        rc = lc_job_create(db, x->prefix, x->source, j->kind, uid, j->params, j->dedupe,
                           (int)x->cfg.job_max_attempts, id, &created, err);
        if (rc != LC_OK || !created)
            continue;
        (*njobs)++;
        if (j->priority == 0 && !j->rule[0])
            continue;
        snprintf(prio, sizeof(prio), "%d", j->priority);
        const char *p[3] = {id, prio, j->rule};
        rc = lc_db_exec(db, job_meta_sql, 3, p, NULL, err);
    }
out:
    idx_jobplan_release(&plan);
    idx_rstudy_free(s, x->rules ? x->rules->nkeys : 0);
    free(scope);
    return rc;
}

static lc_rc complete_one(lc_db *db, complete_tx *t, const cand *c, lc_err *err)
{
    idx_ctx *x = t->x;
    PGresult *res = NULL;
    cJSON *series = NULL, *news = NULL;
    const char *p[2] = {c->uid, NULL};
    int njobs = 0;
    lc_rc rc = lc_db_exec(db, bump_sql, 1, p, &res, err);
    if (rc != LC_OK)
        goto out;
    if (PQntuples(res) != 1) {
        rc = lc_err_set(err, LC_ERR_CONFLICT, "study %s vanished during completion", c->uid);
        goto out;
    }
    int version = atoi(PQgetvalue(res, 0, 0));
    int nseries = atoi(PQgetvalue(res, 0, 1)), ninst = atoi(PQgetvalue(res, 0, 2));
    if ((rc = series_of_version(db, c->uid, version, &series, &news, err)) != LC_OK)
        goto out;
    int nnew = cJSON_GetArraySize(news);
    if ((rc = create_jobs(db, x, c->uid, version, news, &njobs, err)) != LC_OK)
        goto out;
    rc = emit_completed(db, x, c, version, nseries, ninst, series, news, err);
    series = NULL; /* consumed */
    if (rc != LC_OK)
        goto out;
    if (c->close || c->listed == 1) {
        p[1] = c->listed == 1 ? "true" : "false";
        if ((rc = lc_db_exec(db, state_sql, 2, p, NULL, err)) != LC_OK)
            goto out;
    }
    done_study *d = &t->done[t->n++];
    lc_strlcpy(d->uid, c->uid, sizeof(d->uid));
    d->version = version;
    d->reason = c->reason;
    d->new_series = version > 1 ? nnew : nseries;
    d->jobs = njobs;
out:
    PQclear(res);
    cJSON_Delete(series);
    cJSON_Delete(news);
    return rc;
}

static lc_rc complete_fn(lc_db *db, void *ctx, lc_err *err)
{
    complete_tx *t = ctx;
    PGresult *res = NULL;
    char *uids = NULL;
    int nomem = 0;
    t->n = 0;
    cands_free(t); /* from an attempt that was rolled back */
    lc_rc rc = load_cands(db, t, err);
    if (rc != LC_OK || t->ncands == 0)
        goto out;
    if ((rc = check_listed(db, t, err)) != LC_OK || (rc = check_counts(db, t, err)) != LC_OK)
        goto out;
    decide(t);
    if (!(uids = uid_array(t, is_due, &nomem))) {
        if (nomem)
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    /* another replica may hold some of them, or have completed them meanwhile */
    const char *p[1] = {uids};
    if ((rc = lc_db_exec(db, lock_sql, 1, p, &res, err)) != LC_OK)
        goto out;
    for (int r = 0; r < PQntuples(res) && t->n < PAGE && rc == LC_OK; r++) {
        const cand *c = find_cand(t, PQgetvalue(res, r, 0));
        if (c)
            rc = complete_one(db, t, c, err);
    }
out:
    PQclear(res);
    free(uids);
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
                    LC_LI("version", t->done[i].version), LC_LS("reason", t->done[i].reason),
                    LC_LI("series", t->done[i].new_series), LC_LI("jobs", t->done[i].jobs));
    lc_counter_add(x->m_completed, t->n);
    if (completed)
        *completed = t->n;
out:
    cands_free(t);
    free(t);
    return rc;
}

/* SIGHUP: load the rules file again; an invalid file keeps the rules in force. */
static void reload_rules(idx_ctx *x)
{
    idx_rules *r = NULL;
    lc_err err = {0};
    if (!x->rules_path || !x->rules_path[0]) {
        lc_log_info("reload: no RADPIPE_RULES_FILE, the built-in rules stay");
        return;
    }
    if (idx_rules_load(x->rules_path, &r, &err) != LC_OK) {
        lc_log_warn("could not reload the rules, keeping the rules in force",
                    LC_LS("file", x->rules_path), LC_LS("error", lc_err_msg(&err)));
        return;
    }
    idx_rules_free(x->rules);
    x->rules = r;
    lc_log_info("rules reloaded", LC_LS("file", x->rules_path), LC_LI("rules", r->nrules),
                LC_LI("completion", r->ncompletion));
    x->next_complete_ms = 0; /* new completion settings apply at once */
}

void idx_tick(void *ctx)
{
    idx_ctx *x = ctx;
    if (x->reload && atomic_exchange(x->reload, 0))
        reload_rules(x);
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
