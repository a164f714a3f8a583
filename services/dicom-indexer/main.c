/*
 * main.c: the dicom-indexer executable. Consumes radpipe.instance.stored in batches, indexes
 * each instance into PostgreSQL and completes quiet studies (idx_*.c), until SIGTERM: the
 * current batch is committed, the outbox relay drains, and the process exits 0.
 * The consuming thread is the main thread; libcommon runs the signal, relay and admin threads.
 */
#include <stdio.h>
#include "idx.h"
#include "lc/log.h"
#include "lc/service.h"

int main(int argc, char **argv)
{
    idx_cfg cfg = {0};
    lc_cfg_table tables[1] = {{idx_cfg_vars, idx_cfg_nvars, &cfg}};
    const lc_service_def def = {
        .name = IDX_SERVICE,
        .summary = "indexes received DICOM instances into PostgreSQL and completes studies",
        .admin_default = "127.0.0.1:9101",
        .needs = LC_SVC_DB | LC_SVC_PRODUCER | LC_SVC_RELAY | LC_SVC_STORE | LC_SVC_ADMIN,
        .tables = tables,
        .ntables = 1,
    };
    lc_service s;
    idx_ctx x = {0};
    lc_kafka_consumer *c = NULL;
    lc_err err = {0};
    const lc_topic topic = LC_TOPIC_INSTANCE_STORED;
    lc_kafka_run_opts opts = {.batch_wait_ms = 20, .tick = idx_tick};
    char group[256];
    int code = 1;

    int a = lc_service_args(&def, argc, argv);
    if (a >= 0)
        return a;
    if (lc_service_init(&s, &def, &err) != LC_OK ||
        idx_init(&x, s.db, s.store, s.cfg.topic_prefix, s.source, &cfg, s.metrics, &err) != LC_OK)
        goto fail;
    opts.max_batch = (size_t)cfg.batch_max;
    snprintf(group, sizeof(group), "%s%s", s.cfg.topic_prefix, IDX_SERVICE);
    if (lc_kafka_consumer_new(&s.kconf, group, &topic, 1, 0, &c, &err) != LC_OK)
        goto fail;
    if (lc_kafka_consumer_run(c, &opts, idx_handle_batch, &x, &s.stop, &err) != LC_OK)
        goto fail;
    code = 0;
    goto out;
fail:
    lc_log_error("dicom-indexer failed", LC_LS("error", lc_err_msg(&err)));
out:
    lc_kafka_consumer_free(c);
    idx_release(&x);
    lc_service_release(&s);
    return code;
}
