/*
 * bhimg-recv: bootherd's imaging client, the program the imaging MFS runs to write a
 * node's disk.  It speaks the protocol of src/bootherd/imaging/wire.py (docs/imaging.md)
 * with the same rules as the Python receiver (imaging/receiver.py): join, fetch the
 * index over HTTP, collect symbols from the session's multicast group, decode stripes
 * (Cauchy Reed-Solomon over GF(2^8), imaging/fec.py), check each chunk's SHA-256 before
 * decompressing (zstd) and writing it, ask for what is missing, fall back to HTTP ranges
 * when multicast does not work, and check the written disk's SHA-256 at the end.
 *
 * Built statically by the test set-up:  gcc -O2 -static -o bhimg-recv bhimg-recv.c -lzstd -lm
 *
 * bhimg-recv --server IP --image NAME -o DISK [--port 7979] [--http-port 8080]
 *            [--interface-address IP] [--drop FRACTION] [--report URL] [--timeout S]
 *            [--http-only] [--quiet]
 * Exit 0 when the disk is written and verified; 1 otherwise (the reason on stderr).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <linux/sock_diag.h>
#include <time.h>
#include <unistd.h>
#include <zstd.h>

#define BLOCK 1408
#define K_MAX 192
#define R_MAX 64
#define DATA_HDR 20
#define REPAIR_FLAG 0x8000
#define MAX_RANGES 64
#define MAX_NEEDS 160
#define HEADER_LEN 144
#define ENTRY_LEN 52
#define RCVBUF (32 << 20) /* ~1.5 s at 100 Mbit/s: room for a receiver starved of CPU */
#define BATCH 64           /* datagrams per recvmmsg */
enum { JOIN = 1, JOINED, REFUSED, REQUEST, DATA, LEAVE };
enum { UNKNOWN_IMAGE = 1, BUSY, UNKNOWN_SESSION, BAD_IMAGE, HOLD };
enum { LEFT_DONE = 0, LEFT_FALLBACK, LEFT_FAILED };
enum { SKIPPED = 0, KZSTD = 1, KRAW = 2 };
enum { UNTOUCHED = 0, ACTIVE, SETTLED, DONE };

static int quiet;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "bhimg-recv: FAILED: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *xcalloc(size_t n, size_t s) {
    void *p = calloc(n, s);
    if (!p)
        die("out of memory");
    return p;
}

/* ---------------------------------------------------------------- big endian */

static uint16_t g16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t g32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static uint64_t g64(const uint8_t *p) { return (uint64_t)g32(p) << 32 | g32(p + 4); }
static uint8_t *p8(uint8_t *p, unsigned v) { *p = (uint8_t)v; return p + 1; }
static uint8_t *p16(uint8_t *p, unsigned v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; return p + 2; }
static uint8_t *p32(uint8_t *p, uint32_t v) { p16(p, v >> 16); p16(p + 2, v & 0xffff); return p + 4; }

/* ---------------------------------------------------------------- SHA-256 (FIPS 180-4) */

typedef struct {
    uint32_t h[8];
    uint64_t len;
    uint8_t buf[64];
    size_t n;
} sha256_t;

static uint32_t SHA_K[64], SHA_H0[8];
static int sha_ni; /* the CPU has the SHA extensions (x86) */

static void sha_init_constants(void) {
    /* First 32 bits of the fractional parts of the cube roots (K) and square roots (H0)
     * of the first primes, as the standard defines them. */
    int primes[64], n = 0;
    for (int c = 2; n < 64; c++) {
        int prime = 1;
        for (int d = 2; d * d <= c; d++)
            if (c % d == 0) { prime = 0; break; }
        if (prime)
            primes[n++] = c;
    }
    for (int i = 0; i < 64; i++) {
        long double r = cbrtl((long double)primes[i]);
        SHA_K[i] = (uint32_t)((r - floorl(r)) * 4294967296.0L);
    }
    for (int i = 0; i < 8; i++) {
        long double r = sqrtl((long double)primes[i]);
        SHA_H0[i] = (uint32_t)((r - floorl(r)) * 4294967296.0L);
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    sha_ni = __builtin_cpu_supports("sha") && __builtin_cpu_supports("sse4.1") && !getenv("BHIMG_NO_SHA_NI");
#endif
}

#define ROR(x, n) ((x) >> (n) | (x) << (32 - (n)))

static void sha_block(sha256_t *s, const uint8_t *b) {
    uint32_t w[64], a[8];
    for (int i = 0; i < 16; i++)
        w[i] = g32(b + 4 * i);
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    memcpy(a, s->h, sizeof a);
    for (int i = 0; i < 64; i++) {
        uint32_t S1 = ROR(a[4], 6) ^ ROR(a[4], 11) ^ ROR(a[4], 25);
        uint32_t ch = (a[4] & a[5]) ^ (~a[4] & a[6]);
        uint32_t t1 = a[7] + S1 + ch + SHA_K[i] + w[i];
        uint32_t S0 = ROR(a[0], 2) ^ ROR(a[0], 13) ^ ROR(a[0], 22);
        uint32_t mj = (a[0] & a[1]) ^ (a[0] & a[2]) ^ (a[1] & a[2]);
        uint32_t t2 = S0 + mj;
        memmove(a + 1, a, 7 * sizeof a[0]);
        a[4] += t1;
        a[0] = t1 + t2;
    }
    for (int i = 0; i < 8; i++)
        s->h[i] += a[i];
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
/* The x86 SHA extensions: the same compression function, ~8x faster than the portable
 * one; a receiver hashes every chunk it gets, so this is much of its CPU. */
__attribute__((target("sha,sse4.1"))) static void sha_blocks_ni(uint32_t h[8], const uint8_t *p, size_t n) {
    const __m128i MASK = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[0]), 0xB1); /* CDAB */
    __m128i st1 = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[4]), 0x1B); /* EFGH */
    __m128i st0 = _mm_alignr_epi8(tmp, st1, 8);                                     /* ABEF */
    st1 = _mm_blend_epi16(st1, tmp, 0xF0);                                          /* CDGH */
    for (; n; n--, p += 64) {
        __m128i abef = st0, cdgh = st1, w[4];
        for (int i = 0; i < 16; i++) {
            __m128i m;
            if (i < 4) {
                m = w[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * i)), MASK);
            } else {
                __m128i x = _mm_sha256msg1_epu32(w[i & 3], w[(i + 1) & 3]);
                x = _mm_add_epi32(x, _mm_alignr_epi8(w[(i + 3) & 3], w[(i + 2) & 3], 4));
                m = w[i & 3] = _mm_sha256msg2_epu32(x, w[(i + 3) & 3]);
            }
            m = _mm_add_epi32(m, _mm_loadu_si128((const __m128i *)&SHA_K[4 * i]));
            st1 = _mm_sha256rnds2_epu32(st1, st0, m);
            st0 = _mm_sha256rnds2_epu32(st0, st1, _mm_shuffle_epi32(m, 0x0E));
        }
        st0 = _mm_add_epi32(st0, abef);
        st1 = _mm_add_epi32(st1, cdgh);
    }
    tmp = _mm_shuffle_epi32(st0, 0x1B);    /* FEBA */
    st1 = _mm_shuffle_epi32(st1, 0xB1);    /* DCHG */
    st0 = _mm_blend_epi16(tmp, st1, 0xF0); /* DCBA */
    st1 = _mm_alignr_epi8(st1, tmp, 8);    /* HGFE */
    _mm_storeu_si128((__m128i *)&h[0], st0);
    _mm_storeu_si128((__m128i *)&h[4], st1);
}
#endif

static void sha_blocks(sha256_t *s, const uint8_t *p, size_t n) {
#if defined(__x86_64__) || defined(__i386__)
    if (sha_ni) {
        sha_blocks_ni(s->h, p, n);
        return;
    }
#endif
    for (; n; n--, p += 64)
        sha_block(s, p);
}

static void sha_start(sha256_t *s) {
    memcpy(s->h, SHA_H0, sizeof s->h);
    s->len = 0;
    s->n = 0;
}

static void sha_update(sha256_t *s, const uint8_t *p, size_t len) {
    s->len += len;
    if (s->n) {
        size_t take = 64 - s->n < len ? 64 - s->n : len;
        memcpy(s->buf + s->n, p, take);
        s->n += take, p += take, len -= take;
        if (s->n < 64)
            return;
        sha_blocks(s, s->buf, 1);
        s->n = 0;
    }
    sha_blocks(s, p, len / 64);
    p += len & ~(size_t)63;
    len &= 63;
    memcpy(s->buf, p, len);
    s->n = len;
}

static void sha_final(sha256_t *s, uint8_t out[32]) {
    uint64_t bits = s->len * 8;
    uint8_t pad = 0x80, zero = 0, lenb[8];
    sha_update(s, &pad, 1);
    while (s->n != 56)
        sha_update(s, &zero, 1);
    for (int i = 0; i < 8; i++)
        lenb[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha_update(s, lenb, 8);
    for (int i = 0; i < 8; i++)
        p32(out + 4 * i, s->h[i]);
}

static void sha256(const uint8_t *p, size_t n, uint8_t out[32]) {
    sha256_t s;
    sha_start(&s);
    sha_update(&s, p, n);
    sha_final(&s, out);
}

static void hex(const uint8_t *d, char out[65]) {
    for (int i = 0; i < 32; i++)
        sprintf(out + 2 * i, "%02x", d[i]);
}

/* ---------------------------------------------------------------- GF(2^8), Cauchy RS */

#include "gf256.h"

#define coef gf_coef
#define addmul gf_addmul

/* Gauss-Jordan inverse of an m x m matrix (row-major) in place; 0 if singular. */
static int gf_invert(uint8_t *a, uint8_t *inv, int m) {
    memset(inv, 0, (size_t)m * m);
    for (int i = 0; i < m; i++)
        inv[i * m + i] = 1;
    for (int col = 0; col < m; col++) {
        int piv = -1;
        for (int r = col; r < m; r++)
            if (a[r * m + col]) { piv = r; break; }
        if (piv < 0)
            return 0;
        for (int k = 0; k < m; k++) {
            uint8_t t = a[col * m + k]; a[col * m + k] = a[piv * m + k]; a[piv * m + k] = t;
            t = inv[col * m + k]; inv[col * m + k] = inv[piv * m + k]; inv[piv * m + k] = t;
        }
        uint8_t iv = gf_inv(a[col * m + col]);
        for (int k = 0; k < m; k++) {
            a[col * m + k] = GF_MUL[iv][a[col * m + k]];
            inv[col * m + k] = GF_MUL[iv][inv[col * m + k]];
        }
        for (int r = 0; r < m; r++) {
            uint8_t f = a[r * m + col];
            if (r == col || !f)
                continue;
            for (int k = 0; k < m; k++) {
                a[r * m + k] ^= GF_MUL[f][a[col * m + k]];
                inv[r * m + k] ^= GF_MUL[f][inv[col * m + k]];
            }
        }
    }
    return 1;
}

/* ---------------------------------------------------------------- the image index */

typedef struct {
    uint64_t off;
    uint32_t stored, raw;
    uint8_t kind;
    uint8_t sha[32];
} chunk_t;

typedef struct {
    uint32_t chunk_size, count, header_len;
    uint64_t disk_size, data_size;
    uint8_t image_sha[32];
    chunk_t *chunks;
} image_t;

static const char *parse_index(const uint8_t *m, size_t len, image_t *img) {
    uint8_t d[32];
    if (len < HEADER_LEN || memcmp(m, "BHIMAGE\0", 8) != 0)
        return "not a bootherd image";
    sha256(m, HEADER_LEN - 32, d);
    if (memcmp(d, m + HEADER_LEN - 32, 32))
        return "header digest mismatch";
    if (g16(m + 8) != 1)
        return "unknown image format version";
    img->header_len = g32(m + 12);
    img->chunk_size = g32(m + 16);
    img->count = g32(m + 20);
    img->disk_size = g64(m + 24);
    img->data_size = g64(m + 32);
    memcpy(img->image_sha, m + 48, 32);
    if (!img->chunk_size || img->chunk_size > (16u << 20) ||
        img->count != (img->disk_size + img->chunk_size - 1) / img->chunk_size ||
        img->header_len != HEADER_LEN + (uint64_t)img->count * ENTRY_LEN || len < img->header_len)
        return "inconsistent header";
    sha256(m + HEADER_LEN, img->header_len - HEADER_LEN, d);
    if (memcmp(d, m + 80, 32))
        return "index digest mismatch";
    img->chunks = xcalloc(img->count, sizeof(chunk_t));
    uint64_t expect = img->header_len;
    for (uint32_t i = 0; i < img->count; i++) {
        const uint8_t *e = m + HEADER_LEN + (size_t)i * ENTRY_LEN;
        chunk_t *c = &img->chunks[i];
        c->off = g64(e);
        c->stored = g32(e + 8);
        c->raw = g32(e + 12);
        c->kind = e[16];
        memcpy(c->sha, e + 20, 32);
        uint64_t want = img->disk_size - (uint64_t)i * img->chunk_size;
        if (want > img->chunk_size)
            want = img->chunk_size;
        if (c->kind > KRAW || c->raw != want || c->off != expect || (c->kind == SKIPPED) != (c->stored == 0) ||
            c->stored > img->chunk_size + img->chunk_size / 8 + 1024)
            return "inconsistent index entry";
        expect += c->stored;
    }
    return NULL;
}

/* ---------------------------------------------------------------- HTTP (ranges, reports) */

static struct sockaddr_in server;
static int http_port = 8080;
static char image_name[129];

static int tcp_connect(struct sockaddr_in *to) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval tv = {30, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)to, sizeof *to) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w <= 0) {
            if (w < 0 && errno == EINTR)
                continue;
            return -1;
        }
        c += w, n -= (size_t)w;
    }
    return 0;
}

/* GET bytes [first, last] of /images/NAME into a fresh buffer; NULL on failure. */
static uint8_t *http_range(uint64_t first, uint64_t last, size_t *got) {
    for (int attempt = 0; attempt < 30; attempt++) {
        struct sockaddr_in to = server;
        to.sin_port = htons((uint16_t)http_port);
        int fd = tcp_connect(&to);
        if (fd < 0)
            return NULL;
        char req[512];
        int n = snprintf(req, sizeof req, "GET /images/%s HTTP/1.0\r\nHost: %s\r\nRange: bytes=%llu-%llu\r\n\r\n",
                         image_name, inet_ntoa(server.sin_addr), (unsigned long long)first, (unsigned long long)last);
        if (write_all(fd, req, (size_t)n) < 0) {
            close(fd);
            return NULL;
        }
        size_t cap = (size_t)(last - first + 1) + 8192, len = 0;
        uint8_t *buf = malloc(cap + 1);
        if (!buf)
            die("out of memory");
        for (;;) {
            if (len == cap) {
                cap *= 2;
                buf = realloc(buf, cap + 1);
                if (!buf)
                    die("out of memory");
            }
            ssize_t r = read(fd, buf + len, cap - len);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                break;
            len += (size_t)r;
        }
        close(fd);
        buf[len] = 0;
        char *end = memmem(buf, len, "\r\n\r\n", 4);
        int status = 0;
        if (end)
            sscanf((char *)buf, "HTTP/%*s %d", &status);
        if (status == 503) { /* admission control: come back after Retry-After */
            free(buf);
            sleep(2);
            continue;
        }
        if (status != 206 || !end) {
            free(buf);
            return NULL;
        }
        size_t head = (size_t)((uint8_t *)end + 4 - buf);
        *got = len - head;
        memmove(buf, buf + head, *got);
        return buf;
    }
    return NULL;
}

static struct sockaddr_in report_to;
static char report_path[256];
static int reporting;

static int parse_url(const char *url) {
    char host[64];
    int port = 80;
    const char *p = strncmp(url, "http://", 7) == 0 ? url + 7 : NULL;
    if (!p)
        return -1;
    const char *slash = strchr(p, '/');
    size_t hl = slash ? (size_t)(slash - p) : strlen(p);
    if (hl >= sizeof host)
        return -1;
    memcpy(host, p, hl);
    host[hl] = 0;
    char *colon = strchr(host, ':');
    if (colon)
        *colon = 0, port = atoi(colon + 1);
    memset(&report_to, 0, sizeof report_to);
    report_to.sin_family = AF_INET;
    report_to.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &report_to.sin_addr) != 1)
        return -1;
    snprintf(report_path, sizeof report_path, "%s", slash ? slash : "/");
    return 0;
}

/* POST a progress report (JSON) to --report; best effort, never fatal. */
static void report(const char *state, uint32_t done, uint32_t total, uint64_t written, const char *via,
                   const char *message) {
    if (!reporting)
        return;
    char body[600], req[1024];
    int n = snprintf(body, sizeof body,
                     "{\"image\":\"%s\",\"state\":\"%s\",\"done_chunks\":%u,\"chunks\":%u,"
                     "\"bytes_written\":%llu,\"via\":\"%s\",\"message\":\"%s\"}",
                     image_name, state, done, total, (unsigned long long)written, via, message ? message : "");
    int m = snprintf(req, sizeof req, "POST %s HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
                     report_path, n, body);
    int fd = tcp_connect(&report_to);
    if (fd < 0)
        return;
    if (write_all(fd, req, (size_t)m) == 0) {
        char sink[512];
        while (read(fd, sink, sizeof sink) > 0)
            ;
    }
    close(fd);
}

/* ---------------------------------------------------------------- the receiver */

typedef struct {
    int blocks, stripes;
    uint8_t *src;     /* blocks * BLOCK */
    uint8_t *has_src; /* per block */
    uint8_t **rep;    /* stripes * R_MAX symbols, NULL until received */
    int *have;        /* symbols per stripe */
    size_t bytes;
} partial_t;

static image_t img;
static uint8_t *state;
static partial_t **parts;
static uint32_t done_chunks;
static uint64_t written;
static int out_fd, out_is_block;
static size_t partial_bytes, max_partial = (size_t)256 << 20;
static uint32_t bad_chunks, duplicates, useful, datagrams, foreign, malformed;

static int k_of(const partial_t *p, int s) { return (p->blocks - s + p->stripes - 1) / p->stripes; }

static void layout(uint32_t stored, int *blocks, int *stripes) {
    *blocks = stored ? (int)((stored + BLOCK - 1) / BLOCK) : 1;
    *stripes = (*blocks + K_MAX - 1) / K_MAX;
}

static partial_t *part_new(uint32_t c) {
    partial_t *p = xcalloc(1, sizeof *p);
    layout(img.chunks[c].stored, &p->blocks, &p->stripes);
    p->src = xcalloc((size_t)p->blocks, BLOCK);
    p->has_src = xcalloc((size_t)p->blocks, 1);
    p->rep = xcalloc((size_t)p->stripes * R_MAX, sizeof(uint8_t *));
    p->have = xcalloc((size_t)p->stripes, sizeof(int));
    return p;
}

static void part_free(uint32_t c) {
    partial_t *p = parts[c];
    if (!p)
        return;
    for (int i = 0; i < p->stripes * R_MAX; i++)
        free(p->rep[i]);
    free(p->rep), free(p->src), free(p->has_src), free(p->have);
    partial_bytes -= p->bytes;
    free(p);
    parts[c] = NULL;
}

static void write_at(uint64_t off, const uint8_t *d, size_t n) {
    while (n) {
        ssize_t w = pwrite(out_fd, d, n, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            die("writing the disk: %s", strerror(errno));
        d += w, off += (uint64_t)w, n -= (size_t)w;
    }
}

static void zero_at(uint64_t off, uint64_t n) {
    if (!out_is_block)
        return; /* a fresh sparse file reads as zeros */
    uint64_t range[2] = {off, n};
    if (ioctl(out_fd, BLKZEROOUT, range) == 0)
        return;
    static uint8_t zeros[1 << 16];
    while (n) {
        size_t k = n < sizeof zeros ? (size_t)n : sizeof zeros;
        write_at(off, zeros, k);
        off += k, n -= k;
    }
}

static uint8_t *unpacked;
static ZSTD_DCtx *dctx; /* one for the whole run: ZSTD_decompress would make one per chunk */
static double last_progress;

/* A chunk's stored bytes: write it if they match the index; 0 if they do not. */
static int accept_chunk(uint32_t c, const uint8_t *stored, size_t len) {
    chunk_t *ch = &img.chunks[c];
    uint8_t d[32];
    if (len != ch->stored)
        return 0;
    sha256(stored, len, d);
    if (memcmp(d, ch->sha, 32))
        return 0;
    if (ch->kind == KRAW) {
        write_at((uint64_t)c * img.chunk_size, stored, len);
    } else {
        size_t r = ZSTD_decompressDCtx(dctx, unpacked, img.chunk_size, stored, len);
        if (ZSTD_isError(r) || r != ch->raw)
            return 0;
        write_at((uint64_t)c * img.chunk_size, unpacked, r);
    }
    state[c] = DONE;
    done_chunks++;
    written += ch->raw;
    last_progress = now();
    return 1;
}

/* All stripes of a partial chunk have k symbols: decode, assemble, check, write. */
static void finish_chunk(uint32_t c) {
    partial_t *p = parts[c];
    int ok = 1;
    for (int s = 0; s < p->stripes && ok; s++) {
        int k = k_of(p, s), miss[K_MAX], m = 0, use[R_MAX], u = 0;
        for (int t = 0; t < k; t++)
            if (!p->has_src[t * p->stripes + s])
                miss[m++] = t;
        if (!m)
            continue;
        for (int j = 0; j < R_MAX && u < m; j++)
            if (p->rep[s * R_MAX + j])
                use[u++] = j;
        if (u < m) {
            ok = 0;
            break;
        }
        /* rhs_j = R_j + sum over present sources of C[j][t] * S_t */
        uint8_t *rhs = xcalloc((size_t)m, BLOCK);
        for (int i = 0; i < m; i++) {
            memcpy(rhs + (size_t)i * BLOCK, p->rep[s * R_MAX + use[i]], BLOCK);
            for (int t = 0; t < k; t++)
                if (p->has_src[t * p->stripes + s])
                    addmul(rhs + (size_t)i * BLOCK, p->src + (size_t)(t * p->stripes + s) * BLOCK, coef(use[i], t), BLOCK);
        }
        uint8_t a[R_MAX * R_MAX], inv[R_MAX * R_MAX];
        for (int i = 0; i < m; i++)
            for (int x = 0; x < m; x++)
                a[i * m + x] = coef(use[i], miss[x]);
        if (!gf_invert(a, inv, m)) {
            free(rhs);
            ok = 0;
            break;
        }
        for (int x = 0; x < m; x++) {
            uint8_t *dst = p->src + (size_t)(miss[x] * p->stripes + s) * BLOCK;
            memset(dst, 0, BLOCK);
            for (int i = 0; i < m; i++)
                addmul(dst, rhs + (size_t)i * BLOCK, inv[x * m + i], BLOCK);
        }
        free(rhs);
    }
    int good = ok && accept_chunk(c, p->src, img.chunks[c].stored);
    part_free(c);
    if (!good) {
        bad_chunks++;
        state[c] = UNTOUCHED; /* asked for again, whole */
    }
}

/* ---------------------------------------------------------------- main */

static uint32_t session, receiver_id, seen;
/* Congestion feedback for the server's rate (docs/imaging.md): datagrams lost in runs of
 * RUN_LOST or more (a full socket or NIC ring loses runs; random loss seldom does), and
 * the fullest the socket's receive buffer was since the last REQUEST. */
#define RUN_LOST 32
#define GAPS 32          /* gaps still open: datagrams can arrive late (reordered) */
#define GAP_SETTLE 256   /* a gap this far behind the newest datagram is final */
static uint32_t received, run_lost, kernel_drops; /* kernel_drops: at our socket (SO_MEMINFO) */
static unsigned backlog_pct;
static struct { uint32_t first, len, missing; } gaps[GAPS];
static int ngaps;

static void gap_close(int i) {
    if (gaps[i].missing >= RUN_LOST)
        run_lost += gaps[i].missing;
    gaps[i] = gaps[--ngaps];
}

/* Account for datagram seq: open a gap when it skips ahead, fill one when it is late. */
static void gap_track(uint32_t seq) {
    if (seq > seen) {
        if (seen && seq - seen - 1 >= RUN_LOST) {
            if (ngaps == GAPS)
                gap_close(0);
            gaps[ngaps].first = seen + 1;
            gaps[ngaps].len = gaps[ngaps].missing = seq - seen - 1;
            ngaps++;
        }
        seen = seq;
        for (int i = ngaps - 1; i >= 0; i--)
            if (seen - (gaps[i].first + gaps[i].len) > GAP_SETTLE)
                gap_close(i);
        return;
    }
    for (int i = 0; i < ngaps; i++)
        if (seq >= gaps[i].first && seq - gaps[i].first < gaps[i].len) {
            gaps[i].missing--;
            return;
        }
}
static int current = -1;

static void settle(void) {
    if (current >= 0 && state[current] == ACTIVE)
        state[current] = SETTLED;
    current = -1;
}

static void on_data(const uint8_t *b, size_t n) {
    datagrams++;
    if (n <= DATA_HDR || b[0] != 'B' || b[1] != 'H' || b[2] != 1) {
        malformed++;
        return;
    }
    if (b[3] != DATA || g32(b + 4) != session) {
        foreign++;
        return;
    }
    uint32_t c = g32(b + 8), seq = g32(b + 12);
    unsigned sym = g16(b + 16);
    if (c >= img.count || img.chunks[c].kind == SKIPPED) {
        foreign++;
        return;
    }
    received++;
    gap_track(seq);
    if (state[c] == DONE) {
        duplicates++;
        return;
    }
    if ((int)c != current)
        settle(), current = (int)c;
    partial_t *p = parts[c];
    if (!p) {
        if (partial_bytes >= max_partial)
            return;
        p = parts[c] = part_new(c);
    }
    const uint8_t *pl = b + DATA_HDR;
    size_t len = n - DATA_HDR;
    if (sym & REPAIR_FLAG) {
        int s = (sym & 0x7fff) >> 6, j = sym & 0x3f;
        if (s >= p->stripes || len != BLOCK) {
            foreign++;
            return;
        }
        if (p->rep[s * R_MAX + j] || p->have[s] >= k_of(p, s)) {
            duplicates++;
            return;
        }
        p->rep[s * R_MAX + j] = malloc(BLOCK);
        if (!p->rep[s * R_MAX + j])
            die("out of memory");
        memcpy(p->rep[s * R_MAX + j], pl, BLOCK);
        p->have[s]++;
    } else {
        int blk = (int)sym, s = blk % p->stripes;
        size_t want = blk == p->blocks - 1 ? img.chunks[c].stored - (size_t)blk * BLOCK : BLOCK;
        if (blk >= p->blocks || len != want) {
            foreign++;
            return;
        }
        if (p->has_src[blk] || p->have[s] >= k_of(p, s)) {
            duplicates++;
            return;
        }
        memcpy(p->src + (size_t)blk * BLOCK, pl, len);
        p->has_src[blk] = 1;
        p->have[s]++;
    }
    useful++;
    p->bytes += len;
    partial_bytes += len;
    state[c] = ACTIVE;
    for (int s = 0; s < p->stripes; s++)
        if (p->have[s] < k_of(p, s))
            return;
    finish_chunk(c);
    if ((int)c == current)
        current = -1;
}

/* Percent of the socket's receive buffer in use (SO_MEMINFO); 0 if unknown.  Also
 * notes the datagrams the kernel dropped at it. */
static unsigned socket_fill(int fd) {
#ifdef SO_MEMINFO
    uint32_t mi[SK_MEMINFO_VARS] = {0};
    socklen_t len = sizeof mi;
    if (getsockopt(fd, SOL_SOCKET, SO_MEMINFO, mi, &len) == 0 && mi[SK_MEMINFO_RCVBUF]) {
        kernel_drops = mi[SK_MEMINFO_DROPS];
        return (unsigned)((uint64_t)mi[SK_MEMINFO_RMEM_ALLOC] * 100 / mi[SK_MEMINFO_RCVBUF]);
    }
#endif
    return 0;
}

/* Datagrams the kernel dropped at this socket (a full receive buffer), SO_MEMINFO. */
static unsigned socket_drops(int fd) {
#ifdef SO_MEMINFO
    uint32_t mi[SK_MEMINFO_VARS] = {0};
    socklen_t len = sizeof mi;
    if (getsockopt(fd, SOL_SOCKET, SO_MEMINFO, mi, &len) == 0)
        return mi[SK_MEMINFO_DROPS];
#endif
    return 0;
}

static double cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static size_t build_request(uint8_t *out, int urgent) {
    uint8_t *w = out;
    uint8_t *head;
    int nr = 0, nn = 0;
    w = p8(p8(p8(p8(w, 'B'), 'H'), 1), REQUEST);
    w = p32(p32(p32(p32(w, session), receiver_id), done_chunks), seen);
    head = w;
    w += 3; /* counts, filled below */
    /* an urgent REQUEST is feedback only: what it misses may be in its full buffer */
    for (uint32_t c = 0; c < img.count && nr < MAX_RANGES && !urgent;) {
        if (state[c] != UNTOUCHED) {
            c++;
            continue;
        }
        uint32_t e = c;
        while (e < img.count && state[e] == UNTOUCHED)
            e++;
        w = p32(p32(w, c), e - c);
        nr++;
        c = e;
    }
    for (uint32_t c = 0; c < img.count && nn < MAX_NEEDS && !urgent; c++) {
        if (state[c] != SETTLED || !parts[c])
            continue;
        partial_t *p = parts[c];
        for (int s = 0; s < p->stripes && nn < MAX_NEEDS; s++) {
            int need = k_of(p, s) - p->have[s];
            if (need > 0) {
                w = p8(p16(p32(w, c), (unsigned)s), (unsigned)(need > 255 ? 255 : need));
                nn++;
            }
        }
    }
    if (!nr && !nn && !urgent)
        return 0;
    /* the needs were written after the ranges: move nothing, just fill the counts */
    head[0] = (uint8_t)nr;
    p16(head + 1, (unsigned)nn);
    w = p8(p32(p32(w, received), run_lost + kernel_drops), backlog_pct > 100 ? 100 : backlog_pct);
    backlog_pct = 0;
    return (size_t)(w - out);
}

static void send_ctl(int fd, const uint8_t *b, size_t n) {
    if (send(fd, b, n, 0) < 0 && errno != ECONNREFUSED)
        fprintf(stderr, "bhimg-recv: send: %s\n", strerror(errno));
}

static void send_leave(int fd, int status) {
    uint8_t b[17], *w = b;
    w = p8(p8(p8(p8(w, 'B'), 'H'), 1), LEAVE);
    w = p8(p32(p32(w, session), receiver_id), (unsigned)status);
    p32(w, done_chunks);
    send_ctl(fd, b, sizeof b);
}

static void http_fallback(const char *why) {
    if (!quiet)
        fprintf(stderr, "bhimg-recv: %s: fetching the rest over HTTP\n", why);
    report("http", done_chunks, img.count, written, "http", why);
    for (uint32_t c = 0; c < img.count; c++) {
        if (state[c] == DONE)
            continue;
        part_free(c);
        int ok = 0;
        for (int attempt = 0; attempt < 4 && !ok; attempt++) {
            size_t got = 0;
            chunk_t *ch = &img.chunks[c];
            uint8_t *b = http_range(ch->off, ch->off + ch->stored - 1, &got);
            if (b)
                ok = accept_chunk(c, b, got);
            free(b);
        }
        if (!ok)
            die("chunk %u: no intact copy over HTTP", c);
    }
}

int main(int argc, char **argv) {
    const char *out = NULL, *iface = NULL, *srv = NULL, *report_url = NULL;
    int ctl_port = 7979, http_only = 0;
    double drop = 0, timeout = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--quiet") || !strcmp(a, "-q")) quiet = 1;
        else if (!strcmp(a, "--http-only")) http_only = 1;
        else if (!v) die("%s needs a value", a);
        else if (!strcmp(a, "--server")) srv = v, i++;
        else if (!strcmp(a, "--image")) snprintf(image_name, sizeof image_name, "%s", v), i++;
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) out = v, i++;
        else if (!strcmp(a, "--port")) ctl_port = atoi(v), i++;
        else if (!strcmp(a, "--http-port")) http_port = atoi(v), i++;
        else if (!strcmp(a, "--interface-address")) iface = v, i++;
        else if (!strcmp(a, "--drop")) drop = atof(v), i++;
        else if (!strcmp(a, "--timeout")) timeout = atof(v), i++;
        else if (!strcmp(a, "--report")) report_url = v, i++;
        else die("unknown option %s", a);
    }
    if (!srv || !image_name[0] || !out)
        die("usage: bhimg-recv --server IP --image NAME -o DISK [--port N] [--http-port N] "
            "[--interface-address IP] [--drop F] [--report URL] [--timeout S] [--http-only] [--quiet]");
    for (const char *c = image_name; *c; c++)
        if (!(*c == '.' || *c == '_' || *c == '-' || (*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z')))
            die("bad image name");
    if (report_url) {
        if (parse_url(report_url) < 0)
            die("--report: expected http://ADDRESS[:PORT]/PATH");
        reporting = 1;
    }
    sha_init_constants();
    gf_init();
    srandom((unsigned)(time(NULL) ^ getpid()));
    receiver_id = (uint32_t)random() << 1 ^ (uint32_t)random();
    memset(&server, 0, sizeof server);
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)ctl_port);
    if (inet_pton(AF_INET, srv, &server.sin_addr) != 1)
        die("--server: not an IPv4 address");
    double t0 = now(), deadline_all = timeout > 0 ? t0 + timeout : 0;

    int ctl = socket(AF_INET, SOCK_DGRAM, 0);
    if (ctl < 0 || connect(ctl, (struct sockaddr *)&server, sizeof server) < 0)
        die("control socket: %s", strerror(errno));
    struct sockaddr_in local;
    socklen_t ll = sizeof local;
    getsockname(ctl, (struct sockaddr *)&local, &ll);

    /* JOIN until JOINED (or give up on multicast) */
    uint8_t buf[2048], meta_sha[32] = {0}, image_sha[32] = {0};
    uint32_t nonce = (uint32_t)random(), header_len = 0;
    struct in_addr group = {0};
    int mport = 0, joined = 0, held = 0;
    const char *fallback = http_only ? "multicast disabled" : NULL;
    for (int attempt = 0; !http_only && attempt < 10 && !joined; attempt++) {
        uint8_t j[128], *w = j;
        size_t nl = strlen(image_name);
        w = p8(p8(p8(p8(w, 'B'), 'H'), 1), JOIN);
        w = p8(p32(p32(w, nonce), receiver_id), (unsigned)nl);
        memcpy(w, image_name, nl);
        send_ctl(ctl, j, (size_t)(w - j) + nl);
        double until = now() + 0.5;
        while (!joined) {
            int ms = (int)((until - now()) * 1000);
            if (ms <= 0)
                break;
            struct pollfd pf = {ctl, POLLIN, 0};
            if (poll(&pf, 1, ms) <= 0)
                continue;
            ssize_t n = recv(ctl, buf, sizeof buf, 0);
            if (n < 4 || buf[0] != 'B' || buf[1] != 'H' || buf[2] != 1)
                continue;
            if (buf[3] == REFUSED && n >= 10 && g32(buf + 4) == nonce) {
                int code = buf[8];
                char msg[256];
                snprintf(msg, sizeof msg, "%.*s", (int)(n - 10 < buf[9] ? n - 10 : buf[9]), (char *)buf + 10);
                if (code == HOLD) {
                    /* the session gathers a reload's receivers: keep joining */
                    held = 1;
                    continue;
                }
                if (code == BUSY) {
                    fallback = "server busy";
                    attempt = 10;
                    break;
                }
                report("failed", 0, 0, 0, "multicast", msg);
                die("refused by the server: %s", msg);
            }
            if (buf[3] == JOINED && n >= 4 + 105 && g32(buf + 4) == nonce) {
                const uint8_t *m = buf + 4;
                session = g32(m + 4);
                memcpy(&group, m + 8, 4);
                mport = g16(m + 12);
                if (g16(m + 14))
                    http_port = g16(m + 14);
                if (g16(m + 24) != BLOCK)
                    die("the server uses another block size");
                header_len = g32(m + 36);
                memcpy(meta_sha, m + 40, 32);
                memcpy(image_sha, m + 72, 32);
                joined = 1;
            }
        }
        if (held && !joined) {
            held = 0;
            attempt = -1; /* a held JOIN is an answer: the attempts start again */
        }
    }
    if (!joined && !fallback)
        fallback = "no answer from the imaging server";

    /* the index, over HTTP, checked against the digest the server announced */
    size_t mlen = 0;
    uint8_t *meta;
    if (!header_len) {
        uint8_t *h = http_range(0, HEADER_LEN - 1, &mlen);
        if (!h || mlen < 16)
            die("cannot fetch the image header over HTTP");
        header_len = g32(h + 12);
        free(h);
    }
    meta = http_range(0, header_len - 1, &mlen);
    if (!meta)
        die("cannot fetch the image index over HTTP");
    const char *err = parse_index(meta, mlen, &img);
    if (err)
        die("bad image index: %s", err);
    if (joined) {
        uint8_t d[32];
        sha256(meta, header_len, d);
        if (memcmp(d, meta_sha, 32) || memcmp(img.image_sha, image_sha, 32))
            die("the index does not match the digest the server announced");
    }
    free(meta);

    /* the disk */
    out_fd = open(out, O_WRONLY | O_CREAT, 0644);
    if (out_fd < 0)
        die("%s: %s", out, strerror(errno));
    struct stat st;
    fstat(out_fd, &st);
    out_is_block = S_ISBLK(st.st_mode);
    /* /dev/null (benchmarks): every chunk is still checked and decompressed; there is
       nothing to read back */
    int out_is_null = S_ISCHR(st.st_mode);
    if (out_is_null) {
    } else if (out_is_block) {
        uint64_t size = 0;
        ioctl(out_fd, BLKGETSIZE64, &size);
        if (size < img.disk_size)
            die("%s holds %llu bytes, the image needs %llu", out, (unsigned long long)size, (unsigned long long)img.disk_size);
    } else if (ftruncate(out_fd, 0) < 0 || ftruncate(out_fd, (off_t)img.disk_size) < 0) {
        die("%s: %s", out, strerror(errno));
    }
    state = xcalloc(img.count, 1);
    parts = xcalloc(img.count, sizeof(partial_t *));
    unpacked = xcalloc(1, img.chunk_size);
    dctx = ZSTD_createDCtx();
    if (!dctx)
        die("out of memory");
    for (uint32_t c = 0; c < img.count; c++)
        if (img.chunks[c].kind == SKIPPED) {
            zero_at((uint64_t)c * img.chunk_size, img.chunks[c].raw);
            state[c] = DONE;
            done_chunks++;
        }

    int data = -1;
    if (!fallback && done_chunks < img.count) {
        data = socket(AF_INET, SOCK_DGRAM, 0);
        int one = 1, rcv = RCVBUF;
        setsockopt(data, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (setsockopt(data, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv) < 0)
            setsockopt(data, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
        struct sockaddr_in b = {0};
        b.sin_family = AF_INET;
        b.sin_port = htons((uint16_t)mport);
        b.sin_addr = group;
        struct ip_mreq mr;
        mr.imr_multiaddr = group;
        mr.imr_interface = local.sin_addr;
        if (iface && inet_pton(AF_INET, iface, &mr.imr_interface) != 1)
            die("--interface-address: not an IPv4 address");
        if (bind(data, (struct sockaddr *)&b, sizeof b) < 0 ||
            setsockopt(data, IPPROTO_IP, IP_ADD_MEMBERSHIP, &mr, sizeof mr) < 0)
            fallback = "cannot join the multicast group";
    }

    /* receive */
    double last_data = now(), next_req = 0, last_report = 0, last_urgent = 0;
    int any_data = 0, asked_quiet = 0;
    static uint8_t bufs[BATCH][2048];
    struct mmsghdr msgs[BATCH];
    struct iovec iovs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iovs[i] = (struct iovec){bufs[i], sizeof bufs[i]};
        msgs[i] = (struct mmsghdr){.msg_hdr = {.msg_iov = &iovs[i], .msg_iovlen = 1}};
    }
    last_progress = now();
    while (!fallback && done_chunks < img.count) {
        double t = now();
        if (deadline_all && t > deadline_all)
            die("timed out");
        if (!any_data && t - last_data >= 3.0) {
            fallback = "no multicast data in 3 s (is multicast routed here?)";
            break;
        }
        if (t - last_progress >= 15.0) {
            fallback = "no progress in 15 s";
            break;
        }
        int q = t - last_data >= 0.05;
        if (q)
            settle();
        /* a filling socket buffer is told at once (at most every 0.1 s), so the server
           slows down before anything is lost */
        int urgent = backlog_pct >= 50 && t - last_urgent >= 0.1;
        if (t >= next_req || (q && !asked_quiet) || urgent) {
            uint8_t req[2048];
            size_t n = build_request(req, urgent);
            if (n)
                send_ctl(ctl, req, n);
            if (urgent)
                last_urgent = t;
            else {
                asked_quiet = q;
                next_req = t + 0.5 * (0.75 + 0.5 * (random() / (double)RAND_MAX));
            }
        }
        if (t - last_report >= 2.0) {
            last_report = t;
            report("receiving", done_chunks, img.count, written, "multicast", NULL);
            if (!quiet)
                fprintf(stderr, "receiving: %u/%u chunks\n", done_chunks, img.count);
        }
        double wake = next_req;
        if (!asked_quiet && last_data + 0.05 < wake)
            wake = last_data + 0.05;
        int ms = (int)((wake - now()) * 1000) + 1;
        if (ms < 0)
            ms = 0;
        struct pollfd pf[2] = {{data, POLLIN, 0}, {ctl, POLLIN, 0}};
        if (poll(pf, 2, ms) <= 0)
            continue;
        if (pf[0].revents & POLLIN) {
            unsigned fill = socket_fill(data);
            if (fill > backlog_pct)
                backlog_pct = fill;
            for (int burst = 0; burst < 4 && done_chunks < img.count; burst++) {
                int got = recvmmsg(data, msgs, BATCH, MSG_DONTWAIT, NULL);
                if (got <= 0)
                    break;
                for (int i = 0; i < got && done_chunks < img.count; i++) {
                    const uint8_t *d = bufs[i];
                    size_t n = msgs[i].msg_len;
                    if (drop > 0 && random() / (double)RAND_MAX < drop)
                        continue; /* injected loss (tests, benches) */
                    if (n > DATA_HDR && d[3] == DATA && g32(d + 4) == session)
                        last_data = now(), any_data = 1, asked_quiet = 0;
                    on_data(d, n);
                }
                if (got < BATCH)
                    break;
            }
        }
        if (pf[1].revents & POLLIN) {
            ssize_t n = recv(ctl, buf, sizeof buf, MSG_DONTWAIT);
            if (n >= 10 && buf[0] == 'B' && buf[3] == REFUSED && g32(buf + 4) == session) {
                if (buf[8] == UNKNOWN_SESSION)
                    fallback = "the server ended the session";
                else
                    die("refused by the server: %.*s", (int)(n - 10 < buf[9] ? n - 10 : buf[9]), (char *)buf + 10);
            }
        }
    }
    const char *via = "multicast";
    if (fallback && done_chunks < img.count) {
        if (joined)
            send_leave(ctl, LEFT_FALLBACK);
        http_fallback(fallback);
        via = "http";
    } else if (joined) {
        send_leave(ctl, LEFT_DONE);
    }

    /* the final check: the disk as written */
    if (fsync(out_fd) < 0 && errno != EINVAL)
        die("fsync: %s", strerror(errno));
    sha256_t sh;
    sha_start(&sh);
    int rfd = open(out, O_RDONLY);
    uint64_t left = out_is_null ? 0 : img.disk_size, off = 0;
    while (left) {
        size_t k = left < img.chunk_size ? (size_t)left : img.chunk_size;
        ssize_t r = pread(rfd, unpacked, k, (off_t)off);
        if (r <= 0)
            die("reading back the disk: %s", strerror(errno));
        sha_update(&sh, unpacked, (size_t)r);
        left -= (uint64_t)r, off += (uint64_t)r;
    }
    close(rfd);
    uint8_t d[32];
    char hx[65];
    sha_final(&sh, d);
    hex(d, hx);
    if (out_is_null) {
        memcpy(d, img.image_sha, 32); /* nothing kept to read back: every chunk matched */
        hex(d, hx);
    } else if (memcmp(d, img.image_sha, 32)) {
        report("failed", done_chunks, img.count, written, via, "written disk SHA-256 mismatch");
        die("written disk SHA-256 %s is not the image's", hx);
    }
    report("done", done_chunks, img.count, written, via, NULL);
    printf("{\"ok\": true, \"via\": \"%s\", \"seconds\": %.3f, \"sha256\": \"%s\", \"datagrams\": %u, "
           "\"useful\": %u, \"duplicates\": %u, \"malformed\": %u, \"foreign\": %u, \"bad_chunks\": %u, "
           "\"run_lost\": %u, \"socket_drops\": %u, \"cpu\": %.3f}\n",
           via, now() - t0, hx, datagrams, useful, duplicates, malformed, foreign, bad_chunks, run_lost,
           data >= 0 ? socket_drops(data) : 0, cpu_seconds());
    return 0;
}
