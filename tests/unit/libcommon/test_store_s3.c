/*
 * test_store_s3.c: the s3:// object store against s3rver (a real S3-protocol server, started
 * per test group on a free port with a temporary directory), checked with Debian's awscli:
 * round trips, ranges, listing with pagination, awkward keys, multipart (API and the
 * parallel writer), resume without resending parts, retries on 503 and dropped connections,
 * permanent errors not retried, virtual-hosted addressing, HTTPS with a private CA, bucket
 * creation and configuration errors.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "lc/log.h"
#include "lc/store.h"
#include "lc/util.h"
#include "ts.h"
#include "ts_s3.h"

typedef struct fx {
    ts_s3 s3;
    lc_store *st;
    lc_metrics *m;
} fx;

static char *xfmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xfmt(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    assert_true(vasprintf(&s, fmt, ap) >= 0);
    va_end(ap);
    return s;
}

/* Deterministic pseudo-random bytes, fast to make. */
static void fill(void *buf, size_t len, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    unsigned char *p = buf;
    for (size_t i = 0; i < len; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(p + i, &x, len - i < 8 ? len - i : 8);
    }
}

static void clear_env(void)
{
    unsetenv("RADPIPE_S3_ADDRESSING");
    unsetenv("RADPIPE_S3_CA_FILE");
    unsetenv("RADPIPE_S3_CREATE_BUCKET");
    unsetenv("RADPIPE_S3_PART_SIZE");
    unsetenv("RADPIPE_S3_MULTIPART_THRESHOLD");
    unsetenv("RADPIPE_S3_CONCURRENCY");
    unsetenv("RADPIPE_S3_RETRIES");
    unsetenv("RADPIPE_S3_CHECKSUM");
}

static int setup_with(void **state, const char *extra)
{
    fx *f = calloc(1, sizeof(*f));
    clear_env();
    if (ts_s3_start(&f->s3, "bkt", extra) != 0)
        return -1;
    setenv("RADPIPE_S3_PART_SIZE", "5M", 1);
    setenv("RADPIPE_S3_MULTIPART_THRESHOLD", "5M", 1);
    setenv("RADPIPE_S3_CONCURRENCY", "3", 1);
    lc_err e = {0};
    if (lc_store_open("s3://bkt/pre/fix", &f->st, &e) != LC_OK) {
        fprintf(stderr, "open: %s\n", e.msg);
        return -1;
    }
    f->m = lc_metrics_new();
    lc_store_instrument(f->st, f->m, "radpipe_test", "bkt");
    *state = f;
    return 0;
}

static int setup(void **state)
{
    return setup_with(state, NULL);
}

static int setup_faulty(void **state)
{
    return setup_with(state, "--fail-every 3 --drop-every 4");
}

static int teardown(void **state)
{
    fx *f = *state;
    lc_store_free(f->st);
    lc_metrics_free(f->m);
    ts_s3_free(&f->s3);
    clear_env();
    free(f);
    return 0;
}

static char *aws_get(fx *f, const char *key, size_t *len)
{
    char *tmp = ts_tmpdir("s3get"),
         *args = xfmt("s3 cp --only-show-errors 's3://bkt/pre/fix/%s' '%s/out'", key, tmp);
    char *p = xfmt("%s/out", tmp);
    char *data = NULL;
    if (ts_s3_aws(&f->s3, args, NULL) == 0)
        data = ts_read_file(p, len);
    ts_rmrf(tmp);
    free(tmp);
    free(args);
    free(p);
    return data;
}

static int count_cb(void *ctx, const char *key, const lc_store_stat *st)
{
    (void)key;
    (void)st;
    (*(int *)ctx)++;
    return 0;
}

static int collect(void *ctx, const void *buf, size_t len)
{
    char **pp = ctx;
    memcpy(*pp, buf, len);
    *pp += len;
    return 0;
}

static void test_round_trip(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    char data[3000], hex[65];
    fill(data, sizeof(data), 1);
    lc_sha256_hex(data, sizeof(data), hex);
    assert_string_equal(lc_store_url(f->st), "s3://bkt/pre/fix");
    assert_int_equal(lc_store_put_buf(f->st, "a/b.bin", data, sizeof(data), &e), LC_OK);

    lc_store_stat st;
    assert_int_equal(lc_store_head(f->st, "a/b.bin", &st, &e), LC_OK);
    assert_int_equal(st.size, sizeof(data));
    assert_string_equal(st.digest, hex); /* the digest defaults to the SHA-256 */
    assert_true(st.mtime_ms > 0);

    void *buf = NULL;
    size_t len = 0;
    assert_int_equal(lc_store_get_buf(f->st, "a/b.bin", 1 << 20, &buf, &len, &e), LC_OK);
    assert_int_equal(len, sizeof(data));
    assert_memory_equal(buf, data, len);
    free(buf);
    assert_int_equal(lc_store_get_buf(f->st, "a/b.bin", 100, &buf, &len, &e), LC_ERR_TOO_LARGE);

    /* a range from the middle */
    char part[500], *p = part;
    assert_int_equal(lc_store_read(f->st, "a/b.bin", 1000, 500, collect, &p, &e), LC_OK);
    assert_int_equal(p - part, 500);
    assert_memory_equal(part, data + 1000, 500);

    /* to a file, and awscli reads the same bytes */
    char *tmp = ts_tmpdir("s3rt"), *dst = xfmt("%s/got", tmp);
    assert_int_equal(lc_store_get_file(f->st, "a/b.bin", dst, &e), LC_OK);
    size_t flen = 0;
    char *fdata = ts_read_file(dst, &flen);
    assert_int_equal(flen, sizeof(data));
    assert_memory_equal(fdata, data, flen);
    free(fdata);
    fdata = aws_get(f, "a/b.bin", &flen);
    assert_non_null(fdata);
    assert_int_equal(flen, sizeof(data));
    assert_memory_equal(fdata, data, flen);
    free(fdata);

    /* missing objects */
    assert_int_equal(lc_store_head(f->st, "a/none", &st, &e), LC_ERR_NOT_FOUND);
    assert_int_equal(lc_store_get_buf(f->st, "a/none", 100, &buf, &len, &e), LC_ERR_NOT_FOUND);
    char *missing = xfmt("%s/missing", tmp);
    assert_int_equal(lc_store_get_file(f->st, "a/none", missing, &e), LC_ERR_NOT_FOUND);
    assert_int_equal(access(missing, F_OK), -1);
    free(missing);

    /* local paths do not exist here: services use get_file / get_buf */
    char *lp = NULL;
    assert_int_equal(lc_store_local_path(f->st, "a/b.bin", &lp, &e), LC_ERR_UNSUPPORTED);

    assert_int_equal(lc_store_delete(f->st, "a/b.bin", &e), LC_OK);
    assert_int_equal(lc_store_head(f->st, "a/b.bin", &st, &e), LC_ERR_NOT_FOUND);
    assert_int_equal(lc_store_delete(f->st, "a/b.bin", &e), LC_OK);
    ts_rmrf(tmp);
    free(tmp);
    free(dst);
}

static void test_awkward_keys(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    const char *keys[] = {"sp ace/plus+sign", "pct%25/amp&eq=q?", "ünï/cödé-日本.dcm",
                          "tilde~/paren(1)*!'", NULL};
    for (int i = 0; keys[i]; i++) {
        char body[32];
        snprintf(body, sizeof(body), "object %d", i);
        assert_int_equal(lc_store_put_buf(f->st, keys[i], body, strlen(body), &e), LC_OK);
        void *buf = NULL;
        size_t len = 0;
        assert_int_equal(lc_store_get_buf(f->st, keys[i], 100, &buf, &len, &e), LC_OK);
        assert_int_equal(len, strlen(body));
        assert_memory_equal(buf, body, len);
        free(buf);
    }
    /* awscli lists them under the same names */
    char *out = NULL;
    assert_int_equal(ts_s3_aws(&f->s3, "s3 ls --recursive s3://bkt/pre/fix/", &out), 0);
    for (int i = 0; keys[i]; i++)
        assert_non_null(strstr(out, keys[i]));
    free(out);
    int n = 0;
    assert_int_equal(lc_store_list(f->st, "", count_cb, &n, &e), LC_OK);
    assert_int_equal(n, 4);
    n = 0;
    assert_int_equal(lc_store_list(f->st, "ünï/", count_cb, &n, &e), LC_OK);
    assert_int_equal(n, 1);
}

typedef struct seen {
    int n;
    int bad;
} seen;

static int seen_cb(void *ctx, const char *key, const lc_store_stat *st)
{
    seen *s = ctx;
    s->n++;
    if (strncmp(key, "many/", 5) != 0 || st->size != 3)
        s->bad++;
    return 0;
}

static void test_list_pagination(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    /* more than one page of 1000 */
    for (int i = 0; i < 1010; i++) {
        char k[32];
        snprintf(k, sizeof(k), "many/%04d", i);
        if (lc_store_put_buf(f->st, k, "abc", 3, &e) != LC_OK)
            fail_msg("put %s: %s", k, e.msg);
    }
    assert_int_equal(lc_store_put_buf(f->st, "other", "x", 1, &e), LC_OK);
    seen s = {0};
    if (lc_store_list(f->st, "many/", seen_cb, &s, &e) != LC_OK)
        fail_msg("list: %s", e.msg);
    assert_int_equal(s.n, 1010);
    assert_int_equal(s.bad, 0);
    int n = 0;
    assert_int_equal(lc_store_list(f->st, "", count_cb, &n, &e), LC_OK);
    assert_int_equal(n, 1011);
    /* the listing starts below the store's prefix only */
    char *out = NULL;
    assert_int_equal(ts_s3_aws(&f->s3, "s3 ls s3://bkt/pre/fix/", &out), 0);
    assert_non_null(strstr(out, "many/"));
    free(out);
}

typedef struct rec {
    lc_store_part parts[64];
    int n;
    char upload_id[256];
    int uploads;
    int stop_after; /* should_stop once this many parts are recorded (0: never) */
} rec;

static lc_rc rec_upload(void *ctx, const char *id, int64_t part_size, lc_err *err)
{
    rec *r = ctx;
    (void)err;
    assert_int_equal(part_size, 5 << 20);
    lc_strlcpy(r->upload_id, id, sizeof(r->upload_id));
    r->uploads++;
    return LC_OK;
}

static lc_rc rec_part(void *ctx, const char *id, const lc_store_part *p, lc_err *err)
{
    rec *r = ctx;
    (void)err;
    assert_string_equal(id, r->upload_id);
    assert_true(r->n < 64);
    r->parts[r->n++] = *p;
    return LC_OK;
}

static int rec_stop(void *ctx)
{
    rec *r = ctx;
    return r->stop_after && r->n >= r->stop_after;
}

static lc_rc write_all(lc_store_writer *w, const char *data, size_t len, lc_err *e)
{
    for (size_t off = 0; off < len;) {
        size_t n = len - off < 777777 ? len - off : 777777; /* chunks that do not align */
        lc_rc rc = lc_store_writer_write(w, data + off, n, e);
        if (rc != LC_OK)
            return rc;
        off += n;
    }
    return LC_OK;
}

static void test_writer_multipart(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    size_t len = (size_t)(22.5 * (1 << 20)); /* 5 parts of 5 MiB, the last smaller */
    char *data = malloc(len), hex[65];
    fill(data, len, 7);
    lc_sha256_hex(data, len, hex);
    rec r = {0};
    lc_store_writer_opts o = {
        .digest = hex, .size_hint = -1, .on_upload = rec_upload, .on_part = rec_part, .ctx = &r};
    lc_store_writer *w = NULL;
    assert_int_equal(lc_store_writer_open_opts(f->st, "big/obj", &o, &w, &e), LC_OK);
    assert_int_equal(write_all(w, data, len, &e), LC_OK);
    assert_int_equal(lc_store_writer_commit(w, &e), LC_OK);
    assert_int_equal(r.uploads, 1);
    assert_int_equal(r.n, 5);
    lc_store_stat st;
    assert_int_equal(lc_store_head(f->st, "big/obj", &st, &e), LC_OK);
    assert_int_equal(st.size, len);
    assert_string_equal(st.digest, hex);
    size_t glen = 0;
    char *got = aws_get(f, "big/obj", &glen);
    assert_non_null(got);
    assert_int_equal(glen, len);
    assert_memory_equal(got, data, len);
    free(got);
    assert_int_equal(ts_s3_log_count(&f->s3, (const char *const[]){"partNumber=", NULL}), 5);
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "bkt"), 0);

    /* below the threshold: one PUT, no multipart */
    rec r2 = {0};
    o = (lc_store_writer_opts){.size_hint = -1, .on_upload = rec_upload, .ctx = &r2};
    assert_int_equal(lc_store_writer_open_opts(f->st, "small/obj", &o, &w, &e), LC_OK);
    assert_int_equal(write_all(w, data, 4 << 20, &e), LC_OK);
    assert_int_equal(lc_store_writer_commit(w, &e), LC_OK);
    assert_int_equal(r2.uploads, 0);
    got = aws_get(f, "small/obj", &glen);
    assert_int_equal(glen, 4 << 20);
    assert_memory_equal(got, data, glen);
    free(got);

    /* an aborted writer leaves no object and no upload */
    assert_int_equal(lc_store_writer_open_opts(f->st, "aborted/obj", NULL, &w, &e), LC_OK);
    assert_int_equal(write_all(w, data, 12 << 20, &e), LC_OK);
    lc_store_writer_abort(w);
    assert_int_equal(lc_store_head(f->st, "aborted/obj", &st, &e), LC_ERR_NOT_FOUND);
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "bkt"), 0);
    free(data);
}

static void test_writer_resume(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    size_t len = 31 << 20; /* 7 parts */
    char *data = malloc(len);
    fill(data, len, 11);
    rec r = {.stop_after = 3};
    lc_store_writer_opts o = {.size_hint = (int64_t)len,
                              .on_upload = rec_upload,
                              .on_part = rec_part,
                              .should_stop = rec_stop,
                              .ctx = &r};
    lc_store_writer *w = NULL;
    assert_int_equal(lc_store_writer_open_opts(f->st, "resume/obj", &o, &w, &e), LC_OK);
    lc_rc rc = write_all(w, data, len, &e);
    if (rc == LC_OK)
        rc = lc_store_writer_commit(w, &e);
    else
        lc_store_writer_detach(w); /* as if the process stopped: the upload stays */
    assert_int_equal(rc, LC_ERR_CANCELLED);
    if (!(r.n >= 3 && r.n < 7) || ts_s3_incomplete_uploads(&f->s3, "bkt") != 1)
        fail_msg("stopped after %d parts, %d uploads open (%s)", r.n,
                 ts_s3_incomplete_uploads(&f->s3, "bkt"), e.msg);
    int before =
        ts_s3_log_count(&f->s3, (const char *const[]){"partNumber=", "\"status\":200", NULL});

    /* the store lists the same parts */
    lc_store_part *listed = NULL;
    size_t nlisted = 0;
    assert_int_equal(
        lc_store_mpu_list_parts(f->st, "resume/obj", r.upload_id, &listed, &nlisted, &e), LC_OK);
    assert_true((int)nlisted >= r.n);
    free(listed);

    /* resume: the acknowledged parts are hashed and skipped, the rest is sent */
    rec r2 = {0};
    lc_strlcpy(r2.upload_id, r.upload_id, sizeof(r2.upload_id));
    o = (lc_store_writer_opts){.size_hint = (int64_t)len,
                               .resume_upload_id = r.upload_id,
                               .done = r.parts,
                               .ndone = (size_t)r.n,
                               .on_upload = rec_upload,
                               .on_part = rec_part,
                               .ctx = &r2};
    assert_int_equal(lc_store_writer_open_opts(f->st, "resume/obj", &o, &w, &e), LC_OK);
    assert_int_equal(write_all(w, data, len, &e), LC_OK);
    assert_int_equal(lc_store_writer_commit(w, &e), LC_OK);
    assert_int_equal(r2.uploads, 0);
    assert_int_equal(r.n + r2.n, 7);
    int after =
        ts_s3_log_count(&f->s3, (const char *const[]){"partNumber=", "\"status\":200", NULL});
    assert_int_equal(after - before, 7 - r.n); /* nothing acknowledged was sent again */
    for (int i = 0; i < r.n; i++) {
        char q[64];
        snprintf(q, sizeof(q), "\"partNumber=%d&", r.parts[i].number);
        assert_int_equal(ts_s3_log_count(&f->s3, (const char *const[]){q, "\"status\":200", NULL}),
                         1);
    }
    size_t glen = 0;
    char *got = aws_get(f, "resume/obj", &glen);
    assert_int_equal(glen, len);
    assert_memory_equal(got, data, len);
    free(got);
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "bkt"), 0);

    /* resuming with different bytes is refused and the upload is aborted */
    r = (rec){.stop_after = 2};
    o = (lc_store_writer_opts){.size_hint = (int64_t)len,
                               .on_upload = rec_upload,
                               .on_part = rec_part,
                               .should_stop = rec_stop,
                               .ctx = &r};
    assert_int_equal(lc_store_writer_open_opts(f->st, "resume/two", &o, &w, &e), LC_OK);
    if (write_all(w, data, len, &e) == LC_OK)
        fail_msg("the writer did not stop");
    lc_store_writer_detach(w);
    data[10] ^= 1;
    o = (lc_store_writer_opts){.size_hint = (int64_t)len,
                               .resume_upload_id = r.upload_id,
                               .done = r.parts,
                               .ndone = (size_t)r.n};
    assert_int_equal(lc_store_writer_open_opts(f->st, "resume/two", &o, &w, &e), LC_OK);
    rc = write_all(w, data, len, &e);
    if (rc == LC_OK)
        rc = lc_store_writer_commit(w, &e);
    else
        lc_store_writer_abort(w);
    assert_int_equal(rc, LC_ERR_CONFLICT);
    assert_non_null(strstr(e.msg, "changed since the upload began"));
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "bkt"), 0);
    free(data);
}

typedef struct uploads {
    int n;
    char id[256];
} uploads;

static int upload_cb(void *ctx, const char *key, const char *id)
{
    uploads *u = ctx;
    if (strcmp(key, "mpu/obj") == 0)
        lc_strlcpy(u->id, id, sizeof(u->id));
    u->n++;
    return 0;
}

static void test_multipart_api(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    size_t len = 5 << 20;
    char *a = malloc(len), *b = malloc(1000), *id = NULL;
    fill(a, len, 3);
    fill(b, 1000, 4);
    assert_int_equal(lc_store_mpu_create(f->st, "mpu/obj", "digest-1", &id, &e), LC_OK);
    uploads u = {0};
    assert_int_equal(lc_store_mpu_list(f->st, "mpu/", upload_cb, &u, &e), LC_OK);
    assert_int_equal(u.n, 1);
    assert_string_equal(u.id, id);
    lc_store_part p[2];
    assert_int_equal(lc_store_mpu_put_part(f->st, "mpu/obj", id, 1, a, len, &p[0], &e), LC_OK);
    assert_int_equal(lc_store_mpu_put_part(f->st, "mpu/obj", id, 2, b, 1000, &p[1], &e), LC_OK);
    assert_int_equal(p[1].size, 1000);
    assert_true(strlen(p[0].etag) > 2);
    lc_store_part *l = NULL;
    size_t n = 0;
    assert_int_equal(lc_store_mpu_list_parts(f->st, "mpu/obj", id, &l, &n, &e), LC_OK);
    assert_int_equal(n, 2);
    assert_int_equal(l[1].number, 2);
    assert_int_equal(l[1].size, 1000);
    free(l);
    assert_int_equal(lc_store_mpu_complete(f->st, "mpu/obj", id, p, 2, &e), LC_OK);
    lc_store_stat st;
    assert_int_equal(lc_store_head(f->st, "mpu/obj", &st, &e), LC_OK);
    assert_int_equal(st.size, len + 1000);
    assert_string_equal(st.digest, "digest-1");
    free(id);

    /* abort removes the upload; a second abort is fine */
    assert_int_equal(lc_store_mpu_create(f->st, "mpu/gone", NULL, &id, &e), LC_OK);
    assert_int_equal(lc_store_mpu_put_part(f->st, "mpu/gone", id, 1, b, 1000, &p[0], &e), LC_OK);
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "bkt"), 1);
    assert_int_equal(lc_store_mpu_abort(f->st, "mpu/gone", id, &e), LC_OK);
    assert_int_equal(lc_store_mpu_abort(f->st, "mpu/gone", id, &e), LC_OK);
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "bkt"), 0);
    assert_int_equal(lc_store_mpu_list_parts(f->st, "mpu/gone", id, &l, &n, &e), LC_ERR_NOT_FOUND);
    free(id);

    /* file:// has no multipart uploads */
    char *tmp = ts_tmpdir("s3file"), *url = xfmt("file://%s", tmp);
    lc_store *fs = NULL;
    assert_int_equal(lc_store_open(url, &fs, &e), LC_OK);
    assert_int_equal(lc_store_mpu_create(fs, "x", NULL, &id, &e), LC_ERR_UNSUPPORTED);
    lc_store_free(fs);
    ts_rmrf(tmp);
    free(tmp);
    free(url);
    free(a);
    free(b);
}

static void test_permanent_errors_not_retried(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    lc_store *nob = NULL;
    assert_int_equal(lc_store_open("s3://no-such-bucket", &nob, &e), LC_OK);
    assert_int_equal(lc_store_put_buf(nob, "k", "x", 1, &e), LC_ERR_NOT_FOUND);
    assert_false(lc_rc_is_transient(e.rc));
    assert_non_null(strstr(e.msg, "NoSuchBucket"));
    assert_int_equal(ts_s3_log_count(&f->s3, (const char *const[]){"/no-such-bucket/k", NULL}), 1);
    lc_store_free(nob);
}

static void test_retries(void **state)
{
    fx *f = *state;
    lc_err e = {0};
    /* every third PUT/POST answers 503 SlowDown, every fourth part upload is cut off */
    for (int i = 0; i < 12; i++) {
        char k[16], body[16];
        snprintf(k, sizeof(k), "r/%d", i);
        snprintf(body, sizeof(body), "body %d", i);
        assert_int_equal(lc_store_put_buf(f->st, k, body, strlen(body), &e), LC_OK);
    }
    size_t len = 26 << 20;
    char *data = malloc(len), hex[65];
    fill(data, len, 5);
    lc_sha256_hex(data, len, hex);
    lc_store_writer *w = NULL;
    assert_int_equal(lc_store_writer_open_opts(f->st, "r/big", NULL, &w, &e), LC_OK);
    assert_int_equal(write_all(w, data, len, &e), LC_OK);
    assert_int_equal(lc_store_writer_commit(w, &e), LC_OK);
    assert_true(ts_s3_log_count(&f->s3, (const char *const[]){"slowdown", NULL}) >= 4);
    assert_true(ts_s3_log_count(&f->s3, (const char *const[]){"dropped", NULL}) >= 1);
    char *m = lc_metrics_render(f->m);
    assert_non_null(strstr(m, "radpipe_test_retries_total{store=\"bkt\"}"));
    assert_null(strstr(m, "radpipe_test_retries_total{store=\"bkt\"} 0\n"));
    assert_non_null(strstr(m, "radpipe_test_part_seconds_bucket"));
    free(m);
    size_t glen = 0;
    char *got = aws_get(f, "r/big", &glen);
    assert_int_equal(glen, len);
    char ghex[65];
    lc_sha256_hex(got, glen, ghex);
    assert_string_equal(ghex, hex);
    free(got);
    free(data);
    assert_int_equal(ts_s3_incomplete_uploads(&f->s3, "bkt"), 0);
}

static void test_virtual_hosted(void **state)
{
    (void)state;
    ts_s3 s3;
    lc_err e = {0};
    clear_env();
    /* s3rver maps <bucket>.s3.localhost to the bucket; curl resolves *.localhost locally */
    assert_int_equal(ts_s3_start(&s3, "vbucket", "--service-endpoint localhost"), 0);
    char *ep = xfmt("http://s3.localhost:%d", s3.port);
    setenv("RADPIPE_S3_ENDPOINT", ep, 1);
    setenv("RADPIPE_S3_ADDRESSING", "virtual", 1);
    lc_store *st = NULL;
    assert_int_equal(lc_store_open("s3://vbucket/p", &st, &e), LC_OK);
    assert_int_equal(lc_store_put_buf(st, "k/v", "hello", 5, &e), LC_OK);
    void *buf = NULL;
    size_t len = 0;
    assert_int_equal(lc_store_get_buf(st, "k/v", 100, &buf, &len, &e), LC_OK);
    assert_int_equal(len, 5);
    free(buf);
    /* the request went to the bucket's host name, not a path */
    char *log = ts_read_file(s3.log, NULL);
    assert_non_null(strstr(log, "\"path\":\"/p/k/v\""));
    free(log);
    char *out = NULL;
    assert_int_equal(ts_s3_aws(&s3, "s3 ls --recursive s3://vbucket/", &out), 0);
    assert_non_null(strstr(out, "p/k/v"));
    free(out);
    lc_store_free(st);
    ts_s3_free(&s3);
    free(ep);
    clear_env();
}

static void test_https_with_ca_and_create_bucket(void **state)
{
    (void)state;
    ts_s3 s3;
    lc_err e = {0};
    clear_env();
    char *tmp = ts_tmpdir("s3tls");
    char *cmd = xfmt("cd '%s' && openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "
                     "/CN=localhost -addext subjectAltName=DNS:localhost -keyout key.pem -out "
                     "cert.pem >/dev/null 2>&1",
                     tmp);
    assert_int_equal(ts_run(cmd, NULL), 0);
    char *extra = xfmt("--key '%s/key.pem' --cert '%s/cert.pem'", tmp, tmp);
    assert_int_equal(ts_s3_start(&s3, "", extra), 0);
    setenv("RADPIPE_S3_RETRIES", "2", 1);
    lc_store *st = NULL;
    /* without the CA the certificate is refused: a permanent error */
    setenv("RADPIPE_S3_CREATE_BUCKET", "true", 1);
    assert_int_not_equal(lc_store_open("s3://made-here", &st, &e), LC_OK);
    assert_null(st);
    char *ca = xfmt("%s/cert.pem", tmp);
    setenv("RADPIPE_S3_CA_FILE", ca, 1);
    assert_int_equal(lc_store_open("s3://made-here", &st, &e), LC_OK);
    assert_int_equal(lc_store_put_buf(st, "x", "tls", 3, &e), LC_OK);
    lc_store_free(st);
    /* opening again finds the bucket */
    assert_int_equal(lc_store_open("s3://made-here", &st, &e), LC_OK);
    lc_store_stat sst;
    assert_int_equal(lc_store_head(st, "x", &sst, &e), LC_OK);
    assert_int_equal(sst.size, 3);
    lc_store_free(st);
    char *out = NULL;
    assert_int_equal(ts_s3_aws(&s3, "s3 ls", &out), 0);
    assert_non_null(strstr(out, "made-here"));
    free(out);
    ts_s3_free(&s3);
    ts_rmrf(tmp);
    free(tmp);
    free(cmd);
    free(extra);
    free(ca);
    clear_env();
}

static void test_config_errors(void **state)
{
    (void)state;
    lc_err e = {0};
    lc_store *st = NULL;
    setenv("RADPIPE_S3_ENDPOINT", "http://127.0.0.1:1", 1);
    assert_int_equal(lc_store_open("s3://ab", &st, &e), LC_ERR_CONFIG); /* too short */
    assert_int_equal(lc_store_open("s3://Bad..name", &st, &e), LC_ERR_CONFIG);
    assert_int_equal(lc_store_open("s3://user:pw@bucket", &st, &e), LC_ERR_CONFIG);
    assert_null(strstr(e.msg, "pw")); /* credentials in URLs are never echoed */
    assert_int_equal(lc_store_open("s3://bucket/../x", &st, &e), LC_ERR_CONFIG);
    setenv("RADPIPE_S3_ENDPOINT", "ftp://host", 1);
    assert_int_equal(lc_store_open("s3://bucket", &st, &e), LC_ERR_CONFIG);
    setenv("RADPIPE_S3_ENDPOINT", "http://127.0.0.1:1", 1);
    setenv("RADPIPE_S3_PART_SIZE", "1M", 1);
    assert_int_equal(lc_store_open("s3://bucket", &st, &e), LC_ERR_CONFIG);
    unsetenv("RADPIPE_S3_PART_SIZE");
    char *ak = getenv("RADPIPE_S3_ACCESS_KEY") ? strdup(getenv("RADPIPE_S3_ACCESS_KEY")) : NULL;
    unsetenv("RADPIPE_S3_ACCESS_KEY");
    assert_int_equal(lc_store_open("s3://bucket", &st, &e), LC_ERR_CONFIG);
    assert_non_null(strstr(e.msg, "RADPIPE_S3_ACCESS_KEY"));
    if (ak)
        setenv("RADPIPE_S3_ACCESS_KEY", ak, 1);
    free(ak);
    /* an unreachable endpoint is transient (the job is retried later) */
    setenv("RADPIPE_S3_RETRIES", "2", 1);
    assert_int_equal(lc_store_open("s3://bucket", &st, &e), LC_OK);
    assert_int_equal(lc_store_put_buf(st, "k", "x", 1, &e), LC_ERR_UNAVAILABLE);
    assert_true(lc_rc_is_transient(e.rc));
    lc_store_free(st);
    clear_env();
}

int main(void)
{
    lc_log_init("test_store_s3", LC_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_awkward_keys, setup, teardown),
        cmocka_unit_test_setup_teardown(test_list_pagination, setup, teardown),
        cmocka_unit_test_setup_teardown(test_writer_multipart, setup, teardown),
        cmocka_unit_test_setup_teardown(test_writer_resume, setup, teardown),
        cmocka_unit_test_setup_teardown(test_multipart_api, setup, teardown),
        cmocka_unit_test_setup_teardown(test_permanent_errors_not_retried, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retries, setup_faulty, teardown),
        cmocka_unit_test(test_virtual_hosted),
        cmocka_unit_test(test_https_with_ca_and_create_bucket),
        cmocka_unit_test(test_config_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
