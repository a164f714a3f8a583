/*
 * upl_tar.c: deterministic POSIX ustar framing for the series/study tar layouts: member
 * headers (mode 0644, owner 0/0, mtime 0, names split into prefix/name), padding and the
 * end-of-archive blocks, and the archive's size before it is written, so the same members
 * always give the same bytes (a resumed upload regenerates identical parts). Pure functions.
 */
#include <stdio.h>
#include <string.h>
#include "upl.h"

#define BLOCK 512

static void octal(char *dst, size_t width, unsigned long long v)
{
    /* width-1 digits and a NUL */
    snprintf(dst, width, "%0*llo", (int)width - 1, v);
}

lc_rc upl_tar_header(const char *name, int64_t size, unsigned char hdr[512], lc_err *err)
{
    memset(hdr, 0, BLOCK);
    size_t n = strlen(name);
    if (n <= 100) {
        memcpy(hdr, name, n);
    } else {
        /* split at a '/' so that the prefix fits 155 bytes and the rest 100 */
        const char *cut = NULL;
        for (const char *p = name; (p = strchr(p, '/')); p++)
            if ((size_t)(p - name) <= 155 && strlen(p + 1) <= 100 && p[1]) {
                cut = p;
                break;
            }
        if (!cut)
            return lc_err_set(err, LC_ERR_INVALID, "tar member name \"%s\" is too long", name);
        memcpy(hdr + 345, name, (size_t)(cut - name));
        memcpy(hdr, cut + 1, strlen(cut + 1));
    }
    octal((char *)hdr + 100, 8, 0644);
    octal((char *)hdr + 108, 8, 0);
    octal((char *)hdr + 116, 8, 0);
    if (size < 0)
        return lc_err_set(err, LC_ERR_INVALID, "negative tar member size");
    if ((unsigned long long)size <= 077777777777ULL) {
        octal((char *)hdr + 124, 12, (unsigned long long)size);
    } else { /* GNU base-256 for members of 8 GiB and more */
        hdr[124] = 0x80;
        for (int i = 11; i >= 4; i--) {
            hdr[124 + i] = (unsigned char)(size & 0xFF);
            size >>= 8;
        }
    }
    octal((char *)hdr + 136, 12, 0);
    hdr[156] = '0';
    memcpy(hdr + 257, "ustar", 6);
    memcpy(hdr + 263, "00", 2);
    memset(hdr + 148, ' ', 8);
    unsigned sum = 0;
    for (int i = 0; i < BLOCK; i++)
        sum += hdr[i];
    snprintf((char *)hdr + 148, 8, "%06o", sum);
    hdr[155] = ' ';
    return LC_OK;
}

int64_t upl_tar_padding(int64_t size)
{
    return (BLOCK - size % BLOCK) % BLOCK;
}

int64_t upl_tar_size(const int64_t *sizes, size_t n)
{
    int64_t total = 2 * BLOCK;
    for (size_t i = 0; i < n; i++)
        total += BLOCK + sizes[i] + upl_tar_padding(sizes[i]);
    return total;
}
