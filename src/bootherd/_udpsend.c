/*
 * bootherd._udpsend: UDP sends moved off the event loop's thread.
 *
 * A reply's sendto() costs more kernel time than deciding the reply costs Python time: on
 * loopback and veth the sender's system call carries the packet all the way into the
 * receiver's socket.  The event loop hands its replies to a Sender instead; one native
 * thread, which never takes the GIL, sends them with sendmmsg() (one call per run of
 * packets to the same socket) while the loop goes on with the next request.
 *
 * With gso=True, send_many() of equal-sized datagrams to one address (a TFTP window) goes
 * as one UDP GSO buffer (UDP_SEGMENT): the kernel walks its stack once for the whole
 * window and cuts it into the same datagrams.  If the kernel refuses, the datagrams go
 * one by one and GSO stays off for this Sender (send_segments in _udpshared.h, the routine
 * the TFTP data path sends its windows with too).
 *
 * Queued datagrams leave at flush() (or once many are queued).  Order is kept (FIFO).
 * forget(fd) must be called before a socket is closed:
 * it drops that socket's queued packets and waits until no send is using it, so a number
 * reused by a new socket never carries a stale packet.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "_udpshared.h"

#define BATCH 64            /* packets per sendmmsg() */
#define EAGER_WAKE 256      /* wake the thread without waiting for flush() past this */

typedef struct {
    int fd;
    socklen_t addrlen;
    struct sockaddr_storage addr;
    size_t len;
    char *data;
    unsigned short gso;   /* > 0: data holds datagrams of this size (the last may be shorter) */
} Item;

typedef struct {
    Item *items;
    size_t n, cap;
} Queue;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t wake;  /* the thread waits here for work */
    pthread_cond_t idle;  /* forget() and close() wait here for the batch in flight */
    Queue pending;
    Queue sending;        /* owned by the thread while busy */
    int busy, stop, started, closed;
    int flushed;          /* flush() asked for what is pending to go */
    int gso;              /* send_many() joins equal datagrams into one GSO buffer */
    pthread_t thread;
    SendCounts counts;
    unsigned long long calls;
} Sender;

/* The sending thread has the core to itself: it may wait for a full buffer to drain. */
static const Patience PATIENCE = {.waits = 20, .wait_ms = 50};

/* Appends a datagram whose buffer the queue now owns (freed after sending). */
static int queue_take(Queue *q, int fd, const struct sockaddr_storage *addr, socklen_t alen,
                      char *data, size_t len, unsigned short gso) {
    if (q->n == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 256;
        Item *items = realloc(q->items, cap * sizeof(Item));
        if (items == NULL)
            return -1;
        q->items = items;
        q->cap = cap;
    }
    Item *it = &q->items[q->n++];
    it->fd = fd;
    it->addrlen = alen;
    memcpy(&it->addr, addr, alen);
    it->len = len;
    it->data = data;
    it->gso = gso;
    return 0;
}

static int queue_push(Queue *q, int fd, const struct sockaddr_storage *addr, socklen_t alen,
                      const char *data, size_t len) {
    char *copy = malloc(len ? len : 1);
    if (copy == NULL)
        return -1;
    memcpy(copy, data, len);
    if (queue_take(q, fd, addr, alen, copy, len, 0) < 0) {
        free(copy);
        return -1;
    }
    return 0;
}

static void queue_clear(Queue *q) {
    for (size_t i = 0; i < q->n; i++)
        free(q->items[i].data);
    q->n = 0;
}

static size_t segments(const Item *it) {
    return it->gso ? (it->len + it->gso - 1) / it->gso : 1;
}

/* A run of plain datagrams to one socket: sendmmsg, BATCH at a time. */
static void send_run(Sender *s, Item *items, size_t n) {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    SendCounts *c = &s->counts;
    size_t done = 0;
    int again = 0;
    while (done < n) {
        size_t cnt = n - done;
        for (size_t i = 0; i < cnt; i++) {
            Item *it = &items[done + i];
            iov[i].iov_base = it->data;
            iov[i].iov_len = it->len;
            memset(&msgs[i], 0, sizeof(msgs[i]));
            msgs[i].msg_hdr.msg_name = &it->addr;
            msgs[i].msg_hdr.msg_namelen = it->addrlen;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int r = sendmmsg(items[done].fd, msgs, (unsigned)cnt, 0);
        s->calls++;
        if (r > 0) {
            c->sent += (unsigned long long)r;
            done += (size_t)r;
            again = 0;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) &&
            again < PATIENCE.waits) {
            again++;
            c->retries++;
            struct pollfd p = {.fd = items[done].fd, .events = POLLOUT};
            poll(&p, 1, PATIENCE.wait_ms);
            continue;
        }
        /* This packet cannot go (unreachable, refused, closed...): count it, go on. */
        c->errors++;
        c->last_errno = r < 0 ? errno : 0;
        done++;
        again = 0;
    }
}

/* A GSO item (a window joined by send_many) through the shared routine. */
static void send_joined(Sender *s, Item *it) {
    struct iovec iov = {.iov_base = it->data, .iov_len = it->len};
    s->calls++;
    send_segments(it->fd, (struct sockaddr *)&it->addr, it->addrlen, &iov, 1, it->gso,
                  segments(it), &s->gso, PATIENCE, &s->counts);
}

static void send_all(Sender *s, Queue *q) {
    size_t i = 0;
    while (i < q->n) {
        if (q->items[i].gso) {
            send_joined(s, &q->items[i]);
            i++;
            continue;
        }
        size_t j = i + 1;
        while (j < q->n && j - i < BATCH && q->items[j].fd == q->items[i].fd &&
               !q->items[j].gso)
            j++;
        send_run(s, &q->items[i], j - i);
        i = j;
    }
}

static void *sender_main(void *arg) {
    Sender *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while ((s->pending.n == 0 || !s->flushed) && !s->stop)
            pthread_cond_wait(&s->wake, &s->mu);
        if (s->pending.n == 0)
            break;
        s->flushed = 0;
        Queue q = s->pending;
        s->pending = s->sending;
        s->sending = q;
        s->busy = 1;
        pthread_mutex_unlock(&s->mu);
        send_all(s, &s->sending);
        pthread_mutex_lock(&s->mu);
        queue_clear(&s->sending);  /* under the lock: forget() reads it */
        s->busy = 0;
        pthread_cond_broadcast(&s->idle);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static int ensure_started(Sender *s) {
    if (s->closed) {
        PyErr_SetString(PyExc_RuntimeError, "sender is closed");
        return -1;
    }
    if (s->started)
        return 0;
    int rc = pthread_create(&s->thread, NULL, sender_main, s);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    s->started = 1;
    return 0;
}

/* The socket and address of send(fd, data, address) / send_many(fd, packets, address),
 * checked, with the thread running; 0, or -1 with an exception set. */
static int target(Sender *s, PyObject *const *args, Py_ssize_t nargs, const char *usage,
                  int *fd, struct sockaddr_storage *sa, socklen_t *alen) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    long v = PyLong_AsLong(args[0]);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad file descriptor");
        return -1;
    }
    *fd = (int)v;
    return parse_addr(args[2], sa, alen) < 0 || ensure_started(s) < 0 ? -1 : 0;
}

/* Queues a copy of each packet (the GIL is held; the lock only for the copy). */
static PyObject *push_copies(Sender *s, int fd, PyObject *const *bufs, Py_ssize_t nbufs,
                             const struct sockaddr_storage *sa, socklen_t alen) {
    for (Py_ssize_t i = 0; i < nbufs; i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(bufs[i], &view, PyBUF_SIMPLE) < 0)
            return NULL;
        pthread_mutex_lock(&s->mu);
        int rc = queue_push(&s->pending, fd, sa, alen, view.buf, (size_t)view.len);
        if (s->pending.n >= EAGER_WAKE) {
            s->flushed = 1;
            pthread_cond_signal(&s->wake);
        }
        pthread_mutex_unlock(&s->mu);
        PyBuffer_Release(&view);
        if (rc < 0)
            return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

static PyObject *Sender_send(Sender *s, PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    struct sockaddr_storage sa;
    socklen_t alen;
    if (target(s, args, nargs, "send(fd, data, address)", &fd, &sa, &alen) < 0)
        return NULL;
    return push_copies(s, fd, &args[1], 1, &sa, alen);
}

/* Queues equal-sized datagrams as GSO buffers; 1 if done, 0 if they do not qualify. */
static int push_gso(Sender *s, int fd, PyObject *const *bufs, Py_ssize_t nbufs,
                    const struct sockaddr_storage *sa, socklen_t alen) {
    Py_ssize_t seg = 0;
    for (Py_ssize_t i = 0; i < nbufs; i++) {
        if (!PyBytes_Check(bufs[i]))
            return 0;
        Py_ssize_t n = PyBytes_GET_SIZE(bufs[i]);
        if (i == 0)
            seg = n;
        if (n == 0 || n > seg || (n < seg && i != nbufs - 1))
            return 0;
    }
    if (seg == 0 || seg > 65000 / 2)
        return 0;
    Py_ssize_t per = GSO_MAX_BYTES / seg;
    if (per > GSO_MAX_SEGS)
        per = GSO_MAX_SEGS;
    for (Py_ssize_t i = 0; i < nbufs; i += per) {
        Py_ssize_t cnt = nbufs - i < per ? nbufs - i : per;
        size_t total = 0;
        for (Py_ssize_t j = 0; j < cnt; j++)
            total += (size_t)PyBytes_GET_SIZE(bufs[i + j]);
        char *joined = malloc(total);
        if (joined == NULL)
            return -1;
        size_t off = 0;
        for (Py_ssize_t j = 0; j < cnt; j++) {
            memcpy(joined + off, PyBytes_AS_STRING(bufs[i + j]), PyBytes_GET_SIZE(bufs[i + j]));
            off += (size_t)PyBytes_GET_SIZE(bufs[i + j]);
        }
        pthread_mutex_lock(&s->mu);
        int rc = queue_take(&s->pending, fd, sa, alen, joined, total,
                            cnt > 1 ? (unsigned short)seg : 0);
        pthread_mutex_unlock(&s->mu);
        if (rc < 0) {
            free(joined);
            return -1;
        }
    }
    return 1;
}

static PyObject *Sender_send_many(Sender *s, PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    struct sockaddr_storage sa;
    socklen_t alen;
    if (target(s, args, nargs, "send_many(fd, packets, address)", &fd, &sa, &alen) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[1], "packets must be a sequence");
    if (seq == NULL)
        return NULL;
    PyObject *const *items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int joined = s->gso && n > 1 ? push_gso(s, fd, items, n, &sa, alen) : 0;
    PyObject *r = joined < 0 ? PyErr_NoMemory()
                  : joined > 0 ? Py_NewRef(Py_None) : push_copies(s, fd, items, n, &sa, alen);
    Py_DECREF(seq);
    return r;
}

static PyObject *Sender_flush(Sender *s, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&s->mu);
    if (s->pending.n) {
        s->flushed = 1;
        pthread_cond_signal(&s->wake);
    }
    pthread_mutex_unlock(&s->mu);
    Py_RETURN_NONE;
}

/* Is fd in the batch the thread is sending now?  (Called with the lock held.) */
static int in_flight(Sender *s, int fd) {
    if (!s->busy)
        return 0;
    for (size_t i = 0; i < s->sending.n; i++)
        if (s->sending.items[i].fd == fd)
            return 1;
    return 0;
}

static PyObject *Sender_forget(Sender *s, PyObject *arg) {
    int fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->mu);
    size_t keep = 0;
    for (size_t i = 0; i < s->pending.n; i++) {
        Item *it = &s->pending.items[i];
        if (it->fd == fd)
            free(it->data);
        else
            s->pending.items[keep++] = *it;
    }
    s->pending.n = keep;
    while (in_flight(s, fd))
        pthread_cond_wait(&s->idle, &s->mu);
    pthread_mutex_unlock(&s->mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void sender_stop(Sender *s) {
    if (s->closed)
        return;
    s->closed = 1;
    if (!s->started)
        return;
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
}

static PyObject *Sender_close(Sender *s, PyObject *Py_UNUSED(ignored)) {
    /* Sends what is queued, then ends the thread. */
    Py_BEGIN_ALLOW_THREADS
    sender_stop(s);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Sender_stats(Sender *s, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&s->mu);
    SendCounts c = s->counts;
    unsigned long long calls = s->calls;
    size_t pending = s->pending.n + (s->busy ? s->sending.n : 0);
    pthread_mutex_unlock(&s->mu);
    return Py_BuildValue("{sKsKsKsKsnsisisK}", "sent", c.sent, "errors", c.errors, "retries",
                         c.retries, "calls", calls, "pending", (Py_ssize_t)pending,
                         "last_errno", c.last_errno, "gso", s->gso, "gso_buffers",
                         c.gso_buffers);
}

static PyObject *Sender_get_errors(Sender *s, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(s->counts.errors);
}

static PyObject *Sender_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"gso", NULL};
    int gso = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p:Sender", kwlist, &gso))
        return NULL;
    Sender *s = (Sender *)type->tp_alloc(type, 0);
    if (s == NULL)
        return NULL;
    s->gso = gso;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->wake, NULL);
    pthread_cond_init(&s->idle, NULL);
    return (PyObject *)s;
}

static void Sender_dealloc(Sender *s) {
    Py_BEGIN_ALLOW_THREADS
    sender_stop(s);
    Py_END_ALLOW_THREADS
    queue_clear(&s->pending);
    queue_clear(&s->sending);
    free(s->pending.items);
    free(s->sending.items);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->wake);
    pthread_cond_destroy(&s->idle);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMethodDef Sender_methods[] = {
    {"send", (PyCFunction)(void (*)(void))Sender_send, METH_FASTCALL,
     "send(fd, data, (host, port)): queue one datagram (copied)."},
    {"send_many", (PyCFunction)(void (*)(void))Sender_send_many, METH_FASTCALL,
     "send_many(fd, packets, (host, port)): queue several datagrams to one address."},
    {"flush", (PyCFunction)Sender_flush, METH_NOARGS, "Wake the sending thread."},
    {"forget", (PyCFunction)Sender_forget, METH_O,
     "forget(fd): drop fd's queued datagrams and wait until no send uses it."},
    {"close", (PyCFunction)Sender_close, METH_NOARGS, "Send what is queued, stop the thread."},
    {"stats", (PyCFunction)Sender_stats, METH_NOARGS, "Counters as a dict."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Sender_getset[] = {
    {"errors", (getter)Sender_get_errors, NULL, "datagrams that could not be sent", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bootherd._udpsend.Sender",
    .tp_basicsize = sizeof(Sender),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Sends UDP datagrams from a native thread, in order, with sendmmsg().",
    .tp_new = Sender_new,
    .tp_dealloc = (destructor)Sender_dealloc,
    .tp_methods = Sender_methods,
    .tp_getset = Sender_getset,
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "bootherd._udpsend",
    "UDP datagrams sent from a native thread (see bootherd.udpsend).", -1, NULL,
};

PyMODINIT_FUNC PyInit__udpsend(void) {
    if (PyType_Ready(&SenderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SenderType);
    if (PyModule_AddObject(m, "Sender", (PyObject *)&SenderType) < 0) {
        Py_DECREF(&SenderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
