/*
 * kafka.c: librdkafka wrappers (see lc/kafka.h): topic names, an idempotent producer that
 * waits for delivery reports per batch, and a consumer group loop that commits only after
 * the handler succeeded. A producer is shared by threads; a batch's delivery results live in
 * a refcounted heap block so reports arriving after the caller gave up touch valid memory.
 * A consumer is used by one thread. No state outside the handles.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <librdkafka/rdkafka.h>
#include "lc/kafka.h"
#include "lc/log.h"
#include "lc/util.h"

/* ---- topics ---------------------------------------------------------------------------- */

static const char *const topic_bases[LC_TOPIC__COUNT] = {
    [LC_TOPIC_INSTANCE_STORED] = "instance.stored", [LC_TOPIC_STUDY_COMPLETED] = "study.completed",
    [LC_TOPIC_JOB_UPLOAD] = "job.upload",           [LC_TOPIC_JOB_SEGMENT] = "job.segment",
    [LC_TOPIC_JOB_STATUS] = "job.status",           [LC_TOPIC_DLQ] = "dlq",
    [LC_TOPIC_STUDY_CLOSE] = "study.close",
};

#define TOPIC_NAME_MAX 249 /* Kafka's limit */

const char *lc_topic_base(lc_topic t)
{
    return (int)t >= 0 && t < LC_TOPIC__COUNT ? topic_bases[t] : NULL;
}

int lc_topic_from_base(const char *base)
{
    for (int i = 0; base && i < LC_TOPIC__COUNT; i++)
        if (strcmp(base, topic_bases[i]) == 0)
            return i;
    return -1;
}

lc_rc lc_topic_name(const char *prefix, lc_topic t, char *buf, size_t cap)
{
    const char *base = lc_topic_base(t);
    if (!base || !buf || cap == 0)
        return LC_ERR_INVALID;
    int n = snprintf(buf, cap, "%s%s", prefix ? prefix : "", base);
    if (n < 0 || (size_t)n >= cap || n > TOPIC_NAME_MAX) {
        buf[0] = '\0';
        return LC_ERR_INVALID;
    }
    for (const char *p = buf; *p; p++) {
        char ch = *p;
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '.' || ch == '_' || ch == '-')) {
            buf[0] = '\0';
            return LC_ERR_INVALID;
        }
    }
    return LC_OK;
}

/* ---- configuration shared by producer and consumer ------------------------------------ */

/* librdkafka calls this from its own threads and forbids calling back into it here; lc_log
 * is thread-safe and does one write per line. */
static void log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    lc_log_level l = level <= 3   ? LC_LOG_ERROR
                     : level == 4 ? LC_LOG_WARN
                     : level <= 6 ? LC_LOG_INFO
                                  : LC_LOG_DEBUG;
    if (lc_log_enabled(l))
        lc_log_emit(l, buf,
                    (const lc_log_field[]){LC_LS("component", "librdkafka"), LC_LS("facility", fac),
                                           LC_LEND});
}

static lc_rc conf_set(rd_kafka_conf_t *conf, const char *key, const char *val, lc_err *err)
{
    char es[256];
    if (rd_kafka_conf_set(conf, key, val, es, sizeof(es)) != RD_KAFKA_CONF_OK)
        return lc_err_set(err, LC_ERR_CONFIG, "invalid kafka property \"%s\": %s", key, es);
    return LC_OK;
}

/* How long a fetch that found nothing waits at the broker (a consumer default,
 * RADPIPE_KAFKA_OPTIONS may override it). A real broker answers as soon as a message arrives,
 * so this only sets how often an idle consumer asks; the dev broker (librdkafka's mock
 * cluster) answers an empty fetch only after the whole wait, messages or not, so with
 * librdkafka's 500 ms every burst would sit up to half a second before a consumer saw it. */
#define FETCH_WAIT_DEFAULT "fetch.wait.max.ms", "50"

/* Bootstrap, client id, logging, radpipe's tunable defaults (NULL-terminated key, value
 * pairs) and then the operator's extra properties, which may override those defaults.
 * Callers set the properties radpipe's delivery semantics rely on afterwards, so extras
 * cannot undo them. */
static lc_rc conf_new(const lc_kafka_conf *c, const char *const *defaults, rd_kafka_conf_t **out,
                      lc_err *err)
{
    lc_rc rc = LC_OK;
    char key[256];
    *out = NULL;
    if (!c || !c->brokers || !*c->brokers)
        return lc_err_set(err, LC_ERR_CONFIG, "kafka bootstrap servers are not configured");
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, log_cb);
    if ((rc = conf_set(conf, "bootstrap.servers", c->brokers, err)) != LC_OK)
        goto out;
    if (c->client_id && (rc = conf_set(conf, "client.id", c->client_id, err)) != LC_OK)
        goto out;
    for (const char *const *kv = defaults; kv && kv[0]; kv += 2)
        if ((rc = conf_set(conf, kv[0], kv[1], err)) != LC_OK)
            goto out;
    for (const char *const *kv = c->extra; kv && *kv; kv++) {
        const char *eq = strchr(*kv, '=');
        if (!eq || eq == *kv || (size_t)(eq - *kv) >= sizeof(key)) {
            rc = lc_err_set(err, LC_ERR_CONFIG, "invalid kafka property \"%s\": expected key=value",
                            *kv);
            goto out;
        }
        memcpy(key, *kv, (size_t)(eq - *kv));
        key[eq - *kv] = '\0';
        if ((rc = conf_set(conf, key, eq + 1, err)) != LC_OK)
            goto out;
    }
out:
    if (rc != LC_OK)
        rd_kafka_conf_destroy(conf);
    else
        *out = conf;
    return rc;
}

static lc_rc map_kafka_err(rd_kafka_resp_err_t e)
{
    switch (e) {
    case RD_KAFKA_RESP_ERR_NO_ERROR:
        return LC_OK;
    case RD_KAFKA_RESP_ERR__MSG_TIMED_OUT:
    case RD_KAFKA_RESP_ERR__TIMED_OUT:
    case RD_KAFKA_RESP_ERR__TIMED_OUT_QUEUE:
    case RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT:
        return LC_ERR_TIMEOUT;
    case RD_KAFKA_RESP_ERR__TRANSPORT:
    case RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN:
    case RD_KAFKA_RESP_ERR__RESOLVE:
    case RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS:
    case RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE:
    case RD_KAFKA_RESP_ERR_BROKER_NOT_AVAILABLE:
        return LC_ERR_UNAVAILABLE;
    case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
        return LC_ERR_TOO_LARGE;
    case RD_KAFKA_RESP_ERR__INVALID_ARG:
        return LC_ERR_INVALID;
    default:
        return LC_ERR_KAFKA;
    }
}

/* ---- producer -------------------------------------------------------------------------- */

struct lc_kafka_producer {
    rd_kafka_t *rk;
};

/* Delivery results of one lc_kafka_produce_batch call. References: the caller's plus one per
 * enqueued message, dropped by its delivery report; whoever drops the last frees. */
typedef struct dr_batch dr_batch;
typedef struct dr_slot {
    dr_batch *batch;
    atomic_int err;  /* rd_kafka_resp_err_t, valid once done */
    atomic_int done; /* release-stored after err */
} dr_slot;
struct dr_batch {
    atomic_int refs;
    atomic_size_t pending; /* enqueued messages still without a report */
    dr_slot slot[];
};

static void batch_release(dr_batch *b)
{
    if (atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) == 1)
        free(b);
}

/* Runs inside rd_kafka_poll of whichever thread polls, possibly not the batch's owner. */
static void dr_msg_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    (void)opaque;
    dr_slot *s = m->_private;
    if (!s)
        return;
    dr_batch *b = s->batch;
    atomic_store_explicit(&s->err, (int)m->err, memory_order_relaxed);
    atomic_store_explicit(&s->done, 1, memory_order_release);
    atomic_fetch_sub_explicit(&b->pending, 1, memory_order_release);
    batch_release(b);
}

/* Client-level producer errors (brokers down, fatal idempotence errors), served by
 * rd_kafka_poll: logged with their code rather than as librdkafka's generic ERROR line. */
static void producer_error_cb(rd_kafka_t *rk, int code, const char *reason, void *opaque)
{
    (void)rk;
    (void)opaque;
    rd_kafka_resp_err_t e = (rd_kafka_resp_err_t)code;
    lc_log_emit(e == RD_KAFKA_RESP_ERR__FATAL ? LC_LOG_ERROR : LC_LOG_WARN, "kafka producer error",
                (const lc_log_field[]){LC_LS("error", reason), LC_LS("code", rd_kafka_err2name(e)),
                                       LC_LEND});
}

lc_rc lc_kafka_producer_new(const lc_kafka_conf *conf, lc_kafka_producer **out, lc_err *err)
{
    rd_kafka_conf_t *kc = NULL;
    lc_kafka_producer *p = NULL;
    char es[512];
    lc_rc rc;
    *out = NULL;
    /* A short linger batches an outbox relay's burst into few requests. Messages time out
     * (8 s) before the relay stops waiting for a batch (10 s), so every batch gets a final
     * answer and a broker outage never leaves old copies queued behind a retried round. */
    static const char *const defaults[] = {"linger.ms", "5", "message.timeout.ms", "8000", NULL};
    if ((rc = conf_new(conf, defaults, &kc, err)) != LC_OK)
        goto out;
    /* The outbox relies on these: no duplicates or reordering from internal retries, and an
     * ack only once every in-sync replica has the message. */
    if ((rc = conf_set(kc, "enable.idempotence", "true", err)) != LC_OK ||
        (rc = conf_set(kc, "acks", "all", err)) != LC_OK)
        goto out;
    rd_kafka_conf_set_dr_msg_cb(kc, dr_msg_cb);
    rd_kafka_conf_set_error_cb(kc, producer_error_cb);
    if (!(p = calloc(1, sizeof(*p)))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (!(p->rk = rd_kafka_new(RD_KAFKA_PRODUCER, kc, es, sizeof(es)))) {
        rc = lc_err_set(err, LC_ERR_CONFIG, "could not create kafka producer: %s", es);
        goto out;
    }
    kc = NULL; /* owned by rk now */
    *out = p;
    p = NULL;
out:
    if (kc)
        rd_kafka_conf_destroy(kc);
    free(p);
    return rc;
}

void lc_kafka_producer_free(lc_kafka_producer *p, int flush_ms)
{
    if (!p)
        return;
    if (rd_kafka_flush(p->rk, flush_ms > 0 ? flush_ms : 0) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        lc_log_warn("kafka producer closed with undelivered messages",
                    LC_LI("messages", rd_kafka_outq_len(p->rk)));
        /* rd_kafka_destroy drops queued messages without delivery reports, which would leak
         * the batches they reference: purge them so their reports (with a purge error) are
         * served by this final flush. */
        rd_kafka_purge(p->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        rd_kafka_flush(p->rk, 5000);
    }
    rd_kafka_destroy(p->rk);
    free(p);
}

/* Enqueue one message, waiting out a full local queue until deadline. */
static rd_kafka_resp_err_t produce_one(rd_kafka_t *rk, const lc_kafka_out *m, dr_slot *s,
                                       int64_t deadline)
{
    for (;;) {
        rd_kafka_resp_err_t e;
        if (m->content_type)
            e = rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(m->topic),
                                  RD_KAFKA_V_KEY(m->key, m->key ? m->key_len : 0),
                                  RD_KAFKA_V_VALUE((void *)m->payload, m->len),
                                  RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                  RD_KAFKA_V_HEADER("content-type", m->content_type, -1),
                                  RD_KAFKA_V_OPAQUE(s), RD_KAFKA_V_END);
        else
            e = rd_kafka_producev(
                rk, RD_KAFKA_V_TOPIC(m->topic), RD_KAFKA_V_KEY(m->key, m->key ? m->key_len : 0),
                RD_KAFKA_V_VALUE((void *)m->payload, m->len),
                RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_OPAQUE(s), RD_KAFKA_V_END);
        if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            return e;
        int64_t left = deadline - lc_now_ms();
        if (left <= 0)
            return RD_KAFKA_RESP_ERR__TIMED_OUT_QUEUE;
        /* serving delivery reports is what frees room in the queue */
        rd_kafka_poll(rk, left < 10 ? (int)left : 10);
    }
}

lc_rc lc_kafka_produce_batch(lc_kafka_producer *p, lc_kafka_out *msgs, size_t n, int timeout_ms,
                             lc_err *err)
{
    if (!p || (n && !msgs))
        return lc_err_set(err, LC_ERR_INVALID, "invalid produce arguments");
    if (n == 0)
        return LC_OK;
    dr_batch *b = calloc(1, sizeof(*b) + n * sizeof(dr_slot));
    if (!b)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    atomic_init(&b->refs, 1);
    atomic_init(&b->pending, 0);
    int64_t deadline = lc_now_ms() + (timeout_ms > 0 ? timeout_ms : 0);

    for (size_t i = 0; i < n; i++) {
        dr_slot *s = &b->slot[i];
        s->batch = b;
        atomic_init(&s->err, 0);
        atomic_init(&s->done, 0);
        /* count the report before enqueueing: it may be served before producev returns */
        atomic_fetch_add(&b->refs, 1);
        atomic_fetch_add(&b->pending, 1);
        rd_kafka_resp_err_t e = msgs[i].topic ? produce_one(p->rk, &msgs[i], s, deadline)
                                              : RD_KAFKA_RESP_ERR__INVALID_ARG;
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
            atomic_fetch_sub(&b->pending, 1);
            atomic_fetch_sub(&b->refs, 1);
            atomic_store(&s->err, (int)e);
            atomic_store_explicit(&s->done, 1, memory_order_release);
        }
    }

    /* Reports of this batch may be served by another thread's poll, so poll in short steps
     * and look at the counter rather than wait for a report of our own. */
    while (atomic_load_explicit(&b->pending, memory_order_acquire) > 0) {
        int64_t left = deadline - lc_now_ms();
        if (left <= 0)
            break;
        rd_kafka_poll(p->rk, left < 10 ? (int)left : 10);
    }

    lc_rc first = LC_OK;
    for (size_t i = 0; i < n; i++) {
        dr_slot *s = &b->slot[i];
        rd_kafka_resp_err_t e = RD_KAFKA_RESP_ERR__TIMED_OUT;
        if (atomic_load_explicit(&s->done, memory_order_acquire))
            e = (rd_kafka_resp_err_t)atomic_load_explicit(&s->err, memory_order_relaxed);
        msgs[i].rc = map_kafka_err(e);
        if (msgs[i].rc != LC_OK && first == LC_OK) {
            first = msgs[i].rc;
            lc_err_set(err, first, "could not produce message %zu of %zu to \"%s\": %s", i + 1, n,
                       msgs[i].topic ? msgs[i].topic : "(null)",
                       e == RD_KAFKA_RESP_ERR__TIMED_OUT ? "no delivery report in time"
                                                         : rd_kafka_err2str(e));
        }
    }
    batch_release(b);
    return first;
}

lc_rc lc_kafka_producer_ping(lc_kafka_producer *p, int timeout_ms, lc_err *err)
{
    const struct rd_kafka_metadata *md = NULL;
    if (!p)
        return lc_err_set(err, LC_ERR_INVALID, "no kafka producer");
    rd_kafka_resp_err_t e = rd_kafka_metadata(p->rk, 0, NULL, &md, timeout_ms);
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
        return lc_err_set(err,
                          e == RD_KAFKA_RESP_ERR__TIMED_OUT ? LC_ERR_UNAVAILABLE : map_kafka_err(e),
                          "kafka metadata request failed: %s", rd_kafka_err2str(e));
    int brokers = md->broker_cnt;
    rd_kafka_metadata_destroy(md);
    if (brokers <= 0)
        return lc_err_set(err, LC_ERR_UNAVAILABLE, "kafka cluster reported no brokers");
    return LC_OK;
}

/* ---- consumer -------------------------------------------------------------------------- */

struct lc_kafka_consumer {
    rd_kafka_t *rk;
    int tail; /* lc_kafka_tail_new: assigned partitions, never commits */
};

lc_rc lc_kafka_consumer_new(const lc_kafka_conf *conf, const char *group_id, const lc_topic *topics,
                            size_t ntopics, int max_poll_interval_ms, lc_kafka_consumer **out,
                            lc_err *err)
{
    rd_kafka_conf_t *kc = NULL;
    rd_kafka_topic_partition_list_t *subs = NULL;
    lc_kafka_consumer *c = NULL;
    char es[512], name[256];
    lc_rc rc;
    *out = NULL;
    if (!group_id || !*group_id || !topics || ntopics == 0)
        return lc_err_set(err, LC_ERR_INVALID, "kafka consumer needs a group id and topics");
    /* A member that dies is noticed after 10 s (librdkafka's default is 45 s, and the mock
     * broker makes a rejoining member wait out the whole session timeout). */
    static const char *const defaults[] = {
        "session.timeout.ms", "10000", "heartbeat.interval.ms", "3000", FETCH_WAIT_DEFAULT, NULL};
    if ((rc = conf_new(conf, defaults, &kc, err)) != LC_OK)
        goto out;
    /* Offsets move only through the explicit commit after a successful batch; a new group
     * starts from the beginning so nothing published before it first joined is lost. */
    if ((rc = conf_set(kc, "group.id", group_id, err)) != LC_OK ||
        (rc = conf_set(kc, "enable.auto.commit", "false", err)) != LC_OK ||
        (rc = conf_set(kc, "enable.auto.offset.store", "false", err)) != LC_OK ||
        (rc = conf_set(kc, "auto.offset.reset", "earliest", err)) != LC_OK ||
        (rc = conf_set(kc, "enable.partition.eof", "false", err)) != LC_OK)
        goto out;
    if (max_poll_interval_ms > 0) {
        snprintf(es, sizeof(es), "%d", max_poll_interval_ms);
        if ((rc = conf_set(kc, "max.poll.interval.ms", es, err)) != LC_OK)
            goto out;
    }
    subs = rd_kafka_topic_partition_list_new((int)ntopics);
    for (size_t i = 0; i < ntopics; i++) {
        if (lc_topic_name(conf->topic_prefix, topics[i], name, sizeof(name)) != LC_OK) {
            rc = lc_err_set(err, LC_ERR_CONFIG, "invalid kafka topic name for prefix \"%s\"",
                            conf->topic_prefix ? conf->topic_prefix : "");
            goto out;
        }
        rd_kafka_topic_partition_list_add(subs, name, RD_KAFKA_PARTITION_UA);
    }
    if (!(c = calloc(1, sizeof(*c)))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (!(c->rk = rd_kafka_new(RD_KAFKA_CONSUMER, kc, es, sizeof(es)))) {
        rc = lc_err_set(err, LC_ERR_CONFIG, "could not create kafka consumer: %s", es);
        goto out;
    }
    kc = NULL;
    /* one queue for messages, errors and rebalances, served by rd_kafka_consumer_poll */
    rd_kafka_poll_set_consumer(c->rk);
    rd_kafka_resp_err_t e = rd_kafka_subscribe(c->rk, subs);
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
        rc = lc_err_set(err, LC_ERR_KAFKA, "could not subscribe consumer group \"%s\": %s",
                        group_id, rd_kafka_err2str(e));
        goto out;
    }
    *out = c;
    c = NULL;
out:
    if (kc)
        rd_kafka_conf_destroy(kc);
    if (subs)
        rd_kafka_topic_partition_list_destroy(subs);
    lc_kafka_consumer_free(c);
    return rc;
}

lc_rc lc_kafka_tail_new(const lc_kafka_conf *conf, lc_topic topic, int timeout_ms,
                        lc_kafka_consumer **out, lc_err *err)
{
    rd_kafka_conf_t *kc = NULL;
    rd_kafka_topic_partition_list_t *parts = NULL;
    const struct rd_kafka_metadata *md = NULL;
    lc_kafka_consumer *c = NULL;
    char es[512], name[256], group[128], rnd[LC_UUID_LEN + 1];
    lc_rc rc;
    *out = NULL;
    if (!conf)
        return lc_err_set(err, LC_ERR_INVALID, "kafka tail: no configuration");
    if (lc_topic_name(conf->topic_prefix, topic, name, sizeof(name)) != LC_OK)
        return lc_err_set(err, LC_ERR_CONFIG, "invalid kafka topic name");
    static const char *const defaults[] = {FETCH_WAIT_DEFAULT, NULL};
    if ((rc = conf_new(conf, defaults, &kc, err)) != LC_OK)
        goto out;
    /* a group id of its own: never joined (partitions are assigned, not subscribed) and never
     * committed to, so it leaves nothing behind on the brokers */
    lc_uuid_v4(rnd);
    snprintf(group, sizeof(group), "%s-tail-%.8s", conf->client_id ? conf->client_id : "radpipe",
             rnd);
    if ((rc = conf_set(kc, "group.id", group, err)) != LC_OK ||
        (rc = conf_set(kc, "enable.auto.commit", "false", err)) != LC_OK ||
        (rc = conf_set(kc, "enable.auto.offset.store", "false", err)) != LC_OK ||
        (rc = conf_set(kc, "enable.partition.eof", "false", err)) != LC_OK)
        goto out;
    if (!(c = calloc(1, sizeof(*c)))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    c->tail = 1;
    if (!(c->rk = rd_kafka_new(RD_KAFKA_CONSUMER, kc, es, sizeof(es)))) {
        rc = lc_err_set(err, LC_ERR_CONFIG, "could not create kafka consumer: %s", es);
        goto out;
    }
    kc = NULL;
    rd_kafka_poll_set_consumer(c->rk);
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(c->rk, name, NULL);
    rd_kafka_resp_err_t e =
        rkt ? rd_kafka_metadata(c->rk, 0, rkt, &md, timeout_ms) : RD_KAFKA_RESP_ERR__INVALID_ARG;
    if (rkt)
        rd_kafka_topic_destroy(rkt);
    if (e == RD_KAFKA_RESP_ERR_NO_ERROR && (md->topic_cnt != 1 || md->topics[0].err))
        e = md->topic_cnt == 1 ? md->topics[0].err : RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART;
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
        rc = lc_err_set(err, LC_ERR_UNAVAILABLE, "could not read the partitions of \"%s\": %s",
                        name, rd_kafka_err2str(e));
        goto out;
    }
    /* each partition from its current end: what is published from now on */
    parts = rd_kafka_topic_partition_list_new(md->topics[0].partition_cnt);
    for (int i = 0; i < md->topics[0].partition_cnt; i++) {
        int32_t p = md->topics[0].partitions[i].id;
        int64_t lo = 0, hi = 0;
        e = rd_kafka_query_watermark_offsets(c->rk, name, p, &lo, &hi, timeout_ms);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
            rc = lc_err_set(err, LC_ERR_UNAVAILABLE,
                            "could not read the end offset of \"%s\" [%d]: %s", name, (int)p,
                            rd_kafka_err2str(e));
            goto out;
        }
        rd_kafka_topic_partition_list_add(parts, name, p)->offset = hi;
    }
    if ((e = rd_kafka_assign(c->rk, parts)) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        rc = lc_err_set(err, LC_ERR_KAFKA, "could not assign the partitions of \"%s\": %s", name,
                        rd_kafka_err2str(e));
        goto out;
    }
    *out = c;
    c = NULL;
out:
    if (md)
        rd_kafka_metadata_destroy(md);
    if (parts)
        rd_kafka_topic_partition_list_destroy(parts);
    if (kc)
        rd_kafka_conf_destroy(kc);
    lc_kafka_consumer_free(c);
    return rc;
}

void lc_kafka_consumer_free(lc_kafka_consumer *c)
{
    if (!c)
        return;
    if (c->rk) {
        rd_kafka_resp_err_t e = rd_kafka_consumer_close(c->rk);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
            lc_log_warn("could not close kafka consumer cleanly",
                        LC_LS("error", rd_kafka_err2str(e)));
        rd_kafka_destroy(c->rk);
    }
    free(c);
}

#define POLL_STEP_MS 100 /* bounds how long *stop goes unnoticed */

/* A consumer error event: LC_OK to go on, LC_ERR_KAFKA (err filled) when fatal. */
static lc_rc consumer_error(rd_kafka_t *rk, const rd_kafka_message_t *m, lc_err *err)
{
    if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
        return LC_OK;
    if (m->err == RD_KAFKA_RESP_ERR__FATAL) {
        char es[512];
        rd_kafka_resp_err_t fe = rd_kafka_fatal_error(rk, es, sizeof(es));
        return lc_err_set(err, LC_ERR_KAFKA, "fatal kafka consumer error: %s: %s",
                          rd_kafka_err2name(fe), es);
    }
    lc_log_warn("kafka consumer error", LC_LS("error", rd_kafka_message_errstr(m)),
                LC_LS("code", rd_kafka_err2name(m->err)),
                LC_LS("topic", m->rkt ? rd_kafka_topic_name(m->rkt) : ""));
    return LC_OK;
}

/* Fill raw[] with up to max messages: wait up to POLL_STEP_MS for the first, then up to
 * wait_ms more for the rest, or only until no message has come for gap_ms (when > 0):
 * messages that come together (one fetch's answer, a steady flow) still share a batch, and a
 * burst that has ended is handed over at once instead of wait_ms after its first message. */
static lc_rc collect(rd_kafka_t *rk, rd_kafka_message_t **raw, size_t max, int wait_ms, int gap_ms,
                     size_t *n, lc_err *err)
{
    int64_t deadline = 0;
    *n = 0;
    while (*n < max) {
        int timeout = POLL_STEP_MS, gapped = 0;
        if (*n > 0) {
            int64_t left = deadline - lc_now_ms();
            timeout = left > 0 ? (int)left : 0;
            if (gap_ms > 0 && timeout > gap_ms) {
                timeout = gap_ms;
                gapped = 1;
            }
        }
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, timeout);
        if (!m) {
            if (*n == 0 || timeout == 0 || gapped)
                return LC_OK;
            continue;
        }
        if (m->err) {
            lc_rc rc = consumer_error(rk, m, err);
            rd_kafka_message_destroy(m);
            if (rc != LC_OK)
                return rc;
            if (*n == 0)
                return LC_OK; /* let the caller check stop and tick */
            continue;
        }
        if (*n == 0)
            deadline = lc_now_ms() + wait_ms;
        raw[(*n)++] = m;
    }
    return LC_OK;
}

/* Per partition of the batch, the first (rewind) or next (commit) offset. */
static rd_kafka_topic_partition_list_t *batch_offsets(rd_kafka_message_t **raw, size_t n, int next)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(4);
    for (size_t i = 0; i < n; i++) {
        const char *t = rd_kafka_topic_name(raw[i]->rkt);
        int64_t off = next ? raw[i]->offset + 1 : raw[i]->offset;
        rd_kafka_topic_partition_t *tp =
            rd_kafka_topic_partition_list_find(l, t, raw[i]->partition);
        if (!tp)
            rd_kafka_topic_partition_list_add(l, t, raw[i]->partition)->offset = off;
        else if (next ? off > tp->offset : off < tp->offset)
            tp->offset = off;
    }
    return l;
}

static void commit_batch(rd_kafka_t *rk, rd_kafka_message_t **raw, size_t n)
{
    rd_kafka_topic_partition_list_t *l = batch_offsets(raw, n, 1);
    /* A failure (typically a rebalance took the partition away) only means redelivery to
     * the next owner, which idempotent handlers absorb. */
    rd_kafka_resp_err_t e = rd_kafka_commit(rk, l, 0);
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
        lc_log_warn("could not commit kafka offsets", LC_LS("error", rd_kafka_err2str(e)),
                    LC_LI("messages", n));
    rd_kafka_topic_partition_list_destroy(l);
}

/* Rewind to the batch's first offsets so the failed batch is fetched again. */
static void rewind_batch(rd_kafka_t *rk, rd_kafka_message_t **raw, size_t n)
{
    rd_kafka_topic_partition_list_t *l = batch_offsets(raw, n, 0);
    /* Synchronous so that no message fetched past the failed batch slips through; a
     * partition revoked meanwhile fails here and is harmless: its new owner starts from the
     * committed offset. */
    rd_kafka_error_t *e = rd_kafka_seek_partitions(rk, l, 5000);
    if (e) {
        lc_log_debug("kafka seek failed", LC_LS("error", rd_kafka_error_string(e)));
        rd_kafka_error_destroy(e);
    }
    rd_kafka_topic_partition_list_destroy(l);
}

lc_rc lc_kafka_consumer_run(lc_kafka_consumer *c, const lc_kafka_run_opts *opts,
                            lc_kafka_batch_fn fn, void *ctx, const atomic_int *stop, lc_err *err)
{
    lc_kafka_run_opts o = {.max_batch = 500,
                           .batch_wait_ms = 50,
                           .retry_backoff_ms = 200,
                           .retry_backoff_max = 10000,
                           .idle_ms = 500};
    if (opts) {
        o.tick = opts->tick;
        if (opts->max_batch > 0)
            o.max_batch = opts->max_batch;
        if (opts->batch_wait_ms > 0)
            o.batch_wait_ms = opts->batch_wait_ms;
        o.batch_gap_ms = opts->batch_gap_ms;
        if (opts->retry_backoff_ms > 0)
            o.retry_backoff_ms = opts->retry_backoff_ms;
        if (opts->retry_backoff_max > 0)
            o.retry_backoff_max = opts->retry_backoff_max;
        if (opts->idle_ms > 0)
            o.idle_ms = opts->idle_ms;
    }
    if (!c || !fn || !stop)
        return lc_err_set(err, LC_ERR_INVALID, "invalid consumer run arguments");

    rd_kafka_message_t **raw = calloc(o.max_batch, sizeof(*raw));
    lc_kafka_msg *msgs = calloc(o.max_batch, sizeof(*msgs));
    lc_rc rc = LC_OK;
    if (!raw || !msgs) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    int backoff = o.retry_backoff_ms;
    int64_t last_tick = lc_now_ms();
    while (!atomic_load(stop)) {
        size_t n = 0;
        rc = collect(c->rk, raw, o.max_batch, o.batch_wait_ms, o.batch_gap_ms, &n, err);
        if (rc != LC_OK) {
            for (size_t i = 0; i < n; i++)
                rd_kafka_message_destroy(raw[i]);
            goto out;
        }
        if (n == 0) {
            if (o.tick && lc_now_ms() - last_tick >= o.idle_ms) {
                o.tick(ctx);
                last_tick = lc_now_ms();
            }
            continue;
        }
        for (size_t i = 0; i < n; i++) {
            rd_kafka_message_t *m = raw[i];
            rd_kafka_timestamp_type_t tt;
            msgs[i] = (lc_kafka_msg){.topic = rd_kafka_topic_name(m->rkt),
                                     .partition = m->partition,
                                     .offset = m->offset,
                                     .key = m->key,
                                     .key_len = m->key_len,
                                     .payload = m->payload ? m->payload : "",
                                     .len = m->len,
                                     .timestamp_ms = rd_kafka_message_timestamp(m, &tt)};
        }
        lc_err herr = {0};
        lc_rc hrc = fn(ctx, msgs, n, &herr);
        if (hrc == LC_OK) {
            if (!c->tail)
                commit_batch(c->rk, raw, n);
            backoff = o.retry_backoff_ms;
        } else {
            lc_log_warn("batch handler failed, redelivering after backoff",
                        LC_LS("error", lc_err_msg(&herr)), LC_LS("topic", msgs[0].topic),
                        LC_LI("messages", n), LC_LI("backoff_ms", backoff));
            rewind_batch(c->rk, raw, n);
        }
        for (size_t i = 0; i < n; i++)
            rd_kafka_message_destroy(raw[i]);
        if (hrc != LC_OK) {
            lc_sleep_ms(backoff, stop);
            backoff = backoff > o.retry_backoff_max / 2 ? o.retry_backoff_max : backoff * 2;
        }
        if (o.tick) {
            o.tick(ctx);
            last_tick = lc_now_ms();
        }
    }
out:
    free(raw);
    free(msgs);
    return rc;
}
