/*
 * nn_cpu.c: the engine's CPU backend: every step on host memory with the context's threads
 * (gpu/ref/ref_par.h). Convolutions are GEMMs on OpenBLAS: im2col of a block of output
 * positions into the part's scratch (none for 1x1x1 stride-1 convolutions, which multiply the
 * input directly), one cblas_sgemm per block, bias and activation while the block is in
 * cache; transposed convolutions are a GEMM per block of input positions then a scatter into
 * the part's own output channels. The threads are ours: OpenBLAS runs single-threaded
 * (openblas_set_num_threads(1) at model open, process-wide: radpipe calls OpenBLAS nowhere
 * else), so the work splits into deterministic blocks with no nested thread pools.
 * Thread safety: calls on one model do not overlap.
 */
#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "nn_internal.h"
#include "ref/ref_internal.h"
#include "ref/ref_par.h"

/* im2col bytes a part aims at per block (about an L2 cache) */
#ifndef COL_BUDGET
#define COL_BUDGET ((size_t)2 << 20)
#endif

typedef struct cpu_bm {
    int threads;
} cpu_bm;

static lc_rc cpu_open(gpu_ctx *ctx, int allow_half, void **bm, lc_err *err)
{
    (void)allow_half;
    cpu_bm *b = calloc(1, sizeof(*b));
    if (!b)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    b->threads = ((const ref_impl *)ctx->impl)->threads;
    if (b->threads < 1)
        b->threads = 1;
    openblas_set_num_threads(1);
    *bm = b;
    return LC_OK;
}

static void cpu_close(void *bm)
{
    free(bm);
}

static inline float act(float v, nn_act a, float alpha)
{
    switch (a) {
    case NN_ACT_RELU:
        return v > 0 ? v : 0.0f;
    case NN_ACT_LEAKY:
        return v < 0 ? v * alpha : v;
    case NN_ACT_SIGMOID:
        return 1.0f / (1.0f + expf(-v));
    default:
        return v;
    }
}

static void act_row(float *y, size_t n, float bias, nn_act a, float alpha)
{
    if (a == NN_ACT_NONE) {
        if (bias != 0)
            for (size_t i = 0; i < n; i++)
                y[i] += bias;
        return;
    }
    for (size_t i = 0; i < n; i++)
        y[i] = act(y[i] + bias, a, alpha);
}

/* --- convolution --------------------------------------------------------------------------- */

static int pointwise(const nn_step *s)
{
    for (int i = 0; i < 3; i++)
        if (s->k[i] != 1 || s->s[i] != 1 || s->pb[i] || s->pe[i])
            return 0;
    return 1;
}

/* Conv: K = rows of the im2col matrix, P = output positions, cn = columns per block. */
static void conv_dims(const nn_step *s, int threads, size_t *K, size_t *P, size_t *cn)
{
    size_t kv = (size_t)(s->k[0] * s->k[1] * s->k[2]);
    *K = (size_t)(s->cin / s->group) * kv;
    *P = (size_t)(s->od[0] * s->od[1] * s->od[2]);
    size_t c = COL_BUDGET / (*K * sizeof(float));
    size_t even = (*P + (size_t)threads - 1) / (size_t)threads; /* every thread gets blocks */
    if (c > even)
        c = even;
    c = c < 64 ? 64 : c / 16 * 16;
    *cn = c < *P ? c : *P;
}

typedef struct conv_job {
    const nn_step *s;
    const float *x, *w, *bias;
    float *y, *scratch;
    size_t K, P, cn, nchunks, per_part;
    int pw;
} conv_job;

/* col[k][j] for rows k of the im2col matrix and output positions p0 + j, j < cn. */
static void im2col(const nn_step *s, const float *x, size_t p0, size_t cn, float *col)
{
    const int64_t *id = s->id, *od = s->od, *k = s->k, *st = s->s, *dl = s->dl, *pb = s->pb;
    size_t cing = (size_t)(s->cin / s->group), plane = (size_t)(id[0] * id[1] * id[2]);
    size_t row = 0;
    if (!col)
        return;
    for (size_t ci = 0; ci < cing; ci++)
        for (int64_t kz = 0; kz < k[0]; kz++)
            for (int64_t ky = 0; ky < k[1]; ky++)
                for (int64_t kx = 0; kx < k[2]; kx++, row++) {
                    float *dst = col + row * cn;
                    const float *src = x + ci * plane;
                    size_t p = p0, end = p0 + cn;
                    while (p < end) {
                        int64_t oz = (int64_t)(p / (size_t)(od[1] * od[2]));
                        int64_t rem = (int64_t)(p % (size_t)(od[1] * od[2]));
                        int64_t oy = rem / od[2], ox = rem % od[2];
                        size_t seg = (size_t)(od[2] - ox);
                        if (seg > end - p)
                            seg = end - p;
                        int64_t iz = oz * st[0] - pb[0] + kz * dl[0];
                        int64_t iy = oy * st[1] - pb[1] + ky * dl[1];
                        if (iz < 0 || iz >= id[0] || iy < 0 || iy >= id[1]) {
                            memset(dst, 0, seg * sizeof(float));
                        } else {
                            const float *r =
                                src + ((size_t)iz * (size_t)id[1] + (size_t)iy) * (size_t)id[2];
                            int64_t ix0 = ox * st[2] - pb[2] + kx * dl[2];
                            if (st[2] == 1 && ix0 >= 0 && ix0 + (int64_t)seg <= id[2]) {
                                memcpy(dst, r + ix0, seg * sizeof(float));
                            } else {
                                for (size_t j = 0; j < seg; j++) {
                                    int64_t ix = ix0 + (int64_t)j * st[2];
                                    dst[j] = ix >= 0 && ix < id[2] ? r[ix] : 0.0f;
                                }
                            }
                        }
                        dst += seg;
                        p += seg;
                    }
                }
}

static void conv_part(void *arg, int part, size_t begin, size_t end)
{
    const conv_job *j = arg;
    const nn_step *s = j->s;
    size_t G = (size_t)s->group, coutg = (size_t)(s->cout / s->group);
    size_t cing = (size_t)(s->cin / s->group);
    size_t in_plane = (size_t)(s->id[0] * s->id[1] * s->id[2]);
    float *col = j->scratch ? j->scratch + (size_t)part * j->per_part : NULL;

    for (size_t u = begin; u < end; u++) {
        size_t chunk = u % j->nchunks, g = (u / j->nchunks) % G, n = u / (j->nchunks * G);
        size_t p0 = chunk * j->cn, cn = j->cn;
        if (p0 + cn > j->P)
            cn = j->P - p0;
        const float *x = j->x + (n * (size_t)s->cin + g * cing) * in_plane;
        float *y = j->y + (n * (size_t)s->cout + g * coutg) * j->P;
        const float *w = j->w + g * coutg * j->K;
        if (j->pw) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)coutg, (int)cn, (int)j->K,
                        1.0f, w, (int)j->K, x + p0, (int)j->P, 0.0f, y + p0, (int)j->P);
        } else {
            im2col(s, x, p0, cn, col);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)coutg, (int)cn, (int)j->K,
                        1.0f, w, (int)j->K, col, (int)cn, 0.0f, y + p0, (int)j->P);
        }
        for (size_t co = 0; co < coutg; co++)
            act_row(y + co * j->P + p0, cn, j->bias ? j->bias[g * coutg + co] : 0.0f, s->a.act,
                    s->a.alpha);
    }
}

static void run_conv(const cpu_bm *b, const nn_step *s, const nn_bind *bd)
{
    conv_job j = {.s = s,
                  .x = bd->in[0],
                  .w = bd->in[1],
                  .bias = s->nin > 2 ? bd->in[2] : NULL,
                  .y = bd->out,
                  .scratch = bd->scratch,
                  .pw = pointwise(s)};
    conv_dims(s, b->threads, &j.K, &j.P, &j.cn);
    j.per_part = j.K * j.cn;
    j.nchunks = (j.P + j.cn - 1) / j.cn;
    if (j.pw)
        j.scratch = NULL;
    size_t units = (size_t)s->n * (size_t)s->group * j.nchunks;
    ref_run_units(b->threads, units, 1, conv_part, &j);
}

/* ConvTranspose: rows of W^T per channel block, columns per block of input positions. */
static void convt_dims(const nn_step *s, int threads, size_t *cb, size_t *qn)
{
    size_t coutg = (size_t)(s->cout / s->group), kv = (size_t)(s->k[0] * s->k[1] * s->k[2]);
    size_t pin = (size_t)(s->id[0] * s->id[1] * s->id[2]);
    size_t c = (coutg + (size_t)threads - 1) / (size_t)threads;
    *cb = c ? c : 1;
    size_t q = COL_BUDGET / (*cb * kv * sizeof(float));
    q = q < 16 ? 16 : q;
    *qn = q < pin ? q : pin;
}

typedef struct convt_job {
    const nn_step *s;
    const float *x, *w, *bias;
    float *y, *scratch;
    size_t cb, ncb, qn, per_part;
} convt_job;

static void convt_part(void *arg, int part, size_t begin, size_t end)
{
    const convt_job *j = arg;
    const nn_step *s = j->s;
    const int64_t *id = s->id, *od = s->od, *k = s->k, *st = s->s, *dl = s->dl, *pb = s->pb;
    size_t G = (size_t)s->group, coutg = (size_t)(s->cout / s->group);
    size_t cing = (size_t)(s->cin / s->group), kv = (size_t)(k[0] * k[1] * k[2]);
    size_t pin = (size_t)(id[0] * id[1] * id[2]), pout = (size_t)(od[0] * od[1] * od[2]);
    float *col = j->scratch + (size_t)part * j->per_part;

    for (size_t u = begin; u < end; u++) {
        size_t cbi = u % j->ncb, g = (u / j->ncb) % G, n = u / (j->ncb * G);
        size_t c0 = cbi * j->cb, c1 = c0 + j->cb < coutg ? c0 + j->cb : coutg;
        const float *x = j->x + (n * (size_t)s->cin + g * cing) * pin;
        float *y = j->y + (n * (size_t)s->cout + g * coutg) * pout;
        const float *w = j->w + g * cing * coutg * kv + c0 * kv;
        size_t rows = (c1 - c0) * kv;
        for (size_t c = c0; c < c1; c++) {
            float bv = j->bias ? j->bias[g * coutg + c] : 0.0f;
            for (size_t i = 0; i < pout; i++)
                y[c * pout + i] = bv;
        }
        for (size_t q0 = 0; q0 < pin; q0 += j->qn) {
            size_t qn = q0 + j->qn <= pin ? j->qn : pin - q0;
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)rows, (int)qn, (int)cing,
                        1.0f, w, (int)(coutg * kv), x + q0, (int)pin, 0.0f, col, (int)qn);
            for (size_t r = 0; r < rows; r++) {
                size_t c = c0 + r / kv, kk = r % kv;
                int64_t kz = (int64_t)(kk / (size_t)(k[1] * k[2]));
                int64_t ky = (int64_t)(kk / (size_t)k[2] % (size_t)k[1]),
                        kx = (int64_t)(kk % (size_t)k[2]);
                float *yc = y + c * pout;
                const float *cr = col + r * qn;
                for (size_t q = 0; q < qn; q++) {
                    size_t qi = q0 + q;
                    int64_t iz = (int64_t)(qi / (size_t)(id[1] * id[2]));
                    int64_t iy = (int64_t)(qi / (size_t)id[2] % (size_t)id[1]);
                    int64_t ix = (int64_t)(qi % (size_t)id[2]);
                    int64_t oz = iz * st[0] - pb[0] + kz * dl[0];
                    int64_t oy = iy * st[1] - pb[1] + ky * dl[1];
                    int64_t ox = ix * st[2] - pb[2] + kx * dl[2];
                    if (oz < 0 || oz >= od[0] || oy < 0 || oy >= od[1] || ox < 0 || ox >= od[2])
                        continue;
                    yc[((size_t)oz * (size_t)od[1] + (size_t)oy) * (size_t)od[2] + (size_t)ox] +=
                        cr[q];
                }
            }
        }
        if (s->a.act != NN_ACT_NONE)
            for (size_t c = c0; c < c1; c++)
                act_row(y + c * pout, pout, 0.0f, s->a.act, s->a.alpha);
    }
}

static void run_convt(const cpu_bm *b, const nn_step *s, const nn_bind *bd)
{
    convt_job j = {.s = s,
                   .x = bd->in[0],
                   .w = bd->in[1],
                   .bias = s->nin > 2 ? bd->in[2] : NULL,
                   .y = bd->out,
                   .scratch = bd->scratch};
    size_t coutg = (size_t)(s->cout / s->group), kv = (size_t)(s->k[0] * s->k[1] * s->k[2]);
    convt_dims(s, b->threads, &j.cb, &j.qn);
    j.ncb = (coutg + j.cb - 1) / j.cb;
    j.per_part = j.cb * kv * j.qn;
    ref_run_units(b->threads, (size_t)s->n * (size_t)s->group * j.ncb, 1, convt_part, &j);
}

/* --- normalisation, activations ------------------------------------------------------------ */

typedef struct ew_job {
    const nn_step *s;
    const float *x, *p1, *p2;
    float *y;
    size_t inner;
} ew_job;

static void inorm_part(void *arg, int part, size_t begin, size_t end)
{
    const ew_job *j = arg;
    const nn_step *s = j->s;
    (void)part;
    for (size_t u = begin; u < end; u++) {
        size_t c = u % (size_t)s->cin;
        const float *x = j->x + u * j->inner;
        float *y = j->y + u * j->inner;
        double sum = 0, sq = 0;
        for (size_t i = 0; i < j->inner; i++)
            sum += x[i];
        double mean = sum / (double)j->inner;
        for (size_t i = 0; i < j->inner; i++) {
            double d = x[i] - mean;
            sq += d * d;
        }
        double var = sq / (double)j->inner;
        float sc = (float)((double)j->p1[c] / sqrt(var + (double)s->a.eps));
        float sh = (float)((double)j->p2[c] - mean * (double)sc);
        for (size_t i = 0; i < j->inner; i++)
            y[i] = act(x[i] * sc + sh, s->a.act, s->a.alpha);
    }
}

static void affine_part(void *arg, int part, size_t begin, size_t end)
{
    const ew_job *j = arg;
    const nn_step *s = j->s;
    (void)part;
    size_t C = (size_t)s->cin;
    for (size_t u = begin; u < end; u++) {
        size_t c = u % C;
        const float *x = j->x + u * j->inner;
        float *y = j->y + u * j->inner;
        float sc = j->p1[c], sh = j->p1[C + c];
        for (size_t i = 0; i < j->inner; i++)
            y[i] = act(x[i] * sc + sh, s->a.act, s->a.alpha);
    }
}

static void act_part(void *arg, int part, size_t begin, size_t end)
{
    const ew_job *j = arg;
    (void)part;
    for (size_t i = begin; i < end; i++)
        j->y[i] = act(j->x[i], j->s->a.act, j->s->a.alpha);
}

/* --- broadcasting binary operators ----------------------------------------------------------- */

typedef struct bin_job {
    nn_opk op;
    const float *a, *b;
    float *y;
    int r;
    int64_t d[NN_MAX_RT_RANK], sa[NN_MAX_RT_RANK], sb[NN_MAX_RT_RANK];
} bin_job;

static inline float bin(nn_opk op, float a, float b)
{
    switch (op) {
    case NN_OP_ADD:
        return a + b;
    case NN_OP_SUB:
        return a - b;
    case NN_OP_MUL:
        return a * b;
    case NN_OP_DIV:
        return a / b;
    default: /* PRelu */
        return a < 0 ? a * b : a;
    }
}

static void bin_part(void *arg, int part, size_t begin, size_t end)
{
    const bin_job *j = arg;
    int r = j->r;
    size_t w = (size_t)j->d[r - 1];
    int64_t la = j->sa[r - 1], lb = j->sb[r - 1];
    (void)part;
    for (size_t row = begin; row < end; row++) {
        size_t rem = row, oa = 0, ob = 0;
        for (int k = r - 2; k >= 0; k--) {
            size_t ix = rem % (size_t)j->d[k];
            rem /= (size_t)j->d[k];
            oa += ix * (size_t)j->sa[k];
            ob += ix * (size_t)j->sb[k];
        }
        const float *a = j->a + oa, *b = j->b + ob;
        float *y = j->y + row * w;
        if (la == 1 && lb == 1)
            for (size_t i = 0; i < w; i++)
                y[i] = bin(j->op, a[i], b[i]);
        else if (la == 1)
            for (size_t i = 0; i < w; i++)
                y[i] = bin(j->op, a[i], b[0]);
        else
            for (size_t i = 0; i < w; i++)
                y[i] = bin(j->op, a[i * (size_t)la], b[i * (size_t)lb]);
    }
}

static void strides_for(const nn_shape *s, int r, int64_t *st)
{
    int64_t acc = 1;
    for (int i = r - 1; i >= 0; i--) {
        int j = i - (r - s->rank);
        int64_t d = j >= 0 ? s->d[j] : 1;
        st[i] = d == 1 ? 0 : acc;
        acc *= d;
    }
}

static void run_binary(const cpu_bm *b, const nn_step *s, const nn_bind *bd)
{
    bin_job j = {.op = s->op, .a = bd->in[0], .b = bd->in[1], .y = bd->out};
    const nn_shape *o = &s->out.sh;
    j.r = o->rank ? o->rank : 1;
    for (int i = 0; i < j.r; i++)
        j.d[i] = o->rank ? o->d[i] : 1;
    strides_for(&s->in[0].sh, j.r, j.sa);
    strides_for(&s->in[1].sh, j.r, j.sb);
    if (j.d[j.r - 1] > 1 && j.sa[j.r - 1] == 0) { /* keep a's walk simple: a is contiguous or
                                                     broadcast along the last axis too */
        /* fall through: the generic loop handles any stride */
    }
    size_t count = nn_shape_count(o);
    if (!count)
        return;
    size_t rows = count / (size_t)j.d[j.r - 1];
    ref_run_units(b->threads, rows, (size_t)(4096 / j.d[j.r - 1]) + 1, bin_part, &j);
}

/* --- concat, softmax, argmax --------------------------------------------------------------- */

typedef struct cat_job {
    const nn_step *s;
    const float *const *in;
    float *y;
} cat_job;

static void cat_part(void *arg, int part, size_t begin, size_t end)
{
    const cat_job *j = arg;
    const nn_step *s = j->s;
    int64_t ax = s->a.axis, total = s->out.sh.d[ax];
    (void)part;
    for (size_t o = begin; o < end; o++) {
        float *dst = j->y + o * (size_t)total * (size_t)s->inner;
        for (int k = 0; k < s->nin; k++) {
            size_t blk = (size_t)s->in[k].sh.d[ax] * (size_t)s->inner;
            memcpy(dst, j->in[k] + o * blk, blk * sizeof(float));
            dst += blk;
        }
    }
}

#define SM_BLOCK 256

typedef struct red_job {
    const nn_step *s;
    const float *x;
    float *y;
    size_t nblk;
} red_job;

/* Softmax over len with stride inner: units are (outer, block of inner positions). */
static void softmax_part(void *arg, int part, size_t begin, size_t end)
{
    const red_job *j = arg;
    size_t len = (size_t)j->s->len, inner = (size_t)j->s->inner;
    float mx[SM_BLOCK], sum[SM_BLOCK];
    (void)part;
    for (size_t u = begin; u < end; u++) {
        size_t o = u / j->nblk, i0 = (u % j->nblk) * SM_BLOCK;
        size_t bn = i0 + SM_BLOCK <= inner ? SM_BLOCK : inner - i0;
        const float *x = j->x + o * len * inner + i0;
        float *y = j->y + o * len * inner + i0;
        for (size_t i = 0; i < bn; i++) {
            mx[i] = -INFINITY;
            sum[i] = 0;
        }
        for (size_t c = 0; c < len; c++)
            for (size_t i = 0; i < bn; i++)
                mx[i] = x[c * inner + i] > mx[i] ? x[c * inner + i] : mx[i];
        for (size_t c = 0; c < len; c++)
            for (size_t i = 0; i < bn; i++) {
                float e = expf(x[c * inner + i] - mx[i]);
                y[c * inner + i] = e;
                sum[i] += e;
            }
        for (size_t i = 0; i < bn; i++)
            sum[i] = 1.0f / sum[i];
        for (size_t c = 0; c < len; c++)
            for (size_t i = 0; i < bn; i++)
                y[c * inner + i] *= sum[i];
    }
}

static void argmax_part(void *arg, int part, size_t begin, size_t end)
{
    const red_job *j = arg;
    size_t len = (size_t)j->s->len, inner = (size_t)j->s->inner;
    int last = j->s->a.select_last;
    (void)part;
    for (size_t u = begin; u < end; u++) {
        size_t o = u / inner, i = u % inner;
        const float *x = j->x + o * len * inner + i;
        size_t best = 0;
        float bv = x[0];
        for (size_t c = 1; c < len; c++) {
            float v = x[c * inner];
            if (v > bv || (last && v == bv) || (isnan(bv) && !isnan(v))) {
                bv = v;
                best = c;
            }
        }
        j->y[o * inner + i] = (float)best;
    }
}

/* --- pools ------------------------------------------------------------------------------- */

static void pool_part(void *arg, int part, size_t begin, size_t end)
{
    const ew_job *j = arg;
    const nn_step *s = j->s;
    const int64_t *id = s->id, *od = s->od, *k = s->k, *st = s->s, *dl = s->dl, *pb = s->pb,
                  *pe = s->pe;
    int mx = s->op == NN_OP_MAXPOOL, incl = s->a.count_include_pad;
    size_t ip = (size_t)(id[0] * id[1] * id[2]), op = (size_t)(od[0] * od[1] * od[2]);
    (void)part;
    for (size_t u = begin; u < end; u++) { /* u = plane * od[0] + oz */
        size_t plane = u / (size_t)od[0];
        int64_t oz = (int64_t)(u % (size_t)od[0]);
        const float *x = j->x + plane * ip;
        float *y = j->y + plane * op + (size_t)oz * (size_t)(od[1] * od[2]);
        for (int64_t oy = 0; oy < od[1]; oy++)
            for (int64_t ox = 0; ox < od[2]; ox++) {
                int64_t o[3] = {oz, oy, ox}, lo[3], hi[3], cnt_pad = 1;
                for (int a = 0; a < 3; a++) {
                    lo[a] = o[a] * st[a] - pb[a];
                    hi[a] = lo[a] + (k[a] - 1) * dl[a]; /* inclusive */
                    int64_t plo = lo[a] < -pb[a] ? -pb[a] : lo[a];
                    int64_t phi = hi[a] > id[a] - 1 + pe[a] ? id[a] - 1 + pe[a] : hi[a];
                    cnt_pad *= phi >= plo ? (phi - plo) / dl[a] + 1 : 0;
                }
                float best = -INFINITY;
                double sum = 0;
                int64_t cnt = 0;
                for (int64_t z = lo[0]; z <= hi[0]; z += dl[0]) {
                    if (z < 0 || z >= id[0])
                        continue;
                    for (int64_t yy = lo[1]; yy <= hi[1]; yy += dl[1]) {
                        if (yy < 0 || yy >= id[1])
                            continue;
                        const float *r =
                            x + ((size_t)z * (size_t)id[1] + (size_t)yy) * (size_t)id[2];
                        for (int64_t xx = lo[2]; xx <= hi[2]; xx += dl[2]) {
                            if (xx < 0 || xx >= id[2])
                                continue;
                            float v = r[xx];
                            best = v > best ? v : best;
                            sum += v;
                            cnt++;
                        }
                    }
                }
                y[oy * od[2] + ox] =
                    mx ? best : (float)(sum / (double)(incl ? cnt_pad : (cnt ? cnt : 1)));
            }
    }
}

/* --- resize ------------------------------------------------------------------------------- */

typedef struct rs_axis {
    int64_t *i0, *i1;
    float *t;
} rs_axis;

typedef struct rs_job {
    const nn_step *s;
    const float *x;
    float *y;
    rs_axis ax[3];
} rs_job;

static float src_coord(nn_coord m, int64_t x, float scale, int64_t in, int64_t out)
{
    switch (m) {
    case NN_COORD_HALF_PIXEL:
        return ((float)x + 0.5f) / scale - 0.5f;
    case NN_COORD_PYTORCH_HALF_PIXEL:
        return out > 1 ? ((float)x + 0.5f) / scale - 0.5f : 0.0f;
    case NN_COORD_ALIGN_CORNERS:
        return out == 1 ? 0.0f : (float)x * (float)(in - 1) / (float)(out - 1);
    case NN_COORD_TF_HALF_PIXEL_NN:
        return ((float)x + 0.5f) / scale;
    default:
        return (float)x / scale;
    }
}

static int64_t clampi(int64_t v, int64_t lo, int64_t hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

static void rs_part(void *arg, int part, size_t begin, size_t end)
{
    const rs_job *j = arg;
    const nn_step *s = j->s;
    const int64_t *id = s->id, *od = s->od;
    size_t ip = (size_t)(id[0] * id[1] * id[2]), op = (size_t)(od[0] * od[1] * od[2]);
    (void)part;
    for (size_t u = begin; u < end; u++) {
        size_t plane = u / (size_t)od[0];
        int64_t oz = (int64_t)(u % (size_t)od[0]);
        const float *x = j->x + plane * ip;
        float *y = j->y + plane * op + (size_t)oz * (size_t)(od[1] * od[2]);
        for (int64_t oy = 0; oy < od[1]; oy++)
            for (int64_t ox = 0; ox < od[2]; ox++) {
                float v;
                if (!s->a.linear) {
                    v = x[((size_t)j->ax[0].i0[oz] * (size_t)id[1] + (size_t)j->ax[1].i0[oy]) *
                              (size_t)id[2] +
                          (size_t)j->ax[2].i0[ox]];
                } else {
                    float acc = 0;
                    for (int c = 0; c < 8; c++) {
                        int bz = c >> 2, by = (c >> 1) & 1, bx = c & 1;
                        float w = (bz ? j->ax[0].t[oz] : 1 - j->ax[0].t[oz]) *
                                  (by ? j->ax[1].t[oy] : 1 - j->ax[1].t[oy]) *
                                  (bx ? j->ax[2].t[ox] : 1 - j->ax[2].t[ox]);
                        if (w == 0)
                            continue;
                        int64_t zz = bz ? j->ax[0].i1[oz] : j->ax[0].i0[oz];
                        int64_t yy = by ? j->ax[1].i1[oy] : j->ax[1].i0[oy];
                        int64_t xx = bx ? j->ax[2].i1[ox] : j->ax[2].i0[ox];
                        acc += w * x[((size_t)zz * (size_t)id[1] + (size_t)yy) * (size_t)id[2] +
                                     (size_t)xx];
                    }
                    v = acc;
                }
                y[oy * od[2] + ox] = v;
            }
    }
}

static lc_rc run_resize(const cpu_bm *b, const nn_step *s, const nn_bind *bd, lc_err *err)
{
    rs_job j = {.s = s, .x = bd->in[0], .y = bd->out};
    size_t tot = (size_t)(s->od[0] + s->od[1] + s->od[2]);
    int64_t *ib = malloc(2 * tot * sizeof(int64_t));
    float *tb = malloc(tot * sizeof(float));
    if (!ib || !tb) {
        free(ib);
        free(tb);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    size_t at = 0;
    for (int a = 0; a < 3; a++) {
        rs_axis *ax = &j.ax[a];
        ax->i0 = ib + at;
        ax->i1 = ib + tot + at;
        ax->t = tb + at;
        int64_t in = s->id[a], out = s->od[a];
        for (int64_t o = 0; o < out; o++) {
            float x = in == out && s->rscale[a] == 1.0f
                          ? (float)o
                          : src_coord(s->a.coord, o, s->rscale[a], in, out);
            if (!s->a.linear) {
                float r;
                switch (s->a.nearest) {
                case NN_ROUND_PREFER_CEIL:
                    r = floorf(x + 0.5f);
                    break;
                case NN_ROUND_FLOOR:
                    r = floorf(x);
                    break;
                case NN_ROUND_CEIL:
                    r = ceilf(x);
                    break;
                default:
                    r = ceilf(x - 0.5f);
                    break;
                }
                ax->i0[o] = clampi((int64_t)fmaxf(fminf(r, 4e9f), -4e9f), 0, in - 1);
                ax->i1[o] = ax->i0[o];
                ax->t[o] = 0;
            } else {
                if (!(x > 0))
                    x = 0;
                if (x > (float)(in - 1))
                    x = (float)(in - 1);
                float f = floorf(x);
                ax->i0[o] = clampi((int64_t)f, 0, in - 1);
                ax->i1[o] = ax->i0[o] + 1 < in ? ax->i0[o] + 1 : in - 1;
                ax->t[o] = x - f;
            }
        }
        at += (size_t)out;
    }
    ref_run_units(b->threads, (size_t)(s->n * s->cin * s->od[0]), 1, rs_part, &j);
    free(ib);
    free(tb);
    return LC_OK;
}

/* --- the backend table ---------------------------------------------------------------------- */

static lc_rc cpu_prepare(void *bm, nn_step *s, lc_err *err)
{
    const cpu_bm *b = bm;
    (void)err;
    s->scratch = 0;
    if (s->op == NN_OP_CONV && !pointwise(s)) {
        size_t K, P, cn;
        conv_dims(s, b->threads, &K, &P, &cn);
        s->scratch = (size_t)b->threads * K * cn * sizeof(float);
    } else if (s->op == NN_OP_CONVT) {
        size_t cb, qn, kv = (size_t)(s->k[0] * s->k[1] * s->k[2]);
        convt_dims(s, b->threads, &cb, &qn);
        s->scratch = (size_t)b->threads * cb * kv * qn * sizeof(float);
    }
    return LC_OK;
}

static void cpu_release(void *bm, nn_step *s)
{
    (void)bm;
    (void)s;
}

static lc_rc cpu_run(void *bm, const nn_step *s, const nn_bind *bd, lc_err *err)
{
    const cpu_bm *b = bm;
    size_t count = nn_shape_count(&s->out.sh);
    ew_job e = {.s = s, .x = bd->in[0], .y = bd->out};

    switch (s->op) {
    case NN_OP_CONV:
        run_conv(b, s, bd);
        return LC_OK;
    case NN_OP_CONVT:
        run_convt(b, s, bd);
        return LC_OK;
    case NN_OP_INORM:
        e.p1 = bd->in[1];
        e.p2 = bd->in[2];
        e.inner = (size_t)s->inner;
        ref_run_units(b->threads, (size_t)(s->n * s->cin), 1, inorm_part, &e);
        return LC_OK;
    case NN_OP_BNORM:
        e.p1 = bd->in[1];
        e.inner = (size_t)s->inner;
        ref_run_units(b->threads, (size_t)(s->n * s->cin), 1, affine_part, &e);
        return LC_OK;
    case NN_OP_RELU:
    case NN_OP_LEAKY:
    case NN_OP_SIGMOID:
        ref_run(b->threads, count, act_part, &e);
        return LC_OK;
    case NN_OP_PRELU:
    case NN_OP_ADD:
    case NN_OP_SUB:
    case NN_OP_MUL:
    case NN_OP_DIV:
        run_binary(b, s, bd);
        return LC_OK;
    case NN_OP_CONCAT: {
        cat_job j = {.s = s, .in = bd->in, .y = bd->out};
        ref_run_units(b->threads, (size_t)s->outer, 1, cat_part, &j);
        return LC_OK;
    }
    case NN_OP_SOFTMAX: {
        red_job j = {.s = s, .x = bd->in[0], .y = bd->out};
        j.nblk = ((size_t)s->inner + SM_BLOCK - 1) / SM_BLOCK;
        ref_run_units(b->threads, (size_t)s->outer * j.nblk, 1, softmax_part, &j);
        return LC_OK;
    }
    case NN_OP_ARGMAX: {
        red_job j = {.s = s, .x = bd->in[0], .y = bd->out};
        ref_run_units(b->threads, (size_t)(s->outer * s->inner), 1024, argmax_part, &j);
        return LC_OK;
    }
    case NN_OP_MAXPOOL:
    case NN_OP_AVGPOOL:
    case NN_OP_GAP:
        ref_run_units(b->threads, (size_t)(s->n * s->cin * s->od[0]), 1, pool_part, &e);
        return LC_OK;
    case NN_OP_RESIZE:
        return run_resize(b, s, bd, err);
    default:
        return lc_err_set(err, LC_ERR_INTERNAL, "the CPU backend has no kernel for %s",
                          s->node->op_type);
    }
}

/* --- sliding window ----------------------------------------------------------------------- */

typedef struct win_job {
    const nn_patch *p;
    const float *img, *logits, *gauss;
    float *dst, *acc, *wsum;
    uint8_t *labels;
    float *probs;
    int nc, softmax;
    float w;
    size_t nvox;
} win_job;

/* Position along axis a of patch index i, mirrored when the flip bit is set. */
static inline int64_t mir(const nn_patch *p, int a, int64_t i)
{
    static const int bit[3] = {4, 2, 1};
    return p->flip & bit[a] ? p->ps[a] - 1 - i : i;
}

static void crop_part(void *arg, int part, size_t begin, size_t end)
{
    const win_job *j = arg;
    const nn_patch *p = j->p;
    (void)part;
    for (size_t z = begin; z < end; z++)
        for (int64_t y = 0; y < p->ps[1]; y++) {
            float *dst = j->dst + ((size_t)z * (size_t)p->ps[1] + (size_t)y) * (size_t)p->ps[2];
            int64_t vz = p->org[0] + mir(p, 0, (int64_t)z), vy = p->org[1] + mir(p, 1, y);
            if (vz < 0 || vz >= p->vd[0] || vy < 0 || vy >= p->vd[1]) {
                memset(dst, 0, (size_t)p->ps[2] * sizeof(float));
                continue;
            }
            const float *row =
                j->img + ((size_t)vz * (size_t)p->vd[1] + (size_t)vy) * (size_t)p->vd[2];
            for (int64_t x = 0; x < p->ps[2]; x++) {
                int64_t vx = p->org[2] + mir(p, 2, x);
                dst[x] = vx >= 0 && vx < p->vd[2] ? row[vx] : 0.0f;
            }
        }
}

static lc_rc cpu_win_crop(void *bm, const float *img, const nn_patch *p, float *dst, lc_err *err)
{
    const cpu_bm *b = bm;
    win_job j = {.p = p, .img = img, .dst = dst};
    (void)err;
    ref_run_units(b->threads, (size_t)p->ps[0], 1, crop_part, &j);
    return LC_OK;
}

static void accum_part(void *arg, int part, size_t begin, size_t end)
{
    const win_job *j = arg;
    const nn_patch *p = j->p;
    size_t pv = (size_t)(p->ps[0] * p->ps[1] * p->ps[2]);
    size_t nvox = (size_t)(p->vd[0] * p->vd[1] * p->vd[2]);
    float prob[256];
    (void)part;
    for (size_t z = begin; z < end; z++) {
        int64_t vz = p->org[0] + (int64_t)z;
        if (vz < 0 || vz >= p->vd[0])
            continue;
        for (int64_t y = 0; y < p->ps[1]; y++) {
            int64_t vy = p->org[1] + y;
            if (vy < 0 || vy >= p->vd[1])
                continue;
            for (int64_t x = 0; x < p->ps[2]; x++) {
                int64_t vx = p->org[2] + x;
                if (vx < 0 || vx >= p->vd[2])
                    continue;
                /* the model saw voxel (z, y, x) at its mirrored position */
                size_t q =
                    ((size_t)z * (size_t)p->ps[1] + (size_t)y) * (size_t)p->ps[2] + (size_t)x;
                size_t qm =
                    ((size_t)mir(p, 0, (int64_t)z) * (size_t)p->ps[1] + (size_t)mir(p, 1, y)) *
                        (size_t)p->ps[2] +
                    (size_t)mir(p, 2, x);
                float g = j->w * j->gauss[q];
                size_t v =
                    ((size_t)vz * (size_t)p->vd[1] + (size_t)vy) * (size_t)p->vd[2] + (size_t)vx;
                if (j->softmax) {
                    float mx = -INFINITY, sum = 0;
                    for (int c = 0; c < j->nc; c++)
                        mx = j->logits[(size_t)c * pv + qm] > mx ? j->logits[(size_t)c * pv + qm]
                                                                 : mx;
                    for (int c = 0; c < j->nc; c++) {
                        prob[c] = expf(j->logits[(size_t)c * pv + qm] - mx);
                        sum += prob[c];
                    }
                    float inv = g / sum;
                    for (int c = 0; c < j->nc; c++)
                        j->acc[(size_t)c * nvox + v] += prob[c] * inv;
                } else {
                    for (int c = 0; c < j->nc; c++)
                        j->acc[(size_t)c * nvox + v] += g * j->logits[(size_t)c * pv + qm];
                }
                if (j->wsum)
                    j->wsum[v] += g;
            }
        }
    }
}

static lc_rc cpu_win_accum(void *bm, const float *logits, int nc, int softmax, const nn_patch *p,
                           const float *gauss, float w, float *acc, float *wsum, lc_err *err)
{
    const cpu_bm *b = bm;
    if (nc > 256)
        return lc_err_set(err, LC_ERR_UNSUPPORTED, "%d classes: at most 256", nc);
    win_job j = {.p = p,
                 .logits = logits,
                 .gauss = gauss,
                 .acc = acc,
                 .wsum = wsum,
                 .nc = nc,
                 .softmax = softmax,
                 .w = w};
    ref_run_units(b->threads, (size_t)p->ps[0], 1, accum_part, &j);
    return LC_OK;
}

static void finish_part(void *arg, int part, size_t begin, size_t end)
{
    const win_job *j = arg;
    (void)part;
    for (size_t v = begin; v < end; v++) {
        float inv = j->wsum[v] > 0 ? 1.0f / j->wsum[v] : 0.0f, best = -INFINITY;
        int bc = 0;
        for (int c = 0; c < j->nc; c++) {
            float a = j->acc[(size_t)c * j->nvox + v];
            if (a > best) {
                best = a;
                bc = c;
            }
            if (j->probs)
                j->probs[(size_t)c * j->nvox + v] = a * inv;
        }
        j->labels[v] = (uint8_t)bc;
    }
}

static lc_rc cpu_win_finish(void *bm, float *acc, const float *wsum, int nc, size_t nvox,
                            float *probs, uint8_t *labels, lc_err *err)
{
    const cpu_bm *b = bm;
    win_job j = {.acc = acc,
                 .wsum = (float *)(uintptr_t)wsum,
                 .nc = nc,
                 .nvox = nvox,
                 .probs = probs,
                 .labels = labels};
    (void)err;
    ref_run(b->threads, nvox, finish_part, &j);
    return LC_OK;
}

const nn_backend nn_cpu_backend = {
    .name = "cpu",
    .model_open = cpu_open,
    .model_close = cpu_close,
    .prepare = cpu_prepare,
    .release = cpu_release,
    .run = cpu_run,
    .win_crop = cpu_win_crop,
    .win_accum = cpu_win_accum,
    .win_finish = cpu_win_finish,
    .sync = NULL,
    .set_half = NULL,
};
