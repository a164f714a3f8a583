/*
 * upl_pattern.c: destination patterns in the BIDS-flux syntax. "{Keyword}" is the value of a
 * DICOM keyword, "{KeywordPath[n]}" its n-th component (0-based, negative from the end) when
 * split on '^' and '/', "{Keyword:-default}" gives a default for a missing value, "{{" and
 * "}}" are literal braces. Values are sanitised to S3-safe key characters; the bucket of an
 * s3:// result is normalised to S3's bucket rules (see README.md for both rule sets).
 * Pure functions over caller-owned strings: thread-safe.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lc/store.h"
#include "lc/util.h"
#include "upl.h"

#define VALUE_MAX   64   /* bytes of one sanitised value */
#define PATTERN_MAX 1024 /* bytes of an expanded pattern */

/* ASCII spellings of U+00C0..U+00FF (Latin-1 letters); "" = no letter (× ÷). */
static const char *const latin1[64] = {
    "A", "A", "A", "A", "A", "A", "AE", "C", "E", "E", "E", "E", "I", "I", "I",  "I",
    "D", "N", "O", "O", "O", "O", "O",  "",  "O", "U", "U", "U", "U", "Y", "TH", "ss",
    "a", "a", "a", "a", "a", "a", "ae", "c", "e", "e", "e", "e", "i", "i", "i",  "i",
    "d", "n", "o", "o", "o", "o", "o",  "",  "o", "u", "u", "u", "u", "y", "th", "y",
};

/* Decode one UTF-8 sequence at s (n bytes left): the code point, or -1 for a bad sequence;
 * *len gets the bytes consumed (at least 1). */
static long utf8_next(const unsigned char *s, size_t n, size_t *len)
{
    *len = 1;
    if (s[0] < 0x80)
        return s[0];
    int extra = (s[0] & 0xE0) == 0xC0   ? 1
                : (s[0] & 0xF0) == 0xE0 ? 2
                : (s[0] & 0xF8) == 0xF0 ? 3
                                        : -1;
    if (extra < 0 || (size_t)extra >= n)
        return -1;
    long cp = s[0] & (0x3F >> extra);
    for (int i = 1; i <= extra; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return -1;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    *len = (size_t)extra + 1;
    return cp;
}

void upl_sanitize_value(const char *in, char *out, size_t cap)
{
    size_t o = 0, n = strlen(in);
    const unsigned char *s = (const unsigned char *)in;
    if (cap == 0)
        return;
    size_t max = cap - 1 < VALUE_MAX ? cap - 1 : VALUE_MAX;
    for (size_t i = 0; i < n && o < max;) {
        size_t len;
        long cp = utf8_next(s + i, n - i, &len);
        i += len;
        const char *rep = NULL;
        char one[2] = {0, 0};
        if (cp >= 0xC0 && cp <= 0xFF && latin1[cp - 0xC0][0])
            rep = latin1[cp - 0xC0];
        else if (cp >= 0 && cp < 0x80 && (isalnum((int)cp) || cp == '.' || cp == '-' || cp == '_'))
            rep = (one[0] = (char)cp, one);
        else
            rep = "_";
        for (; *rep && o < max; rep++) {
            if (*rep == '_' && o > 0 && out[o - 1] == '_')
                continue; /* runs of replaced characters collapse */
            out[o++] = *rep;
        }
    }
    out[o] = '\0';
    /* no leading or trailing '_' or '.', so no "." or ".." component and no hidden names */
    size_t start = 0;
    while (out[start] == '_' || out[start] == '.')
        start++;
    while (o > start && (out[o - 1] == '_' || out[o - 1] == '.'))
        o--;
    memmove(out, out + start, o - start);
    out[o - start] = '\0';
}

static int ipv4_like(const char *b)
{
    int dots = 0;
    for (const char *p = b; *p; p++) {
        if (*p == '.')
            dots++;
        else if (!isdigit((unsigned char)*p))
            return 0;
    }
    return dots == 3;
}

void upl_sanitize_bucket(const char *in, char *out, size_t cap)
{
    char tmp[256];
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)in; *p && o < sizeof(tmp) - 1; p++) {
        char c = (char)tolower(*p);
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-'))
            c = '-';
        if (o > 0) {
            char prev = tmp[o - 1];
            if (c == '.' && prev == '.')
                continue; /* no ".." */
            if ((c == '.' && prev == '-') || (c == '-' && prev == '.')) {
                tmp[o - 1] = '-'; /* no ".-" or "-." */
                continue;
            }
        }
        tmp[o++] = c;
    }
    tmp[o] = '\0';
    /* letters or digits at both ends, 3..63 characters */
    size_t start = 0;
    while (tmp[start] && !isalnum((unsigned char)tmp[start]))
        start++;
    size_t len = strlen(tmp + start);
    if (len > 63)
        len = 63;
    while (len && !isalnum((unsigned char)tmp[start + len - 1]))
        len--;
    char b[80];
    memcpy(b, tmp + start, len);
    b[len] = '\0';
    while (strlen(b) < 3)
        strcat(b, "0");
    if (ipv4_like(b)) {
        char t[80];
        snprintf(t, sizeof(t), "b-%s", b);
        snprintf(b, sizeof(b), "%.63s", t);
    }
    lc_strlcpy(out, b, cap);
}

/* One "{...}" term: keyword, optional path index, optional default. */
typedef struct term {
    char keyword[80];
    int has_index;
    long index;
    int has_default;
    char def[VALUE_MAX * 2];
} term;

static lc_rc parse_term(const char *body, size_t len, term *t, lc_err *err)
{
    memset(t, 0, sizeof(*t));
    const char *end = body + len;
    const char *dflt = NULL;
    for (const char *p = body; p + 1 < end; p++)
        if (p[0] == ':' && p[1] == '-') {
            dflt = p;
            break;
        }
    const char *kend = dflt ? dflt : end;
    if (dflt) {
        size_t dl = (size_t)(end - dflt - 2);
        if (dl >= sizeof(t->def))
            return lc_err_set(err, LC_ERR_INVALID, "default value in pattern is too long");
        memcpy(t->def, dflt + 2, dl);
        t->def[dl] = '\0';
        t->has_default = 1;
    }
    const char *br = memchr(body, '[', (size_t)(kend - body));
    const char *nend = br ? br : kend;
    if (br) {
        char num[24], *e = NULL;
        size_t nl = (size_t)(kend - br - 2);
        if (kend[-1] != ']' || nl == 0 || nl >= sizeof(num))
            return lc_err_set(err, LC_ERR_INVALID, "bad index in pattern term \"{%.*s}\"", (int)len,
                              body);
        memcpy(num, br + 1, nl);
        num[nl] = '\0';
        t->index = strtol(num, &e, 10);
        if (*e)
            return lc_err_set(err, LC_ERR_INVALID, "bad index in pattern term \"{%.*s}\"", (int)len,
                              body);
        if (nend - body < 5 || strncmp(nend - 4, "Path", 4) != 0)
            return lc_err_set(err, LC_ERR_INVALID,
                              "an index needs the Path form, \"{KeywordPath[n]}\", not \"{%.*s}\"",
                              (int)len, body);
        nend -= 4;
        t->has_index = 1;
    }
    size_t kl = (size_t)(nend - body);
    if (kl == 0 || kl >= sizeof(t->keyword))
        return lc_err_set(err, LC_ERR_INVALID, "empty or overlong keyword in pattern");
    for (size_t i = 0; i < kl; i++)
        if (!isalnum((unsigned char)body[i]))
            return lc_err_set(err, LC_ERR_INVALID, "invalid keyword \"%.*s\" in pattern", (int)kl,
                              body);
    memcpy(t->keyword, body, kl);
    t->keyword[kl] = '\0';
    return LC_OK;
}

/* The index-th component of v split on '^' and '/' (negative counts from the end). */
static char *path_component(const char *v, long index)
{
    long n = 1;
    for (const char *p = v; *p; p++)
        n += *p == '^' || *p == '/';
    if (index < 0)
        index += n;
    if (index < 0 || index >= n)
        return NULL;
    const char *start = v;
    for (long i = 0; i < index; i++)
        start += strcspn(start, "^/") + 1;
    size_t len = strcspn(start, "^/");
    return len ? strndup(start, len) : NULL;
}

typedef struct sbuf {
    char buf[PATTERN_MAX + 1];
    size_t len;
    int over;
} sbuf;

static void put(sbuf *b, const char *s, size_t n)
{
    if (b->len + n > PATTERN_MAX) {
        b->over = 1;
        return;
    }
    memcpy(b->buf + b->len, s, n);
    b->len += n;
    b->buf[b->len] = '\0';
}

lc_rc upl_pattern_expand(const char *pattern, upl_lookup_fn fn, void *ctx, const char *missing,
                         char **out, lc_err *err)
{
    sbuf b = {.len = 0};
    *out = NULL;
    b.buf[0] = '\0';
    for (const char *p = pattern; *p;) {
        if ((p[0] == '{' && p[1] == '{') || (p[0] == '}' && p[1] == '}')) {
            put(&b, p, 1);
            p += 2;
            continue;
        }
        if (*p == '}')
            return lc_err_set(err, LC_ERR_INVALID, "unbalanced \"}\" in pattern \"%s\"", pattern);
        if (*p != '{') {
            size_t n = strcspn(p, "{}");
            put(&b, p, n);
            p += n;
            continue;
        }
        const char *close = strchr(p + 1, '}');
        if (!close)
            return lc_err_set(err, LC_ERR_INVALID, "unterminated \"{\" in pattern \"%s\"", pattern);
        term t;
        lc_rc rc = parse_term(p + 1, (size_t)(close - p - 1), &t, err);
        if (rc != LC_OK)
            return rc;
        char *v = NULL;
        if (fn && (rc = fn(ctx, t.keyword, &v, err)) != LC_OK)
            return rc;
        if (v && t.has_index) {
            char *c = path_component(v, t.index);
            free(v);
            v = c;
        }
        char clean[VALUE_MAX + 1] = "";
        if (v)
            upl_sanitize_value(v, clean, sizeof(clean));
        free(v);
        if (!clean[0])
            upl_sanitize_value(t.has_default ? t.def : (missing ? missing : ""), clean,
                               sizeof(clean));
        if (!clean[0])
            lc_strlcpy(clean, "unknown", sizeof(clean));
        put(&b, clean, strlen(clean));
        p = close + 1;
    }
    if (b.over)
        return lc_err_set(err, LC_ERR_INVALID, "pattern \"%s\" expands to more than %d bytes",
                          pattern, PATTERN_MAX);
    if (!(*out = strdup(b.buf)))
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory expanding a pattern");
    return LC_OK;
}

lc_rc upl_pattern_check(const char *pattern, upl_lookup_fn known, void *ctx, lc_err *err)
{
    char *out = NULL;
    lc_rc rc = upl_pattern_expand(pattern, known, ctx, NULL, &out, err);
    free(out);
    return rc;
}

/* Trim slashes at both ends and collapse repeated ones. */
static void tidy_prefix(char *s)
{
    size_t o = 0;
    for (size_t i = 0; s[i]; i++) {
        if (s[i] == '/' && (o == 0 || s[o - 1] == '/'))
            continue;
        s[o++] = s[i];
    }
    while (o && s[o - 1] == '/')
        o--;
    s[o] = '\0';
}

lc_rc upl_pattern_split(const char *expanded, const char *archive_url, char **store_url,
                        char **prefix, lc_err *err)
{
    *store_url = *prefix = NULL;
    char *pre = NULL;
    if (strncmp(expanded, "s3://", 5) == 0) {
        const char *b = expanded + 5;
        size_t bl = strcspn(b, "/");
        char raw[256], bucket[80];
        if (bl == 0 || bl >= sizeof(raw))
            return lc_err_set(err, LC_ERR_INVALID, "destination \"%s\" has no bucket", expanded);
        memcpy(raw, b, bl);
        raw[bl] = '\0';
        upl_sanitize_bucket(raw, bucket, sizeof(bucket));
        if (asprintf(store_url, "s3://%s", bucket) < 0)
            *store_url = NULL;
        pre = strdup(b[bl] ? b + bl + 1 : "");
    } else if (strncmp(expanded, "file://", 7) == 0) {
        *store_url = strdup(expanded);
        pre = strdup("");
    } else if (strstr(expanded, "://")) {
        return lc_err_set(err, LC_ERR_INVALID, "destination \"%s\" is neither s3:// nor file://",
                          expanded);
    } else {
        *store_url = strdup(archive_url);
        pre = strdup(expanded);
    }
    if (!*store_url || !pre) {
        free(*store_url);
        free(pre);
        *store_url = NULL;
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    tidy_prefix(pre);
    if (*pre && !lc_store_key_valid(pre)) {
        free(*store_url);
        *store_url = NULL;
        lc_rc rc = lc_err_set(err, LC_ERR_INVALID,
                              "destination \"%s\" is not a valid key prefix (\".\" or \"..\" "
                              "components, control characters or backslashes)",
                              expanded);
        free(pre);
        return rc;
    }
    *prefix = pre;
    return LC_OK;
}
