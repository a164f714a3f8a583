/*
 * idx_close.c: the indexer consumer's batch router. instance.stored messages go to the ingest
 * handler (idx_ingest.c), whose transaction also records each study's source (instance.stored
 * data.source, the first one seen wins); then one transaction applies the batch's study.close
 * events: a dirty or not yet indexed study gets a pending close that the next completion pass
 * honours at once; a complete study with nothing new is left alone. Both steps are idempotent
 * (processed_events, upserts), so a failed second step redelivers the batch safely.
 * Runs on the consuming thread only.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "idx.h"
#include "lc/log.h"
#include "lc/outbox.h"
#include "lc/util.h"

#define TX_ATTEMPTS 3

static const char claim_sql[] = "INSERT INTO processed_events (consumer, event_id)"
                                " VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING event_id";

/* No row back: the study is complete and unchanged, the close does nothing. */
static const char close_sql[] =
    "INSERT INTO study_completion AS c (study_uid, close_requested_at, close_reason)"
    " SELECT $1, now(), $2"
    " WHERE NOT EXISTS (SELECT 1 FROM studies WHERE study_uid = $1 AND NOT dirty)"
    " ON CONFLICT (study_uid) DO UPDATE SET close_requested_at = now(),"
    " close_reason = EXCLUDED.close_reason, updated_at = now()"
    " RETURNING (SELECT count(*) FROM studies WHERE study_uid = $1)";

static const char quarantine_sql[] =
    "INSERT INTO quarantine (source, store_key, reason, event_id) VALUES ($1, NULL, $2, $3)";

typedef struct close_item {
    const lc_kafka_msg *msg; /* borrowed */
    lc_event *ev;            /* owned; NULL when the message is not a valid event */
    const char *study_uid;   /* borrowed from ev, NULL when poison */
    const char *reason;      /* borrowed from ev, may be NULL */
    char why[320];           /* poison: why */
    int outcome;             /* set by the transaction: 0 skipped, 1 applied, 2 pending,
                              * 3 nothing to do, 4 quarantined */
} close_item;

typedef struct side_tx {
    idx_ctx *x;
    close_item *closes;
    size_t nclose;
} side_tx;

static void utf8_fix_str(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (cJSON_IsString(v))
        idx_utf8_fix(v->valuestring);
}

static void prepare_close(close_item *c)
{
    lc_err e = {0};
    if (lc_event_parse(c->msg->payload, c->msg->len, &c->ev, &e) != LC_OK) {
        snprintf(c->why, sizeof(c->why), "invalid event: %s", lc_err_msg(&e));
        idx_utf8_fix(c->why);
        return;
    }
    idx_utf8_fix(c->ev->id);
    if (strcmp(c->ev->type, LC_EV_STUDY_CLOSE) != 0) {
        snprintf(c->why, sizeof(c->why), "unexpected event type \"%.64s\" on the study.close topic",
                 c->ev->type);
        idx_utf8_fix(c->why);
        return;
    }
    const cJSON *uid = cJSON_GetObjectItemCaseSensitive(c->ev->data, "study_instance_uid");
    if (!cJSON_IsString(uid) || !lc_dicom_uid_valid(uid->valuestring)) {
        snprintf(c->why, sizeof(c->why), "data.study_instance_uid is not a valid DICOM UID");
        return;
    }
    utf8_fix_str(c->ev->data, "reason");
    const cJSON *reason = cJSON_GetObjectItemCaseSensitive(c->ev->data, "reason");
    if (reason && (!cJSON_IsString(reason) || strlen(reason->valuestring) > 256)) {
        snprintf(c->why, sizeof(c->why), "data.reason must be a string of at most 256 bytes");
        return;
    }
    c->study_uid = uid->valuestring;
    c->reason = reason ? reason->valuestring : NULL;
}

/* The source of an instance.stored message as a row {ord, study_uid, kind, name}; NULL when
 * it has none (or is not an event: ingest quarantines those). Skips the parse unless the
 * payload mentions a source kind. */
static cJSON *source_row(const lc_kafka_msg *m, size_t ord)
{
    if (!memmem(m->payload, m->len, "\"kind\"", 6))
        return NULL;
    cJSON *root = cJSON_ParseWithLength(m->payload, m->len), *row = NULL;
    const cJSON *data = cJSON_GetObjectItemCaseSensitive(root, "data");
    const cJSON *src = cJSON_GetObjectItemCaseSensitive(data, "source");
    const cJSON *uid = cJSON_GetObjectItemCaseSensitive(data, "study_instance_uid");
    const cJSON *kind = cJSON_GetObjectItemCaseSensitive(src, "kind");
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(src, "name");
    if (!cJSON_IsString(uid) || !lc_dicom_uid_valid(uid->valuestring) ||
        (kind && (!cJSON_IsString(kind) || strlen(kind->valuestring) > 32)) ||
        (name && (!cJSON_IsString(name) || strlen(name->valuestring) > 256)) || (!kind && !name))
        goto out;
    if (kind)
        idx_utf8_fix(kind->valuestring);
    if (name)
        idx_utf8_fix(name->valuestring);
    row = cJSON_CreateObject();
    if (row && (!cJSON_AddNumberToObject(row, "ord", (double)ord) ||
                !cJSON_AddStringToObject(row, "study_uid", uid->valuestring) ||
                (kind && !cJSON_AddStringToObject(row, "kind", kind->valuestring)) ||
                (name && !cJSON_AddStringToObject(row, "name", name->valuestring)))) {
        cJSON_Delete(row);
        row = NULL;
    }
out:
    cJSON_Delete(root);
    return row;
}

static lc_rc quarantine_close(lc_db *db, idx_ctx *x, close_item *c, lc_err *err)
{
    const lc_kafka_msg *m = c->msg;
    char source[512];
    snprintf(source, sizeof(source), "kafka:%s/%d@%lld", m->topic, (int)m->partition,
             (long long)m->offset);
    idx_utf8_fix(source);
    const char *p[3] = {source, c->why, c->ev ? c->ev->id : NULL};
    lc_rc rc = lc_db_exec(db, quarantine_sql, 3, p, NULL, err);
    if (rc == LC_OK)
        rc = lc_outbox_add_dlq(db, x->prefix, IDX_SERVICE, m->topic, m->partition, m->offset,
                               m->key, m->key_len, m->payload, m->len, c->why, err);
    if (rc == LC_OK)
        c->outcome = 4;
    return rc;
}

static lc_rc side_fn(lc_db *db, void *ctx, lc_err *err)
{
    side_tx *t = ctx;
    lc_rc rc = LC_OK;
    for (size_t i = 0; i < t->nclose && rc == LC_OK; i++) {
        close_item *c = &t->closes[i];
        PGresult *res = NULL;
        c->outcome = 0;
        if (c->ev) { /* an event id: once per event, even when it is poison */
            const char *p[2] = {IDX_SERVICE, c->ev->id};
            if ((rc = lc_db_exec(db, claim_sql, 2, p, &res, err)) != LC_OK)
                break;
            int claimed = PQntuples(res) == 1;
            PQclear(res);
            res = NULL;
            if (!claimed)
                continue;
        }
        if (!c->study_uid) {
            rc = quarantine_close(db, t->x, c, err);
            continue;
        }
        const char *p[2] = {c->study_uid, c->reason};
        if ((rc = lc_db_exec(db, close_sql, 2, p, &res, err)) == LC_OK)
            c->outcome = PQntuples(res) == 0 ? 3 : atoi(PQgetvalue(res, 0, 0)) > 0 ? 1 : 2;
        PQclear(res);
    }
    return rc;
}

lc_rc idx_route_batch(void *ctx, const lc_kafka_msg *msgs, size_t n, lc_err *err)
{
    idx_ctx *x = ctx;
    char close_topic[300];
    lc_rc rc = LC_OK;
    side_tx t = {.x = x};
    char *sources = NULL; /* JSON rows: the studies' sources */
    lc_kafka_msg *stored = calloc(n ? n : 1, sizeof(*stored));
    cJSON *rows = cJSON_CreateArray();
    size_t ns = 0;
    if (!stored || !rows || !(t.closes = calloc(n ? n : 1, sizeof(*t.closes)))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory for a batch of %zu messages", n);
        goto out;
    }
    if (lc_topic_name(x->prefix, LC_TOPIC_STUDY_CLOSE, close_topic, sizeof(close_topic)) != LC_OK)
        close_topic[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        if (close_topic[0] && msgs[i].topic && strcmp(msgs[i].topic, close_topic) == 0) {
            t.closes[t.nclose].msg = &msgs[i];
            prepare_close(&t.closes[t.nclose++]);
            continue;
        }
        stored[ns++] = msgs[i];
        cJSON *row = source_row(&msgs[i], i);
        if (row && !cJSON_AddItemToArray(rows, row))
            cJSON_Delete(row);
    }
    if (cJSON_GetArraySize(rows) > 0 && !(sources = cJSON_PrintUnformatted(rows))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (ns > 0 && (rc = idx_handle_batch(x, stored, ns, sources, err)) != LC_OK)
        goto out;
    if (t.nclose == 0)
        goto out;
    if ((rc = lc_db_tx(x->db, TX_ATTEMPTS, side_fn, &t, err)) != LC_OK) {
        lc_err_wrap(err, "could not apply study.close events");
        goto out;
    }
    for (size_t i = 0; i < t.nclose; i++) {
        const close_item *c = &t.closes[i];
        const lc_kafka_msg *m = c->msg;
        if (c->outcome == 4)
            lc_log_warn("quarantined a message", LC_LS("topic", m->topic),
                        LC_LI("partition", m->partition), LC_LI("offset", m->offset),
                        LC_LS("event_id", c->ev ? c->ev->id : ""), LC_LS("reason", c->why));
        else if (c->outcome > 0)
            lc_log_info(c->outcome == 1   ? "study close requested"
                        : c->outcome == 2 ? "study close kept until the study is indexed"
                                          : "study close of a complete study: nothing to do",
                        LC_LS("study_uid", c->study_uid),
                        LC_LS("reason", c->reason ? c->reason : ""));
        if (c->outcome == 1)
            x->next_complete_ms = 0; /* complete it at the next tick, not a second later */
    }
out:
    for (size_t i = 0; t.closes && i < t.nclose; i++)
        lc_event_free(t.closes[i].ev);
    free(t.closes);
    free(sources);
    cJSON_Delete(rows);
    free(stored);
    return rc;
}
