/*
 * outbox_relay.c: the relay half of lc/outbox.h. A thread with its own connection publishes
 * outbox rows in id order, one producer batch per round, and deletes them after the ack.
 * A session advisory lock elects one active relay across processes; lc_outbox_add's NOTIFY
 * on radpipe_outbox wakes it, and it looks every second anyway. The caller's thread and the
 * relay thread share the struct only through atomics and an eventfd.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include "lc/log.h"
#include "lc/outbox.h"
#include "lc/util.h"

/* The bytes "radpipeO" as a bigint; migrations lock "radpipeM". */
#define RELAY_LOCK_KEY           "8241979227032806735"
#define RELAY_CHANNEL            "radpipe_outbox"
#define RELAY_BATCH              500
#define RELAY_PRODUCE_TIMEOUT_MS 10000
/* how often to look without a notification, and to retry the lock */
#define RELAY_IDLE_MS         1000
#define RELAY_CONNECT_WAIT_MS 10000
#define RELAY_BACKOFF_MIN_MS  200
#define RELAY_BACKOFF_MAX_MS  10000
#define CONTENT_TYPE          "application/cloudevents+json"

typedef struct relay_metrics {
    lc_counter *published, *errors;
    lc_histogram *lag;
} relay_metrics;

struct lc_outbox_relay {
    char *url;
    lc_kafka_producer *p; /* borrowed */
    relay_metrics m;
    pthread_t thread;
    int wake_fd;                 /* eventfd: stop wakes the thread out of poll() */
    atomic_int draining;         /* stop was called: publish what is pending, then exit */
    atomic_int halt;             /* the drain deadline passed: exit now */
    _Atomic int64_t drain_until; /* lc_now_ms() deadline, set before draining */
};

/* ---- one round ------------------------------------------------------------------------- */

/* 1 when an earlier message of msgs[0..i) with the same key failed. Deleting msgs[i] then
 * would let a retry of the failed one overtake it; keeping it republishes both in order. */
static int behind_failure(const lc_kafka_out *msgs, size_t i)
{
    if (!msgs[i].key)
        return 0;
    for (size_t j = 0; j < i; j++)
        if (msgs[j].rc != LC_OK && msgs[j].key && msgs[j].key_len == msgs[i].key_len &&
            memcmp(msgs[j].key, msgs[i].key, msgs[i].key_len) == 0)
            return 1;
    return 0;
}

/* Publish up to max rows and delete the acknowledged ones, in one transaction on db.
 * *fetched: rows selected; *published: rows published and deleted. A publish failure of
 * some rows returns its rc (after deleting the others); the failed rows stay for a later
 * round. */
static lc_rc relay_round(lc_db *db, lc_kafka_producer *p, int max, int timeout_ms,
                         const relay_metrics *m, int *fetched, int *published, lc_err *err)
{
    PGresult *rows = NULL;
    lc_kafka_out *msgs = NULL;
    char *ids = NULL, limit[16];
    size_t ids_cap = 0;
    const char *params[1] = {limit};
    lc_rc rc, pub_rc = LC_OK;
    lc_err pub_err = {0};
    int n = 0, ndel = 0;
    *fetched = *published = 0;

    snprintf(limit, sizeof(limit), "%d", max);
    if ((rc = lc_db_begin(db, err)) != LC_OK)
        goto out;
    /* FOR UPDATE rather than SKIP LOCKED: a second publisher (lc_outbox_relay_once next to a
     * relay) waits and then finds the rows gone, instead of publishing later rows early */
    rc = lc_db_exec_static(db,
                           "SELECT id, topic, key, payload, "
                           "extract(epoch FROM clock_timestamp() - created_at)::float8 "
                           "FROM outbox ORDER BY id LIMIT $1 FOR UPDATE",
                           1, params, &rows, err);
    if (rc != LC_OK) {
        lc_err_wrap(err, "could not read the outbox");
        goto out;
    }
    n = PQntuples(rows);
    *fetched = n;
    if (n == 0) {
        rc = lc_db_commit(db, err);
        goto out;
    }
    msgs = calloc((size_t)n, sizeof(*msgs));
    ids_cap = (size_t)n * 21 + 3; /* "{" + n * (19 digits + ",") + "}" */
    ids = malloc(ids_cap);
    if (!msgs || !ids) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        msgs[i].topic = PQgetvalue(rows, i, 1);
        if (!PQgetisnull(rows, i, 2)) {
            msgs[i].key = PQgetvalue(rows, i, 2);
            msgs[i].key_len = (size_t)PQgetlength(rows, i, 2);
        }
        msgs[i].payload = PQgetvalue(rows, i, 3);
        msgs[i].len = (size_t)PQgetlength(rows, i, 3);
        msgs[i].content_type = CONTENT_TYPE;
    }
    int64_t t0 = lc_now_ms();
    pub_rc = lc_kafka_produce_batch(p, msgs, (size_t)n, timeout_ms, &pub_err);
    double took_s = (double)(lc_now_ms() - t0) / 1000.0;

    size_t len = 0;
    ids[len++] = '{';
    for (int i = 0; i < n; i++) {
        if (msgs[i].rc != LC_OK || behind_failure(msgs, (size_t)i))
            continue;
        len += (size_t)snprintf(ids + len, ids_cap - len, "%s%s", ndel ? "," : "",
                                PQgetvalue(rows, i, 0));
        ndel++;
    }
    ids[len++] = '}';
    ids[len] = '\0';
    if (ndel > 0) {
        const char *del[1] = {ids};
        rc = lc_db_exec_static(db, "DELETE FROM outbox WHERE id = ANY($1::bigint[])", 1, del, NULL,
                               err);
        if (rc == LC_OK)
            rc = lc_db_commit(db, err);
        if (rc != LC_OK) {
            /* published but still in the outbox: they go out again (at-least-once) */
            lc_err_wrap(err, "could not delete %d published outbox rows", ndel);
            goto out;
        }
    } else if ((rc = lc_db_commit(db, err)) != LC_OK) {
        goto out;
    }
    *published = ndel;
    lc_counter_add(m->published, ndel);
    for (int i = 0; i < n; i++)
        if (msgs[i].rc == LC_OK && !behind_failure(msgs, (size_t)i))
            lc_histogram_observe(m->lag, atof(PQgetvalue(rows, i, 4)) + took_s);
    if (pub_rc != LC_OK) {
        rc = lc_err_set(err, pub_rc, "could not publish %d of %d outbox rows: %s", n - ndel, n,
                        lc_err_msg(&pub_err));
    }
out:
    if (rc != LC_OK)
        lc_db_rollback(db);
    free(ids);
    free(msgs);
    PQclear(rows);
    return rc;
}

lc_rc lc_outbox_relay_once(lc_db *db, lc_kafka_producer *p, int max, int *published, lc_err *err)
{
    static const relay_metrics none = {0};
    int fetched = 0, n = 0;
    if (published)
        *published = 0;
    if (!db || !p || max < 1)
        return lc_err_set(err, LC_ERR_INVALID, "invalid outbox relay arguments");
    lc_rc rc = relay_round(db, p, max, RELAY_PRODUCE_TIMEOUT_MS, &none, &fetched, &n, err);
    if (published)
        *published = n;
    return rc;
}

/* ---- the relay thread ------------------------------------------------------------------ */

static void wake(lc_outbox_relay *r)
{
    uint64_t one = 1;
    ssize_t w = write(r->wake_fd, &one, sizeof(one));
    (void)w; /* the counter cannot overflow with one write per stop */
}

/* 1 when a notification is already queued on db's connection (reading what is pending). */
static int drain_notifies(lc_db *db)
{
    PGconn *c = lc_db_conn(db);
    PGnotify *n;
    int got = 0;
    if (PQconsumeInput(c))
        while ((n = PQnotifies(c)) != NULL) {
            PQfreemem(n);
            got = 1;
        }
    return got;
}

/* Sleep up to ms, waking early on stop and, when db is non-NULL, on a notification. */
static void wait_event(lc_outbox_relay *r, lc_db *db, int ms)
{
    if (db && drain_notifies(db))
        return;
    struct pollfd pfd[2] = {{.fd = r->wake_fd, .events = POLLIN},
                            {.fd = db ? PQsocket(lc_db_conn(db)) : -1, .events = POLLIN}};
    if (poll(pfd, 2, ms) > 0) {
        if (pfd[0].revents & POLLIN) {
            uint64_t v;
            ssize_t rd = read(r->wake_fd, &v, sizeof(v));
            (void)rd;
        }
        if (db)
            drain_notifies(db);
    }
}

/* Try to become the active relay: the lock is held by this session, so it goes with the
 * connection. Also LISTENs, which is session state as well. */
static int try_lead(lc_db *db, lc_err *err)
{
    PGresult *res = NULL;
    int got = 0;
    if (lc_db_exec(db, "SELECT pg_try_advisory_lock(" RELAY_LOCK_KEY ")", 0, NULL, &res, err) !=
        LC_OK)
        return 0;
    got = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    if (got && lc_db_exec(db, "LISTEN " RELAY_CHANNEL, 0, NULL, NULL, err) != LC_OK) {
        /* without LISTEN it would still work, by polling: drop the lock and try again */
        PQclear(PQexec(lc_db_conn(db), "SELECT pg_advisory_unlock(" RELAY_LOCK_KEY ")"));
        got = 0;
    }
    return got;
}

static void *relay_main(void *arg)
{
    lc_outbox_relay *r = arg;
    lc_db *db = NULL;
    int leader_pid = 0; /* backend holding the lock; 0 when not the active relay */
    int backoff = RELAY_BACKOFF_MIN_MS;
    lc_err err = {0};

    while (!atomic_load(&r->halt)) {
        int draining = atomic_load(&r->draining);
        int64_t until = atomic_load(&r->drain_until);
        if (draining && lc_now_ms() >= until)
            break;
        if (!db) {
            if (lc_db_connect(r->url, RELAY_CONNECT_WAIT_MS, &r->halt, &db, &err) != LC_OK) {
                if (atomic_load(&r->halt))
                    break;
                lc_log_warn("outbox relay cannot reach the database",
                            LC_LS("error", lc_err_msg(&err)));
                wait_event(r, NULL, RELAY_IDLE_MS);
                continue;
            }
        } else if (lc_db_ensure(db, &err) != LC_OK) {
            leader_pid = 0;
            wait_event(r, NULL, RELAY_IDLE_MS);
            continue;
        }
        /* a reset connection is a new session: the lock and LISTEN went with the old one */
        if (leader_pid && PQbackendPID(lc_db_conn(db)) != leader_pid) {
            lc_log_warn("outbox relay lost its database session, no longer active");
            leader_pid = 0;
        }
        if (!leader_pid) {
            if (!try_lead(db, &err)) {
                if (draining) /* another process's relay is active and will publish */
                    break;
                wait_event(r, NULL, RELAY_IDLE_MS);
                continue;
            }
            leader_pid = PQbackendPID(lc_db_conn(db));
            lc_log_info("outbox relay is active");
        }

        int timeout = RELAY_PRODUCE_TIMEOUT_MS, fetched = 0, published = 0;
        if (draining) {
            int64_t left = until - lc_now_ms();
            timeout = left < timeout ? (int)(left > 0 ? left : 0) : timeout;
        }
        lc_rc rc = relay_round(db, r->p, RELAY_BATCH, timeout, &r->m, &fetched, &published, &err);
        if (rc != LC_OK) {
            /* err names topics and counts, never payloads */
            lc_log_warn("outbox relay round failed", LC_LS("error", lc_err_msg(&err)),
                        LC_LI("published", published), LC_LI("retry_ms", backoff));
            lc_counter_inc(r->m.errors);
            wait_event(r, NULL, backoff);
            backoff = backoff * 2 > RELAY_BACKOFF_MAX_MS ? RELAY_BACKOFF_MAX_MS : backoff * 2;
            continue;
        }
        backoff = RELAY_BACKOFF_MIN_MS;
        if (fetched == RELAY_BATCH)
            continue; /* more is waiting */
        if (draining && fetched == 0)
            break; /* empty */
        if (!draining)
            wait_event(r, db, RELAY_IDLE_MS);
    }
    lc_db_free(db); /* closing the session releases the lock and the LISTEN */
    return NULL;
}

lc_rc lc_outbox_relay_start(const char *db_url, lc_kafka_producer *p, lc_metrics *metrics,
                            lc_outbox_relay **out, lc_err *err)
{
    static const double lag_buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                         1,     2.5,  5,     10,   30,  60,   300};
    lc_outbox_relay *r = NULL;
    char *perr = NULL;
    lc_rc rc = LC_OK;
    *out = NULL;
    if (!db_url || !p)
        return lc_err_set(err, LC_ERR_INVALID, "outbox relay needs a database URL and a producer");
    /* a malformed URL is a configuration error now, not a retry loop in the thread */
    PQconninfoOption *opts = PQconninfoParse(db_url, &perr);
    PQfreemem(perr); /* may quote the password */
    if (!opts)
        return lc_err_set(err, LC_ERR_CONFIG, "invalid database URL for the outbox relay");
    PQconninfoFree(opts);

    if (!(r = calloc(1, sizeof(*r))) || !(r->url = strdup(db_url))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    r->wake_fd = -1;
    r->p = p;
    atomic_init(&r->draining, 0);
    atomic_init(&r->halt, 0);
    atomic_init(&r->drain_until, 0);
    if (metrics) {
        r->m.published = lc_metrics_counter(metrics, "radpipe_outbox_published_total",
                                            "Outbox rows published and deleted", NULL);
        r->m.errors =
            lc_metrics_counter(metrics, "radpipe_outbox_errors_total",
                               "Outbox relay rounds that failed (broker or database)", NULL);
        r->m.lag = lc_metrics_histogram(metrics, "radpipe_outbox_lag_seconds",
                                        "Time from outbox insert to the broker's ack", NULL,
                                        lag_buckets, sizeof(lag_buckets) / sizeof(*lag_buckets));
    }
    if ((r->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
        rc = lc_err_set(err, LC_ERR_IO, "could not create eventfd: %s", strerror(errno));
        goto out;
    }
    int e = pthread_create(&r->thread, NULL, relay_main, r);
    if (e != 0) {
        rc = lc_err_set(err, LC_ERR_INTERNAL, "could not start the outbox relay thread: %s",
                        strerror(e));
        goto out;
    }
    *out = r;
    r = NULL;
out:
    if (r) {
        if (r->wake_fd >= 0)
            close(r->wake_fd);
        free(r->url);
        free(r);
    }
    return rc;
}

void lc_outbox_relay_stop(lc_outbox_relay *r, int drain_ms)
{
    if (!r)
        return;
    int64_t until = lc_now_ms() + (drain_ms > 0 ? drain_ms : 0);
    atomic_store(&r->drain_until, until);
    atomic_store(&r->draining, 1);
    wake(r);
    /* the thread leaves by itself once the outbox is empty; past the deadline it is told
     * to leave whatever it is doing (a produce call is already bounded by the deadline) */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t ns = ts.tv_nsec + (int64_t)(drain_ms > 0 ? drain_ms : 0) * 1000000;
    ts.tv_sec += ns / 1000000000;
    ts.tv_nsec = ns % 1000000000;
    if (pthread_timedjoin_np(r->thread, NULL, &ts) != 0) {
        atomic_store(&r->halt, 1);
        wake(r);
        pthread_join(r->thread, NULL);
    }
    close(r->wake_fd);
    free(r->url);
    free(r);
}
