/*
 * test_dicomweb.c: DICOMweb (PS3.18) on the real embedded stack (radpipe-stack: PostgreSQL,
 * the dev broker and the four services, quiet period long enough that no job starts on its
 * own). A real client library, dicomweb-client from npm (the one OHIF Viewer uses, driven by
 * tests/node/dicomweb-client.mjs), stores the sample series with STOW-RS, finds it with
 * QIDO-RS (PatientID, wildcard PatientName, StudyDate ranges) and retrieves metadata and
 * instances with WADO-RS byte for byte. QIDO-RS answers for the sample studies carry the
 * attributes PS3.18 Tables 10.6.3-3/4/5 require at each level, with their VRs. BulkDataURIs
 * inside sequences and frames of an uncompressed instance can be fetched. Hostile input
 * (malformed multipart, oversized bodies, path traversal, invalid dates and limits) gets 4xx
 * problem+json, writes nothing (database, object store, spool) and leaves the gateway up; SQL
 * metacharacters in every query parameter are data. Event ids of another gateway process are
 * not resumed. The web UI works in jsdom (tests/node/web-ui.mjs). Single-threaded but for one
 * event-stream reader thread.
 */
#include <dirent.h>
#include <ftw.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <cmocka.h>
#include <curl/curl.h>
#include <cjson/cJSON.h>
#include <libpq-fe.h>
#include "lc/dicom.h"
#include "lc/util.h"
#include "ts.h"
#include "ts_proc.h"

#define NESTED_STUDY  "1.2.826.0.1.3680043.10.1.77"
#define NESTED_SERIES NESTED_STUDY ".1"
#define NESTED_SOP    NESTED_STUDY ".1.1"
#define ICC0_LEN      2000 /* over LC_DICOM_JSON_INLINE_MAX: handed out as bulk data */
#define ICC1_LEN      1500
#define PIXEL_LEN     (16 * 16 * 2)

static ts_stack st;
static PGconn *pg;
static char *series_dir; /* the sample series */
static char *tmp;        /* this test's files */
static char nested_path[1024];

/* --- HTTP -------------------------------------------------------------------------------- */

typedef struct hresp {
    long status;
    char *body;
    size_t len;
    char *headers;
    size_t hlen;
} hresp;

typedef struct mbuf {
    char *p;
    size_t n;
} mbuf;

static size_t on_data(char *p, size_t size, size_t n, void *ud)
{
    mbuf *m = ud;
    size_t len = size * n;
    char *b = realloc(m->p, m->n + len + 1);
    if (!b)
        return 0;
    memcpy(b + m->n, p, len);
    m->n += len;
    b[m->n] = '\0';
    m->p = b;
    return len;
}

/* A request to the stack's gateway; hdrs is a NULL-terminated list of header lines (may be
 * NULL); as_is sends the path without curl's dot-segment normalisation. */
static hresp http(const char *method, const char *path, const char *token, const char *const *hdrs,
                  const void *body, size_t len, int as_is)
{
    hresp r = {0};
    char url[4096], auth[600];
    struct curl_slist *h = NULL;
    mbuf b = {0}, hd = {0};
    CURL *c = curl_easy_init();
    assert_non_null(c);
    snprintf(url, sizeof(url), "%s%s", st.http_url, path);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, &hd);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 60L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    if (as_is)
        curl_easy_setopt(c, CURLOPT_PATH_AS_IS, 1L);
    if (token) {
        snprintf(auth, sizeof(auth), "Authorization: Bearer %s", token);
        h = curl_slist_append(h, auth);
    }
    for (const char *const *x = hdrs; x && *x; x++)
        h = curl_slist_append(h, *x);
    if (body) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
        /* large bodies wait for "100 Continue", so a refusal comes before the body is sent */
        if (len < (1u << 20))
            h = curl_slist_append(h, "Expect:");
    }
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_perform(c);
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.status);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    r.body = b.p ? b.p : calloc(1, 1);
    r.len = b.n;
    r.headers = hd.p ? hd.p : calloc(1, 1);
    r.hlen = hd.n;
    return r;
}

static void hresp_free(hresp *r)
{
    free(r->body);
    free(r->headers);
    memset(r, 0, sizeof(*r));
}

/* Response header name (case-insensitive) into buf; NULL when absent. */
static const char *header(const hresp *r, const char *name, char *buf, size_t cap)
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

/* A 4xx answer as RFC 9457 problem+json whose status member matches. */
static void expect_problem(const hresp *r, const char *what)
{
    char ct[128];
    if (r->status < 400 || r->status > 499)
        fail_msg("%s: expected a 4xx, got %ld: %.300s", what, r->status, r->body);
    if (!header(r, "Content-Type", ct, sizeof(ct)) || strcmp(ct, "application/problem+json") != 0)
        fail_msg("%s: %ld answered as %s, not problem+json", what, r->status,
                 header(r, "Content-Type", ct, sizeof(ct)) ? ct : "(none)");
    cJSON *j = cJSON_Parse(r->body);
    if (!j || cJSON_GetNumberValue(cJSON_GetObjectItem(j, "status")) != (double)r->status ||
        !cJSON_GetStringValue(cJSON_GetObjectItem(j, "detail")))
        fail_msg("%s: malformed problem details: %s", what, r->body);
    cJSON_Delete(j);
}

static cJSON *get_json(const char *path, long want)
{
    static const char *const acc[] = {"Accept: application/dicom+json", NULL};
    hresp r = http("GET", path, st.token, acc, NULL, 0, 0);
    if (r.status != want)
        fail_msg("GET %s: expected %ld, got %ld: %.300s", path, want, r.status, r.body);
    cJSON *j = cJSON_Parse(r.body);
    if (!j)
        fail_msg("GET %s: not JSON: %.300s", path, r.body);
    hresp_free(&r);
    return j;
}

/* The body of the first part of a multipart answer. */
static void *first_part(const hresp *r, size_t *len)
{
    char ct[512];
    assert_non_null(header(r, "Content-Type", ct, sizeof(ct)));
    const char *b = strstr(ct, "boundary=");
    assert_non_null(b);
    char delim[128];
    snprintf(delim, sizeof(delim), "\r\n--%s", b + 9);
    const char *start = memmem(r->body, r->len, delim + 2, strlen(delim + 2));
    assert_non_null(start);
    const char *hend = memmem(start, r->len - (size_t)(start - r->body), "\r\n\r\n", 4);
    assert_non_null(hend);
    hend += 4;
    const char *end = memmem(hend, r->len - (size_t)(hend - r->body), delim, strlen(delim));
    assert_non_null(end);
    *len = (size_t)(end - hend);
    void *out = malloc(*len + 1);
    memcpy(out, hend, *len);
    return out;
}

/* --- the state a refused request must leave alone ---------------------------------------- */

static long long sql_ll(const char *sql)
{
    PGresult *r = PQexec(pg, sql);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQerrorMessage(pg));
    long long v = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

static int nfiles;
static int count_file(const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
    (void)path;
    (void)sb;
    (void)ftw;
    nfiles += type == FTW_F;
    return 0;
}

static int files_under(const char *rel)
{
    char path[1200];
    snprintf(path, sizeof(path), "%s/%s", st.var, rel);
    nfiles = 0;
    if (access(path, F_OK) == 0 && nftw(path, count_file, 16, FTW_PHYS) != 0)
        fail_msg("cannot walk %s", path);
    return nfiles;
}

typedef struct written {
    long long studies, series, instances, quarantine, outbox_ids, jobs;
    int objects, spool;
} written;

static void snapshot(written *w)
{
    w->studies = sql_ll("SELECT count(*) FROM studies");
    w->series = sql_ll("SELECT count(*) FROM series");
    w->instances = sql_ll("SELECT count(*) FROM instances");
    w->quarantine = sql_ll("SELECT count(*) FROM quarantine");
    w->jobs = sql_ll("SELECT count(*) FROM jobs");
    /* rows handed to the relay are deleted; the sequence says whether any was written */
    w->outbox_ids =
        sql_ll("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM outbox_id_seq");
    w->objects = files_under("objects");
    w->spool = files_under("spool");
}

static void expect_unchanged(const written *a, const char *what)
{
    written b;
    snapshot(&b);
    if (memcmp(a, &b, sizeof(b)) != 0)
        fail_msg("%s wrote something: studies %lld->%lld series %lld->%lld instances %lld->%lld "
                 "quarantine %lld->%lld outbox ids %lld->%lld jobs %lld->%lld objects %d->%d "
                 "spool %d->%d",
                 what, a->studies, b.studies, a->series, b.series, a->instances, b.instances,
                 a->quarantine, b.quarantine, a->outbox_ids, b.outbox_ids, a->jobs, b.jobs,
                 a->objects, b.objects, a->spool, b.spool);
}

/* --- DICOM bytes ------------------------------------------------------------------------- */

typedef struct dbuf {
    unsigned char *d;
    size_t n, cap;
} dbuf;

static void db_raw(dbuf *b, const void *p, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2;
        b->d = realloc(b->d, b->cap);
        assert_non_null(b->d);
    }
    memcpy(b->d + b->n, p, n);
    b->n += n;
}

static void db_u16(dbuf *b, unsigned v)
{
    unsigned char x[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
    db_raw(b, x, 2);
}

static void db_u32(dbuf *b, uint32_t v)
{
    unsigned char x[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    db_raw(b, x, 4);
}

/* An explicit VR little endian element header; returns where its 32-bit length is (items and
 * long VRs) for patching. */
static size_t db_head(dbuf *b, uint32_t tag, const char *vr, uint32_t len)
{
    db_u16(b, tag >> 16);
    db_u16(b, tag & 0xFFFF);
    if ((tag >> 16) == 0xFFFE) {
        db_u32(b, len);
        return b->n - 4;
    }
    db_raw(b, vr, 2);
    if (strstr("OB OW SQ UN UT", vr)) {
        db_u16(b, 0);
        db_u32(b, len);
        return b->n - 4;
    }
    db_u16(b, len);
    return b->n - 2;
}

/* A string or binary element, padded to even length. */
static void db_el(dbuf *b, uint32_t tag, const char *vr, const void *v, size_t len)
{
    int pad = len % 2;
    db_head(b, tag, vr, (uint32_t)(len + pad));
    db_raw(b, v, len);
    if (pad)
        db_raw(b, strcmp(vr, "UI") == 0 || strcmp(vr, "OB") == 0 ? "\0" : " ", 1);
}

static void db_str(dbuf *b, uint32_t tag, const char *vr, const char *s)
{
    db_el(b, tag, vr, s, strlen(s));
}

static void db_us(dbuf *b, uint32_t tag, unsigned v)
{
    unsigned char x[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
    db_el(b, tag, "US", x, 2);
}

static void db_patch(dbuf *b, size_t at)
{
    uint32_t len = (uint32_t)(b->n - at - 4);
    for (int i = 0; i < 4; i++)
        b->d[at + i] = (unsigned char)(len >> (8 * i));
}

static unsigned char pattern(size_t i, int seed)
{
    return (unsigned char)((i * 31 + (size_t)seed * 7 + (i >> 8)) & 0xFF);
}

/* A 16x16 16-bit Secondary Capture instance, explicit VR little endian, with an Optical Path
 * Sequence whose two items (one of undefined, one of defined length) hold ICC profiles larger
 * than the metadata's inline limit: their BulkDataURIs point inside the sequence. */
static void write_nested(const char *path)
{
    dbuf m = {0}, b = {0};
    unsigned char buf[ICC0_LEN];
    db_el(&m, 0x00020001, "OB", "\0\1", 2);
    db_str(&m, 0x00020002, "UI", "1.2.840.10008.5.1.4.1.1.7");
    db_str(&m, 0x00020003, "UI", NESTED_SOP);
    db_str(&m, 0x00020010, "UI", "1.2.840.10008.1.2.1");
    db_str(&m, 0x00020012, "UI", "1.2.826.0.1.3680043.10.1.9");
    memset(buf, 0, 128);
    db_raw(&b, buf, 128);
    db_raw(&b, "DICM", 4);
    db_head(&b, 0x00020000, "UL", 4);
    db_u32(&b, (uint32_t)m.n);
    db_raw(&b, m.d, m.n);
    db_str(&b, 0x00080016, "UI", "1.2.840.10008.5.1.4.1.1.7");
    db_str(&b, 0x00080018, "UI", NESTED_SOP);
    db_str(&b, 0x00080020, "DA", "20240315");
    db_str(&b, 0x00080030, "TM", "101010");
    db_str(&b, 0x00080050, "SH", "ACC-NB-1");
    db_str(&b, 0x00080060, "CS", "OT");
    db_str(&b, 0x00080201, "SH", "+0100");
    db_str(&b, 0x0008103E, "LO", "nested bulk data");
    db_str(&b, 0x00100010, "PN", "Nested^Bulk");
    db_str(&b, 0x00100020, "LO", "NB-1");
    db_str(&b, 0x00100030, "DA", "19700101");
    db_str(&b, 0x00100040, "CS", "O");
    db_str(&b, 0x0020000D, "UI", NESTED_STUDY);
    db_str(&b, 0x0020000E, "UI", NESTED_SERIES);
    db_str(&b, 0x00200010, "SH", "NB");
    db_str(&b, 0x00200011, "IS", "7");
    db_str(&b, 0x00200013, "IS", "1");
    db_us(&b, 0x00280002, 1);
    db_str(&b, 0x00280004, "CS", "MONOCHROME2");
    db_us(&b, 0x00280010, 16);
    db_us(&b, 0x00280011, 16);
    db_us(&b, 0x00280100, 16);
    db_us(&b, 0x00280101, 16);
    db_us(&b, 0x00280102, 15);
    db_us(&b, 0x00280103, 0);
    db_str(&b, 0x00400244, "DA", "20240315");
    db_str(&b, 0x00400245, "TM", "101500");
    db_head(&b, 0x00480105, "SQ", 0xFFFFFFFFu);
    db_head(&b, 0xFFFEE000, NULL, 0xFFFFFFFFu);
    for (size_t i = 0; i < ICC0_LEN; i++)
        buf[i] = pattern(i, 1);
    db_el(&b, 0x00282000, "OB", buf, ICC0_LEN);
    db_head(&b, 0xFFFEE00D, NULL, 0);
    size_t item = db_head(&b, 0xFFFEE000, NULL, 0);
    for (size_t i = 0; i < ICC1_LEN; i++)
        buf[i] = pattern(i, 2);
    db_el(&b, 0x00282000, "OB", buf, ICC1_LEN);
    db_patch(&b, item);
    db_head(&b, 0xFFFEE0DD, NULL, 0);
    for (size_t i = 0; i < PIXEL_LEN; i++)
        buf[i] = pattern(i, 3);
    db_el(&b, 0x7FE00010, "OW", buf, PIXEL_LEN);
    assert_int_equal(ts_write_file(path, b.d, b.n), 0);
    free(m.d);
    free(b.d);
}

/* A multipart/related body of the files (boundary "radpipe-test-boundary"). */
static char *multipart_of(char *const *files, size_t *len)
{
    dbuf b = {0};
    for (char *const *f = files; *f; f++) {
        size_t n = 0;
        char *data = ts_read_file(*f, &n);
        assert_non_null(data);
        static const char head[] =
            "--radpipe-test-boundary\r\nContent-Type: application/dicom\r\n\r\n";
        db_raw(&b, head, sizeof(head) - 1);
        db_raw(&b, data, n);
        db_raw(&b, "\r\n", 2);
        free(data);
    }
    static const char tail[] = "--radpipe-test-boundary--\r\n";
    db_raw(&b, tail, sizeof(tail));
    *len = b.n - 1;
    return (char *)b.d;
}

static const char *const stow_hdrs[] = {
    "Content-Type: multipart/related; type=\"application/dicom\"; boundary=radpipe-test-boundary",
    "Accept: application/dicom+json", NULL};

/* Wait until QIDO-RS counts n instances in the study. */
static void wait_indexed(const char *study, int n)
{
    char path[256];
    snprintf(path, sizeof(path), "/dicomweb/studies?StudyInstanceUID=%s", study);
    for (int i = 0; i < 600; i++) {
        cJSON *j = get_json(path, 200);
        cJSON *cnt = cJSON_GetObjectItem(cJSON_GetArrayItem(j, 0), "00201208");
        int have =
            (int)cJSON_GetNumberValue(cJSON_GetArrayItem(cJSON_GetObjectItem(cnt, "Value"), 0));
        cJSON_Delete(j);
        if (have == n)
            return;
        usleep(200 * 1000);
    }
    ts_stack_dump_log(&st);
    fail_msg("study %s never had %d instances indexed", study, n);
}

/* --- set-up ------------------------------------------------------------------------------ */

static int setup(void **state)
{
    (void)state;
    static const char *const env[] = {
        "RADPIPE_STUDY_QUIET_SECONDS=3600", /* no completion, so no job writes on its own */
        "RADPIPE_RECONCILE_INTERVAL_SECONDS=1",
        "RADPIPE_DRAIN_SECONDS=5",
        "RADPIPE_HTTP_MAX_BODY_BYTES=64M",
        "RADPIPE_UPLOAD_MAX_FILES=1000",
        NULL,
    };
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (ts_stack_start(&st, NULL, env, 180000) != 0)
        fail_msg("the stack did not start");
    pg = PQconnectdb(st.database_url);
    assert_int_equal(PQstatus(pg), CONNECTION_OK);
    series_dir = ts_test_series();
    tmp = ts_tmpdir("dicomweb");
    snprintf(nested_path, sizeof(nested_path), "%s/nested.dcm", tmp);
    write_nested(nested_path);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    PQfinish(pg);
    ts_stack_free(&st);
    ts_rmrf(tmp);
    free(tmp);
    free(series_dir);
    curl_global_cleanup();
    return 0;
}

/* --- 1. a real client library ------------------------------------------------------------- */

/* Runs tests/node/<script> with cfg (consumed) in a JSON file; it must print "every check
 * passed" and exit 0, else the stack's log is dumped and the test fails. */
static void run_node_script(const char *script, cJSON *cfg)
{
    char *text = cJSON_Print(cfg), path[1100], cmd[3000], *out = NULL;
    cJSON_Delete(cfg);
    assert_non_null(text);
    snprintf(path, sizeof(path), "%s/%s.json", tmp, script);
    assert_int_equal(ts_write_file(path, text, strlen(text)), 0);
    free(text);
    snprintf(cmd, sizeof(cmd), "node '%s/tests/node/%s' '%s' 2>&1", ts_root(), script, path);
    int rc = ts_run(cmd, &out);
    fprintf(stderr, "%s", out ? out : "");
    if (rc != 0) {
        ts_stack_dump_log(&st);
        fail_msg("%s failed (exit %d)", script, rc);
    }
    assert_non_null(strstr(out, "every check passed"));
    free(out);
}

static void test_dicomweb_client_library(void **state)
{
    (void)state;
    char **files = ts_list_files(series_dir);
    cJSON *cfg = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(cfg, "files");
    lc_dicom_header *h = NULL;
    lc_err err = {0};
    for (char **f = files; *f; f++) {
        assert_int_equal(lc_dicom_read_header(*f, &h, &err), LC_OK);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "path", *f);
        cJSON_AddStringToObject(o, "sop", h->sop_instance_uid);
        cJSON_AddItemToArray(arr, o);
        if (f[1])
            lc_dicom_header_free(h);
    }
    assert_true(cJSON_GetArraySize(arr) >= 2);
    cJSON_AddStringToObject(cfg, "url", st.http_url);
    cJSON_AddStringToObject(cfg, "token", st.token);
    cJSON_AddStringToObject(cfg, "patient_id", h->patient_id);
    cJSON_AddStringToObject(cfg, "patient_name", h->patient_name);
    cJSON_AddStringToObject(cfg, "study_date", h->study_date);
    cJSON_AddStringToObject(cfg, "study", h->study_instance_uid);
    cJSON_AddStringToObject(cfg, "series", h->series_instance_uid);
    lc_dicom_header_free(h);
    ts_strv_free(files);
    run_node_script("dicomweb-client.mjs", cfg);
}

/* --- 2. QIDO-RS return attributes per level ---------------------------------------------- */

/* PS3.18 2024 Tables 10.6.3-3 (study), 10.6.3-4 (series), 10.6.3-5 (instance): each
 * attribute with its VR and Query/Retrieve type: R and U must always be there (possibly
 * without a value), C "shall be present if known": known below means the source file has it,
 * or the server always knows it (availability, the retrieve URL of a stored instance). */
typedef enum { REQ, IF_KNOWN } rtype;
typedef struct qattr {
    unsigned tag;
    const char *vr;
    rtype type;
    const char *name;
} qattr;

static const qattr study_attrs[] = {
    {0x00080020, "DA", REQ, "StudyDate"},
    {0x00080030, "TM", REQ, "StudyTime"},
    {0x00080050, "SH", REQ, "AccessionNumber"},
    {0x00080056, "CS", IF_KNOWN, "InstanceAvailability"},
    {0x00080061, "CS", REQ, "ModalitiesInStudy"},
    {0x00080090, "PN", REQ, "ReferringPhysicianName"},
    {0x00080201, "SH", IF_KNOWN, "TimezoneOffsetFromUTC"},
    {0x00081190, "UR", IF_KNOWN, "RetrieveURL"},
    {0x00100010, "PN", REQ, "PatientName"},
    {0x00100020, "LO", REQ, "PatientID"},
    {0x00100030, "DA", REQ, "PatientBirthDate"},
    {0x00100040, "CS", REQ, "PatientSex"},
    {0x0020000D, "UI", REQ, "StudyInstanceUID"},
    {0x00200010, "SH", REQ, "StudyID"},
    {0x00201206, "IS", REQ, "NumberOfStudyRelatedSeries"},
    {0x00201208, "IS", REQ, "NumberOfStudyRelatedInstances"},
};
static const qattr series_attrs[] = {
    {0x00080060, "CS", REQ, "Modality"},
    {0x00080201, "SH", IF_KNOWN, "TimezoneOffsetFromUTC"},
    {0x0008103E, "LO", IF_KNOWN, "SeriesDescription"},
    {0x00081190, "UR", IF_KNOWN, "RetrieveURL"},
    {0x0020000E, "UI", REQ, "SeriesInstanceUID"},
    {0x00200011, "IS", REQ, "SeriesNumber"},
    {0x00201209, "IS", REQ, "NumberOfSeriesRelatedInstances"},
    {0x00400244, "DA", IF_KNOWN, "PerformedProcedureStepStartDate"},
    {0x00400245, "TM", IF_KNOWN, "PerformedProcedureStepStartTime"},
    {0x00400275, "SQ", IF_KNOWN, "RequestAttributesSequence"},
};
static const qattr instance_attrs[] = {
    {0x00080016, "UI", REQ, "SOPClassUID"},
    {0x00080018, "UI", REQ, "SOPInstanceUID"},
    {0x00080056, "CS", IF_KNOWN, "InstanceAvailability"},
    {0x00080201, "SH", IF_KNOWN, "TimezoneOffsetFromUTC"},
    {0x00081190, "UR", IF_KNOWN, "RetrieveURL"},
    {0x00200013, "IS", REQ, "InstanceNumber"},
    {0x00280010, "US", IF_KNOWN, "Rows"},
    {0x00280011, "US", IF_KNOWN, "Columns"},
    {0x00280100, "US", IF_KNOWN, "BitsAllocated"},
    {0x00280008, "IS", IF_KNOWN, "NumberOfFrames"},
};

/* Whether the server knows a conditional attribute of the instance h. */
static int known(unsigned tag, const lc_dicom_header *h)
{
    switch (tag) {
    case 0x00080056: /* stored here: ONLINE */
    case 0x00081190: /* stored here: retrievable */
        return 1;
    case 0x00080201:
        return h->timezone_offset != NULL;
    case 0x0008103E:
        return h->series_description != NULL && *h->series_description;
    case 0x00400244:
        return h->pps_start_date != NULL;
    case 0x00400245:
        return h->pps_start_time != NULL;
    case 0x00400275:
        return h->request_attributes != NULL;
    case 0x00280010:
        return h->rows > 0;
    case 0x00280011:
        return h->columns > 0;
    case 0x00280100:
        return h->bits_allocated > 0;
    default:
        return 0; /* NumberOfFrames: checked when present */
    }
}

static const char *str_value(const cJSON *ds, unsigned tag)
{
    char key[9];
    snprintf(key, sizeof(key), "%08X", tag);
    return cJSON_GetStringValue(
        cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetObjectItem(ds, key), "Value"), 0));
}

static double num_value(const cJSON *ds, unsigned tag)
{
    char key[9];
    snprintf(key, sizeof(key), "%08X", tag);
    cJSON *v = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetObjectItem(ds, key), "Value"), 0);
    if (!cJSON_IsNumber(v))
        fail_msg("%s has no numeric value", key);
    return v->valuedouble;
}

/* Every attribute of the table in ds with its VR; values in DICOM JSON form (Annex F). */
static void check_attrs(const char *what, const cJSON *ds, const qattr *t, size_t n,
                        const lc_dicom_header *h)
{
    for (size_t i = 0; i < n; i++) {
        char key[9];
        snprintf(key, sizeof(key), "%08X", t[i].tag);
        cJSON *e = cJSON_GetObjectItem(ds, key);
        if (!e) {
            if (t[i].type == REQ || known(t[i].tag, h))
                fail_msg("%s: %s (%s) is missing: %s", what, t[i].name, key,
                         cJSON_PrintUnformatted(ds));
            continue;
        }
        const char *vr = cJSON_GetStringValue(cJSON_GetObjectItem(e, "vr"));
        if (!vr || strcmp(vr, t[i].vr) != 0)
            fail_msg("%s: %s has VR %s, PS3.6 says %s", what, t[i].name, vr ? vr : "(none)",
                     t[i].vr);
        cJSON *val = cJSON_GetObjectItem(e, "Value");
        if (val) {
            assert_true(cJSON_IsArray(val) && cJSON_GetArraySize(val) > 0);
            for (cJSON *v = val->child; v; v = v->next) {
                int ok = !strcmp(t[i].vr, "IS") || !strcmp(t[i].vr, "US") ? cJSON_IsNumber(v)
                         : !strcmp(t[i].vr, "PN")                         ? cJSON_IsObject(v)
                         : !strcmp(t[i].vr, "SQ")                         ? cJSON_IsObject(v)
                                                                          : cJSON_IsString(v);
                if (!ok)
                    fail_msg("%s: %s value of the wrong JSON type (Annex F)", what, t[i].name);
            }
        }
    }
}

typedef struct sample {
    char *path;
    lc_dicom_header *h;
} sample;

static void test_qido_required_attributes(void **state)
{
    (void)state;
    /* the sample studies: the series the client stored, and three more stored here */
    char *extra[5] = {ts_data("mr-small/MR_small.dcm"), ts_data("ct/philips-head-phantom-I100"),
                      ts_data("charsets/chrH31.dcm"), strdup(nested_path), NULL};
    size_t len = 0;
    char *body = multipart_of(extra, &len);
    hresp r = http("POST", "/dicomweb/studies", st.token, stow_hdrs, body, len, 0);
    if (r.status != 200)
        fail_msg("STOW-RS of the samples: %ld %s", r.status, r.body);
    hresp_free(&r);
    free(body);

    char **series_files = ts_list_files(series_dir);
    sample s[16];
    int ns = 0;
    lc_err err = {0};
    for (char **f = series_files; *f && ns < 12; f++, ns++)
        s[ns].path = strdup(*f);
    for (int i = 0; extra[i]; i++, ns++)
        s[ns].path = extra[i];
    ts_strv_free(series_files);
    for (int i = 0; i < ns; i++)
        if (lc_dicom_read_header(s[i].path, &s[i].h, &err) != LC_OK)
            fail_msg("%s: %s", s[i].path, lc_err_msg(&err));

    for (int i = 0; i < ns; i++) {
        const lc_dicom_header *h = s[i].h;
        int in_study = 0;
        for (int k = 0; k < ns; k++)
            in_study += strcmp(s[k].h->study_instance_uid, h->study_instance_uid) == 0;
        wait_indexed(h->study_instance_uid, in_study);
        char path[512], what[700];

        /* study level */
        snprintf(path, sizeof(path), "/dicomweb/studies?StudyInstanceUID=%s",
                 h->study_instance_uid);
        cJSON *j = get_json(path, 200);
        assert_int_equal(cJSON_GetArraySize(j), 1);
        cJSON *ds = cJSON_GetArrayItem(j, 0);
        snprintf(what, sizeof(what), "study of %s", s[i].path);
        check_attrs(what, ds, study_attrs, sizeof(study_attrs) / sizeof(study_attrs[0]), h);
        assert_string_equal(str_value(ds, 0x0020000D), h->study_instance_uid);
        if (h->patient_id)
            assert_string_equal(str_value(ds, 0x00100020), h->patient_id);
        if (h->study_date)
            assert_string_equal(str_value(ds, 0x00080020), h->study_date);
        assert_int_equal((int)num_value(ds, 0x00201208), in_study);
        char *mods = cJSON_PrintUnformatted(cJSON_GetObjectItem(ds, "00080061"));
        assert_non_null(strstr(mods, h->modality));
        free(mods);
        cJSON_Delete(j);

        /* series level, below the study and over all series (which adds the study's) */
        snprintf(path, sizeof(path), "/dicomweb/studies/%s/series?SeriesInstanceUID=%s",
                 h->study_instance_uid, h->series_instance_uid);
        j = get_json(path, 200);
        assert_int_equal(cJSON_GetArraySize(j), 1);
        ds = cJSON_GetArrayItem(j, 0);
        snprintf(what, sizeof(what), "series of %s", s[i].path);
        check_attrs(what, ds, series_attrs, sizeof(series_attrs) / sizeof(series_attrs[0]), h);
        assert_string_equal(str_value(ds, 0x0020000E), h->series_instance_uid);
        assert_string_equal(str_value(ds, 0x00080060), h->modality);
        cJSON_Delete(j);
        snprintf(path, sizeof(path), "/dicomweb/series?SeriesInstanceUID=%s",
                 h->series_instance_uid);
        j = get_json(path, 200);
        assert_int_equal(cJSON_GetArraySize(j), 1);
        ds = cJSON_GetArrayItem(j, 0);
        snprintf(what, sizeof(what), "all-series search of %s", s[i].path);
        check_attrs(what, ds, series_attrs, sizeof(series_attrs) / sizeof(series_attrs[0]), h);
        check_attrs(what, ds, study_attrs, sizeof(study_attrs) / sizeof(study_attrs[0]), h);
        cJSON_Delete(j);

        /* instance level, below the series and over all instances */
        snprintf(path, sizeof(path), "/dicomweb/studies/%s/series/%s/instances?SOPInstanceUID=%s",
                 h->study_instance_uid, h->series_instance_uid, h->sop_instance_uid);
        j = get_json(path, 200);
        assert_int_equal(cJSON_GetArraySize(j), 1);
        ds = cJSON_GetArrayItem(j, 0);
        snprintf(what, sizeof(what), "instance %s", s[i].path);
        check_attrs(what, ds, instance_attrs, sizeof(instance_attrs) / sizeof(instance_attrs[0]),
                    h);
        assert_string_equal(str_value(ds, 0x00080016), h->sop_class_uid);
        assert_string_equal(str_value(ds, 0x00080018), h->sop_instance_uid);
        if (h->instance_number)
            assert_int_equal((int)num_value(ds, 0x00200013), h->instance_number);
        if (h->rows > 0) {
            assert_int_equal((int)num_value(ds, 0x00280010), h->rows);
            assert_int_equal((int)num_value(ds, 0x00280011), h->columns);
            assert_int_equal((int)num_value(ds, 0x00280100), h->bits_allocated);
        }
        cJSON_Delete(j);
        snprintf(path, sizeof(path), "/dicomweb/instances?SOPInstanceUID=%s", h->sop_instance_uid);
        j = get_json(path, 200);
        assert_int_equal(cJSON_GetArraySize(j), 1);
        ds = cJSON_GetArrayItem(j, 0);
        snprintf(what, sizeof(what), "all-instances search of %s", s[i].path);
        check_attrs(what, ds, instance_attrs, sizeof(instance_attrs) / sizeof(instance_attrs[0]),
                    h);
        check_attrs(what, ds, series_attrs, sizeof(series_attrs) / sizeof(series_attrs[0]), h);
        check_attrs(what, ds, study_attrs, sizeof(study_attrs) / sizeof(study_attrs[0]), h);
        cJSON_Delete(j);
    }
    for (int i = 0; i < ns; i++) {
        free(s[i].path);
        lc_dicom_header_free(s[i].h);
    }
}

/* --- BulkDataURIs inside sequences, frames ---------------------------------------------- */

static void test_nested_bulk_data_and_frames(void **state)
{
    (void)state;
    static const char *const octets[] = {
        "Accept: multipart/related; type=\"application/octet-stream\"", NULL};
    char path[600];
    wait_indexed(NESTED_STUDY, 1);
    cJSON *j = get_json("/dicomweb/studies/" NESTED_STUDY "/series/" NESTED_SERIES
                        "/instances/" NESTED_SOP "/metadata",
                        200);
    cJSON *items =
        cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetArrayItem(j, 0), "00480105"), "Value");
    assert_int_equal(cJSON_GetArraySize(items), 2);
    const int lens[2] = {ICC0_LEN, ICC1_LEN};
    for (int k = 0; k < 2; k++) {
        const char *uri = cJSON_GetStringValue(cJSON_GetObjectItem(
            cJSON_GetObjectItem(cJSON_GetArrayItem(items, k), "00282000"), "BulkDataURI"));
        if (!uri)
            fail_msg("item %d: no BulkDataURI: %s", k, cJSON_PrintUnformatted(items));
        assert_true(strncmp(uri, st.http_url, strlen(st.http_url)) == 0);
        hresp r = http("GET", uri + strlen(st.http_url), st.token, octets, NULL, 0, 0);
        if (r.status != 200)
            fail_msg("GET %s: %ld %s", uri, r.status, r.body);
        size_t n = 0;
        unsigned char *v = first_part(&r, &n);
        assert_int_equal(n, lens[k]);
        for (size_t i = 0; i < n; i++)
            if (v[i] != pattern(i, k + 1))
                fail_msg("%s: byte %zu differs", uri, i);
        free(v);
        hresp_free(&r);
    }
    /* the pixel data: as top-level bulk data and as frame 1; there is no frame 2 */
    const char *pix = cJSON_GetStringValue(cJSON_GetObjectItem(
        cJSON_GetObjectItem(cJSON_GetArrayItem(j, 0), "7FE00010"), "BulkDataURI"));
    assert_non_null(pix);
    static const char *const frame_urls[] = {NULL, "/dicomweb/studies/" NESTED_STUDY
                                                   "/series/" NESTED_SERIES "/instances/" NESTED_SOP
                                                   "/frames/1"};
    for (int k = 0; k < 2; k++) {
        hresp r = http("GET", k ? frame_urls[1] : pix + strlen(st.http_url), st.token, octets, NULL,
                       0, 0);
        assert_int_equal(r.status, 200);
        size_t n = 0;
        unsigned char *v = first_part(&r, &n);
        assert_int_equal(n, PIXEL_LEN);
        for (size_t i = 0; i < n; i++)
            assert_int_equal(v[i], pattern(i, 3));
        free(v);
        hresp_free(&r);
    }
    cJSON_Delete(j);
    /* QIDO-RS includefield hands out the same fetchable URIs at the instance level, and no
     * bulk data above it (one instance's header stands for many there) */
    j = get_json("/dicomweb/instances?SOPInstanceUID=" NESTED_SOP "&includefield=00480105", 200);
    const char *q = cJSON_GetStringValue(cJSON_GetObjectItem(
        cJSON_GetObjectItem(
            cJSON_GetArrayItem(
                cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetArrayItem(j, 0), "00480105"),
                                    "Value"),
                1),
            "00282000"),
        "BulkDataURI"));
    if (!q || !strstr(q, "/instances/" NESTED_SOP "/bulk/00480105.1.00282000"))
        fail_msg("QIDO-RS includefield: %s", q ? q : "no BulkDataURI");
    cJSON_Delete(j);
    j = get_json("/dicomweb/studies?StudyInstanceUID=" NESTED_STUDY "&includefield=00480105", 200);
    assert_null(cJSON_GetObjectItem(cJSON_GetArrayItem(j, 0), "00480105"));
    cJSON_Delete(j);
    snprintf(path, sizeof(path), "%s", frame_urls[1]);
    path[strlen(path) - 1] = '2';
    hresp r = http("GET", path, st.token, octets, NULL, 0, 0);
    expect_problem(&r, "frame 2 of a single-frame instance");
    assert_int_equal(r.status, 404);
    hresp_free(&r);
    /* paths that lead nowhere: no such item, not a sequence */
    static const char *const nowhere[] = {"00480105.2.00282000", "00080016.0.00282000",
                                          "00480105.0.00420011"};
    for (size_t i = 0; i < sizeof(nowhere) / sizeof(nowhere[0]); i++) {
        snprintf(path, sizeof(path),
                 "/dicomweb/studies/" NESTED_STUDY "/series/" NESTED_SERIES "/instances/" NESTED_SOP
                 "/bulk/%s",
                 nowhere[i]);
        r = http("GET", path, st.token, octets, NULL, 0, 0);
        expect_problem(&r, nowhere[i]);
        assert_int_equal(r.status, 404);
        hresp_free(&r);
    }
}

/* --- 3. hostile input --------------------------------------------------------------------- */

typedef struct hostile {
    const char *what;
    const char *method, *path;
    const char *ctype; /* NULL: none */
    const char *body;  /* NULL: generated (see below) */
    size_t len;
    int as_is;
} hostile;

/* n parts of one byte each */
static char *many_parts(int n, size_t *len)
{
    dbuf b = {0};
    static const char part[] = "--b1\r\nContent-Type: application/dicom\r\n\r\nx\r\n";
    for (int i = 0; i < n; i++)
        db_raw(&b, part, sizeof(part) - 1);
    db_raw(&b, "--b1--\r\n", 9);
    *len = b.n - 1;
    return (char *)b.d;
}

static void test_hostile_input(void **state)
{
    (void)state;
    written before;
    size_t nparts_len = 0, big_len = (64u << 20) + 1;
    char *parts = many_parts(10000, &nparts_len);
    char *big = calloc(1, big_len);
    assert_non_null(big);
    char *dicom = NULL;
    size_t dicom_len = 0;
    char *one[] = {nested_path, NULL};
    dicom = multipart_of(one, &dicom_len);
    char *truncated = malloc(dicom_len);
    memcpy(truncated, dicom, dicom_len);
    static const char *const mp = "multipart/related; type=\"application/dicom\"; boundary=b1";
    static const char *const mpt =
        "multipart/related; type=\"application/dicom\"; boundary=radpipe-test-boundary";
    static const char tb[] = "--b1\r\nContent-Type: application/dicom\r\nContent-Length: "
                             "1099511627776\r\n\r\nDICM\r\n--b1--\r\n";
    const hostile cases[] = {
        {"a multipart body without a boundary parameter", "POST", "/dicomweb/studies",
         "multipart/related; type=\"application/dicom\"", "--b1\r\n\r\nx\r\n--b1--\r\n", 0, 0},
        {"a boundary that is not in the body", "POST", "/dicomweb/studies", mp,
         "no delimiter here at all", 0, 0},
        {"a truncated part", "POST", "/dicomweb/studies", mpt, truncated, dicom_len / 2, 0},
        {"a part cut before its closing boundary", "POST", "/dicomweb/studies", mpt, truncated,
         dicom_len - 30, 0},
        {"10,000 parts", "POST", "/dicomweb/studies", mp, parts, nparts_len, 0},
        {"a part claiming 1 TB", "POST", "/dicomweb/studies", mp, tb, sizeof(tb) - 1, 0},
        {"a body over RADPIPE_HTTP_MAX_BODY_BYTES", "POST", "/dicomweb/studies", mp, big, big_len,
         0},
        {"a body over the limit on POST /api/v1/instances", "POST", "/api/v1/instances",
         "application/dicom", big, big_len, 0},
        {"a part that is not application/dicom", "POST", "/dicomweb/studies", mp,
         "--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b1--\r\n", 0, 0},
        {"a multipart type other than application/dicom", "POST", "/dicomweb/studies",
         "multipart/related; type=\"application/dicom+xml\"; boundary=b1",
         "--b1\r\n\r\nx\r\n--b1--\r\n", 0, 0},
        {"../ in the study UID of STOW-RS", "POST", "/dicomweb/studies/..%2F..%2Fetc", mpt, dicom,
         dicom_len, 1},
        {"../ in the study UID of WADO-RS", "GET", "/dicomweb/studies/../../../etc/passwd", NULL,
         NULL, 0, 1},
        {"encoded ../ in the study UID of WADO-RS", "GET",
         "/dicomweb/studies/..%2F..%2F..%2Fetc%2Fpasswd/metadata", NULL, NULL, 0, 1},
        {"../ in the series UID of WADO-RS", "GET",
         "/dicomweb/studies/" NESTED_STUDY "/series/..%2F..%2Fobjects/metadata", NULL, NULL, 0, 1},
        {"../ in the instance UID of WADO-RS", "GET",
         "/dicomweb/studies/" NESTED_STUDY "/series/" NESTED_SERIES "/instances/..%2f..%2f..", NULL,
         NULL, 0, 1},
        {"../ in a bulk data path", "GET",
         "/dicomweb/studies/" NESTED_STUDY "/series/" NESTED_SERIES "/instances/" NESTED_SOP
         "/bulk/..%2F..%2F..%2Fadmin-token",
         NULL, NULL, 0, 1},
        {"../ in a QIDO-RS study", "GET", "/dicomweb/studies/..%2F..%2Fx/series", NULL, NULL, 0, 1},
        {"../ in a REST study", "GET", "/api/v1/studies/..%2F..%2Fetc", NULL, NULL, 0, 1},
        {"../ in an artifact name", "GET",
         "/api/v1/jobs/5b0f3c1e-8d2a-4c55-9a51-0c7f1e2d3a4b/artifacts/..%2F..%2Fadmin-token", NULL,
         NULL, 0, 1},
        {"a month 13", "GET", "/dicomweb/studies?StudyDate=20231301", NULL, NULL, 0, 0},
        {"February 30", "GET", "/dicomweb/studies?StudyDate=20230230", NULL, NULL, 0, 0},
        {"a reversed date range", "GET", "/dicomweb/studies?StudyDate=20240101-20230101", NULL,
         NULL, 0, 0},
        {"an ISO date", "GET", "/dicomweb/studies?StudyDate=2024-01-01", NULL, NULL, 0, 0},
        {"a date range of three parts", "GET",
         "/dicomweb/series?SeriesDate=20240101-20240102-20240103", NULL, NULL, 0, 0},
        {"an hour 25", "GET", "/dicomweb/studies?StudyTime=250000", NULL, NULL, 0, 0},
        {"an invalid REST date", "GET", "/api/v1/studies?study_date=20231301", NULL, NULL, 0, 0},
        {"an invalid REST date range", "GET", "/api/v1/studies?study_date_from=2023", NULL, NULL, 0,
         0},
        {"a negative QIDO-RS limit", "GET", "/dicomweb/studies?limit=-1", NULL, NULL, 0, 0},
        {"a zero QIDO-RS limit", "GET", "/dicomweb/instances?limit=0", NULL, NULL, 0, 0},
        {"a negative QIDO-RS offset", "GET", "/dicomweb/series?offset=-5", NULL, NULL, 0, 0},
        {"a huge QIDO-RS limit", "GET", "/dicomweb/studies?limit=99999999999999999999", NULL, NULL,
         0, 0},
        {"a negative REST limit", "GET", "/api/v1/studies?limit=-1", NULL, NULL, 0, 0},
        {"a negative jobs offset", "GET", "/api/v1/jobs?offset=-1", NULL, NULL, 0, 0},
        {"a negative frame number", "GET",
         "/dicomweb/studies/" NESTED_STUDY "/series/" NESTED_SERIES "/instances/" NESTED_SOP
         "/frames/-1",
         NULL, NULL, 0, 0},
        {"a NUL byte in a query value", "GET", "/dicomweb/studies?PatientID=a%00b", NULL, NULL, 0,
         0},
        {"an unknown query parameter", "GET", "/dicomweb/studies?PatientId=x", NULL, NULL, 0, 0},
        {"an unknown query parameter on WADO-RS", "GET",
         "/dicomweb/studies/" NESTED_STUDY "/metadata?frobnicate=1", NULL, NULL, 0, 0},
    };
    snapshot(&before);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const hostile *c = &cases[i];
        char ct[400];
        const char *hdrs[3] = {"Accept: application/dicom+json", NULL, NULL};
        if (c->ctype) {
            snprintf(ct, sizeof(ct), "Content-Type: %s", c->ctype);
            hdrs[1] = ct;
        }
        size_t len = c->body && !c->len ? strlen(c->body) : c->len;
        hresp r = http(c->method, c->path, st.token, hdrs, c->body, len, c->as_is);
        expect_problem(&r, c->what);
        fprintf(stderr, "%-55s %ld\n", c->what, r.status);
        hresp_free(&r);
        expect_unchanged(&before, c->what);
    }
    /* the gateway is still up and answers, and the stack never had to restart it */
    hresp r = http("GET", "/readyz", NULL, NULL, NULL, 0, 0);
    assert_int_equal(r.status, 200);
    hresp_free(&r);
    cJSON *j = get_json("/dicomweb/studies?StudyInstanceUID=" NESTED_STUDY, 200);
    assert_int_equal(cJSON_GetArraySize(j), 1);
    cJSON_Delete(j);
    char *log = ts_read_file(st.log, NULL);
    assert_non_null(log);
    if (strstr(log, "\"msg\":\"restarting\""))
        fail_msg("a service was restarted during the test");
    free(log);
    free(parts);
    free(big);
    free(dicom);
    free(truncated);
}

/* SQL metacharacters in any query parameter are data: the same injection in every string
 * matching key of every QIDO-RS level and every REST filter answers 200 with no match (a
 * key that must be a date, time, number or UID refuses it with 400), and nothing changes. */
static void test_sql_metacharacters_are_data(void **state)
{
    (void)state;
    static const char inj[] = "%27%3B%20DROP%20TABLE%20studies%3B--";
    static const char *const qido[] = {
        "/dicomweb/studies?PatientID=",
        "/dicomweb/studies?PatientName=",
        "/dicomweb/studies?PatientName=*",
        "/dicomweb/studies?AccessionNumber=",
        "/dicomweb/studies?StudyID=",
        "/dicomweb/studies?StudyDescription=",
        "/dicomweb/studies?ReferringPhysicianName=",
        "/dicomweb/studies?InstitutionName=",
        "/dicomweb/studies?IssuerOfPatientID=",
        "/dicomweb/studies?PatientSex=",
        "/dicomweb/studies?ModalitiesInStudy=*",
        "/dicomweb/series?Modality=",
        "/dicomweb/series?SeriesDescription=",
        "/dicomweb/series?BodyPartExamined=",
        "/dicomweb/instances?PatientID=",
        "/dicomweb/studies/" NESTED_STUDY "/series?Modality=",
        "/dicomweb/studies?includefield=PatientAge&PatientID=",
    };
    static const char *const rest[] = {
        "/api/v1/studies?patient_id=",
        "/api/v1/studies?patient_name=",
        "/api/v1/studies?accession_number=",
        "/api/v1/studies?modality=",
    };
    static const char *const typed[] = {
        "/dicomweb/studies?StudyDate=",
        "/dicomweb/studies?StudyTime=",
        "/dicomweb/studies?StudyInstanceUID=",
        "/dicomweb/series?SeriesNumber=",
        "/dicomweb/studies?ModalitiesInStudy=",
        "/dicomweb/studies?limit=",
        "/dicomweb/studies?offset=",
        "/dicomweb/studies?includefield=",
        "/api/v1/studies?sort=",
        "/api/v1/studies?limit=",
        "/api/v1/jobs?state=",
        "/api/v1/jobs?study_instance_uid=",
        "/api/v1/events?job_id=",
    };
    written before;
    char path[512];
    snapshot(&before);
    long long nstudies = sql_ll("SELECT count(*) FROM studies");
    for (size_t i = 0; i < sizeof(qido) / sizeof(qido[0]); i++) {
        snprintf(path, sizeof(path), "%s%s", qido[i], inj);
        cJSON *j = get_json(path, 200);
        if (cJSON_GetArraySize(j) != 0)
            fail_msg("%s matched something", path);
        cJSON_Delete(j);
    }
    for (size_t i = 0; i < sizeof(rest) / sizeof(rest[0]); i++) {
        snprintf(path, sizeof(path), "%s%s", rest[i], inj);
        cJSON *j = get_json(path, 200);
        assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "items")), 0);
        assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(j, "total")), 0);
        cJSON_Delete(j);
    }
    for (size_t i = 0; i < sizeof(typed) / sizeof(typed[0]); i++) {
        snprintf(path, sizeof(path), "%s%s", typed[i], inj);
        hresp r = http("GET", path, st.token, NULL, NULL, 0, 0);
        expect_problem(&r, path);
        assert_int_equal(r.status, 400);
        hresp_free(&r);
    }
    expect_unchanged(&before, "SQL metacharacters");
    assert_int_equal(sql_ll("SELECT count(*) FROM studies"), nstudies);
    assert_true(nstudies >= 4);
}

/* --- event ids of another gateway process ------------------------------------------------ */

typedef struct stream {
    char url[1024];
    char last_id[128]; /* "" = no Last-Event-ID */
    long seconds;
    atomic_int stop; /* set by the test: end the stream now */
    char *body;
    size_t len;
} stream;

static int on_progress(void *ud, curl_off_t a, curl_off_t b, curl_off_t c, curl_off_t d)
{
    (void)a, (void)b, (void)c, (void)d;
    return atomic_load(&((stream *)ud)->stop) ? 1 : 0;
}

static void *read_stream(void *arg)
{
    stream *s = arg;
    char auth[600], lei[200];
    struct curl_slist *h = NULL;
    mbuf b = {0};
    CURL *c = curl_easy_init();
    snprintf(auth, sizeof(auth), "Authorization: Bearer %s", st.token);
    h = curl_slist_append(h, auth);
    if (s->last_id[0]) {
        snprintf(lei, sizeof(lei), "Last-Event-ID: %s", s->last_id);
        h = curl_slist_append(h, lei);
    }
    curl_easy_setopt(c, CURLOPT_URL, s->url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, s->seconds);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, s);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_perform(c); /* a stream does not end by itself: the timeout or stop ends it */
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    s->body = b.p ? b.p : calloc(1, 1);
    s->len = b.n;
    return NULL;
}

static void run_stream(stream *s)
{
    read_stream(s);
}

/* The ids of the events in an SSE body, in order (at most 16). */
static int event_ids(const char *body, char ids[16][128])
{
    int n = 0;
    for (const char *p = body; (p = strstr(p, "\nid: ")) != NULL && n < 16; p += 5) {
        size_t len = strcspn(p + 5, "\n");
        snprintf(ids[n++], 128, "%.*s", (int)len, p + 5);
    }
    if (strncmp(body, "id: ", 4) == 0)
        fail_msg("an event before the greeting");
    return n;
}

static char *create_job(const char *study)
{
    char path[256];
    static const char body[] = "{\"kind\":\"upload\"}";
    static const char *const hdrs[] = {"Content-Type: application/json", NULL};
    snprintf(path, sizeof(path), "/api/v1/studies/%s/jobs", study);
    hresp r = http("POST", path, st.token, hdrs, body, sizeof(body) - 1, 0);
    if (r.status != 202)
        fail_msg("job create: %ld %s", r.status, r.body);
    cJSON *j = cJSON_Parse(r.body);
    char *id = strdup(cJSON_GetStringValue(cJSON_GetObjectItem(j, "id")));
    cJSON_Delete(j);
    hresp_free(&r);
    return id;
}

static void wait_job_final(const char *id)
{
    char path[128];
    snprintf(path, sizeof(path), "/api/v1/jobs/%s", id);
    for (int i = 0; i < 600; i++) {
        hresp r = http("GET", path, st.token, NULL, NULL, 0, 0);
        cJSON *j = cJSON_Parse(r.body);
        const char *s = cJSON_GetStringValue(cJSON_GetObjectItem(j, "state"));
        int done = s && (strcmp(s, "succeeded") == 0 || strcmp(s, "dead") == 0);
        cJSON_Delete(j);
        hresp_free(&r);
        if (done)
            return;
        usleep(200 * 1000);
    }
    ts_stack_dump_log(&st);
    fail_msg("job %s never finished", id);
}

static void test_events_foreign_last_event_id(void **state)
{
    (void)state;
    stream live = {.seconds = 120};
    pthread_t t;
    char ids[16][128];

    /* a live stream sees the job's status events, ids "<epoch>-<n>" */
    snprintf(live.url, sizeof(live.url), "%s/api/v1/events", st.http_url);
    assert_int_equal(pthread_create(&t, NULL, read_stream, &live), 0);
    usleep(1500 * 1000);
    char *job = create_job(NESTED_STUDY);
    wait_job_final(job);
    usleep(2000 * 1000); /* the last status event on its way through the broker */
    atomic_store(&live.stop, 1);
    pthread_join(t, NULL);
    int n = event_ids(live.body, ids);
    if (n < 3 || !strstr(live.body, job))
        fail_msg("the live stream missed the job's events: %s", live.body);
    const char *dash = strrchr(ids[0], '-');
    assert_non_null(dash);
    assert_int_equal(dash - ids[0], 16); /* a 16-digit epoch */

    /* resuming after the first event replays the later ones */
    stream resume = {.seconds = 2};
    snprintf(resume.url, sizeof(resume.url), "%s/api/v1/events?job_id=%s", st.http_url, job);
    lc_strlcpy(resume.last_id, ids[0], sizeof(resume.last_id));
    run_stream(&resume);
    char rids[16][128];
    int rn = event_ids(resume.body, rids);
    if (rn < 1 || strcmp(rids[rn - 1], ids[n - 1]) != 0)
        fail_msg("resuming after %s did not replay up to %s: %s", ids[0], ids[n - 1], resume.body);
    assert_null(strstr(resume.body, "not from this gateway"));

    /* ids of another process (another epoch, or the plain numbers of older gateways) are
     * foreign: nothing is replayed */
    const char *foreign[] = {"0123456789abcdef-1", "1", NULL};
    char other[128];
    snprintf(other, sizeof(other), "%.*s%c-%s", 15, ids[0], ids[0][15] == 'a' ? 'b' : 'a',
             dash + 1);
    foreign[2] = other;
    for (int k = 0; k < 3; k++) {
        stream f = {.seconds = 2};
        snprintf(f.url, sizeof(f.url), "%s/api/v1/events?job_id=%s", st.http_url, job);
        lc_strlcpy(f.last_id, foreign[k], sizeof(f.last_id));
        run_stream(&f);
        if (event_ids(f.body, rids) != 0)
            fail_msg("Last-Event-ID %s replayed events: %s", foreign[k], f.body);
        assert_non_null(strstr(f.body, "not from this gateway"));
        free(f.body);
    }
    free(resume.body);
    free(live.body);
    free(job);
}

/* --- 7. the web UI, driven in jsdom ------------------------------------------------------- */

/* tests/node/web-ui.mjs uses the gateway's web UI as a user would: sign in, find the sample
 * study, segment it and watch the job end through the live event stream, list its artifacts,
 * sign out (the script's header says what it checks). */
static void test_web_ui(void **state)
{
    (void)state;
    char **files = ts_list_files(series_dir);
    lc_dicom_header *h = NULL;
    lc_err err = {0};
    assert_non_null(files[0]);
    assert_int_equal(lc_dicom_read_header(files[0], &h, &err), LC_OK);
    ts_strv_free(files);
    cJSON *cfg = cJSON_CreateObject();
    cJSON_AddStringToObject(cfg, "url", st.http_url);
    cJSON_AddStringToObject(cfg, "token", st.token);
    cJSON_AddStringToObject(cfg, "study", h->study_instance_uid);
    cJSON_AddStringToObject(cfg, "patient_id", h->patient_id);
    lc_dicom_header_free(h);
    run_node_script("web-ui.mjs", cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dicomweb_client_library),
        cmocka_unit_test(test_qido_required_attributes),
        cmocka_unit_test(test_nested_bulk_data_and_frames),
        cmocka_unit_test(test_hostile_input),
        cmocka_unit_test(test_sql_metacharacters_are_data),
        cmocka_unit_test(test_events_foreign_last_event_id),
        cmocka_unit_test(test_web_ui),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
