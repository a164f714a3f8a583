/*
 * gw_studies.c: GET /api/v1/studies (filtered, paged list) and GET /api/v1/studies/{uid}
 * (one study with its series and jobs), read from the index the dicom-indexer maintains.
 * PostgreSQL builds each item's JSON (json_build_object), so types, NULLs and arrays come
 * out right; filters are bound parameters only. Runs on worker threads, state per request.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libpq-fe.h>
#include "gw.h"
#include "gw_buf.h"
#include "gw_qido.h"
#include "lc/dicom.h"
#include "lc/event.h"
#include "lc/kafka.h"
#include "lc/log.h"
#include "lc/outbox.h"

#define STUDY_FIELDS                                                                               \
    "'study_instance_uid', s.study_uid, 'patient_id', s.patient_id,"                               \
    " 'patient_name', s.patient_name, 'study_date', s.study_date, 'study_time', s.study_time,"     \
    " 'accession_number', s.accession_number, 'study_description', s.study_description,"           \
    " 'modalities', s.modalities, 'num_series', s.num_series,"                                     \
    " 'num_instances', s.num_instances, 'completed_version', s.completed_version,"                 \
    " 'created_at', " GW_TS("s.created_at") ", 'updated_at', " GW_TS("s.updated_at")

/* $1 patient_id, $2 modality, $3 study_date, $4 patient_name (LIKE pattern), $5 accession
 * number, $6 first date, $7 last date; NULL means "no filter" */
#define STUDY_FILTER                                                                               \
    " WHERE ($1::text IS NULL OR s.patient_id = $1)"                                               \
    "   AND ($2::text IS NULL OR $2 = ANY (s.modalities))"                                         \
    "   AND ($3::text IS NULL OR s.study_date = $3)"                                               \
    "   AND ($4::text IS NULL OR coalesce(s.patient_name_norm, upper(s.patient_name))"             \
    "        LIKE upper($4))"                                                                      \
    "   AND ($5::text IS NULL OR s.accession_number = $5)"                                         \
    "   AND ($6::text IS NULL OR s.study_date >= $6)"                                              \
    "   AND ($7::text IS NULL OR s.study_date <= $7)"
#define NFILTERS 7

static const char count_sql[] = "SELECT count(*) FROM studies s" STUDY_FILTER;

/* sort=<key> or -<key> (descending); the ORDER BY fragments are this table's, never input */
static const struct {
    const char *key, *asc, *desc;
} sorts[] = {
    {"created_at", "s.created_at, s.study_uid", "s.created_at DESC, s.study_uid"},
    {"updated_at", "s.updated_at, s.study_uid", "s.updated_at DESC, s.study_uid"},
    {"study_date", "s.study_date NULLS FIRST, s.study_time NULLS FIRST, s.study_uid",
     "s.study_date DESC NULLS LAST, s.study_time DESC NULLS LAST, s.study_uid"},
    {"patient_name", "s.patient_name NULLS LAST, s.study_uid",
     "s.patient_name DESC NULLS LAST, s.study_uid"},
    {"patient_id", "s.patient_id NULLS LAST, s.study_uid",
     "s.patient_id DESC NULLS LAST, s.study_uid"},
};

static const char get_sql[] =
    "SELECT json_build_object(" STUDY_FIELDS ","
    " 'series', COALESCE((SELECT json_agg(json_build_object("
    "     'series_instance_uid', se.series_uid, 'modality', se.modality,"
    "     'series_number', se.series_number, 'series_description', se.series_description,"
    "     'num_instances', se.num_instances)"
    "   ORDER BY se.series_number NULLS LAST, se.series_uid)"
    "   FROM series se WHERE se.study_uid = s.study_uid), '[]'::json),"
    " 'jobs', COALESCE((SELECT json_agg(json_build_object("
    "     'id', j.id, 'kind', j.kind, 'state', j.state, 'attempts', j.attempts,"
    "     'error', j.error, 'created_at', " GW_TS(
        "j.created_at") ","
                        "     'updated_at', " GW_TS(
                            "j.updated_at") ")"
                                            "   ORDER BY j.created_at, j.id)"
                                            "   FROM jobs j WHERE j.study_uid = s.study_uid), "
                                            "'[]'::json))::text"
                                            " FROM studies s WHERE s.study_uid = $1";

/* One optional text filter: NULL when absent; sends 400 and returns -1 when unusable. */
static int text_filter(gw_req *r, const char *name, char *buf, size_t cap, const char **out)
{
    int found = gw_query(r, name, buf, cap);
    *out = NULL;
    if (found < 0) {
        gw_send_problem(r, 400, NULL, "query parameter \"%s\" is longer than %zu bytes", name,
                        cap - 1);
        return -1;
    }
    if (found > 0)
        *out = buf;
    return 0;
}

/* A DICOM wildcard value (* and ?) as a LIKE pattern. */
static void like_pattern(const char *v, char *out, size_t cap)
{
    size_t n = 0;
    for (; *v && n + 3 < cap; v++) {
        if (*v == '\\' || *v == '%' || *v == '_')
            out[n++] = '\\';
        out[n++] = *v == '*' ? '%' : *v == '?' ? '_' : *v;
    }
    out[n] = '\0';
}

static int date_filter(gw_req *r, const char *name, char *buf, size_t cap, const char **out)
{
    if (text_filter(r, name, buf, cap, out) != 0)
        return -1;
    if (*out && !gw_qido_date_ok(*out, strlen(*out))) {
        gw_send_problem(r, 400, NULL,
                        "invalid value for query parameter \"%s\": must be a date YYYYMMDD", name);
        return -1;
    }
    return 0;
}

int gw_studies_list(gw_req *r)
{
    char pid[256], mod[64], date[16], name[256], like[520], acc[64], from[16], to[16], sort[32];
    char lim[24], off[24];
    const char *p[NFILTERS + 2] = {NULL}, *nm = NULL, *srt = NULL, *order = sorts[0].desc;
    long long limit, offset;
    lc_db *db = NULL;
    PGresult *res = NULL;
    lc_err err = {0};
    gw_buf sql = {0};

    /* unknown query parameters were refused by the router (gw_route.query) */
    if (gw_query_int(r, "limit", 100, 1, 1000, &limit) != 0 ||
        gw_query_int(r, "offset", 0, 0, 1000000000LL, &offset) != 0 ||
        text_filter(r, "patient_id", pid, sizeof(pid), &p[0]) != 0 ||
        text_filter(r, "modality", mod, sizeof(mod), &p[1]) != 0 ||
        date_filter(r, "study_date", date, sizeof(date), &p[2]) != 0 ||
        text_filter(r, "patient_name", name, sizeof(name), &nm) != 0 ||
        text_filter(r, "accession_number", acc, sizeof(acc), &p[4]) != 0 ||
        date_filter(r, "study_date_from", from, sizeof(from), &p[5]) != 0 ||
        date_filter(r, "study_date_to", to, sizeof(to), &p[6]) != 0 ||
        text_filter(r, "sort", sort, sizeof(sort), &srt) != 0)
        return 400;
    if (nm) {
        like_pattern(nm, like, sizeof(like));
        p[3] = like;
    }
    if (srt) {
        const char *k = srt[0] == '-' ? srt + 1 : srt;
        order = NULL;
        for (size_t i = 0; i < sizeof(sorts) / sizeof(sorts[0]); i++)
            if (strcmp(k, sorts[i].key) == 0)
                order = srt[0] == '-' ? sorts[i].desc : sorts[i].asc;
        if (!order)
            return gw_send_problem(r, 400, NULL,
                                   "invalid value for query parameter \"sort\": created_at, "
                                   "updated_at, study_date, patient_name or patient_id, with - "
                                   "for descending");
    }
    snprintf(lim, sizeof(lim), "%lld", limit);
    snprintf(off, sizeof(off), "%lld", offset);
    p[NFILTERS] = lim;
    p[NFILTERS + 1] = off;
    gw_buf_addf(&sql,
                "SELECT json_build_object(%s)::text FROM studies s %s ORDER BY %s"
                " LIMIT $8::bigint OFFSET $9::bigint",
                STUDY_FIELDS, STUDY_FILTER, order);

    cJSON *o = cJSON_CreateObject();
    cJSON *items = cJSON_AddArrayToObject(o, "items");
    if (!items || !gw_buf_cstr(&sql)) {
        cJSON_Delete(o);
        gw_buf_free(&sql);
        return gw_send_problem(r, 500, NULL, "out of memory");
    }
    if (gw_db(r, &db, &err) != LC_OK ||
        lc_db_exec(db, count_sql, NFILTERS, p, &res, &err) != LC_OK ||
        gw_query_json(db, gw_buf_cstr(&sql), NFILTERS + 2, p, items, NULL, &err) != LC_OK) {
        PQclear(res);
        cJSON_Delete(o);
        gw_buf_free(&sql);
        return gw_send_unavailable(r, "the database", &err);
    }
    gw_buf_free(&sql);
    cJSON_AddNumberToObject(o, "limit", (double)limit);
    cJSON_AddNumberToObject(o, "offset", (double)offset);
    cJSON_AddNumberToObject(o, "total", (double)strtoll(PQgetvalue(res, 0, 0), NULL, 10));
    PQclear(res);
    return gw_send_json(r, 200, o);
}

int gw_studies_get(gw_req *r)
{
    const char *uid = gw_param_get(r, "uid");
    lc_db *db = NULL;
    cJSON *study = NULL;
    lc_err err = {0};
    const char *p[1] = {uid};

    if (!uid || !lc_dicom_uid_valid(uid))
        return gw_send_problem(r, 400, NULL, "\"%.80s\" is not a valid StudyInstanceUID",
                               uid ? uid : "");
    if (gw_db(r, &db, &err) != LC_OK ||
        gw_query_json(db, get_sql, 1, p, NULL, &study, &err) != LC_OK)
        return gw_send_unavailable(r, "the database", &err);
    if (!study)
        return gw_send_problem(r, 404, NULL, "no study with StudyInstanceUID %s", uid);
    return gw_send_json(r, 200, study);
}

/* --- POST /api/v1/studies/{uid}/complete ------------------------------------------------- */

typedef struct close_ctx {
    const char *prefix;
    const lc_event *ev;
} close_ctx;

static lc_rc close_tx(lc_db *db, void *arg, lc_err *err)
{
    const close_ctx *c = arg;
    return lc_outbox_add_event(db, c->prefix, LC_TOPIC_STUDY_CLOSE, c->ev, err);
}

/* proto/events/study.close.json: data.reason has maxLength 256, which JSON Schema counts in
 * characters (code points), not bytes */
#define CLOSE_REASON_MAX 256

/* Code points of a UTF-8 string, -1 when it is not valid UTF-8 (cJSON passes the bytes of
 * a JSON string through unchecked). Overlong forms and surrogates are not valid. */
static long utf8_chars(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    long n = 0;
    while (*p) {
        unsigned c = *p;
        int len = c < 0x80             ? 1
                  : (c & 0xE0) == 0xC0 ? 2
                  : (c & 0xF0) == 0xE0 ? 3
                  : (c & 0xF8) == 0xF0 ? 4
                                       : 0;
        unsigned cp = len == 1 ? c : len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
        if (!len)
            return -1;
        for (int i = 1; i < len; i++) {
            if ((p[i] & 0xC0) != 0x80)
                return -1;
            cp = (cp << 6) | (p[i] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return -1;
        p += len;
        n++;
    }
    return n;
}

typedef struct small_body {
    char buf[4097];
    size_t len;
} small_body;

static lc_rc small_piece(void *ctx, const char *buf, size_t len, lc_err *err)
{
    small_body *b = ctx;
    if (b->len + len > sizeof(b->buf) - 1)
        return lc_err_set(err, LC_ERR_TOO_LARGE, "request body is over the limit of %zu bytes",
                          sizeof(b->buf) - 1);
    memcpy(b->buf + b->len, buf, len);
    b->len += len;
    return LC_OK;
}

/* The client says the study is complete: a radpipe.study.close event (proto/events), which
 * the indexer turns into a completion at once instead of after the quiet period. The study
 * need not be indexed yet: the event is keyed by the study, so it follows the study's
 * instance.stored events on the same partition. */
int gw_studies_complete(gw_req *r)
{
    const char *uid = gw_param_get(r, "uid");
    small_body *b = NULL;
    lc_event *ev = NULL;
    lc_db *db = NULL;
    lc_err err = {0};
    cJSON *body = NULL, *data = NULL, *src = NULL;
    const char *reason = NULL;
    int status;

    if (!uid || !lc_dicom_uid_valid(uid))
        return gw_send_problem(r, 400, NULL, "\"%.80s\" is not a valid StudyInstanceUID",
                               uid ? uid : "");
    gw_db_put(r);
    if (!(b = calloc(1, sizeof(*b))))
        return gw_send_problem(r, 500, NULL, "out of memory");
    lc_rc rc = gw_body_read(r, sizeof(b->buf) - 1, small_piece, b, NULL, &err);
    if (rc != LC_OK) {
        status =
            gw_send_problem(r, rc == LC_ERR_TOO_LARGE ? 413 : 400, NULL, "%s", lc_err_msg(&err));
        goto out;
    }
    if (b->len) {
        if (!gw_media_type_is(gw_header_get(r, "Content-Type"), "application/json")) {
            status = gw_send_problem(r, 415, NULL, "send the body as application/json");
            goto out;
        }
        body = cJSON_ParseWithLength(b->buf, b->len);
        cJSON *c = body ? body->child : NULL;
        if (!cJSON_IsObject(body) || (c && (c->next || strcmp(c->string, "reason") != 0)) ||
            (c && !cJSON_IsString(c))) {
            status = gw_send_problem(r, 400, NULL,
                                     "the body must be a JSON object with at most a \"reason\" "
                                     "string");
            goto out;
        }
        reason = c ? c->valuestring : NULL;
        long chars = reason ? utf8_chars(reason) : 0;
        if (chars < 0) {
            status = gw_send_problem(r, 400, NULL, "\"reason\" is not valid UTF-8");
            goto out;
        }
        if (chars > CLOSE_REASON_MAX) {
            status = gw_send_problem(r, 400, NULL,
                                     "\"reason\" is %ld characters long: at most %d are allowed",
                                     chars, CLOSE_REASON_MAX);
            goto out;
        }
    }
    if (!(data = cJSON_CreateObject()) ||
        !cJSON_AddStringToObject(data, "study_instance_uid", uid) ||
        (reason && !cJSON_AddStringToObject(data, "reason", reason)) ||
        !(src = cJSON_AddObjectToObject(data, "source")) ||
        !cJSON_AddStringToObject(src, "kind", "http") ||
        !cJSON_AddStringToObject(src, "name", r->token_name)) {
        cJSON_Delete(data);
        status = gw_send_problem(r, 500, NULL, "out of memory");
        goto out;
    }
    if (lc_event_new(LC_EV_STUDY_CLOSE, r->g->deps.source, uid, data, &ev, &err) != LC_OK) {
        status = gw_send_problem(r, 500, NULL, "could not build the event: %s", lc_err_msg(&err));
        goto out;
    }
    close_ctx cc = {r->g->deps.topic_prefix, ev};
    if (gw_db(r, &db, &err) != LC_OK || lc_db_tx(db, 3, close_tx, &cc, &err) != LC_OK) {
        status = gw_send_unavailable(r, "the database", &err);
        goto out;
    }
    lc_log_info("study close requested", LC_LS("study", uid), LC_LS("token", r->token_name));
    cJSON *ok = cJSON_CreateObject();
    cJSON_AddStringToObject(ok, "study_instance_uid", uid);
    cJSON_AddStringToObject(ok, "event_id", ev->id);
    status = gw_send_json(r, 202, ok);
out:
    cJSON_Delete(body);
    lc_event_free(ev);
    free(b);
    return status;
}
