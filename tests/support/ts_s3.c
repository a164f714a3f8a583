/*
 * ts_s3.c: see ts_s3.h. Test-only code: aborts on allocation failure.
 */
#include <dirent.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "ts.h"
#include "ts_proc.h"
#include "ts_s3.h"

static char *xfmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xfmt(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    if (vasprintf(&s, fmt, ap) < 0)
        abort();
    va_end(ap);
    return s;
}

static int launch(ts_s3 *s, const char *buckets)
{
    char *script = xfmt("%s/tests/node/s3rver.mjs", ts_root());
    char *out = xfmt("%s/s3rver.out", s->dir);
    char *cmd =
        xfmt("exec node --openssl-legacy-provider '%s' --dir '%s' --port %d --log '%s' --buckets "
             "'%s' %s",
             script, s->data, s->port, s->log, buckets ? buckets : "", s->extra ? s->extra : "");
    char *const argv[] = {"/bin/sh", "-c", cmd, NULL};
    unlink(out);
    s->pid = ts_spawn(argv, NULL, out);
    int ok = 0;
    for (int i = 0; i < 300 && s->pid > 0; i++) { /* up to 15 s: node starts slowly on 2 cores */
        char *o = ts_read_file(out, NULL);
        ok = o && strstr(o, "listening ");
        free(o);
        if (ok || ts_wait(s->pid, 50) != -1)
            break;
    }
    if (!ok) {
        char *o = ts_read_file(out, NULL);
        fprintf(stderr, "s3rver did not start: %s\n", o ? o : "(no output)");
        free(o);
        ts_kill(s->pid);
        s->pid = 0;
    }
    free(script);
    free(out);
    free(cmd);
    return ok ? 0 : -1;
}

int ts_s3_start(ts_s3 *s, const char *buckets, const char *extra)
{
    memset(s, 0, sizeof(*s));
    s->dir = ts_tmpdir("s3");
    s->data = xfmt("%s/data", s->dir);
    s->log = xfmt("%s/s3rver.log", s->dir);
    s->extra = extra ? strdup(extra) : NULL;
    s->port = ts_free_port();
    int tls = extra && strstr(extra, "--cert");
    s->endpoint =
        xfmt("%s://%s:%d", tls ? "https" : "http", tls ? "localhost" : "127.0.0.1", s->port);
    setenv("RADPIPE_S3_ENDPOINT", s->endpoint, 1);
    setenv("RADPIPE_S3_ACCESS_KEY", "S3RVER", 1);
    setenv("RADPIPE_S3_SECRET_KEY", "S3RVER", 1);
    setenv("RADPIPE_S3_REGION", "us-east-1", 1);
    return launch(s, buckets);
}

void ts_s3_kill(ts_s3 *s)
{
    if (s->pid > 0)
        ts_kill(s->pid);
    s->pid = 0;
}

int ts_s3_restart(ts_s3 *s, const char *buckets, const char *extra)
{
    ts_s3_kill(s);
    if (extra) {
        free(s->extra);
        s->extra = strdup(extra);
    }
    return launch(s, buckets);
}

void ts_s3_free(ts_s3 *s)
{
    ts_s3_kill(s);
    if (s->dir)
        ts_rmrf(s->dir);
    free(s->dir);
    free(s->data);
    free(s->log);
    free(s->endpoint);
    free(s->extra);
    memset(s, 0, sizeof(*s));
}

int ts_s3_aws(const ts_s3 *s, const char *args, char **out)
{
    char *cmd = xfmt("AWS_ACCESS_KEY_ID=S3RVER AWS_SECRET_ACCESS_KEY=S3RVER "
                     "AWS_DEFAULT_REGION=us-east-1 AWS_CONFIG_FILE=/dev/null "
                     "AWS_SHARED_CREDENTIALS_FILE=/dev/null /usr/bin/aws --no-verify-ssl "
                     "--endpoint-url %s %s 2>/dev/null",
                     s->endpoint, args);
    int st = ts_run(cmd, out);
    free(cmd);
    return st;
}

int ts_s3_log_count(const ts_s3 *s, const char *const needles[])
{
    char *log = ts_read_file(s->log, NULL);
    int n = 0;
    if (!log)
        return 0;
    for (char *line = strtok(log, "\n"); line; line = strtok(NULL, "\n")) {
        int all = 1;
        for (const char *const *nd = needles; *nd && all; nd++)
            all = strstr(line, *nd) != NULL;
        n += all;
    }
    free(log);
    return n;
}

int ts_s3_incomplete_uploads(const ts_s3 *s, const char *bucket)
{
    char *d = xfmt("%s/%s/._S3rver_uploads", s->data, bucket);
    DIR *dir = opendir(d);
    int n = 0;
    struct dirent *e;
    while (dir && (e = readdir(dir))) {
        if (e->d_name[0] == '.')
            continue;
        /* an aborted upload's directory stays behind, empty (see tests/node/s3rver.mjs) */
        char *k = xfmt("%s/%s/key", d, e->d_name);
        n += access(k, F_OK) == 0;
        free(k);
    }
    if (dir)
        closedir(dir);
    free(d);
    return n;
}
