/*
 * ts_proc.h: processes, HTTP and Kafka for the integration tests: start the real stack
 * (radpipe-stack) or single services with extra environment, wait for them, call the HTTP
 * API with libcurl, and read topics back with a real Kafka consumer.
 */
#ifndef TS_PROC_H
#define TS_PROC_H

#include <stddef.h>
#include <sys/types.h>

/* Start argv[0] (a path) with the current environment plus env ("K=V" strings, NULL-
 * terminated, may be NULL); stdout and stderr go to log_path (appended) when non-NULL.
 * Returns the pid or -1. */
pid_t ts_spawn(char *const argv[], const char *const env[], const char *log_path);
/* Wait up to timeout_ms for pid; returns its wait status, or -1 on timeout. */
int ts_wait(pid_t pid, int timeout_ms);
/* SIGKILL and reap (no-op for pid <= 0). */
void ts_kill(pid_t pid);

/* The stack's VAR/run/stack.env, once written. */
typedef struct ts_stack {
    char *var;
    pid_t pid;
    char *log;          /* VAR/stack.log */
    char *database_url; /* RADPIPE_DATABASE_URL */
    char *brokers;      /* RADPIPE_KAFKA_BROKERS */
    char *http_url;     /* RADPIPE_HTTP_URL */
    char *token;        /* contents of the admin token file */
    int http_port, pg_port, admin_base;
} ts_stack;

/* Start radpipe-stack on a fresh VAR with free ports; args are extra arguments (e.g.
 * "--no-services", may be NULL-terminated empty) and env extra environment. Waits up to
 * timeout_ms for stack.env. Returns 0 on success (fills st), else prints the log and -1. */
int ts_stack_start(ts_stack *st, const char *const args[], const char *const env[], int timeout_ms);
/* Send sig (SIGTERM/SIGINT) and wait; returns the wait status (-1 on timeout, then kills). */
int ts_stack_stop(ts_stack *st, int sig, int timeout_ms);
/* Print the last bytes of the stack's log to stderr (for failures). */
void ts_stack_dump_log(const ts_stack *st);
void ts_stack_free(ts_stack *st);

/* Environment a single service needs to join the stack st ("K=V" strings; free with
 * ts_env_free). admin_port 0 = none. extra (may be NULL) is appended. */
char **ts_service_env(const ts_stack *st, int admin_port, const char *const extra[]);
void ts_env_free(char **env);

/* HTTP with libcurl. token/content_type/body may be NULL. Returns the status code (0 when
 * the request failed at the transport level); *resp (may be NULL) gets the body. */
long ts_http(const char *method, const char *url, const char *token, const char *content_type,
             const void *body, size_t len, char **resp, size_t *resp_len);

/* Read every message currently in the given full topic names (from the beginning, a fresh
 * consumer group) until idle_ms pass without a new message; each payload becomes one line
 * of out_path. Returns the number of messages or -1. */
int ts_kafka_dump(const char *brokers, const char *const topics[], const char *out_path,
                  int idle_ms, int timeout_ms);

#endif
