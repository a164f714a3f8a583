/*
 * test_drain.c: shutdown and crash behaviour of every service on real components
 * (radpipe-stack --no-services gives PostgreSQL and the dev broker; the test starts each
 * service itself so it can signal it and read its exit status):
 *  - a worker SIGKILLed in the middle of a job: its lease expires, the reconciler of another
 *    worker re-queues the job and it finishes (attempt 2);
 *  - SIGTERM to a busy uploader: it releases the job when its drain time is over, exits 0,
 *    and the next worker finishes the job;
 *  - SIGTERM to a busy segmenter: it finishes the job within its drain time and exits 0;
 *  - SIGTERM to the indexer while instances arrive: exit 0, and after a restart every
 *    instance is indexed exactly once;
 *  - SIGTERM to the gateway in the middle of an upload: exit 0, and the store holds either
 *    the whole object or nothing.
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <curl/curl.h>
#include "lc/db.h"
#include "lc/dicom.h"
#include "lc/jobs.h"
#include "lc/log.h"
#include "lc/util.h"
#include "ts.h"
#include "ts_index.h"
#include "ts_proc.h"

#define STUDY    "1.2.826.0.1.3680043.9.7001"
#define SERIES_A STUDY ".1"
#define SERIES_B STUDY ".2"
#define SERIES_C STUDY ".3"
#define NA       60
#define NB       40

static ts_stack st;
static lc_db *db;
static pid_t gateway, indexer;
static char *dir_a, *dir_b, *dir_c;

/* Shared settings: short leases, a fast reconciler, quick consumer-group turnover. */
static const char *const worker_env[] = {
    "RADPIPE_JOB_LEASE_SECONDS=3",       "RADPIPE_RECONCILE_INTERVAL_SECONDS=1",
    "RADPIPE_REPUBLISH_AFTER_SECONDS=5", "RADPIPE_KAFKA_OPTIONS=session.timeout.ms=6000",
    "RADPIPE_DRAIN_SECONDS=1",           NULL};

static pid_t start(const char *name, int admin_port, const char *const extra[])
{
    const char *env[32];
    int n = 0;
    for (const char *const *e = worker_env; *e; e++)
        env[n++] = *e;
    for (const char *const *e = extra; e && *e; e++)
        env[n++] = *e; /* later entries win: putenv replaces */
    env[n] = NULL;
    char **full = ts_service_env(&st, admin_port, env);
    char *bin = ts_bin(name);
    char *argv[] = {bin, NULL};
    pid_t pid = ts_spawn(argv, (const char *const *)full, st.log);
    free(bin);
    /* the child copied what it needs; the strings must outlive putenv only in the child */
    ts_env_free(full);
    assert_true(pid > 0);
    return pid;
}

/* SIGTERM and expect a clean exit 0 within timeout_ms. */
static void stop_clean(pid_t pid, const char *what, int timeout_ms)
{
    kill(pid, SIGTERM);
    int status = ts_wait(pid, timeout_ms);
    if (status == -1) {
        ts_kill(pid);
        ts_stack_dump_log(&st);
        fail_msg("%s did not exit within %d ms of SIGTERM", what, timeout_ms);
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        ts_stack_dump_log(&st);
        fail_msg("%s exited with status 0x%x after SIGTERM", what, status);
    }
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

static void create_job(const char *kind, char id[37])
{
    lc_err e;
    int created = 0;
    assert_int_equal(lc_db_begin(db, &e), LC_OK);
    assert_int_equal(lc_job_create(db, "radpipe.", "/radpipe/test", kind, STUDY, NULL, NULL, 5, id,
                                   &created, &e),
                     LC_OK);
    assert_int_equal(lc_db_commit(db, &e), LC_OK);
    assert_int_equal(created, 1);
}

static void post_dir(const char *dir)
{
    char **files = ts_list_files(dir);
    char url[256];
    snprintf(url, sizeof(url), "%s/api/v1/instances", st.http_url);
    for (char **f = files; *f; f++) {
        size_t len = 0;
        char *data = ts_read_file(*f, &len), *body = NULL;
        long code = ts_http("POST", url, st.token, "application/dicom", data, len, &body, NULL);
        if (code != 202)
            fail_msg("POST %s: %ld %s", *f, code, body ? body : "");
        free(body);
        free(data);
    }
    ts_strv_free(files);
}

static int setup(void **state)
{
    (void)state;
    static const char *const args[] = {"--no-services", NULL};
    lc_err e;
    lc_log_init("test_drain", LC_LOG_WARN);
    if (ts_stack_start(&st, args, NULL, 120000) != 0)
        fail_msg("the stack did not start");
    assert_int_equal(lc_db_connect(st.database_url, 30000, NULL, &db, &e), LC_OK);
    assert_int_equal(lc_db_migrate(db, &e), LC_OK);

    /* three synthetic series of one study, made from a real MR slice */
    char *series = ts_test_series();
    char **files = ts_list_files(series);
    if (asprintf(&dir_a, "%s/a", st.var) < 0 || asprintf(&dir_b, "%s/b", st.var) < 0 ||
        asprintf(&dir_c, "%s/c", st.var) < 0)
        abort();
    mkdir(dir_a, 0755);
    mkdir(dir_b, 0755);
    mkdir(dir_c, 0755);
    assert_int_equal(ts_make_series(files[0], NA, dir_a, STUDY, SERIES_A), 0);
    assert_int_equal(ts_make_series(files[0], NB, dir_b, STUDY, SERIES_B), 0);
    assert_int_equal(ts_make_series(files[0], 1, dir_c, STUDY, SERIES_C), 0);
    ts_strv_free(files);
    free(series);

    static const char *const gw_env[] = {NULL};
    static const char *const idx_env[] = {"RADPIPE_STUDY_QUIET_SECONDS=86400", NULL};
    gateway = start("api-gateway", -1, gw_env);
    indexer = start("dicom-indexer", 0, idx_env);
    char url[256], *body = NULL;
    snprintf(url, sizeof(url), "%s/healthz", st.http_url);
    for (int i = 0; i < 600 && ts_http("GET", url, NULL, NULL, NULL, 0, NULL, NULL) != 200; i++)
        usleep(100 * 1000);
    free(body);
    post_dir(dir_a);
    char want[16];
    snprintf(want, sizeof(want), "%d", NA);
    expect_sql("SELECT count(*) FROM instances WHERE series_uid = $1", SERIES_A, want, 120);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (gateway > 0)
        stop_clean(gateway, "api-gateway", 30000);
    if (indexer > 0)
        stop_clean(indexer, "dicom-indexer", 30000);
    lc_db_free(db);
    int status = ts_stack_stop(&st, SIGTERM, 60000);
    assert_true(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ts_stack_free(&st);
    free(dir_a);
    free(dir_b);
    free(dir_c);
    return 0;
}

static void test_sigkilled_worker_job_is_requeued(void **state)
{
    (void)state;
    char id[37];
    static const char *const slow[] = {"RADPIPE_UPLOAD_RATE_LIMIT=50K", NULL};
    static const char *const fast[] = {NULL};
    pid_t a = start("storage-uploader", 0, slow);
    create_job("upload", id);
    expect_sql("SELECT state FROM jobs WHERE id = $1", id, "running", 60);
    kill(a, SIGKILL);
    waitpid(a, NULL, 0);
    /* the lease (3 s) runs out; the next worker's reconciler re-queues the job */
    pid_t b = start("storage-uploader", 0, fast);
    expect_sql("SELECT state FROM jobs WHERE id = $1", id, "succeeded", 120);
    char *att = scalar("SELECT attempts FROM jobs WHERE id = $1", id);
    assert_string_equal(att, "2");
    free(att);
    /* every instance of the study is in the archive, whole */
    char path[1024], sha[65];
    lc_err e;
    snprintf(path, sizeof(path), "%s/archive/%s/%s/%s.%d.dcm", st.var, STUDY, SERIES_A, SERIES_A,
             NA);
    assert_int_equal(lc_sha256_file_hex(path, sha, NULL, &e), LC_OK);
    stop_clean(b, "storage-uploader", 30000);
}

static void test_sigterm_busy_uploader_releases_job(void **state)
{
    (void)state;
    char id[37];
    static const char *const slow[] = {"RADPIPE_UPLOAD_RATE_LIMIT=50K", NULL};
    static const char *const fast[] = {NULL};
    pid_t c = start("storage-uploader", 0, slow);
    create_job("upload", id);
    expect_sql("SELECT state FROM jobs WHERE id = $1", id, "running", 60);
    stop_clean(c, "busy storage-uploader", 30000);
    /* released, not lost, and the attempt does not count */
    char *s = scalar("SELECT state || ':' || attempts FROM jobs WHERE id = $1", id);
    assert_string_equal(s, "queued:0");
    free(s);
    pid_t d = start("storage-uploader", 0, fast);
    expect_sql("SELECT state FROM jobs WHERE id = $1", id, "succeeded", 120);
    stop_clean(d, "storage-uploader", 30000);
}

static void test_sigterm_busy_segmenter_finishes_job(void **state)
{
    (void)state;
    char id[37];
    /* a drain time long enough to finish the job in flight */
    static const char *const env[] = {"RADPIPE_SEG_THREADS=1", "RADPIPE_DRAIN_SECONDS=60",
                                      "RADPIPE_GPU_BACKEND=cpu", NULL};
    pid_t s = start("gpu-segmenter", 0, env);
    create_job("segment", id);
    expect_sql("SELECT state FROM jobs WHERE id = $1", id, "running", 60);
    stop_clean(s, "busy gpu-segmenter", 90000);
    char *v = scalar("SELECT state FROM jobs WHERE id = $1", id);
    assert_string_equal(v, "succeeded");
    free(v);
    v = scalar("SELECT string_agg(name, ',' ORDER BY name) FROM job_artifacts WHERE job_id = $1",
               id);
    assert_string_equal(v, "mask.nii.gz,preview.png,segmentation.dcm");
    free(v);
}

static void test_sigterm_indexer_loses_nothing(void **state)
{
    (void)state;
    static const char *const idx_env[] = {"RADPIPE_STUDY_QUIET_SECONDS=86400", NULL};
    post_dir(dir_b);
    /* stop it while the series is arriving: whatever was consumed is committed, the rest
     * waits in Kafka */
    stop_clean(indexer, "dicom-indexer", 30000);
    indexer = start("dicom-indexer", 0, idx_env);
    char want[16];
    snprintf(want, sizeof(want), "%d", NB);
    expect_sql("SELECT count(*) FROM instances WHERE series_uid = $1", SERIES_B, want, 120);
    expect_sql("SELECT num_instances FROM series WHERE series_uid = $1", SERIES_B, want, 30);
    /* exactly once: one processed event per instance.stored of this series */
    char *v = scalar("SELECT count(*) FROM instances WHERE series_uid = $1 AND replaced_count > 0",
                     SERIES_B);
    assert_string_equal(v, "0");
    free(v);
}

typedef struct slow_post {
    const char *file;
    long code;
} slow_post;

static size_t discard(char *p, size_t s, size_t n, void *u)
{
    (void)p;
    (void)u;
    return s * n;
}

static void *slow_post_main(void *arg)
{
    slow_post *sp = arg;
    size_t len = 0;
    char *data = ts_read_file(sp->file, &len), url[256], auth[256];
    snprintf(url, sizeof(url), "%s/api/v1/instances", st.http_url);
    snprintf(auth, sizeof(auth), "Authorization: Bearer %s", st.token);
    CURL *c = curl_easy_init();
    struct curl_slist *h = curl_slist_append(NULL, auth);
    h = curl_slist_append(h, "Content-Type: application/dicom");
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, data);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    curl_easy_setopt(c, CURLOPT_MAX_SEND_SPEED_LARGE, (curl_off_t)(len / 4)); /* ~4 s */
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 60L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    sp->code = curl_easy_perform(c) == CURLE_OK ? 0 : -1;
    if (sp->code == 0)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &sp->code);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    free(data);
    return NULL;
}

static void test_sigterm_gateway_mid_upload(void **state)
{
    (void)state;
    char **files = ts_list_files(dir_c);
    slow_post sp = {files[0], 0};
    pthread_t t;
    pthread_create(&t, NULL, slow_post_main, &sp);
    sleep(1); /* the body is a quarter through */
    stop_clean(gateway, "api-gateway (request in flight)", 30000);
    gateway = 0;
    pthread_join(t, NULL);
    /* the client got an answer or a closed connection, never a hang; the store has the
     * whole object or nothing, and the spool holds no leftovers */
    lc_dicom_header *hd = NULL;
    lc_err e;
    assert_int_equal(lc_dicom_read_header(files[0], &hd, &e), LC_OK);
    char path[1024], a[65], b[65];
    snprintf(path, sizeof(path), "%s/objects/instances/%s/%s/%s.dcm", st.var,
             hd->study_instance_uid, hd->series_instance_uid, hd->sop_instance_uid);
    struct stat sb;
    if (stat(path, &sb) == 0) {
        /* stored: whole and byte-identical. The answer may still have been lost to the
         * shutdown; a client retrying the same instance just replaces it. */
        assert_int_equal(lc_sha256_file_hex(path, a, NULL, &e), LC_OK);
        assert_int_equal(lc_sha256_file_hex(files[0], b, NULL, &e), LC_OK);
        assert_string_equal(a, b);
    } else {
        assert_true(sp.code != 202); /* never "accepted" without the object */
    }
    fprintf(stderr, "in-flight upload ended with %ld\n", sp.code);
    char **spool_files = NULL;
    snprintf(path, sizeof(path), "%s/spool", st.var);
    spool_files = ts_list_files(path);
    if (spool_files[0])
        fail_msg("spool not empty: %s", spool_files[0]);
    ts_strv_free(spool_files);
    lc_dicom_header_free(hd);
    ts_strv_free(files);
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sigkilled_worker_job_is_requeued),
        cmocka_unit_test(test_sigterm_busy_uploader_releases_job),
        cmocka_unit_test(test_sigterm_busy_segmenter_finishes_job),
        cmocka_unit_test(test_sigterm_indexer_loses_nothing),
        cmocka_unit_test(test_sigterm_gateway_mid_upload),
    };
    int rc = cmocka_run_group_tests(tests, setup, teardown);
    curl_global_cleanup();
    return rc;
}
