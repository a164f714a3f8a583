/*
 * gpu_nn.h: radpipe's resident inference engine for convolutional networks exported to ONNX
 * (nnU-Net and MONAI style 2D and 3D U-Nets), on the same gpu_ctx as the segmentation kernels
 * of gpu_seg.h: cuDNN on CUDA, oneDNN's convolutions on the CPU, chosen by the context. A
 * model is parsed, checked and planned once (gpu_nn_load: weights on the backend, batch norm
 * folded into the preceding convolution, a static execution plan whose activation buffers are
 * reused) and then stays resident for any number of runs.
 * Supported: default-domain opsets 7 to 21; the operators listed in gpu/README.md ("Inference
 * engine"). On CUDA, cuDNN 9 is opened at run time (libcudnn.so.9): without it a CUDA context
 * cannot load models (LC_ERR_UNSUPPORTED, saying so); the CPU backend needs nothing but
 * oneDNN (with its OpenMP runtime, libgomp) and protobuf-c, which the binaries link. The CPU
 * runs on the context's thread count: OpenMP's, set by the engine on the calling thread.
 * Thread safety: a model belongs to its context; use both from one thread at a time.
 */
#ifndef GPU_NN_H
#define GPU_NN_H

#include <stddef.h>
#include <stdint.h>

#include "gpu_seg.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Tensors are float32, C order: N, C, then the spatial axes (D, H, W for 3D; H, W for 2D),
 * W fastest. A gpu_vol (x fastest, then y, then z) is a D=nz, H=ny, W=nx tensor. Integer
 * outputs (ArgMax's indices) come out as floats holding the integers. */
#define GPU_NN_MAX_RANK 5

typedef struct gpu_nn_model gpu_nn_model;

typedef struct gpu_nn_info {
    int spatial_dims; /* 2 or 3 */
    int rank;         /* spatial_dims + 2 */
    /* The graph's input and output shapes; a dimension the model leaves free is -1 (often N,
     * sometimes the spatial ones). */
    int64_t in_shape[GPU_NN_MAX_RANK];
    int64_t out_shape[GPU_NN_MAX_RANK];
    int in_channels, out_channels;
    int64_t opset;        /* the default-domain opset the model was exported with */
    size_t params;        /* weights and biases, in elements, after folding */
    size_t weight_bytes;  /* backend memory the weights hold */
    char input_name[128]; /* the graph input and output, as the ONNX file names them */
    char output_name[128];
    int out_rank; /* the output's rank (0 until a plan exists: a free spatial input size) */
} gpu_nn_info;

typedef struct gpu_nn_opts {
    /* CUDA only: != 0 lets cuDNN convert convolutions to FP16 for tensor cores
     * (CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION) when the model's outputs on a built-in check input
     * (seeded normal noise of the model's input shape; models with a free spatial size are not
     * checked and stay in float32) differ from float32 by at most 1e-2 x max(1, max |float32
     * output|); the decision is logged. Otherwise, and on the CPU, everything runs in strict
     * float32 (no TF32). */
    int allow_half;
    /* != 0: every forward pass logs each plan step's time at info (node, operator, output
     * shape, ms; queued work is waited for), for tuning (bench_nn: RADPIPE_NN_PROFILE=1). */
    int profile;
} gpu_nn_opts;

/* Parse onnx (borrowed, len bytes of a serialized ModelProto), check it (opset, supported
 * operators and attributes, initializer types float32/float16 in raw_data or typed fields,
 * shapes that infer), fold BatchNormalization into the preceding Conv, place the weights on
 * ctx's backend and build the execution plan (for the model's input shape when it is fixed,
 * a free batch taken as 1: shape errors then surface here). The graph must have one float
 * input of rank 3 to 5 (N, C, 1 to 3 spatial axes); of several outputs the first is used.
 * Errors are LC_ERR_INVALID (truncated or not a ModelProto, inconsistent shapes),
 * LC_ERR_UNSUPPORTED (an operator, attribute or type the engine lacks: the message names the
 * node and its op_type; no cuDNN on a CUDA context), LC_ERR_TOO_LARGE (over the context's
 * memory limit); never a crash on any input. opts may be NULL. *out: caller frees with
 * gpu_nn_free. */
lc_rc gpu_nn_load(gpu_ctx *ctx, const void *onnx, size_t len, const gpu_nn_opts *opts,
                  gpu_nn_model **out, lc_err *err);
/* gpu_nn_load on the contents of a file. */
lc_rc gpu_nn_load_file(gpu_ctx *ctx, const char *path, const gpu_nn_opts *opts, gpu_nn_model **out,
                       lc_err *err);
/* Borrowed, valid as long as m. */
const gpu_nn_info *gpu_nn_model_info(const gpu_nn_model *m);
/* Accepts NULL. Frees the weights and the plan's buffers on the backend. */
void gpu_nn_free(gpu_nn_model *m);

/* One forward pass on a host tensor: in (borrowed) has shape in_shape[0..rank-1], which must
 * fit the model's input (free dimensions take any size the network can process, e.g. spatial
 * sizes divisible by its total stride); the output tensor is written to out (caller's buffer
 * of out_cap floats) and its shape to out_shape (caller's array of GPU_NN_MAX_RANK entries:
 * the output's dimensions, then 0 for the axes past its rank). LC_ERR_TOO_LARGE when out_cap
 * is too small (out_shape is still set) or memory runs out. Plans for new shapes are built
 * on first use and kept (the 8 most recently used). */
lc_rc gpu_nn_forward(gpu_nn_model *m, const float *in, const int64_t *in_shape, int rank,
                     float *out, size_t out_cap, int64_t *out_shape, lc_err *err);

typedef struct gpu_nn_window_opts {
    /* Patch size along z, y, x (3D models) or y, x in [1], [2] (2D models run slice by
     * slice); 0 = the model's fixed input size. */
    int64_t patch[3];
    double step;  /* stride between patches as a fraction of the patch, (0, 1]; 0 = 0.5 */
    double sigma; /* Gaussian importance weight: sigma = this fraction of the patch; 0 = 1/8 */
    int mirror;   /* != 0: test-time augmentation, mirrored along every spatial axis (8 runs
                   * per patch in 3D, 4 in 2D), averaged */
    int batch;    /* patches per forward pass, 0 = 1; a model with a fixed batch size uses
                   * its own (a short last batch is padded) */
    int (*cancelled)(void *arg); /* polled between batches; != 0 stops with LC_ERR_CANCELLED */
    void *cancel_arg;
    void (*progress)(void *arg, size_t done, size_t total); /* patches done; may be NULL */
    void *progress_arg;
} gpu_nn_window_opts;

/* nnU-Net's sliding-window inference over a single-channel volume img (GPU_F32, already
 * normalised and at the model's spacing; volumes smaller than a patch are padded with zeros,
 * symmetrically): patches at the given step (nnU-Net's compute_steps_for_sliding_window: the
 * last one flush with the border), softmax of each patch's logits (skipped when the model
 * ends in a softmax over channels) weighted by a Gaussian importance map (nnU-Net's: centred
 * at patch // 2, divided by its maximum, zeros raised to its smallest non-zero value),
 * mirrored runs averaged, accumulated and normalised over the volume, then argmax (the first
 * class on ties). The model takes N x 1 x patch and returns N x classes x patch, 2 to 256
 * classes. *labels: a new GPU_U8 volume of img's dims holding class indices (0 =
 * background), caller frees. probs may be NULL; else *probs: a new GPU_F32 volume of
 * nz * classes slices (class c's probabilities at z + c * nz), caller frees. Everything stays
 * on the backend; scratch (the sums: classes + 1 floats per voxel unless probs holds them)
 * is counted against the memory limit and freed before return. LC_ERR_CANCELLED when
 * opts->cancelled says so (nothing is returned). */
lc_rc gpu_nn_segment(gpu_nn_model *m, const gpu_vol *img, const gpu_nn_window_opts *opts,
                     gpu_vol **labels, gpu_vol **probs, lc_err *err);

#ifdef __cplusplus
}
#endif

#endif
