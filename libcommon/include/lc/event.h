/*
 * event.h: CloudEvents 1.0 envelopes in JSON structured mode (specversion, id, source, type,
 * time, subject, datacontenttype, data) over cJSON, and the radpipe event types.
 * Schemas for every type live in proto/events/; lc_event_parse checks the envelope and, for
 * known types, the data fields the schema requires, so consumers can trust what they read.
 * An lc_event is owned by one thread; the free function accepts NULL.
 */
#ifndef LC_EVENT_H
#define LC_EVENT_H

#include <stddef.h>
#include <cjson/cJSON.h>
#include "lc/rc.h"

/* CloudEvents "type" values; the topic of each is in proto/topics.md. */
#define LC_EV_INSTANCE_STORED "radpipe.instance.stored"
#define LC_EV_STUDY_COMPLETED "radpipe.study.completed"
#define LC_EV_JOB_UPLOAD      "radpipe.job.upload"
#define LC_EV_JOB_SEGMENT     "radpipe.job.segment"
#define LC_EV_JOB_STATUS      "radpipe.job.status"
#define LC_EV_DLQ             "radpipe.dlq"
#define LC_EV_STUDY_CLOSE     "radpipe.study.close"

typedef struct lc_event {
    char id[129];  /* a UUID for radpipe's events; any string up to 128 bytes from others */
    char *source;  /* e.g. "/radpipe/api-gateway" */
    char *type;    /* LC_EV_* */
    char *subject; /* StudyInstanceUID (also the Kafka key); may be NULL */
    char *time;    /* RFC 3339 */
    cJSON *data;   /* owned; a JSON object */
} lc_event;

/* New event with a fresh UUID and the current time. data is consumed (also on error). */
lc_rc lc_event_new(const char *type, const char *source, const char *subject, cJSON *data,
                   lc_event **out, lc_err *err);
void lc_event_free(lc_event *ev);

/* What a radpipe.instance.stored event says (proto/events/instance.stored.json). */
typedef struct lc_instance_stored {
    const char *study_uid, *series_uid, *sop_uid;
    const char *sop_class_uid; /* may be NULL: "" */
    const char *store_url; /* the store's URL (lc_store_url); the object's URL is it + "/" + key */
    const char *key;
    long long size;
    const char *sha256;      /* 64 hex digits */
    const char *source_kind; /* "http", "stowrs", "spool", "notify" */
    const char *source_name; /* may be NULL: no name */
    const char *received_at; /* RFC 3339 */
} lc_instance_stored;

/* The radpipe.instance.stored event from the given source for s (the subject is the study).
 * Every producer builds it here, so they agree on the fields and the URL's form. */
lc_rc lc_event_instance_stored(const char *source, const lc_instance_stored *s, lc_event **out,
                               lc_err *err);

/* Serialise (unformatted JSON). Caller frees with free(). NULL on allocation failure. */
char *lc_event_to_json(const lc_event *ev);

/* Parse and validate an envelope: specversion "1.0", non-empty id/source/type, time in
 * RFC 3339 when present, datacontenttype application/json when present, data an object, and
 * for radpipe types the required data fields with their JSON types. LC_ERR_INVALID with a
 * message naming the field otherwise. */
lc_rc lc_event_parse(const char *buf, size_t len, lc_event **out, lc_err *err);

/* Validate only the data of a known type (unknown types pass). */
lc_rc lc_event_validate_data(const char *type, const cJSON *data, lc_err *err);

#endif
