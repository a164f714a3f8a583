/*
 * gw_stow.c: STOW-RS (PS3.18 10.5): POST /dicomweb/studies[/{study}] with a
 * multipart/related; type="application/dicom" body. The body streams through gw_multipart.c
 * into one spool file per part (hashed on the way), so memory stays flat whatever the size.
 * Only once the whole body parsed cleanly are the parts checked and stored through
 * gw_ingest.c: a malformed body (no boundary, a truncated part, too many parts, a part over
 * the size limit) is refused with problem+json and leaves nothing behind. The answer is the
 * Store Instances Response (application/dicom+json): 200 all stored, 202 some failed, 409
 * none stored. Per-request state on a worker thread.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "gw.h"
#include "gw_buf.h"
#include "gw_multipart.h"
#include "lc/log.h"
#include "lc/util.h"

#define MAX_PART_HEADER_BYTES (16 * 1024)
#define MAX_PREAMBLE_BYTES    (64 * 1024)

typedef struct stow_ctx {
    gw_req *r;
    gw_ingest_item *items;
    int n, cap;
    int fd; /* spool file of the part being received, -1 between parts */
    lc_sha256 *h;
    gw_mp *mp;
} stow_ctx;

static lc_rc part_begin(void *arg, const gw_mp_part *part, lc_err *err)
{
    stow_ctx *c = arg;
    if (part->content_type[0] && !gw_media_type_is(part->content_type, "application/dicom"))
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "part %d is \"%.100s\": only application/dicom parts are supported",
                          part->index + 1, part->content_type);
    if (c->n >= c->cap) {
        /* grows as parts arrive; the parser stops at RADPIPE_UPLOAD_MAX_FILES */
        int cap = c->cap ? c->cap * 2 : 8;
        gw_ingest_item *items = realloc(c->items, (size_t)cap * sizeof(*items));
        if (!items)
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        c->items = items;
        c->cap = cap;
    }
    gw_ingest_item *it = &c->items[c->n];
    memset(it, 0, sizeof(*it));
    snprintf(it->name, sizeof(it->name), "part %d", part->index + 1);
    if ((c->fd = gw_ingest_spool_open(c->r, it, err)) < 0)
        return LC_ERR_IO;
    c->n++; /* counted now so a failure below still removes its file */
    lc_sha256_free(c->h);
    if (!(c->h = lc_sha256_new()))
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    return LC_OK;
}

static lc_rc part_data(void *arg, const char *buf, size_t len, lc_err *err)
{
    stow_ctx *c = arg;
    gw_ingest_item *it = &c->items[c->n - 1];
    while (len > 0) {
        ssize_t w = write(c->fd, buf, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return lc_err_set(err, LC_ERR_IO, "could not write the spool file \"%s\": %s", it->path,
                              strerror(errno));
        lc_sha256_update(c->h, buf, (size_t)w);
        it->size += w;
        buf += w;
        len -= (size_t)w;
    }
    return LC_OK;
}

static lc_rc part_end(void *arg, const gw_mp_part *part, lc_err *err)
{
    stow_ctx *c = arg;
    gw_ingest_item *it = &c->items[c->n - 1];
    (void)part;
    int fd = c->fd;
    c->fd = -1;
    lc_rc rc = gw_ingest_spool_close(c->items, (size_t)c->n - 1, fd, err);
    if (rc != LC_OK)
        return rc;
    lc_sha256_final_hex(c->h, it->sha256);
    lc_sha256_free(c->h);
    c->h = NULL;
    return LC_OK;
}

static lc_rc body_piece(void *arg, const char *buf, size_t len, lc_err *err)
{
    stow_ctx *c = arg;
    return gw_mp_feed(c->mp, buf, len, err);
}

/* --- the Store Instances Response (PS3.18 Annex I, as DICOM JSON) ------------------------ */

static void ui(gw_buf *b, const char *tag, const char *v)
{
    gw_buf_addf(b, "\"%s\":{\"vr\":\"UI\"", tag);
    if (v && *v) {
        gw_buf_adds(b, ",\"Value\":[");
        gw_buf_json_str(b, v, strlen(v));
        gw_buf_adds(b, "]");
    }
    gw_buf_adds(b, "}");
}

static void ur(gw_buf *b, const char *tag, const char *base, const char *path)
{
    gw_buf_addf(b, "\"%s\":{\"vr\":\"UR\",\"Value\":[", tag);
    gw_buf b2 = {0};
    gw_buf_adds(&b2, base);
    gw_buf_adds(&b2, path);
    const char *s = gw_buf_cstr(&b2);
    gw_buf_json_str(b, s ? s : "", s ? strlen(s) : 0);
    gw_buf_free(&b2);
    gw_buf_adds(b, "]}");
}

static char *response_json(gw_req *r, const gw_ingest_item *items, int n, const char *study)
{
    char base[600], path[300];
    gw_buf b = {0};
    int first, stored = 0, failed = 0;
    const char *one_study = study;
    gw_base_url(r, base, sizeof(base));
    for (int i = 0; i < n; i++) {
        if (items[i].failure) {
            failed++;
            continue;
        }
        stored++;
        if (!study) { /* the study's URL when every stored instance is in one study */
            const char *s = items[i].h->study_instance_uid;
            one_study =
                stored == 1 ? s : (one_study && strcmp(one_study, s) == 0 ? one_study : NULL);
        }
    }
    gw_buf_adds(&b, "{");
    if (one_study && stored > 0) {
        snprintf(path, sizeof(path), "/dicomweb/studies/%s", one_study);
        ur(&b, "00081190", base, path);
    }
    if (failed) {
        gw_buf_addf(&b, "%s\"00081198\":{\"vr\":\"SQ\",\"Value\":[", b.len > 1 ? "," : "");
        first = 1;
        for (int i = 0; i < n; i++) {
            const gw_ingest_item *it = &items[i];
            if (!it->failure)
                continue;
            gw_buf_adds(&b, first ? "{" : ",{");
            first = 0;
            ui(&b, "00081150", it->h ? it->h->sop_class_uid : NULL);
            gw_buf_adds(&b, ",");
            ui(&b, "00081155", it->h ? it->h->sop_instance_uid : NULL);
            gw_buf_addf(&b, ",\"00081197\":{\"vr\":\"US\",\"Value\":[%d]}}", it->failure);
        }
        gw_buf_adds(&b, "]}");
    }
    if (stored) {
        gw_buf_addf(&b, "%s\"00081199\":{\"vr\":\"SQ\",\"Value\":[", b.len > 1 ? "," : "");
        first = 1;
        for (int i = 0; i < n; i++) {
            const gw_ingest_item *it = &items[i];
            if (it->failure)
                continue;
            gw_buf_adds(&b, first ? "{" : ",{");
            first = 0;
            ui(&b, "00081150", it->h->sop_class_uid);
            gw_buf_adds(&b, ",");
            ui(&b, "00081155", it->h->sop_instance_uid);
            gw_buf_adds(&b, ",");
            snprintf(path, sizeof(path), "/dicomweb/studies/%s/series/%s/instances/%s",
                     it->h->study_instance_uid, it->h->series_instance_uid,
                     it->h->sop_instance_uid);
            ur(&b, "00081190", base, path);
            gw_buf_adds(&b, "}");
        }
        gw_buf_adds(&b, "]}");
    }
    gw_buf_adds(&b, "}");
    const char *s = gw_buf_cstr(&b);
    char *out = s ? strdup(s) : NULL;
    gw_buf_free(&b);
    return out;
}

int gw_stow(gw_req *r)
{
    static const char *const medias[] = {"application/dicom+json", "application/json", NULL};
    static const gw_header accept_post[] = {
        {"Accept-Post", "multipart/related; type=\"application/dicom\""}, {NULL, NULL}};
    const char *study = gw_param_get(r, "study");
    const char *ct = gw_header_get(r, "Content-Type");
    gw_mp_ctype mct;
    stow_ctx c = {.r = r, .fd = -1};
    lc_err err = {0};
    char detail[700] = "";
    const char *down = NULL;
    int code = 0, accepted = 0, oom = 0, status;
    char *json = NULL;
    lc_rc rc;

    gw_db_put(r);
    if (study && !lc_dicom_uid_valid(study))
        return gw_send_problem(r, 400, NULL, "\"%.80s\" is not a valid StudyInstanceUID", study);
    int media = gw_accept_pick(r, medias, NULL, NULL);
    if (media < 0)
        return gw_send_problem(r, 406, NULL,
                               "the Store Instances Response is only available as "
                               "application/dicom+json");
    if (!ct || gw_mp_parse_ctype(ct, &mct, &err) != LC_OK ||
        strcmp(mct.media, "multipart/related") != 0)
        return gw_send_problem(r, 415, accept_post,
                               "unsupported content type \"%.100s\": send multipart/related; "
                               "type=\"application/dicom\"",
                               ct ? ct : "(none)");
    if (mct.type[0] && strcmp(mct.type, "application/dicom") != 0)
        return gw_send_problem(r, 415, accept_post,
                               "multipart type \"%.100s\" is not supported: only "
                               "application/dicom parts",
                               mct.type);
    if (!mct.boundary[0])
        return gw_send_problem(r, 400, NULL, "the Content-Type has no multipart boundary");

    const gw_mp_limits lim = {.max_parts = (int)r->g->cfg->upload_max_files,
                              .max_part_bytes = r->g->cfg->max_body_bytes,
                              .max_header_bytes = MAX_PART_HEADER_BYTES,
                              .max_preamble_bytes = MAX_PREAMBLE_BYTES};
    const gw_mp_callbacks cb = {part_begin, part_data, part_end};
    if ((rc = gw_mp_new(mct.boundary, &lim, &cb, &c, &c.mp, &err)) != LC_OK) {
        if (rc == LC_ERR_INVALID)
            code = 400;
        else
            oom = 1;
        snprintf(detail, sizeof(detail), "%s", lc_err_msg(&err));
        goto out;
    }
    rc = gw_body_read(r, r->g->cfg->max_body_bytes, body_piece, &c, NULL, &err);
    if (rc == LC_OK)
        rc = gw_mp_finish(c.mp, &err);
    if (rc != LC_OK) {
        switch (rc) {
        case LC_ERR_TOO_LARGE:
            code = 413;
            break;
        case LC_ERR_INVALID:
            code = 400;
            break;
        case LC_ERR_UNSUPPORTED:
            code = 415;
            break;
        case LC_ERR_NOMEM:
            oom = 1;
            break;
        default:
            down = "the spool directory";
            break;
        }
        snprintf(detail, sizeof(detail), "%s", lc_err_msg(&err));
        goto out;
    }
    for (int i = 0; i < c.n; i++) {
        rc = gw_ingest_check(r, &c.items[i], study, &err);
        if (rc == LC_OK)
            accepted++;
        else if (rc != LC_ERR_DICOM && rc != LC_ERR_CONFLICT) {
            down = "DICOM parsing";
            goto out;
        }
    }
    if (accepted && gw_ingest_commit(r, c.items, (size_t)c.n, "http", &err) != LC_OK) {
        down = "the object store or the database";
        goto out;
    }
    lc_counter_add(r->g->stow_stored, accepted);
    lc_counter_add(r->g->stow_failed, c.n - accepted);
    json = response_json(r, c.items, c.n, study);
    for (int i = 0; i < c.n; i++)
        if (c.items[i].failure)
            lc_log_info("stow-rs instance refused", LC_LS("part", c.items[i].name),
                        LC_LI("reason", c.items[i].failure), LC_LS("error", c.items[i].error));
out:
    if (c.fd >= 0)
        close(c.fd);
    lc_sha256_free(c.h);
    gw_mp_free(c.mp);
    gw_ingest_release(c.items, (size_t)c.n);
    free(c.items);
    gw_db_put(r);
    if (down)
        return gw_send_unavailable(r, down, &err);
    if (code)
        return gw_send_problem(r, code, NULL, "%s", detail);
    if (oom || !json) {
        /* transient: a retry stores the same objects again, which changes nothing */
        static const gw_header h[] = {{"Retry-After", "5"}, {NULL, NULL}};
        lc_log_warn("stow-rs: out of memory", LC_LI("instances", c.n));
        return gw_send_problem(r, 503, h, "the server is out of memory; retry later");
    }
    status = accepted == c.n ? 200 : accepted ? 202 : 409;
    gw_send(r, status, media == 0 ? "application/dicom+json" : "application/json", json,
            strlen(json), NULL);
    free(json);
    return status;
}
