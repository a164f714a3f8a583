/*
 * admin.h: the admin endpoints every service serves: /healthz (alive), /readyz (every
 * registered check passes: database, broker, ...) and /metrics (Prometheus text).
 * Either a small civetweb listener of its own (lc_admin_start) or handlers attached to a
 * server the service already runs (the gateway: lc_admin_attach). Register checks before
 * traffic arrives; the handlers are thread-safe.
 */
#ifndef LC_ADMIN_H
#define LC_ADMIN_H

#include "lc/metrics.h"
#include "lc/rc.h"

struct mg_context;
typedef struct lc_admin lc_admin;

/* A readiness check: LC_OK when the dependency is usable, else an error with a message.
 * Called from HTTP worker threads: must be thread-safe and bounded in time (about 1 s). */
typedef lc_rc (*lc_admin_check_fn)(void *ctx, lc_err *err);

/* listen: "127.0.0.1:9101" or "9101" (civetweb listening_ports syntax). metrics borrowed. */
lc_rc lc_admin_start(const char *listen, lc_metrics *metrics, lc_admin **out, lc_err *err);
/* Register /healthz, /readyz, /metrics on an existing civetweb context (borrowed). */
lc_rc lc_admin_attach(struct mg_context *ctx, lc_metrics *metrics, lc_admin **out, lc_err *err);
/* Up to 8 checks; name appears in the /readyz JSON. */
lc_rc lc_admin_add_check(lc_admin *a, const char *name, lc_admin_check_fn fn, void *ctx);
/* Mark the service as draining: /readyz answers 503 from now on. */
void lc_admin_set_draining(lc_admin *a);
/* The port actually bound (useful with port 0), or -1. */
int lc_admin_port(const lc_admin *a);
/* Stops the listener if lc_admin_start created it. After lc_admin_attach, call it only once
 * the server has been stopped (mg_stop): the handlers point at the lc_admin. Accepts NULL. */
void lc_admin_free(lc_admin *a);

#endif
