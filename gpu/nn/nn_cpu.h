/*
 * nn_cpu.h: what the CPU backend's files share: nn_cpu.c (the backend table, the choice of
 * memory layouts across a plan's steps, our own kernels) and nn_dnnl.c (Conv and
 * ConvTranspose on oneDNN, Debian libdnnl).
 * Layouts: an activation is plain (C order: N, C, spatial) or channels-last (N, spatial, C:
 * oneDNN's ndhwc, nhwc, nwc), which its brgemm convolutions run fastest on; both take the
 * same bytes. Elementwise steps, instance and batch norm and channel concat work on either.
 * Ownership: a step's nn_dnnl_conv is its own (s->bs); reordered weights are shared by the
 * steps and plans that use them, counted in the context, and freed with their last user.
 * Thread safety: one thread at a time per model (oneDNN's OpenMP threads work inside calls).
 */
#ifndef NN_CPU_H
#define NN_CPU_H

#include "nn_internal.h"

typedef struct nn_dnnl nn_dnnl;
typedef struct nn_dnnl_conv nn_dnnl_conv;

/* Per model: oneDNN's CPU engine and stream, its primitives run on `threads` OpenMP threads.
 * *out: free with nn_dnnl_close (before the context). */
lc_rc nn_dnnl_open(gpu_ctx *ctx, int threads, nn_dnnl **out, lc_err *err);
void nn_dnnl_close(nn_dnnl *d);

/* A Conv or ConvTranspose step s (geometry resolved, weights and bias constants in backend
 * memory) reading its input channels-last when src_cl != 0 (else plain) and writing its
 * output channels-last when dst_cl != 0: the primitive with bias and activation fused, its
 * weights reordered once (shared with other steps of the same weights and format).
 * *scratch: the bytes of plan scratch a run needs. *out: free with nn_dnnl_conv_free. */
lc_rc nn_dnnl_conv_new(nn_dnnl *d, const nn_step *s, int src_cl, int dst_cl, nn_dnnl_conv **out,
                       size_t *scratch, lc_err *err);
/* y = the step on x (both borrowed, in the layouts given at creation); scratch: at least
 * *scratch bytes of nn_dnnl_conv_new, aligned to NN_MEM_ALIGN. */
lc_rc nn_dnnl_conv_run(nn_dnnl *d, const nn_dnnl_conv *c, const nn_step *s, const float *x,
                       float *y, void *scratch, lc_err *err);
/* Accepts NULL. */
void nn_dnnl_conv_free(nn_dnnl *d, nn_dnnl_conv *c);

#endif
