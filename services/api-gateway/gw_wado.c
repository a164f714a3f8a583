/*
 * gw_wado.c: WADO-RS (PS3.18 10.4): instances of a study, series or one instance as
 * multipart/related; type="application/dicom", streamed from the object store part by part
 * (chunked: nothing is held in memory); metadata of all three levels as DICOM JSON from
 * instance_metadata, with relative BulkDataURIs made absolute and Pixel Data added as bulk
 * data; frames of uncompressed instances and single bulk data elements (top level, or inside
 * sequence items: every BulkDataURI the metadata hands out) as
 * multipart/related; type="application/octet-stream", read with ranged reads after
 * gw_dcmwalk.c located the element. The stored transfer syntax is served as is: an Accept
 * that asks for another one gets 406. Per-request state on a worker thread.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <libpq-fe.h>
#include "gw.h"
#include "gw_buf.h"
#include "gw_dcmwalk.h"
#include "lc/log.h"
#include "lc/util.h"

#define META_PAGE   200 /* instances per metadata query */
#define TS_IMPLICIT "1.2.840.10008.1.2"
#define TS_EXPLICIT "1.2.840.10008.1.2.1"

/* The UIDs of the path, checked; sends 400 and returns -1 when one is malformed. */
static int path_uids(gw_req *r, const char **study, const char **series, const char **sop)
{
    *study = gw_param_get(r, "study");
    *series = gw_param_get(r, "series");
    *sop = gw_param_get(r, "instance");
    const char *bad = NULL;
    if (*study && !lc_dicom_uid_valid(*study))
        bad = *study;
    else if (*series && !lc_dicom_uid_valid(*series))
        bad = *series;
    else if (*sop && !lc_dicom_uid_valid(*sop))
        bad = *sop;
    if (bad) {
        gw_send_problem(r, 400, NULL, "\"%.80s\" is not a valid UID", bad);
        return -1;
    }
    return 0;
}

/* $1 study, $2 series (NULL: any), $3 instance (NULL: any) */
#define SCOPE_WHERE                                                                                \
    " WHERE i.study_uid = $1 AND ($2::text IS NULL OR i.series_uid = $2)"                          \
    " AND ($3::text IS NULL OR i.sop_uid = $3)"
#define SCOPE_ORDER " ORDER BY i.series_uid, i.instance_number NULLS LAST, i.sop_uid"

static const char instances_sql[] =
    "SELECT i.sop_uid, i.store_key, coalesce(nullif(i.transfer_syntax_uid, ''), '" TS_IMPLICIT
    "') FROM instances i" SCOPE_WHERE SCOPE_ORDER;

/* --- streaming from the store ------------------------------------------------------------ */

static int to_client(void *ctx, const void *buf, size_t len)
{
    return gw_write(ctx, buf, len) == 0 ? 0 : 1;
}

typedef struct mem_read {
    char *buf;
    size_t cap, got;
} mem_read;

static int to_mem(void *ctx, const void *buf, size_t len)
{
    mem_read *m = ctx;
    size_t n = len < m->cap - m->got ? len : m->cap - m->got;
    memcpy(m->buf + m->got, buf, n);
    m->got += n;
    return 0;
}

typedef struct obj_ctx {
    lc_store *store;
    const char *key;
} obj_ctx;

static int64_t read_at(void *ctx, int64_t off, void *buf, size_t len)
{
    obj_ctx *o = ctx;
    mem_read m = {buf, len, 0};
    lc_err err = {0};
    if (lc_store_read(o->store, o->key, off, (int64_t)len, to_mem, &m, &err) != LC_OK)
        return -1;
    return (int64_t)m.got;
}

static void boundary_new(char out[40])
{
    char id[LC_UUID_LEN + 1];
    lc_uuid_v4(id);
    snprintf(out, 40, "radpipe-%.28s", id);
}

/* --- retrieve ---------------------------------------------------------------------------- */

int gw_wado_retrieve(gw_req *r)
{
    static const char *const medias[] = {"multipart/related", NULL};
    const char *study, *series, *sop;
    char type[128], ts[128], boundary[40], ctype[160], head[400];
    lc_db *db = NULL;
    PGresult *res = NULL;
    lc_err err = {0};
    int status = 200;

    if (path_uids(r, &study, &series, &sop) != 0)
        return 400;
    if (gw_accept_pick(r, medias, type, ts) < 0 ||
        (type[0] && strcasecmp(type, "application/dicom") != 0))
        return gw_send_problem(r, 406, NULL,
                               "instances are available as multipart/related; "
                               "type=\"application/dicom\" only");
    const char *p[3] = {study, series, sop};
    if (gw_db(r, &db, &err) != LC_OK || lc_db_exec(db, instances_sql, 3, p, &res, &err) != LC_OK)
        return gw_send_unavailable(r, "the database", &err);
    gw_db_put(r);
    int n = PQntuples(res);
    if (n == 0) {
        PQclear(res);
        return gw_send_problem(r, 404, NULL, "no such %s",
                               sop      ? "instance"
                               : series ? "series"
                                        : "study");
    }
    /* the stored syntax is served as is; a specific other one cannot be */
    for (int i = 0; ts[0] && strcmp(ts, "*") != 0 && i < n; i++) {
        if (strcmp(ts, PQgetvalue(res, i, 2)) != 0) {
            PQclear(res);
            return gw_send_problem(r, 406, NULL,
                                   "instance %s is stored as %s and is not transcoded; ask for "
                                   "transfer-syntax=* or that syntax",
                                   PQgetvalue(res, i, 0), PQgetvalue(res, i, 2));
        }
    }
    boundary_new(boundary);
    snprintf(ctype, sizeof(ctype), "multipart/related; type=\"application/dicom\"; boundary=%s",
             boundary);
    gw_send_head(r, 200, ctype, -1, NULL);
    for (int i = 0; i < n && !r->gone; i++) {
        const char *key = PQgetvalue(res, i, 1);
        lc_store_stat st;
        if (lc_store_head(r->g->deps.store, key, &st, &err) != LC_OK) {
            lc_log_warn("wado-rs: stored instance unreadable", LC_LS("key", key),
                        LC_LS("error", lc_err_msg(&err)));
            r->gone = 1; /* cut the response: the client sees a truncated body */
            break;
        }
        int hn = snprintf(head, sizeof(head),
                          "%s--%s\r\nContent-Type: application/dicom; transfer-syntax=%s\r\n"
                          "Content-Length: %lld\r\n\r\n",
                          i ? "\r\n" : "", boundary, PQgetvalue(res, i, 2), (long long)st.size);
        if (gw_write(r, head, (size_t)hn) != 0)
            break;
        lc_rc rc = lc_store_read(r->g->deps.store, key, 0, -1, to_client, r, &err);
        if (rc != LC_OK && !r->gone) {
            lc_log_warn("wado-rs: could not stream an instance", LC_LS("key", key),
                        LC_LS("error", lc_err_msg(&err)));
            r->gone = 1;
        }
    }
    if (!r->gone) {
        int hn = snprintf(head, sizeof(head), "\r\n--%s--\r\n", boundary);
        gw_write(r, head, (size_t)hn);
        gw_end(r);
    } else {
        gw_abort(r);
    }
    PQclear(res);
    return status;
}

/* --- metadata ---------------------------------------------------------------------------- */

static const char meta_sql[] =
    "SELECT i.sop_uid, i.series_uid, m.json::text, coalesce(nullif(i.transfer_syntax_uid, ''), "
    "'" TS_IMPLICIT "'), i.rows, i.bits_allocated, i.sop_class_uid, i.study_uid"
    " FROM instances i LEFT JOIN instance_metadata m ON m.sop_uid = i.sop_uid" SCOPE_WHERE
        SCOPE_ORDER " LIMIT $5::bigint OFFSET $4::bigint";

/* Relative BulkDataURIs made absolute (gw.h). The indexer stores "bulk/<tag>" for top-level
 * elements and "bulk/<seq>/<item>/<tag>..." for elements inside sequence items (lc/dicom.h);
 * the gateway serves both at one path segment, .../bulk/<seq>.<item>.<tag>... (gw_wado_bulk),
 * so every URI handed out here can be fetched. */
void gw_bulk_uris_absolute(cJSON *node, const char *inst_url)
{
    for (cJSON *c = node ? node->child : NULL; c; c = c->next) {
        if (cJSON_IsString(c) && c->string && strcmp(c->string, "BulkDataURI") == 0 &&
            !strstr(c->valuestring, "://") && c->valuestring[0] != '/') {
            gw_buf u = {0};
            gw_buf_addf(&u, "%s/", inst_url);
            const char *rel = c->valuestring;
            if (strncmp(rel, "bulk/", 5) == 0) {
                gw_buf_adds(&u, "bulk/");
                for (const char *p = rel + 5; *p; p++)
                    gw_buf_add(&u, *p == '/' ? "." : p, 1);
            } else {
                gw_buf_adds(&u, rel);
            }
            const char *v = gw_buf_cstr(&u);
            if (v) {
                char *dup = strdup(v);
                if (dup) {
                    free(c->valuestring);
                    c->valuestring = dup;
                }
            }
            gw_buf_free(&u);
        } else if (cJSON_IsObject(c) || cJSON_IsArray(c)) {
            gw_bulk_uris_absolute(c, inst_url);
        }
    }
}

static void put_uid(cJSON *j, const char *key, const char *uid)
{
    if (cJSON_GetObjectItemCaseSensitive(j, key) || !uid)
        return;
    cJSON *e = cJSON_AddObjectToObject(j, key);
    cJSON_AddStringToObject(e, "vr", "UI");
    cJSON *v = cJSON_AddArrayToObject(e, "Value");
    cJSON_AddItemToArray(v, cJSON_CreateString(uid));
}

/* One instance's metadata as JSON text (caller frees). */
static char *instance_metadata(PGresult *res, int i, const char *base)
{
    const char *sop = PQgetvalue(res, i, 0), *series = PQgetvalue(res, i, 1);
    const char *ts = PQgetvalue(res, i, 3), *study = PQgetvalue(res, i, 7);
    char url[1024];
    snprintf(url, sizeof(url), "%s/dicomweb/studies/%s/series/%s/instances/%s", base, study, series,
             sop);
    cJSON *j = PQgetisnull(res, i, 2) ? NULL : cJSON_Parse(PQgetvalue(res, i, 2));
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        j = cJSON_CreateObject(); /* not indexed in full yet: the identity at least */
    }
    if (!j)
        return NULL;
    put_uid(j, "00080016", PQgetisnull(res, i, 6) ? NULL : PQgetvalue(res, i, 6));
    put_uid(j, "00080018", sop);
    put_uid(j, "0020000D", study);
    put_uid(j, "0020000E", series);
    gw_bulk_uris_absolute(j, url);
    /* Pixel Data is never stored in the metadata: point at it as bulk data */
    if (!PQgetisnull(res, i, 4) && !cJSON_GetObjectItemCaseSensitive(j, "7FE00010")) {
        int uncompressed = strcmp(ts, TS_IMPLICIT) == 0 || strcmp(ts, TS_EXPLICIT) == 0;
        int bits = PQgetisnull(res, i, 5) ? 16 : atoi(PQgetvalue(res, i, 5));
        cJSON *e = cJSON_AddObjectToObject(j, "7FE00010");
        char bulk[1100];
        snprintf(bulk, sizeof(bulk), "%s/bulk/7FE00010", url);
        cJSON_AddStringToObject(e, "vr", uncompressed && bits > 8 ? "OW" : "OB");
        cJSON_AddStringToObject(e, "BulkDataURI", bulk);
    }
    char *out = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    return out;
}

int gw_wado_metadata(gw_req *r)
{
    static const char *const medias[] = {"application/dicom+json", "application/json", NULL};
    const char *study, *series, *sop;
    char base[600], off[24], page[24];
    lc_db *db = NULL;
    PGresult *res = NULL;
    lc_err err = {0};
    long long offset = 0;
    int started = 0;

    if (path_uids(r, &study, &series, &sop) != 0)
        return 400;
    int media = gw_accept_pick(r, medias, NULL, NULL);
    if (media < 0)
        return gw_send_problem(r, 406, NULL, "metadata is available as application/dicom+json");
    gw_base_url(r, base, sizeof(base));
    snprintf(page, sizeof(page), "%d", META_PAGE);
    for (;;) {
        snprintf(off, sizeof(off), "%lld", offset);
        const char *p[5] = {study, series, sop, off, page};
        if (gw_db(r, &db, &err) != LC_OK || lc_db_exec(db, meta_sql, 5, p, &res, &err) != LC_OK) {
            if (!started)
                return gw_send_unavailable(r, "the database", &err);
            lc_log_warn("wado-rs metadata: database failed mid-answer",
                        LC_LS("error", lc_err_msg(&err)));
            gw_abort(r);
            return 200;
        }
        gw_db_put(r); /* not held while the client reads */
        int n = PQntuples(res);
        if (!started) {
            if (n == 0) {
                PQclear(res);
                return gw_send_problem(r, 404, NULL, "no such %s",
                                       sop      ? "instance"
                                       : series ? "series"
                                                : "study");
            }
            gw_send_head(r, 200, media == 0 ? "application/dicom+json" : "application/json", -1,
                         NULL);
            gw_write(r, "[", 1);
            started = 1;
        }
        for (int i = 0; i < n && !r->gone; i++) {
            char *one = instance_metadata(res, i, base);
            if (!one) {
                gw_abort(r);
                break;
            }
            if (offset + i > 0)
                gw_write(r, ",", 1);
            gw_write(r, one, strlen(one));
            free(one);
        }
        PQclear(res);
        res = NULL;
        offset += n;
        if (n < META_PAGE || r->gone)
            break;
    }
    gw_write(r, "]", 1);
    gw_end(r);
    return 200;
}

/* --- frames and bulk data ---------------------------------------------------------------- */

static const char one_sql[] =
    "SELECT i.store_key, coalesce(nullif(i.transfer_syntax_uid, ''), '" TS_IMPLICIT "'),"
    " i.rows, i.columns, i.bits_allocated, coalesce(i.number_of_frames, 1)"
    " FROM instances i" SCOPE_WHERE;

/* Send ranges [off[k], off[k] + len) of the object as one multipart/related;
 * type="application/octet-stream" response. */
static int send_ranges(gw_req *r, const char *key, const int64_t *off, int64_t len, int n,
                       const char *ts)
{
    char boundary[40], ctype[200], head[300];
    lc_err err = {0};
    boundary_new(boundary);
    snprintf(ctype, sizeof(ctype),
             "multipart/related; type=\"application/octet-stream\"; transfer-syntax=%s; "
             "boundary=%s",
             ts, boundary);
    gw_send_head(r, 200, ctype, -1, NULL);
    for (int k = 0; k < n && !r->gone; k++) {
        int hn = snprintf(head, sizeof(head),
                          "%s--%s\r\nContent-Type: application/octet-stream; transfer-syntax=%s"
                          "\r\nContent-Length: %lld\r\n\r\n",
                          k ? "\r\n" : "", boundary, ts, (long long)len);
        if (gw_write(r, head, (size_t)hn) != 0)
            break;
        if (lc_store_read(r->g->deps.store, key, off[k], len, to_client, r, &err) != LC_OK &&
            !r->gone) {
            lc_log_warn("wado-rs: could not read stored bytes", LC_LS("key", key),
                        LC_LS("error", lc_err_msg(&err)));
            gw_abort(r);
        }
    }
    if (!r->gone) {
        int hn = snprintf(head, sizeof(head), "\r\n--%s--\r\n", boundary);
        gw_write(r, head, (size_t)hn);
        gw_end(r);
    }
    return 200;
}

/* Accept check shared by frames and bulk data. */
static int octets_acceptable(gw_req *r)
{
    static const char *const medias[] = {"multipart/related", NULL};
    char type[128], ts[128];
    if (gw_accept_pick(r, medias, type, ts) < 0 ||
        (type[0] && strcasecmp(type, "application/octet-stream") != 0) ||
        (ts[0] && strcmp(ts, "*") != 0 && strcmp(ts, TS_EXPLICIT) != 0)) {
        gw_send_problem(r, 406, NULL,
                        "frames and bulk data are available as multipart/related; "
                        "type=\"application/octet-stream\" (explicit VR little endian) only");
        return 0;
    }
    return 1;
}

/* The instance row of the path, or NULL after an answer (404/503, in *status) was sent. */
static PGresult *one_instance(gw_req *r, const char *study, const char *series, const char *sop,
                              int *status)
{
    lc_db *db = NULL;
    PGresult *res = NULL;
    lc_err err = {0};
    const char *p[3] = {study, series, sop};
    if (gw_db(r, &db, &err) != LC_OK || lc_db_exec(db, one_sql, 3, p, &res, &err) != LC_OK) {
        *status = gw_send_unavailable(r, "the database", &err);
        return NULL;
    }
    gw_db_put(r);
    if (PQntuples(res) != 1) {
        PQclear(res);
        *status = gw_send_problem(r, 404, NULL, "no such instance");
        return NULL;
    }
    return res;
}

/* Locate the element at a path of n tags (gw_dcm_find_path) in the stored object; sends the
 * error answer and returns its status (0: found). */
static int locate(gw_req *r, const char *key, const uint32_t *tags, const int *items, int n,
                  gw_dcm_elem *e)
{
    lc_store_stat st;
    lc_err err = {0};
    obj_ctx o = {r->g->deps.store, key};
    memset(e, 0, sizeof(*e));
    lc_rc rc = lc_store_head(r->g->deps.store, key, &st, &err);
    if (rc == LC_OK)
        rc = gw_dcm_find_path(read_at, &o, st.size, tags, items, n, e, &err);
    if (rc == LC_OK)
        return 0;
    if (rc == LC_ERR_NOT_FOUND)
        return gw_send_problem(r, 404, NULL, "the instance has no element %08X%s: %s", tags[n - 1],
                               n > 1 ? " at that path" : "", lc_err_msg(&err));
    if (rc == LC_ERR_UNSUPPORTED)
        return gw_send_problem(r, 406, NULL, "%s", lc_err_msg(&err));
    if (rc == LC_ERR_DICOM)
        return gw_send_problem(r, 500, NULL, "the stored instance is malformed: %s",
                               lc_err_msg(&err));
    return gw_send_unavailable(r, "the object store", &err);
}

int gw_wado_frames(gw_req *r)
{
    const char *study, *series, *sop, *list = gw_param_get(r, "frames");
    int64_t *offs = NULL;
    int nreq = 0, want[1000];
    gw_dcm_elem e;

    if (path_uids(r, &study, &series, &sop) != 0)
        return 400;
    /* "1,2,5": positive frame numbers; no empty item (",1", "1,,2", "1,") */
    for (const char *p = list ? list : ""; *p;) {
        size_t len = strspn(p, "0123456789");
        if (len == 0 || len > 9 || (p[len] && p[len] != ',') || (p[len] == ',' && !p[len + 1]) ||
            nreq >= 1000 || *p == '0')
            return gw_send_problem(r, 400, NULL,
                                   "frame list must be 1 to 1000 frame numbers (1, 2, ...) "
                                   "separated by commas");
        want[nreq++] = atoi(p);
        p += len + (p[len] == ',');
    }
    if (nreq == 0)
        return gw_send_problem(r, 400, NULL, "no frame numbers");
    if (!octets_acceptable(r))
        return 406;
    int status = 0;
    PGresult *res = one_instance(r, study, series, sop, &status);
    if (!res)
        return status;
    const char *key = PQgetvalue(res, 0, 0), *ts = PQgetvalue(res, 0, 1);
    if (strcmp(ts, TS_IMPLICIT) != 0 && strcmp(ts, TS_EXPLICIT) != 0) {
        status = gw_send_problem(r, 406, NULL,
                                 "the instance is stored compressed (%s): frames are served for "
                                 "uncompressed instances only; retrieve the instance instead",
                                 ts);
        goto out;
    }
    if (PQgetisnull(res, 0, 2) || PQgetisnull(res, 0, 3) || PQgetisnull(res, 0, 4)) {
        status = gw_send_problem(r, 404, NULL, "the instance is not an image");
        goto out;
    }
    long long rows = atoll(PQgetvalue(res, 0, 2)), cols = atoll(PQgetvalue(res, 0, 3));
    int bits = atoi(PQgetvalue(res, 0, 4)), nframes = atoi(PQgetvalue(res, 0, 5));
    if (nframes < 1)
        nframes = 1;
    if (bits % 8 != 0 || bits <= 0 || rows <= 0 || cols <= 0) {
        status = gw_send_problem(r, 406, NULL, "frames of %d-bit pixels are not served", bits);
        goto out;
    }
    for (int k = 0; k < nreq; k++) {
        if (want[k] > nframes) {
            status = gw_send_problem(r, 404, NULL, "frame %d does not exist (the instance has %d)",
                                     want[k], nframes);
            goto out;
        }
    }
    const uint32_t pixel_data = 0x7FE00010;
    if ((status = locate(r, key, &pixel_data, NULL, 1, &e)) != 0)
        goto out;
    long long pix = rows * cols * (bits / 8);
    long long spp = e.length >= 0 ? e.length / ((long long)nframes * pix) : 0;
    if (e.length < 0 || (spp != 1 && spp != 3) || spp * nframes * pix > e.length) {
        status = gw_send_problem(r, 500, NULL,
                                 "the stored pixel data does not match the image's dimensions");
        goto out;
    }
    long long fsize = spp * pix;
    if (!(offs = calloc((size_t)nreq, sizeof(*offs)))) {
        status = gw_send_problem(r, 500, NULL, "out of memory");
        goto out;
    }
    for (int k = 0; k < nreq; k++)
        offs[k] = e.value_offset + (int64_t)(want[k] - 1) * fsize;
    status = send_ranges(r, key, offs, fsize, nreq, TS_EXPLICIT);
out:
    free(offs);
    PQclear(res);
    return status;
}

/* An element path "GGGGEEEE" or "GGGGEEEE.<item>.GGGGEEEE..." (items 0-based, as the
 * metadata's BulkDataURIs spell them) into tags and items; the number of tags, 0 when
 * malformed. Item delimiters (FFFExxxx) are not elements. */
static int parse_tag_path(const char *s, uint32_t *tags, int *items)
{
    int n = 0;
    for (const char *p = s;;) {
        if (n >= GW_DCM_MAX_PATH || strspn(p, "0123456789abcdefABCDEF") != 8 ||
            (p[8] && p[8] != '.'))
            return 0;
        char hex[9];
        memcpy(hex, p, 8);
        hex[8] = '\0';
        tags[n] = (uint32_t)strtoul(hex, NULL, 16);
        if ((tags[n] >> 16) == 0xFFFE)
            return 0;
        n++;
        if (!p[8])
            return n;
        p += 9;
        size_t len = strspn(p, "0123456789");
        if (len == 0 || len > 6 || p[len] != '.' || (len > 1 && *p == '0'))
            return 0;
        items[n - 1] = atoi(p);
        p += len + 1;
    }
}

int gw_wado_bulk(gw_req *r)
{
    const char *study, *series, *sop, *tagp = gw_param_get(r, "tag");
    uint32_t tags[GW_DCM_MAX_PATH];
    int items[GW_DCM_MAX_PATH], ntags;
    gw_dcm_elem e;

    if (path_uids(r, &study, &series, &sop) != 0)
        return 400;
    if (!tagp || !(ntags = parse_tag_path(tagp, tags, items)))
        return gw_send_problem(r, 400, NULL,
                               "\"%.80s\" is not an element path: a tag (8 hex digits), or "
                               "sequence.item.tag... as in the metadata's BulkDataURIs (at "
                               "most %d tags)",
                               tagp ? tagp : "", GW_DCM_MAX_PATH);
    if (!octets_acceptable(r))
        return 406;
    int status = 0;
    PGresult *res = one_instance(r, study, series, sop, &status);
    if (!res)
        return status;
    const char *key = PQgetvalue(res, 0, 0);
    if ((status = locate(r, key, tags, items, ntags, &e)) != 0)
        goto out;
    if (e.length < 0) {
        status = gw_send_problem(r, 406, NULL,
                                 "%s is encapsulated (compressed) or of undefined length: "
                                 "retrieve the instance instead",
                                 tagp);
        goto out;
    }
    int64_t off = e.value_offset;
    status = send_ranges(r, key, &off, e.length, 1, TS_EXPLICIT);
out:
    PQclear(res);
    return status;
}
