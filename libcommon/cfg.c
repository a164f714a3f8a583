/*
 * cfg.c: RADPIPE_* variables into service config structs, table-driven (see cfg.h).
 * Runs once at start on the main thread; every bad value is logged, then LC_ERR_CONFIG.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include "lc/cfg.h"
#include "lc/log.h"
#include "lc/util.h"

#define SECRET_MAX (64 * 1024)

lc_rc lc_cfg_parse_bool(const char *s, int *out)
{
    static const char *const t[] = {"1", "true", "yes", "on"};
    static const char *const f[] = {"0", "false", "no", "off"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, t[i]) == 0) {
            *out = 1;
            return LC_OK;
        }
        if (strcasecmp(s, f[i]) == 0) {
            *out = 0;
            return LC_OK;
        }
    }
    return LC_ERR_INVALID;
}

lc_rc lc_cfg_parse_bytes(const char *s, long long *out)
{
    char *end = NULL;
    errno = 0;
    if (!*s || *s == '-' || *s == ' ')
        return LC_ERR_INVALID;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s)
        return LC_ERR_INVALID;
    unsigned long long mul = 1;
    if (*end) {
        switch (*end) {
        case 'k':
        case 'K':
            mul = 1ULL << 10;
            break;
        case 'm':
        case 'M':
            mul = 1ULL << 20;
            break;
        case 'g':
        case 'G':
            mul = 1ULL << 30;
            break;
        case 't':
        case 'T':
            mul = 1ULL << 40;
            break;
        default:
            return LC_ERR_INVALID;
        }
        end++;
        /* accept "K", "KB", "KiB" */
        if (*end == 'i' || *end == 'I')
            end++;
        if (*end == 'b' || *end == 'B')
            end++;
        if (*end)
            return LC_ERR_INVALID;
    }
    if (v > (unsigned long long)LLONG_MAX / mul)
        return LC_ERR_INVALID;
    *out = (long long)(v * mul);
    return LC_OK;
}

static lc_rc parse_int(const char *s, long long *out)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end)
        return LC_ERR_INVALID;
    *out = v;
    return LC_OK;
}

static lc_rc parse_dbl(const char *s, double *out)
{
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v))
        return LC_ERR_INVALID;
    *out = v;
    return LC_OK;
}

static int enum_has(const char *choices, const char *s)
{
    size_t n = strlen(s);
    for (const char *p = choices; p && *p;) {
        const char *bar = strchr(p, '|');
        size_t k = bar ? (size_t)(bar - p) : strlen(p);
        if (k == n && strncmp(p, s, n) == 0)
            return 1;
        p = bar ? bar + 1 : p + k;
    }
    return 0;
}

/* The raw text of a variable: NAME_FILE (secrets), NAME, or the default. *owned is set when
 * the returned string was allocated. */
static lc_rc raw_value(const lc_cfg_var *v, const char **val, char **owned, int *from_env,
                       char *why, size_t whycap)
{
    *owned = NULL;
    *from_env = 0;
    if (v->flags & LC_CFG_SECRET) {
        char fname[256];
        snprintf(fname, sizeof(fname), "%s_FILE", v->name);
        const char *path = getenv(fname);
        if (path && *path) {
            lc_err e;
            char *buf = NULL;
            size_t len = 0;
            if (lc_read_file(path, SECRET_MAX, &buf, &len, &e) != LC_OK) {
                snprintf(why, whycap, "%s: %s", fname, lc_err_msg(&e));
                return LC_ERR_CONFIG;
            }
            if (len && buf[len - 1] == '\n')
                buf[--len] = '\0';
            if (len && buf[len - 1] == '\r')
                buf[--len] = '\0';
            *val = *owned = buf;
            *from_env = 1;
            return LC_OK;
        }
    }
    const char *env = getenv(v->name);
    if (env) {
        *val = env;
        *from_env = 1;
        return LC_OK;
    }
    *val = v->def;
    return LC_OK;
}

static int in_range(const lc_cfg_var *v, double x)
{
    if (v->min > v->max)
        return 1;
    return x >= v->min && x <= v->max;
}

/* Load one variable; on failure writes the reason into why. */
static lc_rc load_var(const lc_cfg_var *v, void *base, char *why, size_t whycap)
{
    const char *val = NULL;
    char *owned = NULL;
    int from_env = 0;
    lc_rc rc = raw_value(v, &val, &owned, &from_env, why, whycap);
    void *field = (char *)base + v->offset;
    const char *shown = (v->flags & LC_CFG_SECRET) ? "(secret)" : val;

    if (rc != LC_OK)
        return rc;
    if ((v->flags & LC_CFG_REQUIRED) && (!val || !*val)) {
        snprintf(why, whycap, "%s is required but not set%s", v->name,
                 (v->flags & LC_CFG_SECRET) ? " (set it or " : "");
        if (v->flags & LC_CFG_SECRET) {
            size_t n = strlen(why);
            snprintf(why + n, whycap - n, "%s_FILE)", v->name);
        }
        rc = LC_ERR_CONFIG;
        goto out;
    }
    switch (v->type) {
    case LC_CFG_STR:
    case LC_CFG_ENUM: {
        const char *s = val ? val : "";
        if (v->type == LC_CFG_ENUM && !enum_has(v->choices, s)) {
            snprintf(why, whycap, "invalid value for %s: \"%s\" is not one of %s", v->name, s,
                     v->choices);
            rc = LC_ERR_CONFIG;
            goto out;
        }
        char *copy = strdup(s);
        if (!copy) {
            snprintf(why, whycap, "out of memory");
            rc = LC_ERR_NOMEM;
            goto out;
        }
        free(*(char **)field);
        *(char **)field = copy;
        break;
    }
    case LC_CFG_INT:
    case LC_CFG_BYTES: {
        long long x = 0;
        if (val && *val) {
            rc = v->type == LC_CFG_INT ? parse_int(val, &x) : lc_cfg_parse_bytes(val, &x);
            if (rc != LC_OK) {
                snprintf(why, whycap, "invalid value for %s: \"%s\" is not %s", v->name, shown,
                         v->type == LC_CFG_INT ? "an integer"
                                               : "a size (a number with optional K, M, G, T)");
                rc = LC_ERR_CONFIG;
                goto out;
            }
        }
        if (!in_range(v, (double)x)) {
            snprintf(why, whycap, "invalid value for %s: %lld is outside [%.0f, %.0f]", v->name, x,
                     v->min, v->max);
            rc = LC_ERR_CONFIG;
            goto out;
        }
        *(long long *)field = x;
        break;
    }
    case LC_CFG_DBL: {
        double x = 0;
        if (val && *val && parse_dbl(val, &x) != LC_OK) {
            snprintf(why, whycap, "invalid value for %s: \"%s\" is not a number", v->name, shown);
            rc = LC_ERR_CONFIG;
            goto out;
        }
        if (!in_range(v, x)) {
            snprintf(why, whycap, "invalid value for %s: %g is outside [%g, %g]", v->name, x,
                     v->min, v->max);
            rc = LC_ERR_CONFIG;
            goto out;
        }
        *(double *)field = x;
        break;
    }
    case LC_CFG_BOOL: {
        int b = 0;
        if (val && *val && lc_cfg_parse_bool(val, &b) != LC_OK) {
            snprintf(why, whycap, "invalid value for %s: \"%s\" is not a boolean (true/false)",
                     v->name, shown);
            rc = LC_ERR_CONFIG;
            goto out;
        }
        *(int *)field = b;
        break;
    }
    }
out:
    free(owned);
    return rc;
}

lc_rc lc_cfg_load(const lc_cfg_table *tables, size_t ntables, lc_err *err)
{
    int bad = 0;
    char first[400] = "";
    for (size_t t = 0; t < ntables; t++) {
        for (size_t i = 0; i < tables[t].n; i++) {
            char why[400] = "";
            if (load_var(&tables[t].vars[i], tables[t].base, why, sizeof(why)) != LC_OK) {
                lc_log_error("invalid configuration", LC_LS("detail", why),
                             LC_LS("variable", tables[t].vars[i].name));
                if (!bad++)
                    lc_strlcpy(first, why, sizeof(first));
            }
        }
    }
    if (bad)
        return lc_err_set(err, LC_ERR_CONFIG, "%s%s", first,
                          bad > 1 ? " (and more, see the log)" : "");
    return LC_OK;
}

void lc_cfg_release(const lc_cfg_table *tables, size_t ntables)
{
    for (size_t t = 0; t < ntables; t++) {
        for (size_t i = 0; i < tables[t].n; i++) {
            const lc_cfg_var *v = &tables[t].vars[i];
            if (v->type == LC_CFG_STR || v->type == LC_CFG_ENUM) {
                char **field = (char **)((char *)tables[t].base + v->offset);
                free(*field);
                *field = NULL;
            }
        }
    }
}

void lc_cfg_print_markdown(FILE *out, const lc_cfg_table *tables, size_t ntables)
{
    for (size_t t = 0; t < ntables; t++) {
        for (size_t i = 0; i < tables[t].n; i++) {
            const lc_cfg_var *v = &tables[t].vars[i];
            const char *def = v->def && *v->def ? v->def : "";
            fprintf(out, "| `%s`%s | %s%s%s | %s |\n", v->name,
                    (v->flags & LC_CFG_SECRET) ? " (or `_FILE`)" : "", *def ? "`" : "",
                    *def ? def : ((v->flags & LC_CFG_REQUIRED) ? "required" : "(unset)"),
                    *def ? "`" : "", v->help ? v->help : "");
        }
    }
}
