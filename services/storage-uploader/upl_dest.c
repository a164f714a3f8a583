/*
 * upl_dest.c: the uploader's configuration, start-up and destinations. Destination stores
 * are opened on first use (the archive at start), instrumented with the upload metrics and
 * kept for the life of the process, each with its concurrency limit (RADPIPE_UPLOAD_
 * CONCURRENCY, lowered per destination by RADPIPE_UPLOAD_DEST_LIMITS). Used by the worker
 * thread; copy threads only use the opened stores and semaphores.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lc/dicom.h"
#include "lc/log.h"
#include "lc/util.h"
#include "upl.h"

#define OFF(f) offsetof(upl_cfg, f)
const lc_cfg_var upl_cfg_vars[] = {
    {"RADPIPE_ARCHIVE_URL", LC_CFG_STR, "file://var/archive", 0, -1, 0, NULL,
     "where studies are archived: file://dir or s3://bucket[/prefix] (RADPIPE_S3_* for the "
     "endpoint); relative patterns are placed under it",
     OFF(archive_url)},
    {"RADPIPE_ARCHIVE_URL_PATTERN", LC_CFG_STR, "{StudyInstanceUID}", 0, -1, 0, NULL,
     "destination of each study from DICOM tags: {Keyword}, {KeywordPath[n]}, "
     "{Keyword:-default}; a full s3:// or file:// URL, or a prefix under RADPIPE_ARCHIVE_URL",
     OFF(url_pattern)},
    {"RADPIPE_ARCHIVE_LAYOUT", LC_CFG_ENUM, "instance", 0, -1, 0, "instance|series-tar|study-tar",
     "one object per instance, or one tar archive per series or per study (jobs may override)",
     OFF(layout)},
    {"RADPIPE_ARCHIVE_MISSING_VALUE", LC_CFG_STR, "unknown", 0, -1, 0, NULL,
     "what a pattern keyword without a value and without a default becomes", OFF(missing)},
    {"RADPIPE_UPLOAD_CONCURRENCY", LC_CFG_INT, "16", 1, 256, 0, NULL,
     "objects sent at once to one destination", OFF(concurrency)},
    {"RADPIPE_UPLOAD_DEST_LIMITS", LC_CFG_STR, "", 0, -1, 0, NULL,
     "lower limits for some destinations: url-prefix=n[,url-prefix=n] (e.g. s3://slow-bucket=2)",
     OFF(dest_limits)},
    {"RADPIPE_UPLOAD_RATE_LIMIT", LC_CFG_BYTES, "0", 0, 1LL << 40, 0, NULL,
     "bandwidth cap per uploader in bytes per second (K/M/G suffixes), 0 = unlimited",
     OFF(rate_limit)},
};
const size_t upl_cfg_nvars = sizeof(upl_cfg_vars) / sizeof(upl_cfg_vars[0]);

/* The limit for url from RADPIPE_UPLOAD_DEST_LIMITS (the lowest matching rule wins), or -1
 * when the setting is malformed. */
static int dest_limit(const upl_cfg *cfg, const char *url)
{
    int limit = (int)cfg->concurrency;
    const char *p = cfg->dest_limits ? cfg->dest_limits : "";
    while (*p) {
        size_t n = strcspn(p, ",");
        const char *eq = memchr(p, '=', n);
        if (!eq || eq == p)
            return -1;
        char *end = NULL;
        long v = strtol(eq + 1, &end, 10);
        if (end != p + n || v < 1 || v > 256)
            return -1;
        size_t pl = (size_t)(eq - p);
        if (strncmp(url, p, pl) == 0 && v < limit)
            limit = (int)v;
        p += n;
        if (*p == ',')
            p++;
    }
    return limit;
}

static upl_dest *dest_add(upl_ctx *u, const char *url, lc_store *st)
{
    upl_dest *d = &u->dests[u->ndests];
    d->url = strdup(url);
    if (!d->url)
        return NULL;
    d->store = st;
    d->limit = dest_limit(u->cfg, url);
    sem_init(&d->sem, 0, (unsigned)d->limit);
    lc_store_instrument(st, u->svc->metrics, "radpipe_upload", lc_store_url(st));
    u->ndests++;
    return d;
}

lc_rc upl_dest_get(upl_ctx *u, const char *url, upl_dest **out, lc_err *err)
{
    for (size_t i = 0; i < u->ndests; i++)
        if (strcmp(u->dests[i].url, url) == 0) {
            *out = &u->dests[i];
            return LC_OK;
        }
    if (u->ndests == UPL_DESTS_MAX)
        return lc_err_set(err, LC_ERR_INVALID,
                          "the pattern names more than %d destinations for one study",
                          UPL_DESTS_MAX - 1);
    lc_store *st = NULL;
    lc_rc rc = lc_store_open(url, &st, err);
    if (rc != LC_OK)
        return lc_err_wrap(err, "could not open destination");
    if (!(*out = dest_add(u, url, st))) {
        lc_store_free(st);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    return LC_OK;
}

void upl_dest_trim(upl_ctx *u)
{
    if (u->ndests <= UPL_DESTS_MAX / 2)
        return;
    for (size_t i = 1; i < u->ndests; i++) {
        lc_store_free(u->dests[i].store);
        sem_destroy(&u->dests[i].sem);
        free(u->dests[i].url);
        memset(&u->dests[i], 0, sizeof(u->dests[i]));
    }
    u->ndests = 1;
}

/* Pattern keywords: the index's columns and the DICOM dictionary. */
static lc_rc known_keyword(void *ctx, const char *keyword, char **value, lc_err *err)
{
    (void)ctx;
    *value = NULL;
    if (lc_dicom_keyword_tag(keyword, NULL, NULL) == LC_OK)
        return LC_OK;
    return lc_err_set(err, LC_ERR_NOT_FOUND, "\"%s\" is not a DICOM keyword", keyword);
}

lc_rc upl_pattern_validate(const char *pattern, lc_err *err)
{
    return upl_pattern_check(pattern, known_keyword, NULL, err);
}

lc_rc upl_init(upl_ctx *u, lc_service *svc, const upl_cfg *cfg, lc_err *err)
{
    memset(u, 0, sizeof(*u));
    u->svc = svc;
    u->cfg = cfg;
    u->bytes = lc_metrics_counter(svc->metrics, "radpipe_upload_bytes_total",
                                  "bytes written to the archive", NULL);
    u->objects = lc_metrics_counter(svc->metrics, "radpipe_upload_objects_total",
                                    "objects written to the archive", NULL);
    u->skipped =
        lc_metrics_counter(svc->metrics, "radpipe_upload_skipped_total",
                           "objects already archived with the same digest, not sent", NULL);
    if (dest_limit(cfg, "") < 0)
        return lc_err_set(err, LC_ERR_CONFIG,
                          "RADPIPE_UPLOAD_DEST_LIMITS must be url-prefix=n[,url-prefix=n] with n "
                          "in 1..256");
    if (upl_pattern_validate(cfg->url_pattern, err) != LC_OK)
        return lc_err_wrap(err, "invalid RADPIPE_ARCHIVE_URL_PATTERN");
    lc_store *st = NULL;
    lc_rc rc = lc_store_open(cfg->archive_url, &st, err);
    if (rc != LC_OK)
        return lc_err_wrap(err, "could not open the archive");
    if (!dest_add(u, cfg->archive_url, st)) {
        lc_store_free(st);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    u->archive = st;
    return LC_OK;
}

void upl_release(upl_ctx *u)
{
    for (size_t i = 0; i < u->ndests; i++) {
        lc_store_free(u->dests[i].store);
        sem_destroy(&u->dests[i].sem);
        free(u->dests[i].url);
    }
    u->ndests = 0;
    u->archive = NULL;
}
