/*
 * gpu_label.c: the front-end of connected components, component sizes and filtering, and hole
 * filling (gpu_seg.h): checks arguments, allocates counted scratch, picks the components to
 * keep on the host (only per-label tables cross), and runs the backend's kernels.
 * Thread safety: a context is used by one thread at a time.
 */
#include <stdlib.h>
#include <string.h>
#include "gpu_internal.h"

static int conn_ok(int conn)
{
    return conn == 6 || conn == 26 || conn == 4 || conn == 8;
}

static lc_rc check_label_size(const gpu_vol *v, const char *what, lc_err *err)
{
    if (v->n > GPU_LABEL_MAX_VOXELS)
        return lc_err_set(err, LC_ERR_TOO_LARGE,
                          "%s: volume of %zu voxels is over the labelling limit of %zu", what, v->n,
                          GPU_LABEL_MAX_VOXELS);
    return LC_OK;
}

/* Labels of the voxels of mask with (m != 0) != invert into labels (checked by the caller). */
static lc_rc run_label(gpu_ctx *ctx, const gpu_vol *mask, int invert, int conn, gpu_vol *labels,
                       size_t *nlabels, lc_err *err)
{
    size_t dims[3] = {mask->nx, mask->ny, mask->nz};
    size_t sbytes = ctx->ops->label_scratch(ctx->impl, mask->n);
    void *scratch = NULL;
    lc_rc rc = LC_OK;
    if (sbytes && (rc = gpu_mem_alloc(ctx, sbytes, 0, &scratch, err)) != LC_OK)
        return rc;
    rc = ctx->ops->label(ctx->impl, mask->mem, invert, dims, conn, labels->mem, scratch, nlabels,
                         err);
    gpu_mem_release(ctx, scratch, sbytes);
    return rc;
}

lc_rc gpu_label(gpu_ctx *ctx, const gpu_vol *mask, int connectivity, gpu_vol *labels,
                size_t *nlabels, lc_err *err)
{
    lc_rc rc = gpu_check_vol(ctx, mask, GPU_U8, "gpu_label input", err);
    if (rc == LC_OK)
        rc = gpu_check_vol(ctx, labels, GPU_I32, "gpu_label output", err);
    if (rc == LC_OK)
        rc = gpu_check_dims(mask, labels, "gpu_label", err);
    if (rc == LC_OK)
        rc = check_label_size(mask, "gpu_label", err);
    if (rc != LC_OK)
        return rc;
    if (!nlabels)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_label: nlabels is NULL");
    if (!conn_ok(connectivity))
        return lc_err_set(err, LC_ERR_INVALID, "invalid connectivity %d: not 4, 6, 8 or 26",
                          connectivity);
    return run_label(ctx, mask, 0, connectivity, labels, nlabels, err);
}

lc_rc gpu_label_sizes(gpu_ctx *ctx, const gpu_vol *labels, size_t nlabels, uint64_t *sizes,
                      lc_err *err)
{
    uint64_t *host = NULL;
    void *counts = NULL;
    size_t nbytes;
    lc_rc rc = gpu_check_vol(ctx, labels, GPU_I32, "gpu_label_sizes", err);
    if (rc != LC_OK)
        return rc;
    if (!sizes)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_label_sizes: sizes is NULL");
    if (nlabels > labels->n || nlabels > (size_t)INT32_MAX)
        return lc_err_set(err, LC_ERR_INVALID,
                          "gpu_label_sizes: %zu labels cannot come from %zu voxels", nlabels,
                          labels->n);
    nbytes = (nlabels + 2) * sizeof(uint64_t);
    host = malloc(nbytes);
    if (!host)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate %zu label counters", nlabels + 2);
    if ((rc = gpu_mem_alloc(ctx, nbytes, 1, &counts, err)) != LC_OK ||
        (rc = ctx->ops->label_sizes(ctx->impl, labels->mem, labels->n, nlabels, counts, err)) !=
            LC_OK ||
        (rc = ctx->ops->to_host(ctx->impl, host, counts, nbytes, err)) != LC_OK)
        goto out;
    if (host[nlabels + 1]) {
        rc = lc_err_set(err, LC_ERR_INVALID,
                        "label volume holds %llu voxels with labels outside 0..%zu",
                        (unsigned long long)host[nlabels + 1], nlabels);
        goto out;
    }
    memcpy(sizes, host, (nlabels + 1) * sizeof(uint64_t));
out:
    gpu_mem_release(ctx, counts, nbytes);
    free(host);
    return rc;
}

typedef struct cand {
    uint64_t size;
    size_t label;
} cand;

/* Larger first; equal sizes by label, smaller (earlier first voxel) first. */
static int cand_cmp(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->size != y->size)
        return x->size > y->size ? -1 : 1;
    return x->label < y->label ? -1 : x->label > y->label;
}

lc_rc gpu_select_components(gpu_ctx *ctx, const gpu_vol *labels, size_t nlabels,
                            size_t keep_largest, uint64_t min_voxels, gpu_vol *out, size_t *kept,
                            lc_err *err)
{
    uint64_t *sizes = NULL;
    uint8_t *table = NULL;
    cand *c = NULL;
    void *dtable = NULL;
    size_t nc = 0, ntable = nlabels + 1;
    lc_rc rc = gpu_check_vol(ctx, labels, GPU_I32, "gpu_select_components input", err);
    if (rc == LC_OK)
        rc = gpu_check_vol(ctx, out, GPU_U8, "gpu_select_components output", err);
    if (rc == LC_OK)
        rc = gpu_check_dims(labels, out, "gpu_select_components", err);
    if (rc != LC_OK)
        return rc;
    if (nlabels > labels->n)
        return lc_err_set(err, LC_ERR_INVALID,
                          "gpu_select_components: %zu labels cannot come from %zu voxels", nlabels,
                          labels->n);
    sizes = malloc(ntable * sizeof(*sizes));
    table = calloc(ntable, 1);
    c = malloc(ntable * sizeof(*c));
    if (!sizes || !table || !c) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "could not allocate tables for %zu labels", nlabels);
        goto out;
    }
    if ((rc = gpu_label_sizes(ctx, labels, nlabels, sizes, err)) != LC_OK)
        goto out;
    for (size_t l = 1; l <= nlabels; l++)
        if (sizes[l] >= min_voxels && sizes[l] > 0)
            c[nc++] = (cand){.size = sizes[l], .label = l};
    if (keep_largest && nc > keep_largest) {
        qsort(c, nc, sizeof(*c), cand_cmp);
        nc = keep_largest;
    }
    for (size_t i = 0; i < nc; i++)
        table[c[i].label] = 1;
    if ((rc = gpu_mem_alloc(ctx, ntable, 0, &dtable, err)) != LC_OK ||
        (rc = ctx->ops->to_mem(ctx->impl, dtable, table, ntable, err)) != LC_OK ||
        (rc = ctx->ops->lut(ctx->impl, labels->mem, labels->n, dtable, ntable, 0, out->mem, err)) !=
            LC_OK)
        goto out;
    if (kept)
        *kept = nc;
out:
    gpu_mem_release(ctx, dtable, ntable);
    free(c);
    free(table);
    free(sizes);
    return rc;
}

lc_rc gpu_keep_largest(gpu_ctx *ctx, const gpu_vol *in, int connectivity, size_t keep_largest,
                       uint64_t min_voxels, gpu_vol *out, size_t *kept, lc_err *err)
{
    gpu_vol *labels = NULL;
    size_t nl = 0;
    lc_rc rc = gpu_check_vol(ctx, in, GPU_U8, "gpu_keep_largest input", err);
    if (rc == LC_OK)
        rc = gpu_check_vol(ctx, out, GPU_U8, "gpu_keep_largest output", err);
    if (rc == LC_OK)
        rc = gpu_check_dims(in, out, "gpu_keep_largest", err);
    if (rc != LC_OK)
        return rc;
    if ((rc = gpu_vol_alloc(ctx, GPU_I32, in->nx, in->ny, in->nz, 0, &labels, err)) == LC_OK &&
        (rc = gpu_label(ctx, in, connectivity, labels, &nl, err)) == LC_OK)
        rc = gpu_select_components(ctx, labels, nl, keep_largest, min_voxels, out, kept, err);
    gpu_vol_free(labels);
    return rc;
}

lc_rc gpu_fill_holes(gpu_ctx *ctx, const gpu_vol *in, int bg_connectivity, gpu_vol *out,
                     lc_err *err)
{
    gpu_vol *labels = NULL;
    void *table = NULL;
    size_t nl = 0, ntable = 0;
    size_t dims[3];
    lc_rc rc = gpu_check_vol(ctx, in, GPU_U8, "gpu_fill_holes input", err);
    if (rc == LC_OK)
        rc = gpu_check_vol(ctx, out, GPU_U8, "gpu_fill_holes output", err);
    if (rc == LC_OK)
        rc = gpu_check_dims(in, out, "gpu_fill_holes", err);
    if (rc == LC_OK)
        rc = check_label_size(in, "gpu_fill_holes", err);
    if (rc != LC_OK)
        return rc;
    if (!conn_ok(bg_connectivity))
        return lc_err_set(err, LC_ERR_INVALID,
                          "invalid background connectivity %d: not 4, 6, 8 or 26", bg_connectivity);
    dims[0] = in->nx;
    dims[1] = in->ny;
    dims[2] = in->nz;
    /* Background components (labels of the complement); those touching the border are marked
     * in a table, and out = 1 except on marked components: table[0] (foreground) is never
     * marked, so out = table[label] ^ 1 keeps the foreground and fills unmarked cavities. */
    if ((rc = gpu_vol_alloc(ctx, GPU_I32, in->nx, in->ny, in->nz, 0, &labels, err)) != LC_OK ||
        (rc = run_label(ctx, in, 1, bg_connectivity, labels, &nl, err)) != LC_OK)
        goto out;
    ntable = nl + 1;
    int planar = bg_connectivity == 4 || bg_connectivity == 8;
    if ((rc = gpu_mem_alloc(ctx, ntable, 1, &table, err)) != LC_OK ||
        (rc = ctx->ops->mark_border(ctx->impl, labels->mem, dims, planar, table, ntable, err)) !=
            LC_OK)
        goto out;
    rc = ctx->ops->lut(ctx->impl, labels->mem, labels->n, table, ntable, 1, out->mem, err);
out:
    gpu_mem_release(ctx, table, ntable);
    gpu_vol_free(labels);
    return rc;
}
