/*
 * nn_kernels.cu: the inference engine's steps on CUDA other than convolutions (nn_cudnn.cu):
 * instance norm (one block per (n, c) plane, sums in double), per-channel affine, activations,
 * broadcasting binary operators, concatenation, softmax and argmax along an axis, pools,
 * nearest and linear resizing with the CPU's coordinate formulas, padding and cropping for
 * asymmetric convolutions, and the sliding window's patch cut, weighted softmax accumulation
 * and final normalisation + argmax. Grid-stride loops, one thread per output element unless
 * said; all queued on the context's stream.
 * Thread safety: a context is used by one host thread at a time.
 */
#include <math.h>
#include "nn_cuda.h"

#define NN_THREADS 256

__device__ static inline float d_act(float v, int a, float alpha)
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

#define GRID_LOOP(i, n)                                                                            \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                        \
         i += (size_t)gridDim.x * blockDim.x)

static lc_rc launched(gpu_cu_impl *c, lc_err *err, const char *what)
{
    (void)c;
    return gpu_cu_launched(err, what);
}

/* --- elementwise ---------------------------------------------------------------------------- */

__global__ static void k_bias_act(float *y, const float *bias, size_t n, size_t ch, size_t inner,
                                  int act, float alpha)
{
    GRID_LOOP(i, n)
    {
        float v = y[i] + (bias ? bias[(i / inner) % ch] : 0.0f);
        y[i] = d_act(v, act, alpha);
    }
}

lc_rc nn_cu_bias_act(gpu_cu_impl *c, float *y, const float *bias, int64_t n, int64_t ch,
                     int64_t inner, nn_act act, float alpha, lc_err *err)
{
    size_t tot = (size_t)(n * ch * inner);
    if (!bias && act == NN_ACT_NONE)
        return LC_OK;
    k_bias_act<<<gpu_cu_grid(c, tot), NN_THREADS, 0, c->stream>>>(y, bias, tot, (size_t)ch,
                                                                  (size_t)inner, (int)act, alpha);
    return launched(c, err, "run a bias and activation kernel");
}

__global__ static void k_act(const float *x, float *y, size_t n, int act, float alpha)
{
    GRID_LOOP(i, n)
    y[i] = d_act(x[i], act, alpha);
}

__global__ static void k_affine(const float *x, float *y, const float *st, size_t n, size_t ch,
                                size_t inner, int act, float alpha)
{
    GRID_LOOP(i, n)
    {
        size_t c = (i / inner) % ch;
        y[i] = d_act(x[i] * st[c] + st[ch + c], act, alpha);
    }
}

/* one block per (n, c) plane */
__global__ static void k_inorm(const float *x, float *y, const float *scale, const float *bias,
                               size_t ch, size_t inner, float eps, int act, float alpha)
{
    __shared__ double s1[NN_THREADS], s2[NN_THREADS];
    size_t plane = blockIdx.x, c = plane % ch;
    const float *xp = x + plane * inner;
    float *yp = y + plane * inner;
    double a = 0;
    for (size_t i = threadIdx.x; i < inner; i += blockDim.x)
        a += xp[i];
    s1[threadIdx.x] = a;
    __syncthreads();
    for (unsigned h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h)
            s1[threadIdx.x] += s1[threadIdx.x + h];
        __syncthreads();
    }
    double mean = s1[0] / (double)inner, b = 0;
    for (size_t i = threadIdx.x; i < inner; i += blockDim.x) {
        double d = xp[i] - mean;
        b += d * d;
    }
    s2[threadIdx.x] = b;
    __syncthreads();
    for (unsigned h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h)
            s2[threadIdx.x] += s2[threadIdx.x + h];
        __syncthreads();
    }
    double var = s2[0] / (double)inner;
    float sc = (float)((double)scale[c] / sqrt(var + (double)eps));
    float sh = (float)((double)bias[c] - mean * (double)sc);
    for (size_t i = threadIdx.x; i < inner; i += blockDim.x)
        yp[i] = d_act(xp[i] * sc + sh, act, alpha);
}

typedef struct bdims {
    int r;
    long long d[NN_MAX_RT_RANK], sa[NN_MAX_RT_RANK], sb[NN_MAX_RT_RANK];
} bdims;

__global__ static void k_binary(const float *a, const float *b, float *y, size_t n, bdims q, int op)
{
    GRID_LOOP(i, n)
    {
        size_t rem = i, oa = 0, ob = 0;
        for (int k = q.r - 1; k >= 0; k--) {
            size_t ix = rem % (size_t)q.d[k];
            rem /= (size_t)q.d[k];
            oa += ix * (size_t)q.sa[k];
            ob += ix * (size_t)q.sb[k];
        }
        float u = a[oa], v = b[ob], r;
        switch (op) {
        case NN_OP_ADD:
            r = u + v;
            break;
        case NN_OP_SUB:
            r = u - v;
            break;
        case NN_OP_MUL:
            r = u * v;
            break;
        case NN_OP_DIV:
            r = u / v;
            break;
        default:
            r = u < 0 ? u * v : u;
            break;
        }
        y[i] = r;
    }
}

static void bstrides(const nn_shape *s, int r, long long *st)
{
    long long acc = 1;
    for (int i = r - 1; i >= 0; i--) {
        int j = i - (r - s->rank);
        long long d = j >= 0 ? s->d[j] : 1;
        st[i] = d == 1 ? 0 : acc;
        acc *= d;
    }
}

/* --- concat, softmax, argmax ---------------------------------------------------------------- */

__global__ static void k_cat(const float *x, float *y, size_t outer, size_t blk, size_t total,
                             size_t at)
{
    GRID_LOOP(i, outer * blk)
    {
        size_t o = i / blk, k = i % blk;
        y[o * total + at + k] = x[i];
    }
}

__global__ static void k_softmax(const float *x, float *y, size_t outer, size_t len, size_t inner)
{
    GRID_LOOP(i, outer * inner)
    {
        size_t o = i / inner, j = i % inner;
        const float *xp = x + o * len * inner + j;
        float *yp = y + o * len * inner + j;
        float mx = -INFINITY, sum = 0;
        for (size_t c = 0; c < len; c++)
            mx = fmaxf(mx, xp[c * inner]);
        for (size_t c = 0; c < len; c++) {
            float e = expf(xp[c * inner] - mx);
            yp[c * inner] = e;
            sum += e;
        }
        float inv = 1.0f / sum;
        for (size_t c = 0; c < len; c++)
            yp[c * inner] *= inv;
    }
}

__global__ static void k_argmax(const float *x, float *y, size_t outer, size_t len, size_t inner,
                                int last)
{
    GRID_LOOP(i, outer * inner)
    {
        size_t o = i / inner, j = i % inner, best = 0;
        const float *xp = x + o * len * inner + j;
        float bv = xp[0];
        for (size_t c = 1; c < len; c++) {
            float v = xp[c * inner];
            if (v > bv || (last && v == bv) || (isnan(bv) && !isnan(v))) {
                bv = v;
                best = c;
            }
        }
        y[i] = (float)best;
    }
}

/* --- pools and resize ------------------------------------------------------------------------- */

typedef struct geo3 {
    long long id[3], od[3], k[3], s[3], dl[3], pb[3], pe[3];
} geo3;

__global__ static void k_pool(const float *x, float *y, size_t planes, geo3 g, int mx, int incl)
{
    size_t op = (size_t)(g.od[0] * g.od[1] * g.od[2]), ip = (size_t)(g.id[0] * g.id[1] * g.id[2]);
    GRID_LOOP(i, planes * op)
    {
        size_t p = i / op, r = i % op;
        long long o[3] = {(long long)(r / (size_t)(g.od[1] * g.od[2])),
                          (long long)(r / (size_t)g.od[2] % (size_t)g.od[1]),
                          (long long)(r % (size_t)g.od[2])};
        long long lo[3], hi[3], cntp = 1;
        for (int a = 0; a < 3; a++) {
            lo[a] = o[a] * g.s[a] - g.pb[a];
            hi[a] = lo[a] + (g.k[a] - 1) * g.dl[a];
            long long plo = lo[a] < -g.pb[a] ? -g.pb[a] : lo[a];
            long long phi = hi[a] > g.id[a] - 1 + g.pe[a] ? g.id[a] - 1 + g.pe[a] : hi[a];
            cntp *= phi >= plo ? (phi - plo) / g.dl[a] + 1 : 0;
        }
        const float *xp = x + p * ip;
        float best = -INFINITY;
        double sum = 0;
        long long cnt = 0;
        for (long long z = lo[0]; z <= hi[0]; z += g.dl[0]) {
            if (z < 0 || z >= g.id[0])
                continue;
            for (long long yy = lo[1]; yy <= hi[1]; yy += g.dl[1]) {
                if (yy < 0 || yy >= g.id[1])
                    continue;
                for (long long xx = lo[2]; xx <= hi[2]; xx += g.dl[2]) {
                    if (xx < 0 || xx >= g.id[2])
                        continue;
                    float v = xp[(z * g.id[1] + yy) * g.id[2] + xx];
                    best = fmaxf(best, v);
                    sum += v;
                    cnt++;
                }
            }
        }
        y[i] = mx ? best : (float)(sum / (double)(incl ? cntp : (cnt ? cnt : 1)));
    }
}

typedef struct rsq {
    long long id[3], od[3];
    float sc[3];
    int coord, nearest, linear;
} rsq;

__device__ static float d_src(int m, long long x, float scale, long long in, long long out)
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

__device__ static void d_axis(const rsq &q, int a, long long o, long long *i0, long long *i1,
                              float *t)
{
    long long in = q.id[a], out = q.od[a];
    float x = in == out && q.sc[a] == 1.0f ? (float)o : d_src(q.coord, o, q.sc[a], in, out);
    if (!q.linear) {
        float r;
        switch (q.nearest) {
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
        long long k = (long long)fmaxf(fminf(r, 4e9f), -4e9f);
        *i0 = *i1 = k < 0 ? 0 : k > in - 1 ? in - 1 : k;
        *t = 0;
        return;
    }
    if (!(x > 0))
        x = 0;
    if (x > (float)(in - 1))
        x = (float)(in - 1);
    float f = floorf(x);
    long long k = (long long)f;
    *i0 = k < 0 ? 0 : k > in - 1 ? in - 1 : k;
    *i1 = *i0 + 1 < in ? *i0 + 1 : in - 1;
    *t = x - f;
}

__global__ static void k_resize(const float *x, float *y, size_t planes, rsq q)
{
    size_t op = (size_t)(q.od[0] * q.od[1] * q.od[2]), ip = (size_t)(q.id[0] * q.id[1] * q.id[2]);
    GRID_LOOP(i, planes * op)
    {
        size_t p = i / op, r = i % op;
        long long o[3] = {(long long)(r / (size_t)(q.od[1] * q.od[2])),
                          (long long)(r / (size_t)q.od[2] % (size_t)q.od[1]),
                          (long long)(r % (size_t)q.od[2])};
        long long a0[3], a1[3];
        float t[3];
        for (int a = 0; a < 3; a++)
            d_axis(q, a, o[a], &a0[a], &a1[a], &t[a]);
        const float *xp = x + p * ip;
        float acc = 0;
        for (int cnr = 0; cnr < (q.linear ? 8 : 1); cnr++) {
            int bz = cnr >> 2, by = (cnr >> 1) & 1, bx = cnr & 1;
            float w = q.linear
                          ? (bz ? t[0] : 1 - t[0]) * (by ? t[1] : 1 - t[1]) * (bx ? t[2] : 1 - t[2])
                          : 1.0f;
            if (w == 0)
                continue;
            long long zz = bz ? a1[0] : a0[0], yy = by ? a1[1] : a0[1], xx = bx ? a1[2] : a0[2];
            acc += w * xp[(zz * q.id[1] + yy) * q.id[2] + xx];
        }
        y[i] = acc;
    }
}

/* --- padding and cropping for asymmetric convolutions -------------------------------------- */

typedef struct pad3 {
    long long d[3], pb[3], pd[3];
} pad3;

__global__ static void k_pad(const float *src, float *dst, size_t planes, pad3 q)
{
    size_t op = (size_t)(q.pd[0] * q.pd[1] * q.pd[2]), ip = (size_t)(q.d[0] * q.d[1] * q.d[2]);
    GRID_LOOP(i, planes * op)
    {
        size_t p = i / op, r = i % op;
        long long z = (long long)(r / (size_t)(q.pd[1] * q.pd[2])) - q.pb[0];
        long long y = (long long)(r / (size_t)q.pd[2] % (size_t)q.pd[1]) - q.pb[1];
        long long x = (long long)(r % (size_t)q.pd[2]) - q.pb[2];
        int in = z >= 0 && y >= 0 && x >= 0 && z < q.d[0] && y < q.d[1] && x < q.d[2];
        dst[i] = in ? src[p * ip + (size_t)((z * q.d[1] + y) * q.d[2] + x)] : 0.0f;
    }
}

lc_rc nn_cu_pad(gpu_cu_impl *c, const float *src, float *dst, int64_t planes, const int64_t *d,
                const int64_t *pb, const int64_t *pd, lc_err *err)
{
    pad3 q;
    for (int a = 0; a < 3; a++) {
        q.d[a] = d[a];
        q.pb[a] = pb[a];
        q.pd[a] = pd[a];
    }
    size_t n = (size_t)(planes * pd[0] * pd[1] * pd[2]);
    k_pad<<<gpu_cu_grid(c, n), NN_THREADS, 0, c->stream>>>(src, dst, (size_t)planes, q);
    return launched(c, err, "run the padding kernel");
}

__global__ static void k_crop(const float *src, float *dst, size_t planes, pad3 q)
{
    /* q.d: full dims, q.pb: offsets, q.pd: output dims */
    size_t op = (size_t)(q.pd[0] * q.pd[1] * q.pd[2]), ip = (size_t)(q.d[0] * q.d[1] * q.d[2]);
    GRID_LOOP(i, planes * op)
    {
        size_t p = i / op, r = i % op;
        long long z = (long long)(r / (size_t)(q.pd[1] * q.pd[2])) + q.pb[0];
        long long y = (long long)(r / (size_t)q.pd[2] % (size_t)q.pd[1]) + q.pb[1];
        long long x = (long long)(r % (size_t)q.pd[2]) + q.pb[2];
        dst[i] = src[p * ip + (size_t)((z * q.d[1] + y) * q.d[2] + x)];
    }
}

lc_rc nn_cu_crop(gpu_cu_impl *c, const float *src, float *dst, int64_t planes, const int64_t *fd,
                 const int64_t *off, const int64_t *od, lc_err *err)
{
    pad3 q;
    for (int a = 0; a < 3; a++) {
        q.d[a] = fd[a];
        q.pb[a] = off[a];
        q.pd[a] = od[a];
    }
    size_t n = (size_t)(planes * od[0] * od[1] * od[2]);
    k_crop<<<gpu_cu_grid(c, n), NN_THREADS, 0, c->stream>>>(src, dst, (size_t)planes, q);
    return launched(c, err, "run the cropping kernel");
}

/* --- steps ------------------------------------------------------------------------------------ */

static geo3 geo_of(const nn_step *s)
{
    geo3 g;
    for (int a = 0; a < 3; a++) {
        g.id[a] = s->id[a];
        g.od[a] = s->od[a];
        g.k[a] = s->k[a];
        g.s[a] = s->s[a];
        g.dl[a] = s->dl[a];
        g.pb[a] = s->pb[a];
        g.pe[a] = s->pe[a];
    }
    return g;
}

lc_rc nn_cu_step(gpu_cu_impl *c, const nn_step *s, const nn_bind *b, lc_err *err)
{
    size_t n = nn_shape_count(&s->out.sh);
    unsigned grid = gpu_cu_grid(c, n ? n : 1);
    const float *x = b->in[0];
    float *y = b->out;

    if (n == 0)
        return LC_OK;
    switch (s->op) {
    case NN_OP_INORM:
        k_inorm<<<(unsigned)(s->n * s->cin), NN_THREADS, 0, c->stream>>>(
            x, y, b->in[1], b->in[2], (size_t)s->cin, (size_t)s->inner, s->a.eps, (int)s->a.act,
            s->a.alpha);
        return launched(c, err, "run the instance norm kernel");
    case NN_OP_BNORM:
        k_affine<<<grid, NN_THREADS, 0, c->stream>>>(x, y, b->in[1], n, (size_t)s->cin,
                                                     (size_t)s->inner, (int)s->a.act, s->a.alpha);
        return launched(c, err, "run the batch norm kernel");
    case NN_OP_RELU:
    case NN_OP_LEAKY:
    case NN_OP_SIGMOID:
        k_act<<<grid, NN_THREADS, 0, c->stream>>>(x, y, n, (int)s->a.act, s->a.alpha);
        return launched(c, err, "run an activation kernel");
    case NN_OP_PRELU:
    case NN_OP_ADD:
    case NN_OP_SUB:
    case NN_OP_MUL:
    case NN_OP_DIV: {
        bdims q;
        q.r = s->out.sh.rank ? s->out.sh.rank : 1;
        for (int i = 0; i < q.r; i++)
            q.d[i] = s->out.sh.rank ? s->out.sh.d[i] : 1;
        bstrides(&s->in[0].sh, q.r, q.sa);
        bstrides(&s->in[1].sh, q.r, q.sb);
        k_binary<<<grid, NN_THREADS, 0, c->stream>>>(x, b->in[1], y, n, q, (int)s->op);
        return launched(c, err, "run a binary operator kernel");
    }
    case NN_OP_CONCAT: {
        size_t total = (size_t)s->out.sh.d[s->a.axis] * (size_t)s->inner, at = 0;
        for (int k = 0; k < s->nin; k++) {
            size_t blk = (size_t)s->in[k].sh.d[s->a.axis] * (size_t)s->inner;
            size_t cnt = (size_t)s->outer * blk;
            if (cnt)
                k_cat<<<gpu_cu_grid(c, cnt), NN_THREADS, 0, c->stream>>>(
                    b->in[k], y, (size_t)s->outer, blk, total, at);
            at += blk;
            lc_rc rc = launched(c, err, "run the concatenation kernel");
            if (rc != LC_OK)
                return rc;
        }
        return LC_OK;
    }
    case NN_OP_SOFTMAX: {
        size_t lanes = (size_t)(s->outer * s->inner);
        k_softmax<<<gpu_cu_grid(c, lanes), NN_THREADS, 0, c->stream>>>(
            x, y, (size_t)s->outer, (size_t)s->len, (size_t)s->inner);
        return launched(c, err, "run the softmax kernel");
    }
    case NN_OP_ARGMAX:
        k_argmax<<<grid, NN_THREADS, 0, c->stream>>>(x, y, (size_t)s->outer, (size_t)s->len,
                                                     (size_t)s->inner, s->a.select_last);
        return launched(c, err, "run the argmax kernel");
    case NN_OP_MAXPOOL:
    case NN_OP_AVGPOOL:
    case NN_OP_GAP:
        k_pool<<<grid, NN_THREADS, 0, c->stream>>>(x, y, (size_t)(s->n * s->cin), geo_of(s),
                                                   s->op == NN_OP_MAXPOOL, s->a.count_include_pad);
        return launched(c, err, "run the pooling kernel");
    case NN_OP_RESIZE: {
        rsq q;
        for (int a = 0; a < 3; a++) {
            q.id[a] = s->id[a];
            q.od[a] = s->od[a];
            q.sc[a] = s->rscale[a];
        }
        q.coord = (int)s->a.coord;
        q.nearest = (int)s->a.nearest;
        q.linear = s->a.linear;
        k_resize<<<grid, NN_THREADS, 0, c->stream>>>(x, y, (size_t)(s->n * s->cin), q);
        return launched(c, err, "run the resize kernel");
    }
    default:
        return lc_err_set(err, LC_ERR_INTERNAL, "the CUDA backend has no kernel for %s",
                          s->node->op_type);
    }
}

/* --- sliding window ----------------------------------------------------------------------- */

typedef struct patch_d {
    long long vd[3], org[3], ps[3];
    int flip;
} patch_d;

static patch_d patch_of(const nn_patch *p)
{
    patch_d q;
    for (int a = 0; a < 3; a++) {
        q.vd[a] = p->vd[a];
        q.org[a] = p->org[a];
        q.ps[a] = p->ps[a];
    }
    q.flip = p->flip;
    return q;
}

__device__ static inline long long d_mir(const patch_d &p, int a, long long i)
{
    int bit = a == 0 ? 4 : a == 1 ? 2 : 1;
    return (p.flip & bit) ? p.ps[a] - 1 - i : i;
}

__global__ static void k_win_crop(const float *img, float *dst, patch_d p)
{
    size_t n = (size_t)(p.ps[0] * p.ps[1] * p.ps[2]);
    GRID_LOOP(i, n)
    {
        long long z = (long long)(i / (size_t)(p.ps[1] * p.ps[2]));
        long long y = (long long)(i / (size_t)p.ps[2] % (size_t)p.ps[1]),
                  x = (long long)(i % (size_t)p.ps[2]);
        long long vz = p.org[0] + d_mir(p, 0, z), vy = p.org[1] + d_mir(p, 1, y),
                  vx = p.org[2] + d_mir(p, 2, x);
        int in = vz >= 0 && vy >= 0 && vx >= 0 && vz < p.vd[0] && vy < p.vd[1] && vx < p.vd[2];
        dst[i] = in ? img[(vz * p.vd[1] + vy) * p.vd[2] + vx] : 0.0f;
    }
}

lc_rc nn_cu_win_crop(gpu_cu_impl *c, const float *img, const nn_patch *p, float *dst, lc_err *err)
{
    size_t n = (size_t)(p->ps[0] * p->ps[1] * p->ps[2]);
    k_win_crop<<<gpu_cu_grid(c, n), NN_THREADS, 0, c->stream>>>(img, dst, patch_of(p));
    return launched(c, err, "run the patch kernel");
}

/* One thread per patch voxel; every patch voxel maps to its own volume voxel, so the adds of
 * one launch never collide (launches on one stream run in order). */
__global__ static void k_win_accum(const float *logits, int nc, int softmax, patch_d p,
                                   const float *gauss, float w, float *acc, float *wsum)
{
    size_t pv = (size_t)(p.ps[0] * p.ps[1] * p.ps[2]), nvox = (size_t)(p.vd[0] * p.vd[1] * p.vd[2]);
    GRID_LOOP(q, pv)
    {
        long long z = (long long)(q / (size_t)(p.ps[1] * p.ps[2]));
        long long y = (long long)(q / (size_t)p.ps[2] % (size_t)p.ps[1]),
                  x = (long long)(q % (size_t)p.ps[2]);
        long long vz = p.org[0] + z, vy = p.org[1] + y, vx = p.org[2] + x;
        if (vz < 0 || vy < 0 || vx < 0 || vz >= p.vd[0] || vy >= p.vd[1] || vx >= p.vd[2])
            continue;
        size_t qm =
            (size_t)((d_mir(p, 0, z) * p.ps[1] + d_mir(p, 1, y)) * p.ps[2] + d_mir(p, 2, x));
        size_t v = (size_t)((vz * p.vd[1] + vy) * p.vd[2] + vx);
        float g = w * gauss[q];
        if (softmax) {
            float mx = -INFINITY, sum = 0;
            for (int c = 0; c < nc; c++)
                mx = fmaxf(mx, logits[(size_t)c * pv + qm]);
            for (int c = 0; c < nc; c++)
                sum += expf(logits[(size_t)c * pv + qm] - mx);
            float inv = g / sum;
            for (int c = 0; c < nc; c++)
                acc[(size_t)c * nvox + v] += expf(logits[(size_t)c * pv + qm] - mx) * inv;
        } else {
            for (int c = 0; c < nc; c++)
                acc[(size_t)c * nvox + v] += g * logits[(size_t)c * pv + qm];
        }
        if (wsum)
            wsum[v] += g;
    }
}

lc_rc nn_cu_win_accum(gpu_cu_impl *c, const float *logits, int nc, int softmax, const nn_patch *p,
                      const float *gauss, float w, float *acc, float *wsum, lc_err *err)
{
    size_t n = (size_t)(p->ps[0] * p->ps[1] * p->ps[2]);
    k_win_accum<<<gpu_cu_grid(c, n), NN_THREADS, 0, c->stream>>>(logits, nc, softmax, patch_of(p),
                                                                 gauss, w, acc, wsum);
    return launched(c, err, "run the accumulation kernel");
}

__global__ static void k_win_finish(float *acc, const float *wsum, int nc, size_t nvox,
                                    float *probs, uint8_t *labels)
{
    GRID_LOOP(v, nvox)
    {
        float inv = wsum[v] > 0 ? 1.0f / wsum[v] : 0.0f, best = -INFINITY;
        int bc = 0;
        for (int c = 0; c < nc; c++) {
            float a = acc[(size_t)c * nvox + v];
            if (a > best) {
                best = a;
                bc = c;
            }
            if (probs)
                probs[(size_t)c * nvox + v] = a * inv;
        }
        labels[v] = (uint8_t)bc;
    }
}

lc_rc nn_cu_win_finish(gpu_cu_impl *c, float *acc, const float *wsum, int nc, size_t nvox,
                       float *probs, uint8_t *labels, lc_err *err)
{
    k_win_finish<<<gpu_cu_grid(c, nvox), NN_THREADS, 0, c->stream>>>(acc, wsum, nc, nvox, probs,
                                                                     labels);
    return launched(c, err, "run the argmax kernel");
}
