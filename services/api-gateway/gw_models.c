/*
 * gw_models.c: GET /api/v1/models and /api/v1/models/{name}: the segmentation models the
 * gpu-segmenters hold resident, read from the models table each segmenter upserts when it
 * loads them (proto/sql/005_models.sql). A job names one in params.model. Thread-safe (state
 * is in the gw_req).
 */
#include <string.h>
#include "gw.h"

#define MODEL_FIELDS                                                                               \
    "'name', m.name, 'version', m.version, 'modality', m.modality,"                                \
    " 'description', m.description, 'labels', m.labels, 'spatial_dims', m.spatial_dims,"           \
    " 'spacing_mm', m.spacing_mm, 'patch_size', m.patch_size,"                                     \
    " 'normalization', m.normalization, 'mirroring', m.mirroring, 'sha256', m.sha256,"             \
    " 'size_bytes', m.size_bytes, 'parameters', m.parameters, 'loaded_by', m.loaded_by,"           \
    " 'loaded_at', " GW_TS("m.loaded_at")

static const char list_sql[] =
    "SELECT json_build_object(" MODEL_FIELDS ")::text FROM models m ORDER BY m.name";
static const char get_sql[] =
    "SELECT json_build_object(" MODEL_FIELDS ")::text FROM models m WHERE m.name = $1";

static int alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* A model name as model.json allows it: ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$
 * (proto/models/model.schema.json). */
static int name_valid(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64 || !alnum(s[0]))
        return 0;
    for (size_t i = 1; i < n; i++)
        if (!alnum(s[i]) && s[i] != '.' && s[i] != '_' && s[i] != '-')
            return 0;
    return 1;
}

int gw_models_list(gw_req *r)
{
    lc_db *db = NULL;
    lc_err err = {0};
    cJSON *o = cJSON_CreateObject();
    cJSON *items = o ? cJSON_AddArrayToObject(o, "models") : NULL;
    if (!items) {
        cJSON_Delete(o);
        return gw_send_problem(r, 500, NULL, "out of memory");
    }
    if (gw_db(r, &db, &err) != LC_OK ||
        gw_query_json(db, list_sql, 0, NULL, items, NULL, &err) != LC_OK) {
        cJSON_Delete(o);
        return gw_send_unavailable(r, "the database", &err);
    }
    return gw_send_json(r, 200, o);
}

int gw_models_get(gw_req *r)
{
    const char *name = gw_param_get(r, "name");
    lc_db *db = NULL;
    cJSON *m = NULL;
    lc_err err = {0};
    if (!name || !name_valid(name))
        return gw_send_problem(r, 400, NULL, "\"%.80s\" is not a model name", name ? name : "");
    const char *p[1] = {name};
    if (gw_db(r, &db, &err) != LC_OK || gw_query_json(db, get_sql, 1, p, NULL, &m, &err) != LC_OK)
        return gw_send_unavailable(r, "the database", &err);
    if (!m)
        return gw_send_problem(r, 404, NULL, "no model named \"%s\"", name);
    return gw_send_json(r, 200, m);
}
