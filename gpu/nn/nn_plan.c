/*
 * nn_plan.c: the execution plan of a model for one input shape. Walks the graph in
 * topological order inferring every shape; nodes whose inputs are all constant (the shape
 * arithmetic exporters emit) are evaluated on the host; view operators (Reshape, Flatten,
 * Squeeze, Unsqueeze, Identity, Cast) share their input's buffer; every other node becomes a
 * step with its geometry resolved. Then the memory planner: one buffer per activation with
 * its lifetime (first write, last read), elementwise steps reuse the buffer of an input that
 * dies there (in place), and buffers are placed in one arena greedily, largest first, each at
 * the lowest offset that no buffer alive at the same time overlaps.
 * Ownership: the plan owns its steps, their operand arrays, the host data of constants it
 * folded and backend copies of constants it needed (counted). Thread safety: one thread.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "nn_internal.h"

enum { PV_NONE = 0, PV_CONST, PV_RT };

typedef struct pval {
    int kind;
    nn_dtype dtype;
    nn_shape sh;
    const void *data;  /* constants: host data */
    const float *cmem; /* constants: backend copy (model's or plan's) */
    int buf;           /* runtime: buffer index */
} pval;

typedef struct pctx {
    gpu_nn_model *m;
    nn_graph *g;
    nn_plan *p;
    pval *pv;
    nn_buf *bufs;
    size_t nbufs, cap_bufs;
    size_t cap_steps;
    void **pmem; /* backend copies of plan-time constants */
    size_t *pmem_bytes;
    size_t npmem;
    lc_err *err;
} pctx;

static lc_rc nerr(pctx *c, lc_rc rc, const nn_node *n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static lc_rc nerr(pctx *c, lc_rc rc, const nn_node *n, const char *fmt, ...)
{
    char what[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    return lc_err_set(c->err, rc, "node \"%s\" (%s): %s", nn_node_label(n), n->op_type, what);
}

static lc_rc keep(pctx *c, void *data)
{
    void **o = realloc(c->p->owned, (c->p->nowned + 1) * sizeof(void *));
    if (!o) {
        free(data);
        return lc_err_set(c->err, LC_ERR_NOMEM, "out of memory");
    }
    c->p->owned = o;
    o[c->p->nowned++] = data;
    return LC_OK;
}

static int new_buf(pctx *c, size_t bytes, int first)
{
    if (c->nbufs == c->cap_bufs) {
        size_t cap = c->cap_bufs ? c->cap_bufs * 2 : 64;
        nn_buf *b = realloc(c->bufs, cap * sizeof(*b));
        if (!b)
            return -1;
        c->bufs = b;
        c->cap_bufs = cap;
    }
    c->bufs[c->nbufs] = (nn_buf){.bytes = bytes, .first = first, .last = first};
    return (int)c->nbufs++;
}

static lc_rc new_step(pctx *c, const nn_node *n, int nin, nn_step **out)
{
    nn_plan *p = c->p;
    if (p->nsteps == c->cap_steps) {
        size_t cap = c->cap_steps ? c->cap_steps * 2 : 32;
        nn_step *s = realloc(p->steps, cap * sizeof(*s));
        if (!s)
            return lc_err_set(c->err, LC_ERR_NOMEM, "out of memory");
        p->steps = s;
        c->cap_steps = cap;
    }
    nn_step *s = &p->steps[p->nsteps];
    memset(s, 0, sizeof(*s));
    s->in = calloc((size_t)(nin ? nin : 1), sizeof(nn_arg));
    if (!s->in)
        return lc_err_set(c->err, LC_ERR_NOMEM, "out of memory");
    p->nsteps++;
    s->op = n->op;
    s->node = n;
    s->nin = nin;
    s->a = n->a;
    *out = s;
    return LC_OK;
}

/* A backend copy of a float constant value vi for a step's operand. */
static lc_rc const_mem(pctx *c, const nn_node *n, int vi, const float **out)
{
    pval *v = &c->pv[vi];
    if (v->cmem) {
        *out = v->cmem;
        return LC_OK;
    }
    if (v->dtype != NN_F32)
        return nerr(c, LC_ERR_UNSUPPORTED, n, "an integer constant cannot be a float operand");
    size_t cnt = nn_shape_count(&v->sh), bytes = (cnt ? cnt : 1) * sizeof(float);
    void *mem = NULL;
    lc_rc rc;
    void **pm = realloc(c->pmem, (c->npmem + 1) * sizeof(void *));
    if (!pm)
        return lc_err_set(c->err, LC_ERR_NOMEM, "out of memory");
    c->pmem = pm;
    size_t *pb = realloc(c->pmem_bytes, (c->npmem + 1) * sizeof(size_t));
    if (!pb)
        return lc_err_set(c->err, LC_ERR_NOMEM, "out of memory");
    c->pmem_bytes = pb;
    if ((rc = gpu_mem_alloc(c->m->ctx, bytes, 0, &mem, c->err)) != LC_OK)
        return rc;
    c->pmem[c->npmem] = mem;
    c->pmem_bytes[c->npmem++] = bytes;
    if (cnt && (rc = c->m->ctx->ops->to_mem(c->m->ctx->impl, mem, v->data, cnt * sizeof(float),
                                            c->err)) != LC_OK)
        return rc;
    v->cmem = mem;
    *out = mem;
    return LC_OK;
}

/* Operand k of node n for step s: a runtime value or a float constant on the backend. */
static lc_rc bind_arg(pctx *c, const nn_node *n, int vi, nn_arg *a)
{
    pval *v = &c->pv[vi];
    a->sh = v->sh;
    a->from = -1;
    if (v->kind == PV_RT) {
        a->is_const = 0;
        a->off = (size_t)v->buf;         /* buffer index for now; offsets once placed */
        a->from = c->bufs[v->buf].first; /* its writer, until place() moves lifetimes */
        return LC_OK;
    }
    a->is_const = 1;
    return const_mem(c, n, vi, &a->cmem);
}

/* Canonical 3D geometry: the spatial axes of rank-r shape sh into d3 (leading 1s). */
static void spatial3(const nn_shape *sh, int64_t *d3)
{
    int nsp = sh->rank - 2;
    for (int i = 0; i < 3; i++)
        d3[i] = i < 3 - nsp ? 1 : sh->d[2 + i - (3 - nsp)];
}

/* Attribute arrays (ONNX order, nsp entries) into canonical 3D with a default. */
static void attr3(const int64_t *src, int nsp, int64_t dflt, int given, int64_t *d3)
{
    for (int i = 0; i < 3; i++)
        d3[i] = i < 3 - nsp || !given ? dflt : src[i - (3 - nsp)];
}

/* Pads from auto_pad for output size from input size (convolutions and pools). */
static void same_pads(nn_autopad ap, int64_t in, int64_t k, int64_t s, int64_t dl, int64_t *pb,
                      int64_t *pe)
{
    if (ap == NN_PAD_VALID) {
        *pb = *pe = 0;
    } else if (ap == NN_PAD_SAME_UPPER || ap == NN_PAD_SAME_LOWER) {
        int64_t out = (in + s - 1) / s;
        int64_t total = (out - 1) * s + dl * (k - 1) + 1 - in;
        if (total < 0)
            total = 0;
        if (ap == NN_PAD_SAME_UPPER) {
            *pb = total / 2;
            *pe = total - *pb;
        } else {
            *pe = total / 2;
            *pb = total - *pe;
        }
    }
}

static lc_rc geo_conv(pctx *c, const nn_node *n, nn_step *s)
{
    const nn_shape *x = &s->in[0].sh, *w = &s->in[1].sh;
    int r = x->rank, nsp = r - 2;
    char a[96], b[96];
    if (r < 3 || r > 5 || w->rank != r)
        return lc_err_set(c->err, LC_ERR_INVALID,
                          "node \"%s\" (%s): input %s and weights %s: expected N, C and 1 to 3 "
                          "spatial axes on both",
                          nn_node_label(n), n->op_type, nn_shape_str(x, a, sizeof(a)),
                          nn_shape_str(w, b, sizeof(b)));
    if (s->a.nsp && s->a.nsp != nsp)
        return nerr(c, LC_ERR_INVALID, n,
                    "attributes name %s spatial axes, the input has another count",
                    s->a.nsp == 1   ? "1"
                    : s->a.nsp == 2 ? "2"
                                    : "3");
    int64_t g = s->a.group;
    s->group = g;
    s->n = x->d[0];
    s->cin = x->d[1];
    if (n->op == NN_OP_CONV) {
        s->cout = w->d[0];
        if (w->d[1] * g != x->d[1] || w->d[0] % g)
            return lc_err_set(c->err, LC_ERR_INVALID,
                              "node \"%s\" (Conv): weights %s do not fit input %s with group %lld",
                              nn_node_label(n), nn_shape_str(w, a, sizeof(a)),
                              nn_shape_str(x, b, sizeof(b)), (long long)g);
    } else {
        s->cout = w->d[1] * g;
        if (w->d[0] != x->d[1] || w->d[0] % g)
            return lc_err_set(c->err, LC_ERR_INVALID,
                              "node \"%s\" (ConvTranspose): weights %s do not fit input %s with "
                              "group %lld",
                              nn_node_label(n), nn_shape_str(w, a, sizeof(a)),
                              nn_shape_str(x, b, sizeof(b)), (long long)g);
    }
    if (s->nin > 2 && nn_shape_count(&s->in[2].sh) != (size_t)s->cout)
        return nerr(c, LC_ERR_INVALID, n, "the bias does not hold one value per output channel");
    spatial3(x, s->id);
    nn_shape ws = *w;
    spatial3(&ws, s->k);
    if (s->a.has_kernel)
        for (int i = 0; i < nsp; i++)
            if (s->a.kernel[i] != w->d[2 + i])
                return nerr(c, LC_ERR_INVALID, n, "kernel_shape differs from the weights");
    attr3(s->a.stride, nsp, 1, 1, s->s);
    attr3(s->a.dil, nsp, 1, 1, s->dl);
    attr3(s->a.pad_b, nsp, 0, 1, s->pb);
    attr3(s->a.pad_e, nsp, 0, 1, s->pe);
    nn_shape o = *x;
    o.d[1] = s->cout;
    for (int i = 0; i < 3; i++) {
        int64_t in = s->id[i], k = s->k[i], st = s->s[i], dl = s->dl[i], od;
        int ax = i - (3 - nsp);
        if (n->op == NN_OP_CONV) {
            if (ax >= 0)
                same_pads(s->a.auto_pad, in, k, st, dl, &s->pb[i], &s->pe[i]);
            int64_t span = dl * (k - 1) + 1, padded = in + s->pb[i] + s->pe[i];
            od = padded < span ? 0 : (padded - span) / st + 1;
        } else {
            int64_t op = ax >= 0 ? s->a.out_pad[ax] : 0;
            int64_t full = st * (in - 1) + op + (k - 1) * dl + 1;
            if (ax >= 0 && (s->a.has_out_shape || s->a.auto_pad == NN_PAD_SAME_UPPER ||
                            s->a.auto_pad == NN_PAD_SAME_LOWER)) {
                int64_t want = s->a.has_out_shape ? s->a.out_shape[ax] : in * st;
                int64_t total = full - want;
                if (total < 0)
                    return nerr(c, LC_ERR_INVALID, n, "output_shape is larger than possible");
                if (s->a.auto_pad == NN_PAD_SAME_UPPER) {
                    s->pb[i] = total / 2;
                    s->pe[i] = total - s->pb[i];
                } else {
                    s->pe[i] = total / 2;
                    s->pb[i] = total - s->pe[i];
                }
            } else if (ax >= 0 && s->a.auto_pad == NN_PAD_VALID) {
                s->pb[i] = s->pe[i] = 0;
            }
            od = full - s->pb[i] - s->pe[i];
            if (ax >= 0 && op >= st && op >= dl)
                return nerr(c, LC_ERR_INVALID, n,
                            "output_padding must be below stride or dilation");
        }
        if (od < 1)
            return lc_err_set(c->err, LC_ERR_INVALID,
                              "node \"%s\" (%s): input %s is too small for the kernel",
                              nn_node_label(n), n->op_type, nn_shape_str(x, a, sizeof(a)));
        s->od[i] = od;
        if (ax >= 0)
            o.d[2 + ax] = od;
    }
    s->out.sh = o;
    return LC_OK;
}

static lc_rc geo_pool(pctx *c, const nn_node *n, nn_step *s)
{
    const nn_shape *x = &s->in[0].sh;
    int r = x->rank, nsp = r - 2;
    char a[96];
    if (r < 3 || r > 5)
        return nerr(c, LC_ERR_INVALID, n, "expected N, C and 1 to 3 spatial axes, got %s",
                    nn_shape_str(x, a, sizeof(a)));
    s->n = x->d[0];
    s->cin = s->cout = x->d[1];
    spatial3(x, s->id);
    nn_shape o = *x;
    if (n->op == NN_OP_GAP) {
        for (int i = 0; i < 3; i++) {
            s->k[i] = s->id[i];
            s->s[i] = s->dl[i] = 1;
            s->od[i] = 1;
        }
        for (int i = 2; i < r; i++)
            o.d[i] = 1;
        s->out.sh = o;
        return LC_OK;
    }
    if (s->a.nsp != nsp)
        return nerr(c, LC_ERR_INVALID, n, "kernel_shape does not cover the %s spatial axes",
                    nsp == 1   ? "1"
                    : nsp == 2 ? "2"
                               : "3");
    attr3(s->a.kernel, nsp, 1, 1, s->k);
    attr3(s->a.stride, nsp, 1, 1, s->s);
    attr3(s->a.dil, nsp, 1, 1, s->dl);
    attr3(s->a.pad_b, nsp, 0, 1, s->pb);
    attr3(s->a.pad_e, nsp, 0, 1, s->pe);
    for (int i = 0; i < 3; i++) {
        int ax = i - (3 - nsp);
        int64_t in = s->id[i], k = s->k[i], st = s->s[i], dl = s->dl[i];
        if (ax >= 0)
            same_pads(s->a.auto_pad, in, k, st, dl, &s->pb[i], &s->pe[i]);
        if (s->pb[i] >= k * dl || s->pe[i] >= k * dl)
            return nerr(c, LC_ERR_INVALID, n, "a pad is not smaller than the kernel");
        int64_t span = dl * (k - 1) + 1, padded = in + s->pb[i] + s->pe[i], od;
        if (padded < span)
            return nerr(c, LC_ERR_INVALID, n, "input %s is too small for the kernel",
                        nn_shape_str(x, a, sizeof(a)));
        if (s->a.ceil_mode && ax >= 0) {
            od = (padded - span + st - 1) / st + 1;
            if ((od - 1) * st >= in + s->pb[i]) /* the last window must start inside */
                od--;
        } else {
            od = (padded - span) / st + 1;
        }
        s->od[i] = od;
        if (ax >= 0)
            o.d[2 + ax] = od;
    }
    s->out.sh = o;
    return LC_OK;
}

/* Resize/Upsample: output sizes and coordinate scales from the constant scales or sizes. */
static lc_rc geo_resize(pctx *c, const nn_node *n, nn_step *s, const pval *ins, int nin)
{
    const nn_shape *x = &s->in[0].sh;
    int r = x->rank, nsp = r - 2;
    float scales[NN_MAX_RANK];
    int64_t sizes[NN_MAX_RANK];
    int have_scales = 0, have_sizes = 0;
    int64_t opset = c->g->opset;
    char a[96];

    if (r < 3 || r > 5)
        return nerr(c, LC_ERR_UNSUPPORTED, n,
                    "only N, C and 1 to 3 spatial axes are supported, got %s",
                    nn_shape_str(x, a, sizeof(a)));
    int si = -1, zi = -1; /* inputs holding scales and sizes */
    if (strcmp(n->op_type, "Upsample") == 0) {
        if (s->a.scales_attr) {
            if (s->a.nattr_f != r)
                return nerr(c, LC_ERR_INVALID, n, "scales do not cover every axis");
            memcpy(scales, s->a.attr_f, (size_t)r * sizeof(float));
            have_scales = 1;
        } else {
            si = 1;
        }
    } else if (opset < 11) {
        si = 1;
    } else {
        si = 2;
        zi = 3;
    }
    for (int k = 1; k < nin; k++)
        if (n->in[k] >= 0 && ins[k].kind != PV_CONST)
            return nerr(c, LC_ERR_UNSUPPORTED, n, "roi, scales and sizes must be constants");
    if (si > 0 && si < nin && n->in[si] >= 0 && nn_shape_count(&ins[si].sh) > 0) {
        if (ins[si].dtype != NN_F32 || nn_shape_count(&ins[si].sh) != (size_t)r)
            return nerr(c, LC_ERR_INVALID, n, "scales must hold one float per axis");
        memcpy(scales, ins[si].data, (size_t)r * sizeof(float));
        have_scales = 1;
    }
    if (zi > 0 && zi < nin && n->in[zi] >= 0 && nn_shape_count(&ins[zi].sh) > 0) {
        if (ins[zi].dtype != NN_I64 || nn_shape_count(&ins[zi].sh) != (size_t)r)
            return nerr(c, LC_ERR_INVALID, n, "sizes must hold one integer per axis");
        memcpy(sizes, ins[zi].data, (size_t)r * sizeof(int64_t));
        have_sizes = 1;
    }
    if (have_scales == have_sizes)
        return nerr(c, LC_ERR_INVALID, n, "exactly one of scales and sizes must be given");
    nn_shape o = *x;
    for (int i = 0; i < r; i++) {
        if (have_scales) {
            if (!(scales[i] > 0) || !isfinite(scales[i]))
                return nerr(c, LC_ERR_INVALID, n, "a scale is not positive");
            double od = floor((double)x->d[i] * (double)scales[i]);
            if (od < 1 || od > (double)((int64_t)1 << 32))
                return nerr(c, LC_ERR_INVALID, n, "a scale gives an empty or huge axis");
            o.d[i] = (int64_t)od;
        } else {
            if (sizes[i] < 1 || sizes[i] > ((int64_t)1 << 32))
                return nerr(c, LC_ERR_INVALID, n, "a size is out of range");
            o.d[i] = sizes[i];
        }
        if (i < 2 && o.d[i] != x->d[i])
            return nerr(c, LC_ERR_UNSUPPORTED, n,
                        "resizing the batch or channel axis is not supported");
    }
    s->n = x->d[0];
    s->cin = s->cout = x->d[1];
    spatial3(x, s->id);
    spatial3(&o, s->od);
    for (int i = 0; i < 3; i++) {
        int ax = 2 + i - (3 - nsp);
        s->rscale[i] = ax < 2        ? 1.0f
                       : have_scales ? scales[ax]
                                     : (float)((double)o.d[ax] / (double)x->d[ax]);
    }
    s->out.sh = o;
    return LC_OK;
}

/* Shape inference and geometry of a runtime step. ins: the node's input values. */
static lc_rc geo(pctx *c, const nn_node *n, nn_step *s, const pval *ins, int nin)
{
    const nn_shape *x = &s->in[0].sh;
    char a[96], b[96];
    lc_rc rc;

    switch (n->op) {
    case NN_OP_CONV:
    case NN_OP_CONVT:
        return geo_conv(c, n, s);
    case NN_OP_MAXPOOL:
    case NN_OP_AVGPOOL:
    case NN_OP_GAP:
        return geo_pool(c, n, s);
    case NN_OP_RESIZE:
        return geo_resize(c, n, s, ins, nin);
    case NN_OP_INORM:
    case NN_OP_BNORM: {
        if (x->rank < 2)
            return nerr(c, LC_ERR_INVALID, n, "the input has no channel axis");
        size_t C = (size_t)x->d[1], want = n->op == NN_OP_BNORM ? 2 * C : C;
        for (int k = 1; k < s->nin; k++)
            if (nn_shape_count(&s->in[k].sh) != want)
                return nerr(c, LC_ERR_INVALID, n, "parameters do not hold one value per channel");
        s->n = x->d[0];
        s->cin = s->cout = x->d[1];
        s->inner = 1;
        for (int i = 2; i < x->rank; i++)
            s->inner *= x->d[i];
        s->out.sh = *x;
        return LC_OK;
    }
    case NN_OP_RELU:
    case NN_OP_LEAKY:
    case NN_OP_SIGMOID:
        s->out.sh = *x;
        return LC_OK;
    case NN_OP_PRELU:
    case NN_OP_ADD:
    case NN_OP_SUB:
    case NN_OP_MUL:
    case NN_OP_DIV:
        if ((rc = nn_broadcast(n, &s->in[0].sh, &s->in[1].sh, &s->out.sh, c->err)) != LC_OK)
            return rc;
        if (s->out.sh.rank > NN_MAX_RT_RANK)
            return nerr(c, LC_ERR_UNSUPPORTED, n, "rank above 6");
        if (n->op == NN_OP_PRELU && (s->out.sh.rank != x->rank ||
                                     memcmp(s->out.sh.d, x->d, sizeof(int64_t) * (size_t)x->rank)))
            return lc_err_set(c->err, LC_ERR_INVALID,
                              "node \"%s\" (PRelu): slope %s does not broadcast to input %s",
                              nn_node_label(n), nn_shape_str(&s->in[1].sh, a, sizeof(a)),
                              nn_shape_str(x, b, sizeof(b)));
        return LC_OK;
    case NN_OP_CONCAT: {
        int r = x->rank;
        int64_t ax = s->a.axis < 0 ? s->a.axis + r : s->a.axis;
        if (ax < 0 || ax >= r)
            return nerr(c, LC_ERR_INVALID, n, "axis out of range");
        nn_shape o = *x;
        o.d[ax] = 0;
        for (int k = 0; k < s->nin; k++) {
            const nn_shape *y = &s->in[k].sh;
            if (y->rank != r)
                return nerr(c, LC_ERR_INVALID, n, "inputs differ in rank");
            for (int i = 0; i < r; i++)
                if (i != ax && y->d[i] != x->d[i])
                    return lc_err_set(c->err, LC_ERR_INVALID,
                                      "node \"%s\" (Concat): input shapes %s and %s differ off "
                                      "axis %lld",
                                      nn_node_label(n), nn_shape_str(x, a, sizeof(a)),
                                      nn_shape_str(y, b, sizeof(b)), (long long)ax);
            o.d[ax] += y->d[ax];
        }
        s->outer = 1;
        s->inner = 1;
        for (int i = 0; i < ax; i++)
            s->outer *= x->d[i];
        for (int i = (int)ax + 1; i < r; i++)
            s->inner *= x->d[i];
        s->a.axis = ax;
        s->out.sh = o;
        return LC_OK;
    }
    case NN_OP_SOFTMAX:
    case NN_OP_ARGMAX: {
        int r = x->rank;
        int64_t ax = s->a.axis < 0 ? s->a.axis + r : s->a.axis;
        if (ax < 0 || ax >= r)
            return nerr(c, LC_ERR_INVALID, n, "axis out of range");
        s->a.axis = ax;
        s->outer = s->inner = 1;
        s->len = x->d[ax];
        for (int i = 0; i < ax; i++)
            s->outer *= x->d[i];
        for (int i = (int)ax + 1; i < r; i++)
            s->inner *= x->d[i];
        if (n->op == NN_OP_SOFTMAX && s->a.old_softmax) { /* flattened from axis on */
            s->len *= s->inner;
            s->inner = 1;
        }
        nn_shape o = *x;
        if (n->op == NN_OP_ARGMAX) {
            if (s->len < 1)
                return nerr(c, LC_ERR_INVALID, n, "the axis is empty");
            if (s->a.keepdims) {
                o.d[ax] = 1;
            } else {
                for (int i = (int)ax; i < r - 1; i++)
                    o.d[i] = o.d[i + 1];
                o.rank--;
            }
        }
        s->out.sh = o;
        return LC_OK;
    }
    default:
        return nerr(c, LC_ERR_INTERNAL, n, "no geometry for this operator");
    }
}

/* Runtime inputs a node must have as float constants (weights), per operator. */
static int const_slot(nn_opk op, int k)
{
    switch (op) {
    case NN_OP_CONV:
    case NN_OP_CONVT:
    case NN_OP_INORM:
    case NN_OP_BNORM:
        return k >= 1;
    case NN_OP_RESIZE:
        return k >= 1;
    default:
        return 0;
    }
}

static lc_rc plan_node(pctx *c, int ni)
{
    const nn_node *n = &c->g->nodes[ni];
    pval ins[64];
    int nin = n->nin, all_const = 1, any = 0;
    lc_rc rc;

    if (nin > 64)
        return nerr(c, LC_ERR_UNSUPPORTED, n, "too many inputs");
    if (nin < 1 || n->in[0] < 0)
        return nerr(c, LC_ERR_INVALID, n, "its first input is missing");
    memset(ins, 0, sizeof(ins));
    for (int k = 0; k < nin; k++) {
        if (n->in[k] < 0)
            continue;
        ins[k] = c->pv[n->in[k]];
        if (ins[k].kind == PV_NONE)
            return nerr(c, LC_ERR_INTERNAL, n, "an input was not computed");
        any = 1;
        if (ins[k].kind != PV_CONST)
            all_const = 0;
    }
    pval *out = &c->pv[n->out[0]];

    if (n->op == NN_OP_SHAPE) { /* shapes are known here: always a constant */
        const nn_shape *sh = &ins[0].sh;
        int64_t r = sh->rank, st = n->a.start, en = n->a.has_end ? n->a.end : r;
        st = st < 0 ? st + r : st;
        en = en < 0 ? en + r : en;
        st = st < 0 ? 0 : st > r ? r : st;
        en = en < 0 ? 0 : en > r ? r : en;
        int64_t cnt = en > st ? en - st : 0;
        int64_t *d = malloc((size_t)(cnt ? cnt : 1) * sizeof(int64_t));
        if (!d)
            return lc_err_set(c->err, LC_ERR_NOMEM, "out of memory");
        for (int64_t i = 0; i < cnt; i++)
            d[i] = sh->d[st + i];
        if ((rc = keep(c, d)) != LC_OK)
            return rc;
        *out = (pval){.kind = PV_CONST, .dtype = NN_I64, .sh = {.rank = 1, .d = {cnt}}, .data = d};
        return LC_OK;
    }
    if ((all_const && any) || n->op == NN_OP_CONST_OF_SHAPE) {
        nn_cval cv[64], res;
        void *data = NULL;
        if (!all_const)
            return nerr(c, LC_ERR_UNSUPPORTED, n, "the shape must be a constant");
        for (int k = 0; k < nin; k++)
            cv[k] = (nn_cval){.dtype = ins[k].dtype, .sh = ins[k].sh, .data = ins[k].data};
        if (nn_op_is_runtime(n->op) && n->op != NN_OP_ADD && n->op != NN_OP_SUB &&
            n->op != NN_OP_MUL && n->op != NN_OP_DIV && n->op != NN_OP_CONCAT)
            return nerr(c, LC_ERR_UNSUPPORTED, n, "the operator has no runtime input");
        if ((rc = nn_fold(n, c->g->opset, cv, nin, c->g, &res, &data, c->err)) != LC_OK)
            return rc;
        if ((rc = keep(c, data)) != LC_OK)
            return rc;
        *out = (pval){.kind = PV_CONST, .dtype = res.dtype, .sh = res.sh, .data = data};
        return LC_OK;
    }
    if (ins[0].kind != PV_RT) {
        if (nn_op_is_view(n->op) || !nn_op_is_runtime(n->op) ||
            (n->op != NN_OP_ADD && n->op != NN_OP_SUB && n->op != NN_OP_MUL && n->op != NN_OP_DIV &&
             n->op != NN_OP_CONCAT))
            return nerr(c, LC_ERR_UNSUPPORTED, n, "the first input must be the computed tensor");
    }
    if (nn_op_is_view(n->op)) {
        nn_cval cv[2] = {{0}};
        for (int k = 1; k < nin && k < 2; k++)
            if (n->in[k] >= 0 && ins[k].kind == PV_CONST)
                cv[k] = (nn_cval){.dtype = ins[k].dtype, .sh = ins[k].sh, .data = ins[k].data};
            else if (n->in[k] >= 0)
                return nerr(c, LC_ERR_UNSUPPORTED, n, "the shape or axes must be constants");
        if (n->op == NN_OP_CAST &&
            !(n->a.to == 1 || n->a.to == 10 || n->a.to == 11 || n->a.to == 16))
            return nerr(c, LC_ERR_UNSUPPORTED, n,
                        "a computed tensor can only be cast to a float type");
        nn_shape sh;
        if ((rc = nn_view_shape(n, c->g->opset, &ins[0].sh, cv, nin, &sh, c->err)) != LC_OK)
            return rc;
        if (sh.rank > NN_MAX_RT_RANK)
            return nerr(c, LC_ERR_UNSUPPORTED, n, "rank above 6");
        *out = ins[0];
        out->sh = sh;
        return LC_OK;
    }
    if (!nn_op_is_runtime(n->op))
        return nerr(c, LC_ERR_UNSUPPORTED, n,
                    "only constant inputs are supported for this operator");

    /* a runtime step */
    int nargs = 0;
    for (int k = 0; k < nin; k++) {
        if (n->op == NN_OP_RESIZE && k > 0)
            break; /* scales and sizes are geometry */
        if (n->in[k] < 0) {
            if (k < 2 || n->op == NN_OP_CONCAT)
                return nerr(c, LC_ERR_INVALID, n, "a required input is missing");
            continue;
        }
        nargs = k + 1;
        if (const_slot(n->op, k) && ins[k].kind != PV_CONST)
            return nerr(c, LC_ERR_UNSUPPORTED, n, "weights and parameters must be constants");
        if (ins[k].kind == PV_CONST && ins[k].dtype != NN_F32)
            return nerr(c, LC_ERR_UNSUPPORTED, n, "an integer tensor cannot be a float operand");
    }
    nn_step *s = NULL;
    if ((rc = new_step(c, n, nargs, &s)) != LC_OK)
        return rc;
    for (int k = 0; k < nargs; k++) {
        if (n->in[k] < 0) { /* an omitted optional operand (a bias) */
            s->nin = k;
            break;
        }
        if ((rc = bind_arg(c, n, n->in[k], &s->in[k])) != LC_OK)
            return rc;
    }
    if ((rc = geo(c, n, s, ins, nin)) != LC_OK)
        return rc;
    size_t cnt = nn_shape_count(&s->out.sh);
    if (cnt == SIZE_MAX || cnt > GPU_MAX_VOXELS)
        return nerr(c, LC_ERR_TOO_LARGE, n, "the output is too large");
    int step = (int)(c->p->nsteps - 1);
    int bi = new_buf(c, (cnt ? cnt : 1) * sizeof(float), step);
    if (bi < 0)
        return lc_err_set(c->err, LC_ERR_NOMEM, "out of memory");
    *out = (pval){.kind = PV_RT, .dtype = NN_F32, .sh = s->out.sh, .buf = bi};
    s->out.off = (size_t)bi;
    return LC_OK;
}

/* Steps that may write their output over input 0 when it dies there. */
static int can_inplace(const nn_step *s)
{
    switch (s->op) {
    case NN_OP_RELU:
    case NN_OP_LEAKY:
    case NN_OP_SIGMOID:
    case NN_OP_BNORM:
    case NN_OP_INORM:
    case NN_OP_PRELU:
        return 1;
    case NN_OP_ADD:
    case NN_OP_SUB:
    case NN_OP_MUL:
    case NN_OP_DIV:
        return s->in[0].sh.rank == s->out.sh.rank &&
               memcmp(s->in[0].sh.d, s->out.sh.d, sizeof(int64_t) * (size_t)s->out.sh.rank) == 0;
    default:
        return 0;
    }
}

static int overlaps(const nn_buf *a, const nn_buf *b)
{
    return a->first <= b->last && b->first <= a->last;
}

/* Lifetimes, in-place reuse, placement. in_buf, out_buf: the graph input's and output's. */
static lc_rc place(pctx *c, int in_buf, int out_buf)
{
    nn_plan *p = c->p;
    int *order = NULL, *alias = NULL;
    size_t nb = c->nbufs;
    lc_rc rc = LC_OK;

    alias = calloc(nb + 1, sizeof(int));
    order = calloc(nb + 1, sizeof(int));
    if (!alias || !order) {
        rc = lc_err_set(c->err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t b = 0; b < nb; b++)
        alias[b] = (int)b;
    /* last reads */
    for (size_t i = 0; i < p->nsteps; i++)
        for (int k = 0; k < p->steps[i].nin; k++)
            if (!p->steps[i].in[k].is_const) {
                nn_buf *b = &c->bufs[p->steps[i].in[k].off];
                if (b->last < (int)i)
                    b->last = (int)i;
            }
    c->bufs[out_buf].last = (int)p->nsteps;
    c->bufs[in_buf].first = -1;
    /* in place: a step whose input 0 dies at it writes over it */
    for (size_t i = 0; i < p->nsteps; i++) {
        nn_step *s = &p->steps[i];
        if (!can_inplace(s) || s->in[0].is_const)
            continue;
        int bi = alias[s->in[0].off], bo = (int)s->out.off;
        if (bi == in_buf || bi == out_buf || c->bufs[bi].last != (int)i ||
            c->bufs[bi].bytes != c->bufs[bo].bytes)
            continue;
        c->bufs[bi].last = c->bufs[bo].last;
        alias[bo] = bi;
        c->bufs[bo].bytes = 0;
        if (bo == out_buf)
            out_buf = bi;
    }
    /* resolve aliases in the steps */
    for (size_t i = 0; i < p->nsteps; i++) {
        nn_step *s = &p->steps[i];
        for (int k = 0; k < s->nin; k++)
            if (!s->in[k].is_const)
                s->in[k].off = (size_t)alias[s->in[k].off];
        s->out.off = (size_t)alias[s->out.off];
    }
    /* placement: largest first, lowest offset clear of every placed buffer alive with it */
    size_t no = 0;
    p->naive_bytes = 0;
    for (size_t b = 0; b < nb; b++) {
        c->bufs[b].bytes = (c->bufs[b].bytes + NN_ALIGN - 1) / NN_ALIGN * NN_ALIGN;
        if (c->bufs[b].bytes) {
            order[no++] = (int)b;
            p->naive_bytes += c->bufs[b].bytes;
        }
    }
    for (size_t i = 1; i < no; i++) { /* insertion sort: tens to hundreds of buffers */
        int v = order[i];
        size_t j = i;
        while (j > 0 && (c->bufs[order[j - 1]].bytes < c->bufs[v].bytes ||
                         (c->bufs[order[j - 1]].bytes == c->bufs[v].bytes && order[j - 1] > v))) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = v;
    }
    p->arena_bytes = 0;
    for (size_t i = 0; i < no; i++) {
        nn_buf *b = &c->bufs[order[i]];
        size_t off = 0;
        for (int again = 1; again;) {
            again = 0;
            for (size_t j = 0; j < i; j++) {
                const nn_buf *o = &c->bufs[order[j]];
                if (overlaps(b, o) && off < o->off + o->bytes && o->off < off + b->bytes) {
                    off = o->off + o->bytes;
                    again = 1;
                }
            }
        }
        b->off = off;
        if (off + b->bytes > p->arena_bytes)
            p->arena_bytes = off + b->bytes;
    }
    for (size_t i = 0; i < p->nsteps; i++) {
        nn_step *s = &p->steps[i];
        for (int k = 0; k < s->nin; k++)
            if (!s->in[k].is_const)
                s->in[k].off = c->bufs[s->in[k].off].off;
        s->out.off = c->bufs[s->out.off].off;
    }
    p->in_off = c->bufs[alias[in_buf]].off;
    p->out_off = c->bufs[alias[out_buf]].off;
out:
    free(alias);
    free(order);
    return rc;
}

void nn_plan_free(gpu_nn_model *m, nn_plan *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->nsteps; i++) {
        if (m && p->steps[i].bs)
            m->be->release(m->bm, &p->steps[i]);
        free(p->steps[i].in);
    }
    free(p->steps);
    for (size_t i = 0; i < p->nowned; i++)
        free(p->owned[i]);
    free(p->owned);
    for (size_t i = 0; m && i < p->ncmem; i++)
        gpu_mem_release(m->ctx, p->cmem[i], p->cmem_bytes[i]);
    free(p->cmem);
    free(p->cmem_bytes);
    free(p);
}

lc_rc nn_plan_build(gpu_nn_model *m, const nn_shape *in, nn_plan **out, lc_err *err)
{
    nn_graph *g = &m->g;
    pctx c = {.m = m, .g = g, .err = err};
    nn_plan *p = NULL;
    lc_rc rc = LC_OK;
    const nn_val *iv = &g->vals[g->input];
    char a[96], b[96];

    *out = NULL;
    if (in->rank != iv->rank)
        return lc_err_set(err, LC_ERR_INVALID, "input of rank %d, the model expects %d", in->rank,
                          iv->rank);
    for (int i = 0; i < in->rank; i++)
        if (in->d[i] < 1 || (iv->dims[i] > 0 && in->d[i] != iv->dims[i])) {
            nn_shape want = {.rank = iv->rank};
            memcpy(want.d, iv->dims, sizeof(want.d));
            return lc_err_set(err, LC_ERR_INVALID,
                              "input of shape %s does not fit the model's input %s (-1: free)",
                              nn_shape_str(in, a, sizeof(a)), nn_shape_str(&want, b, sizeof(b)));
        }
    p = calloc(1, sizeof(*p));
    c.pv = calloc(g->nvals + 1, sizeof(pval));
    if (!p || !c.pv) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    c.p = p;
    p->in_shape = *in;
    for (size_t i = 0; i < g->nvals; i++) {
        const nn_val *v = &g->vals[i];
        if (!v->is_const)
            continue;
        c.pv[i] = (pval){.kind = PV_CONST,
                         .dtype = v->dtype,
                         .sh = {.rank = v->rank},
                         .data = v->data,
                         .cmem = v->mem};
        memcpy(c.pv[i].sh.d, v->dims, sizeof(v->dims));
    }
    int in_buf = new_buf(&c, nn_shape_count(in) * sizeof(float), -1);
    if (in_buf < 0) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    c.pv[g->input] = (pval){.kind = PV_RT, .dtype = NN_F32, .sh = *in, .buf = in_buf};
    for (size_t i = 0; i < g->norder; i++)
        if ((rc = plan_node(&c, g->order[i])) != LC_OK)
            goto out;
    const pval *ov = &c.pv[g->output];
    if (ov->kind != PV_RT) {
        rc = lc_err_set(err, LC_ERR_UNSUPPORTED,
                        "the graph output \"%s\" does not depend on the input",
                        g->vals[g->output].name);
        goto out;
    }
    p->out_shape = ov->sh;
    p->out_count = nn_shape_count(&ov->sh);
    if ((rc = place(&c, in_buf, ov->buf)) != LC_OK)
        goto out;
    if (m->be->prepare_plan && (rc = m->be->prepare_plan(m->bm, p, err)) != LC_OK)
        goto out;
    for (size_t i = 0; i < p->nsteps; i++) {
        if (!m->be->prepare_plan && (rc = m->be->prepare(m->bm, &p->steps[i], err)) != LC_OK)
            goto out;
        if (p->steps[i].scratch > p->scratch_bytes)
            p->scratch_bytes = p->steps[i].scratch;
    }
out:
    /* backend copies of folded constants: the plan's from now on */
    if (p) {
        p->cmem = c.pmem;
        p->cmem_bytes = c.pmem_bytes;
        p->ncmem = c.npmem;
    } else {
        free(c.pmem);
        free(c.pmem_bytes);
    }
    free(c.pv);
    free(c.bufs);
    if (rc != LC_OK) {
        nn_plan_free(m, p);
        return rc;
    }
    *out = p;
    return LC_OK;
}
