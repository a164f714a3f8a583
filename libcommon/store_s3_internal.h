/*
 * store_s3_internal.h: what the s3:// backend's files share: the store state (store_s3.c),
 * one signed HTTP request (s3call) that runs alone with retries or inside a curl multi
 * (store_s3_mpu.c), and the XML reader (store_s3_xml.c). An s3store is read-only after open
 * (the curl share handle locks itself); an s3call belongs to one thread.
 */
#ifndef LC_STORE_S3_INTERNAL_H
#define LC_STORE_S3_INTERNAL_H

#include <curl/curl.h>
#include <pthread.h>
#include "store_internal.h"

#define S3_PART_MIN  (5LL << 20) /* S3's smallest part (but the last) */
#define S3_PART_MAX  (5LL << 30) /* and largest */
#define S3_PARTS_MAX 10000
#define S3_RESP_MAX  (16 << 20) /* largest XML response accepted */
/* Connections the shared pool keeps open for reuse. libcurl's default (5, applied to the
 * whole shared pool) made every request beyond the fifth concurrent one close its connection
 * and the next one open a new one. */
#define S3_POOL_MAX   256
#define S3_DIGEST_HDR "x-amz-meta-radpipe-digest"

typedef struct s3store {
    lc_store_s3_cfg cfg; /* loaded from the environment at open, owned */
    char *bucket;
    char *prefix;    /* "" or "dir/sub/": prepended to every key */
    char *base;      /* "http://host:port/bucket" (path) or "https://bucket.host" (virtual) */
    char sigv4[160]; /* "aws:amz:<region>:s3" */
    CURLSH *share;   /* DNS, TLS sessions and connections shared by every request */
    pthread_mutex_t locks[CURL_LOCK_DATA_LAST];
    lc_counter *retries;        /* NULL until instrumented */
    lc_histogram *part_seconds; /* NULL until instrumented */
} s3store;

static inline s3store *s3_of(lc_store *s)
{
    return s->impl;
}

/* A growing response body with a cap. */
typedef struct s3buf {
    char *data;
    size_t len, cap, max;
} s3buf;

/* One request and its response. Fill the request fields, then s3_call_perform (alone, with
 * retries) or s3_call_setup + a multi handle + s3_call_outcome. */
typedef struct s3call {
    const char *method; /* GET PUT POST HEAD DELETE */
    char *url;          /* owned: s3_url */
    struct curl_slist *hdrs;
    const char *body; /* PUT/POST payload (borrowed), with body_len bytes */
    size_t body_len;
    lc_store_read_fn sink; /* GET: stream the body here instead of resp */
    void *sink_ctx;
    int sink_stopped;
    int64_t delivered; /* bytes handed to sink: a retry must not hand them again */
    /* response */
    long status;
    s3buf resp;
    char etag[80];
    char digest[65];
    int64_t length; /* Content-Length, -1 when absent */
    int64_t mtime_ms;
    char errbuf[CURL_ERROR_SIZE];
    const char *what; /* for messages: "upload", "read", ... */
    const char *key;  /* object key for messages (borrowed) */
} s3call;

/* URL of an object (key relative to the store's prefix; NULL: the bucket) plus an optional
 * canonical query (sorted, encoded: s3_query_escape). Caller frees; NULL when out of memory. */
char *s3_url(const s3store *st, const char *key, const char *query);
/* AWS URI encoding of s (unreserved characters kept, '/' kept when keep_slash) into a new
 * string; NULL when out of memory. */
char *s3_escape(const char *s, int keep_slash);

/* Add the headers every request carries: x-amz-content-sha256 for the body (hex of len bytes,
 * or of nothing) and, for bodies, the configured checksum (x-amz-checksum-sha256 or
 * Content-MD5). sha256_hex (may be NULL: computed) is the body's digest. Returns 0 or -1. */
int s3_add_body_headers(const s3store *st, s3call *c, const void *body, size_t len,
                        const char *sha256_hex);
int s3_add_header(s3call *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prepare easy for c (reset response fields, rewind the body). 0 or -1. */
int s3_call_setup(s3store *st, CURL *easy, s3call *c);
/* Classify a finished transfer: LC_OK, or an error with *transient set when a retry may
 * help (5xx, 429, SlowDown, RequestTimeout, timeouts, connection trouble). */
lc_rc s3_call_outcome(s3call *c, CURLcode cc, int *transient, lc_err *err);
/* Run c with retries (exponential backoff with jitter, RADPIPE_S3_RETRIES attempts). */
lc_rc s3_call_perform(s3store *st, s3call *c, lc_err *err);
/* The delay before attempt n+1 (n >= 1) in milliseconds. */
int s3_backoff_ms(int n);
void s3_call_free(s3call *c);
/* Reset the response part of c for another attempt. */
void s3_call_reset(s3call *c);

/* Parse an S3 XML document. fn is called for each leaf element with its path below the root
 * ("Contents/Key") and text, and with text NULL when a non-leaf element ends ("Contents"), so
 * callers can close records. *root (may be NULL) gets the root element's name. */
typedef void (*s3_xml_fn)(void *ctx, const char *path, const char *text);
lc_rc s3_xml_parse(const char *xml, size_t len, char root[64], s3_xml_fn fn, void *ctx,
                   lc_err *err);
/* GET url_key (NULL: the bucket) with query (a canonical query string) under s3_call_perform
 * and feed the XML answer to fn. what and shown_key name the call in errors. */
lc_rc s3_get_xml(s3store *st, const char *url_key, const char *query, const char *what,
                 const char *shown_key, s3_xml_fn fn, void *ctx, lc_err *err);
/* The Code and Message of an <Error> document ("" when absent). */
void s3_xml_error(const char *xml, size_t len, char code[64], char msg[256]);

/* Digests: hex SHA-256 (65), base64 SHA-256 (45), base64 MD5 (25), hex MD5 (33). */
void s3_sha256(const void *buf, size_t len, char hex[65], char b64[45]);
void s3_md5_b64(const void *buf, size_t len, char b64[25]);
void s3_md5_hex(const void *buf, size_t len, char hex[33]);
void s3_hex_to_b64(const char *hex, char b64[45]);

/* The multipart operations and the writer (store_s3_mpu.c). */
lc_rc s3_mpu_create(lc_store *s, const char *key, const char *digest, char **upload_id,
                    lc_err *err);
lc_rc s3_mpu_put_part(lc_store *s, const char *key, const char *upload_id, int number,
                      const void *buf, size_t len, lc_store_part *out, lc_err *err);
lc_rc s3_mpu_complete(lc_store *s, const char *key, const char *upload_id,
                      const lc_store_part *parts, size_t n, lc_err *err);
lc_rc s3_mpu_abort(lc_store *s, const char *key, const char *upload_id, lc_err *err);
lc_rc s3_mpu_list_parts(lc_store *s, const char *key, const char *upload_id, lc_store_part **parts,
                        size_t *n, lc_err *err);
lc_rc s3_mpu_list(lc_store *s, const char *prefix, lc_store_mpu_list_fn fn, void *ctx, lc_err *err);
lc_rc s3_writer_open(lc_store *s, const char *key, const lc_store_writer_opts *o,
                     lc_store_writer **out, lc_err *err);
/* Single PUT of a buffer (also the writer's small-object path); sha256_hex: the buffer's
 * SHA-256 when known (NULL: computed). */
lc_rc s3_put(lc_store *s, const char *key, const void *buf, size_t len, const char *digest,
             const char *sha256_hex, lc_err *err);

#endif
