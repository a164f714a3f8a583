/*
 * upl_job.c: one upload job: every instance of the study is copied from the object store to
 * the archive under "<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm", through a
 * streaming writer (objects appear whole or not at all), with an optional bandwidth cap and
 * a cancellation check between chunks. Copying again overwrites with the same bytes, so a
 * re-run job creates no duplicates.
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "lc/log.h"
#include "lc/util.h"
#include "upl.h"

#define CHUNK (1 << 20)

#define OFF(f) offsetof(upl_cfg, f)
const lc_cfg_var upl_cfg_vars[] = {
    {"RADPIPE_ARCHIVE_URL", LC_CFG_STR, "file://var/archive", 0, -1, 0, NULL,
     "where studies are archived (file:// now; s3:// with the S3 backend)", OFF(archive_url)},
    {"RADPIPE_UPLOAD_RATE_LIMIT", LC_CFG_BYTES, "0", 0, 1LL << 40, 0, NULL,
     "bandwidth cap per uploader in bytes per second (K/M/G suffixes), 0 = unlimited",
     OFF(rate_limit)},
};
const size_t upl_cfg_nvars = sizeof(upl_cfg_vars) / sizeof(upl_cfg_vars[0]);

lc_rc upl_init(upl_ctx *u, lc_service *svc, const upl_cfg *cfg, lc_err *err)
{
    memset(u, 0, sizeof(*u));
    u->svc = svc;
    u->cfg = cfg;
    u->bytes = lc_metrics_counter(svc->metrics, "radpipe_upload_bytes_total",
                                  "bytes written to the archive", NULL);
    u->objects = lc_metrics_counter(svc->metrics, "radpipe_upload_objects_total",
                                    "objects written to the archive", NULL);
    lc_rc rc = lc_store_open(cfg->archive_url, &u->archive, err);
    if (rc != LC_OK)
        return lc_err_wrap(err, "could not open the archive");
    return LC_OK;
}

void upl_release(upl_ctx *u)
{
    lc_store_free(u->archive);
    u->archive = NULL;
}

typedef struct copy_state {
    upl_ctx *u;
    lc_worker_job *j;
    int64_t t0_ms;
    long long sent; /* bytes since t0, for the rate limit */
} copy_state;

/* Sleep as long as the rate limit asks, in short steps so cancellation stays prompt. */
static lc_rc throttle(copy_state *cs)
{
    if (cs->u->cfg->rate_limit <= 0)
        return LC_OK;
    int64_t due = cs->t0_ms + (int64_t)((double)cs->sent * 1000.0 / (double)cs->u->cfg->rate_limit);
    for (;;) {
        int64_t left = due - lc_now_ms();
        if (left <= 0)
            return LC_OK;
        if (lc_worker_job_should_stop(cs->j))
            return LC_ERR_CANCELLED;
        lc_sleep_ms(left > 100 ? 100 : (int)left, NULL);
    }
}

static lc_rc copy_object(copy_state *cs, const char *src_key, const char *dst_key, long long *bytes,
                         lc_err *err)
{
    lc_rc rc;
    char *path = NULL;
    char *buf = NULL;
    lc_store_writer *w = NULL;
    int fd = -1;

    *bytes = 0;
    rc = lc_store_local_path(cs->u->svc->store, src_key, &path, err);
    if (rc != LC_OK)
        goto out; /* remote object stores come with the S3 backend */
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = lc_err_set(err, errno == ENOENT ? LC_ERR_NOT_FOUND : LC_ERR_IO,
                        "could not open object \"%s\": %s", src_key, strerror(errno));
        goto out;
    }
    if (!(buf = malloc(CHUNK))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    if ((rc = lc_store_writer_open(cs->u->archive, dst_key, &w, err)) != LC_OK)
        goto out;
    for (;;) {
        ssize_t n = read(fd, buf, CHUNK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = lc_err_set(err, LC_ERR_IO, "could not read object \"%s\": %s", src_key,
                            strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        if ((rc = lc_store_writer_write(w, buf, (size_t)n, err)) != LC_OK)
            goto out;
        *bytes += n;
        cs->sent += n;
        lc_counter_add(cs->u->bytes, (double)n);
        if ((rc = throttle(cs)) != LC_OK) {
            lc_err_set(err, rc, "upload cancelled");
            goto out;
        }
    }
    rc = lc_store_writer_commit(w, err);
    w = NULL; /* commit frees the writer, also on failure */
    if (rc == LC_OK)
        lc_counter_inc(cs->u->objects);
out:
    lc_store_writer_abort(w);
    if (fd >= 0)
        close(fd);
    free(buf);
    free(path);
    return rc;
}

lc_rc upl_job(void *ctx, lc_worker_job *j, cJSON **result, lc_err *err)
{
    upl_ctx *u = ctx;
    PGresult *res = NULL;
    lc_rc rc;
    long long total = 0;
    copy_state cs = {u, j, lc_now_ms(), 0};
    int64_t last_progress = lc_now_ms();

    const char *p[1] = {j->job->study_uid};
    rc = lc_db_exec(j->db,
                    "SELECT sop_uid, series_uid, store_key FROM instances WHERE study_uid = $1 "
                    "ORDER BY series_uid, instance_number NULLS LAST, sop_uid",
                    1, p, &res, err);
    if (rc != LC_OK)
        return rc;
    int n = PQntuples(res);
    if (n == 0) {
        PQclear(res);
        return lc_err_set(err, LC_ERR_NOT_FOUND, "study has no indexed instances");
    }
    lc_worker_job_progress(j, 0, n, "instances");
    for (int i = 0; i < n; i++) {
        char key[512];
        long long bytes = 0;
        if (lc_worker_job_should_stop(j)) {
            rc = lc_err_set(err, LC_ERR_CANCELLED, "upload cancelled after %d of %d objects", i, n);
            goto out;
        }
        snprintf(key, sizeof(key), "%s/%s/%s.dcm", j->job->study_uid, PQgetvalue(res, i, 1),
                 PQgetvalue(res, i, 0));
        rc = copy_object(&cs, PQgetvalue(res, i, 2), key, &bytes, err);
        if (rc != LC_OK) {
            lc_err_wrap(err, "could not archive instance %d of %d", i + 1, n);
            goto out;
        }
        total += bytes;
        if (lc_now_ms() - last_progress >= 1000 || i + 1 == n) {
            lc_worker_job_progress(j, i + 1, n, "instances");
            last_progress = lc_now_ms();
        }
    }
    *result = cJSON_CreateObject();
    cJSON_AddNumberToObject(*result, "objects", n);
    cJSON_AddNumberToObject(*result, "bytes", (double)total);
    cJSON_AddStringToObject(*result, "archive_url", lc_store_url(u->archive));
    cJSON_AddStringToObject(*result, "prefix", j->job->study_uid);
out:
    PQclear(res);
    return rc;
}
