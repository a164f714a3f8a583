/*
 * nn_cuda.h: what the inference engine's CUDA files share (nn_cudnn.cu: cuDNN opened at run
 * time, convolutions, the backend table; nn_kernels.cu: every other step and the sliding
 * window's kernels). C++ for nvcc only.
 * Thread safety: a model's state is used by one host thread at a time.
 */
#ifndef NN_CUDA_H
#define NN_CUDA_H

#include "cuda_internal.h"
#include "nn/nn_internal.h"

/* Kernels of nn_kernels.cu, queued on c->stream; they return once queued. */
lc_rc nn_cu_step(gpu_cu_impl *c, const nn_step *s, const nn_bind *b, lc_err *err);
/* y[n, c, i] = act(y[n, c, i] + bias[c]) over inner positions i (bias may be NULL). */
lc_rc nn_cu_bias_act(gpu_cu_impl *c, float *y, const float *bias, int64_t n, int64_t ch,
                     int64_t inner, nn_act act, float alpha, lc_err *err);
/* dst (n, ch, d0 + pb0 + pe0, ...) = src (n, ch, d) placed at (pb) with zeros around it:
 * padded copy for convolutions with asymmetric pads. */
lc_rc nn_cu_pad(gpu_cu_impl *c, const float *src, float *dst, int64_t planes, const int64_t *d,
                const int64_t *pb, const int64_t *pd, lc_err *err);
/* dst (planes, od) = src (planes, fd) from offset off along each axis: the crop that turns a
 * full transposed convolution into the padded one. */
lc_rc nn_cu_crop(gpu_cu_impl *c, const float *src, float *dst, int64_t planes, const int64_t *fd,
                 const int64_t *off, const int64_t *od, lc_err *err);
lc_rc nn_cu_win_crop(gpu_cu_impl *c, const float *img, const nn_patch *p, float *dst, lc_err *err);
lc_rc nn_cu_win_accum(gpu_cu_impl *c, const float *logits, int nc, int softmax, const nn_patch *p,
                      const float *gauss, float w, float *acc, float *wsum, lc_err *err);
lc_rc nn_cu_win_finish(gpu_cu_impl *c, float *acc, const float *wsum, int nc, size_t nvox,
                       float *probs, uint8_t *labels, lc_err *err);

#endif
