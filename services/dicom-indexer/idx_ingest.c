/*
 * idx_ingest.c: the instance.stored batch handler. Outside any transaction it parses each
 * event, resolves its object in the store and, on the parse pool (idx_pool.c), reads, hashes
 * and parses every object (header and DICOM JSON in one pass); poison is quarantined (the
 * bytes kept under quarantine/ in the store); then idx_db_write stores the whole batch in one
 * transaction. Also the indexer's configuration table, context set-up and metrics.
 * Runs on the consuming thread; only the per-item load step runs on pool threads, each on
 * its own item (the store and metrics they share are thread-safe).
 */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "idx.h"
#include "lc/log.h"
#include "lc/util.h"

#define OFF(f) offsetof(idx_cfg, f)

const lc_cfg_var idx_cfg_vars[] = {
    {"RADPIPE_INDEX_BATCH_MAX", LC_CFG_INT, "500", 1, 10000, 0, NULL,
     "instance.stored messages the indexer writes in one transaction", OFF(batch_max)},
    {"RADPIPE_STUDY_QUIET_SECONDS", LC_CFG_INT, "10", 0, 86400, 0, NULL,
     "a study is completed once no new or changed instance arrived for this long",
     OFF(quiet_seconds)},
    {"RADPIPE_JOB_MAX_ATTEMPTS", LC_CFG_INT, "5", 1, 100, 0, NULL,
     "attempts before a job that keeps failing is dead", OFF(job_max_attempts)},
    {"RADPIPE_INDEX_PARSE_THREADS", LC_CFG_INT, "0", 0, 64, 0, NULL,
     "threads that read, hash and parse the objects of a batch; 0 = one per online CPU",
     OFF(parse_threads)},
    {"RADPIPE_INDEX_VERIFY_SHA256", LC_CFG_BOOL, "true", 0, 0, 0, NULL,
     "hash the objects of events from sources outside RADPIPE_INDEX_TRUSTED_SOURCES (the "
     "stored bytes decide SHA-256 and size); false trusts every event's sha256 when the "
     "object's size matches it",
     OFF(verify_sha256)},
    {"RADPIPE_INDEX_TRUSTED_SOURCES", LC_CFG_STR, "/radpipe/api-gateway,/radpipe/dicom-indexer", 0,
     -1, 0, NULL,
     "comma-separated CloudEvents sources whose sha256 is taken when the object's size matches "
     "(producers that hash the bytes they store on the way in); empty = hash every object",
     OFF(trusted_sources)},
    {"RADPIPE_SPOOL_WATCH_DIR", LC_CFG_STR, NULL, 0, 0, 0, NULL,
     "folder a DICOM receiver writes into (inotify): each finished file is moved into the "
     "object store and indexed; unset = off",
     OFF(spool_watch_dir)},
};
const size_t idx_cfg_nvars = sizeof(idx_cfg_vars) / sizeof(idx_cfg_vars[0]);

#define TX_ATTEMPTS 3

/* Buckets of the batch size histogram (messages). */
static const double kSizeBuckets[] = {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000};
/* Latency buckets (seconds) from a millisecond to a minute. */
static const double kLatBuckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                     0.5,   1,      2.5,   5,    10,    30,   60};
#define NB(a) (sizeof(a) / sizeof((a)[0]))

lc_rc idx_init(idx_ctx *x, lc_db *db, lc_store *store, const char *prefix, const char *source,
               const idx_cfg *cfg, lc_metrics *metrics, lc_err *err)
{
    static const char inst_help[] = "instances handled by the dicom-indexer, by result";
    static const char stage_help[] =
        "time per ingest stage: queue (event time to its batch), load (read, hash, parse a "
        "batch), write (the batch transaction)";
    memset(x, 0, sizeof(*x));
    if (!db || !store || !prefix || !source || !cfg)
        return lc_err_set(err, LC_ERR_INVALID, "indexer needs a database, a store and a prefix");
    x->db = db;
    x->store = store;
    x->prefix = prefix;
    x->source = source;
    x->cfg = *cfg;
    long threads = x->cfg.parse_threads;
    if (threads <= 0) {
        threads = sysconf(_SC_NPROCESSORS_ONLN);
        if (threads < 1)
            threads = 1;
        if (threads > 8)
            threads = 8;
    }
    /* the consuming thread works too: the pool holds the others */
    lc_rc rc = idx_pool_new((int)threads - 1, &x->pool, err);
    if (rc != LC_OK)
        return rc;
    if (metrics) {
        x->m_inserted = lc_metrics_counter(metrics, "radpipe_indexer_instances_total", inst_help,
                                           "result=\"inserted\"");
        x->m_replaced = lc_metrics_counter(metrics, "radpipe_indexer_instances_total", inst_help,
                                           "result=\"replaced\"");
        x->m_duplicate = lc_metrics_counter(metrics, "radpipe_indexer_instances_total", inst_help,
                                            "result=\"duplicate\"");
        x->m_quarantined = lc_metrics_counter(metrics, "radpipe_indexer_instances_total", inst_help,
                                              "result=\"quarantined\"");
        x->m_batch = lc_metrics_histogram(metrics, "radpipe_indexer_batch_seconds",
                                          "time to index one batch of instance.stored messages",
                                          NULL, NULL, 0);
        x->m_completed =
            lc_metrics_counter(metrics, "radpipe_indexer_studies_completed_total",
                               "study versions completed (an amendment counts again)", NULL);
        x->m_parse_failures =
            lc_metrics_counter(metrics, "radpipe_indexer_parse_failures_total",
                               "objects that are not readable DICOM (quarantined)", NULL);
        x->m_batch_size = lc_metrics_histogram(metrics, "radpipe_indexer_batch_size",
                                               "instance.stored messages per batch", NULL,
                                               kSizeBuckets, NB(kSizeBuckets));
        x->m_stage_queue =
            lc_metrics_histogram(metrics, "radpipe_indexer_stage_seconds", stage_help,
                                 "stage=\"queue\"", kLatBuckets, NB(kLatBuckets));
        x->m_stage_load = lc_metrics_histogram(metrics, "radpipe_indexer_stage_seconds", stage_help,
                                               "stage=\"load\"", kLatBuckets, NB(kLatBuckets));
        x->m_stage_write =
            lc_metrics_histogram(metrics, "radpipe_indexer_stage_seconds", stage_help,
                                 "stage=\"write\"", kLatBuckets, NB(kLatBuckets));
        x->m_event_to_commit = lc_metrics_histogram(
            metrics, "radpipe_indexer_event_to_commit_seconds",
            "event time of an instance.stored to its committed index row, per new instance", NULL,
            kLatBuckets, NB(kLatBuckets));
        x->m_lag_seconds = lc_metrics_gauge(
            metrics, "radpipe_indexer_consumer_lag_seconds",
            "age of the newest message of the latest batch when it was handled (consumer lag "
            "in time)",
            NULL);
    }
    return LC_OK;
}

void idx_release(idx_ctx *x)
{
    if (!x)
        return;
    idx_pool_free(x->pool);
    x->pool = NULL;
    if (x->tmpdir) {
        rmdir(x->tmpdir); /* its files are unlinked as soon as they are parsed */
        free(x->tmpdir);
        x->tmpdir = NULL;
    }
}

void idx_utf8_fix(char *s)
{
    unsigned char *p = (unsigned char *)s;
    while (p && *p) {
        unsigned int c = *p, cp;
        size_t k, j;
        if (c < 0x80) {
            p++;
            continue;
        }
        if ((c & 0xE0) == 0xC0)
            k = 1, cp = c & 0x1F;
        else if ((c & 0xF0) == 0xE0)
            k = 2, cp = c & 0x0F;
        else if ((c & 0xF8) == 0xF0)
            k = 3, cp = c & 0x07;
        else {
            *p++ = '?';
            continue;
        }
        /* stops at the NUL too, since 0 is no continuation byte */
        for (j = 1; j <= k && (p[j] & 0xC0) == 0x80; j++)
            cp = (cp << 6) | (p[j] & 0x3F);
        if (j <= k || (k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
            (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) {
            *p++ = '?';
            continue;
        }
        p += k + 1;
    }
}

/* s without the characters in drop; NULL when s is NULL or longer than 31 characters. */
static int squeeze(const char *s, const char *drop, char out[32])
{
    size_t k = 0;
    if (!s)
        return 0;
    for (; *s; s++) {
        if (strchr(drop, *s))
            continue;
        if (k >= 31)
            return 0;
        out[k++] = *s;
    }
    out[k] = '\0';
    return 1;
}

static int digits(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

char *idx_norm_date(const char *s)
{
    char d[32];
    if (!squeeze(s, ".", d) || strlen(d) != 8 || !digits(d, 8))
        return NULL;
    int m = (d[4] - '0') * 10 + (d[5] - '0'), day = (d[6] - '0') * 10 + (d[7] - '0');
    if (m < 1 || m > 12 || day < 1 || day > 31)
        return NULL;
    return strdup(d);
}

char *idx_norm_time(const char *s)
{
    char t[32];
    if (!squeeze(s, ":", t))
        return NULL;
    const char *dot = strchr(t, '.');
    size_t whole = dot ? (size_t)(dot - t) : strlen(t);
    if ((whole != 2 && whole != 4 && whole != 6) || !digits(t, whole))
        return NULL;
    if (dot && (whole != 6 || strlen(dot + 1) < 1 || strlen(dot + 1) > 6 ||
                !digits(dot + 1, strlen(dot + 1))))
        return NULL;
    int hh = (t[0] - '0') * 10 + (t[1] - '0');
    int mm = whole >= 4 ? (t[2] - '0') * 10 + (t[3] - '0') : 0;
    int ss = whole >= 6 ? (t[4] - '0') * 10 + (t[5] - '0') : 0;
    if (hh > 23 || mm > 59 || ss > 60)
        return NULL;
    return strdup(t);
}

lc_rc idx_quarantine_put(lc_store *store, const char *origin, const char *src_path, int move,
                         const void *buf, size_t len, const char *reason, const char *event_id,
                         char **key, lc_err *err)
{
    char hex[65], *k = NULL, *side = NULL, *doc = NULL, when[32];
    lc_rc rc;
    *key = NULL;
    lc_sha256_hex(origin, strlen(origin), hex);
    hex[32] = '\0';
    if (asprintf(&k, "quarantine/%s", hex) < 0 || asprintf(&side, "quarantine/%s.json", hex) < 0) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    cJSON *j = cJSON_CreateObject();
    lc_time_rfc3339(lc_wall_ms(), when);
    if (!j || !cJSON_AddStringToObject(j, "reason", reason) ||
        !cJSON_AddStringToObject(j, "origin", origin) ||
        (event_id && !cJSON_AddStringToObject(j, "event_id", event_id)) ||
        !cJSON_AddStringToObject(j, "quarantined_at", when) || !(doc = cJSON_Print(j))) {
        cJSON_Delete(j);
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    cJSON_Delete(j);
    if (src_path)
        rc = lc_store_put_file(store, k, src_path, move ? LC_STORE_MOVE : 0, err);
    else
        rc = lc_store_put_buf(store, k, buf ? buf : "", buf ? len : 0, err);
    if (rc == LC_OK)
        rc = lc_store_put_buf(store, side, doc, strlen(doc), err);
    if (rc != LC_OK) {
        lc_err_wrap(err, "could not quarantine \"%s\"", origin);
        goto out;
    }
    *key = k;
    k = NULL;
out:
    free(k);
    free(side);
    free(doc);
    return rc;
}

static void quarantine(idx_item *it, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void quarantine(idx_item *it, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(it->reason, sizeof(it->reason), fmt, ap);
    va_end(ap);
    idx_utf8_fix(it->reason);
    it->state = IDX_QUARANTINE;
    lc_dicom_header_free(it->h);
    it->h = NULL;
}

/* A data field lc_event_parse already checked to be a non-empty string. */
static char *data_str(const lc_event *ev, const char *name)
{
    char *s = cJSON_GetObjectItemCaseSensitive(ev->data, name)->valuestring;
    idx_utf8_fix(s);
    return s;
}

/* RFC 3339 ("2024-05-01T12:34:56.789Z", "...+02:00") to milliseconds; -1 when malformed. */
static int64_t parse_rfc3339(const char *s)
{
    struct tm tm = {0};
    int n = 0;
    if (!s || sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
                     &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &n) != 6)
        return -1;
    const char *p = s + n;
    int64_t ms = 0;
    if (*p == '.') {
        int scale = 100;
        for (p++; *p >= '0' && *p <= '9'; p++) {
            ms += (*p - '0') * scale;
            scale /= 10;
        }
    }
    long off = 0;
    if (*p == '+' || *p == '-') {
        int oh = 0, om = 0;
        if (sscanf(p + 1, "%2d:%2d", &oh, &om) != 2)
            return -1;
        off = (long)(oh * 3600 + om * 60) * (*p == '-' ? -1 : 1);
    } else if (*p != 'Z' && *p != 'z') {
        return -1;
    }
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    time_t t = timegm(&tm);
    if (t == (time_t)-1)
        return -1;
    return ((int64_t)t - off) * 1000 + ms;
}

/* Parse the event and resolve its object key; poison becomes IDX_QUARANTINE. */
static void prepare_event(idx_ctx *x, idx_item *it)
{
    lc_err e = {0};
    it->event_ms = it->msg->timestamp_ms > 0 ? it->msg->timestamp_ms : -1;
    if (lc_event_parse(it->msg->payload, it->msg->len, &it->ev, &e) != LC_OK) {
        quarantine(it, "invalid event: %s", lc_err_msg(&e));
        return;
    }
    idx_utf8_fix(it->ev->id);
    int64_t t = parse_rfc3339(it->ev->time);
    if (t > 0)
        it->event_ms = t;
    if (strcmp(it->ev->type, LC_EV_INSTANCE_STORED) != 0) {
        quarantine(it, "unexpected event type \"%.64s\" on the instance.stored topic",
                   it->ev->type);
        return;
    }
    it->study_uid = data_str(it->ev, "study_instance_uid");
    it->series_uid = data_str(it->ev, "series_instance_uid");
    it->sop_uid = data_str(it->ev, "sop_instance_uid");
    const char *url = data_str(it->ev, "url");
    const char *base = lc_store_url(x->store);
    size_t blen = strlen(base);
    if (strncmp(url, base, blen) != 0 || url[blen] != '/') {
        quarantine(it, "object outside the configured store");
        return;
    }
    if (!lc_store_key_valid(url + blen + 1)) {
        quarantine(it, "invalid object key in the event url");
        return;
    }
    if (!(it->key = strdup(url + blen + 1)))
        quarantine(it, "out of memory"); /* not reached in practice; never crash */
}

static lc_rc ensure_tmpdir(idx_ctx *x, lc_err *err)
{
    if (x->tmpdir)
        return LC_OK;
    const char *t = getenv("TMPDIR");
    char *d = NULL;
    if (asprintf(&d, "%s/radpipe-indexer.XXXXXX", t && *t ? t : "/tmp") < 0)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    if (!mkdtemp(d)) {
        lc_rc rc =
            lc_err_set(err, LC_ERR_IO, "could not create a temporary directory in \"%s\": %s",
                       t && *t ? t : "/tmp", strerror(errno));
        free(d);
        return rc;
    }
    x->tmpdir = d;
    return LC_OK;
}

/* 1 when the header's identity matches the event; otherwise quarantines the item. */
static int uids_match(idx_item *it)
{
    const lc_dicom_header *h = it->h;
    const char *which = strcmp(h->study_instance_uid, it->study_uid) != 0     ? "StudyInstanceUID"
                        : strcmp(h->series_instance_uid, it->series_uid) != 0 ? "SeriesInstanceUID"
                        : strcmp(h->sop_instance_uid, it->sop_uid) != 0       ? "SOPInstanceUID"
                                                                              : NULL;
    if (which) {
        quarantine(it, "the file's %s differs from the event's", which);
        return 0;
    }
    if (!h->sop_class_uid || !*h->sop_class_uid) {
        quarantine(it, "the file has no SOPClassUID");
        return 0;
    }
    return 1;
}

/* Header strings go to PostgreSQL: they must be valid UTF-8 (lc_dicom guarantees it; this is
 * the belt to its braces, so one bad byte can never turn a batch into a poison pill). */
static void fix_header_strings(lc_dicom_header *h)
{
    char *const fields[] = {
        h->sop_class_uid,
        h->sop_instance_uid,
        h->study_instance_uid,
        h->series_instance_uid,
        h->transfer_syntax_uid,
        h->specific_character_set,
        h->patient_name,
        h->patient_id,
        h->patient_birth_date,
        h->patient_sex,
        h->study_date,
        h->study_time,
        h->accession_number,
        h->study_id,
        h->study_description,
        h->referring_physician_name,
        h->modality,
        h->series_description,
        h->body_part_examined,
        h->photometric_interpretation,
        h->issuer_of_patient_id,
        h->institution_name,
        h->timezone_offset,
        h->series_date,
        h->series_time,
        h->content_date,
        h->content_time,
        h->pps_start_date,
        h->pps_start_time,
        h->scheduled_procedure_step_id,
        h->requested_procedure_id,
    };
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
        idx_utf8_fix(fields[i]);
}

/* 1 when s is 64 lower-case hex digits. */
static int sha_hex(const char *s)
{
    size_t n = 0;
    for (; s && s[n]; n++)
        if (!((s[n] >= '0' && s[n] <= '9') || (s[n] >= 'a' && s[n] <= 'f')))
            return 0;
    return n == 64;
}

/* Whether the event comes from a producer whose sha256 claims are taken: every producer with
 * RADPIPE_INDEX_VERIFY_SHA256=false, else those named in RADPIPE_INDEX_TRUSTED_SOURCES. By
 * default these are radpipe's own ways in, the gateway (STOW-RS, POST /api/v1/instances) and
 * the indexer's spool watcher: each hashes the very bytes it writes into the store while it
 * writes them, so hashing them again here (about half a millisecond per CT slice, the largest
 * cost of indexing one) would only repeat that work. Events from other producers (external
 * pipelines, radpipe-notify, which hashes files it does not own) are hashed here. */
int idx_source_trusted(const idx_cfg *cfg, const char *source)
{
    if (!cfg->verify_sha256)
        return 1;
    const char *l = cfg->trusted_sources;
    const size_t n = source ? strlen(source) : 0;
    while (n && l && *l) {
        const char *end = strchr(l, ',');
        size_t len = end ? (size_t)(end - l) : strlen(l);
        const char *b = l, *e = l + len; /* trimmed: "a, b" names b */
        while (b < e && (*b == ' ' || *b == '\t'))
            b++;
        while (e > b && (e[-1] == ' ' || e[-1] == '\t'))
            e--;
        if ((size_t)(e - b) == n && memcmp(b, source, n) == 0)
            return 1;
        l = end ? end + 1 : NULL;
    }
    return 0;
}

/* The event's claim of sha256 and size, taken from a trusted producer (idx_source_trusted)
 * only when the object has that size. */
static int trust_event_hash(idx_item *it, const char *path)
{
    const cJSON *sha = cJSON_GetObjectItemCaseSensitive(it->ev->data, "sha256");
    const cJSON *size = cJSON_GetObjectItemCaseSensitive(it->ev->data, "size");
    struct stat st;
    if (!cJSON_IsString(sha) || !sha_hex(sha->valuestring) || !cJSON_IsNumber(size) ||
        stat(path, &st) != 0 || (double)st.st_size != size->valuedouble)
        return 0;
    memcpy(it->sha256, sha->valuestring, 65);
    it->size = (long long)st.st_size;
    return 1;
}

/* Where the item's quarantine copy comes from: "kafka:<topic>/<partition>@<offset>". */
static void origin_of(const idx_item *it, char *buf, size_t cap)
{
    snprintf(buf, cap, "kafka:%s/%d@%lld", it->msg->topic, (int)it->msg->partition,
             (long long)it->msg->offset);
}

/* Keep the bytes of a quarantined item: the object when it can be read (path), else the
 * message itself. A store that cannot be reached is a transient failure. */
static void keep_bytes(idx_ctx *x, idx_item *it, const char *path)
{
    char origin[512];
    lc_err e = {0};
    origin_of(it, origin, sizeof(origin));
    lc_rc rc = idx_quarantine_put(x->store, origin, path, 0, path ? NULL : it->msg->payload,
                                  path ? 0 : it->msg->len, it->reason, it->ev ? it->ev->id : NULL,
                                  &it->qkey, &e);
    if (rc != LC_OK) {
        it->load_rc = lc_rc_is_transient(rc) ? rc : LC_ERR_STORE;
        snprintf(it->load_err, sizeof(it->load_err), "%s", lc_err_msg(&e));
    }
}

/* Read, hash and parse the item's object (a pool thread). Poison (missing object, not DICOM,
 * wrong UIDs) quarantines the item; a store that cannot be reached sets load_rc. */
static void load_object(idx_ctx *x, idx_item *it, size_t i)
{
    char *path = NULL, *tmp = NULL;
    lc_err e = {0};
    lc_rc rc = lc_store_local_path(x->store, it->key, &path, &e);
    if (rc == LC_ERR_UNSUPPORTED) { /* a remote store: fetch a copy */
        lc_err_clear(&e);
        if (asprintf(&tmp, "%s/%zu.dcm", x->tmpdir, i) < 0) {
            tmp = NULL;
            rc = lc_err_set(&e, LC_ERR_NOMEM, "out of memory");
        } else {
            rc = lc_store_get_file(x->store, it->key, tmp, &e);
        }
    }
    const char *p = tmp ? tmp : path;
    if (rc == LC_OK) {
        unsigned flags = LC_DICOM_JSON;
        const int trusted = idx_source_trusted(&x->cfg, it->ev->source) && trust_event_hash(it, p);
        if (!trusted)
            flags |= LC_DICOM_SHA256;
        rc = lc_dicom_read_header_ex(p, flags, &it->h, &e);
        if (rc == LC_OK && !trusted) {
            memcpy(it->sha256, it->h->sha256, sizeof(it->sha256));
            it->size = it->h->file_size;
        }
    }
    if (rc != LC_OK) {
        if (lc_rc_is_transient(rc) && rc != LC_ERR_IO) {
            it->load_rc = rc;
            snprintf(it->load_err, sizeof(it->load_err),
                     "could not read the object of event %s: %s", it->ev->id, lc_err_msg(&e));
            goto out;
        }
        it->parse_failed = rc == LC_ERR_DICOM;
        quarantine(it, "%s: %s",
                   rc == LC_ERR_DICOM       ? "not a readable DICOM file"
                   : rc == LC_ERR_NOT_FOUND ? "object not found"
                                            : "could not read the object",
                   lc_err_msg(&e));
        keep_bytes(x, it, rc == LC_ERR_NOT_FOUND ? NULL : p);
        goto out;
    }
    fix_header_strings(it->h);
    if (!uids_match(it))
        keep_bytes(x, it, p);
out:
    if (tmp)
        unlink(tmp);
    free(tmp);
    free(path);
}

typedef struct load_ctx {
    idx_ctx *x;
    idx_item *items;
} load_ctx;

/* The pool's function: load a READY item, or keep the bytes of one quarantined earlier. */
static void load_one(void *arg, size_t i)
{
    load_ctx *c = arg;
    idx_item *it = &c->items[i];
    if (it->state == IDX_READY)
        load_object(c->x, it, i);
    else if (it->state == IDX_QUARANTINE && !it->qkey)
        keep_bytes(c->x, it, NULL);
}

typedef struct keyed {
    const char *key;
    size_t i;
} keyed;

static int keyed_cmp(const void *a, const void *b)
{
    const keyed *x = a, *y = b;
    int c = strcmp(x->key, y->key);
    return c ? c : (x->i > y->i) - (x->i < y->i);
}

/* Within one batch: a repeated event id keeps its first message (the rest are IDX_SKIP); a
 * SOPInstanceUID that several READY items announce marks them all deferred: they are written
 * once every object is loaded, and only the last that loads cleanly (idx_db.c), so the
 * latest file wins. */
static lc_rc mark_repeats(idx_item *items, size_t n, int by_sop, lc_err *err)
{
    keyed *k = malloc((n ? n : 1) * sizeof(*k));
    size_t m = 0;
    if (!k)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        if (by_sop ? items[i].state == IDX_READY : items[i].ev != NULL)
            k[m++] = (keyed){by_sop ? items[i].sop_uid : items[i].ev->id, i};
    }
    qsort(k, m, sizeof(*k), keyed_cmp);
    for (size_t j = 0; j + 1 < m; j++) {
        if (strcmp(k[j].key, k[j + 1].key) != 0)
            continue;
        if (by_sop)
            items[k[j].i].deferred = items[k[j + 1].i].deferred = 1;
        else
            items[k[j + 1].i].state = IDX_SKIP;
    }
    free(k);
    return LC_OK;
}

static void log_batch(idx_ctx *x, const idx_item *items, size_t n, int64_t ms, int64_t load_ms,
                      int64_t write_ms)
{
    for (size_t i = 0; i < n; i++) {
        const idx_item *it = &items[i];
        if (it->result != IDX_R_QUARANTINED)
            continue;
        lc_log_warn("quarantined a message", LC_LS("topic", it->msg->topic),
                    LC_LI("partition", it->msg->partition), LC_LI("offset", it->msg->offset),
                    LC_LS("event_id", it->ev ? it->ev->id : ""), LC_LS("reason", it->reason),
                    LC_LS("store_key", it->key ? it->key : ""),
                    LC_LS("quarantine_key", it->qkey ? it->qkey : ""));
    }
    lc_log_info("indexed batch", LC_LI("count", n), LC_LI("inserted", x->last.inserted),
                LC_LI("replaced", x->last.replaced), LC_LI("duplicates", x->last.duplicates),
                LC_LI("quarantined", x->last.quarantined), LC_LI("ms", ms),
                LC_LI("load_ms", load_ms), LC_LI("write_ms", write_ms));
}

/* Metrics of a committed batch. */
static void observe(idx_ctx *x, const idx_item *items, size_t n, int64_t t0, int64_t load_ms,
                    int64_t write_ms)
{
    const int64_t now = lc_wall_ms(), start = now - (lc_now_ms() - t0);
    int64_t newest = -1;
    lc_counter_add(x->m_inserted, (double)x->last.inserted);
    lc_counter_add(x->m_replaced, (double)x->last.replaced);
    lc_counter_add(x->m_duplicate, (double)x->last.duplicates);
    lc_counter_add(x->m_quarantined, (double)x->last.quarantined);
    lc_histogram_observe(x->m_batch_size, (double)n);
    lc_histogram_observe(x->m_stage_load, (double)load_ms / 1000.0);
    lc_histogram_observe(x->m_stage_write, (double)write_ms / 1000.0);
    for (size_t i = 0; i < n; i++) {
        const idx_item *it = &items[i];
        if (it->parse_failed && it->result == IDX_R_QUARANTINED)
            lc_counter_inc(x->m_parse_failures);
        if (it->msg->timestamp_ms > newest)
            newest = it->msg->timestamp_ms;
        if (it->event_ms <= 0)
            continue;
        lc_histogram_observe(x->m_stage_queue,
                             start > it->event_ms ? (double)(start - it->event_ms) / 1000.0 : 0);
        if (it->result == IDX_R_INSERTED || it->result == IDX_R_REPLACED)
            lc_histogram_observe(x->m_event_to_commit,
                                 now > it->event_ms ? (double)(now - it->event_ms) / 1000.0 : 0);
    }
    if (newest > 0)
        lc_gauge_set(x->m_lag_seconds, start > newest ? (double)(start - newest) / 1000.0 : 0);
}

lc_rc idx_handle_batch(idx_ctx *x, const lc_kafka_msg *msgs, size_t n, const char *sources,
                       lc_err *err)
{
    int64_t t0 = lc_now_ms(), t_load = 0, t_write = 0;
    lc_rc rc;
    idx_item *items = calloc(n ? n : 1, sizeof(*items));
    if (!items)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory for a batch of %zu messages", n);

    for (size_t i = 0; i < n; i++) {
        items[i].msg = &msgs[i];
        prepare_event(x, &items[i]);
    }
    if ((rc = mark_repeats(items, n, 0, err)) != LC_OK)
        goto out;
    /* skip the file work for events a previous delivery already committed */
    if ((rc = lc_db_ensure(x->db, err)) != LC_OK ||
        (rc = idx_db_mark_processed(x->db, items, n, err)) != LC_OK)
        goto out;
    if (strncmp(lc_store_url(x->store), "file://", 7) != 0 && (rc = ensure_tmpdir(x, err)) != LC_OK)
        goto out;
    if ((rc = mark_repeats(items, n, 1, err)) != LC_OK)
        goto out;
    /* the pool reads, hashes and parses the objects while the transaction writes the ones
     * already loaded (idx_db_write waits for each chunk) */
    t_load = lc_now_ms();
    load_ctx lc = {x, items};
    idx_write w = {x, items, n, sources, 0, LC_OK, ""};
    idx_pool_start(x->pool, n, load_one, &lc);
    rc = lc_db_tx(x->db, TX_ATTEMPTS, idx_db_write, &w, err);
    idx_pool_finish(x->pool);
    t_write = lc_now_ms() - t_load;
    t_load = (w.loaded_ms ? w.loaded_ms : lc_now_ms()) - t_load;
    if (rc == LC_ERR_CANCELLED && w.load_rc != LC_OK) {
        rc = lc_err_set(err, w.load_rc, "%s", w.load_err);
        goto out;
    }
    if (rc != LC_OK) {
        lc_err_wrap(err, "could not index a batch of %zu messages", n);
        goto out;
    }

    memset(&x->last, 0, sizeof(x->last));
    for (size_t i = 0; i < n; i++) {
        switch (items[i].result) {
        case IDX_R_INSERTED:
            x->last.inserted++;
            break;
        case IDX_R_REPLACED:
            x->last.replaced++;
            break;
        case IDX_R_QUARANTINED:
            x->last.quarantined++;
            break;
        default:
            x->last.duplicates++;
            break;
        }
    }
    observe(x, items, n, t0, t_load, t_write);
    int64_t ms = lc_now_ms() - t0;
    lc_histogram_observe(x->m_batch, (double)ms / 1000.0);
    log_batch(x, items, n, ms, t_load, t_write);
out:
    for (size_t i = 0; i < n; i++) {
        lc_event_free(items[i].ev);
        lc_dicom_header_free(items[i].h);
        free(items[i].key);
        free(items[i].qkey);
    }
    free(items);
    return rc;
}
