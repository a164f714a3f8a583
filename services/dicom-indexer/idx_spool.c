/*
 * idx_spool.c: the spool ingest path. A DICOM receiver (storescp) writes files into
 * RADPIPE_SPOOL_WATCH_DIR; this watcher (inotify: IN_CLOSE_WRITE, IN_MOVED_TO, new folders;
 * plus a scan at start and after an event overflow) copies each finished file into the object
 * store under instances/<study>/<series>/<sop>.dcm, writes its instance.stored event through
 * the outbox, and only after that commit removes the file, so a crash at any point leaves the
 * file to be taken again (the indexer sees the same bytes as a duplicate). Files that are not
 * DICOM go to the quarantine (bytes under quarantine/, a quarantine row, a dlq event).
 * The first path component below the folder names the source (storescp's calling AE title
 * when the receiver sorts by it), else "spool". Names starting with '.' are ignored (writers
 * may stage there). One thread of its own with its own database connection; the store and
 * metrics it borrows are thread-safe.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>
#include "idx.h"
#include "lc/log.h"
#include "lc/outbox.h"
#include "lc/util.h"

#define ROUND_MAX   256  /* files handled per transaction */
#define SETTLE_MS   2000 /* a scanned file untouched this long is finished */
#define MAX_DEPTH   8    /* folder levels watched below the spool folder */
#define TX_ATTEMPTS 3

typedef struct watch {
    int wd;
    char *rel; /* "" for the spool folder itself */
} watch;

typedef struct pending {
    char *rel;          /* path below the spool folder */
    int64_t not_before; /* lc_now_ms(); 0: take it now */
    int from_scan;      /* found by a scan: only taken once it has settled */
} pending;

struct idx_spool {
    char *dir;
    lc_db *db;
    lc_store *store;
    const char *prefix, *source;
    const atomic_int *stop;
    int ifd;
    watch *watches;
    size_t nwatch, capwatch;
    pending *q;
    size_t nq, capq;
    int rescan;
    pthread_t thread;
    int started;
    lc_counter *m_stored, *m_quarantined, *m_failed;
};

/* One file of a round. */
typedef struct sfile {
    char *rel, *path;
    lc_dicom_header *h;
    char *key;    /* store key (stored) or quarantine key */
    lc_event *ev; /* stored: its instance.stored event */
    char reason[320];
    int quarantined;
    long long size;
} sfile;

static void sfile_release(sfile *f)
{
    free(f->rel);
    free(f->path);
    lc_dicom_header_free(f->h);
    free(f->key);
    lc_event_free(f->ev);
    memset(f, 0, sizeof(*f));
}

/* 1 when some component of rel starts with '.' (a writer's staging name). */
static int hidden(const char *rel)
{
    for (const char *p = rel; *p; p++)
        if (*p == '.' && (p == rel || p[-1] == '/'))
            return 1;
    return 0;
}

/* Queue rel (once); returns its entry, NULL when hidden or out of memory (the next scan
 * finds it again). */
static pending *queue_add(idx_spool *sp, const char *rel, int from_scan)
{
    if (hidden(rel))
        return NULL;
    for (size_t i = 0; i < sp->nq; i++) {
        if (strcmp(sp->q[i].rel, rel) == 0) {
            if (!from_scan) { /* finished for sure: take it now */
                sp->q[i].from_scan = 0;
                sp->q[i].not_before = 0;
            }
            return &sp->q[i];
        }
    }
    if (sp->nq == sp->capq) {
        size_t cap = sp->capq ? 2 * sp->capq : 64;
        pending *nq = realloc(sp->q, cap * sizeof(*nq));
        if (!nq)
            return NULL;
        sp->q = nq;
        sp->capq = cap;
    }
    char *r = strdup(rel);
    if (!r)
        return NULL;
    sp->q[sp->nq] = (pending){r, 0, from_scan};
    return &sp->q[sp->nq++];
}

/* Put rel back for a later round. */
static void retry_later(idx_spool *sp, const char *rel)
{
    pending *p = queue_add(sp, rel, 0);
    if (p)
        p->not_before = lc_now_ms() + 1000;
}

static const char *watch_rel(const idx_spool *sp, int wd)
{
    for (size_t i = 0; i < sp->nwatch; i++)
        if (sp->watches[i].wd == wd)
            return sp->watches[i].rel;
    return NULL;
}

static void add_watch(idx_spool *sp, const char *rel)
{
    char *path = NULL;
    if (asprintf(&path, "%s%s%s", sp->dir, *rel ? "/" : "", rel) < 0)
        return;
    int wd = inotify_add_watch(sp->ifd, path,
                               IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_ONLYDIR |
                                   IN_DONT_FOLLOW | IN_EXCL_UNLINK);
    free(path);
    if (wd < 0) {
        lc_log_warn("could not watch a spool folder", LC_LS("folder", rel),
                    LC_LS("error", strerror(errno)));
        return;
    }
    if (watch_rel(sp, wd))
        return;
    if (sp->nwatch == sp->capwatch) {
        size_t cap = sp->capwatch ? 2 * sp->capwatch : 16;
        watch *nw = realloc(sp->watches, cap * sizeof(*nw));
        if (!nw)
            return;
        sp->watches = nw;
        sp->capwatch = cap;
    }
    char *r = strdup(rel);
    if (!r)
        return;
    sp->watches[sp->nwatch].wd = wd;
    sp->watches[sp->nwatch].rel = r; /* owned by the table: drop_watch and the stop free it */
    sp->nwatch++;
}

static void drop_watch(idx_spool *sp, int wd)
{
    for (size_t i = 0; i < sp->nwatch; i++) {
        if (sp->watches[i].wd == wd) {
            free(sp->watches[i].rel);
            sp->watches[i] = sp->watches[--sp->nwatch];
            return;
        }
    }
}

/* Watch rel and its folders, queue every file found. */
static void scan(idx_spool *sp, const char *rel, int depth)
{
    char *path = NULL;
    if (depth > MAX_DEPTH || asprintf(&path, "%s%s%s", sp->dir, *rel ? "/" : "", rel) < 0)
        return;
    add_watch(sp, rel); /* before listing: nothing written from now on is missed */
    DIR *d = opendir(path);
    free(path);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char *sub = NULL;
        if (asprintf(&sub, "%s%s%s", rel, *rel ? "/" : "", e->d_name) < 0)
            continue;
        struct stat st;
        char *full = NULL;
        if (asprintf(&full, "%s/%s", sp->dir, sub) >= 0 && lstat(full, &st) == 0) {
            if (S_ISDIR(st.st_mode))
                scan(sp, sub, depth + 1);
            else if (S_ISREG(st.st_mode))
                queue_add(sp, sub, 1);
        }
        free(full);
        free(sub);
    }
    closedir(d);
}

/* Read what inotify has (non-blocking). */
static void read_events(idx_spool *sp)
{
    char buf[16384] __attribute__((aligned(__alignof__(struct inotify_event))));
    for (;;) {
        ssize_t n = read(sp->ifd, buf, sizeof(buf));
        if (n <= 0)
            return;
        for (char *p = buf; p < buf + n;) {
            const struct inotify_event *ev = (const struct inotify_event *)p;
            p += sizeof(*ev) + ev->len;
            if (ev->mask & IN_Q_OVERFLOW) {
                sp->rescan = 1;
                continue;
            }
            if (ev->mask & IN_IGNORED) {
                drop_watch(sp, ev->wd);
                continue;
            }
            const char *dir = watch_rel(sp, ev->wd);
            if (!dir || ev->len == 0 || ev->name[0] == '.')
                continue;
            char *rel = NULL;
            if (asprintf(&rel, "%s%s%s", dir, *dir ? "/" : "", ev->name) < 0)
                continue;
            if (ev->mask & IN_ISDIR) {
                if (ev->mask & (IN_CREATE | IN_MOVED_TO)) {
                    int depth = 1;
                    for (const char *c = rel; *c; c++)
                        depth += *c == '/';
                    scan(sp, rel, depth); /* files may be in it already */
                }
            } else if (ev->mask & (IN_CLOSE_WRITE | IN_MOVED_TO)) {
                queue_add(sp, rel, 0);
            }
            free(rel);
        }
    }
}

/* The source name: the first path component when the file is in a folder, else "spool". */
static char *source_name(const char *rel)
{
    const char *slash = strchr(rel, '/');
    return slash ? strndup(rel, (size_t)(slash - rel)) : strdup("spool");
}

static lc_rc make_event(const idx_spool *sp, const sfile *f, lc_event **out, lc_err *err)
{
    const lc_dicom_header *h = f->h;
    char *name = source_name(f->rel), when[32];
    if (!name)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    idx_utf8_fix(name);
    lc_time_rfc3339(lc_wall_ms(), when);
    const lc_instance_stored s = {.study_uid = h->study_instance_uid,
                                  .series_uid = h->series_instance_uid,
                                  .sop_uid = h->sop_instance_uid,
                                  .sop_class_uid = h->sop_class_uid,
                                  .store_url = lc_store_url(sp->store),
                                  .key = f->key,
                                  .size = h->file_size,
                                  .sha256 = h->sha256,
                                  .source_kind = "spool",
                                  .source_name = name,
                                  .received_at = when};
    lc_rc rc = lc_event_instance_stored(sp->source, &s, out, err);
    free(name);
    return rc;
}

/* Read one file and put it (or its quarantine copy) in the store. LC_OK: f is ready for the
 * transaction (or f->path is NULL: gone, nothing to do); an error: leave it for later. */
static lc_rc take_file(idx_spool *sp, sfile *f, lc_err *err)
{
    lc_err e = {0};
    struct stat st;
    if (lstat(f->path, &st) != 0) {
        free(f->path);
        f->path = NULL; /* gone (taken by another watcher, or removed) */
        return LC_OK;
    }
    lc_rc rc = S_ISREG(st.st_mode) ? lc_dicom_read_header_ex(f->path, LC_DICOM_SHA256, &f->h, &e)
                                   : lc_err_set(&e, LC_ERR_IO, "not a regular file");
    if (rc == LC_ERR_NOT_FOUND) {
        free(f->path);
        f->path = NULL;
        return LC_OK;
    }
    if (rc == LC_OK) {
        const lc_dicom_header *h = f->h;
        f->size = h->file_size;
        if (asprintf(&f->key, "instances/%s/%s/%s.dcm", h->study_instance_uid,
                     h->series_instance_uid, h->sop_instance_uid) < 0) {
            f->key = NULL;
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        }
        if ((rc = lc_store_put_file(sp->store, f->key, f->path, 0, err)) != LC_OK)
            return rc;
        return make_event(sp, f, &f->ev, err);
    }
    if (rc == LC_ERR_NOMEM)
        return lc_err_set(err, rc, "%s", lc_err_msg(&e));
    /* not DICOM (or not readable as a file): keep the bytes under quarantine/ */
    snprintf(f->reason, sizeof(f->reason), "not a readable DICOM file: %s", lc_err_msg(&e));
    idx_utf8_fix(f->reason);
    f->quarantined = 1;
    f->size = (long long)st.st_size;
    char sha[65] = "", *origin = NULL;
    if (S_ISREG(st.st_mode))
        lc_sha256_file_hex(f->path, sha, NULL, NULL);
    if (asprintf(&origin, "spool:%s:%s", f->rel, sha) < 0)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    rc = idx_quarantine_put(sp->store, origin, S_ISREG(st.st_mode) ? f->path : NULL, 0, NULL, 0,
                            f->reason, NULL, &f->key, err);
    free(origin);
    return rc;
}

typedef struct round_tx {
    idx_spool *sp;
    sfile *files;
    size_t n;
} round_tx;

static const char quarantine_sql[] =
    "INSERT INTO quarantine (source, store_key, reason, event_id) VALUES ($1, $2, $3, NULL)";

static lc_rc round_write(lc_db *db, void *arg, lc_err *err)
{
    round_tx *t = arg;
    lc_rc rc = LC_OK;
    for (size_t i = 0; i < t->n && rc == LC_OK; i++) {
        sfile *f = &t->files[i];
        if (!f->path)
            continue;
        if (!f->quarantined) {
            rc = lc_outbox_add_event(db, t->sp->prefix, LC_TOPIC_INSTANCE_STORED, f->ev, err);
            continue;
        }
        char *src = NULL, *payload = NULL;
        cJSON *j = cJSON_CreateObject();
        if (asprintf(&src, "spool:%s", f->rel) < 0)
            src = NULL;
        if (j) {
            cJSON_AddStringToObject(j, "spool_path", f->rel);
            cJSON_AddStringToObject(j, "quarantine_key", f->key);
            cJSON_AddNumberToObject(j, "size", (double)f->size);
            payload = cJSON_PrintUnformatted(j);
            cJSON_Delete(j);
        }
        if (!src || !payload) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        } else {
            idx_utf8_fix(src);
            const char *p[3] = {src, f->key, f->reason};
            rc = lc_db_exec(db, quarantine_sql, 3, p, NULL, err);
            if (rc == LC_OK)
                rc = lc_outbox_add_dlq(db, t->sp->prefix, IDX_SERVICE, "spool", 0, 0, NULL, 0,
                                       payload, strlen(payload), f->reason, err);
        }
        free(src);
        free(payload);
    }
    return rc;
}

/* One round over the due files: take each, one transaction for all, then remove them. */
static lc_rc run_round(idx_spool *sp, int *handled, lc_err *err)
{
    const int64_t now = lc_now_ms();
    sfile *files = calloc(ROUND_MAX, sizeof(*files));
    size_t n = 0;
    lc_rc rc = LC_OK;
    if (!files)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < sp->nq && n < ROUND_MAX;) {
        pending *p = &sp->q[i];
        if (p->not_before > now) {
            i++;
            continue;
        }
        char *path = NULL;
        if (asprintf(&path, "%s/%s", sp->dir, p->rel) < 0)
            break;
        struct stat st;
        if (p->from_scan && stat(path, &st) == 0 &&
            lc_wall_ms() - ((int64_t)st.st_mtim.tv_sec * 1000 + st.st_mtim.tv_nsec / 1000000) <
                SETTLE_MS) {
            p->not_before = now + SETTLE_MS / 2; /* maybe still being written: look again */
            free(path);
            i++;
            continue;
        }
        files[n].rel = p->rel;
        files[n].path = path;
        n++;
        sp->q[i] = sp->q[--sp->nq]; /* the entry's rel now belongs to files[n - 1] */
    }
    size_t ok = 0;
    for (size_t i = 0; i < n; i++) {
        lc_err e = {0};
        lc_rc r = take_file(sp, &files[i], &e);
        if (r != LC_OK) {
            lc_log_warn("could not take a spool file, will retry", LC_LS("file", files[i].rel),
                        LC_LS("error", lc_err_msg(&e)));
            lc_counter_inc(sp->m_failed);
            retry_later(sp, files[i].rel);
            free(files[i].path);
            files[i].path = NULL;
            continue;
        }
        ok++;
    }
    if (ok > 0) {
        round_tx t = {sp, files, n};
        if ((rc = lc_db_ensure(sp->db, err)) == LC_OK)
            rc = lc_db_tx(sp->db, TX_ATTEMPTS, round_write, &t, err);
        if (rc != LC_OK) {
            lc_err_wrap(err, "could not announce %zu spool files", ok);
            for (size_t i = 0; i < n; i++) {
                if (files[i].path)
                    retry_later(sp, files[i].rel);
            }
        } else {
            for (size_t i = 0; i < n; i++) {
                sfile *f = &files[i];
                if (!f->path)
                    continue;
                if (unlink(f->path) != 0 && errno != ENOENT)
                    lc_log_warn("could not remove a spool file", LC_LS("file", f->rel),
                                LC_LS("error", strerror(errno)));
                if (f->quarantined) {
                    lc_counter_inc(sp->m_quarantined);
                    lc_log_warn("quarantined a spool file", LC_LS("file", f->rel),
                                LC_LS("reason", f->reason), LC_LS("quarantine_key", f->key));
                } else {
                    lc_counter_inc(sp->m_stored);
                }
                if (handled)
                    (*handled)++;
            }
        }
    }
    for (size_t i = 0; i < n; i++)
        sfile_release(&files[i]);
    free(files);
    return rc;
}

lc_rc idx_spool_poll(idx_spool *sp, int *handled, lc_err *err)
{
    if (handled)
        *handled = 0;
    read_events(sp);
    if (sp->rescan) {
        sp->rescan = 0;
        scan(sp, "", 0);
    }
    lc_rc rc = LC_OK;
    while (rc == LC_OK && sp->nq > 0 && !(sp->stop && atomic_load(sp->stop))) {
        int before = handled ? *handled : 0;
        size_t due = 0;
        const int64_t now = lc_now_ms();
        for (size_t i = 0; i < sp->nq; i++)
            due += sp->q[i].not_before <= now;
        if (due == 0)
            break;
        rc = run_round(sp, handled, err);
        if (handled && *handled == before)
            break; /* nothing taken (all settling or failing): wait for the next poll */
    }
    return rc;
}

static void *spool_main(void *arg)
{
    idx_spool *sp = arg;
    int64_t backoff_until = 0;
    while (!atomic_load(sp->stop)) {
        struct pollfd pfd = {.fd = sp->ifd, .events = POLLIN};
        poll(&pfd, 1, 500);
        if (atomic_load(sp->stop))
            break;
        if (lc_now_ms() < backoff_until)
            continue;
        lc_err err = {0};
        int n = 0;
        if (idx_spool_poll(sp, &n, &err) != LC_OK) {
            lc_log_error("spool round failed, retrying", LC_LS("error", lc_err_msg(&err)));
            backoff_until = lc_now_ms() + 2000;
        } else if (n > 0) {
            lc_log_info("spool files taken", LC_LI("count", n));
        }
    }
    return NULL;
}

lc_rc idx_spool_open(const char *dir, const char *db_url, lc_store *store, const char *prefix,
                     const char *source, lc_metrics *metrics, const atomic_int *stop,
                     idx_spool **out, lc_err *err)
{
    *out = NULL;
    lc_rc rc;
    idx_spool *sp = calloc(1, sizeof(*sp));
    if (!sp)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    sp->ifd = -1;
    sp->store = store;
    sp->prefix = prefix;
    sp->source = source;
    sp->stop = stop;
    sp->rescan = 1;
    if ((rc = lc_mkdirs(dir, 0755, err)) != LC_OK)
        goto fail;
    if (!(sp->dir = realpath(dir, NULL))) {
        rc = lc_err_set(err, LC_ERR_IO, "could not resolve the spool folder \"%s\": %s", dir,
                        strerror(errno));
        goto fail;
    }
    if ((sp->ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC)) < 0) {
        rc = lc_err_set(err, LC_ERR_IO, "could not start inotify: %s", strerror(errno));
        goto fail;
    }
    if ((rc = lc_db_connect(db_url, 30000, stop, &sp->db, err)) != LC_OK)
        goto fail;
    if (metrics) {
        static const char help[] = "files taken from the spool folder, by result";
        sp->m_stored = lc_metrics_counter(metrics, "radpipe_indexer_spool_files_total", help,
                                          "result=\"stored\"");
        sp->m_quarantined = lc_metrics_counter(metrics, "radpipe_indexer_spool_files_total", help,
                                               "result=\"quarantined\"");
        sp->m_failed = lc_metrics_counter(metrics, "radpipe_indexer_spool_files_total", help,
                                          "result=\"retried\"");
    }
    *out = sp;
    return LC_OK;
fail:
    idx_spool_stop(sp);
    return rc;
}

lc_rc idx_spool_start(const char *dir, const char *db_url, lc_store *store, const char *prefix,
                      const char *source, lc_metrics *metrics, const atomic_int *stop,
                      idx_spool **out, lc_err *err)
{
    idx_spool *sp = NULL;
    lc_rc rc = idx_spool_open(dir, db_url, store, prefix, source, metrics, stop, &sp, err);
    if (rc != LC_OK)
        return rc;
    if (pthread_create(&sp->thread, NULL, spool_main, sp) != 0) {
        idx_spool_stop(sp);
        return lc_err_set(err, LC_ERR_INTERNAL, "could not start the spool watcher thread");
    }
    sp->started = 1;
    lc_log_info("watching the spool folder", LC_LS("folder", sp->dir));
    *out = sp;
    return LC_OK;
}

void idx_spool_stop(idx_spool *sp)
{
    if (!sp)
        return;
    if (sp->started)
        pthread_join(sp->thread, NULL); /* it watches *stop, which the caller has set */
    if (sp->ifd >= 0)
        close(sp->ifd);
    for (size_t i = 0; i < sp->nwatch; i++)
        free(sp->watches[i].rel);
    free(sp->watches);
    for (size_t i = 0; i < sp->nq; i++)
        free(sp->q[i].rel);
    free(sp->q);
    lc_db_free(sp->db);
    free(sp->dir);
    free(sp);
}
