/*
 * ts_s3.h: s3rver (npm, tests/node/s3rver.mjs) as the S3 peer of a test: started on a free
 * loopback port with a temporary directory and a request log, stopped, restarted on the same
 * port and directory; Debian's awscli run against it; the request log and s3rver's upload
 * directory read back. Single-threaded test code; ts_s3_start also sets the RADPIPE_S3_*
 * variables of this process so lc_store_open reaches it.
 */
#ifndef TS_S3_H
#define TS_S3_H

#include <sys/types.h>

typedef struct ts_s3 {
    char *dir;      /* temporary directory: data/, s3rver.log (requests), s3rver.out */
    char *data;     /* dir/data: s3rver's store */
    char *log;      /* dir/s3rver.log: one JSON line per request */
    char *endpoint; /* "http://127.0.0.1:PORT" (https with TLS) */
    char *extra;    /* extra launcher arguments, kept for restarts */
    int port;
    pid_t pid;
} ts_s3;

/* Start s3rver with the given buckets (comma-separated, may be NULL) and extra launcher
 * arguments (e.g. "--fail-every 5", may be NULL). Returns 0 once it listens, else -1. */
int ts_s3_start(ts_s3 *s, const char *buckets, const char *extra);
/* Stop (SIGKILL, like a crash: connections break) and start again on the same port and
 * directory with the given extra arguments (NULL: the same as before). */
void ts_s3_kill(ts_s3 *s);
int ts_s3_restart(ts_s3 *s, const char *buckets, const char *extra);
/* Stop and remove everything (accepts a zeroed struct). */
void ts_s3_free(ts_s3 *s);

/* Run "/usr/bin/aws --endpoint-url <endpoint> <args>" with s3rver's credentials; returns the
 * exit status; *out (may be NULL) gets stdout. */
int ts_s3_aws(const ts_s3 *s, const char *args, char **out);
/* Number of request log lines containing every one of the NULL-terminated needles. */
int ts_s3_log_count(const ts_s3 *s, const char *const needles[]);
/* Incomplete multipart uploads s3rver holds for bucket (directories in its upload area that
 * still hold the upload's key file). */
int ts_s3_incomplete_uploads(const ts_s3 *s, const char *bucket);

#endif
