/*
 * idx_rules_eval.c: loads what the routing rules judge a study on (its indexed columns, its
 * series, and for other keywords the DICOM JSON of each series' first instance) and turns
 * matching rules into a job plan with dedupe keys per version, rule and action. Runs on the
 * caller's connection (inside the completion transaction, or the dry run's read-only one);
 * results belong to the caller.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "idx_rules.h"
#include "lc/util.h"

/* Column order = idx_rules_cols' col for IDX_K_STUDY. */
static const char study_sql[] =
    "SELECT s.patient_id, s.patient_name, s.patient_birth_date, s.patient_sex, s.study_date,"
    " s.study_time, s.accession_number, s.study_id, s.study_description, s.referring_physician,"
    " array_to_string(s.modalities, E'\\\\'), s.study_uid, s.num_series::text,"
    " s.num_instances::text, c.source_kind, c.source_name"
    " FROM studies s LEFT JOIN study_completion c ON c.study_uid = s.study_uid"
    " WHERE s.study_uid = $1";

/* Column order = idx_rules_cols' col for IDX_K_SERIES. Series a replacement emptied are
 * left out. */
static const char series_sql[] =
    "SELECT se.series_uid, se.modality, se.series_number::text, se.series_description,"
    " se.body_part_examined, se.num_instances::text FROM series se"
    " WHERE se.study_uid = $1 AND se.num_instances > 0"
    " ORDER BY se.series_number NULLS LAST, se.series_uid";

/* The wanted elements of each series' first instance that has metadata. */
static const char meta_sql[] =
    "SELECT DISTINCT ON (i.series_uid) i.series_uid,"
    " (SELECT jsonb_object_agg(k, m.json -> k) FROM jsonb_array_elements_text($2::jsonb) AS k"
    "  WHERE m.json ? k)::text"
    " FROM instances i JOIN instance_metadata m ON m.sop_uid = i.sop_uid"
    " WHERE i.study_uid = $1 ORDER BY i.series_uid, i.instance_number NULLS LAST, i.sop_uid";

static void vals_release(idx_vals *v)
{
    for (size_t i = 0; i < v->n; i++)
        free(v->v[i]);
    free(v->v);
    v->v = NULL;
    v->n = 0;
}

void idx_rstudy_free(idx_rstudy *s, size_t nkeys)
{
    if (!s)
        return;
    for (size_t i = 0; s->series && i < s->nseries; i++) {
        for (size_t k = 0; s->series[i].kv && k < nkeys; k++)
            vals_release(&s->series[i].kv[k]);
        free(s->series[i].kv);
    }
    free(s->series);
    for (size_t k = 0; s->kv && k < nkeys; k++)
        vals_release(&s->kv[k]);
    free(s->kv);
    free(s);
}

/* Append a copy of the first len bytes of v (empty values are absent). 0 on ENOMEM. */
static int vals_add(idx_vals *vals, const char *v, size_t len)
{
    if (len == 0)
        return 1;
    char **n = realloc(vals->v, (vals->n + 1) * sizeof(*n));
    if (!n)
        return 0;
    vals->v = n;
    if (!(n[vals->n] = strndup(v, len)))
        return 0;
    vals->n++;
    return 1;
}

/* A column value; multi splits on the DICOM value delimiter '\'. */
static int vals_from_text(idx_vals *vals, const char *v, int multi)
{
    if (!multi)
        return vals_add(vals, v, strlen(v));
    for (;;) {
        const char *bs = strchr(v, '\\');
        size_t len = bs ? (size_t)(bs - v) : strlen(v);
        if (!vals_add(vals, v, len))
            return 0;
        if (!bs)
            return 1;
        v = bs + 1;
    }
}

/* A DICOM JSON element {"vr":..., "Value":[...]}: strings, numbers and the Alphabetic group
 * of person names become values; sequences and bulk data none. */
static int vals_from_dicom_json(idx_vals *vals, const cJSON *el)
{
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(el, "Value");
    const cJSON *v;
    if (!cJSON_IsArray(arr))
        return 1;
    cJSON_ArrayForEach(v, arr)
    {
        char buf[64];
        const char *s = NULL;
        if (cJSON_IsString(v)) {
            s = v->valuestring;
        } else if (cJSON_IsNumber(v)) {
            double d = v->valuedouble;
            snprintf(buf, sizeof(buf), "%.15g", d);
            if (strtod(buf, NULL) != d)
                snprintf(buf, sizeof(buf), "%.17g", d);
            s = buf;
        } else if (cJSON_IsObject(v)) {
            const cJSON *a = cJSON_GetObjectItemCaseSensitive(v, "Alphabetic");
            s = cJSON_IsString(a) ? a->valuestring : NULL;
        }
        if (s && !vals_add(vals, s, strlen(s)))
            return 0;
    }
    return 1;
}

static idx_vals *new_kv(size_t nkeys)
{
    return calloc(nkeys ? nkeys : 1, sizeof(idx_vals));
}

static lc_rc load_meta(lc_db *db, const idx_rules *r, idx_rstudy *s, lc_err *err)
{
    PGresult *res = NULL;
    cJSON *tags = cJSON_CreateArray();
    char *tags_s = NULL;
    lc_rc rc = LC_OK;
    for (size_t i = 0; tags && i < r->nmeta; i++)
        cJSON_AddItemToArray(tags, cJSON_CreateString(r->meta_tags[i]));
    if (!tags || !(tags_s = cJSON_PrintUnformatted(tags))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    const char *p[2] = {s->uid, tags_s};
    if ((rc = lc_db_exec(db, meta_sql, 2, p, &res, err)) != LC_OK)
        goto out;
    for (int row = 0; row < PQntuples(res); row++) {
        idx_rseries *ser = NULL;
        for (size_t i = 0; i < s->nseries && !ser; i++)
            if (strcmp(s->series[i].uid, PQgetvalue(res, row, 0)) == 0)
                ser = &s->series[i];
        if (!ser || PQgetisnull(res, row, 1))
            continue;
        cJSON *obj = cJSON_Parse(PQgetvalue(res, row, 1));
        if (!obj) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory reading instance metadata");
            goto out;
        }
        int ok = 1;
        for (size_t k = 0; ok && k < r->nkeys; k++) {
            if (r->keys[k].src != IDX_K_META)
                continue;
            const cJSON *el = cJSON_GetObjectItemCaseSensitive(obj, r->keys[k].tag);
            if (el)
                ok = vals_from_dicom_json(&ser->kv[k], el);
        }
        cJSON_Delete(obj);
        if (!ok) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
            goto out;
        }
    }
out:
    PQclear(res);
    cJSON_Delete(tags);
    free(tags_s);
    return rc;
}

static int in_list(const cJSON *list, const char *uid)
{
    const cJSON *e;
    cJSON_ArrayForEach(e, list)
    {
        if (cJSON_IsString(e) && strcmp(e->valuestring, uid) == 0)
            return 1;
    }
    return 0;
}

lc_rc idx_rules_load_study(lc_db *db, const idx_rules *r, const char *study_uid, int version,
                           const char *scope, idx_rstudy **out, lc_err *err)
{
    size_t nkeys = r ? r->nkeys : 0;
    PGresult *res = NULL;
    cJSON *sc = NULL;
    lc_rc rc = LC_OK;
    const char *p[1] = {study_uid};
    idx_rstudy *s = calloc(1, sizeof(*s));
    *out = NULL;
    if (!s || !(s->kv = new_kv(nkeys)))
        goto nomem;
    lc_strlcpy(s->uid, study_uid, sizeof(s->uid));
    s->version = version;
    if (scope && !(sc = cJSON_Parse(scope)))
        goto nomem;

    if ((rc = lc_db_exec(db, study_sql, 1, p, &res, err)) != LC_OK)
        goto out;
    if (PQntuples(res) != 1) {
        rc = lc_err_set(err, LC_ERR_NOT_FOUND, "study %s is not indexed", study_uid);
        goto out;
    }
    for (size_t k = 0; k < nkeys; k++) {
        const idx_colkey *ck = &idx_rules_cols[r->keys[k].col];
        if (r->keys[k].src != IDX_K_STUDY || PQgetisnull(res, 0, ck->col))
            continue;
        if (!vals_from_text(&s->kv[k], PQgetvalue(res, 0, ck->col), ck->multi))
            goto nomem;
    }
    PQclear(res);
    res = NULL;

    if ((rc = lc_db_exec(db, series_sql, 1, p, &res, err)) != LC_OK)
        goto out;
    int n = PQntuples(res);
    if (n > 0 && !(s->series = calloc((size_t)n, sizeof(*s->series))))
        goto nomem;
    for (int row = 0; row < n; row++) {
        idx_rseries *ser = &s->series[s->nseries++];
        if (!(ser->kv = new_kv(nkeys)))
            goto nomem;
        lc_strlcpy(ser->uid, PQgetvalue(res, row, 0), sizeof(ser->uid));
        ser->in_scope = !sc || in_list(sc, ser->uid);
        for (size_t k = 0; k < nkeys; k++) {
            const idx_colkey *ck = &idx_rules_cols[r->keys[k].col];
            if (r->keys[k].src != IDX_K_SERIES || PQgetisnull(res, row, ck->col))
                continue;
            if (!vals_from_text(&ser->kv[k], PQgetvalue(res, row, ck->col), ck->multi))
                goto nomem;
        }
    }
    if (r && r->nmeta > 0 && (rc = load_meta(db, r, s, err)) != LC_OK)
        goto out;
    *out = s;
    s = NULL;
    goto out;
nomem:
    rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory loading study %s for the rules", study_uid);
out:
    PQclear(res);
    cJSON_Delete(sc);
    idx_rstudy_free(s, nkeys);
    return rc;
}

/* --- plans ------------------------------------------------------------------------------ */

void idx_jobplan_release(idx_jobplan *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->n; i++)
        cJSON_Delete(p->v[i].params);
    free(p->v);
    memset(p, 0, sizeof(*p));
}

/* Append a job; params is consumed. */
static lc_rc plan_add(idx_jobplan *p, const char *kind, const char *rule, cJSON *params,
                      int priority, const char *dedupe, lc_err *err)
{
    if (!params)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory building job parameters");
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 8;
        idx_jobspec *v = realloc(p->v, cap * sizeof(*v));
        if (!v) {
            cJSON_Delete(params);
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        }
        p->v = v;
        p->cap = cap;
    }
    idx_jobspec *j = &p->v[p->n++];
    memset(j, 0, sizeof(*j));
    lc_strlcpy(j->kind, kind, sizeof(j->kind));
    lc_strlcpy(j->rule, rule ? rule : "", sizeof(j->rule));
    j->params = params;
    j->priority = priority;
    lc_strlcpy(j->dedupe, dedupe, sizeof(j->dedupe));
    return LC_OK;
}

/* A copy of base (may be NULL) with "series": the uids of the series sel[] marks. */
static cJSON *with_series(const cJSON *base, const idx_rstudy *s, const int *sel)
{
    cJSON *o = base ? cJSON_Duplicate(base, 1) : cJSON_CreateObject();
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; o && a && i < s->nseries; i++) {
        cJSON *u = sel[i] ? cJSON_CreateString(s->series[i].uid) : NULL;
        if (sel[i] && (!u || !cJSON_AddItemToArray(a, u))) {
            cJSON_Delete(u);
            cJSON_Delete(a);
            a = NULL;
        }
    }
    if (!o || !a || !cJSON_AddItemToObject(o, "series", a)) {
        cJSON_Delete(a);
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static cJSON *with_one_series(const cJSON *base, const char *uid)
{
    cJSON *o = base ? cJSON_Duplicate(base, 1) : cJSON_CreateObject();
    if (o && uid && !cJSON_AddStringToObject(o, "series_instance_uid", uid)) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static lc_rc plan_builtin(const idx_rstudy *s, const int *scope, size_t nscope, idx_jobplan *p,
                          lc_err *err)
{
    char key[320];
    lc_rc rc;
    snprintf(key, sizeof(key), "%s:v%d:upload", s->uid, s->version);
    if (s->version <= 1) {
        if ((rc = plan_add(p, "upload", NULL, cJSON_CreateObject(), 0, key, err)) != LC_OK)
            return rc;
        snprintf(key, sizeof(key), "%s:v%d:segment", s->uid, s->version);
        return plan_add(p, "segment", NULL, cJSON_CreateObject(), 0, key, err);
    }
    if (nscope == 0)
        return LC_OK;
    if ((rc = plan_add(p, "upload", NULL, with_series(NULL, s, scope), 0, key, err)) != LC_OK)
        return rc;
    for (size_t i = 0; i < s->nseries; i++) {
        if (!scope[i])
            continue;
        snprintf(key, sizeof(key), "%s:v%d:segment:%s", s->uid, s->version, s->series[i].uid);
        if ((rc = plan_add(p, "segment", NULL, with_one_series(NULL, s->series[i].uid), 0, key,
                           err)) != LC_OK)
            return rc;
    }
    return LC_OK;
}

/* The jobs of one action; sel marks the series the rule chose (all in scope for a
 * study-level rule), series_level whether the rule is series-level. */
static lc_rc plan_action(const idx_rules *r, const idx_rule *rule, size_t ai, const idx_rstudy *s,
                         const int *sel, int series_level, idx_jobplan *p, lc_err *err)
{
    const idx_action *a = &rule->actions[ai];
    int prio = a->has_priority ? a->priority : rule->priority;
    char key[320];
    if (a->kind == IDX_A_UPLOAD) {
        snprintf(key, sizeof(key), "%s:v%d:%s:%zu:upload", s->uid, s->version, rule->name, ai);
        cJSON *params = series_level || s->version > 1 ? with_series(a->params, s, sel)
                                                       : cJSON_Duplicate(a->params, 1);
        return plan_add(p, "upload", rule->name, params, prio, key, err);
    }
    if (!series_level && !a->series && s->version <= 1) {
        snprintf(key, sizeof(key), "%s:v%d:%s:%zu:segment", s->uid, s->version, rule->name, ai);
        return plan_add(p, "segment", rule->name, cJSON_Duplicate(a->params, 1), prio, key, err);
    }
    for (size_t i = 0; i < s->nseries; i++) {
        if (!sel[i] || (a->series && !idx_cond_match(r, a->series, s, &s->series[i])))
            continue;
        snprintf(key, sizeof(key), "%s:v%d:%s:%zu:segment:%s", s->uid, s->version, rule->name, ai,
                 s->series[i].uid);
        lc_rc rc = plan_add(p, "segment", rule->name, with_one_series(a->params, s->series[i].uid),
                            prio, key, err);
        if (rc != LC_OK)
            return rc;
    }
    return LC_OK;
}

lc_rc idx_rules_plan(const idx_rules *r, const idx_rstudy *s, idx_jobplan *p, lc_err *err)
{
    lc_rc rc = LC_OK;
    size_t nscope = 0;
    int *scope = calloc(s->nseries ? s->nseries : 1, sizeof(*scope));
    int *sel = calloc(s->nseries ? s->nseries : 1, sizeof(*sel));
    if (!scope || !sel) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < s->nseries; i++)
        nscope += (size_t)(scope[i] = s->series[i].in_scope);
    if (!r || !r->has_rules) {
        rc = plan_builtin(s, scope, nscope, p, err);
        goto out;
    }
    if (nscope == 0) /* an amended version without new series: nothing to route */
        goto out;
    for (size_t k = 0; k < r->nrules && rc == LC_OK; k++) {
        const idx_rule *rule = &r->rules[k];
        int series_level = rule->level == IDX_LEVEL_SERIES, any = 0;
        for (size_t i = 0; i < s->nseries; i++) {
            sel[i] = scope[i];
            if (series_level && sel[i])
                sel[i] = idx_cond_match(r, rule->when, s, &s->series[i]);
            any |= sel[i];
        }
        if (!any || (!series_level && !idx_cond_match(r, rule->when, s, NULL)))
            continue;
        for (size_t ai = 0; ai < rule->nactions && rc == LC_OK; ai++)
            rc = plan_action(r, rule, ai, s, sel, series_level, p, err);
    }
out:
    free(scope);
    free(sel);
    return rc;
}
