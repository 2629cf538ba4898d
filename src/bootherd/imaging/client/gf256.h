/*
 * GF(2^8) for the imaging erasure code (bootherd/imaging/fec.py is the reference):
 * polynomial 0x11d, generator 2, Cauchy coefficients 1 / (j XOR (R_MAX + t)).
 * Included by the server's extension (src/bootherd/_imgfec.c) and the MFS client
 * (client/bhimg-recv.c), so both compute the same field.
 */
#ifndef BOOTHERD_GF256_H
#define BOOTHERD_GF256_H
#include <stddef.h>
#include <stdint.h>

#define GF_BLOCK 1408
#define GF_K_MAX 192
#define GF_R_MAX 64

static uint8_t GF_EXP[512], GF_LOG[256], GF_MUL[256][256];

static void gf_init(void) {
    int x = 1;
    for (int i = 0; i < 255; i++) {
        GF_EXP[i] = (uint8_t)x;
        GF_LOG[x] = (uint8_t)i;
        x <<= 1;
        if (x & 0x100)
            x ^= 0x11d;
    }
    for (int i = 255; i < 512; i++)
        GF_EXP[i] = GF_EXP[i - 255];
    for (int a = 0; a < 256; a++)
        for (int b = 0; b < 256; b++)
            GF_MUL[a][b] = (a && b) ? GF_EXP[GF_LOG[a] + GF_LOG[b]] : 0;
}

static inline uint8_t gf_inv(uint8_t a) { return GF_EXP[255 - GF_LOG[a]]; }

/* The coefficient of source t in repair symbol j. */
static inline uint8_t gf_coef(int j, int t) { return gf_inv((uint8_t)(j ^ (GF_R_MAX + t))); }

/* dst += c * src over n bytes */
static inline void gf_addmul(uint8_t *dst, const uint8_t *src, uint8_t c, size_t n) {
    if (!c)
        return;
    const uint8_t *row = GF_MUL[c];
    for (size_t i = 0; i < n; i++)
        dst[i] ^= row[src[i]];
}
#endif
