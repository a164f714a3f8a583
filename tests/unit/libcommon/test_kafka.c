/*
 * test_kafka.c: libcommon/kafka.c against a real Kafka-protocol broker (librdkafka's mock
 * cluster on loopback, created in this process), plus the built radpipe-devbroker and the
 * topic catalogue proto/topics.md. Each test uses its own topic prefix and consumer groups.
 * Group joins on the mock cluster take about 3 s (its initial rebalance delay), so waits are
 * generous but end as soon as their condition holds.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
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
#include "lc/kafka.h"
#include "lc/log.h"
#include "lc/util.h"
#include "ts.h"

#define WAIT_MS 30000

typedef struct cluster {
    rd_kafka_t *rk; /* hosts the mock cluster only */
    rd_kafka_mock_cluster_t *mc;
    char brokers[128];
} cluster;

static int cluster_start(cluster *cl, int nbrokers)
{
    char es[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "3", es, sizeof(es));
    if (!(cl->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, es, sizeof(es))))
        return -1;
    if (!(cl->mc = rd_kafka_mock_cluster_new(cl->rk, nbrokers)))
        return -1;
    lc_strlcpy(cl->brokers, rd_kafka_mock_cluster_bootstraps(cl->mc), sizeof(cl->brokers));
    return 0;
}

static void cluster_stop(cluster *cl)
{
    if (cl->mc)
        rd_kafka_mock_cluster_destroy(cl->mc);
    if (cl->rk)
        rd_kafka_destroy(cl->rk);
}

static void create_topics(cluster *cl, const char *prefix, int partitions)
{
    char name[256];
    for (int t = 0; t < LC_TOPIC__COUNT; t++) {
        assert_int_equal(lc_topic_name(prefix, (lc_topic)t, name, sizeof(name)), LC_OK);
        assert_int_equal(rd_kafka_mock_topic_create(cl->mc, name, partitions, 1), 0);
    }
}

static lc_kafka_conf mk_conf(const char *brokers, const char *prefix)
{
    return (lc_kafka_conf){.brokers = brokers, .topic_prefix = prefix, .client_id = "test_kafka"};
}

static int setup(void **state)
{
    lc_log_init("test_kafka", LC_LOG_WARN);
    cluster *cl = calloc(1, sizeof(*cl));
    if (!cl || cluster_start(cl, 1) != 0) {
        if (cl)
            cluster_stop(cl);
        free(cl);
        return -1;
    }
    *state = cl;
    return 0;
}

static int teardown(void **state)
{
    cluster_stop(*state);
    free(*state);
    return 0;
}

/* ---- producing ------------------------------------------------------------------------- */

#define MAXMSG 256

/* Payloads "<tag>:<key>:<seq>" with seq counting per key, keys "study-<i % nkeys>". */
typedef struct batch {
    char key[MAXMSG][32];
    char payload[MAXMSG][64];
    lc_kafka_out out[MAXMSG];
} batch;

static batch *mk_batch(const char *topic, const char *tag, size_t n, size_t nkeys)
{
    batch *b = calloc(1, sizeof(*b));
    assert_non_null(b);
    assert_true(n <= MAXMSG);
    for (size_t i = 0; i < n; i++) {
        snprintf(b->key[i], sizeof(b->key[i]), "study-%zu", i % nkeys);
        snprintf(b->payload[i], sizeof(b->payload[i]), "%s:%s:%zu", tag, b->key[i], i / nkeys);
        b->out[i] = (lc_kafka_out){.topic = topic,
                                   .key = b->key[i],
                                   .key_len = strlen(b->key[i]),
                                   .payload = b->payload[i],
                                   .len = strlen(b->payload[i]),
                                   .content_type = i % 2 ? "application/json" : NULL,
                                   .rc = LC_ERR_INTERNAL};
    }
    return b;
}

static void produce(const lc_kafka_conf *conf, lc_topic t, const char *tag, size_t n, size_t nkeys)
{
    char topic[256];
    lc_kafka_producer *p = NULL;
    lc_err err = {0};
    assert_int_equal(lc_topic_name(conf->topic_prefix, t, topic, sizeof(topic)), LC_OK);
    assert_int_equal(lc_kafka_producer_new(conf, &p, &err), LC_OK);
    batch *b = mk_batch(topic, tag, n, nkeys);
    lc_rc rc = lc_kafka_produce_batch(p, b->out, n, WAIT_MS, &err);
    if (rc != LC_OK)
        fail_msg("produce failed: %s", lc_err_msg(&err));
    for (size_t i = 0; i < n; i++)
        assert_int_equal(b->out[i].rc, LC_OK);
    free(b);
    lc_kafka_producer_free(p, 1000);
}

/* ---- consuming ------------------------------------------------------------------------- */

typedef struct seen_msg {
    char topic[128], key[32], payload[64];
    int32_t partition;
    int64_t offset, ts;
} seen_msg;

typedef struct coll {
    atomic_int stop;
    int64_t deadline;
    int timed_out;
    const char *tag; /* stop once `want` messages with this tag were handled (NULL: any) */
    size_t want, matched;
    int fail_calls; /* fail this many handler calls before succeeding */
    int calls, failed, ticks;
    int64_t fail_at, retry_gap; /* when the last failure was, how long until the next call */
    size_t n;                   /* messages handled successfully, in order */
    seen_msg m[MAXMSG];
    size_t nfirst; /* the first failed batch */
    seen_msg first[MAXMSG];
} coll;

static void record(seen_msg *s, const lc_kafka_msg *m)
{
    snprintf(s->topic, sizeof(s->topic), "%s", m->topic);
    snprintf(s->key, sizeof(s->key), "%.*s", (int)m->key_len, m->key ? m->key : "");
    snprintf(s->payload, sizeof(s->payload), "%.*s", (int)m->len, m->payload);
    s->partition = m->partition;
    s->offset = m->offset;
    s->ts = m->timestamp_ms;
}

static lc_rc handler(void *ctx, const lc_kafka_msg *msgs, size_t n, lc_err *err)
{
    coll *c = ctx;
    c->calls++;
    if (c->fail_at && !c->retry_gap)
        c->retry_gap = lc_now_ms() - c->fail_at;
    if (c->failed < c->fail_calls) {
        if (c->failed++ == 0)
            for (size_t i = 0; i < n && c->nfirst < MAXMSG; i++)
                record(&c->first[c->nfirst++], &msgs[i]);
        c->fail_at = lc_now_ms();
        c->retry_gap = 0;
        return lc_err_set(err, LC_ERR_UNAVAILABLE, "database is down (test)");
    }
    for (size_t i = 0; i < n; i++) {
        if (c->n < MAXMSG)
            record(&c->m[c->n++], &msgs[i]);
        if (!c->tag || strncmp(msgs[i].payload, c->tag, strlen(c->tag)) == 0)
            c->matched++;
    }
    if (c->matched >= c->want)
        atomic_store(&c->stop, 1);
    return LC_OK;
}

static void tick(void *ctx)
{
    coll *c = ctx;
    c->ticks++;
    if (lc_now_ms() > c->deadline) {
        c->timed_out = 1;
        atomic_store(&c->stop, 1);
    }
}

static coll *consume(const lc_kafka_conf *conf, const char *group, lc_topic t, coll *c,
                     size_t max_batch)
{
    lc_kafka_consumer *k = NULL;
    lc_err err = {0};
    /* A member leaving makes the mock cluster wait (session timeout - 1 s) for the rest of
     * the group before the next join completes: keep that short for the tests that reuse a
     * group. */
    static const char *const extra[] = {"session.timeout.ms=6000", NULL};
    lc_kafka_conf cc = *conf;
    cc.extra = extra;
    lc_rc rc = lc_kafka_consumer_new(&cc, group, &t, 1, 0, &k, &err);
    if (rc != LC_OK)
        fail_msg("consumer_new: %s", lc_err_msg(&err));
    lc_kafka_run_opts o = {.max_batch = max_batch,
                           .batch_wait_ms = 20,
                           .retry_backoff_ms = 50,
                           .retry_backoff_max = 400,
                           .tick = tick,
                           .idle_ms = 100};
    c->deadline = lc_now_ms() + WAIT_MS;
    rc = lc_kafka_consumer_run(k, &o, handler, c, &c->stop, &err);
    lc_kafka_consumer_free(k);
    if (rc != LC_OK)
        fail_msg("consumer_run: %s", lc_err_msg(&err));
    if (c->timed_out)
        fail_msg("group \"%s\" saw %zu of %zu messages in %d ms", group, c->matched, c->want,
                 WAIT_MS);
    return c;
}

static coll *new_coll(const char *tag, size_t want)
{
    coll *c = calloc(1, sizeof(*c));
    assert_non_null(c);
    c->tag = tag;
    c->want = want;
    return c;
}

/* Every payload "<tag>:<key>:<seq>" matches its message key, and seq rises per key. */
static void check_order(const coll *c, const char *tag, size_t nkeys, size_t per_key)
{
    size_t next[16] = {0};
    assert_true(nkeys <= 16);
    for (size_t i = 0; i < c->n; i++) {
        char t[16], key[32];
        size_t k, seq;
        assert_int_equal(sscanf(c->m[i].payload, "%15[^:]:%31[^:]:%zu", t, key, &seq), 3);
        assert_string_equal(t, tag);
        assert_string_equal(key, c->m[i].key);
        assert_int_equal(sscanf(key, "study-%zu", &k), 1);
        assert_true(k < nkeys);
        assert_int_equal(seq, next[k]); /* in order, no gap, no duplicate */
        next[k]++;
    }
    for (size_t k = 0; k < nkeys; k++)
        assert_int_equal(next[k], per_key);
}

/* ---- tests ----------------------------------------------------------------------------- */

static void test_topic_names(void **state)
{
    (void)state;
    char buf[300];
    assert_string_equal(lc_topic_base(LC_TOPIC_INSTANCE_STORED), "instance.stored");
    assert_string_equal(lc_topic_base(LC_TOPIC_STUDY_COMPLETED), "study.completed");
    assert_string_equal(lc_topic_base(LC_TOPIC_JOB_UPLOAD), "job.upload");
    assert_string_equal(lc_topic_base(LC_TOPIC_JOB_SEGMENT), "job.segment");
    assert_string_equal(lc_topic_base(LC_TOPIC_JOB_STATUS), "job.status");
    assert_string_equal(lc_topic_base(LC_TOPIC_DLQ), "dlq");
    assert_string_equal(lc_topic_base(LC_TOPIC_STUDY_CLOSE), "study.close");
    assert_null(lc_topic_base(LC_TOPIC__COUNT));
    assert_null(lc_topic_base((lc_topic)-1));
    for (int t = 0; t < LC_TOPIC__COUNT; t++)
        assert_int_equal(lc_topic_from_base(lc_topic_base((lc_topic)t)), t);
    assert_int_equal(lc_topic_from_base("radpipe.dlq"), -1);
    assert_int_equal(lc_topic_from_base(NULL), -1);

    assert_int_equal(lc_topic_name("radpipe.", LC_TOPIC_JOB_STATUS, buf, sizeof(buf)), LC_OK);
    assert_string_equal(buf, "radpipe.job.status");
    assert_int_equal(lc_topic_name(NULL, LC_TOPIC_DLQ, buf, sizeof(buf)), LC_OK);
    assert_string_equal(buf, "dlq");
    assert_int_equal(lc_topic_name("Site-A_1.", LC_TOPIC_DLQ, buf, sizeof(buf)), LC_OK);
    assert_string_equal(buf, "Site-A_1.dlq");
    /* illegal characters, too long for Kafka, too long for the buffer, unknown topic */
    assert_int_equal(lc_topic_name("rad pipe.", LC_TOPIC_DLQ, buf, sizeof(buf)), LC_ERR_INVALID);
    assert_int_equal(lc_topic_name("radpipe/", LC_TOPIC_DLQ, buf, sizeof(buf)), LC_ERR_INVALID);
    assert_int_equal(lc_topic_name("é.", LC_TOPIC_DLQ, buf, sizeof(buf)), LC_ERR_INVALID);
    char longp[260];
    memset(longp, 'a', 246);
    longp[246] = '\0'; /* 246 + "dlq" = 249: the limit */
    assert_int_equal(lc_topic_name(longp, LC_TOPIC_DLQ, buf, sizeof(buf)), LC_OK);
    assert_int_equal(strlen(buf), 249);
    strcat(longp, "a");
    assert_int_equal(lc_topic_name(longp, LC_TOPIC_DLQ, buf, sizeof(buf)), LC_ERR_INVALID);
    assert_int_equal(lc_topic_name("radpipe.", LC_TOPIC_JOB_STATUS, buf, 10), LC_ERR_INVALID);
    assert_int_equal(lc_topic_name("radpipe.", LC_TOPIC__COUNT, buf, sizeof(buf)), LC_ERR_INVALID);
}

static void test_topics_md_matches_code(void **state)
{
    (void)state;
    char path[4096];
    snprintf(path, sizeof(path), "%s/proto/topics.md", ts_root());
    char *md = ts_read_file(path, NULL);
    assert_non_null(md);
    int found[LC_TOPIC__COUNT] = {0}, rows = 0;
    /* table rows: "| `radpipe.<base>` | key | ..." */
    for (char *line = strtok(md, "\n"); line; line = strtok(NULL, "\n")) {
        if (strncmp(line, "| `radpipe.", 11) != 0)
            continue;
        char *name = line + 3, *end = strchr(name, '`');
        assert_non_null(end);
        *end = '\0';
        int t = lc_topic_from_base(name + strlen("radpipe."));
        if (t < 0)
            fail_msg("proto/topics.md lists \"%s\", which lc_topic does not know", name);
        found[t]++;
        rows++;
    }
    for (int t = 0; t < LC_TOPIC__COUNT; t++)
        if (found[t] != 1)
            fail_msg("proto/topics.md lists radpipe.%s %d times", lc_topic_base((lc_topic)t),
                     found[t]);
    assert_int_equal(rows, LC_TOPIC__COUNT);
    free(md);
}

static void test_bad_config(void **state)
{
    cluster *cl = *state;
    lc_kafka_producer *p = NULL;
    lc_kafka_consumer *k = NULL;
    lc_err err = {0};
    lc_topic t = LC_TOPIC_DLQ;

    const char *const bad_prop[] = {"no.such.property=1", NULL};
    lc_kafka_conf conf = mk_conf(cl->brokers, "bad.");
    conf.extra = bad_prop;
    assert_int_equal(lc_kafka_producer_new(&conf, &p, &err), LC_ERR_CONFIG);
    assert_null(p);
    assert_non_null(strstr(err.msg, "\"no.such.property\""));
    assert_int_equal(lc_kafka_consumer_new(&conf, "g", &t, 1, 0, &k, &err), LC_ERR_CONFIG);
    assert_null(k);
    assert_non_null(strstr(err.msg, "\"no.such.property\""));

    const char *const bad_value[] = {"linger.ms=soon", NULL};
    conf.extra = bad_value;
    assert_int_equal(lc_kafka_producer_new(&conf, &p, &err), LC_ERR_CONFIG);
    assert_non_null(strstr(err.msg, "\"linger.ms\""));

    const char *const no_eq[] = {"socket.timeout.ms", NULL};
    conf.extra = no_eq;
    assert_int_equal(lc_kafka_producer_new(&conf, &p, &err), LC_ERR_CONFIG);
    assert_non_null(strstr(err.msg, "expected key=value"));

    conf = mk_conf(NULL, "bad.");
    assert_int_equal(lc_kafka_producer_new(&conf, &p, &err), LC_ERR_CONFIG);
    assert_non_null(strstr(err.msg, "bootstrap"));

    /* a good extra is accepted */
    const char *const good[] = {"socket.timeout.ms=10000", "linger.ms=1", NULL};
    conf = mk_conf(cl->brokers, "bad.");
    conf.extra = good;
    assert_int_equal(lc_kafka_producer_new(&conf, &p, &err), LC_OK);
    lc_kafka_producer_free(p, 0);
    /* a topic prefix that makes illegal names */
    conf = mk_conf(cl->brokers, "bad prefix.");
    assert_int_equal(lc_kafka_consumer_new(&conf, "g", &t, 1, 0, &k, &err), LC_ERR_CONFIG);
    assert_non_null(strstr(err.msg, "bad prefix."));
    lc_kafka_producer_free(NULL, 0);
    lc_kafka_consumer_free(NULL);
}

static void test_ping(void **state)
{
    cluster *cl = *state;
    lc_kafka_producer *p = NULL;
    lc_err err = {0};
    lc_kafka_conf conf = mk_conf(cl->brokers, "ping.");
    assert_int_equal(lc_kafka_producer_new(&conf, &p, &err), LC_OK);
    lc_rc rc = lc_kafka_producer_ping(p, 10000, &err);
    if (rc != LC_OK)
        fail_msg("ping: %s", lc_err_msg(&err));
    lc_kafka_producer_free(p, 0);

    /* nothing listens on the port: an error within the timeout */
    char down[64];
    snprintf(down, sizeof(down), "127.0.0.1:%d", ts_free_port());
    conf = mk_conf(down, "ping.");
    assert_int_equal(lc_kafka_producer_new(&conf, &p, &err), LC_OK);
    int64_t t0 = lc_now_ms();
    assert_int_equal(lc_kafka_producer_ping(p, 1000, &err), LC_ERR_UNAVAILABLE);
    assert_true(lc_now_ms() - t0 < 3000);
    assert_non_null(strstr(err.msg, "metadata"));
    lc_kafka_producer_free(p, 0);
}

static void test_produce_consume_in_order(void **state)
{
    cluster *cl = *state;
    create_topics(cl, "rt.", 4);
    lc_kafka_conf conf = mk_conf(cl->brokers, "rt.");
    enum { NKEYS = 5, PER_KEY = 8 };
    produce(&conf, LC_TOPIC_JOB_UPLOAD, "rt", NKEYS * PER_KEY, NKEYS);

    coll *c = consume(&conf, "g-rt", LC_TOPIC_JOB_UPLOAD, new_coll("rt", NKEYS * PER_KEY), 7);
    assert_int_equal(c->n, NKEYS * PER_KEY);
    check_order(c, "rt", NKEYS, PER_KEY);
    int64_t now = lc_wall_ms();
    for (size_t i = 0; i < c->n; i++) {
        assert_string_equal(c->m[i].topic, "rt.job.upload");
        assert_true(c->m[i].partition >= 0 && c->m[i].partition < 4);
        assert_true(c->m[i].ts > now - 120000 && c->m[i].ts <= now + 1000);
    }
    /* batches were capped at max_batch, and tick ran after them */
    assert_true(c->calls >= (NKEYS * PER_KEY + 6) / 7);
    assert_true(c->ticks >= c->calls);
    free(c);
}

/* A failed batch is delivered again (seek back), offsets are committed only after LC_OK, and
 * a later member of the group starts after the committed offsets. */
static void test_commit_only_after_ok(void **state)
{
    cluster *cl = *state;
    create_topics(cl, "cm.", 4);
    lc_kafka_conf conf = mk_conf(cl->brokers, "cm.");
    enum { NKEYS = 4, PER_KEY = 5 };
    produce(&conf, LC_TOPIC_JOB_SEGMENT, "old", NKEYS * PER_KEY, NKEYS);

    coll *c = new_coll("old", NKEYS * PER_KEY);
    c->fail_calls = 2;
    consume(&conf, "g-cm", LC_TOPIC_JOB_SEGMENT, c, 6);
    assert_int_equal(c->failed, 2);
    assert_true(c->nfirst > 0);
    /* the second backoff doubled the first (50 ms -> 100 ms) */
    assert_true(c->retry_gap >= 100);
    /* nothing lost, nothing handled twice after success, order kept per key */
    assert_int_equal(c->n, NKEYS * PER_KEY);
    check_order(c, "old", NKEYS, PER_KEY);
    /* the failed batch came back */
    for (size_t i = 0; i < c->nfirst; i++) {
        size_t j = 0;
        while (j < c->n && !(c->m[j].partition == c->first[i].partition &&
                             c->m[j].offset == c->first[i].offset))
            j++;
        assert_true(j < c->n);
        assert_string_equal(c->m[j].payload, c->first[i].payload);
    }
    free(c);

    /* The group committed everything: a new member sees only what is produced now. */
    produce(&conf, LC_TOPIC_JOB_SEGMENT, "new", 4, 2);
    c = consume(&conf, "g-cm", LC_TOPIC_JOB_SEGMENT, new_coll("new", 4), 100);
    assert_int_equal(c->n, 4);
    check_order(c, "new", 2, 2);
    free(c);
}

/* A group that has never committed starts from the earliest offset, independent of other
 * groups that already consumed (and committed) the same messages. */
static void test_new_group_reads_from_earliest(void **state)
{
    cluster *cl = *state;
    create_topics(cl, "er.", 2);
    lc_kafka_conf conf = mk_conf(cl->brokers, "er.");
    produce(&conf, LC_TOPIC_STUDY_COMPLETED, "er", 6, 3);
    coll *c = consume(&conf, "g-er-1", LC_TOPIC_STUDY_COMPLETED, new_coll("er", 6), 100);
    check_order(c, "er", 3, 2);
    free(c);
    c = consume(&conf, "g-er-2", LC_TOPIC_STUDY_COMPLETED, new_coll("er", 6), 100);
    check_order(c, "er", 3, 2);
    free(c);
}

/* Batch closing: a first burst is consumed, and its handler produces a second burst; how long
 * after that produce the second burst's batch reached the handler, and in how many calls. */
typedef struct gap_run {
    const lc_kafka_conf *conf;
    atomic_int stop;
    int64_t deadline, produced_at, delay;
    int timed_out, b2_calls;
    size_t b1, b2;
} gap_run;

static lc_rc gap_handler(void *ctx, const lc_kafka_msg *msgs, size_t n, lc_err *err)
{
    gap_run *g = ctx;
    size_t b1 = 0, b2 = 0;
    (void)err;
    for (size_t i = 0; i < n; i++) {
        b1 += strncmp(msgs[i].payload, "b1:", 3) == 0;
        b2 += strncmp(msgs[i].payload, "b2:", 3) == 0;
    }
    g->b1 += b1;
    if (b2) {
        if (!g->b2_calls++)
            g->delay = lc_now_ms() - g->produced_at;
        g->b2 += b2;
    }
    if (g->b1 == 4 && !g->produced_at) {
        produce(g->conf, LC_TOPIC_JOB_STATUS, "b2", 4, 2);
        g->produced_at = lc_now_ms();
    }
    if (g->b2 == 4)
        atomic_store(&g->stop, 1);
    return LC_OK;
}

static void gap_tick(void *ctx)
{
    gap_run *g = ctx;
    if (lc_now_ms() > g->deadline) {
        g->timed_out = 1;
        atomic_store(&g->stop, 1);
    }
}

static gap_run *run_gap(cluster *cl, const char *prefix, int wait_ms, int gap_ms)
{
    lc_kafka_conf conf = mk_conf(cl->brokers, prefix);
    char group[64];
    lc_kafka_consumer *k = NULL;
    lc_err err = {0};
    create_topics(cl, prefix, 2);
    produce(&conf, LC_TOPIC_JOB_STATUS, "b1", 4, 2);
    snprintf(group, sizeof(group), "g-%sgap", prefix);
    const lc_topic t = LC_TOPIC_JOB_STATUS;
    assert_int_equal(lc_kafka_consumer_new(&conf, group, &t, 1, 0, &k, &err), LC_OK);
    gap_run *g = calloc(1, sizeof(*g));
    assert_non_null(g);
    g->conf = &conf;
    g->deadline = lc_now_ms() + WAIT_MS;
    lc_kafka_run_opts o = {.max_batch = 100,
                           .batch_wait_ms = wait_ms,
                           .batch_gap_ms = gap_ms,
                           .tick = gap_tick,
                           .idle_ms = 100};
    lc_rc rc = lc_kafka_consumer_run(k, &o, gap_handler, g, &g->stop, &err);
    lc_kafka_consumer_free(k);
    g->conf = NULL;
    if (rc != LC_OK)
        fail_msg("consumer_run: %s", lc_err_msg(&err));
    if (g->timed_out)
        fail_msg("%s: saw %zu + %zu of 4 + 4 messages in %d ms", prefix, g->b1, g->b2, WAIT_MS);
    return g;
}

/* With batch_gap_ms, a burst that has ended is handed over once no message came for the gap,
 * not batch_wait_ms after its first message; its messages still share one batch. Without it,
 * the batch waits the whole window (it cannot close sooner: 4 messages, max_batch 100). */
static void test_batch_gap(void **state)
{
    cluster *cl = *state;
    gap_run *g = run_gap(cl, "gp.", 2000, 100);
    assert_int_equal(g->b2, 4);
    assert_int_equal(g->b2_calls, 1);
    if (g->delay >= 1000)
        fail_msg("the second burst came %lld ms after it was produced (gap 100, window 2000)",
                 (long long)g->delay);
    free(g);

    g = run_gap(cl, "gq.", 2000, 0);
    assert_int_equal(g->b2, 4);
    assert_int_equal(g->b2_calls, 1);
    assert_true(g->delay >= 2000);
    free(g);
}

typedef struct prod_thread {
    lc_kafka_producer *p;
    const char *topic;
    char tag[16];
    lc_rc rc;
    size_t ok;
} prod_thread;

static void *prod_main(void *arg)
{
    prod_thread *pt = arg;
    batch *b = calloc(1, sizeof(*b));
    for (int round = 0; b && round < 5; round++) {
        for (size_t i = 0; i < 40; i++) {
            snprintf(b->key[i], sizeof(b->key[i]), "%s-%zu", pt->tag, i % 3);
            snprintf(b->payload[i], sizeof(b->payload[i]), "%s:%d:%zu", pt->tag, round, i);
            b->out[i] = (lc_kafka_out){.topic = pt->topic,
                                       .key = b->key[i],
                                       .key_len = strlen(b->key[i]),
                                       .payload = b->payload[i],
                                       .len = strlen(b->payload[i]),
                                       .rc = LC_ERR_INTERNAL};
        }
        lc_rc rc = lc_kafka_produce_batch(pt->p, b->out, 40, WAIT_MS, NULL);
        if (rc != LC_OK && pt->rc == LC_OK)
            pt->rc = rc;
        for (size_t i = 0; i < 40; i++)
            pt->ok += b->out[i].rc == LC_OK;
    }
    free(b);
    return NULL;
}

/* Several threads share one producer; each one's reports may be served by another's poll. */
static void test_concurrent_producers(void **state)
{
    cluster *cl = *state;
    create_topics(cl, "mt.", 4);
    lc_kafka_conf conf = mk_conf(cl->brokers, "mt.");
    lc_kafka_producer *p = NULL;
    assert_int_equal(lc_kafka_producer_new(&conf, &p, NULL), LC_OK);
    prod_thread pt[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        pt[i] = (prod_thread){.p = p, .topic = "mt.job.status"};
        snprintf(pt[i].tag, sizeof(pt[i].tag), "t%d", i);
        assert_int_equal(pthread_create(&th[i], NULL, prod_main, &pt[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(pt[i].rc, LC_OK);
        assert_int_equal(pt[i].ok, 200);
    }
    lc_kafka_producer_free(p, 1000);
}

/* A local queue far smaller than the batch: producev reports it full and the batch waits
 * for room instead of failing. */
static void test_produce_waits_out_full_queue(void **state)
{
    cluster *cl = *state;
    create_topics(cl, "qf.", 2);
    static const char *const small_queue[] = {"queue.buffering.max.messages=4", NULL};
    lc_kafka_conf conf = mk_conf(cl->brokers, "qf.");
    conf.extra = small_queue;
    lc_kafka_producer *p = NULL;
    lc_err err = {0};
    assert_int_equal(lc_kafka_producer_new(&conf, &p, &err), LC_OK);
    batch *b = mk_batch("qf.dlq", "qf", 60, 3);
    lc_rc rc = lc_kafka_produce_batch(p, b->out, 60, WAIT_MS, &err);
    if (rc != LC_OK)
        fail_msg("produce with a full queue: %s", lc_err_msg(&err));
    for (size_t i = 0; i < 60; i++)
        assert_int_equal(b->out[i].rc, LC_OK);
    free(b);
    lc_kafka_producer_free(p, 1000);
}

static void test_produce_to_unreachable_broker(void **state)
{
    (void)state;
    char down[64];
    snprintf(down, sizeof(down), "127.0.0.1:%d", ts_free_port());
    lc_kafka_conf conf = mk_conf(down, "dn.");
    lc_kafka_producer *p = NULL;
    lc_err err = {0};
    assert_int_equal(lc_kafka_producer_new(&conf, &p, &err), LC_OK);
    batch *b = mk_batch("dn.job.upload", "dn", 3, 1);
    int64_t t0 = lc_now_ms();
    assert_int_equal(lc_kafka_produce_batch(p, b->out, 3, 1000, &err), LC_ERR_TIMEOUT);
    int64_t took = lc_now_ms() - t0;
    assert_true(took >= 900 && took < 3000);
    for (size_t i = 0; i < 3; i++)
        assert_int_equal(b->out[i].rc, LC_ERR_TIMEOUT);
    assert_non_null(strstr(err.msg, "\"dn.job.upload\""));
    /* the undelivered messages still reference the batch: free purges them (ASan checks) */
    lc_kafka_producer_free(p, 0);
    free(b);
}

/* The broker goes away after the producer connected; reports arriving after the batch gave
 * up must land in memory that is still valid (ASan would catch a use after free). */
static void test_produce_broker_down_then_late_reports(void **state)
{
    (void)state;
    cluster own = {0};
    assert_int_equal(cluster_start(&own, 1), 0);
    create_topics(&own, "ld.", 1);
    lc_kafka_conf conf = mk_conf(own.brokers, "ld.");
    lc_kafka_producer *p = NULL;
    lc_err err = {0};
    assert_int_equal(lc_kafka_producer_new(&conf, &p, &err), LC_OK);
    batch *b = mk_batch("ld.job.upload", "ld", 2, 1);
    assert_int_equal(lc_kafka_produce_batch(p, b->out, 2, WAIT_MS, &err), LC_OK);

    assert_int_equal(rd_kafka_mock_broker_set_down(own.mc, 1), 0);
    int64_t t0 = lc_now_ms();
    lc_rc rc = lc_kafka_produce_batch(p, b->out, 2, 1000, &err);
    assert_int_not_equal(rc, LC_OK);
    assert_true(lc_now_ms() - t0 < 3000);
    assert_int_not_equal(b->out[0].rc, LC_OK);
    assert_true(err.msg[0] != '\0');
    free(b); /* produced with a copy: the caller's buffers are free to go */

    /* back up: the late reports are served by free's flush */
    assert_int_equal(rd_kafka_mock_broker_set_up(own.mc, 1), 0);
    lc_kafka_producer_free(p, 10000);
    cluster_stop(&own);
}

/* ---- radpipe-devbroker ----------------------------------------------------------------- */

static void test_devbroker(void **state)
{
    (void)state;
    char *bin = ts_bin("radpipe-devbroker");
    char *dir = ts_tmpdir("devbroker");
    char addr_file[4096], line[256] = {0};
    snprintf(addr_file, sizeof(addr_file), "%s/kafka.addr", dir);
    if (access(bin, X_OK) != 0)
        fail_msg("%s is not built", bin);

    int out[2];
    assert_int_equal(pipe(out), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(out[1], 1);
        close(out[0]);
        close(out[1]);
        execl(bin, bin, "--addr-file", addr_file, "--partitions", "2", "--log-level", "warn",
              (char *)NULL);
        _exit(127);
    }
    close(out[1]);

    /* the bootstrap line on stdout */
    size_t len = 0;
    int64_t deadline = lc_now_ms() + WAIT_MS;
    while (!strchr(line, '\n') && len < sizeof(line) - 1 && lc_now_ms() < deadline) {
        struct pollfd pfd = {.fd = out[0], .events = POLLIN};
        if (poll(&pfd, 1, 100) <= 0)
            continue;
        ssize_t r = read(out[0], line + len, sizeof(line) - 1 - len);
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    close(out[0]);
    assert_non_null(strchr(line, '\n'));
    assert_int_equal(strncmp(line, "bootstrap=127.0.0.1:", 20), 0);
    /* the same address in the file, written before or right after the line */
    char *addr = NULL;
    while (!(addr = ts_read_file(addr_file, NULL)) && lc_now_ms() < deadline)
        lc_sleep_ms(20, NULL);
    assert_non_null(addr);
    addr[strcspn(addr, "\n")] = '\0';
    line[strcspn(line, "\n")] = '\0';
    assert_string_equal(addr, line + strlen("bootstrap="));

    lc_kafka_conf conf = mk_conf(addr, "radpipe.");
    produce(&conf, LC_TOPIC_INSTANCE_STORED, "db", 6, 2);
    coll *c = consume(&conf, "g-devbroker", LC_TOPIC_INSTANCE_STORED, new_coll("db", 6), 100);
    check_order(c, "db", 2, 3);
    assert_string_equal(c->m[0].topic, "radpipe.instance.stored");
    free(c);

    assert_int_equal(kill(pid, SIGTERM), 0);
    int st = 0;
    pid_t w;
    int64_t stop_by = lc_now_ms() + 10000;
    while ((w = waitpid(pid, &st, WNOHANG)) == 0 && lc_now_ms() < stop_by)
        lc_sleep_ms(20, NULL);
    if (w == 0) {
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
        fail_msg("radpipe-devbroker did not stop on SIGTERM");
    }
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    assert_int_not_equal(access(addr_file, F_OK), 0); /* removed on a clean exit */
    free(addr);
    ts_rmrf(dir);
    free(dir);
    free(bin);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_topic_names),
        cmocka_unit_test(test_topics_md_matches_code),
        cmocka_unit_test(test_bad_config),
        cmocka_unit_test(test_ping),
        cmocka_unit_test(test_produce_consume_in_order),
        cmocka_unit_test(test_commit_only_after_ok),
        cmocka_unit_test(test_new_group_reads_from_earliest),
        cmocka_unit_test(test_batch_gap),
        cmocka_unit_test(test_concurrent_producers),
        cmocka_unit_test(test_produce_waits_out_full_queue),
        cmocka_unit_test(test_produce_to_unreachable_broker),
        cmocka_unit_test(test_produce_broker_down_then_late_reports),
        cmocka_unit_test(test_devbroker),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
