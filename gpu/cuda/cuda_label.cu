/*
 * cuda_label.cu: CUDA connected components, Playne & Hawick's union-find (IEEE TPDS 2018):
 * unions link the larger root under the smaller with atomicMin (a root is the smallest index of
 * its component), trees are flattened, roots numbered in index order (ballot counts per chunk,
 * one scan), so labels equal the CPU's; plus label sizes, tables and border marks.
 * Thread safety: a context is used by one host thread at a time (gpu_seg.h).
 */
#include "cuda_internal.h"

#define CHUNK        4096 /* voxels numbered per block: 8 warps x 16 rounds of 32 */
#define CHUNK_WARP   (CHUNK / (CU_THREADS / 32))
#define SCAN_THREADS 1024

static_assert(CU_THREADS == 256, "CHUNK assumes 8 warps per block");

typedef struct nbrs {
    int n;
    int dx[13], dy[13], dz[13];
} nbrs;

/* The backward half of each neighbourhood (earlier in raster order), as on the CPU. */
static nbrs nbrs_of(int conn)
{
    static const int d26[13][3] = {
        {-1, 0, 0},  {0, -1, 0}, {-1, -1, 0}, {1, -1, 0},  {-1, -1, -1}, {0, -1, -1}, {1, -1, -1},
        {-1, 0, -1}, {0, 0, -1}, {1, 0, -1},  {-1, 1, -1}, {0, 1, -1},   {1, 1, -1},
    };
    static const int d6[3][3] = {{-1, 0, 0}, {0, -1, 0}, {0, 0, -1}};
    nbrs b;
    const int(*d)[3] = conn == 4 || conn == 6 ? d6 : d26;
    b.n = conn == 4 ? 2 : conn == 6 ? 3 : conn == 8 ? 4 : 13;
    for (int k = 0; k < b.n; k++) {
        b.dx[k] = d[k][0];
        b.dy[k] = d[k][1];
        b.dz[k] = d[k][2];
    }
    return b;
}

__device__ static inline bool is_fg(const uint8_t *m, size_t i, uint8_t fgval)
{
    return (m[i] != 0) == (fgval != 0);
}

__global__ static void k_cc_init(const uint8_t *__restrict__ m, uint8_t fgval, size_t n,
                                 int32_t *__restrict__ L)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        L[i] = is_fg(m, i, fgval) ? (int32_t)i : -1;
}

/* Root of i. Links are read past L1 (__ldcg): other blocks change them with atomics. */
__device__ static inline int32_t find_root(const int32_t *L, int32_t i)
{
    int32_t p = __ldcg(&L[i]);
    while (p != i) {
        i = p;
        p = __ldcg(&L[i]);
    }
    return i;
}

__device__ static void unite(int32_t *L, int32_t a, int32_t b)
{
    bool done;
    do {
        a = find_root(L, a);
        b = find_root(L, b);
        if (a < b) {
            int32_t old = atomicMin(&L[b], a);
            done = old == b; /* b was still a root: now linked under a */
            b = old;
        } else if (b < a) {
            int32_t old = atomicMin(&L[a], b);
            done = old == a;
            a = old;
        } else {
            done = true;
        }
    } while (!done);
}

__global__ static void k_cc_union(const uint8_t *__restrict__ m, uint8_t fgval, size_t nx,
                                  size_t ny, size_t nz, nbrs nb, int32_t *L)
{
    size_t n = nx * ny * nz, plane = nx * ny;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        if (!is_fg(m, i, fgval))
            continue;
        size_t x = i % nx, y = (i / nx) % ny, z = i / plane;
        for (int k = 0; k < nb.n; k++) {
            int dx = nb.dx[k], dy = nb.dy[k], dz = nb.dz[k];
            if ((dx < 0 && x == 0) || (dx > 0 && x + 1 == nx) || (dy < 0 && y == 0) ||
                (dy > 0 && y + 1 == ny) || (dz < 0 && z == 0))
                continue;
            size_t j = i + (size_t)((long long)dx + (long long)nx * (dy + (long long)ny * dz));
            if (is_fg(m, j, fgval))
                unite(L, (int32_t)i, (int32_t)j);
        }
    }
}

__global__ static void k_cc_flatten(size_t n, int32_t *L)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int32_t p = L[i];
        if (p >= 0 && (size_t)p != i)
            L[i] = find_root(L, p);
    }
}

/* Roots of chunk b (voxels [b * CHUNK, +CHUNK)) into counts[b]. One block per chunk. */
__global__ static void k_cc_count(const int32_t *__restrict__ L, size_t n, int32_t *counts)
{
    __shared__ int warp_cnt[CU_THREADS / 32];
    unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    size_t base = (size_t)blockIdx.x * CHUNK + (size_t)warp * CHUNK_WARP;
    int cnt = 0;
    for (int r = 0; r < CHUNK_WARP; r += 32) {
        size_t i = base + r + lane;
        bool root = i < n && L[i] == (int32_t)i;
        cnt += __popc(__ballot_sync(0xffffffffu, root));
    }
    if (lane == 0)
        warp_cnt[warp] = cnt;
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0;
        for (int w = 0; w < CU_THREADS / 32; w++)
            s += warp_cnt[w];
        counts[blockIdx.x] = s;
    }
}

/* Exclusive scan of counts[0..nchunks) in place by one block; the total into *total. */
__global__ static void k_cc_scan(int32_t *counts, size_t nchunks, unsigned long long *total)
{
    __shared__ long long part[SCAN_THREADS];
    size_t per = (nchunks + SCAN_THREADS - 1) / SCAN_THREADS;
    size_t b = threadIdx.x * per, e = b + per < nchunks ? b + per : nchunks;
    long long s = 0;
    for (size_t k = b; k < e; k++)
        s += counts[k];
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) { /* 1024 partial sums: a serial scan is cheap */
        long long run = 0;
        for (int t = 0; t < SCAN_THREADS; t++) {
            long long v = part[t];
            part[t] = run;
            run += v;
        }
        *total = (unsigned long long)run;
    }
    __syncthreads();
    long long run = part[threadIdx.x];
    for (size_t k = b; k < e; k++) {
        long long v = counts[k];
        counts[k] = (int32_t)run;
        run += v;
    }
}

/* Roots of chunk b get -(label) - 1, labels in index order from base[b] + 1. */
__global__ static void k_cc_number(int32_t *L, size_t n, const int32_t *base)
{
    __shared__ int warp_cnt[CU_THREADS / 32];
    unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    size_t first = (size_t)blockIdx.x * CHUNK + (size_t)warp * CHUNK_WARP;
    int cnt = 0;
    for (int r = 0; r < CHUNK_WARP; r += 32) {
        size_t i = first + r + lane;
        cnt += __popc(__ballot_sync(0xffffffffu, i < n && L[i] == (int32_t)i));
    }
    if (lane == 0)
        warp_cnt[warp] = cnt;
    __syncthreads();
    int next = base[blockIdx.x];
    for (unsigned w = 0; w < warp; w++)
        next += warp_cnt[w];
    unsigned below = (1u << lane) - 1u;
    for (int r = 0; r < CHUNK_WARP; r += 32) {
        size_t i = first + r + lane;
        bool root = i < n && L[i] == (int32_t)i;
        unsigned ballot = __ballot_sync(0xffffffffu, root);
        if (root)
            L[i] = -(next + __popc(ballot & below) + 1) - 1;
        next += __popc(ballot);
    }
}

/* Non-roots take their root's label; roots are not written here. */
__global__ static void k_cc_spread(int32_t *L, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int32_t p = L[i];
        if (p >= 0)
            L[i] = -L[p] - 1;
    }
}

__global__ static void k_cc_finish(int32_t *L, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int32_t p = L[i];
        if (p < 0)
            L[i] = p == -1 ? 0 : -p - 1;
    }
}

size_t gpu_cu_label_scratch(void *impl, size_t n)
{
    (void)impl;
    return ((n + CHUNK - 1) / CHUNK) * sizeof(int32_t);
}

lc_rc gpu_cu_label(void *impl, const uint8_t *m, int invert, const size_t dims[3], int conn,
                   int32_t *labels, void *scratch, size_t *nlabels, lc_err *err)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    size_t n = dims[0] * dims[1] * dims[2], nchunks = (n + CHUNK - 1) / CHUNK;
    int32_t *counts = static_cast<int32_t *>(scratch);
    uint8_t fgval = invert ? 0 : 1;
    unsigned grid = gpu_cu_grid(c, n);
    unsigned long long total = 0;
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    if (nchunks > 0x7fffffffu)
        return lc_err_set(err, LC_ERR_TOO_LARGE, "volume of %zu voxels is too large to label", n);

    k_cc_init<<<grid, CU_THREADS, 0, c->stream>>>(m, fgval, n, labels);
    if ((rc = gpu_cu_launched(err, "launch the labelling init kernel")) != LC_OK)
        return rc;
    k_cc_union<<<grid, CU_THREADS, 0, c->stream>>>(m, fgval, dims[0], dims[1], dims[2],
                                                   nbrs_of(conn), labels);
    if ((rc = gpu_cu_launched(err, "launch the labelling union kernel")) != LC_OK)
        return rc;
    k_cc_flatten<<<grid, CU_THREADS, 0, c->stream>>>(n, labels);
    if ((rc = gpu_cu_launched(err, "launch the labelling flatten kernel")) != LC_OK)
        return rc;
    k_cc_count<<<(unsigned)nchunks, CU_THREADS, 0, c->stream>>>(labels, n, counts);
    if ((rc = gpu_cu_launched(err, "launch the labelling count kernel")) != LC_OK)
        return rc;
    k_cc_scan<<<1, SCAN_THREADS, 0, c->stream>>>(counts, nchunks, c->d_scalar);
    if ((rc = gpu_cu_launched(err, "launch the labelling scan kernel")) != LC_OK)
        return rc;
    k_cc_number<<<(unsigned)nchunks, CU_THREADS, 0, c->stream>>>(labels, n, counts);
    if ((rc = gpu_cu_launched(err, "launch the labelling numbering kernel")) != LC_OK)
        return rc;
    k_cc_spread<<<grid, CU_THREADS, 0, c->stream>>>(labels, n);
    if ((rc = gpu_cu_launched(err, "launch the labelling spread kernel")) != LC_OK)
        return rc;
    k_cc_finish<<<grid, CU_THREADS, 0, c->stream>>>(labels, n);
    if ((rc = gpu_cu_launched(err, "launch the labelling finish kernel")) != LC_OK ||
        (rc = gpu_cu_fetch(c, &total, c->d_scalar, sizeof(total), "label components", err)) !=
            LC_OK)
        return rc;
    *nlabels = (size_t)total;
    return LC_OK;
}

/* --- per-label kernels -------------------------------------------------------------------- */

/* Lanes holding the same label add once (warp-aggregated atomics, sm_70+ __match_any_sync):
 * components are spatially coherent, so most warps make one or two additions. */
__global__ static void k_sizes(const int32_t *__restrict__ L, size_t n, size_t nlabels,
                               unsigned long long *counts)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int32_t l = L[i];
        unsigned long long slot = l >= 0 && (size_t)l <= nlabels ? (unsigned long long)l
                                                                 : (unsigned long long)nlabels + 1;
        unsigned active = __activemask();
        unsigned peers = __match_any_sync(active, slot);
        unsigned lane = threadIdx.x & 31u;
        if ((unsigned)(__ffs(peers) - 1) == lane)
            atomicAdd(&counts[slot], (unsigned long long)__popc(peers));
    }
}

lc_rc gpu_cu_label_sizes(void *impl, const int32_t *labels, size_t n, size_t nlabels,
                         uint64_t *counts, lc_err *err)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    k_sizes<<<gpu_cu_grid(c, n), CU_THREADS, 0, c->stream>>>(
        labels, n, nlabels, reinterpret_cast<unsigned long long *>(counts));
    return gpu_cu_launched(err, "launch the label size kernel");
}

__global__ static void k_lut(const int32_t *__restrict__ L, size_t n,
                             const uint8_t *__restrict__ table, size_t ntable, uint8_t flip,
                             uint8_t *__restrict__ out)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int32_t l = L[i];
        out[i] = l >= 0 && (size_t)l < ntable ? (uint8_t)(table[l] ^ flip) : (uint8_t)0;
    }
}

lc_rc gpu_cu_lut(void *impl, const int32_t *labels, size_t n, const uint8_t *table, size_t ntable,
                 uint8_t flip, uint8_t *out, lc_err *err)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    k_lut<<<gpu_cu_grid(c, n), CU_THREADS, 0, c->stream>>>(labels, n, table, ntable, flip, out);
    return gpu_cu_launched(err, "launch the label table kernel");
}

/* Item k < nz * (2 nx + 2 ny): the slice edges; then (3D only) the first and last slices. */
__global__ static void k_border(const int32_t *__restrict__ L, size_t nx, size_t ny, size_t nz,
                                size_t items, uint8_t *table, size_t ntable)
{
    size_t per = 2 * nx + 2 * ny, plane = nx * ny, edges = nz * per;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < items;
         k += (size_t)gridDim.x * blockDim.x) {
        size_t i;
        if (k < edges) {
            size_t z = k / per, e = k % per;
            if (e < nx)
                i = z * plane + e;
            else if (e < 2 * nx)
                i = z * plane + (ny - 1) * nx + (e - nx);
            else if (e < 2 * nx + ny)
                i = z * plane + (e - 2 * nx) * nx;
            else
                i = z * plane + (e - 2 * nx - ny) * nx + nx - 1;
        } else {
            size_t f = k - edges;
            i = f < plane ? f : (nz - 1) * plane + (f - plane);
        }
        int32_t l = L[i];
        if (l > 0 && (size_t)l < ntable)
            table[l] = 1; /* every writer stores the same value */
    }
}

lc_rc gpu_cu_mark_border(void *impl, const int32_t *labels, const size_t dims[3], int planar,
                         uint8_t *table, size_t ntable, lc_err *err)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    size_t nx = dims[0], ny = dims[1], nz = dims[2];
    size_t items = nz * (2 * nx + 2 * ny) + (planar ? 0 : 2 * nx * ny);
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    k_border<<<gpu_cu_grid(c, items), CU_THREADS, 0, c->stream>>>(labels, nx, ny, nz, items, table,
                                                                  ntable);
    return gpu_cu_launched(err, "launch the border kernel");
}
