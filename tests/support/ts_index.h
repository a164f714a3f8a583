/*
 * ts_index.h: put real DICOM files into a store and the index tables (studies, series,
 * instances) the way the indexer would, so worker tests (uploader, segmenter) do not depend
 * on the indexer's code. Also a claimed job to run a job function against.
 */
#ifndef TS_INDEX_H
#define TS_INDEX_H

#include "lc/db.h"
#include "lc/jobs.h"
#include "lc/store.h"

/* Parse path with lc_dicom, store it under instances/<study>/<series>/<sop>.dcm and upsert
 * its rows. Returns 0 on success; study_uid (may be NULL, room for 65) gets the study. */
int ts_index_file(lc_db *db, lc_store *store, const char *path, char *study_uid);
/* Every regular file of dir (not recursive), sorted by name; returns how many were indexed
 * or -1 on the first failure. */
int ts_index_dir(lc_db *db, lc_store *store, const char *dir, char *study_uid);
/* Create a job of kind for study_uid with params (JSON text, may be NULL) and claim it for w;
 * returns the claimed job or NULL. */
lc_job *ts_claimed_job(lc_db *db, const lc_job_worker *w, const char *kind, const char *study_uid,
                       const char *params_json);

/* The first column of the first row of sql (one optional $1 param): "" when there is no row
 * or it is NULL; NULL when the statement fails (its message on stderr). Caller frees. */
char *ts_db_value(lc_db *db, const char *sql, const char *param);
/* Poll ts_db_value every 20 ms until it equals want: 1 when it did within timeout_ms. */
int ts_db_wait_value(lc_db *db, const char *sql, const char *param, const char *want,
                     int timeout_ms);

#endif
