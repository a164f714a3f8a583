/*
 * gw.h: the api-gateway's internals: configuration, the gateway context (database pool,
 * civetweb server, admin endpoints, metric handles), the router table and the per-request
 * state handed to handlers. A gw is created and stopped by one thread (main or a test);
 * handlers run on civetweb worker threads and only read the gw, except through the pool,
 * the store and the metrics, which are thread-safe. A gw_req belongs to one worker thread.
 */
#ifndef GW_H
#define GW_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <cjson/cJSON.h>
#include "lc/admin.h"
#include "lc/cfg.h"
#include "lc/db.h"
#include "lc/dicom.h"
#include "lc/kafka.h"
#include "lc/metrics.h"
#include "lc/rc.h"
#include "lc/store.h"

struct mg_connection;
struct mg_context;
struct mg_request_info;
struct lc_service;

/* --- configuration (the table is in gw_server.c) ---------------------------------------- */

typedef struct gw_config {
    char *http_listen;        /* civetweb listening_ports syntax, "127.0.0.1:8080" */
    long long http_threads;   /* civetweb worker threads */
    long long max_body_bytes; /* request bodies above this get 413 */
    long long request_timeout_ms;
    char *spool_dir;        /* request bodies are streamed here first */
    char *admin_token_file; /* "" = no bootstrap token */
    long long db_pool_size;
    char *cors_origins;         /* "" = no CORS, "*" or "https://a,https://b" */
    char *tls_cert_file;        /* "" = plain HTTP; else PEM with the certificate chain and key */
    char *public_url;           /* "" = from the request's Host header; base of RetrieveURL etc. */
    long long upload_max_files; /* instances in one STOW-RS request or zip upload */
    long long zip_max_expanded; /* bytes a zip upload may expand to */
    long long events_max_clients; /* concurrent GET /api/v1/events streams */
} gw_config;

extern const lc_cfg_var gw_cfg_vars[];
extern const size_t gw_cfg_nvars;

/* What the gateway borrows from its surroundings: lc_service in main, hand-made in tests. */
typedef struct gw_deps {
    const char *database_url;   /* the pool connects here (migrations already applied) */
    const char *topic_prefix;   /* "radpipe." */
    const char *source;         /* CloudEvents source, "/radpipe/api-gateway" */
    lc_store *store;            /* borrowed, thread-safe */
    lc_metrics *metrics;        /* borrowed */
    struct lc_service *svc;     /* may be NULL; when set, /readyz also checks the broker */
    const atomic_int *stop;     /* may be NULL; cuts start-up waits short */
    const lc_kafka_conf *kafka; /* may be NULL: GET /api/v1/events then answers 503 */
} gw_deps;

/* --- scopes: admin implies write implies read ------------------------------------------- */

typedef enum gw_scope { GW_SCOPE_NONE = 0, GW_SCOPE_READ, GW_SCOPE_WRITE, GW_SCOPE_ADMIN } gw_scope;
const char *gw_scope_name(gw_scope s);

/* --- routes ---------------------------------------------------------------------------- */

typedef struct gw_req gw_req;
/* A handler sends exactly one response (gw_send_*) and returns its status code. */
typedef int (*gw_handler)(gw_req *r);

/* The query parameters of a route: a NULL-terminated list of names, NULL for none, or
 * gw_query_own when the handler checks them itself (QIDO-RS: any DICOM attribute). The
 * router answers any other parameter the same way on every route: 400 problem+json naming
 * it (after authentication, before the handler runs). */
extern const char *const gw_query_own[];

typedef struct gw_route {
    const char *method;  /* "GET", "POST", ... */
    const char *pattern; /* "/api/v1/studies/{uid}": {name} matches one non-empty segment */
    gw_scope scope;      /* GW_SCOPE_NONE: no token needed */
    gw_handler handler;
    const char *const *query; /* see above */
} gw_route;

/* The router table (for the dispatcher, docs and the OpenAPI test). */
const gw_route *gw_routes(size_t *n);
/* Paths served by lc_admin on the same listener, outside the router table (no auth). */
extern const char *const gw_admin_paths[];
extern const size_t gw_admin_npaths;

/* 1 when path matches pattern; fills up to cap {param} values (pointers into path, with
 * lengths) in order of appearance. */
#define GW_MAX_PARAMS 4
typedef struct gw_param {
    const char *name; /* points into the pattern, not NUL-terminated at '}' */
    size_t name_len;
    char value[2048]; /* NUL-terminated copy; longer segments do not match */
} gw_param;
int gw_route_match(const char *pattern, const char *path, gw_param *params, int *nparams);

/* --- the gateway ----------------------------------------------------------------------- */

/* Label slots of the per-route metrics: one per route, one per admin path, "unmatched". */
#define GW_CODE_SLOTS 32
typedef struct gw_code_slot {
    atomic_int key; /* 0 free, -1 being filled, else method_index * 1000 + code */
    _Atomic(lc_counter *) counter;
} gw_code_slot;

typedef struct gw_route_metrics {
    const char *label;
    lc_histogram *duration;
    gw_code_slot codes[GW_CODE_SLOTS];
} gw_route_metrics;

typedef struct gw_events gw_events; /* gw_events.c: the job.status fan-out */

typedef struct gw {
    const gw_config *cfg; /* borrowed */
    gw_deps deps;
    lc_db_pool *pool;
    struct mg_context *mg;
    lc_admin *admin;
    int port;             /* bound port */
    int cors_any;         /* RADPIPE_CORS_ORIGINS = "*" */
    char **cors;          /* NULL-terminated list of allowed origins (NULL when none) */
    size_t nroutes;       /* router table size */
    gw_route_metrics *rm; /* nroutes + admin paths + 1 ("unmatched") */
    lc_gauge *in_flight;
    lc_counter *bytes_in, *bytes_out;
    lc_counter *stow_stored, *stow_failed; /* instances per STOW-RS outcome */
    lc_gauge *sse_clients;
    gw_events *events;   /* NULL without Kafka */
    int tls;             /* the listener speaks HTTPS */
    int lib_inited;      /* mg_init_library was called */
    atomic_int draining; /* new API requests get 503 */
    atomic_int active;   /* API requests inside the router right now */
} gw;

/* Start serving: spool directory, database pool, bootstrap token, civetweb with the admin
 * endpoints and the router. cfg and deps are borrowed and must outlive the gw. On failure
 * everything started is stopped again. */
lc_rc gw_start(gw *g, const gw_config *cfg, const gw_deps *deps, lc_err *err);
/* The drain, in two steps so a test can look in between: from begin on, /readyz answers 503
 * and new API requests get 503 with Connection: close, while requests already inside (an
 * upload still streaming in) go on; wait returns 1 once none is left, 0 after timeout_ms.
 * (civetweb's mg_stop alone would cut uploads short: its reads end when it stops.) */
void gw_drain_begin(gw *g);
int gw_drain_wait(gw *g, int timeout_ms);
/* Stop the server (mg_stop joins its threads) and free. Accepts a zeroed gw. */
void gw_stop(gw *g);

/* --- per-request state ----------------------------------------------------------------- */

/* Accounting for one request, reset by begin_request and reported by end_request; lives in
 * the civetweb worker thread that serves the request. */
typedef struct gw_tstate {
    int64_t start_ms;
    long long bytes_in, bytes_out;
    int route_index; /* index into gw.rm, -1 when the gateway's router did not see it */
} gw_tstate;

typedef struct gw_req {
    gw *g;
    struct mg_connection *conn;
    const struct mg_request_info *ri;
    const gw_route *route;
    gw_param params[GW_MAX_PARAMS];
    int nparams;
    gw_tstate *ts; /* may be NULL (requests outside a worker thread never happen) */
    lc_db *db;     /* borrowed from the pool by gw_db, returned by gw_db_put / the router */
    int sent;      /* a response was started */
    int body_done; /* the request body was read to its end */
    int chunked;   /* the response body goes out in chunks (gw_send_head with length -1) */
    int gone;      /* a write failed: the client went away */
    /* set by gw_auth_require */
    char token_id[37];
    char token_name[64];
    gw_scope scope;
} gw_req;

/* --- gw_http.c: responses, bodies, query strings, path parameters --------------------- */

/* 1 when a browser page from origin may call the API (RADPIPE_CORS_ORIGINS). */
int gw_cors_allowed(const gw *g, const char *origin);

/* The reason phrase of an HTTP status ("Not Found"), "Unknown" for others. */
const char *gw_status_text(int status);

/* Extra response header lines, e.g. {"Allow", "GET"}; terminated by {NULL, NULL}. */
typedef struct gw_header {
    const char *name;
    const char *value;
} gw_header;

/* Send status with body (len bytes of content_type). Adds CORS headers for allowed origins,
 * Cache-Control: no-store and Content-Length; closes the connection when the request body
 * was not read (so an unread upload is never drained). Returns status. */
int gw_send(gw_req *r, int status, const char *content_type, const void *body, size_t len,
            const gw_header *extra);
/* Serialise json (consumed, also on error) as application/json. */
int gw_send_json(gw_req *r, int status, cJSON *json);
/* RFC 9457 problem details: {"type":"about:blank","title":<reason phrase>,"status","detail"}
 * as application/problem+json. detail is printf-formatted. */
int gw_send_problem(gw_req *r, int status, const gw_header *extra, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* 503 problem with Retry-After, logging err's message at warn (the client sees a summary). */
int gw_send_unavailable(gw_req *r, const char *what, const lc_err *err);

/* A streamed response: send the head now (length -1: Transfer-Encoding: chunked), then the
 * body with gw_write and, for chunked bodies, gw_end. Same headers as gw_send. */
int gw_send_head(gw_req *r, int status, const char *content_type, long long length,
                 const gw_header *extra);
/* Write body bytes (one chunk when chunked), counted in the byte metrics. 0, or -1 once the
 * client is gone (r->gone; later writes do nothing). */
int gw_write(gw_req *r, const void *buf, size_t len);
/* The last chunk of a chunked body. */
void gw_end(gw_req *r);
/* Give up on a response already under way (a read from the store failed): no more writes,
 * and the connection closes so the client sees a truncated body rather than a short one. */
void gw_abort(gw_req *r);

/* The request body in pieces: fn gets every piece as it arrives (at most max bytes in all;
 * a declared Content-Length above max fails before reading, LC_ERR_TOO_LARGE). Sends
 * "100 Continue" when the client expects it. LC_ERR_INVALID when the client sent less than
 * it announced or went away; an error from fn stops the read and is returned. *total (may be
 * NULL) gets the bytes read. */
typedef lc_rc (*gw_body_fn)(void *ctx, const char *buf, size_t len, lc_err *err);
lc_rc gw_body_read(gw_req *r, long long max, gw_body_fn fn, void *ctx, long long *total,
                   lc_err *err);

/* The public base URL ("https://host:port", no trailing slash): RADPIPE_PUBLIC_URL, else the
 * scheme and the request's Host header when it is a plain host[:port], else "". */
void gw_base_url(const gw_req *r, char *buf, size_t cap);

/* Content negotiation: the Accept entry (highest q first; no Accept header accepts anything)
 * whose media range matches one of medias (NULL-terminated, exact types; wildcards in the
 * Accept entry match). Returns the index into medias, -1 when none is acceptable; *type and
 * *ts (may be NULL, 128 bytes) get the entry's type and transfer-syntax parameters ("" when
 * absent). */
int gw_accept_pick(const gw_req *r, const char *const *medias, char *type, char *ts);

/* A request body spooled to a temporary file in the spool directory. */
typedef struct gw_body {
    char path[4096]; /* "" once removed or moved away */
    long long size;
    char sha256[65];
} gw_body;
/* Stream the body into a new temporary file under the spool directory, counting it against
 * max bytes and hashing it. A declared Content-Length above max fails before reading
 * (LC_ERR_TOO_LARGE), as does a chunked body once it grows past max. LC_ERR_INVALID when the
 * client sent less than it announced, LC_ERR_IO when the spool cannot be written. On failure
 * no file is left behind. */
lc_rc gw_body_spool(gw_req *r, long long max, gw_body *body, lc_err *err);
/* Remove the spool file if it is still there. Accepts a zeroed body. */
void gw_body_discard(gw_body *body);

/* Query parameter name (URL-decoded) into buf: 1 found, 0 absent, -1 too long for buf. */
int gw_query(gw_req *r, const char *name, char *buf, size_t cap);
/* When the query string holds a parameter not in allowed (NULL-terminated), copy its name
 * (truncated) into bad and return 1; 0 when every parameter is known. */
int gw_query_unknown(gw_req *r, const char *const *allowed, char *bad, size_t cap);
/* A non-negative integer query parameter within [min, max], else def when absent. Returns
 * 0, or sends 400 and returns -1. */
int gw_query_int(gw_req *r, const char *name, long long def, long long min, long long max,
                 long long *out);
/* The value of path parameter name, or NULL. */
const char *gw_param_get(const gw_req *r, const char *name);
/* The request header value or NULL. */
const char *gw_header_get(const gw_req *r, const char *name);

/* Borrow a pooled connection for this request (kept until gw_db_put or the end of the
 * request). LC_ERR_TIMEOUT when none frees up in time; unavailable when the server is down. */
lc_rc gw_db(gw_req *r, lc_db **out, lc_err *err);
void gw_db_put(gw_req *r);

/* RFC 3339 SQL for a timestamptz column, UTC with milliseconds, so every timestamp the API
 * returns has the same form as lc_time_rfc3339. */
#define GW_TS(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

/* Run a query whose rows hold one JSON text column each; appends every row to arr (when
 * non-NULL) or returns the first row in *one (NULL when no row). */
lc_rc gw_query_json(lc_db *db, const char *sql, int n, const char *const *params, cJSON *arr,
                    cJSON **one, lc_err *err);

/* --- gw_auth.c ------------------------------------------------------------------------- */

/* Check the bearer token for scope. Returns 0 when allowed; otherwise sends 401 (missing or
 * unknown token, with WWW-Authenticate), 403 (without the scope) or 503 (database down) and
 * returns that status. */
int gw_auth_require(gw_req *r, gw_scope scope);
/* Upsert the token in cfg->admin_token_file as admin token "bootstrap-admin" (and revoke an
 * earlier bootstrap token with another value). Nothing to do when the file is not set;
 * an unreadable or empty file is logged and skipped. */
lc_rc gw_auth_bootstrap(gw *g, lc_err *err);
/* SHA-256 hex of a token, as stored in api_tokens.token_sha256. */
void gw_token_hash(const char *token, char out[65]);

/* --- gw_ingest.c: spooled DICOM files into the store and the outbox -------------------- */

/* One received file on its way in. */
typedef struct gw_ingest_item {
    char path[4096]; /* spool file; "" once moved or removed */
    long long size;
    char sha256[65];
    char name[256];              /* where it came from, for answers ("part 3", a zip entry name) */
    lc_dicom_header *h;          /* set by gw_ingest_check on success */
    int failure;                 /* PS3.18 Failure Reason when refused (0: accepted) */
    char error[300];             /* why, when refused */
    char key[512];               /* object key once stored */
    struct gw_ingest_sync *sync; /* the spool file's fsync, queued or done (NULL: none yet) */
} gw_ingest_item;

/* Parse the header and check the UIDs (and, when study_uid is given, that the instance
 * belongs to it). On refusal sets item->failure and item->error and returns LC_ERR_DICOM (or
 * LC_ERR_CONFLICT for a study mismatch); another rc means the check itself failed. */
lc_rc gw_ingest_check(gw_req *r, gw_ingest_item *item, const char *study_uid, lc_err *err);
/* Move every accepted item (failure == 0) into the store and write their instance.stored
 * events to the outbox in one transaction (source kind, named by the token). LC_OK or the
 * failing dependency's rc; items already moved stay in the store (a retry replaces them). */
lc_rc gw_ingest_commit(gw_req *r, gw_ingest_item *items, size_t n, const char *source_kind,
                       lc_err *err);
/* Wait for queued fsyncs, remove spool files and free headers. */
void gw_ingest_release(gw_ingest_item *items, size_t n);
/* The spool file of a new item (mkostemp); returns the fd or -1 (err filled). */
int gw_ingest_spool_open(gw_req *r, gw_ingest_item *item, lc_err *err);
/* The spool file of items[i] is complete: queue its fsync, which runs while the request goes
 * on; fd is consumed (closed once the fsync is done; at most a few per request stay open). */
lc_rc gw_ingest_spool_close(gw_ingest_item *items, size_t i, int fd, lc_err *err);

/* 1 when the Content-Type's media type (parameters ignored) is type, case-insensitively. */
int gw_media_type_is(const char *ct, const char *type);

/* --- handlers -------------------------------------------------------------------------- */

int gw_instances_post(gw_req *r);
int gw_studies_list(gw_req *r);
int gw_studies_get(gw_req *r);
int gw_studies_complete(gw_req *r);
int gw_jobs_get(gw_req *r);
/* gw_models.c: the models the gpu-segmenters hold resident (table models) */
int gw_models_list(gw_req *r);
int gw_models_get(gw_req *r);
int gw_jobs_list(gw_req *r);
int gw_jobs_create(gw_req *r);
int gw_jobs_retry(gw_req *r);
int gw_jobs_cancel(gw_req *r);
int gw_jobs_artifact(gw_req *r);
int gw_events_stream(gw_req *r);
/* DICOMweb (PS3.18) under /dicomweb */
int gw_stow(gw_req *r);
int gw_qido_studies(gw_req *r);
int gw_qido_series(gw_req *r);
int gw_qido_instances(gw_req *r);
int gw_wado_retrieve(gw_req *r);
int gw_wado_metadata(gw_req *r);
int gw_wado_frames(gw_req *r);
int gw_wado_bulk(gw_req *r);
/* Make the relative BulkDataURIs of DICOM JSON from instance_metadata (the indexer's
 * "bulk/<tag>[/<item>/<tag>...]", lc/dicom.h) absolute URLs under inst_url (the instance's
 * WADO-RS URL) that gw_wado_bulk serves; node is changed in place (gw_wado.c). */
void gw_bulk_uris_absolute(cJSON *node, const char *inst_url);
/* application/zip bodies of POST /api/v1/instances (gw_zip.c) */
int gw_zip_post(gw_req *r);

/* --- gw_events.c: job.status to Server-Sent Events ------------------------------------- */

/* Start the consumer thread (a Kafka consumer at the end of job.status that commits
 * nothing, so every gateway sees every event). */
lc_rc gw_events_start(gw *g, lc_err *err);
/* Wake the streams (they end while draining) and stop the thread. Accepts NULL. */
void gw_events_stop(gw_events *ev);
/* 1 once the consumer has its partitions (for tests). */
int gw_events_ready(const gw_events *ev);

/* --- gw_ui.c: the web UI's files under /ui/ (no token: they hold no data) ----------------- */
int gw_ui_serve(gw_req *r);

/* --- gw_tls.c -------------------------------------------------------------------------- */

/* Make TLS usable by civetweb (see gw_tls.c) and return the listening_ports value with the
 * ports marked for TLS ("127.0.0.1:8443s") in buf. */
lc_rc gw_tls_prepare(const gw_config *cfg, char *ports, size_t cap, lc_err *err);

/* --- gw_token.c: `api-gateway token create|list|revoke` --------------------------------- */

/* Handle argv when argv[1] is "token": returns the exit code; -1 when argv is not a token
 * command. */
int gw_token_main(int argc, char **argv);

#endif
