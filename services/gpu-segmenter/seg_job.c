/*
 * seg_job.c: one segment job: pick the series (the job's series_instance_uid, else the
 * study's largest image series), assemble its volume, run the algorithm on the gpu/ backend
 * (volume uploaded once, only the mask comes back) and store the results under
 * results/<job id>/ with their artifact rows. Runs on the worker thread.
 */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lc/log.h"
#include "lc/util.h"
#include "seg.h"

#define OFF(f) offsetof(seg_cfg, f)
const lc_cfg_var seg_cfg_vars[] = {
    {"RADPIPE_GPU_BACKEND", LC_CFG_ENUM, "auto", 0, -1, 0, "auto|cpu|cuda",
     "segmentation backend: auto uses CUDA when a device answers, else the CPU", OFF(gpu_backend)},
    {"RADPIPE_GPU_DEVICE", LC_CFG_INT, "0", 0, 63, 0, NULL, "CUDA device index", OFF(gpu_device)},
    {"RADPIPE_SEG_THREADS", LC_CFG_INT, "0", 0, 1024, 0, NULL,
     "threads of the CPU backend, 0 = one per online CPU", OFF(cpu_threads)},
};
const size_t seg_cfg_nvars = sizeof(seg_cfg_vars) / sizeof(seg_cfg_vars[0]);

lc_rc seg_init(seg_ctx *c, lc_service *svc, const seg_cfg *cfg, lc_err *err)
{
    gpu_backend want;
    memset(c, 0, sizeof(*c));
    c->svc = svc;
    c->cfg = cfg;
    lc_rc rc = gpu_backend_parse(cfg->gpu_backend, &want);
    if (rc != LC_OK) /* the config enum already restricts the value */
        return lc_err_set(err, LC_ERR_CONFIG, "invalid RADPIPE_GPU_BACKEND \"%s\"",
                          cfg->gpu_backend);
    rc = gpu_ctx_new(want, (int)cfg->gpu_device, (int)cfg->cpu_threads, &c->gpu, err);
    if (rc != LC_OK)
        return rc;
    c->seconds =
        lc_metrics_histogram(svc->metrics, "radpipe_segment_seconds",
                             "segmentation time per job, by stage", "stage=\"total\"", NULL, 0);
    lc_log_info("segmentation backend ready", LC_LS("backend", gpu_ctx_describe(c->gpu)));
    return LC_OK;
}

void seg_release(seg_ctx *c)
{
    gpu_ctx_free(c->gpu);
    c->gpu = NULL;
}

typedef struct seg_params {
    const char *algorithm;
    const char *series_uid; /* NULL: choose */
    int nbins;
} seg_params;

/* Validate the job's params: unknown keys and wrong types are permanent errors. */
static lc_rc parse_params(const cJSON *params, seg_params *p, lc_err *err)
{
    p->algorithm = "otsu";
    p->series_uid = NULL;
    p->nbins = 256;
    for (const cJSON *it = params ? params->child : NULL; it; it = it->next) {
        if (strcmp(it->string, "algorithm") == 0) {
            if (!cJSON_IsString(it) || strcmp(it->valuestring, "otsu") != 0)
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.algorithm must be \"otsu\" (the only algorithm so far)");
            p->algorithm = it->valuestring;
        } else if (strcmp(it->string, "series_instance_uid") == 0) {
            if (!cJSON_IsString(it) || !it->valuestring[0])
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.series_instance_uid must be a UID string");
            p->series_uid = it->valuestring;
        } else if (strcmp(it->string, "nbins") == 0) {
            if (!cJSON_IsNumber(it) || it->valuedouble != (int)it->valuedouble ||
                it->valueint < 2 || it->valueint > 4096)
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.nbins must be an integer in [2, 4096]");
            p->nbins = it->valueint;
        } else {
            return lc_err_set(err, LC_ERR_INVALID, "unknown parameter \"%.64s\"", it->string);
        }
    }
    return LC_OK;
}

/* The study's series with the most image instances (ties: the smallest UID). */
static lc_rc choose_series(lc_db *db, const char *study_uid, char **out, lc_err *err)
{
    PGresult *res = NULL;
    const char *p[1] = {study_uid};
    lc_rc rc = lc_db_exec(db,
                          "SELECT series_uid FROM instances WHERE study_uid = $1 AND rows > 0 "
                          "GROUP BY series_uid ORDER BY count(*) DESC, series_uid LIMIT 1",
                          1, p, &res, err);
    if (rc != LC_OK)
        return rc;
    if (PQntuples(res) == 0)
        rc = lc_err_set(err, LC_ERR_UNSUPPORTED, "study has no image series to segment");
    else if (!(*out = strdup(PQgetvalue(res, 0, 0))))
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    PQclear(res);
    return rc;
}

static cJSON *affine_json(const double a[4][4])
{
    cJSON *rows = cJSON_CreateArray();
    for (int i = 0; i < 4; i++)
        cJSON_AddItemToArray(rows, cJSON_CreateDoubleArray(a[i], 4));
    return rows;
}

/* Store one artifact and record it. */
static lc_rc put_artifact(seg_ctx *c, lc_worker_job *j, const char *name, const void *buf,
                          size_t len, const char *media_type, lc_err *err)
{
    char key[256];
    snprintf(key, sizeof(key), "results/%s/%s", j->job->id, name);
    lc_rc rc = lc_store_put_buf(c->svc->store, key, buf, len, err);
    if (rc == LC_OK)
        rc = lc_job_add_artifact(j->db, j->job->id, name, key, (long long)len, media_type, err);
    return rc;
}

lc_rc seg_job(void *ctx, lc_worker_job *j, cJSON **result, lc_err *err)
{
    seg_ctx *c = ctx;
    seg_params p;
    seg_volume *v = NULL;
    gpu_vol *gin = NULL, *gmask = NULL;
    unsigned char *mask = NULL;
    char *series = NULL, *meta_txt = NULL;
    cJSON *meta = NULL;
    float thr = 0;
    int64_t t0 = lc_now_ms();
    lc_rc rc;

    if ((rc = parse_params(j->job->params, &p, err)) != LC_OK)
        return rc;
    if (p.series_uid)
        series = strdup(p.series_uid);
    else if ((rc = choose_series(j->db, j->job->study_uid, &series, err)) != LC_OK)
        return rc;
    if (!series)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");

    if ((rc = seg_volume_load(j->db, c->svc->store, series, j, &v, err)) != LC_OK)
        goto out;
    lc_worker_job_progress(j, 1, 3, "stages");
    size_t n = v->nx * v->ny * v->nz;

    /* the volume crosses to the device once; only the histogram and the mask come back */
    if ((rc = gpu_vol_upload(c->gpu, GPU_F32, v->data, v->nx, v->ny, v->nz, &gin, err)) != LC_OK ||
        (rc = gpu_otsu_threshold(c->gpu, gin, p.nbins, &thr, err)) != LC_OK ||
        (rc = gpu_vol_new(c->gpu, GPU_U8, v->nx, v->ny, v->nz, &gmask, err)) != LC_OK ||
        /* foreground is strictly above the threshold, as scikit-image's `image > t` */
        (rc = gpu_threshold(c->gpu, gin, nextafterf(thr, INFINITY), INFINITY, gmask, err)) != LC_OK)
        goto out;
    if (!(mask = malloc(n))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    if ((rc = gpu_vol_download(c->gpu, gmask, mask, err)) != LC_OK)
        goto out;
    lc_worker_job_progress(j, 2, 3, "stages");
    size_t fg = 0;
    for (size_t i = 0; i < n; i++)
        fg += mask[i];

    /* outputs: the raw mask and a JSON header describing it */
    meta = cJSON_CreateObject();
    size_t dims[3] = {v->nx, v->ny, v->nz};
    cJSON *jd = cJSON_AddArrayToObject(meta, "dims");
    for (int k = 0; k < 3; k++)
        cJSON_AddItemToArray(jd, cJSON_CreateNumber((double)dims[k]));
    cJSON_AddStringToObject(meta, "dtype", "uint8");
    cJSON_AddStringToObject(meta, "order", "x fastest (columns), then rows, then slices");
    cJSON_AddItemToObject(meta, "spacing", cJSON_CreateDoubleArray(v->spacing, 3));
    cJSON_AddItemToObject(meta, "affine_lps", affine_json(v->affine));
    cJSON_AddBoolToObject(meta, "spacing_uniform", v->spacing_uniform);
    cJSON_AddStringToObject(meta, "algorithm", p.algorithm);
    cJSON_AddNumberToObject(meta, "threshold", thr);
    cJSON_AddNumberToObject(meta, "voxels_in_mask", (double)fg);
    cJSON_AddStringToObject(meta, "study_instance_uid", j->job->study_uid);
    cJSON_AddStringToObject(meta, "series_instance_uid", series);
    cJSON_AddItemToObject(meta, "slice_sop_instance_uids",
                          cJSON_CreateStringArray((const char *const *)v->sop_uids, (int)v->nsop));
    cJSON_AddStringToObject(meta, "backend", gpu_ctx_describe(c->gpu));
    if (!(meta_txt = cJSON_Print(meta))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    if ((rc = put_artifact(c, j, "mask.raw", mask, n, "application/octet-stream", err)) != LC_OK ||
        (rc = put_artifact(c, j, "mask.json", meta_txt, strlen(meta_txt), "application/json",
                           err)) != LC_OK)
        goto out;
    lc_worker_job_progress(j, 3, 3, "stages");

    *result = cJSON_CreateObject();
    cJSON_AddStringToObject(*result, "series_instance_uid", series);
    cJSON_AddItemToObject(*result, "dims", cJSON_Duplicate(jd, 1));
    cJSON_AddNumberToObject(*result, "threshold", thr);
    cJSON_AddNumberToObject(*result, "voxels_in_mask", (double)fg);
    cJSON_AddStringToObject(*result, "backend", gpu_ctx_describe(c->gpu));
    lc_histogram_observe(c->seconds, (double)(lc_now_ms() - t0) / 1000.0);
out:
    cJSON_Delete(meta);
    free(meta_txt);
    free(mask);
    gpu_vol_free(gmask);
    gpu_vol_free(gin);
    seg_volume_free(v);
    free(series);
    return rc;
}
