/*
 * ingest_feed.c: the timed part of radpipe's ingest benchmarks, two ways:
 *  - events: reads a gen_ct manifest whose objects are already in the file:// store, builds
 *    one radpipe.instance.stored event per line (as radpipe-notify or the gateway would, with
 *    the SHA-256 and size of the stored bytes), publishes them all with the services'
 *    idempotent producer and polls PostgreSQL until every instance row is committed. Prints
 *    "events=N publish_ms=P indexed_ms=T rate=R", T from the first event sent to the poll
 *    that saw the last row.
 *  - run: runs a command (a load client posting instances to the gateway), waits for it to
 *    exit, then polls until COUNT more instance rows are committed. Prints
 *    "instances=N indexed_ms=T rate=R", T from the command's start. No query runs while the
 *    command does (the rows cannot all be there before the last answer): a count(*) every
 *    10 ms over the 10,000-row index of bench_dicomweb.sh took PostgreSQL CPU from the
 *    system it measured.
 * Polls every 10 ms on one connection; a quarantined instance fails the run. Single-threaded
 * (librdkafka has its own threads).
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#include "lc/db.h"
#include "lc/event.h"
#include "lc/kafka.h"
#include "lc/log.h"
#include "lc/util.h"

#define POLL_MS       10
#define MAX_MANIFEST  (256 * 1024 * 1024)
#define PRODUCE_MS    120000
#define MANIFEST_COLS 7

typedef struct line {
    char *col[MANIFEST_COLS]; /* borrowed from the manifest text */
} line;

/* Split the manifest text in place; *out (caller frees) gets the lines. */
static int split_manifest(char *text, line **out, size_t *n)
{
    size_t cap = 1024, k = 0;
    line *v = malloc(cap * sizeof(*v));
    char *save = NULL;
    if (!v)
        return -1;
    for (char *l = strtok_r(text, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        if (k == cap) {
            line *nv = realloc(v, 2 * cap * sizeof(*v));
            if (!nv)
                goto fail;
            v = nv;
            cap *= 2;
        }
        char *p = l;
        for (int c = 0; c < MANIFEST_COLS; c++) {
            v[k].col[c] = p;
            char *tab = strchr(p, '\t');
            if (c < MANIFEST_COLS - 1) {
                if (!tab)
                    goto fail;
                *tab = '\0';
                p = tab + 1;
            }
        }
        k++;
    }
    *out = v;
    *n = k;
    return 0;
fail:
    free(v);
    return -1;
}

/* The instance.stored event of one manifest line (caller frees). */
static char *event_of(const line *l, const char *store_url, const char *received_at)
{
    char *url = NULL, *json = NULL;
    lc_event *ev = NULL;
    lc_err e = {0};
    if (asprintf(&url, "%s/%s", store_url, l->col[1]) < 0)
        return NULL;
    cJSON *d = cJSON_CreateObject(), *src = NULL;
    if (!d || !cJSON_AddStringToObject(d, "study_instance_uid", l->col[2]) ||
        !cJSON_AddStringToObject(d, "series_instance_uid", l->col[3]) ||
        !cJSON_AddStringToObject(d, "sop_instance_uid", l->col[4]) ||
        !cJSON_AddStringToObject(d, "url", url) ||
        !cJSON_AddNumberToObject(d, "size", strtod(l->col[5], NULL)) ||
        !cJSON_AddStringToObject(d, "sha256", l->col[6]) ||
        !(src = cJSON_AddObjectToObject(d, "source")) ||
        !cJSON_AddStringToObject(src, "kind", "kafka") ||
        !cJSON_AddStringToObject(src, "name", "bench") ||
        !cJSON_AddStringToObject(d, "received_at", received_at)) {
        cJSON_Delete(d);
        free(url);
        return NULL;
    }
    free(url);
    if (lc_event_new(LC_EV_INSTANCE_STORED, "/radpipe/bench", l->col[2], d, &ev, &e) == LC_OK)
        json = lc_event_to_json(ev);
    lc_event_free(ev);
    return json;
}

/* Rows in instances and in quarantine now; -1 on failure. */
static int counts(lc_db *db, long long *inst, long long *quar)
{
    static const char sql[] =
        "SELECT (SELECT count(*) FROM instances), (SELECT count(*) FROM quarantine)";
    PGresult *r = NULL;
    lc_err e = {0};
    if (lc_db_exec(db, sql, 0, NULL, &r, &e) != LC_OK) {
        fprintf(stderr, "ingest_feed: %s\n", lc_err_msg(&e));
        return -1;
    }
    *inst = atoll(PQgetvalue(r, 0, 0));
    *quar = atoll(PQgetvalue(r, 0, 1));
    PQclear(r);
    return 0;
}

/* Poll until the instances table has want rows more than base (and *child, when not 0, has
 * exited: *status gets its wait status). 0 when done within timeout_s of t0. */
static int wait_rows(lc_db *db, long long base, long long qbase, long long want, int64_t t0,
                     long timeout_s, pid_t *child, int *status)
{
    long long have = base, quar = 0;
    while (have - base < want || (child && *child > 0)) {
        if (child && *child > 0 && waitpid(*child, status, WNOHANG) == *child) {
            *child = 0;
            if (!WIFEXITED(*status) || WEXITSTATUS(*status) != 0) {
                fprintf(stderr, "ingest_feed: the command failed (status 0x%x)\n", *status);
                return -1;
            }
        }
        if (lc_now_ms() - t0 > timeout_s * 1000) {
            fprintf(stderr, "ingest_feed: only %lld of %lld instances indexed after %ld s\n",
                    have - base, want, timeout_s);
            return -1;
        }
        usleep(POLL_MS * 1000);
        if (child && *child > 0)
            continue; /* not before the command's last answer */
        if (counts(db, &have, &quar) != 0)
            return -1;
        if (quar > qbase) {
            fprintf(stderr, "ingest_feed: the indexer quarantined %lld generated instances\n",
                    quar - qbase);
            return -1;
        }
    }
    return 0;
}

static int events_main(const char *brokers, const char *db_url, const char *store_url,
                       const char *manifest, const char *prefix, long timeout_s)
{
    char *text = NULL, topic[256], when[32];
    size_t len = 0, n = 0;
    line *lines = NULL;
    lc_kafka_out *msgs = NULL;
    lc_kafka_producer *p = NULL;
    lc_db *db = NULL;
    lc_err e = {0};
    long long base = 0, qbase = 0;
    int code = 1;

    if (lc_read_file(manifest, MAX_MANIFEST, &text, &len, &e) != LC_OK ||
        lc_topic_name(prefix, LC_TOPIC_INSTANCE_STORED, topic, sizeof(topic)) != LC_OK) {
        fprintf(stderr, "ingest_feed: %s\n", e.msg[0] ? lc_err_msg(&e) : "invalid prefix");
        goto out;
    }
    if (split_manifest(text, &lines, &n) != 0 || n == 0 || !(msgs = calloc(n, sizeof(*msgs)))) {
        fprintf(stderr, "ingest_feed: \"%s\" is not a gen_ct manifest\n", manifest);
        goto out;
    }
    const lc_kafka_conf kc = {.brokers = brokers, .topic_prefix = prefix, .client_id = "bench"};
    if (lc_db_connect(db_url, 30000, NULL, &db, &e) != LC_OK ||
        lc_kafka_producer_new(&kc, &p, &e) != LC_OK ||
        lc_kafka_producer_ping(p, 10000, &e) != LC_OK) {
        fprintf(stderr, "ingest_feed: %s\n", lc_err_msg(&e));
        goto out;
    }
    if (counts(db, &base, &qbase) != 0)
        goto out;
    lc_time_rfc3339(lc_wall_ms(), when);
    for (size_t i = 0; i < n; i++) {
        char *json = event_of(&lines[i], store_url, when);
        if (!json) {
            fprintf(stderr, "ingest_feed: out of memory\n");
            goto out;
        }
        msgs[i] = (lc_kafka_out){.topic = topic,
                                 .key = lines[i].col[2],
                                 .key_len = strlen(lines[i].col[2]),
                                 .payload = json,
                                 .len = strlen(json),
                                 .content_type = "application/cloudevents+json"};
    }

    const int64_t t0 = lc_now_ms();
    if (lc_kafka_produce_batch(p, msgs, n, PRODUCE_MS, &e) != LC_OK) {
        fprintf(stderr, "ingest_feed: could not publish: %s\n", lc_err_msg(&e));
        goto out;
    }
    const int64_t t_pub = lc_now_ms();
    if (wait_rows(db, base, qbase, (long long)n, t0, timeout_s, NULL, NULL) != 0)
        goto out;
    const int64_t t1 = lc_now_ms();
    printf("events=%zu publish_ms=%lld indexed_ms=%lld rate=%.1f\n", n, (long long)(t_pub - t0),
           (long long)(t1 - t0), (double)n * 1000.0 / (double)(t1 > t0 ? t1 - t0 : 1));
    code = 0;
out:
    for (size_t i = 0; msgs && i < n; i++)
        free((char *)msgs[i].payload);
    free(msgs);
    free(lines);
    free(text);
    lc_kafka_producer_free(p, 5000);
    lc_db_free(db);
    return code;
}

static int run_main(const char *db_url, long long want, char **cmd, long timeout_s)
{
    lc_db *db = NULL;
    lc_err e = {0};
    long long base = 0, qbase = 0;
    int code = 1, status = 0;
    pid_t child = 0;

    if (lc_db_connect(db_url, 30000, NULL, &db, &e) != LC_OK) {
        fprintf(stderr, "ingest_feed: %s\n", lc_err_msg(&e));
        goto out;
    }
    if (counts(db, &base, &qbase) != 0)
        goto out;
    fflush(stdout);
    const int64_t t0 = lc_now_ms();
    if ((child = fork()) < 0) {
        fprintf(stderr, "ingest_feed: could not fork\n");
        goto out;
    }
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* the command ends with us */
        execvp(cmd[0], cmd);
        fprintf(stderr, "ingest_feed: could not run \"%s\"\n", cmd[0]);
        _exit(127);
    }
    if (wait_rows(db, base, qbase, want, t0, timeout_s, &child, &status) != 0)
        goto out;
    const int64_t t1 = lc_now_ms();
    printf("instances=%lld indexed_ms=%lld rate=%.1f\n", want, (long long)(t1 - t0),
           (double)want * 1000.0 / (double)(t1 > t0 ? t1 - t0 : 1));
    code = 0;
out:
    if (child > 0) {
        kill(child, SIGTERM);
        waitpid(child, NULL, 0);
    }
    lc_db_free(db);
    return code;
}

static void usage(void)
{
    fprintf(stderr, "usage: ingest_feed [--prefix P] [--timeout S] events BROKERS DATABASE_URL "
                    "STORE_URL MANIFEST\n"
                    "       ingest_feed [--timeout S] run DATABASE_URL COUNT CMD [ARG...]\n");
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"prefix", required_argument, NULL, 'p'},
                                         {"timeout", required_argument, NULL, 't'},
                                         {NULL, 0, NULL, 0}};
    const char *prefix = "radpipe.";
    long timeout_s = 300;

    lc_log_init("ingest_feed", LC_LOG_WARN);
    for (int c; (c = getopt_long(argc, argv, "+", opts, NULL)) != -1;) {
        if (c == 'p')
            prefix = optarg;
        else if (c == 't')
            timeout_s = atol(optarg);
        else
            return 2;
    }
    const int left = argc - optind;
    char **a = argv + optind;
    if (timeout_s >= 1 && left == 5 && strcmp(a[0], "events") == 0)
        return events_main(a[1], a[2], a[3], a[4], prefix, timeout_s);
    if (timeout_s >= 1 && left >= 4 && strcmp(a[0], "run") == 0 && atoll(a[2]) > 0)
        return run_main(a[1], atoll(a[2]), a + 3, timeout_s);
    usage();
    return 2;
}
