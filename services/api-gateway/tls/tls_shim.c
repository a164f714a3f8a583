/*
 * tls_shim.c: built twice as shared objects named libssl.so and libcrypto.so (Makefile,
 * $(BUILD)/lib/radpipe/), which the gateway loads by path before it starts TLS (gw_tls.c).
 * Debian's civetweb 1.15 loads OpenSSL at run time with dlopen("libssl.so") and
 * dlopen("libcrypto.so") and looks up OpenSSL 1.1 names, one of which OpenSSL 3 only has
 * as a macro: SSL_get_peer_certificate. Once these shims are loaded, civetweb's dlopen finds
 * them by their soname; their dependencies (the real libssl.so.3 / libcrypto.so.3) give every
 * other symbol. Stateless.
 */
#ifdef SHIM_SSL
#include <openssl/ssl.h>
#undef SSL_get_peer_certificate
X509 *SSL_get_peer_certificate(const SSL *s);
X509 *SSL_get_peer_certificate(const SSL *s)
{
    return SSL_get1_peer_certificate(s);
}
#else
/* the libcrypto shim only carries its dependency on libcrypto.so.3 */
int radpipe_tls_shim_crypto(void);
int radpipe_tls_shim_crypto(void)
{
    return 0;
}
#endif
