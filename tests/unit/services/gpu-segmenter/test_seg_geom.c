/*
 * test_seg_geom.c: seg_geom_stack on hand-made frame geometry: order by position along the
 * normal whatever the input order, sagittal stacks, 4-D series (order in time by temporal
 * position, else instance number), a gantry-tilted stack, variable spacing (accepted and
 * reported) against missing slices (an error), and every inconsistency reported with the
 * instances it concerns. Pure functions: no database, no files.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "seg.h"

static const double AXIAL[6] = {1, 0, 0, 0, 1, 0};

static seg_frame_in frame(const char *uid, double x, double y, double z, const double iop[6])
{
    seg_frame_in f = {.sop_uid = uid, .rows = 8, .cols = 8, .has_ipp = 1, .has_iop = 1};
    f.ipp[0] = x;
    f.ipp[1] = y;
    f.ipp[2] = z;
    memcpy(f.iop, iop, sizeof(f.iop));
    return f;
}

static void expect_error(const seg_frame_in *f, size_t n, const char *needle)
{
    seg_stack st;
    lc_err e;
    lc_rc rc = seg_geom_stack(f, n, &st, &e);
    if (rc != LC_ERR_INVALID || !strstr(e.msg, needle))
        fail_msg("got %s \"%s\", expected \"%s\"", lc_strerror(rc), rc ? e.msg : "", needle);
    assert_null(st.order);
}

static void test_order_by_position(void **state)
{
    (void)state;
    seg_frame_in f[5];
    const double z[5] = {4, 0, 8, 2, 6}; /* scrambled input order */
    char uids[5][8];
    for (int i = 0; i < 5; i++) {
        snprintf(uids[i], sizeof(uids[i]), "1.%d", i);
        f[i] = frame(uids[i], 10, 20, z[i], AXIAL);
        f[i].instance_number = 5 - i; /* lies about the order */
    }
    seg_stack st;
    lc_err e;
    assert_int_equal(seg_geom_stack(f, 5, &st, &e), LC_OK);
    assert_int_equal(st.nz, 5);
    assert_int_equal(st.nt, 1);
    const size_t want[5] = {1, 3, 0, 4, 2};
    for (int k = 0; k < 5; k++)
        assert_int_equal(st.order[k], want[k]);
    assert_true(st.uniform);
    assert_true(fabs(st.step[2] - 2) < 1e-12 && fabs(st.step[0]) < 1e-12);
    assert_true(fabs(st.normal[2] - 1) < 1e-12);
    free(st.order);
}

static void test_sagittal_descending(void **state)
{
    (void)state;
    static const double sag[6] = {0, 1, 0, 0, 0, -1}; /* normal = row x col = (-1, 0, 0) */
    seg_frame_in f[3] = {frame("a", -4.8, 0, 0, sag), frame("b", 4.8, 0, 0, sag),
                         frame("c", 0, 0, 0, sag)};
    seg_stack st;
    lc_err e;
    assert_int_equal(seg_geom_stack(f, 3, &st, &e), LC_OK);
    /* increasing along the normal means decreasing x: b (4.8), c (0), a (-4.8) */
    assert_int_equal(st.order[0], 1);
    assert_int_equal(st.order[1], 2);
    assert_int_equal(st.order[2], 0);
    assert_true(fabs(st.step[0] + 4.8) < 1e-12);
    free(st.order);
}

static void test_four_d(void **state)
{
    (void)state;
    seg_frame_in f[6];
    /* 3 positions x 2 time points, input scrambled; time by temporal index */
    const double z[6] = {5, 0, 10, 0, 10, 5};
    const long t[6] = {2, 2, 1, 1, 2, 1};
    for (int i = 0; i < 6; i++) {
        f[i] = frame("x", 0, 0, z[i], AXIAL);
        f[i].temporal = t[i];
        f[i].instance_number = 100 - i;
    }
    seg_stack st;
    lc_err e;
    assert_int_equal(seg_geom_stack(f, 6, &st, &e), LC_OK);
    assert_int_equal(st.nz, 3);
    assert_int_equal(st.nt, 2);
    const size_t want[6] = {3, 5, 2, /* t = 1 */ 1, 0, 4 /* t = 2 */};
    for (int k = 0; k < 6; k++)
        assert_int_equal(st.order[k], want[k]);
    free(st.order);
    /* without temporal positions the instance number orders the repeats */
    for (int i = 0; i < 6; i++) {
        f[i].temporal = 0;
        f[i].instance_number = i;
    }
    assert_int_equal(seg_geom_stack(f, 6, &st, &e), LC_OK);
    const size_t want2[6] = {1, 0, 2, 3, 5, 4};
    for (int k = 0; k < 6; k++)
        assert_int_equal(st.order[k], want2[k]);
    free(st.order);
    /* one position short of a time point: not a 4-D series */
    expect_error(f, 5, "duplicate slice positions");
    /* the same time point twice at one position */
    for (int i = 0; i < 6; i++)
        f[i].temporal = 1;
    expect_error(f, 6, "temporal position 1");
}

static void test_gantry_tilt(void **state)
{
    (void)state;
    /* GE's 18.5 degree tilt: columns tilted, positions straight along z */
    double c = cos(18.5 * M_PI / 180), s = sin(18.5 * M_PI / 180);
    const double tilt[6] = {1, 0, 0, 0, c, -s};
    seg_frame_in f[4];
    for (int i = 0; i < 4; i++)
        f[i] = frame("t", -125, -123.54, 5.836 + 4.22 * i, tilt);
    seg_stack st;
    lc_err e;
    assert_int_equal(seg_geom_stack(f, 4, &st, &e), LC_OK);
    assert_true(st.uniform);
    /* the step follows the positions (z), not the normal: the affine keeps the tilt */
    assert_true(fabs(st.step[2] - 4.22) < 1e-9 && fabs(st.step[1]) < 1e-9);
    assert_true(fabs(st.gap_min - 4.22 * c) < 1e-9);
    free(st.order);
}

static void test_variable_spacing_accepted(void **state)
{
    (void)state;
    const double z[6] = {0, 4, 8, 9.08, 16.08, 23.08};
    seg_frame_in f[6];
    for (int i = 0; i < 6; i++)
        f[i] = frame("v", 0, 0, z[i], AXIAL);
    seg_stack st;
    lc_err e;
    assert_int_equal(seg_geom_stack(f, 6, &st, &e), LC_OK);
    assert_false(st.uniform);
    assert_true(fabs(st.gap_min - 1.08) < 1e-9 && fabs(st.gap_max - 7) < 1e-9);
    assert_true(fabs(st.step[2] - 4) < 1e-9); /* the first gap, as dcm2niix */
    free(st.order);
}

static void test_missing_slices(void **state)
{
    (void)state;
    const double z[5] = {0, 2, 4, 8, 10};
    seg_frame_in f[5];
    char uids[5][8];
    for (int i = 0; i < 5; i++) {
        snprintf(uids[i], sizeof(uids[i]), "9.%d", i);
        f[i] = frame(uids[i], 0, 0, z[i], AXIAL);
    }
    expect_error(f, 5, "missing slices: 4.000 mm between instance 9.2 and instance 9.3");
    expect_error(f, 5, "(about 1 slices missing)");
}

static void test_inconsistent(void **state)
{
    (void)state;
    seg_frame_in f[3] = {frame("1.1", 0, 0, 0, AXIAL), frame("1.2", 0, 0, 1, AXIAL),
                         frame("1.3", 0, 0, 2, AXIAL)};
    f[1].rows = 16;
    expect_error(f, 3,
                 "mixed slice sizes in the series: 8x8 (instance 1.1) and 8x16 (instance 1.2)");
    f[1].rows = 8;
    static const double other[6] = {0, 1, 0, 0, 0, -1};
    memcpy(f[2].iop, other, sizeof(other));
    expect_error(f, 3, "mixed orientations in the series: instance 1.1 and instance 1.3");
    memcpy(f[2].iop, AXIAL, sizeof(AXIAL));
    f[1].has_ipp = 0;
    expect_error(f, 3, "instance 1.2 lacks ImagePositionPatient");
    f[1].has_ipp = 1;
    f[1].ipp[0] = 5; /* a slice from another stack */
    expect_error(f, 3, "not on one line: instance 1.2 is 5.00 mm off");
    f[1].ipp[0] = 0;
    f[1].ipp[2] = 0; /* the same position twice, no third dimension */
    f[2].ipp[2] = 0;
    expect_error(f, 3, "duplicate slice positions");
    f[2].ipp[2] = 2; /* two frames of one object at one position, one elsewhere */
    f[1].frame = 2;
    f[1].sop_uid = "1.1";
    expect_error(f, 3, "instance 1.1 and instance 1.1 frame 2 are both at 0.000 mm");
    static const double bad[6] = {1, 0, 0, 1, 0, 0};
    seg_frame_in g[2] = {frame("2.1", 0, 0, 0, bad), frame("2.2", 0, 0, 1, bad)};
    expect_error(g, 2, "not two orthogonal unit vectors");
    expect_error(g, 0, "no image frames");
}

static void test_single_frame(void **state)
{
    (void)state;
    seg_frame_in f = frame("1", 3, 4, 5, AXIAL);
    f.has_ipp = f.has_iop = 0; /* a lone image may lack geometry */
    seg_stack st;
    lc_err e;
    assert_int_equal(seg_geom_stack(&f, 1, &st, &e), LC_OK);
    assert_int_equal(st.nz, 1);
    assert_int_equal(st.order[0], 0);
    free(st.order);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_order_by_position),
        cmocka_unit_test(test_sagittal_descending),
        cmocka_unit_test(test_four_d),
        cmocka_unit_test(test_gantry_tilt),
        cmocka_unit_test(test_variable_spacing_accepted),
        cmocka_unit_test(test_missing_slices),
        cmocka_unit_test(test_inconsistent),
        cmocka_unit_test(test_single_frame),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
