/*
 * idx_ingest.c: the instance.stored batch handler. Outside any transaction it parses each
 * event, resolves its object in the store, hashes it and reads its DICOM header (poison ->
 * quarantine); then idx_db_write stores the whole batch in one transaction. Also the indexer's
 * configuration table and context set-up. Runs on the consuming thread only.
 */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
};
const size_t idx_cfg_nvars = sizeof(idx_cfg_vars) / sizeof(idx_cfg_vars[0]);

#define TX_ATTEMPTS 3

lc_rc idx_init(idx_ctx *x, lc_db *db, lc_store *store, const char *prefix, const char *source,
               const idx_cfg *cfg, lc_metrics *metrics, lc_err *err)
{
    static const char inst_help[] = "instances handled by the dicom-indexer, by result";
    memset(x, 0, sizeof(*x));
    if (!db || !store || !prefix || !source || !cfg)
        return lc_err_set(err, LC_ERR_INVALID, "indexer needs a database, a store and a prefix");
    x->db = db;
    x->store = store;
    x->prefix = prefix;
    x->source = source;
    x->cfg = *cfg;
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
    }
    return LC_OK;
}

void idx_release(idx_ctx *x)
{
    if (!x)
        return;
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

/* Parse the event and resolve its object key; poison becomes IDX_QUARANTINE. */
static void prepare_event(idx_ctx *x, idx_item *it)
{
    lc_err e = {0};
    if (lc_event_parse(it->msg->payload, it->msg->len, &it->ev, &e) != LC_OK) {
        quarantine(it, "invalid event: %s", lc_err_msg(&e));
        return;
    }
    idx_utf8_fix(it->ev->id);
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
    if (!h->sop_class_uid) {
        quarantine(it, "the file has no SOPClassUID");
        return 0;
    }
    return 1;
}

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
    };
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
        idx_utf8_fix(fields[i]);
}

/* Hash the object and read its header. Poison (missing object, not DICOM, wrong UIDs)
 * quarantines the item and returns LC_OK; a store that cannot be reached returns the error. */
static lc_rc load_object(idx_ctx *x, idx_item *it, size_t i, lc_err *err)
{
    char *path = NULL, *tmp = NULL;
    lc_err e = {0};
    lc_rc rc = lc_store_local_path(x->store, it->key, &path, &e);
    if (rc == LC_ERR_UNSUPPORTED) { /* a remote store: fetch a copy */
        lc_err_clear(&e);
        if ((rc = ensure_tmpdir(x, &e)) == LC_OK) {
            if (asprintf(&tmp, "%s/%zu.dcm", x->tmpdir, i) < 0) {
                tmp = NULL;
                rc = lc_err_set(&e, LC_ERR_NOMEM, "out of memory");
            } else {
                rc = lc_store_get_file(x->store, it->key, tmp, &e);
            }
        }
    }
    const char *p = tmp ? tmp : path;
    if (rc == LC_OK)
        rc = lc_sha256_file_hex(p, it->sha256, &it->size, &e);
    if (rc == LC_OK)
        rc = lc_dicom_read_header(p, &it->h, &e);
    if (rc != LC_OK) {
        if (lc_rc_is_transient(rc)) {
            rc = lc_err_set(err, rc, "could not read the object of event %s: %s", it->ev->id,
                            lc_err_msg(&e));
            goto out;
        }
        quarantine(it, "%s: %s",
                   rc == LC_ERR_DICOM       ? "not a readable DICOM file"
                   : rc == LC_ERR_NOT_FOUND ? "object not found"
                                            : "could not read the object",
                   lc_err_msg(&e));
        rc = LC_OK;
        goto out;
    }
    fix_header_strings(it->h);
    uids_match(it);
out:
    if (tmp)
        unlink(tmp);
    free(tmp);
    free(path);
    return rc;
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
 * repeated SOPInstanceUID among READY items keeps its last (the rest are IDX_SUPERSEDED), so
 * multi-row upserts never touch a row twice and the latest file wins. */
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
        if (by_sop) {
            idx_item *it = &items[k[j].i];
            it->state = IDX_SUPERSEDED;
            lc_dicom_header_free(it->h);
            it->h = NULL;
        } else {
            items[k[j + 1].i].state = IDX_SKIP;
        }
    }
    free(k);
    return LC_OK;
}

static void log_batch(idx_ctx *x, const idx_item *items, size_t n, int64_t ms)
{
    for (size_t i = 0; i < n; i++) {
        const idx_item *it = &items[i];
        if (it->result != IDX_R_QUARANTINED)
            continue;
        lc_log_warn("quarantined a message", LC_LS("topic", it->msg->topic),
                    LC_LI("partition", it->msg->partition), LC_LI("offset", it->msg->offset),
                    LC_LS("event_id", it->ev ? it->ev->id : ""), LC_LS("reason", it->reason),
                    LC_LS("store_key", it->key ? it->key : ""));
    }
    lc_log_info("indexed batch", LC_LI("count", n), LC_LI("inserted", x->last.inserted),
                LC_LI("replaced", x->last.replaced), LC_LI("duplicates", x->last.duplicates),
                LC_LI("quarantined", x->last.quarantined), LC_LI("ms", ms));
}

lc_rc idx_handle_batch(void *ctx, const lc_kafka_msg *msgs, size_t n, lc_err *err)
{
    idx_ctx *x = ctx;
    int64_t t0 = lc_now_ms();
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
    for (size_t i = 0; i < n; i++) {
        if (items[i].state == IDX_READY && (rc = load_object(x, &items[i], i, err)) != LC_OK)
            goto out;
    }
    if ((rc = mark_repeats(items, n, 1, err)) != LC_OK)
        goto out;
    idx_write w = {x, items, n};
    if ((rc = lc_db_tx(x->db, TX_ATTEMPTS, idx_db_write, &w, err)) != LC_OK) {
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
    lc_counter_add(x->m_inserted, (double)x->last.inserted);
    lc_counter_add(x->m_replaced, (double)x->last.replaced);
    lc_counter_add(x->m_duplicate, (double)x->last.duplicates);
    lc_counter_add(x->m_quarantined, (double)x->last.quarantined);
    int64_t ms = lc_now_ms() - t0;
    lc_histogram_observe(x->m_batch, (double)ms / 1000.0);
    log_batch(x, items, n, ms);
out:
    for (size_t i = 0; i < n; i++) {
        lc_event_free(items[i].ev);
        lc_dicom_header_free(items[i].h);
        free(items[i].key);
    }
    free(items);
    return rc;
}
