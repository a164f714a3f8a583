/*
 * upl_job.c: one upload job. Reads the job's parameters (url_pattern, layout, series), the
 * study, its series and instances from the index, expands the destination pattern per series
 * (values from the index columns, else from the first instance's DICOM JSON header), plans
 * the objects (deterministic keys: instance objects, series or study tars) and copies them:
 * small objects on a pool of copy threads, large objects and tars streamed on this thread
 * with resumable multipart uploads. Ends with one manifest per destination prefix. Progress is
 * published in bytes; a stop request is honoured between objects and parts.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lc/dicom.h"
#include "lc/log.h"
#include "lc/util.h"
#include "upl_run.h"

/* --- keyword values for patterns -------------------------------------------------------- */

static const char *const study_cols[][2] = {
    {"StudyInstanceUID", "study_uid"},
    {"PatientID", "patient_id"},
    {"PatientName", "patient_name"},
    {"PatientBirthDate", "patient_birth_date"},
    {"PatientSex", "patient_sex"},
    {"StudyDate", "study_date"},
    {"StudyTime", "study_time"},
    {"AccessionNumber", "accession_number"},
    {"StudyID", "study_id"},
    {"StudyDescription", "study_description"},
    {"ReferringPhysicianName", "referring_physician"},
    {"InstitutionName", "institution_name"},
    {"IssuerOfPatientID", "issuer_of_patient_id"},
    {"ModalitiesInStudy", "modalities_text"},
};

static const char *const series_cols[][2] = {
    {"SeriesInstanceUID", "series_uid"},
    {"Modality", "modality"},
    {"SeriesNumber", "series_number"},
    {"SeriesDescription", "series_description"},
    {"BodyPartExamined", "body_part_examined"},
    {"SeriesDate", "series_date"},
    {"SeriesTime", "series_time"},
};

#define STUDY_SQL                                                                                  \
    "SELECT study_uid, patient_id, patient_name, patient_birth_date, patient_sex, study_date, "    \
    "study_time, accession_number, study_id, study_description, referring_physician, "             \
    "institution_name, issuer_of_patient_id, array_to_string(modalities, '\\') AS "                \
    "modalities_text FROM studies WHERE study_uid = $1"
#define SERIES_SQL                                                                                 \
    "SELECT series_uid, modality, series_number::text AS series_number, series_description, "      \
    "body_part_examined, series_date, series_time FROM series WHERE series_uid = $1"

typedef struct lookup {
    lc_db *db;
    PGresult *study;  /* one row or none */
    PGresult *series; /* one row or none (NULL for study-level patterns) */
    const char *sop;  /* the instance whose header answers other keywords */
    cJSON *meta;      /* its DICOM JSON, loaded on first use */
    int meta_loaded;
} lookup;

static char *column(PGresult *res, const char *name)
{
    if (!res || PQntuples(res) == 0)
        return NULL;
    int c = PQfnumber(res, name);
    if (c < 0 || PQgetisnull(res, 0, c))
        return NULL;
    const char *v = PQgetvalue(res, 0, c);
    return *v ? strdup(v) : NULL;
}

/* A DICOM JSON attribute's value as text: strings and numbers joined with '\', person names
 * by their alphabetic form. */
static char *json_value(const cJSON *attr)
{
    const cJSON *vals = cJSON_GetObjectItemCaseSensitive(attr, "Value");
    if (!cJSON_IsArray(vals) || cJSON_GetArraySize(vals) == 0)
        return NULL;
    char buf[1024];
    size_t n = 0;
    const cJSON *v;
    buf[0] = '\0';
    cJSON_ArrayForEach(v, vals)
    {
        char one[256] = "";
        if (cJSON_IsString(v))
            lc_strlcpy(one, v->valuestring, sizeof(one));
        else if (cJSON_IsNumber(v))
            snprintf(one, sizeof(one), "%.17g", v->valuedouble);
        else if (cJSON_IsObject(v)) {
            const cJSON *a = cJSON_GetObjectItemCaseSensitive(v, "Alphabetic");
            if (cJSON_IsString(a))
                lc_strlcpy(one, a->valuestring, sizeof(one));
        }
        n += (size_t)snprintf(buf + n, n < sizeof(buf) ? sizeof(buf) - n : 0, "%s%s", n ? "\\" : "",
                              one);
        if (n >= sizeof(buf))
            break;
    }
    return buf[0] ? strdup(buf) : NULL;
}

static lc_rc lookup_fn(void *ctx, const char *keyword, char **value, lc_err *err)
{
    lookup *l = ctx;
    *value = NULL;
    for (size_t i = 0; i < sizeof(study_cols) / sizeof(study_cols[0]); i++)
        if (strcmp(keyword, study_cols[i][0]) == 0) {
            *value = column(l->study, study_cols[i][1]);
            return LC_OK;
        }
    for (size_t i = 0; i < sizeof(series_cols) / sizeof(series_cols[0]); i++)
        if (strcmp(keyword, series_cols[i][0]) == 0) {
            *value = column(l->series, series_cols[i][1]);
            return LC_OK;
        }
    unsigned tag = 0;
    if (lc_dicom_keyword_tag(keyword, &tag, NULL) != LC_OK)
        return lc_err_set(err, LC_ERR_INVALID,
                          "\"%s\" in the destination pattern is not a DICOM "
                          "keyword",
                          keyword);
    if (!l->meta_loaded && l->sop) {
        PGresult *res = NULL;
        const char *p[1] = {l->sop};
        lc_rc rc = lc_db_exec(l->db, "SELECT json::text FROM instance_metadata WHERE sop_uid = $1",
                              1, p, &res, err);
        if (rc != LC_OK)
            return rc;
        if (PQntuples(res) == 1)
            l->meta = cJSON_Parse(PQgetvalue(res, 0, 0));
        PQclear(res);
        l->meta_loaded = 1;
    }
    char key[9];
    snprintf(key, sizeof(key), "%08X", tag);
    const cJSON *attr = cJSON_GetObjectItemCaseSensitive(l->meta, key);
    if (!attr) {
        for (char *k = key; *k; k++)
            *k = (char)tolower((unsigned char)*k);
        attr = cJSON_GetObjectItemCaseSensitive(l->meta, key);
    }
    if (attr)
        *value = json_value(attr);
    return LC_OK;
}

/* --- parameters and the index ------------------------------------------------------------ */

typedef struct params {
    const char *pattern;
    const char *layout;
    char **series; /* NULL-terminated when given */
    size_t nseries;
} params;

static lc_rc read_params(const upl_ctx *u, const cJSON *p, params *out, lc_err *err)
{
    memset(out, 0, sizeof(*out));
    out->pattern = u->cfg->url_pattern;
    out->layout = u->cfg->layout;
    const cJSON *v;
    cJSON_ArrayForEach(v, p)
    {
        if (strcmp(v->string, "url_pattern") == 0) {
            if (!cJSON_IsString(v) || !*v->valuestring)
                return lc_err_set(err, LC_ERR_INVALID, "url_pattern must be a non-empty string");
            out->pattern = v->valuestring;
        } else if (strcmp(v->string, "layout") == 0) {
            if (!cJSON_IsString(v) || (strcmp(v->valuestring, "instance") != 0 &&
                                       strcmp(v->valuestring, "series-tar") != 0 &&
                                       strcmp(v->valuestring, "study-tar") != 0))
                return lc_err_set(err, LC_ERR_INVALID,
                                  "layout must be \"instance\", \"series-tar\" or \"study-tar\"");
            out->layout = v->valuestring;
        } else if (strcmp(v->string, "series") == 0) {
            if (!cJSON_IsArray(v))
                return lc_err_set(err, LC_ERR_INVALID, "series must be an array of UIDs");
            size_t n = (size_t)cJSON_GetArraySize(v);
            free(out->series); /* a repeated key: the last one counts */
            out->nseries = 0;
            out->series = calloc(n + 1, sizeof(char *));
            if (!out->series)
                return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
            const cJSON *s;
            cJSON_ArrayForEach(s, v)
            {
                if (!cJSON_IsString(s) || !lc_dicom_uid_valid(s->valuestring))
                    return lc_err_set(err, LC_ERR_INVALID, "series must hold valid UIDs");
                out->series[out->nseries++] = s->valuestring;
            }
        } else {
            lc_log_warn("ignoring an unknown upload parameter", LC_LS("parameter", v->string));
        }
    }
    return LC_OK;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* "" without a series filter; else "-" and 12 hex digits of the sorted series list, so a
 * subset upload names its manifest (and study tar) apart from the whole study's. */
static void subset_tag(const params *pp, char out[16])
{
    out[0] = '\0';
    if (!pp->series)
        return;
    qsort(pp->series, pp->nseries, sizeof(char *), cmp_str);
    lc_sha256 *h = lc_sha256_new();
    char hex[65];
    for (size_t i = 0; i < pp->nseries; i++) {
        lc_sha256_update(h, pp->series[i], strlen(pp->series[i]));
        lc_sha256_update(h, "\n", 1);
    }
    lc_sha256_final_hex(h, hex);
    lc_sha256_free(h);
    snprintf(out, 16, "-%.12s", hex);
}

static lc_rc load_instances(upl_run *r, const params *pp, lc_err *err)
{
    PGresult *res = NULL;
    char *arr = NULL;
    lc_rc rc;
    const char *p[2] = {r->j->job->study_uid, NULL};
    if (pp->series) {
        size_t cap = 3;
        for (size_t i = 0; i < pp->nseries; i++)
            cap += strlen(pp->series[i]) + 1;
        if (!(arr = malloc(cap)))
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        size_t n = 0;
        arr[n++] = '{';
        for (size_t i = 0; i < pp->nseries; i++)
            n += (size_t)sprintf(arr + n, "%s%s", i ? "," : "", pp->series[i]);
        arr[n++] = '}';
        arr[n] = '\0';
        p[1] = arr;
    }
    rc = lc_db_exec(r->j->db,
                    pp->series ? "SELECT sop_uid, series_uid, store_key, size_bytes, sha256 FROM "
                                 "instances WHERE study_uid = $1 AND series_uid = ANY($2::text[]) "
                                 "ORDER BY series_uid, instance_number NULLS LAST, sop_uid"
                               : "SELECT sop_uid, series_uid, store_key, size_bytes, sha256 FROM "
                                 "instances WHERE study_uid = $1 "
                                 "ORDER BY series_uid, instance_number NULLS LAST, sop_uid",
                    pp->series ? 2 : 1, p, &res, err);
    free(arr);
    if (rc != LC_OK)
        return rc;
    int n = PQntuples(res);
    if (n == 0) {
        PQclear(res);
        return lc_err_set(err, LC_ERR_NOT_FOUND, "study has no indexed instances%s",
                          pp->series ? " in the given series" : "");
    }
    if (!(r->insts = calloc((size_t)n, sizeof(*r->insts)))) {
        PQclear(res);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    for (int i = 0; i < n; i++) {
        upl_inst *in = &r->insts[i];
        in->sop = strdup(PQgetvalue(res, i, 0));
        in->series = strdup(PQgetvalue(res, i, 1));
        in->store_key = strdup(PQgetvalue(res, i, 2));
        in->size = strtoll(PQgetvalue(res, i, 3), NULL, 10);
        lc_strlcpy(in->sha256, PQgetvalue(res, i, 4), sizeof(in->sha256));
        r->ninsts++;
        if (!in->sop || !in->series || !in->store_key) {
            PQclear(res);
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        }
    }
    PQclear(res);
    return LC_OK;
}

/* --- the plan ---------------------------------------------------------------------------- */

/* The group for the pattern's expansion with the given lookup (an existing one when the
 * destination and prefix are the same). */
static lc_rc group_for(upl_run *r, const params *pp, lookup *l, const char *subset, upl_group **out,
                       lc_err *err)
{
    char *exp = NULL, *url = NULL, *prefix = NULL;
    lc_rc rc = upl_pattern_expand(pp->pattern, lookup_fn, l, r->u->cfg->missing, &exp, err);
    if (rc == LC_OK)
        rc = upl_pattern_split(exp, r->u->cfg->archive_url, &url, &prefix, err);
    free(exp);
    if (rc != LC_OK)
        return lc_err_wrap(err, "could not expand the destination pattern");
    upl_dest *d = NULL;
    if ((rc = upl_dest_get(r->u, url, &d, err)) != LC_OK)
        goto out;
    for (size_t i = 0; i < r->ngroups; i++)
        if (r->groups[i].dest == d && r->groups[i].prefix &&
            strcmp(r->groups[i].prefix, prefix) == 0) {
            *out = &r->groups[i];
            goto out;
        }
    upl_group *g = &r->groups[r->ngroups];
    const char *study = r->j->job->study_uid;
    /* "manifest.json" beside the objects; named after the study when the prefix is not */
    int named = strstr(prefix, study) != NULL;
    if (asprintf(&g->manifest_key, "%s%s%s%smanifest%s.json", prefix, *prefix ? "/" : "",
                 named ? "" : study, named ? "" : ".", subset) < 0) {
        g->manifest_key = NULL;
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    g->dest = d;
    g->prefix = prefix;
    prefix = NULL;
    r->ngroups++;
    *out = g;
out:
    free(url);
    free(prefix);
    return rc;
}

static lc_rc add_obj(upl_run *r, upl_group *g, const char *rel, lc_err *err)
{
    upl_obj *o = &r->objs[r->nobjs];
    memset(o, 0, sizeof(*o));
    o->g = g;
    size_t pl = strlen(g->prefix);
    if (asprintf(&o->key, "%s%s%s", g->prefix, pl ? "/" : "", rel) < 0) {
        o->key = NULL;
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    o->rel = o->key + (pl ? pl + 1 : 0);
    r->nobjs++;
    if (!lc_store_key_valid(o->key))
        return lc_err_set(err, LC_ERR_INVALID, "destination key \"%s\" is not valid", o->key);
    return LC_OK;
}

/* A tar's digest: the SHA-256 of its member list (names, sizes, SHA-256s); the same members
 * always give the same bytes, so equal digests mean equal archives. */
static lc_rc finish_tar(upl_obj *o, lc_err *err)
{
    lc_sha256 *h = lc_sha256_new();
    if (!h)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    int64_t *sizes = calloc(o->nmembers ? o->nmembers : 1, sizeof(int64_t));
    if (!sizes) {
        lc_sha256_free(h);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    lc_sha256_update(h, "radpipe-tar-v1\n", 15);
    for (size_t i = 0; i < o->nmembers; i++) {
        char line[300];
        int n = snprintf(line, sizeof(line), "%s\t%lld\t%s\n", o->names[i],
                         (long long)o->members[i]->size, o->members[i]->sha256);
        lc_sha256_update(h, line, (size_t)n);
        sizes[i] = o->members[i]->size;
    }
    lc_sha256_final_hex(h, o->digest);
    lc_sha256_free(h);
    o->size = upl_tar_size(sizes, o->nmembers);
    free(sizes);
    return LC_OK;
}

static lc_rc tar_member(upl_obj *o, upl_inst *in, int with_series, lc_err *err)
{
    char **names = realloc(o->names, (o->nmembers + 1) * sizeof(char *));
    upl_inst **mem = names ? realloc(o->members, (o->nmembers + 1) * sizeof(*mem)) : NULL;
    if (names)
        o->names = names;
    if (mem)
        o->members = mem;
    if (!names || !mem)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    if ((with_series ? asprintf(&o->names[o->nmembers], "%s/%s.dcm", in->series, in->sop)
                     : asprintf(&o->names[o->nmembers], "%s.dcm", in->sop)) < 0)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    o->members[o->nmembers++] = in;
    return LC_OK;
}

static lc_rc plan(upl_run *r, const params *pp, lc_err *err)
{
    lc_rc rc = LC_OK;
    PGresult *study = NULL, *series = NULL;
    const char *sp[1] = {r->j->job->study_uid};
    char subset[16];
    int study_tar = strcmp(pp->layout, "study-tar") == 0;
    int series_tar = strcmp(pp->layout, "series-tar") == 0;
    subset_tag(pp, subset);
    if ((rc = lc_db_exec(r->j->db, STUDY_SQL, 1, sp, &study, err)) != LC_OK)
        return rc;
    r->groups = calloc(r->ninsts + 1, sizeof(*r->groups));
    r->objs = calloc(r->ninsts + 1, sizeof(*r->objs));
    if (!r->groups || !r->objs) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    upl_obj *cur = NULL;
    const char *cur_series = NULL;
    upl_group *g = NULL;
    for (size_t i = 0; i < r->ninsts; i++) {
        upl_inst *in = &r->insts[i];
        int new_series = !cur_series || strcmp(in->series, cur_series) != 0;
        if (new_series && (!study_tar || i == 0)) {
            /* the pattern per series: study and series columns, else the series' first
             * instance's header */
            const char *p1[1] = {in->series};
            PQclear(series);
            series = NULL;
            if ((rc = lc_db_exec(r->j->db, SERIES_SQL, 1, p1, &series, err)) != LC_OK)
                goto out;
            lookup l = {.db = r->j->db, .study = study, .series = series, .sop = in->sop};
            rc = group_for(r, pp, &l, subset, &g, err);
            cJSON_Delete(l.meta);
            if (rc != LC_OK)
                goto out;
            if (!g) {
                rc = lc_err_set(err, LC_ERR_INTERNAL, "no destination for series %s", in->series);
                goto out;
            }
        }
        if (new_series)
            cur_series = in->series;
        if (study_tar) {
            if (i == 0) {
                char rel[128];
                snprintf(rel, sizeof(rel), "%s%s.tar", r->j->job->study_uid, subset);
                if ((rc = add_obj(r, g, rel, err)) != LC_OK)
                    goto out;
                cur = &r->objs[r->nobjs - 1];
                cur->tar = 1;
            }
            if ((rc = tar_member(cur, in, 1, err)) != LC_OK)
                goto out;
        } else if (series_tar) {
            if (new_series) {
                char rel[128];
                snprintf(rel, sizeof(rel), "%s.tar", in->series);
                if ((rc = add_obj(r, g, rel, err)) != LC_OK)
                    goto out;
                cur = &r->objs[r->nobjs - 1];
                cur->tar = 1;
            }
            if ((rc = tar_member(cur, in, 0, err)) != LC_OK)
                goto out;
        } else {
            char rel[160];
            snprintf(rel, sizeof(rel), "%s/%s.dcm", in->series, in->sop);
            if ((rc = add_obj(r, g, rel, err)) != LC_OK)
                goto out;
            cur = &r->objs[r->nobjs - 1];
            if ((rc = tar_member(cur, in, 0, err)) != LC_OK) /* one member: the instance */
                goto out;
            cur->size = in->size;
            lc_strlcpy(cur->digest, in->sha256, sizeof(cur->digest));
        }
    }
    for (size_t i = 0; i < r->nobjs; i++) {
        if (r->objs[i].tar && (rc = finish_tar(&r->objs[i], err)) != LC_OK)
            goto out;
        r->bytes_total += r->objs[i].size;
    }
out:
    PQclear(series);
    PQclear(study);
    return rc;
}

/* --- manifests --------------------------------------------------------------------------- */

/* SHA-256s of tars recorded by an earlier manifest (for tars already in place). */
static void sha_from_old_manifest(upl_run *r, upl_group *g)
{
    void *buf = NULL;
    size_t len = 0;
    lc_err e;
    if (lc_store_get_buf(g->dest->store, g->manifest_key, 64 << 20, &buf, &len, &e) != LC_OK)
        return;
    cJSON *m = cJSON_ParseWithLength(buf, len);
    free(buf);
    const cJSON *objs = cJSON_GetObjectItemCaseSensitive(m, "objects"), *o;
    cJSON_ArrayForEach(o, objs)
    {
        const cJSON *k = cJSON_GetObjectItemCaseSensitive(o, "key");
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(o, "sha256");
        const cJSON *d = cJSON_GetObjectItemCaseSensitive(o, "digest");
        if (!cJSON_IsString(k) || !cJSON_IsString(s) || !cJSON_IsString(d))
            continue;
        for (size_t i = 0; i < r->nobjs; i++) {
            upl_obj *x = &r->objs[i];
            if (x->g == g && x->skipped && !x->sha256[0] && strcmp(x->rel, k->valuestring) == 0 &&
                strcmp(x->digest, d->valuestring) == 0 && strlen(s->valuestring) == 64)
                lc_strlcpy(x->sha256, s->valuestring, sizeof(x->sha256));
        }
    }
    cJSON_Delete(m);
}

static lc_rc write_manifest(upl_run *r, upl_group *g, lc_err *err)
{
    lc_rc rc = LC_OK;
    char *text = NULL;
    sha_from_old_manifest(r, g);
    cJSON *m = cJSON_CreateObject(), *objs = NULL;
    if (!m)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    cJSON_AddNumberToObject(m, "version", 1);
    cJSON_AddStringToObject(m, "study_instance_uid", r->j->job->study_uid);
    cJSON_AddStringToObject(m, "layout", r->layout);
    cJSON_AddStringToObject(m, "destination", lc_store_url(g->dest->store));
    cJSON_AddStringToObject(m, "prefix", g->prefix);
    objs = cJSON_AddArrayToObject(m, "objects");
    for (size_t i = 0; i < r->nobjs && objs; i++) {
        upl_obj *o = &r->objs[i];
        if (o->g != g)
            continue;
        if (!o->sha256[0] && (rc = upl_tar_hash(r, o, err)) != LC_OK)
            goto out;
        cJSON *e = cJSON_CreateObject();
        cJSON_AddItemToArray(objs, e);
        cJSON_AddStringToObject(e, "key", o->rel);
        cJSON_AddNumberToObject(e, "size", (double)o->size);
        cJSON_AddStringToObject(e, "sha256", o->sha256);
        cJSON_AddStringToObject(e, "digest", o->digest);
        if (!o->tar) {
            cJSON_AddStringToObject(e, "series_instance_uid", o->members[0]->series);
            cJSON_AddStringToObject(e, "sop_instance_uid", o->members[0]->sop);
            continue;
        }
        cJSON *mem = cJSON_AddArrayToObject(e, "members");
        for (size_t k = 0; k < o->nmembers && mem; k++) {
            cJSON *x = cJSON_CreateObject();
            cJSON_AddItemToArray(mem, x);
            cJSON_AddStringToObject(x, "name", o->names[k]);
            cJSON_AddNumberToObject(x, "size", (double)o->members[k]->size);
            cJSON_AddStringToObject(x, "sha256", o->members[k]->sha256);
        }
    }
    if (!(text = cJSON_PrintUnformatted(m))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    /* deterministic bytes: an identical manifest already in place is left alone */
    char hex[65];
    lc_store_stat st;
    lc_err e2;
    lc_sha256_hex(text, strlen(text), hex);
    if (lc_store_head(g->dest->store, g->manifest_key, &st, &e2) == LC_OK &&
        strcmp(st.digest, hex) == 0)
        goto out;
    rc = lc_store_put_buf(g->dest->store, g->manifest_key, text, strlen(text), err);
    if (rc != LC_OK)
        lc_err_wrap(err, "could not write manifest \"%s\"", g->manifest_key);
out:
    free(text);
    cJSON_Delete(m);
    return rc;
}

/* --- the job ----------------------------------------------------------------------------- */

static void run_free(upl_run *r)
{
    for (size_t i = 0; i < r->ninsts; i++) {
        free(r->insts[i].sop);
        free(r->insts[i].series);
        free(r->insts[i].store_key);
    }
    for (size_t i = 0; i < r->nobjs; i++) {
        for (size_t k = 0; k < r->objs[i].nmembers; k++)
            free(r->objs[i].names[k]);
        free(r->objs[i].names);
        free(r->objs[i].members);
        free(r->objs[i].key);
    }
    for (size_t i = 0; i < r->ngroups; i++) {
        free(r->groups[i].prefix);
        free(r->groups[i].manifest_key);
    }
    free(r->insts);
    free(r->objs);
    free(r->groups);
    free(r->small);
    pthread_mutex_destroy(&r->mu);
}

/* Small instance objects on the copy threads while this thread watches for a stop and
 * publishes progress. */
static lc_rc run_pool(upl_run *r, lc_err *err)
{
    if (!r->nsmall)
        return LC_OK;
    size_t nthreads = (size_t)r->u->cfg->concurrency;
    if (nthreads > r->nsmall)
        nthreads = r->nsmall;
    pthread_t *t = calloc(nthreads, sizeof(*t));
    if (!t)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    size_t started = 0;
    for (; started < nthreads; started++)
        if (pthread_create(&t[started], NULL, upl_copy_thread, r) != 0)
            break;
    if (!started) {
        free(t);
        return lc_err_set(err, LC_ERR_INTERNAL, "could not start copy threads");
    }
    for (;;) {
        size_t next = atomic_load(&r->next);
        if (next >= r->nsmall + started || atomic_load(&r->failed))
            break;
        upl_run_should_stop(r);
        upl_run_progress(r, 0);
        if (atomic_load(&r->cancel))
            break;
        lc_sleep_ms(50, NULL);
    }
    for (size_t i = 0; i < started; i++)
        pthread_join(t[i], NULL);
    free(t);
    if (atomic_load(&r->failed)) {
        *err = r->ferr;
        return r->ferr.rc;
    }
    if (atomic_load(&r->cancel))
        return lc_err_set(err, LC_ERR_CANCELLED, "upload cancelled after %d objects",
                          atomic_load(&r->written) + atomic_load(&r->skipped));
    return LC_OK;
}

lc_rc upl_job(void *ctx, lc_worker_job *j, cJSON **result, lc_err *err)
{
    upl_ctx *u = ctx;
    upl_run r = {.u = u, .j = j};
    params pp;
    lc_rc rc;
    pthread_mutex_init(&r.mu, NULL);
    r.t0_ms = lc_now_ms();
    upl_dest_trim(u);
    if ((rc = read_params(u, j->job->params, &pp, err)) != LC_OK)
        goto out;
    r.layout = pp.layout;
    if (pp.pattern != u->cfg->url_pattern &&
        (rc = upl_pattern_validate(pp.pattern, err)) != LC_OK) {
        lc_err_wrap(err, "invalid url_pattern");
        rc = LC_ERR_INVALID;
        goto out;
    }
    if (upl_run_should_stop(&r)) {
        rc = lc_err_set(err, LC_ERR_CANCELLED, "upload cancelled before it began");
        goto out;
    }
    if ((rc = load_instances(&r, &pp, err)) != LC_OK || (rc = plan(&r, &pp, err)) != LC_OK)
        goto out;
    upl_run_progress(&r, 1);
    upl_list_existing(&r);

    /* small instance objects go out in parallel; large ones and tars one at a time here */
    if (!(r.small = calloc(r.nobjs, sizeof(size_t)))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < r.nobjs; i++) {
        int64_t thr = lc_store_multipart_threshold(r.objs[i].g->dest->store);
        if (!r.objs[i].tar && (thr == 0 || r.objs[i].size < thr))
            r.small[r.nsmall++] = i;
    }
    if ((rc = run_pool(&r, err)) != LC_OK)
        goto out;
    for (size_t i = 0; i < r.nobjs; i++) {
        upl_obj *o = &r.objs[i];
        int64_t thr = lc_store_multipart_threshold(o->g->dest->store);
        if (!o->tar && (thr == 0 || o->size < thr))
            continue;
        if (upl_run_should_stop(&r)) {
            rc = lc_err_set(err, LC_ERR_CANCELLED, "upload cancelled");
            goto out;
        }
        if ((rc = upl_copy_streamed(&r, o, err)) != LC_OK) {
            if (rc != LC_ERR_CANCELLED)
                lc_err_wrap(err, "could not archive \"%s\"", o->key);
            goto out;
        }
    }
    for (size_t i = 0; i < r.ngroups; i++)
        if ((rc = write_manifest(&r, &r.groups[i], err)) != LC_OK)
            goto out;
    upl_run_progress(&r, 1);

    cJSON *res = cJSON_CreateObject();
    if (!res) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    cJSON_AddNumberToObject(res, "objects", (double)r.nobjs);
    cJSON_AddNumberToObject(res, "written", atomic_load(&r.written));
    cJSON_AddNumberToObject(res, "skipped", atomic_load(&r.skipped));
    cJSON_AddNumberToObject(res, "instances", (double)r.ninsts);
    cJSON_AddNumberToObject(res, "bytes", (double)r.bytes_total);
    cJSON_AddStringToObject(res, "layout", r.layout);
    cJSON_AddStringToObject(res, "archive_url", lc_store_url(r.groups[0].dest->store));
    cJSON_AddStringToObject(res, "prefix", r.groups[0].prefix);
    cJSON *mans = cJSON_AddArrayToObject(res, "manifests");
    for (size_t i = 0; i < r.ngroups && mans; i++) {
        char *m = NULL;
        if (asprintf(&m, "%s/%s", lc_store_url(r.groups[i].dest->store),
                     r.groups[i].manifest_key) >= 0) {
            cJSON_AddItemToArray(mans, cJSON_CreateString(m));
            free(m);
        }
    }
    *result = res;
    lc_log_info("study archived", LC_LS("study", j->job->study_uid), LC_LS("layout", r.layout),
                LC_LI("objects", (long long)r.nobjs), LC_LI("skipped", atomic_load(&r.skipped)),
                LC_LI("bytes", r.bytes_total), LC_LI("ms", lc_now_ms() - r.t0_ms));
out:
    free(pp.series);
    run_free(&r);
    return rc;
}
