/*
 * gw_tls.c: HTTPS for the gateway (RADPIPE_TLS_CERT_FILE). civetweb does the TLS; this file
 * makes sure it can. Debian's civetweb 1.15 has TLS compiled in (mg_check_feature) but loads
 * OpenSSL itself at run time by dlopen("libssl.so") / dlopen("libcrypto.so") with OpenSSL 1.1
 * symbol names, which OpenSSL 3 no longer exports in full, and the unversioned names exist
 * only where the -dev package is installed. The build puts two shims (tls/tls_shim.c) named
 * libssl.so and libcrypto.so into lib/radpipe/ beside bin/; loaded here by path before
 * civetweb starts TLS, they are what its dlopen then finds (glibc matches loaded objects by
 * soname). Without them (another system's OpenSSL 1.1) civetweb loads OpenSSL on its own.
 * Called once at start, before the worker threads exist.
 */
#include <dlfcn.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <civetweb.h>
#include "gw.h"
#include "lc/log.h"
#include "lc/util.h"

/* Load <dir of the executable>/../lib/radpipe/<name>; 1 when loaded. */
static int load_shim(const char *name)
{
    char exe[PATH_MAX], path[PATH_MAX + 64];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0)
        return 0;
    exe[n] = '\0';
    snprintf(path, sizeof(path), "%s/../lib/radpipe/%s", dirname(exe), name);
    /* RTLD_NODELETE: the object must stay for civetweb's own dlopen to find it */
    void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL | RTLD_NODELETE);
    if (!h) {
        lc_log_debug("tls shim not loaded", LC_LS("path", path), LC_LS("error", dlerror()));
        return 0;
    }
    dlclose(h);
    return 1;
}

lc_rc gw_tls_prepare(const gw_config *cfg, char *ports, size_t cap, lc_err *err)
{
    size_t n = 0;
    if (!mg_check_feature(MG_FEATURES_TLS))
        return lc_err_set(err, LC_ERR_CONFIG,
                          "RADPIPE_TLS_CERT_FILE is set but this civetweb was built without TLS");
    if (access(cfg->tls_cert_file, R_OK) != 0)
        return lc_err_set(err, LC_ERR_CONFIG, "cannot read RADPIPE_TLS_CERT_FILE \"%s\"",
                          cfg->tls_cert_file);
    int shims = load_shim("libcrypto.so") + load_shim("libssl.so");
    lc_log_info("tls", LC_LS("cert_file", cfg->tls_cert_file), LC_LB("openssl_shims", shims == 2));
    /* every listening port speaks TLS: "host:port" -> "host:ports" */
    ports[0] = '\0';
    for (const char *p = cfg->http_listen; *p;) {
        size_t len = strcspn(p, ",");
        if (len) {
            int marked = p[len - 1] == 's' || p[len - 1] == 'r';
            int k = snprintf(ports + n, cap - n, "%s%.*s%s", n ? "," : "", (int)len, p,
                             marked ? "" : "s");
            if (k < 0 || (size_t)k >= cap - n)
                return lc_err_set(err, LC_ERR_CONFIG, "RADPIPE_HTTP_LISTEN is too long");
            n += (size_t)k;
        }
        p += len + (p[len] == ',');
    }
    return LC_OK;
}
