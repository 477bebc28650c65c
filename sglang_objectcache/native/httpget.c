/* One HTTP/1.1 range GET on a connected, blocking socket, its body received straight into the
 * caller's buffer: called through ctypes.CDLL, so the GIL is released for the whole request.
 *
 * Why: obstore moves a range through hyper's chunks and then a contiguous buffer before we copy it
 * into the host pool, and hands every completion back through the GIL. Here the kernel copies the
 * body once, into a buffer the caller owns, and the GIL is taken once per range. Python signs the
 * request, owns the socket (timeouts via SO_RCVTIMEO/SO_SNDTIMEO) and closes it after any error.
 *
 * oc_http_get_pieces goes one step further: the body is never held whole. Each piece of the range is
 * received into a small bounce buffer that stays in the core's cache, checked there and copied to
 * its targets, so every byte crosses memory once on its way into the host pool (receive into a
 * 16 MiB staging buffer, then check and copy, crossed it three times).
 *
 * Compiled twice: plain (a connection is a socket's fd), and with -DOC_TLS into a second library
 * linked with OpenSSL, where a connection is an SSL* on that socket (tls.c makes it) and the same
 * functions are exported as oc_https_get / oc_https_get_pieces. Only conn_io and conn_fd differ.
 */
#define _GNU_SOURCE /* memmem */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <time.h>

#ifdef OC_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#define oc_http_get oc_https_get
#define oc_http_get_pieces oc_https_get_pieces
#define oc_gate_close oc_tls_gate_close
#endif

typedef uint64_t (*oc_hash_fn)(const void *, size_t);
typedef intptr_t oc_conn; /* a socket fd, or (OC_TLS) an SSL* */

void oc_layers_arrived(int64_t *st, int64_t n, int64_t l0, int64_t l1); /* layers.c */

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

enum {
    OC_OK = 0,
    OC_EIO = -1,        /* send/recv failed, timed out (errno in info[4]) or the peer closed */
    OC_EPROTO = -2,     /* not an HTTP/1.x response, or a header block over hdr_cap */
    OC_ESTATUS = -3,    /* a status other than 200/206: info[0]; the body's start follows the header in hdr */
    OC_ELENGTH = -4,    /* Content-Length absent or longer than asked for */
    OC_ECHUNKED = -5,   /* a chunked body: not expected for ranges, not handled here */
    OC_EBAD = -6,       /* oc_http_get_pieces: piece info[6] failed its check; it and later ones not copied */
    OC_ECLOSED = -7,    /* oc_http_get_pieces: the gate closed (the fetch ended); nothing more copied */
    OC_ESHORT = -8,     /* oc_http_get_pieces: a body shorter than asked (info[2]): nothing copied */
    OC_ERANGE = -9,     /* the response is not the range asked for (Content-Range, or a 200 mid-object) */
};

#ifdef OC_TLS
static int conn_fd(oc_conn c) { return SSL_get_fd((SSL *)c); }

/* One SSL_read or SSL_write (blocking; the socket's timeouts bound it): bytes moved, 0 when the
 * peer closed, -1 with errno set otherwise (EAGAIN for a timeout, as the plain path gives). */
static ssize_t conn_io(oc_conn c, char *p, size_t n, int sending, int waitall)
{
    (void)waitall; /* the callers loop until n */
    size_t k = 0;
    errno = 0;
    int ok = sending ? SSL_write_ex((SSL *)c, p, n, &k) : SSL_read_ex((SSL *)c, p, n, &k);
    if (ok)
        return (ssize_t)k;
    int e = SSL_get_error((SSL *)c, 0);
    ERR_clear_error();
    if (e == SSL_ERROR_ZERO_RETURN)
        return 0;
    if (e == SSL_ERROR_SYSCALL && errno == 0)
        return 0; /* EOF without close_notify: the peer went away */
    if (errno == 0 || errno == EINTR)
        errno = (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) ? EAGAIN : EPROTO;
    return -1;
}
#else
static int conn_fd(oc_conn c) { return (int)c; }

static ssize_t conn_io(oc_conn c, char *p, size_t n, int sending, int waitall)
{
    return sending ? send((int)c, p, n, MSG_NOSIGNAL) : recv((int)c, p, n, waitall ? MSG_WAITALL : 0);
}
#endif

/* Bound the next wait by the request's deadline, info[7] (CLOCK_MONOTONIC ns; 0: none): the
 * socket's timeouts become the time left, so a server that trickles bytes cannot hold a request
 * past it. 0 (info[4] = EAGAIN, as a timed-out wait) once the deadline has passed. */
static int arm(oc_conn c, int64_t *info)
{
    int fd = conn_fd(c);
    if (info[7] <= 0)
        return 1;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t left = info[7] - ((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec);
    if (left <= 0) {
        info[4] = EAGAIN;
        return 0;
    }
    struct timeval tv = {(time_t)(left / 1000000000), (suseconds_t)(left % 1000000000 / 1000)};
    if (tv.tv_sec == 0 && tv.tv_usec == 0)
        tv.tv_usec = 1; /* zero would mean no timeout at all */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return 1;
}

/* Send or receive exactly n bytes: EINTR resumed, a timeout, the deadline or a closed peer is
 * OC_EIO. */
static int64_t xfer_all(oc_conn c, char *p, int64_t n, int sending, int64_t *info)
{
    while (n > 0) {
        if (!arm(c, info))
            return OC_EIO;
        ssize_t k = conn_io(c, p, (size_t)n, sending, 1);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            info[4] = k < 0 ? errno : 0;
            return OC_EIO;
        }
        p += k;
        n -= k;
    }
    return OC_OK;
}

/* Case-insensitive: does the header line [line, end) start with name? */
static int header_is(const char *line, const char *end, const char *name)
{
    size_t n = strlen(name);
    return (size_t)(end - line) >= n && strncasecmp(line, name, n) == 0;
}

/* A decimal number filling [p, end) (spaces and tabs around it allowed); -1 if it is empty, is
 * not all digits, or has more than 18 of them. Never reads outside [p, end). */
static int64_t parse_dec(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    while (end > p && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    if (p == end || end - p > 18)
        return -1;
    int64_t v = 0;
    for (; p < end; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        v = v * 10 + (*p - '0');
    }
    return v;
}

/* A Content-Range value in [p, end): "bytes FIRST-LAST/TOTAL" (TOTAL may be *). 0 and the two
 * numbers, or -1. */
static int parse_range(const char *p, const char *end, int64_t *first, int64_t *last)
{
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    if (end - p < 6 || strncasecmp(p, "bytes ", 6) != 0)
        return -1;
    p += 6;
    const char *dash = memchr(p, '-', (size_t)(end - p));
    const char *slash = dash ? memchr(dash, '/', (size_t)(end - dash)) : NULL;
    if (dash == NULL || slash == NULL)
        return -1;
    *first = parse_dec(p, dash);
    *last = parse_dec(dash + 1, slash);
    return *first < 0 || *last < *first ? -1 : 0;
}

static const char *find_crlf(const char *p, const char *end)
{
    for (; p + 1 < end; p++)
        if (p[0] == '\r' && p[1] == '\n')
            return p;
    return NULL;
}

/* Send req, then receive the response's header block into hdr (hdr_cap bytes; for an error status,
 * the body's start follows it there). info[0] status, [1] header bytes, [2] Content-Length, [3]
 * keep-alive (1/0), [4] errno, [5] body bytes kept after the header in hdr (error statuses only);
 * in: [7] the request's deadline (arm), [8] the first byte asked for (checked against Content-Range). On OC_OK, *body points at the body bytes that came with the
 * header and *extra counts them. */
static int64_t recv_head(oc_conn c, const char *req, int64_t req_len, char *hdr, int64_t hdr_cap, int64_t *info,
                         int64_t want, const char **body, int64_t *extra_out)
{
    int64_t have = 0, rc;
    const char *eoh = NULL;

    info[0] = info[1] = info[4] = info[5] = 0;
    info[2] = -1;
    info[3] = 1;
    if ((rc = xfer_all(c, (char *)req, req_len, 1, info)) != OC_OK)
        return rc;
    /* the header block: read what comes until its blank line */
    while (eoh == NULL) {
        if (have >= hdr_cap)
            return OC_EPROTO;
        if (!arm(c, info))
            return OC_EIO;
        ssize_t k = conn_io(c, hdr + have, (size_t)(hdr_cap - have), 0, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            info[4] = k < 0 ? errno : 0;
            return OC_EIO;
        }
        int64_t from = have > 3 ? have - 3 : 0;
        have += k;
        for (int64_t i = from; i + 3 < have; i++)
            if (hdr[i] == '\r' && hdr[i + 1] == '\n' && hdr[i + 2] == '\r' && hdr[i + 3] == '\n') {
                eoh = hdr + i + 4;
                break;
            }
    }
    info[1] = eoh - hdr;
    /* Everything below reads only inside [hdr, eoh): the header block as received. */
    const char *sl_end = find_crlf(hdr, eoh);
    if (sl_end == NULL || sl_end - hdr < 12 || strncmp(hdr, "HTTP/1.", 7) != 0 || hdr[8] != ' '
        || (sl_end > hdr + 12 && hdr[12] != ' '))
        return OC_EPROTO;
    if ((info[0] = parse_dec(hdr + 9, hdr + 12)) < 100)
        return OC_EPROTO;
    int chunked = 0;
    int64_t r_first = -1, r_last = -1;
    const char *line = sl_end;
    while (line + 2 < eoh - 2) {
        const char *start = line + 2, *end = find_crlf(start, eoh);
        if (end == NULL)
            break;
        if (header_is(start, end, "content-length:")) {
            int64_t v = parse_dec(start + 15, end);
            if (v < 0 || (info[2] >= 0 && info[2] != v))
                return OC_EPROTO; /* empty, not a number, or two that disagree */
            info[2] = v;
        } else if (header_is(start, end, "content-range:")) {
            if (parse_range(start + 14, end, &r_first, &r_last) != 0)
                return OC_EPROTO;
        } else if (header_is(start, end, "transfer-encoding:"))
            chunked = memmem(start, (size_t)(end - start), "chunked", 7) != NULL;
        else if (header_is(start, end, "connection:"))
            info[3] = memmem(start, (size_t)(end - start), "close", 5) == NULL;
        line = end;
    }
    int64_t extra = have - info[1]; /* body bytes that came with the header */
    if (info[0] != 200 && info[0] != 206) {
        /* keep the body's start for the caller's message; the caller drops the connection */
        int64_t room = hdr_cap - have, left = info[2] > extra ? info[2] - extra : 0;
        if (left > room)
            left = room;
        if (left > 0 && xfer_all(c, hdr + have, left, 0, info) != OC_OK)
            left = 0;
        info[5] = (extra < hdr_cap - info[1] ? extra : hdr_cap - info[1]) + (left > 0 ? left : 0);
        return OC_ESTATUS;
    }
    if (chunked)
        return OC_ECHUNKED;
    if (info[2] < 0 || info[2] > want || extra > info[2])
        return OC_ELENGTH;
    /* the bytes asked for, not others: a 206 names its range, which starts where ours does and is
     * as long as its body; a 200 (a server that ignored Range) is the object from its start */
    if (info[0] == 206 ? (r_first != info[8] || r_last - r_first + 1 != info[2]) : info[8] != 0)
        return OC_ERANGE;
    *body = eoh;
    *extra_out = extra;
    return OC_OK;
}

/* Send req, then receive the response: want body bytes into dst. hdr and info as for recv_head.
 * Returns OC_OK (info[2] body bytes are in dst, at most want) or one of the negative codes above. */
int64_t oc_http_get(oc_conn c, const char *req, int64_t req_len, char *dst, int64_t want, char *hdr,
                    int64_t hdr_cap, int64_t *info)
{
    const char *body;
    int64_t extra, rc = recv_head(c, req, req_len, hdr, hdr_cap, info, want, &body, &extra);
    if (rc != OC_OK)
        return rc;
    /* a shorter body is the object's end (a truncated object): the caller sees info[2] bytes */
    memcpy(dst, body, (size_t)extra);
    return xfer_all(c, dst + extra, info[2] - extra, 0, info);
}

/* The gate between a fetch and the threads copying into its pages: a count of copies running,
 * and a closed bit. A thread enters before each piece's copies and leaves after them; oc_gate_close
 * sets the bit and waits out the copies running (one piece's worth), so once it returns no byte
 * reaches the pages again, while a thread blocked on the network never delays it. */
#define OC_GATE_CLOSED ((int64_t)1 << 62)

static int gate_enter(int64_t *gate)
{
    int64_t v = __atomic_load_n(gate, __ATOMIC_ACQUIRE);
    while (!(v & OC_GATE_CLOSED))
        if (__atomic_compare_exchange_n(gate, &v, v + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return 1;
    return 0;
}

int64_t oc_gate_close(int64_t *gate)
{
    __atomic_fetch_or(gate, OC_GATE_CLOSED, __ATOMIC_ACQ_REL);
    while (__atomic_load_n(gate, __ATOMIC_ACQUIRE) != OC_GATE_CLOSED)
        sched_yield();
    return 0;
}

/* Bytes of the body, first those that came with the header, then from the socket. */
typedef struct {
    oc_conn conn;
    const char *pending;
    int64_t n_pending;
    int64_t *info;
} body_t;

static int64_t take(body_t *b, char *dst, int64_t n)
{
    if (b->n_pending > 0) {
        int64_t k = n < b->n_pending ? n : b->n_pending;
        memcpy(dst, b->pending, (size_t)k);
        b->pending += k;
        b->n_pending -= k;
        dst += k;
        n -= k;
    }
    return n > 0 ? xfer_all(b->conn, dst, n, 0, b->info) : OC_OK;
}

static int64_t skip(body_t *b, char *bounce, int64_t cap, int64_t n)
{
    while (n > 0) {
        int64_t k = n < cap ? n : cap, rc = take(b, bounce, k);
        if (rc != OC_OK)
            return rc;
        n -= k;
    }
    return OC_OK;
}

/* A range GET whose pieces go straight to their targets: piece i is bytes [off[i], off[i] +
 * piece_len) of the body (ascending, not overlapping), checked against expect[i] (hash != NULL),
 * then copied: copies[first[i]] up to copies[first[i + 1]], each (dst, offset in the body, len),
 * the offset inside piece i. Bytes between pieces are received and dropped. bounce holds at least
 * piece_len bytes: adjacent pieces that fit it together come in one receive, and stay in the core's
 * cache while they are checked and copied. The gate (above) is entered around each piece's copies.
 * The pieces are layer-major, per_layer of them a layer from layer l0: where layers is not NULL (a
 * fetch's readiness words, layers.c, of n_layers layers), each layer counts as arrived there as
 * soon as its last piece is copied, while the rest of the range is still on the wire.
 * Returns OC_OK with the whole body consumed (the connection may be kept), or an error: OC_EBAD
 * (info[6] the bad piece: those before it are in place), OC_ECLOSED, OC_ESHORT or those of
 * recv_head/OC_EIO; after an error the caller drops the connection. */
int64_t oc_http_get_pieces(oc_conn c, const char *req, int64_t req_len, int64_t want, char *hdr, int64_t hdr_cap,
                           int64_t *info, const uint64_t *off, int64_t n_pieces, uint64_t piece_len,
                           const uint64_t *expect, oc_hash_fn hash, const uint64_t *copies,
                           const int64_t *first, char *bounce, int64_t bounce_cap, int64_t *gate,
                           int64_t *layers, int64_t n_layers, int64_t l0, int64_t per_layer)
{
    body_t b;
    int64_t at = 0, rc = recv_head(c, req, req_len, hdr, hdr_cap, info, want, &b.pending, &b.n_pending);

    info[6] = -1;
    if (rc != OC_OK)
        return rc;
    if (info[2] < want)
        return OC_ESHORT;
    if ((int64_t)piece_len > bounce_cap || (layers != NULL && (per_layer <= 0 || n_pieces % per_layer != 0)))
        return OC_EPROTO;
    b.conn = c;
    b.info = info;
    for (int64_t i = 0, j; i < n_pieces; i = j) {
        if ((int64_t)off[i] < at || (int64_t)(off[i] + piece_len) > want)
            return OC_EPROTO;
        /* a run of adjacent pieces that fits the bounce buffer comes in one receive */
        for (j = i + 1; j < n_pieces && off[j] == off[j - 1] + piece_len &&
                        (int64_t)((j - i + 1) * piece_len) <= bounce_cap && (int64_t)(off[j] + piece_len) <= want;
             j++)
            ;
        if ((rc = skip(&b, bounce, bounce_cap, (int64_t)off[i] - at)) != OC_OK ||
            (rc = take(&b, bounce, (int64_t)((j - i) * piece_len))) != OC_OK)
            return rc;
        at = (int64_t)(off[j - 1] + piece_len);
        for (int64_t k = i; k < j; k++) {
            const char *piece = bounce + (off[k] - off[i]);
            if (hash != NULL && hash(piece, piece_len) != expect[k]) {
                info[6] = k;
                return OC_EBAD;
            }
            if (!gate_enter(gate))
                return OC_ECLOSED;
            for (int64_t c = first[k]; c < first[k + 1]; c++)
                memcpy((void *)(uintptr_t)copies[3 * c], piece + (copies[3 * c + 1] - off[k]),
                       (size_t)copies[3 * c + 2]);
            __atomic_fetch_sub(gate, 1, __ATOMIC_RELEASE);
            if (layers != NULL && (k + 1) % per_layer == 0)
                oc_layers_arrived(layers, n_layers, l0 + k / per_layer, l0 + k / per_layer + 1);
        }
    }
    return skip(&b, bounce, bounce_cap, want - at);
}
