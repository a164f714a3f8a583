/*
 * seg_png.c: the preview for the web UI: up to 16 evenly spaced slices of the first time
 * point in a grid, each fitted into a 256-pixel tile with its physical aspect ratio, gray
 * from a soft-tissue window on CT (level 40, width 400 HU) or the 1st..99th percentile
 * otherwise, the outline of each label drawn in its colour (red for a binary mask). 8-bit RGB
 * PNG through libpng into memory.
 * Pure function; thread-safe.
 */
#include <math.h>
#include <png.h>
#include <setjmp.h>
#include <stdlib.h>
#include <string.h>
#include "seg.h"

#define TILE      256
#define MAX_TILES 16

typedef struct membuf {
    unsigned char *p;
    size_t len, cap;
    int failed;
} membuf;

static void mem_write(png_structp png, png_bytep data, png_size_t n)
{
    membuf *b = png_get_io_ptr(png);
    if (b->failed)
        return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 65536;
        while (cap < b->len + n)
            cap *= 2;
        unsigned char *q = realloc(b->p, cap);
        if (!q) {
            b->failed = 1;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void mem_flush(png_structp png)
{
    (void)png;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* The gray window [lo, hi]. */
static void gray_window(const seg_volume *v, float *lo, float *hi)
{
    if (v->ref && v->ref->modality && strcmp(v->ref->modality, "CT") == 0) {
        *lo = 40 - 200;
        *hi = 40 + 200;
        return;
    }
    size_t n = v->nx * v->ny * v->nz, stride = n / 65536 + 1, m = 0;
    float *s = malloc((n / stride + 1) * sizeof(float));
    if (!s) {
        *lo = 0;
        *hi = 1;
        return;
    }
    for (size_t i = 0; i < n; i += stride)
        if (!isnan(v->data[i]))
            s[m++] = v->data[i];
    qsort(s, m, sizeof(float), cmp_float);
    *lo = m ? s[m / 100] : 0;
    *hi = m ? s[m - 1 - m / 100] : 1;
    if (!(*hi > *lo))
        *hi = *lo + 1;
    free(s);
}

/* Encode W x H RGB rows into out: 0, 1 when memory ran out, 2 when libpng failed. Nothing
 * that setjmp must preserve changes after it. */
static int encode(png_bytep *rows, size_t W, size_t H, membuf *out)
{
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info) {
        png_destroy_write_struct(png ? &png : NULL, NULL);
        return 1;
    }
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        return 2;
    }
    png_set_write_fn(png, out, mem_write, mem_flush);
    png_set_IHDR(png, info, (png_uint_32)W, (png_uint_32)H, 8, PNG_COLOR_TYPE_RGB,
                 PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_set_rows(png, info, rows);
    png_write_png(png, info, PNG_TRANSFORM_IDENTITY, NULL);
    png_destroy_write_struct(&png, &info);
    return out->failed ? 1 : 0;
}

lc_rc seg_png_montage(const seg_volume *v, const uint8_t *mask, const uint8_t (*palette)[3],
                      void **buf, size_t *len, lc_err *err)
{
    size_t ntiles = v->nz < MAX_TILES ? v->nz : MAX_TILES;
    size_t cols = (size_t)ceil(sqrt((double)ntiles)), rows = (ntiles + cols - 1) / cols;
    double w_mm = (double)v->nx * v->spacing[0], h_mm = (double)v->ny * v->spacing[1];
    double scale = TILE / (w_mm > h_mm ? w_mm : h_mm);
    size_t tw = (size_t)fmax(1, round(w_mm * scale)), th = (size_t)fmax(1, round(h_mm * scale));
    size_t W = cols * tw, H = rows * th;
    unsigned char *img = calloc(W * H, 3);
    uint8_t *tm = malloc(tw * th);
    size_t *sx = malloc(tw * sizeof(size_t)), *sy = malloc(th * sizeof(size_t));
    png_bytep *rowp = malloc(H * sizeof(png_bytep));
    membuf out = {0};
    lc_rc rc = LC_OK;
    float lo, hi;

    *buf = NULL;
    *len = 0;
    if (!img || !tm || !sx || !sy || !rowp) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory for the preview");
        goto out;
    }
    gray_window(v, &lo, &hi);
    for (size_t x = 0; x < tw; x++)
        sx[x] = (size_t)(((double)x + 0.5) * (double)v->nx / (double)tw);
    for (size_t y = 0; y < th; y++)
        sy[y] = (size_t)(((double)y + 0.5) * (double)v->ny / (double)th);
    size_t plane = v->nx * v->ny;
    for (size_t t = 0; t < ntiles; t++) {
        size_t k = ntiles > 1
                       ? (size_t)llround((double)t * (double)(v->nz - 1) / (double)(ntiles - 1))
                       : 0;
        const float *sl = v->data + k * plane;
        const uint8_t *ml = mask + k * plane;
        size_t ox = (t % cols) * tw, oy = (t / cols) * th;
        for (size_t y = 0; y < th; y++)
            for (size_t x = 0; x < tw; x++)
                tm[y * tw + x] = ml[sy[y] * v->nx + sx[x]];
        for (size_t y = 0; y < th; y++) {
            for (size_t x = 0; x < tw; x++) {
                float g = sl[sy[y] * v->nx + sx[x]];
                float f = isnan(g) ? 0 : (g - lo) / (hi - lo);
                unsigned char c = (unsigned char)lrintf(255 * (f < 0 ? 0 : f > 1 ? 1 : f));
                unsigned char *px = img + ((oy + y) * W + ox + x) * 3;
                /* a label's border: the tile's edge or a neighbour with another label */
                const uint8_t on = tm[y * tw + x];
                int edge = on && (x == 0 || y == 0 || x + 1 == tw || y + 1 == th ||
                                  tm[y * tw + x - 1] != on || tm[y * tw + x + 1] != on ||
                                  tm[(y - 1) * tw + x] != on || tm[(y + 1) * tw + x] != on);
                if (edge && palette) {
                    memcpy(px, palette[on], 3);
                } else if (edge) {
                    px[0] = 255;
                    px[1] = 40;
                    px[2] = 40;
                } else {
                    px[0] = px[1] = px[2] = c;
                }
            }
        }
    }

    for (size_t y = 0; y < H; y++)
        rowp[y] = img + y * W * 3;
    int e = encode(rowp, W, H, &out);
    if (e) {
        rc = e == 1 ? lc_err_set(err, LC_ERR_NOMEM, "out of memory for the preview")
                    : lc_err_set(err, LC_ERR_INTERNAL, "libpng failed to encode the preview");
        goto out;
    }
    *buf = out.p;
    *len = out.len;
    out.p = NULL;
out:
    free(out.p);
    free(rowp);
    free(sx);
    free(sy);
    free(tm);
    free(img);
    return rc;
}
