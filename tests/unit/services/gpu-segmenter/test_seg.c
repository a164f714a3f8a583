/*
 * test_seg.c: volume assembly and the segment job on the CPU backend against real
 * PostgreSQL, a real store and a real compressed MR series: slice order follows the position
 * along the normal (not file or instance order), the mask has the volume's dimensions, the
 * threshold matches scikit-image's threshold_otsu on the same volume, the mask is exactly
 * the voxels above it, and bad geometry fails with a reason instead of a guess.
 */
#include <math.h>
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
#include "seg.h"
#include "ts.h"
#include "ts_index.h"

typedef struct fx {
    char *url, *dir;
    lc_db *db;
    lc_service svc;
    seg_cfg cfg;
    seg_ctx c;
    lc_job_worker w;
    char study[65];
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
    f->url = ts_pg_fresh_db("seg");
    if (!f->url)
        fail_msg("RADPIPE_TEST_PG_URL is not set: run through tests/run.sh");
    f->dir = ts_tmpdir("seg");
    assert_int_equal(lc_db_connect(f->url, 10000, NULL, &f->db, &e), LC_OK);
    assert_int_equal(lc_db_migrate(f->db, &e), LC_OK);
    snprintf(buf, sizeof(buf), "file://%s/objects", f->dir);
    assert_int_equal(lc_store_open(buf, &f->svc.store, &e), LC_OK);
    f->svc.metrics = lc_metrics_new();
    atomic_init(&f->svc.stop, 0);
    f->cfg.gpu_backend = "cpu";
    f->cfg.cpu_threads = 2;
    assert_int_equal(seg_init(&f->c, &f->svc, &f->cfg, &e), LC_OK);
    lc_job_worker_init(&f->w, "radpipe.", "/radpipe/test", 30, 3);
    char *sd = series_dir();
    assert_int_equal(ts_index_dir(f->db, f->svc.store, sd, f->study), 4);
    free(sd);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    seg_release(&f->c);
    lc_store_free(f->svc.store);
    lc_metrics_free(f->svc.metrics);
    lc_db_free(f->db);
    ts_rmrf(f->dir);
    free(f->dir);
    free(f->url);
    free(f);
    return 0;
}

static char *series_of(fx *f)
{
    PGresult *r = NULL;
    lc_err e;
    const char *p[1] = {f->study};
    assert_int_equal(
        lc_db_exec(f->db, "SELECT series_uid FROM series WHERE study_uid = $1", 1, p, &r, &e),
        LC_OK);
    char *s = strdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    return s;
}

static void test_volume_order_and_affine(void **state)
{
    fx *f = *state;
    lc_err e;
    seg_volume *v = NULL;
    char *series = series_of(f);
    /* shuffle what InstanceNumber says, so only the geometry can give the order */
    const char *p[1] = {series};
    assert_int_equal(lc_db_exec(f->db,
                                "UPDATE instances SET instance_number = 100 - instance_number "
                                "WHERE series_uid = $1",
                                1, p, NULL, &e),
                     LC_OK);
    assert_int_equal(seg_volume_load(f->db, f->svc.store, series, NULL, &v, &e), LC_OK);
    assert_int_equal(v->nx, 256);
    assert_int_equal(v->ny, 256);
    assert_int_equal(v->nz, 4);
    assert_int_equal(v->nsop, 4);
    /* consecutive slices step along the normal by a positive, equal amount */
    double nrm[3] = {v->affine[0][2], v->affine[1][2], v->affine[2][2]};
    double prev = -INFINITY;
    for (size_t k = 0; k < v->nsop; k++) {
        PGresult *r = NULL;
        const char *q[1] = {v->sop_uids[k]};
        assert_int_equal(lc_db_exec(f->db,
                                    "SELECT image_position[1], image_position[2], "
                                    "image_position[3] FROM instances WHERE sop_uid = $1",
                                    1, q, &r, &e),
                         LC_OK);
        double pos = 0;
        for (int i = 0; i < 3; i++)
            pos += strtod(PQgetvalue(r, 0, i), NULL) * nrm[i];
        if (k == 0)
            for (int i = 0; i < 3; i++) /* the affine's origin is the first slice's IPP */
                assert_true(fabs(strtod(PQgetvalue(r, 0, i), NULL) - v->affine[i][3]) < 1e-6);
        PQclear(r);
        assert_true(pos > prev);
        prev = pos;
    }
    assert_true(v->spacing_uniform);
    assert_true(v->spacing[2] > 0);
    /* row/column directions are unit cosines times the pixel spacing */
    double cx = sqrt(v->affine[0][0] * v->affine[0][0] + v->affine[1][0] * v->affine[1][0] +
                     v->affine[2][0] * v->affine[2][0]);
    assert_true(fabs(cx - v->spacing[0]) < 1e-6);
    seg_volume_free(v);
    free(series);
}

static void test_job_mask_matches_skimage(void **state)
{
    fx *f = *state;
    lc_err e;
    cJSON *result = NULL;
    seg_volume *v = NULL;
    lc_job *job = ts_claimed_job(f->db, &f->w, "segment", f->study, "{\"algorithm\":\"otsu\"}");
    assert_non_null(job);
    lc_worker_job j = {.job = job, .svc = &f->svc, .db = f->db, .w = &f->w};
    assert_int_equal(seg_job(&f->c, &j, &result, &e), LC_OK);
    double thr = cJSON_GetObjectItem(result, "threshold")->valuedouble;
    double fg = cJSON_GetObjectItem(result, "voxels_in_mask")->valuedouble;
    cJSON *dims = cJSON_GetObjectItem(result, "dims");
    assert_int_equal(cJSON_GetArrayItem(dims, 0)->valueint, 256);
    assert_int_equal(cJSON_GetArrayItem(dims, 2)->valueint, 4);

    /* the artifacts: rows in job_artifacts and objects in the store */
    char key[256];
    snprintf(key, sizeof(key), "results/%s/mask.raw", job->id);
    void *mask = NULL;
    size_t mlen = 0;
    assert_int_equal(lc_store_get_buf(f->svc.store, key, 1 << 26, &mask, &mlen, &e), LC_OK);
    assert_int_equal(mlen, 256 * 256 * 4);
    snprintf(key, sizeof(key), "results/%s/mask.json", job->id);
    char *meta_txt = NULL;
    size_t jlen = 0;
    assert_int_equal(lc_store_get_buf(f->svc.store, key, 1 << 20, (void **)&meta_txt, &jlen, &e),
                     LC_OK);
    cJSON *meta = cJSON_Parse(meta_txt);
    assert_non_null(meta);
    assert_int_equal(cJSON_GetArrayItem(cJSON_GetObjectItem(meta, "dims"), 1)->valueint, 256);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(meta, "slice_sop_instance_uids")), 4);
    PGresult *r = NULL;
    const char *p[1] = {job->id};
    assert_int_equal(lc_db_exec(f->db,
                                "SELECT name, size_bytes FROM job_artifacts WHERE job_id = $1 "
                                "ORDER BY name",
                                1, p, &r, &e),
                     LC_OK);
    assert_int_equal(PQntuples(r), 2);
    assert_string_equal(PQgetvalue(r, 0, 0), "mask.json");
    assert_string_equal(PQgetvalue(r, 1, 0), "mask.raw");
    assert_int_equal(atoi(PQgetvalue(r, 1, 1)), 256 * 256 * 4);
    PQclear(r);

    /* the mask is exactly the voxels above the threshold of the assembled volume */
    char *series = series_of(f);
    assert_int_equal(seg_volume_load(f->db, f->svc.store, series, NULL, &v, &e), LC_OK);
    size_t n = v->nx * v->ny * v->nz, above = 0, same = 0;
    for (size_t i = 0; i < n; i++) {
        int in = v->data[i] > (float)thr;
        above += in;
        same += in == ((unsigned char *)mask)[i];
    }
    assert_int_equal(same, n);
    assert_true((double)above == fg);
    assert_true(fg > 0 && fg < (double)n);

    /* scikit-image on the same volume gives the same threshold (within float rounding) */
    char path[600], cmd[1400], *out = NULL;
    snprintf(path, sizeof(path), "%s/vol.f32", f->dir);
    assert_int_equal(ts_write_file(path, v->data, n * sizeof(float)), 0);
    snprintf(cmd, sizeof(cmd),
             "/usr/bin/python3 -c \"import numpy as np; from skimage.filters import "
             "threshold_otsu; print(repr(float(threshold_otsu(np.fromfile('%s', "
             "dtype=np.float32), nbins=256))))\"",
             path);
    int st = ts_run(cmd, &out);
    if (st != 0)
        fail_msg("scikit-image is needed for this check (deploy/install-deps.sh installs it)");
    double sk = strtod(out, NULL);
    free(out);
    float lo = v->data[0], hi = v->data[0];
    for (size_t i = 1; i < n; i++) {
        lo = v->data[i] < lo ? v->data[i] : lo;
        hi = v->data[i] > hi ? v->data[i] : hi;
    }
    if (fabs(sk - thr) > 1e-4 * (hi - lo))
        fail_msg("threshold %.6f differs from scikit-image's %.6f", thr, sk);

    cJSON_Delete(meta);
    free(meta_txt);
    free(mask);
    free(series);
    seg_volume_free(v);
    cJSON_Delete(result);
    lc_job_free(job);
}

/* Insert a synthetic instance row (no object needed: geometry is checked first). */
static void add_row(fx *f, const char *series, const char *sop, int rows, const char *ipp,
                    const char *iop)
{
    lc_err e;
    const char *p[3] = {series, f->study, NULL};
    assert_int_equal(lc_db_exec(f->db,
                                "INSERT INTO series (series_uid, study_uid) VALUES ($1, $2) "
                                "ON CONFLICT DO NOTHING",
                                2, p, NULL, &e),
                     LC_OK);
    const char *q[6] = {sop, series, f->study, rows ? (rows == 64 ? "64" : "32") : "0", ipp, iop};
    assert_int_equal(lc_db_exec(f->db,
                                "INSERT INTO instances (sop_uid, series_uid, study_uid, "
                                "sop_class_uid, rows, columns, image_position, "
                                "image_orientation, store_key, size_bytes, sha256) VALUES "
                                "($1, $2, $3, '1.2.840.10008.5.1.4.1.1.4', $4::int, 64, $5, $6, "
                                "'missing', 0, '')",
                                6, q, NULL, &e),
                     LC_OK);
}

static void expect_load_error(fx *f, const char *series, lc_rc want, const char *needle)
{
    lc_err e;
    seg_volume *v = NULL;
    lc_rc rc = seg_volume_load(f->db, f->svc.store, series, NULL, &v, &e);
    assert_null(v);
    if (rc != want || !strstr(e.msg, needle))
        fail_msg("series %s: got %s \"%s\", expected \"%s\"", series, lc_strerror(rc), e.msg,
                 needle);
    assert_false(lc_rc_is_transient(rc)); /* the job goes dead, not into endless retries */
}

static void test_bad_geometry_is_reported(void **state)
{
    fx *f = *state;
    const char *ax = "{1,0,0,0,1,0}";
    add_row(f, "9.1", "9.1.1", 64, "{0,0,0}", ax);
    add_row(f, "9.1", "9.1.2", 32, "{0,0,1}", ax);
    expect_load_error(f, "9.1", LC_ERR_INVALID, "mixed slice sizes");
    add_row(f, "9.2", "9.2.1", 64, "{0,0,0}", ax);
    add_row(f, "9.2", "9.2.2", 64, "{0,0,0}", ax);
    expect_load_error(f, "9.2", LC_ERR_INVALID, "duplicate slice positions");
    add_row(f, "9.3", "9.3.1", 64, "{0,0,0}", ax);
    add_row(f, "9.3", "9.3.2", 64, "{0,0,1}", "{0,1,0,0,0,-1}");
    expect_load_error(f, "9.3", LC_ERR_INVALID, "mixed orientations");
    add_row(f, "9.4", "9.4.1", 64, "{0,0,0}", ax);
    add_row(f, "9.4", "9.4.2", 64, NULL, ax);
    expect_load_error(f, "9.4", LC_ERR_INVALID, "lacks ImagePositionPatient");
    add_row(f, "9.5", "9.5.1", 0, NULL, NULL);
    expect_load_error(f, "9.5", LC_ERR_UNSUPPORTED, "is not an image");
    expect_load_error(f, "9.6", LC_ERR_NOT_FOUND, "no indexed instances");
}

static void test_bad_params(void **state)
{
    fx *f = *state;
    static const char *const bad[][2] = {
        {"{\"algorithm\":\"unet\"}", "params.algorithm"},
        {"{\"nbins\":1}", "params.nbins"},
        {"{\"nbins\":2.5}", "params.nbins"},
        {"{\"colour\":\"red\"}", "unknown parameter \"colour\""},
        {"{\"series_instance_uid\":7}", "params.series_instance_uid"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        lc_err e;
        cJSON *result = NULL;
        lc_job *job = ts_claimed_job(f->db, &f->w, "segment", f->study, bad[i][0]);
        lc_worker_job j = {.job = job, .svc = &f->svc, .db = f->db, .w = &f->w};
        assert_int_equal(seg_job(&f->c, &j, &result, &e), LC_ERR_INVALID);
        if (!strstr(e.msg, bad[i][1]))
            fail_msg("%s: \"%s\" lacks \"%s\"", bad[i][0], e.msg, bad[i][1]);
        assert_null(result);
        lc_job_free(job);
    }
}

int main(void)
{
    lc_log_init("test_seg", LC_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_volume_order_and_affine, setup, teardown),
        cmocka_unit_test_setup_teardown(test_job_mask_matches_skimage, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_geometry_is_reported, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_params, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
