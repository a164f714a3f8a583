/*
 * post_load.c: an HTTP load client for the stack benchmarks: POSTs the files of a gen_ct
 * manifest (first column) to one URL from C concurrent clients, each a libcurl handle that
 * keeps its connection alive. One file per request as application/dicom (Orthanc's
 * POST /instances, radpipe's POST /api/v1/instances), or --stow K: K files per request as a
 * STOW-RS multipart/related; type="application/dicom" body. Every answer must be a 2xx (STOW:
 * 200, all stored). Prints "requests=R files=F failed=X seconds=S files_per_s=V" with the time
 * from the first request sent to the last answer. Each client thread owns its handle.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <curl/curl.h>
#include "lc/log.h"
#include "lc/util.h"

#define MAX_CLIENTS   64
#define MAX_HEADERS   8
#define MAX_FILE      (256 * 1024 * 1024)
#define MAX_MANIFEST  (256 * 1024 * 1024)
#define ERR_KEEP      2048
#define BOUNDARY      "radpipe-bench-7d1f0c2e9a"
#define MAX_PARTS     1000
#define UPLOAD_BUFFER (512 * 1024)

/* A piece of a request body: a mapped file or a multipart delimiter. */
typedef struct seg {
    const char *p;
    size_t len;
} seg;

typedef struct load {
    const char *url;
    char **files; /* borrowed from the manifest text */
    seg *maps;    /* files[i] mapped */
    size_t nfiles;
    int per_request; /* 0: one raw file per request; K: STOW-RS with K parts */
    const char *headers[MAX_HEADERS];
    int nheaders;
    const char *userpwd; /* basic auth, may be NULL */
    atomic_size_t next;  /* the next file to send */
    atomic_long requests, failed;
    pthread_mutex_t mu; /* guards first_error */
    char first_error[ERR_KEEP];
} load;

typedef struct body {
    char *p;
    size_t len, cap;
} body;

/* Room for n more bytes in b. */
static int b_reserve(body *b, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np)
            return -1;
        b->p = np;
        b->cap = cap;
    }
    return 0;
}

static int b_add(body *b, const void *p, size_t n)
{
    if (b_reserve(b, n) != 0)
        return -1;
    if (n)
        memcpy(b->p + b->len, p, n);
    b->len += n;
    return 0;
}

/* Map every file of the manifest before the first request. The client's own work competes
 * for the CPU with the server it measures, so a request body is sent straight from the page
 * cache: libcurl's copy into its upload buffer is the only one (no read() copy per file). */
static int map_files(load *l)
{
    if (!(l->maps = calloc(l->nfiles, sizeof(*l->maps))))
        return -1;
    for (size_t i = 0; i < l->nfiles; i++) {
        struct stat st;
        int fd = open(l->files[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0 || fstat(fd, &st) != 0) {
            fprintf(stderr, "post_load: could not read \"%s\": %s\n", l->files[i], strerror(errno));
            if (fd >= 0)
                close(fd);
            return -1;
        }
        if (!S_ISREG(st.st_mode) || st.st_size > MAX_FILE) {
            fprintf(stderr, "post_load: \"%s\" is not a file of at most 256 MiB\n", l->files[i]);
            close(fd);
            return -1;
        }
        l->maps[i].len = (size_t)st.st_size;
        l->maps[i].p = "";
        if (st.st_size > 0) {
            void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
            if (m == MAP_FAILED) {
                fprintf(stderr, "post_load: could not map \"%s\": %s\n", l->files[i],
                        strerror(errno));
                close(fd);
                return -1;
            }
            (void)madvise(m, (size_t)st.st_size, MADV_SEQUENTIAL);
            l->maps[i].p = m;
        }
        close(fd);
    }
    return 0;
}

static void unmap_files(load *l)
{
    for (size_t i = 0; l->maps && i < l->nfiles; i++)
        if (l->maps[i].len > 0)
            munmap((void *)l->maps[i].p, l->maps[i].len);
    free(l->maps);
}

/* One request body as a list of pieces: multipart delimiters and mapped files. */
#define MAX_PIECES (2 * MAX_PARTS + 1)
typedef struct upload {
    seg piece[MAX_PIECES];
    int n;
    size_t total; /* bytes in all pieces */
    size_t at;    /* bytes handed to libcurl so far */
} upload;

static void up_add(upload *u, const char *p, size_t len)
{
    u->piece[u->n++] = (seg){p, len};
    u->total += len;
}

/* CURLOPT_READFUNCTION: the next bytes of the body, from wherever u->at is. */
static size_t up_read(char *buf, size_t size, size_t nitems, void *arg)
{
    upload *u = arg;
    size_t room = size * nitems, done = 0, skip = u->at;
    for (int i = 0; i < u->n && done < room; i++) {
        if (skip >= u->piece[i].len) {
            skip -= u->piece[i].len;
            continue;
        }
        size_t m = u->piece[i].len - skip;
        if (m > room - done)
            m = room - done;
        memcpy(buf + done, u->piece[i].p + skip, m);
        done += m;
        skip = 0;
    }
    u->at += done;
    return done;
}

/* CURLOPT_SEEKFUNCTION: libcurl rewinds when it must send the body again. */
static int up_seek(void *arg, curl_off_t offset, int origin)
{
    upload *u = arg;
    if (origin != SEEK_SET || offset < 0 || (size_t)offset > u->total)
        return CURL_SEEKFUNC_CANTSEEK;
    u->at = (size_t)offset;
    return CURL_SEEKFUNC_OK;
}

/* The response body, kept up to ERR_KEEP bytes for the error report. */
static size_t on_data(char *p, size_t size, size_t n, void *arg)
{
    body *b = arg;
    size_t len = size * n, room = b->len < ERR_KEEP ? ERR_KEEP - b->len : 0;
    if (room)
        b_add(b, p, len < room ? len : room);
    return len;
}

static void note_failure(load *l, const char *what, long status, const body *resp)
{
    atomic_fetch_add(&l->failed, 1);
    pthread_mutex_lock(&l->mu);
    if (!l->first_error[0])
        snprintf(l->first_error, sizeof(l->first_error), "%s: HTTP %ld: %.*s", what, status,
                 (int)(resp->len < 1024 ? resp->len : 1024), resp->p ? resp->p : "");
    pthread_mutex_unlock(&l->mu);
}

static void *client(void *arg)
{
    load *l = arg;
    CURL *h = curl_easy_init();
    struct curl_slist *hl = NULL;
    body resp = {0};
    upload *up = calloc(1, sizeof(*up));
    const size_t step = l->per_request ? (size_t)l->per_request : 1;
    if (!h || !up) {
        if (h)
            curl_easy_cleanup(h);
        free(up);
        return NULL;
    }
    hl = curl_slist_append(hl, "Expect:");
    hl = curl_slist_append(hl, l->per_request ? "Content-Type: multipart/related; "
                                                "type=\"application/dicom\"; boundary=" BOUNDARY
                                              : "Content-Type: application/dicom");
    if (l->per_request)
        hl = curl_slist_append(hl, "Accept: application/dicom+json");
    for (int i = 0; i < l->nheaders; i++)
        hl = curl_slist_append(hl, l->headers[i]);
    curl_easy_setopt(h, CURLOPT_URL, l->url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hl);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &resp);
    curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, 300L);
    curl_easy_setopt(h, CURLOPT_POST, 1L);
    curl_easy_setopt(h, CURLOPT_READFUNCTION, up_read);
    curl_easy_setopt(h, CURLOPT_READDATA, up);
    curl_easy_setopt(h, CURLOPT_SEEKFUNCTION, up_seek);
    curl_easy_setopt(h, CURLOPT_SEEKDATA, up);
    curl_easy_setopt(h, CURLOPT_UPLOAD_BUFFERSIZE, (long)UPLOAD_BUFFER);
    if (l->userpwd)
        curl_easy_setopt(h, CURLOPT_USERPWD, l->userpwd);
    for (;;) {
        size_t first = atomic_fetch_add(&l->next, step);
        if (first >= l->nfiles)
            break;
        size_t last = first + step < l->nfiles ? first + step : l->nfiles;
        static const char part[] = "--" BOUNDARY "\r\nContent-Type: application/dicom\r\n\r\n";
        static const char crlf_part[] =
            "\r\n--" BOUNDARY "\r\nContent-Type: application/dicom\r\n\r\n";
        static const char close_delim[] = "\r\n--" BOUNDARY "--\r\n";
        up->n = 0;
        up->total = up->at = 0;
        resp.len = 0;
        for (size_t i = first; i < last; i++) {
            if (l->per_request)
                i == first ? up_add(up, part, sizeof(part) - 1)
                           : up_add(up, crlf_part, sizeof(crlf_part) - 1);
            up_add(up, l->maps[i].p, l->maps[i].len);
        }
        if (l->per_request)
            up_add(up, close_delim, sizeof(close_delim) - 1);
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)up->total);
        CURLcode cc = curl_easy_perform(h);
        long status = 0;
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
        atomic_fetch_add(&l->requests, 1);
        if (cc != CURLE_OK) {
            const char *m = curl_easy_strerror(cc);
            resp.len = 0;
            b_add(&resp, m, strlen(m));
            note_failure(l, l->files[first], 0, &resp);
        } else if (l->per_request ? status != 200 : status < 200 || status > 299) {
            note_failure(l, l->files[first], status, &resp);
        }
    }
    curl_slist_free_all(hl);
    curl_easy_cleanup(h);
    free(up);
    free(resp.p);
    return NULL;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"clients", required_argument, NULL, 'c'},
                                         {"header", required_argument, NULL, 'H'},
                                         {"user", required_argument, NULL, 'u'},
                                         {"stow", required_argument, NULL, 's'},
                                         {NULL, 0, NULL, 0}};
    static load l; /* large: first_error */
    pthread_t th[MAX_CLIENTS];
    int clients = 2, started = 0, code = 1;
    char *text = NULL, *save = NULL;
    size_t len = 0, cap = 0;
    lc_err e = {0};

    lc_log_init("post_load", LC_LOG_WARN);
    for (int c; (c = getopt_long(argc, argv, "c:H:u:", opts, NULL)) != -1;) {
        switch (c) {
        case 'c':
            clients = atoi(optarg);
            break;
        case 'H':
            if (l.nheaders == MAX_HEADERS)
                return 2;
            l.headers[l.nheaders++] = optarg;
            break;
        case 'u':
            l.userpwd = optarg;
            break;
        case 's':
            l.per_request = atoi(optarg);
            break;
        default:
            return 2;
        }
    }
    if (argc - optind != 2 || clients < 1 || clients > MAX_CLIENTS || l.per_request < 0 ||
        l.per_request > MAX_PARTS) {
        fprintf(stderr, "usage: post_load [-c CLIENTS] [-H HEADER]... [-u USER:PASS] "
                        "[--stow PARTS] URL MANIFEST\n");
        return 2;
    }
    l.url = argv[optind];
    if (lc_read_file(argv[optind + 1], MAX_MANIFEST, &text, &len, &e) != LC_OK) {
        fprintf(stderr, "post_load: %s\n", lc_err_msg(&e));
        return 1;
    }
    for (char *ln = strtok_r(text, "\n", &save); ln; ln = strtok_r(NULL, "\n", &save)) {
        if (l.nfiles == cap) {
            cap = cap ? 2 * cap : 1024;
            char **nv = realloc(l.files, cap * sizeof(*nv));
            if (!nv)
                goto out;
            l.files = nv;
        }
        ln[strcspn(ln, "\t")] = '\0';
        l.files[l.nfiles++] = ln;
    }
    if (l.nfiles == 0) {
        fprintf(stderr, "post_load: no files in \"%s\"\n", argv[optind + 1]);
        goto out;
    }
    if (map_files(&l) != 0)
        goto out;
    pthread_mutex_init(&l.mu, NULL);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const int64_t t0 = lc_now_ms();
    for (; started < clients; started++)
        if (pthread_create(&th[started], NULL, client, &l) != 0)
            break;
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    const double secs = (double)(lc_now_ms() - t0) / 1000.0;
    curl_global_cleanup();
    printf("requests=%ld files=%zu failed=%ld seconds=%.3f files_per_s=%.1f\n",
           atomic_load(&l.requests), l.nfiles, atomic_load(&l.failed), secs,
           (double)l.nfiles / (secs > 0 ? secs : 1e-3));
    if (l.first_error[0])
        fprintf(stderr, "post_load: first failure: %s\n", l.first_error);
    code = started == clients && atomic_load(&l.failed) == 0 ? 0 : 1;
out:
    unmap_files(&l);
    free(l.files);
    free(text);
    return code;
}
