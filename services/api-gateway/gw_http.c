/*
 * gw_http.c: HTTP helpers for the gateway's handlers: responses (JSON, RFC 9457 problem
 * details, CORS headers), request bodies streamed to a spool file under a size limit while
 * hashed, query-string and path parameters, and the per-request database connection.
 * Every function works on one gw_req, owned by the civetweb worker thread serving it.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <civetweb.h>
#include <libpq-fe.h>
#include "gw.h"
#include "gw_multipart.h"
#include "lc/log.h"
#include "lc/util.h"

/* Bodies up to this size that a handler did not read are drained by civetweb so the
 * connection stays usable; anything larger (or of unknown size) closes the connection. */
#define GW_DRAIN_MAX  (64 * 1024)
#define GW_DB_WAIT_MS 5000

const char *gw_status_text(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 406:
        return "Not Acceptable";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 413:
        return "Content Too Large";
    case 415:
        return "Unsupported Media Type";
    case 422:
        return "Unprocessable Content";
    case 429:
        return "Too Many Requests";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 503:
        return "Service Unavailable";
    default:
        return "Unknown";
    }
}

int gw_cors_allowed(const gw *g, const char *origin)
{
    size_t n;
    if (!origin || !*origin)
        return 0;
    if (g->cors_any)
        return 1;
    n = strlen(origin);
    while (n && origin[n - 1] == '/')
        n--;
    for (char **p = g->cors; p && *p; p++)
        if (strlen(*p) == n && strncasecmp(*p, origin, n) == 0)
            return 1;
    return 0;
}

const char *gw_header_get(const gw_req *r, const char *name)
{
    return mg_get_header(r->conn, name);
}

const char *gw_param_get(const gw_req *r, const char *name)
{
    size_t n = strlen(name);
    for (int i = 0; i < r->nparams; i++)
        if (r->params[i].name_len == n && strncmp(r->params[i].name, name, n) == 0)
            return r->params[i].value;
    return NULL;
}

/* 1 when the request carries a body this handler has not read to its end. */
static int body_pending(const gw_req *r)
{
    if (r->body_done)
        return 0;
    if (r->ri->content_length > 0)
        return 1;
    if (r->ri->content_length == 0)
        return 0;
    const char *te = gw_header_get(r, "Transfer-Encoding");
    return te && strcasecmp(te, "identity") != 0;
}

/* Append to a response head; *n counts what would have been written, so an overflow shows. */
static void __attribute__((format(printf, 4, 5)))
head_add(char *buf, size_t cap, size_t *n, const char *fmt, ...)
{
    va_list ap;
    if (*n >= cap)
        return;
    va_start(ap, fmt);
    int k = vsnprintf(buf + *n, cap - *n, fmt, ap);
    va_end(ap);
    *n += k > 0 ? (size_t)k : 0;
}

/* 1 when the client asked to close the connection after this response. */
static int client_closes(const gw_req *r)
{
    const char *c = gw_header_get(r, "Connection");
    return c && strcasecmp(c, "close") == 0;
}

/* The response head is written by hand (mg_printf) rather than with mg_response_header_*:
 * civetweb 1.15 refuses those once anything was written, and an upload handler has to write
 * "100 Continue" before it reads the body, or every client that sends Expect (curl does above
 * 1 MiB) waits a second per request. */
int gw_send_head(gw_req *r, int status, const char *content_type, long long length,
                 const gw_header *extra)
{
    struct mg_connection *c = r->conn;
    const char *origin = gw_header_get(r, "Origin");
    char head[4096], date[64];
    size_t n = 0;
    int close_conn = client_closes(r);
    struct tm tm;
    time_t now = time(NULL);

    if (r->sent) {
        lc_log_error("a second response for one request was dropped", LC_LI("status", status));
        return status;
    }
    r->sent = 1;
    /* An upload we refused (413, 401, 415, ...) may be gigabytes: close instead of draining. */
    if (body_pending(r) && (r->ri->content_length < 0 || r->ri->content_length > GW_DRAIN_MAX)) {
        mg_disable_connection_keep_alive(c);
        close_conn = 1;
    }
    gmtime_r(&now, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S GMT", &tm);
    head_add(head, sizeof(head), &n,
             "HTTP/1.1 %d %s\r\nDate: %s\r\nCache-Control: no-store\r\n"
             "X-Content-Type-Options: nosniff\r\n",
             status, gw_status_text(status), date);
    if (content_type)
        head_add(head, sizeof(head), &n, "Content-Type: %s\r\n", content_type);
    if (length < 0) {
        head_add(head, sizeof(head), &n, "Transfer-Encoding: chunked\r\n");
        r->chunked = 1;
    } else if (status != 204 && status != 304) {
        head_add(head, sizeof(head), &n, "Content-Length: %lld\r\n", length);
    }
    if (close_conn)
        head_add(head, sizeof(head), &n, "Connection: close\r\n");
    if (origin && gw_cors_allowed(r->g, origin) && !strpbrk(origin, "\r\n"))
        head_add(head, sizeof(head), &n,
                 "Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n"
                 "Access-Control-Expose-Headers: Content-Range, Content-Location, Location, "
                 "Warning, Retry-After, Accept-Ranges, WWW-Authenticate\r\n",
                 origin);
    for (const gw_header *h = extra; h && h->name; h++)
        head_add(head, sizeof(head), &n, "%s: %s\r\n", h->name, h->value);
    head_add(head, sizeof(head), &n, "\r\n");
    if (n >= sizeof(head)) { /* only a bug (huge extra headers) gets here */
        lc_log_error("response head too long", LC_LI("status", status));
        mg_disable_connection_keep_alive(c);
        r->gone = 1;
        return status;
    }
    if (mg_write(c, head, n) <= 0)
        r->gone = 1;
    return status;
}

int gw_write(gw_req *r, const void *buf, size_t len)
{
    char hdr[24];
    if (r->gone)
        return -1;
    if (len == 0 || strcmp(r->ri->request_method, "HEAD") == 0)
        return 0;
    if (r->chunked) {
        int k = snprintf(hdr, sizeof(hdr), "%zx\r\n", len);
        if (mg_write(r->conn, hdr, (size_t)k) <= 0)
            r->gone = 1;
    }
    if (!r->gone && mg_write(r->conn, buf, len) <= 0)
        r->gone = 1;
    if (!r->gone && r->chunked && mg_write(r->conn, "\r\n", 2) <= 0)
        r->gone = 1;
    if (r->gone) {
        mg_disable_connection_keep_alive(r->conn);
        return -1;
    }
    if (r->ts)
        r->ts->bytes_out += (long long)len;
    lc_counter_add(r->g->bytes_out, (double)len);
    return 0;
}

void gw_end(gw_req *r)
{
    if (!r->chunked || r->gone || strcmp(r->ri->request_method, "HEAD") == 0)
        return;
    if (mg_write(r->conn, "0\r\n\r\n", 5) <= 0) {
        r->gone = 1;
        mg_disable_connection_keep_alive(r->conn);
    }
}

void gw_abort(gw_req *r)
{
    r->gone = 1;
    mg_disable_connection_keep_alive(r->conn);
}

int gw_send(gw_req *r, int status, const char *content_type, const void *body, size_t len,
            const gw_header *extra)
{
    gw_send_head(r, status, content_type, (long long)len, extra);
    gw_write(r, body, len);
    return status;
}

int gw_send_json(gw_req *r, int status, cJSON *json)
{
    char *s = json ? cJSON_PrintUnformatted(json) : NULL;
    cJSON_Delete(json);
    if (!s) {
        static const char oom[] = "{\"type\":\"about:blank\",\"title\":\"Internal Server Error\","
                                  "\"status\":500,\"detail\":\"out of memory\"}";
        return gw_send(r, 500, "application/problem+json", oom, sizeof(oom) - 1, NULL);
    }
    status = gw_send(r, status, "application/json", s, strlen(s), NULL);
    free(s);
    return status;
}

int gw_send_problem(gw_req *r, int status, const gw_header *extra, const char *fmt, ...)
{
    char detail[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    cJSON *o = cJSON_CreateObject();
    char *s = NULL;
    if (o && cJSON_AddStringToObject(o, "type", "about:blank") &&
        cJSON_AddStringToObject(o, "title", gw_status_text(status)) &&
        cJSON_AddNumberToObject(o, "status", status) &&
        cJSON_AddStringToObject(o, "detail", detail))
        s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!s)
        return gw_send(r, status, "text/plain", "out of memory\n", 14, extra);
    status = gw_send(r, status, "application/problem+json", s, strlen(s), extra);
    free(s);
    return status;
}

int gw_send_unavailable(gw_req *r, const char *what, const lc_err *err)
{
    static const gw_header h[] = {{"Retry-After", "5"}, {NULL, NULL}};
    lc_log_warn("request failed: dependency unavailable", LC_LS("what", what),
                LC_LS("error", lc_err_msg(err)), LC_LS("route", r->route ? r->route->pattern : ""));
    return gw_send_problem(r, 503, h, "%s is unavailable; retry later", what);
}

/* --- request bodies --------------------------------------------------------------------- */

static int write_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

lc_rc gw_body_read(gw_req *r, long long max, gw_body_fn fn, void *ctx, long long *total_out,
                   lc_err *err)
{
    enum { BUFSZ = 256 * 1024 };
    long long declared = r->ri->content_length, total = 0;
    char *buf = NULL;
    lc_rc rc = LC_OK;

    if (total_out)
        *total_out = 0;
    if (declared > max)
        return lc_err_set(err, LC_ERR_TOO_LARGE,
                          "request body of %lld bytes is over the limit of %lld bytes", declared,
                          max);
    if (!(buf = malloc(BUFSZ)))
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    /* the client waits for this before it sends the body (civetweb does not send it) */
    const char *expect = gw_header_get(r, "Expect");
    if (expect && strcasecmp(expect, "100-continue") == 0 && r->ri->http_version &&
        strcmp(r->ri->http_version, "1.1") == 0)
        mg_printf(r->conn, "HTTP/1.1 100 Continue\r\n\r\n");
    for (;;) {
        int n = mg_read(r->conn, buf, BUFSZ);
        if (n < 0) {
            rc = lc_err_set(err, LC_ERR_INVALID,
                            "could not read the request body after %lld "
                            "bytes (client gone or timed out)",
                            total);
            goto out;
        }
        if (n == 0)
            break;
        total += n;
        if (r->ts)
            r->ts->bytes_in += n;
        lc_counter_add(r->g->bytes_in, n);
        if (total > max) { /* chunked or unannounced: counted as it arrives */
            rc = lc_err_set(err, LC_ERR_TOO_LARGE, "request body is over the limit of %lld bytes",
                            max);
            goto out;
        }
        if ((rc = fn(ctx, buf, (size_t)n, err)) != LC_OK)
            goto out;
    }
    if (declared >= 0 && total != declared) {
        rc = lc_err_set(err, LC_ERR_INVALID, "request body ended after %lld of %lld bytes", total,
                        declared);
        goto out;
    }
    r->body_done = 1;
out:
    if (total_out)
        *total_out = total;
    free(buf);
    return rc;
}

typedef struct spool_ctx {
    int fd;
    lc_sha256 *h;
    const char *path;
} spool_ctx;

static lc_rc spool_piece(void *arg, const char *buf, size_t len, lc_err *err)
{
    spool_ctx *c = arg;
    if (write_all(c->fd, buf, len) != 0)
        return lc_err_set(err, LC_ERR_IO, "could not write the spool file \"%s\": %s", c->path,
                          strerror(errno));
    lc_sha256_update(c->h, buf, len);
    return LC_OK;
}

lc_rc gw_body_spool(gw_req *r, long long max, gw_body *b, lc_err *err)
{
    spool_ctx c = {.fd = -1};
    lc_rc rc = LC_OK;

    memset(b, 0, sizeof(*b));
    if (r->ri->content_length > max)
        return lc_err_set(err, LC_ERR_TOO_LARGE,
                          "request body of %lld bytes is over the limit of %lld bytes",
                          r->ri->content_length, max);
    if (snprintf(b->path, sizeof(b->path), "%s/upload-XXXXXX", r->g->cfg->spool_dir) >=
        (int)sizeof(b->path))
        return lc_err_set(err, LC_ERR_IO, "the spool directory path is too long");
    if ((c.fd = mkostemp(b->path, O_CLOEXEC)) < 0) {
        rc = lc_err_set(err, LC_ERR_IO, "could not create a spool file in \"%s\": %s",
                        r->g->cfg->spool_dir, strerror(errno));
        b->path[0] = '\0';
        goto out;
    }
    c.path = b->path;
    if (!(c.h = lc_sha256_new())) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    if ((rc = gw_body_read(r, max, spool_piece, &c, &b->size, err)) != LC_OK)
        goto out;
    lc_sha256_final_hex(c.h, b->sha256);
out:
    if (c.fd >= 0 && close(c.fd) != 0 && rc == LC_OK)
        rc = lc_err_set(err, LC_ERR_IO, "could not write the spool file \"%s\": %s", b->path,
                        strerror(errno));
    lc_sha256_free(c.h);
    if (rc != LC_OK)
        gw_body_discard(b);
    return rc;
}

void gw_body_discard(gw_body *b)
{
    if (!b || !b->path[0])
        return;
    if (unlink(b->path) != 0 && errno != ENOENT)
        lc_log_warn("could not remove a spool file", LC_LS("path", b->path),
                    LC_LS("error", strerror(errno)));
    b->path[0] = '\0';
}

/* --- query strings ---------------------------------------------------------------------- */

int gw_query(gw_req *r, const char *name, char *buf, size_t cap)
{
    const char *qs = r->ri->query_string;
    if (!qs)
        return 0;
    int n = mg_get_var(qs, strlen(qs), name, buf, cap);
    if (n == -1)
        return 0;
    return n < 0 ? -1 : 1;
}

int gw_query_unknown(gw_req *r, const char *const *allowed, char *bad, size_t cap)
{
    const char *qs = r->ri->query_string;
    char name[128];
    for (const char *p = qs; p && *p;) {
        size_t len = strcspn(p, "&");
        size_t nlen = strcspn(p, "=&");
        if (len) {
            int k = mg_url_decode(p, (int)nlen, name, sizeof(name), 1);
            int known = 0;
            for (const char *const *a = allowed; k >= 0 && *a && !known; a++)
                known = strcmp(name, *a) == 0;
            if (!known) {
                if (k < 0)
                    lc_strlcpy(name, "(too long)", sizeof(name));
                lc_strlcpy(bad, name, cap);
                return 1;
            }
        }
        p += len + (p[len] == '&');
    }
    return 0;
}

int gw_query_int(gw_req *r, const char *name, long long def, long long min, long long max,
                 long long *out)
{
    char buf[32];
    int found = gw_query(r, name, buf, sizeof(buf));
    *out = def;
    if (found == 0)
        return 0;
    if (found > 0 && buf[0] && strlen(buf) <= 18 && strspn(buf, "0123456789") == strlen(buf)) {
        long long v = strtoll(buf, NULL, 10);
        if (v >= min && v <= max) {
            *out = v;
            return 0;
        }
    }
    gw_send_problem(r, 400, NULL,
                    "invalid value for query parameter \"%s\": must be an integer from %lld to "
                    "%lld",
                    name, min, max);
    return -1;
}

/* --- database --------------------------------------------------------------------------- */

lc_rc gw_db(gw_req *r, lc_db **out, lc_err *err)
{
    if (!r->db) {
        lc_rc rc = lc_db_pool_get(r->g->pool, GW_DB_WAIT_MS, &r->db, err);
        if (rc != LC_OK)
            return rc;
    }
    *out = r->db;
    return LC_OK;
}

void gw_db_put(gw_req *r)
{
    if (r->db)
        lc_db_pool_put(r->g->pool, r->db);
    r->db = NULL;
}

lc_rc gw_query_json(lc_db *db, const char *sql, int n, const char *const *params, cJSON *arr,
                    cJSON **one, lc_err *err)
{
    PGresult *res = NULL;
    lc_rc rc = lc_db_exec(db, sql, n, params, &res, err);
    if (one)
        *one = NULL;
    if (rc != LC_OK)
        return rc;
    int rows = PQntuples(res);
    for (int i = 0; i < rows && rc == LC_OK; i++) {
        cJSON *row = cJSON_Parse(PQgetvalue(res, i, 0));
        if (!row) {
            rc = lc_err_set(err, LC_ERR_INTERNAL, "the database returned invalid JSON");
        } else if (arr) {
            cJSON_AddItemToArray(arr, row);
        } else if (one) {
            *one = row;
            break;
        } else {
            cJSON_Delete(row);
        }
    }
    PQclear(res);
    return rc;
}

/* --- URLs and content negotiation -------------------------------------------------------- */

int gw_media_type_is(const char *ct, const char *type)
{
    size_t n = strlen(type);
    if (!ct)
        return 0;
    while (*ct == ' ' || *ct == '\t')
        ct++;
    if (strncasecmp(ct, type, n) != 0)
        return 0;
    ct += n;
    while (*ct == ' ' || *ct == '\t')
        ct++;
    return *ct == '\0' || *ct == ';';
}

void gw_base_url(const gw_req *r, char *buf, size_t cap)
{
    const char *pub = r->g->cfg->public_url;
    buf[0] = '\0';
    if (pub && *pub) {
        size_t n = strlen(pub);
        while (n && pub[n - 1] == '/')
            n--;
        snprintf(buf, cap, "%.*s", (int)n, pub);
        return;
    }
    const char *host = gw_header_get(r, "Host");
    /* only a plain host[:port] (or [v6]:port) may end up in URLs we hand out */
    if (!host || !*host || strlen(host) > 255 ||
        strspn(host, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]") !=
            strlen(host))
        return;
    snprintf(buf, cap, "%s://%s", r->g->tls ? "https" : "http", host);
}

/* The next comma-separated Accept entry (commas inside quotes do not split). */
static const char *accept_next(const char *p, char *out, size_t cap)
{
    size_t n = 0;
    int quoted = 0;
    while (*p == ' ' || *p == ',')
        p++;
    if (!*p)
        return NULL;
    for (; *p && (quoted || *p != ','); p++) {
        if (*p == '"')
            quoted = !quoted;
        if (n + 1 < cap)
            out[n++] = *p;
    }
    out[n] = '\0';
    return p;
}

static int range_matches(const char *range, const char *media)
{
    if (strcmp(range, "*/*") == 0 || strcasecmp(range, media) == 0)
        return 1;
    size_t n = strlen(range);
    const char *slash = strchr(media, '/');
    return n > 2 && strcmp(range + n - 2, "/*") == 0 && slash && (size_t)(slash - media) == n - 2 &&
           strncasecmp(range, media, n - 2) == 0;
}

int gw_accept_pick(const gw_req *r, const char *const *medias, char *type, char *ts)
{
    const char *accept = gw_header_get(r, "Accept");
    char entry[512];
    int best = -1, best_q = -1;
    if (type)
        type[0] = '\0';
    if (ts)
        ts[0] = '\0';
    if (!accept || !*accept)
        accept = "*/*";
    for (const char *p = accept; (p = accept_next(p, entry, sizeof(entry))) != NULL;) {
        gw_mp_ctype ct;
        if (gw_mp_parse_ctype(entry, &ct, NULL) != LC_OK || ct.q <= best_q || ct.q == 0)
            continue;
        for (int i = 0; medias[i]; i++) {
            if (!range_matches(ct.media, medias[i]))
                continue;
            best = i;
            best_q = ct.q;
            if (type)
                lc_strlcpy(type, ct.type, 128);
            if (ts)
                lc_strlcpy(ts, ct.ts, 128);
            break;
        }
    }
    return best;
}
