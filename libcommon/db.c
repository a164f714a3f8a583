/*
 * db.c: PostgreSQL over libpq (see lc/db.h): non-blocking connects bounded by deadlines,
 * statements through PQexecParams (or, for a service's hot fixed statements, prepared once per
 * session: lc_db_exec_static) with SQLSTATE-based error classes, transactions with retry,
 * migrations under an advisory lock, and a fixed-size pool.
 * An lc_db (its PGconn, its last SQLSTATE) belongs to one thread at a time; the pool is
 * thread-safe (one mutex and condition variable) and owns the connections it holds.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "lc/db.h"
#include "lc/log.h"
#include "lc/util.h"

/* Session advisory lock held while migrating: the bytes "radpipeM" as a bigint. The outbox
 * relay uses "radpipeO", so the two never contend. */
#define MIGRATE_LOCK_KEY "8241979227032806733"

#define CONNECT_BACKOFF_MIN_MS 100
#define CONNECT_BACKOFF_MAX_MS 5000
#define CONNECT_ATTEMPT_MIN_MS 1000 /* one attempt gets at least this long, even at wait_ms 0 */
#define CONNECT_LOG_EVERY_MS   5000
#define RESET_TIMEOUT_MS       5000
#define TX_BACKOFF_MIN_MS      50
#define TX_BACKOFF_MAX_MS      2000

/* Statements lc_db_exec_static prepares on one session; later ones run unprepared. */
#define PREPARED_MAX 32

struct lc_db {
    PGconn *conn;
    char sqlstate[6];
    /* host:port/dbname, for messages and logs: never the URL, which may carry a password */
    char where[256];
    /* the texts prepared on this session as "lc_<index>", by address (static strings); a
     * reset session (lc_db_ensure) has none */
    const char *prepared[PREPARED_MAX];
    int nprepared;
};

/* libpq prints notices (e.g. "relation already exists, skipping") on stderr by default,
 * which would break the JSON log lines there. */
static void notice_to_log(void *arg, const char *message)
{
    (void)arg;
    char buf[512];
    lc_strlcpy(buf, message, sizeof(buf));
    size_t n = strlen(buf);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = '\0';
    lc_log_debug("postgresql notice", LC_LS("notice", buf));
}

/* libpq messages may span lines ("connection to server ... failed: ...\n\tIs the server
 * running..."): fold them into one line without the trailing newline. */
static void one_line(char *dst, size_t cap, const char *src)
{
    size_t j = 0;
    int space = 0;
    for (const char *p = src ? src : ""; *p && j + 1 < cap; p++) {
        if (*p == '\n' || *p == '\t' || *p == '\r' || *p == ' ') {
            space = j > 0;
            continue;
        }
        if (space && j + 2 < cap)
            dst[j++] = ' ';
        space = 0;
        dst[j++] = *p;
    }
    dst[j] = '\0';
}

/* Where url points, for logs: host (or hostaddr, else the local socket), port and dbname. */
static lc_rc describe_url(const char *url, char *where, size_t cap, lc_err *err)
{
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(url, &perr);
    if (!opts) {
        /* perr may quote part of the string, password included: do not pass it on */
        PQfreemem(perr);
        return lc_err_set(err, LC_ERR_CONFIG,
                          "invalid database URL: not a libpq connection URI or key=value string");
    }
    const char *host = NULL, *hostaddr = NULL, *port = NULL, *dbname = NULL, *user = NULL;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (!o->val || !*o->val)
            continue;
        if (strcmp(o->keyword, "host") == 0)
            host = o->val;
        else if (strcmp(o->keyword, "hostaddr") == 0)
            hostaddr = o->val;
        else if (strcmp(o->keyword, "port") == 0)
            port = o->val;
        else if (strcmp(o->keyword, "dbname") == 0)
            dbname = o->val;
        else if (strcmp(o->keyword, "user") == 0)
            user = o->val;
    }
    if (!host)
        host = hostaddr ? hostaddr : "local";
    if (!dbname)
        dbname = user ? user : "(default)"; /* libpq's default database is the user name */
    snprintf(where, cap, "%s:%s/%s", host, port ? port : "5432", dbname);
    PQconninfoFree(opts);
    return LC_OK;
}

/* Drive PQconnectPoll (or PQresetPoll) until it finishes, deadline (lc_now_ms) passes or
 * *stop is set. Returns 1 when connected. */
static int poll_connect(PGconn *c, int reset, int64_t deadline, const atomic_int *stop)
{
    PostgresPollingStatusType st = PGRES_POLLING_WRITING; /* as libpq's docs prescribe */
    for (;;) {
        if (st == PGRES_POLLING_OK)
            return 1;
        if (st == PGRES_POLLING_FAILED)
            return 0;
        if (stop && atomic_load(stop))
            return 0;
        int64_t left = deadline - lc_now_ms();
        int fd = PQsocket(c); /* may change between calls: libpq tries each host in turn */
        if (left <= 0 || fd < 0)
            return 0;
        struct pollfd pfd = {.fd = fd, .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT};
        int n = poll(&pfd, 1, left > 100 ? 100 : (int)left);
        if (n < 0 && errno != EINTR)
            return 0;
        if (n <= 0)
            continue; /* slice over: look at stop and the deadline again */
        st = reset ? PQresetPoll(c) : PQconnectPoll(c);
    }
}

/* One connection attempt until deadline: a connected PGconn, or NULL with the reason in
 * why. */
static PGconn *connect_once(const char *url, int64_t deadline, const atomic_int *stop, char *why,
                            size_t cap)
{
    PGconn *c = PQconnectStart(url);
    if (!c) {
        lc_strlcpy(why, "out of memory", cap);
        return NULL;
    }
    if (PQstatus(c) != CONNECTION_BAD && poll_connect(c, 0, deadline, stop) &&
        PQstatus(c) == CONNECTION_OK) {
        PQsetNoticeProcessor(c, notice_to_log, NULL);
        return c;
    }
    one_line(why, cap, PQerrorMessage(c));
    if (!why[0])
        lc_strlcpy(why, stop && atomic_load(stop) ? "stopped" : "timed out", cap);
    PQfinish(c);
    return NULL;
}

lc_rc lc_db_connect(const char *url, int wait_ms, const atomic_int *stop, lc_db **out, lc_err *err)
{
    lc_db *db = NULL;
    lc_rc rc;
    char why[512] = "";
    *out = NULL;
    if (!url)
        return lc_err_set(err, LC_ERR_CONFIG, "no database URL given");
    db = calloc(1, sizeof(*db));
    if (!db)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    rc = describe_url(url, db->where, sizeof(db->where), err);
    if (rc != LC_OK)
        goto out;

    int64_t start = lc_now_ms(), deadline = start + (wait_ms > 0 ? wait_ms : 0);
    int64_t last_log = 0;
    int backoff = CONNECT_BACKOFF_MIN_MS;
    for (int attempt = 1;; attempt++) {
        int64_t now = lc_now_ms();
        int64_t att_deadline = deadline;
        if (att_deadline < now + CONNECT_ATTEMPT_MIN_MS && attempt == 1)
            att_deadline = now + CONNECT_ATTEMPT_MIN_MS;
        db->conn = connect_once(url, att_deadline, stop, why, sizeof(why));
        if (db->conn)
            break;
        if (stop && atomic_load(stop)) {
            rc = lc_err_set(err, LC_ERR_CANCELLED, "stopped while connecting to database %s",
                            db->where);
            goto out;
        }
        now = lc_now_ms();
        if (now >= deadline) {
            rc = lc_err_set(err, LC_ERR_UNAVAILABLE,
                            "could not connect to database %s after %d attempts: %s", db->where,
                            attempt, why);
            goto out;
        }
        if (attempt == 1 || now - last_log >= CONNECT_LOG_EVERY_MS) {
            lc_log_warn("database not reachable yet, retrying", LC_LS("db", db->where),
                        LC_LS("error", why), LC_LI("attempt", attempt),
                        LC_LI("waited_ms", now - start));
            last_log = now;
        }
        int nap = backoff;
        if (nap > deadline - now)
            nap = (int)(deadline - now);
        lc_sleep_ms(nap, stop);
        backoff = backoff * 2 > CONNECT_BACKOFF_MAX_MS ? CONNECT_BACKOFF_MAX_MS : backoff * 2;
    }
    *out = db;
    db = NULL;
    rc = LC_OK;
out:
    lc_db_free(db);
    return rc;
}

void lc_db_free(lc_db *db)
{
    if (!db)
        return;
    if (db->conn)
        PQfinish(db->conn);
    free(db);
}

PGconn *lc_db_conn(lc_db *db)
{
    return db ? db->conn : NULL;
}

const char *lc_db_sqlstate(const lc_db *db)
{
    return db ? db->sqlstate : "";
}

lc_rc lc_db_ensure(lc_db *db, lc_err *err)
{
    /* PQstatus only changes when libpq touches the socket: read what is pending (without
     * blocking) so a backend that was terminated or a server that went away shows up here
     * rather than in the caller's next statement. */
    for (int i = 0; i < 4 && PQstatus(db->conn) == CONNECTION_OK; i++) {
        /* a dying backend sends its FATAL message, then closes: libpq sees the close only
         * on a later read, so read again while the socket stays readable */
        struct pollfd pfd = {.fd = PQsocket(db->conn), .events = POLLIN};
        if (pfd.fd < 0 || poll(&pfd, 1, 0) <= 0 || !PQconsumeInput(db->conn))
            break;
    }
    if (PQstatus(db->conn) == CONNECTION_OK)
        return LC_OK;
    char why[512];
    one_line(why, sizeof(why), PQerrorMessage(db->conn));
    lc_log_warn("database connection lost, reconnecting", LC_LS("db", db->where),
                LC_LS("error", why));
    db->nprepared = 0; /* the old session, and what was prepared on it, is gone */
    if (!PQresetStart(db->conn) ||
        !poll_connect(db->conn, 1, lc_now_ms() + RESET_TIMEOUT_MS, NULL) ||
        PQstatus(db->conn) != CONNECTION_OK) {
        one_line(why, sizeof(why), PQerrorMessage(db->conn));
        return lc_err_set(err, LC_ERR_UNAVAILABLE, "could not reconnect to database %s: %s",
                          db->where, why[0] ? why : "timed out");
    }
    lc_log_info("reconnected to database", LC_LS("db", db->where));
    return LC_OK;
}

/* Map a failed result to an lc_rc, remembering its SQLSTATE. Without one from the server
 * (libpq's own errors), a broken connection reads as 08006 connection_failure. */
static lc_rc fail(lc_db *db, const PGresult *r, lc_err *err)
{
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    const char *primary = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    int broken = PQstatus(db->conn) != CONNECTION_OK;
    char msg[400];
    one_line(msg, sizeof(msg), primary ? primary : PQerrorMessage(db->conn));
    if (!state && broken)
        state = "08006";
    lc_strlcpy(db->sqlstate, state ? state : "", sizeof(db->sqlstate));

    lc_rc rc = LC_ERR_DB;
    if (broken || strncmp(db->sqlstate, "08", 2) == 0 || strcmp(db->sqlstate, "57P01") == 0 ||
        strcmp(db->sqlstate, "57P02") == 0 || strcmp(db->sqlstate, "57P03") == 0)
        rc = LC_ERR_UNAVAILABLE;
    else if (strcmp(db->sqlstate, "40001") == 0 || strcmp(db->sqlstate, "40P01") == 0 ||
             strcmp(db->sqlstate, "23505") == 0)
        rc = LC_ERR_CONFLICT;
    if (rc == LC_ERR_UNAVAILABLE)
        return lc_err_set(err, rc, "lost connection to database %s: %s (SQLSTATE %s)", db->where,
                          msg[0] ? msg : "unknown error", db->sqlstate);
    return lc_err_set(err, rc, "%s (SQLSTATE %s)", msg[0] ? msg : "statement failed",
                      db->sqlstate[0] ? db->sqlstate : "none");
}

/* Hand r to the caller (res non-NULL) or free it; classify failures. Consumes r. */
static lc_rc finish(lc_db *db, PGresult *r, PGresult **res, lc_err *err)
{
    lc_rc rc = LC_OK;
    switch (PQresultStatus(r)) {
    case PGRES_COMMAND_OK:
    case PGRES_TUPLES_OK:
    case PGRES_EMPTY_QUERY:
        if (res) {
            *res = r;
            r = NULL;
        }
        break;
    case PGRES_COPY_IN:
    case PGRES_COPY_OUT:
    case PGRES_COPY_BOTH:
        rc = lc_err_set(err, LC_ERR_INVALID, "COPY is not supported here: use lc_db_conn");
        break;
    default:
        rc = fail(db, r, err);
        break;
    }
    PQclear(r);
    return rc;
}

/* The start of every statement: no result yet, no SQLSTATE (it describes the latest statement:
 * "" once one succeeds), and a session to run it on. */
static lc_rc stmt_start(lc_db *db, PGresult **res, lc_err *err)
{
    if (res)
        *res = NULL;
    db->sqlstate[0] = '\0';
    return PQstatus(db->conn) == CONNECTION_OK ? LC_OK : fail(db, NULL, err);
}

lc_rc lc_db_exec(lc_db *db, const char *sql, int nparams, const char *const *params, PGresult **res,
                 lc_err *err)
{
    lc_rc rc = stmt_start(db, res, err);
    if (rc != LC_OK)
        return rc;
    PGresult *r = PQexecParams(db->conn, sql, nparams, NULL, params, NULL, NULL, 0);
    return finish(db, r, res, err);
}

lc_rc lc_db_exec_static(lc_db *db, const char *sql, int nparams, const char *const *params,
                        PGresult **res, lc_err *err)
{
    lc_rc rc = stmt_start(db, res, err);
    if (rc != LC_OK)
        return rc;
    int k = 0;
    while (k < db->nprepared && db->prepared[k] != sql)
        k++;
    if (k == PREPARED_MAX)
        return lc_db_exec(db, sql, nparams, params, res, err);
    char name[16];
    snprintf(name, sizeof(name), "lc_%d", k);
    if (k == db->nprepared) {
        /* Parse is not transactional: the statement stays prepared even if the transaction
         * it was prepared in rolls back */
        rc = finish(db, PQprepare(db->conn, name, sql, nparams, NULL), NULL, err);
        if (rc != LC_OK)
            return rc;
        db->prepared[db->nprepared++] = sql;
    }
    PGresult *r = PQexecPrepared(db->conn, name, nparams, params, NULL, NULL, 0);
    return finish(db, r, res, err);
}

lc_rc lc_db_begin(lc_db *db, lc_err *err)
{
    return lc_db_exec(db, "BEGIN", 0, NULL, NULL, err);
}

lc_rc lc_db_commit(lc_db *db, lc_err *err)
{
    PGresult *r = NULL;
    lc_rc rc = lc_db_exec(db, "COMMIT", 0, NULL, &r, err);
    /* COMMIT of a transaction that already failed "succeeds" with the tag ROLLBACK */
    if (rc == LC_OK && strcmp(PQcmdStatus(r), "ROLLBACK") == 0) {
        lc_strlcpy(db->sqlstate, "25P02", sizeof(db->sqlstate));
        rc = lc_err_set(err, LC_ERR_DB,
                        "transaction was rolled back: a statement in it failed (SQLSTATE 25P02)");
    }
    PQclear(r);
    return rc;
}

void lc_db_rollback(lc_db *db)
{
    if (!db || PQstatus(db->conn) != CONNECTION_OK)
        return;
    PGTransactionStatusType ts = PQtransactionStatus(db->conn);
    if (ts != PQTRANS_INTRANS && ts != PQTRANS_INERROR)
        return;
    PQclear(PQexec(db->conn, "ROLLBACK"));
}

lc_rc lc_db_tx(lc_db *db, int attempts, lc_db_tx_fn fn, void *ctx, lc_err *err)
{
    lc_rc rc = LC_OK;
    int backoff = TX_BACKOFF_MIN_MS;
    if (attempts < 1)
        attempts = 1;
    for (int i = 0; i < attempts; i++) {
        if (i > 0) {
            lc_log_debug("retrying transaction", LC_LI("attempt", i + 1),
                         LC_LS("error", err ? lc_err_msg(err) : lc_strerror(rc)));
            lc_sleep_ms(backoff, NULL);
            backoff = backoff * 2 > TX_BACKOFF_MAX_MS ? TX_BACKOFF_MAX_MS : backoff * 2;
        }
        rc = lc_db_ensure(db, err); /* cheap when healthy: no round trip */
        if (rc != LC_OK)
            continue;
        rc = lc_db_begin(db, err);
        if (rc == LC_OK)
            rc = fn(db, ctx, err);
        if (rc == LC_OK)
            rc = lc_db_commit(db, err);
        if (rc == LC_OK)
            return LC_OK;
        lc_db_rollback(db);
        if (rc != LC_ERR_CONFLICT && rc != LC_ERR_UNAVAILABLE)
            return rc;
    }
    return rc;
}

/* --- migrations ------------------------------------------------------------------------- */

static lc_rc migration_applied(lc_db *db, int version, int *applied, lc_err *err)
{
    char v[16];
    const char *p[1] = {v};
    PGresult *r = NULL;
    snprintf(v, sizeof(v), "%d", version);
    lc_rc rc = lc_db_exec(db, "SELECT 1 FROM schema_migrations WHERE version = $1", 1, p, &r, err);
    if (rc == LC_OK)
        *applied = PQntuples(r) > 0;
    PQclear(r);
    return rc;
}

static lc_rc apply_migration(lc_db *db, const lc_db_migration *m, lc_err *err)
{
    char v[16];
    const char *p[2] = {v, m->name};
    snprintf(v, sizeof(v), "%d", m->version);
    int64_t t0 = lc_now_ms();
    lc_rc rc = lc_db_begin(db, err);
    /* a migration is several statements of compiled-in text: the simple query protocol
     * (PQexec) runs them all, inside the transaction opened above */
    if (rc == LC_OK) {
        db->sqlstate[0] = '\0';
        rc = finish(db, PQexec(db->conn, m->sql), NULL, err);
    }
    if (rc == LC_OK)
        rc = lc_db_exec(db, "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", 2, p,
                        NULL, err);
    if (rc == LC_OK)
        rc = lc_db_commit(db, err);
    if (rc != LC_OK) {
        lc_db_rollback(db);
        return lc_err_wrap(err, "could not apply migration \"%s\"", m->name);
    }
    lc_log_info("applied migration", LC_LI("version", m->version), LC_LS("name", m->name),
                LC_LI("ms", lc_now_ms() - t0));
    return LC_OK;
}

lc_rc lc_db_migrate(lc_db *db, lc_err *err)
{
    size_t n = 0;
    const lc_db_migration *m = lc_db_migrations(&n);
    int locked = 0;
    lc_rc rc;
    for (size_t i = 1; i < n; i++)
        if (m[i].version <= m[i - 1].version)
            return lc_err_set(err, LC_ERR_INTERNAL, "migrations out of order: \"%s\" after \"%s\"",
                              m[i].name, m[i - 1].name);
    if (PQstatus(db->conn) == CONNECTION_OK && PQtransactionStatus(db->conn) != PQTRANS_IDLE)
        return lc_err_set(err, LC_ERR_INVALID, "cannot migrate inside a transaction");

    /* several replicas may start at once: the first one migrates, the others wait here and
     * then find every version recorded */
    rc = lc_db_exec(db, "SELECT pg_advisory_lock(" MIGRATE_LOCK_KEY ")", 0, NULL, NULL, err);
    if (rc != LC_OK) {
        lc_err_wrap(err, "could not take the migration lock");
        goto out;
    }
    locked = 1;
    rc = lc_db_exec(db,
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    "version integer PRIMARY KEY, name text NOT NULL, "
                    "applied_at timestamptz NOT NULL DEFAULT now())",
                    0, NULL, NULL, err);
    if (rc != LC_OK) {
        lc_err_wrap(err, "could not create schema_migrations");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        int applied = 0;
        rc = migration_applied(db, m[i].version, &applied, err);
        if (rc != LC_OK) {
            lc_err_wrap(err, "could not read schema_migrations");
            goto out;
        }
        if (applied)
            continue;
        rc = apply_migration(db, &m[i], err);
        if (rc != LC_OK)
            goto out;
    }
out:
    /* PQexec rather than lc_db_exec keeps the SQLSTATE of a failure above; when the
     * connection broke, the session and its lock are gone anyway */
    if (locked && PQstatus(db->conn) == CONNECTION_OK)
        PQclear(PQexec(db->conn, "SELECT pg_advisory_unlock(" MIGRATE_LOCK_KEY ")"));
    return rc;
}

/* --- pool ------------------------------------------------------------------------------- */

/* Connections are opened up front by lc_db_pool_new, so a service learns at start-up that
 * the database is unreachable, and a request never pays for a connect. */
struct lc_db_pool {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* signalled when a connection is put back */
    int size, nidle;
    lc_db **idle; /* stack of size entries; [0, nidle) are free */
};

lc_rc lc_db_pool_new(const char *url, int size, int wait_ms, const atomic_int *stop,
                     lc_db_pool **out, lc_err *err)
{
    lc_db_pool *pool = NULL;
    pthread_condattr_t ca;
    lc_rc rc = LC_OK;
    *out = NULL;
    if (size < 1)
        return lc_err_set(err, LC_ERR_CONFIG, "invalid database pool size %d: must be >= 1", size);
    pool = calloc(1, sizeof(*pool));
    if (!pool || !(pool->idle = calloc((size_t)size, sizeof(*pool->idle)))) {
        free(pool);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    pool->size = size;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&pool->cv, &ca);
    pthread_condattr_destroy(&ca);
    int64_t deadline = lc_now_ms() + wait_ms;
    for (int i = 0; i < size; i++) {
        int64_t left = deadline - lc_now_ms();
        rc = lc_db_connect(url, left > 0 ? (int)left : 0, stop, &pool->idle[i], err);
        if (rc != LC_OK)
            goto out;
        pool->nidle++;
    }
    *out = pool;
    pool = NULL;
out:
    lc_db_pool_free(pool);
    return rc;
}

void lc_db_pool_free(lc_db_pool *pool)
{
    if (!pool)
        return;
    /* every connection must have been put back: borrowed ones are the borrower's bug */
    for (int i = 0; i < pool->nidle; i++)
        lc_db_free(pool->idle[i]);
    if (pool->nidle != pool->size)
        lc_log_error("database pool freed with connections still borrowed",
                     LC_LI("borrowed", pool->size - pool->nidle));
    pthread_cond_destroy(&pool->cv);
    pthread_mutex_destroy(&pool->mu);
    free(pool->idle);
    free(pool);
}

lc_rc lc_db_pool_get(lc_db_pool *pool, int wait_ms, lc_db **out, lc_err *err)
{
    struct timespec ts;
    lc_db *db = NULL;
    *out = NULL;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    if (wait_ms > 0) {
        ts.tv_sec += wait_ms / 1000;
        ts.tv_nsec += (long)(wait_ms % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&pool->mu);
    while (pool->nidle == 0)
        if (pthread_cond_timedwait(&pool->cv, &pool->mu, &ts) == ETIMEDOUT)
            break;
    if (pool->nidle > 0)
        db = pool->idle[--pool->nidle];
    pthread_mutex_unlock(&pool->mu);
    if (!db)
        return lc_err_set(err, LC_ERR_TIMEOUT,
                          "no database connection free after %d ms (pool of %d)", wait_ms,
                          pool->size);
    /* reconnecting happens outside the mutex so other threads keep going meanwhile */
    lc_rc rc = lc_db_ensure(db, err);
    if (rc != LC_OK) {
        lc_db_pool_put(pool, db); /* stays in the pool: the next get tries again */
        return rc;
    }
    *out = db;
    return LC_OK;
}

void lc_db_pool_put(lc_db_pool *pool, lc_db *db)
{
    if (!pool || !db)
        return;
    lc_db_rollback(db); /* never hand the next borrower someone's open transaction */
    pthread_mutex_lock(&pool->mu);
    if (pool->nidle >= pool->size) { /* not one of ours, or put twice */
        pthread_mutex_unlock(&pool->mu);
        lc_log_error("connection put into a database pool that did not lend it");
        return;
    }
    pool->idle[pool->nidle++] = db;
    pthread_cond_signal(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
}
