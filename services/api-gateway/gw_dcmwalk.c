/*
 * gw_dcmwalk.c: the element locator of gw_dcmwalk.h. A 64 KiB window over the file keeps the
 * number of reads small; every step moves forward by at least eight bytes and is checked
 * against the file size, nesting depth and a step budget, so no input can loop or read out
 * of bounds. Pure and reentrant.
 */
#include <stdlib.h>
#include <string.h>
#include "gw_dcmwalk.h"

#define WIN       (64 * 1024)
#define MAX_DEPTH 32
#define MAX_STEPS 4000000L
#define UNDEF     0xFFFFFFFFu

typedef struct walker {
    gw_dcm_read_fn read;
    void *ctx;
    int64_t size;
    int64_t win_off;
    int64_t win_len;
    unsigned char *win;
    long steps;
    int explicit_vr; /* of the top-level data set */
    lc_err *err;
} walker;

/* n bytes at off, or NULL (err set) when they are not in the file. */
static const unsigned char *get(walker *w, int64_t off, size_t n)
{
    if (off < 0 || (int64_t)n > w->size || off > w->size - (int64_t)n) {
        lc_err_set(w->err, LC_ERR_DICOM, "malformed DICOM file: an element runs past the end");
        return NULL;
    }
    if (off >= w->win_off && off + (int64_t)n <= w->win_off + w->win_len)
        return w->win + (off - w->win_off);
    int64_t want = w->size - off < WIN ? w->size - off : WIN;
    int64_t got = w->read(w->ctx, off, w->win, (size_t)want);
    if (got < (int64_t)n) {
        lc_err_set(w->err, got < 0 ? LC_ERR_IO : LC_ERR_DICOM,
                   got < 0 ? "could not read the stored object" : "the stored object is short");
        w->win_len = 0;
        return NULL;
    }
    w->win_off = off;
    w->win_len = got;
    return w->win;
}

static uint16_t u16(const unsigned char *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t u32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static int long_vr(const unsigned char *v)
{
    static const char vrs[] = "OBODOFOLOVOWSQSVUCUNURUTUV";
    for (size_t i = 0; i + 1 < sizeof(vrs); i += 2)
        if (v[0] == (unsigned char)vrs[i] && v[1] == (unsigned char)vrs[i + 1])
            return 1;
    return 0;
}

static int vr_chars(const unsigned char *v)
{
    return v[0] >= 'A' && v[0] <= 'Z' && v[1] >= 'A' && v[1] <= 'Z';
}

/* One element header at *off: tag, VR, value length (UNDEF possible) and value offset. */
typedef struct ehdr {
    uint32_t tag;
    char vr[3];
    uint32_t len;
    int64_t value;
} ehdr;

static lc_rc read_header(walker *w, int64_t off, int explicit_vr, ehdr *h)
{
    const unsigned char *p = get(w, off, 8);
    if (!p)
        return w->err ? w->err->rc : LC_ERR_DICOM;
    h->tag = ((uint32_t)u16(p) << 16) | u16(p + 2);
    h->vr[0] = '\0';
    /* items and delimiters have no VR in any syntax */
    if ((h->tag >> 16) == 0xFFFE || !explicit_vr) {
        h->len = u32(p + 4);
        h->value = off + 8;
        return LC_OK;
    }
    if (!vr_chars(p + 4))
        return lc_err_set(w->err, LC_ERR_DICOM, "malformed DICOM file: invalid VR");
    h->vr[0] = (char)p[4];
    h->vr[1] = (char)p[5];
    h->vr[2] = '\0';
    if (long_vr(p + 4)) {
        const unsigned char *q = get(w, off + 8, 4);
        if (!q)
            return w->err ? w->err->rc : LC_ERR_DICOM;
        h->len = u32(q);
        h->value = off + 12;
    } else {
        h->len = u16(p + 6);
        h->value = off + 8;
    }
    return LC_OK;
}

static lc_rc skip_undefined(walker *w, int64_t *off, int depth, int explicit_vr);

/* Walk elements of a nested data set (an item of undefined length) up to its delimiter. */
static lc_rc skip_item(walker *w, int64_t *off, int depth, int explicit_vr)
{
    for (;;) {
        ehdr h;
        lc_rc rc;
        if (++w->steps > MAX_STEPS)
            return lc_err_set(w->err, LC_ERR_DICOM, "malformed DICOM file: too many elements");
        if ((rc = read_header(w, *off, explicit_vr, &h)) != LC_OK)
            return rc;
        if (h.tag == 0xFFFEE00D) { /* item delimitation */
            *off = h.value;
            return LC_OK;
        }
        if ((h.tag >> 16) == 0xFFFE)
            return lc_err_set(w->err, LC_ERR_DICOM, "malformed DICOM file: stray delimiter");
        if (h.len == UNDEF) {
            *off = h.value;
            /* UN of undefined length holds implicit VR little endian (PS3.5 6.2.2) */
            int inner = explicit_vr && strcmp(h.vr, "UN") != 0;
            if ((rc = skip_undefined(w, off, depth + 1, inner)) != LC_OK)
                return rc;
        } else {
            if (h.value + (int64_t)h.len > w->size)
                return lc_err_set(w->err, LC_ERR_DICOM,
                                  "malformed DICOM file: an element runs past the end");
            *off = h.value + h.len;
        }
    }
}

/* Skip a sequence (or encapsulated value) of undefined length starting at *off (its first
 * item): items until the sequence delimitation. */
static lc_rc skip_undefined(walker *w, int64_t *off, int depth, int explicit_vr)
{
    if (depth > MAX_DEPTH)
        return lc_err_set(w->err, LC_ERR_DICOM, "malformed DICOM file: sequences nest too deep");
    for (;;) {
        ehdr h;
        lc_rc rc;
        if (++w->steps > MAX_STEPS)
            return lc_err_set(w->err, LC_ERR_DICOM, "malformed DICOM file: too many elements");
        if ((rc = read_header(w, *off, 0, &h)) != LC_OK) /* items: tag + length */
            return rc;
        if (h.tag == 0xFFFEE0DD) {
            *off = h.value;
            return LC_OK;
        }
        if (h.tag != 0xFFFEE000)
            return lc_err_set(w->err, LC_ERR_DICOM, "malformed DICOM file: expected an item");
        *off = h.value;
        if (h.len == UNDEF) {
            if ((rc = skip_item(w, off, depth + 1, explicit_vr)) != LC_OK)
                return rc;
        } else {
            if (h.value + (int64_t)h.len > w->size)
                return lc_err_set(w->err, LC_ERR_DICOM,
                                  "malformed DICOM file: an item runs past the end");
            *off = h.value + h.len;
        }
    }
}

lc_rc gw_dcm_find(gw_dcm_read_fn read, void *ctx, int64_t size, uint32_t tag, gw_dcm_elem *out,
                  lc_err *err)
{
    lc_err local;
    if (!err)
        err = &local;
    walker w = {.read = read, .ctx = ctx, .size = size, .err = err};
    int64_t off = 0;
    lc_rc rc = LC_OK;
    const unsigned char *p;

    memset(out, 0, sizeof(*out));
    if (!(w.win = malloc(WIN)))
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    /* file meta information: explicit VR little endian, group 0002 */
    if (size >= 132 && (p = get(&w, 128, 4)) && memcmp(p, "DICM", 4) == 0) {
        off = 132;
        for (;;) {
            ehdr h;
            if (off + 8 > size)
                break;
            if (!(p = get(&w, off, 2))) {
                rc = err->rc;
                goto out;
            }
            if (u16(p) != 0x0002) /* the data set begins */
                break;
            if ((rc = read_header(&w, off, 1, &h)) != LC_OK)
                goto out;
            if (h.len == UNDEF || h.value + (int64_t)h.len > size) {
                rc = lc_err_set(err, LC_ERR_DICOM, "malformed DICOM file meta information");
                goto out;
            }
            if (h.tag == 0x00020010 && h.len < sizeof(out->ts)) {
                const unsigned char *v = h.len ? get(&w, h.value, h.len) : (const unsigned char *)"";
                if (!v) {
                    rc = err->rc;
                    goto out;
                }
                size_t n = h.len;
                while (n && (v[n - 1] == '\0' || v[n - 1] == ' '))
                    n--;
                memcpy(out->ts, v, n);
                out->ts[n] = '\0';
            }
            off = h.value + h.len;
        }
    } else if (size < 8) {
        rc = lc_err_set(err, LC_ERR_DICOM, "not a DICOM file");
        goto out;
    }
    if (strcmp(out->ts, "1.2.840.10008.1.2.2") == 0 || strcmp(out->ts, "1.2.840.10008.1.2.1.99") == 0) {
        rc = lc_err_set(err, LC_ERR_UNSUPPORTED,
                        "transfer syntax %s (big endian or deflated) is not supported here",
                        out->ts);
        goto out;
    }
    if (out->ts[0]) {
        w.explicit_vr = strcmp(out->ts, "1.2.840.10008.1.2") != 0;
    } else { /* no meta information: guess from the first element */
        if (!(p = get(&w, off, 8))) {
            rc = err->rc;
            goto out;
        }
        w.explicit_vr = vr_chars(p + 4);
    }
    out->explicit_vr = w.explicit_vr;
    for (;;) {
        ehdr h;
        if (off >= size) {
            rc = lc_err_set(err, LC_ERR_NOT_FOUND, "the element is not in the file");
            goto out;
        }
        if (++w.steps > MAX_STEPS) {
            rc = lc_err_set(err, LC_ERR_DICOM, "malformed DICOM file: too many elements");
            goto out;
        }
        if ((rc = read_header(&w, off, w.explicit_vr, &h)) != LC_OK)
            goto out;
        if (h.tag == tag) {
            memcpy(out->vr, h.vr, sizeof(out->vr));
            out->value_offset = h.value;
            out->length = h.len == UNDEF ? -1 : (int64_t)h.len;
            if (out->length > size - h.value)
                rc = lc_err_set(err, LC_ERR_DICOM,
                                "malformed DICOM file: the element runs past the end");
            goto out;
        }
        if (h.tag > tag || (h.tag >> 16) == 0xFFFE) {
            rc = lc_err_set(err, LC_ERR_NOT_FOUND, "the element is not in the file");
            goto out;
        }
        if (h.len == UNDEF) {
            off = h.value;
            if ((rc = skip_undefined(&w, &off, 1,
                                     w.explicit_vr && strcmp(h.vr, "UN") != 0)) != LC_OK)
                goto out;
        } else {
            if (h.value + (int64_t)h.len > size) {
                rc = lc_err_set(err, LC_ERR_DICOM,
                                "malformed DICOM file: an element runs past the end");
                goto out;
            }
            off = h.value + h.len;
        }
    }
out:
    free(w.win);
    return rc;
}
