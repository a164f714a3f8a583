/*
 * test_event.c: CloudEvents envelopes: build -> JSON -> parse round trip, required
 * attributes, RFC 3339 times, and the per-type data checks for radpipe's events.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "lc/event.h"
#include "lc/util.h"

static cJSON *instance_data(void)
{
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "study_instance_uid", "1.2.3");
    cJSON_AddStringToObject(d, "series_instance_uid", "1.2.3.4");
    cJSON_AddStringToObject(d, "sop_instance_uid", "1.2.3.4.5");
    cJSON_AddStringToObject(d, "url", "file:///var/objects/instances/x.dcm");
    cJSON_AddNumberToObject(d, "size", 1234);
    cJSON_AddStringToObject(d, "sha256",
                            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    return d;
}

static void test_round_trip(void **state)
{
    (void)state;
    lc_event *ev = NULL, *back = NULL;
    lc_err e;
    assert_int_equal(
        lc_event_new(LC_EV_INSTANCE_STORED, "/radpipe/test", "1.2.3", instance_data(), &ev, &e),
        LC_OK);
    assert_true(lc_uuid_valid(ev->id));
    char *json = lc_event_to_json(ev);
    assert_non_null(strstr(json, "\"specversion\":\"1.0\""));
    assert_non_null(strstr(json, "\"datacontenttype\":\"application/json\""));
    assert_int_equal(lc_event_parse(json, strlen(json), &back, &e), LC_OK);
    assert_string_equal(back->id, ev->id);
    assert_string_equal(back->type, LC_EV_INSTANCE_STORED);
    assert_string_equal(back->source, "/radpipe/test");
    assert_string_equal(back->subject, "1.2.3");
    assert_string_equal(back->time, ev->time);
    assert_int_equal(cJSON_GetObjectItem(back->data, "size")->valueint, 1234);
    free(json);
    lc_event_free(ev);
    lc_event_free(back);
}

static void expect_invalid(const char *json, const char *needle)
{
    lc_event *ev = (lc_event *)0x1;
    lc_err e;
    assert_int_equal(lc_event_parse(json, strlen(json), &ev, &e), LC_ERR_INVALID);
    assert_null(ev);
    if (!strstr(e.msg, needle))
        fail_msg("message \"%s\" lacks \"%s\"", e.msg, needle);
}

static void test_envelope_errors(void **state)
{
    (void)state;
    expect_invalid("", "not valid JSON");
    expect_invalid("[1]", "not a JSON object");
    expect_invalid("{\"id\":\"1\",\"source\":\"s\",\"type\":\"t\",\"data\":{}}", "specversion");
    expect_invalid("{\"specversion\":\"0.3\",\"id\":\"1\",\"source\":\"s\",\"type\":\"t\","
                   "\"data\":{}}",
                   "unsupported CloudEvents specversion");
    expect_invalid("{\"specversion\":\"1.0\",\"id\":\"\",\"source\":\"s\",\"type\":\"t\","
                   "\"data\":{}}",
                   "\"id\" is not a non-empty string");
    expect_invalid("{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"s\",\"type\":\"t\","
                   "\"time\":\"yesterday\",\"data\":{}}",
                   "not an RFC 3339 timestamp");
    expect_invalid("{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"s\",\"type\":\"t\","
                   "\"datacontenttype\":\"text/xml\",\"data\":{}}",
                   "unsupported datacontenttype");
    expect_invalid("{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"s\",\"type\":\"t\"}",
                   "\"data\" is missing");
    /* unknown types pass with any object data; offsets and time zones are accepted */
    const char *ok = "{\"specversion\":\"1.0\",\"id\":\"x\",\"source\":\"s\",\"type\":\"other\","
                     "\"time\":\"2026-11-21T10:00:00+01:00\",\"data\":{\"a\":1}}";
    lc_event *ev = NULL;
    lc_err e;
    assert_int_equal(lc_event_parse(ok, strlen(ok), &ev, &e), LC_OK);
    assert_null(ev->subject);
    lc_event_free(ev);
}

static void test_data_checks(void **state)
{
    (void)state;
    lc_err e;
    cJSON *d = instance_data();
    assert_int_equal(lc_event_validate_data(LC_EV_INSTANCE_STORED, d, &e), LC_OK);
    cJSON_DeleteItemFromObject(d, "sha256");
    assert_int_equal(lc_event_validate_data(LC_EV_INSTANCE_STORED, d, &e), LC_ERR_INVALID);
    assert_non_null(strstr(e.msg, "data.sha256 is missing"));
    cJSON_AddStringToObject(d, "sha256", "x");
    cJSON_ReplaceItemInObject(d, "size", cJSON_CreateNumber(1.5));
    assert_int_equal(lc_event_validate_data(LC_EV_INSTANCE_STORED, d, &e), LC_ERR_INVALID);
    assert_non_null(strstr(e.msg, "data.size is not an integer"));
    cJSON_Delete(d);

    d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "job_id", "not-a-uuid");
    cJSON_AddStringToObject(d, "study_instance_uid", "1.2");
    cJSON_AddStringToObject(d, "kind", "upload");
    cJSON_AddItemToObject(d, "params", cJSON_CreateObject());
    cJSON_AddNumberToObject(d, "attempt", 0);
    assert_int_equal(lc_event_validate_data(LC_EV_JOB_UPLOAD, d, &e), LC_ERR_INVALID);
    assert_non_null(strstr(e.msg, "data.job_id is not a UUID string"));
    char id[37];
    lc_uuid_v4(id);
    cJSON_ReplaceItemInObject(d, "job_id", cJSON_CreateString(id));
    assert_int_equal(lc_event_validate_data(LC_EV_JOB_SEGMENT, d, &e), LC_OK);
    cJSON_Delete(d);
    assert_int_equal(lc_event_validate_data(LC_EV_DLQ, NULL, &e), LC_ERR_INVALID);
}

static void test_new_consumes_data_on_error(void **state)
{
    (void)state;
    lc_event *ev = NULL;
    lc_err e;
    /* data is consumed even when creation fails: ASan's leak check proves it */
    assert_int_equal(lc_event_new(NULL, "/s", NULL, cJSON_CreateObject(), &ev, &e), LC_ERR_INVALID);
    assert_int_equal(lc_event_new("t", "/s", NULL, NULL, &ev, &e), LC_OK);
    assert_true(cJSON_IsObject(ev->data));
    lc_event_free(ev);
    lc_event_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_envelope_errors),
        cmocka_unit_test(test_data_checks),
        cmocka_unit_test(test_new_consumes_data_on_error),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
