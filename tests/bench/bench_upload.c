/*
 * bench_upload.c: the storage-uploader's job function (upl_job, linked from the service's
 * objects) timed against an S3 endpoint, for tests/bench/bench_upload.sh, which times
 * `aws s3 cp --recursive` on the same files and the same endpoint.
 *   bench_upload gen TEMPLATE N BIGMIB: N CT instances made from the DICOM file TEMPLATE
 *     (explicit VR little endian; UIDs rewritten in place) in one study of 4 series, and a
 *     study holding one BIGMIB MiB instance, written as files into the file:// store
 *     RADPIPE_STORE_URL and indexed in RADPIPE_DATABASE_URL (migrated first). Prints
 *     "instances_study=<uid> big_study=<uid> instances=<n> instances_bytes=<b> big_bytes=<b>".
 *   bench_upload run STUDY URL_PATTERN: one upload job for STUDY (layout instance,
 *     destination URL_PATTERN) through upl_job with the service's configuration from the
 *     environment (RADPIPE_ARCHIVE_URL, RADPIPE_UPLOAD_*, RADPIPE_S3_*). Prints
 *     "objects=<n> written=<n> bytes=<b> ms=<wall time of the job>".
 * Single-threaded driver; the job runs its own copy threads.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "lc/jobs.h"
#include "lc/log.h"
#include "lc/util.h"
#include "upl.h"

#define NSERIES 4

static void die(const char *what, const lc_err *e)
{
    fprintf(stderr, "bench_upload: %s: %s\n", what, e ? lc_err_msg(e) : strerror(errno));
    exit(1);
}

static char *xfmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xfmt(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    if (vasprintf(&s, fmt, ap) < 0)
        abort();
    va_end(ap);
    return s;
}

static char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = n > 0 ? malloc((size_t)n) : NULL;
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void write_all(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, len, f) != len || fclose(f) != 0)
        die(path, NULL);
}

/* The root directory of a file:// store URL. */
static const char *store_root(const char *url)
{
    if (strncmp(url, "file://", 7) != 0) {
        fprintf(stderr, "bench_upload: RADPIPE_STORE_URL must be a file:// URL\n");
        exit(2);
    }
    return url + 7;
}

/* --- a DICOM template with its UIDs found -------------------------------------------------- */

typedef struct tmpl {
    char *bytes;
    size_t len;
    size_t off[4], vlen[4]; /* media SOP (0002,0003), SOP, study, series */
} tmpl;

static const unsigned kTags[4] = {0x00020003, 0x00080018, 0x0020000D, 0x0020000E};

static void tmpl_load(tmpl *t, const char *path)
{
    memset(t, 0, sizeof(*t));
    if (!(t->bytes = read_all(path, &t->len)) || t->len < 140 ||
        memcmp(t->bytes + 128, "DICM", 4) != 0) {
        fprintf(stderr, "bench_upload: \"%s\" is not a DICOM Part 10 file\n", path);
        exit(2);
    }
    const unsigned char *p = (const unsigned char *)t->bytes;
    for (size_t pos = 132; pos + 8 <= t->len;) {
        unsigned tag =
            (unsigned)(p[pos] | p[pos + 1] << 8) << 16 | (unsigned)(p[pos + 2] | p[pos + 3] << 8);
        const char *vr = t->bytes + pos + 4;
        size_t hdr = 8, vl = (size_t)(p[pos + 6] | p[pos + 7] << 8);
        if (!memcmp(vr, "OB", 2) || !memcmp(vr, "OW", 2) || !memcmp(vr, "SQ", 2) ||
            !memcmp(vr, "UN", 2) || !memcmp(vr, "UT", 2) || !memcmp(vr, "OF", 2)) {
            hdr = 12;
            vl = (size_t)p[pos + 8] | (size_t)p[pos + 9] << 8 | (size_t)p[pos + 10] << 16 |
                 (size_t)p[pos + 11] << 24;
        }
        for (int k = 0; k < 4; k++)
            if (tag == kTags[k]) {
                t->off[k] = pos + hdr;
                t->vlen[k] = vl;
            }
        if (tag == 0x7FE00010u || vl == 0xFFFFFFFFu)
            break;
        pos += hdr + vl;
    }
    for (int k = 0; k < 4; k++)
        if (!t->off[k] || t->vlen[k] < 12) {
            fprintf(stderr, "bench_upload: \"%s\" is not explicit VR little endian with UIDs\n",
                    path);
            exit(2);
        }
}

/* A UID of exactly len characters: "2.25." and digits, from id. */
static void uid_of(char *out, size_t len, unsigned long long id)
{
    char digits[80];
    snprintf(digits, sizeof(digits), "1%0*llu", (int)(len - 6), id);
    snprintf(out, len + 1, "2.25.%s", digits);
}

/* --- the index --------------------------------------------------------------------------- */

typedef struct rows {
    char *sop, *series, *key, *size, *sha, *num; /* array literals being built */
    size_t n;
} rows;

static void append(char **arr, const char *v)
{
    char *old = *arr;
    *arr = xfmt("%s%s%s", old ? old : "", old ? "," : "", v);
    free(old);
}

static void exec(lc_db *db, const char *sql, int n, const char *const *p)
{
    lc_err e = {0};
    if (lc_db_exec(db, sql, n, p, NULL, &e) != LC_OK)
        die(sql, &e);
}

static void index_rows(lc_db *db, const char *study, rows *r)
{
    char *a[6] = {xfmt("{%s}", r->sop),  xfmt("{%s}", r->series), xfmt("{%s}", r->key),
                  xfmt("{%s}", r->size), xfmt("{%s}", r->sha),    xfmt("{%s}", r->num)};
    const char *p[7] = {study, a[0], a[1], a[2], a[3], a[4], a[5]};
    exec(db,
         "INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, store_key, "
         "size_bytes, sha256, instance_number) SELECT s, se, $1, '1.2.840.10008.5.1.4.1.1.2', "
         "k, z, h, n FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], "
         "$7::int[]) AS t(s, se, k, z, h, n)",
         7, p);
    for (int i = 0; i < 6; i++)
        free(a[i]);
    free(r->sop);
    free(r->series);
    free(r->key);
    free(r->size);
    free(r->sha);
    free(r->num);
    memset(r, 0, sizeof(*r));
}

static void add_study(lc_db *db, const char *study, char series[][80], int nseries)
{
    const char *p[1] = {study};
    exec(db, "INSERT INTO studies (study_uid, patient_id, modalities) VALUES ($1, 'BENCH', '{CT}')",
         1, p);
    for (int s = 0; s < nseries; s++) {
        const char *p2[2] = {series[s], study};
        exec(db, "INSERT INTO series (series_uid, study_uid, modality) VALUES ($1, $2, 'CT')", 2,
             p2);
    }
}

static void mkdirs(const char *path)
{
    lc_err e = {0};
    if (lc_mkdirs(path, 0755, &e) != LC_OK)
        die(path, &e);
}

static int gen(lc_db *db, const char *root, const char *template_path, int n, long long big_mib)
{
    tmpl t;
    char study[80], series[NSERIES][80], sop[80], num[16], sz[24], hex[65];
    long long bytes = 0;
    rows r = {0};
    tmpl_load(&t, template_path);
    uid_of(study, t.vlen[2], 9100000ULL);
    for (int s = 0; s < NSERIES; s++)
        uid_of(series[s], t.vlen[3], 9200000ULL + (unsigned long long)s);
    add_study(db, study, series, NSERIES);
    memcpy(t.bytes + t.off[2], study, t.vlen[2]);
    for (int i = 0; i < n; i++) {
        int s = i % NSERIES;
        uid_of(sop, t.vlen[1], 9300000ULL + (unsigned long long)i);
        memcpy(t.bytes + t.off[1], sop, t.vlen[1]);
        memcpy(t.bytes + t.off[0], sop, t.vlen[0] < t.vlen[1] ? t.vlen[0] : t.vlen[1]);
        memcpy(t.bytes + t.off[3], series[s], t.vlen[3]);
        char *key = xfmt("instances/%s/%s/%s.dcm", study, series[s], sop);
        char *dir = xfmt("%s/instances/%s/%s", root, study, series[s]);
        char *path = xfmt("%s/%s", root, key);
        if (i < NSERIES)
            mkdirs(dir);
        write_all(path, t.bytes, t.len);
        lc_sha256_hex(t.bytes, t.len, hex);
        snprintf(sz, sizeof(sz), "%zu", t.len);
        snprintf(num, sizeof(num), "%d", i / NSERIES + 1);
        append(&r.sop, sop);
        append(&r.series, series[s]);
        append(&r.key, key);
        append(&r.size, sz);
        append(&r.sha, hex);
        append(&r.num, num);
        bytes += (long long)t.len;
        free(key);
        free(dir);
        free(path);
        if (++r.n == 500)
            index_rows(db, study, &r);
    }
    if (r.n)
        index_rows(db, study, &r);
    free(t.bytes);

    /* one large instance: pseudo-random bytes (the uploader never parses them) */
    char bstudy[80], bseries[1][80], bsop[80];
    uid_of(bstudy, 40, 9400000ULL);
    uid_of(bseries[0], 40, 9500000ULL);
    uid_of(bsop, 40, 9600000ULL);
    add_study(db, bstudy, bseries, 1);
    char *bkey = xfmt("instances/%s/%s/%s.dcm", bstudy, bseries[0], bsop);
    char *bdir = xfmt("%s/instances/%s/%s", root, bstudy, bseries[0]);
    char *bpath = xfmt("%s/%s", root, bkey);
    mkdirs(bdir);
    FILE *f = fopen(bpath, "wb");
    size_t chunk = 8u << 20;
    uint64_t *buf = malloc(chunk), x = 88172645463325252ull;
    lc_sha256 *h = lc_sha256_new();
    if (!f || !buf || !h)
        die(bpath, NULL);
    for (long long done = 0; done < big_mib << 20; done += (long long)chunk) {
        for (size_t i = 0; i < chunk / 8; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf[i] = x;
        }
        lc_sha256_update(h, buf, chunk);
        if (fwrite(buf, 1, chunk, f) != chunk)
            die(bpath, NULL);
    }
    if (fclose(f) != 0)
        die(bpath, NULL);
    lc_sha256_final_hex(h, hex);
    lc_sha256_free(h);
    free(buf);
    snprintf(sz, sizeof(sz), "%lld", big_mib << 20);
    r = (rows){.sop = strdup(bsop),
               .series = strdup(bseries[0]),
               .key = strdup(bkey),
               .size = strdup(sz),
               .sha = strdup(hex),
               .num = strdup("1"),
               .n = 1};
    index_rows(db, bstudy, &r);
    printf("instances_study=%s big_study=%s instances=%d instances_bytes=%lld big_bytes=%lld\n",
           study, bstudy, n, bytes, big_mib << 20);
    free(bkey);
    free(bdir);
    free(bpath);
    return 0;
}

/* --- one job ----------------------------------------------------------------------------- */

static int run(lc_db *db, const char *study, const char *pattern)
{
    static upl_cfg cfg;
    lc_cfg_table table = {upl_cfg_vars, upl_cfg_nvars, &cfg};
    lc_service svc = {0};
    upl_ctx u = {0};
    lc_job_worker w;
    lc_err e = {0};
    char id[37];
    int created = 0;
    lc_job *job = NULL;
    cJSON *result = NULL;
    if (lc_cfg_load(&table, 1, &e) != LC_OK)
        die("configuration", &e);
    const char *store_url = getenv("RADPIPE_STORE_URL");
    if (lc_store_open(store_url, &svc.store, &e) != LC_OK)
        die("store", &e);
    svc.metrics = lc_metrics_new();
    svc.cfg.drain_seconds = 0;
    atomic_init(&svc.stop, 0);
    if (upl_init(&u, &svc, &cfg, &e) != LC_OK)
        die("upl_init", &e);
    lc_job_worker_init(&w, "radpipe.", "/radpipe/bench", 600, 3);
    cJSON *params = cJSON_CreateObject();
    cJSON_AddStringToObject(params, "url_pattern", pattern);
    cJSON_AddStringToObject(params, "layout", "instance");
    if (lc_job_create(db, w.prefix, w.source, "upload", study, params, NULL, 3, id, &created, &e) !=
            LC_OK ||
        lc_job_claim(db, &w, id, &job, &e) != LC_OK)
        die("job", &e);
    cJSON_Delete(params);
    lc_worker_job j = {.job = job, .svc = &svc, .db = db, .w = &w};
    int64_t t0 = lc_now_ms();
    lc_rc rc = upl_job(&u, &j, &result, &e);
    int64_t ms = lc_now_ms() - t0;
    if (rc != LC_OK)
        die("upload job", &e);
    printf("objects=%d written=%d bytes=%.0f ms=%lld\n",
           cJSON_GetObjectItem(result, "objects")->valueint,
           cJSON_GetObjectItem(result, "written")->valueint,
           cJSON_GetObjectItem(result, "bytes")->valuedouble, (long long)ms);
    cJSON_Delete(result);
    lc_job_free(job);
    upl_release(&u);
    lc_store_free(svc.store);
    lc_metrics_free(svc.metrics);
    lc_cfg_release(&table, 1);
    return 0;
}

int main(int argc, char **argv)
{
    lc_log_init("bench_upload", LC_LOG_WARN);
    const char *db_url = getenv("RADPIPE_DATABASE_URL");
    const char *store_url = getenv("RADPIPE_STORE_URL");
    int is_gen = argc == 5 && strcmp(argv[1], "gen") == 0;
    int is_run = argc == 4 && strcmp(argv[1], "run") == 0;
    if ((!is_gen && !is_run) || !db_url || !store_url) {
        fprintf(stderr, "usage: bench_upload gen TEMPLATE N BIGMIB | run STUDY URL_PATTERN\n"
                        "(with RADPIPE_DATABASE_URL and RADPIPE_STORE_URL=file://DIR set)\n");
        return 2;
    }
    lc_db *db = NULL;
    lc_err e = {0};
    if (lc_db_connect(db_url, 30000, NULL, &db, &e) != LC_OK || lc_db_migrate(db, &e) != LC_OK)
        die("database", &e);
    int rc = is_gen ? gen(db, store_root(store_url), argv[2], atoi(argv[3]), atoll(argv[4]))
                    : run(db, argv[2], argv[3]);
    lc_db_free(db);
    return rc;
}
