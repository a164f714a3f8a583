/*
 * rc.h: the one error enum of radpipe (it only grows) and an error detail buffer.
 * Functions return lc_rc and, when given a non-NULL lc_err, fill it with a message in
 * PostgreSQL's style: lowercase, no trailing period, what failed and why.
 * Thread safety: lc_strerror is pure; an lc_err belongs to one thread.
 */
#ifndef LC_RC_H
#define LC_RC_H

#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lc_rc {
    LC_OK = 0,
    LC_ERR_NOMEM,       /* allocation failed */
    LC_ERR_INVALID,     /* invalid argument or malformed input (permanent) */
    LC_ERR_CONFIG,      /* bad configuration value */
    LC_ERR_IO,          /* local file system error */
    LC_ERR_NOT_FOUND,   /* object, row or file does not exist */
    LC_ERR_EXISTS,      /* already exists */
    LC_ERR_DB,          /* database error (statement failed) */
    LC_ERR_UNAVAILABLE, /* a dependency (database, broker, store) is unreachable: retry later */
    LC_ERR_KAFKA,       /* broker or client error */
    LC_ERR_STORE,       /* object store error */
    LC_ERR_DICOM,       /* not DICOM or DICOM that cannot be parsed */
    LC_ERR_TIMEOUT,     /* an operation ran past its deadline */
    LC_ERR_CANCELLED,   /* stopped on request (shutdown, job cancelled, lease lost) */
    LC_ERR_UNSUPPORTED, /* valid input that radpipe does not handle */
    LC_ERR_CONFLICT,    /* state changed under us, e.g. a guarded transition matched no row */
    LC_ERR_TOO_LARGE,   /* input over a configured limit */
    LC_ERR_AUTH,        /* missing or invalid credentials */
    LC_ERR_FORBIDDEN,   /* valid credentials without the needed permission */
    LC_ERR_INTERNAL,    /* a bug: an invariant does not hold */
    LC_RC__COUNT
} lc_rc;

/* A static description of rc, never NULL ("unknown error" for out-of-range values). */
const char *lc_strerror(lc_rc rc);

/* 1 when a later retry of the same operation may succeed (unavailable, timeout, db, kafka,
 * store, io, nomem); 0 for errors in the input itself. */
int lc_rc_is_transient(lc_rc rc);

typedef struct lc_err {
    lc_rc rc;
    char msg[512];
} lc_err;

/* Fill err (may be NULL) with rc and a formatted message; returns rc so callers can write
 * `return lc_err_set(err, LC_ERR_IO, "could not open \"%s\": %s", p, strerror(errno));` */
lc_rc lc_err_set(lc_err *err, lc_rc rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
lc_rc lc_err_setv(lc_err *err, lc_rc rc, const char *fmt, va_list ap)
    __attribute__((format(printf, 3, 0)));
#ifdef __clang_analyzer__
/* The analyser does not follow variadic calls: show it that the result is rc, or it assumes
 * an error path may return LC_OK and reports the callers' out-parameters as unset. */
#define lc_err_set(err, rc, ...) (lc_err_set((err), (rc), __VA_ARGS__), (rc))
#endif
/* Prefix an existing message: "context: previous message"; returns err->rc (LC_OK if NULL). */
lc_rc lc_err_wrap(lc_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The message, or lc_strerror(rc) when no message was set; never NULL. */
const char *lc_err_msg(const lc_err *err);
void lc_err_clear(lc_err *err);

#ifdef __cplusplus
}
#endif

#endif
