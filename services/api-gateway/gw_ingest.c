/*
 * gw_ingest.c: the way in shared by POST /api/v1/instances (one file or a zip of files) and
 * STOW-RS: spooled files are parsed and checked, then moved into the object store under
 * instances/<study>/<series>/<sop>.dcm and announced as radpipe.instance.stored events in one
 * outbox transaction; the dicom-indexer does the indexing. Storing again under the same SOP
 * Instance UID replaces the object, so a client may retry any failure. Durability overlaps
 * the upload: each spool file's fsync is queued (POSIX AIO, on glibc's threads) as soon as the
 * file is complete and runs while the rest of the body arrives; at commit the events are
 * inserted into the outbox first (their round trips overlap the last fsyncs), then, in the
 * same open transaction, the files are renamed into place once their fsyncs are done and each
 * directory (one per series) is fsync'd once, after its last rename, all before the commit.
 * Per-request state only (glibc's AIO threads only run the queued fsyncs).
 */
#include <aio.h>
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

/* Spool files of one request whose fsync may be in flight at once (each holds its fd). */
#define SYNC_INFLIGHT 32

/* The fsync of one spool file: queued to POSIX AIO, or done. */
struct gw_ingest_sync {
    struct aiocb cb; /* cb.aio_fildes is the file, open until the fsync is done */
    int done;
    int err; /* the fsync's errno, 0 when it succeeded */
};

/* Queue the fsync of the item's spool file fd (consumed: closed once the fsync is done). */
static lc_rc sync_start(gw_ingest_item *it, int fd, lc_err *err)
{
    struct gw_ingest_sync *s = calloc(1, sizeof(*s));
    if (!s) {
        close(fd);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    s->cb.aio_fildes = fd;
    s->cb.aio_sigevent.sigev_notify = SIGEV_NONE;
    if (aio_fsync(O_SYNC, &s->cb) != 0) { /* glibc could not queue it: sync it here */
        s->err = fsync(fd) == 0 ? 0 : errno;
        s->done = 1;
        close(fd);
    }
    it->sync = s;
    return LC_OK;
}

/* Wait for the item's queued fsync and close its file; 0 or the fsync's errno. */
static int sync_finish(gw_ingest_item *it)
{
    struct gw_ingest_sync *s = it->sync;
    if (!s->done) {
        const struct aiocb *one[1] = {&s->cb};
        while (aio_error(&s->cb) == EINPROGRESS)
            aio_suspend(one, 1, NULL);
        s->err = aio_error(&s->cb);
        if (aio_return(&s->cb) != 0 && s->err == 0)
            s->err = EIO;
        close(s->cb.aio_fildes);
        s->done = 1;
    }
    return s->err;
}

lc_rc gw_ingest_spool_close(gw_ingest_item *items, size_t i, int fd, lc_err *err)
{
    /* bound the files held open: the one queued SYNC_INFLIGHT files earlier must be done */
    if (i >= SYNC_INFLIGHT && items[i - SYNC_INFLIGHT].sync)
        (void)sync_finish(&items[i - SYNC_INFLIGHT]); /* its result is kept for the commit */
    return sync_start(&items[i], fd, err);
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
    static const char *const names[] = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"};
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
    const lc_instance_stored s = {.study_uid = h->study_instance_uid,
                                  .series_uid = h->series_instance_uid,
                                  .sop_uid = h->sop_instance_uid,
                                  .sop_class_uid = h->sop_class_uid,
                                  .store_url = lc_store_url(r->g->deps.store),
                                  .key = it->key,
                                  .size = it->size,
                                  .sha256 = it->sha256,
                                  .source_kind = kind,
                                  .source_name = r->token_name[0] ? r->token_name : NULL,
                                  .received_at = received_at};
    return lc_event_instance_stored(r->g->deps.source, &s, out, err);
}

/* Make the spool files of the accepted items durable: wait for the fsyncs queued while they
 * were received, and queue (in parallel) those of files spooled another way (one upload).
 * Concurrent fsyncs share the disk's cache flushes, so many files wait about as long as one.
 * LC_ERR_IO names the first file that could not be synced. */
static lc_rc sync_spool(gw_ingest_item *items, size_t n, lc_err *err)
{
    size_t *queued = malloc((n ? n : 1) * sizeof(*queued)), nq = 0, head = 0;
    lc_rc rc = LC_OK;
    if (!queued)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n && rc == LC_OK; i++) {
        if (items[i].failure || !items[i].h || items[i].sync)
            continue;
        if (nq - head >= SYNC_INFLIGHT)
            (void)sync_finish(&items[queued[head++]]);
        int fd = open(items[i].path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            rc = lc_err_set(err, LC_ERR_IO, "could not open the spool file \"%s\": %s",
                            items[i].path, strerror(errno));
        else if ((rc = sync_start(&items[i], fd, err)) == LC_OK)
            queued[nq++] = i;
    }
    /* every accepted file is waited for, also after a failure */
    for (size_t i = 0; i < n; i++) {
        if (items[i].failure || !items[i].h || !items[i].sync)
            continue;
        int e = sync_finish(&items[i]);
        if (e != 0 && rc == LC_OK)
            rc = lc_err_set(err, LC_ERR_IO, "could not sync the spool file \"%s\": %s",
                            items[i].path, strerror(e));
    }
    free(queued);
    return rc;
}

/* An accepted item's directory in the store (its study and series) and its position. */
typedef struct dir_ref {
    const char *study, *series;
    size_t i;
} dir_ref;

static int dir_ref_cmp(const void *a, const void *b)
{
    const dir_ref *x = a, *y = b;
    int c = strcmp(x->study, y->study);
    if (!c)
        c = strcmp(x->series, y->series);
    return c ? c : (x->i > y->i) - (x->i < y->i);
}

/* flags[i] for the put of accepted item i: the last item stored into each directory syncs it
 * (covering the entries moved there before it), the others defer their directory fsync. */
static lc_rc put_flags(const gw_ingest_item *items, size_t n, unsigned *flags, lc_err *err)
{
    dir_ref *d = malloc((n ? n : 1) * sizeof(*d));
    size_t m = 0;
    if (!d)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        flags[i] = LC_STORE_MOVE | LC_STORE_SRC_SYNCED;
        if (!items[i].failure && items[i].h)
            d[m++] = (dir_ref){items[i].h->study_instance_uid, items[i].h->series_instance_uid, i};
    }
    qsort(d, m, sizeof(*d), dir_ref_cmp);
    for (size_t j = 0; j + 1 < m; j++)
        if (strcmp(d[j].study, d[j + 1].study) == 0 && strcmp(d[j].series, d[j + 1].series) == 0)
            flags[d[j].i] |= LC_STORE_DEFER_DIRSYNC;
    free(d);
    return LC_OK;
}

/* The request's instance.stored events and the file work they announce: one transaction. */
typedef struct commit_ctx {
    gw_req *r;
    gw_ingest_item *items;
    size_t n;
    const unsigned *flags;
    lc_event *const *evs;
    size_t nev;
    int files_tried; /* place_files ran (a retried transaction must not run it again) */
} commit_ctx;

/* The accepted items' spool files made durable, then moved into the store under their keys. */
static lc_rc place_files(commit_ctx *c, lc_err *err)
{
    lc_rc rc = sync_spool(c->items, c->n, err);
    for (size_t i = 0; rc == LC_OK && i < c->n; i++) {
        gw_ingest_item *it = &c->items[i];
        if (it->failure || !it->h)
            continue;
        if ((rc = lc_store_put_file(c->r->g->deps.store, it->key, it->path, c->flags[i], err)) ==
            LC_OK)
            it->path[0] = '\0'; /* moved */
    }
    return rc;
}

/* The events go into the outbox first and the files are made durable and moved while the
 * transaction is open, before its commit: the insert's round trips overlap the fsyncs queued
 * as the parts arrived, and nothing is visible to the relay before the commit. */
static lc_rc commit_tx(lc_db *db, void *arg, lc_err *err)
{
    commit_ctx *c = arg;
    lc_rc rc = lc_outbox_add_events(db, c->r->g->deps.topic_prefix, LC_TOPIC_INSTANCE_STORED,
                                    c->evs, c->nev, err);
    if (rc != LC_OK)
        return rc;
    if (c->files_tried) /* lc_db_tx retries only after they moved (commit lost): in place */
        return LC_OK;
    c->files_tried = 1;
    rc = place_files(c, err);
    /* a store or spool failure is not the transaction's: never retried */
    return rc == LC_ERR_UNAVAILABLE || rc == LC_ERR_CONFLICT ? LC_ERR_IO : rc;
}

lc_rc gw_ingest_commit(gw_req *r, gw_ingest_item *items, size_t n, const char *kind, lc_err *err)
{
    char received_at[32];
    lc_event **evs = calloc(n ? n : 1, sizeof(*evs));
    unsigned *flags = malloc((n ? n : 1) * sizeof(*flags));
    size_t nev = 0;
    lc_db *db = NULL;
    lc_rc rc = LC_OK;

    if (!evs || !flags) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    if ((rc = put_flags(items, n, flags, err)) != LC_OK)
        goto out;
    lc_time_rfc3339(lc_wall_ms(), received_at);
    for (size_t i = 0; i < n; i++) {
        gw_ingest_item *it = &items[i];
        if (it->failure || !it->h)
            continue;
        const lc_dicom_header *h = it->h;
        snprintf(it->key, sizeof(it->key), "instances/%s/%s/%s.dcm", h->study_instance_uid,
                 h->series_instance_uid, h->sop_instance_uid);
        if ((rc = stored_event(r, it, kind, received_at, &evs[nev], err)) != LC_OK)
            goto out;
        nev++;
    }
    if (nev == 0)
        goto out;
    commit_ctx cc = {r, items, n, flags, evs, nev, 0};
    if ((rc = gw_db(r, &db, err)) != LC_OK || (rc = lc_db_tx(db, 3, commit_tx, &cc, err)) != LC_OK)
        goto out;
    lc_log_debug("instances stored", LC_LI("instances", nev), LC_LS("token", r->token_name));
out:
    for (size_t i = 0; i < nev; i++)
        lc_event_free(evs[i]);
    free(evs);
    free(flags);
    return rc;
}

void gw_ingest_release(gw_ingest_item *items, size_t n)
{
    for (size_t i = 0; items && i < n; i++) {
        if (items[i].sync) { /* its fsync must be over before its file and aiocb go */
            (void)sync_finish(&items[i]);
            free(items[i].sync);
            items[i].sync = NULL;
        }
        if (items[i].path[0] && unlink(items[i].path) != 0 && errno != ENOENT)
            lc_log_warn("could not remove a spool file", LC_LS("path", items[i].path),
                        LC_LS("error", strerror(errno)));
        items[i].path[0] = '\0';
        lc_dicom_header_free(items[i].h);
        items[i].h = NULL;
    }
}
