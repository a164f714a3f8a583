/*
 * util.c: UUIDs, SHA-256 over OpenSSL's EVP interface, clocks, timestamps, bounded copies,
 * whole-file reads and mkdir -p. Stateless and thread-safe.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <openssl/evp.h>
#include "lc/util.h"

lc_rc lc_random_bytes(void *buf, size_t len)
{
    unsigned char *p = buf;
    while (len > 0) {
        ssize_t n = getrandom(p, len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return LC_ERR_IO;
        }
        p += n;
        len -= (size_t)n;
    }
    return LC_OK;
}

void lc_uuid_v4(char out[LC_UUID_LEN + 1])
{
    unsigned char b[16];
    static const char hex[] = "0123456789abcdef";
    if (lc_random_bytes(b, sizeof(b)) != LC_OK) {
        /* getrandom cannot fail on Linux >= 3.17 once the pool is ready; fall back anyway */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        unsigned long long x =
            (unsigned long long)ts.tv_nsec ^ ((unsigned long long)getpid() << 32);
        for (int i = 0; i < 16; i++)
            b[i] = (unsigned char)(x >> ((i % 8) * 8)) ^ (unsigned char)(i * 73);
    }
    b[6] = (unsigned char)((b[6] & 0x0F) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3F) | 0x80);
    char *o = out;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *o++ = '-';
        *o++ = hex[b[i] >> 4];
        *o++ = hex[b[i] & 15];
    }
    *o = '\0';
}

int lc_uuid_valid(const char *s)
{
    if (!s || strlen(s) != LC_UUID_LEN)
        return 0;
    for (int i = 0; i < LC_UUID_LEN; i++) {
        char c = s[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-')
                return 0;
        } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
            return 0;
        }
    }
    return 1;
}

struct lc_sha256 {
    EVP_MD_CTX *ctx;
};

lc_sha256 *lc_sha256_new(void)
{
    lc_sha256 *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->ctx = EVP_MD_CTX_new();
    if (!h->ctx || EVP_DigestInit_ex(h->ctx, EVP_sha256(), NULL) != 1) {
        lc_sha256_free(h);
        return NULL;
    }
    return h;
}

void lc_sha256_update(lc_sha256 *h, const void *buf, size_t len)
{
    if (h && len)
        EVP_DigestUpdate(h->ctx, buf, len);
}

void lc_sha256_final_hex(lc_sha256 *h, char out[65])
{
    static const char hex[] = "0123456789abcdef";
    unsigned char md[32];
    unsigned int mdlen = 0;
    if (!h || EVP_DigestFinal_ex(h->ctx, md, &mdlen) != 1 || mdlen != 32) {
        out[0] = '\0';
        return;
    }
    for (int i = 0; i < 32; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[64] = '\0';
}

void lc_sha256_free(lc_sha256 *h)
{
    if (!h)
        return;
    EVP_MD_CTX_free(h->ctx);
    free(h);
}

void lc_sha256_hex(const void *buf, size_t len, char out[65])
{
    lc_sha256 *h = lc_sha256_new();
    lc_sha256_update(h, buf, len);
    lc_sha256_final_hex(h, out);
    lc_sha256_free(h);
}

lc_rc lc_sha256_file_hex(const char *path, char out[65], long long *size_out, lc_err *err)
{
    lc_rc rc = LC_OK;
    unsigned char *buf = NULL;
    lc_sha256 *h = NULL;
    long long total = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return lc_err_set(err, errno == ENOENT ? LC_ERR_NOT_FOUND : LC_ERR_IO,
                          "could not open \"%s\": %s", path, strerror(errno));
    buf = malloc(1 << 20);
    h = lc_sha256_new();
    if (!buf || !h) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory hashing \"%s\"", path);
        goto out;
    }
    for (;;) {
        ssize_t n = read(fd, buf, 1 << 20);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = lc_err_set(err, LC_ERR_IO, "could not read \"%s\": %s", path, strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        lc_sha256_update(h, buf, (size_t)n);
        total += n;
    }
    lc_sha256_final_hex(h, out);
    if (size_out)
        *size_out = total;
out:
    lc_sha256_free(h);
    free(buf);
    close(fd);
    return rc;
}

int lc_ct_equal(const void *a, const void *b, size_t len)
{
    const volatile unsigned char *x = a, *y = b;
    unsigned char d = 0;
    for (size_t i = 0; i < len; i++)
        d |= (unsigned char)(x[i] ^ y[i]);
    return d == 0;
}

int64_t lc_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t lc_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void lc_time_rfc3339(int64_t wall_ms, char out[32])
{
    time_t t = (time_t)(wall_ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    snprintf(out, 32, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(wall_ms % 1000));
}

int lc_sleep_ms(int ms, const atomic_int *stop)
{
    int64_t end = lc_now_ms() + ms;
    for (;;) {
        if (stop && atomic_load(stop))
            return 1;
        int64_t left = end - lc_now_ms();
        if (left <= 0)
            return 0;
        int step = left > 50 ? 50 : (int)left;
        struct timespec ts = {step / 1000, (long)(step % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
}

size_t lc_strlcpy(char *dst, const char *src, size_t cap)
{
    size_t n = strlen(src);
    if (cap) {
        size_t k = n < cap - 1 ? n : cap - 1;
        memcpy(dst, src, k);
        dst[k] = '\0';
    }
    return n;
}

lc_rc lc_read_file(const char *path, size_t max, char **out, size_t *len, lc_err *err)
{
    lc_rc rc = LC_OK;
    char *buf = NULL;
    size_t n = 0, cap = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return lc_err_set(err, errno == ENOENT ? LC_ERR_NOT_FOUND : LC_ERR_IO,
                          "could not open \"%s\": %s", path, strerror(errno));
    for (;;) {
        if (n + 4096 + 1 > cap) {
            size_t ncap = cap ? cap * 2 : 8192;
            char *nb = realloc(buf, ncap);
            if (!nb) {
                rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory reading \"%s\"", path);
                goto out;
            }
            buf = nb;
            cap = ncap;
        }
        ssize_t r = read(fd, buf + n, cap - n - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rc = lc_err_set(err, LC_ERR_IO, "could not read \"%s\": %s", path, strerror(errno));
            goto out;
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if (n > max) {
            rc = lc_err_set(err, LC_ERR_TOO_LARGE, "file \"%s\" is larger than %zu bytes", path,
                            max);
            goto out;
        }
    }
    buf[n] = '\0';
    *out = buf;
    buf = NULL;
    if (len)
        *len = n;
out:
    free(buf);
    close(fd);
    return rc;
}

lc_rc lc_mkdirs(const char *path, unsigned mode, lc_err *err)
{
    char tmp[4096];
    if (lc_strlcpy(tmp, path, sizeof(tmp)) >= sizeof(tmp))
        return lc_err_set(err, LC_ERR_INVALID, "path too long: \"%.64s...\"", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(tmp, mode) != 0 && errno != EEXIST)
            return lc_err_set(err, LC_ERR_IO, "could not create directory \"%s\": %s", tmp,
                              strerror(errno));
        *p = '/';
    }
    if (mkdir(tmp, mode) != 0 && errno != EEXIST)
        return lc_err_set(err, LC_ERR_IO, "could not create directory \"%s\": %s", tmp,
                          strerror(errno));
    return LC_OK;
}

const char *lc_file_url_path(const char *url)
{
    if (!url || strncmp(url, "file://", 7) != 0)
        return NULL;
    return url + 7;
}
