/*
 * ts_index.c: see ts_index.h. Writes the same columns the indexer writes, with plain SQL.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "lc/dicom.h"
#include "lc/util.h"
#include "ts_index.h"

static void fmt_array(char *buf, size_t cap, const double *v, int n, int has)
{
    if (!has) {
        buf[0] = '\0';
        return;
    }
    size_t len = (size_t)snprintf(buf, cap, "{");
    for (int i = 0; i < n; i++)
        len += (size_t)snprintf(buf + len, cap - len, "%s%.17g", i ? "," : "", v[i]);
    snprintf(buf + len, cap - len, "}");
}

int ts_index_file(lc_db *db, lc_store *store, const char *path, char *study_uid)
{
    lc_dicom_header *h = NULL;
    lc_err e;
    char key[512], sha[65], rows[16], cols[16], frames[16], inum[16], size[32];
    char ipp[128], iop[256], ps[96];
    long long sz = 0;
    if (lc_dicom_read_header(path, &h, &e) != LC_OK) {
        fprintf(stderr, "ts_index_file %s: %s\n", path, e.msg);
        return -1;
    }
    snprintf(key, sizeof(key), "instances/%s/%s/%s.dcm", h->study_instance_uid,
             h->series_instance_uid, h->sop_instance_uid);
    int rc = -1;
    if (lc_sha256_file_hex(path, sha, &sz, &e) != LC_OK ||
        lc_store_put_file(store, key, path, 0, &e) != LC_OK) {
        fprintf(stderr, "ts_index_file %s: %s\n", path, e.msg);
        goto out;
    }
    snprintf(rows, sizeof(rows), "%d", h->rows);
    snprintf(cols, sizeof(cols), "%d", h->columns);
    snprintf(frames, sizeof(frames), "%d", h->number_of_frames);
    snprintf(inum, sizeof(inum), "%d", h->instance_number);
    snprintf(size, sizeof(size), "%lld", sz);
    fmt_array(ipp, sizeof(ipp), h->ipp, 3, h->has_ipp);
    fmt_array(iop, sizeof(iop), h->iop, 6, h->has_iop);
    fmt_array(ps, sizeof(ps), h->pixel_spacing, 2, h->has_pixel_spacing);
    const char *p1[2] = {h->study_instance_uid, h->modality};
    const char *p2[3] = {h->series_instance_uid, h->study_instance_uid, h->modality};
    const char *p3[13] = {h->sop_instance_uid,
                          h->series_instance_uid,
                          h->study_instance_uid,
                          h->sop_class_uid,
                          inum,
                          rows,
                          cols,
                          frames,
                          ipp[0] ? ipp : NULL,
                          iop[0] ? iop : NULL,
                          ps[0] ? ps : NULL,
                          key,
                          size};
    if (lc_db_exec(db,
                   "INSERT INTO studies (study_uid, modalities, num_series, num_instances) "
                   "VALUES ($1, ARRAY[$2], 0, 0) ON CONFLICT (study_uid) DO NOTHING",
                   2, p1, NULL, &e) != LC_OK ||
        lc_db_exec(db,
                   "INSERT INTO series (series_uid, study_uid, modality) VALUES ($1, $2, $3) "
                   "ON CONFLICT (series_uid) DO NOTHING",
                   3, p2, NULL, &e) != LC_OK) {
        fprintf(stderr, "ts_index_file: %s\n", e.msg);
        goto out;
    }
    const char *p5[14] = {p3[0], p3[1], p3[2], p3[3],  p3[4],  p3[5],  p3[6],
                          p3[7], p3[8], p3[9], p3[10], p3[11], p3[12], sha};
    if (lc_db_exec(db,
                   "INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, "
                   "instance_number, rows, columns, number_of_frames, image_position, "
                   "image_orientation, pixel_spacing, store_key, size_bytes, sha256) "
                   "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14) "
                   "ON CONFLICT (sop_uid) DO NOTHING",
                   14, p5, NULL, &e) != LC_OK ||
        lc_db_exec(db,
                   "UPDATE series SET num_instances = (SELECT count(*) FROM instances i "
                   "WHERE i.series_uid = series.series_uid) WHERE series_uid = $1",
                   1, p2, NULL, &e) != LC_OK) {
        fprintf(stderr, "ts_index_file: %s\n", e.msg);
        goto out;
    }
    if (study_uid)
        lc_strlcpy(study_uid, h->study_instance_uid, 65);
    rc = 0;
out:
    lc_dicom_header_free(h);
    return rc;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int ts_index_dir(lc_db *db, lc_store *store, const char *dir, char *study_uid)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    char *names[4096];
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) && n < 4096)
        if (de->d_type == DT_REG)
            names[n++] = strdup(de->d_name);
    closedir(d);
    qsort(names, (size_t)n, sizeof(char *), cmp_str);
    int ok = 0;
    for (int i = 0; i < n; i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        if (ok >= 0 && ts_index_file(db, store, path, study_uid) == 0)
            ok++;
        else
            ok = -1;
        free(names[i]);
    }
    return ok;
}

lc_job *ts_claimed_job(lc_db *db, const lc_job_worker *w, const char *kind, const char *study_uid,
                       const char *params_json)
{
    lc_err e;
    char id[37];
    int created = 0;
    lc_job *job = NULL;
    cJSON *params = params_json ? cJSON_Parse(params_json) : NULL;
    if (lc_job_create(db, w->prefix, w->source, kind, study_uid, params, NULL, 3, id, &created,
                      &e) != LC_OK ||
        lc_job_claim(db, w, id, &job, &e) != LC_OK) {
        fprintf(stderr, "ts_claimed_job: %s\n", e.msg);
        job = NULL;
    }
    cJSON_Delete(params);
    return job;
}

char *ts_db_value(lc_db *db, const char *sql, const char *param)
{
    PGresult *r = NULL;
    lc_err e = {0};
    const char *p[1] = {param};
    if (lc_db_exec(db, sql, param ? 1 : 0, param ? p : NULL, &r, &e) != LC_OK) {
        fprintf(stderr, "%s: %s\n", sql, lc_err_msg(&e));
        return NULL;
    }
    char *v = strdup(PQntuples(r) && !PQgetisnull(r, 0, 0) ? PQgetvalue(r, 0, 0) : "");
    PQclear(r);
    return v;
}

int ts_db_wait_value(lc_db *db, const char *sql, const char *param, const char *want,
                     int timeout_ms)
{
    for (int64_t end = lc_now_ms() + timeout_ms;;) {
        char *v = ts_db_value(db, sql, param);
        int ok = v && strcmp(v, want) == 0;
        free(v);
        if (ok)
            return 1;
        if (lc_now_ms() >= end)
            return 0;
        usleep(20 * 1000);
    }
}
