/*
 * test_notify.c: radpipe-notify's run (ntf_run) against a real Kafka-protocol broker
 * (librdkafka's mock cluster on loopback) and a file:// object store, on the sample MR series:
 *  - a folder with the series, a text file and a hidden file: every DICOM file is stored
 *    byte for byte under instances/<study>/<series>/<sop>.dcm and announced by exactly one
 *    valid instance.stored event (source kind "notify" with the given name, the object's URL,
 *    size and SHA-256, keyed by the study); the text file is skipped and left, the hidden one
 *    not looked at; --move removes exactly the published files;
 *  - --dry-run stores nothing, sends nothing and removes nothing.
 */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include "lc/dicom.h"
#include "lc/event.h"
#include "lc/kafka.h"
#include "lc/log.h"
#include "lc/store.h"
#include "lc/util.h"
#include "notify.h"
#include "ts.h"
#include "ts_proc.h"

#define PREFIX "tn."

typedef struct fx {
    rd_kafka_t *rk; /* hosts the mock cluster only */
    rd_kafka_mock_cluster_t *mc;
    char brokers[128];
    char *tmp, topic[128], store_dir[1024], in_dir[1024];
    lc_store *store;
    lc_kafka_producer *p;
} fx;

static int setup(void **state)
{
    char es[256], url[1100];
    lc_err e = {0};
    lc_log_init("test_notify", LC_LOG_WARN);
    fx *f = calloc(1, sizeof(*f));
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "3", es, sizeof(es));
    if (!f || !(f->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, es, sizeof(es))) ||
        !(f->mc = rd_kafka_mock_cluster_new(f->rk, 1)))
        return -1;
    lc_strlcpy(f->brokers, rd_kafka_mock_cluster_bootstraps(f->mc), sizeof(f->brokers));
    if (lc_topic_name(PREFIX, LC_TOPIC_INSTANCE_STORED, f->topic, sizeof(f->topic)) != LC_OK ||
        rd_kafka_mock_topic_create(f->mc, f->topic, 2, 1) != 0)
        return -1;
    f->tmp = ts_tmpdir("notify");
    snprintf(f->store_dir, sizeof(f->store_dir), "%s/store", f->tmp);
    snprintf(f->in_dir, sizeof(f->in_dir), "%s/in", f->tmp);
    snprintf(url, sizeof(url), "file://%s", f->store_dir);
    const lc_kafka_conf kc = {
        .brokers = f->brokers, .topic_prefix = PREFIX, .client_id = "test_notify"};
    if (mkdir(f->in_dir, 0755) != 0 || lc_store_open(url, &f->store, &e) != LC_OK ||
        lc_kafka_producer_new(&kc, &f->p, &e) != LC_OK) {
        fprintf(stderr, "setup: %s\n", lc_err_msg(&e));
        return -1;
    }
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    lc_kafka_producer_free(f->p, 1000);
    lc_store_free(f->store);
    rd_kafka_mock_cluster_destroy(f->mc);
    rd_kafka_destroy(f->rk);
    ts_rmrf(f->tmp);
    free(f->tmp);
    free(f);
    return 0;
}

static int count_files(const char *dir)
{
    char cmd[1200], *out = NULL;
    snprintf(cmd, sizeof(cmd), "find '%s' -type f 2>/dev/null | wc -l", dir);
    assert_int_equal(ts_run(cmd, &out), 0);
    int n = atoi(out);
    free(out);
    return n;
}

/* The sample series copied into in/ with a text file and a hidden file; returns the number
 * of DICOM files and their SHA-256s (sha[i], in sorted path order of the copies). */
static int fill_input(fx *f, char sha[][65], int max)
{
    char *series = ts_test_series(), dst[2048];
    char **files = ts_list_files(series);
    int n = 0;
    for (char **p = files; *p && n < max; p++, n++) {
        size_t len = 0;
        char *buf = ts_read_file(*p, &len);
        assert_non_null(buf);
        snprintf(dst, sizeof(dst), "%s/img%02d.dcm", f->in_dir, n);
        assert_int_equal(ts_write_file(dst, buf, len), 0);
        lc_sha256_hex(buf, len, sha[n]);
        free(buf);
    }
    ts_strv_free(files);
    free(series);
    snprintf(dst, sizeof(dst), "%s/notes.txt", f->in_dir);
    assert_int_equal(ts_write_file(dst, "not DICOM\n", 10), 0);
    snprintf(dst, sizeof(dst), "%s/.hidden.dcm", f->in_dir);
    assert_int_equal(ts_write_file(dst, "x", 1), 0);
    return n;
}

static void test_publish_folder_and_move(void **state)
{
    fx *f = *state;
    char sha[16][65], dump[1100], *paths[1] = {f->in_dir};
    lc_err e = {0};
    ntf_stats st = {0};
    int n = fill_input(f, sha, 16);
    assert_true(n >= 2);

    const ntf_opts o = {.name = "SCANNER1", .prefix = PREFIX, .move = 1};
    assert_int_equal(ntf_run(paths, 1, &o, f->store, f->p, NULL, &st, &e), LC_OK);
    assert_int_equal(st.published, n);
    assert_int_equal(st.skipped, 1); /* notes.txt */
    assert_int_equal(st.failed, 0);
    /* moved: only the text file and the hidden one are left */
    assert_int_equal(count_files(f->in_dir), 2);
    assert_int_equal(count_files(f->store_dir), n);

    /* one valid event per file, pointing at a stored copy of its bytes */
    snprintf(dump, sizeof(dump), "%s/events.jsonl", f->tmp);
    const char *const topics[] = {f->topic, NULL};
    assert_int_equal(ts_kafka_dump(f->brokers, topics, dump, 1500, 30000), n);
    char *text = ts_read_file(dump, NULL), *save = NULL;
    assert_non_null(text);
    int seen[16] = {0};
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        lc_event *ev = NULL;
        if (lc_event_parse(line, strlen(line), &ev, &e) != LC_OK)
            fail_msg("invalid event: %s: %s", lc_err_msg(&e), line);
        assert_string_equal(ev->type, LC_EV_INSTANCE_STORED);
        assert_string_equal(ev->source, "/radpipe/radpipe-notify");
        const cJSON *d = ev->data, *src = cJSON_GetObjectItem(d, "source");
        assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(src, "kind")), "notify");
        assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(src, "name")), "SCANNER1");
        const char *study = cJSON_GetStringValue(cJSON_GetObjectItem(d, "study_instance_uid"));
        const char *series = cJSON_GetStringValue(cJSON_GetObjectItem(d, "series_instance_uid"));
        const char *sop = cJSON_GetStringValue(cJSON_GetObjectItem(d, "sop_instance_uid"));
        const char *url = cJSON_GetStringValue(cJSON_GetObjectItem(d, "url"));
        const char *hash = cJSON_GetStringValue(cJSON_GetObjectItem(d, "sha256"));
        assert_string_equal(ev->subject, study);
        char want[2048], obj[2048], got[65];
        snprintf(obj, sizeof(obj), "%s/instances/%s/%s/%s.dcm", f->store_dir, study, series, sop);
        snprintf(want, sizeof(want), "file://%s", obj);
        assert_string_equal(url, want);
        long long size = 0;
        assert_int_equal(lc_sha256_file_hex(obj, got, &size, &e), LC_OK);
        assert_string_equal(got, hash);
        assert_int_equal((long long)cJSON_GetNumberValue(cJSON_GetObjectItem(d, "size")), size);
        int match = -1;
        for (int i = 0; i < n; i++)
            if (strcmp(sha[i], got) == 0)
                match = i;
        if (match < 0)
            fail_msg("%s is not one of the input files", obj);
        seen[match]++;
        lc_event_free(ev);
    }
    for (int i = 0; i < n; i++)
        assert_int_equal(seen[i], 1);
    free(text);
}

static void test_dry_run_changes_nothing(void **state)
{
    fx *f = *state;
    char sha[16][65], dump[1100], *paths[1] = {f->in_dir};
    lc_err e = {0};
    ntf_stats st = {0};
    int n = fill_input(f, sha, 16);
    const ntf_opts o = {.prefix = PREFIX, .move = 1, .dry_run = 1};
    assert_int_equal(ntf_run(paths, 1, &o, f->store, f->p, NULL, &st, &e), LC_OK);
    assert_int_equal(st.published, n); /* would publish */
    assert_int_equal(st.skipped, 1);
    assert_int_equal(count_files(f->in_dir), n + 2);
    assert_int_equal(count_files(f->store_dir), 0);
    snprintf(dump, sizeof(dump), "%s/events.jsonl", f->tmp);
    const char *const topics[] = {f->topic, NULL};
    assert_int_equal(ts_kafka_dump(f->brokers, topics, dump, 1500, 30000), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_publish_folder_and_move, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dry_run_changes_nothing, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
