/*
 * gw_studies.c: GET /api/v1/studies (filtered, paged list) and GET /api/v1/studies/{uid}
 * (one study with its series and jobs), read from the index the dicom-indexer maintains.
 * PostgreSQL builds each item's JSON (json_build_object), so types, NULLs and arrays come
 * out right; filters are bound parameters only. Runs on worker threads, state per request.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libpq-fe.h>
#include "gw.h"
#include "lc/dicom.h"

#define STUDY_FIELDS                                                                               \
    "'study_instance_uid', s.study_uid, 'patient_id', s.patient_id,"                               \
    " 'patient_name', s.patient_name, 'study_date', s.study_date, 'study_time', s.study_time,"     \
    " 'accession_number', s.accession_number, 'study_description', s.study_description,"           \
    " 'modalities', s.modalities, 'num_series', s.num_series,"                                     \
    " 'num_instances', s.num_instances, 'completed_version', s.completed_version,"                 \
    " 'created_at', " GW_TS("s.created_at") ", 'updated_at', " GW_TS("s.updated_at")

/* $1 patient_id, $2 modality, $3 study_date; NULL means "no filter" */
#define STUDY_FILTER                                                                               \
    " WHERE ($1::text IS NULL OR s.patient_id = $1)"                                               \
    "   AND ($2::text IS NULL OR $2 = ANY (s.modalities))"                                         \
    "   AND ($3::text IS NULL OR s.study_date = $3)"

static const char list_sql[] =
    "SELECT json_build_object(" STUDY_FIELDS ")::text"
    " FROM studies s" STUDY_FILTER " ORDER BY s.created_at DESC, s.study_uid"
    " LIMIT $4::bigint OFFSET $5::bigint";
static const char count_sql[] = "SELECT count(*) FROM studies s" STUDY_FILTER;

static const char get_sql[] =
    "SELECT json_build_object(" STUDY_FIELDS ","
    " 'series', COALESCE((SELECT json_agg(json_build_object("
    "     'series_instance_uid', se.series_uid, 'modality', se.modality,"
    "     'series_number', se.series_number, 'series_description', se.series_description,"
    "     'num_instances', se.num_instances)"
    "   ORDER BY se.series_number NULLS LAST, se.series_uid)"
    "   FROM series se WHERE se.study_uid = s.study_uid), '[]'::json),"
    " 'jobs', COALESCE((SELECT json_agg(json_build_object("
    "     'id', j.id, 'kind', j.kind, 'state', j.state, 'attempts', j.attempts,"
    "     'error', j.error, 'created_at', " GW_TS(
        "j.created_at") ","
                        "     'updated_at', " GW_TS(
                            "j.updated_at") ")"
                                            "   ORDER BY j.created_at, j.id)"
                                            "   FROM jobs j WHERE j.study_uid = s.study_uid), "
                                            "'[]'::json))::text"
                                            " FROM studies s WHERE s.study_uid = $1";

/* One optional text filter: NULL when absent; sends 400 and returns -1 when unusable. */
static int text_filter(gw_req *r, const char *name, char *buf, size_t cap, const char **out)
{
    int found = gw_query(r, name, buf, cap);
    *out = NULL;
    if (found < 0) {
        gw_send_problem(r, 400, NULL, "query parameter \"%s\" is longer than %zu bytes", name,
                        cap - 1);
        return -1;
    }
    if (found > 0)
        *out = buf;
    return 0;
}

int gw_studies_list(gw_req *r)
{
    static const char *const allowed[] = {"limit",    "offset",     "patient_id",
                                          "modality", "study_date", NULL};
    char pid[256], mod[64], date[16], bad[64], lim[24], off[24];
    const char *p[5] = {NULL};
    long long limit, offset;
    lc_db *db = NULL;
    PGresult *res = NULL;
    lc_err err = {0};

    if (gw_query_unknown(r, allowed, bad, sizeof(bad)))
        return gw_send_problem(r, 400, NULL,
                               "unknown query parameter \"%s\" (known: limit, offset, patient_id, "
                               "modality, study_date)",
                               bad);
    if (gw_query_int(r, "limit", 100, 1, 1000, &limit) != 0 ||
        gw_query_int(r, "offset", 0, 0, 1000000000LL, &offset) != 0 ||
        text_filter(r, "patient_id", pid, sizeof(pid), &p[0]) != 0 ||
        text_filter(r, "modality", mod, sizeof(mod), &p[1]) != 0 ||
        text_filter(r, "study_date", date, sizeof(date), &p[2]) != 0)
        return 400;
    if (p[2] && (strlen(p[2]) != 8 || strspn(p[2], "0123456789") != 8))
        return gw_send_problem(r, 400, NULL,
                               "invalid value for query parameter \"study_date\": must be "
                               "YYYYMMDD");
    snprintf(lim, sizeof(lim), "%lld", limit);
    snprintf(off, sizeof(off), "%lld", offset);
    p[3] = lim;
    p[4] = off;

    cJSON *o = cJSON_CreateObject();
    cJSON *items = cJSON_AddArrayToObject(o, "items");
    if (!items) {
        cJSON_Delete(o);
        return gw_send_problem(r, 500, NULL, "out of memory");
    }
    if (gw_db(r, &db, &err) != LC_OK || lc_db_exec(db, count_sql, 3, p, &res, &err) != LC_OK ||
        gw_query_json(db, list_sql, 5, p, items, NULL, &err) != LC_OK) {
        PQclear(res);
        cJSON_Delete(o);
        return gw_send_unavailable(r, "the database", &err);
    }
    cJSON_AddNumberToObject(o, "limit", (double)limit);
    cJSON_AddNumberToObject(o, "offset", (double)offset);
    cJSON_AddNumberToObject(o, "total", (double)strtoll(PQgetvalue(res, 0, 0), NULL, 10));
    PQclear(res);
    return gw_send_json(r, 200, o);
}

int gw_studies_get(gw_req *r)
{
    const char *uid = gw_param_get(r, "uid");
    lc_db *db = NULL;
    cJSON *study = NULL;
    lc_err err = {0};
    const char *p[1] = {uid};

    if (!uid || !lc_dicom_uid_valid(uid))
        return gw_send_problem(r, 400, NULL, "\"%.80s\" is not a valid StudyInstanceUID",
                               uid ? uid : "");
    if (gw_db(r, &db, &err) != LC_OK ||
        gw_query_json(db, get_sql, 1, p, NULL, &study, &err) != LC_OK)
        return gw_send_unavailable(r, "the database", &err);
    if (!study)
        return gw_send_problem(r, 404, NULL, "no study with StudyInstanceUID %s", uid);
    return gw_send_json(r, 200, study);
}
