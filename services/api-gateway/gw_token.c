/*
 * gw_token.c: `api-gateway token create|list|revoke`, bearer-token administration on the
 * database of RADPIPE_DATABASE_URL (migrated first, so it works on a fresh database).
 * create prints the new token once on stdout (only its SHA-256 is stored); list never prints
 * tokens; revoke takes a token id or a name (every active token of that name).
 * Single-threaded command-line code.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libpq-fe.h>
#include "gw.h"
#include "lc/log.h"
#include "lc/service.h"
#include "lc/util.h"

static void usage(FILE *out)
{
    fputs("usage: api-gateway token create --name NAME --scope read|write|admin\n"
          "                                [--expires 30d | 12h | 2027-01-01T00:00:00Z]\n"
          "       api-gateway token list\n"
          "       api-gateway token revoke ID|NAME\n"
          "The database is RADPIPE_DATABASE_URL (see api-gateway --help). create prints the\n"
          "token once on stdout; only its SHA-256 is stored. Scopes nest: admin > write > read.\n",
          out);
}

/* "30d", "12h", "45m" or an RFC 3339 time into a PostgreSQL expression parameter. */
static int parse_expiry(const char *s, char *interval, size_t icap, char *at, size_t acap)
{
    size_t n = strlen(s);
    interval[0] = at[0] = '\0';
    if (n >= 2 && n < 12 && strspn(s, "0123456789") == n - 1 && strchr("dhm", s[n - 1])) {
        const char *unit = s[n - 1] == 'd' ? "days" : s[n - 1] == 'h' ? "hours" : "mins";
        snprintf(interval, icap, "%.*s %s", (int)(n - 1), s, unit);
        return atoll(s) > 0;
    }
    if (n >= 10 && n < acap && strspn(s, "0123456789-:TZ.+") == n) {
        memcpy(at, s, n + 1);
        return 1;
    }
    return 0;
}

/* rpt_ + 43 characters of base64url (256 random bits). */
static void new_token(char out[48])
{
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    unsigned char raw[33] = {0};
    lc_random_bytes(raw, 32);
    memcpy(out, "rpt_", 4);
    size_t o = 4;
    for (int i = 0; i < 33 && o < 47; i += 3) {
        unsigned v = ((unsigned)raw[i] << 16) | ((unsigned)raw[i + 1] << 8) | raw[i + 2];
        for (int k = 3; k >= 0 && o < 47; k--)
            out[o++] = b64[(v >> (6 * k)) & 63];
    }
    out[o] = '\0';
    memset(raw, 0, sizeof(raw));
}

static int cmd_create(lc_db *db, int argc, char **argv)
{
    static const struct option opts[] = {{"name", required_argument, NULL, 'n'},
                                         {"scope", required_argument, NULL, 's'},
                                         {"expires", required_argument, NULL, 'e'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *name = NULL, *scope = NULL, *expires = NULL;
    char interval[64], at[64], token[48], hash[65], id[LC_UUID_LEN + 1];
    PGresult *res = NULL;
    lc_err err = {0};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "n:s:e:h", opts, NULL)) != -1) {
        switch (c) {
        case 'n':
            name = optarg;
            break;
        case 's':
            scope = optarg;
            break;
        case 'e':
            expires = optarg;
            break;
        default:
            usage(c == 'h' ? stdout : stderr);
            return c == 'h' ? 0 : 2;
        }
    }
    if (!name || !*name || strlen(name) > 63 || !scope ||
        (strcmp(scope, "read") != 0 && strcmp(scope, "write") != 0 &&
         strcmp(scope, "admin") != 0) ||
        optind != argc) {
        usage(stderr);
        return 2;
    }
    if (expires && !parse_expiry(expires, interval, sizeof(interval), at, sizeof(at))) {
        fprintf(stderr, "api-gateway: invalid --expires \"%s\" (30d, 12h, 45m or RFC 3339)\n",
                expires);
        return 2;
    }
    new_token(token);
    gw_token_hash(token, hash);
    lc_uuid_v4(id);
    const char *p[5] = {id, name, hash, scope, NULL};
    const char *iv = expires && interval[0] ? interval : NULL;
    const char *ts = expires && at[0] ? at : NULL;
    const char *pe[7] = {p[0], p[1], p[2], p[3], iv, ts, NULL};
    lc_rc rc = lc_db_exec(db,
                          "INSERT INTO api_tokens (id, name, token_sha256, scopes, expires_at)"
                          " VALUES ($1::uuid, $2, decode($3, 'hex'), ARRAY[$4::text],"
                          "   coalesce(now() + $5::interval, $6::timestamptz))"
                          " RETURNING " GW_TS("expires_at"),
                          6, pe, &res, &err);
    memset(hash, 0, sizeof(hash));
    if (rc != LC_OK) {
        fprintf(stderr, "api-gateway: could not create the token: %s\n", lc_err_msg(&err));
        memset(token, 0, sizeof(token));
        return 1;
    }
    printf("%s\n", token);
    fflush(stdout);
    memset(token, 0, sizeof(token));
    fprintf(stderr, "token %s \"%s\" created with scope %s, %s%s\n", id, name, scope,
            PQgetisnull(res, 0, 0) ? "never expires" : "expires ",
            PQgetisnull(res, 0, 0) ? "" : PQgetvalue(res, 0, 0));
    PQclear(res);
    return 0;
}

static int cmd_list(lc_db *db)
{
    PGresult *res = NULL;
    lc_err err = {0};
    if (lc_db_exec(db,
                   "SELECT id::text, name, array_to_string(scopes, ','), " GW_TS(
                       "created_at") ","
                                     " coalesce(" GW_TS("expires_at") ", '-'), coalesce(" GW_TS(
                                         "last_used_at") ", "
                                                         "'-'), CASE WHEN revoked_at IS NOT NULL "
                                                         "THEN 'revoked'"
                                                         "  WHEN expires_at IS NOT NULL AND "
                                                         "expires_at <= now() THEN 'expired'"
                                                         "  ELSE 'active' END"
                                                         " FROM api_tokens ORDER BY created_at, id",
                   0, NULL, &res, &err) != LC_OK) {
        fprintf(stderr, "api-gateway: could not list tokens: %s\n", lc_err_msg(&err));
        return 1;
    }
    printf("%-36s  %-24s  %-12s  %-24s  %-24s  %-24s  %s\n", "ID", "NAME", "SCOPES", "CREATED",
           "EXPIRES", "LAST USED", "STATE");
    for (int i = 0; i < PQntuples(res); i++)
        printf("%-36s  %-24s  %-12s  %-24s  %-24s  %-24s  %s\n", PQgetvalue(res, i, 0),
               PQgetvalue(res, i, 1), PQgetvalue(res, i, 2), PQgetvalue(res, i, 3),
               PQgetvalue(res, i, 4), PQgetvalue(res, i, 5), PQgetvalue(res, i, 6));
    PQclear(res);
    return 0;
}

static int cmd_revoke(lc_db *db, const char *what)
{
    PGresult *res = NULL;
    lc_err err = {0};
    const char *p[1] = {what};
    lc_rc rc = lc_uuid_valid(what)
                   ? lc_db_exec(db,
                                "UPDATE api_tokens SET revoked_at = now()"
                                " WHERE id = $1::uuid AND revoked_at IS NULL RETURNING id",
                                1, p, &res, &err)
                   : lc_db_exec(db,
                                "UPDATE api_tokens SET revoked_at = now()"
                                " WHERE name = $1 AND revoked_at IS NULL RETURNING id",
                                1, p, &res, &err);
    if (rc != LC_OK) {
        fprintf(stderr, "api-gateway: could not revoke: %s\n", lc_err_msg(&err));
        return 1;
    }
    int n = PQntuples(res);
    for (int i = 0; i < n; i++)
        fprintf(stderr, "revoked %s\n", PQgetvalue(res, i, 0));
    PQclear(res);
    if (n == 0) {
        fprintf(stderr, "api-gateway: no active token \"%s\"\n", what);
        return 1;
    }
    return 0;
}

int gw_token_main(int argc, char **argv)
{
    lc_common_cfg common;
    memset(&common, 0, sizeof(common));
    const lc_cfg_table t = {lc_common_cfg_vars, lc_common_cfg_nvars, &common};
    lc_db *db = NULL;
    lc_err err = {0};
    int code = 1;

    if (argc < 2 || strcmp(argv[1], "token") != 0)
        return -1;
    if (argc < 3 || strcmp(argv[2], "--help") == 0 || strcmp(argv[2], "-h") == 0) {
        usage(argc < 3 ? stderr : stdout);
        return argc < 3 ? 2 : 0;
    }
    const char *cmd = argv[2];
    if (strcmp(cmd, "create") != 0 && strcmp(cmd, "list") != 0 && strcmp(cmd, "revoke") != 0) {
        usage(stderr);
        return 2;
    }
    if ((strcmp(cmd, "list") == 0 && argc != 3) || (strcmp(cmd, "revoke") == 0 && argc != 4)) {
        usage(stderr);
        return 2;
    }
    lc_log_init("api-gateway", LC_LOG_WARN);
    if (lc_cfg_load(&t, 1, &err) != LC_OK) {
        fprintf(stderr, "api-gateway: %s\n", lc_err_msg(&err));
        goto out;
    }
    if (lc_db_connect(common.database_url, (int)common.db_wait_seconds * 1000, NULL, &db, &err) !=
            LC_OK ||
        lc_db_migrate(db, &err) != LC_OK) {
        fprintf(stderr, "api-gateway: %s\n", lc_err_msg(&err));
        goto out;
    }
    if (strcmp(cmd, "create") == 0)
        code = cmd_create(db, argc - 2, argv + 2);
    else if (strcmp(cmd, "list") == 0)
        code = cmd_list(db);
    else
        code = cmd_revoke(db, argv[3]);
out:
    lc_db_free(db);
    lc_cfg_release(&t, 1);
    return code;
}
