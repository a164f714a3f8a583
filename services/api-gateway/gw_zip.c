/*
 * gw_zip.c: POST /api/v1/instances with an application/zip body: the zip is spooled (size
 * limit), then its entries are extracted one by one with libarchive into spool files of
 * their own (entry names are only reported, never used as paths). Limits stop zip bombs
 * while they inflate: at most RADPIPE_UPLOAD_MAX_FILES files, each at most
 * RADPIPE_HTTP_MAX_BODY_BYTES, all together at most RADPIPE_ZIP_MAX_EXPANDED_BYTES, and never
 * more than 200 times the compressed bytes read once past 64 MiB. Only when the whole zip was
 * read cleanly are the DICOM files stored (gw_ingest.c); other files are listed as skipped.
 * Per-request state on a worker thread.
 */
#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "gw.h"
#include "lc/log.h"
#include "lc/util.h"

#define BOMB_RATIO    200
#define BOMB_GRACE    (64LL << 20)
#define EXTRACT_CHUNK (64 * 1024)

/* An entry name safe to echo back: printable ASCII, truncated. */
static void safe_name(const char *in, char *out, size_t cap)
{
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)(in ? in : ""); *p && n + 1 < cap; p++)
        out[n++] = *p >= 0x20 && *p < 0x7f ? (char)*p : '?';
    out[n] = '\0';
}

typedef struct zip_state {
    gw_req *r;
    gw_ingest_item *items;
    int n, cap;
    long long expanded;
    char *buf;
} zip_state;

/* Extract the current entry into a new item. LC_ERR_TOO_LARGE / LC_ERR_INVALID describe the
 * zip's fault; other codes are ours (503). */
static lc_rc extract(zip_state *z, struct archive *a, struct archive_entry *e, lc_err *err)
{
    const gw_config *cfg = z->r->g->cfg;
    if (z->n >= cfg->upload_max_files)
        return lc_err_set(err, LC_ERR_TOO_LARGE, "the zip holds more than %lld files",
                          cfg->upload_max_files);
    if (z->n >= z->cap) {
        int cap = z->cap ? z->cap * 2 : 16;
        gw_ingest_item *items = realloc(z->items, (size_t)cap * sizeof(*items));
        if (!items)
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        z->items = items;
        z->cap = cap;
    }
    gw_ingest_item *it = &z->items[z->n];
    memset(it, 0, sizeof(*it));
    safe_name(archive_entry_pathname(e), it->name, sizeof(it->name));
    if (archive_entry_size_is_set(e) && archive_entry_size(e) > cfg->max_body_bytes)
        return lc_err_set(err, LC_ERR_TOO_LARGE,
                          "zip entry \"%s\" declares %lld bytes, over the limit of %lld", it->name,
                          (long long)archive_entry_size(e), cfg->max_body_bytes);
    int fd = gw_ingest_spool_open(z->r, it, err);
    if (fd < 0)
        return LC_ERR_IO;
    z->n++; /* counted now so its file is removed on any failure */
    lc_sha256 *h = lc_sha256_new();
    lc_rc rc = LC_OK;
    if (!h) {
        close(fd);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    for (;;) {
        la_ssize_t got = archive_read_data(a, z->buf, EXTRACT_CHUNK);
        if (got == 0)
            break;
        if (got < 0) {
            rc = lc_err_set(err, LC_ERR_INVALID, "could not extract zip entry \"%s\": %s", it->name,
                            archive_error_string(a) ? archive_error_string(a) : "unknown error");
            break;
        }
        it->size += got;
        z->expanded += got;
        if (it->size > cfg->max_body_bytes) {
            rc = lc_err_set(err, LC_ERR_TOO_LARGE,
                            "zip entry \"%s\" expands past the limit of %lld bytes", it->name,
                            cfg->max_body_bytes);
            break;
        }
        if (z->expanded > cfg->zip_max_expanded) {
            rc = lc_err_set(err, LC_ERR_TOO_LARGE,
                            "the zip expands past the limit of %lld bytes "
                            "(RADPIPE_ZIP_MAX_EXPANDED_BYTES)",
                            cfg->zip_max_expanded);
            break;
        }
        long long packed = (long long)archive_filter_bytes(a, -1);
        if (z->expanded > BOMB_GRACE && z->expanded > BOMB_RATIO * (packed > 0 ? packed : 1)) {
            rc = lc_err_set(err, LC_ERR_TOO_LARGE,
                            "the zip expands more than %d-fold: refused as a zip bomb", BOMB_RATIO);
            break;
        }
        const char *p = z->buf;
        size_t left = (size_t)got;
        while (left > 0) {
            ssize_t w = write(fd, p, left);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                rc = lc_err_set(err, LC_ERR_IO, "could not write the spool file \"%s\": %s",
                                it->path, strerror(errno));
                break;
            }
            p += w;
            left -= (size_t)w;
        }
        if (rc != LC_OK)
            break;
        lc_sha256_update(h, z->buf, (size_t)got);
    }
    if (rc != LC_OK)
        close(fd);
    else
        rc = gw_ingest_spool_close(z->items, (size_t)z->n - 1, fd, err);
    lc_sha256_final_hex(h, it->sha256);
    lc_sha256_free(h);
    return rc;
}

int gw_zip_post(gw_req *r)
{
    gw_body body = {0};
    zip_state z = {.r = r};
    struct archive *a = NULL;
    lc_err err = {0};
    char detail[700] = "";
    const char *down = NULL;
    int code = 0, accepted = 0;
    cJSON *ok = NULL;
    lc_rc rc;

    rc = gw_body_spool(r, r->g->cfg->max_body_bytes, &body, &err);
    if (rc == LC_ERR_TOO_LARGE || rc == LC_ERR_INVALID) {
        code = rc == LC_ERR_TOO_LARGE ? 413 : 400;
        snprintf(detail, sizeof(detail), "%s", lc_err_msg(&err));
        goto out;
    } else if (rc != LC_OK) {
        down = "the spool directory";
        goto out;
    }
    if (!(z.buf = malloc(EXTRACT_CHUNK)) || !(a = archive_read_new())) {
        down = "memory";
        goto out;
    }
    archive_read_support_format_zip(a);
    if (archive_read_open_filename(a, body.path, 64 * 1024) != ARCHIVE_OK) {
        code = 400;
        snprintf(detail, sizeof(detail), "the body is not a zip file: %s",
                 archive_error_string(a) ? archive_error_string(a) : "unreadable");
        goto out;
    }
    for (;;) {
        struct archive_entry *e = NULL;
        int st = archive_read_next_header(a, &e);
        if (st == ARCHIVE_EOF)
            break;
        if (st != ARCHIVE_OK && st != ARCHIVE_WARN) {
            code = 400;
            snprintf(detail, sizeof(detail), "the zip is malformed: %s",
                     archive_error_string(a) ? archive_error_string(a) : "unknown error");
            goto out;
        }
        if (archive_entry_filetype(e) != AE_IFREG)
            continue; /* directories, links: nothing to store */
        rc = extract(&z, a, e, &err);
        if (rc == LC_ERR_TOO_LARGE || rc == LC_ERR_INVALID) {
            code = rc == LC_ERR_TOO_LARGE ? 413 : 400;
            snprintf(detail, sizeof(detail), "%s", lc_err_msg(&err));
            goto out;
        } else if (rc != LC_OK) {
            down = "the spool directory";
            goto out;
        }
    }
    for (int i = 0; i < z.n; i++) {
        rc = gw_ingest_check(r, &z.items[i], NULL, &err);
        if (rc == LC_OK)
            accepted++;
        else if (rc != LC_ERR_DICOM) {
            down = "DICOM parsing";
            goto out;
        }
    }
    if (accepted == 0) {
        code = 400;
        snprintf(detail, sizeof(detail), "the zip holds no DICOM file (%d file%s looked at)", z.n,
                 z.n == 1 ? "" : "s");
        goto out;
    }
    if (gw_ingest_commit(r, z.items, (size_t)z.n, "http", &err) != LC_OK) {
        down = "the object store or the database";
        goto out;
    }
    ok = cJSON_CreateObject();
    cJSON *stored = cJSON_AddArrayToObject(ok, "stored");
    cJSON *skipped = cJSON_AddArrayToObject(ok, "skipped");
    for (int i = 0; i < z.n; i++) {
        const gw_ingest_item *it = &z.items[i];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", it->name);
        if (it->failure) {
            cJSON_AddStringToObject(o, "reason", it->error);
            cJSON_AddItemToArray(skipped, o);
            continue;
        }
        cJSON_AddStringToObject(o, "study_instance_uid", it->h->study_instance_uid);
        cJSON_AddStringToObject(o, "series_instance_uid", it->h->series_instance_uid);
        cJSON_AddStringToObject(o, "sop_instance_uid", it->h->sop_instance_uid);
        cJSON_AddNumberToObject(o, "size", (double)it->size);
        cJSON_AddStringToObject(o, "sha256", it->sha256);
        cJSON_AddItemToArray(stored, o);
    }
out:
    if (a)
        archive_read_free(a);
    gw_body_discard(&body);
    gw_ingest_release(z.items, (size_t)z.n);
    free(z.items);
    free(z.buf);
    gw_db_put(r);
    if (down)
        return gw_send_unavailable(r, down, &err);
    if (code)
        return gw_send_problem(r, code, NULL, "%s", detail);
    return gw_send_json(r, 202, ok);
}
