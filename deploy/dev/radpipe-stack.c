/*
 * radpipe-stack: the embedded default behind `make run`. Starts a private PostgreSQL cluster,
 * the Kafka-protocol dev broker and the four services natively in the foreground and
 * supervises them the way supervisord does in the containers: restarts with backoff, then an
 * ordered shutdown on SIGINT/SIGTERM. All state lives in one `stack` owned by main().
 * Single-threaded: signals arrive through a signalfd, never through handlers.
 */
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <glob.h>
#include <grp.h>
#include <libgen.h>
#include <libpq-fe.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include "lc/cfg.h"
#include "lc/log.h"
#include "lc/util.h"

extern char **environ;

#define PROGRAM           "radpipe-stack"
#define BACKOFF_MIN_MS    1000
#define BACKOFF_MAX_MS    30000
#define BACKOFF_RESET_MS  60000 /* a child that ran this long starts again at the minimum */
#define PG_READY_MS       60000
#define BROKER_READY_MS   30000
#define SERVICES_READY_MS 90000
#define TICK_MS           200
#define SOCKET_PATH_MAX   107 /* sizeof(sockaddr_un.sun_path) - 1 */
#define MAX_GROUPS        64

/* ---- configuration -------------------------------------------------------------------- */

typedef struct stack_cfg {
    char *var_dir;
    long long pg_port;
    char *http_listen;
    long long admin_port_base;
    long long kafka_partitions;
    char *topic_prefix;
    long long drain_seconds;
    char *log_level;
} stack_cfg;

#define CFGV(n, t, d, lo, hi, h, f)                                                                \
    {                                                                                              \
        .name = (n), .type = (t), .def = (d), .min = (lo), .max = (hi), .help = (h),               \
        .offset = offsetof(stack_cfg, f)                                                           \
    }

static const lc_cfg_var cfg_vars[] = {
    CFGV("RADPIPE_VAR_DIR", LC_CFG_STR, "var", 0, -1,
         "state directory: cluster, sockets, logs, objects (relative to the current directory; "
         "--var overrides)",
         var_dir),
    CFGV("RADPIPE_PG_PORT", LC_CFG_INT, "55432", 1, 65535, "port of the private PostgreSQL",
         pg_port),
    CFGV("RADPIPE_HTTP_LISTEN", LC_CFG_STR, "127.0.0.1:8080", 0, -1,
         "api-gateway listen address (HOST:PORT), also probed for readiness", http_listen),
    CFGV("RADPIPE_ADMIN_PORT_BASE", LC_CFG_INT, "9100", 1, 65532,
         "admin ports: dicom-indexer base+1, storage-uploader base+2, gpu-segmenter base+3",
         admin_port_base),
    CFGV("RADPIPE_KAFKA_PARTITIONS", LC_CFG_INT, "4", 1, 1000,
         "partitions per topic on the dev broker", kafka_partitions),
    CFGV("RADPIPE_KAFKA_TOPIC_PREFIX", LC_CFG_STR, "radpipe.", 0, -1,
         "topic name prefix (dev broker and services)", topic_prefix),
    CFGV("RADPIPE_DRAIN_SECONDS", LC_CFG_INT, "30", 0, 3600,
         "how long services may drain on shutdown (the runner waits 5 s more)", drain_seconds),
    {.name = "RADPIPE_LOG_LEVEL",
     .type = LC_CFG_ENUM,
     .def = "info",
     .min = 0,
     .max = -1,
     .choices = "debug|info|warn|error",
     .help = "log level of the runner",
     .offset = offsetof(stack_cfg, log_level)},
};

/* ---- state ---------------------------------------------------------------------------- */

typedef enum role { ROLE_PG, ROLE_BROKER, ROLE_SERVICE } role;

enum { CH_PG, CH_BROKER, CH_GATEWAY, CH_INDEXER, CH_UPLOADER, CH_SEGMENTER, CH__COUNT };
#define CH_FIRST_SERVICE CH_GATEWAY

typedef struct child {
    const char *name;
    role role;
    int selected;
    int admin_port; /* workers: their admin listener; 0 for the rest */
    pid_t pid;      /* 0: not running */
    int64_t started_ms;
    int64_t restart_at_ms; /* 0: no restart pending */
    int backoff_ms;        /* delay of the next unexpected restart */
    int stop_sig;          /* the signal we sent to stop it; 0 while it should be running */
    int bounce;            /* stopped on purpose, to start again with a new broker address */
    int failed;            /* its last exit was unexpected or unclean */
    char brokers[256];     /* services: the broker address it was started with */
} child;

typedef struct stack {
    stack_cfg cfg;
    const char *var_opt;      /* --var, borrowed from argv */
    const char *services_opt; /* --services, borrowed from argv */
    int no_services;

    char var[PATH_MAX];
    char pg_dir[PATH_MAX], run_dir[PATH_MAX], log_dir[PATH_MAX];
    char sock_dir[PATH_MAX]; /* PostgreSQL's unix socket: run_dir unless relocated */
    char objects_dir[PATH_MAX], archive_dir[PATH_MAX], spool_dir[PATH_MAX];
    char token_path[PATH_MAX], env_path[PATH_MAX], addr_path[PATH_MAX], lock_path[PATH_MAX];
    char pg_log[PATH_MAX], broker_log[PATH_MAX];
    char bin_dir[PATH_MAX], pg_bin[PATH_MAX];

    char pg_port[16], partitions[16];
    char db_url[128];
    char store_url[PATH_MAX + 8];
    char *archive_url; /* owned */
    int archive_from_env;
    char http_host[256], http_port[16], http_url[300];

    int as_root;
    uid_t pg_uid;
    gid_t pg_gid;
    gid_t pg_groups[MAX_GROUPS];
    int pg_ngroups;
    int tcp_only; /* the socket path would not fit: TCP only */

    int sigfd, lock_fd;
    sigset_t sigmask;
    int stop_requests; /* SIGINT/SIGTERM/SIGHUP received so far */
    int shutting_down;
    int services_started, env_written;
    char brokers[256]; /* current broker address; empty while the broker starts */
    child ch[CH__COUNT];
} stack;

static const char *const service_names[] = {"api-gateway", "dicom-indexer", "storage-uploader",
                                            "gpu-segmenter"};

/* ---- small helpers -------------------------------------------------------------------- */

static int fmt(char *buf, size_t cap, const char *f, ...) __attribute__((format(printf, 3, 4)));
/* snprintf that reports truncation as -1 */
static int fmt(char *buf, size_t cap, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    int n = vsnprintf(buf, cap, f, ap);
    va_end(ap);
    return (n < 0 || (size_t)n >= cap) ? -1 : 0;
}

static int is_service(const child *c)
{
    return c->role == ROLE_SERVICE;
}

static const char *sig_name(int sig)
{
    switch (sig) {
    case SIGINT:
        return "SIGINT";
    case SIGTERM:
        return "SIGTERM";
    case SIGHUP:
        return "SIGHUP";
    case SIGQUIT:
        return "SIGQUIT";
    case SIGKILL:
        return "SIGKILL";
    default:
        return "signal";
    }
}

static lc_log_field status_field(int status)
{
    if (WIFSIGNALED(status))
        return LC_LI("signal", WTERMSIG(status));
    return LC_LI("exit_status", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
}

/* Write path atomically (temp file + rename) with the given mode. */
static lc_rc write_atomic(const char *path, const char *data, unsigned mode, lc_err *err)
{
    char tmp[PATH_MAX];
    size_t len = strlen(data), off = 0;
    int fd = -1;
    lc_rc rc = LC_OK;
    if (fmt(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid()) != 0)
        return lc_err_set(err, LC_ERR_INVALID, "path too long: \"%s\"", path);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0) {
        rc = lc_err_set(err, LC_ERR_IO, "could not create \"%s\": %s", tmp, strerror(errno));
        goto out;
    }
    while (off < len) {
        ssize_t n = write(fd, data + off, len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = lc_err_set(err, LC_ERR_IO, "could not write \"%s\": %s", tmp, strerror(errno));
            goto out;
        }
        off += (size_t)n;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        fd = -1;
        rc = lc_err_set(err, LC_ERR_IO, "could not write \"%s\": %s", tmp, strerror(errno));
        goto out;
    }
    fd = -1;
    if (rename(tmp, path) != 0)
        rc = lc_err_set(err, LC_ERR_IO, "could not rename \"%s\": %s", tmp, strerror(errno));
out:
    if (fd >= 0)
        close(fd);
    if (rc != LC_OK)
        unlink(tmp);
    return rc;
}

static void write_pid_file(const stack *s, const child *c)
{
    char path[PATH_MAX], buf[32];
    lc_err e;
    snprintf(buf, sizeof(buf), "%ld\n", (long)c->pid);
    if (fmt(path, sizeof(path), "%s/%s.pid", s->run_dir, c->name) == 0 &&
        write_atomic(path, buf, 0644, &e) != LC_OK)
        lc_log_warn("could not write pid file", LC_LS("error", lc_err_msg(&e)));
}

static void remove_pid_file(const stack *s, const child *c)
{
    char path[PATH_MAX];
    if (fmt(path, sizeof(path), "%s/%s.pid", s->run_dir, c->name) == 0)
        unlink(path);
}

/* ---- command line and configuration ------------------------------------------------- */

static void usage(FILE *f, const lc_cfg_table *t)
{
    fprintf(f,
            "usage: radpipe-stack [--var DIR] [--no-services | --services LIST]\n"
            "Starts the whole radpipe stack natively in the foreground (no Docker): a private\n"
            "PostgreSQL under VAR/pg, the Kafka-protocol dev broker and the services, and\n"
            "supervises them; Ctrl-C (SIGINT) or SIGTERM stops everything in order.\n"
            "  --var DIR        state directory (default $RADPIPE_VAR_DIR or \"var\")\n"
            "  --no-services    PostgreSQL and the broker only\n"
            "  --services LIST  comma-separated subset of api-gateway,dicom-indexer,\n"
            "                   storage-uploader,gpu-segmenter (default: all)\n"
            "  --help           this text\n"
            "Services get RADPIPE_DATABASE_URL, RADPIPE_KAFKA_BROKERS, RADPIPE_STORE_URL,\n"
            "RADPIPE_SPOOL_DIR, RADPIPE_ADMIN_TOKEN_FILE, RADPIPE_ADMIN_LISTEN and (unless set)\n"
            "RADPIPE_ARCHIVE_URL; VAR/run/stack.env lists them while the stack is up.\n"
            "Environment:\n"
            "| Variable | Default | Meaning |\n"
            "|---|---|---|\n");
    lc_cfg_print_markdown(f, t, 1);
}

/* Returns -1 to go on, else the exit status. */
static int parse_args(stack *s, int argc, char **argv, const lc_cfg_table *t)
{
    static const struct option opts[] = {{"var", required_argument, NULL, 'v'},
                                         {"no-services", no_argument, NULL, 'n'},
                                         {"services", required_argument, NULL, 's'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    for (int o; (o = getopt_long(argc, argv, "h", opts, NULL)) != -1;) {
        switch (o) {
        case 'v':
            s->var_opt = optarg;
            break;
        case 'n':
            s->no_services = 1;
            break;
        case 's':
            s->services_opt = optarg;
            break;
        case 'h':
            usage(stdout, t);
            return 0;
        default:
            usage(stderr, t);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "radpipe-stack: unexpected argument \"%s\"\n", argv[optind]);
        return 2;
    }
    if (s->no_services && s->services_opt) {
        fprintf(stderr, "radpipe-stack: --no-services and --services exclude each other\n");
        return 2;
    }
    return -1;
}

static void init_children(stack *s)
{
    s->ch[CH_PG] = (child){.name = "postgres", .role = ROLE_PG, .selected = 1};
    s->ch[CH_BROKER] = (child){.name = "radpipe-devbroker", .role = ROLE_BROKER, .selected = 1};
    for (int i = CH_FIRST_SERVICE; i < CH__COUNT; i++) {
        int k = i - CH_FIRST_SERVICE;
        s->ch[i] = (child){.name = service_names[k], .role = ROLE_SERVICE};
        if (i != CH_GATEWAY)
            s->ch[i].admin_port = (int)s->cfg.admin_port_base + k;
    }
    for (int i = 0; i < CH__COUNT; i++)
        s->ch[i].backoff_ms = BACKOFF_MIN_MS;
}

static lc_rc select_services(stack *s, lc_err *err)
{
    if (s->no_services)
        return LC_OK;
    if (!s->services_opt) {
        for (int i = CH_FIRST_SERVICE; i < CH__COUNT; i++)
            s->ch[i].selected = 1;
        return LC_OK;
    }
    const char *p = s->services_opt;
    while (*p) {
        size_t n = strcspn(p, ",");
        int found = 0;
        for (int i = CH_FIRST_SERVICE; i < CH__COUNT; i++) {
            if (strlen(s->ch[i].name) == n && strncmp(s->ch[i].name, p, n) == 0) {
                s->ch[i].selected = found = 1;
                break;
            }
        }
        if (!found && n > 0)
            return lc_err_set(err, LC_ERR_CONFIG,
                              "unknown service \"%.*s\" in --services (expected some of "
                              "api-gateway,dicom-indexer,storage-uploader,gpu-segmenter)",
                              (int)n, p);
        p += n;
        if (*p == ',')
            p++;
    }
    return LC_OK;
}

/* Split RADPIPE_HTTP_LISTEN into the host and port used for probes and printed URLs; a
 * wildcard address is reached over loopback. */
static lc_rc parse_http_listen(stack *s, lc_err *err)
{
    const char *l = s->cfg.http_listen;
    const char *colon = strrchr(l, ':');
    if (!colon || !colon[1] || strspn(colon + 1, "0123456789") != strlen(colon + 1) ||
        strlen(colon + 1) > 5)
        return lc_err_set(err, LC_ERR_CONFIG,
                          "invalid value for RADPIPE_HTTP_LISTEN: \"%s\" is not HOST:PORT", l);
    size_t hl = (size_t)(colon - l);
    if (hl >= sizeof(s->http_host))
        return lc_err_set(err, LC_ERR_CONFIG, "RADPIPE_HTTP_LISTEN host is too long");
    memcpy(s->http_host, l, hl);
    s->http_host[hl] = '\0';
    if (hl == 0 || strcmp(s->http_host, "0.0.0.0") == 0 || strcmp(s->http_host, "*") == 0)
        lc_strlcpy(s->http_host, "127.0.0.1", sizeof(s->http_host));
    else if (strcmp(s->http_host, "[::]") == 0 || strcmp(s->http_host, "::") == 0)
        lc_strlcpy(s->http_host, "[::1]", sizeof(s->http_host));
    lc_strlcpy(s->http_port, colon + 1, sizeof(s->http_port));
    fmt(s->http_url, sizeof(s->http_url), "http://%s:%s", s->http_host, s->http_port);
    return LC_OK;
}

/* ---- paths and the VAR layout -------------------------------------------------------- */

/* The newest /usr/lib/postgresql/<version>/bin. */
static lc_rc find_pg_bin(stack *s, lc_err *err)
{
    glob_t g;
    const char *best = NULL;
    if (glob("/usr/lib/postgresql/*/bin/postgres", 0, NULL, &g) != 0) {
        globfree(&g);
        return lc_err_set(err, LC_ERR_NOT_FOUND,
                          "could not find PostgreSQL in /usr/lib/postgresql (install the "
                          "postgresql package: deploy/install-deps.sh)");
    }
    for (size_t i = 0; i < g.gl_pathc; i++)
        if (!best || strverscmp(g.gl_pathv[i], best) > 0)
            best = g.gl_pathv[i];
    lc_strlcpy(s->pg_bin, best, sizeof(s->pg_bin));
    globfree(&g);
    *strrchr(s->pg_bin, '/') = '\0';
    return LC_OK;
}

static lc_rc find_bin_dir(stack *s, lc_err *err)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n < 0)
        return lc_err_set(err, LC_ERR_IO, "could not read /proc/self/exe: %s", strerror(errno));
    self[n] = '\0';
    lc_strlcpy(s->bin_dir, dirname(self), sizeof(s->bin_dir));
    return LC_OK;
}

/* VAR made absolute (created first so realpath can resolve it), then every path under it. */
static lc_rc make_paths(stack *s, lc_err *err)
{
    const char *v = s->var_opt ? s->var_opt : s->cfg.var_dir;
    char abs[PATH_MAX];
    lc_rc rc;
    if (!v || !*v)
        return lc_err_set(err, LC_ERR_CONFIG, "the state directory (RADPIPE_VAR_DIR) is empty");
    if ((rc = lc_mkdirs(v, 0755, err)) != LC_OK)
        return rc;
    if (!realpath(v, abs))
        return lc_err_set(err, LC_ERR_IO, "could not resolve \"%s\": %s", v, strerror(errno));
    lc_strlcpy(s->var, abs, sizeof(s->var));
    if (fmt(s->pg_dir, PATH_MAX, "%s/pg", abs) || fmt(s->run_dir, PATH_MAX, "%s/run", abs) ||
        fmt(s->log_dir, PATH_MAX, "%s/log", abs) ||
        fmt(s->objects_dir, PATH_MAX, "%s/objects", abs) ||
        fmt(s->archive_dir, PATH_MAX, "%s/archive", abs) ||
        fmt(s->spool_dir, PATH_MAX, "%s/spool", abs) ||
        fmt(s->token_path, PATH_MAX, "%s/admin-token", abs) ||
        fmt(s->env_path, PATH_MAX, "%s/run/stack.env", abs) ||
        fmt(s->addr_path, PATH_MAX, "%s/run/kafka.addr", abs) ||
        fmt(s->lock_path, PATH_MAX, "%s/run/radpipe-stack.pid", abs) ||
        fmt(s->pg_log, PATH_MAX, "%s/log/postgres.log", abs) ||
        fmt(s->broker_log, PATH_MAX, "%s/log/devbroker.log", abs) ||
        fmt(s->store_url, sizeof(s->store_url), "file://%s", s->objects_dir))
        return lc_err_set(err, LC_ERR_CONFIG, "the state directory path is too long: \"%s\"", abs);
    snprintf(s->pg_port, sizeof(s->pg_port), "%lld", s->cfg.pg_port);
    snprintf(s->partitions, sizeof(s->partitions), "%lld", s->cfg.kafka_partitions);
    snprintf(s->db_url, sizeof(s->db_url), "postgresql://radpipe@127.0.0.1:%lld/radpipe",
             s->cfg.pg_port);
    const char *a = getenv("RADPIPE_ARCHIVE_URL");
    s->archive_from_env = a && *a;
    if (s->archive_from_env)
        s->archive_url = strdup(a);
    else if (asprintf(&s->archive_url, "file://%s", s->archive_dir) < 0)
        s->archive_url = NULL;
    if (!s->archive_url)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    lc_strlcpy(s->sock_dir, s->run_dir, sizeof(s->sock_dir));
    /* ".s.PGSQL.<port>" is appended to the directory */
    s->tcp_only = strlen(s->sock_dir) + strlen("/.s.PGSQL.") + strlen(s->pg_port) > SOCKET_PATH_MAX;
    return LC_OK;
}

/* PostgreSQL refuses to run as root: as root, it runs as the postgres system user. */
static lc_rc lookup_pg_user(stack *s, lc_err *err)
{
    s->as_root = geteuid() == 0;
    if (!s->as_root)
        return LC_OK;
    struct passwd *pw = getpwnam("postgres");
    if (!pw)
        return lc_err_set(err, LC_ERR_CONFIG,
                          "running as root, but there is no \"postgres\" user to run "
                          "PostgreSQL as (install the postgresql package)");
    s->pg_uid = pw->pw_uid;
    s->pg_gid = pw->pw_gid;
    s->pg_ngroups = MAX_GROUPS;
    if (getgrouplist("postgres", pw->pw_gid, s->pg_groups, &s->pg_ngroups) < 0)
        return lc_err_set(err, LC_ERR_CONFIG, "user \"postgres\" is in too many groups");
    return LC_OK;
}

static lc_rc chown_pg(const stack *s, const char *path, lc_err *err)
{
    if (s->as_root && chown(path, s->pg_uid, s->pg_gid) != 0)
        return lc_err_set(err, LC_ERR_IO, "could not give \"%s\" to user postgres: %s", path,
                          strerror(errno));
    return LC_OK;
}

static lc_rc make_layout(stack *s, lc_err *err)
{
    const char *dirs[] = {s->run_dir, s->objects_dir, s->archive_dir, s->spool_dir, s->log_dir};
    lc_rc rc;
    for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++)
        if ((rc = lc_mkdirs(dirs[i], 0755, err)) != LC_OK)
            return rc;
    if (mkdir(s->pg_dir, 0700) != 0 && errno != EEXIST)
        return lc_err_set(err, LC_ERR_IO, "could not create directory \"%s\": %s", s->pg_dir,
                          strerror(errno));
    int fd = open(s->pg_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (fd < 0)
        return lc_err_set(err, LC_ERR_IO, "could not open \"%s\": %s", s->pg_log, strerror(errno));
    close(fd);
    if ((rc = chown_pg(s, s->pg_dir, err)) != LC_OK || (rc = chown_pg(s, s->run_dir, err)) != LC_OK)
        return rc;
    return chown_pg(s, s->pg_log, err);
}

/* 0 when user postgres can use the cluster and socket directories. */
static int pg_can_reach(const stack *s)
{
    int status = 0;
    pid_t pid = fork();
    if (pid < 0)
        return 0;
    if (pid == 0) {
        if (setgroups((size_t)s->pg_ngroups, s->pg_groups) != 0 || setgid(s->pg_gid) != 0 ||
            setuid(s->pg_uid) != 0)
            _exit(2);
        _exit(access(s->pg_dir, R_OK | W_OK | X_OK) == 0 && access(s->sock_dir, W_OK | X_OK) == 0
                  ? 0
                  : 1);
    }
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return 0;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

/* As root, PostgreSQL runs as postgres, which must be able to search every parent of VAR.
 * A checkout under /root or in a mktemp -d directory (mode 0700) is not searchable: then the
 * cluster lives in /var/lib/radpipe/pg-<hash of VAR>/ instead (stable, so a second run
 * finds its data again) and VAR/pg becomes a symlink to it. */
static lc_rc check_pg_access(stack *s, lc_err *err)
{
    char hex[65], base[PATH_MAX], link_path[PATH_MAX];
    lc_rc rc;
    if (!s->as_root || pg_can_reach(s))
        return LC_OK;
    lc_sha256_hex(s->var, strlen(s->var), hex);
    hex[16] = '\0';
    if (fmt(base, sizeof(base), "/var/lib/radpipe/pg-%s", hex) ||
        fmt(link_path, sizeof(link_path), "%s/pg", s->var) ||
        fmt(s->pg_dir, sizeof(s->pg_dir), "%s/pg", base) ||
        fmt(s->sock_dir, sizeof(s->sock_dir), "%s/run", base))
        return lc_err_set(err, LC_ERR_CONFIG, "path too long");
    if ((rc = lc_mkdirs(s->sock_dir, 0755, err)) != LC_OK)
        return rc;
    if (mkdir(s->pg_dir, 0700) != 0 && errno != EEXIST)
        return lc_err_set(err, LC_ERR_IO, "could not create directory \"%s\": %s", s->pg_dir,
                          strerror(errno));
    if ((rc = chown_pg(s, s->pg_dir, err)) != LC_OK ||
        (rc = chown_pg(s, s->sock_dir, err)) != LC_OK)
        return rc;
    /* VAR/pg: replace the empty directory make_layout created by a pointer to the data */
    struct stat st;
    if (lstat(link_path, &st) == 0 && S_ISDIR(st.st_mode))
        rmdir(link_path); /* fails, harmlessly, when it holds an old cluster */
    if (lstat(link_path, &st) != 0 && symlink(s->pg_dir, link_path) != 0)
        lc_log_warn("could not link the cluster into VAR", LC_LS("path", link_path),
                    LC_LS("error", strerror(errno)));
    s->tcp_only = strlen(s->sock_dir) + strlen("/.s.PGSQL.") + strlen(s->pg_port) > SOCKET_PATH_MAX;
    if (!pg_can_reach(s))
        return lc_err_set(err, LC_ERR_CONFIG, "user postgres cannot reach \"%s\"", s->pg_dir);
    lc_log_info("user postgres cannot search VAR: the cluster lives outside it",
                LC_LS("var", s->var), LC_LS("cluster", s->pg_dir));
    return LC_OK;
}

/* One runner per VAR: a second one would fight over the cluster and the pid files. */
static lc_rc take_lock(stack *s, lc_err *err)
{
    char buf[32];
    s->lock_fd = open(s->lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (s->lock_fd < 0)
        return lc_err_set(err, LC_ERR_IO, "could not open \"%s\": %s", s->lock_path,
                          strerror(errno));
    if (flock(s->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        ssize_t n = pread(s->lock_fd, buf, sizeof(buf) - 1, 0);
        buf[n > 0 ? n : 0] = '\0';
        buf[strcspn(buf, "\n")] = '\0';
        return lc_err_set(err, LC_ERR_EXISTS, "another radpipe-stack (pid %s) is using \"%s\"",
                          *buf ? buf : "?", s->var);
    }
    int len = snprintf(buf, sizeof(buf), "%ld\n", (long)getpid());
    if (ftruncate(s->lock_fd, 0) != 0 || pwrite(s->lock_fd, buf, (size_t)len, 0) != len)
        return lc_err_set(err, LC_ERR_IO, "could not write \"%s\": %s", s->lock_path,
                          strerror(errno));
    return LC_OK;
}

static lc_rc ensure_admin_token(const stack *s, lc_err *err)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char raw[32];
    char tok[4 + 64 + 1] = "rpt_";
    if (access(s->token_path, F_OK) == 0)
        return LC_OK;
    if (lc_random_bytes(raw, sizeof(raw)) != LC_OK)
        return lc_err_set(err, LC_ERR_IO, "could not get random bytes: %s", strerror(errno));
    for (size_t i = 0; i < sizeof(raw); i++) {
        tok[4 + 2 * i] = hex[raw[i] >> 4];
        tok[5 + 2 * i] = hex[raw[i] & 15];
    }
    tok[sizeof(tok) - 1] = '\0';
    lc_rc rc = write_atomic(s->token_path, tok, 0600, err);
    if (rc == LC_OK)
        lc_log_info("created admin token", LC_LS("path", s->token_path));
    return rc;
}

/* ---- starting processes ------------------------------------------------------------- */

typedef struct spawn_spec {
    char *const *argv;
    char *const *envp;    /* NULL: environ */
    const char *log_path; /* stdout and stderr appended there; NULL: inherited */
    const char *cwd;      /* NULL: inherited */
    int as_pg;            /* drop privileges to the postgres user (when root) */
    int pdeath_sig;       /* delivered when the runner dies */
} spawn_spec;

/* In the forked child: own process group (so a terminal Ctrl-C reaches only the runner),
 * default signals, output, credentials, then PDEATHSIG (a credential change clears it) and
 * a check that the runner did not die before it was set. Never returns. */
static void child_exec(const stack *s, const spawn_spec *sp, pid_t parent)
{
    sigset_t none;
    const char *what = "open /dev/null";
    setpgid(0, 0);
    signal(SIGPIPE, SIG_DFL);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int fd = open("/dev/null", O_RDONLY);
    if (fd < 0 || dup2(fd, 0) < 0)
        goto fail;
    if (fd > 2)
        close(fd);
    if (sp->log_path) {
        what = sp->log_path;
        fd = open(sp->log_path, O_WRONLY | O_CREAT | O_APPEND, 0640);
        if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
            goto fail;
        if (fd > 2)
            close(fd);
    }
    if (sp->as_pg && s->as_root) {
        what = "switch to user postgres";
        if (setgroups((size_t)s->pg_ngroups, s->pg_groups) != 0 || setgid(s->pg_gid) != 0 ||
            setuid(s->pg_uid) != 0)
            goto fail;
    }
    if (sp->cwd) {
        what = sp->cwd;
        if (chdir(sp->cwd) != 0)
            goto fail;
    }
    prctl(PR_SET_PDEATHSIG, sp->pdeath_sig);
    if (getppid() != parent)
        _exit(1);
    what = sp->argv[0];
    execve(sp->argv[0], sp->argv, sp->envp ? sp->envp : environ);
fail:
    lc_log_error("could not start child process", LC_LS("program", sp->argv[0]),
                 LC_LS("step", what), LC_LS("error", strerror(errno)));
    _exit(127);
}

static pid_t spawn(const stack *s, const spawn_spec *sp, lc_err *err)
{
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        lc_err_set(err, LC_ERR_IO, "could not fork: %s", strerror(errno));
        return -1;
    }
    if (pid == 0)
        child_exec(s, sp, parent);
    setpgid(pid, pid); /* also in the parent, so kill(-pid) works at once */
    return pid;
}

static void set_running(stack *s, child *c, pid_t pid)
{
    c->pid = pid;
    c->started_ms = lc_now_ms();
    c->restart_at_ms = 0;
    c->stop_sig = 0;
    c->bounce = 0;
    c->failed = 0;
    write_pid_file(s, c);
    lc_log_info("started", LC_LS("program", c->name), LC_LI("pid", pid));
}

static lc_rc start_postgres(stack *s, lc_err *err)
{
    char *argv[16];
    int n = 0;
    char postgres[PATH_MAX];
    fmt(postgres, sizeof(postgres), "%s/postgres", s->pg_bin);
    argv[n++] = postgres;
    argv[n++] = "-D";
    argv[n++] = s->pg_dir;
    argv[n++] = "-p";
    argv[n++] = s->pg_port;
    argv[n++] = "-c";
    argv[n++] = "listen_addresses=127.0.0.1";
    argv[n++] = s->tcp_only ? "-c" : "-k";
    argv[n++] = s->tcp_only ? "unix_socket_directories=" : s->sock_dir;
    argv[n] = NULL;
    spawn_spec sp = {
        .argv = argv, .log_path = s->pg_log, .cwd = s->pg_dir, .as_pg = 1, .pdeath_sig = SIGINT};
    pid_t pid = spawn(s, &sp, err);
    if (pid < 0)
        return LC_ERR_IO;
    set_running(s, &s->ch[CH_PG], pid);
    return LC_OK;
}

static lc_rc start_broker(stack *s, lc_err *err)
{
    char prog[PATH_MAX];
    fmt(prog, sizeof(prog), "%s/radpipe-devbroker", s->bin_dir);
    char *argv[] = {prog,          "--addr-file", s->addr_path,        "--partitions",
                    s->partitions, "--prefix",    s->cfg.topic_prefix, NULL};
    /* a stale address would point services at a dead broker */
    if (unlink(s->addr_path) != 0 && errno != ENOENT)
        return lc_err_set(err, LC_ERR_IO, "could not remove \"%s\": %s", s->addr_path,
                          strerror(errno));
    s->brokers[0] = '\0';
    spawn_spec sp = {.argv = argv, .log_path = s->broker_log, .pdeath_sig = SIGTERM};
    pid_t pid = spawn(s, &sp, err);
    if (pid < 0)
        return LC_ERR_IO;
    set_running(s, &s->ch[CH_BROKER], pid);
    return LC_OK;
}

typedef struct envv {
    char **v;
    size_t n, cap;
} envv;

static int envv_add(envv *e, char *owned)
{
    if (!owned)
        return -1;
    if (e->n + 2 > e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 64;
        char **v = realloc(e->v, cap * sizeof(*v));
        if (!v) {
            free(owned);
            return -1;
        }
        e->v = v;
        e->cap = cap;
    }
    e->v[e->n++] = owned;
    e->v[e->n] = NULL;
    return 0;
}

static void envv_free(envv *e)
{
    for (size_t i = 0; i < e->n; i++)
        free(e->v[i]);
    free(e->v);
}

static char *kv(const char *k, const char *v)
{
    char *s = NULL;
    return asprintf(&s, "%s=%s", k, v) < 0 ? NULL : s;
}

/* The inherited environment with the stack's variables on top. */
static int service_env(const stack *s, const child *c, envv *e)
{
    char admin[64], drain[32];
    snprintf(admin, sizeof(admin), "127.0.0.1:%d", c->admin_port);
    snprintf(drain, sizeof(drain), "%lld", s->cfg.drain_seconds);
    const char *set[][2] = {
        {"RADPIPE_DATABASE_URL", s->db_url},
        {"RADPIPE_KAFKA_BROKERS", s->brokers},
        {"RADPIPE_KAFKA_TOPIC_PREFIX", s->cfg.topic_prefix},
        {"RADPIPE_STORE_URL", s->store_url},
        {"RADPIPE_SPOOL_DIR", s->spool_dir},
        {"RADPIPE_ADMIN_TOKEN_FILE", s->token_path},
        {"RADPIPE_DRAIN_SECONDS", drain},
        {"RADPIPE_ARCHIVE_URL", s->archive_url},
        /* the gateway serves its admin endpoints on its HTTP listener */
        {"RADPIPE_ADMIN_LISTEN", c->admin_port ? admin : NULL},
        {"RADPIPE_HTTP_LISTEN", c->admin_port ? NULL : s->cfg.http_listen},
    };
    const size_t nset = sizeof(set) / sizeof(set[0]);
    /* The inference engine's OpenMP threads (libgomp reads this when it loads) sleep between
     * parallel regions instead of spinning: the stack's processes share the machine. */
    if (!getenv("OMP_WAIT_POLICY") && envv_add(e, strdup("OMP_WAIT_POLICY=PASSIVE")) != 0)
        return -1;
    for (char **p = environ; *p; p++) {
        size_t kl = strcspn(*p, "=");
        int overridden = 0;
        for (size_t i = 0; i < nset && !overridden; i++)
            overridden = strlen(set[i][0]) == kl && strncmp(set[i][0], *p, kl) == 0;
        if (!overridden && envv_add(e, strdup(*p)) != 0)
            return -1;
    }
    for (size_t i = 0; i < nset; i++)
        if (set[i][1] && envv_add(e, kv(set[i][0], set[i][1])) != 0)
            return -1;
    return 0;
}

static lc_rc start_service(stack *s, child *c, lc_err *err)
{
    char prog[PATH_MAX];
    envv e = {0};
    lc_rc rc = LC_OK;
    fmt(prog, sizeof(prog), "%s/%s", s->bin_dir, c->name);
    char *argv[] = {prog, NULL};
    if (service_env(s, c, &e) != 0) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    spawn_spec sp = {.argv = argv, .envp = e.v, .pdeath_sig = SIGTERM};
    pid_t pid = spawn(s, &sp, err);
    if (pid < 0) {
        rc = LC_ERR_IO;
        goto out;
    }
    lc_strlcpy(c->brokers, s->brokers, sizeof(c->brokers));
    set_running(s, c, pid);
out:
    envv_free(&e);
    return rc;
}

static lc_rc start_child(stack *s, child *c, lc_err *err)
{
    switch (c->role) {
    case ROLE_PG:
        return start_postgres(s, err);
    case ROLE_BROKER:
        return start_broker(s, err);
    case ROLE_SERVICE:
        return start_service(s, c, err);
    }
    return LC_ERR_INTERNAL;
}

/* ---- supervision -------------------------------------------------------------------- */

static void schedule_restart(stack *s, child *c, int status)
{
    int64_t now = lc_now_ms();
    if (now - c->started_ms >= BACKOFF_RESET_MS)
        c->backoff_ms = BACKOFF_MIN_MS;
    int delay = c->backoff_ms;
    c->backoff_ms = delay * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : delay * 2;
    c->restart_at_ms = now + delay;
    c->failed = 1;
    lc_log_emit(LC_LOG_WARN, "restarting",
                (const lc_log_field[]){LC_LS("program", c->name), status_field(status),
                                       LC_LI("backoff_ms", delay), LC_LEND});
    if (c->role == ROLE_BROKER)
        s->brokers[0] = '\0';
}

static void child_exited(stack *s, child *c, int status)
{
    c->pid = 0;
    remove_pid_file(s, c);
    if (!c->stop_sig && !s->shutting_down) {
        schedule_restart(s, c, status);
        return;
    }
    int clean = (WIFEXITED(status) && WEXITSTATUS(status) == 0) ||
                (WIFSIGNALED(status) && WTERMSIG(status) == c->stop_sig);
    c->failed = !clean;
    lc_log_emit(clean ? LC_LOG_INFO : LC_LOG_WARN, clean ? "stopped" : "stopped uncleanly",
                (const lc_log_field[]){LC_LS("program", c->name), status_field(status), LC_LEND});
    if (c->bounce && !s->shutting_down) {
        c->bounce = 0;
        c->stop_sig = 0;
        c->restart_at_ms = lc_now_ms();
    }
}

static void reap(stack *s)
{
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0)
            return;
        for (int i = 0; i < CH__COUNT; i++)
            if (s->ch[i].pid == pid)
                child_exited(s, &s->ch[i], status);
    }
}

/* Read the dev broker's address once it has written its file ("HOST:PORT\n"). */
static int read_broker_addr(stack *s)
{
    char *buf = NULL;
    size_t len = 0;
    if (lc_read_file(s->addr_path, 1024, &buf, &len, NULL) != LC_OK)
        return 0;
    while (len && (buf[len - 1] == '\n' || buf[len - 1] == '\r' || buf[len - 1] == ' '))
        buf[--len] = '\0';
    int ok = len > 0 && len < sizeof(s->brokers) && strchr(buf, ':');
    if (ok)
        lc_strlcpy(s->brokers, buf, sizeof(s->brokers));
    free(buf);
    return ok;
}

static lc_rc write_stack_env(stack *s, lc_err *err)
{
    char *text = NULL;
    if (asprintf(&text,
                 "RADPIPE_DATABASE_URL=%s\nRADPIPE_KAFKA_BROKERS=%s\nRADPIPE_STORE_URL=%s\n"
                 "RADPIPE_ARCHIVE_URL=%s\nRADPIPE_HTTP_URL=%s\nRADPIPE_ADMIN_TOKEN_FILE=%s\n"
                 "RADPIPE_STACK_PID=%ld\n",
                 s->db_url, s->brokers, s->store_url, s->archive_url, s->http_url, s->token_path,
                 (long)getpid()) < 0)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    lc_rc rc = write_atomic(s->env_path, text, 0644, err);
    free(text);
    if (rc == LC_OK)
        s->env_written = 1;
    return rc;
}

/* A restarted broker listens on a new port: services still on the old one are stopped and
 * started again (child_exited restarts them at once), and stack.env is rewritten. */
static void on_broker_addr(stack *s)
{
    lc_err e;
    lc_log_info("broker ready", LC_LS("brokers", s->brokers));
    if (s->env_written && write_stack_env(s, &e) != LC_OK)
        lc_log_warn("could not update stack.env", LC_LS("error", lc_err_msg(&e)));
    for (int i = CH_FIRST_SERVICE; i < CH__COUNT; i++) {
        child *c = &s->ch[i];
        if (!c->pid || c->stop_sig || strcmp(c->brokers, s->brokers) == 0)
            continue;
        lc_log_info("restarting for the new broker address", LC_LS("program", c->name));
        c->bounce = 1;
        c->stop_sig = SIGTERM;
        kill(c->pid, SIGTERM);
    }
}

/* When c is next to be started; 0 for none. Services wait for the broker's address. */
static int64_t restart_at(const stack *s, const child *c)
{
    if (s->shutting_down || c->pid || (is_service(c) && !s->brokers[0]))
        return 0;
    return c->restart_at_ms;
}

static void run_due_restarts(stack *s)
{
    int64_t now = lc_now_ms();
    for (int i = 0; i < CH__COUNT; i++) {
        child *c = &s->ch[i];
        lc_err e;
        int64_t at = restart_at(s, c);
        if (!at || now < at)
            continue;
        if (start_child(s, c, &e) != LC_OK) {
            lc_log_error("could not restart", LC_LS("program", c->name),
                         LC_LS("error", lc_err_msg(&e)));
            c->started_ms = now;
            c->restart_at_ms = now + c->backoff_ms;
        }
    }
}

static void handle_signals(stack *s)
{
    struct signalfd_siginfo si;
    while (read(s->sigfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
        if (si.ssi_signo == SIGCHLD)
            continue; /* reap() runs on every tick */
        s->stop_requests++;
        lc_log_info(s->stop_requests == 1 ? "stopping" : "stopping faster",
                    LC_LS("signal", sig_name((int)si.ssi_signo)));
    }
}

/* One turn of the supervisor: wait up to timeout_ms for a signal, reap exited children,
 * pick up a new broker address and start children whose backoff has passed. */
static void pump(stack *s, int timeout_ms)
{
    struct pollfd p = {.fd = s->sigfd, .events = POLLIN};
    int64_t now = lc_now_ms();
    for (int i = 0; i < CH__COUNT; i++) {
        int64_t at = restart_at(s, &s->ch[i]);
        if (at && at - now < timeout_ms)
            timeout_ms = at > now ? (int)(at - now) : 0;
    }
    if (s->ch[CH_BROKER].pid && !s->brokers[0] && timeout_ms > TICK_MS)
        timeout_ms = TICK_MS; /* polling for the address file */
    if (poll(&p, 1, timeout_ms) > 0)
        handle_signals(s);
    reap(s);
    if (s->ch[CH_BROKER].pid && !s->brokers[0] && read_broker_addr(s))
        on_broker_addr(s);
    run_due_restarts(s);
}

/* ---- start-up steps ----------------------------------------------------------------- */

static int pg_initialised(const stack *s)
{
    char p[PATH_MAX];
    return fmt(p, sizeof(p), "%s/PG_VERSION", s->pg_dir) == 0 && access(p, F_OK) == 0;
}

/* initdb once, as a blocking child: signals stay pending until it is done. */
static lc_rc run_initdb(stack *s, lc_err *err)
{
    char prog[PATH_MAX], log[PATH_MAX];
    int status;
    if (pg_initialised(s))
        return LC_OK;
    fmt(prog, sizeof(prog), "%s/initdb", s->pg_bin);
    fmt(log, sizeof(log), "%s/initdb.log", s->log_dir);
    char *argv[] = {prog, "-D",   s->pg_dir,          "-U", "radpipe", "--auth=trust",
                    "-E", "UTF8", "--locale=C.UTF-8", NULL};
    lc_log_info("initialising the database cluster", LC_LS("path", s->pg_dir), LC_LS("log", log));
    spawn_spec sp = {.argv = argv, .log_path = log, .cwd = "/", .as_pg = 1, .pdeath_sig = SIGTERM};
    pid_t pid = spawn(s, &sp, err);
    if (pid < 0)
        return LC_ERR_IO;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return lc_err_set(err, LC_ERR_INTERNAL, "could not wait for initdb: %s",
                              strerror(errno));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return lc_err_set(err, LC_ERR_IO, "initdb failed (see \"%s\")", log);
    return LC_OK;
}

/* Pump until ready(s) holds, the child dies, a stop is requested or timeout_ms passes. */
static lc_rc wait_for(stack *s, child *c, int (*ready)(stack *), int timeout_ms, const char *log,
                      lc_err *err)
{
    int64_t deadline = lc_now_ms() + timeout_ms;
    for (;;) {
        if (s->stop_requests)
            return LC_ERR_CANCELLED;
        if (!c->pid)
            return lc_err_set(err, LC_ERR_UNAVAILABLE, "%s exited during start-up (see \"%s\")",
                              c->name, log);
        if (ready(s))
            return LC_OK;
        if (lc_now_ms() >= deadline)
            return lc_err_set(err, LC_ERR_TIMEOUT, "%s did not become ready in %d s (see \"%s\")",
                              c->name, timeout_ms / 1000, log);
        pump(s, TICK_MS);
    }
}

static void pg_conninfo(const stack *s, char *buf, size_t cap)
{
    snprintf(buf, cap, "host=127.0.0.1 port=%s dbname=postgres user=radpipe connect_timeout=2",
             s->pg_port);
}

static int pg_ready(stack *s)
{
    char ci[256];
    pg_conninfo(s, ci, sizeof(ci));
    return PQping(ci) == PQPING_OK;
}

static int broker_ready(stack *s)
{
    return s->brokers[0] != '\0';
}

static lc_rc ensure_database(stack *s, lc_err *err)
{
    char ci[256];
    const char *name = "radpipe";
    PGresult *r = NULL;
    lc_rc rc = LC_OK;
    pg_conninfo(s, ci, sizeof(ci));
    PGconn *conn = PQconnectdb(ci);
    if (PQstatus(conn) != CONNECTION_OK) {
        rc = lc_err_set(err, LC_ERR_UNAVAILABLE, "could not connect to PostgreSQL: %s",
                        PQerrorMessage(conn));
        goto out;
    }
    r = PQexecParams(conn, "SELECT 1 FROM pg_database WHERE datname = $1", 1, NULL, &name, NULL,
                     NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        rc = lc_err_set(err, LC_ERR_DB, "could not look up database \"radpipe\": %s",
                        PQerrorMessage(conn));
        goto out;
    }
    if (PQntuples(r) > 0)
        goto out;
    PQclear(r);
    r = PQexec(conn, "CREATE DATABASE radpipe");
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        rc = lc_err_set(err, LC_ERR_DB, "could not create database \"radpipe\": %s",
                        PQerrorMessage(conn));
        goto out;
    }
    lc_log_info("created database", LC_LS("database", "radpipe"));
out:
    PQclear(r);
    PQfinish(conn);
    return rc;
}

static lc_rc check_binaries(const stack *s, lc_err *err)
{
    char p[PATH_MAX];
    for (int i = CH_BROKER; i < CH__COUNT; i++) {
        if (!s->ch[i].selected)
            continue;
        if (fmt(p, sizeof(p), "%s/%s", s->bin_dir, s->ch[i].name) != 0 || access(p, X_OK) != 0)
            return lc_err_set(err, LC_ERR_NOT_FOUND,
                              "could not find \"%s\" next to radpipe-stack: %s (build it with "
                              "make, or choose services with --services)",
                              p, strerror(errno));
    }
    return LC_OK;
}

static size_t discard(char *ptr, size_t size, size_t n, void *ud)
{
    (void)ptr;
    (void)ud;
    return size * n;
}

static int http_ok(const char *url)
{
    long code = 0;
    CURL *h = curl_easy_init();
    if (!h)
        return 0;
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 1000L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, discard);
    if (curl_easy_perform(h) == CURLE_OK)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(h);
    return code == 200;
}

static void probe_url(const stack *s, const child *c, char *buf, size_t cap)
{
    if (c->admin_port)
        snprintf(buf, cap, "http://127.0.0.1:%d/readyz", c->admin_port);
    else
        snprintf(buf, cap, "%s/healthz", s->http_url);
}

/* Probe every service until each answers 200 or SERVICES_READY_MS passes. A timeout is
 * logged, not fatal: the stack keeps supervising. Returns 0 when interrupted by a stop. */
static int wait_services_ready(stack *s)
{
    int ready[CH__COUNT] = {0};
    char url[512];
    int64_t deadline = lc_now_ms() + SERVICES_READY_MS;
    for (;;) {
        int pending = 0;
        for (int i = CH_FIRST_SERVICE; i < CH__COUNT; i++) {
            child *c = &s->ch[i];
            if (!c->selected || ready[i])
                continue;
            probe_url(s, c, url, sizeof(url));
            ready[i] = c->pid && http_ok(url);
            pending += !ready[i];
        }
        if (!pending)
            return 1;
        if (s->stop_requests)
            return 0;
        if (lc_now_ms() >= deadline)
            break;
        pump(s, 500);
    }
    for (int i = CH_FIRST_SERVICE; i < CH__COUNT; i++) {
        if (!s->ch[i].selected || ready[i])
            continue;
        probe_url(s, &s->ch[i], url, sizeof(url));
        lc_log_warn("service not ready", LC_LS("program", s->ch[i].name), LC_LS("probe", url),
                    LC_LI("waited_s", SERVICES_READY_MS / 1000));
    }
    return 1;
}

static void print_banner(const stack *s)
{
    fprintf(stderr,
            "\nradpipe is up\n"
            "  database   %s\n"
            "  kafka      %s\n"
            "  objects    %s\n"
            "  archive    %s\n"
            "  state      %s (variables in %s)\n",
            s->db_url, s->brokers, s->store_url, s->archive_url, s->var, s->env_path);
    if (s->ch[CH_GATEWAY].selected)
        fprintf(stderr,
                "  API        %s/api/v1/studies (health: %s/healthz)\n"
                "  token      %s (send it as \"Authorization: Bearer <token>\")\n"
                "Send the bundled sample series:\n"
                "  for f in tests/data/series/mr-4slice/jpeg-lossless-sv1/*.dcm; do curl -s "
                "-H \"Authorization: Bearer $(cat %s)\" -H 'Content-Type: application/dicom' "
                "--data-binary @\"$f\" %s/api/v1/instances; done\n",
                s->http_url, s->http_url, s->token_path, s->token_path, s->http_url);
    fprintf(stderr, "Press Ctrl-C to stop.\n\n");
}

static lc_rc start_up(stack *s, lc_err *err)
{
    lc_rc rc;
    if ((rc = run_initdb(s, err)) != LC_OK)
        return rc;
    if (s->tcp_only)
        lc_log_warn("socket directory path too long, PostgreSQL listens on TCP only",
                    LC_LS("path", s->sock_dir), LC_LI("max_bytes", SOCKET_PATH_MAX));
    if ((rc = start_postgres(s, err)) != LC_OK ||
        (rc = wait_for(s, &s->ch[CH_PG], pg_ready, PG_READY_MS, s->pg_log, err)) != LC_OK ||
        (rc = ensure_database(s, err)) != LC_OK)
        return rc;
    if ((rc = start_broker(s, err)) != LC_OK ||
        (rc = wait_for(s, &s->ch[CH_BROKER], broker_ready, BROKER_READY_MS, s->broker_log, err)) !=
            LC_OK)
        return rc;
    for (int i = CH_FIRST_SERVICE; i < CH__COUNT; i++)
        if (s->ch[i].selected && (rc = start_service(s, &s->ch[i], err)) != LC_OK)
            return rc;
    s->services_started = 1;
    if (!wait_services_ready(s))
        return LC_ERR_CANCELLED;
    if ((rc = write_stack_env(s, err)) != LC_OK)
        return rc;
    lc_log_info("stack ready", LC_LS("env", s->env_path));
    print_banner(s);
    return LC_OK;
}

/* ---- shutdown ----------------------------------------------------------------------- */

static int role_running(const stack *s, role r)
{
    for (int i = 0; i < CH__COUNT; i++)
        if (s->ch[i].role == r && s->ch[i].pid)
            return 1;
    return 0;
}

/* Send each signal in turn to the children of one role, waiting up to waits_ms[i] for them
 * to exit; another SIGINT/SIGTERM skips the rest of the current wait. SIGKILL goes to the
 * whole process group so nothing the child started survives. */
static void stop_role(stack *s, role r, const int *sigs, const int *waits_ms, int n)
{
    for (int step = 0; step < n && role_running(s, r); step++) {
        for (int i = 0; i < CH__COUNT; i++) {
            child *c = &s->ch[i];
            if (c->role != r || !c->pid)
                continue;
            if (step == 0)
                c->stop_sig = sigs[0];
            if (step > 0)
                lc_log_warn("still running, escalating", LC_LS("program", c->name),
                            LC_LS("signal", sig_name(sigs[step])));
            kill(sigs[step] == SIGKILL ? -c->pid : c->pid, sigs[step]);
        }
        int seen = s->stop_requests;
        int64_t deadline = lc_now_ms() + waits_ms[step];
        while (role_running(s, r) && lc_now_ms() < deadline && s->stop_requests == seen)
            pump(s, TICK_MS);
    }
}

static int shut_down(stack *s)
{
    int bad = 0;
    int svc_wait = (int)(s->cfg.drain_seconds + 5) * 1000;
    s->shutting_down = 1;
    for (int i = 0; i < CH__COUNT; i++)
        s->ch[i].restart_at_ms = 0;
    stop_role(s, ROLE_SERVICE, (const int[]){SIGTERM, SIGKILL}, (const int[]){svc_wait, 5000}, 2);
    stop_role(s, ROLE_BROKER, (const int[]){SIGTERM, SIGKILL}, (const int[]){5000, 5000}, 2);
    stop_role(s, ROLE_PG, (const int[]){SIGINT, SIGQUIT, SIGKILL}, (const int[]){30000, 5000, 5000},
              3);
    if (unlink(s->env_path) != 0 && errno != ENOENT)
        lc_log_warn("could not remove stack.env", LC_LS("error", strerror(errno)));
    for (int i = 0; i < CH__COUNT; i++) {
        child *c = &s->ch[i];
        if (c->pid)
            lc_log_error("could not stop", LC_LS("program", c->name), LC_LI("pid", c->pid));
        else if (c->failed)
            lc_log_error("did not exit cleanly", LC_LS("program", c->name));
        bad += c->pid || c->failed;
    }
    return bad ? 1 : 0;
}

/* ---- main --------------------------------------------------------------------------- */

static lc_rc block_signals(stack *s, lc_err *err)
{
    sigemptyset(&s->sigmask);
    sigaddset(&s->sigmask, SIGINT);
    sigaddset(&s->sigmask, SIGTERM);
    sigaddset(&s->sigmask, SIGHUP);
    sigaddset(&s->sigmask, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &s->sigmask, NULL) != 0)
        return lc_err_set(err, LC_ERR_INTERNAL, "could not block signals: %s", strerror(errno));
    s->sigfd = signalfd(-1, &s->sigmask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (s->sigfd < 0)
        return lc_err_set(err, LC_ERR_INTERNAL, "could not create signalfd: %s", strerror(errno));
    signal(SIGPIPE, SIG_IGN);
    /* `make run` execs us from make's recipe shell: a SIGTERM sent to make alone (not to
     * the terminal's process group, as Ctrl-C is) would orphan the stack. Stop when our
     * parent goes, as if we had been sent SIGTERM ourselves; the signal is blocked, so it
     * arrives through the signalfd like any other. */
    pid_t parent = getppid();
    if (prctl(PR_SET_PDEATHSIG, SIGTERM) == 0 && getppid() != parent)
        kill(getpid(), SIGTERM);
    return LC_OK;
}

static lc_rc prepare(stack *s, lc_err *err)
{
    lc_rc rc;
    if ((rc = parse_http_listen(s, err)) != LC_OK || (rc = select_services(s, err)) != LC_OK ||
        (rc = find_bin_dir(s, err)) != LC_OK || (rc = check_binaries(s, err)) != LC_OK ||
        (rc = find_pg_bin(s, err)) != LC_OK || (rc = make_paths(s, err)) != LC_OK ||
        (rc = lookup_pg_user(s, err)) != LC_OK || (rc = make_layout(s, err)) != LC_OK ||
        (rc = check_pg_access(s, err)) != LC_OK || (rc = take_lock(s, err)) != LC_OK ||
        (rc = ensure_admin_token(s, err)) != LC_OK)
        return rc;
    return block_signals(s, err);
}

int main(int argc, char **argv)
{
    stack s = {.sigfd = -1, .lock_fd = -1};
    lc_cfg_table table = {cfg_vars, sizeof(cfg_vars) / sizeof(cfg_vars[0]), &s.cfg};
    lc_err err = {0};
    int status = 1;

    lc_log_init(PROGRAM, LC_LOG_INFO);
    int a = parse_args(&s, argc, argv, &table);
    if (a >= 0)
        return a;
    if (lc_cfg_load(&table, 1, &err) != LC_OK)
        goto out; /* lc_cfg_load logged every bad value */
    lc_log_init(PROGRAM, (lc_log_level)lc_log_level_parse(s.cfg.log_level));
    init_children(&s);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (prepare(&s, &err) != LC_OK) {
        lc_log_error("could not prepare the stack", LC_LS("error", lc_err_msg(&err)));
        goto out_curl;
    }
    lc_log_info("starting", LC_LS("var", s.var), LC_LS("postgres", s.pg_bin),
                LC_LI("pg_port", s.cfg.pg_port));
    lc_rc rc = start_up(&s, &err);
    if (rc != LC_OK && rc != LC_ERR_CANCELLED)
        lc_log_error("could not start the stack", LC_LS("error", lc_err_msg(&err)));
    while (rc == LC_OK && !s.stop_requests)
        pump(&s, 1000);
    status = shut_down(&s);
    if (rc != LC_OK && rc != LC_ERR_CANCELLED)
        status = 1;
    lc_log_info("stack stopped", LC_LI("exit_status", status));
    unlink(s.lock_path);
out_curl:
    curl_global_cleanup();
out:
    if (s.sigfd >= 0)
        close(s.sigfd);
    if (s.lock_fd >= 0)
        close(s.lock_fd);
    free(s.archive_url);
    lc_cfg_release(&table, 1);
    return status;
}
