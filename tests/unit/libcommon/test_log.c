/*
 * test_log.c: lc_log lines are valid JSON with ts/level/service/msg and typed fields,
 * escape what JSON requires, drop patient data above debug, and stay valid when truncated.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <cjson/cJSON.h>
#include "lc/log.h"

static cJSON *format(lc_log_level lvl, const char *msg, const lc_log_field *f, char *buf,
                     size_t cap)
{
    size_t n = lc_log_format(buf, cap, lvl, msg, f);
    assert_true(n < cap);
    assert_int_equal(strlen(buf), n);
    cJSON *j = cJSON_Parse(buf);
    if (!j)
        fail_msg("not JSON: %s", buf);
    return j;
}

static void test_fields(void **state)
{
    (void)state;
    char buf[4096];
    lc_log_init("svc-a", LC_LOG_INFO);
    const lc_log_field f[] = {
        LC_LS("s", "a\"b\\c\nd\x01"), LC_LI("i", -42),         LC_LD("d", 1.5), LC_LB("b", 1),
        LC_LS("null", NULL),          LC_LD("nan", 0.0 / 0.0), LC_LEND};
    cJSON *j = format(LC_LOG_WARN, "could not \"x\"", f, buf, sizeof(buf));
    assert_string_equal(cJSON_GetObjectItem(j, "level")->valuestring, "warn");
    assert_string_equal(cJSON_GetObjectItem(j, "service")->valuestring, "svc-a");
    assert_string_equal(cJSON_GetObjectItem(j, "msg")->valuestring, "could not \"x\"");
    assert_string_equal(cJSON_GetObjectItem(j, "s")->valuestring, "a\"b\\c\nd\x01");
    assert_int_equal(cJSON_GetObjectItem(j, "i")->valueint, -42);
    assert_true(cJSON_GetObjectItem(j, "d")->valuedouble == 1.5);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(j, "b")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "null")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "nan")));
    const char *ts = cJSON_GetObjectItem(j, "ts")->valuestring;
    assert_int_equal(strlen(ts), 24); /* 2026-11-21T12:00:00.123Z */
    assert_int_equal(ts[23], 'Z');
    cJSON_Delete(j);
}

static void test_phi_only_at_debug(void **state)
{
    (void)state;
    char buf[1024];
    const lc_log_field f[] = {LC_LP("patient_name", "DOE^JANE"), LC_LS("uid", "1.2.3"), LC_LEND};
    lc_log_init("svc", LC_LOG_INFO);
    cJSON *j = format(LC_LOG_INFO, "indexed", f, buf, sizeof(buf));
    assert_null(cJSON_GetObjectItem(j, "patient_name"));
    assert_null(strstr(buf, "DOE"));
    assert_non_null(cJSON_GetObjectItem(j, "uid"));
    cJSON_Delete(j);
    lc_log_init("svc", LC_LOG_DEBUG);
    j = format(LC_LOG_INFO, "indexed", f, buf, sizeof(buf));
    assert_string_equal(cJSON_GetObjectItem(j, "patient_name")->valuestring, "DOE^JANE");
    cJSON_Delete(j);
    lc_log_init("svc", LC_LOG_INFO);
}

static void test_truncation_stays_valid(void **state)
{
    (void)state;
    char big[10000], buf[512];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    /* multi-byte UTF-8 must not be split by the value cut */
    for (size_t i = 0; i + 2 < sizeof(big); i += 3)
        memcpy(big + i, "\xc3\xa9x", 3);
    const lc_log_field f[] = {LC_LS("a", "short"), LC_LS("big", big), LC_LI("after", 1), LC_LEND};
    cJSON *j = format(LC_LOG_ERROR, "m", f, buf, sizeof(buf));
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(j, "truncated")));
    assert_string_equal(cJSON_GetObjectItem(j, "a")->valuestring, "short");
    cJSON_Delete(j);

    /* a long value alone is cut with "..." but the line keeps every field */
    char line[8192];
    const lc_log_field g[] = {LC_LS("big", big), LC_LI("after", 1), LC_LEND};
    j = format(LC_LOG_ERROR, "m", g, line, sizeof(line));
    const char *v = cJSON_GetObjectItem(j, "big")->valuestring;
    assert_true(strlen(v) < 2100);
    assert_non_null(strstr(v, "..."));
    assert_int_equal(cJSON_GetObjectItem(j, "after")->valueint, 1);
    cJSON_Delete(j);
}

static void test_levels(void **state)
{
    (void)state;
    assert_int_equal(lc_log_level_parse("debug"), LC_LOG_DEBUG);
    assert_int_equal(lc_log_level_parse("WARNING"), LC_LOG_WARN);
    assert_int_equal(lc_log_level_parse("loud"), -1);
    lc_log_init("svc", LC_LOG_WARN);
    assert_false(lc_log_enabled(LC_LOG_INFO));
    assert_true(lc_log_enabled(LC_LOG_ERROR));
    lc_log_init("svc", LC_LOG_INFO);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fields),
        cmocka_unit_test(test_phi_only_at_debug),
        cmocka_unit_test(test_truncation_stays_valid),
        cmocka_unit_test(test_levels),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
