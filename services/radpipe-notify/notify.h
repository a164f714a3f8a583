/*
 * notify.h: radpipe-notify's internals, shared by main.c and the tests: options, and the run
 * that walks the given files and folders, stores each DICOM file in the object store and
 * produces its instance.stored event straight to Kafka. Single-threaded; the store and the
 * producer are borrowed.
 */
#ifndef NOTIFY_H
#define NOTIFY_H

#include <stddef.h>
#include <stdio.h>
#include "lc/kafka.h"
#include "lc/store.h"

typedef struct ntf_opts {
    const char *name;   /* data.source.name ("notify" when NULL) */
    const char *prefix; /* topic prefix */
    int move;           /* remove each file once its event is acknowledged */
    int dry_run;        /* parse and list only: nothing stored, nothing sent */
    size_t batch;       /* events per produce call (default 200) */
} ntf_opts;

typedef struct ntf_stats {
    long long published; /* stored and acknowledged by the broker */
    long long skipped;   /* not DICOM (or not readable as DICOM): left where they are */
    long long failed;    /* DICOM, but storing or producing failed */
} ntf_stats;

/* Walk paths (files, or folders recursively; names starting with '.' are skipped) in sorted
 * order and publish every DICOM file: stored under instances/<study>/<series>/<sop>.dcm,
 * then an instance.stored event (source {"kind":"notify","name":...}) produced with the
 * idempotent producer, waited for in batches. p may be NULL with dry_run. Returns LC_OK when
 * the walk itself worked (per-file outcomes are in *st); out lists each file's outcome as one
 * line when non-NULL. */
lc_rc ntf_run(char *const *paths, size_t npaths, const ntf_opts *o, lc_store *store,
              lc_kafka_producer *p, FILE *out, ntf_stats *st, lc_err *err);

#endif
