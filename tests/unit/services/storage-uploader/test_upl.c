/*
 * test_upl.c: the upload job function against real PostgreSQL, a real file:// store and
 * archive, and real DICOM files: archived bytes equal the input, a re-run writes no extra
 * objects, cancellation leaves no partial object, an empty study fails permanently, and the
 * rate limit is honoured (a lower bound on the time, which noise can only lengthen).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <cmocka.h>
#include "lc/log.h"
#include "lc/util.h"
#include "ts.h"
#include "ts_index.h"
#include "upl.h"

typedef struct fx {
    char *url, *dir;
    lc_db *db;
    lc_service svc;
    upl_cfg cfg;
    upl_ctx u;
    lc_job_worker w;
    char study[65];
    int n;
} fx;

static char *series_dir(void)
{
    char *d = ts_data("series/mr-4slice/jpeg-lossless-sv1");
    struct stat st;
    if (stat(d, &st) == 0)
        return d;
    free(d);
    const char *s = ts_samples_dir();
    if (!s)
        fail_msg("no test series: tests/data/series/mr-4slice is missing");
    char *p = NULL;
    if (asprintf(&p, "%s/series/mr-4slice-compressed/jpeg-lossless-sv1", s) < 0)
        abort();
    return p;
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    lc_err e;
    char buf[600];
    f->url = ts_pg_fresh_db("upl");
    if (!f->url)
        fail_msg("RADPIPE_TEST_PG_URL is not set: run through tests/run.sh");
    f->dir = ts_tmpdir("upl");
    assert_int_equal(lc_db_connect(f->url, 10000, NULL, &f->db, &e), LC_OK);
    assert_int_equal(lc_db_migrate(f->db, &e), LC_OK);
    snprintf(buf, sizeof(buf), "file://%s/objects", f->dir);
    assert_int_equal(lc_store_open(buf, &f->svc.store, &e), LC_OK);
    f->svc.metrics = lc_metrics_new();
    f->svc.cfg.drain_seconds = 0;
    atomic_init(&f->svc.stop, 0);
    snprintf(buf, sizeof(buf), "file://%s/archive", f->dir);
    f->cfg.archive_url = strdup(buf);
    f->cfg.url_pattern = "{StudyInstanceUID}";
    f->cfg.layout = "instance";
    f->cfg.missing = "unknown";
    f->cfg.concurrency = 4;
    f->cfg.dest_limits = "";
    assert_int_equal(upl_init(&f->u, &f->svc, &f->cfg, &e), LC_OK);
    lc_job_worker_init(&f->w, "radpipe.", "/radpipe/test", 30, 3);
    char *sd = series_dir();
    f->n = ts_index_dir(f->db, f->svc.store, sd, f->study);
    free(sd);
    assert_int_equal(f->n, 4);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    upl_release(&f->u);
    lc_store_free(f->svc.store);
    lc_metrics_free(f->svc.metrics);
    lc_db_free(f->db);
    ts_rmrf(f->dir);
    free(f->dir);
    free(f->url);
    free(f->cfg.archive_url);
    free(f);
    return 0;
}

static lc_rc run(fx *f, cJSON **result, lc_err *e)
{
    lc_job *job = ts_claimed_job(f->db, &f->w, "upload", f->study, NULL);
    assert_non_null(job);
    lc_worker_job j = {.job = job, .svc = &f->svc, .db = f->db, .w = &f->w};
    lc_rc rc = upl_job(&f->u, &j, result, e);
    lc_job_free(job);
    return rc;
}

static int count_files(void *ctx, const char *key, const lc_store_stat *st)
{
    (void)key;
    (void)st;
    (*(int *)ctx)++;
    return 0;
}

static void test_archive_byte_identical(void **state)
{
    fx *f = *state;
    cJSON *result = NULL;
    lc_err e;
    PGresult *r = NULL;
    assert_int_equal(run(f, &result, &e), LC_OK);
    assert_int_equal(cJSON_GetObjectItem(result, "objects")->valueint, 4);
    assert_true(cJSON_GetObjectItem(result, "bytes")->valuedouble > 0);
    cJSON_Delete(result);

    const char *p[1] = {f->study};
    assert_int_equal(lc_db_exec(f->db,
                                "SELECT sop_uid, series_uid, store_key, sha256 FROM instances "
                                "WHERE study_uid = $1",
                                1, p, &r, &e),
                     LC_OK);
    assert_int_equal(PQntuples(r), 4);
    for (int i = 0; i < PQntuples(r); i++) {
        char key[512], *path = NULL, sha[65];
        snprintf(key, sizeof(key), "%s/%s/%s.dcm", f->study, PQgetvalue(r, i, 1),
                 PQgetvalue(r, i, 0));
        assert_int_equal(lc_store_local_path(f->u.archive, key, &path, &e), LC_OK);
        assert_int_equal(lc_sha256_file_hex(path, sha, NULL, &e), LC_OK);
        assert_string_equal(sha, PQgetvalue(r, i, 3)); /* the input file's sha256 */
        free(path);
    }
    PQclear(r);

    /* the manifest lists every object with its size and sha256 */
    char mkey[200];
    void *mbuf = NULL;
    size_t mlen = 0;
    snprintf(mkey, sizeof(mkey), "%s/manifest.json", f->study);
    assert_int_equal(lc_store_get_buf(f->u.archive, mkey, 1 << 20, &mbuf, &mlen, &e), LC_OK);
    cJSON *man = cJSON_Parse(mbuf);
    free(mbuf);
    cJSON *objs = cJSON_GetObjectItem(man, "objects");
    assert_int_equal(cJSON_GetArraySize(objs), 4);
    cJSON *first = cJSON_GetArrayItem(objs, 0);
    assert_int_equal(strlen(cJSON_GetObjectItem(first, "sha256")->valuestring), 64);
    assert_true(cJSON_GetObjectItem(first, "size")->valuedouble > 0);
    cJSON_Delete(man);

    /* a re-run (a retried or duplicated job) overwrites, never adds */
    assert_int_equal(run(f, &result, &e), LC_OK);
    cJSON_Delete(result);
    int files = 0;
    assert_int_equal(lc_store_list(f->u.archive, "", count_files, &files, &e), LC_OK);
    assert_int_equal(files, 5); /* 4 instances and the manifest */
}

static void test_cancel_leaves_nothing_partial(void **state)
{
    fx *f = *state;
    cJSON *result = NULL;
    lc_err e;
    f->cfg.rate_limit = 20 * 1024; /* slow enough that the first object is mid-copy */
    atomic_store(&f->svc.stop, 1); /* shutting down with no drain time left */
    assert_int_equal(run(f, &result, &e), LC_ERR_CANCELLED);
    assert_null(result);
    int files = 0;
    assert_int_equal(lc_store_list(f->u.archive, "", count_files, &files, &e), LC_OK);
    assert_int_equal(files, 0);
    char cmd[600], *out = NULL;
    snprintf(cmd, sizeof(cmd), "find '%s/archive' -type f | wc -l", f->dir);
    assert_int_equal(ts_run(cmd, &out), 0);
    assert_int_equal(atoi(out), 0); /* no temp files either */
    free(out);
    atomic_store(&f->svc.stop, 0);
    f->cfg.rate_limit = 0;
}

static void test_rate_limit(void **state)
{
    fx *f = *state;
    cJSON *result = NULL;
    lc_err e;
    f->cfg.rate_limit = 1024 * 1024;
    int64_t t0 = lc_now_ms();
    assert_int_equal(run(f, &result, &e), LC_OK);
    double bytes = cJSON_GetObjectItem(result, "bytes")->valuedouble;
    cJSON_Delete(result);
    /* it cannot finish faster than bytes / rate (noise only makes it slower) */
    assert_true((double)(lc_now_ms() - t0) >= bytes / (1024.0 * 1024.0) * 1000.0 - 50.0);
    f->cfg.rate_limit = 0;
}

static void test_empty_study_is_permanent(void **state)
{
    fx *f = *state;
    cJSON *result = NULL;
    lc_err e;
    lc_job *job = ts_claimed_job(f->db, &f->w, "upload", "1.2.3.4.5.6", NULL);
    assert_non_null(job);
    lc_worker_job j = {.job = job, .svc = &f->svc, .db = f->db, .w = &f->w};
    lc_rc rc = upl_job(&f->u, &j, &result, &e);
    assert_int_equal(rc, LC_ERR_NOT_FOUND);
    assert_false(lc_rc_is_transient(rc));
    assert_non_null(strstr(e.msg, "no indexed instances"));
    lc_job_free(job);
}

int main(void)
{
    lc_log_init("test_upl", LC_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_archive_byte_identical, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_leaves_nothing_partial, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rate_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_empty_study_is_permanent, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
