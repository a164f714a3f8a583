/*
 * idx_db.c: the indexer's writes. A batch goes to PostgreSQL in a handful of multi-row
 * statements (the rows travel as one JSON array, expanded with jsonb_to_recordset, which also
 * does the quoting), all inside the caller's transaction, so the batch is indexed entirely or
 * not at all. Functions take the consuming thread's connection; nothing here keeps state.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "idx.h"
#include "lc/outbox.h"

/* The columns of one row of the batch array (see row_json). */
#define ROWS_FROM                                                                                  \
    " FROM jsonb_to_recordset($1::jsonb) AS r(ord int, study_uid text, patient_id text,"           \
    " patient_name text, patient_birth_date text, patient_sex text, study_date text,"              \
    " study_time text, accession_number text, study_id text, study_description text,"              \
    " referring_physician text, series_uid text, modality text, series_number int,"                \
    " series_description text, body_part_examined text, sop_uid text, sop_class_uid text,"         \
    " transfer_syntax_uid text, instance_number int, rows int, columns int,"                       \
    " number_of_frames int, image_position float8[], image_orientation float8[],"                  \
    " pixel_spacing float8[], slice_thickness float8, store_key text, size_bytes bigint,"          \
    " sha256 text)"

/* Descriptive values: the latest instance that has one wins; a row is only rewritten when a
 * value really changes, so re-sent instances leave studies and series untouched. */
static const char upsert_studies_sql[] =
    "INSERT INTO studies AS s (study_uid, patient_id, patient_name, patient_birth_date,"
    " patient_sex, study_date, study_time, accession_number, study_id, study_description,"
    " referring_physician)"
    " SELECT DISTINCT ON (r.study_uid) r.study_uid, r.patient_id, r.patient_name,"
    " r.patient_birth_date, r.patient_sex, r.study_date, r.study_time, r.accession_number,"
    " r.study_id, r.study_description, r.referring_physician" ROWS_FROM
    " ORDER BY r.study_uid, r.ord DESC"
    " ON CONFLICT (study_uid) DO UPDATE SET"
    " patient_id = COALESCE(EXCLUDED.patient_id, s.patient_id),"
    " patient_name = COALESCE(EXCLUDED.patient_name, s.patient_name),"
    " patient_birth_date = COALESCE(EXCLUDED.patient_birth_date, s.patient_birth_date),"
    " patient_sex = COALESCE(EXCLUDED.patient_sex, s.patient_sex),"
    " study_date = COALESCE(EXCLUDED.study_date, s.study_date),"
    " study_time = COALESCE(EXCLUDED.study_time, s.study_time),"
    " accession_number = COALESCE(EXCLUDED.accession_number, s.accession_number),"
    " study_id = COALESCE(EXCLUDED.study_id, s.study_id),"
    " study_description = COALESCE(EXCLUDED.study_description, s.study_description),"
    " referring_physician = COALESCE(EXCLUDED.referring_physician, s.referring_physician),"
    " updated_at = now()"
    " WHERE (EXCLUDED.patient_id IS NOT NULL AND EXCLUDED.patient_id IS DISTINCT FROM s.patient_id)"
    " OR (EXCLUDED.patient_name IS NOT NULL AND EXCLUDED.patient_name IS DISTINCT FROM "
    "s.patient_name)"
    " OR (EXCLUDED.patient_birth_date IS NOT NULL AND EXCLUDED.patient_birth_date IS DISTINCT FROM "
    "s.patient_birth_date)"
    " OR (EXCLUDED.patient_sex IS NOT NULL AND EXCLUDED.patient_sex IS DISTINCT FROM s.patient_sex)"
    " OR (EXCLUDED.study_date IS NOT NULL AND EXCLUDED.study_date IS DISTINCT FROM s.study_date)"
    " OR (EXCLUDED.study_time IS NOT NULL AND EXCLUDED.study_time IS DISTINCT FROM s.study_time)"
    " OR (EXCLUDED.accession_number IS NOT NULL AND EXCLUDED.accession_number IS DISTINCT FROM "
    "s.accession_number)"
    " OR (EXCLUDED.study_id IS NOT NULL AND EXCLUDED.study_id IS DISTINCT FROM s.study_id)"
    " OR (EXCLUDED.study_description IS NOT NULL AND EXCLUDED.study_description IS DISTINCT FROM "
    "s.study_description)"
    " OR (EXCLUDED.referring_physician IS NOT NULL AND EXCLUDED.referring_physician IS DISTINCT "
    "FROM s.referring_physician)";

static const char upsert_series_sql[] =
    "INSERT INTO series AS s (series_uid, study_uid, modality, series_number,"
    " series_description, body_part_examined)"
    " SELECT DISTINCT ON (r.series_uid) r.series_uid, r.study_uid, r.modality, r.series_number,"
    " r.series_description, r.body_part_examined" ROWS_FROM " ORDER BY r.series_uid, r.ord DESC"
    " ON CONFLICT (series_uid) DO UPDATE SET study_uid = EXCLUDED.study_uid,"
    " modality = COALESCE(EXCLUDED.modality, s.modality),"
    " series_number = COALESCE(EXCLUDED.series_number, s.series_number),"
    " series_description = COALESCE(EXCLUDED.series_description, s.series_description),"
    " body_part_examined = COALESCE(EXCLUDED.body_part_examined, s.body_part_examined),"
    " updated_at = now()"
    " WHERE s.study_uid IS DISTINCT FROM EXCLUDED.study_uid"
    " OR (EXCLUDED.modality IS NOT NULL AND EXCLUDED.modality IS DISTINCT FROM s.modality)"
    " OR (EXCLUDED.series_number IS NOT NULL AND EXCLUDED.series_number IS DISTINCT FROM "
    "s.series_number)"
    " OR (EXCLUDED.series_description IS NOT NULL AND EXCLUDED.series_description IS DISTINCT FROM "
    "s.series_description)"
    " OR (EXCLUDED.body_part_examined IS NOT NULL AND EXCLUDED.body_part_examined IS DISTINCT FROM "
    "s.body_part_examined)";

/* A known SOPInstanceUID with other bytes is replaced (latest wins); the same bytes again
 * change nothing. (xmax = 0) tells a fresh insert from an update. */
static const char upsert_instances_sql[] =
    "INSERT INTO instances AS i (sop_uid, series_uid, study_uid, sop_class_uid,"
    " transfer_syntax_uid, instance_number, rows, columns, number_of_frames, image_position,"
    " image_orientation, pixel_spacing, slice_thickness, store_key, size_bytes, sha256)"
    " SELECT r.sop_uid, r.series_uid, r.study_uid, r.sop_class_uid, r.transfer_syntax_uid,"
    " r.instance_number, r.rows, r.columns, r.number_of_frames, r.image_position,"
    " r.image_orientation, r.pixel_spacing, r.slice_thickness, r.store_key, r.size_bytes,"
    " r.sha256" ROWS_FROM " ORDER BY r.sop_uid"
    " ON CONFLICT (sop_uid) DO UPDATE SET series_uid = EXCLUDED.series_uid,"
    " study_uid = EXCLUDED.study_uid, sop_class_uid = EXCLUDED.sop_class_uid,"
    " transfer_syntax_uid = EXCLUDED.transfer_syntax_uid,"
    " instance_number = EXCLUDED.instance_number, rows = EXCLUDED.rows,"
    " columns = EXCLUDED.columns, number_of_frames = EXCLUDED.number_of_frames,"
    " image_position = EXCLUDED.image_position, image_orientation = EXCLUDED.image_orientation,"
    " pixel_spacing = EXCLUDED.pixel_spacing, slice_thickness = EXCLUDED.slice_thickness,"
    " store_key = EXCLUDED.store_key, size_bytes = EXCLUDED.size_bytes,"
    " sha256 = EXCLUDED.sha256, replaced_count = i.replaced_count + 1, received_at = now(),"
    " updated_at = now()"
    " WHERE i.sha256 IS DISTINCT FROM EXCLUDED.sha256"
    " RETURNING i.sop_uid, (i.xmax = 0) AS inserted";

/* Counts are recomputed from the instances table (never incremented), so they stay exact
 * whatever was redelivered; the studies are marked dirty for completion. */
static const char recount_sql[] =
    "WITH t AS (SELECT DISTINCT jsonb_array_elements_text($1::jsonb) AS study_uid),"
    " ser AS (UPDATE series se SET num_instances = c.n, updated_at = now()"
    "  FROM (SELECT i.series_uid, count(*)::int AS n FROM instances i"
    "        JOIN t ON t.study_uid = i.study_uid GROUP BY i.series_uid) c"
    "  WHERE se.series_uid = c.series_uid AND se.num_instances <> c.n RETURNING 1)"
    " UPDATE studies st SET num_series = c.ns, num_instances = c.ni, modalities = c.mods,"
    " dirty = true, last_instance_at = now(), updated_at = now()"
    " FROM (SELECT i.study_uid, count(DISTINCT i.series_uid)::int AS ns, count(*)::int AS ni,"
    "       COALESCE(array_agg(DISTINCT se.modality ORDER BY se.modality)"
    "                FILTER (WHERE se.modality IS NOT NULL), '{}') AS mods"
    "       FROM instances i JOIN t ON t.study_uid = i.study_uid"
    "       JOIN series se ON se.series_uid = i.series_uid GROUP BY i.study_uid) c"
    " WHERE st.study_uid = c.study_uid";

static const char seen_sql[] = "SELECT event_id FROM processed_events WHERE consumer = $1"
                               " AND event_id IN (SELECT jsonb_array_elements_text($2::jsonb))";

static const char claim_sql[] = "INSERT INTO processed_events (consumer, event_id)"
                                " SELECT $1, e FROM jsonb_array_elements_text($2::jsonb) AS e"
                                " ON CONFLICT DO NOTHING RETURNING event_id";

static const char quarantine_sql[] =
    "INSERT INTO quarantine (source, store_key, reason, event_id) VALUES ($1, $2, $3, $4)";

/* Items whose event goes to processed_events: every valid event not skipped already. */
static int wants_claim(const idx_item *it)
{
    return it->ev && it->state != IDX_SKIP;
}

static char *print_free(cJSON *j)
{
    char *s = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    return s;
}

/* JSON array of the event ids of the items pred selects; *count gets their number. */
static char *ids_json(const idx_item *items, size_t n, int (*pred)(const idx_item *), size_t *count)
{
    cJSON *a = cJSON_CreateArray();
    *count = 0;
    for (size_t i = 0; a && i < n; i++) {
        if (!pred(&items[i]))
            continue;
        cJSON *s = cJSON_CreateString(items[i].ev->id);
        if (!s || !cJSON_AddItemToArray(a, s)) {
            cJSON_Delete(s);
            cJSON_Delete(a);
            return NULL;
        }
        (*count)++;
    }
    return print_free(a);
}

static void mark_ids(idx_item *items, size_t n, const char *id, int (*pred)(const idx_item *),
                     int *flags)
{
    for (size_t i = 0; i < n; i++)
        if (pred(&items[i]) && strcmp(items[i].ev->id, id) == 0)
            flags[i] = 1;
}

lc_rc idx_db_mark_processed(lc_db *db, idx_item *items, size_t n, lc_err *err)
{
    size_t count = 0;
    PGresult *res = NULL;
    char *ids = ids_json(items, n, wants_claim, &count);
    if (!ids)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    lc_rc rc = LC_OK;
    if (count == 0)
        goto out;
    const char *p[2] = {IDX_SERVICE, ids};
    if ((rc = lc_db_exec(db, seen_sql, 2, p, &res, err)) != LC_OK)
        goto out;
    for (int r = 0; r < PQntuples(res); r++) {
        for (size_t i = 0; i < n; i++)
            if (wants_claim(&items[i]) && strcmp(items[i].ev->id, PQgetvalue(res, r, 0)) == 0)
                items[i].state = IDX_SKIP;
    }
out:
    PQclear(res);
    free(ids);
    return rc;
}

/* Insert processed_events rows; claimed[i] = 1 for the items this transaction owns (0 when a
 * concurrent consumer committed the same event first). */
static lc_rc claim_events(lc_db *db, idx_item *items, size_t n, int *claimed, lc_err *err)
{
    size_t count = 0;
    PGresult *res = NULL;
    char *ids = ids_json(items, n, wants_claim, &count);
    if (!ids)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    lc_rc rc = LC_OK;
    if (count == 0)
        goto out;
    const char *p[2] = {IDX_SERVICE, ids};
    if ((rc = lc_db_exec(db, claim_sql, 2, p, &res, err)) != LC_OK)
        goto out;
    if ((size_t)PQntuples(res) == count) { /* the usual case: every event is new */
        for (size_t i = 0; i < n; i++)
            claimed[i] = wants_claim(&items[i]);
        goto out;
    }
    for (int r = 0; r < PQntuples(res); r++)
        mark_ids(items, n, PQgetvalue(res, r, 0), wants_claim, claimed);
out:
    PQclear(res);
    free(ids);
    return rc;
}

static lc_rc add_quarantine(lc_db *db, const idx_ctx *x, const idx_item *it, lc_err *err)
{
    const lc_kafka_msg *m = it->msg;
    char source[512];
    snprintf(source, sizeof(source), "kafka:%s/%d@%lld", m->topic, (int)m->partition,
             (long long)m->offset);
    idx_utf8_fix(source);
    const char *p[4] = {source, it->key, it->reason, it->ev ? it->ev->id : NULL};
    lc_rc rc = lc_db_exec(db, quarantine_sql, 4, p, NULL, err);
    if (rc == LC_OK)
        rc = lc_outbox_add_dlq(db, x->prefix, IDX_SERVICE, m->topic, m->partition, m->offset,
                               m->key, m->key_len, m->payload, m->len, it->reason, err);
    return rc;
}

/* cJSON adders that report failure, so a half-built row never reaches the database. */
static int put_str(cJSON *o, const char *k, const char *v)
{
    return !v || cJSON_AddStringToObject(o, k, v) != NULL;
}

static int put_num(cJSON *o, const char *k, double v)
{
    return cJSON_AddNumberToObject(o, k, v) != NULL;
}

/* Attributes that DICOM leaves at 0 when absent are stored as NULL. */
static int put_pos(cJSON *o, const char *k, int v)
{
    return v <= 0 || put_num(o, k, v);
}

static int put_dbls(cJSON *o, const char *k, const double *v, int n, int has)
{
    if (!has)
        return 1;
    for (int i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return 1; /* JSON has no NaN: an unusable vector is left out */
    cJSON *a = cJSON_CreateDoubleArray(v, n);
    return a && cJSON_AddItemToObject(o, k, a);
}

static cJSON *row_json(const idx_item *it, size_t ord)
{
    const lc_dicom_header *h = it->h;
    cJSON *o = cJSON_CreateObject();
    int ok = o != NULL;
    ok = ok && put_num(o, "ord", (double)ord) && put_str(o, "study_uid", h->study_instance_uid) &&
         put_str(o, "patient_id", h->patient_id) && put_str(o, "patient_name", h->patient_name) &&
         put_str(o, "patient_birth_date", h->patient_birth_date) &&
         put_str(o, "patient_sex", h->patient_sex) && put_str(o, "study_date", h->study_date) &&
         put_str(o, "study_time", h->study_time) &&
         put_str(o, "accession_number", h->accession_number) &&
         put_str(o, "study_id", h->study_id) &&
         put_str(o, "study_description", h->study_description) &&
         put_str(o, "referring_physician", h->referring_physician_name);
    ok = ok && put_str(o, "series_uid", h->series_instance_uid) &&
         put_str(o, "modality", h->modality) && put_pos(o, "series_number", h->series_number) &&
         put_str(o, "series_description", h->series_description) &&
         put_str(o, "body_part_examined", h->body_part_examined);
    ok = ok && put_str(o, "sop_uid", h->sop_instance_uid) &&
         put_str(o, "sop_class_uid", h->sop_class_uid) &&
         put_str(o, "transfer_syntax_uid", h->transfer_syntax_uid) &&
         put_pos(o, "instance_number", h->instance_number) && put_pos(o, "rows", h->rows) &&
         put_pos(o, "columns", h->columns) && put_pos(o, "number_of_frames", h->number_of_frames) &&
         put_dbls(o, "image_position", h->ipp, 3, h->has_ipp) &&
         put_dbls(o, "image_orientation", h->iop, 6, h->has_iop) &&
         put_dbls(o, "pixel_spacing", h->pixel_spacing, 2, h->has_pixel_spacing) &&
         (!h->has_slice_thickness || !isfinite(h->slice_thickness) ||
          put_num(o, "slice_thickness", h->slice_thickness)) &&
         put_str(o, "store_key", it->key) && put_num(o, "size_bytes", (double)it->size) &&
         put_str(o, "sha256", it->sha256);
    if (!ok) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static int sop_cmp(const void *a, const void *b)
{
    const idx_item *const *x = a, *const *y = b;
    return strcmp((*x)->sop_uid, (*y)->sop_uid);
}

/* Upsert studies, series and instances of the items in w (READY and claimed; SOP UIDs are
 * unique among them), set each one's result and recount the studies that changed. */
static lc_rc write_instances(lc_db *db, idx_item **w, size_t m, lc_err *err)
{
    lc_rc rc = LC_OK;
    PGresult *res = NULL;
    char *rows = NULL, *touched_s = NULL;
    cJSON *arr = cJSON_CreateArray(), *touched = cJSON_CreateArray();
    if (!arr || !touched)
        goto nomem;
    for (size_t j = 0; j < m; j++) {
        cJSON *o = row_json(w[j], j);
        if (!o || !cJSON_AddItemToArray(arr, o)) {
            cJSON_Delete(o);
            goto nomem;
        }
    }
    rows = print_free(arr);
    arr = NULL;
    if (!rows)
        goto nomem;
    const char *p[1] = {rows};
    if ((rc = lc_db_exec(db, upsert_studies_sql, 1, p, NULL, err)) != LC_OK ||
        (rc = lc_db_exec(db, upsert_series_sql, 1, p, NULL, err)) != LC_OK ||
        (rc = lc_db_exec(db, upsert_instances_sql, 1, p, &res, err)) != LC_OK)
        goto out;

    /* rows come back only for new or changed instances: the rest were duplicates */
    qsort(w, m, sizeof(*w), sop_cmp);
    for (size_t j = 0; j < m; j++)
        w[j]->result = IDX_R_DUPLICATE;
    for (int r = 0; r < PQntuples(res); r++) {
        idx_item key = {.sop_uid = PQgetvalue(res, r, 0)}, *kp = &key;
        idx_item **hit = bsearch(&kp, w, m, sizeof(*w), sop_cmp);
        if (!hit) {
            rc = lc_err_set(err, LC_ERR_INTERNAL, "upsert returned an unknown instance");
            goto out;
        }
        (*hit)->result = strcmp(PQgetvalue(res, r, 1), "t") == 0 ? IDX_R_INSERTED : IDX_R_REPLACED;
        cJSON *s = cJSON_CreateString((*hit)->study_uid);
        if (!s || !cJSON_AddItemToArray(touched, s)) {
            cJSON_Delete(s);
            goto nomem;
        }
    }
    if (PQntuples(res) == 0)
        goto out;
    touched_s = print_free(touched);
    touched = NULL;
    if (!touched_s)
        goto nomem;
    p[0] = touched_s;
    rc = lc_db_exec(db, recount_sql, 1, p, NULL, err);
    goto out;
nomem:
    rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory building the index rows");
out:
    PQclear(res);
    cJSON_Delete(arr);
    cJSON_Delete(touched);
    free(rows);
    free(touched_s);
    return rc;
}

lc_rc idx_db_write(lc_db *db, void *ctx, lc_err *err)
{
    idx_write *wr = ctx;
    idx_item *items = wr->items;
    size_t n = wr->n, m = 0;
    lc_rc rc;
    int *claimed = calloc(n ? n : 1, sizeof(*claimed));
    idx_item **w = calloc(n ? n : 1, sizeof(*w));
    if (!claimed || !w) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        items[i].result = IDX_R_DUPLICATE; /* skipped, superseded or claimed elsewhere */
    if ((rc = claim_events(db, items, n, claimed, err)) != LC_OK)
        goto out;
    for (size_t i = 0; i < n; i++) {
        idx_item *it = &items[i];
        /* an invalid event has no id to claim: it is quarantined on every delivery */
        if (it->state == IDX_QUARANTINE && (claimed[i] || !it->ev)) {
            if ((rc = add_quarantine(db, wr->x, it, err)) != LC_OK)
                goto out;
            it->result = IDX_R_QUARANTINED;
        } else if (it->state == IDX_READY && claimed[i]) {
            w[m++] = it;
        }
    }
    if (m > 0)
        rc = write_instances(db, w, m, err);
out:
    free(claimed);
    free(w);
    return rc;
}
