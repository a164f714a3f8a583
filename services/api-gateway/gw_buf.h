/*
 * gw_buf.h: a growable byte buffer for building SQL text and JSON bodies, with JSON string
 * escaping. Pure (no I/O); an allocation failure sticks (oom set, later appends do nothing)
 * so callers check once at the end. A buffer belongs to one thread.
 */
#ifndef GW_BUF_H
#define GW_BUF_H

#include <stddef.h>

typedef struct gw_buf {
    char *data; /* NUL-terminated while len > 0 or after gw_buf_cstr */
    size_t len, cap;
    int oom;
} gw_buf;

void gw_buf_add(gw_buf *b, const void *p, size_t n);
void gw_buf_adds(gw_buf *b, const char *s);
void gw_buf_addf(gw_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* s (n bytes of UTF-8) as a JSON string literal with quotes; invalid UTF-8 bytes become
 * U+FFFD so the output is always valid JSON. */
void gw_buf_json_str(gw_buf *b, const char *s, size_t n);
/* The contents as a C string ("" for an empty buffer); NULL only after oom. Borrowed. */
const char *gw_buf_cstr(gw_buf *b);
void gw_buf_reset(gw_buf *b); /* length 0, memory kept */
void gw_buf_free(gw_buf *b);

#endif
