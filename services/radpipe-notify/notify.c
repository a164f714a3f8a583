/*
 * notify.c: radpipe-notify's run: walk files and folders, store each DICOM file in the object
 * store (key by UIDs, as the gateway and the spool watcher do) and produce its instance.stored
 * event directly to Kafka (radpipe-notify has no database, so no outbox: the idempotent
 * producer and a wait for every delivery report give the same at-least-once delivery; a file
 * is removed with --move only after its event was acknowledged). Single-threaded.
 */
#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "lc/dicom.h"
#include "lc/event.h"
#include "lc/log.h"
#include "lc/util.h"
#include "notify.h"

#define PRODUCE_TIMEOUT_MS 30000
#define MAX_DEPTH          32

typedef struct flist {
    char **v;
    size_t n, cap;
} flist;

static int fl_add(flist *l, const char *path)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        char **nv = realloc(l->v, cap * sizeof(*nv));
        if (!nv)
            return -1;
        l->v = nv;
        l->cap = cap;
    }
    if (!(l->v[l->n] = strdup(path)))
        return -1;
    l->n++;
    return 0;
}

static void fl_free(flist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Regular files under path (path itself when it is one), names starting with '.' skipped. */
static lc_rc walk(const char *path, int depth, flist *out, lc_err *err)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return lc_err_set(err, errno == ENOENT ? LC_ERR_NOT_FOUND : LC_ERR_IO,
                          "could not read \"%s\": %s", path, strerror(errno));
    if (S_ISREG(st.st_mode))
        return fl_add(out, path) == 0 ? LC_OK : lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    if (!S_ISDIR(st.st_mode) || depth > MAX_DEPTH)
        return LC_OK;
    DIR *d = opendir(path);
    if (!d)
        return lc_err_set(err, LC_ERR_IO, "could not list \"%s\": %s", path, strerror(errno));
    lc_rc rc = LC_OK;
    struct dirent *e;
    while (rc == LC_OK && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char *sub = NULL;
        if (asprintf(&sub, "%s/%s", path, e->d_name) < 0) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
            break;
        }
        rc = walk(sub, depth + 1, out, err);
        free(sub);
    }
    closedir(d);
    return rc;
}

/* One file of a batch. */
typedef struct nfile {
    const char *path; /* borrowed from the list */
    lc_dicom_header *h;
    char *key, *json;
    int ok; /* stored, event built */
} nfile;

static lc_rc event_json(const ntf_opts *o, lc_store *store, nfile *f, lc_err *err)
{
    const lc_dicom_header *h = f->h;
    char when[32];
    lc_event *ev = NULL;
    lc_time_rfc3339(lc_wall_ms(), when);
    const lc_instance_stored s = {.study_uid = h->study_instance_uid,
                                  .series_uid = h->series_instance_uid,
                                  .sop_uid = h->sop_instance_uid,
                                  .sop_class_uid = h->sop_class_uid,
                                  .store_url = store ? lc_store_url(store) : "file://dry-run",
                                  .key = f->key,
                                  .size = h->file_size,
                                  .sha256 = h->sha256,
                                  .source_kind = "notify",
                                  .source_name = o->name ? o->name : "notify",
                                  .received_at = when};
    lc_rc rc = lc_event_instance_stored("/radpipe/radpipe-notify", &s, &ev, err);
    if (rc != LC_OK)
        return rc;
    f->json = lc_event_to_json(ev);
    lc_event_free(ev);
    return f->json ? LC_OK : lc_err_set(err, LC_ERR_NOMEM, "out of memory");
}

/* Parse and store one file; f->ok when its event is ready. Per-file problems are reported on
 * out and counted; only allocation failures return an error. */
static lc_rc take(const ntf_opts *o, lc_store *store, nfile *f, FILE *out, ntf_stats *st,
                  lc_err *err)
{
    lc_err e = {0};
    lc_rc rc = lc_dicom_read_header_ex(f->path, LC_DICOM_SHA256, &f->h, &e);
    if (rc == LC_ERR_NOMEM)
        return lc_err_set(err, rc, "%s", lc_err_msg(&e));
    if (rc != LC_OK) {
        st->skipped++;
        if (out)
            fprintf(out, "skipped %s: %s\n", f->path, lc_err_msg(&e));
        return LC_OK;
    }
    const lc_dicom_header *h = f->h;
    if (asprintf(&f->key, "instances/%s/%s/%s.dcm", h->study_instance_uid, h->series_instance_uid,
                 h->sop_instance_uid) < 0) {
        f->key = NULL;
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    if (!o->dry_run && (rc = lc_store_put_file(store, f->key, f->path, 0, &e)) != LC_OK) {
        st->failed++;
        if (out)
            fprintf(out, "failed %s: %s\n", f->path, lc_err_msg(&e));
        return LC_OK;
    }
    if ((rc = event_json(o, store, f, err)) != LC_OK)
        return rc;
    f->ok = 1;
    return LC_OK;
}

/* Produce the events of files[0, n) and wait for the broker; count and report. */
static lc_rc publish(const ntf_opts *o, lc_kafka_producer *p, const char *topic, nfile *files,
                     size_t n, FILE *out, ntf_stats *st, lc_err *err)
{
    lc_kafka_out *msgs = calloc(n ? n : 1, sizeof(*msgs));
    size_t *which = calloc(n ? n : 1, sizeof(*which));
    size_t m = 0;
    if (!msgs || !which) {
        free(msgs);
        free(which);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        if (!files[i].ok)
            continue;
        msgs[m] = (lc_kafka_out){.topic = topic,
                                 .key = files[i].h->study_instance_uid,
                                 .key_len = strlen(files[i].h->study_instance_uid),
                                 .payload = files[i].json,
                                 .len = strlen(files[i].json),
                                 .content_type = "application/cloudevents+json"};
        which[m++] = i;
    }
    if (m > 0 && !o->dry_run) {
        lc_err e = {0};
        lc_kafka_produce_batch(p, msgs, m, PRODUCE_TIMEOUT_MS, &e); /* per message: msgs[].rc */
    }
    for (size_t k = 0; k < m; k++) {
        nfile *f = &files[which[k]];
        if (!o->dry_run && msgs[k].rc != LC_OK) {
            st->failed++;
            if (out)
                fprintf(out, "failed %s: event not acknowledged (%s)\n", f->path,
                        lc_strerror(msgs[k].rc));
            continue;
        }
        st->published++;
        if (out)
            fprintf(out, "%s %s -> %s\n", o->dry_run ? "would publish" : "published", f->path,
                    f->key);
        if (o->move && !o->dry_run && unlink(f->path) != 0 && out)
            fprintf(out, "warning: could not remove %s: %s\n", f->path, strerror(errno));
    }
    free(msgs);
    free(which);
    return LC_OK;
}

lc_rc ntf_run(char *const *paths, size_t npaths, const ntf_opts *o, lc_store *store,
              lc_kafka_producer *p, FILE *out, ntf_stats *st, lc_err *err)
{
    flist files = {0};
    char topic[256];
    lc_rc rc = LC_OK;
    const size_t batch = o->batch ? o->batch : 200;
    nfile *b = calloc(batch, sizeof(*b));
    memset(st, 0, sizeof(*st));
    if (!b)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    if (lc_topic_name(o->prefix, LC_TOPIC_INSTANCE_STORED, topic, sizeof(topic)) != LC_OK) {
        rc = lc_err_set(err, LC_ERR_CONFIG, "invalid topic prefix \"%s\"", o->prefix);
        goto out;
    }
    for (size_t i = 0; i < npaths && rc == LC_OK; i++)
        rc = walk(paths[i], 0, &files, err);
    if (rc != LC_OK)
        goto out;
    if (files.n)
        qsort(files.v, files.n, sizeof(char *), cmp_str);
    for (size_t start = 0; start < files.n && rc == LC_OK; start += batch) {
        size_t n = files.n - start < batch ? files.n - start : batch;
        for (size_t i = 0; i < n && rc == LC_OK; i++) {
            b[i].path = files.v[start + i];
            rc = take(o, store, &b[i], out, st, err);
        }
        if (rc == LC_OK)
            rc = publish(o, p, topic, b, n, out, st, err);
        for (size_t i = 0; i < n; i++) {
            lc_dicom_header_free(b[i].h);
            free(b[i].key);
            free(b[i].json);
            memset(&b[i], 0, sizeof(b[i]));
        }
    }
out:
    free(b);
    fl_free(&files);
    return rc;
}
