/*
 * outbox.h: the transactional outbox. A service that changes state and emits an event writes
 * both in one PostgreSQL transaction (lc_outbox_add inside the caller's BEGIN/COMMIT); the
 * relay publishes outbox rows with the idempotent producer and deletes each row only after
 * the broker acknowledged it. One relay at a time is active across all processes (an advisory
 * lock elects it), which keeps each key's events in commit order; others stand by.
 * The relay runs on its own thread with its own connection.
 */
#ifndef LC_OUTBOX_H
#define LC_OUTBOX_H

#include "lc/db.h"
#include "lc/event.h"
#include "lc/kafka.h"
#include "lc/metrics.h"

/* Insert one message (topic is the full name) and NOTIFY the relay at commit. Must run inside
 * the caller's transaction on db. key may be NULL. */
lc_rc lc_outbox_add(lc_db *db, const char *topic, const char *key, const char *payload,
                    lc_err *err);
/* Serialise ev and add it to topic prefix+base(t) with key ev->subject. */
lc_rc lc_outbox_add_event(lc_db *db, const char *prefix, lc_topic t, const lc_event *ev,
                          lc_err *err);
/* lc_outbox_add_event for n events (borrowed) in one statement: the same rows, in the order
 * of evs (so their ids, and the relay's publishing order, follow it), one round trip. */
lc_rc lc_outbox_add_events(lc_db *db, const char *prefix, lc_topic t, lc_event *const *evs,
                           size_t n, lc_err *err);

/* Add a radpipe.dlq event for a message that cannot be processed: records the source topic,
 * partition, offset, key, payload (as text, or base64 when it is not valid UTF-8), the
 * service and the error. */
lc_rc lc_outbox_add_dlq(lc_db *db, const char *prefix, const char *service, const char *topic,
                        int partition, long long offset, const char *key, size_t key_len,
                        const char *payload, size_t len, const char *error, lc_err *err);

typedef struct lc_outbox_relay lc_outbox_relay;

/* Start the relay thread on its own connection to db_url, publishing with p (borrowed, must
 * outlive the relay). metrics may be NULL. */
lc_rc lc_outbox_relay_start(const char *db_url, lc_kafka_producer *p, lc_metrics *metrics,
                            lc_outbox_relay **out, lc_err *err);
/* Publish what is pending for up to drain_ms, then stop the thread and free. Accepts NULL. */
void lc_outbox_relay_stop(lc_outbox_relay *r, int drain_ms);
/* Run one relay round on db synchronously (for tests and tools): publishes up to max rows,
 * returns how many were published and deleted. */
lc_rc lc_outbox_relay_once(lc_db *db, lc_kafka_producer *p, int max, int *published, lc_err *err);

#endif
