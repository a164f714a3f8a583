/*
 * idx.h: the dicom-indexer's internals, shared by its files and its tests: configuration, the
 * context the batch handler and the completion tick run on, and the per-message work items.
 * An idx_ctx and everything it points to belong to the consuming thread (its lc_db included);
 * the store and metrics it borrows are thread-safe.
 */
#ifndef IDX_H
#define IDX_H

#include <stddef.h>
#include <stdint.h>
#include "lc/cfg.h"
#include "lc/db.h"
#include "lc/dicom.h"
#include "lc/event.h"
#include "lc/kafka.h"
#include "lc/metrics.h"
#include "lc/store.h"

/* The consumer name in processed_events, the DLQ "service" and the group id's suffix. */
#define IDX_SERVICE "dicom-indexer"

typedef struct idx_cfg {
    long long batch_max;        /* RADPIPE_INDEX_BATCH_MAX: messages per transaction */
    long long quiet_seconds;    /* RADPIPE_STUDY_QUIET_SECONDS: completion after this quiet */
    long long job_max_attempts; /* RADPIPE_JOB_MAX_ATTEMPTS: for the jobs completion creates */
} idx_cfg;

extern const lc_cfg_var idx_cfg_vars[];
extern const size_t idx_cfg_nvars;

/* Outcome counts of one batch (also the metrics' result labels). */
typedef struct idx_stats {
    long long inserted;    /* a new instance */
    long long replaced;    /* a different file under a known SOPInstanceUID */
    long long duplicates;  /* same bytes again, an event already processed, or superseded */
    long long quarantined; /* poison: quarantine row + DLQ event */
} idx_stats;

typedef struct idx_ctx {
    lc_db *db;          /* borrowed: the consuming thread's connection */
    lc_store *store;    /* borrowed */
    const char *prefix; /* topic prefix, borrowed */
    const char *source; /* CloudEvents source of what we emit, borrowed */
    idx_cfg cfg;
    char *tmpdir;             /* owned; for objects fetched from remote stores, made lazily */
    int64_t next_complete_ms; /* when the tick next runs study completion */
    idx_stats last;           /* the latest committed batch, for logs and tests */
    lc_counter *m_inserted, *m_replaced, *m_duplicate, *m_quarantined, *m_completed;
    lc_histogram *m_batch;
} idx_ctx;

/* Fill x; db, store, prefix and source are borrowed and must outlive it; metrics may be NULL
 * (no metrics). cfg is copied. */
lc_rc idx_init(idx_ctx *x, lc_db *db, lc_store *store, const char *prefix, const char *source,
               const idx_cfg *cfg, lc_metrics *metrics, lc_err *err);
void idx_release(idx_ctx *x);

/* The lc_kafka_batch_fn of the instance.stored consumer (ctx: idx_ctx). Poison messages are
 * quarantined; LC_OK once the whole batch is committed in one transaction; an error (store or
 * database unreachable) leaves nothing behind, so the batch can be redelivered. */
lc_rc idx_handle_batch(void *ctx, const lc_kafka_msg *msgs, size_t n, lc_err *err);

/* The consumer's tick (ctx: idx_ctx): study completion about once a second. */
void idx_tick(void *ctx);
/* One completion pass now: completes up to a page of quiet dirty studies in one transaction,
 * with their study.completed events and upload/segment jobs. *completed may be NULL. */
lc_rc idx_complete_run(idx_ctx *x, int *completed, lc_err *err);

/* --- between idx_ingest.c and idx_db.c ------------------------------------------------- */

typedef enum idx_state {
    IDX_READY = 0,  /* header parsed, to be written */
    IDX_SKIP,       /* event already processed (earlier, or earlier in this batch) */
    IDX_QUARANTINE, /* poison: reason says why */
    IDX_SUPERSEDED, /* a later message of this batch carries the same SOPInstanceUID */
} idx_state;

typedef enum idx_result {
    IDX_R_NONE = 0,
    IDX_R_INSERTED,
    IDX_R_REPLACED,
    IDX_R_DUPLICATE,
    IDX_R_QUARANTINED,
} idx_result;

typedef struct idx_item {
    const lc_kafka_msg *msg; /* borrowed */
    lc_event *ev;            /* owned; NULL when the message is not a valid event */
    const char *study_uid, *series_uid, *sop_uid; /* borrowed from ev->data */
    char *key;          /* owned: store key of the object, NULL when unknown */
    lc_dicom_header *h; /* owned when READY */
    char sha256[65];
    long long size;
    idx_state state;
    idx_result result; /* set by the transaction (reset on each attempt) */
    char reason[320];  /* IDX_QUARANTINE */
} idx_item;

typedef struct idx_write {
    idx_ctx *x;
    idx_item *items;
    size_t n;
} idx_write;

/* Mark items whose event id is already in processed_events as IDX_SKIP (one query). */
lc_rc idx_db_mark_processed(lc_db *db, idx_item *items, size_t n, lc_err *err);
/* The lc_db_tx_fn writing a batch (ctx: idx_write): processed_events, quarantine and DLQ
 * rows, study/series/instance upserts and the counts of the studies that changed. Sets each
 * item's result; safe to run again after a rollback. */
lc_rc idx_db_write(lc_db *db, void *ctx, lc_err *err);

/* Replace every invalid UTF-8 sequence of s with '?' in place (PostgreSQL text must be valid
 * UTF-8, and one bad string must not turn a batch into a poison pill). NULL is fine. */
void idx_utf8_fix(char *s);

#endif
