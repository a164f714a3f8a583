/*
 * event.c: CloudEvents 1.0 envelopes (JSON structured mode) and the data checks for radpipe's
 * event types. The required data fields below mirror the schemas in proto/events; a test validates
 * real events against those schemas, so the two cannot drift apart silently.
 * Events are plain values owned by one thread.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lc/event.h"
#include "lc/util.h"

enum { T_STR = 1, T_INT, T_NUM, T_BOOL, T_OBJ, T_ARR, T_UUID };

typedef struct field_rule {
    const char *name;
    int type;
} field_rule;

typedef struct type_rule {
    const char *type;
    const field_rule *fields;
} type_rule;

static const field_rule instance_stored[] = {{"study_instance_uid", T_STR},
                                             {"series_instance_uid", T_STR},
                                             {"sop_instance_uid", T_STR},
                                             {"url", T_STR},
                                             {"size", T_INT},
                                             {"sha256", T_STR},
                                             {NULL, 0}};
static const field_rule study_completed[] = {{"study_instance_uid", T_STR},
                                             {"version", T_INT},
                                             {"amended", T_BOOL},
                                             {"num_series", T_INT},
                                             {"num_instances", T_INT},
                                             {"series", T_ARR},
                                             {NULL, 0}};
static const field_rule job_event[] = {{"job_id", T_UUID}, {"study_instance_uid", T_STR},
                                       {"kind", T_STR},    {"params", T_OBJ},
                                       {"attempt", T_INT}, {NULL, 0}};
static const field_rule job_status[] = {{"job_id", T_UUID}, {"study_instance_uid", T_STR},
                                        {"kind", T_STR},    {"state", T_STR},
                                        {"attempt", T_INT}, {NULL, 0}};
static const field_rule dlq[] = {
    {"topic", T_STR}, {"partition", T_INT}, {"offset", T_INT},           {"service", T_STR},
    {"error", T_STR}, {"payload", T_STR},   {"payload_encoding", T_STR}, {NULL, 0}};

static const field_rule study_close[] = {{"study_instance_uid", T_STR}, {NULL, 0}};

static const type_rule type_rules[] = {
    {LC_EV_INSTANCE_STORED, instance_stored},
    {LC_EV_STUDY_COMPLETED, study_completed},
    {LC_EV_JOB_UPLOAD, job_event},
    {LC_EV_JOB_SEGMENT, job_event},
    {LC_EV_JOB_STATUS, job_status},
    {LC_EV_DLQ, dlq},
    {LC_EV_STUDY_CLOSE, study_close},
};

static const char *type_word(int t)
{
    switch (t) {
    case T_STR:
        return "a string";
    case T_INT:
        return "an integer";
    case T_NUM:
        return "a number";
    case T_BOOL:
        return "a boolean";
    case T_OBJ:
        return "an object";
    case T_ARR:
        return "an array";
    case T_UUID:
        return "a UUID string";
    default:
        return "a value";
    }
}

static int has_type(const cJSON *v, int t)
{
    switch (t) {
    case T_STR:
        return cJSON_IsString(v) && v->valuestring[0];
    case T_INT:
        return cJSON_IsNumber(v) && v->valuedouble == (double)(long long)v->valuedouble;
    case T_NUM:
        return cJSON_IsNumber(v);
    case T_BOOL:
        return cJSON_IsBool(v);
    case T_OBJ:
        return cJSON_IsObject(v);
    case T_ARR:
        return cJSON_IsArray(v);
    case T_UUID:
        return cJSON_IsString(v) && lc_uuid_valid(v->valuestring);
    default:
        return 0;
    }
}

lc_rc lc_event_validate_data(const char *type, const cJSON *data, lc_err *err)
{
    if (!cJSON_IsObject(data))
        return lc_err_set(err, LC_ERR_INVALID, "event data is not a JSON object");
    for (size_t i = 0; i < sizeof(type_rules) / sizeof(type_rules[0]); i++) {
        if (strcmp(type_rules[i].type, type) != 0)
            continue;
        for (const field_rule *f = type_rules[i].fields; f->name; f++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(data, f->name);
            if (!v)
                return lc_err_set(err, LC_ERR_INVALID, "event %s: data.%s is missing", type,
                                  f->name);
            if (!has_type(v, f->type))
                return lc_err_set(err, LC_ERR_INVALID, "event %s: data.%s is not %s", type, f->name,
                                  type_word(f->type));
        }
        break;
    }
    return LC_OK;
}

void lc_event_free(lc_event *ev)
{
    if (!ev)
        return;
    free(ev->source);
    free(ev->type);
    free(ev->subject);
    free(ev->time);
    cJSON_Delete(ev->data);
    free(ev);
}

lc_rc lc_event_new(const char *type, const char *source, const char *subject, cJSON *data,
                   lc_event **out, lc_err *err)
{
    char ts[32];
    lc_event *ev = calloc(1, sizeof(*ev));
    if (!ev) {
        cJSON_Delete(data);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory creating an event");
    }
    ev->data = data ? data : cJSON_CreateObject();
    if (!type || !*type || !source || !*source) {
        lc_event_free(ev);
        return lc_err_set(err, LC_ERR_INVALID, "event type and source are required");
    }
    lc_uuid_v4(ev->id);
    lc_time_rfc3339(lc_wall_ms(), ts);
    ev->type = strdup(type);
    ev->source = strdup(source);
    ev->subject = subject ? strdup(subject) : NULL;
    ev->time = strdup(ts);
    if (!ev->data || !ev->type || !ev->source || !ev->time || (subject && !ev->subject)) {
        lc_event_free(ev);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory creating an event");
    }
    *out = ev;
    return LC_OK;
}

lc_rc lc_event_instance_stored(const char *source, const lc_instance_stored *s, lc_event **out,
                               lc_err *err)
{
    size_t bl = strlen(s->store_url);
    char *url = NULL;
    if (asprintf(&url, "%s%s%s", s->store_url, bl && s->store_url[bl - 1] == '/' ? "" : "/",
                 s->key) < 0)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    cJSON *d = cJSON_CreateObject(), *src = NULL; /* src is owned by d */
    if (!d || !cJSON_AddStringToObject(d, "study_instance_uid", s->study_uid) ||
        !cJSON_AddStringToObject(d, "series_instance_uid", s->series_uid) ||
        !cJSON_AddStringToObject(d, "sop_instance_uid", s->sop_uid) ||
        !cJSON_AddStringToObject(d, "sop_class_uid", s->sop_class_uid ? s->sop_class_uid : "") ||
        !cJSON_AddStringToObject(d, "url", url) ||
        !cJSON_AddNumberToObject(d, "size", (double)s->size) ||
        !cJSON_AddStringToObject(d, "sha256", s->sha256) ||
        !(src = cJSON_AddObjectToObject(d, "source")) ||
        !cJSON_AddStringToObject(src, "kind", s->source_kind) ||
        (s->source_name && !cJSON_AddStringToObject(src, "name", s->source_name)) ||
        !cJSON_AddStringToObject(d, "received_at", s->received_at)) {
        cJSON_Delete(d);
        free(url);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    free(url);
    return lc_event_new(LC_EV_INSTANCE_STORED, source, s->study_uid, d, out, err);
}

char *lc_event_to_json(const lc_event *ev)
{
    char *s = NULL;
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    cJSON_AddStringToObject(o, "specversion", "1.0");
    cJSON_AddStringToObject(o, "id", ev->id);
    cJSON_AddStringToObject(o, "source", ev->source);
    cJSON_AddStringToObject(o, "type", ev->type);
    if (ev->subject)
        cJSON_AddStringToObject(o, "subject", ev->subject);
    cJSON_AddStringToObject(o, "time", ev->time);
    cJSON_AddStringToObject(o, "datacontenttype", "application/json");
    /* reference, not copy: the envelope is deleted without freeing ev->data */
    cJSON_AddItemReferenceToObject(o, "data", ev->data);
    s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

/* RFC 3339 date-time: YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM) */
static int rfc3339_valid(const char *s)
{
    static const char pat[] = "dddd-dd-ddTdd:dd:dd";
    size_t i;
    for (i = 0; pat[i]; i++) {
        if (pat[i] == 'd' ? !(s[i] >= '0' && s[i] <= '9') : s[i] != pat[i])
            if (!(pat[i] == 'T' && (s[i] == 't' || s[i] == ' ')))
                return 0;
    }
    s += i;
    if (*s == '.') {
        s++;
        if (!(*s >= '0' && *s <= '9'))
            return 0;
        while (*s >= '0' && *s <= '9')
            s++;
    }
    if ((*s == 'Z' || *s == 'z') && s[1] == '\0')
        return 1;
    if ((*s == '+' || *s == '-') && s[1] >= '0' && s[1] <= '9' && s[2] >= '0' && s[2] <= '9' &&
        s[3] == ':' && s[4] >= '0' && s[4] <= '9' && s[5] >= '0' && s[5] <= '9' && s[6] == '\0')
        return 1;
    return 0;
}

static lc_rc req_str(const cJSON *o, const char *name, const char **out, lc_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!v)
        return lc_err_set(err, LC_ERR_INVALID, "event attribute \"%s\" is missing", name);
    if (!cJSON_IsString(v) || !v->valuestring[0])
        return lc_err_set(err, LC_ERR_INVALID, "event attribute \"%s\" is not a non-empty string",
                          name);
    *out = v->valuestring;
    return LC_OK;
}

static lc_rc opt_str(const cJSON *o, const char *name, const char **out, lc_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    *out = NULL;
    if (!v || cJSON_IsNull(v))
        return LC_OK;
    if (!cJSON_IsString(v))
        return lc_err_set(err, LC_ERR_INVALID, "event attribute \"%s\" is not a string", name);
    *out = v->valuestring;
    return LC_OK;
}

lc_rc lc_event_parse(const char *buf, size_t len, lc_event **out, lc_err *err)
{
    lc_rc rc;
    lc_event *ev = NULL;
    const char *specversion, *id, *source, *type, *subject, *time, *dct;
    cJSON *o = cJSON_ParseWithLength(buf, len);

    *out = NULL;
    if (!o)
        return lc_err_set(err, LC_ERR_INVALID, "event is not valid JSON");
    if (!cJSON_IsObject(o)) {
        rc = lc_err_set(err, LC_ERR_INVALID, "event is not a JSON object");
        goto out;
    }
    if ((rc = req_str(o, "specversion", &specversion, err)) != LC_OK ||
        (rc = req_str(o, "id", &id, err)) != LC_OK ||
        (rc = req_str(o, "source", &source, err)) != LC_OK ||
        (rc = req_str(o, "type", &type, err)) != LC_OK ||
        (rc = opt_str(o, "subject", &subject, err)) != LC_OK ||
        (rc = opt_str(o, "time", &time, err)) != LC_OK ||
        (rc = opt_str(o, "datacontenttype", &dct, err)) != LC_OK)
        goto out;
    if (strcmp(specversion, "1.0") != 0) {
        rc = lc_err_set(err, LC_ERR_INVALID, "unsupported CloudEvents specversion \"%.16s\"",
                        specversion);
        goto out;
    }
    /* radpipe's own ids are UUIDs; other producers may use any string up to 128 bytes */
    if (strlen(id) >= sizeof(ev->id)) {
        rc = lc_err_set(err, LC_ERR_INVALID, "event id is longer than 128 characters");
        goto out;
    }
    if (time && !rfc3339_valid(time)) {
        rc = lc_err_set(err, LC_ERR_INVALID, "event time \"%.40s\" is not an RFC 3339 timestamp",
                        time);
        goto out;
    }
    if (dct && strncmp(dct, "application/json", 16) != 0) {
        rc = lc_err_set(err, LC_ERR_INVALID, "unsupported datacontenttype \"%.64s\"", dct);
        goto out;
    }
    cJSON *data = cJSON_GetObjectItemCaseSensitive(o, "data");
    if (!data) {
        rc = lc_err_set(err, LC_ERR_INVALID, "event attribute \"data\" is missing");
        goto out;
    }
    if ((rc = lc_event_validate_data(type, data, err)) != LC_OK)
        goto out;

    ev = calloc(1, sizeof(*ev));
    if (!ev) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory parsing an event");
        goto out;
    }
    lc_strlcpy(ev->id, id, sizeof(ev->id));
    ev->source = strdup(source);
    ev->type = strdup(type);
    ev->subject = subject ? strdup(subject) : NULL;
    ev->time = time ? strdup(time) : NULL;
    ev->data = cJSON_DetachItemViaPointer(o, data);
    if (!ev->source || !ev->type || (subject && !ev->subject) || (time && !ev->time)) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory parsing an event");
        goto out;
    }
    *out = ev;
    ev = NULL;
    rc = LC_OK;
out:
    lc_event_free(ev);
    cJSON_Delete(o);
    return rc;
}
