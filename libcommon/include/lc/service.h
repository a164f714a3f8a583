/*
 * service.h: what every radpipe executable does at start and stop, so each main() stays short:
 * `--help` (the RADPIPE_* variables), configuration, JSON logging, a signal thread that turns
 * SIGTERM/SIGINT into a stop flag (a second signal exits at once) and SIGHUP into a reload
 * flag (a service that reloads nothing simply ignores SIGHUP), database connection and
 * migrations, the Kafka producer and outbox relay, the object store and the admin listener.
 * An lc_service is created and released by the main thread; stop is read by every thread.
 */
#ifndef LC_SERVICE_H
#define LC_SERVICE_H

#include <pthread.h>
#include <stdatomic.h>
#include "lc/admin.h"
#include "lc/cfg.h"
#include "lc/db.h"
#include "lc/kafka.h"
#include "lc/metrics.h"
#include "lc/outbox.h"
#include "lc/store.h"

#define RADPIPE_VERSION "0.1.0"

typedef struct lc_common_cfg {
    char *log_level;
    char *database_url;
    long long db_wait_seconds;
    char *kafka_brokers;
    char *topic_prefix;
    char *store_url;
    char *admin_listen;
    long long drain_seconds;
    char *kafka_options; /* extra librdkafka properties "k=v,k=v" (secret: may hold passwords) */
} lc_common_cfg;

enum {
    LC_SVC_DB = 1u << 0,       /* connect and migrate */
    LC_SVC_PRODUCER = 1u << 1, /* Kafka producer */
    LC_SVC_RELAY = 1u << 2,    /* outbox relay thread (needs DB and PRODUCER) */
    LC_SVC_STORE = 1u << 3,    /* open RADPIPE_STORE_URL */
    LC_SVC_ADMIN = 1u << 4,    /* own admin listener on RADPIPE_ADMIN_LISTEN */
};

typedef struct lc_service_def {
    const char *name;          /* "dicom-indexer": log "service", client id, group id */
    const char *summary;       /* one line for --help */
    const char *admin_default; /* default RADPIPE_ADMIN_LISTEN, e.g. "127.0.0.1:9101" */
    unsigned needs;
    const lc_cfg_table *tables; /* the service's own variables (may be NULL) */
    size_t ntables;
} lc_service_def;

typedef struct lc_service {
    const lc_service_def *def;
    lc_common_cfg cfg;
    atomic_int stop;   /* set by the signal thread; read by everyone */
    atomic_int reload; /* set to 1 by SIGHUP; the service takes it with atomic_exchange(.., 0) */
    char source[80];   /* CloudEvents source, "/radpipe/<name>" */
    lc_kafka_conf kconf;
    lc_metrics *metrics;
    lc_admin *admin;
    lc_db *db; /* the main thread's connection */
    lc_kafka_producer *producer;
    lc_outbox_relay *relay;
    lc_store *store;
    pthread_t sig_thread;
    int sig_thread_started;
    char **kafka_extra;       /* kconf.extra, parsed from cfg.kafka_options */
    pthread_mutex_t check_mu; /* guards check_db */
    lc_db *check_db;          /* the readiness probe's own connection */
} lc_service;

/* Handle the common command line: --help prints the summary and every variable with its
 * default (markdown rows, used to keep README.md true) and returns 0; --version likewise;
 * an unknown argument prints usage and returns 2. Returns -1 to go on. */
int lc_service_args(const lc_service_def *def, int argc, char **argv);

/* Everything up to "ready to consume": on failure logs the reason and returns it. Blocks
 * SIGTERM/SIGINT/SIGHUP in the calling thread before creating threads, so call it first. */
lc_rc lc_service_init(lc_service *s, const lc_service_def *def, lc_err *err);
/* Stop in reverse order: mark draining, stop the relay (publishing what is pending for up to
 * the drain time), flush the producer, close everything. */
void lc_service_release(lc_service *s);

static inline int lc_service_stopping(lc_service *s)
{
    return atomic_load(&s->stop) != 0;
}

/* Readiness checks the admin endpoints use (ctx is the lc_service). */
lc_rc lc_service_check_db(void *ctx, lc_err *err);
lc_rc lc_service_check_kafka(void *ctx, lc_err *err);

/* The common variables, for tests and tools. */
extern const lc_cfg_var lc_common_cfg_vars[];
extern const size_t lc_common_cfg_nvars;

#endif
