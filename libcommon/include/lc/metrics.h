/*
 * metrics.h: Prometheus metrics: counters, gauges and histograms in a registry rendered in the
 * text exposition format (version 0.0.4). Get-or-create by (name, labels) is thread-safe and
 * meant for start-up or rarely; the returned handles are updated lock-free (atomics) on hot
 * paths. Handles live as long as the registry.
 */
#ifndef LC_METRICS_H
#define LC_METRICS_H

#include <stddef.h>

typedef struct lc_metrics lc_metrics;
typedef struct lc_metric lc_counter;
typedef struct lc_metric lc_gauge;
typedef struct lc_metric lc_histogram;

lc_metrics *lc_metrics_new(void);
void lc_metrics_free(lc_metrics *m);

/* labels: Prometheus label pairs without braces, e.g. "route=\"/api/v1/studies\",code=\"200\""
 * or NULL; values use the format's escapes (see lc_metrics_escape_label). The same (name,
 * labels) returns the same handle. Returns NULL only when name is registered with another
 * type, name or labels are malformed (a histogram may not use "le"), or memory runs out;
 * update functions accept NULL. */
lc_counter *lc_metrics_counter(lc_metrics *m, const char *name, const char *help,
                               const char *labels);
lc_gauge *lc_metrics_gauge(lc_metrics *m, const char *name, const char *help, const char *labels);
/* buckets: ascending upper bounds (the +Inf bucket is implicit); NULL uses the default
 * latency buckets in seconds (0.001 .. 10). */
lc_histogram *lc_metrics_histogram(lc_metrics *m, const char *name, const char *help,
                                   const char *labels, const double *buckets, size_t nbuckets);

void lc_counter_add(lc_counter *c, double v);
static inline void lc_counter_inc(lc_counter *c)
{
    lc_counter_add(c, 1.0);
}
void lc_gauge_set(lc_gauge *g, double v);
void lc_gauge_add(lc_gauge *g, double v);
void lc_histogram_observe(lc_histogram *h, double v);

double lc_metric_value(const struct lc_metric *m); /* counter/gauge value, histogram count */

/* Render every metric (caller frees). NULL on allocation failure. */
char *lc_metrics_render(lc_metrics *m);

/* Escape a label value for use between the quotes of labels (backslash, double quote and
 * newline), truncating to fit cap bytes; always NUL-terminated when cap > 0. Returns the
 * length written. */
size_t lc_metrics_escape_label(char *dst, size_t cap, const char *value);

#endif
