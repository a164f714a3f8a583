/*
 * cfg.h: configuration from RADPIPE_* environment variables, table-driven.
 * Each service declares tables of lc_cfg_var pointing into its own config struct; lc_cfg_load
 * fills every field from the environment or the default, reads NAME_FILE for secrets, checks
 * types and ranges, and reports every bad value (not just the first) with a clear message.
 * The loaded struct is read-only afterwards (the only global-ish state radpipe allows).
 */
#ifndef LC_CFG_H
#define LC_CFG_H

#include <stddef.h>
#include <stdio.h>
#include "lc/rc.h"

typedef enum lc_cfg_type {
    LC_CFG_STR,   /* char * (malloc'd, freed by lc_cfg_release) */
    LC_CFG_INT,   /* long long, within [min, max] */
    LC_CFG_BOOL,  /* int: 1/0 from true/false/yes/no/on/off/1/0 */
    LC_CFG_BYTES, /* long long from "123", "64K", "10M", "2G" (powers of 1024), within [min, max] */
    LC_CFG_DBL,   /* double, within [min, max] */
    LC_CFG_ENUM,  /* char *, one of the '|'-separated words in choices */
} lc_cfg_type;

enum {
    LC_CFG_SECRET = 1u << 0,   /* also read from NAME_FILE; value never printed */
    LC_CFG_REQUIRED = 1u << 1, /* no default: must be set (or NAME_FILE for secrets) */
};

typedef struct lc_cfg_var {
    const char *name; /* full variable name, "RADPIPE_DATABASE_URL" */
    lc_cfg_type type;
    const char *def; /* default as text (NULL: empty string / 0 / unset) */
    double min, max; /* range for numeric types (ignored when min > max) */
    unsigned flags;
    const char *choices; /* LC_CFG_ENUM: "auto|cpu|cuda" */
    const char *help;    /* one line for README and --help */
    size_t offset;       /* offsetof(struct, field) */
} lc_cfg_var;

typedef struct lc_cfg_table {
    const lc_cfg_var *vars;
    size_t n;
    void *base; /* the struct the offsets point into */
} lc_cfg_table;

/* Load every table; on error logs one line per bad value, fills err with a summary naming
 * the first and returns LC_ERR_CONFIG. Secrets: NAME_FILE wins over NAME when both are set,
 * and its contents are used with one trailing newline removed. */
lc_rc lc_cfg_load(const lc_cfg_table *tables, size_t ntables, lc_err *err);
/* Free the strings lc_cfg_load allocated (accepts partially loaded structs). */
void lc_cfg_release(const lc_cfg_table *tables, size_t ntables);
/* Markdown rows "| `NAME` | default | help |" for README.md and `--help`. */
void lc_cfg_print_markdown(FILE *out, const lc_cfg_table *tables, size_t ntables);

/* Parse helpers, exposed for tests and other modules. Return LC_ERR_INVALID on bad input. */
lc_rc lc_cfg_parse_bytes(const char *s, long long *out);
lc_rc lc_cfg_parse_bool(const char *s, int *out);

#endif
