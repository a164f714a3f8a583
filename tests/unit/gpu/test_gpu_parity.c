/*
 * test_gpu_parity.c: the CUDA backend against the CPU reference on random and structured
 * volumes: histograms (alone and fused with min/max), min/max, Otsu thresholds, masks (also
 * from borrowed volumes), morphology, labels, component sizes and filtering, hole filling,
 * windows and nearest-neighbour resampling must be bit-identical; trilinear resampling within
 * 1e-6 of the value range (by design identical too). Without a CUDA device (or a build without
 * CUDA) those tests are skipped, saying so. One more test compares our Otsu threshold (CPU)
 * with scikit-image's threshold_otsu, run by python3 on the same voxels, within one bin width.
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
#include "gpu_seg.h"
#include "ts.h"

typedef struct fixture {
    gpu_ctx *cpu;
    gpu_ctx *cuda; /* NULL when there is no CUDA device */
} fixture;

/* Deterministic pseudo-random numbers (splitmix64), so failures reproduce. */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_unit(uint64_t *s)
{
    return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

static double rng_gauss(uint64_t *s)
{
    double u = rng_unit(s), v = rng_unit(s);
    return sqrt(-2.0 * log(1.0 - u)) * cos(6.283185307179586 * v);
}

/* --- volumes ------------------------------------------------------------------------------- */

typedef struct vol {
    const char *name;
    size_t nx, ny, nz, n;
    float *x;
} vol;

static vol vol_alloc(const char *name, size_t nx, size_t ny, size_t nz)
{
    vol v = {.name = name, .nx = nx, .ny = ny, .nz = nz, .n = nx * ny * nz};
    v.x = malloc(v.n * sizeof(float));
    assert_non_null(v.x);
    return v;
}

/* uniform in [-1000, 3000) */
static vol vol_uniform(size_t nx, size_t ny, size_t nz, uint64_t seed)
{
    vol v = vol_alloc("uniform", nx, ny, nz);
    for (size_t i = 0; i < v.n; i++)
        v.x[i] = (float)(-1000 + 4000 * rng_unit(&seed));
    return v;
}

/* CT-like: air around -1000 and soft tissue around 40 */
static vol vol_bimodal(size_t nx, size_t ny, size_t nz, uint64_t seed)
{
    vol v = vol_alloc("bimodal", nx, ny, nz);
    for (size_t i = 0; i < v.n; i++)
        v.x[i] = rng_unit(&seed) < 0.3 ? (float)(-1000 + 30 * rng_gauss(&seed))
                                       : (float)(40 + 25 * rng_gauss(&seed));
    return v;
}

/* A bright sphere in a dim background with noise: the shape a segmentation meets. */
static vol vol_sphere(size_t nx, size_t ny, size_t nz, uint64_t seed)
{
    vol v = vol_alloc("sphere", nx, ny, nz);
    double r = 0.3 * (double)(nx < ny ? (nx < nz ? nx : nz) : (ny < nz ? ny : nz));
    for (size_t z = 0; z < nz; z++)
        for (size_t y = 0; y < ny; y++)
            for (size_t x = 0; x < nx; x++) {
                double dx = x - nx / 2.0, dy = y - ny / 2.0, dz = z - nz / 2.0;
                int in = dx * dx + dy * dy + dz * dz < r * r;
                v.x[(z * ny + y) * nx + x] = (float)((in ? 200 : 20) + 10 * rng_gauss(&seed));
            }
    return v;
}

/* Integers 0..4095 (12-bit CT stored values): many voxels sit exactly on bin edges. */
static vol vol_integers(size_t nx, size_t ny, size_t nz, uint64_t seed)
{
    vol v = vol_alloc("integers", nx, ny, nz);
    for (size_t i = 0; i < v.n; i++)
        v.x[i] = (float)(rng_next(&seed) % 4096);
    return v;
}

/* Skewed (exponential), with NaN, infinities left out (Otsu rejects them), and -0/+0. */
static vol vol_skewed_nan(size_t nx, size_t ny, size_t nz, uint64_t seed)
{
    vol v = vol_alloc("skewed+nan", nx, ny, nz);
    for (size_t i = 0; i < v.n; i++) {
        uint64_t r = rng_next(&seed);
        v.x[i] = r % 101 == 0   ? NAN
                 : r % 103 == 0 ? (r & 1 ? -0.0f : 0.0f)
                                : (float)(-log(1.0 - rng_unit(&seed)) * 50.0);
    }
    return v;
}

static void vol_free(vol *v)
{
    free(v->x);
    v->x = NULL;
}

/* --- comparing backends -------------------------------------------------------------------- */

static gpu_vol *upload(gpu_ctx *ctx, const vol *v)
{
    gpu_vol *g = NULL;
    lc_err err = {0};
    if (gpu_vol_upload(ctx, GPU_F32, v->x, v->nx, v->ny, v->nz, &g, &err) != LC_OK)
        fail_msg("%s: upload: %s", v->name, lc_err_msg(&err));
    return g;
}

/* The fixture of a test; skips the test when it needs CUDA and there is none. */
static fixture *fix(void **state, int cuda)
{
    fixture *f = *state;
    if (cuda && !f->cuda)
        skip();
    return f;
}

/* One backend's answers for a volume. */
typedef struct answers {
    float lo, hi, otsu[3];
    uint64_t *hist[4];
    uint8_t *mask[4]; /* the last from a borrowed volume */
    float *back;
    float fused_lo, fused_hi; /* gpu_histogram_minmax */
    uint64_t fused[256];
} answers;

static const int hist_bins[4] = {1, 256, 8193, GPU_MAX_BINS}; /* shared and global paths */
static const int otsu_bins[3] = {2, 256, 4096};

static void compute(gpu_ctx *ctx, const vol *v, answers *a)
{
    lc_err err = {0};
    gpu_vol *g = upload(ctx, v), *m = NULL;
#define OK(call)                                                                                   \
    do {                                                                                           \
        if ((call) != LC_OK)                                                                       \
            fail_msg("%s on %s: %s: %s", #call, gpu_ctx_describe(ctx), v->name, lc_err_msg(&err)); \
    } while (0)
    OK(gpu_minmax(ctx, g, &a->lo, &a->hi, &err));
    for (int i = 0; i < 4; i++) {
        a->hist[i] = calloc((size_t)hist_bins[i], sizeof(uint64_t));
        assert_non_null(a->hist[i]);
        /* a range narrower than the data, so both clamps are exercised */
        float w = a->hi - a->lo;
        OK(gpu_histogram(ctx, g, hist_bins[i], a->lo + w * 0.01f, a->hi - w * 0.02f, a->hist[i],
                         &err));
    }
    float w = a->hi - a->lo;
    OK(gpu_histogram_minmax(ctx, g, 256, a->lo + w * 0.1f, a->hi - w * 0.05f, a->fused,
                            &a->fused_lo, &a->fused_hi, &err));
    for (int i = 0; i < 3; i++)
        OK(gpu_otsu_threshold(ctx, g, otsu_bins[i], &a->otsu[i], &err));
    OK(gpu_vol_new(ctx, GPU_U8, v->nx, v->ny, v->nz, &m, &err));
    const float ranges[3][2] = {{a->otsu[1], INFINITY}, {-INFINITY, a->otsu[2]}, {0.0f, 0.0f}};
    for (int i = 0; i < 3; i++) {
        a->mask[i] = malloc(v->n);
        assert_non_null(a->mask[i]);
        OK(gpu_threshold(ctx, g, ranges[i][0], ranges[i][1], m, &err));
        OK(gpu_vol_download(ctx, m, a->mask[i], &err));
    }
    gpu_vol *b = NULL; /* on CUDA a copy, on the CPU the buffer itself: the same mask */
    a->mask[3] = malloc(v->n);
    assert_non_null(a->mask[3]);
    OK(gpu_vol_borrow(ctx, GPU_F32, v->x, v->nx, v->ny, v->nz, &b, &err));
    OK(gpu_threshold(ctx, b, ranges[0][0], ranges[0][1], m, &err));
    OK(gpu_vol_download(ctx, m, a->mask[3], &err));
    assert_int_equal(gpu_window(ctx, b, 40, 400, b, &err), LC_ERR_INVALID);
    gpu_vol_free(b);
    a->back = malloc(v->n * sizeof(float));
    assert_non_null(a->back);
    OK(gpu_vol_download(ctx, g, a->back, &err));
#undef OK
    gpu_vol_free(m);
    gpu_vol_free(g);
}

static void answers_free(answers *a)
{
    for (int i = 0; i < 4; i++)
        free(a->hist[i]);
    for (int i = 0; i < 4; i++)
        free(a->mask[i]);
    free(a->back);
}

static void compare_backends(const fixture *f, vol *v)
{
    answers c = {0}, g = {0};
    compute(f->cpu, v, &c);
    compute(f->cuda, v, &g);
    assert_memory_equal(g.back, v->x, v->n * sizeof(float));
    if (memcmp(&c.lo, &g.lo, sizeof(float)) || memcmp(&c.hi, &g.hi, sizeof(float)))
        fail_msg("%s: min/max cpu [%.9g, %.9g], cuda [%.9g, %.9g]", v->name, c.lo, c.hi, g.lo,
                 g.hi);
    for (int i = 0; i < 4; i++)
        for (int b = 0; b < hist_bins[i]; b++)
            if (c.hist[i][b] != g.hist[i][b])
                fail_msg("%s: %d-bin histogram, bin %d: cpu %llu, cuda %llu", v->name, hist_bins[i],
                         b, (unsigned long long)c.hist[i][b], (unsigned long long)g.hist[i][b]);
    for (int i = 0; i < 3; i++)
        if (memcmp(&c.otsu[i], &g.otsu[i], sizeof(float)))
            fail_msg("%s: Otsu (%d bins): cpu %.9g, cuda %.9g", v->name, otsu_bins[i], c.otsu[i],
                     g.otsu[i]);
    for (int i = 0; i < 4; i++)
        assert_memory_equal(c.mask[i], g.mask[i], v->n);
    assert_memory_equal(c.mask[3], c.mask[0], v->n);
    assert_memory_equal(c.fused, g.fused, sizeof(c.fused));
    assert_memory_equal(&c.fused_lo, &c.lo, sizeof(float));
    assert_memory_equal(&c.fused_hi, &c.hi, sizeof(float));
    assert_memory_equal(&g.fused_lo, &g.lo, sizeof(float));
    assert_memory_equal(&g.fused_hi, &g.hi, sizeof(float));
    answers_free(&c);
    answers_free(&g);
    vol_free(v);
}

static void test_parity_uniform(void **state)
{
    fixture *f = fix(state, 1);
    vol v = vol_uniform(128, 128, 64, 1);
    compare_backends(f, &v);
}

static void test_parity_bimodal(void **state)
{
    fixture *f = fix(state, 1);
    vol v = vol_bimodal(256, 256, 33, 2);
    compare_backends(f, &v);
}

static void test_parity_sphere(void **state)
{
    fixture *f = fix(state, 1);
    vol v = vol_sphere(97, 89, 61, 3); /* odd sizes: no multiple of a block anywhere */
    compare_backends(f, &v);
}

static void test_parity_integers(void **state)
{
    fixture *f = fix(state, 1);
    vol v = vol_integers(512, 512, 4, 4);
    compare_backends(f, &v);
}

static void test_parity_nan_and_zeros(void **state)
{
    fixture *f = fix(state, 1);
    vol v = vol_skewed_nan(64, 64, 64, 5);
    compare_backends(f, &v);
}

static void test_parity_tiny(void **state)
{
    fixture *f = fix(state, 1);
    vol v = vol_alloc("tiny", 3, 1, 1);
    v.x[0] = 1.0f;
    v.x[1] = 5.0f;
    v.x[2] = 2.0f;
    compare_backends(f, &v);

    v = vol_alloc("single", 1, 1, 1);
    v.x[0] = 3.0f;
    float tc = 0, tg = 0;
    gpu_vol *a = upload(f->cpu, &v), *b = upload(f->cuda, &v);
    assert_int_equal(gpu_otsu_threshold(f->cpu, a, 256, &tc, NULL), LC_OK);
    assert_int_equal(gpu_otsu_threshold(f->cuda, b, 256, &tg, NULL), LC_OK);
    assert_true(tc == 3.0f && tg == 3.0f);
    gpu_vol_free(a);
    gpu_vol_free(b);
    vol_free(&v);
}

/* Errors from the CUDA backend come back through lc_err like the CPU's. */
static void test_cuda_errors(void **state)
{
    fixture *f = fix(state, 1);
    gpu_vol *v = NULL, *m = NULL;
    lc_err err = {0};
    float x[8] = {0}, lo, hi;
    assert_int_equal(gpu_vol_upload(f->cuda, GPU_F32, x, 2, 2, 2, &v, &err), LC_OK);
    assert_int_equal(gpu_vol_new(f->cpu, GPU_U8, 2, 2, 2, &m, &err), LC_OK);
    /* volumes do not cross backends */
    assert_int_equal(gpu_threshold(f->cuda, v, 0, 1, m, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_minmax(f->cpu, v, &lo, &hi, &err), LC_ERR_INVALID);
    gpu_vol_free(m);
    gpu_vol_free(v);
    /* 256 GiB: more device memory than the GPUs radpipe runs on have */
    lc_rc rc =
        gpu_vol_new(f->cuda, GPU_F32, (size_t)1 << 12, (size_t)1 << 12, (size_t)1 << 12, &v, &err);
    if (rc == LC_OK) {
        print_message("the device holds 256 GiB: out-of-memory path not exercised\n");
        gpu_vol_free(v);
    } else {
        assert_int_equal(rc, LC_ERR_NOMEM);
        assert_null(v);
        assert_non_null(strstr(err.msg, "device memory"));
    }
    /* and the context still works afterwards */
    assert_int_equal(gpu_vol_upload(f->cuda, GPU_F32, x, 2, 2, 2, &v, &err), LC_OK);
    assert_int_equal(gpu_minmax(f->cuda, v, &lo, &hi, &err), LC_OK);
    gpu_vol_free(v);
}

/* --- segmentation kernels ------------------------------------------------------------------ */

/* A mask of balls and shells (cavities) with 3% of voxels flipped, or (dense != 0) 45%
 * random voxels, over every percolation threshold: one giant component crossing every block
 * and slab with thousands of small ones beside it. */
static uint8_t *seg_mask(size_t nx, size_t ny, size_t nz, int dense, uint64_t seed)
{
    size_t n = nx * ny * nz;
    uint8_t *m = calloc(n, 1);
    assert_non_null(m);
    if (dense) {
        for (size_t i = 0; i < n; i++)
            m[i] = rng_unit(&seed) < 0.45;
        return m;
    }
    for (int b = 0; b < 20; b++) {
        double cx = rng_unit(&seed) * nx, cy = rng_unit(&seed) * ny, cz = rng_unit(&seed) * nz;
        double r = 2 + rng_unit(&seed) * (double)(nx < ny ? nx : ny) / 5,
               inner = b % 3 ? -1 : r * 0.6;
        for (size_t z = 0; z < nz; z++)
            for (size_t y = 0; y < ny; y++)
                for (size_t x = 0; x < nx; x++) {
                    double d =
                        sqrt((x - cx) * (x - cx) + (y - cy) * (y - cy) + (z - cz) * (z - cz) * 2);
                    if (d <= r && d > inner)
                        m[(z * ny + y) * nx + x] = 1;
                }
    }
    for (size_t i = 0; i < n; i++)
        if (rng_unit(&seed) < 0.03)
            m[i] ^= 1;
    return m;
}

#define SEG_OK(ctx, call)                                                                          \
    do {                                                                                           \
        lc_err e_ = {0};                                                                           \
        lc_err *err = &e_;                                                                         \
        if ((call) != LC_OK)                                                                       \
            fail_msg("%s on %s: %s", #call, gpu_ctx_describe(ctx), lc_err_msg(err));               \
    } while (0)

static void *seg_download(gpu_ctx *ctx, gpu_vol *v)
{
    size_t n = gpu_vol_voxels(v) * (gpu_vol_dtype(v) == GPU_U8 ? 1 : 4);
    void *h = malloc(n);
    assert_non_null(h);
    SEG_OK(ctx, gpu_vol_download(ctx, v, h, err));
    return h;
}

static void same_bytes(const char *what, const char *vname, const void *a, const void *b, size_t n)
{
    if (memcmp(a, b, n) == 0)
        return;
    const uint8_t *x = a, *y = b;
    size_t i = 0;
    while (x[i] == y[i])
        i++;
    fail_msg("%s on %s: byte %zu differs (cpu %d, cuda %d)", what, vname, i, x[i], y[i]);
}

typedef struct seg_case {
    const char *name;
    size_t nx, ny, nz;
    int dense;
} seg_case;

/* Every segmentation kernel on both backends: masks, labels and counts identical, resampled
 * images within 1e-6 of the value range (by design they are identical too). */
static void compare_seg(const fixture *f, const seg_case *sc, uint64_t seed)
{
    static const struct {
        gpu_morph_op op;
        double r;
        double sp[3];
    } morphs[] = {
        {GPU_MORPH_ERODE, 1, {1, 1, 1}},         {GPU_MORPH_DILATE, 1, {1, 1, 1}},
        {GPU_MORPH_OPEN, 2, {1, 1, 1}},          {GPU_MORPH_CLOSE, 3, {1, 1, 1}},
        {GPU_MORPH_DILATE, 5, {0.7, 0.7, 2.5}},  {GPU_MORPH_ERODE, 10, {1, 1, 1}},
        {GPU_MORPH_CLOSE, 4.5, {0.9, 0.6, 1.2}}, {GPU_MORPH_OPEN, 0.5, {1, 1, 1}},
    };
    static const int conns[4] = {6, 26, 4, 8};
    size_t nx = sc->nx, ny = sc->ny, nz = sc->nz, n = nx * ny * nz;
    uint8_t *m = seg_mask(nx, ny, nz, sc->dense, seed);
    vol img = vol_bimodal(nx, ny, nz, seed + 1);
    gpu_ctx *ctx[2] = {f->cpu, f->cuda};
    gpu_vol *vm[2], *vo[2], *vl[2], *vi[2];
    for (int b = 0; b < 2; b++) {
        SEG_OK(ctx[b], gpu_vol_upload(ctx[b], GPU_U8, m, nx, ny, nz, &vm[b], err));
        SEG_OK(ctx[b], gpu_vol_new(ctx[b], GPU_U8, nx, ny, nz, &vo[b], err));
        SEG_OK(ctx[b], gpu_vol_new(ctx[b], GPU_I32, nx, ny, nz, &vl[b], err));
        vi[b] = upload(ctx[b], &img);
    }
    char what[128];
    for (size_t k = 0; k < sizeof(morphs) / sizeof(morphs[0]); k++) {
        void *h[2];
        for (int b = 0; b < 2; b++) {
            SEG_OK(ctx[b], gpu_morphology(ctx[b], morphs[k].op, vm[b], morphs[k].r, morphs[k].sp,
                                          vo[b], err));
            h[b] = seg_download(ctx[b], vo[b]);
        }
        snprintf(what, sizeof(what), "morphology %d radius %g", (int)morphs[k].op, morphs[k].r);
        same_bytes(what, sc->name, h[0], h[1], n);
        free(h[0]);
        free(h[1]);
    }
    for (int c = 0; c < 4; c++) {
        size_t nl[2], kept[2];
        void *h[2], *fh[2], *kh[2];
        uint64_t *sz[2];
        for (int b = 0; b < 2; b++) {
            SEG_OK(ctx[b], gpu_label(ctx[b], vm[b], conns[c], vl[b], &nl[b], err));
            h[b] = seg_download(ctx[b], vl[b]);
        }
        if (nl[0] != nl[1])
            fail_msg("%s: connectivity %d: cpu %zu labels, cuda %zu", sc->name, conns[c], nl[0],
                     nl[1]);
        snprintf(what, sizeof(what), "labels (connectivity %d)", conns[c]);
        same_bytes(what, sc->name, h[0], h[1], n * sizeof(int32_t));
        for (int b = 0; b < 2; b++) {
            sz[b] = malloc((nl[b] + 1) * sizeof(uint64_t));
            assert_non_null(sz[b]);
            SEG_OK(ctx[b], gpu_label_sizes(ctx[b], vl[b], nl[b], sz[b], err));
            SEG_OK(ctx[b], gpu_select_components(ctx[b], vl[b], nl[b], 3, 2, vo[b], &kept[b], err));
            kh[b] = seg_download(ctx[b], vo[b]);
            SEG_OK(ctx[b], gpu_fill_holes(ctx[b], vm[b], conns[c], vo[b], err));
            fh[b] = seg_download(ctx[b], vo[b]);
        }
        snprintf(what, sizeof(what), "sizes (connectivity %d)", conns[c]);
        same_bytes(what, sc->name, sz[0], sz[1], (nl[0] + 1) * sizeof(uint64_t));
        assert_int_equal(kept[0], kept[1]);
        snprintf(what, sizeof(what), "3 largest (connectivity %d)", conns[c]);
        same_bytes(what, sc->name, kh[0], kh[1], n);
        snprintf(what, sizeof(what), "fill holes (connectivity %d)", conns[c]);
        same_bytes(what, sc->name, fh[0], fh[1], n);
        for (int b = 0; b < 2; b++) {
            free(h[b]);
            free(sz[b]);
            free(kh[b]);
            free(fh[b]);
        }
    }
    uint64_t cnt[2];
    for (int b = 0; b < 2; b++)
        SEG_OK(ctx[b], gpu_count_nonzero(ctx[b], vm[b], &cnt[b], err));
    assert_int_equal(cnt[0], cnt[1]);

    /* resampling: down and up, linear and nearest (f32, u8 and i32) */
    static const double sps[2][2][3] = {{{0.7, 0.8, 2.5}, {1.0, 1.1, 1.5}},
                                        {{1.0, 1.0, 3.0}, {0.8, 1.0, 1.0}}};
    float lo, hi;
    SEG_OK(f->cpu, gpu_minmax(f->cpu, vi[0], &lo, &hi, err));
    double tol = 1e-6 * (fabs(lo) + fabs(hi));
    for (int k = 0; k < 2; k++) {
        size_t in_dims[3] = {nx, ny, nz}, d[3];
        SEG_OK(f->cpu, gpu_resample_dims(in_dims, sps[k][0], sps[k][1], d, err));
        size_t on = d[0] * d[1] * d[2];
        float *lin[2];
        void *nu8[2], *ni32[2];
        for (int b = 0; b < 2; b++) {
            gpu_vol *of, *om, *ol;
            SEG_OK(ctx[b], gpu_vol_new(ctx[b], GPU_F32, d[0], d[1], d[2], &of, err));
            SEG_OK(ctx[b], gpu_vol_new(ctx[b], GPU_U8, d[0], d[1], d[2], &om, err));
            SEG_OK(ctx[b], gpu_vol_new(ctx[b], GPU_I32, d[0], d[1], d[2], &ol, err));
            SEG_OK(ctx[b],
                   gpu_resample(ctx[b], vi[b], sps[k][0], sps[k][1], GPU_INTERP_LINEAR, of, err));
            lin[b] = seg_download(ctx[b], of);
            SEG_OK(ctx[b],
                   gpu_resample(ctx[b], vm[b], sps[k][0], sps[k][1], GPU_INTERP_NEAREST, om, err));
            nu8[b] = seg_download(ctx[b], om);
            SEG_OK(ctx[b],
                   gpu_resample(ctx[b], vl[b], sps[k][0], sps[k][1], GPU_INTERP_NEAREST, ol, err));
            ni32[b] = seg_download(ctx[b], ol);
            gpu_vol_free(of);
            gpu_vol_free(om);
            gpu_vol_free(ol);
        }
        size_t exact = 0;
        for (size_t i = 0; i < on; i++) {
            double e = fabs((double)lin[0][i] - lin[1][i]);
            if (!(e <= tol))
                fail_msg("%s: trilinear voxel %zu: cpu %.9g, cuda %.9g (tolerance %g)", sc->name, i,
                         (double)lin[0][i], (double)lin[1][i], tol);
            exact += memcmp(&lin[0][i], &lin[1][i], sizeof(float)) == 0;
        }
        print_message("%s: resampled to %zux%zux%zu: %zu of %zu trilinear voxels bit-identical\n",
                      sc->name, d[0], d[1], d[2], exact, on);
        same_bytes("nearest u8", sc->name, nu8[0], nu8[1], on);
        same_bytes("nearest i32", sc->name, ni32[0], ni32[1], on * 4);
        for (int b = 0; b < 2; b++) {
            free(lin[b]);
            free(nu8[b]);
            free(ni32[b]);
        }
    }
    /* window last: it rewrites the image in place */
    void *wh[2];
    for (int b = 0; b < 2; b++) {
        SEG_OK(ctx[b], gpu_window(ctx[b], vi[b], 40.0f, 400.0f, vi[b], err));
        wh[b] = seg_download(ctx[b], vi[b]);
    }
    same_bytes("window", sc->name, wh[0], wh[1], n * sizeof(float));
    for (int b = 0; b < 2; b++) {
        free(wh[b]);
        gpu_vol_free(vm[b]);
        gpu_vol_free(vo[b]);
        gpu_vol_free(vl[b]);
        gpu_vol_free(vi[b]);
    }
    vol_free(&img);
    free(m);
}

static void test_parity_seg_blobs(void **state)
{
    fixture *f = fix(state, 1);
    const seg_case c = {"blobs 97x89x61", 97, 89, 61, 0};
    compare_seg(f, &c, 21);
}

static void test_parity_seg_wide(void **state)
{
    fixture *f = fix(state, 1);
    /* rows longer than a distance tile (256) and slices of many combine tiles */
    const seg_case c = {"blobs 515x300x9", 515, 300, 9, 0};
    compare_seg(f, &c, 22);
}

static void test_parity_seg_dense(void **state)
{
    fixture *f = fix(state, 1);
    const seg_case c = {"45% random 128x96x80", 128, 96, 80, 1};
    compare_seg(f, &c, 23);
}

static void test_parity_seg_thin(void **state)
{
    fixture *f = fix(state, 1);
    const seg_case cases[3] = {
        {"row 1000x1x1", 1000, 1, 1, 1},
        {"column 1x1x300", 1, 1, 300, 1},
        {"voxel 1x1x1", 1, 1, 1, 1},
    };
    for (int i = 0; i < 3; i++)
        compare_seg(f, &cases[i], 24 + (uint64_t)i);
}

/* The memory limit refuses on CUDA as on the CPU, and warm-up runs there. */
static void test_cuda_limit_and_warm_up(void **state)
{
    fixture *f = fix(state, 1);
    (void)f;
    gpu_ctx *ctx = NULL;
    gpu_vol *v = NULL;
    gpu_mem_stats st;
    lc_err err = {0};
    gpu_ctx_opts o = {.backend = GPU_BACKEND_CUDA, .memory_limit = 1 << 20, .warm_up = 1};
    assert_int_equal(gpu_ctx_open(&o, &ctx, &err), LC_OK);
    assert_int_equal(gpu_ctx_backend(ctx), GPU_BACKEND_CUDA);
    gpu_ctx_memory(ctx, &st);
    assert_int_equal(st.used, 0);
    assert_true(st.peak > 0);
    assert_int_equal(gpu_vol_new(ctx, GPU_F32, 1024, 1024, 1, &v, &err), LC_ERR_TOO_LARGE);
    assert_non_null(strstr(err.msg, "gpu memory limit"));
    assert_int_equal(gpu_vol_new(ctx, GPU_F32, 512, 512, 1, &v, &err), LC_OK);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

/* --- scikit-image -------------------------------------------------------------------------- */

#define SKIMAGE_OTSU                                                                               \
    "import sys, numpy as np\n"                                                                    \
    "from skimage.filters import threshold_otsu\n"                                                 \
    "for p in sys.argv[2:]:\n"                                                                     \
    "    a = np.fromfile(p, dtype='<f4')\n"                                                        \
    "    print(repr(float(threshold_otsu(a, nbins=int(sys.argv[1])))))\n"

static void test_otsu_matches_skimage(void **state)
{
    fixture *f = fix(state, 0);
    if (ts_run("/usr/bin/python3 -c 'import numpy, skimage.filters' 2>/dev/null", NULL) != 0) {
        print_message("python3-skimage is not installed: scikit-image comparison skipped\n");
        skip();
    }
    enum { NV = 5, NBINS = 256 };
    vol vols[NV] = {
        vol_bimodal(64, 64, 16, 11),
        vol_uniform(50, 40, 30, 12),
        vol_sphere(48, 48, 48, 13),
        vol_integers(128, 128, 2, 14),
        vol_alloc("exponential", 100, 100, 5),
    };
    uint64_t seed = 15;
    for (size_t i = 0; i < vols[4].n; i++)
        vols[4].x[i] = (float)(-log(1.0 - rng_unit(&seed)) * 50.0);

    char *dir = ts_tmpdir("gpu-otsu");
    char cmd[4096];
    int off =
        snprintf(cmd, sizeof(cmd), "/usr/bin/python3 -c \"$RADPIPE_SKIMAGE_OTSU\" %d", (int)NBINS);
    for (int i = 0; i < NV; i++) {
        char path[1024];
        snprintf(path, sizeof(path), "%s/vol%d.f32", dir, i);
        /* x86-64 is little-endian: the file is '<f4' as numpy reads it */
        assert_int_equal(ts_write_file(path, vols[i].x, vols[i].n * sizeof(float)), 0);
        off += snprintf(cmd + off, sizeof(cmd) - (size_t)off, " '%s'", path);
    }
    setenv("RADPIPE_SKIMAGE_OTSU", SKIMAGE_OTSU, 1);
    char *out = NULL;
    int st = ts_run(cmd, &out);
    if (st != 0)
        fail_msg("python3 exited with %d: %s", st, out ? out : "");

    char *line = out, *next;
    for (int i = 0; i < NV; i++, line = next) {
        assert_non_null(line);
        double sk = strtod(line, &next);
        if (next == line)
            fail_msg("%s: no threshold from scikit-image in \"%s\"", vols[i].name, line);
        float ours = NAN, lo, hi;
        lc_err err = {0};
        gpu_vol *g = upload(f->cpu, &vols[i]);
        assert_int_equal(gpu_otsu_threshold(f->cpu, g, NBINS, &ours, &err), LC_OK);
        assert_int_equal(gpu_minmax(f->cpu, g, &lo, &hi, &err), LC_OK);
        gpu_vol_free(g);
        double bin = ((double)hi - lo) / NBINS;
        print_message("%-12s ours %.6g, scikit-image %.6g, bin width %.4g\n", vols[i].name,
                      (double)ours, sk, bin);
        if (!(fabs(ours - sk) <= bin * (1 + 1e-6)))
            fail_msg("%s: Otsu %.9g, scikit-image %.9g: more than one bin (%.9g) apart",
                     vols[i].name, (double)ours, sk, bin);
    }
    free(out);
    ts_rmrf(dir);
    free(dir);
    for (int i = 0; i < NV; i++)
        vol_free(&vols[i]);
}

static int group_setup(void **state)
{
    lc_err err = {0};
    fixture *f = calloc(1, sizeof(*f));
    if (!f)
        return -1;
    if (gpu_ctx_new(GPU_BACKEND_CPU, 0, 2, &f->cpu, &err) != LC_OK) {
        fprintf(stderr, "could not open the cpu backend: %s\n", lc_err_msg(&err));
        free(f);
        return -1;
    }
    if (gpu_ctx_new(GPU_BACKEND_CUDA, 0, 0, &f->cuda, &err) != LC_OK)
        print_message("no CUDA device: parity tests skipped (%s)\n", lc_err_msg(&err));
    else
        print_message("comparing %s with %s\n", gpu_ctx_describe(f->cuda),
                      gpu_ctx_describe(f->cpu));
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
        cmocka_unit_test(test_parity_uniform),       cmocka_unit_test(test_parity_bimodal),
        cmocka_unit_test(test_parity_sphere),        cmocka_unit_test(test_parity_integers),
        cmocka_unit_test(test_parity_nan_and_zeros), cmocka_unit_test(test_parity_tiny),
        cmocka_unit_test(test_cuda_errors),          cmocka_unit_test(test_parity_seg_blobs),
        cmocka_unit_test(test_parity_seg_wide),      cmocka_unit_test(test_parity_seg_dense),
        cmocka_unit_test(test_parity_seg_thin),      cmocka_unit_test(test_cuda_limit_and_warm_up),
        cmocka_unit_test(test_otsu_matches_skimage),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
