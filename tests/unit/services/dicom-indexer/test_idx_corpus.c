/*
 * test_idx_corpus.c: every file of the shared DICOM corpus through the real batch handler
 * (idx_handle_batch) into a fresh PostgreSQL database, one instance.stored event per file; the
 * stored columns are compared with DCMTK's dcmdump of the same file (PatientName with DCMTK's
 * UTF-8 conversion, or the known decodings where Debian's DCMTK lacks the charset), the
 * normalised names with the C library's towupper, the DICOM JSON with the columns. Files
 * that are not indexable instances are quarantined with the reason listed here; malformed
 * files in the middle of a batch never stop the valid files after them. Then every instance
 * is sent again: no count changes. Skips (with a message) when the corpus is not there.
 */
#include <locale.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>
#include <wctype.h>
#include <cmocka.h>
#include "idx.h"
#include "lc/event.h"
#include "lc/util.h"
#include "ts.h"

#define TOPIC "radpipe.instance.stored"

/* Files that are not indexable, with what the quarantine reason must say: DICOMDIRs and other
 * objects without the identity UIDs, damaged files, transfer syntaxes GDCM 3.0.21 lacks. */
static const struct {
    const char *path, *reason;
} kQuarantined[] = {
    {"charsets/chrSQEncoding.dcm", "StudyInstanceUID is missing"},
    {"charsets/chrSQEncoding1.dcm", "StudyInstanceUID is missing"},
    {"dicomdir/DICOMDIR", "StudyInstanceUID is missing"},
    {"dicomdir/DICOMDIR-bigEnd", "StudyInstanceUID is missing"},
    {"dicomdir/DICOMDIR-empty.dcm", "StudyInstanceUID is missing"},
    {"dicomdir/DICOMDIR-implicit", "StudyInstanceUID is missing"},
    {"dicomdir/DICOMDIR-nooffset", "truncated"},
    {"dicomdir/DICOMDIR-nopatient", "StudyInstanceUID is missing"},
    {"dicomdir/DICOMDIR-reordered", "StudyInstanceUID is missing"},
    {"malformed/empty_charset_LEI.dcm", "StudyInstanceUID is missing"},
    {"malformed/fo-dicom_GH177_D_CLUNIE_CT1_IVRLE_BigEndian_undefined_length.dcm",
     "undefined length UN"},
    {"malformed/fo-dicom_GH179B.dcm", "invalid VR"},
    {"malformed/fo-dicom_GH220.dcm", "StudyInstanceUID is missing"},
    {"malformed/fo-dicom_GH223.dcm", "StudyInstanceUID is missing"},
    {"malformed/fo-dicom_GH487.dcm", "StudyInstanceUID is missing"},
    {"malformed/meta_missing_tsyntax.dcm", "no TransferSyntaxUID"},
    {"malformed/no_meta.dcm", "not DICOM"},
    {"malformed/no_meta_group_length.dcm", "StudyInstanceUID is missing"},
    {"malformed/rtplan_truncated.dcm", "truncated"},
    {"private/UN_sequence.dcm", "StudyInstanceUID is missing"},
    {"private/nested_priv_SQ.dcm", "StudyInstanceUID is missing"},
    {"private/priv_SQ.dcm", "StudyInstanceUID is missing"},
    {"seg/liver_seg_deflated_image_frame.dcm",
     "unsupported transfer syntax \"1.2.840.10008.1.2.8.1\""},
    {"syntaxes/misc/HTJ2K_08_RGB.dcm", "unsupported transfer syntax \"1.2.840.10008.1.2.4.203\""},
};

/* Patient names Debian's DCMTK cannot convert (ISO 2022 IR 87): pydicom's known decodings of
 * D. Clunie's charset files. */
static const struct {
    const char *file, *name;
} kKnownNames[] = {
    {"charsets/chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"},
    {"charsets/chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"},
    {"charsets/chrJapMulti.dcm", "やまだ^たろう"},
    {"charsets/chrJapMultiExplicitIR6.dcm", "やまだ^たろう"},
};

/* Files whose UTF-8 name must have been compared (Latin-1, Japanese, Korean and more). */
static const char *const kMustCompareName[] = {
    "charsets/chrFren.dcm", "charsets/chrGerm.dcm",  "charsets/chrH31.dcm",
    "charsets/chrH32.dcm",  "charsets/chrI2.dcm",    "charsets/chrKoreanMulti.dcm",
    "charsets/chrRuss.dcm", "charsets/chrGreek.dcm", "charsets/chrX1.dcm",
};

typedef struct strlist {
    char **v;
    size_t n, cap;
} strlist;

static void sl_add(strlist *l, char *s)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->v = realloc(l->v, l->cap * sizeof(char *));
        assert_non_null(l->v);
    }
    l->v[l->n++] = s;
}

static void sl_free(strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static char *xprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xprintf(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    assert_true(n >= 0);
    return s;
}

/* path in single quotes for sh */
static char *shq(const char *s)
{
    size_t n = strlen(s);
    char *q = malloc(4 * n + 3), *o = q;
    assert_non_null(q);
    *o++ = '\'';
    for (; *s; s++) {
        if (*s == '\'') {
            memcpy(o, "'\\''", 4);
            o += 4;
        } else {
            *o++ = *s;
        }
    }
    *o++ = '\'';
    *o = '\0';
    return q;
}

/* ---- dcmdump as the reference ------------------------------------------------------------ */

static const char kDumpTags[] = " +P 0010,0010 +P 0010,0020 +P 0008,0020 +P 0020,000d"
                                " +P 0020,000e +P 0008,0018 +P 0008,0060 +P 0028,0008"
                                " +P 0028,0010 +P 0028,0011";

/* dcmdump of files[from, to) in one run, with UTF-8 conversion (+U8) or without (raw),
 * recovering from parse errors (+Ep: a truncated file still shows its header): out[i] is the
 * section of files[from + i], NULL where DCMTK failed. */
static void dcmdump_batch(const strlist *files, size_t from, size_t to, int u8, char **out)
{
    size_t cap = 256 + sizeof(kDumpTags), len;
    for (size_t i = from; i < to; i++)
        cap += 4 * strlen(files->v[i]) + 3;
    char *cmd = malloc(cap);
    assert_non_null(cmd);
    len = (size_t)snprintf(cmd, cap, "dcmdump -q -M -Un +Ep +L +p %s +F%s", u8 ? "+U8" : "",
                           kDumpTags);
    for (size_t i = from; i < to; i++) {
        char *q = shq(files->v[i]);
        len += (size_t)snprintf(cmd + len, cap - len, " %s", q);
        free(q);
    }
    snprintf(cmd + len, cap - len, " 2>/dev/null");
    char *dump = NULL;
    ts_run(cmd, &dump); /* non-zero when any file failed: those sections are empty */
    free(cmd);
    for (size_t i = from; i < to; i++)
        out[i - from] = NULL;
    const size_t n = to - from;
    for (char *sec = dump ? strstr(dump, "# dcmdump (") : NULL; sec;) {
        size_t k = 0, total = 0;
        if (sscanf(sec, "# dcmdump (%zu/%zu)", &k, &total) != 2 || k < 1 || k > n)
            break;
        char *body = strchr(sec, '\n');
        char *next = body ? strstr(body, "\n# dcmdump (") : NULL;
        size_t blen = body ? (next ? (size_t)(next - body) : strlen(body)) : 0;
        int empty = 1;
        for (size_t j = 0; j < blen; j++)
            if (body[j] == '(')
                empty = 0;
        out[k - 1] = empty ? NULL : strndup(body, blen);
        sec = next ? next + 1 : NULL;
    }
    free(dump);
}

/* The value of top-level tag ("gggg,eeee") in a dump: "[text]" or a bare value; "" for an
 * empty value, NULL when absent. dcmdump shows UN values as hex bytes: decoded back. */
static char *dump_value(const char *dump, const char *tag)
{
    char key[16];
    snprintf(key, sizeof(key), "(%s) ", tag);
    for (const char *line = dump; line && *line;) {
        const char *eol = strchr(line, '\n');
        size_t len = eol ? (size_t)(eol - line) : strlen(line);
        if (len > 14 && strncmp(line, key, 12) == 0) {
            const int un = strncmp(line + 12, "UN", 2) == 0;
            const char *v = line + 12 + 2, *end = line + len;
            while (v < end && *v == ' ')
                v++;
            const char *hash = end;
            while (hash > v && !(hash[0] == '#' && hash[-1] == ' '))
                hash--;
            char *val;
            if (v < end && *v == '[') {
                const char *close = hash;
                while (close > v && *close != ']')
                    close--;
                if (close <= v)
                    return NULL;
                val = strndup(v + 1, (size_t)(close - v - 1));
            } else if (strncmp(v, "(no value available)", 20) == 0) {
                return strdup("");
            } else {
                const char *w = v;
                while (w < end && *w != ' ')
                    w++;
                val = strndup(v, (size_t)(w - v));
            }
            if (un) {
                size_t k = 0;
                for (const char *h = val; h[0] && h[1]; h += h[2] == '\\' ? 3 : 2) {
                    unsigned x;
                    if (sscanf(h, "%2x", &x) != 1)
                        break;
                    val[k++] = (char)x;
                    if (h[2] != '\\')
                        break;
                }
                val[k] = '\0';
            }
            /* DICOM padding */
            size_t n = strlen(val);
            while (n > 0 && (val[n - 1] == ' ' || val[n - 1] == '\0'))
                val[--n] = '\0';
            size_t s = 0;
            while (val[s] == ' ')
                s++;
            memmove(val, val + s, n - s + 1);
            return val;
        }
        line = eol ? eol + 1 : NULL;
    }
    return NULL;
}

/* ---- fixture ------------------------------------------------------------------------------ */

typedef struct fx {
    char *url, *dir;
    lc_db *db;
    lc_store *store;
    lc_metrics *metrics;
    idx_ctx x;
    int64_t offset;
} fx;

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    lc_err err = {0};
    assert_non_null(f);
    f->url = ts_pg_fresh_db("idxcorpus");
    if (!f->url)
        fail_msg("RADPIPE_TEST_PG_URL is not set or the server refused: run through tests/run.sh");
    if (lc_db_connect(f->url, 5000, NULL, &f->db, &err) != LC_OK ||
        lc_db_migrate(f->db, &err) != LC_OK)
        fail_msg("database: %s", lc_err_msg(&err));
    f->dir = ts_tmpdir("idxcorpus");
    char *surl = xprintf("file://%s", f->dir);
    if (lc_store_open(surl, &f->store, &err) != LC_OK)
        fail_msg("store: %s", lc_err_msg(&err));
    free(surl);
    f->metrics = lc_metrics_new();
    idx_cfg cfg = {.batch_max = 500,
                   .quiet_seconds = 3600,
                   .job_max_attempts = 5,
                   .parse_threads = 2,
                   .verify_sha256 = 1};
    if (idx_init(&f->x, f->db, f->store, "radpipe.", "/radpipe/dicom-indexer", &cfg, f->metrics,
                 &err) != LC_OK)
        fail_msg("idx_init: %s", lc_err_msg(&err));
    f->offset = 1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    idx_release(&f->x);
    lc_metrics_free(f->metrics);
    lc_store_free(f->store);
    lc_db_free(f->db);
    ts_rmrf(f->dir);
    free(f->dir);
    free(f->url);
    free(f);
    return 0;
}

/* An instance.stored message for the object under key with the given UIDs. */
static void make_msg(fx *f, const char *key, const char *study, const char *series, const char *sop,
                     lc_kafka_msg *m, char **payload)
{
    char sha[65];
    size_t len = 0;
    char *u = xprintf("%s/%s", lc_store_url(f->store), key);
    void *buf = NULL;
    assert_int_equal(lc_store_get_buf(f->store, key, 1u << 30, &buf, &len, NULL), LC_OK);
    lc_sha256_hex(buf, len, sha);
    free(buf);
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "study_instance_uid", study);
    cJSON_AddStringToObject(d, "series_instance_uid", series);
    cJSON_AddStringToObject(d, "sop_instance_uid", sop);
    cJSON_AddStringToObject(d, "url", u);
    cJSON_AddNumberToObject(d, "size", (double)len);
    cJSON_AddStringToObject(d, "sha256", sha);
    lc_event *ev = NULL;
    lc_err err = {0};
    if (lc_event_new(LC_EV_INSTANCE_STORED, "/radpipe/test", study, d, &ev, &err) != LC_OK)
        fail_msg("event: %s", lc_err_msg(&err));
    *payload = lc_event_to_json(ev);
    lc_event_free(ev);
    free(u);
    *m = (lc_kafka_msg){.topic = TOPIC,
                        .partition = 0,
                        .offset = f->offset++,
                        .key = study,
                        .key_len = strlen(study),
                        .payload = *payload,
                        .len = strlen(*payload),
                        .timestamp_ms = -1};
}

static void run_batch(fx *f, const lc_kafka_msg *m, size_t n)
{
    lc_err err = {0};
    if (idx_handle_batch(&f->x, m, n, NULL, &err) != LC_OK)
        fail_msg("batch: %s", lc_err_msg(&err));
}

/* A one-row query as one '|'-joined string (NULL as "\N"); caller frees. */
static char *row(fx *f, const char *sql, const char *p1)
{
    PGresult *r = NULL;
    const char *p[1] = {p1};
    lc_err err = {0};
    if (lc_db_exec(f->db, sql, 1, p, &r, &err) != LC_OK)
        fail_msg("%s: %s", sql, lc_err_msg(&err));
    if (PQntuples(r) != 1) {
        PQclear(r);
        return NULL;
    }
    size_t cap = 64;
    for (int c = 0; c < PQnfields(r); c++)
        cap += (size_t)PQgetlength(r, 0, c) + 4;
    char *s = calloc(1, cap);
    for (int c = 0; c < PQnfields(r); c++) {
        if (c)
            strcat(s, "|");
        strcat(s, PQgetisnull(r, 0, c) ? "\\N" : PQgetvalue(r, 0, c));
    }
    PQclear(r);
    return s;
}

static long long count(fx *f, const char *sql)
{
    PGresult *r = NULL;
    lc_err err = {0};
    if (lc_db_exec(f->db, sql, 0, NULL, &r, &err) != LC_OK)
        fail_msg("%s: %s", sql, lc_err_msg(&err));
    long long v = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

/* towupper of every character (the C library's Unicode tables under C.UTF-8): the reference
 * for the *_norm columns. */
static char *upper_utf8(const char *s)
{
    size_t n = mbstowcs(NULL, s, 0);
    assert_true(n != (size_t)-1);
    wchar_t *w = calloc(n + 1, sizeof(wchar_t));
    mbstowcs(w, s, n + 1);
    for (size_t i = 0; i < n; i++)
        w[i] = (wchar_t)towupper((wint_t)w[i]);
    size_t m = wcstombs(NULL, w, 0);
    char *o = calloc(m + 1, 1);
    wcstombs(o, w, m + 1);
    free(w);
    return o;
}

static const char *reason_for(const char *rel)
{
    for (size_t i = 0; i < sizeof(kQuarantined) / sizeof(*kQuarantined); i++)
        if (strcmp(kQuarantined[i].path, rel) == 0)
            return kQuarantined[i].reason;
    return NULL;
}

static const char *known_name(const char *rel)
{
    for (size_t i = 0; i < sizeof(kKnownNames) / sizeof(*kKnownNames); i++)
        if (strcmp(kKnownNames[i].file, rel) == 0)
            return kKnownNames[i].name;
    return NULL;
}

/* Every file of the corpus (not its notes and licences), sorted. */
static int walk_cb(strlist *out, const char *dir)
{
    char *cmd = xprintf("find %s -type f ! -path '*/LICENSES/*' ! -name SOURCES.md "
                        "! -name README.md | sort",
                        dir);
    char *list = NULL;
    assert_int_equal(ts_run(cmd, &list), 0);
    free(cmd);
    for (char *save = NULL, *t = strtok_r(list, "\n", &save); t; t = strtok_r(NULL, "\n", &save))
        sl_add(out, strdup(t));
    free(list);
    qsort(out->v, out->n, sizeof(char *), cmp_str);
    return (int)out->n;
}

/* Compare the index with dcmdump for one file that was just indexed; returns mismatches. */
static int compare(fx *f, const char *rel, const char *sop, const char *dump, const char *dump8,
                   int *names_compared)
{
    int bad = 0;
    char *got = row(f,
                    "SELECT st.patient_name, st.patient_id, st.study_date, i.study_uid,"
                    " i.series_uid, i.sop_uid, se.modality, i.number_of_frames, i.rows,"
                    " i.columns, st.patient_name_norm,"
                    " m.json->'00100010'->'Value'->0->>'Alphabetic',"
                    " m.json->'00080018'->'Value'->>0, p.patient_name"
                    " FROM instances i JOIN series se ON se.series_uid = i.series_uid"
                    " JOIN studies st ON st.study_uid = i.study_uid"
                    " LEFT JOIN patients p ON p.patient_key = st.patient_key"
                    " LEFT JOIN instance_metadata m ON m.sop_uid = i.sop_uid"
                    " WHERE i.sop_uid = $1",
                    sop);
    if (!got) {
        printf("MISSING %s: no instance row for %s\n", rel, sop);
        return 1;
    }
    char *col[14];
    char *s = got;
    for (int c = 0; c < 14; c++) {
        col[c] = s;
        s = strchr(s, '|');
        if (s)
            *s++ = '\0';
        else
            s = (char *)"";
    }
    struct {
        const char *tag;
        int c;
    } strs[] = {
        {"0010,0020", 1}, {"0020,000d", 3}, {"0020,000e", 4}, {"0008,0018", 5}, {"0008,0060", 6}};
    for (size_t k = 0; k < sizeof(strs) / sizeof(*strs); k++) {
        char *want = dump_value(dump, strs[k].tag);
        if (want && *want && strcmp(want, col[strs[k].c]) != 0) {
            printf("MISMATCH %s (%s): dcmdump [%s], index [%s]\n", rel, strs[k].tag, want,
                   col[strs[k].c]);
            bad++;
        }
        free(want);
    }
    /* StudyDate: the index keeps well-formed dates only */
    char *date = dump_value(dump, "0008,0020");
    if (date && strlen(date) == 8 && strspn(date, "0123456789") == 8 && strcmp(date, col[2]) != 0) {
        printf("MISMATCH %s (StudyDate): dcmdump [%s], index [%s]\n", rel, date, col[2]);
        bad++;
    }
    free(date);
    /* Rows, Columns, NumberOfFrames (1 for an image without it; NULL for no image) */
    char *rows = dump_value(dump, "0028,0010");
    struct {
        const char *tag;
        int c;
    } ints[] = {{"0028,0010", 8}, {"0028,0011", 9}, {"0028,0008", 7}};
    for (size_t k = 0; k < 3; k++) {
        char *v = dump_value(dump, ints[k].tag);
        char want[32] = "\\N";
        char *end = NULL;
        long n = v && *v ? strtol(v, &end, 10) : 0;
        int comparable = !(v && *v) || (end && *end == '\0');
        if (v && *v && comparable && n > 0)
            snprintf(want, sizeof(want), "%ld", n);
        else if (k == 2 && (!v || !*v) && rows && atoi(rows) > 0)
            snprintf(want, sizeof(want), "1");
        if (comparable && strcmp(want, col[ints[k].c]) != 0) {
            printf("MISMATCH %s (%s): dcmdump [%s], index [%s]\n", rel, ints[k].tag,
                   v ? v : "(absent)", col[ints[k].c]);
            bad++;
        }
        free(v);
    }
    free(rows);
    /* PatientName: UTF-8 from DCMTK's conversion, or the known decoding */
    const char *known = known_name(rel);
    char *name = known ? strdup(known) : dump8 ? dump_value(dump8, "0010,0010") : NULL;
    if (name && *name) {
        (*names_compared)++;
        /* patients are keyed by PatientID: no row without one */
        char *pid = dump_value(dump, "0010,0020");
        const char *want_patient = pid && *pid ? name : "\\N";
        free(pid);
        if (strcmp(name, col[0]) != 0 || strcmp(want_patient, col[13]) != 0) {
            printf("MISMATCH %s (PatientName): reference [%s], study [%s], patient [%s]\n", rel,
                   name, col[0], col[13]);
            bad++;
        }
        char *up = upper_utf8(name);
        if (strcmp(up, col[10]) != 0) {
            printf("MISMATCH %s (patient_name_norm): towupper [%s], index [%s]\n", rel, up,
                   col[10]);
            bad++;
        }
        free(up);
        /* the DICOM JSON's Alphabetic group is the name up to the first '=' */
        size_t alpha = strcspn(name, "=");
        if (alpha > 0 && (strlen(col[11]) != alpha || strncmp(col[11], name, alpha) != 0)) {
            printf("MISMATCH %s (JSON PatientName): [%s] for [%s]\n", rel, col[11], name);
            bad++;
        }
    }
    if (strcmp(col[12], sop) != 0) {
        printf("MISMATCH %s (JSON SOPInstanceUID): [%s]\n", rel, col[12]);
        bad++;
    }
    free(name);
    free(got);
    return bad;
}

static void test_corpus(void **state)
{
    fx *f = *state;
    const char *root = ts_samples_dir();
    if (!root) {
        printf("SKIP test_corpus: no DICOM corpus (set RADPIPE_SAMPLES_DIR)\n");
        skip();
    }
    if (!setlocale(LC_CTYPE, "C.UTF-8"))
        fail_msg("the C.UTF-8 locale is needed for the towupper reference");
    strlist files = {0};
    walk_cb(&files, root);
    assert_true(files.n > 300);
    char **dumps = calloc(files.n, sizeof(char *)), **dumps8 = calloc(files.n, sizeof(char *));
    for (size_t i = 0; i < files.n; i += 100) {
        size_t to = i + 100 < files.n ? i + 100 : files.n;
        dcmdump_batch(&files, i, to, 0, dumps + i);
        dcmdump_batch(&files, i, to, 1, dumps8 + i);
    }
    int indexed = 0, quarantined = 0, mismatches = 0, unexpected = 0, names = 0;
    strlist msgs_payloads = {0};
    for (size_t i = 0; i < files.n; i++) {
        const char *path = files.v[i], *rel = path + strlen(root) + 1;
        const char *dump = dumps[i] ? dumps[i] : "";
        char *key = xprintf("corpus/%zu", i), *pl = NULL;
        size_t len = 0;
        char *bytes = ts_read_file(path, &len);
        assert_non_null(bytes);
        assert_int_equal(lc_store_put_buf(f->store, key, bytes, len, NULL), LC_OK);
        free(bytes);
        /* the event's UIDs come from dcmdump (placeholders where it has none) */
        char *st = dump_value(dump, "0020,000d"), *se = dump_value(dump, "0020,000e"),
             *sop = dump_value(dump, "0008,0018");
        lc_kafka_msg m;
        make_msg(f, key, st && *st ? st : "1.2.3", se && *se ? se : "1.2.3.4",
                 sop && *sop ? sop : "1.2.3.4.5", &m, &pl);
        run_batch(f, &m, 1);
        const char *want = reason_for(rel);
        if (f->x.last.quarantined == 1) {
            quarantined++;
            char src[64];
            snprintf(src, sizeof(src), "kafka:" TOPIC "/0@%lld", (long long)m.offset);
            char *why = row(f, "SELECT reason FROM quarantine WHERE source = $1", src);
            printf("quarantined %s: %s\n", rel, why ? why : "(no row)");
            if (!want || !why || !strstr(why, want)) {
                printf("UNEXPECTED quarantine of %s (expected: %s)\n", rel,
                       want ? want : "indexed");
                unexpected++;
            }
            free(why);
        } else {
            assert_int_equal(f->x.last.inserted + f->x.last.replaced + f->x.last.duplicates, 1);
            indexed++;
            if (want) {
                printf("UNEXPECTED success for %s (expected quarantine: %s)\n", rel, want);
                unexpected++;
            }
            mismatches += compare(f, rel, sop, dump, dumps8[i], &names);
        }
        sl_add(&msgs_payloads, pl);
        free(st);
        free(se);
        free(sop);
        free(key);
    }
    printf("corpus: %zu files, %d indexed, %d quarantined, %d names compared, %d mismatches, "
           "%d unexpected\n",
           files.n, indexed, quarantined, names, mismatches, unexpected);
    for (size_t k = 0; k < sizeof(kMustCompareName) / sizeof(*kMustCompareName); k++) {
        int found = 0;
        for (size_t i = 0; i < files.n; i++)
            found |= strcmp(files.v[i] + strlen(root) + 1, kMustCompareName[k]) == 0;
        if (!found)
            fail_msg("%s is not in the corpus", kMustCompareName[k]);
    }
    assert_int_equal(mismatches, 0);
    assert_int_equal(unexpected, 0);
    assert_int_equal(quarantined, (int)(sizeof(kQuarantined) / sizeof(*kQuarantined)));
    assert_true(names >= 15);
    assert_int_equal(count(f, "SELECT count(*) FROM quarantine"), quarantined);
    assert_int_equal(count(f, "SELECT count(*) FROM outbox WHERE topic = 'radpipe.dlq'"),
                     quarantined);
    assert_int_equal(count(f, "SELECT count(*) FROM instances i LEFT JOIN instance_metadata m"
                              " USING (sop_uid) WHERE m.sop_uid IS NULL"),
                     0);
    /* where the server has LZ4, the DICOM JSON is LZ4-compressed (migration 006), never pglz */
    if (count(f, "SELECT count(*) FROM pg_settings WHERE name = 'default_toast_compression'"
                 " AND 'lz4' = ANY (enumvals)") == 1) {
        assert_int_equal(count(f, "SELECT count(*) FROM instance_metadata"
                                  " WHERE pg_column_compression(json) = 'pglz'"),
                         0);
        assert_true(count(f, "SELECT count(*) FROM instance_metadata"
                             " WHERE pg_column_compression(json) = 'lz4'") > 0);
    }

    /* counts are exact (recomputed), and sending every file again changes none of them */
    const char *counts_sql =
        "SELECT (SELECT count(*) FROM instances) || ',' || (SELECT count(*) FROM series) || ','"
        " || (SELECT count(*) FROM studies) || ',' || (SELECT count(*) FROM patients) || ','"
        " || (SELECT sum(num_instances) FROM studies) || ',' || (SELECT sum(num_series) FROM"
        " studies) || ',' || (SELECT sum(num_instances) FROM series) || ','"
        " || (SELECT count(*) FROM instance_metadata) || ',' || (SELECT max(updated_at)::text"
        " FROM instances)";
    PGresult *r = NULL;
    assert_int_equal(lc_db_exec(f->db, counts_sql, 0, NULL, &r, NULL), LC_OK);
    char *before = strdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    assert_int_equal(count(f,
                           "SELECT count(*) FROM studies s WHERE num_instances <>"
                           " (SELECT count(*) FROM instances i WHERE i.study_uid = s.study_uid)"),
                     0);
    /* the last file of each SOP Instance UID is what the index holds: send those again, in
     * batches of 50 as Kafka would redeliver them (new event ids, same bytes) */
    lc_kafka_msg batch[50];
    char *pls[50];
    size_t nb = 0, resent = 0;
    for (size_t i = 0; i < files.n; i++) {
        const char *rel = files.v[i] + strlen(root) + 1;
        if (reason_for(rel))
            continue;
        char *key = xprintf("corpus/%zu", i);
        char *cur = row(f, "SELECT sop_uid FROM instances WHERE store_key = $1", key);
        if (cur) {
            const char *dump = dumps[i];
            char *st = dump_value(dump, "0020,000d"), *se = dump_value(dump, "0020,000e");
            make_msg(f, key, st, se, cur, &batch[nb], &pls[nb]);
            /* keys must outlive the batch: keep st in the list */
            batch[nb].key = st;
            nb++;
            resent++;
            free(se);
            free(cur);
        }
        free(key);
        if (nb == 50 || (i + 1 == files.n && nb > 0)) {
            run_batch(f, batch, nb);
            assert_int_equal(f->x.last.duplicates, (long long)nb);
            for (size_t k = 0; k < nb; k++) {
                free(pls[k]);
                free((char *)batch[k].key);
            }
            nb = 0;
        }
    }
    assert_true(resent > 250);
    assert_int_equal(lc_db_exec(f->db, counts_sql, 0, NULL, &r, NULL), LC_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), before);
    PQclear(r);
    free(before);

    for (size_t i = 0; i < files.n; i++) {
        free(dumps[i]);
        free(dumps8[i]);
    }
    free(dumps);
    free(dumps8);
    sl_free(&files);
    sl_free(&msgs_payloads);
}

/* Malformed files in the middle of a batch: each quarantined with its reason, the batch
 * commits, and the valid files before and after them are indexed. */
static void test_malformed_in_a_batch(void **state)
{
    fx *f = *state;
    const char *root = ts_samples_dir();
    if (!root) {
        printf("SKIP test_malformed_in_a_batch: no DICOM corpus\n");
        skip();
    }
    char *series = xprintf("%s/series/ct-philips-head-phantom", root);
    char **good = ts_list_files(series);
    free(series);
    assert_non_null(good);
    char *mdir = xprintf("%s/malformed", root);
    char **bad = ts_list_files(mdir);
    free(mdir);
    lc_kafka_msg m[64];
    char *pl[64];
    size_t n = 0, nbad = 0;
    char *dump = NULL;
    for (size_t i = 0; good[i] && i < 3; i++) {
        char *key = xprintf("good/%zu", i);
        size_t len = 0;
        char *b = ts_read_file(good[i], &len);
        assert_int_equal(lc_store_put_buf(f->store, key, b, len, NULL), LC_OK);
        free(b);
        char *q = shq(good[i]), *cmd = xprintf("dcmdump -q +P 0020,000d +P 0020,000e "
                                               "+P 0008,0018 %s",
                                               q);
        assert_int_equal(ts_run(cmd, &dump), 0);
        char *st = dump_value(dump, "0020,000d"), *se = dump_value(dump, "0020,000e"),
             *sop = dump_value(dump, "0008,0018");
        make_msg(f, key, st, se, sop, &m[n], &pl[n]);
        m[n].key = "k";
        m[n].key_len = 1;
        n++;
        free(st);
        free(se);
        free(sop);
        free(dump);
        free(q);
        free(cmd);
        free(key);
        /* the malformed files that cannot be indexed go between the good ones */
        for (size_t k = 0; i == 1 && bad[k]; k++) {
            const char *rel = strstr(bad[k], "/malformed/") + 1;
            if (!reason_for(rel))
                continue;
            char *bkey = xprintf("bad/%zu", k);
            char *bb = ts_read_file(bad[k], &len);
            assert_int_equal(lc_store_put_buf(f->store, bkey, bb, len, NULL), LC_OK);
            free(bb);
            char *sop2 = xprintf("1.2.3.%zu", k);
            make_msg(f, bkey, "1.2.3", "1.2.3.4", sop2, &m[n], &pl[n]);
            m[n].key = "k";
            m[n].key_len = 1;
            n++;
            nbad++;
            free(sop2);
            free(bkey);
        }
    }
    assert_true(nbad >= 8);
    run_batch(f, m, n);
    assert_int_equal(f->x.last.inserted, 3);
    assert_int_equal(f->x.last.quarantined, (long long)nbad);
    assert_int_equal(count(f, "SELECT count(*) FROM instances"), 3);
    assert_int_equal(count(f, "SELECT count(*) FROM quarantine WHERE reason LIKE"
                              " 'not a readable DICOM file: %'"),
                     (long long)nbad);
    for (size_t i = 0; i < n; i++)
        free(pl[i]);
    ts_strv_free(good);
    ts_strv_free(bad);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_corpus, setup, teardown),
        cmocka_unit_test_setup_teardown(test_malformed_in_a_batch, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
