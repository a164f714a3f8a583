/*
 * gw_instances.c: POST /api/v1/instances: one DICOM Part 10 file per request
 * (application/dicom), or a zip of them (application/zip, gw_zip.c). The body is spooled
 * (size limit, SHA-256), checked, then stored and announced through gw_ingest.c.
 * Runs on civetweb worker threads; all state is per request.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gw.h"
#include "lc/util.h"

/* Failures are answered only after the spool file is gone, so a client that looks right after
 * its answer never finds a leftover (and a crash between the two leaves nothing behind that
 * the answer did not already admit). */
int gw_instances_post(gw_req *r)
{
    const char *ct = gw_header_get(r, "Content-Type");
    gw_body body = {0};
    gw_ingest_item it = {0};
    lc_err err = {0};
    cJSON *ok = NULL;
    char detail[700] = "";
    const char *down = NULL; /* the dependency that failed: 503 */
    int code = 0;            /* a client error to answer */
    lc_rc rc;

    gw_db_put(r); /* no connection is held while a large body streams in */
    if (gw_media_type_is(ct, "application/zip"))
        return gw_zip_post(r);
    if (!gw_media_type_is(ct, "application/dicom")) {
        static const gw_header hd[] = {{"Accept-Post", "application/dicom, application/zip"},
                                       {NULL, NULL}};
        return gw_send_problem(r, 415, hd,
                               "unsupported content type \"%.100s\": send one DICOM file as "
                               "application/dicom or a zip of DICOM files as application/zip",
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
    lc_strlcpy(it.path, body.path, sizeof(it.path));
    body.path[0] = '\0'; /* owned by the item now */
    it.size = body.size;
    memcpy(it.sha256, body.sha256, sizeof(it.sha256));
    rc = gw_ingest_check(r, &it, NULL, &err);
    if (rc == LC_ERR_DICOM) {
        code = 400;
        snprintf(detail, sizeof(detail), "body is %s", it.error);
        goto out;
    } else if (rc != LC_OK) {
        down = "DICOM parsing";
        goto out;
    }
    if (gw_ingest_commit(r, &it, 1, "http", &err) != LC_OK) {
        down = it.path[0] ? "the object store" : "the database";
        goto out;
    }
    ok = cJSON_CreateObject();
    cJSON_AddStringToObject(ok, "study_instance_uid", it.h->study_instance_uid);
    cJSON_AddStringToObject(ok, "series_instance_uid", it.h->series_instance_uid);
    cJSON_AddStringToObject(ok, "sop_instance_uid", it.h->sop_instance_uid);
    cJSON_AddNumberToObject(ok, "size", (double)it.size);
    cJSON_AddStringToObject(ok, "sha256", it.sha256);
out:
    gw_body_discard(&body);
    gw_ingest_release(&it, 1);
    gw_db_put(r);
    if (down)
        return gw_send_unavailable(r, down, &err);
    if (code)
        return gw_send_problem(r, code, NULL, "%s", detail);
    return gw_send_json(r, 202, ok);
}
