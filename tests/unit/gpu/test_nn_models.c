/*
 * test_nn_models.c: the acceptance check of the inference engine: every model under
 * tests/data/models/<name>/ (written by tests/models/gen_models.py with PyTorch: model.onnx,
 * input.bin, output.bin as raw float32, meta.json with the shapes and the tolerance) runs on
 * the CPU backend and must match PyTorch's output within meta.json's tolerance.max_abs
 * (1e-4 unless it says otherwise; 0 for integer outputs such as ArgMax's). Prints the max abs
 * error, the memory planner's arena against the sum of the activations, and the time of each
 * model. Also runs every model with a free batch at batch 2 and checks both halves against
 * the batch-1 reference.
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
#include "cJSON.h"
#include "gpu_nn.h"
#include "nn/nn_internal.h"
#include "ts.h"

typedef struct ref_model {
    char name[128];
    char *dir;
    int rank;
    int64_t in_shape[GPU_NN_MAX_RANK], out_shape[GPU_NN_MAX_RANK];
    size_t in_n, out_n;
    double tol;
    int free_batch;
} ref_model;

static int shape_of(const cJSON *arr, int64_t *d, size_t *n)
{
    int r = 0;
    const cJSON *it;
    *n = 1;
    cJSON_ArrayForEach(it, arr)
    {
        if (r >= GPU_NN_MAX_RANK || !cJSON_IsNumber(it))
            return -1;
        d[r++] = (int64_t)it->valuedouble;
        *n *= (size_t)it->valuedouble;
    }
    return r;
}

/* Reads meta.json of dir; 0 when it is not a model folder. */
static int read_meta(const char *dir, const char *name, ref_model *m)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/meta.json", dir);
    char *txt = ts_read_file(path, NULL);
    if (!txt)
        return 0;
    cJSON *j = cJSON_Parse(txt);
    free(txt);
    if (!j)
        fail_msg("%s: meta.json does not parse", path);
    memset(m, 0, sizeof(*m));
    snprintf(m->name, sizeof(m->name), "%s", name);
    const cJSON *in = cJSON_GetObjectItem(j, "input"), *out = cJSON_GetObjectItem(j, "output");
    m->rank = shape_of(cJSON_GetObjectItem(in, "shape"), m->in_shape, &m->in_n);
    int orank = shape_of(cJSON_GetObjectItem(out, "shape"), m->out_shape, &m->out_n);
    if (m->rank < 3 || orank < 1)
        fail_msg("%s: meta.json lacks input.shape or output.shape", path);
    const cJSON *dyn = cJSON_GetObjectItem(in, "dynamic_axes");
    m->free_batch = dyn && cJSON_GetObjectItem(dyn, "0") != NULL;
    const cJSON *tol = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "tolerance"), "max_abs");
    m->tol = cJSON_IsNumber(tol) ? tol->valuedouble : 1e-4;
    const cJSON *st = cJSON_GetObjectItem(out, "stored_as");
    if (st && (!cJSON_IsString(st) || strcmp(st->valuestring, "float32") != 0))
        fail_msg("%s: output stored as %s, only float32 is read", path,
                 cJSON_IsString(st) ? st->valuestring : "?");
    cJSON_Delete(j);
    m->dir = strdup(dir);
    return 1;
}

static float *read_f32(const char *dir, const char *file, size_t n)
{
    char path[1024];
    size_t len = 0;
    snprintf(path, sizeof(path), "%s/%s", dir, file);
    char *buf = ts_read_file(path, &len);
    if (!buf)
        fail_msg("could not read %s", path);
    if (len != n * sizeof(float))
        fail_msg("%s holds %zu bytes, its shape needs %zu", path, len, n * sizeof(float));
    return (float *)(void *)buf;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* The models found, sorted by name. */
static ref_model *list_models(size_t *count)
{
    char *root = ts_data("models");
    DIR *d = opendir(root);
    ref_model *ms = NULL;
    size_t n = 0;
    struct dirent *e;
    *count = 0;
    if (!d) {
        free(root);
        return NULL;
    }
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char dir[1024];
        snprintf(dir, sizeof(dir), "%s/%s", root, e->d_name);
        ref_model m;
        if (!read_meta(dir, e->d_name, &m))
            continue;
        ms = realloc(ms, (n + 1) * sizeof(*ms));
        assert_non_null(ms);
        ms[n++] = m;
    }
    closedir(d);
    free(root);
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && strcmp(ms[j - 1].name, ms[j].name) > 0; j--) {
            ref_model t = ms[j];
            ms[j] = ms[j - 1];
            ms[j - 1] = t;
        }
    *count = n;
    return ms;
}

static void free_models(ref_model *ms, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(ms[i].dir);
    free(ms);
}

static void test_against_pytorch(void **state)
{
    gpu_ctx *ctx = *state;
    size_t n;
    ref_model *ms = list_models(&n);
    if (n == 0) {
        print_message("no reference models in tests/data/models (make models writes them): "
                      "skipped\n");
        skip();
    }
    int failed = 0;
    for (size_t i = 0; i < n; i++) {
        ref_model *r = &ms[i];
        char path[1100];
        lc_err err = {0};
        gpu_nn_model *m = NULL;
        snprintf(path, sizeof(path), "%s/model.onnx", r->dir);
        double t0 = now();
        if (gpu_nn_load_file(ctx, path, NULL, &m, &err) != LC_OK)
            fail_msg("%s: %s", r->name, lc_err_msg(&err));
        double t1 = now();
        float *x = read_f32(r->dir, "input.bin", r->in_n),
              *want = read_f32(r->dir, "output.bin", r->out_n);
        float *y = malloc(r->out_n * sizeof(float));
        int64_t osh[GPU_NN_MAX_RANK];
        assert_non_null(y);
        if (gpu_nn_forward(m, x, r->in_shape, r->rank, y, r->out_n, osh, &err) != LC_OK)
            fail_msg("%s: %s", r->name, lc_err_msg(&err));
        double t2 = now();
        for (int k = 0; k < GPU_NN_MAX_RANK && osh[k]; k++)
            assert_int_equal(osh[k], r->out_shape[k]);
        double worst = 0;
        size_t at = 0;
        for (size_t k = 0; k < r->out_n; k++) {
            double d = fabs((double)y[k] - (double)want[k]);
            if (!(d <= worst)) {
                worst = d;
                at = k;
            }
        }
        const gpu_nn_info *info = gpu_nn_model_info(m);
        const nn_plan *p = m->plans[m->nplans - 1];
        print_message("%-22s max abs error %.3g (tolerance %g), %zu parameters, %zu steps, "
                      "activations %zu KiB in an arena of %zu KiB, load %.0f ms, forward %.0f "
                      "ms\n",
                      r->name, worst, r->tol, info->params, p->nsteps, p->naive_bytes >> 10,
                      p->arena_bytes >> 10, (t1 - t0) * 1e3, (t2 - t1) * 1e3);
        /* the planner reuses buffers on every real network */
        if (p->nsteps > 3 && !(p->arena_bytes < p->naive_bytes))
            fail_msg("%s: the arena (%zu bytes) is not below the activations' sum (%zu)", r->name,
                     p->arena_bytes, p->naive_bytes);
        if (!(worst <= r->tol)) {
            print_error("%s: output %zu is %g, PyTorch gives %g\n", r->name, at, (double)y[at],
                        (double)want[at]);
            failed++;
        }
        free(x);
        free(y);
        free(want);
        gpu_nn_free(m);
    }
    free_models(ms, n);
    assert_int_equal(failed, 0);
}

/* A free batch: two copies of the reference input give two copies of the output. */
static void test_batch_of_two(void **state)
{
    gpu_ctx *ctx = *state;
    size_t n, tried = 0;
    ref_model *ms = list_models(&n);
    for (size_t i = 0; i < n; i++) {
        ref_model *r = &ms[i];
        if (!r->free_batch || r->in_shape[0] != 1)
            continue;
        char path[1100];
        lc_err err = {0};
        gpu_nn_model *m = NULL;
        snprintf(path, sizeof(path), "%s/model.onnx", r->dir);
        assert_int_equal(gpu_nn_load_file(ctx, path, NULL, &m, &err), LC_OK);
        float *x = read_f32(r->dir, "input.bin", r->in_n),
              *want = read_f32(r->dir, "output.bin", r->out_n);
        float *x2 = malloc(2 * r->in_n * sizeof(float)), *y = malloc(2 * r->out_n * sizeof(float));
        assert_true(x2 && y);
        memcpy(x2, x, r->in_n * sizeof(float));
        memcpy(x2 + r->in_n, x, r->in_n * sizeof(float));
        int64_t sh[GPU_NN_MAX_RANK], osh[GPU_NN_MAX_RANK];
        memcpy(sh, r->in_shape, sizeof(sh));
        sh[0] = 2;
        if (gpu_nn_forward(m, x2, sh, r->rank, y, 2 * r->out_n, osh, &err) != LC_OK)
            fail_msg("%s: %s", r->name, lc_err_msg(&err));
        assert_int_equal(osh[0], 2);
        for (size_t k = 0; k < 2 * r->out_n; k++)
            if (!(fabs((double)y[k] - (double)want[k % r->out_n]) <= r->tol))
                fail_msg("%s, batch of 2: output %zu is %g, want %g", r->name, k, (double)y[k],
                         (double)want[k % r->out_n]);
        tried++;
        free(x);
        free(x2);
        free(y);
        free(want);
        gpu_nn_free(m);
    }
    free_models(ms, n);
    if (!tried) {
        print_message("no reference model with a free batch of 1: skipped\n");
        skip();
    }
}

/* A volume of exactly one patch: gpu_nn_segment's probabilities are the softmax of PyTorch's
 * output and its labels their argmax (the window's weights cancel out). */
static void test_single_patch_window(void **state)
{
    gpu_ctx *ctx = *state;
    size_t n, tried = 0;
    ref_model *ms = list_models(&n);
    for (size_t i = 0; i < n; i++) {
        ref_model *r = &ms[i];
        int sd = r->rank - 2;
        if ((sd != 2 && sd != 3) || r->in_shape[1] != 1 || r->out_shape[1] < 2 ||
            r->out_shape[1] > 256 || memcmp(r->in_shape + 2, r->out_shape + 2, (size_t)sd * 8) != 0)
            continue;
        char path[1100];
        lc_err err = {0};
        gpu_nn_model *m = NULL;
        snprintf(path, sizeof(path), "%s/model.onnx", r->dir);
        assert_int_equal(gpu_nn_load_file(ctx, path, NULL, &m, &err), LC_OK);
        float *x = read_f32(r->dir, "input.bin", r->in_n),
              *want = read_f32(r->dir, "output.bin", r->out_n);
        size_t nz = sd == 3 ? (size_t)r->in_shape[2] : 1, ny = (size_t)r->in_shape[r->rank - 2],
               nx = (size_t)r->in_shape[r->rank - 1], nvox = nx * ny * nz,
               nc = (size_t)r->out_shape[1];
        gpu_vol *v = NULL, *lab = NULL, *prob = NULL;
        assert_int_equal(gpu_vol_borrow(ctx, GPU_F32, x, nx, ny, nz, &v, &err), LC_OK);
        gpu_nn_window_opts o = {.patch = {sd == 3 ? (int64_t)nz : 0, (int64_t)ny, (int64_t)nx}};
        if (gpu_nn_segment(m, v, &o, &lab, &prob, &err) != LC_OK)
            fail_msg("%s: %s", r->name, lc_err_msg(&err));
        uint8_t *l = malloc(nvox);
        float *pr = malloc(nc * nvox * sizeof(float));
        assert_true(l && pr);
        assert_int_equal(gpu_vol_download(ctx, lab, l, &err), LC_OK);
        assert_int_equal(gpu_vol_download(ctx, prob, pr, &err), LC_OK);
        double worst = 0;
        size_t wrong = 0;
        for (size_t q = 0; q < nvox; q++) {
            double mx = -INFINITY, sum = 0;
            size_t best = 0;
            for (size_t c = 0; c < nc; c++)
                if (want[c * nvox + q] > mx) {
                    mx = want[c * nvox + q];
                    best = c;
                }
            for (size_t c = 0; c < nc; c++)
                sum += exp(want[c * nvox + q] - mx);
            for (size_t c = 0; c < nc; c++) {
                double d = fabs(pr[c * nvox + q] - exp(want[c * nvox + q] - mx) / sum);
                worst = d > worst ? d : worst;
            }
            wrong += l[q] != best;
        }
        print_message("%-22s one-patch window: %zu of %zu labels differ from PyTorch's argmax, "
                      "probabilities within %.3g of its softmax\n",
                      r->name, wrong, nvox, worst);
        assert_true(worst <= 1e-4);
        assert_true(wrong * 1000 <= nvox); /* near-ties may flip */
        tried++;
        free(l);
        free(pr);
        gpu_vol_free(lab);
        gpu_vol_free(prob);
        gpu_vol_free(v);
        free(x);
        free(want);
        gpu_nn_free(m);
    }
    free_models(ms, n);
    if (!tried) {
        print_message("no single-channel segmentation model among the references: skipped\n");
        skip();
    }
}

static int setup(void **state)
{
    gpu_ctx *ctx = NULL;
    lc_err err = {0};
    if (gpu_ctx_new(GPU_BACKEND_CPU, 0, 2, &ctx, &err) != LC_OK) {
        fprintf(stderr, "could not open the cpu backend: %s\n", lc_err_msg(&err));
        return -1;
    }
    *state = ctx;
    return 0;
}

static int teardown(void **state)
{
    gpu_ctx_free(*state);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_against_pytorch),
        cmocka_unit_test(test_batch_of_two),
        cmocka_unit_test(test_single_patch_window),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
