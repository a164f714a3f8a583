/*
 * gw_events.c: GET /api/v1/events, job status changes as Server-Sent Events. One thread per
 * gateway tails radpipe.job.status (lc_kafka_tail_new: every partition from its end, nothing
 * committed, so every gateway process sees every event) into a ring of the latest events;
 * each stream is a worker thread that waits on the ring and writes what matches its filter.
 * Reconnecting clients resume with Last-Event-ID while the ring still holds the event. Event
 * ids are "<epoch>-<sequence>", the epoch random per gw_events (so per process): an id from
 * another gateway process, or from this one before a restart, is foreign and the stream
 * starts at the newest event instead of resuming at an unrelated one.
 * Streams end when the client goes away or the gateway drains. The ring is guarded by mu;
 * the consumer thread owns the consumer.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "gw.h"
#include "lc/event.h"
#include "lc/kafka.h"
#include "lc/log.h"
#include "lc/util.h"

#define RING        1024 /* events kept for Last-Event-ID */
#define KEEPALIVE_S 15   /* comment line on an idle stream */
#define WAIT_MS     500  /* how often a waiting stream looks at the drain flag */

typedef struct ev_slot {
    unsigned long long seq; /* 0: empty */
    char study[65];
    char job[37];
    char *data; /* the SSE data line: the event's data plus event_id and time */
} ev_slot;

struct gw_events {
    gw *g;
    pthread_t thread;
    int started;
    atomic_int stop;
    atomic_int ready;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned long long last; /* sequence number of the newest event */
    char epoch[17];          /* random hex, fixed at start: the first part of every id */
    ev_slot ring[RING];
    atomic_int clients;
};

int gw_events_ready(const gw_events *ev)
{
    return ev && atomic_load(&ev->ready);
}

/* --- the consumer ------------------------------------------------------------------------ */

static void push(gw_events *ev, const lc_event *e)
{
    cJSON *d = cJSON_Duplicate(e->data, 1);
    const char *study = cJSON_GetStringValue(cJSON_GetObjectItem(d, "study_instance_uid"));
    const char *job = cJSON_GetStringValue(cJSON_GetObjectItem(d, "job_id"));
    if (!d || !study || !job) {
        cJSON_Delete(d);
        return;
    }
    cJSON_AddStringToObject(d, "event_id", e->id);
    if (e->time)
        cJSON_AddStringToObject(d, "time", e->time);
    char *text = cJSON_PrintUnformatted(d);
    pthread_mutex_lock(&ev->mu);
    unsigned long long seq = ++ev->last;
    ev_slot *s = &ev->ring[seq % RING];
    free(s->data);
    s->seq = seq;
    s->data = text;
    lc_strlcpy(s->study, study, sizeof(s->study));
    lc_strlcpy(s->job, job, sizeof(s->job));
    pthread_cond_broadcast(&ev->cv);
    pthread_mutex_unlock(&ev->mu);
    cJSON_Delete(d);
}

static lc_rc on_batch(void *ctx, const lc_kafka_msg *msgs, size_t n, lc_err *err)
{
    gw_events *ev = ctx;
    (void)err;
    for (size_t i = 0; i < n; i++) {
        lc_event *e = NULL;
        lc_err pe = {0};
        if (lc_event_parse(msgs[i].payload, msgs[i].len, &e, &pe) != LC_OK ||
            strcmp(e->type, LC_EV_JOB_STATUS) != 0) {
            lc_log_debug("events: skipped a message", LC_LS("error", lc_err_msg(&pe)));
            lc_event_free(e);
            continue;
        }
        push(ev, e);
        lc_event_free(e);
    }
    return LC_OK;
}

static void *consumer_main(void *arg)
{
    gw_events *ev = arg;
    lc_kafka_consumer *c = NULL;
    lc_err err = {0};
    int logged = 0;
    while (!atomic_load(&ev->stop)) {
        if (lc_kafka_tail_new(ev->g->deps.kafka, LC_TOPIC_JOB_STATUS, 5000, &c, &err) == LC_OK)
            break;
        if (!logged++)
            lc_log_warn("events: job.status not readable yet, retrying",
                        LC_LS("error", lc_err_msg(&err)));
        lc_sleep_ms(2000, &ev->stop);
    }
    if (!c)
        return NULL;
    atomic_store(&ev->ready, 1);
    lc_log_info("events: following job.status");
    const lc_kafka_run_opts opts = {.max_batch = 100, .batch_wait_ms = 5, .idle_ms = 500};
    if (lc_kafka_consumer_run(c, &opts, on_batch, ev, &ev->stop, &err) != LC_OK)
        lc_log_error("events: consumer stopped", LC_LS("error", lc_err_msg(&err)));
    atomic_store(&ev->ready, 0);
    lc_kafka_consumer_free(c);
    return NULL;
}

lc_rc gw_events_start(gw *g, lc_err *err)
{
    if (!g->deps.kafka)
        return LC_OK;
    gw_events *ev = calloc(1, sizeof(*ev));
    if (!ev)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    ev->g = g;
    char uuid[LC_UUID_LEN + 1];
    lc_uuid_v4(uuid); /* 122 random bits; 16 hex digits of them, dashes left out */
    for (size_t i = 0, k = 0; uuid[i] && k < sizeof(ev->epoch) - 1; i++)
        if (uuid[i] != '-' && i != 14) /* 14: the version digit, always 4 */
            ev->epoch[k++] = uuid[i];
    pthread_mutex_init(&ev->mu, NULL);
    pthread_cond_init(&ev->cv, NULL);
    if (pthread_create(&ev->thread, NULL, consumer_main, ev) != 0) {
        pthread_mutex_destroy(&ev->mu);
        pthread_cond_destroy(&ev->cv);
        free(ev);
        return lc_err_set(err, LC_ERR_INTERNAL, "could not start the events thread");
    }
    ev->started = 1;
    g->events = ev;
    return LC_OK;
}

void gw_events_stop(gw_events *ev)
{
    if (!ev)
        return;
    atomic_store(&ev->stop, 1);
    pthread_mutex_lock(&ev->mu);
    pthread_cond_broadcast(&ev->cv);
    pthread_mutex_unlock(&ev->mu);
    if (ev->started)
        pthread_join(ev->thread, NULL);
    for (int i = 0; i < RING; i++)
        free(ev->ring[i].data);
    pthread_mutex_destroy(&ev->mu);
    pthread_cond_destroy(&ev->cv);
    free(ev);
}

/* --- a stream ---------------------------------------------------------------------------- */

typedef struct out_ev {
    unsigned long long seq;
    char *data;
} out_ev;

int gw_events_stream(gw_req *r)
{
    gw_events *ev = r->g->events;
    char study[80] = "", job[64] = "", line[96];
    unsigned long long next;
    int64_t last_write;

    gw_db_put(r); /* a stream holds no database connection */
    /* unknown query parameters were refused by the router (gw_route.query) */
    int fs = gw_query(r, "study_instance_uid", study, sizeof(study));
    int fj = gw_query(r, "job_id", job, sizeof(job));
    if (fs < 0 || (fs > 0 && !lc_dicom_uid_valid(study)))
        return gw_send_problem(r, 400, NULL, "invalid value for \"study_instance_uid\": a UID");
    if (fj < 0 || (fj > 0 && !lc_uuid_valid(job)))
        return gw_send_problem(r, 400, NULL, "invalid value for \"job_id\": a UUID");
    if (!ev) {
        static const gw_header h[] = {{"Retry-After", "30"}, {NULL, NULL}};
        return gw_send_problem(r, 503, h, "job events need Kafka, which this gateway lacks");
    }
    if (atomic_fetch_add(&ev->clients, 1) >= r->g->cfg->events_max_clients) {
        atomic_fetch_sub(&ev->clients, 1);
        static const gw_header h[] = {{"Retry-After", "10"}, {NULL, NULL}};
        return gw_send_problem(r, 503, h, "too many event streams (RADPIPE_EVENTS_MAX_CLIENTS)");
    }
    lc_gauge_add(r->g->sse_clients, 1);

    pthread_mutex_lock(&ev->mu);
    next = ev->last + 1;
    /* "<epoch>-<seq>" of this process: resume after it while the ring still holds everything
     * that followed; any other id (another gateway, an earlier process) starts at the end */
    const char *lei = gw_header_get(r, "Last-Event-ID");
    size_t el = strlen(ev->epoch);
    int foreign = lei && *lei;
    if (foreign && strncmp(lei, ev->epoch, el) == 0 && lei[el] == '-') {
        const char *num = lei + el + 1;
        size_t nl = strlen(num);
        if (nl > 0 && nl < 20 && strspn(num, "0123456789") == nl) {
            unsigned long long want = strtoull(num, NULL, 10) + 1;
            foreign = 0;
            if (want <= ev->last + 1 && (ev->last < RING || want > ev->last - RING))
                next = want;
        }
    }
    pthread_mutex_unlock(&ev->mu);

    static const gw_header h[] = {{"X-Accel-Buffering", "no"}, {NULL, NULL}};
    gw_send_head(r, 200, "text/event-stream; charset=utf-8", -1, h);
    static const char hello[] = ": radpipe job events\nretry: 3000\n\n";
    gw_write(r, hello, sizeof(hello) - 1);
    if (foreign) {
        static const char note[] = ": Last-Event-ID is not from this gateway process: "
                                   "starting with the next event\n\n";
        gw_write(r, note, sizeof(note) - 1);
    }
    last_write = lc_now_ms();
    while (!r->gone && !atomic_load(&r->g->draining) && !atomic_load(&ev->stop)) {
        out_ev batch[64];
        int nb = 0;
        pthread_mutex_lock(&ev->mu);
        if (next > ev->last) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += (long)WAIT_MS * 1000000L;
            ts.tv_sec += ts.tv_nsec / 1000000000L;
            ts.tv_nsec %= 1000000000L;
            pthread_cond_timedwait(&ev->cv, &ev->mu, &ts);
        }
        if (ev->last >= RING && next <= ev->last - RING)
            next = ev->last - RING + 1; /* fell behind the ring: skip what is gone */
        for (; next <= ev->last && nb < 64; next++) {
            ev_slot *s = &ev->ring[next % RING];
            if (s->seq != next || !s->data)
                continue;
            if ((study[0] && strcmp(study, s->study) != 0) || (job[0] && strcmp(job, s->job) != 0))
                continue;
            batch[nb].seq = next;
            batch[nb].data = strdup(s->data);
            nb++;
        }
        pthread_mutex_unlock(&ev->mu);
        for (int i = 0; i < nb; i++) {
            if (batch[i].data && !r->gone) {
                int k = snprintf(line, sizeof(line),
                                 "id: %s-%llu\nevent: job.status\ndata: ", ev->epoch, batch[i].seq);
                gw_write(r, line, (size_t)k);
                gw_write(r, batch[i].data, strlen(batch[i].data));
                gw_write(r, "\n\n", 2);
                last_write = lc_now_ms();
            }
            free(batch[i].data);
        }
        if (!r->gone && lc_now_ms() - last_write >= KEEPALIVE_S * 1000) {
            gw_write(r, ": keep-alive\n\n", 14);
            last_write = lc_now_ms();
        }
    }
    gw_end(r);
    lc_gauge_add(r->g->sse_clients, -1);
    atomic_fetch_sub(&ev->clients, 1);
    return 200;
}
