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
    long long parse_threads;    /* RADPIPE_INDEX_PARSE_THREADS: 0 = one per online CPU */
    int verify_sha256;          /* RADPIPE_INDEX_VERIFY_SHA256: false = trust every producer */
    char *trusted_sources;      /* RADPIPE_INDEX_TRUSTED_SOURCES: comma-separated */
    char *spool_watch_dir;      /* RADPIPE_SPOOL_WATCH_DIR: "" = no spool watcher */
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
    /* routing rules and completion settings (idx_rules.h): NULL = the built-in default;
     * owned by whoever set them (main, tests: idx_rules_free after idx_release); a SIGHUP
     * reload (reload set) replaces them from rules_path on the consuming thread */
    struct idx_rules *rules;
    const char *rules_path; /* RADPIPE_RULES_FILE, borrowed; NULL or "" when unset */
    atomic_int *reload;     /* borrowed (lc_service.reload); NULL: never reloads */
    lc_counter *m_inserted, *m_replaced, *m_duplicate, *m_quarantined, *m_completed;
    lc_histogram *m_batch;
    /* ingest (idx_ingest.c): the parse pool and its metrics */
    struct idx_pool *pool;           /* owned; without helpers on a single CPU */
    lc_counter *m_parse_failures;    /* files that are not readable DICOM */
    lc_histogram *m_batch_size;      /* messages per batch */
    lc_histogram *m_stage_queue;     /* event time to the start of its batch */
    lc_histogram *m_stage_load;      /* read, hash and parse of a batch's objects */
    lc_histogram *m_stage_write;     /* the batch transaction */
    lc_histogram *m_event_to_commit; /* event time to the committed row, per instance */
    lc_gauge *m_lag_seconds;         /* now - broker timestamp of the batch's newest message */
} idx_ctx;

/* Fill x; db, store, prefix and source are borrowed and must outlive it; metrics may be NULL
 * (no metrics). cfg is copied. */
lc_rc idx_init(idx_ctx *x, lc_db *db, lc_store *store, const char *prefix, const char *source,
               const idx_cfg *cfg, lc_metrics *metrics, lc_err *err);
void idx_release(idx_ctx *x);

/* Whether events from CloudEvents source `source` have their sha256 claim taken rather than
 * the object hashed again (RADPIPE_INDEX_VERIFY_SHA256, RADPIPE_INDEX_TRUSTED_SOURCES). */
int idx_source_trusted(const idx_cfg *cfg, const char *source);

/* The instance.stored batch handler (idx_route_batch calls it). Poison messages are
 * quarantined; LC_OK once the whole batch is committed in one transaction, which also records
 * which source sent each study (sources: a JSON array of {ord, study_uid, kind, name}, NULL
 * for none); an error (store or database unreachable) leaves nothing behind, so the batch can
 * be redelivered. */
lc_rc idx_handle_batch(idx_ctx *x, const lc_kafka_msg *msgs, size_t n, const char *sources,
                       lc_err *err);

/* The lc_kafka_batch_fn of the indexer's consumer (ctx: idx_ctx), subscribed to
 * instance.stored and study.close: instance.stored messages go to idx_handle_batch, whose
 * transaction also records the studies' sources (instance.stored data.source), then
 * one transaction applies the study.close events (idx_close.c). */
lc_rc idx_route_batch(void *ctx, const lc_kafka_msg *msgs, size_t n, lc_err *err);

/* The consumer's tick (ctx: idx_ctx): a pending SIGHUP reload of the rules, then study
 * completion about once a second. */
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
    lc_dicom_header *h; /* owned when READY (with the DICOM JSON) */
    char sha256[65];
    long long size;
    idx_state state;
    idx_result result; /* set by the transaction (reset on each attempt) */
    char reason[320];  /* IDX_QUARANTINE */
    char *qkey;        /* owned: where the quarantined bytes were kept, NULL when nowhere */
    int parse_failed;  /* the object is not readable DICOM (a parse failure, for the metric) */
    int deferred;      /* its SOPInstanceUID repeats in the batch: written after every load */
    int64_t event_ms;  /* event time (CloudEvents time, else the broker's timestamp); -1 */
    lc_rc load_rc;     /* a transient failure of the load step (the batch is redelivered) */
    char load_err[256];
} idx_item;

/* A batch for idx_db_write. The objects are loaded on x->pool (a started run over items,
 * idx_pool_start) while the write goes on: it waits for each chunk of items before it writes
 * them. */
typedef struct idx_write {
    idx_ctx *x;
    idx_item *items;
    size_t n;
    const char *sources; /* JSON rows for the studies' sources, NULL when none */
    int64_t loaded_ms;   /* out: lc_now_ms() when every object of the batch was loaded */
    lc_rc load_rc;       /* out: a transient failure of the load step (the batch is redelivered) */
    char load_err[256];
} idx_write;

/* Mark items whose event id is already in processed_events as IDX_SKIP (one query). */
lc_rc idx_db_mark_processed(lc_db *db, idx_item *items, size_t n, lc_err *err);
/* The lc_db_tx_fn writing a batch (ctx: idx_write): processed_events, then patients,
 * studies, series, instances and their DICOM JSON chunk by chunk as the objects are loaded,
 * then quarantine and DLQ rows, the counts of the studies that changed and the studies'
 * sources (w->sources). Sets each item's result; safe to run again after a rollback. A transient
 * load failure ends it with LC_ERR_CANCELLED and w->load_rc set. */
lc_rc idx_db_write(lc_db *db, void *ctx, lc_err *err);

/* A DICOM DA value as the index stores it: "YYYYMMDD" (an old "YYYY.MM.DD" loses its dots);
 * NULL for anything else. Caller frees. */
char *idx_norm_date(const char *s);
/* A DICOM TM value as the index stores it: HH[MM[SS[.F{1,6}]]] (old "HH:MM:SS" loses its
 * colons); NULL for anything else. Caller frees. */
char *idx_norm_time(const char *s);

/* Keep the bytes of a poison input under quarantine/ in the store: the object (copied from
 * src_path when given) or buf, plus "<key>.json" with the reason and where it came from. The
 * key is derived from origin (stable, so a redelivery overwrites rather than adds). move: src
 * may be renamed into place (spool files). *key (caller frees) gets the object's key. */
lc_rc idx_quarantine_put(lc_store *store, const char *origin, const char *src_path, int move,
                         const void *buf, size_t len, const char *reason, const char *event_id,
                         char **key, lc_err *err);

/* --- the parse pool (idx_pool.c) ------------------------------------------------------- */

typedef struct idx_pool idx_pool;
/* threads helpers (besides the caller); 0: a pool whose runs happen on the caller alone. */
lc_rc idx_pool_new(int threads, idx_pool **out, lc_err *err);
/* Finishes a started run first. Accepts NULL. */
void idx_pool_free(idx_pool *p);
/* Run fn(ctx, i) for every i in [0, n) on the pool's threads and the calling thread; returns
 * once all are done. p may be NULL (everything on the caller). */
void idx_pool_run(idx_pool *p, size_t n, void (*fn)(void *ctx, size_t i), void *ctx);
/* Start fn(ctx, i) for every i in [0, n) on the pool's threads (in index order) and return
 * at once; idx_pool_wait and idx_pool_finish follow, on the same thread. fn and ctx must stay
 * valid until idx_pool_finish returns. */
void idx_pool_start(idx_pool *p, size_t n, void (*fn)(void *ctx, size_t i), void *ctx);
/* Return once fn(ctx, i) has returned for every i in [from, to) of the started run; the
 * caller runs indices below `to` that no helper took yet. No-op without a started run. */
void idx_pool_wait(idx_pool *p, size_t from, size_t to);
/* Wait for the whole started run and end it (the next run may start). Accepts NULL and no
 * started run. */
void idx_pool_finish(idx_pool *p);

/* --- the spool watcher (idx_spool.c) --------------------------------------------------- */

typedef struct idx_spool idx_spool;
/* Watch dir (inotify) on a thread of its own with its own database connection: every finished
 * file is stored in the object store under instances/<study>/<series>/<sop>.dcm and announced
 * by an instance.stored event through the outbox (source {"kind":"spool","name":<first path
 * component below dir, else "spool">}), then removed; a file that is not DICOM goes to the
 * quarantine. Files already there at start are taken too. store, prefix, source, metrics and
 * stop are borrowed and must outlive the watcher. */
lc_rc idx_spool_start(const char *dir, const char *db_url, lc_store *store, const char *prefix,
                      const char *source, lc_metrics *metrics, const atomic_int *stop,
                      idx_spool **out, lc_err *err);
/* Finish the file in hand, stop the thread and free. Accepts NULL. */
void idx_spool_stop(idx_spool *sp);
/* Process what is in the folder now (and what inotify reported), on the calling thread;
 * returns how many files were handled. For tests; the thread must not be running. */
lc_rc idx_spool_poll(idx_spool *sp, int *handled, lc_err *err);
/* A watcher without its thread, for idx_spool_poll. */
lc_rc idx_spool_open(const char *dir, const char *db_url, lc_store *store, const char *prefix,
                     const char *source, lc_metrics *metrics, const atomic_int *stop,
                     idx_spool **out, lc_err *err);

/* Replace every invalid UTF-8 sequence of s with '?' in place (PostgreSQL text must be valid
 * UTF-8, and one bad string must not turn a batch into a poison pill). NULL is fine. */
void idx_utf8_fix(char *s);

#endif
