/*
 * nn_cudnn.cu: the inference engine's CUDA backend. cuDNN 9 is opened at run time (dlopen of
 * libcudnn.so.9, every entry point looked up by name with its type taken from cudnn.h), so
 * radpipe's binaries link no cuDNN and start, and run on the CPU, where it is absent; a CUDA
 * context without it refuses to load models with a message saying so. Convolutions use the
 * legacy cuDNN API, which cuDNN 9 still ships: descriptors built once per step and shape, the
 * algorithm chosen once by cudnnFindConvolution*Algorithm, ReLU fused with the bias through
 * cudnnConvolutionBiasActivationForward, other activations and biases by our kernel right
 * after. Math is strict FP32 (CUDNN_FMA_MATH: no TF32) unless the model was loaded with
 * allow_half, when cuDNN may convert to FP16 for tensor cores (CUDNN_TENSOR_OP_MATH_ALLOW_
 * CONVERSION) and nn_model.c keeps that only if the check input's outputs stay within
 * tolerance. Asymmetric pads (which cuDNN lacks) go through a padded copy (Conv) or a crop of
 * the unpadded result (ConvTranspose) in scratch memory.
 * Ownership: a model's state owns its cuDNN handle and library reference; a step's state its
 * descriptors. Thread safety: a model is used by one host thread at a time.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cudnn.h>
#include "nn_cuda.h"

#define CUDNN_FUNCS(X)                                                                             \
    X(cudnnGetVersion)                                                                             \
    X(cudnnGetErrorString)                                                                         \
    X(cudnnCreate)                                                                                 \
    X(cudnnDestroy)                                                                                \
    X(cudnnSetStream)                                                                              \
    X(cudnnCreateTensorDescriptor)                                                                 \
    X(cudnnDestroyTensorDescriptor)                                                                \
    X(cudnnSetTensorNdDescriptor)                                                                  \
    X(cudnnCreateFilterDescriptor)                                                                 \
    X(cudnnDestroyFilterDescriptor)                                                                \
    X(cudnnSetFilterNdDescriptor)                                                                  \
    X(cudnnCreateConvolutionDescriptor)                                                            \
    X(cudnnDestroyConvolutionDescriptor)                                                           \
    X(cudnnSetConvolutionNdDescriptor)                                                             \
    X(cudnnSetConvolutionGroupCount)                                                               \
    X(cudnnSetConvolutionMathType)                                                                 \
    X(cudnnCreateActivationDescriptor)                                                             \
    X(cudnnDestroyActivationDescriptor)                                                            \
    X(cudnnSetActivationDescriptor)                                                                \
    X(cudnnFindConvolutionForwardAlgorithm)                                                        \
    X(cudnnFindConvolutionBackwardDataAlgorithm)                                                   \
    X(cudnnConvolutionForward)                                                                     \
    X(cudnnConvolutionBackwardData)                                                                \
    X(cudnnConvolutionBiasActivationForward)

typedef struct cudnn_api {
#define X(f) decltype(&::f) p_##f;
    CUDNN_FUNCS(X)
#undef X
} cudnn_api;

/* Largest workspace an algorithm may ask for. */
#define MAX_WORKSPACE ((size_t)1 << 30)

typedef struct cu_nn {
    gpu_cu_impl *c; /* the context's backend: device and stream (borrowed) */
    void *lib;
    cudnn_api api;
    cudnnHandle_t h;
    int half;
} cu_nn;

typedef struct conv_st {
    cudnnTensorDescriptor_t x, y, bias;
    cudnnFilterDescriptor_t w;
    cudnnConvolutionDescriptor_t conv;
    cudnnActivationDescriptor_t relu;
    int fwd_algo, bwd_algo;
    int fused;      /* bias + ReLU in cudnnConvolutionBiasActivationForward */
    int asym;       /* pads differ at the two ends: padded copy (Conv) or crop (ConvT) */
    int64_t fd[3];  /* Conv: padded input dims; ConvT: full output dims */
    size_t ws, aux; /* workspace bytes; bytes of the padded input or full output */
} conv_st;

static lc_rc dnn_fail(const cu_nn *m, lc_err *err, cudnnStatus_t st, const char *what)
{
    return lc_err_set(err, st == CUDNN_STATUS_ALLOC_FAILED ? LC_ERR_NOMEM : LC_ERR_INTERNAL,
                      "could not %s: %s", what, m->api.p_cudnnGetErrorString(st));
}

#define DNN(call, what)                                                                            \
    do {                                                                                           \
        cudnnStatus_t st_ = (call);                                                                \
        if (st_ != CUDNN_STATUS_SUCCESS)                                                           \
            return dnn_fail(m, err, st_, what);                                                    \
    } while (0)

static void cu_nn_close(void *bm)
{
    cu_nn *m = static_cast<cu_nn *>(bm);
    if (!m)
        return;
    if (m->h)
        m->api.p_cudnnDestroy(m->h);
    if (m->lib)
        dlclose(m->lib);
    free(m);
}

static lc_rc cu_nn_open(gpu_ctx *ctx, int allow_half, void **bm, lc_err *err)
{
    cu_nn *m = static_cast<cu_nn *>(calloc(1, sizeof(cu_nn)));
    const char *names[] = {"libcudnn.so.9", "libcudnn.so"};
    char why[256] = "";
    lc_rc rc = LC_OK;

    if (!m)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    m->c = static_cast<gpu_cu_impl *>(ctx->impl);
    m->half = allow_half;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]) && !m->lib; i++) {
        m->lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (!m->lib && i == 0)
            snprintf(why, sizeof(why), "%s", dlerror());
    }
    if (!m->lib) {
        rc = lc_err_set(err, LC_ERR_UNSUPPORTED,
                        "cuDNN 9 is not available, so models cannot run on this CUDA context "
                        "(use the CPU backend): %s",
                        why);
        goto out;
    }
#define X(f)                                                                                       \
    m->api.p_##f = reinterpret_cast<decltype(&::f)>(dlsym(m->lib, #f));                            \
    if (!m->api.p_##f) {                                                                           \
        rc = lc_err_set(err, LC_ERR_UNSUPPORTED, "cuDNN lacks %s: %s", #f, dlerror());             \
        goto out;                                                                                  \
    }
    CUDNN_FUNCS(X)
#undef X
    if (m->api.p_cudnnGetVersion() < 90000) {
        rc = lc_err_set(err, LC_ERR_UNSUPPORTED, "cuDNN %zu is too old: 9 or newer is needed",
                        m->api.p_cudnnGetVersion());
        goto out;
    }
    if ((rc = gpu_cu_enter(m->c, err)) != LC_OK)
        goto out;
    {
        cudnnStatus_t st = m->api.p_cudnnCreate(&m->h);
        if (st == CUDNN_STATUS_SUCCESS)
            st = m->api.p_cudnnSetStream(m->h, m->c->stream);
        if (st != CUDNN_STATUS_SUCCESS) {
            rc = dnn_fail(m, err, st, "open cuDNN");
            goto out;
        }
    }
    *bm = m;
out:
    if (rc != LC_OK)
        cu_nn_close(m);
    return rc;
}

static void cu_nn_set_half(void *bm, int on)
{
    static_cast<cu_nn *>(bm)->half = on;
}

/* --- convolutions ---------------------------------------------------------------------------- */

/* cuDNN's view of a canonical 3D step: 2 spatial axes (4D tensors) when D plays no part. */
static int nsp_of(const nn_step *s)
{
    return s->id[0] == 1 && s->od[0] == 1 && s->k[0] == 1 && s->s[0] == 1 && s->pb[0] == 0 &&
                   s->pe[0] == 0
               ? 2
               : 3;
}

static lc_rc set_tensor(cu_nn *m, cudnnTensorDescriptor_t d, int64_t n, int64_t ch,
                        const int64_t *sp, int nsp, lc_err *err)
{
    int dims[5], str[5];
    dims[0] = (int)n;
    dims[1] = (int)ch;
    for (int i = 0; i < nsp; i++)
        dims[2 + i] = (int)sp[3 - nsp + i];
    str[nsp + 1] = 1;
    for (int i = nsp; i >= 0; i--)
        str[i] = str[i + 1] * dims[i + 1];
    DNN(m->api.p_cudnnSetTensorNdDescriptor(d, CUDNN_DATA_FLOAT, nsp + 2, dims, str),
        "describe a tensor for cuDNN");
    return LC_OK;
}

static void release_conv(cu_nn *m, conv_st *c)
{
    if (!c)
        return;
    if (c->x)
        m->api.p_cudnnDestroyTensorDescriptor(c->x);
    if (c->y)
        m->api.p_cudnnDestroyTensorDescriptor(c->y);
    if (c->bias)
        m->api.p_cudnnDestroyTensorDescriptor(c->bias);
    if (c->w)
        m->api.p_cudnnDestroyFilterDescriptor(c->w);
    if (c->conv)
        m->api.p_cudnnDestroyConvolutionDescriptor(c->conv);
    if (c->relu)
        m->api.p_cudnnDestroyActivationDescriptor(c->relu);
    free(c);
}

static lc_rc prepare_conv(cu_nn *m, nn_step *s, conv_st *c, lc_err *err)
{
    int nsp = nsp_of(s), tr = s->op == NN_OP_CONVT;
    int pads[3], strides[3], dils[3], wd[5];
    int64_t xd[3], yd[3];
    lc_rc rc;

    DNN(m->api.p_cudnnCreateTensorDescriptor(&c->x), "create a cuDNN descriptor");
    DNN(m->api.p_cudnnCreateTensorDescriptor(&c->y), "create a cuDNN descriptor");
    DNN(m->api.p_cudnnCreateTensorDescriptor(&c->bias), "create a cuDNN descriptor");
    DNN(m->api.p_cudnnCreateFilterDescriptor(&c->w), "create a cuDNN descriptor");
    DNN(m->api.p_cudnnCreateConvolutionDescriptor(&c->conv), "create a cuDNN descriptor");
    DNN(m->api.p_cudnnCreateActivationDescriptor(&c->relu), "create a cuDNN descriptor");
    for (int a = 0; a < 3; a++) {
        if (s->pb[a] != s->pe[a])
            c->asym = 1;
        xd[a] = s->id[a];
        yd[a] = s->od[a];
    }
    for (int a = 0; a < 3; a++) {
        int64_t p = c->asym ? 0 : s->pb[a];
        if (c->asym && !tr) { /* pad into scratch, convolve unpadded */
            c->fd[a] = s->id[a] + s->pb[a] + s->pe[a];
            xd[a] = c->fd[a];
        } else if (c->asym) { /* full transposed output, cropped afterwards */
            c->fd[a] = s->od[a] + s->pb[a] + s->pe[a];
            yd[a] = c->fd[a];
        }
        if (a >= 3 - nsp) {
            pads[a - (3 - nsp)] = (int)p;
            strides[a - (3 - nsp)] = (int)s->s[a];
            dils[a - (3 - nsp)] = (int)s->dl[a];
        }
    }
    if (c->asym)
        c->aux = (size_t)(s->n * (tr ? s->cout : s->cin) * c->fd[0] * c->fd[1] * c->fd[2]) *
                 sizeof(float);
    if ((rc = set_tensor(m, c->x, s->n, s->cin, xd, nsp, err)) != LC_OK ||
        (rc = set_tensor(m, c->y, s->n, s->cout, yd, nsp, err)) != LC_OK)
        return rc;
    int64_t one[3] = {1, 1, 1};
    if ((rc = set_tensor(m, c->bias, 1, s->cout, one, nsp, err)) != LC_OK)
        return rc;
    /* filter: Conv [Cout, Cin/g, k...], ConvTranspose [Cin, Cout/g, k...] (cuDNN's backward
     * data reads the forward filter of the convolution it inverts: the same layout) */
    wd[0] = (int)(tr ? s->cin : s->cout);
    wd[1] = (int)(tr ? s->cout / s->group : s->cin / s->group);
    for (int i = 0; i < nsp; i++)
        wd[2 + i] = (int)s->k[3 - nsp + i];
    DNN(m->api.p_cudnnSetFilterNdDescriptor(c->w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW, nsp + 2, wd),
        "describe convolution weights for cuDNN");
    DNN(m->api.p_cudnnSetConvolutionNdDescriptor(c->conv, nsp, pads, strides, dils,
                                                 CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT),
        "describe a convolution for cuDNN");
    DNN(m->api.p_cudnnSetConvolutionGroupCount(c->conv, (int)s->group),
        "set the convolution groups");
    DNN(m->api.p_cudnnSetConvolutionMathType(
            c->conv, m->half ? CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION : CUDNN_FMA_MATH),
        "set the convolution math");
    DNN(m->api.p_cudnnSetActivationDescriptor(c->relu, CUDNN_ACTIVATION_RELU,
                                              CUDNN_NOT_PROPAGATE_NAN, 0),
        "describe an activation for cuDNN");

    /* the algorithm: timed by cuDNN once for this shape, fastest that fits first */
    int found = 0;
    if (!tr) {
        cudnnConvolutionFwdAlgoPerf_t perf[8];
        DNN(m->api.p_cudnnFindConvolutionForwardAlgorithm(m->h, c->x, c->w, c->conv, c->y, 8,
                                                          &found, perf),
            "choose a convolution algorithm");
        for (int i = 0; i < found; i++) {
            if (perf[i].status != CUDNN_STATUS_SUCCESS || perf[i].memory > MAX_WORKSPACE)
                continue;
            c->fwd_algo = (int)perf[i].algo;
            c->ws = perf[i].memory;
            DNN(m->api.p_cudnnSetConvolutionMathType(c->conv, perf[i].mathType), "set the math");
            found = -1;
            break;
        }
    } else {
        cudnnConvolutionBwdDataAlgoPerf_t perf[8];
        DNN(m->api.p_cudnnFindConvolutionBackwardDataAlgorithm(m->h, c->w, c->x, c->conv, c->y, 8,
                                                               &found, perf),
            "choose a transposed convolution algorithm");
        for (int i = 0; i < found; i++) {
            if (perf[i].status != CUDNN_STATUS_SUCCESS || perf[i].memory > MAX_WORKSPACE)
                continue;
            c->bwd_algo = (int)perf[i].algo;
            c->ws = perf[i].memory;
            DNN(m->api.p_cudnnSetConvolutionMathType(c->conv, perf[i].mathType), "set the math");
            found = -1;
            break;
        }
    }
    if (found != -1)
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "node \"%s\" (%s): cuDNN has no algorithm for this shape",
                          nn_node_label(s->node), s->node->op_type);
    c->fused = !tr && !c->asym && s->nin > 2 && s->a.act == NN_ACT_RELU;
    s->scratch = (c->ws + 255) / 256 * 256 + c->aux;
    return LC_OK;
}

static lc_rc cu_nn_prepare(void *bm, nn_step *s, lc_err *err)
{
    cu_nn *m = static_cast<cu_nn *>(bm);
    s->scratch = 0;
    if (s->op != NN_OP_CONV && s->op != NN_OP_CONVT)
        return LC_OK;
    lc_rc rc = gpu_cu_enter(m->c, err);
    if (rc != LC_OK)
        return rc;
    /* A transposed convolution is cuDNN's backward data of the convolution output -> input:
     * its dy is our input (cin channels), its dx our output; prepare_conv describes both. */
    conv_st *c = static_cast<conv_st *>(calloc(1, sizeof(conv_st)));
    if (!c)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    rc = prepare_conv(m, s, c, err);
    if (rc != LC_OK) {
        release_conv(m, c);
        return rc;
    }
    s->bs = c;
    return LC_OK;
}

static void cu_nn_release(void *bm, nn_step *s)
{
    release_conv(static_cast<cu_nn *>(bm), static_cast<conv_st *>(s->bs));
    s->bs = NULL;
}

static lc_rc run_conv(cu_nn *m, const nn_step *s, const nn_bind *b, lc_err *err)
{
    const conv_st *c = static_cast<const conv_st *>(s->bs);
    const float one = 1.0f, zero = 0.0f;
    char *ws = static_cast<char *>(b->scratch);
    char *aux = ws + (c->ws + 255) / 256 * 256;
    const float *bias = s->nin > 2 ? b->in[2] : NULL;
    lc_rc rc;

    if (s->op == NN_OP_CONV) {
        const float *x = b->in[0];
        if (c->asym) {
            int64_t pd[3] = {c->fd[0], c->fd[1], c->fd[2]};
            if ((rc = nn_cu_pad(m->c, x, reinterpret_cast<float *>(aux), s->n * s->cin, s->id,
                                s->pb, pd, err)) != LC_OK)
                return rc;
            x = reinterpret_cast<const float *>(aux);
        }
        if (c->fused) {
            DNN(m->api.p_cudnnConvolutionBiasActivationForward(
                    m->h, &one, c->x, x, c->w, b->in[1], c->conv,
                    static_cast<cudnnConvolutionFwdAlgo_t>(c->fwd_algo), ws, c->ws, &zero, c->y,
                    b->out, c->bias, bias, c->relu, c->y, b->out),
                "run a fused convolution");
            return LC_OK;
        }
        DNN(m->api.p_cudnnConvolutionForward(m->h, &one, c->x, x, c->w, b->in[1], c->conv,
                                             static_cast<cudnnConvolutionFwdAlgo_t>(c->fwd_algo),
                                             ws, c->ws, &zero, c->y, b->out),
            "run a convolution");
        return nn_cu_bias_act(m->c, b->out, bias, s->n, s->cout, s->od[0] * s->od[1] * s->od[2],
                              s->a.act, s->a.alpha, err);
    }
    /* ConvTranspose = the data gradient of the convolution out -> in */
    float *y = c->asym ? reinterpret_cast<float *>(aux) : b->out;
    DNN(m->api.p_cudnnConvolutionBackwardData(
            m->h, &one, c->w, b->in[1], c->x, b->in[0], c->conv,
            static_cast<cudnnConvolutionBwdDataAlgo_t>(c->bwd_algo), ws, c->ws, &zero, c->y, y),
        "run a transposed convolution");
    if (c->asym) {
        int64_t fd[3] = {c->fd[0], c->fd[1], c->fd[2]};
        if ((rc = nn_cu_crop(m->c, y, b->out, s->n * s->cout, fd, s->pb, s->od, err)) != LC_OK)
            return rc;
    }
    return nn_cu_bias_act(m->c, b->out, bias, s->n, s->cout, s->od[0] * s->od[1] * s->od[2],
                          s->a.act, s->a.alpha, err);
}

static lc_rc cu_nn_run(void *bm, const nn_step *s, const nn_bind *b, lc_err *err)
{
    cu_nn *m = static_cast<cu_nn *>(bm);
    lc_rc rc = gpu_cu_enter(m->c, err);
    if (rc != LC_OK)
        return rc;
    if (s->op == NN_OP_CONV || s->op == NN_OP_CONVT)
        return run_conv(m, s, b, err);
    return nn_cu_step(m->c, s, b, err);
}

static lc_rc cu_nn_crop(void *bm, const float *img, const nn_patch *p, float *dst, lc_err *err)
{
    return nn_cu_win_crop(static_cast<cu_nn *>(bm)->c, img, p, dst, err);
}

static lc_rc cu_nn_accum(void *bm, const float *logits, int nc, int softmax, const nn_patch *p,
                         const float *gauss, float w, float *acc, float *wsum, lc_err *err)
{
    return nn_cu_win_accum(static_cast<cu_nn *>(bm)->c, logits, nc, softmax, p, gauss, w, acc, wsum,
                           err);
}

static lc_rc cu_nn_finish(void *bm, float *acc, const float *wsum, int nc, size_t nvox,
                          float *probs, uint8_t *labels, lc_err *err)
{
    return nn_cu_win_finish(static_cast<cu_nn *>(bm)->c, acc, wsum, nc, nvox, probs, labels, err);
}

static lc_rc cu_nn_sync(void *bm, lc_err *err)
{
    cu_nn *m = static_cast<cu_nn *>(bm);
    cudaError_t e = cudaStreamSynchronize(m->c->stream);
    return e == cudaSuccess ? LC_OK : gpu_cu_fail(err, e, "finish the model's work");
}

/* Positional: C++17 has no designated initialisers. Order of nn_backend in nn_internal.h. */
static const nn_backend cu_nn_backend = {
    "cuda",         /* name */
    cu_nn_open,     /* model_open */
    cu_nn_close,    /* model_close */
    cu_nn_prepare,  /* prepare */
    cu_nn_release,  /* release */
    cu_nn_run,      /* run */
    cu_nn_crop,     /* win_crop */
    cu_nn_accum,    /* win_accum */
    cu_nn_finish,   /* win_finish */
    cu_nn_sync,     /* sync */
    cu_nn_set_half, /* set_half */
    NULL,           /* prepare_plan: steps prepared one by one */
};

extern "C" const nn_backend *gpu_cu_nn_backend(void)
{
    return &cu_nn_backend;
}
