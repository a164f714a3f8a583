/*
 * test_gw.c: the api-gateway's HTTP server started in-process (gw_start with a hand-made
 * context, no Kafka: outbox rows are checked in the database) on a free port, against a fresh
 * migrated database on the real PostgreSQL of tests/run.sh and a file:// store in a temporary
 * directory, driven over HTTP with libcurl: uploads of real DICOM files, auth and scopes (one
 * table-driven check over every route of the router table, with the one answer to unknown
 * query parameters), limits, queries, routing errors, CORS, metrics, the bootstrap token, the
 * OpenAPI file, job creation with Idempotency-Key, the study close reason, QIDO-RS warnings,
 * WADO-RS frame lists and metadata paging, the element path walker of WADO-RS bulk data, the
 * multipart parser fed in pieces of every size, and a STOW-RS request of several instances
 * over several directories (batched fsyncs, one outbox statement).
 */
#include <dirent.h>
#include <pthread.h>
#include <stdarg.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <cmocka.h>
#include <curl/curl.h>
#include <cjson/cJSON.h>
#include "gw.h"
#include "gw_dcmwalk.h"
#include "gw_multipart.h"
#include "lc/db.h"
#include "lc/dicom.h"
#include "lc/event.h"
#include "lc/log.h"
#include "lc/store.h"
#include "lc/util.h"
#include "ts.h"

#define MAX_BODY    (256 * 1024)
#define TOK_READ    "rpt_test_read_0123456789"
#define TOK_WRITE   "rpt_test_write_0123456789"
#define TOK_REVOKED "rpt_test_revoked_0123456789"
#define TOK_EXPIRED "rpt_test_expired_0123456789"
#define TOK_BOOT    "rpt_bootstrap_from_file_0123456789"
#define TOK_NOSCOPE "rpt_test_noscope_0123456789"
#define TOK_ADMIN   "rpt_test_admin_0123456789"
#define STUDY_A     "1.2.826.0.1.3680043.10.1.1"
#define STUDY_B     "1.2.826.0.1.3680043.10.1.2"
#define STUDY_C     "1.2.826.0.1.3680043.10.1.3"
#define JOB_ID      "5b0f3c1e-8d2a-4c55-9a51-0c7f1e2d3a4b"

typedef struct fixture {
    char *db_url;
    char *tmp;
    char spool[1024], objects_url[1100], token_file[1024];
    lc_db *db; /* the test's own connection, for setup and checks */
    lc_store *store;
    lc_metrics *metrics;
    gw_config cfg;
    gw_deps deps;
    gw g;
    char base[64], listen[64];
} fixture;

typedef struct resp {
    long status;
    char *body;
    size_t len;
    char *headers;
    size_t hlen;
    CURLcode cc;
} resp;

/* --- small helpers ---------------------------------------------------------------------- */

static void exec_ok(lc_db *db, const char *sql, int n, const char *const *p)
{
    lc_err err = {0};
    if (lc_db_exec(db, sql, n, p, NULL, &err) != LC_OK)
        fail_msg("%s: %s", sql, lc_err_msg(&err));
}

static long long query_ll(lc_db *db, const char *sql, int n, const char *const *p)
{
    PGresult *r = NULL;
    lc_err err = {0};
    if (lc_db_exec(db, sql, n, p, &r, &err) != LC_OK)
        fail_msg("%s: %s", sql, lc_err_msg(&err));
    assert_int_equal(PQntuples(r), 1);
    long long v = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

static void add_token(lc_db *db, const char *name, const char *token, const char *scopes,
                      const char *expires, const char *revoked)
{
    char hash[65], id[37];
    gw_token_hash(token, hash);
    lc_uuid_v4(id);
    const char *p[6] = {id, name, hash, scopes, expires, revoked};
    exec_ok(db,
            "INSERT INTO api_tokens (id, name, token_sha256, scopes, expires_at, revoked_at)"
            " VALUES ($1::uuid, $2, decode($3, 'hex'), $4::text[], $5::timestamptz,"
            "         $6::timestamptz)",
            6, p);
}

static size_t on_body(char *ptr, size_t size, size_t n, void *ud)
{
    resp *r = ud;
    size_t len = size * n;
    char *b = realloc(r->body, r->len + len + 1);
    if (!b)
        return 0;
    memcpy(b + r->len, ptr, len);
    r->len += len;
    b[r->len] = '\0';
    r->body = b;
    return len;
}

static size_t on_header(char *ptr, size_t size, size_t n, void *ud)
{
    resp *r = ud;
    size_t len = size * n;
    char *b = realloc(r->headers, r->hlen + len + 1);
    if (!b)
        return 0;
    memcpy(b + r->hlen, ptr, len);
    r->hlen += len;
    b[r->hlen] = '\0';
    r->headers = b;
    return len;
}

/* A streamed request body: `total` bytes of 'x' handed out by the read callback. */
typedef struct stream {
    long long total;
    _Atomic long long sent; /* read by the test while an upload thread sends */
    const char *data;       /* bytes to send (NULL: 'x' bytes) */
    size_t chunk;           /* at most this much per callback (0: as much as curl asks) */
    int delay_ms;           /* pause before each callback: a slow client */
} stream;

static size_t on_read(char *buf, size_t size, size_t n, void *ud)
{
    stream *s = ud;
    long long left = s->total - s->sent;
    size_t len = size * n;
    if (left <= 0)
        return 0;
    if ((long long)len > left)
        len = (size_t)left;
    if (s->chunk && len > s->chunk)
        len = s->chunk;
    if (s->delay_ms)
        lc_sleep_ms(s->delay_ms, NULL);
    if (s->data)
        memcpy(buf, s->data + s->sent, len);
    else
        memset(buf, 'x', len);
    s->sent += (long long)len;
    return len;
}

typedef struct req {
    const char *method;
    const char *path;
    const char *token;
    const char *ctype;
    const void *body;
    size_t len;
    const char *hdr1, *hdr2; /* extra header lines, may be NULL */
    stream *stream;          /* instead of body */
    long long announce;      /* Content-Length announced with a stream (-1: chunked) */
} req;

static resp http(fixture *f, const req *q)
{
    resp r = {0};
    char url[2048], auth[600], ct[300];
    struct curl_slist *h = NULL;
    CURL *c = curl_easy_init();
    assert_non_null(c);
    snprintf(url, sizeof(url), "%s%s", f->base, q->path);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, q->method);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &r);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, &r);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 30L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    if (q->token) {
        snprintf(auth, sizeof(auth), "Authorization: Bearer %s", q->token);
        h = curl_slist_append(h, auth);
    }
    if (q->ctype) {
        snprintf(ct, sizeof(ct), "Content-Type: %s", q->ctype);
        h = curl_slist_append(h, ct);
    }
    if (q->hdr1)
        h = curl_slist_append(h, q->hdr1);
    if (q->hdr2)
        h = curl_slist_append(h, q->hdr2);
    if (q->stream) {
        curl_easy_setopt(c, CURLOPT_UPLOAD, 0L);
        curl_easy_setopt(c, CURLOPT_POST, 1L);
        curl_easy_setopt(c, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(c, CURLOPT_READDATA, q->stream);
        if (q->announce >= 0)
            curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)q->announce);
        else
            h = curl_slist_append(h, "Transfer-Encoding: chunked");
        h = curl_slist_append(h, "Expect: 100-continue");
        /* a server that never says "100 Continue" makes each such upload this slow */
        curl_easy_setopt(c, CURLOPT_EXPECT_100_TIMEOUT_MS, 5000L);
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, q->method);
    } else if (q->body) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, q->body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)q->len);
        h = curl_slist_append(h, "Expect:");
    }
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    r.cc = curl_easy_perform(c);
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.status);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    if (!r.body)
        r.body = calloc(1, 1);
    if (!r.headers)
        r.headers = calloc(1, 1);
    return r;
}

static resp get(fixture *f, const char *path, const char *token)
{
    return http(f, &(req){.method = "GET", .path = path, .token = token});
}

static void resp_free(resp *r)
{
    free(r->body);
    free(r->headers);
}

/* The value of response header name (case-insensitive), copied into buf; NULL when absent. */
static const char *header(const resp *r, const char *name, char *buf, size_t cap)
{
    size_t n = strlen(name);
    for (const char *p = r->headers; p && *p;) {
        const char *eol = strstr(p, "\r\n");
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        if (len > n && strncasecmp(p, name, n) == 0 && p[n] == ':') {
            const char *v = p + n + 1;
            while (*v == ' ')
                v++;
            size_t vl = (size_t)(p + len - v);
            if (vl >= cap)
                vl = cap - 1;
            memcpy(buf, v, vl);
            buf[vl] = '\0';
            return buf;
        }
        p += len + (eol ? 2 : 0);
    }
    return NULL;
}

/* The body as JSON (caller frees); fails the test when it is not JSON. */
static cJSON *json_of(const resp *r)
{
    cJSON *j = cJSON_Parse(r->body);
    if (!j)
        fail_msg("response %ld is not JSON: %s", r->status, r->body);
    return j;
}

/* Checks an RFC 9457 problem response and returns its detail (caller frees). */
static char *expect_problem(const resp *r, long status)
{
    char ct[128];
    if (r->status != status)
        fail_msg("expected %ld, got %ld: %s", status, r->status, r->body);
    assert_non_null(header(r, "Content-Type", ct, sizeof(ct)));
    assert_string_equal(ct, "application/problem+json");
    cJSON *j = json_of(r);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "type")), "about:blank");
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "title")),
                        gw_status_text((int)status));
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(j, "status")), status);
    const char *d = cJSON_GetStringValue(cJSON_GetObjectItem(j, "detail"));
    assert_non_null(d);
    char *out = strdup(d);
    cJSON_Delete(j);
    return out;
}

static void expect_status(resp *r, long status)
{
    if (r->status != status)
        fail_msg("expected %ld, got %ld (curl: %s): %s", status, r->status,
                 curl_easy_strerror(r->cc), r->body);
}

static int count_files(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    if (!d)
        return -1;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

static int count_objects_cb(void *ctx, const char *key, const lc_store_stat *st)
{
    (void)key;
    (void)st;
    (*(int *)ctx)++;
    return 0;
}

static int count_objects(fixture *f)
{
    int n = 0;
    lc_err err = {0};
    if (lc_store_list(f->store, "", count_objects_cb, &n, &err) != LC_OK)
        fail_msg("list: %s", lc_err_msg(&err));
    return n;
}

/* A real DICOM file: the fixture another helper adds under tests/data, else the corpus. */
static char *dicom_path(void)
{
    char *p = ts_data("series/mr-4slice/jpeg-lossless-sv1/IM-0001-0001-0001.dcm");
    FILE *fp = fopen(p, "rb");
    if (fp) {
        fclose(fp);
        return p;
    }
    free(p);
    const char *s = ts_samples_dir();
    if (!s)
        fail_msg("no DICOM samples: set RADPIPE_SAMPLES_DIR");
    char buf[2048];
    snprintf(buf, sizeof(buf),
             "%s/series/mr-4slice-compressed/jpeg-lossless-sv1/"
             "IM-0001-0001-0001.dcm",
             s);
    return strdup(buf);
}

/* --- the shared gateway ----------------------------------------------------------------- */

static lc_rc start_gw(fixture *f, gw *g, const char *token_file, lc_err *err)
{
    snprintf(f->base, sizeof(f->base), "http://127.0.0.1:%d", ts_free_port());
    snprintf(f->listen, sizeof(f->listen), "127.0.0.1:%s", strrchr(f->base, ':') + 1);
    f->cfg = (gw_config){.http_listen = f->listen,
                         .http_threads = 4,
                         .max_body_bytes = MAX_BODY,
                         .request_timeout_ms = 10000,
                         .spool_dir = f->spool,
                         .admin_token_file = (char *)token_file,
                         .db_pool_size = 3,
                         .cors_origins = "https://ui.example, https://other.example/",
                         .tls_cert_file = "",
                         .public_url = "",
                         .upload_max_files = 100,
                         .zip_max_expanded = 64LL << 20,
                         .events_max_clients = 2};
    f->deps = (gw_deps){.database_url = f->db_url,
                        .topic_prefix = "radpipe.",
                        .source = "/radpipe/api-gateway",
                        .store = f->store,
                        .metrics = f->metrics};
    return gw_start(g, &f->cfg, &f->deps, err);
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    lc_err err = {0};
    lc_log_init("test_gw", LC_LOG_WARN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (!(f->db_url = ts_pg_fresh_db("gw")))
        fail_msg("RADPIPE_TEST_PG_URL is not set or the server refused: run through tests/run.sh");
    f->tmp = ts_tmpdir("gw");
    snprintf(f->spool, sizeof(f->spool), "%s/spool", f->tmp);
    snprintf(f->objects_url, sizeof(f->objects_url), "file://%s/objects", f->tmp);
    snprintf(f->token_file, sizeof(f->token_file), "%s/admin-token", f->tmp);
    assert_int_equal(ts_write_file(f->token_file, TOK_BOOT "\n", strlen(TOK_BOOT) + 1), 0);
    if (lc_db_connect(f->db_url, 5000, NULL, &f->db, &err) != LC_OK ||
        lc_db_migrate(f->db, &err) != LC_OK || lc_store_open(f->objects_url, &f->store, &err))
        fail_msg("setup: %s", lc_err_msg(&err));
    assert_non_null(f->metrics = lc_metrics_new());
    add_token(f->db, "reader", TOK_READ, "{read}", NULL, NULL);
    add_token(f->db, "writer", TOK_WRITE, "{write}", NULL, NULL);
    add_token(f->db, "noscope", TOK_NOSCOPE, "{}", NULL, NULL);
    add_token(f->db, "admin", TOK_ADMIN, "{admin}", NULL, NULL);
    add_token(f->db, "revoked", TOK_REVOKED, "{admin}", NULL, "2020-01-01T00:00:00Z");
    add_token(f->db, "expired", TOK_EXPIRED, "{admin}", "2020-01-01T00:00:00Z", NULL);
    if (start_gw(f, &f->g, f->token_file, &err) != LC_OK)
        fail_msg("gw_start: %s", lc_err_msg(&err));
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    gw_stop(&f->g);
    lc_store_free(f->store);
    lc_metrics_free(f->metrics);
    lc_db_free(f->db);
    ts_rmrf(f->tmp);
    free(f->tmp);
    free(f->db_url);
    free(f);
    curl_global_cleanup();
    return 0;
}

/* --- uploads ---------------------------------------------------------------------------- */

static void test_post_dicom(void **state)
{
    fixture *f = *state;
    size_t len = 0;
    char *path = dicom_path();
    char *bytes = ts_read_file(path, &len);
    char sha[65], key[512], url[1400];
    lc_dicom_header *h = NULL;
    lc_err err = {0};
    assert_non_null(bytes);
    if (lc_dicom_read_header(path, &h, &err) != LC_OK)
        fail_msg("%s: %s", path, lc_err_msg(&err));
    lc_sha256_hex(bytes, len, sha);
    long long outbox0 = query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL);

    resp r = http(f, &(req){.method = "POST",
                            .path = "/api/v1/instances",
                            .token = TOK_WRITE,
                            .ctype = "application/dicom",
                            .body = bytes,
                            .len = len});
    expect_status(&r, 202);
    cJSON *j = json_of(&r);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "study_instance_uid")),
                        h->study_instance_uid);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "series_instance_uid")),
                        h->series_instance_uid);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "sop_instance_uid")),
                        h->sop_instance_uid);
    assert_int_equal((long long)cJSON_GetNumberValue(cJSON_GetObjectItem(j, "size")), len);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "sha256")), sha);
    cJSON_Delete(j);
    resp_free(&r);

    /* the object, byte for byte */
    snprintf(key, sizeof(key), "instances/%s/%s/%s.dcm", h->study_instance_uid,
             h->series_instance_uid, h->sop_instance_uid);
    void *stored = NULL;
    size_t slen = 0;
    if (lc_store_get_buf(f->store, key, 10 << 20, &stored, &slen, &err) != LC_OK)
        fail_msg("get %s: %s", key, lc_err_msg(&err));
    assert_int_equal(slen, len);
    assert_memory_equal(stored, bytes, len);
    free(stored);
    assert_int_equal(count_files(f->spool), 0);

    /* one outbox row holding a valid radpipe.instance.stored event keyed by the study */
    assert_int_equal(query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL), outbox0 + 1);
    PGresult *res = NULL;
    if (lc_db_exec(f->db, "SELECT topic, key, payload FROM outbox ORDER BY id DESC LIMIT 1", 0,
                   NULL, &res, &err) != LC_OK)
        fail_msg("outbox: %s", lc_err_msg(&err));
    assert_string_equal(PQgetvalue(res, 0, 0), "radpipe.instance.stored");
    assert_string_equal(PQgetvalue(res, 0, 1), h->study_instance_uid);
    lc_event *ev = NULL;
    const char *payload = PQgetvalue(res, 0, 2);
    if (lc_event_parse(payload, strlen(payload), &ev, &err) != LC_OK)
        fail_msg("event: %s: %s", lc_err_msg(&err), payload);
    assert_string_equal(ev->type, LC_EV_INSTANCE_STORED);
    assert_string_equal(ev->source, "/radpipe/api-gateway");
    assert_string_equal(ev->subject, h->study_instance_uid);
    assert_true(lc_uuid_valid(ev->id));
    snprintf(url, sizeof(url), "%s/%s", lc_store_url(f->store), key);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(ev->data, "url")), url);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(ev->data, "sha256")), sha);
    assert_int_equal((long long)cJSON_GetNumberValue(cJSON_GetObjectItem(ev->data, "size")), len);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(ev->data, "sop_class_uid")),
                        h->sop_class_uid);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(ev->data, "sop_instance_uid")),
                        h->sop_instance_uid);
    cJSON *src = cJSON_GetObjectItem(ev->data, "source");
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(src, "kind")), "http");
    const char *recv = cJSON_GetStringValue(cJSON_GetObjectItem(ev->data, "received_at"));
    assert_non_null(recv);
    assert_int_equal(strlen(recv), 24); /* 2026-11-21T12:00:00.123Z */
    assert_int_equal(recv[23], 'Z');
    lc_event_free(ev);
    PQclear(res);

    /* the same instance again replaces the object and announces it again */
    r = http(f, &(req){.method = "POST",
                       .path = "/api/v1/instances",
                       .token = TOK_WRITE,
                       .ctype = "application/DICOM; charset=binary",
                       .body = bytes,
                       .len = len});
    expect_status(&r, 202);
    resp_free(&r);
    assert_int_equal(query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL), outbox0 + 2);

    lc_dicom_header_free(h);
    free(bytes);
    free(path);
}

static void test_post_not_dicom(void **state)
{
    fixture *f = *state;
    static const char junk[] = "this is plain text, not a DICOM file\n";
    long long outbox0 = query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL);
    int objects0 = count_objects(f);

    resp r = http(f, &(req){.method = "POST",
                            .path = "/api/v1/instances",
                            .token = TOK_WRITE,
                            .ctype = "application/dicom",
                            .body = junk,
                            .len = sizeof(junk) - 1});
    char *d = expect_problem(&r, 400);
    assert_true(strncmp(d, "body is not a DICOM file: ", 26) == 0);
    free(d);
    resp_free(&r);

    /* an empty body */
    r = http(f, &(req){.method = "POST",
                       .path = "/api/v1/instances",
                       .token = TOK_WRITE,
                       .ctype = "application/dicom",
                       .body = "",
                       .len = 0});
    d = expect_problem(&r, 400);
    assert_string_equal(d, "body is not a DICOM file: it is empty");
    free(d);
    resp_free(&r);

    assert_int_equal(query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL), outbox0);
    assert_int_equal(count_objects(f), objects0);
    assert_int_equal(count_files(f->spool), 0);
}

static void test_post_plain_text_leaves_nothing(void **state)
{
    fixture *f = *state;
    static const char junk[] = "\x00\x01\x02 definitely not DICOM";
    long long outbox0 = query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL);
    int objects0 = count_objects(f);
    resp r = http(f, &(req){.method = "POST",
                            .path = "/api/v1/instances",
                            .token = TOK_WRITE,
                            .ctype = "application/dicom",
                            .body = junk,
                            .len = sizeof(junk) - 1});
    free(expect_problem(&r, 400));
    resp_free(&r);
    assert_int_equal(query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL), outbox0);
    assert_int_equal(count_objects(f), objects0);
    assert_int_equal(count_files(f->spool), 0);
}

static void test_post_auth(void **state)
{
    fixture *f = *state;
    static const char body[] = "x";
    char v[256];
    req q = {.method = "POST",
             .path = "/api/v1/instances",
             .ctype = "application/dicom",
             .body = body,
             .len = 1};

    resp r = http(f, &q); /* no token */
    free(expect_problem(&r, 401));
    assert_non_null(header(&r, "WWW-Authenticate", v, sizeof(v)));
    assert_true(strncmp(v, "Bearer", 6) == 0);
    resp_free(&r);

    q.token = "rpt_not_a_known_token";
    r = http(f, &q);
    free(expect_problem(&r, 401));
    assert_non_null(header(&r, "WWW-Authenticate", v, sizeof(v)));
    assert_non_null(strstr(v, "invalid_token"));
    resp_free(&r);

    q.token = TOK_REVOKED;
    r = http(f, &q);
    free(expect_problem(&r, 401));
    resp_free(&r);

    q.token = TOK_EXPIRED;
    r = http(f, &q);
    free(expect_problem(&r, 401));
    resp_free(&r);

    q.token = TOK_READ; /* valid, but read only */
    r = http(f, &q);
    char *d = expect_problem(&r, 403);
    assert_non_null(strstr(d, "write"));
    free(d);
    resp_free(&r);

    q.token = NULL; /* another scheme */
    q.hdr1 = "Authorization: Basic dXNlcjpwYXNz";
    r = http(f, &q);
    free(expect_problem(&r, 401));
    resp_free(&r);
}

static void test_post_wrong_content_type(void **state)
{
    fixture *f = *state;
    static const char body[] = "{\"a\":1}";
    resp r = http(f, &(req){.method = "POST",
                            .path = "/api/v1/instances",
                            .token = TOK_WRITE,
                            .ctype = "application/json",
                            .body = body,
                            .len = sizeof(body) - 1});
    char *d = expect_problem(&r, 415);
    assert_non_null(strstr(d, "application/json"));
    free(d);
    resp_free(&r);
    r = http(f, &(req){.method = "POST",
                       .path = "/api/v1/instances",
                       .token = TOK_WRITE,
                       .body = body,
                       .len = sizeof(body) - 1,
                       .hdr1 = "Content-Type:"});
    free(expect_problem(&r, 415));
    resp_free(&r);
}

static void test_post_too_large(void **state)
{
    fixture *f = *state;
    /* announced far beyond the limit: refused before a byte of the body is read */
    stream s = {.total = 10LL << 30};
    int64_t t0 = lc_now_ms();
    resp r = http(f, &(req){.method = "POST",
                            .path = "/api/v1/instances",
                            .token = TOK_WRITE,
                            .ctype = "application/dicom",
                            .stream = &s,
                            .announce = s.total});
    char *d = expect_problem(&r, 413);
    assert_non_null(strstr(d, "limit"));
    free(d);
    resp_free(&r);
    assert_true(lc_now_ms() - t0 < 10000);
    assert_true(s.sent < (1LL << 30));

    /* chunked: counted while it arrives */
    s = (stream){.total = MAX_BODY + 100 * 1024};
    r = http(f, &(req){.method = "POST",
                       .path = "/api/v1/instances",
                       .token = TOK_WRITE,
                       .ctype = "application/dicom",
                       .stream = &s,
                       .announce = -1});
    free(expect_problem(&r, 413));
    resp_free(&r);

    /* just at the limit is accepted for reading (and then refused as not DICOM), without the
     * client waiting for a "100 Continue" that never comes */
    s = (stream){.total = MAX_BODY};
    t0 = lc_now_ms();
    r = http(f, &(req){.method = "POST",
                       .path = "/api/v1/instances",
                       .token = TOK_WRITE,
                       .ctype = "application/dicom",
                       .stream = &s,
                       .announce = s.total});
    free(expect_problem(&r, 400));
    resp_free(&r);
    assert_true(lc_now_ms() - t0 < 4000);
    assert_int_equal(s.sent, MAX_BODY);
    assert_int_equal(count_files(f->spool), 0);

    /* the server still answers after closing those connections */
    r = get(f, "/healthz", NULL);
    expect_status(&r, 200);
    resp_free(&r);
}

/* --- studies ---------------------------------------------------------------------------- */

static void insert_studies(fixture *f)
{
    static int done;
    if (done++)
        return;
    exec_ok(f->db,
            "INSERT INTO studies (study_uid, patient_id, patient_name, study_date, study_time,"
            " accession_number, study_description, modalities, num_series, num_instances,"
            " completed_version, created_at) VALUES"
            " ('" STUDY_A "', 'PID-1', 'Doe^Jane', '20240102', '101500', 'ACC1', 'Head CT',"
            "  '{CT}', 1, 28, 1, '2024-01-02T10:00:00Z'),"
            " ('" STUDY_B "', 'PID-2', 'Roe^Rick', '20240103', NULL, NULL, NULL,"
            "  '{MR,SEG}', 2, 40, 0, '2024-01-03T10:00:00Z'),"
            " ('" STUDY_C "', 'O''Brien''; DROP TABLE studies;--', NULL, '20240103', NULL,"
            "  NULL, NULL, '{MR}', 0, 0, 0, '2024-01-04T10:00:00Z')",
            0, NULL);
    exec_ok(f->db,
            "INSERT INTO series (series_uid, study_uid, modality, series_number,"
            " series_description, num_instances) VALUES"
            " ('" STUDY_B ".1', '" STUDY_B "', 'MR', 1, 'T1 sag', 35),"
            " ('" STUDY_B ".2', '" STUDY_B "', 'SEG', 2, NULL, 5)",
            0, NULL);
    exec_ok(f->db,
            "INSERT INTO jobs (id, kind, study_uid, state, params, progress, result, error,"
            " attempts, started_at, finished_at) VALUES"
            " ('" JOB_ID "', 'segment', '" STUDY_B "', 'succeeded', '{\"series\":\"x\"}',"
            "  '{\"done\":3,\"total\":3}', '{\"labels\":2}', NULL, 1, now(), now())",
            0, NULL);
    exec_ok(f->db,
            "INSERT INTO job_artifacts (job_id, name, store_key, size_bytes, media_type) VALUES"
            " ('" JOB_ID "', 'seg.nii.gz', 'results/x/seg.nii.gz', 1234, 'application/gzip'),"
            " ('" JOB_ID "', 'seg.dcm', 'results/x/seg.dcm', 999, 'application/dicom')",
            0, NULL);
}

static cJSON *get_json(fixture *f, const char *path, long status)
{
    resp r = get(f, path, TOK_READ);
    expect_status(&r, status);
    cJSON *j = json_of(&r);
    resp_free(&r);
    return j;
}

static int items_count(const cJSON *j)
{
    return cJSON_GetArraySize(cJSON_GetObjectItem(j, "items"));
}

static void test_studies_list(void **state)
{
    fixture *f = *state;
    insert_studies(f);
    cJSON *j = get_json(f, "/api/v1/studies", 200);
    assert_int_equal(items_count(j), 3);
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(j, "total")), 3);
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(j, "limit")), 100);
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(j, "offset")), 0);
    /* newest first; every documented field present with its JSON type */
    cJSON *last = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "items"), 2);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(last, "study_instance_uid")),
                        STUDY_A);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(last, "patient_name")),
                        "Doe^Jane");
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(last, "study_time")), "101500");
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(last, "created_at")),
                        "2024-01-02T10:00:00.000Z");
    assert_true(cJSON_IsArray(cJSON_GetObjectItem(last, "modalities")));
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(last, "num_instances")), 28);
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(last, "completed_version")), 1);
    static const char *const fields[] = {
        "study_instance_uid", "patient_id",        "patient_name", "study_date", "study_time",
        "accession_number",   "study_description", "modalities",   "num_series", "num_instances",
        "completed_version",  "created_at",        "updated_at"};
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
        assert_non_null(cJSON_GetObjectItem(last, fields[i]));
    cJSON *b = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "items"), 1);
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(b, "study_time")));
    cJSON_Delete(j);

    j = get_json(f, "/api/v1/studies?limit=1&offset=1", 200);
    assert_int_equal(items_count(j), 1);
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(j, "total")), 3);
    assert_string_equal(
        cJSON_GetStringValue(cJSON_GetObjectItem(
            cJSON_GetArrayItem(cJSON_GetObjectItem(j, "items"), 0), "study_instance_uid")),
        STUDY_B);
    cJSON_Delete(j);

    j = get_json(f, "/api/v1/studies?offset=10", 200);
    assert_int_equal(items_count(j), 0);
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(j, "total")), 3);
    cJSON_Delete(j);

    j = get_json(f, "/api/v1/studies?modality=MR", 200);
    assert_int_equal(items_count(j), 2);
    cJSON_Delete(j);
    j = get_json(f, "/api/v1/studies?modality=SEG&study_date=20240103", 200);
    assert_int_equal(items_count(j), 1);
    cJSON_Delete(j);
    j = get_json(f, "/api/v1/studies?patient_id=PID-1", 200);
    assert_int_equal(items_count(j), 1);
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(j, "total")), 1);
    cJSON_Delete(j);
    j = get_json(f, "/api/v1/studies?study_date=20240103", 200);
    assert_int_equal(items_count(j), 2);
    cJSON_Delete(j);
}

static void test_studies_list_bad_params(void **state)
{
    fixture *f = *state;
    static const char *const bad[] = {
        "/api/v1/studies?limit=0",         "/api/v1/studies?limit=1001",
        "/api/v1/studies?limit=-1",        "/api/v1/studies?limit=abc",
        "/api/v1/studies?limit=",          "/api/v1/studies?offset=-5",
        "/api/v1/studies?offset=1e3",      "/api/v1/studies?study_date=2024-01-03",
        "/api/v1/studies?study_date=2024", "/api/v1/studies?patientid=PID-1",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        resp r = get(f, bad[i], TOK_READ);
        if (r.status != 400)
            fail_msg("%s: expected 400, got %ld", bad[i], r.status);
        free(expect_problem(&r, 400));
        resp_free(&r);
    }
    cJSON *j = get_json(f, "/api/v1/studies?limit=1000", 200);
    cJSON_Delete(j);
    resp r = get(f, "/api/v1/studies", NULL);
    free(expect_problem(&r, 401));
    resp_free(&r);
}

static void test_studies_sql_metacharacters_are_data(void **state)
{
    fixture *f = *state;
    insert_studies(f);
    /* x' OR '1'='1 */
    cJSON *j = get_json(f, "/api/v1/studies?patient_id=x%27%20OR%20%271%27%3D%271", 200);
    assert_int_equal(items_count(j), 0);
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(j, "total")), 0);
    cJSON_Delete(j);
    /* the patient id that looks like an injection is found exactly, and nothing runs */
    j = get_json(f, "/api/v1/studies?patient_id=O%27Brien%27%3B%20DROP%20TABLE%20studies%3B--",
                 200);
    assert_int_equal(items_count(j), 1);
    assert_string_equal(
        cJSON_GetStringValue(cJSON_GetObjectItem(
            cJSON_GetArrayItem(cJSON_GetObjectItem(j, "items"), 0), "study_instance_uid")),
        STUDY_C);
    cJSON_Delete(j);
    j = get_json(f, "/api/v1/studies?modality=MR%27)%20OR%20(%271%27%3D%271", 200);
    assert_int_equal(items_count(j), 0);
    cJSON_Delete(j);
    assert_true(query_ll(f->db, "SELECT count(*) FROM studies", 0, NULL) >= 3);
}

static void test_study_get(void **state)
{
    fixture *f = *state;
    insert_studies(f);
    cJSON *j = get_json(f, "/api/v1/studies/" STUDY_B, 200);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "study_instance_uid")),
                        STUDY_B);
    cJSON *series = cJSON_GetObjectItem(j, "series");
    assert_int_equal(cJSON_GetArraySize(series), 2);
    cJSON *s0 = cJSON_GetArrayItem(series, 0);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(s0, "series_instance_uid")),
                        STUDY_B ".1");
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(s0, "modality")), "MR");
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(s0, "series_number")), 1);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(s0, "series_description")),
                        "T1 sag");
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(s0, "num_instances")), 35);
    cJSON *jobs = cJSON_GetObjectItem(j, "jobs");
    assert_int_equal(cJSON_GetArraySize(jobs), 1);
    cJSON *j0 = cJSON_GetArrayItem(jobs, 0);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j0, "id")), JOB_ID);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j0, "state")), "succeeded");
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j0, "kind")), "segment");
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(j0, "attempts")), 1);
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j0, "error")));
    cJSON_Delete(j);

    j = get_json(f, "/api/v1/studies/" STUDY_A, 200);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "series")), 0);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "jobs")), 0);
    cJSON_Delete(j);

    resp r = get(f, "/api/v1/studies/1.2.3.999999", TOK_READ);
    free(expect_problem(&r, 404));
    resp_free(&r);
    r = get(f, "/api/v1/studies/not-a-uid", TOK_READ);
    free(expect_problem(&r, 400));
    resp_free(&r);
    r = get(f, "/api/v1/studies/1.02.3", TOK_READ);
    free(expect_problem(&r, 400));
    resp_free(&r);
}

static void test_job_get(void **state)
{
    fixture *f = *state;
    insert_studies(f);
    cJSON *j = get_json(f, "/api/v1/jobs/" JOB_ID, 200);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "id")), JOB_ID);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "study_instance_uid")),
                        STUDY_B);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "state")), "succeeded");
    assert_string_equal(
        cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "params"), "series")), "x");
    assert_int_equal(
        cJSON_GetNumberValue(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "progress"), "total")), 3);
    assert_int_equal(
        cJSON_GetNumberValue(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "result"), "labels")), 2);
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(j, "max_attempts")), 5);
    assert_non_null(cJSON_GetStringValue(cJSON_GetObjectItem(j, "started_at")));
    static const char *const fields[] = {"kind",       "error",      "attempts",
                                         "created_at", "updated_at", "finished_at"};
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
        assert_non_null(cJSON_GetObjectItem(j, fields[i]));
    cJSON *arts = cJSON_GetObjectItem(j, "artifacts");
    assert_int_equal(cJSON_GetArraySize(arts), 2);
    cJSON *a0 = cJSON_GetArrayItem(arts, 0); /* by name */
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(a0, "name")), "seg.dcm");
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(a0, "size")), 999);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(a0, "media_type")),
                        "application/dicom");
    assert_null(cJSON_GetObjectItem(a0, "store_key")); /* internal */
    cJSON_Delete(j);

    resp r = get(f, "/api/v1/jobs/00000000-0000-4000-8000-000000000000", TOK_READ);
    free(expect_problem(&r, 404));
    resp_free(&r);
    r = get(f, "/api/v1/jobs/12345", TOK_READ);
    free(expect_problem(&r, 400));
    resp_free(&r);
    r = get(f, "/api/v1/jobs/" JOB_ID, NULL);
    free(expect_problem(&r, 401));
    resp_free(&r);
}

/* GET /api/v1/models[/{name}]: the rows the segmenters upsert, as JSON; none at first. */
static void test_models(void **state)
{
    fixture *f = *state;
    cJSON *j = get_json(f, "/api/v1/models", 200);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "models")), 0);
    cJSON_Delete(j);
    exec_ok(f->db,
            "INSERT INTO models (name, version, modality, labels, spatial_dims, spacing_mm,"
            " patch_size, normalization, mirroring, sha256, size_bytes, parameters, loaded_by)"
            " VALUES ('zeta-mr', '2', 'MR', '[]', 2, '{1,1}', '{256,256}',"
            "  '{\"scheme\": \"zscore\"}', false, 'ab', 10, 20, 'h:2'),"
            " ('body-ct', '1.0.0', 'CT', '[{\"value\": 1, \"name\": \"Body\","
            "  \"category\": {\"code\": \"123037004\", \"scheme\": \"SCT\","
            "  \"meaning\": \"Anatomical Structure\"}, \"type\": {\"code\": \"38266002\","
            "  \"scheme\": \"SCT\", \"meaning\": \"Entire body\"}}]', 3, '{3,1.5,1.5}',"
            "  '{64,96,96}', '{\"scheme\": \"ct\", \"mean\": 40, \"std\": 200}', true, 'cd',"
            "  1000, 5600000, 'host:1')",
            0, NULL);
    j = get_json(f, "/api/v1/models", 200);
    cJSON *ms = cJSON_GetObjectItem(j, "models");
    assert_int_equal(cJSON_GetArraySize(ms), 2);
    cJSON *m = cJSON_GetArrayItem(ms, 0); /* by name */
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(m, "name")), "body-ct");
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(m, "modality")), "CT");
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(m, "spatial_dims")), 3);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(m, "patch_size")), 3);
    assert_true(cJSON_GetNumberValue(cJSON_GetArrayItem(cJSON_GetObjectItem(m, "spacing_mm"), 1)) ==
                1.5);
    cJSON *lab = cJSON_GetArrayItem(cJSON_GetObjectItem(m, "labels"), 0);
    assert_string_equal(
        cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(lab, "type"), "code")),
        "38266002");
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(m, "mirroring")));
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(m, "parameters")), 5600000);
    assert_non_null(cJSON_GetStringValue(cJSON_GetObjectItem(m, "loaded_at")));
    assert_string_equal(
        cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetArrayItem(ms, 1), "name")), "zeta-mr");
    cJSON_Delete(j);

    j = get_json(f, "/api/v1/models/zeta-mr", 200);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "version")), "2");
    assert_string_equal(cJSON_GetStringValue(
                            cJSON_GetObjectItem(cJSON_GetObjectItem(j, "normalization"), "scheme")),
                        "zscore");
    cJSON_Delete(j);
    resp r = get(f, "/api/v1/models/no-such-model", TOK_READ);
    free(expect_problem(&r, 404));
    resp_free(&r);
    r = get(f, "/api/v1/models/.hidden", TOK_READ);
    free(expect_problem(&r, 400));
    resp_free(&r);
    r = get(f, "/api/v1/models?x=1", TOK_READ);
    free(expect_problem(&r, 400)); /* no query parameters */
    resp_free(&r);
    exec_ok(f->db, "DELETE FROM models", 0, NULL);
}

/* --- routing, CORS, admin --------------------------------------------------------------- */

static void test_routing_errors(void **state)
{
    fixture *f = *state;
    char v[256];
    resp r = get(f, "/api/v1/nothing-here", TOK_READ);
    free(expect_problem(&r, 404));
    resp_free(&r);
    r = get(f, "/nothing-here", NULL); /* "/" itself leads to the web UI: test_web_ui */
    free(expect_problem(&r, 404));
    resp_free(&r);
    r = get(f, "/uinothing", NULL);
    free(expect_problem(&r, 404));
    resp_free(&r);
    r = get(f, "/api/v1/studies/", TOK_READ);
    free(expect_problem(&r, 404));
    resp_free(&r);

    r = http(f, &(req){.method = "DELETE", .path = "/api/v1/studies", .token = TOK_WRITE});
    free(expect_problem(&r, 405));
    assert_non_null(header(&r, "Allow", v, sizeof(v)));
    assert_non_null(strstr(v, "GET"));
    assert_null(strstr(v, "POST"));
    resp_free(&r);
    r = get(f, "/api/v1/instances", TOK_WRITE);
    free(expect_problem(&r, 405));
    assert_non_null(header(&r, "Allow", v, sizeof(v)));
    assert_non_null(strstr(v, "POST"));
    resp_free(&r);
}

static void test_cors(void **state)
{
    fixture *f = *state;
    char v[256];
    resp r = http(f, &(req){.method = "GET",
                            .path = "/api/v1/studies",
                            .token = TOK_READ,
                            .hdr1 = "Origin: https://ui.example"});
    expect_status(&r, 200);
    assert_non_null(header(&r, "Access-Control-Allow-Origin", v, sizeof(v)));
    assert_string_equal(v, "https://ui.example");
    resp_free(&r);

    r = http(f, &(req){.method = "GET",
                       .path = "/api/v1/studies",
                       .token = TOK_READ,
                       .hdr1 = "Origin: https://evil.example"});
    expect_status(&r, 200);
    assert_null(header(&r, "Access-Control-Allow-Origin", v, sizeof(v)));
    resp_free(&r);

    /* preflight: no token needed */
    r = http(f, &(req){.method = "OPTIONS",
                       .path = "/api/v1/instances",
                       .hdr1 = "Origin: https://other.example",
                       .hdr2 = "Access-Control-Request-Method: POST"});
    expect_status(&r, 204);
    assert_non_null(header(&r, "Access-Control-Allow-Origin", v, sizeof(v)));
    assert_string_equal(v, "https://other.example");
    assert_non_null(header(&r, "Access-Control-Allow-Methods", v, sizeof(v)));
    assert_non_null(strstr(v, "POST"));
    assert_non_null(header(&r, "Access-Control-Allow-Headers", v, sizeof(v)));
    assert_non_null(strcasestr(v, "authorization"));
    resp_free(&r);

    r = http(f, &(req){.method = "OPTIONS",
                       .path = "/api/v1/instances",
                       .hdr1 = "Origin: https://evil.example",
                       .hdr2 = "Access-Control-Request-Method: POST"});
    expect_status(&r, 204);
    assert_null(header(&r, "Access-Control-Allow-Origin", v, sizeof(v)));
    resp_free(&r);
}

/* The gateway's requests_total series for labels, from the shared registry (get-or-create
 * returns the gateway's own handle). */
static lc_counter *requests_total(fixture *f, const char *labels)
{
    lc_counter *c = lc_metrics_counter(f->metrics, "radpipe_http_requests_total",
                                       "HTTP requests by route, method and status code", labels);
    assert_non_null(c);
    return c;
}

/* Metrics are recorded as a request ends, which may be just after the client has its answer. */
static void wait_value(const struct lc_metric *m, double want)
{
    int64_t deadline = lc_now_ms() + 5000;
    while (lc_metric_value(m) < want && lc_now_ms() < deadline)
        lc_sleep_ms(5, NULL);
    assert_true(lc_metric_value(m) == want);
}

static void test_admin_endpoints_and_metrics(void **state)
{
    fixture *f = *state;
    lc_counter *healthz = requests_total(f, "route=\"/healthz\",method=\"GET\",code=\"200\"");
    lc_counter *job404 =
        requests_total(f, "route=\"/api/v1/jobs/{id}\",method=\"GET\",code=\"404\"");
    lc_counter *unmatched = requests_total(f, "route=\"unmatched\",method=\"GET\",code=\"404\"");
    lc_counter *sent = lc_metrics_counter(f->metrics, "radpipe_http_bytes_sent_total",
                                          "response body bytes sent by API routes", NULL);
    double h0 = lc_metric_value(healthz), j0 = lc_metric_value(job404);
    double u0 = lc_metric_value(unmatched);

    resp r = get(f, "/healthz", NULL);
    expect_status(&r, 200);
    resp_free(&r);
    wait_value(healthz, h0 + 1);
    r = get(f, "/readyz", NULL);
    expect_status(&r, 200);
    assert_non_null(strstr(r.body, "database"));
    resp_free(&r);

    double s0 = lc_metric_value(sent);
    r = get(f, "/api/v1/jobs/00000000-0000-4000-8000-00000000abcd", TOK_READ);
    free(expect_problem(&r, 404));
    size_t body_len = r.len;
    resp_free(&r);
    wait_value(job404, j0 + 1);
    wait_value(sent, s0 + (double)body_len);

    /* an unknown path is counted under one label, not under its own */
    r = get(f, "/no/such/path/12345", NULL);
    resp_free(&r);
    wait_value(unmatched, u0 + 1);

    r = get(f, "/metrics", NULL);
    expect_status(&r, 200);
    assert_non_null(strstr(
        r.body,
        "radpipe_http_requests_total{route=\"/api/v1/jobs/{id}\",method=\"GET\",code=\"404\"}"));
    assert_non_null(strstr(
        r.body, "radpipe_http_requests_total{route=\"/healthz\",method=\"GET\",code=\"200\"}"));
    assert_non_null(strstr(r.body, "radpipe_http_request_duration_seconds_bucket{route=\"/api/v1/"
                                   "jobs/{id}\""));
    assert_non_null(strstr(r.body, "radpipe_http_in_flight"));
    assert_non_null(strstr(r.body, "radpipe_http_bytes_sent_total"));
    assert_non_null(strstr(r.body, "radpipe_http_bytes_received_total"));
    assert_non_null(strstr(r.body, "route=\"unmatched\""));
    assert_null(strstr(r.body, "12345"));
    resp_free(&r);
}

/* --- bootstrap token -------------------------------------------------------------------- */

static void test_bootstrap_token(void **state)
{
    fixture *f = *state;
    /* installed from the file by the shared gateway: an admin token, so it may write */
    resp r = http(f, &(req){.method = "POST",
                            .path = "/api/v1/instances",
                            .token = TOK_BOOT,
                            .ctype = "application/dicom",
                            .body = "x",
                            .len = 1});
    free(expect_problem(&r, 400)); /* authorised; the body is not DICOM */
    resp_free(&r);
    assert_int_equal(query_ll(f->db,
                              "SELECT count(*) FROM api_tokens WHERE name = 'bootstrap-admin'"
                              " AND scopes = '{admin}' AND revoked_at IS NULL",
                              0, NULL),
                     1);

    /* a second gateway with a new file retires the old value (on its own database) */
    fixture f2 = {0};
    lc_err err = {0};
    char other[1100];
    f2.db_url = ts_pg_fresh_db("gwboot");
    assert_non_null(f2.db_url);
    snprintf(f2.spool, sizeof(f2.spool), "%s/spool2", f->tmp);
    snprintf(other, sizeof(other), "%s/token2", f->tmp);
    if (lc_db_connect(f2.db_url, 5000, NULL, &f2.db, &err) != LC_OK ||
        lc_db_migrate(f2.db, &err) != LC_OK)
        fail_msg("%s", lc_err_msg(&err));
    f2.store = f->store;
    f2.metrics = lc_metrics_new();
    assert_int_equal(ts_write_file(f->token_file, "  " TOK_BOOT "\r\n", strlen(TOK_BOOT) + 4), 0);
    if (start_gw(&f2, &f2.g, f->token_file, &err) != LC_OK)
        fail_msg("gw_start: %s", lc_err_msg(&err));
    r = get(&f2, "/api/v1/studies", TOK_BOOT);
    expect_status(&r, 200);
    resp_free(&r);
    gw_stop(&f2.g);

    assert_int_equal(ts_write_file(other, "rpt_second_value_987654321\n", 27), 0);
    if (start_gw(&f2, &f2.g, other, &err) != LC_OK)
        fail_msg("gw_start: %s", lc_err_msg(&err));
    r = get(&f2, "/api/v1/studies", TOK_BOOT);
    free(expect_problem(&r, 401));
    resp_free(&r);
    r = get(&f2, "/api/v1/studies", "rpt_second_value_987654321");
    expect_status(&r, 200);
    resp_free(&r);
    gw_stop(&f2.g);

    /* an unreadable file is not fatal: the gateway starts without a bootstrap token */
    snprintf(other, sizeof(other), "%s/does-not-exist", f->tmp);
    if (start_gw(&f2, &f2.g, other, &err) != LC_OK)
        fail_msg("gw_start: %s", lc_err_msg(&err));
    assert_true(f2.g.port > 0);
    gw_stop(&f2.g); /* (civetweb's stop takes up to 2 s once a connection was served) */
    lc_metrics_free(f2.metrics);
    lc_db_free(f2.db);
    free(f2.db_url);
}

/* --- drain ----------------------------------------------------------------------------- */

typedef struct upload {
    fixture *f;
    stream s;
    resp r;
} upload;

static void *upload_main(void *arg)
{
    upload *u = arg;
    u->r = http(u->f, &(req){.method = "POST",
                             .path = "/api/v1/instances",
                             .token = TOK_WRITE,
                             .ctype = "application/dicom",
                             .stream = &u->s,
                             .announce = u->s.total});
    return NULL;
}

/* An upload still streaming in when the drain begins completes; new requests get 503. */
static void test_drain_lets_uploads_finish(void **state)
{
    fixture *f = *state;
    fixture f2 = {0};
    lc_err err = {0};
    size_t len = 0;
    char *path = dicom_path();
    char *bytes = ts_read_file(path, &len);
    pthread_t t;
    assert_non_null(bytes);
    f2.db_url = f->db_url;
    f2.store = f->store;
    f2.metrics = lc_metrics_new();
    snprintf(f2.spool, sizeof(f2.spool), "%s", f->spool);
    if (start_gw(&f2, &f2.g, NULL, &err) != LC_OK)
        fail_msg("gw_start: %s", lc_err_msg(&err));
    long long outbox0 = query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL);

    upload u = {.f = &f2,
                .s = {.total = (long long)len, .data = bytes, .chunk = 4096, .delay_ms = 50}};
    assert_int_equal(pthread_create(&t, NULL, upload_main, &u), 0);
    int64_t deadline = lc_now_ms() + 5000;
    while ((atomic_load(&f2.g.active) == 0 || u.s.sent == 0) && lc_now_ms() < deadline)
        lc_sleep_ms(5, NULL);
    assert_int_equal(atomic_load(&f2.g.active), 1);
    gw_drain_begin(&f2.g);

    resp r = get(&f2, "/api/v1/studies", TOK_READ);
    free(expect_problem(&r, 503));
    resp_free(&r);
    r = get(&f2, "/readyz", NULL);
    expect_status(&r, 503);
    assert_non_null(strstr(r.body, "draining"));
    resp_free(&r);
    assert_true(u.s.sent < u.s.total); /* the upload was still going on meanwhile */

    /* what main does: wait for the drain, then stop the server */
    assert_int_equal(gw_drain_wait(&f2.g, 20000), 1);
    gw_stop(&f2.g);
    pthread_join(t, NULL);
    expect_status(&u.r, 202);
    assert_int_equal(u.s.sent, len);
    resp_free(&u.r);
    assert_int_equal(query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL), outbox0 + 1);
    lc_metrics_free(f2.metrics);
    free(bytes);
    free(path);
}

/* --- every route: auth and unknown query parameters ------------------------------------ */

/* A value for path parameter {name} (the router decides 401/403/400 before any handler, so any
 * non-empty segment would do; these are at least well-formed). */
static const char *placeholder(const char *name, size_t len)
{
    static const struct {
        const char *name, *value;
    } v[] = {{"uid", STUDY_A},         {"study", STUDY_A},
             {"series", STUDY_A ".1"}, {"instance", STUDY_A ".1.1"},
             {"id", JOB_ID},           {"name", "mask.nii.gz"},
             {"frames", "1"},          {"tag", "7FE00010"}};
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++)
        if (strlen(v[i].name) == len && strncmp(v[i].name, name, len) == 0)
            return v[i].value;
    return "x1"; /* a parameter added later */
}

/* The route's pattern with every {param} replaced, plus query (may be ""). */
static void route_path(const gw_route *rt, const char *query, char *out, size_t cap)
{
    size_t n = 0;
    for (const char *p = rt->pattern; *p && n + 1 < cap;) {
        if (*p == '{') {
            const char *close = strchr(p, '}');
            assert_non_null(close);
            n += (size_t)snprintf(out + n, cap - n, "%s",
                                  placeholder(p + 1, (size_t)(close - p - 1)));
            p = close + 1;
        } else {
            out[n++] = *p++;
        }
    }
    out[n < cap ? n : cap - 1] = '\0';
    lc_strlcpy(out + strlen(out), query, cap - strlen(out));
}

static long long written_rows(fixture *f)
{
    return query_ll(f->db,
                    "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM jobs)"
                    " + (SELECT count(*) FROM studies) + (SELECT count(*) FROM instances)",
                    0, NULL);
}

/* One table-driven check over the router table itself (gw_routes()), so a route added later is
 * covered the day it is added: every route needs a token (no token: 401 with
 * WWW-Authenticate: Bearer; an unknown token: 401), refuses a valid token one scope too small
 * (403, error="insufficient_scope" naming the scope), and answers a query parameter it does not
 * take with the one documented answer, 400 problem+json naming the parameter. None of it
 * writes anything. */
static void test_every_route_auth_and_query(void **state)
{
    fixture *f = *state;
    static const char *const token_of[] = {[GW_SCOPE_NONE] = TOK_NOSCOPE,
                                           [GW_SCOPE_READ] = TOK_READ,
                                           [GW_SCOPE_WRITE] = TOK_WRITE,
                                           [GW_SCOPE_ADMIN] = TOK_ADMIN};
    size_t n;
    const gw_route *routes = gw_routes(&n);
    long long rows0 = written_rows(f);
    int objects0 = count_objects(f);
    char path[1024], www[256], want[64];
    assert_true(n >= 27);
    for (size_t i = 0; i < n; i++) {
        const gw_route *rt = &routes[i];
        if (rt->scope <= GW_SCOPE_NONE || rt->scope > GW_SCOPE_ADMIN)
            fail_msg("route %s %s needs no token: every API route must", rt->method, rt->pattern);
        route_path(rt, "", path, sizeof(path));

        resp r = http(f, &(req){.method = rt->method, .path = path});
        char *d = expect_problem(&r, 401);
        if (!header(&r, "WWW-Authenticate", www, sizeof(www)) || strncmp(www, "Bearer", 6) != 0)
            fail_msg("%s %s: 401 without WWW-Authenticate: Bearer", rt->method, path);
        free(d);
        resp_free(&r);
        r = http(f, &(req){.method = rt->method, .path = path, .token = "rpt_unknown_token_42"});
        free(expect_problem(&r, 401));
        resp_free(&r);

        r = http(f, &(req){.method = rt->method, .path = path, .token = token_of[rt->scope - 1]});
        if (r.status != 403)
            fail_msg("%s %s with a %s token: expected 403, got %ld", rt->method, path,
                     gw_scope_name(rt->scope - 1), r.status);
        free(expect_problem(&r, 403));
        snprintf(want, sizeof(want), "scope=\"%s\"", gw_scope_name(rt->scope));
        if (!header(&r, "WWW-Authenticate", www, sizeof(www)) ||
            !strstr(www, "insufficient_scope") || !strstr(www, want))
            fail_msg("%s %s: 403 without WWW-Authenticate insufficient_scope %s", rt->method, path,
                     want);
        resp_free(&r);

        route_path(rt, "?radpipe_no_such_param=1", path, sizeof(path));
        r = http(f, &(req){.method = rt->method, .path = path, .token = token_of[rt->scope]});
        if (r.status != 400)
            fail_msg("%s %s: expected 400 for an unknown query parameter, got %ld: %s", rt->method,
                     path, r.status, r.body);
        d = expect_problem(&r, 400);
        if (!strstr(d, "unknown query parameter \"radpipe_no_such_param\""))
            fail_msg("%s %s: the 400 does not name the parameter: %s", rt->method, path, d);
        free(d);
        resp_free(&r);
    }
    assert_int_equal(written_rows(f), rows0);
    assert_int_equal(count_objects(f), objects0);
    assert_int_equal(count_files(f->spool), 0);
}

/* --- job creation with Idempotency-Key ------------------------------------------------------ */

static resp create_job(fixture *f, const char *token, const char *body, const char *key_hdr)
{
    return http(f, &(req){.method = "POST",
                          .path = "/api/v1/studies/" STUDY_A "/jobs",
                          .token = token,
                          .ctype = "application/json",
                          .body = body,
                          .len = strlen(body),
                          .hdr1 = key_hdr});
}

static char *job_id_of(resp *r)
{
    expect_status(r, 202);
    cJSON *j = json_of(r);
    char *id = strdup(cJSON_GetStringValue(cJSON_GetObjectItem(j, "id")));
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "state")), "queued");
    cJSON_Delete(j);
    return id;
}

/* A create that failed after its commit (a 503, a lost answer) is retried with the same
 * Idempotency-Key: the retry answers the job created the first time and writes nothing; the
 * key is scoped to the token; reused for another request it is refused with 422. */
static void test_job_create_idempotency_key(void **state)
{
    fixture *f = *state;
    static const char body[] = "{\"kind\":\"upload\",\"params\":{\"layout\":\"series-tar\"}}";
    const char *p[1] = {STUDY_A};
    insert_studies(f);
    long long jobs0 = query_ll(f->db, "SELECT count(*) FROM jobs WHERE study_uid = $1", 1, p);
    long long outbox0 = query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL);

    resp r = create_job(f, TOK_WRITE, body, "Idempotency-Key: \"job-7f3a\"");
    char *id1 = job_id_of(&r);
    resp_free(&r);
    long long outbox1 = query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL);
    assert_true(outbox1 > outbox0); /* job.upload and job.status */
    r = create_job(f, TOK_WRITE, body, "Idempotency-Key: \"job-7f3a\"");
    char *id2 = job_id_of(&r);
    resp_free(&r);
    assert_string_equal(id1, id2);
    assert_int_equal(query_ll(f->db, "SELECT count(*) FROM jobs WHERE study_uid = $1", 1, p),
                     jobs0 + 1);
    assert_int_equal(query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL), outbox1);

    /* the same key with another body: 422, nothing written */
    r = create_job(f, TOK_WRITE, "{\"kind\":\"segment\"}", "Idempotency-Key: \"job-7f3a\"");
    char *d = expect_problem(&r, 422);
    assert_non_null(strstr(d, id1));
    free(d);
    resp_free(&r);
    r = create_job(f, TOK_WRITE, "{\"kind\":\"upload\",\"params\":{\"layout\":\"study-tar\"}}",
                   "Idempotency-Key: \"job-7f3a\"");
    free(expect_problem(&r, 422));
    resp_free(&r);
    /* another token's key of the same spelling is another key */
    r = create_job(f, TOK_ADMIN, body, "Idempotency-Key: \"job-7f3a\"");
    char *id3 = job_id_of(&r);
    resp_free(&r);
    assert_string_not_equal(id1, id3);
    /* without a key every create is a new job */
    r = create_job(f, TOK_WRITE, body, NULL);
    char *id4 = job_id_of(&r);
    resp_free(&r);
    assert_string_not_equal(id1, id4);
    assert_int_equal(query_ll(f->db, "SELECT count(*) FROM jobs WHERE study_uid = $1", 1, p),
                     jobs0 + 3);
    /* malformed keys */
    static const char *const bad[] = {"Idempotency-Key: \"\"", "Idempotency-Key: a b",
                                      "Idempotency-Key: caf\xc3\xa9"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        r = create_job(f, TOK_WRITE, body, bad[i]);
        free(expect_problem(&r, 400));
        resp_free(&r);
    }
    assert_int_equal(query_ll(f->db, "SELECT count(*) FROM jobs WHERE study_uid = $1", 1, p),
                     jobs0 + 3);
    free(id1);
    free(id2);
    free(id3);
    free(id4);
}

/* --- study close: the reason's length as proto/events/study.close.json counts it ------------ */

static void test_study_close_reason_length(void **state)
{
    fixture *f = *state;
    char body[2048];
    long long outbox0 = query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL);
    /* 256 characters of two bytes each: 512 bytes, within the schema's 256 characters */
    strcpy(body, "{\"reason\":\"");
    for (int i = 0; i < 256; i++)
        strcat(body, "\xc3\xa9");
    strcat(body, "\"}");
    resp r = http(f, &(req){.method = "POST",
                            .path = "/api/v1/studies/" STUDY_A "/complete",
                            .token = TOK_WRITE,
                            .ctype = "application/json",
                            .body = body,
                            .len = strlen(body)});
    expect_status(&r, 202);
    resp_free(&r);
    assert_int_equal(query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL), outbox0 + 1);
    /* one more character, an ASCII reason of 257, and bytes that are not UTF-8: 400 */
    static const char *const tails[] = {"\xc3\xa9", "", "\xff"};
    for (size_t k = 0; k < 3; k++) {
        strcpy(body, "{\"reason\":\"");
        for (int i = 0; i < 256; i++)
            strcat(body, k == 1 ? "a" : "\xc3\xa9");
        strcat(body, k == 1 ? "a" : tails[k]);
        strcat(body, "\"}");
        r = http(f, &(req){.method = "POST",
                           .path = "/api/v1/studies/" STUDY_A "/complete",
                           .token = TOK_WRITE,
                           .ctype = "application/json",
                           .body = body,
                           .len = strlen(body)});
        char *d = expect_problem(&r, 400);
        assert_non_null(strstr(d, "reason"));
        free(d);
        resp_free(&r);
    }
    assert_int_equal(query_ll(f->db, "SELECT count(*) FROM outbox", 0, NULL), outbox0 + 1);
}

/* --- QIDO-RS warnings, WADO-RS frame lists and metadata paging ------------------------------- */

static void test_qido_fuzzymatching_warning(void **state)
{
    fixture *f = *state;
    char w[256];
    resp r = get(f, "/dicomweb/studies?fuzzymatching=true&PatientName=Doe*", TOK_READ);
    expect_status(&r, 200);
    if (!header(&r, "Warning", w, sizeof(w)) || !strstr(w, "299") ||
        !strstr(w, "fuzzymatching parameter is not supported"))
        fail_msg("no fuzzymatching Warning: %s", r.headers);
    resp_free(&r);
    r = get(f, "/dicomweb/studies?fuzzymatching=false&PatientName=Doe*", TOK_READ);
    expect_status(&r, 200);
    assert_null(header(&r, "Warning", w, sizeof(w)));
    resp_free(&r);
    r = get(f, "/dicomweb/studies?fuzzymatching=yes", TOK_READ);
    free(expect_problem(&r, 400));
    resp_free(&r);
}

static void test_wado_frame_lists(void **state)
{
    fixture *f = *state;
    static const char base[] =
        "/dicomweb/studies/" STUDY_A "/series/" STUDY_A ".1/instances/" STUDY_A ".1.1/frames/";
    static const char *const bad[] = {"1,", "1,2,", ",1", "1,,2", "0", "01", "1;2", "-1", "a"};
    char path[512];
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(path, sizeof(path), "%s%s", base, bad[i]);
        resp r = get(f, path, TOK_READ);
        if (r.status != 400)
            fail_msg("frames \"%s\": expected 400, got %ld", bad[i], r.status);
        free(expect_problem(&r, 400));
        resp_free(&r);
    }
    /* well-formed lists get past the syntax check: this instance does not exist */
    static const char *const good[] = {"1", "1,2", "3,1,2"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        snprintf(path, sizeof(path), "%s%s", base, good[i]);
        resp r = get(f, path, TOK_READ);
        free(expect_problem(&r, 404));
        resp_free(&r);
    }
}

/* The metadata of a series larger than one page of the query (META_PAGE, 200) holds every
 * instance exactly once, in instance number order. */
static void test_wado_metadata_pages(void **state)
{
    fixture *f = *state;
    insert_studies(f);
    exec_ok(f->db,
            "INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, instance_number,"
            " store_key, size_bytes, sha256)"
            " SELECT '" STUDY_B ".1.' || g, '" STUDY_B ".1', '" STUDY_B "',"
            " '1.2.840.10008.5.1.4.1.1.4', g, 'instances/x/' || g, 1, 'x'"
            " FROM generate_series(1, 450) AS g",
            0, NULL);
    cJSON *j = get_json(f, "/dicomweb/studies/" STUDY_B "/series/" STUDY_B ".1/metadata", 200);
    assert_int_equal(cJSON_GetArraySize(j), 450);
    for (int i = 0; i < 450; i++) {
        char want[80];
        snprintf(want, sizeof(want), STUDY_B ".1.%d", i + 1);
        cJSON *sop = cJSON_GetObjectItem(cJSON_GetArrayItem(j, i), "00080018");
        assert_string_equal(
            cJSON_GetStringValue(cJSON_GetArrayItem(cJSON_GetObjectItem(sop, "Value"), 0)), want);
    }
    cJSON_Delete(j);
    exec_ok(f->db, "DELETE FROM instances WHERE series_uid = '" STUDY_B ".1'", 0, NULL);
}

/* --- the element path walker of WADO-RS bulk data ----------------------------------------------
 */

typedef struct dbuf {
    unsigned char d[4096];
    size_t n;
} dbuf;

static void db_raw(dbuf *b, const void *p, size_t n)
{
    assert_true(b->n + n <= sizeof(b->d));
    memcpy(b->d + b->n, p, n);
    b->n += n;
}

static void db_u16(dbuf *b, unsigned v)
{
    unsigned char x[2] = {(unsigned char)(v & 0xFF), (unsigned char)(v >> 8)};
    db_raw(b, x, 2);
}

static void db_u32(dbuf *b, uint32_t v)
{
    unsigned char x[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    db_raw(b, x, 4);
}

/* An element header; returns where its length field is (for patching a defined length). */
static size_t db_head(dbuf *b, int explicit_vr, uint32_t tag, const char *vr, uint32_t len)
{
    db_u16(b, tag >> 16);
    db_u16(b, tag & 0xFFFF);
    size_t at = b->n;
    if (!explicit_vr || (tag >> 16) == 0xFFFE) {
        db_u32(b, len);
        return at;
    }
    db_raw(b, vr, 2);
    if (strcmp(vr, "OB") == 0 || strcmp(vr, "OW") == 0 || strcmp(vr, "SQ") == 0 ||
        strcmp(vr, "UN") == 0) {
        db_u16(b, 0);
        at = b->n;
        db_u32(b, len);
    } else {
        db_u16(b, len);
    }
    return at;
}

static void db_patch(dbuf *b, size_t at)
{
    uint32_t len = (uint32_t)(b->n - at - 4);
    for (int i = 0; i < 4; i++)
        b->d[at + i] = (unsigned char)(len >> (8 * i));
}

static size_t db_elem(dbuf *b, int explicit_vr, uint32_t tag, const char *vr, const char *v,
                      size_t len)
{
    db_head(b, explicit_vr, tag, vr, (uint32_t)len);
    size_t at = b->n;
    db_raw(b, v, len);
    return at;
}

/* A data set with nested sequences of defined and undefined length:
 *   (0008,0016) UI
 *   (0040,0275) SQ undefined: item 0 undefined { (0040,0009) SH, (0040,A730) SQ defined:
 *                 item 0 defined { (0028,2000) OB "ICCPROF!" } }, item 1 defined
 *                 { (0040,0009) SH, (0042,0011) OB "PDF!" }
 *   (7FE0,0010) OW
 * value offsets of the three binary values go to off[]. */
static void make_nested(dbuf *b, int explicit_vr, size_t off[3])
{
    memset(b, 0, sizeof(*b));
    if (explicit_vr) {
        b->n = 128;
        db_raw(b, "DICM", 4);
        db_elem(b, 1, 0x00020010, "UI", "1.2.840.10008.1.2.1\0", 20);
    }
    db_elem(b, explicit_vr, 0x00080016, "UI", "1.2.840.10008.5.1.4.1.1.7\0", 26);
    db_head(b, explicit_vr, 0x00400275, "SQ", 0xFFFFFFFFu);
    db_head(b, explicit_vr, 0xFFFEE000, NULL, 0xFFFFFFFFu);
    db_elem(b, explicit_vr, 0x00400009, "SH", "SPS1", 4);
    size_t seq = db_head(b, explicit_vr, 0x0040A730, "SQ", 0);
    size_t item = db_head(b, explicit_vr, 0xFFFEE000, NULL, 0);
    off[0] = db_elem(b, explicit_vr, 0x00282000, "OB", "ICCPROF!", 8);
    db_patch(b, item);
    db_patch(b, seq);
    db_head(b, explicit_vr, 0xFFFEE00D, NULL, 0);
    item = db_head(b, explicit_vr, 0xFFFEE000, NULL, 0);
    db_elem(b, explicit_vr, 0x00400009, "SH", "SPS2", 4);
    off[1] = db_elem(b, explicit_vr, 0x00420011, "OB", "PDF!", 4);
    db_patch(b, item);
    db_head(b, explicit_vr, 0xFFFEE0DD, NULL, 0);
    off[2] = db_elem(b, explicit_vr, 0x7FE00010, "OW", "\1\2\3\4", 4);
}

static int64_t mem_read(void *ctx, int64_t off, void *buf, size_t len)
{
    const dbuf *b = ctx;
    if (off < 0 || (size_t)off > b->n)
        return -1;
    size_t n = b->n - (size_t)off < len ? b->n - (size_t)off : len;
    memcpy(buf, b->d + off, n);
    return (int64_t)n;
}

static void test_dcmwalk_paths(void **state)
{
    (void)state;
    for (int explicit_vr = 0; explicit_vr <= 1; explicit_vr++) {
        dbuf b;
        size_t off[3];
        gw_dcm_elem e;
        lc_err err = {0};
        make_nested(&b, explicit_vr, off);
        const uint32_t icc[] = {0x00400275, 0x0040A730, 0x00282000};
        const int icc_items[] = {0, 0};
        assert_int_equal(gw_dcm_find_path(mem_read, &b, (int64_t)b.n, icc, icc_items, 3, &e, &err),
                         LC_OK);
        assert_int_equal(e.value_offset, off[0]);
        assert_int_equal(e.length, 8);
        const uint32_t pdf[] = {0x00400275, 0x00420011};
        const int one[] = {1}, zero[] = {0}, two[] = {2};
        assert_int_equal(gw_dcm_find_path(mem_read, &b, (int64_t)b.n, pdf, one, 2, &e, &err),
                         LC_OK);
        assert_int_equal(e.value_offset, off[1]);
        assert_int_equal(e.length, 4);
        assert_int_equal(gw_dcm_find(mem_read, &b, (int64_t)b.n, 0x7FE00010, &e, &err), LC_OK);
        assert_int_equal(e.value_offset, off[2]);
        /* not in item 0, no item 2, not a sequence, nothing below a leaf */
        assert_int_equal(gw_dcm_find_path(mem_read, &b, (int64_t)b.n, pdf, zero, 2, &e, &err),
                         LC_ERR_NOT_FOUND);
        assert_int_equal(gw_dcm_find_path(mem_read, &b, (int64_t)b.n, pdf, two, 2, &e, &err),
                         LC_ERR_NOT_FOUND);
        const uint32_t notseq[] = {0x00080016, 0x00420011};
        assert_int_equal(gw_dcm_find_path(mem_read, &b, (int64_t)b.n, notseq, zero, 2, &e, &err),
                         LC_ERR_NOT_FOUND);
        /* a nested element is not found at the top level */
        assert_int_equal(gw_dcm_find(mem_read, &b, (int64_t)b.n, 0x00420011, &e, &err),
                         LC_ERR_NOT_FOUND);
        /* a truncated file is malformed, not found nowhere */
        assert_int_equal(gw_dcm_find_path(mem_read, &b, (int64_t)off[1] + 2, pdf, one, 2, &e, &err),
                         LC_ERR_DICOM);
        assert_int_equal(gw_dcm_find_path(mem_read, &b, (int64_t)b.n, pdf, one, 0, &e, &err),
                         LC_ERR_INVALID);
    }
}

/* --- configuration and contract --------------------------------------------------------- */

static void test_route_match(void **state)
{
    (void)state;
    gw_param p[GW_MAX_PARAMS];
    int n = -1;
    assert_true(gw_route_match("/api/v1/studies", "/api/v1/studies", p, &n));
    assert_int_equal(n, 0);
    assert_true(gw_route_match("/api/v1/studies/{uid}", "/api/v1/studies/1.2.3", p, &n));
    assert_int_equal(n, 1);
    assert_string_equal(p[0].value, "1.2.3");
    assert_int_equal(p[0].name_len, 3);
    assert_false(gw_route_match("/api/v1/studies/{uid}", "/api/v1/studies/", p, &n));
    assert_false(gw_route_match("/api/v1/studies/{uid}", "/api/v1/studies/1/x", p, &n));
    assert_false(gw_route_match("/api/v1/studies", "/api/v1/studies/", p, &n));
    assert_false(gw_route_match("/api/v1/studies", "/api/v1/studie", p, &n));
    assert_true(gw_route_match("/a/{x}/b/{y}", "/a/1/b/2", p, &n));
    assert_int_equal(n, 2);
    assert_string_equal(p[1].value, "2");
}

static void test_config_table(void **state)
{
    (void)state;
    static const char *const names[] = {
        "RADPIPE_HTTP_LISTEN",         "RADPIPE_HTTP_THREADS",
        "RADPIPE_HTTP_MAX_BODY_BYTES", "RADPIPE_HTTP_REQUEST_TIMEOUT_MS",
        "RADPIPE_SPOOL_DIR",           "RADPIPE_ADMIN_TOKEN_FILE",
        "RADPIPE_DB_POOL_SIZE",        "RADPIPE_CORS_ORIGINS",
        "RADPIPE_TLS_CERT_FILE",       "RADPIPE_PUBLIC_URL",
        "RADPIPE_UPLOAD_MAX_FILES",    "RADPIPE_ZIP_MAX_EXPANDED_BYTES",
        "RADPIPE_EVENTS_MAX_CLIENTS"};
    assert_int_equal(gw_cfg_nvars, sizeof(names) / sizeof(names[0]));
    for (size_t i = 0; i < gw_cfg_nvars; i++) {
        assert_string_equal(gw_cfg_vars[i].name, names[i]);
        assert_non_null(gw_cfg_vars[i].help);
    }
    gw_config c = {0};
    lc_cfg_table t = {gw_cfg_vars, gw_cfg_nvars, &c};
    lc_err err = {0};
    unsetenv("RADPIPE_HTTP_MAX_BODY_BYTES");
    assert_int_equal(lc_cfg_load(&t, 1, &err), LC_OK);
    assert_int_equal(c.max_body_bytes, 2LL << 30);
    assert_int_equal(c.http_threads, 16);
    assert_int_equal(c.request_timeout_ms, 300000);
    assert_int_equal(c.db_pool_size, 8);
    assert_string_equal(c.http_listen, "127.0.0.1:8080");
    assert_string_equal(c.spool_dir, "var/spool");
    assert_string_equal(c.admin_token_file, "");
    assert_string_equal(c.cors_origins, "");
    assert_string_equal(c.tls_cert_file, "");
    assert_string_equal(c.public_url, "");
    assert_int_equal(c.upload_max_files, 1000);
    assert_int_equal(c.zip_max_expanded, 8LL << 30);
    assert_int_equal(c.events_max_clients, 8);
    lc_cfg_release(&t, 1);
}

/* The web UI: its files need no token (they hold no data), come with a CSP that allows this
 * origin only, are the files in services/api-gateway/ui byte for byte, and the script is
 * valid JavaScript (node --check) calling only /api/v1 resources of the router table. */
static void test_web_ui(void **state)
{
    fixture *f = *state;
    char v[512], path[1024];
    resp r = http(f, &(req){.method = "GET", .path = "/ui/"});
    assert_int_equal(r.status, 200);
    assert_non_null(header(&r, "Content-Type", v, sizeof(v)));
    assert_non_null(strstr(v, "text/html"));
    assert_non_null(header(&r, "Content-Security-Policy", v, sizeof(v)));
    assert_non_null(strstr(v, "script-src 'self'"));
    assert_non_null(strstr(v, "frame-ancestors 'none'"));
    assert_null(strstr(v, "unsafe"));
    assert_non_null(strstr(r.body, "<script src=\"app.js\""));
    assert_non_null(strstr(r.body, "href=\"app.css\""));
    resp_free(&r);

    static const char *const files[][2] = {
        {"index.html", "text/html"}, {"app.js", "text/javascript"}, {"app.css", "text/css"}};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(path, sizeof(path), "/ui/%s", files[i][0]);
        r = http(f, &(req){.method = "GET", .path = path});
        assert_int_equal(r.status, 200);
        assert_non_null(header(&r, "Content-Type", v, sizeof(v)));
        assert_non_null(strstr(v, files[i][1]));
        snprintf(path, sizeof(path), "%s/services/api-gateway/ui/%s", ts_root(), files[i][0]);
        size_t n = 0;
        char *src = ts_read_file(path, &n);
        assert_non_null(src);
        assert_int_equal(r.len, n);
        assert_memory_equal(r.body, src, n);
        free(src);
        resp_free(&r);
    }

    /* "/" and "/ui" lead to the page; other paths and methods get problem+json */
    static const char *const to_ui[] = {"/", "/ui"};
    for (size_t i = 0; i < 2; i++) {
        r = http(f, &(req){.method = "GET", .path = to_ui[i]});
        assert_int_equal(r.status, 302);
        assert_non_null(header(&r, "Location", v, sizeof(v)));
        assert_string_equal(v, "/ui/");
        resp_free(&r);
    }
    r = http(f, &(req){.method = "GET", .path = "/ui/no-such-file.js"});
    free(expect_problem(&r, 404));
    resp_free(&r);
    r = http(f, &(req){.method = "GET", .path = "/ui/%2e%2e/%2e%2e/etc/passwd"});
    assert_true(r.status == 404 || r.status == 400);
    assert_null(strstr(r.body ? r.body : "", "root:"));
    resp_free(&r);
    r = http(
        f, &(req){.method = "POST", .path = "/ui/", .ctype = "text/plain", .body = "x", .len = 1});
    free(expect_problem(&r, 405));
    resp_free(&r);

    /* the script parses, and every api('<resource>...') it makes is a route */
    char *out = NULL, cmd[1200];
    snprintf(cmd, sizeof(cmd), "node --check '%s/services/api-gateway/ui/app.js' 2>&1", ts_root());
    int rc = ts_run(cmd, &out);
    if (rc != 0)
        fail_msg("app.js is not valid JavaScript: %s", out ? out : "");
    free(out);
    snprintf(path, sizeof(path), "%s/services/api-gateway/ui/app.js", ts_root());
    char *js = ts_read_file(path, NULL);
    assert_non_null(js);
    size_t nroutes;
    const gw_route *routes = gw_routes(&nroutes);
    int calls = 0;
    for (const char *p = js; (p = strstr(p, "api(")); p += 4) {
        const char *q = p + 4;
        if (*q != '\'' && *q != '`')
            continue;
        q++;
        char res[64];
        size_t k = strcspn(q, "/?'`$");
        snprintf(res, sizeof(res), "/api/v1/%.*s", (int)k, q);
        int found = 0;
        for (size_t i = 0; i < nroutes && !found; i++)
            found =
                strncmp(routes[i].pattern, res, strlen(res)) == 0 &&
                (routes[i].pattern[strlen(res)] == '\0' || routes[i].pattern[strlen(res)] == '/');
        if (!found)
            fail_msg("app.js calls %s, which is not in the router table", res);
        calls++;
    }
    assert_true(calls >= 10);
    free(js);
}

/* Every route of the router table (and the admin paths) is in proto/openapi.yaml with its
 * method, and the file describes no path or method the server does not have. The YAML is read
 * loosely: path keys are the lines "  /...:" and methods the lines "    get:" below them. */
static void test_openapi_lists_every_route(void **state)
{
    (void)state;
    char path[1024];
    snprintf(path, sizeof(path), "%s/proto/openapi.yaml", ts_root());
    char *yaml = ts_read_file(path, NULL);
    if (!yaml)
        fail_msg("cannot read %s", path);
    char seen[64][2][128]; /* (path, method) pairs in the file */
    int nseen = 0;
    char cur[128] = "";
    int in_paths = 0;
    for (char *line = strtok(yaml, "\n"); line; line = strtok(NULL, "\n")) {
        size_t len = strlen(line);
        if (len && line[len - 1] == '\r')
            line[--len] = '\0';
        if (strcmp(line, "paths:") == 0) {
            in_paths = 1;
            continue;
        }
        if (line[0] && line[0] != ' ' && line[0] != '#')
            in_paths = 0;
        if (!in_paths)
            continue;
        if (strncmp(line, "  /", 3) == 0 && line[len - 1] == ':') {
            snprintf(cur, sizeof(cur), "%.*s", (int)(len - 3), line + 2);
            continue;
        }
        static const char *const verbs[] = {"get",   "post",    "put", "delete",
                                            "patch", "options", "head"};
        for (size_t v = 0; v < sizeof(verbs) / sizeof(verbs[0]); v++) {
            char key[32];
            snprintf(key, sizeof(key), "    %s:", verbs[v]);
            if (strcmp(line, key) == 0 && cur[0] && nseen < 64) {
                lc_strlcpy(seen[nseen][0], cur, sizeof(seen[0][0]));
                for (size_t k = 0; verbs[v][k] && k < 127; k++)
                    seen[nseen][1][k] = (char)(verbs[v][k] - 'a' + 'A');
                seen[nseen][1][strlen(verbs[v])] = '\0';
                nseen++;
            }
        }
    }
    free(yaml);
    assert_true(nseen > 0);

    size_t n;
    const gw_route *routes = gw_routes(&n);
    for (size_t i = 0; i < n; i++) {
        int found = 0;
        for (int k = 0; k < nseen && !found; k++)
            found = strcmp(seen[k][0], routes[i].pattern) == 0 &&
                    strcmp(seen[k][1], routes[i].method) == 0;
        if (!found)
            fail_msg("route %s %s is missing from proto/openapi.yaml", routes[i].method,
                     routes[i].pattern);
    }
    for (size_t i = 0; i < gw_admin_npaths; i++) {
        int found = 0;
        for (int k = 0; k < nseen && !found; k++)
            found = strcmp(seen[k][0], gw_admin_paths[i]) == 0 && strcmp(seen[k][1], "GET") == 0;
        if (!found)
            fail_msg("admin path %s is missing from proto/openapi.yaml", gw_admin_paths[i]);
    }
    for (int k = 0; k < nseen; k++) {
        int found = 0;
        for (size_t i = 0; i < n && !found; i++)
            found = strcmp(seen[k][0], routes[i].pattern) == 0 &&
                    strcmp(seen[k][1], routes[i].method) == 0;
        for (size_t i = 0; i < gw_admin_npaths && !found; i++)
            found = strcmp(seen[k][0], gw_admin_paths[i]) == 0 && strcmp(seen[k][1], "GET") == 0;
        if (!found)
            fail_msg("proto/openapi.yaml describes %s %s, which the server does not have",
                     seen[k][1], seen[k][0]);
    }
}

/* --- the multipart parser in pieces ----------------------------------------------------- */

typedef struct mp_seen {
    int parts, ends;
    size_t part_len[4];
    char *bytes; /* every part's bytes, one after the other */
    size_t len, cap;
} mp_seen;

static lc_rc mp_begin(void *ctx, const gw_mp_part *part, lc_err *err)
{
    mp_seen *m = ctx;
    (void)err;
    assert_int_equal(part->index, m->parts);
    assert_true(m->parts < 4);
    m->part_len[m->parts++] = 0;
    return LC_OK;
}

static lc_rc mp_data(void *ctx, const char *buf, size_t len, lc_err *err)
{
    mp_seen *m = ctx;
    (void)err;
    assert_true(len > 0);
    assert_true(m->len + len <= m->cap);
    memcpy(m->bytes + m->len, buf, len);
    m->len += len;
    m->part_len[m->parts - 1] += len;
    return LC_OK;
}

static lc_rc mp_end(void *ctx, const gw_mp_part *part, lc_err *err)
{
    mp_seen *m = ctx;
    (void)part;
    (void)err;
    m->ends++;
    return LC_OK;
}

/* Feed body in pieces: sizes[k % nsizes] bytes at a time (0: all at once). */
static lc_rc mp_parse(const char *body, size_t len, const size_t *sizes, size_t nsizes, mp_seen *m,
                      lc_err *err)
{
    static const gw_mp_limits lim = {.max_parts = 4,
                                     .max_part_bytes = 1 << 20,
                                     .max_header_bytes = 1024,
                                     .max_preamble_bytes = 1024};
    static const gw_mp_callbacks cb = {mp_begin, mp_data, mp_end};
    gw_mp *p = NULL;
    m->parts = m->ends = 0;
    m->len = 0;
    assert_int_equal(gw_mp_new("b0undary-XyZ", &lim, &cb, m, &p, err), LC_OK);
    lc_rc rc = LC_OK;
    for (size_t off = 0, k = 0; rc == LC_OK && off < len; k++) {
        size_t n = sizes[k % nsizes] ? sizes[k % nsizes] : len;
        if (n > len - off)
            n = len - off;
        rc = gw_mp_feed(p, body + off, n, err);
        off += n;
    }
    if (rc == LC_OK)
        rc = gw_mp_finish(p, err);
    gw_mp_free(p);
    return rc;
}

/* Bodies whose data is full of delimiter look-alikes, cut into pieces of every small size and
 * some large ones: the parts and their bytes never depend on where the pieces end, whether
 * the window or the caller's buffer hands them out. */
static void test_multipart_pieces(void **state)
{
    (void)state;
    static const char delim_start[] = "\r\n--b0undary-Xy"; /* a delimiter but for its end */
    size_t n0 = 300000, n2 = 3000, cap = n0 + n2 + 4096;
    char *p0 = malloc(n0), *p2 = malloc(n2), *body = malloc(cap);
    mp_seen m = {.bytes = malloc(cap), .cap = cap};
    assert_non_null(p0);
    assert_non_null(p2);
    assert_non_null(body);
    assert_non_null(m.bytes);
    unsigned x = 12345;
    for (size_t i = 0; i < n0; i++) {
        x = x * 1103515245u + 12345u;
        p0[i] = (char)(x >> 16);
    }
    for (size_t i = 0; i + sizeof(delim_start) < n0; i += 997) { /* prefixes of every length */
        size_t k = 1 + (i / 997) % (sizeof(delim_start) - 1);
        memcpy(p0 + i, delim_start, k);
        p0[i + k] = 'z'; /* never the delimiter's next byte */
    }
    memcpy(p0 + n0 - 3, "\r\n-", 3); /* a delimiter prefix right before the real one */
    for (size_t i = 0; i < n2; i++)
        p2[i] = "\r\n-b"[i % 4];
    size_t len = 0;
    len += (size_t)sprintf(body + len, "--b0undary-XyZ\r\nContent-Type: application/dicom\r\n\r\n");
    const size_t head0 = len;
    memcpy(body + len, p0, n0);
    len += n0;
    len += (size_t)sprintf(body + len, "\r\n--b0undary-XyZ\r\n\r\n"); /* an empty part */
    len += (size_t)sprintf(body + len, "\r\n--b0undary-XyZ  \r\nContent-Length: %zu\r\n\r\n", n2);
    memcpy(body + len, p2, n2);
    len += n2;
    len += (size_t)sprintf(body + len, "\r\n--b0undary-XyZ--\r\nepilogue");

    size_t sizes[] = {0,  1,   2,   3,    5,    7,    13,   16,    17,     18,     19,    31,
                      64, 100, 997, 4096, 8191, 8192, 8193, 65536, 262143, 262144, 300000};
    const size_t cycle[] = {1, 17, 2, 18, 4000, 3, 19, 70000, 16};
    for (size_t k = 0; k <= sizeof(sizes) / sizeof(sizes[0]); k++) {
        lc_err err = {0};
        int cycling = k == sizeof(sizes) / sizeof(sizes[0]);
        lc_rc rc = cycling ? mp_parse(body, len, cycle, sizeof(cycle) / sizeof(cycle[0]), &m, &err)
                           : mp_parse(body, len, &sizes[k], 1, &m, &err);
        if (rc != LC_OK)
            fail_msg("pieces of %zu: %s", cycling ? 0 : sizes[k], lc_err_msg(&err));
        assert_int_equal(m.parts, 3);
        assert_int_equal(m.ends, 3);
        assert_int_equal(m.part_len[0], n0);
        assert_int_equal(m.part_len[1], 0);
        assert_int_equal(m.part_len[2], n2);
        assert_memory_equal(m.bytes, p0, n0);
        assert_memory_equal(m.bytes + n0, p2, n2);
    }
    /* every delimiter split at every position near it: a piece that ends inside it, then one
     * of a few bytes, then the rest */
    const char *d = body;
    while ((d = memmem(d + 1, len - (size_t)(d + 1 - body), "\r\n--b0undary-XyZ", 16))) {
        size_t at = (size_t)(d - body);
        for (size_t cut = at - 20; cut <= at + 20; cut++) {
            static const size_t then[] = {1, 5, 14, 15, 16, 17, 40};
            for (size_t t = 0; t < sizeof(then) / sizeof(then[0]); t++) {
                lc_err err = {0};
                const size_t three[3] = {cut, then[t], 0};
                if (mp_parse(body, len, three, 3, &m, &err) != LC_OK)
                    fail_msg("cut at %zu then %zu: %s", cut, then[t], lc_err_msg(&err));
                assert_int_equal(m.parts, 3);
                assert_int_equal(m.part_len[0], n0);
                assert_int_equal(m.part_len[2], n2);
                assert_memory_equal(m.bytes, p0, n0);
                assert_memory_equal(m.bytes + n0, p2, n2);
            }
        }
    }
    /* truncated inside the tail the parser keeps back: an error whatever the pieces */
    for (size_t k = 1; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
        lc_err err = {0};
        size_t cut = head0 + n0 - 2; /* inside the first part's trailing "\r\n-" */
        assert_int_equal(mp_parse(body, cut, &sizes[k], 1, &m, &err), LC_ERR_INVALID);
    }
    free(m.bytes);
    free(body);
    free(p2);
    free(p0);
}

/* --- STOW-RS of several instances ------------------------------------------------------- */

/* A multipart/related body of files (NULL: a plain text part), boundary "b0undary-XyZ";
 * caller frees. */
static char *stow_body(const char *const *files, size_t n, size_t *len)
{
    size_t cap = 4096, off = 0;
    char *b = malloc(cap);
    assert_non_null(b);
    for (size_t i = 0; i < n; i++) {
        size_t flen = 0;
        char *bytes = files[i] ? ts_read_file(files[i], &flen) : strdup("not DICOM at all");
        assert_non_null(bytes);
        if (!files[i])
            flen = strlen(bytes);
        char *nb = realloc(b, cap += flen + 200);
        assert_non_null(nb);
        b = nb;
        off += (size_t)sprintf(b + off, "\r\n--b0undary-XyZ\r\nContent-Type: application/dicom"
                                        "\r\n\r\n");
        memcpy(b + off, bytes, flen);
        off += flen;
        free(bytes);
    }
    off += (size_t)sprintf(b + off, "\r\n--b0undary-XyZ--\r\n");
    *len = off;
    return b;
}

/* Instances of two series (and studies), interleaved, with a SOPInstanceUID sent twice and a
 * part that is not DICOM: every accepted instance is stored byte for byte (the later copy of
 * the repeated one wins), announced in part order by one outbox row each, and the spool is
 * empty afterwards. */
static void test_stow_several_instances(void **state)
{
    fixture *f = *state;
    char *files[5] = {ts_data("series/mr-4slice/jpeg-lossless-sv1/IM-0001-0001-0001.dcm"),
                      ts_data("mr-small/MR_small.dcm"),
                      ts_data("series/mr-4slice/jpeg-lossless-sv1/IM-0001-0002-0001.dcm"),
                      NULL, /* not DICOM */
                      ts_data("series/mr-4slice/rle/IM-0001-0001-0001.dcm")};
    lc_dicom_header *h[5] = {0};
    lc_err err = {0};
    for (int i = 0; i < 5; i++)
        if (files[i] && lc_dicom_read_header(files[i], &h[i], &err) != LC_OK)
            fail_msg("%s: %s", files[i], lc_err_msg(&err));
    assert_string_equal(h[0]->sop_instance_uid, h[4]->sop_instance_uid);
    assert_string_not_equal(h[0]->series_instance_uid, h[1]->series_instance_uid);
    long long last0 = query_ll(f->db, "SELECT COALESCE(max(id), 0) FROM outbox", 0, NULL);
    size_t len = 0;
    char *body = stow_body((const char *const *)files, 5, &len);

    resp r = http(f, &(req){.method = "POST",
                            .path = "/dicomweb/studies",
                            .token = TOK_WRITE,
                            .ctype = "multipart/related; type=\"application/dicom\"; "
                                     "boundary=b0undary-XyZ",
                            .body = body,
                            .len = len});
    expect_status(&r, 202);
    cJSON *j = json_of(&r);
    assert_int_equal(
        cJSON_GetArraySize(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "00081199"), "Value")), 4);
    assert_int_equal(
        cJSON_GetArraySize(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "00081198"), "Value")), 1);
    cJSON_Delete(j);
    resp_free(&r);

    PGresult *res = NULL;
    char last[32];
    snprintf(last, sizeof(last), "%lld", last0);
    const char *pl[1] = {last};
    if (lc_db_exec(f->db, "SELECT key, payload FROM outbox WHERE id > $1::bigint ORDER BY id", 1,
                   pl, &res, &err) != LC_OK)
        fail_msg("outbox: %s", lc_err_msg(&err));
    assert_int_equal(PQntuples(res), 4);
    for (int i = 0, row = 0; i < 5; i++) {
        if (!files[i])
            continue;
        lc_event *ev = NULL;
        const char *payload = PQgetvalue(res, row, 1);
        if (lc_event_parse(payload, strlen(payload), &ev, &err) != LC_OK)
            fail_msg("event: %s: %s", lc_err_msg(&err), payload);
        assert_string_equal(PQgetvalue(res, row, 0), h[i]->study_instance_uid);
        assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(ev->data, "sop_instance_uid")),
                            h[i]->sop_instance_uid);
        size_t flen = 0;
        char sha[65], *bytes = ts_read_file(files[i], &flen);
        lc_sha256_hex(bytes, flen, sha);
        assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(ev->data, "sha256")), sha);
        /* the object holds these bytes unless a later part replaced them */
        if (i != 0) {
            char key[512];
            void *stored = NULL;
            size_t slen = 0;
            snprintf(key, sizeof(key), "instances/%s/%s/%s.dcm", h[i]->study_instance_uid,
                     h[i]->series_instance_uid, h[i]->sop_instance_uid);
            if (lc_store_get_buf(f->store, key, 10 << 20, &stored, &slen, &err) != LC_OK)
                fail_msg("get %s: %s", key, lc_err_msg(&err));
            assert_int_equal(slen, flen);
            assert_memory_equal(stored, bytes, flen);
            free(stored);
        }
        free(bytes);
        lc_event_free(ev);
        row++;
    }
    PQclear(res);
    assert_int_equal(count_files(f->spool), 0);
    for (int i = 0; i < 5; i++) {
        lc_dicom_header_free(h[i]);
        free(files[i]);
    }
    free(body);
}

int main(void)
{
    const struct CMUnitTest unit[] = {
        cmocka_unit_test(test_route_match),
        cmocka_unit_test(test_config_table),
        cmocka_unit_test(test_openapi_lists_every_route),
        cmocka_unit_test(test_dcmwalk_paths),
        cmocka_unit_test(test_multipart_pieces),
    };
    const struct CMUnitTest server[] = {
        cmocka_unit_test(test_post_dicom),
        cmocka_unit_test(test_post_not_dicom),
        cmocka_unit_test(test_post_plain_text_leaves_nothing),
        cmocka_unit_test(test_post_auth),
        cmocka_unit_test(test_post_wrong_content_type),
        cmocka_unit_test(test_post_too_large),
        cmocka_unit_test(test_stow_several_instances),
        cmocka_unit_test(test_studies_list),
        cmocka_unit_test(test_studies_list_bad_params),
        cmocka_unit_test(test_studies_sql_metacharacters_are_data),
        cmocka_unit_test(test_study_get),
        cmocka_unit_test(test_job_get),
        cmocka_unit_test(test_models),
        cmocka_unit_test(test_routing_errors),
        cmocka_unit_test(test_cors),
        cmocka_unit_test(test_admin_endpoints_and_metrics),
        cmocka_unit_test(test_bootstrap_token),
        cmocka_unit_test(test_every_route_auth_and_query),
        cmocka_unit_test(test_job_create_idempotency_key),
        cmocka_unit_test(test_study_close_reason_length),
        cmocka_unit_test(test_qido_fuzzymatching_warning),
        cmocka_unit_test(test_wado_frame_lists),
        cmocka_unit_test(test_wado_metadata_pages),
        cmocka_unit_test(test_web_ui),
        cmocka_unit_test(test_drain_lets_uploads_finish),
    };
    int failed = cmocka_run_group_tests_name("gw_unit", unit, NULL, NULL);
    failed += cmocka_run_group_tests_name("gw_server", server, setup, teardown);
    return failed ? 1 : 0;
}
