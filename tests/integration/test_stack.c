/*
 * test_stack.c: radpipe-stack end to end with --no-services: its private PostgreSQL (initdb,
 * run as the postgres user when root) and the dev broker come up and answer, a killed
 * postmaster and a killed broker are restarted (stack.env follows the broker's new port),
 * SIGINT and SIGTERM stop everything cleanly, data survives a second run on the same VAR,
 * PDEATHSIG takes the children down when the runner is SIGKILLed, and a VAR too long for a
 * unix socket path falls back to TCP only.
 * Single-threaded; each test owns a fixture (the runner's pid and its VAR) that teardown cleans.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>
#include "ts.h"

#define START_TIMEOUT_MS   90000
#define RESTART_TIMEOUT_MS 30000
#define STOP_TIMEOUT_MS    60000

typedef struct fixture {
    char *var;              /* the temporary directory, removed by teardown */
    char *stack_var;        /* what --var gets: var itself or a directory below it */
    char *bin;              /* the runner to start; NULL: the built radpipe-stack */
    const char *services;   /* --services LIST; NULL: --no-services */
    const char *const *env; /* NAME, VALUE pairs set for the runner, NULL-terminated */
    int port;
    pid_t pid; /* the runner; 0 once reaped */
} fixture;

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char *path_in(const char *var, const char *rel)
{
    char *p = NULL;
    assert_true(asprintf(&p, "%s/%s", var, rel) > 0);
    return p;
}

static void start_stack(fixture *fx)
{
    char *bin = fx->bin ? strdup(fx->bin) : ts_bin("radpipe-stack");
    char port[16];
    snprintf(port, sizeof(port), "%d", fx->port);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        setenv("RADPIPE_PG_PORT", port, 1);
        unsetenv("RADPIPE_ARCHIVE_URL");
        for (const char *const *e = fx->env; e && e[0]; e += 2)
            setenv(e[0], e[1], 1);
        if (fx->services)
            execl(bin, bin, "--var", fx->stack_var, "--services", fx->services, (char *)NULL);
        else
            execl(bin, bin, "--var", fx->stack_var, "--no-services", (char *)NULL);
        _exit(127);
    }
    free(bin);
    fx->pid = pid;
}

/* Wait for the runner to exit; returns its wait status, or -1 on timeout. */
static int wait_exit(fixture *fx, int timeout_ms)
{
    long long deadline = now_ms() + timeout_ms;
    int status;
    while (now_ms() < deadline) {
        pid_t r = waitpid(fx->pid, &status, WNOHANG);
        if (r == fx->pid) {
            fx->pid = 0;
            return status;
        }
        sleep_ms(50);
    }
    return -1;
}

/* The value of KEY in a KEY=VALUE file, or NULL. */
static char *env_get(const char *text, const char *key)
{
    size_t kl = strlen(key);
    for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        if (strncmp(p, key, kl) == 0 && p[kl] == '=')
            return strndup(p + kl + 1, strcspn(p + kl + 1, "\n"));
    }
    return NULL;
}

/* stack.env written by this runner (RADPIPE_STACK_PID matches); NULL when the runner exits
 * or the time runs out. */
static char *wait_stack_env(fixture *fx)
{
    char *path = path_in(fx->stack_var, "run/stack.env");
    char pid[32];
    char *text = NULL;
    snprintf(pid, sizeof(pid), "%ld", (long)fx->pid);
    long long deadline = now_ms() + START_TIMEOUT_MS;
    while (now_ms() < deadline) {
        int status;
        if (waitpid(fx->pid, &status, WNOHANG) == fx->pid) {
            fx->pid = 0;
            print_error("radpipe-stack exited during start-up (status 0x%x)\n", status);
            break;
        }
        text = ts_read_file(path, NULL);
        char *v = text ? env_get(text, "RADPIPE_STACK_PID") : NULL;
        int mine = v && strcmp(v, pid) == 0;
        free(v);
        if (mine)
            break;
        free(text);
        text = NULL;
        sleep_ms(100);
    }
    free(path);
    return text;
}

/* The value of key in the KEY=VALUE file path once it differs from `differs` (when not NULL)
 * and equals `equals` (when not NULL); caller frees. NULL when the time runs out. */
static char *wait_kv(const char *path, const char *key, const char *differs, const char *equals)
{
    char *v = NULL;
    long long deadline = now_ms() + RESTART_TIMEOUT_MS;
    while (now_ms() < deadline) {
        char *text = ts_read_file(path, NULL);
        v = text ? env_get(text, key) : NULL;
        free(text);
        if (v && (!differs || strcmp(v, differs) != 0) && (!equals || strcmp(v, equals) == 0))
            break;
        free(v);
        v = NULL;
        sleep_ms(100);
    }
    return v;
}

static char *wait_env_change(fixture *fx, const char *key, const char *old)
{
    char *path = path_in(fx->stack_var, "run/stack.env");
    char *v = wait_kv(path, key, old, NULL);
    free(path);
    return v;
}

static void assert_env_is(const char *text, const char *key, const char *f, ...)
    __attribute__((format(printf, 3, 4)));
/* KEY in a KEY=VALUE text equals the formatted value. */
static void assert_env_is(const char *text, const char *key, const char *f, ...)
{
    char want[8192];
    va_list ap;
    va_start(ap, f);
    vsnprintf(want, sizeof(want), f, ap);
    va_end(ap);
    char *v = env_get(text, key);
    if (!v)
        fail_msg("%s is not set", key);
    if (strcmp(v, want) != 0)
        print_error("%s: \"%s\" != \"%s\"\n", key, v, want);
    int same = strcmp(v, want) == 0;
    free(v);
    assert_true(same);
}

static long read_pid(const char *var, const char *rel)
{
    char *path = path_in(var, rel);
    char *text = ts_read_file(path, NULL);
    long pid = text ? strtol(text, NULL, 10) : 0;
    free(text);
    free(path);
    return pid;
}

/* Gone: no such process, or a zombie nobody reaps (orphans end up under init). */
static int pid_gone(pid_t pid)
{
    char path[64], *stat = NULL;
    waitpid(pid, NULL, WNOHANG); /* ours when we are the subreaper */
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return 1;
    snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
    stat = ts_read_file(path, NULL);
    const char *rp = stat ? strrchr(stat, ')') : NULL;
    int zombie = rp && rp[1] == ' ' && rp[2] == 'Z';
    free(stat);
    return zombie;
}

static int wait_gone(pid_t pid, int timeout_ms)
{
    long long deadline = now_ms() + timeout_ms;
    while (!pid_gone(pid)) {
        if (now_ms() >= deadline)
            return 0;
        sleep_ms(100);
    }
    return 1;
}

/* Live processes whose command line or working directory mentions var; the first pid found
 * goes to *first. */
static int procs_mentioning(const char *var, pid_t *first)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    int n = 0;
    assert_non_null(d);
    while ((e = readdir(d))) {
        if (!isdigit((unsigned char)e->d_name[0]))
            continue;
        pid_t pid = (pid_t)atol(e->d_name);
        char path[300], cwd[4096];
        size_t len = 0;
        if (pid == getpid() || pid_gone(pid))
            continue;
        snprintf(path, sizeof(path), "/proc/%s/cmdline", e->d_name);
        char *cmd = ts_read_file(path, &len);
        for (size_t i = 0; cmd && i < len; i++)
            if (cmd[i] == '\0')
                cmd[i] = ' ';
        snprintf(path, sizeof(path), "/proc/%s/cwd", e->d_name);
        ssize_t cl = readlink(path, cwd, sizeof(cwd) - 1);
        cwd[cl > 0 ? cl : 0] = '\0';
        if ((cmd && strstr(cmd, var)) || strstr(cwd, var)) {
            if (!n && first)
                *first = pid;
            print_error("left behind: pid %ld cmdline \"%s\" cwd \"%s\"\n", (long)pid,
                        cmd ? cmd : "", cwd);
            n++;
        }
        free(cmd);
    }
    closedir(d);
    return n;
}

static int wait_no_procs(const char *var, int timeout_ms)
{
    long long deadline = now_ms() + timeout_ms;
    while (procs_mentioning(var, NULL) > 0) {
        if (now_ms() >= deadline)
            return 0;
        sleep_ms(200);
    }
    return 1;
}

/* Run one statement with optional text parameters; returns the result (caller PQclears). */
static PGresult *pg_run(const char *url, const char *sql, int n, const char *const *params)
{
    PGconn *c = PQconnectdb(url);
    PGresult *r = NULL;
    if (PQstatus(c) == CONNECTION_OK)
        r = PQexecParams(c, sql, n, NULL, params, NULL, NULL, 0);
    else
        print_error("could not connect to \"%s\": %s", url, PQerrorMessage(c));
    if (r && PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)
        print_error("statement failed: %s", PQerrorMessage(c));
    PQfinish(c);
    return r;
}

static int pg_connects(const char *url)
{
    PGconn *c = PQconnectdb(url);
    int ok = PQstatus(c) == CONNECTION_OK;
    PQfinish(c);
    return ok;
}

/* A metadata request through a throwaway producer: the broker answers and knows the radpipe
 * topics the runner asked it to create. */
static void assert_broker_answers(const char *brokers)
{
    char es[512];
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    assert_int_equal(rd_kafka_conf_set(conf, "bootstrap.servers", brokers, es, sizeof(es)),
                     RD_KAFKA_CONF_OK);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, es, sizeof(es));
    assert_non_null(rk);
    rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 1, NULL, &md, 10000);
    int ok = err == RD_KAFKA_RESP_ERR_NO_ERROR && md && md->broker_cnt >= 1;
    int radpipe_topics = 0;
    for (int i = 0; ok && i < md->topic_cnt; i++)
        radpipe_topics +=
            strncmp(md->topics[i].topic, "radpipe.", 8) == 0 && md->topics[i].partition_cnt == 4;
    if (md)
        rd_kafka_metadata_destroy(md);
    rd_kafka_destroy(rk);
    if (!ok)
        fail_msg("broker %s did not answer a metadata request: %s", brokers, rd_kafka_err2str(err));
    assert_true(radpipe_topics > 0);
}

static void assert_admin_token(const char *var)
{
    char *path = path_in(var, "admin-token");
    struct stat st;
    size_t len = 0;
    char *tok = ts_read_file(path, &len);
    assert_non_null(tok);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(len, 4 + 64);
    assert_memory_equal(tok, "rpt_", 4);
    assert_int_equal(strspn(tok + 4, "0123456789abcdef"), 64);
    free(tok);
    free(path);
}

/* Each child leads its own process group (a terminal Ctrl-C reaches only the runner), and
 * PostgreSQL runs as the postgres user when the test is root. */
static void assert_own_group_and_user(pid_t pid, int is_postgres)
{
    char path[64];
    struct stat st;
    assert_true(pid > 0);
    assert_int_equal(getpgid(pid), pid);
    snprintf(path, sizeof(path), "/proc/%ld", (long)pid);
    assert_int_equal(stat(path, &st), 0);
    if (is_postgres && geteuid() == 0) {
        struct passwd *pw = getpwnam("postgres");
        assert_non_null(pw);
        assert_int_equal(st.st_uid, pw->pw_uid);
    } else {
        assert_int_equal(st.st_uid, geteuid());
    }
}

static void assert_stops_cleanly(fixture *fx, int sig, long pg_pid, long broker_pid)
{
    assert_int_equal(kill(fx->pid, sig), 0);
    int status = wait_exit(fx, STOP_TIMEOUT_MS);
    assert_true(status != -1);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_true(pid_gone((pid_t)pg_pid));
    assert_true(pid_gone((pid_t)broker_pid));
    assert_int_equal(procs_mentioning(fx->var, NULL), 0);
    char *env = path_in(fx->stack_var, "run/stack.env");
    assert_int_not_equal(access(env, F_OK), 0);
    free(env);
}

static int setup(void **state)
{
    fixture *fx = calloc(1, sizeof(*fx));
    fx->var = ts_tmpdir("stack");
    fx->stack_var = strdup(fx->var);
    fx->port = ts_free_port();
    *state = fx;
    return 0;
}

/* Kill whatever a failed test left running (PDEATHSIG does the rest), then remove VAR. */
static int teardown(void **state)
{
    fixture *fx = *state;
    pid_t left = 0;
    if (fx->pid > 0) {
        kill(fx->pid, SIGKILL);
        waitpid(fx->pid, NULL, 0);
    }
    if (!wait_no_procs(fx->var, 30000))
        while (procs_mentioning(fx->var, &left) > 0 && left > 0 && kill(left, SIGKILL) == 0)
            sleep_ms(100);
    ts_rmrf(fx->var);
    free(fx->var);
    free(fx->stack_var);
    free(fx->bin);
    free(fx);
    return 0;
}

static void test_lifecycle(void **state)
{
    fixture *fx = *state;
    const char *keep[] = {"kept across runs"};
    char port[16];
    snprintf(port, sizeof(port), ":%d/", fx->port);

    start_stack(fx);
    char *env = wait_stack_env(fx);
    assert_non_null(env);
    char *db = env_get(env, "RADPIPE_DATABASE_URL");
    char *brokers = env_get(env, "RADPIPE_KAFKA_BROKERS");
    assert_non_null(db);
    assert_non_null(brokers);
    assert_non_null(strstr(db, port));
    assert_admin_token(fx->stack_var);
    assert_env_is(env, "RADPIPE_STORE_URL", "file://%s/objects", fx->stack_var);
    assert_env_is(env, "RADPIPE_ARCHIVE_URL", "file://%s/archive", fx->stack_var);
    assert_env_is(env, "RADPIPE_ADMIN_TOKEN_FILE", "%s/admin-token", fx->stack_var);

    PGresult *r = pg_run(db, "CREATE TABLE kept (id int PRIMARY KEY, v text)", 0, NULL);
    assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
    r = pg_run(db, "INSERT INTO kept VALUES (1, $1)", 1, keep);
    assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
    assert_broker_answers(brokers);

    /* a killed postmaster comes back */
    long pg_pid = read_pid(fx->stack_var, "pg/postmaster.pid");
    assert_true(pg_pid > 0);
    assert_own_group_and_user((pid_t)pg_pid, 1);
    assert_own_group_and_user((pid_t)read_pid(fx->stack_var, "run/radpipe-devbroker.pid"), 0);
    assert_int_equal(kill((pid_t)pg_pid, SIGKILL), 0);
    assert_true(wait_gone((pid_t)pg_pid, 10000));
    long new_pg = 0;
    long long deadline = now_ms() + RESTART_TIMEOUT_MS;
    while (now_ms() < deadline) {
        new_pg = read_pid(fx->stack_var, "pg/postmaster.pid");
        if (new_pg > 0 && new_pg != pg_pid && pg_connects(db))
            break;
        new_pg = 0;
        sleep_ms(200);
    }
    assert_true(new_pg > 0);

    /* a killed broker comes back on a new port, and stack.env follows it */
    long broker_pid = read_pid(fx->stack_var, "run/radpipe-devbroker.pid");
    assert_true(broker_pid > 0);
    assert_int_equal(kill((pid_t)broker_pid, SIGKILL), 0);
    char *moved = wait_env_change(fx, "RADPIPE_KAFKA_BROKERS", brokers);
    assert_non_null(moved);
    assert_broker_answers(moved);
    free(moved);
    broker_pid = read_pid(fx->stack_var, "run/radpipe-devbroker.pid");
    assert_true(broker_pid > 0);

    /* SIGINT: everything stops, exit 0 */
    assert_stops_cleanly(fx, SIGINT, new_pg, broker_pid);
    free(env);
    free(db);
    free(brokers);

    /* second run on the same VAR: the data is still there */
    start_stack(fx);
    env = wait_stack_env(fx);
    assert_non_null(env);
    db = env_get(env, "RADPIPE_DATABASE_URL");
    brokers = env_get(env, "RADPIPE_KAFKA_BROKERS");
    assert_non_null(db);
    assert_non_null(brokers);
    r = pg_run(db, "SELECT v FROM kept WHERE id = 1", 0, NULL);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    assert_int_equal(PQntuples(r), 1);
    assert_string_equal(PQgetvalue(r, 0, 0), keep[0]);
    PQclear(r);
    assert_broker_answers(brokers);
    pg_pid = read_pid(fx->stack_var, "pg/postmaster.pid");
    broker_pid = read_pid(fx->stack_var, "run/radpipe-devbroker.pid");
    assert_true(pg_pid > 0 && broker_pid > 0);
    assert_stops_cleanly(fx, SIGTERM, pg_pid, broker_pid);
    free(env);
    free(db);
    free(brokers);
}

/* SIGKILL of the runner: PDEATHSIG stops postgres (SIGINT) and the broker (SIGTERM). We
 * become the subreaper so the orphans are ours to reap rather than zombies under init. */
static void test_runner_killed(void **state)
{
    fixture *fx = *state;
    assert_int_equal(prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
    start_stack(fx);
    char *env = wait_stack_env(fx);
    assert_non_null(env);
    free(env);
    long pg_pid = read_pid(fx->stack_var, "pg/postmaster.pid");
    long broker_pid = read_pid(fx->stack_var, "run/radpipe-devbroker.pid");
    assert_true(pg_pid > 0 && broker_pid > 0);
    assert_false(pid_gone((pid_t)pg_pid));
    assert_false(pid_gone((pid_t)broker_pid));

    assert_int_equal(kill(fx->pid, SIGKILL), 0);
    int status = wait_exit(fx, 10000);
    assert_true(status != -1 && WIFSIGNALED(status));
    assert_true(wait_gone((pid_t)pg_pid, 30000));
    assert_true(wait_gone((pid_t)broker_pid, 30000));
    assert_true(wait_no_procs(fx->var, 30000));
    assert_int_equal(prctl(PR_SET_CHILD_SUBREAPER, 0), 0);
}

/* A VAR whose socket path would not fit in sun_path: PostgreSQL runs on TCP only. */
static void test_long_var_tcp_only(void **state)
{
    fixture *fx = *state;
    char *deep = NULL;
    assert_true(asprintf(&deep, "%s/%0100d", fx->var, 0) > 0);
    free(fx->stack_var);
    fx->stack_var = deep;
    start_stack(fx);
    char *env = wait_stack_env(fx);
    assert_non_null(env);
    char *db = env_get(env, "RADPIPE_DATABASE_URL");
    assert_non_null(db);
    assert_true(pg_connects(db));
    char sock[64];
    snprintf(sock, sizeof(sock), "run/.s.PGSQL.%d", fx->port);
    char *sock_path = path_in(fx->stack_var, sock);
    assert_int_not_equal(access(sock_path, F_OK), 0);
    long pg_pid = read_pid(fx->stack_var, "pg/postmaster.pid");
    long broker_pid = read_pid(fx->stack_var, "run/radpipe-devbroker.pid");
    assert_true(pg_pid > 0 && broker_pid > 0);
    assert_stops_cleanly(fx, SIGTERM, pg_pid, broker_pid);
    free(sock_path);
    free(db);
    free(env);
}

/* As root, a VAR whose parent only root may search (a checkout in a mktemp -d directory,
 * or under /root): PostgreSQL's cluster moves to /var/lib/radpipe/pg-<hash>, VAR/pg points
 * there, the data survives a restart, and the cluster directory is reused. */
static void test_private_parent_dir(void **state)
{
    fixture *fx = *state;
    if (geteuid() != 0) {
        skip(); /* only root runs PostgreSQL as another user */
        return;
    }
    char *priv = path_in(fx->var, "private");
    assert_int_equal(mkdir(priv, 0700), 0);
    free(fx->stack_var);
    fx->stack_var = path_in(priv, "var");
    start_stack(fx);
    char *env = wait_stack_env(fx);
    assert_non_null(env);
    char *db = env_get(env, "RADPIPE_DATABASE_URL");
    PGresult *r = pg_run(db, "CREATE TABLE kept AS SELECT 7 AS x", 0, NULL);
    assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
    char *link = path_in(fx->stack_var, "pg");
    char target[4096];
    ssize_t n = readlink(link, target, sizeof(target) - 1);
    assert_true(n > 0);
    target[n] = '\0';
    assert_non_null(strstr(target, "/var/lib/radpipe/pg-"));
    long pg_pid = read_pid(fx->stack_var, "pg/postmaster.pid");
    long broker_pid = read_pid(fx->stack_var, "run/radpipe-devbroker.pid");
    assert_stops_cleanly(fx, SIGINT, pg_pid, broker_pid);
    free(env);

    start_stack(fx); /* the same VAR again finds its data */
    env = wait_stack_env(fx);
    assert_non_null(env);
    r = pg_run(db, "SELECT x FROM kept", 0, NULL);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), "7");
    PQclear(r);
    pg_pid = read_pid(fx->stack_var, "pg/postmaster.pid");
    broker_pid = read_pid(fx->stack_var, "run/radpipe-devbroker.pid");
    assert_stops_cleanly(fx, SIGTERM, pg_pid, broker_pid);
    /* the cluster lives outside VAR: remove it here, teardown only removes VAR */
    char *parent = strdup(target);
    *strrchr(parent, '/') = '\0';
    ts_rmrf(parent);
    free(parent);
    free(link);
    free(env);
    free(db);
    free(priv);
}

/* Stand-ins for the services (they do not exist yet when this test was written): a node
 * script that records its environment in DIR/NAME.env and answers /healthz and /readyz on
 * the address the runner gave it; SIGTERM exits 0. */
static const char fake_service_js[] =
    "const fs = require('fs'), http = require('http');\n"
    "const [name, dir] = process.argv.slice(2);\n"
    "const env = Object.entries(process.env).map(([k, v]) => `${k}=${v}\\n`).join('');\n"
    "fs.writeFileSync(`${dir}/${name}.env.tmp`, env);\n"
    "fs.renameSync(`${dir}/${name}.env.tmp`, `${dir}/${name}.env`);\n"
    "const l = name === 'api-gateway' ? process.env.RADPIPE_HTTP_LISTEN\n"
    "                                 : process.env.RADPIPE_ADMIN_LISTEN;\n"
    "const i = l.lastIndexOf(':');\n"
    "const srv = http.createServer((req, res) => {\n"
    "  res.writeHead(req.url === '/healthz' || req.url === '/readyz' ? 200 : 404);\n"
    "  res.end();\n"
    "});\n"
    "srv.listen(+l.slice(i + 1), l.slice(0, i));\n"
    "process.on('SIGTERM', () => process.exit(0));\n";

/* dir gets copies of radpipe-stack and radpipe-devbroker (the runner looks for programs next
 * to itself) and the stand-ins for api-gateway and dicom-indexer. */
static void make_bin_dir(const char *dir)
{
    char *cmd = NULL, *stack = ts_bin("radpipe-stack"), *broker = ts_bin("radpipe-devbroker");
    assert_true(asprintf(&cmd, "mkdir -p '%s' && cp '%s' '%s' '%s'/", dir, stack, broker, dir) > 0);
    assert_int_equal(ts_run(cmd, NULL), 0);
    free(cmd);
    char *js = path_in(dir, "fake-service.js");
    assert_int_equal(ts_write_file(js, fake_service_js, strlen(fake_service_js)), 0);
    const char *names[] = {"api-gateway", "dicom-indexer"};
    for (size_t i = 0; i < 2; i++) {
        char *sh = NULL, *path = path_in(dir, names[i]);
        assert_true(asprintf(&sh, "#!/bin/sh\nexec node '%s' %s '%s'\n", js, names[i], dir) > 0);
        assert_int_equal(ts_write_file(path, sh, strlen(sh)), 0);
        assert_int_equal(chmod(path, 0755), 0);
        free(sh);
        free(path);
    }
    free(js);
    free(stack);
    free(broker);
}

/* The environment a stand-in recorded, once it has KEY=want (NULL: any); caller frees. */
static char *service_env(const char *dir, const char *name, const char *key, const char *want)
{
    char *path = NULL, *text = NULL;
    assert_true(asprintf(&path, "%s/%s.env", dir, name) > 0);
    char *v = wait_kv(path, key, NULL, want);
    if (v)
        text = ts_read_file(path, NULL);
    free(v);
    free(path);
    return text;
}

/* Services get their environment, readiness gates stack.env, a crashed service is restarted,
 * a broker restart restarts the services with the new address, SIGTERM drains them first. */
static void test_services_supervised(void **state)
{
    fixture *fx = *state;
    char *dir = path_in(fx->var, "bin");
    char listen[32], base[16], http_url[48], admin[32];
    int http_port = ts_free_port(), admin_port = ts_free_port();
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", http_port);
    snprintf(http_url, sizeof(http_url), "http://127.0.0.1:%d", http_port);
    snprintf(base, sizeof(base), "%d", admin_port - 1);
    snprintf(admin, sizeof(admin), "127.0.0.1:%d", admin_port);
    const char *archive = "http://127.0.0.1:9/radpipe-archive";
    const char *const env_pairs[] = {"RADPIPE_HTTP_LISTEN",
                                     listen,
                                     "RADPIPE_ADMIN_PORT_BASE",
                                     base,
                                     "RADPIPE_ARCHIVE_URL",
                                     archive,
                                     "RADPIPE_DRAIN_SECONDS",
                                     "2",
                                     NULL};
    make_bin_dir(dir);
    fx->bin = path_in(dir, "radpipe-stack");
    free(fx->stack_var);
    fx->stack_var = path_in(fx->var, "state");
    fx->services = "api-gateway,dicom-indexer";
    fx->env = env_pairs;

    start_stack(fx);
    char *env = wait_stack_env(fx);
    assert_non_null(env);
    assert_env_is(env, "RADPIPE_HTTP_URL", "%s", http_url);
    assert_env_is(env, "RADPIPE_ARCHIVE_URL", "%s", archive);
    char *db = env_get(env, "RADPIPE_DATABASE_URL");
    char *brokers = env_get(env, "RADPIPE_KAFKA_BROKERS");
    assert_non_null(db);
    assert_non_null(brokers);

    char *idx = service_env(dir, "dicom-indexer", "RADPIPE_KAFKA_BROKERS", NULL);
    assert_non_null(idx);
    assert_env_is(idx, "RADPIPE_DATABASE_URL", "%s", db);
    assert_env_is(idx, "RADPIPE_KAFKA_BROKERS", "%s", brokers);
    assert_env_is(idx, "RADPIPE_STORE_URL", "file://%s/objects", fx->stack_var);
    assert_env_is(idx, "RADPIPE_SPOOL_DIR", "%s/spool", fx->stack_var);
    assert_env_is(idx, "RADPIPE_ADMIN_TOKEN_FILE", "%s/admin-token", fx->stack_var);
    assert_env_is(idx, "RADPIPE_ADMIN_LISTEN", "%s", admin);
    assert_env_is(idx, "RADPIPE_ARCHIVE_URL", "%s", archive);
    char *gw = service_env(dir, "api-gateway", "RADPIPE_KAFKA_BROKERS", NULL);
    assert_non_null(gw);
    assert_env_is(gw, "RADPIPE_HTTP_LISTEN", "%s", listen);
    char *gw_admin = env_get(gw, "RADPIPE_ADMIN_LISTEN");
    assert_null(gw_admin);
    free(idx);
    free(gw);

    /* a crashed service is started again */
    long idx_pid = read_pid(fx->stack_var, "run/dicom-indexer.pid");
    assert_true(idx_pid > 0);
    assert_int_equal(kill((pid_t)idx_pid, SIGKILL), 0);
    long new_idx = 0;
    long long deadline = now_ms() + RESTART_TIMEOUT_MS;
    while (now_ms() < deadline) {
        new_idx = read_pid(fx->stack_var, "run/dicom-indexer.pid");
        if (new_idx > 0 && new_idx != idx_pid)
            break;
        new_idx = 0;
        sleep_ms(100);
    }
    assert_true(new_idx > 0);

    /* a restarted broker has a new address: both services are restarted with it */
    long broker_pid = read_pid(fx->stack_var, "run/radpipe-devbroker.pid");
    assert_true(broker_pid > 0);
    assert_int_equal(kill((pid_t)broker_pid, SIGKILL), 0);
    char *moved = wait_env_change(fx, "RADPIPE_KAFKA_BROKERS", brokers);
    assert_non_null(moved);
    idx = service_env(dir, "dicom-indexer", "RADPIPE_KAFKA_BROKERS", moved);
    gw = service_env(dir, "api-gateway", "RADPIPE_KAFKA_BROKERS", moved);
    assert_non_null(idx);
    assert_non_null(gw);
    free(idx);
    free(gw);

    /* SIGTERM drains the services, then the broker and postgres; nothing is left */
    long pg_pid = read_pid(fx->stack_var, "pg/postmaster.pid");
    broker_pid = read_pid(fx->stack_var, "run/radpipe-devbroker.pid");
    assert_true(pg_pid > 0 && broker_pid > 0);
    assert_stops_cleanly(fx, SIGTERM, pg_pid, broker_pid);
    free(moved);
    free(db);
    free(brokers);
    free(env);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_lifecycle, setup, teardown),
        cmocka_unit_test_setup_teardown(test_runner_killed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_long_var_tcp_only, setup, teardown),
        cmocka_unit_test_setup_teardown(test_private_parent_dir, setup, teardown),
        cmocka_unit_test_setup_teardown(test_services_supervised, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
