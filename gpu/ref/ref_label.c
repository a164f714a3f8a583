/*
 * ref_label.c: CPU connected components (union-find in the output volume, roots the smallest
 * index: z slabs in parallel, slab planes merged on one thread, trees flattened, roots numbered
 * in index order, so labels follow each component's first voxel whatever the threads) and the
 * per-label kernels (sizes, tables, border marks). Thread safety: parts write disjoint voxels;
 * flattening reads other parts' links with relaxed atomics (links only move up one tree).
 */
#include <string.h>
#include "ref_internal.h"
#include "ref_par.h"

/* Backward neighbours (dx, dy, dz) of each connectivity: the half of the neighbourhood that
 * comes earlier in raster order. 4 and 8 stay in the slice. */
typedef struct nbr {
    int dx, dy, dz;
} nbr;

static const nbr nbr26[13] = {
    {-1, 0, 0},  {0, -1, 0}, {-1, -1, 0}, {1, -1, 0},  {-1, -1, -1}, {0, -1, -1}, {1, -1, -1},
    {-1, 0, -1}, {0, 0, -1}, {1, 0, -1},  {-1, 1, -1}, {0, 1, -1},   {1, 1, -1},
};
static const nbr nbr6[3] = {{-1, 0, 0}, {0, -1, 0}, {0, 0, -1}};

static int nbrs_of(int conn, const nbr **out)
{
    switch (conn) {
    case 4:
        *out = nbr6;
        return 2;
    case 6:
        *out = nbr6;
        return 3;
    case 8:
        *out = nbr26;
        return 4;
    default:
        *out = nbr26;
        return 13;
    }
}

typedef struct lab_job {
    const uint8_t *m;
    uint8_t fgval; /* a voxel is foreground when (m != 0) == fgval */
    size_t nx, ny, nz, n;
    const nbr *nb;
    int nnb;
    int shortcut; /* 26 or 8: see link_voxel */
    int32_t *L;
    size_t zbegin[REF_MAX_THREADS];
    size_t roots[REF_MAX_THREADS];
} lab_job;

static int fg(const lab_job *j, size_t i)
{
    return (j->m[i] != 0) == j->fgval;
}

/* Root of i with path halving; only for trees no other thread touches. */
static int32_t find(int32_t *L, int32_t i)
{
    while (L[i] != i) {
        L[i] = L[L[i]];
        i = L[i];
    }
    return i;
}

/* Joins the trees of roots r and root-of(nb); returns the joint root, the smaller index (so
 * a root stays the smallest index of its tree). r < 0: no tree yet. */
static int32_t join(int32_t *L, int32_t r, int32_t nb)
{
    int32_t rn = find(L, nb);
    if (r < 0 || rn == r)
        return rn;
    if (rn < r) {
        L[r] = rn;
        return rn;
    }
    L[rn] = r;
    return r;
}

/* Links voxel (x, y, z) = i with its foreground backward neighbours at or after plane zmin.
 * merge: only the neighbours in plane z - 1 (the slab boundary), i already in a tree.
 * With 26 or 8, when the voxel to the left is foreground every neighbour with dx <= 0 is
 * already joined to it (it is that voxel's neighbour too, and came before): only the dx = +1
 * ones are left to check. */
static void link_voxel(lab_job *j, size_t x, size_t y, size_t z, size_t i, size_t zmin, int merge)
{
    int32_t *L = j->L, r = merge ? find(L, (int32_t)i) : -1;
    int left = !merge && j->shortcut && x > 0 && fg(j, i - 1);
    if (left)
        r = find(L, (int32_t)i - 1);
    for (int k = 0; k < j->nnb; k++) {
        const nbr *d = &j->nb[k];
        if ((merge && d->dz == 0) || (left && d->dx != 1))
            continue;
        if ((d->dx < 0 && x == 0) || (d->dx > 0 && x + 1 == j->nx) || (d->dy < 0 && y == 0) ||
            (d->dy > 0 && y + 1 == j->ny) || (d->dz < 0 && z == zmin))
            continue;
        size_t nb = i + (size_t)((long)d->dx + (long)j->nx * ((long)d->dy + (long)j->ny * d->dz));
        if (fg(j, nb))
            r = join(L, r, (int32_t)nb);
    }
    /* the roots met are all earlier than i: L[i] < i holds */
    L[i] = r < 0 ? (int32_t)i : r;
}

static void slab_part(void *arg, int part, size_t z0, size_t z1)
{
    lab_job *j = arg;
    size_t plane = j->nx * j->ny;
    j->zbegin[part] = z0;
    for (size_t z = z0; z < z1; z++)
        for (size_t y = 0; y < j->ny; y++)
            for (size_t x = 0, i = z * plane + y * j->nx; x < j->nx; x++, i++) {
                if (!fg(j, i)) {
                    j->L[i] = -1;
                    continue;
                }
                link_voxel(j, x, y, z, i, z0, 0);
            }
}

static int32_t load(const int32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

/* Flattens every tree (each voxel points at its root) and counts the roots of the part. */
static void flatten_part(void *arg, int part, size_t begin, size_t end)
{
    lab_job *j = arg;
    size_t roots = 0;
    for (size_t i = begin; i < end; i++) {
        int32_t p = load(&j->L[i]);
        if (p < 0)
            continue;
        if ((size_t)p == i) {
            roots++;
            continue;
        }
        int32_t q = load(&j->L[p]);
        while (q != p) {
            p = q;
            q = load(&j->L[p]);
        }
        __atomic_store_n(&j->L[i], p, __ATOMIC_RELAXED);
    }
    j->roots[part] = roots;
}

/* Roots get -(label) - 1, labels numbered in index order from the part's base. */
static void number_part(void *arg, int part, size_t begin, size_t end)
{
    lab_job *j = arg;
    int32_t next = (int32_t)j->roots[part]; /* the base, after the prefix sum */
    for (size_t i = begin; i < end; i++)
        if (j->L[i] == (int32_t)i)
            j->L[i] = -(++next) - 1;
}

/* Non-roots read their root's label (roots are not written in this pass). */
static void spread_part(void *arg, int part, size_t begin, size_t end)
{
    lab_job *j = arg;
    (void)part;
    for (size_t i = begin; i < end; i++)
        if (j->L[i] >= 0)
            j->L[i] = -j->L[j->L[i]] - 1;
}

/* Roots and background to their final values. */
static void finish_part(void *arg, int part, size_t begin, size_t end)
{
    lab_job *j = arg;
    (void)part;
    for (size_t i = begin; i < end; i++)
        if (j->L[i] < 0)
            j->L[i] = j->L[i] == -1 ? 0 : -j->L[i] - 1;
}

size_t ref_label_scratch(void *impl, size_t n)
{
    (void)impl;
    (void)n;
    return 0;
}

lc_rc ref_label(void *impl, const uint8_t *m, int invert, const size_t dims[3], int conn,
                int32_t *labels, void *scratch, size_t *nlabels, lc_err *err)
{
    ref_impl *r = impl;
    lab_job j = {.m = m, .fgval = invert ? 0 : 1, .nx = dims[0], .ny = dims[1], .nz = dims[2]};
    (void)scratch;
    (void)err;
    j.n = j.nx * j.ny * j.nz;
    j.L = labels;
    j.nnb = nbrs_of(conn, &j.nb);
    j.shortcut = conn == 26 || conn == 8;

    /* slabs of whole z planes, labelled independently */
    int slabs = ref_units_parts(r->threads, j.nz, 1);
    ref_run_units(r->threads, j.nz, 1, slab_part, &j);
    /* the first plane of each later slab meets the last plane of the one before */
    if (conn == 6 || conn == 26) {
        size_t plane = j.nx * j.ny;
        for (int s = 1; s < slabs; s++) {
            size_t z = j.zbegin[s];
            for (size_t y = 0; y < j.ny; y++)
                for (size_t x = 0, i = z * plane + y * j.nx; x < j.nx; x++, i++)
                    if (fg(&j, i))
                        link_voxel(&j, x, y, z, i, 0, 1);
        }
    }
    ref_run(r->threads, j.n, flatten_part, &j);
    size_t total = 0;
    for (int p = 0; p < ref_parts(r->threads, j.n); p++) {
        size_t c = j.roots[p];
        j.roots[p] = total;
        total += c;
    }
    ref_run(r->threads, j.n, number_part, &j);
    ref_run(r->threads, j.n, spread_part, &j);
    ref_run(r->threads, j.n, finish_part, &j);
    *nlabels = total;
    return LC_OK;
}

/* --- per-label kernels -------------------------------------------------------------------- */

typedef struct size_job {
    const int32_t *L;
    size_t nlabels;
    uint64_t *counts;
} size_job;

/* Runs of equal labels are counted locally and added once: components are spatially
 * coherent, so the shared counters see few (atomic) additions. */
static void size_part(void *arg, int part, size_t begin, size_t end)
{
    size_job *j = arg;
    size_t bad = j->nlabels + 1;
    size_t cur = bad;
    uint64_t run = 0;
    (void)part;
    for (size_t i = begin; i < end; i++) {
        int32_t l = j->L[i];
        size_t slot = l >= 0 && (size_t)l <= j->nlabels ? (size_t)l : bad;
        if (slot != cur) {
            if (run)
                __atomic_fetch_add(&j->counts[cur], run, __ATOMIC_RELAXED);
            cur = slot;
            run = 0;
        }
        run++;
    }
    if (run)
        __atomic_fetch_add(&j->counts[cur], run, __ATOMIC_RELAXED);
}

lc_rc ref_label_sizes(void *impl, const int32_t *labels, size_t n, size_t nlabels, uint64_t *counts,
                      lc_err *err)
{
    ref_impl *r = impl;
    size_job j = {.L = labels, .nlabels = nlabels, .counts = counts};
    (void)err;
    ref_run(r->threads, n, size_part, &j);
    return LC_OK;
}

typedef struct lut_job {
    const int32_t *L;
    const uint8_t *table;
    size_t ntable;
    uint8_t flip;
    uint8_t *out;
} lut_job;

static void lut_part(void *arg, int part, size_t begin, size_t end)
{
    lut_job *j = arg;
    (void)part;
    for (size_t i = begin; i < end; i++) {
        int32_t l = j->L[i];
        j->out[i] = l >= 0 && (size_t)l < j->ntable ? (uint8_t)(j->table[l] ^ j->flip) : 0;
    }
}

lc_rc ref_lut(void *impl, const int32_t *labels, size_t n, const uint8_t *table, size_t ntable,
              uint8_t flip, uint8_t *out, lc_err *err)
{
    ref_impl *r = impl;
    lut_job j = {.L = labels, .table = table, .ntable = ntable, .flip = flip, .out = out};
    (void)err;
    ref_run(r->threads, n, lut_part, &j);
    return LC_OK;
}

static void mark(const int32_t *L, size_t i, uint8_t *table, size_t ntable)
{
    int32_t l = L[i];
    if (l > 0 && (size_t)l < ntable)
        table[l] = 1;
}

lc_rc ref_mark_border(void *impl, const int32_t *labels, const size_t dims[3], int planar,
                      uint8_t *table, size_t ntable, lc_err *err)
{
    size_t nx = dims[0], ny = dims[1], nz = dims[2], plane = nx * ny;
    (void)impl;
    (void)err;
    /* the edges of every slice (rows y = 0 and ny - 1, columns x = 0 and nx - 1) */
    for (size_t z = 0; z < nz; z++) {
        for (size_t x = 0; x < nx; x++) {
            mark(labels, z * plane + x, table, ntable);
            mark(labels, z * plane + (ny - 1) * nx + x, table, ntable);
        }
        for (size_t y = 0; y < ny; y++) {
            mark(labels, z * plane + y * nx, table, ntable);
            mark(labels, z * plane + y * nx + nx - 1, table, ntable);
        }
    }
    /* in 3D also the first and last slices, whole */
    if (!planar)
        for (size_t i = 0; i < plane; i++) {
            mark(labels, i, table, ntable);
            mark(labels, (nz - 1) * plane + i, table, ntable);
        }
    return LC_OK;
}
