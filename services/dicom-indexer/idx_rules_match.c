/*
 * idx_rules_match.c: whether a rule's condition holds for a study (idx_rules.h). A leaf holds
 * when any value of its attribute satisfies the operator (multi-valued attributes such as
 * ModalitiesInStudy or ImageType match on any value); an absent attribute satisfies nothing
 * but "present": false. Pure functions over loaded data; thread-safe.
 */
#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include "idx_rules.h"

/* A decimal number with nothing else but surrounding spaces (DICOM IS/DS). */
static int parse_num(const char *s, double *out)
{
    char *end = NULL;
    while (*s == ' ')
        s++;
    if (!*s)
        return 0;
    double d = strtod(s, &end);
    while (end && *end == ' ')
        end++;
    if (!end || *end || !isfinite(d))
        return 0;
    *out = d;
    return 1;
}

/* The YYYYMMDD of a DA (or the date part of a DT); 0 when it is not one. */
static int date_of(const char *s, char out[9])
{
    for (int i = 0; i < 8; i++)
        if (!isdigit((unsigned char)s[i]))
            return 0;
    if (s[8] && !isdigit((unsigned char)s[8]))
        return 0;
    memcpy(out, s, 8);
    out[8] = '\0';
    return 1;
}

static int str_eq(const char *a, const char *b, int icase)
{
    return icase ? strcasecmp(a, b) == 0 : strcmp(a, b) == 0;
}

static int value_match(const idx_cond *c, const char *v)
{
    double d;
    char day[9];
    switch (c->op) {
    case IDX_C_EQUALS:
    case IDX_C_IN:
        for (size_t i = 0; i < c->nstrs; i++) {
            if (c->numeric ? parse_num(v, &d) && d == c->nums[i] : str_eq(v, c->strs[i], c->icase))
                return 1;
        }
        return 0;
    case IDX_C_WILDCARD:
        return idx_glob_match(c->strs[0], v, c->icase);
    case IDX_C_REGEX:
        return regexec(&c->re, v, 0, NULL, 0) == 0;
    case IDX_C_RANGE:
        return parse_num(v, &d) && (!c->has_min || d >= c->min) && (!c->has_max || d <= c->max);
    case IDX_C_DATE_RANGE:
        return date_of(v, day) && (!c->has_min || strcmp(day, c->from) >= 0) &&
               (!c->has_max || strcmp(day, c->to) <= 0);
    default:
        return 0;
    }
}

static int leaf_match(const idx_cond *c, const idx_vals *vals)
{
    if (c->op == IDX_C_PRESENT)
        return (vals->n > 0) == (c->present != 0);
    for (size_t i = 0; i < vals->n; i++)
        if (value_match(c, vals->v[i]))
            return 1;
    return 0;
}

int idx_cond_match(const idx_rules *r, const idx_cond *c, const idx_rstudy *s,
                   const idx_rseries *ser)
{
    if (!c)
        return 1;
    switch (c->op) {
    case IDX_C_ALL:
        for (size_t i = 0; i < c->nkids; i++)
            if (!idx_cond_match(r, &c->kids[i], s, ser))
                return 0;
        return 1;
    case IDX_C_ANY:
        for (size_t i = 0; i < c->nkids; i++)
            if (idx_cond_match(r, &c->kids[i], s, ser))
                return 1;
        return 0;
    case IDX_C_NOT:
        return !idx_cond_match(r, c->kids, s, ser);
    default:
        break;
    }
    if (r->keys[c->key].src == IDX_K_STUDY)
        return leaf_match(c, &s->kv[c->key]);
    if (ser)
        return leaf_match(c, &ser->kv[c->key]);
    /* study level: a series attribute holds when it holds for a series in scope */
    for (size_t i = 0; i < s->nseries; i++)
        if (s->series[i].in_scope && leaf_match(c, &s->series[i].kv[c->key]))
            return 1;
    return 0;
}
