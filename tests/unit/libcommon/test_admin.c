/*
 * test_admin.c: the admin endpoints over real HTTP on loopback (civetweb server, libcurl
 * client): /healthz, /readyz with passing and failing checks, draining, /metrics, 405 for
 * other methods, start errors, and the handlers attached to a server the test runs itself.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <civetweb.h>
#include <cJSON.h>
#include <curl/curl.h>
#include "lc/admin.h"
#include "lc/metrics.h"

typedef struct resp {
    long status;
    char *body;
    size_t len;
    char ctype[128];
    char allow[64];
} resp;

static size_t on_body(char *p, size_t sz, size_t n, void *ud)
{
    resp *r = ud;
    char *nb = realloc(r->body, r->len + sz * n + 1);
    if (!nb)
        return 0;
    memcpy(nb + r->len, p, sz * n);
    r->body = nb;
    r->len += sz * n;
    r->body[r->len] = '\0';
    return sz * n;
}

static size_t on_header(char *p, size_t sz, size_t n, void *ud)
{
    resp *r = ud;
    size_t len = sz * n;
    if (len > 7 && strncasecmp(p, "Allow: ", 7) == 0)
        snprintf(r->allow, sizeof(r->allow), "%.*s", (int)(len - 9), p + 7);
    return len;
}

/* method NULL: GET. Fails the test when the request cannot be made at all. */
static resp request(int port, const char *method, const char *path)
{
    resp r = {0};
    char url[256];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", port, path);
    CURL *c = curl_easy_init();
    assert_non_null(c);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 10000L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &r);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, &r);
    if (method && strcmp(method, "HEAD") == 0)
        curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
    else if (method && strcmp(method, "POST") == 0)
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, "x=1");
    else if (method)
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    CURLcode cc = curl_easy_perform(c);
    if (cc != CURLE_OK)
        fail_msg("GET %s: %s", url, curl_easy_strerror(cc));
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.status);
    char *ct = NULL;
    curl_easy_getinfo(c, CURLINFO_CONTENT_TYPE, &ct);
    snprintf(r.ctype, sizeof(r.ctype), "%s", ct ? ct : "");
    curl_easy_cleanup(c);
    if (!r.body)
        r.body = calloc(1, 1);
    return r;
}

static lc_rc check_ok(void *ctx, lc_err *err)
{
    (void)err;
    (*(int *)ctx)++;
    return LC_OK;
}

static lc_rc check_fail(void *ctx, lc_err *err)
{
    (*(int *)ctx)++;
    return lc_err_set(err, LC_ERR_UNAVAILABLE, "could not connect to \"%s\": %s", "broker:9092",
                      "connection refused");
}

/* The JSON string at doc.a.b (b may be NULL). */
static const char *json_str(cJSON *doc, const char *a, const char *b)
{
    cJSON *x = cJSON_GetObjectItemCaseSensitive(doc, a);
    if (b)
        x = cJSON_GetObjectItemCaseSensitive(x, b);
    return cJSON_IsString(x) ? x->valuestring : NULL;
}

static void test_endpoints(void **state)
{
    (void)state;
    lc_metrics *m = lc_metrics_new();
    lc_counter_add(lc_metrics_counter(m, "rp_test_total", "Test.", "k=\"v\""), 7);
    lc_admin *a = NULL;
    lc_err err = {0};
    assert_int_equal(lc_admin_start("127.0.0.1:0", m, &a, &err), LC_OK);
    int port = lc_admin_port(a);
    assert_true(port > 0);

    resp r = request(port, NULL, "/healthz");
    assert_int_equal(r.status, 200);
    assert_string_equal(r.ctype, "application/json");
    assert_string_equal(r.body, "{\"status\":\"ok\"}");
    free(r.body);

    /* no checks yet: ready */
    r = request(port, NULL, "/readyz");
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "{\"status\":\"ready\",\"checks\":{}}");
    free(r.body);

    int db_calls = 0, broker_calls = 0;
    assert_int_equal(lc_admin_add_check(a, "db", check_ok, &db_calls), LC_OK);
    r = request(port, NULL, "/readyz");
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "{\"status\":\"ready\",\"checks\":{\"db\":\"ok\"}}");
    assert_int_equal(db_calls, 1);
    free(r.body);

    assert_int_equal(lc_admin_add_check(a, "broker", check_fail, &broker_calls), LC_OK);
    r = request(port, NULL, "/readyz");
    assert_int_equal(r.status, 503);
    assert_string_equal(r.ctype, "application/json");
    cJSON *doc = cJSON_Parse(r.body);
    assert_non_null(doc);
    assert_string_equal(json_str(doc, "status", NULL), "not ready");
    assert_string_equal(json_str(doc, "checks", "db"), "ok");
    assert_string_equal(json_str(doc, "checks", "broker"),
                        "could not connect to \"broker:9092\": connection refused");
    cJSON_Delete(doc);
    free(r.body);
    assert_int_equal(db_calls, 2);
    assert_int_equal(broker_calls, 1);

    r = request(port, NULL, "/metrics");
    assert_int_equal(r.status, 200);
    assert_string_equal(r.ctype, "text/plain; version=0.0.4; charset=utf-8");
    char *want = lc_metrics_render(m);
    assert_string_equal(r.body, want);
    assert_non_null(strstr(r.body, "rp_test_total{k=\"v\"} 7\n"));
    free(want);
    free(r.body);

    /* HEAD answers without a body */
    r = request(port, "HEAD", "/healthz");
    assert_int_equal(r.status, 200);
    assert_int_equal(r.len, 0);
    free(r.body);

    const char *methods[] = {"POST", "PUT", "DELETE"};
    const char *paths[] = {"/healthz", "/readyz", "/metrics"};
    for (size_t i = 0; i < 3; i++) {
        r = request(port, methods[i], paths[i]);
        assert_int_equal(r.status, 405);
        assert_string_equal(r.ctype, "application/json");
        assert_string_equal(r.body, "{\"error\":\"method not allowed\"}");
        assert_string_equal(r.allow, "GET, HEAD");
        free(r.body);
    }

    /* only the exact paths are served */
    r = request(port, NULL, "/healthz/extra");
    assert_int_equal(r.status, 404);
    free(r.body);

    lc_admin_set_draining(a);
    r = request(port, NULL, "/readyz");
    assert_int_equal(r.status, 503);
    doc = cJSON_Parse(r.body);
    assert_string_equal(json_str(doc, "status", NULL), "draining");
    cJSON_Delete(doc);
    free(r.body);
    assert_int_equal(db_calls, 2); /* checks do not run while draining */
    /* alive while draining */
    r = request(port, NULL, "/healthz");
    assert_int_equal(r.status, 200);
    free(r.body);

    lc_admin_free(a);
    lc_metrics_free(m);
}

static void test_check_limits(void **state)
{
    (void)state;
    lc_admin *a = NULL;
    int n = 0;
    assert_int_equal(lc_admin_start("127.0.0.1:0", NULL, &a, NULL), LC_OK);
    for (int i = 0; i < 8; i++) {
        char name[16];
        snprintf(name, sizeof(name), "c%d", i);
        assert_int_equal(lc_admin_add_check(a, name, check_ok, &n), LC_OK);
    }
    assert_int_not_equal(lc_admin_add_check(a, "ninth", check_ok, &n), LC_OK);
    assert_int_equal(lc_admin_add_check(a, NULL, check_ok, &n), LC_ERR_INVALID);
    assert_int_equal(lc_admin_add_check(a, "x", NULL, &n), LC_ERR_INVALID);
    resp r = request(lc_admin_port(a), NULL, "/readyz");
    assert_int_equal(r.status, 200);
    assert_int_equal(n, 8);
    free(r.body);
    /* no registry: an empty exposition */
    r = request(lc_admin_port(a), NULL, "/metrics");
    assert_int_equal(r.status, 200);
    assert_int_equal(r.len, 0);
    free(r.body);
    lc_admin_free(a);
    lc_admin_free(NULL);
    lc_admin_set_draining(NULL);
    assert_int_equal(lc_admin_port(NULL), -1);
}

static void test_start_errors(void **state)
{
    (void)state;
    lc_admin *a = NULL, *b = NULL;
    lc_err err = {0};
    assert_int_equal(lc_admin_start("127.0.0.1:0", NULL, &a, &err), LC_OK);
    char listen[64];
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", lc_admin_port(a));
    /* the port is taken */
    assert_int_not_equal(lc_admin_start(listen, NULL, &b, &err), LC_OK);
    assert_null(b);
    assert_non_null(strstr(lc_err_msg(&err), "could not start admin server"));
    assert_int_equal(lc_admin_start("", NULL, &b, &err), LC_ERR_CONFIG);
    assert_int_not_equal(lc_admin_start("not-a-port", NULL, &b, &err), LC_OK);
    assert_null(b);
    /* the first server still answers */
    resp r = request(lc_admin_port(a), NULL, "/healthz");
    assert_int_equal(r.status, 200);
    free(r.body);
    lc_admin_free(a);
}

static int app_route(struct mg_connection *c, void *cbdata)
{
    (void)cbdata;
    mg_send_http_ok(c, "text/plain", 3);
    mg_write(c, "app", 3);
    return 200;
}

static void test_attach(void **state)
{
    (void)state;
    /* a server owned by the caller, as the gateway runs one */
    mg_init_library(0);
    const char *opts[] = {"listening_ports", "127.0.0.1:0", "num_threads", "2", NULL};
    struct mg_context *ctx = mg_start(NULL, NULL, opts);
    assert_non_null(ctx);
    mg_set_request_handler(ctx, "/app", app_route, NULL);
    struct mg_server_port ports[2];
    assert_true(mg_get_server_ports(ctx, 2, ports) >= 1);
    int port = ports[0].port;

    lc_metrics *m = lc_metrics_new();
    lc_gauge_set(lc_metrics_gauge(m, "attached", "A.", NULL), 1);
    lc_admin *a = NULL;
    assert_int_equal(lc_admin_attach(NULL, m, &a, NULL), LC_ERR_INVALID);
    assert_int_equal(lc_admin_attach(ctx, m, &a, NULL), LC_OK);
    assert_int_equal(lc_admin_port(a), port);
    resp r = request(port, NULL, "/healthz");
    assert_int_equal(r.status, 200);
    free(r.body);
    r = request(port, NULL, "/metrics");
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "attached 1\n"));
    free(r.body);
    r = request(port, NULL, "/app");
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "app");
    free(r.body);
    mg_stop(ctx);
    lc_admin_free(a); /* after mg_stop, as admin.h asks */
    mg_exit_library();
    lc_metrics_free(m);
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_endpoints),
        cmocka_unit_test(test_check_limits),
        cmocka_unit_test(test_start_errors),
        cmocka_unit_test(test_attach),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
