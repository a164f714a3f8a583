/*
 * upl_copy.c: moving bytes for an upload job. One listing per destination prefix tells which
 * objects exist already; those are HEADed and skipped when they hold the same digest, the
 * others sent without a HEAD. Copy threads send small instance objects with one request
 * each, at most the destination's limit at once; the job thread streams large objects and
 * tar archives through lc_store writers whose multipart state is recorded in PostgreSQL as
 * parts are acknowledged, so a restarted uploader resumes them (after checking the record
 * against the store's own list of parts). Every source object is checked against the size
 * and SHA-256 in the index while it is read.
 */
#include <errno.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "lc/log.h"
#include "lc/util.h"
#include "upl_run.h"

#define TAR_BLOCK 512

int upl_run_should_stop(upl_run *r)
{
    if (atomic_load(&r->cancel))
        return 1;
    if (r->j && lc_worker_job_should_stop(r->j)) {
        atomic_store(&r->cancel, 1);
        return 1;
    }
    return 0;
}

void upl_run_progress(upl_run *r, int force)
{
    int64_t now = lc_now_ms();
    if (!r->j || (!force && now - r->last_progress_ms < 1000))
        return;
    r->last_progress_ms = now;
    lc_worker_job_progress(r->j, atomic_load(&r->bytes_done), r->bytes_total, "bytes");
}

void upl_run_fail(upl_run *r, const lc_err *e)
{
    pthread_mutex_lock(&r->mu);
    if (!atomic_load(&r->failed)) {
        r->ferr = *e;
        atomic_store(&r->failed, 1);
    }
    pthread_mutex_unlock(&r->mu);
}

/* The bandwidth cap: account len bytes, then wait until they are due. */
static lc_rc throttle(upl_run *r, size_t len, int on_job_thread)
{
    long long rate = r->u->cfg->rate_limit;
    if (rate <= 0)
        return LC_OK;
    long long sent = atomic_fetch_add(&r->sent, (long long)len) + (long long)len;
    int64_t due = r->t0_ms + (int64_t)((double)sent * 1000.0 / (double)rate);
    for (;;) {
        int64_t left = due - lc_now_ms();
        if (left <= 0)
            return LC_OK;
        if (on_job_thread ? upl_run_should_stop(r) : atomic_load(&r->cancel))
            return LC_ERR_CANCELLED;
        lc_sleep_ms(left > 100 ? 100 : (int)left, NULL);
    }
}

static lc_rc mismatch(lc_err *err, const upl_inst *in, const char *what)
{
    return lc_err_set(err, LC_ERR_INVALID,
                      "stored object \"%s\" does not match its index entry (%s): it changed "
                      "after it was indexed",
                      in->store_key, what);
}

/* --- small objects, on copy threads ----------------------------------------------------- */

static lc_rc dest_acquire(upl_run *r, upl_dest *d)
{
    sem_t *sem = &d->sem;
    for (;;) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        if (sem_timedwait(sem, &ts) == 0)
            return LC_OK;
        if (atomic_load(&r->cancel) || atomic_load(&r->failed))
            return LC_ERR_CANCELLED;
    }
}

/* --- what the destination holds already ------------------------------------------------- */

typedef struct listing {
    upl_obj **objs; /* the group's objects, sorted by key */
    size_t n;
    size_t seen, max;
} listing;

static int cmp_obj_key(const void *a, const void *b)
{
    return strcmp((*(upl_obj *const *)a)->key, (*(upl_obj *const *)b)->key);
}

static int listed_cb(void *ctx, const char *key, const lc_store_stat *st)
{
    listing *l = ctx;
    if (++l->seen > l->max)
        return 1; /* a prefix crowded with other objects: HEAD each of ours instead */
    upl_obj probe = {.key = (char *)key}, *pp = &probe;
    upl_obj **hit = bsearch(&pp, l->objs, l->n, sizeof(*l->objs), cmp_obj_key);
    if (hit) {
        (*hit)->listed = 1;
        (*hit)->listed_size = st->size;
    }
    return 0;
}

void upl_list_existing(upl_run *r)
{
    listing l = {0};
    if (!(l.objs = calloc(r->nobjs ? r->nobjs : 1, sizeof(*l.objs))))
        return;
    for (size_t gi = 0; gi < r->ngroups; gi++) {
        upl_group *g = &r->groups[gi];
        char *prefix = NULL;
        lc_err e = {0};
        if (!lc_store_multipart_threshold(g->dest->store))
            continue; /* file:// keeps no digest: nothing to compare */
        l.n = l.seen = 0;
        for (size_t i = 0; i < r->nobjs; i++)
            if (r->objs[i].g == g)
                l.objs[l.n++] = &r->objs[i];
        l.max = 4 * l.n + 1000;
        qsort(l.objs, l.n, sizeof(*l.objs), cmp_obj_key);
        if (asprintf(&prefix, "%s%s", g->prefix, *g->prefix ? "/" : "") < 0)
            break;
        lc_rc rc = lc_store_list(g->dest->store, prefix, listed_cb, &l, &e);
        free(prefix);
        g->listed = rc == LC_OK && l.seen <= l.max;
        if (rc != LC_OK) /* the HEADs will say more (or the PUTs, for a missing bucket) */
            lc_log_debug("could not list the destination", LC_LS("error", lc_err_msg(&e)));
    }
    free(l.objs);
}

/* 1 when the destination already holds the object with the same digest and size. */
static lc_rc already_there(upl_obj *o, int *yes, lc_err *err)
{
    lc_store_stat st;
    *yes = 0;
    if (!lc_store_multipart_threshold(o->g->dest->store))
        return LC_OK; /* file:// keeps no digest: rewriting gives the same bytes */
    if (o->g->listed && (!o->listed || o->listed_size != o->size))
        return LC_OK; /* missing, or other bytes: no HEAD needed */
    lc_rc rc = lc_store_head(o->g->dest->store, o->key, &st, err);
    if (rc == LC_ERR_NOT_FOUND)
        return LC_OK;
    if (rc != LC_OK)
        return rc;
    *yes = st.size == o->size && strcmp(st.digest, o->digest) == 0;
    return LC_OK;
}

static lc_rc copy_small(upl_run *r, upl_obj *o, lc_err *err)
{
    upl_inst *in = o->members[0];
    void *buf = NULL;
    size_t len = 0;
    int there = 0;
    char hex[65];
    lc_rc rc = already_there(o, &there, err);
    if (rc != LC_OK || there) {
        if (rc == LC_OK) {
            o->skipped = 1;
            lc_strlcpy(o->sha256, in->sha256, sizeof(o->sha256));
            atomic_fetch_add(&r->skipped, 1);
            atomic_fetch_add(&r->bytes_done, o->size);
            lc_counter_inc(r->u->skipped);
        }
        return rc;
    }
    rc = lc_store_get_buf(r->u->svc->store, in->store_key, (size_t)in->size + 1, &buf, &len, err);
    if (rc == LC_ERR_TOO_LARGE)
        return mismatch(err, in, "size");
    if (rc != LC_OK)
        return lc_err_wrap(err, "could not read instance %s", in->sop);
    lc_sha256_hex(buf, len, hex);
    if ((int64_t)len != in->size)
        rc = mismatch(err, in, "size");
    else if (strcmp(hex, in->sha256) != 0)
        rc = mismatch(err, in, "sha256");
    else if ((rc = throttle(r, len, 0)) != LC_OK)
        lc_err_set(err, rc, "upload cancelled");
    if (rc == LC_OK) {
        const lc_store_put_opts po = {.digest = o->digest, .sha256 = hex};
        rc = lc_store_put_buf_opts(o->g->dest->store, o->key, buf, len, &po, err);
    }
    free(buf);
    if (rc != LC_OK)
        return rc;
    lc_strlcpy(o->sha256, hex, sizeof(o->sha256));
    atomic_fetch_add(&r->written, 1);
    atomic_fetch_add(&r->bytes_done, o->size);
    lc_counter_add(r->u->bytes, (double)len);
    lc_counter_inc(r->u->objects);
    return LC_OK;
}

void *upl_copy_thread(void *arg)
{
    upl_run *r = arg;
    for (;;) {
        if (atomic_load(&r->cancel) || atomic_load(&r->failed))
            break;
        size_t i = atomic_fetch_add(&r->next, 1);
        if (i >= r->nsmall)
            break;
        upl_obj *o = &r->objs[r->small[i]];
        lc_err e = {0};
        lc_rc rc = dest_acquire(r, o->g->dest);
        if (rc != LC_OK)
            break;
        rc = copy_small(r, o, &e);
        sem_post(&o->g->dest->sem);
        if (rc != LC_OK) {
            if (rc == LC_ERR_CANCELLED)
                break;
            lc_err_wrap(&e, "could not archive \"%s\"", o->key);
            upl_run_fail(r, &e);
            break;
        }
    }
    return NULL;
}

/* --- streamed objects and tars, on the job thread --------------------------------------- */

typedef struct stream {
    upl_run *r;
    upl_obj *o;
    lc_store_writer *w; /* NULL: only hash */
    lc_sha256 *whole;   /* the object's bytes (tars; an instance's are its member's) */
    lc_sha256 *member;  /* the current source object's bytes */
    int64_t member_len;
    int64_t written;
    lc_err err;
    lc_rc rc;
} stream;

static int emit(stream *s, const void *buf, size_t len)
{
    if (s->w && (s->rc = lc_store_writer_write(s->w, buf, len, &s->err)) != LC_OK)
        return 1;
    if (s->whole)
        lc_sha256_update(s->whole, buf, len);
    s->written += (int64_t)len;
    if (s->w) {
        atomic_fetch_add(&s->r->bytes_done, (long long)len);
        lc_counter_add(s->r->u->bytes, (double)len);
        upl_run_progress(s->r, 0);
        if ((s->rc = throttle(s->r, len, 1)) != LC_OK) {
            lc_err_set(&s->err, s->rc, "upload cancelled");
            return 1;
        }
    } else if (upl_run_should_stop(s->r)) {
        s->rc = lc_err_set(&s->err, LC_ERR_CANCELLED, "upload cancelled");
        return 1;
    }
    return 0;
}

static int source_sink(void *ctx, const void *buf, size_t len)
{
    stream *s = ctx;
    lc_sha256_update(s->member, buf, len);
    s->member_len += (int64_t)len;
    return emit(s, buf, len);
}

/* One source object into the stream, checked against the index. */
static lc_rc stream_member(stream *s, upl_inst *in, lc_err *err)
{
    char hex[65];
    s->member = lc_sha256_new();
    s->member_len = 0;
    if (!s->member)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    lc_rc rc = lc_store_read(s->r->u->svc->store, in->store_key, 0, -1, source_sink, s, err);
    lc_sha256_final_hex(s->member, hex);
    lc_sha256_free(s->member);
    s->member = NULL;
    if (rc == LC_ERR_CANCELLED && s->rc != LC_OK) {
        *err = s->err;
        return s->rc;
    }
    if (rc != LC_OK)
        return lc_err_wrap(err, "could not read instance %s", in->sop);
    if (s->member_len != in->size)
        return mismatch(err, in, "size");
    if (strcmp(hex, in->sha256) != 0)
        return mismatch(err, in, "sha256");
    return LC_OK;
}

static lc_rc stream_bytes(stream *s, const void *buf, size_t len, lc_err *err)
{
    if (emit(s, buf, len) != 0) {
        *err = s->err;
        return s->rc;
    }
    return LC_OK;
}

/* The object's bytes: the instance itself, or the tar of its members. */
static lc_rc stream_object(stream *s, lc_err *err)
{
    upl_obj *o = s->o;
    static const unsigned char zeros[2 * TAR_BLOCK];
    lc_rc rc = LC_OK;
    if (!o->tar)
        return stream_member(s, o->members[0], err);
    for (size_t i = 0; i < o->nmembers && rc == LC_OK; i++) {
        unsigned char hdr[TAR_BLOCK];
        upl_inst *in = o->members[i];
        if ((rc = upl_tar_header(o->names[i], in->size, hdr, err)) != LC_OK ||
            (rc = stream_bytes(s, hdr, sizeof(hdr), err)) != LC_OK ||
            (rc = stream_member(s, in, err)) != LC_OK)
            break;
        int64_t pad = upl_tar_padding(in->size);
        if (pad)
            rc = stream_bytes(s, zeros, (size_t)pad, err);
    }
    if (rc == LC_OK)
        rc = stream_bytes(s, zeros, sizeof(zeros), err);
    if (rc == LC_OK && s->written != o->size)
        rc = lc_err_set(err, LC_ERR_INTERNAL, "archive \"%s\" has %lld bytes, planned %lld", o->key,
                        (long long)s->written, (long long)o->size);
    return rc;
}

lc_rc upl_tar_hash(upl_run *r, upl_obj *o, lc_err *err)
{
    stream s = {.r = r, .o = o, .whole = lc_sha256_new()};
    if (!s.whole)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    lc_rc rc = stream_object(&s, err);
    if (rc == LC_OK)
        lc_sha256_final_hex(s.whole, o->sha256);
    lc_sha256_free(s.whole);
    return rc;
}

/* Writer callbacks: record the upload and each acknowledged part. */
typedef struct cbctx {
    upl_run *r;
    upl_obj *o;
    const char *dest;
} cbctx;

static lc_rc on_upload(void *ctx, const char *upload_id, int64_t part_size, lc_err *err)
{
    cbctx *c = ctx;
    return upl_state_begin(c->r->j->db, c->dest, c->o->key, upload_id, c->o->digest, part_size,
                           c->r->j->job->id, err);
}

static lc_rc on_part(void *ctx, const char *upload_id, const lc_store_part *p, lc_err *err)
{
    cbctx *c = ctx;
    (void)upload_id;
    upl_run_progress(c->r, 0);
    return upl_state_part(c->r->j->db, c->dest, c->o->key, p, err);
}

static int should_stop(void *ctx)
{
    return upl_run_should_stop(((cbctx *)ctx)->r);
}

typedef struct orphan {
    const char *key;
    char **ids;
    size_t n;
} orphan;

static int orphan_cb(void *ctx, const char *key, const char *upload_id)
{
    orphan *o = ctx;
    if (strcmp(key, o->key) != 0 || o->n >= 64)
        return 0;
    char **v = realloc(o->ids, (o->n + 1) * sizeof(*v));
    if (!v)
        return 1;
    o->ids = v;
    if ((v[o->n] = strdup(upload_id)))
        o->n++;
    return 0;
}

/* Uploads of this key the store holds but the database does not know (a crash between
 * CreateMultipartUpload and recording it): abort them so none is left behind. */
static void abort_orphans(lc_store *st, const char *key)
{
    orphan o = {.key = key};
    lc_err e;
    if (lc_store_mpu_list(st, key, orphan_cb, &o, &e) != LC_OK) {
        if (e.rc != LC_ERR_UNSUPPORTED)
            lc_log_warn("could not list incomplete uploads", LC_LS("error", e.msg));
    }
    for (size_t i = 0; i < o.n; i++) {
        if (lc_store_mpu_abort(st, key, o.ids[i], &e) != LC_OK)
            lc_log_warn("could not abort an orphaned upload", LC_LS("error", e.msg));
        free(o.ids[i]);
    }
    free(o.ids);
}

static int etag_equal(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la >= 2 && a[0] == '"' && a[la - 1] == '"') {
        a++;
        la -= 2;
    }
    if (lb >= 2 && b[0] == '"' && b[lb - 1] == '"') {
        b++;
        lb -= 2;
    }
    return la == lb && strncmp(a, b, la) == 0;
}

/* Make a recorded upload's parts what the store holds: a recorded part the store lacks is
 * sent again; a part the store holds but the record lacks (acknowledged just before a
 * crash) goes to the writer without its SHA-256, to be kept when its ETag is the MD5 of the
 * same bytes. LC_ERR_NOT_FOUND: the store no longer has the upload. */
static lc_rc reconcile_parts(lc_store *st, const char *key, upl_resume *res, lc_err *err)
{
    lc_store_part *listed = NULL;
    size_t n = 0;
    lc_err e = {0};
    lc_rc rc = lc_store_mpu_list_parts(st, key, res->upload_id, &listed, &n, &e);
    if (rc == LC_ERR_NOT_FOUND) {
        *err = e;
        return rc;
    }
    if (rc != LC_OK) { /* keep to the record: the parts' uploads will tell */
        lc_log_warn("could not list the parts of an upload to resume", LC_LS("key", key),
                    LC_LS("error", lc_err_msg(&e)));
        return LC_OK;
    }
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < res->nparts; k++)
            if (res->parts[k].number == listed[i].number && res->parts[k].size == listed[i].size &&
                etag_equal(res->parts[k].etag, listed[i].etag))
                listed[i] = res->parts[k]; /* recorded: with its SHA-256 */
    free(res->parts);
    res->parts = listed;
    res->nparts = n;
    return LC_OK;
}

static lc_rc copy_streamed_once(upl_run *r, upl_obj *o, lc_err *err)
{
    lc_store *st = o->g->dest->store;
    const char *durl = lc_store_url(st);
    upl_resume res = {0};
    lc_store_writer *w = NULL;
    cbctx cb = {r, o, durl};
    stream s = {.r = r, .o = o};
    int remote = lc_store_multipart_threshold(st) > 0;
    lc_rc rc = LC_OK;

    if (remote) {
        if ((rc = upl_state_load(r->j->db, durl, o->key, &res, err)) != LC_OK)
            return rc;
        if (res.upload_id && strcmp(res.digest, o->digest) != 0) {
            /* the object will hold something else now: start over */
            lc_err e;
            lc_store_mpu_abort(st, o->key, res.upload_id, &e);
            upl_resume_free(&res);
            if ((rc = upl_state_clear(r->j->db, durl, o->key, err)) != LC_OK)
                return rc;
        }
        if (res.upload_id && (rc = reconcile_parts(st, o->key, &res, err)) != LC_OK) {
            if (rc != LC_ERR_NOT_FOUND)
                goto out;
            /* completed by an attempt whose answer was lost, or aborted: start over */
            lc_log_warn("the upload to resume no longer exists: starting over",
                        LC_LS("key", o->key), LC_LS("error", lc_err_msg(err)));
            upl_resume_free(&res);
            if ((rc = upl_state_clear(r->j->db, durl, o->key, err)) != LC_OK)
                return rc;
        }
        if (!res.upload_id)
            abort_orphans(st, o->key);
        else
            lc_log_info("resuming upload", LC_LS("key", o->key),
                        LC_LI("parts_done", (long long)res.nparts));
    }
    lc_store_writer_opts wo = {
        .digest = o->digest,
        .size_hint = o->size,
        .part_size = res.upload_id ? res.part_size : 0,
        .concurrency = o->g->dest->limit < 8 ? o->g->dest->limit : 0,
        .resume_upload_id = res.upload_id,
        .done = res.parts,
        .ndone = res.nparts,
        .on_upload = remote ? on_upload : NULL,
        .on_part = remote ? on_part : NULL,
        .should_stop = should_stop,
        .ctx = &cb,
    };
    if ((rc = lc_store_writer_open_opts(st, o->key, &wo, &w, err)) != LC_OK)
        goto out;
    if (o->tar && !(s.whole = lc_sha256_new())) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    s.w = w;
    rc = stream_object(&s, err);
    if (rc == LC_OK) {
        rc = lc_store_writer_commit(w, err);
        w = NULL;
    }
    if (rc == LC_OK) {
        if (s.whole)
            lc_sha256_final_hex(s.whole, o->sha256);
        else /* checked against the index while it was read */
            lc_strlcpy(o->sha256, o->members[0]->sha256, sizeof(o->sha256));
        atomic_fetch_add(&r->written, 1);
        lc_counter_inc(r->u->objects);
        if (remote)
            rc = upl_state_clear(r->j->db, durl, o->key, err);
    }
out:;
    /* keep a multipart upload for a resume after a stop or a transient error; not when its
     * recorded parts no longer match (LC_ERR_CONFLICT from the writer) */
    int keep = rc == LC_ERR_CANCELLED || (lc_rc_is_transient(rc) && rc != LC_ERR_CONFLICT);
    if (w) {
        if (keep)
            lc_store_writer_detach(w);
        else
            lc_store_writer_abort(w);
    }
    if (rc != LC_OK && !keep && remote) {
        /* permanent: the writer aborted the upload; forget it */
        lc_err e;
        upl_state_clear(r->j->db, durl, o->key, &e);
    }
    lc_sha256_free(s.whole);
    upl_resume_free(&res);
    return rc;
}

/* The object is in place: an upload still recorded for it (the crash came after
 * CompleteMultipartUpload, or another run finished it) is aborted and forgotten. */
static void forget_upload(upl_run *r, upl_obj *o)
{
    lc_store *st = o->g->dest->store;
    upl_resume res = {0};
    lc_err e = {0};
    if (upl_state_load(r->j->db, lc_store_url(st), o->key, &res, &e) != LC_OK || !res.upload_id)
        return;
    if (lc_store_mpu_abort(st, o->key, res.upload_id, &e) != LC_OK)
        lc_log_warn("could not abort a finished object's upload", LC_LS("key", o->key),
                    LC_LS("error", lc_err_msg(&e)));
    else
        upl_state_clear(r->j->db, lc_store_url(st), o->key, &e);
    upl_resume_free(&res);
}

lc_rc upl_copy_streamed(upl_run *r, upl_obj *o, lc_err *err)
{
    int there = 0;
    lc_rc rc = already_there(o, &there, err);
    if (rc != LC_OK)
        return rc;
    if (there) {
        o->skipped = 1;
        atomic_fetch_add(&r->skipped, 1);
        atomic_fetch_add(&r->bytes_done, o->size);
        lc_counter_inc(r->u->skipped);
        if (!o->tar)
            lc_strlcpy(o->sha256, o->members[0]->sha256, sizeof(o->sha256));
        forget_upload(r, o);
        return LC_OK;
    }
    int64_t before = atomic_load(&r->bytes_done);
    rc = copy_streamed_once(r, o, err);
    if (rc == LC_ERR_CONFLICT && strstr(lc_err_msg(err), "changed since the upload began")) {
        /* the recorded parts belong to other bytes: the writer aborted that upload */
        lc_log_warn("restarting an upload whose recorded parts no longer match",
                    LC_LS("key", o->key));
        atomic_store(&r->bytes_done, before);
        rc = copy_streamed_once(r, o, err);
    }
    return rc;
}
