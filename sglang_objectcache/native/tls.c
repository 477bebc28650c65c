/* TLS for the native range reader (https:// endpoints), over the system's OpenSSL.
 *
 * Python connects the socket (and sets its timeouts); oc_tls_open runs the handshake on it and
 * returns the SSL* that httpget.c, compiled with -DOC_TLS, reads and writes through. The peer is
 * always verified: against the system's trust store, or the CA bundle given (a private CA), and
 * the certificate must name the host (or IP address) connected to. Every call blocks with the GIL
 * released (ctypes.CDLL).
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

static void why(char *err, int64_t cap, const char *what)
{
    unsigned long e = ERR_get_error();
    char buf[256] = "";
    if (e)
        ERR_error_string_n(e, buf, sizeof buf);
    snprintf(err, (size_t)cap, "%s%s%s", what, buf[0] ? ": " : "", buf);
    ERR_clear_error();
}

/* A client context: TLS 1.2 or later, peers verified against ca_file (PEM; NULL or "": the
 * system's default store). NULL with the reason in err if it cannot be made. */
void *oc_tls_ctx(const char *ca_file, char *err, int64_t cap)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) {
        why(err, cap, "cannot make a TLS context");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_AUTO_RETRY);
    int ok = (ca_file != NULL && ca_file[0]) ? SSL_CTX_load_verify_locations(ctx, ca_file, NULL)
                                             : SSL_CTX_set_default_verify_paths(ctx);
    if (ok != 1) {
        why(err, cap, (ca_file != NULL && ca_file[0]) ? "cannot load the CA bundle" : "cannot load the system's CAs");
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

void oc_tls_ctx_free(void *ctx) { SSL_CTX_free((SSL_CTX *)ctx); }

/* The handshake on connected socket fd for host (a name, or an IP address when is_ip): the SSL*,
 * or NULL with the reason in err (a certificate that does not verify says why). */
void *oc_tls_open(void *ctx, int fd, const char *host, int is_ip, char *err, int64_t cap)
{
    SSL *s = SSL_new((SSL_CTX *)ctx);
    if (s == NULL) {
        why(err, cap, "cannot make a TLS connection");
        return NULL;
    }
    int ok = SSL_set_fd(s, fd);
    if (ok == 1 && is_ip)
        ok = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(s), host);
    else if (ok == 1)
        ok = SSL_set_tlsext_host_name(s, host) == 1 && SSL_set1_host(s, host) == 1;
    if (ok != 1) {
        why(err, cap, "cannot set up the TLS connection");
        SSL_free(s);
        return NULL;
    }
    if (SSL_connect(s) != 1) {
        long v = SSL_get_verify_result(s);
        if (v != X509_V_OK) {
            snprintf(err, (size_t)cap, "certificate verify failed: %s", X509_verify_cert_error_string(v));
            ERR_clear_error();
        } else
            why(err, cap, "TLS handshake failed");
        SSL_free(s);
        return NULL;
    }
    return s;
}

/* Frees the connection's TLS state (no close_notify: the caller closes the socket next). */
void oc_tls_free(void *s) { SSL_free((SSL *)s); }
