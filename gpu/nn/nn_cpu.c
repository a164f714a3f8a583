/*
 * nn_cpu.c: the engine's CPU backend: every step on host memory. Convolutions and transposed
 * convolutions run on oneDNN (nn_dnnl.c), everything else on our kernels. Activations between
 * oneDNN's steps stay channels-last (nn_cpu.h), the layout its fastest convolutions take: at
 * plan time prepare_plan makes a step's output channels-last when every reader takes it as is
 * (a convolution, or a step that works on either layout: instance and batch norm,
 * activations, same-shape arithmetic, channel concat) and plain otherwise; the graph's input
 * and output are plain. So a U-Net reorders nothing between its convolutions. Our kernels run
 * on the OpenMP threads oneDNN uses (par_parts): one pool of the context's thread count
 * serves every step, with the work split by sizes and thread count only.
 * Thread safety: calls on one model do not overlap.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "nn_cpu.h"
#include "ref/ref_internal.h"
#include "ref/ref_par.h"

typedef struct cpu_bm {
    int threads;
    nn_dnnl *dn;
} cpu_bm;

/* A step's CPU state (s->bs): its output layout and, for convolutions, oneDNN's primitive. */
typedef struct cpu_step {
    int cl; /* the output (and the data inputs of a layout-passing step) channels-last */
    nn_dnnl_conv *conv;
} cpu_step;

static lc_rc cpu_open(gpu_ctx *ctx, int allow_half, void **bm, lc_err *err)
{
    (void)allow_half;
    cpu_bm *b = calloc(1, sizeof(*b));
    if (!b)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    b->threads = ((const ref_impl *)ctx->impl)->threads;
    if (b->threads < 1)
        b->threads = 1;
    lc_rc rc = nn_dnnl_open(ctx, b->threads, &b->dn, err);
    if (rc != LC_OK) {
        free(b);
        return rc;
    }
    *bm = b;
    return LC_OK;
}

static void cpu_close(void *bm)
{
    cpu_bm *b = bm;
    if (!b)
        return;
    nn_dnnl_close(b->dn);
    free(b);
}

/* Our kernels' parallel loop: the parts gpu/ref's loops would make (ref_units_parts: fixed by
 * the sizes and the thread count, so results never depend on timing), run on the OpenMP
 * threads that oneDNN runs on rather than on threads of our own: libgomp's idle threads spin
 * for a while after each oneDNN call, and a second pool would compete with them for the
 * cores. Built without OpenMP (the clang fuzz build), the parts run in turn. */
static void par_parts(int np, size_t n, size_t chunk, ref_part_fn fn, void *arg)
{
    if (np == 1) { /* no team to wake */
        fn(arg, 0, 0, n);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(np) schedule(static, 1)
#endif
    for (int i = 0; i < np; i++) {
        size_t b = chunk * (size_t)i, e = chunk * (size_t)(i + 1);
        fn(arg, i, b < n ? b : n, i == np - 1 || e > n ? n : e);
    }
}

static void par_units(int threads, size_t units, size_t min_units, ref_part_fn fn, void *arg)
{
    int np = ref_units_parts(threads, units, min_units);
    par_parts(np, units, units / (size_t)np, fn, arg);
}

/* Voxel ranges, parts a multiple of 64 voxels long (as ref_run). */
static void par_voxels(int threads, size_t n, ref_part_fn fn, void *arg)
{
    int np = ref_parts(threads, n);
    par_parts(np, n, (n / (size_t)np + 63) / 64 * 64, fn, arg);
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

static int step_cl(const nn_step *s)
{
    const cpu_step *c = s->bs;
    return c && c->cl;
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
    if (step_cl(s)) { /* units: positions, C channels each */
        for (size_t u = begin; u < end; u++)
            for (size_t c = 0; c < C; c++)
                j->y[u * C + c] =
                    act(j->x[u * C + c] * j->p1[c] + j->p1[C + c], s->a.act, s->a.alpha);
        return;
    }
    for (size_t u = begin; u < end; u++) {
        size_t c = u % C;
        const float *x = j->x + u * j->inner;
        float *y = j->y + u * j->inner;
        float sc = j->p1[c], sh = j->p1[C + c];
        for (size_t i = 0; i < j->inner; i++)
            y[i] = act(x[i] * sc + sh, s->a.act, s->a.alpha);
    }
}

/* Four channels at a time, in GCC/Clang vector types (SSE on x86-64's baseline, which the
 * compiler does not vectorise these loops into by itself); loads and stores through memcpy,
 * so no alignment is assumed. */
typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));

static inline vf4 ld4(const float *p)
{
    vf4 v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline void st4(float *p, vf4 v)
{
    memcpy(p, &v, sizeof(v));
}

/* y[c] = act(x[c] * sc[c] + sh[c]) for the n channels of one position. */
static inline void norm_row(const float *x, float *y, size_t n, const float *sc, const float *sh,
                            nn_act a, float alpha)
{
    size_t c = 0;
    switch (a) {
    case NN_ACT_LEAKY: /* as act(): NaN stays NaN */
        for (; c + 4 <= n; c += 4) {
            vf4 v = ld4(x + c) * ld4(sc + c) + ld4(sh + c);
            vi4 neg = v < 0;
            st4(y + c, (vf4)((neg & (vi4)(v * alpha)) | (~neg & (vi4)v)));
        }
        break;
    case NN_ACT_RELU: /* as act(): NaN and negatives give +0 */
        for (; c + 4 <= n; c += 4) {
            vf4 v = ld4(x + c) * ld4(sc + c) + ld4(sh + c);
            st4(y + c, (vf4)((v > 0) & (vi4)v));
        }
        break;
    case NN_ACT_NONE:
        for (; c + 4 <= n; c += 4)
            st4(y + c, ld4(x + c) * ld4(sc + c) + ld4(sh + c));
        break;
    default:
        break;
    }
    for (; c < n; c++)
        y[c] = act(x[c] * sc[c] + sh[c], a, alpha);
}

/* Instance norm on the channels-last layout (N, positions, C): per sample the positions split
 * into fixed chunks; pass 1 sums each chunk's values and squares per channel (shifted by the
 * channel's first value; in float over runs of IN_RUN positions, then in double), the
 * chunks are merged in order on the calling thread, pass 2 normalises and activates. Fixed
 * chunks: the result does not depend on the thread count. */
#define IN_RUN    16
#define IN_TILE   64        /* channels summed at a time */
#define IN_FLOATS (1 << 16) /* floats a chunk holds, about (256 KiB: an L2's share) */
#define IN_PART   (1 << 18) /* floats a thread gets at least */

typedef struct incl_job {
    const nn_step *s;
    const float *x;
    float *y;
    size_t P, C, cp, nch; /* positions, channels, positions a chunk, chunks a sample */
    double *part;         /* per unit: C sums, then C sums of squares */
    const float *sc, *sh; /* per (n, c): y = act(x * sc + sh) */
} incl_job;

static size_t incl_chunk(size_t C)
{
    size_t cp = IN_FLOATS / (C ? C : 1) / IN_RUN * IN_RUN;
    return cp < IN_RUN ? IN_RUN : cp;
}

static void incl_stats_part(void *arg, int part, size_t begin, size_t end)
{
    const incl_job *j = arg;
    size_t C = j->C;
    (void)part;
    for (size_t u = begin; u < end; u++) {
        size_t n = u / j->nch, p0 = u % j->nch * j->cp;
        size_t p1 = p0 + j->cp < j->P ? p0 + j->cp : j->P;
        const float *xn = j->x + n * j->P * C; /* position 0: the shift */
        double *out = j->part + u * 2 * C;
        for (size_t c0 = 0; c0 < C; c0 += IN_TILE) {
            size_t cw = C - c0 < IN_TILE ? C - c0 : IN_TILE;
            double sd[IN_TILE] = {0}, qd[IN_TILE] = {0};
            for (size_t p = p0; p < p1; p += IN_RUN) {
                float fs[IN_TILE] = {0}, fq[IN_TILE] = {0};
                size_t pe = p + IN_RUN < p1 ? p + IN_RUN : p1;
                for (size_t i = p; i < pe; i++) {
                    const float *r = xn + i * C + c0, *r0 = xn + c0;
                    size_t c = 0;
                    for (; c + 4 <= cw; c += 4) {
                        vf4 d = ld4(r + c) - ld4(r0 + c);
                        st4(fs + c, ld4(fs + c) + d);
                        st4(fq + c, ld4(fq + c) + d * d);
                    }
                    for (; c < cw; c++) {
                        float d = r[c] - r0[c];
                        fs[c] += d;
                        fq[c] += d * d;
                    }
                }
                for (size_t c = 0; c < cw; c++) {
                    sd[c] += fs[c];
                    qd[c] += fq[c];
                }
            }
            for (size_t c = 0; c < cw; c++) {
                out[c0 + c] = sd[c];
                out[C + c0 + c] = qd[c];
            }
        }
    }
}

static void incl_norm_part(void *arg, int part, size_t begin, size_t end)
{
    const incl_job *j = arg;
    const nn_step *s = j->s;
    size_t C = j->C;
    (void)part;
    for (size_t u = begin; u < end; u++) {
        size_t n = u / j->nch, p0 = u % j->nch * j->cp;
        size_t p1 = p0 + j->cp < j->P ? p0 + j->cp : j->P;
        for (size_t p = p0; p < p1; p++)
            norm_row(j->x + (n * j->P + p) * C, j->y + (n * j->P + p) * C, C, j->sc + n * C,
                     j->sh + n * C, s->a.act, s->a.alpha);
    }
}

/* Scratch of the channels-last instance norm: the chunks' sums, then sc and sh. */
static size_t incl_scratch(const nn_step *s)
{
    size_t P = (size_t)s->inner, C = (size_t)s->cin, cp = incl_chunk(C);
    size_t nch = (P + cp - 1) / cp;
    return (size_t)s->n * nch * 2 * C * sizeof(double) + 2 * (size_t)s->n * C * sizeof(float);
}

static void run_inorm_cl(const cpu_bm *b, const nn_step *s, const nn_bind *bd)
{
    size_t P = (size_t)s->inner, C = (size_t)s->cin, N = (size_t)s->n, cp = incl_chunk(C);
    size_t nch = (P + cp - 1) / cp;
    double *part = bd->scratch;
    void *after = part + N * nch * 2 * C; /* sc, sh: floats after the doubles */
    float *sc = after, *sh = sc + N * C;
    incl_job j = {.s = s,
                  .x = bd->in[0],
                  .y = bd->out,
                  .P = P,
                  .C = C,
                  .cp = cp,
                  .nch = nch,
                  .part = part,
                  .sc = sc,
                  .sh = sh};
    const float *gamma = bd->in[1], *beta = bd->in[2];

    /* a part per IN_PART floats at least: below that a thread costs more than it saves */
    size_t per = (P < cp ? P : cp) * C, min_units = (IN_PART + per - 1) / (per ? per : 1);
    par_units(b->threads, N * nch, min_units, incl_stats_part, &j);
    for (size_t n = 0; n < N; n++)
        for (size_t c = 0; c < C; c++) {
            double sum = 0, sq = 0;
            for (size_t ch = 0; ch < nch; ch++) {
                sum += part[(n * nch + ch) * 2 * C + c];
                sq += part[(n * nch + ch) * 2 * C + C + c];
            }
            double dm = sum / (double)P, var = sq / (double)P - dm * dm;
            double mean = (double)j.x[n * P * C + c] + dm;
            float scale = (float)((double)gamma[c] / sqrt((var > 0 ? var : 0) + (double)s->a.eps));
            sc[n * C + c] = scale;
            sh[n * C + c] = (float)((double)beta[c] - mean * (double)scale);
        }
    par_units(b->threads, N * nch, min_units, incl_norm_part, &j);
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
    par_units(b->threads, rows, (size_t)(4096 / j.d[j.r - 1]) + 1, bin_part, &j);
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

/* Channel concat of channels-last tensors: units are positions (n, p), each gathering its
 * channels from every input in turn. */
static void cat_cl_part(void *arg, int part, size_t begin, size_t end)
{
    const cat_job *j = arg;
    const nn_step *s = j->s;
    size_t total = (size_t)s->out.sh.d[1];
    (void)part;
    for (size_t u = begin; u < end; u++) {
        float *dst = j->y + u * total;
        for (int k = 0; k < s->nin; k++) {
            size_t ck = (size_t)s->in[k].sh.d[1];
            memcpy(dst, j->in[k] + u * ck, ck * sizeof(float));
            dst += ck;
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
    par_units(b->threads, (size_t)(s->n * s->cin * s->od[0]), 1, rs_part, &j);
    free(ib);
    free(tb);
    return LC_OK;
}

/* --- the backend table ---------------------------------------------------------------------- */

static int same_shape(const nn_shape *a, const nn_shape *b)
{
    return a->rank == b->rank && memcmp(a->d, b->d, (size_t)a->rank * sizeof(int64_t)) == 0;
}

/* Steps that work on either layout, their output in the layout of their data inputs. */
static int passes_layout(const nn_step *s)
{
    switch (s->op) {
    case NN_OP_INORM:
    case NN_OP_BNORM:
    case NN_OP_RELU:
    case NN_OP_LEAKY:
    case NN_OP_SIGMOID:
    case NN_OP_ADD:
    case NN_OP_SUB:
    case NN_OP_MUL:
    case NN_OP_DIV:
        return 1;
    case NN_OP_CONCAT:
        return s->a.axis == 1;
    default:
        return 0;
    }
}

/* Inputs holding activations (the others are parameters: norms' scales and shifts). */
static int data_input(const nn_step *s, int k)
{
    return k == 0 || s->op == NN_OP_CONCAT ||
           (s->op >= NN_OP_ADD && s->op <= NN_OP_DIV && s->op != NN_OP_PRELU);
}

/* Whether step s may write its output channels-last: a convolution, or a layout-passing
 * step whose activation operands all have the output's shape (but for the concat axis). */
static int may_cl(const nn_step *s)
{
    const nn_shape *o = &s->out.sh;
    if (o->rank < 3 || o->rank > 5 || nn_shape_count(o) == 0)
        return 0;
    if (s->op == NN_OP_CONV || s->op == NN_OP_CONVT)
        return 1;
    if (!passes_layout(s))
        return 0;
    for (int k = 0; k < s->nin; k++)
        if (data_input(s, k) &&
            (s->in[k].is_const || (s->op != NN_OP_CONCAT && !same_shape(&s->in[k].sh, o))))
            return 0;
    return 1;
}

/* Output layouts: channels-last where may_cl allows, then made plain until consistent: a
 * step reading a channels-last output must take it as is (a convolution's input, or a
 * channels-last layout-passing step, with the producer's shape: no view between), a
 * layout-passing step is channels-last only if all its data inputs are, and the graph
 * output is plain. */
static void choose_layouts(const nn_plan *p, int *cl)
{
    size_t n = p->nsteps;
    for (size_t i = 0; i < n; i++)
        cl[i] = may_cl(&p->steps[i]);
    for (size_t i = n; i-- > 0;)
        if (p->steps[i].out.off == p->out_off) { /* the last writer of the output buffer */
            cl[i] = 0;
            break;
        }
    for (int changed = 1; changed;) {
        changed = 0;
        for (size_t j = 0; j < n; j++) {
            const nn_step *s = &p->steps[j];
            int conv = s->op == NN_OP_CONV || s->op == NN_OP_CONVT, pass = passes_layout(s);
            for (int k = 0; k < s->nin; k++) {
                if (s->in[k].is_const || !data_input(s, k))
                    continue;
                int i = s->in[k].from;
                int same = i >= 0 && same_shape(&s->in[k].sh, &p->steps[i].out.sh);
                int takes = same && ((conv && k == 0) || (pass && cl[j]));
                if (i >= 0 && cl[i] && !takes) {
                    cl[i] = 0;
                    changed = 1;
                }
                if (pass && cl[j] && !(i >= 0 && cl[i] && same)) {
                    cl[j] = 0;
                    changed = 1;
                }
            }
        }
    }
}

static void cpu_release(void *bm, nn_step *s)
{
    cpu_step *c = s->bs;
    if (c)
        nn_dnnl_conv_free(((cpu_bm *)bm)->dn, c->conv);
    free(c);
    s->bs = NULL;
}

static lc_rc cpu_prepare_plan(void *bm, nn_plan *p, lc_err *err)
{
    cpu_bm *b = bm;
    int *cl = calloc(p->nsteps + 1, sizeof(int));
    lc_rc rc = LC_OK;

    if (!cl)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    choose_layouts(p, cl);
    for (size_t i = 0; i < p->nsteps && rc == LC_OK; i++) {
        nn_step *s = &p->steps[i];
        int conv = s->op == NN_OP_CONV || s->op == NN_OP_CONVT;
        s->scratch = 0;
        if (!conv && !cl[i])
            continue;
        cpu_step *c = calloc(1, sizeof(*c));
        if (!c) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
            break;
        }
        c->cl = cl[i];
        s->bs = c;
        if (conv) {
            int from = s->in[0].from;
            rc = nn_dnnl_conv_new(b->dn, s, from >= 0 && cl[from], cl[i], &c->conv, &s->scratch,
                                  err);
        } else if (s->op == NN_OP_INORM) {
            s->scratch = incl_scratch(s);
        }
    }
    free(cl);
    return rc;
}

static lc_rc cpu_run(void *bm, const nn_step *s, const nn_bind *bd, lc_err *err)
{
    const cpu_bm *b = bm;
    size_t count = nn_shape_count(&s->out.sh);
    ew_job e = {.s = s, .x = bd->in[0], .y = bd->out};

    switch (s->op) {
    case NN_OP_CONV:
    case NN_OP_CONVT:
        return nn_dnnl_conv_run(b->dn, ((const cpu_step *)s->bs)->conv, s, bd->in[0], bd->out,
                                bd->scratch, err);
    case NN_OP_INORM:
        if (step_cl(s)) {
            run_inorm_cl(b, s, bd);
            return LC_OK;
        }
        e.p1 = bd->in[1];
        e.p2 = bd->in[2];
        e.inner = (size_t)s->inner;
        par_units(b->threads, (size_t)(s->n * s->cin), 1, inorm_part, &e);
        return LC_OK;
    case NN_OP_BNORM:
        e.p1 = bd->in[1];
        e.inner = (size_t)s->inner;
        par_units(b->threads, (size_t)(s->n * (step_cl(s) ? s->inner : s->cin)),
                  step_cl(s) ? 1024 : 1, affine_part, &e);
        return LC_OK;
    case NN_OP_RELU:
    case NN_OP_LEAKY:
    case NN_OP_SIGMOID:
        par_voxels(b->threads, count, act_part, &e);
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
        if (step_cl(s))
            par_units(b->threads, (size_t)(s->outer * s->inner), 1024, cat_cl_part, &j);
        else
            par_units(b->threads, (size_t)s->outer, 1, cat_part, &j);
        return LC_OK;
    }
    case NN_OP_SOFTMAX: {
        red_job j = {.s = s, .x = bd->in[0], .y = bd->out};
        j.nblk = ((size_t)s->inner + SM_BLOCK - 1) / SM_BLOCK;
        par_units(b->threads, (size_t)s->outer * j.nblk, 1, softmax_part, &j);
        return LC_OK;
    }
    case NN_OP_ARGMAX: {
        red_job j = {.s = s, .x = bd->in[0], .y = bd->out};
        par_units(b->threads, (size_t)(s->outer * s->inner), 1024, argmax_part, &j);
        return LC_OK;
    }
    case NN_OP_MAXPOOL:
    case NN_OP_AVGPOOL:
    case NN_OP_GAP:
        par_units(b->threads, (size_t)(s->n * s->cin * s->od[0]), 1, pool_part, &e);
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
    par_units(b->threads, (size_t)p->ps[0], 1, crop_part, &j);
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
    par_units(b->threads, (size_t)p->ps[0], 1, accum_part, &j);
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
    par_voxels(b->threads, nvox, finish_part, &j);
    return LC_OK;
}

const nn_backend nn_cpu_backend = {
    .name = "cpu",
    .model_open = cpu_open,
    .model_close = cpu_close,
    .prepare = NULL, /* prepare_plan */
    .release = cpu_release,
    .run = cpu_run,
    .win_crop = cpu_win_crop,
    .win_accum = cpu_win_accum,
    .win_finish = cpu_win_finish,
    .sync = NULL,
    .set_half = NULL,
    .prepare_plan = cpu_prepare_plan,
};
