/*
 * test_outbox_relay.c: the outbox relay between the real PostgreSQL of tests/run.sh and a
 * real Kafka-protocol broker (librdkafka's mock cluster, in this process, on loopback).
 * Messages are read back with a plain assign()ed consumer (no group join delay) and checked
 * for exactly-once delivery and per-key order. Each test has its own database and cluster.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include "lc/db.h"
#include "lc/log.h"
#include "lc/metrics.h"
#include "lc/outbox.h"
#include "lc/util.h"
#include "ts.h"

#define TOPIC      "radpipe.test.outbox"
#define PARTITIONS 4
#define WAIT_MS    30000
#define MAXMSG     512
/* the relay's advisory lock key, the bytes "radpipeO" */
#define RELAY_LOCK_KEY "8241979227032806735"

typedef struct fixture {
    char *url;
    lc_db *db;
    rd_kafka_t *mrk; /* hosts the mock cluster only */
    rd_kafka_mock_cluster_t *mc;
    char brokers[128];
    lc_kafka_producer *p;
} fixture;

static int setup(void **state)
{
    char es[256];
    lc_err err = {0};
    lc_log_init("test_outbox_relay", LC_LOG_WARN);
    fixture *f = calloc(1, sizeof(*f));
    *state = f;
    if (!f)
        return -1;
    f->url = ts_pg_fresh_db("relay");
    if (!f->url) {
        fprintf(stderr, "RADPIPE_TEST_PG_URL is not set or the server refused: "
                        "run through tests/run.sh\n");
        return -1;
    }
    if (lc_db_connect(f->url, 5000, NULL, &f->db, &err) != LC_OK ||
        lc_db_migrate(f->db, &err) != LC_OK) {
        fprintf(stderr, "database: %s\n", lc_err_msg(&err));
        return -1;
    }
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "3", es, sizeof(es));
    if (!(f->mrk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, es, sizeof(es))) ||
        !(f->mc = rd_kafka_mock_cluster_new(f->mrk, 1)))
        return -1;
    lc_strlcpy(f->brokers, rd_kafka_mock_cluster_bootstraps(f->mc), sizeof(f->brokers));
    if (rd_kafka_mock_topic_create(f->mc, TOPIC, PARTITIONS, 1) != 0)
        return -1;
    /* librdkafka fails a message itself after 1 s, well inside the relay's 10 s wait, so a
     * failed row is never also still queued when the relay retries it; reconnect quickly
     * once the broker is back */
    static const char *const extra[] = {"message.timeout.ms=1000", "reconnect.backoff.ms=50",
                                        "reconnect.backoff.max.ms=300", NULL};
    lc_kafka_conf kc = {.brokers = f->brokers,
                        .topic_prefix = "radpipe.",
                        .client_id = "test_outbox_relay",
                        .extra = extra};
    if (lc_kafka_producer_new(&kc, &f->p, &err) != LC_OK) {
        fprintf(stderr, "producer: %s\n", lc_err_msg(&err));
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    if (!f)
        return 0;
    lc_kafka_producer_free(f->p, 0);
    if (f->mc)
        rd_kafka_mock_cluster_destroy(f->mc);
    if (f->mrk)
        rd_kafka_destroy(f->mrk);
    lc_db_free(f->db);
    free(f->url);
    free(f);
    return 0;
}

/* ---- writing and reading the outbox ---------------------------------------------------- */

/* One transaction adding n rows "<tag>:<key>:<seq>" under keys "study-<i % nkeys>" (seq
 * counts per key from first); committed, or rolled back when commit is 0. */
static void add_rows(lc_db *db, const char *tag, int n, int nkeys, int first, int commit)
{
    lc_err err = {0};
    assert_int_equal(lc_db_begin(db, &err), LC_OK);
    for (int i = 0; i < n; i++) {
        char key[32], payload[64];
        snprintf(key, sizeof(key), "study-%d", i % nkeys);
        snprintf(payload, sizeof(payload), "%s:%s:%d", tag, key, first + i / nkeys);
        if (lc_outbox_add(db, TOPIC, key, payload, &err) != LC_OK)
            fail_msg("outbox add: %s", lc_err_msg(&err));
    }
    if (commit)
        assert_int_equal(lc_db_commit(db, &err), LC_OK);
    else
        lc_db_rollback(db);
}

static long long outbox_count(lc_db *db)
{
    PGresult *r = NULL;
    lc_err err = {0};
    if (lc_db_exec(db, "SELECT count(*) FROM outbox", 0, NULL, &r, &err) != LC_OK)
        fail_msg("count: %s", lc_err_msg(&err));
    long long n = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return n;
}

/* Wait until the outbox holds `want` rows; 0 on timeout. */
static int wait_outbox(lc_db *db, long long want, int timeout_ms)
{
    int64_t end = lc_now_ms() + timeout_ms;
    while (outbox_count(db) != want) {
        if (lc_now_ms() > end)
            return 0;
        lc_sleep_ms(20, NULL);
    }
    return 1;
}

typedef struct got {
    int n;
    char key[MAXMSG][32];
    char payload[MAXMSG][64];
    char ctype[MAXMSG][64];
} got;

/* Read the topic from the beginning until `want` messages arrived, then quiet_ms more so a
 * duplicate would show up too. */
static void consume(const fixture *f, int want, int quiet_ms, got *g)
{
    char es[256];
    memset(g, 0, sizeof(*g));
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    assert_int_equal(rd_kafka_conf_set(conf, "bootstrap.servers", f->brokers, es, sizeof(es)), 0);
    assert_int_equal(rd_kafka_conf_set(conf, "group.id", "test-reader", es, sizeof(es)), 0);
    assert_int_equal(rd_kafka_conf_set(conf, "enable.auto.commit", "false", es, sizeof(es)), 0);
    assert_int_equal(rd_kafka_conf_set(conf, "fetch.wait.max.ms", "50", es, sizeof(es)), 0);
    rd_kafka_conf_set(conf, "log_level", "3", es, sizeof(es));
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, es, sizeof(es));
    assert_non_null(rk);
    rd_kafka_topic_partition_list_t *parts = rd_kafka_topic_partition_list_new(PARTITIONS);
    for (int i = 0; i < PARTITIONS; i++)
        rd_kafka_topic_partition_list_add(parts, TOPIC, i)->offset = RD_KAFKA_OFFSET_BEGINNING;
    assert_int_equal(rd_kafka_assign(rk, parts), 0);
    rd_kafka_topic_partition_list_destroy(parts);

    int64_t end = lc_now_ms() + WAIT_MS, quiet_end = 0;
    while (lc_now_ms() < (quiet_end ? quiet_end : end)) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 50);
        if (!m)
            continue;
        if (!m->err && g->n < MAXMSG) {
            rd_kafka_headers_t *h = NULL;
            const void *v = NULL;
            size_t vlen = 0;
            snprintf(g->key[g->n], sizeof(g->key[0]), "%.*s", (int)m->key_len,
                     m->key ? (const char *)m->key : "");
            snprintf(g->payload[g->n], sizeof(g->payload[0]), "%.*s", (int)m->len,
                     (const char *)m->payload);
            if (rd_kafka_message_headers(m, &h) == 0 &&
                rd_kafka_header_get_last(h, "content-type", &v, &vlen) == 0)
                snprintf(g->ctype[g->n], sizeof(g->ctype[0]), "%.*s", (int)vlen, (const char *)v);
            g->n++;
        }
        rd_kafka_message_destroy(m);
        if (g->n >= want && !quiet_end)
            quiet_end = lc_now_ms() + quiet_ms;
    }
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
}

/* Exactly n messages carry tag, each once, and each key's sequence numbers arrive in order
 * (0, 1, 2, ... from the first add_rows of that tag). */
static void check_tag(const got *g, const char *tag, int n, int nkeys)
{
    int seen = 0;
    int next[64] = {0};
    size_t tl = strlen(tag);
    assert_true(nkeys <= 64);
    for (int i = 0; i < g->n; i++) {
        if (strncmp(g->payload[i], tag, tl) != 0 || g->payload[i][tl] != ':')
            continue;
        seen++;
        int k = -1, seq = -1;
        if (sscanf(g->payload[i] + tl, ":study-%d:%d", &k, &seq) != 2 || k < 0 || k >= nkeys)
            fail_msg("unexpected payload \"%s\"", g->payload[i]);
        char key[32];
        snprintf(key, sizeof(key), "study-%d", k);
        assert_string_equal(g->key[i], key);
        assert_string_equal(g->ctype[i], "application/cloudevents+json");
        if (seq != next[k])
            fail_msg("key %s: got seq %d, expected %d (duplicate or out of order)", key, seq,
                     next[k]);
        next[k]++;
    }
    if (seen != n)
        fail_msg("tag %s: %d messages, expected %d", tag, seen, n);
}

/* ---- tests ----------------------------------------------------------------------------- */

static void test_once_publishes_committed_rows(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    int n = -1;
    add_rows(f->db, "ok", 12, 3, 0, 1);
    add_rows(f->db, "rb", 5, 2, 0, 0); /* rolled back: never published */
    assert_int_equal(outbox_count(f->db), 12);

    assert_int_equal(lc_outbox_relay_once(f->db, f->p, 0, &n, &err), LC_ERR_INVALID);
    assert_int_equal(lc_outbox_relay_once(f->db, f->p, 5, &n, &err), LC_OK);
    assert_int_equal(n, 5);
    assert_int_equal(outbox_count(f->db), 7);
    assert_int_equal(lc_outbox_relay_once(f->db, f->p, 100, &n, &err), LC_OK);
    assert_int_equal(n, 7);
    assert_int_equal(outbox_count(f->db), 0);
    assert_int_equal(lc_outbox_relay_once(f->db, f->p, 100, &n, &err), LC_OK);
    assert_int_equal(n, 0);
    assert_int_equal(PQtransactionStatus(lc_db_conn(f->db)), PQTRANS_IDLE);

    got *g = calloc(1, sizeof(*g));
    consume(f, 12, 500, g);
    assert_int_equal(g->n, 12);
    check_tag(g, "ok", 12, 3);
    check_tag(g, "rb", 0, 2);
    free(g);
}

static void test_once_broker_down_keeps_rows(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    int n = -1;
    add_rows(f->db, "down", 6, 2, 0, 1);
    rd_kafka_mock_broker_set_down(f->mc, 1);
    lc_rc rc = lc_outbox_relay_once(f->db, f->p, 100, &n, &err);
    assert_int_not_equal(rc, LC_OK);
    assert_int_equal(n, 0);
    assert_non_null(strstr(lc_err_msg(&err), "could not publish"));
    assert_null(strstr(lc_err_msg(&err), "down:study")); /* no payloads in errors */
    assert_int_equal(outbox_count(f->db), 6);
    assert_int_equal(PQtransactionStatus(lc_db_conn(f->db)), PQTRANS_IDLE);

    /* back up: the producer reconnects within its backoff, but on a loaded machine that may
     * take longer than one round's message timeout; a failed round keeps every row (as the
     * relay thread does, try again) */
    rd_kafka_mock_broker_set_up(f->mc, 1);
    int rounds = 0, total = 0;
    do {
        n = 0;
        rc = lc_outbox_relay_once(f->db, f->p, 100, &n, &err);
        total += n;
        assert_int_equal(outbox_count(f->db), 6 - total); /* only acknowledged rows go */
    } while (rc != LC_OK && ++rounds < 15);
    if (rc != LC_OK)
        fail_msg("once after broker up, %d rounds: %s", rounds + 1, lc_err_msg(&err));
    assert_int_equal(total, 6);
    assert_int_equal(outbox_count(f->db), 0);
    got *g = calloc(1, sizeof(*g));
    consume(f, 6, 500, g);
    check_tag(g, "down", 6, 2);
    free(g);
}

static void test_relay_thread_publishes_once(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    lc_metrics *m = lc_metrics_new();
    lc_outbox_relay *r = NULL;
    assert_non_null(m);
    assert_int_equal(lc_outbox_relay_start("postgresql://[::1", f->p, m, &r, &err), LC_ERR_CONFIG);
    assert_null(r);
    assert_int_equal(lc_outbox_relay_start(f->url, f->p, m, &r, &err), LC_OK);

    /* several transactions, one rolled back, while the relay runs */
    add_rows(f->db, "a", 32, 4, 0, 1);
    add_rows(f->db, "x", 10, 4, 0, 0);
    add_rows(f->db, "a", 32, 4, 8, 1); /* each key's seqs continue from 8 */
    if (!wait_outbox(f->db, 0, WAIT_MS))
        fail_msg("outbox not emptied: %lld rows left", outbox_count(f->db));

    /* a lone row on an idle relay: the NOTIFY wakes it (the 1 s poll would too) */
    int64_t t0 = lc_now_ms();
    add_rows(f->db, "b", 1, 1, 0, 1);
    assert_true(wait_outbox(f->db, 0, WAIT_MS));
    fprintf(stderr, "idle relay published a new row after %lld ms\n",
            (long long)(lc_now_ms() - t0));
    lc_outbox_relay_stop(r, 2000);

    got *g = calloc(1, sizeof(*g));
    consume(f, 65, 500, g);
    assert_int_equal(g->n, 65);
    check_tag(g, "a", 64, 4);
    check_tag(g, "x", 0, 4);
    check_tag(g, "b", 1, 1);
    free(g);
    lc_counter *pub = lc_metrics_counter(m, "radpipe_outbox_published_total", "", NULL);
    lc_histogram *lag = lc_metrics_histogram(m, "radpipe_outbox_lag_seconds", "", NULL, NULL, 0);
    assert_non_null(pub);
    assert_non_null(lag);
    assert_true(lc_metric_value(pub) == 65.0);
    assert_true(lc_metric_value(lag) == 65.0);
    lc_metrics_free(m);
    lc_outbox_relay_stop(NULL, 0);
}

/* Many small transactions of interleaved keys: each key's events arrive in commit order. */
static void test_relay_keeps_key_order(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    lc_outbox_relay *r = NULL;
    assert_int_equal(lc_outbox_relay_start(f->url, f->p, NULL, &r, &err), LC_OK);
    for (int t = 0; t < 5; t++)
        add_rows(f->db, "ord", 8, 4, t * 2, 1); /* 2 per key per transaction */
    assert_true(wait_outbox(f->db, 0, WAIT_MS));
    lc_outbox_relay_stop(r, 2000);
    got *g = calloc(1, sizeof(*g));
    consume(f, 40, 500, g);
    check_tag(g, "ord", 40, 4);
    free(g);
}

static void test_relay_broker_down_then_up(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    lc_metrics *m = lc_metrics_new();
    lc_outbox_relay *r = NULL;
    assert_int_equal(lc_outbox_relay_start(f->url, f->p, m, &r, &err), LC_OK);
    add_rows(f->db, "warm", 1, 1, 0, 1);
    assert_true(wait_outbox(f->db, 0, WAIT_MS));

    lc_counter *errs = lc_metrics_counter(m, "radpipe_outbox_errors_total", "", NULL);
    assert_non_null(errs);
    rd_kafka_mock_broker_set_down(f->mc, 1);
    add_rows(f->db, "held", 10, 3, 0, 1);
    /* the relay fails a round (librdkafka times the messages out) and keeps the rows */
    int64_t end = lc_now_ms() + WAIT_MS;
    while (lc_metric_value(errs) < 1 && lc_now_ms() < end)
        lc_sleep_ms(20, NULL);
    assert_true(lc_metric_value(errs) >= 1);
    assert_int_equal(outbox_count(f->db), 10);

    rd_kafka_mock_broker_set_up(f->mc, 1);
    if (!wait_outbox(f->db, 0, WAIT_MS))
        fail_msg("outbox not emptied after the broker came back: %lld rows left",
                 outbox_count(f->db));
    lc_outbox_relay_stop(r, 2000);
    got *g = calloc(1, sizeof(*g));
    consume(f, 11, 1000, g);
    assert_int_equal(g->n, 11);
    check_tag(g, "held", 10, 3);
    free(g);
    lc_metrics_free(m);
}

static long long relay_lock_holders(lc_db *db)
{
    PGresult *r = NULL;
    lc_err err = {0};
    if (lc_db_exec(db,
                   "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                   "AND database = (SELECT oid FROM pg_database WHERE datname = "
                   "current_database()) AND objsubid = 1 "
                   "AND (classid::bigint << 32 | objid::bigint) = " RELAY_LOCK_KEY,
                   0, NULL, &r, &err) != LC_OK)
        fail_msg("pg_locks: %s", lc_err_msg(&err));
    long long n = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return n;
}

/* Backend pid of the session holding the relay lock, 0 when none. */
static long long relay_lock_pid(lc_db *db)
{
    PGresult *r = NULL;
    lc_err err = {0};
    if (lc_db_exec(db,
                   "SELECT coalesce(max(pid), 0) FROM pg_locks WHERE locktype = 'advisory' "
                   "AND granted AND objsubid = 1 "
                   "AND (classid::bigint << 32 | objid::bigint) = " RELAY_LOCK_KEY,
                   0, NULL, &r, &err) != LC_OK)
        fail_msg("pg_locks: %s", lc_err_msg(&err));
    long long pid = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return pid;
}

static long long sessions_on_db(lc_db *db)
{
    PGresult *r = NULL;
    lc_err err = {0};
    if (lc_db_exec(db, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
                   0, NULL, &r, &err) != LC_OK)
        fail_msg("pg_stat_activity: %s", lc_err_msg(&err));
    long long n = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return n;
}

/* Losing the database session loses the lock: the relay reconnects, takes it again and
 * goes on publishing. */
static void test_relay_survives_lost_session(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    lc_outbox_relay *r = NULL;
    assert_int_equal(lc_outbox_relay_start(f->url, f->p, NULL, &r, &err), LC_OK);
    add_rows(f->db, "s", 6, 2, 0, 1);
    assert_true(wait_outbox(f->db, 0, WAIT_MS));
    long long pid = relay_lock_pid(f->db);
    assert_true(pid > 0);

    char pids[24];
    snprintf(pids, sizeof(pids), "%lld", pid);
    const char *p[1] = {pids};
    assert_int_equal(
        lc_db_exec(f->db, "SELECT pg_terminate_backend($1::int, 5000)", 1, p, NULL, &err), LC_OK);
    add_rows(f->db, "s", 6, 2, 3, 1);
    if (!wait_outbox(f->db, 0, WAIT_MS))
        fail_msg("relay did not recover: %lld rows left", outbox_count(f->db));
    long long pid2 = relay_lock_pid(f->db);
    assert_true(pid2 > 0 && pid2 != pid);
    lc_outbox_relay_stop(r, 2000);

    got *g = calloc(1, sizeof(*g));
    consume(f, 12, 500, g);
    check_tag(g, "s", 12, 2);
    free(g);
}

static void test_two_relays_one_leader(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    lc_outbox_relay *r1 = NULL, *r2 = NULL;
    assert_int_equal(lc_outbox_relay_start(f->url, f->p, NULL, &r1, &err), LC_OK);
    assert_int_equal(lc_outbox_relay_start(f->url, f->p, NULL, &r2, &err), LC_OK);
    for (int t = 0; t < 4; t++)
        add_rows(f->db, "two", 10, 5, t * 2, 1);
    assert_true(wait_outbox(f->db, 0, WAIT_MS));
    /* both relays are connected (with this test's own session), one holds the lock */
    int64_t end = lc_now_ms() + WAIT_MS;
    while (sessions_on_db(f->db) < 3 && lc_now_ms() < end)
        lc_sleep_ms(20, NULL);
    assert_int_equal(sessions_on_db(f->db), 3);
    assert_int_equal(relay_lock_holders(f->db), 1);

    /* whichever was active, stopping r1 leaves r2 to publish what comes next */
    lc_outbox_relay_stop(r1, 2000);
    add_rows(f->db, "after", 6, 2, 0, 1);
    if (!wait_outbox(f->db, 0, WAIT_MS))
        fail_msg("the remaining relay did not take over: %lld rows left", outbox_count(f->db));
    assert_int_equal(relay_lock_holders(f->db), 1);
    lc_outbox_relay_stop(r2, 2000);
    /* the server ends a closed session asynchronously: its lock goes shortly after */
    end = lc_now_ms() + WAIT_MS;
    while (relay_lock_holders(f->db) != 0 && lc_now_ms() < end)
        lc_sleep_ms(20, NULL);
    assert_int_equal(relay_lock_holders(f->db), 0);

    got *g = calloc(1, sizeof(*g));
    consume(f, 46, 1000, g);
    assert_int_equal(g->n, 46);
    check_tag(g, "two", 40, 5);
    check_tag(g, "after", 6, 2);
    free(g);
}

static void test_stop_drains_pending(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    lc_outbox_relay *r = NULL;
    /* rows already waiting; stop right after start: the relay still connects, takes the
     * lock and publishes them all before it returns */
    add_rows(f->db, "drain", 25, 5, 0, 1);
    assert_int_equal(lc_outbox_relay_start(f->url, f->p, NULL, &r, &err), LC_OK);
    lc_outbox_relay_stop(r, 20000);
    assert_int_equal(outbox_count(f->db), 0);
    got *g = calloc(1, sizeof(*g));
    consume(f, 25, 500, g);
    check_tag(g, "drain", 25, 5);
    free(g);

    /* with the broker down, stop gives up after drain_ms and the rows stay */
    rd_kafka_mock_broker_set_down(f->mc, 1);
    add_rows(f->db, "stuck", 3, 1, 0, 1);
    assert_int_equal(lc_outbox_relay_start(f->url, f->p, NULL, &r, &err), LC_OK);
    int64_t t0 = lc_now_ms();
    lc_outbox_relay_stop(r, 1500);
    int64_t took = lc_now_ms() - t0;
    assert_true(took >= 1000);
    assert_true(took < 1500 + 2500);
    assert_int_equal(outbox_count(f->db), 3);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_once_publishes_committed_rows, setup, teardown),
        cmocka_unit_test_setup_teardown(test_once_broker_down_keeps_rows, setup, teardown),
        cmocka_unit_test_setup_teardown(test_relay_thread_publishes_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_relay_keeps_key_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_relay_broker_down_then_up, setup, teardown),
        cmocka_unit_test_setup_teardown(test_relay_survives_lost_session, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_relays_one_leader, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_drains_pending, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
