/*
 * store.h: the object-store API used for incoming instances, archives and results.
 * Backends by URL scheme: file:// (a directory; writes go to a temporary file that is
 * fsync'd and renamed, so readers never see partial objects) and s3:// (any S3-compatible
 * store over libcurl, signed with CURLOPT_AWS_SIGV4; objects appear whole on PUT or on
 * CompleteMultipartUpload). Keys are relative slash-separated paths checked by
 * lc_store_key_valid, and the file backend resolves them beneath its root only (openat2
 * RESOLVE_BENEATH), so a key can never reach outside the store. An lc_store is thread-safe;
 * a writer belongs to one thread.
 */
#ifndef LC_STORE_H
#define LC_STORE_H

#include <stddef.h>
#include <stdint.h>
#include "lc/cfg.h"
#include "lc/metrics.h"
#include "lc/rc.h"

typedef struct lc_store lc_store;

/* url: "file:///abs/dir" or "file://relative/dir" (created when missing), or
 * "s3://bucket[/prefix]" (keys live under prefix; endpoint, region, credentials and tuning
 * come from the RADPIPE_S3_* variables below, read from the environment at open). */
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
    /* put_file on file://: the object's bytes are durable when it returns but its directory
     * entry may not be yet; a later put_file without this flag into the same directory (a key
     * with the same parent) makes every earlier entry there durable too, with one directory
     * fsync for a batch. Other backends ignore it (their objects are durable on return). */
    LC_STORE_DEFER_DIRSYNC = 1u << 1,
    /* put_file with LC_STORE_MOVE: the caller already fsync'd src, so the file backend renames
     * it into place without syncing it again (a copy to another file system is synced as
     * always). Lets a caller sync a batch of files in parallel first. */
    LC_STORE_SRC_SYNCED = 1u << 2,
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
    /* The digest the writer stored with the object (lc_store_put_opts.digest; by default the
     * SHA-256 of its bytes, hex), "" when the backend keeps none (file://, listings). s3://
     * keeps it as the user metadata x-amz-meta-radpipe-digest. */
    char digest[65];
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

/* --- s3:// configuration ----------------------------------------------------------------- */

/* The RADPIPE_S3_* variables. lc_store_open loads them from the environment (with _FILE for
 * the keys) whenever it opens an s3:// URL; every service lists them in --help. */
typedef struct lc_store_s3_cfg {
    char *endpoint;        /* "http://host:port", "" = AWS (https://s3.<region>.amazonaws.com) */
    char *region;          /* signing region */
    char *access_key;      /* secret */
    char *secret_key;      /* secret */
    char *addressing;      /* auto|path|virtual */
    char *ca_file;         /* PEM bundle for HTTPS, "" = the system's */
    char *checksum;        /* sha256|md5: x-amz-checksum-sha256 or Content-MD5 on every request */
    long long part_size;   /* multipart part size in bytes */
    long long threshold;   /* objects at least this large go through multipart */
    long long concurrency; /* parts in flight per multipart upload */
    long long retries;     /* attempts per request on transient errors (5xx, 429, network) */
    long long timeout_s;   /* a request that moves no byte for this long fails (retried) */
    int create_bucket;     /* create the bucket at open when it is missing */
} lc_store_s3_cfg;
extern const lc_cfg_var lc_store_s3_cfg_vars[];
extern const size_t lc_store_s3_cfg_nvars;

/* Count retries and time parts in m (radpipe_<prefix>_retries_total and
 * radpipe_<prefix>_part_seconds, labelled store="<label>"). Call right after open, before the
 * store is shared between threads; a no-op for backends without remote requests. */
void lc_store_instrument(lc_store *s, lc_metrics *m, const char *prefix, const char *label);

/* --- options, ranges -------------------------------------------------------------------- */

typedef struct lc_store_put_opts {
    /* Stored with the object and returned by lc_store_head (lc_store_stat.digest): at most 64
     * characters of [0-9a-zA-Z._-]. NULL: the SHA-256 of the bytes (put_buf) or nothing. */
    const char *digest;
    /* The SHA-256 of the bytes (hex), when the caller computed it anyway: s3:// signs the
     * payload with it instead of hashing the bytes again (a wrong one makes the store refuse
     * the object). NULL: computed. */
    const char *sha256;
} lc_store_put_opts;
lc_rc lc_store_put_buf_opts(lc_store *s, const char *key, const void *buf, size_t len,
                            const lc_store_put_opts *o, lc_err *err);

/* Read len bytes (-1: to the end) of an object from offset (an HTTP Range request on s3://),
 * handing them to fn in chunks; a non-zero return from fn stops the read with
 * LC_ERR_CANCELLED. LC_ERR_NOT_FOUND when the object does not exist. */
typedef int (*lc_store_read_fn)(void *ctx, const void *buf, size_t len);
lc_rc lc_store_read(lc_store *s, const char *key, int64_t offset, int64_t len, lc_store_read_fn fn,
                    void *ctx, lc_err *err);

/* --- multipart uploads (s3://; LC_ERR_UNSUPPORTED elsewhere) ------------------------------ */

typedef struct lc_store_part {
    int number;      /* 1..10000 */
    int64_t size;    /* bytes */
    char etag[80];   /* as the store returned it */
    char sha256[65]; /* of the part's bytes (hex); "" when unknown (listed parts) */
} lc_store_part;

/* Start an upload; *upload_id is malloc'd. digest as in lc_store_put_opts (may be NULL). */
lc_rc lc_store_mpu_create(lc_store *s, const char *key, const char *digest, char **upload_id,
                          lc_err *err);
/* Upload one part (retried on transient errors); *out describes it. */
lc_rc lc_store_mpu_put_part(lc_store *s, const char *key, const char *upload_id, int number,
                            const void *buf, size_t len, lc_store_part *out, lc_err *err);
/* Make the object visible from parts (ascending numbers). */
lc_rc lc_store_mpu_complete(lc_store *s, const char *key, const char *upload_id,
                            const lc_store_part *parts, size_t n, lc_err *err);
/* Discard an upload and its parts; an upload that no longer exists is not an error. */
lc_rc lc_store_mpu_abort(lc_store *s, const char *key, const char *upload_id, lc_err *err);
/* The parts the store holds for an upload (*parts malloc'd, ascending); LC_ERR_NOT_FOUND when
 * the upload does not exist. */
lc_rc lc_store_mpu_list_parts(lc_store *s, const char *key, const char *upload_id,
                              lc_store_part **parts, size_t *n, lc_err *err);
/* Call fn for each incomplete upload whose key starts with prefix; key and upload_id are
 * borrowed for the call; a non-zero return stops the listing. */
typedef int (*lc_store_mpu_list_fn)(void *ctx, const char *key, const char *upload_id);
lc_rc lc_store_mpu_list(lc_store *s, const char *prefix, lc_store_mpu_list_fn fn, void *ctx,
                        lc_err *err);

/* --- streaming writers with options ------------------------------------------------------ */

/* A writer on s3:// buffers up to the part size: an object smaller than the multipart
 * threshold (RADPIPE_S3_MULTIPART_THRESHOLD) is sent with one PUT at commit; a larger one
 * goes through a multipart upload with up to `concurrency` parts in flight (curl multi),
 * created when the first part is full. Resuming: give the upload id and the parts already
 * acknowledged (from on_part of an earlier run, same part size) and write the same bytes
 * from the start again: those parts are hashed and compared, not sent (LC_ERR_CONFLICT when
 * a part's bytes changed). A part given without its sha256 (as lc_store_mpu_list_parts lists
 * it) is kept when its ETag is the MD5 of the same bytes (and then reported through on_part),
 * else sent again. The file backend ignores everything but digest. */
typedef struct lc_store_writer_opts {
    const char *digest;           /* as in lc_store_put_opts (NULL: none) */
    int64_t size_hint;            /* the object's size when known, else -1 */
    int64_t part_size;            /* 0: RADPIPE_S3_PART_SIZE */
    int concurrency;              /* 0: RADPIPE_S3_CONCURRENCY */
    const char *resume_upload_id; /* NULL: a new upload */
    const lc_store_part *done;    /* acknowledged parts of resume_upload_id (borrowed) */
    size_t ndone;
    /* Called on the writer's thread: once the multipart upload exists, and for every part
     * the store acknowledged (to persist them for a resume). An error fails the writer. */
    lc_rc (*on_upload)(void *ctx, const char *upload_id, int64_t part_size, lc_err *err);
    lc_rc (*on_part)(void *ctx, const char *upload_id, const lc_store_part *part, lc_err *err);
    /* Polled between parts and while waiting: non-zero stops with LC_ERR_CANCELLED. */
    int (*should_stop)(void *ctx);
    void *ctx;
} lc_store_writer_opts;
lc_rc lc_store_writer_open_opts(lc_store *s, const char *key, const lc_store_writer_opts *o,
                                lc_store_writer **out, lc_err *err);
/* Objects at least this large go through multipart uploads on this store (writers call
 * on_upload/on_part for them); 0 when the backend has no multipart uploads (file://). */
int64_t lc_store_multipart_threshold(const lc_store *s);

/* Free the writer but keep a multipart upload it started (for a later resume); without one
 * it is lc_store_writer_abort. Accepts NULL. */
void lc_store_writer_detach(lc_store_writer *w);

#endif
