/*
 * gw_instances.c: POST /api/v1/instances: one DICOM Part 10 file per request. The body is
 * spooled (size limit, SHA-256), its header parsed, the file moved into the object store
 * under instances/<study>/<series>/<sop>.dcm, and a radpipe.instance.stored event written to
 * the outbox in its own transaction; the dicom-indexer does the indexing. Storing again under
 * the same SOP Instance UID replaces the object, so a client may retry any failure.
 * Runs on civetweb worker threads; all state is per request.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include "gw.h"
#include "lc/dicom.h"
#include "lc/event.h"
#include "lc/kafka.h"
#include "lc/log.h"
#include "lc/outbox.h"
#include "lc/util.h"

/* 1 when the Content-Type's media type (parameters ignored) is type, case-insensitively. */
static int media_type_is(const char *ct, const char *type)
{
    size_t n = strlen(type);
    if (!ct)
        return 0;
    while (*ct == ' ' || *ct == '\t')
        ct++;
    if (strncasecmp(ct, type, n) != 0)
        return 0;
    ct += n;
    while (*ct == ' ' || *ct == '\t')
        ct++;
    return *ct == '\0' || *ct == ';';
}

typedef struct outbox_ctx {
    const char *prefix;
    const lc_event *ev;
} outbox_ctx;

static lc_rc outbox_tx(lc_db *db, void *arg, lc_err *err)
{
    const outbox_ctx *c = arg;
    return lc_outbox_add_event(db, c->prefix, LC_TOPIC_INSTANCE_STORED, c->ev, err);
}

/* The radpipe.instance.stored event for an object now in the store (see proto/events). */
static lc_rc stored_event(gw_req *r, const lc_dicom_header *h, const char *key, const gw_body *body,
                          const char *received_at, lc_event **out, lc_err *err)
{
    const char *base = lc_store_url(r->g->deps.store);
    size_t bl = strlen(base);
    char *url = NULL;
    if (asprintf(&url, "%s%s%s", base, bl && base[bl - 1] == '/' ? "" : "/", key) < 0)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    cJSON *d = cJSON_CreateObject(), *src = NULL; /* src is owned by d */
    if (!d || !cJSON_AddStringToObject(d, "study_instance_uid", h->study_instance_uid) ||
        !cJSON_AddStringToObject(d, "series_instance_uid", h->series_instance_uid) ||
        !cJSON_AddStringToObject(d, "sop_instance_uid", h->sop_instance_uid) ||
        !cJSON_AddStringToObject(d, "sop_class_uid", h->sop_class_uid ? h->sop_class_uid : "") ||
        !cJSON_AddStringToObject(d, "url", url) ||
        !cJSON_AddNumberToObject(d, "size", (double)body->size) ||
        !cJSON_AddStringToObject(d, "sha256", body->sha256) ||
        !(src = cJSON_AddObjectToObject(d, "source")) ||
        !cJSON_AddStringToObject(src, "kind", "http") ||
        !cJSON_AddStringToObject(d, "received_at", received_at)) {
        cJSON_Delete(d);
        free(url);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    free(url);
    return lc_event_new(LC_EV_INSTANCE_STORED, r->g->deps.source, h->study_instance_uid, d, out,
                        err);
}

/* Failures are answered only after the spool file is gone, so a client that looks right after
 * its answer never finds a leftover (and a crash between the two leaves nothing behind that
 * the answer did not already admit). */
int gw_instances_post(gw_req *r)
{
    const char *ct = gw_header_get(r, "Content-Type");
    gw_body body = {0};
    lc_dicom_header *h = NULL;
    lc_event *ev = NULL;
    lc_db *db = NULL;
    lc_err err = {0};
    cJSON *ok = NULL;
    char key[512], received_at[32], detail[700] = "";
    const char *down = NULL; /* the dependency that failed: 503 */
    int code = 0;            /* a client error to answer */
    lc_rc rc;

    gw_db_put(r); /* no connection is held while a large body streams in */
    if (!media_type_is(ct, "application/dicom")) {
        static const gw_header hd[] = {{"Accept-Post", "application/dicom"}, {NULL, NULL}};
        return gw_send_problem(r, 415, hd,
                               "unsupported content type \"%.100s\": send one DICOM file as "
                               "application/dicom",
                               ct ? ct : "(none)");
    }
    rc = gw_body_spool(r, r->g->cfg->max_body_bytes, &body, &err);
    if (rc == LC_ERR_TOO_LARGE || rc == LC_ERR_INVALID) {
        code = rc == LC_ERR_TOO_LARGE ? 413 : 400;
        snprintf(detail, sizeof(detail), "%s", lc_err_msg(&err));
        goto out;
    } else if (rc != LC_OK) {
        down = "the spool directory";
        goto out;
    }
    lc_time_rfc3339(lc_wall_ms(), received_at);
    if (body.size == 0) {
        code = 400;
        snprintf(detail, sizeof(detail), "body is not a DICOM file: the body is empty");
        goto out;
    }
    rc = lc_dicom_read_header(body.path, &h, &err);
    if (rc == LC_ERR_DICOM || rc == LC_ERR_INVALID) {
        code = 400;
        snprintf(detail, sizeof(detail), "body is not a DICOM file: %s", lc_err_msg(&err));
        goto out;
    } else if (rc != LC_OK) {
        down = "DICOM parsing";
        goto out;
    }
    static const char *const names[] = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"};
    const char *uids[] = {h->study_instance_uid, h->series_instance_uid, h->sop_instance_uid};
    for (int i = 0; i < 3; i++) {
        if (!lc_dicom_uid_valid(uids[i])) {
            code = 400;
            snprintf(detail, sizeof(detail), "invalid %s \"%.80s\" in the DICOM file", names[i],
                     uids[i] ? uids[i] : "");
            goto out;
        }
    }
    snprintf(key, sizeof(key), "instances/%s/%s/%s.dcm", uids[0], uids[1], uids[2]);
    if (lc_store_put_file(r->g->deps.store, key, body.path, LC_STORE_MOVE, &err) != LC_OK) {
        down = "the object store";
        goto out;
    }
    gw_body_discard(&body); /* gone already when it was renamed into place */
    if (stored_event(r, h, key, &body, received_at, &ev, &err) != LC_OK) {
        down = "event creation";
        goto out;
    }
    outbox_ctx oc = {r->g->deps.topic_prefix, ev};
    if (gw_db(r, &db, &err) != LC_OK || lc_db_tx(db, 3, outbox_tx, &oc, &err) != LC_OK) {
        down = "the database";
        goto out;
    }
    ok = cJSON_CreateObject();
    cJSON_AddStringToObject(ok, "study_instance_uid", uids[0]);
    cJSON_AddStringToObject(ok, "series_instance_uid", uids[1]);
    cJSON_AddStringToObject(ok, "sop_instance_uid", uids[2]);
    cJSON_AddNumberToObject(ok, "size", (double)body.size);
    cJSON_AddStringToObject(ok, "sha256", body.sha256);
    lc_log_debug("instance stored", LC_LS("key", key), LC_LI("size", body.size),
                 LC_LS("token", r->token_name));
out:
    gw_body_discard(&body);
    lc_dicom_header_free(h);
    lc_event_free(ev);
    gw_db_put(r);
    if (down)
        return gw_send_unavailable(r, down, &err);
    if (code)
        return gw_send_problem(r, code, NULL, "%s", detail);
    return gw_send_json(r, 202, ok);
}
