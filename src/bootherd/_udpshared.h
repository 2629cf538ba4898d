/*
 * What the native modules (_udpsend.c, _tftpdata.c) share: Python address tuples to
 * sockaddr, and the one routine that sends UDP datagrams as a GSO buffer, falling back to
 * one datagram at a time when the kernel refuses to segment.
 */
#ifndef BOOTHERD_UDPSHARED_H
#define BOOTHERD_UDPSHARED_H

#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#define GSO_MAX_BYTES 65000  /* one UDP GSO buffer stays under the 64 KiB datagram limit */
#define GSO_MAX_SEGS 64

/* (host, port[, flowinfo, scope_id]) -> sockaddr; 0 or -1 with an exception set. */
static int parse_addr(PyObject *addr, struct sockaddr_storage *out, socklen_t *len) {
    const char *host;
    int port;
    unsigned int flow = 0, scope = 0;
    if (!PyTuple_Check(addr) ||
        !PyArg_ParseTuple(addr, "si|II", &host, &port, &flow, &scope)) {
        PyErr_SetString(PyExc_TypeError, "address must be a (host, port) tuple");
        return -1;
    }
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return -1;
    }
    memset(out, 0, sizeof(*out));
    struct sockaddr_in *a4 = (struct sockaddr_in *)out;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((unsigned short)port);
        *len = sizeof(*a4);
        return 0;
    }
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((unsigned short)port);
        a6->sin6_flowinfo = htonl(flow);
        a6->sin6_scope_id = scope;
        *len = sizeof(*a6);
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "not a numeric IP address: %s", host);
    return -1;
}

/* The errors with which a kernel refuses a GSO buffer it cannot segment. */
static int gso_refused(int err) {
    return err == EINVAL || err == EIO || err == EMSGSIZE || err == ENOPROTOOPT ||
           err == EOPNOTSUPP;
}

/* What the send routines did, datagram by datagram. */
typedef struct {
    unsigned long long sent;         /* datagrams the kernel took */
    unsigned long long errors;       /* datagrams that could not be sent */
    unsigned long long gso_buffers;  /* GSO buffers the kernel took */
    unsigned long long retries;      /* waits for room in a full send buffer */
    int last_errno;
} SendCounts;

/* How long a send waits for room in a full send buffer: up to `waits` times `wait_ms`. */
typedef struct {
    int waits, wait_ms;
} Patience;

typedef union {
    char buf[CMSG_SPACE(sizeof(uint16_t))];
    struct cmsghdr align;
} GsoControl;

/* Makes mh one GSO buffer of `seg`-byte datagrams (UDP_SEGMENT); ctl must outlive mh. */
static void set_gso(struct msghdr *mh, GsoControl *ctl, size_t seg) {
    memset(ctl, 0, sizeof *ctl);
    mh->msg_control = ctl->buf;
    mh->msg_controllen = sizeof ctl->buf;
    struct cmsghdr *cm = CMSG_FIRSTHDR(mh);
    cm->cmsg_level = SOL_UDP;
    cm->cmsg_type = UDP_SEGMENT;
    cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    uint16_t size = (uint16_t)seg;
    memcpy(CMSG_DATA(cm), &size, sizeof size);
}

/* One sendmsg, waiting for room while the send buffer is full; -1 with errno set. */
static ssize_t send_patiently(int fd, const struct msghdr *mh, Patience wait,
                              SendCounts *c) {
    for (int again = 0;;) {
        ssize_t r = sendmsg(fd, mh, MSG_DONTWAIT);
        if (r >= 0)
            return r;
        if (errno == EINTR)
            continue;
        if ((errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) &&
            again++ < wait.waits) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            c->retries++;
            poll(&p, 1, wait.wait_ms);
            continue;
        }
        return -1;
    }
}

#define SPLIT_IOV 8  /* pieces one datagram may be made of in send_split */

/* The bytes of iov[0..iovcnt) as datagrams of `seg` bytes (the last may be shorter), one
 * sendmsg each: what a GSO buffer the kernel refused becomes. */
static void send_split(int fd, const struct sockaddr *to, socklen_t tolen,
                       const struct iovec *iov, size_t iovcnt, size_t seg, Patience wait,
                       SendCounts *c) {
    size_t i = 0, off = 0;  /* position: iov[i], off bytes into it */
    while (i < iovcnt) {
        struct iovec part[SPLIT_IOV];
        size_t nparts = 0, len = 0;
        while (len < seg && i < iovcnt && nparts < SPLIT_IOV) {
            size_t take = iov[i].iov_len - off;
            if (take > seg - len)
                take = seg - len;
            if (take > 0) {
                part[nparts].iov_base = (char *)iov[i].iov_base + off;
                part[nparts].iov_len = take;
                nparts++;
                len += take;
            }
            off += take;
            if (off == iov[i].iov_len) {
                i++;
                off = 0;
            }
        }
        if (nparts == 0)
            break;
        struct msghdr mh = {0};
        mh.msg_name = (void *)to;
        mh.msg_namelen = tolen;
        mh.msg_iov = part;
        mh.msg_iovlen = nparts;
        if (send_patiently(fd, &mh, wait, c) < 0) {
            c->errors++;
            c->last_errno = errno;
        } else {
            c->sent++;
        }
    }
}

/* The one send routine for datagrams of `seg` bytes (the last may be shorter), `nseg` of
 * them, whose bytes iov[0..iovcnt) holds in order: one GSO buffer while *gso is on (and
 * there are several), else one by one.  A kernel that refuses to segment turns *gso off for
 * good and gets the datagrams one by one; any other error loses them all (counted; the
 * caller's retransmission copes). */
static void send_segments(int fd, const struct sockaddr *to, socklen_t tolen,
                          const struct iovec *iov, size_t iovcnt, size_t seg, size_t nseg,
                          int *gso, Patience wait, SendCounts *c) {
    if (*gso && nseg > 1) {
        struct msghdr mh = {0};
        GsoControl ctl;
        mh.msg_name = (void *)to;
        mh.msg_namelen = tolen;
        mh.msg_iov = (struct iovec *)iov;
        mh.msg_iovlen = iovcnt;
        set_gso(&mh, &ctl, seg);
        if (send_patiently(fd, &mh, wait, c) >= 0) {
            c->gso_buffers++;
            c->sent += nseg;
            return;
        }
        if (!gso_refused(errno)) {
            c->errors += nseg;
            c->last_errno = errno;
            return;
        }
        *gso = 0;  /* this kernel or path cannot segment: one by one from now on */
    }
    send_split(fd, to, tolen, iov, iovcnt, seg, wait, c);
}

#endif
