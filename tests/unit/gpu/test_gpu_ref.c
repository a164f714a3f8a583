/*
 * test_gpu_ref.c: the gpu_seg.h API on the CPU reference backend (gpu/ref): every kernel on
 * small volumes whose answers are worked out by hand or by brute force in this file, the
 * independence of results from the thread count, and the argument checks of gpu/gpu.c.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "gpu_seg.h"

/* assert |a - b| <= eps, printing both values when it fails */
#define assert_near(a, b, eps)                                                                     \
    do {                                                                                           \
        double a_ = (a), b_ = (b);                                                                 \
        if (!(fabs(a_ - b_) <= (eps)))                                                             \
            fail_msg("%s = %.9g, expected %.9g (within %g)", #a, a_, b_, (double)(eps));           \
    } while (0)

static gpu_ctx *cpu_ctx(int threads)
{
    gpu_ctx *ctx = NULL;
    lc_err err = {0};
    if (gpu_ctx_new(GPU_BACKEND_CPU, 0, threads, &ctx, &err) != LC_OK)
        fail_msg("gpu_ctx_new(cpu): %s", lc_err_msg(&err));
    return ctx;
}

static gpu_vol *upload_f32(gpu_ctx *ctx, const float *x, size_t nx, size_t ny, size_t nz)
{
    gpu_vol *v = NULL;
    lc_err err = {0};
    if (gpu_vol_upload(ctx, GPU_F32, x, nx, ny, nz, &v, &err) != LC_OK)
        fail_msg("gpu_vol_upload: %s", lc_err_msg(&err));
    return v;
}

/* Deterministic pseudo-random numbers (splitmix64), so failures reproduce. */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_unit(uint64_t *s) /* [0, 1) */
{
    return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

static double rng_gauss(uint64_t *s)
{
    double u = rng_unit(s), v = rng_unit(s);
    return sqrt(-2.0 * log(1.0 - u)) * cos(6.283185307179586 * v);
}

/* Two Gaussian modes (mean 100, sd 15 and mean 300, sd 20), 40% / 60%. */
static float *bimodal(size_t n, uint64_t seed)
{
    float *x = malloc(n * sizeof(*x));
    assert_non_null(x);
    for (size_t i = 0; i < n; i++)
        x[i] = rng_unit(&seed) < 0.4 ? (float)(100 + 15 * rng_gauss(&seed))
                                     : (float)(300 + 20 * rng_gauss(&seed));
    return x;
}

/* 4x4x2 volume holding its own index: x[i] = i, i = x + 4y + 16z. */
static void fill_index(float *x)
{
    for (int i = 0; i < 32; i++)
        x[i] = (float)i;
}

/* --- independent references ---------------------------------------------------------------- */

/* The documented bin formula, written out here again rather than shared with the library. */
static void naive_hist(const float *x, size_t n, int nbins, float lo, float hi, uint64_t *h)
{
    float scale = (float)nbins / (hi - lo);
    memset(h, 0, (size_t)nbins * sizeof(*h));
    for (size_t i = 0; i < n; i++) {
        if (isnan(x[i]))
            continue;
        float f = (x[i] - lo) * scale;
        int b = f <= 0 ? 0 : f >= (float)nbins ? nbins - 1 : (int)f;
        h[b]++;
    }
}

/* Otsu by brute force: for every split, both classes' weights and means summed from scratch
 * over bin centres, the first split with the largest w1 * w2 * (m1 - m2)^2 wins. */
static float brute_otsu(const float *x, size_t n, int nbins)
{
    float lo = INFINITY, hi = -INFINITY;
    for (size_t i = 0; i < n; i++) {
        if (x[i] < lo)
            lo = x[i];
        if (x[i] > hi)
            hi = x[i];
    }
    uint64_t *h = malloc((size_t)nbins * sizeof(*h));
    assert_non_null(h);
    naive_hist(x, n, nbins, lo, hi, h);
    double width = ((double)hi - lo) / nbins, best = -1;
    int best_k = -1;
    for (int k = 0; k + 1 < nbins; k++) {
        double w1 = 0, s1 = 0, w2 = 0, s2 = 0;
        for (int j = 0; j < nbins; j++) {
            double c = lo + (j + 0.5) * width;
            if (j <= k) {
                w1 += (double)h[j];
                s1 += (double)h[j] * c;
            } else {
                w2 += (double)h[j];
                s2 += (double)h[j] * c;
            }
        }
        if (w1 == 0 || w2 == 0)
            continue;
        double d = s1 / w1 - s2 / w2, var = w1 * w2 * d * d;
        if (var > best) {
            best = var;
            best_k = k;
        }
    }
    free(h);
    assert_true(best_k >= 0);
    return (float)(lo + (best_k + 0.5) * width);
}

/* --- contexts ------------------------------------------------------------------------------ */

static void test_ctx_cpu(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    assert_int_equal(gpu_ctx_backend(ctx), GPU_BACKEND_CPU);
    assert_string_equal(gpu_ctx_describe(ctx), "cpu (2 threads)");
    gpu_ctx_free(ctx);

    ctx = cpu_ctx(1);
    assert_string_equal(gpu_ctx_describe(ctx), "cpu (1 thread)");
    gpu_ctx_free(ctx);

    /* 0 threads: one per online CPU */
    char want[64];
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    snprintf(want, sizeof(want), "cpu (%ld thread%s)", online, online == 1 ? "" : "s");
    ctx = cpu_ctx(0);
    assert_string_equal(gpu_ctx_describe(ctx), want);
    gpu_ctx_free(ctx);
    gpu_ctx_free(NULL);
}

static void test_ctx_auto_and_cuda(void **state)
{
    (void)state;
    gpu_ctx *cuda = NULL, *ctx = NULL;
    lc_err err = {0};
    lc_rc rc = gpu_ctx_new(GPU_BACKEND_CUDA, 0, 0, &cuda, &err);
    if (rc == LC_OK) {
        /* a GPU is present: AUTO must take it */
        assert_int_equal(gpu_ctx_backend(cuda), GPU_BACKEND_CUDA);
        assert_memory_equal(gpu_ctx_describe(cuda), "cuda: ", 6);
        assert_int_equal(gpu_ctx_new(GPU_BACKEND_AUTO, 0, 2, &ctx, &err), LC_OK);
        assert_int_equal(gpu_ctx_backend(ctx), GPU_BACKEND_CUDA);
    } else {
        /* explicit CUDA without a device is an error that says why; AUTO falls back */
        assert_int_equal(rc, LC_ERR_UNSUPPORTED);
        assert_null(cuda);
        assert_true(strstr(err.msg, "no CUDA device") || strstr(err.msg, "without CUDA"));
        assert_int_equal(gpu_ctx_new(GPU_BACKEND_AUTO, 0, 2, &ctx, &err), LC_OK);
        assert_int_equal(gpu_ctx_backend(ctx), GPU_BACKEND_CPU);
        assert_string_equal(gpu_ctx_describe(ctx), "cpu (2 threads)");
    }
    gpu_ctx_free(ctx);
    gpu_ctx_free(cuda);
}

static void test_ctx_errors(void **state)
{
    (void)state;
    gpu_ctx *ctx = (gpu_ctx *)1;
    lc_err err = {0};
    assert_int_equal(gpu_ctx_new(GPU_BACKEND_CPU, 0, -1, &ctx, &err), LC_ERR_INVALID);
    assert_null(ctx);
    assert_int_equal(gpu_ctx_new(GPU_BACKEND_CPU, 0, 100000, &ctx, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_ctx_new((gpu_backend)42, 0, 1, &ctx, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_ctx_new(GPU_BACKEND_AUTO, -1, 1, &ctx, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_ctx_new(GPU_BACKEND_CPU, 0, 1, NULL, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_ctx_new(GPU_BACKEND_CPU, 0, -1, &ctx, NULL), LC_ERR_INVALID);
}

static void test_backend_names(void **state)
{
    (void)state;
    gpu_backend b = GPU_BACKEND_CPU;
    assert_int_equal(gpu_backend_parse("cuda", &b), LC_OK);
    assert_int_equal(b, GPU_BACKEND_CUDA);
    assert_int_equal(gpu_backend_parse("auto", &b), LC_OK);
    assert_int_equal(b, GPU_BACKEND_AUTO);
    assert_int_equal(gpu_backend_parse("cpu", &b), LC_OK);
    assert_int_equal(b, GPU_BACKEND_CPU);
    assert_int_equal(gpu_backend_parse("opencl", &b), LC_ERR_INVALID);
    assert_int_equal(gpu_backend_parse(NULL, &b), LC_ERR_INVALID);
    assert_string_equal(gpu_backend_name(GPU_BACKEND_CUDA), "cuda");
    assert_string_equal(gpu_backend_name((gpu_backend)9), "unknown");
}

/* --- volumes ------------------------------------------------------------------------------- */

static void test_vol_roundtrip(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    float x[32], back[32];
    size_t dims[3];
    fill_index(x);
    gpu_vol *v = upload_f32(ctx, x, 4, 4, 2);
    assert_int_equal(gpu_vol_dtype(v), GPU_F32);
    assert_int_equal(gpu_vol_voxels(v), 32);
    gpu_vol_dims(v, dims);
    assert_int_equal(dims[0], 4);
    assert_int_equal(dims[1], 4);
    assert_int_equal(dims[2], 2);
    memset(back, 0xff, sizeof(back));
    assert_int_equal(gpu_vol_download(ctx, v, back, NULL), LC_OK);
    assert_memory_equal(back, x, sizeof(x));
    gpu_vol_free(v);

    /* new volumes are zero-filled */
    uint8_t m[3 * 5 * 7];
    memset(m, 0xaa, sizeof(m));
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, 3, 5, 7, &v, NULL), LC_OK);
    assert_int_equal(gpu_vol_dtype(v), GPU_U8);
    assert_int_equal(gpu_vol_download(ctx, v, m, NULL), LC_OK);
    for (size_t i = 0; i < sizeof(m); i++)
        assert_int_equal(m[i], 0);
    gpu_vol_free(v);
    gpu_vol_free(NULL);
    gpu_ctx_free(ctx);
}

static void test_vol_errors(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(1), *other = cpu_ctx(1);
    gpu_vol *v = (gpu_vol *)1;
    lc_err err = {0};
    float x[8] = {0};

    assert_int_equal(gpu_vol_new(ctx, GPU_F32, 0, 4, 4, &v, &err), LC_ERR_INVALID);
    assert_null(v);
    assert_non_null(strstr(err.msg, "0x4x4"));
    assert_int_equal(gpu_vol_new(ctx, GPU_F32, 4, 0, 4, &v, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, 4, 4, 0, &v, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_vol_upload(ctx, GPU_F32, x, 2, 2, 0, &v, &err), LC_ERR_INVALID);
    /* a product that would wrap size_t, and one that fits size_t but not the limit */
    size_t big = (size_t)1 << 32;
    assert_int_equal(gpu_vol_new(ctx, GPU_F32, big, big, big, &v, &err), LC_ERR_TOO_LARGE);
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, SIZE_MAX, 2, 1, &v, &err), LC_ERR_TOO_LARGE);
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, 1 << 20, 1 << 20, 1 << 10, &v, &err),
                     LC_ERR_TOO_LARGE);
    assert_null(v);
    assert_int_equal(gpu_vol_new(ctx, (gpu_dtype)7, 1, 1, 1, &v, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_vol_new(NULL, GPU_F32, 1, 1, 1, &v, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_vol_new(ctx, GPU_F32, 1, 1, 1, NULL, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_vol_upload(ctx, GPU_F32, NULL, 2, 2, 2, &v, &err), LC_ERR_INVALID);
    assert_null(v);

    /* a volume is used with the context that made it, nowhere else */
    v = upload_f32(ctx, x, 2, 2, 2);
    float lo, hi;
    assert_int_equal(gpu_vol_download(other, v, x, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "another context"));
    assert_int_equal(gpu_minmax(other, v, &lo, &hi, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_vol_download(ctx, v, NULL, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_vol_download(ctx, NULL, x, &err), LC_ERR_INVALID);
    gpu_vol_free(v);
    gpu_ctx_free(other);
    gpu_ctx_free(ctx);
}

/* --- min/max ------------------------------------------------------------------------------- */

static void test_minmax(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    float x[32], lo = 0, hi = 0;
    lc_err err = {0};

    fill_index(x);
    x[0] = NAN; /* ignored: the minimum becomes 1 */
    x[17] = -2.5f;
    gpu_vol *v = upload_f32(ctx, x, 4, 4, 2);
    assert_int_equal(gpu_minmax(ctx, v, &lo, &hi, &err), LC_OK);
    assert_true(lo == -2.5f);
    assert_true(hi == 31.0f);
    gpu_vol_free(v);

    /* all NaN: nothing to report */
    for (int i = 0; i < 32; i++)
        x[i] = NAN;
    v = upload_f32(ctx, x, 4, 4, 2);
    assert_int_equal(gpu_minmax(ctx, v, &lo, &hi, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "NaN"));
    gpu_vol_free(v);

    /* -0 and +0: always +0, whatever the order */
    for (int i = 0; i < 32; i++)
        x[i] = i % 2 ? 0.0f : -0.0f;
    v = upload_f32(ctx, x, 4, 4, 2);
    assert_int_equal(gpu_minmax(ctx, v, &lo, &hi, &err), LC_OK);
    assert_true(lo == 0.0f && !signbit(lo));
    assert_true(hi == 0.0f && !signbit(hi));
    gpu_vol_free(v);

    /* infinities are values */
    fill_index(x);
    x[3] = -INFINITY;
    v = upload_f32(ctx, x, 4, 4, 2);
    assert_int_equal(gpu_minmax(ctx, v, &lo, &hi, &err), LC_OK);
    assert_true(isinf(lo) && lo < 0);
    assert_true(hi == 31.0f);
    assert_int_equal(gpu_minmax(ctx, v, NULL, &hi, &err), LC_ERR_INVALID);
    gpu_vol_free(v);

    /* masks have no min/max here */
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, 2, 2, 2, &v, &err), LC_OK);
    assert_int_equal(gpu_minmax(ctx, v, &lo, &hi, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "u8"));
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

/* --- histogram ----------------------------------------------------------------------------- */

static void test_histogram_by_hand(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    float x[32];
    uint64_t h[8];
    lc_err err = {0};

    fill_index(x);
    gpu_vol *v = upload_f32(ctx, x, 4, 4, 2);

    /* [0, 31] in 4 bins of 7.75: 0..7, 8..15, 16..23, 24..31 (31 itself clamps to bin 3) */
    assert_int_equal(gpu_histogram(ctx, v, 4, 0.0f, 31.0f, h, &err), LC_OK);
    assert_int_equal(h[0], 8);
    assert_int_equal(h[1], 8);
    assert_int_equal(h[2], 8);
    assert_int_equal(h[3], 8);

    /* [0, 10] in 5 bins of 2: edges are exact, so 2 lands in bin 1; 8..31 clamp to bin 4 */
    assert_int_equal(gpu_histogram(ctx, v, 5, 0.0f, 10.0f, h, &err), LC_OK);
    assert_int_equal(h[0], 2);
    assert_int_equal(h[1], 2);
    assert_int_equal(h[2], 2);
    assert_int_equal(h[3], 2);
    assert_int_equal(h[4], 24);

    /* [10, 20] in 2 bins: 0..9 clamp below (bin 0 gets 10 + 5), 15..20 in bin 1 and 21..31
     * clamp above */
    assert_int_equal(gpu_histogram(ctx, v, 2, 10.0f, 20.0f, h, &err), LC_OK);
    assert_int_equal(h[0], 15);
    assert_int_equal(h[1], 17);

    /* one bin takes everything */
    assert_int_equal(gpu_histogram(ctx, v, 1, 0.0f, 1.0f, h, &err), LC_OK);
    assert_int_equal(h[0], 32);
    gpu_vol_free(v);

    /* NaN is not counted; -inf and +inf clamp to the end bins */
    x[5] = NAN;
    x[6] = NAN;
    x[7] = -INFINITY;
    x[8] = INFINITY;
    v = upload_f32(ctx, x, 4, 4, 2);
    assert_int_equal(gpu_histogram(ctx, v, 4, 0.0f, 32.0f, h, &err), LC_OK);
    assert_int_equal(h[0], 6); /* 0..4 and -inf */
    assert_int_equal(h[1], 7); /* 9..15 */
    assert_int_equal(h[2], 8); /* 16..23 */
    assert_int_equal(h[3], 9); /* 24..31 and +inf */
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

static void test_histogram_errors(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(1);
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    uint64_t h[4];
    lc_err err = {0};
    gpu_vol *v = upload_f32(ctx, x, 2, 2, 2), *m = NULL;

    assert_int_equal(gpu_histogram(ctx, v, 0, 0, 1, h, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "bin count 0"));
    assert_int_equal(gpu_histogram(ctx, v, -3, 0, 1, h, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram(ctx, v, GPU_MAX_BINS + 1, 0, 1, h, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram(ctx, v, 4, 1, 1, h, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram(ctx, v, 4, 2, 1, h, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram(ctx, v, 4, NAN, 1, h, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram(ctx, v, 4, 0, INFINITY, h, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram(ctx, v, 4, -3e38f, 3e38f, h, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram(ctx, v, 4, 0, 1, NULL, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram(ctx, NULL, 4, 0, 1, h, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram(NULL, v, 4, 0, 1, h, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, 2, 2, 2, &m, &err), LC_OK);
    assert_int_equal(gpu_histogram(ctx, m, 4, 0, 1, h, &err), LC_ERR_INVALID);
    gpu_vol_free(m);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

/* The fused pass gives what the two kernels give, for any range (guessed right, too narrow,
 * too wide), bin count, thread count and volume length (vector loops and their tails). */
static void test_histogram_minmax(void **state)
{
    (void)state;
    static const size_t lens[] = {1, 3, 4, 15, 16, 17, 33, 64 * 64 * 20 + 7};
    static const int nbins[] = {1, 7, 256, GPU_MAX_BINS};
    static const float ranges[][2] = {{100, 300}, {-1e6f, 1e6f}, {250, 251}, {0, 1}};
    uint64_t *h1 = malloc(GPU_MAX_BINS * sizeof(*h1)), *h2 = malloc(GPU_MAX_BINS * sizeof(*h2));
    lc_err err = {0};
    assert_non_null(h1);
    assert_non_null(h2);
    for (int threads = 1; threads <= 3; threads += 2) {
        gpu_ctx *ctx = cpu_ctx(threads);
        for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++) {
            size_t n = lens[li];
            float *x = bimodal(n, 3 + li);
            for (size_t i = 0; i < n; i += 5)
                x[i] = NAN;
            if (n > 3) {
                x[1] = -0.0f;
                x[2] = INFINITY;
            }
            gpu_vol *v = upload_f32(ctx, x, n, 1, 1);
            for (size_t b = 0; b < sizeof(nbins) / sizeof(nbins[0]); b++)
                for (size_t r = 0; r < sizeof(ranges) / sizeof(ranges[0]); r++) {
                    float lo = 0, hi = 0, lo2 = 0, hi2 = 0;
                    lc_rc rc = gpu_histogram_minmax(ctx, v, nbins[b], ranges[r][0], ranges[r][1],
                                                    h1, &lo, &hi, &err);
                    if (n == 1) { /* x[0] is NaN */
                        assert_int_equal(rc, LC_ERR_INVALID);
                        assert_non_null(strstr(err.msg, "NaN"));
                        continue;
                    }
                    assert_int_equal(rc, LC_OK);
                    assert_int_equal(gpu_minmax(ctx, v, &lo2, &hi2, &err), LC_OK);
                    assert_int_equal(
                        gpu_histogram(ctx, v, nbins[b], ranges[r][0], ranges[r][1], h2, &err),
                        LC_OK);
                    assert_memory_equal(&lo, &lo2, sizeof(lo));
                    assert_memory_equal(&hi, &hi2, sizeof(hi));
                    assert_memory_equal(h1, h2, (size_t)nbins[b] * sizeof(*h1));
                    if (b == 2) {
                        naive_hist(x, n, 256, ranges[r][0], ranges[r][1], h2);
                        assert_memory_equal(h1, h2, 256 * sizeof(*h1));
                    }
                }
            gpu_vol_free(v);
            free(x);
        }
        gpu_ctx_free(ctx);
    }
    /* argument checks as gpu_histogram's */
    gpu_ctx *ctx = cpu_ctx(1);
    float x[32], lo, hi;
    fill_index(x);
    gpu_vol *v = upload_f32(ctx, x, 4, 4, 2), *m = NULL;
    assert_int_equal(gpu_histogram_minmax(ctx, v, 0, 0, 1, h1, &lo, &hi, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram_minmax(ctx, v, 4, 1, 1, h1, &lo, &hi, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram_minmax(ctx, v, 4, 0, NAN, h1, &lo, &hi, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram_minmax(ctx, v, 4, 0, 1, NULL, &lo, &hi, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_histogram_minmax(ctx, v, 4, 0, 1, h1, NULL, &hi, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, 4, 4, 2, &m, &err), LC_OK);
    assert_int_equal(gpu_histogram_minmax(ctx, m, 4, 0, 1, h1, &lo, &hi, &err), LC_ERR_INVALID);
    gpu_vol_free(m);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
    free(h2);
    free(h1);
}

/* --- threshold ----------------------------------------------------------------------------- */

static void mask_of(gpu_ctx *ctx, gpu_vol *v, float lo, float hi, uint8_t *m)
{
    gpu_vol *out = NULL;
    size_t d[3];
    lc_err err = {0};
    gpu_vol_dims(v, d);
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, d[0], d[1], d[2], &out, &err), LC_OK);
    if (gpu_threshold(ctx, v, lo, hi, out, &err) != LC_OK)
        fail_msg("gpu_threshold: %s", lc_err_msg(&err));
    assert_int_equal(gpu_vol_download(ctx, out, m, &err), LC_OK);
    gpu_vol_free(out);
}

static void test_threshold_boundaries(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    float x[32];
    uint8_t m[32];
    fill_index(x);
    x[20] = NAN;
    gpu_vol *v = upload_f32(ctx, x, 4, 4, 2);

    mask_of(ctx, v, 8.0f, 15.0f, m); /* both ends inclusive */
    for (int i = 0; i < 32; i++)
        assert_int_equal(m[i], i >= 8 && i <= 15);

    mask_of(ctx, v, 30.0f, INFINITY, m);
    for (int i = 0; i < 32; i++)
        assert_int_equal(m[i], i >= 30);

    mask_of(ctx, v, -INFINITY, 0.0f, m);
    for (int i = 0; i < 32; i++)
        assert_int_equal(m[i], i == 0);

    mask_of(ctx, v, 5.0f, 5.0f, m);
    for (int i = 0; i < 32; i++)
        assert_int_equal(m[i], i == 5);

    mask_of(ctx, v, -INFINITY, INFINITY, m); /* everything but the NaN */
    for (int i = 0; i < 32; i++)
        assert_int_equal(m[i], i != 20);

    mask_of(ctx, v, 7.5f, 8.5f, m); /* between the values */
    for (int i = 0; i < 32; i++)
        assert_int_equal(m[i], i == 8);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

static void test_threshold_errors(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(1);
    float x[8] = {0};
    lc_err err = {0};
    gpu_vol *v = upload_f32(ctx, x, 2, 2, 2), *m = NULL, *m2 = NULL, *f = NULL;
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, 2, 2, 2, &m, &err), LC_OK);
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, 2, 4, 1, &m2, &err), LC_OK);
    assert_int_equal(gpu_vol_new(ctx, GPU_F32, 2, 2, 2, &f, &err), LC_OK);

    assert_int_equal(gpu_threshold(ctx, v, 2, 1, m, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_threshold(ctx, v, NAN, 1, m, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_threshold(ctx, v, 0, NAN, m, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_threshold(ctx, v, 0, 1, m2, &err), LC_ERR_INVALID); /* same count */
    assert_non_null(strstr(err.msg, "2x4x1"));
    assert_int_equal(gpu_threshold(ctx, v, 0, 1, f, &err), LC_ERR_INVALID); /* f32 out */
    assert_int_equal(gpu_threshold(ctx, m, 0, 1, m, &err), LC_ERR_INVALID); /* u8 in */
    assert_int_equal(gpu_threshold(ctx, v, 0, 1, NULL, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_threshold(ctx, NULL, 0, 1, m, &err), LC_ERR_INVALID);
    gpu_vol_free(f);
    gpu_vol_free(m2);
    gpu_vol_free(m);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

/* Borrowed volumes: the CPU reads the caller's buffer (no copy, nothing counted), kernels
 * give what they give on an uploaded copy, and no kernel writes into one. */
static void test_vol_borrow(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    size_t n = 64 * 64 * 4 + 3;
    float *x = bimodal(n, 5), lo, hi, lo2, hi2, t, t2;
    uint8_t *m1 = malloc(n), *m2 = malloc(n);
    gpu_vol *b = NULL, *u = upload_f32(ctx, x, n, 1, 1), *m = NULL;
    gpu_mem_stats st;
    lc_err err = {0};
    assert_non_null(m1);
    assert_non_null(m2);
    gpu_ctx_memory(ctx, &st);
    size_t used = st.used;
    assert_int_equal(gpu_vol_borrow(ctx, GPU_F32, x, n, 1, 1, &b, &err), LC_OK);
    gpu_ctx_memory(ctx, &st);
    assert_int_equal(st.used, used); /* host memory of the caller's: not counted */
    assert_int_equal(gpu_vol_dtype(b), GPU_F32);
    assert_int_equal(gpu_vol_voxels(b), n);
    assert_int_equal(gpu_minmax(ctx, b, &lo, &hi, &err), LC_OK);
    assert_int_equal(gpu_minmax(ctx, u, &lo2, &hi2, &err), LC_OK);
    assert_true(lo == lo2 && hi == hi2);
    assert_int_equal(gpu_otsu_threshold(ctx, b, 256, &t, &err), LC_OK);
    assert_int_equal(gpu_otsu_threshold(ctx, u, 256, &t2, &err), LC_OK);
    assert_true(t == t2);
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, n, 1, 1, &m, &err), LC_OK);
    assert_int_equal(gpu_threshold(ctx, b, t, INFINITY, m, &err), LC_OK);
    assert_int_equal(gpu_vol_download(ctx, m, m1, &err), LC_OK);
    assert_int_equal(gpu_threshold(ctx, u, t, INFINITY, m, &err), LC_OK);
    assert_int_equal(gpu_vol_download(ctx, m, m2, &err), LC_OK);
    assert_memory_equal(m1, m2, n);
    /* read-only: never an output, the buffer untouched */
    assert_int_equal(gpu_window(ctx, b, 40, 400, b, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "read-only"));
    gpu_vol_free(m);
    assert_int_equal(gpu_vol_borrow(ctx, GPU_U8, m1, n, 1, 1, &m, &err), LC_OK);
    assert_int_equal(gpu_threshold(ctx, u, t, INFINITY, m, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "gpu_threshold output"));
    /* downloads: onto the buffer itself (nothing to do) and elsewhere (a copy) */
    assert_int_equal(gpu_vol_download(ctx, m, m1, &err), LC_OK);
    memset(m2, 7, n);
    assert_int_equal(gpu_vol_download(ctx, m, m2, &err), LC_OK);
    assert_memory_equal(m1, m2, n);
    gpu_vol_free(m);
    gpu_vol_free(b);
    /* a float buffer off its alignment is copied (and counted) rather than read in place */
    assert_int_equal(gpu_vol_borrow(ctx, GPU_F32, (const uint8_t *)x + 1, 4, 1, 1, &b, &err),
                     LC_OK);
    gpu_ctx_memory(ctx, &st);
    assert_int_equal(st.used, used + 16);
    gpu_vol_free(b);
    gpu_ctx_memory(ctx, &st);
    assert_int_equal(st.used, used);
    /* argument checks as gpu_vol_upload's */
    b = (gpu_vol *)1;
    assert_int_equal(gpu_vol_borrow(ctx, GPU_F32, NULL, 1, 1, 1, &b, &err), LC_ERR_INVALID);
    assert_null(b);
    assert_int_equal(gpu_vol_borrow(ctx, GPU_F32, x, 1, 1, 1, NULL, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_vol_borrow(ctx, GPU_F32, x, 0, 1, 1, &b, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_vol_borrow(ctx, (gpu_dtype)7, x, 1, 1, 1, &b, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_vol_borrow(NULL, GPU_F32, x, 1, 1, 1, &b, &err), LC_ERR_INVALID);
    assert_null(b);
    gpu_vol_free(u);
    gpu_ctx_free(ctx);
    free(m2);
    free(m1);
    free(x);
}

/* The vectorised kernels against their scalar definitions, on every length up to 40 (whole
 * vectors and tails) and on values at the edges: NaN, +-0, infinities, the window's ends. */
static void test_kernels_by_definition(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(1);
    const float a = -160, b = 240, inv = 1.0f / 400; /* window level 40, width 400 */
    const float special[] = {NAN, -0.0f, 0.0f, INFINITY, -INFINITY, a, b, 39.5f, -1000, 3000};
    enum { N = 40 };
    float x[N], y[N];
    uint8_t m[N];
    uint64_t seed = 9, c;
    lc_err err = {0};
    for (size_t n = 1; n <= N; n++) {
        for (size_t i = 0; i < n; i++)
            x[i] = rng_unit(&seed) < 0.5 ? special[rng_next(&seed) % 10]
                                         : (float)(rng_unit(&seed) * 800 - 400);
        gpu_vol *v = upload_f32(ctx, x, n, 1, 1), *o = NULL, *mv = NULL;
        assert_int_equal(gpu_vol_new(ctx, GPU_F32, n, 1, 1, &o, &err), LC_OK);
        assert_int_equal(gpu_vol_new(ctx, GPU_U8, n, 1, 1, &mv, &err), LC_OK);
        /* window, bit for bit: which of +-0 survives included */
        assert_int_equal(gpu_window(ctx, v, 40, 400, o, &err), LC_OK);
        assert_int_equal(gpu_vol_download(ctx, o, y, &err), LC_OK);
        for (size_t i = 0; i < n; i++) {
            float w = x[i], cl = w < a ? a : w > b ? b : w, r = (cl - a) * inv;
            w = isnan(w) ? w : r > 1.0f ? 1.0f : r;
            assert_memory_equal(&y[i], &w, sizeof(w));
        }
        /* threshold, inclusive, NaN out */
        assert_int_equal(gpu_threshold(ctx, v, -0.0f, 240, mv, &err), LC_OK);
        assert_int_equal(gpu_vol_download(ctx, mv, m, &err), LC_OK);
        size_t want = 0;
        for (size_t i = 0; i < n; i++) {
            assert_int_equal(m[i], x[i] >= -0.0f && x[i] <= 240);
            want += m[i];
        }
        /* count, any non-zero byte */
        for (size_t i = 0; i < n; i++)
            m[i] *= (uint8_t)(1 + i % 200);
        gpu_vol_free(mv);
        mv = NULL;
        assert_int_equal(gpu_vol_upload(ctx, GPU_U8, m, n, 1, 1, &mv, &err), LC_OK);
        assert_int_equal(gpu_count_nonzero(ctx, mv, &c, &err), LC_OK);
        assert_int_equal(c, want);
        gpu_vol_free(mv);
        gpu_vol_free(o);
        gpu_vol_free(v);
    }
    gpu_ctx_free(ctx);
}

/* --- Otsu ---------------------------------------------------------------------------------- */

static float otsu(gpu_ctx *ctx, const float *x, size_t nx, size_t ny, size_t nz, int nbins)
{
    float t = NAN;
    lc_err err = {0};
    gpu_vol *v = upload_f32(ctx, x, nx, ny, nz);
    if (gpu_otsu_threshold(ctx, v, nbins, &t, &err) != LC_OK)
        fail_msg("gpu_otsu_threshold: %s", lc_err_msg(&err));
    gpu_vol_free(v);
    return t;
}

static void test_otsu_two_values(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    float x[32];
    for (int i = 0; i < 32; i++)
        x[i] = i < 16 ? 0.0f : 10.0f;
    /* Every split between the two spikes has the same variance; the first wins, which is
     * after bin 0: its centre is 0 + 0.5 * 10 / 256. */
    float t = otsu(ctx, x, 4, 4, 2, 256);
    assert_near(t, 0.5 * 10.0 / 256, 1e-6);
    t = otsu(ctx, x, 4, 4, 2, 2);
    assert_near(t, 2.5, 1e-6);
    gpu_ctx_free(ctx);
}

static void test_otsu_bimodal(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(3);
    size_t n = 32 * 32 * 8;
    float *x = bimodal(n, 42);
    static const int bins[] = {2, 3, 16, 64, 256, 1000};
    for (size_t i = 0; i < sizeof(bins) / sizeof(bins[0]); i++) {
        float t = otsu(ctx, x, 32, 32, 8, bins[i]);
        float want = brute_otsu(x, n, bins[i]);
        assert_near(t, want, fabs(want) * 1e-6);
        if (bins[i] >= 16) /* fine enough to land between the modes */
            assert_true(t > 150 && t < 250);
    }
    free(x);
    gpu_ctx_free(ctx);
}

static void test_otsu_edges(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    float x[8] = {7.5f, 7.5f, 7.5f, 7.5f, 7.5f, 7.5f, 7.5f, 7.5f};
    float t = 0;
    lc_err err = {0};
    /* one value: scikit-image returns it, and so do we */
    assert_near(otsu(ctx, x, 2, 2, 2, 256), 7.5, 0);
    /* NaN is ignored */
    x[1] = NAN;
    x[2] = 9.5f;
    assert_near(otsu(ctx, x, 2, 2, 2, 2), 8.0, 1e-6);

    gpu_vol *v = upload_f32(ctx, x, 2, 2, 2);
    assert_int_equal(gpu_otsu_threshold(ctx, v, 1, &t, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_otsu_threshold(ctx, v, GPU_MAX_BINS + 1, &t, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_otsu_threshold(ctx, v, 256, NULL, &err), LC_ERR_INVALID);
    gpu_vol_free(v);

    x[3] = INFINITY;
    v = upload_f32(ctx, x, 2, 2, 2);
    assert_int_equal(gpu_otsu_threshold(ctx, v, 256, &t, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "infinite"));
    gpu_vol_free(v);

    for (int i = 0; i < 8; i++)
        x[i] = NAN;
    v = upload_f32(ctx, x, 2, 2, 2);
    assert_int_equal(gpu_otsu_threshold(ctx, v, 256, &t, &err), LC_ERR_INVALID);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

/* --- thread count -------------------------------------------------------------------------- */

typedef struct results {
    float lo, hi, otsu;
    uint64_t h256[256], *hbig;
    uint8_t *mask;
} results;

static void run_all(int threads, const float *x, size_t nx, size_t ny, size_t nz, results *r)
{
    gpu_ctx *ctx = cpu_ctx(threads);
    lc_err err = {0};
    gpu_vol *v = upload_f32(ctx, x, nx, ny, nz);
    size_t n = nx * ny * nz;
    r->hbig = malloc(GPU_MAX_BINS * sizeof(*r->hbig));
    r->mask = malloc(n);
    assert_non_null(r->hbig);
    assert_non_null(r->mask);
    assert_int_equal(gpu_minmax(ctx, v, &r->lo, &r->hi, &err), LC_OK);
    assert_int_equal(gpu_histogram(ctx, v, 256, r->lo, r->hi, r->h256, &err), LC_OK);
    assert_int_equal(gpu_histogram(ctx, v, GPU_MAX_BINS, -50, 400, r->hbig, &err), LC_OK);
    assert_int_equal(gpu_otsu_threshold(ctx, v, 256, &r->otsu, &err), LC_OK);
    mask_of(ctx, v, r->otsu, INFINITY, r->mask);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

static void test_thread_count_independent(void **state)
{
    (void)state;
    size_t nx = 64, ny = 64, nz = 20, n = nx * ny * nz; /* enough voxels for 3 parts */
    float *x = bimodal(n, 7);
    uint64_t want[256];
    for (size_t i = 0; i < n; i += 997)
        x[i] = NAN;
    x[1] = -0.0f;
    x[n - 1] = 0.0f;
    results one, three, seven;
    run_all(1, x, nx, ny, nz, &one);
    run_all(3, x, nx, ny, nz, &three);
    run_all(7, x, nx, ny, nz, &seven);
    const results *others[] = {&three, &seven};
    for (int k = 0; k < 2; k++) {
        const results *r = others[k];
        assert_memory_equal(&r->lo, &one.lo, sizeof(float));
        assert_memory_equal(&r->hi, &one.hi, sizeof(float));
        assert_memory_equal(&r->otsu, &one.otsu, sizeof(float));
        assert_memory_equal(r->h256, one.h256, sizeof(one.h256));
        assert_memory_equal(r->hbig, one.hbig, GPU_MAX_BINS * sizeof(uint64_t));
        assert_memory_equal(r->mask, one.mask, n);
    }
    /* and the threaded answer is the right one */
    naive_hist(x, n, 256, one.lo, one.hi, want);
    assert_memory_equal(three.h256, want, sizeof(want));
    uint64_t total = 0;
    for (int b = 0; b < 256; b++)
        total += three.h256[b];
    assert_int_equal(total, n - (n + 996) / 997);
    results *all[] = {&one, &three, &seven};
    for (int k = 0; k < 3; k++) {
        free(all[k]->hbig);
        free(all[k]->mask);
    }
    free(x);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ctx_cpu),
        cmocka_unit_test(test_ctx_auto_and_cuda),
        cmocka_unit_test(test_ctx_errors),
        cmocka_unit_test(test_backend_names),
        cmocka_unit_test(test_vol_roundtrip),
        cmocka_unit_test(test_vol_errors),
        cmocka_unit_test(test_minmax),
        cmocka_unit_test(test_histogram_by_hand),
        cmocka_unit_test(test_histogram_errors),
        cmocka_unit_test(test_histogram_minmax),
        cmocka_unit_test(test_threshold_boundaries),
        cmocka_unit_test(test_threshold_errors),
        cmocka_unit_test(test_vol_borrow),
        cmocka_unit_test(test_kernels_by_definition),
        cmocka_unit_test(test_otsu_two_values),
        cmocka_unit_test(test_otsu_bimodal),
        cmocka_unit_test(test_otsu_edges),
        cmocka_unit_test(test_thread_count_independent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
