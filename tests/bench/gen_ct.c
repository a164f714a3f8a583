/*
 * gen_ct.c: writes generated CT studies for the stack benchmarks (bench_ingest.sh,
 * bench_dicomweb.sh) from real CT slices: each instance is a template slice re-encoded with
 * its own UIDs, patient, accession number, study date and instance number, and with --thumb
 * its pixel data cut down to 64x64 (Rows, Columns and PixelSpacing follow). Files land in the
 * object store's layout (OUT/instances/<study>/<series>/<sop>.dcm), so a file:// store rooted
 * at OUT already holds them; one manifest line per file says where it is and what it is.
 * Templates must be Explicit VR Little Endian; single-threaded.
 */
#include <errno.h>
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "lc/log.h"
#include "lc/util.h"

#define EXPLICIT_LE  "1.2.840.10008.1.2.1"
#define THUMB        64
#define MAX_TEMPLATE (64 * 1024 * 1024)
#define MAX_OVERRIDE 24

#define T_META_LEN      0x00020000u
#define T_MEDIA_SOP     0x00020003u
#define T_TSUID         0x00020010u
#define T_STUDY_DATE    0x00080020u
#define T_ACCESSION     0x00080050u
#define T_SOP_UID       0x00080018u
#define T_PATIENT_NAME  0x00100010u
#define T_PATIENT_ID    0x00100020u
#define T_STUDY_UID     0x0020000Du
#define T_SERIES_UID    0x0020000Eu
#define T_STUDY_ID      0x00200010u
#define T_SERIES_NUMBER 0x00200011u
#define T_INST_NUMBER   0x00200013u
#define T_FOR_UID       0x00200052u
#define T_ROWS          0x00280010u
#define T_COLUMNS       0x00280011u
#define T_SPACING       0x00280030u
#define T_BITS_ALLOC    0x00280100u
#define T_PIXEL_DATA    0x7FE00010u
#define T_ITEM          0xFFFEE000u
#define T_ITEM_END      0xFFFEE00Du
#define T_SEQ_END       0xFFFEE0DDu

/* One top-level element of a template: raw bytes [start, end), value at val. */
typedef struct elem {
    uint32_t tag;
    char vr[3];
    size_t start, val, end;
    uint32_t vlen; /* 0xFFFFFFFF: undefined length */
} elem;

typedef struct tmpl {
    char *bytes; /* owned */
    size_t len;
    elem *meta, *ds; /* owned */
    size_t nmeta, nds;
    int rows, cols, bits;
    double spacing[2];
    const unsigned char *pixels; /* borrowed from bytes; NULL when not native 16-bit */
} tmpl;

/* A value that replaces (or adds) an element of the data set or the meta group. */
typedef struct override {
    uint32_t tag;
    const char *vr;
    const char *val; /* borrowed */
    size_t len;
} override;

typedef struct out_buf {
    unsigned char *p;
    size_t len, cap;
} out_buf;

typedef struct gen_opts {
    long studies, series, instances, first_study, per_patient;
    int thumb;
    const char *out, *manifest, *seed;
} gen_opts;

static const char *const kFamilies[] = {"SMITH",    "MILLER", "GARCIA",  "TANAKA", "MUELLER",
                                        "ROSSI",    "DUBOIS", "NOWAK",   "SILVA",  "JOHNSON",
                                        "KOWALSKI", "IVANOV", "NGUYEN",  "OKAFOR", "LARSEN",
                                        "MARTIN",   "BROWN",  "SCHMIDT", "COHEN",  "SATO"};
#define NFAMILIES (sizeof(kFamilies) / sizeof(kFamilies[0]))

static uint16_t rd16(const unsigned char *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int long_vr(const char *vr)
{
    static const char *const v[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ",
                                    "SV", "UC", "UN", "UR", "UT", "UV"};
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++)
        if (memcmp(vr, v[i], 2) == 0)
            return 1;
    return 0;
}

static int parse_elem(const unsigned char *b, size_t len, size_t pos, elem *e);

/* Skip an undefined-length value (a sequence or encapsulated pixel data) starting at *pos:
 * items up to the sequence delimiter, nested data sets element by element. */
static int skip_undefined(const unsigned char *b, size_t len, size_t *pos, int depth)
{
    if (depth > 16)
        return -1;
    while (*pos + 8 <= len) {
        uint32_t tag = (uint32_t)rd16(b + *pos) << 16 | rd16(b + *pos + 2);
        uint32_t il = rd32(b + *pos + 4);
        *pos += 8;
        if (tag == T_SEQ_END)
            return 0;
        if (tag != T_ITEM)
            return -1;
        if (il != 0xFFFFFFFFu) {
            if (il > len - *pos)
                return -1;
            *pos += il;
            continue;
        }
        for (;;) { /* an undefined-length item: its elements, then the item delimiter */
            if (*pos + 8 > len)
                return -1;
            if (((uint32_t)rd16(b + *pos) << 16 | rd16(b + *pos + 2)) == T_ITEM_END) {
                *pos += 8;
                break;
            }
            elem e;
            if (parse_elem(b, len, *pos, &e) != 0)
                return -1;
            *pos = e.end;
            if (e.vlen == 0xFFFFFFFFu && skip_undefined(b, len, pos, depth + 1) != 0)
                return -1;
        }
    }
    return -1;
}

/* The element at pos (explicit VR little endian); e->end is past its value, except for an
 * undefined length, where it is the value's start (the caller skips it). */
static int parse_elem(const unsigned char *b, size_t len, size_t pos, elem *e)
{
    if (pos + 8 > len)
        return -1;
    e->tag = (uint32_t)rd16(b + pos) << 16 | rd16(b + pos + 2);
    e->start = pos;
    memcpy(e->vr, b + pos + 4, 2);
    e->vr[2] = '\0';
    if (long_vr(e->vr)) {
        if (pos + 12 > len)
            return -1;
        e->vlen = rd32(b + pos + 8);
        e->val = pos + 12;
    } else {
        e->vlen = rd16(b + pos + 6);
        e->val = pos + 8;
    }
    if (e->vlen == 0xFFFFFFFFu) {
        e->end = e->val;
        return 0;
    }
    if (e->vlen > len - e->val)
        return -1;
    e->end = e->val + e->vlen;
    return 0;
}

/* Top-level elements from pos up to stop (or the end): *out (caller frees). */
static int walk(const unsigned char *b, size_t len, size_t pos, size_t stop, elem **out, size_t *n)
{
    size_t cap = 64;
    elem *v = malloc(cap * sizeof(*v));
    *n = 0;
    if (!v)
        return -1;
    while (pos < stop && pos < len) {
        elem e;
        if (parse_elem(b, len, pos, &e) != 0)
            goto fail;
        pos = e.end;
        if (e.vlen == 0xFFFFFFFFu) {
            if (skip_undefined(b, len, &pos, 0) != 0)
                goto fail;
            e.end = pos;
        }
        if (*n == cap) {
            elem *nv = realloc(v, 2 * cap * sizeof(*v));
            if (!nv)
                goto fail;
            v = nv;
            cap *= 2;
        }
        v[(*n)++] = e;
    }
    *out = v;
    return 0;
fail:
    free(v);
    return -1;
}

static const elem *find(const elem *v, size_t n, uint32_t tag)
{
    for (size_t i = 0; i < n; i++)
        if (v[i].tag == tag)
            return &v[i];
    return NULL;
}

static void tmpl_free(tmpl *t)
{
    free(t->bytes);
    free(t->meta);
    free(t->ds);
}

static int tmpl_load(const char *path, tmpl *t)
{
    lc_err e = {0};
    memset(t, 0, sizeof(*t));
    if (lc_read_file(path, MAX_TEMPLATE, &t->bytes, &t->len, &e) != LC_OK) {
        fprintf(stderr, "gen_ct: could not read template \"%s\": %s\n", path, lc_err_msg(&e));
        return -1;
    }
    const unsigned char *b = (const unsigned char *)t->bytes;
    if (t->len < 144 || memcmp(b + 128, "DICM", 4) != 0) {
        fprintf(stderr, "gen_ct: template \"%s\" is not a DICOM Part 10 file\n", path);
        return -1;
    }
    elem first;
    if (parse_elem(b, t->len, 132, &first) != 0 || first.tag != T_META_LEN || first.vlen != 4) {
        fprintf(stderr, "gen_ct: template \"%s\" has no meta group length\n", path);
        return -1;
    }
    size_t meta_end = first.end + rd32(b + first.val);
    if (walk(b, t->len, 132, meta_end, &t->meta, &t->nmeta) != 0 ||
        walk(b, t->len, meta_end, t->len, &t->ds, &t->nds) != 0) {
        fprintf(stderr, "gen_ct: template \"%s\" is not well-formed explicit VR little endian\n",
                path);
        return -1;
    }
    const elem *ts = find(t->meta, t->nmeta, T_TSUID);
    if (!ts || ts->vlen < strlen(EXPLICIT_LE) ||
        memcmp(b + ts->val, EXPLICIT_LE, strlen(EXPLICIT_LE)) != 0) {
        fprintf(stderr, "gen_ct: template \"%s\" is not Explicit VR Little Endian\n", path);
        return -1;
    }
    const elem *rows = find(t->ds, t->nds, T_ROWS), *cols = find(t->ds, t->nds, T_COLUMNS);
    const elem *bits = find(t->ds, t->nds, T_BITS_ALLOC), *px = find(t->ds, t->nds, T_PIXEL_DATA);
    const elem *sp = find(t->ds, t->nds, T_SPACING);
    if (rows && cols && bits && rows->vlen == 2 && cols->vlen == 2 && bits->vlen == 2) {
        t->rows = rd16(b + rows->val);
        t->cols = rd16(b + cols->val);
        t->bits = rd16(b + bits->val);
    }
    if (px && t->bits == 16 && px->vlen == (uint32_t)t->rows * (uint32_t)t->cols * 2)
        t->pixels = b + px->val;
    if (sp && sp->vlen < 64) {
        char s[65];
        memcpy(s, b + sp->val, sp->vlen);
        s[sp->vlen] = '\0';
        if (sscanf(s, "%lf\\%lf", &t->spacing[0], &t->spacing[1]) != 2)
            t->spacing[0] = t->spacing[1] = 0;
    }
    return 0;
}

static int ob_reserve(out_buf *o, size_t more)
{
    if (o->len + more <= o->cap)
        return 0;
    size_t cap = o->cap ? o->cap : 1 << 20;
    while (cap < o->len + more)
        cap *= 2;
    unsigned char *np = realloc(o->p, cap);
    if (!np)
        return -1;
    o->p = np;
    o->cap = cap;
    return 0;
}

static int ob_add(out_buf *o, const void *p, size_t n)
{
    if (ob_reserve(o, n) != 0)
        return -1;
    memcpy(o->p + o->len, p, n);
    o->len += n;
    return 0;
}

/* One element with a new value, padded to even length (UI with NUL, text with a space). */
static int put_elem(out_buf *o, const override *v)
{
    unsigned char h[12];
    size_t plen = v->len + (v->len & 1), hl;
    h[0] = (unsigned char)(v->tag >> 16), h[1] = (unsigned char)(v->tag >> 24);
    h[2] = (unsigned char)v->tag, h[3] = (unsigned char)(v->tag >> 8);
    memcpy(h + 4, v->vr, 2);
    if (long_vr(v->vr)) {
        h[6] = h[7] = 0;
        h[8] = (unsigned char)plen, h[9] = (unsigned char)(plen >> 8);
        h[10] = (unsigned char)(plen >> 16), h[11] = (unsigned char)(plen >> 24);
        hl = 12;
    } else {
        if (plen > 0xFFFF)
            return -1;
        h[6] = (unsigned char)plen, h[7] = (unsigned char)(plen >> 8);
        hl = 8;
    }
    if (ob_add(o, h, hl) != 0 || ob_add(o, v->val, v->len) != 0)
        return -1;
    if (v->len & 1)
        return ob_add(o, strcmp(v->vr, "UI") == 0 || strcmp(v->vr, "OB") == 0 ? "\0" : " ", 1);
    return 0;
}

static int ov_cmp(const void *a, const void *b)
{
    const override *x = a, *y = b;
    return (x->tag > y->tag) - (x->tag < y->tag);
}

/* The template's elements [v, v + n) with the overrides merged in (tag order). */
static int put_group(out_buf *o, const tmpl *t, const elem *v, size_t n, override *ov, size_t nov)
{
    size_t k = 0;
    qsort(ov, nov, sizeof(*ov), ov_cmp);
    for (size_t i = 0; i < n; i++) {
        while (k < nov && ov[k].tag < v[i].tag)
            if (put_elem(o, &ov[k++]) != 0)
                return -1;
        if (k < nov && ov[k].tag == v[i].tag) {
            if (put_elem(o, &ov[k++]) != 0)
                return -1;
            continue;
        }
        if (ob_add(o, t->bytes + v[i].start, v[i].end - v[i].start) != 0)
            return -1;
    }
    while (k < nov)
        if (put_elem(o, &ov[k++]) != 0)
            return -1;
    return 0;
}

/* A UID "2.25.<seed><kind><a:07><b:02><c:05>", unique per (kind, a, b, c) within a seed. */
static void uid(char out[80], const char *seed, int kind, long a, long b, long c)
{
    snprintf(out, 80, "2.25.%s%d%07ld%02ld%05ld", seed, kind, a, b, c);
}

/* YYYYMMDD of 2010-01-01 plus days. */
static void date_of(char out[16], long days)
{
    struct tm tm = {.tm_year = 110, .tm_mon = 0, .tm_mday = 1, .tm_hour = 12};
    time_t t = timegm(&tm) + (time_t)days * 86400;
    gmtime_r(&t, &tm);
    strftime(out, 16, "%Y%m%d", &tm);
}

/* Instance (s, se, i) from template t into o. */
static int build(const gen_opts *g, const tmpl *t, long s, long se, long i, out_buf *o,
                 char study[80], char series[80], char sop[80])
{
    char pid[32], pname[64], acc[32], sid[32], date[16], snum[16], inum[16], forid[80];
    char rows[2], spacing[64];
    unsigned char *thumb = NULL;
    override ds[MAX_OVERRIDE], meta[1];
    size_t nds = 0;
    long patient = s / g->per_patient;
    int rc = -1;

    uid(study, g->seed, 1, s, 0, 0);
    uid(series, g->seed, 2, s, se, 0);
    uid(sop, g->seed, 3, s, se, i);
    uid(forid, g->seed, 4, s, se, 0);
    snprintf(pid, sizeof(pid), "RPB%07ld", patient);
    snprintf(pname, sizeof(pname), "%s^P%07ld", kFamilies[patient % NFAMILIES], patient);
    snprintf(acc, sizeof(acc), "A%09ld", s);
    snprintf(sid, sizeof(sid), "%ld", s % 100000);
    snprintf(snum, sizeof(snum), "%ld", se + 1);
    snprintf(inum, sizeof(inum), "%ld", i + 1);
    date_of(date, (s * 37) % 5000);
    ds[nds++] = (override){T_SOP_UID, "UI", sop, strlen(sop)};
    ds[nds++] = (override){T_STUDY_DATE, "DA", date, strlen(date)};
    ds[nds++] = (override){T_ACCESSION, "SH", acc, strlen(acc)};
    ds[nds++] = (override){T_PATIENT_NAME, "PN", pname, strlen(pname)};
    ds[nds++] = (override){T_PATIENT_ID, "LO", pid, strlen(pid)};
    ds[nds++] = (override){T_STUDY_UID, "UI", study, strlen(study)};
    ds[nds++] = (override){T_SERIES_UID, "UI", series, strlen(series)};
    ds[nds++] = (override){T_STUDY_ID, "SH", sid, strlen(sid)};
    ds[nds++] = (override){T_SERIES_NUMBER, "IS", snum, strlen(snum)};
    ds[nds++] = (override){T_INST_NUMBER, "IS", inum, strlen(inum)};
    ds[nds++] = (override){T_FOR_UID, "UI", forid, strlen(forid)};
    if (g->thumb) {
        const size_t px = (size_t)THUMB * THUMB;
        if (!t->pixels || t->rows < THUMB || t->cols < THUMB) {
            fprintf(stderr, "gen_ct: --thumb needs native 16-bit pixel data of at least %dx%d\n",
                    THUMB, THUMB);
            goto out;
        }
        if (!(thumb = malloc(2 * px)))
            goto out;
        for (int y = 0; y < THUMB; y++)
            for (int x = 0; x < THUMB; x++)
                memcpy(thumb + 2 * ((size_t)y * THUMB + (size_t)x),
                       t->pixels + 2 * ((size_t)(y * t->rows / THUMB) * (size_t)t->cols +
                                        (size_t)(x * t->cols / THUMB)),
                       2);
        rows[0] = THUMB, rows[1] = 0;
        ds[nds++] = (override){T_ROWS, "US", rows, 2};
        ds[nds++] = (override){T_COLUMNS, "US", rows, 2};
        ds[nds++] = (override){T_PIXEL_DATA, "OW", (const char *)thumb, 2 * px};
        if (t->spacing[0] > 0) {
            snprintf(spacing, sizeof(spacing), "%.6g\\%.6g", t->spacing[0] * t->rows / THUMB,
                     t->spacing[1] * t->cols / THUMB);
            ds[nds++] = (override){T_SPACING, "DS", spacing, strlen(spacing)};
        }
    }
    meta[0] = (override){T_MEDIA_SOP, "UI", sop, strlen(sop)};

    o->len = 0;
    if (ob_add(o, t->bytes, 132) != 0)
        goto out;
    /* the meta group without its length element, then the length in front of it */
    size_t at = o->len;
    unsigned char gl[12] = {0x02, 0x00, 0x00, 0x00, 'U', 'L', 4, 0, 0, 0, 0, 0};
    if (ob_add(o, gl, sizeof(gl)) != 0 || put_group(o, t, t->meta + 1, t->nmeta - 1, meta, 1) != 0)
        goto out;
    size_t glen = o->len - at - sizeof(gl);
    o->p[at + 8] = (unsigned char)glen, o->p[at + 9] = (unsigned char)(glen >> 8);
    o->p[at + 10] = (unsigned char)(glen >> 16), o->p[at + 11] = (unsigned char)(glen >> 24);
    if (put_group(o, t, t->ds, t->nds, ds, nds) != 0)
        goto out;
    rc = 0;
out:
    free(thumb);
    return rc;
}

static int write_file(const char *path, const out_buf *o)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    int ok = fwrite(o->p, 1, o->len, f) == o->len;
    return fclose(f) == 0 && ok ? 0 : -1;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: gen_ct [OPTIONS] --out DIR TEMPLATE...\n"
            "Writes generated CT instances from real Explicit VR Little Endian slices (instance\n"
            "i of a series uses TEMPLATE i mod count) under DIR/instances/<study>/<series>/\n"
            "<sop>.dcm and prints one manifest line per file: path, store key, StudyInstanceUID,\n"
            "SeriesInstanceUID, SOPInstanceUID, size, SHA-256 (tab-separated).\n"
            "  --studies N        studies (default 1)\n"
            "  --series N         series per study (default 1)\n"
            "  --instances N      instances per series (default 1)\n"
            "  --first-study N    index of the first study (default 0): UIDs, accession, patient\n"
            "  --per-patient N    studies per patient (PatientID RPB<study / N>; default 1)\n"
            "  --seed DIGITS      UID seed, digits without a leading zero (default: the time)\n"
            "  --thumb            pixel data cut down to %dx%d (Rows, Columns, PixelSpacing too)\n"
            "  --manifest FILE    the manifest goes to FILE instead of stdout\n",
            THUMB, THUMB);
}

static long num_arg(const char *s, const char *name)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || !end || *end || v < 0 || v > 9999999) {
        fprintf(stderr, "gen_ct: invalid %s \"%s\"\n", name, s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"studies", required_argument, NULL, 's'},
                                         {"series", required_argument, NULL, 'e'},
                                         {"instances", required_argument, NULL, 'i'},
                                         {"first-study", required_argument, NULL, 'f'},
                                         {"per-patient", required_argument, NULL, 'p'},
                                         {"seed", required_argument, NULL, 'S'},
                                         {"thumb", no_argument, NULL, 't'},
                                         {"out", required_argument, NULL, 'o'},
                                         {"manifest", required_argument, NULL, 'm'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    gen_opts g = {.studies = 1, .series = 1, .instances = 1, .per_patient = 1};
    char seed[32], study[80], series[80], sop[80], sha[65], *path = NULL, *key = NULL;
    tmpl *t = NULL;
    int nt = 0, ntotal = 0, code = 1;
    out_buf o = {0};
    FILE *man = stdout;
    lc_err e = {0};

    lc_log_init("gen_ct", LC_LOG_WARN);
    snprintf(seed, sizeof(seed), "%lld", (long long)(lc_wall_ms() / 1000));
    g.seed = seed;
    for (int c; (c = getopt_long(argc, argv, "h", opts, NULL)) != -1;) {
        switch (c) {
        case 's':
            g.studies = num_arg(optarg, "--studies");
            break;
        case 'e':
            g.series = num_arg(optarg, "--series");
            break;
        case 'i':
            g.instances = num_arg(optarg, "--instances");
            break;
        case 'f':
            g.first_study = num_arg(optarg, "--first-study");
            break;
        case 'p':
            g.per_patient = num_arg(optarg, "--per-patient");
            break;
        case 'S':
            g.seed = optarg;
            break;
        case 't':
            g.thumb = 1;
            break;
        case 'o':
            g.out = optarg;
            break;
        case 'm':
            g.manifest = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!g.out || optind >= argc || g.per_patient < 1 || g.series > 99 || g.instances > 99999 ||
        !*g.seed || g.seed[0] == '0' || strspn(g.seed, "0123456789") != strlen(g.seed) ||
        strlen(g.seed) > 20) {
        usage(stderr);
        return 2;
    }
    ntotal = argc - optind;
    if (!(t = calloc((size_t)ntotal, sizeof(*t))))
        goto out;
    for (nt = 0; nt < ntotal; nt++)
        if (tmpl_load(argv[optind + nt], &t[nt]) != 0)
            goto out;
    if (g.manifest && !(man = fopen(g.manifest, "w"))) {
        fprintf(stderr, "gen_ct: could not write \"%s\": %s\n", g.manifest, strerror(errno));
        goto out;
    }
    for (long s = g.first_study; s < g.first_study + g.studies; s++) {
        for (long se = 0; se < g.series; se++) {
            for (long i = 0; i < g.instances; i++) {
                if (build(&g, &t[i % nt], s, se, i, &o, study, series, sop) != 0) {
                    fprintf(stderr, "gen_ct: could not build instance %ld of study %ld\n", i, s);
                    goto out;
                }
                free(path);
                free(key);
                path = key = NULL;
                if (asprintf(&key, "instances/%s/%s/%s.dcm", study, series, sop) < 0 ||
                    asprintf(&path, "%s/%s", g.out, key) < 0) {
                    path = key = NULL;
                    goto out;
                }
                char *slash = strrchr(path, '/');
                *slash = '\0';
                if (lc_mkdirs(path, 0755, &e) != LC_OK) {
                    fprintf(stderr, "gen_ct: %s\n", lc_err_msg(&e));
                    goto out;
                }
                *slash = '/';
                if (write_file(path, &o) != 0) {
                    fprintf(stderr, "gen_ct: could not write \"%s\": %s\n", path, strerror(errno));
                    goto out;
                }
                lc_sha256_hex(o.p, o.len, sha);
                fprintf(man, "%s\t%s\t%s\t%s\t%s\t%zu\t%s\n", path, key, study, series, sop, o.len,
                        sha);
            }
        }
    }
    code = fflush(man) == 0 ? 0 : 1;
out:
    if (man && man != stdout)
        fclose(man);
    for (int k = 0; t && k < ntotal; k++)
        tmpl_free(&t[k]);
    free(t);
    free(o.p);
    free(path);
    free(key);
    return code;
}
