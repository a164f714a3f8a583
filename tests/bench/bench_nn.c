/*
 * bench_nn.c: the inference engine's forward pass (gpu/gpu_nn.h) on the CPU backend, for
 * tests/bench/bench_nn.sh, which times PyTorch on the same model and input in the same run.
 *   bench_nn MODEL.onnx INPUT.bin OUTPUT.bin THREADS REPS N C D H W
 * Loads the model on a CPU context with THREADS threads, runs one warm-up pass (plans the
 * shape), then REPS timed passes, writes the last output (float32, C order) to OUTPUT.bin
 * and prints "ours_ms=<median> load_ms=<load> out=<shape>". A build without the engine prints
 * "skipped" and exits 2.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "gpu_seg.h"
#include "lc/util.h"
#include "seg_nn_config.h"
#if SEG_HAVE_NN
#include "gpu_nn.h"

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc != 11) {
        fprintf(stderr, "usage: bench_nn MODEL.onnx INPUT.bin OUTPUT.bin THREADS REPS N C D H W\n");
        return 2;
    }
    int threads = atoi(argv[4]), reps = atoi(argv[5]);
    int64_t in_shape[5], out_shape[5] = {0};
    size_t n = 1;
    for (int i = 0; i < 5; i++) {
        in_shape[i] = atoll(argv[6 + i]);
        n *= (size_t)in_shape[i];
    }
    lc_err e = {0};
    gpu_ctx *ctx = NULL;
    gpu_nn_model *m = NULL;
    char *raw = NULL;
    size_t len = 0;
    float *out = NULL;
    double *ms = calloc((size_t)(reps > 0 ? reps : 1), sizeof(double));
    int rc = 1;
    gpu_ctx_opts o = {.backend = GPU_BACKEND_CPU, .cpu_threads = threads};
    if (lc_read_file(argv[2], (size_t)1 << 32, &raw, &len, &e) != LC_OK || len != n * 4) {
        fprintf(stderr, "bench_nn: input %s: %s (%zu bytes, want %zu)\n", argv[2], lc_err_msg(&e),
                len, n * 4);
        goto out;
    }
    if (gpu_ctx_open(&o, &ctx, &e) != LC_OK)
        goto fail;
    int64_t t0 = lc_now_ms();
    /* RADPIPE_NN_PROFILE=1: each step's time (a tuning aid of this benchmark only) */
    gpu_nn_opts nopts = {.profile = getenv("RADPIPE_NN_PROFILE") != NULL};
    if (gpu_nn_load_file(ctx, argv[1], &nopts, &m, &e) != LC_OK)
        goto fail;
    double load_ms = (double)(lc_now_ms() - t0);
    lc_rc r = gpu_nn_forward(m, (const float *)raw, in_shape, 5, NULL, 0, out_shape, &e);
    if (r != LC_ERR_TOO_LARGE && r != LC_OK)
        goto fail;
    size_t cap = 1;
    for (int i = 0; i < 5; i++)
        cap *= (size_t)out_shape[i];
    out = malloc(cap * sizeof(float));
    if (!out)
        goto fail;
    /* warm-up: the plan for this shape is built here */
    if (gpu_nn_forward(m, (const float *)raw, in_shape, 5, out, cap, out_shape, &e) != LC_OK)
        goto fail;
    for (int i = 0; i < reps; i++) {
        struct timespec ts0, ts1;
        clock_gettime(CLOCK_MONOTONIC, &ts0);
        if (gpu_nn_forward(m, (const float *)raw, in_shape, 5, out, cap, out_shape, &e) != LC_OK)
            goto fail;
        clock_gettime(CLOCK_MONOTONIC, &ts1);
        ms[i] = (double)(ts1.tv_sec - ts0.tv_sec) * 1e3 + (double)(ts1.tv_nsec - ts0.tv_nsec) / 1e6;
    }
    qsort(ms, (size_t)reps, sizeof(double), cmp_d);
    FILE *f = fopen(argv[3], "wb");
    if (!f || fwrite(out, sizeof(float), cap, f) != cap) {
        fprintf(stderr, "bench_nn: could not write %s\n", argv[3]);
        if (f)
            fclose(f);
        goto out;
    }
    fclose(f);
    printf("ours_ms=%.1f load_ms=%.0f params=%zu out=%lldx%lldx%lldx%lldx%lld backend=\"%s\"\n",
           ms[reps / 2], load_ms, gpu_nn_model_info(m)->params, (long long)out_shape[0],
           (long long)out_shape[1], (long long)out_shape[2], (long long)out_shape[3],
           (long long)out_shape[4], gpu_ctx_describe(ctx));
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "bench_nn: %s\n", lc_err_msg(&e));
out:
    free(out);
    free(ms);
    free(raw);
    gpu_nn_free(m);
    gpu_ctx_free(ctx);
    return rc;
}

#else

int main(void)
{
    printf("skipped: this build has no inference engine (gpu/nn)\n");
    return 2;
}

#endif
