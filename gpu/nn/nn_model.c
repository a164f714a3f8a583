/*
 * nn_model.c: the public model API of gpu_nn.h: load (parse, rewrite, order, weights to the
 * backend, the plan of the model's own input shape when it is fixed, the FP16 check on CUDA),
 * forward passes through cached per-shape plans over one shared activation arena, and free.
 * Ownership: the model owns its graph, plans, weights' backend copies, arena and scratch
 * (all backend memory counted in its context); the context is borrowed and must outlive it.
 * Thread safety: a model and its context are used by one thread at a time.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "lc/log.h"
#include "nn_internal.h"

/* FP16 (CUDA) is kept when the check input's outputs stay within this fraction of the
 * float32 outputs' largest magnitude (at least 1). */
#define HALF_TOL 1e-2

static const nn_backend *backend_of(const gpu_ctx *ctx)
{
#ifdef RADPIPE_HAVE_CUDA
    if (ctx->backend == GPU_BACKEND_CUDA)
        return gpu_cu_nn_backend();
#endif
    return ctx->backend == GPU_BACKEND_CPU ? &nn_cpu_backend : NULL;
}

/* Float constants read by runtime steps: to the backend once, at load. */
static lc_rc upload_weights(gpu_nn_model *m, lc_err *err)
{
    nn_graph *g = &m->g;
    for (size_t i = 0; i < g->norder; i++) {
        const nn_node *n = &g->nodes[g->order[i]];
        if (!nn_op_is_runtime(n->op) || n->op == NN_OP_RESIZE)
            continue;
        for (int k = 0; k < n->nin; k++) {
            int vi = n->in[k];
            if (vi < 0)
                continue;
            nn_val *v = &g->vals[vi];
            if (!v->is_const || v->dtype != NN_F32 || v->mem || !v->data)
                continue;
            size_t bytes = (v->count ? v->count : 1) * sizeof(float);
            lc_rc rc = gpu_mem_alloc(m->ctx, bytes, 0, &v->mem, err);
            if (rc != LC_OK)
                return lc_err_wrap(err, "could not place the weights of node \"%s\"",
                                   nn_node_label(n));
            v->mem_bytes = bytes;
            m->info.weight_bytes += bytes;
            if (v->count && (rc = m->ctx->ops->to_mem(m->ctx->impl, v->mem, v->data,
                                                      v->count * sizeof(float), err)) != LC_OK)
                return rc;
        }
    }
    return LC_OK;
}

/* Backend memory of nbytes whose start *at is aligned to NN_MEM_ALIGN; *raw is what
 * gpu_mem_release takes, with nbytes + NN_MEM_ALIGN. */
static lc_rc alloc_aligned(gpu_ctx *ctx, size_t nbytes, void **raw, void **at, lc_err *err)
{
    lc_rc rc = gpu_mem_alloc(ctx, nbytes + NN_MEM_ALIGN, 0, raw, err);
    if (rc != LC_OK)
        return rc;
    uintptr_t a = ((uintptr_t)*raw + NN_MEM_ALIGN - 1) & ~(uintptr_t)(NN_MEM_ALIGN - 1);
    *at = (char *)*raw + (a - (uintptr_t)*raw);
    return LC_OK;
}

static void release_aligned(gpu_ctx *ctx, void **raw, void **at, size_t *nbytes)
{
    if (*raw)
        gpu_mem_release(ctx, *raw, *nbytes + NN_MEM_ALIGN);
    *raw = *at = NULL;
    *nbytes = 0;
}

/* Grow the shared arena and scratch to what plan p needs. */
static lc_rc fit_memory(gpu_nn_model *m, const nn_plan *p, lc_err *err)
{
    if (p->arena_bytes > m->arena_bytes) {
        release_aligned(m->ctx, &m->arena_mem, &m->arena, &m->arena_bytes);
        if (alloc_aligned(m->ctx, p->arena_bytes, &m->arena_mem, &m->arena, err) != LC_OK)
            return lc_err_wrap(err, "could not allocate the model's activations");
        m->arena_bytes = p->arena_bytes;
    }
    if (p->scratch_bytes > m->scratch_bytes) {
        release_aligned(m->ctx, &m->scratch_mem, &m->scratch, &m->scratch_bytes);
        if (alloc_aligned(m->ctx, p->scratch_bytes, &m->scratch_mem, &m->scratch, err) != LC_OK)
            return lc_err_wrap(err, "could not allocate the model's scratch memory");
        m->scratch_bytes = p->scratch_bytes;
    }
    return LC_OK;
}

static void drop_plans(gpu_nn_model *m)
{
    for (int i = 0; i < m->nplans; i++)
        nn_plan_free(m, m->plans[i]);
    m->nplans = 0;
}

/* The plan for input shape in: cached, or built (evicting the least recently used). */
lc_rc nn_model_plan(gpu_nn_model *m, const nn_shape *in, nn_plan **out, lc_err *err)
{
    nn_plan *p = NULL;
    lc_rc rc;
    for (int i = 0; i < m->nplans; i++) {
        const nn_plan *q = m->plans[i];
        if (q->in_shape.rank == in->rank &&
            memcmp(q->in_shape.d, in->d, (size_t)in->rank * sizeof(int64_t)) == 0) {
            m->plans[i]->used = ++m->tick;
            *out = m->plans[i];
            return LC_OK;
        }
    }
    if ((rc = nn_plan_build(m, in, &p, err)) != LC_OK)
        return rc;
    if ((rc = fit_memory(m, p, err)) != LC_OK) {
        nn_plan_free(m, p);
        return rc;
    }
    if (m->nplans == NN_MAX_PLANS) {
        int lru = 0;
        for (int i = 1; i < m->nplans; i++)
            if (m->plans[i]->used < m->plans[lru]->used)
                lru = i;
        nn_plan_free(m, m->plans[lru]);
        m->plans[lru] = m->plans[--m->nplans];
    }
    p->used = ++m->tick;
    m->plans[m->nplans++] = p;
    *out = p;
    return LC_OK;
}

/* The float tensor at byte offset off of backend memory base. */
static float *at(void *base, size_t off)
{
    void *p = (char *)base + off;
    return p;
}

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* Run plan p on what is in its input buffer; the output stays in the arena. With
 * opts->profile set, each step's time is logged (queued work waited for). */
lc_rc nn_model_run(gpu_nn_model *m, const nn_plan *p, lc_err *err)
{
    const float *ins[64];
    char sh[96];
    for (size_t i = 0; i < p->nsteps; i++) {
        const nn_step *s = &p->steps[i];
        if (s->nin > 64)
            return lc_err_set(err, LC_ERR_INTERNAL, "step with %d operands", s->nin);
        for (int k = 0; k < s->nin; k++)
            ins[k] = s->in[k].is_const ? s->in[k].cmem : at(m->arena, s->in[k].off);
        nn_bind b = {.in = ins,
                     .out = at(m->arena, s->out.off),
                     .scratch = m->scratch,
                     .scratch_bytes = m->scratch_bytes};
        double t0 = m->profile ? now_ms() : 0;
        lc_rc rc = m->be->run(m->bm, s, &b, err);
        if (rc == LC_OK && m->profile && m->be->sync)
            rc = m->be->sync(m->bm, err);
        if (rc != LC_OK)
            return lc_err_wrap(err, "node \"%s\" (%s)", nn_node_label(s->node), s->node->op_type);
        if (m->profile)
            lc_log_info("nn step", LC_LI("step", i), LC_LS("node", nn_node_label(s->node)),
                        LC_LS("op", s->node->op_type),
                        LC_LS("out", nn_shape_str(&s->out.sh, sh, sizeof(sh))),
                        LC_LD("ms", now_ms() - t0));
    }
    return LC_OK;
}

float *nn_model_input(gpu_nn_model *m, const nn_plan *p)
{
    return at(m->arena, p->in_off);
}

const float *nn_model_output(gpu_nn_model *m, const nn_plan *p)
{
    return at(m->arena, p->out_off);
}

/* Deterministic pseudo-random normal values (splitmix64 + Box-Muller) for the FP16 check. */
static void check_input(float *x, size_t n)
{
    uint64_t s = 0x5eed;
    for (size_t i = 0; i < n; i++) {
        uint64_t z[2];
        for (int k = 0; k < 2; k++) {
            uint64_t v = (s += 0x9e3779b97f4a7c15ull);
            v = (v ^ (v >> 30)) * 0xbf58476d1ce4e5b9ull;
            v = (v ^ (v >> 27)) * 0x94d049bb133111ebull;
            z[k] = v ^ (v >> 31);
        }
        double u = ((double)(z[0] >> 11) + 0.5) / 9007199254740992.0;
        double w = (double)(z[1] >> 11) / 9007199254740992.0;
        x[i] = (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * w));
    }
}

/* Keep FP16 convolutions only when they stay within HALF_TOL of float32 on the check input. */
static lc_rc check_half(gpu_nn_model *m, const nn_shape *in, lc_err *err)
{
    size_t n = nn_shape_count(in), no = 0;
    float *x = malloc(n * sizeof(float)), *ref = NULL, *y = NULL;
    nn_plan *p;
    lc_rc rc = LC_OK;
    int64_t osh[GPU_NN_MAX_RANK];
    double worst = 0, big = 1;

    if (!x) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    check_input(x, n);
    for (int pass = 0; pass < 2; pass++) {
        m->be->set_half(m->bm, pass);
        drop_plans(m);
        if ((rc = nn_model_plan(m, in, &p, err)) != LC_OK)
            goto out;
        no = p->out_count;
        float **dst = pass ? &y : &ref;
        *dst = malloc((no ? no : 1) * sizeof(float));
        if (!*dst) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
            goto out;
        }
        if ((rc = gpu_nn_forward(m, x, in->d, in->rank, *dst, no, osh, err)) != LC_OK)
            goto out;
    }
    for (size_t i = 0; i < no; i++) {
        double d = fabs((double)ref[i] - (double)y[i]);
        worst = d > worst || isnan(d) ? d : worst;
        big = fabs((double)ref[i]) > big ? fabs((double)ref[i]) : big;
    }
    if (!(worst <= HALF_TOL * big)) {
        m->be->set_half(m->bm, 0);
        drop_plans(m);
        lc_log_info("FP16 convolutions off: outputs differ from float32",
                    LC_LD("max_abs_diff", worst), LC_LD("limit", HALF_TOL * big));
    } else {
        lc_log_info("FP16 convolutions on", LC_LD("max_abs_diff", worst),
                    LC_LD("limit", HALF_TOL * big));
    }
out:
    free(x);
    free(ref);
    free(y);
    return rc;
}

lc_rc gpu_nn_load(gpu_ctx *ctx, const void *onnx, size_t len, const gpu_nn_opts *opts,
                  gpu_nn_model **out, lc_err *err)
{
    gpu_nn_model *m = NULL;
    lc_rc rc = LC_OK;

    if (!out)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_nn_load: out is NULL");
    *out = NULL;
    if (!ctx)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_nn_load: context is NULL");
    m = calloc(1, sizeof(*m));
    if (!m)
        return lc_err_set(err, LC_ERR_NOMEM, "could not allocate a model");
    m->ctx = ctx;
    m->be = backend_of(ctx);
    m->profile = opts && opts->profile;
    if (!m->be) {
        free(m);
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "no inference backend for this context");
    }
    if ((rc = nn_onnx_parse(onnx, len, &m->g, err)) != LC_OK)
        goto fail;
    if ((rc = nn_graph_rewrite(&m->g, err)) != LC_OK || (rc = nn_graph_order(&m->g, err)) != LC_OK)
        goto fail;
    if ((rc = m->be->model_open(ctx, opts && opts->allow_half, &m->bm, err)) != LC_OK)
        goto fail;
    nn_graph_info(&m->g, &m->info);
    if ((rc = upload_weights(m, err)) != LC_OK)
        goto fail;
    {
        /* the output is probabilities already when it comes from a softmax over channels */
        const nn_val *ov = &m->g.vals[m->g.output];
        const nn_node *last = ov->producer >= 0 ? &m->g.nodes[ov->producer] : NULL;
        int64_t ax = last ? last->a.axis : 0;
        if (last && ax < 0)
            ax += m->info.rank;
        m->out_is_prob = last && last->op == NN_OP_SOFTMAX && ax == 1 && !last->a.old_softmax;
    }
    /* a fixed input shape (a free batch taken as 1) is planned now: shape errors and the
     * backend's algorithm choice happen at load */
    nn_shape in = {.rank = m->info.rank};
    int fixed = 1;
    for (int i = 0; i < in.rank; i++) {
        in.d[i] = m->info.in_shape[i];
        if (in.d[i] < 0 && i == 0)
            in.d[i] = 1;
        else if (in.d[i] < 0)
            fixed = 0;
    }
    if (fixed) {
        nn_plan *p;
        if (opts && opts->allow_half && m->be->set_half && (rc = check_half(m, &in, err)) != LC_OK)
            goto fail;
        if ((rc = nn_model_plan(m, &in, &p, err)) != LC_OK)
            goto fail;
        m->info.out_rank = p->out_shape.rank;
        for (int i = 0; i < p->out_shape.rank && i < GPU_NN_MAX_RANK; i++)
            m->info.out_shape[i] = i == 0 && m->info.in_shape[0] < 0 ? -1 : p->out_shape.d[i];
        if (p->out_shape.rank >= 2)
            m->info.out_channels = (int)p->out_shape.d[1];
    }
    *out = m;
    return LC_OK;
fail:
    gpu_nn_free(m);
    return rc;
}

lc_rc gpu_nn_load_file(gpu_ctx *ctx, const char *path, const gpu_nn_opts *opts, gpu_nn_model **out,
                       lc_err *err)
{
    FILE *f = NULL;
    char *buf = NULL;
    long len;
    lc_rc rc = LC_OK;

    if (out)
        *out = NULL;
    if (!path)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_nn_load_file: path is NULL");
    f = fopen(path, "rb");
    if (!f)
        return lc_err_set(err, errno == ENOENT ? LC_ERR_NOT_FOUND : LC_ERR_IO,
                          "could not open model \"%s\": %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        rc = lc_err_set(err, LC_ERR_IO, "could not read model \"%s\": %s", path, strerror(errno));
        goto out;
    }
    buf = malloc(len ? (size_t)len : 1);
    if (!buf) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "could not allocate %ld bytes for model \"%s\"", len,
                        path);
        goto out;
    }
    if (len && fread(buf, 1, (size_t)len, f) != (size_t)len) {
        rc = lc_err_set(err, LC_ERR_IO, "could not read model \"%s\"", path);
        goto out;
    }
    rc = gpu_nn_load(ctx, buf, (size_t)len, opts, out, err);
    if (rc != LC_OK)
        lc_err_wrap(err, "model \"%s\"", path);
out:
    free(buf);
    if (f)
        fclose(f);
    return rc;
}

const gpu_nn_info *gpu_nn_model_info(const gpu_nn_model *m)
{
    return m ? &m->info : NULL;
}

void gpu_nn_free(gpu_nn_model *m)
{
    if (!m)
        return;
    drop_plans(m);
    if (m->ctx) {
        release_aligned(m->ctx, &m->arena_mem, &m->arena, &m->arena_bytes);
        release_aligned(m->ctx, &m->scratch_mem, &m->scratch, &m->scratch_bytes);
        for (size_t i = 0; i < m->g.nvals; i++)
            gpu_mem_release(m->ctx, m->g.vals[i].mem, m->g.vals[i].mem_bytes);
    }
    if (m->bm)
        m->be->model_close(m->bm);
    nn_graph_release(&m->g);
    free(m);
}

lc_rc gpu_nn_forward(gpu_nn_model *m, const float *in, const int64_t *in_shape, int rank,
                     float *out, size_t out_cap, int64_t *out_shape, lc_err *err)
{
    nn_plan *p;
    nn_shape sh = {.rank = rank};
    lc_rc rc;

    if (!m || !in || !in_shape || !out_shape || (!out && out_cap))
        return lc_err_set(err, LC_ERR_INVALID, "gpu_nn_forward: NULL argument");
    if (rank < 1 || rank > GPU_NN_MAX_RANK)
        return lc_err_set(err, LC_ERR_INVALID, "gpu_nn_forward: rank %d", rank);
    memcpy(sh.d, in_shape, (size_t)rank * sizeof(int64_t));
    if ((rc = nn_model_plan(m, &sh, &p, err)) != LC_OK)
        return rc;
    if (p->out_shape.rank > GPU_NN_MAX_RANK)
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "gpu_nn_forward: the output has rank %d",
                          p->out_shape.rank);
    for (int i = 0; i < GPU_NN_MAX_RANK; i++)
        out_shape[i] = i < p->out_shape.rank ? p->out_shape.d[i] : 0;
    if (p->out_count > out_cap)
        return lc_err_set(err, LC_ERR_TOO_LARGE,
                          "gpu_nn_forward: the output holds %zu floats, the buffer %zu",
                          p->out_count, out_cap);
    size_t n = nn_shape_count(&sh);
    if ((rc = m->ctx->ops->to_mem(m->ctx->impl, nn_model_input(m, p), in, n * sizeof(float),
                                  err)) != LC_OK)
        return rc;
    if ((rc = nn_model_run(m, p, err)) != LC_OK)
        return rc;
    return m->ctx->ops->to_host(m->ctx->impl, out, nn_model_output(m, p),
                                p->out_count * sizeof(float), err);
}
