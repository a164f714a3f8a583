/*
 * gw_buf.c: growable buffer and JSON string escaping (see gw_buf.h). Pure; one thread per
 * buffer.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gw_buf.h"

static int grow(gw_buf *b, size_t need)
{
    if (b->oom)
        return -1;
    if (b->len + need + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + need + 1) {
        if (cap > ((size_t)1 << 40)) {
            b->oom = 1;
            return -1;
        }
        cap *= 2;
    }
    char *d = realloc(b->data, cap);
    if (!d) {
        b->oom = 1;
        return -1;
    }
    b->data = d;
    b->cap = cap;
    return 0;
}

void gw_buf_add(gw_buf *b, const void *p, size_t n)
{
    if (grow(b, n) != 0)
        return;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void gw_buf_adds(gw_buf *b, const char *s)
{
    gw_buf_add(b, s, strlen(s));
}

void gw_buf_addf(gw_buf *b, const char *fmt, ...)
{
    va_list ap;
    char small[256];
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof(small), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof(small)) {
        gw_buf_add(b, small, (size_t)n);
        return;
    }
    if (grow(b, (size_t)n) != 0)
        return;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Length of the valid UTF-8 sequence at s (at most n bytes), 0 when invalid. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t len;
    unsigned min;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        min = 0x10000;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    unsigned cp = c & (0x7F >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return len;
}

void gw_buf_json_str(gw_buf *b, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    gw_buf_add(b, "\"", 1);
    while (p < end) {
        const unsigned char *run = p;
        /* copy plain ASCII runs in one go */
        while (p < end && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\')
            p++;
        if (p > run)
            gw_buf_add(b, run, (size_t)(p - run));
        if (p >= end)
            break;
        unsigned c = *p;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            gw_buf_add(b, e, 2);
            p++;
        } else if (c < 0x20) {
            gw_buf_addf(b, "\\u%04x", c);
            p++;
        } else {
            size_t l = utf8_len(p, (size_t)(end - p));
            if (l == 0) {
                gw_buf_add(b, "\xEF\xBF\xBD", 3);
                p++;
            } else {
                gw_buf_add(b, p, l);
                p += l;
            }
        }
    }
    gw_buf_add(b, "\"", 1);
}

const char *gw_buf_cstr(gw_buf *b)
{
    if (b->oom)
        return NULL;
    if (!b->data)
        return "";
    return b->data;
}

void gw_buf_reset(gw_buf *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

void gw_buf_free(gw_buf *b)
{
    free(b->data);
    memset(b, 0, sizeof(*b));
}
