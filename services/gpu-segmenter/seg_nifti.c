/*
 * seg_nifti.c: the mask as NIfTI-1 (.nii.gz) with dcm2niix's geometry conventions, so the
 * mask overlays what dcm2niix makes of the same series: DICOM's LPS becomes RAS (x and y
 * negated), rows are stored bottom-up (the row axis flipped, the origin moved to the last
 * row), except for MR 3D acquisitions, which dcm2niix instead reorients to the nearest
 * orthogonal axes (its nii_setOrtho); sform and qform both SCANNER_ANAT; 4-D series keep
 * their time points in dim[4]. The header comes from libnifti, the gzip stream from zlib.
 * Pure functions; thread-safe.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <nifti1_io.h>
#include <zlib.h>
#include "seg.h"

/* Permutation of the source axes that brings M closest to a positive diagonal. */
static void best_ortho(const double m[3][3], int perm[3], int flip[3])
{
    static const int perms[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2},
                                    {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
    double best = -1;
    for (int p = 0; p < 6; p++) {
        double score = 0;
        for (int a = 0; a < 3; a++)
            score += fabs(m[a][perms[p][a]]);
        if (score > best + 1e-9) {
            best = score;
            memcpy(perm, perms[p], sizeof(perms[p]));
        }
    }
    for (int a = 0; a < 3; a++)
        flip[a] = m[a][perm[a]] < 0;
}

lc_rc seg_nifti_geometry(const seg_volume *v, seg_nifti_geom *g, size_t **map, lc_err *err)
{
    size_t d[3] = {v->nx, v->ny, v->nz};
    double a[3][4]; /* LPS */
    int perm[3] = {0, 1, 2}, flip[3] = {0, 0, 0};

    for (int r = 0; r < 3; r++)
        for (int c = 0; c < 4; c++)
            a[r][c] = v->affine[r][c];
    int ortho = v->acq_3d && v->nz > 1 && v->nt == 1;
    if (!ortho) {
        flip[1] = 1; /* rows bottom-up */
    } else {
        double ras[3][3];
        for (int r = 0; r < 3; r++)
            for (int c = 0; c < 3; c++)
                ras[r][c] = (r < 2 ? -1 : 1) * a[r][c];
        int diag = 1;
        for (int r = 0; r < 3; r++)
            for (int c = 0; c < 3; c++)
                diag = diag && (r == c ? ras[r][c] > 0 : ras[r][c] == 0);
        if (!diag)
            best_ortho(ras, perm, flip);
    }
    /* output axis o shows source axis perm[o], reversed when flip[o] */
    double origin[3];
    for (int r = 0; r < 3; r++) {
        origin[r] = a[r][3];
        for (int o = 0; o < 3; o++)
            if (flip[o])
                origin[r] += (double)(d[perm[o]] - 1) * a[r][perm[o]];
    }
    memset(g, 0, sizeof(*g));
    for (int o = 0; o < 3; o++)
        g->dims[o] = d[perm[o]];
    for (int r = 0; r < 3; r++) {
        double sgn = r < 2 ? -1 : 1; /* LPS -> RAS */
        for (int o = 0; o < 3; o++)
            g->sform[r][o] = sgn * (flip[o] ? -1 : 1) * a[r][perm[o]];
        g->sform[r][3] = sgn * origin[r];
    }
    g->sform[3][3] = 1;
    if (!map)
        return LC_OK;
    size_t n = d[0] * d[1] * d[2];
    size_t *m = malloc(n * sizeof(*m));
    if (!m)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    size_t stride[3] = {1, d[0], d[0] * d[1]}, o = 0;
    for (size_t k = 0; k < g->dims[2]; k++)
        for (size_t j = 0; j < g->dims[1]; j++)
            for (size_t i = 0; i < g->dims[0]; i++) {
                size_t idx[3] = {i, j, k}, src = 0;
                for (int ax = 0; ax < 3; ax++) {
                    size_t x = flip[ax] ? g->dims[ax] - 1 - idx[ax] : idx[ax];
                    src += x * stride[perm[ax]];
                }
                m[o++] = src;
            }
    *map = m;
    return LC_OK;
}

/* gzip (RFC 1952) of the parts, written to path. */
static lc_rc write_gz(const char *path, const void *const *parts, const size_t *lens, int nparts,
                      lc_err *err)
{
    gzFile f = gzopen(path, "wb6");
    if (!f)
        return lc_err_set(err, LC_ERR_IO, "could not create \"%s\"", path);
    for (int i = 0; i < nparts; i++) {
        const char *p = parts[i];
        size_t left = lens[i];
        while (left > 0) {
            unsigned chunk = left > (1u << 30) ? 1u << 30 : (unsigned)left;
            if (gzwrite(f, p, chunk) != (int)chunk) {
                int e;
                const char *msg = gzerror(f, &e);
                lc_rc rc = lc_err_set(err, LC_ERR_IO, "could not write \"%s\": %s", path, msg);
                gzclose(f);
                return rc;
            }
            p += chunk;
            left -= chunk;
        }
    }
    if (gzclose(f) != Z_OK)
        return lc_err_set(err, LC_ERR_IO, "could not finish \"%s\"", path);
    return LC_OK;
}

lc_rc seg_nifti_write(const seg_volume *v, const uint8_t *mask, int max_label, const char *descrip,
                      const char *path, lc_err *err)
{
    seg_nifti_geom g;
    size_t *map = NULL;
    uint8_t *data = NULL;
    nifti_image *nim = NULL;
    lc_rc rc = seg_nifti_geometry(v, &g, &map, err);
    if (rc != LC_OK)
        return rc;
    size_t n3 = v->nx * v->ny * v->nz;
    if (g.dims[0] > 32767 || g.dims[1] > 32767 || g.dims[2] > 32767 || v->nt > 32767) {
        rc = lc_err_set(err, LC_ERR_UNSUPPORTED, "volume too large for NIfTI-1 dimensions");
        goto out;
    }
    int dims[8] = {
        v->nt > 1 ? 4 : 3, (int)g.dims[0], (int)g.dims[1], (int)g.dims[2], (int)v->nt, 1, 1, 1};
    nim = nifti_make_new_nim(dims, DT_UINT8, 0);
    for (int d = dims[0] + 1; nim && d < 8; d++)
        nim->dim[d] = 1; /* unused dimensions are 1, as dcm2niix writes them */
    data = malloc(n3 * v->nt);
    if (!nim || !data) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t t = 0; t < v->nt; t++)
        for (size_t o = 0; o < n3; o++)
            data[t * n3 + o] = mask[t * n3 + map[o]];

    mat44 s;
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++)
            s.m[r][c] = (float)g.sform[r][c];
    nim->sform_code = nim->qform_code = NIFTI_XFORM_SCANNER_ANAT;
    nim->sto_xyz = s;
    nim->sto_ijk = nifti_mat44_inverse(s);
    float qb, qc, qd, qx, qy, qz, dx, dy, dz, qfac;
    nifti_mat44_to_quatern(s, &qb, &qc, &qd, &qx, &qy, &qz, &dx, &dy, &dz, &qfac);
    nim->quatern_b = qb;
    nim->quatern_c = qc;
    nim->quatern_d = qd;
    nim->qoffset_x = qx;
    nim->qoffset_y = qy;
    nim->qoffset_z = qz;
    nim->qfac = qfac;
    nim->qto_xyz = nifti_quatern_to_mat44(qb, qc, qd, qx, qy, qz, dx, dy, dz, qfac);
    nim->qto_ijk = nifti_mat44_inverse(nim->qto_xyz);
    nim->dx = nim->pixdim[1] = dx;
    nim->dy = nim->pixdim[2] = dy;
    nim->dz = nim->pixdim[3] = dz;
    nim->pixdim[0] = qfac;
    nim->xyz_units = NIFTI_UNITS_MM;
    nim->time_units = NIFTI_UNITS_SEC;
    nim->intent_code = NIFTI_INTENT_LABEL;
    nim->scl_slope = 1;
    nim->scl_inter = 0;
    nim->cal_min = 0;
    nim->cal_max = (float)(max_label > 0 ? max_label : 1);
    snprintf(nim->descrip, sizeof(nim->descrip), "%s", descrip ? descrip : "radpipe mask");
    snprintf(nim->intent_name, sizeof(nim->intent_name), "%s", max_label > 1 ? "labels" : "mask");
    nim->nifti_type = NIFTI_FTYPE_NIFTI1_1;

    struct nifti_1_header hdr = nifti_convert_nim2nhdr(nim);
    hdr.vox_offset = 352;
    memcpy(hdr.magic, "n+1\0", 4);
    static const char ext[4] = {0, 0, 0, 0}; /* no extensions */
    const void *parts[3] = {&hdr, ext, data};
    size_t lens[3] = {sizeof(hdr), sizeof(ext), n3 * v->nt};
    rc = write_gz(path, parts, lens, 3, err);
out:
    if (nim)
        nim->data = NULL;
    nifti_image_free(nim);
    free(data);
    free(map);
    return rc;
}
