/*
 * outbox.c: writing to the transactional outbox (the relay is in outbox_relay.c). Every write
 * runs inside the caller's transaction and notifies channel radpipe_outbox, which PostgreSQL
 * delivers at commit, so the relay wakes exactly when there is something committed to send.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>
#include <openssl/evp.h>
#include "lc/kafka.h"
#include "lc/outbox.h"

static const char insert_sql[] =
    "WITH i AS (INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3) RETURNING id) "
    "SELECT pg_notify('radpipe_outbox', '') FROM i";

lc_rc lc_outbox_add(lc_db *db, const char *topic, const char *key, const char *payload, lc_err *err)
{
    const char *params[3] = {topic, key, payload};
    lc_rc rc = lc_db_exec_static(db, insert_sql, 3, params, NULL, err);
    if (rc != LC_OK)
        lc_err_wrap(err, "could not add an event for \"%s\" to the outbox", topic);
    return rc;
}

lc_rc lc_outbox_add_event(lc_db *db, const char *prefix, lc_topic t, const lc_event *ev,
                          lc_err *err)
{
    char topic[256];
    lc_rc rc = lc_topic_name(prefix, t, topic, sizeof(topic));
    if (rc != LC_OK)
        return lc_err_set(err, rc, "invalid topic for prefix \"%s\"", prefix);
    char *json = lc_event_to_json(ev);
    if (!json)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory serialising an event");
    rc = lc_outbox_add(db, topic, ev->subject, json, err);
    free(json);
    return rc;
}

static const char insert_many_sql[] =
    "WITH i AS (INSERT INTO outbox (topic, key, payload)"
    " SELECT $1, e.value->>0, e.value->>1 FROM jsonb_array_elements($2::jsonb)"
    " WITH ORDINALITY AS e ORDER BY e.ordinality RETURNING id)"
    " SELECT pg_notify('radpipe_outbox', '') FROM i LIMIT 1";

/* Append the string s (JSON null for NULL) to the array arr; 0 when out of memory. */
static int add_str(cJSON *arr, const char *s)
{
    cJSON *v = s ? cJSON_CreateString(s) : cJSON_CreateNull();
    if (v && cJSON_AddItemToArray(arr, v))
        return 1;
    cJSON_Delete(v);
    return 0;
}

/* The JSON array of [key, payload] of evs (caller frees); NULL when out of memory. */
static char *event_rows(lc_event *const *evs, size_t n)
{
    cJSON *rows = cJSON_CreateArray();
    int ok = rows != NULL;
    for (size_t i = 0; ok && i < n; i++) {
        char *payload = lc_event_to_json(evs[i]);
        cJSON *row = cJSON_CreateArray();
        if (!payload || !row || !cJSON_AddItemToArray(rows, row)) {
            cJSON_Delete(row); /* not in rows */
            ok = 0;
        } else {
            ok = add_str(row, evs[i]->subject) && add_str(row, payload);
        }
        free(payload);
    }
    char *out = ok ? cJSON_PrintUnformatted(rows) : NULL;
    cJSON_Delete(rows);
    return out;
}

lc_rc lc_outbox_add_events(lc_db *db, const char *prefix, lc_topic t, lc_event *const *evs,
                           size_t n, lc_err *err)
{
    char topic[256];
    if (n == 0)
        return LC_OK;
    lc_rc rc = lc_topic_name(prefix, t, topic, sizeof(topic));
    if (rc != LC_OK)
        return lc_err_set(err, rc, "invalid topic for prefix \"%s\"", prefix);
    char *rows = event_rows(evs, n);
    if (!rows)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory serialising %zu events", n);
    const char *params[2] = {topic, rows};
    rc = lc_db_exec_static(db, insert_many_sql, 2, params, NULL, err);
    if (rc != LC_OK)
        lc_err_wrap(err, "could not add %zu events for \"%s\" to the outbox", n, topic);
    free(rows);
    return rc;
}

/* 1 when buf holds valid UTF-8 without NUL bytes (PostgreSQL text cannot hold NUL). */
static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t k;
        unsigned int cp;
        if (c == 0)
            return 0;
        if (c < 0x80) {
            i++;
            continue;
        }
        if ((c & 0xE0) == 0xC0)
            k = 1, cp = c & 0x1F;
        else if ((c & 0xF0) == 0xE0)
            k = 2, cp = c & 0x0F;
        else if ((c & 0xF8) == 0xF0)
            k = 3, cp = c & 0x07;
        else
            return 0;
        if (i + k >= n)
            return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        /* overlong forms, surrogates and values past U+10FFFF are invalid */
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
            (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
            return 0;
        i += k + 1;
    }
    return 1;
}

static char *dup_n(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

lc_rc lc_outbox_add_dlq(lc_db *db, const char *prefix, const char *service, const char *topic,
                        int partition, long long offset, const char *key, size_t key_len,
                        const char *payload, size_t len, const char *error, lc_err *err)
{
    lc_rc rc;
    lc_event *ev = NULL;
    char *key_s = NULL, *body = NULL;
    cJSON *data = cJSON_CreateObject();
    int text = utf8_valid((const unsigned char *)payload, len);

    if (!data)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory building a dead-letter event");
    if (key && key_len && utf8_valid((const unsigned char *)key, key_len))
        key_s = dup_n(key, key_len);
    if (text) {
        body = dup_n(payload ? payload : "", len);
    } else {
        body = malloc(4 * ((len + 2) / 3) + 1);
        if (body)
            EVP_EncodeBlock((unsigned char *)body, (const unsigned char *)payload, (int)len);
    }
    if (!body || (key && key_len && utf8_valid((const unsigned char *)key, key_len) && !key_s)) {
        cJSON_Delete(data);
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory building a dead-letter event");
        goto out;
    }
    cJSON_AddStringToObject(data, "topic", topic);
    cJSON_AddNumberToObject(data, "partition", partition);
    cJSON_AddNumberToObject(data, "offset", (double)offset);
    if (key_s)
        cJSON_AddStringToObject(data, "key", key_s);
    cJSON_AddStringToObject(data, "service", service);
    cJSON_AddStringToObject(data, "error", error ? error : "unknown error");
    cJSON_AddStringToObject(data, "payload", body);
    cJSON_AddStringToObject(data, "payload_encoding", text ? "utf8" : "base64");

    char source[96];
    snprintf(source, sizeof(source), "/radpipe/%s", service);
    /* the dead letter keeps the original key so it lands next to its study's events */
    if ((rc = lc_event_new(LC_EV_DLQ, source, key_s, data, &ev, err)) != LC_OK)
        goto out;
    rc = lc_outbox_add_event(db, prefix, LC_TOPIC_DLQ, ev, err);
out:
    lc_event_free(ev);
    free(key_s);
    free(body);
    return rc;
}
