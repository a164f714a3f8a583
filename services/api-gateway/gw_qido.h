/*
 * gw_qido.h: QIDO-RS (PS3.18 10.6) query parsing and SQL generation, pure C with no I/O so a
 * fuzzer can drive it: a query string becomes a gw_qido_query (matching keys, includefield,
 * limit, offset, fuzzymatching), checked against the attributes the index holds (the table
 * below, over proto/sql/002_qido.sql's columns); the query becomes one parameterised SELECT
 * whose text depends only on the query's shape, never on its values. Unknown parameters,
 * attributes that cannot be matched, malformed values (dates, times, UIDs, numbers) and
 * negative or zero limits are LC_ERR_INVALID with a message naming the parameter.
 * Reentrant; a query and its SQL belong to one thread.
 */
#ifndef GW_QIDO_H
#define GW_QIDO_H

#include <stddef.h>
#include "gw_buf.h"
#include "lc/rc.h"

typedef enum gw_qido_level { GW_QIDO_STUDY = 0, GW_QIDO_SERIES, GW_QIDO_INSTANCE } gw_qido_level;

/* How an attribute is matched (PS3.4 C.2.2.2). */
typedef enum gw_qido_kind {
    GW_QK_NONE = 0, /* returned only, not a matching key */
    GW_QK_TEXT,     /* single value or wildcard, case-sensitive */
    GW_QK_CI,       /* single value or wildcard against an upper-cased column, PN/LO */
    GW_QK_DATE,     /* DA: single value or range */
    GW_QK_TIME,     /* TM: single value or range */
    GW_QK_UID,      /* UI: single value or list (\ or ,) */
    GW_QK_INT,      /* IS: single value */
    GW_QK_CS_ARRAY, /* a CS array column (ModalitiesInStudy): value, list or wildcard */
} gw_qido_kind;

/* How an attribute is returned. */
typedef enum gw_qido_ret {
    GW_QR_OPTIONAL = 0, /* only when asked for (match key, includefield) */
    GW_QR_IF_KNOWN,     /* Type C: when the value is known */
    GW_QR_ALWAYS,       /* Type R/U: always, empty when unknown */
} gw_qido_ret;

typedef struct gw_qido_attr {
    unsigned tag;
    const char *keyword;
    const char *vr;
    gw_qido_level level;
    const char *select; /* SQL expression returning the value as text; NULL: computed */
    const char *match;  /* SQL expression matched against (GW_QK_NONE: NULL) */
    gw_qido_kind kind;
    gw_qido_ret ret;
} gw_qido_attr;

extern const gw_qido_attr gw_qido_attrs[];
extern const size_t gw_qido_nattrs;
/* The table index of tag, -1 when the index does not hold it. */
int gw_qido_attr_index(unsigned tag);

#define GW_QIDO_MAX_KEYS   32
#define GW_QIDO_MAX_EXTRA  64   /* includefield attributes outside the table */
#define GW_QIDO_MAX_LIMIT  1000 /* larger limits are lowered to this (a Warning tells) */
#define GW_QIDO_MAX_PARAMS (2 * GW_QIDO_MAX_KEYS + 8)
#define GW_QIDO_MAX_VALUE  4096 /* bytes of one decoded value */

typedef struct gw_qido_key {
    int attr;    /* index into gw_qido_attrs */
    char *value; /* decoded, owned; "" = universal matching (returned, not filtered) */
} gw_qido_key;

typedef struct gw_qido_query {
    gw_qido_level level;
    char study_uid[65];  /* from the path, "" when absent */
    char series_uid[65]; /* from the path, "" when absent */
    gw_qido_key keys[GW_QIDO_MAX_KEYS];
    int nkeys;
    unsigned char include[128];        /* per table attribute: 1 when asked for by includefield */
    unsigned extra[GW_QIDO_MAX_EXTRA]; /* includefield tags outside the table */
    int nextra;
    int include_all;
    long long limit;   /* 1..GW_QIDO_MAX_LIMIT */
    int limit_lowered; /* the client asked for more than GW_QIDO_MAX_LIMIT */
    long long offset;
    int fuzzy; /* fuzzymatching=true: matching stays literal, a Warning header says so */
} gw_qido_query;

/* Resolve a DICOM keyword that is not in the table (for includefield), e.g. through GDCM's
 * dictionary. Returns 1 and sets *tag when known. May be NULL: then only the table's
 * keywords and 8-digit hex tags are accepted. */
typedef int (*gw_qido_resolve_fn)(const char *keyword, unsigned *tag);

/* Parse query string qs (without '?', may be NULL) for a search at level, below the study
 * and series of the path (may be NULL/""). On failure nothing needs releasing. */
lc_rc gw_qido_parse(const char *qs, gw_qido_level level, const char *study_uid,
                    const char *series_uid, gw_qido_resolve_fn resolve, gw_qido_query *q,
                    lc_err *err);
void gw_qido_query_release(gw_qido_query *q);

/* The SELECT for a parsed query: one row per result, at most limit + 1 rows (so the caller
 * can tell that more results exist). col[a] is the result column of table attribute a, -1
 * when not selected; md_col the column holding instance_metadata JSON text for extra
 * includefield attributes, -1 when not selected. */
typedef struct gw_qido_sql {
    gw_buf sql;
    int nparams;
    char *params[GW_QIDO_MAX_PARAMS]; /* owned */
    int col[128];
    int md_col;
    int ncols;
} gw_qido_sql;
lc_rc gw_qido_build_sql(const gw_qido_query *q, gw_qido_sql *out, lc_err *err);
void gw_qido_sql_release(gw_qido_sql *s);

/* Whether table attribute a goes into each result of q: 0 no, GW_QR_IF_KNOWN when it has a
 * value, GW_QR_ALWAYS (empty when unknown). */
gw_qido_ret gw_qido_returns(const gw_qido_query *q, size_t a);

/* Validators shared with the REST API: DICOM DA (YYYYMMDD, a real date) and TM. */
int gw_qido_date_ok(const char *s, size_t n);
int gw_qido_time_ok(const char *s, size_t n);

#endif
