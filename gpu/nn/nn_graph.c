/*
 * nn_graph.c: load-time work on the graph that does not depend on the input shape: batch
 * normalisation folded into the preceding convolution (or turned into one per-channel scale
 * and shift), activations fused into the convolution or normalisation before them, dead
 * nodes dropped, and a topological order of what the output needs. Also the small helpers
 * the engine's files share. New constants made here belong to the graph like the others.
 * Thread safety: a graph is used by one thread at a time.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "nn_internal.h"

size_t nn_shape_count(const nn_shape *s)
{
    size_t n = 1;
    for (int i = 0; i < s->rank; i++) {
        if (s->d[i] < 0)
            return SIZE_MAX;
        if (s->d[i] == 0)
            return 0;
        if ((uint64_t)s->d[i] > ((uint64_t)1 << 40) / n)
            return SIZE_MAX;
        n *= (size_t)s->d[i];
    }
    return n;
}

const char *nn_shape_str(const nn_shape *s, char *buf, size_t cap)
{
    size_t at = 0;
    buf[0] = 0;
    if (s->rank == 0)
        snprintf(buf, cap, "scalar");
    for (int i = 0; i < s->rank && at < cap; i++) {
        int w = snprintf(buf + at, cap - at, "%s%lld", i ? "x" : "", (long long)s->d[i]);
        if (w < 0)
            break;
        at += (size_t)w;
    }
    return buf;
}

const char *nn_node_label(const nn_node *n)
{
    return n->name && *n->name ? n->name : "(unnamed)";
}

int nn_op_is_runtime(nn_opk op)
{
    return op >= NN_OP_CONV && op <= NN_OP_RESIZE;
}

int nn_op_is_view(nn_opk op)
{
    return op >= NN_OP_RESHAPE && op <= NN_OP_CAST;
}

void nn_graph_release(nn_graph *g)
{
    if (!g)
        return;
    for (size_t i = 0; i < g->nvals; i++) {
        free(g->vals[i].name);
        free(g->vals[i].data);
    }
    for (size_t i = 0; i < g->nnodes; i++) {
        free(g->nodes[i].name);
        free(g->nodes[i].in);
    }
    free(g->vals);
    free(g->nodes);
    free(g->order);
    memset(g, 0, sizeof(*g));
    g->input = g->output = -1;
}

/* Uses of each value by live nodes, plus one for the graph output. uses: nvals entries. */
static void count_uses(const nn_graph *g, int *uses)
{
    memset(uses, 0, g->nvals * sizeof(*uses));
    for (size_t i = 0; i < g->nnodes; i++) {
        const nn_node *n = &g->nodes[i];
        if (n->dead)
            continue;
        for (int k = 0; k < n->nin; k++)
            if (n->in[k] >= 0)
                uses[n->in[k]]++;
    }
    if (g->output >= 0)
        uses[g->output]++;
}

/* A float constant of exactly count elements, or NULL. */
static const float *fconst(const nn_graph *g, int vi, size_t count)
{
    if (vi < 0 || !g->vals[vi].is_const || g->vals[vi].dtype != NN_F32 || !g->vals[vi].data ||
        g->vals[vi].count != count)
        return NULL;
    return g->vals[vi].data;
}

/* A new float constant of count elements (rank 1), data copied from src (or zeros). */
static int new_fconst(nn_graph *g, const char *base, const char *suffix, const float *src,
                      size_t count)
{
    char name[300];
    snprintf(name, sizeof(name), "%s%s", base, suffix);
    int vi = nn_graph_add_val(g, name);
    if (vi < 0)
        return -1;
    nn_val *v = &g->vals[vi];
    v->data = calloc(count ? count : 1, sizeof(float));
    if (!v->data)
        return -1;
    if (src)
        memcpy(v->data, src, count * sizeof(float));
    v->is_const = 1;
    v->dtype = NN_F32;
    v->count = count;
    v->rank = 1;
    v->dims[0] = (int64_t)count;
    return vi;
}

/* BN's per-channel scale s = gamma / sqrt(var + eps) and shift t = beta - mean * s into
 * st[0..C-1] and st[C..2C-1]; 0 when its parameters are not float constants of C entries. */
static int bn_params(const nn_graph *g, const nn_node *bn, size_t C, double *st)
{
    const float *gam = fconst(g, bn->in[1], C), *beta = fconst(g, bn->in[2], C),
                *mean = fconst(g, bn->in[3], C), *var = fconst(g, bn->in[4], C);
    if (!gam || !beta || !mean || !var)
        return 0;
    for (size_t c = 0; c < C; c++) {
        double s = (double)gam[c] / sqrt((double)var[c] + (double)bn->a.eps);
        st[c] = s;
        st[C + c] = (double)beta[c] - (double)mean[c] * s;
    }
    return 1;
}

/* Fold batch norm node b into the convolution that produces its input (node ci). */
static lc_rc fold_bn(nn_graph *g, int ci, int bi, int *folded, lc_err *err)
{
    nn_node *c = &g->nodes[ci], *b = &g->nodes[bi];
    int wv = c->in[1];
    *folded = 0;
    if (wv < 0 || !g->vals[wv].is_const || g->vals[wv].dtype != NN_F32 || g->vals[wv].rank < 3 ||
        !g->vals[wv].data)
        return LC_OK;
    const nn_val *w = &g->vals[wv];
    int64_t cout = c->op == NN_OP_CONV ? w->dims[0] : w->dims[1] * c->a.group;
    if (cout < 1 || (c->op == NN_OP_CONVT && w->dims[0] % c->a.group))
        return LC_OK;
    size_t C = (size_t)cout;
    double *st = malloc(2 * C * sizeof(double));
    if (!st)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    if (!bn_params(g, b, C, st)) {
        free(st);
        return LC_OK;
    }
    const float *bias = c->nin > 2 ? fconst(g, c->in[2], C) : NULL;
    if (c->nin > 2 && c->in[2] >= 0 && !bias) {
        free(st);
        return LC_OK;
    }
    /* new weight and bias values: the originals may be shared */
    size_t wcount = w->count;
    char base[256];
    snprintf(base, sizeof(base), "%s", nn_node_label(c));
    int nw = new_fconst(g, base, "/weight_bn", w->data, wcount);
    int nb = nw >= 0 ? new_fconst(g, base, "/bias_bn", bias, C) : -1;
    if (nb < 0) {
        free(st);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    c = &g->nodes[ci]; /* vals moved; nodes did not, but keep the pattern */
    b = &g->nodes[bi];
    nn_val *W = &g->vals[nw], *B = &g->vals[nb];
    memcpy(W->dims, g->vals[wv].dims, sizeof(W->dims));
    W->rank = g->vals[wv].rank;
    float *wd = W->data, *bd = B->data;
    if (c->op == NN_OP_CONV) {
        size_t per = wcount / C;
        for (size_t co = 0; co < C; co++)
            for (size_t k = 0; k < per; k++)
                wd[co * per + k] = (float)(wd[co * per + k] * st[co]);
    } else { /* ConvTranspose: [Cin, Cout/group, k...] */
        size_t cin = (size_t)W->dims[0], coutg = (size_t)W->dims[1], kv = wcount / (cin * coutg);
        size_t cing = cin / (size_t)c->a.group;
        for (size_t i = 0; i < cin; i++)
            for (size_t o = 0; o < coutg; o++) {
                size_t co = (i / cing) * coutg + o;
                for (size_t k = 0; k < kv; k++)
                    wd[(i * coutg + o) * kv + k] = (float)(wd[(i * coutg + o) * kv + k] * st[co]);
            }
    }
    for (size_t co = 0; co < C; co++)
        bd[co] = (float)(bd[co] * st[co] + st[C + co]);
    free(st);

    if (c->nin < 3) {
        int *in = realloc(c->in, 3 * sizeof(int));
        if (!in)
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        c->in = in;
        c->nin = 3;
    }
    c->in[1] = nw;
    c->in[2] = nb;
    c->out[0] = b->out[0];
    g->vals[b->out[0]].producer = ci;
    b->dead = 1;
    *folded = 1;
    return LC_OK;
}

/* A standalone batch norm: inputs become (x, [s..., t...]). */
static lc_rc bn_affine(nn_graph *g, int bi, lc_err *err)
{
    nn_node *b = &g->nodes[bi];
    int sv = b->in[1];
    if (sv < 0 || !g->vals[sv].is_const || g->vals[sv].count == 0)
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "node \"%s\" (BatchNormalization): scale, bias, mean and variance must "
                          "be constants",
                          nn_node_label(b));
    size_t C = g->vals[sv].count;
    double *st = malloc(2 * C * sizeof(double));
    float *f = malloc(2 * C * sizeof(float));
    if (!st || !f) {
        free(st);
        free(f);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    if (!bn_params(g, b, C, st)) {
        free(st);
        free(f);
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "node \"%s\" (BatchNormalization): scale, bias, mean and variance must "
                          "be float constants of one size",
                          nn_node_label(b));
    }
    for (size_t i = 0; i < 2 * C; i++)
        f[i] = (float)st[i];
    free(st);
    char base[256];
    snprintf(base, sizeof(base), "%s", nn_node_label(b));
    int nv = new_fconst(g, base, "/scale_shift", f, 2 * C);
    free(f);
    if (nv < 0)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    b = &g->nodes[bi];
    b->in[1] = nv;
    b->nin = 2;
    return LC_OK;
}

lc_rc nn_graph_rewrite(nn_graph *g, lc_err *err)
{
    int *uses = NULL;
    lc_rc rc = LC_OK;

    uses = malloc((g->nvals + 1) * sizeof(int));
    if (!uses)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    /* batch norm: into the convolution before it when that one feeds only it */
    count_uses(g, uses);
    for (size_t i = 0; i < g->nnodes; i++) {
        nn_node *b = &g->nodes[i];
        if (b->dead || b->op != NN_OP_BNORM || b->in[0] < 0)
            continue;
        int x = b->in[0], p = g->vals[x].producer, folded = 0;
        if (p >= 0 && !g->nodes[p].dead && uses[x] == 1 &&
            (g->nodes[p].op == NN_OP_CONV || g->nodes[p].op == NN_OP_CONVT) &&
            g->nodes[p].a.act == NN_ACT_NONE) {
            if ((rc = fold_bn(g, p, (int)i, &folded, err)) != LC_OK)
                goto out;
        }
        if (!folded && (rc = bn_affine(g, (int)i, err)) != LC_OK)
            goto out;
    }
    /* activations into the convolution, normalisation or affine step before them */
    free(uses);
    uses = malloc((g->nvals + 1) * sizeof(int));
    if (!uses)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    count_uses(g, uses);
    for (size_t i = 0; i < g->nnodes; i++) {
        nn_node *a = &g->nodes[i];
        if (a->dead || (a->op != NN_OP_RELU && a->op != NN_OP_LEAKY && a->op != NN_OP_SIGMOID) ||
            a->in[0] < 0)
            continue;
        int x = a->in[0], p = g->vals[x].producer;
        if (p < 0 || g->nodes[p].dead || uses[x] != 1)
            continue;
        nn_node *q = &g->nodes[p];
        if ((q->op != NN_OP_CONV && q->op != NN_OP_CONVT && q->op != NN_OP_INORM &&
             q->op != NN_OP_BNORM) ||
            q->a.act != NN_ACT_NONE)
            continue;
        q->a.act = a->a.act;
        q->a.alpha = a->a.alpha;
        q->out[0] = a->out[0];
        g->vals[a->out[0]].producer = p;
        a->dead = 1;
    }
out:
    free(uses);
    return rc;
}

lc_rc nn_graph_order(nn_graph *g, lc_err *err)
{
    size_t nn = g->nnodes;
    char *need = calloc(nn + 1, 1);
    int *stack = malloc((nn + 1) * sizeof(int));
    int *pending = calloc(nn + 1, sizeof(int));
    int *order = malloc((nn + 1) * sizeof(int));
    size_t sp = 0, no = 0;
    lc_rc rc = LC_OK;

    if (!need || !stack || !pending || !order) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    /* what the output needs: backwards from its producer */
    if (g->vals[g->output].producer >= 0) {
        stack[sp++] = g->vals[g->output].producer;
        need[stack[0]] = 1;
    }
    while (sp) {
        const nn_node *n = &g->nodes[stack[--sp]];
        for (int k = 0; k < n->nin; k++) {
            int p = n->in[k] >= 0 ? g->vals[n->in[k]].producer : -1;
            if (p >= 0 && !need[p]) {
                if (g->nodes[p].dead) {
                    rc = lc_err_set(err, LC_ERR_INTERNAL, "node \"%s\" reads a removed node",
                                    nn_node_label(n));
                    goto out;
                }
                need[p] = 1;
                stack[sp++] = p;
            }
        }
    }
    /* Kahn's algorithm over the needed nodes, smallest index first among the ready ones
     * (a file already in order keeps it) */
    for (size_t i = 0; i < nn; i++) {
        if (!need[i])
            continue;
        const nn_node *n = &g->nodes[i];
        for (int k = 0; k < n->nin; k++) {
            int p = n->in[k] >= 0 ? g->vals[n->in[k]].producer : -1;
            if (p >= 0)
                pending[i]++;
        }
    }
    char *done = need; /* reuse: 1 = needed, 2 = placed */
    for (;;) {
        size_t before = no;
        for (size_t i = 0; i < nn; i++) {
            if (done[i] != 1 || pending[i])
                continue;
            done[i] = 2;
            order[no++] = (int)i;
            /* release the consumers of i's outputs */
            for (size_t j = 0; j < nn; j++) {
                if (done[j] != 1)
                    continue;
                const nn_node *m = &g->nodes[j];
                for (int k = 0; k < m->nin; k++)
                    if (m->in[k] >= 0 && g->vals[m->in[k]].producer == (int)i)
                        pending[j]--;
            }
        }
        if (no == before)
            break;
    }
    for (size_t i = 0; i < nn; i++) {
        if (done[i] == 1) {
            rc = lc_err_set(err, LC_ERR_INVALID, "the graph has a cycle through node \"%s\" (%s)",
                            nn_node_label(&g->nodes[i]), g->nodes[i].op_type);
            goto out;
        }
    }
    free(g->order);
    g->order = order;
    g->norder = no;
    order = NULL;
out:
    free(need);
    free(stack);
    free(pending);
    free(order);
    return rc;
}

void nn_graph_info(const nn_graph *g, gpu_nn_info *info)
{
    const nn_val *in = &g->vals[g->input];
    memset(info, 0, sizeof(*info));
    info->rank = in->rank;
    info->spatial_dims = in->rank - 2;
    for (int i = 0; i < GPU_NN_MAX_RANK; i++)
        info->in_shape[i] = info->out_shape[i] = -1;
    for (int i = 0; i < in->rank && i < GPU_NN_MAX_RANK; i++)
        info->in_shape[i] = in->dims[i];
    info->in_channels = in->dims[1] > 0 ? (int)in->dims[1] : -1;
    info->out_channels = -1;
    info->opset = g->opset;
    snprintf(info->input_name, sizeof(info->input_name), "%s", in->name);
    snprintf(info->output_name, sizeof(info->output_name), "%s", g->vals[g->output].name);
    /* parameters: float constants the live nodes read */
    char *seen = calloc(g->nvals + 1, 1);
    for (size_t i = 0; seen && i < g->norder; i++) {
        const nn_node *n = &g->nodes[g->order[i]];
        for (int k = 0; k < n->nin; k++) {
            int v = n->in[k];
            if (v >= 0 && g->vals[v].is_const && g->vals[v].dtype == NN_F32 && !seen[v]) {
                seen[v] = 1;
                info->params += g->vals[v].count;
            }
        }
    }
    free(seen);
}
