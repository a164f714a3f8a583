/*
 * main.c: the api-gateway executable: configuration, database, producer, outbox relay and
 * object store through lc_service, then the HTTP server (gw_server.c) until SIGTERM/SIGINT.
 * On stop, requests already inside (uploads too) may finish for RADPIPE_DRAIN_SECONDS while
 * new ones get 503, then the server stops and lc_service_release publishes what the outbox
 * still holds. `api-gateway token create|list|revoke` manages bearer tokens instead (gw_token.c).
 * Single-threaded apart from civetweb's workers and the job-events thread.
 */
#include <stdlib.h>
#include "gw.h"
#include "lc/log.h"
#include "lc/service.h"
#include "lc/util.h"

int main(int argc, char **argv)
{
    gw_config cfg = {0}; /* filled once by lc_service_init, read-only afterwards */
    const lc_cfg_table tables[] = {{gw_cfg_vars, gw_cfg_nvars, &cfg}};
    const lc_service_def def = {
        .name = "api-gateway",
        .summary = "REST API and DICOMweb (STOW-RS, QIDO-RS, WADO-RS): uploads into the object "
                   "store (events through the outbox), study and job queries, job control, job "
                   "events (SSE); /healthz, /readyz and /metrics on the same listener. "
                   "`api-gateway token create|list|revoke` manages bearer tokens",
        .admin_default = NULL,
        .needs = LC_SVC_DB | LC_SVC_PRODUCER | LC_SVC_RELAY | LC_SVC_STORE,
        .tables = tables,
        .ntables = 1,
    };
    lc_service svc;
    gw g = {0};
    lc_err err = {0};
    int code = gw_token_main(argc, argv);
    if (code >= 0)
        return code;
    code = lc_service_args(&def, argc, argv);
    if (code >= 0)
        return code;

    if (lc_service_init(&svc, &def, &err) != LC_OK) {
        lc_log_error("could not start", LC_LS("error", lc_err_msg(&err)));
        lc_service_release(&svc);
        return 1;
    }
    const gw_deps deps = {.database_url = svc.cfg.database_url,
                          .topic_prefix = svc.cfg.topic_prefix,
                          .source = svc.source,
                          .store = svc.store,
                          .metrics = svc.metrics,
                          .svc = &svc,
                          .stop = &svc.stop,
                          .kafka = &svc.kconf};
    if (gw_start(&g, &cfg, &deps, &err) != LC_OK) {
        lc_log_error("could not start", LC_LS("error", lc_err_msg(&err)));
        lc_service_release(&svc);
        return 1;
    }
    while (!lc_service_stopping(&svc))
        lc_sleep_ms(1000, &svc.stop);
    gw_drain_begin(&g);
    gw_drain_wait(&g, (int)svc.cfg.drain_seconds * 1000);
    gw_stop(&g);
    lc_service_release(&svc);
    return 0;
}
