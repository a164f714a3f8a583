/*
 * radpipe-devbroker: a Kafka-protocol broker for `make run` and the tests, built from
 * librdkafka's mock cluster. It creates every radpipe topic, publishes the bootstrap address
 * (the mock cluster listens on an ephemeral port) on stdout and optionally in a file, and
 * runs until SIGTERM or SIGINT. Single-threaded main; the cluster runs on librdkafka threads.
 */
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include "lc/kafka.h"
#include "lc/log.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: radpipe-devbroker [--prefix P] [--partitions N] [--addr-file PATH]\n"
               "                         [--log-level LEVEL]\n"
               "Runs a single-node Kafka-protocol broker (librdkafka mock cluster) on 127.0.0.1\n"
               "with every radpipe topic, prints \"bootstrap=HOST:PORT\" and runs until SIGTERM.\n"
               "  --prefix P         topic name prefix (default \"radpipe.\")\n"
               "  --partitions N     partitions per topic (default 4)\n"
               "  --addr-file PATH   also write the bootstrap address to PATH (atomically;\n"
               "                     removed again on a clean exit)\n"
               "  --log-level LEVEL  debug, info, warn or error (default info)\n");
}

/* The mock cluster's own threads log through its handle: forward to JSON lines. librdkafka
 * forbids calling back into it from here. */
static void log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    lc_log_level l = level <= 3   ? LC_LOG_ERROR
                     : level == 4 ? LC_LOG_WARN
                     : level <= 6 ? LC_LOG_INFO
                                  : LC_LOG_DEBUG;
    /* the hosting handle has no bootstrap.servers on purpose: its warning would mislead */
    if (strcmp(fac, "CONFWARN") == 0)
        l = LC_LOG_DEBUG;
    if (lc_log_enabled(l))
        lc_log_emit(l, buf,
                    (const lc_log_field[]){LC_LS("component", "librdkafka"), LC_LS("facility", fac),
                                           LC_LEND});
}

/* Readers poll for the file, so it must appear whole: write a temp file, then rename. */
static int write_addr_file(const char *path, const char *addr)
{
    char tmp[4096];
    if (snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof(tmp))
        return -1;
    FILE *f = fopen(tmp, "w");
    if (!f)
        return -1;
    int bad = fprintf(f, "%s\n", addr) < 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *prefix = "radpipe.", *addr_file = NULL;
    int partitions = 4, level = LC_LOG_INFO;
    static const struct option longopts[] = {{"prefix", required_argument, NULL, 'p'},
                                             {"partitions", required_argument, NULL, 'n'},
                                             {"addr-file", required_argument, NULL, 'a'},
                                             {"log-level", required_argument, NULL, 'l'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    for (int ch; (ch = getopt_long(argc, argv, "p:n:a:l:h", longopts, NULL)) != -1;) {
        char *end;
        switch (ch) {
        case 'p':
            prefix = optarg;
            break;
        case 'a':
            addr_file = optarg;
            break;
        case 'n':
            partitions = (int)strtol(optarg, &end, 10);
            if (*end || partitions < 1 || partitions > 1000) {
                fprintf(stderr, "radpipe-devbroker: invalid partition count \"%s\"\n", optarg);
                return 2;
            }
            break;
        case 'l':
            if ((level = lc_log_level_parse(optarg)) < 0) {
                fprintf(stderr, "radpipe-devbroker: invalid log level \"%s\"\n", optarg);
                return 2;
            }
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        usage(stderr);
        return 2;
    }
    lc_log_init("devbroker", (lc_log_level)level);

    /* Blocked before librdkafka starts its threads so they inherit the mask and the signal
     * is only ever taken by sigwait below. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    int status = 1;
    rd_kafka_t *rk = NULL;
    rd_kafka_mock_cluster_t *mc = NULL;
    char es[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, log_cb);
    /* The handle only hosts the cluster (its logger and threads); it never produces. */
    if (!(rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, es, sizeof(es)))) {
        rd_kafka_conf_destroy(conf);
        lc_log_error("could not create kafka handle", LC_LS("error", es));
        goto out;
    }
    if (!(mc = rd_kafka_mock_cluster_new(rk, 1))) {
        lc_log_error("could not create mock kafka cluster");
        goto out;
    }
    for (int t = 0; t < LC_TOPIC__COUNT; t++) {
        char name[256];
        if (lc_topic_name(prefix, (lc_topic)t, name, sizeof(name)) != LC_OK) {
            lc_log_error("invalid topic prefix", LC_LS("prefix", prefix));
            goto out;
        }
        rd_kafka_resp_err_t e = rd_kafka_mock_topic_create(mc, name, partitions, 1);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
            lc_log_error("could not create topic", LC_LS("topic", name),
                         LC_LS("error", rd_kafka_err2str(e)));
            goto out;
        }
    }
    const char *addr = rd_kafka_mock_cluster_bootstraps(mc);
    printf("bootstrap=%s\n", addr);
    fflush(stdout);
    if (addr_file && write_addr_file(addr_file, addr) != 0) {
        lc_log_error("could not write address file", LC_LS("path", addr_file));
        goto out;
    }
    lc_log_info("dev broker ready", LC_LS("bootstrap", addr), LC_LS("prefix", prefix),
                LC_LI("partitions", partitions));

    int sig = 0;
    sigwait(&sigs, &sig);
    lc_log_info("dev broker stopping", LC_LS("signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"));
    status = 0;
out:
    if (mc)
        rd_kafka_mock_cluster_destroy(mc);
    if (rk)
        rd_kafka_destroy(rk);
    if (addr_file && status == 0)
        unlink(addr_file);
    return status;
}
