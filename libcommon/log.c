/*
 * log.c: JSON lines on stderr. The service name and minimum level are configuration, set
 * once by lc_log_init before threads start and read-only afterwards. Each line is formatted
 * into a stack buffer and written with a single write(2) so concurrent lines never mix.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include "lc/log.h"
#include "lc/util.h"

#define LOG_LINE_MAX 8192

static char log_service[64] = "radpipe";
static lc_log_level log_min = LC_LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void lc_log_init(const char *service, lc_log_level min_level)
{
    if (service)
        lc_strlcpy(log_service, service, sizeof(log_service));
    log_min = min_level;
}

int lc_log_level_parse(const char *s)
{
    if (!s)
        return -1;
    for (int i = 0; i < 4; i++)
        if (strcasecmp(s, level_names[i]) == 0)
            return i;
    if (strcasecmp(s, "warning") == 0)
        return LC_LOG_WARN;
    return -1;
}

int lc_log_enabled(lc_log_level level)
{
    return level >= log_min;
}

/* Output cursor. A field is appended whole or not at all, so a line is always valid JSON:
 * when the room runs out the remaining fields are dropped and "truncated":true is added. */
typedef struct out {
    char *buf;
    size_t cap, len;
    int truncated;
} out;

#define VALUE_MAX 2048 /* longest escaped string value kept */
#define RESERVE   24   /* room kept for ,"truncated":true} */

/* Escape s as JSON string contents into dst (cap bytes, NUL-terminated), stopping before a
 * character that would not fit and marking the cut with "..."; never splits an escape or a
 * UTF-8 sequence. Returns the length. */
static size_t escape(char *dst, size_t cap, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        char tmp[8];
        size_t k = 0, adv = 1;
        switch (*p) {
        case '"':
            tmp[k++] = '\\';
            tmp[k++] = '"';
            break;
        case '\\':
            tmp[k++] = '\\';
            tmp[k++] = '\\';
            break;
        case '\n':
            tmp[k++] = '\\';
            tmp[k++] = 'n';
            break;
        case '\r':
            tmp[k++] = '\\';
            tmp[k++] = 'r';
            break;
        case '\t':
            tmp[k++] = '\\';
            tmp[k++] = 't';
            break;
        default:
            if (*p < 0x20) {
                memcpy(tmp, "\\u00", 4);
                tmp[4] = hex[*p >> 4];
                tmp[5] = hex[*p & 15];
                k = 6;
            } else if (*p < 0x80) {
                tmp[k++] = (char)*p;
            } else {
                /* copy one UTF-8 sequence (lead byte plus continuation bytes) */
                tmp[k++] = (char)*p;
                while (k < 4 && (p[k] & 0xC0) == 0x80)
                    tmp[k] = (char)p[k], k++;
                adv = k;
            }
        }
        if (n + k + 4 > cap) { /* keep room for "..." and NUL */
            memcpy(dst + n, "...", 3);
            n += 3;
            break;
        }
        memcpy(dst + n, tmp, k);
        n += k;
        p += adv;
    }
    dst[n] = '\0';
    return n;
}

static void append(out *o, const char *s, size_t n)
{
    memcpy(o->buf + o->len, s, n);
    o->len += n;
    o->buf[o->len] = '\0';
}

/* Append ,"key":<raw> when it fits (raw is already JSON). */
static void field_raw(out *o, const char *key, const char *raw, int quote)
{
    char k[128];
    size_t kn = escape(k, sizeof(k), key), rn = strlen(raw);
    size_t need = kn + rn + 4 + (quote ? 2 : 0);
    if (o->truncated || o->len + need + RESERVE >= o->cap) {
        o->truncated = 1;
        return;
    }
    append(o, ",\"", 2);
    append(o, k, kn);
    append(o, "\":", 2);
    if (quote)
        append(o, "\"", 1);
    append(o, raw, rn);
    if (quote)
        append(o, "\"", 1);
}

static void field_str(out *o, const char *key, const char *val)
{
    char v[VALUE_MAX];
    if (!val) {
        field_raw(o, key, "null", 0);
        return;
    }
    escape(v, sizeof(v), val);
    field_raw(o, key, v, 1);
}

size_t lc_log_format(char *buf, size_t cap, lc_log_level level, const char *msg,
                     const lc_log_field *fields)
{
    out o = {buf, cap, 0, 0};
    char ts[32], num[64];

    if (cap < 128) {
        if (cap)
            buf[0] = '\0';
        return 0;
    }
    buf[0] = '\0';
    lc_time_rfc3339(lc_wall_ms(), ts);
    append(&o, "{\"ts\":\"", 7);
    append(&o, ts, strlen(ts));
    append(&o, "\"", 1);
    field_raw(&o, "level", level_names[level > LC_LOG_ERROR ? LC_LOG_ERROR : level], 1);
    field_str(&o, "service", log_service);
    field_str(&o, "msg", msg ? msg : "");
    for (const lc_log_field *f = fields; f && f->key; f++) {
        switch (f->type) {
        case LC_LF_STR:
            field_str(&o, f->key, f->v.s);
            break;
        case LC_LF_PHI: /* patient data: only at debug level */
            if (log_min == LC_LOG_DEBUG)
                field_str(&o, f->key, f->v.s);
            break;
        case LC_LF_INT:
            snprintf(num, sizeof(num), "%lld", f->v.i);
            field_raw(&o, f->key, num, 0);
            break;
        case LC_LF_DBL:
            if (f->v.d != f->v.d || f->v.d - f->v.d != 0) /* NaN or infinite */
                snprintf(num, sizeof(num), "null");
            else
                snprintf(num, sizeof(num), "%.6g", f->v.d);
            field_raw(&o, f->key, num, 0);
            break;
        case LC_LF_BOOL:
            field_raw(&o, f->key, f->v.i ? "true" : "false", 0);
            break;
        default:
            break;
        }
    }
    if (o.truncated)
        append(&o, ",\"truncated\":true", 17);
    append(&o, "}", 1);
    return o.len;
}

void lc_log_emit(lc_log_level level, const char *msg, const lc_log_field *fields)
{
    char line[LOG_LINE_MAX];
    if (!lc_log_enabled(level))
        return;
    size_t n = lc_log_format(line, sizeof(line) - 1, level, msg, fields);
    line[n++] = '\n';
    const char *p = line;
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}
