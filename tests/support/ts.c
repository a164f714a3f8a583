/*
 * ts.c: see ts.h. Uses libpq directly (not lc_db) so the database helpers do not depend on
 * the code under test.
 */
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <dirent.h>
#include <stdint.h>
#include <sys/random.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <libpq-fe.h>
#include "ts.h"

static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    if (vasprintf(&s, fmt, ap) < 0)
        s = NULL;
    va_end(ap);
    if (!s)
        abort();
    return s;
}

const char *ts_root(void)
{
    const char *r = getenv("RADPIPE_TEST_ROOT");
    return r && *r ? r : ".";
}

const char *ts_bin_dir(void)
{
    static char buf[4096];
    const char *b = getenv("RADPIPE_TEST_BIN");
    if (b && *b)
        return b;
    snprintf(buf, sizeof(buf), "%s/build/test/bin", ts_root());
    return buf;
}

char *ts_bin(const char *name)
{
    return xasprintf("%s/%s", ts_bin_dir(), name);
}

char *ts_data(const char *rel)
{
    return xasprintf("%s/tests/data/%s", ts_root(), rel);
}

const char *ts_samples_dir(void)
{
    static char buf[4096];
    struct stat st;
    const char *e = getenv("RADPIPE_SAMPLES_DIR");
    if (e && *e && stat(e, &st) == 0 && S_ISDIR(st.st_mode))
        return e;
    snprintf(buf, sizeof(buf), "%s/../shared/dicom-samples", ts_root());
    if (stat(buf, &st) == 0 && S_ISDIR(st.st_mode))
        return buf;
    if (stat("/work/shared/dicom-samples", &st) == 0 && S_ISDIR(st.st_mode))
        return "/work/shared/dicom-samples";
    return NULL;
}

char *ts_tmpdir(const char *tag)
{
    const char *base = getenv("TMPDIR");
    char *tmpl = xasprintf("%s/radpipe-%s.XXXXXX", base && *base ? base : "/tmp", tag);
    if (!mkdtemp(tmpl)) {
        fprintf(stderr, "mkdtemp %s: %s\n", tmpl, strerror(errno));
        abort();
    }
    chmod(tmpl, 0755);
    return tmpl;
}

void ts_rmrf(const char *path)
{
    if (!path || !*path || strcmp(path, "/") == 0)
        return;
    char *cmd = xasprintf("rm -rf '%s'", path);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", path);
    free(cmd);
}

/* Ports come from 20000-32767, below Linux's ephemeral range (32768-60999), so an outgoing
 * connection of some client cannot take the port between this check and its use. */
int ts_free_port(void)
{
    for (int tries = 0; tries < 1000; tries++) {
        unsigned int r = 0;
        if (getrandom(&r, sizeof(r), 0) != sizeof(r))
            r = (unsigned int)getpid() * 7919u + (unsigned int)tries * 104729u;
        int port = 20000 + (int)(r % 12768);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int ok = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
        if (fd >= 0)
            close(fd);
        if (ok)
            return port;
    }
    abort();
}

char *ts_pg_fresh_db(const char *tag)
{
    const char *url = getenv("RADPIPE_TEST_PG_URL");
    static int seq;
    if (!url || !*url)
        return NULL;
    PGconn *c = PQconnectdb(url);
    if (PQstatus(c) != CONNECTION_OK) {
        fprintf(stderr, "ts_pg_fresh_db: %s", PQerrorMessage(c));
        PQfinish(c);
        return NULL;
    }
    char name[64];
    snprintf(name, sizeof(name), "t_%s_%d_%d", tag, (int)getpid(), ++seq);
    for (char *p = name; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9')))
            *p = '_';
    char *sql = xasprintf("CREATE DATABASE %s", name);
    PGresult *r = PQexec(c, sql);
    free(sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        fprintf(stderr, "ts_pg_fresh_db: %s", PQerrorMessage(c));
        PQclear(r);
        PQfinish(c);
        return NULL;
    }
    PQclear(r);
    /* Build the new URL from the server's connection parameters. */
    char *out = xasprintf("postgresql://%s@%s:%s/%s", PQuser(c), PQhost(c), PQport(c), name);
    PQfinish(c);
    return out;
}

char *ts_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap + 1);
    for (;;) {
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        if (r == 0)
            break;
        n += r;
    }
    fclose(f);
    buf[n] = '\0';
    if (len)
        *len = n;
    return buf;
}

int ts_write_file(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t w = fwrite(buf, 1, len, f);
    return (fclose(f) == 0 && w == len) ? 0 : -1;
}

int ts_run(const char *cmd, char **out)
{
    FILE *p = popen(cmd, "r");
    if (!p)
        return -1;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap + 1);
    size_t r;
    while ((r = fread(buf + n, 1, cap - n, p)) > 0) {
        n += r;
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
        }
    }
    buf[n] = '\0';
    int st = pclose(p);
    if (out)
        *out = buf;
    else
        free(buf);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

char *ts_test_series(void)
{
    struct stat st;
    char *d = ts_data("series/mr-4slice/jpeg-lossless-sv1");
    if (stat(d, &st) == 0)
        return d;
    free(d);
    const char *s = ts_samples_dir();
    if (!s) {
        fprintf(stderr, "no test series: tests/data/series/mr-4slice is missing\n");
        abort();
    }
    return xasprintf("%s/series/mr-4slice-compressed/jpeg-lossless-sv1", s);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

char **ts_list_files(const char *dir)
{
    DIR *d = opendir(dir);
    size_t n = 0, cap = 16;
    char **v = calloc(cap + 1, sizeof(char *));
    struct dirent *de;
    while (d && (de = readdir(d))) {
        if (de->d_type != DT_REG)
            continue;
        if (n == cap) {
            cap *= 2;
            v = realloc(v, (cap + 1) * sizeof(char *));
        }
        v[n++] = xasprintf("%s/%s", dir, de->d_name);
    }
    if (d)
        closedir(d);
    v[n] = NULL;
    qsort(v, n, sizeof(char *), cmp_str);
    return v;
}

void ts_strv_free(char **v)
{
    for (char **p = v; p && *p; p++)
        free(*p);
    free(v);
}

char *ts_procs_mentioning(const char *needle)
{
    DIR *d = opendir("/proc");
    char *out = calloc(1, 1);
    size_t len = 0;
    struct dirent *de;
    while (d && (de = readdir(d))) {
        char path[300], cwd[4096], *cmd;
        size_t n = 0;
        int pid = atoi(de->d_name);
        if (pid <= 0 || pid == (int)getpid())
            continue;
        snprintf(path, sizeof(path), "/proc/%d/cmdline", pid);
        cmd = ts_read_file(path, &n);
        if (!cmd)
            continue;
        for (size_t i = 0; i + 1 < n; i++)
            if (cmd[i] == '\0')
                cmd[i] = ' ';
        snprintf(path, sizeof(path), "/proc/%d/cwd", pid);
        ssize_t k = readlink(path, cwd, sizeof(cwd) - 1);
        cwd[k > 0 ? k : 0] = '\0';
        if (n && (strstr(cmd, needle) || strstr(cwd, needle))) {
            char *line = xasprintf("%d: %s (cwd %s)\n", pid, cmd, cwd);
            out = realloc(out, len + strlen(line) + 1);
            memcpy(out + len, line, strlen(line) + 1);
            len += strlen(line);
            free(line);
        }
        free(cmd);
    }
    if (d)
        closedir(d);
    return out;
}

int ts_make_series(const char *src, int n, const char *dir, const char *study_uid,
                   const char *series_uid)
{
    for (int i = 0; i < n; i++) {
        char *cmd =
            xasprintf("cp '%s' '%s/slice-%04d.dcm' && dcmodify -nb -q "
                      "-m '(0020,000D)=%s' -m '(0020,000E)=%s' "
                      "-m '(0008,0018)=%s.%d' "
                      "-m '(0020,0013)=%d' -m '(0020,0032)=0\\0\\%d' "
                      "-m '(0020,0037)=1\\0\\0\\0\\1\\0' "
                      "'%s/slice-%04d.dcm'",
                      src, dir, i, study_uid, series_uid, series_uid, i + 1, i + 1, i, dir, i);
        int rc = ts_run(cmd, NULL);
        free(cmd);
        if (rc != 0)
            return -1;
    }
    return 0;
}
