/*
 * gw_dcmwalk.c: the element locator of gw_dcmwalk.h (top level, or down a path of sequence
 * items). A 64 KiB window over the file keeps the
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
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* The rc get() left in err: never LC_OK, so a failed read cannot pass for a success. */
static lc_rc failed_rc(const lc_err *err)
{
    return err && err->rc != LC_OK ? err->rc : LC_ERR_DICOM;
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
        return failed_rc(w->err);
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
            return failed_rc(w->err);
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
        ehdr h = {0};
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
        ehdr h = {0};
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

/* Find tag among the elements of one data set, from off up to end (end < 0: an item of
 * undefined length, up to its delimitation item); *h gets the element's header. Elements are
 * in ascending tag order, so the search stops at the first larger tag. */
static lc_rc find_in(walker *w, int64_t off, int64_t end, int depth, int explicit_vr, uint32_t tag,
                     ehdr *h)
{
    for (;;) {
        lc_rc rc;
        if ((end >= 0 && off >= end) || off >= w->size)
            return lc_err_set(w->err, LC_ERR_NOT_FOUND, "the element is not in the file");
        if (++w->steps > MAX_STEPS)
            return lc_err_set(w->err, LC_ERR_DICOM, "malformed DICOM file: too many elements");
        if ((rc = read_header(w, off, explicit_vr, h)) != LC_OK)
            return rc;
        if (h->tag == tag)
            return LC_OK;
        /* a larger tag, or the end of an item (or a stray delimiter at the top level) */
        if (h->tag > tag || (h->tag >> 16) == 0xFFFE)
            return lc_err_set(w->err, LC_ERR_NOT_FOUND, "the element is not in the file");
        if (h->len == UNDEF) {
            off = h->value;
            if ((rc = skip_undefined(w, &off, depth + 1,
                                     explicit_vr && strcmp(h->vr, "UN") != 0)) != LC_OK)
                return rc;
        } else {
            if (h->value + (int64_t)h->len > w->size)
                return lc_err_set(w->err, LC_ERR_DICOM,
                                  "malformed DICOM file: an element runs past the end");
            off = h->value + h->len;
        }
        if (end >= 0 && off > end)
            return lc_err_set(w->err, LC_ERR_DICOM,
                              "malformed DICOM file: an element runs past its item");
    }
}

/* Item want (0-based) of the sequence whose value starts at off and ends at seq_end (-1:
 * undefined length): its data set is [*start, *end) (*end -1: undefined length). */
static lc_rc nth_item(walker *w, int64_t off, int64_t seq_end, int want, int depth, int explicit_vr,
                      int64_t *start, int64_t *end)
{
    for (int k = 0;; k++) {
        ehdr h = {0};
        lc_rc rc;
        if ((seq_end >= 0 && off >= seq_end) || off >= w->size)
            return lc_err_set(w->err, LC_ERR_NOT_FOUND, "the sequence has no item %d", want);
        if (++w->steps > MAX_STEPS)
            return lc_err_set(w->err, LC_ERR_DICOM, "malformed DICOM file: too many elements");
        if ((rc = read_header(w, off, 0, &h)) != LC_OK) /* items: tag + length */
            return rc;
        if (h.tag == 0xFFFEE0DD)
            return lc_err_set(w->err, LC_ERR_NOT_FOUND, "the sequence has no item %d", want);
        if (h.tag != 0xFFFEE000) /* at the first item: not a sequence at all */
            return lc_err_set(w->err, k ? LC_ERR_DICOM : LC_ERR_NOT_FOUND,
                              k ? "malformed DICOM file: expected an item"
                                : "the element is not a sequence");
        if (h.len != UNDEF && (h.value + (int64_t)h.len > w->size ||
                               (seq_end >= 0 && h.value + (int64_t)h.len > seq_end)))
            return lc_err_set(w->err, LC_ERR_DICOM,
                              "malformed DICOM file: an item runs past the end");
        if (k == want) {
            *start = h.value;
            *end = h.len == UNDEF ? -1 : h.value + (int64_t)h.len;
            return LC_OK;
        }
        off = h.value;
        if (h.len == UNDEF) {
            if ((rc = skip_item(w, &off, depth + 1, explicit_vr)) != LC_OK)
                return rc;
        } else {
            off = h.value + h.len;
        }
    }
}

lc_rc gw_dcm_find(gw_dcm_read_fn read, void *ctx, int64_t size, uint32_t tag, gw_dcm_elem *out,
                  lc_err *err)
{
    return gw_dcm_find_path(read, ctx, size, &tag, NULL, 1, out, err);
}

lc_rc gw_dcm_find_path(gw_dcm_read_fn read, void *ctx, int64_t size, const uint32_t *tags,
                       const int *items, int n, gw_dcm_elem *out, lc_err *err)
{
    lc_err local;
    if (!err)
        err = &local;
    walker w = {.read = read, .ctx = ctx, .size = size, .err = err};
    int64_t off = 0;
    lc_rc rc = LC_OK;
    const unsigned char *p;

    memset(out, 0, sizeof(*out));
    if (n < 1 || n > GW_DCM_MAX_PATH)
        return lc_err_set(err, LC_ERR_INVALID, "an element path has 1 to %d tags", GW_DCM_MAX_PATH);
    if (!(w.win = malloc(WIN)))
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    /* file meta information: explicit VR little endian, group 0002 */
    if (size >= 132 && (p = get(&w, 128, 4)) && memcmp(p, "DICM", 4) == 0) {
        off = 132;
        for (;;) {
            ehdr h = {0};
            if (off + 8 > size)
                break;
            if (!(p = get(&w, off, 2))) {
                rc = failed_rc(err);
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
                const unsigned char *v =
                    h.len ? get(&w, h.value, h.len) : (const unsigned char *)"";
                if (!v) {
                    rc = failed_rc(err);
                    goto out;
                }
                size_t len = h.len;
                while (len && (v[len - 1] == '\0' || v[len - 1] == ' '))
                    len--;
                memcpy(out->ts, v, len);
                out->ts[len] = '\0';
            }
            off = h.value + h.len;
        }
    } else if (size < 8) {
        rc = lc_err_set(err, LC_ERR_DICOM, "not a DICOM file");
        goto out;
    }
    if (strcmp(out->ts, "1.2.840.10008.1.2.2") == 0 ||
        strcmp(out->ts, "1.2.840.10008.1.2.1.99") == 0) {
        rc = lc_err_set(err, LC_ERR_UNSUPPORTED,
                        "transfer syntax %s (big endian or deflated) is not supported here",
                        out->ts);
        goto out;
    }
    if (out->ts[0]) {
        w.explicit_vr = strcmp(out->ts, "1.2.840.10008.1.2") != 0;
    } else { /* no meta information: guess from the first element */
        if (!(p = get(&w, off, 8))) {
            rc = failed_rc(err);
            goto out;
        }
        w.explicit_vr = vr_chars(p + 4);
    }
    out->explicit_vr = w.explicit_vr;
    int64_t end = size;
    int explicit_vr = w.explicit_vr;
    for (int level = 0;; level++) {
        ehdr h = {0};
        if ((rc = find_in(&w, off, end, level, explicit_vr, tags[level], &h)) != LC_OK)
            goto out;
        if (level == n - 1) {
            memcpy(out->vr, h.vr, sizeof(out->vr));
            out->value_offset = h.value;
            out->length = h.len == UNDEF ? -1 : (int64_t)h.len;
            if (out->length > size - h.value)
                rc = lc_err_set(err, LC_ERR_DICOM,
                                "malformed DICOM file: the element runs past the end");
            goto out;
        }
        /* into an item of this sequence (explicit VR: only SQ, or UN of undefined length,
         * whose items hold implicit VR little endian, PS3.5 6.2.2) */
        int un = strcmp(h.vr, "UN") == 0;
        if (explicit_vr && strcmp(h.vr, "SQ") != 0 && !(un && h.len == UNDEF)) {
            rc = lc_err_set(err, LC_ERR_NOT_FOUND, "element %08X is not a sequence", tags[level]);
            goto out;
        }
        if (h.len != UNDEF && h.value + (int64_t)h.len > size) {
            rc =
                lc_err_set(err, LC_ERR_DICOM, "malformed DICOM file: an element runs past the end");
            goto out;
        }
        explicit_vr = explicit_vr && !un;
        if ((rc = nth_item(&w, h.value, h.len == UNDEF ? -1 : h.value + (int64_t)h.len,
                           items[level], level + 1, explicit_vr, &off, &end)) != LC_OK)
            goto out;
    }
out:
    free(w.win);
    return rc;
}
