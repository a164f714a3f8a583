/*
 * main.c: the dicom-indexer executable. Consumes radpipe.instance.stored and radpipe.study.close
 * in batches, indexes each instance into PostgreSQL and completes studies, routing them to
 * jobs by the rules of RADPIPE_RULES_FILE (idx_*.c; SIGHUP reloads them), until SIGTERM: the
 * current batch is committed, the outbox relay drains, and the process exits 0. Also
 * `--check-rules FILE` and `--dry-run-rules FILE` (idx_rules_dry.c).
 * The consuming thread is the main thread; libcommon runs the signal, relay and admin threads.
 */
#include <stdio.h>
#include <string.h>
#include "idx.h"
#include "idx_rules.h"
#include "lc/log.h"
#include "lc/service.h"

int main(int argc, char **argv)
{
    idx_cfg cfg = {0};
    idx_rules_cfg rcfg = {0};
    lc_cfg_table tables[2] = {{idx_cfg_vars, idx_cfg_nvars, &cfg},
                              {idx_rules_cfg_vars, idx_rules_cfg_nvars, &rcfg}};
    const lc_service_def def = {
        .name = IDX_SERVICE,
        .summary = "indexes received DICOM instances into PostgreSQL, completes studies and "
                   "routes them to jobs (also: --check-rules FILE, --dry-run-rules FILE)",
        .admin_default = "127.0.0.1:9101",
        .needs = LC_SVC_DB | LC_SVC_PRODUCER | LC_SVC_RELAY | LC_SVC_STORE | LC_SVC_ADMIN,
        .tables = tables,
        .ntables = 2,
    };
    lc_service s;
    idx_ctx x = {0};
    lc_kafka_consumer *c = NULL;
    idx_spool *sp = NULL; /* RADPIPE_SPOOL_WATCH_DIR's watcher */
    lc_err err = {0};
    const lc_topic topics[2] = {LC_TOPIC_INSTANCE_STORED, LC_TOPIC_STUDY_CLOSE};
    /* A batch gathers messages for up to 20 ms, and closes sooner once none has come for 8 ms:
     * longer than the relays' linger.ms (5), so a steady flow still fills it, while the end of
     * a burst (the last instances of an upload) is indexed at once. */
    lc_kafka_run_opts opts = {.batch_wait_ms = 20, .batch_gap_ms = 8, .tick = idx_tick};
    char group[256];
    int code = 1;

    if (argc == 3 && strcmp(argv[1], "--check-rules") == 0)
        return idx_rules_check_main(argv[2]);
    if (argc == 3 && strcmp(argv[1], "--dry-run-rules") == 0)
        return idx_rules_dry_run_main(argv[2]);
    int a = lc_service_args(&def, argc, argv);
    if (a >= 0)
        return a;
    if (lc_service_init(&s, &def, &err) != LC_OK ||
        idx_init(&x, s.db, s.store, s.cfg.topic_prefix, s.source, &cfg, s.metrics, &err) != LC_OK)
        goto fail;
    /* an invalid rules file at start is a configuration error */
    if (rcfg.rules_file[0] && idx_rules_load(rcfg.rules_file, &x.rules, &err) != LC_OK)
        goto fail;
    x.rules_path = rcfg.rules_file;
    x.reload = &s.reload;
    if (cfg.spool_watch_dir && *cfg.spool_watch_dir &&
        idx_spool_start(cfg.spool_watch_dir, s.cfg.database_url, s.store, s.cfg.topic_prefix,
                        s.source, s.metrics, &s.stop, &sp, &err) != LC_OK)
        goto fail;
    opts.max_batch = (size_t)cfg.batch_max;
    snprintf(group, sizeof(group), "%s%s", s.cfg.topic_prefix, IDX_SERVICE);
    if (lc_kafka_consumer_new(&s.kconf, group, topics, 2, 0, &c, &err) != LC_OK)
        goto fail;
    if (lc_kafka_consumer_run(c, &opts, idx_route_batch, &x, &s.stop, &err) != LC_OK)
        goto fail;
    code = 0;
    goto out;
fail:
    lc_log_error("dicom-indexer failed", LC_LS("error", lc_err_msg(&err)));
out:
    if (sp)
        atomic_store(&s.stop, 1); /* the watcher thread ends with the service */
    idx_spool_stop(sp);
    lc_kafka_consumer_free(c);
    idx_release(&x);
    idx_rules_free(x.rules);
    lc_service_release(&s);
    return code;
}
