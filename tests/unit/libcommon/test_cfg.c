/*
 * test_cfg.c: lc_cfg: defaults, environment values, every type's parsing and range checks,
 * secrets from NAME_FILE, and that every bad value is reported (not only the first).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "lc/cfg.h"
#include "lc/log.h"
#include "ts.h"

typedef struct tcfg {
    char *name;
    long long count;
    int flag;
    long long size;
    double ratio;
    char *mode;
    char *secret;
} tcfg;

#define OFF(f) offsetof(tcfg, f)
static const lc_cfg_var vars[] = {
    {"RADPIPE_T_NAME", LC_CFG_STR, "dflt", 0, -1, 0, NULL, "a name", OFF(name)},
    {"RADPIPE_T_COUNT", LC_CFG_INT, "7", 1, 100, 0, NULL, "a count", OFF(count)},
    {"RADPIPE_T_FLAG", LC_CFG_BOOL, "false", 0, -1, 0, NULL, "a flag", OFF(flag)},
    {"RADPIPE_T_SIZE", LC_CFG_BYTES, "1M", 0, 1LL << 40, 0, NULL, "a size", OFF(size)},
    {"RADPIPE_T_RATIO", LC_CFG_DBL, "0.5", 0, 1, 0, NULL, "a ratio", OFF(ratio)},
    {"RADPIPE_T_MODE", LC_CFG_ENUM, "auto", 0, -1, 0, "auto|cpu|cuda", "a mode", OFF(mode)},
    {"RADPIPE_T_SECRET", LC_CFG_STR, "", 0, -1, LC_CFG_SECRET, NULL, "a secret", OFF(secret)},
};

static void clear_env(void)
{
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++)
        unsetenv(vars[i].name);
    unsetenv("RADPIPE_T_SECRET_FILE");
}

static lc_rc load(tcfg *c, lc_err *err)
{
    lc_cfg_table t = {vars, sizeof(vars) / sizeof(vars[0]), c};
    memset(c, 0, sizeof(*c));
    return lc_cfg_load(&t, 1, err);
}

static void release(tcfg *c)
{
    lc_cfg_table t = {vars, sizeof(vars) / sizeof(vars[0]), c};
    lc_cfg_release(&t, 1);
    assert_null(c->name);
}

static void test_defaults(void **state)
{
    (void)state;
    tcfg c;
    lc_err e;
    clear_env();
    assert_int_equal(load(&c, &e), LC_OK);
    assert_string_equal(c.name, "dflt");
    assert_int_equal(c.count, 7);
    assert_int_equal(c.flag, 0);
    assert_int_equal(c.size, 1 << 20);
    assert_true(c.ratio == 0.5);
    assert_string_equal(c.mode, "auto");
    assert_string_equal(c.secret, "");
    release(&c);
}

static void test_env_values(void **state)
{
    (void)state;
    tcfg c;
    lc_err e;
    clear_env();
    setenv("RADPIPE_T_NAME", "x y", 1);
    setenv("RADPIPE_T_COUNT", "100", 1);
    setenv("RADPIPE_T_FLAG", "YES", 1);
    setenv("RADPIPE_T_SIZE", "2GiB", 1);
    setenv("RADPIPE_T_RATIO", "1", 1);
    setenv("RADPIPE_T_MODE", "cuda", 1);
    setenv("RADPIPE_T_SECRET", "pw", 1);
    assert_int_equal(load(&c, &e), LC_OK);
    assert_string_equal(c.name, "x y");
    assert_int_equal(c.count, 100);
    assert_int_equal(c.flag, 1);
    assert_int_equal(c.size, 2LL << 30);
    assert_true(c.ratio == 1.0);
    assert_string_equal(c.mode, "cuda");
    assert_string_equal(c.secret, "pw");
    release(&c);
    clear_env();
}

static void test_secret_file_wins(void **state)
{
    (void)state;
    tcfg c;
    lc_err e;
    char *dir = ts_tmpdir("cfg");
    char path[512];
    snprintf(path, sizeof(path), "%s/secret", dir);
    assert_int_equal(ts_write_file(path, "s3cr3t\n", 7), 0);
    clear_env();
    setenv("RADPIPE_T_SECRET", "from-env", 1);
    setenv("RADPIPE_T_SECRET_FILE", path, 1);
    assert_int_equal(load(&c, &e), LC_OK);
    assert_string_equal(c.secret, "s3cr3t"); /* trailing newline removed */
    release(&c);

    /* an unreadable secret file is an error that names the variable, never the value */
    setenv("RADPIPE_T_SECRET_FILE", "/nonexistent/secret", 1);
    assert_int_equal(load(&c, &e), LC_ERR_CONFIG);
    assert_non_null(strstr(e.msg, "RADPIPE_T_SECRET_FILE"));
    release(&c);
    clear_env();
    ts_rmrf(dir);
    free(dir);
}

static void test_bad_values_all_reported(void **state)
{
    (void)state;
    tcfg c;
    lc_err e;
    clear_env();
    setenv("RADPIPE_T_COUNT", "12abc", 1);
    setenv("RADPIPE_T_FLAG", "maybe", 1);
    setenv("RADPIPE_T_MODE", "gpu", 1);
    assert_int_equal(load(&c, &e), LC_ERR_CONFIG);
    /* the first bad value is named, and the summary says there are more */
    assert_non_null(strstr(e.msg, "RADPIPE_T_COUNT"));
    assert_non_null(strstr(e.msg, "\"12abc\" is not an integer"));
    assert_non_null(strstr(e.msg, "and more"));
    release(&c);

    clear_env();
    setenv("RADPIPE_T_COUNT", "0", 1); /* below min 1 */
    assert_int_equal(load(&c, &e), LC_ERR_CONFIG);
    assert_non_null(strstr(e.msg, "outside [1, 100]"));
    release(&c);

    clear_env();
    setenv("RADPIPE_T_RATIO", "nan", 1);
    assert_int_equal(load(&c, &e), LC_ERR_CONFIG);
    assert_non_null(strstr(e.msg, "RADPIPE_T_RATIO"));
    release(&c);

    clear_env();
    setenv("RADPIPE_T_MODE", "gpu", 1);
    assert_int_equal(load(&c, &e), LC_ERR_CONFIG);
    assert_non_null(strstr(e.msg, "not one of auto|cpu|cuda"));
    release(&c);
    clear_env();
}

static void test_parse_bytes(void **state)
{
    (void)state;
    long long v;
    assert_int_equal(lc_cfg_parse_bytes("0", &v), LC_OK);
    assert_int_equal(v, 0);
    assert_int_equal(lc_cfg_parse_bytes("64K", &v), LC_OK);
    assert_int_equal(v, 65536);
    assert_int_equal(lc_cfg_parse_bytes("10mb", &v), LC_OK);
    assert_int_equal(v, 10LL << 20);
    assert_int_equal(lc_cfg_parse_bytes("1T", &v), LC_OK);
    assert_int_equal(v, 1LL << 40);
    assert_int_equal(lc_cfg_parse_bytes("", &v), LC_ERR_INVALID);
    assert_int_equal(lc_cfg_parse_bytes("-1", &v), LC_ERR_INVALID);
    assert_int_equal(lc_cfg_parse_bytes("1X", &v), LC_ERR_INVALID);
    assert_int_equal(lc_cfg_parse_bytes("1KBs", &v), LC_ERR_INVALID);
    assert_int_equal(lc_cfg_parse_bytes("99999999999T", &v), LC_ERR_INVALID); /* overflow */
    int b;
    assert_int_equal(lc_cfg_parse_bool("on", &b), LC_OK);
    assert_int_equal(b, 1);
    assert_int_equal(lc_cfg_parse_bool("Off", &b), LC_OK);
    assert_int_equal(b, 0);
    assert_int_equal(lc_cfg_parse_bool("2", &b), LC_ERR_INVALID);
}

static void test_markdown(void **state)
{
    (void)state;
    tcfg c = {0};
    lc_cfg_table t = {vars, sizeof(vars) / sizeof(vars[0]), &c};
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    lc_cfg_print_markdown(f, &t, 1);
    fclose(f);
    assert_non_null(strstr(buf, "| `RADPIPE_T_COUNT` | `7` | a count |"));
    assert_non_null(strstr(buf, "| `RADPIPE_T_SECRET` (or `_FILE`) | (unset) | a secret |"));
    free(buf);
}

int main(void)
{
    lc_log_init("test", LC_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),         cmocka_unit_test(test_env_values),
        cmocka_unit_test(test_secret_file_wins), cmocka_unit_test(test_bad_values_all_reported),
        cmocka_unit_test(test_parse_bytes),      cmocka_unit_test(test_markdown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
