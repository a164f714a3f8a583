/*
 * test_indexer_rules.c: the real dicom-indexer process against a fresh PostgreSQL database
 * and a Kafka-protocol broker (librdkafka's mock cluster in this process), with a rules file:
 *  - a study whose two series arrive 3 s apart with a 2 s quiet period: study.completed
 *    versions 1 and 2 (amended, new_series), read back from Kafka and valid against
 *    proto/events; one study row; the version 2 jobs only for the new series;
 *  - SIGHUP with a valid file (its rules route the next version) and with an invalid one (the
 *    process logs why, stays up and keeps the rules in force);
 *  - a study.close event on its topic completes a study whose quiet period is an hour;
 *  - an invalid rules file at start is a configuration error naming the rule and field;
 *  - SIGTERM: exit 0.
 */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include "lc/db.h"
#include "lc/event.h"
#include "lc/kafka.h"
#include "lc/log.h"
#include "lc/store.h"
#include "lc/util.h"
#include "ts.h"
#include "ts_proc.h"

#define STUDY  "1.2.826.0.1.3680043.8.498.5151.1"
#define SER_A  STUDY ".1"
#define SER_B  STUDY ".2"
#define SER_C  STUDY ".3"
#define CLOSED "1.2.826.0.1.3680043.8.498.5151.2"
#define SER_D  CLOSED ".1"

typedef struct fx {
    rd_kafka_t *mrk;
    rd_kafka_mock_cluster_t *mc;
    char brokers[256];
    char *db_url, *dir, *store_url, *rules, *log;
    lc_db *db;
    lc_store *store;
    lc_kafka_producer *prod;
    char *src;
    pid_t pid;
} fx;

static const char rules_v1[] =
    "{\"completion\": [{\"name\": \"closable\", \"source\": {\"kind\": \"notify\","
    " \"name\": \"CLOSE*\"}, \"quiet_seconds\": 3600}],"
    " \"rules\": ["
    "  {\"name\": \"archive\", \"actions\": [{\"action\": \"upload\", \"layout\": "
    "\"series-tar\"}]},"
    "  {\"name\": \"seg\", \"level\": \"series\", \"when\": {\"tag\": \"Modality\", \"equals\": "
    "\"MR\"},"
    "   \"actions\": [{\"action\": \"segment\", \"algorithm\": \"otsu\"}]}]}";

static const char rules_v2[] =
    "{\"completion\": [{\"name\": \"closable\", \"source\": {\"kind\": \"notify\","
    " \"name\": \"CLOSE*\"}, \"quiet_seconds\": 3600}],"
    " \"rules\": ["
    "  {\"name\": \"archive\", \"actions\": [{\"action\": \"upload\", \"layout\": "
    "\"series-tar\"}]},"
    "  {\"name\": \"seg\", \"level\": \"series\", \"when\": {\"tag\": \"Modality\", \"equals\": "
    "\"MR\"},"
    "   \"actions\": [{\"action\": \"segment\", \"algorithm\": \"otsu\"}]},"
    "  {\"name\": \"after-reload\", \"priority\": 9,"
    "   \"actions\": [{\"action\": \"upload\", \"layout\": \"instance\"}]}]}";

static const char rules_bad[] =
    "{\"rules\": [{\"name\": \"broken\", \"when\": {\"tag\": \"Modality\", \"regex\": \"(\"},"
    " \"actions\": [{\"action\": \"upload\"}]}]}";

static pid_t start_indexer(fx *f, const char *rules_path)
{
    char *env[16];
    int n = 0;
#define ADD(...)                                                                                   \
    do {                                                                                           \
        if (asprintf(&env[n++], __VA_ARGS__) < 0)                                                  \
            abort();                                                                               \
    } while (0)
    ADD("RADPIPE_DATABASE_URL=%s", f->db_url);
    ADD("RADPIPE_KAFKA_BROKERS=%s", f->brokers);
    ADD("RADPIPE_STORE_URL=%s", f->store_url);
    ADD("RADPIPE_ADMIN_LISTEN=127.0.0.1:0");
    ADD("RADPIPE_STUDY_QUIET_SECONDS=2");
    ADD("RADPIPE_RULES_FILE=%s", rules_path);
    ADD("RADPIPE_DRAIN_SECONDS=1");
    ADD("RADPIPE_DB_WAIT_SECONDS=10");
#undef ADD
    env[n] = NULL;
    char *bin = ts_bin("dicom-indexer");
    char *argv[] = {bin, NULL};
    pid_t pid = ts_spawn(argv, (const char *const *)env, f->log);
    free(bin);
    for (int i = 0; i < n; i++)
        free(env[i]);
    assert_true(pid > 0);
    return pid;
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    char es[256];
    lc_err err = {0};
    assert_non_null(f);
    lc_log_init("test_indexer_rules", LC_LOG_WARN);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "3", es, sizeof(es));
    f->mrk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, es, sizeof(es));
    assert_non_null(f->mrk);
    f->mc = rd_kafka_mock_cluster_new(f->mrk, 1);
    assert_non_null(f->mc);
    lc_strlcpy(f->brokers, rd_kafka_mock_cluster_bootstraps(f->mc), sizeof(f->brokers));
    for (int t = 0; t < LC_TOPIC__COUNT; t++) {
        char name[256];
        assert_int_equal(lc_topic_name("radpipe.", (lc_topic)t, name, sizeof(name)), LC_OK);
        assert_int_equal(rd_kafka_mock_topic_create(f->mc, name, 2, 1), 0);
    }
    f->db_url = ts_pg_fresh_db("idxrules");
    if (!f->db_url)
        fail_msg("RADPIPE_TEST_PG_URL is not set: run through tests/run.sh");
    if (lc_db_connect(f->db_url, 5000, NULL, &f->db, &err) != LC_OK ||
        lc_db_migrate(f->db, &err) != LC_OK)
        fail_msg("database: %s", lc_err_msg(&err));
    f->dir = ts_tmpdir("idxrules");
    if (asprintf(&f->store_url, "file://%s/objects", f->dir) < 0 ||
        asprintf(&f->rules, "%s/rules.json", f->dir) < 0 ||
        asprintf(&f->log, "%s/indexer.log", f->dir) < 0)
        abort();
    if (lc_store_open(f->store_url, &f->store, &err) != LC_OK)
        fail_msg("store: %s", lc_err_msg(&err));
    lc_kafka_conf kc = {.brokers = f->brokers, .topic_prefix = "radpipe.", .client_id = "test"};
    if (lc_kafka_producer_new(&kc, &f->prod, &err) != LC_OK)
        fail_msg("producer: %s", lc_err_msg(&err));
    char *series = ts_test_series();
    char **files = ts_list_files(series);
    assert_non_null(files);
    assert_non_null(files[0]);
    f->src = strdup(files[0]);
    ts_strv_free(files);
    free(series);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    if (f->pid > 0)
        ts_kill(f->pid);
    lc_kafka_producer_free(f->prod, 1000);
    lc_store_free(f->store);
    lc_db_free(f->db);
    rd_kafka_mock_cluster_destroy(f->mc);
    rd_kafka_destroy(f->mrk);
    ts_rmrf(f->dir);
    free(f->dir);
    free(f->db_url);
    free(f->store_url);
    free(f->rules);
    free(f->log);
    free(f->src);
    free(f);
    return 0;
}

static void produce(fx *f, const char *topic, const char *key, char *payload /* consumed */)
{
    lc_err err = {0};
    lc_kafka_out m = {.topic = topic,
                      .key = key,
                      .key_len = strlen(key),
                      .payload = payload,
                      .len = strlen(payload),
                      .content_type = "application/cloudevents+json"};
    if (lc_kafka_produce_batch(f->prod, &m, 1, 10000, &err) != LC_OK)
        fail_msg("produce: %s", lc_err_msg(&err));
    free(payload);
}

static char *event_json(const char *type, const char *subject, cJSON *data)
{
    lc_event *ev = NULL;
    lc_err err = {0};
    if (lc_event_new(type, "/radpipe/test", subject, data, &ev, &err) != LC_OK)
        fail_msg("event: %s", lc_err_msg(&err));
    char *json = lc_event_to_json(ev);
    lc_event_free(ev);
    assert_non_null(json);
    return json;
}

/* n generated instances of a series, stored and announced on instance.stored. */
static void send_series(fx *f, const char *study, const char *series, int n, const char *source)
{
    char *dir = NULL;
    if (asprintf(&dir, "%s/gen-%s", f->dir, series) < 0)
        abort();
    assert_int_equal(mkdir(dir, 0755), 0);
    assert_int_equal(ts_make_series(f->src, n, dir, study, series), 0);
    for (int i = 0; i < n; i++) {
        char *path = NULL, *url = NULL, key[200], sha[65], sop[80];
        size_t len = 0;
        lc_err err = {0};
        if (asprintf(&path, "%s/slice-%04d.dcm", dir, i) < 0)
            abort();
        char *buf = ts_read_file(path, &len);
        assert_non_null(buf);
        lc_sha256_hex(buf, len, sha);
        snprintf(key, sizeof(key), "incoming/%s/%d.dcm", series, i);
        if (lc_store_put_buf(f->store, key, buf, len, &err) != LC_OK)
            fail_msg("put: %s", lc_err_msg(&err));
        if (asprintf(&url, "%s/%s", lc_store_url(f->store), key) < 0)
            abort();
        snprintf(sop, sizeof(sop), "%s.%d", series, i + 1);
        cJSON *d = cJSON_CreateObject();
        cJSON_AddStringToObject(d, "study_instance_uid", study);
        cJSON_AddStringToObject(d, "series_instance_uid", series);
        cJSON_AddStringToObject(d, "sop_instance_uid", sop);
        cJSON_AddStringToObject(d, "url", url);
        cJSON_AddNumberToObject(d, "size", (double)len);
        cJSON_AddStringToObject(d, "sha256", sha);
        cJSON *s = cJSON_AddObjectToObject(d, "source");
        cJSON_AddStringToObject(s, "kind", "notify");
        cJSON_AddStringToObject(s, "name", source);
        produce(f, "radpipe.instance.stored", study, event_json(LC_EV_INSTANCE_STORED, study, d));
        free(url);
        free(buf);
        free(path);
    }
    free(dir);
}

static char *q_str(fx *f, const char *sql, const char *p1)
{
    PGresult *r = NULL;
    lc_err err = {0};
    const char *p[1] = {p1};
    if (lc_db_exec(f->db, sql, p1 ? 1 : 0, p, &r, &err) != LC_OK)
        fail_msg("%s: %s", sql, lc_err_msg(&err));
    char *s = strdup(PQntuples(r) == 1 ? PQgetvalue(r, 0, 0) : "");
    PQclear(r);
    return s;
}

static int q_int(fx *f, const char *sql, const char *p1)
{
    char *s = q_str(f, sql, p1);
    int v = atoi(s);
    free(s);
    return v;
}

static void dump_log(fx *f)
{
    char *l = ts_read_file(f->log, NULL);
    fprintf(stderr, "--- indexer log ---\n%s\n", l ? l : "(none)");
    free(l);
}

/* Wait up to 60 s for the study's completed_version to reach v. */
static void wait_version(fx *f, const char *study, int v)
{
    for (int i = 0; i < 600; i++) {
        if (q_int(f, "SELECT completed_version FROM studies WHERE study_uid = $1", study) >= v)
            return;
        if (kill(f->pid, 0) != 0)
            break;
        usleep(100 * 1000);
    }
    dump_log(f);
    fail_msg("study %s never reached version %d", study, v);
}

/* Wait up to 30 s for the log to hold needle n times. */
static void wait_log(fx *f, const char *needle, int n)
{
    for (int i = 0; i < 300; i++) {
        char *l = ts_read_file(f->log, NULL);
        int c = 0;
        for (const char *p = l ? strstr(l, needle) : NULL; p; p = strstr(p + 1, needle))
            c++;
        free(l);
        if (c >= n)
            return;
        usleep(100 * 1000);
    }
    dump_log(f);
    fail_msg("the indexer never logged \"%s\" %d times", needle, n);
}

static void write_rules(fx *f, const char *json)
{
    assert_int_equal(ts_write_file(f->rules, json, strlen(json)), 0);
}

static void assert_q(fx *f, const char *sql, const char *p1, const char *want)
{
    char *s = q_str(f, sql, p1);
    if (strcmp(s, want) != 0)
        fail_msg("%s:\n got \"%s\"\nwant \"%s\"", sql, s, want);
    free(s);
}

static void test_versions_reload_close(void **state)
{
    fx *f = *state;
    write_rules(f, rules_v1);
    f->pid = start_indexer(f, f->rules);

    /* series A, then B 3 s later: the 2 s quiet period completes A alone first */
    int64_t t0 = lc_now_ms();
    send_series(f, STUDY, SER_A, 2, "SCANNER1");
    wait_version(f, STUDY, 1);
    assert_q(f,
             "SELECT completed_at - last_instance_at >= interval '2 seconds' FROM studies"
             " WHERE study_uid = $1",
             STUDY, "t");
    while (lc_now_ms() < t0 + 3000)
        usleep(50 * 1000);
    send_series(f, STUDY, SER_B, 2, "SCANNER1");
    wait_version(f, STUDY, 2);
    assert_q(f, "SELECT count(*) FROM studies WHERE study_uid = $1", STUDY, "1");
    assert_q(f,
             "SELECT string_agg(concat_ws('|', rule, kind, params::text), ';' ORDER BY dedupe_key)"
             " FROM jobs WHERE dedupe_key LIKE '%:v2:%'",
             NULL,
             "archive|upload|{\"layout\": \"series-tar\", \"series\": [\"" SER_B "\"]};"
             "seg|segment|{\"algorithm\": \"otsu\", \"series_instance_uid\": \"" SER_B "\"}");

    /* SIGHUP with a valid file, then with an invalid one */
    write_rules(f, rules_v2);
    kill(f->pid, SIGHUP);
    wait_log(f, "\"rules reloaded\"", 1);
    write_rules(f, rules_bad);
    kill(f->pid, SIGHUP);
    wait_log(f, "could not reload the rules, keeping the rules in force", 1);
    wait_log(f, "rules[0] (\\\"broken\\\").when.regex: invalid regular expression", 1);
    assert_int_equal(kill(f->pid, 0), 0);
    send_series(f, STUDY, SER_C, 1, "SCANNER1");
    wait_version(f, STUDY, 3);
    assert_q(f,
             "SELECT string_agg(concat_ws('|', rule, kind, priority, params::text), ';'"
             " ORDER BY dedupe_key) FROM jobs WHERE dedupe_key LIKE '%:v3:%'",
             NULL,
             "after-reload|upload|9|{\"layout\": \"instance\", \"series\": [\"" SER_C "\"]};"
             "archive|upload|0|{\"layout\": \"series-tar\", \"series\": [\"" SER_C "\"]};"
             "seg|segment|0|{\"algorithm\": \"otsu\", \"series_instance_uid\": \"" SER_C "\"}");

    /* a study from a source whose quiet period is an hour completes on study.close */
    send_series(f, CLOSED, SER_D, 1, "CLOSE_ROOM");
    for (int i = 0;
         i < 600 && q_int(f, "SELECT count(*) FROM studies WHERE study_uid = $1", CLOSED) == 0; i++)
        usleep(100 * 1000);
    usleep(2500 * 1000); /* longer than the default quiet period: it must still be open */
    assert_q(f, "SELECT concat_ws('|', dirty, completed_version) FROM studies WHERE study_uid = $1",
             CLOSED, "t|0");
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "study_instance_uid", CLOSED);
    cJSON_AddStringToObject(d, "reason", "end of exam");
    produce(f, "radpipe.study.close", CLOSED, event_json(LC_EV_STUDY_CLOSE, CLOSED, d));
    wait_version(f, CLOSED, 1);

    /* the study.completed events, read back from the broker */
    char out[1024], cmd[3000], *vout = NULL;
    snprintf(out, sizeof(out), "%s/completed.jsonl", f->dir);
    const char *topics[] = {"radpipe.study.completed", NULL};
    int n = 0;
    for (int i = 0; i < 20 && n < 4; i++) /* the relay publishes within a moment */
        n = ts_kafka_dump(f->brokers, topics, out, 2000, 30000);
    assert_int_equal(n, 4);
    char *txt = ts_read_file(out, NULL);
    assert_non_null(txt);
    int seen[4] = {0};
    for (char *line = strtok(txt, "\n"); line; line = strtok(NULL, "\n")) {
        cJSON *ev = cJSON_Parse(line);
        assert_non_null(ev);
        cJSON *data = cJSON_GetObjectItem(ev, "data");
        const char *subject = cJSON_GetObjectItem(ev, "subject")->valuestring;
        int v = cJSON_GetObjectItem(data, "version")->valueint;
        int amended = cJSON_IsTrue(cJSON_GetObjectItem(data, "amended"));
        const char *reason = cJSON_GetObjectItem(data, "reason")->valuestring;
        char *ns = cJSON_PrintUnformatted(cJSON_GetObjectItem(data, "new_series"));
        if (strcmp(subject, CLOSED) == 0) {
            assert_int_equal(v, 1);
            assert_string_equal(reason, "closed");
            seen[0]++;
        } else {
            assert_string_equal(subject, STUDY);
            assert_true(v >= 1 && v <= 3);
            assert_int_equal(amended, v > 1);
            assert_string_equal(reason, "quiet");
            assert_int_equal(cJSON_GetObjectItem(data, "num_series")->valueint, v);
            assert_string_equal(ns ? ns : "null", v == 1   ? "null"
                                                  : v == 2 ? "[\"" SER_B "\"]"
                                                           : "[\"" SER_C "\"]");
            seen[v]++;
        }
        free(ns);
        cJSON_Delete(ev);
    }
    free(txt);
    for (int i = 0; i < 4; i++)
        assert_int_equal(seen[i], 1);
    snprintf(cmd, sizeof(cmd), "node '%s/tests/node/validate-events.mjs' '%s/proto/events' '%s'",
             ts_root(), ts_root(), out);
    int vrc = ts_run(cmd, &vout);
    if (vrc != 0)
        fprintf(stderr, "%s", vout);
    assert_int_equal(vrc, 0);
    free(vout);

    /* an invalid rules file at start: a configuration error naming the rule and field */
    char *bad = NULL;
    if (asprintf(&bad, "%s/bad.json", f->dir) < 0)
        abort();
    assert_int_equal(ts_write_file(bad, rules_bad, strlen(rules_bad)), 0);
    pid_t p2 = start_indexer(f, bad);
    int st = ts_wait(p2, 60000);
    if (st == -1)
        ts_kill(p2);
    assert_true(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) != 0);
    wait_log(f, "dicom-indexer failed", 1);
    wait_log(f, "rules[0] (\\\"broken\\\").when.regex", 2);
    free(bad);

    /* SIGTERM: a clean exit */
    kill(f->pid, SIGTERM);
    st = ts_wait(f->pid, 30000);
    if (st == -1)
        ts_kill(f->pid);
    f->pid = 0;
    assert_true(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_versions_reload_close, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
