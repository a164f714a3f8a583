/*
 * test_dicom_seg.c: lc/dicom_seg.h on real files: per-frame geometry of classic and enhanced
 * (multi-frame) objects from the shared corpus and the bundled data, hostile input refused
 * without a crash, UIDs, and DICOM SEG writing checked three ways: read back by lc_dicom
 * (frames decode to exactly the labels), by dicom3tools' dciodvfy (no errors) and by DCMTK's
 * dcmdump (the references to the sources).
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "lc/dicom_seg.h"
#include "ts.h"

static char *sample(const char *rel)
{
    const char *s = ts_samples_dir();
    if (!s)
        return NULL;
    char *p = NULL;
    if (asprintf(&p, "%s/%s", s, rel) < 0)
        abort();
    return p;
}

static void test_classic_frames(void **state)
{
    (void)state;
    lc_err e;
    lc_dicom_image_info *in = NULL;
    char *p = ts_data("series/mr-4slice/rle/IM-0001-0002-0001.dcm");
    assert_int_equal(lc_dicom_read_image_info(p, &in, &e), LC_OK);
    assert_int_equal(in->nframes, 1);
    assert_false(in->enhanced);
    assert_true(in->frames[0].has_ipp && in->frames[0].has_iop && in->frames[0].has_spacing);
    for (int i = 0; i < 3; i++)
        assert_true(in->frames[0].ipp[i] == in->hdr->ipp[i]);
    assert_string_equal(in->mr_acquisition_type, "3D");
    assert_true(in->frames[0].rescale_slope == 1 && in->frames[0].rescale_intercept == 0);
    lc_dicom_image_info_free(in);
    free(p);

    char *ge = sample("series/ct-ge-head-gantry-tilt/01.dcm");
    if (ge) {
        assert_int_equal(lc_dicom_read_image_info(ge, &in, &e), LC_OK);
        assert_true(fabs(in->gantry_tilt - 18.5) < 1e-9);
        assert_non_null(in->frame_of_reference_uid);
        assert_string_equal(in->manufacturer, "GE MEDICAL SYSTEMS");
        assert_true(in->frames[0].rescale_intercept == in->hdr->rescale_intercept);
        lc_dicom_image_info_free(in);
        free(ge);
    }
}

static void test_enhanced_frames(void **state)
{
    (void)state;
    lc_err e;
    lc_dicom_image_info *in = NULL;
    char *p = sample("multiframe/siemens_xa10_enhanced_mr_6fr.dcm");
    if (!p) {
        fprintf(stderr, "shared samples missing: enhanced objects skipped\n");
        skip();
    }
    assert_int_equal(lc_dicom_read_image_info(p, &in, &e), LC_OK);
    assert_int_equal(in->nframes, 6);
    assert_true(in->enhanced);
    for (int k = 0; k < 6; k++) {
        assert_true(in->frames[k].has_ipp && in->frames[k].has_iop);
        assert_true(fabs(in->frames[k].pixel_spacing[0] - 3.375) < 1e-9);
        if (k) /* per-frame positions, 2.4 mm apart */
            assert_true(fabs(in->frames[k].ipp[2] - in->frames[k - 1].ipp[2] - 2.4) < 1e-3);
    }
    lc_dicom_image_info_free(in);
    free(p);

    /* Enhanced CT: the rescale lives in the functional groups */
    p = sample("multiframe/eCT_Supplemental.dcm");
    assert_int_equal(lc_dicom_read_image_info(p, &in, &e), LC_OK);
    assert_int_equal(in->nframes, 2);
    assert_true(in->frames[1].rescale_intercept == -1024 && in->frames[1].rescale_slope == 1);
    assert_true(fabs(in->frames[1].ipp[2] - in->frames[0].ipp[2] - 10) < 1e-6);
    lc_dicom_image_info_free(in);
    free(p);

    /* the same object little and big endian gives the same frames */
    lc_dicom_image_info *a = NULL, *b = NULL;
    char *pa = sample("multiframe/emri_small.dcm"),
         *pb = sample("multiframe/emri_small_big_endian.dcm");
    assert_int_equal(lc_dicom_read_image_info(pa, &a, &e), LC_OK);
    assert_int_equal(lc_dicom_read_image_info(pb, &b, &e), LC_OK);
    assert_int_equal(a->nframes, 10);
    assert_int_equal(b->nframes, 10);
    assert_memory_equal(a->frames, b->frames, 10 * sizeof(lc_dicom_frame_geom));
    lc_dicom_image_info_free(a);
    lc_dicom_image_info_free(b);
    free(pa);
    free(pb);
}

static void test_hostile_input(void **state)
{
    (void)state;
    lc_err e;
    lc_dicom_image_info *in = (lc_dicom_image_info *)1;
    char *p = ts_data("README.md"); /* not DICOM at all */
    assert_int_equal(lc_dicom_read_image_info(p, &in, &e), LC_ERR_DICOM);
    assert_null(in);
    free(p);
    assert_int_equal(lc_dicom_read_image_info("/nonexistent/x.dcm", &in, &e), LC_ERR_NOT_FOUND);
    /* every file of the bundled and shared malformed corpora: an answer, never a crash */
    char *mal = ts_data("malformed");
    char **mf = ts_list_files(mal);
    for (char **f = mf; f && *f; f++)
        if (lc_dicom_read_image_info(*f, &in, &e) == LC_OK)
            lc_dicom_image_info_free(in);
    ts_strv_free(mf);
    free(mal);
    const char *s = ts_samples_dir();
    if (s) {
        char dir[600];
        snprintf(dir, sizeof(dir), "%s/malformed", s);
        char **files = ts_list_files(dir);
        for (char **f = files; f && *f; f++) {
            if (lc_dicom_read_image_info(*f, &in, &e) == LC_OK)
                lc_dicom_image_info_free(in);
        }
        ts_strv_free(files);
    }
}

static void test_uids(void **state)
{
    (void)state;
    char a[65], b[65];
    for (int i = 0; i < 100; i++) {
        lc_dicom_seg_new_uid(a);
        lc_dicom_seg_new_uid(b);
        assert_true(lc_dicom_uid_valid(a));
        assert_int_equal(strncmp(a, "2.25.", 5), 0);
        assert_true(strlen(a) <= 44);
        assert_string_not_equal(a, b);
    }
}

static void test_seg_write(void **state)
{
    (void)state;
    lc_err e;
    enum {
        R = 12,
        C = 16,
        NS = 3
    }; /* GDCM 3.0.21 decodes 1-bit rows as if byte-padded: keep C a multiple of 8 */
    char *src = ts_data("series/mr-4slice/rle/IM-0001-0001-0001.dcm");
    lc_dicom_header *ref = NULL;
    assert_int_equal(lc_dicom_read_header(src, &ref, &e), LC_OK);
    lc_dicom_seg_source s[NS];
    char uids[NS][65];
    for (int i = 0; i < NS; i++) {
        snprintf(uids[i], sizeof(uids[i]), "1.2.826.0.1.3680043.9.7777.50.%d", i + 1);
        s[i] = (lc_dicom_seg_source){.sop_class_uid = "1.2.840.10008.5.1.4.1.1.4",
                                     .sop_instance_uid = uids[i],
                                     .frame_number = 0,
                                     .ipp = {0, 0, (double)i * 2.5}};
    }
    uint8_t labels[NS * R * C];
    for (int i = 0; i < NS * R * C; i++)
        labels[i] = (uint8_t)((i * 7 + i / 5) % 3); /* 0, 1, 2 in an irregular pattern */
    lc_dicom_seg_segment segs[2] = {
        {"Body",
         "test",
         {"123037004", "SCT", "Anatomical Structure"},
         {"38266002", "SCT", "Entire body"},
         {255, 200, 0}},
        {"Tissue",
         "test",
         {"85756007", "SCT", "Tissue"},
         {"85756007", "SCT", "Tissue"},
         {0, 0, 255}},
    };
    lc_dicom_seg_spec spec = {.ref = ref,
                              .source_series_uid = "1.2.826.0.1.3680043.9.7777.50",
                              .rows = R,
                              .columns = C,
                              .nsources = NS,
                              .sources = s,
                              .iop = {1, 0, 0, 0, 1, 0},
                              .pixel_spacing = {0.5, 0.75},
                              .slice_thickness = 2.5,
                              .segments = segs,
                              .nsegments = 2,
                              .labels = labels,
                              .series_description = "test segmentation",
                              .series_number = 7,
                              .content_label = "TEST"};
    void *buf = NULL;
    size_t len = 0;
    char sop[65], series[65];
    assert_int_equal(lc_dicom_seg_write(&spec, &buf, &len, sop, series, &e), LC_OK);
    assert_true(lc_dicom_uid_valid(sop) && lc_dicom_uid_valid(series));

    /* read back: a SEG of 6 frames, each frame exactly label == its segment */
    char *dir = ts_tmpdir("dcmseg"), path[600];
    snprintf(path, sizeof(path), "%s/seg.dcm", dir);
    assert_int_equal(ts_write_file(path, buf, len), 0);
    lc_dicom_header *h = NULL;
    assert_int_equal(lc_dicom_read_header(path, &h, &e), LC_OK);
    assert_string_equal(h->sop_class_uid, "1.2.840.10008.5.1.4.1.1.66.4");
    assert_string_equal(h->sop_instance_uid, sop);
    assert_string_equal(h->series_instance_uid, series);
    assert_string_equal(h->study_instance_uid, ref->study_instance_uid);
    assert_string_equal(h->modality, "SEG");
    assert_int_equal(h->number_of_frames, 2 * NS);
    assert_int_equal(h->bits_allocated, 1);
    lc_dicom_header_free(h);
    float *px = NULL;
    int rows, cols, frames;
    if (lc_dicom_read_pixels_f32(path, &px, &rows, &cols, &frames, &e) != LC_OK)
        fail_msg("the SEG does not decode: %s", e.msg);
    assert_int_equal(rows, R);
    assert_int_equal(cols, C);
    assert_int_equal(frames, 2 * NS);
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < NS * R * C; i++)
            if (px[k * NS * R * C + i] != (labels[i] == k + 1 ? 1.0f : 0.0f))
                fail_msg("segment %d, voxel %d: %g", k + 1, i, (double)px[k * NS * R * C + i]);
    free(px);

    /* dicom3tools: no errors; DCMTK: every source referenced, frame positions present */
    char cmd[900], *out = NULL;
    snprintf(cmd, sizeof(cmd), "dciodvfy '%s' 2>&1", path);
    if (ts_run(cmd, &out) < 0)
        fail_msg("dciodvfy is needed (deploy/install-deps.sh installs dicom3tools)");
    if (strstr(out, "\nError") || strncmp(out, "Error", 5) == 0)
        fail_msg("dciodvfy reports errors:\n%s", out);
    free(out);
    snprintf(cmd, sizeof(cmd), "dcmdump +P 0008,1155 +P 0020,0032 +P 0062,0005 '%s'", path);
    assert_int_equal(ts_run(cmd, &out), 0);
    for (int i = 0; i < NS; i++)
        assert_non_null(strstr(out, uids[i]));
    assert_non_null(strstr(out, "[0\\0\\5]"));
    assert_non_null(strstr(out, "[Tissue]"));
    free(out);
    free(buf);
    ts_rmrf(dir);
    free(dir);

    /* bad specs are refused */
    labels[5] = 3; /* only two segments */
    assert_int_equal(lc_dicom_seg_write(&spec, &buf, &len, sop, series, &e), LC_ERR_INVALID);
    assert_non_null(strstr(e.msg, "label 3"));
    assert_null(buf);
    labels[5] = 0;
    spec.nsources = 0;
    assert_int_equal(lc_dicom_seg_write(&spec, &buf, &len, sop, series, &e), LC_ERR_INVALID);
    spec.nsources = NS;
    spec.slice_thickness = 0;
    assert_int_equal(lc_dicom_seg_write(&spec, &buf, &len, sop, series, &e), LC_ERR_INVALID);
    lc_dicom_header_free(ref);
    free(src);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_classic_frames), cmocka_unit_test(test_enhanced_frames),
        cmocka_unit_test(test_hostile_input),  cmocka_unit_test(test_uids),
        cmocka_unit_test(test_seg_write),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
