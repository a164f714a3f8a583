/*
 * test_gpu_seg_ref.c: the segmentation kernels of gpu_seg.h on the CPU reference, on volumes
 * small enough to check by hand: window, count, morphology (element shapes, borders,
 * anisotropic spacing), connected components (numbering, 2D vs 3D), sizes and filtering, hole
 * filling, resampling (sizes, positions, ties), the memory limit, warm-up, results that do not
 * depend on the thread count, and the argument checks.
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

#define IDX(x, y, z, nx, ny) (((size_t)(z) * (ny) + (y)) * (nx) + (x))

static gpu_ctx *cpu_ctx(int threads)
{
    gpu_ctx *ctx = NULL;
    lc_err err = {0};
    if (gpu_ctx_new(GPU_BACKEND_CPU, 0, threads, &ctx, &err) != LC_OK)
        fail_msg("gpu_ctx_new(cpu): %s", lc_err_msg(&err));
    return ctx;
}

static gpu_vol *up(gpu_ctx *ctx, gpu_dtype t, const void *host, size_t nx, size_t ny, size_t nz)
{
    gpu_vol *v = NULL;
    lc_err err = {0};
    if (gpu_vol_upload(ctx, t, host, nx, ny, nz, &v, &err) != LC_OK)
        fail_msg("gpu_vol_upload: %s", lc_err_msg(&err));
    return v;
}

static gpu_vol *blank(gpu_ctx *ctx, gpu_dtype t, size_t nx, size_t ny, size_t nz)
{
    gpu_vol *v = NULL;
    lc_err err = {0};
    if (gpu_vol_new(ctx, t, nx, ny, nz, &v, &err) != LC_OK)
        fail_msg("gpu_vol_new: %s", lc_err_msg(&err));
    return v;
}

static void down(gpu_ctx *ctx, const gpu_vol *v, void *host)
{
    lc_err err = {0};
    if (gpu_vol_download(ctx, v, host, &err) != LC_OK)
        fail_msg("gpu_vol_download: %s", lc_err_msg(&err));
}

static size_t count_u8(const uint8_t *m, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += m[i] != 0;
    return c;
}

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* --- window and count ---------------------------------------------------------------------- */

static void test_window(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    /* level 40, width 400: [-160, 240] maps to [0, 1] */
    float x[8] = {-1000, -160, -60, 40, 140, 240, 3000, NAN}, y[8];
    gpu_vol *v = up(ctx, GPU_F32, x, 8, 1, 1);
    lc_err err = {0};
    assert_int_equal(gpu_window(ctx, v, 40, 400, v, &err), LC_OK); /* in place */
    down(ctx, v, y);
    const float want[7] = {0, 0, 0.25f, 0.5f, 0.75f, 1, 1};
    for (int i = 0; i < 7; i++)
        if (fabsf(y[i] - want[i]) > 1e-6f)
            fail_msg("window of %g: %.9g, expected %g", (double)x[i], (double)y[i],
                     (double)want[i]);
    assert_true(isnan(y[7]));
    /* bad windows and types */
    assert_int_equal(gpu_window(ctx, v, 40, 0, v, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "window"));
    assert_int_equal(gpu_window(ctx, v, 40, -5, v, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_window(ctx, v, NAN, 5, v, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_window(ctx, v, 0, INFINITY, v, &err), LC_ERR_INVALID);
    gpu_vol *m = blank(ctx, GPU_U8, 8, 1, 1), *w = blank(ctx, GPU_F32, 4, 2, 1);
    assert_int_equal(gpu_window(ctx, v, 40, 400, m, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_window(ctx, v, 40, 400, w, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "4x2x1"));
    gpu_vol_free(w);
    gpu_vol_free(m);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

static void test_count(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    uint8_t m[5 * 4 * 3] = {0};
    uint64_t c = 99;
    m[0] = 1;
    m[7] = 255; /* any non-zero byte counts */
    m[59] = 1;
    gpu_vol *v = up(ctx, GPU_U8, m, 5, 4, 3);
    assert_int_equal(gpu_count_nonzero(ctx, v, &c, NULL), LC_OK);
    assert_int_equal(c, 3);
    assert_int_equal(gpu_count_nonzero(ctx, v, NULL, NULL), LC_ERR_INVALID);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

/* --- morphology ---------------------------------------------------------------------------- */

/* One voxel at the centre of a 9x9x9 volume, dilated: the output is the element itself. */
static size_t element_size(gpu_ctx *ctx, double radius, const double *sp, uint8_t *out)
{
    uint8_t m[729] = {0};
    m[IDX(4, 4, 4, 9, 9)] = 1;
    gpu_vol *v = up(ctx, GPU_U8, m, 9, 9, 9), *o = blank(ctx, GPU_U8, 9, 9, 9);
    lc_err err = {0};
    if (gpu_morphology(ctx, GPU_MORPH_DILATE, v, radius, sp, o, &err) != LC_OK)
        fail_msg("dilate: %s", lc_err_msg(&err));
    down(ctx, o, out);
    gpu_vol_free(o);
    gpu_vol_free(v);
    return count_u8(out, 729);
}

static void test_morph_elements(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    uint8_t e[729];
    /* radius 0 and radius under a voxel: the voxel itself */
    assert_int_equal(element_size(ctx, 0, NULL, e), 1);
    assert_int_equal(element_size(ctx, 0.9, NULL, e), 1);
    /* radius 1: the 6-neighbourhood (skimage ball(1)) */
    assert_int_equal(element_size(ctx, 1, NULL, e), 7);
    assert_int_equal(e[IDX(5, 4, 4, 9, 9)], 1);
    assert_int_equal(e[IDX(5, 5, 4, 9, 9)], 0);
    /* sqrt(2) (edges, on the surface: the slack keeps them), sqrt(3) (corners) */
    assert_int_equal(element_size(ctx, sqrt(2.0), NULL, e), 19);
    assert_int_equal(element_size(ctx, sqrt(3.0), NULL, e), 27);
    /* radius 2: ball(2) has 33 voxels; radius 3: 123 */
    assert_int_equal(element_size(ctx, 2, NULL, e), 33);
    assert_int_equal(element_size(ctx, 3, NULL, e), 123);
    /* anisotropic: 2 mm on 1 x 1 x 3 mm voxels is the in-plane disk x^2 + y^2 <= 4 */
    const double sp[3] = {1, 1, 3};
    assert_int_equal(element_size(ctx, 2, sp, e), 13);
    assert_int_equal(e[IDX(4, 4, 5, 9, 9)], 0);
    assert_int_equal(e[IDX(6, 4, 4, 9, 9)], 1);
    /* 3 mm on the same voxels reaches one slice up and down, there only the centre: the disk
     * x^2 + y^2 <= 9 (29 voxels) and 2 */
    const double sp2[3] = {1, 1, 3};
    assert_int_equal(element_size(ctx, 3, sp2, e), 29 + 2);
    /* 0.5 x 1 x 1 mm: a 1 mm radius reaches two voxels in x */
    const double sp3[3] = {0.5, 1, 1};
    assert_int_equal(element_size(ctx, 1, sp3, e), 7 + 2);
    assert_int_equal(e[IDX(6, 4, 4, 9, 9)], 1);
    gpu_ctx_free(ctx);
}

static void test_morph_ops(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    enum { N = 9 };
    uint8_t m[N * N * N] = {0}, o[N * N * N];
    lc_err err = {0};
    /* a 5x5x5 cube at [2, 6]^3, plus a lone voxel at (0, 0, 8) */
    for (int z = 2; z <= 6; z++)
        for (int y = 2; y <= 6; y++)
            for (int x = 2; x <= 6; x++)
                m[IDX(x, y, z, N, N)] = 1;
    m[IDX(0, 0, 8, N, N)] = 1;
    gpu_vol *v = up(ctx, GPU_U8, m, N, N, N), *r = blank(ctx, GPU_U8, N, N, N);

    /* erosion by the 6-neighbourhood: the 3x3x3 core; the lone voxel goes */
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, v, 1, NULL, r, &err), LC_OK);
    down(ctx, r, o);
    assert_int_equal(count_u8(o, sizeof(o)), 27);
    assert_int_equal(o[IDX(3, 3, 3, N, N)], 1);
    assert_int_equal(o[IDX(2, 2, 2, N, N)], 0);
    /* dilation: the cube grows by the cross (125 + 6 faces of 25 = 275), the lone voxel
     * becomes its cross cut by the border (4 voxels inside) */
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_DILATE, v, 1, NULL, r, &err), LC_OK);
    down(ctx, r, o);
    assert_int_equal(count_u8(o, sizeof(o)), 275 + 4);
    /* opening by the cross keeps the union of the crosses inside the cube: it loses the lone
     * voxel and the cube's 12 edges (3 voxels each) and 8 corners: 125 - 36 - 8 */
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_OPEN, v, 1, NULL, r, &err), LC_OK);
    down(ctx, r, o);
    assert_int_equal(count_u8(o, sizeof(o)), 81);
    assert_int_equal(o[IDX(2, 4, 4, N, N)], 1);
    assert_int_equal(o[IDX(2, 2, 4, N, N)], 0);
    assert_int_equal(o[IDX(0, 0, 8, N, N)], 0);
    /* with a radius sqrt(3) (the full 3x3x3 cube) opening keeps exactly the 5x5x5 cube too */
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_OPEN, v, sqrt(3.0), NULL, r, &err), LC_OK);
    down(ctx, r, o);
    assert_int_equal(count_u8(o, sizeof(o)), 125);

    /* closing fills a one-voxel gap between two slabs */
    memset(m, 0, sizeof(m));
    for (int z = 0; z < N; z++)
        for (int y = 0; y < N; y++)
            for (int x = 0; x < N; x++)
                m[IDX(x, y, z, N, N)] = x != 4;
    gpu_vol_free(v);
    v = up(ctx, GPU_U8, m, N, N, N);
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_CLOSE, v, 1, NULL, r, &err), LC_OK);
    down(ctx, r, o);
    assert_int_equal(count_u8(o, sizeof(o)), N * N * N);

    /* borders: erosion does not eat into a full volume (outside counts as foreground);
     * dilation does not grow from outside (an empty volume stays empty) */
    memset(m, 1, sizeof(m));
    gpu_vol_free(v);
    v = up(ctx, GPU_U8, m, N, N, N);
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, v, 3, NULL, v, &err), LC_OK);
    down(ctx, v, o);
    assert_int_equal(count_u8(o, sizeof(o)), N * N * N);
    memset(m, 0, sizeof(m));
    gpu_vol_free(v);
    v = up(ctx, GPU_U8, m, N, N, N);
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_DILATE, v, 3, NULL, v, &err), LC_OK);
    down(ctx, v, o);
    assert_int_equal(count_u8(o, sizeof(o)), 0);
    gpu_vol_free(r);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

static void test_morph_errors(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(1);
    gpu_vol *m = blank(ctx, GPU_U8, 4, 4, 4), *f = blank(ctx, GPU_F32, 4, 4, 4);
    gpu_vol *small = blank(ctx, GPU_U8, 4, 4, 3);
    lc_err err = {0};
    const double zero[3] = {1, 0, 1}, nan3[3] = {1, NAN, 1}, fine[3] = {0.1, 1, 1};
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, m, -1, NULL, m, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "radius"));
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, m, NAN, NULL, m, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, m, 1, zero, m, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "spacing"));
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, m, 1, nan3, m, &err), LC_ERR_INVALID);
    /* 10 mm on 0.1 mm voxels reaches 100 voxels: over GPU_MORPH_MAX_REACH */
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, m, 10, fine, m, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "reaches more than 64"));
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, m, 64, NULL, m, &err), LC_OK);
    assert_int_equal(gpu_morphology(ctx, (gpu_morph_op)9, m, 1, NULL, m, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, f, 1, NULL, m, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, m, 1, NULL, f, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, m, 1, NULL, small, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, NULL, 1, NULL, m, &err), LC_ERR_INVALID);
    gpu_vol_free(small);
    gpu_vol_free(f);
    gpu_vol_free(m);
    gpu_ctx_free(ctx);
}

/* --- connected components ------------------------------------------------------------------ */

static void test_label_by_hand(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    enum { NX = 4, NY = 3, NZ = 2 };
    /* z = 0:       z = 1:
     *   . . . A      . . . .
     *   B . . A      . . C .
     *   B . . .      . D . .
     * A and B are separate in every connectivity; C touches A's (3,1,0) by an edge (26 and
     * in no 2D one: other slice); D touches C by an edge in the slice (8, 26) and B's
     * (0,2,0) by an edge across slices (26). */
    uint8_t m[NX * NY * NZ] = {0};
    m[IDX(3, 0, 0, NX, NY)] = m[IDX(3, 1, 0, NX, NY)] = 1; /* A */
    m[IDX(0, 1, 0, NX, NY)] = m[IDX(0, 2, 0, NX, NY)] = 1; /* B */
    m[IDX(2, 1, 1, NX, NY)] = 1;                           /* C */
    m[IDX(1, 2, 1, NX, NY)] = 1;                           /* D */
    gpu_vol *v = up(ctx, GPU_U8, m, NX, NY, NZ), *l = blank(ctx, GPU_I32, NX, NY, NZ);
    int32_t lab[NX * NY * NZ];
    size_t nl = 0;
    lc_err err = {0};

    /* 6: A=1 (first voxel index 3), B=2 (index 4), C=3, D=4 */
    assert_int_equal(gpu_label(ctx, v, 6, l, &nl, &err), LC_OK);
    assert_int_equal(nl, 4);
    down(ctx, l, lab);
    assert_int_equal(lab[IDX(3, 0, 0, NX, NY)], 1);
    assert_int_equal(lab[IDX(3, 1, 0, NX, NY)], 1);
    assert_int_equal(lab[IDX(0, 1, 0, NX, NY)], 2);
    assert_int_equal(lab[IDX(0, 2, 0, NX, NY)], 2);
    assert_int_equal(lab[IDX(2, 1, 1, NX, NY)], 3);
    assert_int_equal(lab[IDX(1, 2, 1, NX, NY)], 4);
    assert_int_equal(lab[0], 0);
    /* 26: everything joins through C and D: one component */
    assert_int_equal(gpu_label(ctx, v, 26, l, &nl, &err), LC_OK);
    assert_int_equal(nl, 1);
    down(ctx, l, lab);
    for (size_t i = 0; i < sizeof(m); i++)
        assert_int_equal(lab[i], m[i] ? 1 : 0);
    /* 8 (per slice): A, B, and C+D */
    assert_int_equal(gpu_label(ctx, v, 8, l, &nl, &err), LC_OK);
    assert_int_equal(nl, 3);
    down(ctx, l, lab);
    assert_int_equal(lab[IDX(2, 1, 1, NX, NY)], 3);
    assert_int_equal(lab[IDX(1, 2, 1, NX, NY)], 3);
    /* 4 (per slice): as 6 here */
    assert_int_equal(gpu_label(ctx, v, 4, l, &nl, &err), LC_OK);
    assert_int_equal(nl, 4);

    /* sizes: background 18, then 2, 2, 1, 1 */
    uint64_t sz[5];
    assert_int_equal(gpu_label(ctx, v, 6, l, &nl, &err), LC_OK);
    assert_int_equal(gpu_label_sizes(ctx, l, nl, sz, &err), LC_OK);
    const uint64_t want[5] = {18, 2, 2, 1, 1};
    assert_memory_equal(sz, want, sizeof(want));

    /* a 2D connectivity never joins slices: a column along z is nz components */
    uint8_t col[1 * 1 * 5] = {1, 1, 1, 1, 1};
    gpu_vol *cv = up(ctx, GPU_U8, col, 1, 1, 5), *cl = blank(ctx, GPU_I32, 1, 1, 5);
    assert_int_equal(gpu_label(ctx, cv, 4, cl, &nl, &err), LC_OK);
    assert_int_equal(nl, 5);
    assert_int_equal(gpu_label(ctx, cv, 6, cl, &nl, &err), LC_OK);
    assert_int_equal(nl, 1);
    /* empty mask: no labels */
    memset(col, 0, sizeof(col));
    gpu_vol_free(cv);
    cv = up(ctx, GPU_U8, col, 1, 1, 5);
    assert_int_equal(gpu_label(ctx, cv, 26, cl, &nl, &err), LC_OK);
    assert_int_equal(nl, 0);

    /* errors */
    assert_int_equal(gpu_label(ctx, v, 5, l, &nl, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "connectivity 5"));
    assert_int_equal(gpu_label(ctx, v, 6, l, NULL, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_label(ctx, v, 6, v, &nl, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_label(ctx, v, 6, cl, &nl, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_label_sizes(ctx, l, 4, NULL, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_label_sizes(ctx, v, 4, sz, &err), LC_ERR_INVALID);
    /* a label count too small for the volume's labels */
    assert_int_equal(gpu_label_sizes(ctx, l, 2, sz, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "outside 0..2"));
    assert_int_equal(gpu_label_sizes(ctx, l, 1000, sz, &err), LC_ERR_INVALID);
    gpu_vol_free(cl);
    gpu_vol_free(cv);
    gpu_vol_free(l);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

static void test_select_components(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    /* a 12x1x1 row: runs of 3 (label 1), 1 (2), 3 (3), 2 (4), separated by gaps:
     * 111.2.333.44 */
    uint8_t m[12] = {1, 1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1}, o[12];
    gpu_vol *v = up(ctx, GPU_U8, m, 12, 1, 1), *l = blank(ctx, GPU_I32, 12, 1, 1);
    gpu_vol *r = blank(ctx, GPU_U8, 12, 1, 1);
    size_t nl = 0, kept = 0;
    lc_err err = {0};
    assert_int_equal(gpu_label(ctx, v, 6, l, &nl, &err), LC_OK);
    assert_int_equal(nl, 4);
    /* the largest: a tie between labels 1 and 3 (3 voxels), label 1 comes first */
    assert_int_equal(gpu_select_components(ctx, l, nl, 1, 0, r, &kept, &err), LC_OK);
    assert_int_equal(kept, 1);
    down(ctx, r, o);
    const uint8_t k1[12] = {1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    assert_memory_equal(o, k1, 12);
    /* the three largest: 1, 3 and 4 */
    assert_int_equal(gpu_select_components(ctx, l, nl, 3, 0, r, &kept, &err), LC_OK);
    assert_int_equal(kept, 3);
    down(ctx, r, o);
    const uint8_t k3[12] = {1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1};
    assert_memory_equal(o, k3, 12);
    /* at least 2 voxels, all of them: the same; at least 4: none */
    assert_int_equal(gpu_select_components(ctx, l, nl, 0, 2, r, &kept, &err), LC_OK);
    assert_int_equal(kept, 3);
    assert_int_equal(gpu_select_components(ctx, l, nl, 0, 4, r, &kept, &err), LC_OK);
    assert_int_equal(kept, 0);
    down(ctx, r, o);
    assert_int_equal(count_u8(o, 12), 0);
    /* keep_largest on the mask directly, in place */
    assert_int_equal(gpu_keep_largest(ctx, v, 26, 2, 0, v, &kept, &err), LC_OK);
    assert_int_equal(kept, 2);
    down(ctx, v, o);
    const uint8_t k2[12] = {1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0};
    assert_memory_equal(o, k2, 12);
    /* errors */
    assert_int_equal(gpu_select_components(ctx, l, 99, 1, 0, r, &kept, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_select_components(ctx, r, nl, 1, 0, r, &kept, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_keep_largest(ctx, v, 7, 1, 0, v, &kept, &err), LC_ERR_INVALID);
    gpu_vol_free(r);
    gpu_vol_free(l);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

/* --- hole filling -------------------------------------------------------------------------- */

static void test_fill_holes(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    enum { N = 7 };
    uint8_t m[N * N * N] = {0}, o[N * N * N];
    lc_err err = {0};
    /* a hollow 5x5x5 box (walls 1 voxel) at [1, 5]^3: a 3x3x3 cavity */
    for (int z = 1; z <= 5; z++)
        for (int y = 1; y <= 5; y++)
            for (int x = 1; x <= 5; x++)
                m[IDX(x, y, z, N, N)] = x == 1 || x == 5 || y == 1 || y == 5 || z == 1 || z == 5;
    gpu_vol *v = up(ctx, GPU_U8, m, N, N, N), *r = blank(ctx, GPU_U8, N, N, N);
    assert_int_equal(gpu_fill_holes(ctx, v, 6, r, &err), LC_OK);
    down(ctx, r, o);
    assert_int_equal(count_u8(o, sizeof(o)), 125);
    assert_int_equal(o[IDX(3, 3, 3, N, N)], 1);
    /* a hole in the top wall opens the cavity: nothing to fill in 3D (6 or 26) */
    m[IDX(3, 3, 5, N, N)] = 0;
    gpu_vol_free(v);
    v = up(ctx, GPU_U8, m, N, N, N);
    assert_int_equal(gpu_fill_holes(ctx, v, 6, r, &err), LC_OK);
    down(ctx, r, o);
    assert_int_equal(count_u8(o, sizeof(o)), 124 - 27);
    /* ...but slice by slice the cavity's slices z = 2..4 are holes, and the top wall's pinhole
     * too: 27 + 1 filled */
    assert_int_equal(gpu_fill_holes(ctx, v, 4, r, &err), LC_OK);
    down(ctx, r, o);
    assert_int_equal(count_u8(o, sizeof(o)), 125);
    /* a diagonal leak: a cavity that reaches the outside only through an edge is a hole for
     * 6-connected background and open for 26 */
    memset(m, 0, sizeof(m));
    for (int z = 0; z < N; z++)
        for (int y = 1; y <= 5; y++)
            for (int x = 1; x <= 5; x++)
                m[IDX(x, y, z, N, N)] = x == 1 || x == 5 || y == 1 || y == 5;
    /* a tube along z: open at both ends in 3D, closed in every slice */
    gpu_vol_free(v);
    v = up(ctx, GPU_U8, m, N, N, N);
    assert_int_equal(gpu_fill_holes(ctx, v, 6, r, &err), LC_OK);
    down(ctx, r, o);
    assert_int_equal(count_u8(o, sizeof(o)), 16 * N);
    assert_int_equal(gpu_fill_holes(ctx, v, 8, r, &err), LC_OK);
    down(ctx, r, o);
    assert_int_equal(count_u8(o, sizeof(o)), 25 * N);
    /* in one slice, a square ring whose corner is missing: 4-connected background cannot leave
     * through the corner (filled), 8-connected can (not filled) */
    m[IDX(1, 1, 3, N, N)] = 0;
    gpu_vol_free(v);
    v = up(ctx, GPU_U8, m, N, N, N);
    assert_int_equal(gpu_fill_holes(ctx, v, 4, r, &err), LC_OK);
    down(ctx, r, o);
    assert_int_equal(o[IDX(3, 3, 3, N, N)], 1);
    assert_int_equal(gpu_fill_holes(ctx, v, 8, r, &err), LC_OK);
    down(ctx, r, o);
    assert_int_equal(o[IDX(3, 3, 3, N, N)], 0);
    assert_int_equal(o[IDX(3, 3, 2, N, N)], 1);
    /* in place, and errors */
    assert_int_equal(gpu_fill_holes(ctx, v, 8, v, &err), LC_OK);
    assert_int_equal(gpu_fill_holes(ctx, v, 3, r, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "connectivity 3"));
    gpu_vol_free(r);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

/* --- resampling ---------------------------------------------------------------------------- */

static void test_resample_by_hand(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(2);
    lc_err err = {0};
    size_t in_dims[3] = {4, 1, 1}, d[3];
    const double sp1[3] = {1, 1, 1}, sp_half[3] = {0.5, 1, 1}, sp2[3] = {2, 1, 1};
    /* sizes: round(n * in / out), at least 1 */
    assert_int_equal(gpu_resample_dims(in_dims, sp1, sp_half, d, &err), LC_OK);
    assert_int_equal(d[0], 8);
    assert_int_equal(d[1], 1);
    assert_int_equal(gpu_resample_dims(in_dims, sp1, sp2, d, &err), LC_OK);
    assert_int_equal(d[0], 2);
    size_t five[3] = {5, 1, 1};
    assert_int_equal(gpu_resample_dims(five, sp1, sp2, d, &err), LC_OK);
    assert_int_equal(d[0], 3); /* 2.5 rounds half away from zero */
    const double huge[3] = {1000, 1, 1};
    assert_int_equal(gpu_resample_dims(in_dims, sp1, huge, d, &err), LC_OK);
    assert_int_equal(d[0], 1);
    const double tiny[3] = {1e-9, 1e-9, 1e-9};
    assert_int_equal(gpu_resample_dims(in_dims, sp1, tiny, d, &err), LC_ERR_TOO_LARGE);
    const double bad[3] = {1, 0, 1};
    assert_int_equal(gpu_resample_dims(in_dims, sp1, bad, d, &err), LC_ERR_INVALID);

    /* [0, 10, 20, 30] at spacing 1 onto 0.5: samples at 0, 0.5, ..., 3.5 (the last clamps) */
    float x[4] = {0, 10, 20, 30}, y[8];
    gpu_vol *v = up(ctx, GPU_F32, x, 4, 1, 1), *o = blank(ctx, GPU_F32, 8, 1, 1);
    assert_int_equal(gpu_resample(ctx, v, sp1, sp_half, GPU_INTERP_LINEAR, o, &err), LC_OK);
    down(ctx, o, y);
    const float lin[8] = {0, 5, 10, 15, 20, 25, 30, 30};
    assert_memory_equal(y, lin, sizeof(lin));
    /* nearest: floor(p + 0.5), ties up */
    assert_int_equal(gpu_resample(ctx, v, sp1, sp_half, GPU_INTERP_NEAREST, o, &err), LC_OK);
    down(ctx, o, y);
    const float near[8] = {0, 10, 10, 20, 20, 30, 30, 30};
    assert_memory_equal(y, near, sizeof(near));
    /* downsampling by 2: voxels 0 and 2 */
    gpu_vol *o2 = blank(ctx, GPU_F32, 2, 1, 1);
    assert_int_equal(gpu_resample(ctx, v, sp1, sp2, GPU_INTERP_LINEAR, o2, &err), LC_OK);
    down(ctx, o2, y);
    assert_true(y[0] == 0 && y[1] == 20);

    /* a 2x2x2 cube of labels upsampled along z only: trilinear blend and label copies */
    float c[8] = {0, 1, 2, 3, 4, 5, 6, 7}, cz[2 * 2 * 4];
    int32_t lab[8] = {1, 2, 3, 4, 5, 6, 7, 8}, labz[16];
    const double zin[3] = {1, 1, 2}, zout[3] = {1, 1, 1};
    gpu_vol *cv = up(ctx, GPU_F32, c, 2, 2, 2), *co = blank(ctx, GPU_F32, 2, 2, 4);
    gpu_vol *lv = up(ctx, GPU_I32, lab, 2, 2, 2), *lo = blank(ctx, GPU_I32, 2, 2, 4);
    assert_int_equal(gpu_resample(ctx, cv, zin, zout, GPU_INTERP_LINEAR, co, &err), LC_OK);
    down(ctx, co, cz);
    /* slices at z = 0, 0.5, 1, 1 (clamped) */
    for (int i = 0; i < 4; i++) {
        assert_true(cz[i] == c[i]);
        assert_true(cz[4 + i] == (c[i] + c[4 + i]) / 2);
        assert_true(cz[8 + i] == c[4 + i]);
        assert_true(cz[12 + i] == c[4 + i]);
    }
    assert_int_equal(gpu_resample(ctx, lv, zin, zout, GPU_INTERP_NEAREST, lo, &err), LC_OK);
    down(ctx, lo, labz);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(labz[i], lab[i]);
        assert_int_equal(labz[4 + i], lab[4 + i]); /* 0.5 rounds up */
        assert_int_equal(labz[12 + i], lab[4 + i]);
    }
    /* errors: linear on labels, output is input, type mismatch, bad spacing */
    assert_int_equal(gpu_resample(ctx, lv, zin, zout, GPU_INTERP_LINEAR, lo, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "nearest"));
    assert_int_equal(gpu_resample(ctx, cv, zin, zout, GPU_INTERP_LINEAR, cv, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_resample(ctx, cv, zin, zout, GPU_INTERP_NEAREST, lo, &err),
                     LC_ERR_INVALID);
    assert_int_equal(gpu_resample(ctx, cv, zin, bad, GPU_INTERP_LINEAR, co, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_resample(ctx, cv, NULL, zout, GPU_INTERP_LINEAR, co, &err),
                     LC_ERR_INVALID);
    assert_int_equal(gpu_resample(ctx, cv, zin, zout, (gpu_interp)7, co, &err), LC_ERR_INVALID);
    gpu_vol_free(lo);
    gpu_vol_free(lv);
    gpu_vol_free(co);
    gpu_vol_free(cv);
    gpu_vol_free(o2);
    gpu_vol_free(o);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

/* --- components against a brute-force flood fill ------------------------------------------- */

/* Neighbour offsets of a connectivity: 6 and 26 in 3D, 4 and 8 within a slice. */
static int offsets(int conn, int d[26][3])
{
    int k = 0;
    for (int dz = -1; dz <= 1; dz++)
        for (int dy = -1; dy <= 1; dy++)
            for (int dx = -1; dx <= 1; dx++) {
                int a = abs(dx) + abs(dy) + abs(dz);
                if (a == 0 || ((conn == 4 || conn == 8) && dz != 0) ||
                    ((conn == 6 || conn == 4) && a != 1))
                    continue;
                d[k][0] = dx;
                d[k][1] = dy;
                d[k][2] = dz;
                k++;
            }
    return k;
}

/* Writes v into lab for start and every voxel with fg == want connected to it; stack: room for
 * every voxel (each is pushed once). */
static void flood(const uint8_t *fg, uint8_t want, int32_t *lab, int32_t v, size_t start, size_t nx,
                  size_t ny, size_t nz, int conn, size_t *stack)
{
    int d[26][3], nd = offsets(conn, d);
    size_t top = 0;
    lab[start] = v;
    stack[top++] = start;
    while (top) {
        size_t i = stack[--top];
        long x = (long)(i % nx), y = (long)(i / nx % ny), z = (long)(i / (nx * ny));
        for (int k = 0; k < nd; k++) {
            long a = x + d[k][0], b = y + d[k][1], c = z + d[k][2];
            if (a < 0 || b < 0 || c < 0 || a >= (long)nx || b >= (long)ny || c >= (long)nz)
                continue;
            size_t j = IDX(a, b, c, nx, ny);
            if (fg[j] == want && lab[j] != v) {
                lab[j] = v;
                stack[top++] = j;
            }
        }
    }
}

/* scipy.ndimage.label by definition: components numbered by first voxel in raster order. */
static size_t brute_label(const uint8_t *fg, size_t nx, size_t ny, size_t nz, int conn,
                          int32_t *lab)
{
    size_t n = nx * ny * nz, nl = 0;
    size_t *stack = malloc(n * sizeof(*stack));
    assert_non_null(stack);
    memset(lab, 0, n * sizeof(*lab));
    for (size_t i = 0; i < n; i++)
        if (fg[i] && !lab[i])
            flood(fg, 1, lab, (int32_t)++nl, i, nx, ny, nz, conn, stack);
    free(stack);
    return nl;
}

/* binary_fill_holes by definition: background reached from the border stays background. */
static void brute_fill(const uint8_t *fg, size_t nx, size_t ny, size_t nz, int conn, uint8_t *out)
{
    size_t n = nx * ny * nz;
    int planar = conn == 4 || conn == 8;
    int32_t *mark = calloc(n, sizeof(*mark));
    size_t *stack = malloc(n * sizeof(*stack));
    assert_non_null(mark);
    assert_non_null(stack);
    for (size_t z = 0; z < nz; z++)
        for (size_t y = 0; y < ny; y++)
            for (size_t x = 0; x < nx; x++) {
                size_t i = IDX(x, y, z, nx, ny);
                int edge = x == 0 || y == 0 || x + 1 == nx || y + 1 == ny ||
                           (!planar && (z == 0 || z + 1 == nz));
                if (edge && !fg[i] && !mark[i])
                    flood(fg, 0, mark, 1, i, nx, ny, nz, conn, stack);
            }
    for (size_t i = 0; i < n; i++)
        out[i] = fg[i] || !mark[i];
    free(stack);
    free(mark);
}

/* The components gpu_select_components keeps, from brute-force labels. */
static void brute_keep(const int32_t *lab, size_t n, size_t nl, size_t k, uint64_t min_voxels,
                       uint8_t *out, size_t *kept)
{
    uint64_t *sz = calloc(nl + 1, sizeof(*sz));
    uint8_t *keep = calloc(nl + 1, 1);
    assert_non_null(sz);
    assert_non_null(keep);
    for (size_t i = 0; i < n; i++)
        sz[lab[i]]++;
    *kept = 0;
    /* the largest first, ties to the smaller label, k times (0: all that are big enough) */
    for (size_t round = 0; k == 0 || round < k; round++) {
        size_t best = 0;
        for (size_t l = 1; l <= nl; l++)
            if (!keep[l] && sz[l] >= min_voxels && sz[l] > 0 && (!best || sz[l] > sz[best]))
                best = l;
        if (!best)
            break;
        keep[best] = 1;
        ++*kept;
    }
    for (size_t i = 0; i < n; i++)
        out[i] = keep[lab[i]];
    free(keep);
    free(sz);
}

static void check_components(gpu_ctx *ctx, const uint8_t *m, size_t nx, size_t ny, size_t nz)
{
    static const int conns[4] = {6, 26, 4, 8};
    size_t n = nx * ny * nz, nl = 0, kept = 0, want_kept = 0;
    uint8_t *fg = malloc(n), *want = malloc(n), *got = malloc(n);
    int32_t *lab = malloc(n * sizeof(*lab)), *ref = malloc(n * sizeof(*ref));
    gpu_vol *v = up(ctx, GPU_U8, m, nx, ny, nz), *o = blank(ctx, GPU_U8, nx, ny, nz);
    gpu_vol *l = blank(ctx, GPU_I32, nx, ny, nz);
    lc_err err = {0};
    assert_non_null(fg);
    assert_non_null(want);
    assert_non_null(got);
    assert_non_null(lab);
    assert_non_null(ref);
    for (size_t i = 0; i < n; i++)
        fg[i] = m[i] != 0;
    for (int c = 0; c < 4; c++) {
        size_t ref_nl = brute_label(fg, nx, ny, nz, conns[c], ref);
        assert_int_equal(gpu_label(ctx, v, conns[c], l, &nl, &err), LC_OK);
        down(ctx, l, lab);
        assert_int_equal(nl, ref_nl);
        assert_memory_equal(lab, ref, n * sizeof(*lab));
        uint64_t *sz = calloc(nl + 1, sizeof(*sz)), *ref_sz = calloc(nl + 1, sizeof(*sz));
        assert_non_null(sz);
        assert_non_null(ref_sz);
        for (size_t i = 0; i < n; i++)
            ref_sz[ref[i]]++;
        assert_int_equal(gpu_label_sizes(ctx, l, nl, sz, &err), LC_OK);
        assert_memory_equal(sz, ref_sz, (nl + 1) * sizeof(*sz));
        free(ref_sz);
        free(sz);
        brute_keep(ref, n, ref_nl, 2, 0, want, &want_kept);
        assert_int_equal(gpu_select_components(ctx, l, nl, 2, 0, o, &kept, &err), LC_OK);
        down(ctx, o, got);
        assert_int_equal(kept, want_kept);
        assert_memory_equal(got, want, n);
        static const size_t ks[3] = {1, 2, 0};
        static const uint64_t mins[3] = {0, 3, 2};
        for (int t = 0; t < 3; t++) {
            brute_keep(ref, n, ref_nl, ks[t], mins[t], want, &want_kept);
            assert_int_equal(gpu_keep_largest(ctx, v, conns[c], ks[t], mins[t], o, &kept, &err),
                             LC_OK);
            down(ctx, o, got);
            assert_int_equal(kept, want_kept);
            assert_memory_equal(got, want, n);
        }
        brute_fill(fg, nx, ny, nz, conns[c], want);
        assert_int_equal(gpu_fill_holes(ctx, v, conns[c], o, &err), LC_OK);
        down(ctx, o, got);
        assert_memory_equal(got, want, n);
    }
    gpu_vol_free(l);
    gpu_vol_free(o);
    gpu_vol_free(v);
    free(ref);
    free(lab);
    free(got);
    free(want);
    free(fg);
}

/* Label volumes with long runs of one label (the CPU takes 16 equal labels at once), labels
 * out of range among them. */
static void test_label_tables_long_runs(void **state)
{
    (void)state;
    gpu_ctx *ctx = cpu_ctx(1);
    enum { N = 100 };
    int32_t L[N];
    uint8_t o[N];
    uint64_t sz[8];
    size_t kept = 0;
    lc_err err = {0};
    for (int i = 0; i < N; i++)
        L[i] = i < 20 ? 1 : i < 40 ? 0 : i < 70 ? 2 : 7;
    gpu_vol *l = up(ctx, GPU_I32, L, N, 1, 1), *r = blank(ctx, GPU_U8, N, 1, 1);
    assert_int_equal(gpu_label_sizes(ctx, l, 7, sz, &err), LC_OK);
    const uint64_t want[8] = {20, 20, 30, 0, 0, 0, 0, 30};
    assert_memory_equal(sz, want, sizeof(want));
    /* 2 and 7 tie at 30: 2 wins */
    assert_int_equal(gpu_select_components(ctx, l, 7, 1, 0, r, &kept, &err), LC_OK);
    assert_int_equal(kept, 1);
    down(ctx, r, o);
    for (int i = 0; i < N; i++)
        assert_int_equal(o[i], i >= 40 && i < 70);
    gpu_vol_free(l);
    for (int i = 70; i < N; i++)
        L[i] = -3;
    l = up(ctx, GPU_I32, L, N, 1, 1);
    assert_int_equal(gpu_label_sizes(ctx, l, 7, sz, &err), LC_ERR_INVALID);
    assert_non_null(strstr(err.msg, "30 voxels"));
    gpu_vol_free(r);
    gpu_vol_free(l);
    gpu_ctx_free(ctx);
}

/* Labels, keep-largest and hole filling against flood fills, on rows shorter and longer than
 * the 64-voxel blocks the CPU finds runs in (runs that end at and across block edges), single
 * rows and columns, any non-zero byte as foreground, densities from sparse to nearly full. */
static void test_components_brute_force(void **state)
{
    (void)state;
    static const size_t dims[][3] = {{130, 7, 5}, {64, 4, 3},  {65, 3, 4}, {1, 50, 3},
                                     {200, 1, 1}, {129, 9, 2}, {3, 3, 1},  {17, 11, 13}};
    static const int density[] = {10, 45, 70, 95};
    uint64_t seed = 11;
    for (int threads = 1; threads <= 3; threads += 2) {
        gpu_ctx *ctx = cpu_ctx(threads);
        for (size_t d = 0; d < sizeof(dims) / sizeof(dims[0]); d++) {
            size_t nx = dims[d][0], ny = dims[d][1], nz = dims[d][2], n = nx * ny * nz;
            uint8_t *m = malloc(n);
            assert_non_null(m);
            for (size_t p = 0; p < sizeof(density) / sizeof(density[0]); p++) {
                for (size_t i = 0; i < n; i++)
                    m[i] = rng_next(&seed) % 100 < (uint64_t)density[p]
                               ? (uint8_t)(1 + rng_next(&seed) % 255)
                               : 0;
                check_components(ctx, m, nx, ny, nz);
            }
            /* stripes: runs of 63, 64 and 65 voxels, and a hollow box per slice */
            for (size_t i = 0; i < n; i++) {
                size_t x = i % nx, y = i / nx % ny;
                m[i] = (x + 3 * y) % 67 < 64 - y % 3;
            }
            check_components(ctx, m, nx, ny, nz);
            for (size_t i = 0; i < n; i++) {
                size_t x = i % nx, y = i / nx % ny;
                m[i] = x == 1 || y == 1 || x + 2 == nx || y + 2 == ny;
            }
            check_components(ctx, m, nx, ny, nz);
            free(m);
        }
        gpu_ctx_free(ctx);
    }
}

/* --- contexts: memory limit, warm-up --------------------------------------------------------- */

static void test_memory_limit(void **state)
{
    (void)state;
    gpu_ctx *ctx = NULL;
    gpu_vol *a = NULL, *b = NULL;
    gpu_mem_stats st;
    lc_err err = {0};
    gpu_ctx_opts o = {.backend = GPU_BACKEND_CPU, .cpu_threads = 2, .memory_limit = 3000};
    assert_int_equal(gpu_ctx_open(&o, &ctx, &err), LC_OK);
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, 10, 10, 10, &a, &err), LC_OK); /* 1000 bytes */
    gpu_ctx_memory(ctx, &st);
    assert_int_equal(st.used, 1000);
    assert_int_equal(st.limit, 3000);
    /* 4000 more bytes do not fit: refused, said so, nothing allocated */
    assert_int_equal(gpu_vol_new(ctx, GPU_F32, 10, 10, 10, &b, &err), LC_ERR_TOO_LARGE);
    assert_null(b);
    assert_non_null(strstr(err.msg, "gpu memory limit"));
    assert_non_null(strstr(err.msg, "4000 more bytes"));
    assert_non_null(strstr(err.msg, "1000 in use"));
    gpu_ctx_memory(ctx, &st);
    assert_int_equal(st.used, 1000);
    /* kernel scratch counts too: morphology needs one more mask (1000 bytes); hole filling of
     * the empty a labels its background by runs, 404 bytes of row offsets and 1200 for its
     * 100 runs (a label volume on CUDA: 4000) */
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, 10, 10, 10, &b, &err), LC_OK);
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_CLOSE, a, 1, NULL, b, &err), LC_OK);
    gpu_ctx_memory(ctx, &st);
    assert_int_equal(st.used, 2000);
    assert_int_equal(st.peak, 3000);
    assert_int_equal(gpu_fill_holes(ctx, a, 6, b, &err), LC_ERR_TOO_LARGE);
    gpu_vol *c = NULL;
    assert_int_equal(gpu_vol_new(ctx, GPU_U8, 10, 10, 10, &c, &err), LC_OK);
    assert_int_equal(gpu_morphology(ctx, GPU_MORPH_ERODE, a, 1, NULL, b, &err), LC_ERR_TOO_LARGE);
    gpu_vol_free(c);
    gpu_vol_free(b);
    gpu_vol_free(a);
    gpu_ctx_memory(ctx, &st);
    assert_int_equal(st.used, 0);
    gpu_ctx_free(ctx);

    /* no limit: 0 */
    o.memory_limit = 0;
    assert_int_equal(gpu_ctx_open(&o, &ctx, &err), LC_OK);
    assert_int_equal(gpu_vol_new(ctx, GPU_F32, 100, 100, 10, &a, &err), LC_OK);
    gpu_vol_free(a);
    gpu_ctx_free(ctx);
    assert_int_equal(gpu_ctx_open(NULL, &ctx, &err), LC_ERR_INVALID);
}

static void test_warm_up(void **state)
{
    (void)state;
    gpu_ctx *ctx = NULL;
    gpu_mem_stats st;
    lc_err err = {0};
    gpu_ctx_opts o = {.backend = GPU_BACKEND_CPU, .warm_up = 1};
    assert_int_equal(gpu_ctx_open(&o, &ctx, &err), LC_OK);
    gpu_ctx_memory(ctx, &st);
    assert_int_equal(st.used, 0);      /* everything freed */
    assert_true(st.peak > 100 * 1024); /* but the kernels did run */
    assert_true(st.peak < 400 * 1024); /* within what gpu_seg.h promises */
    assert_int_equal(gpu_ctx_warm_up(ctx, &err), LC_OK);
    gpu_ctx_free(ctx);
    /* a limit too small for the warm-up fails the open, saying why */
    o.memory_limit = 4096;
    assert_int_equal(gpu_ctx_open(&o, &ctx, &err), LC_ERR_TOO_LARGE);
    assert_null(ctx);
    assert_non_null(strstr(err.msg, "gpu memory limit"));
}

/* --- thread count -------------------------------------------------------------------------- */

typedef struct outs {
    uint8_t *morph[4], *fill[2];
    int32_t *lab[2];
    size_t nl[2];
    float *rs;
    size_t rs_n;
} outs;

static void run_all(int threads, const uint8_t *m, const float *img, size_t nx, size_t ny,
                    size_t nz, outs *r)
{
    gpu_ctx *ctx = cpu_ctx(threads);
    size_t n = nx * ny * nz;
    lc_err err = {0};
    const double sp[3] = {0.8, 0.8, 1.5}, sp_out[3] = {1.1, 0.7, 1.0};
    gpu_vol *v = up(ctx, GPU_U8, m, nx, ny, nz), *o = blank(ctx, GPU_U8, nx, ny, nz);
    gpu_vol *l = blank(ctx, GPU_I32, nx, ny, nz);
    for (int op = 0; op < 4; op++) {
        r->morph[op] = malloc(n);
        assert_non_null(r->morph[op]);
        assert_int_equal(
            gpu_morphology(ctx, (gpu_morph_op)(GPU_MORPH_ERODE + op), v, 2.0, sp, o, &err), LC_OK);
        down(ctx, o, r->morph[op]);
    }
    static const int conns[2] = {6, 26};
    for (int c = 0; c < 2; c++) {
        r->lab[c] = malloc(n * sizeof(int32_t));
        r->fill[c] = malloc(n);
        assert_non_null(r->lab[c]);
        assert_non_null(r->fill[c]);
        assert_int_equal(gpu_label(ctx, v, conns[c], l, &r->nl[c], &err), LC_OK);
        down(ctx, l, r->lab[c]);
        assert_int_equal(gpu_fill_holes(ctx, v, conns[c] == 6 ? 6 : 4, o, &err), LC_OK);
        down(ctx, o, r->fill[c]);
    }
    gpu_vol *f = up(ctx, GPU_F32, img, nx, ny, nz), *fo = NULL;
    size_t dims[3] = {nx, ny, nz}, od[3];
    assert_int_equal(gpu_resample_dims(dims, sp, sp_out, od, &err), LC_OK);
    fo = blank(ctx, GPU_F32, od[0], od[1], od[2]);
    assert_int_equal(gpu_resample(ctx, f, sp, sp_out, GPU_INTERP_LINEAR, fo, &err), LC_OK);
    r->rs_n = od[0] * od[1] * od[2];
    r->rs = malloc(r->rs_n * sizeof(float));
    assert_non_null(r->rs);
    down(ctx, fo, r->rs);
    gpu_vol_free(fo);
    gpu_vol_free(f);
    gpu_vol_free(l);
    gpu_vol_free(o);
    gpu_vol_free(v);
    gpu_ctx_free(ctx);
}

static void outs_free(outs *r)
{
    for (int i = 0; i < 4; i++)
        free(r->morph[i]);
    for (int i = 0; i < 2; i++) {
        free(r->lab[i]);
        free(r->fill[i]);
    }
    free(r->rs);
}

static void test_thread_count_independent(void **state)
{
    (void)state;
    /* 64 slices so 7 threads get several slabs each, with components crossing every slab
     * boundary */
    enum { NX = 48, NY = 40, NZ = 64 };
    size_t n = (size_t)NX * NY * NZ;
    uint8_t *m = malloc(n);
    float *img = malloc(n * sizeof(float));
    uint64_t seed = 7;
    assert_non_null(m);
    assert_non_null(img);
    for (size_t i = 0; i < n; i++) {
        m[i] = rng_next(&seed) % 100 < 45;
        img[i] = (float)(rng_next(&seed) % 2000) - 1000.0f;
    }
    outs a = {0}, b = {0}, c = {0};
    run_all(1, m, img, NX, NY, NZ, &a);
    run_all(3, m, img, NX, NY, NZ, &b);
    run_all(7, m, img, NX, NY, NZ, &c);
    for (int i = 0; i < 4; i++) {
        assert_memory_equal(a.morph[i], b.morph[i], n);
        assert_memory_equal(a.morph[i], c.morph[i], n);
    }
    for (int i = 0; i < 2; i++) {
        assert_int_equal(a.nl[i], b.nl[i]);
        assert_int_equal(a.nl[i], c.nl[i]);
        assert_memory_equal(a.lab[i], b.lab[i], n * sizeof(int32_t));
        assert_memory_equal(a.lab[i], c.lab[i], n * sizeof(int32_t));
        assert_memory_equal(a.fill[i], b.fill[i], n);
        assert_memory_equal(a.fill[i], c.fill[i], n);
    }
    /* 45% foreground is over the percolation thresholds (0.31 for 6, 0.10 for 26): a giant
     * component spans every slab boundary, next to many small ones */
    assert_true(a.nl[0] > 100);
    size_t *sz = calloc(a.nl[1] + 1, sizeof(*sz)), big = 0;
    assert_non_null(sz);
    for (size_t i = 0; i < n; i++)
        sz[a.lab[1][i]]++;
    for (size_t l = 1; l <= a.nl[1]; l++)
        big = sz[l] > big ? sz[l] : big;
    assert_true(big > n / 3);
    free(sz);
    assert_int_equal(a.rs_n, b.rs_n);
    assert_memory_equal(a.rs, b.rs, a.rs_n * sizeof(float));
    assert_memory_equal(a.rs, c.rs, a.rs_n * sizeof(float));
    outs_free(&a);
    outs_free(&b);
    outs_free(&c);
    free(img);
    free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_window),
        cmocka_unit_test(test_count),
        cmocka_unit_test(test_morph_elements),
        cmocka_unit_test(test_morph_ops),
        cmocka_unit_test(test_morph_errors),
        cmocka_unit_test(test_label_by_hand),
        cmocka_unit_test(test_select_components),
        cmocka_unit_test(test_fill_holes),
        cmocka_unit_test(test_components_brute_force),
        cmocka_unit_test(test_label_tables_long_runs),
        cmocka_unit_test(test_resample_by_hand),
        cmocka_unit_test(test_memory_limit),
        cmocka_unit_test(test_warm_up),
        cmocka_unit_test(test_thread_count_independent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
