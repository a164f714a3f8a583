/*
 * upl.h: storage-uploader internals. The uploader archives a study's instances from the
 * object store (RADPIPE_STORE_URL) to destinations named by a pattern over DICOM tags
 * (RADPIPE_ARCHIVE_URL_PATTERN, or the job's url_pattern), one object per instance or one
 * tar per series or study, with a manifest per upload and resumable multipart uploads.
 * An upl_ctx is built by main() and used by the worker loop's thread; the job function runs
 * a pool of copy threads per job (upl_job.c) that share only the stores and atomic counters.
 */
#ifndef UPL_H
#define UPL_H

#include <pthread.h>
#include <semaphore.h>
#include "lc/service.h"
#include "lc/worker.h"

typedef struct upl_cfg {
    char *archive_url;
    char *url_pattern;     /* RADPIPE_ARCHIVE_URL_PATTERN */
    char *layout;          /* instance|series-tar|study-tar */
    char *missing;         /* value of a keyword that has none and no default */
    long long concurrency; /* objects in flight per destination */
    char *dest_limits;     /* "url-prefix=n,..." lower limits for some destinations */
    long long rate_limit;  /* bytes per second per worker, 0 = unlimited */
} upl_cfg;

/* An opened destination store, cached for the process (the worker thread opens them). */
typedef struct upl_dest {
    char *url;
    lc_store *store;
    int limit; /* objects (or parts) in flight at once */
    sem_t sem; /* counts free slots of limit */
} upl_dest;

#define UPL_DESTS_MAX 32

typedef struct upl_ctx {
    lc_service *svc;               /* borrowed */
    const upl_cfg *cfg;            /* borrowed */
    lc_store *archive;             /* owned: RADPIPE_ARCHIVE_URL */
    upl_dest dests[UPL_DESTS_MAX]; /* owned; dests[i].url NULL when free */
    size_t ndests;
    lc_counter *bytes, *objects, *skipped;
} upl_ctx;

extern const lc_cfg_var upl_cfg_vars[];
extern const size_t upl_cfg_nvars;

/* Open the archive and metrics, check the pattern; upl_release frees what it made. */
lc_rc upl_init(upl_ctx *u, lc_service *svc, const upl_cfg *cfg, lc_err *err);
void upl_release(upl_ctx *u);
/* The destination for a store URL, opened (and instrumented) on first use; the pointer
 * stays valid until upl_dest_trim. */
lc_rc upl_dest_get(upl_ctx *u, const char *url, upl_dest **out, lc_err *err);
/* Between jobs: close destinations other than the archive once there are many. */
void upl_dest_trim(upl_ctx *u);

/* The lc_worker_fn for job.upload (ctx is the upl_ctx). */
lc_rc upl_job(void *ctx, lc_worker_job *j, cJSON **result, lc_err *err);

/* --- patterns (upl_pattern.c) ----------------------------------------------------------- */

/* Value of a keyword: *value malloc'd, NULL when the study has none; LC_ERR_NOT_FOUND (with a
 * message) for a keyword that is not a DICOM keyword. */
typedef lc_rc (*upl_lookup_fn)(void *ctx, const char *keyword, char **value, lc_err *err);
/* Expand pattern with values from fn (NULL: every value missing); missing is the value for
 * keywords without one and without a default ("unknown" when empty). *out malloc'd. */
lc_rc upl_pattern_expand(const char *pattern, upl_lookup_fn fn, void *ctx, const char *missing,
                         char **out, lc_err *err);
/* The pattern's syntax and keywords (DICOM dictionary), as upl_init checks the default. */
lc_rc upl_pattern_validate(const char *pattern, lc_err *err);
/* Syntax and keyword check (known answers NOT_FOUND for unknown keywords, may be NULL). */
lc_rc upl_pattern_check(const char *pattern, upl_lookup_fn known, void *ctx, lc_err *err);
/* An expanded pattern as a destination store URL and a key prefix (both malloc'd):
 * "s3://bucket/a/b" -> ("s3://bucket", "a/b") with the bucket normalised; "file:///d/x" ->
 * ("file:///d/x", ""); a relative "a/b" -> (archive_url, "a/b"). */
lc_rc upl_pattern_split(const char *expanded, const char *archive_url, char **store_url,
                        char **prefix, lc_err *err);
/* The sanitising rules (README.md), for tests: a value to at most 64 key-safe characters;
 * a bucket name to S3's rules. */
void upl_sanitize_value(const char *in, char *out, size_t cap);
void upl_sanitize_bucket(const char *in, char *out, size_t cap);

/* --- tar framing (upl_tar.c) ------------------------------------------------------------ */

lc_rc upl_tar_header(const char *name, int64_t size, unsigned char hdr[512], lc_err *err);
int64_t upl_tar_padding(int64_t size);
/* The archive size for members of the given sizes (headers, padding, end blocks). */
int64_t upl_tar_size(const int64_t *sizes, size_t n);

/* --- resume state (upl_state.c): tables of proto/sql/005_upload_resume.sql ------------- */

typedef struct upl_resume {
    char *upload_id; /* NULL: nothing to resume */
    char *digest;
    int64_t part_size;
    lc_store_part *parts;
    size_t nparts;
} upl_resume;
lc_rc upl_state_load(lc_db *db, const char *dest, const char *key, upl_resume *r, lc_err *err);
void upl_resume_free(upl_resume *r);
lc_rc upl_state_begin(lc_db *db, const char *dest, const char *key, const char *upload_id,
                      const char *digest, int64_t part_size, const char *job_id, lc_err *err);
lc_rc upl_state_part(lc_db *db, const char *dest, const char *key, const lc_store_part *p,
                     lc_err *err);
lc_rc upl_state_clear(lc_db *db, const char *dest, const char *key, lc_err *err);

#endif
