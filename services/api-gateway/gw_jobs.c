/*
 * gw_jobs.c: the job API: GET /api/v1/jobs (filtered, paged), GET /api/v1/jobs/{id},
 * POST /api/v1/studies/{uid}/jobs (create: 202 with the job), POST .../retry and .../cancel
 * (guarded transitions of lc/jobs.h, 409 when the state does not allow them) and
 * GET /api/v1/jobs/{id}/artifacts/{name} (streamed from the store, single byte ranges per
 * RFC 9110). Job parameters are passed through to the workers, which validate them. An
 * Idempotency-Key header makes a create safe to retry after an ambiguous failure (a 503 or a
 * lost answer after the commit): the same key answers the job created the first time.
 * Runs on worker threads, state per request.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <libpq-fe.h>
#include "gw.h"
#include "lc/jobs.h"
#include "lc/log.h"
#include "lc/util.h"

#define JOB_BODY_MAX     (64 * 1024)
#define JOB_MAX_ATTEMPTS 5

#define JOB_FIELDS                                                                                 \
    "'id', j.id, 'kind', j.kind, 'study_instance_uid', j.study_uid, 'state', j.state,"             \
    " 'params', j.params, 'progress', j.progress, 'result', j.result, 'error', j.error,"           \
    " 'attempts', j.attempts, 'max_attempts', j.max_attempts,"                                     \
    " 'created_at', " GW_TS("j.created_at") ", 'updated_at', " GW_TS(                              \
        "j.updated_at") ","                                                                        \
                        " 'started_at', " GW_TS("j.started_at") ", 'finished_at', " GW_TS(         \
                            "j.finished_at") ","                                                   \
                                             " 'artifacts', COALESCE((SELECT "                     \
                                             "json_agg(json_build_object("                         \
                                             "     'name', a.name, 'size', a.size_bytes, "         \
                                             "'media_type', a.media_type) ORDER BY a.name)"        \
                                             "   FROM job_artifacts a WHERE a.job_id = j.id), "    \
                                             "'[]'::json)"

static const char get_sql[] =
    "SELECT json_build_object(" JOB_FIELDS ")::text FROM jobs j WHERE j.id = $1::uuid";

/* $1 state, $2 kind, $3 study; NULL: no filter */
#define JOB_FILTER                                                                                 \
    " WHERE ($1::text IS NULL OR j.state = $1) AND ($2::text IS NULL OR j.kind = $2)"              \
    "   AND ($3::text IS NULL OR j.study_uid = $3)"

static const char list_sql[] = "SELECT json_build_object(" JOB_FIELDS
                               ")::text FROM jobs j" JOB_FILTER " ORDER BY j.created_at DESC, j.id"
                               " LIMIT $4::bigint OFFSET $5::bigint";
static const char count_sql[] = "SELECT count(*) FROM jobs j" JOB_FILTER;

/* The job as JSON into *out (NULL when it does not exist). */
static lc_rc job_json(gw_req *r, const char *id, cJSON **out, lc_err *err)
{
    lc_db *db = NULL;
    const char *p[1] = {id};
    lc_rc rc = gw_db(r, &db, err);
    return rc == LC_OK ? gw_query_json(db, get_sql, 1, p, NULL, out, err) : rc;
}

int gw_jobs_get(gw_req *r)
{
    const char *id = gw_param_get(r, "id");
    cJSON *job = NULL;
    lc_err err = {0};

    if (!id || !lc_uuid_valid(id))
        return gw_send_problem(r, 400, NULL, "\"%.80s\" is not a job id (a UUID)", id ? id : "");
    if (job_json(r, id, &job, &err) != LC_OK)
        return gw_send_unavailable(r, "the database", &err);
    if (!job)
        return gw_send_problem(r, 404, NULL, "no job with id %s", id);
    return gw_send_json(r, 200, job);
}

int gw_jobs_list(gw_req *r)
{
    char state[32], kind[32], study[80], lim[24], off[24];
    const char *p[5] = {NULL};
    long long limit, offset;
    lc_db *db = NULL;
    PGresult *res = NULL;
    lc_err err = {0};

    if (gw_query_int(r, "limit", 100, 1, 1000, &limit) != 0 ||
        gw_query_int(r, "offset", 0, 0, 1000000000LL, &offset) != 0)
        return 400;
    int f = gw_query(r, "state", state, sizeof(state));
    if (f < 0 || (f > 0 && lc_job_state_parse(state) < 0))
        return gw_send_problem(r, 400, NULL,
                               "invalid value for query parameter \"state\": one of queued, "
                               "running, succeeded, failed, dead, cancelled");
    p[0] = f > 0 ? state : NULL;
    f = gw_query(r, "kind", kind, sizeof(kind));
    if (f < 0 || (f > 0 && strcmp(kind, "upload") != 0 && strcmp(kind, "segment") != 0))
        return gw_send_problem(r, 400, NULL,
                               "invalid value for query parameter \"kind\": upload or segment");
    p[1] = f > 0 ? kind : NULL;
    f = gw_query(r, "study_instance_uid", study, sizeof(study));
    if (f < 0 || (f > 0 && !lc_dicom_uid_valid(study)))
        return gw_send_problem(r, 400, NULL,
                               "invalid value for query parameter \"study_instance_uid\": a "
                               "UID");
    p[2] = f > 0 ? study : NULL;
    snprintf(lim, sizeof(lim), "%lld", limit);
    snprintf(off, sizeof(off), "%lld", offset);
    p[3] = lim;
    p[4] = off;

    cJSON *o = cJSON_CreateObject();
    cJSON *items = cJSON_AddArrayToObject(o, "items");
    if (!items) {
        cJSON_Delete(o);
        return gw_send_problem(r, 500, NULL, "out of memory");
    }
    if (gw_db(r, &db, &err) != LC_OK || lc_db_exec(db, count_sql, 3, p, &res, &err) != LC_OK ||
        gw_query_json(db, list_sql, 5, p, items, NULL, &err) != LC_OK) {
        PQclear(res);
        cJSON_Delete(o);
        return gw_send_unavailable(r, "the database", &err);
    }
    cJSON_AddNumberToObject(o, "limit", (double)limit);
    cJSON_AddNumberToObject(o, "offset", (double)offset);
    cJSON_AddNumberToObject(o, "total", (double)strtoll(PQgetvalue(res, 0, 0), NULL, 10));
    PQclear(res);
    return gw_send_json(r, 200, o);
}

/* --- create, retry, cancel --------------------------------------------------------------- */

typedef struct mem_body {
    char *buf;
    size_t len, cap;
} mem_body;

static lc_rc mem_piece(void *ctx, const char *buf, size_t len, lc_err *err)
{
    mem_body *m = ctx;
    if (m->len + len > m->cap)
        return lc_err_set(err, LC_ERR_TOO_LARGE, "request body is over the limit of %zu bytes",
                          m->cap);
    memcpy(m->buf + m->len, buf, len);
    m->len += len;
    return LC_OK;
}

/* A small JSON body (an object; an empty body is "{}") into *out; sends the error answer and
 * returns its status on failure, 0 on success. */
static int read_json_object(gw_req *r, cJSON **out)
{
    char *buf = malloc(JOB_BODY_MAX + 1);
    mem_body m = {buf, 0, JOB_BODY_MAX};
    lc_err err = {0};
    *out = NULL;
    if (!buf)
        return gw_send_problem(r, 500, NULL, "out of memory");
    lc_rc rc = gw_body_read(r, JOB_BODY_MAX, mem_piece, &m, NULL, &err);
    if (rc != LC_OK) {
        free(buf);
        return gw_send_problem(r, rc == LC_ERR_TOO_LARGE ? 413 : 400, NULL, "%s", lc_err_msg(&err));
    }
    buf[m.len] = '\0';
    const char *ct = gw_header_get(r, "Content-Type");
    if (m.len > 0 && !gw_media_type_is(ct, "application/json")) {
        free(buf);
        return gw_send_problem(r, 415, NULL, "send the body as application/json");
    }
    cJSON *j = m.len ? cJSON_ParseWithLength(buf, m.len) : cJSON_CreateObject();
    free(buf);
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return gw_send_problem(r, 400, NULL, "the body is not a JSON object");
    }
    *out = j;
    return 0;
}

/* The only members allowed in a body object; answers 400 for others. */
static int members_known(gw_req *r, const cJSON *o, const char *const *allowed)
{
    if (!o) {
        gw_send_problem(r, 400, NULL, "the body is not a JSON object");
        return 0;
    }
    for (const cJSON *c = o->child; c; c = c->next) {
        int ok = 0;
        for (const char *const *a = allowed; *a && !ok; a++)
            ok = c->string && strcmp(c->string, *a) == 0;
        if (!ok) {
            gw_send_problem(r, 400, NULL, "unknown member \"%.64s\" in the body",
                            c->string ? c->string : "");
            return 0;
        }
    }
    return 1;
}

typedef struct create_ctx {
    gw_req *r;
    const char *kind, *study;
    const cJSON *params;
    const char *dedupe_key; /* from Idempotency-Key; NULL without one */
    char id[37];
    int exists;  /* the study is known */
    int created; /* a new job (0: the Idempotency-Key's earlier job) */
} create_ctx;

static lc_rc create_tx(lc_db *db, void *arg, lc_err *err)
{
    create_ctx *c = arg;
    PGresult *res = NULL;
    const char *p[1] = {c->study};
    lc_rc rc = lc_db_exec(db, "SELECT 1 FROM studies WHERE study_uid = $1", 1, p, &res, err);
    if (rc != LC_OK)
        return rc;
    c->exists = PQntuples(res) == 1;
    PQclear(res);
    if (!c->exists)
        return LC_OK;
    return lc_job_create(db, c->r->g->deps.topic_prefix, c->r->g->deps.source, c->kind, c->study,
                         c->params, c->dedupe_key, JOB_MAX_ATTEMPTS, c->id, &c->created, err);
}

/* Idempotency-Key (draft-ietf-httpapi-idempotency-key-header): 1 to 255 visible ASCII
 * characters, optionally a quoted string. The job's dedupe key is scoped to the token, so two
 * clients cannot collide: "api-idem:" + SHA-256 of token id and key. Returns 0 and fills out
 * ("" without the header), or sends 400 and returns its status. */
static int idempotency_key(gw_req *r, char out[80])
{
    const char *h = gw_header_get(r, "Idempotency-Key");
    char key[256], hex[65], *scoped = NULL;
    out[0] = '\0';
    if (!h)
        return 0;
    size_t n = strlen(h);
    if (n >= 2 && h[0] == '"' && h[n - 1] == '"') {
        h++;
        n -= 2;
    }
    int ok = n >= 1 && n < sizeof(key);
    for (size_t i = 0; ok && i < n; i++)
        ok = h[i] > 0x20 && h[i] < 0x7f && h[i] != '"';
    if (!ok)
        return gw_send_problem(r, 400, NULL,
                               "the Idempotency-Key header must be 1 to 255 visible ASCII "
                               "characters");
    memcpy(key, h, n);
    key[n] = '\0';
    if (asprintf(&scoped, "%s\n%s", r->token_id, key) < 0)
        return gw_send_problem(r, 500, NULL, "out of memory");
    lc_sha256_hex(scoped, strlen(scoped), hex);
    free(scoped);
    snprintf(out, 80, "api-idem:%s", hex);
    return 0;
}

/* 1 when the job (as job_json gives it) is what this request asks for. */
static int same_request(const cJSON *job, const char *kind, const char *study, const cJSON *params)
{
    const char *k = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(job, "kind"));
    const char *s =
        cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(job, "study_instance_uid"));
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(job, "params");
    cJSON *empty = params ? NULL : cJSON_CreateObject();
    int same = k && s && strcmp(k, kind) == 0 && strcmp(s, study) == 0 &&
               cJSON_Compare(p, params ? params : empty, 1);
    cJSON_Delete(empty);
    return same;
}

int gw_jobs_create(gw_req *r)
{
    static const char *const allowed[] = {"kind", "params", NULL};
    const char *study = gw_param_get(r, "uid");
    cJSON *body = NULL, *job = NULL;
    lc_db *db = NULL;
    lc_err err = {0};
    char idem[80];
    int status;

    if (!study || !lc_dicom_uid_valid(study))
        return gw_send_problem(r, 400, NULL, "\"%.80s\" is not a valid StudyInstanceUID",
                               study ? study : "");
    if ((status = idempotency_key(r, idem)) != 0)
        return status;
    gw_db_put(r);
    if ((status = read_json_object(r, &body)) != 0)
        return status;
    if (!members_known(r, body, allowed)) {
        cJSON_Delete(body);
        return 400;
    }
    const char *kind = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(body, "kind"));
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(body, "params");
    if (!kind || (strcmp(kind, "segment") != 0 && strcmp(kind, "upload") != 0)) {
        cJSON_Delete(body);
        return gw_send_problem(r, 400, NULL, "\"kind\" must be \"segment\" or \"upload\"");
    }
    if (params && !cJSON_IsObject(params)) {
        cJSON_Delete(body);
        return gw_send_problem(r, 400, NULL, "\"params\" must be a JSON object");
    }
    create_ctx c = {.r = r,
                    .kind = kind,
                    .study = study,
                    .params = params,
                    .dedupe_key = idem[0] ? idem : NULL};
    if (gw_db(r, &db, &err) != LC_OK || lc_db_tx(db, 3, create_tx, &c, &err) != LC_OK) {
        cJSON_Delete(body);
        return gw_send_unavailable(r, "the database", &err);
    }
    if (!c.exists) {
        cJSON_Delete(body);
        return gw_send_problem(r, 404, NULL, "no study with StudyInstanceUID %s", study);
    }
    if (job_json(r, c.id, &job, &err) != LC_OK || !job) {
        cJSON_Delete(body);
        return gw_send_unavailable(r, "the database", &err);
    }
    /* a replay under an Idempotency-Key answers the earlier job, unless the key now comes
     * with another request */
    if (!c.created && !same_request(job, kind, study, params)) {
        cJSON_Delete(body);
        cJSON_Delete(job);
        return gw_send_problem(r, 422, NULL,
                               "this Idempotency-Key was used for job %s, which was created "
                               "with another kind, study or params",
                               c.id);
    }
    if (c.created)
        lc_log_info("job created", LC_LS("job_id", c.id), LC_LS("kind", kind),
                    LC_LS("token", r->token_name));
    else
        lc_log_info("job create replayed", LC_LS("job_id", c.id), LC_LS("kind", kind),
                    LC_LS("token", r->token_name));
    cJSON_Delete(body); /* kind and params pointed into it */
    char loc[80];
    snprintf(loc, sizeof(loc), "/api/v1/jobs/%s", c.id);
    char *s = cJSON_PrintUnformatted(job);
    cJSON_Delete(job);
    if (!s) { /* the job exists: a retry with the same Idempotency-Key answers it */
        static const gw_header ra[] = {{"Retry-After", "5"}, {NULL, NULL}};
        return gw_send_problem(r, 503, ra, "the server is out of memory; retry later");
    }
    const gw_header h[] = {{"Location", loc}, {NULL, NULL}};
    status = gw_send(r, 202, "application/json", s, strlen(s), h);
    free(s);
    return status;
}

static int transition(gw_req *r, int cancel)
{
    const char *id = gw_param_get(r, "id");
    cJSON *job = NULL;
    lc_db *db = NULL;
    lc_err err = {0};
    char reason[128];

    if (!id || !lc_uuid_valid(id))
        return gw_send_problem(r, 400, NULL, "\"%.80s\" is not a job id (a UUID)", id ? id : "");
    snprintf(reason, sizeof(reason), "cancelled through the API by \"%.64s\"", r->token_name);
    lc_rc rc = gw_db(r, &db, &err);
    if (rc == LC_OK)
        rc = cancel
                 ? lc_job_cancel(db, r->g->deps.topic_prefix, r->g->deps.source, id, reason, &err)
                 : lc_job_retry(db, r->g->deps.topic_prefix, r->g->deps.source, id, &err);
    if (rc == LC_ERR_NOT_FOUND)
        return gw_send_problem(r, 404, NULL, "no job with id %s", id);
    if (rc == LC_ERR_CONFLICT)
        return gw_send_problem(r, 409, NULL, "%s", lc_err_msg(&err));
    if (rc != LC_OK)
        return gw_send_unavailable(r, "the database", &err);
    if (job_json(r, id, &job, &err) != LC_OK || !job)
        return gw_send_unavailable(r, "the database", &err);
    lc_log_info(cancel ? "job cancelled" : "job retried", LC_LS("job_id", id),
                LC_LS("token", r->token_name));
    return gw_send_json(r, 202, job);
}

int gw_jobs_retry(gw_req *r)
{
    return transition(r, 0);
}

int gw_jobs_cancel(gw_req *r)
{
    return transition(r, 1);
}

/* --- artifacts --------------------------------------------------------------------------- */

static int to_client(void *ctx, const void *buf, size_t len)
{
    return gw_write(ctx, buf, len) == 0 ? 0 : 1;
}

/* RFC 9110 14.1.2: one "bytes=first-last", "bytes=first-" or "bytes=-suffix". Returns 1 with
 * [*from, *to] (inclusive) for a satisfiable range, 0 to ignore the header (not bytes, several
 * ranges, malformed), -1 when unsatisfiable (416). */
static int parse_range(const char *h, long long size, long long *from, long long *to)
{
    const char *p = h;
    while (*p == ' ')
        p++;
    if (strncasecmp(p, "bytes=", 6) != 0)
        return 0;
    p += 6;
    while (*p == ' ')
        p++;
    if (strchr(p, ','))
        return 0; /* several ranges: the whole representation instead (allowed) */
    char *end;
    if (*p == '-') {
        if (p[1] < '0' || p[1] > '9')
            return 0;
        long long n = strtoll(p + 1, &end, 10);
        while (*end == ' ')
            end++;
        if (*end || n < 0)
            return 0;
        if (n == 0 || size == 0)
            return -1;
        *from = n >= size ? 0 : size - n;
        *to = size - 1;
        return 1;
    }
    if (*p < '0' || *p > '9')
        return 0;
    long long a = strtoll(p, &end, 10);
    if (*end != '-')
        return 0;
    p = end + 1;
    long long b = size - 1;
    if (*p >= '0' && *p <= '9') {
        b = strtoll(p, &end, 10);
        p = end;
        if (b < a)
            return 0; /* invalid: ignored */
    }
    while (*p == ' ')
        p++;
    if (*p)
        return 0;
    if (a >= size)
        return -1;
    *from = a;
    *to = b >= size ? size - 1 : b;
    return 1;
}

int gw_jobs_artifact(gw_req *r)
{
    const char *id = gw_param_get(r, "id"), *name = gw_param_get(r, "name");
    lc_db *db = NULL;
    PGresult *res = NULL;
    lc_err err = {0};
    lc_store_stat st;
    char etag[96], crange[96], disp[200];
    int status;

    if (!id || !lc_uuid_valid(id))
        return gw_send_problem(r, 400, NULL, "\"%.80s\" is not a job id (a UUID)", id ? id : "");
    if (!name || !*name || strlen(name) > 128 ||
        strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") !=
            strlen(name) ||
        name[0] == '.')
        return gw_send_problem(r, 400, NULL, "\"%.80s\" is not an artifact name", name ? name : "");
    const char *p[2] = {id, name};
    if (gw_db(r, &db, &err) != LC_OK || lc_db_exec(db,
                                                   "SELECT store_key, media_type FROM job_artifacts"
                                                   " WHERE job_id = $1::uuid AND name = $2",
                                                   2, p, &res, &err) != LC_OK)
        return gw_send_unavailable(r, "the database", &err);
    gw_db_put(r);
    if (PQntuples(res) != 1) {
        PQclear(res);
        return gw_send_problem(r, 404, NULL, "job %s has no artifact \"%s\"", id, name);
    }
    const char *key = PQgetvalue(res, 0, 0), *media = PQgetvalue(res, 0, 1);
    lc_rc rc = lc_store_head(r->g->deps.store, key, &st, &err);
    if (rc == LC_ERR_NOT_FOUND) {
        status = gw_send_problem(r, 404, NULL, "the artifact's object is gone from the store");
        goto out;
    } else if (rc != LC_OK) {
        status = gw_send_unavailable(r, "the object store", &err);
        goto out;
    }
    /* strong validator: the stored digest when the backend keeps one, else size and time */
    if (st.digest[0])
        snprintf(etag, sizeof(etag), "\"%.64s\"", st.digest);
    else
        snprintf(etag, sizeof(etag), "\"%llx-%llx\"", (long long)st.size, (long long)st.mtime_ms);
    snprintf(disp, sizeof(disp), "attachment; filename=\"%s\"", name);
    long long from = 0, to = st.size - 1;
    const char *range = gw_header_get(r, "Range");
    const char *if_range = gw_header_get(r, "If-Range");
    int ranged = range && (!if_range || strcmp(if_range, etag) == 0)
                     ? parse_range(range, st.size, &from, &to)
                     : 0;
    if (ranged < 0) {
        snprintf(crange, sizeof(crange), "bytes */%lld", (long long)st.size);
        const gw_header h[] = {{"Content-Range", crange}, {"Accept-Ranges", "bytes"}, {NULL, NULL}};
        status = gw_send_problem(r, 416, h, "the range is outside the artifact's %lld bytes",
                                 (long long)st.size);
        goto out;
    }
    snprintf(crange, sizeof(crange), "bytes %lld-%lld/%lld", from, to, (long long)st.size);
    const gw_header h[] = {{"Accept-Ranges", "bytes"},
                           {"ETag", etag},
                           {"Content-Disposition", disp},
                           {ranged ? "Content-Range" : NULL, crange},
                           {NULL, NULL}};
    status = ranged ? 206 : 200;
    gw_send_head(r, status, media, ranged ? to - from + 1 : (long long)st.size, h);
    if (st.size > 0) {
        rc = lc_store_read(r->g->deps.store, key, from, to - from + 1, to_client, r, &err);
        if (rc != LC_OK && !r->gone) {
            lc_log_warn("could not stream an artifact", LC_LS("key", key),
                        LC_LS("error", lc_err_msg(&err)));
            gw_abort(r);
        }
    }
out:
    PQclear(res);
    return status;
}
