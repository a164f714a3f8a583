/*
 * test_service.c: what every main() relies on (libcommon/service.c): --help prints every
 * variable with its default, --version, unknown arguments; a bad value stops start-up with
 * a message naming the variable; a full start against real PostgreSQL, a real Kafka-protocol
 * broker and a file store runs the migrations, serves /healthz, /readyz (database and kafka
 * checks) and /metrics, turns SIGHUP into the reload flag and SIGTERM into the stop flag, and
 * releases everything cleanly.
 */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include "lc/log.h"
#include "lc/service.h"
#include "lc/util.h"
#include "ts.h"
#include "ts_proc.h"

typedef struct own_cfg {
    long long widgets;
} own_cfg;
static own_cfg own;
static const lc_cfg_var own_vars[] = {
    {"RADPIPE_TEST_WIDGETS", LC_CFG_INT, "3", 1, 9, 0, NULL, "how many widgets",
     offsetof(own_cfg, widgets)},
};
static const lc_cfg_table own_tables[] = {{own_vars, 1, &own}};

/* Run lc_service_args in a child with stdout captured; returns the exit code. */
static int run_args(const lc_service_def *def, const char *arg, char **out)
{
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 1);
        dup2(fds[1], 2);
        char *argv[] = {"svc", (char *)arg, NULL};
        int rc = lc_service_args(def, 2, argv);
        fflush(stdout);
        _exit(rc < 0 ? 100 : rc);
    }
    close(fds[1]);
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap);
    ssize_t r;
    while ((r = read(fds[0], buf + n, cap - n - 1)) > 0)
        n += (size_t)r;
    buf[n] = '\0';
    close(fds[0]);
    int st = 0;
    waitpid(pid, &st, 0);
    *out = buf;
    return WEXITSTATUS(st);
}

static void test_args(void **state)
{
    (void)state;
    lc_service_def def = {
        .name = "test-svc", .summary = "a test service", .tables = own_tables, .ntables = 1};
    char *out = NULL;
    assert_int_equal(run_args(&def, "--help", &out), 0);
    assert_non_null(strstr(out, "test-svc " RADPIPE_VERSION ": a test service"));
    assert_non_null(strstr(out, "| `RADPIPE_DATABASE_URL` (or `_FILE`) | "
                                "`postgresql://radpipe@127.0.0.1:55432/radpipe` |"));
    assert_non_null(strstr(out, "| `RADPIPE_TEST_WIDGETS` | `3` | how many widgets |"));
    free(out);
    assert_int_equal(run_args(&def, "--version", &out), 0);
    assert_string_equal(out, "test-svc " RADPIPE_VERSION "\n");
    free(out);
    assert_int_equal(run_args(&def, "--frobnicate", &out), 2);
    assert_non_null(strstr(out, "unknown argument \"--frobnicate\""));
    free(out);
    char *argv[] = {"svc", NULL};
    assert_int_equal(lc_service_args(&def, 1, argv), -1); /* nothing to do: go on */
}

static void test_bad_config_stops_start(void **state)
{
    (void)state;
    lc_service_def def = {.name = "test-svc", .tables = own_tables, .ntables = 1};
    lc_service s;
    lc_err e;
    setenv("RADPIPE_TEST_WIDGETS", "12", 1);
    assert_int_equal(lc_service_init(&s, &def, &e), LC_ERR_CONFIG);
    assert_non_null(strstr(e.msg, "RADPIPE_TEST_WIDGETS"));
    lc_service_release(&s);
    unsetenv("RADPIPE_TEST_WIDGETS");
    setenv("RADPIPE_KAFKA_OPTIONS", "acks", 1);
    assert_int_equal(lc_service_init(&s, &def, &e), LC_ERR_CONFIG);
    assert_non_null(strstr(e.msg, "RADPIPE_KAFKA_OPTIONS"));
    lc_service_release(&s);
    unsetenv("RADPIPE_KAFKA_OPTIONS");
}

static void test_full_start_and_sigterm(void **state)
{
    (void)state;
    char es[256], buf[600];
    lc_err e;
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "3", es, sizeof(es));
    rd_kafka_t *mrk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, es, sizeof(es));
    rd_kafka_mock_cluster_t *mc = rd_kafka_mock_cluster_new(mrk, 1);
    assert_non_null(mc);
    char *url = ts_pg_fresh_db("service");
    if (!url)
        fail_msg("RADPIPE_TEST_PG_URL is not set: run through tests/run.sh");
    char *dir = ts_tmpdir("service");
    setenv("RADPIPE_DATABASE_URL", url, 1);
    setenv("RADPIPE_KAFKA_BROKERS", rd_kafka_mock_cluster_bootstraps(mc), 1);
    snprintf(buf, sizeof(buf), "file://%s/objects", dir);
    setenv("RADPIPE_STORE_URL", buf, 1);
    setenv("RADPIPE_ADMIN_LISTEN", "127.0.0.1:0", 1);
    setenv("RADPIPE_DRAIN_SECONDS", "1", 1);

    lc_service_def def = {.name = "test-svc",
                          .tables = own_tables,
                          .ntables = 1,
                          .needs = LC_SVC_DB | LC_SVC_PRODUCER | LC_SVC_RELAY | LC_SVC_STORE |
                                   LC_SVC_ADMIN};
    lc_service s;
    assert_int_equal(lc_service_init(&s, &def, &e), LC_OK);
    assert_int_equal(own.widgets, 3);
    assert_string_equal(s.source, "/radpipe/test-svc");
    assert_non_null(s.store);
    PGresult *r = NULL;
    assert_int_equal(lc_db_exec(s.db, "SELECT count(*) FROM schema_migrations", 0, NULL, &r, &e),
                     LC_OK);
    assert_true(atoi(PQgetvalue(r, 0, 0)) >= 1);
    PQclear(r);

    int port = lc_admin_port(s.admin);
    assert_true(port > 0);
    char *body = NULL;
    snprintf(buf, sizeof(buf), "http://127.0.0.1:%d/readyz", port);
    long code = 0;
    for (int i = 0; i < 100 && code != 200; i++) { /* the broker may take a moment */
        free(body);
        body = NULL;
        code = ts_http("GET", buf, NULL, NULL, NULL, 0, &body, NULL);
        if (code != 200)
            usleep(100 * 1000);
    }
    assert_int_equal(code, 200);
    cJSON *j = cJSON_Parse(body);
    cJSON *checks = cJSON_GetObjectItem(j, "checks");
    assert_string_equal(cJSON_GetObjectItem(checks, "database")->valuestring, "ok");
    assert_string_equal(cJSON_GetObjectItem(checks, "kafka")->valuestring, "ok");
    cJSON_Delete(j);
    free(body);
    snprintf(buf, sizeof(buf), "http://127.0.0.1:%d/metrics", port);
    assert_int_equal(ts_http("GET", buf, NULL, NULL, NULL, 0, NULL, NULL), 200);

    /* SIGHUP sets the reload flag and nothing else */
    assert_int_equal(atomic_load(&s.reload), 0);
    kill(getpid(), SIGHUP);
    for (int i = 0; i < 100 && !atomic_load(&s.reload); i++)
        usleep(20 * 1000);
    assert_int_equal(atomic_exchange(&s.reload, 0), 1);
    assert_false(lc_service_stopping(&s));

    /* SIGTERM reaches the signal thread, which sets stop */
    assert_false(lc_service_stopping(&s));
    kill(getpid(), SIGTERM);
    for (int i = 0; i < 100 && !lc_service_stopping(&s); i++)
        usleep(20 * 1000);
    assert_true(lc_service_stopping(&s));
    lc_service_release(&s);

    for (const char *const *v =
             (const char *const[]){"RADPIPE_DATABASE_URL", "RADPIPE_KAFKA_BROKERS",
                                   "RADPIPE_STORE_URL", "RADPIPE_ADMIN_LISTEN",
                                   "RADPIPE_DRAIN_SECONDS", NULL};
         *v; v++)
        unsetenv(*v);
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(mrk);
    ts_rmrf(dir);
    free(dir);
    free(url);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_args),
        cmocka_unit_test(test_bad_config_stops_start),
        cmocka_unit_test(test_full_start_and_sigterm),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
