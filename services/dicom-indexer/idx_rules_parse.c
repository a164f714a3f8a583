/*
 * idx_rules_parse.c: reads and validates a rules file into an idx_rules (idx_rules.h). Every
 * error names the file, the place ("rules[1] (\"ct-seg\").actions[0].layout") and what is
 * wrong; unknown or repeated fields are errors, so a typo never silently disables a rule.
 * Mirrors proto/rules/rules.schema.json (tests/checks/test_rules_schema.sh keeps them
 * agreeing). Pure functions; the result is immutable and may be shared read-only.
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "idx_rules.h"
#include "lc/dicom.h"
#include "lc/util.h"

#define MAX_DEPTH 32

typedef struct pctx {
    const char *what; /* the file, for messages */
    char path[768];   /* where in the file we are */
    idx_rules *r;
    lc_err *err;
} pctx;

static lc_rc fail(pctx *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static lc_rc fail(pctx *p, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    return lc_err_set(p->err, LC_ERR_CONFIG, "invalid rules file \"%s\": %s: %s", p->what,
                      p->path[0] ? p->path : "top level", msg);
}

/* Append to the path; returns the old length for pop(). */
static size_t push(pctx *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static size_t push(pctx *p, const char *fmt, ...)
{
    size_t len = strlen(p->path);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->path + len, sizeof(p->path) - len, fmt, ap);
    va_end(ap);
    return len;
}

static void pop(pctx *p, size_t mark)
{
    p->path[mark] = '\0';
}

static lc_rc nomem(pctx *p)
{
    return lc_err_set(p->err, LC_ERR_NOMEM, "out of memory reading rules file \"%s\"", p->what);
}

/* Fail on a field of o not in allowed (NULL-terminated) or given twice. */
static lc_rc check_fields(pctx *p, const cJSON *o, const char *const *allowed)
{
    for (const cJSON *c = o->child; c; c = c->next) {
        int ok = 0;
        for (const char *const *a = allowed; *a && !ok; a++)
            ok = strcmp(c->string, *a) == 0;
        if (!ok)
            return fail(p, "unknown field \"%.64s\"", c->string);
        for (const cJSON *d = c->next; d; d = d->next)
            if (strcmp(c->string, d->string) == 0)
                return fail(p, "field \"%.64s\" given twice", c->string);
    }
    return LC_OK;
}

static const cJSON *field(const cJSON *o, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(o, name);
}

/* An optional string field of 1..max bytes; *out borrowed (NULL when absent). */
static lc_rc get_str(pctx *p, const cJSON *o, const char *name, size_t max, const char **out)
{
    const cJSON *v = field(o, name);
    *out = NULL;
    if (!v)
        return LC_OK;
    size_t m = push(p, ".%s", name);
    lc_rc rc = LC_OK;
    if (!cJSON_IsString(v))
        rc = fail(p, "must be a string");
    else if (!v->valuestring[0])
        rc = fail(p, "must not be empty");
    else if (strlen(v->valuestring) > max)
        rc = fail(p, "longer than %zu characters", max);
    else
        *out = v->valuestring;
    pop(p, m);
    return rc;
}

static lc_rc get_int(pctx *p, const cJSON *o, const char *name, long long lo, long long hi,
                     long long *out, int *has)
{
    const cJSON *v = field(o, name);
    *has = 0;
    if (!v)
        return LC_OK;
    size_t m = push(p, ".%s", name);
    lc_rc rc = LC_OK;
    double d = v->valuedouble;
    if (!cJSON_IsNumber(v) || d != (double)(long long)d)
        rc = fail(p, "must be an integer");
    else if (d < (double)lo || d > (double)hi)
        rc = fail(p, "must be between %lld and %lld", lo, hi);
    else {
        *out = (long long)d;
        *has = 1;
    }
    pop(p, m);
    return rc;
}

static lc_rc get_bool(pctx *p, const cJSON *o, const char *name, int *out)
{
    const cJSON *v = field(o, name);
    if (!v)
        return LC_OK;
    if (!cJSON_IsBool(v)) {
        size_t m = push(p, ".%s", name);
        lc_rc rc = fail(p, "must be true or false");
        pop(p, m);
        return rc;
    }
    *out = cJSON_IsTrue(v);
    return LC_OK;
}

/* --- keywords --------------------------------------------------------------------------- */

/* Indexed columns: must match the SELECT lists of idx_rules_eval.c. */
const idx_colkey idx_rules_cols[] = {
    {"PatientID", IDX_K_STUDY, 0, 0},
    {"PatientName", IDX_K_STUDY, 1, 0},
    {"PatientBirthDate", IDX_K_STUDY, 2, 0},
    {"PatientSex", IDX_K_STUDY, 3, 0},
    {"StudyDate", IDX_K_STUDY, 4, 0},
    {"StudyTime", IDX_K_STUDY, 5, 0},
    {"AccessionNumber", IDX_K_STUDY, 6, 0},
    {"StudyID", IDX_K_STUDY, 7, 0},
    {"StudyDescription", IDX_K_STUDY, 8, 0},
    {"ReferringPhysicianName", IDX_K_STUDY, 9, 0},
    {"ModalitiesInStudy", IDX_K_STUDY, 10, 1},
    {"StudyInstanceUID", IDX_K_STUDY, 11, 0},
    {"NumberOfStudyRelatedSeries", IDX_K_STUDY, 12, 0},
    {"NumberOfStudyRelatedInstances", IDX_K_STUDY, 13, 0},
    {"source.kind", IDX_K_STUDY, 14, 0},
    {"source.name", IDX_K_STUDY, 15, 0},
    {"SeriesInstanceUID", IDX_K_SERIES, 0, 0},
    {"Modality", IDX_K_SERIES, 1, 0},
    {"SeriesNumber", IDX_K_SERIES, 2, 0},
    {"SeriesDescription", IDX_K_SERIES, 3, 0},
    {"BodyPartExamined", IDX_K_SERIES, 4, 0},
    {"NumberOfSeriesRelatedInstances", IDX_K_SERIES, 5, 0},
};
const size_t idx_rules_ncols = sizeof(idx_rules_cols) / sizeof(idx_rules_cols[0]);

static int keyword_syntax_ok(const char *k)
{
    if (!isalpha((unsigned char)k[0]) || strlen(k) > 63)
        return 0;
    for (const char *c = k; *c; c++)
        if (!isalnum((unsigned char)*c))
            return 0;
    return 1;
}

/* A DICOM keyword any rule may name: an indexed column or the DICOM dictionary's. */
static int keyword_known(const char *k, unsigned *tag)
{
    char vr[3];
    for (size_t i = 0; i < idx_rules_ncols; i++)
        if (strcmp(idx_rules_cols[i].keyword, k) == 0)
            return 1;
    return keyword_syntax_ok(k) && lc_dicom_keyword_tag(k, tag, vr) == LC_OK;
}

/* The index of keyword k in p->r->keys, added when new; -1 (and err set) when unknown. */
static int key_index(pctx *p, const char *k, lc_rc *rc)
{
    idx_rules *r = p->r;
    for (size_t i = 0; i < r->nkeys; i++)
        if (strcmp(r->keys[i].keyword, k) == 0)
            return (int)i;
    idx_rkey key = {0};
    int found = 0;
    for (size_t i = 0; i < idx_rules_ncols && !found; i++) {
        if (strcmp(idx_rules_cols[i].keyword, k) == 0) {
            key.src = idx_rules_cols[i].src;
            key.col = (int)i;
            found = 1;
        }
    }
    if (!found) {
        unsigned tag = 0;
        char vr[3];
        if (!keyword_syntax_ok(k) || lc_dicom_keyword_tag(k, &tag, vr) != LC_OK) {
            *rc = fail(p, "unknown DICOM keyword \"%.64s\"", k);
            return -1;
        }
        key.src = IDX_K_META;
        snprintf(key.tag, sizeof(key.tag), "%08X", tag);
        int dup = 0;
        for (size_t i = 0; i < r->nmeta && !dup; i++)
            dup = strcmp(r->meta_tags[i], key.tag) == 0;
        if (!dup) {
            char **t = realloc(r->meta_tags, (r->nmeta + 1) * sizeof(*t));
            if (!t || !(t[r->nmeta] = strdup(key.tag))) {
                if (t)
                    r->meta_tags = t;
                *rc = nomem(p);
                return -1;
            }
            r->meta_tags = t;
            r->nmeta++;
        }
    }
    lc_strlcpy(key.keyword, k, sizeof(key.keyword));
    idx_rkey *n = realloc(r->keys, (r->nkeys + 1) * sizeof(*n));
    if (!n) {
        *rc = nomem(p);
        return -1;
    }
    r->keys = n;
    r->keys[r->nkeys] = key;
    return (int)r->nkeys++;
}

/* --- conditions ------------------------------------------------------------------------- */

static void cond_release(idx_cond *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < c->nkids; i++)
        cond_release(&c->kids[i]);
    free(c->kids);
    for (size_t i = 0; i < c->nstrs; i++)
        free(c->strs[i]);
    free(c->strs);
    free(c->nums);
    if (c->has_re)
        regfree(&c->re);
    memset(c, 0, sizeof(*c));
}

static void cond_free(idx_cond *c)
{
    cond_release(c);
    free(c);
}

static int valid_date(const char *s)
{
    if (strlen(s) != 8)
        return 0;
    for (int i = 0; i < 8; i++)
        if (!isdigit((unsigned char)s[i]))
            return 0;
    int m = (s[4] - '0') * 10 + (s[5] - '0'), d = (s[6] - '0') * 10 + (s[7] - '0');
    return m >= 1 && m <= 12 && d >= 1 && d <= 31;
}

static lc_rc parse_cond(pctx *p, const cJSON *j, idx_cond *c, int depth);

static lc_rc parse_kids(pctx *p, const cJSON *a, idx_cond *c, int depth)
{
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) == 0)
        return fail(p, "must be a non-empty array of conditions");
    size_t n = (size_t)cJSON_GetArraySize(a);
    if (!(c->kids = calloc(n, sizeof(*c->kids))))
        return nomem(p);
    c->nkids = n;
    size_t i = 0;
    for (const cJSON *k = a->child; k; k = k->next, i++) {
        size_t m = push(p, "[%zu]", i);
        lc_rc rc = parse_cond(p, k, &c->kids[i], depth + 1);
        if (rc != LC_OK)
            return rc;
        pop(p, m);
    }
    return LC_OK;
}

/* equals / in values: strings, or numbers (compared as numbers), not mixed. */
static lc_rc parse_values(pctx *p, const cJSON *v, int list, idx_cond *c)
{
    size_t n = list ? (size_t)cJSON_GetArraySize(v) : 1;
    if (list && (!cJSON_IsArray(v) || n == 0))
        return fail(p, "must be a non-empty array of strings or numbers");
    if (!(c->strs = calloc(n, sizeof(*c->strs))) || !(c->nums = calloc(n, sizeof(*c->nums))))
        return nomem(p);
    c->nstrs = n;
    const cJSON *e = list ? v->child : v;
    c->numeric = cJSON_IsNumber(e);
    for (size_t i = 0; i < n; i++, e = e->next) {
        if (c->numeric ? !cJSON_IsNumber(e) : !cJSON_IsString(e))
            return fail(p, list ? "must hold only strings or only numbers"
                                : "must be a string or a number");
        if (c->numeric) {
            char buf[64];
            snprintf(buf, sizeof(buf), "%.17g", e->valuedouble);
            c->nums[i] = e->valuedouble;
            c->strs[i] = strdup(buf);
        } else {
            if (strlen(e->valuestring) > 1024)
                return fail(p, "a value is longer than 1024 characters");
            c->strs[i] = strdup(e->valuestring);
        }
        if (!c->strs[i])
            return nomem(p);
    }
    return LC_OK;
}

static lc_rc parse_leaf(pctx *p, const cJSON *j, idx_cond *c)
{
    static const char *const allowed[] = {"tag",         "equals",     "wildcard", "in",
                                          "range",       "date_range", "regex",    "present",
                                          "ignore_case", NULL};
    static const char *const ops[] = {"equals",     "wildcard", "in",     "range",
                                      "date_range", "regex",    "present"};
    static const idx_cop opv[] = {IDX_C_EQUALS,     IDX_C_WILDCARD, IDX_C_IN,     IDX_C_RANGE,
                                  IDX_C_DATE_RANGE, IDX_C_REGEX,    IDX_C_PRESENT};
    const char *tag = NULL, *op = NULL;
    lc_rc rc;
    if ((rc = check_fields(p, j, allowed)) != LC_OK ||
        (rc = get_str(p, j, "tag", 64, &tag)) != LC_OK)
        return rc;
    if (!tag)
        return fail(p, "a condition needs \"all\", \"any\", \"not\" or \"tag\"");
    for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
        if (!field(j, ops[i]))
            continue;
        if (op)
            return fail(p, "give one operator per condition, not \"%s\" and \"%s\"", op, ops[i]);
        op = ops[i];
        c->op = opv[i];
    }
    if (!op)
        return fail(p,
                    "condition on \"%.64s\" has no operator (equals, wildcard, in, range, "
                    "date_range, regex or present)",
                    tag);
    size_t m = push(p, ".tag");
    c->key = key_index(p, tag, &rc);
    if (c->key < 0)
        return rc;
    pop(p, m);
    if ((rc = get_bool(p, j, "ignore_case", &c->icase)) != LC_OK)
        return rc;
    if (field(j, "ignore_case") &&
        (c->op == IDX_C_RANGE || c->op == IDX_C_DATE_RANGE || c->op == IDX_C_PRESENT))
        return fail(p, "\"ignore_case\" does not apply to \"%s\"", op);
    const cJSON *v = field(j, op);
    m = push(p, ".%s", op);
    switch (c->op) {
    case IDX_C_EQUALS:
    case IDX_C_IN:
        if ((rc = parse_values(p, v, c->op == IDX_C_IN, c)) != LC_OK)
            return rc;
        break;
    case IDX_C_WILDCARD:
    case IDX_C_REGEX:
        if (!cJSON_IsString(v) || strlen(v->valuestring) > 1024)
            return fail(p, "must be a string of at most 1024 characters");
        if (!(c->strs = calloc(1, sizeof(*c->strs))) || !(c->strs[0] = strdup(v->valuestring)))
            return nomem(p);
        c->nstrs = 1;
        if (c->op == IDX_C_REGEX) {
            int e = regcomp(&c->re, v->valuestring,
                            REG_EXTENDED | REG_NOSUB | (c->icase ? REG_ICASE : 0));
            if (e != 0) {
                char why[256];
                regerror(e, &c->re, why, sizeof(why));
                return fail(p, "invalid regular expression \"%.100s\": %s", v->valuestring, why);
            }
            c->has_re = 1;
        }
        break;
    case IDX_C_RANGE: {
        static const char *const rf[] = {"min", "max", NULL};
        if (!cJSON_IsObject(v))
            return fail(p, "must be an object {\"min\": n, \"max\": n}");
        if ((rc = check_fields(p, v, rf)) != LC_OK)
            return rc;
        const cJSON *lo = field(v, "min"), *hi = field(v, "max");
        if ((lo && !cJSON_IsNumber(lo)) || (hi && !cJSON_IsNumber(hi)))
            return fail(p, "min and max must be numbers");
        if (!lo && !hi)
            return fail(p, "needs min, max or both");
        c->has_min = lo != NULL;
        c->has_max = hi != NULL;
        c->min = lo ? lo->valuedouble : 0;
        c->max = hi ? hi->valuedouble : 0;
        if (lo && hi && c->min > c->max)
            return fail(p, "min is greater than max");
        break;
    }
    case IDX_C_DATE_RANGE: {
        static const char *const rf[] = {"from", "to", NULL};
        if (!cJSON_IsObject(v))
            return fail(p, "must be an object {\"from\": \"YYYYMMDD\", \"to\": \"YYYYMMDD\"}");
        if ((rc = check_fields(p, v, rf)) != LC_OK)
            return rc;
        const cJSON *lo = field(v, "from"), *hi = field(v, "to");
        if ((lo && (!cJSON_IsString(lo) || !valid_date(lo->valuestring))) ||
            (hi && (!cJSON_IsString(hi) || !valid_date(hi->valuestring))))
            return fail(p, "from and to must be dates written YYYYMMDD");
        if (!lo && !hi)
            return fail(p, "needs from, to or both");
        c->has_min = lo != NULL;
        c->has_max = hi != NULL;
        lc_strlcpy(c->from, lo ? lo->valuestring : "", sizeof(c->from));
        lc_strlcpy(c->to, hi ? hi->valuestring : "", sizeof(c->to));
        if (lo && hi && strcmp(c->from, c->to) > 0)
            return fail(p, "from is after to");
        break;
    }
    case IDX_C_PRESENT:
        if (!cJSON_IsBool(v))
            return fail(p, "must be true or false");
        c->present = cJSON_IsTrue(v);
        break;
    default:
        break;
    }
    pop(p, m);
    return LC_OK;
}

static lc_rc parse_cond(pctx *p, const cJSON *j, idx_cond *c, int depth)
{
    if (depth > MAX_DEPTH)
        return fail(p, "conditions nest deeper than %d", MAX_DEPTH);
    if (!cJSON_IsObject(j))
        return fail(p, "a condition must be an object");
    const char *logic = field(j, "all")   ? "all"
                        : field(j, "any") ? "any"
                        : field(j, "not") ? "not"
                                          : NULL;
    if (!logic)
        return parse_leaf(p, j, c);
    if (cJSON_GetArraySize(j) != 1)
        return fail(p, "\"%s\" must be the only field of its condition", logic);
    size_t m = push(p, ".%s", logic);
    lc_rc rc;
    if (strcmp(logic, "not") == 0) {
        c->op = IDX_C_NOT;
        if (!(c->kids = calloc(1, sizeof(*c->kids))))
            return nomem(p);
        c->nkids = 1;
        rc = parse_cond(p, field(j, "not"), c->kids, depth + 1);
    } else {
        c->op = strcmp(logic, "all") == 0 ? IDX_C_ALL : IDX_C_ANY;
        rc = parse_kids(p, field(j, logic), c, depth);
    }
    if (rc == LC_OK)
        pop(p, m);
    return rc;
}

/* An optional condition field; *out NULL when absent. */
static lc_rc get_cond(pctx *p, const cJSON *o, const char *name, idx_cond **out)
{
    const cJSON *v = field(o, name);
    *out = NULL;
    if (!v)
        return LC_OK;
    idx_cond *c = calloc(1, sizeof(*c));
    if (!c)
        return nomem(p);
    size_t m = push(p, ".%s", name);
    lc_rc rc = parse_cond(p, v, c, 0);
    if (rc != LC_OK) {
        cond_free(c);
        return rc;
    }
    pop(p, m);
    *out = c;
    return LC_OK;
}

/* --- series_received -------------------------------------------------------------------- */

static void sexpr_release(idx_sexpr *e)
{
    if (!e)
        return;
    for (size_t i = 0; i < e->nkids; i++)
        sexpr_release(&e->kids[i]);
    free(e->kids);
    free(e->text);
}

static lc_rc parse_sexpr_list(pctx *p, const cJSON *a, idx_sexpr *e, int depth);

static lc_rc parse_sexpr(pctx *p, const cJSON *j, idx_sexpr *e, int depth)
{
    if (depth > MAX_DEPTH)
        return fail(p, "series lists nest deeper than %d", MAX_DEPTH);
    if (cJSON_IsString(j)) {
        if (!j->valuestring[0] || strlen(j->valuestring) > 64)
            return fail(p, "a series description must have 1 to 64 characters");
        if (!(e->text = strdup(j->valuestring)))
            return nomem(p);
        for (char *c = e->text; *c; c++)
            *c = (char)tolower((unsigned char)*c);
        return LC_OK;
    }
    const cJSON *all = cJSON_IsObject(j) ? field(j, "all") : NULL;
    const cJSON *any = cJSON_IsObject(j) ? field(j, "any") : NULL;
    if ((!all && !any) || cJSON_GetArraySize(j) != 1)
        return fail(p, "must be a series description or {\"any\": [...]} or {\"all\": [...]}");
    e->op = all ? 1 : 2;
    size_t m = push(p, all ? ".all" : ".any");
    lc_rc rc = parse_sexpr_list(p, all ? all : any, e, depth + 1);
    if (rc == LC_OK)
        pop(p, m);
    return rc;
}

static lc_rc parse_sexpr_list(pctx *p, const cJSON *a, idx_sexpr *e, int depth)
{
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) == 0)
        return fail(p, "must be a non-empty array");
    size_t n = (size_t)cJSON_GetArraySize(a), i = 0;
    if (!(e->kids = calloc(n, sizeof(*e->kids))))
        return nomem(p);
    e->nkids = n;
    for (const cJSON *k = a->child; k; k = k->next, i++) {
        size_t m = push(p, "[%zu]", i);
        lc_rc rc = parse_sexpr(p, k, &e->kids[i], depth);
        if (rc != LC_OK)
            return rc;
        pop(p, m);
    }
    return LC_OK;
}

/* --- completion entries ----------------------------------------------------------------- */

static const char *const source_kinds[] = {"http", "spool", "kafka", "notify", NULL};

static lc_rc parse_completion(pctx *p, const cJSON *j, idx_completion *c)
{
    static const char *const allowed[] = {
        "name", "source", "quiet_seconds", "expected_counts", "series_received", NULL};
    static const char *const src_allowed[] = {"kind", "name", NULL};
    const char *s = NULL;
    long long q = 0;
    int has = 0;
    lc_rc rc;
    c->quiet_seconds = -1;
    if (!cJSON_IsObject(j))
        return fail(p, "must be an object");
    if ((rc = check_fields(p, j, allowed)) != LC_OK ||
        (rc = get_str(p, j, "name", 64, &s)) != LC_OK)
        return rc;
    if (s)
        lc_strlcpy(c->name, s, sizeof(c->name));
    const cJSON *src = field(j, "source");
    if (src) {
        size_t m = push(p, ".source");
        if (!cJSON_IsObject(src))
            return fail(p, "must be an object {\"kind\": ..., \"name\": ...}");
        if ((rc = check_fields(p, src, src_allowed)) != LC_OK ||
            (rc = get_str(p, src, "kind", 16, &s)) != LC_OK)
            return rc;
        if (s) {
            int ok = 0;
            for (const char *const *k = source_kinds; *k && !ok; k++)
                ok = strcmp(*k, s) == 0;
            if (!ok)
                return fail(p, "kind \"%.16s\" is not one of http, spool, kafka, notify", s);
            if (!(c->kind = strdup(s)))
                return nomem(p);
        }
        if ((rc = get_str(p, src, "name", 128, &s)) != LC_OK)
            return rc;
        if (s && !(c->name_glob = strdup(s)))
            return nomem(p);
        if (!c->kind && !c->name_glob)
            return fail(p, "needs kind, name or both");
        pop(p, m);
    }
    if ((rc = get_int(p, j, "quiet_seconds", 0, 86400, &q, &has)) != LC_OK)
        return rc;
    if (has)
        c->quiet_seconds = q;
    if ((rc = get_bool(p, j, "expected_counts", &c->expected_counts)) != LC_OK)
        return rc;
    const cJSON *sr = field(j, "series_received");
    if (sr) {
        size_t m = push(p, ".series_received");
        if (!(c->series_needed = calloc(1, sizeof(*c->series_needed))))
            return nomem(p);
        c->series_needed->op = 1;
        if ((rc = parse_sexpr_list(p, sr, c->series_needed, 0)) != LC_OK)
            return rc;
        pop(p, m);
    }
    return LC_OK;
}

/* --- actions and rules ------------------------------------------------------------------ */

/* url_pattern: s3:// or file://, {Keyword} placeholders naming DICOM keywords. */
static lc_rc check_pattern(pctx *p, const char *pat)
{
    if (strncmp(pat, "s3://", 5) != 0 && strncmp(pat, "file://", 7) != 0)
        return fail(p, "must start with s3:// or file://");
    for (const char *c = pat; *c; c++) {
        if (*c == '}')
            return fail(p, "unbalanced \"}\"");
        if (*c != '{')
            continue;
        const char *end = strchr(c + 1, '}');
        char kw[72];
        if (!end || (size_t)(end - c - 1) >= sizeof(kw) || end == c + 1)
            return fail(p, "a \"{\" without a keyword and \"}\"");
        memcpy(kw, c + 1, (size_t)(end - c - 1));
        kw[end - c - 1] = '\0';
        unsigned tag;
        if (!keyword_known(kw, &tag))
            return fail(p, "unknown DICOM keyword \"{%s}\"", kw);
        c = end;
    }
    return LC_OK;
}

static lc_rc parse_action(pctx *p, const cJSON *j, idx_action *a)
{
    static const char *const up_allowed[] = {"action", "url_pattern", "layout", "priority", NULL};
    static const char *const seg_allowed[] = {"action", "algorithm", "model", "series",
                                              "params", "priority",  NULL};
    static const char *const layouts[] = {"instance", "series-tar", "study-tar", NULL};
    static const char *const algorithms[] = {"otsu", "body", "threshold", NULL};
    const char *kind = NULL, *s = NULL;
    long long prio = 0;
    lc_rc rc;
    if (!cJSON_IsObject(j))
        return fail(p, "an action must be an object");
    if ((rc = get_str(p, j, "action", 16, &kind)) != LC_OK)
        return rc;
    if (!kind)
        return fail(p, "needs \"action\": \"upload\" or \"segment\"");
    if (!(a->params = cJSON_CreateObject()))
        return nomem(p);
    if (strcmp(kind, "upload") == 0) {
        a->kind = IDX_A_UPLOAD;
        if ((rc = check_fields(p, j, up_allowed)) != LC_OK ||
            (rc = get_str(p, j, "url_pattern", 1024, &s)) != LC_OK)
            return rc;
        if (s) {
            size_t m = push(p, ".url_pattern");
            if ((rc = check_pattern(p, s)) != LC_OK)
                return rc;
            pop(p, m);
            if (!cJSON_AddStringToObject(a->params, "url_pattern", s))
                return nomem(p);
        }
        if ((rc = get_str(p, j, "layout", 16, &s)) != LC_OK)
            return rc;
        if (s) {
            int ok = 0;
            for (const char *const *l = layouts; *l && !ok; l++)
                ok = strcmp(*l, s) == 0;
            if (!ok) {
                push(p, ".layout");
                return fail(p, "\"%.16s\" is not one of instance, series-tar, study-tar", s);
            }
            if (!cJSON_AddStringToObject(a->params, "layout", s))
                return nomem(p);
        }
    } else if (strcmp(kind, "segment") == 0) {
        a->kind = IDX_A_SEGMENT;
        const char *model = NULL;
        if ((rc = check_fields(p, j, seg_allowed)) != LC_OK ||
            (rc = get_str(p, j, "algorithm", 32, &s)) != LC_OK ||
            (rc = get_str(p, j, "model", 128, &model)) != LC_OK)
            return rc;
        if (s && model)
            return fail(p, "give \"algorithm\" or \"model\", not both");
        const cJSON *extra = field(j, "params");
        if (extra) {
            size_t m = push(p, ".params");
            static const char *const reserved[] = {"algorithm", "model", "series_instance_uid",
                                                   "series", NULL};
            if (!cJSON_IsObject(extra))
                return fail(p, "must be an object (options passed to the segmenter)");
            for (const char *const *r = reserved; *r; r++)
                if (field(extra, *r))
                    return fail(p, "\"%s\" is set by the rule, not in params", *r);
            pop(p, m);
            cJSON_Delete(a->params);
            if (!(a->params = cJSON_Duplicate(extra, 1)))
                return nomem(p);
        }
        if (s) {
            int ok = 0;
            for (const char *const *l = algorithms; *l && !ok; l++)
                ok = strcmp(*l, s) == 0;
            if (!ok) {
                push(p, ".algorithm");
                return fail(p, "\"%.32s\" is not one of otsu, body, threshold", s);
            }
            if (!cJSON_AddStringToObject(a->params, "algorithm", s))
                return nomem(p);
        }
        if (model && !cJSON_AddStringToObject(a->params, "model", model))
            return nomem(p);
        if ((rc = get_cond(p, j, "series", &a->series)) != LC_OK)
            return rc;
    } else {
        push(p, ".action");
        return fail(p, "\"%.16s\" is not upload or segment", kind);
    }
    if ((rc = get_int(p, j, "priority", -100, 100, &prio, &a->has_priority)) != LC_OK)
        return rc;
    a->priority = (int)prio;
    return LC_OK;
}

static int name_ok(const char *s)
{
    for (const char *c = s; *c; c++)
        if (!isalnum((unsigned char)*c) && *c != '_' && *c != '-' && *c != '.')
            return 0;
    return *s != '\0';
}

static void rule_release(idx_rule *r)
{
    for (size_t i = 0; i < r->nactions; i++) {
        cJSON_Delete(r->actions[i].params);
        cond_free(r->actions[i].series);
    }
    free(r->actions);
    cond_free(r->when);
    memset(r, 0, sizeof(*r));
}

/* Parse rule j into r; *enabled gets its "enabled" flag. */
static lc_rc parse_rule(pctx *p, const cJSON *j, idx_rule *r, int *enabled)
{
    static const char *const allowed[] = {"name", "description", "enabled", "level",
                                          "when", "priority",    "actions", NULL};
    const char *s = NULL;
    long long prio = 0;
    int has = 0;
    lc_rc rc;
    if (!cJSON_IsObject(j))
        return fail(p, "a rule must be an object");
    if ((rc = get_str(p, j, "name", 64, &s)) != LC_OK)
        return rc;
    if (!s || !name_ok(s))
        return fail(p, "needs a \"name\" of letters, digits, '_', '-' and '.'");
    lc_strlcpy(r->name, s, sizeof(r->name));
    push(p, " (\"%s\")", r->name);
    for (size_t k = 0; k < p->r->nrules; k++)
        if (strcmp(p->r->rules[k].name, r->name) == 0)
            return fail(p, "the name is used by another rule");
    if ((rc = check_fields(p, j, allowed)) != LC_OK ||
        (rc = get_str(p, j, "description", 1024, &s)) != LC_OK ||
        (rc = get_bool(p, j, "enabled", enabled)) != LC_OK ||
        (rc = get_str(p, j, "level", 16, &s)) != LC_OK)
        return rc;
    if (s && strcmp(s, "study") != 0 && strcmp(s, "series") != 0) {
        push(p, ".level");
        return fail(p, "must be \"study\" or \"series\"");
    }
    r->level = s && strcmp(s, "series") == 0 ? IDX_LEVEL_SERIES : IDX_LEVEL_STUDY;
    if ((rc = get_cond(p, j, "when", &r->when)) != LC_OK ||
        (rc = get_int(p, j, "priority", -100, 100, &prio, &has)) != LC_OK)
        return rc;
    r->priority = (int)prio;
    const cJSON *acts = field(j, "actions");
    size_t m = push(p, ".actions");
    if (!cJSON_IsArray(acts) || cJSON_GetArraySize(acts) == 0)
        return fail(p, "needs a non-empty array of actions");
    size_t n = (size_t)cJSON_GetArraySize(acts), k = 0;
    if (!(r->actions = calloc(n, sizeof(*r->actions))))
        return nomem(p);
    r->nactions = n;
    for (const cJSON *a = acts->child; a; a = a->next, k++) {
        size_t m2 = push(p, "[%zu]", k);
        if ((rc = parse_action(p, a, &r->actions[k])) != LC_OK)
            return rc;
        pop(p, m2);
    }
    pop(p, m);
    return LC_OK;
}

/* --- the file --------------------------------------------------------------------------- */

void idx_rules_free(idx_rules *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->nrules; i++)
        rule_release(&r->rules[i]);
    free(r->rules);
    for (size_t i = 0; i < r->ncompletion; i++) {
        idx_completion *c = &r->completion[i];
        free(c->kind);
        free(c->name_glob);
        sexpr_release(c->series_needed);
        free(c->series_needed);
    }
    free(r->completion);
    for (size_t i = 0; i < r->nmeta; i++)
        free(r->meta_tags[i]);
    free(r->meta_tags);
    free(r->keys);
    free(r->path);
    free(r);
}

static lc_rc parse_top(pctx *p, const cJSON *root)
{
    static const char *const allowed[] = {"$schema", "version", "completion", "rules", NULL};
    idx_rules *r = p->r;
    lc_rc rc;
    long long version = 1;
    int has = 0;
    const char *s = NULL;
    if (!cJSON_IsObject(root))
        return fail(p, "the file must hold a JSON object");
    if ((rc = check_fields(p, root, allowed)) != LC_OK ||
        (rc = get_str(p, root, "$schema", 1024, &s)) != LC_OK ||
        (rc = get_int(p, root, "version", 1, 1, &version, &has)) != LC_OK)
        return rc;
    const cJSON *comp = field(root, "completion");
    if (comp) {
        size_t m = push(p, "completion");
        if (!cJSON_IsArray(comp))
            return fail(p, "must be an array");
        size_t n = (size_t)cJSON_GetArraySize(comp), i = 0;
        if (n && !(r->completion = calloc(n, sizeof(*r->completion))))
            return nomem(p);
        for (const cJSON *c = comp->child; c; c = c->next, i++) {
            size_t m2 = push(p, "[%zu]", i);
            r->ncompletion = i + 1;
            if ((rc = parse_completion(p, c, &r->completion[i])) != LC_OK)
                return rc;
            pop(p, m2);
        }
        pop(p, m);
    }
    const cJSON *rules = field(root, "rules");
    if (rules) {
        size_t m = push(p, "rules");
        if (!cJSON_IsArray(rules))
            return fail(p, "must be an array");
        r->has_rules = 1;
        size_t n = (size_t)cJSON_GetArraySize(rules), i = 0;
        if (n && !(r->rules = calloc(n, sizeof(*r->rules))))
            return nomem(p);
        for (const cJSON *c = rules->child; c; c = c->next, i++) {
            size_t m2 = push(p, "[%zu]", i);
            int enabled = 1;
            idx_rule *rule = &r->rules[r->nrules];
            rc = parse_rule(p, c, rule, &enabled);
            if (rc != LC_OK) {
                rule_release(rule);
                return rc;
            }
            if (enabled)
                r->nrules++;
            else
                rule_release(rule); /* validated, then left out */
            pop(p, m2);
        }
        pop(p, m);
    }
    return LC_OK;
}

lc_rc idx_rules_parse(const char *json, size_t len, const char *what, idx_rules **out, lc_err *err)
{
    pctx p = {.what = what ? what : "", .err = err};
    *out = NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!root) {
        size_t off = end && end >= json ? (size_t)(end - json) : 0;
        size_t line = 1;
        for (size_t i = 0; i < off && i < len; i++)
            line += json[i] == '\n';
        return lc_err_set(err, LC_ERR_CONFIG,
                          "invalid rules file \"%s\": not valid JSON (line %zu)", p.what, line);
    }
    if (!(p.r = calloc(1, sizeof(*p.r))) || !(p.r->path = strdup(p.what))) {
        cJSON_Delete(root);
        idx_rules_free(p.r);
        return nomem(&p);
    }
    lc_rc rc = parse_top(&p, root);
    cJSON_Delete(root);
    if (rc != LC_OK) {
        idx_rules_free(p.r);
        return rc;
    }
    *out = p.r;
    return LC_OK;
}

lc_rc idx_rules_load(const char *path, idx_rules **out, lc_err *err)
{
    char *buf = NULL;
    size_t len = 0;
    lc_err e = {0};
    *out = NULL;
    if (lc_read_file(path, IDX_RULES_MAX_BYTES, &buf, &len, &e) != LC_OK)
        return lc_err_set(err, LC_ERR_CONFIG, "could not read rules file \"%s\": %s", path,
                          lc_err_msg(&e));
    lc_rc rc = idx_rules_parse(buf, len, path, out, err);
    free(buf);
    return rc;
}

/* --- matching sources and listed series ------------------------------------------------- */

/* DICOM-style wildcard: '*' any run, '?' one character (byte); icase folds ASCII. */
int idx_glob_match(const char *pat, const char *s, int icase)
{
    const char *star = NULL, *resume = NULL;
    while (*s) {
        char a = *pat, b = *s;
        if (icase) {
            a = (char)tolower((unsigned char)a);
            b = (char)tolower((unsigned char)b);
        }
        if (*pat == '*') {
            star = pat++;
            resume = s;
        } else if (*pat && (*pat == '?' || a == b)) {
            pat++;
            s++;
        } else if (star) {
            pat = star + 1;
            s = ++resume;
        } else {
            return 0;
        }
    }
    while (*pat == '*')
        pat++;
    return *pat == '\0';
}

const idx_completion *idx_rules_completion_for(const idx_rules *r, const char *kind,
                                               const char *name)
{
    for (size_t i = 0; r && i < r->ncompletion; i++) {
        const idx_completion *c = &r->completion[i];
        if (c->kind && (!kind || strcmp(c->kind, kind) != 0))
            continue;
        if (c->name_glob && (!name || !idx_glob_match(c->name_glob, name, 0)))
            continue;
        return c;
    }
    return NULL;
}

/* Case-insensitive substring (mercure's rule for completion series). */
static int contains_icase(const char *hay, const char *needle_lower)
{
    size_t n = strlen(needle_lower);
    for (const char *h = hay; *h; h++) {
        size_t i = 0;
        while (i < n && h[i] && tolower((unsigned char)h[i]) == needle_lower[i])
            i++;
        if (i == n)
            return 1;
    }
    return n == 0;
}

int idx_sexpr_match(const idx_sexpr *e, char *const *descs, size_t n)
{
    if (!e)
        return 1;
    if (e->op == 0) {
        for (size_t i = 0; i < n; i++)
            if (descs[i] && contains_icase(descs[i], e->text))
                return 1;
        return 0;
    }
    for (size_t i = 0; i < e->nkids; i++) {
        int m = idx_sexpr_match(&e->kids[i], descs, n);
        if (e->op == 1 && !m)
            return 0;
        if (e->op == 2 && m)
            return 1;
    }
    return e->op == 1;
}
