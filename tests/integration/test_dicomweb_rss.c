/*
 * test_dicomweb_rss.c: a 1 GiB STOW-RS upload keeps the api-gateway's memory flat. The real
 * gateway process runs against a fresh PostgreSQL database and a Kafka-protocol broker
 * (librdkafka's mock cluster in this process), with its spool and file:// store in one
 * temporary directory; four synthetic 256 MiB DICOM instances (a big Pixel Data element)
 * are generated on the fly by curl's read callback, so the test never holds the body either.
 * The gateway's VmRSS is sampled from /proc/<pid>/status during the upload and its VmHWM read
 * after it: both must stay under 64 MiB, and the growth over the warmed-up baseline under
 * 16 MiB. The stored objects must be byte-identical (SHA-256) and the spool empty.
 *
 * Which binary: the one `make test` builds (ASan+UBSan), as the test stack runs it, but with
 * ASan's quarantine off (ASAN_OPTIONS quarantine_size_mb=0): the quarantine keeps up to
 * 256 MiB of freed blocks resident to catch use-after-free, which puts the idle ASan gateway at
 * about 73 MiB before any request and measures ASan's bookkeeping, not the gateway. Shadow
 * memory and ASan's allocator still count, so this bound is stricter than the release build's.
 * RADPIPE_TEST_RSS_GATEWAY=path measures another binary (e.g. build/release/bin/api-gateway).
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <curl/curl.h>
#include <cjson/cJSON.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include "lc/kafka.h"
#include "lc/util.h"
#include "ts.h"
#include "ts_proc.h"

#define NINST       4
#define PIXEL_BYTES (256LL << 20) /* per instance: 8192 x 16384 x 16 bit */
#define ROWS        8192
#define COLUMNS     16384
#define LIMIT_KB    (64 * 1024)
#define GROWTH_KB   (16 * 1024)
#define STUDY       "1.2.826.0.1.3680043.10.1.88"
#define SERIES      STUDY ".1"
#define BOUNDARY    "radpipe-rss-boundary"
#define TOKEN       "rpt_rss_test_token_0123456789"

typedef struct fx {
    rd_kafka_t *mrk;
    rd_kafka_mock_cluster_t *mc;
    char brokers[256];
    char *db_url, *dir, *log;
    char url[64];
    pid_t pid;
} fx;

/* --- one DICOM header ------------------------------------------------------------------- */

typedef struct dbuf {
    unsigned char d[2048];
    size_t n;
} dbuf;

static void db_raw(dbuf *b, const void *p, size_t n)
{
    assert_true(b->n + n <= sizeof(b->d));
    memcpy(b->d + b->n, p, n);
    b->n += n;
}

static void db_u16(dbuf *b, unsigned v)
{
    unsigned char x[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
    db_raw(b, x, 2);
}

static void db_u32(dbuf *b, uint32_t v)
{
    unsigned char x[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    db_raw(b, x, 4);
}

/* Explicit VR little endian element, value padded to even length. */
static void db_el(dbuf *b, uint32_t tag, const char *vr, const void *v, size_t len)
{
    int pad = len % 2, lng = strcmp(vr, "OB") == 0 || strcmp(vr, "OW") == 0;
    db_u16(b, tag >> 16);
    db_u16(b, tag & 0xFFFF);
    db_raw(b, vr, 2);
    if (lng) {
        db_u16(b, 0);
        db_u32(b, (uint32_t)(len + pad));
    } else {
        db_u16(b, (unsigned)(len + pad));
    }
    db_raw(b, v, len);
    if (pad)
        db_raw(b, strcmp(vr, "UI") == 0 || strcmp(vr, "OB") == 0 ? "\0" : " ", 1);
}

static void db_str(dbuf *b, uint32_t tag, const char *vr, const char *s)
{
    db_el(b, tag, vr, s, strlen(s));
}

static void db_us(dbuf *b, uint32_t tag, unsigned v)
{
    unsigned char x[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
    db_el(b, tag, "US", x, 2);
}

/* Everything of instance i up to the Pixel Data value (whose header announces PIXEL_BYTES). */
static void make_header(int i, dbuf *b, char sop[65])
{
    dbuf m = {0};
    char num[16];
    snprintf(sop, 65, SERIES ".%d", i + 1);
    snprintf(num, sizeof(num), "%d", i + 1);
    db_el(&m, 0x00020001, "OB", "\0\1", 2);
    db_str(&m, 0x00020002, "UI", "1.2.840.10008.5.1.4.1.1.7");
    db_str(&m, 0x00020003, "UI", sop);
    db_str(&m, 0x00020010, "UI", "1.2.840.10008.1.2.1");
    db_str(&m, 0x00020012, "UI", "1.2.826.0.1.3680043.10.1.9");
    memset(b, 0, sizeof(*b));
    b->n = 128;
    db_raw(b, "DICM", 4);
    db_u16(b, 0x0002);
    db_u16(b, 0x0000);
    db_raw(b, "UL", 2);
    db_u16(b, 4);
    db_u32(b, (uint32_t)m.n);
    db_raw(b, m.d, m.n);
    db_str(b, 0x00080016, "UI", "1.2.840.10008.5.1.4.1.1.7");
    db_str(b, 0x00080018, "UI", sop);
    db_str(b, 0x00080020, "DA", "20240401");
    db_str(b, 0x00080060, "CS", "OT");
    db_str(b, 0x00100010, "PN", "Rss^Test");
    db_str(b, 0x00100020, "LO", "RSS-1");
    db_str(b, 0x0020000D, "UI", STUDY);
    db_str(b, 0x0020000E, "UI", SERIES);
    db_str(b, 0x00200013, "IS", num);
    db_us(b, 0x00280002, 1);
    db_str(b, 0x00280004, "CS", "MONOCHROME2");
    db_us(b, 0x00280010, ROWS);
    db_us(b, 0x00280011, COLUMNS);
    db_us(b, 0x00280100, 16);
    db_us(b, 0x00280101, 16);
    db_us(b, 0x00280102, 15);
    db_us(b, 0x00280103, 0);
    db_u16(b, 0x7FE0);
    db_u16(b, 0x0010);
    db_raw(b, "OW", 2);
    db_u16(b, 0);
    db_u32(b, (uint32_t)PIXEL_BYTES);
}

/* --- the body, generated as curl asks for it ----------------------------------------------- */

typedef struct body {
    int inst;      /* instance being sent; NINST: the closing delimiter */
    int stage;     /* 0 part head, 1 DICOM header, 2 pixels, 3 CRLF */
    long long off; /* within the stage */
    dbuf hdr;
    char sop[NINST][65];
    lc_sha256 *h;
    char sha[NINST][65];
    long long sent;
    unsigned char chunk[64 * 1024];
} body;

static const char part_head[] = "--" BOUNDARY "\r\nContent-Type: application/dicom\r\n\r\n";
static const char closing[] = "--" BOUNDARY "--\r\n";

static long long body_size(void)
{
    dbuf b;
    char sop[65];
    long long n = 0;
    for (int i = 0; i < NINST; i++) {
        make_header(i, &b, sop);
        n += (long long)(sizeof(part_head) - 1) + (long long)b.n + PIXEL_BYTES + 2;
    }
    return n + (long long)(sizeof(closing) - 1);
}

static size_t emit(body *s, char *out, size_t cap, const void *src, long long len)
{
    size_t n = (size_t)(len - s->off) < cap ? (size_t)(len - s->off) : cap;
    memcpy(out, (const char *)src + s->off, n);
    s->off += (long long)n;
    return n;
}

static size_t on_read(char *out, size_t size, size_t nitems, void *ud)
{
    body *s = ud;
    size_t cap = size * nitems, n = 0;
    while (n == 0) {
        if (s->inst == NINST) {
            if (s->off >= (long long)sizeof(closing) - 1)
                return 0;
            n = emit(s, out, cap, closing, (long long)sizeof(closing) - 1);
            break;
        }
        switch (s->stage) {
        case 0:
            if (s->off == 0) {
                make_header(s->inst, &s->hdr, s->sop[s->inst]);
                s->h = lc_sha256_new();
                lc_sha256_update(s->h, s->hdr.d, s->hdr.n);
            }
            if (s->off < (long long)sizeof(part_head) - 1) {
                n = emit(s, out, cap, part_head, (long long)sizeof(part_head) - 1);
                continue;
            }
            break;
        case 1:
            if (s->off < (long long)s->hdr.n) {
                n = emit(s, out, cap, s->hdr.d, (long long)s->hdr.n);
                continue;
            }
            break;
        case 2:
            if (s->off < PIXEL_BYTES) {
                long long left = PIXEL_BYTES - s->off;
                n = cap < sizeof(s->chunk) ? cap : sizeof(s->chunk);
                if ((long long)n > left)
                    n = (size_t)left;
                /* varies with position and instance: a stored copy cannot match by chance */
                for (size_t k = 0; k < n; k += 8)
                    memcpy(s->chunk + k,
                           &(uint64_t){(uint64_t)(s->off + (long long)k) * 0x9E37u +
                                       (uint64_t)s->inst},
                           8);
                memcpy(out, s->chunk, n);
                lc_sha256_update(s->h, s->chunk, n);
                s->off += (long long)n;
                continue;
            }
            lc_sha256_final_hex(s->h, s->sha[s->inst]);
            lc_sha256_free(s->h);
            s->h = NULL;
            break;
        default:
            if (s->off < 2) {
                n = emit(s, out, cap, "\r\n", 2);
                continue;
            }
            s->inst++;
            s->stage = -1;
            break;
        }
        s->stage++;
        s->off = 0;
    }
    s->sent += (long long)n;
    return n;
}

static size_t on_resp(char *p, size_t size, size_t n, void *ud)
{
    char **buf = ud;
    size_t have = *buf ? strlen(*buf) : 0, len = size * n;
    char *b = realloc(*buf, have + len + 1);
    if (!b)
        return 0;
    memcpy(b + have, p, len);
    b[have + len] = '\0';
    *buf = b;
    return len;
}

/* --- /proc ------------------------------------------------------------------------------- */

static long proc_kb(pid_t pid, const char *field)
{
    char path[64], line[256];
    long v = -1;
    size_t n = strlen(field);
    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, field, n) == 0 && line[n] == ':')
            v = strtol(line + n + 1, NULL, 10);
    fclose(f);
    return v;
}

typedef struct sampler {
    pid_t pid;
    atomic_int stop;
    long max_kb;
    int samples;
} sampler;

static void *sample_rss(void *arg)
{
    sampler *s = arg;
    while (!atomic_load(&s->stop)) {
        long kb = proc_kb(s->pid, "VmRSS");
        if (kb > s->max_kb)
            s->max_kb = kb;
        s->samples++;
        usleep(20 * 1000);
    }
    return NULL;
}

/* --- set-up ------------------------------------------------------------------------------- */

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    char es[256], path[1200];
    assert_non_null(f);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "3", es, sizeof(es));
    f->mrk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, es, sizeof(es));
    assert_non_null(f->mrk);
    f->mc = rd_kafka_mock_cluster_new(f->mrk, 1);
    assert_non_null(f->mc);
    lc_strlcpy(f->brokers, rd_kafka_mock_cluster_bootstraps(f->mc), sizeof(f->brokers));
    for (int t = 0; t < LC_TOPIC__COUNT; t++) {
        char name[256];
        assert_int_equal(lc_topic_name("radpipe.", (lc_topic)t, name, sizeof(name)), LC_OK);
        assert_int_equal(rd_kafka_mock_topic_create(f->mc, name, 1, 1), 0);
    }
    if (!(f->db_url = ts_pg_fresh_db("dicomweb_rss")))
        fail_msg("RADPIPE_TEST_PG_URL is not set: run through tests/run.sh");
    f->dir = ts_tmpdir("dicomweb-rss");
    if (asprintf(&f->log, "%s/api-gateway.log", f->dir) < 0)
        abort();
    snprintf(path, sizeof(path), "%s/token", f->dir);
    assert_int_equal(ts_write_file(path, TOKEN "\n", strlen(TOKEN) + 1), 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    if (f->pid > 0)
        ts_kill(f->pid);
    rd_kafka_mock_cluster_destroy(f->mc);
    rd_kafka_destroy(f->mrk);
    if (!getenv("RADPIPE_TEST_KEEP_VAR"))
        ts_rmrf(f->dir);
    free(f->dir);
    free(f->db_url);
    free(f->log);
    free(f);
    curl_global_cleanup();
    return 0;
}

static pid_t start_gateway(fx *f)
{
    const char *bin_env = getenv("RADPIPE_TEST_RSS_GATEWAY");
    char *bin = bin_env && *bin_env ? strdup(bin_env) : ts_bin("api-gateway");
    const char *asan = getenv("ASAN_OPTIONS");
    char *env[16];
    int n = 0, port = ts_free_port();
#define ADD(...)                                                                                   \
    do {                                                                                           \
        if (asprintf(&env[n++], __VA_ARGS__) < 0)                                                  \
            abort();                                                                               \
    } while (0)
    ADD("RADPIPE_DATABASE_URL=%s", f->db_url);
    ADD("RADPIPE_KAFKA_BROKERS=%s", f->brokers);
    ADD("RADPIPE_STORE_URL=file://%s/objects", f->dir);
    ADD("RADPIPE_SPOOL_DIR=%s/spool", f->dir);
    ADD("RADPIPE_HTTP_LISTEN=127.0.0.1:%d", port);
    ADD("RADPIPE_ADMIN_TOKEN_FILE=%s/token", f->dir);
    ADD("RADPIPE_HTTP_MAX_BODY_BYTES=2G");
    ADD("RADPIPE_DRAIN_SECONDS=5");
    ADD("RADPIPE_DB_WAIT_SECONDS=20");
    /* see the comment atop: ASan's quarantine is not the gateway's memory */
    ADD("ASAN_OPTIONS=%s%squarantine_size_mb=0:thread_local_quarantine_size_kb=0", asan ? asan : "",
        asan && *asan ? ":" : "");
#undef ADD
    env[n] = NULL;
    char *argv[] = {bin, NULL};
    fprintf(stderr, "gateway: %s\n", bin);
    pid_t pid = ts_spawn(argv, (const char *const *)env, f->log);
    for (int i = 0; i < n; i++)
        free(env[i]);
    free(bin);
    assert_true(pid > 0);
    snprintf(f->url, sizeof(f->url), "http://127.0.0.1:%d", port);
    char url[128];
    snprintf(url, sizeof(url), "%s/healthz", f->url);
    for (int i = 0; i < 300; i++) {
        if (ts_http("GET", url, NULL, NULL, NULL, 0, NULL, NULL) == 200)
            return pid;
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            char *log = ts_read_file(f->log, NULL);
            fail_msg("the gateway exited at start: %s", log ? log : "");
        }
        usleep(100 * 1000);
    }
    fail_msg("the gateway did not answer /healthz");
    return -1;
}

/* POST the generated body; returns the status and the answer in *resp. */
static long stow(fx *f, body *s, long long size, char **resp)
{
    char url[128];
    struct curl_slist *h = NULL;
    long status = 0;
    CURL *c = curl_easy_init();
    snprintf(url, sizeof(url), "%s/dicomweb/studies", f->url);
    h = curl_slist_append(h, "Authorization: Bearer " TOKEN);
    h = curl_slist_append(h, "Content-Type: multipart/related; type=\"application/dicom\"; "
                             "boundary=" BOUNDARY);
    h = curl_slist_append(h, "Accept: application/dicom+json");
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_POST, 1L);
    curl_easy_setopt(c, CURLOPT_READFUNCTION, on_read);
    curl_easy_setopt(c, CURLOPT_READDATA, s);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)size);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_resp);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, resp);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 300L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    CURLcode cc = curl_easy_perform(c);
    if (cc != CURLE_OK)
        fprintf(stderr, "curl: %s\n", curl_easy_strerror(cc));
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    return status;
}

static void test_stow_1gib_rss(void **state)
{
    fx *f = *state;
    body *s = calloc(1, sizeof(*s));
    char *resp = NULL;
    sampler smp = {0};
    pthread_t t;
    assert_non_null(s);

    f->pid = start_gateway(f);
    long start_kb = proc_kb(f->pid, "VmRSS");
    /* warm-up: the same code paths once with a small body (threads, pools, GDCM) */
    {
        char url[128], *r = NULL;
        snprintf(url, sizeof(url), "%s/dicomweb/studies?PatientID=RSS-1", f->url);
        assert_int_equal(ts_http("GET", url, TOKEN, NULL, NULL, 0, &r, NULL), 200);
        free(r);
    }
    long base_kb = proc_kb(f->pid, "VmRSS");

    long long size = body_size();
    assert_true(size > (1LL << 30));
    smp.pid = f->pid;
    assert_int_equal(pthread_create(&t, NULL, sample_rss, &smp), 0);
    int64_t t0 = lc_now_ms();
    long status = stow(f, s, size, &resp);
    int64_t ms = lc_now_ms() - t0;
    atomic_store(&smp.stop, 1);
    pthread_join(t, NULL);
    long hwm_kb = proc_kb(f->pid, "VmHWM"), end_kb = proc_kb(f->pid, "VmRSS");
    fprintf(stderr,
            "STOW-RS of %lld bytes (%d instances) in %lld ms: gateway VmRSS at start %ld kB, "
            "warmed up %ld kB, peak of %d samples %ld kB, after %ld kB; VmHWM %ld kB "
            "(limit %d kB)\n",
            size, NINST, (long long)ms, start_kb, base_kb, smp.samples, smp.max_kb, end_kb, hwm_kb,
            LIMIT_KB);
    if (status != 200) {
        char *log = ts_read_file(f->log, NULL);
        fail_msg("STOW-RS answered %ld: %s\n%s", status, resp ? resp : "", log ? log : "");
    }
    assert_int_equal(s->sent, size);
    assert_true(smp.samples > 10);
    assert_true(hwm_kb > 0 && smp.max_kb > 0);
    if (hwm_kb >= LIMIT_KB || smp.max_kb >= LIMIT_KB)
        fail_msg("the gateway's RSS reached %ld kB (VmHWM %ld kB): over 64 MiB", smp.max_kb,
                 hwm_kb);
    if (smp.max_kb - base_kb >= GROWTH_KB)
        fail_msg("the upload grew the gateway's RSS by %ld kB", smp.max_kb - base_kb);

    /* every instance stored, byte for byte; nothing left in the spool */
    cJSON *j = cJSON_Parse(resp);
    assert_int_equal(
        cJSON_GetArraySize(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "00081199"), "Value")),
        NINST);
    assert_null(cJSON_GetObjectItem(j, "00081198"));
    cJSON_Delete(j);
    for (int i = 0; i < NINST; i++) {
        char path[1400], hex[65];
        lc_err err = {0};
        snprintf(path, sizeof(path), "%s/objects/instances/%s/%s/%s.dcm", f->dir, STUDY, SERIES,
                 s->sop[i]);
        if (lc_sha256_file_hex(path, hex, NULL, &err) != LC_OK)
            fail_msg("stored instance %d: %s", i, lc_err_msg(&err));
        assert_string_equal(hex, s->sha[i]);
    }
    char spool[1200];
    snprintf(spool, sizeof(spool), "%s/spool", f->dir);
    char **left = ts_list_files(spool);
    assert_non_null(left);
    assert_null(left[0]);
    ts_strv_free(left);

    /* a clean exit: SIGTERM drains, and under ASan a leak would fail the exit status */
    kill(f->pid, SIGTERM);
    int ws = ts_wait(f->pid, 60000);
    f->pid = 0;
    if (ws == -1 || !WIFEXITED(ws) || WEXITSTATUS(ws) != 0) {
        char *log = ts_read_file(f->log, NULL);
        fail_msg("the gateway did not exit cleanly (status %d): %s", ws, log ? log : "");
    }
    free(resp);
    free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stow_1gib_rss),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
