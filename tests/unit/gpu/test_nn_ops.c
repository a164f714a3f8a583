/*
 * test_nn_ops.c: the inference engine (gpu/gpu_nn.h) on the CPU, one operator at a time. Each
 * test builds a tiny ONNX model here with protobuf-c (the same generated onnx.pb-c code the
 * loader uses), runs it, and compares with values worked out by hand or with a direct loop
 * written in this file (convolutions, transposed convolutions, pools). Also: the loader's
 * errors (unsupported operators and attributes name the node, truncated and corrupt bytes,
 * wrong shapes, bad tensors), load-time rewrites (batch norm folded, activations fused), the
 * memory planner (buffers reused, arena below the sum of the activations), and sliding-window
 * inference against a direct computation of nnU-Net's aggregation.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gpu_nn.h"
#include "nn/nn_internal.h"
#include "onnx/onnx.pb-c.h"

/* --- a small ONNX builder --------------------------------------------------------------------- */

#define MAXN 64

typedef struct mb {
    Onnx__ModelProto m;
    Onnx__GraphProto g;
    Onnx__OperatorSetIdProto os, *osp[1];
    Onnx__NodeProto *nodes[MAXN];
    Onnx__TensorProto *inits[MAXN];
    Onnx__ValueInfoProto *ins[4], *outs[4];
    void *mem[8192];
    size_t nmem;
} mb;

static void *al(mb *b, size_t n)
{
    void *p = calloc(1, n ? n : 1);
    assert_non_null(p);
    assert_true(b->nmem < sizeof(b->mem) / sizeof(b->mem[0]));
    b->mem[b->nmem++] = p;
    return p;
}

static char *sdup(mb *b, const char *s)
{
    char *p = al(b, strlen(s) + 1);
    memcpy(p, s, strlen(s) + 1);
    return p;
}

static mb *mb_new(int64_t opset)
{
    mb *b = calloc(1, sizeof(*b));
    assert_non_null(b);
    onnx__model_proto__init(&b->m);
    onnx__graph_proto__init(&b->g);
    onnx__operator_set_id_proto__init(&b->os);
    b->os.has_version = 1;
    b->os.version = opset;
    b->os.domain = sdup(b, "");
    b->osp[0] = &b->os;
    b->m.n_opset_import = 1;
    b->m.opset_import = b->osp;
    b->m.has_ir_version = 1;
    b->m.ir_version = 8;
    b->m.graph = &b->g;
    b->g.node = b->nodes;
    b->g.initializer = b->inits;
    b->g.input = b->ins;
    b->g.output = b->outs;
    return b;
}

static void mb_free(mb *b)
{
    for (size_t i = 0; i < b->nmem; i++)
        free(b->mem[i]);
    free(b);
}

static Onnx__ValueInfoProto *value_info(mb *b, const char *name, int rank, const int64_t *dims)
{
    Onnx__ValueInfoProto *v = al(b, sizeof(*v));
    onnx__value_info_proto__init(v);
    v->name = sdup(b, name);
    if (rank < 0)
        return v;
    Onnx__TypeProto *t = al(b, sizeof(*t));
    onnx__type_proto__init(t);
    Onnx__TypeProto__Tensor *tt = al(b, sizeof(*tt));
    onnx__type_proto__tensor__init(tt);
    tt->has_elem_type = 1;
    tt->elem_type = 1;
    Onnx__TensorShapeProto *sh = al(b, sizeof(*sh));
    onnx__tensor_shape_proto__init(sh);
    sh->n_dim = (size_t)rank;
    sh->dim = al(b, (size_t)rank * sizeof(*sh->dim));
    for (int i = 0; i < rank; i++) {
        Onnx__TensorShapeProto__Dimension *d = al(b, sizeof(*d));
        onnx__tensor_shape_proto__dimension__init(d);
        if (dims[i] >= 0) {
            d->value_case = ONNX__TENSOR_SHAPE_PROTO__DIMENSION__VALUE_DIM_VALUE;
            d->dim_value = dims[i];
        } else {
            d->value_case = ONNX__TENSOR_SHAPE_PROTO__DIMENSION__VALUE_DIM_PARAM;
            d->dim_param = sdup(b, "free");
        }
        sh->dim[i] = d;
    }
    tt->shape = sh;
    t->value_case = ONNX__TYPE_PROTO__VALUE_TENSOR_TYPE;
    t->tensor_type = tt;
    v->type = t;
    return v;
}

/* dims: -1 for a free dimension */
static void mb_input(mb *b, const char *name, int rank, const int64_t *dims)
{
    b->ins[b->g.n_input++] = value_info(b, name, rank, dims);
}

static void mb_output(mb *b, const char *name)
{
    b->outs[b->g.n_output++] = value_info(b, name, -1, NULL);
}

static Onnx__TensorProto *tensor(mb *b, const char *name, int dtype, int rank, const int64_t *dims)
{
    Onnx__TensorProto *t = al(b, sizeof(*t));
    onnx__tensor_proto__init(t);
    t->name = sdup(b, name);
    t->has_data_type = 1;
    t->data_type = dtype;
    t->n_dims = (size_t)rank;
    t->dims = al(b, (size_t)(rank ? rank : 1) * sizeof(int64_t));
    memcpy(t->dims, dims, (size_t)rank * sizeof(int64_t));
    return t;
}

static size_t dims_count(int rank, const int64_t *dims)
{
    size_t n = 1;
    for (int i = 0; i < rank; i++)
        n *= (size_t)dims[i];
    return n;
}

/* A float initializer in float_data (raw == 0) or raw_data (raw != 0). */
static void mb_init_f(mb *b, const char *name, int rank, const int64_t *dims, const float *x,
                      int raw)
{
    Onnx__TensorProto *t = tensor(b, name, 1, rank, dims);
    size_t n = dims_count(rank, dims);
    if (raw) {
        t->has_raw_data = 1;
        t->raw_data.len = n * 4;
        t->raw_data.data = al(b, n * 4);
        memcpy(t->raw_data.data, x, n * 4); /* little-endian host */
    } else {
        t->n_float_data = n;
        t->float_data = al(b, n * sizeof(float));
        memcpy(t->float_data, x, n * sizeof(float));
    }
    b->inits[b->g.n_initializer++] = t;
}

static void mb_init_i(mb *b, const char *name, size_t n, const int64_t *x)
{
    int64_t d = (int64_t)n;
    Onnx__TensorProto *t = tensor(b, name, 7, 1, &d);
    t->n_int64_data = n;
    t->int64_data = al(b, (n ? n : 1) * sizeof(int64_t));
    memcpy(t->int64_data, x, n * sizeof(int64_t));
    b->inits[b->g.n_initializer++] = t;
}

static void split(mb *b, const char *spec, size_t *n, char ***out)
{
    char *tmp = sdup(b, spec), *save = NULL;
    *out = al(b, 16 * sizeof(char *));
    *n = 0;
    for (char *t = strtok_r(tmp, " ", &save); t; t = strtok_r(NULL, " ", &save))
        (*out)[(*n)++] = sdup(b, strcmp(t, "-") == 0 ? "" : t);
}

/* A node: inputs and outputs as space-separated names ("-" for an omitted one). */
static Onnx__NodeProto *mb_node(mb *b, const char *op, const char *name, const char *ins,
                                const char *outs)
{
    Onnx__NodeProto *n = al(b, sizeof(*n));
    onnx__node_proto__init(n);
    n->op_type = sdup(b, op);
    n->name = sdup(b, name);
    split(b, ins, &n->n_input, &n->input);
    split(b, outs, &n->n_output, &n->output);
    n->attribute = al(b, 16 * sizeof(*n->attribute));
    b->nodes[b->g.n_node++] = n;
    return n;
}

static Onnx__AttributeProto *attr(mb *b, Onnx__NodeProto *n, const char *name, int type)
{
    Onnx__AttributeProto *a = al(b, sizeof(*a));
    onnx__attribute_proto__init(a);
    a->name = sdup(b, name);
    a->has_type = 1;
    a->type = type;
    n->attribute[n->n_attribute++] = a;
    return a;
}

static void at_i(mb *b, Onnx__NodeProto *n, const char *name, int64_t v)
{
    Onnx__AttributeProto *a = attr(b, n, name, ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INT);
    a->has_i = 1;
    a->i = v;
}

static void at_f(mb *b, Onnx__NodeProto *n, const char *name, float v)
{
    Onnx__AttributeProto *a = attr(b, n, name, ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__FLOAT);
    a->has_f = 1;
    a->f = v;
}

static void at_s(mb *b, Onnx__NodeProto *n, const char *name, const char *v)
{
    Onnx__AttributeProto *a = attr(b, n, name, ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__STRING);
    a->has_s = 1;
    a->s.len = strlen(v);
    a->s.data = (uint8_t *)sdup(b, v);
}

static void at_ints(mb *b, Onnx__NodeProto *n, const char *name, int cnt, ...)
{
    Onnx__AttributeProto *a = attr(b, n, name, ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INTS);
    va_list ap;
    a->n_ints = (size_t)cnt;
    a->ints = al(b, (size_t)(cnt ? cnt : 1) * sizeof(int64_t));
    va_start(ap, cnt);
    for (int i = 0; i < cnt; i++)
        a->ints[i] = va_arg(ap, int64_t);
    va_end(ap);
}

#define I(x) ((int64_t)(x))

static uint8_t *mb_pack(mb *b, size_t *len)
{
    *len = onnx__model_proto__get_packed_size(&b->m);
    uint8_t *buf = malloc(*len ? *len : 1);
    assert_non_null(buf);
    assert_int_equal(onnx__model_proto__pack(&b->m, buf), *len);
    return buf;
}

/* --- running --------------------------------------------------------------------------------- */

typedef struct fixture {
    gpu_ctx *cpu, *cpu1;
} fixture;

static gpu_ctx *g_ctx; /* the test group's CPU context (2 threads) */

/* Load b on ctx; rc expected; err text returned in err. */
static lc_rc load(mb *b, gpu_ctx *ctx, gpu_nn_model **m, lc_err *err)
{
    size_t len;
    uint8_t *buf = mb_pack(b, &len);
    lc_rc rc = gpu_nn_load(ctx, buf, len, NULL, m, err);
    free(buf);
    return rc;
}

/* Run b on x of shape in (rank r); returns the output (malloc'd) and its shape. */
static float *run(mb *b, const float *x, int r, const int64_t *in, int64_t *osh, size_t *on)
{
    gpu_nn_model *m = NULL;
    lc_err err = {0};
    lc_rc rc = load(b, g_ctx, &m, &err);
    if (rc != LC_OK)
        fail_msg("load: %s", lc_err_msg(&err));
    size_t cap = 1 << 20;
    float *y = malloc(cap * sizeof(float));
    assert_non_null(y);
    rc = gpu_nn_forward(m, x, in, r, y, cap, osh, &err);
    if (rc != LC_OK)
        fail_msg("forward: %s", lc_err_msg(&err));
    size_t n = 1;
    for (int i = 0; i < GPU_NN_MAX_RANK && osh[i] > 0; i++)
        n *= (size_t)osh[i];
    *on = n;
    gpu_nn_free(m);
    return y;
}

static uint64_t rng = 88172645463325252ull;
static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static float *rand_buf(size_t n)
{
    float *x = malloc((n ? n : 1) * sizeof(float));
    assert_non_null(x);
    for (size_t i = 0; i < n; i++)
        x[i] = frand();
    return x;
}

static void expect_close(const float *got, const float *want, size_t n, double tol,
                         const char *what)
{
    double worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= worst)) {
            worst = d;
            at = i;
        }
    }
    if (!(worst <= tol))
        fail_msg("%s: max abs error %g at %zu (got %g, want %g), tolerance %g", what, worst, at,
                 (double)got[at], (double)want[at], tol);
}

/* --- direct references (canonical 3D: 2D has D = 1) ------------------------------------------ */

typedef struct geo {
    int64_t n, ci, co, g;
    int64_t id[3], k[3], s[3], d[3], pb[3], pe[3], od[3];
} geo;

static void conv_ref(const geo *q, const float *x, const float *w, const float *bias, float *y)
{
    int64_t cig = q->ci / q->g, cog = q->co / q->g;
    for (int64_t n = 0; n < q->n; n++)
        for (int64_t co = 0; co < q->co; co++) {
            int64_t g = co / cog;
            for (int64_t oz = 0; oz < q->od[0]; oz++)
                for (int64_t oy = 0; oy < q->od[1]; oy++)
                    for (int64_t ox = 0; ox < q->od[2]; ox++) {
                        double acc = bias ? bias[co] : 0;
                        for (int64_t c = 0; c < cig; c++)
                            for (int64_t kz = 0; kz < q->k[0]; kz++)
                                for (int64_t ky = 0; ky < q->k[1]; ky++)
                                    for (int64_t kx = 0; kx < q->k[2]; kx++) {
                                        int64_t iz = oz * q->s[0] - q->pb[0] + kz * q->d[0];
                                        int64_t iy = oy * q->s[1] - q->pb[1] + ky * q->d[1];
                                        int64_t ix = ox * q->s[2] - q->pb[2] + kx * q->d[2];
                                        if (iz < 0 || iy < 0 || ix < 0 || iz >= q->id[0] ||
                                            iy >= q->id[1] || ix >= q->id[2])
                                            continue;
                                        int64_t ci = g * cig + c;
                                        acc +=
                                            (double)
                                                x[(((n * q->ci + ci) * q->id[0] + iz) * q->id[1] +
                                                   iy) *
                                                      q->id[2] +
                                                  ix] *
                                            w[(((co * cig + c) * q->k[0] + kz) * q->k[1] + ky) *
                                                  q->k[2] +
                                              kx];
                                    }
                        y[(((n * q->co + co) * q->od[0] + oz) * q->od[1] + oy) * q->od[2] + ox] =
                            (float)acc;
                    }
        }
}

static void convt_ref(const geo *q, const float *x, const float *w, const float *bias, float *y)
{
    int64_t cig = q->ci / q->g, cog = q->co / q->g;
    size_t on = (size_t)(q->n * q->co * q->od[0] * q->od[1] * q->od[2]);
    double *acc = calloc(on, sizeof(double));
    assert_non_null(acc);
    for (int64_t n = 0; n < q->n; n++)
        for (int64_t ci = 0; ci < q->ci; ci++) {
            int64_t g = ci / cig;
            for (int64_t iz = 0; iz < q->id[0]; iz++)
                for (int64_t iy = 0; iy < q->id[1]; iy++)
                    for (int64_t ix = 0; ix < q->id[2]; ix++) {
                        double v =
                            x[(((n * q->ci + ci) * q->id[0] + iz) * q->id[1] + iy) * q->id[2] + ix];
                        for (int64_t c = 0; c < cog; c++)
                            for (int64_t kz = 0; kz < q->k[0]; kz++)
                                for (int64_t ky = 0; ky < q->k[1]; ky++)
                                    for (int64_t kx = 0; kx < q->k[2]; kx++) {
                                        int64_t oz = iz * q->s[0] - q->pb[0] + kz * q->d[0];
                                        int64_t oy = iy * q->s[1] - q->pb[1] + ky * q->d[1];
                                        int64_t ox = ix * q->s[2] - q->pb[2] + kx * q->d[2];
                                        if (oz < 0 || oy < 0 || ox < 0 || oz >= q->od[0] ||
                                            oy >= q->od[1] || ox >= q->od[2])
                                            continue;
                                        int64_t co = g * cog + c;
                                        acc[(((n * q->co + co) * q->od[0] + oz) * q->od[1] + oy) *
                                                q->od[2] +
                                            ox] +=
                                            v * w[(((ci * cog + c) * q->k[0] + kz) * q->k[1] + ky) *
                                                      q->k[2] +
                                                  kx];
                                    }
                    }
        }
    for (size_t i = 0; i < on; i++) {
        size_t co = i / (size_t)(q->od[0] * q->od[1] * q->od[2]) % (size_t)q->co;
        y[i] = (float)(acc[i] + (bias ? bias[co] : 0));
    }
    free(acc);
}

/* --- convolution tests ---------------------------------------------------------------------- */

/* Conv or ConvTranspose with geometry q (nsp spatial axes: the last nsp of the canonical 3),
 * random input, weights and bias, against the direct loop. */
static void check_conv(int transpose, int nsp, geo q, int with_bias, int raw, const char *what)
{
    int r = nsp + 2, off = 3 - nsp;
    int64_t in[5], wd[5], bd[1] = {q.co};
    in[0] = q.n;
    in[1] = q.ci;
    wd[0] = transpose ? q.ci : q.co;
    wd[1] = transpose ? q.co / q.g : q.ci / q.g;
    for (int i = 0; i < nsp; i++) {
        in[2 + i] = q.id[off + i];
        wd[2 + i] = q.k[off + i];
    }
    for (int i = 0; i < 3; i++) {
        if (!transpose)
            q.od[i] = (q.id[i] + q.pb[i] + q.pe[i] - q.d[i] * (q.k[i] - 1) - 1) / q.s[i] + 1;
        else
            q.od[i] = q.s[i] * (q.id[i] - 1) + q.d[i] * (q.k[i] - 1) + 1 - q.pb[i] - q.pe[i];
    }
    size_t nx = dims_count(r, in), nw = dims_count(r, wd);
    float *x = rand_buf(nx), *w = rand_buf(nw), *bias = rand_buf((size_t)q.co);
    mb *b = mb_new(13);
    mb_input(b, "x", r, in);
    mb_init_f(b, "w", r, wd, w, raw);
    mb_init_f(b, "b", 1, bd, bias, !raw);
    Onnx__NodeProto *n =
        mb_node(b, transpose ? "ConvTranspose" : "Conv", "conv", with_bias ? "x w b" : "x w", "y");
    Onnx__AttributeProto *a;
    a = attr(b, n, "strides", ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INTS);
    a->n_ints = (size_t)nsp;
    a->ints = al(b, 3 * sizeof(int64_t));
    for (int i = 0; i < nsp; i++)
        a->ints[i] = q.s[off + i];
    a = attr(b, n, "dilations", ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INTS);
    a->n_ints = (size_t)nsp;
    a->ints = al(b, 3 * sizeof(int64_t));
    for (int i = 0; i < nsp; i++)
        a->ints[i] = q.d[off + i];
    a = attr(b, n, "pads", ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INTS);
    a->n_ints = (size_t)(2 * nsp);
    a->ints = al(b, 6 * sizeof(int64_t));
    for (int i = 0; i < nsp; i++) {
        a->ints[i] = q.pb[off + i];
        a->ints[nsp + i] = q.pe[off + i];
    }
    if (q.g > 1)
        at_i(b, n, "group", q.g);
    mb_output(b, "y");
    int64_t osh[GPU_NN_MAX_RANK];
    size_t on;
    float *y = run(b, x, r, in, osh, &on);
    size_t want_n = (size_t)(q.n * q.co * q.od[0] * q.od[1] * q.od[2]);
    assert_int_equal(on, want_n);
    for (int i = 0; i < nsp; i++)
        assert_int_equal(osh[2 + i], q.od[off + i]);
    float *ref = malloc(want_n * sizeof(float));
    assert_non_null(ref);
    if (transpose)
        convt_ref(&q, x, w, with_bias ? bias : NULL, ref);
    else
        conv_ref(&q, x, w, with_bias ? bias : NULL, ref);
    expect_close(y, ref, want_n, 1e-5, what);
    free(ref);
    free(y);
    free(x);
    free(w);
    free(bias);
    mb_free(b);
}

#define G3(...) ((int64_t[3]){__VA_ARGS__})

static geo mkgeo(int64_t n, int64_t ci, int64_t co, int64_t g, const int64_t *id, const int64_t *k,
                 const int64_t *s, const int64_t *d, const int64_t *pb, const int64_t *pe)
{
    geo q = {.n = n, .ci = ci, .co = co, .g = g};
    memcpy(q.id, id, sizeof(q.id));
    memcpy(q.k, k, sizeof(q.k));
    memcpy(q.s, s, sizeof(q.s));
    memcpy(q.d, d, sizeof(q.d));
    memcpy(q.pb, pb, sizeof(q.pb));
    memcpy(q.pe, pe, sizeof(q.pe));
    return q;
}

static void test_conv_by_hand(void **state)
{
    (void)state;
    /* a 3x3 input of 1..9 and a 2x2 kernel [[1,0],[0,-1]]: y = x[i][j] - x[i+1][j+1] = -4 */
    float x[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9}, w[4] = {1, 0, 0, -1}, bias = 0.5f;
    int64_t in[4] = {1, 1, 3, 3}, wd[4] = {1, 1, 2, 2}, bd = 1, osh[GPU_NN_MAX_RANK];
    size_t on;
    mb *b = mb_new(11);
    mb_input(b, "x", 4, in);
    mb_init_f(b, "w", 4, wd, w, 0);
    mb_init_f(b, "b", 1, &bd, &bias, 1);
    mb_node(b, "Conv", "c", "x w b", "y");
    mb_output(b, "y");
    float *y = run(b, x, 4, in, osh, &on);
    assert_int_equal(on, 4);
    for (int i = 0; i < 4; i++)
        assert_float_equal(y[i], -3.5f, 0);
    free(y);
    mb_free(b);
}

static void test_conv_2d(void **state)
{
    (void)state;
    check_conv(0, 2,
               mkgeo(1, 2, 3, 1, G3(1, 7, 6), G3(1, 3, 3), G3(1, 2, 2), G3(1, 1, 1), G3(0, 1, 1),
                     G3(0, 1, 0)),
               1, 0, "conv 2d stride 2 asymmetric pads");
    check_conv(0, 2,
               mkgeo(2, 4, 6, 2, G3(1, 9, 8), G3(1, 3, 3), G3(1, 1, 1), G3(1, 2, 2), G3(0, 2, 2),
                     G3(0, 2, 2)),
               1, 1, "conv 2d groups, dilation, batch 2");
    check_conv(0, 2,
               mkgeo(1, 5, 4, 1, G3(1, 6, 7), G3(1, 1, 1), G3(1, 1, 1), G3(1, 1, 1), G3(0, 0, 0),
                     G3(0, 0, 0)),
               0, 0, "conv 2d pointwise, no bias");
    check_conv(0, 1,
               mkgeo(1, 2, 3, 1, G3(1, 1, 17), G3(1, 1, 5), G3(1, 1, 3), G3(1, 1, 1), G3(0, 0, 2),
                     G3(0, 0, 1)),
               1, 0, "conv 1d");
}

static void test_conv_3d(void **state)
{
    (void)state;
    check_conv(0, 3,
               mkgeo(1, 3, 4, 1, G3(5, 6, 7), G3(3, 3, 3), G3(1, 1, 1), G3(1, 1, 1), G3(1, 1, 1),
                     G3(1, 1, 1)),
               1, 1, "conv 3d 3x3x3 same");
    check_conv(0, 3,
               mkgeo(1, 2, 4, 2, G3(6, 5, 8), G3(3, 1, 3), G3(2, 1, 2), G3(1, 1, 2), G3(1, 0, 2),
                     G3(0, 0, 1)),
               1, 0, "conv 3d strided, grouped, anisotropic");
    /* more output positions than one im2col block: several blocks on both threads */
    check_conv(0, 3,
               mkgeo(1, 2, 3, 1, G3(16, 24, 40), G3(3, 3, 3), G3(1, 1, 1), G3(1, 1, 1), G3(1, 1, 1),
                     G3(1, 1, 1)),
               1, 0, "conv 3d many blocks");
}

static void test_conv_transpose(void **state)
{
    (void)state;
    check_conv(1, 3,
               mkgeo(1, 4, 2, 1, G3(3, 4, 5), G3(2, 2, 2), G3(2, 2, 2), G3(1, 1, 1), G3(0, 0, 0),
                     G3(0, 0, 0)),
               1, 0, "convtranspose 3d 2x2x2 stride 2 (nnU-Net's upsampling)");
    check_conv(1, 2,
               mkgeo(2, 4, 6, 2, G3(1, 5, 4), G3(1, 3, 3), G3(1, 2, 2), G3(1, 1, 1), G3(0, 1, 1),
                     G3(0, 1, 0)),
               1, 1, "convtranspose 2d overlapping, grouped, padded");
    check_conv(1, 2,
               mkgeo(1, 3, 2, 1, G3(1, 4, 4), G3(1, 3, 3), G3(1, 1, 1), G3(1, 2, 2), G3(0, 0, 0),
                     G3(0, 0, 0)),
               0, 0, "convtranspose 2d dilated, no bias");
}

static void test_conv_transpose_output_padding(void **state)
{
    (void)state;
    /* 1 channel, 2x2 ones, kernel 3x3 ones, stride 2, pads 1, output_padding 1: 4x4 output */
    float x[4] = {1, 1, 1, 1}, w[9];
    for (int i = 0; i < 9; i++)
        w[i] = 1;
    int64_t in[4] = {1, 1, 2, 2}, wd[4] = {1, 1, 3, 3}, osh[GPU_NN_MAX_RANK];
    size_t on;
    mb *b = mb_new(13);
    mb_input(b, "x", 4, in);
    mb_init_f(b, "w", 4, wd, w, 0);
    Onnx__NodeProto *n = mb_node(b, "ConvTranspose", "up", "x w", "y");
    at_ints(b, n, "strides", 2, I(2), I(2));
    at_ints(b, n, "pads", 4, I(1), I(1), I(1), I(1));
    at_ints(b, n, "output_padding", 2, I(1), I(1));
    mb_output(b, "y");
    float *y = run(b, x, 4, in, osh, &on);
    assert_int_equal(osh[2], 4);
    assert_int_equal(osh[3], 4);
    /* full output (5x5, before cropping 1 at the start): rows/cols hit by 1, 2, 1, 2, 1 inputs;
     * cropped to [1, 5) along each axis */
    const float want[16] = {1, 2, 1, 1, 2, 4, 2, 2, 1, 2, 1, 1, 1, 2, 1, 1};
    expect_close(y, want, 16, 0, "convtranspose output_padding");
    free(y);
    mb_free(b);
}

/* --- normalisation, batch norm folding, activations ------------------------------------------- */

static void test_instance_norm(void **state)
{
    (void)state;
    int64_t in[5] = {2, 3, 2, 3, 4}, cd = 3, osh[GPU_NN_MAX_RANK];
    size_t n = dims_count(5, in), on, plane = 24;
    float *x = rand_buf(n), sc[3] = {1.5f, -0.5f, 2}, bi[3] = {0.1f, 0.2f, -0.3f};
    for (size_t i = 0; i < n; i++)
        x[i] = x[i] * 10 + 3;
    mb *b = mb_new(13);
    mb_input(b, "x", 5, in);
    mb_init_f(b, "s", 1, &cd, sc, 0);
    mb_init_f(b, "b", 1, &cd, bi, 0);
    Onnx__NodeProto *nd = mb_node(b, "InstanceNormalization", "in", "x s b", "y");
    at_f(b, nd, "epsilon", 1e-3f);
    mb_output(b, "y");
    float *y = run(b, x, 5, in, osh, &on), *ref = malloc(n * sizeof(float));
    assert_non_null(ref);
    for (size_t p = 0; p < 6; p++) {
        double m = 0, v = 0;
        for (size_t i = 0; i < plane; i++)
            m += x[p * plane + i];
        m /= (double)plane;
        for (size_t i = 0; i < plane; i++)
            v += (x[p * plane + i] - m) * (x[p * plane + i] - m);
        v /= (double)plane;
        for (size_t i = 0; i < plane; i++)
            ref[p * plane + i] =
                (float)((x[p * plane + i] - m) / sqrt(v + 1e-3) * sc[p % 3] + bi[p % 3]);
    }
    expect_close(y, ref, n, 1e-5, "instance norm");
    free(ref);
    free(y);
    free(x);
    mb_free(b);
}

/* Conv -> BatchNormalization -> LeakyRelu: one step after folding and fusion, same values. */
static void test_bn_fold_and_fusion(void **state)
{
    (void)state;
    int64_t in[4] = {1, 2, 5, 5}, wd[4] = {3, 2, 3, 3}, cd = 3, osh[GPU_NN_MAX_RANK];
    float *x = rand_buf(50), *w = rand_buf(54), bias[3] = {0.1f, -0.2f, 0.3f};
    float gam[3] = {1.5f, 0.5f, -1}, bet[3] = {0.2f, 0, -0.1f}, mean[3] = {0.3f, -0.1f, 0},
          var[3] = {2, 0.5f, 1};
    mb *b = mb_new(13);
    mb_input(b, "x", 4, in);
    mb_init_f(b, "w", 4, wd, w, 1);
    mb_init_f(b, "bias", 1, &cd, bias, 0);
    mb_init_f(b, "g", 1, &cd, gam, 0);
    mb_init_f(b, "be", 1, &cd, bet, 0);
    mb_init_f(b, "m", 1, &cd, mean, 0);
    mb_init_f(b, "v", 1, &cd, var, 0);
    Onnx__NodeProto *c = mb_node(b, "Conv", "conv", "x w bias", "c");
    at_ints(b, c, "pads", 4, I(1), I(1), I(1), I(1));
    Onnx__NodeProto *bn = mb_node(b, "BatchNormalization", "bn", "c g be m v", "n");
    at_f(b, bn, "epsilon", 1e-4f);
    Onnx__NodeProto *lr = mb_node(b, "LeakyRelu", "act", "n", "y");
    at_f(b, lr, "alpha", 0.1f);
    mb_output(b, "y");

    gpu_nn_model *m = NULL;
    lc_err err = {0};
    assert_int_equal(load(b, g_ctx, &m, &err), LC_OK);
    assert_int_equal(m->nplans, 1);
    assert_int_equal(m->plans[0]->nsteps, 1); /* conv with BN folded and LeakyReLU fused */
    assert_int_equal(m->plans[0]->steps[0].a.act, NN_ACT_LEAKY);
    float y[75];
    assert_int_equal(gpu_nn_forward(m, x, in, 4, y, 75, osh, &err), LC_OK);
    gpu_nn_free(m);

    geo q = mkgeo(1, 2, 3, 1, G3(1, 5, 5), G3(1, 3, 3), G3(1, 1, 1), G3(1, 1, 1), G3(0, 1, 1),
                  G3(0, 1, 1));
    q.od[0] = 1;
    q.od[1] = q.od[2] = 5;
    float ref[75];
    conv_ref(&q, x, w, bias, ref);
    for (int i = 0; i < 75; i++) {
        int co = i / 25;
        double v = (ref[i] - mean[co]) / sqrt(var[co] + 1e-4) * gam[co] + bet[co];
        ref[i] = (float)(v < 0 ? 0.1 * v : v);
    }
    expect_close(y, ref, 75, 1e-5, "conv + batch norm + leaky relu");
    free(x);
    free(w);
    mb_free(b);
}

/* A batch norm with nothing to fold into: a per-channel affine step. Opset 9 (spatial gone). */
static void test_bn_standalone(void **state)
{
    (void)state;
    int64_t in[4] = {1, 2, 1, 2}, cd = 2, osh[GPU_NN_MAX_RANK];
    float x[4] = {1, 2, 3, 4}, gam[2] = {2, 1}, bet[2] = {1, 0}, mean[2] = {1, 1}, var[2] = {4, 1};
    mb *b = mb_new(9);
    mb_input(b, "x", 4, in);
    mb_init_f(b, "g", 1, &cd, gam, 0);
    mb_init_f(b, "be", 1, &cd, bet, 0);
    mb_init_f(b, "m", 1, &cd, mean, 0);
    mb_init_f(b, "v", 1, &cd, var, 0);
    Onnx__NodeProto *bn = mb_node(b, "BatchNormalization", "bn", "x g be m v", "y");
    at_f(b, bn, "epsilon", 0);
    mb_output(b, "y");
    size_t on;
    float *y = run(b, x, 4, in, osh, &on);
    /* channel 0: (x - 1) / 2 * 2 + 1 = x; channel 1: (x - 1) */
    const float want[4] = {1, 2, 2, 3};
    expect_close(y, want, 4, 1e-6, "standalone batch norm");
    free(y);
    mb_free(b);
}

static void test_activations(void **state)
{
    (void)state;
    const char *ops[] = {"Relu", "LeakyRelu", "Sigmoid", "PRelu"};
    float x[6] = {-2, -0.5f, 0, 0.5f, 2, -1};
    int64_t in[4] = {1, 2, 1, 3}, sd[3] = {2, 1, 1}, osh[GPU_NN_MAX_RANK];
    float slope[2] = {0.25f, -1};
    for (int k = 0; k < 4; k++) {
        mb *b = mb_new(13);
        mb_input(b, "x", 4, in);
        if (k == 3)
            mb_init_f(b, "s", 3, sd, slope, 0);
        Onnx__NodeProto *n = mb_node(b, ops[k], "a", k == 3 ? "x s" : "x", "y");
        if (k == 1)
            at_f(b, n, "alpha", 0.2f);
        mb_output(b, "y");
        size_t on;
        float *y = run(b, x, 4, in, osh, &on);
        for (int i = 0; i < 6; i++) {
            float v = x[i], want = k == 0   ? (v > 0 ? v : 0)
                                   : k == 1 ? (v < 0 ? 0.2f * v : v)
                                   : k == 2 ? (float)(1.0 / (1.0 + exp(-(double)v)))
                                            : (v < 0 ? v * slope[i / 3] : v);
            if (fabsf(y[i] - want) > 1e-6f)
                fail_msg("%s(%g) = %g, want %g", ops[k], (double)v, (double)y[i], (double)want);
        }
        free(y);
        mb_free(b);
    }
}

/* Add/Sub/Mul/Div with broadcasting, by hand. */
static void test_binary_broadcast(void **state)
{
    (void)state;
    const char *ops[] = {"Add", "Sub", "Mul", "Div"};
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, c[2] = {2, 4};
    int64_t in[4] = {1, 2, 2, 2}, cd[3] = {2, 1, 1}, osh[GPU_NN_MAX_RANK];
    for (int k = 0; k < 4; k++) {
        mb *b = mb_new(14);
        mb_input(b, "x", 4, in);
        mb_init_f(b, "c", 3, cd, c, 0);
        mb_node(b, ops[k], "op", "x c", "t");
        mb_node(b, "Add", "self", "t t", "y"); /* both operands the same tensor */
        mb_output(b, "y");
        size_t on;
        float *y = run(b, x, 4, in, osh, &on);
        assert_int_equal(on, 8);
        for (int i = 0; i < 8; i++) {
            float a = x[i], s = c[i / 4];
            float want = 2 * (k == 0 ? a + s : k == 1 ? a - s : k == 2 ? a * s : a / s);
            if (fabsf(y[i] - want) > 1e-6f)
                fail_msg("%s: element %d is %g, want %g", ops[k], i, (double)y[i], (double)want);
        }
        free(y);
        mb_free(b);
    }
    /* a constant first operand and a row broadcast: [3] - x[1,1,2,3] */
    float r[3] = {10, 20, 30}, x2[6] = {1, 2, 3, 4, 5, 6};
    int64_t in2[4] = {1, 1, 2, 3}, rd = 3;
    mb *b = mb_new(14);
    mb_input(b, "x", 4, in2);
    mb_init_f(b, "r", 1, &rd, r, 0);
    mb_node(b, "Sub", "sub", "r x", "y");
    mb_output(b, "y");
    size_t on;
    float *y = run(b, x2, 4, in2, osh, &on);
    const float want[6] = {9, 18, 27, 6, 15, 24};
    expect_close(y, want, 6, 0, "constant minus tensor");
    free(y);
    mb_free(b);
}

static void test_concat_softmax_argmax(void **state)
{
    (void)state;
    int64_t in[4] = {1, 1, 1, 3}, osh[GPU_NN_MAX_RANK];
    float x[3] = {0, 1, 2}, z[3] = {1, 1, 1};
    int64_t cd[4] = {1, 1, 1, 3};
    /* cat([x, 1], axis 1) -> softmax over channels -> argmax over channels (keepdims 0) */
    mb *b = mb_new(13);
    mb_input(b, "x", 4, in);
    mb_init_f(b, "one", 4, cd, z, 0);
    Onnx__NodeProto *n = mb_node(b, "Concat", "cat", "x one", "c");
    at_i(b, n, "axis", 1);
    mb_node(b, "Softmax", "sm", "c", "p");
    n = mb_node(b, "Softmax", "sm1", "c", "p1");
    at_i(b, n, "axis", 1);
    mb_node(b, "Add", "sum", "p p1", "y");
    mb_output(b, "y");
    size_t on;
    float *y = run(b, x, 4, in, osh, &on);
    /* softmax over the last axis of c = [[0,1,2],[1,1,1]] plus over channels */
    double e0 = exp(0), e1 = exp(1), e2 = exp(2), s = e0 + e1 + e2;
    float want[6] = {(float)(e0 / s), (float)(e1 / s), (float)(e2 / s),
                     1.0f / 3,        1.0f / 3,        1.0f / 3};
    for (int j = 0; j < 3; j++) {
        double a = x[j], bb = 1, m = exp(a) + exp(bb);
        want[j] += (float)(exp(a) / m);
        want[3 + j] += (float)(exp(bb) / m);
    }
    assert_int_equal(osh[1], 2);
    expect_close(y, want, 6, 1e-6, "concat + softmax (two axes)");
    free(y);
    mb_free(b);

    /* opset 11 softmax(axis 1) on N, C, W: normalised over C x W together */
    b = mb_new(11);
    int64_t in3[3] = {1, 2, 2};
    float x3[4] = {0, 1, 2, 3};
    mb_input(b, "x", 3, in3);
    mb_node(b, "Softmax", "sm", "x", "y");
    mb_output(b, "y");
    y = run(b, x3, 3, in3, osh, &on);
    double t = exp(0) + exp(1) + exp(2) + exp(3);
    const float want3[4] = {(float)(1 / t), (float)(exp(1) / t), (float)(exp(2) / t),
                            (float)(exp(3) / t)};
    expect_close(y, want3, 4, 1e-6, "opset 11 softmax");
    free(y);
    mb_free(b);

    /* ArgMax over channels with ties: first (default) or last index */
    for (int last = 0; last < 2; last++) {
        b = mb_new(13);
        int64_t in4[4] = {1, 3, 1, 2};
        float x4[6] = {1, 5, 3, 5, 3, 0};
        mb_input(b, "x", 4, in4);
        n = mb_node(b, "ArgMax", "am", "x", "y");
        at_i(b, n, "axis", 1);
        at_i(b, n, "keepdims", 0);
        if (last)
            at_i(b, n, "select_last_index", 1);
        mb_output(b, "y");
        y = run(b, x4, 4, in4, osh, &on);
        assert_int_equal(on, 2);
        assert_float_equal(y[0], last ? 2.0f : 1.0f, 0);
        assert_float_equal(y[1], last ? 1.0f : 0.0f, 0);
        free(y);
        mb_free(b);
    }
}

/* --- pools ------------------------------------------------------------------------------------ */

static void pool_ref(int maxp, int incl, const geo *q, const float *x, float *y)
{
    for (int64_t p = 0; p < q->n * q->ci; p++)
        for (int64_t oz = 0; oz < q->od[0]; oz++)
            for (int64_t oy = 0; oy < q->od[1]; oy++)
                for (int64_t ox = 0; ox < q->od[2]; ox++) {
                    double best = -INFINITY, sum = 0;
                    int cnt = 0, cntp = 0;
                    for (int64_t kz = 0; kz < q->k[0]; kz++)
                        for (int64_t ky = 0; ky < q->k[1]; ky++)
                            for (int64_t kx = 0; kx < q->k[2]; kx++) {
                                int64_t iz = oz * q->s[0] - q->pb[0] + kz * q->d[0];
                                int64_t iy = oy * q->s[1] - q->pb[1] + ky * q->d[1];
                                int64_t ix = ox * q->s[2] - q->pb[2] + kx * q->d[2];
                                if (iz < q->id[0] + q->pe[0] && iy < q->id[1] + q->pe[1] &&
                                    ix < q->id[2] + q->pe[2])
                                    cntp++;
                                if (iz < 0 || iy < 0 || ix < 0 || iz >= q->id[0] ||
                                    iy >= q->id[1] || ix >= q->id[2])
                                    continue;
                                double v = x[((p * q->id[0] + iz) * q->id[1] + iy) * q->id[2] + ix];
                                best = v > best ? v : best;
                                sum += v;
                                cnt++;
                            }
                    y[((p * q->od[0] + oz) * q->od[1] + oy) * q->od[2] + ox] =
                        (float)(maxp ? best : sum / (incl ? cntp : cnt));
                }
}

static void check_pool(const char *op, int nsp, geo q, int ceil_mode, int incl)
{
    int r = nsp + 2, off = 3 - nsp;
    int64_t in[5] = {q.n, q.ci}, osh[GPU_NN_MAX_RANK];
    for (int i = 0; i < nsp; i++)
        in[2 + i] = q.id[off + i];
    for (int i = 0; i < 3; i++) {
        int64_t span = q.d[i] * (q.k[i] - 1) + 1, pad = q.id[i] + q.pb[i] + q.pe[i];
        q.od[i] = ceil_mode ? (pad - span + q.s[i] - 1) / q.s[i] + 1 : (pad - span) / q.s[i] + 1;
        if (ceil_mode && (q.od[i] - 1) * q.s[i] >= q.id[i] + q.pb[i])
            q.od[i]--;
    }
    size_t nx = dims_count(r, in), on;
    float *x = rand_buf(nx);
    mb *b = mb_new(13);
    mb_input(b, "x", r, in);
    Onnx__NodeProto *n = mb_node(b, op, "pool", "x", "y");
    Onnx__AttributeProto *a =
        attr(b, n, "kernel_shape", ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INTS);
    a->n_ints = (size_t)nsp;
    a->ints = al(b, 3 * sizeof(int64_t));
    for (int i = 0; i < nsp; i++)
        a->ints[i] = q.k[off + i];
    a = attr(b, n, "strides", ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INTS);
    a->n_ints = (size_t)nsp;
    a->ints = al(b, 3 * sizeof(int64_t));
    for (int i = 0; i < nsp; i++)
        a->ints[i] = q.s[off + i];
    a = attr(b, n, "pads", ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INTS);
    a->n_ints = (size_t)(2 * nsp);
    a->ints = al(b, 6 * sizeof(int64_t));
    for (int i = 0; i < nsp; i++) {
        a->ints[i] = q.pb[off + i];
        a->ints[nsp + i] = q.pe[off + i];
    }
    if (ceil_mode)
        at_i(b, n, "ceil_mode", 1);
    if (incl)
        at_i(b, n, "count_include_pad", 1);
    mb_output(b, "y");
    float *y = run(b, x, r, in, osh, &on);
    size_t want = (size_t)(q.n * q.ci * q.od[0] * q.od[1] * q.od[2]);
    assert_int_equal(on, want);
    float *ref = malloc(want * sizeof(float));
    assert_non_null(ref);
    pool_ref(strcmp(op, "MaxPool") == 0, incl, &q, x, ref);
    expect_close(y, ref, want, 1e-6, op);
    free(ref);
    free(y);
    free(x);
    mb_free(b);
}

static void test_pools(void **state)
{
    (void)state;
    geo q = mkgeo(1, 2, 2, 1, G3(5, 6, 7), G3(2, 2, 2), G3(2, 2, 2), G3(1, 1, 1), G3(0, 0, 0),
                  G3(0, 0, 0));
    check_pool("MaxPool", 3, q, 0, 0);
    check_pool("MaxPool", 3, q, 1, 0);
    check_pool("AveragePool", 3, q, 1, 0);
    q = mkgeo(2, 3, 3, 1, G3(1, 7, 6), G3(1, 3, 3), G3(1, 2, 2), G3(1, 1, 1), G3(0, 1, 1),
              G3(0, 1, 1));
    check_pool("AveragePool", 2, q, 0, 0);
    check_pool("AveragePool", 2, q, 0, 1);
    check_pool("MaxPool", 2, q, 1, 0);
    /* GlobalAveragePool by hand */
    mb *b = mb_new(13);
    int64_t in[4] = {1, 2, 2, 2}, osh[GPU_NN_MAX_RANK];
    float x[8] = {1, 2, 3, 4, 10, 20, 30, 40};
    mb_input(b, "x", 4, in);
    mb_node(b, "GlobalAveragePool", "gap", "x", "y");
    mb_output(b, "y");
    size_t on;
    float *y = run(b, x, 4, in, osh, &on);
    assert_int_equal(on, 2);
    assert_float_equal(y[0], 2.5f, 1e-6);
    assert_float_equal(y[1], 25.0f, 1e-6);
    free(y);
    mb_free(b);
}

/* --- resize ----------------------------------------------------------------------------------- */

static void test_resize(void **state)
{
    (void)state;
    float x[4] = {1, 2, 3, 4}, sc[4] = {1, 1, 2, 2};
    int64_t in[4] = {1, 1, 2, 2}, sd = 4, osh[GPU_NN_MAX_RANK];
    size_t on;
    /* linear, half_pixel (PyTorch's align_corners=False): edges clamp */
    mb *b = mb_new(13);
    mb_input(b, "x", 4, in);
    mb_init_f(b, "scales", 1, &sd, sc, 0);
    Onnx__NodeProto *n = mb_node(b, "Resize", "up", "x - scales", "y");
    at_s(b, n, "mode", "linear");
    mb_output(b, "y");
    float *y = run(b, x, 4, in, osh, &on);
    const float lin[16] = {1,    1.25f, 1.75f, 2,    1.5f, 1.75f, 2.25f, 2.5f,
                           2.5f, 2.75f, 3.25f, 3.5f, 3,    3.25f, 3.75f, 4};
    assert_int_equal(on, 16);
    expect_close(y, lin, 16, 1e-6, "resize linear half_pixel");
    free(y);
    mb_free(b);
    /* nearest, asymmetric + floor (PyTorch's nearest), with sizes instead of scales */
    b = mb_new(13);
    int64_t sizes[4] = {1, 1, 3, 4};
    mb_input(b, "x", 4, in);
    mb_init_i(b, "sizes", 4, sizes);
    n = mb_node(b, "Resize", "up", "x - - sizes", "y");
    at_s(b, n, "coordinate_transformation_mode", "asymmetric");
    at_s(b, n, "nearest_mode", "floor");
    mb_output(b, "y");
    y = run(b, x, 4, in, osh, &on);
    /* rows: 0 * 2/3 = 0, 2/3 -> 0, 4/3 -> 1; cols: 0, 0.5, 1, 1.5 -> 0 0 1 1 */
    const float nn[12] = {1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4};
    assert_int_equal(osh[2], 3);
    assert_int_equal(osh[3], 4);
    expect_close(y, nn, 12, 0, "resize nearest sizes");
    free(y);
    mb_free(b);
    /* Upsample (opset 9): nearest x2 */
    b = mb_new(9);
    mb_input(b, "x", 4, in);
    mb_init_f(b, "scales", 1, &sd, sc, 0);
    mb_node(b, "Upsample", "up", "x scales", "y");
    mb_output(b, "y");
    y = run(b, x, 4, in, osh, &on);
    const float up[16] = {1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4};
    expect_close(y, up, 16, 0, "upsample nearest");
    free(y);
    mb_free(b);
    /* trilinear 3D, align_corners: the corners are kept, the middle is their mean */
    b = mb_new(13);
    int64_t in3[5] = {1, 1, 2, 2, 2};
    int64_t sz3[5] = {1, 1, 3, 3, 3};
    float x3[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    mb_input(b, "x", 5, in3);
    mb_init_i(b, "sizes", 5, sz3);
    n = mb_node(b, "Resize", "up", "x - - sizes", "y");
    at_s(b, n, "mode", "linear");
    at_s(b, n, "coordinate_transformation_mode", "align_corners");
    mb_output(b, "y");
    y = run(b, x3, 5, in3, osh, &on);
    assert_int_equal(on, 27);
    assert_float_equal(y[0], 0, 1e-6);
    assert_float_equal(y[26], 7, 1e-6);
    assert_float_equal(y[13], 3.5f, 1e-6);
    assert_float_equal(y[1], 0.5f, 1e-6);
    free(y);
    mb_free(b);
}

/* --- shape subgraphs ------------------------------------------------------------------------- */

/* Shape -> Gather -> Unsqueeze -> Concat -> Reshape (PyTorch's flatten) and friends: folded at
 * plan time, no steps left but the views. */
static void test_shape_folding(void **state)
{
    (void)state;
    int64_t in[4] = {1, 2, 3, 2}, osh[GPU_NN_MAX_RANK], zero = 0, minus1 = -1, ax0 = 0;
    float x[12];
    for (int i = 0; i < 12; i++)
        x[i] = (float)i;
    mb *b = mb_new(13);
    mb_input(b, "x", 4, in);
    mb_init_i(b, "i0", 1, &zero);
    mb_init_i(b, "m1", 1, &minus1);
    mb_init_i(b, "ax", 1, &ax0);
    mb_node(b, "Shape", "shape", "x", "s");
    Onnx__NodeProto *n = mb_node(b, "Gather", "g", "s i0", "n");
    at_i(b, n, "axis", 0);
    n = mb_node(b, "Concat", "cat", "n m1", "shp");
    at_i(b, n, "axis", 0);
    mb_node(b, "Reshape", "r", "x shp", "flat");   /* [1, 12] */
    mb_node(b, "Unsqueeze", "u", "flat ax", "u1"); /* [1, 1, 12] */
    n = mb_node(b, "Cast", "cast", "u1", "c1");
    at_i(b, n, "to", 1);
    mb_node(b, "Identity", "id", "c1", "i1");
    n = mb_node(b, "Flatten", "f", "i1", "y"); /* axis 1: [1, 12] */
    mb_output(b, "y");
    gpu_nn_model *m = NULL;
    lc_err err = {0};
    if (load(b, g_ctx, &m, &err) != LC_OK)
        fail_msg("%s", lc_err_msg(&err));
    assert_int_equal(m->plans[0]->nsteps, 0); /* views only: the output is the input's buffer */
    float y[12];
    assert_int_equal(gpu_nn_forward(m, x, in, 4, y, 12, osh, &err), LC_OK);
    assert_int_equal(osh[0], 1);
    assert_int_equal(osh[1], 12);
    expect_close(y, x, 12, 0, "folded reshape");
    gpu_nn_free(m);
    mb_free(b);

    /* Slice on a shape and Constant nodes feeding a Resize's sizes */
    b = mb_new(13);
    int64_t in2[4] = {1, 1, 2, 2}, st = 2, en = 4, two[2] = {2, 2};
    mb_input(b, "x", 4, in2);
    mb_init_i(b, "st", 1, &st);
    mb_init_i(b, "en", 1, &en);
    mb_init_i(b, "two", 2, two);
    mb_node(b, "Shape", "shape", "x", "s");
    mb_node(b, "Slice", "sl", "s st en", "hw"); /* [2, 2] */
    mb_node(b, "Mul", "mul", "hw two", "hw2");  /* [4, 4] */
    n = mb_node(b, "Constant", "k", "", "nc");
    Onnx__AttributeProto *a = attr(b, n, "value_ints", ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INTS);
    a->n_ints = 2;
    a->ints = al(b, 2 * sizeof(int64_t));
    a->ints[0] = a->ints[1] = 1;
    n = mb_node(b, "Concat", "cat", "nc hw2", "sizes");
    at_i(b, n, "axis", 0);
    mb_node(b, "Resize", "up", "x - - sizes", "y");
    mb_output(b, "y");
    size_t on;
    float x2[4] = {1, 2, 3, 4};
    float *yy = run(b, x2, 4, in2, osh, &on);
    assert_int_equal(on, 16);
    assert_int_equal(osh[3], 4);
    free(yy);
    mb_free(b);
}

/* --- loader errors ------------------------------------------------------------------------------
 */

static mb *small_model(void)
{
    int64_t in[4] = {1, 1, 4, 4}, wd[4] = {2, 1, 3, 3}, bd = 2;
    float w[18], bias[2] = {0, 1};
    for (int i = 0; i < 18; i++)
        w[i] = (float)i / 18;
    mb *b = mb_new(13);
    mb_input(b, "x", 4, in);
    mb_init_f(b, "w", 4, wd, w, 1);
    mb_init_f(b, "b", 1, &bd, bias, 0);
    Onnx__NodeProto *n = mb_node(b, "Conv", "conv1", "x w b", "c");
    at_ints(b, n, "pads", 4, I(1), I(1), I(1), I(1));
    mb_node(b, "Relu", "relu1", "c", "y");
    mb_output(b, "y");
    return b;
}

static void expect_load_error(mb *b, lc_rc want, const char *needle)
{
    gpu_nn_model *m = (gpu_nn_model *)(uintptr_t)1;
    lc_err err = {0};
    lc_rc rc = load(b, g_ctx, &m, &err);
    if (rc == LC_OK)
        fail_msg("the model loaded, expected an error with \"%s\"", needle);
    assert_null(m);
    if (rc != want || !strstr(lc_err_msg(&err), needle))
        fail_msg("rc %d (want %d), message \"%s\" (want \"%s\" in it)", rc, want, lc_err_msg(&err),
                 needle);
}

static void test_load_errors(void **state)
{
    (void)state;
    mb *b = small_model();
    b->nodes[1]->op_type = sdup(b, "FancyOp");
    expect_load_error(b, LC_ERR_UNSUPPORTED,
                      "node \"relu1\": operator \"FancyOp\" is not supported");
    mb_free(b);

    b = small_model();
    at_i(b, b->nodes[0], "frobnicate", 1);
    expect_load_error(b, LC_ERR_UNSUPPORTED,
                      "node \"conv1\" (Conv): unsupported attribute \"frobnicate\"");
    mb_free(b);

    b = small_model(); /* weights of 1 input channel, data of 2 */
    b->ins[0] = value_info(b, "x", 4, (int64_t[]){1, 2, 4, 4});
    expect_load_error(b, LC_ERR_INVALID,
                      "node \"conv1\" (Conv): weights 2x1x3x3 do not fit input 1x2x4x4");
    mb_free(b);

    b = small_model(); /* raw_data one float short */
    b->inits[0]->raw_data.len -= 4;
    expect_load_error(b, LC_ERR_INVALID,
                      "tensor \"w\" (float): raw_data holds 17 elements, its shape needs 18");
    mb_free(b);

    b = small_model();
    b->os.version = 3;
    expect_load_error(b, LC_ERR_UNSUPPORTED, "ONNX opset 3 is not supported (supported: 7 to 21)");
    mb_free(b);

    b = small_model();
    b->nodes[1]->input[0] = sdup(b, "nowhere");
    expect_load_error(b, LC_ERR_INVALID, "node \"relu1\" (Relu): input \"nowhere\" is not defined");
    mb_free(b);

    b = small_model(); /* a cycle: relu feeds conv */
    b->nodes[0]->input[0] = sdup(b, "y");
    b->ins[0]->name = sdup(b, "x_unused");
    expect_load_error(b, LC_ERR_INVALID, "cycle");
    mb_free(b);

    b = small_model();
    at_s(b, b->nodes[0], "auto_pad", "SIDEWAYS");
    expect_load_error(b, LC_ERR_INVALID, "node \"conv1\" (Conv): attribute \"auto_pad\" is not");
    mb_free(b);

    b = small_model(); /* external data */
    b->inits[1]->has_data_location = 1;
    b->inits[1]->data_location = ONNX__TENSOR_PROTO__DATA_LOCATION__EXTERNAL;
    expect_load_error(b, LC_ERR_UNSUPPORTED, "tensor \"b\" keeps its data in an external file");
    mb_free(b);

    b = small_model(); /* a domain of its own */
    b->nodes[1]->domain = sdup(b, "com.example");
    expect_load_error(b, LC_ERR_UNSUPPORTED, "operator \"Relu\" of domain \"com.example\"");
    mb_free(b);

    b = small_model(); /* Resize with cubic */
    at_s(b, mb_node(b, "Resize", "rs", "y - scales", "z"), "mode", "cubic");
    expect_load_error(b, LC_ERR_UNSUPPORTED,
                      "node \"rs\" (Resize): attribute \"mode\" is not nearest or linear");
    mb_free(b);

    b = small_model(); /* an input too small for the kernel */
    b->ins[0] = value_info(b, "x", 4, (int64_t[]){1, 1, 2, 2});
    b->nodes[0]->n_attribute = 0; /* no pads: 2x2 under a 3x3 kernel */
    expect_load_error(b, LC_ERR_INVALID,
                      "node \"conv1\" (Conv): input 1x1x2x2 is too small for the kernel");
    mb_free(b);

    b = small_model(); /* two graph inputs */
    mb_input(b, "x2", 4, (int64_t[]){1, 1, 4, 4});
    expect_load_error(b, LC_ERR_UNSUPPORTED, "the graph has more than one input");
    mb_free(b);

    b = small_model(); /* a Reshape whose shape is computed at run time */
    mb_node(b, "Reshape", "rs", "y y", "z");
    b->outs[0]->name = sdup(b, "z");
    expect_load_error(b, LC_ERR_UNSUPPORTED, "node \"rs\" (Reshape)");
    mb_free(b);

    b = small_model(); /* BatchNormalization in training mode */
    {
        Onnx__NodeProto *bn = mb_node(b, "BatchNormalization", "bn", "y b b b b", "z");
        at_i(b, bn, "training_mode", 1);
    }
    expect_load_error(b, LC_ERR_UNSUPPORTED,
                      "node \"bn\" (BatchNormalization): attribute \"training_mode\" must be 0");
    mb_free(b);

    gpu_nn_model *m = NULL;
    lc_err err = {0};
    const char junk[] = "this is not a protobuf message at all";
    assert_int_equal(gpu_nn_load(g_ctx, junk, sizeof(junk), NULL, &m, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_nn_load(g_ctx, junk, 0, NULL, &m, &err), LC_ERR_INVALID);
    assert_int_equal(gpu_nn_load_file(g_ctx, "/nonexistent/model.onnx", NULL, &m, &err),
                     LC_ERR_NOT_FOUND);
    assert_null(m);
}

/* Nested message of keys (outermost first), each level holding the next. */
static uint8_t *nest(const uint8_t *keys, int levels, size_t *len)
{
    size_t cap = (size_t)levels * 8 + 8, n = 0;
    uint8_t *in = malloc(cap), *out = malloc(cap);
    assert_true(in && out);
    for (int l = levels - 1; l >= 0; l--) {
        uint8_t hdr[12];
        size_t h = 0, v = n;
        hdr[h++] = keys[l];
        do {
            hdr[h++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
            v >>= 7;
        } while (v);
        memcpy(out, hdr, h);
        memcpy(out + h, in, n);
        n += h;
        uint8_t *t = in;
        in = out;
        out = t;
    }
    free(out);
    *len = n;
    return in;
}

/* Every prefix of a valid model (and bytes flipped in it) fails cleanly, never crashes. */
static void test_load_truncated(void **state)
{
    (void)state;
    mb *b = small_model();
    size_t len;
    uint8_t *buf = mb_pack(b, &len);
    int invalid = 0;
    for (size_t cut = 0; cut < len; cut++) {
        gpu_nn_model *m = NULL;
        lc_err err = {0};
        lc_rc rc = gpu_nn_load(g_ctx, buf, cut, NULL, &m, &err);
        if (rc == LC_OK) { /* a prefix can be a valid, smaller model: then it must run */
            gpu_nn_free(m);
            continue;
        }
        assert_null(m);
        assert_true(strlen(lc_err_msg(&err)) > 0);
        invalid += rc == LC_ERR_INVALID;
    }
    assert_true(invalid > (int)len / 2);
    gpu_nn_model *m = NULL;
    lc_err err = {0};
    assert_int_equal(gpu_nn_load(g_ctx, buf, len, NULL, &m, &err), LC_OK);
    gpu_nn_free(m);
    assert_int_equal(gpu_nn_load(g_ctx, buf, len - 3, NULL, &m, &err), LC_ERR_INVALID);
    assert_non_null(strstr(lc_err_msg(&err), "truncated or corrupt"));
    for (size_t i = 0; i < len; i += 3) {
        uint8_t save = buf[i];
        buf[i] ^= 0xa5;
        if (gpu_nn_load(g_ctx, buf, len, NULL, &m, &err) == LC_OK)
            gpu_nn_free(m);
        buf[i] = save;
    }
    /* deep nesting (graph > node > attribute > graph > ...) is refused before protobuf-c
     * recurses; a shallow one is a parse error of another kind */
    uint8_t keys[400];
    keys[0] = 0x3a; /* ModelProto.graph */
    for (int l = 1; l < 400; l++)
        keys[l] = l % 3 == 1 ? 0x0a : l % 3 == 2 ? 0x2a : 0x32; /* node, attribute, g */
    size_t dl;
    uint8_t *deep = nest(keys, 400, &dl);
    assert_int_equal(gpu_nn_load(g_ctx, deep, dl, NULL, &m, &err), LC_ERR_INVALID);
    assert_non_null(strstr(lc_err_msg(&err), "nest deeper than"));
    free(deep);
    deep = nest(keys, 7, &dl);
    assert_int_not_equal(gpu_nn_load(g_ctx, deep, dl, NULL, &m, &err), LC_OK);
    assert_null(strstr(lc_err_msg(&err), "nest deeper than"));
    free(deep);
    free(buf);
    mb_free(b);
}

/* Initializers as fp16 (raw_data and int32_data), bf16, double, int32 shapes. */
static void test_tensor_types(void **state)
{
    (void)state;
    int64_t in[4] = {1, 2, 1, 1}, cd[3] = {2, 1, 1}, osh[GPU_NN_MAX_RANK];
    float x[2] = {1, 1};
    const uint16_t h[2] = {0x3c00, 0xc000}; /* 1.0, -2.0 */
    for (int kind = 0; kind < 4; kind++) {
        mb *b = mb_new(13);
        mb_input(b, "x", 4, in);
        Onnx__TensorProto *t = tensor(b, "c", kind < 2 ? 10 : kind == 2 ? 16 : 11, 3, cd);
        if (kind == 0) {
            t->has_raw_data = 1;
            t->raw_data.len = 4;
            t->raw_data.data = al(b, 4);
            memcpy(t->raw_data.data, h, 4);
        } else if (kind == 1 || kind == 2) {
            t->n_int32_data = 2;
            t->int32_data = al(b, 2 * sizeof(int32_t));
            t->int32_data[0] = kind == 1 ? h[0] : 0x3f80; /* bf16 1.0 */
            t->int32_data[1] = kind == 1 ? h[1] : 0xc000; /* bf16 -2.0 */
        } else {
            t->n_double_data = 2;
            t->double_data = al(b, 2 * sizeof(double));
            t->double_data[0] = 1;
            t->double_data[1] = -2;
        }
        b->inits[b->g.n_initializer++] = t;
        mb_node(b, "Mul", "mul", "x c", "y");
        mb_output(b, "y");
        size_t on;
        float *y = run(b, x, 4, in, osh, &on);
        assert_float_equal(y[0], 1.0f, 0);
        assert_float_equal(y[1], -2.0f, 0);
        free(y);
        mb_free(b);
    }
    assert_float_equal(nn_half_to_float(0x0001), 5.960464477539063e-8f, 0); /* subnormal */
    assert_float_equal(nn_half_to_float(0x7bff), 65504.0f, 0);
    assert_true(isinf(nn_half_to_float(0xfc00)));
}

/* --- memory planner ----------------------------------------------------------------------------
 */

static void test_planner(void **state)
{
    (void)state;
    /* x -> conv a -> relu -> conv b -> conv c -> add(a, c) -> conv d: a lives across b and c */
    int64_t in[4] = {1, 4, 16, 16}, wd[4] = {4, 4, 3, 3}, osh[GPU_NN_MAX_RANK];
    float *w = rand_buf(144), *x = rand_buf(1024);
    mb *b = mb_new(13);
    mb_input(b, "x", 4, in);
    mb_init_f(b, "w", 4, wd, w, 1);
    const char *spec[][3] = {{"conv0", "x w", "a"},
                             {"conv1", "a2 w", "b"},
                             {"conv2", "b w", "c"},
                             {"conv3", "c2 w", "y"}};
    for (int i = 0; i < 4; i++) {
        Onnx__NodeProto *n = mb_node(b, "Conv", spec[i][0], spec[i][1], spec[i][2]);
        at_ints(b, n, "pads", 4, I(1), I(1), I(1), I(1));
    }
    mb_node(b, "Sigmoid", "sig", "a", "a1"); /* fused into conv0 */
    mb_node(b, "Relu", "relu", "a1", "a2");  /* in place */
    mb_node(b, "Add", "res", "a2 c", "c2");  /* in place over a2, which dies there */
    mb_output(b, "y");
    /* conv0+sigmoid, relu, conv1, conv2, add, conv3 */
    gpu_nn_model *m = NULL;
    lc_err err = {0};
    if (load(b, g_ctx, &m, &err) != LC_OK)
        fail_msg("%s", lc_err_msg(&err));
    const nn_plan *p = m->plans[0];
    size_t one = 1024 * sizeof(float);
    print_message("planner: %zu steps, arena %zu bytes, naive %zu bytes\n", p->nsteps,
                  p->arena_bytes, p->naive_bytes);
    assert_int_equal(p->nsteps, 6);
    assert_true(p->arena_bytes < p->naive_bytes);
    assert_true(p->arena_bytes <= 3 * one); /* at most three activations alive at once */
    /* relu (in place over conv0's output) and add (in place over its first operand) */
    assert_int_equal(p->steps[1].out.off, p->steps[1].in[0].off);
    assert_int_equal(p->steps[4].out.off, p->steps[4].in[0].off);
    /* no step writes over an operand another step still needs: compare with a run of the
     * same graph where every step has its own buffer (direct convolutions in the test) */
    float y[1024], t0[1024], t1[1024], t2[1024];
    assert_int_equal(gpu_nn_forward(m, x, in, 4, y, 1024, osh, &err), LC_OK);
    geo q = mkgeo(1, 4, 4, 1, G3(1, 16, 16), G3(1, 3, 3), G3(1, 1, 1), G3(1, 1, 1), G3(0, 1, 1),
                  G3(0, 1, 1));
    q.od[0] = 1, q.od[1] = q.od[2] = 16;
    conv_ref(&q, x, w, NULL, t0);
    for (int i = 0; i < 1024; i++)
        t0[i] = fmaxf(1.0f / (1.0f + expf(-t0[i])), 0);
    conv_ref(&q, t0, w, NULL, t1);
    conv_ref(&q, t1, w, NULL, t2);
    for (int i = 0; i < 1024; i++)
        t2[i] += t0[i];
    conv_ref(&q, t2, w, NULL, t1);
    expect_close(y, t1, 1024, 1e-4, "planned graph");
    gpu_nn_free(m);
    free(w);
    free(x);
    mb_free(b);
}

/* Steps between convolutions keep the channels-last layout the CPU gives them (gpu/nn/nn_cpu.h):
 * instance norm with LeakyReLU (70 channels: tiles and tails; 1200 positions: two chunks; a
 * batch of two), a standalone batch norm, a 1x1 convolution, a convolution of the (plain) graph
 * input, channel concat, a ReLU whose input lives on, an in-place Add, a ConvTranspose with a
 * fused Sigmoid whose output is the graph's through a Reshape (so it must be plain), all
 * against direct loops. */
static void test_channels_last(void **state)
{
    (void)state;
    enum { N = 2, CI = 3, C = 70, CB = 6, CT = 4 };
    int64_t in[5] = {N, CI, 6, 10, 20}, w0d[5] = {C, CI, 3, 3, 3}, w1d[5] = {CB, C, 1, 1, 1};
    int64_t w2d[5] = {CB, CI, 3, 3, 3}, wtd[5] = {2 * CB, CT, 2, 2, 2}, cd = C, cbd = CB, ctd = CT,
            shp[4] = {N, CT, 12, 20 * 40}, shd = 4, osh[GPU_NN_MAX_RANK];
    size_t P = 6 * 10 * 20, nx = N * CI * P, na = N * C * P, nb = N * CB * P;
    size_t ny = N * CT * 8 * P, on;
    float *x = rand_buf(nx), *w0 = rand_buf(C * CI * 27), *b0 = rand_buf(C), *w1 = rand_buf(CB * C),
          *w2 = rand_buf(CB * CI * 27), *b2 = rand_buf(CB), *wt = rand_buf(2 * CB * CT * 8),
          *bt = rand_buf(CT), *isc = rand_buf(C), *ibi = rand_buf(C), *bg = rand_buf(C),
          *bb = rand_buf(C), *bm = rand_buf(C), *bv = rand_buf(C);
    for (int c = 0; c < C; c++)
        bv[c] = 0.5f + fabsf(bv[c]);
    mb *b = mb_new(13);
    mb_input(b, "x", 5, in);
    mb_init_f(b, "w0", 5, w0d, w0, 1);
    mb_init_f(b, "b0", 1, &cd, b0, 0);
    mb_init_f(b, "is", 1, &cd, isc, 1);
    mb_init_f(b, "ib", 1, &cd, ibi, 0);
    mb_init_f(b, "bg", 1, &cd, bg, 1);
    mb_init_f(b, "bb", 1, &cd, bb, 0);
    mb_init_f(b, "bm", 1, &cd, bm, 1);
    mb_init_f(b, "bv", 1, &cd, bv, 0);
    mb_init_f(b, "w1", 5, w1d, w1, 1);
    mb_init_f(b, "w2", 5, w2d, w2, 0);
    mb_init_f(b, "b2", 1, &cbd, b2, 1);
    mb_init_f(b, "wt", 5, wtd, wt, 1);
    mb_init_f(b, "bt", 1, &ctd, bt, 0);
    mb_init_i(b, "shape", (size_t)shd, shp);
    Onnx__NodeProto *n = mb_node(b, "Conv", "conv0", "x w0 b0", "a");
    at_ints(b, n, "pads", 6, I(1), I(1), I(1), I(1), I(1), I(1));
    at_f(b, mb_node(b, "InstanceNormalization", "in", "a is ib", "a1"), "epsilon", 1e-5f);
    at_f(b, mb_node(b, "LeakyRelu", "lrelu", "a1", "a2"), "alpha", 0.1f);
    at_f(b, mb_node(b, "BatchNormalization", "bn", "a2 bg bb bm bv", "a3"), "epsilon", 1e-5f);
    mb_node(b, "Conv", "conv1", "a3 w1", "bo");
    n = mb_node(b, "Conv", "conv2", "x w2 b2", "c");
    at_ints(b, n, "pads", 6, I(1), I(1), I(1), I(1), I(1), I(1));
    at_i(b, mb_node(b, "Concat", "cat", "bo c", "d"), "axis", 1);
    mb_node(b, "Relu", "relu", "d", "e");
    mb_node(b, "Add", "add", "d e", "f");
    n = mb_node(b, "ConvTranspose", "up", "f wt bt", "g");
    at_ints(b, n, "strides", 3, I(2), I(2), I(2));
    mb_node(b, "Sigmoid", "sig", "g", "g1");
    mb_node(b, "Reshape", "flat", "g1 shape", "y");
    mb_output(b, "y");
    float *y = run(b, x, 5, in, osh, &on);
    assert_int_equal(on, ny);
    assert_int_equal(osh[3], 20 * 40);

    float *a = malloc(na * sizeof(float)), *bo = malloc(nb * sizeof(float)),
          *c = malloc(nb * sizeof(float)), *f = malloc(2 * nb * sizeof(float)),
          *ref = malloc(ny * sizeof(float));
    assert_true(a && bo && c && f && ref);
    geo q = mkgeo(N, CI, C, 1, G3(6, 10, 20), G3(3, 3, 3), G3(1, 1, 1), G3(1, 1, 1), G3(1, 1, 1),
                  G3(1, 1, 1));
    memcpy(q.od, q.id, sizeof(q.od));
    conv_ref(&q, x, w0, b0, a);
    for (size_t u = 0; u < N * C; u++) {
        size_t ch = u % C;
        double m = 0, v = 0;
        for (size_t i = 0; i < P; i++)
            m += a[u * P + i];
        m /= (double)P;
        for (size_t i = 0; i < P; i++)
            v += (a[u * P + i] - m) * (a[u * P + i] - m);
        v /= (double)P;
        for (size_t i = 0; i < P; i++) {
            double t = (a[u * P + i] - m) / sqrt(v + 1e-5) * isc[ch] + ibi[ch];
            t = t < 0 ? 0.1 * t : t;
            a[u * P + i] = (float)((t - bm[ch]) / sqrt((double)bv[ch] + 1e-5) * bg[ch] + bb[ch]);
        }
    }
    q.ci = C;
    q.co = CB;
    memcpy(q.k, G3(1, 1, 1), sizeof(q.k));
    memcpy(q.pb, G3(0, 0, 0), sizeof(q.pb));
    memcpy(q.pe, G3(0, 0, 0), sizeof(q.pe));
    conv_ref(&q, a, w1, NULL, bo);
    q.ci = CI;
    memcpy(q.k, G3(3, 3, 3), sizeof(q.k));
    memcpy(q.pb, G3(1, 1, 1), sizeof(q.pb));
    memcpy(q.pe, G3(1, 1, 1), sizeof(q.pe));
    conv_ref(&q, x, w2, b2, c);
    for (size_t k = 0; k < N; k++) {
        memcpy(f + 2 * k * CB * P, bo + k * CB * P, CB * P * sizeof(float));
        memcpy(f + (2 * k + 1) * CB * P, c + k * CB * P, CB * P * sizeof(float));
    }
    for (size_t i = 0; i < 2 * nb; i++)
        f[i] += f[i] > 0 ? f[i] : 0;
    geo t = mkgeo(N, 2 * CB, CT, 1, G3(6, 10, 20), G3(2, 2, 2), G3(2, 2, 2), G3(1, 1, 1),
                  G3(0, 0, 0), G3(0, 0, 0));
    memcpy(t.od, G3(12, 20, 40), sizeof(t.od));
    convt_ref(&t, f, wt, bt, ref);
    for (size_t i = 0; i < ny; i++)
        ref[i] = 1.0f / (1.0f + expf(-ref[i]));
    expect_close(y, ref, ny, 1e-5, "channels-last chain");
    float *bufs[] = {x, w0, b0, w1, w2, b2, wt, bt, isc, ibi, bg, bb, bm, bv, y, a, bo, c, f, ref};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        free(bufs[i]);
    mb_free(b);
}

/* A model with free spatial sizes planned for two shapes: both plans right (their steps share
 * the weights the CPU reorders once), and freeing the model returns every counted byte. */
static void test_plans_of_two_shapes(void **state)
{
    (void)state;
    int64_t in[5] = {1, 4, -1, -1, -1}, wd[5] = {16, 4, 3, 3, 3}, bd = 16, osh[GPU_NN_MAX_RANK];
    const int64_t sizes[3][3] = {{4, 6, 8}, {5, 3, 7}, {4, 6, 8}};
    float *w = rand_buf(16 * 4 * 27), *bias = rand_buf(16);
    mb *b = mb_new(13);
    mb_input(b, "x", 5, in);
    mb_init_f(b, "w", 5, wd, w, 1);
    mb_init_f(b, "b", 1, &bd, bias, 0);
    Onnx__NodeProto *n = mb_node(b, "Conv", "conv", "x w b", "a");
    at_ints(b, n, "pads", 6, I(1), I(1), I(1), I(1), I(1), I(1));
    mb_node(b, "Relu", "relu", "a", "y");
    mb_output(b, "y");
    gpu_mem_stats st;
    gpu_ctx_memory(g_ctx, &st);
    size_t before = st.used;
    gpu_nn_model *m = NULL;
    lc_err err = {0};
    if (load(b, g_ctx, &m, &err) != LC_OK)
        fail_msg("%s", lc_err_msg(&err));
    for (int t = 0; t < 3; t++) {
        int64_t sh[5] = {1, 4, sizes[t][0], sizes[t][1], sizes[t][2]};
        size_t nx = dims_count(5, sh), ny = nx * 4;
        float *x = rand_buf(nx), *y = malloc(ny * sizeof(float)), *ref = malloc(ny * sizeof(float));
        assert_true(y && ref);
        if (gpu_nn_forward(m, x, sh, 5, y, ny, osh, &err) != LC_OK)
            fail_msg("%s", lc_err_msg(&err));
        geo q = mkgeo(1, 4, 16, 1, sizes[t], G3(3, 3, 3), G3(1, 1, 1), G3(1, 1, 1), G3(1, 1, 1),
                      G3(1, 1, 1));
        memcpy(q.od, q.id, sizeof(q.od));
        conv_ref(&q, x, w, bias, ref);
        for (size_t i = 0; i < ny; i++)
            ref[i] = ref[i] > 0 ? ref[i] : 0;
        expect_close(y, ref, ny, 1e-5, "one of two plans");
        free(x);
        free(y);
        free(ref);
    }
    assert_int_equal(m->nplans, 2);
    gpu_nn_free(m);
    gpu_ctx_memory(g_ctx, &st);
    assert_int_equal(st.used, before);
    free(w);
    free(bias);
    mb_free(b);
}

/* --- sliding window ------------------------------------------------------------------------------
 */

/* A two-class model: logits (-x * a, x * a + b) from a 3x3(x3) convolution with zero padding, so
 * patches see borders and the aggregation matters. */
static mb *window_model(int sd, const int64_t *patch, int free_batch)
{
    int64_t in[5] = {free_batch ? -1 : 1, 1}, wd[5] = {2, 1}, bd = 2;
    for (int i = 0; i < sd; i++) {
        in[2 + i] = patch[i];
        wd[2 + i] = 3;
    }
    size_t nw = 2 * (sd == 3 ? 27 : 9);
    float *w = malloc(nw * sizeof(float)), bias[2] = {0.1f, -0.1f};
    assert_non_null(w);
    for (size_t i = 0; i < nw; i++)
        w[i] = (i < nw / 2 ? -1.0f : 1.0f) * (0.5f + 0.05f * (float)(i % (nw / 2)));
    mb *b = mb_new(13);
    mb_input(b, "x", sd + 2, in);
    mb_init_f(b, "w", sd + 2, wd, w, 1);
    mb_init_f(b, "b", 1, &bd, bias, 0);
    Onnx__NodeProto *n = mb_node(b, "Conv", "head", "x w b", "y");
    if (sd == 3)
        at_ints(b, n, "pads", 6, I(1), I(1), I(1), I(1), I(1), I(1));
    else
        at_ints(b, n, "pads", 4, I(1), I(1), I(1), I(1));
    mb_output(b, "y");
    free(w);
    return b;
}

/* nnU-Net's aggregation written out directly with gpu_nn_forward on each patch. */
static void window_direct(gpu_nn_model *m, int sd, const float *img, const int64_t *vd,
                          const int64_t *ps, int mirror, float *probs)
{
    int64_t pd[3], lo[3], steps[3][64], ns[3];
    size_t nvox = (size_t)(vd[0] * vd[1] * vd[2]), pv = (size_t)(ps[0] * ps[1] * ps[2]);
    for (int a = 0; a < 3; a++) {
        pd[a] = vd[a] > ps[a] ? vd[a] : ps[a];
        lo[a] = (pd[a] - vd[a]) / 2;
        if (sd == 2 && a == 0) {
            ns[0] = vd[0];
            lo[0] = 0;
            for (int64_t i = 0; i < vd[0]; i++)
                steps[0][i] = i;
            continue;
        }
        double target = (double)ps[a] * 0.5;
        ns[a] = (int64_t)ceil((double)(pd[a] - ps[a]) / target) + 1;
        double actual = ns[a] > 1 ? (double)(pd[a] - ps[a]) / (double)(ns[a] - 1) : 0;
        for (int64_t i = 0; i < ns[a]; i++)
            steps[a][i] = (int64_t)rint(actual * (double)i);
    }
    /* Gaussian: sigma = patch / 8 around patch // 2, divided by its maximum */
    float *g = malloc(pv * sizeof(float));
    double *acc = calloc(2 * nvox, sizeof(double)), *ws = calloc(nvox, sizeof(double));
    float *x = malloc(pv * sizeof(float)), *y = malloc(2 * pv * sizeof(float));
    assert_true(g && acc && ws && x && y);
    for (int64_t z = 0, i = 0; z < ps[0]; z++)
        for (int64_t yy = 0; yy < ps[1]; yy++)
            for (int64_t xx = 0; xx < ps[2]; xx++, i++) {
                double e = 0;
                int64_t c[3] = {z, yy, xx};
                for (int a = 0; a < 3; a++) {
                    if (ps[a] == 1)
                        continue;
                    double s = ps[a] / 8.0, d = (double)(c[a] - ps[a] / 2);
                    e += d * d / (2 * s * s);
                }
                g[i] = (float)exp(-e);
            }
    int nflip = mirror ? (sd == 3 ? 8 : 4) : 1;
    int64_t ish[5] = {1, 1}, osh[GPU_NN_MAX_RANK];
    for (int i = 0; i < sd; i++)
        ish[2 + i] = ps[3 - sd + i];
    lc_err err = {0};
    for (int64_t iz = 0; iz < ns[0]; iz++)
        for (int64_t iy = 0; iy < ns[1]; iy++)
            for (int64_t ix = 0; ix < ns[2]; ix++) {
                int64_t o[3] = {steps[0][iz] - lo[0], steps[1][iy] - lo[1], steps[2][ix] - lo[2]};
                for (int f = 0; f < nflip; f++) {
                    int fz = f & 4, fy = f & 2, fx = f & 1;
                    for (int64_t z = 0, i = 0; z < ps[0]; z++)
                        for (int64_t yy = 0; yy < ps[1]; yy++)
                            for (int64_t xx = 0; xx < ps[2]; xx++, i++) {
                                int64_t vz = o[0] + (fz ? ps[0] - 1 - z : z);
                                int64_t vy = o[1] + (fy ? ps[1] - 1 - yy : yy);
                                int64_t vx = o[2] + (fx ? ps[2] - 1 - xx : xx);
                                int in = vz >= 0 && vy >= 0 && vx >= 0 && vz < vd[0] &&
                                         vy < vd[1] && vx < vd[2];
                                x[i] = in ? img[(vz * vd[1] + vy) * vd[2] + vx] : 0;
                            }
                    assert_int_equal(gpu_nn_forward(m, x, ish, sd + 2, y, 2 * pv, osh, &err),
                                     LC_OK);
                    for (int64_t z = 0, i = 0; z < ps[0]; z++)
                        for (int64_t yy = 0; yy < ps[1]; yy++)
                            for (int64_t xx = 0; xx < ps[2]; xx++, i++) {
                                int64_t vz = o[0] + z, vy = o[1] + yy, vx = o[2] + xx;
                                if (vz < 0 || vy < 0 || vx < 0 || vz >= vd[0] || vy >= vd[1] ||
                                    vx >= vd[2])
                                    continue;
                                int64_t mz = fz ? ps[0] - 1 - z : z, my = fy ? ps[1] - 1 - yy : yy,
                                        mx = fx ? ps[2] - 1 - xx : xx;
                                size_t q = (size_t)((mz * ps[1] + my) * ps[2] + mx);
                                double l0 = y[q], l1 = y[pv + q], mxl = l0 > l1 ? l0 : l1;
                                double e0 = exp(l0 - mxl), e1 = exp(l1 - mxl);
                                size_t v = (size_t)((vz * vd[1] + vy) * vd[2] + vx);
                                double w = g[i] / nflip;
                                acc[v] += w * e0 / (e0 + e1);
                                acc[nvox + v] += w * e1 / (e0 + e1);
                                ws[v] += w;
                            }
                }
            }
    for (size_t v = 0; v < nvox; v++) {
        probs[v] = (float)(acc[v] / ws[v]);
        probs[nvox + v] = (float)(acc[nvox + v] / ws[v]);
    }
    free(g);
    free(acc);
    free(ws);
    free(x);
    free(y);
}

typedef struct prog {
    size_t calls, last, total;
} prog;

static void on_progress(void *arg, size_t done, size_t total)
{
    prog *p = arg;
    p->calls++;
    assert_true(done > p->last);
    p->last = done;
    p->total = total;
}

static void check_window(int sd, const int64_t *patch, const int64_t *vd, int mirror, int batch)
{
    mb *b = window_model(sd, patch, batch > 1);
    gpu_nn_model *m = NULL;
    lc_err err = {0};
    if (load(b, g_ctx, &m, &err) != LC_OK)
        fail_msg("%s", lc_err_msg(&err));
    size_t nvox = (size_t)(vd[0] * vd[1] * vd[2]);
    float *img = rand_buf(nvox), *want = malloc(2 * nvox * sizeof(float));
    float *got = malloc(2 * nvox * sizeof(float));
    uint8_t *lab = malloc(nvox);
    assert_true(want && got && lab);
    gpu_vol *v = NULL, *labels = NULL, *probs = NULL;
    assert_int_equal(
        gpu_vol_borrow(g_ctx, GPU_F32, img, (size_t)vd[2], (size_t)vd[1], (size_t)vd[0], &v, &err),
        LC_OK);
    prog pg = {0};
    gpu_nn_window_opts o = {
        .mirror = mirror, .batch = batch, .progress = on_progress, .progress_arg = &pg};
    if (gpu_nn_segment(m, v, &o, &labels, &probs, &err) != LC_OK)
        fail_msg("segment: %s", lc_err_msg(&err));
    assert_true(pg.calls > 0);
    assert_int_equal(pg.last, pg.total);
    size_t dims[3];
    gpu_vol_dims(probs, dims);
    assert_int_equal(dims[2], 2 * (size_t)vd[0]);
    assert_int_equal(gpu_vol_download(g_ctx, probs, got, &err), LC_OK);
    assert_int_equal(gpu_vol_download(g_ctx, labels, lab, &err), LC_OK);
    int64_t ps3[3] = {sd == 3 ? patch[0] : 1, patch[sd - 2], patch[sd - 1]};
    window_direct(m, sd, img, vd, ps3, mirror, want);
    expect_close(got, want, 2 * nvox, 2e-6, "sliding window probabilities");
    size_t fg = 0;
    for (size_t i = 0; i < nvox; i++) {
        assert_int_equal(lab[i], got[nvox + i] > got[i] ? 1 : 0);
        fg += lab[i];
    }
    assert_true(fg > 0 && fg < nvox); /* both classes occur: the labels can fail */
    gpu_vol_free(labels);
    gpu_vol_free(probs);
    /* labels only (no probability volume): same labels */
    o.progress = NULL;
    assert_int_equal(gpu_nn_segment(m, v, &o, &labels, NULL, &err), LC_OK);
    uint8_t *lab2 = malloc(nvox);
    assert_non_null(lab2);
    assert_int_equal(gpu_vol_download(g_ctx, labels, lab2, &err), LC_OK);
    assert_memory_equal(lab, lab2, nvox);
    free(lab2);
    gpu_vol_free(labels);
    gpu_vol_free(v);
    gpu_nn_free(m);
    free(img);
    free(want);
    free(got);
    free(lab);
    mb_free(b);
}

static void test_window_3d(void **state)
{
    (void)state;
    /* larger than the patch along x and y (overlapping steps), smaller along z (padded) */
    check_window(3, (int64_t[]){8, 8, 8}, (int64_t[]){5, 13, 21}, 0, 1);
    check_window(3, (int64_t[]){8, 8, 8}, (int64_t[]){9, 8, 11}, 1, 3);
}

static void test_window_2d(void **state)
{
    (void)state;
    check_window(2, (int64_t[]){8, 8}, (int64_t[]){3, 12, 6}, 1, 2);
}

static int cancel_now(void *arg)
{
    (void)arg;
    return 1;
}

static void test_window_errors(void **state)
{
    (void)state;
    mb *b = window_model(3, (int64_t[]){8, 8, 8}, 0);
    gpu_nn_model *m = NULL;
    lc_err err = {0};
    assert_int_equal(load(b, g_ctx, &m, &err), LC_OK);
    float img[64] = {0};
    gpu_vol *v = NULL, *labels = NULL;
    assert_int_equal(gpu_vol_borrow(g_ctx, GPU_F32, img, 4, 4, 4, &v, &err), LC_OK);
    gpu_nn_window_opts o = {.cancelled = cancel_now};
    assert_int_equal(gpu_nn_segment(m, v, &o, &labels, NULL, &err), LC_ERR_CANCELLED);
    assert_null(labels);
    o = (gpu_nn_window_opts){.step = 1.5};
    assert_int_equal(gpu_nn_segment(m, v, &o, &labels, NULL, &err), LC_ERR_INVALID);
    o = (gpu_nn_window_opts){.patch = {4, 4, 4}};
    assert_int_equal(gpu_nn_segment(m, v, &o, &labels, NULL, &err), LC_ERR_INVALID);
    assert_non_null(strstr(lc_err_msg(&err), "patch 4"));
    gpu_mem_stats st;
    gpu_ctx_memory(g_ctx, &st);
    size_t before = st.used;
    assert_int_equal(gpu_nn_segment(m, v, NULL, &labels, NULL, &err), LC_OK);
    gpu_vol_free(labels);
    gpu_ctx_memory(g_ctx, &st);
    assert_int_equal(st.used, before); /* scratch returned */
    gpu_vol_free(v);
    gpu_nn_free(m);
    mb_free(b);
}

/* The memory limit covers weights, arena and scratch; a refused load leaves nothing behind. */
static void test_memory_limit(void **state)
{
    (void)state;
    gpu_ctx *ctx = NULL;
    lc_err err = {0};
    gpu_ctx_opts o = {.backend = GPU_BACKEND_CPU, .cpu_threads = 1, .memory_limit = 100};
    assert_int_equal(gpu_ctx_open(&o, &ctx, &err), LC_OK);
    mb *b = small_model();
    gpu_nn_model *m = NULL;
    assert_int_equal(load(b, ctx, &m, &err), LC_ERR_TOO_LARGE);
    assert_non_null(strstr(lc_err_msg(&err), "gpu memory limit reached"));
    gpu_mem_stats st;
    gpu_ctx_memory(ctx, &st);
    assert_int_equal(st.used, 0);
    gpu_ctx_free(ctx);
    mb_free(b);
}

/* One thread and two give the same outputs (blocks are fixed by sizes, not timing). */
static void test_threads(void **state)
{
    fixture *f = *state;
    int64_t in[5] = {1, 3, 9, 10, 11}, wd[5] = {5, 3, 3, 3, 3}, osh[GPU_NN_MAX_RANK];
    float *w = rand_buf(405), *x = rand_buf(2970);
    mb *b = mb_new(13);
    mb_input(b, "x", 5, in);
    mb_init_f(b, "w", 5, wd, w, 1);
    Onnx__NodeProto *n = mb_node(b, "Conv", "c", "x w", "y");
    at_ints(b, n, "pads", 6, I(1), I(1), I(1), I(1), I(1), I(1));
    mb_output(b, "y");
    float *y1 = malloc(4950 * sizeof(float)), *y2 = malloc(4950 * sizeof(float));
    gpu_nn_model *m1 = NULL, *m2 = NULL;
    lc_err err = {0};
    assert_int_equal(load(b, f->cpu1, &m1, &err), LC_OK);
    assert_int_equal(load(b, f->cpu, &m2, &err), LC_OK);
    assert_int_equal(gpu_nn_forward(m1, x, in, 5, y1, 4950, osh, &err), LC_OK);
    assert_int_equal(gpu_nn_forward(m2, x, in, 5, y2, 4950, osh, &err), LC_OK);
    expect_close(y1, y2, 4950, 1e-6, "1 vs 2 threads");
    gpu_nn_free(m1);
    gpu_nn_free(m2);
    free(y1);
    free(y2);
    free(w);
    free(x);
    mb_free(b);
}

static int group_setup(void **state)
{
    lc_err err = {0};
    fixture *f = calloc(1, sizeof(*f));
    if (!f || gpu_ctx_new(GPU_BACKEND_CPU, 0, 2, &f->cpu, &err) != LC_OK ||
        gpu_ctx_new(GPU_BACKEND_CPU, 0, 1, &f->cpu1, &err) != LC_OK) {
        fprintf(stderr, "could not open the cpu backend: %s\n", lc_err_msg(&err));
        return -1;
    }
    g_ctx = f->cpu;
    *state = f;
    return 0;
}

static int group_teardown(void **state)
{
    fixture *f = *state;
    gpu_ctx_free(f->cpu);
    gpu_ctx_free(f->cpu1);
    free(f);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_conv_by_hand),
        cmocka_unit_test(test_conv_2d),
        cmocka_unit_test(test_conv_3d),
        cmocka_unit_test(test_conv_transpose),
        cmocka_unit_test(test_conv_transpose_output_padding),
        cmocka_unit_test(test_instance_norm),
        cmocka_unit_test(test_bn_fold_and_fusion),
        cmocka_unit_test(test_bn_standalone),
        cmocka_unit_test(test_activations),
        cmocka_unit_test(test_binary_broadcast),
        cmocka_unit_test(test_concat_softmax_argmax),
        cmocka_unit_test(test_pools),
        cmocka_unit_test(test_resize),
        cmocka_unit_test(test_shape_folding),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_load_truncated),
        cmocka_unit_test(test_tensor_types),
        cmocka_unit_test(test_planner),
        cmocka_unit_test(test_channels_last),
        cmocka_unit_test(test_plans_of_two_shapes),
        cmocka_unit_test(test_window_3d),
        cmocka_unit_test(test_window_2d),
        cmocka_unit_test(test_window_errors),
        cmocka_unit_test(test_memory_limit),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
