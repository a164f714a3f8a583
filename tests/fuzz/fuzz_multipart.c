/*
 * fuzz_multipart.c: libFuzzer target for the gateway's streaming multipart parser
 * (services/api-gateway/gw_multipart.c, compiled in here: the parser is pure C without the
 * server around it). Each input is parsed twice, in one piece and split at input-chosen
 * points; both runs must agree on the verdict and, on success, on the parts and their bytes;
 * callbacks must come in order (begin, data..., end), and no part may exceed the limits. The first
 * input line is also parsed as a Content-Type header. Never a crash, leak or hang.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../../services/api-gateway/gw_multipart.c"

#define BOUNDARY "XyZ-boundary_01"

typedef struct run {
    int in_part, parts, ends;
    unsigned long long hash;
    long long bytes, part_bytes;
} run;

static lc_rc on_begin(void *ctx, const gw_mp_part *pt, lc_err *err)
{
    run *r = ctx;
    (void)err;
    if (r->in_part || pt->index != r->parts)
        abort();
    r->in_part = 1;
    r->parts++;
    r->part_bytes = 0;
    r->hash = r->hash * 31 + (unsigned long long)pt->content_length + strlen(pt->content_type);
    return LC_OK;
}

static lc_rc on_data(void *ctx, const char *buf, size_t len, lc_err *err)
{
    run *r = ctx;
    (void)err;
    if (!r->in_part || len == 0)
        abort();
    for (size_t i = 0; i < len; i++)
        r->hash = (r->hash ^ (unsigned char)buf[i]) * 1099511628211ULL;
    r->bytes += (long long)len;
    r->part_bytes += (long long)len;
    if (r->part_bytes > 4096)
        abort(); /* the limit below must have stopped it */
    return LC_OK;
}

static lc_rc on_end(void *ctx, const gw_mp_part *pt, lc_err *err)
{
    run *r = ctx;
    (void)err;
    if (!r->in_part || (pt->content_length >= 0 && pt->content_length != r->part_bytes))
        abort();
    r->in_part = 0;
    r->ends++;
    r->hash = r->hash * 7 + 1;
    return LC_OK;
}

static lc_rc parse(const uint8_t *data, size_t size, const uint8_t *cuts, size_t ncuts, run *r,
                   lc_err *err)
{
    static const gw_mp_limits lim = {.max_parts = 20,
                                     .max_part_bytes = 4096,
                                     .max_header_bytes = 512,
                                     .max_preamble_bytes = 256};
    static const gw_mp_callbacks cb = {on_begin, on_data, on_end};
    gw_mp *p = NULL;
    memset(r, 0, sizeof(*r));
    lc_rc rc = gw_mp_new(BOUNDARY, &lim, &cb, r, &p, err);
    if (rc != LC_OK)
        abort();
    size_t off = 0, k = 0;
    while (rc == LC_OK && off < size) {
        size_t n = ncuts ? (size_t)cuts[k++ % ncuts] + 1 : size;
        if (n > size - off)
            n = size - off;
        rc = gw_mp_feed(p, data + off, n, err);
        off += n;
    }
    if (rc == LC_OK)
        rc = gw_mp_finish(p, err);
    if (rc == LC_OK && (r->in_part || r->parts == 0 || r->ends != r->parts))
        abort();
    if (gw_mp_parts(p) != r->parts)
        abort();
    gw_mp_free(p);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    lc_err e1, e2;
    run a, b;
    char line[300];
    gw_mp_ctype ct;
    memset(&e1, 0, sizeof(e1));
    memset(&e2, 0, sizeof(e2));

    /* the first line as a Content-Type value */
    size_t ll = 0;
    while (ll < size && ll < sizeof(line) - 1 && data[ll] != '\n')
        ll++;
    memcpy(line, data, ll);
    line[ll] = '\0';
    if (gw_mp_parse_ctype(line, &ct, &e1) == LC_OK) {
        if (strlen(ct.boundary) > GW_MP_BOUNDARY_MAX || !strchr(ct.media, '/'))
            abort();
    } else if (!e1.msg[0]) {
        abort();
    }

    /* the whole input as a body, in one piece and in input-chosen pieces */
    const uint8_t *cuts = data;
    size_t ncuts = size < 16 ? size : 16;
    lc_rc r1 = parse(data, size, NULL, 0, &a, &e1);
    lc_rc r2 = parse(data, size, cuts, ncuts, &b, &e2);
    /* what was handed out before an error may depend on the pieces; the verdict may not */
    if (r1 != r2 || (r1 == LC_OK && (a.hash != b.hash || a.parts != b.parts || a.bytes != b.bytes)))
        abort();
    if (r1 != LC_OK && (!e1.msg[0] || !e2.msg[0]))
        abort();
    return 0;
}
