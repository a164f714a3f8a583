/*
 * seg_job.c: one segment job: validate the parameters, pick the series (the job's
 * series_instance_uid, else the study's largest image series), assemble its volume, run the
 * algorithm on the process's gpu_ctx (each 3-D volume uploaded once, only its mask comes
 * back) or the named resident model (seg_infer.c: its label map), then store mask.nii.gz,
 * segmentation.dcm and preview.png under results/<job id>/ with their artifact rows, and
 * optionally STOW-RS the SEG. Progress is published in steps (a model's patches count as
 * steps); cancellation and shutdown are checked between steps and between patch batches.
 * seg_init loads the models once; jobs only look them up. Runs on the worker thread.
 */
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "lc/log.h"
#include "lc/util.h"
#include "seg.h"

#define OFF(f) offsetof(seg_cfg, f)
const lc_cfg_var seg_cfg_vars[] = {
    {"RADPIPE_GPU_BACKEND", LC_CFG_ENUM, "auto", 0, -1, 0, "auto|cpu|cuda",
     "segmentation backend: auto uses CUDA when a device answers, else the CPU", OFF(gpu_backend)},
    {"RADPIPE_GPU_DEVICE", LC_CFG_INT, "0", 0, 63, 0, NULL, "CUDA device index", OFF(gpu_device)},
    {"RADPIPE_GPU_MEMORY_LIMIT", LC_CFG_BYTES, "0", 0, 1e15, 0, NULL,
     "most GPU (or CPU backend) memory the segmenter's volumes and kernels may hold at once "
     "(K/M/G suffixes), 0 = no limit; a job that needs more fails",
     OFF(gpu_memory_limit)},
    {"RADPIPE_SEG_THREADS", LC_CFG_INT, "0", 0, 1024, 0, NULL,
     "threads of the CPU backend, 0 = one per online CPU", OFF(cpu_threads)},
    {"RADPIPE_SEG_MAX_VOXELS", LC_CFG_INT, "1073741824", 1, 68719476736.0, 0, NULL,
     "largest series (voxels, all time points) a job assembles; larger ones fail", OFF(max_voxels)},
    {"RADPIPE_SEG_STOW_URL", LC_CFG_STR, "", 0, -1, 0, NULL,
     "DICOMweb STOW-RS endpoint (e.g. http://pacs/dicom-web/studies) the DICOM SEG is sent to; "
     "empty = none",
     OFF(stow_url)},
    {"RADPIPE_SEG_STOW_TOKEN", LC_CFG_STR, "", 0, -1, LC_CFG_SECRET, NULL,
     "bearer token for RADPIPE_SEG_STOW_URL, empty = none", OFF(stow_token)},
    {"RADPIPE_MODELS_DIR", LC_CFG_STR, "", 0, -1, 0, NULL,
     "segmentation models loaded at start and kept resident: one folder per model holding "
     "model.onnx and model.json (proto/models/model.schema.json); empty = none",
     OFF(models_dir)},
};
const size_t seg_cfg_nvars = sizeof(seg_cfg_vars) / sizeof(seg_cfg_vars[0]);

lc_rc seg_init(seg_ctx *c, lc_service *svc, const seg_cfg *cfg, lc_err *err)
{
    gpu_ctx_opts o = {0};
    memset(c, 0, sizeof(*c));
    c->svc = svc;
    c->cfg = cfg;
    if (gpu_backend_parse(cfg->gpu_backend, &o.backend) != LC_OK)
        return lc_err_set(err, LC_ERR_CONFIG, "invalid RADPIPE_GPU_BACKEND \"%s\"",
                          cfg->gpu_backend);
    o.device = (int)cfg->gpu_device;
    o.cpu_threads = (int)cfg->cpu_threads;
    o.memory_limit = (size_t)cfg->gpu_memory_limit;
    o.warm_up = 1; /* kernels loaded and run once now, so the first job is as fast as the rest */
    int64_t t0 = lc_now_ms();
    lc_rc rc = gpu_ctx_open(&o, &c->gpu, err);
    if (rc != LC_OK)
        return rc;
    c->seconds =
        lc_metrics_histogram(svc->metrics, "radpipe_segment_seconds",
                             "segmentation time per job, by stage", "stage=\"total\"", NULL, 0);
    lc_log_info("segmentation backend ready", LC_LS("backend", gpu_ctx_describe(c->gpu)),
                LC_LI("memory_limit", (long long)o.memory_limit),
                LC_LI("warm_up_ms", lc_now_ms() - t0));
    /* every model now, once: jobs never load one */
    if ((rc = seg_models_load(&c->models, c->gpu, cfg->models_dir, svc->metrics, err)) != LC_OK)
        return rc;
    if (cfg->models_dir && cfg->models_dir[0])
        lc_log_info(
            "models ready", LC_LS("dir", cfg->models_dir), LC_LI("loaded", (long long)c->models.n),
            LC_LI("failed", (long long)c->models.failed), LC_LB("engine", seg_infer_available()));
    if (svc->db && c->models.n) {
        char owner[300], host[256] = "";
        gethostname(host, sizeof(host) - 1);
        snprintf(owner, sizeof(owner), "%s:%ld", host, (long)getpid());
        rc = seg_models_record(&c->models, svc->db, owner, err);
    }
    return rc;
}

void seg_release(seg_ctx *c)
{
    seg_models_release(&c->models); /* the weights live on the context */
    gpu_ctx_free(c->gpu);
    c->gpu = NULL;
}

/* The study's series with the most image instances (ties: the smallest UID). */
static lc_rc choose_series(lc_db *db, const char *study_uid, char *out, size_t cap, lc_err *err)
{
    PGresult *res = NULL;
    const char *p[1] = {study_uid};
    lc_rc rc = lc_db_exec(db,
                          "SELECT series_uid FROM instances WHERE study_uid = $1 AND rows > 0 "
                          "AND sop_class_uid NOT LIKE '1.2.840.10008.5.1.4.1.1.66%' "
                          "GROUP BY series_uid ORDER BY count(*) DESC, series_uid LIMIT 1",
                          1, p, &res, err);
    if (rc != LC_OK)
        return rc;
    if (PQntuples(res) == 0)
        rc = lc_err_set(err, LC_ERR_UNSUPPORTED, "study has no image series to segment");
    else
        snprintf(out, cap, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    return rc;
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

/* The NIfTI through a temporary file (zlib's gzip writer wants one), then into the store. */
static lc_rc put_nifti(seg_ctx *c, lc_worker_job *j, const seg_volume *v, const uint8_t *mask,
                       int max_label, const char *what, lc_err *err)
{
    const char *base = getenv("TMPDIR");
    char dir[256], path[300], key[256], desc[80];
    snprintf(dir, sizeof(dir), "%s/radpipe-nii.XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(dir))
        return lc_err_set(err, LC_ERR_IO, "could not create a temporary directory: %s",
                          strerror(errno));
    snprintf(path, sizeof(path), "%s/mask.nii.gz", dir);
    snprintf(desc, sizeof(desc), "radpipe %.60s", what); /* NIfTI descrip: 80 bytes */
    snprintf(key, sizeof(key), "results/%s/mask.nii.gz", j->job->id);
    long long size = 0;
    char hex[65];
    lc_rc rc = seg_nifti_write(v, mask, max_label, desc, path, err);
    if (rc == LC_OK)
        rc = lc_sha256_file_hex(path, hex, &size, err);
    if (rc == LC_OK)
        rc = lc_store_put_file(c->svc->store, key, path, LC_STORE_MOVE, err);
    if (rc == LC_OK)
        rc = lc_job_add_artifact(j->db, j->job->id, "mask.nii.gz", key, size, "application/gzip",
                                 err);
    unlink(path);
    rmdir(dir);
    return rc;
}

static lc_rc stopped(const seg_progress *pr, const char *where, lc_err *err)
{
    if (seg_progress_should_stop(pr))
        return lc_err_set(err, LC_ERR_CANCELLED, "cancelled %s", where);
    return LC_OK;
}

static cJSON *result_json(const seg_ctx *c, const seg_volume *v, const seg_params *p,
                          const seg_algo_stats *st, const double *thresholds, uint64_t voxels,
                          const char *seg_uid, int stowed)
{
    cJSON *r = cJSON_CreateObject();
    double dims[4] = {(double)v->nx, (double)v->ny, (double)v->nz, (double)v->nt};
    cJSON_AddStringToObject(r, "series_instance_uid", v->series_uid);
    cJSON_AddStringToObject(r, "algorithm", seg_algorithm_name(p->algorithm));
    cJSON_AddItemToObject(r, "dims", cJSON_CreateDoubleArray(dims, v->nt > 1 ? 4 : 3));
    cJSON_AddItemToObject(r, "spacing_mm", cJSON_CreateDoubleArray(v->spacing, 3));
    cJSON_AddBoolToObject(r, "spacing_uniform", v->spacing_uniform);
    if (!v->spacing_uniform) {
        double gaps[2] = {v->gap_min, v->gap_max};
        cJSON_AddItemToObject(r, "slice_gaps_mm", cJSON_CreateDoubleArray(gaps, 2));
    }
    if (v->gantry_tilt != 0)
        cJSON_AddNumberToObject(r, "gantry_tilt_degrees", v->gantry_tilt);
    cJSON_AddNumberToObject(r, "threshold", st->threshold);
    if (v->nt > 1) /* each time point of a 4-D series is segmented on its own */
        cJSON_AddItemToObject(r, "thresholds", cJSON_CreateDoubleArray(thresholds, (int)v->nt));
    cJSON_AddNumberToObject(r, "voxels_in_mask", (double)voxels);
    cJSON_AddNumberToObject(r, "volume_ml",
                            (double)voxels * v->spacing[0] * v->spacing[1] * v->spacing[2] /
                                1000.0 / (double)v->nt);
    if (p->algorithm != SEG_ALGO_OTSU)
        cJSON_AddNumberToObject(r, "components_kept", (double)st->components);
    cJSON_AddStringToObject(r, "segmentation_sop_instance_uid", seg_uid);
    cJSON_AddBoolToObject(r, "stowed", stowed);
    cJSON_AddStringToObject(r, "backend", gpu_ctx_describe(c->gpu));
    return r;
}

/* The rest of the job once the label map exists: the three artifacts, then STOW-RS. */
typedef struct outputs {
    void *dcm;
    size_t dcm_len;
    char seg_uid[65];
    int stowed;
} outputs;

static lc_rc model_names(const seg_models *ms, const char *name, lc_err *err)
{
    char list[300] = "";
    size_t o = 0;
    const char *why = seg_models_failure(ms, name);
    if (why)
        return lc_err_set(err, LC_ERR_INVALID,
                          "model \"%s\" could not be loaded when the segmenter started: %s", name,
                          why);
    for (size_t i = 0; i < ms->n && o + 70 < sizeof(list); i++)
        o += (size_t)snprintf(list + o, sizeof(list) - o, "%s\"%s\"", i ? ", " : "",
                              ms->v[i].d.name);
    if (!ms->n)
        return lc_err_set(err, LC_ERR_INVALID,
                          "unknown model \"%s\": this segmenter has no models (RADPIPE_MODELS_DIR "
                          "is empty, or none of its models could be loaded)",
                          name);
    return lc_err_set(err, LC_ERR_INVALID, "unknown model \"%s\": this segmenter has %s", name,
                      list);
}

static cJSON *model_result(const seg_ctx *c, const seg_volume *v, const seg_model *m,
                           const seg_infer_stats *st, const uint8_t *labels, const outputs *o)
{
    const seg_model_desc *d = &m->d;
    cJSON *r = cJSON_CreateObject(), *mj = cJSON_CreateObject(), *ls = cJSON_CreateArray();
    double dims[4] = {(double)v->nx, (double)v->ny, (double)v->nz, (double)v->nt};
    double rd[3] = {(double)st->rdims[0], (double)st->rdims[1], (double)st->rdims[2]};
    double ms[3] = {d->spacing[0], d->spacing[1], d->dims == 3 ? d->spacing[2] : v->spacing[2]};
    double voxel_ml = v->spacing[0] * v->spacing[1] * v->spacing[2] / 1000.0 / (double)v->nt;
    uint64_t *count = calloc((size_t)d->nlabels + 1, sizeof(uint64_t)), fg = 0;
    size_t n = v->nx * v->ny * v->nz * v->nt;
    for (size_t i = 0; count && i < n; i++)
        count[labels[i] <= d->nlabels ? labels[i] : 0]++;
    cJSON_AddStringToObject(r, "series_instance_uid", v->series_uid);
    cJSON_AddStringToObject(mj, "name", d->name);
    cJSON_AddStringToObject(mj, "version", d->version);
    cJSON_AddStringToObject(mj, "sha256", m->sha256);
    cJSON_AddItemToObject(r, "model", mj);
    cJSON_AddItemToObject(r, "dims", cJSON_CreateDoubleArray(dims, v->nt > 1 ? 4 : 3));
    cJSON_AddItemToObject(r, "spacing_mm", cJSON_CreateDoubleArray(v->spacing, 3));
    cJSON_AddBoolToObject(r, "spacing_uniform", v->spacing_uniform);
    if (v->gantry_tilt != 0)
        cJSON_AddNumberToObject(r, "gantry_tilt_degrees", v->gantry_tilt);
    cJSON_AddItemToObject(r, "model_spacing_mm", cJSON_CreateDoubleArray(ms, 3));
    cJSON_AddItemToObject(r, "model_dims", cJSON_CreateDoubleArray(rd, 3));
    cJSON_AddBoolToObject(r, "resampled", st->resampled);
    cJSON_AddNumberToObject(r, "patches", (double)st->patches);
    for (int i = 0; i < d->nlabels; i++) {
        cJSON *l = cJSON_CreateObject();
        uint64_t k = count ? count[i + 1] : 0;
        fg += k;
        cJSON_AddNumberToObject(l, "value", d->labels[i].value);
        cJSON_AddStringToObject(l, "name", d->labels[i].name);
        cJSON_AddNumberToObject(l, "voxels", (double)k);
        cJSON_AddNumberToObject(l, "volume_ml", (double)k * voxel_ml);
        cJSON_AddItemToArray(ls, l);
    }
    free(count);
    cJSON_AddItemToObject(r, "labels", ls);
    cJSON_AddNumberToObject(r, "voxels_in_mask", (double)fg);
    cJSON_AddNumberToObject(r, "volume_ml", (double)fg * voxel_ml);
    cJSON_AddStringToObject(r, "segmentation_sop_instance_uid", o->seg_uid);
    cJSON_AddBoolToObject(r, "stowed", o->stowed);
    cJSON_AddStringToObject(r, "backend", gpu_ctx_describe(c->gpu));
    cJSON_AddNumberToObject(r, "inference_seconds", st->seconds);
    return r;
}

/* A model job: the series through the resident model m, time point by time point. */
static lc_rc model_job(seg_ctx *c, lc_worker_job *j, seg_model *m, const char *series, int stow,
                       const char *stow_url, cJSON **result, lc_err *err)
{
    const seg_model_desc *d = &m->d;
    seg_volume *v = NULL;
    uint8_t *labels = NULL, (*pal)[3] = NULL;
    void *png = NULL;
    size_t png_len = 0;
    outputs o = {0};
    seg_infer_stats st = {0};
    int64_t t0 = lc_now_ms();
    seg_progress pr = {.j = j, .total = 5}; /* + 2 per object, + 1 per patch */
    lc_rc rc;

    lc_counter_inc(m->jobs);
    if ((rc = seg_volume_load(j->db, c->svc->store, series, (size_t)c->cfg->max_voxels, &pr, &v,
                              err)) != LC_OK)
        goto out;
    const char *modality = v->ref && v->ref->modality ? v->ref->modality : "";
    if (strcmp(modality, d->modality) != 0) {
        rc = lc_err_set(err, LC_ERR_UNSUPPORTED,
                        "model \"%s\" is for %s images; the series is "
                        "\"%s\"",
                        d->name, d->modality, modality);
        goto out;
    }
    if (!v->spacing_uniform) {
        /* the network sees a physical scale: one spacing must describe the whole stack */
        rc = lc_err_set(err, LC_ERR_UNSUPPORTED,
                        "model \"%s\" needs evenly spaced slices; the series' slice gaps vary "
                        "from %g to %g mm",
                        d->name, v->gap_min, v->gap_max);
        goto out;
    }
    size_t n = v->nx * v->ny * v->nz;
    labels = malloc(n * v->nt);
    pal = calloc(256, sizeof(*pal));
    if (!labels || !pal) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory for the label map");
        goto out;
    }
    for (int i = 0; i < d->nlabels; i++)
        for (int k = 0; k < 3; k++)
            pal[d->labels[i].value][k] = (uint8_t)d->labels[i].rgb[k];
    for (size_t t = 0; t < v->nt; t++) {
        seg_infer_stats s;
        if ((rc = stopped(&pr, "before segmenting", err)) != LC_OK)
            goto out;
        rc = seg_infer_run(c->gpu, m, v->data + t * n, v->nx, v->ny, v->nz, v->spacing, &pr,
                           labels + t * n, &s, err);
        if (rc != LC_OK) {
            if (rc != LC_ERR_CANCELLED)
                lc_err_wrap(err, "model \"%s\"", d->name);
            goto out;
        }
        if (t == 0)
            st = s;
        else
            st.seconds += s.seconds, st.patches += s.patches;
    }
    seg_progress_step(&pr, 1, 1);

    if ((rc = stopped(&pr, "before writing the outputs", err)) != LC_OK ||
        (rc = put_nifti(c, j, v, labels, d->nlabels, "model labels", err)) != LC_OK)
        goto out;
    seg_progress_step(&pr, 1, 1);
    if ((rc = seg_dcmseg_build_model(v, labels, m, &o.dcm, &o.dcm_len, o.seg_uid, err)) != LC_OK ||
        (rc = put_artifact(c, j, "segmentation.dcm", o.dcm, o.dcm_len, "application/dicom", err)) !=
            LC_OK)
        goto out;
    seg_progress_step(&pr, 1, 1);
    if ((rc = seg_png_montage(v, labels, (const uint8_t(*)[3])pal, &png, &png_len, err)) != LC_OK ||
        (rc = put_artifact(c, j, "preview.png", png, png_len, "image/png", err)) != LC_OK)
        goto out;
    seg_progress_step(&pr, 1, 1);
    if (stow) {
        if ((rc = stopped(&pr, "before sending the segmentation", err)) != LC_OK ||
            (rc = seg_stow(stow_url, c->cfg->stow_token, o.dcm, o.dcm_len, err)) != LC_OK)
            goto out;
        o.stowed = 1;
        lc_log_info("segmentation sent", LC_LS("job_id", j->job->id), LC_LS("url", stow_url));
    }
    seg_progress_step(&pr, 1, 1);

    *result = model_result(c, v, m, &st, labels, &o);
    double secs = (double)(lc_now_ms() - t0) / 1000.0;
    cJSON_AddNumberToObject(*result, "seconds", secs);
    lc_histogram_observe(c->seconds, secs);
    lc_log_info("model segmentation done", LC_LS("job_id", j->job->id), LC_LS("model", d->name),
                LC_LI("patches", (long long)st.patches), LC_LD("inference_seconds", st.seconds),
                LC_LD("seconds", secs));
out:
    free(png);
    free(o.dcm);
    free(pal);
    free(labels);
    seg_volume_free(v);
    return rc;
}

lc_rc seg_job(void *ctx, lc_worker_job *j, cJSON **result, lc_err *err)
{
    seg_ctx *c = ctx;
    seg_params p;
    seg_volume *v = NULL;
    uint8_t *mask = NULL;
    double *thresholds = NULL;
    void *dcm = NULL, *png = NULL;
    size_t dcm_len = 0, png_len = 0;
    char series[65], seg_uid[65] = "";
    seg_algo_stats st = {0};
    uint64_t voxels = 0;
    int64_t t0 = lc_now_ms();
    seg_progress pr = {.j = j, .total = 5}; /* + 2 per object, added by the loader */
    lc_rc rc;

    if ((rc = seg_params_parse(j->job->params, &p, err)) != LC_OK)
        return rc;
    const char *stow_url = c->cfg->stow_url ? c->cfg->stow_url : "";
    int stow = p.stow == 1 || (p.stow == -1 && stow_url[0]);
    if (stow && !stow_url[0])
        return lc_err_set(err, LC_ERR_INVALID,
                          "params.stow is true but RADPIPE_SEG_STOW_URL is not set");
    seg_model *model = NULL;
    if (p.model[0] && !(model = seg_models_find(&c->models, p.model)))
        return model_names(&c->models, p.model, err);
    if (p.series_uid[0])
        snprintf(series, sizeof(series), "%s", p.series_uid);
    else if ((rc = choose_series(j->db, j->job->study_uid, series, sizeof(series), err)) != LC_OK)
        return rc;
    if (model)
        return model_job(c, j, model, series, stow, stow_url, result, err);

    if ((rc = seg_volume_load(j->db, c->svc->store, series, (size_t)c->cfg->max_voxels, &pr, &v,
                              err)) != LC_OK)
        goto out;
    size_t n = v->nx * v->ny * v->nz;
    mask = malloc(n * v->nt);
    thresholds = calloc(v->nt, sizeof(double));
    if (!mask || !thresholds) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory for the mask");
        goto out;
    }
    for (size_t t = 0; t < v->nt; t++) {
        seg_algo_stats s;
        if ((rc = stopped(&pr, "before segmenting", err)) != LC_OK ||
            (rc = seg_algo_run(c->gpu, &p, v->data + t * n, v->nx, v->ny, v->nz, v->spacing,
                               mask + t * n, &s, err)) != LC_OK)
            goto out;
        if (t == 0)
            st = s;
        thresholds[t] = s.threshold;
        voxels += s.voxels;
    }
    seg_progress_step(&pr, 1, 1);

    if ((rc = stopped(&pr, "before writing the outputs", err)) != LC_OK ||
        (rc = put_nifti(c, j, v, mask, 1,
                        p.algorithm == SEG_ALGO_OTSU   ? "otsu mask"
                        : p.algorithm == SEG_ALGO_BODY ? "body mask"
                                                       : "threshold mask",
                        err)) != LC_OK)
        goto out;
    seg_progress_step(&pr, 1, 1);
    if ((rc = seg_dcmseg_build(v, mask, &p, &dcm, &dcm_len, seg_uid, err)) != LC_OK ||
        (rc = put_artifact(c, j, "segmentation.dcm", dcm, dcm_len, "application/dicom", err)) !=
            LC_OK)
        goto out;
    seg_progress_step(&pr, 1, 1);
    if ((rc = seg_png_montage(v, mask, NULL, &png, &png_len, err)) != LC_OK ||
        (rc = put_artifact(c, j, "preview.png", png, png_len, "image/png", err)) != LC_OK)
        goto out;
    seg_progress_step(&pr, 1, 1);
    if (stow) {
        if ((rc = stopped(&pr, "before sending the segmentation", err)) != LC_OK ||
            (rc = seg_stow(stow_url, c->cfg->stow_token, dcm, dcm_len, err)) != LC_OK)
            goto out;
        lc_log_info("segmentation sent", LC_LS("job_id", j->job->id), LC_LS("url", stow_url));
    }
    seg_progress_step(&pr, 1, 1);

    *result = result_json(c, v, &p, &st, thresholds, voxels, seg_uid, stow);
    double secs = (double)(lc_now_ms() - t0) / 1000.0;
    cJSON_AddNumberToObject(*result, "seconds", secs);
    lc_histogram_observe(c->seconds, secs);
    if (!v->spacing_uniform)
        lc_log_warn("series has variable slice spacing: the NIfTI affine uses the first gap",
                    LC_LS("job_id", j->job->id), LC_LS("series", series),
                    LC_LD("gap_min_mm", v->gap_min), LC_LD("gap_max_mm", v->gap_max));
out:
    free(png);
    free(dcm);
    free(thresholds);
    free(mask);
    seg_volume_free(v);
    return rc;
}
