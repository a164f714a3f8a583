/*
 * fuzz_onnx.c: libFuzzer target for the inference engine's loader (gpu/nn: protobuf-c parse
 * with its depth and allocation bounds, graph checks, batch-norm folding, fusion, ordering and
 * the plan of a fixed input shape), through gpu_nn_load on a CPU context with a 64 MiB memory
 * limit. A load must either succeed or fail with a message; a model that loads and is small
 * is also run once on zeros. Afterwards the context must hold no memory: every byte a load
 * took is returned. Never a crash, leak or hang. Seeds: tests/fuzz/onnx/.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "gpu_nn.h"
#include "nn/nn_internal.h"

static gpu_ctx *ctx; /* one context for the whole run: opening one per input costs more */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    gpu_nn_model *m = NULL;
    lc_err err = {0};

    if (!ctx) {
        gpu_ctx_opts o = {
            .backend = GPU_BACKEND_CPU, .cpu_threads = 1, .memory_limit = (size_t)64 << 20};
        if (gpu_ctx_open(&o, &ctx, &err) != LC_OK)
            abort();
    }
    lc_rc rc = gpu_nn_load(ctx, data, size, NULL, &m, &err);
    if (rc != LC_OK) {
        if (m || !err.msg[0])
            abort(); /* a failure leaves no model and says why */
    } else {
        const gpu_nn_info *info = gpu_nn_model_info(m);
        if (!info || info->rank < 3 || info->rank > 5)
            abort();
        /* run the planned shape when it is small: the kernels see every geometry the
         * planner accepted */
        if (m->nplans == 1 && m->plans[0]->arena_bytes <= ((size_t)1 << 20) &&
            m->plans[0]->out_count <= ((size_t)1 << 16)) {
            const nn_plan *p = m->plans[0];
            size_t n = nn_shape_count(&p->in_shape), flops = 0;
            for (size_t i = 0; i < p->nsteps; i++)
                flops += nn_shape_count(&p->steps[i].out.sh) *
                         (size_t)(p->steps[i].k[0] * p->steps[i].k[1] * p->steps[i].k[2] + 1) *
                         (size_t)(p->steps[i].cin ? p->steps[i].cin : 1);
            if (n <= ((size_t)1 << 16) && flops <= ((size_t)1 << 24)) {
                float *x = calloc(n, sizeof(float)), *y = malloc(p->out_count * sizeof(float) + 4);
                int64_t osh[GPU_NN_MAX_RANK];
                if (!x || !y)
                    abort();
                rc = gpu_nn_forward(m, x, p->in_shape.d, p->in_shape.rank, y, p->out_count, osh,
                                    &err);
                if (rc != LC_OK && !err.msg[0])
                    abort();
                free(x);
                free(y);
            }
        }
        gpu_nn_free(m);
    }
    gpu_mem_stats st;
    gpu_ctx_memory(ctx, &st);
    if (st.used != 0)
        abort(); /* the model's backend memory was not all returned */
    return 0;
}
