/*
 * gw_jobs.c: GET /api/v1/jobs/{id}: one job with its parameters, progress, result and
 * artifacts (the job life cycle is in lc/jobs.h; the workers write these rows). Retry,
 * cancel and creation come with the full REST API. Runs on worker threads, state per request.
 */
#include "gw.h"
#include "lc/util.h"

static const char get_sql[] =
    "SELECT json_build_object("
    " 'id', j.id, 'kind', j.kind, 'study_instance_uid', j.study_uid, 'state', j.state,"
    " 'params', j.params, 'progress', j.progress, 'result', j.result, 'error', j.error,"
    " 'attempts', j.attempts, 'max_attempts', j.max_attempts,"
    " 'created_at', " GW_TS("j.created_at") ", 'updated_at', " GW_TS(
        "j.updated_at") ","
                        " 'started_at', " GW_TS("j.started_at") ", 'finished_at', " GW_TS(
                            "j.finished_at") ","
                                             " 'artifacts', COALESCE((SELECT "
                                             "json_agg(json_build_object("
                                             "     'name', a.name, 'size', a.size_bytes, "
                                             "'media_type', a.media_type) ORDER BY a.name)"
                                             "   FROM job_artifacts a WHERE a.job_id = j.id), "
                                             "'[]'::json))::text"
                                             " FROM jobs j WHERE j.id = $1::uuid";

int gw_jobs_get(gw_req *r)
{
    const char *id = gw_param_get(r, "id");
    const char *p[1] = {id};
    lc_db *db = NULL;
    cJSON *job = NULL;
    lc_err err = {0};

    if (!id || !lc_uuid_valid(id))
        return gw_send_problem(r, 400, NULL, "\"%.80s\" is not a job id (a UUID)", id ? id : "");
    if (gw_db(r, &db, &err) != LC_OK || gw_query_json(db, get_sql, 1, p, NULL, &job, &err) != LC_OK)
        return gw_send_unavailable(r, "the database", &err);
    if (!job)
        return gw_send_problem(r, 404, NULL, "no job with id %s", id);
    return gw_send_json(r, 200, job);
}
