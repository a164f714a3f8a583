/*
 * nn_internal.h: what the inference engine's files share (gpu/nn in C, gpu/cuda/nn_*.cu in
 * C++): the graph read from ONNX (values, nodes, parsed attributes), the per-shape execution
 * plan (steps over an activation arena), and the backend table each backend fills.
 * Ownership: a graph owns its names, constant data and node arrays; a plan owns its steps and
 * the host data of constants it folded; backend memory goes through gpu_mem_alloc (counted).
 * Thread safety: a model, its graph and its plans are used by one thread at a time.
 */
#ifndef NN_INTERNAL_H
#define NN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include "gpu_internal.h"
#include "gpu_nn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Tensor ranks the engine handles: activations up to 6, shape constants up to 8. */
#define NN_MAX_RANK    8
#define NN_MAX_RT_RANK 6
/* Default-domain opsets accepted by the loader. */
#define NN_OPSET_MIN 7
#define NN_OPSET_MAX 21
/* Shapes planned and kept per model (least recently used goes first). */
#define NN_MAX_PLANS 8
/* Offsets in the activation arena are multiples of this (cache lines; CUDA's 256 bytes). */
#define NN_ALIGN 256
/* The arena, the scratch and the CPU's reordered weights start at multiples of this (host
 * malloc gives 16 bytes; vector loads across cache lines cost): they are allocated this much
 * larger. */
#define NN_MEM_ALIGN 64

typedef enum nn_dtype {
    NN_F32 = 1,
    NN_I64,
} nn_dtype;

typedef enum nn_opk {
    NN_OP_NONE = 0,
    /* run on the backend */
    NN_OP_CONV,
    NN_OP_CONVT,
    NN_OP_INORM,
    NN_OP_BNORM, /* standalone: a per-channel affine map */
    NN_OP_RELU,
    NN_OP_LEAKY,
    NN_OP_SIGMOID,
    NN_OP_PRELU,
    NN_OP_ADD,
    NN_OP_SUB,
    NN_OP_MUL,
    NN_OP_DIV,
    NN_OP_CONCAT,
    NN_OP_SOFTMAX,
    NN_OP_ARGMAX,
    NN_OP_MAXPOOL,
    NN_OP_AVGPOOL,
    NN_OP_GAP, /* GlobalAveragePool */
    NN_OP_RESIZE,
    /* views of their input (no kernel at run time), or evaluated at plan time on constants */
    NN_OP_RESHAPE,
    NN_OP_FLATTEN,
    NN_OP_IDENTITY,
    NN_OP_SQUEEZE,
    NN_OP_UNSQUEEZE,
    NN_OP_CAST,
    /* evaluated at plan time only (their inputs must be constant there) */
    NN_OP_CONSTANT,
    NN_OP_SHAPE,
    NN_OP_GATHER,
    NN_OP_SLICE,
    NN_OP_CONST_OF_SHAPE,
    NN_OP__COUNT
} nn_opk;

/* Activation fused into a convolution, normalisation or affine step (or run alone). */
typedef enum nn_act {
    NN_ACT_NONE = 0,
    NN_ACT_RELU,
    NN_ACT_LEAKY, /* x < 0 ? alpha * x : x */
    NN_ACT_SIGMOID,
} nn_act;

typedef enum nn_autopad {
    NN_PAD_NOTSET = 0,
    NN_PAD_SAME_UPPER,
    NN_PAD_SAME_LOWER,
    NN_PAD_VALID,
} nn_autopad;

typedef enum nn_coord {
    NN_COORD_HALF_PIXEL = 0,
    NN_COORD_PYTORCH_HALF_PIXEL,
    NN_COORD_ALIGN_CORNERS,
    NN_COORD_ASYMMETRIC,
    NN_COORD_TF_HALF_PIXEL_NN,
} nn_coord;

typedef enum nn_round {
    NN_ROUND_PREFER_FLOOR = 0,
    NN_ROUND_PREFER_CEIL,
    NN_ROUND_FLOOR,
    NN_ROUND_CEIL,
} nn_round;

/* A node's attributes, parsed and checked at load. Spatial arrays are in ONNX order (first
 * spatial axis first) with nsp entries; 0 entries mean "not given". */
typedef struct nn_attrs {
    int nsp;           /* spatial axes given by kernel_shape/pads/strides (0: from inputs) */
    int64_t kernel[3]; /* kernel_shape (pools; convs take it from the weights) */
    int64_t stride[3]; /* default 1 */
    int64_t dil[3];    /* default 1 */
    int64_t pad_b[3], pad_e[3];
    int64_t out_pad[3];   /* ConvTranspose output_padding */
    int64_t out_shape[3]; /* ConvTranspose output_shape (has_out_shape) */
    int has_kernel, has_out_shape;
    nn_autopad auto_pad;
    int64_t group;
    int ceil_mode, count_include_pad;
    nn_act act; /* fused activation (load-time pass) or the node's own */
    float alpha;
    float eps;
    int64_t axis;
    int keepdims, select_last;
    int old_softmax; /* opset < 13: softmax over the flattened axes from axis on */
    /* Resize / Upsample */
    int linear; /* 0 nearest, 1 (bi/tri)linear */
    nn_coord coord;
    nn_round nearest;
    int scales_attr;    /* Upsample-7: scales in attr_f */
    int allowzero;      /* Reshape-14 */
    int64_t start, end; /* Shape-15 */
    int has_end;
    int to; /* Cast: ONNX element type */
    /* integer lists from attributes (Squeeze/Unsqueeze axes before opset 13, Slice before 10) */
    int64_t ints[3][NN_MAX_RANK];
    int nints[3];
    int has_ints[3];
    float attr_f[NN_MAX_RANK]; /* Upsample-7 scales */
    int nattr_f;
    int value; /* Constant / ConstantOfShape: index of the value holding the tensor */
} nn_attrs;

/* A tensor of the graph: a constant (initializer, Constant node), the graph input, or a node
 * output. */
typedef struct nn_val {
    char *name;
    int is_const, is_input;
    nn_dtype dtype;
    int rank;
    int64_t dims[NN_MAX_RANK]; /* constants: exact; the input: -1 where the model leaves it free */
    void *data;                /* constants: host data (float or int64_t), owned */
    size_t count;
    int producer; /* node index, -1 for constants and the input */
    /* float constants read by backend kernels (weights, biases, operands): a copy in backend
     * memory, made at load (mem_bytes counted in the context) */
    void *mem;
    size_t mem_bytes;
} nn_val;

typedef struct nn_node {
    nn_opk op;
    const char *op_type; /* the ONNX name (static string) */
    char *name;          /* the node's name, or its first output's when it has none */
    int nin, nout;
    int *in; /* value indices, -1 for an omitted optional input */
    int out[4];
    nn_attrs a;
    int dead; /* removed by a load-time rewrite (folded, fused) */
} nn_node;

typedef struct nn_graph {
    nn_val *vals;
    size_t nvals, cap_vals;
    nn_node *nodes;
    size_t nnodes, cap_nodes;
    int *order; /* topological order of the live nodes */
    size_t norder;
    int input, output; /* value indices */
    int64_t opset;
} nn_graph;

/* --- plans ------------------------------------------------------------------------------ */

typedef struct nn_shape {
    int rank;
    int64_t d[NN_MAX_RANK];
} nn_shape;

/* An operand of a step: backend memory (arena offset, or a constant's backend copy) and its
 * shape. */
typedef struct nn_arg {
    nn_shape sh;
    int is_const;
    size_t off;        /* arena byte offset (runtime values) */
    const float *cmem; /* constants: backend memory */
    int from;          /* runtime values: the step writing them, -1 for the graph input (a view
                        * has its producer's buffer under another shape); constants: -1 */
} nn_arg;

/* A step with its geometry resolved for one input shape. Spatial arrays are canonical 3D
 * (D, H, W): a 2D operation has D = 1, kernel 1, stride 1, no padding along it. */
typedef struct nn_step {
    nn_opk op;
    const nn_node *node;
    int nin;
    nn_arg *in; /* nin operands (owned) */
    nn_arg out;
    nn_attrs a; /* the node's, with pads resolved (auto_pad) */
    /* canonical 3D geometry: batch, channels, input and output sizes */
    int64_t n, cin, cout, group;
    int64_t id[3], od[3], k[3], s[3], dl[3], pb[3], pe[3];
    /* reductions and concatenation: outer x len x inner views */
    int64_t outer, len, inner;
    /* resize: per canonical axis, input size, output size and the coordinate scale */
    float rscale[3];
    void *bs;       /* backend state (CUDA: descriptors and the algorithm found) */
    size_t scratch; /* backend scratch bytes this step needs */
} nn_step;

typedef struct nn_buf {
    size_t bytes, off;
    int first, last; /* steps (0-based) defining and last reading it; -1 = before the first */
} nn_buf;

typedef struct nn_plan {
    nn_shape in_shape, out_shape;
    nn_step *steps;
    size_t nsteps;
    size_t arena_bytes; /* the planned arena */
    size_t naive_bytes; /* every activation in its own buffer */
    size_t scratch_bytes;
    size_t in_off, out_off;
    size_t out_count;
    unsigned long used; /* last use tick (eviction) */
    /* host data of constants folded while planning, freed with the plan */
    void **owned;
    size_t nowned;
    /* backend copies of constants folded while planning (counted), freed with the plan */
    void **cmem;
    size_t *cmem_bytes;
    size_t ncmem;
} nn_plan;

/* Pointers for one step's run: resolved by the front end. */
typedef struct nn_bind {
    const float **in; /* nin pointers */
    float *out;
    void *scratch; /* plan scratch (step->scratch bytes at least) */
    size_t scratch_bytes;
} nn_bind;

/* One patch for the sliding window: the volume img (nz x ny x nx, x fastest) is read at
 * org (z, y, x; may be negative or reach past the end: zeros there) over size ps (z, y, x).
 * flip: bit 0 mirrors x, bit 1 y, bit 2 z. */
typedef struct nn_patch {
    int64_t vd[3]; /* volume dims z, y, x */
    int64_t org[3];
    int64_t ps[3];
    int flip;
} nn_patch;

/* Backend operations of the engine ("mem": host memory on the CPU, device memory on CUDA). */
typedef struct nn_backend {
    const char *name;
    /* Per-model state (*bm; closed with model_close): the CPU's thread count, CUDA's cuDNN
     * handle. allow_half: CUDA may use tensor-core math. */
    lc_rc (*model_open)(gpu_ctx *ctx, int allow_half, void **bm, lc_err *err);
    void (*model_close)(void *bm);
    /* Set s->bs (backend state, may stay NULL) and s->scratch (bytes of scratch it needs). */
    lc_rc (*prepare)(void *bm, nn_step *s, lc_err *err);
    void (*release)(void *bm, nn_step *s);
    lc_rc (*run)(void *bm, const nn_step *s, const nn_bind *b, lc_err *err);
    /* Sliding window: dst (ps[0]*ps[1]*ps[2] floats) = the patch p of img. */
    lc_rc (*win_crop)(void *bm, const float *img, const nn_patch *p, float *dst, lc_err *err);
    /* acc[c * nvox + v] += w * gauss[q] * prob_c(q), wsum[v] += w * gauss[q] (when wsum is not
     * NULL), for every patch voxel q inside the volume at voxel v; prob = softmax over the
     * nc channels of logits (nc x patch voxels, read at the mirrored position), or logits
     * themselves when softmax == 0. */
    lc_rc (*win_accum)(void *bm, const float *logits, int nc, int softmax, const nn_patch *p,
                       const float *gauss, float w, float *acc, float *wsum, lc_err *err);
    /* probs[c * nvox + v] = acc[c * nvox + v] / wsum[v] (probs may be acc; NULL: not written),
     * labels[v] = the first c of largest acc. */
    lc_rc (*win_finish)(void *bm, float *acc, const float *wsum, int nc, size_t nvox, float *probs,
                        uint8_t *labels, lc_err *err);
    /* Wait for queued work (CUDA); NULL when calls are synchronous. */
    lc_rc (*sync)(void *bm, lc_err *err);
    /* CUDA: tensor-core (FP16) convolution math on or off for steps prepared from now on;
     * NULL where everything is float32. */
    void (*set_half)(void *bm, int on);
    /* Optional, replaces prepare: every step of p at once (the CPU chooses memory layouts
     * across steps). The graph input and output buffers are plain C-order tensors. */
    lc_rc (*prepare_plan)(void *bm, nn_plan *p, lc_err *err);
} nn_backend;

extern const nn_backend nn_cpu_backend;
#ifdef RADPIPE_HAVE_CUDA
const nn_backend *gpu_cu_nn_backend(void);
#endif

/* A loaded model (gpu_nn.h): the graph, its backend state and the plans built so far, which
 * share one activation arena and one scratch buffer (grown to the largest plan's need). */
struct gpu_nn_model {
    gpu_ctx *ctx; /* borrowed: the model must be freed before it */
    const nn_backend *be;
    void *bm;
    nn_graph g;
    gpu_nn_info info;
    int out_is_prob; /* the output is a softmax over channels already */
    nn_plan *plans[NN_MAX_PLANS];
    int nplans;
    unsigned long tick;
    /* backend memory, counted: raw allocations and their NN_MEM_ALIGN-aligned starts */
    void *arena_mem, *scratch_mem, *arena, *scratch;
    size_t arena_bytes, scratch_bytes;
    int profile; /* RADPIPE_NN_PROFILE set: log each step's time */
};

/* nn_model.c: the cached plan for input shape in (built, and the arena grown, on first
 * use); running it on what its input buffer holds; its input and output in the arena. */
lc_rc nn_model_plan(struct gpu_nn_model *m, const nn_shape *in, nn_plan **out, lc_err *err);
lc_rc nn_model_run(struct gpu_nn_model *m, const nn_plan *p, lc_err *err);
float *nn_model_input(struct gpu_nn_model *m, const nn_plan *p);
const float *nn_model_output(struct gpu_nn_model *m, const nn_plan *p);

/* --- shared helpers (nn_graph.c) ----------------------------------------------------------- */

/* Elements of a shape (1 for rank 0); 0 when a dimension is 0; SIZE_MAX on overflow or a
 * negative dimension. */
size_t nn_shape_count(const nn_shape *s);
/* "1x32x64x64" into buf. */
const char *nn_shape_str(const nn_shape *s, char *buf, size_t cap);
/* The node's name for messages. */
const char *nn_node_label(const nn_node *n);
int nn_op_is_runtime(nn_opk op);
int nn_op_is_view(nn_opk op);
/* Graph: parsing (nn_onnx.c), load-time rewrites (nn_graph.c), planning (nn_plan.c). */
lc_rc nn_onnx_parse(const void *buf, size_t len, nn_graph *g, lc_err *err);
void nn_graph_release(nn_graph *g);
lc_rc nn_graph_rewrite(nn_graph *g, lc_err *err);
lc_rc nn_graph_order(nn_graph *g, lc_err *err);
/* Append a value (name copied; NULL name gives ""). Returns its index or -1 (no memory). */
int nn_graph_add_val(nn_graph *g, const char *name);

/* Fill info from the graph (shapes, channels, counts). */
void nn_graph_info(const nn_graph *g, gpu_nn_info *info);

/* Build the plan for input shape in (rank entries) on model m: shapes, folding, steps,
 * buffers, backend preparation. *out: free with nn_plan_free. */
struct gpu_nn_model;
lc_rc nn_plan_build(struct gpu_nn_model *m, const nn_shape *in, nn_plan **out, lc_err *err);
void nn_plan_free(struct gpu_nn_model *m, nn_plan *p);
/* Evaluate a constant-only node on the host (nn_fold.c). ins: the inputs' shapes/types/data;
 * *out_data: malloc'd result, caller frees. */
typedef struct nn_cval {
    nn_dtype dtype;
    nn_shape sh;
    const void *data;
} nn_cval;
lc_rc nn_fold(const nn_node *n, int64_t opset, const nn_cval *ins, int nin, const nn_graph *g,
              nn_cval *out, void **out_data, lc_err *err);
/* Output shape of a view operator (Identity, Cast, Flatten, Reshape, Squeeze, Unsqueeze) on
 * input shape in; ins[1] (Reshape's shape, Squeeze/Unsqueeze's axes) must be constant. */
lc_rc nn_view_shape(const nn_node *n, int64_t opset, const nn_shape *in, const nn_cval *ins,
                    int nin, nn_shape *out, lc_err *err);
/* Multidirectional broadcast of a and b into out; LC_ERR_INVALID when they do not broadcast. */
lc_rc nn_broadcast(const nn_node *n, const nn_shape *a, const nn_shape *b, nn_shape *out,
                   lc_err *err);

/* fp16 / bf16 bits to float (nn_onnx.c). */
float nn_half_to_float(uint16_t h);
float nn_bf16_to_float(uint16_t h);

#ifdef __cplusplus
}
#endif

#endif
