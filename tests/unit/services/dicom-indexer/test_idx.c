/*
 * test_idx.c: the dicom-indexer's batch handler and study completion, called directly with a
 * real PostgreSQL database (fresh per test, migrated), a file:// store in a temporary
 * directory and real DICOM files (the 4-slice MR series in two transfer syntaxes with the
 * same UIDs). Messages are built from real instance.stored events. Expected values come from
 * dcmdump, not from the parser under test.
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
#include "lc/event.h"
#include "lc/util.h"
#include "ts.h"

#define PREFIX            "radpipe."
#define TOPIC             "radpipe.instance.stored"
#define STUDY             "1.2.826.0.1.3680043.8.498.1725697665093567298244257348"
#define SERIES            "1.2.826.0.1.3680043.8.498.1725697665093567298244257421"
#define MR_STORAGE        "1.2.840.10008.5.1.4.1.1.4"
#define JPEG_LOSSLESS_SV1 "1.2.840.10008.1.2.4.70"
#define RLE_LOSSLESS      "1.2.840.10008.1.2.5"
#define MAXMSG            16

static const char *const sops[4] = {
    "1.2.826.0.1.3680043.8.498.1725697665093567298245319650",
    "1.2.826.0.1.3680043.8.498.1725697665093567298245330564",
    "1.2.826.0.1.3680043.8.498.1725697665093567298245341855",
    "1.2.826.0.1.3680043.8.498.1725697665093567298245353291",
};
static const char *const files[4] = {"IM-0001-0001-0001.dcm", "IM-0001-0002-0001.dcm",
                                     "IM-0001-0003-0001.dcm", "IM-0001-0004-0001.dcm"};
/* ImagePositionPatient x of each slice; y and z are the same for all four */
static const double ipp_x[4] = {-103.79415804148, -102.79415804148, -101.79415804148,
                                -100.79415804148};

typedef struct fx {
    char *url;
    lc_db *db;
    char *dir;
    lc_store *store;
    lc_metrics *metrics;
    idx_ctx x;
    idx_cfg cfg;
    char *jpeg_dir, *rle_dir;
    lc_kafka_msg msgs[MAXMSG];
    char *payloads[MAXMSG];
    size_t n;
    int64_t next_offset;
} fx;

/* The series folder of one transfer syntax: tests/data first, else the shared samples. */
static char *series_dir(const char *variant)
{
    struct stat st;
    char *p = NULL;
    char *d = ts_data("series/mr-4slice");
    if (asprintf(&p, "%s/%s", d, variant) < 0)
        abort();
    free(d);
    if (stat(p, &st) == 0 && S_ISDIR(st.st_mode))
        return p;
    free(p);
    const char *s = ts_samples_dir();
    if (!s)
        fail_msg("no DICOM samples: set RADPIPE_SAMPLES_DIR");
    if (asprintf(&p, "%s/series/mr-4slice-compressed/%s", s, variant) < 0)
        abort();
    return p;
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    lc_err err = {0};
    char *surl = NULL;
    assert_non_null(f);
    f->url = ts_pg_fresh_db("idx");
    if (!f->url)
        fail_msg("RADPIPE_TEST_PG_URL is not set or the server refused: run through tests/run.sh");
    if (lc_db_connect(f->url, 5000, NULL, &f->db, &err) != LC_OK ||
        lc_db_migrate(f->db, &err) != LC_OK)
        fail_msg("database: %s", lc_err_msg(&err));
    f->dir = ts_tmpdir("idx");
    if (asprintf(&surl, "file://%s", f->dir) < 0)
        abort();
    if (lc_store_open(surl, &f->store, &err) != LC_OK)
        fail_msg("store: %s", lc_err_msg(&err));
    free(surl);
    f->metrics = lc_metrics_new();
    assert_non_null(f->metrics);
    f->cfg = (idx_cfg){.batch_max = 500, .quiet_seconds = 0, .job_max_attempts = 5};
    if (idx_init(&f->x, f->db, f->store, PREFIX, "/radpipe/dicom-indexer", &f->cfg, f->metrics,
                 &err) != LC_OK)
        fail_msg("idx_init: %s", lc_err_msg(&err));
    f->jpeg_dir = series_dir("jpeg-lossless-sv1");
    f->rle_dir = series_dir("rle");
    f->next_offset = 100;
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
    lc_metrics_free(f->metrics);
    lc_store_free(f->store);
    lc_db_free(f->db);
    ts_rmrf(f->dir);
    free(f->dir);
    free(f->url);
    free(f->jpeg_dir);
    free(f->rle_dir);
    free(f);
    return 0;
}

/* --- helpers ---------------------------------------------------------------------------- */

/* Copy a file into the store under key; its SHA-256 and size come back. */
static void put_file(fx *f, const char *src, const char *key, char sha[65], long long *size)
{
    size_t len = 0;
    lc_err err = {0};
    char *buf = ts_read_file(src, &len);
    if (!buf)
        fail_msg("could not read %s", src);
    lc_sha256_hex(buf, len, sha);
    *size = (long long)len;
    if (lc_store_put_buf(f->store, key, buf, len, &err) != LC_OK)
        fail_msg("put %s: %s", key, lc_err_msg(&err));
    free(buf);
}

static void add_raw(fx *f, char *payload /* consumed */)
{
    assert_true(f->n < MAXMSG);
    f->payloads[f->n] = payload;
    f->msgs[f->n] = (lc_kafka_msg){.topic = TOPIC,
                                   .partition = 0,
                                   .offset = f->next_offset++,
                                   .key = STUDY,
                                   .key_len = strlen(STUDY),
                                   .payload = payload,
                                   .len = strlen(payload),
                                   .timestamp_ms = -1};
    f->n++;
}

/* An instance.stored event from CloudEvents source `source` for url with the given UIDs; its
 * id is copied to id_out. */
static void add_event_from(fx *f, const char *source, const char *study, const char *series,
                           const char *sop, const char *url, const char *sha, long long size,
                           char id_out[129])
{
    lc_event *ev = NULL;
    lc_err err = {0};
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "study_instance_uid", study);
    cJSON_AddStringToObject(d, "series_instance_uid", series);
    cJSON_AddStringToObject(d, "sop_instance_uid", sop);
    cJSON_AddStringToObject(d, "url", url);
    cJSON_AddNumberToObject(d, "size", (double)size);
    cJSON_AddStringToObject(d, "sha256", sha);
    if (lc_event_new(LC_EV_INSTANCE_STORED, source, study, d, &ev, &err) != LC_OK)
        fail_msg("event: %s", lc_err_msg(&err));
    if (id_out)
        lc_strlcpy(id_out, ev->id, 129);
    char *json = lc_event_to_json(ev);
    assert_non_null(json);
    lc_event_free(ev);
    add_raw(f, json);
}

static void add_event(fx *f, const char *study, const char *series, const char *sop,
                      const char *url, const char *sha, long long size, char id_out[129])
{
    add_event_from(f, "/radpipe/test", study, series, sop, url, sha, size, id_out);
}

static char *object_url(fx *f, const char *key)
{
    char *u = NULL;
    if (asprintf(&u, "%s/%s", lc_store_url(f->store), key) < 0)
        abort();
    return u;
}

/* Store slice i (0..3) of dir under key and add its event; returns the sha256 in sha. */
static void add_slice(fx *f, const char *dir, int i, const char *key, char sha[65])
{
    char *src = NULL, shabuf[65];
    long long size = 0;
    if (asprintf(&src, "%s/%s", dir, files[i]) < 0)
        abort();
    put_file(f, src, key, shabuf, &size);
    char *u = object_url(f, key);
    add_event(f, STUDY, SERIES, sops[i], u, shabuf, size, NULL);
    if (sha)
        memcpy(sha, shabuf, 65);
    free(u);
    free(src);
}

static lc_rc run_batch(fx *f)
{
    lc_err err = {0};
    lc_rc rc = idx_handle_batch(&f->x, f->msgs, f->n, NULL, &err);
    if (rc != LC_OK)
        fprintf(stderr, "batch: %s\n", lc_err_msg(&err));
    return rc;
}

static void run_ok(fx *f)
{
    assert_int_equal(run_batch(f), LC_OK);
}

static void exec_ok(fx *f, const char *sql)
{
    lc_err err = {0};
    if (lc_db_exec(f->db, sql, 0, NULL, NULL, &err) != LC_OK)
        fail_msg("%s: %s", sql, lc_err_msg(&err));
}

/* One value of a one-row query, as a malloc'd string ("" for NULL). */
static char *q_str(fx *f, const char *sql, const char *p1)
{
    PGresult *r = NULL;
    lc_err err = {0};
    const char *p[1] = {p1};
    if (lc_db_exec(f->db, sql, p1 ? 1 : 0, p1 ? p : NULL, &r, &err) != LC_OK)
        fail_msg("%s: %s", sql, lc_err_msg(&err));
    if (PQntuples(r) != 1)
        fail_msg("%s: %d rows", sql, PQntuples(r));
    char *s = strdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    return s;
}

static long long q_ll(fx *f, const char *sql, const char *p1)
{
    char *s = q_str(f, sql, p1);
    long long v = atoll(s);
    free(s);
    return v;
}

static void assert_q(fx *f, const char *sql, const char *p1, const char *want)
{
    char *s = q_str(f, sql, p1);
    if (strcmp(s, want) != 0)
        fail_msg("%s [%s]: got \"%s\", want \"%s\"", sql, p1 ? p1 : "", s, want);
    free(s);
}

static void index_slices(fx *f, int from, int to)
{
    for (int i = from; i < to; i++) {
        char key[128];
        snprintf(key, sizeof(key), "incoming/%s/%s.dcm", STUDY, sops[i]);
        add_slice(f, f->jpeg_dir, i, key, NULL);
    }
    run_ok(f);
    clear_msgs(f);
}

static long long count_rows(fx *f, const char *table)
{
    char sql[128];
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM %s", table);
    return q_ll(f, sql, NULL);
}

static long long outbox_count(fx *f, const char *topic)
{
    return q_ll(f, "SELECT count(*) FROM outbox WHERE topic = $1", topic);
}

/* The study's row as one comparable string of what must not change on re-sends. */
static char *study_state(fx *f)
{
    return q_str(f,
                 "SELECT concat_ws('|', num_series, num_instances, modalities, dirty,"
                 " last_instance_at, updated_at, completed_version,"
                 " (SELECT string_agg(concat_ws(',', series_uid, num_instances, updated_at), ';')"
                 "  FROM series WHERE study_uid = s.study_uid),"
                 " (SELECT string_agg(concat_ws(',', sop_uid, sha256, replaced_count, updated_at),"
                 "  ';' ORDER BY sop_uid) FROM instances WHERE study_uid = s.study_uid))"
                 " FROM studies s WHERE study_uid = $1",
                 STUDY);
}

/* --- tests ------------------------------------------------------------------------------ */

static void test_config_table(void **state)
{
    (void)state;
    idx_cfg c = {0};
    lc_cfg_table t[1] = {{idx_cfg_vars, idx_cfg_nvars, &c}};
    lc_err err = {0};
    unsetenv("RADPIPE_INDEX_BATCH_MAX");
    unsetenv("RADPIPE_JOB_MAX_ATTEMPTS");
    setenv("RADPIPE_STUDY_QUIET_SECONDS", "86401", 1);
    assert_int_equal(lc_cfg_load(t, 1, &err), LC_ERR_CONFIG);
    lc_cfg_release(t, 1);
    unsetenv("RADPIPE_STUDY_QUIET_SECONDS");
    assert_int_equal(lc_cfg_load(t, 1, &err), LC_OK);
    assert_int_equal(c.batch_max, 500);
    assert_int_equal(c.quiet_seconds, 10);
    assert_int_equal(c.job_max_attempts, 5);
    assert_true(c.verify_sha256);
    assert_string_equal(c.trusted_sources, "/radpipe/api-gateway,/radpipe/dicom-indexer");
    lc_cfg_release(t, 1);
}

static void test_utf8_fix(void **state)
{
    (void)state;
    char a[] = "abc\xff\xc3\xa9-\xc0\xaf-\xe2\x82-\xed\xa0\x80-\xf0\x9f\x98\x80";
    idx_utf8_fix(a);
    assert_string_equal(a, "abc?\xc3\xa9-?\?-?\?-?\?\?-\xf0\x9f\x98\x80");
    idx_utf8_fix(NULL);
}

static void test_index_series(void **state)
{
    fx *f = *state;
    char sha[4][65];
    for (int i = 0; i < 4; i++) {
        char key[128];
        snprintf(key, sizeof(key), "incoming/%s/%s.dcm", STUDY, sops[i]);
        add_slice(f, f->jpeg_dir, i, key, sha[i]);
    }
    run_ok(f);
    assert_int_equal(f->x.last.inserted, 4);
    assert_int_equal(f->x.last.duplicates, 0);
    assert_int_equal(f->x.last.quarantined, 0);
    assert_int_equal(count_rows(f, "instances"), 4);
    for (int i = 0; i < 4; i++) {
        char want[512];
        snprintf(want, sizeof(want),
                 "%s|%s|%s|%s|%d|256|256|1|{0,1,0,0,0,-1}|{1,1}|incoming/%s/%s.dcm|%s|0", SERIES,
                 STUDY, MR_STORAGE, JPEG_LOSSLESS_SV1, i + 1, STUDY, sops[i], sha[i]);
        assert_q(f,
                 "SELECT concat_ws('|', series_uid, study_uid, sop_class_uid, transfer_syntax_uid,"
                 " instance_number, rows, columns, number_of_frames, image_orientation,"
                 " pixel_spacing, store_key, sha256, replaced_count)"
                 " FROM instances WHERE sop_uid = $1",
                 sops[i], want);
        char *x = q_str(f, "SELECT image_position[1] FROM instances WHERE sop_uid = $1", sops[i]);
        assert_float_equal(atof(x), ipp_x[i], 1e-9);
        free(x);
        assert_q(f,
                 "SELECT round(image_position[2]::numeric, 8) || ' ' ||"
                 " round(image_position[3]::numeric, 8) FROM instances WHERE sop_uid = $1",
                 sops[i], "-161.07467270 130.05125403");
        char *src = NULL;
        if (asprintf(&src, "%s/%s", f->jpeg_dir, files[i]) < 0)
            abort();
        struct stat st;
        assert_int_equal(stat(src, &st), 0);
        assert_int_equal(q_ll(f, "SELECT size_bytes FROM instances WHERE sop_uid = $1", sops[i]),
                         (long long)st.st_size);
        free(src);
    }
    assert_q(f,
             "SELECT concat_ws('|', study_uid, modality, series_number, num_instances)"
             " FROM series WHERE series_uid = $1",
             SERIES, STUDY "|MR|4|4");
    assert_q(f,
             "SELECT concat_ws('|', num_series, num_instances, modalities, dirty,"
             " completed_version) FROM studies WHERE study_uid = $1",
             STUDY, "1|4|{MR}|t|0");
    assert_int_equal(count_rows(f, "studies"), 1);
    assert_int_equal(count_rows(f, "series"), 1);
    assert_int_equal(
        q_ll(f, "SELECT count(*) FROM processed_events WHERE consumer = $1", "dicom-indexer"), 4);
    assert_int_equal(count_rows(f, "outbox"), 0);
    assert_int_equal(count_rows(f, "quarantine"), 0);
    assert_true(lc_metric_value(f->x.m_inserted) == 4.0);
    assert_true(lc_metric_value(f->x.m_batch) == 1.0);

    /* the same batch again: every event was processed, nothing changes */
    exec_ok(f, "UPDATE studies SET dirty = false");
    char *before = study_state(f);
    run_ok(f);
    assert_int_equal(f->x.last.inserted, 0);
    assert_int_equal(f->x.last.duplicates, 4);
    char *after = study_state(f);
    assert_string_equal(before, after);
    free(after);
    assert_int_equal(count_rows(f, "processed_events"), 4);
    assert_int_equal(count_rows(f, "instances"), 4);
    clear_msgs(f);

    /* new events for the same bytes: recorded as processed, the index stays as it was */
    for (int i = 0; i < 4; i++) {
        char *u = NULL, key[128];
        snprintf(key, sizeof(key), "incoming/%s/%s.dcm", STUDY, sops[i]);
        u = object_url(f, key);
        add_event(f, STUDY, SERIES, sops[i], u, sha[i], 1, NULL);
        free(u);
    }
    run_ok(f);
    assert_int_equal(f->x.last.duplicates, 4);
    assert_int_equal(f->x.last.inserted + f->x.last.replaced + f->x.last.quarantined, 0);
    after = study_state(f);
    assert_string_equal(before, after);
    free(after);
    free(before);
    assert_int_equal(count_rows(f, "processed_events"), 8);
    assert_int_equal(count_rows(f, "outbox"), 0);
    assert_true(lc_metric_value(f->x.m_duplicate) == 8.0);
}

static void test_replace_changed_file(void **state)
{
    fx *f = *state;
    char rle_sha[65], rle2_sha[65];
    index_slices(f, 0, 4);
    exec_ok(f, "UPDATE studies SET dirty = false");

    /* slice 1 again, in another transfer syntax: same UIDs, other bytes */
    add_slice(f, f->rle_dir, 0, "incoming/rle/1.dcm", rle_sha);
    run_ok(f);
    assert_int_equal(f->x.last.replaced, 1);
    assert_int_equal(f->x.last.inserted, 0);
    assert_int_equal(count_rows(f, "instances"), 4);
    char want[512];
    snprintf(want, sizeof(want), "1|%s|%s|incoming/rle/1.dcm", rle_sha, RLE_LOSSLESS);
    assert_q(f,
             "SELECT concat_ws('|', replaced_count, sha256, transfer_syntax_uid, store_key)"
             " FROM instances WHERE sop_uid = $1",
             sops[0], want);
    assert_q(f, "SELECT concat_ws('|', dirty, num_instances) FROM studies WHERE study_uid = $1",
             STUDY, "t|4");
    assert_q(f, "SELECT num_instances FROM series WHERE series_uid = $1", SERIES, "4");
    assert_true(lc_metric_value(f->x.m_replaced) == 1.0);
    clear_msgs(f);

    /* the replacement re-sent under a new event id is a duplicate */
    exec_ok(f, "UPDATE studies SET dirty = false");
    add_slice(f, f->rle_dir, 0, "incoming/rle/1.dcm", NULL);
    run_ok(f);
    assert_int_equal(f->x.last.duplicates, 1);
    assert_q(f, "SELECT replaced_count FROM instances WHERE sop_uid = $1", sops[0], "1");
    assert_q(f, "SELECT dirty FROM studies WHERE study_uid = $1", STUDY, "f");
    clear_msgs(f);

    /* two versions of one instance in one batch: the later message wins, replacing once */
    add_slice(f, f->jpeg_dir, 1, "incoming/jpeg/2.dcm", NULL);
    add_slice(f, f->rle_dir, 1, "incoming/rle/2.dcm", rle2_sha);
    run_ok(f);
    assert_int_equal(f->x.last.replaced, 1);
    assert_int_equal(f->x.last.duplicates, 1);
    snprintf(want, sizeof(want), "1|%s|incoming/rle/2.dcm", rle2_sha);
    assert_q(f,
             "SELECT concat_ws('|', replaced_count, sha256, store_key) FROM instances"
             " WHERE sop_uid = $1",
             sops[1], want);
    assert_int_equal(count_rows(f, "instances"), 4);
}

/* Rows the archive's tables have given to scans so far (sequential scans, and index and
 * bitmap scans, which seq_tup_read leaves out), as "<total>: <table>=<seq>+<index> ..."
 * (malloc'd); atoll gives the total. This session's statistics stay in its backend for up to
 * a second (PostgreSQL 15): they are flushed first. */
static char *rows_read(fx *f)
{
    exec_ok(f, "SELECT pg_stat_force_next_flush()");
    return q_str(f,
                 "SELECT COALESCE(sum(seq_tup_read + COALESCE(idx_tup_fetch, 0)), 0) || ': ' ||"
                 " COALESCE(string_agg(relname || '=' || seq_tup_read || '+' ||"
                 " COALESCE(idx_tup_fetch, 0), ' ' ORDER BY relname), '')"
                 " FROM pg_stat_user_tables WHERE relname IN ('patients', 'studies', 'series',"
                 " 'instances', 'instance_metadata', 'processed_events', 'study_completion')",
                 NULL);
}

/* A batch that replaces slice 1 by its other transfer syntax (k picks which), so that every
 * statement of the write path runs, the recount included, and sends slice 2 again. */
static void replace_batch(fx *f, int k)
{
    add_slice(f, k % 2 ? f->rle_dir : f->jpeg_dir, 0,
              k % 2 ? "incoming/rle/1.dcm" : "incoming/jpeg/1.dcm", NULL);
    add_slice(f, f->jpeg_dir, 1, "incoming/jpeg/2.dcm", NULL);
    run_ok(f);
    assert_int_equal(f->x.last.replaced, 1);
    assert_int_equal(f->x.last.duplicates + f->x.last.replaced, 2);
    clear_msgs(f);
}

#define ARCHIVE_STUDIES 5000 /* of 10 instances each */

/* A batch reads what its own studies need, however big the archive around them is, and also
 * right after the archive grew, before autovacuum has analyzed it: a session that prepared its
 * statements while the tables were small must not keep scanning them whole. */
static void test_batch_cost_is_independent_of_archive_size(void **state)
{
    fx *f = *state;
    char g[16];
    index_slices(f, 0, 4);
    /* more than 5 runs each: PostgreSQL now uses a generic plan for what it has prepared */
    for (int k = 1; k <= 8; k++)
        replace_batch(f, k);
    /* 50,000 instances arrive another way (another indexer, a bulk load) */
    snprintf(g, sizeof(g), "%d", ARCHIVE_STUDIES);
    free(q_str(f,
               "WITH s AS (INSERT INTO studies (study_uid)"
               " SELECT '2.25.' || g FROM generate_series(1, $1::int) g RETURNING 1)"
               " SELECT count(*) FROM s",
               g));
    exec_ok(f, "INSERT INTO series (series_uid, study_uid, modality, num_instances)"
               " SELECT study_uid || '.1', study_uid, 'CT', 10 FROM studies"
               " WHERE study_uid LIKE '2.25.%'");
    exec_ok(f, "INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, store_key,"
               " size_bytes, sha256) SELECT se.series_uid || '.' || i, se.series_uid,"
               " se.study_uid, '1.2.840.10008.5.1.4.1.1.2', 'k/' || se.series_uid || '/' || i, 1,"
               " repeat('0', 64) FROM series se, generate_series(1, 10) i"
               " WHERE se.study_uid LIKE '2.25.%'");
    exec_ok(f, "INSERT INTO instance_metadata (sop_uid, json) SELECT sop_uid, '{}' FROM instances"
               " WHERE study_uid LIKE '2.25.%'");
    exec_ok(f, "INSERT INTO processed_events (consumer, event_id)"
               " SELECT 'dicom-indexer', gen_random_uuid()::text FROM instances"
               " WHERE study_uid LIKE '2.25.%'");
    assert_int_equal(count_rows(f, "instances"), ARCHIVE_STUDIES * 10 + 4);

    /* first never analyzed (a bulk load into a new database), then analyzed */
    for (int pass = 0; pass < 2; pass++) {
        char *was = rows_read(f);
        replace_batch(f, 9 + pass); /* the warm-up ended with k = 8 */
        char *now = rows_read(f);
        long long read = atoll(now) - atoll(was);
        if (read > 1000)
            fail_msg("%s: one batch of 2 instances read %lld rows (before: %s; after: %s)",
                     pass ? "analyzed" : "not analyzed", read, was, now);
        free(was);
        free(now);
        exec_ok(f, "ANALYZE");
    }
    assert_q(f, "SELECT concat_ws('|', num_instances, dirty) FROM studies WHERE study_uid = $1",
             STUDY, "4|t");
}

static void test_source_trusted(void **state)
{
    (void)state;
    char list[] = "/radpipe/api-gateway, /radpipe/dicom-indexer";
    idx_cfg c = {.verify_sha256 = 1, .trusted_sources = list};
    assert_true(idx_source_trusted(&c, "/radpipe/api-gateway"));
    assert_true(idx_source_trusted(&c, "/radpipe/dicom-indexer"));
    assert_false(idx_source_trusted(&c, "/radpipe/api-gatewayx"));
    assert_false(idx_source_trusted(&c, "/radpipe/api"));
    assert_false(idx_source_trusted(&c, "/radpipe/radpipe-notify"));
    assert_false(idx_source_trusted(&c, ""));
    assert_false(idx_source_trusted(&c, NULL));
    char empty[] = "";
    c.trusted_sources = empty;
    assert_false(idx_source_trusted(&c, "/radpipe/api-gateway"));
    c.trusted_sources = NULL;
    assert_false(idx_source_trusted(&c, "/radpipe/api-gateway"));
    c.verify_sha256 = 0; /* RADPIPE_INDEX_VERIFY_SHA256=false: every producer */
    assert_true(idx_source_trusted(&c, "/radpipe/test"));
}

/* With verification on, only a trusted producer's sha256 claim is taken, and only when the
 * object has the claimed size; everything else is hashed from the stored bytes. */
static void test_trusted_source_hash(void **state)
{
    fx *f = *state;
    char list[] = "/radpipe/api-gateway";
    f->x.cfg.verify_sha256 = 1;
    f->x.cfg.trusted_sources = list;
    char real[3][65], *src = NULL, *u = NULL;
    long long size[3];
    const char *claim = "abababababababababababababababababababababababababababababababab";
    const char *source[3] = {"/radpipe/test", "/radpipe/api-gateway", "/radpipe/api-gateway"};
    for (int i = 0; i < 3; i++) {
        char key[64];
        snprintf(key, sizeof(key), "incoming/t/%d.dcm", i);
        if (asprintf(&src, "%s/%s", f->jpeg_dir, files[i]) < 0)
            abort();
        put_file(f, src, key, real[i], &size[i]);
        u = object_url(f, key);
        /* slice 2 claims a size its object does not have */
        add_event_from(f, source[i], STUDY, SERIES, sops[i], u, claim, size[i] + (i == 2), NULL);
        free(u);
        free(src);
    }
    run_ok(f);
    assert_int_equal(f->x.last.inserted, 3);
    const char *want[3] = {real[0], claim, real[2]};
    for (int i = 0; i < 3; i++) {
        char w[128];
        snprintf(w, sizeof(w), "%s|%lld", want[i], size[i]);
        assert_q(f, "SELECT concat_ws('|', sha256, size_bytes) FROM instances WHERE sop_uid = $1",
                 sops[i], w);
    }
}

static void test_poison_is_quarantined(void **state)
{
    fx *f = *state;
    char id_junk[129], id_out[129], id_missing[129], id_mismatch[129], sha[65];
    long long size = 0;
    char *u;

    add_slice(f, f->jpeg_dir, 0, "incoming/1.dcm", NULL);
    /* 1: an object that is not DICOM */
    assert_int_equal(lc_store_put_buf(f->store, "incoming/junk.dcm", "not dicom at all", 16, NULL),
                     LC_OK);
    lc_sha256_hex("not dicom at all", 16, sha);
    u = object_url(f, "incoming/junk.dcm");
    add_event(f, STUDY, SERIES, "1.2.3.4", u, sha, 16, id_junk);
    free(u);
    /* 2, 3: not an event; an event whose data has a field of the wrong type */
    add_raw(f, strdup("{not json"));
    add_raw(f, strdup("{\"specversion\":\"1.0\",\"id\":\"x1\",\"source\":\"/t\",\"type\":"
                      "\"radpipe.instance.stored\",\"data\":{\"study_instance_uid\":\"1.2\","
                      "\"series_instance_uid\":\"1.3\",\"sop_instance_uid\":\"1.4\",\"url\":"
                      "\"file:///x\",\"size\":\"big\",\"sha256\":\"00\"}}"));
    /* 4: an object outside the store */
    add_event(f, STUDY, SERIES, sops[1], "file:///etc/passwd", sha, 16, id_out);
    /* 5: an object that does not exist */
    u = object_url(f, "incoming/missing.dcm");
    add_event(f, STUDY, SERIES, sops[1], u, sha, 16, id_missing);
    free(u);
    /* 6: a real file announced with another instance's UID */
    {
        char *src = NULL;
        if (asprintf(&src, "%s/%s", f->jpeg_dir, files[2]) < 0)
            abort();
        put_file(f, src, "incoming/3.dcm", sha, &size);
        free(src);
        u = object_url(f, "incoming/3.dcm");
        add_event(f, STUDY, SERIES, sops[3], u, sha, size, id_mismatch);
        free(u);
    }
    add_slice(f, f->jpeg_dir, 3, "incoming/4.dcm", NULL);

    run_ok(f);
    assert_int_equal(f->x.last.inserted, 2);
    assert_int_equal(f->x.last.quarantined, 6);
    assert_int_equal(count_rows(f, "instances"), 2);
    assert_int_equal(q_ll(f, "SELECT count(*) FROM instances WHERE sop_uid = $1", sops[0]), 1);
    assert_int_equal(q_ll(f, "SELECT count(*) FROM instances WHERE sop_uid = $1", sops[3]), 1);
    assert_q(f, "SELECT concat_ws('|', num_instances, dirty) FROM studies WHERE study_uid = $1",
             STUDY, "2|t");

    PGresult *r = NULL;
    assert_int_equal(lc_db_exec(f->db,
                                "SELECT source, coalesce(store_key, ''), reason,"
                                " coalesce(event_id, '') FROM quarantine ORDER BY id",
                                0, NULL, &r, NULL),
                     LC_OK);
    assert_int_equal(PQntuples(r), 6);
    /* the bytes are kept under quarantine/ (key from the message's origin, so a redelivery
     * overwrites): the object when there is one, else the message itself; beside them a
     * JSON document with the reason */
    struct {
        long long offset;
        const char *from, *reason, *event_id; /* from: the object kept, NULL: the payload */
    } want[6] = {
        {101, "incoming/junk.dcm", "not a readable DICOM file", id_junk},
        {102, NULL, "invalid event: event is not valid JSON", ""},
        {103, NULL, "data.size is not an integer", ""},
        {104, NULL, "object outside the configured store", id_out},
        {105, NULL, "object not found", id_missing},
        {106, "incoming/3.dcm", "SOPInstanceUID differs from the event", id_mismatch},
    };
    for (int i = 0; i < 6; i++) {
        char src[128], hex[65], key[128];
        snprintf(src, sizeof(src), "kafka:" TOPIC "/0@%lld", want[i].offset);
        assert_string_equal(PQgetvalue(r, i, 0), src);
        lc_sha256_hex(src, strlen(src), hex);
        hex[32] = '\0';
        snprintf(key, sizeof(key), "quarantine/%s", hex);
        assert_string_equal(PQgetvalue(r, i, 1), key);
        if (!strstr(PQgetvalue(r, i, 2), want[i].reason))
            fail_msg("quarantine %d: reason \"%s\" lacks \"%s\"", i, PQgetvalue(r, i, 2),
                     want[i].reason);
        assert_string_equal(PQgetvalue(r, i, 3), want[i].event_id);
        void *kept = NULL, *orig = NULL;
        size_t klen = 0, olen = 0;
        assert_int_equal(lc_store_get_buf(f->store, key, 1 << 24, &kept, &klen, NULL), LC_OK);
        if (want[i].from) {
            assert_int_equal(lc_store_get_buf(f->store, want[i].from, 1 << 24, &orig, &olen, NULL),
                             LC_OK);
        } else {
            orig = strdup(f->payloads[i + 1]);
            olen = strlen(f->payloads[i + 1]);
        }
        assert_int_equal(klen, olen);
        assert_memory_equal(kept, orig, olen);
        free(kept);
        free(orig);
        char side[160];
        snprintf(side, sizeof(side), "%s.json", key);
        assert_int_equal(lc_store_get_buf(f->store, side, 1 << 20, &kept, &klen, NULL), LC_OK);
        cJSON *doc = cJSON_Parse(kept);
        assert_non_null(doc);
        assert_string_equal(cJSON_GetObjectItem(doc, "reason")->valuestring, PQgetvalue(r, i, 2));
        assert_string_equal(cJSON_GetObjectItem(doc, "origin")->valuestring, src);
        cJSON_Delete(doc);
        free(kept);
    }
    assert_true(lc_metric_value(f->x.m_parse_failures) == 1.0);

    /* one dead letter per quarantined message, with the original payload and the reason */
    PGresult *d = NULL;
    assert_int_equal(
        lc_db_exec(f->db, "SELECT key, payload FROM outbox ORDER BY id", 0, NULL, &d, NULL), LC_OK);
    assert_int_equal(PQntuples(d), 6);
    for (int i = 0; i < 6; i++) {
        lc_event *ev = NULL;
        lc_err err = {0};
        const char *p = PQgetvalue(d, i, 1);
        if (lc_event_parse(p, strlen(p), &ev, &err) != LC_OK)
            fail_msg("dlq event %d: %s", i, lc_err_msg(&err));
        assert_string_equal(ev->type, LC_EV_DLQ);
        assert_string_equal(PQgetvalue(d, i, 0), STUDY);
        cJSON *data = ev->data;
        assert_string_equal(cJSON_GetObjectItem(data, "topic")->valuestring, TOPIC);
        assert_int_equal(cJSON_GetObjectItem(data, "offset")->valuedouble, want[i].offset);
        assert_string_equal(cJSON_GetObjectItem(data, "service")->valuestring, "dicom-indexer");
        assert_string_equal(cJSON_GetObjectItem(data, "error")->valuestring, PQgetvalue(r, i, 2));
        assert_string_equal(cJSON_GetObjectItem(data, "payload")->valuestring, f->payloads[i + 1]);
        lc_event_free(ev);
    }
    PQclear(d);
    PQclear(r);
    assert_int_equal(outbox_count(f, "radpipe.dlq"), 6);
    /* the bad object stays where it is */
    lc_store_stat st;
    assert_int_equal(lc_store_head(f->store, "incoming/junk.dcm", &st, NULL), LC_OK);
    assert_true(lc_metric_value(f->x.m_quarantined) == 6.0);

    /* redelivered: events with an id were processed; only the two without one come again */
    run_ok(f);
    assert_int_equal(f->x.last.quarantined, 2);
    assert_int_equal(count_rows(f, "quarantine"), 8);
    assert_int_equal(outbox_count(f, "radpipe.dlq"), 8);
    assert_int_equal(count_rows(f, "instances"), 2);
}

static void test_failed_transaction_leaves_nothing(void **state)
{
    fx *f = *state;
    add_slice(f, f->jpeg_dir, 0, "incoming/1.dcm", NULL);
    add_raw(f, strdup("{not json"));
    add_slice(f, f->jpeg_dir, 1, "incoming/2.dcm", NULL);
    exec_ok(f, "ALTER TABLE instances RENAME TO instances_away");
    assert_int_not_equal(run_batch(f), LC_OK);
    exec_ok(f, "ALTER TABLE instances_away RENAME TO instances");
    assert_int_equal(count_rows(f, "studies"), 0);
    assert_int_equal(count_rows(f, "processed_events"), 0);
    assert_int_equal(count_rows(f, "quarantine"), 0);
    assert_int_equal(count_rows(f, "outbox"), 0);
    /* redelivery succeeds */
    run_ok(f);
    assert_int_equal(f->x.last.inserted, 2);
    assert_int_equal(f->x.last.quarantined, 1);
    assert_int_equal(count_rows(f, "instances"), 2);
}

/* The nth study.completed event of the outbox (0-based), parsed; caller frees. */
static lc_event *completed_event(fx *f, int nth)
{
    PGresult *r = NULL;
    lc_event *ev = NULL;
    lc_err err = {0};
    assert_int_equal(lc_db_exec(f->db,
                                "SELECT key, payload FROM outbox WHERE topic ="
                                " 'radpipe.study.completed' ORDER BY id",
                                0, NULL, &r, NULL),
                     LC_OK);
    assert_true(PQntuples(r) > nth);
    const char *p = PQgetvalue(r, nth, 1);
    if (lc_event_parse(p, strlen(p), &ev, &err) != LC_OK)
        fail_msg("study.completed: %s", lc_err_msg(&err));
    assert_string_equal(PQgetvalue(r, nth, 0), STUDY);
    PQclear(r);
    assert_string_equal(ev->type, LC_EV_STUDY_COMPLETED);
    assert_string_equal(ev->subject, STUDY);
    assert_string_equal(ev->source, "/radpipe/dicom-indexer");
    return ev;
}

static void check_completed(const lc_event *ev, int version, int ninst)
{
    const cJSON *d = ev->data;
    assert_string_equal(cJSON_GetObjectItem(d, "study_instance_uid")->valuestring, STUDY);
    assert_int_equal(cJSON_GetObjectItem(d, "version")->valuedouble, version);
    assert_int_equal(cJSON_IsTrue(cJSON_GetObjectItem(d, "amended")), version > 1);
    assert_int_equal(cJSON_GetObjectItem(d, "num_series")->valuedouble, 1);
    assert_int_equal(cJSON_GetObjectItem(d, "num_instances")->valuedouble, ninst);
    assert_string_equal(cJSON_GetObjectItem(d, "reason")->valuestring, "quiet");
    const cJSON *s = cJSON_GetObjectItem(d, "series");
    assert_int_equal(cJSON_GetArraySize(s), 1);
    const cJSON *s0 = cJSON_GetArrayItem(s, 0);
    assert_string_equal(cJSON_GetObjectItem(s0, "series_instance_uid")->valuestring, SERIES);
    assert_string_equal(cJSON_GetObjectItem(s0, "modality")->valuestring, "MR");
    assert_int_equal(cJSON_GetObjectItem(s0, "num_instances")->valuedouble, ninst);
}

static int complete(fx *f)
{
    int n = -1;
    lc_err err = {0};
    if (idx_complete_run(&f->x, &n, &err) != LC_OK)
        fail_msg("complete: %s", lc_err_msg(&err));
    return n;
}

static void test_completion(void **state)
{
    fx *f = *state;
    index_slices(f, 0, 3);
    assert_int_equal(complete(f), 1);
    assert_int_equal(outbox_count(f, "radpipe.study.completed"), 1);
    lc_event *ev = completed_event(f, 0);
    check_completed(ev, 1, 3);
    lc_event_free(ev);
    assert_q(f,
             "SELECT string_agg(concat_ws('|', kind, state, dedupe_key, max_attempts, params,"
             " study_uid), ';' ORDER BY kind) FROM jobs",
             NULL,
             "segment|queued|" STUDY ":v1:segment|5|{}|" STUDY ";upload|queued|" STUDY
             ":v1:upload|5|{}|" STUDY);
    assert_int_equal(outbox_count(f, "radpipe.job.upload"), 1);
    assert_int_equal(outbox_count(f, "radpipe.job.segment"), 1);
    assert_q(f,
             "SELECT concat_ws('|', dirty, completed_version, completed_at IS NOT NULL)"
             " FROM studies WHERE study_uid = $1",
             STUDY, "f|1|t");
    assert_true(lc_metric_value(f->x.m_completed) == 1.0);

    /* nothing is dirty: a second pass creates nothing */
    long long outbox = count_rows(f, "outbox");
    assert_int_equal(complete(f), 0);
    assert_int_equal(count_rows(f, "outbox"), outbox);
    assert_int_equal(count_rows(f, "jobs"), 2);

    /* a duplicate instance does not reopen the study */
    add_slice(f, f->jpeg_dir, 0, "incoming/again.dcm", NULL);
    run_ok(f);
    clear_msgs(f);
    assert_int_equal(complete(f), 0);

    /* a new instance afterwards: version 2, amended, new jobs under v2 keys */
    index_slices(f, 3, 4);
    assert_q(f, "SELECT dirty FROM studies WHERE study_uid = $1", STUDY, "t");
    assert_int_equal(complete(f), 1);
    assert_int_equal(outbox_count(f, "radpipe.study.completed"), 2);
    ev = completed_event(f, 1);
    check_completed(ev, 2, 4);
    lc_event_free(ev);
    assert_int_equal(count_rows(f, "jobs"), 4);
    assert_int_equal(q_ll(f, "SELECT count(*) FROM jobs WHERE dedupe_key LIKE $1", "%:v2:%"), 2);
    assert_int_equal(outbox_count(f, "radpipe.job.upload"), 2);
    assert_int_equal(outbox_count(f, "radpipe.job.segment"), 2);
    assert_q(f, "SELECT completed_version FROM studies WHERE study_uid = $1", STUDY, "2");
    assert_int_equal(complete(f), 0);
}

static void test_completion_waits_for_quiet(void **state)
{
    fx *f = *state;
    f->x.cfg.quiet_seconds = 3600;
    index_slices(f, 0, 4);
    assert_int_equal(complete(f), 0);
    assert_q(f, "SELECT dirty FROM studies WHERE study_uid = $1", STUDY, "t");
    exec_ok(f, "UPDATE studies SET last_instance_at = now() - interval '61 minutes'");
    assert_int_equal(complete(f), 1);
    assert_int_equal(count_rows(f, "jobs"), 2);
}

static void test_tick_runs_about_every_second(void **state)
{
    fx *f = *state;
    index_slices(f, 0, 3);
    int64_t t0 = lc_now_ms();
    idx_tick(&f->x); /* the first tick runs at once */
    assert_q(f, "SELECT completed_version FROM studies WHERE study_uid = $1", STUDY, "1");
    assert_true(f->x.next_complete_ms >= t0 + 1000 && f->x.next_complete_ms <= lc_now_ms() + 1000);
    index_slices(f, 3, 4);
    f->x.next_complete_ms = lc_now_ms() + 60000;
    idx_tick(&f->x); /* not due: does nothing */
    assert_q(f, "SELECT concat_ws('|', dirty, completed_version) FROM studies", NULL, "t|1");
    f->x.next_complete_ms = lc_now_ms();
    idx_tick(&f->x);
    assert_q(f, "SELECT concat_ws('|', dirty, completed_version) FROM studies", NULL, "f|2");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_table),
        cmocka_unit_test(test_utf8_fix),
        cmocka_unit_test(test_source_trusted),
        cmocka_unit_test_setup_teardown(test_trusted_source_hash, setup, teardown),
        cmocka_unit_test_setup_teardown(test_index_series, setup, teardown),
        cmocka_unit_test_setup_teardown(test_replace_changed_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_batch_cost_is_independent_of_archive_size, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_poison_is_quarantined, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_transaction_leaves_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_completion, setup, teardown),
        cmocka_unit_test_setup_teardown(test_completion_waits_for_quiet, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tick_runs_about_every_second, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
