/*
 * bench_body.c OUT.f32 [RUNS]: the gpu-segmenter's body pipeline (seg_algo_run with the
 * default "body" parameters: HU window -1000..1000, Otsu with 256 bins, the largest
 * 6-connected component, holes filled slice by slice) on the CPU backend of gpu/, on a
 * generated 512x512x300 CT: air, an elliptic body of soft tissue with two lungs, a spine
 * and a couch below it, with noise. The volume is written to OUT.f32 so run.sh can time the
 * same pipeline in scikit-image on the same data (flushed to disk first, so its write-back
 * does not slow the timed runs). Prints "ours_ms=<median of RUNS (3)> threshold=<HU>
 * voxels=<n> backend=<...>" on stdout and every run's time on stderr.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "lc/log.h"
#include "lc/util.h"
#include "seg.h"

#define NX 512
#define NY 512
#define NZ 300

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static float ct_value(size_t x, size_t y, size_t z, unsigned *seed)
{
    double dx = ((double)x - 256) / 210, dy = ((double)y - 240) / 150;
    double body = dx * dx + dy * dy;
    *seed = *seed * 1103515245u + 12345u;
    double noise = ((double)(*seed >> 16 & 0x7fff) / 32767.0 - 0.5) * 60.0;
    double v = -1000;
    if (body < 1.0) {
        v = 40;
        int chest = z > NZ / 5 && z < NZ * 4 / 5;
        for (int side = -1; side <= 1 && chest; side += 2) {
            double lx = ((double)x - 256 - side * 95) / 70, ly = ((double)y - 230) / 95;
            if (lx * lx + ly * ly < 1.0)
                v = -850; /* lungs: holes a slice-wise fill closes */
        }
        double sx = ((double)x - 256) / 22, sy = ((double)y - 345) / 22;
        if (sx * sx + sy * sy < 1.0)
            v = 700; /* spine */
    } else if (y > 405 && y < 412 && x > 80 && x < 432) {
        v = 300; /* the couch: a separate component the largest-component step removes */
    }
    return (float)(v + noise);
}

int main(int argc, char **argv)
{
    lc_log_init("bench_body", LC_LOG_WARN);
    if (argc < 2) {
        fprintf(stderr, "usage: bench_body OUT.f32 [RUNS]\n");
        return 2;
    }
    int runs = argc > 2 ? atoi(argv[2]) : 3;
    if (runs < 1 || runs > 50)
        runs = 3;
    size_t n = (size_t)NX * NY * NZ;
    float *vol = malloc(n * sizeof(float));
    uint8_t *mask = malloc(n);
    if (!vol || !mask)
        return 1;
    unsigned seed = 12345;
    for (size_t z = 0; z < NZ; z++)
        for (size_t y = 0; y < NY; y++)
            for (size_t x = 0; x < NX; x++)
                vol[(z * NY + y) * NX + x] = ct_value(x, y, z, &seed);
    /* Flushed to disk before the timing starts: otherwise the kernel writes 300 MiB back
     * while the first runs are timed, and they pay for it. */
    FILE *f = fopen(argv[1], "wb");
    if (!f || fwrite(vol, sizeof(float), n, f) != n || fflush(f) != 0 || fsync(fileno(f)) != 0 ||
        fclose(f) != 0) {
        fprintf(stderr, "could not write %s\n", argv[1]);
        return 1;
    }
    gpu_ctx *ctx = NULL;
    lc_err e;
    gpu_ctx_opts o = {.backend = GPU_BACKEND_CPU, .warm_up = 1};
    if (gpu_ctx_open(&o, &ctx, &e) != LC_OK) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    seg_params p;
    cJSON *params = cJSON_Parse("{\"algorithm\":\"body\"}");
    if (seg_params_parse(params, &p, &e) != LC_OK) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    cJSON_Delete(params);
    const double spacing[3] = {0.8, 0.8, 1.5};
    double *ms = calloc((size_t)runs, sizeof(double));
    seg_algo_stats st = {0};
    for (int r = 0; r < runs; r++) {
        int64_t t0 = lc_now_ms();
        if (seg_algo_run(ctx, &p, vol, NX, NY, NZ, spacing, mask, &st, &e) != LC_OK) {
            fprintf(stderr, "%s\n", e.msg);
            return 1;
        }
        ms[r] = (double)(lc_now_ms() - t0);
    }
    fprintf(stderr, "bench_body: runs_ms=");
    for (int r = 0; r < runs; r++)
        fprintf(stderr, "%s%.0f", r ? "," : "", ms[r]);
    fprintf(stderr, "\n");
    qsort(ms, (size_t)runs, sizeof(double), cmp_d);
    printf("ours_ms=%.1f threshold=%.3f voxels=%llu backend=\"%s\"\n", ms[runs / 2],
           (double)st.threshold, (unsigned long long)st.voxels, gpu_ctx_describe(ctx));
    gpu_ctx_free(ctx);
    free(ms);
    free(vol);
    free(mask);
    return 0;
}
