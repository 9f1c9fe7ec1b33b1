"""A compiled CPU kernel for causal AFT-simple, forward and backward (training, inference, prefill): the "native"
implementation of `simple` (`AFTConfig(aft_implementation="native")`).

One pass over the sequence per channel keeps the running (m, n, z) of docs/operator.md (section 4) in float32: for each
row, with d = k - m, the larger of the two exponents is 0 and the other is -|d|, so one exponential per element; the
row's y = q n / z is written as the row goes. That reads q, k, v and writes y once (the chunked torch form makes about
ten passes over each unit). Large outputs are advised onto huge pages (Linux), so that glibc's fresh mapping of y costs
32 faults of 2 MB instead of 16k of 4 KB. For training the pass also saves each row's n / z and log Z, and the backward
is one reverse pass per channel (`scan_back`) whose carries are scaled by Z_s / Z_(s+1) <= 1; float32 throughout,
gradients in the inputs' dtypes, the final state's key and mean differentiable too.

Everything else is the torch form (`aft_simple_chunk`), which this form is tested against: non-causal calls, an
initial state that needs a gradient, a NaN or infinite key or value when gradients are needed (the torch form's
NaN and gradients), float64, one key per head, a device other than the CPU, torch.compile's tracing, and any
machine where the kernel cannot be built. The kernel is C, compiled on first use with the
machine's C compiler (`CC`, which may carry arguments, else cc, gcc or clang) and kept in `AFT_NATIVE_CACHE`
(default ~/.cache/aft-native), written under a temporary name and renamed, so that a build killed half-way leaves
nothing that loads (a cache that cannot be written, or whose disk is full, builds in a temporary folder instead).

Loading a library runs its code, so only what this process's user built is loaded: the cache folder is created
0700 and refused when another user owns it or others may write to it; a library is named by the SHA-256 of its
bytes, which a record beside it holds, and is hashed again before it is loaded (a file planted under the name, or a
corrupt one, is built again). The content-addressed name also makes a rebuilt library load afresh in a process
that loaded an older one (the dynamic loader keeps what it loaded under a path). A compiler that hangs is killed
after a few seconds. A refused cache, a missing compiler, a build that fails, or a library that fails its check
against the torch form on a small input, is reported once as a warning and the torch form is used.
"""

import atexit
import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from .ops_aft_core import NEG, AFTState, check_state, mask_keys, pool_as_position
from .ops_aft_window import (
    aft_conv_recurrent,
    aft_local_chunk,
    aft_local_recurrent,
    aft_simple_chunk,
    aft_simple_exact,
    aft_simple_recurrent,
)

KERNEL_VERSION = 6
_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <pthread.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

int aft_native_version(void) { return KERNEL_VERSION; }

/* e^x for x <= 0, 0 below -87 (float32's smallest normal is e^-87.3); branch-free, so that the row loop
   vectorises: x log2 e = i + f with |f| <= 1/2, 2^f by its Taylor polynomial of degree 6 (error < 2e-7). */
static inline float exp_nonpositive(float x) {
    float keep = (float)(x > -87.0f);
    x = x > -87.0f ? x : -87.0f;
    float t = x * 1.44269504088896341f;
    float fi = __builtin_floorf(t + 0.5f);
    float f = t - fi;
    float p = 1.5353362e-4f;
    p = p * f + 1.3398874e-3f;
    p = p * f + 9.6184375e-3f;
    p = p * f + 5.5503340e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    int32_t bits, i = (int32_t)fi;
    __builtin_memcpy(&bits, &p, 4);
    bits += i << 23;
    __builtin_memcpy(&p, &bits, 4);
    return p * keep;
}

/* ln x for a normal float x > 0 (here z >= 1: the running max's own term is e^0); branch-free, so that the row
   loop vectorises: x = 2^e u with u in [sqrt(1/2), sqrt(2)), ln u = 2 atanh(s) with s = (u - 1) / (u + 1),
   |s| <= 0.172, by its series to s^9 (error < 1e-8). */
static inline float log_positive(float x) {
    int32_t bits;
    __builtin_memcpy(&bits, &x, 4);
    int32_t e = ((bits - 0x3f3504f3) >> 23);               /* 0x3f3504f3: sqrt(1/2) */
    bits -= e << 23;
    float u;
    __builtin_memcpy(&u, &bits, 4);
    float s = (u - 1.0f) / (u + 1.0f), s2 = s * s;
    float p = 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return (float)e * 0.693147180559945309f + 2.0f * s * p;
}

/* channels [0, w) of one sample, T rows; q, k, v rows qt, kt, vt floats apart, y rows S apart;
   m, n, z: the running state of the w channels (n and z scaled by e^-m; empty: m = NEG, n = z = 0).
   save: also each row's n / z and log Z = m + ln z (NEG while only padding was seen; rows S apart) for the
   backward. */
static inline __attribute__((always_inline)) void scan(
    const float *restrict q, long qt, const float *restrict k, long kt, const float *restrict v, long vt,
    float *restrict y, long S, float *restrict m, float *restrict n, float *restrict z, long T, long w, int save,
    float *restrict ys, float *restrict ls) {
    for (long t = 0; t < T; t++) {
        const float *restrict qr = q + t * qt, *restrict kr = k + t * kt, *restrict vr = v + t * vt;
        float *restrict yr = y + t * S;
        for (long c = 0; c < w; c++) {
            float kk = kr[c], mm = m[c];
            float d = kk - mm;
            float x = exp_nonpositive(-__builtin_fabsf(d));
            float real = (float)(kk > NEG_HALF);                 /* padding adds nothing */
            float up = (float)(d > 0.0f) * real;                    /* a new running max: rescale the pool */
            float e = real * (up + (1.0f - up) * x);
            float s = up * x + (1.0f - up);
            m[c] = up > 0.0f ? kk : mm;                             /* a select: 0 * -inf would be NaN */
            float bad = kk < NEG_HALF ? 0.0f : kk - kk;             /* a NaN or +inf key: NaN from here on */
            float ev = real > 0.0f ? e * vr[c] : 0.0f;              /* a padding value is never read */
            float nn = n[c] * s + ev + bad;                         /* (-inf is a key of weight 0) */
            float zz = z[c] * s + e;
            n[c] = nn;
            z[c] = zz;
            float inv = (float)(zz > 0.0f) / (zz > 0.0f ? zz : 1.0f);  /* only padding so far: 0 */
            yr[c] = qr[c] * nn * inv;
            if (save) {
                ys[t * S + c] = nn * inv;
                ls[t * S + c] = zz > 0.0f ? m[c] + log_positive(zz > 0.0f ? zz : 1.0f) : NEG_KEY;
            }
        }
    }
}

/* The gradients of y = q n / z for channels [0, w) of one sample, a reverse scan. With log Z_t = m_t + ln z_t (all
   positions up to t), g = dy q and ybar = n / z: dv_s = w_s a_s and dk_s = w_s (v_s a_s - b_s), where
   w_s = e^(k_s - log Z_s) <= 1 is position s's weight in row s and a_s = g_s + a_(s+1) Z_s / Z_(s+1),
   b_s = g_s ybar_s + b_(s+1) Z_s / Z_(s+1), every factor Z_s / Z_(s+1) <= 1 (Z never decreases). a, b come in as
   the carries from after the last row (the final state's gradients), in the last row's scale. Rows dy, ys, ls,
   dq, dk, dv S apart. */
static void scan_back(const float *restrict dy, const float *restrict q, long qt, const float *restrict k, long kt,
                      const float *restrict v, long vt, const float *restrict ys, const float *restrict ls,
                      float *restrict dq, float *restrict dk, float *restrict dv, long S, float *restrict a,
                      float *restrict b, long T, long w) {
    for (long t = T - 1; t >= 0; t--) {
        long o = t * S, on = (t + 1 < T ? t + 1 : t) * S;  /* the last row is its own successor: factor 1 */
        const float *restrict qr = q + t * qt, *restrict kr = k + t * kt, *restrict vr = v + t * vt;
        for (long c = 0; c < w; c++) {
            float l = ls[o + c], ln = ls[on + c], ybar = ys[o + c];
            float seen = (float)(l > NEG_HALF), d = l - ln;        /* rows of padding alone weigh nothing */
            float f = seen * exp_nonpositive(d < 0.0f ? d : 0.0f);
            float g = dy[o + c] * qr[c];
            float aa = g + a[c] * f, bb = g * ybar + b[c] * f;
            a[c] = aa;
            b[c] = bb;
            float kk = kr[c], x = kk - l;
            float real = (float)(kk > NEG_HALF) * seen;
            float wt = real * exp_nonpositive(real > 0.0f && x < 0.0f ? x : 0.0f);
            dq[o + c] = dy[o + c] * ybar;
            dv[o + c] = wt * aa;
            dk[o + c] = wt * (vr[c] * aa - bb);
        }
    }
}

typedef struct {
    const float *q, *k, *v;
    long qb, qt, kb, kt, vb, vt;
    float *y, *m, *n, *z;
    long B, T, S, c0, c1;
    float *ys, *ls;             /* saved for the backward, or NULL */
    const float *dy;            /* the backward's: dy in, dq, dk, dv out (m and n: its carries a and b) */
    float *dq, *dk, *dv;
} job_t;

static void *run(void *arg) {
    job_t *j = (job_t *)arg;
    for (long b = 0; b < j->B; b++) {
        long c = j->c0, s = b * j->S + c, o = b * j->T * j->S + c;
        if (j->ys)
            scan(j->q + b * j->qb + c, j->qt, j->k + b * j->kb + c, j->kt, j->v + b * j->vb + c, j->vt, j->y + o,
                 j->S, j->m + s, j->n + s, j->z + s, j->T, j->c1 - c, 1, j->ys + o, j->ls + o);
        else
            scan(j->q + b * j->qb + c, j->qt, j->k + b * j->kb + c, j->kt, j->v + b * j->vb + c, j->vt, j->y + o,
                 j->S, j->m + s, j->n + s, j->z + s, j->T, j->c1 - c, 0, 0, 0);
    }
    return 0;
}

static void *run_back(void *arg) {
    job_t *j = (job_t *)arg;
    for (long b = 0; b < j->B; b++) {
        long c = j->c0, s = b * j->S + c, o = b * j->T * j->S + c;
        scan_back(j->dy + o, j->q + b * j->qb + c, j->qt, j->k + b * j->kb + c, j->kt, j->v + b * j->vb + c, j->vt,
                  j->ys + o, j->ls + o, j->dq + o, j->dk + o, j->dv + o, j->S, j->m + s, j->n + s, j->T, j->c1 - c);
    }
    return 0;
}

static void advise_huge(float *x, long count) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t lo = ((uintptr_t)x + huge - 1) & ~(huge - 1), hi = (uintptr_t)(x + count) & ~(huge - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE);  /* advice only: an error changes nothing */
#endif
}

/* `job` over the channels [0, S), split between threads in blocks of 16 */
static void in_parallel(job_t job, void *(*work)(void *), int threads) {
    enum { MAX_THREADS = 64 };
    threads = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    long S = job.S, block = ((S + threads - 1) / threads + 15) / 16 * 16;
    pthread_t th[MAX_THREADS];
    job_t jobs[MAX_THREADS];
    int made[MAX_THREADS], count = 0;
    for (int i = 0; i < threads && i * block < S; i++, count++) {
        jobs[i] = job;
        jobs[i].c0 = i * block;
        jobs[i].c1 = i * block + block < S ? i * block + block : S;
    }
    for (int i = 1; i < count; i++) made[i] = pthread_create(&th[i], 0, work, &jobs[i]) == 0;
    work(&jobs[0]);
    for (int i = 1; i < count; i++) {
        if (made[i]) pthread_join(th[i], 0);
        else work(&jobs[i]);  /* no thread to be had: this one does it */
    }
}

/* y (B, T, S) contiguous and new; m, n, z (B, S) contiguous, updated in place; ys, ls (B, T, S) contiguous and
   new, or NULL: each row's n / z and log Z, for `aft_simple_causal_backward`; threads split the channels */
int aft_simple_causal(const float *q, long qb, long qt, const float *k, long kb, long kt, const float *v, long vb,
                      long vt, float *y, float *m, float *n, float *z, float *ys, float *ls, long B, long T, long S,
                      int threads) {
    advise_huge(y, B * T * S);
    if (ys) {
        advise_huge(ys, B * T * S);
        advise_huge(ls, B * T * S);
    }
    job_t job = {q, k, v, qb, qt, kb, kt, vb, vt, y, m, n, z, B, T, S, 0, S, ys, ls, 0, 0, 0, 0};
    in_parallel(job, run, threads);
    return 0;
}

/* dy, ys, ls (B, T, S) contiguous; q, k, v as the forward read them; dq, dk, dv (B, T, S) contiguous and new;
   a, b (B, S) contiguous: the carries from after the last row, used up */
int aft_simple_causal_backward(const float *dy, const float *q, long qb, long qt, const float *k, long kb, long kt,
                               const float *v, long vb, long vt, const float *ys, const float *ls, float *dq,
                               float *dk, float *dv, float *a, float *b, long B, long T, long S, int threads) {
    advise_huge(dq, B * T * S);
    advise_huge(dk, B * T * S);
    advise_huge(dv, B * T * S);
    job_t job = {q, k, v, qb, qt, kb, kt, vb, vt, 0, a, b, 0, B, T, S, 0, S, (float *)ys, (float *)ls, dy, dq, dk,
                 dv};
    in_parallel(job, run_back, threads);
    return 0;
}

static inline float max_nan(float a, float b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }

/* e^x for x <= 0 that keeps a NaN (torch.exp does) */
static inline float exp_step(float x) { float e = exp_nonpositive(x); return x != x ? x : e; }

/* One token of one sample (see aft_window_step): the state read from m0 .. wp0 and written to m .. wp (the same
   addresses from the second token on: every loop reads an element before it writes it). `same`, a constant where
   it is inlined, says Dk = Dv (key channel c weighs value channel c), else Dk = 1 (a head's key weighs its Dv
   values), so that the channel loops run contiguous, without divisions. */
static inline __attribute__((always_inline)) void window_token(
    const float *qr, const float *kr, const float *vr, int pad, const float *kern, const float *ut, const float *pt,
    long R, const float *m0, const float *n0, const float *z0, const float *wk0, const float *wv0, const float *wp0,
    float *yr, float *m, float *n, float *z, float *wk, float *wv, float *wp, long H, long Dk, long Dv, long S,
    float *scratch, const int same) {
    const long HK = H * Dk, HV = H * Dv, s = S + 1;
    float *e = scratch, *ref = e + s * HK, *sc = ref + HK, *den = sc + HK, *kcur = den + HK, *ab = kcur + HK;
    float *vcur = ab + HK, *acc = vcur + HV, *wf = acc + HV;
    /* padding and -inf keys are NEG, their values 0 (NaN stays NaN) */
    for (long c = 0; c < HK; c++) kcur[c] = pad || kr[c] < NEG_KEY ? NEG_KEY : kr[c];
    for (long h = 0; h < H; h++)
        for (long d = 0; d < Dv; d++) {
            long cv = h * Dv + d, kc = h * Dk + (same ? d : 0);
            vcur[cv] = kcur[kc] > NEG_HALF ? vr[cv] : 0.0f;
        }
    /* the position bias of each slot: u_t . p_j, p_S = pv_t (local); the kernel's column j (conv) */
    for (long j = 0; j < s && !kern; j++) {
        const float *pj = j < S ? wp0 + j * R : pt;
        float sum = 0.0f;
        for (long r = 0; r < R; r++) sum += ut[r] * pj[r];
        wf[j] = sum;
    }
    for (long c = 0; c < HK; c++) ref[c] = m0[c];
    for (long j = 0; j < s; j++) {
        const float *kj = j < S ? wk0 + j * HK : kcur;
        float *ej = e + j * HK;
        for (long h = 0; h < H; h++) {
            float bias = kern ? kern[h * s + j] : wf[j];
            for (long d = 0; d < Dk; d++) {
                long c = h * Dk + d;
                float x = kj[c] + bias;
                ej[c] = x;
                ref[c] = max_nan(ref[c], x);
            }
        }
    }
    for (long c = 0; c < HK; c++) {
        sc[c] = exp_step(m0[c] - ref[c]);
        den[c] = z0[c] * sc[c];
    }
    for (long j = 0; j < s; j++) {
        float *ej = e + j * HK;
        for (long c = 0; c < HK; c++) {
            ej[c] = exp_step(ej[c] - ref[c]);
            den[c] += ej[c];
        }
    }
    /* y = q (n e^(m - ref) + sum_j e_j v_j) / den, summed slot by slot */
    for (long h = 0; h < H; h++)
        for (long d = 0; d < Dv; d++) {
            long cv = h * Dv + d, kc = h * Dk + (same ? d : 0);
            acc[cv] = n0[cv] * sc[kc];
        }
    for (long j = 0; j < s; j++) {
        const float *ej = e + j * HK, *vj = j < S ? wv0 + j * HV : vcur;
        for (long h = 0; h < H; h++)
            for (long d = 0; d < Dv; d++) {
                long cv = h * Dv + d, kc = h * Dk + (same ? d : 0);
                acc[cv] += ej[kc] * vj[cv];
            }
    }
    for (long h = 0; h < H; h++)
        for (long d = 0; d < Dv; d++) {
            long cv = h * Dv + d, kc = h * Dk + (same ? d : 0);
            /* only padding so far: y = 0 (a NaN reference has seen something: NaN) */
            yr[cv] = ref[kc] <= NEG_HALF ? 0.0f : qr[cv] * (acc[cv] / den[kc]);
        }
    /* the oldest slot (the token itself when S = 0) joins the pool; padding adds nothing */
    const float *k0 = S > 0 ? wk0 : kcur, *v0 = S > 0 ? wv0 : vcur;
    for (long c = 0; c < HK; c++) {
        float mm = max_nan(m0[c], k0[c]);
        float real = (float)(k0[c] > NEG_HALF);
        sc[c] = exp_step(m0[c] - mm);
        ab[c] = exp_step(k0[c] - mm);
        z[c] = z0[c] * sc[c] + real * ab[c];
        m[c] = mm;
        den[c] = real;
    }
    for (long h = 0; h < H; h++)
        for (long d = 0; d < Dv; d++) {
            long cv = h * Dv + d, kc = h * Dk + (same ? d : 0);
            n[cv] = n0[cv] * sc[kc] + (den[kc] > 0.0f ? v0[cv] : 0.0f) * ab[kc];
        }
    /* the window moves by one, in the one copy (slot j + 1 of the old window is slot j of the new) */
    if (S > 0) {
        __builtin_memmove(wk, wk0 + HK, sizeof(float) * (S - 1) * HK);
        __builtin_memmove(wv, wv0 + HV, sizeof(float) * (S - 1) * HV);
        __builtin_memcpy(wk + (S - 1) * HK, kcur, sizeof(float) * HK);
        __builtin_memcpy(wv + (S - 1) * HV, vcur, sizeof(float) * HV);
        if (R > 0) {
            __builtin_memmove(wp, wp0 + R, sizeof(float) * (S - 1) * R);
            __builtin_memcpy(wp + (S - 1) * R, pt, sizeof(float) * R);
        }
    }
}

/* One or more tokens of the recurrent form of simple, local and conv (the (m, n, z) pool of docs/operator.md, section
   7, plus a window of the last S positions), op for op the torch form's step: the window slots' logits key + bias
   against the running max,
   y = q (n e^(m - ref) + sum e v) / (z e^(m - ref) + sum e), then the oldest slot joins the pool and the window
   moves by one. q, k, v: rows (b, t) at b * xb + t * xt, each H x D contiguous; k has Dk = Dv (simple, local) or
   Dk = 1 (conv) channels per head. mask (b, t): 0 is padding, or NULL; padding and -inf keys become NEG with
   value 0. The bias of slot j: kern
   (H, S + 1) per head (conv), else u_t . p_j over R factors, p_j the window's pos (B, S, R) and p_S = pv_t
   (local), else 0. The state m0, n0, z0, wk0, wv0, wp0 (contiguous, not changed) is read and its successor
   written to m .. wp (contiguous, new); y (B, T, H, Dv) contiguous. */
int aft_window_step(const float *q, long qb, long qt, const float *k, long kb, long kt, const float *v, long vb,
                    long vt, const float *mask, long mb, long mt, const float *kern, const float *pu, long pub,
                    long put, const float *pv, long pvb, long pvt, long R, const float *m0, const float *n0,
                    const float *z0, const float *wk0, const float *wv0, const float *wp0, float *y, float *m,
                    float *n, float *z, float *wk, float *wv, float *wp, long B, long T, long H, long Dk, long Dv,
                    long S) {
    const long HK = H * Dk, HV = H * Dv, s = S + 1;
    if (T == 0) {  /* no token: the state as it was */
        __builtin_memcpy(m, m0, sizeof(float) * B * HK);
        __builtin_memcpy(n, n0, sizeof(float) * B * HV);
        __builtin_memcpy(z, z0, sizeof(float) * B * HK);
        __builtin_memcpy(wk, wk0, sizeof(float) * B * S * HK);
        __builtin_memcpy(wv, wv0, sizeof(float) * B * S * HV);
        __builtin_memcpy(wp, wp0, sizeof(float) * B * S * R);
        return 0;
    }
    float *scratch = malloc(sizeof(float) * (s * HK + 5 * HK + 2 * HV + s + 1));
    if (!scratch) return 1;
    for (long t = 0; t < T; t++) {
        for (long b = 0; b < B; b++) {
            /* the first token reads the state passed, every later one the state the token before wrote */
            const float *mc = t ? m : m0, *nc = t ? n : n0, *zc = t ? z : z0;
            const float *wkc = t ? wk : wk0, *wvc = t ? wv : wv0, *wpc = t ? wp : wp0;
            int pad = mask && mask[b * mb + t * mt] == 0.0f;
            const float *ut = pu ? pu + b * pub + t * put : 0, *pt = pv ? pv + b * pvb + t * pvt : 0;
            const float *qr = q + b * qb + t * qt, *kr = k + b * kb + t * kt, *vr = v + b * vb + t * vt;
#define WINDOW_TOKEN(same)                                                                                        \
    window_token(qr, kr, vr, pad, kern, ut, pt, R, mc + b * HK, nc + b * HV, zc + b * HK, wkc + b * S * HK,      \
                 wvc + b * S * HV, wpc + b * S * R, y + (b * T + t) * HV, m + b * HK, n + b * HV, z + b * HK,     \
                 wk + b * S * HK, wv + b * S * HV, wp + b * S * R, H, Dk, Dv, S, scratch, same)
            if (Dk == Dv) WINDOW_TOKEN(1);
            else WINDOW_TOKEN(0);
#undef WINDOW_TOKEN
        }
    }
    free(scratch);
    return 0;
}
"""
_SOURCE = (
    f"#define KERNEL_VERSION {KERNEL_VERSION}\n#define NEG_HALF {NEG / 2:.1e}f\n#define NEG_KEY {NEG:.1e}f\n" + _SOURCE
)
# Vectorising the row loop needs -fno-trapping-math (IEEE semantics otherwise kept: NaN and inf propagate);
# -march=native where the compiler takes it, so the library is built for this machine only.
FLAGS = ["-O3", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-fno-trapping-math"]
# Below this many elements one thread does it all (starting threads costs more than they save).
THREAD_ELEMENTS = 2**16

# Seconds a compiler may take to say its version, and to build the kernel (about a second on an idle machine).
VERSION_TIMEOUT = 10
BUILD_TIMEOUT = 60

_library = None  # the loaded kernel, or the reason there is none (str)


def _compiler() -> list[str] | None:
    """The compiler's command (its path, then any arguments CC carries); None when there is none. A CC that names
    no command is an error, not a reason to use another compiler."""
    if os.environ.get("CC", "").strip():
        cc = os.environ["CC"]
        words = shlex.split(cc)
        found = shutil.which(words[0])
        if found is None:
            raise RuntimeError(f"CC={cc!r} is not a command (unset CC to use cc, gcc or clang)")
        return [found, *words[1:]]
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [shutil.which(name)]
    return None


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `command` in a session of its own, killed with everything it started after `timeout` seconds (a wrapper
    script's child would otherwise keep the pipes open, and the caller waiting, after the wrapper is killed)."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"{shlex.join(command)[:200]} did not finish within {timeout} s") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _machine_key(cc: list[str]) -> str:
    """What the library depends on: the source, the flags, the compiler and this CPU's instruction set."""
    parts = [_SOURCE, " ".join(FLAGS), *cc, platform.machine(), platform.system()]
    with contextlib.suppress(OSError):
        parts.append(_run([*cc, "--version"], VERSION_TIMEOUT).stdout)
    with contextlib.suppress(OSError):  # -march=native: a library built on another CPU must not be loaded here
        parts += [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")][:1]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def cache_dir() -> Path:
    """Where built libraries are kept: AFT_NATIVE_CACHE, else $XDG_CACHE_HOME/aft-native or ~/.cache/aft-native."""
    if os.environ.get("AFT_NATIVE_CACHE"):
        return Path(os.environ["AFT_NATIVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aft-native"


def _check_private(folder: Path) -> None:
    """Refuse a folder another user owns or others may write to: a library planted there would run as this user."""
    info = folder.stat()
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.getuid() or mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"the cache folder {folder} is not this user's own (owner uid {info.st_uid}, mode {mode:04o}; "
            f"this user is uid {os.getuid()}): a library there could have been put by another. Use a folder only "
            "you can write (chmod go-w, or AFT_NATIVE_CACHE)"
        )


def _cache() -> Path | None:
    """The cache folder, created 0700 (None when it cannot be created: a read-only parent, a file there)."""
    folder = cache_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # the umask can only take rights away
    except OSError:
        return None
    if not folder.is_dir():
        return None
    _check_private(folder)
    return folder


def _writable(folder: Path | None) -> Path:
    """`folder` when a library can be written there, else a folder of this process's own."""
    if folder is not None:
        with contextlib.suppress(OSError), tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            return folder
    return _own_dir()


def _own_dir() -> Path:
    """A temporary folder of this process's own (0700), removed at its exit."""
    own = tempfile.mkdtemp(prefix="aft-native-")
    atexit.register(shutil.rmtree, own, True)
    return Path(own)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _library_path(folder: Path, key: str, digest: str) -> Path:
    return folder / f"aft_native_{key}_{digest[:32]}.so"


def _record_path(folder: Path, key: str) -> Path:
    return folder / f"aft_native_{key}.sha256"


def _build(cc: list[str], folder: Path, key: str) -> tuple[Path, str]:
    """Compile in a temporary folder inside `folder`, then rename the library to its content-addressed name there
    (atomic: no half library under a name that loads). -> (its path, its SHA-256)."""
    work = Path(tempfile.mkdtemp(dir=folder, prefix=f".aft_native_{key}-"))
    try:
        src, out = work / "aft_native.c", work / "aft_native.so"  # fixed names: the same source, the same bytes
        src.write_text(_SOURCE)
        errors = ""
        for extra in (["-march=native"], []):  # some compilers refuse -march=native
            done = _run([*cc, *FLAGS, *extra, "-o", str(out), str(src)], BUILD_TIMEOUT)
            if done.returncode == 0:
                digest = _sha256(out)
                target = _library_path(folder, key, digest)
                os.replace(out, target)
                return target, digest
            errors = done.stderr.strip()[-2000:]
        raise RuntimeError(f"{shlex.join(cc)} failed: {errors}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _record(folder: Path, key: str, digest: str) -> None:
    """Write which library was built and checked (after the library, atomically); a cache that cannot take it
    simply builds again next time."""
    with contextlib.suppress(OSError):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".record-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(digest + "\n")
            os.replace(tmp, _record_path(folder, key))
        finally:
            Path(tmp).unlink(missing_ok=True)


def _load(path: Path, digest: str):
    """dlopen `path` if its bytes still hash to `digest` (else RuntimeError, before any of its code runs)."""
    if _sha256(path) != digest:
        raise RuntimeError(f"{path} is not the library that was built (its SHA-256 differs from the record)")
    lib = ctypes.CDLL(str(path))
    if lib.aft_native_version() != KERNEL_VERSION:
        raise RuntimeError(f"{path} is kernel version {lib.aft_native_version()}, not {KERNEL_VERSION}")
    lib.aft_simple_causal.restype = ctypes.c_int
    lib.aft_simple_causal.argtypes = [
        *(ctypes.c_void_p, ctypes.c_long, ctypes.c_long) * 3,
        *(ctypes.c_void_p,) * 6,
        *(ctypes.c_long,) * 3,
        ctypes.c_int,
    ]
    lib.aft_simple_causal_backward.restype = ctypes.c_int
    lib.aft_simple_causal_backward.argtypes = [
        ctypes.c_void_p,
        *(ctypes.c_void_p, ctypes.c_long, ctypes.c_long) * 3,
        *(ctypes.c_void_p,) * 7,
        *(ctypes.c_long,) * 3,
        ctypes.c_int,
    ]
    lib.aft_window_step.restype = ctypes.c_int
    lib.aft_window_step.argtypes = [
        *(ctypes.c_void_p, ctypes.c_long, ctypes.c_long) * 4,
        ctypes.c_void_p,
        *(ctypes.c_void_p, ctypes.c_long, ctypes.c_long) * 2,
        ctypes.c_long,
        *(ctypes.c_void_p,) * 13,
        *(ctypes.c_long,) * 6,
    ]
    return lib


def _self_check(lib) -> None:
    """The kernel, forward and backward, against the torch form on a small input with padding: a miscompiled library
    is not used."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 37, 2, 24
    q, k, v = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float32) for _ in range(3))
    k = k * 8
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :5] = 0
    want = aft_simple_exact(q, k, v, mask=mask, output_final_state=True)
    got = _forward(lib, q, k, v, mask, None)
    if not torch.allclose(got[0], want[0], rtol=1e-4, atol=1e-5):
        gap = (got[0] - want[0]).abs().max()
        raise RuntimeError(f"the built kernel's output differs from the torch form's by {gap:.3g}")
    # the backward, the final state's gradients included
    grads = [torch.randn(x.shape, generator=gen) for x in (q, want[1].m, want[1].n)]
    with torch.enable_grad():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        y, key, mean, _ = _NativeSimple.apply(*leaves, lib, mask, None)
        got = torch.autograd.grad((y, key, mean), leaves, grads)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        y, state = aft_simple_exact(*leaves, mask=mask, output_final_state=True)
        want_grads = torch.autograd.grad((y, state.m, state.n), leaves, grads)
    for a, b in zip(got, want_grads, strict=True):
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item())):
            raise RuntimeError(
                f"the built kernel's gradients differ from the torch form's by {(a - b).abs().max():.3g}"
            )
    # the decoding step, with a window, factors and padding, three tokens on from a prefilled state
    pos_u, pos_v = (torch.randn(1, T, 3, generator=gen) for _ in range(2))
    _, state = aft_local_chunk(q[:, :-3], k[:, :-3], v[:, :-3], pos_u[:, :-3], pos_v[:, :-3], 5, mask=mask[:, :-3],
                               output_final_state=True)  # fmt: skip
    tail = (q[:, -3:], k[:, -3:], v[:, -3:], pos_u[:, -3:], pos_v[:, -3:], 5)
    want, want_state = aft_local_recurrent(*tail, initial_state=state, output_final_state=True)
    got, got_state = _step(lib, tail[:3], state, 4, mask=None, pos=tail[3:5])
    for a, b in zip((got, *got_state), (want, *want_state), strict=True):
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"the built decoding step differs from the torch form's by {(a - b).abs().max():.3g}")


def library():
    """The loaded kernel, or None when it cannot be had on this machine (`unavailable_reason()` says why)."""
    global _library
    if _library is None:
        try:
            _library = _find_or_build()
        except Exception as error:  # noqa: BLE001  (any failure means: use the torch form)
            _library = f"{type(error).__name__}: {error}"
            warnings.warn(
                f'aft_implementation="native": the compiled kernel is not available ({_library}); the torch form '
                "of AFT-simple is used instead (same results, slower).",
                RuntimeWarning,
                stacklevel=3,
            )
    return None if isinstance(_library, str) else _library


def unavailable_reason() -> str | None:
    return _library if isinstance(_library, str) else None


def _find_or_build():
    if sys.platform == "win32":
        raise RuntimeError("the kernel is built with a POSIX C compiler and threads; not on Windows")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc, gcc or clang)")
    key = _machine_key(cc)
    cache = _cache()
    if cache is not None:
        with contextlib.suppress(OSError, ValueError, RuntimeError, AttributeError):
            digest = _record_path(cache, key).read_text().strip()
            if len(digest) == 64:
                lib = _load(_library_path(cache, key, digest), digest)
                _self_check(lib)
                return lib
        # no record, or a corrupt, foreign or failing library: build again (beside it when the folder can be written)
    folder = _writable(cache)
    try:
        path, digest = _build(cc, folder, key)
    except (OSError, RuntimeError) as error:
        if folder == cache and "did not finish" not in str(error):
            folder = _own_dir()  # the cache's disk may be full: once more in a folder of this process's own
            path, digest = _build(cc, folder, key)
        else:
            raise
    lib = _load(path, digest)
    _self_check(lib)
    _record(folder, key, digest)
    return lib


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) in float32 with its (H, D) contiguous (any batch and row stride)."""
    x = x if x.dtype == torch.float32 else x.to(torch.float32)
    if x.stride(3) != 1 or x.stride(2) != x.shape[3]:
        x = x.contiguous()
    return x


def _threads(x: torch.Tensor) -> int:
    return torch.get_num_threads() if x.numel() >= THREAD_ELEMENTS else 1


def _scan(lib, q, k, v, mask, initial_state, save: bool):
    """The kernel's forward: k masked here. -> y (float32), the pool (m, n, z) after the last row, the inputs as
    the kernel read them (q, k masked, v in float32), and with `save` each row's (n / z, log Z) for the backward."""
    B, T, H, D = k.shape
    # the kernel weighs keys below NEG / 2 (-inf too) as padding: float32 keys without a mask as they are (no copy
    # for the forward to make, nor for the backward to keep)
    k = _rows(k if mask is None and k.dtype == torch.float32 else mask_keys(k, mask))
    q, v = _rows(q), _rows(v)
    f32 = {"dtype": torch.float32}  # whatever torch's default dtype is: the kernel writes float32
    if initial_state is None:
        m = torch.full((B, H, D), NEG, **f32)
        n, z = torch.zeros(B, H, D, **f32), torch.zeros(B, H, D, **f32)
    else:
        check_state(initial_state, k, v)
        m, n, z = (x.to(torch.float32).clone(memory_format=torch.contiguous_format) for x in initial_state[:3])
    y = torch.empty(B, T, H, D, **f32)
    saved = tuple(torch.empty(B, T, H, D, **f32) for _ in range(2)) if save else (None,) * 2
    lib.aft_simple_causal(
        q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
        v.stride(1), y.data_ptr(), m.data_ptr(), n.data_ptr(), z.data_ptr(),
        *(x.data_ptr() if x is not None else None for x in saved), B, T, H * D, _threads(y),
    )  # fmt: skip
    return y, (m, n, z), (q, k, v), saved


def _state(k, v, key, mean) -> AFTState:
    """The torch forms' state from the pool as one position (`pool_as_position`): key its log-sum, mean its mean,
    z = 1 (empty: NEG, 0, 0)."""
    B, _, H, D = k.shape
    return AFTState(
        m=key,
        n=mean,
        z=(key > NEG / 2).to(torch.float32),
        k=k.new_full((B, 0, H, D), NEG, dtype=torch.float32),
        v=v.new_zeros(B, 0, H, D, dtype=torch.float32),
        pos=k.new_zeros(B, 0, 0, dtype=torch.float32),
    )


def _forward(lib, q, k, v, mask, initial_state):
    """The kernel's call without gradients -> y in float32 and the final state (the torch forms' convention)."""
    y, pool, _, _ = _scan(lib, q, k, v, mask, initial_state, save=False)
    return y, _state(k, v, *pool_as_position(*pool))


class _NativeSimple(torch.autograd.Function):
    """y = q n / z by the kernel, forward and backward (`scan_back` in the C source): gradients of q, k, v and of
    the final state's key and mean; the initial state takes none (a caller whose state needs one uses the torch
    form). `finite` (a 0-d bool output): the last row's pool is finite, so no NaN or infinite key or value was met
    (else the caller uses the torch form, whose gradients then are its own)."""

    @staticmethod
    def forward(ctx, q, k, v, lib, mask, initial_state):
        y, (m, n, z), read, saved = _scan(lib, q, k, v, mask, initial_state, save=True)
        key, mean = pool_as_position(m, n, z)
        finite = torch.isfinite(n).all()
        ctx.save_for_backward(*read, *saved, z)
        ctx.lib, ctx.dtypes = lib, (q.dtype, k.dtype, v.dtype)
        ctx.mark_non_differentiable(finite)
        return y.to(q.dtype), key, mean, finite

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dkey, dmean, _):
        q, k, v, ys, ls, z = ctx.saved_tensors
        B, T, H, D = k.shape
        dy = _f32(dy)
        # the final state as a row after the last, in its scale: its mean is the last row's n / z (a gradient like
        # g's) and its key log Z (each position's weight there: the b carry's)
        a = dmean.to(torch.float32).clone() if dmean is not None else torch.zeros(B, H, D, dtype=torch.float32)
        b = a * ys[:, -1]
        if dkey is not None:
            b -= torch.where(z > 0, dkey.to(torch.float32), 0.0)
        dq, dk, dv = (torch.empty(B, T, H, D, dtype=torch.float32) for _ in range(3))
        ctx.lib.aft_simple_causal_backward(
            dy.data_ptr(), q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
            v.data_ptr(), v.stride(0), v.stride(1), ys.data_ptr(), ls.data_ptr(), dq.data_ptr(), dk.data_ptr(),
            dv.data_ptr(), a.data_ptr(), b.data_ptr(), B, T, H * D, _threads(dq),
        )  # fmt: skip
        grads = (
            g.to(dtype) if need else None
            for g, dtype, need in zip((dq, dk, dv), ctx.dtypes, ctx.needs_input_grad[:3], strict=True)
        )
        return *grads, None, None, None


def _uses_kernel(q, k, v, causal, initial_state, same_keys=True) -> bool:
    tensors = [q, k, v, *(initial_state[:3] if initial_state is not None else ())]
    return (
        causal
        and (q.shape == k.shape == v.shape or not same_keys)  # one key per channel (else the torch form)
        and k.dim() == 4
        and k.shape[0] * k.shape[1] > 0
        and all(x.device.type == "cpu" and x.dtype != torch.float64 for x in tensors)
        and not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors[3:]))
        and not torch.compiler.is_compiling()
    )


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))


def aft_simple_native(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    """Causal AFT-simple by the compiled kernel where it applies (see the module's text), else `aft_simple_chunk`.
    q, k, v: (B, T, H, D)."""
    if _uses_kernel(q, k, v, causal, initial_state):
        lib = library()
        if lib is not None and not _needs_grad(q, k, v):
            y, state = _forward(lib, q, k, v, mask, initial_state)
            return y.to(q.dtype), (state if output_final_state else None)
        if lib is not None:
            y, key, mean, finite = _NativeSimple.apply(q, k, v, lib, mask, initial_state)
            if finite:  # else a NaN or infinite input: the torch form, NaN where it has NaN
                return y, (_state(k, v, key, mean) if output_final_state else None)
    return aft_simple_chunk(
        q, k, v, causal=causal, mask=mask, initial_state=initial_state, output_final_state=output_final_state
    )


# The decoding step of simple, local and conv: the recurrent forms' step (op for op, in float32) as one call per
# layer instead of some sixty small torch operators.


def _f32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 and contiguous (itself when it is: a decoding step is a few microseconds of work)."""
    x = x if x.dtype == torch.float32 else x.to(torch.float32)
    return x if x.is_contiguous() else x.contiguous()


def _step(lib, qkv, state, slots, mask=None, kernel=None, pos=None):
    """The kernel's recurrent step on tokens (B, T, H, D) from `state` (not changed): -> y (float32) and the new
    state. `kernel` (H, s) for conv, `pos` = (pos_u, pos_v) (B|1, T, R) for local."""
    q, k, v = (_rows(x) for x in qkv)
    B, T, H, Dk = k.shape
    Dv = v.shape[3]
    old = [_f32(x) for x in state]
    new = [torch.empty(x.shape, dtype=torch.float32) for x in old]
    y = torch.empty(B, T, H, Dv, dtype=torch.float32)
    if mask is not None and mask.dtype != torch.float32:
        mask = mask.to(torch.float32)
    pu = pv = None
    if pos is not None:
        pu, pv = (_f32(x) for x in pos)

    def rows(x):  # (pointer, batch stride, row stride), a batch of one shared by every row
        if x is None:
            return None, 0, 0
        return x.data_ptr(), x.stride(0) if x.shape[0] > 1 else 0, x.stride(1)

    lib.aft_window_step(
        *rows(q), *rows(k), *rows(v), *rows(mask), _f32(kernel).data_ptr() if kernel is not None else None,
        *rows(pu), *rows(pv), pu.shape[2] if pu is not None else 0,
        *(x.data_ptr() for x in old), y.data_ptr(), *(x.data_ptr() for x in new), B, T, H, Dk, Dv, slots,
    )  # fmt: skip
    return y, AFTState(*new)


def _step_applies(q, k, v, causal, mask, state, slots, rank, extra=()) -> bool:
    tensors = [q, k, v, *extra]
    if state is None or not causal or not _uses_kernel(q, k, v, causal, None, same_keys=False):
        return False
    B, _, H, Dk = k.shape
    Dv = v.shape[3]
    shapes = [(B, H, Dk), (B, H, Dv), (B, H, Dk), (B, slots, H, Dk), (B, slots, H, Dv), (B, slots, rank)]
    return (
        q.shape == v.shape
        and k.shape[:3] == q.shape[:3]  # the kernel reads every row of q, k and v: no shape it does not expect
        and (Dk == Dv or Dk == 1)
        and (mask is None or tuple(mask.shape) == (B, k.shape[1]))
        and all(x.device.type == "cpu" and x.dtype != torch.float64 for x in tensors)
        and all(tuple(x.shape) == shape and x.dtype == torch.float32 for x, shape in zip(state, shapes, strict=True))
        and not (torch.is_grad_enabled() and any(x.requires_grad for x in (*tensors, *state)))
    )


def _native_step(recurrent, slots, rank, extra, q, k, v, causal, mask, initial_state, output_final_state, **bias):
    if _step_applies(q, k, v, causal, mask, initial_state, slots, rank, extra):
        lib = library()
        if lib is not None:
            y, state = _step(lib, (q, k, v), initial_state, slots, mask=mask, **bias)
            return (y if q.dtype == torch.float32 else y.to(q.dtype)), (state if output_final_state else None)
    return recurrent(causal=causal, mask=mask, initial_state=initial_state, output_final_state=output_final_state)


def aft_simple_native_recurrent(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    """`aft_simple_recurrent` by the compiled kernel where it applies (a float32 state on the CPU, no gradients,
    not under torch.compile's tracing), else that torch form."""

    def torch_form(**kw):
        return aft_simple_recurrent(q, k, v, **kw)

    return _native_step(torch_form, 0, 0, (), q, k, v, causal, mask, initial_state, output_final_state)


def aft_local_native_recurrent(
    q, k, v, pos_u, pos_v, window, *, causal=True, mask=None, initial_state=None, output_final_state=False
):
    """`aft_local_recurrent` by the compiled kernel where it applies, else that torch form."""

    def torch_form(**kw):
        return aft_local_recurrent(q, k, v, pos_u, pos_v, window, **kw)

    rank = pos_u.shape[-1]
    ok = (
        window >= 1
        and pos_u.dim() == 3
        and pos_u.shape == pos_v.shape
        and pos_u.shape[0] in (1, k.shape[0])
        and pos_u.shape[1] == k.shape[1]
    )
    return _native_step(
        torch_form, window - 1 if ok else -1, rank, (pos_u, pos_v), q, k, v, causal, mask, initial_state,
        output_final_state, pos=(pos_u, pos_v),
    )  # fmt: skip


def aft_conv_native_recurrent(
    q, k, v, kernel, *, causal=True, mask=None, initial_state=None, output_final_state=False
):
    """`aft_conv_recurrent` by the compiled kernel where it applies, else that torch form."""

    def torch_form(**kw):
        return aft_conv_recurrent(q, k, v, kernel, **kw)

    ok = kernel.dim() == 2 and kernel.shape[0] == k.shape[2]
    return _native_step(
        torch_form, kernel.shape[-1] - 1 if ok else -1, 0, (kernel,), q, k, v, causal, mask, initial_state,
        output_final_state, kernel=kernel,
    )  # fmt: skip


def is_native_ready() -> bool:
    """Build (or find) the kernel now; False where it is not available. For a caller that wants to know before it
    runs a model."""
    return library() is not None


__all__ = [
    "aft_conv_native_recurrent",
    "aft_local_native_recurrent",
    "aft_simple_native",
    "aft_simple_native_recurrent",
    "cache_dir",
    "is_native_ready",
    "library",
    "unavailable_reason",
]
