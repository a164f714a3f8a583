/*
 * nn_dnnl.c: Conv and ConvTranspose of the CPU backend on oneDNN (Debian libdnnl: direct and
 * brgemm convolutions JIT-compiled for the CPU's vector ISA). Per step, one primitive made at
 * plan time for the layouts nn_cpu.c chose (plain or channels-last), with the bias and the
 * activation fused as a post-op, oneDNN's scratchpad in the plan's scratch, and the weights
 * reordered once into the primitive's preferred format. When oneDNN has only its reference
 * code for the layouts asked (a few output channels written plain), the primitive takes the
 * layouts it prefers and reorders on either side run in the plan's scratch.
 * Threads: Debian's oneDNN runs on the OpenMP runtime (libgomp); the OpenMP thread count is
 * set to the context's before every primitive is made or run, so oneDNN never uses more
 * threads than the context was given. Builds against oneDNN 2.x (Debian bookworm) and 3.x.
 * Ownership and thread safety: nn_cpu.h.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "nn_cpu.h"
#include "oneapi/dnnl/dnnl.h"
#include "oneapi/dnnl/dnnl_debug.h"

/* Memory descriptors: a struct in oneDNN 2, a handle to destroy in oneDNN 3. MD(m) is what
 * the API functions take. */
#if DNNL_VERSION_MAJOR >= 3
typedef dnnl_memory_desc_t dn_md;
#define MD(m) (m)
#else
typedef dnnl_memory_desc_t dn_md;
#define MD(m) (&(m))
#endif

/* Weights reordered into a primitive's format, shared by every step using the same constant
 * in the same format (the plans of one model for several input shapes). */
typedef struct dn_wts {
    struct dn_wts *next;
    const float *src; /* the model's plain copy (backend memory, owned by the graph) */
    dn_md md;
    void *raw, *mem; /* counted allocation and its aligned start */
    size_t bytes;
    int refs;
} dn_wts;

struct nn_dnnl {
    gpu_ctx *ctx;
    int threads;
    dnnl_engine_t eng;
    dnnl_stream_t strm;
    dn_wts *wts;
};

struct nn_dnnl_conv {
    dnnl_primitive_t prim, src_re, dst_re;  /* the reorders may be NULL */
    dnnl_memory_t src, wei, bias, dst, pad; /* the primitive's arguments (bias, pad: may be NULL) */
    dnnl_memory_t src_user, dst_user;       /* the step's input and output around reorders */
    size_t src_off, dst_off, pad_off;       /* in the plan scratch */
    dn_wts *w;
};

#define ALIGN_UP(n) (((n) + NN_MEM_ALIGN - 1) / NN_MEM_ALIGN * NN_MEM_ALIGN)

static lc_rc dn_fail(lc_err *err, dnnl_status_t st, const nn_step *s, const char *what)
{
    lc_rc rc = st == dnnl_out_of_memory                                   ? LC_ERR_NOMEM
               : st == dnnl_unimplemented || st == dnnl_invalid_arguments ? LC_ERR_UNSUPPORTED
                                                                          : LC_ERR_INTERNAL;
    if (s)
        return lc_err_set(err, rc, "node \"%s\" (%s): oneDNN could not %s: %s",
                          nn_node_label(s->node), s->node->op_type, what, dnnl_status2str(st));
    return lc_err_set(err, rc, "oneDNN could not %s: %s", what, dnnl_status2str(st));
}

/* --- memory descriptors, both API generations ------------------------------------------ */

static dnnl_status_t md_tag(dn_md *md, int nd, const dnnl_dims_t dims, dnnl_format_tag_t tag)
{
#if DNNL_VERSION_MAJOR >= 3
    return dnnl_memory_desc_create_with_tag(md, nd, dims, dnnl_f32, tag);
#else
    return dnnl_memory_desc_init_by_tag(md, nd, dims, dnnl_f32, tag);
#endif
}

static dnnl_status_t md_strides(dn_md *md, int nd, const dnnl_dims_t dims, const dnnl_dims_t st)
{
#if DNNL_VERSION_MAJOR >= 3
    return dnnl_memory_desc_create_with_strides(md, nd, dims, dnnl_f32, st);
#else
    return dnnl_memory_desc_init_by_strides(md, nd, dims, dnnl_f32, st);
#endif
}

/* A copy of the descriptor a primitive descriptor holds for `what`. */
static dnnl_status_t md_query(dn_md *md, const_dnnl_primitive_desc_t pd, dnnl_query_t what)
{
#if DNNL_VERSION_MAJOR >= 3
    return dnnl_memory_desc_clone(md, dnnl_primitive_desc_query_md(pd, what, 0));
#else
    const dnnl_memory_desc_t *q = dnnl_primitive_desc_query_md(pd, what, 0);
    if (!q)
        return dnnl_invalid_arguments;
    *md = *q;
    return dnnl_success;
#endif
}

static dnnl_status_t md_copy(dn_md *md, const dn_md *from)
{
#if DNNL_VERSION_MAJOR >= 3
    return dnnl_memory_desc_clone(md, *from);
#else
    *md = *from;
    return dnnl_success;
#endif
}

static void md_free(dn_md *md)
{
#if DNNL_VERSION_MAJOR >= 3
    if (*md)
        dnnl_memory_desc_destroy(*md);
    *md = NULL;
#else
    (void)md;
#endif
}

/* --- engine ------------------------------------------------------------------------------- */

lc_rc nn_dnnl_open(gpu_ctx *ctx, int threads, nn_dnnl **out, lc_err *err)
{
    nn_dnnl *d = calloc(1, sizeof(*d));
    dnnl_status_t st;
    *out = NULL;
    if (!d)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    d->ctx = ctx;
    d->threads = threads;
    if ((st = dnnl_engine_create(&d->eng, dnnl_cpu, 0)) != dnnl_success ||
        (st = dnnl_stream_create(&d->strm, d->eng, dnnl_stream_default_flags)) != dnnl_success) {
        nn_dnnl_close(d);
        return dn_fail(err, st, NULL, "open a CPU engine");
    }
    *out = d;
    return LC_OK;
}

void nn_dnnl_close(nn_dnnl *d)
{
    if (!d)
        return;
    if (d->strm)
        dnnl_stream_destroy(d->strm);
    if (d->eng)
        dnnl_engine_destroy(d->eng);
    free(d);
}

/* --- weights ------------------------------------------------------------------------------ */

static void wts_put(nn_dnnl *d, dn_wts *w)
{
    if (!w || --w->refs > 0)
        return;
    for (dn_wts **p = &d->wts; *p; p = &(*p)->next)
        if (*p == w) {
            *p = w->next;
            break;
        }
    gpu_mem_release(d->ctx, w->raw, w->bytes + NN_MEM_ALIGN);
    md_free(&w->md);
    free(w);
}

static dnnl_status_t reorder_new(nn_dnnl *d, const dn_md *from, const dn_md *to,
                                 dnnl_primitive_t *r);

/* Run a reorder once, from memory `from` (descriptor fmd) to `to` (tmd). */
static dnnl_status_t reorder_now(nn_dnnl *d, dnnl_memory_t from, dnnl_memory_t to, const dn_md *fmd,
                                 const dn_md *tmd)
{
    dnnl_primitive_t r = NULL;
    dnnl_status_t st = reorder_new(d, fmd, tmd, &r);
    if (st == dnnl_success) {
        dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
        st = dnnl_primitive_execute(r, d->strm, 2, args);
    }
    if (st == dnnl_success)
        st = dnnl_stream_wait(d->strm);
    if (r)
        dnnl_primitive_destroy(r);
    return st;
}

/* The weights src (plain, described by umd) in format md: shared, or reordered now. */
static lc_rc wts_get(nn_dnnl *d, const nn_step *s, const float *src, const dn_md *umd,
                     const dn_md *md, dn_wts **out, lc_err *err)
{
    dnnl_memory_t from = NULL, to = NULL;
    dnnl_status_t st;
    dn_wts *w;

    for (w = d->wts; w; w = w->next)
        if (w->src == src && dnnl_memory_desc_equal(MD(w->md), MD(*md))) {
            w->refs++;
            *out = w;
            return LC_OK;
        }
    w = calloc(1, sizeof(*w));
    if (!w)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    w->src = src;
    w->bytes = dnnl_memory_desc_get_size(MD(*md));
    if ((st = md_copy(&w->md, md)) != dnnl_success) {
        free(w);
        return dn_fail(err, st, s, "describe the weights");
    }
    if (gpu_mem_alloc(d->ctx, w->bytes + NN_MEM_ALIGN, 0, &w->raw, err) != LC_OK) {
        md_free(&w->md);
        free(w);
        return lc_err_wrap(err, "could not place the reordered weights of node \"%s\"",
                           nn_node_label(s->node));
    }
    w->mem = (char *)w->raw + (ALIGN_UP((uintptr_t)w->raw) - (uintptr_t)w->raw);
    w->refs = 1;
    w->next = d->wts;
    d->wts = w;
    st = dnnl_memory_create(&from, MD(*umd), d->eng, (void *)(uintptr_t)src);
    if (st == dnnl_success)
        st = dnnl_memory_create(&to, MD(w->md), d->eng, w->mem);
    if (st == dnnl_success)
        st = reorder_now(d, from, to, umd, &w->md);
    if (from)
        dnnl_memory_destroy(from);
    if (to)
        dnnl_memory_destroy(to);
    if (st != dnnl_success) {
        wts_put(d, w);
        return dn_fail(err, st, s, "reorder the weights");
    }
    *out = w;
    return LC_OK;
}

/* --- convolutions ------------------------------------------------------------------------- */

static dnnl_format_tag_t act_tag(int nd, int cl)
{
    switch (nd) {
    case 3:
        return cl ? dnnl_nwc : dnnl_ncw;
    case 4:
        return cl ? dnnl_nhwc : dnnl_nchw;
    default:
        return cl ? dnnl_ndhwc : dnnl_ncdhw;
    }
}

/* Everything a primitive descriptor is made from. */
typedef struct conv_desc {
    int nd, tr, has_bias;
    dn_md src, dst, wei_user, wei_any, bias;
    dnnl_dims_t strides, dil, pl, pr;
    dnnl_primitive_attr_t attr;
} conv_desc;

static void conv_desc_release(conv_desc *cd)
{
    md_free(&cd->src);
    md_free(&cd->dst);
    md_free(&cd->wei_user);
    md_free(&cd->wei_any);
    md_free(&cd->bias);
    if (cd->attr)
        dnnl_primitive_attr_destroy(cd->attr);
    cd->attr = NULL;
}

/* The step's geometry in oneDNN's terms: src/dst in layouts src_cl/dst_cl (-1: any),
 * weights as the ONNX file holds them (user) and any, bias, the fused activation. */
static dnnl_status_t conv_describe(const nn_step *s, int src_cl, int dst_cl, conv_desc *cd)
{
    int nsp = s->in[0].sh.rank - 2, nd = nsp + 2, tr = s->op == NN_OP_CONVT;
    int64_t G = s->group, cing = s->cin / G, coutg = s->cout / G, kv = 1;
    dnnl_dims_t sd = {s->n, s->cin}, dd = {s->n, s->cout}, wd = {0}, ws = {0};
    dnnl_post_ops_t po = NULL;
    dnnl_status_t st;
    int wn = 0;

    cd->nd = nd;
    cd->tr = tr;
    for (int i = 0; i < nsp; i++) {
        int a = 3 - nsp + i; /* canonical axis */
        sd[2 + i] = s->id[a];
        dd[2 + i] = s->od[a];
        kv *= s->k[a];
        cd->strides[i] = s->s[a];
        cd->dil[i] = s->dl[a] - 1; /* oneDNN counts the gaps */
        cd->pl[i] = s->pb[a];
        /* ConvTranspose: output_padding comes off the end padding, so that oneDNN's
         * (od + pl + pr - span) / stride + 1 == id holds */
        cd->pr[i] =
            tr ? (s->id[a] - 1) * s->s[a] + (s->k[a] - 1) * s->dl[a] + 1 - s->pb[a] - s->od[a]
               : s->pe[a];
    }
    /* weights: logical (G,) O, I, spatial; the ONNX order is (G,) O, I for Conv and
     * (G,) I, O for ConvTranspose */
    if (G > 1)
        wd[wn++] = G;
    wd[wn++] = coutg;
    wd[wn++] = cing;
    for (int i = 0; i < nsp; i++)
        wd[wn++] = s->k[3 - nsp + i];
    int64_t acc = 1;
    for (int i = wn - 1; i >= wn - nsp; i--) {
        ws[i] = acc;
        acc *= wd[i];
    }
    int o = G > 1 ? 1 : 0; /* index of O in wd */
    if (!tr) {
        ws[o + 1] = kv;
        ws[o] = cing * kv;
    } else {
        ws[o] = kv;
        ws[o + 1] = coutg * kv;
    }
    if (G > 1)
        ws[0] = coutg * cing * kv;

    if ((st = md_tag(&cd->src, nd, sd, src_cl < 0 ? dnnl_format_tag_any : act_tag(nd, src_cl))) !=
            dnnl_success ||
        (st = md_tag(&cd->dst, nd, dd, dst_cl < 0 ? dnnl_format_tag_any : act_tag(nd, dst_cl))) !=
            dnnl_success ||
        (st = md_strides(&cd->wei_user, wn, wd, ws)) != dnnl_success ||
        (st = md_tag(&cd->wei_any, wn, wd, dnnl_format_tag_any)) != dnnl_success)
        return st;
    if (s->nin > 2) {
        dnnl_dims_t bd = {s->cout};
        if ((st = md_tag(&cd->bias, 1, bd, dnnl_a)) != dnnl_success)
            return st;
        cd->has_bias = 1;
    }
    if ((st = dnnl_primitive_attr_create(&cd->attr)) != dnnl_success ||
        (st = dnnl_primitive_attr_set_scratchpad_mode(cd->attr, dnnl_scratchpad_mode_user)) !=
            dnnl_success)
        return st;
    if (s->a.act != NN_ACT_NONE) {
        dnnl_alg_kind_t alg =
            s->a.act == NN_ACT_SIGMOID ? dnnl_eltwise_logistic : dnnl_eltwise_relu;
        float alpha = s->a.act == NN_ACT_LEAKY ? s->a.alpha : 0.0f;
        if ((st = dnnl_post_ops_create(&po)) != dnnl_success)
            return st;
#if DNNL_VERSION_MAJOR >= 3
        st = dnnl_post_ops_append_eltwise(po, alg, alpha, 0.0f);
#else
        st = dnnl_post_ops_append_eltwise(po, 1.0f, alg, alpha, 0.0f);
#endif
        if (st == dnnl_success)
            st = dnnl_primitive_attr_set_post_ops(cd->attr, po);
        dnnl_post_ops_destroy(po);
    }
    return st;
}

static dnnl_status_t conv_pd(nn_dnnl *d, const conv_desc *cd, dnnl_primitive_desc_t *pd)
{
    const dn_md *bias = cd->has_bias ? &cd->bias : NULL;
#if DNNL_VERSION_MAJOR >= 3
    if (cd->tr)
        return dnnl_deconvolution_forward_primitive_desc_create(
            pd, d->eng, dnnl_forward_inference, dnnl_deconvolution_direct, cd->src, cd->wei_any,
            bias ? *bias : NULL, cd->dst, cd->strides, cd->dil, cd->pl, cd->pr, cd->attr);
    return dnnl_convolution_forward_primitive_desc_create(
        pd, d->eng, dnnl_forward_inference, dnnl_convolution_direct, cd->src, cd->wei_any,
        bias ? *bias : NULL, cd->dst, cd->strides, cd->dil, cd->pl, cd->pr, cd->attr);
#else
    dnnl_status_t st;
    if (cd->tr) {
        dnnl_deconvolution_desc_t dc;
        st = dnnl_dilated_deconvolution_forward_desc_init(
            &dc, dnnl_forward_inference, dnnl_deconvolution_direct, &cd->src, &cd->wei_any, bias,
            &cd->dst, cd->strides, cd->dil, cd->pl, cd->pr);
        return st == dnnl_success ? dnnl_primitive_desc_create(pd, &dc, cd->attr, d->eng, NULL)
                                  : st;
    }
    dnnl_convolution_desc_t cc;
    st = dnnl_dilated_convolution_forward_desc_init(
        &cc, dnnl_forward_inference, dnnl_convolution_direct, &cd->src, &cd->wei_any, bias,
        &cd->dst, cd->strides, cd->dil, cd->pl, cd->pr);
    return st == dnnl_success ? dnnl_primitive_desc_create(pd, &cc, cd->attr, d->eng, NULL) : st;
#endif
}

/* The primitive for the layouts asked (src_cl, dst_cl) unless oneDNN only has its
 * reference code for them; then the one with the output in the layout oneDNN prefers, or
 * both (a plain output of a few channels after a blocked input: blocked, then reordered). */
static dnnl_status_t conv_pick(nn_dnnl *d, const nn_step *s, int src_cl, int dst_cl, conv_desc *cd,
                               dnnl_primitive_desc_t *pd)
{
    const int tries[3][2] = {{src_cl, dst_cl}, {src_cl, -1}, {-1, -1}};
    dnnl_status_t st = dnnl_unimplemented;
    for (int t = 0; t < 3; t++) {
        const char *impl = NULL;
        conv_desc_release(cd);
        memset(cd, 0, sizeof(*cd));
        *pd = NULL;
        st = conv_describe(s, tries[t][0], tries[t][1], cd);
        if (st == dnnl_success)
            st = conv_pd(d, cd, pd);
        if (st == dnnl_success &&
            (t == 2 ||
             dnnl_primitive_desc_query(*pd, dnnl_query_impl_info_str, 0, &impl) != dnnl_success ||
             !impl || strncmp(impl, "ref", 3) != 0))
            return st;
        if (*pd)
            dnnl_primitive_desc_destroy(*pd);
        *pd = NULL;
    }
    return st;
}

/* A memory object of md on the engine, its buffer given at run time. */
static dnnl_status_t mem_new(nn_dnnl *d, const dn_md *md, void *handle, dnnl_memory_t *m)
{
    return dnnl_memory_create(m, MD(*md), d->eng, handle ? handle : DNNL_MEMORY_NONE);
}

/* A reorder from `from` to `to` (descriptors), made into *r. */
static dnnl_status_t reorder_new(nn_dnnl *d, const dn_md *from, const dn_md *to,
                                 dnnl_primitive_t *r)
{
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_status_t st = dnnl_primitive_attr_create(&attr);
    if (st == dnnl_success)
        st = dnnl_reorder_primitive_desc_create(&pd, MD(*from), d->eng, MD(*to), d->eng, attr);
    if (st == dnnl_success)
        st = dnnl_primitive_create(r, pd);
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    if (attr)
        dnnl_primitive_attr_destroy(attr);
    return st;
}

lc_rc nn_dnnl_conv_new(nn_dnnl *d, const nn_step *s, int src_cl, int dst_cl, nn_dnnl_conv **out,
                       size_t *scratch, lc_err *err)
{
    conv_desc cd = {0};
    dnnl_primitive_desc_t pd = NULL;
    dn_md psrc = {0}, pdst = {0}, pwei = {0}, ppad = {0}, usrc = {0}, udst = {0};
    nn_dnnl_conv *c = calloc(1, sizeof(*c));
    dnnl_status_t st;
    lc_rc rc = LC_OK;
    size_t at = 0;

    *out = NULL;
    if (!c)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    omp_set_num_threads(d->threads); /* oneDNN splits its work by the count it sees now */
    /* one channel: both layouts are the same bytes, and channels-last has the faster kernels */
    if (s->cin == 1)
        src_cl = 1;
    if (s->cout == 1)
        dst_cl = 1;
    if ((st = conv_pick(d, s, src_cl, dst_cl, &cd, &pd)) != dnnl_success) {
        rc = dn_fail(err, st, s, "make a convolution");
        goto out;
    }
    int nsp = cd.nd - 2;
    dnnl_dims_t sd = {s->n, s->cin}, dd = {s->n, s->cout};
    for (int i = 0; i < nsp; i++) {
        sd[2 + i] = s->id[3 - nsp + i];
        dd[2 + i] = s->od[3 - nsp + i];
    }
    if ((st = md_query(&psrc, pd, dnnl_query_src_md)) != dnnl_success ||
        (st = md_query(&pdst, pd, dnnl_query_dst_md)) != dnnl_success ||
        (st = md_query(&pwei, pd, dnnl_query_weights_md)) != dnnl_success ||
        (st = md_query(&ppad, pd, dnnl_query_scratchpad_md)) != dnnl_success ||
        (st = md_tag(&usrc, cd.nd, sd, act_tag(cd.nd, src_cl))) != dnnl_success ||
        (st = md_tag(&udst, cd.nd, dd, act_tag(cd.nd, dst_cl))) != dnnl_success ||
        (st = dnnl_primitive_create(&c->prim, pd)) != dnnl_success) {
        rc = dn_fail(err, st, s, "make a convolution");
        goto out;
    }
    if ((rc = wts_get(d, s, s->in[1].cmem, &cd.wei_user, &pwei, &c->w, err)) != LC_OK)
        goto out;
    st = mem_new(d, &pwei, c->w->mem, &c->wei);
    if (st == dnnl_success && cd.has_bias)
        st = mem_new(d, &cd.bias, (void *)(uintptr_t)s->in[2].cmem, &c->bias);
    if (st == dnnl_success)
        st = mem_new(d, &psrc, NULL, &c->src);
    if (st == dnnl_success)
        st = mem_new(d, &pdst, NULL, &c->dst);
    if (st == dnnl_success && !dnnl_memory_desc_equal(MD(psrc), MD(usrc))) {
        c->src_off = at;
        at += ALIGN_UP(dnnl_memory_desc_get_size(MD(psrc)));
        st = reorder_new(d, &usrc, &psrc, &c->src_re);
        if (st == dnnl_success)
            st = mem_new(d, &usrc, NULL, &c->src_user);
    }
    if (st == dnnl_success && !dnnl_memory_desc_equal(MD(pdst), MD(udst))) {
        c->dst_off = at;
        at += ALIGN_UP(dnnl_memory_desc_get_size(MD(pdst)));
        st = reorder_new(d, &pdst, &udst, &c->dst_re);
        if (st == dnnl_success)
            st = mem_new(d, &udst, NULL, &c->dst_user);
    }
    if (st == dnnl_success && dnnl_memory_desc_get_size(MD(ppad)) > 0) {
        c->pad_off = at;
        at += ALIGN_UP(dnnl_memory_desc_get_size(MD(ppad)));
        st = mem_new(d, &ppad, NULL, &c->pad);
    }
    if (st != dnnl_success)
        rc = dn_fail(err, st, s, "prepare a convolution");
out:
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    conv_desc_release(&cd);
    md_free(&psrc);
    md_free(&pdst);
    md_free(&pwei);
    md_free(&ppad);
    md_free(&usrc);
    md_free(&udst);
    if (rc != LC_OK) {
        nn_dnnl_conv_free(d, c);
        return rc;
    }
    *scratch = at;
    *out = c;
    return LC_OK;
}

lc_rc nn_dnnl_conv_run(nn_dnnl *d, const nn_dnnl_conv *c, const nn_step *s, const float *x,
                       float *y, void *scratch, lc_err *err)
{
    char *sc = scratch;
    dnnl_exec_arg_t args[5];
    int na = 0;
    dnnl_status_t st = dnnl_success;

    omp_set_num_threads(d->threads);
    if (c->src_re) {
        dnnl_exec_arg_t ra[2] = {{DNNL_ARG_FROM, c->src_user}, {DNNL_ARG_TO, c->src}};
        st = dnnl_memory_set_data_handle(c->src_user, (void *)(uintptr_t)x);
        if (st == dnnl_success)
            st = dnnl_memory_set_data_handle(c->src, sc + c->src_off);
        if (st == dnnl_success)
            st = dnnl_primitive_execute(c->src_re, d->strm, 2, ra);
    } else {
        st = dnnl_memory_set_data_handle(c->src, (void *)(uintptr_t)x);
    }
    if (st == dnnl_success)
        st = dnnl_memory_set_data_handle(c->dst, c->dst_re ? (void *)(sc + c->dst_off) : y);
    if (st == dnnl_success && c->pad)
        st = dnnl_memory_set_data_handle(c->pad, sc + c->pad_off);
    args[na++] = (dnnl_exec_arg_t){DNNL_ARG_SRC, c->src};
    args[na++] = (dnnl_exec_arg_t){DNNL_ARG_WEIGHTS, c->wei};
    if (c->bias)
        args[na++] = (dnnl_exec_arg_t){DNNL_ARG_BIAS, c->bias};
    args[na++] = (dnnl_exec_arg_t){DNNL_ARG_DST, c->dst};
    if (c->pad)
        args[na++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, c->pad};
    if (st == dnnl_success)
        st = dnnl_primitive_execute(c->prim, d->strm, na, args);
    if (st == dnnl_success && c->dst_re) {
        dnnl_exec_arg_t ra[2] = {{DNNL_ARG_FROM, c->dst}, {DNNL_ARG_TO, c->dst_user}};
        st = dnnl_memory_set_data_handle(c->dst_user, y);
        if (st == dnnl_success)
            st = dnnl_primitive_execute(c->dst_re, d->strm, 2, ra);
    }
    if (st == dnnl_success)
        st = dnnl_stream_wait(d->strm);
    return st == dnnl_success ? LC_OK : dn_fail(err, st, s, "run a convolution");
}

void nn_dnnl_conv_free(nn_dnnl *d, nn_dnnl_conv *c)
{
    if (!c)
        return;
    dnnl_primitive_t prims[3] = {c->prim, c->src_re, c->dst_re};
    dnnl_memory_t mems[7] = {c->src, c->wei, c->bias, c->dst, c->pad, c->src_user, c->dst_user};
    for (int i = 0; i < 3; i++)
        if (prims[i])
            dnnl_primitive_destroy(prims[i]);
    for (int i = 0; i < 7; i++)
        if (mems[i])
            dnnl_memory_destroy(mems[i]);
    wts_put(d, c->w);
    free(c);
}
