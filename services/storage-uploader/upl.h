/*
 * upl.h: storage-uploader internals. The uploader archives a study's instances from the
 * object store (RADPIPE_STORE_URL) to the archive (RADPIPE_ARCHIVE_URL) for job.upload jobs.
 * An upl_ctx is built by main() and used by the worker loop's thread only.
 */
#ifndef UPL_H
#define UPL_H

#include "lc/service.h"
#include "lc/worker.h"

typedef struct upl_cfg {
    char *archive_url;
    long long rate_limit; /* bytes per second per worker, 0 = unlimited */
} upl_cfg;

typedef struct upl_ctx {
    lc_service *svc;    /* borrowed */
    const upl_cfg *cfg; /* borrowed */
    lc_store *archive;  /* owned */
    lc_counter *bytes, *objects;
} upl_ctx;

extern const lc_cfg_var upl_cfg_vars[];
extern const size_t upl_cfg_nvars;

/* Open the archive and metrics; upl_release frees what it made. */
lc_rc upl_init(upl_ctx *u, lc_service *svc, const upl_cfg *cfg, lc_err *err);
void upl_release(upl_ctx *u);

/* The lc_worker_fn for job.upload (ctx is the upl_ctx). */
lc_rc upl_job(void *ctx, lc_worker_job *j, cJSON **result, lc_err *err);

#endif
