/*
 * gw_ui.c: GET /ui/...: the embedded web UI's files. "/" and "/ui" redirect to "/ui/".
 * Every answer carries a Content-Security-Policy that lets the page load scripts and styles
 * from this origin only and talk to this origin only (no inline script, no framing).
 */
#include "gw.h"
#include "gw_ui.h"

#include <civetweb.h>
#include <string.h>

#define CSP                                                                                        \
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "                \
    "img-src 'self' data: blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

const gw_ui_asset *gw_ui_find(const char *path)
{
    if (strncmp(path, "/ui/", 4) != 0)
        return NULL;
    const char *name = path[4] ? path + 4 : "index.html";
    for (size_t i = 0; i < gw_ui_nassets; i++)
        if (strcmp(gw_ui_assets[i].name, name) == 0)
            return &gw_ui_assets[i];
    return NULL;
}

int gw_ui_serve(gw_req *r)
{
    const char *path = r->ri->local_uri ? r->ri->local_uri : "";
    const char *method = r->ri->request_method ? r->ri->request_method : "";
    static const gw_header get_only[] = {{"Allow", "GET"}, {NULL, NULL}};
    static const gw_header page[] = {{"Content-Security-Policy", CSP},
                                     {"Referrer-Policy", "no-referrer"},
                                     {"X-Frame-Options", "DENY"},
                                     {NULL, NULL}};
    if (strcmp(method, "GET") != 0)
        return gw_send_problem(r, 405, get_only, "the web UI's files only answer GET");
    if (strcmp(path, "/ui") == 0 || strcmp(path, "/") == 0) {
        static const gw_header to_ui[] = {{"Location", "/ui/"}, {NULL, NULL}};
        return gw_send(r, 302, "text/plain", "/ui/\n", 5, to_ui);
    }
    const gw_ui_asset *a = gw_ui_find(path);
    if (!a)
        return gw_send_problem(r, 404, NULL, "the web UI has no file at this path");
    return gw_send(r, 200, a->media_type, a->data, a->len, page);
}
