/*
 * test_worker.c: the job loop (libcommon/worker.c) on real peers: PostgreSQL, librdkafka's
 * mock cluster in this process, and the outbox relay carrying job events into Kafka as in
 * production. Checks the outcomes a job function can have (success with progress and a
 * result, transient failure retried by the reconciler, permanent failure, release on
 * shutdown), that a duplicated event runs the job once, and that poison messages go to the
 * dead-letter topic while the partition moves on.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include "lc/log.h"
#include "lc/outbox.h"
#include "lc/util.h"
#include "lc/worker.h"
#include "ts.h"

typedef struct fx {
    char *url;
    rd_kafka_t *mrk;
    rd_kafka_mock_cluster_t *mc;
    char brokers[128];
    lc_kafka_producer *p;
    lc_db *relay_db, *db;
    lc_service s;
    lc_service_def def;
    lc_worker_cfg cfg;
    pthread_t thread;
    lc_rc run_rc;
    /* what the job function saw and does */
    atomic_int calls;
    const char *mode; /* "ok", "transient-once", "permanent", "until-stop" */
} fx;

static const char *const extra[] = {"session.timeout.ms=6000", "message.timeout.ms=3000", NULL};

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    lc_err e;
    char es[256];
    f->url = ts_pg_fresh_db("worker");
    if (!f->url)
        fail_msg("RADPIPE_TEST_PG_URL is not set: run through tests/run.sh");
    assert_int_equal(lc_db_connect(f->url, 10000, NULL, &f->db, &e), LC_OK);
    assert_int_equal(lc_db_migrate(f->db, &e), LC_OK);
    assert_int_equal(lc_db_connect(f->url, 10000, NULL, &f->relay_db, &e), LC_OK);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "3", es, sizeof(es));
    f->mrk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, es, sizeof(es));
    assert_non_null(f->mrk);
    f->mc = rd_kafka_mock_cluster_new(f->mrk, 1);
    assert_non_null(f->mc);
    lc_strlcpy(f->brokers, rd_kafka_mock_cluster_bootstraps(f->mc), sizeof(f->brokers));
    for (int t = 0; t < LC_TOPIC__COUNT; t++) {
        char name[128];
        lc_topic_name("radpipe.", (lc_topic)t, name, sizeof(name));
        assert_int_equal(rd_kafka_mock_topic_create(f->mc, name, 2, 1), 0);
    }
    /* the parts of an lc_service the worker loop uses, set up by hand */
    f->def.name = "test-worker";
    f->s.def = &f->def;
    f->s.db = f->db;
    f->s.cfg.database_url = f->url;
    f->s.cfg.topic_prefix = "radpipe.";
    f->s.cfg.drain_seconds = 1;
    lc_strlcpy(f->s.source, "/radpipe/test-worker", sizeof(f->s.source));
    f->s.kconf = (lc_kafka_conf){.brokers = f->brokers,
                                 .topic_prefix = "radpipe.",
                                 .client_id = "test-worker",
                                 .extra = extra};
    f->s.metrics = lc_metrics_new();
    atomic_init(&f->s.stop, 0);
    assert_int_equal(lc_kafka_producer_new(&f->s.kconf, &f->p, &e), LC_OK);
    f->cfg = (lc_worker_cfg){.lease_seconds = 3,
                             .max_attempts = 3,
                             .reconcile_interval_seconds = 1,
                             .republish_after_seconds = 600};
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    lc_kafka_producer_free(f->p, 1000);
    lc_metrics_free(f->s.metrics);
    rd_kafka_mock_cluster_destroy(f->mc);
    rd_kafka_destroy(f->mrk);
    lc_db_free(f->relay_db);
    lc_db_free(f->db);
    free(f->url);
    free(f);
    return 0;
}

static lc_rc job_fn(void *ctx, lc_worker_job *j, cJSON **result, lc_err *err)
{
    fx *f = ctx;
    int n = atomic_fetch_add(&f->calls, 1) + 1;
    if (strcmp(f->mode, "ok") == 0 || (strcmp(f->mode, "transient-once") == 0 && n > 1)) {
        lc_worker_job_progress(j, 1, 1, "things");
        *result = cJSON_CreateObject();
        cJSON_AddNumberToObject(*result, "answer", 42);
        return LC_OK;
    }
    if (strcmp(f->mode, "transient-once") == 0)
        return lc_err_set(err, LC_ERR_UNAVAILABLE, "store unreachable");
    if (strcmp(f->mode, "permanent") == 0)
        return lc_err_set(err, LC_ERR_INVALID, "series has mixed orientations");
    /* until-stop: busy until the worker says stop (shutdown past the drain time) */
    while (!lc_worker_job_should_stop(j))
        usleep(20 * 1000);
    return lc_err_set(err, LC_ERR_CANCELLED, "stopped");
}

static void *run_main(void *arg)
{
    fx *f = arg;
    lc_err e;
    f->run_rc = lc_worker_run(&f->s, &f->cfg, "upload", LC_TOPIC_JOB_UPLOAD, job_fn, f, &e);
    /* the worker's own connection is the service's: tell the test it is free again */
    return NULL;
}

static void start_worker(fx *f, const char *mode)
{
    f->mode = mode;
    atomic_store(&f->s.stop, 0);
    assert_int_equal(pthread_create(&f->thread, NULL, run_main, f), 0);
}

static void stop_worker(fx *f)
{
    atomic_store(&f->s.stop, 1);
    pthread_join(f->thread, NULL);
    assert_int_equal(f->run_rc, LC_OK);
}

/* Publish what the outbox holds (the relay's job, done synchronously here). */
static void relay(fx *f)
{
    lc_err e;
    int n = 0;
    assert_int_equal(lc_outbox_relay_once(f->relay_db, f->p, 1000, &n, &e), LC_OK);
}

static char *job_state(fx *f, const char *id)
{
    PGresult *r = NULL;
    lc_err e;
    const char *p[1] = {id};
    assert_int_equal(lc_db_exec(f->relay_db,
                                "SELECT state || ':' || attempts || ':' || coalesce(error, '') "
                                "FROM jobs WHERE id = $1",
                                1, p, &r, &e),
                     LC_OK);
    char *s = strdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    return s;
}

/* Keep relaying (the worker's reconciler writes to the outbox too) until the job's
 * "state:attempts:error" starts with want. */
static void wait_state(fx *f, const char *id, const char *want, int timeout_s)
{
    char *s = NULL;
    for (int i = 0; i < timeout_s * 10; i++) {
        relay(f);
        free(s);
        s = job_state(f, id);
        if (strncmp(s, want, strlen(want)) == 0) {
            free(s);
            return;
        }
        usleep(100 * 1000);
    }
    fail_msg("job %s is \"%s\", expected \"%s\"", id, s, want);
}

static void create(fx *f, char id[37])
{
    lc_err e;
    int created = 0;
    assert_int_equal(lc_db_begin(f->relay_db, &e), LC_OK);
    assert_int_equal(lc_job_create(f->relay_db, "radpipe.", "/radpipe/test", "upload", "1.2.3",
                                   NULL, NULL, 3, id, &created, &e),
                     LC_OK);
    assert_int_equal(lc_db_commit(f->relay_db, &e), LC_OK);
}

static void test_success_with_progress(void **state)
{
    fx *f = *state;
    char id[37];
    create(f, id);
    start_worker(f, "ok");
    wait_state(f, id, "succeeded:1:", 60);
    stop_worker(f);
    assert_int_equal(atomic_load(&f->calls), 1);
    PGresult *r = NULL;
    lc_err e;
    const char *p[1] = {id};
    assert_int_equal(lc_db_exec(f->relay_db,
                                "SELECT result->>'answer', progress->>'unit' FROM jobs "
                                "WHERE id = $1",
                                1, p, &r, &e),
                     LC_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), "42");
    assert_string_equal(PQgetvalue(r, 0, 1), "things");
    PQclear(r);
}

static void test_transient_failure_is_retried(void **state)
{
    fx *f = *state;
    char id[37];
    lc_err e;
    create(f, id);
    start_worker(f, "transient-once");
    wait_state(f, id, "failed:1:store unreachable", 60);
    /* skip the backoff: the reconciler (every second) re-queues it and the event comes back */
    const char *p[1] = {id};
    assert_int_equal(
        lc_db_exec(f->relay_db, "UPDATE jobs SET retry_at = now() WHERE id = $1", 1, p, NULL, &e),
        LC_OK);
    wait_state(f, id, "succeeded:2:", 60);
    stop_worker(f);
    assert_int_equal(atomic_load(&f->calls), 2);
}

static void test_permanent_failure_is_dead(void **state)
{
    fx *f = *state;
    char id[37];
    create(f, id);
    start_worker(f, "permanent");
    wait_state(f, id, "dead:1:series has mixed orientations", 60);
    stop_worker(f);
    assert_int_equal(atomic_load(&f->calls), 1);
}

static void test_duplicate_event_runs_once_and_poison_goes_to_dlq(void **state)
{
    fx *f = *state;
    char id[37];
    lc_err e;
    create(f, id);
    /* the same job event twice (a redelivery), and garbage between them */
    assert_int_equal(lc_db_exec(f->relay_db,
                                "INSERT INTO outbox (topic, key, payload) "
                                "SELECT topic, key, payload FROM outbox "
                                "WHERE topic = 'radpipe.job.upload'",
                                0, NULL, NULL, &e),
                     LC_OK);
    lc_kafka_out bad = {.topic = "radpipe.job.upload",
                        .key = "1.2.3",
                        .key_len = 5,
                        .payload = "\x01not json",
                        .len = 9};
    assert_int_equal(lc_kafka_produce_batch(f->p, &bad, 1, 10000, &e), LC_OK);
    start_worker(f, "ok");
    wait_state(f, id, "succeeded:1:", 60);
    /* the dead letter: counted by the worker and, through the relay, on radpipe.dlq */
    lc_counter *dlq = lc_metrics_counter(f->s.metrics, "radpipe_dlq_messages_total",
                                         "messages sent to the dead-letter topic", NULL);
    for (int i = 0; i < 100 && lc_metric_value(dlq) < 1; i++)
        usleep(100 * 1000);
    relay(f);
    stop_worker(f);
    assert_true(lc_metric_value(dlq) == 1.0);
    char es[256];
    rd_kafka_conf_t *qc = rd_kafka_conf_new();
    rd_kafka_conf_set(qc, "bootstrap.servers", f->brokers, es, sizeof(es));
    rd_kafka_t *q = rd_kafka_new(RD_KAFKA_PRODUCER, qc, es, sizeof(es));
    int64_t lo = 0, hi = 0;
    for (int part = 0; part < 2; part++) {
        int64_t l, h;
        assert_int_equal(rd_kafka_query_watermark_offsets(q, "radpipe.dlq", part, &l, &h, 5000),
                         RD_KAFKA_RESP_ERR_NO_ERROR);
        lo += l;
        hi += h;
    }
    rd_kafka_destroy(q);
    assert_int_equal(hi - lo, 1);
    assert_int_equal(atomic_load(&f->calls), 1);
}

static void test_shutdown_releases_job(void **state)
{
    fx *f = *state;
    char id[37];
    create(f, id);
    start_worker(f, "until-stop");
    wait_state(f, id, "running:1:", 60);
    /* SIGTERM's effect: stop; after the 1 s drain the job function is told to stop */
    stop_worker(f);
    char *s = job_state(f, id);
    assert_string_equal(s, "queued:0:"); /* released, attempt not counted */
    free(s);
}

int main(void)
{
    lc_log_init("test_worker", LC_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_success_with_progress, setup, teardown),
        cmocka_unit_test_setup_teardown(test_transient_failure_is_retried, setup, teardown),
        cmocka_unit_test_setup_teardown(test_permanent_failure_is_dead, setup, teardown),
        cmocka_unit_test_setup_teardown(test_duplicate_event_runs_once_and_poison_goes_to_dlq,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_shutdown_releases_job, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
