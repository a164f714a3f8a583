/*
 * gw_qido_http.c: QIDO-RS (PS3.18 10.6) over HTTP: the six search resources under
 * /dicomweb, answered as application/dicom+json (PS3.18 Annex F) with the attributes each
 * level requires (gw_qido.c decides which, and builds the SQL). PN values are split into their
 * Alphabetic/Ideographic/Phonetic groups, IS and US values become JSON numbers, multi-valued
 * strings JSON arrays. More results than the limit, or fuzzymatching=true (accepted, but
 * matching stays literal): a Warning header says so.
 * Per-request state on a worker thread.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <civetweb.h>
#include <libpq-fe.h>
#include "gw.h"
#include "gw_buf.h"
#include "gw_qido.h"
#include "lc/log.h"
#include "lc/util.h"

static int resolve_keyword(const char *kw, unsigned *tag)
{
    return lc_dicom_keyword_tag(kw, tag, NULL) == LC_OK;
}

/* An IS/US text value as a JSON number when it is an integer, else as a string. */
static void number_or_string(gw_buf *b, const char *v, size_t n)
{
    char tmp[32];
    size_t i = 0, j = n;
    while (i < j && v[i] == ' ')
        i++;
    while (j > i && v[j - 1] == ' ')
        j--;
    size_t k = i + (i < j && (v[i] == '-' || v[i] == '+'));
    int ok = k < j && j - k <= 15;
    for (size_t p = k; ok && p < j; p++)
        ok = v[p] >= '0' && v[p] <= '9';
    if (ok) {
        memcpy(tmp, v + i, j - i);
        tmp[j - i] = '\0';
        gw_buf_addf(b, "%lld", strtoll(tmp, NULL, 10));
    } else {
        gw_buf_json_str(b, v, n);
    }
}

/* One PN value: "Alphabetic=Ideographic=Phonetic". */
static void person_name(gw_buf *b, const char *v, size_t n)
{
    static const char *const groups[] = {"Alphabetic", "Ideographic", "Phonetic"};
    int first = 1;
    gw_buf_adds(b, "{");
    for (int g = 0; g < 3; g++) {
        const char *eq = memchr(v, '=', n);
        size_t len = eq ? (size_t)(eq - v) : n;
        if (len) {
            gw_buf_addf(b, "%s\"%s\":", first ? "" : ",", groups[g]);
            gw_buf_json_str(b, v, len);
            first = 0;
        }
        if (!eq)
            break;
        n -= len + 1;
        v = eq + 1;
    }
    gw_buf_adds(b, "}");
}

/* "GGGGEEEE": {"vr": vr[, "Value": [...]]} for text value v (NULL or "" = no value). */
static void element(gw_buf *b, unsigned tag, const char *vr, const char *v)
{
    gw_buf_addf(b, "\"%08X\":{\"vr\":\"%s\"", tag, vr);
    if (v && *v) {
        if (strcmp(vr, "SQ") == 0) {
            /* stored as DICOM JSON items by the indexer */
            gw_buf_adds(b, ",\"Value\":");
            gw_buf_adds(b, v);
        } else {
            int number = strcmp(vr, "IS") == 0 || strcmp(vr, "US") == 0;
            gw_buf_adds(b, ",\"Value\":[");
            for (const char *p = v;;) {
                size_t len = strcspn(p, "\\");
                if (strcmp(vr, "PN") == 0)
                    person_name(b, p, len);
                else if (number)
                    number_or_string(b, p, len);
                else
                    gw_buf_json_str(b, p, len);
                if (!p[len])
                    break;
                gw_buf_adds(b, ",");
                p += len + 1;
            }
            gw_buf_adds(b, "]");
        }
    }
    gw_buf_adds(b, "}");
}

/* 1 when the DICOM JSON holds a BulkDataURI anywhere. */
static int has_bulk(const cJSON *node)
{
    for (const cJSON *c = node ? node->child : NULL; c; c = c->next)
        if ((c->string && strcmp(c->string, "BulkDataURI") == 0) || has_bulk(c))
            return 1;
    return 0;
}

static const char *col(PGresult *res, int row, int c)
{
    if (c < 0 || PQgetisnull(res, row, c))
        return NULL;
    return PQgetvalue(res, row, c);
}

/* The retrieve URL of a result at the search's level. */
static void retrieve_url(gw_buf *b, const gw_qido_query *q, const gw_qido_sql *s, PGresult *res,
                         int row, const char *base)
{
    const char *study = col(res, row, s->col[gw_qido_attr_index(0x0020000D)]);
    const char *series =
        q->level >= GW_QIDO_SERIES ? col(res, row, s->col[gw_qido_attr_index(0x0020000E)]) : NULL;
    const char *sop =
        q->level >= GW_QIDO_INSTANCE ? col(res, row, s->col[gw_qido_attr_index(0x00080018)]) : NULL;
    gw_buf u = {0};
    gw_buf_addf(&u, "%s/dicomweb/studies/%s", base, study ? study : "");
    if (series)
        gw_buf_addf(&u, "/series/%s", series);
    if (sop)
        gw_buf_addf(&u, "/instances/%s", sop);
    element(b, 0x00081190, "UR", gw_buf_cstr(&u));
    gw_buf_free(&u);
}

static void render_row(gw_buf *b, const gw_qido_query *q, const gw_qido_sql *s, PGresult *res,
                       int row, const char *base)
{
    int first = 1;
    gw_buf_adds(b, "{");
    for (size_t a = 0; a < gw_qido_nattrs; a++) {
        const gw_qido_attr *at = &gw_qido_attrs[a];
        gw_qido_ret ret = gw_qido_returns(q, a);
        const char *v = NULL;
        if (!ret)
            continue;
        switch (at->tag) {
        case 0x00080005:
            v = "ISO_IR 192"; /* every value we return is UTF-8 */
            break;
        case 0x00080056:
            v = "ONLINE";
            break;
        case 0x00081190:
            if (!first)
                gw_buf_adds(b, ",");
            retrieve_url(b, q, s, res, row, base);
            first = 0;
            continue;
        default:
            v = col(res, row, s->col[a]);
        }
        if ((!v || !*v) && ret != GW_QR_ALWAYS)
            continue;
        if (!first)
            gw_buf_adds(b, ",");
        element(b, at->tag, at->vr, v);
        first = 0;
    }
    /* includefield attributes outside the index: from an instance's stored header. Their
     * BulkDataURIs are made fetchable at the instance level; above it the header is one
     * instance's among many, so elements with bulk data are left out there. */
    const char *md = s->md_col >= 0 ? col(res, row, s->md_col) : NULL;
    cJSON *j = md ? cJSON_Parse(md) : NULL;
    char inst_url[800] = "";
    if (j && q->level == GW_QIDO_INSTANCE) {
        const char *u[3] = {col(res, row, s->col[gw_qido_attr_index(0x0020000D)]),
                            col(res, row, s->col[gw_qido_attr_index(0x0020000E)]),
                            col(res, row, s->col[gw_qido_attr_index(0x00080018)])};
        snprintf(inst_url, sizeof(inst_url), "%s/dicomweb/studies/%s/series/%s/instances/%s", base,
                 u[0] ? u[0] : "", u[1] ? u[1] : "", u[2] ? u[2] : "");
    }
    for (int e = 0; j && e < q->nextra; e++) {
        char key[9];
        snprintf(key, sizeof(key), "%08X", q->extra[e]);
        cJSON *item = cJSON_GetObjectItemCaseSensitive(j, key);
        if (item && q->level == GW_QIDO_INSTANCE)
            gw_bulk_uris_absolute(item, inst_url);
        else if (item && has_bulk(item))
            continue;
        char *text = item ? cJSON_PrintUnformatted(item) : NULL;
        if (text) {
            gw_buf_addf(b, "%s\"%s\":", first ? "" : ",", key);
            gw_buf_adds(b, text);
            first = 0;
        }
        free(text);
    }
    cJSON_Delete(j);
    gw_buf_adds(b, "}");
}

static int qido(gw_req *r, gw_qido_level level)
{
    static const char *const medias[] = {"application/dicom+json", "application/json", NULL};
    const char *study = gw_param_get(r, "study");
    const char *series = gw_param_get(r, "series");
    gw_qido_query q;
    gw_qido_sql s;
    lc_err err = {0};
    lc_db *db = NULL;
    PGresult *res = NULL;
    gw_buf out = {0};
    char base[600];
    int status;

    int media = gw_accept_pick(r, medias, NULL, NULL);
    if (media < 0)
        return gw_send_problem(r, 406, NULL,
                               "search results are only available as application/dicom+json");
    if ((study && !lc_dicom_uid_valid(study)) || (series && !lc_dicom_uid_valid(series)))
        return gw_send_problem(r, 400, NULL, "\"%.80s\" is not a valid UID",
                               study && !lc_dicom_uid_valid(study) ? study : series);
    if (gw_qido_parse(r->ri->query_string, level, study, series, resolve_keyword, &q, &err) !=
        LC_OK)
        return gw_send_problem(r, 400, NULL, "%s", lc_err_msg(&err));
    if (gw_qido_build_sql(&q, &s, &err) != LC_OK) {
        gw_qido_query_release(&q);
        return gw_send_problem(r, 400, NULL, "%s", lc_err_msg(&err));
    }
    if (gw_db(r, &db, &err) != LC_OK ||
        lc_db_exec(db, gw_buf_cstr(&s.sql), s.nparams, (const char *const *)s.params, &res, &err) !=
            LC_OK) {
        status = gw_send_unavailable(r, "the database", &err);
        goto out;
    }
    gw_db_put(r);
    gw_base_url(r, base, sizeof(base));
    int rows = PQntuples(res);
    int more = rows > q.limit;
    if (more)
        rows = (int)q.limit;
    gw_buf_adds(&out, "[");
    for (int i = 0; i < rows; i++) {
        if (i)
            gw_buf_adds(&out, ",");
        render_row(&out, &q, &s, res, i, base);
    }
    gw_buf_adds(&out, "]");
    const char *body = gw_buf_cstr(&out);
    if (!body) {
        status = gw_send_problem(r, 500, NULL, "out of memory");
        goto out;
    }
    /* PS3.18 8.3.4: Warning header fields for truncated results and for fuzzymatching=true,
     * which this origin server does not support (matching is always literal) */
    gw_header warn[3] = {{NULL, NULL}, {NULL, NULL}, {NULL, NULL}};
    int nw = 0;
    if (more || (q.limit_lowered && rows == q.limit))
        warn[nw++] =
            (gw_header){"Warning", "299 - \"There are additional results that can be requested\""};
    if (q.fuzzy)
        warn[nw++] = (gw_header){"Warning", "299 - \"The fuzzymatching parameter is not supported. "
                                            "Only literal matching has been performed.\""};
    status = gw_send(r, 200, media == 0 ? "application/dicom+json" : "application/json", body,
                     out.len, warn);
out:
    PQclear(res);
    gw_buf_free(&out);
    gw_qido_sql_release(&s);
    gw_qido_query_release(&q);
    return status;
}

int gw_qido_studies(gw_req *r)
{
    return qido(r, GW_QIDO_STUDY);
}

int gw_qido_series(gw_req *r)
{
    return qido(r, GW_QIDO_SERIES);
}

int gw_qido_instances(gw_req *r)
{
    return qido(r, GW_QIDO_INSTANCE);
}
