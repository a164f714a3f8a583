/*
 * seg_volume.c: volume assembly. The index names the series' objects; each object is read
 * from the store (a local path on file://, a temporary copy otherwise), its header and the
 * geometry of every frame first (lc_dicom_read_image_info), then, once seg_geom_stack has
 * accepted the stack, its pixels (lc_dicom_read_pixels_f32: every transfer syntax GDCM
 * decodes) with each frame's own RescaleSlope/Intercept. Runs on the worker thread.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "lc/log.h"
#include "lc/util.h"
#include "seg.h"

void seg_progress_step(seg_progress *p, long long steps, int force)
{
    if (!p)
        return;
    p->done += steps;
    if (!p->j)
        return;
    int64_t now = lc_now_ms();
    if (!force && now - p->last_ms < 500)
        return;
    p->last_ms = now;
    lc_worker_job_progress(p->j, p->done, p->total, "steps");
}

int seg_progress_should_stop(const seg_progress *p)
{
    return p && p->j && lc_worker_job_should_stop(p->j);
}

void seg_volume_free(seg_volume *v)
{
    if (!v)
        return;
    for (size_t i = 0; v->slices && i < v->nz * v->nt; i++) {
        free(v->slices[i].sop_uid);
        free(v->slices[i].sop_class_uid);
    }
    free(v->slices);
    free(v->data);
    lc_dicom_header_free(v->ref);
    free(v->frame_of_reference_uid);
    free(v->series_uid);
    free(v);
}

/* One object of the series while it is being loaded. */
typedef struct object {
    const char *sop_uid, *key, *sop_class; /* borrowed from the query result */
    long instance_number;
    char *path; /* local file (owned) */
    int temp;   /* path is a temporary copy to delete */
    lc_dicom_image_info *info;
    size_t first_frame; /* index of its first frame in the frame list */
} object;

/* SOP classes that carry Rows/Columns but are not images to segment. */
static int non_image_class(const char *uid)
{
    static const char *const prefixes[] = {
        "1.2.840.10008.5.1.4.1.1.66",   /* raw data, spatial registration, SEG, surfaces */
        "1.2.840.10008.5.1.4.1.1.481.", /* RT objects */
        "1.2.840.10008.5.1.4.1.1.88.",  /* structured reports */
        "1.2.840.10008.5.1.4.1.1.104.", /* encapsulated documents */
        "1.2.840.10008.5.1.4.1.1.11.",  /* presentation states */
        "1.2.840.10008.5.1.4.1.1.9.",   /* waveforms */
        "1.2.840.10008.5.1.4.1.1.30",   /* parametric maps (float pixels) */
    };
    for (size_t i = 0; i < sizeof(prefixes) / sizeof(prefixes[0]); i++)
        if (strncmp(uid, prefixes[i], strlen(prefixes[i])) == 0)
            return 1;
    return 0;
}

/* A local file for the object: its path in a file:// store, else a copy in tmpdir. */
static lc_rc object_path(lc_store *store, object *o, char *tmpdir, size_t idx, lc_err *err)
{
    lc_rc rc = lc_store_local_path(store, o->key, &o->path, err);
    if (rc != LC_ERR_UNSUPPORTED)
        return rc;
    if (!tmpdir[0]) {
        const char *base = getenv("TMPDIR");
        snprintf(tmpdir, 256, "%s/radpipe-seg.XXXXXX", base && *base ? base : "/tmp");
        if (!mkdtemp(tmpdir)) {
            int e = errno;
            tmpdir[0] = '\0';
            return lc_err_set(err, LC_ERR_IO, "could not create a temporary directory: %s",
                              strerror(e));
        }
    }
    if (asprintf(&o->path, "%s/%zu.dcm", tmpdir, idx) < 0) {
        o->path = NULL;
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    o->temp = 1;
    return lc_store_get_file(store, o->key, o->path, err);
}

static lc_rc read_objects(const PGresult *res, lc_store *store, object *obj, int n, char *tmpdir,
                          seg_progress *pr, lc_err *err)
{
    for (int i = 0; i < n; i++) {
        object *o = &obj[i];
        o->sop_uid = PQgetvalue(res, i, 0);
        o->key = PQgetvalue(res, i, 1);
        o->sop_class = PQgetvalue(res, i, 2);
        o->instance_number = atol(PQgetvalue(res, i, 4));
        if (atoi(PQgetvalue(res, i, 3)) <= 0 || non_image_class(o->sop_class))
            return lc_err_set(err, LC_ERR_UNSUPPORTED,
                              "instance %s is not an image to segment (SOP class %s)", o->sop_uid,
                              o->sop_class);
    }
    for (int i = 0; i < n; i++) {
        object *o = &obj[i];
        lc_rc rc;
        if (seg_progress_should_stop(pr))
            return lc_err_set(err, LC_ERR_CANCELLED, "cancelled while reading headers");
        if ((rc = object_path(store, o, tmpdir, (size_t)i, err)) != LC_OK ||
            (rc = lc_dicom_read_image_info(o->path, &o->info, err)) != LC_OK)
            return lc_err_wrap(err, "could not read instance %s", o->sop_uid);
        const lc_dicom_header *h = o->info->hdr;
        if (strcmp(h->sop_instance_uid, o->sop_uid) != 0)
            return lc_err_set(err, LC_ERR_INVALID, "object %s holds instance %s, the index says %s",
                              o->key, h->sop_instance_uid, o->sop_uid);
        if (h->rows <= 0 || h->columns <= 0 || !h->has_pixel_data)
            return lc_err_set(err, LC_ERR_UNSUPPORTED, "instance %s has no image pixels",
                              o->sop_uid);
        if (h->samples_per_pixel > 1)
            return lc_err_set(err, LC_ERR_UNSUPPORTED,
                              "instance %s is a colour image (%d samples per pixel): only "
                              "grayscale series are segmented",
                              o->sop_uid, h->samples_per_pixel);
        if (h->number_of_frames != o->info->nframes)
            return lc_err_set(err, LC_ERR_INTERNAL, "instance %s: frame count mismatch",
                              o->sop_uid);
        seg_progress_step(pr, 1, 0);
    }
    return LC_OK;
}

/* Every frame in one list for seg_geom_stack; pixel spacing must agree too. */
static lc_rc frame_list(object *obj, int n, seg_frame_in **out, size_t *nout, lc_err *err)
{
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        obj[i].first_frame = total;
        total += (size_t)obj[i].info->nframes;
    }
    if (total == 0)
        return lc_err_set(err, LC_ERR_DICOM, "the series holds no image frames");
    seg_frame_in *f = calloc(total, sizeof(*f));
    if (!f)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    const lc_dicom_frame_geom *g0 = &obj[0].info->frames[0];
    for (int i = 0; i < n; i++) {
        const lc_dicom_image_info *in = obj[i].info;
        for (int k = 0; k < in->nframes; k++) {
            const lc_dicom_frame_geom *g = &in->frames[k];
            seg_frame_in *x = &f[obj[i].first_frame + (size_t)k];
            x->sop_uid = obj[i].sop_uid;
            x->rows = in->hdr->rows;
            x->cols = in->hdr->columns;
            x->has_ipp = g->has_ipp;
            x->has_iop = g->has_iop;
            memcpy(x->ipp, g->ipp, sizeof(x->ipp));
            memcpy(x->iop, g->iop, sizeof(x->iop));
            x->temporal = g->temporal_index;
            x->instance_number = obj[i].instance_number;
            x->frame = in->nframes > 1 ? k + 1 : 0;
            if (g->has_spacing != g0->has_spacing ||
                fabs(g->pixel_spacing[0] - g0->pixel_spacing[0]) > 1e-4 ||
                fabs(g->pixel_spacing[1] - g0->pixel_spacing[1]) > 1e-4) {
                free(f);
                return lc_err_set(err, LC_ERR_INVALID,
                                  "mixed pixel spacings in the series: instance %s and instance "
                                  "%s differ in PixelSpacing",
                                  obj[0].sop_uid, obj[i].sop_uid);
            }
        }
    }
    *out = f;
    *nout = total;
    return LC_OK;
}

/* Decode every object and put each frame in its slot, with its own rescale. */
static lc_rc read_pixels(object *obj, int n, const size_t *slot, seg_volume *v, seg_progress *pr,
                         lc_err *err)
{
    size_t plane = v->nx * v->ny;
    for (int i = 0; i < n; i++) {
        float *px = NULL;
        int rows = 0, cols = 0, frames = 0;
        const lc_dicom_image_info *in = obj[i].info;
        if (seg_progress_should_stop(pr))
            return lc_err_set(err, LC_ERR_CANCELLED, "cancelled while reading pixels");
        lc_rc rc = lc_dicom_read_pixels_f32(obj[i].path, &px, &rows, &cols, &frames, err);
        if (rc != LC_OK)
            return lc_err_wrap(err, "could not read the pixels of instance %s", obj[i].sop_uid);
        if ((size_t)rows != v->ny || (size_t)cols != v->nx || frames != in->nframes) {
            free(px);
            return lc_err_set(err, LC_ERR_INVALID,
                              "instance %s decodes to %dx%dx%d, its header says %zux%zux%d",
                              obj[i].sop_uid, cols, rows, frames, v->nx, v->ny, in->nframes);
        }
        /* lc_dicom applied the object's first rescale to every frame: redo per frame */
        double s0 = in->hdr->rescale_slope, i0 = in->hdr->rescale_intercept;
        for (int k = 0; k < frames; k++) {
            const lc_dicom_frame_geom *g = &in->frames[k];
            float *src = px + (size_t)k * plane;
            float *dst = v->data + slot[obj[i].first_frame + (size_t)k] * plane;
            if (g->rescale_slope != s0 || g->rescale_intercept != i0) {
                for (size_t p = 0; p < plane; p++)
                    dst[p] = (float)(((double)src[p] - i0) / s0 * g->rescale_slope +
                                     g->rescale_intercept);
            } else {
                memcpy(dst, src, plane * sizeof(float));
            }
        }
        free(px);
        if (obj[i].temp) {
            unlink(obj[i].path);
            obj[i].temp = 0;
        }
        seg_progress_step(pr, 1, 0);
    }
    return LC_OK;
}

/* Geometry of the volume from the ordered stack. */
static lc_rc fill_volume(object *obj, int n, const seg_frame_in *fr, const size_t *slot,
                         const seg_stack *st, seg_volume *v, lc_err *err)
{
    const seg_frame_in *f0 = &fr[st->order[0]];
    const lc_dicom_image_info *in0 = obj[0].info;
    const lc_dicom_frame_geom *g0 = &in0->frames[0];
    static const double ident[6] = {1, 0, 0, 0, 1, 0};
    const double *iop = f0->has_iop ? f0->iop : ident;
    memcpy(v->iop, iop, sizeof(v->iop));
    v->spacing[0] = g0->has_spacing ? g0->pixel_spacing[1] : 1.0; /* row spacing, col spacing */
    v->spacing[1] = g0->has_spacing ? g0->pixel_spacing[0] : 1.0;
    double slen =
        sqrt(st->step[0] * st->step[0] + st->step[1] * st->step[1] + st->step[2] * st->step[2]);
    double thick = g0->slice_thickness > 0 ? g0->slice_thickness : 0;
    if (st->nz < 2) /* one slice: its thickness, else 1 mm */
        slen = thick > 0 ? thick : 1.0;
    v->spacing[2] = slen;
    v->slice_thickness = thick > 0 ? thick : slen;
    v->spacing_uniform = st->uniform;
    v->gap_min = st->gap_min;
    v->gap_max = st->gap_max;
    for (int k = 0; k < 3; k++) {
        v->affine[k][0] = iop[k] * v->spacing[0];
        v->affine[k][1] = iop[3 + k] * v->spacing[1];
        v->affine[k][2] = st->nz > 1 ? st->step[k] : st->normal[k] * slen;
        v->affine[k][3] = f0->has_ipp ? f0->ipp[k] : 0.0;
    }
    v->affine[3][0] = v->affine[3][1] = v->affine[3][2] = 0.0;
    v->affine[3][3] = 1.0;
    v->acq_3d = in0->mr_acquisition_type && strcmp(in0->mr_acquisition_type, "3D") == 0;
    v->gantry_tilt = in0->gantry_tilt;
    if (in0->frame_of_reference_uid &&
        !(v->frame_of_reference_uid = strdup(in0->frame_of_reference_uid)))
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < obj[i].info->nframes; k++) {
            size_t idx = obj[i].first_frame + (size_t)k, s = slot[idx];
            seg_slice *sl = &v->slices[s];
            sl->frame = fr[idx].frame;
            memcpy(sl->ipp, fr[idx].ipp, sizeof(sl->ipp));
            sl->temporal = st->nt > 1 ? (long)(s / st->nz) + 1 : 0;
            if (!(sl->sop_uid = strdup(obj[i].sop_uid)) ||
                !(sl->sop_class_uid = strdup(obj[i].info->hdr->sop_class_uid)))
                return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        }
    }
    return LC_OK;
}

lc_rc seg_volume_load(lc_db *db, lc_store *store, const char *series_uid, size_t max_voxels,
                      seg_progress *pr, seg_volume **out, lc_err *err)
{
    PGresult *res = NULL;
    object *obj = NULL;
    seg_frame_in *fr = NULL;
    size_t nfr = 0, *slot = NULL;
    seg_stack st = {0};
    seg_volume *v = NULL;
    char tmpdir[256] = "";
    const char *p[1] = {series_uid};
    int n = 0;

    *out = NULL;
    lc_rc rc = lc_db_exec(db,
                          "SELECT sop_uid, store_key, sop_class_uid, coalesce(rows, 0), "
                          "coalesce(instance_number, 0) FROM instances WHERE series_uid = $1 "
                          "ORDER BY sop_uid",
                          1, p, &res, err);
    if (rc != LC_OK)
        return rc;
    n = PQntuples(res);
    if (n == 0) {
        rc = lc_err_set(err, LC_ERR_NOT_FOUND, "series %s has no indexed instances", series_uid);
        goto out;
    }
    if (pr)
        pr->total += 2LL * n;
    obj = calloc((size_t)n, sizeof(*obj));
    v = calloc(1, sizeof(*v));
    if (!obj || !v || !(v->series_uid = strdup(series_uid))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    if ((rc = read_objects(res, store, obj, n, tmpdir, pr, err)) != LC_OK ||
        (rc = frame_list(obj, n, &fr, &nfr, err)) != LC_OK ||
        (rc = seg_geom_stack(fr, nfr, &st, err)) != LC_OK)
        goto out;

    v->nx = (size_t)obj[0].info->hdr->columns;
    v->ny = (size_t)obj[0].info->hdr->rows;
    v->nz = st.nz;
    v->nt = st.nt;
    size_t plane = v->nx * v->ny;
    if (plane > max_voxels / nfr) {
        rc = lc_err_set(err, LC_ERR_TOO_LARGE,
                        "series volume %zux%zux%zux%zu is over the limit of %zu voxels "
                        "(RADPIPE_SEG_MAX_VOXELS)",
                        v->nx, v->ny, v->nz, v->nt, max_voxels);
        goto out;
    }
    v->data = malloc(plane * nfr * sizeof(float));
    v->slices = calloc(nfr, sizeof(*v->slices));
    slot = calloc(nfr, sizeof(*slot));
    if (!v->data || !v->slices || !slot) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory for a %zux%zux%zux%zu volume", v->nx,
                        v->ny, v->nz, v->nt);
        goto out;
    }
    for (size_t s = 0; s < nfr; s++)
        slot[st.order[s]] = s;
    if ((rc = fill_volume(obj, n, fr, slot, &st, v, err)) != LC_OK ||
        (rc = read_pixels(obj, n, slot, v, pr, err)) != LC_OK)
        goto out;
    v->ref = obj[0].info->hdr; /* the first object's header: patient and study for the SEG */
    obj[0].info->hdr = NULL;
    *out = v;
    v = NULL;
out:
    for (int i = 0; obj && i < n; i++) {
        if (obj[i].temp && obj[i].path)
            unlink(obj[i].path);
        free(obj[i].path);
        lc_dicom_image_info_free(obj[i].info);
    }
    if (tmpdir[0])
        rmdir(tmpdir);
    free(obj);
    free(fr);
    free(slot);
    free(st.order);
    seg_volume_free(v);
    PQclear(res);
    return rc;
}
