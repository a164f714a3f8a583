/*
 * store.h: the object-store API used for incoming instances, archives and results.
 * Backends by URL scheme: file:// (a directory; writes go to a temporary file that is
 * fsync'd and renamed, so readers never see partial objects) and, with the storage-uploader
 * issue, s3://. Keys are relative slash-separated paths checked by lc_store_key_valid, and the
 * file backend resolves them beneath its root only (openat2 RESOLVE_BENEATH), so a key can
 * never reach outside the store. An lc_store is thread-safe; a writer belongs to one thread.
 */
#ifndef LC_STORE_H
#define LC_STORE_H

#include <stddef.h>
#include <stdint.h>
#include "lc/rc.h"

typedef struct lc_store lc_store;

/* url: "file:///abs/dir" or "file://relative/dir" (created when missing). */
lc_rc lc_store_open(const char *url, lc_store **out, lc_err *err);
void lc_store_free(lc_store *s);
/* The normalised URL of the store ("file:///abs/dir"), borrowed. */
const char *lc_store_url(const lc_store *s);

/* 1 when key is acceptable: 1..1024 bytes, no leading '/', no empty, "." or ".." component,
 * no backslash, no control characters. */
int lc_store_key_valid(const char *key);

enum {
    /* put_file may rename src into place (same file system; a copy otherwise): after success
     * src is gone either way; after a failure it is still there */
    LC_STORE_MOVE = 1u << 0,
};

lc_rc lc_store_put_buf(lc_store *s, const char *key, const void *buf, size_t len, lc_err *err);
lc_rc lc_store_put_file(lc_store *s, const char *key, const char *src_path, unsigned flags,
                        lc_err *err);
/* Copy an object to a local file (written atomically). */
lc_rc lc_store_get_file(lc_store *s, const char *key, const char *dst_path, lc_err *err);
/* Read a whole object (caller frees *buf, which has a NUL after the data); LC_ERR_TOO_LARGE
 * above max bytes. */
lc_rc lc_store_get_buf(lc_store *s, const char *key, size_t max, void **buf, size_t *len,
                       lc_err *err);

typedef struct lc_store_stat {
    int64_t size;
    int64_t mtime_ms;
} lc_store_stat;
/* LC_ERR_NOT_FOUND when the object does not exist. */
lc_rc lc_store_head(lc_store *s, const char *key, lc_store_stat *st, lc_err *err);
/* Deleting a missing object is not an error. */
lc_rc lc_store_delete(lc_store *s, const char *key, lc_err *err);

/* Call fn for every object whose key starts with prefix (may be ""), in no particular order;
 * key is borrowed for the call. A non-zero return from fn stops the listing. */
typedef int (*lc_store_list_fn)(void *ctx, const char *key, const lc_store_stat *st);
lc_rc lc_store_list(lc_store *s, const char *prefix, lc_store_list_fn fn, void *ctx, lc_err *err);

/* A local path for an existing object when the backend keeps objects as files (file://),
 * caller frees; LC_ERR_NOT_FOUND when there is none; LC_ERR_UNSUPPORTED for remote backends
 * (use lc_store_get_file then). */
lc_rc lc_store_local_path(lc_store *s, const char *key, char **path, lc_err *err);

/* Streaming writes: nothing is visible under key until commit; abort (or free without
 * commit) leaves no object behind. */
typedef struct lc_store_writer lc_store_writer;
lc_rc lc_store_writer_open(lc_store *s, const char *key, lc_store_writer **out, lc_err *err);
lc_rc lc_store_writer_write(lc_store_writer *w, const void *buf, size_t len, lc_err *err);
/* Makes the object visible and frees the writer (also on failure, and without publishing
 * anything when an earlier write failed). */
lc_rc lc_store_writer_commit(lc_store_writer *w, lc_err *err);
void lc_store_writer_abort(lc_store_writer *w); /* accepts NULL */

#endif
