/*
 * ref_label.c: CPU connected components by runs (gpu_runs in gpu_internal.h): the maximal
 * stretches of foreground voxels along x in each row, found from 64-bit masks of the row's
 * bytes; the runs of z slabs joined in parallel by union-find over run indices (a root is the
 * smallest index of its tree), slab boundaries joined on one thread, trees flattened, roots
 * numbered in run order, which is raster order, so labels follow each component's first voxel
 * whatever the thread count. Sizes, border marks, masks and label volumes are then written
 * from the runs, so keep-largest and hole filling need no label volume. Also the per-label
 * kernels on GPU_I32 volumes (sizes, tables, border marks). The caller (gpu_label.c) owns the
 * run memory. Thread safety: parts write disjoint rows and runs; flattening reads other parts'
 * links with relaxed atomics (links only move up a tree).
 */
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif
#include "ref_internal.h"
#include "ref_par.h"

/* A run: voxels x0 .. x1 - 1 of its row. */
typedef struct ref_run_x {
    int32_t x0, x1;
} ref_run_x;

/* The run memory: nruns extents, then nruns links (union-find) that become -label. */
static ref_run_x *run_x(const gpu_runs *r)
{
    return r->runs;
}

static int32_t *run_link(const gpu_runs *r)
{
    return r->runs ? (int32_t *)((ref_run_x *)r->runs + r->nruns) : NULL;
}

size_t ref_runs_bytes(void *impl, size_t nruns)
{
    (void)impl;
    return nruns * (sizeof(ref_run_x) + sizeof(int32_t));
}

/* --- finding runs ------------------------------------------------------------------------- */

/* Bit k of the result set when byte p[k] (k < len <= 64) is foreground: (p[k] != 0) !=
 * invert. 16 bytes at a time with SSE2 (a byte comparison, then PMOVMSKB), the rest one by
 * one; both give the same bits. */
static uint64_t fg_mask64(const uint8_t *p, size_t len, int invert)
{
    uint64_t m = 0;
    size_t k = 0;
#ifdef __SSE2__
    const v16 zero = {0};
    const v16 flip = invert ? zero : ~zero; /* (v == 0) is foreground when inverted */
    for (; k + 16 <= len; k += 16) {
        v16 v;
        memcpy(&v, p + k, sizeof(v));
        v = (v16)(v == zero) ^ flip;
        m |= (uint64_t)(uint16_t)_mm_movemask_epi8((__m128i)v) << k;
    }
#endif
    for (; k < len; k++)
        m |= (uint64_t)((p[k] != 0) != invert) << k;
    return m;
}

/* Set bits of x (no POPCNT in baseline x86-64; called only for non-zero words). */
static size_t popcount64(uint64_t x)
{
    x -= (x >> 1) & 0x5555555555555555ull;
    x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0full;
    return (size_t)((x * 0x0101010101010101ull) >> 56);
}

/* Runs starting in the row of nx bytes at m. */
static size_t count_row(const uint8_t *m, size_t nx, int invert)
{
    uint64_t carry = 0; /* bit 0: the byte before the block was foreground */
    size_t c = 0;
    for (size_t x = 0; x < nx; x += 64) {
        uint64_t f = fg_mask64(m + x, nx - x < 64 ? nx - x : 64, invert);
        uint64_t starts = f & ~((f << 1) | carry);
        carry = f >> 63;
        if (starts)
            c += popcount64(starts);
    }
    return c;
}

/* Writes the runs of the row at m into out (count_row of them). */
static void find_row(const uint8_t *m, size_t nx, int invert, ref_run_x *out)
{
    uint64_t carry = 0;
    int32_t x0 = 0;
    int in = 0;
    for (size_t x = 0; x < nx; x += 64) {
        uint64_t f = fg_mask64(m + x, nx - x < 64 ? nx - x : 64, invert);
        uint64_t edges = f ^ ((f << 1) | carry); /* bit k: byte k differs from the one before */
        carry = f >> 63;
        while (edges) {
            int32_t at = (int32_t)x + __builtin_ctzll(edges);
            if (in)
                *out++ = (ref_run_x){x0, at};
            else
                x0 = at;
            in = !in;
            edges &= edges - 1;
        }
    }
    if (in)
        *out = (ref_run_x){x0, (int32_t)nx};
}

typedef struct runs_job {
    const uint8_t *m;
    gpu_runs *r;
    const int32_t *nb; /* (dy, dz) of the earlier rows a run may touch, and their x reach */
    int nnb;
    size_t zbegin[REF_MAX_THREADS];
    size_t roots[REF_MAX_THREADS];
} runs_job;

static void count_part(void *arg, int part, size_t begin, size_t end)
{
    runs_job *j = arg;
    gpu_runs *r = j->r;
    (void)part;
    for (size_t row = begin; row < end; row++)
        r->row[row + 1] = (int32_t)count_row(j->m + row * r->nx, r->nx, r->invert);
}

lc_rc ref_runs_count(void *impl, const uint8_t *m, gpu_runs *r, lc_err *err)
{
    ref_impl *ri = impl;
    runs_job j = {.m = m, .r = r};
    size_t rows = r->ny * r->nz, total = 0;
    (void)err;
    ref_run_units(ri->threads, rows, REF_MIN_PART / r->nx + 1, count_part, &j);
    r->row[0] = 0;
    for (size_t row = 0; row < rows; row++) {
        total += (size_t)r->row[row + 1];
        r->row[row + 1] = (int32_t)total; /* at most nx * ny * nz / 2 + rows <= INT32_MAX */
    }
    r->nruns = total;
    return LC_OK;
}

/* --- joining runs ------------------------------------------------------------------------- */

/* Root of i with path halving; only for trees no other thread touches. */
static int32_t find(int32_t *L, int32_t i)
{
    while (L[i] != i) {
        L[i] = L[L[i]];
        i = L[i];
    }
    return i;
}

/* One tree for a and b; the smaller root stays the root. */
static void unite(int32_t *L, int32_t a, int32_t b)
{
    a = find(L, a);
    b = find(L, b);
    if (a < b)
        L[b] = a;
    else if (b < a)
        L[a] = b;
}

/* Joins the runs of rows ra and rb that touch: overlap in x, or with reach 1 also diagonally
 * (x extents one apart). Both lists are in x order: walk them together, always stepping past
 * the run that ends first (it cannot touch anything later in the other row). */
static void join_rows(const gpu_runs *r, int32_t ra, int32_t rb, int reach)
{
    const ref_run_x *X = run_x(r);
    int32_t *L = run_link(r);
    int32_t i = r->row[ra], ie = r->row[ra + 1], k = r->row[rb], ke = r->row[rb + 1];
    while (i < ie && k < ke) {
        if ((int64_t)X[i].x0 < (int64_t)X[k].x1 + reach &&
            (int64_t)X[k].x0 < (int64_t)X[i].x1 + reach)
            unite(L, i, k);
        if (X[i].x1 <= X[k].x1)
            i++;
        else
            k++;
    }
}

/* Earlier rows a row's runs may touch, (dy, dz, reach): same slice first, then z - 1. */
static const int32_t nb6[] = {-1, 0, 0, 0, -1, 0};
static const int32_t nb26[] = {-1, 0, 1, -1, -1, 1, 0, -1, 1, 1, -1, 1};
static const int32_t nb4[] = {-1, 0, 0};
static const int32_t nb8[] = {-1, 0, 1};

/* Joins row (y, z) with its earlier neighbour rows at or after plane zmin; with only_z, just
 * those in plane z - 1 (a slab boundary). */
static void join_row(const runs_job *j, size_t y, size_t z, size_t zmin, int only_z)
{
    const gpu_runs *r = j->r;
    for (int k = 0; k < j->nnb; k++) {
        const int32_t *d = j->nb + 3 * k;
        if ((only_z && d[1] == 0) || (d[1] < 0 && z == zmin) || (d[0] < 0 && y == 0) ||
            (d[0] > 0 && y + 1 == r->ny))
            continue;
        size_t yy = (size_t)((long)y + d[0]), zz = (size_t)((long)z + d[1]);
        join_rows(r, (int32_t)(y + r->ny * z), (int32_t)(yy + r->ny * zz), d[2]);
    }
}

static void slab_part(void *arg, int part, size_t z0, size_t z1)
{
    runs_job *j = arg;
    gpu_runs *r = j->r;
    ref_run_x *X = run_x(r);
    int32_t *L = run_link(r);
    j->zbegin[part] = z0;
    if (!X)
        return; /* no runs at all */
    for (size_t z = z0; z < z1; z++)
        for (size_t y = 0; y < r->ny; y++) {
            size_t row = y + r->ny * z;
            if (r->row[row] == r->row[row + 1])
                continue; /* nothing to find, nothing to join */
            find_row(j->m + row * r->nx, r->nx, r->invert, X + r->row[row]);
            for (int32_t i = r->row[row]; i < r->row[row + 1]; i++)
                L[i] = i;
            join_row(j, y, z, z0, 0);
        }
}

static int32_t load(const int32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

/* Points every run at its root and counts the roots of the part. */
static void flatten_part(void *arg, int part, size_t begin, size_t end)
{
    runs_job *j = arg;
    int32_t *L = run_link(j->r);
    size_t roots = 0;
    for (size_t i = begin; i < end; i++) {
        int32_t p = load(&L[i]);
        if ((size_t)p == i) {
            roots++;
            continue;
        }
        int32_t q = load(&L[p]);
        while (q != p) {
            p = q;
            q = load(&L[p]);
        }
        __atomic_store_n(&L[i], p, __ATOMIC_RELAXED);
    }
    j->roots[part] = roots;
}

/* Roots get -(label), labels numbered in run order from the part's base. */
static void number_part(void *arg, int part, size_t begin, size_t end)
{
    runs_job *j = arg;
    int32_t *L = run_link(j->r);
    int32_t next = (int32_t)j->roots[part]; /* the base, after the prefix sum */
    for (size_t i = begin; i < end; i++)
        if (L[i] == (int32_t)i)
            L[i] = -++next;
}

/* The other runs take their root's -(label) (roots are not written in this pass). */
static void spread_part(void *arg, int part, size_t begin, size_t end)
{
    runs_job *j = arg;
    int32_t *L = run_link(j->r);
    (void)part;
    for (size_t i = begin; i < end; i++)
        if (L[i] >= 0)
            L[i] = L[L[i]];
}

lc_rc ref_runs_label(void *impl, const uint8_t *m, int conn, gpu_runs *r, lc_err *err)
{
    ref_impl *ri = impl;
    runs_job j = {.m = m, .r = r};
    (void)err;
    switch (conn) {
    case 4:
        j.nb = nb4;
        j.nnb = 1;
        break;
    case 8:
        j.nb = nb8;
        j.nnb = 1;
        break;
    case 6:
        j.nb = nb6;
        j.nnb = 2;
        break;
    default:
        j.nb = nb26;
        j.nnb = 4;
        break;
    }
    /* z slabs found and joined independently, then the first plane of each later slab meets
     * the last plane of the one before */
    int slabs = ref_units_parts(ri->threads, r->nz, 1);
    ref_run_units(ri->threads, r->nz, 1, slab_part, &j);
    if (conn == 6 || conn == 26)
        for (int s = 1; s < slabs; s++)
            for (size_t y = 0; y < r->ny; y++)
                join_row(&j, y, j.zbegin[s], 0, 1);
    ref_run(ri->threads, r->nruns, flatten_part, &j);
    size_t total = 0;
    for (int p = 0; p < ref_parts(ri->threads, r->nruns); p++) {
        size_t c = j.roots[p];
        j.roots[p] = total;
        total += c;
    }
    ref_run(ri->threads, r->nruns, number_part, &j);
    ref_run(ri->threads, r->nruns, spread_part, &j);
    r->nlabels = total;
    return LC_OK;
}

/* --- what labelled runs give ------------------------------------------------------------- */

typedef struct use_job {
    const gpu_runs *r;
    uint64_t *counts;
    const uint8_t *table;
    uint8_t flip;
    uint8_t *out;
    int32_t *labels;
    uint64_t in_runs[REF_MAX_THREADS];
} use_job;

/* Voxels per label; consecutive runs mostly share a component, so a label's voxels are summed
 * locally and added once per change (relaxed atomic adds: parts may share a label). */
static void sizes_part(void *arg, int part, size_t begin, size_t end)
{
    use_job *j = arg;
    const ref_run_x *X = run_x(j->r);
    const int32_t *L = run_link(j->r);
    uint64_t acc = 0, all = 0;
    int32_t cur = 0;
    for (size_t i = begin; i < end; i++) {
        int32_t l = -L[i];
        uint64_t len = (uint64_t)(X[i].x1 - X[i].x0);
        if (l != cur) {
            if (acc)
                __atomic_fetch_add(&j->counts[cur], acc, __ATOMIC_RELAXED);
            cur = l;
            acc = 0;
        }
        acc += len;
        all += len;
    }
    if (acc)
        __atomic_fetch_add(&j->counts[cur], acc, __ATOMIC_RELAXED);
    j->in_runs[part] = all;
}

lc_rc ref_runs_sizes(void *impl, const gpu_runs *r, uint64_t *counts, lc_err *err)
{
    ref_impl *ri = impl;
    use_job j = {.r = r, .counts = counts};
    uint64_t all = 0;
    (void)err;
    ref_run(ri->threads, r->nruns, sizes_part, &j);
    for (int p = 0; p < ref_parts(ri->threads, r->nruns); p++)
        all += j.in_runs[p];
    counts[0] = (uint64_t)(r->nx * r->ny * r->nz) - all;
    return LC_OK;
}

lc_rc ref_runs_mark_border(void *impl, const gpu_runs *r, int planar, uint8_t *table, lc_err *err)
{
    const ref_run_x *X = run_x(r);
    const int32_t *L = run_link(r);
    (void)impl;
    (void)err;
    for (size_t z = 0; z < r->nz; z++)
        for (size_t y = 0; y < r->ny; y++) {
            size_t row = y + r->ny * z;
            int32_t b = r->row[row], e = r->row[row + 1];
            if (b == e)
                continue;
            /* whole rows on the y edges (and, in 3D, in the first and last slices) */
            if (y == 0 || y + 1 == r->ny || (!planar && (z == 0 || z + 1 == r->nz))) {
                for (int32_t i = b; i < e; i++)
                    table[-L[i]] = 1;
                continue;
            }
            /* else the runs on the x edges */
            if (X[b].x0 == 0)
                table[-L[b]] = 1;
            if ((size_t)X[e - 1].x1 == r->nx)
                table[-L[e - 1]] = 1;
        }
    return LC_OK;
}

static void fill_u8(uint8_t *p, uint8_t v, size_t n)
{
    memset(p, v, n);
}

static void fill_i32(int32_t *p, int32_t v, size_t n)
{
    const v4i vv = {v, v, v, v};
    size_t i = 0;
    for (; i + 4 <= n; i += 4)
        memcpy(p + i, &vv, sizeof(vv));
    for (; i < n; i++)
        p[i] = v;
}

static void lut_rows_part(void *arg, int part, size_t begin, size_t end)
{
    use_job *j = arg;
    const gpu_runs *r = j->r;
    const ref_run_x *X = run_x(r);
    const int32_t *L = run_link(r);
    uint8_t gap = j->table[0] ^ j->flip;
    (void)part;
    for (size_t row = begin; row < end; row++) {
        uint8_t *out = j->out + row * r->nx;
        size_t x = 0;
        for (int32_t i = r->row[row]; i < r->row[row + 1]; i++) {
            fill_u8(out + x, gap, (size_t)X[i].x0 - x);
            fill_u8(out + X[i].x0, j->table[-L[i]] ^ j->flip, (size_t)(X[i].x1 - X[i].x0));
            x = (size_t)X[i].x1;
        }
        fill_u8(out + x, gap, r->nx - x);
    }
}

lc_rc ref_runs_lut(void *impl, const gpu_runs *r, const uint8_t *table, uint8_t flip, uint8_t *out,
                   lc_err *err)
{
    ref_impl *ri = impl;
    use_job j = {.r = r, .table = table, .flip = flip, .out = out};
    (void)err;
    ref_run_units(ri->threads, r->ny * r->nz, REF_MIN_PART / r->nx + 1, lut_rows_part, &j);
    return LC_OK;
}

static void write_rows_part(void *arg, int part, size_t begin, size_t end)
{
    use_job *j = arg;
    const gpu_runs *r = j->r;
    const ref_run_x *X = run_x(r);
    const int32_t *L = run_link(r);
    (void)part;
    for (size_t row = begin; row < end; row++) {
        int32_t *out = j->labels + row * r->nx;
        size_t x = 0;
        for (int32_t i = r->row[row]; i < r->row[row + 1]; i++) {
            fill_i32(out + x, 0, (size_t)X[i].x0 - x);
            fill_i32(out + X[i].x0, -L[i], (size_t)(X[i].x1 - X[i].x0));
            x = (size_t)X[i].x1;
        }
        fill_i32(out + x, 0, r->nx - x);
    }
}

lc_rc ref_runs_write(void *impl, const gpu_runs *r, int32_t *labels, lc_err *err)
{
    ref_impl *ri = impl;
    use_job j = {.r = r, .labels = labels};
    (void)err;
    ref_run_units(ri->threads, r->ny * r->nz, REF_MIN_PART / r->nx + 1, write_rows_part, &j);
    return LC_OK;
}

/* --- per-label kernels -------------------------------------------------------------------- */

typedef struct size_job {
    const int32_t *L;
    size_t nlabels;
    uint64_t *counts;
} size_job;

/* 16 labels from L all equal to l: the common case in label volumes, whose components are
 * spatially coherent, handled without looking at voxels one by one. */
static int same16(const int32_t *L, int32_t l)
{
    const v4i lv = {l, l, l, l};
    v4i a, b, c, d;
    memcpy(&a, L, sizeof(a));
    memcpy(&b, L + 4, sizeof(b));
    memcpy(&c, L + 8, sizeof(c));
    memcpy(&d, L + 12, sizeof(d));
    v4i e = (a == lv) & (b == lv) & (c == lv) & (d == lv);
    v2u64 q = (v2u64)e;
    return (q[0] & q[1]) == ~0ull;
}

/* Runs of equal labels are counted locally and added once: components are spatially
 * coherent, so the shared counters see few (atomic) additions. */
static void size_part(void *arg, int part, size_t begin, size_t end)
{
    size_job *j = arg;
    size_t bad = j->nlabels + 1;
    size_t cur = bad;
    int32_t cur_l = -1; /* a label that maps to cur (-1: to bad) */
    uint64_t run = 0;
    (void)part;
    for (size_t i = begin; i < end;) {
        if (end - i >= 16 && same16(j->L + i, cur_l)) {
            run += 16;
            i += 16;
            continue;
        }
        int32_t l = j->L[i++];
        size_t slot = l >= 0 && (size_t)l <= j->nlabels ? (size_t)l : bad;
        if (slot != cur) {
            if (run)
                __atomic_fetch_add(&j->counts[cur], run, __ATOMIC_RELAXED);
            cur = slot;
            run = 0;
        }
        cur_l = l;
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
    for (size_t i = begin; i < end;) {
        int32_t l = j->L[i];
        uint8_t v = l >= 0 && (size_t)l < j->ntable ? (uint8_t)(j->table[l] ^ j->flip) : 0;
        if (end - i >= 16 && same16(j->L + i, l)) {
            memset(j->out + i, v, 16);
            i += 16;
        } else {
            j->out[i++] = v;
        }
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
