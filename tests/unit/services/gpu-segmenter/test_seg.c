/*
 * test_seg.c: volume assembly and the segment job on the CPU backend against real
 * PostgreSQL, a real store and real DICOM files: slice order follows the position along the
 * normal (not file or instance order), every compressed syntax gives the same volume, the
 * three artifacts are stored and listed, the mask equals the voxels above the threshold that
 * scikit-image's threshold_otsu finds on the same volume, the body and threshold pipelines
 * give sane masks, an enhanced multi-frame object is assembled from its per-frame groups,
 * malformed series (missing slices, mixed orientations, a non-image object) fail with a
 * reason, and a job stops when its service stops.
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
#include "ts_proc.h"

typedef struct fx {
    char *url, *dir;
    lc_db *db;
    lc_service svc;
    seg_cfg cfg;
    seg_ctx c;
    lc_job_worker w;
    char study[65];
} fx;

static int setup_empty(void **state)
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
    f->cfg.max_voxels = 1LL << 30;
    f->cfg.stow_url = "";
    f->cfg.stow_token = "";
    assert_int_equal(seg_init(&f->c, &f->svc, &f->cfg, &e), LC_OK);
    lc_job_worker_init(&f->w, "radpipe.", "/radpipe/test", 30, 3);
    *state = f;
    return 0;
}

static int setup(void **state)
{
    setup_empty(state);
    fx *f = *state;
    char *sd = ts_test_series();
    assert_int_equal(ts_index_dir(f->db, f->svc.store, sd, f->study), 4);
    free(sd);
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
    assert_int_equal(lc_db_exec(f->db,
                                "SELECT series_uid FROM series WHERE study_uid = $1 ORDER BY "
                                "num_instances DESC LIMIT 1",
                                1, p, &r, &e),
                     LC_OK);
    char *s = strdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    return s;
}

/* Run a segment job with params; returns its rc, *result and the message in e. */
static lc_rc run_job(fx *f, const char *params, cJSON **result, lc_job **jobp, lc_err *e)
{
    lc_job *job = ts_claimed_job(f->db, &f->w, "segment", f->study, params);
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

/* The stored artifact of job as a local path (file:// store). */
static char *artifact_path(fx *f, const lc_job *job, const char *name)
{
    char key[256], *path = NULL;
    lc_err e;
    snprintf(key, sizeof(key), "results/%s/%s", job->id, name);
    assert_int_equal(lc_store_local_path(f->svc.store, key, &path, &e), LC_OK);
    return path;
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
    assert_int_equal(seg_volume_load(f->db, f->svc.store, series, 1 << 30, NULL, &v, &e), LC_OK);
    assert_int_equal(v->nx, 256);
    assert_int_equal(v->ny, 256);
    assert_int_equal(v->nz, 4);
    assert_int_equal(v->nt, 1);
    assert_true(v->acq_3d); /* MRAcquisitionType 3D */
    /* consecutive slices step along the normal by a positive, equal amount */
    double nrm[3] = {v->affine[0][2], v->affine[1][2], v->affine[2][2]};
    double prev = -INFINITY;
    for (size_t k = 0; k < v->nz; k++) {
        double pos = 0;
        for (int i = 0; i < 3; i++)
            pos += v->slices[k].ipp[i] * nrm[i];
        if (k == 0)
            for (int i = 0; i < 3; i++) /* the affine's origin is the first slice's IPP */
                assert_true(fabs(v->slices[0].ipp[i] - v->affine[i][3]) < 1e-9);
        assert_true(pos > prev);
        prev = pos;
        /* voxel (0, 0, k) lands on slice k's position */
        for (int i = 0; i < 3; i++)
            assert_true(fabs(v->affine[i][3] + (double)k * v->affine[i][2] - v->slices[k].ipp[i]) <
                        1e-6);
    }
    assert_true(v->spacing_uniform);
    assert_true(fabs(v->spacing[2] - 1.0) < 1e-6);
    double cx = sqrt(v->affine[0][0] * v->affine[0][0] + v->affine[1][0] * v->affine[1][0] +
                     v->affine[2][0] * v->affine[2][0]);
    assert_true(fabs(cx - v->spacing[0]) < 1e-9);
    assert_non_null(v->ref);
    assert_string_equal(v->ref->study_instance_uid, f->study);
    seg_volume_free(v);
    free(series);
}

/* The same series in JPEG lossless, JPEG-LS, JPEG 2000 and RLE decodes to one volume. */
static void test_compressed_syntaxes_agree(void **state)
{
    fx *f = *state;
    const char *s = ts_samples_dir();
    if (!s) {
        fprintf(stderr, "shared samples missing: compressed variants skipped\n");
        skip();
    }
    static const char *const variants[] = {"jpeg-lossless-sv1", "jpeg-ls-lossless", "j2k-lossless",
                                           "rle"};
    float *first = NULL;
    size_t n = 0;
    for (size_t i = 0; i < 4; i++) {
        lc_err e;
        char dir[600], url[700];
        seg_volume *v = NULL;
        lc_store *st = NULL;
        lc_db *db = NULL;
        char *dburl = ts_pg_fresh_db("segsyn");
        assert_int_equal(lc_db_connect(dburl, 10000, NULL, &db, &e), LC_OK);
        assert_int_equal(lc_db_migrate(db, &e), LC_OK);
        snprintf(url, sizeof(url), "file://%s/objects-%zu", f->dir, i);
        assert_int_equal(lc_store_open(url, &st, &e), LC_OK);
        snprintf(dir, sizeof(dir), "%s/series/mr-4slice-compressed/%s", s, variants[i]);
        char study[65];
        assert_int_equal(ts_index_dir(db, st, dir, study), 4);
        PGresult *r = NULL;
        assert_int_equal(lc_db_exec(db, "SELECT series_uid FROM series", 0, NULL, &r, &e), LC_OK);
        if (seg_volume_load(db, st, PQgetvalue(r, 0, 0), 1 << 30, NULL, &v, &e) != LC_OK)
            fail_msg("%s: %s", variants[i], e.msg);
        PQclear(r);
        if (!first) {
            n = v->nx * v->ny * v->nz;
            first = malloc(n * sizeof(float));
            memcpy(first, v->data, n * sizeof(float));
        } else if (memcmp(first, v->data, n * sizeof(float)) != 0) {
            fail_msg("%s decodes to other values than %s", variants[i], variants[0]);
        }
        seg_volume_free(v);
        lc_store_free(st);
        lc_db_free(db);
        free(dburl);
    }
    free(first);
}

static void test_job_outputs_and_mask(void **state)
{
    fx *f = *state;
    lc_err e;
    cJSON *result = NULL;
    lc_job *job = NULL;
    seg_volume *v = NULL;
    if (run_job(f, "{\"algorithm\":\"otsu\"}", &result, &job, &e) != LC_OK)
        fail_msg("job failed: %s", e.msg);
    double thr = cJSON_GetObjectItem(result, "threshold")->valuedouble;
    double fg = cJSON_GetObjectItem(result, "voxels_in_mask")->valuedouble;
    cJSON *dims = cJSON_GetObjectItem(result, "dims");
    assert_int_equal(cJSON_GetArraySize(dims), 3);
    assert_int_equal(cJSON_GetArrayItem(dims, 2)->valueint, 4);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(result, "spacing_uniform")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(result, "stowed")));

    /* three artifacts, as rows with their media types and as objects of that size */
    PGresult *r = NULL;
    const char *p[1] = {job->id};
    assert_int_equal(lc_db_exec(f->db,
                                "SELECT name, media_type, size_bytes, store_key FROM "
                                "job_artifacts WHERE job_id = $1 ORDER BY name",
                                1, p, &r, &e),
                     LC_OK);
    assert_int_equal(PQntuples(r), 3);
    static const char *const want[3][2] = {{"mask.nii.gz", "application/gzip"},
                                           {"preview.png", "image/png"},
                                           {"segmentation.dcm", "application/dicom"}};
    for (int i = 0; i < 3; i++) {
        lc_store_stat st;
        assert_string_equal(PQgetvalue(r, i, 0), want[i][0]);
        assert_string_equal(PQgetvalue(r, i, 1), want[i][1]);
        assert_int_equal(lc_store_head(f->svc.store, PQgetvalue(r, i, 3), &st, &e), LC_OK);
        assert_int_equal(st.size, atoll(PQgetvalue(r, i, 2)));
    }
    PQclear(r);
    /* progress ended at its total */
    assert_int_equal(lc_db_exec(f->db,
                                "SELECT (progress->>'done')::int, (progress->>'total')::int FROM "
                                "jobs WHERE id = $1",
                                1, p, &r, &e),
                     LC_OK);
    assert_int_equal(atoi(PQgetvalue(r, 0, 0)), atoi(PQgetvalue(r, 0, 1)));
    assert_int_equal(atoi(PQgetvalue(r, 0, 1)), 5 + 2 * 4);
    PQclear(r);

    /* the PNG is a PNG */
    char *png = artifact_path(f, job, "preview.png");
    size_t plen = 0;
    char *pb = ts_read_file(png, &plen);
    assert_true(plen > 8 && memcmp(pb, "\x89PNG\r\n\x1a\n", 8) == 0);
    free(pb);
    free(png);

    /* the NIfTI holds exactly the voxels above the threshold of the assembled volume, in
     * dcm2niix's order (this 3D MR acquisition is reoriented: see seg_nifti_geometry) */
    char *nii = artifact_path(f, job, "mask.nii.gz");
    nifti_image *nim = nifti_image_read(nii, 1);
    assert_non_null(nim);
    assert_int_equal(nim->datatype, DT_UINT8);
    char *series = series_of(f);
    assert_int_equal(seg_volume_load(f->db, f->svc.store, series, 1 << 30, NULL, &v, &e), LC_OK);
    seg_nifti_geom g;
    size_t *map = NULL;
    assert_int_equal(seg_nifti_geometry(v, &g, &map, &e), LC_OK);
    assert_int_equal(nim->nx, (int)g.dims[0]);
    assert_int_equal(nim->ny, (int)g.dims[1]);
    assert_int_equal(nim->nz, (int)g.dims[2]);
    size_t n = v->nx * v->ny * v->nz, above = 0, same = 0;
    const uint8_t *m = nim->data;
    for (size_t o = 0; o < n; o++) {
        int in = v->data[map[o]] > (float)thr;
        above += in;
        same += in == m[o];
    }
    assert_int_equal(same, n);
    assert_true((double)above == fg);
    assert_true(fg > 0 && fg < (double)n);
    free(map);
    nifti_image_free(nim);
    free(nii);

    /* scikit-image on the same volume gives the same threshold (within float rounding) */
    char path[600], cmd[1400], *out = NULL;
    snprintf(path, sizeof(path), "%s/vol.f32", f->dir);
    assert_int_equal(ts_write_file(path, v->data, n * sizeof(float)), 0);
    snprintf(cmd, sizeof(cmd),
             "/usr/bin/python3 -c \"import numpy as np; from skimage.filters import "
             "threshold_otsu; print(repr(float(threshold_otsu(np.fromfile('%s', "
             "dtype=np.float32), nbins=256))))\"",
             path);
    if (ts_run(cmd, &out) != 0)
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

    /* a second run of the same job replaces its artifacts instead of adding rows */
    lc_worker_job j2 = {.job = job, .svc = &f->svc, .db = f->db, .w = &f->w};
    cJSON *r2 = NULL;
    assert_int_equal(seg_job(&f->c, &j2, &r2, &e), LC_OK);
    assert_int_equal(
        lc_db_exec(f->db, "SELECT count(*) FROM job_artifacts WHERE job_id = $1", 1, p, &r, &e),
        LC_OK);
    assert_int_equal(atoi(PQgetvalue(r, 0, 0)), 3);
    PQclear(r);
    cJSON_Delete(r2);

    free(series);
    seg_volume_free(v);
    cJSON_Delete(result);
    lc_job_free(job);
}

/* A CT series of nslices copies of a real abdominal slice (patient, couch, air around),
 * 1 mm apart, made with DCMTK's dcmodify. Returns the series directory, NULL without the
 * shared samples. */
static char *make_ct(fx *f, int nslices)
{
    const char *s = ts_samples_dir();
    char *src = NULL, *dir = NULL;
    if (!s)
        return NULL;
    if (asprintf(&src, "%s/seg/dcmqi-liver/ct/01.dcm", s) < 0 ||
        asprintf(&dir, "%s/ct", f->dir) < 0)
        abort();
    mkdir(dir, 0755);
    if (ts_make_series(src, nslices, dir, "1.2.826.0.1.3680043.9.7777.1",
                       "1.2.826.0.1.3680043.9.7777.2") != 0)
        fail_msg("dcmodify could not make the CT series");
    free(src);
    return dir;
}

static void test_body_and_threshold(void **state)
{
    fx *f = *state;
    lc_err e;
    cJSON *result = NULL;
    char *dir = make_ct(f, 6);
    if (!dir) {
        fprintf(stderr, "shared samples missing: body test skipped\n");
        skip();
    }
    assert_int_equal(ts_index_dir(f->db, f->svc.store, dir, f->study), 6);
    /* body: one component, holes filled, threshold between air and soft tissue */
    if (run_job(f,
                "{\"algorithm\":\"body\",\"series_instance_uid\":\"1.2.826.0.1.3680043.9.7777.2\"}",
                &result, NULL, &e) != LC_OK)
        fail_msg("body job failed: %s", e.msg);
    double thr = cJSON_GetObjectItem(result, "threshold")->valuedouble;
    double body = cJSON_GetObjectItem(result, "voxels_in_mask")->valuedouble;
    assert_true(thr > -900 && thr < -100);
    assert_int_equal(cJSON_GetObjectItem(result, "components_kept")->valueint, 1);
    double frac = body / (512.0 * 512.0 * 6);
    fprintf(stderr, "DEBUG body thr=%g frac=%g\n", thr, frac);
    if (!(frac > 0.15 && frac < 0.8))
        fail_msg("body covers %.3f of the volume", frac);
    cJSON_Delete(result);
    /* bone: a HU range, 26-connected components of at least 20 mm3 */
    if (run_job(
            f,
            "{\"algorithm\":\"threshold\",\"series_instance_uid\":\"1.2.826.0.1.3680043.9.7777.2\","
            "\"lower\":300,\"min_component_mm3\":20,\"morphology\":[{\"op\":\"close\","
            "\"radius_mm\":1}]}",
            &result, NULL, &e) != LC_OK)
        fail_msg("threshold job failed: %s", e.msg);
    double bone = cJSON_GetObjectItem(result, "voxels_in_mask")->valuedouble;
    assert_true(bone > 0 && bone < body);
    cJSON_Delete(result);
    free(dir);
}

/* An enhanced multi-frame object: one instance, 6 frames with per-frame positions. */
static void test_enhanced_multiframe(void **state)
{
    fx *f = *state;
    lc_err e;
    cJSON *result = NULL;
    lc_job *job = NULL;
    const char *s = ts_samples_dir();
    if (!s) {
        fprintf(stderr, "shared samples missing: multi-frame test skipped\n");
        skip();
    }
    char path[600];
    snprintf(path, sizeof(path), "%s/multiframe/siemens_xa10_enhanced_mr_6fr.dcm", s);
    assert_int_equal(ts_index_file(f->db, f->svc.store, path, f->study), 0);
    lc_dicom_header *h = NULL;
    assert_int_equal(lc_dicom_read_header(path, &h, &e), LC_OK);
    char params[200];
    snprintf(params, sizeof(params), "{\"series_instance_uid\":\"%s\"}", h->series_instance_uid);
    if (run_job(f, params, &result, &job, &e) != LC_OK)
        fail_msg("multi-frame job failed: %s", e.msg);
    cJSON *dims = cJSON_GetObjectItem(result, "dims");
    assert_int_equal(cJSON_GetArrayItem(dims, 0)->valueint, 64);
    assert_int_equal(cJSON_GetArrayItem(dims, 2)->valueint, 6);
    /* the SEG references the frames of the one source instance */
    char *seg = artifact_path(f, job, "segmentation.dcm"), cmd[800], *out = NULL;
    snprintf(cmd, sizeof(cmd), "dcmdump +P 0008,1160 +P 0008,1155 '%s'", seg);
    assert_int_equal(ts_run(cmd, &out), 0);
    assert_non_null(strstr(out, h->sop_instance_uid));
    for (int k = 1; k <= 6; k++) {
        char want[32];
        snprintf(want, sizeof(want), "IS [%d]", k);
        if (!strstr(out, want))
            fail_msg("no ReferencedFrameNumber %d in\n%s", k, out);
    }
    free(out);
    free(seg);
    lc_dicom_header_free(h);
    cJSON_Delete(result);
    lc_job_free(job);
}

static void expect_job_error(fx *f, const char *params, lc_rc want, const char *needle)
{
    lc_err e;
    cJSON *result = NULL;
    lc_rc rc = run_job(f, params, &result, NULL, &e);
    assert_null(result);
    if (rc != want || !strstr(e.msg, needle))
        fail_msg("%s: got %s \"%s\", expected \"%s\"", params, lc_strerror(rc), e.msg, needle);
    assert_false(lc_rc_is_transient(rc)); /* the job goes dead, not into endless retries */
}

/* Malformed series made from real files with DCMTK's dcmodify. */
static void test_malformed_series_fail(void **state)
{
    fx *f = *state;
    char cmd[2000], dir[600];
    const char *s = ts_samples_dir();
    char *src = ts_test_series();
    char **files = ts_list_files(src);
    /* missing slice: slices 1, 2 and 4 of a regular stack */
    snprintf(dir, sizeof(dir), "%s/gap", f->dir);
    mkdir(dir, 0755);
    for (int i = 0; i < 4; i++) {
        if (i == 2)
            continue;
        snprintf(
            cmd, sizeof(cmd),
            "cp '%s' '%s/%d.dcm' && dcmodify -nb -q -m '(0020,000E)=1.2.826.0.1.3680043.9.7777.10' "
            "-m '(0008,0018)=1.2.826.0.1.3680043.9.7777.10.%d' '%s/%d.dcm'",
            files[i], dir, i, i, dir, i);
        assert_int_equal(ts_run(cmd, NULL), 0);
    }
    assert_int_equal(ts_index_dir(f->db, f->svc.store, dir, NULL), 3);
    expect_job_error(f, "{\"series_instance_uid\":\"1.2.826.0.1.3680043.9.7777.10\"}",
                     LC_ERR_INVALID, "missing slices");
    /* mixed orientations: one slice tilted by 10 degrees */
    snprintf(dir, sizeof(dir), "%s/orient", f->dir);
    mkdir(dir, 0755);
    for (int i = 0; i < 4; i++) {
        snprintf(
            cmd, sizeof(cmd),
            "cp '%s' '%s/%d.dcm' && dcmodify -nb -q -m '(0020,000E)=1.2.826.0.1.3680043.9.7777.11' "
            "-m '(0008,0018)=1.2.826.0.1.3680043.9.7777.11.%d' %s '%s/%d.dcm'",
            files[i], dir, i, i,
            i == 1 ? "-m '(0020,0037)=0\\0.98480775\\0.17364818\\0\\-0.17364818\\-0.98480775'" : "",
            dir, i);
        assert_int_equal(ts_run(cmd, NULL), 0);
    }
    assert_int_equal(ts_index_dir(f->db, f->svc.store, dir, NULL), 4);
    expect_job_error(f, "{\"series_instance_uid\":\"1.2.826.0.1.3680043.9.7777.11\"}",
                     LC_ERR_INVALID, "mixed orientations");
    /* a non-image object (an RT Structure Set) in the series */
    if (s) {
        snprintf(dir, sizeof(dir), "%s/rt", f->dir);
        mkdir(dir, 0755);
        for (int i = 0; i < 2; i++) {
            snprintf(cmd, sizeof(cmd),
                     "cp '%s' '%s/%d.dcm' && dcmodify -nb -q -m "
                     "'(0020,000E)=1.2.826.0.1.3680043.9.7777.12' -m "
                     "'(0008,0018)=1.2.826.0.1.3680043.9.7777.12.%d' '%s/%d.dcm'",
                     files[i], dir, i, i, dir, i);
            assert_int_equal(ts_run(cmd, NULL), 0);
        }
        snprintf(cmd, sizeof(cmd),
                 "cp '%s/other/rtstruct.dcm' '%s/2.dcm' && dcmodify -nb -q -m '(0020,000D)=%s' "
                 "-m '(0020,000E)=1.2.826.0.1.3680043.9.7777.12' '%s/2.dcm'",
                 s, dir, f->study, dir);
        assert_int_equal(ts_run(cmd, NULL), 0);
        assert_int_equal(ts_index_dir(f->db, f->svc.store, dir, NULL), 3);
        expect_job_error(f, "{\"series_instance_uid\":\"1.2.826.0.1.3680043.9.7777.12\"}",
                         LC_ERR_UNSUPPORTED, "is not an image");
    }
    expect_job_error(f, "{\"series_instance_uid\":\"1.2.826.0.1.3680043.9.7777.13\"}",
                     LC_ERR_NOT_FOUND, "no indexed instances");
    ts_strv_free(files);
    free(src);
}

static void test_bad_params(void **state)
{
    fx *f = *state;
    expect_job_error(f, "{\"algorithm\":\"unet\"}", LC_ERR_INVALID, "params.algorithm");
    expect_job_error(f, "{\"colour\":\"red\"}", LC_ERR_INVALID, "unknown parameter \"colour\"");
    expect_job_error(f, "{\"stow\":true}", LC_ERR_INVALID, "RADPIPE_SEG_STOW_URL is not set");
}

/* STOW-RS: an endpoint that is down makes the job retry (a transient error); a real PACS
 * (Orthanc with its DICOMweb plugin, from `make bench`'s packages) stores the SEG. */
static void test_stow(void **state)
{
    fx *f = *state;
    lc_err e;
    cJSON *result = NULL;
    char url[200];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/dicom-web/studies", ts_free_port());
    f->cfg.stow_url = url;
    lc_rc rc = run_job(f, "{}", &result, NULL, &e);
    if (rc != LC_ERR_UNAVAILABLE || !strstr(e.msg, "could not send the segmentation"))
        fail_msg("STOW to a closed port: %s \"%s\"", lc_strerror(rc), e.msg);
    assert_true(lc_rc_is_transient(rc));
    assert_null(result);

    if (access("/usr/sbin/Orthanc", X_OK) != 0 ||
        access("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", R_OK) != 0) {
        fprintf(stderr, "Orthanc with its DICOMweb plugin is not installed (deploy/install-deps.sh "
                        "bench): STOW-RS to a PACS skipped\n");
        f->cfg.stow_url = "";
        return;
    }
    int http = ts_free_port(), dicom = ts_free_port();
    char cfg[700], json[1600], log[700];
    snprintf(cfg, sizeof(cfg), "%s/orthanc.json", f->dir);
    snprintf(log, sizeof(log), "%s/orthanc.log", f->dir);
    snprintf(json, sizeof(json),
             "{\"Name\":\"radpipe-test\",\"HttpPort\":%d,\"DicomPort\":%d,"
             "\"StorageDirectory\":\"%s/orthanc-db\",\"IndexDirectory\":\"%s/orthanc-db\","
             "\"RemoteAccessAllowed\":false,\"AuthenticationEnabled\":false,"
             "\"Plugins\":[\"/usr/share/orthanc/plugins/libOrthancDicomWeb.so\"],"
             "\"DicomWeb\":{\"Enable\":true,\"Root\":\"/dicom-web/\"}}",
             http, dicom, f->dir, f->dir);
    assert_int_equal(ts_write_file(cfg, json, strlen(json)), 0);
    char *argv[] = {"/usr/sbin/Orthanc", cfg, NULL};
    pid_t pid = ts_spawn(argv, NULL, log);
    assert_true(pid > 0);
    char sys[200];
    snprintf(sys, sizeof(sys), "http://127.0.0.1:%d/system", http);
    long code = 0;
    for (int i = 0; i < 150 && code != 200; i++) {
        code = ts_http("GET", sys, NULL, NULL, NULL, 0, NULL, NULL);
        if (code != 200)
            usleep(100 * 1000);
    }
    if (code != 200) {
        ts_kill(pid);
        fail_msg("Orthanc did not start (see %s)", log);
    }
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/dicom-web/studies", http);
    rc = run_job(f, "{\"stow\":true}", &result, NULL, &e);
    if (rc != LC_OK) {
        ts_kill(pid);
        fail_msg("job with STOW-RS to Orthanc failed: %s", e.msg);
    }
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(result, "stowed")));
    const char *uid = cJSON_GetObjectItem(result, "segmentation_sop_instance_uid")->valuestring;
    /* Orthanc now holds the SEG, in the source study */
    char q[400], *body = NULL;
    snprintf(q, sizeof(q), "http://127.0.0.1:%d/dicom-web/studies/%s/instances?SOPInstanceUID=%s",
             http, f->study, uid);
    code = ts_http("GET", q, NULL, NULL, NULL, 0, &body, NULL);
    ts_kill(pid);
    assert_int_equal(code, 200);
    assert_non_null(strstr(body, uid));
    assert_non_null(strstr(body, "1.2.840.10008.5.1.4.1.1.66.4"));
    free(body);
    cJSON_Delete(result);
    f->cfg.stow_url = "";
}

/* A stopping service past its drain time cancels the job between steps. */
static void test_stop_cancels(void **state)
{
    fx *f = *state;
    lc_err e;
    cJSON *result = NULL;
    lc_job *job = ts_claimed_job(f->db, &f->w, "segment", f->study, "{}");
    assert_non_null(job);
    lc_worker_job j = {.job = job, .svc = &f->svc, .db = f->db, .w = &f->w};
    atomic_store(&f->svc.stop, 1);
    j.drain_deadline_ms = 1; /* long past */
    assert_int_equal(seg_job(&f->c, &j, &result, &e), LC_ERR_CANCELLED);
    assert_null(result);
    assert_non_null(strstr(e.msg, "cancelled"));
    atomic_store(&f->svc.stop, 0);
    lc_job_free(job);
}

int main(void)
{
    lc_log_init("test_seg", LC_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_volume_order_and_affine, setup, teardown),
        cmocka_unit_test_setup_teardown(test_compressed_syntaxes_agree, setup_empty, teardown),
        cmocka_unit_test_setup_teardown(test_job_outputs_and_mask, setup, teardown),
        cmocka_unit_test_setup_teardown(test_body_and_threshold, setup_empty, teardown),
        cmocka_unit_test_setup_teardown(test_enhanced_multiframe, setup_empty, teardown),
        cmocka_unit_test_setup_teardown(test_malformed_series_fail, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_params, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stow, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_cancels, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
