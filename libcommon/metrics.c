/*
 * metrics.c: a Prometheus registry. Families (one per metric name) and their series live in
 * lists that only grow, under the registry mutex; values are atomics (doubles kept as uint64
 * bit patterns, updated with compare-and-swap), so updates never take the lock. The registry
 * owns every family and series; handles stay valid until lc_metrics_free.
 */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lc/metrics.h"

enum { M_COUNTER, M_GAUGE, M_HISTOGRAM };
static const char *const type_names[] = {"counter", "gauge", "histogram"};

static const double default_buckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                         0.25,  0.5,    1,     2.5,  5,     10};

typedef struct family family;

struct lc_metric {
    int type;
    family *fam;
    char *labels;         /* canonical: name="value",... or "" */
    _Atomic uint64_t val; /* counter/gauge value, histogram sum: double bits */
    size_t nbounds;
    double *bounds;         /* histogram upper bounds, ascending */
    _Atomic uint64_t *hits; /* per bucket (not cumulative), nbounds + 1 with +Inf last */
    struct lc_metric *next;
};

struct family {
    char *name;
    char *help;
    int type;
    struct lc_metric *first, *last;
    family *next;
};

struct lc_metrics {
    pthread_mutex_t mu;
    family *first, *last;
};

/* --- atomics ---------------------------------------------------------------------------- */

static uint64_t d2u(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof(u));
    return u;
}

static double u2d(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof(d));
    return d;
}

static void atomic_add_double(_Atomic uint64_t *p, double v)
{
    uint64_t old = atomic_load_explicit(p, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(p, &old, d2u(u2d(old) + v), memory_order_relaxed,
                                                  memory_order_relaxed))
        ;
}

/* --- names and labels ------------------------------------------------------------------- */

static int name_valid(const char *name)
{
    if (!name || !*name)
        return 0;
    for (const char *p = name; *p; p++) {
        char c = *p;
        int alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
        if (!alpha && !(p != name && c >= '0' && c <= '9'))
            return 0;
    }
    return 1;
}

/* Parse a label list ("a=\"x\", b=\"y\"") into canonical form (no spaces, no trailing comma,
 * newlines in values escaped); NULL when malformed or out of memory. Values may already use
 * the format's escapes (\\, \", \n), which are kept. */
static char *labels_canonical(const char *in, int forbid_le)
{
    size_t cap = (in ? strlen(in) : 0) * 2 + 1;
    char *out = malloc(cap), *o = out;
    if (!out)
        return NULL;
    const char *p = in ? in : "";
    for (;;) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p)
            break;
        const char *name = p;
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_'))
            goto bad;
        while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_' ||
               (*p >= '0' && *p <= '9'))
            p++;
        size_t nlen = (size_t)(p - name);
        if (forbid_le && nlen == 2 && strncmp(name, "le", 2) == 0)
            goto bad;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p++ != '=')
            goto bad;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p++ != '"')
            goto bad;
        if (o != out)
            *o++ = ',';
        memcpy(o, name, nlen);
        o += nlen;
        *o++ = '=';
        *o++ = '"';
        for (;;) {
            char c = *p++;
            if (c == '\0')
                goto bad;
            if (c == '"')
                break;
            if (c == '\\') {
                if (*p != '\\' && *p != '"' && *p != 'n')
                    goto bad;
                *o++ = '\\';
                *o++ = *p++;
            } else if (c == '\n') {
                *o++ = '\\';
                *o++ = 'n';
            } else {
                *o++ = c;
            }
        }
        *o++ = '"';
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == ',')
            p++;
        else if (*p)
            goto bad;
    }
    *o = '\0';
    return out;
bad:
    free(out);
    return NULL;
}

size_t lc_metrics_escape_label(char *dst, size_t cap, const char *value)
{
    size_t n = 0;
    for (const char *p = value ? value : ""; *p; p++) {
        const char *rep = *p == '\\' ? "\\\\" : *p == '"' ? "\\\"" : *p == '\n' ? "\\n" : NULL;
        size_t k = rep ? 2 : 1;
        if (n + k >= cap)
            break;
        if (rep)
            memcpy(dst + n, rep, 2);
        else
            dst[n] = *p;
        n += k;
    }
    if (cap)
        dst[n] = '\0';
    return n;
}

/* --- registry --------------------------------------------------------------------------- */

lc_metrics *lc_metrics_new(void)
{
    lc_metrics *m = calloc(1, sizeof(*m));
    if (m && pthread_mutex_init(&m->mu, NULL) != 0) {
        free(m);
        return NULL;
    }
    return m;
}

static void metric_free(struct lc_metric *s)
{
    free(s->labels);
    free(s->bounds);
    free(s->hits);
    free(s);
}

void lc_metrics_free(lc_metrics *m)
{
    if (!m)
        return;
    for (family *f = m->first, *fn; f; f = fn) {
        fn = f->next;
        for (struct lc_metric *s = f->first, *sn; s; s = sn) {
            sn = s->next;
            metric_free(s);
        }
        free(f->name);
        free(f->help);
        free(f);
    }
    pthread_mutex_destroy(&m->mu);
    free(m);
}

/* Find or create the series (name, labels) of the given type; called under m->mu. */
static struct lc_metric *get_locked(lc_metrics *m, int type, const char *name, const char *help,
                                    const char *labels, const double *bounds, size_t nbounds)
{
    family *f = m->first;
    while (f && strcmp(f->name, name) != 0)
        f = f->next;
    if (f && f->type != type)
        return NULL;
    for (struct lc_metric *s = f ? f->first : NULL; s; s = s->next)
        if (strcmp(s->labels, labels) == 0)
            return s;

    struct lc_metric *s = calloc(1, sizeof(*s));
    if (!s || !(s->labels = strdup(labels)))
        goto fail;
    s->type = type;
    atomic_init(&s->val, d2u(0.0));
    if (type == M_HISTOGRAM) {
        s->nbounds = nbounds;
        s->bounds = malloc((nbounds ? nbounds : 1) * sizeof(double));
        s->hits = malloc((nbounds + 1) * sizeof(*s->hits));
        if (!s->bounds || !s->hits)
            goto fail;
        if (nbounds)
            memcpy(s->bounds, bounds, nbounds * sizeof(double));
        for (size_t i = 0; i <= nbounds; i++)
            atomic_init(&s->hits[i], 0);
    }
    if (!f) {
        f = calloc(1, sizeof(*f));
        if (!f)
            goto fail;
        f->type = type;
        f->name = strdup(name);
        f->help = strdup(help ? help : "");
        if (!f->name || !f->help) {
            free(f->name);
            free(f->help);
            free(f);
            goto fail;
        }
        if (m->last)
            m->last->next = f;
        else
            m->first = f;
        m->last = f;
    }
    s->fam = f;
    if (f->last)
        f->last->next = s;
    else
        f->first = s;
    f->last = s;
    return s;
fail:
    if (s)
        metric_free(s);
    return NULL;
}

static struct lc_metric *get(lc_metrics *m, int type, const char *name, const char *help,
                             const char *labels, const double *bounds, size_t nbounds)
{
    if (!m || !name_valid(name))
        return NULL;
    char *canon = labels_canonical(labels, type == M_HISTOGRAM);
    if (!canon)
        return NULL;
    pthread_mutex_lock(&m->mu);
    struct lc_metric *s = get_locked(m, type, name, help, canon, bounds, nbounds);
    pthread_mutex_unlock(&m->mu);
    free(canon);
    return s;
}

lc_counter *lc_metrics_counter(lc_metrics *m, const char *name, const char *help,
                               const char *labels)
{
    return get(m, M_COUNTER, name, help, labels, NULL, 0);
}

lc_gauge *lc_metrics_gauge(lc_metrics *m, const char *name, const char *help, const char *labels)
{
    return get(m, M_GAUGE, name, help, labels, NULL, 0);
}

lc_histogram *lc_metrics_histogram(lc_metrics *m, const char *name, const char *help,
                                   const char *labels, const double *buckets, size_t nbuckets)
{
    if (!buckets) {
        buckets = default_buckets;
        nbuckets = sizeof(default_buckets) / sizeof(default_buckets[0]);
    }
    for (size_t i = 0; i < nbuckets; i++)
        if (!isfinite(buckets[i]) || (i > 0 && !(buckets[i] > buckets[i - 1])))
            return NULL;
    return get(m, M_HISTOGRAM, name, help, labels, buckets, nbuckets);
}

/* --- updates ---------------------------------------------------------------------------- */

void lc_counter_add(lc_counter *c, double v)
{
    /* counters only go up: a negative or NaN increment is a caller bug, dropped */
    if (c && c->type == M_COUNTER && v >= 0)
        atomic_add_double(&c->val, v);
}

void lc_gauge_set(lc_gauge *g, double v)
{
    if (g && g->type == M_GAUGE)
        atomic_store_explicit(&g->val, d2u(v), memory_order_relaxed);
}

void lc_gauge_add(lc_gauge *g, double v)
{
    if (g && g->type == M_GAUGE)
        atomic_add_double(&g->val, v);
}

void lc_histogram_observe(lc_histogram *h, double v)
{
    if (!h || h->type != M_HISTOGRAM || isnan(v))
        return;
    size_t i = 0;
    while (i < h->nbounds && v > h->bounds[i])
        i++;
    atomic_fetch_add_explicit(&h->hits[i], 1, memory_order_relaxed);
    atomic_add_double(&h->val, v);
}

double lc_metric_value(const struct lc_metric *m)
{
    if (!m)
        return 0;
    if (m->type != M_HISTOGRAM)
        return u2d(atomic_load_explicit(&m->val, memory_order_relaxed));
    uint64_t n = 0;
    for (size_t i = 0; i <= m->nbounds; i++)
        n += atomic_load_explicit(&m->hits[i], memory_order_relaxed);
    return (double)n;
}

/* --- rendering -------------------------------------------------------------------------- */

typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...)
{
    if (b->oom)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = 1;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t ncap = b->cap * 2 + (size_t)n;
        char *np = realloc(b->p, ncap);
        if (!np) {
            b->oom = 1;
            return;
        }
        b->p = np;
        b->cap = ncap;
    }
}

/* Shortest text that reads back as v, in the format's spelling of the special values. */
static void fmt_value(char out[32], double v)
{
    if (isnan(v)) {
        strcpy(out, "NaN");
    } else if (isinf(v)) {
        strcpy(out, v > 0 ? "+Inf" : "-Inf");
    } else {
        snprintf(out, 32, "%.15g", v);
        if (strtod(out, NULL) != v)
            snprintf(out, 32, "%.17g", v);
    }
}

/* HELP text escapes backslash and newline only. */
static void sb_help(sbuf *b, const char *help)
{
    for (const char *p = help; *p; p++) {
        if (*p == '\\')
            sb_printf(b, "\\\\");
        else if (*p == '\n')
            sb_printf(b, "\\n");
        else
            sb_printf(b, "%c", *p);
    }
}

static void render_histogram(sbuf *b, const char *name, const struct lc_metric *s)
{
    const char *sep = *s->labels ? "," : "";
    char v[32];
    uint64_t cum = 0;
    for (size_t i = 0; i <= s->nbounds; i++) {
        cum += atomic_load_explicit(&s->hits[i], memory_order_relaxed);
        if (i < s->nbounds)
            fmt_value(v, s->bounds[i]);
        else
            strcpy(v, "+Inf");
        sb_printf(b, "%s_bucket{%s%sle=\"%s\"} %llu\n", name, s->labels, sep, v,
                  (unsigned long long)cum);
    }
    /* _count is the +Inf bucket as read above, so the two always agree */
    fmt_value(v, u2d(atomic_load_explicit(&s->val, memory_order_relaxed)));
    if (*s->labels) {
        sb_printf(b, "%s_sum{%s} %s\n", name, s->labels, v);
        sb_printf(b, "%s_count{%s} %llu\n", name, s->labels, (unsigned long long)cum);
    } else {
        sb_printf(b, "%s_sum %s\n%s_count %llu\n", name, v, name, (unsigned long long)cum);
    }
}

char *lc_metrics_render(lc_metrics *m)
{
    sbuf b = {.cap = 4096};
    if (!m || !(b.p = malloc(b.cap)))
        return NULL;
    b.p[0] = '\0';
    pthread_mutex_lock(&m->mu);
    for (const family *f = m->first; f; f = f->next) {
        sb_printf(&b, "# HELP %s ", f->name);
        sb_help(&b, f->help);
        sb_printf(&b, "\n# TYPE %s %s\n", f->name, type_names[f->type]);
        for (const struct lc_metric *s = f->first; s; s = s->next) {
            if (f->type == M_HISTOGRAM) {
                render_histogram(&b, f->name, s);
                continue;
            }
            char v[32];
            fmt_value(v, u2d(atomic_load_explicit(&s->val, memory_order_relaxed)));
            if (*s->labels)
                sb_printf(&b, "%s{%s} %s\n", f->name, s->labels, v);
            else
                sb_printf(&b, "%s %s\n", f->name, v);
        }
    }
    pthread_mutex_unlock(&m->mu);
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    return b.p;
}
