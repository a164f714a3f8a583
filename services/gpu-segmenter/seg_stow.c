/*
 * seg_stow.c: STOW-RS of one DICOM object (PS3.18 10.5): POST multipart/related;
 * type="application/dicom" with libcurl, optionally with a bearer token. Sends the
 * segmentation back to the PACS. Reentrant (one curl handle per call).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <curl/curl.h>
#include "lc/util.h"
#include "seg.h"

static size_t sink(char *p, size_t size, size_t n, void *ctx)
{
    char *buf = ctx; /* keep the start of the answer for the error message */
    size_t have = strlen(buf), len = size * n;
    size_t room = 255 - have;
    memcpy(buf + have, p, len < room ? len : room);
    buf[have + (len < room ? len : room)] = '\0';
    return len;
}

lc_rc seg_stow(const char *url, const char *token, const void *buf, size_t len, lc_err *err)
{
    char boundary[64], uuid[LC_UUID_LEN + 1], ctype[160], auth[4200 + 32], answer[256] = "";
    char *body = NULL;
    struct curl_slist *hdrs = NULL;
    lc_rc rc = LC_OK;
    CURL *c = NULL;

    lc_uuid_v4(uuid);
    snprintf(boundary, sizeof(boundary), "radpipe-%s", uuid);
    char head[160], tail[96];
    int hl =
        snprintf(head, sizeof(head), "--%s\r\nContent-Type: application/dicom\r\n\r\n", boundary);
    int tl = snprintf(tail, sizeof(tail), "\r\n--%s--\r\n", boundary);
    size_t total = (size_t)hl + len + (size_t)tl;
    if (!(body = malloc(total)))
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    memcpy(body, head, (size_t)hl);
    memcpy(body + hl, buf, len);
    memcpy(body + hl + len, tail, (size_t)tl);

    snprintf(ctype, sizeof(ctype),
             "Content-Type: multipart/related; type=\"application/dicom\"; boundary=%s", boundary);
    if (!(c = curl_easy_init()) || !(hdrs = curl_slist_append(hdrs, ctype)) ||
        !(hdrs = curl_slist_append(hdrs, "Accept: application/dicom+json"))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (token && *token) {
        if (strlen(token) > 4096) {
            rc = lc_err_set(err, LC_ERR_CONFIG, "the STOW-RS token is too long");
            goto out;
        }
        snprintf(auth, sizeof(auth), "Authorization: Bearer %s", token);
        struct curl_slist *h2 = curl_slist_append(hdrs, auth);
        if (!h2) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
            goto out;
        }
        hdrs = h2;
    }
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_POST, 1L);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)total);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, answer);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 10L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 300L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    CURLcode cc = curl_easy_perform(c);
    if (cc != CURLE_OK) {
        rc = lc_err_set(err, LC_ERR_UNAVAILABLE, "could not send the segmentation to \"%s\": %s",
                        url, curl_easy_strerror(cc));
        goto out;
    }
    long code = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    if (code < 200 || code > 299)
        rc = lc_err_set(err, code >= 500 || code == 429 ? LC_ERR_UNAVAILABLE : LC_ERR_INVALID,
                        "the STOW-RS endpoint \"%s\" answered %ld: %.200s", url, code, answer);
out:
    curl_slist_free_all(hdrs);
    if (c)
        curl_easy_cleanup(c);
    free(body);
    return rc;
}
