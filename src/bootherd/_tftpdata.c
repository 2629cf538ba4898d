/*
 * bootherd._tftpdata: the established part of TFTP read transfers, on a native thread.
 *
 * Once a read transfer has sent its first DATA window (options, OACK and its ACK, the size
 * probe that ends there: all of that stays in Python), the server hands the transfer's
 * socket and the file's bytes to a Pump.  One thread, which never takes the GIL, then
 * receives the ACKs of every handed-over transfer through one epoll set and answers each
 * with the next window, exactly as bootherd.tftp.core.ReadTransfer would: duplicate ACKs
 * ignored, block numbers rolling over past 65,535, retransmission with backoff, ERROR 5 to
 * strangers, ERROR 4 for other packets, malformed datagrams counted and dropped.  A window
 * of several blocks leaves as one UDP GSO buffer (the kernel walks its stack once).
 *
 * When a transfer ends, the thread moves it to a finished list and signals an eventfd that
 * the event loop watches; collect() hands back each outcome, and only then does Python
 * close the socket and release the bytes.  cancel() takes a transfer back at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_netaddr.h"

#define OP_RRQ 1
#define OP_WRQ 2
#define OP_DATA 3
#define OP_ACK 4
#define OP_ERROR 5
#define OP_OACK 6
#define MAX_BACKOFF_SHIFT 3      /* as core.MAX_BACKOFF_SHIFT */
#define EVENTS 256
#define TICK_MS 20               /* longest sleep: timers fire at most this late */
#define PEER_MSG_MAX 128
#define MAX_WINDOW 64            /* blocks per window (the server caps windowsize lower) */

/* Outcomes, as bootherd.tftp.native names them. */
enum { OUT_OK, OUT_PEER_ERROR, OUT_TIMEOUT, OUT_UNEXPECTED, OUT_FILE_CHANGED, OUT_CANCELLED };
enum { FREE, ACTIVE, FINISHED };

typedef struct {
    int state;
    uint32_t gen;
    int fd, file_fd;
    struct sockaddr_storage peer;
    socklen_t peerlen;
    Py_buffer buf;          /* the bytes, or buf.obj == NULL to pread file_fd */
    long long size, nblocks, acked, sent;
    int blksize, windowsize, attempt, max_retries;
    double timeout, deadline, finished;
    long long blocks_sent, bytes_sent, retransmissions;
    int outcome, peer_code;  /* peer_code: the peer's ERROR code, or the unexpected opcode */
    char peer_msg[PEER_MSG_MAX];
    int peer_msg_len;
    int next_done;          /* finished list, by slot index; -1 ends it */
} Transfer;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_t thread;
    int started, stop, closed;
    int epfd, evfd;
    int gso;
    Transfer *slots;
    int capacity, active;
    int free_head;          /* free list threaded through next_done */
    int done_head, done_tail;
    double next_timer;
    unsigned char *scratch; /* pread target for transfers served from a file descriptor */
    size_t scratch_len;
    unsigned long long windows, gso_buffers, send_errors, handed, malformed, unknown_tid;
} Pump;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double interval(const Transfer *t) {
    int shift = t->attempt < MAX_BACKOFF_SHIFT ? t->attempt : MAX_BACKOFF_SHIFT;
    return t->timeout * (double)(1 << shift);
}

/* The next retransmission; it can come sooner than the one it replaces (an ACK resets
 * the backoff), so the thread's next timer scan may have to move up. */
static void set_deadline(Pump *p, Transfer *t, double now) {
    t->deadline = now + interval(t);
    if (t->deadline < p->next_timer)
        p->next_timer = t->deadline;
}

/* ------------------------------------------------------------------ packet classes */

/* What bootherd.tftp.core.parse_packet makes of a datagram that is not taken as an ACK:
 * its opcode, or -1 where the parser raises MalformedPacket. */
static int classify(const unsigned char *p, size_t n) {
    if (n < 4)
        return -1;
    int op = (p[0] << 8) | p[1];
    if (op == OP_DATA || op == OP_ERROR)
        return op;
    if (op == OP_ACK) {
        for (size_t i = 4; i < n; i++)
            if (p[i])
                return -1;
        return op;
    }
    if (op != OP_RRQ && op != OP_WRQ && op != OP_OACK)
        return -1;
    const unsigned char *body = p + 2;
    size_t blen = n - 2;
    if (blen == 0 || body[blen - 1] != 0)
        return -1;
    /* The NUL-separated strings of body[:-1]: their count and which are empty. */
    size_t count = 0, start = 0;
    int bad = 0, mode_ascii = 1, odd_tail_empty = 0;
    size_t len0 = 0, len1 = 0;
    int prev_name_empty = 0;
    for (size_t i = 0; i <= blen - 1; i++) {
        if (i < blen - 1 && body[i] != 0) {
            if (count == 1 && body[i] >= 0x80)
                mode_ascii = 0;
            continue;
        }
        size_t len = i - start;
        if (count == 0)
            len0 = len;
        else if (count == 1)
            len1 = len;
        else if (op != OP_OACK) {
            /* options: names at even positions from 2, values after them */
            if ((count - 2) % 2 == 0)
                prev_name_empty = len == 0;
            else if (prev_name_empty && len > 0)
                bad = 1;  /* "empty option name" */
        }
        odd_tail_empty = len == 0;
        count++;
        start = i + 1;
    }
    if (op == OP_OACK)
        return count % 2 ? -1 : op;
    if (count < 2 || len0 == 0 || len1 == 0)
        return -1;
    if ((count - 2) % 2 && !odd_tail_empty)
        return -1;  /* option without value */
    if (bad || !mode_ascii)
        return -1;
    return op;
}

static const char *op_name(int op) {
    switch (op) {
    case OP_RRQ:
    case OP_WRQ:
        return "Request";
    case OP_DATA:
        return "Data";
    case OP_OACK:
        return "OAck";
    default:
        return "Ack";
    }
}

/* ------------------------------------------------------------------ sending */

static void send_error(int fd, const struct sockaddr_storage *to, socklen_t tolen, int code,
                       const char *msg) {
    unsigned char pkt[160];
    size_t m = strlen(msg);
    if (m > sizeof pkt - 5)
        m = sizeof pkt - 5;
    pkt[0] = 0;
    pkt[1] = OP_ERROR;
    pkt[2] = (unsigned char)(code >> 8);
    pkt[3] = (unsigned char)code;
    memcpy(pkt + 4, msg, m);
    pkt[4 + m] = 0;
    (void)sendto(fd, pkt, 5 + m, MSG_DONTWAIT, (const struct sockaddr *)to, tolen);
}

/* One sendmsg, retried briefly while the send buffer is full. */
static ssize_t send_one(int fd, struct msghdr *mh) {
    for (int again = 0;;) {
        ssize_t r = sendmsg(fd, mh, MSG_DONTWAIT);
        if (r >= 0)
            return r;
        if (errno == EINTR)
            continue;
        if ((errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) && again++ < 3) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            poll(&p, 1, 5);
            continue;
        }
        return -1;
    }
}

/* Blocks of t described by iov (a header and a payload each), count of them. */
static void send_blocks(Pump *p, Transfer *t, struct iovec *iov, int count) {
    struct msghdr mh = {0};
    mh.msg_name = &t->peer;
    mh.msg_namelen = t->peerlen;
    int seg = t->blksize + 4;
    int per = GSO_MAX_BYTES / seg;
    if (per > GSO_MAX_SEGS)
        per = GSO_MAX_SEGS;
    int i = 0;
    while (i < count) {
        int n = count - i;
        if (p->gso && n > 1 && per > 1) {
            if (n > per)
                n = per;
            union {
                char buf[CMSG_SPACE(sizeof(uint16_t))];
                struct cmsghdr align;
            } ctl;
            memset(&ctl, 0, sizeof ctl);
            mh.msg_iov = &iov[2 * i];
            mh.msg_iovlen = (size_t)(2 * n);
            mh.msg_control = ctl.buf;
            mh.msg_controllen = sizeof ctl.buf;
            struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t size = (uint16_t)seg;
            memcpy(CMSG_DATA(cm), &size, sizeof size);
            if (send_one(t->fd, &mh) >= 0) {
                p->gso_buffers++;
                i += n;
                continue;
            }
            if (!gso_refused(errno)) {
                p->send_errors += (unsigned long long)n;  /* lost: the timer resends */
                i += n;
                continue;
            }
            p->gso = 0;  /* this kernel or path cannot segment: one by one from now on */
        }
        mh.msg_control = NULL;
        mh.msg_controllen = 0;
        mh.msg_iov = &iov[2 * i];
        mh.msg_iovlen = 2;
        if (send_one(t->fd, &mh) < 0)
            p->send_errors++;
        i++;
    }
}

/* DATA first .. first+windowsize-1 (bounded by the last block), as ReadTransfer._window.
 * Returns 0, or -1 when the file changed under a file-descriptor transfer. */
static int send_window(Pump *p, Transfer *t, long long first) {
    long long last = first + t->windowsize - 1;
    if (last > t->nblocks)
        last = t->nblocks;
    int count = (int)(last - first + 1);
    if (count <= 0)
        return 0;
    unsigned char hdr[MAX_WINDOW][4];
    struct iovec iov[2 * MAX_WINDOW];
    /* payload of the byte at file offset o: data + (o - data_off) */
    const unsigned char *data = t->buf.obj ? (const unsigned char *)t->buf.buf : NULL;
    long long bs = t->blksize, off0 = (first - 1) * bs, data_off = 0;
    long long end = off0 + (long long)count * bs;
    if (end > t->size)
        end = t->size;
    if (data == NULL) {
        size_t want = (size_t)(end > off0 ? end - off0 : 0);
        if (want > p->scratch_len) {
            unsigned char *s = realloc(p->scratch, want);
            if (s == NULL)
                return -1;
            p->scratch = s;
            p->scratch_len = want;
        }
        size_t got = 0;
        while (got < want) {
            ssize_t r = pread(t->file_fd, p->scratch + got, want - got, (off_t)(off0 + got));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                return -1;
            got += (size_t)r;
        }
        data = p->scratch;
        data_off = off0;
    }
    long long nbytes = 0;
    for (int k = 0; k < count; k++) {
        long long blk = first + k, off = (blk - 1) * bs;
        long long len = t->size - off;
        if (len > bs)
            len = bs;
        if (len < 0)
            len = 0;
        hdr[k][0] = 0;
        hdr[k][1] = OP_DATA;
        hdr[k][2] = (unsigned char)((blk >> 8) & 0xff);
        hdr[k][3] = (unsigned char)(blk & 0xff);
        iov[2 * k].iov_base = hdr[k];
        iov[2 * k].iov_len = 4;
        iov[2 * k + 1].iov_base = (void *)(data + (off - data_off));
        iov[2 * k + 1].iov_len = (size_t)len;
        nbytes += len;
    }
    send_blocks(p, t, iov, count);
    if (first <= t->sent)
        t->retransmissions += (last < t->sent ? last : t->sent) - first + 1;
    t->blocks_sent += count;
    t->bytes_sent += nbytes;
    if (last > t->sent)
        t->sent = last;
    p->windows++;
    return 0;
}

/* ------------------------------------------------------------------ transfer events */

static void finish(Pump *p, int idx, int outcome, double now) {
    Transfer *t = &p->slots[idx];
    t->state = FINISHED;
    t->outcome = outcome;
    t->finished = now;
    epoll_ctl(p->epfd, EPOLL_CTL_DEL, t->fd, NULL);
    p->active--;
    t->next_done = -1;
    if (p->done_tail >= 0)
        p->slots[p->done_tail].next_done = idx;
    else
        p->done_head = idx;
    p->done_tail = idx;
}

static void fail(Pump *p, int idx, int outcome, double now, int code, const char *msg) {
    Transfer *t = &p->slots[idx];
    send_error(t->fd, &t->peer, t->peerlen, code, msg);
    finish(p, idx, outcome, now);
}

static int same_peer(const Transfer *t, const struct sockaddr_storage *a, socklen_t alen) {
    if (a->ss_family != t->peer.ss_family)
        return 0;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)&t->peer;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)&t->peer;
        return x->sin6_port == y->sin6_port &&
               memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
    }
    return alen == t->peerlen && memcmp(a, &t->peer, alen) == 0;
}

/* One datagram from the transfer's socket; ReadTransfer.on_packet past the first window. */
static void on_datagram(Pump *p, int idx, const unsigned char *d, size_t n,
                        const struct sockaddr_storage *from, socklen_t fromlen, double now) {
    Transfer *t = &p->slots[idx];
    if (!same_peer(t, from, fromlen)) {
        p->unknown_tid++;
        if (!(n >= 2 && d[0] == 0 && d[1] == OP_ERROR))
            send_error(t->fd, from, fromlen, 5, "unknown transfer ID");
        return;
    }
    if (n >= 4 && d[0] == 0 && d[1] == OP_ACK) {
        unsigned wire = ((unsigned)d[2] << 8) | d[3];
        long long blk = t->acked + (long long)((wire - (unsigned)(t->acked & 0xFFFF)) & 0xFFFF);
        if (blk == t->acked || blk > t->sent)
            return;  /* duplicate or stale: never answered (Sorcerer's Apprentice) */
        if (blk == t->nblocks) {
            t->acked = blk;
            finish(p, idx, OUT_OK, now);
            return;
        }
        t->acked = blk;
        t->attempt = 0;
        if (send_window(p, t, blk + 1) < 0) {
            fail(p, idx, OUT_FILE_CHANGED, now, 0, "file changed during transfer");
            return;
        }
        set_deadline(p, t, now);
        return;
    }
    int op = classify(d, n);
    if (op < 0) {
        p->malformed++;
        return;
    }
    if (op == OP_ERROR) {
        t->peer_code = (d[2] << 8) | d[3];
        size_t m = 0;
        while (4 + m < n && d[4 + m] != 0 && m < PEER_MSG_MAX)
            m++;
        memcpy(t->peer_msg, d + 4, m);
        t->peer_msg_len = (int)m;
        finish(p, idx, OUT_PEER_ERROR, now);
        return;
    }
    char msg[64];
    snprintf(msg, sizeof msg, "unexpected opcode %s", op_name(op));
    t->peer_code = op;
    fail(p, idx, OUT_UNEXPECTED, now, 4, msg);
}

/* ReadTransfer.on_timer for a transfer whose deadline has passed. */
static void on_timer(Pump *p, int idx, double now) {
    Transfer *t = &p->slots[idx];
    if (t->attempt >= t->max_retries) {
        fail(p, idx, OUT_TIMEOUT, now, 0, "timeout");
        return;
    }
    t->attempt++;
    if (send_window(p, t, t->acked + 1) < 0) {
        fail(p, idx, OUT_FILE_CHANGED, now, 0, "file changed during transfer");
        return;
    }
    set_deadline(p, t, now);
}

static void run_timers(Pump *p, double now) {
    double next = now + 3600.0;
    for (int i = 0; i < p->capacity; i++) {
        Transfer *t = &p->slots[i];
        if (t->state != ACTIVE)
            continue;
        if (t->deadline <= now)
            on_timer(p, i, now);
        if (t->state == ACTIVE && t->deadline < next)
            next = t->deadline;
    }
    p->next_timer = next;
}

/* One datagram per readiness event: a transfer socket rarely holds more than one (an ACK
 * per window), so a second recvfrom would mostly just say EAGAIN; epoll is level-triggered
 * and reports the socket again if more is queued. */
static void on_readable(Pump *p, int idx, uint32_t gen, unsigned char *buf, size_t cap,
                        double now) {
    Transfer *t = &p->slots[idx];
    if (t->state != ACTIVE || t->gen != gen)
        return;
    struct sockaddr_storage from;
    socklen_t fromlen = sizeof from;
    ssize_t n;
    do
        n = recvfrom(t->fd, buf, cap, MSG_DONTWAIT, (struct sockaddr *)&from, &fromlen);
    while (n < 0 && errno == EINTR);
    if (n >= 0)  /* else EAGAIN, or an ICMP error reported on the socket: the timer copes */
        on_datagram(p, idx, buf, (size_t)n, &from, fromlen, now);
}

static void *pump_main(void *arg) {
    Pump *p = arg;
    struct epoll_event ev[EVENTS];
    size_t cap = 65536 + 16;
    unsigned char *buf = malloc(cap);
    if (buf == NULL)
        return NULL;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        int stop = p->stop;
        double wait = p->next_timer - now_s();
        pthread_mutex_unlock(&p->mu);
        if (stop)
            break;
        int ms = wait <= 0 ? 0 : (int)(wait * 1000) + 1;
        if (ms > TICK_MS)
            ms = TICK_MS;
        int n = epoll_wait(p->epfd, ev, EVENTS, ms);
        if (n < 0 && errno != EINTR)
            break;
        /* One clock reading per batch: a batch takes microseconds, timers are in seconds. */
        double now = now_s();
        pthread_mutex_lock(&p->mu);
        int had_done = p->done_head >= 0;
        for (int i = 0; i < n; i++) {
            uint64_t tag = ev[i].data.u64;
            on_readable(p, (int)(tag & 0xffffffffu), (uint32_t)(tag >> 32), buf, cap, now);
        }
        if (now >= p->next_timer)
            run_timers(p, now);
        int signal = !had_done && p->done_head >= 0;
        pthread_mutex_unlock(&p->mu);
        if (signal) {
            uint64_t one = 1;
            ssize_t w = write(p->evfd, &one, sizeof one);
            (void)w;
        }
    }
    free(buf);
    return NULL;
}

/* ------------------------------------------------------------------ Python methods */

static int ensure_started(Pump *p) {
    if (p->closed) {
        PyErr_SetString(PyExc_RuntimeError, "pump is closed");
        return -1;
    }
    if (p->started)
        return 0;
    int rc = pthread_create(&p->thread, NULL, pump_main, p);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    p->started = 1;
    return 0;
}

static void lock(Pump *p) {
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&p->mu);
    Py_END_ALLOW_THREADS
}

static PyObject *Pump_add(Pump *p, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "peer", "source", "file_fd", "size", "blksize",
                             "windowsize", "timeout", "retries", "acked", "sent", "attempt",
                             "remaining", NULL};
    int fd, file_fd, blksize, windowsize, retries, attempt;
    long long size, acked, sent;
    double timeout, remaining;
    PyObject *peer, *source;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iOOiLiidiLLid:add", kwlist, &fd, &peer,
                                     &source, &file_fd, &size, &blksize, &windowsize, &timeout,
                                     &retries, &acked, &sent, &attempt, &remaining))
        return NULL;
    if (blksize < 8 || blksize > 65464 || windowsize < 1 || windowsize > MAX_WINDOW ||
        size < 0 || sent < 1 || acked < 0 || acked > sent || timeout <= 0) {
        PyErr_SetString(PyExc_ValueError, "transfer parameters out of range");
        return NULL;
    }
    struct sockaddr_storage sa;
    socklen_t salen;
    if (parse_addr(peer, &sa, &salen) < 0)
        return NULL;
    Py_buffer view = {0};
    if (source != Py_None) {
        if (PyObject_GetBuffer(source, &view, PyBUF_SIMPLE) < 0)
            return NULL;
        if (view.len < size) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_ValueError, "source is shorter than size");
            return NULL;
        }
    } else if (file_fd < 0) {
        PyErr_SetString(PyExc_ValueError, "need a source buffer or a file descriptor");
        return NULL;
    }
    if (ensure_started(p) < 0) {
        if (view.obj)
            PyBuffer_Release(&view);
        return NULL;
    }
    lock(p);
    int idx = p->free_head;
    if (idx < 0) {
        pthread_mutex_unlock(&p->mu);
        if (view.obj)
            PyBuffer_Release(&view);
        PyErr_SetString(PyExc_OverflowError, "pump is full");
        return NULL;
    }
    Transfer *t = &p->slots[idx];
    p->free_head = t->next_done;
    uint32_t gen = (t->gen + 1) & 0x7fffffffu;  /* handles stay positive */
    memset(t, 0, sizeof *t);
    t->gen = gen;
    t->fd = fd;
    t->file_fd = source == Py_None ? file_fd : -1;
    t->peer = sa;
    t->peerlen = salen;
    t->buf = view;
    t->size = size;
    t->nblocks = size / blksize + 1;
    t->acked = acked;
    t->sent = sent;
    t->blksize = blksize;
    t->windowsize = windowsize;
    t->attempt = attempt;
    t->max_retries = retries;
    t->timeout = timeout;
    t->deadline = now_s() + remaining;
    t->next_done = -1;
    t->state = ACTIVE;
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = ((uint64_t)gen << 32) | (uint32_t)idx;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int err = errno;
        t->state = FREE;
        t->buf.obj = NULL;
        t->next_done = p->free_head;
        p->free_head = idx;
        pthread_mutex_unlock(&p->mu);
        if (view.obj)
            PyBuffer_Release(&view);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    p->active++;
    p->handed++;
    if (t->deadline < p->next_timer)
        p->next_timer = t->deadline;
    pthread_mutex_unlock(&p->mu);
    return PyLong_FromLongLong(((long long)gen << 32) | idx);
}

/* (outcome, peer_code or unexpected opcode, peer_message, acked, sent, blocks_sent, bytes_sent,
 *  retransmissions, seconds_since_finished) */
static PyObject *outcome_tuple(const Transfer *t, double now) {
    return Py_BuildValue("(iiy#LLLLLd)", t->outcome, t->peer_code, t->peer_msg,
                         (Py_ssize_t)t->peer_msg_len, t->acked, t->sent, t->blocks_sent,
                         t->bytes_sent, t->retransmissions, now - t->finished);
}

/* Slot back to the free list; the caller holds the lock and releases *view after it. */
static void release_slot(Pump *p, int idx, Py_buffer *view) {
    Transfer *t = &p->slots[idx];
    *view = t->buf;
    t->buf.obj = NULL;
    t->state = FREE;
    t->next_done = p->free_head;
    p->free_head = idx;
}

static int handle_slot(Pump *p, PyObject *arg, uint32_t *gen) {
    long long h = PyLong_AsLongLong(arg);
    if (h == -1 && PyErr_Occurred())
        return -1;
    int idx = (int)(h & 0xffffffff);
    *gen = (uint32_t)(h >> 32);
    if (idx < 0 || idx >= p->capacity) {
        PyErr_SetString(PyExc_ValueError, "not a transfer handle");
        return -1;
    }
    return idx;
}

static PyObject *Pump_collect(Pump *p, PyObject *Py_UNUSED(ignored)) {
    uint64_t v;
    ssize_t r = read(p->evfd, &v, sizeof v);  /* non-blocking: clears the signal */
    (void)r;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (;;) {
        lock(p);
        int idx = p->done_head;
        if (idx < 0) {
            pthread_mutex_unlock(&p->mu);
            break;
        }
        Transfer *t = &p->slots[idx];
        p->done_head = t->next_done;
        if (p->done_head < 0)
            p->done_tail = -1;
        PyObject *res = outcome_tuple(t, now_s());
        long long h = ((long long)t->gen << 32) | idx;
        Py_buffer view;
        release_slot(p, idx, &view);
        pthread_mutex_unlock(&p->mu);
        if (view.obj)
            PyBuffer_Release(&view);
        PyObject *item = res ? Py_BuildValue("(LN)", h, res) : NULL;
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyObject *Pump_cancel(Pump *p, PyObject *arg) {
    uint32_t gen;
    int idx = handle_slot(p, arg, &gen);
    if (idx < 0)
        return NULL;
    lock(p);
    Transfer *t = &p->slots[idx];
    if (t->gen != gen || t->state == FREE) {
        pthread_mutex_unlock(&p->mu);
        Py_RETURN_NONE;
    }
    double now = now_s();
    if (t->state == ACTIVE) {
        finish(p, idx, OUT_CANCELLED, now);
    }
    /* unlink from the finished list */
    int prev = -1;
    for (int i = p->done_head; i >= 0; prev = i, i = p->slots[i].next_done) {
        if (i != idx)
            continue;
        if (prev < 0)
            p->done_head = t->next_done;
        else
            p->slots[prev].next_done = t->next_done;
        if (p->done_tail == idx)
            p->done_tail = prev;
        break;
    }
    PyObject *res = outcome_tuple(t, now);
    Py_buffer view;
    release_slot(p, idx, &view);
    pthread_mutex_unlock(&p->mu);
    if (view.obj)
        PyBuffer_Release(&view);
    return res;
}

static PyObject *Pump_fileno(Pump *p, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(p->evfd);
}

static void pump_stop(Pump *p) {
    if (p->closed)
        return;
    p->closed = 1;
    if (!p->started)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->thread, NULL);
}

static PyObject *Pump_close(Pump *p, PyObject *Py_UNUSED(ignored)) {
    /* Ends the thread; transfers still held are reported by cancel() or collect(). */
    Py_BEGIN_ALLOW_THREADS
    pump_stop(p);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Pump_stats(Pump *p, PyObject *Py_UNUSED(ignored)) {
    lock(p);
    PyObject *d = Py_BuildValue("{sisKsKsKsKsKsKsi}", "active", p->active, "handed",
                                p->handed, "windows", p->windows, "gso_buffers",
                                p->gso_buffers, "send_errors", p->send_errors, "malformed",
                                p->malformed, "unknown_tid", p->unknown_tid, "gso", p->gso);
    pthread_mutex_unlock(&p->mu);
    return d;
}

static PyObject *Pump_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"capacity", "gso", NULL};
    int capacity = 4096, gso = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|ip:Pump", kwlist, &capacity, &gso))
        return NULL;
    if (capacity < 1 || capacity > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "capacity out of range");
        return NULL;
    }
    Pump *p = (Pump *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    p->epfd = p->evfd = -1;
    p->slots = calloc((size_t)capacity, sizeof(Transfer));
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->slots == NULL || p->epfd < 0 || p->evfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(p);
        return NULL;
    }
    p->capacity = capacity;
    for (int i = 0; i < capacity; i++)
        p->slots[i].next_done = i + 1 < capacity ? i + 1 : -1;
    p->free_head = 0;
    p->done_head = p->done_tail = -1;
    p->gso = gso;
    p->next_timer = now_s() + 3600.0;
    pthread_mutex_init(&p->mu, NULL);
    return (PyObject *)p;
}

static void Pump_dealloc(Pump *p) {
    Py_BEGIN_ALLOW_THREADS
    pump_stop(p);
    Py_END_ALLOW_THREADS
    if (p->slots) {
        for (int i = 0; i < p->capacity; i++)
            if (p->slots[i].state != FREE && p->slots[i].buf.obj)
                PyBuffer_Release(&p->slots[i].buf);
        free(p->slots);
    }
    free(p->scratch);
    if (p->epfd >= 0)
        close(p->epfd);
    if (p->evfd >= 0)
        close(p->evfd);
    pthread_mutex_destroy(&p->mu);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *mod_classify(PyObject *Py_UNUSED(m), PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    int op = classify(b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyLong_FromLong(op);
}

static PyMethodDef Pump_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Pump_add, METH_VARARGS | METH_KEYWORDS,
     "add(fd, peer, source, file_fd, size, blksize, windowsize, timeout, retries, acked, "
     "sent, attempt, remaining) -> handle: take over an established read transfer."},
    {"collect", (PyCFunction)Pump_collect, METH_NOARGS,
     "[(handle, outcome), ...] of the transfers that ended since the last call."},
    {"cancel", (PyCFunction)Pump_cancel, METH_O,
     "cancel(handle) -> outcome, or None if already collected: give a transfer back now."},
    {"fileno", (PyCFunction)Pump_fileno, METH_NOARGS,
     "The eventfd that is readable while ended transfers wait for collect()."},
    {"close", (PyCFunction)Pump_close, METH_NOARGS, "Stop the thread."},
    {"stats", (PyCFunction)Pump_stats, METH_NOARGS, "Counters as a dict."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bootherd._tftpdata.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Established TFTP read transfers served from a native thread.",
    .tp_new = Pump_new,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
};

static PyMethodDef module_methods[] = {
    {"classify", (PyCFunction)mod_classify, METH_O,
     "classify(datagram) -> opcode, or -1 where core.parse_packet finds it malformed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "bootherd._tftpdata",
    "Established TFTP read transfers on a native thread (see bootherd.tftp.native).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__tftpdata(void) {
    if (PyType_Ready(&PumpType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PumpType);
    if (PyModule_AddObject(m, "Pump", (PyObject *)&PumpType) < 0) {
        Py_DECREF(&PumpType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
