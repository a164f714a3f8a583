/*
 * store_s3_xml.c: reads the XML documents S3 answers with (listings, multipart results,
 * errors) through expat, as a flat stream of (path, text) pairs. Stateless and thread-safe;
 * expat refuses external entities and bounds entity expansion (billion laughs).
 */
#include <expat.h>
#include <stdio.h>
#include <string.h>
#include "store_s3_internal.h"

#define PATH_CAP 256
#define TEXT_CAP 4096

typedef struct xstate {
    s3_xml_fn fn;
    void *ctx;
    char *root;
    int depth;
    char path[PATH_CAP];
    size_t plen[32]; /* path length before each depth's element name */
    char text[TEXT_CAP];
    size_t tlen;
    int had_child; /* the current element has child elements */
} xstate;

static void on_start(void *ud, const XML_Char *name, const XML_Char **attrs)
{
    xstate *x = ud;
    (void)attrs;
    /* S3 answers with a default namespace only; strip any "prefix:" anyway */
    const char *colon = strrchr(name, ':');
    if (colon)
        name = colon + 1;
    if (x->depth == 0) {
        if (x->root)
            snprintf(x->root, 64, "%s", name);
        x->depth = 1;
        x->path[0] = '\0';
        x->plen[0] = 0;
        x->tlen = 0;
        x->had_child = 0;
        return;
    }
    if (x->depth >= 31) {
        x->depth++;
        return;
    }
    size_t cur = strlen(x->path);
    x->plen[x->depth] = cur;
    snprintf(x->path + cur, PATH_CAP - cur, "%s%s", cur ? "/" : "", name);
    x->depth++;
    x->tlen = 0;
    x->had_child = 0;
}

static void on_end(void *ud, const XML_Char *name)
{
    xstate *x = ud;
    (void)name;
    x->depth--;
    if (x->depth == 0 || x->depth >= 31)
        return;
    x->text[x->tlen] = '\0';
    if (!x->had_child)
        x->fn(x->ctx, x->path, x->text);
    else
        x->fn(x->ctx, x->path, NULL);
    x->path[x->plen[x->depth]] = '\0';
    x->tlen = 0;
    x->had_child = 1; /* the parent has (at least) this child */
}

static void on_text(void *ud, const XML_Char *s, int len)
{
    xstate *x = ud;
    size_t n = (size_t)len;
    if (x->tlen + n >= TEXT_CAP)
        n = TEXT_CAP - 1 - x->tlen;
    memcpy(x->text + x->tlen, s, n);
    x->tlen += n;
}

lc_rc s3_xml_parse(const char *xml, size_t len, char root[64], s3_xml_fn fn, void *ctx, lc_err *err)
{
    xstate x = {.fn = fn, .ctx = ctx, .root = root};
    if (root)
        root[0] = '\0';
    if (len > (size_t)S3_RESP_MAX)
        return lc_err_set(err, LC_ERR_STORE, "object store answer is too large");
    XML_Parser p = XML_ParserCreate("UTF-8");
    if (!p)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory parsing an object store answer");
    XML_SetUserData(p, &x);
    XML_SetElementHandler(p, on_start, on_end);
    XML_SetCharacterDataHandler(p, on_text);
    lc_rc rc = LC_OK;
    if (XML_Parse(p, xml, (int)len, 1) == XML_STATUS_ERROR)
        rc = lc_err_set(
            err, LC_ERR_STORE, "could not parse the object store's answer: %s (line %lu)",
            XML_ErrorString(XML_GetErrorCode(p)), (unsigned long)XML_GetCurrentLineNumber(p));
    XML_ParserFree(p);
    return rc;
}

typedef struct errctx {
    char *code, *msg;
} errctx;

static void err_fn(void *ctx, const char *path, const char *text)
{
    errctx *e = ctx;
    if (!text)
        return;
    if (strcmp(path, "Code") == 0)
        snprintf(e->code, 64, "%s", text);
    else if (strcmp(path, "Message") == 0)
        snprintf(e->msg, 256, "%s", text);
}

void s3_xml_error(const char *xml, size_t len, char code[64], char msg[256])
{
    char root[64];
    errctx e = {code, msg};
    code[0] = msg[0] = '\0';
    if (!xml || !len)
        return;
    if (s3_xml_parse(xml, len, root, err_fn, &e, NULL) != LC_OK || strcmp(root, "Error") != 0)
        code[0] = msg[0] = '\0';
}
