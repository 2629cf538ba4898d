/*
 * TMCD boot load generator for bench/tmcd/run.py, in C so that it is not the bottleneck.
 *
 * Each node boots once with a sequence of requests, as tmcc sends them: one TCP
 * connection per request from the node's own control address, the request line
 * ("VERSION=40 <command> "), a half-close, then the reply read until the server closes.
 * At most CONCURRENCY nodes boot at once (the Python load generator's semaphore); a
 * refused or reset connection is retried after 50 ms, 5 times, like the Python one.
 *
 *   loadgen HOST PORT CONCURRENCY IPFILE SEQFILE   -> one JSON line
 *
 * IPFILE holds one control address per line (one node each), SEQFILE one command line per
 * line.  The JSON line has requests, failed, bytes, seconds and the generator's own CPU
 * seconds (user + system), so a run shows whether the instrument or the server limits it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TRIES 5
#define RETRY_DELAY 0.05
#define REQUEST_TIMEOUT 30.0
#define MAXSEQ 64

typedef struct {
    int fd, step, tries, node, writing;
    double started, resume_at;
    struct sockaddr_in src;
} Slot;

static struct sockaddr_in server;
static char *seq[MAXSEQ];
static size_t seq_len[MAXSEQ];
static int nseq, epfd;
static long long requests, failed, bytes, retries;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static char **read_lines(const char *path, int *n, int max) {
    FILE *f = fopen(path, "r");
    if (!f) {
        perror(path);
        exit(2);
    }
    int cap = 1024, k = 0;
    char **out = malloc(cap * sizeof *out);
    char buf[4096];
    while (fgets(buf, sizeof buf, f)) {
        buf[strcspn(buf, "\r\n")] = 0;
        if (!buf[0])
            continue;
        if (k == cap) {
            cap *= 2;
            out = realloc(out, cap * sizeof *out);
        }
        out[k++] = strdup(buf);
        if (max && k == max)
            break;
    }
    fclose(f);
    *n = k;
    return out;
}

/* Opens the connection for the slot's current step; 0, or -1 when it cannot start now. */
static int start_request(Slot *s) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&s->src, sizeof s->src) < 0) {
        close(fd);
        return -1;
    }
    int r = connect(fd, (struct sockaddr *)&server, sizeof server);
    if (r < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    s->fd = fd;
    s->writing = 1;
    s->started = now();
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.ptr = s};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

static void end_conn(Slot *s) {
    if (s->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, s->fd, NULL);
        close(s->fd);
        s->fd = -1;
    }
}

/* The current request failed (refused, reset, timed out): retry it later, or give up. */
static void retry(Slot *s) {
    end_conn(s);
    if (++s->tries < TRIES) {
        retries++;
        s->resume_at = now() + RETRY_DELAY * s->tries;
        return;
    }
    failed++;
    requests++;
    s->tries = 0;
    s->step++;
    s->resume_at = now();
}

static void on_event(Slot *s, unsigned events) {
    if (s->writing) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            retry(s);
            return;
        }
        if (!(events & EPOLLOUT))
            return;
        ssize_t w = send(s->fd, seq[s->step], seq_len[s->step], MSG_NOSIGNAL);
        if (w != (ssize_t)seq_len[s->step]) {
            retry(s);
            return;
        }
        shutdown(s->fd, SHUT_WR);
        s->writing = 0;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = s};
        epoll_ctl(epfd, EPOLL_CTL_MOD, s->fd, &ev);
        return;
    }
    static char buf[65536];
    for (;;) {
        ssize_t r = recv(s->fd, buf, sizeof buf, 0);
        if (r > 0) {
            bytes += r;
            continue;
        }
        if (r == 0) {  /* the close ends the reply */
            end_conn(s);
            requests++;
            s->tries = 0;
            s->step++;
            s->resume_at = now();
            return;
        }
        if (errno == EAGAIN || errno == EINTR)
            return;
        retry(s);  /* reset: the server did not answer */
        return;
    }
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: loadgen HOST PORT CONCURRENCY IPFILE SEQFILE\n");
        return 2;
    }
    memset(&server, 0, sizeof server);
    server.sin_family = AF_INET;
    server.sin_port = htons((unsigned short)atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &server.sin_addr);
    int conc = atoi(argv[3]);
    int nips;
    char **ips = read_lines(argv[4], &nips, 0);
    char **lines = read_lines(argv[5], &nseq, MAXSEQ);
    for (int i = 0; i < nseq; i++) {
        char buf[4200];
        snprintf(buf, sizeof buf, "VERSION=40 %s ", lines[i]);
        seq[i] = strdup(buf);
        seq_len[i] = strlen(buf);
    }
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    epfd = epoll_create1(0);
    if (conc > nips)
        conc = nips;
    Slot *slots = calloc(conc, sizeof *slots);
    int next_node = 0, busy = 0;
    double t0 = now();
    for (int i = 0; i < conc; i++) {
        slots[i].fd = -1;
        slots[i].node = -1;
    }
    struct epoll_event evs[512];
    for (;;) {
        double t = now();
        busy = 0;
        for (int i = 0; i < conc; i++) {
            Slot *s = &slots[i];
            if (s->fd >= 0) {
                busy++;
                if (t - s->started > REQUEST_TIMEOUT)
                    retry(s);
                continue;
            }
            if (s->node >= 0 && s->step >= nseq)
                s->node = -1;  /* this node is up */
            if (s->node < 0) {
                if (next_node >= nips)
                    continue;
                s->node = next_node++;
                s->step = 0;
                s->tries = 0;
                s->resume_at = t;
                memset(&s->src, 0, sizeof s->src);
                s->src.sin_family = AF_INET;
                inet_pton(AF_INET, ips[s->node], &s->src.sin_addr);
            }
            busy++;
            if (s->resume_at <= t && start_request(s) < 0)
                retry(s);
        }
        if (!busy)
            break;
        int n = epoll_wait(epfd, evs, 512, 5);
        for (int i = 0; i < n; i++)
            on_event(evs[i].data.ptr, evs[i].events);
    }
    double secs = now() - t0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec / 1e6;
    printf("{\"requests\": %lld, \"failed\": %lld, \"bytes\": %lld, \"retries\": %lld, "
           "\"seconds\": %.4f, \"cpu\": %.3f}\n",
           requests, failed, bytes, retries, secs, cpu);
    return 0;
}
