/*
 * TFTP read load generator for bench/tftp/run.py, in C so that it is not the bottleneck.
 *
 * The same client behaviour as the Python one (bootherd.tftp.client._ReadProtocol), for
 * every server: one UDP socket and one loopback source address per client, RRQ octet with
 * blksize 1468 and tsize 0 (and windowsize when asked), ACK 0 after the OACK, one ACK per
 * window, a duplicate or a gap answered with an ACK of the last block in order, 2 s
 * timeout and 5 retries of the last packet, "busy" errors retried after 0.2 s (20 times).
 *
 *   loadgen HOST PORT FILE CLIENTS WINDOWSIZE LIMIT_S EXPECTED_BYTES   -> one JSON line
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TIMEOUT 2.0
#define RETRIES 5
#define BUSY_RETRIES 20
#define BUSY_DELAY 0.2
#define MAXERR 16

enum { IDLE, ACTIVE, DONE };

typedef struct {
    int fd, state, have_tid, oack, reacked, attempts, busy;
    struct sockaddr_in tid, last_dest;
    unsigned long expected, since_ack;
    long long size;
    int blksize, ws;
    unsigned char last[600];
    int last_len;
    double last_activity, resume_at;
    double first_data;  /* when its first DATA arrived (0: not yet): the request phase */
} Client;

static struct sockaddr_in server;
static unsigned char rrq[600];
static int rrq_len, epfd;
static long long expect_bytes, total_bytes, retries;
static int ok, failed;
static char err_keys[MAXERR][64];
static int err_counts[MAXERR], nerr;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void count_error(const char *msg) {
    char key[64];
    snprintf(key, sizeof key, "%.60s", msg);
    for (int i = 0; i < nerr; i++)
        if (strcmp(err_keys[i], key) == 0) {
            err_counts[i]++;
            return;
        }
    if (nerr < MAXERR) {
        strcpy(err_keys[nerr], key);
        err_counts[nerr++] = 1;
    }
}

static void client_ip(int i, struct sockaddr_in *a) {
    char ip[32];
    snprintf(ip, sizeof ip, "127.2.%d.%d", i / 250, i % 250 + 1);
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    inet_pton(AF_INET, ip, &a->sin_addr);
}

static void send_last(Client *c) {
    sendto(c->fd, c->last, c->last_len, 0, (struct sockaddr *)&c->last_dest, sizeof c->last_dest);
}

static void send_to_tid(Client *c, const unsigned char *p, int n) {
    memcpy(c->last, p, n);
    c->last_len = n;
    c->last_dest = c->tid;
    send_last(c);
}

static void send_ack(Client *c, unsigned long block) {
    unsigned char a[4] = {0, 4, (block >> 8) & 0xff, block & 0xff};
    send_to_tid(c, a, 4);
}

static void finish(Client *c, const char *error) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = DONE;
    total_bytes += c->size;
    if (error == NULL && c->size != expect_bytes)
        error = "short file";
    if (error) {
        failed++;
        count_error(error);
    } else {
        ok++;
    }
}

static int start(Client *c, int i) {
    struct sockaddr_in local;
    client_ip(i, &local);
    c->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0 || bind(c->fd, (struct sockaddr *)&local, sizeof local) < 0) {
        perror("loadgen socket");
        return -1;
    }
    int buf = 1 << 20;
    setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)i};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    c->state = ACTIVE;
    c->have_tid = c->oack = c->reacked = c->attempts = 0;
    c->expected = 1;
    c->since_ack = 0;
    c->size = 0;
    c->blksize = 512;
    c->ws = 1;
    memcpy(c->last, rrq, rrq_len);
    c->last_len = rrq_len;
    c->last_dest = server;
    c->last_activity = now();
    send_last(c);
    return 0;
}

static void on_oack(Client *c, const unsigned char *p, int n) {
    if (c->expected > 1)
        return;
    /* name\0value\0 pairs after the opcode */
    int i = 2;
    while (i < n) {
        const char *name = (const char *)p + i;
        int nl = strnlen(name, n - i);
        if (i + nl + 1 >= n)
            break;
        const char *val = name + nl + 1;
        int vl = strnlen(val, n - i - nl - 1);
        if (strcasecmp(name, "blksize") == 0)
            c->blksize = atoi(val);
        else if (strcasecmp(name, "windowsize") == 0)
            c->ws = atoi(val);
        i += nl + 1 + vl + 1;
    }
    c->oack = 1;
    send_ack(c, 0);
}

static void on_packet(Client *c, const unsigned char *p, int n, struct sockaddr_in *from) {
    if (!c->have_tid) {
        if (from->sin_addr.s_addr != server.sin_addr.s_addr)
            return;
        c->tid = *from;
        c->have_tid = 1;
    } else if (from->sin_addr.s_addr != c->tid.sin_addr.s_addr || from->sin_port != c->tid.sin_port) {
        static const unsigned char e[] = {0, 5, 0, 5, 'u', 'n', 'k', 'n', 'o', 'w', 'n', ' ', 'T', 'I', 'D', 0};
        sendto(c->fd, e, sizeof e, 0, (struct sockaddr *)from, sizeof *from);
        return;
    }
    if (n < 4 || p[0] != 0)
        return;
    int op = p[1];
    if (op == 3) { /* DATA */
        c->last_activity = now();
        if (c->first_data == 0)
            c->first_data = c->last_activity;
        unsigned wire = (p[2] << 8) | p[3];
        if (wire == (c->expected & 0xffff)) {
            int len = n - 4;
            if (len > c->blksize) {
                finish(c, "block too large");
                return;
            }
            c->size += len;
            c->expected++;
            c->attempts = 0;
            c->reacked = 0;
            c->since_ack++;
            if (len < c->blksize) {
                send_ack(c, c->expected - 1);
                finish(c, NULL);
            } else if (c->since_ack >= (unsigned long)c->ws) {
                c->since_ack = 0;
                send_ack(c, c->expected - 1);
            }
        } else if (c->ws == 1 || !c->reacked) {
            c->reacked = 1;
            c->since_ack = 0;
            if (c->expected > 1 || c->oack)
                send_ack(c, c->expected - 1);
        }
    } else if (op == 6) { /* OACK */
        c->last_activity = now();
        on_oack(c, p, n);
    } else if (op == 5) { /* ERROR */
        char msg[600];
        int code = (p[2] << 8) | p[3];
        snprintf(msg, sizeof msg, "%.*s", n - 4, (const char *)p + 4);
        if (code == 0 && strstr(msg, "busy") && c->busy < BUSY_RETRIES) {
            c->busy++;
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
            total_bytes += c->size;
            c->size = 0;
            c->state = IDLE;
            c->resume_at = now() + BUSY_DELAY;
            return;
        }
        finish(c, msg);
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: loadgen HOST PORT FILE CLIENTS WINDOWSIZE LIMIT EXPECTED\n");
        return 2;
    }
    int n = atoi(argv[4]), ws = atoi(argv[5]);
    double limit = atof(argv[6]);
    expect_bytes = atoll(argv[7]);
    memset(&server, 0, sizeof server);
    server.sin_family = AF_INET;
    server.sin_port = htons(atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &server.sin_addr) != 1) {
        fprintf(stderr, "loadgen: bad host %s\n", argv[1]);
        return 2;
    }
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);

    rrq_len = 2;
    rrq[0] = 0;
    rrq[1] = 1;
    rrq_len += snprintf((char *)rrq + rrq_len, sizeof rrq - rrq_len, "%s", argv[3]) + 1;
    const char *opts[] = {"octet", "blksize", "1468", "tsize", "0", "windowsize", argv[5]};
    int nopts = ws > 1 ? 7 : 5;
    for (int i = 0; i < nopts; i++)
        rrq_len += snprintf((char *)rrq + rrq_len, sizeof rrq - rrq_len, "%s", opts[i]) + 1;

    epfd = epoll_create1(0);
    Client *cl = calloc(n, sizeof(Client));
    double t0 = now();
    for (int i = 0; i < n; i++)
        if (start(&cl[i], i) < 0)
            return 1;
    struct epoll_event evs[256];
    unsigned char buf[65536];
    double next_scan = t0 + 0.02;
    while (ok + failed < n && now() - t0 < limit) {
        int k = epoll_wait(epfd, evs, 256, 20);
        for (int e = 0; e < k; e++) {
            Client *c = &cl[evs[e].data.u32];
            for (int burst = 0; burst < 64 && c->state == ACTIVE; burst++) {
                struct sockaddr_in from;
                socklen_t fl = sizeof from;
                int r = recvfrom(c->fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
                if (r < 0)
                    break;
                on_packet(c, buf, r, &from);
            }
        }
        double t = now();
        if (t < next_scan)
            continue;
        next_scan = t + 0.02;
        for (int i = 0; i < n; i++) {
            Client *c = &cl[i];
            if (c->state == IDLE && t >= c->resume_at) {
                if (start(c, i) < 0)
                    return 1;
            } else if (c->state == ACTIVE && t >= c->last_activity + TIMEOUT) {
                if (c->attempts >= RETRIES) {
                    finish(c, "timed out");
                    continue;
                }
                c->attempts++;
                retries++;
                c->last_activity = t;
                c->since_ack = 0;
                send_last(c);
            }
        }
    }
    double elapsed = now() - t0;
    int unfinished = 0;
    for (int i = 0; i < n; i++)
        if (cl[i].state != DONE) {
            unfinished++;
            total_bytes += cl[i].size;
        }
    printf("{\"ok\": %d, \"failed\": %d, \"unfinished\": %d, \"errors\": {", ok, failed, unfinished);
    for (int i = 0; i < nerr; i++) {
        printf("%s\"", i ? ", " : "");
        for (const char *q = err_keys[i]; *q; q++)
            if (*q == '"' || *q == '\\')
                printf("\\%c", *q);
            else if ((unsigned char)*q >= 0x20)
                putchar(*q);
        printf("\": %d", err_counts[i]);
    }
    /* Seconds from the start to each client's first DATA: how fast the server gets through
     * a burst of requests (RRQ, OACK, ACK 0) before the data phase. */
    double *first = calloc(n, sizeof(double));
    int nfirst = 0;
    for (int i = 0; i < n; i++)
        if (cl[i].first_data > 0)
            first[nfirst++] = cl[i].first_data - t0;
    qsort(first, nfirst, sizeof(double), cmp_double);
    double p50 = nfirst ? first[nfirst / 2] : 0, p99 = nfirst ? first[nfirst * 99 / 100] : 0;
    double fmax = nfirst ? first[nfirst - 1] : 0;
    printf("}, \"bytes\": %lld, \"elapsed\": %.6f, \"retries\": %lld, \"first_data\": "
           "[%.4f, %.4f, %.4f]}\n", total_bytes, elapsed, retries, p50, p99, fmax);
    return 0;
}
