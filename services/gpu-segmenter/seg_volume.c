/*
 * seg_volume.c: volume assembly. Slices are ordered by the projection of
 * ImagePositionPatient on the slice normal (the cross product of the row and column
 * cosines), never by InstanceNumber or file order; inconsistencies are reported, not guessed.
 * Pure functions over the index rows plus pixel reads through lc_store and lc_dicom.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lc/dicom.h"
#include "lc/log.h"
#include "seg.h"

typedef struct slice {
    const char *sop_uid, *key;
    int rows, cols, frames;
    int has_ipp, has_iop, has_ps;
    double ipp[3], iop[6], ps[2];
    double pos; /* IPP . normal */
} slice;

/* "{1.5,2,3}" (a PostgreSQL float8[] in text form) -> n doubles; 0 when NULL or malformed. */
static int parse_array(const PGresult *r, int row, int col, double *out, int n)
{
    if (PQgetisnull(r, row, col))
        return 0;
    const char *s = PQgetvalue(r, row, col);
    if (*s++ != '{')
        return 0;
    for (int i = 0; i < n; i++) {
        char *end;
        out[i] = strtod(s, &end);
        if (end == s || !isfinite(out[i]))
            return 0;
        s = end;
        if (*s != (i + 1 == n ? '}' : ','))
            return 0;
        s++;
    }
    return 1;
}

static int cmp_pos(const void *a, const void *b)
{
    double x = ((const slice *)a)->pos, y = ((const slice *)b)->pos;
    return x < y ? -1 : x > y;
}

void seg_volume_free(seg_volume *v)
{
    if (!v)
        return;
    for (size_t i = 0; i < v->nsop; i++)
        free(v->sop_uids[i]);
    free(v->sop_uids);
    free(v->data);
    free(v);
}

/* Check the stack and sort it; fills the geometry of v. */
static lc_rc order_slices(slice *s, int n, seg_volume *v, lc_err *err)
{
    double r[3], c[3], nrm[3];
    for (int i = 0; i < n; i++) {
        if (s[i].rows != s[0].rows || s[i].cols != s[0].cols)
            return lc_err_set(err, LC_ERR_INVALID,
                              "mixed slice sizes in the series: %dx%d and %dx%d", s[0].cols,
                              s[0].rows, s[i].cols, s[i].rows);
        if (n > 1 && (!s[i].has_ipp || !s[i].has_iop))
            return lc_err_set(err, LC_ERR_INVALID,
                              "instance %s lacks ImagePositionPatient or "
                              "ImageOrientationPatient: slices cannot be ordered",
                              s[i].sop_uid);
        if (n > 1 && s[i].frames > 1)
            return lc_err_set(err, LC_ERR_UNSUPPORTED,
                              "series mixes several multi-frame instances");
    }
    if (!s[0].has_iop) { /* a single image without geometry: identity orientation */
        static const double id[6] = {1, 0, 0, 0, 1, 0};
        memcpy(s[0].iop, id, sizeof(id));
    }
    memcpy(r, s[0].iop, sizeof(r));
    memcpy(c, s[0].iop + 3, sizeof(c));
    nrm[0] = r[1] * c[2] - r[2] * c[1];
    nrm[1] = r[2] * c[0] - r[0] * c[2];
    nrm[2] = r[0] * c[1] - r[1] * c[0];
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < 6 && n > 1; k++)
            if (fabs(s[i].iop[k] - s[0].iop[k]) > 1e-3)
                return lc_err_set(err, LC_ERR_INVALID,
                                  "mixed orientations in the series (instance %s differs)",
                                  s[i].sop_uid);
        s[i].pos = s[i].ipp[0] * nrm[0] + s[i].ipp[1] * nrm[1] + s[i].ipp[2] * nrm[2];
    }
    qsort(s, (size_t)n, sizeof(*s), cmp_pos);
    double min_gap = INFINITY, max_gap = 0;
    for (int i = 1; i < n; i++) {
        double gap = s[i].pos - s[i - 1].pos;
        if (gap < 1e-3)
            return lc_err_set(err, LC_ERR_INVALID,
                              "duplicate slice positions (instances %s and %s at %.3f mm): a "
                              "4-D or repeated series cannot be stacked",
                              s[i - 1].sop_uid, s[i].sop_uid, s[i].pos);
        min_gap = gap < min_gap ? gap : min_gap;
        max_gap = gap > max_gap ? gap : max_gap;
    }
    double dz = n > 1 ? (s[n - 1].pos - s[0].pos) / (n - 1) : 1.0;
    v->spacing_uniform = n < 3 || (max_gap - min_gap) <= 0.1 * dz;
    v->spacing[0] = s[0].has_ps ? s[0].ps[1] : 1.0; /* PixelSpacing = row, column spacing */
    v->spacing[1] = s[0].has_ps ? s[0].ps[0] : 1.0;
    v->spacing[2] = dz;
    /* columns of the affine: column step along the row cosine, row step along the column
     * cosine, slice step from first to last position (keeps gantry tilt) */
    for (int k = 0; k < 3; k++) {
        v->affine[k][0] = r[k] * v->spacing[0];
        v->affine[k][1] = c[k] * v->spacing[1];
        v->affine[k][2] =
            n > 1 ? (s[n - 1].ipp[k] - s[0].ipp[k]) / (n - 1) : nrm[k] * v->spacing[2];
        v->affine[k][3] = s[0].has_ipp ? s[0].ipp[k] : 0.0;
    }
    v->affine[3][0] = v->affine[3][1] = v->affine[3][2] = 0.0;
    v->affine[3][3] = 1.0;
    return LC_OK;
}

lc_rc seg_volume_load(lc_db *db, lc_store *store, const char *series_uid, lc_worker_job *j,
                      seg_volume **out, lc_err *err)
{
    PGresult *res = NULL;
    slice *s = NULL;
    seg_volume *v = NULL;
    lc_rc rc;
    const char *p[1] = {series_uid};

    *out = NULL;
    rc = lc_db_exec(db,
                    "SELECT sop_uid, store_key, coalesce(rows, 0), coalesce(columns, 0), "
                    "coalesce(number_of_frames, 1), image_position, image_orientation, "
                    "pixel_spacing FROM instances WHERE series_uid = $1",
                    1, p, &res, err);
    if (rc != LC_OK)
        return rc;
    int n = PQntuples(res);
    if (n == 0) {
        rc = lc_err_set(err, LC_ERR_NOT_FOUND, "series %s has no indexed instances", series_uid);
        goto out;
    }
    s = calloc((size_t)n, sizeof(*s));
    v = calloc(1, sizeof(*v));
    if (!s || !v) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        s[i].sop_uid = PQgetvalue(res, i, 0);
        s[i].key = PQgetvalue(res, i, 1);
        s[i].rows = atoi(PQgetvalue(res, i, 2));
        s[i].cols = atoi(PQgetvalue(res, i, 3));
        s[i].frames = atoi(PQgetvalue(res, i, 4));
        if (s[i].rows <= 0 || s[i].cols <= 0) {
            rc = lc_err_set(err, LC_ERR_UNSUPPORTED,
                            "instance %s is not an image (no Rows/Columns)", s[i].sop_uid);
            goto out;
        }
        s[i].has_ipp = parse_array(res, i, 5, s[i].ipp, 3);
        s[i].has_iop = parse_array(res, i, 6, s[i].iop, 6);
        s[i].has_ps = parse_array(res, i, 7, s[i].ps, 2);
    }
    if ((rc = order_slices(s, n, v, err)) != LC_OK)
        goto out;

    v->nx = (size_t)s[0].cols;
    v->ny = (size_t)s[0].rows;
    v->nz = n > 1 ? (size_t)n : (size_t)s[0].frames;
    size_t plane = v->nx * v->ny;
    if (v->nz == 0 || plane > ((size_t)1 << 34) / v->nz) {
        rc = lc_err_set(err, LC_ERR_TOO_LARGE, "volume %zux%zux%zu is too large", v->nx, v->ny,
                        v->nz);
        goto out;
    }
    v->data = malloc(plane * v->nz * sizeof(float));
    v->sop_uids = calloc((size_t)n, sizeof(char *));
    if (v->sop_uids)
        v->nsop = (size_t)n; /* seg_volume_free walks nsop entries */
    if (!v->data || !v->sop_uids) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory for a %zux%zux%zu volume", v->nx, v->ny,
                        v->nz);
        goto out;
    }
    for (int i = 0; i < n; i++) {
        char *path = NULL;
        float *px = NULL;
        int rows = 0, cols = 0, frames = 0;
        if (j && lc_worker_job_should_stop(j)) {
            rc = lc_err_set(err, LC_ERR_CANCELLED, "cancelled while loading slices");
            goto out;
        }
        if (!(v->sop_uids[i] = strdup(s[i].sop_uid))) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
            goto out;
        }
        rc = lc_store_local_path(store, s[i].key, &path, err);
        if (rc == LC_OK)
            rc = lc_dicom_read_pixels_f32(path, &px, &rows, &cols, &frames, err);
        free(path);
        if (rc != LC_OK) {
            lc_err_wrap(err, "could not read the pixels of instance %s", s[i].sop_uid);
            goto out;
        }
        size_t want_frames = n > 1 ? 1 : v->nz;
        if ((size_t)rows != v->ny || (size_t)cols != v->nx || (size_t)frames != want_frames) {
            free(px);
            rc = lc_err_set(err, LC_ERR_INVALID,
                            "instance %s decodes to %dx%dx%d, the index says %zux%zux%zu",
                            s[i].sop_uid, cols, rows, frames, v->nx, v->ny, want_frames);
            goto out;
        }
        memcpy(v->data + (size_t)i * plane, px, plane * want_frames * sizeof(float));
        free(px);
    }
    *out = v;
    v = NULL;
out:
    seg_volume_free(v);
    free(s);
    PQclear(res);
    return rc;
}
