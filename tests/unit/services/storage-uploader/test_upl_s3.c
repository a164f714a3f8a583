/*
 * test_upl_s3.c: the upload job against s3rver (started per test on a free port), real
 * PostgreSQL and file:// object stores, checked with Debian's awscli: the instance layout
 * under a tag-based pattern (values from the index and from the instance header), series and
 * study tars (extracted and compared member by member), skipping on a re-run (a first run
 * sends no HEAD per object: one listing tells what is missing), a 300 MiB study through
 * multipart with 8 parts in flight, retries on 503 and dropped connections, a stopped job
 * resumed without resending acknowledged parts (also one acknowledged but never recorded,
 * checked by its ETag), a resumed upload the store no longer has started over, and permanent
 * failures (bad bytes, a missing bucket, an unknown access key) failing at once without retries
 * and aborting their multipart upload. SIGKILL and a stopped s3rver: tests/integration/
 * test_upload_s3.c.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include "lc/log.h"
#include "lc/util.h"
#include "ts.h"
#include "ts_index.h"
#include "ts_s3.h"
#include "upl.h"

typedef struct fx {
    char *url, *dir;
    lc_db *db;
    lc_service svc;
    upl_cfg cfg;
    upl_ctx u;
    lc_job_worker w;
    ts_s3 s3;
    char study[65];
    int n;
} fx;

static char *xfmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xfmt(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    assert_true(vasprintf(&s, fmt, ap) >= 0);
    va_end(ap);
    return s;
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

static void sql(fx *f, const char *q, int n, const char *const *p)
{
    lc_err e = {0};
    if (lc_db_exec(f->db, q, n, p, NULL, &e) != LC_OK)
        fail_msg("%s: %s", q, e.msg);
}

/* A study of nseries series with per instances of size bytes each, put straight into the
 * object store and the index (the uploader never parses the bytes). */
static void synthetic_study(fx *f, const char *study, int nseries, int per, size_t size)
{
    lc_err e = {0};
    char *buf = malloc(size);
    const char *p1[1] = {study};
    sql(f,
        "INSERT INTO studies (study_uid, patient_id, modalities) VALUES ($1, 'SYN', "
        "'{CT}')",
        1, p1);
    for (int s = 0; s < nseries; s++) {
        char series[65];
        snprintf(series, sizeof(series), "%s.%d", study, s + 1);
        const char *p2[2] = {series, study};
        sql(f, "INSERT INTO series (series_uid, study_uid, modality) VALUES ($1, $2, 'CT')", 2, p2);
        for (int i = 0; i < per; i++) {
            char sop[65], key[200], sha[65], sz[24];
            snprintf(sop, sizeof(sop), "%s.%d", series, i + 1);
            snprintf(key, sizeof(key), "instances/%s/%s/%s.dcm", study, series, sop);
            fill(buf, size, (uint64_t)(s * 1000 + i + 1));
            lc_sha256_hex(buf, size, sha);
            assert_int_equal(lc_store_put_buf(f->svc.store, key, buf, size, &e), LC_OK);
            snprintf(sz, sizeof(sz), "%zu", size);
            const char *p3[6] = {sop, series, study, key, sz, sha};
            sql(f,
                "INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, "
                "store_key, size_bytes, sha256) VALUES ($1, $2, $3, '1.2.840.10008.5.1.4.1.1.2', "
                "$4, $5, $6)",
                6, p3);
        }
    }
    free(buf);
}

static void clear_env(void)
{
    unsetenv("RADPIPE_S3_PART_SIZE");
    unsetenv("RADPIPE_S3_MULTIPART_THRESHOLD");
    unsetenv("RADPIPE_S3_CONCURRENCY");
}

static int setup_with(void **state, const char *buckets, const char *extra)
{
    fx *f = calloc(1, sizeof(*f));
    lc_err e = {0};
    char buf[600];
    clear_env();
    f->url = ts_pg_fresh_db("upls3");
    if (!f->url)
        fail_msg("RADPIPE_TEST_PG_URL is not set: run through tests/run.sh");
    if (ts_s3_start(&f->s3, buckets, extra) != 0)
        return -1;
    setenv("RADPIPE_S3_PART_SIZE", "5M", 1);
    setenv("RADPIPE_S3_MULTIPART_THRESHOLD", "5M", 1);
    setenv("RADPIPE_S3_CONCURRENCY", "8", 1);
    f->dir = ts_tmpdir("upls3");
    assert_int_equal(lc_db_connect(f->url, 10000, NULL, &f->db, &e), LC_OK);
    assert_int_equal(lc_db_migrate(f->db, &e), LC_OK);
    snprintf(buf, sizeof(buf), "file://%s/objects", f->dir);
    assert_int_equal(lc_store_open(buf, &f->svc.store, &e), LC_OK);
    f->svc.metrics = lc_metrics_new();
    f->svc.cfg.drain_seconds = 0;
    atomic_init(&f->svc.stop, 0);
    f->cfg.archive_url = "s3://archive/radpipe";
    f->cfg.url_pattern = "{StudyInstanceUID}";
    f->cfg.layout = "instance";
    f->cfg.missing = "unknown";
    f->cfg.concurrency = 8;
    f->cfg.dest_limits = "";
    if (upl_init(&f->u, &f->svc, &f->cfg, &e) != LC_OK) {
        fprintf(stderr, "upl_init: %s\n", e.msg);
        return -1;
    }
    lc_job_worker_init(&f->w, "radpipe.", "/radpipe/test", 30, 3);
    *state = f;
    return 0;
}

static int setup(void **state)
{
    return setup_with(state, "archive,arch-mr,tars", NULL);
}

static int setup_faulty(void **state)
{
    return setup_with(state, "archive", "--fail-every 4 --drop-every 3");
}

static int setup_slow(void **state)
{
    return setup_with(state, "archive", "--part-delay-ms 300");
}

static int setup_held(void **state)
{
    /* parts held 200 ms at s3rver: the writer's whole window is in flight at once */
    return setup_with(state, "archive", "--part-delay-ms 200");
}

static int teardown(void **state)
{
    fx *f = *state;
    upl_release(&f->u);
    lc_store_free(f->svc.store);
    lc_metrics_free(f->svc.metrics);
    lc_db_free(f->db);
    ts_s3_free(&f->s3);
    ts_rmrf(f->dir);
    free(f->dir);
    free(f->url);
    free(f);
    clear_env();
    return 0;
}

static lc_rc run(fx *f, const char *params, cJSON **result, lc_err *e)
{
    lc_job *job = ts_claimed_job(f->db, &f->w, "upload", f->study, params);
    assert_non_null(job);
    lc_worker_job j = {.job = job, .svc = &f->svc, .db = f->db, .w = &f->w};
    lc_rc rc = upl_job(&f->u, &j, result, e);
    lc_job_free(job);
    return rc;
}

static void index_series(fx *f)
{
    char *d = ts_data("series/mr-4slice/jpeg-lossless-sv1");
    f->n = ts_index_dir(f->db, f->svc.store, d, f->study);
    free(d);
    assert_int_equal(f->n, 4);
}

/* awscli downloads s3://<path> into dir/<name>; returns the file's path. */
static char *aws_download(fx *f, const char *path, const char *dir, const char *name)
{
    char *dst = xfmt("%s/%s", dir, name);
    char *args = xfmt("s3 cp --only-show-errors 's3://%s' '%s'", path, dst);
    if (ts_s3_aws(&f->s3, args, NULL) != 0)
        fail_msg("aws s3 cp s3://%s failed", path);
    free(args);
    return dst;
}

static void file_sha(const char *path, char hex[65])
{
    lc_err e = {0};
    assert_int_equal(lc_sha256_file_hex(path, hex, NULL, &e), LC_OK);
}

static int count_log(fx *f, const char *a, const char *b)
{
    return ts_s3_log_count(&f->s3, (const char *const[]){a, b, NULL});
}

/* For a failure's message: s3rver's upload area, the last requests it logged other than
 * GETs, and its own output (leaked: the test ends with the message). */
static char *s3_state(fx *f)
{
    char *cmd = xfmt("ls -lR %s/archive/._S3rver_uploads; grep -v '\"GET\"' %s | tail -40; "
                     "tail -20 %s/s3rver.out",
                     f->s3.data, f->s3.log, f->s3.dir),
         *out = NULL;
    ts_run(cmd, &out);
    free(cmd);
    return out ? out : "";
}

static void test_instance_layout_with_pattern(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    cJSON *res = NULL;
    index_series(f);
    const char *p[1] = {f->study};
    sql(f,
        "UPDATE studies SET patient_id = 'P^7 x', study_description = 'Head^Routine' "
        "WHERE study_uid = $1",
        1, p);
    /* a keyword the index has no column for comes from the instance's DICOM JSON */
    sql(f,
        "INSERT INTO instance_metadata (sop_uid, json) SELECT sop_uid, "
        "'{\"00180081\": {\"vr\": \"DS\", \"Value\": [4.5]}}' FROM instances "
        "WHERE study_uid = $1",
        1, p);
    const char *params = "{\"url_pattern\": \"s3://arch-{Modality}/{PatientID:-anon}/"
                         "{StudyDescriptionPath[1]}/TE{EchoTime}/{AccessionNumber:-noacc}\"}";
    assert_int_equal(run(f, params, &res, &e), LC_OK);
    assert_int_equal(cJSON_GetObjectItem(res, "objects")->valueint, 4);
    assert_int_equal(cJSON_GetObjectItem(res, "written")->valueint, 4);
    /* the destination was listed once; objects it lacked were sent without a HEAD each */
    assert_int_equal(count_log(f, "\"m\":\"HEAD\"", ".dcm\""), 0);
    assert_int_equal(count_log(f, "\"m\":\"GET\"", "list-type=2"), 1);
    assert_string_equal(cJSON_GetObjectItem(res, "archive_url")->valuestring, "s3://arch-mr");
    assert_string_equal(cJSON_GetObjectItem(res, "prefix")->valuestring,
                        "P_7_x/Routine/TE4.5/noacc");
    cJSON_Delete(res);

    /* every object, downloaded with awscli, is the indexed file */
    char *out = NULL;
    assert_int_equal(ts_s3_aws(&f->s3, "s3 ls --recursive s3://arch-mr/", &out), 0);
    char *tmp = ts_tmpdir("upls3dl");
    PGresult *r = NULL;
    assert_int_equal(lc_db_exec(f->db,
                                "SELECT sop_uid, series_uid, sha256 FROM instances "
                                "WHERE study_uid = $1",
                                1, p, &r, &e),
                     LC_OK);
    for (int i = 0; i < PQntuples(r); i++) {
        char *path = xfmt("arch-mr/P_7_x/Routine/TE4.5/noacc/%s/%s.dcm", PQgetvalue(r, i, 1),
                          PQgetvalue(r, i, 0));
        assert_non_null(strstr(out, path + strlen("arch-mr/")));
        char *got = aws_download(f, path, tmp, "x.dcm"), hex[65];
        file_sha(got, hex);
        assert_string_equal(hex, PQgetvalue(r, i, 2));
        free(got);
        free(path);
    }
    PQclear(r);
    assert_non_null(strstr(out, "P_7_x/Routine/TE4.5/noacc/"));
    free(out);

    /* the manifest: file list, sizes, sha256 */
    char *mkey = xfmt("arch-mr/P_7_x/Routine/TE4.5/noacc/%s.manifest.json", f->study);
    char *mp = aws_download(f, mkey, tmp, "manifest.json");
    char *mtext = ts_read_file(mp, NULL);
    cJSON *man = cJSON_Parse(mtext);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(man, "objects")), 4);
    assert_string_equal(cJSON_GetObjectItem(man, "layout")->valuestring, "instance");
    cJSON_Delete(man);
    free(mtext);
    free(mp);
    free(mkey);

    /* a re-run sends nothing again: HEAD finds the same digests */
    int puts = count_log(f, "\"m\":\"PUT\"", "\"status\":200");
    int heads = count_log(f, "\"m\":\"HEAD\"", ".dcm\""); /* awscli's, downloading */
    assert_int_equal(run(f, params, &res, &e), LC_OK);
    assert_int_equal(cJSON_GetObjectItem(res, "skipped")->valueint, 4);
    assert_int_equal(cJSON_GetObjectItem(res, "written")->valueint, 0);
    cJSON_Delete(res);
    assert_int_equal(count_log(f, "\"m\":\"PUT\"", "\"status\":200"), puts);
    assert_int_equal(count_log(f, "\"m\":\"HEAD\"", ".dcm\""), heads + 4); /* listed: compared */
    out = NULL;
    assert_int_equal(ts_s3_aws(&f->s3, "s3 ls --recursive s3://arch-mr/", &out), 0);
    int lines = 0;
    for (char *c = out; *c; c++)
        lines += *c == '\n';
    assert_int_equal(lines, 5); /* 4 instances and the manifest, no duplicates */
    free(out);
    ts_rmrf(tmp);
    free(tmp);

    /* a bad pattern is a permanent error */
    assert_int_equal(run(f, "{\"url_pattern\": \"s3://x/{NoSuchKeyword}\"}", &res, &e),
                     LC_ERR_INVALID);
    assert_non_null(strstr(e.msg, "NoSuchKeyword"));
    assert_int_equal(run(f, "{\"layout\": \"zip\"}", &res, &e), LC_ERR_INVALID);
}

/* Walk a tar file: every member's SHA-256 must be the index's for that instance. */
static int check_tar(fx *f, const char *path, int want_members)
{
    size_t len = 0;
    char *t = ts_read_file(path, &len);
    lc_err e = {0};
    int members = 0;
    assert_non_null(t);
    for (size_t off = 0; off + 512 <= len;) {
        const char *h = t + off;
        if (!h[0])
            break;
        char name[300];
        if (h[345])
            snprintf(name, sizeof(name), "%.155s/%.100s", h + 345, h);
        else
            snprintf(name, sizeof(name), "%.100s", h);
        size_t size = strtoul(h + 124, NULL, 8);
        char hex[65];
        lc_sha256_hex(t + off + 512, size, hex);
        char *slash = strrchr(name, '/');
        char sop[100];
        snprintf(sop, sizeof(sop), "%s", slash ? slash + 1 : name);
        sop[strlen(sop) - 4] = '\0'; /* ".dcm" */
        const char *p[1] = {sop};
        PGresult *r = NULL;
        assert_int_equal(
            lc_db_exec(f->db, "SELECT sha256 FROM instances WHERE sop_uid = $1", 1, p, &r, &e),
            LC_OK);
        assert_int_equal(PQntuples(r), 1);
        assert_string_equal(hex, PQgetvalue(r, 0, 0));
        PQclear(r);
        members++;
        off += 512 + (size + 511) / 512 * 512;
    }
    free(t);
    assert_int_equal(members, want_members);
    return members;
}

static void test_tar_layouts(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    cJSON *res = NULL;
    lc_strlcpy(f->study, "1.2.826.0.1.3680043.9.7777.1", sizeof(f->study));
    synthetic_study(f, f->study, 2, 3, 300 * 1024 + 7);
    char *tmp = ts_tmpdir("upls3tar");

    /* one tar per series */
    assert_int_equal(run(f,
                         "{\"layout\": \"series-tar\", \"url_pattern\": \"s3://tars/s/"
                         "{PatientID}\"}",
                         &res, &e),
                     LC_OK);
    assert_int_equal(cJSON_GetObjectItem(res, "objects")->valueint, 2);
    cJSON_Delete(res);
    for (int s = 1; s <= 2; s++) {
        char *k = xfmt("tars/s/SYN/%s.%d.tar", f->study, s);
        char *p = aws_download(f, k, tmp, "s.tar");
        check_tar(f, p, 3);
        /* GNU tar reads it too */
        char *cmd = xfmt("tar -tf '%s' | wc -l", p), *out = NULL;
        assert_int_equal(ts_run(cmd, &out), 0);
        assert_int_equal(atoi(out), 3);
        free(out);
        free(cmd);
        free(p);
        free(k);
    }

    /* one tar for the study, members under their series */
    assert_int_equal(
        run(f, "{\"layout\": \"study-tar\", \"url_pattern\": \"s3://tars/t\"}", &res, &e), LC_OK);
    assert_int_equal(cJSON_GetObjectItem(res, "objects")->valueint, 1);
    cJSON_Delete(res);
    char *k = xfmt("tars/t/%s.tar", f->study);
    char *p = aws_download(f, k, tmp, "t.tar");
    check_tar(f, p, 6);
    char hex[65];
    file_sha(p, hex);
    free(p);
    free(k);
    /* the manifest records the tar's sha256 and its members */
    k = xfmt("tars/t/%s.manifest.json", f->study);
    p = aws_download(f, k, tmp, "m.json");
    char *text = ts_read_file(p, NULL);
    cJSON *man = cJSON_Parse(text);
    cJSON *o = cJSON_GetArrayItem(cJSON_GetObjectItem(man, "objects"), 0);
    assert_string_equal(cJSON_GetObjectItem(o, "sha256")->valuestring, hex);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(o, "members")), 6);
    cJSON_Delete(man);
    free(text);
    free(p);
    free(k);

    /* again: skipped, and the manifest still has the tar's sha256 */
    assert_int_equal(
        run(f, "{\"layout\": \"study-tar\", \"url_pattern\": \"s3://tars/t\"}", &res, &e), LC_OK);
    assert_int_equal(cJSON_GetObjectItem(res, "skipped")->valueint, 1);
    cJSON_Delete(res);

    /* a subset of the series (an amended completion) gets its own tar and manifest */
    char *params = xfmt("{\"layout\": \"study-tar\", \"url_pattern\": \"s3://tars/t\", "
                        "\"series\": [\"%s.2\"]}",
                        f->study);
    assert_int_equal(run(f, params, &res, &e), LC_OK);
    free(params);
    const char *key = cJSON_GetArrayItem(cJSON_GetObjectItem(res, "manifests"), 0)->valuestring;
    assert_non_null(strstr(key, ".manifest-"));
    cJSON_Delete(res);
    char *out = NULL;
    assert_int_equal(ts_s3_aws(&f->s3, "s3 ls --recursive s3://tars/t/", &out), 0);
    int lines = 0;
    for (char *c = out; *c; c++)
        lines += *c == '\n';
    assert_int_equal(lines, 4); /* two tars, two manifests */
    free(out);
    ts_rmrf(tmp);
    free(tmp);
}

typedef struct iv {
    long long t0, t1;
} iv;

/* Most part uploads that overlapped in time (from the request log). */
static int max_parallel_parts(fx *f)
{
    char *log = ts_read_file(f->s3.log, NULL);
    iv v[4096];
    int n = 0, best = 0;
    for (char *line = strtok(log, "\n"); line && n < 4096; line = strtok(NULL, "\n")) {
        if (!strstr(line, "partNumber=") || !strstr(line, "\"status\":200"))
            continue;
        cJSON *j = cJSON_Parse(line);
        v[n].t0 = (long long)cJSON_GetObjectItem(j, "t0")->valuedouble;
        v[n].t1 = (long long)cJSON_GetObjectItem(j, "t1")->valuedouble;
        n++;
        cJSON_Delete(j);
    }
    for (int i = 0; i < n; i++) {
        int c = 0;
        for (int k = 0; k < n; k++)
            c += v[k].t0 <= v[i].t0 && v[i].t0 < v[k].t1;
        if (c > best)
            best = c;
    }
    free(log);
    return best;
}

static void test_300mib_study_multipart(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    cJSON *res = NULL;
    setenv("RADPIPE_S3_PART_SIZE", "8M", 1);
    lc_strlcpy(f->study, "1.2.826.0.1.3680043.9.7777.300", sizeof(f->study));
    synthetic_study(f, f->study, 3, 10, 10 << 20); /* 30 x 10 MiB */
    /* the archive was opened with 5M parts: use a fresh destination with 8M parts */
    assert_int_equal(
        run(f, "{\"layout\": \"study-tar\", \"url_pattern\": \"s3://archive/big\"}", &res, &e),
        LC_OK);
    double bytes = cJSON_GetObjectItem(res, "bytes")->valuedouble;
    assert_true(bytes >= 300.0 * (1 << 20));
    cJSON_Delete(res);
    int parts = count_log(f, "partNumber=", "\"status\":200");
    assert_int_equal(parts, (int)((bytes + (8 << 20) - 1) / (8 << 20)));
    /* RADPIPE_S3_CONCURRENCY=8: eight parts in flight at once, never more */
    int par = max_parallel_parts(f);
    if (par != 8)
        fail_msg("%d parts were in flight at once, expected 8", par);
    char *tmp = ts_tmpdir("upls3big"), *k = xfmt("archive/big/%s.tar", f->study);
    char *p = aws_download(f, k, tmp, "big.tar"), hex[65];
    check_tar(f, p, 30);
    file_sha(p, hex);
    char *mk = xfmt("archive/big/%s.manifest.json", f->study);
    char *mp = aws_download(f, mk, tmp, "m.json");
    char *mtext = ts_read_file(mp, NULL);
    cJSON *man = cJSON_Parse(mtext);
    cJSON *o = cJSON_GetArrayItem(cJSON_GetObjectItem(man, "objects"), 0);
    assert_string_equal(cJSON_GetObjectItem(o, "sha256")->valuestring, hex);
    cJSON_Delete(man);
    free(mtext);
    free(mp);
    free(mk);
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "archive"), 0);
    ts_rmrf(tmp);
    free(tmp);
    free(k);
    free(p);
}

static void test_retries_503_and_drops(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    cJSON *res = NULL;
    lc_strlcpy(f->study, "1.2.826.0.1.3680043.9.7777.2", sizeof(f->study));
    synthetic_study(f, f->study, 2, 6, 1 << 20);
    assert_int_equal(run(f, NULL, &res, &e), LC_OK);
    assert_int_equal(cJSON_GetObjectItem(res, "written")->valueint, 12);
    cJSON_Delete(res);
    assert_int_equal(run(f, "{\"layout\": \"study-tar\"}", &res, &e), LC_OK);
    cJSON_Delete(res);
    assert_true(count_log(f, "slowdown", "503") >= 3);
    assert_true(count_log(f, "dropped", "partNumber") >= 1);
    char *m = lc_metrics_render(f->svc.metrics);
    assert_non_null(strstr(m, "radpipe_upload_retries_total{store=\"s3://archive/radpipe\"}"));
    assert_null(strstr(m, "radpipe_upload_retries_total{store=\"s3://archive/radpipe\"} 0\n"));
    assert_non_null(strstr(m, "radpipe_upload_part_seconds_count"));
    free(m);
    char *tmp = ts_tmpdir("upls3r"), *k = xfmt("archive/radpipe/%s/%s.tar", f->study, f->study);
    char *p = aws_download(f, k, tmp, "r.tar");
    check_tar(f, p, 12);
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "archive"), 0);
    ts_rmrf(tmp);
    free(tmp);
    free(k);
    free(p);
}

/* Stop the service once n parts were acknowledged (as a shutdown past the drain time). */
typedef struct stopper {
    fx *f;
    int n;
} stopper;

static void *stop_after_parts(void *arg)
{
    stopper *s = arg;
    for (int i = 0; i < 600; i++) {
        if (ts_s3_log_count(&s->f->s3,
                            (const char *const[]){"partNumber=", "\"status\":200", NULL}) >= s->n) {
            atomic_store(&s->f->svc.stop, 1);
            break;
        }
        usleep(20 * 1000);
    }
    return NULL;
}

static void test_stop_then_resume(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    cJSON *res = NULL;
    lc_strlcpy(f->study, "1.2.826.0.1.3680043.9.7777.3", sizeof(f->study));
    synthetic_study(f, f->study, 1, 8, 4 << 20); /* a 32 MiB tar: 7 parts of 5 MiB */
    stopper s = {f, 3};
    pthread_t t;
    pthread_create(&t, NULL, stop_after_parts, &s);
    assert_int_equal(run(f, "{\"layout\": \"study-tar\"}", &res, &e), LC_ERR_CANCELLED);
    pthread_join(t, NULL);
    atomic_store(&f->svc.stop, 0);

    /* the upload and its acknowledged parts are recorded; the upload is still open */
    PGresult *r = NULL;
    assert_int_equal(
        lc_db_exec(f->db, "SELECT part_number FROM upload_parts ORDER BY 1", 0, NULL, &r, &e),
        LC_OK);
    int recorded = PQntuples(r);
    assert_true(recorded >= 3);
    int nums[16];
    for (int i = 0; i < recorded && i < 16; i++)
        nums[i] = atoi(PQgetvalue(r, i, 0));
    PQclear(r);
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "archive"), 1);
    /* a crash between the store's answer and the record loses the record of the last part:
     * the store still lists it, and its ETag (the MD5 of the same bytes) keeps it */
    char last[16];
    snprintf(last, sizeof(last), "%d", nums[recorded - 1]);
    const char *pl[1] = {last};
    sql(f, "DELETE FROM upload_parts WHERE part_number = $1::int", 1, pl);

    assert_int_equal(run(f, "{\"layout\": \"study-tar\"}", &res, &e), LC_OK);
    cJSON_Delete(res);
    for (int i = 0; i < recorded && i < 16; i++) {
        char q[32];
        snprintf(q, sizeof(q), "\"partNumber=%d&", nums[i]);
        /* acknowledged once, never sent again */
        assert_int_equal(count_log(f, q, "\"m\":\"PUT\""), 1);
    }
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "archive"), 0);
    assert_int_equal(lc_db_exec(f->db, "SELECT count(*) FROM upload_multipart", 0, NULL, &r, &e),
                     LC_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), "0");
    PQclear(r);
    char *tmp = ts_tmpdir("upls3res"), *k = xfmt("archive/radpipe/%s/%s.tar", f->study, f->study);
    char *p = aws_download(f, k, tmp, "r.tar");
    check_tar(f, p, 8);
    ts_rmrf(tmp);
    free(tmp);
    free(k);
    free(p);
}

static void test_resume_of_vanished_upload_starts_over(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    cJSON *res = NULL;
    lc_strlcpy(f->study, "1.2.826.0.1.3680043.9.7777.6", sizeof(f->study));
    synthetic_study(f, f->study, 1, 6, 4 << 20); /* a 24 MiB tar: 5 parts of 5 MiB */
    stopper s = {f, 2};
    pthread_t t;
    pthread_create(&t, NULL, stop_after_parts, &s);
    assert_int_equal(run(f, "{\"layout\": \"study-tar\"}", &res, &e), LC_ERR_CANCELLED);
    pthread_join(t, NULL);
    atomic_store(&f->svc.stop, 0);

    /* the store drops the upload behind the uploader's back (a lifecycle rule, an operator) */
    PGresult *r = NULL;
    assert_int_equal(
        lc_db_exec(f->db, "SELECT object_key, upload_id FROM upload_multipart", 0, NULL, &r, &e),
        LC_OK);
    assert_int_equal(PQntuples(r), 1);
    assert_int_equal(lc_store_mpu_abort(f->u.archive, PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1), &e),
                     LC_OK);
    PQclear(r);
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "archive"), 0);

    /* the resume finds it gone and starts a new upload instead of failing */
    lc_rc rc = run(f, "{\"layout\": \"study-tar\"}", &res, &e);
    if (rc != LC_OK)
        fail_msg("the resume failed: %s: %s\n%s", lc_strerror(rc), e.msg, s3_state(f));
    cJSON_Delete(res);
    assert_int_equal(count_log(f, "\"m\":\"POST\"", "\"q\":\"uploads="), 2);
    if (ts_s3_incomplete_uploads(&f->s3, "archive") != 0)
        fail_msg("an incomplete upload is left:\n%s", s3_state(f)); /* ends the test */
    char *tmp = ts_tmpdir("upls3van"), *k = xfmt("archive/radpipe/%s/%s.tar", f->study, f->study);
    char *p = aws_download(f, k, tmp, "v.tar");
    check_tar(f, p, 6);
    ts_rmrf(tmp);
    free(tmp);
    free(k);
    free(p);
}

static void test_permanent_failure_aborts_upload(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    cJSON *res = NULL;
    lc_strlcpy(f->study, "1.2.826.0.1.3680043.9.7777.4", sizeof(f->study));
    synthetic_study(f, f->study, 1, 6, 4 << 20);
    /* the last instance's bytes changed after indexing: found only at the end of the tar */
    char *path =
        xfmt("%s/objects/instances/%s/%s.1/%s.1.6.dcm", f->dir, f->study, f->study, f->study);
    FILE *fp = fopen(path, "r+b");
    assert_non_null(fp);
    fputc('X', fp);
    fclose(fp);
    free(path);
    assert_int_equal(run(f, "{\"layout\": \"study-tar\"}", &res, &e), LC_ERR_INVALID);
    assert_false(lc_rc_is_transient(e.rc));
    assert_non_null(strstr(e.msg, "does not match its index entry"));
    /* parts had been sent; the upload was aborted and forgotten */
    assert_true(count_log(f, "partNumber=", "\"status\":200") >= 2);
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "archive"), 0);
    PGresult *r = NULL;
    assert_int_equal(lc_db_exec(f->db, "SELECT count(*) FROM upload_multipart", 0, NULL, &r, &e),
                     LC_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), "0");
    PQclear(r);
    /* a missing bucket is permanent too (a fresh study: the one above fails either way) */
    lc_strlcpy(f->study, "1.2.826.0.1.3680043.9.7777.5", sizeof(f->study));
    synthetic_study(f, f->study, 1, 2, 1 << 20);
    lc_rc rc = run(f, "{\"url_pattern\": \"s3://no-such-bucket\"}", &res, &e);
    if (rc != LC_ERR_NOT_FOUND)
        fail_msg("expected not found, got %s: %s", lc_strerror(rc), e.msg);
    assert_non_null(strstr(e.msg, "NoSuchBucket"));
    /* a 4xx is not retried: each object was tried once at most */
    assert_true(count_log(f, "/no-such-bucket/", "\"m\":\"PUT\"") <= 2);
    assert_int_equal(count_log(f, "/no-such-bucket/", "\"status\":503"), 0);

    /* an unknown access key (s3rver checks no SigV4 signature, only the key): 403 at once, no
     * retries, nothing written */
    setenv("RADPIPE_S3_ACCESS_KEY", "NOBODY", 1);
    rc = run(f, "{\"url_pattern\": \"s3://arch-mr/denied\"}", &res, &e);
    setenv("RADPIPE_S3_ACCESS_KEY", "S3RVER", 1);
    if (rc != LC_ERR_AUTH && rc != LC_ERR_FORBIDDEN)
        fail_msg("expected an authentication error, got %s: %s", lc_strerror(rc), e.msg);
    assert_false(lc_rc_is_transient(rc));
    assert_non_null(strstr(e.msg, "403"));
    /* the listing and at most one request per object (2), none repeated */
    assert_true(count_log(f, "\"path\":\"/arch-mr", "\"status\":403") <= 3);
    assert_int_equal(count_log(f, "\"path\":\"/arch-mr", "\"status\":200"), 0);
}

int main(void)
{
    lc_log_init("test_upl_s3", LC_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_instance_layout_with_pattern, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tar_layouts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_300mib_study_multipart, setup_held, teardown),
        cmocka_unit_test_setup_teardown(test_retries_503_and_drops, setup_faulty, teardown),
        cmocka_unit_test_setup_teardown(test_stop_then_resume, setup_slow, teardown),
        cmocka_unit_test_setup_teardown(test_resume_of_vanished_upload_starts_over, setup_slow,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_permanent_failure_aborts_upload, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
