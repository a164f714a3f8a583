/*
 * cuda_resample.cu: resampling on CUDA, one thread per output voxel: sample positions from the
 * shared gpu_rs_linear / gpu_rs_nearest (gpu_internal.h) and trilinear blends in the CPU
 * reference's order with rounded intrinsics (no FMA contraction), so both backends agree.
 * Thread safety: a context is used by one host thread at a time (gpu_seg.h).
 */
#include "cuda_internal.h"

typedef struct rs_dims {
    size_t nx, ny, nz, ox, oy, oz;
    float rx, ry, rz;
} rs_dims;

__global__ static void k_rs_linear(const float *__restrict__ in, float *__restrict__ out, rs_dims d)
{
    size_t n = d.ox * d.oy * d.oz;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t x = i % d.ox, y = (i / d.ox) % d.oy, z = i / (d.ox * d.oy);
        size_t x0, x1, y0, y1, z0, z1;
        float tx, ty, tz;
        gpu_rs_linear(x, d.rx, d.nx, &x0, &x1, &tx);
        gpu_rs_linear(y, d.ry, d.ny, &y0, &y1, &ty);
        gpu_rs_linear(z, d.rz, d.nz, &z0, &z1, &tz);
        const float *r00 = in + (z0 * d.ny + y0) * d.nx, *r01 = in + (z0 * d.ny + y1) * d.nx;
        const float *r10 = in + (z1 * d.ny + y0) * d.nx, *r11 = in + (z1 * d.ny + y1) * d.nx;
        float c00 = gpu_lerp(__ldg(&r00[x0]), __ldg(&r00[x1]), tx);
        float c01 = gpu_lerp(__ldg(&r01[x0]), __ldg(&r01[x1]), tx);
        float c10 = gpu_lerp(__ldg(&r10[x0]), __ldg(&r10[x1]), tx);
        float c11 = gpu_lerp(__ldg(&r11[x0]), __ldg(&r11[x1]), tx);
        out[i] = gpu_lerp(gpu_lerp(c00, c01, ty), gpu_lerp(c10, c11, ty), tz);
    }
}

template <typename T>
__global__ static void k_rs_nearest(const T *__restrict__ in, T *__restrict__ out, rs_dims d)
{
    size_t n = d.ox * d.oy * d.oz;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t x = i % d.ox, y = (i / d.ox) % d.oy, z = i / (d.ox * d.oy);
        size_t sx = gpu_rs_nearest(x, d.rx, d.nx), sy = gpu_rs_nearest(y, d.ry, d.ny);
        size_t sz = gpu_rs_nearest(z, d.rz, d.nz);
        out[i] = in[(sz * d.ny + sy) * d.nx + sx];
    }
}

lc_rc gpu_cu_resample(void *impl, const gpu_resample_job *j, lc_err *err)
{
    gpu_cu_impl *c = static_cast<gpu_cu_impl *>(impl);
    rs_dims d = {j->in_dims[0],  j->in_dims[1], j->in_dims[2], j->out_dims[0], j->out_dims[1],
                 j->out_dims[2], j->ratio[0],   j->ratio[1],   j->ratio[2]};
    size_t n = d.ox * d.oy * d.oz;
    unsigned grid = gpu_cu_grid(c, n);
    lc_rc rc = gpu_cu_enter(c, err);
    if (rc != LC_OK)
        return rc;
    if (j->interp == GPU_INTERP_LINEAR)
        k_rs_linear<<<grid, CU_THREADS, 0, c->stream>>>(static_cast<const float *>(j->in),
                                                        static_cast<float *>(j->out), d);
    else if (j->dtype == GPU_U8)
        k_rs_nearest<uint8_t><<<grid, CU_THREADS, 0, c->stream>>>(
            static_cast<const uint8_t *>(j->in), static_cast<uint8_t *>(j->out), d);
    else /* f32 and i32: four bytes copied as they are */
        k_rs_nearest<uint32_t><<<grid, CU_THREADS, 0, c->stream>>>(
            static_cast<const uint32_t *>(j->in), static_cast<uint32_t *>(j->out), d);
    return gpu_cu_launched(err, "launch the resampling kernel");
}
