/*
 * test_jobs.c: the job state machine against a real PostgreSQL: creation with dedupe keys,
 * guarded claims, leases (renewal, loss, expiry), success with artifacts, transient and
 * permanent failures, release on shutdown, and the reconciler's three passes. Every
 * transition must leave the matching events in the outbox, which are parsed and checked.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include "lc/db.h"
#include "lc/event.h"
#include "lc/jobs.h"
#include "lc/log.h"
#include "lc/util.h"
#include "ts.h"

#define PREFIX "radpipe."
#define SOURCE "/radpipe/test"

typedef struct fixture {
    char *url;
    lc_db *db;
    lc_job_worker w;
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    lc_err e;
    f->url = ts_pg_fresh_db("jobs");
    if (!f->url)
        fail_msg("RADPIPE_TEST_PG_URL is not set: run through tests/run.sh");
    assert_int_equal(lc_db_connect(f->url, 10000, NULL, &f->db, &e), LC_OK);
    assert_int_equal(lc_db_migrate(f->db, &e), LC_OK);
    lc_job_worker_init(&f->w, PREFIX, SOURCE, 30, 3);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    lc_db_free(f->db);
    free(f->url);
    free(f);
    return 0;
}

static void sql(lc_db *db, const char *q)
{
    lc_err e;
    if (lc_db_exec(db, q, 0, NULL, NULL, &e) != LC_OK)
        fail_msg("%s: %s", q, e.msg);
}

static char *scalar(lc_db *db, const char *q, const char *param)
{
    PGresult *r = NULL;
    lc_err e;
    const char *p[1] = {param};
    if (lc_db_exec(db, q, param ? 1 : 0, param ? p : NULL, &r, &e) != LC_OK)
        fail_msg("%s: %s", q, e.msg);
    char *v = PQntuples(r) ? strdup(PQgetisnull(r, 0, 0) ? "(null)" : PQgetvalue(r, 0, 0))
                           : strdup("(none)");
    PQclear(r);
    return v;
}

static void expect_state(fixture *f, const char *id, const char *state)
{
    char *s = scalar(f->db, "SELECT state FROM jobs WHERE id = $1", id);
    if (strcmp(s, state) != 0)
        fail_msg("job %s is %s, expected %s", id, s, state);
    free(s);
}

/* Drain the outbox: return the events of one topic in order as a JSON array of
 * {"type","state","kind"}; every payload must parse as a valid radpipe event. */
static cJSON *take_outbox(fixture *f)
{
    PGresult *r = NULL;
    lc_err e;
    assert_int_equal(
        lc_db_exec(f->db, "DELETE FROM outbox RETURNING id, topic, key, payload", 0, NULL, &r, &e),
        LC_OK);
    cJSON *arr = cJSON_CreateArray();
    /* DELETE ... RETURNING does not promise order: sort by id */
    int n = PQntuples(r);
    int *order = calloc((size_t)n + 1, sizeof(int));
    for (int i = 0; i < n; i++)
        order[i] = i;
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (atoll(PQgetvalue(r, order[j], 0)) < atoll(PQgetvalue(r, order[i], 0))) {
                int t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
    for (int k = 0; k < n; k++) {
        int i = order[k];
        const char *payload = PQgetvalue(r, i, 3);
        lc_event *ev = NULL;
        if (lc_event_parse(payload, strlen(payload), &ev, &e) != LC_OK)
            fail_msg("invalid outbox event: %s: %s", e.msg, payload);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "topic", PQgetvalue(r, i, 1));
        cJSON_AddStringToObject(o, "key", PQgetvalue(r, i, 2));
        cJSON_AddStringToObject(o, "type", ev->type);
        cJSON *st = cJSON_GetObjectItem(ev->data, "state");
        cJSON_AddStringToObject(o, "state", cJSON_IsString(st) ? st->valuestring : "");
        cJSON_AddItemToObject(o, "data", cJSON_Duplicate(ev->data, 1));
        cJSON_AddItemToArray(arr, o);
        lc_event_free(ev);
    }
    free(order);
    PQclear(r);
    return arr;
}

static void expect_events(cJSON *evs, const char *const *want, size_t n)
{
    if ((size_t)cJSON_GetArraySize(evs) != n) {
        char *s = cJSON_Print(evs);
        fail_msg("expected %zu events, got %s", n, s);
    }
    for (size_t i = 0; i < n; i++) {
        cJSON *o = cJSON_GetArrayItem(evs, (int)i);
        char got[128];
        snprintf(got, sizeof(got), "%s%s%s", cJSON_GetObjectItem(o, "type")->valuestring,
                 cJSON_GetObjectItem(o, "state")->valuestring[0] ? ":" : "",
                 cJSON_GetObjectItem(o, "state")->valuestring);
        if (strcmp(got, want[i]) != 0)
            fail_msg("event %zu is %s, expected %s", i, got, want[i]);
        assert_string_equal(cJSON_GetObjectItem(o, "key")->valuestring, "1.2.840.1");
    }
}

static void create(fixture *f, const char *kind, const char *dedupe, char id[37], int *created)
{
    lc_err e;
    cJSON *params = cJSON_Parse("{\"algorithm\":\"otsu\"}");
    assert_int_equal(lc_db_begin(f->db, &e), LC_OK);
    assert_int_equal(
        lc_job_create(f->db, PREFIX, SOURCE, kind, "1.2.840.1", params, dedupe, 3, id, created, &e),
        LC_OK);
    assert_int_equal(lc_db_commit(f->db, &e), LC_OK);
    cJSON_Delete(params);
}

static void test_create_and_dedupe(void **state)
{
    fixture *f = *state;
    char id[37], id2[37];
    int created;
    lc_err e;
    create(f, "segment", "study:v1:segment", id, &created);
    assert_int_equal(created, 1);
    assert_true(lc_uuid_valid(id));
    expect_state(f, id, "queued");
    cJSON *evs = take_outbox(f);
    const char *want[] = {"radpipe.job.segment", "radpipe.job.status:queued"};
    expect_events(evs, want, 2);
    cJSON *d = cJSON_GetObjectItem(cJSON_GetArrayItem(evs, 0), "data");
    assert_string_equal(cJSON_GetObjectItem(d, "job_id")->valuestring, id);
    assert_string_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(d, "params"), "algorithm")->valuestring, "otsu");
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(evs, 0), "topic")->valuestring,
                        "radpipe.job.segment");
    cJSON_Delete(evs);

    /* the same dedupe key: nothing new, the existing id is returned */
    create(f, "segment", "study:v1:segment", id2, &created);
    assert_int_equal(created, 0);
    assert_string_equal(id, id2);
    evs = take_outbox(f);
    assert_int_equal(cJSON_GetArraySize(evs), 0);
    cJSON_Delete(evs);

    /* unknown kinds are refused before anything is written */
    assert_int_equal(
        lc_job_create(f->db, PREFIX, SOURCE, "bake", "1.2", NULL, NULL, 3, id2, &created, &e),
        LC_ERR_INVALID);
}

static void test_claim_succeed(void **state)
{
    fixture *f = *state;
    char id[37];
    int created;
    lc_job *job = NULL, *job2 = NULL;
    lc_err e;
    create(f, "upload", NULL, id, &created);
    cJSON_Delete(take_outbox(f));

    assert_int_equal(lc_job_claim(f->db, &f->w, id, &job, &e), LC_OK);
    assert_string_equal(job->kind, "upload");
    assert_string_equal(job->study_uid, "1.2.840.1");
    assert_int_equal(job->attempts, 1);
    assert_int_equal(job->max_attempts, 3);
    expect_state(f, id, "running");

    /* a second claim (a redelivered event, another worker) is refused */
    lc_job_worker other;
    lc_job_worker_init(&other, PREFIX, SOURCE, 30, 3);
    assert_string_not_equal(other.owner, f->w.owner);
    assert_int_equal(lc_job_claim(f->db, &other, id, &job2, &e), LC_ERR_CONFLICT);
    assert_null(job2);
    assert_non_null(strstr(e.msg, "it is running"));
    assert_int_equal(lc_job_renew(f->db, &other, id, &e), LC_ERR_CONFLICT);
    assert_int_equal(lc_job_renew(f->db, &f->w, id, &e), LC_OK);

    cJSON *p = cJSON_Parse("{\"done\":1,\"total\":4,\"unit\":\"instances\"}");
    assert_int_equal(lc_job_progress(f->db, &f->w, job, p, &e), LC_OK);
    cJSON_Delete(p);
    char *prog = scalar(f->db, "SELECT progress->>'total' FROM jobs WHERE id = $1", id);
    assert_string_equal(prog, "4");
    free(prog);

    assert_int_equal(lc_job_add_artifact(f->db, id, "mask.raw", "results/x/mask.raw", 1024,
                                         "application/octet-stream", &e),
                     LC_OK);
    assert_int_equal(lc_job_add_artifact(f->db, id, "mask.raw", "results/x/mask.raw", 2048,
                                         "application/octet-stream", &e),
                     LC_OK); /* replaced, not duplicated */
    cJSON *result = cJSON_Parse("{\"objects\":4}");
    assert_int_equal(lc_job_succeed(f->db, &other, job, result, &e), LC_ERR_CONFLICT);
    assert_int_equal(lc_job_succeed(f->db, &f->w, job, result, &e), LC_OK);
    cJSON_Delete(result);
    expect_state(f, id, "succeeded");
    char *lease = scalar(f->db, "SELECT lease_owner FROM jobs WHERE id = $1", id);
    assert_string_equal(lease, "(null)");
    free(lease);
    /* finished jobs cannot be claimed or finished again */
    assert_int_equal(lc_job_claim(f->db, &f->w, id, &job2, &e), LC_ERR_CONFLICT);
    assert_int_equal(lc_job_succeed(f->db, &f->w, job, NULL, &e), LC_ERR_CONFLICT);

    cJSON *evs = take_outbox(f);
    const char *want[] = {"radpipe.job.status:running", "radpipe.job.status:running",
                          "radpipe.job.status:succeeded"};
    expect_events(evs, want, 3);
    cJSON *arts =
        cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetArrayItem(evs, 2), "data"), "artifacts");
    assert_int_equal(cJSON_GetArraySize(arts), 1);
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(arts, 0), "size")->valueint, 2048);
    cJSON_Delete(evs);
    lc_job_free(job);

    char bogus[37];
    lc_uuid_v4(bogus);
    assert_int_equal(lc_job_claim(f->db, &f->w, bogus, &job2, &e), LC_ERR_NOT_FOUND);
    assert_int_equal(lc_job_claim(f->db, &f->w, "x'; DROP TABLE jobs;--", &job2, &e),
                     LC_ERR_INVALID);
}

static void test_fail_retry_dead(void **state)
{
    fixture *f = *state;
    char id[37];
    int created;
    lc_job *job = NULL;
    lc_err e;
    lc_job_reconcile_stats st;
    create(f, "segment", NULL, id, &created);

    for (int attempt = 1; attempt <= 3; attempt++) {
        assert_int_equal(lc_job_claim(f->db, &f->w, id, &job, &e), LC_OK);
        assert_int_equal(job->attempts, attempt);
        assert_int_equal(lc_job_fail(f->db, &f->w, job, "store unreachable", 1, &e), LC_OK);
        lc_job_free(job);
        if (attempt < 3) {
            expect_state(f, id, "failed");
            char *err = scalar(f->db, "SELECT error FROM jobs WHERE id = $1", id);
            assert_string_equal(err, "store unreachable");
            free(err);
            /* not due yet: the reconciler leaves it */
            assert_int_equal(lc_jobs_reconcile(f->db, PREFIX, SOURCE, "segment", 60, &st, &e),
                             LC_OK);
            assert_int_equal(st.requeued_retry, 0);
            expect_state(f, id, "failed");
            sql(f->db, "UPDATE jobs SET retry_at = now() - interval '1 second'");
            cJSON_Delete(take_outbox(f));
            /* another kind's reconciler does not touch it */
            assert_int_equal(lc_jobs_reconcile(f->db, PREFIX, SOURCE, "upload", 60, &st, &e),
                             LC_OK);
            assert_int_equal(st.requeued_retry, 0);
            assert_int_equal(lc_jobs_reconcile(f->db, PREFIX, SOURCE, "segment", 60, &st, &e),
                             LC_OK);
            assert_int_equal(st.requeued_retry, 1);
            expect_state(f, id, "queued");
            cJSON *evs = take_outbox(f);
            const char *want[] = {"radpipe.job.segment", "radpipe.job.status:queued"};
            expect_events(evs, want, 2);
            cJSON_Delete(evs);
        }
    }
    /* the third transient failure exhausts max_attempts 3 */
    expect_state(f, id, "dead");

    /* a permanent error is dead at once */
    create(f, "segment", NULL, id, &created);
    assert_int_equal(lc_job_claim(f->db, &f->w, id, &job, &e), LC_OK);
    assert_int_equal(lc_job_fail(f->db, &f->w, job, "series has mixed orientations", 0, &e), LC_OK);
    lc_job_free(job);
    expect_state(f, id, "dead");
    cJSON_Delete(take_outbox(f));
}

static void test_release(void **state)
{
    fixture *f = *state;
    char id[37];
    int created;
    lc_job *job = NULL;
    lc_err e;
    create(f, "upload", NULL, id, &created);
    assert_int_equal(lc_job_claim(f->db, &f->w, id, &job, &e), LC_OK);
    cJSON_Delete(take_outbox(f));
    assert_int_equal(lc_job_release(f->db, &f->w, job, &e), LC_OK);
    expect_state(f, id, "queued");
    char *att = scalar(f->db, "SELECT attempts FROM jobs WHERE id = $1", id);
    assert_string_equal(att, "0"); /* a released attempt does not count */
    free(att);
    cJSON *evs = take_outbox(f);
    const char *want[] = {"radpipe.job.upload", "radpipe.job.status:queued"};
    expect_events(evs, want, 2);
    cJSON_Delete(evs);
    lc_job_free(job);
}

static void test_reconcile_expired_and_republish(void **state)
{
    fixture *f = *state;
    char id[37], id2[37];
    int created;
    lc_job *job = NULL;
    lc_err e;
    lc_job_reconcile_stats st;
    create(f, "upload", NULL, id, &created);
    create(f, "upload", NULL, id2, &created);
    assert_int_equal(lc_job_claim(f->db, &f->w, id, &job, &e), LC_OK);
    cJSON_Delete(take_outbox(f));

    /* a worker was SIGKILLed: its lease runs out */
    sql(f->db, "UPDATE jobs SET lease_expires_at = now() - interval '1 second' "
               "WHERE state = 'running'");
    assert_int_equal(lc_jobs_reconcile(f->db, PREFIX, SOURCE, NULL, 3600, &st, &e), LC_OK);
    assert_int_equal(st.requeued_expired, 1);
    assert_int_equal(st.republished, 0);
    expect_state(f, id, "queued");
    char *err = scalar(f->db, "SELECT error FROM jobs WHERE id = $1", id);
    assert_non_null(strstr(err, "lease expired"));
    free(err);
    /* the old owner can no longer finish it */
    assert_int_equal(lc_job_succeed(f->db, &f->w, job, NULL, &e), LC_ERR_CONFLICT);
    lc_job_free(job);
    cJSON *evs = take_outbox(f);
    const char *want[] = {"radpipe.job.upload", "radpipe.job.status:queued"};
    expect_events(evs, want, 2);
    cJSON_Delete(evs);

    /* queued jobs whose event is older than the threshold are published again */
    sql(f->db, "UPDATE jobs SET published_at = now() - interval '10 minutes'");
    assert_int_equal(lc_jobs_reconcile(f->db, PREFIX, SOURCE, "upload", 60, &st, &e), LC_OK);
    assert_int_equal(st.republished, 2);
    assert_int_equal(lc_jobs_reconcile(f->db, PREFIX, SOURCE, "upload", 60, &st, &e), LC_OK);
    assert_int_equal(st.republished, 0); /* published_at was bumped */
    evs = take_outbox(f);
    assert_int_equal(cJSON_GetArraySize(evs), 4);
    cJSON_Delete(evs);

    /* an expired lease on the last attempt makes the job dead */
    sql(f->db, "UPDATE jobs SET max_attempts = 1");
    assert_int_equal(lc_job_claim(f->db, &f->w, id2, &job, &e), LC_OK);
    sql(f->db, "UPDATE jobs SET lease_expires_at = now() - interval '1 second' "
               "WHERE state = 'running'");
    assert_int_equal(lc_jobs_reconcile(f->db, PREFIX, SOURCE, NULL, 3600, &st, &e), LC_OK);
    assert_int_equal(st.dead, 1);
    expect_state(f, id2, "dead");
    lc_job_free(job);
    cJSON_Delete(take_outbox(f));
}

static void test_lease_keeper(void **state)
{
    fixture *f = *state;
    char id[37];
    int created;
    lc_job *job = NULL;
    lc_job_lease *lease = NULL;
    lc_err e;
    lc_job_worker w;
    lc_job_worker_init(&w, PREFIX, SOURCE, 3, 3); /* renews every second */
    create(f, "segment", NULL, id, &created);
    assert_int_equal(lc_job_claim(f->db, &w, id, &job, &e), LC_OK);
    char *before = scalar(f->db, "SELECT lease_expires_at FROM jobs WHERE id = $1", id);
    assert_int_equal(lc_job_lease_start(f->url, &w, id, &lease, &e), LC_OK);
    int renewed = 0;
    for (int i = 0; i < 60 && !renewed; i++) {
        usleep(100 * 1000);
        char *now = scalar(f->db, "SELECT lease_expires_at FROM jobs WHERE id = $1", id);
        renewed = strcmp(now, before) != 0;
        free(now);
    }
    free(before);
    assert_true(renewed);
    assert_false(lc_job_lease_lost(lease));

    /* a cancel (or the reconciler) takes the job away: the keeper notices */
    sql(f->db, "UPDATE jobs SET state = 'cancelled', lease_owner = NULL");
    for (int i = 0; i < 50 && !lc_job_lease_lost(lease); i++)
        usleep(100 * 1000);
    assert_true(lc_job_lease_lost(lease));
    lc_job_lease_stop(lease);
    lc_job_lease_stop(NULL);
    lc_job_free(job);
    cJSON_Delete(take_outbox(f));
}

int main(void)
{
    lc_log_init("test_jobs", LC_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_create_and_dedupe, setup, teardown),
        cmocka_unit_test_setup_teardown(test_claim_succeed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fail_retry_dead, setup, teardown),
        cmocka_unit_test_setup_teardown(test_release, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reconcile_expired_and_republish, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lease_keeper, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
