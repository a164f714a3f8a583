/*
 * test_outbox.c: writing to the outbox (libcommon/outbox.c) against real PostgreSQL: rows
 * appear only when the caller's transaction commits, the relay's NOTIFY arrives at commit,
 * events keep their subject as key, and dead letters carry the original bytes (as text when
 * they are UTF-8, base64 otherwise) in a valid radpipe.dlq event.
 */
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <openssl/evp.h>
#include "lc/db.h"
#include "lc/event.h"
#include "lc/log.h"
#include "lc/outbox.h"
#include "ts.h"

typedef struct fx {
    char *url;
    lc_db *db;
} fx;

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    lc_err e;
    f->url = ts_pg_fresh_db("outbox");
    if (!f->url)
        fail_msg("RADPIPE_TEST_PG_URL is not set: run through tests/run.sh");
    assert_int_equal(lc_db_connect(f->url, 10000, NULL, &f->db, &e), LC_OK);
    assert_int_equal(lc_db_migrate(f->db, &e), LC_OK);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    lc_db_free(f->db);
    free(f->url);
    free(f);
    return 0;
}

static int rows(fx *f)
{
    PGresult *r = NULL;
    lc_err e;
    assert_int_equal(lc_db_exec(f->db, "SELECT count(*) FROM outbox", 0, NULL, &r, &e), LC_OK);
    int n = atoi(PQgetvalue(r, 0, 0));
    PQclear(r);
    return n;
}

static void test_transactional_and_notified(void **state)
{
    fx *f = *state;
    lc_err e;
    lc_db *listener = NULL;
    assert_int_equal(lc_db_connect(f->url, 10000, NULL, &listener, &e), LC_OK);
    assert_int_equal(lc_db_exec(listener, "LISTEN radpipe_outbox", 0, NULL, NULL, &e), LC_OK);

    assert_int_equal(lc_db_begin(f->db, &e), LC_OK);
    assert_int_equal(lc_outbox_add(f->db, "radpipe.job.status", "1.2.3", "{\"a\":1}", &e), LC_OK);
    lc_db_rollback(f->db);
    assert_int_equal(rows(f), 0);

    assert_int_equal(lc_db_begin(f->db, &e), LC_OK);
    assert_int_equal(lc_outbox_add(f->db, "radpipe.job.status", "1.2.3", "{\"a\":1}", &e), LC_OK);
    assert_int_equal(lc_outbox_add(f->db, "radpipe.job.status", NULL, "{\"a\":2}", &e), LC_OK);
    /* nothing is visible, and nothing notified, before the commit */
    PGconn *lc = lc_db_conn(listener);
    PQconsumeInput(lc);
    assert_null(PQnotifies(lc));
    assert_int_equal(lc_db_commit(f->db, &e), LC_OK);
    assert_int_equal(rows(f), 2);
    PGnotify *n = NULL;
    for (int i = 0; i < 50 && !n; i++) {
        struct pollfd p = {.fd = PQsocket(lc), .events = POLLIN};
        poll(&p, 1, 100);
        PQconsumeInput(lc);
        n = PQnotifies(lc);
    }
    assert_non_null(n);
    assert_string_equal(n->relname, "radpipe_outbox");
    PQfreemem(n);
    lc_db_free(listener);

    PGresult *r = NULL;
    assert_int_equal(lc_db_exec(f->db, "SELECT key FROM outbox WHERE key IS NULL", 0, NULL, &r, &e),
                     LC_OK);
    assert_int_equal(PQntuples(r), 1); /* a NULL key stays NULL */
    PQclear(r);
}

static void test_event_keyed_by_subject(void **state)
{
    fx *f = *state;
    lc_err e;
    lc_event *ev = NULL;
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "x", "y");
    assert_int_equal(lc_event_new("radpipe.test", "/radpipe/test", "1.2.840.99", d, &ev, &e),
                     LC_OK);
    assert_int_equal(lc_db_begin(f->db, &e), LC_OK);
    assert_int_equal(lc_outbox_add_event(f->db, "radpipe.", LC_TOPIC_STUDY_COMPLETED, ev, &e),
                     LC_OK);
    assert_int_equal(lc_db_commit(f->db, &e), LC_OK);
    PGresult *r = NULL;
    assert_int_equal(lc_db_exec(f->db, "SELECT topic, key, payload FROM outbox", 0, NULL, &r, &e),
                     LC_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), "radpipe.study.completed");
    assert_string_equal(PQgetvalue(r, 0, 1), "1.2.840.99");
    lc_event *back = NULL;
    assert_int_equal(lc_event_parse(PQgetvalue(r, 0, 2), strlen(PQgetvalue(r, 0, 2)), &back, &e),
                     LC_OK);
    assert_string_equal(back->id, ev->id);
    lc_event_free(back);
    PQclear(r);
    /* an illegal prefix is refused before anything is written */
    assert_int_equal(lc_outbox_add_event(f->db, "bad prefix/", LC_TOPIC_DLQ, ev, &e),
                     LC_ERR_INVALID);
    lc_event_free(ev);
}

/* Many events in one statement: the rows lc_outbox_add_event writes, in the array's order,
 * atomic with the caller's transaction; none for n = 0. */
static void test_events_in_one_statement(void **state)
{
    fx *f = *state;
    lc_err e;
    enum { N = 5 };
    lc_event *evs[N];
    for (int i = 0; i < N; i++) {
        char subject[32];
        cJSON *d = cJSON_CreateObject();
        cJSON_AddNumberToObject(d, "i", i);
        snprintf(subject, sizeof(subject), "1.2.840.%d", 10 - i); /* keys not in id order */
        assert_int_equal(lc_event_new("radpipe.test", "/radpipe/test", subject, d, &evs[i], &e),
                         LC_OK);
    }
    assert_int_equal(lc_db_begin(f->db, &e), LC_OK);
    assert_int_equal(lc_outbox_add_events(f->db, "radpipe.", LC_TOPIC_INSTANCE_STORED, evs, N, &e),
                     LC_OK);
    lc_db_rollback(f->db);
    assert_int_equal(rows(f), 0);

    assert_int_equal(lc_db_begin(f->db, &e), LC_OK);
    assert_int_equal(lc_outbox_add_events(f->db, "radpipe.", LC_TOPIC_INSTANCE_STORED, evs, 0, &e),
                     LC_OK);
    assert_int_equal(lc_outbox_add_events(f->db, "radpipe.", LC_TOPIC_INSTANCE_STORED, evs, N, &e),
                     LC_OK);
    assert_int_equal(lc_db_commit(f->db, &e), LC_OK);
    PGresult *r = NULL;
    assert_int_equal(
        lc_db_exec(f->db, "SELECT topic, key, payload FROM outbox ORDER BY id", 0, NULL, &r, &e),
        LC_OK);
    assert_int_equal(PQntuples(r), N);
    for (int i = 0; i < N; i++) {
        lc_event *back = NULL;
        assert_string_equal(PQgetvalue(r, i, 0), "radpipe.instance.stored");
        assert_string_equal(PQgetvalue(r, i, 1), evs[i]->subject);
        const char *p = PQgetvalue(r, i, 2);
        assert_int_equal(lc_event_parse(p, strlen(p), &back, &e), LC_OK);
        assert_string_equal(back->id, evs[i]->id);
        lc_event_free(back);
    }
    PQclear(r);
    assert_int_equal(
        lc_outbox_add_events(f->db, "bad prefix/", LC_TOPIC_INSTANCE_STORED, evs, N, &e),
        LC_ERR_INVALID);
    for (int i = 0; i < N; i++)
        lc_event_free(evs[i]);
}

static cJSON *last_dlq(fx *f)
{
    PGresult *r = NULL;
    lc_err e;
    lc_event *ev = NULL;
    assert_int_equal(lc_db_exec(f->db,
                                "SELECT payload, key FROM outbox WHERE topic = 'radpipe.dlq' "
                                "ORDER BY id DESC LIMIT 1",
                                0, NULL, &r, &e),
                     LC_OK);
    assert_int_equal(PQntuples(r), 1);
    const char *p = PQgetvalue(r, 0, 0);
    if (lc_event_parse(p, strlen(p), &ev, &e) != LC_OK)
        fail_msg("dead letter is not a valid event: %s", e.msg);
    assert_string_equal(ev->type, LC_EV_DLQ);
    cJSON *d = cJSON_Duplicate(ev->data, 1);
    cJSON_AddStringToObject(d, "_row_key", PQgetisnull(r, 0, 1) ? "(null)" : PQgetvalue(r, 0, 1));
    lc_event_free(ev);
    PQclear(r);
    return d;
}

static void test_dead_letters(void **state)
{
    fx *f = *state;
    lc_err e;
    const char text[] = "{\"not\":\"an event\",\"name\":\"Zoë\"}";
    assert_int_equal(lc_db_begin(f->db, &e), LC_OK);
    assert_int_equal(lc_outbox_add_dlq(f->db, "radpipe.", "dicom-indexer",
                                       "radpipe.instance.stored", 3, 42, "1.2.3", 5, text,
                                       strlen(text), "event is not valid", &e),
                     LC_OK);
    assert_int_equal(lc_db_commit(f->db, &e), LC_OK);
    cJSON *d = last_dlq(f);
    assert_string_equal(cJSON_GetObjectItem(d, "payload_encoding")->valuestring, "utf8");
    assert_string_equal(cJSON_GetObjectItem(d, "payload")->valuestring, text);
    assert_int_equal(cJSON_GetObjectItem(d, "partition")->valueint, 3);
    assert_int_equal(cJSON_GetObjectItem(d, "offset")->valueint, 42);
    assert_string_equal(cJSON_GetObjectItem(d, "service")->valuestring, "dicom-indexer");
    assert_string_equal(cJSON_GetObjectItem(d, "key")->valuestring, "1.2.3");
    assert_string_equal(cJSON_GetObjectItem(d, "_row_key")->valuestring, "1.2.3");
    cJSON_Delete(d);

    /* binary bytes (NUL, invalid UTF-8): base64 of exactly those bytes; a binary key is
     * dropped rather than stored mangled */
    const unsigned char bin[] = {0x00, 0xff, 0xfe, 'D', 'I', 'C', 'M', 0xc3, 0x28, 0x80};
    const char badkey[] = {'\xff', '\x00', 'k'};
    assert_int_equal(lc_db_begin(f->db, &e), LC_OK);
    assert_int_equal(lc_outbox_add_dlq(f->db, "radpipe.", "gpu-segmenter", "radpipe.job.segment", 0,
                                       7, badkey, sizeof(badkey), (const char *)bin, sizeof(bin),
                                       "poison", &e),
                     LC_OK);
    assert_int_equal(lc_db_commit(f->db, &e), LC_OK);
    d = last_dlq(f);
    assert_string_equal(cJSON_GetObjectItem(d, "payload_encoding")->valuestring, "base64");
    assert_null(cJSON_GetObjectItem(d, "key"));
    assert_string_equal(cJSON_GetObjectItem(d, "_row_key")->valuestring, "(null)");
    const char *b64 = cJSON_GetObjectItem(d, "payload")->valuestring;
    unsigned char decoded[64];
    int n = EVP_DecodeBlock(decoded, (const unsigned char *)b64, (int)strlen(b64));
    assert_true(n >= (int)sizeof(bin)); /* DecodeBlock pads to a multiple of 3 */
    assert_memory_equal(decoded, bin, sizeof(bin));
    cJSON_Delete(d);

    /* overlong and surrogate encodings are not UTF-8 either */
    const char overlong[] = {'\xc0', '\xaf'}, surrogate[] = {'\xed', '\xa0', '\x80'};
    const char *const cases[] = {overlong, surrogate};
    const size_t lens[] = {sizeof(overlong), sizeof(surrogate)};
    for (int i = 0; i < 2; i++) {
        assert_int_equal(lc_db_begin(f->db, &e), LC_OK);
        assert_int_equal(lc_outbox_add_dlq(f->db, "radpipe.", "t", "radpipe.dlq", 0, 0, NULL, 0,
                                           cases[i], lens[i], "x", &e),
                         LC_OK);
        assert_int_equal(lc_db_commit(f->db, &e), LC_OK);
        d = last_dlq(f);
        assert_string_equal(cJSON_GetObjectItem(d, "payload_encoding")->valuestring, "base64");
        cJSON_Delete(d);
    }
}

int main(void)
{
    lc_log_init("test_outbox", LC_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_transactional_and_notified, setup, teardown),
        cmocka_unit_test_setup_teardown(test_event_keyed_by_subject, setup, teardown),
        cmocka_unit_test_setup_teardown(test_events_in_one_statement, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dead_letters, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
