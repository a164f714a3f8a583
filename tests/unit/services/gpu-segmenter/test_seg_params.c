/*
 * test_seg_params.c: seg_params_parse against the shared cases of
 * tests/data/params/segment-cases.json, the same cases tests/checks/test_params_schema.sh
 * runs through proto/params/segment.schema.json with ajv, so the C validator and the schema
 * cannot drift apart; invalid cases must fail with a message naming the parameter. Also the
 * per-algorithm defaults.
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
#include "ts.h"

static void test_shared_cases(void **state)
{
    (void)state;
    char *path = ts_data("params/segment-cases.json");
    char *txt = ts_read_file(path, NULL);
    if (!txt)
        fail_msg("cannot read %s", path);
    cJSON *cases = cJSON_Parse(txt);
    assert_true(cJSON_IsArray(cases));
    int n = 0, valid = 0;
    for (const cJSON *c = cases->child; c; c = c->next, n++) {
        const cJSON *params = cJSON_GetObjectItem(c, "params");
        int want = cJSON_IsTrue(cJSON_GetObjectItem(c, "valid"));
        const cJSON *needle = cJSON_GetObjectItem(c, "error");
        seg_params p;
        lc_err e = {0};
        lc_rc rc = seg_params_parse(params, &p, &e);
        char *shown = cJSON_PrintUnformatted(params);
        if (want && rc != LC_OK)
            fail_msg("case %d %s: rejected: %s", n, shown, e.msg);
        if (!want && rc != LC_ERR_INVALID)
            fail_msg("case %d %s: accepted", n, shown);
        if (!want && cJSON_IsString(needle) && !strstr(e.msg, needle->valuestring))
            fail_msg("case %d %s: message \"%s\" does not name \"%s\"", n, shown, e.msg,
                     needle->valuestring);
        valid += want;
        free(shown);
    }
    assert_true(n >= 40 && valid >= 8 && n - valid >= 30);
    cJSON_Delete(cases);
    free(txt);
    free(path);
}

static seg_params parse(const char *json)
{
    seg_params p;
    lc_err e;
    cJSON *j = cJSON_Parse(json);
    if (seg_params_parse(j, &p, &e) != LC_OK)
        fail_msg("%s: %s", json, e.msg);
    cJSON_Delete(j);
    return p;
}

static void test_defaults(void **state)
{
    (void)state;
    seg_params p = parse("{}");
    assert_int_equal(p.algorithm, SEG_ALGO_OTSU);
    assert_int_equal(p.nbins, 256);
    assert_int_equal(p.fill, SEG_FILL_NONE);
    assert_int_equal(p.keep_largest, 0);
    assert_int_equal(p.stow, -1);
    assert_string_equal(p.label, "Otsu foreground");
    assert_string_equal(p.series_uid, "");

    p = parse("{\"algorithm\":\"body\"}");
    assert_true(p.window_level == 0 && p.window_width == 2000);
    assert_int_equal(p.connectivity, 6);
    assert_int_equal(p.keep_largest, 1);
    assert_int_equal(p.fill, SEG_FILL_2D);
    assert_string_equal(p.label, "Body");

    p = parse("{\"algorithm\":\"threshold\",\"lower\":-100,\"morphology\":[{\"op\":\"open\","
              "\"radius_mm\":1.5},{\"op\":\"dilate\",\"radius_mm\":0}],\"stow\":false,"
              "\"series_instance_uid\":\"1.2.3\"}");
    assert_true(p.lower == -100 && isinf(p.upper) && p.upper > 0);
    assert_int_equal(p.connectivity, 26);
    assert_int_equal(p.keep_largest, 0);
    assert_int_equal(p.fill, SEG_FILL_NONE);
    assert_int_equal(p.nmorph, 2);
    assert_int_equal(p.morph[0].op, GPU_MORPH_OPEN);
    assert_true(p.morph[0].radius_mm == 1.5);
    assert_int_equal(p.morph[1].op, GPU_MORPH_DILATE);
    assert_int_equal(p.stow, 0);
    assert_string_equal(p.series_uid, "1.2.3");

    seg_params q;
    lc_err e;
    assert_int_equal(seg_params_parse(NULL, &q, &e), LC_OK); /* no params at all: {} */
    assert_int_equal(q.algorithm, SEG_ALGO_OTSU);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shared_cases),
        cmocka_unit_test(test_defaults),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
