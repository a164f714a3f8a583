/*
 * seg_geom.c: the geometry of a series before any pixel is read: one frame size, one
 * orientation, positions on one line, each position the same number of times (4-D), no
 * missing slices. Slices are ordered by the projection of ImagePositionPatient on the slice
 * normal, never by InstanceNumber or file order; inconsistencies are reported, not guessed.
 * Pure functions; thread-safe.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "seg.h"

#define ORIENT_TOL  1e-3 /* direction cosines */
#define SAME_POS_MM 0.01 /* positions closer than this along the normal are one slice */

typedef struct item {
    const seg_frame_in *f;
    size_t index;
    double pos;
} item;

static int cmp_item(const void *a, const void *b)
{
    const item *x = a, *y = b;
    if (x->pos != y->pos)
        return x->pos < y->pos ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* Within one position: temporal position, then instance number, then frame, then input. */
static int cmp_repeat(const void *a, const void *b)
{
    const item *x = a, *y = b;
    if (x->f->temporal != y->f->temporal)
        return x->f->temporal < y->f->temporal ? -1 : 1;
    if (x->f->instance_number != y->f->instance_number)
        return x->f->instance_number < y->f->instance_number ? -1 : 1;
    if (x->f->frame != y->f->frame)
        return x->f->frame < y->f->frame ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* "instance 1.2.3" or "instance 1.2.3 frame 4" */
static const char *who(const seg_frame_in *f, char *buf, size_t cap)
{
    if (f->frame > 0)
        snprintf(buf, cap, "instance %s frame %d", f->sop_uid, f->frame);
    else
        snprintf(buf, cap, "instance %s", f->sop_uid);
    return buf;
}

static double dot(const double a[3], const double b[3])
{
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}

static lc_rc check_frames(const seg_frame_in *f, size_t n, lc_err *err)
{
    char a[200], b[200];
    for (size_t i = 0; i < n; i++) {
        if (f[i].rows != f[0].rows || f[i].cols != f[0].cols)
            return lc_err_set(err, LC_ERR_INVALID,
                              "mixed slice sizes in the series: %dx%d (%s) and %dx%d (%s)",
                              f[0].cols, f[0].rows, who(&f[0], a, sizeof(a)), f[i].cols, f[i].rows,
                              who(&f[i], b, sizeof(b)));
        if (n > 1 && (!f[i].has_ipp || !f[i].has_iop))
            return lc_err_set(err, LC_ERR_INVALID,
                              "%s lacks ImagePositionPatient or ImageOrientationPatient: slices "
                              "cannot be ordered",
                              who(&f[i], a, sizeof(a)));
        for (int k = 0; k < 6 && n > 1; k++)
            if (fabs(f[i].iop[k] - f[0].iop[k]) > ORIENT_TOL)
                return lc_err_set(err, LC_ERR_INVALID,
                                  "mixed orientations in the series: %s and %s differ in "
                                  "ImageOrientationPatient",
                                  who(&f[0], a, sizeof(a)), who(&f[i], b, sizeof(b)));
    }
    return LC_OK;
}

/* Gaps between neighbouring positions: uniform, variable, or missing slices (an error). */
static lc_rc check_gaps(const item *rep, size_t nz, seg_stack *out, lc_err *err)
{
    char a[200], b[200];
    double gmin = INFINITY, gmax = 0;
    for (size_t k = 1; k < nz; k++) {
        double g = rep[k].pos - rep[k - 1].pos;
        gmin = g < gmin ? g : gmin;
        gmax = g > gmax ? g : gmax;
    }
    if (nz < 2)
        gmin = gmax = 0;
    out->gap_min = gmin;
    out->gap_max = gmax;
    double tol = 0.01 + 0.02 * gmin;
    out->uniform = nz < 3 || gmax - gmin <= tol;
    if (out->uniform)
        return LC_OK;
    /* every gap a whole multiple of the smallest: slices are missing from a regular stack */
    size_t first_big = 0;
    for (size_t k = 1; k < nz; k++) {
        double g = rep[k].pos - rep[k - 1].pos;
        double m = round(g / gmin);
        if (fabs(g - m * gmin) > m * tol)
            return LC_OK; /* genuinely variable spacing: accepted, reported as such */
        if (m >= 2 && !first_big)
            first_big = k;
    }
    double g = rep[first_big].pos - rep[first_big - 1].pos;
    return lc_err_set(err, LC_ERR_INVALID,
                      "missing slices: %.3f mm between %s and %s where the series steps %.3f mm "
                      "(about %.0f slices missing)",
                      g, who(rep[first_big - 1].f, a, sizeof(a)),
                      who(rep[first_big].f, b, sizeof(b)), gmin, round(g / gmin) - 1);
}

lc_rc seg_geom_stack(const seg_frame_in *f, size_t n, seg_stack *out, lc_err *err)
{
    item *it = NULL, *rep = NULL;
    lc_rc rc = LC_OK;
    char a[200], b[200];

    memset(out, 0, sizeof(*out));
    if (n == 0)
        return lc_err_set(err, LC_ERR_INVALID, "the series has no image frames");
    if ((rc = check_frames(f, n, err)) != LC_OK)
        return rc;

    static const double ident[6] = {1, 0, 0, 0, 1, 0};
    const double *iop = f[0].has_iop ? f[0].iop : ident;
    double nrm[3] = {iop[1] * iop[5] - iop[2] * iop[4], iop[2] * iop[3] - iop[0] * iop[5],
                     iop[0] * iop[4] - iop[1] * iop[3]};
    double len = sqrt(dot(nrm, nrm));
    if (!(len > 0.5))
        return lc_err_set(err, LC_ERR_INVALID,
                          "ImageOrientationPatient of %s is not two orthogonal unit vectors",
                          who(&f[0], a, sizeof(a)));
    for (int i = 0; i < 3; i++)
        out->normal[i] = nrm[i] / len;

    it = calloc(n, sizeof(*it));
    rep = calloc(n, sizeof(*rep));
    out->order = calloc(n, sizeof(*out->order));
    if (!it || !rep || !out->order) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        it[i].f = &f[i];
        it[i].index = i;
        it[i].pos = f[i].has_ipp ? dot(f[i].ipp, out->normal) : 0.0;
    }
    qsort(it, n, sizeof(*it), cmp_item);

    /* group equal positions; every position must repeat the same number of times */
    size_t nz = 0, nt = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        while (j < n && it[j].pos - it[i].pos < SAME_POS_MM)
            j++;
        size_t c = j - i;
        if (nz == 0)
            nt = c;
        if (c != nt) {
            size_t bad = c > nt ? i : i - nt; /* a group with more frames than another */
            rc = lc_err_set(err, LC_ERR_INVALID,
                            "duplicate slice positions: %s and %s are both at %.3f mm along the "
                            "normal while other positions hold %zu frame(s): a repeated or "
                            "incomplete series cannot be stacked",
                            who(it[bad].f, a, sizeof(a)), who(it[bad + 1].f, b, sizeof(b)),
                            it[bad].pos, c > nt ? nt : c);
            goto out;
        }
        qsort(it + i, c, sizeof(*it), cmp_repeat);
        rep[nz++] = it[i];
        i = j;
    }
    if (nt > 1 && nz < 2) {
        rc = lc_err_set(err, LC_ERR_INVALID,
                        "duplicate slice positions: %s and %s are both at %.3f mm along the normal",
                        who(it[0].f, a, sizeof(a)), who(it[1].f, b, sizeof(b)), it[0].pos);
        goto out;
    }
    for (size_t k = 0; k < nz; k++) {
        for (size_t t = 1; t < nt; t++) { /* the repeats of a 4-D series must differ in time */
            const seg_frame_in *p = it[k * nt + t - 1].f, *q = it[k * nt + t].f;
            if (p->temporal && p->temporal == q->temporal) {
                rc = lc_err_set(err, LC_ERR_INVALID,
                                "duplicate slice positions: %s and %s share position %.3f mm and "
                                "temporal position %ld",
                                who(p, a, sizeof(a)), who(q, b, sizeof(b)), it[k * nt].pos,
                                p->temporal);
                goto out;
            }
        }
        for (size_t t = 0; t < nt; t++)
            out->order[t * nz + k] = it[k * nt + t].index;
    }
    out->nz = nz;
    out->nt = nt;

    /* positions on one line: the offset across the normal grows linearly (gantry tilt) */
    if (nz > 2) {
        const double *p0 = rep[0].f->ipp, *pl = rep[nz - 1].f->ipp;
        double sl = rep[nz - 1].pos - rep[0].pos, shear[3];
        for (int i = 0; i < 3; i++)
            shear[i] = ((pl[i] - p0[i]) - sl * out->normal[i]) / sl;
        for (size_t k = 1; k + 1 < nz; k++) {
            double s = rep[k].pos - rep[0].pos, off = 0;
            for (int i = 0; i < 3; i++) {
                double r = (rep[k].f->ipp[i] - p0[i]) - s * out->normal[i] - s * shear[i];
                off += r * r;
            }
            if (sqrt(off) > 0.1 + 0.002 * fabs(s)) {
                rc = lc_err_set(err, LC_ERR_INVALID,
                                "slice positions are not on one line: %s is %.2f mm off the "
                                "stack through %s and %s",
                                who(rep[k].f, a, sizeof(a)), sqrt(off), who(rep[0].f, b, sizeof(b)),
                                rep[nz - 1].f->sop_uid);
                goto out;
            }
        }
    }
    if ((rc = check_gaps(rep, nz, out, err)) != LC_OK)
        goto out;

    if (nz > 1) {
        const double *p0 = rep[0].f->ipp;
        const double *p1 = out->uniform ? rep[nz - 1].f->ipp : rep[1].f->ipp;
        double div = out->uniform ? (double)(nz - 1) : 1.0;
        for (int i = 0; i < 3; i++)
            out->step[i] = (p1[i] - p0[i]) / div;
    } else {
        for (int i = 0; i < 3; i++)
            out->step[i] = out->normal[i];
    }
out:
    if (rc != LC_OK) {
        free(out->order);
        out->order = NULL;
    }
    free(it);
    free(rep);
    return rc;
}
