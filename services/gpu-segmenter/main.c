/*
 * main.c: gpu-segmenter: consumes job.segment and segments series (see seg_job.c).
 */
#include <stdlib.h>
#include "lc/log.h"
#include "seg.h"

int main(int argc, char **argv)
{
    static seg_cfg cfg;
    static lc_worker_cfg wcfg;
    const lc_cfg_table tables[] = {{seg_cfg_vars, seg_cfg_nvars, &cfg},
                                   {lc_worker_cfg_vars, lc_worker_cfg_nvars, &wcfg}};
    const lc_service_def def = {
        .name = "gpu-segmenter",
        .summary = "segments series on the GPU (CPU fallback) for job.segment jobs",
        .admin_default = "127.0.0.1:9103",
        .needs = LC_SVC_DB | LC_SVC_PRODUCER | LC_SVC_RELAY | LC_SVC_STORE | LC_SVC_ADMIN,
        .tables = tables,
        .ntables = 2,
    };
    lc_service s;
    seg_ctx c = {0};
    lc_err err = {0};
    int code = lc_service_args(&def, argc, argv);
    if (code >= 0)
        return code;

    lc_rc rc = lc_service_init(&s, &def, &err);
    if (rc == LC_OK)
        rc = seg_init(&c, &s, &cfg, &err);
    if (rc == LC_OK)
        rc = lc_worker_run(&s, &wcfg, "segment", LC_TOPIC_JOB_SEGMENT, seg_job, &c, &err);
    if (rc != LC_OK)
        lc_log_error("gpu-segmenter failed", LC_LS("error", lc_err_msg(&err)));
    seg_release(&c);
    lc_service_release(&s);
    return rc == LC_OK ? 0 : 1;
}
