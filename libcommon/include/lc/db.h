/*
 * db.h: PostgreSQL access over libpq: connections that reconnect with backoff, parameterised
 * statements only, transactions with retry, and schema migrations (proto/sql, embedded at
 * build time) applied under an advisory lock so several replicas can start at once.
 * An lc_db is one connection, used by one thread at a time; lc_db_pool hands connections to
 * threads (thread-safe).
 */
#ifndef LC_DB_H
#define LC_DB_H

#include <stddef.h>
#include <stdatomic.h>
#include <libpq-fe.h>
#include "lc/rc.h"

typedef struct lc_db lc_db;

/* Connect to url (libpq URI or key=value string). When the server is unreachable, retries
 * with exponential backoff (100 ms doubling to 5 s) for up to wait_ms, returning early when
 * *stop (may be NULL) becomes non-zero. LC_ERR_UNAVAILABLE if it never answered. */
lc_rc lc_db_connect(const char *url, int wait_ms, const atomic_int *stop, lc_db **out, lc_err *err);
void lc_db_free(lc_db *db);

/* The underlying connection, borrowed (for LISTEN sockets, COPY, pipelining). */
PGconn *lc_db_conn(lc_db *db);

/* Make sure the connection is usable, resetting it (one attempt) when it is not.
 * LC_ERR_UNAVAILABLE when the server still cannot be reached. */
lc_rc lc_db_ensure(lc_db *db, lc_err *err);

/* Run a parameterised statement (text parameters, NULL entries are SQL NULL). On success
 * *res (when res is non-NULL) holds the result: caller PQclear()s it. On failure nothing is
 * returned and err carries the server's message and SQLSTATE; the rc is LC_ERR_UNAVAILABLE
 * for a lost connection, LC_ERR_CONFLICT for serialization/deadlock failures (40001/40P01)
 * and unique violations (23505), LC_ERR_DB otherwise. */
lc_rc lc_db_exec(lc_db *db, const char *sql, int nparams, const char *const *params, PGresult **res,
                 lc_err *err);
/* lc_db_exec for a fixed statement run often (the gateway's token lookup, the outbox): it is
 * prepared on the session the first time and then only bound and executed, which saves
 * PostgreSQL parsing and planning it again each time. sql must have static storage duration
 * (it is remembered by address) and the same text and parameter count every call; a
 * statement whose best plan depends on its parameters or on a table's changing size belongs
 * in lc_db_exec, which plans every call. A session that is reset (lc_db_ensure) prepares
 * again; past PREPARED_MAX statements (db.c) the rest run unprepared. */
lc_rc lc_db_exec_static(lc_db *db, const char *sql, int nparams, const char *const *params,
                        PGresult **res, lc_err *err);
/* The SQLSTATE of the last failed statement on db ("" when none). */
const char *lc_db_sqlstate(const lc_db *db);

lc_rc lc_db_begin(lc_db *db, lc_err *err);
lc_rc lc_db_commit(lc_db *db, lc_err *err);
void lc_db_rollback(lc_db *db); /* best effort, never fails */

/* Run fn inside BEGIN/COMMIT. When fn or COMMIT fails with LC_ERR_CONFLICT (serialization) or
 * LC_ERR_UNAVAILABLE (connection lost: reconnects first), the whole transaction is retried up
 * to `attempts` times with backoff; other errors roll back and return at once. */
typedef lc_rc (*lc_db_tx_fn)(lc_db *db, void *ctx, lc_err *err);
lc_rc lc_db_tx(lc_db *db, int attempts, lc_db_tx_fn fn, void *ctx, lc_err *err);

/* Apply the embedded migrations (proto/sql/NNN_name.sql, in order) that are not yet recorded
 * in schema_migrations, each in its own transaction, holding pg_advisory_lock for the whole
 * run. Logs each applied migration. */
lc_rc lc_db_migrate(lc_db *db, lc_err *err);

/* The migrations compiled in, for tests and `--print-migrations`. */
typedef struct lc_db_migration {
    int version;
    const char *name; /* file name */
    const char *sql;
} lc_db_migration;
const lc_db_migration *lc_db_migrations(size_t *n);

/* A fixed-size pool of connections for multi-threaded servers (the gateway). */
typedef struct lc_db_pool lc_db_pool;
lc_rc lc_db_pool_new(const char *url, int size, int wait_ms, const atomic_int *stop,
                     lc_db_pool **out, lc_err *err);
void lc_db_pool_free(lc_db_pool *pool);
/* Borrow a connection, waiting up to wait_ms (LC_ERR_TIMEOUT); give it back with _put. The
 * connection is checked with lc_db_ensure before it is handed out. */
lc_rc lc_db_pool_get(lc_db_pool *pool, int wait_ms, lc_db **out, lc_err *err);
void lc_db_pool_put(lc_db_pool *pool, lc_db *db);

#endif
