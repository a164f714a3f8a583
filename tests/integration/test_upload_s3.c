/*
 * test_upload_s3.c: the storage-uploader binary, through its job loop, against s3rver (npm,
 * loopback), PostgreSQL and the dev broker (radpipe-stack --no-services); the test starts,
 * kills and restarts the uploader and s3rver itself and counts what reached s3rver in its
 * request log:
 *  - SIGKILL in the middle of a multipart upload, then a new uploader: the job succeeds on
 *    its second attempt by resuming the same upload, no part that s3rver had acknowledged is
 *    sent again, no incomplete multipart upload is left, and the archive downloaded with
 *    awscli holds the indexed bytes;
 *  - s3rver killed for 20 s in the middle of an upload and started again on the same port and
 *    data: the job waits, retries and succeeds in the same attempt, every object in place
 *    once and byte-identical.
 */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <curl/curl.h>
#include "lc/db.h"
#include "lc/jobs.h"
#include "lc/log.h"
#include "lc/store.h"
#include "lc/util.h"
#include "ts.h"
#include "ts_index.h"
#include "ts_proc.h"
#include "ts_s3.h"

#define STUDY_KILL   "1.2.826.0.1.3680043.9.7801"
#define STUDY_OUTAGE "1.2.826.0.1.3680043.9.7802"
#define OUTAGE_S     20

static ts_stack st;
static ts_s3 s3;
static lc_db *db;
static lc_store *store;

static char *xfmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xfmt(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    if (vasprintf(&s, fmt, ap) < 0)
        abort();
    va_end(ap);
    return s;
}

/* Settings every uploader of this test gets: short leases, a fast reconciler, quick
 * consumer-group turnover, the archive on s3rver (endpoint and keys: ts_s3_start set them in
 * this process's environment, which the children inherit). */
static const char *const base_env[] = {"RADPIPE_JOB_LEASE_SECONDS=3",
                                       "RADPIPE_RECONCILE_INTERVAL_SECONDS=1",
                                       "RADPIPE_REPUBLISH_AFTER_SECONDS=5",
                                       "RADPIPE_KAFKA_OPTIONS=session.timeout.ms=6000",
                                       "RADPIPE_DRAIN_SECONDS=1",
                                       "RADPIPE_ARCHIVE_URL=s3://archive/radpipe",
                                       "RADPIPE_S3_PART_SIZE=5M",
                                       "RADPIPE_S3_MULTIPART_THRESHOLD=5M",
                                       NULL};

static pid_t start_uploader(int admin_port, const char *const extra[])
{
    const char *env[32];
    int n = 0;
    for (const char *const *e = base_env; *e; e++)
        env[n++] = *e;
    for (const char *const *e = extra; e && *e; e++)
        env[n++] = *e; /* later entries win: putenv replaces */
    env[n] = NULL;
    char **full = ts_service_env(&st, admin_port, env);
    char *bin = ts_bin("storage-uploader");
    char *argv[] = {bin, NULL};
    pid_t pid = ts_spawn(argv, (const char *const *)full, st.log);
    free(bin);
    ts_env_free(full);
    assert_true(pid > 0);
    return pid;
}

static void stop_clean(pid_t pid)
{
    kill(pid, SIGTERM);
    int status = ts_wait(pid, 30000);
    if (status == -1) {
        ts_kill(pid);
        ts_stack_dump_log(&st);
        fail_msg("storage-uploader did not exit within 30 s of SIGTERM");
    }
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

static char *scalar(const char *sql, const char *param)
{
    char *v = ts_db_value(db, sql, param);
    if (!v)
        fail_msg("%s failed", sql);
    return v;
}

static void expect_sql(const char *sql, const char *param, const char *want, int timeout_s)
{
    if (!ts_db_wait_value(db, sql, param, want, timeout_s * 1000)) {
        char got[256];
        char *v = scalar(sql, param);
        lc_strlcpy(got, v, sizeof(got));
        free(v);
        ts_stack_dump_log(&st);
        fail_msg("%s [%s]: got \"%s\", expected \"%s\" within %d s", sql, param ? param : "", got,
                 want, timeout_s);
    }
}

static void fill(void *buf, size_t len, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    unsigned char *p = buf;
    for (size_t i = 0; i < len; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(p + i, &x, len - i < 8 ? len - i : 8);
    }
}

static void sql(const char *q, int n, const char *const *p)
{
    lc_err e = {0};
    if (lc_db_exec(db, q, n, p, NULL, &e) != LC_OK)
        fail_msg("%s: %s", q, e.msg);
}

/* A study of one series with n instances of size bytes, put straight into the object store
 * and the index (the uploader never parses the bytes). */
static void synthetic_study(const char *study, int n, size_t size)
{
    lc_err e = {0};
    char *buf = malloc(size), series[65];
    const char *p1[1] = {study};
    snprintf(series, sizeof(series), "%s.1", study);
    const char *p2[2] = {series, study};
    sql("INSERT INTO studies (study_uid, patient_id, modalities) VALUES ($1, 'SYN', '{CT}')", 1,
        p1);
    sql("INSERT INTO series (series_uid, study_uid, modality) VALUES ($1, $2, 'CT')", 2, p2);
    for (int i = 0; i < n; i++) {
        char sop[65], key[200], sha[65], sz[24], num[16];
        snprintf(sop, sizeof(sop), "%s.%d", series, i + 1);
        snprintf(key, sizeof(key), "instances/%s/%s/%s.dcm", study, series, sop);
        snprintf(num, sizeof(num), "%d", i + 1);
        fill(buf, size, (uint64_t)(i + 1) * 7919 + strlen(study));
        lc_sha256_hex(buf, size, sha);
        assert_int_equal(lc_store_put_buf(store, key, buf, size, &e), LC_OK);
        snprintf(sz, sizeof(sz), "%zu", size);
        const char *p3[7] = {sop, series, study, key, sz, sha, num};
        sql("INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, store_key, "
            "size_bytes, sha256, instance_number) VALUES ($1, $2, $3, "
            "'1.2.840.10008.5.1.4.1.1.2', $4, $5, $6, $7)",
            7, p3);
    }
    free(buf);
}

static void create_job(const char *study, const char *params_json, char id[37])
{
    lc_err e;
    int created = 0;
    cJSON *params = params_json ? cJSON_Parse(params_json) : NULL;
    assert_int_equal(lc_job_create(db, "radpipe.", "/radpipe/test", "upload", study, params, NULL,
                                   5, id, &created, &e),
                     LC_OK);
    cJSON_Delete(params);
    assert_int_equal(created, 1);
}

static int log_count(const char *a, const char *b, const char *c)
{
    return ts_s3_log_count(&s3, (const char *const[]){a, b, c, NULL});
}

/* Wait until s3rver logged at least n requests matching a and b (up to timeout_s). */
static void wait_log(const char *a, const char *b, int n, int timeout_s)
{
    for (int i = 0; i < timeout_s * 50; i++) {
        if (log_count(a, b, NULL) >= n)
            return;
        usleep(20 * 1000);
    }
    ts_stack_dump_log(&st);
    fail_msg("s3rver did not log %d requests with %s and %s within %d s", n, a, b, timeout_s);
}

/* The index's SHA-256 of an instance. */
static char *index_sha(const char *sop)
{
    return scalar("SELECT sha256 FROM instances WHERE sop_uid = $1", sop);
}

/* Every member of a tar file must be its instance's indexed bytes; returns the members. */
static int check_tar(const char *path)
{
    size_t len = 0;
    char *t = ts_read_file(path, &len);
    int members = 0;
    assert_non_null(t);
    for (size_t off = 0; off + 512 <= len && t[off];) {
        char name[300], hex[65];
        snprintf(name, sizeof(name), "%.100s", t + off); /* [<series>/]<sop>.dcm */
        size_t size = strtoul(t + off + 124, NULL, 8);
        assert_true(off + 512 + size <= len && strlen(name) > 4);
        lc_sha256_hex(t + off + 512, size, hex);
        name[strlen(name) - 4] = '\0';
        char *want = index_sha(strrchr(name, '/') ? strrchr(name, '/') + 1 : name);
        assert_string_equal(hex, want);
        free(want);
        members++;
        off += 512 + (size + 511) / 512 * 512;
    }
    free(t);
    return members;
}

static int setup(void **state)
{
    (void)state;
    static const char *const args[] = {"--no-services", NULL};
    lc_err e;
    lc_log_init("test_upload_s3", LC_LOG_WARN);
    if (ts_stack_start(&st, args, NULL, 120000) != 0)
        fail_msg("the stack did not start");
    assert_int_equal(lc_db_connect(st.database_url, 30000, NULL, &db, &e), LC_OK);
    assert_int_equal(lc_db_migrate(db, &e), LC_OK);
    char *url = xfmt("file://%s/objects", st.var);
    assert_int_equal(lc_store_open(url, &store, &e), LC_OK);
    free(url);
    /* every part upload is held 300 ms, so a kill lands between parts */
    if (ts_s3_start(&s3, "archive", "--part-delay-ms 300") != 0)
        fail_msg("s3rver did not start");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    lc_store_free(store);
    lc_db_free(db);
    ts_s3_free(&s3);
    int status = ts_stack_stop(&st, SIGTERM, 60000);
    assert_true(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ts_stack_free(&st);
    return 0;
}

static void test_sigkill_mid_multipart_resumes(void **state)
{
    (void)state;
    char id[37];
    /* a 32 MiB tar: 7 parts of 5 MiB, two in flight at a time */
    static const char *const env[] = {"RADPIPE_S3_CONCURRENCY=2", NULL};
    synthetic_study(STUDY_KILL, 8, 4 << 20);
    pid_t a = start_uploader(0, env);
    create_job(STUDY_KILL, "{\"layout\": \"study-tar\"}", id);
    wait_log("partNumber=", "\"status\":200", 3, 120);
    kill(a, SIGKILL);
    waitpid(a, NULL, 0);
    /* it died in the middle: the upload is open, recorded, and the object not there yet */
    int acked = log_count("partNumber=", "\"status\":200", NULL);
    fprintf(stderr, "killed the uploader after %d acknowledged parts\n", acked);
    assert_true(acked < 7);
    assert_int_equal(ts_s3_incomplete_uploads(&s3, "archive"), 1);
    char *v = scalar("SELECT count(*) FROM upload_multipart", NULL);
    assert_string_equal(v, "1");
    free(v);
    assert_int_equal(log_count("\"m\":\"POST\"", "uploadId=", NULL), 0); /* no Complete yet */

    /* a new uploader: the reconciler re-queues the job once its lease (3 s) ran out */
    pid_t b = start_uploader(0, env);
    expect_sql("SELECT state FROM jobs WHERE id = $1", id, "succeeded", 120);
    v = scalar("SELECT attempts FROM jobs WHERE id = $1", id);
    assert_string_equal(v, "2");
    free(v);
    stop_clean(b);

    /* the same upload went on: one CreateMultipartUpload, and every part acknowledged exactly
     * once, so none that had been acknowledged before the kill was sent again */
    assert_int_equal(log_count("\"m\":\"POST\"", "\"q\":\"uploads=", NULL), 1);
    for (int n = 1; n <= 7; n++) {
        char q[32];
        snprintf(q, sizeof(q), "\"q\":\"partNumber=%d&", n);
        int ok = log_count(q, "\"m\":\"PUT\"", "\"status\":200");
        if (ok != 1)
            fail_msg("part %d was acknowledged %d times", n, ok);
    }
    assert_int_equal(log_count("partNumber=8&", NULL, NULL), 0);
    /* nothing left open, on the store or in the database */
    assert_int_equal(ts_s3_incomplete_uploads(&s3, "archive"), 0);
    v = scalar("SELECT count(*) FROM upload_multipart", NULL);
    assert_string_equal(v, "0");
    free(v);

    /* awscli downloads the indexed bytes */
    char *tmp = ts_tmpdir("uplkill"), *dst = xfmt("%s/s.tar", tmp);
    char *args = xfmt("s3 cp --only-show-errors 's3://archive/radpipe/%s/%s.tar' '%s'", STUDY_KILL,
                      STUDY_KILL, dst);
    assert_int_equal(ts_s3_aws(&s3, args, NULL), 0);
    assert_int_equal(check_tar(dst), 8);
    ts_rmrf(tmp);
    free(tmp);
    free(dst);
    free(args);
}

/* The uploader's radpipe_upload_retries_total for the archive, from its /metrics. */
static long retries_metric(int admin_port)
{
    char *url = xfmt("http://127.0.0.1:%d/metrics", admin_port), *body = NULL;
    long n = -1;
    if (ts_http("GET", url, NULL, NULL, NULL, 0, &body, NULL) == 200) {
        const char *m =
            strstr(body, "radpipe_upload_retries_total{store=\"s3://archive/radpipe\"} ");
        if (m)
            n = strtol(strchr(m, '}') + 2, NULL, 10);
    }
    free(body);
    free(url);
    return n;
}

static void test_s3_outage_waited_out(void **state)
{
    (void)state;
    char id[37];
    int admin = ts_free_port();
    /* 48 objects of 512 KiB at 2 MiB/s: about 12 s of uploading to cut into */
    char *listen = xfmt("RADPIPE_ADMIN_LISTEN=127.0.0.1:%d", admin);
    const char *env[] = {"RADPIPE_UPLOAD_RATE_LIMIT=2M", listen, NULL};
    synthetic_study(STUDY_OUTAGE, 48, 512 << 10);
    pid_t u = start_uploader(-1, env);
    create_job(STUDY_OUTAGE, NULL, id);
    char want[32];
    snprintf(want, sizeof(want), "/%s.1.", STUDY_OUTAGE);
    wait_log(want, "\"status\":200", 8, 120);

    /* s3rver goes away (its connections break, new ones are refused) for 20 s */
    int64_t t0 = lc_now_ms();
    ts_s3_kill(&s3);
    int before = log_count(want, "\"m\":\"PUT\"", "\"status\":200");
    assert_true(before < 48);
    sleep(OUTAGE_S);
    char *v = scalar("SELECT state FROM jobs WHERE id = $1", id);
    assert_string_equal(v, "running"); /* still waiting, not failed */
    free(v);
    assert_int_equal(ts_s3_restart(&s3, "archive", NULL), 0);
    int64_t down_ms = lc_now_ms() - t0;
    fprintf(stderr, "s3rver was down for %.1f s with %d of 48 objects stored\n",
            (double)down_ms / 1000, before);

    expect_sql("SELECT state FROM jobs WHERE id = $1", id, "succeeded", 120);
    v = scalar("SELECT attempts FROM jobs WHERE id = $1", id);
    /* the requests' own retries (at least 32 s of backoff) outlast the outage; only a
     * restart of s3rver slowed past that by a loaded machine may need the job's retry */
    if (down_ms < 30000)
        assert_string_equal(v, "1");
    else
        assert_true(strcmp(v, "1") == 0 || strcmp(v, "2") == 0);
    free(v);
    long retries = retries_metric(admin);
    fprintf(stderr, "requests retried: %ld\n", retries);
    assert_true(retries > 0);
    stop_clean(u);
    free(listen);

    /* every object once, byte-identical (awscli), plus the manifest */
    char *tmp = ts_tmpdir("upldown"), *out = NULL;
    char *args = xfmt("s3 cp --only-show-errors --recursive 's3://archive/radpipe/%s/' '%s'",
                      STUDY_OUTAGE, tmp);
    assert_int_equal(ts_s3_aws(&s3, args, NULL), 0);
    free(args);
    args = xfmt("s3 ls --recursive 's3://archive/radpipe/%s/'", STUDY_OUTAGE);
    assert_int_equal(ts_s3_aws(&s3, args, &out), 0);
    int lines = 0;
    for (char *c = out; *c; c++)
        lines += *c == '\n';
    assert_int_equal(lines, 49);
    free(out);
    free(args);
    for (int i = 1; i <= 48; i++) {
        char sop[80], hex[65];
        lc_err e;
        snprintf(sop, sizeof(sop), "%s.1.%d", STUDY_OUTAGE, i);
        char *path = xfmt("%s/%s.1/%s.dcm", tmp, STUDY_OUTAGE, sop), *want_sha = index_sha(sop);
        assert_int_equal(lc_sha256_file_hex(path, hex, NULL, &e), LC_OK);
        assert_string_equal(hex, want_sha);
        free(want_sha);
        free(path);
    }
    ts_rmrf(tmp);
    free(tmp);
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sigkill_mid_multipart_resumes),
        cmocka_unit_test(test_s3_outage_waited_out),
    };
    int rc = cmocka_run_group_tests(tests, setup, teardown);
    curl_global_cleanup();
    return rc;
}
