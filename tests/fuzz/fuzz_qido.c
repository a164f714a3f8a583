/*
 * fuzz_qido.c: libFuzzer target for the gateway's QIDO-RS query parser and SQL generation
 * (services/api-gateway/gw_qido.c and gw_buf.c, compiled in here: both are pure C). The
 * first byte picks the search level and whether the path names a study and series; the rest
 * is the query string. A parsed query must give SQL whose text holds none of the value bytes
 * an injection needs (';', '"', "--"), whose placeholders are exactly $1..$n, and whose limit
 * and offset are in range. Never a crash, leak or hang.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../../services/api-gateway/gw_buf.c"
#include "../../services/api-gateway/gw_qido.c"

static int resolve(const char *kw, unsigned *tag)
{
    if (strcmp(kw, "Manufacturer") == 0) {
        *tag = 0x00080070;
        return 1;
    }
    return 0;
}

static void check_sql(const gw_qido_sql *s)
{
    const char *sql = s->sql.data;
    int seen[GW_QIDO_MAX_PARAMS + 1] = {0};
    if (!sql || strchr(sql, ';') || strchr(sql, '"') || strstr(sql, "--"))
        abort();
    for (const char *p = strchr(sql, '$'); p; p = strchr(p + 1, '$')) {
        int k = atoi(p + 1);
        if (k < 1 || k > s->nparams)
            abort();
        seen[k] = 1;
    }
    for (int k = 1; k <= s->nparams; k++)
        if (!seen[k] || !s->params[k - 1])
            abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > 16384)
        return 0;
    gw_qido_level level = (gw_qido_level)(data[0] % 3);
    const char *study = (data[0] & 4) ? "1.2.840.113619.2.55.3" : NULL;
    const char *series = (data[0] & 8) && level == GW_QIDO_INSTANCE ? "1.2.3.4.5" : NULL;
    char *qs = malloc(size);
    if (!qs)
        return 0;
    memcpy(qs, data + 1, size - 1);
    qs[size - 1] = '\0';

    gw_qido_query q;
    gw_qido_sql s;
    lc_err err;
    memset(&err, 0, sizeof(err));
    lc_rc rc = gw_qido_parse(qs, level, study, series, (data[0] & 16) ? resolve : NULL, &q, &err);
    if (rc != LC_OK) {
        if (!err.msg[0] || q.nkeys != 0)
            abort();
        free(qs);
        return 0;
    }
    if (q.limit < 1 || q.limit > GW_QIDO_MAX_LIMIT || q.offset < 0 || q.nkeys > GW_QIDO_MAX_KEYS)
        abort();
    for (int k = 0; k < q.nkeys; k++)
        if (q.keys[k].attr < 0 || (size_t)q.keys[k].attr >= gw_qido_nattrs ||
            gw_qido_attrs[q.keys[k].attr].level > level)
            abort();
    rc = gw_qido_build_sql(&q, &s, &err);
    if (rc == LC_OK) {
        check_sql(&s);
        for (size_t a = 0; a < gw_qido_nattrs; a++)
            if (s.col[a] >= s.ncols)
                abort();
        gw_qido_sql_release(&s);
    } else if (!err.msg[0]) {
        abort();
    }
    gw_qido_query_release(&q);
    free(qs);
    return 0;
}
