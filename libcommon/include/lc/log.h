/*
 * log.h: structured logging as JSON lines on stderr: {"ts","level","service","msg",fields...}.
 * Each line is written with one write(2), so lines from threads never interleave.
 * Fields marked sensitive (LC_LP: patient names, IDs, dates of birth) are dropped unless the
 * level is debug, so no patient data reaches logs at info level.
 * lc_log_init is called once at start (configuration); everything else is thread-safe.
 */
#ifndef LC_LOG_H
#define LC_LOG_H

#include <stddef.h>

typedef enum lc_log_level { LC_LOG_DEBUG = 0, LC_LOG_INFO, LC_LOG_WARN, LC_LOG_ERROR } lc_log_level;

enum { LC_LF_END = 0, LC_LF_STR, LC_LF_INT, LC_LF_DBL, LC_LF_BOOL, LC_LF_PHI };

typedef struct lc_log_field {
    const char *key;
    int type;
    union {
        const char *s;
        long long i;
        double d;
    } v;
} lc_log_field;

#define LC_LS(k, x) ((lc_log_field){.key = (k), .type = LC_LF_STR, .v.s = (x)})
#define LC_LI(k, x) ((lc_log_field){.key = (k), .type = LC_LF_INT, .v.i = (long long)(x)})
#define LC_LD(k, x) ((lc_log_field){.key = (k), .type = LC_LF_DBL, .v.d = (double)(x)})
#define LC_LB(k, x) ((lc_log_field){.key = (k), .type = LC_LF_BOOL, .v.i = !!(x)})
/* protected health information: only written at debug level */
#define LC_LP(k, x) ((lc_log_field){.key = (k), .type = LC_LF_PHI, .v.s = (x)})
#define LC_LEND     ((lc_log_field){.key = NULL, .type = LC_LF_END})

/* Configure once, before threads start. service is copied. */
void lc_log_init(const char *service, lc_log_level min_level);
/* Parse "debug", "info", "warn", "error"; returns -1 when unknown. */
int lc_log_level_parse(const char *s);
int lc_log_enabled(lc_log_level level);

/* fields: array terminated by LC_LEND (may be NULL). */
void lc_log_emit(lc_log_level level, const char *msg, const lc_log_field *fields);

#ifdef __CPPCHECK__
/* cppcheck 2.10 does not understand __VA_OPT__: give it plain calls to analyse */
#define lc_log_debug(msg, ...) lc_log_emit(LC_LOG_DEBUG, (msg), NULL)
#define lc_log_info(msg, ...)  lc_log_emit(LC_LOG_INFO, (msg), NULL)
#define lc_log_warn(msg, ...)  lc_log_emit(LC_LOG_WARN, (msg), NULL)
#define lc_log_error(msg, ...) lc_log_emit(LC_LOG_ERROR, (msg), NULL)
#else
#define lc_log_(lvl, msg, ...)                                                                     \
    lc_log_emit((lvl), (msg), (const lc_log_field[]){__VA_ARGS__ __VA_OPT__(, ) LC_LEND})
#define lc_log_debug(msg, ...) lc_log_(LC_LOG_DEBUG, msg __VA_OPT__(, ) __VA_ARGS__)
#define lc_log_info(msg, ...)  lc_log_(LC_LOG_INFO, msg __VA_OPT__(, ) __VA_ARGS__)
#define lc_log_warn(msg, ...)  lc_log_(LC_LOG_WARN, msg __VA_OPT__(, ) __VA_ARGS__)
#define lc_log_error(msg, ...) lc_log_(LC_LOG_ERROR, msg __VA_OPT__(, ) __VA_ARGS__)
#endif

/* Format one line into buf (for tests and for lc_log_emit); returns the length written,
 * always NUL-terminated, truncating long values. */
size_t lc_log_format(char *buf, size_t cap, lc_log_level level, const char *msg,
                     const lc_log_field *fields);

#endif
