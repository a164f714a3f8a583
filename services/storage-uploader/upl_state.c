/*
 * upl_state.c: the resume state of multipart uploads in PostgreSQL (upload_multipart,
 * upload_parts: proto/sql/004_upload_resume.sql). Every statement stands alone (autocommit):
 * a part is recorded as soon as the store acknowledged it. Runs on the job's connection, so
 * on the worker thread only.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lc/util.h"
#include "upl.h"

void upl_resume_free(upl_resume *r)
{
    free(r->upload_id);
    free(r->digest);
    free(r->parts);
    memset(r, 0, sizeof(*r));
}

lc_rc upl_state_load(lc_db *db, const char *dest, const char *key, upl_resume *r, lc_err *err)
{
    PGresult *res = NULL;
    const char *p[2] = {dest, key};
    memset(r, 0, sizeof(*r));
    lc_rc rc = lc_db_exec(db,
                          "SELECT upload_id, digest, part_size FROM upload_multipart "
                          "WHERE destination = $1 AND object_key = $2",
                          2, p, &res, err);
    if (rc != LC_OK)
        return rc;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return LC_OK;
    }
    r->upload_id = strdup(PQgetvalue(res, 0, 0));
    r->digest = strdup(PQgetvalue(res, 0, 1));
    r->part_size = strtoll(PQgetvalue(res, 0, 2), NULL, 10);
    PQclear(res);
    res = NULL;
    if (!r->upload_id || !r->digest) {
        upl_resume_free(r);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    rc = lc_db_exec(db,
                    "SELECT part_number, size_bytes, etag, sha256 FROM upload_parts "
                    "WHERE destination = $1 AND object_key = $2 ORDER BY part_number",
                    2, p, &res, err);
    if (rc != LC_OK) {
        upl_resume_free(r);
        return rc;
    }
    int n = PQntuples(res);
    if (n > 0 && !(r->parts = calloc((size_t)n, sizeof(*r->parts)))) {
        PQclear(res);
        upl_resume_free(r);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    for (int i = 0; i < n; i++) {
        lc_store_part *pt = &r->parts[i];
        pt->number = atoi(PQgetvalue(res, i, 0));
        pt->size = strtoll(PQgetvalue(res, i, 1), NULL, 10);
        lc_strlcpy(pt->etag, PQgetvalue(res, i, 2), sizeof(pt->etag));
        lc_strlcpy(pt->sha256, PQgetvalue(res, i, 3), sizeof(pt->sha256));
    }
    r->nparts = (size_t)n;
    PQclear(res);
    return LC_OK;
}

lc_rc upl_state_begin(lc_db *db, const char *dest, const char *key, const char *upload_id,
                      const char *digest, int64_t part_size, const char *job_id, lc_err *err)
{
    char ps[24];
    snprintf(ps, sizeof(ps), "%lld", (long long)part_size);
    const char *p[6] = {dest, key, upload_id, digest, ps, job_id};
    /* a new upload replaces any older record (and, by cascade, its parts) */
    lc_rc rc = upl_state_clear(db, dest, key, err);
    if (rc != LC_OK)
        return rc;
    return lc_db_exec(db,
                      "INSERT INTO upload_multipart (destination, object_key, upload_id, digest, "
                      "part_size, job_id) VALUES ($1, $2, $3, $4, $5, $6)",
                      6, p, NULL, err);
}

lc_rc upl_state_part(lc_db *db, const char *dest, const char *key, const lc_store_part *pt,
                     lc_err *err)
{
    char num[16], size[24];
    snprintf(num, sizeof(num), "%d", pt->number);
    snprintf(size, sizeof(size), "%lld", (long long)pt->size);
    const char *p[6] = {dest, key, num, size, pt->etag, pt->sha256};
    return lc_db_exec(db,
                      "INSERT INTO upload_parts (destination, object_key, part_number, size_bytes, "
                      "etag, sha256) VALUES ($1, $2, $3, $4, $5, $6) "
                      "ON CONFLICT (destination, object_key, part_number) DO UPDATE SET "
                      "size_bytes = EXCLUDED.size_bytes, etag = EXCLUDED.etag, "
                      "sha256 = EXCLUDED.sha256",
                      6, p, NULL, err);
}

lc_rc upl_state_clear(lc_db *db, const char *dest, const char *key, lc_err *err)
{
    const char *p[2] = {dest, key};
    return lc_db_exec(db, "DELETE FROM upload_multipart WHERE destination = $1 AND object_key = $2",
                      2, p, NULL, err);
}
