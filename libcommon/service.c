/*
 * service.c: start-up and shut-down shared by every radpipe executable (see service.h).
 * The main thread owns the lc_service; the signal thread only sets stop; readiness checks run
 * on admin threads and use their own connection under check_mu.
 */
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "lc/log.h"
#include "lc/service.h"
#include "lc/util.h"

#define OFF(f) offsetof(lc_common_cfg, f)

const lc_cfg_var lc_common_cfg_vars[] = {
    {"RADPIPE_LOG_LEVEL", LC_CFG_ENUM, "info", 0, -1, 0, "debug|info|warn|error",
     "minimum log level; patient data is only logged at debug", OFF(log_level)},
    {"RADPIPE_DATABASE_URL", LC_CFG_STR, "postgresql://radpipe@127.0.0.1:55432/radpipe", 0, -1,
     LC_CFG_SECRET, NULL, "PostgreSQL connection URI (libpq syntax)", OFF(database_url)},
    {"RADPIPE_DB_WAIT_SECONDS", LC_CFG_INT, "60", 0, 86400, 0, NULL,
     "how long to wait for PostgreSQL at start before giving up", OFF(db_wait_seconds)},
    {"RADPIPE_KAFKA_BROKERS", LC_CFG_STR, "127.0.0.1:9092", 0, -1, 0, NULL,
     "Kafka bootstrap servers, host:port[,host:port]", OFF(kafka_brokers)},
    {"RADPIPE_KAFKA_TOPIC_PREFIX", LC_CFG_STR, "radpipe.", 0, -1, 0, NULL,
     "prefix of every topic name (proto/topics.md)", OFF(topic_prefix)},
    {"RADPIPE_KAFKA_OPTIONS", LC_CFG_STR, "", 0, -1, LC_CFG_SECRET, NULL,
     "extra librdkafka properties, comma-separated key=value (e.g. security.protocol=SSL)",
     OFF(kafka_options)},
    {"RADPIPE_STORE_URL", LC_CFG_STR, "file://var/objects", 0, -1, 0, NULL,
     "object store for received instances and job results", OFF(store_url)},
    {"RADPIPE_ADMIN_LISTEN", LC_CFG_STR, "", 0, -1, 0, NULL,
     "admin listener (/healthz, /readyz, /metrics); default 127.0.0.1:9101 indexer, :9102 "
     "uploader, :9103 segmenter; the gateway serves them on RADPIPE_HTTP_LISTEN",
     OFF(admin_listen)},
    {"RADPIPE_DRAIN_SECONDS", LC_CFG_INT, "30", 0, 3600, 0, NULL,
     "on SIGTERM, how long in-flight work may take to finish before it is released",
     OFF(drain_seconds)},
};
const size_t lc_common_cfg_nvars = sizeof(lc_common_cfg_vars) / sizeof(lc_common_cfg_vars[0]);

static size_t build_tables(const lc_service_def *def, lc_common_cfg *cfg, lc_cfg_table *t,
                           size_t cap)
{
    size_t n = 0;
    t[n++] = (lc_cfg_table){lc_common_cfg_vars, lc_common_cfg_nvars, cfg};
    for (size_t i = 0; i < def->ntables && n < cap; i++)
        t[n++] = def->tables[i];
    return n;
}

int lc_service_args(const lc_service_def *def, int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            lc_common_cfg dummy = {0};
            lc_cfg_table t[9];
            size_t n = build_tables(def, &dummy, t, 9);
            printf("%s %s: %s\n\nConfiguration (environment variables):\n\n", def->name,
                   RADPIPE_VERSION, def->summary);
            printf("| Variable | Default | Meaning |\n|---|---|---|\n");
            lc_cfg_print_markdown(stdout, t, n);
            if (def->needs & LC_SVC_STORE) { /* what an s3:// store reads (lc/store.h) */
                const lc_cfg_table s3 = {lc_store_s3_cfg_vars, lc_store_s3_cfg_nvars, NULL};
                lc_cfg_print_markdown(stdout, &s3, 1);
            }
            return 0;
        }
        if (strcmp(argv[i], "--version") == 0) {
            printf("%s %s\n", def->name, RADPIPE_VERSION);
            return 0;
        }
        fprintf(stderr, "%s: unknown argument \"%s\" (try --help)\n", def->name, argv[i]);
        return 2;
    }
    return -1;
}

/* Turns SIGTERM/SIGINT into s->stop; a second one exits at once; SIGHUP sets s->reload;
 * SIGUSR2 ends the thread. */
static void *signal_main(void *arg)
{
    lc_service *s = arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGUSR2);
    for (;;) {
        int sig = 0;
        if (sigwait(&set, &sig) != 0)
            continue;
        if (sig == SIGUSR2)
            return NULL;
        if (sig == SIGHUP) {
            atomic_store(&s->reload, 1);
            lc_log_info("reload requested", LC_LI("signal", sig));
            continue;
        }
        if (atomic_exchange(&s->stop, 1)) {
            lc_log_warn("second signal: exiting without draining", LC_LI("signal", sig));
            _exit(1);
        }
        lc_log_info("stopping: draining in-flight work", LC_LI("signal", sig),
                    LC_LI("drain_seconds", s->cfg.drain_seconds));
    }
}

static void free_kafka_extra(char **extra)
{
    if (!extra)
        return;
    for (char **p = extra; *p; p++)
        free(*p);
    free(extra);
}

/* "a=1,b=2" -> {"a=1","b=2",NULL}; LC_ERR_CONFIG for an entry without '='. */
static lc_rc parse_kafka_options(const char *opts, char ***out, lc_err *err)
{
    size_t n = 0, cap = 1;
    for (const char *p = opts; *p; p++)
        cap += *p == ',';
    char **v = calloc(cap + 1, sizeof(*v));
    if (!v)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    const char *p = opts;
    while (*p) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (len) {
            char *item = strndup(p, len);
            if (!item || !strchr(item, '=') || item[0] == '=') {
                free(item);
                free_kafka_extra(v);
                return lc_err_set(err, LC_ERR_CONFIG,
                                  "invalid value for RADPIPE_KAFKA_OPTIONS: entry %zu is not "
                                  "key=value",
                                  n + 1);
            }
            v[n++] = item;
        }
        p += len + (comma ? 1 : 0);
    }
    *out = v;
    return LC_OK;
}

lc_rc lc_service_check_db(void *ctx, lc_err *err)
{
    lc_service *s = ctx;
    PGresult *res = NULL;
    lc_rc rc;
    pthread_mutex_lock(&s->check_mu);
    if (!s->check_db) {
        rc = lc_db_connect(s->cfg.database_url, 1000, &s->stop, &s->check_db, err);
        if (rc != LC_OK)
            goto out;
    }
    rc = lc_db_ensure(s->check_db, err);
    if (rc == LC_OK)
        rc = lc_db_exec(s->check_db, "SELECT 1", 0, NULL, &res, err);
    PQclear(res);
out:
    pthread_mutex_unlock(&s->check_mu);
    return rc;
}

lc_rc lc_service_check_kafka(void *ctx, lc_err *err)
{
    lc_service *s = ctx;
    return lc_kafka_producer_ping(s->producer, 1000, err);
}

lc_rc lc_service_init(lc_service *s, const lc_service_def *def, lc_err *err)
{
    lc_rc rc;
    lc_cfg_table t[9];
    size_t nt;
    sigset_t set;

    memset(s, 0, sizeof(*s));
    s->def = def;
    atomic_init(&s->stop, 0);
    atomic_init(&s->reload, 0);
    pthread_mutex_init(&s->check_mu, NULL);
    snprintf(s->source, sizeof(s->source), "/radpipe/%s", def->name);
    lc_log_init(def->name, LC_LOG_INFO);

    /* Signals: blocked here, before any thread exists, so every thread inherits the mask and
     * only the signal thread receives them. */
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    nt = build_tables(def, &s->cfg, t, 9);
    if ((rc = lc_cfg_load(t, nt, err)) != LC_OK)
        return rc;
    lc_log_init(def->name, (lc_log_level)lc_log_level_parse(s->cfg.log_level));
    if (!s->cfg.admin_listen[0] && def->admin_default) {
        free(s->cfg.admin_listen);
        s->cfg.admin_listen = strdup(def->admin_default);
        if (!s->cfg.admin_listen)
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    }
    if ((rc = parse_kafka_options(s->cfg.kafka_options, &s->kafka_extra, err)) != LC_OK)
        return rc;
    s->kconf = (lc_kafka_conf){.brokers = s->cfg.kafka_brokers,
                               .topic_prefix = s->cfg.topic_prefix,
                               .client_id = def->name,
                               .extra = (const char *const *)s->kafka_extra};

    if (pthread_create(&s->sig_thread, NULL, signal_main, s) != 0)
        return lc_err_set(err, LC_ERR_INTERNAL, "could not start the signal thread");
    s->sig_thread_started = 1;

    if (!(s->metrics = lc_metrics_new()))
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    if ((def->needs & LC_SVC_ADMIN) && s->cfg.admin_listen[0]) {
        if (lc_admin_start(s->cfg.admin_listen, s->metrics, &s->admin, err) != LC_OK)
            return lc_err_wrap(err, "could not start the admin listener on \"%s\"",
                               s->cfg.admin_listen);
    }
    if (def->needs & LC_SVC_DB) {
        rc = lc_db_connect(s->cfg.database_url, (int)s->cfg.db_wait_seconds * 1000, &s->stop,
                           &s->db, err);
        if (rc != LC_OK)
            return rc;
        if ((rc = lc_db_migrate(s->db, err)) != LC_OK)
            return rc;
        if (s->admin)
            lc_admin_add_check(s->admin, "database", lc_service_check_db, s);
    }
    if (def->needs & LC_SVC_PRODUCER) {
        if ((rc = lc_kafka_producer_new(&s->kconf, &s->producer, err)) != LC_OK)
            return rc;
        if (s->admin)
            lc_admin_add_check(s->admin, "kafka", lc_service_check_kafka, s);
    }
    if ((def->needs & LC_SVC_RELAY) && s->producer) {
        rc = lc_outbox_relay_start(s->cfg.database_url, s->producer, s->metrics, &s->relay, err);
        if (rc != LC_OK)
            return rc;
    }
    if (def->needs & LC_SVC_STORE) {
        if ((rc = lc_store_open(s->cfg.store_url, &s->store, err)) != LC_OK)
            return rc;
    }
    lc_log_info("started", LC_LS("version", RADPIPE_VERSION),
                LC_LS("admin", s->admin ? s->cfg.admin_listen : ""),
                LC_LS("store", s->store ? lc_store_url(s->store) : ""));
    return LC_OK;
}

void lc_service_release(lc_service *s)
{
    lc_cfg_table t[9];
    size_t nt;
    if (!s || !s->def)
        return;
    if (s->admin)
        lc_admin_set_draining(s->admin);
    lc_outbox_relay_stop(s->relay, (int)s->cfg.drain_seconds * 1000);
    s->relay = NULL;
    lc_kafka_producer_free(s->producer, 5000);
    s->producer = NULL;
    lc_admin_free(s->admin); /* before the checks' resources go away */
    s->admin = NULL;
    lc_db_free(s->check_db);
    lc_db_free(s->db);
    lc_store_free(s->store);
    lc_metrics_free(s->metrics);
    if (s->sig_thread_started) {
        pthread_kill(s->sig_thread, SIGUSR2);
        pthread_join(s->sig_thread, NULL);
    }
    free_kafka_extra(s->kafka_extra);
    nt = build_tables(s->def, &s->cfg, t, 9);
    lc_cfg_release(t, nt);
    pthread_mutex_destroy(&s->check_mu);
    lc_log_info("stopped");
    s->def = NULL;
}
