/*
 * test_util.c: lc_rc/lc_err behaviour and the helpers in util.h: UUIDs, SHA-256 against
 * known vectors and sha256sum, constant-time compare, timestamps, file reads, mkdir -p.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <cmocka.h>
#include "lc/rc.h"
#include "lc/util.h"
#include "ts.h"

static void test_rc(void **state)
{
    (void)state;
    for (int i = 0; i < LC_RC__COUNT; i++)
        assert_string_not_equal(lc_strerror((lc_rc)i), "unknown error");
    assert_string_equal(lc_strerror((lc_rc)9999), "unknown error");
    assert_true(lc_rc_is_transient(LC_ERR_UNAVAILABLE));
    assert_false(lc_rc_is_transient(LC_ERR_DICOM));
    lc_err e;
    lc_err_clear(&e);
    assert_string_equal(lc_err_msg(&e), "success");
    assert_int_equal(lc_err_set(&e, LC_ERR_IO, "could not open \"%s\"", "x"), LC_ERR_IO);
    assert_int_equal(lc_err_wrap(&e, "loading %d", 3), LC_ERR_IO);
    assert_string_equal(e.msg, "loading 3: could not open \"x\"");
    assert_int_equal(lc_err_set(NULL, LC_ERR_IO, "ignored"), LC_ERR_IO);
}

static void test_uuid(void **state)
{
    (void)state;
    char a[37], b[37];
    lc_uuid_v4(a);
    lc_uuid_v4(b);
    assert_true(lc_uuid_valid(a));
    assert_string_not_equal(a, b);
    assert_int_equal(a[14], '4');           /* version */
    assert_non_null(strchr("89ab", a[19])); /* variant */
    assert_false(lc_uuid_valid("not-a-uuid"));
    assert_false(lc_uuid_valid("0123456789abcdef0123456789abcdef0123"));
    assert_true(lc_uuid_valid("123E4567-E89B-12D3-A456-426614174000"));
}

static void test_sha256(void **state)
{
    (void)state;
    char hex[65];
    lc_sha256_hex("", 0, hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    lc_sha256_hex("abc", 3, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    /* incremental equals one-shot */
    lc_sha256 *h = lc_sha256_new();
    lc_sha256_update(h, "a", 1);
    lc_sha256_update(h, "bc", 2);
    char hex2[65];
    lc_sha256_final_hex(h, hex2);
    lc_sha256_free(h);
    assert_string_equal(hex, hex2);

    /* a file, compared with sha256sum */
    char *dir = ts_tmpdir("util"), path[512], cmd[600], *out = NULL;
    snprintf(path, sizeof(path), "%s/f", dir);
    char *data = malloc(3 << 20);
    for (int i = 0; i < (3 << 20); i++)
        data[i] = (char)(i * 31);
    assert_int_equal(ts_write_file(path, data, 3 << 20), 0);
    long long size = 0;
    lc_err e;
    assert_int_equal(lc_sha256_file_hex(path, hex, &size, &e), LC_OK);
    assert_int_equal(size, 3 << 20);
    snprintf(cmd, sizeof(cmd), "sha256sum '%s' | cut -c1-64", path);
    assert_int_equal(ts_run(cmd, &out), 0);
    assert_memory_equal(out, hex, 64);
    free(out);
    assert_int_equal(lc_sha256_file_hex("/nonexistent", hex, NULL, &e), LC_ERR_NOT_FOUND);
    free(data);
    ts_rmrf(dir);
    free(dir);
}

static void test_ct_equal_and_time(void **state)
{
    (void)state;
    assert_true(lc_ct_equal("abcd", "abcd", 4));
    assert_false(lc_ct_equal("abcd", "abce", 4));
    char ts[32];
    lc_time_rfc3339(1700000000123LL, ts);
    assert_string_equal(ts, "2023-11-14T22:13:20.123Z");
    int64_t t0 = lc_now_ms();
    atomic_int stop = 1;
    assert_int_equal(lc_sleep_ms(5000, &stop), 1); /* returns at once when stop is set */
    assert_true(lc_now_ms() - t0 < 1000);
    assert_int_equal(lc_sleep_ms(20, NULL), 0);
}

static void test_files(void **state)
{
    (void)state;
    char *dir = ts_tmpdir("util"), path[512], *buf = NULL;
    size_t len = 0;
    lc_err e;
    snprintf(path, sizeof(path), "%s/a/b/c", dir);
    assert_int_equal(lc_mkdirs(path, 0755, &e), LC_OK);
    assert_int_equal(lc_mkdirs(path, 0755, &e), LC_OK); /* idempotent */
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    snprintf(path, sizeof(path), "%s/a/file", dir);
    assert_int_equal(ts_write_file(path, "hello", 5), 0);
    assert_int_equal(lc_read_file(path, 100, &buf, &len, &e), LC_OK);
    assert_int_equal(len, 5);
    assert_string_equal(buf, "hello");
    free(buf);
    assert_int_equal(lc_read_file(path, 4, &buf, &len, &e), LC_ERR_TOO_LARGE);
    assert_non_null(strstr(e.msg, "larger than 4 bytes"));
    assert_string_equal(lc_file_url_path("file:///abs/x"), "/abs/x");
    assert_string_equal(lc_file_url_path("file://rel/x"), "rel/x");
    assert_null(lc_file_url_path("s3://bucket/x"));
    char small[4];
    assert_int_equal(lc_strlcpy(small, "abcdef", sizeof(small)), 6);
    assert_string_equal(small, "abc");
    ts_rmrf(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rc),     cmocka_unit_test(test_uuid),
        cmocka_unit_test(test_sha256), cmocka_unit_test(test_ct_equal_and_time),
        cmocka_unit_test(test_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
