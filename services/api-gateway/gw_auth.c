/*
 * gw_auth.c: bearer-token authentication. Only the SHA-256 of a token is stored
 * (api_tokens.token_sha256) and looked up, so neither the database nor the logs ever hold a
 * usable token. Scopes nest: admin implies write implies read. No cache: a revoked or
 * expired token stops working on its next request. Thread-safe (state is in the gw_req).
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <libpq-fe.h>
#include "gw.h"
#include "lc/log.h"
#include "lc/util.h"

#define TOKEN_MAX      512
#define BOOTSTRAP_NAME "bootstrap-admin"

/* The token's level in one statement; last_used_at is refreshed at most once a minute so a
 * busy client does not turn every read into a row update. */
static const char lookup_sql[] =
    "WITH t AS (SELECT id, name, scopes, token_sha256 FROM api_tokens"
    "           WHERE token_sha256 = decode($1, 'hex') AND revoked_at IS NULL"
    "             AND (expires_at IS NULL OR expires_at > now())),"
    "     u AS (UPDATE api_tokens SET last_used_at = now()"
    "           WHERE id IN (SELECT id FROM t)"
    "             AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute'))"
    " SELECT id::text, name,"
    "        CASE WHEN 'admin' = ANY (scopes) THEN 3 WHEN 'write' = ANY (scopes) THEN 2"
    "             WHEN 'read' = ANY (scopes) THEN 1 ELSE 0 END,"
    "        encode(token_sha256, 'hex')"
    " FROM t";

void gw_token_hash(const char *token, char out[65])
{
    lc_sha256_hex(token, strlen(token), out);
}

/* 1 when every byte is a visible ASCII character (RFC 6750 b64token and then some). */
static int token_chars_ok(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] <= 0x20 || s[i] >= 0x7f)
            return 0;
    return 1;
}

static int unauthorized(gw_req *r, int invalid, const char *detail)
{
    const gw_header h[] = {
        {"WWW-Authenticate", invalid ? "Bearer realm=\"radpipe\", error=\"invalid_token\""
                                     : "Bearer realm=\"radpipe\""},
        {NULL, NULL}};
    return gw_send_problem(r, 401, h, "%s", detail);
}

int gw_auth_require(gw_req *r, gw_scope need)
{
    const char *h = gw_header_get(r, "Authorization");
    char token[TOKEN_MAX + 1], hash[65];
    PGresult *res = NULL;
    lc_db *db = NULL;
    lc_err err = {0};
    int status = 0;

    if (!h || !*h)
        return unauthorized(r, 0, "this resource needs a bearer token (Authorization: Bearer ...)");
    if (strncasecmp(h, "Bearer ", 7) != 0)
        return unauthorized(r, 0, "the Authorization header must use the Bearer scheme");
    h += 7;
    while (*h == ' ')
        h++;
    size_t n = strlen(h);
    while (n && (h[n - 1] == ' ' || h[n - 1] == '\t'))
        n--;
    if (n == 0 || n > TOKEN_MAX || !token_chars_ok(h, n))
        return unauthorized(r, 1, "the bearer token is malformed");
    memcpy(token, h, n);
    token[n] = '\0';
    gw_token_hash(token, hash);
    memset(token, 0, sizeof(token));

    const char *params[1] = {hash};
    if (gw_db(r, &db, &err) != LC_OK ||
        lc_db_exec_static(db, lookup_sql, 1, params, &res, &err) != LC_OK)
        return gw_send_unavailable(r, "the token database", &err);
    /* the lookup is by hash, so timing tells nothing about the token; the comparison in
     * constant time keeps it that way should the lookup ever change */
    if (PQntuples(res) != 1 || strlen(PQgetvalue(res, 0, 3)) != 64 ||
        !lc_ct_equal(PQgetvalue(res, 0, 3), hash, 64)) {
        status = unauthorized(r, 1, "the bearer token is unknown, revoked or expired");
        goto out;
    }
    lc_strlcpy(r->token_id, PQgetvalue(res, 0, 0), sizeof(r->token_id));
    lc_strlcpy(r->token_name, PQgetvalue(res, 0, 1), sizeof(r->token_name));
    r->scope = (gw_scope)atoi(PQgetvalue(res, 0, 2));
    if (r->scope < need) {
        char www[96];
        snprintf(www, sizeof(www),
                 "Bearer realm=\"radpipe\", error=\"insufficient_scope\", "
                 "scope=\"%s\"",
                 gw_scope_name(need));
        const gw_header hd[] = {{"WWW-Authenticate", www}, {NULL, NULL}};
        status = gw_send_problem(r, 403, hd, "token \"%s\" lacks the \"%s\" scope", r->token_name,
                                 gw_scope_name(need));
    }
out:
    PQclear(res);
    return status;
}

/* --- bootstrap token -------------------------------------------------------------------- */

typedef struct bootstrap_ctx {
    const char *id;
    const char *hash;
} bootstrap_ctx;

static lc_rc bootstrap_tx(lc_db *db, void *arg, lc_err *err)
{
    const bootstrap_ctx *c = arg;
    const char *p2[2] = {c->id, c->hash};
    const char *p1[1] = {c->hash};
    lc_rc rc =
        lc_db_exec(db,
                   "INSERT INTO api_tokens (id, name, token_sha256, scopes)"
                   " VALUES ($1::uuid, '" BOOTSTRAP_NAME "', decode($2, 'hex'), ARRAY['admin'])"
                   " ON CONFLICT (token_sha256) DO UPDATE SET name = EXCLUDED.name,"
                   "   scopes = EXCLUDED.scopes, revoked_at = NULL, expires_at = NULL",
                   2, p2, NULL, err);
    if (rc != LC_OK)
        return rc;
    /* the file is the bootstrap token: a replaced file retires the previous value */
    return lc_db_exec(db,
                      "UPDATE api_tokens SET revoked_at = now()"
                      " WHERE name = '" BOOTSTRAP_NAME "' AND token_sha256 <> decode($1, 'hex')"
                      "   AND revoked_at IS NULL",
                      1, p1, NULL, err);
}

lc_rc gw_auth_bootstrap(gw *g, lc_err *err)
{
    const char *path = g->cfg->admin_token_file;
    char *buf = NULL, hash[65], id[LC_UUID_LEN + 1];
    size_t len = 0;
    lc_db *db = NULL;
    lc_err e = {0};
    lc_rc rc = LC_OK;

    if (!path || !*path)
        return LC_OK;
    if (lc_read_file(path, 4096, &buf, &len, &e) != LC_OK) {
        lc_log_warn("admin token file not readable: no bootstrap token installed",
                    LC_LS("path", path), LC_LS("error", lc_err_msg(&e)));
        return LC_OK;
    }
    char *s = buf, *end = buf + len;
    while (s < end && isspace((unsigned char)*s))
        s++;
    while (end > s && isspace((unsigned char)end[-1]))
        end--;
    *end = '\0';
    if (s == end || (size_t)(end - s) > TOKEN_MAX || !token_chars_ok(s, (size_t)(end - s))) {
        lc_log_warn("admin token file holds no usable token: no bootstrap token installed",
                    LC_LS("path", path));
        goto out;
    }
    gw_token_hash(s, hash);
    lc_uuid_v4(id);
    bootstrap_ctx c = {id, hash};
    if ((rc = lc_db_pool_get(g->pool, 10000, &db, err)) != LC_OK ||
        (rc = lc_db_tx(db, 3, bootstrap_tx, &c, err)) != LC_OK) {
        lc_err_wrap(err, "could not install the bootstrap admin token from \"%s\"", path);
        goto out;
    }
    lc_log_info("bootstrap admin token installed", LC_LS("name", BOOTSTRAP_NAME),
                LC_LS("path", path));
out:
    lc_db_pool_put(g->pool, db);
    if (buf) {
        memset(buf, 0, len);
        free(buf);
    }
    return rc;
}
