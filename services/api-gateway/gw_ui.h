/*
 * gw_ui.h: the web UI (services/api-gateway/ui/), embedded in the gateway at build time
 * (gen-ui.sh) and served under /ui/ without a token: the files hold no data; the page asks
 * for a token and calls /api/v1 with it like any other client.
 */
#ifndef GW_UI_H
#define GW_UI_H

#include <stddef.h>

typedef struct gw_ui_asset {
    const char *name;       /* "index.html", "app.js", ... */
    const char *media_type; /* "text/html; charset=utf-8", ... */
    const unsigned char *data;
    size_t len;
} gw_ui_asset;

extern const gw_ui_asset gw_ui_assets[];
extern const size_t gw_ui_nassets;

/* The asset of a request path ("/ui/" is index.html), or NULL. */
const gw_ui_asset *gw_ui_find(const char *path);

#endif
