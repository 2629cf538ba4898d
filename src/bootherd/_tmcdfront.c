/*
 * bootherd._tmcdfront: TMCD's TCP connections handled on a native thread.
 *
 * A TMCD request is one short connection: accept, a request line, a reply, the close.
 * Profiled in a 10,000-node OS phase, the Python and event-loop work per connection
 * (protocol object, callbacks, socket options, transport writes and closes) cost more
 * than deciding the reply.  A Front does all of that on one thread that never takes the
 * GIL: it accepts on the listening sockets, reads each request until it is complete (a
 * newline, the client's half-close, more than max_request bytes, or a trailing space and
 * 50 ms of silence, as the Python transport), and queues it; the event loop is woken
 * through an eventfd, collects the requests in one call, decides them, and hands back
 * the replies, which the thread writes before closing each connection gracefully.
 *
 * Until its reply, a connection has SO_LINGER {1, 0}: if the server dies, the kernel
 * resets it and the node asks again, where a FIN would look like an empty answer.  A
 * connection that opens with ISPEAKSSL_TMCDV10 is handed to Python whole (detach()).
 *
 *   Front(listen_fds, max_request, read_timeout, max_open)
 *   fileno() -> eventfd, readable when collect() has something
 *   collect() -> [(cid, request bytes, peer ip, kind)], kind 0 request, 1 TLS hand-off
 *   reply(cid, bytes)   write, then close gracefully (b"": just close)
 *   reply_many([(cid, bytes), ...])  the same for a batch: one lock, one wake-up
 *   abort(cid)          reset the connection
 *   detach(cid) -> fd   the connection is Python's now (TLS)
 *   answers(peer, [(command, bytes, tag)])  plain requests ("[VERSION=n ]command") from
 *                       peer answered on the thread, no Python (the loop decided them)
 *   forget_answers()    drop them all (a new snapshot); answer_hits() -> [(tag, n)]
 *   stats() -> dict; close()
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define IDLE_GRACE 0.05
#define SCAN_EVERY 0.02
#define MAX_LISTEN 8
#define MAX_TAGS 512
#define MAX_COMMAND 32
static const char TLS_TAG[] = "ISPEAKSSL_TMCDV10";
#define TLS_TAG_LEN 17

enum { FREE, READING, WAITING, WRITING };

typedef struct {
    int fd, state;
    int eof;       /* the client half-closed: nothing is left to read */
    int answered;  /* reply(), abort() or detach() was called (under mu) */
    uint32_t gen;
    char *buf;
    size_t len, cap, off;
    double deadline, idle_at;
    char peer[INET6_ADDRSTRLEN];
} Conn;

typedef struct {
    uint64_t cid;
    int kind;
} Ready;

/* A reply the thread gives itself to a plain request ("[VERSION=n ]command") from one
 * address: the event loop decided it (a pure function of the snapshot, the address and
 * the command) and holds the reference to its bytes. */
typedef struct Answer {
    struct Answer *next;
    uint64_t hash;
    size_t klen;
    PyObject *data;  /* bytes: immutable, so read without the GIL while referenced */
    int tag;
    char key[];      /* peer '\0' command */
} Answer;

typedef struct {
    PyObject_HEAD
    pthread_t thread;
    pthread_mutex_t mu;
    int started, stop, epfd, wake_fd, py_fd;
    int listen[MAX_LISTEN], nlisten;
    size_t max_request;
    double read_timeout;
    Conn *conns;
    int max_open, open, high;
    int *free_slots, nfree;
    Ready *ready;        /* handed to Python, under mu */
    size_t nready, ready_cap;
    uint64_t *todo;      /* replies Python queued, under mu */
    size_t ntodo, todo_cap;
    int py_signalled, thread_signalled;
    unsigned long long connections, requests, timeouts, overflow, errors, tls;
    /* Answers the event loop left here: (peer, command) -> reply, under tmu. */
    pthread_mutex_t tmu;
    Answer **table;
    size_t tsize, tcount;
    unsigned long long hits[MAX_TAGS], answered;
} Front;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static uint64_t cid_of(Front *f, int slot) {
    return ((uint64_t)f->conns[slot].gen << 32) | (uint32_t)slot;
}

/* The slot of a cid still live, or -1 (under mu or on the thread). */
static int slot_of(Front *f, uint64_t cid) {
    uint32_t slot = (uint32_t)cid;
    if (slot >= (uint32_t)f->max_open)
        return -1;
    Conn *c = &f->conns[slot];
    if (c->state == FREE || c->gen != (uint32_t)(cid >> 32))
        return -1;
    return (int)slot;
}

static void set_linger(int fd, int on) {
    struct linger l = {.l_onoff = on, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

static void release(Front *f, int slot, int close_fd) {
    Conn *c = &f->conns[slot];
    if (c->fd >= 0) {
        if (close_fd)
            close(c->fd);  /* which takes it out of the epoll set too (no dup of it) */
        else
            epoll_ctl(f->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    }
    c->fd = -1;
    c->state = FREE;
    c->gen++;
    c->len = c->off = 0;
    f->open--;
    f->free_slots[f->nfree++] = slot;
}

/* A reset: SO_LINGER {1, 0} is still on until the reply. */
static void reset(Front *f, int slot) {
    if (f->conns[slot].fd >= 0)
        set_linger(f->conns[slot].fd, 1);
    release(f, slot, 1);
}

/* Wake the event loop (collect() also refreshes the counters Python shows). */
static void wake_python(Front *f) {
    pthread_mutex_lock(&f->mu);
    int signal = !f->py_signalled;
    f->py_signalled = 1;
    pthread_mutex_unlock(&f->mu);
    if (signal) {
        uint64_t one = 1;
        if (write(f->py_fd, &one, sizeof one) < 0) { /* the counter is full: still woken */ }
    }
}

static void hand_to_python(Front *f, int slot, int kind) {
    Conn *c = &f->conns[slot];
    c->state = WAITING;
    epoll_ctl(f->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    pthread_mutex_lock(&f->mu);
    if (f->nready == f->ready_cap) {
        size_t cap = f->ready_cap ? f->ready_cap * 2 : 1024;
        Ready *r = realloc(f->ready, cap * sizeof *r);
        if (r == NULL) {
            pthread_mutex_unlock(&f->mu);
            f->errors++;
            reset(f, slot);
            return;
        }
        f->ready = r;
        f->ready_cap = cap;
    }
    f->ready[f->nready++] = (Ready){cid_of(f, slot), kind};
    int signal = !f->py_signalled;
    f->py_signalled = 1;
    pthread_mutex_unlock(&f->mu);
    f->requests += kind == 0;
    f->tls += kind == 1;
    if (signal) {
        uint64_t one = 1;
        if (write(f->py_fd, &one, sizeof one) < 0) { /* the counter is full: still woken */ }
    }
}

static void do_accept(Front *f, int lfd) {
    for (;;) {
        struct sockaddr_storage sa;
        socklen_t alen = sizeof sa;
        int fd = accept4(lfd, (struct sockaddr *)&sa, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                f->errors++;
            return;
        }
        f->connections++;
        set_linger(fd, 1);
        if (f->nfree == 0) {
            f->overflow++;
            close(fd);  /* reset (linger 0): the node asks again */
            wake_python(f);
            continue;
        }
        int slot = f->free_slots[--f->nfree];
        Conn *c = &f->conns[slot];
        c->fd = fd;
        c->answered = 0;
        c->eof = 0;
        c->state = READING;
        c->len = c->off = 0;
        c->deadline = now_s() + f->read_timeout;
        c->idle_at = 0;
        c->peer[0] = 0;
        if (sa.ss_family == AF_INET)
            inet_ntop(AF_INET, &((struct sockaddr_in *)&sa)->sin_addr, c->peer, sizeof c->peer);
        else if (sa.ss_family == AF_INET6)
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&sa)->sin6_addr, c->peer,
                      sizeof c->peer);
        f->open++;
        if (slot + 1 > f->high)
            f->high = slot + 1;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = (uint64_t)slot};
        epoll_ctl(f->epfd, EPOLL_CTL_ADD, fd, &ev);
    }
}

/* Is what was read a complete request?  0 no, 1 yes, 2 TLS. */
static int complete(Front *f, Conn *c) {
    size_t tag = c->len < TLS_TAG_LEN ? c->len : TLS_TAG_LEN;
    if (memcmp(c->buf, TLS_TAG, tag) == 0)
        return c->len >= TLS_TAG_LEN ? 2 : 0;
    if (memchr(c->buf, '\n', c->len) != NULL || c->len > f->max_request)
        return 1;
    return 0;
}

/* Is this request exactly "[VERSION=<1-4 digits>] <command>" (spaces or tabs around,
 * an optional CR, the end or a newline), with a lower-case command?  Then the Python
 * parser reads it as that command, no arguments, no other option (a strict subset of
 * what it accepts: anything else goes to Python). */
static int plain_command(const char *b, size_t len, size_t max_request, const char **cmd,
                         size_t *clen) {
    if (len > max_request)
        return 0;
    const char *nl = memchr(b, '\n', len);
    size_t n = nl ? (size_t)(nl - b) : len;
    while (n && b[n - 1] == '\r')
        n--;
    const char *tok[2];
    size_t tl[2];
    int nt = 0;
    for (size_t i = 0; i < n;) {
        unsigned char ch = (unsigned char)b[i];
        if (ch == ' ' || ch == '\t') {
            i++;
            continue;
        }
        size_t start = i;
        for (; i < n && b[i] != ' ' && b[i] != '\t'; i++)
            if ((unsigned char)b[i] < 0x20 || (unsigned char)b[i] > 0x7e)
                return 0;
        if (nt == 2)
            return 0;  /* arguments */
        tok[nt] = b + start;
        tl[nt++] = i - start;
    }
    if (nt == 0)
        return 0;
    if (nt == 2) {
        if (tl[0] < 9 || tl[0] > 12 || memcmp(tok[0], "VERSION=", 8) != 0)
            return 0;
        for (size_t k = 8; k < tl[0]; k++)
            if (tok[0][k] < '0' || tok[0][k] > '9')
                return 0;
    }
    const char *c = tok[nt - 1];
    size_t cl = tl[nt - 1];
    int alnum = 0;
    if (cl > MAX_COMMAND)
        return 0;
    for (size_t k = 0; k < cl; k++) {
        char ch = c[k];
        if ((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9'))
            alnum = 1;
        else if (ch != '_')
            return 0;
    }
    if (!alnum)
        return 0;
    *cmd = c;
    *clen = cl;
    return 1;
}

static uint64_t key_hash(const char *k, size_t n) {
    uint64_t h = 1469598103934665603ULL;  /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)k[i]) * 1099511628211ULL;
    return h;
}

/* Under tmu. */
static Answer **answer_slot(Front *f, const char *key, size_t klen, uint64_t h) {
    Answer **p = &f->table[h & (f->tsize - 1)];
    for (; *p != NULL; p = &(*p)->next)
        if ((*p)->hash == h && (*p)->klen == klen && memcmp((*p)->key, key, klen) == 0)
            break;
    return p;
}

static void do_write(Front *f, int slot);
static void drain(Conn *c);

/* A complete plain request with an answer in the table: written here, 1; else 0. */
static int answer_here(Front *f, int slot) {
    Conn *c = &f->conns[slot];
    const char *cmd;
    size_t cl;
    if (f->tcount == 0 || !plain_command(c->buf, c->len, f->max_request, &cmd, &cl))
        return 0;
    char key[INET6_ADDRSTRLEN + MAX_COMMAND + 1];
    size_t pl = strlen(c->peer);
    memcpy(key, c->peer, pl + 1);
    memcpy(key + pl + 1, cmd, cl);
    size_t klen = pl + 1 + cl;
    uint64_t h = key_hash(key, klen);
    pthread_mutex_lock(&f->tmu);
    Answer *a = f->tcount ? *answer_slot(f, key, klen, h) : NULL;
    if (a == NULL) {
        pthread_mutex_unlock(&f->tmu);
        return 0;
    }
    size_t len = (size_t)PyBytes_GET_SIZE(a->data);
    if (c->cap < len) {
        char *b = realloc(c->buf, len);
        if (b == NULL) {
            pthread_mutex_unlock(&f->tmu);
            return 0;  /* Python answers it */
        }
        c->buf = b;
        c->cap = len;
    }
    memcpy(c->buf, PyBytes_AS_STRING(a->data), len);
    f->hits[a->tag]++;
    f->answered++;
    pthread_mutex_unlock(&f->tmu);
    /* The loop counts it (answer_hits) before the node can read its reply: the counters
     * never lag what a node has seen.  Coalesced: one wake-up while the loop is busy. */
    wake_python(f);
    /* As take_replies does for a reply from Python (the fd stays in the epoll set: a
     * write that must wait changes what it waits for). */
    c->state = WAITING;
    c->answered = 1;
    c->len = len;
    drain(c);
    set_linger(c->fd, 0);
    c->off = 0;
    do_write(f, slot);
    return 1;
}

/* A request read to its end: answered here, or handed to Python. */
static void request_done(Front *f, int slot) {
    if (!answer_here(f, slot))
        hand_to_python(f, slot, 0);
}

static void do_read(Front *f, int slot) {
    Conn *c = &f->conns[slot];
    for (;;) {
        if (c->cap - c->len < 4096) {
            size_t cap = c->cap ? c->cap * 2 : 8192;
            char *b = realloc(c->buf, cap);
            if (b == NULL) {
                f->errors++;
                reset(f, slot);
                return;
            }
            c->buf = b;
            c->cap = cap;
        }
        ssize_t r = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
        if (r > 0) {
            c->len += (size_t)r;
            int done = complete(f, c);
            if (done == 1) {
                request_done(f, slot);
                return;
            }
            if (done == 2) {
                hand_to_python(f, slot, 1);
                return;
            }
            continue;
        }
        if (r == 0) {  /* the client's half-close ends its request */
            c->eof = 1;
            if (c->len == 0 || memcmp(c->buf, TLS_TAG, c->len < TLS_TAG_LEN ? c->len
                                                                           : TLS_TAG_LEN) == 0) {
                set_linger(c->fd, 0);
                release(f, slot, 1);  /* nothing asked: a plain close */
            } else {
                request_done(f, slot);
            }
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            char last = c->len ? c->buf[c->len - 1] : 0;
            c->idle_at = (last == ' ' || last == '\t') ? now_s() + IDLE_GRACE : 0;
            return;
        }
        reset(f, slot);
        return;
    }
}

/* Unread input at close makes the kernel reset the connection (a request longer than
 * max_request, bytes after the newline): read it away first (nothing is left after
 * the client's half-close). */
static void drain(Conn *c) {
    char sink[4096];
    if (c->eof)
        return;
    while (recv(c->fd, sink, sizeof sink, MSG_DONTWAIT) > 0)
        ;
}

static void do_write(Front *f, int slot) {
    Conn *c = &f->conns[slot];
    while (c->off < c->len) {
        ssize_t w = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (w > 0) {
            c->off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (c->state != WRITING) {
                c->state = WRITING;
                c->deadline = now_s() + f->read_timeout;
                struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)slot};
                if (epoll_ctl(f->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0 && errno == EEXIST)
                    epoll_ctl(f->epfd, EPOLL_CTL_MOD, c->fd, &ev);  /* answered here */
            }
            return;
        }
        reset(f, slot);  /* the client went away */
        return;
    }
    release(f, slot, 1);  /* linger is off: the close ends the reply, data is flushed */
}

/* Replies queued by Python: start writing them. */
static void take_replies(Front *f) {
    pthread_mutex_lock(&f->mu);
    uint64_t *todo = f->todo;
    size_t n = f->ntodo;
    f->todo = NULL;
    f->ntodo = f->todo_cap = 0;
    f->thread_signalled = 0;
    pthread_mutex_unlock(&f->mu);
    for (size_t i = 0; i < n; i++) {
        int slot = (int)(uint32_t)todo[i];
        Conn *c = &f->conns[slot];
        if (c->state != WAITING || c->gen != (uint32_t)(todo[i] >> 32))
            continue;
        if (c->off == (size_t)-1) {  /* abort() */
            reset(f, slot);
            continue;
        }
        drain(c);
        set_linger(c->fd, 0);
        c->off = 0;
        do_write(f, slot);
    }
    free(todo);
}

static void scan(Front *f, double t) {
    unsigned long long timeouts = f->timeouts;
    for (int i = 0; i < f->high; i++) {
        Conn *c = &f->conns[i];
        if (c->state == READING) {
            if (c->idle_at && t >= c->idle_at) {
                c->idle_at = 0;
                request_done(f, i);
            } else if (t >= c->deadline) {
                f->timeouts++;
                reset(f, i);
            }
        } else if (c->state == WRITING && t >= c->deadline) {
            f->timeouts++;
            reset(f, i);  /* the client never read its reply */
        }
    }
    if (f->timeouts != timeouts)
        wake_python(f);
}

static void *front_main(void *arg) {
    Front *f = arg;
    struct epoll_event evs[256];
    double next_scan = now_s() + SCAN_EVERY;
    while (!f->stop) {
        int n = epoll_wait(f->epfd, evs, 256, (int)(SCAN_EVERY * 1000));
        for (int i = 0; i < n; i++) {
            uint64_t tag = evs[i].data.u64;
            if (tag >= (1ULL << 40)) {
                int which = (int)(tag - (1ULL << 40));
                if (which == MAX_LISTEN) {
                    uint64_t v;
                    if (read(f->wake_fd, &v, sizeof v) < 0) { /* spurious */ }
                    take_replies(f);
                } else {
                    do_accept(f, f->listen[which]);
                }
                continue;
            }
            int slot = (int)tag;
            Conn *c = &f->conns[slot];
            if (c->state == READING)
                do_read(f, slot);
            else if (c->state == WRITING)
                do_write(f, slot);
        }
        double t = now_s();
        if (t >= next_scan) {
            scan(f, t);
            next_scan = t + SCAN_EVERY;
        }
    }
    return NULL;
}

static void front_stop(Front *f) {
    if (!f->started)
        return;
    f->started = 0;
    f->stop = 1;
    uint64_t one = 1;
    if (write(f->wake_fd, &one, sizeof one) < 0) { /* the thread wakes on its timer */ }
    Py_BEGIN_ALLOW_THREADS
    pthread_join(f->thread, NULL);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < f->high; i++)
        if (f->conns[i].state != FREE)
            reset(f, i);  /* as a server that dies: the nodes ask again */
}

/* Drop every answer (with the GIL: the bytes are released). */
static void forget_all(Front *f) {
    pthread_mutex_lock(&f->tmu);
    Answer **table = f->table;
    size_t n = f->tsize;
    f->table = NULL;
    f->tsize = f->tcount = 0;
    pthread_mutex_unlock(&f->tmu);
    for (size_t i = 0; i < n; i++) {
        for (Answer *a = table[i]; a != NULL;) {
            Answer *next = a->next;
            Py_DECREF(a->data);
            free(a);
            a = next;
        }
    }
    free(table);
}

/* Under tmu: twice the buckets once there are more answers than buckets. */
static int grow(Front *f) {
    if (f->tcount < f->tsize)
        return 0;
    size_t size = f->tsize ? f->tsize * 2 : 4096;
    Answer **t = calloc(size, sizeof *t);
    if (t == NULL)
        return -1;
    for (size_t i = 0; i < f->tsize; i++) {
        for (Answer *a = f->table[i]; a != NULL;) {
            Answer *next = a->next;
            a->next = t[a->hash & (size - 1)];
            t[a->hash & (size - 1)] = a;
            a = next;
        }
    }
    free(f->table);
    f->table = t;
    f->tsize = size;
    return 0;
}

static PyObject *Front_answers(Front *f, PyObject *args) {
    const char *peer;
    Py_ssize_t plen;
    PyObject *items;
    if (!PyArg_ParseTuple(args, "s#O:answers", &peer, &plen, &items))
        return NULL;
    if (plen >= INET6_ADDRSTRLEN) {
        PyErr_SetString(PyExc_ValueError, "answers: not an address");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(items, "answers takes a list of (command, bytes, tag)");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *err = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, i);
        const char *cmd;
        Py_ssize_t clen;
        PyObject *data;
        int tag;
        if (!PyArg_ParseTuple(it, "s#Si", &cmd, &clen, &data, &tag)) {
            err = PyExc_TypeError;
            break;
        }
        if (clen < 1 || clen > MAX_COMMAND || tag < 0 || tag >= MAX_TAGS) {
            PyErr_SetString(PyExc_ValueError, "answers: bad command or tag");
            err = PyExc_ValueError;
            break;
        }
        size_t klen = (size_t)plen + 1 + (size_t)clen;
        Answer *a = malloc(sizeof *a + klen);
        if (a == NULL) {
            PyErr_NoMemory();
            err = PyExc_MemoryError;
            break;
        }
        memcpy(a->key, peer, (size_t)plen);
        a->key[plen] = 0;
        memcpy(a->key + plen + 1, cmd, (size_t)clen);
        a->klen = klen;
        a->hash = key_hash(a->key, klen);
        a->tag = tag;
        Py_INCREF(data);
        a->data = data;
        PyObject *old = NULL;
        pthread_mutex_lock(&f->tmu);
        if (grow(f) < 0) {
            pthread_mutex_unlock(&f->tmu);
            Py_DECREF(data);
            free(a);
            PyErr_NoMemory();
            err = PyExc_MemoryError;
            break;
        }
        Answer **p = answer_slot(f, a->key, klen, a->hash);
        if (*p != NULL) {  /* replaced */
            Answer *was = *p;
            a->next = was->next;
            *p = a;
            old = was->data;
            free(was);
        } else {
            a->next = NULL;
            *p = a;
            f->tcount++;
        }
        pthread_mutex_unlock(&f->tmu);
        Py_XDECREF(old);
    }
    Py_DECREF(seq);
    if (err != NULL)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Front_forget_answers(Front *f, PyObject *Py_UNUSED(a)) {
    forget_all(f);
    Py_RETURN_NONE;
}

static PyObject *Front_answer_hits(Front *f, PyObject *Py_UNUSED(a)) {
    unsigned long long hits[MAX_TAGS];
    pthread_mutex_lock(&f->tmu);
    memcpy(hits, f->hits, sizeof hits);
    memset(f->hits, 0, sizeof f->hits);
    pthread_mutex_unlock(&f->tmu);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < MAX_TAGS; i++) {
        if (!hits[i])
            continue;
        PyObject *t = Py_BuildValue("(iK)", i, hits[i]);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    return out;
}

static PyObject *Front_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"listen_fds", "max_request", "read_timeout", "max_open", NULL};
    PyObject *fds;
    Py_ssize_t max_request;
    double read_timeout;
    int max_open;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Ondi:Front", kwlist, &fds, &max_request,
                                     &read_timeout, &max_open))
        return NULL;
    PyObject *seq = PySequence_Fast(fds, "listen_fds must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t nl = PySequence_Fast_GET_SIZE(seq);
    if (nl < 1 || nl > MAX_LISTEN || max_open < 1 || max_request < 1 || read_timeout <= 0) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "1-8 listen fds, max_open, max_request, "
                        "read_timeout > 0");
        return NULL;
    }
    Front *f = (Front *)type->tp_alloc(type, 0);
    if (f == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    f->epfd = f->wake_fd = f->py_fd = -1;
    pthread_mutex_init(&f->mu, NULL);
    pthread_mutex_init(&f->tmu, NULL);
    for (Py_ssize_t i = 0; i < nl; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v < 0) {
            Py_DECREF(seq);
            Py_DECREF(f);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "bad listen fd");
            return NULL;
        }
        f->listen[f->nlisten++] = (int)v;
    }
    Py_DECREF(seq);
    f->max_request = (size_t)max_request;
    f->read_timeout = read_timeout;
    f->max_open = max_open;
    f->conns = calloc((size_t)max_open, sizeof(Conn));
    f->free_slots = malloc((size_t)max_open * sizeof(int));
    f->epfd = epoll_create1(EPOLL_CLOEXEC);
    f->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    f->py_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (f->conns == NULL || f->free_slots == NULL || f->epfd < 0 || f->wake_fd < 0 ||
        f->py_fd < 0) {
        Py_DECREF(f);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < max_open; i++) {
        f->conns[i].fd = -1;
        f->free_slots[i] = max_open - 1 - i;
    }
    f->nfree = max_open;
    for (int i = 0; i < f->nlisten; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (1ULL << 40) + (uint64_t)i};
        if (epoll_ctl(f->epfd, EPOLL_CTL_ADD, f->listen[i], &ev) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            Py_DECREF(f);
            return NULL;
        }
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (1ULL << 40) + MAX_LISTEN};
    epoll_ctl(f->epfd, EPOLL_CTL_ADD, f->wake_fd, &ev);
    int rc = pthread_create(&f->thread, NULL, front_main, f);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(f);
        return NULL;
    }
    f->started = 1;
    return (PyObject *)f;
}

static void Front_dealloc(Front *f) {
    front_stop(f);
    if (f->conns)
        for (int i = 0; i < f->max_open; i++)
            free(f->conns[i].buf);
    free(f->conns);
    free(f->free_slots);
    free(f->ready);
    free(f->todo);
    forget_all(f);
    if (f->epfd >= 0)
        close(f->epfd);
    if (f->wake_fd >= 0)
        close(f->wake_fd);
    if (f->py_fd >= 0)
        close(f->py_fd);
    pthread_mutex_destroy(&f->mu);
    pthread_mutex_destroy(&f->tmu);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyObject *Front_fileno(Front *f, PyObject *Py_UNUSED(a)) {
    return PyLong_FromLong(f->py_fd);
}

static PyObject *Front_collect(Front *f, PyObject *Py_UNUSED(a)) {
    uint64_t v;
    if (read(f->py_fd, &v, sizeof v) < 0) { /* nothing signalled: maybe still something */ }
    pthread_mutex_lock(&f->mu);
    Ready *ready = f->ready;
    size_t n = f->nready;
    f->ready = NULL;
    f->nready = f->ready_cap = 0;
    f->py_signalled = 0;
    pthread_mutex_unlock(&f->mu);
    PyObject *out = PyList_New((Py_ssize_t)n);
    if (out == NULL) {
        free(ready);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        /* A WAITING connection is Python's alone: its buffer is stable. */
        Conn *c = &f->conns[(uint32_t)ready[i].cid];
        PyObject *it = Py_BuildValue("(Ky#si)", (unsigned long long)ready[i].cid, c->buf,
                                     (Py_ssize_t)c->len, c->peer, ready[i].kind);
        if (it == NULL) {
            Py_DECREF(out);
            free(ready);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, it);
    }
    free(ready);
    return out;
}

/* Queue a connection for the thread (reply or abort), under mu. */
static int queue_todo(Front *f, uint64_t cid) {
    if (f->ntodo == f->todo_cap) {
        size_t cap = f->todo_cap ? f->todo_cap * 2 : 1024;
        uint64_t *t = realloc(f->todo, cap * sizeof *t);
        if (t == NULL)
            return -1;
        f->todo = t;
        f->todo_cap = cap;
    }
    f->todo[f->ntodo++] = cid;
    return 0;
}

/* Hand one answer to the thread, under mu: 1 queued, 0 already answered or gone, -1 no
 * memory. */
static int finish_locked(Front *f, uint64_t cid, const char *data, Py_ssize_t len,
                         int abort_) {
    int slot = slot_of(f, cid);
    if (slot < 0 || f->conns[slot].state != WAITING || f->conns[slot].answered)
        return 0;
    Conn *c = &f->conns[slot];
    if (!abort_ && c->cap < (size_t)len) {
        char *b = realloc(c->buf, (size_t)len);
        if (b == NULL)
            return -1;
        c->buf = b;
        c->cap = (size_t)len;
    }
    if (queue_todo(f, cid) < 0)
        return -1;
    c->answered = 1;
    if (abort_) {
        c->off = (size_t)-1;
    } else {
        memcpy(c->buf, data, (size_t)len);
        c->len = (size_t)len;
        c->off = 0;
    }
    return 1;
}

/* Wake the thread for queued answers (after mu is released). */
static void wake_thread(Front *f) {
    pthread_mutex_lock(&f->mu);
    int signal = f->ntodo && !f->thread_signalled;
    f->thread_signalled |= signal;
    pthread_mutex_unlock(&f->mu);
    if (signal) {
        uint64_t one = 1;
        if (write(f->wake_fd, &one, sizeof one) < 0) { /* already signalled */ }
    }
}

static PyObject *finish(Front *f, uint64_t cid, const char *data, Py_ssize_t len, int abort_) {
    pthread_mutex_lock(&f->mu);
    int rc = finish_locked(f, cid, data, len, abort_);
    pthread_mutex_unlock(&f->mu);
    if (rc < 0)
        return PyErr_NoMemory();
    wake_thread(f);
    return PyBool_FromLong(rc);
}

/* reply_many([(cid, bytes), ...]): a batch of answers, one lock and one wake-up. */
static PyObject *Front_reply_many(Front *f, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "reply_many takes a list of (cid, bytes)");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int failed = 0;
    pthread_mutex_lock(&f->mu);
    for (Py_ssize_t i = 0; i < n && !failed; i++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *cid_o, *data_o;
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 2 ||
            !PyBytes_Check(data_o = PyTuple_GET_ITEM(it, 1))) {
            PyErr_SetString(PyExc_TypeError, "reply_many: items are (cid, bytes)");
            failed = 1;
            break;
        }
        cid_o = PyTuple_GET_ITEM(it, 0);
        unsigned long long cid = PyLong_AsUnsignedLongLong(cid_o);
        if (PyErr_Occurred()) {
            failed = 1;
            break;
        }
        if (finish_locked(f, cid, PyBytes_AS_STRING(data_o), PyBytes_GET_SIZE(data_o), 0) < 0) {
            PyErr_NoMemory();
            failed = 1;
        }
    }
    pthread_mutex_unlock(&f->mu);
    Py_DECREF(seq);
    wake_thread(f);
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Front_reply(Front *f, PyObject *args) {
    unsigned long long cid;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Ky*:reply", &cid, &data))
        return NULL;
    PyObject *r = finish(f, cid, data.buf, data.len, 0);
    PyBuffer_Release(&data);
    return r;
}

static PyObject *Front_abort(Front *f, PyObject *arg) {
    unsigned long long cid = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    return finish(f, cid, NULL, 0, 1);
}

static PyObject *Front_detach(Front *f, PyObject *arg) {
    unsigned long long cid = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    pthread_mutex_lock(&f->mu);
    int slot = slot_of(f, cid);
    if (slot < 0 || f->conns[slot].state != WAITING || f->conns[slot].answered) {
        pthread_mutex_unlock(&f->mu);
        PyErr_SetString(PyExc_KeyError, "no such connection waiting");
        return NULL;
    }
    /* The thread touches a WAITING slot only once it is in the todo list: take the fd,
     * then let the thread free the slot (it owns the free list) as an fd-less abort. */
    Conn *c = &f->conns[slot];
    int fd = c->fd;
    c->fd = -1;
    c->answered = 1;
    c->off = (size_t)-1;
    int rc = queue_todo(f, cid);
    int signal = rc == 0 && !f->thread_signalled;
    if (signal)
        f->thread_signalled = 1;
    pthread_mutex_unlock(&f->mu);
    if (signal) {
        uint64_t one = 1;
        if (write(f->wake_fd, &one, sizeof one) < 0) { /* already signalled */ }
    }
    return PyLong_FromLong(fd);
}

static PyObject *Front_stats(Front *f, PyObject *Py_UNUSED(a)) {
    return Py_BuildValue("{sKsKsKsKsKsKsKsi}", "connections", f->connections, "requests",
                         f->requests, "timeouts", f->timeouts, "overflow", f->overflow,
                         "errors", f->errors, "tls", f->tls, "answered", f->answered,
                         "open", f->open);
}

static PyObject *Front_close(Front *f, PyObject *Py_UNUSED(a)) {
    front_stop(f);
    Py_RETURN_NONE;
}

static PyMethodDef Front_methods[] = {
    {"fileno", (PyCFunction)Front_fileno, METH_NOARGS, "eventfd: readable when collect() has work"},
    {"collect", (PyCFunction)Front_collect, METH_NOARGS,
     "collect() -> [(cid, data, peer_ip, kind)]: complete requests (kind 0), TLS (kind 1)"},
    {"reply", (PyCFunction)Front_reply, METH_VARARGS, "reply(cid, data): write, then close"},
    {"reply_many", (PyCFunction)Front_reply_many, METH_O,
     "reply_many([(cid, data), ...]): reply() for a batch, one lock and one wake-up"},
    {"abort", (PyCFunction)Front_abort, METH_O, "abort(cid): reset the connection"},
    {"detach", (PyCFunction)Front_detach, METH_O, "detach(cid) -> fd: Python takes it over"},
    {"answers", (PyCFunction)Front_answers, METH_VARARGS,
     "answers(peer, [(command, bytes, tag), ...]): plain requests from peer answered here"},
    {"forget_answers", (PyCFunction)Front_forget_answers, METH_NOARGS,
     "forget every answer (a new snapshot)"},
    {"answer_hits", (PyCFunction)Front_answer_hits, METH_NOARGS,
     "[(tag, n)]: requests answered here per tag since the last call"},
    {"stats", (PyCFunction)Front_stats, METH_NOARGS, "counters as a dict"},
    {"close", (PyCFunction)Front_close, METH_NOARGS, "stop the thread, reset open connections"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FrontType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bootherd._tmcdfront.Front",
    .tp_basicsize = sizeof(Front),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TMCD connections accepted, read, answered and closed on a native thread.",
    .tp_new = Front_new,
    .tp_dealloc = (destructor)Front_dealloc,
    .tp_methods = Front_methods,
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "bootherd._tmcdfront",
    "TMCD's TCP connections on a native thread (see bootherd.tmcd.front).", -1, NULL,
};

PyMODINIT_FUNC PyInit__tmcdfront(void) {
    if (PyType_Ready(&FrontType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FrontType);
    if (PyModule_AddObject(m, "Front", (PyObject *)&FrontType) < 0) {
        Py_DECREF(&FrontType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
