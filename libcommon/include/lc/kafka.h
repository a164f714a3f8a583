/*
 * kafka.h: librdkafka wrappers with radpipe's delivery semantics.
 * Producer: idempotent (enable.idempotence), acks=all, delivery reports waited for per batch.
 * Consumer: a consumer group with auto-commit off; offsets are committed only after the batch
 * handler returns LC_OK, so a crash redelivers (at-least-once) and handlers must be idempotent.
 * Topic names: the base names of proto/topics.md behind a configurable prefix ("radpipe.").
 * A producer is thread-safe; a consumer belongs to the thread that runs it.
 */
#ifndef LC_KAFKA_H
#define LC_KAFKA_H

#include <stddef.h>
#include <stdint.h>
#include <stdatomic.h>
#include "lc/rc.h"

typedef enum lc_topic {
    LC_TOPIC_INSTANCE_STORED = 0,
    LC_TOPIC_STUDY_COMPLETED,
    LC_TOPIC_JOB_UPLOAD,
    LC_TOPIC_JOB_SEGMENT,
    LC_TOPIC_JOB_STATUS,
    LC_TOPIC_DLQ,
    LC_TOPIC_STUDY_CLOSE, /* "study.close": an explicit end of a study (gateway, pipelines) */
    LC_TOPIC__COUNT
} lc_topic;

/* "instance.stored", ...; NULL when out of range. */
const char *lc_topic_base(lc_topic t);
/* Inverse of lc_topic_base; -1 when unknown. */
int lc_topic_from_base(const char *base);
/* prefix + base into buf; LC_ERR_INVALID when it does not fit or the name is not a legal
 * Kafka topic name ([a-zA-Z0-9._-], at most 249 characters). */
lc_rc lc_topic_name(const char *prefix, lc_topic t, char *buf, size_t cap);

typedef struct lc_kafka_conf {
    const char *brokers;      /* bootstrap servers "host:port,..." */
    const char *topic_prefix; /* "radpipe." */
    const char *client_id;    /* service name */
    /* extra librdkafka properties "key=value" (NULL-terminated array, may be NULL),
     * e.g. security.protocol for a real cluster */
    const char *const *extra;
} lc_kafka_conf;

typedef struct lc_kafka_producer lc_kafka_producer;

lc_rc lc_kafka_producer_new(const lc_kafka_conf *conf, lc_kafka_producer **out, lc_err *err);
/* Flushes outstanding messages for up to flush_ms, then frees. Accepts NULL. */
void lc_kafka_producer_free(lc_kafka_producer *p, int flush_ms);

/* One message of a batch; rc is set from its delivery report. */
typedef struct lc_kafka_out {
    const char *topic; /* full topic name */
    const char *key;
    size_t key_len;
    const char *payload;
    size_t len;
    const char *content_type; /* header "content-type", may be NULL */
    lc_rc rc;                 /* out: LC_OK once the broker acknowledged it */
} lc_kafka_out;

/* Produce n messages and wait (up to timeout_ms) for every delivery report. Returns LC_OK
 * when all were acknowledged, else the first failure; per-message results are in msgs[i].rc
 * (LC_ERR_TIMEOUT for those without a report in time). Thread-safe. */
lc_rc lc_kafka_produce_batch(lc_kafka_producer *p, lc_kafka_out *msgs, size_t n, int timeout_ms,
                             lc_err *err);

/* Readiness probe: metadata request to the cluster within timeout_ms. */
lc_rc lc_kafka_producer_ping(lc_kafka_producer *p, int timeout_ms, lc_err *err);

typedef struct lc_kafka_msg {
    const char *topic; /* full topic name */
    int32_t partition;
    int64_t offset;
    const char *key; /* not NUL-terminated; may be NULL */
    size_t key_len;
    const char *payload; /* not NUL-terminated */
    size_t len;
    int64_t timestamp_ms; /* -1 when unknown */
} lc_kafka_msg;

/* Handle a batch. Return LC_OK once every message is dealt with (processed, or sent to the
 * DLQ by the handler): the offsets are then committed. Any other return redelivers the whole
 * batch after a backoff (use it for transient failures such as the database being down). */
typedef lc_rc (*lc_kafka_batch_fn)(void *ctx, const lc_kafka_msg *msgs, size_t n, lc_err *err);

typedef struct lc_kafka_consumer lc_kafka_consumer;

/* Join consumer group group_id subscribed to the given topics (base enum, prefixed by
 * conf->topic_prefix). max_poll_interval_ms bounds one handler call (librdkafka evicts a
 * member that does not poll for longer); 0 = librdkafka's default. */
lc_rc lc_kafka_consumer_new(const lc_kafka_conf *conf, const char *group_id, const lc_topic *topics,
                            size_t ntopics, int max_poll_interval_ms, lc_kafka_consumer **out,
                            lc_err *err);
/* A consumer that fans out rather than shares: it is assigned every partition of topic at
 * its current end (no group membership, nothing committed, ever), so each process running
 * one sees every message published after this call returns. Partitions added to the topic
 * later are not followed. Run it with lc_kafka_consumer_run (commits are skipped). Fails with
 * LC_ERR_UNAVAILABLE when the brokers or the topic do not answer within timeout_ms. */
lc_rc lc_kafka_tail_new(const lc_kafka_conf *conf, lc_topic topic, int timeout_ms,
                        lc_kafka_consumer **out, lc_err *err);
/* Leaves the group (commits nothing further) and frees. Accepts NULL. */
void lc_kafka_consumer_free(lc_kafka_consumer *c);

typedef struct lc_kafka_run_opts {
    size_t max_batch;      /* messages per handler call (default 500) */
    int batch_wait_ms;     /* how long to wait to fill a batch after the first message (50) */
    int batch_gap_ms;      /* and, when > 0, only until no message has come for this long (0) */
    int retry_backoff_ms;  /* first backoff after a failed batch, doubling (200) */
    int retry_backoff_max; /* cap (10000) */
    /* called about every idle_ms with no messages and after each batch (may be NULL): lets a
     * service run timers (study completion, reconciler) on the consuming thread */
    void (*tick)(void *ctx);
    int idle_ms; /* (500) */
} lc_kafka_run_opts;

/* Poll, batch, call fn, commit; until *stop becomes non-zero. On stop, returns after the
 * current batch has been handled and committed. opts may be NULL for the defaults. */
lc_rc lc_kafka_consumer_run(lc_kafka_consumer *c, const lc_kafka_run_opts *opts,
                            lc_kafka_batch_fn fn, void *ctx, const atomic_int *stop, lc_err *err);

#endif
