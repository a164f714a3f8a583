/*
 * test_nn_parity.c: the inference engine's CUDA backend (cuDNN) against its CPU backend and
 * PyTorch: every reference model of tests/data/models and the seed graphs of tests/fuzz/onnx
 * (asymmetric pads, groups, resizing, pools, shape folding) in float32 within 1e-3 of the CPU
 * and of PyTorch; the same models with allow_half (FP16 tensor-core convolutions where the
 * engine's check keeps them) within 5e-2 of PyTorch, the figures printed; sliding-window
 * segmentation with mirroring on both backends (labels agree on 99.9% of voxels, probabilities
 * within 1e-3). Without a CUDA device, or with a device but no cuDNN, each test is skipped
 * and the run says why.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "gpu_nn.h"
#include "ts.h"

typedef struct fixture {
    gpu_ctx *cpu, *cuda;
    char why[600];
} fixture;

#define FLOAT_TOL 1e-3
#define HALF_TOL  5e-2

static void need_cuda(const fixture *f)
{
    if (!f->cuda) {
        print_message("skipped: %s\n", f->why);
        skip();
    }
}

/* Every model file to compare: reference models (with their input) and fuzz seeds (on a
 * pseudo-random input of their declared shape). */
typedef struct item {
    char path[1024], input[1024], output[1024];
} item;

static item *items(size_t *n)
{
    item *v = NULL;
    *n = 0;
    const char *dirs[] = {"tests/data/models", "tests/fuzz/onnx"};
    for (int d = 0; d < 2; d++) {
        char root[900];
        snprintf(root, sizeof(root), "%s/%s", ts_root(), dirs[d]);
        DIR *dp = opendir(root);
        struct dirent *e;
        while (dp && (e = readdir(dp)) != NULL) {
            if (e->d_name[0] == '.')
                continue;
            item it = {{0}};
            if (d == 0) {
                snprintf(it.path, sizeof(it.path), "%s/%s/model.onnx", root, e->d_name);
                snprintf(it.input, sizeof(it.input), "%s/%s/input.bin", root, e->d_name);
                snprintf(it.output, sizeof(it.output), "%s/%s/output.bin", root, e->d_name);
            } else {
                size_t l = strlen(e->d_name);
                if (l < 6 || strcmp(e->d_name + l - 5, ".onnx") != 0)
                    continue;
                snprintf(it.path, sizeof(it.path), "%s/%s", root, e->d_name);
            }
            FILE *f = fopen(it.path, "rb");
            if (!f)
                continue;
            fclose(f);
            v = realloc(v, (*n + 1) * sizeof(*v));
            assert_non_null(v);
            v[(*n)++] = it;
        }
        if (dp)
            closedir(dp);
    }
    return v;
}

/* Input for model m: input.bin when given (its size picks the batch), else a fixed
 * pseudo-random tensor of the model's shape (free axes: 1 for the batch, 16 otherwise). */
static float *make_input(const item *it, const gpu_nn_info *info, int64_t *shape, size_t *n)
{
    size_t len = 0;
    char *buf = it->input[0] ? ts_read_file(it->input, &len) : NULL;
    size_t per = 1;
    for (int i = 0; i < info->rank; i++) {
        shape[i] = info->in_shape[i] > 0 ? info->in_shape[i] : i == 0 ? 1 : 16;
        if (i > 0)
            per *= (size_t)shape[i];
    }
    if (buf) {
        shape[0] = (int64_t)(len / sizeof(float) / per);
        *n = len / sizeof(float);
        return (float *)(void *)buf;
    }
    *n = per * (size_t)shape[0];
    float *x = malloc(*n * sizeof(float));
    assert_non_null(x);
    uint64_t s = 12345;
    for (size_t i = 0; i < *n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(s >> 11) / 9007199254740992.0 * 4.0 - 2.0);
    }
    return x;
}

static float *forward(gpu_ctx *ctx, const item *it, int half, size_t *on, double *ms)
{
    gpu_nn_model *m = NULL;
    lc_err err = {0};
    gpu_nn_opts o = {.allow_half = half};
    if (gpu_nn_load_file(ctx, it->path, &o, &m, &err) != LC_OK)
        fail_msg("%s on %s: %s", it->path, gpu_ctx_describe(ctx), lc_err_msg(&err));
    const gpu_nn_info *info = gpu_nn_model_info(m);
    int64_t sh[GPU_NN_MAX_RANK], osh[GPU_NN_MAX_RANK];
    size_t n;
    float *x = make_input(it, info, sh, &n);
    size_t cap = (size_t)1 << 24;
    float *y = malloc(cap * sizeof(float));
    assert_non_null(y);
    if (gpu_nn_forward(m, x, sh, info->rank, y, cap, osh, &err) != LC_OK)
        fail_msg("%s on %s: %s", it->path, gpu_ctx_describe(ctx), lc_err_msg(&err));
    /* time a second run: the first pays for cuDNN's algorithm search */
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    assert_int_equal(gpu_nn_forward(m, x, sh, info->rank, y, cap, osh, &err), LC_OK);
    clock_gettime(CLOCK_MONOTONIC, &b);
    *ms = (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) * 1e-6;
    *on = 1;
    for (int i = 0; i < GPU_NN_MAX_RANK && osh[i] > 0; i++)
        *on *= (size_t)osh[i];
    free(x);
    gpu_nn_free(m);
    return y;
}

static double max_abs(const float *a, const float *b, size_t n)
{
    double w = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= w))
            w = d;
    }
    return w;
}

static void test_models_float32(void **state)
{
    fixture *f = *state;
    need_cuda(f);
    size_t n;
    item *v = items(&n);
    assert_true(n > 0);
    for (size_t i = 0; i < n; i++) {
        size_t n1, n2, len = 0;
        double t1, t2;
        float *c = forward(f->cpu, &v[i], 0, &n1, &t1), *g = forward(f->cuda, &v[i], 0, &n2, &t2);
        assert_int_equal(n1, n2);
        double d = max_abs(c, g, n1), dp = -1;
        char *ref = v[i].output[0] ? ts_read_file(v[i].output, &len) : NULL;
        if (ref && len == n1 * sizeof(float))
            dp = max_abs(g, (const float *)(void *)ref, n1);
        print_message("%-70s cuda-cpu %.3g, cuda-pytorch %.3g; cpu %.1f ms, cuda %.2f ms\n",
                      v[i].path + strlen(ts_root()) + 1, d, dp, t1, t2);
        if (!(d <= FLOAT_TOL) || !(dp <= FLOAT_TOL))
            fail_msg("%s: CUDA differs by %g from the CPU, %g from PyTorch (tolerance %g)",
                     v[i].path, d, dp, FLOAT_TOL);
        free(ref);
        free(c);
        free(g);
    }
    free(v);
}

static void test_models_half(void **state)
{
    fixture *f = *state;
    need_cuda(f);
    size_t n;
    item *v = items(&n);
    for (size_t i = 0; i < n; i++) {
        size_t n1, n2;
        double t1, t2;
        float *c = forward(f->cpu, &v[i], 0, &n1, &t1), *g = forward(f->cuda, &v[i], 1, &n2, &t2);
        double d = max_abs(c, g, n1);
        print_message("%-70s allow_half: cuda-cpu %.3g; cuda %.2f ms\n",
                      v[i].path + strlen(ts_root()) + 1, d, t2);
        if (!(d <= HALF_TOL))
            fail_msg("%s: FP16 differs by %g (tolerance %g)", v[i].path, d, HALF_TOL);
        free(c);
        free(g);
    }
    free(v);
}

static void test_window(void **state)
{
    fixture *f = *state;
    need_cuda(f);
    char path[1024];
    snprintf(path, sizeof(path), "%s/tests/data/models/unet3d-instnorm/model.onnx", ts_root());
    size_t nx = 40, ny = 37, nz = 21, nvox = nx * ny * nz;
    float *img = malloc(nvox * sizeof(float)), *pc = malloc(2 * 3 * nvox * sizeof(float));
    uint8_t *lc = malloc(nvox), *lg = malloc(nvox);
    assert_true(img && pc && lc && lg);
    for (size_t i = 0; i < nvox; i++)
        img[i] = (float)sin((double)i * 0.37) * 2.0f;
    gpu_ctx *ctxs[2] = {f->cpu, f->cuda};
    for (int k = 0; k < 2; k++) {
        gpu_nn_model *m = NULL;
        gpu_vol *v = NULL, *lab = NULL, *prob = NULL;
        lc_err err = {0};
        if (gpu_nn_load_file(ctxs[k], path, NULL, &m, &err) != LC_OK)
            fail_msg("%s", lc_err_msg(&err));
        assert_int_equal(gpu_vol_upload(ctxs[k], GPU_F32, img, nx, ny, nz, &v, &err), LC_OK);
        gpu_nn_window_opts o = {.mirror = 1, .batch = 2};
        if (gpu_nn_segment(m, v, &o, &lab, &prob, &err) != LC_OK)
            fail_msg("%s", lc_err_msg(&err));
        assert_int_equal(gpu_vol_download(ctxs[k], lab, k ? lg : lc, &err), LC_OK);
        assert_int_equal(gpu_vol_download(ctxs[k], prob, pc + (size_t)k * 3 * nvox, &err), LC_OK);
        gpu_vol_free(lab);
        gpu_vol_free(prob);
        gpu_vol_free(v);
        gpu_nn_free(m);
    }
    size_t differ = 0;
    for (size_t i = 0; i < nvox; i++)
        differ += lc[i] != lg[i];
    double d = max_abs(pc, pc + 3 * nvox, 3 * nvox);
    print_message("sliding window 40x37x21, mirrored: %zu of %zu labels differ, probabilities "
                  "within %.3g\n",
                  differ, nvox, d);
    assert_true(differ * 1000 <= nvox);
    assert_true(d <= FLOAT_TOL);
    free(img);
    free(pc);
    free(lc);
    free(lg);
}

static int group_setup(void **state)
{
    lc_err err = {0};
    fixture *f = calloc(1, sizeof(*f));
    if (!f || gpu_ctx_new(GPU_BACKEND_CPU, 0, 2, &f->cpu, &err) != LC_OK) {
        fprintf(stderr, "could not open the cpu backend: %s\n", lc_err_msg(&err));
        return -1;
    }
    if (gpu_ctx_new(GPU_BACKEND_CUDA, 0, 0, &f->cuda, &err) != LC_OK) {
        snprintf(f->why, sizeof(f->why), "%s", lc_err_msg(&err));
    } else {
        /* a device without cuDNN: models cannot load there */
        char path[1024];
        gpu_nn_model *m = NULL;
        snprintf(path, sizeof(path), "%s/tests/fuzz/onnx/conv_relu.onnx", ts_root());
        if (gpu_nn_load_file(f->cuda, path, NULL, &m, &err) == LC_ERR_UNSUPPORTED &&
            strstr(lc_err_msg(&err), "cuDNN")) {
            snprintf(f->why, sizeof(f->why), "%s", lc_err_msg(&err));
            gpu_ctx_free(f->cuda);
            f->cuda = NULL;
        }
        gpu_nn_free(m);
    }
    if (f->cuda)
        print_message("comparing %s with %s\n", gpu_ctx_describe(f->cuda),
                      gpu_ctx_describe(f->cpu));
    else
        print_message("CUDA parity tests skipped: %s\n", f->why);
    *state = f;
    return 0;
}

static int group_teardown(void **state)
{
    fixture *f = *state;
    gpu_ctx_free(f->cuda);
    gpu_ctx_free(f->cpu);
    free(f);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_models_float32),
        cmocka_unit_test(test_models_half),
        cmocka_unit_test(test_window),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
