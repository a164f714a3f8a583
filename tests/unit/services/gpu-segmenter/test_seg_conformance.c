/*
 * test_seg_conformance.c: the segmenter's outputs against the reference tools, on every
 * multi-slice series of the shared corpus (../shared/dicom-samples/series): the NIfTI mask has
 * the dimensions and (within 1e-3 mm) the affine of what Debian's dcm2niix writes for the same
 * series, both read with libnifti; the DICOM SEG passes dicom3tools' dciodvfy without errors
 * and dcmdump shows every source instance referenced. The gantry-tilted GE CT is the one
 * documented difference (see services/gpu-segmenter/README.md): dcm2niix 1.0.20220720 writes
 * a distorted shear for it (rordenlab/dcm2niix#697, fixed upstream later), so there the test
 * checks the dims, the first column and the origin against dcm2niix and the whole affine
 * against the slices' own ImagePositionPatient.
 */
#include <dirent.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <cmocka.h>
#include <nifti1_io.h>
#include "lc/log.h"
#include "seg.h"
#include "ts.h"
#include "ts_index.h"

/* The series folders; mr-4slice-compressed holds the same series four times: one is used. */
static char **series_dirs(const char *samples)
{
    char base[600];
    snprintf(base, sizeof(base), "%s/series", samples);
    DIR *d = opendir(base);
    if (!d)
        return NULL;
    char **v = calloc(64, sizeof(char *));
    size_t n = 0;
    struct dirent *de;
    while ((de = readdir(d)) && n < 63) {
        if (de->d_name[0] == '.')
            continue;
        char *p = NULL, *sub = NULL;
        struct stat st;
        if (asprintf(&p, "%s/%s", base, de->d_name) < 0 ||
            asprintf(&sub, "%s/jpeg-lossless-sv1", p) < 0)
            abort();
        if (stat(sub, &st) == 0) {
            free(p);
            p = sub;
        } else {
            free(sub);
        }
        v[n++] = p;
    }
    closedir(d);
    return v;
}

static int has_tool(const char *name)
{
    char cmd[200];
    snprintf(cmd, sizeof(cmd), "command -v %s >/dev/null 2>&1", name);
    return ts_run(cmd, NULL) == 0;
}

/* The .nii dcm2niix writes for dir, in out ("ref.nii"; a tilted CT also gets ref_Tilt*). */
static nifti_image *dcm2niix(const char *dir, const char *out)
{
    char cmd[2000], path[700];
    snprintf(cmd, sizeof(cmd), "dcm2niix -z n -b n -f ref -o '%s' '%s' >'%s/dcm2niix.log' 2>&1",
             out, dir, out);
    if (ts_run(cmd, NULL) != 0)
        fail_msg("dcm2niix failed on %s", dir);
    snprintf(path, sizeof(path), "%s/ref.nii", out);
    return nifti_image_read(path, 1);
}

/* Voxel i of a dcm2niix image in rescaled units (its scl_slope and scl_inter applied). */
static double ref_value(const nifti_image *im, size_t i)
{
    double v = 0;
    switch (im->datatype) {
    case DT_INT16:
        v = ((const int16_t *)im->data)[i];
        break;
    case DT_UINT16:
        v = ((const uint16_t *)im->data)[i];
        break;
    case DT_UINT8:
        v = ((const uint8_t *)im->data)[i];
        break;
    case DT_FLOAT32:
        v = ((const float *)im->data)[i];
        break;
    default:
        fail_msg("dcm2niix wrote datatype %d", im->datatype);
    }
    return im->scl_slope != 0 ? v * im->scl_slope + im->scl_inter : v;
}

/* Every DICOM file of dir: its SOP Instance UID and position. */
typedef struct src {
    char uid[65];
    double ipp[3];
} src;

static src *sources(const char *dir, size_t *n)
{
    char **files = ts_list_files(dir);
    size_t k = 0;
    while (files[k])
        k++;
    src *s = calloc(k, sizeof(*s));
    for (size_t i = 0; i < k; i++) {
        lc_dicom_header *h = NULL;
        lc_err e;
        assert_int_equal(lc_dicom_read_header(files[i], &h, &e), LC_OK);
        snprintf(s[i].uid, sizeof(s[i].uid), "%s", h->sop_instance_uid);
        memcpy(s[i].ipp, h->ipp, sizeof(s[i].ipp));
        lc_dicom_header_free(h);
    }
    ts_strv_free(files);
    *n = k;
    return s;
}

static int cmp_z(const void *a, const void *b)
{
    double x = ((const src *)a)->ipp[2], y = ((const src *)b)->ipp[2];
    return x < y ? -1 : x > y;
}

static void check_seg(const char *seg, const src *s, size_t n, const char *name)
{
    char cmd[1200], *out = NULL;
    snprintf(cmd, sizeof(cmd), "dciodvfy '%s' 2>&1", seg);
    ts_run(cmd, &out);
    for (char *line = out; line && *line;) {
        char *nl = strchr(line, '\n');
        if (strncmp(line, "Error", 5) == 0)
            fail_msg("%s: dciodvfy reports errors in the SEG:\n%s", name, out);
        line = nl ? nl + 1 : NULL;
    }
    free(out);
    snprintf(cmd, sizeof(cmd), "dcmdump +P 0008,1155 '%s'", seg);
    assert_int_equal(ts_run(cmd, &out), 0);
    for (size_t i = 0; i < n; i++)
        if (!strstr(out, s[i].uid))
            fail_msg("%s: the SEG does not reference source instance %s", name, s[i].uid);
    free(out);
}

static void check_series(const char *dir, const char *tmp)
{
    const char *name = strrchr(dir, '/') + 1;
    lc_err e;
    lc_db *db = NULL;
    lc_store *store = NULL;
    seg_ctx c;
    seg_cfg cfg = {.gpu_backend = "cpu",
                   .cpu_threads = 2,
                   .max_voxels = 1LL << 30,
                   .stow_url = "",
                   .stow_token = ""};
    lc_service svc = {0};
    lc_job_worker w;
    char url[800], study[65], work[700];
    char *dburl = ts_pg_fresh_db("segconf");
    assert_non_null(dburl);
    snprintf(work, sizeof(work), "%s/%s", tmp, name);
    mkdir(work, 0755);
    assert_int_equal(lc_db_connect(dburl, 10000, NULL, &db, &e), LC_OK);
    assert_int_equal(lc_db_migrate(db, &e), LC_OK);
    snprintf(url, sizeof(url), "file://%s/objects", work);
    assert_int_equal(lc_store_open(url, &store, &e), LC_OK);
    svc.store = store;
    svc.metrics = lc_metrics_new();
    atomic_init(&svc.stop, 0);
    assert_int_equal(seg_init(&c, &svc, &cfg, &e), LC_OK);
    lc_job_worker_init(&w, "radpipe.", "/radpipe/test", 30, 3);
    assert_true(ts_index_dir(db, store, dir, study) > 1);

    lc_job *job = ts_claimed_job(db, &w, "segment", study, "{\"algorithm\":\"otsu\"}");
    assert_non_null(job);
    lc_worker_job j = {.job = job, .svc = &svc, .db = db, .w = &w};
    cJSON *result = NULL;
    if (seg_job(&c, &j, &result, &e) != LC_OK)
        fail_msg("%s: segment job failed: %s", name, e.msg);
    int tilted = cJSON_GetObjectItem(result, "gantry_tilt_degrees") != NULL;

    char key[256], *nii = NULL, *seg = NULL;
    snprintf(key, sizeof(key), "results/%s/mask.nii.gz", job->id);
    assert_int_equal(lc_store_local_path(store, key, &nii, &e), LC_OK);
    snprintf(key, sizeof(key), "results/%s/segmentation.dcm", job->id);
    assert_int_equal(lc_store_local_path(store, key, &seg, &e), LC_OK);
    nifti_image *ours = nifti_image_read(nii, 1);
    nifti_image *ref = dcm2niix(dir, work);
    assert_non_null(ours);
    if (!ref)
        fail_msg("%s: dcm2niix wrote no ref.nii", name);
    fprintf(stderr, "%s: ours %dx%dx%dx%d, dcm2niix %dx%dx%dx%d%s\n", name, ours->nx, ours->ny,
            ours->nz, ours->nt, ref->nx, ref->ny, ref->nz, ref->nt, tilted ? " (gantry tilt)" : "");
    for (int d = 0; d < 5; d++)
        if (ours->dim[d] != ref->dim[d] && !(d == 4 && ours->dim[0] == 3 && ref->dim[4] <= 1))
            fail_msg("%s: dim[%d] is %d, dcm2niix has %d", name, d, ours->dim[d], ref->dim[d]);
    assert_int_equal(ours->sform_code, NIFTI_XFORM_SCANNER_ANAT);
    double worst = 0;
    for (int r = 0; r < 3; r++)
        for (int col = 0; col < 4; col++) {
            if (tilted && (col == 1 || col == 2))
                continue; /* dcm2niix#697: see the file comment */
            double dlt = fabs(ours->sto_xyz.m[r][col] - ref->sto_xyz.m[r][col]);
            worst = dlt > worst ? dlt : worst;
        }
    if (worst > 1e-3) {
        char a[4][200];
        for (int r = 0; r < 3; r++)
            snprintf(a[r], sizeof(a[r]), "[%g %g %g %g] vs [%g %g %g %g]", ours->sto_xyz.m[r][0],
                     ours->sto_xyz.m[r][1], ours->sto_xyz.m[r][2], ours->sto_xyz.m[r][3],
                     ref->sto_xyz.m[r][0], ref->sto_xyz.m[r][1], ref->sto_xyz.m[r][2],
                     ref->sto_xyz.m[r][3]);
        fail_msg("%s: affine differs from dcm2niix's by %g:\n%s\n%s\n%s", name, worst, a[0], a[1],
                 a[2]);
    }
    /* the voxels line up: dcm2niix's image above our threshold is our mask */
    double thr = cJSON_GetObjectItem(result, "threshold")->valuedouble;
    const cJSON *per_t = cJSON_GetObjectItem(result, "thresholds"); /* 4-D: one per volume */
    size_t nvox = (size_t)ours->nvox, differ = 0, n3 = (size_t)ours->nx * ours->ny * ours->nz;
    assert_int_equal(nvox, (size_t)ref->nvox);
    for (size_t i = 0; i < nvox; i++) {
        double t = per_t ? cJSON_GetArrayItem(per_t, (int)(i / n3))->valuedouble : thr;
        differ += (ref_value(ref, i) > t) != (((const uint8_t *)ours->data)[i] != 0);
    }
    fprintf(stderr, "%s: %zu of %zu voxels differ from dcm2niix's image > %g\n", name, differ, nvox,
            thr);
    if (differ > 0)
        fail_msg("%s: the mask and dcm2niix's image disagree on %zu voxels", name, differ);
    size_t n = 0;
    src *s = sources(dir, &n);
    if (tilted) {
        /* voxel (0, ny - 1, k): the first stored pixel of slice k (rows are flipped), in RAS;
         * the stack's first part is evenly spaced, so the affine must land on those slices */
        qsort(s, n, sizeof(*s), cmp_z);
        int checked = 0;
        for (size_t k = 0; k < n; k++) {
            double x[3], err2 = 0;
            for (int r = 0; r < 3; r++) {
                x[r] = ours->sto_xyz.m[r][1] * (ours->ny - 1) + ours->sto_xyz.m[r][2] * (double)k +
                       ours->sto_xyz.m[r][3];
                double want = (r < 2 ? -1 : 1) * s[k].ipp[r];
                err2 += (x[r] - want) * (x[r] - want);
            }
            if (k > 0 && fabs((s[k].ipp[2] - s[k - 1].ipp[2]) - (s[1].ipp[2] - s[0].ipp[2])) > 0.01)
                break; /* the spacing changes here (1.08 then 7 mm): NIfTI cannot follow */
            if (sqrt(err2) > 1e-3)
                fail_msg("%s: slice %zu is at %g mm from where the affine puts it", name, k,
                         sqrt(err2));
            checked++;
        }
        assert_true(checked >= 10);
    }
    check_seg(seg, s, n, name);
    free(s);
    nifti_image_free(ours);
    nifti_image_free(ref);
    free(nii);
    free(seg);
    cJSON_Delete(result);
    lc_job_free(job);
    seg_release(&c);
    lc_metrics_free(svc.metrics);
    lc_store_free(store);
    lc_db_free(db);
    free(dburl);
}

static void test_every_sample_series(void **state)
{
    (void)state;
    const char *samples = ts_samples_dir();
    if (!samples) {
        fprintf(stderr, "no shared DICOM samples: conformance test skipped\n");
        skip();
    }
    if (!has_tool("dcm2niix") || !has_tool("dciodvfy") || !has_tool("dcmdump"))
        fail_msg("dcm2niix, dciodvfy (dicom3tools) and dcmdump are needed "
                 "(deploy/install-deps.sh installs them)");
    char **dirs = series_dirs(samples);
    assert_non_null(dirs);
    char *tmp = ts_tmpdir("segconf");
    int n = 0;
    for (char **d = dirs; *d; d++, n++)
        check_series(*d, tmp);
    assert_true(n >= 5);
    ts_rmrf(tmp);
    free(tmp);
    ts_strv_free(dirs);
}

int main(void)
{
    lc_log_init("test_seg_conformance", LC_LOG_WARN);
    nifti_set_debug_level(0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_sample_series),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
