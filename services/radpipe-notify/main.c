/*
 * main.c: radpipe-notify, a small CLI that publishes instance.stored events for DICOM files
 * already on disk (files or folders, walked recursively), so other pipelines and DICOM
 * receivers can feed radpipe: e.g. storescp --sort-on-study-uid st
 * --exec-on-eostudy 'radpipe-notify --move --name #a #p'. Each file is stored in the object
 * store (RADPIPE_STORE_URL) and announced on Kafka (notify.c). Exit status: 0 when every
 * DICOM file was published, 1 when a file was skipped or failed, 2 on bad usage.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lc/cfg.h"
#include "lc/kafka.h"
#include "lc/log.h"
#include "lc/service.h"
#include "lc/store.h"
#include "notify.h"

/* The variables radpipe-notify reads: the services' own rows (same names, defaults, help). */
static const char *const kVars[] = {"RADPIPE_LOG_LEVEL", "RADPIPE_KAFKA_BROKERS",
                                    "RADPIPE_KAFKA_TOPIC_PREFIX", "RADPIPE_KAFKA_OPTIONS",
                                    "RADPIPE_STORE_URL"};
#define NVARS (sizeof(kVars) / sizeof(kVars[0]))

static size_t vars_table(lc_cfg_var *out)
{
    size_t n = 0;
    for (size_t k = 0; k < NVARS; k++)
        for (size_t i = 0; i < lc_common_cfg_nvars; i++)
            if (strcmp(lc_common_cfg_vars[i].name, kVars[k]) == 0)
                out[n++] = lc_common_cfg_vars[i];
    return n;
}

static void usage(FILE *f, const lc_cfg_table *t)
{
    fprintf(f,
            "radpipe-notify " RADPIPE_VERSION ": publish instance.stored events for DICOM files\n"
            "\n"
            "usage: radpipe-notify [OPTIONS] PATH...\n"
            "  PATH                a DICOM file, or a folder walked recursively (names starting\n"
            "                      with '.' are skipped; files that are not DICOM are reported\n"
            "                      and left alone)\n"
            "  -n, --name NAME     source name in the events (data.source.name; e.g. the calling\n"
            "                      AE title, storescp's #a); default \"notify\"\n"
            "  -m, --move          remove each file once its event is acknowledged\n"
            "  -d, --dry-run       parse and list what would be published; store and send nothing\n"
            "  -q, --quiet         print only the summary line\n"
            "  -h, --help          this help; -V, --version: the version\n"
            "\n"
            "Each file is stored in the object store under instances/<study>/<series>/<sop>.dcm\n"
            "and announced on <prefix>instance.stored (source kind \"notify\"), produced directly\n"
            "with the idempotent producer; the dicom-indexer indexes it. Usable as storescp's\n"
            "--exec-on-eostudy: storescp --sort-on-study-uid st --exec-on-eostudy\n"
            "'radpipe-notify --move --name #a #p'. Exit status: 0 all published, 1 some file was\n"
            "skipped or failed, 2 bad usage or configuration.\n"
            "\n"
            "Environment:\n\n");
    lc_cfg_print_markdown(f, t, 1);
}

/* "k=v,k=v" to a NULL-terminated array (caller frees each and the array). */
static char **split_options(const char *s)
{
    size_t n = 1;
    for (const char *p = s; *p; p++)
        n += *p == ',';
    char **v = calloc(n + 1, sizeof(char *)), *copy = strdup(s), *save = NULL;
    size_t k = 0;
    if (!v || !copy) {
        free(v);
        free(copy);
        return NULL;
    }
    for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save))
        if (*t && !(v[k++] = strdup(t)))
            break;
    free(copy);
    return v;
}

int main(int argc, char **argv)
{
    lc_cfg_var vars[NVARS];
    lc_common_cfg cfg;
    memset(&cfg, 0, sizeof(cfg));
    lc_cfg_table table = {vars, vars_table(vars), &cfg};
    ntf_opts o = {.name = "notify"};
    int quiet = 0, code = 2;
    static const struct option longs[] = {
        {"name", required_argument, NULL, 'n'},
        {"move", no_argument, NULL, 'm'},
        {"dry-run", no_argument, NULL, 'd'},
        {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "n:mdqhV", longs, NULL)) != -1) {
        switch (c) {
        case 'n':
            o.name = optarg;
            break;
        case 'm':
            o.move = 1;
            break;
        case 'd':
            o.dry_run = 1;
            break;
        case 'q':
            quiet = 1;
            break;
        case 'h':
            usage(stdout, &table);
            return 0;
        case 'V':
            printf("radpipe-notify %s\n", RADPIPE_VERSION);
            return 0;
        default:
            usage(stderr, &table);
            return 2;
        }
    }
    if (optind >= argc) {
        fprintf(stderr, "radpipe-notify: no PATH given (see --help)\n");
        return 2;
    }

    lc_err err = {0};
    lc_store *store = NULL;
    lc_kafka_producer *p = NULL;
    char **extra = NULL;
    ntf_stats st = {0};
    if (lc_cfg_load(&table, 1, &err) != LC_OK) {
        fprintf(stderr, "radpipe-notify: %s\n", lc_err_msg(&err));
        goto out;
    }
    lc_log_init("radpipe-notify", (lc_log_level)lc_log_level_parse(cfg.log_level));
    o.prefix = cfg.topic_prefix;
    if (!o.dry_run) {
        extra = split_options(cfg.kafka_options ? cfg.kafka_options : "");
        const lc_kafka_conf kc = {.brokers = cfg.kafka_brokers,
                                  .topic_prefix = cfg.topic_prefix,
                                  .client_id = "radpipe-notify",
                                  .extra = (const char *const *)extra};
        if (lc_store_open(cfg.store_url, &store, &err) != LC_OK ||
            lc_kafka_producer_new(&kc, &p, &err) != LC_OK) {
            fprintf(stderr, "radpipe-notify: %s\n", lc_err_msg(&err));
            goto out;
        }
    }
    if (ntf_run(argv + optind, (size_t)(argc - optind), &o, store, p, quiet ? NULL : stdout, &st,
                &err) != LC_OK) {
        fprintf(stderr, "radpipe-notify: %s\n", lc_err_msg(&err));
        code = 1;
        goto out;
    }
    fflush(stdout);
    fprintf(quiet ? stdout : stderr, "radpipe-notify: %lld %s, %lld skipped, %lld failed\n",
            st.published, o.dry_run ? "would be published" : "published", st.skipped, st.failed);
    code = st.skipped || st.failed ? 1 : 0;
out:
    lc_kafka_producer_free(p, 5000);
    lc_store_free(store);
    for (size_t i = 0; extra && extra[i]; i++)
        free(extra[i]);
    free(extra);
    lc_cfg_release(&table, 1);
    return code;
}
