/*
 * gw_qido.c: QIDO-RS query parsing and SQL generation (see gw_qido.h). The attribute table
 * maps each supported DICOM attribute to its column in proto/sql/001 and 002 and says how
 * it is matched and returned. Values only ever travel as bound parameters: the SQL text is
 * built from this file's fragments alone. Pure and reentrant.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gw_qido.h"

#define S GW_QIDO_STUDY
#define E GW_QIDO_SERIES
#define I GW_QIDO_INSTANCE

/* Sorted by tag: results list attributes in this order. */
const gw_qido_attr gw_qido_attrs[] = {
    {0x00080005, "SpecificCharacterSet", "CS", S, NULL, NULL, GW_QK_NONE, GW_QR_ALWAYS},
    {0x00080016, "SOPClassUID", "UI", I, "i.sop_class_uid", "i.sop_class_uid", GW_QK_UID,
     GW_QR_ALWAYS},
    {0x00080018, "SOPInstanceUID", "UI", I, "i.sop_uid", "i.sop_uid", GW_QK_UID, GW_QR_ALWAYS},
    {0x00080020, "StudyDate", "DA", S, "s.study_date", "s.study_date", GW_QK_DATE, GW_QR_ALWAYS},
    {0x00080021, "SeriesDate", "DA", E, "se.series_date", "se.series_date", GW_QK_DATE,
     GW_QR_OPTIONAL},
    {0x00080023, "ContentDate", "DA", I, "i.content_date", "i.content_date", GW_QK_DATE,
     GW_QR_OPTIONAL},
    {0x00080030, "StudyTime", "TM", S, "s.study_time", "s.study_time", GW_QK_TIME, GW_QR_ALWAYS},
    {0x00080031, "SeriesTime", "TM", E, "se.series_time", "se.series_time", GW_QK_TIME,
     GW_QR_OPTIONAL},
    {0x00080033, "ContentTime", "TM", I, "i.content_time", "i.content_time", GW_QK_TIME,
     GW_QR_OPTIONAL},
    {0x00080050, "AccessionNumber", "SH", S, "s.accession_number", "s.accession_number", GW_QK_TEXT,
     GW_QR_ALWAYS},
    {0x00080056, "InstanceAvailability", "CS", S, NULL, NULL, GW_QK_NONE, GW_QR_ALWAYS},
    {0x00080060, "Modality", "CS", E, "se.modality", "se.modality", GW_QK_TEXT, GW_QR_ALWAYS},
    {0x00080061, "ModalitiesInStudy", "CS", S, "array_to_string(s.modalities, '\\')",
     "s.modalities", GW_QK_CS_ARRAY, GW_QR_ALWAYS},
    {0x00080080, "InstitutionName", "LO", S, "s.institution_name", "upper(s.institution_name)",
     GW_QK_CI, GW_QR_OPTIONAL},
    {0x00080090, "ReferringPhysicianName", "PN", S, "s.referring_physician",
     "s.referring_physician_norm", GW_QK_CI, GW_QR_ALWAYS},
    {0x00080201, "TimezoneOffsetFromUTC", "SH", S, "s.timezone_offset", NULL, GW_QK_NONE,
     GW_QR_IF_KNOWN},
    {0x00081030, "StudyDescription", "LO", S, "s.study_description", "s.study_description_norm",
     GW_QK_CI, GW_QR_OPTIONAL},
    {0x0008103E, "SeriesDescription", "LO", E, "se.series_description",
     "upper(se.series_description)", GW_QK_CI, GW_QR_IF_KNOWN},
    {0x00081190, "RetrieveURL", "UR", S, NULL, NULL, GW_QK_NONE, GW_QR_ALWAYS},
    {0x00083002, "AvailableTransferSyntaxUID", "UI", I, "i.transfer_syntax_uid", NULL, GW_QK_NONE,
     GW_QR_OPTIONAL},
    {0x00100010, "PatientName", "PN", S, "s.patient_name", "s.patient_name_norm", GW_QK_CI,
     GW_QR_ALWAYS},
    {0x00100020, "PatientID", "LO", S, "s.patient_id", "s.patient_id", GW_QK_TEXT, GW_QR_ALWAYS},
    {0x00100021, "IssuerOfPatientID", "LO", S, "s.issuer_of_patient_id", "s.issuer_of_patient_id",
     GW_QK_TEXT, GW_QR_OPTIONAL},
    {0x00100030, "PatientBirthDate", "DA", S, "s.patient_birth_date", "s.patient_birth_date",
     GW_QK_DATE, GW_QR_ALWAYS},
    {0x00100040, "PatientSex", "CS", S, "s.patient_sex", "s.patient_sex", GW_QK_TEXT, GW_QR_ALWAYS},
    {0x00180015, "BodyPartExamined", "CS", E, "se.body_part_examined", "se.body_part_examined",
     GW_QK_TEXT, GW_QR_OPTIONAL},
    {0x0020000D, "StudyInstanceUID", "UI", S, "s.study_uid", "s.study_uid", GW_QK_UID,
     GW_QR_ALWAYS},
    {0x0020000E, "SeriesInstanceUID", "UI", E, "se.series_uid", "se.series_uid", GW_QK_UID,
     GW_QR_ALWAYS},
    {0x00200010, "StudyID", "SH", S, "s.study_id", "s.study_id", GW_QK_TEXT, GW_QR_ALWAYS},
    {0x00200011, "SeriesNumber", "IS", E, "se.series_number::text", "se.series_number", GW_QK_INT,
     GW_QR_ALWAYS},
    {0x00200013, "InstanceNumber", "IS", I, "i.instance_number::text", "i.instance_number",
     GW_QK_INT, GW_QR_ALWAYS},
    {0x00201206, "NumberOfStudyRelatedSeries", "IS", S, "s.num_series::text", NULL, GW_QK_NONE,
     GW_QR_ALWAYS},
    {0x00201208, "NumberOfStudyRelatedInstances", "IS", S, "s.num_instances::text", NULL,
     GW_QK_NONE, GW_QR_ALWAYS},
    {0x00201209, "NumberOfSeriesRelatedInstances", "IS", E, "se.num_instances::text", NULL,
     GW_QK_NONE, GW_QR_ALWAYS},
    {0x00280008, "NumberOfFrames", "IS", I, "i.number_of_frames::text", NULL, GW_QK_NONE,
     GW_QR_IF_KNOWN},
    {0x00280010, "Rows", "US", I, "i.rows::text", NULL, GW_QK_NONE, GW_QR_IF_KNOWN},
    {0x00280011, "Columns", "US", I, "i.columns::text", NULL, GW_QK_NONE, GW_QR_IF_KNOWN},
    {0x00280100, "BitsAllocated", "US", I, "i.bits_allocated::text", NULL, GW_QK_NONE,
     GW_QR_IF_KNOWN},
    {0x00400244, "PerformedProcedureStepStartDate", "DA", E,
     "se.performed_procedure_step_start_date", "se.performed_procedure_step_start_date", GW_QK_DATE,
     GW_QR_IF_KNOWN},
    {0x00400245, "PerformedProcedureStepStartTime", "TM", E,
     "se.performed_procedure_step_start_time", "se.performed_procedure_step_start_time", GW_QK_TIME,
     GW_QR_IF_KNOWN},
    {0x00400275, "RequestAttributesSequence", "SQ", E, "se.request_attributes::text", NULL,
     GW_QK_NONE, GW_QR_IF_KNOWN},
};
const size_t gw_qido_nattrs = sizeof(gw_qido_attrs) / sizeof(gw_qido_attrs[0]);

#undef S
#undef E
#undef I

int gw_qido_attr_index(unsigned tag)
{
    for (size_t i = 0; i < gw_qido_nattrs; i++)
        if (gw_qido_attrs[i].tag == tag)
            return (int)i;
    return -1;
}

static int keyword_index(const char *kw)
{
    for (size_t i = 0; i < gw_qido_nattrs; i++)
        if (strcmp(gw_qido_attrs[i].keyword, kw) == 0)
            return (int)i;
    return -1;
}

static const char *const level_names[] = {"a study", "a series", "an instance"};

/* --- value syntax ------------------------------------------------------------------------ */

static int digits(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

static int num(const char *s, size_t n)
{
    int v = 0;
    for (size_t i = 0; i < n; i++)
        v = v * 10 + (s[i] - '0');
    return v;
}

int gw_qido_date_ok(const char *s, size_t n)
{
    static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (n != 8 || !digits(s, 8))
        return 0;
    int y = num(s, 4), m = num(s + 4, 2), d = num(s + 6, 2);
    if (y < 1 || m < 1 || m > 12 || d < 1 || d > mdays[m - 1])
        return 0;
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    return !(m == 2 && d == 29 && !leap);
}

/* HH[MM[SS[.F{1,6}]]] */
int gw_qido_time_ok(const char *s, size_t n)
{
    if (n < 2 || !digits(s, 2) || num(s, 2) > 23)
        return 0;
    if (n == 2)
        return 1;
    if (n < 4 || !digits(s + 2, 2) || num(s + 2, 2) > 59)
        return 0;
    if (n == 4)
        return 1;
    if (n < 6 || !digits(s + 4, 2) || num(s + 4, 2) > 60)
        return 0;
    if (n == 6)
        return 1;
    return s[6] == '.' && n >= 8 && n <= 13 && digits(s + 7, n - 7);
}

/* 1..64 characters of digits and dots, no empty component, no leading zero. */
static int uid_ok(const char *s, size_t n)
{
    if (n < 1 || n > 64)
        return 0;
    size_t comp = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i == n || s[i] == '.') {
            if (comp == 0 || (comp > 1 && s[i - comp] == '0'))
                return 0;
            comp = 0;
        } else if (s[i] >= '0' && s[i] <= '9') {
            comp++;
        } else {
            return 0;
        }
    }
    return 1;
}

/* CS values inside a list: upper-case letters, digits, space and underscore. */
static int cs_ok(const char *s, size_t n)
{
    if (n < 1 || n > 16)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= '0' && s[i] <= '9') || s[i] == ' ' ||
              s[i] == '_'))
            return 0;
    return 1;
}

/* A range "a-b", "a-", "-b" or a single value, each side checked by ok. */
static int range_ok(const char *v, int (*ok)(const char *, size_t))
{
    const char *dash = strchr(v, '-');
    if (!dash)
        return ok(v, strlen(v));
    if (strchr(dash + 1, '-'))
        return 0;
    size_t a = (size_t)(dash - v), b = strlen(dash + 1);
    if (a == 0 && b == 0)
        return 0;
    if ((a && !ok(v, a)) || (b && !ok(dash + 1, b)))
        return 0;
    /* same-precision text compares as the value compares */
    if (a && b && a == b && strncmp(v, dash + 1, a) > 0)
        return 0;
    return 1;
}

/* Split a list on '\' or ',' and check each item; returns the number of items, 0 on error. */
static int list_ok(const char *v, int (*ok)(const char *, size_t), int max)
{
    int n = 0;
    for (const char *p = v;;) {
        size_t len = strcspn(p, "\\,");
        if (!ok(p, len) || ++n > max)
            return 0;
        if (!p[len])
            return n;
        p += len + 1;
    }
}

static int int_ok(const char *s, size_t n)
{
    size_t i = (n && (s[0] == '-' || s[0] == '+')) ? 1 : 0;
    return n > i && n - i <= 9 && digits(s + i, n - i);
}

static int has_wildcard(const char *v)
{
    return strpbrk(v, "*?") != NULL;
}

/* --- decoding ---------------------------------------------------------------------------- */

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decode n bytes ('+' is a space) into out (cap bytes). -1 when malformed or too long,
 * -2 when it decodes to a control character or NUL. */
static int url_decode(const char *s, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (c == '%') {
            if (i + 2 >= n)
                return -1;
            int h = hexval((unsigned char)s[i + 1]), l = hexval((unsigned char)s[i + 2]);
            if (h < 0 || l < 0)
                return -1;
            c = h * 16 + l;
            i += 2;
        } else if (c == '+') {
            c = ' ';
        }
        if (c < 0x20 || c == 0x7f)
            return -2;
        if (o + 1 >= cap)
            return -1;
        out[o++] = (char)c;
    }
    out[o] = '\0';
    return (int)o;
}

static int hex8(const char *s, unsigned *tag)
{
    unsigned v = 0;
    if (strlen(s) != 8)
        return 0;
    for (int i = 0; i < 8; i++) {
        int h = hexval((unsigned char)s[i]);
        if (h < 0)
            return 0;
        v = (v << 4) | (unsigned)h;
    }
    *tag = v;
    return 1;
}

/* --- parsing ----------------------------------------------------------------------------- */

/* Whether attribute level al may be asked about in a search at level ql. */
static int level_ok(gw_qido_level al, gw_qido_level ql)
{
    return al <= ql;
}

static lc_rc check_value(const gw_qido_attr *a, const char *v, lc_err *err)
{
    if (!*v)
        return LC_OK; /* universal matching */
    if (a->kind == GW_QK_NONE)
        return lc_err_set(err, LC_ERR_INVALID,
                          "%s cannot be used as a matching key (only returned; give it empty or "
                          "in includefield)",
                          a->keyword);
    int ok = 1;
    switch (a->kind) {
    case GW_QK_DATE:
        ok = range_ok(v, gw_qido_date_ok);
        break;
    case GW_QK_TIME:
        ok = range_ok(v, gw_qido_time_ok);
        break;
    case GW_QK_UID:
        ok = list_ok(v, uid_ok, 1000) > 0;
        break;
    case GW_QK_INT:
        ok = int_ok(v, strlen(v));
        break;
    case GW_QK_CS_ARRAY:
        ok = has_wildcard(v) ? strpbrk(v, "\\,") == NULL : list_ok(v, cs_ok, 64) > 0;
        break;
    default:
        break;
    }
    if (!ok) {
        const char *want = a->kind == GW_QK_DATE   ? " (YYYYMMDD, or a range A-B, A- or -B)"
                           : a->kind == GW_QK_TIME ? " (HHMMSS[.ffffff], or a range)"
                           : a->kind == GW_QK_UID  ? " (UIDs separated by \\ or ,)"
                           : a->kind == GW_QK_INT  ? " (an integer)"
                                                   : "";
        return lc_err_set(err, LC_ERR_INVALID, "invalid value for %s%s", a->keyword, want);
    }
    return LC_OK;
}

static lc_rc add_include(gw_qido_query *q, const char *item, gw_qido_resolve_fn resolve,
                         lc_err *err)
{
    unsigned tag = 0;
    if (strcmp(item, "all") == 0) {
        q->include_all = 1;
        return LC_OK;
    }
    if (strchr(item, '.'))
        return lc_err_set(err, LC_ERR_INVALID,
                          "includefield \"%.64s\": sequence paths are not supported", item);
    int a = keyword_index(item);
    if (a < 0 && hex8(item, &tag))
        a = gw_qido_attr_index(tag);
    else if (a < 0 && !(resolve && resolve(item, &tag)))
        return lc_err_set(err, LC_ERR_INVALID,
                          "includefield \"%.64s\" is not a DICOM keyword or tag", item);
    if (a >= 0) {
        q->include[a] = 1;
        return LC_OK;
    }
    for (int i = 0; i < q->nextra; i++)
        if (q->extra[i] == tag)
            return LC_OK;
    if (q->nextra >= GW_QIDO_MAX_EXTRA)
        return lc_err_set(err, LC_ERR_INVALID, "more than %d includefield attributes",
                          GW_QIDO_MAX_EXTRA);
    q->extra[q->nextra++] = tag;
    return LC_OK;
}

/* A non-negative integer of at most 18 digits. */
static int parse_count(const char *v, long long *out)
{
    size_t n = strlen(v);
    if (n == 0 || n > 18 || !digits(v, n))
        return 0;
    *out = strtoll(v, NULL, 10);
    return 1;
}

lc_rc gw_qido_parse(const char *qs, gw_qido_level level, const char *study_uid,
                    const char *series_uid, gw_qido_resolve_fn resolve, gw_qido_query *q,
                    lc_err *err)
{
    char name[128], *value = NULL;
    int seen_limit = 0, seen_offset = 0, seen_fuzzy = 0;
    lc_rc rc = LC_OK;

    memset(q, 0, sizeof(*q));
    q->level = level;
    q->limit = GW_QIDO_MAX_LIMIT;
    if ((study_uid && strlen(study_uid) >= sizeof(q->study_uid)) ||
        (series_uid && strlen(series_uid) >= sizeof(q->series_uid)))
        return lc_err_set(err, LC_ERR_INVALID, "UID in the path is too long");
    if (study_uid)
        memcpy(q->study_uid, study_uid, strlen(study_uid) + 1);
    if (series_uid)
        memcpy(q->series_uid, series_uid, strlen(series_uid) + 1);
    if (!(value = calloc(1, GW_QIDO_MAX_VALUE + 1)))
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");

    for (const char *p = qs; p && *p;) {
        size_t len = strcspn(p, "&");
        size_t nlen = strcspn(p, "=&");
        const char *vstart = nlen < len ? p + nlen + 1 : p + len;
        size_t vlen = nlen < len ? len - nlen - 1 : 0;
        if (len == 0) {
            p++;
            continue;
        }
        if (url_decode(p, nlen, name, sizeof(name)) < 0) {
            rc = lc_err_set(err, LC_ERR_INVALID, "malformed or overlong query parameter name");
            goto out;
        }
        int vr = url_decode(vstart, vlen, value, GW_QIDO_MAX_VALUE + 1);
        if (vr == -2) {
            rc = lc_err_set(err, LC_ERR_INVALID,
                            "query parameter \"%.64s\" holds a control character", name);
            goto out;
        } else if (vr < 0) {
            rc = lc_err_set(err, LC_ERR_INVALID,
                            "query parameter \"%.64s\" is malformed or longer than %d bytes", name,
                            GW_QIDO_MAX_VALUE);
            goto out;
        }
        p += len + (p[len] == '&');

        if (strcmp(name, "limit") == 0 || strcmp(name, "offset") == 0) {
            int is_limit = name[0] == 'l';
            long long v;
            if ((is_limit ? seen_limit++ : seen_offset++) > 0) {
                rc = lc_err_set(err, LC_ERR_INVALID, "query parameter \"%s\" given twice", name);
                goto out;
            }
            if (!parse_count(value, &v) || v > 1000000000LL || (is_limit && v < 1)) {
                rc = lc_err_set(err, LC_ERR_INVALID,
                                "invalid value for query parameter \"%s\": must be an integer "
                                "%s",
                                name, is_limit ? "of 1 or more" : "of 0 or more");
                goto out;
            }
            if (is_limit) {
                q->limit = v > GW_QIDO_MAX_LIMIT ? GW_QIDO_MAX_LIMIT : v;
                q->limit_lowered = v > GW_QIDO_MAX_LIMIT;
            } else {
                q->offset = v;
            }
            continue;
        }
        if (strcmp(name, "fuzzymatching") == 0) {
            if (seen_fuzzy++ || (strcmp(value, "true") != 0 && strcmp(value, "false") != 0)) {
                rc = lc_err_set(err, LC_ERR_INVALID,
                                "invalid value for query parameter \"fuzzymatching\": true or "
                                "false");
                goto out;
            }
            q->fuzzy = value[0] == 't';
            continue;
        }
        if (strcmp(name, "includefield") == 0) {
            for (char *item = value; item;) {
                char *comma = strchr(item, ',');
                if (comma)
                    *comma = '\0';
                if (*item && (rc = add_include(q, item, resolve, err)) != LC_OK)
                    goto out;
                item = comma ? comma + 1 : NULL;
            }
            continue;
        }
        /* a matching key: keyword or tag */
        unsigned tag = 0;
        int a = keyword_index(name);
        if (a < 0 && hex8(name, &tag))
            a = gw_qido_attr_index(tag);
        if (a < 0) {
            if (strchr(name, '.'))
                rc = lc_err_set(err, LC_ERR_INVALID,
                                "query parameter \"%.64s\": sequence matching is not supported",
                                name);
            else if ((resolve && resolve(name, &tag)) || hex8(name, &tag))
                rc = lc_err_set(err, LC_ERR_INVALID,
                                "query parameter \"%.64s\": this attribute is not a supported "
                                "matching key",
                                name);
            else
                rc = lc_err_set(err, LC_ERR_INVALID,
                                "unknown query parameter \"%.64s\": this resource takes DICOM "
                                "attribute keywords or tags, includefield, limit, offset and "
                                "fuzzymatching",
                                name);
            goto out;
        }
        const gw_qido_attr *at = &gw_qido_attrs[a];
        if (!level_ok(at->level, level)) {
            rc = lc_err_set(err, LC_ERR_INVALID,
                            "%s is %s-level attribute: not a matching key of %s search",
                            at->keyword, level_names[at->level], level_names[level]);
            goto out;
        }
        for (int k = 0; k < q->nkeys; k++)
            if (q->keys[k].attr == a) {
                rc = lc_err_set(err, LC_ERR_INVALID, "matching key %s given twice", at->keyword);
                goto out;
            }
        if (q->nkeys >= GW_QIDO_MAX_KEYS) {
            rc = lc_err_set(err, LC_ERR_INVALID, "more than %d matching keys", GW_QIDO_MAX_KEYS);
            goto out;
        }
        if ((rc = check_value(at, value, err)) != LC_OK)
            goto out;
        if (!(q->keys[q->nkeys].value = strdup(value))) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
            goto out;
        }
        q->keys[q->nkeys++].attr = a;
    }
out:
    free(value);
    if (rc != LC_OK)
        gw_qido_query_release(q);
    return rc;
}

void gw_qido_query_release(gw_qido_query *q)
{
    for (int k = 0; k < q->nkeys; k++) {
        free(q->keys[k].value);
        q->keys[k].value = NULL;
    }
    q->nkeys = 0;
}

/* --- what is returned -------------------------------------------------------------------- */

gw_qido_ret gw_qido_returns(const gw_qido_query *q, size_t a)
{
    const gw_qido_attr *at = &gw_qido_attrs[a];
    int asked = q->include[a];
    for (int k = 0; k < q->nkeys && !asked; k++)
        asked = q->keys[k].attr == (int)a;
    if (at->level > q->level)
        return 0; /* a lower level's attributes are never returned */
    /* the levels whose attributes come with every result: the searched level, and the
     * levels above it that the path does not fix (all series, all instances, a study's
     * instances) */
    int full = at->level == q->level || (at->level == GW_QIDO_STUDY && !q->study_uid[0]) ||
               (at->level == GW_QIDO_SERIES && !q->series_uid[0]);
    /* the identifying UIDs of the levels above always come along */
    if (at->tag == 0x0020000D || (at->tag == 0x0020000E && q->level == GW_QIDO_INSTANCE))
        return GW_QR_ALWAYS;
    /* the character set, availability, time zone and retrieve URL describe each result,
     * whatever its level */
    if (!at->select || at->tag == 0x00080201)
        return at->ret;
    if (asked)
        return GW_QR_ALWAYS;
    if (full)
        return at->ret != GW_QR_OPTIONAL ? at->ret : (q->include_all ? GW_QR_IF_KNOWN : 0);
    return 0;
}

/* --- SQL --------------------------------------------------------------------------------- */

static lc_rc add_param(gw_qido_sql *s, const char *v, size_t n, lc_err *err)
{
    if (s->nparams >= GW_QIDO_MAX_PARAMS)
        return lc_err_set(err, LC_ERR_INVALID, "too many query conditions");
    if (!(s->params[s->nparams] = strndup(v, n)))
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    s->nparams++;
    return LC_OK;
}

/* A DICOM wildcard value as a LIKE pattern: \ % _ escaped, * -> %, ? -> _. */
static lc_rc add_like_param(gw_qido_sql *s, const char *v, lc_err *err)
{
    gw_buf b = {0};
    for (const char *p = v; *p; p++) {
        if (*p == '\\' || *p == '%' || *p == '_')
            gw_buf_add(&b, "\\", 1);
        if (*p == '*')
            gw_buf_add(&b, "%", 1);
        else if (*p == '?')
            gw_buf_add(&b, "_", 1);
        else
            gw_buf_add(&b, p, 1);
    }
    const char *c = gw_buf_cstr(&b);
    lc_rc rc = c ? add_param(s, c, strlen(c), err) : lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    gw_buf_free(&b);
    return rc;
}

/* A \ or , separated list as a PostgreSQL array literal of double-quoted items (the items
 * were checked: UIDs or CS values, no quotes or backslashes). */
static lc_rc add_array_param(gw_qido_sql *s, const char *v, lc_err *err)
{
    gw_buf b = {0};
    gw_buf_add(&b, "{", 1);
    for (const char *p = v;;) {
        size_t len = strcspn(p, "\\,");
        gw_buf_add(&b, "\"", 1);
        gw_buf_add(&b, p, len);
        gw_buf_add(&b, "\"", 1);
        if (!p[len])
            break;
        gw_buf_add(&b, ",", 1);
        p += len + 1;
    }
    gw_buf_add(&b, "}", 1);
    const char *c = gw_buf_cstr(&b);
    lc_rc rc = c ? add_param(s, c, strlen(c), err) : lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    gw_buf_free(&b);
    return rc;
}

/* The upper end of a TM range as text that sorts after every time it covers. */
static void time_hi(const char *v, size_t n, char out[14])
{
    memcpy(out, v, n);
    for (size_t i = n; i < 13; i++)
        out[i] = i == 6 ? '.' : '9';
    out[13] = '\0';
}

static lc_rc add_condition(gw_qido_sql *s, const gw_qido_attr *a, const char *v, lc_err *err)
{
    lc_rc rc;
    gw_buf *q = &s->sql;
    switch (a->kind) {
    case GW_QK_TEXT:
    case GW_QK_CI: {
        int wild = has_wildcard(v);
        const char *up = a->kind == GW_QK_CI ? "upper(" : "(";
        if (wild) {
            rc = add_like_param(s, v, err);
            gw_buf_addf(q, " AND %s LIKE %s$%d)", a->match, up, s->nparams);
        } else {
            rc = add_param(s, v, strlen(v), err);
            gw_buf_addf(q, " AND %s = %s$%d)", a->match, up, s->nparams);
        }
        return rc;
    }
    case GW_QK_DATE:
    case GW_QK_TIME: {
        const char *dash = strchr(v, '-');
        if (!dash) {
            rc = add_param(s, v, strlen(v), err);
            gw_buf_addf(q, " AND %s = $%d", a->match, s->nparams);
            return rc;
        }
        size_t lo = (size_t)(dash - v), hi = strlen(dash + 1);
        if (lo) {
            if ((rc = add_param(s, v, lo, err)) != LC_OK)
                return rc;
            gw_buf_addf(q, " AND %s >= $%d", a->match, s->nparams);
        }
        if (hi) {
            char t[14];
            if (a->kind == GW_QK_TIME) {
                time_hi(dash + 1, hi, t);
                rc = add_param(s, t, strlen(t), err);
            } else {
                rc = add_param(s, dash + 1, hi, err);
            }
            if (rc != LC_OK)
                return rc;
            gw_buf_addf(q, " AND %s <= $%d", a->match, s->nparams);
        }
        return LC_OK;
    }
    case GW_QK_UID:
        if (strpbrk(v, "\\,")) {
            rc = add_array_param(s, v, err);
            gw_buf_addf(q, " AND %s = ANY ($%d::text[])", a->match, s->nparams);
        } else {
            rc = add_param(s, v, strlen(v), err);
            gw_buf_addf(q, " AND %s = $%d", a->match, s->nparams);
        }
        return rc;
    case GW_QK_INT:
        rc = add_param(s, v, strlen(v), err);
        gw_buf_addf(q, " AND %s = $%d::int", a->match, s->nparams);
        return rc;
    case GW_QK_CS_ARRAY:
        if (has_wildcard(v)) {
            rc = add_like_param(s, v, err);
            gw_buf_addf(q, " AND EXISTS (SELECT 1 FROM unnest(%s) AS m (v) WHERE m.v LIKE $%d)",
                        a->match, s->nparams);
        } else {
            rc = add_array_param(s, v, err);
            gw_buf_addf(q, " AND %s && $%d::text[]", a->match, s->nparams);
        }
        return rc;
    default:
        return lc_err_set(err, LC_ERR_INVALID, "%s cannot be matched", a->keyword);
    }
}

lc_rc gw_qido_build_sql(const gw_qido_query *q, gw_qido_sql *s, lc_err *err)
{
    char n[32];
    lc_rc rc = LC_OK;
    memset(s, 0, sizeof(*s));
    s->md_col = -1;
    gw_buf *b = &s->sql;

    gw_buf_adds(b, "SELECT ");
    for (size_t a = 0; a < gw_qido_nattrs; a++) {
        const gw_qido_attr *at = &gw_qido_attrs[a];
        s->col[a] = -1;
        if (!at->select || at->level > q->level || !gw_qido_returns(q, a))
            continue;
        gw_buf_addf(b, "%s%s", s->ncols ? ", " : "", at->select);
        s->col[a] = s->ncols++;
    }
    if (q->nextra > 0) {
        /* attributes outside the table come from an instance's stored header */
        if (q->level == GW_QIDO_INSTANCE)
            gw_buf_addf(b,
                        "%s(SELECT m.json::text FROM instance_metadata m"
                        " WHERE m.sop_uid = i.sop_uid)",
                        s->ncols ? ", " : "");
        else
            gw_buf_addf(b,
                        "%s(SELECT m.json::text FROM instances i2 JOIN instance_metadata m"
                        " ON m.sop_uid = i2.sop_uid WHERE i2.%s = %s"
                        " ORDER BY i2.instance_number NULLS LAST, i2.sop_uid LIMIT 1)",
                        s->ncols ? ", " : "",
                        q->level == GW_QIDO_STUDY ? "study_uid" : "series_uid",
                        q->level == GW_QIDO_STUDY ? "s.study_uid" : "se.series_uid");
        s->md_col = s->ncols++;
    }
    if (s->ncols == 0)
        gw_buf_adds(b, "1");
    switch (q->level) {
    case GW_QIDO_STUDY:
        gw_buf_adds(b, " FROM studies s WHERE true");
        break;
    case GW_QIDO_SERIES:
        gw_buf_adds(b, " FROM series se JOIN studies s ON s.study_uid = se.study_uid WHERE true");
        break;
    default:
        gw_buf_adds(b, " FROM instances i JOIN series se ON se.series_uid = i.series_uid"
                       " JOIN studies s ON s.study_uid = i.study_uid WHERE true");
        break;
    }
    if (q->study_uid[0]) {
        if ((rc = add_param(s, q->study_uid, strlen(q->study_uid), err)) != LC_OK)
            goto out;
        gw_buf_addf(b, " AND s.study_uid = $%d", s->nparams);
    }
    if (q->series_uid[0]) {
        if ((rc = add_param(s, q->series_uid, strlen(q->series_uid), err)) != LC_OK)
            goto out;
        gw_buf_addf(b, " AND se.series_uid = $%d", s->nparams);
    }
    for (int k = 0; k < q->nkeys; k++) {
        const gw_qido_attr *at = &gw_qido_attrs[q->keys[k].attr];
        if (!q->keys[k].value[0])
            continue;
        if ((rc = add_condition(s, at, q->keys[k].value, err)) != LC_OK)
            goto out;
    }
    switch (q->level) {
    case GW_QIDO_STUDY:
        gw_buf_adds(b, " ORDER BY s.study_date DESC NULLS LAST, s.study_time DESC NULLS LAST,"
                       " s.study_uid");
        break;
    case GW_QIDO_SERIES:
        gw_buf_adds(b, " ORDER BY se.study_uid, se.series_number NULLS LAST, se.series_uid");
        break;
    default:
        gw_buf_adds(b, " ORDER BY i.study_uid, i.series_uid, i.instance_number NULLS LAST,"
                       " i.sop_uid");
        break;
    }
    snprintf(n, sizeof(n), "%lld", q->limit + 1);
    if ((rc = add_param(s, n, strlen(n), err)) != LC_OK)
        goto out;
    gw_buf_addf(b, " LIMIT $%d::bigint", s->nparams);
    snprintf(n, sizeof(n), "%lld", q->offset);
    if ((rc = add_param(s, n, strlen(n), err)) != LC_OK)
        goto out;
    gw_buf_addf(b, " OFFSET $%d::bigint", s->nparams);
    if (!gw_buf_cstr(b))
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
out:
    if (rc != LC_OK)
        gw_qido_sql_release(s);
    return rc;
}

void gw_qido_sql_release(gw_qido_sql *s)
{
    for (int i = 0; i < s->nparams; i++)
        free(s->params[i]);
    s->nparams = 0;
    gw_buf_free(&s->sql);
}
