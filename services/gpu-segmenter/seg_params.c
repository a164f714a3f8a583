/*
 * seg_params.c: the segment job's parameters, checked with the rules of
 * proto/params/segment.schema.json (kept equal by the shared cases in tests/data/params) plus
 * lower <= upper, which JSON Schema cannot state; then the per-algorithm defaults. A job names
 * either an algorithm or a model (params.model: RADPIPE_MODELS_DIR/<model>), never both.
 * Pure functions; thread-safe.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include "lc/dicom.h"
#include "seg.h"

const char *seg_algorithm_name(seg_algorithm a)
{
    switch (a) {
    case SEG_ALGO_OTSU:
        return "otsu";
    case SEG_ALGO_BODY:
        return "body";
    case SEG_ALGO_THRESHOLD:
        return "threshold";
    }
    return "unknown";
}

/* JSON Schema's "integer": a number with no fractional part. */
static int is_integer(const cJSON *it, double lo, double hi)
{
    return cJSON_IsNumber(it) && isfinite(it->valuedouble) &&
           it->valuedouble == floor(it->valuedouble) && it->valuedouble >= lo &&
           it->valuedouble <= hi;
}

static int is_number(const cJSON *it)
{
    return cJSON_IsNumber(it) && isfinite(it->valuedouble);
}

static lc_rc parse_window(const cJSON *w, seg_params *p, lc_err *err)
{
    const cJSON *level = NULL, *width = NULL;
    if (!cJSON_IsObject(w))
        return lc_err_set(err, LC_ERR_INVALID,
                          "params.window must be an object {\"level\", \"width\"}");
    for (const cJSON *it = w->child; it; it = it->next) {
        if (strcmp(it->string, "level") == 0)
            level = it;
        else if (strcmp(it->string, "width") == 0)
            width = it;
        else
            return lc_err_set(err, LC_ERR_INVALID, "params.window has an unknown member \"%.64s\"",
                              it->string);
    }
    if (!level || !width)
        return lc_err_set(err, LC_ERR_INVALID, "params.window needs both level and width");
    if (!is_number(level) || fabs(level->valuedouble) > 100000)
        return lc_err_set(err, LC_ERR_INVALID,
                          "params.window.level must be a number in [-100000, 100000]");
    if (!is_number(width) || !(width->valuedouble > 0) || width->valuedouble > 200000)
        return lc_err_set(err, LC_ERR_INVALID,
                          "params.window.width must be a number > 0 and <= 200000");
    p->has_window = 1;
    p->window_level = level->valuedouble;
    p->window_width = width->valuedouble;
    return LC_OK;
}

static lc_rc parse_morphology(const cJSON *m, seg_params *p, lc_err *err)
{
    static const struct {
        const char *name;
        gpu_morph_op op;
    } ops[] = {{"erode", GPU_MORPH_ERODE},
               {"dilate", GPU_MORPH_DILATE},
               {"open", GPU_MORPH_OPEN},
               {"close", GPU_MORPH_CLOSE}};
    if (!cJSON_IsArray(m))
        return lc_err_set(err, LC_ERR_INVALID,
                          "params.morphology must be an array of {\"op\", \"radius_mm\"}");
    if (cJSON_GetArraySize(m) > SEG_MAX_MORPH)
        return lc_err_set(err, LC_ERR_INVALID, "params.morphology has more than %d steps",
                          SEG_MAX_MORPH);
    int i = 0;
    for (const cJSON *s = m->child; s; s = s->next, i++) {
        const cJSON *op = NULL, *r = NULL;
        if (!cJSON_IsObject(s))
            return lc_err_set(err, LC_ERR_INVALID,
                              "params.morphology[%d] must be an object {\"op\", \"radius_mm\"}", i);
        for (const cJSON *it = s->child; it; it = it->next) {
            if (strcmp(it->string, "op") == 0)
                op = it;
            else if (strcmp(it->string, "radius_mm") == 0)
                r = it;
            else
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.morphology[%d] has an unknown member \"%.64s\"", i,
                                  it->string);
        }
        if (!op || !r)
            return lc_err_set(err, LC_ERR_INVALID, "params.morphology[%d] needs op and radius_mm",
                              i);
        size_t k = 0;
        while (k < sizeof(ops) / sizeof(ops[0]) &&
               !(cJSON_IsString(op) && strcmp(op->valuestring, ops[k].name) == 0))
            k++;
        if (k == sizeof(ops) / sizeof(ops[0]))
            return lc_err_set(err, LC_ERR_INVALID,
                              "params.morphology[%d].op must be \"erode\", \"dilate\", \"open\" "
                              "or \"close\"",
                              i);
        if (!is_number(r) || r->valuedouble < 0 || r->valuedouble > 100)
            return lc_err_set(err, LC_ERR_INVALID,
                              "params.morphology[%d].radius_mm must be a number in [0, 100]", i);
        p->morph[i].op = ops[k].op;
        p->morph[i].radius_mm = r->valuedouble;
    }
    p->nmorph = i;
    return LC_OK;
}

/* Members only some algorithms take. */
typedef struct seen {
    const cJSON *nbins, *window, *lower, *upper, *morph, *conn, *keep, *minc, *fill;
    const cJSON *algorithm, *label;
} seen;

/* A model job takes series_instance_uid and stow besides its model: the rest belongs to the
 * algorithms (the model's labels name its segments). */
static lc_rc check_model(const seen *s, lc_err *err)
{
    if (s->algorithm)
        return lc_err_set(err, LC_ERR_INVALID,
                          "params.algorithm and params.model are exclusive: a job runs an "
                          "algorithm or a model");
    const struct {
        const cJSON *it;
        const char *name;
    } algo[] = {{s->nbins, "nbins"},       {s->window, "window"},
                {s->lower, "lower"},       {s->upper, "upper"},
                {s->morph, "morphology"},  {s->conn, "connectivity"},
                {s->keep, "keep_largest"}, {s->minc, "min_component_mm3"},
                {s->fill, "fill_holes"},   {s->label, "label"}};
    for (size_t i = 0; i < sizeof(algo) / sizeof(algo[0]); i++)
        if (algo[i].it)
            return lc_err_set(err, LC_ERR_INVALID,
                              "params.%s does not apply to a model job (params.model)",
                              algo[i].name);
    return LC_OK;
}

/* ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$: a folder name, never "." or ".." or a path */
static int model_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        int alnum = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (!alnum && (i == 0 || !strchr("._-", c)))
            return 0;
    }
    return 1;
}

static lc_rc check_applicable(const seen *s, seg_algorithm a, lc_err *err)
{
    const char *name = seg_algorithm_name(a);
    if (a == SEG_ALGO_THRESHOLD) {
        if (!s->lower && !s->upper)
            return lc_err_set(
                err, LC_ERR_INVALID,
                "params.lower or params.upper is required by algorithm \"threshold\"");
        if (s->nbins)
            return lc_err_set(err, LC_ERR_INVALID,
                              "params.nbins does not apply to algorithm \"threshold\"");
    } else if (s->lower || s->upper) {
        return lc_err_set(err, LC_ERR_INVALID, "params.%s applies to algorithm \"threshold\" only",
                          s->lower ? "lower" : "upper");
    }
    if (a != SEG_ALGO_BODY && s->window)
        return lc_err_set(err, LC_ERR_INVALID, "params.window applies to algorithm \"body\" only");
    if (a == SEG_ALGO_OTSU) {
        const struct {
            const cJSON *it;
            const char *name;
        } post[] = {{s->morph, "morphology"},
                    {s->conn, "connectivity"},
                    {s->keep, "keep_largest"},
                    {s->minc, "min_component_mm3"},
                    {s->fill, "fill_holes"}};
        for (size_t i = 0; i < sizeof(post) / sizeof(post[0]); i++)
            if (post[i].it)
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.%s does not apply to algorithm \"%s\" (body and "
                                  "threshold take it)",
                                  post[i].name, name);
    }
    return LC_OK;
}

static void defaults(seg_params *p)
{
    memset(p, 0, sizeof(*p));
    p->algorithm = SEG_ALGO_OTSU;
    p->nbins = 256;
    p->window_level = 0;
    p->window_width = 2000;
    p->lower = -INFINITY;
    p->upper = INFINITY;
    p->stow = -1; /* unset: follow the configuration */
}

lc_rc seg_params_parse(const cJSON *params, seg_params *p, lc_err *err)
{
    seen s = {0};
    lc_rc rc;
    defaults(p);
    if (params && !cJSON_IsObject(params))
        return lc_err_set(err, LC_ERR_INVALID, "params must be a JSON object");
    for (const cJSON *it = params ? params->child : NULL; it; it = it->next) {
        const char *k = it->string;
        if (strcmp(k, "algorithm") == 0) {
            static const char *const names[] = {"otsu", "body", "threshold"};
            size_t a = 0;
            while (a < 3 && !(cJSON_IsString(it) && strcmp(it->valuestring, names[a]) == 0))
                a++;
            if (a == 3)
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.algorithm must be \"otsu\", \"body\" or \"threshold\"");
            p->algorithm = (seg_algorithm)a;
            s.algorithm = it;
        } else if (strcmp(k, "model") == 0) {
            if (!cJSON_IsString(it) || !model_name_ok(it->valuestring))
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.model must be a model name: 1 to 64 letters, digits, "
                                  "'.', '_' or '-', starting with a letter or digit");
            snprintf(p->model, sizeof(p->model), "%s", it->valuestring);
        } else if (strcmp(k, "series_instance_uid") == 0) {
            if (!cJSON_IsString(it) || !lc_dicom_uid_valid(it->valuestring))
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.series_instance_uid must be a DICOM UID");
            snprintf(p->series_uid, sizeof(p->series_uid), "%s", it->valuestring);
        } else if (strcmp(k, "nbins") == 0) {
            if (!is_integer(it, 2, 4096))
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.nbins must be an integer in [2, 4096]");
            p->nbins = (int)it->valuedouble;
            s.nbins = it;
        } else if (strcmp(k, "window") == 0) {
            if ((rc = parse_window(it, p, err)) != LC_OK)
                return rc;
            s.window = it;
        } else if (strcmp(k, "lower") == 0 || strcmp(k, "upper") == 0) {
            if (!is_number(it))
                return lc_err_set(err, LC_ERR_INVALID, "params.%s must be a number", k);
            if (k[0] == 'l') {
                p->lower = it->valuedouble;
                s.lower = it;
            } else {
                p->upper = it->valuedouble;
                s.upper = it;
            }
        } else if (strcmp(k, "morphology") == 0) {
            if ((rc = parse_morphology(it, p, err)) != LC_OK)
                return rc;
            s.morph = it;
        } else if (strcmp(k, "connectivity") == 0) {
            if (!is_integer(it, 6, 26) || (it->valuedouble != 6 && it->valuedouble != 26))
                return lc_err_set(err, LC_ERR_INVALID, "params.connectivity must be 6 or 26");
            p->connectivity = (int)it->valuedouble;
            s.conn = it;
        } else if (strcmp(k, "keep_largest") == 0) {
            if (!is_integer(it, 0, 1000000))
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.keep_largest must be an integer in [0, 1000000]");
            p->keep_largest = (long long)it->valuedouble;
            s.keep = it;
        } else if (strcmp(k, "min_component_mm3") == 0) {
            if (!is_number(it) || it->valuedouble < 0)
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.min_component_mm3 must be a number >= 0");
            p->min_component_mm3 = it->valuedouble;
            s.minc = it;
        } else if (strcmp(k, "fill_holes") == 0) {
            static const char *const names[] = {"none", "2d", "3d"};
            size_t f = 0;
            while (f < 3 && !(cJSON_IsString(it) && strcmp(it->valuestring, names[f]) == 0))
                f++;
            if (f == 3)
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.fill_holes must be \"none\", \"2d\" or \"3d\"");
            p->fill = (seg_fill)f;
            s.fill = it;
        } else if (strcmp(k, "stow") == 0) {
            if (!cJSON_IsBool(it))
                return lc_err_set(err, LC_ERR_INVALID, "params.stow must be true or false");
            p->stow = cJSON_IsTrue(it);
        } else if (strcmp(k, "label") == 0) {
            if (!cJSON_IsString(it) || !it->valuestring[0] || strlen(it->valuestring) > 64)
                return lc_err_set(err, LC_ERR_INVALID,
                                  "params.label must be a string of 1 to 64 characters");
            snprintf(p->label, sizeof(p->label), "%s", it->valuestring);
            s.label = it;
        } else {
            return lc_err_set(err, LC_ERR_INVALID, "unknown parameter \"%.64s\"", k);
        }
    }
    if (p->model[0])
        return check_model(&s, err);
    if ((rc = check_applicable(&s, p->algorithm, err)) != LC_OK)
        return rc;
    if (s.lower && s.upper && p->lower > p->upper)
        return lc_err_set(err, LC_ERR_INVALID, "params.lower (%g) is above params.upper (%g)",
                          p->lower, p->upper);
    /* per-algorithm defaults of what was not given */
    int body = p->algorithm == SEG_ALGO_BODY;
    if (!s.conn)
        p->connectivity = body ? 6 : 26;
    if (!s.keep)
        p->keep_largest = body ? 1 : 0;
    if (!s.fill)
        p->fill = body ? SEG_FILL_2D : SEG_FILL_NONE;
    if (!p->label[0])
        snprintf(p->label, sizeof(p->label), "%s",
                 body                            ? "Body"
                 : p->algorithm == SEG_ALGO_OTSU ? "Otsu foreground"
                                                 : "Threshold");
    return LC_OK;
}
