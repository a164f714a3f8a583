/*
 * main.c: storage-uploader: consumes job.upload and archives studies (see upl_job.c).
 */
#include <stdlib.h>
#include "lc/log.h"
#include "upl.h"

int main(int argc, char **argv)
{
    static upl_cfg cfg;
    static lc_worker_cfg wcfg;
    const lc_cfg_table tables[] = {{upl_cfg_vars, upl_cfg_nvars, &cfg},
                                   {lc_worker_cfg_vars, lc_worker_cfg_nvars, &wcfg}};
    const lc_service_def def = {
        .name = "storage-uploader",
        .summary = "archives studies to object storage for job.upload jobs",
        .admin_default = "127.0.0.1:9102",
        .needs = LC_SVC_DB | LC_SVC_PRODUCER | LC_SVC_RELAY | LC_SVC_STORE | LC_SVC_ADMIN,
        .tables = tables,
        .ntables = 2,
    };
    lc_service s;
    upl_ctx u = {0};
    lc_err err = {0};
    int code = lc_service_args(&def, argc, argv);
    if (code >= 0)
        return code;

    lc_rc rc = lc_service_init(&s, &def, &err);
    if (rc == LC_OK)
        rc = upl_init(&u, &s, &cfg, &err);
    if (rc == LC_OK)
        rc = lc_worker_run(&s, &wcfg, "upload", LC_TOPIC_JOB_UPLOAD, upl_job, &u, &err);
    if (rc != LC_OK)
        lc_log_error("storage-uploader failed", LC_LS("error", lc_err_msg(&err)));
    upl_release(&u);
    lc_service_release(&s);
    return rc == LC_OK ? 0 : 1;
}
