/*
 * gw_server.c: the gateway's HTTP server: configuration table, router table, civetweb set-up
 * with the admin endpoints attached, per-route metrics, one JSON access-log line per request,
 * and the drain. gw_start/gw_stop/gw_drain_* run on one thread; the router and the callbacks
 * run on civetweb worker threads, each with its own gw_tstate (the thread pointer), and share
 * only the gw (read-only after start but for two atomics), the pool, the store and metrics.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <civetweb.h>
#include "gw.h"
#include "lc/log.h"
#include "lc/service.h"
#include "lc/util.h"

#define OFF(f) offsetof(gw_config, f)

const lc_cfg_var gw_cfg_vars[] = {
    {"RADPIPE_HTTP_LISTEN", LC_CFG_STR, "127.0.0.1:8080", 0, -1, 0, NULL,
     "API listener (HOST:PORT or PORT, civetweb listening_ports syntax); also serves /healthz, "
     "/readyz and /metrics",
     OFF(http_listen)},
    {"RADPIPE_HTTP_THREADS", LC_CFG_INT, "16", 1, 1024, 0, NULL,
     "HTTP worker threads: the most requests served at once", OFF(http_threads)},
    {"RADPIPE_HTTP_MAX_BODY_BYTES", LC_CFG_BYTES, "2G", 1, 1099511627776.0, 0, NULL,
     "largest request body accepted (K, M, G suffixes); larger uploads get 413",
     OFF(max_body_bytes)},
    {"RADPIPE_HTTP_REQUEST_TIMEOUT_MS", LC_CFG_INT, "300000", 1000, 86400000, 0, NULL,
     "how long the server waits on a client's socket before giving up on the request",
     OFF(request_timeout_ms)},
    {"RADPIPE_SPOOL_DIR", LC_CFG_STR, "var/spool", 0, -1, 0, NULL,
     "where request bodies are streamed before they are stored (created at start); keep it on "
     "the file system of a file:// store so objects are renamed, not copied, into place",
     OFF(spool_dir)},
    {"RADPIPE_ADMIN_TOKEN_FILE", LC_CFG_STR, NULL, 0, -1, 0, NULL,
     "file holding a bearer token installed at start as the admin token \"bootstrap-admin\"",
     OFF(admin_token_file)},
    {"RADPIPE_DB_POOL_SIZE", LC_CFG_INT, "8", 1, 256, 0, NULL,
     "database connections shared by the HTTP worker threads", OFF(db_pool_size)},
    {"RADPIPE_CORS_ORIGINS", LC_CFG_STR, "", 0, -1, 0, NULL,
     "origins allowed to call the API from a browser: comma-separated list or *; empty sends "
     "no CORS headers",
     OFF(cors_origins)},
    {"RADPIPE_TLS_CERT_FILE", LC_CFG_STR, "", 0, -1, 0, NULL,
     "PEM file with the server certificate chain and its private key; when set the listener "
     "speaks HTTPS only (TLS 1.2 or later)",
     OFF(tls_cert_file)},
    {"RADPIPE_PUBLIC_URL", LC_CFG_STR, "", 0, -1, 0, NULL,
     "base URL clients reach the gateway at (https://pacs.example.org), used in DICOMweb "
     "RetrieveURL and BulkDataURI; empty: taken from each request's Host header",
     OFF(public_url)},
    {"RADPIPE_UPLOAD_MAX_FILES", LC_CFG_INT, "1000", 1, 100000, 0, NULL,
     "most instances in one STOW-RS request or one zip upload; more get 413",
     OFF(upload_max_files)},
    {"RADPIPE_ZIP_MAX_EXPANDED_BYTES", LC_CFG_BYTES, "8G", 1, 1099511627776.0, 0, NULL,
     "most bytes a zip upload may expand to (K, M, G suffixes); a zip that inflates more than "
     "200-fold is refused as a zip bomb anyway",
     OFF(zip_max_expanded)},
    {"RADPIPE_EVENTS_MAX_CLIENTS", LC_CFG_INT, "8", 0, 1024, 0, NULL,
     "most concurrent GET /api/v1/events streams (each holds an HTTP worker thread); keep it "
     "below RADPIPE_HTTP_THREADS",
     OFF(events_max_clients)},
};
const size_t gw_cfg_nvars = sizeof(gw_cfg_vars) / sizeof(gw_cfg_vars[0]);

/* Query parameters of the routes that take some (gw_route.query). */
const char *const gw_query_own[] = {NULL};
static const char *const q_studies[] = {"limit",
                                        "offset",
                                        "patient_id",
                                        "patient_name",
                                        "modality",
                                        "accession_number",
                                        "study_date",
                                        "study_date_from",
                                        "study_date_to",
                                        "sort",
                                        NULL};
static const char *const q_jobs[] = {"limit", "offset", "state", "kind", "study_instance_uid",
                                     NULL};
static const char *const q_events[] = {"study_instance_uid", "job_id", NULL};
#define QOWN gw_query_own

/* Adding a route is one line here (and one in proto/openapi.yaml: a test checks both). */
static const gw_route routes[] = {
    /* REST API */
    {"POST", "/api/v1/instances", GW_SCOPE_WRITE, gw_instances_post, NULL},
    {"GET", "/api/v1/studies", GW_SCOPE_READ, gw_studies_list, q_studies},
    {"GET", "/api/v1/studies/{uid}", GW_SCOPE_READ, gw_studies_get, NULL},
    {"POST", "/api/v1/studies/{uid}/complete", GW_SCOPE_WRITE, gw_studies_complete, NULL},
    {"POST", "/api/v1/studies/{uid}/jobs", GW_SCOPE_WRITE, gw_jobs_create, NULL},
    {"GET", "/api/v1/jobs", GW_SCOPE_READ, gw_jobs_list, q_jobs},
    {"GET", "/api/v1/jobs/{id}", GW_SCOPE_READ, gw_jobs_get, NULL},
    {"POST", "/api/v1/jobs/{id}/retry", GW_SCOPE_WRITE, gw_jobs_retry, NULL},
    {"POST", "/api/v1/jobs/{id}/cancel", GW_SCOPE_WRITE, gw_jobs_cancel, NULL},
    {"GET", "/api/v1/jobs/{id}/artifacts/{name}", GW_SCOPE_READ, gw_jobs_artifact, NULL},
    {"GET", "/api/v1/events", GW_SCOPE_READ, gw_events_stream, q_events},
    {"GET", "/api/v1/models", GW_SCOPE_READ, gw_models_list, NULL},
    {"GET", "/api/v1/models/{name}", GW_SCOPE_READ, gw_models_get, NULL},
    /* DICOMweb: STOW-RS, QIDO-RS, WADO-RS (PS3.18) */
    {"POST", "/dicomweb/studies", GW_SCOPE_WRITE, gw_stow, NULL},
    {"GET", "/dicomweb/studies", GW_SCOPE_READ, gw_qido_studies, QOWN},
    {"POST", "/dicomweb/studies/{study}", GW_SCOPE_WRITE, gw_stow, NULL},
    {"GET", "/dicomweb/studies/{study}", GW_SCOPE_READ, gw_wado_retrieve, NULL},
    {"GET", "/dicomweb/studies/{study}/metadata", GW_SCOPE_READ, gw_wado_metadata, NULL},
    {"GET", "/dicomweb/studies/{study}/series", GW_SCOPE_READ, gw_qido_series, QOWN},
    {"GET", "/dicomweb/studies/{study}/instances", GW_SCOPE_READ, gw_qido_instances, QOWN},
    {"GET", "/dicomweb/studies/{study}/series/{series}", GW_SCOPE_READ, gw_wado_retrieve, NULL},
    {"GET", "/dicomweb/studies/{study}/series/{series}/metadata", GW_SCOPE_READ, gw_wado_metadata,
     NULL},
    {"GET", "/dicomweb/studies/{study}/series/{series}/instances", GW_SCOPE_READ, gw_qido_instances,
     QOWN},
    {"GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}", GW_SCOPE_READ,
     gw_wado_retrieve, NULL},
    {"GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}/metadata",
     GW_SCOPE_READ, gw_wado_metadata, NULL},
    {"GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
     GW_SCOPE_READ, gw_wado_frames, NULL},
    {"GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}/bulk/{tag}",
     GW_SCOPE_READ, gw_wado_bulk, NULL},
    {"GET", "/dicomweb/series", GW_SCOPE_READ, gw_qido_series, QOWN},
    {"GET", "/dicomweb/instances", GW_SCOPE_READ, gw_qido_instances, QOWN},
};
#undef QOWN
static const size_t nroutes = sizeof(routes) / sizeof(routes[0]);

const char *const gw_admin_paths[] = {"/healthz", "/readyz", "/metrics"};
const size_t gw_admin_npaths = sizeof(gw_admin_paths) / sizeof(gw_admin_paths[0]);
/* per-route metrics slots after the routes and the admin paths */
#define UI_SLOT        (nroutes + gw_admin_npaths)
#define UNMATCHED_SLOT (nroutes + gw_admin_npaths + 1)

const gw_route *gw_routes(size_t *n)
{
    *n = nroutes;
    return routes;
}

const char *gw_scope_name(gw_scope s)
{
    switch (s) {
    case GW_SCOPE_READ:
        return "read";
    case GW_SCOPE_WRITE:
        return "write";
    case GW_SCOPE_ADMIN:
        return "admin";
    default:
        return "none";
    }
}

int gw_route_match(const char *pat, const char *path, gw_param *params, int *nparams)
{
    int np = 0;
    while (*pat && *path) {
        if (*pat == '{') {
            const char *close = strchr(pat, '}');
            size_t seg = strcspn(path, "/");
            if (!close || seg == 0 || seg >= sizeof(params[0].value) || np >= GW_MAX_PARAMS)
                return 0;
            params[np].name = pat + 1;
            params[np].name_len = (size_t)(close - pat - 1);
            memcpy(params[np].value, path, seg);
            params[np].value[seg] = '\0';
            np++;
            pat = close + 1;
            path += seg;
            continue;
        }
        if (*pat++ != *path++)
            return 0;
    }
    if (*pat || *path)
        return 0;
    *nparams = np;
    return 1;
}

/* --- metrics ---------------------------------------------------------------------------- */

/* Method labels are a fixed set: a client cannot grow the metric registry with odd verbs. */
static const char *const method_names[] = {"OTHER",  "GET",   "POST", "PUT",
                                           "DELETE", "PATCH", "HEAD", "OPTIONS"};

static int method_index(const char *m)
{
    for (size_t i = 1; i < sizeof(method_names) / sizeof(method_names[0]); i++)
        if (m && strcmp(m, method_names[i]) == 0)
            return (int)i;
    return 0;
}

/* The requests_total counter of (route, method, code): a lock-free slot lookup on the hot
 * path; the registry (locked) only on the first request of each combination. */
static lc_counter *requests_counter(gw *g, gw_route_metrics *m, const char *method, int code)
{
    int mi = method_index(method);
    if (code < 0 || code > 999)
        code = 0;
    int key = mi * 1000 + code;
    char labels[256];
    for (int i = 0; i < GW_CODE_SLOTS; i++) {
        int k = atomic_load(&m->codes[i].key);
        if (k == key)
            return atomic_load(&m->codes[i].counter);
        if (k == 0)
            break;
    }
    snprintf(labels, sizeof(labels), "route=\"%s\",method=\"%s\",code=\"%d\"", m->label,
             method_names[mi], code);
    lc_counter *c = lc_metrics_counter(g->deps.metrics, "radpipe_http_requests_total",
                                       "HTTP requests by route, method and status code", labels);
    for (int i = 0; i < GW_CODE_SLOTS; i++) {
        int zero = 0;
        if (atomic_compare_exchange_strong(&m->codes[i].key, &zero, -1)) {
            atomic_store(&m->codes[i].counter, c);
            atomic_store(&m->codes[i].key, key); /* publishes the counter stored above */
            break;
        }
        if (atomic_load(&m->codes[i].key) == key)
            break;
    }
    return c;
}

static const double duration_buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                          1,     2.5,  5,     10,   30,  60,   300};

static lc_rc metrics_init(gw *g, lc_err *err)
{
    size_t n = nroutes + gw_admin_npaths + 2; /* + the web UI, + "unmatched" */
    lc_metrics *mx = g->deps.metrics;
    char labels[256];
    g->rm = calloc(n, sizeof(*g->rm));
    if (!g->rm)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        gw_route_metrics *m = &g->rm[i];
        m->label = i < nroutes                     ? routes[i].pattern
                   : i < nroutes + gw_admin_npaths ? gw_admin_paths[i - nroutes]
                   : i == UI_SLOT                  ? "/ui/"
                                                   : "unmatched";
        /* routes sharing a pattern (GET and POST of one path) share the histogram handle */
        snprintf(labels, sizeof(labels), "route=\"%s\"", m->label);
        m->duration = lc_metrics_histogram(
            mx, "radpipe_http_request_duration_seconds", "HTTP request duration by route", labels,
            duration_buckets, sizeof(duration_buckets) / sizeof(duration_buckets[0]));
    }
    g->in_flight =
        lc_metrics_gauge(mx, "radpipe_http_in_flight", "API requests being served right now", NULL);
    g->bytes_in = lc_metrics_counter(mx, "radpipe_http_bytes_received_total",
                                     "request body bytes received by API routes", NULL);
    g->bytes_out = lc_metrics_counter(mx, "radpipe_http_bytes_sent_total",
                                      "response body bytes sent by API routes", NULL);
    g->stow_stored =
        lc_metrics_counter(mx, "radpipe_stow_instances_total",
                           "instances received by STOW-RS, by outcome", "outcome=\"stored\"");
    g->stow_failed =
        lc_metrics_counter(mx, "radpipe_stow_instances_total",
                           "instances received by STOW-RS, by outcome", "outcome=\"failed\"");
    g->sse_clients =
        lc_metrics_gauge(mx, "radpipe_http_event_streams", "open GET /api/v1/events streams", NULL);
    return LC_OK;
}

/* --- civetweb callbacks ----------------------------------------------------------------- */

static void *on_init_thread(const struct mg_context *ctx, int thread_type)
{
    (void)ctx;
    if (thread_type != 1) /* only workers serve requests */
        return NULL;
    gw_tstate *ts = calloc(1, sizeof(*ts));
    if (ts)
        ts->route_index = -1;
    return ts;
}

static void on_exit_thread(const struct mg_context *ctx, int thread_type, void *ptr)
{
    (void)ctx;
    (void)thread_type;
    free(ptr);
}

static int on_begin_request(struct mg_connection *conn)
{
    gw_tstate *ts = mg_get_thread_pointer(conn);
    if (ts) {
        ts->start_ms = lc_now_ms();
        ts->bytes_in = ts->bytes_out = 0;
        ts->route_index = -1;
    }
    return 0; /* go on: civetweb picks the handler */
}

/* One access-log line and the per-route metrics for every request that reached a handler,
 * the admin endpoints included. The query string is left out: it can carry patient names. */
static void on_end_request(const struct mg_connection *conn, int status)
{
    gw *g = mg_get_user_data(mg_get_context(conn));
    gw_tstate *ts = mg_get_thread_pointer(conn);
    const struct mg_request_info *ri = mg_get_request_info(conn);
    if (!g || !ts || !ri)
        return;
    const char *path = ri->local_uri ? ri->local_uri : "";
    const char *method = ri->request_method ? ri->request_method : "";
    int64_t ms = lc_now_ms() - ts->start_ms;
    size_t idx = UNMATCHED_SLOT;
    int ours = ts->route_index >= 0;
    if (ours) {
        idx = (size_t)ts->route_index;
    } else {
        for (size_t i = 0; i < gw_admin_npaths; i++)
            if (strcmp(path, gw_admin_paths[i]) == 0)
                idx = nroutes + i;
    }
    gw_route_metrics *m = &g->rm[idx];
    lc_counter_inc(requests_counter(g, m, method, status));
    lc_histogram_observe(m->duration, (double)ms / 1000.0);
    if (ours)
        lc_log_info("request", LC_LS("method", method), LC_LS("uri", path), LC_LI("status", status),
                    LC_LI("bytes", ts->bytes_out), LC_LI("ms", ms),
                    LC_LS("remote", ri->remote_addr), LC_LS("route", m->label));
    else /* served by lc_admin or civetweb itself: the body size is not known here */
        lc_log_info("request", LC_LS("method", method), LC_LS("uri", path), LC_LI("status", status),
                    LC_LI("ms", ms), LC_LS("remote", ri->remote_addr), LC_LS("route", m->label));
}

static int on_log_message(const struct mg_connection *conn, const char *message)
{
    (void)conn;
    lc_log_warn("http server", LC_LS("detail", message));
    return 1; /* civetweb prints nothing itself */
}

/* --- the router ------------------------------------------------------------------------- */

/* Append method to the comma-separated Allow list unless it is there already. */
static void allow_add(char *allow, size_t cap, const char *method)
{
    size_t m = strlen(method), n = strlen(allow);
    for (const char *p = allow; *p;) {
        size_t len = strcspn(p, ",");
        if (len == m && strncmp(p, method, m) == 0)
            return;
        p += len;
        while (*p == ',' || *p == ' ')
            p++;
    }
    if (n + m + 3 < cap)
        snprintf(allow + n, cap - n, "%s%s", n ? ", " : "", method);
}

/* OPTIONS on a known path: the Allow list, plus a CORS preflight answer for allowed origins. */
static int preflight(gw_req *r, const char *allow)
{
    const char *origin = gw_header_get(r, "Origin");
    const char *want = gw_header_get(r, "Access-Control-Request-Method");
    if (origin && want && gw_cors_allowed(r->g, origin)) {
        const gw_header h[] = {{"Allow", allow},
                               {"Access-Control-Allow-Methods", allow},
                               {"Access-Control-Allow-Headers",
                                "Authorization, Content-Type, Accept, Range, If-Range, "
                                "Last-Event-ID"},
                               {"Access-Control-Max-Age", "600"},
                               {NULL, NULL}};
        return gw_send(r, 204, NULL, NULL, 0, h);
    }
    const gw_header h[] = {{"Allow", allow}, {NULL, NULL}};
    return gw_send(r, 204, NULL, NULL, 0, h);
}

/* The one answer to a query parameter the route does not take (gw_route.query): 400 naming
 * it and the parameters the route does take. 0 when every parameter is known. */
static int query_check(gw_req *r)
{
    const char *const *allowed = r->route->query ? r->route->query : (const char *const[]){NULL};
    char bad[64], known[256] = "";
    if (allowed == gw_query_own || !gw_query_unknown(r, allowed, bad, sizeof(bad)))
        return 0;
    for (const char *const *a = allowed; *a; a++)
        snprintf(known + strlen(known), sizeof(known) - strlen(known), "%s%s",
                 a == allowed ? "" : ", ", *a);
    if (!known[0])
        return gw_send_problem(r, 400, NULL,
                               "unknown query parameter \"%s\": this resource takes no query "
                               "parameters",
                               bad);
    return gw_send_problem(r, 400, NULL, "unknown query parameter \"%s\": this resource takes %s",
                           bad, known);
}

static int router(struct mg_connection *conn, void *cbdata)
{
    gw *g = cbdata;
    const struct mg_request_info *ri = mg_get_request_info(conn);
    gw_req r = {.g = g, .conn = conn, .ri = ri, .ts = mg_get_thread_pointer(conn)};
    const char *path = ri->local_uri ? ri->local_uri : "";
    const char *method = ri->request_method ? ri->request_method : "";
    char allow[128] = "";
    int known = -1, status;

    atomic_fetch_add(&g->active, 1);
    lc_gauge_add(g->in_flight, 1);
    for (size_t i = 0; i < nroutes; i++) {
        gw_param p[GW_MAX_PARAMS];
        int np = 0;
        if (!gw_route_match(routes[i].pattern, path, p, &np))
            continue;
        if (known < 0)
            known = (int)i;
        allow_add(allow, sizeof(allow), routes[i].method);
        if (!r.route && strcmp(routes[i].method, method) == 0) {
            r.route = &routes[i];
            memcpy(r.params, p, sizeof(p));
            r.nparams = np;
            known = (int)i;
        }
    }
    if (known >= 0) {
        allow_add(allow, sizeof(allow), "OPTIONS");
        if (r.ts)
            r.ts->route_index = known;
    } else if (r.ts) {
        r.ts->route_index = (int)UNMATCHED_SLOT;
    }

    if (atomic_load(&g->draining)) {
        static const gw_header h[] = {{"Retry-After", "5"}, {NULL, NULL}};
        mg_disable_connection_keep_alive(conn);
        status = gw_send_problem(&r, 503, h, "the server is shutting down; retry later");
    } else if (known < 0 && strcmp(path, "/") == 0) {
        status = gw_ui_serve(&r); /* a redirect to the web UI */
    } else if (known < 0) {
        status = gw_send_problem(&r, 404, NULL, "no resource at this path");
    } else if (strcmp(method, "OPTIONS") == 0) {
        status = preflight(&r, allow);
    } else if (!r.route) {
        const gw_header h[] = {{"Allow", allow}, {NULL, NULL}};
        status = gw_send_problem(&r, 405, h, "method %.16s is not allowed here (allowed: %s)",
                                 method, allow);
    } else if ((r.route->scope == GW_SCOPE_NONE ||
                (status = gw_auth_require(&r, r.route->scope)) == 0) &&
               (status = query_check(&r)) == 0) {
        status = r.route->handler(&r);
    }
    if (!r.sent) {
        lc_log_error("handler sent no response", LC_LS("route", r.route ? r.route->pattern : ""));
        status = gw_send_problem(&r, 500, NULL, "the server did not produce a response");
    }
    gw_db_put(&r);
    lc_gauge_add(g->in_flight, -1);
    atomic_fetch_sub(&g->active, 1);
    return status;
}

/* The web UI's files (gw_ui.c): no token, no router table; counted under route "/ui/". */
static int ui_handler(struct mg_connection *conn, void *cbdata)
{
    gw *g = cbdata;
    gw_req r = {
        .g = g, .conn = conn, .ri = mg_get_request_info(conn), .ts = mg_get_thread_pointer(conn)};
    if (r.ts)
        r.ts->route_index = (int)UI_SLOT;
    if (atomic_load(&g->draining)) {
        mg_disable_connection_keep_alive(conn);
        return gw_send_problem(&r, 503, NULL, "the server is shutting down; retry later");
    }
    return gw_ui_serve(&r);
}

/* --- readiness -------------------------------------------------------------------------- */

static lc_rc check_db(void *ctx, lc_err *err)
{
    gw *g = ctx;
    lc_db *db = NULL;
    lc_rc rc = lc_db_pool_get(g->pool, 1000, &db, err);
    if (rc == LC_OK)
        rc = lc_db_exec(db, "SELECT 1", 0, NULL, NULL, err);
    lc_db_pool_put(g->pool, db);
    return rc;
}

/* --- start and stop --------------------------------------------------------------------- */

static void free_cors(char **list)
{
    if (!list)
        return;
    for (char **p = list; *p; p++)
        free(*p);
    free(list);
}

/* "https://a, https://b" -> {"https://a", "https://b", NULL}; "*" sets cors_any. */
static lc_rc parse_cors(gw *g, const char *s, lc_err *err)
{
    size_t cap = 2, n = 0;
    if (!s || !*s)
        return LC_OK;
    for (const char *p = s; *p; p++)
        cap += *p == ',';
    g->cors = calloc(cap, sizeof(*g->cors));
    if (!g->cors)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    for (const char *p = s; *p;) {
        size_t len = strcspn(p, ",");
        const char *a = p, *b = p + len;
        while (a < b && (*a == ' ' || *a == '\t'))
            a++;
        while (b > a && (b[-1] == ' ' || b[-1] == '\t' || b[-1] == '/'))
            b--;
        if (b - a == 1 && *a == '*')
            g->cors_any = 1;
        else if (b > a && !(g->cors[n++] = strndup(a, (size_t)(b - a))))
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        p += len + (p[len] == ',');
    }
    return LC_OK;
}

lc_rc gw_start(gw *g, const gw_config *cfg, const gw_deps *deps, lc_err *err)
{
    char threads[24], timeout[24], etext[256] = "", ports_opt[512];
    unsigned ecode = 0;
    struct mg_callbacks cb;
    struct mg_server_port ports[4];
    lc_rc rc;

    memset(g, 0, sizeof(*g));
    g->cfg = cfg;
    g->deps = *deps;
    g->nroutes = nroutes;
    if ((rc = lc_mkdirs(cfg->spool_dir, 0700, err)) != LC_OK) {
        lc_err_wrap(err, "could not create the spool directory (RADPIPE_SPOOL_DIR)");
        goto out;
    }
    if ((rc = parse_cors(g, cfg->cors_origins, err)) != LC_OK)
        goto out;
    if ((rc = metrics_init(g, err)) != LC_OK)
        goto out;
    rc = lc_db_pool_new(deps->database_url, (int)cfg->db_pool_size, 10000, deps->stop, &g->pool,
                        err);
    if (rc != LC_OK)
        goto out;
    if ((rc = gw_auth_bootstrap(g, err)) != LC_OK)
        goto out;

    snprintf(threads, sizeof(threads), "%lld", cfg->http_threads);
    snprintf(timeout, sizeof(timeout), "%lld", cfg->request_timeout_ms);
    g->tls = cfg->tls_cert_file && *cfg->tls_cert_file;
    if (g->tls) {
        if ((rc = gw_tls_prepare(cfg, ports_opt, sizeof(ports_opt), err)) != LC_OK)
            goto out;
    } else {
        lc_strlcpy(ports_opt, cfg->http_listen, sizeof(ports_opt));
    }
    const char *opts[] = {"listening_ports", ports_opt, "num_threads", threads,
                          "request_timeout_ms", timeout, "enable_keep_alive", "yes",
                          /* the head and the body of a response are separate writes: with
                           * Nagle on, a keep-alive client's delayed ACK stalls each reply
                           * by ~40 ms */
                          "tcp_nodelay", "1", "enable_directory_listing", "no",
                          /* CORS is the router's business (RADPIPE_CORS_ORIGINS) */
                          "access_control_allow_origin", "", "access_control_allow_methods", "",
                          "access_control_allow_headers", "",
                          /* TLS 1.2 or later; only read when a port is marked for TLS */
                          "ssl_certificate", g->tls ? cfg->tls_cert_file : NULL,
                          "ssl_protocol_version", "4", NULL};
    if (!g->tls)
        opts[sizeof(opts) / sizeof(opts[0]) - 5] = NULL; /* end before the TLS options */
    memset(&cb, 0, sizeof(cb));
    cb.begin_request = on_begin_request;
    cb.end_request = on_end_request;
    cb.log_message = on_log_message;
    cb.init_thread = on_init_thread;
    cb.exit_thread = on_exit_thread;
    struct mg_init_data init = {.callbacks = &cb, .user_data = g, .configuration_options = opts};
    struct mg_error_data e = {.code = &ecode, .text = etext, .text_buffer_size = sizeof(etext)};
    if (g->tls && !(mg_init_library(MG_FEATURES_TLS) & MG_FEATURES_TLS)) {
        g->lib_inited = 1;
        rc = lc_err_set(err, LC_ERR_CONFIG,
                        "could not initialise TLS in civetweb (OpenSSL not loadable)");
        goto out;
    }
    if (!g->tls)
        mg_init_library(0);
    g->lib_inited = 1;
    if (!(g->mg = mg_start2(&init, &e))) {
        rc = lc_err_set(err, LC_ERR_CONFIG, "could not start the HTTP server on \"%s\": %s",
                        cfg->http_listen, etext[0] ? etext : "unknown error");
        goto out;
    }
    memset(ports, 0, sizeof(ports));
    if (mg_get_server_ports(g->mg, 4, ports) > 0)
        g->port = ports[0].port;
    if ((rc = lc_admin_attach(g->mg, deps->metrics, &g->admin, err)) != LC_OK)
        goto out;
    lc_admin_add_check(g->admin, "database", check_db, g);
    if (deps->svc && deps->svc->producer)
        lc_admin_add_check(g->admin, "kafka", lc_service_check_kafka, deps->svc);
    mg_set_request_handler(g->mg, "/", router, g);
    mg_set_request_handler(g->mg, "/ui", ui_handler, g);
    if ((rc = gw_events_start(g, err)) != LC_OK)
        goto out;
    lc_log_info("listening", LC_LS("listen", cfg->http_listen), LC_LI("port", g->port),
                LC_LB("tls", g->tls), LC_LI("threads", cfg->http_threads),
                LC_LI("max_body_bytes", cfg->max_body_bytes));
out:
    if (rc != LC_OK)
        gw_stop(g);
    return rc;
}

void gw_drain_begin(gw *g)
{
    atomic_store(&g->draining, 1);
    if (g->admin)
        lc_admin_set_draining(g->admin);
}

int gw_drain_wait(gw *g, int timeout_ms)
{
    int64_t deadline = lc_now_ms() + timeout_ms;
    int left;
    while ((left = atomic_load(&g->active)) > 0 && lc_now_ms() < deadline)
        lc_sleep_ms(20, NULL);
    if (left > 0)
        lc_log_warn("drain time is up: cutting requests short", LC_LI("requests", left));
    return left == 0;
}

void gw_stop(gw *g)
{
    if (!g)
        return;
    gw_drain_begin(g);
    if (g->mg) /* joins the workers: no handler runs after this (event streams end too) */
        mg_stop(g->mg);
    g->mg = NULL;
    gw_events_stop(g->events);
    g->events = NULL;
    lc_admin_free(g->admin);
    g->admin = NULL;
    if (g->lib_inited)
        mg_exit_library();
    g->lib_inited = 0;
    lc_db_pool_free(g->pool);
    g->pool = NULL;
    free(g->rm);
    g->rm = NULL;
    free_cors(g->cors);
    g->cors = NULL;
}
