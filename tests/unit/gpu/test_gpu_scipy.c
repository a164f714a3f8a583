/*
 * test_gpu_scipy.c: the CPU backend's morphology, connected components, component sizes, hole
 * filling and resampling against scikit-image and scipy.ndimage (Debian python3-skimage and
 * python3-scipy, run by tests/unit/gpu/scipy_ref.py) on random volumes: masks and labels must
 * be identical, resampled images within 1e-5 of the value range. Skipped, saying so, when
 * scikit-image or scipy is not installed.
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

#define NX 41
#define NY 37
#define NZ 29
#define NV ((size_t)NX * NY * NZ)

typedef struct fixture {
    gpu_ctx *ctx;
    char *dir;
    uint8_t *mask;
    float *img;
    int skipped;
} fixture;

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

/* Balls and shells (hollow balls: cavities for hole filling), some cut by the border, plus
 * 2% of voxels flipped at random (small components and pinholes). */
static void make_mask(uint8_t *m, uint64_t seed)
{
    memset(m, 0, NV);
    for (int b = 0; b < 14; b++) {
        double cx = rng_unit(&seed) * NX, cy = rng_unit(&seed) * NY, cz = rng_unit(&seed) * NZ;
        double r = 2 + rng_unit(&seed) * 7, inner = b % 3 == 0 ? r * 0.55 : -1;
        for (int z = 0; z < NZ; z++)
            for (int y = 0; y < NY; y++)
                for (int x = 0; x < NX; x++) {
                    double d =
                        sqrt((x - cx) * (x - cx) + (y - cy) * (y - cy) + (z - cz) * (z - cz) * 1.7);
                    if (d <= r && d > inner)
                        m[((size_t)z * NY + y) * NX + x] = 1;
                }
    }
    for (size_t i = 0; i < NV; i++)
        if (rng_unit(&seed) < 0.02)
            m[i] ^= 1;
}

static void make_img(float *x, uint64_t seed)
{
    for (int z = 0; z < NZ; z++)
        for (int y = 0; y < NY; y++)
            for (int i = 0; i < NX; i++)
                x[((size_t)z * NY + y) * NX + i] =
                    (float)(400 * sin(i * 0.3) * cos(y * 0.2) + 30 * z - 500 +
                            50 * (rng_unit(&seed) - 0.5));
}

static void *load(const fixture *f, const char *name, size_t want)
{
    char path[1024];
    size_t len = 0;
    snprintf(path, sizeof(path), "%s/%s", f->dir, name);
    void *buf = ts_read_file(path, &len);
    if (!buf)
        fail_msg("scipy_ref.py wrote no %s", name);
    if (len != want)
        fail_msg("%s holds %zu bytes, expected %zu", name, len, want);
    return buf;
}

static gpu_vol *up(const fixture *f, gpu_dtype t, const void *host)
{
    gpu_vol *v = NULL;
    lc_err err = {0};
    if (gpu_vol_upload(f->ctx, t, host, NX, NY, NZ, &v, &err) != LC_OK)
        fail_msg("upload: %s", lc_err_msg(&err));
    return v;
}

static gpu_vol *blank(const fixture *f, gpu_dtype t, size_t nx, size_t ny, size_t nz)
{
    gpu_vol *v = NULL;
    lc_err err = {0};
    if (gpu_vol_new(f->ctx, t, nx, ny, nz, &v, &err) != LC_OK)
        fail_msg("gpu_vol_new: %s", lc_err_msg(&err));
    return v;
}

/* Fails with the first differing voxel's coordinates. */
static void same_u8(const char *what, const uint8_t *ours, const uint8_t *ref, size_t nx, size_t ny,
                    size_t n)
{
    size_t diff = 0, first = n;
    for (size_t i = 0; i < n; i++)
        if ((ours[i] != 0) != (ref[i] != 0) && diff++ == 0)
            first = i;
    if (diff)
        fail_msg("%s: %zu voxels differ, first at (%zu, %zu, %zu): ours %d, reference %d", what,
                 diff, first % nx, first / nx % ny, first / (nx * ny), ours[first], ref[first]);
}

static void skip_unless_ready(fixture *f)
{
    if (f->skipped)
        skip();
}

static void test_morphology(void **state)
{
    fixture *f = *state;
    skip_unless_ready(f);
    static const char *const ops[4] = {"erode", "dilate", "open", "close"};
    static const gpu_morph_op codes[4] = {GPU_MORPH_ERODE, GPU_MORPH_DILATE, GPU_MORPH_OPEN,
                                          GPU_MORPH_CLOSE};
    static const struct {
        const char *name;
        double radius;
        double sp[3];
        int unit;
    } els[4] = {
        {"r1", 1, {1, 1, 1}, 1},
        {"r2", 2, {1, 1, 1}, 1},
        {"r3", 3, {1, 1, 1}, 0}, /* spacing passed explicitly: the same as NULL */
        {"aniso", 2.5, {0.8, 0.8, 2.0}, 0},
    };
    gpu_vol *in = up(f, GPU_U8, f->mask), *out = blank(f, GPU_U8, NX, NY, NZ);
    uint8_t *ours = malloc(NV);
    lc_err err = {0};
    assert_non_null(ours);
    for (int e = 0; e < 4; e++)
        for (int o = 0; o < 4; o++) {
            char name[64];
            snprintf(name, sizeof(name), "morph_%s_%s.u8", ops[o], els[e].name);
            if (gpu_morphology(f->ctx, codes[o], in, els[e].radius, els[e].unit ? NULL : els[e].sp,
                               out, &err) != LC_OK)
                fail_msg("%s: %s", name, lc_err_msg(&err));
            assert_int_equal(gpu_vol_download(f->ctx, out, ours, &err), LC_OK);
            uint8_t *ref = load(f, name, NV);
            same_u8(name, ours, ref, NX, NY, NV);
            free(ref);
        }
    free(ours);
    gpu_vol_free(out);
    gpu_vol_free(in);
}

static void test_labels_and_sizes(void **state)
{
    fixture *f = *state;
    skip_unless_ready(f);
    static const int conns[4] = {6, 26, 4, 8};
    gpu_vol *in = up(f, GPU_U8, f->mask), *lab = blank(f, GPU_I32, NX, NY, NZ);
    int32_t *ours = malloc(NV * sizeof(int32_t));
    lc_err err = {0};
    assert_non_null(ours);
    for (int c = 0; c < 4; c++) {
        char name[64];
        size_t nl = 0;
        snprintf(name, sizeof(name), "label_%d.i32", conns[c]);
        if (gpu_label(f->ctx, in, conns[c], lab, &nl, &err) != LC_OK)
            fail_msg("%s: %s", name, lc_err_msg(&err));
        assert_int_equal(gpu_vol_download(f->ctx, lab, ours, &err), LC_OK);
        int32_t *ref = load(f, name, NV * sizeof(int32_t));
        int32_t refmax = 0;
        for (size_t i = 0; i < NV; i++) {
            if (ref[i] > refmax)
                refmax = ref[i];
            if (ours[i] != ref[i])
                fail_msg("%s: voxel %zu has label %d, scipy %d", name, i, ours[i], ref[i]);
        }
        assert_int_equal(nl, (size_t)refmax);
        print_message("connectivity %2d: %zu components, identical to scipy.ndimage.label\n",
                      conns[c], nl);
        free(ref);

        uint64_t *sizes = malloc((nl + 1) * sizeof(*sizes));
        assert_non_null(sizes);
        snprintf(name, sizeof(name), "sizes_%d.u64", conns[c]);
        uint64_t *rs = load(f, name, (nl + 1) * sizeof(uint64_t));
        assert_int_equal(gpu_label_sizes(f->ctx, lab, nl, sizes, &err), LC_OK);
        assert_memory_equal(sizes, rs, (nl + 1) * sizeof(uint64_t));
        free(rs);
        free(sizes);
    }
    free(ours);
    gpu_vol_free(lab);
    gpu_vol_free(in);
}

static void test_fill_holes(void **state)
{
    fixture *f = *state;
    skip_unless_ready(f);
    static const int conns[4] = {6, 26, 4, 8};
    gpu_vol *in = up(f, GPU_U8, f->mask), *out = blank(f, GPU_U8, NX, NY, NZ);
    uint8_t *ours = malloc(NV);
    lc_err err = {0};
    assert_non_null(ours);
    for (int c = 0; c < 4; c++) {
        char name[64];
        snprintf(name, sizeof(name), "fill_%d.u8", conns[c]);
        if (gpu_fill_holes(f->ctx, in, conns[c], out, &err) != LC_OK)
            fail_msg("%s: %s", name, lc_err_msg(&err));
        assert_int_equal(gpu_vol_download(f->ctx, out, ours, &err), LC_OK);
        uint8_t *ref = load(f, name, NV);
        size_t filled = 0;
        for (size_t i = 0; i < NV; i++)
            filled += ref[i] && !f->mask[i];
        assert_true(filled > 0); /* the volume has holes to fill, or the test proves nothing */
        same_u8(name, ours, ref, NX, NY, NV);
        print_message("fill holes, connectivity %2d: %zu voxels filled, as scipy\n", conns[c],
                      filled);
        free(ref);
    }
    free(ours);
    gpu_vol_free(out);
    gpu_vol_free(in);
}

static void read_dims(const fixture *f, const char *name, size_t d[3])
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", f->dir, name);
    char *s = ts_read_file(path, NULL);
    assert_non_null(s);
    assert_int_equal(sscanf(s, "%zu %zu %zu", &d[0], &d[1], &d[2]), 3);
    free(s);
}

static void test_resample(void **state)
{
    fixture *f = *state;
    skip_unless_ready(f);
    static const struct {
        const char *name;
        double in[3], out[3];
    } cases[2] = {
        {"down", {0.7, 0.9, 2.5}, {1.0, 1.0, 1.5}},
        {"up", {2.0, 1.0, 3.0}, {1.0, 0.5, 1.0}},
    };
    gpu_vol *img = up(f, GPU_F32, f->img), *mask = up(f, GPU_U8, f->mask);
    lc_err err = {0};
    float lo = 0, hi = 0;
    assert_int_equal(gpu_minmax(f->ctx, img, &lo, &hi, &err), LC_OK);
    double tol = 1e-5 * fmax(fabs(lo), fabs(hi));
    for (int c = 0; c < 2; c++) {
        char name[64];
        size_t want[3], d[3], in_dims[3] = {NX, NY, NZ};
        snprintf(name, sizeof(name), "rs_%s.dims", cases[c].name);
        read_dims(f, name, want);
        assert_int_equal(gpu_resample_dims(in_dims, cases[c].in, cases[c].out, d, &err), LC_OK);
        assert_memory_equal(d, want, sizeof(d));
        size_t n = d[0] * d[1] * d[2];
        gpu_vol *o = blank(f, GPU_F32, d[0], d[1], d[2]), *om = blank(f, GPU_U8, d[0], d[1], d[2]);
        float *ours = malloc(n * sizeof(float));
        uint8_t *oursm = malloc(n);
        assert_non_null(ours);
        assert_non_null(oursm);
        assert_int_equal(
            gpu_resample(f->ctx, img, cases[c].in, cases[c].out, GPU_INTERP_LINEAR, o, &err),
            LC_OK);
        assert_int_equal(
            gpu_resample(f->ctx, mask, cases[c].in, cases[c].out, GPU_INTERP_NEAREST, om, &err),
            LC_OK);
        assert_int_equal(gpu_vol_download(f->ctx, o, ours, &err), LC_OK);
        assert_int_equal(gpu_vol_download(f->ctx, om, oursm, &err), LC_OK);

        snprintf(name, sizeof(name), "rs_%s_linear.f32", cases[c].name);
        float *ref = load(f, name, n * sizeof(float));
        double worst = 0;
        for (size_t i = 0; i < n; i++) {
            double e = fabs((double)ours[i] - ref[i]);
            if (!(e <= tol))
                fail_msg("%s: voxel %zu: ours %.9g, scipy %.9g (tolerance %g)", name, i,
                         (double)ours[i], (double)ref[i], tol);
            if (e > worst)
                worst = e;
        }
        print_message("resample %-4s %zux%zux%zu: trilinear within %.3g of scipy (tolerance %.3g)"
                      ", nearest identical\n",
                      cases[c].name, d[0], d[1], d[2], worst, tol);
        free(ref);
        snprintf(name, sizeof(name), "rs_%s_nearest.u8", cases[c].name);
        uint8_t *refm = load(f, name, n);
        same_u8(name, oursm, refm, d[0], d[1], n);
        free(refm);
        free(ours);
        free(oursm);
        gpu_vol_free(o);
        gpu_vol_free(om);
    }
    gpu_vol_free(mask);
    gpu_vol_free(img);
}

static int group_setup(void **state)
{
    lc_err err = {0};
    fixture *f = calloc(1, sizeof(*f));
    if (!f)
        return -1;
    *state = f;
    if (gpu_ctx_new(GPU_BACKEND_CPU, 0, 2, &f->ctx, &err) != LC_OK) {
        fprintf(stderr, "could not open the cpu backend: %s\n", lc_err_msg(&err));
        return -1;
    }
    if (ts_run("/usr/bin/python3 -c 'import numpy, scipy.ndimage, skimage.morphology' "
               "2>/dev/null",
               NULL) != 0) {
        print_message("python3-skimage or python3-scipy is not installed: scipy comparisons "
                      "skipped\n");
        f->skipped = 1;
        return 0;
    }
    f->mask = malloc(NV);
    f->img = malloc(NV * sizeof(float));
    f->dir = ts_tmpdir("gpu-scipy");
    if (!f->mask || !f->img || !f->dir)
        return -1;
    make_mask(f->mask, 42);
    make_img(f->img, 43);
    char path[1024], cmd[2048];
    snprintf(path, sizeof(path), "%s/mask.u8", f->dir);
    if (ts_write_file(path, f->mask, NV))
        return -1;
    snprintf(path, sizeof(path), "%s/img.f32", f->dir);
    if (ts_write_file(path, f->img, NV * sizeof(float)))
        return -1;
    const char *root = getenv("RADPIPE_TEST_ROOT");
    snprintf(cmd, sizeof(cmd), "/usr/bin/python3 '%s/tests/unit/gpu/scipy_ref.py' '%s' %d %d %d",
             root ? root : ".", f->dir, NX, NY, NZ);
    char *out = NULL;
    int st = ts_run(cmd, &out);
    if (st != 0) {
        fprintf(stderr, "scipy_ref.py exited with %d: %s\n", st, out ? out : "");
        free(out);
        return -1;
    }
    free(out);
    return 0;
}

static int group_teardown(void **state)
{
    fixture *f = *state;
    if (f->dir)
        ts_rmrf(f->dir);
    free(f->dir);
    free(f->mask);
    free(f->img);
    gpu_ctx_free(f->ctx);
    free(f);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_morphology),
        cmocka_unit_test(test_labels_and_sizes),
        cmocka_unit_test(test_fill_holes),
        cmocka_unit_test(test_resample),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
