/*
 * gw_dcmwalk.h: find one element of a stored DICOM file, at the top level or inside sequence
 * items, without reading the file whole: the file meta information gives the transfer syntax,
 * then the data set is walked element by element (lengths skipped, sequences of undefined
 * length walked item by item) through a read callback, so it works on any object store with
 * ranged reads. For WADO-RS frames and bulk data (nested BulkDataURIs included). Little endian
 * syntaxes only (implicit and explicit VR, and the compressed syntaxes, whose data sets are
 * explicit VR little endian); big endian and deflated files are LC_ERR_UNSUPPORTED. Bounds-checked
 * against the file size, nesting and step limits: hostile files give LC_ERR_DICOM. Pure (I/O only
 * through the callback).
 */
#ifndef GW_DCMWALK_H
#define GW_DCMWALK_H

#include <stddef.h>
#include <stdint.h>
#include "lc/rc.h"

/* Read up to len bytes at off into buf; returns the bytes read (short at the end), -1 on
 * error. */
typedef int64_t (*gw_dcm_read_fn)(void *ctx, int64_t off, void *buf, size_t len);

typedef struct gw_dcm_elem {
    char ts[65]; /* transfer syntax from the meta information ("" when none) */
    int explicit_vr;
    char vr[3];           /* "" for implicit VR */
    int64_t value_offset; /* where the value starts */
    int64_t length;       /* value length; -1 when undefined (encapsulated pixel data) */
} gw_dcm_elem;

/* Find tag ((group << 16) | element) at the top level of the data set. LC_ERR_NOT_FOUND when
 * it is absent; LC_ERR_DICOM for a malformed file; LC_ERR_UNSUPPORTED for big endian or
 * deflated files; LC_ERR_IO when a read fails. */
lc_rc gw_dcm_find(gw_dcm_read_fn read, void *ctx, int64_t size, uint32_t tag, gw_dcm_elem *out,
                  lc_err *err);

/* The same along a path of n tags (1..GW_DCM_MAX_PATH): tags[0] at the top level, a sequence
 * when n > 1, then item items[0] (0-based) of it, tags[1] in that item, and so on; items (n -
 * 1 indexes) may be NULL when n is 1. LC_ERR_NOT_FOUND also for a missing item or an element
 * on the way that is not a sequence; LC_ERR_INVALID for a bad n. */
#define GW_DCM_MAX_PATH 8
lc_rc gw_dcm_find_path(gw_dcm_read_fn read, void *ctx, int64_t size, const uint32_t *tags,
                       const int *items, int n, gw_dcm_elem *out, lc_err *err);

#endif
