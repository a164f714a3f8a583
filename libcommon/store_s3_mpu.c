/*
 * store_s3_mpu.c: S3 multipart uploads (create, upload part, complete, abort, list parts,
 * list uploads) and the s3:// streaming writer: bytes are cut into parts of the part size,
 * each hashed (x-amz-content-sha256 plus x-amz-checksum-sha256 or Content-MD5) and sent with
 * up to `concurrency` parts in flight on one curl multi handle (driven while the next part
 * fills), each retried on its own; objects below the multipart threshold go out as one PUT
 * at commit. A resumed writer skips the parts it is given (recorded ones by SHA-256, listed
 * ones by their MD5 ETag). A writer belongs to the thread that opened it; its callbacks run
 * on that thread.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include "lc/log.h"
#include "lc/util.h"
#include "store_s3_internal.h"

static lc_rc nomem(lc_err *err)
{
    return lc_err_set(err, LC_ERR_NOMEM, "out of memory building an object store request");
}

static int use_sha256(const s3store *st)
{
    return strcmp(st->cfg.checksum, "sha256") == 0;
}

/* "k1=v1&k2=v2" with the upload id encoded; parameters given in sorted order by callers. */
static char *upload_query(const char *before, const char *upload_id, const char *after)
{
    char *eid = s3_escape(upload_id, 0), *q = NULL;
    if (!eid)
        return NULL;
    if (asprintf(&q, "%s%suploadId=%s%s%s", before ? before : "", before ? "&" : "", eid,
                 after ? "&" : "", after ? after : "") < 0)
        q = NULL;
    free(eid);
    return q;
}

/* --- create / part / complete / abort ---------------------------------------------------- */

typedef struct idctx {
    char *upload_id;
} idctx;

static void id_fn(void *ud, const char *path, const char *text)
{
    idctx *x = ud;
    if (text && strcmp(path, "UploadId") == 0 && !x->upload_id)
        x->upload_id = strdup(text);
}

lc_rc s3_mpu_create(lc_store *s, const char *key, const char *digest, char **upload_id, lc_err *err)
{
    s3store *st = s3_of(s);
    s3call c = {
        .method = "POST", .what = "start an upload of", .key = key, .body = "", .body_len = 0};
    idctx x = {0};
    lc_rc rc;
    if (!(c.url = s3_url(st, key, "uploads=")) ||
        s3_add_header(&c, "x-amz-content-sha256: %s",
                      "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855") != 0 ||
        s3_add_header(&c, "Content-Type: application/octet-stream") != 0 ||
        (use_sha256(st) && s3_add_header(&c, "x-amz-checksum-algorithm: SHA256") != 0) ||
        (digest && s3_add_header(&c, S3_DIGEST_HDR ": %s", digest) != 0)) {
        rc = nomem(err);
        goto out;
    }
    if ((rc = s3_call_perform(st, &c, err)) != LC_OK)
        goto out;
    char root[64];
    rc = s3_xml_parse(c.resp.data ? c.resp.data : "", c.resp.len, root, id_fn, &x, err);
    if (rc == LC_OK && (!x.upload_id || !*x.upload_id))
        rc = lc_err_set(err, LC_ERR_STORE, "object store gave no upload id for \"%s\"", key);
    if (rc == LC_OK) {
        *upload_id = x.upload_id;
        x.upload_id = NULL;
    }
out:
    free(x.upload_id);
    s3_call_free(&c);
    return rc;
}

/* Fill c for one part; sha256_hex is the part's digest (computed when NULL). */
static int part_call(s3store *st, s3call *c, const char *key, const char *upload_id, int number,
                     const void *buf, size_t len, const char *sha256_hex)
{
    char before[32];
    snprintf(before, sizeof(before), "partNumber=%d", number);
    char *q = upload_query(before, upload_id, NULL);
    *c = (s3call){
        .method = "PUT", .what = "upload a part of", .key = key, .body = buf, .body_len = len};
    c->url = q ? s3_url(st, key, q) : NULL;
    free(q);
    if (!c->url || s3_add_body_headers(st, c, buf, len, sha256_hex) != 0)
        return -1;
    return 0;
}

static lc_rc part_done(s3call *c, int number, size_t len, const char *sha256, lc_store_part *out,
                       lc_err *err)
{
    if (!c->etag[0])
        return lc_err_set(err, LC_ERR_STORE, "object store gave no ETag for part %d of \"%s\"",
                          number, c->key);
    memset(out, 0, sizeof(*out));
    out->number = number;
    out->size = (int64_t)len;
    lc_strlcpy(out->etag, c->etag, sizeof(out->etag));
    lc_strlcpy(out->sha256, sha256, sizeof(out->sha256));
    return LC_OK;
}

lc_rc s3_mpu_put_part(lc_store *s, const char *key, const char *upload_id, int number,
                      const void *buf, size_t len, lc_store_part *out, lc_err *err)
{
    s3store *st = s3_of(s);
    s3call c;
    char hex[65];
    lc_rc rc;
    s3_sha256(buf, len, hex, NULL);
    if (part_call(st, &c, key, upload_id, number, buf, len, hex) != 0) {
        rc = nomem(err);
        goto out;
    }
    int64_t t0 = lc_now_ms();
    if ((rc = s3_call_perform(st, &c, err)) == LC_OK) {
        lc_histogram_observe(st->part_seconds, (double)(lc_now_ms() - t0) / 1000.0);
        rc = part_done(&c, number, len, hex, out, err);
    }
out:
    s3_call_free(&c);
    return rc;
}

static int xml_escape_into(char *dst, size_t cap, const char *s)
{
    size_t n = 0;
    for (; *s; s++) {
        const char *r = *s == '&' ? "&amp;" : *s == '<' ? "&lt;" : *s == '>' ? "&gt;" : NULL;
        size_t l = r ? strlen(r) : 1;
        if (n + l >= cap)
            return -1;
        memcpy(dst + n, r ? r : s, l);
        n += l;
    }
    dst[n] = '\0';
    return 0;
}

lc_rc s3_mpu_complete(lc_store *s, const char *key, const char *upload_id,
                      const lc_store_part *parts, size_t n, lc_err *err)
{
    s3store *st = s3_of(s);
    s3call c = {0};
    lc_rc rc = LC_OK;
    size_t cap = 256 + n * 320, len = 0;
    char *body = malloc(cap), *q = upload_query(NULL, upload_id, NULL);
    int64_t total = 0;
    if (!body || !q) {
        rc = nomem(err);
        goto out;
    }
    len += (size_t)snprintf(body, cap,
                            "<CompleteMultipartUpload "
                            "xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">");
    for (size_t i = 0; i < n; i++) {
        char etag[200], b64[45] = "";
        if (xml_escape_into(etag, sizeof(etag), parts[i].etag) != 0) {
            rc = lc_err_set(err, LC_ERR_INVALID, "invalid ETag of part %d", parts[i].number);
            goto out;
        }
        if (use_sha256(st) && strlen(parts[i].sha256) == 64)
            s3_hex_to_b64(parts[i].sha256, b64);
        len += (size_t)snprintf(body + len, cap - len,
                                "<Part><PartNumber>%d</PartNumber><ETag>%s</ETag>%s%s%s</Part>",
                                parts[i].number, etag, b64[0] ? "<ChecksumSHA256>" : "", b64,
                                b64[0] ? "</ChecksumSHA256>" : "");
        total += parts[i].size;
    }
    len += (size_t)snprintf(body + len, cap - len, "</CompleteMultipartUpload>");
    c = (s3call){.method = "POST",
                 .what = "complete the upload of",
                 .key = key,
                 .body = body,
                 .body_len = len};
    if (!(c.url = s3_url(st, key, q)) || s3_add_body_headers(st, &c, body, len, NULL) != 0 ||
        s3_add_header(&c, "Content-Type: application/xml") != 0) {
        rc = nomem(err);
        goto out;
    }
    rc = s3_call_perform(st, &c, err);
    if (rc == LC_ERR_NOT_FOUND) {
        /* NoSuchUpload: an earlier attempt whose answer was lost may have completed it */
        lc_store_stat sst;
        lc_err e2;
        if (lc_store_head(s, key, &sst, &e2) == LC_OK && sst.size == total)
            rc = LC_OK;
    }
out:
    s3_call_free(&c);
    free(body);
    free(q);
    return rc;
}

lc_rc s3_mpu_abort(lc_store *s, const char *key, const char *upload_id, lc_err *err)
{
    s3store *st = s3_of(s);
    s3call c = {.method = "DELETE", .what = "abort the upload of", .key = key};
    char *q = upload_query(NULL, upload_id, NULL);
    lc_rc rc;
    if (!q || !(c.url = s3_url(st, key, q)) || s3_add_body_headers(st, &c, NULL, 0, NULL) != 0) {
        rc = nomem(err);
        goto out;
    }
    rc = s3_call_perform(st, &c, err);
    if (rc == LC_ERR_NOT_FOUND)
        rc = LC_OK;
out:
    free(q);
    s3_call_free(&c);
    return rc;
}

/* --- listings ---------------------------------------------------------------------------- */

typedef struct partsctx {
    lc_store_part *v;
    size_t n, cap;
    lc_store_part cur;
    int truncated, nomem;
    long marker;
} partsctx;

static void parts_fn(void *ud, const char *path, const char *text)
{
    partsctx *p = ud;
    if (!text) {
        if (strcmp(path, "Part") == 0) {
            if (p->n == p->cap) {
                size_t cap = p->cap ? p->cap * 2 : 64;
                lc_store_part *v = realloc(p->v, cap * sizeof(*v));
                if (!v) {
                    p->nomem = 1;
                    return;
                }
                p->v = v;
                p->cap = cap;
            }
            p->v[p->n++] = p->cur;
            memset(&p->cur, 0, sizeof(p->cur));
        }
        return;
    }
    if (strcmp(path, "Part/PartNumber") == 0)
        p->cur.number = atoi(text);
    else if (strcmp(path, "Part/ETag") == 0)
        lc_strlcpy(p->cur.etag, text, sizeof(p->cur.etag));
    else if (strcmp(path, "Part/Size") == 0)
        p->cur.size = strtoll(text, NULL, 10);
    else if (strcmp(path, "IsTruncated") == 0)
        p->truncated = strcmp(text, "true") == 0;
    else if (strcmp(path, "NextPartNumberMarker") == 0)
        p->marker = atol(text);
}

static int part_cmp(const void *a, const void *b)
{
    return ((const lc_store_part *)a)->number - ((const lc_store_part *)b)->number;
}

lc_rc s3_mpu_list_parts(lc_store *s, const char *key, const char *upload_id, lc_store_part **parts,
                        size_t *n, lc_err *err)
{
    s3store *st = s3_of(s);
    partsctx p = {0};
    lc_rc rc = LC_OK;
    for (int page = 0; page < 1000; page++) {
        char before[48];
        snprintf(before, sizeof(before), "part-number-marker=%ld", p.marker);
        char *q = upload_query(p.marker ? before : NULL, upload_id, NULL);
        if (!q) {
            rc = nomem(err);
            break;
        }
        p.truncated = 0;
        rc = s3_get_xml(st, key, q, "list the parts of", key, parts_fn, &p, err);
        free(q);
        if (rc == LC_OK && p.nomem)
            rc = nomem(err);
        if (rc != LC_OK || !p.truncated || !p.marker)
            break;
    }
    if (rc != LC_OK) {
        free(p.v);
        return rc;
    }
    if (p.n)
        qsort(p.v, p.n, sizeof(*p.v), part_cmp);
    *parts = p.v;
    *n = p.n;
    return LC_OK;
}

typedef struct uploadsctx {
    const s3store *st;
    lc_store_mpu_list_fn fn;
    void *ctx;
    char key[1100], id[1100];
    char *next_key, *next_id;
    int truncated, stopped;
} uploadsctx;

static void uploads_fn(void *ud, const char *path, const char *text)
{
    uploadsctx *u = ud;
    if (u->stopped)
        return;
    if (!text) {
        size_t pl = strlen(u->st->prefix);
        if (strcmp(path, "Upload") == 0 && strncmp(u->key, u->st->prefix, pl) == 0 &&
            lc_store_key_valid(u->key + pl) && u->id[0] && u->fn(u->ctx, u->key + pl, u->id) != 0)
            u->stopped = 1;
        if (strcmp(path, "Upload") == 0)
            u->key[0] = u->id[0] = '\0';
        return;
    }
    if (strcmp(path, "Upload/Key") == 0)
        lc_strlcpy(u->key, text, sizeof(u->key));
    else if (strcmp(path, "Upload/UploadId") == 0)
        lc_strlcpy(u->id, text, sizeof(u->id));
    else if (strcmp(path, "IsTruncated") == 0)
        u->truncated = strcmp(text, "true") == 0;
    else if (strcmp(path, "NextKeyMarker") == 0) {
        free(u->next_key);
        u->next_key = strdup(text);
    } else if (strcmp(path, "NextUploadIdMarker") == 0) {
        free(u->next_id);
        u->next_id = strdup(text);
    }
}

lc_rc s3_mpu_list(lc_store *s, const char *prefix, lc_store_mpu_list_fn fn, void *ctx, lc_err *err)
{
    s3store *st = s3_of(s);
    uploadsctx u = {.st = st, .fn = fn, .ctx = ctx};
    lc_rc rc = LC_OK;
    char *full = NULL, *ep = NULL;
    if (asprintf(&full, "%s%s", st->prefix, prefix) < 0 || !(ep = s3_escape(full, 0))) {
        free(full);
        return nomem(err);
    }
    for (int page = 0; page < 10000; page++) {
        char *q = NULL, *ek = NULL, *ei = NULL;
        int r;
        if (u.next_key) { /* sorted: key-marker, prefix, upload-id-marker, uploads */
            ek = s3_escape(u.next_key, 0);
            ei = s3_escape(u.next_id ? u.next_id : "", 0);
            r = ek && ei ? asprintf(&q, "key-marker=%s&prefix=%s&upload-id-marker=%s&uploads=", ek,
                                    ep, ei)
                         : -1;
        } else {
            r = asprintf(&q, "prefix=%s&uploads=", ep);
        }
        free(ek);
        free(ei);
        if (r < 0) {
            rc = nomem(err);
            break;
        }
        u.truncated = 0;
        rc = s3_get_xml(st, NULL, q, "list the uploads of", prefix, uploads_fn, &u, err);
        free(q);
        if (rc != LC_OK || u.stopped || !u.truncated || !u.next_key)
            break;
    }
    free(u.next_key);
    free(u.next_id);
    free(full);
    free(ep);
    return rc;
}

/* --- the streaming writer ---------------------------------------------------------------- */

enum { SLOT_FREE, SLOT_FILLING, SLOT_READY, SLOT_INFLIGHT, SLOT_RETRY };

typedef struct slot {
    int state;
    char *buf;
    size_t len, cap;
    lc_sha256 *hash; /* of buf[0..len), kept as bytes arrive (NULL: none yet) */
    int number;
    char sha256[65];
    s3call call;
    CURL *easy;
    int attempt;
    int64_t due_ms, t0_ms;
} slot;

typedef struct s3writer {
    lc_store_writer base;
    lc_store *s;
    s3store *st;
    char *key;
    char *digest;
    lc_store_writer_opts o; /* callbacks and resume state (borrowed pointers) */
    int64_t part_size, threshold, total;
    int conc, inflight;
    slot *slots;
    int nslots;
    slot *cur;
    int next_number;
    int multipart;  /* decided: parts go out as they fill */
    int64_t pumped; /* w->total when transfers were last driven */
    CURLM *multi;
    char *upload_id;
    lc_store_part *parts;
    size_t nparts, capparts;
    int failed;
    lc_err ferr;
} s3writer;

static lc_rc wfail(s3writer *w, lc_err *err, lc_rc rc, const char *msg)
{
    if (!w->failed) {
        w->failed = 1;
        w->ferr.rc = rc;
        lc_strlcpy(w->ferr.msg, msg, sizeof(w->ferr.msg));
    }
    return lc_err_set(err, w->ferr.rc, "%s", w->ferr.msg);
}

static lc_rc wfail_err(s3writer *w, lc_err *err, const lc_err *e)
{
    return wfail(w, err, e->rc, lc_err_msg(e));
}

static int stopping(s3writer *w)
{
    return w->o.should_stop && w->o.should_stop(w->o.ctx);
}

static void slot_release(s3writer *w, slot *sl)
{
    if (sl->easy) {
        if (sl->state == SLOT_INFLIGHT)
            curl_multi_remove_handle(w->multi, sl->easy);
        curl_easy_cleanup(sl->easy);
        sl->easy = NULL;
    }
    if (sl->state == SLOT_INFLIGHT)
        w->inflight--;
    s3_call_free(&sl->call);
    sl->state = SLOT_FREE;
    sl->len = 0;
    sl->attempt = 0;
}

static void writer_free(s3writer *w)
{
    for (int i = 0; w->slots && i < w->nslots; i++) {
        slot_release(w, &w->slots[i]);
        lc_sha256_free(w->slots[i].hash);
        free(w->slots[i].buf);
    }
    if (w->multi)
        curl_multi_cleanup(w->multi);
    free(w->slots);
    free(w->parts);
    free(w->upload_id);
    free(w->digest);
    free(w->key);
    free(w);
}

static lc_rc add_part(s3writer *w, const lc_store_part *p, lc_err *err)
{
    if (w->nparts == w->capparts) {
        size_t cap = w->capparts ? w->capparts * 2 : 64;
        lc_store_part *v = realloc(w->parts, cap * sizeof(*v));
        if (!v)
            return nomem(err);
        w->parts = v;
        w->capparts = cap;
    }
    w->parts[w->nparts++] = *p;
    return LC_OK;
}

static const lc_store_part *done_part(const s3writer *w, int number)
{
    for (size_t i = 0; i < w->o.ndone; i++)
        if (w->o.done[i].number == number)
            return &w->o.done[i];
    return NULL;
}

/* 1 when etag (quoted or not) is the hex MD5 of buf: how S3, MinIO, Ceph and s3rver tag a
 * part uploaded without SSE-KMS, so a listed part can be checked without its SHA-256. */
static int etag_is_md5_of(const char *etag, const void *buf, size_t len)
{
    char hex[33];
    size_t n = strlen(etag);
    if (n == 34 && etag[0] == '"' && etag[33] == '"') {
        etag++;
        n -= 2;
    }
    if (n != 32 || strspn(etag, "0123456789abcdefABCDEF") != 32)
        return 0;
    s3_md5_hex(buf, len, hex);
    return strncasecmp(etag, hex, 32) == 0;
}

/* Put the slot's request on the multi handle. */
static lc_rc slot_start(s3writer *w, slot *sl, lc_err *err)
{
    if (!sl->call.url && part_call(w->st, &sl->call, w->key, w->upload_id, sl->number, sl->buf,
                                   sl->len, sl->sha256) != 0)
        return wfail(w, err, LC_ERR_NOMEM, "out of memory building an object store request");
    if (!sl->easy && !(sl->easy = curl_easy_init()))
        return wfail(w, err, LC_ERR_NOMEM, "out of memory starting a request");
    curl_easy_reset(sl->easy);
    if (s3_call_setup(w->st, sl->easy, &sl->call) != 0 ||
        curl_multi_add_handle(w->multi, sl->easy) != CURLM_OK)
        return wfail(w, err, LC_ERR_INTERNAL, "could not start a part upload");
    sl->attempt++;
    sl->t0_ms = lc_now_ms();
    sl->state = SLOT_INFLIGHT;
    w->inflight++;
    return LC_OK;
}

/* A transfer ended: record the part, schedule a retry, or fail the writer. */
static lc_rc slot_finished(s3writer *w, slot *sl, CURLcode cc, lc_err *err)
{
    lc_err e = {0};
    int transient = 0;
    curl_multi_remove_handle(w->multi, sl->easy);
    sl->state = SLOT_RETRY; /* not in flight any more */
    w->inflight--;
    lc_rc rc = s3_call_outcome(&sl->call, cc, &transient, &e);
    if (rc == LC_OK) {
        lc_store_part p;
        lc_histogram_observe(w->st->part_seconds, (double)(lc_now_ms() - sl->t0_ms) / 1000.0);
        if ((rc = part_done(&sl->call, sl->number, sl->len, sl->sha256, &p, &e)) != LC_OK ||
            (rc = add_part(w, &p, &e)) != LC_OK ||
            (w->o.on_part && (rc = w->o.on_part(w->o.ctx, w->upload_id, &p, &e)) != LC_OK))
            return wfail_err(w, err, &e);
        slot_release(w, sl);
        return LC_OK;
    }
    if (transient && sl->attempt < w->st->cfg.retries) {
        lc_counter_inc(w->st->retries);
        int ms = s3_backoff_ms(sl->attempt);
        lc_log_debug("part upload failed, retrying", LC_LS("error", lc_err_msg(&e)),
                     LC_LI("part", sl->number), LC_LI("attempt", sl->attempt),
                     LC_LI("delay_ms", ms));
        sl->due_ms = lc_now_ms() + ms;
        return LC_OK;
    }
    return wfail_err(w, err, &e);
}

/* Drive transfers once; with wait, sleep until something happens (up to 100 ms). */
static lc_rc pump(s3writer *w, int wait, lc_err *err)
{
    int running = 0, left = 0;
    CURLMsg *m;
    if (w->failed)
        return lc_err_set(err, w->ferr.rc, "%s", w->ferr.msg);
    if (stopping(w))
        return wfail(w, err, LC_ERR_CANCELLED, "upload stopped on request");
    curl_multi_perform(w->multi, &running);
    while ((m = curl_multi_info_read(w->multi, &left))) {
        if (m->msg != CURLMSG_DONE)
            continue;
        slot *sl = NULL;
        for (int i = 0; i < w->nslots && !sl; i++)
            if (w->slots[i].easy == m->easy_handle && w->slots[i].state == SLOT_INFLIGHT)
                sl = &w->slots[i];
        if (!sl)
            continue;
        CURLcode cc = m->data.result; /* m is invalid once the handle is removed */
        lc_rc rc = slot_finished(w, sl, cc, err);
        if (rc != LC_OK)
            return rc;
    }
    int64_t now = lc_now_ms(), next_due = -1;
    for (int i = 0; i < w->nslots; i++) {
        slot *sl = &w->slots[i];
        if (sl->state == SLOT_RETRY) {
            if (sl->due_ms <= now) {
                lc_rc rc = slot_start(w, sl, err);
                if (rc != LC_OK)
                    return rc;
            } else if (next_due < 0 || sl->due_ms < next_due) {
                next_due = sl->due_ms;
            }
        }
    }
    if (wait) {
        int ms = 100;
        if (next_due >= 0 && next_due - now < ms)
            ms = (int)(next_due - now) > 0 ? (int)(next_due - now) : 0;
        if (w->inflight)
            curl_multi_poll(w->multi, NULL, 0, ms, NULL);
        else
            lc_sleep_ms(ms, NULL);
    }
    return LC_OK;
}

/* Start READY slots while there is room. */
static lc_rc start_ready(s3writer *w, lc_err *err)
{
    for (int i = 0; i < w->nslots && w->inflight < w->conc; i++) {
        slot *sl = &w->slots[i];
        if (sl->state == SLOT_READY) {
            lc_rc rc = slot_start(w, sl, err);
            if (rc != LC_OK)
                return rc;
        }
    }
    return LC_OK;
}

static lc_rc begin_multipart(s3writer *w, lc_err *err)
{
    lc_err e = {0};
    w->multipart = 1;
    if (w->upload_id)
        return LC_OK;
    lc_rc rc = s3_mpu_create(w->s, w->key, w->digest, &w->upload_id, &e);
    if (rc == LC_OK && w->o.on_upload &&
        (rc = w->o.on_upload(w->o.ctx, w->upload_id, w->part_size, &e)) != LC_OK) {
        lc_err e2;
        s3_mpu_abort(w->s, w->key, w->upload_id, &e2);
        free(w->upload_id);
        w->upload_id = NULL;
    }
    return rc == LC_OK ? LC_OK : wfail_err(w, err, &e);
}

/* A full (or the last) part: hash it; skip it when a resumed upload already has it. */
static lc_rc seal(s3writer *w, slot *sl, lc_err *err)
{
    if (w->next_number > S3_PARTS_MAX)
        return wfail(w, err, LC_ERR_TOO_LARGE,
                     "object is too large for 10000 parts: raise RADPIPE_S3_PART_SIZE");
    sl->number = w->next_number++;
    if (sl->hash)
        lc_sha256_final_hex(sl->hash, sl->sha256);
    else
        s3_sha256(sl->buf, sl->len, sl->sha256, NULL);
    lc_sha256_free(sl->hash);
    sl->hash = NULL;
    const lc_store_part *d = done_part(w, sl->number);
    if (d && !d->sha256[0]) {
        /* a part the store listed but this upload's record lacks (acknowledged just before a
         * crash): keep it when its ETag is the MD5 of these bytes, else send it again */
        if (d->size == (int64_t)sl->len && etag_is_md5_of(d->etag, sl->buf, sl->len)) {
            lc_store_part p = *d;
            lc_err e = {0};
            lc_strlcpy(p.sha256, sl->sha256, sizeof(p.sha256));
            lc_rc rc = add_part(w, &p, &e);
            if (rc == LC_OK && w->o.on_part)
                rc = w->o.on_part(w->o.ctx, w->upload_id, &p, &e);
            sl->state = SLOT_FREE;
            sl->len = 0;
            return rc == LC_OK ? LC_OK : wfail_err(w, err, &e);
        }
        d = NULL;
    }
    if (d) {
        if (d->size != (int64_t)sl->len || strcmp(d->sha256, sl->sha256) != 0) {
            char msg[200];
            snprintf(msg, sizeof(msg),
                     "part %d of \"%.100s\" changed since the upload began: start it over",
                     sl->number, w->key);
            return wfail(w, err, LC_ERR_CONFLICT, msg);
        }
        lc_rc rc = add_part(w, d, err);
        sl->state = SLOT_FREE;
        sl->len = 0;
        return rc == LC_OK ? LC_OK : wfail(w, err, rc, lc_err_msg(err));
    }
    sl->state = SLOT_READY;
    return LC_OK;
}

/* Find a free slot for the next bytes, pumping transfers until one frees. */
static lc_rc next_slot(s3writer *w, lc_err *err)
{
    for (;;) {
        for (int i = 0; i < w->nslots; i++)
            if (w->slots[i].state == SLOT_FREE) {
                w->cur = &w->slots[i];
                w->cur->state = SLOT_FILLING;
                w->cur->len = 0;
                return LC_OK;
            }
        if (!w->multipart) /* every slot holds bytes below the threshold: cannot happen */
            return wfail(w, err, LC_ERR_INTERNAL, "writer ran out of part buffers");
        lc_rc rc = start_ready(w, err);
        if (rc == LC_OK)
            rc = pump(w, 1, err);
        if (rc != LC_OK)
            return rc;
    }
}

static lc_rc w_write(lc_store_writer *base, const void *buf, size_t len, lc_err *err)
{
    s3writer *w = (s3writer *)base;
    const char *p = buf;
    if (w->failed)
        return lc_err_set(err, w->ferr.rc, "%s", w->ferr.msg);
    while (len) {
        slot *sl = w->cur;
        size_t room = (size_t)w->part_size - sl->len, n = len < room ? len : room;
        if (sl->len + n > sl->cap) {
            size_t cap = sl->cap ? sl->cap * 2 : 1 << 16;
            while (cap < sl->len + n)
                cap *= 2;
            if (cap > (size_t)w->part_size)
                cap = (size_t)w->part_size;
            char *nb = realloc(sl->buf, cap);
            if (!nb)
                return wfail(w, err, LC_ERR_NOMEM, "out of memory buffering a part");
            sl->buf = nb;
            sl->cap = cap;
        }
        if (sl->len == 0) {
            lc_sha256_free(sl->hash);
            sl->hash = lc_sha256_new();
        }
        memcpy(sl->buf + sl->len, p, n);
        if (sl->hash)
            lc_sha256_update(sl->hash, p, n); /* while the bytes are in cache */
        sl->len += n;
        p += n;
        len -= n;
        w->total += (int64_t)n;
        if (sl->len < (size_t)w->part_size) {
            /* parts in flight stall (and retries wait) while this thread only fills
             * buffers: drive them every 256 KiB */
            if (w->multipart && w->total - w->pumped >= (256 << 10)) {
                w->pumped = w->total;
                lc_rc rc = pump(w, 0, err);
                if (rc != LC_OK)
                    return rc;
            }
            continue;
        }
        lc_rc rc = seal(w, sl, err);
        if (rc == LC_OK && !w->multipart && w->total >= w->threshold)
            rc = begin_multipart(w, err);
        if (rc == LC_OK && w->multipart)
            rc = start_ready(w, err);
        if (rc == LC_OK && w->multipart)
            rc = pump(w, 0, err);
        if (rc == LC_OK)
            rc = next_slot(w, err);
        if (rc != LC_OK)
            return rc;
    }
    return LC_OK;
}

/* Below the threshold: gather the sealed slots and the current one into one PUT. */
static lc_rc put_single(s3writer *w, lc_err *err)
{
    char *all = NULL;
    const char *data = w->cur->buf ? w->cur->buf : "";
    size_t n = 0;
    int sealed = 0;
    for (int i = 0; i < w->nslots; i++)
        if (w->slots[i].state == SLOT_READY)
            sealed++;
    if (sealed) {
        if (!(all = malloc((size_t)w->total + 1)))
            return nomem(err);
        for (int num = 1; num < w->next_number; num++)
            for (int i = 0; i < w->nslots; i++)
                if (w->slots[i].state == SLOT_READY && w->slots[i].number == num) {
                    memcpy(all + n, w->slots[i].buf, w->slots[i].len);
                    n += w->slots[i].len;
                }
        memcpy(all + n, w->cur->buf ? w->cur->buf : "", w->cur->len);
        n += w->cur->len;
        data = all;
    } else {
        n = w->cur->len;
    }
    lc_rc rc = s3_put(w->s, w->key, data, n, w->digest, NULL, err);
    free(all);
    return rc;
}

/* Let parts in flight finish (up to ms), ignoring their outcome: a part still arriving
 * after AbortMultipartUpload could bring the upload back on some stores. */
static void drain(s3writer *w, int ms)
{
    int64_t end = lc_now_ms() + ms;
    while (w->inflight > 0 && lc_now_ms() < end) {
        int running = 0, left = 0;
        CURLMsg *m;
        curl_multi_perform(w->multi, &running);
        while ((m = curl_multi_info_read(w->multi, &left))) {
            if (m->msg != CURLMSG_DONE)
                continue;
            for (int i = 0; i < w->nslots; i++)
                if (w->slots[i].easy == m->easy_handle && w->slots[i].state == SLOT_INFLIGHT) {
                    curl_multi_remove_handle(w->multi, m->easy_handle);
                    w->slots[i].state = SLOT_RETRY; /* finished: no longer in flight */
                    w->inflight--;
                    break;
                }
        }
        if (w->inflight > 0)
            curl_multi_poll(w->multi, NULL, 0, 100, NULL);
    }
}

static void abort_upload(s3writer *w)
{
    lc_err e;
    drain(w, (int)w->st->cfg.timeout_s * 1000);
    for (int i = 0; i < w->nslots; i++)
        slot_release(w, &w->slots[i]);
    if (s3_mpu_abort(w->s, w->key, w->upload_id, &e) != LC_OK)
        lc_log_warn("could not abort a multipart upload", LC_LS("error", e.msg));
}

/* Abort the multipart upload after a permanent failure or parts that no longer match
 * (LC_ERR_CONFLICT); keep it (for a resume) after a stop or another transient error. */
static void end_failed(s3writer *w, lc_rc rc)
{
    int keep = rc == LC_ERR_CANCELLED || (lc_rc_is_transient(rc) && rc != LC_ERR_CONFLICT);
    if (w->upload_id && !keep)
        abort_upload(w);
}

static lc_rc w_commit(lc_store_writer *base, lc_err *err)
{
    s3writer *w = (s3writer *)base;
    lc_rc rc = LC_OK;
    if (w->failed) {
        rc = lc_err_set(err, w->ferr.rc, "could not commit object \"%s\": %s", w->key, w->ferr.msg);
        goto out;
    }
    if (!w->multipart) {
        rc = put_single(w, err);
        goto out;
    }
    if (w->cur && w->cur->len > 0 && (rc = seal(w, w->cur, err)) != LC_OK)
        goto out;
    for (;;) {
        int busy = 0;
        for (int i = 0; i < w->nslots; i++)
            busy += w->slots[i].state == SLOT_READY || w->slots[i].state == SLOT_INFLIGHT ||
                    w->slots[i].state == SLOT_RETRY;
        if (!busy)
            break;
        if ((rc = start_ready(w, err)) != LC_OK || (rc = pump(w, 1, err)) != LC_OK)
            goto out;
    }
    if (!w->nparts) {
        rc = wfail(w, err, LC_ERR_INVALID, "a resumed upload received no data");
        goto out;
    }
    qsort(w->parts, w->nparts, sizeof(*w->parts), part_cmp);
    rc = s3_mpu_complete(w->s, w->key, w->upload_id, w->parts, w->nparts, err);
    if (rc != LC_OK && !w->failed)
        wfail(w, NULL, rc, lc_err_msg(err));
out:
    if (rc != LC_OK)
        end_failed(w, rc);
    writer_free(w);
    return rc;
}

static void w_abort(lc_store_writer *base)
{
    s3writer *w = (s3writer *)base;
    if (w->upload_id)
        abort_upload(w);
    writer_free(w);
}

static void w_detach(lc_store_writer *base)
{
    writer_free((s3writer *)base);
}

static const lc_store_writer_ops s3writer_ops = {
    .write = w_write,
    .commit = w_commit,
    .abort = w_abort,
    .detach = w_detach,
};

lc_rc s3_writer_open(lc_store *s, const char *key, const lc_store_writer_opts *o,
                     lc_store_writer **out, lc_err *err)
{
    s3store *st = s3_of(s);
    s3writer *w = calloc(1, sizeof(*w));
    if (!w)
        return nomem(err);
    w->base.ops = &s3writer_ops;
    w->s = s;
    w->st = st;
    w->o = *o;
    w->part_size = o->part_size ? o->part_size : st->cfg.part_size;
    w->threshold = st->cfg.threshold;
    w->conc = o->concurrency ? o->concurrency : (int)st->cfg.concurrency;
    w->next_number = 1;
    if (w->part_size < S3_PART_MIN || w->part_size > S3_PART_MAX) {
        long long ps = (long long)w->part_size;
        free(w);
        return lc_err_set(err, LC_ERR_INVALID, "part size %lld is outside 5M..5G", ps);
    }
    /* every part that may wait below the threshold, plus the ones in flight and one filling */
    int below = (int)((w->threshold + w->part_size - 1) / w->part_size);
    w->nslots = (w->conc > below ? w->conc : below) + 1;
    w->slots = calloc((size_t)w->nslots, sizeof(*w->slots));
    w->key = strdup(key);
    w->digest = o->digest ? strdup(o->digest) : NULL;
    w->multi = curl_multi_init();
    if (!w->slots || !w->key || (o->digest && !w->digest) || !w->multi) {
        writer_free(w);
        return nomem(err);
    }
    curl_multi_setopt(w->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)w->conc);
    curl_multi_setopt(w->multi, CURLMOPT_MAXCONNECTS, (long)S3_POOL_MAX);
    if (o->resume_upload_id) {
        if (!(w->upload_id = strdup(o->resume_upload_id))) {
            writer_free(w);
            return nomem(err);
        }
        w->multipart = 1;
    }
    w->cur = &w->slots[0];
    w->cur->state = SLOT_FILLING;
    if (o->size_hint >= 0 && o->size_hint < w->part_size) {
        /* small objects: one exact buffer instead of growing */
        w->cur->cap = o->size_hint ? (size_t)o->size_hint : 1;
        if (!(w->cur->buf = malloc(w->cur->cap))) {
            writer_free(w);
            return nomem(err);
        }
    }
    *out = &w->base;
    return LC_OK;
}
