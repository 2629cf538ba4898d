/*
 * bootherd._udprecv: a UDP socket drained in batches, with the kernel's own figures.
 *
 * recv_batch(fd, max) reads up to `max` datagrams with one recvmmsg() call per 64, where
 * the event loop's datagram transport makes one recvfrom() and one Python callback per
 * datagram.  Each datagram comes with the kernel's receive time (SO_TIMESTAMPNS, when the
 * socket asks for it), so a request that waited in the receive queue is seen as old as it
 * is (what the kernel dropped because the queue was full is counted per socket in
 * /proc/net/udp: bootherd.udprecv reads it there).
 *
 *   recv_batch(fd, max, bufsize=2048, pktinfo=0) -> [(data, (host, port), time)]
 *       time: the kernel's receive time (time.time() scale), 0.0 when the socket gives none
 *       pktinfo=1: [(data, (host, port), time, info)], info the datagram's struct
 *       in_pktinfo (12 bytes: ifindex, local address, header destination) when the
 *       socket asks for IP_PKTINFO, else None: where a wildcard socket's request arrived
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define CHUNK 64

typedef union {
    char buf[CMSG_SPACE(sizeof(struct timespec)) + CMSG_SPACE(sizeof(struct in_pktinfo)) + 64];
    struct cmsghdr align;
} Control;

static PyObject *address(const struct sockaddr_storage *sa) {
    char host[INET6_ADDRSTRLEN];
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siIi)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo),
                             a->sin6_scope_id);
    }
    return Py_BuildValue("(si)", "", 0);
}

static PyObject *recv_batch(PyObject *Py_UNUSED(mod), PyObject *args) {
    int fd, max, bufsize = 2048, want_info = 0;
    if (!PyArg_ParseTuple(args, "ii|ip:recv_batch", &fd, &max, &bufsize, &want_info))
        return NULL;
    if (max < 1 || bufsize < 1 || bufsize > 65536) {
        PyErr_SetString(PyExc_ValueError, "max >= 1, 1 <= bufsize <= 65536");
        return NULL;
    }
    /* One buffer per thread, kept: allocating 64 x bufsize per call would be an mmap and
     * an munmap per readiness event.  The GIL is released around recvmmsg, hence per
     * thread. */
    static __thread char *bufs = NULL;
    static __thread size_t bufs_size = 0;
    size_t need = (size_t)CHUNK * (size_t)bufsize;
    if (bufs_size < need) {
        char *b = realloc(bufs, need);
        if (b == NULL)
            return PyErr_NoMemory();
        bufs = b;
        bufs_size = need;
    }
    PyObject *items = PyList_New(0);
    if (items == NULL)
        return NULL;
    struct mmsghdr msgs[CHUNK];
    struct iovec iov[CHUNK];
    struct sockaddr_storage addrs[CHUNK];
    Control ctl[CHUNK];
    int left = max;
    while (left > 0) {
        int want = left < CHUNK ? left : CHUNK;
        memset(msgs, 0, sizeof(struct mmsghdr) * (size_t)want);
        for (int i = 0; i < want; i++) {
            iov[i].iov_base = bufs + (size_t)i * (size_t)bufsize;
            iov[i].iov_len = (size_t)bufsize;
            msgs[i].msg_hdr.msg_name = &addrs[i];
            msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_control = ctl[i].buf;
            msgs[i].msg_hdr.msg_controllen = sizeof ctl[i].buf;
        }
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = recvmmsg(fd, msgs, (unsigned)want, MSG_DONTWAIT, NULL);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (PyList_GET_SIZE(items) > 0)
                break;  /* give what was read; the error shows again on the next call */
            Py_DECREF(items);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (int i = 0; i < n; i++) {
            double ts = 0.0;
            const char *info = NULL;
            struct msghdr *mh = &msgs[i].msg_hdr;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c != NULL; c = CMSG_NXTHDR(mh, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
                    struct timespec t;
                    memcpy(&t, CMSG_DATA(c), sizeof t);
                    ts = (double)t.tv_sec + (double)t.tv_nsec / 1e9;
                } else if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO &&
                           c->cmsg_len >= CMSG_LEN(sizeof(struct in_pktinfo))) {
                    info = (const char *)CMSG_DATA(c);
                }
            }
            PyObject *it;
            if (!want_info)
                it = Py_BuildValue("(y#Nd)", (char *)iov[i].iov_base,
                                   (Py_ssize_t)msgs[i].msg_len, address(&addrs[i]), ts);
            else if (info != NULL)
                it = Py_BuildValue("(y#Ndy#)", (char *)iov[i].iov_base,
                                   (Py_ssize_t)msgs[i].msg_len, address(&addrs[i]), ts, info,
                                   (Py_ssize_t)sizeof(struct in_pktinfo));
            else
                it = Py_BuildValue("(y#NdO)", (char *)iov[i].iov_base,
                                   (Py_ssize_t)msgs[i].msg_len, address(&addrs[i]), ts, Py_None);
            if (it == NULL || PyList_Append(items, it) < 0) {
                Py_XDECREF(it);
                Py_DECREF(items);
                return NULL;
            }
            Py_DECREF(it);
        }
        left -= n;
        if (n < want)
            break;  /* the queue is empty */
    }
    return items;
}

static PyMethodDef methods[] = {
    {"recv_batch", recv_batch, METH_VARARGS,
     "recv_batch(fd, max, bufsize=2048, pktinfo=False) -> [(data, addr, time[, info])]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "bootherd._udprecv",
    "UDP datagrams read in batches with recvmmsg (see bootherd.udprecv).", -1, methods,
};

PyMODINIT_FUNC PyInit__udprecv(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    PyModule_AddIntConstant(m, "SO_TIMESTAMPNS", SO_TIMESTAMPNS);
    return m;
}
