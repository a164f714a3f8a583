/*
 * gw_ingest.c: the way in shared by POST /api/v1/instances (one file or a zip of files) and
 * STOW-RS: spooled files are parsed and checked, then moved into the object store under
 * instances/<study>/<series>/<sop>.dcm and announced as radpipe.instance.stored events in one
 * outbox transaction; the dicom-indexer does the indexing. Storing again under the same SOP
 * Instance UID replaces the object, so a client may retry any failure. Per-request state only.
 */
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "gw.h"
#include "lc/event.h"
#include "lc/kafka.h"
#include "lc/log.h"
#include "lc/outbox.h"
#include "lc/util.h"

int gw_ingest_spool_open(gw_req *r, gw_ingest_item *item, lc_err *err)
{
    if (snprintf(item->path, sizeof(item->path), "%s/part-XXXXXX", r->g->cfg->spool_dir) >=
        (int)sizeof(item->path)) {
        item->path[0] = '\0';
        lc_err_set(err, LC_ERR_IO, "the spool directory path is too long");
        return -1;
    }
    int fd = mkostemp(item->path, O_CLOEXEC);
    if (fd < 0) {
        lc_err_set(err, LC_ERR_IO, "could not create a spool file in \"%s\": %s",
                   r->g->cfg->spool_dir, strerror(errno));
        item->path[0] = '\0';
    }
    return fd;
}

static lc_rc refuse(gw_ingest_item *item, int reason, lc_rc rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static lc_rc refuse(gw_ingest_item *item, int reason, lc_rc rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(item->error, sizeof(item->error), fmt, ap);
    va_end(ap);
    item->failure = reason;
    return rc;
}

lc_rc gw_ingest_check(gw_req *r, gw_ingest_item *item, const char *study_uid, lc_err *err)
{
    lc_dicom_header *h = NULL;
    lc_err e = {0};
    (void)r;
    if (item->size == 0)
        return refuse(item, 0xC000, LC_ERR_DICOM, "not a DICOM file: it is empty");
    lc_rc rc = lc_dicom_read_header(item->path, &h, &e);
    if (rc == LC_ERR_DICOM || rc == LC_ERR_INVALID)
        return refuse(item, 0xC000, LC_ERR_DICOM, "not a DICOM file: %s", lc_err_msg(&e));
    if (rc != LC_OK) {
        *err = e;
        return rc;
    }
    static const char *const names[] = {"StudyInstanceUID", "SeriesInstanceUID",
                                        "SOPInstanceUID"};
    const char *uids[] = {h->study_instance_uid, h->series_instance_uid, h->sop_instance_uid};
    for (int i = 0; i < 3; i++) {
        if (!lc_dicom_uid_valid(uids[i])) {
            lc_dicom_header_free(h);
            return refuse(item, 0xC000, LC_ERR_DICOM, "invalid %s \"%.80s\" in the DICOM file",
                          names[i], uids[i] ? uids[i] : "");
        }
    }
    if (study_uid && strcmp(study_uid, h->study_instance_uid) != 0) {
        rc = refuse(item, 0xC409, LC_ERR_CONFLICT,
                    "the instance belongs to study %s, not to the study of the request",
                    h->study_instance_uid);
        lc_dicom_header_free(h);
        return rc;
    }
    item->h = h;
    item->failure = 0;
    return LC_OK;
}

/* The radpipe.instance.stored event for an object now in the store (see proto/events). */
static lc_rc stored_event(gw_req *r, const gw_ingest_item *it, const char *kind,
                          const char *received_at, lc_event **out, lc_err *err)
{
    const lc_dicom_header *h = it->h;
    const char *base = lc_store_url(r->g->deps.store);
    size_t bl = strlen(base);
    char *url = NULL;
    if (asprintf(&url, "%s%s%s", base, bl && base[bl - 1] == '/' ? "" : "/", it->key) < 0)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    cJSON *d = cJSON_CreateObject(), *src = NULL; /* src is owned by d */
    if (!d || !cJSON_AddStringToObject(d, "study_instance_uid", h->study_instance_uid) ||
        !cJSON_AddStringToObject(d, "series_instance_uid", h->series_instance_uid) ||
        !cJSON_AddStringToObject(d, "sop_instance_uid", h->sop_instance_uid) ||
        !cJSON_AddStringToObject(d, "sop_class_uid", h->sop_class_uid ? h->sop_class_uid : "") ||
        !cJSON_AddStringToObject(d, "url", url) ||
        !cJSON_AddNumberToObject(d, "size", (double)it->size) ||
        !cJSON_AddStringToObject(d, "sha256", it->sha256) ||
        !(src = cJSON_AddObjectToObject(d, "source")) ||
        !cJSON_AddStringToObject(src, "kind", kind) ||
        (r->token_name[0] && !cJSON_AddStringToObject(src, "name", r->token_name)) ||
        !cJSON_AddStringToObject(d, "received_at", received_at)) {
        cJSON_Delete(d);
        free(url);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    free(url);
    return lc_event_new(LC_EV_INSTANCE_STORED, r->g->deps.source, h->study_instance_uid, d, out,
                        err);
}

typedef struct outbox_ctx {
    const char *prefix;
    lc_event **evs;
    size_t n;
} outbox_ctx;

static lc_rc outbox_tx(lc_db *db, void *arg, lc_err *err)
{
    const outbox_ctx *c = arg;
    for (size_t i = 0; i < c->n; i++) {
        lc_rc rc = lc_outbox_add_event(db, c->prefix, LC_TOPIC_INSTANCE_STORED, c->evs[i], err);
        if (rc != LC_OK)
            return rc;
    }
    return LC_OK;
}

lc_rc gw_ingest_commit(gw_req *r, gw_ingest_item *items, size_t n, const char *kind, lc_err *err)
{
    char received_at[32];
    lc_event **evs = calloc(n ? n : 1, sizeof(*evs));
    size_t nev = 0;
    lc_db *db = NULL;
    lc_rc rc = LC_OK;

    if (!evs)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    lc_time_rfc3339(lc_wall_ms(), received_at);
    for (size_t i = 0; i < n; i++) {
        gw_ingest_item *it = &items[i];
        if (it->failure || !it->h)
            continue;
        const lc_dicom_header *h = it->h;
        snprintf(it->key, sizeof(it->key), "instances/%s/%s/%s.dcm", h->study_instance_uid,
                 h->series_instance_uid, h->sop_instance_uid);
        if ((rc = lc_store_put_file(r->g->deps.store, it->key, it->path, LC_STORE_MOVE, err)) !=
            LC_OK)
            goto out;
        it->path[0] = '\0'; /* moved */
        if ((rc = stored_event(r, it, kind, received_at, &evs[nev], err)) != LC_OK)
            goto out;
        nev++;
    }
    if (nev == 0)
        goto out;
    outbox_ctx oc = {r->g->deps.topic_prefix, evs, nev};
    if ((rc = gw_db(r, &db, err)) != LC_OK || (rc = lc_db_tx(db, 3, outbox_tx, &oc, err)) != LC_OK)
        goto out;
    lc_log_debug("instances stored", LC_LI("instances", nev), LC_LS("token", r->token_name));
out:
    for (size_t i = 0; i < nev; i++)
        lc_event_free(evs[i]);
    free(evs);
    return rc;
}

void gw_ingest_release(gw_ingest_item *items, size_t n)
{
    for (size_t i = 0; items && i < n; i++) {
        if (items[i].path[0] && unlink(items[i].path) != 0 && errno != ENOENT)
            lc_log_warn("could not remove a spool file", LC_LS("path", items[i].path),
                        LC_LS("error", strerror(errno)));
        items[i].path[0] = '\0';
        lc_dicom_header_free(items[i].h);
        items[i].h = NULL;
    }
}
