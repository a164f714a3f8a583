/*
 * test_upl_pattern.c: destination patterns as tables: expansion with missing tags, defaults,
 * ^ and / paths (positive and negative indexes), unicode and unsafe characters, bucket
 * normalisation, splitting into store URL and prefix, tar framing, and the syntax errors.
 * Pure functions: no peers needed.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "lc/log.h"
#include "upl.h"

/* The values a study might have (NULL: the study has no such value). */
static const char *const values[][2] = {
    {"PatientID", "PAT-001"},
    {"PatientName", "Müller^Jürgen^^Dr."},
    {"StudyDescription", "Brain^Research/Project 7"},
    {"ReferringPhysicianName", "O'Brien^Seán"},
    {"StudyInstanceUID", "1.2.840.113619.2.55.3"},
    {"SeriesDescription", "T1 MPRAGE <sag> 1mm*"},
    {"InstitutionName", "東京大学病院"},
    {"AccessionNumber", "../../etc"},
    {"StudyDate", "20240131"},
    {"Modality", "MR"},
    {"BodyPartExamined", ""},
    {"PatientSex", NULL},
};

static lc_rc lookup(void *ctx, const char *kw, char **v, lc_err *err)
{
    (void)ctx;
    *v = NULL;
    for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++)
        if (strcmp(kw, values[i][0]) == 0) {
            *v = values[i][1] ? strdup(values[i][1]) : NULL;
            return LC_OK;
        }
    if (strcmp(kw, "NotAKeyword") == 0)
        return lc_err_set(err, LC_ERR_INVALID, "\"%s\" is not a DICOM keyword", kw);
    return LC_OK; /* a DICOM keyword without a value */
}

static void test_expansion_table(void **state)
{
    (void)state;
    static const char *const cases[][2] = {
        /* plain values, literal text kept */
        {"{StudyInstanceUID}", "1.2.840.113619.2.55.3"},
        {"archive/{PatientID}/{StudyDate}", "archive/PAT-001/20240131"},
        /* ^ and / paths, 0-based, negative from the end */
        {"{StudyDescriptionPath[0]}", "Brain"},
        {"{StudyDescriptionPath[1]}", "Research"},
        {"{StudyDescriptionPath[2]}", "Project_7"},
        {"{StudyDescriptionPath[-1]}", "Project_7"},
        {"{PatientNamePath[0]}/{PatientNamePath[1]}", "Muller/Jurgen"},
        /* an empty or missing component falls back */
        {"{PatientNamePath[2]}", "unknown"},
        {"{PatientNamePath[9]:-none}", "none"},
        /* missing tags: the default, else the missing value */
        {"{PatientSex}", "unknown"},
        {"{PatientSex:-U}", "U"},
        {"{BodyPartExamined:-whole body}", "whole_body"},
        {"{EchoTime}", "unknown"},
        {"{PatientSex:-}", "unknown"},
        /* unicode: Latin-1 letters transliterated, others replaced */
        {"{PatientName}", "Muller_Jurgen_Dr"},
        {"{ReferringPhysicianName}", "O_Brien_Sean"},
        {"{InstitutionName}", "unknown"}, /* nothing but replaced characters: empty */
        /* unsafe characters: never a path separator, "..", or a leading dot */
        {"{SeriesDescription}", "T1_MPRAGE_sag_1mm"},
        {"{AccessionNumber}", "etc"},
        {"x/{AccessionNumber}/y", "x/etc/y"},
        /* literal braces */
        {"{{{Modality}}}", "{MR}"},
        /* BIDS-flux's example */
        {"s3://s3.data-server.org/test.{ReferringPhysicianName}.{StudyDescriptionPath[1]}.dicoms",
         "s3://s3.data-server.org/test.O_Brien_Sean.Research.dicoms"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *out = NULL;
        lc_err e = {0};
        lc_rc rc = upl_pattern_expand(cases[i][0], lookup, NULL, "unknown", &out, &e);
        if (rc != LC_OK)
            fail_msg("pattern \"%s\": %s", cases[i][0], e.msg);
        if (strcmp(out, cases[i][1]) != 0)
            fail_msg("pattern \"%s\" gave \"%s\", want \"%s\"", cases[i][0], out, cases[i][1]);
        free(out);
    }
}

static void test_syntax_errors(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "{PatientID",        "PatientID}",     "{}",
        "{Patient ID}",      "{PatientID[1]}", "{PatientIDPath[x]}",
        "{PatientIDPath[]}", "{NotAKeyword}",  "{Path[0]}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char *out = NULL;
        lc_err e = {0};
        lc_rc rc = upl_pattern_expand(bad[i], lookup, NULL, "unknown", &out, &e);
        if (rc == LC_OK)
            fail_msg("pattern \"%s\" was accepted as \"%s\"", bad[i], out);
        assert_false(lc_rc_is_transient(rc));
        assert_true(e.msg[0] != '\0');
    }
    /* the dictionary check used for RADPIPE_ARCHIVE_URL_PATTERN and url_pattern */
    lc_err e = {0};
    assert_int_equal(upl_pattern_validate("s3://b/{PatientID}/{EchoTimePath[0]}", &e), LC_OK);
    assert_int_not_equal(upl_pattern_validate("s3://b/{PatientId}", &e), LC_OK);
    assert_non_null(strstr(e.msg, "PatientId"));
}

static void test_value_and_bucket_rules(void **state)
{
    (void)state;
    static const char *const vals[][2] = {
        {"abc", "abc"},      {"  a  b  ", "a_b"},        {"...", ""},
        {"a/b\\c", "a_b_c"}, {"ÀÉÎÕÜ ßæ", "AEIOU_ssae"}, {"x\x01y", "x_y"},
        {"é\xff\xfe", "e"},  {"-lead", "-lead"},
    };
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        char out[80];
        upl_sanitize_value(vals[i][0], out, sizeof(out));
        if (strcmp(out, vals[i][1]) != 0)
            fail_msg("value \"%s\" gave \"%s\", want \"%s\"", vals[i][0], out, vals[i][1]);
    }
    char longv[200], out[80];
    memset(longv, 'a', sizeof(longv) - 1);
    longv[sizeof(longv) - 1] = '\0';
    upl_sanitize_value(longv, out, sizeof(out));
    assert_int_equal(strlen(out), 64);

    static const char *const buckets[][2] = {
        {"My_Bucket", "my-bucket"},
        {"test.O_Brien.Research.dicoms", "test.o-brien.research.dicoms"},
        {"a", "a00"},
        {"-x-", "x00"},
        {"a..b", "a.b"},
        {"a.-b", "a-b"},
        {"192.168.1.1", "b-192.168.1.1"},
        {"UPPER.lower", "upper.lower"},
        {"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
         "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},
    };
    for (size_t i = 0; i < sizeof(buckets) / sizeof(buckets[0]); i++) {
        upl_sanitize_bucket(buckets[i][0], out, sizeof(out));
        if (strcmp(out, buckets[i][1]) != 0)
            fail_msg("bucket \"%s\" gave \"%s\", want \"%s\"", buckets[i][0], out, buckets[i][1]);
    }
}

static void test_split(void **state)
{
    (void)state;
    static const char *const cases[][3] = {
        {"s3://Bucket_X/a//b/", "s3://bucket-x", "a/b"},
        {"s3://bkt", "s3://bkt", ""},
        {"file:///data/x", "file:///data/x", ""},
        {"1.2.3/sub", "file://var/archive", "1.2.3/sub"},
        {"/lead/slash", "file://var/archive", "lead/slash"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *url = NULL, *prefix = NULL;
        lc_err e = {0};
        assert_int_equal(upl_pattern_split(cases[i][0], "file://var/archive", &url, &prefix, &e),
                         LC_OK);
        assert_string_equal(url, cases[i][1]);
        assert_string_equal(prefix, cases[i][2]);
        free(url);
        free(prefix);
    }
    char *url = NULL, *prefix = NULL;
    lc_err e = {0};
    assert_int_equal(upl_pattern_split("a/../b", "file://x", &url, &prefix, &e), LC_ERR_INVALID);
    assert_int_equal(upl_pattern_split("ftp://x/y", "file://x", &url, &prefix, &e), LC_ERR_INVALID);
}

static void test_tar_framing(void **state)
{
    (void)state;
    unsigned char h[512];
    lc_err e = {0};
    assert_int_equal(upl_tar_header("1.2.3/4.5.6.dcm", 1000, h, &e), LC_OK);
    assert_memory_equal(h + 257,
                        "ustar\0"
                        "00",
                        8);
    assert_string_equal((char *)h, "1.2.3/4.5.6.dcm");
    assert_string_equal((char *)h + 124, "00000001750"); /* 1000 in octal */
    unsigned sum = 0;
    for (int i = 0; i < 512; i++)
        sum += (i >= 148 && i < 156) ? ' ' : h[i];
    assert_int_equal(strtoul((char *)h + 148, NULL, 8), sum);
    /* a long name goes into prefix + name */
    char name[140];
    memset(name, '1', 64);
    name[64] = '/';
    memset(name + 65, '2', 64);
    strcpy(name + 129, ".dcm");
    assert_int_equal(upl_tar_header(name, 0, h, &e), LC_OK);
    assert_int_equal(strnlen((char *)h + 345, 155), 64);
    assert_int_equal(strnlen((char *)h, 100), 68);
    int64_t sizes[] = {1000, 512, 0};
    /* header + 1000 padded to 1024, header + 512, header alone, two end blocks */
    assert_int_equal(upl_tar_size(sizes, 3), 512 + 1024 + 512 + 512 + 512 + 1024);
}

int main(void)
{
    lc_log_init("test_upl_pattern", LC_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_expansion_table),
        cmocka_unit_test(test_syntax_errors),
        cmocka_unit_test(test_value_and_bucket_rules),
        cmocka_unit_test(test_split),
        cmocka_unit_test(test_tar_framing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
