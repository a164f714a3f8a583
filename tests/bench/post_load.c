/*
 * post_load.c: an HTTP/1.1 load client for the stack benchmarks: POSTs the files of a gen_ct
 * manifest (first column) to one http:// URL from C concurrent clients, each on its own
 * keep-alive connection. One file per request as application/dicom (Orthanc's
 * POST /instances, radpipe's POST /api/v1/instances), or --stow K: K files per request as a
 * STOW-RS multipart/related; type="application/dicom" body. Every answer must be a 2xx (STOW:
 * 200, all stored). Prints "requests=R files=F failed=X seconds=S files_per_s=V" with the time
 * from the first request sent to the last answer. Each client thread owns its connection.
 *
 * The client's own work competes for the CPU with the server it measures (both on 2 cores),
 * so a request body goes from the page cache to the socket with sendfile(2) and is never
 * copied by the client: libcurl, which this client used before, copied every body into its
 * upload buffer and again into the socket. Only the small multipart delimiters are written.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <openssl/evp.h>
#include "lc/log.h"
#include "lc/util.h"

#define MAX_CLIENTS  64
#define MAX_HEADERS  8
#define MAX_FILE     (256 * 1024 * 1024)
#define MAX_MANIFEST (256 * 1024 * 1024)
#define ERR_KEEP     2048
#define BOUNDARY     "radpipe-bench-7d1f0c2e9a"
#define MAX_PARTS    1000
#define HEAD_MAX     8192 /* the request head we write, the response head we accept */
#define IO_TIMEOUT_S 300

typedef struct load {
    char host[256], port[16], hostport[300];
    const char *path;
    char **files;  /* borrowed from the manifest text */
    size_t *sizes; /* files[i]'s size, checked before the first request */
    size_t nfiles;
    int per_request; /* 0: one raw file per request; K: STOW-RS with K parts */
    const char *headers[MAX_HEADERS];
    int nheaders;
    char auth[400];     /* "Authorization: Basic ..." or "" */
    atomic_size_t next; /* the next file to send */
    atomic_long requests, failed;
    pthread_mutex_t mu; /* guards first_error */
    char first_error[ERR_KEEP];
} load;

static const char part_delim[] = "--" BOUNDARY "\r\nContent-Type: application/dicom\r\n\r\n";
static const char next_delim[] = "\r\n--" BOUNDARY "\r\nContent-Type: application/dicom\r\n\r\n";
static const char close_delim[] = "\r\n--" BOUNDARY "--\r\n";

/* http://HOST[:PORT]/PATH into l; -1 for anything else (https is not needed here). */
static int parse_url(load *l, const char *url)
{
    if (strncmp(url, "http://", 7) != 0)
        return -1;
    const char *h = url + 7, *slash = strchr(h, '/');
    if (!slash)
        slash = h + strlen(h);
    size_t hl = (size_t)(slash - h);
    if (hl == 0 || hl >= sizeof(l->hostport))
        return -1;
    memcpy(l->hostport, h, hl);
    l->hostport[hl] = '\0';
    const char *colon = memchr(h, ':', hl);
    size_t nl = colon ? (size_t)(colon - h) : hl;
    if (nl == 0 || nl >= sizeof(l->host))
        return -1;
    memcpy(l->host, h, nl);
    l->host[nl] = '\0';
    snprintf(l->port, sizeof(l->port), "%.*s", colon ? (int)(slash - colon - 1) : 2,
             colon ? colon + 1 : "80");
    l->path = *slash ? slash : "/";
    return 0;
}

/* The size of every file of the manifest, before the first request. */
static int size_files(load *l)
{
    if (!(l->sizes = calloc(l->nfiles, sizeof(*l->sizes))))
        return -1;
    for (size_t i = 0; i < l->nfiles; i++) {
        struct stat st;
        if (stat(l->files[i], &st) != 0) {
            fprintf(stderr, "post_load: could not read \"%s\": %s\n", l->files[i], strerror(errno));
            return -1;
        }
        if (!S_ISREG(st.st_mode) || st.st_size > MAX_FILE) {
            fprintf(stderr, "post_load: \"%s\" is not a file of at most 256 MiB\n", l->files[i]);
            return -1;
        }
        l->sizes[i] = (size_t)st.st_size;
    }
    return 0;
}

static int dial(const load *l)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    if (getaddrinfo(l->host, l->port, &hints, &ai) != 0)
        return -1;
    int fd = -1;
    for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(ai);
    if (fd >= 0) {
        const int one = 1;
        const struct timeval tv = {.tv_sec = IO_TIMEOUT_S};
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    }
    return fd;
}

static int send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL | MSG_MORE);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* The whole of file i, page cache to socket. */
static int send_file(const load *l, int fd, size_t i)
{
    int in = open(l->files[i], O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return -1;
    off_t off = 0;
    size_t left = l->sizes[i];
    while (left > 0) {
        ssize_t w = sendfile(fd, in, &off, left);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        left -= (size_t)w;
    }
    close(in);
    return left == 0 ? 0 : -1;
}

/* One request for files [first, last): head, then the body with the socket corked so the
 * delimiters leave with the file data. */
static int send_request(const load *l, int fd, size_t first, size_t last)
{
    char head[HEAD_MAX];
    size_t blen = 0;
    for (size_t i = first; i < last; i++)
        blen += l->sizes[i];
    if (l->per_request)
        blen += sizeof(part_delim) - 1 + (last - first - 1) * (sizeof(next_delim) - 1) +
                sizeof(close_delim) - 1;
    int n = snprintf(head, sizeof(head),
                     "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\n%sContent-Length: %zu"
                     "\r\n%s%s",
                     l->path, l->hostport,
                     l->per_request
                         ? "multipart/related; type=\"application/dicom\"; boundary=" BOUNDARY
                         : "application/dicom",
                     l->per_request ? "Accept: application/dicom+json\r\n" : "", blen, l->auth,
                     l->auth[0] ? "\r\n" : "");
    for (int h = 0; h < l->nheaders && n > 0 && (size_t)n < sizeof(head); h++)
        n += snprintf(head + n, sizeof(head) - (size_t)n, "%s\r\n", l->headers[h]);
    if (n <= 0 || (size_t)n + 2 >= sizeof(head))
        return -1;
    memcpy(head + n, "\r\n", 2);
    n += 2;
    const int on = 1, off = 0;
    setsockopt(fd, IPPROTO_TCP, TCP_CORK, &on, sizeof(on));
    int rc = send_all(fd, head, (size_t)n);
    for (size_t i = first; rc == 0 && i < last; i++) {
        if (l->per_request)
            rc = i == first ? send_all(fd, part_delim, sizeof(part_delim) - 1)
                            : send_all(fd, next_delim, sizeof(next_delim) - 1);
        if (rc == 0)
            rc = send_file(l, fd, i);
    }
    if (rc == 0 && l->per_request)
        rc = send_all(fd, close_delim, sizeof(close_delim) - 1);
    setsockopt(fd, IPPROTO_TCP, TCP_CORK, &off, sizeof(off));
    return rc;
}

/* Buffered reading of one connection's responses. */
typedef struct reader {
    int fd;
    char buf[HEAD_MAX];
    size_t at, len;
} reader;

static int r_fill(reader *r)
{
    if (r->at > 0) {
        memmove(r->buf, r->buf + r->at, r->len - r->at);
        r->len -= r->at;
        r->at = 0;
    }
    if (r->len == sizeof(r->buf))
        return -1;
    for (;;) {
        ssize_t n = recv(r->fd, r->buf + r->len, sizeof(r->buf) - r->len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        r->len += (size_t)n;
        return 0;
    }
}

/* The next line (without CRLF) in *line, NUL-terminated in the buffer. */
static int r_line(reader *r, char **line)
{
    for (;;) {
        char *p = r->buf + r->at, *nl = memchr(p, '\n', r->len - r->at);
        if (nl) {
            *nl = '\0';
            if (nl > p && nl[-1] == '\r')
                nl[-1] = '\0';
            r->at = (size_t)(nl - r->buf) + 1;
            *line = p;
            return 0;
        }
        if (r_fill(r) != 0)
            return -1;
    }
}

/* n body bytes, the first ones kept in keep (up to ERR_KEEP). */
static int r_body(reader *r, size_t n, char *keep, size_t *kept)
{
    while (n > 0) {
        if (r->at == r->len && r_fill(r) != 0)
            return -1;
        size_t m = r->len - r->at < n ? r->len - r->at : n;
        size_t room = ERR_KEEP - 1 - *kept;
        memcpy(keep + *kept, r->buf + r->at, m < room ? m : room);
        *kept += m < room ? m : room;
        r->at += m;
        n -= m;
    }
    return 0;
}

/* One response: its status, its body (start) in keep; *reuse 0 when the server closes. */
static int read_response(reader *r, long *status, char *keep, size_t *kept, int *reuse)
{
    char *line;
    *kept = 0;
    do {
        if (r_line(r, &line) != 0 || strncmp(line, "HTTP/1.", 7) != 0 || strlen(line) < 12)
            return -1;
        *status = strtol(line + 9, NULL, 10);
        *reuse = line[7] == '1';
        long long clen = -1;
        int chunked = 0;
        for (;;) {
            if (r_line(r, &line) != 0)
                return -1;
            if (!*line)
                break;
            if (strncasecmp(line, "Content-Length:", 15) == 0)
                clen = strtoll(line + 15, NULL, 10);
            else if (strncasecmp(line, "Transfer-Encoding:", 18) == 0 && strstr(line, "hunked"))
                chunked = 1;
            else if (strncasecmp(line, "Connection:", 11) == 0 && strcasestr(line, "close"))
                *reuse = 0;
        }
        if (*status < 200 || *status == 204 || *status == 304)
            continue; /* no body; a 1xx is followed by the real answer */
        if (chunked) {
            for (;;) {
                if (r_line(r, &line) != 0)
                    return -1;
                long long sz = strtoll(line, NULL, 16);
                if (sz < 0)
                    return -1;
                if (sz == 0) {
                    do { /* trailers up to the empty line */
                        if (r_line(r, &line) != 0)
                            return -1;
                    } while (*line);
                    break;
                }
                if (r_body(r, (size_t)sz, keep, kept) != 0 || r_line(r, &line) != 0)
                    return -1;
            }
        } else if (clen >= 0) {
            if (r_body(r, (size_t)clen, keep, kept) != 0)
                return -1;
        } else {
            return -1; /* a body up to the close: not from these servers */
        }
    } while (*status < 200);
    keep[*kept] = '\0';
    return 0;
}

static void note_failure(load *l, const char *what, long status, const char *resp)
{
    atomic_fetch_add(&l->failed, 1);
    pthread_mutex_lock(&l->mu);
    if (!l->first_error[0])
        snprintf(l->first_error, sizeof(l->first_error), "%s: HTTP %ld: %.1024s", what, status,
                 resp);
    pthread_mutex_unlock(&l->mu);
}

static void *client(void *arg)
{
    load *l = arg;
    const size_t step = l->per_request ? (size_t)l->per_request : 1;
    reader *r = calloc(1, sizeof(*r));
    char *keep = malloc(ERR_KEEP);
    if (!r || !keep) {
        free(r);
        free(keep);
        return NULL;
    }
    r->fd = -1;
    for (;;) {
        size_t first = atomic_fetch_add(&l->next, step);
        if (first >= l->nfiles)
            break;
        size_t last = first + step < l->nfiles ? first + step : l->nfiles, kept = 0;
        long status = 0;
        int ok = -1, reuse = 0;
        /* a kept-alive connection the server has closed meanwhile gets one fresh try */
        for (int attempt = 0; attempt < 2 && ok != 0; attempt++) {
            const int fresh = r->fd < 0;
            if (fresh && (r->fd = dial(l)) < 0)
                break;
            if (fresh)
                r->at = r->len = 0;
            ok = send_request(l, r->fd, first, last) == 0 &&
                         read_response(r, &status, keep, &kept, &reuse) == 0
                     ? 0
                     : -1;
            if (ok != 0 || !reuse) {
                close(r->fd);
                r->fd = -1;
            }
            if (ok != 0 && fresh)
                break;
        }
        atomic_fetch_add(&l->requests, 1);
        if (ok != 0)
            note_failure(l, l->files[first], 0, strerror(errno));
        else if (l->per_request ? status != 200 : status < 200 || status > 299)
            note_failure(l, l->files[first], status, keep);
    }
    if (r->fd >= 0)
        close(r->fd);
    free(r);
    free(keep);
    return NULL;
}

/* -u USER:PASS as a preemptive basic Authorization header. */
static int basic_auth(load *l, const char *userpwd)
{
    unsigned char b64[300];
    size_t n = strlen(userpwd);
    if (n > 200)
        return -1;
    EVP_EncodeBlock(b64, (const unsigned char *)userpwd, (int)n);
    snprintf(l->auth, sizeof(l->auth), "Authorization: Basic %s", (const char *)b64);
    return 0;
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
            if (basic_auth(&l, optarg) != 0)
                return 2;
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
    if (parse_url(&l, argv[optind]) != 0) {
        fprintf(stderr, "post_load: \"%s\" is not an http://HOST[:PORT]/PATH URL\n", argv[optind]);
        return 2;
    }
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
    if (size_files(&l) != 0)
        goto out;
    pthread_mutex_init(&l.mu, NULL);
    const int64_t t0 = lc_now_ms();
    for (; started < clients; started++)
        if (pthread_create(&th[started], NULL, client, &l) != 0)
            break;
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    const double secs = (double)(lc_now_ms() - t0) / 1000.0;
    printf("requests=%ld files=%zu failed=%ld seconds=%.3f files_per_s=%.1f\n",
           atomic_load(&l.requests), l.nfiles, atomic_load(&l.failed), secs,
           (double)l.nfiles / (secs > 0 ? secs : 1e-3));
    if (l.first_error[0])
        fprintf(stderr, "post_load: first failure: %s\n", l.first_error);
    code = started == clients && atomic_load(&l.failed) == 0 ? 0 : 1;
out:
    free(l.sizes);
    free(l.files);
    free(text);
    return code;
}
