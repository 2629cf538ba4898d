/*
 * bootherd._tftpdata: the established part of TFTP read transfers, on a native thread.
 *
 * Once a read transfer has sent its OACK (or, without options, its first DATA window), the
 * server hands the transfer's socket and the file's bytes to a Pump.  Which file, under
 * which root, for which client and with which options is all decided in Python before
 * that: the request, its options and the OACK's bytes are the core's.  One thread, which
 * never takes the GIL, then receives the ACKs of every handed-over transfer through one
 * epoll set and answers each with the next window (ACK 0 of the OACK with the first).
 *
 * What a transfer does with each datagram and each timer is the Machine below, the rules
 * of bootherd.tftp.core.ReadTransfer from its OACK on: the OACK resent until ACK 0, a
 * client's ERROR after it (the size probe) ending it, duplicate ACKs ignored, block
 * numbers rolling over past 65,535, retransmission with backoff, ERROR 4 for other
 * packets, malformed datagrams reported.  It never touches a socket or a clock: it is
 * given `now` and an Out to put its packets in.  The Pump's Out sends them (a window of
 * several blocks as one UDP GSO buffer, through send_segments in _udpshared.h); the
 * ReadMachine type's Out collects them as bytes, so the event vectors of ReadTransfer's
 * tests run against this code as well (tests/tftp/test_core.py).
 *
 * When a transfer ends, the thread moves it to a finished list and signals an eventfd that
 * the event loop watches; collect() hands back each Outcome, and only then does Python
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

#include "_udpshared.h"

/* Exported as module constants and checked against bootherd.tftp.core by a test. */
#define OP_RRQ 1
#define OP_WRQ 2
#define OP_DATA 3
#define OP_ACK 4
#define OP_ERROR 5
#define OP_OACK 6
#define ERR_UNDEFINED 0
#define ERR_ILLEGAL_OP 4
#define ERR_UNKNOWN_TID 5
#define MIN_BLKSIZE 8
#define MAX_BLKSIZE 65464
#define MAX_BACKOFF_SHIFT 3
#define MAX_WINDOW 64            /* blocks per window (the server caps windowsize lower) */

#define EVENTS 256
#define TICK_MS 20               /* longest sleep: timers fire at most this late */
#define MSG_MAX 128
#define OACK_MAX 512             /* an OACK of every option we answer is < 100 bytes */

/* How a transfer ended; END_NAMES are the values of bootherd.tftp.core.End (OUTCOMES). */
enum { RUNNING = -1, END_COMPLETED, END_PEER_ERROR, END_TIMEOUT, END_UNEXPECTED,
       END_FILE_CHANGED, N_ENDS };
static const char *const END_NAMES[N_ENDS] = {"completed", "peer_error", "timeout",
                                              "unexpected", "file_changed"};

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
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

/* ------------------------------------------------------------------ the machine */

/* One read transfer from its OACK or first window (ReadTransfer's fields of the same
 * names); sent == 0 while the OACK waits for ACK 0. */
typedef struct {
    Py_buffer buf;          /* the bytes, or buf.obj == NULL to pread file_fd */
    int file_fd;
    long long size, nblocks, acked, sent;
    int blksize, windowsize, attempt, max_retries;
    double timeout, deadline, finished;
    long long blocks_sent, bytes_sent, retransmissions;
    int end;                /* RUNNING, or how it ended */
    int peer_code;          /* the peer's ERROR code (END_PEER_ERROR) */
    char msg[MSG_MAX];      /* the peer's ERROR text, or the one we sent */
    int msg_len;
    unsigned char oack[OACK_MAX];  /* the OACK's bytes (oack_len 0: none) */
    int oack_len;
} Machine;

/* Where a machine's packets go: a socket (the Pump) or a list of bytes (ReadMachine). */
typedef struct Out Out;
struct Out {
    /* One window of `count` DATA packets: iov[2k] the header, iov[2k+1] the payload of the
     * k-th; all are `seg` bytes but the last. */
    void (*window)(Out *o, struct iovec *iov, int count, size_t seg);
    /* One packet on its own: an ERROR, or the OACK resent. */
    void (*packet)(Out *o, const unsigned char *pkt, size_t len);
    unsigned char *scratch;  /* pread target for transfers served from a file descriptor */
    size_t scratch_len;
};

/* What a datagram or a timer did to a machine. */
enum { STEP_GOING, STEP_MALFORMED, STEP_ENDED };

static double interval(const Machine *m) {
    int shift = m->attempt < MAX_BACKOFF_SHIFT ? m->attempt : MAX_BACKOFF_SHIFT;
    return m->timeout * (double)(1 << shift);
}

static int machine_end(Machine *m, int end, double now) {
    m->end = end;
    m->finished = now;
    return STEP_ENDED;
}

/* ERROR `code` with msg (cut at MSG_MAX bytes) into pkt[5 + MSG_MAX]; returns its length. */
static size_t error_packet(unsigned char *pkt, int code, const char *msg) {
    size_t n = strlen(msg);
    if (n > MSG_MAX)
        n = MSG_MAX;
    pkt[0] = 0;
    pkt[1] = OP_ERROR;
    pkt[2] = (unsigned char)(code >> 8);
    pkt[3] = (unsigned char)code;
    memcpy(pkt + 4, msg, n);
    pkt[4 + n] = 0;
    return 5 + n;
}

/* Ends with an ERROR to the peer (ReadTransfer._fail). */
static int machine_fail(Machine *m, Out *o, int end, int code, const char *msg, double now) {
    unsigned char pkt[5 + MSG_MAX];
    size_t len = error_packet(pkt, code, msg);
    memcpy(m->msg, msg, len - 5);
    m->msg_len = (int)(len - 5);
    o->packet(o, pkt, len);
    return machine_end(m, end, now);
}

/* DATA first .. first+windowsize-1 (bounded by the last block), as ReadTransfer._window.
 * Returns 0, or -1 when the file changed under a file-descriptor transfer (nothing sent). */
static int machine_window(Machine *m, Out *o, long long first) {
    long long last = first + m->windowsize - 1;
    if (last > m->nblocks)
        last = m->nblocks;
    int count = (int)(last - first + 1);
    if (count <= 0)
        return 0;
    unsigned char hdr[MAX_WINDOW][4];
    struct iovec iov[2 * MAX_WINDOW];
    /* payload of the byte at file offset o: data + (o - data_off) */
    const unsigned char *data = m->buf.obj ? (const unsigned char *)m->buf.buf : NULL;
    long long bs = m->blksize, off0 = (first - 1) * bs, data_off = 0;
    long long end = off0 + (long long)count * bs;
    if (end > m->size)
        end = m->size;
    if (data == NULL) {
        size_t want = (size_t)(end > off0 ? end - off0 : 0);
        if (want > o->scratch_len) {
            unsigned char *s = realloc(o->scratch, want);
            if (s == NULL)
                return -1;
            o->scratch = s;
            o->scratch_len = want;
        }
        size_t got = 0;
        while (got < want) {
            ssize_t r = pread(m->file_fd, o->scratch + got, want - got, (off_t)(off0 + got));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                return -1;
            got += (size_t)r;
        }
        data = o->scratch;
        data_off = off0;
    }
    long long nbytes = 0;
    for (int k = 0; k < count; k++) {
        long long blk = first + k, off = (blk - 1) * bs;
        long long len = m->size - off;
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
    o->window(o, iov, count, (size_t)bs + 4);
    if (first <= m->sent)
        m->retransmissions += (last < m->sent ? last : m->sent) - first + 1;
    m->blocks_sent += count;
    m->bytes_sent += nbytes;
    if (last > m->sent)
        m->sent = last;
    return 0;
}

/* The window from `first`, and the timer after it (ReadTransfer._send_window). */
static int machine_send(Machine *m, Out *o, long long first, double now) {
    if (machine_window(m, o, first) < 0)
        return machine_fail(m, o, END_FILE_CHANGED, ERR_UNDEFINED,
                            "file changed during transfer", now);
    m->deadline = now + interval(m);
    return STEP_GOING;
}

/* ReadTransfer.on_packet: a datagram from the transfer's peer (its TID already checked). */
static int machine_packet(Machine *m, Out *o, const unsigned char *d, size_t n, double now) {
    if (m->end != RUNNING)
        return STEP_ENDED;
    if (n >= 4 && d[0] == 0 && d[1] == OP_ACK) {
        unsigned wire = ((unsigned)d[2] << 8) | d[3];
        long long blk = m->acked + (long long)((wire - (unsigned)(m->acked & 0xFFFF)) & 0xFFFF);
        /* Duplicate or stale: never answered (Sorcerer's Apprentice); but ACK 0 is the one
         * that acknowledges the OACK. */
        if ((blk == m->acked || blk > m->sent) && !(m->sent == 0 && wire == 0 && m->oack_len))
            return STEP_GOING;
        m->acked = blk;
        if (blk == m->nblocks)
            return machine_end(m, END_COMPLETED, now);
        m->attempt = 0;
        return machine_send(m, o, blk + 1, now);
    }
    int op = classify(d, n);
    if (op < 0)
        return STEP_MALFORMED;
    if (op == OP_ERROR) {
        m->peer_code = (d[2] << 8) | d[3];
        size_t k = 0;
        while (4 + k < n && d[4 + k] != 0 && k < MSG_MAX)
            k++;
        memcpy(m->msg, d + 4, k);
        m->msg_len = (int)k;
        return machine_end(m, END_PEER_ERROR, now);
    }
    char msg[64];
    snprintf(msg, sizeof msg, "unexpected opcode %s", op_name(op));
    return machine_fail(m, o, END_UNEXPECTED, ERR_ILLEGAL_OP, msg, now);
}

/* ReadTransfer.on_timer. */
static int machine_timer(Machine *m, Out *o, double now) {
    if (m->end != RUNNING)
        return STEP_ENDED;
    if (now < m->deadline)
        return STEP_GOING;
    if (m->attempt >= m->max_retries)
        return machine_fail(m, o, END_TIMEOUT, ERR_UNDEFINED, "timeout", now);
    m->attempt++;
    if (m->sent == 0) {  /* the OACK, not acknowledged yet */
        m->retransmissions++;
        o->packet(o, m->oack, (size_t)m->oack_len);
        m->deadline = now + interval(m);
        return STEP_GOING;
    }
    return machine_send(m, o, m->acked + 1, now);
}

/* The keywords of bootherd.tftp.core.Handover, plus the bytes: what a machine starts from
 * (all required but the OACK, which only a machine at its OACK needs). */
static char *MACHINE_KW[] = {"source", "file_fd", "size", "blksize", "windowsize",
                             "timeout", "retries", "acked", "sent", "attempt", "blocks_sent",
                             "bytes_sent", "retransmissions", "remaining", "oack", NULL};

/* Sets up m from those keywords (all required), on the caller's clock `now`; m holds the
 * source's buffer from then on.  0, or -1 with an exception set. */
static int machine_init(Machine *m, PyObject *kw, double now) {
    PyObject *source, *oack = Py_None, *noargs = PyTuple_New(0);
    int file_fd, blksize, windowsize, retries, attempt;
    long long size, acked, sent, blocks_sent, bytes_sent, retransmissions;
    double timeout, remaining;
    if (noargs == NULL)
        return -1;
    int ok = PyArg_ParseTupleAndKeywords(
        noargs, kw, "OiLiidiLLiLLLd|O", MACHINE_KW, &source, &file_fd, &size, &blksize,
        &windowsize, &timeout, &retries, &acked, &sent, &attempt, &blocks_sent, &bytes_sent,
        &retransmissions, &remaining, &oack);
    Py_DECREF(noargs);
    if (!ok)
        return -1;
    /* Past the first window, or at the OACK (sent 0), whose bytes are then given. */
    Py_ssize_t oack_len = 0;
    if (oack != Py_None) {
        if (!PyBytes_Check(oack)) {
            PyErr_SetString(PyExc_TypeError, "oack must be bytes or None");
            return -1;
        }
        oack_len = PyBytes_GET_SIZE(oack);
    }
    if (oack_len < 0 || oack_len > OACK_MAX || (sent == 0 && (oack_len < 4 || acked != 0))) {
        PyErr_SetString(PyExc_ValueError, "no OACK to start from, or one too long");
        return -1;
    }
    if (blksize < MIN_BLKSIZE || blksize > MAX_BLKSIZE || windowsize < 1 ||
        windowsize > MAX_WINDOW || size < 0 || sent < 0 || acked < 0 || acked > sent ||
        sent > size / blksize + 1 || timeout <= 0 || retries < 0 || attempt < 0 ||
        remaining < 0) {
        PyErr_SetString(PyExc_ValueError, "transfer parameters out of range");
        return -1;
    }
    Py_buffer view = {0};
    if (source != Py_None) {
        if (PyObject_GetBuffer(source, &view, PyBUF_SIMPLE) < 0)
            return -1;
        if (view.len < size) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_ValueError, "source is shorter than size");
            return -1;
        }
    } else if (file_fd < 0) {
        PyErr_SetString(PyExc_ValueError, "need a source buffer or a file descriptor");
        return -1;
    }
    memset(m, 0, sizeof *m);
    m->buf = view;
    m->file_fd = source == Py_None ? file_fd : -1;
    m->size = size;
    m->nblocks = size / blksize + 1;
    m->acked = acked;
    m->sent = sent;
    m->blksize = blksize;
    m->windowsize = windowsize;
    m->attempt = attempt;
    m->max_retries = retries;
    m->timeout = timeout;
    m->deadline = now + remaining;
    m->blocks_sent = blocks_sent;
    m->bytes_sent = bytes_sent;
    m->retransmissions = retransmissions;
    if (oack_len)
        memcpy(m->oack, PyBytes_AS_STRING(oack), (size_t)oack_len);
    m->oack_len = (int)oack_len;
    m->end = RUNNING;
    return 0;
}

/* ------------------------------------------------------------------ outcomes */

static PyStructSequence_Field outcome_fields[] = {
    {"end", "how it ended (a bootherd.tftp.core.End value), None while it runs"},
    {"message", "what went wrong, as ReadTransfer.error words it (None if nothing)"},
    {"peer_code", "the code of the peer's ERROR (end 'peer_error'), else None"},
    {"acked", "highest block acknowledged"},
    {"sent", "highest block sent"},
    {"attempt", "retransmissions of the current window so far"},
    {"blocks_sent", "DATA packets sent, retransmissions included"},
    {"bytes_sent", "payload bytes sent"},
    {"retransmissions", "DATA packets sent again"},
    {"ended_ago", "seconds since it ended (None while it runs)"},
    {"remaining", "seconds to its next retransmission (None once ended)"},
    {NULL, NULL},
};

static PyStructSequence_Desc outcome_desc = {
    "bootherd._tftpdata.Outcome",
    "Where a transfer the native data path ran has got to (see core.Progress).",
    outcome_fields, 11,
};

static PyTypeObject OutcomeType;

static PyObject *message_of(const Machine *m) {
    if (m->end == RUNNING || m->end == END_COMPLETED)
        Py_RETURN_NONE;
    PyObject *text = PyUnicode_DecodeUTF8(m->msg, m->msg_len, "replace");
    if (text == NULL || m->end != END_PEER_ERROR)
        return text;
    PyObject *full = PyUnicode_FromFormat("peer error %d: %U", m->peer_code, text);
    Py_DECREF(text);
    return full;
}

static PyObject *outcome_new(const Machine *m, double now) {
    PyObject *o = PyStructSequence_New(&OutcomeType);
    if (o == NULL)
        return NULL;
    int running = m->end == RUNNING;
    double left = m->deadline - now;
    PyObject *items[11] = {
        running ? Py_NewRef(Py_None) : PyUnicode_FromString(END_NAMES[m->end]),
        message_of(m),
        m->end == END_PEER_ERROR ? PyLong_FromLong(m->peer_code) : Py_NewRef(Py_None),
        PyLong_FromLongLong(m->acked),
        PyLong_FromLongLong(m->sent),
        PyLong_FromLong(m->attempt),
        PyLong_FromLongLong(m->blocks_sent),
        PyLong_FromLongLong(m->bytes_sent),
        PyLong_FromLongLong(m->retransmissions),
        running ? Py_NewRef(Py_None) : PyFloat_FromDouble(now - m->finished),
        running ? PyFloat_FromDouble(left > 0 ? left : 0.0) : Py_NewRef(Py_None),
    };
    int failed = 0;
    for (int i = 0; i < 11; i++) {
        if (items[i] == NULL)
            failed = 1;
        else
            PyStructSequence_SetItem(o, i, items[i]);  /* steals the reference */
    }
    if (failed) {
        Py_DECREF(o);
        return NULL;
    }
    return o;
}

/* ------------------------------------------------------------------ the pump */

enum { FREE, ACTIVE, FINISHED };

typedef struct {
    Machine m;
    int state;
    uint32_t gen;
    int fd;
    struct sockaddr_storage peer;
    socklen_t peerlen;
    int next_done;          /* finished list, by slot index; -1 ends it */
} Transfer;

struct Pump;

/* The pump's Out: a machine's packets to its transfer's peer, from its socket. */
typedef struct {
    Out out;
    struct Pump *p;
    Transfer *t;            /* the transfer being stepped */
} SocketOut;

typedef struct Pump {
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
    SocketOut out;
    SendCounts counts;
    unsigned long long windows, handed, malformed, unknown_tid;
} Pump;

/* One thread serves every transfer: it waits only briefly for one full send buffer. */
static const Patience PUMP_PATIENCE = {.waits = 3, .wait_ms = 5};

static void socket_window(Out *o, struct iovec *iov, int count, size_t seg) {
    SocketOut *so = (SocketOut *)o;
    Pump *p = so->p;
    Transfer *t = so->t;
    size_t per = GSO_MAX_BYTES / seg;
    if (per > GSO_MAX_SEGS)
        per = GSO_MAX_SEGS;
    if (per < 1)
        per = 1;
    for (int i = 0; i < count;) {
        int n = count - i < (int)per ? count - i : (int)per;
        send_segments(t->fd, (const struct sockaddr *)&t->peer, t->peerlen, &iov[2 * i],
                      (size_t)(2 * n), seg, (size_t)n, &p->gso, PUMP_PATIENCE, &p->counts);
        i += n;
    }
    p->windows++;
}

static void socket_packet(Out *o, const unsigned char *pkt, size_t len) {
    Transfer *t = ((SocketOut *)o)->t;
    (void)sendto(t->fd, pkt, len, MSG_DONTWAIT, (const struct sockaddr *)&t->peer, t->peerlen);
}

static void send_error_to(int fd, const struct sockaddr_storage *to, socklen_t tolen, int code,
                          const char *msg) {
    unsigned char pkt[5 + MSG_MAX];
    size_t len = error_packet(pkt, code, msg);
    (void)sendto(fd, pkt, len, MSG_DONTWAIT, (const struct sockaddr *)to, tolen);
}

/* A transfer whose machine has ended, or that Python takes back: off the epoll set, onto
 * the finished list (the caller holds the lock). */
static void retire(Pump *p, int idx) {
    Transfer *t = &p->slots[idx];
    t->state = FINISHED;
    epoll_ctl(p->epfd, EPOLL_CTL_DEL, t->fd, NULL);
    p->active--;
    t->next_done = -1;
    if (p->done_tail >= 0)
        p->slots[p->done_tail].next_done = idx;
    else
        p->done_head = idx;
    p->done_tail = idx;
}

/* After a step: retire an ended transfer, or make sure its timer is seen. */
static void stepped(Pump *p, int idx, int step) {
    Transfer *t = &p->slots[idx];
    if (step == STEP_MALFORMED)
        p->malformed++;
    else if (step == STEP_ENDED)
        retire(p, idx);
    else if (t->m.deadline < p->next_timer)
        p->next_timer = t->m.deadline;  /* an ACK resets the backoff: the timer comes sooner */
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

static void run_timers(Pump *p, double now) {
    double next = now + 3600.0;
    for (int i = 0; i < p->capacity; i++) {
        Transfer *t = &p->slots[i];
        if (t->state != ACTIVE)
            continue;
        if (t->m.deadline <= now) {
            p->out.t = t;
            if (machine_timer(&t->m, &p->out.out, now) == STEP_ENDED) {
                retire(p, i);
                continue;
            }
        }
        if (t->m.deadline < next)
            next = t->m.deadline;
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
    if (n < 0)  /* EAGAIN, or an ICMP error reported on the socket: the timer copes */
        return;
    if (!same_peer(t, &from, fromlen)) {
        p->unknown_tid++;
        if (!(n >= 2 && buf[0] == 0 && buf[1] == OP_ERROR))
            send_error_to(t->fd, &from, fromlen, ERR_UNKNOWN_TID, "unknown transfer ID");
        return;
    }
    p->out.t = t;
    stepped(p, idx, machine_packet(&t->m, &p->out.out, buf, (size_t)n, now));
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

/* ------------------------------------------------------------------ Pump methods */

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
    int fd;
    PyObject *peer;
    if (!PyArg_ParseTuple(args, "iO:add", &fd, &peer))
        return NULL;
    struct sockaddr_storage sa;
    socklen_t salen;
    if (parse_addr(peer, &sa, &salen) < 0)
        return NULL;
    Machine m;
    if (machine_init(&m, kw, now_s()) < 0)
        return NULL;
    if (ensure_started(p) < 0) {
        PyBuffer_Release(&m.buf);
        return NULL;
    }
    lock(p);
    int idx = p->free_head;
    if (idx < 0) {
        pthread_mutex_unlock(&p->mu);
        PyBuffer_Release(&m.buf);
        PyErr_SetString(PyExc_OverflowError, "pump is full");
        return NULL;
    }
    Transfer *t = &p->slots[idx];
    p->free_head = t->next_done;
    uint32_t gen = (t->gen + 1) & 0x7fffffffu;  /* handles stay positive */
    memset(t, 0, sizeof *t);
    t->m = m;
    t->gen = gen;
    t->fd = fd;
    t->peer = sa;
    t->peerlen = salen;
    t->next_done = -1;
    t->state = ACTIVE;
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = ((uint64_t)gen << 32) | (uint32_t)idx;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int err = errno;
        t->state = FREE;
        t->m.buf.obj = NULL;
        t->next_done = p->free_head;
        p->free_head = idx;
        pthread_mutex_unlock(&p->mu);
        PyBuffer_Release(&m.buf);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    p->active++;
    p->handed++;
    if (t->m.deadline < p->next_timer)
        p->next_timer = t->m.deadline;
    pthread_mutex_unlock(&p->mu);
    return PyLong_FromLongLong(((long long)gen << 32) | idx);
}

/* Slot back to the free list; the caller holds the lock and releases *view after it. */
static void release_slot(Pump *p, int idx, Py_buffer *view) {
    Transfer *t = &p->slots[idx];
    *view = t->m.buf;
    t->m.buf.obj = NULL;
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
    /* The finished list is detached in one go and its outcomes built without the lock,
     * which the thread holds while it serves a batch of ACKs: it never touches a finished
     * slot, and only this (GIL-holding) side reuses one. */
    lock(p);
    int head = p->done_head;
    p->done_head = p->done_tail = -1;
    pthread_mutex_unlock(&p->mu);
    double now = now_s();
    int idx = head;
    while (idx >= 0) {
        Transfer *t = &p->slots[idx];
        PyObject *res = outcome_new(&t->m, now);
        PyObject *item = res ? Py_BuildValue("(LN)", ((long long)t->gen << 32) | idx, res)
                             : NULL;
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            break;
        }
        Py_DECREF(item);
        PyBuffer_Release(&t->m.buf);
        t->m.buf.obj = NULL;
        idx = t->next_done;
    }
    /* Reported slots back to the free list; after a failure the rest stay finished. */
    int stop = idx;
    lock(p);
    for (idx = head; idx != stop;) {
        Transfer *t = &p->slots[idx];
        int next = t->next_done;
        t->state = FREE;
        t->next_done = p->free_head;
        p->free_head = idx;
        idx = next;
    }
    if (stop >= 0) {
        int tail = stop;
        while (p->slots[tail].next_done >= 0)
            tail = p->slots[tail].next_done;
        p->slots[tail].next_done = p->done_head;
        if (p->done_head < 0)
            p->done_tail = tail;
        p->done_head = stop;
    }
    pthread_mutex_unlock(&p->mu);
    if (stop >= 0) {  /* signalled again: the loop's next collect() reports the rest */
        uint64_t one = 1;
        ssize_t w = write(p->evfd, &one, sizeof one);
        (void)w;
        Py_DECREF(out);
        return NULL;
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
    if (t->state == ACTIVE)
        retire(p, idx);  /* its machine still runs: the outcome says so (end None) */
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
    PyObject *res = outcome_new(&t->m, now_s());
    Py_buffer view;
    release_slot(p, idx, &view);
    pthread_mutex_unlock(&p->mu);
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
                                p->counts.gso_buffers, "send_errors", p->counts.errors,
                                "malformed", p->malformed, "unknown_tid", p->unknown_tid,
                                "gso", p->gso);
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
    p->out.out.window = socket_window;
    p->out.out.packet = socket_packet;
    p->out.p = p;
    pthread_mutex_init(&p->mu, NULL);
    return (PyObject *)p;
}

static void Pump_dealloc(Pump *p) {
    Py_BEGIN_ALLOW_THREADS
    pump_stop(p);
    Py_END_ALLOW_THREADS
    if (p->slots) {
        for (int i = 0; i < p->capacity; i++)
            if (p->slots[i].state != FREE && p->slots[i].m.buf.obj)
                PyBuffer_Release(&p->slots[i].m.buf);
        free(p->slots);
    }
    free(p->out.out.scratch);
    if (p->epfd >= 0)
        close(p->epfd);
    if (p->evfd >= 0)
        close(p->evfd);
    pthread_mutex_destroy(&p->mu);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef Pump_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Pump_add, METH_VARARGS | METH_KEYWORDS,
     "add(fd, peer, *, source, file_fd, **handover) -> handle: take over an established read "
     "transfer; the keywords are bootherd.tftp.core.Handover's fields."},
    {"collect", (PyCFunction)Pump_collect, METH_NOARGS,
     "[(handle, Outcome), ...] of the transfers that ended since the last call."},
    {"cancel", (PyCFunction)Pump_cancel, METH_O,
     "cancel(handle) -> Outcome, or None if already collected: give a transfer back now."},
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

/* ------------------------------------------------------------------ ReadMachine */

/* The step interface: one machine driven from Python with explicit `now`, its packets
 * collected as bytes instead of sent.  Only tests use it; the Pump runs the same code. */

typedef struct {
    Out out;
    PyObject *list;         /* the packets of the current step */
    int failed;             /* out of memory while collecting */
} ListOut;

typedef struct {
    PyObject_HEAD
    Machine m;
    ListOut out;
} ReadMachine;

static void list_append(ListOut *lo, const struct iovec *parts, int n) {
    size_t len = 0;
    for (int i = 0; i < n; i++)
        len += parts[i].iov_len;
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    if (b == NULL) {
        lo->failed = 1;
        return;
    }
    char *w = PyBytes_AS_STRING(b);
    for (int i = 0; i < n; i++) {
        memcpy(w, parts[i].iov_base, parts[i].iov_len);
        w += parts[i].iov_len;
    }
    if (PyList_Append(lo->list, b) < 0)
        lo->failed = 1;
    Py_DECREF(b);
}

static void list_window(Out *o, struct iovec *iov, int count, size_t seg) {
    (void)seg;
    for (int k = 0; k < count; k++)
        list_append((ListOut *)o, &iov[2 * k], 2);
}

static void list_packet(Out *o, const unsigned char *pkt, size_t len) {
    struct iovec part = {.iov_base = (void *)pkt, .iov_len = len};
    list_append((ListOut *)o, &part, 1);
}

static PyObject *ReadMachine_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    double now;
    if (!PyArg_ParseTuple(args, "d:ReadMachine", &now))
        return NULL;
    ReadMachine *self = (ReadMachine *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (machine_init(&self->m, kw, now) < 0) {
        self->m.buf.obj = NULL;
        Py_DECREF(self);
        return NULL;
    }
    self->out.out.window = list_window;
    self->out.out.packet = list_packet;
    return (PyObject *)self;
}

static void ReadMachine_dealloc(ReadMachine *self) {
    PyBuffer_Release(&self->m.buf);
    free(self->out.out.scratch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* (packets, deadline or None) of one step, as ReadTransfer's events return them. */
static PyObject *step_result(ReadMachine *self, int step) {
    PyObject *list = self->out.list;
    self->out.list = NULL;
    if (self->out.failed) {
        Py_DECREF(list);
        return PyErr_NoMemory();
    }
    if (step == STEP_MALFORMED) {
        Py_DECREF(list);
        PyErr_SetString(PyExc_ValueError, "malformed datagram");
        return NULL;
    }
    if (self->m.end != RUNNING)
        return Py_BuildValue("(NO)", list, Py_None);
    return Py_BuildValue("(Nd)", list, self->m.deadline);
}

static int step_begin(ReadMachine *self) {
    self->out.failed = 0;
    self->out.list = PyList_New(0);
    return self->out.list == NULL ? -1 : 0;
}

static PyObject *ReadMachine_on_packet(ReadMachine *self, PyObject *args) {
    Py_buffer data;
    double now;
    if (!PyArg_ParseTuple(args, "y*d:on_packet", &data, &now))
        return NULL;
    if (step_begin(self) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    int step = machine_packet(&self->m, &self->out.out, data.buf, (size_t)data.len, now);
    PyBuffer_Release(&data);
    return step_result(self, step);
}

static PyObject *ReadMachine_on_timer(ReadMachine *self, PyObject *arg) {
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    if (step_begin(self) < 0)
        return NULL;
    return step_result(self, machine_timer(&self->m, &self->out.out, now));
}

static PyObject *ReadMachine_outcome(ReadMachine *self, PyObject *arg) {
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    return outcome_new(&self->m, now);
}

static PyObject *ReadMachine_deadline(ReadMachine *self, void *Py_UNUSED(closure)) {
    if (self->m.end != RUNNING)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(self->m.deadline);
}

static PyMethodDef ReadMachine_methods[] = {
    {"on_packet", (PyCFunction)ReadMachine_on_packet, METH_VARARGS,
     "on_packet(datagram, now) -> (packets, deadline or None), as ReadTransfer.on_packet; "
     "ValueError for a malformed datagram."},
    {"on_timer", (PyCFunction)ReadMachine_on_timer, METH_O,
     "on_timer(now) -> (packets, deadline or None), as ReadTransfer.on_timer."},
    {"outcome", (PyCFunction)ReadMachine_outcome, METH_O,
     "outcome(now) -> Outcome: what the Pump would report for this transfer now."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ReadMachine_getset[] = {
    {"deadline", (getter)ReadMachine_deadline, NULL, "next retransmission, None once ended",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReadMachineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bootherd._tftpdata.ReadMachine",
    .tp_basicsize = sizeof(ReadMachine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ReadMachine(now, *, source, file_fd, **handover): the Pump's rules for one "
              "transfer, stepped with explicit now; packets come back as bytes.",
    .tp_new = ReadMachine_new,
    .tp_dealloc = (destructor)ReadMachine_dealloc,
    .tp_methods = ReadMachine_methods,
    .tp_getset = ReadMachine_getset,
};

/* ------------------------------------------------------------------ module */

static PyObject *mod_classify(PyObject *Py_UNUSED(m), PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    int op = classify(b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyLong_FromLong(op);
}

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

static int add_type(PyObject *m, const char *name, PyTypeObject *type) {
    Py_INCREF(type);
    if (PyModule_AddObject(m, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__tftpdata(void) {
    if (PyType_Ready(&PumpType) < 0 || PyType_Ready(&ReadMachineType) < 0)
        return NULL;
    if (OutcomeType.tp_name == NULL &&
        PyStructSequence_InitType2(&OutcomeType, &outcome_desc) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    PyObject *names = PyTuple_New(N_ENDS);
    if (names == NULL)
        goto fail;
    for (int i = 0; i < N_ENDS; i++)
        PyTuple_SET_ITEM(names, i, PyUnicode_FromString(END_NAMES[i]));
    if (PyModule_AddObject(m, "OUTCOMES", names) < 0) {
        Py_DECREF(names);
        goto fail;
    }
    struct { const char *name; long value; } constants[] = {
        {"RRQ", OP_RRQ}, {"WRQ", OP_WRQ}, {"DATA", OP_DATA}, {"ACK", OP_ACK},
        {"ERROR", OP_ERROR}, {"OACK", OP_OACK}, {"ERR_UNDEFINED", ERR_UNDEFINED},
        {"ERR_ILLEGAL_OP", ERR_ILLEGAL_OP}, {"ERR_UNKNOWN_TID", ERR_UNKNOWN_TID},
        {"MIN_BLKSIZE", MIN_BLKSIZE}, {"MAX_BLKSIZE", MAX_BLKSIZE},
        {"MAX_BACKOFF_SHIFT", MAX_BACKOFF_SHIFT}, {"MAX_WINDOW", MAX_WINDOW},
        {"GSO_MAX_BYTES", GSO_MAX_BYTES}, {"GSO_MAX_SEGS", GSO_MAX_SEGS},
    };
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++)
        if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value) < 0)
            goto fail;
    if (add_type(m, "Pump", &PumpType) < 0 || add_type(m, "ReadMachine", &ReadMachineType) < 0 ||
        add_type(m, "Outcome", &OutcomeType) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
