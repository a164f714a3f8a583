/*
 * bench_gpu_kernels.c [cpu|cuda|auto] [threads]: the time of every gpu_seg.h kernel on one
 * synthetic CT-like 512x512x300 volume (air, an elliptic body with lungs and bone, noise; 0.7
 * x 0.7 x 2.5 mm voxels), median of 3 runs each, on the chosen backend. Prints one line per
 * kernel, "kernel=<name> ms=<median> <detail>", for tests/bench/run.sh and the gpu/ README.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "gpu_seg.h"
#include "lc/log.h"

#define NX   512
#define NY   512
#define NZ   300
#define RUNS 3

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void make_ct(float *vol)
{
    unsigned int seed = 12345;
    for (size_t z = 0; z < NZ; z++)
        for (size_t y = 0; y < NY; y++)
            for (size_t x = 0; x < NX; x++) {
                double dx = ((double)x - 256) / 200, dy = ((double)y - 256) / 150;
                double r = dx * dx + dy * dy;
                double lx = fabs(dx) - 0.45, ly = dy / 0.6;
                int lung = z > 40 && z < 260 && lx * lx / 0.09 + ly * ly < 1;
                seed = seed * 1103515245u + 12345u;
                double noise = ((double)(seed >> 16 & 0x7fff) / 32767.0 - 0.5) * 60.0;
                double v = r < 1.0 ? (lung ? -850.0 : r < 0.02 ? 700.0 : 40.0) : -1000.0;
                vol[(z * NY + y) * NX + x] = (float)(v + noise);
            }
}

#define STEP(name, detail, call)                                                                   \
    do {                                                                                           \
        double t_[RUNS];                                                                           \
        for (int r_ = 0; r_ < RUNS; r_++) {                                                        \
            double t0_ = now_ms();                                                                 \
            if ((call) != LC_OK) {                                                                 \
                fprintf(stderr, "%s: %s\n", name, e.msg);                                          \
                return 1;                                                                          \
            }                                                                                      \
            sync_ctx(ctx, sync);                                                                   \
            t_[r_] = now_ms() - t0_;                                                               \
        }                                                                                          \
        qsort(t_, RUNS, sizeof(double), cmp_d);                                                    \
        printf("kernel=%-22s ms=%8.1f %s\n", name, t_[RUNS / 2], detail);                          \
        fflush(stdout);                                                                            \
    } while (0)

/* CUDA kernels return once queued: a 1-voxel download waits for them. */
static void sync_ctx(gpu_ctx *ctx, gpu_vol *sync)
{
    uint8_t b;
    if (gpu_ctx_backend(ctx) == GPU_BACKEND_CUDA)
        gpu_vol_download(ctx, sync, &b, NULL);
}

int main(int argc, char **argv)
{
    lc_log_init("bench_gpu_kernels", LC_LOG_WARN);
    gpu_backend want = GPU_BACKEND_CPU;
    if (argc > 1 && gpu_backend_parse(argv[1], &want) != LC_OK) {
        fprintf(stderr, "usage: bench_gpu_kernels [cpu|cuda|auto] [threads]\n");
        return 2;
    }
    int threads = argc > 2 ? atoi(argv[2]) : 0;
    size_t n = (size_t)NX * NY * NZ;
    float *vol = malloc(n * sizeof(float));
    uint8_t *mask = malloc(n);
    if (!vol || !mask)
        return 1;
    make_ct(vol);

    gpu_ctx *ctx = NULL;
    lc_err e = {0};
    gpu_ctx_opts o = {.backend = want, .cpu_threads = threads, .warm_up = 1};
    double t0 = now_ms();
    if (gpu_ctx_open(&o, &ctx, &e) != LC_OK) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    printf("backend=%s volume=%dx%dx%d open_and_warm_up_ms=%.1f\n", gpu_ctx_describe(ctx), NX, NY,
           NZ, now_ms() - t0);

    const double sp[3] = {0.7, 0.7, 2.5}, iso[3] = {1.0, 1.0, 1.0};
    gpu_vol *img = NULL, *m = NULL, *m2 = NULL, *lab = NULL, *sync = NULL, *rs = NULL, *rsm = NULL;
    float lo, hi, thr = 0;
    uint64_t hist[256], cnt = 0;
    size_t nl = 0, kept = 0, dims[3] = {NX, NY, NZ}, od[3];
    if (gpu_vol_new(ctx, GPU_U8, 1, 1, 1, &sync, &e) != LC_OK)
        return 1;
    STEP("upload", "(f32, 300 MiB)",
         (gpu_vol_free(img), img = NULL, gpu_vol_upload(ctx, GPU_F32, vol, NX, NY, NZ, &img, &e)));
    if (gpu_vol_new(ctx, GPU_U8, NX, NY, NZ, &m, &e) != LC_OK ||
        gpu_vol_new(ctx, GPU_U8, NX, NY, NZ, &m2, &e) != LC_OK ||
        gpu_vol_new(ctx, GPU_I32, NX, NY, NZ, &lab, &e) != LC_OK) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    gpu_vol *bor = NULL;
    STEP("borrow", "(f32: no copy on the CPU)",
         (gpu_vol_free(bor), bor = NULL, gpu_vol_borrow(ctx, GPU_F32, vol, NX, NY, NZ, &bor, &e)));
    gpu_vol_free(bor);
    STEP("minmax", "", gpu_minmax(ctx, img, &lo, &hi, &e));
    STEP("histogram", "(256 bins)", gpu_histogram(ctx, img, 256, lo, hi, hist, &e));
    float lo2, hi2;
    STEP("histogram+minmax", "(one pass, 256 bins)",
         gpu_histogram_minmax(ctx, img, 256, -1000, 1000, hist, &lo2, &hi2, &e));
    STEP("otsu", "(minmax + histogram)", gpu_otsu_threshold(ctx, img, 256, &thr, &e));
    STEP("threshold", "", gpu_threshold(ctx, img, nextafterf(thr, INFINITY), INFINITY, m, &e));
    STEP("count", "", gpu_count_nonzero(ctx, m, &cnt, &e));
    STEP("erode r=1", "(6-neighbourhood)",
         gpu_morphology(ctx, GPU_MORPH_ERODE, m, 1, NULL, m2, &e));
    STEP("dilate r=3", "(ball(3), 123 voxels)",
         gpu_morphology(ctx, GPU_MORPH_DILATE, m, 3, NULL, m2, &e));
    STEP("open r=2mm aniso", "(0.7x0.7x2.5 mm: 5x5x1 disk)",
         gpu_morphology(ctx, GPU_MORPH_OPEN, m, 2, sp, m2, &e));
    STEP("close r=5mm aniso", "(15x15x5 ellipsoid)",
         gpu_morphology(ctx, GPU_MORPH_CLOSE, m, 5, sp, m2, &e));
    STEP("label 6", "", gpu_label(ctx, m, 6, lab, &nl, &e));
    STEP("label 26", "", gpu_label(ctx, m, 26, lab, &nl, &e));
    uint64_t *sizes = malloc((nl + 1) * sizeof(*sizes));
    if (!sizes)
        return 1;
    STEP("label sizes", "", gpu_label_sizes(ctx, lab, nl, sizes, &e));
    STEP("select largest", "(sizes + table)",
         gpu_select_components(ctx, lab, nl, 1, 0, m2, &kept, &e));
    STEP("keep largest 6", "(label + select)", gpu_keep_largest(ctx, m, 6, 1, 0, m2, &kept, &e));
    STEP("keep largest 26", "(label + select)", gpu_keep_largest(ctx, m, 26, 1, 0, m2, &kept, &e));
    STEP("fill holes 6", "(3D)", gpu_fill_holes(ctx, m2, 6, m, &e));
    STEP("fill holes 4", "(per slice)", gpu_fill_holes(ctx, m2, 4, m, &e));
    STEP("window", "(in place)", gpu_window(ctx, img, 40, 400, img, &e));
    if (gpu_resample_dims(dims, sp, iso, od, &e) != LC_OK ||
        gpu_vol_new(ctx, GPU_F32, od[0], od[1], od[2], &rs, &e) != LC_OK ||
        gpu_vol_new(ctx, GPU_U8, od[0], od[1], od[2], &rsm, &e) != LC_OK) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    char det[96];
    snprintf(det, sizeof(det), "(to 1 mm: %zux%zux%zu)", od[0], od[1], od[2]);
    STEP("resample linear", det, gpu_resample(ctx, img, sp, iso, GPU_INTERP_LINEAR, rs, &e));
    STEP("resample nearest u8", det, gpu_resample(ctx, m, sp, iso, GPU_INTERP_NEAREST, rsm, &e));
    STEP("download", "(u8 mask, 75 MiB)", gpu_vol_download(ctx, m, mask, &e));
    printf("otsu_threshold=%.3f labels_26=%zu mask_voxels=%llu\n", (double)thr, nl,
           (unsigned long long)cnt);
    free(sizes);
    gpu_vol_free(rsm);
    gpu_vol_free(rs);
    gpu_vol_free(lab);
    gpu_vol_free(m2);
    gpu_vol_free(m);
    gpu_vol_free(img);
    gpu_vol_free(sync);
    gpu_ctx_free(ctx);
    free(mask);
    free(vol);
    return 0;
}
