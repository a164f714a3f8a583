/*
 * upl_run.h: one upload job in progress, shared by the planner (upl_job.c) and the copiers
 * (upl_copy.c). The job thread owns the run; copy threads read the plan and update only the
 * atomic counters and, under mu, the first error.
 */
#ifndef UPL_RUN_H
#define UPL_RUN_H

#include <stdatomic.h>
#include <pthread.h>
#include "upl.h"

typedef struct upl_inst {
    char *sop, *series, *store_key;
    char sha256[65];
    int64_t size;
} upl_inst;

/* Objects with the same destination and prefix share one manifest. */
typedef struct upl_group {
    upl_dest *dest; /* borrowed from the ctx cache */
    char *prefix;   /* "" or "a/b" (no slashes at the ends) */
    char *manifest_key;
    int listed; /* 1: its objects were listed, so one the listing lacks is missing */
} upl_group;

typedef struct upl_obj {
    int tar; /* 0: one instance; 1: a tar of members */
    upl_group *g;
    char *key;       /* full key in the destination */
    const char *rel; /* key relative to the group's prefix (points into key) */
    int64_t size;    /* bytes the object will hold */
    char digest[65]; /* what lc_store keeps with it: the SHA-256 of an instance, or of a
                      * tar's member list */
    char sha256[65]; /* the SHA-256 of the object's bytes once known */
    upl_inst **members;
    char **names; /* tar member names */
    size_t nmembers;
    int skipped; /* already in place with the same digest */
    int listed;  /* the destination's listing holds the key, with listed_size bytes */
    int64_t listed_size;
} upl_obj;

typedef struct upl_run {
    upl_ctx *u;
    lc_worker_job *j;
    const char *layout;
    upl_inst *insts;
    size_t ninsts;
    upl_group *groups;
    size_t ngroups;
    upl_obj *objs;
    size_t nobjs;
    int64_t bytes_total;
    atomic_llong bytes_done;
    atomic_llong sent; /* for the rate limit, since t0_ms */
    int64_t t0_ms;
    int64_t last_progress_ms;
    atomic_int cancel; /* set by the job thread when the job must stop */
    atomic_int failed;
    atomic_int written, skipped;
    atomic_size_t next; /* next object for the copy threads */
    size_t *small;      /* indexes of objects the copy threads take */
    size_t nsmall;
    pthread_mutex_t mu;
    lc_err ferr; /* the first failure, under mu */
} upl_run;

/* List each remote destination prefix once, so objects the destination lacks are sent
 * without a HEAD each (a re-run still compares the digests of those it holds). */
void upl_list_existing(upl_run *r);
/* Copy threads: take objects from r->small until none is left, the run failed or stops. */
void *upl_copy_thread(void *arg);
/* On the job thread: one object through a (resumable) writer. */
lc_rc upl_copy_streamed(upl_run *r, upl_obj *o, lc_err *err);
/* On the job thread: stop flag, progress events (at most one a second unless force). */
int upl_run_should_stop(upl_run *r);
void upl_run_progress(upl_run *r, int force);
/* Record the first failure of a copy thread. */
void upl_run_fail(upl_run *r, const lc_err *e);
/* The SHA-256 of a tar's bytes without sending it (for a manifest entry of a tar that was
 * already in place). */
lc_rc upl_tar_hash(upl_run *r, upl_obj *o, lc_err *err);

#endif
