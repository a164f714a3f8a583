/*
 * test_db.c: lc_db against the real PostgreSQL server of tests/run.sh (RADPIPE_TEST_PG_URL),
 * one fresh database per test: connects and their deadlines, parameters, error classes,
 * migrations (also from several connections at once), transactions with retry, recovery
 * after the backend is terminated, and the pool from several threads.
 */
#include <pthread.h>
#include <stdarg.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "lc/db.h"
#include "lc/util.h"
#include "ts.h"

/* A fresh database URL; fails the test (never skips) without RADPIPE_TEST_PG_URL. */
static char *fresh_url(void)
{
    char *url = ts_pg_fresh_db("db");
    if (!url)
        fail_msg("RADPIPE_TEST_PG_URL is not set or the server refused: run through tests/run.sh");
    return url;
}

static lc_db *connect_ok(const char *url)
{
    lc_db *db = NULL;
    lc_err err = {0};
    lc_rc rc = lc_db_connect(url, 5000, NULL, &db, &err);
    if (rc != LC_OK)
        fail_msg("connect: %s", lc_err_msg(&err));
    return db;
}

static void exec_ok(lc_db *db, const char *sql)
{
    lc_err err = {0};
    if (lc_db_exec(db, sql, 0, NULL, NULL, &err) != LC_OK)
        fail_msg("%s: %s", sql, lc_err_msg(&err));
}

typedef lc_rc (*exec_fn)(lc_db *db, const char *sql, int nparams, const char *const *params,
                         PGresult **res, lc_err *err);

/* The single value of a one-row query run by exec, as a long long. */
static long long value_ll(exec_fn exec, lc_db *db, const char *sql, int n, const char *const *p)
{
    PGresult *r = NULL;
    lc_err err = {0};
    if (exec(db, sql, n, p, &r, &err) != LC_OK)
        fail_msg("%s: %s", sql, lc_err_msg(&err));
    assert_int_equal(PQntuples(r), 1);
    long long v = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

static long long query_ll(lc_db *db, const char *sql, int n, const char *const *p)
{
    return value_ll(lc_db_exec, db, sql, n, p);
}

static void test_connect_and_query(void **state)
{
    (void)state;
    char *url = fresh_url();
    lc_db *db = connect_ok(url);
    assert_non_null(lc_db_conn(db));
    assert_int_equal(query_ll(db, "SELECT 40 + 2", 0, NULL), 42);
    assert_string_equal(lc_db_sqlstate(db), "");
    lc_db_free(db);
    lc_db_free(NULL);
    free(url);
}

static void test_connect_unreachable(void **state)
{
    (void)state;
    char url[256];
    lc_db *db = NULL;
    lc_err err = {0};
    /* nothing listens on a port that was free a moment ago; the password must not leak */
    snprintf(url, sizeof(url), "postgresql://radpipe:s3cretpw@127.0.0.1:%d/nodb", ts_free_port());
    int64_t t0 = lc_now_ms();
    lc_rc rc = lc_db_connect(url, 700, NULL, &db, &err);
    int64_t took = lc_now_ms() - t0;
    assert_int_equal(rc, LC_ERR_UNAVAILABLE);
    assert_null(db);
    assert_true(took >= 600); /* it kept trying for about wait_ms */
    assert_true(took < 700 + 1500);
    assert_null(strstr(lc_err_msg(&err), "s3cretpw"));
    assert_non_null(strstr(lc_err_msg(&err), "127.0.0.1"));

    /* a string libpq cannot parse is a configuration error, reported at once */
    t0 = lc_now_ms();
    rc = lc_db_connect("postgresql://u:s3cretpw@[::1/x?bogus", 5000, NULL, &db, &err);
    assert_int_equal(rc, LC_ERR_CONFIG);
    assert_true(lc_now_ms() - t0 < 1000);
    assert_null(strstr(lc_err_msg(&err), "s3cretpw"));
}

static void test_connect_stop(void **state)
{
    (void)state;
    char url[128];
    lc_db *db = NULL;
    lc_err err = {0};
    atomic_int stop = 1;
    snprintf(url, sizeof(url), "postgresql://radpipe@127.0.0.1:%d/nodb", ts_free_port());
    int64_t t0 = lc_now_ms();
    lc_rc rc = lc_db_connect(url, 30000, &stop, &db, &err);
    assert_int_equal(rc, LC_ERR_CANCELLED);
    assert_null(db);
    assert_true(lc_now_ms() - t0 < 2000);
}

static void test_exec_params_are_data(void **state)
{
    (void)state;
    char *url = fresh_url();
    lc_db *db = connect_ok(url);
    static const char *const vals[] = {
        "'); DROP TABLE t; --", "$1 $2 \\x00 \\' \"", "ünïcødé ✓", "%s%n%p", "",
    };
    exec_ok(db, "CREATE TABLE t (id serial PRIMARY KEY, v text, n integer)");
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        char n[16];
        snprintf(n, sizeof(n), "%zu", i);
        const char *p[2] = {vals[i], n};
        lc_err err = {0};
        assert_int_equal(lc_db_exec(db, "INSERT INTO t (v, n) VALUES ($1, $2)", 2, p, NULL, &err),
                         LC_OK);
    }
    const char *pnull[2] = {NULL, "99"};
    assert_int_equal(lc_db_exec(db, "INSERT INTO t (v, n) VALUES ($1, $2)", 2, pnull, NULL, NULL),
                     LC_OK);

    PGresult *r = NULL;
    assert_int_equal(lc_db_exec(db, "SELECT v, n, v IS NULL FROM t ORDER BY n", 0, NULL, &r, NULL),
                     LC_OK);
    assert_int_equal(PQntuples(r), 6);
    for (int i = 0; i < 5; i++) {
        assert_string_equal(PQgetvalue(r, i, 0), vals[i]);
        assert_int_equal(atoi(PQgetvalue(r, i, 1)), i);
    }
    assert_string_equal(PQgetvalue(r, 5, 2), "t");
    PQclear(r);
    /* the table survived its own name in a parameter */
    assert_int_equal(query_ll(db, "SELECT count(*) FROM t", 0, NULL), 6);
    lc_db_free(db);
    free(url);
}

static void test_error_classes(void **state)
{
    (void)state;
    char *url = fresh_url();
    lc_db *db = connect_ok(url);
    lc_err err = {0};
    PGresult *r = (PGresult *)&err; /* must come back NULL on failure */
    exec_ok(db, "CREATE TABLE u (k text PRIMARY KEY)");
    const char *p[1] = {"a"};
    assert_int_equal(lc_db_exec(db, "INSERT INTO u VALUES ($1)", 1, p, NULL, &err), LC_OK);
    assert_int_equal(lc_db_exec(db, "INSERT INTO u VALUES ($1)", 1, p, &r, &err), LC_ERR_CONFLICT);
    assert_null(r);
    assert_int_equal(err.rc, LC_ERR_CONFLICT);
    assert_string_equal(lc_db_sqlstate(db), "23505");
    assert_non_null(strstr(lc_err_msg(&err), "duplicate key"));

    assert_int_equal(lc_db_exec(db, "SELEC 1", 0, NULL, NULL, &err), LC_ERR_DB);
    assert_string_equal(lc_db_sqlstate(db), "42601");
    assert_non_null(strstr(lc_err_msg(&err), "syntax error"));
    assert_non_null(strstr(lc_err_msg(&err), "42601"));

    assert_int_equal(lc_db_exec(db, "SELECT 1 / $1::int", 1, (const char *[]){"0"}, NULL, &err),
                     LC_ERR_DB);
    assert_string_equal(lc_db_sqlstate(db), "22012");

    /* the state describes the latest statement */
    exec_ok(db, "SELECT 1");
    assert_string_equal(lc_db_sqlstate(db), "");

    /* COMMIT of a failed transaction is a failure, not a silent rollback */
    assert_int_equal(lc_db_begin(db, &err), LC_OK);
    assert_int_equal(lc_db_exec(db, "INSERT INTO u VALUES ($1)", 1, p, NULL, &err),
                     LC_ERR_CONFLICT);
    assert_int_equal(lc_db_commit(db, &err), LC_ERR_DB);
    assert_int_equal(PQtransactionStatus(lc_db_conn(db)), PQTRANS_IDLE);
    lc_db_rollback(db); /* nothing open: a no-op */
    lc_db_free(db);
    free(url);
}

static long long count_migrations(lc_db *db)
{
    return query_ll(db, "SELECT count(*) FROM schema_migrations", 0, NULL);
}

static void test_migrate_idempotent(void **state)
{
    (void)state;
    char *url = fresh_url();
    lc_db *db = connect_ok(url);
    lc_err err = {0};
    size_t n = 0;
    const lc_db_migration *m = lc_db_migrations(&n);
    assert_true(n >= 1);
    assert_int_equal(m[0].version, 1);
    assert_string_equal(m[0].name, "001_init.sql");

    assert_int_equal(lc_db_migrate(db, &err), LC_OK);
    assert_int_equal(count_migrations(db), (long long)n);
    for (size_t i = 0; i < n; i++) {
        char v[16];
        snprintf(v, sizeof(v), "%d", m[i].version);
        const char *p[2] = {v, m[i].name};
        assert_int_equal(
            query_ll(db, "SELECT count(*) FROM schema_migrations WHERE version = $1 AND name = $2",
                     2, p),
            1);
    }
    /* 001's tables exist and are usable */
    exec_ok(db, "INSERT INTO outbox (topic, key, payload) VALUES ('t', 'k', '{}')");
    assert_int_equal(query_ll(db, "SELECT count(*) FROM outbox", 0, NULL), 1);
    long long applied_at = query_ll(db,
                                    "SELECT sum(extract(epoch FROM applied_at) * 1e6)::bigint "
                                    "FROM schema_migrations",
                                    0, NULL);

    /* the second run applies nothing: 001 has plain CREATE TABLEs, so re-running it would
     * fail, and the recorded rows keep their time */
    assert_int_equal(lc_db_migrate(db, &err), LC_OK);
    assert_int_equal(count_migrations(db), (long long)n);
    assert_int_equal(query_ll(db,
                              "SELECT sum(extract(epoch FROM applied_at) * 1e6)::bigint "
                              "FROM schema_migrations",
                              0, NULL),
                     applied_at);
    assert_int_equal(query_ll(db, "SELECT count(*) FROM outbox", 0, NULL), 1);

    /* the lock was released: another session can take it at once */
    lc_db *other = connect_ok(url);
    PGresult *r = NULL;
    assert_int_equal(
        lc_db_exec(other, "SELECT pg_try_advisory_lock(8241979227032806733)", 0, NULL, &r, &err),
        LC_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), "t");
    PQclear(r);
    lc_db_free(other);

    /* inside a transaction it refuses rather than commit the caller's work */
    assert_int_equal(lc_db_begin(db, &err), LC_OK);
    assert_int_equal(lc_db_migrate(db, &err), LC_ERR_INVALID);
    lc_db_rollback(db);
    lc_db_free(db);
    free(url);
}

#define MIGRATORS 6

typedef struct migrator {
    const char *url;
    pthread_barrier_t *go;
    lc_rc rc;
    lc_err err;
} migrator;

static void *migrate_thread(void *arg)
{
    migrator *m = arg;
    lc_db *db = NULL;
    m->rc = lc_db_connect(m->url, 5000, NULL, &db, &m->err);
    pthread_barrier_wait(m->go);
    if (m->rc == LC_OK)
        m->rc = lc_db_migrate(db, &m->err);
    lc_db_free(db);
    return NULL;
}

static void test_migrate_concurrent(void **state)
{
    (void)state;
    char *url = fresh_url();
    pthread_t th[MIGRATORS];
    migrator ms[MIGRATORS];
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, MIGRATORS);
    for (int i = 0; i < MIGRATORS; i++) {
        ms[i] = (migrator){.url = url, .go = &go};
        assert_int_equal(pthread_create(&th[i], NULL, migrate_thread, &ms[i]), 0);
    }
    for (int i = 0; i < MIGRATORS; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&go);
    /* every migrator succeeded; since 001 cannot run twice (CREATE TABLE without IF NOT
     * EXISTS) and versions are a primary key, that means it was applied exactly once */
    for (int i = 0; i < MIGRATORS; i++)
        if (ms[i].rc != LC_OK)
            fail_msg("migrator %d: %s", i, lc_err_msg(&ms[i].err));
    lc_db *db = connect_ok(url);
    size_t n = 0;
    lc_db_migrations(&n);
    assert_int_equal(count_migrations(db), (long long)n);
    assert_int_equal(
        query_ll(db, "SELECT count(*) FROM pg_tables WHERE tablename = 'outbox'", 0, NULL), 1);
    lc_db_free(db);
    free(url);
}

typedef struct txctx {
    int calls;
    int fail_first;  /* return this rc on the first call */
    int fail_always; /* return this rc on every call */
    const char *value;
} txctx;

static lc_rc insert_fn(lc_db *db, void *ctx, lc_err *err)
{
    txctx *c = ctx;
    c->calls++;
    const char *p[1] = {c->value};
    lc_rc rc = lc_db_exec(db, "INSERT INTO v (s) VALUES ($1)", 1, p, NULL, err);
    if (rc != LC_OK)
        return rc;
    if (c->fail_always)
        return lc_err_set(err, c->fail_always, "told to fail");
    if (c->fail_first && c->calls == 1)
        return lc_err_set(err, c->fail_first, "told to fail once");
    return LC_OK;
}

static void test_tx_commit_rollback_retry(void **state)
{
    (void)state;
    char *url = fresh_url();
    lc_db *db = connect_ok(url);
    lc_db *other = connect_ok(url);
    lc_err err = {0};
    exec_ok(db, "CREATE TABLE v (s text)");

    txctx ok = {.value = "committed"};
    assert_int_equal(lc_db_tx(db, 3, insert_fn, &ok, &err), LC_OK);
    assert_int_equal(ok.calls, 1);
    const char *pc[1] = {"committed"};
    assert_int_equal(query_ll(other, "SELECT count(*) FROM v WHERE s = $1", 1, pc), 1);

    /* a permanent error rolls back at once, without retrying */
    txctx bad = {.value = "rolled back", .fail_always = LC_ERR_INVALID};
    assert_int_equal(lc_db_tx(db, 3, insert_fn, &bad, &err), LC_ERR_INVALID);
    assert_int_equal(bad.calls, 1);
    assert_string_equal(lc_err_msg(&err), "told to fail");
    const char *pr[1] = {"rolled back"};
    assert_int_equal(query_ll(other, "SELECT count(*) FROM v WHERE s = $1", 1, pr), 0);
    assert_int_equal(PQtransactionStatus(lc_db_conn(db)), PQTRANS_IDLE);

    /* a conflict is retried; the first attempt's insert is rolled back */
    txctx once = {.value = "retried", .fail_first = LC_ERR_CONFLICT};
    assert_int_equal(lc_db_tx(db, 3, insert_fn, &once, &err), LC_OK);
    assert_int_equal(once.calls, 2);
    const char *pt[1] = {"retried"};
    assert_int_equal(query_ll(other, "SELECT count(*) FROM v WHERE s = $1", 1, pt), 1);

    /* attempts bound the retries */
    txctx always = {.value = "never", .fail_always = LC_ERR_CONFLICT};
    assert_int_equal(lc_db_tx(db, 3, insert_fn, &always, &err), LC_ERR_CONFLICT);
    assert_int_equal(always.calls, 3);
    const char *pn[1] = {"never"};
    assert_int_equal(query_ll(other, "SELECT count(*) FROM v WHERE s = $1", 1, pn), 0);
    lc_db_free(other);
    lc_db_free(db);
    free(url);
}

/* Provokes a real serialization failure on the first attempt: after this transaction's
 * snapshot is taken, another session updates the row, so our UPDATE fails with 40001. */
typedef struct serctx {
    lc_db *other;
    int calls;
    char first_state[6];
} serctx;

static lc_rc increment_fn(lc_db *db, void *ctx, lc_err *err)
{
    serctx *c = ctx;
    c->calls++;
    lc_rc rc = lc_db_exec(db, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", 0, NULL, NULL, err);
    if (rc == LC_OK)
        rc = lc_db_exec(db, "SELECT n FROM counter WHERE id = 1", 0, NULL, NULL, err);
    if (rc == LC_OK && c->calls == 1)
        rc = lc_db_exec(c->other, "UPDATE counter SET n = n + 10 WHERE id = 1", 0, NULL, NULL, err);
    if (rc == LC_OK)
        rc = lc_db_exec(db, "UPDATE counter SET n = n + 1 WHERE id = 1", 0, NULL, NULL, err);
    if (c->calls == 1)
        lc_strlcpy(c->first_state, lc_db_sqlstate(db), sizeof(c->first_state));
    return rc;
}

static void test_tx_serialization_failure_retried(void **state)
{
    (void)state;
    char *url = fresh_url();
    lc_db *db = connect_ok(url);
    serctx c = {.other = connect_ok(url)};
    lc_err err = {0};
    exec_ok(db, "CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL)");
    exec_ok(db, "INSERT INTO counter VALUES (1, 0)");
    lc_rc rc = lc_db_tx(db, 3, increment_fn, &c, &err);
    if (rc != LC_OK)
        fail_msg("tx: %s", lc_err_msg(&err));
    assert_int_equal(c.calls, 2);
    assert_string_equal(c.first_state, "40001");
    assert_int_equal(query_ll(db, "SELECT n FROM counter WHERE id = 1", 0, NULL), 11);
    lc_db_free(c.other);
    lc_db_free(db);
    free(url);
}

/* Terminates db's backend from another session and waits until it is gone. */
static void kill_backend(lc_db *db, lc_db *killer)
{
    char pid[24];
    snprintf(pid, sizeof(pid), "%lld", query_ll(db, "SELECT pg_backend_pid()", 0, NULL));
    const char *p[1] = {pid};
    PGresult *r = NULL;
    lc_err err = {0};
    if (lc_db_exec(killer, "SELECT pg_terminate_backend($1::int, 5000)", 1, p, &r, &err) != LC_OK)
        fail_msg("terminate: %s", lc_err_msg(&err));
    assert_string_equal(PQgetvalue(r, 0, 0), "t");
    PQclear(r);
}

typedef struct killctx {
    lc_db *killer;
    int calls;
    lc_rc first_rc;
} killctx;

/* Loses its connection in the middle of the first attempt. */
static lc_rc killed_fn(lc_db *db, void *ctx, lc_err *err)
{
    killctx *k = ctx;
    k->calls++;
    if (k->calls == 1)
        kill_backend(db, k->killer);
    lc_rc rc = lc_db_exec(db, "INSERT INTO w VALUES (1)", 0, NULL, NULL, err);
    if (k->calls == 1)
        k->first_rc = rc;
    return rc;
}

static void test_connection_loss_recovers(void **state)
{
    (void)state;
    char *url = fresh_url();
    lc_db *db = connect_ok(url);
    lc_db *killer = connect_ok(url);
    lc_err err = {0};
    exec_ok(db, "CREATE TABLE w (x int)");

    /* lc_db_ensure notices the dead session without a statement and reconnects */
    long long pid0 = query_ll(db, "SELECT pg_backend_pid()", 0, NULL);
    kill_backend(db, killer);
    assert_int_equal(lc_db_ensure(db, &err), LC_OK);
    assert_int_equal(PQstatus(lc_db_conn(db)), CONNECTION_OK);
    assert_true(query_ll(db, "SELECT pg_backend_pid()", 0, NULL) != pid0);

    /* a statement on a dead session says unavailable */
    kill_backend(db, killer);
    assert_int_equal(lc_db_exec(db, "SELECT 1", 0, NULL, NULL, &err), LC_ERR_UNAVAILABLE);
    assert_true(strncmp(lc_db_sqlstate(db), "57P01", 5) == 0 ||
                strncmp(lc_db_sqlstate(db), "08", 2) == 0);
    assert_int_equal(lc_db_ensure(db, &err), LC_OK);
    exec_ok(db, "SELECT 1");

    /* lc_db_tx reconnects and retries when the session dies inside the transaction */
    killctx k = {.killer = killer};
    lc_rc rc = lc_db_tx(db, 3, killed_fn, &k, &err);
    if (rc != LC_OK)
        fail_msg("tx: %s", lc_err_msg(&err));
    assert_int_equal(k.calls, 2);
    assert_int_equal(k.first_rc, LC_ERR_UNAVAILABLE);
    assert_int_equal(query_ll(killer, "SELECT count(*) FROM w", 0, NULL), 1);

    /* and it also starts on a session that died while idle */
    kill_backend(db, killer);
    txctx dummy = {.value = "x"};
    exec_ok(killer, "CREATE TABLE v (s text)");
    assert_int_equal(lc_db_tx(db, 1, insert_fn, &dummy, &err), LC_OK);
    assert_int_equal(dummy.calls, 1);
    lc_db_free(killer);
    lc_db_free(db);
    free(url);
}

/* lc_db_exec_static: prepared once per session, kept across a rolled-back transaction,
 * prepared again on a reset session; parameters stay data; a failing text is not kept. */
static const char static_count_sql[] = "SELECT count(*) FROM s WHERE x > $1::int";
static const char static_echo_sql[] = "SELECT $1::text";
static const char static_bad_sql[] = "SELEC 1";

static long long static_ll(lc_db *db, const char *sql, const char *p1)
{
    const char *p[1] = {p1};
    return value_ll(lc_db_exec_static, db, sql, 1, p);
}

static void test_exec_static(void **state)
{
    (void)state;
    char *url = fresh_url();
    lc_db *db = connect_ok(url);
    lc_db *killer = connect_ok(url);
    lc_err err = {0};
    PGresult *r = NULL;
    exec_ok(db, "CREATE TABLE s (x int)");
    exec_ok(db, "INSERT INTO s SELECT generate_series(1, 10)");
    static const char count_prepared[] =
        "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1";
    const char *q[1] = {static_count_sql};

    assert_int_equal(static_ll(db, static_count_sql, "3"), 7);
    assert_int_equal(static_ll(db, static_count_sql, "8"), 2); /* new parameters, same plan */
    assert_int_equal(query_ll(db, count_prepared, 1, q), 1);

    /* prepared inside a transaction that rolls back: still prepared, not prepared twice */
    exec_ok(db, "BEGIN");
    const char *evil[1] = {"'; DROP TABLE s;--"};
    assert_int_equal(lc_db_exec_static(db, static_echo_sql, 1, evil, &r, &err), LC_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), evil[0]);
    PQclear(r);
    exec_ok(db, "ROLLBACK");
    assert_int_equal(lc_db_exec_static(db, static_echo_sql, 1, evil, NULL, &err), LC_OK);
    assert_int_equal(query_ll(db, "SELECT count(*) FROM pg_prepared_statements", 0, NULL), 2);
    assert_int_equal(query_ll(db, "SELECT count(*) FROM s", 0, NULL), 10);

    /* a text the server refuses is an error with its SQLSTATE and is not remembered */
    for (int i = 0; i < 2; i++) {
        assert_int_equal(lc_db_exec_static(db, static_bad_sql, 0, NULL, NULL, &err), LC_ERR_DB);
        assert_string_equal(lc_db_sqlstate(db), "42601");
    }
    assert_int_equal(query_ll(db, "SELECT count(*) FROM pg_prepared_statements", 0, NULL), 2);

    /* a reset session has nothing prepared: the next call prepares again */
    kill_backend(db, killer);
    assert_int_equal(lc_db_ensure(db, &err), LC_OK);
    assert_int_equal(query_ll(db, count_prepared, 1, q), 0);
    assert_int_equal(static_ll(db, static_count_sql, "0"), 10);
    assert_int_equal(query_ll(db, count_prepared, 1, q), 1);
    lc_db_free(killer);
    lc_db_free(db);
    free(url);
}

#define POOL_SIZE    3
#define POOL_THREADS 8
#define POOL_ROUNDS  5

typedef struct poolctx {
    lc_db_pool *pool;
    atomic_int in_use, max_in_use, failures;
} poolctx;

static void *pool_thread(void *arg)
{
    poolctx *c = arg;
    for (int i = 0; i < POOL_ROUNDS; i++) {
        lc_db *db = NULL;
        lc_err err = {0};
        if (lc_db_pool_get(c->pool, 10000, &db, &err) != LC_OK) {
            atomic_fetch_add(&c->failures, 1);
            continue;
        }
        int now = atomic_fetch_add(&c->in_use, 1) + 1;
        int seen = atomic_load(&c->max_in_use);
        while (now > seen && !atomic_compare_exchange_weak(&c->max_in_use, &seen, now))
            ;
        if (lc_db_exec(db, "SELECT pg_sleep(0.02)", 0, NULL, NULL, &err) != LC_OK)
            atomic_fetch_add(&c->failures, 1);
        atomic_fetch_sub(&c->in_use, 1);
        lc_db_pool_put(c->pool, db);
    }
    return NULL;
}

static void test_pool(void **state)
{
    (void)state;
    char *url = fresh_url();
    lc_db_pool *pool = NULL;
    lc_err err = {0};
    assert_int_equal(lc_db_pool_new(url, 0, 1000, NULL, &pool, &err), LC_ERR_CONFIG);
    assert_int_equal(lc_db_pool_new(url, POOL_SIZE, 5000, NULL, &pool, &err), LC_OK);

    /* all borrowed: the next get times out after about wait_ms */
    lc_db *held[POOL_SIZE] = {0};
    for (int i = 0; i < POOL_SIZE; i++)
        assert_int_equal(lc_db_pool_get(pool, 1000, &held[i], &err), LC_OK);
    lc_db *extra = NULL;
    int64_t t0 = lc_now_ms();
    assert_int_equal(lc_db_pool_get(pool, 200, &extra, &err), LC_ERR_TIMEOUT);
    int64_t took = lc_now_ms() - t0;
    assert_true(took >= 190 && took < 2000);
    assert_null(extra);

    /* a connection put back with an open transaction comes back clean; one whose backend
     * died comes back reconnected */
    assert_int_equal(lc_db_begin(held[0], &err), LC_OK);
    lc_db_pool_put(pool, held[0]);
    assert_int_equal(lc_db_pool_get(pool, 1000, &held[0], &err), LC_OK);
    assert_int_equal(PQtransactionStatus(lc_db_conn(held[0])), PQTRANS_IDLE);
    kill_backend(held[0], held[1]);
    lc_db_pool_put(pool, held[0]);
    assert_int_equal(lc_db_pool_get(pool, 1000, &held[0], &err), LC_OK);
    exec_ok(held[0], "SELECT 1");
    for (int i = 0; i < POOL_SIZE; i++)
        lc_db_pool_put(pool, held[i]);

    /* many threads share few connections, never more than the pool size at once */
    poolctx c = {.pool = pool};
    pthread_t th[POOL_THREADS];
    for (int i = 0; i < POOL_THREADS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, pool_thread, &c), 0);
    for (int i = 0; i < POOL_THREADS; i++)
        pthread_join(th[i], NULL);
    assert_int_equal(atomic_load(&c.failures), 0);
    assert_true(atomic_load(&c.max_in_use) <= POOL_SIZE);
    assert_true(atomic_load(&c.max_in_use) >= 2);
    lc_db_pool_free(pool);
    lc_db_pool_free(NULL);
    free(url);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_connect_and_query),
        cmocka_unit_test(test_connect_unreachable),
        cmocka_unit_test(test_connect_stop),
        cmocka_unit_test(test_exec_params_are_data),
        cmocka_unit_test(test_error_classes),
        cmocka_unit_test(test_migrate_idempotent),
        cmocka_unit_test(test_migrate_concurrent),
        cmocka_unit_test(test_tx_commit_rollback_retry),
        cmocka_unit_test(test_tx_serialization_failure_retried),
        cmocka_unit_test(test_connection_loss_recovers),
        cmocka_unit_test(test_exec_static),
        cmocka_unit_test(test_pool),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
