/*
 * store_s3.c: the s3:// object-store backend over libcurl: configuration (RADPIPE_S3_*),
 * addressing (path-style or virtual-hosted), requests signed by curl (CURLOPT_AWS_SIGV4) with
 * retries (exponential backoff with jitter on 5xx, 429/SlowDown, timeouts and connection
 * errors), and the single-request operations: put, get (with Range), head, list
 * (ListObjectsV2 with pagination), delete, bucket creation. Multipart and the streaming
 * writer are in store_s3_mpu.c. Thread-safe: the store is read-only after open and requests
 * share connections through a locked curl share handle.
 */
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "lc/log.h"
#include "lc/util.h"
#include "store_s3_internal.h"

#define EMPTY_SHA256 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

#define OFF(f) offsetof(lc_store_s3_cfg, f)
const lc_cfg_var lc_store_s3_cfg_vars[] = {
    {"RADPIPE_S3_ENDPOINT", LC_CFG_STR, "", 0, -1, 0, NULL,
     "S3 endpoint for s3:// stores, http(s)://host[:port] (MinIO, Ceph); empty = AWS for the "
     "region",
     OFF(endpoint)},
    {"RADPIPE_S3_REGION", LC_CFG_STR, "us-east-1", 0, -1, 0, NULL,
     "region s3:// requests are signed for (SigV4)", OFF(region)},
    {"RADPIPE_S3_ACCESS_KEY", LC_CFG_STR, "", 0, -1, LC_CFG_SECRET, NULL,
     "access key id for s3:// stores", OFF(access_key)},
    {"RADPIPE_S3_SECRET_KEY", LC_CFG_STR, "", 0, -1, LC_CFG_SECRET, NULL,
     "secret access key for s3:// stores", OFF(secret_key)},
    {"RADPIPE_S3_ADDRESSING", LC_CFG_ENUM, "auto", 0, -1, 0, "auto|path|virtual",
     "path-style (host/bucket/key) or virtual-hosted (bucket.host/key) URLs; auto = virtual "
     "on AWS, path with RADPIPE_S3_ENDPOINT",
     OFF(addressing)},
    {"RADPIPE_S3_CA_FILE", LC_CFG_STR, "", 0, -1, 0, NULL,
     "PEM CA bundle to verify an https:// endpoint with; empty = the system's", OFF(ca_file)},
    {"RADPIPE_S3_CHECKSUM", LC_CFG_ENUM, "sha256", 0, -1, 0, "sha256|md5",
     "integrity header on every object and part: x-amz-checksum-sha256 or Content-MD5",
     OFF(checksum)},
    {"RADPIPE_S3_PART_SIZE", LC_CFG_BYTES, "16M", (double)S3_PART_MIN, (double)S3_PART_MAX, 0, NULL,
     "multipart part size (5M..5G)", OFF(part_size)},
    {"RADPIPE_S3_MULTIPART_THRESHOLD", LC_CFG_BYTES, "16M", (double)S3_PART_MIN,
     (double)S3_PART_MAX, 0, NULL,
     "objects at least this large are sent as multipart uploads, smaller ones with one PUT",
     OFF(threshold)},
    {"RADPIPE_S3_CONCURRENCY", LC_CFG_INT, "8", 1, 64, 0, NULL,
     "parts of one multipart upload in flight at once", OFF(concurrency)},
    {"RADPIPE_S3_RETRIES", LC_CFG_INT, "10", 1, 100, 0, NULL,
     "attempts per request on 5xx, 429/SlowDown, timeouts and connection errors (backoff "
     "0.2 s doubling to 10 s, with jitter)",
     OFF(retries)},
    {"RADPIPE_S3_TIMEOUT_SECONDS", LC_CFG_INT, "60", 1, 3600, 0, NULL,
     "a request that moves no data for this long is abandoned (and retried)", OFF(timeout_s)},
    {"RADPIPE_S3_CREATE_BUCKET", LC_CFG_BOOL, "false", 0, -1, 0, NULL,
     "create the bucket of an s3:// store when it does not exist", OFF(create_bucket)},
};
const size_t lc_store_s3_cfg_nvars = sizeof(lc_store_s3_cfg_vars) / sizeof(lc_store_s3_cfg_vars[0]);

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
}

/* --- digests, encoding ------------------------------------------------------------------ */

void s3_sha256(const void *buf, size_t len, char hex[65], char b64[45])
{
    unsigned char md[32];
    unsigned int n = 0;
    EVP_Digest(buf, len, md, &n, EVP_sha256(), NULL);
    if (hex)
        for (int i = 0; i < 32; i++)
            snprintf(hex + 2 * i, 3, "%02x", md[i]);
    if (b64)
        EVP_EncodeBlock((unsigned char *)b64, md, 32);
}

void s3_md5_b64(const void *buf, size_t len, char b64[25])
{
    unsigned char md[16];
    unsigned int n = 0;
    EVP_Digest(buf, len, md, &n, EVP_md5(), NULL);
    EVP_EncodeBlock((unsigned char *)b64, md, 16);
}

void s3_md5_hex(const void *buf, size_t len, char hex[33])
{
    unsigned char md[16];
    unsigned int n = 0;
    EVP_Digest(buf, len, md, &n, EVP_md5(), NULL);
    for (int i = 0; i < 16; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
}

void s3_hex_to_b64(const char *hex, char b64[45])
{
    unsigned char md[32];
    for (int i = 0; i < 32; i++) {
        unsigned v = 0;
        sscanf(hex + 2 * i, "%2x", &v);
        md[i] = (unsigned char)v;
    }
    EVP_EncodeBlock((unsigned char *)b64, md, 32);
}

char *s3_escape(const char *s, int keep_slash)
{
    static const char hexd[] = "0123456789ABCDEF";
    size_t n = strlen(s);
    char *out = malloc(3 * n + 1), *o = out;
    if (!out)
        return NULL;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        unsigned char c = *p;
        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '_' || c == '.' || c == '~' || (c == '/' && keep_slash)) {
            *o++ = (char)c;
        } else {
            *o++ = '%';
            *o++ = hexd[c >> 4];
            *o++ = hexd[c & 15];
        }
    }
    *o = '\0';
    return out;
}

char *s3_url(const s3store *st, const char *key, const char *query)
{
    char *full = NULL, *enc = NULL, *url = NULL;
    if (key && asprintf(&full, "%s%s", st->prefix, key) < 0)
        return NULL;
    if (full && !(enc = s3_escape(full, 1))) {
        free(full);
        return NULL;
    }
    /* path-style bucket requests go to "/bucket", virtual-hosted ones to "/" */
    int virt = strncmp(st->cfg.addressing, "virtual", 7) == 0;
    int r = asprintf(&url, "%s%s%s%s%s", st->base, enc ? "/" : (virt ? "/" : ""), enc ? enc : "",
                     query && *query ? "?" : "", query && *query ? query : "");
    free(full);
    free(enc);
    return r < 0 ? NULL : url;
}

/* --- requests ---------------------------------------------------------------------------- */

int s3_add_header(s3call *c, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(line))
        return -1;
    struct curl_slist *l = curl_slist_append(c->hdrs, line);
    if (!l)
        return -1;
    c->hdrs = l;
    return 0;
}

int s3_add_body_headers(const s3store *st, s3call *c, const void *body, size_t len,
                        const char *sha256_hex)
{
    char hex[65], b64[45];
    if (!body) /* GET, HEAD, DELETE: the hash of an empty payload */
        return s3_add_header(c, "x-amz-content-sha256: %s", EMPTY_SHA256);
    if (sha256_hex) {
        lc_strlcpy(hex, sha256_hex, sizeof(hex));
        s3_hex_to_b64(hex, b64);
    } else {
        s3_sha256(body, len, hex, b64);
    }
    /* a signed payload: the store checks the body against it */
    if (s3_add_header(c, "x-amz-content-sha256: %s", hex) != 0)
        return -1;
    /* the body goes out as in-memory fields (s3_call_setup): say what it is, or libcurl
     * calls it a form */
    if (strcmp(c->method, "PUT") == 0 &&
        s3_add_header(c, "Content-Type: application/octet-stream") != 0)
        return -1;
    if (strcmp(st->cfg.checksum, "md5") == 0) {
        char md5[25];
        s3_md5_b64(body, len, md5);
        return s3_add_header(c, "Content-MD5: %s", md5);
    }
    return s3_add_header(c, "x-amz-checksum-sha256: %s", b64);
}

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *ud)
{
    s3call *c = ud;
    size_t n = size * nmemb;
    if (c->sink && c->status >= 200 && c->status < 300) {
        if (c->sink(c->sink_ctx, ptr, n) != 0) {
            c->sink_stopped = 1;
            return 0; /* CURLE_WRITE_ERROR */
        }
        c->delivered += (int64_t)n;
        return n;
    }
    s3buf *b = &c->resp;
    if (b->len + n > b->max)
        return 0;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d)
            return 0;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, ptr, n);
    b->len += n;
    b->data[b->len] = '\0';
    return n;
}

static void trim_copy(char *dst, size_t cap, const char *v, size_t n)
{
    while (n && (v[n - 1] == '\r' || v[n - 1] == '\n' || v[n - 1] == ' '))
        n--;
    while (n && *v == ' ') {
        v++;
        n--;
    }
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, v, n);
    dst[n] = '\0';
}

static size_t on_header(char *ptr, size_t size, size_t nmemb, void *ud)
{
    s3call *c = ud;
    size_t n = size * nmemb;
    char v[256];
    if (n > 5 && strncmp(ptr, "HTTP/", 5) == 0) { /* a new response (e.g. after 100) */
        c->etag[0] = c->digest[0] = '\0';
        c->length = -1;
        c->mtime_ms = 0;
        const char *sp = memchr(ptr, ' ', n);
        c->status = sp ? strtol(sp + 1, NULL, 10) : 0;
        return n;
    }
    const char *colon = memchr(ptr, ':', n);
    if (!colon)
        return n;
    size_t kl = (size_t)(colon - ptr);
    trim_copy(v, sizeof(v), colon + 1, n - kl - 1);
    if (kl == 4 && strncasecmp(ptr, "etag", 4) == 0)
        lc_strlcpy(c->etag, v, sizeof(c->etag));
    else if (kl == strlen(S3_DIGEST_HDR) && strncasecmp(ptr, S3_DIGEST_HDR, kl) == 0)
        lc_strlcpy(c->digest, v, sizeof(c->digest));
    else if (kl == 14 && strncasecmp(ptr, "content-length", 14) == 0)
        c->length = strtoll(v, NULL, 10);
    else if (kl == 13 && strncasecmp(ptr, "last-modified", 13) == 0) {
        time_t t = curl_getdate(v, NULL);
        c->mtime_ms = t > 0 ? (int64_t)t * 1000 : 0;
    }
    return n;
}

void s3_call_reset(s3call *c)
{
    c->status = 0;
    c->resp.len = 0;
    if (c->resp.data)
        c->resp.data[0] = '\0';
    c->resp.max = S3_RESP_MAX;
    c->etag[0] = c->digest[0] = '\0';
    c->length = -1;
    c->mtime_ms = 0;
    c->errbuf[0] = '\0';
    c->sink_stopped = 0;
}

void s3_call_free(s3call *c)
{
    free(c->url);
    curl_slist_free_all(c->hdrs);
    free(c->resp.data);
    memset(c, 0, sizeof(*c));
}

int s3_call_setup(s3store *st, CURL *e, s3call *c)
{
    s3_call_reset(c);
    CURLcode r = CURLE_OK;
#define SET(opt, val)                                                                              \
    do {                                                                                           \
        if (r == CURLE_OK)                                                                         \
            r = curl_easy_setopt(e, opt, val);                                                     \
    } while (0)
    SET(CURLOPT_URL, c->url);
    SET(CURLOPT_SHARE, st->share);
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_AWS_SIGV4, st->sigv4);
    SET(CURLOPT_USERNAME, st->cfg.access_key);
    SET(CURLOPT_PASSWORD, st->cfg.secret_key);
    SET(CURLOPT_HTTPHEADER, c->hdrs);
    SET(CURLOPT_WRITEFUNCTION, on_body);
    SET(CURLOPT_WRITEDATA, c);
    SET(CURLOPT_HEADERFUNCTION, on_header);
    SET(CURLOPT_HEADERDATA, c);
    SET(CURLOPT_ERRORBUFFER, c->errbuf);
    SET(CURLOPT_CONNECTTIMEOUT, 10L);
    SET(CURLOPT_LOW_SPEED_LIMIT, 1L);
    SET(CURLOPT_LOW_SPEED_TIME, (long)st->cfg.timeout_s);
    SET(CURLOPT_TCP_KEEPALIVE, 1L);
    SET(CURLOPT_MAXCONNECTS, (long)S3_POOL_MAX);
    SET(CURLOPT_PRIVATE, c);
    if (st->cfg.ca_file[0])
        SET(CURLOPT_CAINFO, st->cfg.ca_file);
    if (strcmp(c->method, "HEAD") == 0) {
        SET(CURLOPT_NOBODY, 1L);
    } else if (strcmp(c->method, "PUT") == 0 || strcmp(c->method, "POST") == 0) {
        /* Bodies are in memory: libcurl sends them from there (again from the start on a
         * retry). As POST fields a body under 1 MiB goes without "Expect: 100-continue",
         * which libcurl puts on every PUT upload: a round trip and an extra answer per object
         * that made small objects a fifth slower against s3rver. */
        SET(CURLOPT_POSTFIELDS, c->body ? c->body : "");
        SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)c->body_len);
        if (strcmp(c->method, "PUT") == 0)
            SET(CURLOPT_CUSTOMREQUEST, "PUT");
    } else if (strcmp(c->method, "DELETE") == 0) {
        SET(CURLOPT_CUSTOMREQUEST, "DELETE");
    } else {
        SET(CURLOPT_HTTPGET, 1L);
    }
#undef SET
    return r == CURLE_OK ? 0 : -1;
}

static lc_rc status_rc(long status, const char *code)
{
    if (status == 404)
        return LC_ERR_NOT_FOUND;
    if (status == 403)
        return strcmp(code, "AccessDenied") == 0 ? LC_ERR_FORBIDDEN : LC_ERR_AUTH;
    if (status == 401)
        return LC_ERR_AUTH;
    if (status == 409 || status == 412)
        return LC_ERR_CONFLICT;
    if (status >= 300 && status < 400)
        return LC_ERR_CONFIG; /* PermanentRedirect: the bucket lives in another region */
    return LC_ERR_INVALID;
}

lc_rc s3_call_outcome(s3call *c, CURLcode cc, int *transient, lc_err *err)
{
    const char *key = c->key ? c->key : "";
    *transient = 0;
    if (cc != CURLE_OK) {
        if (cc == CURLE_WRITE_ERROR && c->sink_stopped)
            return lc_err_set(err, LC_ERR_CANCELLED, "reading object \"%s\" was stopped", key);
        switch (cc) {
        case CURLE_COULDNT_RESOLVE_HOST:
        case CURLE_COULDNT_CONNECT:
        case CURLE_OPERATION_TIMEDOUT:
        case CURLE_SEND_ERROR:
        case CURLE_RECV_ERROR:
        case CURLE_GOT_NOTHING:
        case CURLE_PARTIAL_FILE:
        case CURLE_SSL_CONNECT_ERROR:
        case CURLE_HTTP2:
        case CURLE_HTTP2_STREAM:
        case CURLE_AGAIN:
            *transient = 1;
            break;
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_CACERT_BADFILE:
        case CURLE_SSL_CERTPROBLEM:
        case CURLE_UNSUPPORTED_PROTOCOL:
        case CURLE_URL_MALFORMAT:
            /* configuration: retrying cannot help */
            return lc_err_set(err, LC_ERR_CONFIG, "could not %s object \"%s\": %s", c->what, key,
                              c->errbuf[0] ? c->errbuf : curl_easy_strerror(cc));
        default:
            break;
        }
        return lc_err_set(err, *transient ? LC_ERR_UNAVAILABLE : LC_ERR_STORE,
                          "could not %s object \"%s\": %s", c->what, key,
                          c->errbuf[0] ? c->errbuf : curl_easy_strerror(cc));
    }
    char code[64] = "", msg[256] = "";
    if (c->status >= 200 && c->status < 300) {
        /* CompleteMultipartUpload may answer 200 with an error document */
        if (c->resp.len && strstr(c->resp.data, "<Error>")) {
            s3_xml_error(c->resp.data, c->resp.len, code, msg);
            if (code[0]) {
                *transient = 1;
                return lc_err_set(err, LC_ERR_UNAVAILABLE, "could not %s object \"%s\": %s: %s",
                                  c->what, key, code, msg);
            }
        }
        return LC_OK;
    }
    s3_xml_error(c->resp.data, c->resp.len, code, msg);
    if (c->status >= 500 || c->status == 429 || c->status == 408 || strcmp(code, "SlowDown") == 0 ||
        strcmp(code, "RequestTimeout") == 0 || strcmp(code, "InternalError") == 0) {
        *transient = 1;
        return lc_err_set(err, LC_ERR_UNAVAILABLE, "could not %s object \"%s\": HTTP %ld%s%s%s%s",
                          c->what, key, c->status, code[0] ? " " : "", code, msg[0] ? ": " : "",
                          msg);
    }
    if (c->status == 0)
        return lc_err_set(err, LC_ERR_STORE, "could not %s object \"%s\": no HTTP answer", c->what,
                          key);
    return lc_err_set(err, status_rc(c->status, code),
                      "could not %s object \"%s\": HTTP %ld%s%s%s%s", c->what, key, c->status,
                      code[0] ? " " : "", code, msg[0] ? ": " : "", msg);
}

int s3_backoff_ms(int n)
{
    /* 200 ms doubling to 10 s; three quarters fixed, a quarter random. The floor matters: the
     * default 10 attempts wait at least 32 s in all (at most 42.6 s), so a store that is
     * restarted or briefly unreachable (20-30 s) is waited out within the request, not by
     * failing the job. */
    long cap = 200L << (n > 6 ? 6 : n - 1);
    if (cap > 10000)
        cap = 10000;
    unsigned r = 0;
    lc_random_bytes(&r, sizeof(r));
    return (int)(cap - cap / 4 + (long)(r % (unsigned)(cap / 4 + 1)));
}

lc_rc s3_call_perform(s3store *st, s3call *c, lc_err *err)
{
    CURL *e = curl_easy_init();
    if (!e)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory starting a request");
    lc_rc rc = LC_OK;
    for (int attempt = 1;; attempt++) {
        int transient = 0;
        curl_easy_reset(e);
        if (s3_call_setup(st, e, c) != 0) {
            rc = lc_err_set(err, LC_ERR_INTERNAL, "could not set up a request");
            break;
        }
        CURLcode cc = curl_easy_perform(e);
        rc = s3_call_outcome(c, cc, &transient, err);
        if (rc == LC_OK || !transient || attempt >= st->cfg.retries || c->delivered > 0)
            break;
        lc_counter_inc(st->retries);
        int ms = s3_backoff_ms(attempt);
        lc_log_debug("object store request failed, retrying", LC_LS("error", lc_err_msg(err)),
                     LC_LI("attempt", attempt), LC_LI("delay_ms", ms));
        lc_sleep_ms(ms, NULL);
    }
    curl_easy_cleanup(e);
    return rc;
}

/* --- open / close ------------------------------------------------------------------------ */

static void share_lock(CURL *h, curl_lock_data data, curl_lock_access a, void *ud)
{
    (void)h;
    (void)a;
    s3store *st = ud;
    pthread_mutex_lock(&st->locks[data]);
}

static void share_unlock(CURL *h, curl_lock_data data, void *ud)
{
    (void)h;
    s3store *st = ud;
    pthread_mutex_unlock(&st->locks[data]);
}

/* S3's bucket naming rules (3..63 of [a-z0-9.-], alphanumeric at both ends, no "..");
 * underscores and upper case are accepted for older stores. */
static int bucket_valid(const char *b)
{
    size_t n = strlen(b);
    if (n < 3 || n > 63)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = b[i];
        int alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z');
        if (!alnum && c != '.' && c != '-' && c != '_')
            return 0;
        if ((i == 0 || i == n - 1) && !alnum)
            return 0;
        if (c == '.' && b[i + 1] == '.')
            return 0;
    }
    return 1;
}

static lc_rc load_cfg(lc_store_s3_cfg *cfg, lc_err *err)
{
    lc_cfg_table t = {lc_store_s3_cfg_vars, lc_store_s3_cfg_nvars, cfg};
    lc_rc rc = lc_cfg_load(&t, 1, err);
    if (rc != LC_OK)
        return rc;
    if (cfg->threshold < cfg->part_size && cfg->threshold < S3_PART_MIN)
        cfg->threshold = S3_PART_MIN;
    return LC_OK;
}

static void free_cfg(lc_store_s3_cfg *cfg)
{
    lc_cfg_table t = {lc_store_s3_cfg_vars, lc_store_s3_cfg_nvars, cfg};
    lc_cfg_release(&t, 1);
}

static lc_rc create_bucket(s3store *st, lc_err *err)
{
    s3call c = {.method = "HEAD", .what = "find the bucket of", .key = st->bucket};
    lc_rc rc = LC_OK;
    if (!(c.url = s3_url(st, NULL, NULL)) || s3_add_body_headers(st, &c, NULL, 0, NULL) != 0) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    rc = s3_call_perform(st, &c, err);
    if (rc != LC_ERR_NOT_FOUND)
        goto out;
    s3_call_free(&c);
    char body[256] = "";
    if (strcmp(st->cfg.region, "us-east-1") != 0)
        snprintf(body, sizeof(body),
                 "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"
                 "<LocationConstraint>%s</LocationConstraint></CreateBucketConfiguration>",
                 st->cfg.region);
    c = (s3call){.method = "PUT",
                 .what = "create the bucket of",
                 .key = st->bucket,
                 .body = body,
                 .body_len = strlen(body)};
    if (!(c.url = s3_url(st, NULL, NULL)) ||
        s3_add_body_headers(st, &c, body, c.body_len, NULL) != 0) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    rc = s3_call_perform(st, &c, err);
    if (rc == LC_ERR_CONFLICT) /* BucketAlreadyOwnedByYou, or created meanwhile */
        rc = LC_OK;
    if (rc == LC_OK)
        lc_log_info("created bucket", LC_LS("bucket", st->bucket));
out:
    s3_call_free(&c);
    return rc;
}

static void s3_close(lc_store *s)
{
    s3store *st = s3_of(s);
    if (!st)
        return;
    if (st->share)
        curl_share_cleanup(st->share);
    for (int i = 0; i < CURL_LOCK_DATA_LAST; i++)
        pthread_mutex_destroy(&st->locks[i]);
    free_cfg(&st->cfg);
    free(st->bucket);
    free(st->prefix);
    free(st->base);
    free(st);
    s->impl = NULL;
}

static lc_rc s3_open(lc_store *s, const char *url, lc_err *err)
{
    lc_rc rc = LC_OK;
    pthread_once(&curl_once, curl_init_once);
    s3store *st = calloc(1, sizeof(*st));
    if (!st)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory opening object store");
    for (int i = 0; i < CURL_LOCK_DATA_LAST; i++)
        pthread_mutex_init(&st->locks[i], NULL);
    s->impl = st;
    if ((rc = load_cfg(&st->cfg, err)) != LC_OK) {
        lc_err_wrap(err, "could not configure the s3:// store");
        goto out;
    }
    /* s3://bucket[/prefix]: no credentials, query or fragment in the URL */
    const char *b = url + strlen("s3://");
    size_t bl = strcspn(b, "/");
    if (strpbrk(url, "@?#")) {
        rc = lc_err_set(err, LC_ERR_CONFIG,
                        "object store URL must be s3://bucket[/prefix] (credentials come from "
                        "RADPIPE_S3_ACCESS_KEY and RADPIPE_S3_SECRET_KEY)");
        goto out;
    }
    st->bucket = strndup(b, bl);
    const char *p = b[bl] ? b + bl + 1 : "";
    size_t pl = strlen(p);
    while (pl && p[pl - 1] == '/')
        pl--;
    if (!st->bucket || asprintf(&st->prefix, "%.*s%s", (int)pl, p, pl ? "/" : "") < 0) {
        st->prefix = NULL;
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory opening object store");
        goto out;
    }
    if (!bucket_valid(st->bucket)) {
        rc = lc_err_set(err, LC_ERR_CONFIG, "invalid bucket name \"%s\" in object store URL",
                        st->bucket);
        goto out;
    }
    if (pl) {
        char *pk = strndup(p, pl);
        int ok = pk && lc_store_key_valid(pk);
        free(pk);
        if (!ok) {
            rc = lc_err_set(err, LC_ERR_CONFIG, "invalid key prefix in object store URL");
            goto out;
        }
    }
    if (!st->cfg.access_key[0] || !st->cfg.secret_key[0]) {
        rc = lc_err_set(err, LC_ERR_CONFIG,
                        "s3:// stores need RADPIPE_S3_ACCESS_KEY and RADPIPE_S3_SECRET_KEY (or "
                        "their _FILE variants)");
        goto out;
    }
    /* endpoint: scheme://host[:port], no path */
    char scheme[8], host[256];
    const char *ep = st->cfg.endpoint;
    char aws[300];
    if (!ep[0]) {
        snprintf(aws, sizeof(aws), "https://s3.%s.amazonaws.com", st->cfg.region);
        ep = aws;
    }
    const char *sep = strstr(ep, "://");
    size_t sl = sep ? (size_t)(sep - ep) : 0;
    if (!sep || sl >= sizeof(scheme) ||
        (strncmp(ep, "http", sl) != 0 && strncmp(ep, "https", sl) != 0)) {
        rc = lc_err_set(err, LC_ERR_CONFIG,
                        "RADPIPE_S3_ENDPOINT must be http://host[:port] or https://host[:port]");
        goto out;
    }
    memcpy(scheme, ep, sl);
    scheme[sl] = '\0';
    size_t hl = strcspn(sep + 3, "/?#");
    if (hl == 0 || hl >= sizeof(host)) {
        rc = lc_err_set(err, LC_ERR_CONFIG, "RADPIPE_S3_ENDPOINT has no host");
        goto out;
    }
    memcpy(host, sep + 3, hl);
    host[hl] = '\0';
    if (strcmp(st->cfg.addressing, "auto") == 0) {
        free(st->cfg.addressing);
        st->cfg.addressing = strdup(st->cfg.endpoint[0] ? "path" : "virtual");
        if (!st->cfg.addressing) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory opening object store");
            goto out;
        }
    }
    int virt = strcmp(st->cfg.addressing, "virtual") == 0;
    if (virt && strchr(st->bucket, '_')) {
        rc = lc_err_set(err, LC_ERR_CONFIG,
                        "bucket \"%s\" cannot be addressed as a host name: use "
                        "RADPIPE_S3_ADDRESSING=path",
                        st->bucket);
        goto out;
    }
    if ((virt ? asprintf(&st->base, "%s://%s.%s", scheme, st->bucket, host)
              : asprintf(&st->base, "%s://%s/%s", scheme, host, st->bucket)) < 0) {
        st->base = NULL;
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory opening object store");
        goto out;
    }
    snprintf(st->sigv4, sizeof(st->sigv4), "aws:amz:%s:s3", st->cfg.region);
    if (!(st->share = curl_share_init())) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory opening object store");
        goto out;
    }
    curl_share_setopt(st->share, CURLSHOPT_LOCKFUNC, share_lock);
    curl_share_setopt(st->share, CURLSHOPT_UNLOCKFUNC, share_unlock);
    curl_share_setopt(st->share, CURLSHOPT_USERDATA, st);
    curl_share_setopt(st->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS);
    curl_share_setopt(st->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
    curl_share_setopt(st->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_CONNECT);
    if (asprintf(&s->url, "s3://%s%s%.*s", st->bucket, pl ? "/" : "", (int)pl, p) < 0) {
        s->url = NULL;
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory opening object store");
        goto out;
    }
    if (st->cfg.create_bucket && (rc = create_bucket(st, err)) != LC_OK)
        lc_err_wrap(err, "could not open object store \"%s\"", s->url);
out:
    if (rc != LC_OK)
        s3_close(s);
    return rc;
}

static void s3_instrument(lc_store *s, lc_metrics *m, const char *prefix, const char *label)
{
    s3store *st = s3_of(s);
    char name[128], help[160], labels[200], esc[128];
    lc_metrics_escape_label(esc, sizeof(esc), label);
    snprintf(labels, sizeof(labels), "store=\"%s\"", esc);
    snprintf(name, sizeof(name), "%s_retries_total", prefix);
    snprintf(help, sizeof(help), "object store requests retried after a transient error");
    st->retries = lc_metrics_counter(m, name, help, labels);
    static const double buckets[] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
    snprintf(name, sizeof(name), "%s_part_seconds", prefix);
    snprintf(help, sizeof(help), "time to send one part or single-request object");
    st->part_seconds =
        lc_metrics_histogram(m, name, help, labels, buckets, sizeof(buckets) / sizeof(buckets[0]));
}

/* --- single-request operations ----------------------------------------------------------- */

static lc_rc nomem(lc_err *err)
{
    return lc_err_set(err, LC_ERR_NOMEM, "out of memory building an object store request");
}

lc_rc s3_get_xml(s3store *st, const char *url_key, const char *query, const char *what,
                 const char *shown_key, s3_xml_fn fn, void *ctx, lc_err *err)
{
    s3call c = {.method = "GET", .what = what, .key = shown_key};
    if (!(c.url = s3_url(st, url_key, query)) || s3_add_body_headers(st, &c, NULL, 0, NULL) != 0) {
        s3_call_free(&c);
        return nomem(err);
    }
    lc_rc rc = s3_call_perform(st, &c, err);
    if (rc == LC_OK)
        rc = s3_xml_parse(c.resp.data ? c.resp.data : "", c.resp.len, NULL, fn, ctx, err);
    s3_call_free(&c);
    return rc;
}

lc_rc s3_put(lc_store *s, const char *key, const void *buf, size_t len, const char *digest,
             const char *sha256_hex, lc_err *err)
{
    s3store *st = s3_of(s);
    char hex[65];
    s3call c = {.method = "PUT", .what = "write", .key = key, .body = buf, .body_len = len};
    lc_rc rc;
    if (sha256_hex && strlen(sha256_hex) == 64)
        lc_strlcpy(hex, sha256_hex, sizeof(hex));
    else
        s3_sha256(buf, len, hex, NULL);
    if (!(c.url = s3_url(st, key, NULL)) || s3_add_body_headers(st, &c, buf, len, hex) != 0 ||
        s3_add_header(&c, S3_DIGEST_HDR ": %s", digest ? digest : hex) != 0) {
        rc = nomem(err);
        goto out;
    }
    int64_t t0 = lc_now_ms();
    rc = s3_call_perform(st, &c, err);
    if (rc == LC_OK)
        lc_histogram_observe(st->part_seconds, (double)(lc_now_ms() - t0) / 1000.0);
out:
    s3_call_free(&c);
    return rc;
}

static lc_rc s3_put_buf(lc_store *s, const char *key, const void *buf, size_t len,
                        const lc_store_put_opts *o, lc_err *err)
{
    return s3_put(s, key, buf, len, o->digest, o->sha256, err);
}

/* Read a local file into memory for a single PUT, or stream it through a writer. */
static lc_rc s3_put_file(lc_store *s, const char *key, const char *src, unsigned flags, lc_err *err)
{
    lc_rc rc = LC_OK;
    char *buf = NULL;
    lc_store_writer *w = NULL;
    int fd = open(src, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0)
        return lc_err_set(err, errno == ENOENT ? LC_ERR_NOT_FOUND : LC_ERR_IO,
                          "could not open \"%s\": %s", src, strerror(errno));
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        rc = lc_err_set(err, LC_ERR_INVALID, "could not store \"%s\": not a regular file", src);
        goto out;
    }
    const lc_store_writer_opts o = {.size_hint = (int64_t)sb.st_size};
    if ((rc = s3_writer_open(s, key, &o, &w, err)) != LC_OK)
        goto out;
    size_t chunk = 4 << 20;
    if (!(buf = malloc(chunk))) {
        rc = nomem(err);
        goto out;
    }
    for (;;) {
        ssize_t n = read(fd, buf, chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = lc_err_set(err, LC_ERR_IO, "could not read \"%s\": %s", src, strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        if ((rc = lc_store_writer_write(w, buf, (size_t)n, err)) != LC_OK)
            goto out;
    }
    rc = lc_store_writer_commit(w, err);
    w = NULL;
    if (rc == LC_OK && (flags & LC_STORE_MOVE) && unlink(src) != 0 && errno != ENOENT)
        rc = lc_err_set(err, LC_ERR_IO, "stored object \"%s\" but could not remove \"%s\": %s", key,
                        src, strerror(errno));
out:
    lc_store_writer_abort(w);
    free(buf);
    close(fd);
    return rc;
}

static lc_rc s3_read(lc_store *s, const char *key, int64_t offset, int64_t len, lc_store_read_fn fn,
                     void *ctx, lc_err *err)
{
    s3store *st = s3_of(s);
    lc_rc rc = LC_OK;
    int resumes = 0;
    for (;;) {
        s3call c = {.method = "GET", .what = "read", .key = key, .sink = fn, .sink_ctx = ctx};
        int ranged = offset > 0 || len >= 0, r = 0;
        if (!(c.url = s3_url(st, key, NULL)) || s3_add_body_headers(st, &c, NULL, 0, NULL) != 0)
            r = -1;
        else if (ranged && len >= 0)
            r = s3_add_header(&c, "Range: bytes=%lld-%lld", (long long)offset,
                              (long long)(offset + len - 1));
        else if (ranged)
            r = s3_add_header(&c, "Range: bytes=%lld-", (long long)offset);
        if (r != 0) {
            s3_call_free(&c);
            return nomem(err);
        }
        rc = s3_call_perform(st, &c, err);
        if (rc == LC_OK && c.status == 200 && ranged)
            rc =
                lc_err_set(err, LC_ERR_STORE, "object store ignored the range read of \"%s\"", key);
        /* a range starting past the end is an empty read, not an error */
        if (rc == LC_ERR_INVALID && c.status == 416)
            rc = LC_OK;
        int64_t got = c.delivered;
        s3_call_free(&c);
        /* the connection broke after some bytes: go on from there with a new range */
        if (rc == LC_ERR_UNAVAILABLE && got > 0 && ++resumes < st->cfg.retries) {
            offset += got;
            if (len >= 0)
                len -= got;
            lc_counter_inc(st->retries);
            lc_sleep_ms(s3_backoff_ms(1), NULL);
            continue;
        }
        return rc;
    }
}

typedef struct membuf {
    char *data;
    size_t len, cap, max;
    int too_large;
} membuf;

static int membuf_add(void *ctx, const void *buf, size_t len)
{
    membuf *m = ctx;
    if (m->len + len > m->max) {
        m->too_large = 1;
        return 1;
    }
    if (m->len + len + 1 > m->cap) {
        size_t cap = m->cap ? m->cap : 65536;
        while (cap < m->len + len + 1)
            cap *= 2;
        char *d = realloc(m->data, cap);
        if (!d)
            return 1;
        m->data = d;
        m->cap = cap;
    }
    memcpy(m->data + m->len, buf, len);
    m->len += len;
    m->data[m->len] = '\0';
    return 0;
}

static lc_rc s3_get_buf(lc_store *s, const char *key, size_t max, void **out, size_t *len,
                        lc_err *err)
{
    membuf m = {.max = max};
    lc_rc rc = s3_read(s, key, 0, -1, membuf_add, &m, err);
    if (rc == LC_ERR_CANCELLED)
        rc = m.too_large ? lc_err_set(err, LC_ERR_TOO_LARGE,
                                      "object \"%s\" is larger than %zu bytes", key, max)
                         : nomem(err);
    if (rc == LC_OK && !m.data && !(m.data = calloc(1, 1)))
        rc = nomem(err);
    if (rc != LC_OK) {
        free(m.data);
        return rc;
    }
    *out = m.data;
    *len = m.len;
    return LC_OK;
}

typedef struct filesink {
    int fd;
    int failed;
} filesink;

static int file_add(void *ctx, const void *buf, size_t len)
{
    filesink *f = ctx;
    const char *p = buf;
    while (len) {
        ssize_t n = write(f->fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            f->failed = errno;
            return 1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Download to "<dst>.part-<random>" beside dst, then rename: dst appears whole or not at all.
 * A retried request starts the file over. */
static lc_rc s3_get_file(lc_store *s, const char *key, const char *dst, lc_err *err)
{
    char *tmp = NULL;
    char rnd[LC_UUID_LEN + 1];
    lc_rc rc;
    lc_uuid_v4(rnd);
    if (asprintf(&tmp, "%s.part-%.8s", dst, rnd) < 0)
        return nomem(err);
    filesink f = {.fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644)};
    if (f.fd < 0) {
        rc = lc_err_set(err, errno == ENOENT ? LC_ERR_NOT_FOUND : LC_ERR_IO,
                        "could not create \"%s\": %s", dst, strerror(errno));
        free(tmp);
        return rc;
    }
    rc = s3_read(s, key, 0, -1, file_add, &f, err);
    if (rc == LC_ERR_CANCELLED && f.failed)
        rc = lc_err_set(err, LC_ERR_IO, "could not write \"%s\": %s", dst, strerror(f.failed));
    if (rc == LC_OK && (fsync(f.fd) != 0 || rename(tmp, dst) != 0))
        rc = lc_err_set(err, LC_ERR_IO, "could not write \"%s\": %s", dst, strerror(errno));
    close(f.fd);
    if (rc != LC_OK)
        unlink(tmp);
    free(tmp);
    return rc;
}

static lc_rc s3_head(lc_store *s, const char *key, lc_store_stat *out, lc_err *err)
{
    s3store *st = s3_of(s);
    s3call c = {.method = "HEAD", .what = "stat", .key = key};
    lc_rc rc;
    if (!(c.url = s3_url(st, key, NULL)) || s3_add_body_headers(st, &c, NULL, 0, NULL) != 0) {
        rc = nomem(err);
        goto out;
    }
    rc = s3_call_perform(st, &c, err);
    if (rc == LC_OK) {
        memset(out, 0, sizeof(*out));
        out->size = c.length < 0 ? 0 : c.length;
        out->mtime_ms = c.mtime_ms;
        lc_strlcpy(out->digest, c.digest, sizeof(out->digest));
    } else if (rc == LC_ERR_NOT_FOUND) {
        rc = lc_err_set(err, LC_ERR_NOT_FOUND, "object \"%s\" does not exist", key);
    }
out:
    s3_call_free(&c);
    return rc;
}

static lc_rc s3_delete(lc_store *s, const char *key, lc_err *err)
{
    s3store *st = s3_of(s);
    s3call c = {.method = "DELETE", .what = "delete", .key = key};
    lc_rc rc;
    if (!(c.url = s3_url(st, key, NULL)) || s3_add_body_headers(st, &c, NULL, 0, NULL) != 0) {
        rc = nomem(err);
        goto out;
    }
    rc = s3_call_perform(st, &c, err);
    if (rc == LC_ERR_NOT_FOUND) /* S3 answers 204 for missing keys; others may say 404 */
        rc = LC_OK;
out:
    s3_call_free(&c);
    return rc;
}

/* --- listing ----------------------------------------------------------------------------- */

typedef struct listctx {
    const s3store *st;
    lc_store_list_fn fn;
    void *ctx;
    int stopped;
    int truncated;
    char *token; /* NextContinuationToken */
    char key[1100];
    lc_store_stat stat;
} listctx;

static int64_t parse_iso8601_ms(const char *t)
{
    struct tm tm = {0};
    int ms = 0;
    if (sscanf(t, "%d-%d-%dT%d:%d:%d.%d", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
               &tm.tm_min, &tm.tm_sec, &ms) < 6)
        return 0;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    return (int64_t)timegm(&tm) * 1000 + ms;
}

static void list_fn(void *ud, const char *path, const char *text)
{
    listctx *l = ud;
    if (l->stopped)
        return;
    if (!text) {
        if (strcmp(path, "Contents") == 0) {
            size_t pl = strlen(l->st->prefix);
            const char *rel = l->key + pl;
            if (strncmp(l->key, l->st->prefix, pl) == 0 && lc_store_key_valid(rel) &&
                l->fn(l->ctx, rel, &l->stat) != 0)
                l->stopped = 1;
            l->key[0] = '\0';
            memset(&l->stat, 0, sizeof(l->stat));
        }
        return;
    }
    if (strcmp(path, "Contents/Key") == 0)
        lc_strlcpy(l->key, text, sizeof(l->key));
    else if (strcmp(path, "Contents/Size") == 0)
        l->stat.size = strtoll(text, NULL, 10);
    else if (strcmp(path, "Contents/LastModified") == 0)
        l->stat.mtime_ms = parse_iso8601_ms(text);
    else if (strcmp(path, "IsTruncated") == 0)
        l->truncated = strcmp(text, "true") == 0;
    else if (strcmp(path, "NextContinuationToken") == 0) {
        free(l->token);
        l->token = strdup(text);
    }
}

static lc_rc s3_list(lc_store *s, const char *prefix, lc_store_list_fn fn, void *ctx, lc_err *err)
{
    s3store *st = s3_of(s);
    lc_rc rc = LC_OK;
    listctx l = {.st = st, .fn = fn, .ctx = ctx};
    char *full = NULL, *eprefix = NULL, *etoken = NULL, *query = NULL;
    if (asprintf(&full, "%s%s", st->prefix, prefix) < 0) {
        full = NULL;
        rc = nomem(err);
        goto out;
    }
    if (!(eprefix = s3_escape(full, 0))) {
        rc = nomem(err);
        goto out;
    }
    for (;;) {
        free(query);
        query = NULL;
        /* the canonical query: parameters sorted by name, values encoded */
        int r = l.token
                    ? asprintf(&query, "continuation-token=%s&list-type=2&max-keys=1000&prefix=%s",
                               (etoken = s3_escape(l.token, 0)) ? etoken : "", eprefix)
                    : asprintf(&query, "list-type=2&max-keys=1000&prefix=%s", eprefix);
        if (r < 0 || (l.token && !etoken)) {
            query = NULL;
            rc = nomem(err);
            goto out;
        }
        free(etoken);
        etoken = NULL;
        l.truncated = 0;
        free(l.token);
        l.token = NULL;
        rc = s3_get_xml(st, NULL, query, "list", prefix, list_fn, &l, err);
        if (rc != LC_OK || l.stopped || !l.truncated)
            break;
        if (!l.token) {
            rc = lc_err_set(err, LC_ERR_STORE,
                            "object store listing is truncated but has no continuation token");
            break;
        }
    }
out:
    free(l.token);
    free(etoken);
    free(query);
    free(eprefix);
    free(full);
    return rc;
}

static int64_t s3_threshold(const lc_store *s)
{
    return ((const s3store *)s->impl)->cfg.threshold;
}

const lc_store_backend lc_store_s3_backend = {
    .scheme = "s3://",
    .open = s3_open,
    .close = s3_close,
    .put_buf = s3_put_buf,
    .put_file = s3_put_file,
    .get_file = s3_get_file,
    .get_buf = s3_get_buf,
    .head = s3_head,
    .del = s3_delete,
    .list = s3_list,
    .local_path = NULL,
    .writer_open = s3_writer_open,
    .read = s3_read,
    .instrument = s3_instrument,
    .multipart_threshold = s3_threshold,
    .mpu_create = s3_mpu_create,
    .mpu_put_part = s3_mpu_put_part,
    .mpu_complete = s3_mpu_complete,
    .mpu_abort = s3_mpu_abort,
    .mpu_list_parts = s3_mpu_list_parts,
    .mpu_list = s3_mpu_list,
};
