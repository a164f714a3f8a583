/*
 * cuda_kernels.cu: the CUDA backend of gpu_seg.h, part 2: min/max (block reduction, the last
 * step on the host over at most CU_MAX_BLOCKS partials), histogram (per-block histograms in
 * shared memory merged into global counters with atomicAdd) and the elementwise threshold.
 * Only small results (partials, the histogram) cross to the host; volumes stay on the device.
 * Thread safety: a context is used by one host thread at a time (gpu_seg.h).
 */
#include <math.h>
#include "cuda_internal.h"

static_assert(sizeof(unsigned long long) == sizeof(uint64_t), "histogram counters are 64-bit");

/* Histograms up to this many bins are built in shared memory (32 KiB of 32-bit counters, under
 * the 48 KiB every block may use without opting in); larger ones count straight into global
 * memory. */
#define CU_SHARED_BINS 8192

__device__ static inline size_t first_index()
{
    return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ static inline size_t grid_stride()
{
    return (size_t)gridDim.x * blockDim.x;
}

/* fminf/fmaxf return the other operand when one is NaN, so NaN never wins. */
__device__ static inline void warp_minmax(float &lo, float &hi)
{
    for (int off = 16; off > 0; off >>= 1) {
        lo = fminf(lo, __shfl_down_sync(0xffffffffu, lo, off));
        hi = fmaxf(hi, __shfl_down_sync(0xffffffffu, hi, off));
    }
}

/* part[b] = min and part[gridDim.x + b] = max of block b's share. blockDim.x is a multiple
 * of 32 (CU_THREADS). */
__global__ static void k_minmax(const float *__restrict__ x, size_t n, float *__restrict__ part)
{
    __shared__ float slo[32], shi[32];
    float lo = INFINITY, hi = -INFINITY;
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        float v = x[i];
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    warp_minmax(lo, hi);
    unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) {
        slo[warp] = lo;
        shi[warp] = hi;
    }
    __syncthreads();
    if (warp == 0) {
        unsigned nwarps = blockDim.x >> 5;
        lo = lane < nwarps ? slo[lane] : INFINITY;
        hi = lane < nwarps ? shi[lane] : -INFINITY;
        warp_minmax(lo, hi);
        if (lane == 0) {
            part[blockIdx.x] = lo;
            part[gridDim.x + blockIdx.x] = hi;
        }
    }
}

lc_rc gpu_cu_minmax(void *impl, const float *x, size_t n, float *lo, float *hi, lc_err *err)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    float part[2 * CU_MAX_BLOCKS];
    unsigned grid = gpu_cu_grid(c, n);
    cudaError_t e;
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    k_minmax<<<grid, CU_THREADS, 0, c->stream>>>(x, n, c->d_part);
    if ((e = cudaGetLastError()) != cudaSuccess)
        return gpu_cu_fail(err, e, "launch the min/max kernel");
    e = cudaMemcpyAsync(part, c->d_part, 2 * grid * sizeof(float), cudaMemcpyDeviceToHost,
                        c->stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess)
        return gpu_cu_fail(err, e, "compute min/max on the device");
    float l = INFINITY, h = -INFINITY;
    for (unsigned b = 0; b < grid; b++) {
        l = fminf(l, part[b]);
        h = fmaxf(h, part[grid + b]);
    }
    *lo = l;
    *hi = h;
    return LC_OK;
}

/* Per-block histogram in shared memory, merged with one atomicAdd per non-empty bin. A block
 * counts fewer than 2^32 voxels (gpu_cu_histogram sizes the grid), so 32-bit counters hold. */
__global__ static void k_hist_shared(const float *__restrict__ x, size_t n, int nbins, float lo,
                                     float scale, unsigned long long *__restrict__ hist)
{
    extern __shared__ unsigned int sh[];
    for (int b = threadIdx.x; b < nbins; b += blockDim.x)
        sh[b] = 0;
    __syncthreads();
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        float v = x[i];
        if (!isnan(v))
            atomicAdd(&sh[gpu_bin_of(v, lo, scale, nbins)], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < nbins; b += blockDim.x) {
        unsigned int cnt = sh[b];
        if (cnt)
            atomicAdd(&hist[b], (unsigned long long)cnt);
    }
}

__global__ static void k_hist_global(const float *__restrict__ x, size_t n, int nbins, float lo,
                                     float scale, unsigned long long *__restrict__ hist)
{
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        float v = x[i];
        if (!isnan(v))
            atomicAdd(&hist[gpu_bin_of(v, lo, scale, nbins)], 1ull);
    }
}

lc_rc gpu_cu_histogram(void *impl, const float *x, size_t n, int nbins, float lo, float scale,
                       uint64_t *hist, lc_err *err)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    size_t hbytes = (size_t)nbins * sizeof(unsigned long long);
    unsigned grid = gpu_cu_grid(c, n);
    size_t per_block_max = (size_t)1 << 31;
    cudaError_t e;
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    /* Keep each block's share under 2^31 voxels for the 32-bit shared counters. */
    if ((n + per_block_max - 1) / per_block_max > grid)
        grid = (unsigned)((n + per_block_max - 1) / per_block_max);
    if ((e = cudaMemsetAsync(c->d_hist, 0, hbytes, c->stream)) != cudaSuccess)
        return gpu_cu_fail(err, e, "clear the device histogram");
    if (nbins <= CU_SHARED_BINS)
        k_hist_shared<<<grid, CU_THREADS, (size_t)nbins * sizeof(unsigned int), c->stream>>>(
            x, n, nbins, lo, scale, c->d_hist);
    else
        k_hist_global<<<grid, CU_THREADS, 0, c->stream>>>(x, n, nbins, lo, scale, c->d_hist);
    if ((e = cudaGetLastError()) != cudaSuccess)
        return gpu_cu_fail(err, e, "launch the histogram kernel");
    e = cudaMemcpyAsync(hist, c->d_hist, hbytes, cudaMemcpyDeviceToHost, c->stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess)
        return gpu_cu_fail(err, e, "compute a histogram on the device");
    return LC_OK;
}

__global__ static void k_threshold(const float *__restrict__ x, size_t n, float lo, float hi,
                                   uint8_t *__restrict__ out)
{
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        float v = x[i];
        out[i] = v >= lo && v <= hi; /* NaN: false */
    }
}

lc_rc gpu_cu_threshold(void *impl, const float *x, size_t n, float lo, float hi, uint8_t *out,
                       lc_err *err)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    cudaError_t e;
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    k_threshold<<<gpu_cu_grid(c, n), CU_THREADS, 0, c->stream>>>(x, n, lo, hi, out);
    if ((e = cudaGetLastError()) != cudaSuccess)
        return gpu_cu_fail(err, e, "launch the threshold kernel");
    return LC_OK;
}

__global__ static void k_window(const float *__restrict__ x, size_t n, float a, float b, float inv,
                                float *out)
{
    for (size_t i = first_index(); i < n; i += grid_stride()) {
        float v = x[i];
        if (isnan(v)) {
            out[i] = v;
            continue;
        }
        float cl = v < a ? a : v > b ? b : v;
        float r = __fmul_rn(__fsub_rn(cl, a), inv);
        out[i] = r > 1.0f ? 1.0f : r;
    }
}

lc_rc gpu_cu_window(void *impl, const float *x, size_t n, float a, float b, float inv, float *out,
                    lc_err *err)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    /* out may be x: each element is read before it is written, by the same thread */
    k_window<<<gpu_cu_grid(c, n), CU_THREADS, 0, c->stream>>>(x, n, a, b, inv, out);
    return gpu_cu_launched(err, "launch the window kernel");
}

/* Counts non-zero bytes four at a time (cudaMalloc'd volumes are 256-byte aligned); one
 * atomicAdd per block. */
__global__ static void k_count(const uint8_t *__restrict__ m, size_t n,
                               unsigned long long *__restrict__ total)
{
    __shared__ unsigned long long warp_sum[CU_THREADS / 32];
    const uint32_t *w = reinterpret_cast<const uint32_t *>(m);
    size_t nw = n / 4;
    unsigned long long cnt = 0;
    for (size_t i = first_index(); i < nw; i += grid_stride())
        cnt += __popc(__vcmpne4(w[i], 0u)) / 8;
    for (size_t i = nw * 4 + first_index(); i < n; i += grid_stride())
        cnt += m[i] != 0;
    for (int off = 16; off > 0; off >>= 1)
        cnt += __shfl_down_sync(0xffffffffu, cnt, off);
    if ((threadIdx.x & 31u) == 0)
        warp_sum[threadIdx.x >> 5] = cnt;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long s = 0;
        for (unsigned k = 0; k < blockDim.x / 32; k++)
            s += warp_sum[k];
        atomicAdd(total, s);
    }
}

lc_rc gpu_cu_count(void *impl, const uint8_t *m, size_t n, uint64_t *count, lc_err *err)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    unsigned long long total = 0;
    cudaError_t e;
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    if ((e = cudaMemsetAsync(c->d_scalar, 0, sizeof(total), c->stream)) != cudaSuccess)
        return gpu_cu_fail(err, e, "clear a device counter");
    k_count<<<gpu_cu_grid(c, n / 4 + 1), CU_THREADS, 0, c->stream>>>(m, n, c->d_scalar);
    if ((rc = gpu_cu_launched(err, "launch the count kernel")) != LC_OK ||
        (rc = gpu_cu_fetch(c, &total, c->d_scalar, sizeof(total), "count mask voxels", err)) !=
            LC_OK)
        return rc;
    *count = total;
    return LC_OK;
}
