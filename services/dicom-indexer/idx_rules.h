/*
 * idx_rules.h: the indexer's routing rules and per-source completion settings
 * (RADPIPE_RULES_FILE, schema in proto/rules/rules.schema.json): the parsed model, the data a
 * study is judged on, and the job plan the rules produce. An idx_rules is immutable once
 * loaded (a reload builds a new one and swaps the pointer on the consuming thread); study
 * data and plans belong to the caller. Files: idx_rules_parse.c (load and validate),
 * idx_rules_match.c (conditions), idx_rules_eval.c (study data and job plans),
 * idx_rules_dry.c (--dry-run-rules and --check-rules).
 */
#ifndef IDX_RULES_H
#define IDX_RULES_H

#include <regex.h>
#include <stddef.h>
#include <cjson/cJSON.h>
#include "lc/cfg.h"
#include "lc/db.h"
#include "lc/rc.h"

/* The largest rules file accepted. */
#define IDX_RULES_MAX_BYTES (4 << 20)

/* Where a keyword's value comes from. */
typedef enum idx_ksrc {
    IDX_K_STUDY = 0, /* an indexed column of studies (or the study's source) */
    IDX_K_SERIES,    /* an indexed column of series */
    IDX_K_META,      /* instance_metadata DICOM JSON of the series' first instance */
} idx_ksrc;

/* The indexed columns rules can name without the metadata (idx_rules_parse.c); col is the
 * column's place in idx_rules_eval.c's study or series SELECT list. */
typedef struct idx_colkey {
    const char *keyword;
    idx_ksrc src;
    int col;
    int multi; /* backslash-separated values (ModalitiesInStudy) */
} idx_colkey;
extern const idx_colkey idx_rules_cols[];
extern const size_t idx_rules_ncols;

typedef struct idx_rkey {
    char keyword[64]; /* "Modality", "source.kind", ... */
    idx_ksrc src;
    int col;     /* IDX_K_STUDY / IDX_K_SERIES: index into idx_rules_cols */
    char tag[9]; /* IDX_K_META: "GGGGEEEE", the DICOM JSON key */
} idx_rkey;

typedef enum idx_cop {
    IDX_C_ALL = 0,
    IDX_C_ANY,
    IDX_C_NOT,
    IDX_C_EQUALS,
    IDX_C_WILDCARD,
    IDX_C_IN,
    IDX_C_RANGE,
    IDX_C_DATE_RANGE,
    IDX_C_REGEX,
    IDX_C_PRESENT,
} idx_cop;

typedef struct idx_cond {
    idx_cop op;
    struct idx_cond *kids; /* all / any (nkids), not (1) */
    size_t nkids;
    int key;     /* leaves: index into idx_rules.keys */
    int icase;   /* "ignore_case" */
    char **strs; /* equals (1), wildcard (1), in (nstrs) */
    size_t nstrs;
    int numeric;          /* equals / in: the values were JSON numbers: compare as numbers */
    double *nums;         /* numeric equals / in */
    double min, max;      /* range */
    int has_min, has_max; /* range, date_range */
    char from[9], to[9];  /* date_range, YYYYMMDD */
    regex_t re;           /* regex */
    int has_re;
    int present; /* present: true or false */
} idx_cond;

/* "series_received": every item must match (mercure's completion series: a case-insensitive
 * substring of a SeriesDescription); items nest with any/all. */
typedef struct idx_sexpr {
    int op;     /* 0: text, 1: all, 2: any */
    char *text; /* lower-cased */
    struct idx_sexpr *kids;
    size_t nkids;
} idx_sexpr;

typedef struct idx_completion {
    char name[65];
    char *kind;               /* source kind to match; NULL = any */
    char *name_glob;          /* source name (* and ?); NULL = any */
    long long quiet_seconds;  /* -1: RADPIPE_STUDY_QUIET_SECONDS */
    int expected_counts;      /* complete once every series has its expected count */
    idx_sexpr *series_needed; /* NULL: no listed-series condition */
} idx_completion;

typedef enum idx_akind { IDX_A_UPLOAD = 0, IDX_A_SEGMENT } idx_akind;

typedef struct idx_action {
    idx_akind kind;
    cJSON *params;    /* the job params the action fixes (owned) */
    idx_cond *series; /* segment: which series (NULL: see idx_rules_plan) */
    int priority;
    int has_priority;
} idx_action;

typedef enum idx_level { IDX_LEVEL_STUDY = 0, IDX_LEVEL_SERIES } idx_level;

typedef struct idx_rule {
    char name[65]; /* [A-Za-z0-9_.-], unique: part of the jobs' dedupe keys */
    idx_level level;
    idx_cond *when; /* NULL: always */
    int priority;
    idx_action *actions;
    size_t nactions;
} idx_rule;

typedef struct idx_rules {
    char *path; /* where it was loaded from ("" for a string) */
    idx_rkey *keys;
    size_t nkeys;
    idx_rule *rules;
    size_t nrules;
    int has_rules; /* the file has a "rules" array (else: the built-in upload + segment) */
    idx_completion *completion;
    size_t ncompletion;
    char **meta_tags; /* distinct IDX_K_META tags, for the metadata query */
    size_t nmeta;
} idx_rules;

/* Load and validate a rules file; LC_ERR_CONFIG with a message naming the file, the rule and
 * the field ("rules[1] (\"ct-seg\").when.any[0].regex: ...") when it is invalid. */
lc_rc idx_rules_load(const char *path, idx_rules **out, lc_err *err);
/* The same from a JSON text; what names it in messages. */
lc_rc idx_rules_parse(const char *json, size_t len, const char *what, idx_rules **out, lc_err *err);
void idx_rules_free(idx_rules *r); /* accepts NULL */

/* The first completion entry matching a study's source (kind/name may be NULL: unknown);
 * NULL when none matches (or r is NULL): the defaults apply. */
const idx_completion *idx_rules_completion_for(const idx_rules *r, const char *kind,
                                               const char *name);
/* DICOM-style wildcard match: '*' any run, '?' one byte; icase folds ASCII letters. */
int idx_glob_match(const char *pat, const char *s, int icase);
/* 1 when the series descriptions descs (n of them, NULL entries allowed) satisfy e. */
int idx_sexpr_match(const idx_sexpr *e, char *const *descs, size_t n);

/* --- the data a study is judged on (idx_rules_eval.c) ---------------------------------- */

typedef struct idx_vals {
    char **v; /* owned strings */
    size_t n;
} idx_vals;

typedef struct idx_rseries {
    char uid[65];
    int in_scope; /* part of this completion: every series in version 1, new ones later */
    idx_vals *kv; /* per key of the rules (IDX_K_SERIES and IDX_K_META filled) */
} idx_rseries;

typedef struct idx_rstudy {
    char uid[65];
    int version;  /* the completed version being routed (1: the whole study) */
    idx_vals *kv; /* per key of the rules (IDX_K_STUDY filled) */
    idx_rseries *series;
    size_t nseries;
} idx_rstudy;

/* Load what the rules r (NULL: the built-in default, which needs only the series) look at
 * for study_uid. scope (JSON array text of SeriesInstanceUIDs, may be NULL) limits in_scope
 * to those series; NULL puts every series in scope. Runs inside the caller's transaction or
 * alone. LC_ERR_NOT_FOUND for an unknown study. */
lc_rc idx_rules_load_study(lc_db *db, const idx_rules *r, const char *study_uid, int version,
                           const char *scope, idx_rstudy **out, lc_err *err);
void idx_rstudy_free(idx_rstudy *s, size_t nkeys); /* accepts NULL */

/* 1 when c holds for study s, judged on series ser (NULL: study level, where a series or
 * metadata keyword holds when it holds for any series in scope). */
int idx_cond_match(const idx_rules *r, const idx_cond *c, const idx_rstudy *s,
                   const idx_rseries *ser);

/* --- job plans ------------------------------------------------------------------------- */

typedef struct idx_jobspec {
    char kind[16]; /* "upload", "segment" */
    char rule[65]; /* "" for the built-in default */
    cJSON *params; /* owned */
    int priority;
    char dedupe[320];
} idx_jobspec;

typedef struct idx_jobplan {
    idx_jobspec *v;
    size_t n, cap;
} idx_jobplan;

/* The jobs rules r (NULL or without a "rules" array: the built-in default) create for s:
 *  - built-in: version 1 one upload and one segment job with empty params (keys
 *    <study>:v1:upload and :segment); an amended version one upload job with "series" and one
 *    segment job per series in scope with "series_instance_uid".
 *  - a study-level rule whose "when" holds: upload with its params (+ "series" on amended
 *    versions); segment once per series in scope that its "series" selector accepts, or
 *    without a selector once with no series (version 1) or once per series in scope.
 *  - a series-level rule: upload with "series" = the series in scope it holds for, segment
 *    once per such series (its selector, when given, filtering further).
 * Keys: <study>:v<version>:<rule>:<action index>:<kind>[:<series>]. Appends to plan. */
lc_rc idx_rules_plan(const idx_rules *r, const idx_rstudy *s, idx_jobplan *plan, lc_err *err);
void idx_jobplan_release(idx_jobplan *p);

/* --- command line (idx_rules_dry.c) ----------------------------------------------------- */

/* RADPIPE_RULES_FILE: the indexer's second configuration table (main.c). */
typedef struct idx_rules_cfg {
    char *rules_file; /* "" when unset */
} idx_rules_cfg;
extern const lc_cfg_var idx_rules_cfg_vars[];
extern const size_t idx_rules_cfg_nvars;

/* --check-rules FILE: validate, print a summary or the error; the exit code. */
int idx_rules_check_main(const char *path);
/* --dry-run-rules FILE: connect read-only to RADPIPE_DATABASE_URL and print, one JSON line
 * each, the jobs FILE's rules would create for every indexed study judged as version 1;
 * writes nothing. Returns the exit code. */
int idx_rules_dry_run_main(const char *path);

#endif
