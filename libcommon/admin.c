/*
 * admin.c: /healthz, /readyz and /metrics on civetweb, on a listener of our own
 * (lc_admin_start) or on a server the service already runs (lc_admin_attach).
 * The lc_admin owns its checks and, when started here, the civetweb context; the metrics
 * registry is borrowed. Handlers run on civetweb worker threads: checks are published with an
 * atomic count and draining is an atomic flag, so requests never take a lock.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <civetweb.h>
#include <cJSON.h>
#include "lc/admin.h"
#include "lc/log.h"
#include "lc/util.h"

#define MAX_CHECKS 8

typedef struct check {
    char name[64];
    lc_admin_check_fn fn;
    void *ctx;
} check;

struct lc_admin {
    struct mg_context *ctx;
    int owns_ctx; /* started here: stop it and release our civetweb library reference */
    lc_metrics *metrics;
    pthread_mutex_t add_mu; /* serialises lc_admin_add_check */
    check checks[MAX_CHECKS];
    atomic_int nchecks; /* slots below this are complete and never change again */
    atomic_int draining;
};

/* mg_init_library and mg_exit_library keep a process-wide count that civetweb does not guard
 * on first use; this lock serialises our calls to them (it guards civetweb, holds no state). */
static pthread_mutex_t lib_mu = PTHREAD_MUTEX_INITIALIZER;

static const char *const routes[] = {"/healthz", "/readyz", "/metrics"};

/* --- responses -------------------------------------------------------------------------- */

static int reply(struct mg_connection *c, int status, const char *ctype, const char *body,
                 size_t len)
{
    const struct mg_request_info *ri = mg_get_request_info(c);
    char clen[32];
    snprintf(clen, sizeof(clen), "%zu", len);
    mg_response_header_start(c, status);
    mg_response_header_add(c, "Content-Type", ctype, -1);
    mg_response_header_add(c, "Content-Length", clen, -1);
    mg_response_header_add(c, "Cache-Control", "no-store", -1);
    if (status == 405)
        mg_response_header_add(c, "Allow", "GET, HEAD", -1);
    mg_response_header_send(c);
    if (len && strcmp(ri->request_method, "HEAD") != 0)
        mg_write(c, body, len);
    return status;
}

static int reply_json(struct mg_connection *c, int status, cJSON *doc)
{
    char *body = doc ? cJSON_PrintUnformatted(doc) : NULL;
    int r;
    if (body)
        r = reply(c, status, "application/json", body, strlen(body));
    else
        r = reply(c, 500, "application/json", "{\"error\":\"out of memory\"}", 25);
    cJSON_free(body);
    cJSON_Delete(doc);
    return r;
}

/* 0 when the request is not for exactly path (civetweb also routes "/path/more" here: let it
 * fall through), -1 after answering 405 for a method other than GET or HEAD, 1 to go on. */
static int accept_request(struct mg_connection *c, const char *path, int *status)
{
    const struct mg_request_info *ri = mg_get_request_info(c);
    if (!ri->local_uri || strcmp(ri->local_uri, path) != 0)
        return 0;
    if (strcmp(ri->request_method, "GET") != 0 && strcmp(ri->request_method, "HEAD") != 0) {
        static const char body[] = "{\"error\":\"method not allowed\"}";
        *status = reply(c, 405, "application/json", body, sizeof(body) - 1);
        return -1;
    }
    return 1;
}

/* --- handlers --------------------------------------------------------------------------- */

static int on_healthz(struct mg_connection *c, void *cbdata)
{
    (void)cbdata;
    int status = 0, r = accept_request(c, "/healthz", &status);
    if (r <= 0)
        return r < 0 ? status : 0;
    static const char body[] = "{\"status\":\"ok\"}";
    return reply(c, 200, "application/json", body, sizeof(body) - 1);
}

static int on_readyz(struct mg_connection *c, void *cbdata)
{
    lc_admin *a = cbdata;
    int status = 0, r = accept_request(c, "/readyz", &status);
    if (r <= 0)
        return r < 0 ? status : 0;
    cJSON *doc = cJSON_CreateObject();
    cJSON *checks = cJSON_CreateObject();
    int ready = 1;
    /* while draining, dependencies may already be closing: do not run the checks */
    int draining = atomic_load(&a->draining);
    int n = draining ? 0 : atomic_load_explicit(&a->nchecks, memory_order_acquire);
    for (int i = 0; i < n; i++) {
        lc_err err = {0};
        lc_rc rc = a->checks[i].fn(a->checks[i].ctx, &err);
        if (rc != LC_OK)
            ready = 0;
        if (rc != LC_OK && !err.msg[0])
            err.rc = rc; /* a check that set no message: report its code */
        const char *result = rc == LC_OK ? "ok" : lc_err_msg(&err);
        cJSON_AddStringToObject(checks, a->checks[i].name, result);
    }
    const char *state = draining ? "draining" : ready ? "ready" : "not ready";
    if (!doc || !checks || !cJSON_AddStringToObject(doc, "status", state)) {
        cJSON_Delete(checks);
        cJSON_Delete(doc);
        return reply_json(c, 500, NULL);
    }
    cJSON_AddItemToObject(doc, "checks", checks);
    return reply_json(c, ready && !draining ? 200 : 503, doc);
}

static int on_metrics(struct mg_connection *c, void *cbdata)
{
    lc_admin *a = cbdata;
    int status = 0, r = accept_request(c, "/metrics", &status);
    if (r <= 0)
        return r < 0 ? status : 0;
    static const char ctype[] = "text/plain; version=0.0.4; charset=utf-8";
    if (!a->metrics)
        return reply(c, 200, ctype, "", 0);
    char *text = lc_metrics_render(a->metrics);
    if (!text)
        return reply(c, 500, "application/json", "{\"error\":\"out of memory\"}", 25);
    r = reply(c, 200, ctype, text, strlen(text));
    free(text);
    return r;
}

static const mg_request_handler handlers[] = {on_healthz, on_readyz, on_metrics};

static int on_log(const struct mg_connection *c, const char *message)
{
    (void)c;
    lc_log_warn("http server message", LC_LS("component", "civetweb"), LC_LS("detail", message));
    return 1; /* handled: civetweb prints nothing itself */
}

/* --- life cycle ------------------------------------------------------------------------- */

static lc_admin *admin_new(lc_metrics *metrics)
{
    lc_admin *a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    if (pthread_mutex_init(&a->add_mu, NULL) != 0) {
        free(a);
        return NULL;
    }
    a->metrics = metrics;
    atomic_init(&a->nchecks, 0);
    atomic_init(&a->draining, 0);
    return a;
}

static void register_handlers(lc_admin *a)
{
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++)
        mg_set_request_handler(a->ctx, routes[i], handlers[i], a);
}

lc_rc lc_admin_start(const char *listen, lc_metrics *metrics, lc_admin **out, lc_err *err)
{
    *out = NULL;
    if (!listen || !*listen)
        return lc_err_set(err, LC_ERR_CONFIG, "admin listen address is empty");
    lc_admin *a = admin_new(metrics);
    if (!a)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory starting admin server");

    /* mg_init_library returns the features it set up, so 0 for 0: its result tells nothing
     * here (it only fails when a pthread mutex cannot be created, and mg_start2 fails then) */
    pthread_mutex_lock(&lib_mu);
    (void)mg_init_library(0);
    pthread_mutex_unlock(&lib_mu);
    a->owns_ctx = 1; /* from here on lc_admin_free releases the library reference */

    struct mg_callbacks cb = {0};
    cb.log_message = on_log;
    const char *opts[] = {"listening_ports",    listen,  "num_threads", "2",
                          "request_timeout_ms", "10000", NULL};
    char etext[256] = "";
    unsigned ecode = 0;
    struct mg_error_data edata = {.code = &ecode, .text = etext, .text_buffer_size = sizeof(etext)};
    struct mg_init_data init = {.callbacks = &cb, .user_data = a, .configuration_options = opts};
    a->ctx = mg_start2(&init, &edata);
    if (!a->ctx) {
        lc_admin_free(a);
        return lc_err_set(err, LC_ERR_UNAVAILABLE, "could not start admin server on \"%s\": %s",
                          listen, etext[0] ? etext : "unknown civetweb error");
    }
    register_handlers(a);
    *out = a;
    return LC_OK;
}

lc_rc lc_admin_attach(struct mg_context *ctx, lc_metrics *metrics, lc_admin **out, lc_err *err)
{
    *out = NULL;
    if (!ctx)
        return lc_err_set(err, LC_ERR_INVALID, "no server to attach the admin endpoints to");
    lc_admin *a = admin_new(metrics);
    if (!a)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory attaching admin endpoints");
    a->ctx = ctx;
    register_handlers(a);
    *out = a;
    return LC_OK;
}

lc_rc lc_admin_add_check(lc_admin *a, const char *name, lc_admin_check_fn fn, void *ctx)
{
    if (!a || !name || !*name || !fn)
        return LC_ERR_INVALID;
    lc_rc rc = LC_OK;
    pthread_mutex_lock(&a->add_mu);
    int n = atomic_load(&a->nchecks);
    if (n >= MAX_CHECKS) {
        rc = LC_ERR_TOO_LARGE;
    } else {
        lc_strlcpy(a->checks[n].name, name, sizeof(a->checks[n].name));
        a->checks[n].fn = fn;
        a->checks[n].ctx = ctx;
        atomic_store_explicit(&a->nchecks, n + 1, memory_order_release);
    }
    pthread_mutex_unlock(&a->add_mu);
    return rc;
}

void lc_admin_set_draining(lc_admin *a)
{
    if (a)
        atomic_store(&a->draining, 1);
}

int lc_admin_port(const lc_admin *a)
{
    struct mg_server_port ports[4];
    if (!a || !a->ctx)
        return -1;
    int n = mg_get_server_ports(a->ctx, 4, ports);
    return n > 0 ? ports[0].port : -1;
}

void lc_admin_free(lc_admin *a)
{
    if (!a)
        return;
    if (a->owns_ctx) {
        if (a->ctx)
            mg_stop(a->ctx); /* joins the workers: no handler runs after this */
        pthread_mutex_lock(&lib_mu);
        mg_exit_library();
        pthread_mutex_unlock(&lib_mu);
    }
    pthread_mutex_destroy(&a->add_mu);
    free(a);
}
