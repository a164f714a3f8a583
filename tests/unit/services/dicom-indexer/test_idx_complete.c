/*
 * test_idx_complete.c: study completion and routing rules of the dicom-indexer, through its
 * real batch router (idx_route_batch: instance.stored and study.close messages) and completion
 * pass, on a fresh migrated PostgreSQL database, a file:// store and real DICOM files
 * generated per test from the bundled MR slice (DCMTK's dcmodify sets UIDs and descriptions).
 * Versions and amendments, listed series, expected counts, explicit closes, re-sends, rules on
 * indexed columns and on DICOM JSON metadata, SIGHUP reloads and the dry run.
 */
#include <stdarg.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <cmocka.h>
#include "idx.h"
#include "idx_rules.h"
#include "lc/event.h"
#include "lc/util.h"
#include "ts.h"

#define PREFIX      "radpipe."
#define TOPIC       "radpipe.instance.stored"
#define CLOSE_TOPIC "radpipe.study.close"
#define ROOT        "1.2.826.0.1.3680043.8.498.4242"
#define MAXMSG      64

typedef struct fx {
    char *url;
    lc_db *db;
    char *dir, *gen;
    lc_store *store;
    lc_metrics *metrics;
    idx_ctx x;
    idx_cfg cfg;
    char *src; /* one real MR instance to copy */
    lc_kafka_msg msgs[MAXMSG];
    char *payloads[MAXMSG];
    size_t n;
    int64_t next_offset;
} fx;

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    lc_err err = {0};
    char *surl = NULL;
    assert_non_null(f);
    f->url = ts_pg_fresh_db("idxc");
    if (!f->url)
        fail_msg("RADPIPE_TEST_PG_URL is not set or the server refused: run through tests/run.sh");
    if (lc_db_connect(f->url, 5000, NULL, &f->db, &err) != LC_OK ||
        lc_db_migrate(f->db, &err) != LC_OK)
        fail_msg("database: %s", lc_err_msg(&err));
    f->dir = ts_tmpdir("idxc");
    f->gen = ts_tmpdir("idxc-gen");
    if (asprintf(&surl, "file://%s", f->dir) < 0)
        abort();
    if (lc_store_open(surl, &f->store, &err) != LC_OK)
        fail_msg("store: %s", lc_err_msg(&err));
    free(surl);
    f->metrics = lc_metrics_new();
    f->cfg = (idx_cfg){.batch_max = 500, .quiet_seconds = 0, .job_max_attempts = 5};
    if (idx_init(&f->x, f->db, f->store, PREFIX, "/radpipe/dicom-indexer", &f->cfg, f->metrics,
                 &err) != LC_OK)
        fail_msg("idx_init: %s", lc_err_msg(&err));
    char *series = ts_test_series();
    char **files = ts_list_files(series);
    assert_non_null(files);
    assert_non_null(files[0]);
    f->src = strdup(files[0]); /* a full path */
    ts_strv_free(files);
    free(series);
    f->next_offset = 10;
    *state = f;
    return 0;
}

static void clear_msgs(fx *f)
{
    for (size_t i = 0; i < f->n; i++)
        free(f->payloads[i]);
    f->n = 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    clear_msgs(f);
    idx_release(&f->x);
    idx_rules_free(f->x.rules);
    lc_metrics_free(f->metrics);
    lc_store_free(f->store);
    lc_db_free(f->db);
    ts_rmrf(f->dir);
    ts_rmrf(f->gen);
    free(f->dir);
    free(f->gen);
    free(f->url);
    free(f->src);
    free(f);
    return 0;
}

/* --- helpers ---------------------------------------------------------------------------- */

static void set_rules(fx *f, const char *json)
{
    lc_err err = {0};
    idx_rules_free(f->x.rules);
    f->x.rules = NULL;
    if (idx_rules_parse(json, strlen(json), "test", &f->x.rules, &err) != LC_OK)
        fail_msg("rules: %s", lc_err_msg(&err));
}

static void add_msg(fx *f, const char *topic, const char *key, char *payload /* consumed */)
{
    assert_true(f->n < MAXMSG);
    f->payloads[f->n] = payload;
    f->msgs[f->n] = (lc_kafka_msg){.topic = topic,
                                   .partition = 0,
                                   .offset = f->next_offset++,
                                   .key = key,
                                   .key_len = key ? strlen(key) : 0,
                                   .payload = payload,
                                   .len = strlen(payload),
                                   .timestamp_ms = -1};
    f->n++;
}

static char *event_json(const char *type, const char *subject, cJSON *data)
{
    lc_event *ev = NULL;
    lc_err err = {0};
    if (lc_event_new(type, "/radpipe/test", subject, data, &ev, &err) != LC_OK)
        fail_msg("event: %s", lc_err_msg(&err));
    char *json = lc_event_to_json(ev);
    assert_non_null(json);
    lc_event_free(ev);
    return json;
}

/* An instance.stored event for an object of the store, with data.source when kind is set. */
static void add_stored(fx *f, const char *study, const char *series, const char *sop,
                       const char *key, const char *sha, long long size, const char *kind,
                       const char *name)
{
    char *url = NULL;
    if (asprintf(&url, "%s/%s", lc_store_url(f->store), key) < 0)
        abort();
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "study_instance_uid", study);
    cJSON_AddStringToObject(d, "series_instance_uid", series);
    cJSON_AddStringToObject(d, "sop_instance_uid", sop);
    cJSON_AddStringToObject(d, "url", url);
    cJSON_AddNumberToObject(d, "size", (double)size);
    cJSON_AddStringToObject(d, "sha256", sha);
    if (kind) {
        cJSON *s = cJSON_AddObjectToObject(d, "source");
        cJSON_AddStringToObject(s, "kind", kind);
        cJSON_AddStringToObject(s, "name", name);
    }
    free(url);
    add_msg(f, TOPIC, study, event_json(LC_EV_INSTANCE_STORED, study, d));
}

/* n instances of a new series (SeriesDescription desc, further dcmodify arguments extra),
 * stored and announced from source kind/name. SOPInstanceUIDs are <series>.1 ... */
static void add_series(fx *f, const char *study, const char *series, const char *desc, int n,
                       const char *extra, const char *kind, const char *name)
{
    char *dir = NULL, *cmd = NULL;
    if (asprintf(&dir, "%s/%s", f->gen, series) < 0)
        abort();
    assert_int_equal(mkdir(dir, 0755), 0);
    assert_int_equal(ts_make_series(f->src, n, dir, study, series), 0);
    if (asprintf(&cmd, "dcmodify -nb -q -i '(0008,103E)=%s' %s '%s'/*.dcm", desc,
                 extra ? extra : "", dir) < 0)
        abort();
    assert_int_equal(ts_run(cmd, NULL), 0);
    free(cmd);
    for (int i = 0; i < n; i++) {
        char *path = NULL, key[200], sop[80], sha[65];
        size_t len = 0;
        lc_err err = {0};
        if (asprintf(&path, "%s/slice-%04d.dcm", dir, i) < 0)
            abort();
        char *buf = ts_read_file(path, &len);
        assert_non_null(buf);
        lc_sha256_hex(buf, len, sha);
        snprintf(key, sizeof(key), "incoming/%s/%d.dcm", series, i);
        if (lc_store_put_buf(f->store, key, buf, len, &err) != LC_OK)
            fail_msg("put: %s", lc_err_msg(&err));
        snprintf(sop, sizeof(sop), "%s.%d", series, i + 1);
        add_stored(f, study, series, sop, key, sha, (long long)len, kind, name);
        free(buf);
        free(path);
    }
    free(dir);
}

/* A study.close event (reason may be NULL). */
static void add_close(fx *f, const char *study, const char *reason)
{
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "study_instance_uid", study);
    if (reason)
        cJSON_AddStringToObject(d, "reason", reason);
    add_msg(f, CLOSE_TOPIC, study, event_json(LC_EV_STUDY_CLOSE, study, d));
}

static void route(fx *f)
{
    lc_err err = {0};
    if (idx_route_batch(&f->x, f->msgs, f->n, &err) != LC_OK)
        fail_msg("route: %s", lc_err_msg(&err));
    clear_msgs(f);
}

static int complete(fx *f)
{
    int n = -1;
    lc_err err = {0};
    if (idx_complete_run(&f->x, &n, &err) != LC_OK)
        fail_msg("complete: %s", lc_err_msg(&err));
    return n;
}

static void exec1(fx *f, const char *sql, const char *p1, const char *p2)
{
    lc_err err = {0};
    const char *p[2] = {p1, p2};
    if (lc_db_exec(f->db, sql, p2 ? 2 : p1 ? 1 : 0, p, NULL, &err) != LC_OK)
        fail_msg("%s: %s", sql, lc_err_msg(&err));
}

static char *q_str(fx *f, const char *sql, const char *p1)
{
    PGresult *r = NULL;
    lc_err err = {0};
    const char *p[1] = {p1};
    if (lc_db_exec(f->db, sql, p1 ? 1 : 0, p, &r, &err) != LC_OK)
        fail_msg("%s: %s", sql, lc_err_msg(&err));
    if (PQntuples(r) != 1)
        fail_msg("%s: %d rows", sql, PQntuples(r));
    char *s = strdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    return s;
}

static void assert_q(fx *f, const char *sql, const char *p1, const char *want)
{
    char *s = q_str(f, sql, p1);
    if (strcmp(s, want) != 0)
        fail_msg("%s [%s]:\n got \"%s\"\nwant \"%s\"", sql, p1 ? p1 : "", s, want);
    free(s);
}

/* The jobs of a study as "kind|rule|priority|dedupe_key|params" lines sorted by key. */
static void assert_jobs(fx *f, const char *study, const char *want)
{
    assert_q(f,
             "SELECT COALESCE(string_agg(concat_ws('|', kind, COALESCE(rule, '-'), priority,"
             " dedupe_key, params::text), E'\\n' ORDER BY dedupe_key), '') FROM jobs"
             " WHERE study_uid = $1",
             study, want);
}

/* The nth study.completed event of the outbox for study, parsed. */
static lc_event *completed_event(fx *f, const char *study, int nth)
{
    PGresult *r = NULL;
    lc_event *ev = NULL;
    lc_err err = {0};
    const char *p[1] = {study};
    assert_int_equal(lc_db_exec(f->db,
                                "SELECT payload FROM outbox WHERE topic = 'radpipe.study.completed'"
                                " AND key = $1 ORDER BY id",
                                1, p, &r, NULL),
                     LC_OK);
    if (PQntuples(r) <= nth)
        fail_msg("study.completed %d of %s: only %d", nth, study, PQntuples(r));
    const char *s = PQgetvalue(r, nth, 0);
    if (lc_event_parse(s, strlen(s), &ev, &err) != LC_OK)
        fail_msg("study.completed: %s", lc_err_msg(&err));
    PQclear(r);
    assert_string_equal(ev->type, LC_EV_STUDY_COMPLETED);
    assert_string_equal(ev->subject, study);
    return ev;
}

static const char *d_str(const lc_event *ev, const char *k)
{
    const cJSON *v = cJSON_GetObjectItem(ev->data, k);
    return cJSON_IsString(v) ? v->valuestring : "";
}

static int d_int(const lc_event *ev, const char *k)
{
    return (int)cJSON_GetObjectItem(ev->data, k)->valuedouble;
}

static char *d_json(const lc_event *ev, const char *k)
{
    const cJSON *v = cJSON_GetObjectItem(ev->data, k);
    return v ? cJSON_PrintUnformatted(v) : strdup("(absent)");
}

static void assert_d_json(const lc_event *ev, const char *k, const char *want)
{
    char *s = d_json(ev, k);
    if (strcmp(s, want) != 0)
        fail_msg("data.%s: got %s, want %s", k, s, want);
    free(s);
}

/* Merge DICOM JSON elements into the instance_metadata of a series' instances (all of them,
 * or the one SOP Instance UID sop). */
static void put_meta(fx *f, const char *series, const char *sop, const char *json)
{
    lc_err err = {0};
    const char *p[3] = {series, json, sop};
    if (lc_db_exec(f->db,
                   "INSERT INTO instance_metadata AS m (sop_uid, json)"
                   " SELECT sop_uid, $2::jsonb FROM instances WHERE series_uid = $1"
                   " AND ($3::text IS NULL OR sop_uid = $3)"
                   " ON CONFLICT (sop_uid) DO UPDATE SET json = m.json || EXCLUDED.json",
                   3, p, NULL, &err) != LC_OK)
        fail_msg("metadata: %s", lc_err_msg(&err));
}

/* --- tests ------------------------------------------------------------------------------ */

#define S1  ROOT ".1"
#define S1A ROOT ".1.1"
#define S1B ROOT ".1.2"
#define S1C ROOT ".1.3"

static const char amend_rules[] =
    "{\"rules\": ["
    " {\"name\": \"archive\", \"actions\": [{\"action\": \"upload\","
    "  \"url_pattern\": \"s3://arch/{StudyInstanceUID}\", \"layout\": \"series-tar\"}]},"
    " {\"name\": \"mr-seg\", \"level\": \"series\", \"priority\": 7,"
    "  \"when\": {\"tag\": \"Modality\", \"equals\": \"MR\"},"
    "  \"actions\": [{\"action\": \"segment\", \"algorithm\": \"otsu\"}]},"
    " {\"name\": \"never\", \"when\": {\"tag\": \"PatientID\", \"regex\": \"^NOPE\"},"
    "  \"actions\": [{\"action\": \"upload\"}]}]}";

/* Series arriving after completion: version 2, amended, one study, rules only for the new
 * series; re-sending every instance changes nothing and creates no job. */
static void test_amended_version_routes_new_series_only(void **state)
{
    fx *f = *state;
    set_rules(f, amend_rules);
    add_series(f, S1, S1A, "T1 AX", 2, NULL, "notify", "SCANNER1");
    route(f);
    /* the study's source is written by the batch's own transaction (one commit per batch):
     * its row and the 2 instance rows, all from one transaction id */
    assert_q(f,
             "SELECT count(*) || ' rows, ' || count(DISTINCT x) || ' tx' FROM (SELECT xmin::text"
             " AS x FROM instances WHERE study_uid = $1 UNION ALL SELECT xmin::text FROM"
             " study_completion WHERE study_uid = $1 AND source_kind = 'notify') t",
             S1, "3 rows, 1 tx");
    assert_int_equal(complete(f), 1);

    lc_event *ev = completed_event(f, S1, 0);
    assert_int_equal(d_int(ev, "version"), 1);
    assert_false(cJSON_IsTrue(cJSON_GetObjectItem(ev->data, "amended")));
    assert_string_equal(d_str(ev, "reason"), "quiet");
    assert_int_equal(d_int(ev, "num_series"), 1);
    assert_int_equal(d_int(ev, "num_instances"), 2);
    assert_d_json(ev, "new_series", "(absent)");
    assert_d_json(ev, "source", "{\"kind\":\"notify\",\"name\":\"SCANNER1\"}");
    assert_d_json(ev, "series",
                  "[{\"series_instance_uid\":\"" S1A
                  "\",\"modality\":\"MR\",\"num_instances\":2}]");
    lc_event_free(ev);
    assert_jobs(f, S1,
                "upload|archive|0|" S1 ":v1:archive:0:upload|{\"layout\": \"series-tar\","
                " \"url_pattern\": \"s3://arch/{StudyInstanceUID}\"}\n"
                "segment|mr-seg|7|" S1 ":v1:mr-seg:0:segment:" S1A "|{\"algorithm\": \"otsu\","
                " \"series_instance_uid\": \"" S1A "\"}");

    /* a second series after completion: version 2 with only it in the jobs */
    add_series(f, S1, S1B, "T2 SAG", 2, NULL, "notify", "SCANNER1");
    route(f);
    assert_int_equal(complete(f), 1);
    ev = completed_event(f, S1, 1);
    assert_int_equal(d_int(ev, "version"), 2);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(ev->data, "amended")));
    assert_int_equal(d_int(ev, "num_series"), 2);
    assert_int_equal(d_int(ev, "num_instances"), 4);
    assert_d_json(ev, "new_series", "[\"" S1B "\"]");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(ev->data, "series")), 2);
    lc_event_free(ev);
    assert_jobs(f, S1,
                "upload|archive|0|" S1 ":v1:archive:0:upload|{\"layout\": \"series-tar\","
                " \"url_pattern\": \"s3://arch/{StudyInstanceUID}\"}\n"
                "segment|mr-seg|7|" S1 ":v1:mr-seg:0:segment:" S1A "|{\"algorithm\": \"otsu\","
                " \"series_instance_uid\": \"" S1A "\"}\n"
                "upload|archive|0|" S1 ":v2:archive:0:upload|{\"layout\": \"series-tar\","
                " \"series\": [\"" S1B "\"], \"url_pattern\": \"s3://arch/{StudyInstanceUID}\"}\n"
                "segment|mr-seg|7|" S1 ":v2:mr-seg:0:segment:" S1B "|{\"algorithm\": \"otsu\","
                " \"series_instance_uid\": \"" S1B "\"}");
    assert_q(f, "SELECT count(*) FROM studies", NULL, "1");
    assert_q(f,
             "SELECT string_agg(concat_ws(':', series_uid, version, num_instances), ','"
             " ORDER BY series_uid) FROM series_versions",
             NULL, S1A ":1:2," S1B ":2:2");
    assert_int_equal(complete(f), 0);

    /* every instance again under new events: no change, no completion, no job */
    char *before = q_str(f,
                         "SELECT concat_ws('|', num_series, num_instances, completed_version,"
                         " dirty, updated_at) FROM studies",
                         NULL);
    PGresult *r = NULL;
    assert_int_equal(lc_db_exec(f->db,
                                "SELECT series_uid, sop_uid, store_key, sha256, size_bytes"
                                " FROM instances ORDER BY sop_uid",
                                0, NULL, &r, NULL),
                     LC_OK);
    assert_int_equal(PQntuples(r), 4);
    for (int i = 0; i < PQntuples(r); i++)
        add_stored(f, S1, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), PQgetvalue(r, i, 2),
                   PQgetvalue(r, i, 3), atoll(PQgetvalue(r, i, 4)), "notify", "SCANNER1");
    PQclear(r);
    route(f);
    assert_int_equal(f->x.last.duplicates, 4);
    assert_int_equal(complete(f), 0);
    char *after = q_str(f,
                        "SELECT concat_ws('|', num_series, num_instances, completed_version,"
                        " dirty, updated_at) FROM studies",
                        NULL);
    assert_string_equal(before, after);
    free(before);
    free(after);
    assert_q(f, "SELECT count(*) FROM jobs", NULL, "4");
    assert_q(f, "SELECT count(*) FROM outbox WHERE topic = 'radpipe.study.completed'", NULL, "2");
}

/* Without a rules file: the built-in jobs, and an amended version's jobs name its series. */
static void test_builtin_rules_amended(void **state)
{
    fx *f = *state;
    add_series(f, S1, S1A, "T1", 1, NULL, NULL, NULL);
    route(f);
    assert_int_equal(complete(f), 1);
    add_series(f, S1, S1B, "T2", 1, NULL, NULL, NULL);
    add_series(f, S1, S1C, "T3", 1, NULL, NULL, NULL);
    route(f);
    assert_int_equal(complete(f), 1);
    assert_jobs(f, S1,
                "segment|-|0|" S1 ":v1:segment|{}\n"
                "upload|-|0|" S1 ":v1:upload|{}\n"
                "segment|-|0|" S1 ":v2:segment:" S1B "|{\"series_instance_uid\": \"" S1B "\"}\n"
                "segment|-|0|" S1 ":v2:segment:" S1C "|{\"series_instance_uid\": \"" S1C "\"}\n"
                "upload|-|0|" S1 ":v2:upload|{\"series\": [\"" S1B "\", \"" S1C "\"]}");
    lc_event *ev = completed_event(f, S1, 1);
    assert_d_json(ev, "new_series", "[\"" S1B "\",\"" S1C "\"]");
    assert_d_json(ev, "source", "(absent)");
    lc_event_free(ev);
}

#define S2  ROOT ".2"
#define S2A ROOT ".2.1"
#define S2B ROOT ".2.2"
#define S2C ROOT ".2.3"
#define S3  ROOT ".3"
#define S3A ROOT ".3.1"
#define S3B ROOT ".3.2"

/* mercure's completion series: the study completes once its last listed series is there,
 * long before the quiet period; other sources wait. */
static void test_series_listed_completes_early(void **state)
{
    fx *f = *state;
    f->x.cfg.quiet_seconds = 3600;
    set_rules(f, "{\"completion\": [{\"name\": \"mr\", \"source\": {\"kind\": \"notify\","
                 " \"name\": \"MRSCAN*\"}, \"quiet_seconds\": 3600,"
                 " \"series_received\": [\"t1\", {\"any\": [\"t2\", \"flair\"]}]}]}");
    add_series(f, S2, S2A, "Ax T1 MPRAGE", 2, NULL, "notify", "MRSCAN7");
    add_series(f, S3, S3A, "Ax T1 MPRAGE", 2, NULL, "http", "MRSCAN7");
    route(f);
    assert_int_equal(complete(f), 0);
    add_series(f, S2, S2B, "Cor FLAIR", 2, NULL, "notify", "MRSCAN7");
    add_series(f, S3, S3B, "Cor FLAIR", 2, NULL, "http", "MRSCAN7");
    route(f);
    assert_int_equal(complete(f), 1);
    lc_event *ev = completed_event(f, S2, 0);
    assert_int_equal(d_int(ev, "version"), 1);
    assert_string_equal(d_str(ev, "reason"), "series_listed");
    assert_int_equal(d_int(ev, "num_instances"), 4);
    lc_event_free(ev);
    /* completed while the 3600 s quiet period cannot have passed */
    assert_q(f,
             "SELECT completed_at - last_instance_at < interval '3600 seconds'"
             " FROM studies WHERE study_uid = $1",
             S2, "t");
    assert_q(f, "SELECT count(*) FROM jobs WHERE study_uid = $1", S2, "2");
    /* the same series from another source: that source's default quiet period applies */
    assert_q(f, "SELECT concat_ws('|', dirty, completed_version) FROM studies WHERE study_uid = $1",
             S3, "t|0");

    /* a later series does not complete early again (the list held already) ... */
    add_series(f, S2, S2C, "DWI", 1, NULL, "notify", "MRSCAN7");
    route(f);
    assert_int_equal(complete(f), 0);
    /* ... but an explicit close does, routing only the new series */
    add_close(f, S2, "operator");
    route(f);
    assert_int_equal(complete(f), 1);
    ev = completed_event(f, S2, 1);
    assert_int_equal(d_int(ev, "version"), 2);
    assert_string_equal(d_str(ev, "reason"), "closed");
    assert_d_json(ev, "new_series", "[\"" S2C "\"]");
    lc_event_free(ev);
    assert_q(f,
             "SELECT string_agg(params::text, ';' ORDER BY dedupe_key) FROM jobs"
             " WHERE study_uid = $1 AND dedupe_key LIKE '%:v2:%'",
             S2, "{\"series_instance_uid\": \"" S2C "\"};{\"series\": [\"" S2C "\"]}");
    assert_q(f, "SELECT close_requested_at IS NULL FROM study_completion WHERE study_uid = $1", S2,
             "t");
}

#define S4  ROOT ".4"
#define S4A ROOT ".4.1"
#define S5  ROOT ".5"
#define S5A ROOT ".5.1"

static void test_close_events(void **state)
{
    fx *f = *state;
    f->x.cfg.quiet_seconds = 3600;
    /* a close before any instance is kept ... */
    add_close(f, S4, NULL);
    route(f);
    assert_q(f, "SELECT close_requested_at IS NOT NULL FROM study_completion WHERE study_uid = $1",
             S4, "t");
    assert_int_equal(complete(f), 0);
    /* ... and applied once the study is there */
    add_series(f, S4, S4A, "T1", 2, NULL, NULL, NULL);
    route(f);
    assert_int_equal(complete(f), 1);
    lc_event *ev = completed_event(f, S4, 0);
    assert_string_equal(d_str(ev, "reason"), "closed");
    lc_event_free(ev);
    assert_q(f, "SELECT close_requested_at IS NULL FROM study_completion WHERE study_uid = $1", S4,
             "t");

    /* a close of a complete study with nothing new does nothing; its redelivery neither */
    add_close(f, S4, "again");
    route(f);
    assert_q(f, "SELECT close_requested_at IS NULL FROM study_completion WHERE study_uid = $1", S4,
             "t");
    assert_int_equal(complete(f), 0);

    /* one batch with instances and their close: the close sees every instance */
    add_series(f, S5, S5A, "T1", 3, NULL, NULL, NULL);
    add_close(f, S5, "end of exam");
    char *dup = strdup(f->payloads[f->n - 1]);
    route(f);
    assert_int_equal(complete(f), 1);
    ev = completed_event(f, S5, 0);
    assert_string_equal(d_str(ev, "reason"), "closed");
    assert_int_equal(d_int(ev, "num_instances"), 3);
    lc_event_free(ev);
    /* the same close event redelivered: processed already, nothing happens */
    add_msg(f, CLOSE_TOPIC, S5, dup);
    route(f);
    assert_q(f, "SELECT close_requested_at IS NULL FROM study_completion WHERE study_uid = $1", S5,
             "t");
    assert_int_equal(complete(f), 0);

    /* poison on the close topic: quarantined with a dead letter, the batch goes on */
    add_msg(f, CLOSE_TOPIC, NULL, strdup("{not json"));
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "study_instance_uid", "not-a-uid");
    add_msg(f, CLOSE_TOPIC, NULL, event_json(LC_EV_STUDY_CLOSE, NULL, d));
    d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "study_instance_uid", S5);
    add_msg(f, CLOSE_TOPIC, NULL, event_json("radpipe.study.reopen", NULL, d));
    route(f);
    assert_q(f,
             "SELECT string_agg(reason, ' | ' ORDER BY id) FROM quarantine"
             " WHERE source LIKE 'kafka:radpipe.study.close/%'",
             NULL,
             "invalid event: event is not valid JSON | data.study_instance_uid is not a valid"
             " DICOM UID | unexpected event type \"radpipe.study.reopen\" on the study.close"
             " topic");
    assert_q(f, "SELECT count(*) FROM outbox WHERE topic = 'radpipe.dlq'", NULL, "3");
}

#define S6  ROOT ".6"
#define S6A ROOT ".6.1"
#define S7  ROOT ".7"
#define S7A ROOT ".7.1"
#define S8  ROOT ".8"
#define S8A ROOT ".8.1"

/* ImagesInAcquisition n, and no NumberOfTemporalPositions hint (whatever the header says) */
#define IIA(n)                                                                                     \
    "{\"00201002\": {\"vr\": \"IS\", \"Value\": [" #n "]},"                                        \
    " \"00200105\": {\"vr\": \"IS\", \"Value\": [1]}}"

static void test_expected_counts(void **state)
{
    fx *f = *state;
    f->x.cfg.quiet_seconds = 3600;
    set_rules(f, "{\"completion\": [{\"expected_counts\": true, \"quiet_seconds\": 3600}]}");
    /* 2 of 3 announced instances: not yet */
    add_series(f, S6, S6A, "CT", 3, NULL, NULL, NULL);
    f->n = 2; /* the third one's event comes later */
    free(f->payloads[2]);
    route(f);
    put_meta(f, S6A, NULL, IIA(3));
    assert_int_equal(complete(f), 0);
    char sha[65];
    size_t len = 0;
    char *path = NULL;
    if (asprintf(&path, "%s/%s/slice-0002.dcm", f->gen, S6A) < 0)
        abort();
    char *buf = ts_read_file(path, &len);
    assert_non_null(buf);
    lc_sha256_hex(buf, len, sha);
    free(buf);
    free(path);
    add_stored(f, S6, S6A, S6A ".3", "incoming/" S6A "/2.dcm", sha, (long long)len, NULL, NULL);
    route(f);
    put_meta(f, S6A, S6A ".3", IIA(3));
    assert_int_equal(complete(f), 1);
    lc_event *ev = completed_event(f, S6, 0);
    assert_string_equal(d_str(ev, "reason"), "counts");
    assert_int_equal(d_int(ev, "num_instances"), 3);
    lc_event_free(ev);

    /* hints that disagree (3 and 4) say nothing */
    add_series(f, S7, S7A, "CT", 3, NULL, NULL, NULL);
    route(f);
    put_meta(f, S7A, NULL, IIA(3));
    put_meta(f, S7A, S7A ".1", IIA(4));
    assert_int_equal(complete(f), 0);

    /* 2 temporal positions x distinct positions: 4 distinct positions want 8 ... */
    add_series(f, S8, S8A, "DCE", 4, NULL, NULL, NULL);
    route(f);
    put_meta(f, S8A, NULL,
             "{\"00200105\": {\"vr\": \"IS\", \"Value\": [2]},"
             " \"00201002\": {\"vr\": \"IS\", \"Value\": [4]}}");
    assert_int_equal(complete(f), 0);
    /* ... 2 distinct positions want 4, which are there */
    exec1(f,
          "UPDATE instances SET image_position = CASE WHEN instance_number <= 2"
          " THEN ARRAY[0, 0, instance_number]::float8[]"
          " ELSE ARRAY[0, 0, instance_number - 2]::float8[] END WHERE series_uid = $1",
          S8A, NULL);
    assert_int_equal(complete(f), 1);
    ev = completed_event(f, S8, 0);
    assert_string_equal(d_str(ev, "reason"), "counts");
    lc_event_free(ev);
    assert_q(f, "SELECT dirty FROM studies WHERE study_uid = $1", S7, "t");
}

#define S9  ROOT ".9"
#define S9A ROOT ".9.1"
#define S9B ROOT ".9.2"
#define S9C ROOT ".9.3"

/* Conditions on indexed columns and, for other keywords, the DICOM JSON metadata. */
static void test_rules_on_columns_and_metadata(void **state)
{
    fx *f = *state;
    set_rules(
        f, "{\"rules\": ["
           " {\"name\": \"thin\", \"level\": \"series\", \"when\": {\"all\": ["
           "  {\"tag\": \"Modality\", \"in\": [\"CT\", \"MR\"]},"
           "  {\"tag\": \"SliceThickness\", \"range\": {\"min\": 2, \"max\": 3}},"
           "  {\"not\": {\"tag\": \"ImageType\", \"equals\": \"DERIVED\"}}]},"
           "  \"actions\": [{\"action\": \"segment\", \"algorithm\": \"body\","
           "   \"params\": {\"nbins\": 128}, \"priority\": -5},"
           "   {\"action\": \"upload\", \"layout\": \"instance\"}]},"
           " {\"name\": \"research\", \"priority\": 2, \"when\": {\"all\": ["
           "  {\"tag\": \"StudyDescription\", \"wildcard\": \"*research*\", \"ignore_case\": true},"
           "  {\"tag\": \"StudyDate\", \"date_range\": {\"from\": \"20240101\", \"to\": "
           "\"20241231\"}},"
           "  {\"tag\": \"source.name\", \"regex\": \"^CT_ROOM[0-9]$\"}]},"
           "  \"actions\": [{\"action\": \"segment\", \"series\": {\"tag\": \"SeriesDescription\","
           "   \"regex\": \"^loc\", \"ignore_case\": true}}]},"
           " {\"name\": \"old\", \"when\": {\"tag\": \"StudyDate\", \"date_range\": {\"to\": "
           "\"20231231\"}},"
           "  \"actions\": [{\"action\": \"upload\"}]},"
           " {\"name\": \"no-body-part\", \"level\": \"series\","
           "  \"when\": {\"tag\": \"BodyPartExamined\", \"present\": false},"
           "  \"actions\": [{\"action\": \"upload\", \"layout\": \"series-tar\"}]}]}");
    const char *extra = "-i '(0008,1030)=Brain RESEARCH protocol' -i '(0008,0020)=20240315'";
    add_series(f, S9, S9A, "Axial 2.5", 2, extra, "spool", "CT_ROOM3");
    add_series(f, S9, S9B, "Axial 5", 1, extra, "spool", "CT_ROOM3");
    add_series(f, S9, S9C, "LOCALIZER", 1, extra, "spool", "CT_ROOM3");
    route(f);
    put_meta(f, S9A, NULL,
             "{\"00180050\": {\"vr\": \"DS\", \"Value\": [2.5]},"
             " \"00080008\": {\"vr\": \"CS\", \"Value\": [\"ORIGINAL\", \"PRIMARY\"]}}");
    put_meta(f, S9B, NULL, "{\"00180050\": {\"vr\": \"DS\", \"Value\": [5]}}");
    put_meta(f, S9C, NULL,
             "{\"00180050\": {\"vr\": \"DS\", \"Value\": [2]},"
             " \"00080008\": {\"vr\": \"CS\", \"Value\": [\"DERIVED\", \"SECONDARY\"]}}");
    assert_int_equal(complete(f), 1);
    assert_jobs(f, S9,
                "upload|no-body-part|0|" S9 ":v1:no-body-part:0:upload|{\"layout\": \"series-tar\","
                " \"series\": [\"" S9A "\", \"" S9B "\", \"" S9C "\"]}\n"
                "segment|research|2|" S9 ":v1:research:0:segment:" S9C
                "|{\"series_instance_uid\": \"" S9C "\"}\n"
                "segment|thin|-5|" S9 ":v1:thin:0:segment:" S9A "|{\"nbins\": 128, \"algorithm\":"
                " \"body\", \"series_instance_uid\": \"" S9A "\"}\n"
                "upload|thin|0|" S9
                ":v1:thin:1:upload|{\"layout\": \"instance\", \"series\": [\"" S9A "\"]}");
}

/* The condition operators on hand-made values: absent attributes, multi-valued ones,
 * numbers written with spaces, date-times, case folding. */
static void test_condition_semantics(void **state)
{
    (void)state;
    idx_rules *r = NULL;
    lc_err err = {0};
    static const char json[] =
        "{\"rules\": [{\"name\": \"r\", \"when\": {\"all\": ["
        " {\"tag\": \"ModalitiesInStudy\", \"equals\": \"MR\"},"
        " {\"tag\": \"NumberOfStudyRelatedInstances\", \"equals\": 12},"
        " {\"tag\": \"StudyDate\", \"date_range\": {\"from\": \"20240301\"}},"
        " {\"tag\": \"PatientName\", \"wildcard\": \"doe^j*\", \"ignore_case\": true},"
        " {\"not\": {\"tag\": \"AccessionNumber\", \"present\": true}},"
        " {\"tag\": \"Modality\", \"wildcard\": \"M?\"}]},"
        " \"actions\": [{\"action\": \"upload\"}]}]}";
    assert_int_equal(idx_rules_parse(json, strlen(json), "t", &r, &err), LC_OK);
    const idx_cond *w = r->rules[0].when;
    idx_rstudy s = {.uid = "1.2", .version = 1};
    idx_rseries ser = {.uid = "1.2.3", .in_scope = 1};
    s.kv = calloc(r->nkeys, sizeof(idx_vals));
    ser.kv = calloc(r->nkeys, sizeof(idx_vals));
    s.series = &ser;
    s.nseries = 1;
    char *mods[] = {"CT", "MR"}, *num[] = {" 12 "}, *date[] = {"20240315101500"},
         *name[] = {"DOE^JANE"}, *mod[] = {"MR"};
    for (size_t k = 0; k < r->nkeys; k++) {
        const char *kw = r->keys[k].keyword;
        idx_vals *v = r->keys[k].src == IDX_K_STUDY ? &s.kv[k] : &ser.kv[k];
        if (!strcmp(kw, "ModalitiesInStudy"))
            *v = (idx_vals){mods, 2};
        else if (!strcmp(kw, "NumberOfStudyRelatedInstances"))
            *v = (idx_vals){num, 1};
        else if (!strcmp(kw, "StudyDate"))
            *v = (idx_vals){date, 1};
        else if (!strcmp(kw, "PatientName"))
            *v = (idx_vals){name, 1};
        else if (!strcmp(kw, "Modality"))
            *v = (idx_vals){mod, 1};
    }
    assert_true(idx_cond_match(r, w, &s, NULL));
    /* a series keyword at study level holds for a series in scope only */
    ser.in_scope = 0;
    assert_false(idx_cond_match(r, w, &s, NULL));
    assert_true(idx_cond_match(r, w, &s, &ser));
    ser.in_scope = 1;
    /* each leaf matters */
    num[0] = "12.5";
    assert_false(idx_cond_match(r, w, &s, NULL));
    num[0] = "12";
    date[0] = "20240229";
    assert_false(idx_cond_match(r, w, &s, NULL));
    date[0] = "2024";
    assert_false(idx_cond_match(r, w, &s, NULL));
    date[0] = "20240301";
    name[0] = "DOE^ANN";
    assert_false(idx_cond_match(r, w, &s, NULL));
    name[0] = "doe^john";
    assert_true(idx_cond_match(r, w, &s, NULL));
    mods[1] = "US";
    assert_false(idx_cond_match(r, w, &s, NULL));
    mods[1] = "MR";
    mod[0] = "MRI";
    assert_false(idx_cond_match(r, w, &s, NULL));
    mod[0] = "MR";
    for (size_t k = 0; k < r->nkeys; k++) {
        if (strcmp(r->keys[k].keyword, "AccessionNumber") == 0) {
            char *acc[] = {"A1"};
            s.kv[k] = (idx_vals){acc, 1};
            assert_false(idx_cond_match(r, w, &s, NULL));
            s.kv[k] = (idx_vals){NULL, 0};
        }
    }
    assert_true(idx_cond_match(r, w, &s, NULL));
    free(s.kv);
    free(ser.kv);
    idx_rules_free(r);

    /* glob corner cases */
    assert_true(idx_glob_match("*", "", 0));
    assert_true(idx_glob_match("a*b*c", "aXbYbZc", 0));
    assert_false(idx_glob_match("a*b?c", "abc", 0));
    assert_true(idx_glob_match("A*", "abc", 1));
    assert_false(idx_glob_match("A*", "abc", 0));
}

static void write_file(const char *path, const char *s)
{
    assert_int_equal(ts_write_file(path, s, strlen(s)), 0);
}

/* SIGHUP: the tick reloads a valid file, and keeps the rules in force for an invalid one. */
static void test_reload_on_tick(void **state)
{
    fx *f = *state;
    atomic_int reload;
    atomic_init(&reload, 0);
    char *path = NULL;
    if (asprintf(&path, "%s/rules.json", f->gen) < 0)
        abort();
    f->x.reload = &reload;
    f->x.rules_path = path;
    f->x.next_complete_ms = lc_now_ms() + 60000; /* only the reload */
    write_file(path, "{\"rules\": [{\"name\": \"one\", \"actions\": [{\"action\": \"upload\"}]}]}");
    idx_tick(&f->x);
    assert_null(f->x.rules); /* no signal, no reload */
    atomic_store(&reload, 1);
    idx_tick(&f->x);
    assert_non_null(f->x.rules);
    assert_int_equal(f->x.rules->nrules, 1);
    assert_string_equal(f->x.rules->rules[0].name, "one");
    assert_int_equal(atomic_load(&reload), 0);
    const idx_rules *kept = f->x.rules;

    write_file(path, "{\"rules\": [{\"name\": \"two\", \"actions\": [{\"action\": \"zip\"}]}]}");
    atomic_store(&reload, 1);
    idx_tick(&f->x);
    assert_ptr_equal(f->x.rules, kept);
    assert_string_equal(f->x.rules->rules[0].name, "one");

    write_file(path, "{\"rules\": [{\"name\": \"three\", \"actions\": [{\"action\": \"upload\"}]},"
                     " {\"name\": \"four\", \"actions\": [{\"action\": \"segment\"}]}]}");
    atomic_store(&reload, 1);
    idx_tick(&f->x);
    assert_int_equal(f->x.rules->nrules, 2);
    assert_string_equal(f->x.rules->rules[1].name, "four");
    /* the new rules route the next completion */
    add_series(f, S1, S1A, "T1", 1, NULL, NULL, NULL);
    route(f);
    assert_int_equal(complete(f), 1);
    assert_q(f, "SELECT string_agg(rule, ',' ORDER BY rule) FROM jobs", NULL, "four,three");
    f->x.rules_path = NULL;
    f->x.reload = NULL;
    free(path);
}

/* --dry-run-rules: the jobs the rules would create for what is indexed; writes nothing. */
static void test_dry_run(void **state)
{
    fx *f = *state;
    add_series(f, S1, S1A, "T1 AX", 2, NULL, "notify", "SCANNER1");
    add_series(f, S1, S1B, "T2 SAG", 1, NULL, "notify", "SCANNER1");
    add_series(f, S2, S2A, "LOCALIZER", 1, NULL, NULL, NULL);
    route(f);
    char *path = NULL, *cmd = NULL, *out = NULL, *bin = ts_bin("dicom-indexer");
    if (asprintf(&path, "%s/rules.json", f->gen) < 0)
        abort();
    write_file(path, amend_rules);
    char *before = q_str(f,
                         "SELECT concat_ws('|', (SELECT count(*) FROM jobs),"
                         " (SELECT count(*) FROM outbox), (SELECT string_agg(concat_ws(',',"
                         " study_uid, dirty, completed_version, updated_at), ';') FROM studies),"
                         " (SELECT count(*) FROM study_completion))",
                         NULL);
    if (asprintf(&cmd, "RADPIPE_DATABASE_URL='%s' RADPIPE_LOG_LEVEL=warn '%s' --dry-run-rules '%s'",
                 f->url, bin, path) < 0)
        abort();
    assert_int_equal(ts_run(cmd, &out), 0);
    static const char want[] =
        "{\"study_instance_uid\":\"" S1
        "\",\"rule\":\"archive\",\"kind\":\"upload\",\"priority\":0,"
        "\"params\":{\"url_pattern\":\"s3://arch/{StudyInstanceUID}\",\"layout\":\"series-tar\"},"
        "\"dedupe_key\":\"" S1 ":v1:archive:0:upload\"}\n"
        "{\"study_instance_uid\":\"" S1
        "\",\"rule\":\"mr-seg\",\"kind\":\"segment\",\"priority\":7,"
        "\"params\":{\"algorithm\":\"otsu\",\"series_instance_uid\":\"" S1A "\"},"
        "\"dedupe_key\":\"" S1 ":v1:mr-seg:0:segment:" S1A "\"}\n"
        "{\"study_instance_uid\":\"" S1
        "\",\"rule\":\"mr-seg\",\"kind\":\"segment\",\"priority\":7,"
        "\"params\":{\"algorithm\":\"otsu\",\"series_instance_uid\":\"" S1B "\"},"
        "\"dedupe_key\":\"" S1 ":v1:mr-seg:0:segment:" S1B "\"}\n"
        "{\"study_instance_uid\":\"" S2
        "\",\"rule\":\"archive\",\"kind\":\"upload\",\"priority\":0,"
        "\"params\":{\"url_pattern\":\"s3://arch/{StudyInstanceUID}\",\"layout\":\"series-tar\"},"
        "\"dedupe_key\":\"" S2 ":v1:archive:0:upload\"}\n"
        "{\"study_instance_uid\":\"" S2
        "\",\"rule\":\"mr-seg\",\"kind\":\"segment\",\"priority\":7,"
        "\"params\":{\"algorithm\":\"otsu\",\"series_instance_uid\":\"" S2A "\"},"
        "\"dedupe_key\":\"" S2 ":v1:mr-seg:0:segment:" S2A "\"}\n";
    assert_string_equal(out, want);
    free(out);
    out = NULL;
    char *after = q_str(f,
                        "SELECT concat_ws('|', (SELECT count(*) FROM jobs),"
                        " (SELECT count(*) FROM outbox), (SELECT string_agg(concat_ws(',',"
                        " study_uid, dirty, completed_version, updated_at), ';') FROM studies),"
                        " (SELECT count(*) FROM study_completion))",
                        NULL);
    assert_string_equal(before, after);
    free(before);
    free(after);

    /* an invalid file: exit 1 with the reason */
    write_file(path, "{\"rules\": [{\"name\": \"x\", \"actions\": [{\"action\": \"upload\","
                     " \"layout\": \"zip\"}]}]}");
    free(cmd);
    if (asprintf(&cmd, "RADPIPE_DATABASE_URL='%s' '%s' --dry-run-rules '%s' 2>&1", f->url, bin,
                 path) < 0)
        abort();
    assert_int_equal(ts_run(cmd, &out), 1);
    assert_non_null(strstr(out, "rules[0] (\"x\").actions[0].layout"));
    free(out);
    free(cmd);
    free(path);
    free(bin);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_condition_semantics),
        cmocka_unit_test_setup_teardown(test_amended_version_routes_new_series_only, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_builtin_rules_amended, setup, teardown),
        cmocka_unit_test_setup_teardown(test_series_listed_completes_early, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_events, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expected_counts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rules_on_columns_and_metadata, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reload_on_tick, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dry_run, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
