/*
 * nn_onnx.c: ONNX ModelProto bytes -> nn_graph, with protobuf-c's generated code
 * (onnx/onnx.pb-c.h, made at build time from Debian libonnx-dev's onnx.proto). Checks the
 * opset, every operator and attribute the engine knows, and every tensor's type and size;
 * any input gives a graph or an error naming what is wrong, never a crash: the nesting depth
 * of the message is bounded before protobuf-c (which recurses) sees it, and its allocations
 * are capped. The ModelProto is freed before returning; the graph owns copies of what it uses.
 * Thread safety: no shared state.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "onnx/onnx.pb-c.h"
#include "nn_internal.h"

/* protobuf-c recurses once per nested message: deeper inputs are refused before it runs. */
#define MAX_DEPTH 24
/* Decoded messages may take at most this many bytes per input byte (plus a constant). */
#define ALLOC_FACTOR 64

/* --- bounded protobuf-c ------------------------------------------------------------------ */

typedef struct alloc_state {
    size_t used, cap;
} alloc_state;

static void *cap_alloc(void *data, size_t size)
{
    alloc_state *st = data;
    if (size > st->cap - st->used || size > SIZE_MAX - 16)
        return NULL;
    size_t *p = malloc(size + 16);
    if (!p)
        return NULL;
    st->used += size;
    p[0] = size;
    return (char *)p + 16;
}

static void cap_free(void *data, void *ptr)
{
    alloc_state *st = data;
    if (!ptr)
        return;
    size_t *p = (size_t *)((char *)ptr - 16);
    st->used -= p[0];
    free(p);
}

/* A varint at *p (< end); 0 when malformed. */
static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    uint64_t r = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        r |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = r;
            return 1;
        }
    }
    return 0;
}

/* Walks the wire format along desc's message-typed fields and fails when messages nest
 * deeper than MAX_DEPTH. Malformed bytes end the walk quietly: protobuf-c reports those. */
static int depth_ok(const ProtobufCMessageDescriptor *desc, const uint8_t *p, const uint8_t *end,
                    int depth)
{
    if (depth > MAX_DEPTH)
        return 0;
    while (p < end) {
        uint64_t key, v;
        if (!read_varint(&p, end, &key))
            return 1;
        uint32_t field = (uint32_t)(key >> 3);
        switch (key & 7) {
        case 0:
            if (!read_varint(&p, end, &v))
                return 1;
            break;
        case 1:
            if (end - p < 8)
                return 1;
            p += 8;
            break;
        case 5:
            if (end - p < 4)
                return 1;
            p += 4;
            break;
        case 2: {
            if (!read_varint(&p, end, &v) || v > (uint64_t)(end - p))
                return 1;
            const ProtobufCFieldDescriptor *f =
                protobuf_c_message_descriptor_get_field(desc, (unsigned)field);
            if (f && f->type == PROTOBUF_C_TYPE_MESSAGE &&
                !depth_ok(f->descriptor, p, p + v, depth + 1))
                return 0;
            p += v;
            break;
        }
        default:
            return 1;
        }
    }
    return 1;
}

/* --- small helpers ------------------------------------------------------------------------ */

float nn_half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

float nn_bf16_to_float(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

int nn_graph_add_val(nn_graph *g, const char *name)
{
    if (g->nvals == g->cap_vals) {
        size_t cap = g->cap_vals ? g->cap_vals * 2 : 64;
        nn_val *v = realloc(g->vals, cap * sizeof(*v));
        if (!v)
            return -1;
        g->vals = v;
        g->cap_vals = cap;
    }
    nn_val *v = &g->vals[g->nvals];
    memset(v, 0, sizeof(*v));
    v->name = strdup(name ? name : "");
    if (!v->name)
        return -1;
    v->producer = -1;
    v->dtype = NN_F32;
    return (int)g->nvals++;
}

/* Value index by name, -1 when absent. Linear: graphs have hundreds of values, and lookups
 * happen once per node input at load. */
static int find_val(const nn_graph *g, const char *name)
{
    for (size_t i = g->nvals; i-- > 0;)
        if (strcmp(g->vals[i].name, name) == 0)
            return (int)i;
    return -1;
}

static const char *str_or(const char *s, const char *dflt)
{
    return s && *s ? s : dflt;
}

/* --- tensors ------------------------------------------------------------------------------ */

static const char *dtype_name(int t)
{
    static const char *const names[] = {"undefined",  "float",   "uint8",  "int8",   "uint16",
                                        "int16",      "int32",   "int64",  "string", "bool",
                                        "float16",    "double",  "uint32", "uint64", "complex64",
                                        "complex128", "bfloat16"};
    return t >= 0 && t < (int)(sizeof(names) / sizeof(names[0])) ? names[t] : "unknown";
}

/* Bytes per element in raw_data, 0 for types the engine does not read. */
static size_t raw_size(int t)
{
    switch (t) {
    case ONNX__TENSOR_PROTO__DATA_TYPE__FLOAT:
    case ONNX__TENSOR_PROTO__DATA_TYPE__INT32:
    case ONNX__TENSOR_PROTO__DATA_TYPE__UINT32:
        return 4;
    case ONNX__TENSOR_PROTO__DATA_TYPE__DOUBLE:
    case ONNX__TENSOR_PROTO__DATA_TYPE__INT64:
    case ONNX__TENSOR_PROTO__DATA_TYPE__UINT64:
        return 8;
    case ONNX__TENSOR_PROTO__DATA_TYPE__FLOAT16:
    case ONNX__TENSOR_PROTO__DATA_TYPE__BFLOAT16:
    case ONNX__TENSOR_PROTO__DATA_TYPE__INT16:
    case ONNX__TENSOR_PROTO__DATA_TYPE__UINT16:
        return 2;
    case ONNX__TENSOR_PROTO__DATA_TYPE__INT8:
    case ONNX__TENSOR_PROTO__DATA_TYPE__UINT8:
    case ONNX__TENSOR_PROTO__DATA_TYPE__BOOL:
        return 1;
    }
    return 0;
}

static int is_float_type(int t)
{
    return t == ONNX__TENSOR_PROTO__DATA_TYPE__FLOAT ||
           t == ONNX__TENSOR_PROTO__DATA_TYPE__FLOAT16 ||
           t == ONNX__TENSOR_PROTO__DATA_TYPE__BFLOAT16 ||
           t == ONNX__TENSOR_PROTO__DATA_TYPE__DOUBLE;
}

/* Element i of little-endian raw bytes of type t, as double (integers up to 2^53 exactly) or
 * int64. */
static void raw_elem(const uint8_t *p, int t, double *f, int64_t *i)
{
    uint64_t u = 0;
    size_t sz = raw_size(t);
    for (size_t k = 0; k < sz; k++)
        u |= (uint64_t)p[k] << (8 * k);
    *f = 0;
    *i = 0;
    switch (t) {
    case ONNX__TENSOR_PROTO__DATA_TYPE__FLOAT: {
        uint32_t b = (uint32_t)u;
        float x;
        memcpy(&x, &b, 4);
        *f = x;
        break;
    }
    case ONNX__TENSOR_PROTO__DATA_TYPE__DOUBLE:
        memcpy(f, &u, 8);
        break;
    case ONNX__TENSOR_PROTO__DATA_TYPE__FLOAT16:
        *f = nn_half_to_float((uint16_t)u);
        break;
    case ONNX__TENSOR_PROTO__DATA_TYPE__BFLOAT16:
        *f = nn_bf16_to_float((uint16_t)u);
        break;
    case ONNX__TENSOR_PROTO__DATA_TYPE__INT8:
        *i = (int64_t)(u & 0x7f) - (int64_t)(u & 0x80);
        break;
    case ONNX__TENSOR_PROTO__DATA_TYPE__INT16:
        *i = (int16_t)u;
        break;
    case ONNX__TENSOR_PROTO__DATA_TYPE__INT32:
        *i = (int32_t)u;
        break;
    default: /* unsigned types and int64 */
        *i = (int64_t)u;
        break;
    }
}

/* Decode a TensorProto into value v: float types become F32, integer types I64. what names
 * the tensor in messages. */
static lc_rc tensor_to_val(const Onnx__TensorProto *t, nn_val *v, const char *what, lc_err *err)
{
    int dt = t->has_data_type ? t->data_type : 0;
    size_t count = 1;

    if (t->has_data_location && t->data_location == ONNX__TENSOR_PROTO__DATA_LOCATION__EXTERNAL)
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "tensor \"%s\" keeps its data in an external file: save the model with "
                          "its weights inside",
                          what);
    if (t->segment)
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "tensor \"%s\" is segmented", what);
    if (!raw_size(dt))
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "tensor \"%s\" has unsupported type %s (%d)",
                          what, dtype_name(dt), dt);
    if (t->n_dims > NN_MAX_RANK)
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "tensor \"%s\" has rank %zu, at most %d", what,
                          t->n_dims, NN_MAX_RANK);
    for (size_t i = 0; i < t->n_dims; i++) {
        if (t->dims[i] < 0)
            return lc_err_set(err, LC_ERR_INVALID, "tensor \"%s\" has negative dimension %lld",
                              what, (long long)t->dims[i]);
        if (t->dims[i] > 0 && count > ((size_t)1 << 34) / (size_t)t->dims[i])
            return lc_err_set(err, LC_ERR_TOO_LARGE, "tensor \"%s\" is too large", what);
        count *= (size_t)t->dims[i];
        v->dims[i] = t->dims[i];
    }
    v->rank = (int)t->n_dims;
    v->count = count;
    v->is_const = 1;
    v->dtype = is_float_type(dt) ? NN_F32 : NN_I64;

    /* where the elements are, and how many */
    size_t have;
    const char *field;
    if (t->has_raw_data) {
        have = t->raw_data.len / raw_size(dt);
        field = "raw_data";
        if (t->raw_data.len % raw_size(dt))
            return lc_err_set(err, LC_ERR_INVALID,
                              "tensor \"%s\": raw_data holds %zu bytes, not a multiple of %zu",
                              what, t->raw_data.len, raw_size(dt));
    } else {
        switch (dt) {
        case ONNX__TENSOR_PROTO__DATA_TYPE__FLOAT:
            have = t->n_float_data, field = "float_data";
            break;
        case ONNX__TENSOR_PROTO__DATA_TYPE__DOUBLE:
            have = t->n_double_data, field = "double_data";
            break;
        case ONNX__TENSOR_PROTO__DATA_TYPE__INT64:
            have = t->n_int64_data, field = "int64_data";
            break;
        case ONNX__TENSOR_PROTO__DATA_TYPE__UINT32:
        case ONNX__TENSOR_PROTO__DATA_TYPE__UINT64:
            have = t->n_uint64_data, field = "uint64_data";
            break;
        default: /* int32_data carries the 16-bit floats' bits and the small integers */
            have = t->n_int32_data, field = "int32_data";
            break;
        }
    }
    if (have != count)
        return lc_err_set(err, LC_ERR_INVALID,
                          "tensor \"%s\" (%s): %s holds %zu elements, its shape needs %zu", what,
                          dtype_name(dt), field, have, count);

    size_t esize = v->dtype == NN_F32 ? sizeof(float) : sizeof(int64_t);
    v->data = malloc(count ? count * esize : 1);
    if (!v->data)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate tensor \"%s\"", what);
    float *fo = v->data;
    int64_t *io = v->data;
    for (size_t i = 0; i < count; i++) {
        double f = 0;
        int64_t n = 0;
        if (t->has_raw_data) {
            raw_elem(t->raw_data.data + i * raw_size(dt), dt, &f, &n);
        } else {
            switch (dt) {
            case ONNX__TENSOR_PROTO__DATA_TYPE__FLOAT:
                f = t->float_data[i];
                break;
            case ONNX__TENSOR_PROTO__DATA_TYPE__DOUBLE:
                f = t->double_data[i];
                break;
            case ONNX__TENSOR_PROTO__DATA_TYPE__INT64:
                n = t->int64_data[i];
                break;
            case ONNX__TENSOR_PROTO__DATA_TYPE__UINT32:
            case ONNX__TENSOR_PROTO__DATA_TYPE__UINT64:
                n = (int64_t)t->uint64_data[i];
                break;
            case ONNX__TENSOR_PROTO__DATA_TYPE__FLOAT16:
                f = nn_half_to_float((uint16_t)t->int32_data[i]);
                break;
            case ONNX__TENSOR_PROTO__DATA_TYPE__BFLOAT16:
                f = nn_bf16_to_float((uint16_t)t->int32_data[i]);
                break;
            default:
                n = t->int32_data[i];
                break;
            }
        }
        if (v->dtype == NN_F32)
            fo[i] = (float)f;
        else
            io[i] = n;
    }
    return LC_OK;
}

/* --- attributes --------------------------------------------------------------------------- */

typedef struct nctx {
    const Onnx__NodeProto *np;
    const nn_node *n;
    int64_t opset;
    lc_err *err;
} nctx;

static const Onnx__AttributeProto *attr(const nctx *c, const char *name)
{
    for (size_t i = 0; i < c->np->n_attribute; i++)
        if (c->np->attribute[i]->name && strcmp(c->np->attribute[i]->name, name) == 0)
            return c->np->attribute[i];
    return NULL;
}

static lc_rc bad_attr(const nctx *c, const char *name, const char *why)
{
    return lc_err_set(c->err, LC_ERR_INVALID, "node \"%s\" (%s): attribute \"%s\" %s",
                      nn_node_label(c->n), c->n->op_type, name, why);
}

static lc_rc unsup_attr(const nctx *c, const char *name, const char *why)
{
    return lc_err_set(c->err, LC_ERR_UNSUPPORTED, "node \"%s\" (%s): attribute \"%s\" %s",
                      nn_node_label(c->n), c->n->op_type, name, why);
}

static lc_rc get_int(const nctx *c, const char *name, int64_t dflt, int64_t *out)
{
    const Onnx__AttributeProto *a = attr(c, name);
    *out = dflt;
    if (!a)
        return LC_OK;
    if (!a->has_i && !(a->has_type && a->type == ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INT))
        return bad_attr(c, name, "is not an integer");
    *out = a->i;
    return LC_OK;
}

static lc_rc get_float(const nctx *c, const char *name, float dflt, float *out)
{
    const Onnx__AttributeProto *a = attr(c, name);
    *out = dflt;
    if (!a)
        return LC_OK;
    if (!a->has_f && !(a->has_type && a->type == ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__FLOAT))
        return bad_attr(c, name, "is not a float");
    if (!isfinite(a->f))
        return bad_attr(c, name, "is not finite");
    *out = a->f;
    return LC_OK;
}

/* Up to max integers; *n = -1 when absent. */
static lc_rc get_ints(const nctx *c, const char *name, int64_t *out, int max, int *n)
{
    const Onnx__AttributeProto *a = attr(c, name);
    *n = -1;
    if (!a)
        return LC_OK;
    if (a->n_ints == 0 && a->has_type && a->type != ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INTS)
        return bad_attr(c, name, "is not a list of integers");
    if (a->n_ints > (size_t)max)
        return unsup_attr(c, name, "has too many entries");
    for (size_t i = 0; i < a->n_ints; i++)
        out[i] = a->ints[i];
    *n = (int)a->n_ints;
    return LC_OK;
}

/* The string attribute into buf ("" when absent). */
static lc_rc get_str(const nctx *c, const char *name, char *buf, size_t cap)
{
    const Onnx__AttributeProto *a = attr(c, name);
    buf[0] = 0;
    if (!a)
        return LC_OK;
    if (!a->has_s)
        return bad_attr(c, name, "is not a string");
    if (a->s.len >= cap)
        return bad_attr(c, name, "is too long");
    memcpy(buf, a->s.data, a->s.len);
    buf[a->s.len] = 0;
    return LC_OK;
}

/* Every attribute of the node must be in allowed (a space-separated list). */
static lc_rc check_known(const nctx *c, const char *allowed)
{
    for (size_t i = 0; i < c->np->n_attribute; i++) {
        const char *nm = c->np->attribute[i]->name ? c->np->attribute[i]->name : "";
        size_t l = strlen(nm);
        const char *p = allowed;
        int found = 0;
        while (l && (p = strstr(p, nm)) != NULL) {
            if ((p == allowed || p[-1] == ' ') && (p[l] == ' ' || p[l] == 0)) {
                found = 1;
                break;
            }
            p += l;
        }
        if (!found)
            return lc_err_set(c->err, LC_ERR_UNSUPPORTED,
                              "node \"%s\" (%s): unsupported attribute \"%s\"", nn_node_label(c->n),
                              c->n->op_type, nm);
    }
    return LC_OK;
}

/* kernel_shape, strides, dilations, pads, auto_pad of convolutions and pools. */
static lc_rc spatial_attrs(const nctx *c, nn_attrs *a)
{
    int64_t tmp[6];
    int n;
    char s[32];
    lc_rc rc;

    if ((rc = get_ints(c, "kernel_shape", a->kernel, 3, &n)) != LC_OK)
        return rc;
    a->has_kernel = n > 0;
    if (n > 0)
        a->nsp = n;
    for (int i = 0; i < n; i++)
        if (a->kernel[i] < 1)
            return bad_attr(c, "kernel_shape", "has an entry below 1");
    const char *lists[] = {"strides", "dilations"};
    int64_t *dst[] = {a->stride, a->dil};
    for (int l = 0; l < 2; l++) {
        for (int i = 0; i < 3; i++)
            dst[l][i] = 1;
        if ((rc = get_ints(c, lists[l], dst[l], 3, &n)) != LC_OK)
            return rc;
        if (n > 0 && a->nsp && n != a->nsp)
            return bad_attr(c, lists[l], "does not match kernel_shape's length");
        if (n > 0)
            a->nsp = n;
        for (int i = 0; i < n; i++)
            if (dst[l][i] < 1)
                return bad_attr(c, lists[l], "has an entry below 1");
    }
    if ((rc = get_ints(c, "pads", tmp, 6, &n)) != LC_OK)
        return rc;
    if (n > 0) {
        if (n % 2 || (a->nsp && n != 2 * a->nsp))
            return bad_attr(c, "pads", "does not hold a begin and an end per spatial axis");
        a->nsp = n / 2;
        for (int i = 0; i < n / 2; i++) {
            a->pad_b[i] = tmp[i];
            a->pad_e[i] = tmp[i + n / 2];
            if (tmp[i] < 0 || tmp[i + n / 2] < 0)
                return unsup_attr(c, "pads", "has a negative entry");
        }
    }
    if ((rc = get_str(c, "auto_pad", s, sizeof(s))) != LC_OK)
        return rc;
    if (!*s || strcmp(s, "NOTSET") == 0)
        a->auto_pad = NN_PAD_NOTSET;
    else if (strcmp(s, "SAME_UPPER") == 0)
        a->auto_pad = NN_PAD_SAME_UPPER;
    else if (strcmp(s, "SAME_LOWER") == 0)
        a->auto_pad = NN_PAD_SAME_LOWER;
    else if (strcmp(s, "VALID") == 0)
        a->auto_pad = NN_PAD_VALID;
    else
        return bad_attr(c, "auto_pad", "is not NOTSET, SAME_UPPER, SAME_LOWER or VALID");
    return LC_OK;
}

static lc_rc resize_attrs(const nctx *c, nn_attrs *a, int upsample)
{
    char s[64];
    int64_t v;
    lc_rc rc;

    if ((rc = get_str(c, "mode", s, sizeof(s))) != LC_OK)
        return rc;
    if (!*s || strcmp(s, "nearest") == 0)
        a->linear = 0;
    else if (strcmp(s, "linear") == 0 || strcmp(s, "bilinear") == 0 || strcmp(s, "trilinear") == 0)
        a->linear = 1;
    else
        return unsup_attr(c, "mode", "is not nearest or linear");
    /* Upsample and Resize-10 use asymmetric coordinates and floor for nearest. */
    a->coord = NN_COORD_ASYMMETRIC;
    a->nearest = NN_ROUND_FLOOR;
    if (upsample) {
        if (c->opset < 9) {
            const Onnx__AttributeProto *sc = attr(c, "scales");
            if (!sc || sc->n_floats < 3 || sc->n_floats > NN_MAX_RANK)
                return bad_attr(c, "scales", "is missing or of the wrong length");
            for (size_t i = 0; i < sc->n_floats; i++) {
                if (!(sc->floats[i] > 0) || !isfinite(sc->floats[i]))
                    return bad_attr(c, "scales", "has an entry that is not positive");
                a->attr_f[i] = sc->floats[i];
            }
            a->nattr_f = (int)sc->n_floats;
            a->scales_attr = 1;
        }
        return LC_OK;
    }
    if (c->opset < 11)
        return LC_OK;
    if ((rc = get_str(c, "coordinate_transformation_mode", s, sizeof(s))) != LC_OK)
        return rc;
    if (!*s || strcmp(s, "half_pixel") == 0)
        a->coord = NN_COORD_HALF_PIXEL;
    else if (strcmp(s, "pytorch_half_pixel") == 0)
        a->coord = NN_COORD_PYTORCH_HALF_PIXEL;
    else if (strcmp(s, "align_corners") == 0)
        a->coord = NN_COORD_ALIGN_CORNERS;
    else if (strcmp(s, "asymmetric") == 0)
        a->coord = NN_COORD_ASYMMETRIC;
    else if (strcmp(s, "tf_half_pixel_for_nn") == 0)
        a->coord = NN_COORD_TF_HALF_PIXEL_NN;
    else
        return unsup_attr(c, "coordinate_transformation_mode", "is not supported");
    if ((rc = get_str(c, "nearest_mode", s, sizeof(s))) != LC_OK)
        return rc;
    if (!*s || strcmp(s, "round_prefer_floor") == 0)
        a->nearest = NN_ROUND_PREFER_FLOOR;
    else if (strcmp(s, "round_prefer_ceil") == 0)
        a->nearest = NN_ROUND_PREFER_CEIL;
    else if (strcmp(s, "floor") == 0)
        a->nearest = NN_ROUND_FLOOR;
    else if (strcmp(s, "ceil") == 0)
        a->nearest = NN_ROUND_CEIL;
    else
        return bad_attr(c, "nearest_mode", "is not a known rounding");
    if ((rc = get_int(c, "exclude_outside", 0, &v)) != LC_OK)
        return rc;
    if (v)
        return unsup_attr(c, "exclude_outside", "must be 0");
    if ((rc = get_int(c, "antialias", 0, &v)) != LC_OK)
        return rc;
    if (v)
        return unsup_attr(c, "antialias", "must be 0");
    if (attr(c, "axes"))
        return unsup_attr(c, "axes", "is not supported (scales or sizes must cover every axis)");
    if ((rc = get_str(c, "keep_aspect_ratio_policy", s, sizeof(s))) != LC_OK)
        return rc;
    if (*s && strcmp(s, "stretch") != 0)
        return unsup_attr(c, "keep_aspect_ratio_policy", "must be stretch");
    return LC_OK;
}

/* A Constant node's value (or ConstantOfShape's) into a new constant value of g. */
static lc_rc constant_value(const nctx *c, nn_graph *g, int is_cos, int *vi)
{
    const Onnx__AttributeProto *a;
    lc_rc rc;
    int idx = nn_graph_add_val(g, "");
    if (idx < 0)
        return lc_err_set(c->err, LC_ERR_NOMEM, "could not allocate a constant");
    nn_val *v = &g->vals[idx];
    *vi = idx;
    v->is_const = 1;
    if ((a = attr(c, "value")) != NULL) {
        if (!a->t)
            return bad_attr(c, "value", "is not a tensor");
        rc = tensor_to_val(a->t, v, nn_node_label(c->n), c->err);
        if (rc == LC_OK && is_cos && v->count != 1)
            return bad_attr(c, "value", "must hold one element");
        return rc;
    }
    if (is_cos) { /* default: a float 0 */
        v->data = calloc(1, sizeof(float));
        v->count = 1;
        v->rank = 1;
        v->dims[0] = 1;
        return v->data ? LC_OK : lc_err_set(c->err, LC_ERR_NOMEM, "out of memory");
    }
    if ((a = attr(c, "value_float")) != NULL || (a = attr(c, "value_floats")) != NULL) {
        int one = strcmp(a->name, "value_float") == 0;
        size_t n = one ? 1 : a->n_floats;
        v->data = malloc((n ? n : 1) * sizeof(float));
        if (!v->data)
            return lc_err_set(c->err, LC_ERR_NOMEM, "out of memory");
        for (size_t i = 0; i < n; i++)
            ((float *)v->data)[i] = one ? a->f : a->floats[i];
        v->count = n;
        v->rank = one ? 0 : 1;
        v->dims[0] = (int64_t)n;
        return LC_OK;
    }
    if ((a = attr(c, "value_int")) != NULL || (a = attr(c, "value_ints")) != NULL) {
        int one = strcmp(a->name, "value_int") == 0;
        size_t n = one ? 1 : a->n_ints;
        v->dtype = NN_I64;
        v->data = malloc((n ? n : 1) * sizeof(int64_t));
        if (!v->data)
            return lc_err_set(c->err, LC_ERR_NOMEM, "out of memory");
        for (size_t i = 0; i < n; i++)
            ((int64_t *)v->data)[i] = one ? a->i : a->ints[i];
        v->count = n;
        v->rank = one ? 0 : 1;
        v->dims[0] = (int64_t)n;
        return LC_OK;
    }
    return lc_err_set(c->err, LC_ERR_UNSUPPORTED,
                      "node \"%s\" (Constant): only value, value_float(s) and value_int(s) are "
                      "supported",
                      nn_node_label(c->n));
}

/* --- operators ---------------------------------------------------------------------------- */

typedef struct op_def {
    const char *name;
    nn_opk op;
    int min_in, max_in;
    const char *attrs; /* the attributes the engine understands */
} op_def;

static const op_def ops[] = {
    {"Conv", NN_OP_CONV, 2, 3, "auto_pad dilations group kernel_shape pads strides"},
    {"ConvTranspose", NN_OP_CONVT, 2, 3,
     "auto_pad dilations group kernel_shape output_padding output_shape pads strides"},
    {"InstanceNormalization", NN_OP_INORM, 3, 3, "epsilon"},
    {"BatchNormalization", NN_OP_BNORM, 5, 5, "epsilon momentum spatial training_mode is_test"},
    {"Relu", NN_OP_RELU, 1, 1, ""},
    {"LeakyRelu", NN_OP_LEAKY, 1, 1, "alpha"},
    {"Sigmoid", NN_OP_SIGMOID, 1, 1, ""},
    {"PRelu", NN_OP_PRELU, 2, 2, ""},
    {"Add", NN_OP_ADD, 2, 2, ""},
    {"Sub", NN_OP_SUB, 2, 2, ""},
    {"Mul", NN_OP_MUL, 2, 2, ""},
    {"Div", NN_OP_DIV, 2, 2, ""},
    {"Concat", NN_OP_CONCAT, 1, 64, "axis"},
    {"Softmax", NN_OP_SOFTMAX, 1, 1, "axis"},
    {"ArgMax", NN_OP_ARGMAX, 1, 1, "axis keepdims select_last_index"},
    {"MaxPool", NN_OP_MAXPOOL, 1, 1,
     "auto_pad ceil_mode dilations kernel_shape pads storage_order strides"},
    {"AveragePool", NN_OP_AVGPOOL, 1, 1,
     "auto_pad ceil_mode count_include_pad dilations kernel_shape pads strides"},
    {"GlobalAveragePool", NN_OP_GAP, 1, 1, ""},
    {"Resize", NN_OP_RESIZE, 1, 4,
     "mode coordinate_transformation_mode nearest_mode cubic_coeff_a exclude_outside "
     "extrapolation_value antialias axes keep_aspect_ratio_policy"},
    {"Upsample", NN_OP_RESIZE, 1, 2, "mode scales"},
    {"Reshape", NN_OP_RESHAPE, 2, 2, "allowzero"},
    {"Flatten", NN_OP_FLATTEN, 1, 1, "axis"},
    {"Identity", NN_OP_IDENTITY, 1, 1, ""},
    {"Dropout", NN_OP_IDENTITY, 1, 3, "ratio seed is_test"},
    {"Squeeze", NN_OP_SQUEEZE, 1, 2, "axes"},
    {"Unsqueeze", NN_OP_UNSQUEEZE, 1, 2, "axes"},
    {"Cast", NN_OP_CAST, 1, 1, "to saturate"},
    {"Constant", NN_OP_CONSTANT, 0, 0, "value value_float value_floats value_int value_ints"},
    {"Shape", NN_OP_SHAPE, 1, 1, "start end"},
    {"Gather", NN_OP_GATHER, 2, 2, "axis"},
    {"Slice", NN_OP_SLICE, 1, 5, "starts ends axes"},
    {"ConstantOfShape", NN_OP_CONST_OF_SHAPE, 1, 1, "value"},
};

static const op_def *find_op(const char *name)
{
    for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++)
        if (strcmp(ops[i].name, name) == 0)
            return &ops[i];
    return NULL;
}

static lc_rc parse_attrs(const nctx *c, nn_node *n, nn_graph *g)
{
    nn_attrs *a = &n->a;
    int64_t v;
    float f;
    int cnt;
    lc_rc rc;

    a->alpha = 0.01f;
    a->eps = 1e-5f;
    a->group = 1;
    a->keepdims = 1;
    a->value = -1;
    switch (n->op) {
    case NN_OP_CONV:
    case NN_OP_CONVT:
        if ((rc = spatial_attrs(c, a)) != LC_OK ||
            (rc = get_int(c, "group", 1, &a->group)) != LC_OK)
            return rc;
        if (a->group < 1)
            return bad_attr(c, "group", "is below 1");
        if (n->op == NN_OP_CONVT) {
            if ((rc = get_ints(c, "output_padding", a->out_pad, 3, &cnt)) != LC_OK)
                return rc;
            if (cnt > 0 && a->nsp && cnt != a->nsp)
                return bad_attr(c, "output_padding", "does not match the spatial axes");
            for (int i = 0; i < cnt; i++)
                if (a->out_pad[i] < 0)
                    return bad_attr(c, "output_padding", "has a negative entry");
            if ((rc = get_ints(c, "output_shape", a->out_shape, 3, &cnt)) != LC_OK)
                return rc;
            a->has_out_shape = cnt > 0;
            for (int i = 0; i < cnt; i++)
                if (a->out_shape[i] < 1)
                    return bad_attr(c, "output_shape", "has an entry below 1");
        }
        return LC_OK;
    case NN_OP_MAXPOOL:
    case NN_OP_AVGPOOL:
        if ((rc = spatial_attrs(c, a)) != LC_OK)
            return rc;
        if (!a->has_kernel)
            return bad_attr(c, "kernel_shape", "is missing");
        if ((rc = get_int(c, "ceil_mode", 0, &v)) != LC_OK)
            return rc;
        a->ceil_mode = v != 0;
        if ((rc = get_int(c, "count_include_pad", 0, &v)) != LC_OK)
            return rc;
        a->count_include_pad = v != 0;
        return LC_OK;
    case NN_OP_INORM:
        return get_float(c, "epsilon", 1e-5f, &a->eps);
    case NN_OP_BNORM:
        if ((rc = get_float(c, "epsilon", 1e-5f, &a->eps)) != LC_OK)
            return rc;
        if ((rc = get_int(c, "spatial", 1, &v)) != LC_OK)
            return rc;
        if (v != 1)
            return unsup_attr(c, "spatial", "must be 1");
        if ((rc = get_int(c, "training_mode", 0, &v)) != LC_OK)
            return rc;
        if (v != 0)
            return unsup_attr(c, "training_mode", "must be 0 (inference)");
        return LC_OK;
    case NN_OP_LEAKY:
        a->act = NN_ACT_LEAKY;
        return get_float(c, "alpha", 0.01f, &a->alpha);
    case NN_OP_RELU:
        a->act = NN_ACT_RELU;
        return LC_OK;
    case NN_OP_SIGMOID:
        a->act = NN_ACT_SIGMOID;
        return LC_OK;
    case NN_OP_CONCAT:
        if (!attr(c, "axis"))
            return bad_attr(c, "axis", "is missing");
        return get_int(c, "axis", 0, &a->axis);
    case NN_OP_SOFTMAX:
        a->old_softmax = c->opset < 13;
        return get_int(c, "axis", c->opset < 13 ? 1 : -1, &a->axis);
    case NN_OP_ARGMAX:
        if ((rc = get_int(c, "axis", 0, &a->axis)) != LC_OK ||
            (rc = get_int(c, "keepdims", 1, &v)) != LC_OK)
            return rc;
        a->keepdims = v != 0;
        if ((rc = get_int(c, "select_last_index", 0, &v)) != LC_OK)
            return rc;
        a->select_last = v != 0;
        return LC_OK;
    case NN_OP_RESIZE:
        return resize_attrs(c, a, strcmp(n->op_type, "Upsample") == 0);
    case NN_OP_RESHAPE:
        if ((rc = get_int(c, "allowzero", 0, &v)) != LC_OK)
            return rc;
        a->allowzero = v != 0;
        return LC_OK;
    case NN_OP_FLATTEN:
        return get_int(c, "axis", 1, &a->axis);
    case NN_OP_IDENTITY:
        if (strcmp(n->op_type, "Dropout") == 0 && n->nin > 1 && c->opset >= 12) {
            /* training_mode input: inference only */
        }
        return LC_OK;
    case NN_OP_SQUEEZE:
    case NN_OP_UNSQUEEZE:
        if ((rc = get_ints(c, "axes", a->ints[0], NN_MAX_RANK, &cnt)) != LC_OK)
            return rc;
        a->has_ints[0] = cnt >= 0;
        a->nints[0] = cnt > 0 ? cnt : 0;
        if (c->opset >= 13 && cnt >= 0)
            return bad_attr(c, "axes", "is an input from opset 13 on");
        return LC_OK;
    case NN_OP_CAST:
        if (!attr(c, "to"))
            return bad_attr(c, "to", "is missing");
        if ((rc = get_int(c, "to", 0, &v)) != LC_OK)
            return rc;
        if (!raw_size((int)v) || v > 16)
            return unsup_attr(c, "to", "names a type the engine does not handle");
        a->to = (int)v;
        return LC_OK;
    case NN_OP_CONSTANT:
        if ((rc = constant_value(c, g, 0, &a->value)) != LC_OK)
            return rc;
        return LC_OK;
    case NN_OP_CONST_OF_SHAPE:
        return constant_value(c, g, 1, &a->value);
    case NN_OP_SHAPE:
        if ((rc = get_int(c, "start", 0, &a->start)) != LC_OK)
            return rc;
        a->has_end = attr(c, "end") != NULL;
        return get_int(c, "end", 0, &a->end);
    case NN_OP_GATHER:
        return get_int(c, "axis", 0, &a->axis);
    case NN_OP_SLICE:
        if (c->opset < 10) {
            const char *names[] = {"starts", "ends", "axes"};
            for (int i = 0; i < 3; i++) {
                if ((rc = get_ints(c, names[i], a->ints[i], NN_MAX_RANK, &cnt)) != LC_OK)
                    return rc;
                a->has_ints[i] = cnt >= 0;
                a->nints[i] = cnt > 0 ? cnt : 0;
            }
            if (!a->has_ints[0] || !a->has_ints[1] || a->nints[0] != a->nints[1])
                return bad_attr(c, "starts", "and ends are missing or of different lengths");
        }
        return LC_OK;
    default:
        (void)f;
        return LC_OK;
    }
}

/* --- graph ------------------------------------------------------------------------------- */

static lc_rc add_node(nn_graph *g, nn_node **out, lc_err *err)
{
    if (g->nnodes == g->cap_nodes) {
        size_t cap = g->cap_nodes ? g->cap_nodes * 2 : 64;
        nn_node *n = realloc(g->nodes, cap * sizeof(*n));
        if (!n)
            return lc_err_set(err, LC_ERR_NOMEM, "could not allocate the graph's nodes");
        g->nodes = n;
        g->cap_nodes = cap;
    }
    *out = &g->nodes[g->nnodes++];
    memset(*out, 0, sizeof(**out));
    return LC_OK;
}

/* The graph input's shape: a float tensor of rank 3 to NN_MAX_RT_RANK. */
static lc_rc input_shape(const Onnx__ValueInfoProto *vi, nn_val *v, lc_err *err)
{
    const Onnx__TypeProto *t = vi->type;
    if (!t || t->value_case != ONNX__TYPE_PROTO__VALUE_TENSOR_TYPE || !t->tensor_type)
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "graph input \"%s\" is not a tensor", v->name);
    const Onnx__TypeProto__Tensor *tt = t->tensor_type;
    if (tt->has_elem_type && tt->elem_type != ONNX__TENSOR_PROTO__DATA_TYPE__FLOAT)
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "graph input \"%s\" has type %s, not float",
                          v->name, dtype_name(tt->elem_type));
    if (!tt->shape)
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "graph input \"%s\" has no shape", v->name);
    if (tt->shape->n_dim < 3 || tt->shape->n_dim > 5)
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "graph input \"%s\" has rank %zu: expected N, C and 1 to 3 spatial axes",
                          v->name, tt->shape->n_dim);
    v->rank = (int)tt->shape->n_dim;
    for (size_t i = 0; i < tt->shape->n_dim; i++) {
        const Onnx__TensorShapeProto__Dimension *d = tt->shape->dim[i];
        if (d->value_case == ONNX__TENSOR_SHAPE_PROTO__DIMENSION__VALUE_DIM_VALUE) {
            if (d->dim_value < 1 || d->dim_value > ((int64_t)1 << 32))
                return lc_err_set(err, LC_ERR_INVALID, "graph input \"%s\": dimension %zu is %lld",
                                  v->name, i, (long long)d->dim_value);
            v->dims[i] = d->dim_value;
        } else {
            v->dims[i] = -1; /* dim_param or unset: free */
        }
    }
    v->is_input = 1;
    return LC_OK;
}

static lc_rc parse_graph(const Onnx__ModelProto *mp, nn_graph *g, lc_err *err)
{
    const Onnx__GraphProto *gp = mp->graph;
    lc_rc rc;

    if (!gp)
        return lc_err_set(err, LC_ERR_INVALID, "ONNX model has no graph");
    if (gp->n_sparse_initializer)
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "sparse initializers are not supported");

    /* opset of the default domain */
    g->opset = -1;
    for (size_t i = 0; i < mp->n_opset_import; i++) {
        const Onnx__OperatorSetIdProto *o = mp->opset_import[i];
        if (!o->domain || !*o->domain || strcmp(o->domain, "ai.onnx") == 0)
            g->opset = o->has_version ? o->version : 1;
    }
    if (g->opset < 0)
        return lc_err_set(err, LC_ERR_INVALID, "ONNX model imports no default-domain opset");
    if (g->opset < NN_OPSET_MIN || g->opset > NN_OPSET_MAX)
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "ONNX opset %lld is not supported (supported: %d to %d)",
                          (long long)g->opset, NN_OPSET_MIN, NN_OPSET_MAX);

    for (size_t i = 0; i < gp->n_initializer; i++) {
        const Onnx__TensorProto *t = gp->initializer[i];
        if (!t->name || !*t->name)
            return lc_err_set(err, LC_ERR_INVALID, "initializer %zu has no name", i);
        if (find_val(g, t->name) >= 0)
            return lc_err_set(err, LC_ERR_INVALID, "initializer \"%s\" is defined twice", t->name);
        int vi = nn_graph_add_val(g, t->name);
        if (vi < 0)
            return lc_err_set(err, LC_ERR_NOMEM, "could not allocate the graph's values");
        if ((rc = tensor_to_val(t, &g->vals[vi], t->name, err)) != LC_OK)
            return rc;
    }

    g->input = -1;
    for (size_t i = 0; i < gp->n_input; i++) {
        const char *nm = gp->input[i]->name;
        if (!nm || !*nm)
            return lc_err_set(err, LC_ERR_INVALID, "graph input %zu has no name", i);
        if (find_val(g, nm) >= 0) /* an initializer listed as an input (IR < 4) */
            continue;
        if (g->input >= 0)
            return lc_err_set(err, LC_ERR_UNSUPPORTED,
                              "the graph has more than one input (\"%s\", \"%s\"): one image "
                              "tensor is supported",
                              g->vals[g->input].name, nm);
        int vi = nn_graph_add_val(g, nm);
        if (vi < 0)
            return lc_err_set(err, LC_ERR_NOMEM, "could not allocate the graph's values");
        g->input = vi;
        if ((rc = input_shape(gp->input[i], &g->vals[vi], err)) != LC_OK)
            return rc;
    }
    if (g->input < 0)
        return lc_err_set(err, LC_ERR_INVALID, "the graph has no input");

    /* nodes: outputs first (any order of definition), inputs resolved afterwards */
    for (size_t i = 0; i < gp->n_node; i++) {
        const Onnx__NodeProto *np = gp->node[i];
        nn_node *n = NULL;
        const char *ot = np->op_type ? np->op_type : "";
        if ((rc = add_node(g, &n, err)) != LC_OK)
            return rc;
        n->name = strdup(str_or(np->name, np->n_output ? str_or(np->output[0], "") : ""));
        if (!n->name)
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        n->op_type = "?";
        const op_def *d = find_op(ot);
        if (np->domain && *np->domain && strcmp(np->domain, "ai.onnx") != 0)
            return lc_err_set(err, LC_ERR_UNSUPPORTED,
                              "node \"%s\": operator \"%s\" of domain \"%s\" is not supported",
                              n->name, ot, np->domain);
        if (!d)
            return lc_err_set(err, LC_ERR_UNSUPPORTED,
                              "node \"%s\": operator \"%.64s\" is not supported", n->name, ot);
        n->op = d->op;
        n->op_type = d->name;
        if (np->n_input < (size_t)d->min_in || np->n_input > (size_t)d->max_in)
            return lc_err_set(err, LC_ERR_INVALID,
                              "node \"%s\" (%s): %zu inputs, expected %d to %d", n->name, d->name,
                              np->n_input, d->min_in, d->max_in);
        if (np->n_output < 1 || np->n_output > 4)
            return lc_err_set(err, LC_ERR_INVALID, "node \"%s\" (%s): %zu outputs", n->name,
                              d->name, np->n_output);
        n->nin = (int)np->n_input;
        n->nout = (int)np->n_output;
        n->in = calloc(np->n_input ? np->n_input : 1, sizeof(int));
        if (!n->in)
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        for (int k = 0; k < 4; k++)
            n->out[k] = -1;
        for (size_t k = 0; k < np->n_output; k++) {
            const char *on = np->output[k] ? np->output[k] : "";
            if (!*on) /* an optional output left out */
                continue;
            if (find_val(g, on) >= 0)
                return lc_err_set(err, LC_ERR_INVALID,
                                  "node \"%s\" (%s): output \"%s\" is defined twice", n->name,
                                  d->name, on);
            int vi = nn_graph_add_val(g, on);
            if (vi < 0)
                return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
            n = &g->nodes[g->nnodes - 1];
            g->vals[vi].producer = (int)(g->nnodes - 1);
            n->out[k] = vi;
        }
        if (n->out[0] < 0)
            return lc_err_set(err, LC_ERR_INVALID, "node \"%s\" (%s): its first output is unnamed",
                              n->name, d->name);
        nctx c = {.np = np, .n = n, .opset = g->opset, .err = err};
        if ((rc = check_known(&c, d->attrs)) != LC_OK)
            return rc;
        if ((rc = parse_attrs(&c, n, g)) != LC_OK)
            return rc;
        n = &g->nodes[g->nnodes - 1];
        if (n->op == NN_OP_CONSTANT) { /* its output is the constant itself */
            nn_val *cv = &g->vals[n->a.value], *ov = &g->vals[n->out[0]];
            char *name = ov->name;
            *ov = *cv;
            ov->name = name;
            ov->producer = -1;
            cv->data = NULL; /* moved: the anonymous holder stays empty */
            cv->is_const = 0;
            cv->count = 0;
            n->dead = 1;
        }
    }
    for (size_t i = 0; i < gp->n_node; i++) {
        const Onnx__NodeProto *np = gp->node[i];
        nn_node *n = &g->nodes[i];
        for (size_t k = 0; k < np->n_input; k++) {
            const char *in = np->input[k] ? np->input[k] : "";
            n->in[k] = -1;
            if (!*in)
                continue;
            int vi = find_val(g, in);
            if (vi < 0)
                return lc_err_set(err, LC_ERR_INVALID,
                                  "node \"%s\" (%s): input \"%s\" is not defined in the graph",
                                  n->name, n->op_type, in);
            n->in[k] = vi;
        }
    }

    if (gp->n_output < 1)
        return lc_err_set(err, LC_ERR_INVALID, "the graph has no output");
    const char *on = gp->output[0]->name ? gp->output[0]->name : "";
    g->output = find_val(g, on);
    if (g->output < 0)
        return lc_err_set(err, LC_ERR_INVALID, "graph output \"%s\" is not produced by any node",
                          on);
    if (g->vals[g->output].is_const)
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "graph output \"%s\" is a constant", on);
    return LC_OK;
}

lc_rc nn_onnx_parse(const void *buf, size_t len, nn_graph *g, lc_err *err)
{
    alloc_state st = {.used = 0, .cap = len * ALLOC_FACTOR + ((size_t)1 << 20)};
    ProtobufCAllocator pa = {.alloc = cap_alloc, .free = cap_free, .allocator_data = &st};
    Onnx__ModelProto *mp = NULL;
    lc_rc rc;

    memset(g, 0, sizeof(*g));
    g->input = g->output = -1;
    if (!buf || len == 0)
        return lc_err_set(err, LC_ERR_INVALID, "ONNX model is empty");
    if (len > SIZE_MAX / ALLOC_FACTOR - 1)
        return lc_err_set(err, LC_ERR_TOO_LARGE, "ONNX model is too large");
    if (!depth_ok(&onnx__model_proto__descriptor, buf, (const uint8_t *)buf + len, 0))
        return lc_err_set(err, LC_ERR_INVALID,
                          "could not parse ONNX model: messages nest deeper than %d levels",
                          MAX_DEPTH);
    mp = onnx__model_proto__unpack(&pa, len, buf);
    if (!mp)
        return lc_err_set(err, LC_ERR_INVALID,
                          "could not parse ONNX model: not a valid ModelProto (%zu bytes, "
                          "truncated or corrupt)",
                          len);
    rc = parse_graph(mp, g, err);
    onnx__model_proto__free_unpacked(mp, &pa);
    if (rc != LC_OK)
        nn_graph_release(g);
    return rc;
}
