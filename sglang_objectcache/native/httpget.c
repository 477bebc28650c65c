/* One HTTP/1.1 range GET on a connected, blocking socket, its body received straight into the
 * caller's buffer: called through ctypes.CDLL, so the GIL is released for the whole request.
 *
 * Why: obstore moves a range through hyper's chunks and then a contiguous buffer before we copy it
 * into the host pool, and hands every completion back through the GIL. Here the kernel copies the
 * body once, into a buffer the caller owns, and the GIL is taken once per range. Python signs the
 * request, owns the socket (timeouts via SO_RCVTIMEO/SO_SNDTIMEO) and closes it after any error.
 *
 * Plain HTTP only (no TLS): the caller uses it for http:// endpoints and obstore elsewhere.
 */
#define _GNU_SOURCE /* memmem */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/types.h>

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
};

/* Send or receive exactly n bytes: EINTR resumed, a timeout or a closed peer is OC_EIO. */
static int64_t xfer_all(int fd, char *p, int64_t n, int sending, int64_t *info)
{
    while (n > 0) {
        ssize_t k = sending ? send(fd, p, (size_t)n, MSG_NOSIGNAL) : recv(fd, p, (size_t)n, MSG_WAITALL);
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

static const char *find_crlf(const char *p, const char *end)
{
    for (; p + 1 < end; p++)
        if (p[0] == '\r' && p[1] == '\n')
            return p;
    return NULL;
}

/* Send req, then receive the response: want body bytes into dst.
 * hdr (hdr_cap bytes) receives the header block (and, for an error status, the body's start).
 * info[0] status, [1] header bytes, [2] Content-Length, [3] keep-alive (1/0), [4] errno, [5] body
 * bytes kept after the header in hdr (error statuses only).
 * Returns OC_OK (info[2] body bytes are in dst, at most want) or one of the negative codes above. */
int64_t oc_http_get(int fd, const char *req, int64_t req_len, char *dst, int64_t want, char *hdr,
                    int64_t hdr_cap, int64_t *info)
{
    int64_t have = 0, rc;
    const char *eoh = NULL;

    info[0] = info[1] = info[4] = info[5] = 0;
    info[2] = -1;
    info[3] = 1;
    if ((rc = xfer_all(fd, (char *)req, req_len, 1, info)) != OC_OK)
        return rc;
    /* the header block: read what comes until its blank line */
    while (eoh == NULL) {
        if (have >= hdr_cap)
            return OC_EPROTO;
        ssize_t k = recv(fd, hdr + have, (size_t)(hdr_cap - have), 0);
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
    if (have < 12 || strncmp(hdr, "HTTP/1.", 7) != 0)
        return OC_EPROTO;
    info[0] = strtol(hdr + 9, NULL, 10);
    int chunked = 0;
    const char *line = find_crlf(hdr, eoh);
    while (line != NULL && line + 2 < eoh - 2) {
        const char *start = line + 2, *end = find_crlf(start, eoh);
        if (end == NULL)
            break;
        if (header_is(start, end, "content-length:"))
            info[2] = strtoll(start + 15, NULL, 10);
        else if (header_is(start, end, "transfer-encoding:"))
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
        if (left > 0 && xfer_all(fd, hdr + have, left, 0, info) != OC_OK)
            left = 0;
        info[5] = (extra < hdr_cap - info[1] ? extra : hdr_cap - info[1]) + (left > 0 ? left : 0);
        return OC_ESTATUS;
    }
    if (chunked)
        return OC_ECHUNKED;
    /* a shorter body is the object's end (a truncated object): the caller sees info[2] bytes */
    if (info[2] < 0 || info[2] > want || extra > info[2])
        return OC_ELENGTH;
    memcpy(dst, eoh, (size_t)extra);
    return xfer_all(fd, dst + extra, info[2] - extra, 0, info);
}
