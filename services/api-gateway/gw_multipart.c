/*
 * gw_multipart.c: the streaming multipart parser of gw_multipart.h. Bytes go through a fixed
 * window, except inside a part's body: there they are handed out straight from the caller's
 * buffer (no copy) up to the next delimiter ("\r\n--" boundary), and at most delimiter-length
 * - 1 bytes are kept back in the window, so memory stays constant whatever the part sizes.
 * Strict: header folding, unknown transfer encodings, delimiters followed by anything but
 * "--" or padding + CRLF, and bodies that end before the closing delimiter are errors. One
 * parser per thread; no global state.
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include "gw_multipart.h"

#define WINDOW      (256 * 1024)
#define MAX_HEADERS 32
/* Outside a part's body the window takes input in steps of at most this many bytes, so that
 * the bytes of the body that follows reach the direct path instead of being copied. */
#define WINDOW_STEP (8 * 1024)

typedef enum mp_state {
    MP_PREAMBLE, /* before the first delimiter */
    MP_DELIM,    /* right after a delimiter: "--" (close) or padding CRLF (next part) */
    MP_HEADERS,  /* a part's header block */
    MP_BODY,     /* a part's body */
    MP_EPILOGUE, /* after the closing delimiter: discarded */
    MP_ERROR,
} mp_state;

struct gw_mp {
    gw_mp_limits lim;
    gw_mp_callbacks cb;
    void *ctx;
    char delim[GW_MP_BOUNDARY_MAX + 5]; /* "\r\n--" boundary */
    size_t dlen;
    mp_state state;
    lc_rc error_rc;
    char error_msg[256];
    size_t preamble; /* bytes of preamble dropped so far */
    int nparts;
    gw_mp_part part;
    long long part_bytes;
    size_t fill;
    char buf[WINDOW];
};

/* --- Content-Type ------------------------------------------------------------------------ */

static int tchar(int c)
{
    return isalnum(c) || (c && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static const char *skip_ws(const char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    return s;
}

/* A token into out (lower-cased when lower); returns the position after it or NULL. */
static const char *token(const char *s, char *out, size_t cap, int lower)
{
    size_t n = 0;
    while (tchar((unsigned char)*s) || (*s == '/' && lower == 2)) {
        if (n + 1 >= cap)
            return NULL;
        out[n++] = lower ? (char)tolower((unsigned char)*s) : *s;
        s++;
    }
    out[n] = '\0';
    return n ? s : NULL;
}

/* A token or quoted-string parameter value. */
static const char *param_value(const char *s, char *out, size_t cap)
{
    size_t n = 0;
    if (*s != '"')
        return token(s, out, cap, 0);
    for (s++; *s && *s != '"'; s++) {
        if (*s == '\\') {
            s++;
            if (!*s)
                return NULL;
        }
        if ((unsigned char)*s < 0x20 && *s != '\t')
            return NULL;
        if (n + 1 >= cap)
            return NULL;
        out[n++] = *s;
    }
    if (*s != '"')
        return NULL;
    out[n] = '\0';
    return s + 1;
}

lc_rc gw_mp_parse_ctype(const char *v, gw_mp_ctype *out, lc_err *err)
{
    char name[64], val[512];
    memset(out, 0, sizeof(*out));
    out->q = 1000;
    if (!v)
        return lc_err_set(err, LC_ERR_INVALID, "no Content-Type");
    const char *s = skip_ws(v);
    if (!(s = token(s, out->media, sizeof(out->media), 2)) || !strchr(out->media, '/'))
        return lc_err_set(err, LC_ERR_INVALID, "malformed media type in Content-Type");
    for (;;) {
        s = skip_ws(s);
        if (!*s)
            break;
        if (*s != ';')
            return lc_err_set(err, LC_ERR_INVALID, "malformed Content-Type parameters");
        s = skip_ws(s + 1);
        if (!*s)
            break; /* a trailing ";" */
        if (!(s = token(s, name, sizeof(name), 1)) || *s != '=')
            return lc_err_set(err, LC_ERR_INVALID, "malformed Content-Type parameter");
        if (!(s = param_value(s + 1, val, sizeof(val))))
            return lc_err_set(err, LC_ERR_INVALID,
                              "malformed value of Content-Type parameter "
                              "\"%s\"",
                              name);
        char *dst = NULL;
        size_t cap = 0;
        if (strcmp(name, "q") == 0) {
            /* qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ) */
            int q = 0, scale = 1000;
            const char *d = val;
            if ((*d != '0' && *d != '1') || (d[1] && d[1] != '.') || strlen(d) > 5)
                return lc_err_set(err, LC_ERR_INVALID, "malformed q parameter");
            q = (*d - '0') * 1000;
            for (d += d[1] ? 2 : 1; *d; d++) {
                if (*d < '0' || *d > '9')
                    return lc_err_set(err, LC_ERR_INVALID, "malformed q parameter");
                scale /= 10;
                q += (*d - '0') * scale;
            }
            if (q > 1000)
                return lc_err_set(err, LC_ERR_INVALID, "malformed q parameter");
            out->q = q;
            continue;
        }
        if (strcmp(name, "type") == 0) {
            dst = out->type;
            cap = sizeof(out->type);
        } else if (strcmp(name, "boundary") == 0) {
            dst = out->boundary;
            cap = sizeof(out->boundary);
        } else if (strcmp(name, "transfer-syntax") == 0) {
            dst = out->ts;
            cap = sizeof(out->ts);
        }
        if (dst) {
            if (strlen(val) >= cap)
                return lc_err_set(err, LC_ERR_INVALID, "Content-Type parameter \"%s\" is too long",
                                  name);
            memcpy(dst, val, strlen(val) + 1);
        }
    }
    for (char *p = out->type; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    return LC_OK;
}

/* RFC 2046 bchars; a space may not end the boundary. */
static int boundary_ok(const char *b)
{
    size_t n = strlen(b);
    if (n < 1 || n > GW_MP_BOUNDARY_MAX || b[n - 1] == ' ')
        return 0;
    for (const char *p = b; *p; p++)
        if (!isalnum((unsigned char)*p) && !strchr("'()+_,-./:=? ", *p))
            return 0;
    return 1;
}

/* --- parser ------------------------------------------------------------------------------ */

lc_rc gw_mp_new(const char *boundary, const gw_mp_limits *lim, const gw_mp_callbacks *cb, void *ctx,
                gw_mp **out, lc_err *err)
{
    *out = NULL;
    if (!boundary || !boundary_ok(boundary))
        return lc_err_set(err, LC_ERR_INVALID,
                          "invalid multipart boundary: 1 to 70 characters of letters, digits "
                          "and '()+_,-./:=? are allowed");
    gw_mp *p = calloc(1, sizeof(*p));
    if (!p)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    p->lim = *lim;
    p->cb = *cb;
    p->ctx = ctx;
    p->dlen = (size_t)snprintf(p->delim, sizeof(p->delim), "\r\n--%s", boundary);
    p->state = MP_PREAMBLE;
    *out = p;
    return LC_OK;
}

void gw_mp_free(gw_mp *p)
{
    free(p);
}

int gw_mp_parts(const gw_mp *p)
{
    return p->nparts;
}

static lc_rc fail(gw_mp *p, lc_err *err, lc_rc rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static lc_rc fail(gw_mp *p, lc_err *err, lc_rc rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->error_msg, sizeof(p->error_msg), fmt, ap);
    va_end(ap);
    p->state = MP_ERROR;
    p->error_rc = rc;
    return lc_err_set(err, rc, "%s", p->error_msg);
}

/* A callback failed: remember its message so later calls repeat it. */
static lc_rc cb_failed(gw_mp *p, lc_rc rc, lc_err *err)
{
    p->state = MP_ERROR;
    p->error_rc = rc;
    snprintf(p->error_msg, sizeof(p->error_msg), "%s", lc_err_msg(err));
    return rc;
}

static void consume(gw_mp *p, size_t n)
{
    memmove(p->buf, p->buf + n, p->fill - n);
    p->fill -= n;
}

/* Parse one part's header block (len bytes, CRLF-separated lines, without the final empty
 * line) into p->part. */
static lc_rc parse_headers(gw_mp *p, const char *h, size_t len, lc_err *err)
{
    gw_mp_part *pt = &p->part;
    int nh = 0;
    const char *end = h + len;
    memset(pt, 0, sizeof(*pt));
    pt->index = p->nparts;
    pt->content_length = -1;
    while (h < end) {
        const char *eol = memchr(h, '\r', (size_t)(end - h));
        size_t ll = eol ? (size_t)(eol - h) : (size_t)(end - h);
        if (eol && (eol + 1 >= end || eol[1] != '\n'))
            return fail(p, err, LC_ERR_INVALID, "part %d: header lines must end with CRLF",
                        p->nparts + 1);
        if (++nh > MAX_HEADERS)
            return fail(p, err, LC_ERR_TOO_LARGE, "part %d has more than %d headers", p->nparts + 1,
                        MAX_HEADERS);
        if (ll == 0 || h[0] == ' ' || h[0] == '\t')
            return fail(p, err, LC_ERR_INVALID, "part %d: empty or folded header line",
                        p->nparts + 1);
        const char *colon = memchr(h, ':', ll);
        if (!colon || colon == h)
            return fail(p, err, LC_ERR_INVALID, "part %d: header line without a name",
                        p->nparts + 1);
        for (const char *c = h; c < colon; c++)
            if (!tchar((unsigned char)*c))
                return fail(p, err, LC_ERR_INVALID, "part %d: invalid header name", p->nparts + 1);
        size_t nl = (size_t)(colon - h);
        const char *v = colon + 1, *ve = h + ll;
        while (v < ve && (*v == ' ' || *v == '\t'))
            v++;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
            ve--;
        size_t vl = (size_t)(ve - v);
        for (const char *c = v; c < ve; c++)
            if ((unsigned char)*c < 0x20 && *c != '\t')
                return fail(p, err, LC_ERR_INVALID, "part %d: control character in a header",
                            p->nparts + 1);
#define IS(name) (nl == sizeof(name) - 1 && strncasecmp(h, name, nl) == 0)
        if (IS("Content-Type")) {
            if (vl >= sizeof(pt->content_type))
                return fail(p, err, LC_ERR_INVALID, "part %d: Content-Type too long",
                            p->nparts + 1);
            memcpy(pt->content_type, v, vl);
            pt->content_type[vl] = '\0';
        } else if (IS("Content-Location")) {
            if (vl >= sizeof(pt->content_location))
                return fail(p, err, LC_ERR_INVALID, "part %d: Content-Location too long",
                            p->nparts + 1);
            memcpy(pt->content_location, v, vl);
            pt->content_location[vl] = '\0';
        } else if (IS("Content-Length")) {
            long long n = 0;
            if (vl == 0 || vl > 18 || pt->content_length >= 0)
                return fail(p, err, LC_ERR_INVALID, "part %d: invalid Content-Length",
                            p->nparts + 1);
            for (size_t i = 0; i < vl; i++) {
                if (v[i] < '0' || v[i] > '9')
                    return fail(p, err, LC_ERR_INVALID, "part %d: invalid Content-Length",
                                p->nparts + 1);
                n = n * 10 + (v[i] - '0');
            }
            if (n > p->lim.max_part_bytes)
                return fail(p, err, LC_ERR_TOO_LARGE,
                            "part %d claims %lld bytes, over the limit of %lld", p->nparts + 1, n,
                            p->lim.max_part_bytes);
            pt->content_length = n;
        } else if (IS("Content-Transfer-Encoding")) {
            if (!((vl == 6 && strncasecmp(v, "binary", 6) == 0) ||
                  (vl == 4 && strncasecmp(v, "8bit", 4) == 0) ||
                  (vl == 4 && strncasecmp(v, "7bit", 4) == 0)))
                return fail(p, err, LC_ERR_INVALID,
                            "part %d: Content-Transfer-Encoding %.*s is not supported (binary "
                            "only)",
                            p->nparts + 1, (int)(vl > 32 ? 32 : vl), v);
        }
#undef IS
        h += ll + (eol ? 2 : 0);
    }
    return LC_OK;
}

/* The first delimiter in [h, h + n) or NULL. Every delimiter starts with CR, which binary
 * data holds about once in 256 bytes: memchr from CR to CR is several times faster there
 * than memmem. Where CRs come densely (text, or a body made of them) memmem takes over, so
 * the worst case stays linear. */
static const char *find_delim(const gw_mp *p, const char *h, size_t n)
{
    const char *const start = h, *const end = h + n;
    size_t hits = 0;
    while ((size_t)(end - h) >= p->dlen) {
        if (++hits > 16 && (size_t)(h - start) < hits * 64)
            return memmem(h, (size_t)(end - h), p->delim, p->dlen);
        const char *cr = memchr(h, '\r', (size_t)(end - h) - p->dlen + 1);
        if (!cr)
            return NULL;
        if (memcmp(cr, p->delim, p->dlen) == 0)
            return cr;
        h = cr + 1;
    }
    return NULL;
}

/* Hand out n body bytes at data (the window or the caller's buffer), checking them against
 * the part's declared and maximum size. */
static lc_rc body_emit(gw_mp *p, const char *data, size_t n, lc_err *err)
{
    if (n == 0)
        return LC_OK;
    p->part_bytes += (long long)n;
    /* the declared length first: it is never above the limit, so the answer does not depend
     * on how the body was cut into pieces */
    if (p->part.content_length >= 0 && p->part_bytes > p->part.content_length)
        return fail(p, err, LC_ERR_INVALID, "part %d is longer than its Content-Length of %lld",
                    p->nparts, p->part.content_length);
    if (p->part_bytes > p->lim.max_part_bytes)
        return fail(p, err, LC_ERR_TOO_LARGE, "part %d is over the limit of %lld bytes", p->nparts,
                    p->lim.max_part_bytes);
    lc_rc rc = p->cb.part_data ? p->cb.part_data(p->ctx, data, n, err) : LC_OK;
    if (rc != LC_OK)
        return cb_failed(p, rc, err);
    return LC_OK;
}

/* The first n bytes of the window are body: hand them out and drop them. */
static lc_rc body_out(gw_mp *p, size_t n, lc_err *err)
{
    lc_rc rc = body_emit(p, p->buf, n, err);
    if (rc == LC_OK)
        consume(p, n);
    return rc;
}

/* The direct path, for a part's body while the window holds fewer bytes than a delimiter:
 * hands out body bytes from the caller's buffer up to the next delimiter (consumed too, the
 * state moves on) or up to the last delimiter-length - 1 bytes, which go to the window. Leaves
 * *in and *len untouched when a delimiter starts in the window's bytes (the window path finds
 * it) or when there are too few bytes to tell. */
static lc_rc body_direct(gw_mp *p, const char **in, size_t *len, lc_err *err)
{
    const size_t keep = p->dlen - 1;
    if (p->fill > 0) {
        /* the window's bytes with the next keep bytes: a delimiter starting in the window is
         * complete in there */
        char look[2 * sizeof(p->delim)];
        if (*len < keep)
            return LC_OK;
        memcpy(look, p->buf, p->fill);
        memcpy(look + p->fill, *in, keep);
        const char *hit = memmem(look, p->fill + keep, p->delim, p->dlen);
        if (hit && (size_t)(hit - look) < p->fill)
            return LC_OK;
        lc_rc rc = body_out(p, p->fill, err);
        if (rc != LC_OK)
            return rc;
    }
    const char *hit = find_delim(p, *in, *len);
    size_t n = hit ? (size_t)(hit - *in) : (*len > keep ? *len - keep : 0);
    lc_rc rc = body_emit(p, *in, n, err);
    if (rc != LC_OK)
        return rc;
    *in += n;
    *len -= n;
    if (hit) {
        *in += p->dlen;
        *len -= p->dlen;
        p->state = MP_DELIM;
    } else {
        memcpy(p->buf, *in, *len);
        p->fill = *len;
        *in += *len;
        *len = 0;
    }
    return LC_OK;
}

/* Run the state machine over the window; returns once it needs more bytes. */
static lc_rc process(gw_mp *p, lc_err *err)
{
    for (;;) {
        switch (p->state) {
        case MP_PREAMBLE: {
            /* the first delimiter may open the body without the leading CRLF */
            const char *d = p->delim + 2;
            size_t dl = p->dlen - 2;
            if (p->preamble == 0 && p->fill >= dl && memcmp(p->buf, d, dl) == 0) {
                consume(p, dl);
                p->state = MP_DELIM;
                continue;
            }
            if (p->preamble == 0 && p->fill < dl && memcmp(p->buf, d, p->fill) == 0)
                return LC_OK;
            char *hit = memmem(p->buf, p->fill, p->delim, p->dlen);
            size_t drop = hit ? (size_t)(hit - p->buf)
                              : (p->fill > p->dlen - 1 ? p->fill - (p->dlen - 1) : 0);
            p->preamble += drop;
            if (p->preamble > p->lim.max_preamble_bytes)
                return fail(p, err, LC_ERR_INVALID,
                            "no multipart boundary in the first %zu bytes of the body",
                            p->lim.max_preamble_bytes);
            consume(p, drop);
            if (!hit)
                return LC_OK;
            p->preamble++; /* not at the very start any more */
            consume(p, p->dlen);
            p->state = MP_DELIM;
            continue;
        }
        case MP_DELIM: {
            if (p->fill < 2)
                return LC_OK;
            if (p->buf[0] == '-' && p->buf[1] == '-') {
                consume(p, 2);
                if (p->nparts == 0)
                    return fail(p, err, LC_ERR_INVALID, "the multipart body has no parts");
                if (p->part.content_length >= 0 && p->part_bytes != p->part.content_length)
                    return fail(p, err, LC_ERR_INVALID,
                                "part %d has %lld bytes but its Content-Length says %lld",
                                p->nparts, p->part_bytes, p->part.content_length);
                if (p->cb.part_end) {
                    lc_rc rc = p->cb.part_end(p->ctx, &p->part, err);
                    if (rc != LC_OK)
                        return cb_failed(p, rc, err);
                }
                p->state = MP_EPILOGUE;
                continue;
            }
            size_t i = 0;
            while (i < p->fill && i <= 64 && (p->buf[i] == ' ' || p->buf[i] == '\t'))
                i++;
            if (i > 64)
                return fail(p, err, LC_ERR_INVALID, "too much padding after a boundary");
            if (i + 2 > p->fill)
                return LC_OK;
            if (p->buf[i] != '\r' || p->buf[i + 1] != '\n')
                return fail(p, err, LC_ERR_INVALID,
                            "a multipart boundary must be followed by CRLF or \"--\"");
            consume(p, i + 2);
            if (p->nparts > 0) {
                if (p->part.content_length >= 0 && p->part_bytes != p->part.content_length)
                    return fail(p, err, LC_ERR_INVALID,
                                "part %d has %lld bytes but its Content-Length says %lld",
                                p->nparts, p->part_bytes, p->part.content_length);
                if (p->cb.part_end) {
                    lc_rc rc = p->cb.part_end(p->ctx, &p->part, err);
                    if (rc != LC_OK)
                        return cb_failed(p, rc, err);
                }
            }
            p->state = MP_HEADERS;
            continue;
        }
        case MP_HEADERS: {
            size_t hlen;
            if (p->fill >= 2 && p->buf[0] == '\r' && p->buf[1] == '\n') {
                hlen = 0; /* no headers at all */
            } else {
                char *e = memmem(p->buf, p->fill, "\r\n\r\n", 4);
                if (!e) {
                    /* a block of max bytes is complete once its blank line (2 more) is in */
                    if (p->fill >= p->lim.max_header_bytes + 2)
                        return fail(p, err, LC_ERR_TOO_LARGE,
                                    "part %d: headers longer than %zu bytes", p->nparts + 1,
                                    p->lim.max_header_bytes);
                    return LC_OK;
                }
                hlen = (size_t)(e - p->buf) + 2; /* keep the last line's CRLF */
            }
            if (hlen > p->lim.max_header_bytes)
                return fail(p, err, LC_ERR_TOO_LARGE, "part %d: headers longer than %zu bytes",
                            p->nparts + 1, p->lim.max_header_bytes);
            if (p->nparts >= p->lim.max_parts)
                return fail(p, err, LC_ERR_TOO_LARGE, "more than %d parts in one request",
                            p->lim.max_parts);
            lc_rc rc = parse_headers(p, p->buf, hlen ? hlen - 2 : 0, err);
            if (rc != LC_OK)
                return rc;
            consume(p, hlen + 2);
            p->nparts++;
            p->part_bytes = 0;
            if (p->cb.part_begin && (rc = p->cb.part_begin(p->ctx, &p->part, err)) != LC_OK)
                return cb_failed(p, rc, err);
            p->state = MP_BODY;
            continue;
        }
        case MP_BODY: {
            const char *hit = find_delim(p, p->buf, p->fill);
            if (hit) {
                lc_rc rc = body_out(p, (size_t)(hit - p->buf), err);
                if (rc != LC_OK)
                    return rc;
                consume(p, p->dlen);
                p->state = MP_DELIM;
                continue;
            }
            /* keep what could be the start of a delimiter */
            size_t keep = p->dlen - 1;
            if (p->fill > keep)
                return body_out(p, p->fill - keep, err);
            return LC_OK;
        }
        case MP_EPILOGUE:
            p->fill = 0;
            return LC_OK;
        case MP_ERROR:
        default:
            return lc_err_set(err, p->error_rc, "%s", p->error_msg);
        }
    }
}

lc_rc gw_mp_feed(gw_mp *p, const void *data, size_t len, lc_err *err)
{
    const char *in = data;
    if (p->state == MP_ERROR)
        return lc_err_set(err, p->error_rc, "%s", p->error_msg);
    while (len > 0) {
        if (p->state == MP_BODY && p->fill < p->dlen) {
            size_t before = len;
            lc_rc rc = body_direct(p, &in, &len, err);
            if (rc != LC_OK)
                return rc;
            if (len < before)
                continue;
        }
        size_t room = sizeof(p->buf) - p->fill;
        size_t n = len < room ? len : room;
        if (n > WINDOW_STEP)
            n = WINDOW_STEP;
        memcpy(p->buf + p->fill, in, n);
        p->fill += n;
        in += n;
        len -= n;
        lc_rc rc = process(p, err);
        if (rc != LC_OK)
            return rc;
        if (p->fill == sizeof(p->buf) && p->state != MP_BODY && p->state != MP_PREAMBLE)
            /* a header block or padding that fills the whole window */
            return fail(p, err, LC_ERR_TOO_LARGE, "part %d: headers too long", p->nparts + 1);
    }
    return LC_OK;
}

lc_rc gw_mp_finish(gw_mp *p, lc_err *err)
{
    switch (p->state) {
    case MP_EPILOGUE:
        return LC_OK;
    case MP_ERROR:
        return lc_err_set(err, p->error_rc, "%s", p->error_msg);
    case MP_PREAMBLE:
        return fail(p, err, LC_ERR_INVALID, "the body holds no multipart boundary");
    case MP_BODY:
        return fail(p, err, LC_ERR_INVALID,
                    "part %d is truncated: the body ended before its closing boundary", p->nparts);
    default:
        return fail(p, err, LC_ERR_INVALID, "the multipart body ended before its closing boundary");
    }
}
