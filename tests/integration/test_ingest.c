/*
 * test_ingest.c: the indexer's ingest paths on real components (radpipe-stack --no-services:
 * PostgreSQL and the dev broker; the test runs the indexer itself to kill it):
 *  - 2,000 generated instances announced on Kafka; the indexer is SIGKILLed in the middle of
 *    the ingest and restarted: every instance is indexed exactly once (one row each, never
 *    replaced, one processed event each, exact counts, nothing quarantined);
 *  - DCMTK's storescu sends a series to storescp writing into the spool folder the indexer
 *    watches (RADPIPE_SPOOL_WATCH_DIR), as compose.yml's dicom-receiver does: the series is
 *    indexed, the spool emptied; a file in a sub-folder carries the folder's name as source;
 *    the malformed corpus files dropped into the spool are quarantined with a reason while
 *    the indexer stays up, and a valid file after them is still indexed.
 * Instances are generated from a real MR slice by rewriting its UIDs in place (same lengths),
 * thousands per second, instead of one dcmodify run per file.
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
#include "lc/db.h"
#include "lc/event.h"
#include "lc/kafka.h"
#include "lc/log.h"
#include "lc/store.h"
#include "lc/util.h"
#include "ts.h"
#include "ts_index.h"
#include "ts_proc.h"

#define NSTUDIES 4
#define NPER     500 /* instances per study: 2,000 in all */

static ts_stack st;
static lc_db *db;
static lc_store *store;

static char *xprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xprintf(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    assert_true(n >= 0);
    return s;
}

static pid_t start_indexer(const char *const extra[])
{
    const char *env[16];
    int n = 0;
    env[n++] = "RADPIPE_STUDY_QUIET_SECONDS=86400";
    env[n++] = "RADPIPE_KAFKA_OPTIONS=session.timeout.ms=6000";
    env[n++] = "RADPIPE_DRAIN_SECONDS=1";
    for (const char *const *e = extra; e && *e; e++)
        env[n++] = *e;
    env[n] = NULL;
    char **full = ts_service_env(&st, 0, env);
    char *bin = ts_bin("dicom-indexer");
    char *argv[] = {bin, NULL};
    pid_t pid = ts_spawn(argv, (const char *const *)full, st.log);
    free(bin);
    ts_env_free(full);
    assert_true(pid > 0);
    return pid;
}

static void stop_clean(pid_t pid)
{
    kill(pid, SIGTERM);
    int status = ts_wait(pid, 30000);
    if (status == -1) {
        ts_kill(pid);
        ts_stack_dump_log(&st);
        fail_msg("the indexer did not exit within 30 s of SIGTERM");
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        ts_stack_dump_log(&st);
        fail_msg("the indexer exited with status 0x%x", status);
    }
}

static char *scalar(const char *sql, const char *param)
{
    char *v = ts_db_value(db, sql, param);
    if (!v)
        fail_msg("%s failed", sql);
    return v;
}

static long long scalar_ll(const char *sql, const char *param)
{
    char *v = scalar(sql, param);
    long long n = atoll(v);
    free(v);
    return n;
}

static void expect_sql(const char *sql, const char *param, const char *want, int timeout_s)
{
    if (!ts_db_wait_value(db, sql, param, want, timeout_s * 1000)) {
        char got[256];
        char *v = scalar(sql, param);
        lc_strlcpy(got, v, sizeof(got));
        free(v);
        ts_stack_dump_log(&st);
        fail_msg("%s [%s]: got \"%s\", expected \"%s\" within %d s", sql, param ? param : "", got,
                 want, timeout_s);
    }
}

static int setup(void **state)
{
    (void)state;
    static const char *const args[] = {"--no-services", NULL};
    lc_err e;
    lc_log_init("test_ingest", LC_LOG_WARN);
    if (ts_stack_start(&st, args, NULL, 120000) != 0)
        fail_msg("the stack did not start");
    assert_int_equal(lc_db_connect(st.database_url, 30000, NULL, &db, &e), LC_OK);
    assert_int_equal(lc_db_migrate(db, &e), LC_OK);
    char *url = xprintf("file://%s/objects", st.var);
    assert_int_equal(lc_store_open(url, &store, &e), LC_OK);
    free(url);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    lc_store_free(store);
    lc_db_free(db);
    int status = ts_stack_stop(&st, SIGTERM, 60000);
    assert_true(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ts_stack_free(&st);
    return 0;
}

/* ---- a fast generator: a template's UIDs rewritten in place ---------------------------------- */

typedef struct tmpl {
    char *bytes;
    size_t len;
    size_t off[5], vlen[5]; /* media SOP (0002,0003), SOP, study, series, InstanceNumber */
} tmpl;

static const uint32_t kGenTags[5] = {0x00020003, 0x00080018, 0x0020000D, 0x0020000E, 0x00200013};

/* The value offsets of kGenTags in an explicit VR little endian Part 10 file. */
static void tmpl_load(tmpl *t, const char *path)
{
    t->bytes = ts_read_file(path, &t->len);
    assert_non_null(t->bytes);
    assert_true(t->len > 132 && memcmp(t->bytes + 128, "DICM", 4) == 0);
    const unsigned char *p = (const unsigned char *)t->bytes;
    for (size_t pos = 132; pos + 8 <= t->len;) {
        const uint32_t tag =
            (uint32_t)(p[pos] | p[pos + 1] << 8) << 16 | (p[pos + 2] | p[pos + 3] << 8);
        const char *vr = t->bytes + pos + 4;
        size_t hdr = 8, vl = (size_t)(p[pos + 6] | p[pos + 7] << 8);
        if (!memcmp(vr, "OB", 2) || !memcmp(vr, "OW", 2) || !memcmp(vr, "SQ", 2) ||
            !memcmp(vr, "UN", 2) || !memcmp(vr, "UT", 2) || !memcmp(vr, "OF", 2)) {
            hdr = 12;
            vl = (size_t)p[pos + 8] | (size_t)p[pos + 9] << 8 | (size_t)p[pos + 10] << 16 |
                 (size_t)p[pos + 11] << 24;
        }
        for (int k = 0; k < 5; k++)
            if (tag == kGenTags[k]) {
                t->off[k] = pos + hdr;
                t->vlen[k] = vl;
            }
        if (tag == 0x7FE00010u || vl == 0xFFFFFFFFu)
            break;
        pos += hdr + vl;
    }
    for (int k = 0; k < 5; k++)
        assert_true(t->off[k] > 0 && t->vlen[k] >= 2);
}

/* A UID of exactly len characters: "2.25." and digits (no leading zero), from id. */
static void uid_of(char *out, size_t len, unsigned long long id)
{
    char digits[80];
    snprintf(digits, sizeof(digits), "1%0*llu", (int)(len - 6), id);
    snprintf(out, len + 1, "2.25.%s", digits);
}

/* Write instance n of study s (series s.1) to path; its UIDs come back. */
static void gen_file(tmpl *t, const char *path, int s, int n, char *study, char *series, char *sop)
{
    char v[80];
    uid_of(study, t->vlen[2], 1000000ULL * (unsigned long long)(s + 1));
    uid_of(series, t->vlen[3], 2000000ULL * (unsigned long long)(s + 1));
    uid_of(sop, t->vlen[1], 3000000ULL * (unsigned long long)(s + 1) + (unsigned long long)n);
    memcpy(t->bytes + t->off[1], sop, t->vlen[1]);
    memcpy(t->bytes + t->off[0], sop, t->vlen[0] < t->vlen[1] ? t->vlen[0] : t->vlen[1]);
    memcpy(t->bytes + t->off[2], study, t->vlen[2]);
    memcpy(t->bytes + t->off[3], series, t->vlen[3]);
    snprintf(v, sizeof(v), "%-*d", (int)t->vlen[4], n + 1);
    memcpy(t->bytes + t->off[4], v, t->vlen[4]);
    assert_int_equal(ts_write_file(path, t->bytes, t->len), 0);
}

/* ---- 2,000 instances, SIGKILL in the middle -------------------------------------------------- */

static void produce(lc_kafka_producer *p, char **payloads, char **keys, size_t from, size_t to)
{
    lc_kafka_out *m = calloc(to - from, sizeof(*m));
    char topic[128];
    assert_int_equal(lc_topic_name("radpipe.", LC_TOPIC_INSTANCE_STORED, topic, sizeof(topic)),
                     LC_OK);
    for (size_t i = from; i < to; i++)
        m[i - from] = (lc_kafka_out){.topic = topic,
                                     .key = keys[i],
                                     .key_len = strlen(keys[i]),
                                     .payload = payloads[i],
                                     .len = strlen(payloads[i])};
    lc_err e = {0};
    if (lc_kafka_produce_batch(p, m, to - from, 30000, &e) != LC_OK)
        fail_msg("produce: %s", lc_err_msg(&e));
    free(m);
}

static void test_sigkill_mid_ingest(void **state)
{
    (void)state;
    const size_t total = NSTUDIES * NPER;
    tmpl t = {0};
    char *src = ts_data("mr-small/MR_small.dcm");
    tmpl_load(&t, src);
    free(src);
    char *dir = xprintf("%s/gen", st.var);
    mkdir(dir, 0755);
    char **payloads = calloc(total, sizeof(char *)), **keys = calloc(total, sizeof(char *));
    int64_t t0 = lc_now_ms();
    for (int s = 0; s < NSTUDIES; s++) {
        for (int n = 0; n < NPER; n++) {
            char study[80], series[80], sop[80], sha[65];
            char *path = xprintf("%s/%d-%d.dcm", dir, s, n);
            gen_file(&t, path, s, n, study, series, sop);
            char *key = xprintf("instances/%s/%s/%s.dcm", study, series, sop);
            lc_err e = {0};
            if (lc_store_put_file(store, key, path, LC_STORE_MOVE, &e) != LC_OK)
                fail_msg("store: %s", lc_err_msg(&e));
            lc_sha256_hex(t.bytes, t.len, sha);
            cJSON *d = cJSON_CreateObject();
            char *url = xprintf("%s/%s", lc_store_url(store), key);
            cJSON_AddStringToObject(d, "study_instance_uid", study);
            cJSON_AddStringToObject(d, "series_instance_uid", series);
            cJSON_AddStringToObject(d, "sop_instance_uid", sop);
            cJSON_AddStringToObject(d, "url", url);
            cJSON_AddNumberToObject(d, "size", (double)t.len);
            cJSON_AddStringToObject(d, "sha256", sha);
            lc_event *ev = NULL;
            assert_int_equal(
                lc_event_new(LC_EV_INSTANCE_STORED, "/radpipe/test", study, d, &ev, &e), LC_OK);
            size_t i = (size_t)(s * NPER + n);
            payloads[i] = lc_event_to_json(ev);
            keys[i] = strdup(study);
            lc_event_free(ev);
            free(url);
            free(key);
            free(path);
        }
    }
    printf("generated %zu instances in %lld ms\n", total, (long long)(lc_now_ms() - t0));

    lc_kafka_conf kc = {.brokers = st.brokers, .topic_prefix = "radpipe.", .client_id = "test"};
    lc_kafka_producer *p = NULL;
    lc_err e = {0};
    assert_int_equal(lc_kafka_producer_new(&kc, &p, &e), LC_OK);
    /* the first half, then a kill while the indexer works through it */
    produce(p, payloads, keys, 0, total / 2);
    static const char *const env[] = {"RADPIPE_INDEX_BATCH_MAX=100", NULL};
    pid_t idx = start_indexer(env);
    long long seen = 0;
    for (int i = 0; i < 6000 && (seen = scalar_ll("SELECT count(*) FROM instances", NULL)) < 200;
         i++)
        usleep(10 * 1000);
    kill(idx, SIGKILL);
    waitpid(idx, NULL, 0);
    long long at_kill = scalar_ll("SELECT count(*) FROM instances", NULL);
    printf("SIGKILL with %lld of %zu instances indexed (%zu announced)\n", at_kill, total,
           total / 2);
    assert_true(at_kill >= 200 && at_kill < (long long)total);
    /* the rest arrives while it is down; a new indexer takes over the uncommitted batches */
    produce(p, payloads, keys, total / 2, total);
    lc_kafka_producer_free(p, 5000);
    idx = start_indexer(env);
    char want[32];
    snprintf(want, sizeof(want), "%zu", total);
    expect_sql("SELECT count(*) FROM instances", NULL, want, 300);
    stop_clean(idx);

    /* exactly once: one row each, never replaced, one processed event each, exact counts */
    assert_int_equal(scalar_ll("SELECT count(*) FROM instances WHERE replaced_count <> 0", NULL),
                     0);
    assert_int_equal(scalar_ll("SELECT count(DISTINCT sop_uid) FROM instances", NULL),
                     (long long)total);
    assert_int_equal(scalar_ll("SELECT count(*) FROM processed_events"
                               " WHERE consumer = 'dicom-indexer'",
                               NULL),
                     (long long)total);
    assert_int_equal(scalar_ll("SELECT count(*) FROM quarantine", NULL), 0);
    assert_int_equal(scalar_ll("SELECT count(*) FROM instance_metadata", NULL), (long long)total);
    char *counts = scalar("SELECT string_agg(num_series || ':' || num_instances, ',')"
                          " FROM studies",
                          NULL);
    char expect[128] = "";
    for (int s = 0; s < NSTUDIES; s++)
        snprintf(expect + strlen(expect), sizeof(expect) - strlen(expect), "%s1:%d", s ? "," : "",
                 NPER);
    assert_string_equal(counts, expect);
    free(counts);
    assert_int_equal(scalar_ll("SELECT sum(num_instances) FROM series", NULL), (long long)total);
    for (size_t i = 0; i < total; i++) {
        free(payloads[i]);
        free(keys[i]);
    }
    free(payloads);
    free(keys);
    free(t.bytes);
    ts_rmrf(dir);
    free(dir);
}

/* ---- storescu -> storescp -> spool -> indexer ----------------------------------------------- */

static pid_t start_storescp(const char *spool, int port, const char *log)
{
    char portbuf[16];
    snprintf(portbuf, sizeof(portbuf), "%d", port);
    /* the arguments of compose.yml's dicom-receiver */
    char *argv[] = {"/usr/bin/storescp",  "+xa",         "--aetitle", "RADPIPE",
                    "--output-directory", (char *)spool, portbuf,     NULL};
    pid_t pid = ts_spawn(argv, NULL, log);
    assert_true(pid > 0);
    for (int i = 0; i < 100; i++) { /* wait until it answers a C-ECHO */
        char *cmd = xprintf("echoscu -aec RADPIPE 127.0.0.1 %d >/dev/null 2>&1", port);
        int rc = ts_run(cmd, NULL);
        free(cmd);
        if (rc == 0)
            return pid;
        usleep(100 * 1000);
    }
    ts_kill(pid);
    fail_msg("storescp did not answer C-ECHO");
    return -1;
}

static int spool_empty(const char *dir)
{
    char *cmd = xprintf("find '%s' -type f ! -name '.*' | wc -l", dir);
    char *out = NULL;
    ts_run(cmd, &out);
    int n = out ? atoi(out) : -1;
    free(out);
    free(cmd);
    return n == 0;
}

static void test_storescu_to_spool(void **state)
{
    (void)state;
    char *spool = xprintf("%s/dicom-spool", st.var), *log = xprintf("%s/storescp.log", st.var);
    mkdir(spool, 0755);
    int port = ts_free_port();
    pid_t scp = start_storescp(spool, port, log);
    char *env0 = xprintf("RADPIPE_SPOOL_WATCH_DIR=%s", spool);
    const char *const env[] = {env0, NULL};
    pid_t idx = start_indexer(env);

    /* a series over DICOM (JPEG lossless: storescu proposes it with -xs) */
    char *series = ts_test_series();
    char *cmd = xprintf("storescu -xs -aet MODALITY1 -aec RADPIPE 127.0.0.1 %d '%s'/* "
                        ">>'%s' 2>&1",
                        port, series, log);
    assert_int_equal(ts_run(cmd, NULL), 0);
    free(cmd);
    char **files = ts_list_files(series);
    size_t nseries = 0;
    while (files[nseries])
        nseries++;
    char *study_uid = NULL;
    {
        char *c2 = xprintf("dcmdump -q +P 0020,000d '%s'", files[0]), *out = NULL;
        assert_int_equal(ts_run(c2, &out), 0);
        char *l = strchr(out, '['), *r = l ? strchr(l, ']') : NULL;
        assert_non_null(r);
        study_uid = strndup(l + 1, (size_t)(r - l - 1));
        free(out);
        free(c2);
    }
    char want[32];
    snprintf(want, sizeof(want), "%zu", nseries);
    expect_sql("SELECT count(*) FROM instances WHERE study_uid = $1", study_uid, want, 120);
    for (int i = 0; i < 100 && !spool_empty(spool); i++)
        usleep(100 * 1000);
    assert_true(spool_empty(spool));
    /* stored under instances/<study>/<series>/<sop>.dcm, whole */
    assert_int_equal(scalar_ll("SELECT count(*) FROM instances WHERE study_uid = $1"
                               " AND store_key LIKE 'instances/' || study_uid || '/%'",
                               study_uid),
                     (long long)nseries);

    /* a file in a sub-folder: the folder names the source (a calling AE title) */
    char *ae = xprintf("%s/CT_SCANNER_7", spool);
    mkdir(ae, 0755);
    char *ct = ts_data("ct/philips-head-phantom-I100");
    cmd = xprintf("cp '%s' '%s/.staging' && mv '%s/.staging' '%s/I100'", ct, ae, ae, ae);
    assert_int_equal(ts_run(cmd, NULL), 0);
    free(cmd);
    expect_sql("SELECT count(*) FROM instances WHERE store_key LIKE 'instances/%' AND"
               " sop_class_uid = '1.2.840.10008.5.1.4.1.1.2'",
               NULL, "1", 60);

    /* the malformed corpus (and a text file): quarantined, the indexer stays up, and a valid
     * file dropped after them is still indexed */
    const char *samples = ts_samples_dir();
    long long before = scalar_ll("SELECT count(*) FROM quarantine", NULL);
    int nbad = 0;
    char *junk = xprintf("%s/notes.txt", spool);
    assert_int_equal(ts_write_file(junk, "not DICOM at all\n", 17), 0);
    nbad++;
    if (samples) {
        char *mdir = xprintf("%s/malformed", samples);
        char **bad = ts_list_files(mdir);
        for (char **b = bad; *b; b++) {
            const char *base = strrchr(*b, '/') + 1;
            /* the ones the parser rejects (test_idx_corpus lists them) */
            static const char *const rejected[] = {
                "empty_charset_LEI.dcm", "fo-dicom_GH179B.dcm",
                "fo-dicom_GH220.dcm",    "fo-dicom_GH223.dcm",
                "fo-dicom_GH487.dcm",    "meta_missing_tsyntax.dcm",
                "no_meta.dcm",           "no_meta_group_length.dcm",
                "rtplan_truncated.dcm",  NULL};
            int take = 0;
            for (const char *const *r = rejected; *r; r++)
                take |= strcmp(*r, base) == 0;
            if (!take)
                continue;
            char *dst = xprintf("%s/bad-%s", spool, base);
            size_t len = 0;
            char *bytes = ts_read_file(*b, &len);
            assert_int_equal(ts_write_file(dst, bytes, len), 0);
            free(bytes);
            free(dst);
            nbad++;
        }
        ts_strv_free(bad);
        free(mdir);
    }
    snprintf(want, sizeof(want), "%lld", before + nbad);
    expect_sql("SELECT count(*) FROM quarantine WHERE source LIKE 'spool:%'", NULL, want, 60);
    assert_int_equal(scalar_ll("SELECT count(*) FROM quarantine WHERE source LIKE 'spool:%'"
                               " AND reason LIKE 'not a readable DICOM file: %'"
                               " AND store_key LIKE 'quarantine/%'",
                               NULL),
                     before + nbad);
    assert_int_equal(kill(idx, 0), 0); /* still up */
    /* the dead letters are on the broker (the indexer's relay published them) */
    char *mr = ts_data("mr-small/MR_small.dcm");
    char *dst = xprintf("%s/after-the-bad-ones.dcm", spool);
    size_t len = 0;
    char *bytes = ts_read_file(mr, &len);
    assert_int_equal(ts_write_file(dst, bytes, len), 0);
    free(bytes);
    char *mr_sop = NULL;
    {
        char *c2 = xprintf("dcmdump -q +P 0008,0018 '%s'", mr), *out = NULL;
        assert_int_equal(ts_run(c2, &out), 0);
        char *l = strchr(out, '['), *r = l ? strchr(l, ']') : NULL;
        assert_non_null(r);
        mr_sop = strndup(l + 1, (size_t)(r - l - 1));
        free(out);
        free(c2);
    }
    expect_sql("SELECT count(*) FROM instances WHERE sop_uid = $1 AND rows = 64", mr_sop, "1", 60);
    free(mr_sop);
    for (int i = 0; i < 100 && !spool_empty(spool); i++)
        usleep(100 * 1000);
    assert_true(spool_empty(spool));

    /* the sources the events carried */
    char *dump = xprintf("%s/stored.jsonl", st.var);
    const char *const topics[] = {"radpipe.instance.stored", NULL};
    int n = ts_kafka_dump(st.brokers, topics, dump, 2000, 30000);
    assert_true(n >= (int)nseries + 2);
    char *lines = ts_read_file(dump, NULL);
    assert_non_null(strstr(lines, "\"source\":{\"kind\":\"spool\",\"name\":\"spool\"}"));
    assert_non_null(strstr(lines, "\"source\":{\"kind\":\"spool\",\"name\":\"CT_SCANNER_7\"}"));
    free(lines);
    free(dump);

    stop_clean(idx);
    ts_kill(scp);
    free(mr);
    free(dst);
    free(junk);
    free(ct);
    free(ae);
    free(study_uid);
    ts_strv_free(files);
    free(series);
    free(env0);
    free(spool);
    free(log);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sigkill_mid_ingest),
        cmocka_unit_test(test_storescu_to_spool),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
