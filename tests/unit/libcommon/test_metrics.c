/*
 * test_metrics.c: the Prometheus registry: exact text exposition for a small registry
 * (counters, gauges, histograms, labels, escapes), default buckets, special values, type
 * clashes and invalid names, and exact counts under concurrent updates.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lc/metrics.h"

static void test_render_exact(void **state)
{
    (void)state;
    lc_metrics *m = lc_metrics_new();
    assert_non_null(m);
    lc_counter *ok =
        lc_metrics_counter(m, "rp_requests_total", "Requests served.", "route=\"/a\",code=\"200\"");
    lc_counter_add(ok, 3);
    /* spacing is not part of the identity: canonical form is name="value",... */
    lc_counter *err = lc_metrics_counter(m, "rp_requests_total", "ignored", " code = \"500\" ");
    lc_counter_inc(err);
    assert_ptr_equal(lc_metrics_counter(m, "rp_requests_total", NULL, "code=\"500\""), err);
    lc_counter_add(ok, -5); /* counters never go down */

    lc_gauge *g = lc_metrics_gauge(m, "rp_inflight", "In flight\\ now\nsecond line", NULL);
    lc_gauge_set(g, 2.5);
    lc_gauge_add(g, -1);
    char esc[64], labels[96];
    lc_metrics_escape_label(esc, sizeof(esc), "a\"b\\c\nd");
    snprintf(labels, sizeof(labels), "path=\"%s\"", esc);
    lc_gauge *odd = lc_metrics_gauge(m, "rp_inflight", NULL, labels);
    assert_non_null(odd);
    lc_gauge_set(odd, -0.125);

    const double b[] = {0.25, 1};
    lc_histogram *h =
        lc_metrics_histogram(m, "rp_latency_seconds", "Latency.", "route=\"/a\"", b, 2);
    lc_histogram_observe(h, 0.125);
    lc_histogram_observe(h, 0.25); /* le is inclusive */
    lc_histogram_observe(h, 0.5);
    lc_histogram_observe(h, 2);
    lc_histogram_observe(h, NAN); /* dropped */
    const double sb[] = {1024};
    lc_histogram *sizes = lc_metrics_histogram(m, "rp_sizes_bytes", "Sizes.", NULL, sb, 1);
    lc_histogram_observe(sizes, 10);

    assert_true(lc_metric_value(ok) == 3);
    assert_true(lc_metric_value(g) == 1.5);
    assert_true(lc_metric_value(h) == 4);

    char *text = lc_metrics_render(m);
    assert_non_null(text);
    const char *want = "# HELP rp_requests_total Requests served.\n"
                       "# TYPE rp_requests_total counter\n"
                       "rp_requests_total{route=\"/a\",code=\"200\"} 3\n"
                       "rp_requests_total{code=\"500\"} 1\n"
                       "# HELP rp_inflight In flight\\\\ now\\nsecond line\n"
                       "# TYPE rp_inflight gauge\n"
                       "rp_inflight 1.5\n"
                       "rp_inflight{path=\"a\\\"b\\\\c\\nd\"} -0.125\n"
                       "# HELP rp_latency_seconds Latency.\n"
                       "# TYPE rp_latency_seconds histogram\n"
                       "rp_latency_seconds_bucket{route=\"/a\",le=\"0.25\"} 2\n"
                       "rp_latency_seconds_bucket{route=\"/a\",le=\"1\"} 3\n"
                       "rp_latency_seconds_bucket{route=\"/a\",le=\"+Inf\"} 4\n"
                       "rp_latency_seconds_sum{route=\"/a\"} 2.875\n"
                       "rp_latency_seconds_count{route=\"/a\"} 4\n"
                       "# HELP rp_sizes_bytes Sizes.\n"
                       "# TYPE rp_sizes_bytes histogram\n"
                       "rp_sizes_bytes_bucket{le=\"1024\"} 1\n"
                       "rp_sizes_bytes_bucket{le=\"+Inf\"} 1\n"
                       "rp_sizes_bytes_sum 10\n"
                       "rp_sizes_bytes_count 1\n";
    assert_string_equal(text, want);
    free(text);
    lc_metrics_free(m);
}

static void test_default_buckets_and_values(void **state)
{
    (void)state;
    lc_metrics *m = lc_metrics_new();
    lc_histogram *h = lc_metrics_histogram(m, "d_seconds", "D.", NULL, NULL, 0);
    assert_non_null(h);
    lc_histogram_observe(h, 0.003);
    lc_histogram_observe(h, 30);
    lc_gauge *g = lc_metrics_gauge(m, "g", "G.", "k=\"nan\"");
    lc_gauge_set(g, NAN);
    lc_gauge_set(lc_metrics_gauge(m, "g", NULL, "k=\"inf\""), INFINITY);
    lc_gauge_set(lc_metrics_gauge(m, "g", NULL, "k=\"-inf\""), -INFINITY);
    lc_gauge_set(lc_metrics_gauge(m, "g", NULL, "k=\"tenth\""), 0.1);
    lc_gauge_set(lc_metrics_gauge(m, "g", NULL, "k=\"big\""), 1e21);
    lc_gauge_set(lc_metrics_gauge(m, "g", NULL, "k=\"third\""), 1.0 / 3);
    char *text = lc_metrics_render(m);
    const char *want = "# HELP d_seconds D.\n"
                       "# TYPE d_seconds histogram\n"
                       "d_seconds_bucket{le=\"0.001\"} 0\n"
                       "d_seconds_bucket{le=\"0.0025\"} 0\n"
                       "d_seconds_bucket{le=\"0.005\"} 1\n"
                       "d_seconds_bucket{le=\"0.01\"} 1\n"
                       "d_seconds_bucket{le=\"0.025\"} 1\n"
                       "d_seconds_bucket{le=\"0.05\"} 1\n"
                       "d_seconds_bucket{le=\"0.1\"} 1\n"
                       "d_seconds_bucket{le=\"0.25\"} 1\n"
                       "d_seconds_bucket{le=\"0.5\"} 1\n"
                       "d_seconds_bucket{le=\"1\"} 1\n"
                       "d_seconds_bucket{le=\"2.5\"} 1\n"
                       "d_seconds_bucket{le=\"5\"} 1\n"
                       "d_seconds_bucket{le=\"10\"} 1\n"
                       "d_seconds_bucket{le=\"+Inf\"} 2\n"
                       "d_seconds_sum 30.003\n"
                       "d_seconds_count 2\n"
                       "# HELP g G.\n"
                       "# TYPE g gauge\n"
                       "g{k=\"nan\"} NaN\n"
                       "g{k=\"inf\"} +Inf\n"
                       "g{k=\"-inf\"} -Inf\n"
                       "g{k=\"tenth\"} 0.1\n"
                       "g{k=\"big\"} 1e+21\n"
                       "g{k=\"third\"} 0.33333333333333331\n";
    assert_string_equal(text, want);
    free(text);
    lc_metrics_free(m);
}

static void test_type_clash_and_invalid(void **state)
{
    (void)state;
    lc_metrics *m = lc_metrics_new();
    lc_counter *c = lc_metrics_counter(m, "jobs_total", "Jobs.", NULL);
    assert_non_null(c);
    assert_ptr_equal(lc_metrics_counter(m, "jobs_total", "Jobs.", NULL), c);
    assert_null(lc_metrics_gauge(m, "jobs_total", "x", NULL));
    assert_null(lc_metrics_gauge(m, "jobs_total", "x", "other=\"labels\""));
    assert_null(lc_metrics_histogram(m, "jobs_total", "x", NULL, NULL, 0));
    /* names */
    assert_null(lc_metrics_counter(m, "1abc", "x", NULL));
    assert_null(lc_metrics_counter(m, "a-b", "x", NULL));
    assert_null(lc_metrics_counter(m, "", "x", NULL));
    assert_null(lc_metrics_counter(m, NULL, "x", NULL));
    assert_non_null(lc_metrics_counter(m, "ns:sub_total9", "x", NULL));
    /* labels */
    assert_null(lc_metrics_counter(m, "l_total", "x", "a=b"));
    assert_null(lc_metrics_counter(m, "l_total", "x", "a=\"unterminated"));
    assert_null(lc_metrics_counter(m, "l_total", "x", "a=\"bad\\escape\""));
    assert_null(lc_metrics_counter(m, "l_total", "x", "9a=\"x\""));
    assert_null(lc_metrics_counter(m, "l_total", "x", "a=\"x\" b=\"y\""));
    assert_null(lc_metrics_histogram(m, "h", "x", "le=\"1\"", NULL, 0));
    /* buckets must ascend strictly and be finite */
    const double down[] = {1, 0.5};
    const double inf[] = {1, INFINITY};
    assert_null(lc_metrics_histogram(m, "h", "x", NULL, down, 2));
    assert_null(lc_metrics_histogram(m, "h", "x", NULL, inf, 2));
    /* updates through the wrong kind of handle, or NULL, change nothing */
    lc_gauge_set(c, 7);
    lc_histogram_observe(c, 7);
    lc_counter_add(NULL, 1);
    lc_gauge_set(NULL, 1);
    lc_histogram_observe(NULL, 1);
    assert_true(lc_metric_value(c) == 0);
    assert_true(lc_metric_value(NULL) == 0);
    assert_null(lc_metrics_counter(NULL, "x", "x", NULL));
    assert_null(lc_metrics_render(NULL));
    lc_metrics_free(m);
    lc_metrics_free(NULL);

    char small[6];
    assert_int_equal(lc_metrics_escape_label(small, sizeof(small), "a\"bc"), 5);
    assert_string_equal(small, "a\\\"bc");
    assert_int_equal(lc_metrics_escape_label(small, sizeof(small), "ab\n\n"), 4);
    assert_string_equal(small, "ab\\n");
}

#define THREADS 4
#define INCS    100000

typedef struct worker {
    lc_metrics *m;
    pthread_barrier_t go; /* all threads start together, so their updates overlap */
} worker;

static void *hammer(void *arg)
{
    worker *w = arg;
    pthread_barrier_wait(&w->go);
    /* get-or-create races with the other threads too */
    lc_counter *c = lc_metrics_counter(w->m, "hits_total", "Hits.", "k=\"v\"");
    lc_gauge *g = lc_metrics_gauge(w->m, "level", "Level.", NULL);
    lc_histogram *h = lc_metrics_histogram(w->m, "obs", "Obs.", NULL, NULL, 0);
    for (int i = 0; i < INCS; i++) {
        lc_counter_inc(c);
        lc_gauge_add(g, (i & 1) ? -0.5 : 1.5);
        lc_histogram_observe(h, (i & 1) ? 0.002 : 3);
    }
    return NULL;
}

static void test_concurrency_exact(void **state)
{
    (void)state;
    lc_metrics *m = lc_metrics_new();
    pthread_t th[THREADS];
    worker w = {.m = m};
    pthread_barrier_init(&w.go, NULL, THREADS);
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, hammer, &w), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&w.go);
    lc_counter *c = lc_metrics_counter(m, "hits_total", NULL, "k=\"v\"");
    assert_true(lc_metric_value(c) == (double)THREADS * INCS);
    assert_true(lc_metric_value(lc_metrics_gauge(m, "level", NULL, NULL)) ==
                (double)THREADS * INCS / 2);
    assert_true(lc_metric_value(lc_metrics_histogram(m, "obs", NULL, NULL, NULL, 0)) ==
                (double)THREADS * INCS);
    char *text = lc_metrics_render(m);
    assert_non_null(strstr(text, "hits_total{k=\"v\"} 400000\n"));
    assert_non_null(strstr(text, "level 200000\n"));
    assert_non_null(strstr(text, "obs_bucket{le=\"0.0025\"} 200000\n"));
    assert_non_null(strstr(text, "obs_bucket{le=\"2.5\"} 200000\n"));
    assert_non_null(strstr(text, "obs_bucket{le=\"5\"} 400000\n"));
    assert_non_null(strstr(text, "obs_count 400000\n"));
    /* one family per name although every thread asked for it */
    assert_null(strstr(strstr(text, "# TYPE hits_total") + 1, "# TYPE hits_total"));
    free(text);
    lc_metrics_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_render_exact),
        cmocka_unit_test(test_default_buckets_and_values),
        cmocka_unit_test(test_type_clash_and_invalid),
        cmocka_unit_test(test_concurrency_exact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
