/*
 * test_seg_model.c: segment jobs that name a model (RADPIPE_MODELS_DIR), on real PostgreSQL,
 * a real store and a real CT series of the shared corpus (ct-philips-head-phantom), CPU
 * backend. model.json's C checks on the shared cases of tests/data/params/model-cases.json
 * (the same cases tests/checks/test_models_schema.sh runs through the schema); the registry
 * (every bad model folder logged and skipped with its reason, the good one resident, counted
 * in /metrics and upserted into the models table); a job with the demo model
 * (tests/data/models/demo-phantom-ct): the label map in mask.nii.gz on the series grid with
 * the model's labels where the Hounsfield units say they belong, one DICOM SEG segment per
 * label with its SNOMED CT codes passing dciodvfy, the preview; a second job on the same model
 * loads nothing (metrics) and gives the same labels; unknown and broken models, a modality
 * the model was not made for, cancellation between patch batches and the memory limit fail
 * with clear errors. The inference runs need the engine (gpu/nn); a build without it checks
 * that every model fails to load with "no inference engine" and skips the runs, saying so.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include <nifti1_io.h>
#include "lc/log.h"
#include "lc/util.h"
#include "seg.h"
#include "ts.h"
#include "ts_index.h"

#define DEMO "demo-phantom-ct"

/* ---- model.json on the shared cases (no engine needed) ------------------------------------ */

static void test_desc_cases(void **state)
{
    (void)state;
    char *path = ts_data("params/model-cases.json");
    char *txt = ts_read_file(path, NULL);
    if (!txt)
        fail_msg("cannot read %s", path);
    cJSON *cases = cJSON_Parse(txt);
    assert_true(cJSON_IsArray(cases));
    int n = 0, valid = 0;
    for (const cJSON *c = cases->child; c; c = c->next, n++) {
        const cJSON *model = cJSON_GetObjectItem(c, "model");
        const char *why = cJSON_GetStringValue(cJSON_GetObjectItem(c, "why"));
        int want = cJSON_IsTrue(cJSON_GetObjectItem(c, "valid"));
        const cJSON *needle = cJSON_GetObjectItem(c, "error");
        seg_model_desc d;
        lc_err e = {0};
        lc_rc rc = seg_model_desc_parse(model, &d, &e);
        if (want && rc != LC_OK)
            fail_msg("case %d (%s): rejected: %s", n, why, e.msg);
        if (!want && rc != LC_ERR_INVALID)
            fail_msg("case %d (%s): accepted", n, why);
        if (!want && cJSON_IsString(needle) && !strstr(e.msg, needle->valuestring))
            fail_msg("case %d (%s): message \"%s\" does not name \"%s\"", n, why, e.msg,
                     needle->valuestring);
        valid += want;
        seg_model_desc_release(&d);
    }
    assert_true(n >= 50 && valid >= 5 && n - valid >= 40);
    cJSON_Delete(cases);
    free(txt);
    free(path);
}

/* The demo's model.json as the loader reads it: axes reversed to x, y, z. */
static void test_desc_demo(void **state)
{
    (void)state;
    char *path = ts_data("models/" DEMO "/model.json");
    char *txt = ts_read_file(path, NULL);
    assert_non_null(txt);
    cJSON *j = cJSON_Parse(txt);
    seg_model_desc d;
    lc_err e;
    assert_int_equal(seg_model_desc_parse(j, &d, &e), LC_OK);
    assert_string_equal(d.name, DEMO);
    assert_string_equal(d.modality, "CT");
    assert_int_equal(d.dims, 3);
    assert_int_equal(d.nlabels, 3);
    for (int i = 0; i < d.nlabels; i++)
        assert_int_equal(d.labels[i].value, i + 1);
    assert_string_equal(d.labels[2].type.code, "272673000");
    assert_string_equal(d.labels[2].type.scheme, "SCT");
    assert_true(d.spacing[0] == 2 && d.spacing[1] == 2 && d.spacing[2] == 5);
    assert_true(d.patch[0] == 16 && d.patch[1] == 64 && d.patch[2] == 64);
    assert_int_equal(d.norm, SEG_NORM_CT);
    assert_true(d.clip_lo < d.clip_hi && d.std > 0);
    assert_true(d.step == 0.5 && d.batch == 1 && !d.mirror);
    assert_int_equal(strlen(d.onnx_sha256), 64);
    seg_model_desc_release(&d);
    cJSON_Delete(j);
    free(txt);
    free(path);
}

/* ---- fixture: a models folder with the demo and broken models ----------------------------- */

typedef struct fx {
    char *url, *dir, *models;
    lc_db *db;
    lc_service svc;
    seg_cfg cfg;
    seg_ctx c;
    lc_job_worker w;
    char study[65], mr_study[65];
} fx;

static void copy(const char *from, const char *to)
{
    size_t len = 0;
    char *buf = ts_read_file(from, &len);
    if (!buf || ts_write_file(to, buf, len) != 0)
        fail_msg("could not copy %s to %s", from, to);
    free(buf);
}

static void put(const char *dir, const char *name, const char *file, const void *buf, size_t len)
{
    char p[700];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    mkdir(p, 0755);
    snprintf(p, sizeof(p), "%s/%s/%s", dir, name, file);
    assert_int_equal(ts_write_file(p, buf, len), 0);
}

/* The demo's model.json with name changed and member key set to the JSON value (NULL:
 * removed). */
static char *demo_json_with(const char *name, const char *key, const char *value)
{
    char *path = ts_data("models/" DEMO "/model.json");
    char *txt = ts_read_file(path, NULL);
    cJSON *j = cJSON_Parse(txt);
    cJSON_ReplaceItemInObject(j, "name", cJSON_CreateString(name));
    if (key) {
        cJSON_DeleteItemFromObject(j, key);
        if (value)
            cJSON_AddItemToObject(j, key, cJSON_Parse(value));
    }
    char *out = cJSON_Print(j);
    cJSON_Delete(j);
    free(txt);
    free(path);
    return out;
}

static void make_models(const char *dir)
{
    char from[700], to[700];
    size_t onnx_len = 0;
    char *demo_onnx = NULL, *onnx_path = ts_data("models/" DEMO "/model.onnx");
    demo_onnx = ts_read_file(onnx_path, &onnx_len);
    assert_non_null(demo_onnx);
    mkdir(dir, 0755);
    /* the demo, as generated */
    snprintf(to, sizeof(to), "%s/" DEMO, dir);
    mkdir(to, 0755);
    char *p = ts_data("models/" DEMO "/model.json");
    snprintf(to, sizeof(to), "%s/" DEMO "/model.json", dir);
    copy(p, to);
    free(p);
    snprintf(to, sizeof(to), "%s/" DEMO "/model.onnx", dir);
    copy(onnx_path, to);
    /* model.json that is not valid */
    const char *bad = "{\"name\": \"bad-json\", \"version\": \"1\"}";
    put(dir, "bad-json", "model.json", bad, strlen(bad));
    put(dir, "bad-json", "model.onnx", demo_onnx, onnx_len);
    /* model.json naming another folder */
    char *j = demo_json_with("someone-else", "onnx_sha256", NULL);
    put(dir, "wrong-name", "model.json", j, strlen(j));
    put(dir, "wrong-name", "model.onnx", demo_onnx, onnx_len);
    free(j);
    /* the demo's onnx_sha256 over other bytes */
    j = demo_json_with("sha-mismatch", NULL, NULL);
    put(dir, "sha-mismatch", "model.json", j, strlen(j));
    put(dir, "sha-mismatch", "model.onnx", demo_onnx, onnx_len - 1);
    free(j);
    /* truncated ONNX bytes */
    j = demo_json_with("truncated", "onnx_sha256", NULL);
    put(dir, "truncated", "model.json", j, strlen(j));
    put(dir, "truncated", "model.onnx", demo_onnx, onnx_len / 3);
    free(j);
    /* a network whose output channels do not match the labels */
    j = demo_json_with("two-labels", "labels",
                       "[{\"value\": 1, \"name\": \"Soft tissue\", \"category\": {\"code\": "
                       "\"85756007\", \"scheme\": \"SCT\", \"meaning\": \"Tissue\"}, \"type\": "
                       "{\"code\": \"87784001\", \"scheme\": \"SCT\", \"meaning\": \"Soft "
                       "tissue\"}}]");
    put(dir, "two-labels", "model.json", j, strlen(j));
    put(dir, "two-labels", "model.onnx", demo_onnx, onnx_len);
    free(j);
    /* a 2-D description over a 3-D network */
    j = demo_json_with("flat", "patch_size", "[64, 64]");
    cJSON *o = cJSON_Parse(j);
    cJSON_ReplaceItemInObject(o, "spacing_mm", cJSON_Parse("[2, 2]"));
    cJSON_DeleteItemFromObject(o, "onnx_sha256");
    free(j);
    j = cJSON_Print(o);
    cJSON_Delete(o);
    put(dir, "flat", "model.json", j, strlen(j));
    put(dir, "flat", "model.onnx", demo_onnx, onnx_len);
    free(j);
    /* model.onnx without model.json */
    put(dir, "no-json", "model.onnx", demo_onnx, onnx_len);
    /* a folder that is not a model */
    put(dir, "notes", "README.txt", "x", 1);
    free(demo_onnx);
    free(onnx_path);
    (void)from;
}

static const char *const broken[] = {"bad-json",   "wrong-name", "sha-mismatch", "truncated",
                                     "two-labels", "flat",       "no-json"};
#define NBROKEN (sizeof(broken) / sizeof(broken[0]))

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    lc_err e;
    char buf[700];
    f->url = ts_pg_fresh_db("segmodel");
    if (!f->url)
        fail_msg("RADPIPE_TEST_PG_URL is not set: run through tests/run.sh");
    f->dir = ts_tmpdir("segmodel");
    assert_int_equal(lc_db_connect(f->url, 10000, NULL, &f->db, &e), LC_OK);
    assert_int_equal(lc_db_migrate(f->db, &e), LC_OK);
    snprintf(buf, sizeof(buf), "file://%s/objects", f->dir);
    assert_int_equal(lc_store_open(buf, &f->svc.store, &e), LC_OK);
    if (asprintf(&f->models, "%s/models", f->dir) < 0)
        abort();
    make_models(f->models);
    f->svc.metrics = lc_metrics_new();
    f->svc.db = f->db;
    atomic_init(&f->svc.stop, 0);
    f->cfg.gpu_backend = "cpu";
    f->cfg.cpu_threads = 2;
    f->cfg.max_voxels = 1LL << 30;
    f->cfg.stow_url = "";
    f->cfg.stow_token = "";
    f->cfg.models_dir = f->models;
    if (seg_init(&f->c, &f->svc, &f->cfg, &e) != LC_OK)
        fail_msg("seg_init: %s", e.msg);
    lc_job_worker_init(&f->w, "radpipe.", "/radpipe/test", 30, 3);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    seg_release(&f->c);
    lc_metrics_free(f->svc.metrics);
    lc_store_free(f->svc.store);
    lc_db_free(f->db);
    ts_rmrf(f->dir);
    free(f->dir);
    free(f->models);
    free(f->url);
    free(f);
    return 0;
}

static double metric(fx *f, const char *name, const char *labels)
{
    if (strstr(name, "seconds"))
        return lc_metric_value(lc_metrics_histogram(f->svc.metrics, name, "", labels, NULL, 0));
    return lc_metric_value(lc_metrics_counter(f->svc.metrics, name, "", labels));
}

/* ---- the registry --------------------------------------------------------------------------- */

static void test_registry(void **state)
{
    fx *f = *state;
    const seg_models *ms = &f->c.models;
    char labels[200];
    assert_null(seg_models_find(ms, "notes"));
    assert_null(seg_models_failure(ms, "notes")); /* not a model folder: ignored */
    for (size_t i = 0; i < NBROKEN; i++) {
        const char *why = seg_models_failure(ms, broken[i]);
        if (!why)
            fail_msg("model folder \"%s\" was not reported as failed", broken[i]);
        fprintf(stderr, "%s: %s\n", broken[i], why);
        assert_null(seg_models_find(ms, broken[i]));
        snprintf(labels, sizeof(labels), "model=\"%s\",result=\"error\"", broken[i]);
        assert_true(metric(f, "radpipe_model_loads_total", labels) == 1);
    }
    assert_non_null(strstr(seg_models_failure(ms, "bad-json"), "model.json"));
    assert_non_null(strstr(seg_models_failure(ms, "wrong-name"), "\"someone-else\""));
    assert_non_null(strstr(seg_models_failure(ms, "sha-mismatch"), "SHA-256"));
    assert_non_null(strstr(seg_models_failure(ms, "no-json"), "model.json"));
    PGresult *res = NULL;
    lc_err e;
    assert_int_equal(lc_db_exec(f->db,
                                "SELECT name, version, modality, jsonb_array_length(labels), "
                                "labels->2->'type'->>'code', spatial_dims, spacing_mm::text, "
                                "patch_size::text, sha256, size_bytes, parameters, loaded_by, "
                                "normalization->>'scheme' FROM models ORDER BY name",
                                0, NULL, &res, &e),
                     LC_OK);
    if (!seg_infer_available()) {
        /* without the engine no model can be placed on the backend */
        assert_int_equal(ms->n, 0);
        assert_int_equal(ms->failed, NBROKEN + 1);
        assert_non_null(strstr(seg_models_failure(ms, DEMO), "no inference engine"));
        assert_int_equal(PQntuples(res), 0);
        PQclear(res);
        fprintf(stderr, "this build has no inference engine (gpu/nn): model runs skipped\n");
        return;
    }
    assert_int_equal(ms->n, 1);
    assert_int_equal(ms->failed, NBROKEN);
    assert_non_null(strstr(seg_models_failure(ms, "two-labels"), "output channels"));
    assert_non_null(strstr(seg_models_failure(ms, "flat"), "3-D"));
    assert_non_null(strstr(seg_models_failure(ms, "truncated"), "model.onnx"));
    const seg_model *m = seg_models_find(ms, DEMO);
    assert_non_null(m);
    assert_non_null(m->nn);
    assert_true(m->params > 10000);
    snprintf(labels, sizeof(labels), "model=\"%s\",result=\"ok\"", DEMO);
    assert_true(metric(f, "radpipe_model_loads_total", labels) == 1);
    assert_true(metric(f, "radpipe_model_load_seconds", "model=\"" DEMO "\"") == 1);
    assert_true(
        lc_metric_value(lc_metrics_gauge(f->svc.metrics, "radpipe_models_loaded", "", NULL)) == 1);
    /* the gateway's row */
    assert_int_equal(PQntuples(res), 1);
    assert_string_equal(PQgetvalue(res, 0, 0), DEMO);
    assert_string_equal(PQgetvalue(res, 0, 1), "1.0.0");
    assert_string_equal(PQgetvalue(res, 0, 2), "CT");
    assert_string_equal(PQgetvalue(res, 0, 3), "3");
    assert_string_equal(PQgetvalue(res, 0, 4), "272673000");
    assert_string_equal(PQgetvalue(res, 0, 5), "3");
    assert_string_equal(PQgetvalue(res, 0, 6), "{5,2,2}");
    assert_string_equal(PQgetvalue(res, 0, 7), "{16,64,64}");
    assert_string_equal(PQgetvalue(res, 0, 8), m->sha256);
    assert_int_equal(atoll(PQgetvalue(res, 0, 9)), m->onnx_bytes);
    assert_int_equal(atoll(PQgetvalue(res, 0, 10)), (long long)m->params);
    assert_non_null(strchr(PQgetvalue(res, 0, 11), ':'));
    assert_string_equal(PQgetvalue(res, 0, 12), "ct");
    PQclear(res);
    /* a second segmenter's start upserts the same row */
    assert_int_equal(seg_models_record(ms, f->db, "other-host:1", &e), LC_OK);
    assert_int_equal(
        lc_db_exec(f->db, "SELECT count(*), max(loaded_by) FROM models", 0, NULL, &res, &e), LC_OK);
    assert_string_equal(PQgetvalue(res, 0, 0), "1");
    assert_string_equal(PQgetvalue(res, 0, 1), "other-host:1");
    PQclear(res);
}

/* ---- jobs ----------------------------------------------------------------------------------- */

static lc_rc run_job(fx *f, const char *study, const char *params, cJSON **result, lc_job **jobp,
                     lc_err *e)
{
    lc_job *job = ts_claimed_job(f->db, &f->w, "segment", study, params);
    assert_non_null(job);
    lc_worker_job j = {.job = job, .svc = &f->svc, .db = f->db, .w = &f->w};
    *result = NULL;
    lc_rc rc = seg_job(&f->c, &j, result, e);
    if (jobp)
        *jobp = job;
    else
        lc_job_free(job);
    return rc;
}

static const char *head_dir(void)
{
    static char dir[700];
    const char *samples = ts_samples_dir();
    if (!samples)
        return NULL;
    snprintf(dir, sizeof(dir), "%s/series/ct-philips-head-phantom", samples);
    struct stat st;
    return stat(dir, &st) == 0 ? dir : NULL;
}

static void index_head(fx *f)
{
    const char *dir = head_dir();
    if (!dir) {
        fprintf(stderr, "no shared DICOM samples: ct-philips-head-phantom missing\n");
        skip();
    }
    assert_int_equal(ts_index_dir(f->db, f->svc.store, dir, f->study), 28);
}

/* Unknown and broken models fail the job at once, before any series is read. */
static void test_unknown_and_broken(void **state)
{
    fx *f = *state;
    cJSON *r = NULL;
    lc_err e = {0};
    char *series = ts_test_series();
    assert_true(ts_index_dir(f->db, f->svc.store, series, f->mr_study) > 0);
    free(series);
    assert_int_equal(run_job(f, f->mr_study, "{\"model\":\"nope\"}", &r, NULL, &e), LC_ERR_INVALID);
    assert_non_null(strstr(e.msg, "unknown model \"nope\""));
    if (seg_infer_available())
        assert_non_null(strstr(e.msg, "\"" DEMO "\"")); /* names what it has */
    assert_null(r);
    assert_int_equal(run_job(f, f->mr_study, "{\"model\":\"truncated\"}", &r, NULL, &e),
                     LC_ERR_INVALID);
    assert_non_null(strstr(e.msg, "model \"truncated\" could not be loaded"));
    assert_int_equal(run_job(f, f->mr_study, "{\"model\":\"" DEMO "\",\"nbins\":3}", &r, NULL, &e),
                     LC_ERR_INVALID);
    assert_non_null(strstr(e.msg, "params.nbins"));
    if (!seg_infer_available()) {
        assert_int_equal(run_job(f, f->mr_study, "{\"model\":\"" DEMO "\"}", &r, NULL, &e),
                         LC_ERR_INVALID);
        assert_non_null(strstr(e.msg, "no inference engine"));
        return;
    }
    /* a CT model on an MR series */
    assert_int_equal(run_job(f, f->mr_study, "{\"model\":\"" DEMO "\"}", &r, NULL, &e),
                     LC_ERR_UNSUPPORTED);
    assert_non_null(strstr(e.msg, "is for CT images"));
    assert_null(r);
}

static nifti_image *read_nifti(fx *f, const lc_job *job)
{
    char key[256], *path = NULL;
    lc_err e;
    snprintf(key, sizeof(key), "results/%s/mask.nii.gz", job->id);
    assert_int_equal(lc_store_local_path(f->svc.store, key, &path, &e), LC_OK);
    nifti_image *im = nifti_image_read(path, 1);
    free(path);
    assert_non_null(im);
    return im;
}

/* dciodvfy without errors; dcmdump shows every segment with its codes. */
static void check_seg(fx *f, const lc_job *job, const seg_model *m)
{
    char key[256], *path = NULL, cmd[1200], *out = NULL;
    lc_err e;
    snprintf(key, sizeof(key), "results/%s/segmentation.dcm", job->id);
    assert_int_equal(lc_store_local_path(f->svc.store, key, &path, &e), LC_OK);
    snprintf(cmd, sizeof(cmd), "dciodvfy '%s' 2>&1", path);
    ts_run(cmd, &out);
    for (char *line = out; line && *line;) {
        char *nl = strchr(line, '\n');
        if (strncmp(line, "Error", 5) == 0)
            fail_msg("dciodvfy reports errors in the model's SEG:\n%s", out);
        line = nl ? nl + 1 : NULL;
    }
    free(out);
    snprintf(cmd, sizeof(cmd),
             "dcmdump +P 0062,0002 +P 0062,0004 +P 0062,0005 +P 0008,0100 +P 0028,0008 '%s'", path);
    assert_int_equal(ts_run(cmd, &out), 0);
    for (int i = 0; i < m->d.nlabels; i++) {
        char want[200];
        snprintf(want, sizeof(want), "[%s]", m->d.labels[i].name);
        if (!strstr(out, want))
            fail_msg("the SEG has no segment labelled %s:\n%.2000s", want, out);
        snprintf(want, sizeof(want), "[%s]", m->d.labels[i].type.code);
        if (!strstr(out, want))
            fail_msg("the SEG lacks the type code %s", want);
        snprintf(want, sizeof(want), "(0062,0004) US %d", i + 1);
        if (!strstr(out, want))
            fail_msg("the SEG has no segment number %d", i + 1);
    }
    snprintf(key, sizeof(key), "[%d]", 28 * m->d.nlabels); /* NumberOfFrames */
    assert_non_null(strstr(out, key));
    free(out);
    free(path);
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, size_t n)
{
    qsort(v, n, sizeof(double), cmp_d);
    return n ? v[n / 2] : NAN;
}

static void test_demo_job(void **state)
{
    fx *f = *state;
    if (!seg_infer_available()) {
        fprintf(stderr, "no inference engine in this build: the demo job is skipped\n");
        skip();
    }
    index_head(f);
    seg_model *m = seg_models_find(&f->c.models, DEMO);
    assert_non_null(m);
    cJSON *r = NULL, *r2 = NULL;
    lc_job *job = NULL, *job2 = NULL;
    lc_err e = {0};
    char labels[100];
    snprintf(labels, sizeof(labels), "model=\"%s\",result=\"ok\"", DEMO);
    if (run_job(f, f->study, "{\"model\":\"" DEMO "\"}", &r, &job, &e) != LC_OK)
        fail_msg("model job failed: %s", e.msg);
    char *shown = cJSON_Print(r);
    fprintf(stderr, "%s\n", shown);
    free(shown);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(r, "model"), "name")->valuestring,
                        DEMO);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(r, "resampled")));
    const cJSON *md = cJSON_GetObjectItem(r, "model_dims");
    /* 512 x 0.451171875 mm = 115.5 voxels of 2 mm: 116; 28 slices of 5 mm stay 28 */
    assert_int_equal(cJSON_GetArrayItem(md, 0)->valueint, 116);
    assert_int_equal(cJSON_GetArrayItem(md, 2)->valueint, 28);
    assert_true(cJSON_GetObjectItem(r, "patches")->valuedouble >= 8);

    /* the label map on the series grid, read back through the NIfTI's voxel order */
    nifti_image *im = read_nifti(f, job);
    assert_int_equal(im->nx, 512);
    assert_int_equal(im->ny, 512);
    assert_int_equal(im->nz, 28);
    assert_int_equal(im->datatype, DT_UINT8);
    assert_int_equal(im->intent_code, NIFTI_INTENT_LABEL);
    seg_volume *v = NULL;
    const char *series = cJSON_GetObjectItem(r, "series_instance_uid")->valuestring;
    assert_int_equal(seg_volume_load(f->db, f->svc.store, series, 1u << 30, NULL, &v, &e), LC_OK);
    seg_nifti_geom g;
    size_t *map = NULL;
    assert_int_equal(seg_nifti_geometry(v, &g, &map, &e), LC_OK);
    size_t n = (size_t)im->nvox, count[256] = {0};
    const uint8_t *lab = im->data;
    /* the Hounsfield units under each label (a sample for the medians), and the labels of
     * clear air (< -900 HU) and dense bone (> 400 HU) */
    double *hu[4];
    size_t nh[4] = {0}, air = 0, air_bg = 0, dense = 0, dense_bone = 0;
    for (int c = 0; c < 4; c++)
        hu[c] = malloc(8192 * sizeof(double));
    for (size_t o = 0; o < n; o++)
        count[lab[o]]++;
    size_t seen[4] = {0};
    for (size_t o = 0; o < n; o++) {
        double x = v->data[map[o]];
        /* every k-th voxel of each label: at most 8192 spread over the whole volume */
        if (lab[o] < 4 && seen[lab[o]]++ % (count[lab[o]] / 8192 + 1) == 0 && nh[lab[o]] < 8192)
            hu[lab[o]][nh[lab[o]]++] = x;
        air += x < -900;
        air_bg += x < -900 && lab[o] == 0;
        dense += x > 400;
        dense_bone += x > 400 && lab[o] == 3;
    }
    for (int c = 4; c < 256; c++)
        assert_int_equal(count[c], 0);
    const cJSON *ls = cJSON_GetObjectItem(r, "labels");
    assert_int_equal(cJSON_GetArraySize(ls), 3);
    for (int c = 1; c <= 3; c++)
        assert_int_equal(
            (size_t)cJSON_GetObjectItem(cJSON_GetArrayItem(ls, c - 1), "voxels")->valuedouble,
            count[c]);
    double med[4];
    for (int c = 0; c < 4; c++) {
        med[c] = median(hu[c], nh[c]);
        fprintf(stderr, "label %d: %zu voxels, median %g HU\n", c, count[c], med[c]);
    }
    fprintf(stderr, "air labelled background: %.3f; dense bone labelled bone: %.3f\n",
            (double)air_bg / (double)air, (double)dense_bone / (double)dense);
    /* a meaningful map (the phantom: an air-filled skull with inserts, on a holder): air is
     * background, dense bone is bone, tissue is found, bone lies where the density is; the
     * demo is a tiny network and thin structures blur at 2 mm, so the borders of each label
     * are loose and the checks are on the clear cases */
    assert_true(air > n / 2 && (double)air_bg / (double)air > 0.9);
    assert_true(dense > 10000 && (double)dense_bone / (double)dense > 0.8);
    assert_true(count[1] + count[2] > 5000 && count[3] > 10000);
    assert_true(med[0] < -800 && med[3] > 0);
    for (int c = 0; c < 4; c++)
        free(hu[c]);
    free(map);
    seg_volume_free(v);
    check_seg(f, job, m);
    char key[256], *png = NULL;
    snprintf(key, sizeof(key), "results/%s/preview.png", job->id);
    assert_int_equal(lc_store_local_path(f->svc.store, key, &png, &e), LC_OK);
    free(png);

    /* the second job loads nothing and gives the same labels */
    double loads = metric(f, "radpipe_model_loads_total", labels);
    if (run_job(f, f->study, "{\"model\":\"" DEMO "\",\"stow\":false}", &r2, &job2, &e) != LC_OK)
        fail_msg("second model job failed: %s", e.msg);
    assert_true(metric(f, "radpipe_model_loads_total", labels) == loads);
    assert_true(loads == 1);
    assert_true(metric(f, "radpipe_model_load_seconds", "model=\"" DEMO "\"") == 1);
    assert_true(metric(f, "radpipe_model_jobs_total", "model=\"" DEMO "\"") == 2);
    nifti_image *im2 = read_nifti(f, job2);
    assert_int_equal(memcmp(im->data, im2->data, n), 0);
    char *text = lc_metrics_render(f->svc.metrics);
    assert_non_null(strstr(text, "radpipe_model_loads_total{model=\"" DEMO "\",result=\"ok\"} 1"));
    free(text);
    nifti_image_free(im2);
    nifti_image_free(im);
    cJSON_Delete(r2);
    cJSON_Delete(r);
    lc_job_free(job2);
    lc_job_free(job);
}

/* A stopping service stops the sliding window between patch batches. */
static void test_cancel_between_batches(void **state)
{
    fx *f = *state;
    if (!seg_infer_available())
        skip();
    seg_model *m = seg_models_find(&f->c.models, DEMO);
    assert_non_null(m);
    const size_t nx = 160, ny = 160, nz = 48, n = nx * ny * nz;
    const double sp[3] = {2, 2, 5}; /* the model's spacing: no resampling */
    float *vol = malloc(n * sizeof(float));
    uint8_t *lab = malloc(n);
    for (size_t i = 0; i < n; i++)
        vol[i] = (float)((i * 7919) % 2000) - 1000.0f;
    lc_job *job = ts_claimed_job(f->db, &f->w, "segment", "1.2.3", NULL);
    assert_non_null(job);
    f->svc.cfg.drain_seconds = 0;
    lc_worker_job j = {.job = job, .svc = &f->svc, .db = f->db, .w = &f->w};
    seg_progress pr = {.j = &j, .total = 0};
    seg_infer_stats st;
    lc_err e = {0};
    atomic_store(&f->svc.stop, 1);
    lc_rc rc = seg_infer_run(f->c.gpu, m, vol, nx, ny, nz, sp, &pr, lab, &st, &e);
    atomic_store(&f->svc.stop, 0);
    assert_int_equal(rc, LC_ERR_CANCELLED);
    assert_true(pr.done < pr.total || pr.total == 0); /* not every patch ran */
    /* the context is still usable: the same volume runs to the end */
    pr = (seg_progress){.j = NULL};
    assert_int_equal(seg_infer_run(f->c.gpu, m, vol, nx, ny, nz, sp, &pr, lab, &st, &e), LC_OK);
    assert_true(st.patches > 8 && !st.resampled);
    lc_job_free(job);
    free(lab);
    free(vol);
}

/* Over RADPIPE_GPU_MEMORY_LIMIT the job fails with a clear message; the model still runs
 * afterwards on volumes that fit. */
static void test_memory_limit(void **state)
{
    (void)state;
    if (!seg_infer_available())
        skip();
    char *path = ts_data("models/" DEMO "/model.json");
    char *dir = strdup(path);
    *strrchr(dir, '/') = 0;
    *strrchr(dir, '/') = 0; /* tests/data/models: the demo is the only model.json there */
    gpu_ctx *ctx = NULL;
    gpu_ctx_opts o = {.backend = GPU_BACKEND_CPU, .cpu_threads = 2, .memory_limit = 48u << 20};
    lc_err e = {0};
    assert_int_equal(gpu_ctx_open(&o, &ctx, &e), LC_OK);
    seg_models ms;
    assert_int_equal(seg_models_load(&ms, ctx, dir, NULL, &e), LC_OK);
    seg_model *m = seg_models_find(&ms, DEMO);
    if (!m)
        fail_msg("the demo did not load under a 48 MiB limit: %s",
                 seg_models_failure(&ms, DEMO) ? seg_models_failure(&ms, DEMO) : "?");
    /* 256 x 256 x 96 at the model's spacing: 24 MiB of image, 96 MiB of probabilities */
    const size_t nx = 256, ny = 256, nz = 96, n = nx * ny * nz;
    const double sp[3] = {2, 2, 5};
    float *vol = calloc(n, sizeof(float));
    uint8_t *lab = malloc(n);
    seg_infer_stats st;
    lc_rc rc = seg_infer_run(ctx, m, vol, nx, ny, nz, sp, NULL, lab, &st, &e);
    assert_int_equal(rc, LC_ERR_TOO_LARGE);
    fprintf(stderr, "over the limit: %s\n", e.msg);
    gpu_mem_stats ms0;
    gpu_ctx_memory(ctx, &ms0);
    assert_true(ms0.used < ms0.limit);
    assert_int_equal(seg_infer_run(ctx, m, vol, 64, 64, 16, sp, NULL, lab, &st, &e), LC_OK);
    free(lab);
    free(vol);
    seg_models_release(&ms);
    gpu_ctx_free(ctx);
    free(dir);
    free(path);
}

int main(void)
{
    lc_log_init("test_seg_model", LC_LOG_WARN);
    nifti_set_debug_level(0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_desc_cases),
        cmocka_unit_test(test_desc_demo),
        cmocka_unit_test_setup_teardown(test_registry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_and_broken, setup, teardown),
        cmocka_unit_test_setup_teardown(test_demo_job, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_between_batches, setup, teardown),
        cmocka_unit_test(test_memory_limit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
