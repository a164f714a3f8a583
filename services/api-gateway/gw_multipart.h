/*
 * gw_multipart.h: a small, strict, streaming parser for multipart bodies (RFC 2046, as
 * STOW-RS sends them: multipart/related; type="application/dicom"; boundary=...). Pure: no
 * I/O, no allocation after gw_mp_new, bytes in through gw_mp_feed in pieces of any size, parts
 * out through callbacks, so a body of any size needs constant memory. Limits on the number
 * of parts, header bytes and part sizes make hostile bodies fail early with LC_ERR_TOO_LARGE;
 * anything malformed is LC_ERR_INVALID. One parser belongs to one thread.
 */
#ifndef GW_MULTIPART_H
#define GW_MULTIPART_H

#include <stddef.h>
#include "lc/rc.h"

#define GW_MP_BOUNDARY_MAX 70 /* RFC 2046 */

/* The media type of a Content-Type value and its multipart parameters. */
typedef struct gw_mp_ctype {
    char media[128]; /* "multipart/related", lower-cased */
    char type[128];  /* the type parameter, "" when absent */
    char boundary[GW_MP_BOUNDARY_MAX + 1];
    char ts[128]; /* the transfer-syntax parameter, "" when absent */
    int q;        /* the q parameter (Accept entries) in thousandths, 1000 when absent */
} gw_mp_ctype;

/* Parse a Content-Type header value: media type, then ;-separated name=value parameters
 * (token or quoted-string). LC_ERR_INVALID with a message for a malformed value. Does not
 * require a boundary (the caller decides). */
lc_rc gw_mp_parse_ctype(const char *value, gw_mp_ctype *out, lc_err *err);

/* What a part's headers said. Strings are NUL-terminated copies, "" when absent. */
typedef struct gw_mp_part {
    int index;              /* 0-based */
    char content_type[256]; /* as sent */
    char content_location[512];
    long long content_length; /* -1 when absent */
} gw_mp_part;

typedef struct gw_mp_callbacks {
    /* A part begins (headers complete); return LC_OK or an error (set err) to stop. */
    lc_rc (*part_begin)(void *ctx, const gw_mp_part *part, lc_err *err);
    lc_rc (*part_data)(void *ctx, const char *buf, size_t len, lc_err *err);
    /* The part's body is complete (its closing delimiter was seen). */
    lc_rc (*part_end)(void *ctx, const gw_mp_part *part, lc_err *err);
} gw_mp_callbacks;

typedef struct gw_mp_limits {
    int max_parts;             /* more parts: LC_ERR_TOO_LARGE */
    long long max_part_bytes;  /* a larger part (declared or counted): LC_ERR_TOO_LARGE */
    size_t max_header_bytes;   /* one part's header block */
    size_t max_preamble_bytes; /* bytes before the first delimiter */
} gw_mp_limits;

typedef struct gw_mp gw_mp;

/* A parser for boundary (1..70 characters, checked) with the given limits and callbacks
 * (borrowed; ctx is passed to them). LC_ERR_INVALID for a bad boundary, LC_ERR_NOMEM. */
lc_rc gw_mp_new(const char *boundary, const gw_mp_limits *lim, const gw_mp_callbacks *cb, void *ctx,
                gw_mp **out, lc_err *err);
void gw_mp_free(gw_mp *p); /* accepts NULL */

/* Feed the next len bytes of the body. After an error the parser is stuck in it: every
 * further call returns the same rc. */
lc_rc gw_mp_feed(gw_mp *p, const void *buf, size_t len, lc_err *err);
/* The body ended: LC_OK only when the closing delimiter was seen (and at least one part). */
lc_rc gw_mp_finish(gw_mp *p, lc_err *err);
/* Parts begun so far. */
int gw_mp_parts(const gw_mp *p);

#endif
