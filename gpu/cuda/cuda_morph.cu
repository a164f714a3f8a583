/*
 * cuda_morph.cu: one erosion or dilation pass on CUDA (gpu_morph_pass in gpu_internal.h), in
 * two kernels with shared-memory tiles: per-row distances to the nearest target voxel (a row
 * segment plus its halo in shared memory), then the structuring element's rows combined per
 * output tile (the distance rows a 32x8 tile needs, one z plane at a time, in shared memory).
 * Thread safety: a context is used by one host thread at a time (gpu_seg.h).
 */
#include "cuda_internal.h"

#define DIST_TILE 256 /* x voxels per block of the distance kernel (= CU_THREADS) */
#define TX        32  /* combine tile: x voxels */
#define TY        8   /* combine tile: y rows */
#define OUTSIDE   255 /* distance of a row outside the volume: never the target */

static_assert(DIST_TILE == CU_THREADS, "one thread per voxel of a distance tile");
static_assert(GPU_MORPH_MAX_REACH + 1 < OUTSIDE, "distances fit a byte below OUTSIDE");

/* Block b covers x in [tile * 256, +256) of row (b / tiles); grid-stride over blocks. */
__global__ static void k_morph_dist(const uint8_t *__restrict__ in, uint8_t *__restrict__ dist,
                                    size_t nx, size_t rows, unsigned tiles, int cap, int target)
{
    extern __shared__ uint8_t seg[]; /* DIST_TILE + 2 * cap flags: 1 = target voxel */
    size_t nblocks = rows * tiles;
    for (size_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
        size_t row = b / tiles, x0 = (b % tiles) * DIST_TILE;
        const uint8_t *r = in + row * nx;
        __syncthreads(); /* the previous iteration is done with seg */
        for (int k = threadIdx.x; k < DIST_TILE + 2 * cap; k += blockDim.x) {
            long x = (long)x0 - cap + k;
            seg[k] = x >= 0 && (size_t)x < nx && (r[x] != 0) == target;
        }
        __syncthreads();
        size_t x = x0 + threadIdx.x;
        if (x < nx) {
            int c = cap + threadIdx.x, d = cap;
            for (int k = 0; k < cap; k++)
                if (seg[c - k] || seg[c + k]) {
                    d = k;
                    break;
                }
            dist[row * nx + x] = (uint8_t)d;
        }
    }
}

/* Block (tile, z): output voxels [x0, x0+TX) x [y0, y0+TY) of plane z (grid-stride in z).
 * Shared memory: the element's half-widths, then the distance rows y0-ry .. y0+TY+ry of one
 * plane z+dz at a time (rows outside the volume read as OUTSIDE). */
__global__ static void k_morph_comb(const uint8_t *__restrict__ dist, uint8_t *__restrict__ out,
                                    const int8_t *__restrict__ se, size_t nx, size_t ny, size_t nz,
                                    unsigned tiles_x, int ry, int rz, int erode)
{
    extern __shared__ uint8_t sh[];
    int wy = 2 * ry + 1, nw = wy * (2 * rz + 1), trows = TY + 2 * ry;
    int8_t *w = reinterpret_cast<int8_t *>(sh);
    uint8_t *tile = sh + ((nw + 15) & ~15);
    int tid = threadIdx.y * TX + threadIdx.x, nthreads = TX * TY;

    for (int k = tid; k < nw; k += nthreads)
        w[k] = se[k];
    size_t x0 = (size_t)(blockIdx.x % tiles_x) * TX, y0 = (size_t)(blockIdx.x / tiles_x) * TY;
    size_t x = x0 + threadIdx.x, y = y0 + threadIdx.y;
    for (size_t z = blockIdx.y; z < nz; z += gridDim.y) {
        int acc = erode;
        for (int dz = -rz; dz <= rz; dz++) {
            long zz = (long)z + dz;
            if (zz < 0 || (size_t)zz >= nz)
                continue;    /* uniform across the block: no thread skips a barrier alone */
            __syncthreads(); /* w is loaded; the previous plane's tile is no longer read */
            for (int k = tid; k < trows * TX; k += nthreads) {
                long yy = (long)y0 - ry + k / TX;
                size_t xx = x0 + k % TX;
                tile[k] = yy >= 0 && (size_t)yy < ny && xx < nx
                              ? dist[((size_t)zz * ny + (size_t)yy) * nx + xx]
                              : (uint8_t)OUTSIDE;
            }
            __syncthreads();
            const int8_t *wrow = w + (dz + rz) * wy;
            for (int dy = -ry; dy <= ry; dy++) {
                int hw = wrow[dy + ry];
                if (hw < 0)
                    continue;
                int d = tile[(threadIdx.y + ry + dy) * TX + threadIdx.x];
                if (erode)
                    acc &= d > hw;
                else
                    acc |= d <= hw && d != OUTSIDE;
            }
        }
        if (x < nx && y < ny)
            out[(z * ny + y) * nx + x] = (uint8_t)acc;
    }
}

lc_rc gpu_cu_morph(void *impl, const gpu_morph_pass *p, lc_err *err)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    int wy = 2 * p->ry + 1, nw = wy * (2 * p->rz + 1), cap = p->rx + 1;
    size_t rows = p->ny * p->nz;
    unsigned tiles = (unsigned)((p->nx + DIST_TILE - 1) / DIST_TILE);
    cudaError_t e;
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    /* the element: a small copy, ordered on the stream before the kernels that read it (and
     * after any earlier kernel still reading the previous one) */
    e = cudaMemcpyAsync(c->d_se, p->w, (size_t)nw, cudaMemcpyHostToDevice, c->stream);
    if (e != cudaSuccess)
        return gpu_cu_fail(err, e, "copy a structuring element to the device");

    size_t nblocks = rows * tiles;
    unsigned grid = nblocks < (size_t)c->sm_count * 32 ? (unsigned)nblocks : c->sm_count * 32;
    k_morph_dist<<<grid, DIST_TILE, DIST_TILE + 2 * cap, c->stream>>>(p->in, p->dist, p->nx, rows,
                                                                      tiles, cap, p->target);
    if ((rc = gpu_cu_launched(err, "launch the morphology distance kernel")) != LC_OK)
        return rc;

    unsigned tiles_x = (unsigned)((p->nx + TX - 1) / TX);
    size_t tiles_xy = (size_t)tiles_x * ((p->ny + TY - 1) / TY);
    if (tiles_xy > 0x7fffffffu)
        return lc_err_set(err, LC_ERR_TOO_LARGE, "volume slices of %zux%zu are too large", p->nx,
                          p->ny);
    dim3 cgrid((unsigned)tiles_xy, (unsigned)(p->nz < 65535 ? p->nz : 65535));
    size_t shmem = (size_t)((nw + 15) & ~15) + (size_t)(TY + 2 * p->ry) * TX;
    k_morph_comb<<<cgrid, dim3(TX, TY), shmem, c->stream>>>(
        p->dist, p->out, c->d_se, p->nx, p->ny, p->nz, tiles_x, p->ry, p->rz, p->target == 0);
    return gpu_cu_launched(err, "launch the morphology kernel");
}
