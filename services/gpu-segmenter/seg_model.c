/*
 * seg_model.c: the model registry. model.json (proto/models/model.schema.json) is checked in
 * C with the schema's rules plus the ones it cannot state; every model of RADPIPE_MODELS_DIR
 * is loaded once at start onto the process's gpu_ctx (gpu_nn_load: weights resident, plan
 * built) and stays there, so jobs do no loading work; a bad model is logged and skipped.
 * The resident models are upserted into the models table for the gateway. Built by
 * seg_init on the main thread; read-only afterwards (the worker thread runs the networks).
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "lc/log.h"
#include "lc/util.h"
#include "seg.h"
#include "seg_nn_config.h"
#if SEG_HAVE_NN
#include "gpu_nn.h"
#endif

/* model.onnx files larger than this are refused before they are read */
#define MAX_ONNX_BYTES ((size_t)2 << 30)
#define MAX_JSON_BYTES ((size_t)1 << 20)

/* ---- model.json ---------------------------------------------------------------------------- */

static int is_number(const cJSON *it)
{
    return cJSON_IsNumber(it) && isfinite(it->valuedouble);
}

static int is_integer(const cJSON *it, double lo, double hi)
{
    return is_number(it) && it->valuedouble == floor(it->valuedouble) && it->valuedouble >= lo &&
           it->valuedouble <= hi;
}

/* ^[A-Za-z0-9][A-Za-z0-9<extra>]{0,max-1}$ */
static int word_ok(const char *s, const char *extra, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n > max ||
        !((s[0] >= 'A' && s[0] <= 'Z') || (s[0] >= 'a' && s[0] <= 'z') ||
          (s[0] >= '0' && s[0] <= '9')))
        return 0;
    for (size_t i = 1; i < n; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              strchr(extra, c)))
            return 0;
    }
    return 1;
}

static int string_ok(const cJSON *it, size_t min, size_t max)
{
    if (!cJSON_IsString(it))
        return 0;
    size_t n = strlen(it->valuestring);
    return n >= min && n <= max;
}

static lc_rc parse_code(const cJSON *c, const char *where, seg_code *out, lc_err *err)
{
    const cJSON *code = NULL, *scheme = NULL, *meaning = NULL;
    if (!cJSON_IsObject(c))
        return lc_err_set(err, LC_ERR_INVALID,
                          "%s must be an object {\"code\", \"scheme\", \"meaning\"}", where);
    for (const cJSON *it = c->child; it; it = it->next) {
        if (strcmp(it->string, "code") == 0)
            code = it;
        else if (strcmp(it->string, "scheme") == 0)
            scheme = it;
        else if (strcmp(it->string, "meaning") == 0)
            meaning = it;
        else
            return lc_err_set(err, LC_ERR_INVALID, "%s has an unknown member \"%.64s\"", where,
                              it->string);
    }
    if (!code || !cJSON_IsString(code) || !word_ok(code->valuestring, ".-", 16))
        return lc_err_set(err, LC_ERR_INVALID,
                          "%s.code must be a code value of 1 to 16 letters, digits, '.' or '-'",
                          where);
    if (!scheme || !cJSON_IsString(scheme) ||
        (strcmp(scheme->valuestring, "SCT") != 0 && strcmp(scheme->valuestring, "DCM") != 0))
        return lc_err_set(err, LC_ERR_INVALID, "%s.scheme must be \"SCT\" or \"DCM\"", where);
    if (!meaning || !string_ok(meaning, 1, 64))
        return lc_err_set(err, LC_ERR_INVALID, "%s.meaning must be a string of 1 to 64 characters",
                          where);
    snprintf(out->code, sizeof(out->code), "%s", code->valuestring);
    snprintf(out->scheme, sizeof(out->scheme), "%s", scheme->valuestring);
    snprintf(out->meaning, sizeof(out->meaning), "%s", meaning->valuestring);
    return LC_OK;
}

/* Colours for labels without one: distinct, readable on gray. */
static const int palette[8][3] = {{255, 64, 64},  {64, 200, 64}, {64, 128, 255}, {255, 200, 0},
                                  {200, 64, 255}, {0, 220, 220}, {255, 128, 64}, {160, 255, 120}};

static lc_rc parse_label(const cJSON *l, int i, seg_model_label *out, lc_err *err)
{
    char where[48];
    const cJSON *value = NULL, *name = NULL, *cat = NULL, *type = NULL, *color = NULL;
    lc_rc rc;
    if (!cJSON_IsObject(l))
        return lc_err_set(err, LC_ERR_INVALID, "labels[%d] must be an object", i);
    for (const cJSON *it = l->child; it; it = it->next) {
        if (strcmp(it->string, "value") == 0)
            value = it;
        else if (strcmp(it->string, "name") == 0)
            name = it;
        else if (strcmp(it->string, "category") == 0)
            cat = it;
        else if (strcmp(it->string, "type") == 0)
            type = it;
        else if (strcmp(it->string, "color") == 0)
            color = it;
        else
            return lc_err_set(err, LC_ERR_INVALID, "labels[%d] has an unknown member \"%.64s\"", i,
                              it->string);
    }
    if (!value || !is_integer(value, 1, 255))
        return lc_err_set(err, LC_ERR_INVALID, "labels[%d].value must be an integer in [1, 255]",
                          i);
    if (!name || !string_ok(name, 1, 64))
        return lc_err_set(err, LC_ERR_INVALID,
                          "labels[%d].name must be a string of 1 to 64 characters", i);
    out->value = (int)value->valuedouble;
    snprintf(out->name, sizeof(out->name), "%s", name->valuestring);
    snprintf(where, sizeof(where), "labels[%d].category", i);
    if (!cat)
        return lc_err_set(err, LC_ERR_INVALID, "%s is required", where);
    if ((rc = parse_code(cat, where, &out->category, err)) != LC_OK)
        return rc;
    snprintf(where, sizeof(where), "labels[%d].type", i);
    if (!type)
        return lc_err_set(err, LC_ERR_INVALID, "%s is required", where);
    if ((rc = parse_code(type, where, &out->type, err)) != LC_OK)
        return rc;
    if (color) {
        if (!cJSON_IsArray(color) || cJSON_GetArraySize(color) != 3)
            return lc_err_set(err, LC_ERR_INVALID,
                              "labels[%d].color must be [r, g, b] with integers in [0, 255]", i);
        int k = 0;
        for (const cJSON *c = color->child; c; c = c->next, k++) {
            if (!is_integer(c, 0, 255))
                return lc_err_set(err, LC_ERR_INVALID,
                                  "labels[%d].color must be [r, g, b] with integers in [0, 255]",
                                  i);
            out->rgb[k] = (int)c->valuedouble;
        }
    } else {
        memcpy(out->rgb, palette[(out->value - 1) % 8], sizeof(out->rgb));
    }
    return LC_OK;
}

static lc_rc parse_labels(const cJSON *ls, seg_model_desc *d, lc_err *err)
{
    int n = cJSON_IsArray(ls) ? cJSON_GetArraySize(ls) : 0;
    if (n < 1 || n > 255)
        return lc_err_set(err, LC_ERR_INVALID, "labels must be an array of 1 to 255 labels");
    d->labels = calloc((size_t)n, sizeof(*d->labels));
    if (!d->labels)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    int i = 0;
    for (const cJSON *l = ls->child; l; l = l->next, i++) {
        seg_model_label tmp;
        lc_rc rc = parse_label(l, i, &tmp, err);
        if (rc != LC_OK)
            return rc;
        /* values 1..n, once each: label v is the network's output channel v */
        if (tmp.value > n)
            return lc_err_set(err, LC_ERR_INVALID,
                              "labels: value %d with %d labels (values must be 1..%d, once each)",
                              tmp.value, n, n);
        if (d->labels[tmp.value - 1].value)
            return lc_err_set(err, LC_ERR_INVALID, "labels: value %d is listed twice", tmp.value);
        d->labels[tmp.value - 1] = tmp;
    }
    d->nlabels = n;
    return LC_OK;
}

static lc_rc parse_norm(const cJSON *o, seg_model_desc *d, lc_err *err)
{
    const cJSON *scheme = NULL, *lo = NULL, *hi = NULL, *mean = NULL, *sd = NULL;
    if (!cJSON_IsObject(o))
        return lc_err_set(
            err, LC_ERR_INVALID,
            "normalization must be an object {\"scheme\": \"ct\" or \"zscore\", ...}");
    for (const cJSON *it = o->child; it; it = it->next) {
        if (strcmp(it->string, "scheme") == 0)
            scheme = it;
        else if (strcmp(it->string, "percentile_00_5") == 0)
            lo = it;
        else if (strcmp(it->string, "percentile_99_5") == 0)
            hi = it;
        else if (strcmp(it->string, "mean") == 0)
            mean = it;
        else if (strcmp(it->string, "std") == 0)
            sd = it;
        else
            return lc_err_set(err, LC_ERR_INVALID, "normalization has an unknown member \"%.64s\"",
                              it->string);
    }
    if (scheme && cJSON_IsString(scheme) && strcmp(scheme->valuestring, "zscore") == 0) {
        if (lo || hi || mean || sd)
            return lc_err_set(err, LC_ERR_INVALID,
                              "normalization \"zscore\" takes no statistics (the volume's own "
                              "mean and std are used)");
        d->norm = SEG_NORM_ZSCORE;
        return LC_OK;
    }
    if (!scheme || !cJSON_IsString(scheme) || strcmp(scheme->valuestring, "ct") != 0)
        return lc_err_set(err, LC_ERR_INVALID, "normalization.scheme must be \"ct\" or \"zscore\"");
    const struct {
        const cJSON *it;
        const char *name;
        double *dst;
    } f[] = {{lo, "percentile_00_5", &d->clip_lo},
             {hi, "percentile_99_5", &d->clip_hi},
             {mean, "mean", &d->mean},
             {sd, "std", &d->std}};
    for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++) {
        if (!f[i].it || !is_number(f[i].it) || fabs(f[i].it->valuedouble) > 100000)
            return lc_err_set(err, LC_ERR_INVALID,
                              "normalization.%s must be a number in [-100000, 100000] (\"ct\" "
                              "needs percentile_00_5, percentile_99_5, mean and std)",
                              f[i].name);
        *f[i].dst = f[i].it->valuedouble;
    }
    if (!(d->std > 0))
        return lc_err_set(err, LC_ERR_INVALID, "normalization.std must be > 0");
    if (!(d->clip_lo < d->clip_hi))
        return lc_err_set(err, LC_ERR_INVALID,
                          "normalization.percentile_00_5 (%g) must be below percentile_99_5 (%g)",
                          d->clip_lo, d->clip_hi);
    d->norm = SEG_NORM_CT;
    return LC_OK;
}

/* An array of 2 or 3 numbers (slowest axis first) into out[] (reversed when rev). */
static int axes(const cJSON *a, int integer, double lo, double hi, double out[3])
{
    int n = cJSON_IsArray(a) ? cJSON_GetArraySize(a) : 0;
    if (n < 2 || n > 3)
        return 0;
    int i = 0;
    for (const cJSON *it = a->child; it; it = it->next, i++) {
        if (integer ? !is_integer(it, lo, hi)
                    : !(is_number(it) && it->valuedouble > lo && it->valuedouble <= hi))
            return 0;
        out[i] = it->valuedouble;
    }
    return n;
}

void seg_model_desc_release(seg_model_desc *d)
{
    if (!d)
        return;
    free(d->labels);
    free(d->description);
    d->labels = NULL;
    d->description = NULL;
    d->nlabels = 0;
}

lc_rc seg_model_desc_parse(const cJSON *j, seg_model_desc *d, lc_err *err)
{
    const cJSON *name = NULL, *version = NULL, *desc = NULL, *mod = NULL, *labels = NULL,
                *norm = NULL, *spacing = NULL, *patch = NULL, *step = NULL, *mirror = NULL,
                *batch = NULL, *sha = NULL;
    lc_rc rc;
    memset(d, 0, sizeof(*d));
    if (!cJSON_IsObject(j))
        return lc_err_set(err, LC_ERR_INVALID, "model.json must be a JSON object");
    for (const cJSON *it = j->child; it; it = it->next) {
        const char *k = it->string;
        const cJSON **slot = strcmp(k, "name") == 0            ? &name
                             : strcmp(k, "version") == 0       ? &version
                             : strcmp(k, "description") == 0   ? &desc
                             : strcmp(k, "modality") == 0      ? &mod
                             : strcmp(k, "labels") == 0        ? &labels
                             : strcmp(k, "normalization") == 0 ? &norm
                             : strcmp(k, "spacing_mm") == 0    ? &spacing
                             : strcmp(k, "patch_size") == 0    ? &patch
                             : strcmp(k, "step") == 0          ? &step
                             : strcmp(k, "mirroring") == 0     ? &mirror
                             : strcmp(k, "batch") == 0         ? &batch
                             : strcmp(k, "onnx_sha256") == 0   ? &sha
                                                               : NULL;
        if (!slot)
            return lc_err_set(err, LC_ERR_INVALID, "model.json has an unknown member \"%.64s\"", k);
        *slot = it;
    }
    if (!name || !cJSON_IsString(name) || !word_ok(name->valuestring, "._-", 64))
        return lc_err_set(err, LC_ERR_INVALID,
                          "name must be 1 to 64 letters, digits, '.', '_' or '-', starting with "
                          "a letter or digit");
    snprintf(d->name, sizeof(d->name), "%s", name->valuestring);
    if (!version || !cJSON_IsString(version) || !word_ok(version->valuestring, "._+-", 32))
        return lc_err_set(err, LC_ERR_INVALID,
                          "version must be 1 to 32 letters, digits, '.', '_', '+' or '-'");
    snprintf(d->version, sizeof(d->version), "%s", version->valuestring);
    if (desc && !string_ok(desc, 0, 1000))
        return lc_err_set(err, LC_ERR_INVALID,
                          "description must be a string of at most 1000 "
                          "characters");
    d->description = strdup(desc ? desc->valuestring : "");
    if (!d->description)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    if (!mod || !cJSON_IsString(mod) ||
        (strcmp(mod->valuestring, "CT") != 0 && strcmp(mod->valuestring, "MR") != 0))
        return lc_err_set(err, LC_ERR_INVALID, "modality must be \"CT\" or \"MR\"");
    snprintf(d->modality, sizeof(d->modality), "%s", mod->valuestring);
    if (!labels)
        return lc_err_set(err, LC_ERR_INVALID, "labels is required");
    if ((rc = parse_labels(labels, d, err)) != LC_OK)
        return rc;
    if (!norm)
        return lc_err_set(err, LC_ERR_INVALID, "normalization is required");
    if ((rc = parse_norm(norm, d, err)) != LC_OK)
        return rc;
    double p[3] = {0}, s[3] = {0};
    int np = patch ? axes(patch, 1, 1, 1024, p) : 0;
    if (np == 0)
        return lc_err_set(err, LC_ERR_INVALID,
                          "patch_size must be [z, y, x] or [y, x] with integers in [1, 1024]");
    int ns = spacing ? axes(spacing, 0, 0, 100, s) : 0;
    if (ns == 0)
        return lc_err_set(err, LC_ERR_INVALID,
                          "spacing_mm must be [z, y, x] or [y, x] with numbers in (0, 100]");
    if (ns != np)
        return lc_err_set(err, LC_ERR_INVALID,
                          "spacing_mm has %d axes but patch_size has %d (one per spatial axis of "
                          "the network)",
                          ns, np);
    d->dims = np;
    if (np == 3) {
        d->spacing[0] = s[2];
        d->spacing[1] = s[1];
        d->spacing[2] = s[0];
        d->patch[0] = (int64_t)p[0];
        d->patch[1] = (int64_t)p[1];
        d->patch[2] = (int64_t)p[2];
    } else {
        d->spacing[0] = s[1];
        d->spacing[1] = s[0];
        d->patch[1] = (int64_t)p[0];
        d->patch[2] = (int64_t)p[1];
    }
    d->step = 0.5;
    if (step) {
        if (!is_number(step) || !(step->valuedouble > 0) || step->valuedouble > 1)
            return lc_err_set(err, LC_ERR_INVALID, "step must be a number in (0, 1]");
        d->step = step->valuedouble;
    }
    if (mirror) {
        if (!cJSON_IsBool(mirror))
            return lc_err_set(err, LC_ERR_INVALID, "mirroring must be true or false");
        d->mirror = cJSON_IsTrue(mirror);
    }
    d->batch = 1;
    if (batch) {
        if (!is_integer(batch, 1, 64))
            return lc_err_set(err, LC_ERR_INVALID, "batch must be an integer in [1, 64]");
        d->batch = (int)batch->valuedouble;
    }
    if (sha) {
        int ok = cJSON_IsString(sha) && strlen(sha->valuestring) == 64;
        for (const char *c = ok ? sha->valuestring : ""; *c && ok; c++)
            ok = (*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f');
        if (!ok)
            return lc_err_set(err, LC_ERR_INVALID,
                              "onnx_sha256 must be 64 lowercase hexadecimal digits");
        snprintf(d->onnx_sha256, sizeof(d->onnx_sha256), "%s", sha->valuestring);
    }
    return LC_OK;
}

static cJSON *code_json(const seg_code *c)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "code", c->code);
    cJSON_AddStringToObject(o, "scheme", c->scheme);
    cJSON_AddStringToObject(o, "meaning", c->meaning);
    return o;
}

cJSON *seg_model_desc_labels_json(const seg_model_desc *d)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < d->nlabels; i++) {
        const seg_model_label *l = &d->labels[i];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "value", l->value);
        cJSON_AddStringToObject(o, "name", l->name);
        cJSON_AddItemToObject(o, "category", code_json(&l->category));
        cJSON_AddItemToObject(o, "type", code_json(&l->type));
        cJSON_AddItemToObject(o, "color", cJSON_CreateIntArray(l->rgb, 3));
        cJSON_AddItemToArray(a, o);
    }
    return a;
}

/* ---- loading ------------------------------------------------------------------------------- */

static lc_rc read_desc(const char *dir, const char *folder, seg_model_desc *d, lc_err *err)
{
    char path[1200], *txt = NULL;
    size_t len = 0;
    snprintf(path, sizeof(path), "%s/%s/model.json", dir, folder);
    lc_rc rc = lc_read_file(path, MAX_JSON_BYTES, &txt, &len, err);
    if (rc != LC_OK)
        return lc_err_wrap(err, "could not read model.json");
    cJSON *j = cJSON_ParseWithLength(txt, len);
    free(txt);
    if (!j)
        return lc_err_set(err, LC_ERR_INVALID, "model.json is not valid JSON");
    rc = seg_model_desc_parse(j, d, err);
    cJSON_Delete(j);
    if (rc != LC_OK)
        return lc_err_wrap(err, "model.json");
    if (strcmp(d->name, folder) != 0)
        return lc_err_set(err, LC_ERR_INVALID,
                          "model.json names the model \"%s\" but its folder is \"%s\"", d->name,
                          folder);
    return LC_OK;
}

#if SEG_HAVE_NN
/* One forward pass on a zero patch: the output's channels as the network computes them (a
 * graph may leave them free), and the patch's plan built now, so the first job is as fast as
 * the rest. */
static lc_rc probe_patch(const seg_model *m, int64_t *channels, lc_err *err)
{
    const seg_model_desc *d = &m->d;
    int64_t in_shape[GPU_NN_MAX_RANK] = {1, 1}, out_shape[GPU_NN_MAX_RANK] = {0};
    size_t n = 1;
    for (int a = 0; a < d->dims; a++) {
        in_shape[2 + a] = d->patch[3 - d->dims + a];
        n *= (size_t)in_shape[2 + a];
    }
    float *in = calloc(n, sizeof(float)), *out = NULL;
    if (!in)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory for a patch");
    /* the first call sizes the output (LC_ERR_TOO_LARGE with out_shape set) */
    lc_rc rc = gpu_nn_forward(m->nn, in, in_shape, d->dims + 2, NULL, 0, out_shape, err);
    if (rc == LC_ERR_TOO_LARGE && out_shape[0] == 1 && out_shape[1] > 0 && out_shape[1] <= 256) {
        size_t cap = n * (size_t)out_shape[1];
        out = malloc(cap * sizeof(float));
        rc = out ? gpu_nn_forward(m->nn, in, in_shape, d->dims + 2, out, cap, out_shape, err)
                 : lc_err_set(err, LC_ERR_NOMEM, "out of memory for a patch's output");
    } else if (rc == LC_OK || rc == LC_ERR_TOO_LARGE) {
        rc = lc_err_set(err, LC_ERR_INVALID,
                        "the network's output for one patch has shape [%lld, %lld, ...]",
                        (long long)out_shape[0], (long long)out_shape[1]);
    }
    if (rc == LC_OK)
        *channels = out_shape[1];
    else
        lc_err_wrap(err, "a forward pass on one patch failed");
    free(out);
    free(in);
    return rc;
}

/* The network must take one channel, give background plus one channel per label, and have
 * the spatial rank (and any fixed spatial size) of the patch. */
static lc_rc check_network(const seg_model *m, lc_err *err)
{
    const gpu_nn_info *in = gpu_nn_model_info(m->nn);
    const seg_model_desc *d = &m->d;
    int64_t channels = 0;
    if (in->spatial_dims != d->dims)
        return lc_err_set(err, LC_ERR_INVALID,
                          "the network is %d-D but patch_size and spacing_mm have %d axes",
                          in->spatial_dims, d->dims);
    if (in->in_channels != 1)
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "the network takes %d input channels; radpipe feeds one (a single "
                          "series)",
                          in->in_channels);
    for (int a = 0; a < d->dims; a++) {
        int64_t fixed = in->in_shape[2 + a], want = d->patch[3 - d->dims + a];
        if (fixed > 0 && fixed != want)
            return lc_err_set(err, LC_ERR_INVALID,
                              "patch_size axis %d is %lld but the network's input is fixed at "
                              "%lld",
                              a, (long long)want, (long long)fixed);
    }
    lc_rc rc = probe_patch(m, &channels, err);
    if (rc != LC_OK)
        return rc;
    if (channels != d->nlabels + 1)
        return lc_err_set(err, LC_ERR_INVALID,
                          "the network gives %lld output channels but model.json lists %d labels "
                          "(plus background: %d)",
                          (long long)channels, d->nlabels, d->nlabels + 1);
    return LC_OK;
}
#endif

static lc_rc load_one(seg_model *m, gpu_ctx *gpu, const char *dir, const char *folder, lc_err *err)
{
    char path[1200], *buf = NULL;
    size_t len = 0;
    struct stat st;
    lc_rc rc = read_desc(dir, folder, &m->d, err);
    if (rc != LC_OK)
        return rc;
    snprintf(path, sizeof(path), "%s/%s/model.onnx", dir, folder);
    if (stat(path, &st) != 0)
        return lc_err_set(err, LC_ERR_NOT_FOUND, "no model.onnx: %s", strerror(errno));
    if ((size_t)st.st_size > MAX_ONNX_BYTES)
        return lc_err_set(err, LC_ERR_TOO_LARGE, "model.onnx has %lld bytes (at most %zu)",
                          (long long)st.st_size, MAX_ONNX_BYTES);
    if ((rc = lc_read_file(path, MAX_ONNX_BYTES, &buf, &len, err)) != LC_OK)
        return lc_err_wrap(err, "could not read model.onnx");
    lc_sha256_hex(buf, len, m->sha256);
    m->onnx_bytes = (long long)len;
    if (m->d.onnx_sha256[0] && strcmp(m->d.onnx_sha256, m->sha256) != 0) {
        free(buf);
        return lc_err_set(err, LC_ERR_INVALID,
                          "model.onnx has SHA-256 %s but model.json's onnx_sha256 says %s",
                          m->sha256, m->d.onnx_sha256);
    }
#if SEG_HAVE_NN
    gpu_nn_model *nn = NULL;
    rc = gpu_nn_load(gpu, buf, len, NULL, &nn, err);
    free(buf);
    if (rc != LC_OK)
        return lc_err_wrap(err, "model.onnx");
    m->nn = nn;
    m->params = gpu_nn_model_info(nn)->params;
    return check_network(m, err);
#else
    (void)gpu;
    free(buf);
    return lc_err_set(err, LC_ERR_UNSUPPORTED,
                      "this build has no inference engine (gpu/nn was not compiled in)");
#endif
}

static void free_model(seg_model *m)
{
    if (!m)
        return;
#if SEG_HAVE_NN
    gpu_nn_free(m->nn);
#endif
    m->nn = NULL;
    seg_model_desc_release(&m->d);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The sub-folders of dir that hold a model.json or a model.onnx, sorted (caller frees). */
static lc_rc model_folders(const char *dir, char ***out, size_t *n, lc_err *err)
{
    DIR *d = opendir(dir);
    if (!d)
        return lc_err_set(err, LC_ERR_CONFIG, "could not open RADPIPE_MODELS_DIR \"%s\": %s", dir,
                          strerror(errno));
    char **v = NULL;
    size_t k = 0, cap = 0;
    lc_rc rc = LC_OK;
    struct dirent *de;
    while ((de = readdir(d))) {
        char p1[1200], p2[1200];
        struct stat st;
        if (de->d_name[0] == '.')
            continue;
        snprintf(p1, sizeof(p1), "%s/%s/model.json", dir, de->d_name);
        snprintf(p2, sizeof(p2), "%s/%s/model.onnx", dir, de->d_name);
        if (stat(p1, &st) != 0 && stat(p2, &st) != 0)
            continue; /* not a model folder */
        if (k == cap) {
            cap = cap ? cap * 2 : 16;
            char **nv = realloc(v, cap * sizeof(*v));
            if (!nv) {
                rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
                break;
            }
            v = nv;
        }
        if (!(v[k] = strdup(de->d_name))) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
            break;
        }
        k++;
    }
    closedir(d);
    if (rc != LC_OK) {
        for (size_t i = 0; i < k; i++)
            free(v[i]);
        free(v);
        return rc;
    }
    if (k)
        qsort(v, k, sizeof(*v), cmp_str);
    *out = v;
    *n = k;
    return LC_OK;
}

static const double load_buckets[] = {0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120};

lc_rc seg_models_load(seg_models *ms, gpu_ctx *gpu, const char *dir, lc_metrics *metrics,
                      lc_err *err)
{
    char **folders = NULL;
    size_t nf = 0;
    memset(ms, 0, sizeof(*ms));
    lc_gauge *loaded = metrics
                           ? lc_metrics_gauge(metrics, "radpipe_models_loaded",
                                              "models resident on the segmenter's backend", NULL)
                           : NULL;
    lc_gauge_set(loaded, 0);
    if (!dir || !dir[0])
        return LC_OK;
    lc_rc rc = model_folders(dir, &folders, &nf, err);
    if (rc != LC_OK)
        return rc;
    ms->v = calloc(nf ? nf : 1, sizeof(*ms->v));
    ms->bad = calloc(nf ? nf : 1, sizeof(*ms->bad));
    if (!ms->v || !ms->bad) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < nf; i++) {
        char labels[200], esc[140];
        seg_model *m = &ms->v[ms->n];
        lc_err e = {0};
        lc_metrics_escape_label(esc, sizeof(esc), folders[i]);
        int64_t t0 = lc_now_ms();
        lc_rc r = load_one(m, gpu, dir, folders[i], &e);
        m->load_seconds = (double)(lc_now_ms() - t0) / 1000.0;
        snprintf(labels, sizeof(labels), "model=\"%s\",result=\"%s\"", esc,
                 r == LC_OK ? "ok" : "error");
        if (metrics)
            lc_counter_inc(lc_metrics_counter(metrics, "radpipe_model_loads_total",
                                              "models read, checked and placed on the backend "
                                              "(at start only: jobs never load)",
                                              labels));
        if (r != LC_OK) {
            lc_log_error("could not load model", LC_LS("model", folders[i]),
                         LC_LS("error", lc_err_msg(&e)));
            free_model(m);
            memset(m, 0, sizeof(*m));
            snprintf(ms->bad[ms->failed].name, sizeof(ms->bad[0].name), "%s", folders[i]);
            snprintf(ms->bad[ms->failed].error, sizeof(ms->bad[0].error), "%s", lc_err_msg(&e));
            ms->failed++;
            if (r == LC_ERR_NOMEM) {
                rc = lc_err_set(err, r, "%s", lc_err_msg(&e));
                goto out;
            }
            continue;
        }
        if (metrics) {
            snprintf(labels, sizeof(labels), "model=\"%s\"", esc);
            lc_histogram_observe(
                lc_metrics_histogram(metrics, "radpipe_model_load_seconds",
                                     "time to load a model at start", labels, load_buckets,
                                     sizeof(load_buckets) / sizeof(load_buckets[0])),
                m->load_seconds);
            m->jobs = lc_metrics_counter(metrics, "radpipe_model_jobs_total",
                                         "segment jobs run on a resident model", labels);
        }
        lc_log_info("model loaded", LC_LS("model", m->d.name), LC_LS("version", m->d.version),
                    LC_LS("modality", m->d.modality), LC_LI("labels", m->d.nlabels),
                    LC_LI("parameters", (long long)m->params), LC_LS("sha256", m->sha256),
                    LC_LD("seconds", m->load_seconds));
        ms->n++;
    }
    lc_gauge_set(loaded, (double)ms->n);
out:
    for (size_t i = 0; i < nf; i++)
        free(folders[i]);
    free(folders);
    if (rc != LC_OK)
        seg_models_release(ms);
    return rc;
}

seg_model *seg_models_find(const seg_models *ms, const char *name)
{
    for (size_t i = 0; ms && i < ms->n; i++)
        if (strcmp(ms->v[i].d.name, name) == 0)
            return &ms->v[i];
    return NULL;
}

const char *seg_models_failure(const seg_models *ms, const char *name)
{
    for (size_t i = 0; ms && i < ms->failed; i++)
        if (strcmp(ms->bad[i].name, name) == 0)
            return ms->bad[i].error;
    return NULL;
}

void seg_models_release(seg_models *ms)
{
    if (!ms)
        return;
    for (size_t i = 0; i < ms->n; i++)
        free_model(&ms->v[i]);
    free(ms->v);
    free(ms->bad);
    memset(ms, 0, sizeof(*ms));
}

/* "{a,b,c}": a PostgreSQL array literal of the model.json axes (slowest first). */
static void pg_array(char *out, size_t cap, const double *v, int n, int integer)
{
    size_t o = (size_t)snprintf(out, cap, "{");
    for (int i = 0; i < n && o < cap; i++)
        o += (size_t)snprintf(out + o, cap - o, integer ? "%s%.0f" : "%s%.17g", i ? "," : "", v[i]);
    if (o < cap)
        snprintf(out + o, cap - o, "}");
}

static lc_rc record_tx(lc_db *db, void *ctx, lc_err *err)
{
    const void *const *a = ctx;
    const seg_models *ms = a[0];
    const char *owner = a[1];
    for (size_t i = 0; i < ms->n; i++) {
        const seg_model *m = &ms->v[i];
        const seg_model_desc *d = &m->d;
        char dims[4], spacing[128], patch[64], bytes[24], params[24], mirror[8];
        double sp[3], pt[3];
        int n = d->dims;
        for (int k = 0; k < n; k++) { /* back to model.json's order: slowest first */
            sp[k] = d->spacing[n - 1 - k];
            pt[k] = (double)d->patch[3 - n + k];
        }
        snprintf(dims, sizeof(dims), "%d", n);
        pg_array(spacing, sizeof(spacing), sp, n, 0);
        pg_array(patch, sizeof(patch), pt, n, 1);
        snprintf(bytes, sizeof(bytes), "%lld", m->onnx_bytes);
        snprintf(params, sizeof(params), "%zu", m->params);
        snprintf(mirror, sizeof(mirror), "%s", d->mirror ? "true" : "false");
        cJSON *labels = seg_model_desc_labels_json(d), *norm = cJSON_CreateObject();
        if (d->norm == SEG_NORM_CT) {
            cJSON_AddStringToObject(norm, "scheme", "ct");
            cJSON_AddNumberToObject(norm, "percentile_00_5", d->clip_lo);
            cJSON_AddNumberToObject(norm, "percentile_99_5", d->clip_hi);
            cJSON_AddNumberToObject(norm, "mean", d->mean);
            cJSON_AddNumberToObject(norm, "std", d->std);
        } else {
            cJSON_AddStringToObject(norm, "scheme", "zscore");
        }
        char *lj = cJSON_PrintUnformatted(labels), *nj = cJSON_PrintUnformatted(norm);
        cJSON_Delete(labels);
        cJSON_Delete(norm);
        if (!lj || !nj) {
            free(lj);
            free(nj);
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        }
        const char *p[14] = {d->name, d->version, d->modality, d->description, lj,        dims,
                             spacing, patch,      nj,          mirror,         m->sha256, bytes,
                             params,  owner};
        lc_rc rc = lc_db_exec(
            db,
            "INSERT INTO models (name, version, modality, description, labels, spatial_dims, "
            "spacing_mm, patch_size, normalization, mirroring, sha256, size_bytes, parameters, "
            "loaded_by, loaded_at) VALUES ($1, $2, $3, $4, $5::jsonb, $6::smallint, "
            "$7::double precision[], $8::integer[], $9::jsonb, $10::boolean, $11, $12::bigint, "
            "$13::bigint, $14, now()) ON CONFLICT (name) DO UPDATE SET version = "
            "EXCLUDED.version, modality = EXCLUDED.modality, description = EXCLUDED.description, "
            "labels = EXCLUDED.labels, spatial_dims = EXCLUDED.spatial_dims, spacing_mm = "
            "EXCLUDED.spacing_mm, patch_size = EXCLUDED.patch_size, normalization = "
            "EXCLUDED.normalization, mirroring = EXCLUDED.mirroring, sha256 = EXCLUDED.sha256, "
            "size_bytes = EXCLUDED.size_bytes, parameters = EXCLUDED.parameters, loaded_by = "
            "EXCLUDED.loaded_by, loaded_at = now()",
            14, p, NULL, err);
        free(lj);
        free(nj);
        if (rc != LC_OK)
            return rc;
    }
    return LC_OK;
}

lc_rc seg_models_record(const seg_models *ms, lc_db *db, const char *owner, lc_err *err)
{
    const void *ctx[2] = {ms, owner};
    if (!ms->n)
        return LC_OK;
    lc_rc rc = lc_db_tx(db, 3, record_tx, (void *)ctx, err);
    return rc == LC_OK ? LC_OK : lc_err_wrap(err, "could not record the models");
}
