/*
 * ts_proc.c: see ts_proc.h. Test-only code: aborts on allocation failure.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <curl/curl.h>
#include <librdkafka/rdkafka.h>
#include "ts.h"
#include "ts_proc.h"

extern char **environ;

static char *xstrdup(const char *s)
{
    char *d = strdup(s ? s : "");
    if (!d)
        abort();
    return d;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

pid_t ts_spawn(char *const argv[], const char *const env[], const char *log_path)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    if (log_path) {
        int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
    }
    for (const char *const *e = env; e && *e; e++)
        putenv((char *)*e);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execv(argv[0], argv);
    fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

int ts_wait(pid_t pid, int timeout_ms)
{
    long long end = now_ms() + timeout_ms;
    int st = 0;
    for (;;) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            return st;
        if (r < 0)
            return -1;
        if (now_ms() > end)
            return -1;
        usleep(20 * 1000);
    }
}

void ts_kill(pid_t pid)
{
    if (pid <= 0)
        return;
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* 1 when 127.0.0.1:port can be bound right now. */
static int port_free(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int ok = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
    if (fd >= 0)
        close(fd);
    return ok;
}

/* A base port whose next three ports are free too (the workers' admin listeners). */
static int free_base(void)
{
    for (int tries = 0; tries < 50; tries++) {
        int base = ts_free_port();
        if (port_free(base + 1) && port_free(base + 2) && port_free(base + 3))
            return base;
    }
    return ts_free_port();
}

static char *env_value(const char *file, const char *key)
{
    char *buf = ts_read_file(file, NULL);
    if (!buf)
        return NULL;
    size_t kl = strlen(key);
    char *res = NULL;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
        if (strncmp(line, key, kl) == 0 && line[kl] == '=')
            res = xstrdup(line + kl + 1);
    free(buf);
    return res;
}

void ts_stack_dump_log(const ts_stack *st)
{
    size_t len = 0;
    char *buf = st->log ? ts_read_file(st->log, &len) : NULL;
    if (!buf)
        return;
    const char *start = len > 30000 ? buf + len - 30000 : buf;
    fprintf(stderr, "----- %s (tail) -----\n%s\n----- end of log -----\n", st->log, start);
    free(buf);
}

int ts_stack_start(ts_stack *st, const char *const args[], const char *const env[], int timeout_ms)
{
    char buf[512], *argv[16];
    int argc = 0;
    memset(st, 0, sizeof(*st));
    st->var = ts_tmpdir("stack");
    st->http_port = ts_free_port();
    st->pg_port = ts_free_port();
    st->admin_base = free_base();
    if (asprintf(&st->log, "%s/stack.log", st->var) < 0)
        abort();
    argv[argc++] = ts_bin("radpipe-stack");
    for (const char *const *a = args; a && *a && argc < 14; a++)
        argv[argc++] = (char *)*a;
    argv[argc] = NULL;
    const char *base_env[8];
    char e1[600], e2[64], e3[64], e4[64];
    snprintf(e1, sizeof(e1), "RADPIPE_VAR_DIR=%s", st->var);
    snprintf(e2, sizeof(e2), "RADPIPE_PG_PORT=%d", st->pg_port);
    snprintf(e3, sizeof(e3), "RADPIPE_HTTP_LISTEN=127.0.0.1:%d", st->http_port);
    snprintf(e4, sizeof(e4), "RADPIPE_ADMIN_PORT_BASE=%d", st->admin_base);
    int n = 0;
    base_env[n++] = e1;
    base_env[n++] = e2;
    base_env[n++] = e3;
    base_env[n++] = e4;
    base_env[n] = NULL;
    /* child env: base, then the caller's (which may override) */
    const char *all[64];
    int k = 0;
    for (int i = 0; i < n; i++)
        all[k++] = base_env[i];
    for (const char *const *e = env; e && *e && k < 63; e++)
        all[k++] = *e;
    all[k] = NULL;
    st->pid = ts_spawn(argv, all, st->log);
    free(argv[0]);
    snprintf(buf, sizeof(buf), "%s/run/stack.env", st->var);
    long long end = now_ms() + timeout_ms;
    while (access(buf, R_OK) != 0) {
        int status;
        if (waitpid(st->pid, &status, WNOHANG) == st->pid) {
            fprintf(stderr, "radpipe-stack exited early (status %d)\n", status);
            st->pid = 0;
            ts_stack_dump_log(st);
            return -1;
        }
        if (now_ms() > end) {
            fprintf(stderr, "radpipe-stack not ready after %d ms\n", timeout_ms);
            ts_stack_dump_log(st);
            return -1;
        }
        usleep(100 * 1000);
    }
    st->database_url = env_value(buf, "RADPIPE_DATABASE_URL");
    st->brokers = env_value(buf, "RADPIPE_KAFKA_BROKERS");
    st->http_url = env_value(buf, "RADPIPE_HTTP_URL");
    char *tf = env_value(buf, "RADPIPE_ADMIN_TOKEN_FILE");
    st->token = tf ? ts_read_file(tf, NULL) : NULL;
    free(tf);
    if (st->token)
        st->token[strcspn(st->token, "\r\n")] = '\0';
    if (!st->database_url || !st->brokers || !st->http_url || !st->token) {
        fprintf(stderr, "stack.env is incomplete\n");
        ts_stack_dump_log(st);
        return -1;
    }
    return 0;
}

int ts_stack_stop(ts_stack *st, int sig, int timeout_ms)
{
    if (st->pid <= 0)
        return -1;
    kill(st->pid, sig);
    int status = ts_wait(st->pid, timeout_ms);
    if (status == -1) {
        fprintf(stderr, "radpipe-stack did not stop within %d ms\n", timeout_ms);
        ts_kill(st->pid);
        ts_stack_dump_log(st);
    }
    st->pid = 0;
    return status;
}

void ts_stack_free(ts_stack *st)
{
    if (st->pid > 0)
        ts_stack_stop(st, SIGTERM, 60000);
    if (getenv("RADPIPE_TEST_KEEP_VAR")) /* for debugging: keep logs and data */
        fprintf(stderr, "kept %s\n", st->var);
    else
        ts_rmrf(st->var);
    free(st->var);
    free(st->log);
    free(st->database_url);
    free(st->brokers);
    free(st->http_url);
    free(st->token);
    memset(st, 0, sizeof(*st));
}

char **ts_service_env(const ts_stack *st, int admin_port, const char *const extra[])
{
    char **env = calloc(64, sizeof(char *));
    int n = 0;
    if (!env)
        abort();
#define ADD(...)                                                                                   \
    do {                                                                                           \
        if (asprintf(&env[n++], __VA_ARGS__) < 0)                                                  \
            abort();                                                                               \
    } while (0)
    ADD("RADPIPE_DATABASE_URL=%s", st->database_url);
    ADD("RADPIPE_KAFKA_BROKERS=%s", st->brokers);
    ADD("RADPIPE_STORE_URL=file://%s/objects", st->var);
    ADD("RADPIPE_ARCHIVE_URL=file://%s/archive", st->var);
    ADD("RADPIPE_SPOOL_DIR=%s/spool", st->var);
    ADD("RADPIPE_ADMIN_TOKEN_FILE=%s/admin-token", st->var);
    ADD("RADPIPE_HTTP_LISTEN=127.0.0.1:%d", st->http_port);
    if (admin_port >= 0) /* 0: any free port */
        ADD("RADPIPE_ADMIN_LISTEN=127.0.0.1:%d", admin_port);
#undef ADD
    for (const char *const *e = extra; e && *e && n < 63; e++)
        env[n++] = xstrdup(*e);
    env[n] = NULL;
    return env;
}

void ts_env_free(char **env)
{
    for (char **e = env; e && *e; e++)
        free(*e);
    free(env);
}

typedef struct membuf {
    char *p;
    size_t n;
} membuf;

static size_t on_body(char *data, size_t sz, size_t nm, void *ud)
{
    membuf *b = ud;
    size_t k = sz * nm;
    char *np = realloc(b->p, b->n + k + 1);
    if (!np)
        return 0;
    memcpy(np + b->n, data, k);
    b->p = np;
    b->n += k;
    b->p[b->n] = '\0';
    return k;
}

long ts_http(const char *method, const char *url, const char *token, const char *content_type,
             const void *body, size_t len, char **resp, size_t *resp_len)
{
    CURL *c = curl_easy_init();
    struct curl_slist *h = NULL;
    char line[512];
    membuf b = {calloc(1, 1), 0};
    long code = 0;
    if (!c)
        abort();
    if (token) {
        snprintf(line, sizeof(line), "Authorization: Bearer %s", token);
        h = curl_slist_append(h, line);
    }
    if (content_type) {
        snprintf(line, sizeof(line), "Content-Type: %s", content_type);
        h = curl_slist_append(h, line);
    }
    h = curl_slist_append(h, "Expect:");
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 60L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    if (body) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    }
    if (curl_easy_perform(c) == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    if (resp)
        *resp = b.p;
    else
        free(b.p);
    if (resp_len)
        *resp_len = b.n;
    return code;
}

int ts_kafka_dump(const char *brokers, const char *const topics[], const char *out_path,
                  int idle_ms, int timeout_ms)
{
    char es[512], group[64];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    snprintf(group, sizeof(group), "ts-dump-%d-%lld", (int)getpid(), now_ms());
    if (rd_kafka_conf_set(conf, "bootstrap.servers", brokers, es, sizeof(es)) ||
        rd_kafka_conf_set(conf, "group.id", group, es, sizeof(es)) ||
        rd_kafka_conf_set(conf, "auto.offset.reset", "earliest", es, sizeof(es)) ||
        rd_kafka_conf_set(conf, "enable.auto.commit", "false", es, sizeof(es)) ||
        rd_kafka_conf_set(conf, "session.timeout.ms", "6000", es, sizeof(es))) {
        fprintf(stderr, "ts_kafka_dump: %s\n", es);
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, es, sizeof(es));
    if (!rk) {
        fprintf(stderr, "ts_kafka_dump: %s\n", es);
        return -1;
    }
    rd_kafka_poll_set_consumer(rk);
    int nt = 0;
    while (topics[nt])
        nt++;
    rd_kafka_topic_partition_list_t *subs = rd_kafka_topic_partition_list_new(nt);
    for (int i = 0; i < nt; i++)
        rd_kafka_topic_partition_list_add(subs, topics[i], RD_KAFKA_PARTITION_UA);
    rd_kafka_subscribe(rk, subs);
    rd_kafka_topic_partition_list_destroy(subs);
    FILE *out = fopen(out_path, "w");
    int count = 0, assigned = 0;
    long long end = now_ms() + timeout_ms, last = now_ms();
    while (out && now_ms() < end) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 200);
        if (!assigned) {
            rd_kafka_topic_partition_list_t *a = NULL;
            if (rd_kafka_assignment(rk, &a) == RD_KAFKA_RESP_ERR_NO_ERROR && a) {
                assigned = a->cnt > 0;
                rd_kafka_topic_partition_list_destroy(a);
            }
            if (assigned)
                last = now_ms();
        }
        if (m) {
            if (!m->err) {
                fwrite(m->payload, 1, m->len, out);
                fputc('\n', out);
                count++;
                last = now_ms();
            }
            rd_kafka_message_destroy(m);
        } else if (assigned && now_ms() - last > idle_ms) {
            break;
        }
    }
    if (out)
        fclose(out);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    return out ? count : -1;
}
