/*
 * nn_fold.c: what the planner evaluates on the host: the shapes of the view operators
 * (Reshape, Flatten, Squeeze, Unsqueeze, Identity, Cast), broadcasting, and the operators on
 * constants that exporters emit around shapes (Shape -> Gather -> Unsqueeze -> Concat ->
 * Reshape, Cast, Slice, arithmetic, ConstantOfShape). Every index is checked; results are
 * malloc'd and belong to the caller.
 * Thread safety: pure functions.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "nn_internal.h"

static lc_rc node_err(lc_err *err, lc_rc rc, const nn_node *n, const char *what)
{
    return lc_err_set(err, rc, "node \"%s\" (%s): %s", nn_node_label(n), n->op_type, what);
}

static size_t esize(nn_dtype t)
{
    return t == NN_I64 ? sizeof(int64_t) : sizeof(float);
}

/* Normalise axis against rank r (negative counts from the end); -1 when out of range. */
static int norm_axis(int64_t axis, int r)
{
    if (axis < -r || axis >= r)
        return -1;
    return (int)(axis < 0 ? axis + r : axis);
}

/* An I64 constant as a list (at most NN_MAX_RANK entries), or the attribute list. */
static lc_rc int_list(const nn_node *n, const nn_cval *v, int64_t *out, int *cnt, lc_err *err)
{
    if (v->dtype != NN_I64 || v->sh.rank > 1)
        return node_err(err, LC_ERR_INVALID, n,
                        "an axes, shape or index list is not a 1-D integer tensor");
    size_t c = nn_shape_count(&v->sh);
    if (c > NN_MAX_RANK)
        return node_err(err, LC_ERR_UNSUPPORTED, n, "an integer list is too long");
    memcpy(out, v->data, c * sizeof(int64_t));
    *cnt = (int)c;
    return LC_OK;
}

lc_rc nn_broadcast(const nn_node *n, const nn_shape *a, const nn_shape *b, nn_shape *out,
                   lc_err *err)
{
    int r = a->rank > b->rank ? a->rank : b->rank;
    out->rank = r;
    for (int i = 0; i < r; i++) {
        int ia = i - (r - a->rank), ib = i - (r - b->rank);
        int64_t da = ia >= 0 ? a->d[ia] : 1, db = ib >= 0 ? b->d[ib] : 1;
        if (da != db && da != 1 && db != 1) {
            char sa[96], sb[96];
            return lc_err_set(err, LC_ERR_INVALID,
                              "node \"%s\" (%s): shapes %s and %s do not broadcast",
                              nn_node_label(n), n->op_type, nn_shape_str(a, sa, sizeof(sa)),
                              nn_shape_str(b, sb, sizeof(sb)));
        }
        out->d[i] = da == 1 ? db : da;
    }
    return LC_OK;
}

lc_rc nn_view_shape(const nn_node *n, int64_t opset, const nn_shape *in, const nn_cval *ins,
                    int nin, nn_shape *out, lc_err *err)
{
    int64_t list[NN_MAX_RANK];
    int cnt = 0;
    lc_rc rc;
    size_t total = nn_shape_count(in);

    switch (n->op) {
    case NN_OP_IDENTITY:
    case NN_OP_CAST:
        *out = *in;
        return LC_OK;
    case NN_OP_FLATTEN: {
        int ax = n->a.axis == in->rank ? in->rank : norm_axis(n->a.axis, in->rank);
        if (ax < 0)
            return node_err(err, LC_ERR_INVALID, n, "axis out of range");
        int64_t a = 1;
        for (int i = 0; i < ax; i++)
            a *= in->d[i];
        out->rank = 2;
        out->d[0] = a;
        out->d[1] = a ? (int64_t)total / a : 0;
        return LC_OK;
    }
    case NN_OP_RESHAPE: {
        if (nin < 2 || !ins[1].data)
            return node_err(err, LC_ERR_UNSUPPORTED, n, "the target shape must be a constant");
        if ((rc = int_list(n, &ins[1], list, &cnt, err)) != LC_OK)
            return rc;
        int infer = -1;
        int64_t known = 1;
        out->rank = cnt;
        for (int i = 0; i < cnt; i++) {
            int64_t d = list[i];
            if (d == 0 && !n->a.allowzero) {
                if (i >= in->rank)
                    return node_err(err, LC_ERR_INVALID, n, "a 0 in the shape has no input axis");
                d = in->d[i];
            }
            if (d == -1) {
                if (infer >= 0)
                    return node_err(err, LC_ERR_INVALID, n, "the shape has two -1 entries");
                infer = i;
                continue;
            }
            if (d < 0)
                return node_err(err, LC_ERR_INVALID, n, "the shape has a negative entry");
            out->d[i] = d;
            if (d && known > ((int64_t)1 << 40) / d)
                return node_err(err, LC_ERR_INVALID, n, "the shape is too large");
            known *= d;
        }
        if (infer >= 0) {
            if (known == 0 || (int64_t)total % known)
                return node_err(err, LC_ERR_INVALID, n, "the shape does not divide the input");
            out->d[infer] = (int64_t)total / known;
        } else if ((size_t)known != total) {
            char a[96], b[96];
            return lc_err_set(err, LC_ERR_INVALID,
                              "node \"%s\" (Reshape): cannot reshape %s into %s", nn_node_label(n),
                              nn_shape_str(in, a, sizeof(a)), nn_shape_str(out, b, sizeof(b)));
        }
        return LC_OK;
    }
    case NN_OP_SQUEEZE:
    case NN_OP_UNSQUEEZE: {
        int have = 0;
        if (opset >= 13) {
            if (nin > 1 && ins[1].data) {
                if ((rc = int_list(n, &ins[1], list, &cnt, err)) != LC_OK)
                    return rc;
                have = 1;
            } else if (nin > 1 && n->in[1] >= 0) {
                return node_err(err, LC_ERR_UNSUPPORTED, n, "the axes must be a constant");
            }
        } else if (n->a.has_ints[0]) {
            cnt = n->a.nints[0];
            memcpy(list, n->a.ints[0], (size_t)cnt * sizeof(int64_t));
            have = 1;
        }
        if (n->op == NN_OP_SQUEEZE) {
            char drop[NN_MAX_RANK] = {0};
            for (int i = 0; i < cnt; i++) {
                int ax = norm_axis(list[i], in->rank);
                if (ax < 0 || in->d[ax] != 1)
                    return node_err(err, LC_ERR_INVALID, n, "an axis is out of range or not 1");
                drop[ax] = 1;
            }
            out->rank = 0;
            for (int i = 0; i < in->rank; i++)
                if (!(have ? drop[i] : in->d[i] == 1))
                    out->d[out->rank++] = in->d[i];
            return LC_OK;
        }
        if (!have)
            return node_err(err, LC_ERR_INVALID, n, "axes are missing");
        int r = in->rank + cnt;
        char ins1[NN_MAX_RANK] = {0};
        if (r > NN_MAX_RANK)
            return node_err(err, LC_ERR_UNSUPPORTED, n, "the result has too many axes");
        for (int i = 0; i < cnt; i++) {
            int ax = norm_axis(list[i], r);
            if (ax < 0 || ins1[ax])
                return node_err(err, LC_ERR_INVALID, n, "an axis is out of range or repeated");
            ins1[ax] = 1;
        }
        out->rank = r;
        for (int i = 0, j = 0; i < r; i++)
            out->d[i] = ins1[i] ? 1 : in->d[j++];
        return LC_OK;
    }
    default:
        return node_err(err, LC_ERR_INTERNAL, n, "not a view operator");
    }
}

/* Strides of shape s broadcast to rank r (0 along broadcast axes). */
static void bstrides(const nn_shape *s, int r, int64_t *st)
{
    int64_t acc = 1;
    for (int i = r - 1; i >= 0; i--) {
        int j = i - (r - s->rank);
        int64_t d = j >= 0 ? s->d[j] : 1;
        st[i] = d == 1 ? 0 : acc;
        acc *= d;
    }
}

static double get_num(const nn_cval *v, size_t i)
{
    return v->dtype == NN_I64 ? (double)((const int64_t *)v->data)[i]
                              : (double)((const float *)v->data)[i];
}

static lc_rc fold_binary(const nn_node *n, const nn_cval *a, const nn_cval *b, nn_cval *out,
                         void **data, lc_err *err)
{
    nn_shape sh = {0};
    lc_rc rc = nn_broadcast(n, &a->sh, &b->sh, &sh, err);
    if (rc != LC_OK)
        return rc;
    size_t cnt = nn_shape_count(&sh);
    if (cnt > ((size_t)1 << 24))
        return node_err(err, LC_ERR_UNSUPPORTED, n, "the constant result is too large");
    nn_dtype t = a->dtype == NN_I64 && b->dtype == NN_I64 ? NN_I64 : NN_F32;
    void *o = malloc((cnt ? cnt : 1) * esize(t));
    if (!o)
        return node_err(err, LC_ERR_NOMEM, n, "out of memory");
    int64_t sa[NN_MAX_RANK], sb[NN_MAX_RANK], idx[NN_MAX_RANK] = {0};
    bstrides(&a->sh, sh.rank, sa);
    bstrides(&b->sh, sh.rank, sb);
    for (size_t i = 0; i < cnt; i++) {
        size_t ia = 0, ib = 0;
        for (int k = 0; k < sh.rank; k++) {
            ia += (size_t)(idx[k] * sa[k]);
            ib += (size_t)(idx[k] * sb[k]);
        }
        if (t == NN_I64) {
            int64_t x = ((const int64_t *)a->data)[ia], y = ((const int64_t *)b->data)[ib], r = 0;
            switch (n->op) {
            case NN_OP_ADD:
                r = (int64_t)((uint64_t)x + (uint64_t)y);
                break;
            case NN_OP_SUB:
                r = (int64_t)((uint64_t)x - (uint64_t)y);
                break;
            case NN_OP_MUL:
                r = (int64_t)((uint64_t)x * (uint64_t)y);
                break;
            default:
                if (y == 0 || (x == INT64_MIN && y == -1)) {
                    free(o);
                    return node_err(err, LC_ERR_INVALID, n, "integer division by zero");
                }
                r = x / y;
                break;
            }
            ((int64_t *)o)[i] = r;
        } else {
            double x = get_num(a, ia), y = get_num(b, ib), r;
            r = n->op == NN_OP_ADD   ? x + y
                : n->op == NN_OP_SUB ? x - y
                : n->op == NN_OP_MUL ? x * y
                                     : x / y;
            ((float *)o)[i] = (float)r;
        }
        for (int k = sh.rank - 1; k >= 0; k--) {
            if (++idx[k] < sh.d[k])
                break;
            idx[k] = 0;
        }
    }
    out->dtype = t;
    out->sh = sh;
    *data = o;
    return LC_OK;
}

static lc_rc fold_gather(const nn_node *n, const nn_cval *d, const nn_cval *ix, nn_cval *out,
                         void **data, lc_err *err)
{
    int ax = norm_axis(n->a.axis, d->sh.rank);
    if (ax < 0 || ix->dtype != NN_I64)
        return node_err(err, LC_ERR_INVALID, n, "axis out of range or indices not integers");
    if (d->sh.rank + ix->sh.rank - 1 > NN_MAX_RANK)
        return node_err(err, LC_ERR_UNSUPPORTED, n, "the result has too many axes");
    nn_shape sh = {.rank = 0};
    for (int i = 0; i < ax; i++)
        sh.d[sh.rank++] = d->sh.d[i];
    for (int i = 0; i < ix->sh.rank; i++)
        sh.d[sh.rank++] = ix->sh.d[i];
    for (int i = ax + 1; i < d->sh.rank; i++)
        sh.d[sh.rank++] = d->sh.d[i];
    size_t outer = 1, inner = 1, nidx = nn_shape_count(&ix->sh), es = esize(d->dtype);
    for (int i = 0; i < ax; i++)
        outer *= (size_t)d->sh.d[i];
    for (int i = ax + 1; i < d->sh.rank; i++)
        inner *= (size_t)d->sh.d[i];
    int64_t len = d->sh.d[ax];
    size_t cnt = outer * nidx * inner;
    char *o = malloc((cnt ? cnt : 1) * es);
    if (!o)
        return node_err(err, LC_ERR_NOMEM, n, "out of memory");
    const int64_t *iv = ix->data;
    for (size_t a = 0; a < outer; a++)
        for (size_t j = 0; j < nidx; j++) {
            int64_t k = iv[j] < 0 ? iv[j] + len : iv[j];
            if (k < 0 || k >= len) {
                free(o);
                return node_err(err, LC_ERR_INVALID, n, "an index is out of range");
            }
            memcpy(o + ((a * nidx + j) * inner) * es,
                   (const char *)d->data + ((a * (size_t)len + (size_t)k) * inner) * es,
                   inner * es);
        }
    out->dtype = d->dtype;
    out->sh = sh;
    *data = o;
    return LC_OK;
}

static lc_rc fold_slice(const nn_node *n, int64_t opset, const nn_cval *ins, int nin, nn_cval *out,
                        void **data, lc_err *err)
{
    const nn_cval *d = &ins[0];
    int64_t st[NN_MAX_RANK], en[NN_MAX_RANK], ax[NN_MAX_RANK], sp[NN_MAX_RANK];
    int ns = 0, ne = 0, na = -1, nsp = -1, r = d->sh.rank;
    lc_rc rc;

    if (opset >= 10) {
        if (nin < 3)
            return node_err(err, LC_ERR_INVALID, n, "starts and ends are missing");
        for (int i = 1; i < nin; i++)
            if (n->in[i] >= 0 && !ins[i].data)
                return node_err(err, LC_ERR_UNSUPPORTED, n, "the slice bounds must be constants");
        if ((rc = int_list(n, &ins[1], st, &ns, err)) != LC_OK ||
            (rc = int_list(n, &ins[2], en, &ne, err)) != LC_OK)
            return rc;
        if (nin > 3 && n->in[3] >= 0 && (rc = int_list(n, &ins[3], ax, &na, err)) != LC_OK)
            return rc;
        if (nin > 4 && n->in[4] >= 0 && (rc = int_list(n, &ins[4], sp, &nsp, err)) != LC_OK)
            return rc;
    } else {
        ns = n->a.nints[0];
        ne = n->a.nints[1];
        memcpy(st, n->a.ints[0], sizeof(st));
        memcpy(en, n->a.ints[1], sizeof(en));
        if (n->a.has_ints[2]) {
            na = n->a.nints[2];
            memcpy(ax, n->a.ints[2], sizeof(ax));
        }
    }
    if (ns != ne || (na >= 0 && na != ns) || (nsp >= 0 && nsp != ns))
        return node_err(err, LC_ERR_INVALID, n, "starts, ends, axes and steps differ in length");
    int64_t b[NN_MAX_RANK], step[NN_MAX_RANK];
    nn_shape sh = d->sh;
    for (int i = 0; i < r; i++) {
        b[i] = 0;
        step[i] = 1;
    }
    char seen[NN_MAX_RANK] = {0};
    for (int i = 0; i < ns; i++) {
        int a = norm_axis(na >= 0 ? ax[i] : i, r);
        if (a < 0 || seen[a])
            return node_err(err, LC_ERR_INVALID, n, "an axis is out of range or repeated");
        seen[a] = 1;
        int64_t dim = d->sh.d[a], s = st[i], e = en[i], k = nsp >= 0 ? sp[i] : 1;
        if (k == 0)
            return node_err(err, LC_ERR_INVALID, n, "a step is 0");
        if (k == INT64_MIN)
            k = -INT64_MAX;
        if (s < 0)
            s = s < -dim ? (k > 0 ? 0 : -1) : s + dim;
        if (e < 0)
            e = e < -dim ? -1 : e + dim;
        if (k > 0) {
            s = s < 0 ? 0 : s > dim ? dim : s;
            e = e < 0 ? 0 : e > dim ? dim : e;
        } else {
            s = s < 0 ? -1 : s > dim - 1 ? dim - 1 : s;
            e = e < -1 ? -1 : e > dim - 1 ? dim - 1 : e;
        }
        int64_t len =
            k > 0 ? (e > s ? (e - s - 1) / k + 1 : 0) : (s > e ? (s - e - 1) / -k + 1 : 0);
        sh.d[a] = len;
        b[a] = s;
        step[a] = k;
    }
    size_t cnt = nn_shape_count(&sh), es = esize(d->dtype);
    char *o = malloc((cnt ? cnt : 1) * es);
    if (!o)
        return node_err(err, LC_ERR_NOMEM, n, "out of memory");
    int64_t idx[NN_MAX_RANK] = {0}, str[NN_MAX_RANK] = {0}, acc = 1;
    for (int i = r - 1; i >= 0; i--) {
        str[i] = acc;
        acc *= d->sh.d[i];
    }
    for (size_t i = 0; i < cnt; i++) {
        int64_t src = 0;
        for (int k = 0; k < r; k++)
            src += (b[k] + idx[k] * step[k]) * str[k];
        memcpy(o + i * es, (const char *)d->data + (size_t)src * es, es);
        for (int k = r - 1; k >= 0; k--) {
            if (++idx[k] < sh.d[k])
                break;
            idx[k] = 0;
        }
    }
    out->dtype = d->dtype;
    out->sh = sh;
    *data = o;
    return LC_OK;
}

static lc_rc fold_concat(const nn_node *n, const nn_cval *ins, int nin, nn_cval *out, void **data,
                         lc_err *err)
{
    int r = ins[0].sh.rank, ax = norm_axis(n->a.axis, r);
    if (ax < 0)
        return node_err(err, LC_ERR_INVALID, n, "axis out of range");
    nn_shape sh = ins[0].sh;
    sh.d[ax] = 0;
    for (int i = 0; i < nin; i++) {
        if (ins[i].sh.rank != r || ins[i].dtype != ins[0].dtype)
            return node_err(err, LC_ERR_INVALID, n, "inputs differ in rank or type");
        for (int k = 0; k < r; k++)
            if (k != ax && ins[i].sh.d[k] != ins[0].sh.d[k])
                return node_err(err, LC_ERR_INVALID, n, "inputs differ off the concatenation axis");
        sh.d[ax] += ins[i].sh.d[ax];
    }
    size_t outer = 1, inner = 1, es = esize(ins[0].dtype);
    for (int k = 0; k < ax; k++)
        outer *= (size_t)sh.d[k];
    for (int k = ax + 1; k < r; k++)
        inner *= (size_t)sh.d[k];
    size_t cnt = nn_shape_count(&sh);
    char *o = malloc((cnt ? cnt : 1) * es), *p = o;
    if (!o)
        return node_err(err, LC_ERR_NOMEM, n, "out of memory");
    for (size_t a = 0; a < outer; a++)
        for (int i = 0; i < nin; i++) {
            size_t blk = (size_t)ins[i].sh.d[ax] * inner * es;
            memcpy(p, (const char *)ins[i].data + a * blk, blk);
            p += blk;
        }
    out->dtype = ins[0].dtype;
    out->sh = sh;
    *data = o;
    return LC_OK;
}

lc_rc nn_fold(const nn_node *n, int64_t opset, const nn_cval *ins, int nin, const nn_graph *g,
              nn_cval *out, void **out_data, lc_err *err)
{
    lc_rc rc;
    *out_data = NULL;
    switch (n->op) {
    case NN_OP_IDENTITY:
    case NN_OP_FLATTEN:
    case NN_OP_RESHAPE:
    case NN_OP_SQUEEZE:
    case NN_OP_UNSQUEEZE:
    case NN_OP_CAST: {
        nn_shape sh;
        if ((rc = nn_view_shape(n, opset, &ins[0].sh, ins, nin, &sh, err)) != LC_OK)
            return rc;
        size_t cnt = nn_shape_count(&ins[0].sh);
        nn_dtype t = ins[0].dtype;
        if (n->op == NN_OP_CAST)
            t = n->a.to == 1 || n->a.to == 10 || n->a.to == 11 || n->a.to == 16 ? NN_F32 : NN_I64;
        void *o = malloc((cnt ? cnt : 1) * esize(t));
        if (!o)
            return node_err(err, LC_ERR_NOMEM, n, "out of memory");
        for (size_t i = 0; i < cnt; i++) {
            if (t == ins[0].dtype)
                memcpy((char *)o + i * esize(t), (const char *)ins[0].data + i * esize(t),
                       esize(t));
            else if (t == NN_F32)
                ((float *)o)[i] = (float)((const int64_t *)ins[0].data)[i];
            else {
                float f = ((const float *)ins[0].data)[i];
                ((int64_t *)o)[i] = n->a.to == 9                        ? (f != 0)
                                    : isfinite(f) && fabsf(f) < 9.2e18f ? (int64_t)f
                                                                        : 0;
            }
        }
        out->dtype = t;
        out->sh = sh;
        *out_data = o;
        return LC_OK;
    }
    case NN_OP_ADD:
    case NN_OP_SUB:
    case NN_OP_MUL:
    case NN_OP_DIV:
        return fold_binary(n, &ins[0], &ins[1], out, out_data, err);
    case NN_OP_GATHER:
        return fold_gather(n, &ins[0], &ins[1], out, out_data, err);
    case NN_OP_SLICE:
        return fold_slice(n, opset, ins, nin, out, out_data, err);
    case NN_OP_CONCAT:
        return fold_concat(n, ins, nin, out, out_data, err);
    case NN_OP_CONST_OF_SHAPE: {
        int64_t dims[NN_MAX_RANK];
        int cnt;
        if ((rc = int_list(n, &ins[0], dims, &cnt, err)) != LC_OK)
            return rc;
        const nn_val *fill = &g->vals[n->a.value];
        nn_shape sh = {.rank = cnt};
        for (int i = 0; i < cnt; i++) {
            if (dims[i] < 0)
                return node_err(err, LC_ERR_INVALID, n, "a dimension is negative");
            sh.d[i] = dims[i];
        }
        size_t c = nn_shape_count(&sh);
        if (c > ((size_t)1 << 24))
            return node_err(err, LC_ERR_UNSUPPORTED, n, "the constant is too large");
        void *o = malloc((c ? c : 1) * esize(fill->dtype));
        if (!o)
            return node_err(err, LC_ERR_NOMEM, n, "out of memory");
        for (size_t i = 0; i < c; i++)
            memcpy((char *)o + i * esize(fill->dtype), fill->data, esize(fill->dtype));
        out->dtype = fill->dtype;
        out->sh = sh;
        *out_data = o;
        return LC_OK;
    }
    default:
        return node_err(err, LC_ERR_UNSUPPORTED, n,
                        "constant inputs only are not supported for this operator");
    }
}
