/*
 * test_pipeline.c: the walking skeleton end to end on real components: radpipe-stack starts
 * PostgreSQL, the Kafka-protocol dev broker and the four services in a temporary VAR; a real
 * multi-slice series goes in over HTTP and must come out indexed (a row per instance), with
 * exactly one study.completed event (read back with a Kafka consumer and validated against
 * proto/events with ajv), an upload job and a segment job that succeed, archived files
 * byte-identical to the input, and the segment job's NIfTI mask, DICOM SEG and PNG preview,
 * downloadable from the gateway. Bad input (not DICOM, no token) is refused with JSON errors
 * and indexes nothing. Stopping the stack with SIGINT leaves no process behind.
 */
#include <dirent.h>
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
#include <cjson/cJSON.h>
#include <libpq-fe.h>
#include <nifti1_io.h>
#include "lc/dicom.h"
#include "lc/util.h"
#include "ts.h"
#include "ts_proc.h"

static ts_stack st;

static int setup(void **state)
{
    (void)state;
    static const char *const env[] = {
        "RADPIPE_STUDY_QUIET_SECONDS=2",
        "RADPIPE_RECONCILE_INTERVAL_SECONDS=1",
        "RADPIPE_DRAIN_SECONDS=5",
        "RADPIPE_GPU_BACKEND=auto",
        NULL,
    };
    if (ts_stack_start(&st, NULL, env, 180000) != 0)
        fail_msg("the stack did not start");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    ts_stack_free(&st);
    return 0;
}

static char *url(const char *path)
{
    char *u = NULL;
    if (asprintf(&u, "%s%s", st.http_url, path) < 0)
        abort();
    return u;
}

static PGresult *query(PGconn *c, const char *sql, const char *param)
{
    const char *p[1] = {param};
    PGresult *r = PQexecParams(c, sql, param ? 1 : 0, NULL, param ? p : NULL, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQerrorMessage(c));
    return r;
}

static long long count(PGconn *c, const char *sql, const char *param)
{
    PGresult *r = query(c, sql, param);
    long long n = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return n;
}

/* Poll the study until both jobs reached a final state; returns the study JSON. */
static cJSON *wait_jobs_done(const char *study_uid, int timeout_s)
{
    char path[256];
    snprintf(path, sizeof(path), "/api/v1/studies/%s", study_uid);
    char *u = url(path);
    cJSON *last = NULL;
    for (int i = 0; i < timeout_s * 5; i++) {
        char *body = NULL;
        long code = ts_http("GET", u, st.token, NULL, NULL, 0, &body, NULL);
        cJSON_Delete(last);
        last = code == 200 ? cJSON_Parse(body) : NULL;
        free(body);
        cJSON *jobs = cJSON_GetObjectItem(last, "jobs");
        int final = 0, n = cJSON_GetArraySize(jobs);
        for (int k = 0; k < n; k++) {
            const char *s = cJSON_GetObjectItem(cJSON_GetArrayItem(jobs, k), "state")->valuestring;
            final += strcmp(s, "succeeded") == 0 || strcmp(s, "dead") == 0;
        }
        if (n >= 2 && final == n)
            break;
        usleep(200 * 1000);
    }
    free(u);
    return last;
}

static void test_pipeline(void **state)
{
    (void)state;
    char *series = ts_test_series();
    char **files = ts_list_files(series);
    char *post = url("/api/v1/instances");
    char *body = NULL;
    char study_uid[65] = "", series_uid[65] = "";
    int nfiles = 0, rows = 0, cols = 0;

    /* bad input first: a request without a token, and a body that is not DICOM */
    long code = ts_http("POST", post, NULL, "application/dicom", "DICM", 4, &body, NULL);
    assert_int_equal(code, 401);
    cJSON *j = cJSON_Parse(body);
    assert_non_null(j); /* a JSON error body */
    cJSON_Delete(j);
    free(body);
    code = ts_http("POST", post, st.token, "application/dicom", "this is not a DICOM file", 24,
                   &body, NULL);
    assert_int_equal(code, 400);
    j = cJSON_Parse(body);
    assert_non_null(j);
    assert_non_null(cJSON_GetObjectItem(j, "detail"));
    cJSON_Delete(j);
    free(body);

    /* the series, one instance per request */
    for (char **f = files; *f; f++, nfiles++) {
        size_t len = 0;
        char *data = ts_read_file(*f, &len);
        lc_dicom_header *h = NULL;
        lc_err e;
        assert_int_equal(lc_dicom_read_header(*f, &h, &e), LC_OK);
        code = ts_http("POST", post, st.token, "application/dicom", data, len, &body, NULL);
        if (code != 202)
            fail_msg("POST %s: %ld %s", *f, code, body);
        j = cJSON_Parse(body);
        assert_string_equal(cJSON_GetObjectItem(j, "sop_instance_uid")->valuestring,
                            h->sop_instance_uid);
        lc_strlcpy(study_uid, h->study_instance_uid, sizeof(study_uid));
        lc_strlcpy(series_uid, h->series_instance_uid, sizeof(series_uid));
        rows = h->rows;
        cols = h->columns;
        cJSON_Delete(j);
        free(body);
        free(data);
        lc_dicom_header_free(h);
    }
    assert_true(nfiles >= 2);

    cJSON *study = wait_jobs_done(study_uid, 180);
    if (!study) {
        ts_stack_dump_log(&st);
        fail_msg("study %s never appeared", study_uid);
    }
    cJSON *jobs = cJSON_GetObjectItem(study, "jobs");
    const char *seg_id = NULL;
    int upload_ok = 0, segment_ok = 0;
    for (int k = 0; k < cJSON_GetArraySize(jobs); k++) {
        cJSON *job = cJSON_GetArrayItem(jobs, k);
        const char *kind = cJSON_GetObjectItem(job, "kind")->valuestring;
        const char *state_s = cJSON_GetObjectItem(job, "state")->valuestring;
        if (strcmp(state_s, "succeeded") != 0) {
            ts_stack_dump_log(&st);
            fail_msg("%s job is %s", kind, state_s);
        }
        if (strcmp(kind, "upload") == 0)
            upload_ok++;
        if (strcmp(kind, "segment") == 0) {
            segment_ok++;
            seg_id = cJSON_GetObjectItem(job, "id")->valuestring;
        }
    }
    assert_int_equal(upload_ok, 1);
    assert_int_equal(segment_ok, 1);

    /* the index: one row per instance, nothing from the rejected body */
    PGconn *pg = PQconnectdb(st.database_url);
    assert_int_equal(PQstatus(pg), CONNECTION_OK);
    assert_int_equal(count(pg, "SELECT count(*) FROM instances WHERE study_uid = $1", study_uid),
                     nfiles);
    assert_int_equal(count(pg, "SELECT count(*) FROM instances", NULL), nfiles);
    assert_int_equal(count(pg, "SELECT count(*) FROM studies", NULL), 1);
    assert_int_equal(count(pg, "SELECT num_instances FROM studies WHERE study_uid = $1", study_uid),
                     nfiles);
    assert_int_equal(count(pg, "SELECT count(*) FROM quarantine", NULL), 0);

    /* the archive: byte-identical copies */
    for (char **f = files; *f; f++) {
        lc_dicom_header *h = NULL;
        lc_err e;
        char path[1024], a[65], b[65];
        assert_int_equal(lc_dicom_read_header(*f, &h, &e), LC_OK);
        snprintf(path, sizeof(path), "%s/archive/%s/%s/%s.dcm", st.var, h->study_instance_uid,
                 h->series_instance_uid, h->sop_instance_uid);
        assert_int_equal(lc_sha256_file_hex(*f, a, NULL, &e), LC_OK);
        if (lc_sha256_file_hex(path, b, NULL, &e) != LC_OK)
            fail_msg("archived copy missing: %s", e.msg);
        assert_string_equal(a, b);
        lc_dicom_header_free(h);
    }

    /* the mask: three artifacts of the segment job, listed with size and media type and
     * downloadable from the gateway; the NIfTI has the volume's voxels, the SEG references
     * the study and one frame per slice */
    char path[256];
    snprintf(path, sizeof(path), "/api/v1/jobs/%s", seg_id);
    char *ju = url(path);
    assert_int_equal(ts_http("GET", ju, st.token, NULL, NULL, 0, &body, NULL), 200);
    free(ju);
    cJSON *job = cJSON_Parse(body);
    free(body);
    assert_string_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(job, "result"), "series_instance_uid")->valuestring,
        series_uid);
    cJSON *arts = cJSON_GetObjectItem(job, "artifacts");
    static const char *const want[3][2] = {{"mask.nii.gz", "application/gzip"},
                                           {"preview.png", "image/png"},
                                           {"segmentation.dcm", "application/dicom"}};
    char *tmp = ts_tmpdir("pipeline-mask");
    assert_int_equal(cJSON_GetArraySize(arts), 3);
    for (int k = 0; k < 3; k++) {
        cJSON *a = cJSON_GetArrayItem(arts, k);
        char *data = NULL, file[600];
        size_t len = 0;
        assert_string_equal(cJSON_GetObjectItem(a, "name")->valuestring, want[k][0]);
        assert_string_equal(cJSON_GetObjectItem(a, "media_type")->valuestring, want[k][1]);
        snprintf(path, sizeof(path), "/api/v1/jobs/%s/artifacts/%s", seg_id, want[k][0]);
        char *au = url(path);
        assert_int_equal(ts_http("GET", au, st.token, NULL, NULL, 0, &data, &len), 200);
        free(au);
        assert_int_equal((long long)len, (long long)cJSON_GetObjectItem(a, "size")->valuedouble);
        snprintf(file, sizeof(file), "%s/%s", tmp, want[k][0]);
        assert_int_equal(ts_write_file(file, data, len), 0);
        free(data);
    }
    snprintf(path, sizeof(path), "%s/mask.nii.gz", tmp);
    nifti_image *nim = nifti_image_read(path, 0);
    assert_non_null(nim);
    assert_int_equal((long long)nim->nvox, (long long)rows * cols * nfiles);
    assert_int_equal(nim->sform_code, NIFTI_XFORM_SCANNER_ANAT);
    nifti_image_free(nim);
    lc_dicom_header *sh = NULL;
    lc_err se;
    snprintf(path, sizeof(path), "%s/segmentation.dcm", tmp);
    assert_int_equal(lc_dicom_read_header(path, &sh, &se), LC_OK);
    assert_string_equal(sh->modality, "SEG");
    assert_string_equal(sh->study_instance_uid, study_uid);
    assert_int_equal(sh->number_of_frames, nfiles);
    lc_dicom_header_free(sh);
    ts_rmrf(tmp);
    free(tmp);
    cJSON_Delete(job);

    /* the events: exactly one study.completed, and every event valid against proto/events */
    char out[1024], cmd[3000], *vout = NULL;
    snprintf(out, sizeof(out), "%s/events.jsonl", st.var);
    const char *topics[] = {"radpipe.study.completed", NULL};
    int n = ts_kafka_dump(st.brokers, topics, out, 3000, 60000);
    assert_int_equal(n, 1);
    char *ev_txt = ts_read_file(out, NULL);
    cJSON *ev = cJSON_Parse(ev_txt);
    assert_string_equal(cJSON_GetObjectItem(ev, "subject")->valuestring, study_uid);
    cJSON *data = cJSON_GetObjectItem(ev, "data");
    assert_int_equal(cJSON_GetObjectItem(data, "version")->valueint, 1);
    assert_int_equal(cJSON_GetObjectItem(data, "num_instances")->valueint, nfiles);
    cJSON_Delete(ev);
    free(ev_txt);
    const char *all[] = {"radpipe.instance.stored", "radpipe.study.completed", "radpipe.job.upload",
                         "radpipe.job.segment",     "radpipe.job.status",      NULL};
    snprintf(out, sizeof(out), "%s/all-events.jsonl", st.var);
    n = ts_kafka_dump(st.brokers, all, out, 3000, 60000);
    /* instances, the completion, two job events, and at least queued/running/succeeded x2 */
    assert_true(n >= nfiles + 1 + 2 + 6);
    snprintf(cmd, sizeof(cmd), "node '%s/tests/node/validate-events.mjs' '%s/proto/events' '%s'",
             ts_root(), ts_root(), out);
    int vrc = ts_run(cmd, &vout);
    fprintf(stderr, "%s", vout);
    assert_int_equal(vrc, 0);
    free(vout);

    PQfinish(pg);
    cJSON_Delete(study);
    free(post);
    ts_strv_free(files);
    free(series);
}

/* SIGINT (Ctrl-C) stops everything in order: exit 0 and no process left that belongs to
 * this VAR (postgres, the broker, the services). */
static void test_ctrl_c_leaves_nothing(void **state)
{
    (void)state;
    int status = ts_stack_stop(&st, SIGINT, 120000);
    assert_true(status != -1 && WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    char *left = ts_procs_mentioning(st.var);
    if (left[0])
        fail_msg("processes left behind:\n%s", left);
    free(left);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pipeline),
        cmocka_unit_test(test_ctrl_c_leaves_nothing),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
