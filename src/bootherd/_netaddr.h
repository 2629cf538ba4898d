/*
 * What the native modules (_udpsend.c, _tftpdata.c) share: Python address tuples to
 * sockaddr, and the errors with which a kernel refuses a UDP GSO buffer.
 */
#ifndef BOOTHERD_NETADDR_H
#define BOOTHERD_NETADDR_H

#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <string.h>
#include <sys/socket.h>

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

#endif
