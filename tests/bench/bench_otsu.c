/*
 * bench_otsu.c OUT.f32: Otsu threshold + mask of a 512x512x300 float volume on the CPU backend
 * of gpu/ (upload, gpu_otsu_threshold with 256 bins, threshold, download), median of 5 runs.
 * The volume is synthetic but CT-like (air at -1000 HU, an elliptic body near 40 HU, bone
 * near 700 HU, noise) and is written to OUT.f32 so run.sh can time scikit-image on the same
 * data. Prints "ours_ms=<median> threshold=<t> voxels=<n> backend=<...>".
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gpu_seg.h"
#include "lc/log.h"
#include "lc/util.h"

#define NX 512
#define NY 512
#define NZ 300

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    lc_log_init("bench_otsu", LC_LOG_WARN);
    if (argc != 2) {
        fprintf(stderr, "usage: bench_otsu OUT.f32\n");
        return 2;
    }
    size_t n = (size_t)NX * NY * NZ;
    float *vol = malloc(n * sizeof(float));
    unsigned char *mask = malloc(n);
    if (!vol || !mask)
        return 1;
    unsigned int seed = 12345;
    for (size_t z = 0; z < NZ; z++)
        for (size_t y = 0; y < NY; y++)
            for (size_t x = 0; x < NX; x++) {
                double dx = ((double)x - 256) / 200, dy = ((double)y - 256) / 150;
                double r = dx * dx + dy * dy;
                seed = seed * 1103515245u + 12345u;
                double noise = ((double)(seed >> 16 & 0x7fff) / 32767.0 - 0.5) * 60.0;
                double v = r < 1.0 ? (r < 0.02 ? 700.0 : 40.0) : -1000.0;
                vol[(z * NY + y) * NX + x] = (float)(v + noise);
            }
    FILE *f = fopen(argv[1], "wb");
    if (!f || fwrite(vol, sizeof(float), n, f) != n || fclose(f) != 0) {
        fprintf(stderr, "could not write %s\n", argv[1]);
        return 1;
    }
    gpu_ctx *ctx = NULL;
    lc_err e;
    if (gpu_ctx_new(GPU_BACKEND_CPU, 0, 0, &ctx, &e) != LC_OK) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    double ms[5];
    float thr = 0;
    size_t fg = 0;
    for (int run = 0; run < 5; run++) {
        gpu_vol *in = NULL, *out = NULL;
        int64_t t0 = lc_now_ms();
        if (gpu_vol_upload(ctx, GPU_F32, vol, NX, NY, NZ, &in, &e) != LC_OK ||
            gpu_otsu_threshold(ctx, in, 256, &thr, &e) != LC_OK ||
            gpu_vol_new(ctx, GPU_U8, NX, NY, NZ, &out, &e) != LC_OK ||
            gpu_threshold(ctx, in, nextafterf(thr, INFINITY), INFINITY, out, &e) != LC_OK ||
            gpu_vol_download(ctx, out, mask, &e) != LC_OK) {
            fprintf(stderr, "%s\n", e.msg);
            return 1;
        }
        ms[run] = (double)(lc_now_ms() - t0);
        gpu_vol_free(in);
        gpu_vol_free(out);
    }
    for (size_t i = 0; i < n; i++)
        fg += mask[i];
    qsort(ms, 5, sizeof(double), cmp_d);
    printf("ours_ms=%.1f threshold=%.3f voxels=%zu backend=\"%s\"\n", ms[2], thr, fg,
           gpu_ctx_describe(ctx));
    gpu_ctx_free(ctx);
    free(vol);
    free(mask);
    return 0;
}
