/*
 * rc.c: lc_rc descriptions and the lc_err detail buffer.
 * Stateless and thread-safe; an lc_err is owned by its caller.
 */
#include <stdio.h>
#include <string.h>
#include "lc/rc.h"

static const char *const rc_names[LC_RC__COUNT] = {
    [LC_OK] = "success",
    [LC_ERR_NOMEM] = "out of memory",
    [LC_ERR_INVALID] = "invalid input",
    [LC_ERR_CONFIG] = "invalid configuration",
    [LC_ERR_IO] = "input/output error",
    [LC_ERR_NOT_FOUND] = "not found",
    [LC_ERR_EXISTS] = "already exists",
    [LC_ERR_DB] = "database error",
    [LC_ERR_UNAVAILABLE] = "service unavailable",
    [LC_ERR_KAFKA] = "message broker error",
    [LC_ERR_STORE] = "object store error",
    [LC_ERR_DICOM] = "invalid DICOM",
    [LC_ERR_TIMEOUT] = "timed out",
    [LC_ERR_CANCELLED] = "cancelled",
    [LC_ERR_UNSUPPORTED] = "not supported",
    [LC_ERR_CONFLICT] = "conflict",
    [LC_ERR_TOO_LARGE] = "too large",
    [LC_ERR_AUTH] = "authentication required",
    [LC_ERR_FORBIDDEN] = "permission denied",
    [LC_ERR_INTERNAL] = "internal error",
};

const char *lc_strerror(lc_rc rc)
{
    if ((int)rc < 0 || rc >= LC_RC__COUNT || !rc_names[rc])
        return "unknown error";
    return rc_names[rc];
}

int lc_rc_is_transient(lc_rc rc)
{
    switch (rc) {
    case LC_ERR_NOMEM:
    case LC_ERR_IO:
    case LC_ERR_DB:
    case LC_ERR_UNAVAILABLE:
    case LC_ERR_KAFKA:
    case LC_ERR_STORE:
    case LC_ERR_TIMEOUT:
    case LC_ERR_CONFLICT:
        return 1;
    default:
        return 0;
    }
}

lc_rc lc_err_setv(lc_err *err, lc_rc rc, const char *fmt, va_list ap)
{
    if (err) {
        err->rc = rc;
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    }
    return rc;
}

lc_rc(lc_err_set)(lc_err *err, lc_rc rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    lc_err_setv(err, rc, fmt, ap);
    va_end(ap);
    return rc;
}

lc_rc lc_err_wrap(lc_err *err, const char *fmt, ...)
{
    if (!err)
        return LC_OK;
    char prefix[256], old[sizeof(err->msg)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof(old));
    if (!old[0])
        snprintf(old, sizeof(old), "%s", lc_strerror(err->rc));
    snprintf(err->msg, sizeof(err->msg), "%s: %s", prefix, old);
    return err->rc;
}

const char *lc_err_msg(const lc_err *err)
{
    if (!err)
        return "unknown error";
    return err->msg[0] ? err->msg : lc_strerror(err->rc);
}

void lc_err_clear(lc_err *err)
{
    if (err) {
        err->rc = LC_OK;
        err->msg[0] = '\0';
    }
}
