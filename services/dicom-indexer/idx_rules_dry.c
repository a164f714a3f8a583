/*
 * idx_rules_dry.c: the rules' configuration variable and the two command-line tools of the
 * dicom-indexer: `--check-rules FILE` (validate, print a summary) and `--dry-run-rules FILE`
 * (the jobs FILE would create for every study already indexed, judged as version 1 with all
 * its series, as JSON lines on stdout). The dry run uses one read-only REPEATABLE READ
 * transaction: it writes nothing, not even migrations. Single-threaded, run from main().
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "idx.h"
#include "idx_rules.h"
#include "lc/cfg.h"
#include "lc/log.h"
#include "lc/service.h"
#include "lc/util.h"

#define OFF(f) offsetof(idx_rules_cfg, f)

const lc_cfg_var idx_rules_cfg_vars[] = {
    {"RADPIPE_RULES_FILE", LC_CFG_STR, "", 0, -1, 0, NULL,
     "routing rules and per-source completion settings (JSON, proto/rules/rules.schema.json), "
     "reloaded on SIGHUP; unset: one upload and one segment job per completed study",
     OFF(rules_file)},
};
const size_t idx_rules_cfg_nvars = sizeof(idx_rules_cfg_vars) / sizeof(idx_rules_cfg_vars[0]);

#define PAGE_STUDIES 200

int idx_rules_check_main(const char *path)
{
    idx_rules *r = NULL;
    lc_err err = {0};
    if (idx_rules_load(path, &r, &err) != LC_OK) {
        fprintf(stderr, "%s\n", lc_err_msg(&err));
        return 1;
    }
    printf("rules file \"%s\" is valid: %zu rule(s)%s, %zu completion setting(s)\n", path,
           r->nrules, r->has_rules ? "" : " (no \"rules\": the built-in upload and segment jobs)",
           r->ncompletion);
    idx_rules_free(r);
    return 0;
}

/* Print the plan of one study as JSON lines; *njobs counts them. */
static lc_rc dry_study(lc_db *db, const idx_rules *r, const char *uid, size_t *njobs, lc_err *err)
{
    idx_rstudy *s = NULL;
    idx_jobplan plan = {0};
    lc_rc rc = idx_rules_load_study(db, r, uid, 1, NULL, &s, err);
    if (rc == LC_OK)
        rc = idx_rules_plan(r, s, &plan, err);
    for (size_t i = 0; rc == LC_OK && i < plan.n; i++) {
        const idx_jobspec *j = &plan.v[i];
        cJSON *o = cJSON_CreateObject();
        char *line = NULL;
        if (o && cJSON_AddStringToObject(o, "study_instance_uid", uid) &&
            cJSON_AddStringToObject(o, "rule", j->rule) &&
            cJSON_AddStringToObject(o, "kind", j->kind) &&
            cJSON_AddNumberToObject(o, "priority", j->priority) &&
            cJSON_AddItemToObject(o, "params", cJSON_Duplicate(j->params, 1)) &&
            cJSON_AddStringToObject(o, "dedupe_key", j->dedupe))
            line = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
        if (!line) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
            break;
        }
        printf("%s\n", line);
        free(line);
        (*njobs)++;
    }
    idx_jobplan_release(&plan);
    idx_rstudy_free(s, r ? r->nkeys : 0);
    return rc;
}

static lc_rc dry_all(lc_db *db, const idx_rules *r, size_t *nstudies, size_t *njobs, lc_err *err)
{
    char last[65] = "";
    char lim[16];
    snprintf(lim, sizeof(lim), "%d", PAGE_STUDIES);
    lc_rc rc =
        lc_db_exec(db, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", 0, NULL, NULL, err);
    for (;;) {
        PGresult *res = NULL;
        const char *p[2] = {last, lim};
        if (rc != LC_OK || (rc = lc_db_exec(db,
                                            "SELECT study_uid FROM studies WHERE study_uid > $1"
                                            " ORDER BY study_uid LIMIT $2::int",
                                            2, p, &res, err)) != LC_OK)
            break;
        int n = PQntuples(res);
        for (int i = 0; i < n && rc == LC_OK; i++) {
            rc = dry_study(db, r, PQgetvalue(res, i, 0), njobs, err);
            (*nstudies)++;
        }
        if (n > 0)
            lc_strlcpy(last, PQgetvalue(res, n - 1, 0), sizeof(last));
        PQclear(res);
        if (n < PAGE_STUDIES)
            break;
    }
    lc_db_rollback(db);
    return rc;
}

int idx_rules_dry_run_main(const char *path)
{
    lc_common_cfg cfg = {0};
    lc_cfg_table t[1] = {{lc_common_cfg_vars, lc_common_cfg_nvars, &cfg}};
    idx_rules *r = NULL;
    lc_db *db = NULL;
    lc_err err = {0};
    size_t nstudies = 0, njobs = 0;
    int code = 1;
    lc_log_init(IDX_SERVICE, LC_LOG_INFO);
    if (idx_rules_load(path, &r, &err) != LC_OK || lc_cfg_load(t, 1, &err) != LC_OK)
        goto fail;
    lc_log_init(IDX_SERVICE, (lc_log_level)lc_log_level_parse(cfg.log_level));
    if (lc_db_connect(cfg.database_url, (int)cfg.db_wait_seconds * 1000, NULL, &db, &err) != LC_OK)
        goto fail;
    /* belt and braces: the session cannot write even if a statement tried */
    if (lc_db_exec(db, "SET default_transaction_read_only = on", 0, NULL, NULL, &err) != LC_OK ||
        dry_all(db, r, &nstudies, &njobs, &err) != LC_OK)
        goto fail;
    fflush(stdout);
    fprintf(stderr, "dry run of \"%s\": %zu studies, %zu jobs (nothing was written)\n", path,
            nstudies, njobs);
    code = 0;
    goto out;
fail:
    fflush(stdout);
    fprintf(stderr, "dicom-indexer --dry-run-rules: %s\n", lc_err_msg(&err));
out:
    lc_db_free(db);
    idx_rules_free(r);
    lc_cfg_release(t, 1);
    return code;
}
