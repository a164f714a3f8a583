/*
 * store.c: the lc_store front end: picks the backend by URL scheme, validates every key and
 * argument once, then dispatches through the backend table (store_internal.h).
 * The lc_store owns its URL and backend state; it is read-only after open, so thread-safe.
 */
#include <stdlib.h>
#include <string.h>
#include "lc/store.h"
#include "store_internal.h"

#define KEY_MAX 1024

static const lc_store_backend *const backends[] = {
    &lc_store_file_backend,
    &lc_store_s3_backend,
};

int lc_store_key_valid(const char *key)
{
    if (!key || !*key || *key == '/')
        return 0;
    size_t n = 0, comp = 0;
    const char *start = key;
    for (const char *p = key;; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '/' || c == '\0') {
            comp = (size_t)(p - start);
            if (comp == 0 || (comp == 1 && start[0] == '.') ||
                (comp == 2 && start[0] == '.' && start[1] == '.'))
                return 0;
            if (c == '\0')
                break;
            start = p + 1;
        } else if (c < 0x20 || c == 0x7f || c == '\\') {
            return 0;
        }
        if (++n > KEY_MAX)
            return 0;
    }
    return 1;
}

/* A listing prefix: "" or a string whose complete components (those before the last '/')
 * form a valid key; the last, partial component only has to be free of bad characters. */
static int prefix_valid(const char *prefix)
{
    if (!*prefix)
        return 1;
    size_t n = strlen(prefix);
    if (n > KEY_MAX || *prefix == '/')
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)prefix[i];
        if (c < 0x20 || c == 0x7f || c == '\\')
            return 0;
    }
    const char *slash = strrchr(prefix, '/');
    if (!slash)
        return 1;
    char dir[KEY_MAX + 1];
    memcpy(dir, prefix, (size_t)(slash - prefix));
    dir[slash - prefix] = '\0';
    return lc_store_key_valid(dir);
}

static lc_rc bad_key(lc_err *err, const char *key)
{
    if (!key)
        return lc_err_set(err, LC_ERR_INVALID, "object key is missing");
    /* the key may hold control characters: show a bounded, printable prefix only */
    char shown[65];
    size_t i = 0;
    for (; i < sizeof(shown) - 1 && key[i]; i++)
        shown[i] = ((unsigned char)key[i] < 0x20 || key[i] == 0x7f) ? '?' : key[i];
    shown[i] = '\0';
    return lc_err_set(err, LC_ERR_INVALID, "invalid object key \"%s\"", shown);
}

lc_rc lc_store_open(const char *url, lc_store **out, lc_err *err)
{
    *out = NULL;
    if (!url)
        return lc_err_set(err, LC_ERR_CONFIG, "object store URL is missing");
    const lc_store_backend *be = NULL;
    for (size_t i = 0; i < sizeof(backends) / sizeof(backends[0]); i++)
        if (strncmp(url, backends[i]->scheme, strlen(backends[i]->scheme)) == 0)
            be = backends[i];
    if (!be) /* never echo the URL: it may carry credentials */
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "unsupported object store URL scheme");
    lc_store *s = calloc(1, sizeof(*s));
    if (!s)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory opening object store");
    s->be = be;
    lc_rc rc = be->open(s, url, err);
    if (rc != LC_OK) {
        free(s->url);
        free(s);
        return rc;
    }
    *out = s;
    return LC_OK;
}

void lc_store_free(lc_store *s)
{
    if (!s)
        return;
    s->be->close(s);
    free(s->url);
    free(s);
}

const char *lc_store_url(const lc_store *s)
{
    return s ? s->url : NULL;
}

lc_rc lc_store_put_buf(lc_store *s, const char *key, const void *buf, size_t len, lc_err *err)
{
    if (!lc_store_key_valid(key))
        return bad_key(err, key);
    if (!buf && len)
        return lc_err_set(err, LC_ERR_INVALID, "no data for object \"%s\"", key);
    const lc_store_put_opts none = {0};
    return s->be->put_buf(s, key, buf ? buf : "", len, &none, err);
}

/* A digest is stored as metadata: keep it to characters every backend and header allows. */
static int digest_valid(const char *d)
{
    size_t n = 0;
    for (; d[n]; n++) {
        char c = d[n];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return n > 0 && n <= 64;
}

lc_rc lc_store_put_buf_opts(lc_store *s, const char *key, const void *buf, size_t len,
                            const lc_store_put_opts *o, lc_err *err)
{
    const lc_store_put_opts none = {0};
    if (!lc_store_key_valid(key))
        return bad_key(err, key);
    if (!buf && len)
        return lc_err_set(err, LC_ERR_INVALID, "no data for object \"%s\"", key);
    if (o && o->digest && !digest_valid(o->digest))
        return lc_err_set(err, LC_ERR_INVALID, "invalid digest for object \"%s\"", key);
    return s->be->put_buf(s, key, buf ? buf : "", len, o ? o : &none, err);
}

int64_t lc_store_multipart_threshold(const lc_store *s)
{
    return s && s->be->multipart_threshold ? s->be->multipart_threshold(s) : 0;
}

void lc_store_instrument(lc_store *s, lc_metrics *m, const char *prefix, const char *label)
{
    if (s && m && prefix && label && s->be->instrument)
        s->be->instrument(s, m, prefix, label);
}

lc_rc lc_store_read(lc_store *s, const char *key, int64_t offset, int64_t len, lc_store_read_fn fn,
                    void *ctx, lc_err *err)
{
    if (!lc_store_key_valid(key))
        return bad_key(err, key);
    if (!fn || offset < 0 || len < -1)
        return lc_err_set(err, LC_ERR_INVALID, "invalid range read of object \"%s\"", key);
    if (len == 0)
        return LC_OK;
    return s->be->read(s, key, offset, len, fn, ctx, err);
}

static lc_rc no_mpu(lc_err *err, const char *key)
{
    return lc_err_set(err, LC_ERR_UNSUPPORTED,
                      "object store has no multipart uploads (object \"%s\")", key);
}

static lc_rc check_upload(const char *key, const char *upload_id, lc_err *err)
{
    if (!lc_store_key_valid(key))
        return bad_key(err, key);
    if (!upload_id || !*upload_id || strlen(upload_id) > 1024)
        return lc_err_set(err, LC_ERR_INVALID, "invalid upload id for object \"%s\"", key);
    return LC_OK;
}

lc_rc lc_store_mpu_create(lc_store *s, const char *key, const char *digest, char **upload_id,
                          lc_err *err)
{
    *upload_id = NULL;
    if (!lc_store_key_valid(key))
        return bad_key(err, key);
    if (digest && !digest_valid(digest))
        return lc_err_set(err, LC_ERR_INVALID, "invalid digest for object \"%s\"", key);
    if (!s->be->mpu_create)
        return no_mpu(err, key);
    return s->be->mpu_create(s, key, digest, upload_id, err);
}

lc_rc lc_store_mpu_put_part(lc_store *s, const char *key, const char *upload_id, int number,
                            const void *buf, size_t len, lc_store_part *out, lc_err *err)
{
    lc_rc rc = check_upload(key, upload_id, err);
    if (rc != LC_OK)
        return rc;
    if (number < 1 || number > 10000 || (!buf && len))
        return lc_err_set(err, LC_ERR_INVALID, "invalid part %d of object \"%s\"", number, key);
    if (!s->be->mpu_put_part)
        return no_mpu(err, key);
    return s->be->mpu_put_part(s, key, upload_id, number, buf ? buf : "", len, out, err);
}

lc_rc lc_store_mpu_complete(lc_store *s, const char *key, const char *upload_id,
                            const lc_store_part *parts, size_t n, lc_err *err)
{
    lc_rc rc = check_upload(key, upload_id, err);
    if (rc != LC_OK)
        return rc;
    if (!parts || n == 0 || n > 10000)
        return lc_err_set(err, LC_ERR_INVALID, "no parts to complete object \"%s\"", key);
    for (size_t i = 1; i < n; i++)
        if (parts[i].number <= parts[i - 1].number)
            return lc_err_set(err, LC_ERR_INVALID, "parts of object \"%s\" are not in order", key);
    if (!s->be->mpu_complete)
        return no_mpu(err, key);
    return s->be->mpu_complete(s, key, upload_id, parts, n, err);
}

lc_rc lc_store_mpu_abort(lc_store *s, const char *key, const char *upload_id, lc_err *err)
{
    lc_rc rc = check_upload(key, upload_id, err);
    if (rc != LC_OK)
        return rc;
    if (!s->be->mpu_abort)
        return no_mpu(err, key);
    return s->be->mpu_abort(s, key, upload_id, err);
}

lc_rc lc_store_mpu_list_parts(lc_store *s, const char *key, const char *upload_id,
                              lc_store_part **parts, size_t *n, lc_err *err)
{
    *parts = NULL;
    *n = 0;
    lc_rc rc = check_upload(key, upload_id, err);
    if (rc != LC_OK)
        return rc;
    if (!s->be->mpu_list_parts)
        return no_mpu(err, key);
    return s->be->mpu_list_parts(s, key, upload_id, parts, n, err);
}

lc_rc lc_store_mpu_list(lc_store *s, const char *prefix, lc_store_mpu_list_fn fn, void *ctx,
                        lc_err *err)
{
    if (!prefix)
        prefix = "";
    if (!prefix_valid(prefix))
        return bad_key(err, prefix);
    if (!fn)
        return lc_err_set(err, LC_ERR_INVALID, "no callback for upload listing");
    if (!s->be->mpu_list)
        return no_mpu(err, prefix);
    return s->be->mpu_list(s, prefix, fn, ctx, err);
}

lc_rc lc_store_put_file(lc_store *s, const char *key, const char *src_path, unsigned flags,
                        lc_err *err)
{
    if (!lc_store_key_valid(key))
        return bad_key(err, key);
    if (!src_path || !*src_path)
        return lc_err_set(err, LC_ERR_INVALID, "no source file for object \"%s\"", key);
    return s->be->put_file(s, key, src_path, flags, err);
}

lc_rc lc_store_get_file(lc_store *s, const char *key, const char *dst_path, lc_err *err)
{
    if (!lc_store_key_valid(key))
        return bad_key(err, key);
    if (!dst_path || !*dst_path)
        return lc_err_set(err, LC_ERR_INVALID, "no destination file for object \"%s\"", key);
    return s->be->get_file(s, key, dst_path, err);
}

lc_rc lc_store_get_buf(lc_store *s, const char *key, size_t max, void **buf, size_t *len,
                       lc_err *err)
{
    *buf = NULL;
    *len = 0;
    if (!lc_store_key_valid(key))
        return bad_key(err, key);
    return s->be->get_buf(s, key, max, buf, len, err);
}

lc_rc lc_store_head(lc_store *s, const char *key, lc_store_stat *st, lc_err *err)
{
    if (!lc_store_key_valid(key))
        return bad_key(err, key);
    return s->be->head(s, key, st, err);
}

lc_rc lc_store_delete(lc_store *s, const char *key, lc_err *err)
{
    if (!lc_store_key_valid(key))
        return bad_key(err, key);
    return s->be->del(s, key, err);
}

lc_rc lc_store_list(lc_store *s, const char *prefix, lc_store_list_fn fn, void *ctx, lc_err *err)
{
    if (!prefix)
        prefix = "";
    if (!prefix_valid(prefix))
        return bad_key(err, prefix);
    if (!fn)
        return lc_err_set(err, LC_ERR_INVALID, "no callback for object listing");
    return s->be->list(s, prefix, fn, ctx, err);
}

lc_rc lc_store_local_path(lc_store *s, const char *key, char **path, lc_err *err)
{
    *path = NULL;
    if (!lc_store_key_valid(key))
        return bad_key(err, key);
    if (!s->be->local_path)
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "object store keeps no local files for \"%s\"",
                          key);
    return s->be->local_path(s, key, path, err);
}

lc_rc lc_store_writer_open(lc_store *s, const char *key, lc_store_writer **out, lc_err *err)
{
    return lc_store_writer_open_opts(s, key, NULL, out, err);
}

lc_rc lc_store_writer_open_opts(lc_store *s, const char *key, const lc_store_writer_opts *o,
                                lc_store_writer **out, lc_err *err)
{
    const lc_store_writer_opts none = {.size_hint = -1};
    *out = NULL;
    if (!lc_store_key_valid(key))
        return bad_key(err, key);
    if (!o)
        o = &none;
    if (o->digest && !digest_valid(o->digest))
        return lc_err_set(err, LC_ERR_INVALID, "invalid digest for object \"%s\"", key);
    if (o->part_size < 0 || o->concurrency < 0 || (o->ndone && !o->done) ||
        (o->ndone && !o->resume_upload_id))
        return lc_err_set(err, LC_ERR_INVALID, "invalid writer options for object \"%s\"", key);
    return s->be->writer_open(s, key, o, out, err);
}

void lc_store_writer_detach(lc_store_writer *w)
{
    if (!w)
        return;
    if (w->ops->detach)
        w->ops->detach(w);
    else
        w->ops->abort(w);
}

lc_rc lc_store_writer_write(lc_store_writer *w, const void *buf, size_t len, lc_err *err)
{
    if (!len)
        return LC_OK;
    if (!buf)
        return lc_err_set(err, LC_ERR_INVALID, "no data to write");
    return w->ops->write(w, buf, len, err);
}

lc_rc lc_store_writer_commit(lc_store_writer *w, lc_err *err)
{
    if (!w)
        return lc_err_set(err, LC_ERR_INVALID, "no object writer to commit");
    return w->ops->commit(w, err);
}

void lc_store_writer_abort(lc_store_writer *w)
{
    if (w)
        w->ops->abort(w);
}
