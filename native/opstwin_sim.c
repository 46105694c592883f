/* OpsTwin Monte Carlo kernel v2: see opstwin_sim.h and SPEC.md.
 *
 * Where the time goes, and why the code is shaped like this (issue 15):
 *   - Paths advance in lockstep blocks of 64 over tiles of steps. A block's noise for a tile is
 *     drawn into a small buffer first (a vectorised ziggurat over eight xoshiro lanes), then one
 *     straight update loop per step runs over the 64 paths, which the compiler vectorises.
 *   - Outputs are written step-major into a tile buffer that stays in cache: every step's column
 *     of all paths is contiguous for the percentile stage, and the whole trajectory is never
 *     held (its memory was 48 MB and 12,000 page faults per call at 10,000 x 600).
 *   - Per-step percentiles are exact order statistics found together in ~3 passes (min/max,
 *     bucket histogram, gather of the few target buckets) instead of six quickselects.
 *   - Threads share each tile: blocks split between them, then the tile's steps; one barrier
 *     per tile (two tile buffers alternate). Numbers never depend on the thread count.
 * AVX2 versions of the hot loops are chosen at run time; the portable versions compute the
 * same IEEE operations in the same order (no FMA contraction: -ffp-contract=off), so the
 * results are bit-identical either way (tests check this).
 */
#define _POSIX_C_SOURCE 200809L

#include "opstwin_sim.h"
#include "ziggurat_tables.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2 1
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2")))
#else
#define HAVE_AVX2 0
#endif
#define INLINE static inline __attribute__((always_inline))

#define MAX_THREADS 64
#define MAX_REDRAWS 100
#define BP OPSTWIN_BLOCK_PATHS /* paths per block */
#define LANES 8                /* noise lanes per block (two AVX2 registers of four) */
#define FLOOR_BLOCK 65536
#define FLOOR_CHUNK 4096
#ifndef TILE_BYTES
#define TILE_BYTES (1024 * 1024) /* one tile buffer: outputs x steps x paths x 8 bytes */
#endif
#define MAX_TILE 64
#define N_TARGETS (2 * OPSTWIN_N_PERCENTILES)
#define CHUNK_BLOCKS 4 /* blocks a thread takes at a time within a tile */

static const double PCTS[OPSTWIN_N_PERCENTILES] = {5, 25, 50, 75, 95, 99};

/* ------------------------------------------------------------------ public: messages */

const char *opstwin_sim_strerror(int code)
{
    switch (code) {
    case OPSTWIN_OK: return "success";
    case OPSTWIN_E_NULL: return "NULL pointer argument";
    case OPSTWIN_E_MODEL_KIND: return "unknown model kind";
    case OPSTWIN_E_DIST: return "invalid parameter distribution (unknown kind, non-finite, sd < 0 or lo > hi)";
    case OPSTWIN_E_DOMAIN: return "parameter outside its valid domain (after 100 redraws)";
    case OPSTWIN_E_DIMS: return "state-space dimensions out of range (n <= 8, m <= 4, p <= 4)";
    case OPSTWIN_E_NONFINITE: return "non-finite value (NaN or inf) in model, input or constraint";
    case OPSTWIN_E_NOISE: return "noise level negative or not finite";
    case OPSTWIN_E_INPUT: return "invalid input profile";
    case OPSTWIN_E_PATHS: return "number of paths must be >= 1";
    case OPSTWIN_E_STEPS: return "number of steps out of range (1..1000000)";
    case OPSTWIN_E_DT: return "dt must be finite and > 0";
    case OPSTWIN_E_CONSTRAINT: return "invalid constraint";
    case OPSTWIN_E_OUTPUT: return "output buffer missing or too small";
    case OPSTWIN_E_TOO_LARGE: return "paths x steps too large";
    case OPSTWIN_E_NOMEM: return "out of memory";
    case OPSTWIN_E_DIVERGED: return "simulation produced a non-finite output";
    case OPSTWIN_E_ADAPTIVE: return "invalid adaptive settings (batch >= 1, max_paths >= 1, rse_target > 0)";
    case OPSTWIN_E_THREADS: return "threads must be >= 0";
    default: return "unknown error";
    }
}

/* ------------------------------------------------------------------ RNG */

typedef struct { uint64_t s[4]; } rng_t;

#define GOLDEN 0x9e3779b97f4a7c15ULL

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(rng_t *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[0] + s[3], 23) + s[0];
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* Stream `id` of a seed: its four state words are splitmix64 outputs 4*id+1 .. 4*id+4 of the
 * seed (mix64(seed + n*GOLDEN)), so any stream is found in O(1), by any thread. */
static void stream_seed(rng_t *r, uint64_t seed, uint64_t id)
{
    for (int w = 0; w < 4; w++) r->s[w] = mix64(seed + (4 * id + (uint64_t)w + 1) * GOLDEN);
}

/* [0, 1) */
static double rng_uniform(rng_t *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }
/* (0, 1] */
static double rng_uniform_pos(rng_t *r) { return (double)((rng_next(r) >> 11) + 1) * 0x1.0p-53; }

/* The ziggurat's first try from one 64-bit word u: layer i = bits 0-7, sign = bit 8, and a
 * uniform in [0, 1) from bits 12-63 (52 bits, by the exponent trick). */
#define ZIG_MASK (ZIG_LAYERS - 1)
#define ZIG_SIGN ((uint64_t)ZIG_LAYERS)

INLINE double zig_x(uint64_t u)
{
    uint64_t bits = (u >> 12) | 0x3ff0000000000000ULL;
    double f;
    memcpy(&f, &bits, sizeof f);
    return (f - 1.0) * ZIG_X[u & ZIG_MASK];
}

INLINE int zig_inside(uint64_t u, double x) { return x < ZIG_X[(u & ZIG_MASK) + 1]; }

INLINE double with_sign(double x, uint64_t u)
{
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits ^= (u & ZIG_SIGN) << (63 - 8);
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* Finish a draw whose first try (word u, giving x) fell outside its layer's inner rectangle:
 * the exact tail beyond R for layer 0 (Marsaglia 1964), the wedge test for the others, and on
 * rejection a fresh draw, all from `aux`. Together with the first try this is the standard
 * ziggurat, so the result is exactly normal wherever the later words come from. */
static double zig_slow(rng_t *aux, uint64_t u, double x)
{
    for (;;) {
        int i = (int)(u & ZIG_MASK);
        if (i == 0) {
            double xt, y;
            do {
                xt = -log(rng_uniform_pos(aux)) / ZIG_R;
                y = -log(rng_uniform_pos(aux));
            } while (y + y < xt * xt);
            return with_sign(ZIG_R + xt, u);
        }
        if (ZIG_F[i] + rng_uniform(aux) * (ZIG_F[i + 1] - ZIG_F[i]) < exp(-0.5 * x * x))
            return with_sign(x, u);
        u = rng_next(aux);
        x = zig_x(u);
        if (zig_inside(u, x)) return with_sign(x, u);
    }
}

/* One normal from a single stream (parameter draws). */
static double rng_normal(rng_t *r)
{
    uint64_t u = rng_next(r);
    double x = zig_x(u);
    if (zig_inside(u, x)) return with_sign(x, u);
    return zig_slow(r, u, x);
}

/* A block's streams: eight noise lanes (state word w of lane l in s[w][l]) and one auxiliary
 * stream for parameter draws and the ziggurat's rare second tries. */
typedef struct {
    uint64_t s[4][LANES];
    rng_t aux;
} block_rng_t;

static void block_rng_seed(block_rng_t *br, uint64_t seed, int64_t block)
{
    for (int l = 0; l <= LANES; l++) {
        rng_t r;
        stream_seed(&r, seed, (uint64_t)block * (LANES + 1) + (uint64_t)l);
        if (l == LANES) {
            br->aux = r;
        } else {
            for (int w = 0; w < 4; w++) br->s[w][l] = r.s[w];
        }
    }
}

/* A noise buffer's first tries that missed their rectangle: buffer index and word. */
typedef struct {
    int64_t *idx;
    uint64_t *word;
    int64_t n;
} rejects_t;

/* Words of the eight lanes, interleaved: words[8q + l] = lane l's q-th word (count a multiple
 * of 8). */
INLINE void lane_words(uint64_t s[4][LANES], uint64_t *restrict words, int64_t count)
{
    for (int64_t q = 0; q < count; q += LANES)
        for (int l = 0; l < LANES; l++) {
            uint64_t s0 = s[0][l], s1 = s[1][l], s2 = s[2][l], s3 = s[3][l];
            words[q + l] = rotl(s0 + s3, 23) + s0;
            uint64_t t = s1 << 17;
            s2 ^= s0; s3 ^= s1; s1 ^= s2; s0 ^= s3; s2 ^= t; s3 = rotl(s3, 45);
            s[0][l] = s0; s[1][l] = s1; s[2][l] = s2; s[3][l] = s3;
        }
}

#if HAVE_AVX2
AVX2_FN static inline __m256i rotl4(__m256i x, int k)
{
    return _mm256_or_si256(_mm256_slli_epi64(x, k), _mm256_srli_epi64(x, 64 - k));
}

/* lane_words, four lanes per instruction (the same integer operations, so the same words). */
AVX2_FN static void lane_words_avx2(uint64_t s[4][LANES], uint64_t *words, int64_t count)
{
    __m256i a0 = _mm256_loadu_si256((const __m256i *)&s[0][0]);
    __m256i a1 = _mm256_loadu_si256((const __m256i *)&s[1][0]);
    __m256i a2 = _mm256_loadu_si256((const __m256i *)&s[2][0]);
    __m256i a3 = _mm256_loadu_si256((const __m256i *)&s[3][0]);
    __m256i b0 = _mm256_loadu_si256((const __m256i *)&s[0][4]);
    __m256i b1 = _mm256_loadu_si256((const __m256i *)&s[1][4]);
    __m256i b2 = _mm256_loadu_si256((const __m256i *)&s[2][4]);
    __m256i b3 = _mm256_loadu_si256((const __m256i *)&s[3][4]);
    for (int64_t q = 0; q < count; q += LANES) {
        _mm256_storeu_si256((__m256i *)(words + q),
                            _mm256_add_epi64(rotl4(_mm256_add_epi64(a0, a3), 23), a0));
        _mm256_storeu_si256((__m256i *)(words + q + 4),
                            _mm256_add_epi64(rotl4(_mm256_add_epi64(b0, b3), 23), b0));
        __m256i ta = _mm256_slli_epi64(a1, 17), tb = _mm256_slli_epi64(b1, 17);
        a2 = _mm256_xor_si256(a2, a0); b2 = _mm256_xor_si256(b2, b0);
        a3 = _mm256_xor_si256(a3, a1); b3 = _mm256_xor_si256(b3, b1);
        a1 = _mm256_xor_si256(a1, a2); b1 = _mm256_xor_si256(b1, b2);
        a0 = _mm256_xor_si256(a0, a3); b0 = _mm256_xor_si256(b0, b3);
        a2 = _mm256_xor_si256(a2, ta); b2 = _mm256_xor_si256(b2, tb);
        a3 = rotl4(a3, 45); b3 = rotl4(b3, 45);
    }
    _mm256_storeu_si256((__m256i *)&s[0][0], a0);
    _mm256_storeu_si256((__m256i *)&s[1][0], a1);
    _mm256_storeu_si256((__m256i *)&s[2][0], a2);
    _mm256_storeu_si256((__m256i *)&s[3][0], a3);
    _mm256_storeu_si256((__m256i *)&s[0][4], b0);
    _mm256_storeu_si256((__m256i *)&s[1][4], b1);
    _mm256_storeu_si256((__m256i *)&s[2][4], b2);
    _mm256_storeu_si256((__m256i *)&s[3][4], b3);
}
#endif

static void lane_words_portable(uint64_t s[4][LANES], uint64_t *words, int64_t count)
{
    lane_words(s, words, count);
}

/* First tries of words[0..m) into out[0..m); misses appended to rej (index base + j). */
INLINE void first_tries_body(const uint64_t *restrict words, double *restrict out, int64_t m,
                             int64_t base, rejects_t *restrict rej)
{
    int64_t nr = rej->n;
    int64_t *restrict ri = rej->idx;
    uint64_t *restrict rw = rej->word;
    for (int64_t j = 0; j < m; j++) {
        uint64_t u = words[j];
        double x = zig_x(u);
        out[j] = with_sign(x, u);
        if (__builtin_expect(!zig_inside(u, x), 0)) {
            ri[nr] = base + j;
            rw[nr++] = u;
        }
    }
    rej->n = nr;
}

static void first_tries_portable(const uint64_t *words, double *out, int64_t m, int64_t base,
                                 rejects_t *rej)
{
    first_tries_body(words, out, m, base, rej);
}

#if HAVE_AVX2
/* first_tries_body four words at a time (m a multiple of 4). The two table values of each
 * word come from one 16-byte load of ZIG_XX each, not from vector gathers: microcode
 * mitigations (Intel GDS) made gathers several times slower than plain loads. */
AVX2_FN static void first_tries_avx2(const uint64_t *words, double *out, int64_t m, int64_t base,
                                     rejects_t *rej)
{
    const __m256i one_bits = _mm256_set1_epi64x(0x3ff0000000000000LL);
    const __m256i signb = _mm256_set1_epi64x((long long)ZIG_SIGN);
    const __m256d one = _mm256_set1_pd(1.0);
    int64_t nr = rej->n;
    for (int64_t j = 0; j < m; j += 4) {
        __m256i u = _mm256_loadu_si256((const __m256i *)(words + j));
        const double *p0 = ZIG_XX + 2 * (words[j] & ZIG_MASK);
        const double *p1 = ZIG_XX + 2 * (words[j + 1] & ZIG_MASK);
        const double *p2 = ZIG_XX + 2 * (words[j + 2] & ZIG_MASK);
        const double *p3 = ZIG_XX + 2 * (words[j + 3] & ZIG_MASK);
        __m256d a = _mm256_castpd128_pd256(_mm_loadu_pd(p0));
        __m256d b = _mm256_castpd128_pd256(_mm_loadu_pd(p1));
        a = _mm256_insertf128_pd(a, _mm_loadu_pd(p2), 1); /* X[i0] X[i0+1] X[i2] X[i2+1] */
        b = _mm256_insertf128_pd(b, _mm_loadu_pd(p3), 1);
        __m256d xi = _mm256_unpacklo_pd(a, b);  /* X[i0] X[i1] X[i2] X[i3] */
        __m256d xi1 = _mm256_unpackhi_pd(a, b); /* X[i0+1] ... */
        __m256d f = _mm256_sub_pd(
            _mm256_castsi256_pd(_mm256_or_si256(_mm256_srli_epi64(u, 12), one_bits)), one);
        __m256d x = _mm256_mul_pd(f, xi);
        __m256d sign = _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_and_si256(u, signb), 55));
        _mm256_storeu_pd(out + j, _mm256_xor_pd(x, sign));
        int in = _mm256_movemask_pd(_mm256_cmp_pd(x, xi1, _CMP_LT_OQ));
        if (__builtin_expect(in != 0xF, 0)) {
            for (int l = 0; l < 4; l++)
                if (!(in >> l & 1)) {
                    rej->idx[nr] = base + j + l;
                    rej->word[nr++] = words[j + l];
                }
        }
    }
    rej->n = nr;
}
#endif

static int cpu_has_avx2(void)
{
#if HAVE_AVX2
    return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return 0;
#endif
}

int opstwin_simd_level(void) { return cpu_has_avx2(); }

#define WORD_CHUNK 512

/* The next `count` normals (a multiple of 8) of a block's noise stream into out; `rej` has room
 * for count + 1 entries. Second tries come from the auxiliary stream in buffer order. */
static void block_normals(block_rng_t *br, double *out, int64_t count, rejects_t *rej, int avx2)
{
    uint64_t words[WORD_CHUNK];
    rej->n = 0;
    for (int64_t q = 0; q < count; q += WORD_CHUNK) {
        int64_t m = count - q < WORD_CHUNK ? count - q : WORD_CHUNK;
#if HAVE_AVX2
        if (avx2) lane_words_avx2(br->s, words, m);
        else lane_words_portable(br->s, words, m);
#else
        (void)avx2;
        lane_words_portable(br->s, words, m);
#endif
#if HAVE_AVX2
        if (avx2) first_tries_avx2(words, out + q, m, q, rej);
        else first_tries_portable(words, out + q, m, q, rej);
#else
        first_tries_portable(words, out + q, m, q, rej);
#endif
    }
    for (int64_t j = 0; j < rej->n; j++) {
        uint64_t u = rej->word[j];
        out[rej->idx[j]] = zig_slow(&br->aux, u, zig_x(u));
    }
}

/* ------------------------------------------------------------------ validation */

static int n_params_of(int kind)
{
    switch (kind) {
    case OPSTWIN_MODEL_FOPDT: return 5;
    case OPSTWIN_MODEL_TANK: return 6;
    case OPSTWIN_MODEL_WEIBULL: return 3;
    default: return 0;
    }
}

static int param_ok(int kind, int idx, double v)
{
    if (!isfinite(v)) return 0;
    switch (kind) {
    case OPSTWIN_MODEL_FOPDT: return idx == 0 || (idx == 1 ? v > 0 : v >= 0);
    case OPSTWIN_MODEL_TANK: return (idx == 0 || idx == 3) ? v > 0 : v >= 0;
    case OPSTWIN_MODEL_WEIBULL: return idx == 2 ? v >= 0 : v > 0;
    default: return 0;
    }
}

static int check_dist(const opstwin_param *p)
{
    if (!isfinite(p->a) || !isfinite(p->b) || !isfinite(p->c)) return OPSTWIN_E_DIST;
    switch (p->kind) {
    case OPSTWIN_DIST_FIXED: return OPSTWIN_OK;
    case OPSTWIN_DIST_NORMAL:
    case OPSTWIN_DIST_LOGNORMAL: return p->b >= 0 ? OPSTWIN_OK : OPSTWIN_E_DIST;
    case OPSTWIN_DIST_UNIFORM: return p->a <= p->b ? OPSTWIN_OK : OPSTWIN_E_DIST;
    case OPSTWIN_DIST_TRIANGULAR:
        return (p->a <= p->b && p->b <= p->c && p->a < p->c) ? OPSTWIN_OK : OPSTWIN_E_DIST;
    default: return OPSTWIN_E_DIST;
    }
}

static int check_input(const opstwin_input *in)
{
    if (!isfinite(in->u0) || !isfinite(in->u1) || !isfinite(in->t0) || !isfinite(in->t1))
        return OPSTWIN_E_INPUT;
    if (in->kind == OPSTWIN_INPUT_HOLD || in->kind == OPSTWIN_INPUT_STEP) return OPSTWIN_OK;
    if (in->kind == OPSTWIN_INPUT_RAMP) return in->t1 >= in->t0 ? OPSTWIN_OK : OPSTWIN_E_INPUT;
    return OPSTWIN_E_INPUT;
}

static int all_finite(const double *v, int n)
{
    for (int i = 0; i < n; i++)
        if (!isfinite(v[i])) return 0;
    return 1;
}

static int n_outputs_of(const opstwin_model *m)
{
    return m->kind == OPSTWIN_MODEL_STATESPACE ? m->p : 1;
}

static int validate(const opstwin_model *m, const opstwin_scenario *s, opstwin_output *o)
{
    int rc;
    if (m->kind < OPSTWIN_MODEL_FOPDT || m->kind > OPSTWIN_MODEL_WEIBULL) return OPSTWIN_E_MODEL_KIND;
    if (!isfinite(s->dt) || s->dt <= 0) return OPSTWIN_E_DT;
    if (s->n_steps < 1 || s->n_steps > OPSTWIN_MAX_STEPS) return OPSTWIN_E_STEPS;
    if (s->threads < 0) return OPSTWIN_E_THREADS;

    int n_in = 1, n_out = 1;
    if (m->kind == OPSTWIN_MODEL_STATESPACE) {
        if (m->n < 1 || m->n > OPSTWIN_MAX_STATES || m->m < 1 || m->m > OPSTWIN_MAX_INPUTS ||
            m->p < 1 || m->p > OPSTWIN_MAX_OUTPUTS)
            return OPSTWIN_E_DIMS;
        if (!all_finite(m->A, m->n * m->n) || !all_finite(m->B, m->n * m->m) ||
            !all_finite(m->C, m->p * m->n) || !all_finite(m->x0, m->n))
            return OPSTWIN_E_NONFINITE;
        for (int i = 0; i < m->n; i++)
            if (!isfinite(m->q[i]) || m->q[i] < 0) return OPSTWIN_E_NOISE;
        for (int i = 0; i < m->p; i++)
            if (!isfinite(m->r[i]) || m->r[i] < 0) return OPSTWIN_E_NOISE;
        n_in = m->m;
        n_out = m->p;
    } else {
        int np = n_params_of(m->kind);
        for (int i = 0; i < np; i++) {
            const opstwin_param *p = &m->params[i];
            if ((rc = check_dist(p)) != OPSTWIN_OK) { o->error_param = i; return rc; }
            if (p->kind == OPSTWIN_DIST_FIXED && !param_ok(m->kind, i, p->a)) {
                o->error_param = i;
                return OPSTWIN_E_DOMAIN;
            }
        }
        if (m->kind == OPSTWIN_MODEL_WEIBULL) n_in = 0;
        else if (!isfinite(m->y0)) return OPSTWIN_E_NONFINITE;
    }
    if (n_in > 0 && m->n_inputs != n_in) return OPSTWIN_E_INPUT;
    for (int j = 0; j < n_in; j++)
        if ((rc = check_input(&m->inputs[j])) != OPSTWIN_OK) return rc;

    int64_t paths;
    if (s->adaptive) {
        if (s->batch < 1 || s->max_paths < 1 || !(s->rse_target > 0) || !isfinite(s->rse_target))
            return OPSTWIN_E_ADAPTIVE;
        if (s->n_constraints == 0 &&
            (s->driving_kpi < 0 || s->driving_kpi > 3 || s->driving_output < 0 ||
             s->driving_output >= n_out))
            return OPSTWIN_E_ADAPTIVE;
        /* batches are whole blocks, so the last one may run past max_paths to the next 64 */
        paths = (s->max_paths + BP - 1) / BP * BP;
    } else {
        if (s->n_paths < 1) return OPSTWIN_E_PATHS;
        paths = s->n_paths;
    }
    if (paths > OPSTWIN_MAX_VALUES / s->n_steps / n_out) return OPSTWIN_E_TOO_LARGE;

    if (s->n_constraints < 0 || s->n_constraints > OPSTWIN_MAX_CONSTRAINTS) return OPSTWIN_E_CONSTRAINT;
    if (s->n_constraints > 0 && s->constraints == NULL) return OPSTWIN_E_NULL;
    for (int c = 0; c < s->n_constraints; c++) {
        const opstwin_constraint *k = &s->constraints[c];
        if (k->output < 0 || k->output >= n_out) return OPSTWIN_E_CONSTRAINT;
        if (k->kind != OPSTWIN_UPPER && k->kind != OPSTWIN_LOWER) return OPSTWIN_E_CONSTRAINT;
        if (!isfinite(k->limit)) return OPSTWIN_E_NONFINITE;
    }

    int nc = s->n_constraints;
    if (!o->percentiles ||
        o->percentiles_len < (int64_t)n_out * s->n_steps * OPSTWIN_N_PERCENTILES)
        return OPSTWIN_E_OUTPUT;
    if (nc > 0 && (!o->violation_prob || o->violation_prob_len < nc || !o->violation_rse ||
                   o->violation_rse_len < nc || !o->first_violation ||
                   o->first_violation_len < 4 * (int64_t)nc))
        return OPSTWIN_E_OUTPUT;
    if (!o->kpi || o->kpi_len < 20 * n_out || !o->kpi_rse || o->kpi_rse_len < 4 * n_out)
        return OPSTWIN_E_OUTPUT;
    if (o->raw_paths && o->raw_paths_len < paths * s->n_steps * n_out) return OPSTWIN_E_OUTPUT;
    if (o->path_kpi && o->path_kpi_len < paths * 4 * n_out) return OPSTWIN_E_OUTPUT;
    if (o->path_violation && o->path_violation_len < paths * nc) return OPSTWIN_E_OUTPUT;
    return OPSTWIN_OK;
}

/* ------------------------------------------------------------------ per-path parameters */

static double draw(const opstwin_param *p, rng_t *r)
{
    switch (p->kind) {
    case OPSTWIN_DIST_NORMAL: return p->a + p->b * rng_normal(r);
    case OPSTWIN_DIST_UNIFORM: return p->a + (p->b - p->a) * rng_uniform(r);
    case OPSTWIN_DIST_TRIANGULAR: {
        double u = rng_uniform(r), lo = p->a, mo = p->b, hi = p->c;
        double fc = (mo - lo) / (hi - lo);
        return u < fc ? lo + sqrt(u * (hi - lo) * (mo - lo))
                      : hi - sqrt((1 - u) * (hi - lo) * (hi - mo));
    }
    case OPSTWIN_DIST_LOGNORMAL: return exp(p->a + p->b * rng_normal(r));
    default: return p->a;
    }
}

static double input_at(const opstwin_input *in, double t)
{
    switch (in->kind) {
    case OPSTWIN_INPUT_STEP: return t < in->t0 ? in->u0 : in->u1;
    case OPSTWIN_INPUT_RAMP:
        if (t < in->t0) return in->u0;
        if (t >= in->t1) return in->u1;
        return in->u0 + (in->u1 - in->u0) * (t - in->t0) / (in->t1 - in->t0);
    default: return in->u0;
    }
}

/* A noise level that is a fixed zero draws no normals at all. */
static int noisy(const opstwin_param *p) { return !(p->kind == OPSTWIN_DIST_FIXED && p->a == 0); }

/* ------------------------------------------------------------------ barrier */

/* A barrier that spins briefly before it sleeps. The threads meet once per tile after equal
 * shares of work, so the wait is usually microseconds; waking a sleeper costs a futex call and,
 * in a virtual machine, an inter-processor interrupt, which is more than the wait itself. */
#ifndef BARRIER_SPINS
#define BARRIER_SPINS 4000
#endif

typedef struct {
    int n, count, gen;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} barrier_t;

static void barrier_init(barrier_t *b, int n)
{
    b->n = n;
    b->count = 0;
    b->gen = 0;
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv, NULL);
}

static void barrier_destroy(barrier_t *b)
{
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->cv);
}

static void cpu_relax(void)
{
#if HAVE_AVX2
    __builtin_ia32_pause();
#endif
}

static void barrier_wait(barrier_t *b)
{
    int gen = __atomic_load_n(&b->gen, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == b->n) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED); /* before gen: the next round */
        pthread_mutex_lock(&b->mu);
        __atomic_store_n(&b->gen, gen + 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&b->cv);
        pthread_mutex_unlock(&b->mu);
        return;
    }
    for (int i = 0; i < BARRIER_SPINS; i++) {
        if (__atomic_load_n(&b->gen, __ATOMIC_ACQUIRE) != gen) return;
        cpu_relax();
    }
    pthread_mutex_lock(&b->mu);
    while (__atomic_load_n(&b->gen, __ATOMIC_ACQUIRE) == gen) pthread_cond_wait(&b->cv, &b->mu);
    pthread_mutex_unlock(&b->mu);
}

/* ------------------------------------------------------------------ run state */

/* Per-path slots (arrays of npad doubles). */
enum { S_X = 0, S_A = 1, S_B = 2, S_G = 3, S_SW = 4, S_SV = 5, N_SLOTS = OPSTWIN_MAX_STATES };
/* tank: S_X level, S_A inflow gain, S_B outflow gain, S_G h_max; Weibull: S_X remaining life;
 * state-space: S_X + j state j. */
enum { K_LAST = 0, K_MAX = 1, K_MIN = 2, K_SUM = 3 };

typedef struct {
    const opstwin_model *m;
    const opstwin_scenario *s;
    int n_out, ns, n_comp, avx2;
    int comp_w, comp_v;                   /* FOPDT/tank noise components, or -1 */
    int comp_q[OPSTWIN_MAX_STATES];       /* state-space: component of state j's noise, or -1 */
    int comp_r[OPSTWIN_MAX_OUTPUTS];      /* ... of output o's noise, or -1 */
    double sq[OPSTWIN_MAX_STATES], sr[OPSTWIN_MAX_OUTPUTS];
    int64_t npad, n_blocks;
    double *u; /* FOPDT: u[ns + k - d] is u(t_{k-d}) (u0 before 0); tank: u[k]; SS: bu[k*n + a] */
    double *slot[N_SLOTS];
    int32_t *delay; /* FOPDT: ns - d per path */
    int32_t u_switch; /* FOPDT: u[] is u[0] before this index and u[2ns-1] from it, else -1 */
    double *acc;    /* acc[(o*4 + K_*)*npad + i] */
    int32_t *fv;    /* fv[c*npad + i]: first violating step or -1 */
    block_rng_t *rng;
    /* tiles */
    int tile;       /* steps per tile */
    int64_t ystride; /* paths per column of a tile buffer */
    double *ybuf[2];
    double *brange[2]; /* per tile column and block: min, max, 1 if all finite (counted paths) */
    int64_t n;      /* paths summarised */
    double *pct_out, *raw;
    barrier_t bar;
    int abort;
    int64_t *pct_next;        /* per tile: next column to summarise */
} run_t;

/* Draws block b's parameters (auxiliary stream, path by path, parameters in order) and sets
 * its paths' initial state. Returns OPSTWIN_OK or E_DOMAIN with *bad_param and *bad_path. */
static int block_init(run_t *r, int64_t b, int *bad_param, int64_t *bad_path)
{
    const opstwin_model *m = r->m;
    const double dt = r->s->dt;
    const int np = m->kind == OPSTWIN_MODEL_STATESPACE ? 0 : n_params_of(m->kind);
    block_rng_seed(&r->rng[b], r->s->seed, b);
    rng_t *aux = &r->rng[b].aux;
    for (int64_t i = b * BP; i < (b + 1) * BP; i++) {
        double pv[OPSTWIN_MAX_PARAMS] = {0, 0, 0, 0, 0, 0};
        for (int j = 0; j < np; j++) {
            int tries = 0;
            do {
                if (tries++ >= MAX_REDRAWS) {
                    *bad_param = j;
                    *bad_path = i;
                    return OPSTWIN_E_DOMAIN;
                }
                pv[j] = draw(&m->params[j], aux);
            } while (!param_ok(m->kind, j, pv[j]));
        }
        switch (m->kind) {
        case OPSTWIN_MODEL_FOPDT: {
            double a = exp(-dt / pv[1]), dd = nearbyint(pv[2] / dt);
            int64_t d = dd > r->ns ? r->ns : (int64_t)dd;
            r->slot[S_X][i] = m->y0;
            r->slot[S_A][i] = a;
            r->slot[S_B][i] = 1 - a;
            r->slot[S_G][i] = pv[0];
            r->slot[S_SW][i] = pv[3];
            r->slot[S_SV][i] = pv[4];
            r->delay[i] = (int32_t)(r->ns - d);
            break;
        }
        case OPSTWIN_MODEL_TANK:
            r->slot[S_X][i] = m->y0;
            r->slot[S_A][i] = dt / pv[0] * pv[1] / 100.0;
            r->slot[S_B][i] = dt / pv[0] * pv[2];
            r->slot[S_G][i] = pv[3];
            r->slot[S_SW][i] = pv[4];
            r->slot[S_SV][i] = pv[5];
            break;
        case OPSTWIN_MODEL_WEIBULL: {
            double beta = pv[0], eta = pv[1], a0 = pv[2];
            r->slot[S_X][i] =
                eta * pow(pow(a0 / eta, beta) - log(rng_uniform_pos(aux)), 1.0 / beta) - a0;
            break;
        }
        default:
            for (int j = 0; j < m->n; j++) r->slot[S_X + j][i] = m->x0[j];
            break;
        }
        for (int o = 0; o < r->n_out; o++) {
            double *acc = r->acc + (int64_t)o * 4 * r->npad;
            acc[K_LAST * r->npad + i] = NAN;
            acc[K_MAX * r->npad + i] = -INFINITY;
            acc[K_MIN * r->npad + i] = INFINITY;
            acc[K_SUM * r->npad + i] = 0;
        }
        for (int c = 0; c < r->s->n_constraints; c++) r->fv[c * r->npad + i] = -1;
    }
    return OPSTWIN_OK;
}

static const double ZEROS[BP];

/* ud[i] = u[k + dl[i]] for a two-valued u[] that switches from lo to hi at index `switch_at`,
 * passed as switch_at - k: a comparison per path, which vectorises. */
INLINE void step_inputs(double *restrict ud, const int32_t *restrict dl, int32_t switch_at_k,
                        double lo, double hi)
{
    for (int i = 0; i < BP; i++) ud[i] = dl[i] < switch_at_k ? lo : hi;
}

/* ud[i] = u[dl[i]]: each path's delayed input. Plain loads: vector gathers are several times
 * slower on CPUs with the Intel GDS microcode mitigation, so this loop is kept scalar. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((noinline, optimize("no-tree-vectorize")))
#else
__attribute__((noinline))
#endif
static void gather_inputs(double *restrict ud, const double *restrict u, const int32_t *restrict dl)
{
    for (int i = 0; i < BP; i++) ud[i] = u[dl[i]];
}

/* The per-step loops over a block's 64 paths. Separate functions with restrict parameters:
 * GCC keeps restrict through inlining for parameters (not for local pointers), and without it
 * these loops need more run-time alias checks than it will version for, and stay scalar. */
INLINE void fopdt_paths(double *restrict x, double *restrict y, const double *restrict a,
                        const double *restrict bb, const double *restrict g,
                        const double *restrict sw, const double *restrict sv,
                        const double *restrict ud, const double *restrict w,
                        const double *restrict v, double y0, double u0)
{
    for (int i = 0; i < BP; i++) {
        double xx = a[i] * x[i] + bb[i] * (y0 + g[i] * (ud[i] - u0)) + sw[i] * w[i];
        x[i] = xx;
        y[i] = xx + sv[i] * v[i];
    }
}

INLINE void tank_paths(double *restrict x, double *restrict y, const double *restrict ki,
                       const double *restrict ko, const double *restrict hm,
                       const double *restrict sw, const double *restrict sv,
                       const double *restrict w, const double *restrict v, double uk)
{
    for (int i = 0; i < BP; i++) {
        double h = x[i];
        h = h + ki[i] * uk - ko[i] * sqrt(h > 0 ? h : 0) + sw[i] * w[i];
        h = h < 0 ? 0 : h;
        h = h > hm[i] ? hm[i] : h;
        x[i] = h;
        y[i] = h + sv[i] * v[i];
    }
}

/* state-space: acc += c * x, then acc = acc + bu + sd * noise (the order SPEC's sums use) */
INLINE void axpy_paths(double *restrict acc, double c, const double *restrict x)
{
    for (int i = 0; i < BP; i++) acc[i] += c * x[i];
}

INLINE void add_noise_paths(double *restrict acc, double bu, double sd, const double *restrict w)
{
    for (int i = 0; i < BP; i++) acc[i] = acc[i] + bu + sd * w[i];
}

INLINE void kpi_paths(const double *restrict y, double *restrict last, double *restrict mx,
                      double *restrict mn, double *restrict sum)
{
    for (int i = 0; i < BP; i++) {
        double v = y[i];
        last[i] = v;
        mx[i] = v > mx[i] ? v : mx[i];
        mn[i] = v < mn[i] ? v : mn[i];
        sum[i] += v;
    }
}

/* min, max and 1 if all finite (v - v is 0 for finite v, NaN otherwise) of y[0..nv) */
INLINE void value_range(const double *restrict y, int64_t nv, double *restrict out)
{
    double lo[8], hi[8], chk[8];
    for (int l = 0; l < 8; l++) {
        lo[l] = INFINITY;
        hi[l] = -INFINITY;
        chk[l] = 0;
    }
    int64_t i = 0;
    for (; i + 8 <= nv; i += 8)
        for (int l = 0; l < 8; l++) {
            double v = y[i + l];
            lo[l] = v < lo[l] ? v : lo[l];
            hi[l] = v > hi[l] ? v : hi[l];
            chk[l] += v - v;
        }
    for (; i < nv; i++) {
        double v = y[i];
        lo[0] = v < lo[0] ? v : lo[0];
        hi[0] = v > hi[0] ? v : hi[0];
        chk[0] += v - v;
    }
    for (int l = 1; l < 8; l++) {
        lo[0] = lo[l] < lo[0] ? lo[l] : lo[0];
        hi[0] = hi[l] > hi[0] ? hi[l] : hi[0];
        chk[0] += chk[l];
    }
    out[0] = lo[0];
    out[1] = hi[0];
    out[2] = chk[0] == 0;
}

INLINE void first_violations(const double *restrict y, int32_t *restrict fv, double lim,
                             int upper, int k)
{
    if (upper) {
        for (int i = 0; i < BP; i++) fv[i] = (fv[i] < 0 && y[i] > lim) ? k : fv[i];
    } else {
        for (int i = 0; i < BP; i++) fv[i] = (fv[i] < 0 && y[i] < lim) ? k : fv[i];
    }
}

/* Block b over steps k0 .. k0+T-1: noise into nb, the model's update, then per-path KPIs,
 * first violations and (ybuf != NULL) the tile's step-major outputs. Written as plain loops
 * over the block's 64 paths for the compiler to vectorise; compiled twice (AVX2, portable). */
INLINE void tile_body(const run_t *r, int64_t b, int k0, int T, double *ybuf, double *brange,
                      double *nb, rejects_t *rej)
{
    const opstwin_model *m = r->m;
    const int nc = r->n_comp, n_out = r->n_out, ns = r->ns;
    const int64_t npad = r->npad, p0 = b * BP;
    if (nc > 0) block_normals(&r->rng[b], nb, (int64_t)T * nc * BP, rej, r->avx2);
    double scratch[OPSTWIN_MAX_OUTPUTS][BP];
    for (int t = 0; t < T; t++) {
        const int k = k0 + t;
        /* outputs go straight into the tile's columns (or scratch when there is no tile) */
        double *y[OPSTWIN_MAX_OUTPUTS];
        for (int o = 0; o < n_out; o++)
            y[o] = ybuf ? ybuf + ((int64_t)o * r->tile + t) * r->ystride + p0 : scratch[o];
        const double *noise = nb + (int64_t)t * nc * BP;
        switch (m->kind) {
        case OPSTWIN_MODEL_FOPDT: {
            double ud[BP];
            if (r->u_switch >= 0)
                step_inputs(ud, r->delay + p0, r->u_switch - k, r->u[0], r->u[2 * ns - 1]);
            else
                gather_inputs(ud, r->u + k, r->delay + p0);
            fopdt_paths(r->slot[S_X] + p0, y[0], r->slot[S_A] + p0, r->slot[S_B] + p0,
                        r->slot[S_G] + p0, r->slot[S_SW] + p0, r->slot[S_SV] + p0, ud,
                        r->comp_w >= 0 ? noise + r->comp_w * BP : ZEROS,
                        r->comp_v >= 0 ? noise + r->comp_v * BP : ZEROS, m->y0,
                        m->inputs[0].u0);
            break;
        }
        case OPSTWIN_MODEL_TANK:
            tank_paths(r->slot[S_X] + p0, y[0], r->slot[S_A] + p0, r->slot[S_B] + p0,
                       r->slot[S_G] + p0, r->slot[S_SW] + p0, r->slot[S_SV] + p0,
                       r->comp_w >= 0 ? noise + r->comp_w * BP : ZEROS,
                       r->comp_v >= 0 ? noise + r->comp_v * BP : ZEROS, r->u[k]);
            break;
        case OPSTWIN_MODEL_WEIBULL: {
            const double *restrict life = r->slot[S_X] + p0;
            const double tk = (k + 1) * r->s->dt;
            double *restrict yo = y[0];
            for (int i = 0; i < BP; i++) yo[i] = life[i] <= tk ? 1.0 : 0.0;
            break;
        }
        default: { /* state-space */
            const int n = m->n;
            double xn[OPSTWIN_MAX_STATES][BP];
            for (int a1 = 0; a1 < n; a1++) {
                memset(xn[a1], 0, sizeof xn[a1]);
                for (int b1 = 0; b1 < n; b1++)
                    axpy_paths(xn[a1], m->A[a1 * n + b1], r->slot[S_X + b1] + p0);
                add_noise_paths(xn[a1], r->u[(int64_t)k * n + a1], r->sq[a1],
                                r->comp_q[a1] >= 0 ? noise + r->comp_q[a1] * BP : ZEROS);
            }
            for (int a1 = 0; a1 < n; a1++) memcpy(r->slot[S_X + a1] + p0, xn[a1], sizeof xn[a1]);
            for (int o = 0; o < m->p; o++) {
                memset(y[o], 0, sizeof(double) * BP);
                for (int b1 = 0; b1 < n; b1++) axpy_paths(y[o], m->C[o * n + b1], xn[b1]);
                add_noise_paths(y[o], 0.0, r->sr[o],
                                r->comp_r[o] >= 0 ? noise + r->comp_r[o] * BP : ZEROS);
            }
            break;
        }
        }
        for (int o = 0; o < n_out; o++) {
            const double *yo = y[o];
            double *acc = r->acc + (int64_t)o * 4 * npad + p0;
            kpi_paths(yo, acc + K_LAST * npad, acc + K_MAX * npad, acc + K_MIN * npad,
                      acc + K_SUM * npad);
            if (brange) /* this block's share of the column's range, counted paths only */
                value_range(yo, r->n - p0 < BP ? r->n - p0 : BP,
                            brange + (((int64_t)o * r->tile + t) * r->n_blocks + b) * 3);
        }
        for (int c = 0; c < r->s->n_constraints; c++) {
            const opstwin_constraint *cs = &r->s->constraints[c];
            first_violations(y[cs->output], r->fv + (int64_t)c * npad + p0, cs->limit,
                             cs->kind == OPSTWIN_UPPER, k);
        }
    }
}

static void tile_portable(const run_t *r, int64_t b, int k0, int T, double *ybuf,
                          double *brange, double *nb, rejects_t *rej)
{
    tile_body(r, b, k0, T, ybuf, brange, nb, rej);
}

#if HAVE_AVX2
AVX2_FN static void tile_avx2(const run_t *r, int64_t b, int k0, int T, double *ybuf,
                              double *brange, double *nb, rejects_t *rej)
{
    tile_body(r, b, k0, T, ybuf, brange, nb, rej);
}
#endif

static void run_tile(const run_t *r, int64_t b, int k0, int T, double *ybuf, double *brange,
                     double *nb, rejects_t *rej)
{
#if HAVE_AVX2
    if (r->avx2) { tile_avx2(r, b, k0, T, ybuf, brange, nb, rej); return; }
#endif
    tile_portable(r, b, k0, T, ybuf, brange, nb, rej);
}

/* ------------------------------------------------------------------ order statistics */

static void swapd(double *a, int64_t i, int64_t j) { double t = a[i]; a[i] = a[j]; a[j] = t; }

/* Partially orders a[lo..hi] so that a[k] holds its order statistic (Hoare quickselect). */
static void select_k(double *a, int64_t lo, int64_t hi, int64_t k)
{
    while (hi > lo) {
        int64_t mid = lo + (hi - lo) / 2;
        if (a[mid] < a[lo]) swapd(a, lo, mid);
        if (a[hi] < a[lo]) swapd(a, lo, hi);
        if (a[hi] < a[mid]) swapd(a, mid, hi);
        double pivot = a[mid];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) { swapd(a, i, j); i++; j--; }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return;
    }
}

/* numpy's linear-method lerp, reproduced exactly */
static double lerp(double a, double b, double t)
{
    double diff = b - a;
    return t >= 0.5 ? b - diff * (1.0 - t) : a + diff * t;
}

typedef struct {
    uint32_t *bucket; /* bucket of each value */
    uint32_t *count;  /* values per bucket */
    uint8_t *slot;    /* 1 + index of a target bucket, else 0 */
    double *picked;   /* values of the target buckets */
    int64_t cap;      /* values this scratch holds */
    int64_t max_buckets;
} sel_t;

static int64_t buckets_for(int64_t n)
{
    int64_t b = n / 8;
    return b < 16 ? 16 : (b > 65536 ? 65536 : b);
}

static int sel_alloc(sel_t *s, int64_t n)
{
    s->cap = n;
    s->max_buckets = buckets_for(n);
    s->bucket = malloc(sizeof(uint32_t) * (size_t)n);
    s->count = malloc(sizeof(uint32_t) * (size_t)s->max_buckets);
    s->slot = calloc((size_t)s->max_buckets, 1);
    s->picked = malloc(sizeof(double) * (size_t)n);
    return s->bucket && s->count && s->slot && s->picked ? OPSTWIN_OK : OPSTWIN_E_NOMEM;
}

static void sel_free(sel_t *s)
{
    free(s->bucket);
    free(s->count);
    free(s->slot);
    free(s->picked);
}

INLINE int minmax_body(const double *a, int64_t n, double *mn, double *mx)
{
    double range[3];
    value_range(a, n, range);
    *mn = range[0];
    *mx = range[1];
    return range[2] != 0;
}

/* Bucket of every value: floor((v - mn) * scale), at most nb - 1. Monotone in v (a subtraction
 * and a multiplication by a positive constant, each correctly rounded, never reorder), so the
 * k-th smallest value lies in the bucket where the running count passes k. */
INLINE void bucket_body(const double *a, int64_t n, double mn, double scale, uint32_t top,
                        uint32_t *restrict bucket, uint32_t *restrict count)
{
    for (int64_t i = 0; i < n; i++) {
        double d = (a[i] - mn) * scale; /* >= 0; a NaN goes to the top bucket, not to UB */
        bucket[i] = d < (double)top ? (uint32_t)d : top;
    }
    for (int64_t i = 0; i < n; i++) count[bucket[i]]++;
}

static int minmax_portable(const double *a, int64_t n, double *mn, double *mx)
{
    return minmax_body(a, n, mn, mx);
}

static void bucket_portable(const double *a, int64_t n, double mn, double scale, uint32_t top,
                            uint32_t *bucket, uint32_t *count)
{
    bucket_body(a, n, mn, scale, top, bucket, count);
}

#if HAVE_AVX2
AVX2_FN static int minmax_avx2(const double *a, int64_t n, double *mn, double *mx)
{
    return minmax_body(a, n, mn, mx);
}

AVX2_FN static void bucket_avx2(const double *a, int64_t n, double mn, double scale, uint32_t top,
                                uint32_t *bucket, uint32_t *count)
{
    bucket_body(a, n, mn, scale, top, bucket, count);
}
#endif

static int cmp_double(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

/* Percentiles q[0..nq) (ascending) of a[0..n), exact as numpy.percentile(method="linear");
 * a is left unchanged. `range`, when given, holds min, max and 1 if every value is finite
 * (found while the values were made), saving a pass. Returns 0, or -1 if a value is not
 * finite (results NaN). */
static int percentiles_of(const double *a, int64_t n, const double *q, int nq, double *res,
                          sel_t *s, int avx2, const double *range)
{
    double mn, mx;
    int finite;
    if (range) {
        mn = range[0];
        mx = range[1];
        finite = range[2] != 0;
    } else {
#if HAVE_AVX2
        finite = avx2 ? minmax_avx2(a, n, &mn, &mx) : minmax_portable(a, n, &mn, &mx);
#else
        finite = minmax_portable(a, n, &mn, &mx);
#endif
    }
    if (!finite) {
        for (int j = 0; j < nq; j++) res[j] = NAN;
        return -1;
    }
    int64_t lo[OPSTWIN_N_PERCENTILES];
    double frac[OPSTWIN_N_PERCENTILES];
    for (int j = 0; j < nq; j++) {
        double pos = q[j] / 100.0 * (double)(n - 1);
        lo[j] = (int64_t)floor(pos);
        if (lo[j] > n - 1) lo[j] = n - 1;
        frac[j] = pos - (double)lo[j];
    }
    if (mn == mx) {
        for (int j = 0; j < nq; j++) res[j] = lerp(mn, mn, frac[j]);
        return 0;
    }
    int64_t nb = buckets_for(n);
    double scale = (double)nb / (mx - mn);
    if (!isfinite(scale) || n > s->cap) {
        /* a range too narrow to divide (subnormal): sort a copy, it never happens in practice */
        double *c = malloc(sizeof(double) * (size_t)n);
        if (!c) { for (int j = 0; j < nq; j++) res[j] = NAN; return -1; }
        memcpy(c, a, sizeof(double) * (size_t)n);
        qsort(c, (size_t)n, sizeof(double), cmp_double);
        for (int j = 0; j < nq; j++)
            res[j] = lo[j] + 1 < n ? lerp(c[lo[j]], c[lo[j] + 1], frac[j]) : c[lo[j]];
        free(c);
        return 0;
    }
    memset(s->count, 0, sizeof(uint32_t) * (size_t)nb);
#if HAVE_AVX2
    if (avx2) bucket_avx2(a, n, mn, scale, (uint32_t)(nb - 1), s->bucket, s->count);
    else bucket_portable(a, n, mn, scale, (uint32_t)(nb - 1), s->bucket, s->count);
#else
    bucket_portable(a, n, mn, scale, (uint32_t)(nb - 1), s->bucket, s->count);
#endif
    /* the ranks needed (lo and lo + 1 of each percentile), ascending, and their buckets */
    int64_t rank[N_TARGETS], base[N_TARGETS];
    uint32_t tb[N_TARGETS];
    int nt = 0;
    for (int j = 0; j < nq; j++) {
        rank[nt++] = lo[j];
        if (lo[j] + 1 < n) rank[nt++] = lo[j] + 1;
    }
    int64_t cum = 0;
    uint32_t b = 0;
    int n_slots = 0;
    int64_t start[N_TARGETS], fill[N_TARGETS], size[N_TARGETS];
    uint32_t slot_bucket[N_TARGETS];
    int64_t off = 0;
    for (int t = 0; t < nt; t++) {
        while (cum + s->count[b] <= rank[t]) cum += s->count[b++];
        tb[t] = b;
        base[t] = cum;
        if (!s->slot[b]) {
            s->slot[b] = (uint8_t)(++n_slots);
            slot_bucket[n_slots - 1] = b;
            start[n_slots - 1] = off;
            fill[n_slots - 1] = 0;
            size[n_slots - 1] = s->count[b];
            off += s->count[b];
        }
    }
    const uint32_t *restrict bk = s->bucket;
    const uint8_t *restrict sl = s->slot;
    for (int64_t i = 0; i < n; i++) {
        uint8_t k = sl[bk[i]];
        if (k) {
            int t = k - 1;
            s->picked[start[t] + fill[t]++] = a[i];
        }
    }
    /* order each target bucket: small ones by insertion sort, large ones (ties, e.g. a 0/1
     * output) by selecting just the ranks needed */
    for (int t = 0; t < n_slots; t++) {
        double *v = s->picked + start[t];
        int64_t m = size[t];
        if (m <= 48) {
            for (int64_t i = 1; i < m; i++) {
                double x = v[i];
                int64_t j = i - 1;
                while (j >= 0 && v[j] > x) { v[j + 1] = v[j]; j--; }
                v[j + 1] = x;
            }
        } else {
            int64_t from = 0;
            for (int r = 0; r < nt; r++)
                if (tb[r] == slot_bucket[t]) {
                    select_k(v, from, m - 1, rank[r] - base[r]);
                    from = rank[r] - base[r];
                }
        }
        s->slot[slot_bucket[t]] = 0;
    }
    double val[N_TARGETS];
    for (int t = 0; t < nt; t++) {
        int sidx = 0;
        while (slot_bucket[sidx] != tb[t]) sidx++;
        val[t] = s->picked[start[sidx] + rank[t] - base[t]];
    }
    for (int j = 0, t = 0; j < nq; j++) {
        double v0 = val[t++];
        res[j] = lo[j] + 1 < n ? lerp(v0, val[t++], frac[j]) : v0;
    }
    return 0;
}

/* ------------------------------------------------------------------ threads */

typedef struct worker {
    /* Workers sit side by side in an array and write their own fields (rej.n every few hundred
     * numbers): the padding keeps two workers' fields off a shared cache line, which cost the
     * two-thread run ~20 % more CPU in the normal generator alone. */
    char pad_front[64];
    run_t *r;
    int tid, nt, pcts;
    int64_t b_lo, b_hi; /* blocks of this worker */
    int64_t chunks;     /* chunks of CHUNK_BLOCKS in b_lo..b_hi */
    int64_t next_chunk; /* chunks of these blocks taken so far, over all tiles (take_chunk) */
    struct worker *all; /* every worker of the run */
    double *nb;         /* noise buffer: MAX_TILE * n_comp * 64 */
    rejects_t rej;
    sel_t sel;
    int rc, bad_param, diverged;
    int64_t bad_path;
    /* start gate: workers wait until the caller knows how many threads it really got */
    pthread_mutex_t *mu;
    pthread_cond_t *cv;
    int *go;
    char pad_back[64];
} worker_t;

static int min_int(int a, int b) { return a < b ? a : b; }

/* The next of `per_tile` chunks of tile ti from a counter that counts chunks over all tiles,
 * or -1 when the tile's are all taken. A plain fetch-and-add could take a ticket of the next
 * tile; this never moves the counter past the end of the current one. */
static int64_t take_chunk(int64_t *counter, int64_t ti, int64_t per_tile)
{
    int64_t c = __atomic_load_n(counter, __ATOMIC_RELAXED);
    while (c < (ti + 1) * per_tile)
        if (__atomic_compare_exchange_n(counter, &c, c + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            return c - ti * per_tile;
    return -1;
}

static void *work(void *arg)
{
    worker_t *w = arg;
    run_t *r = w->r;
    if (w->tid > 0) {
        pthread_mutex_lock(w->mu);
        while (!*w->go) pthread_cond_wait(w->cv, w->mu);
        pthread_mutex_unlock(w->mu);
    }
    for (int64_t b = w->b_lo; b < w->b_hi && w->rc == OPSTWIN_OK; b++)
        w->rc = block_init(r, b, &w->bad_param, &w->bad_path);
    if (w->rc != OPSTWIN_OK) __atomic_store_n(&r->abort, 1, __ATOMIC_SEQ_CST);
    const int ns = r->ns;
    if (!w->pcts) { /* summaries only: blocks are independent, no barriers */
        if (w->rc != OPSTWIN_OK) return NULL;
        for (int64_t b = w->b_lo; b < w->b_hi; b++)
            for (int k0 = 0; k0 < ns; k0 += MAX_TILE)
                run_tile(r, b, k0, min_int(MAX_TILE, ns - k0), NULL, NULL, w->nb, &w->rej);
        return NULL;
    }
    barrier_wait(&r->bar);
    if (__atomic_load_n(&r->abort, __ATOMIC_SEQ_CST)) return NULL;
    const int T = r->tile;
    for (int ti = 0, k0 = 0; k0 < ns; ti++, k0 += T) {
        const int Tt = min_int(T, ns - k0);
        double *yb = r->ybuf[ti & 1];
        /* Each thread first simulates its own blocks, the same in every tile, so their state
         * (parameters, accumulators, generators) stays in its core's cache; then it helps with
         * what is left of the others' (on a shared machine one CPU is often slower than the
         * other). Percentile columns are taken one at a time from a counter. Who computes
         * what never changes a number. */
        for (int j = 0; j < w->nt; j++) {
            worker_t *v = w->all + (w->tid + j) % w->nt;
            int64_t c;
            while ((c = take_chunk(&v->next_chunk, ti, v->chunks)) >= 0) {
                int64_t b0 = v->b_lo + c * CHUNK_BLOCKS;
                int64_t b1 = b0 + CHUNK_BLOCKS < v->b_hi ? b0 + CHUNK_BLOCKS : v->b_hi;
                for (int64_t b = b0; b < b1; b++)
                    run_tile(r, b, k0, Tt, yb, r->brange[ti & 1], w->nb, &w->rej);
            }
        }
        /* one barrier per tile: the other buffer's percentiles (tile ti - 1) were finished by
         * every thread before it started this tile, so it is free for tile ti + 1 */
        barrier_wait(&r->bar);
        const int64_t cols = (int64_t)r->n_out * Tt;
        for (;;) {
            int64_t c = __atomic_fetch_add(&r->pct_next[ti], 1, __ATOMIC_RELAXED);
            if (c >= cols) break;
            const int o = (int)(c / Tt), t = (int)(c % Tt), k = k0 + t;
            const double *col = yb + ((int64_t)o * T + t) * r->ystride;
            double *res = r->pct_out + ((int64_t)o * ns + k) * OPSTWIN_N_PERCENTILES;
            /* the column's min, max and finiteness, from its blocks' (tile_body) */
            const double *br = r->brange[ti & 1] + ((int64_t)o * T + t) * r->n_blocks * 3;
            double range[3] = {br[0], br[1], br[2]};
            for (int64_t b = 1; b * BP < r->n; b++) {
                range[0] = br[3 * b] < range[0] ? br[3 * b] : range[0];
                range[1] = br[3 * b + 1] > range[1] ? br[3 * b + 1] : range[1];
                range[2] = range[2] != 0 && br[3 * b + 2] != 0;
            }
            if (percentiles_of(col, r->n, PCTS, OPSTWIN_N_PERCENTILES, res, &w->sel, r->avx2,
                               range))
                w->diverged = 1;
            if (r->raw)
                for (int64_t i = 0; i < r->n; i++)
                    r->raw[((int64_t)i * ns + k) * r->n_out + o] = col[i];
        }
    }
    return NULL;
}

static int resolve_threads(int threads)
{
    if (threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        threads = n > 0 ? (int)n : 1;
    }
    return threads > MAX_THREADS ? MAX_THREADS : threads;
}

static void free_workers(worker_t *ws, int n)
{
    for (int t = 0; t < n; t++) {
        free(ws[t].nb);
        free(ws[t].rej.idx);
        free(ws[t].rej.word);
        sel_free(&ws[t].sel);
    }
}

/* Blocks [b_lo, b_hi) on up to `threads` threads; with pcts, per-step percentiles of the first
 * r->n paths too. Returns OPSTWIN_OK, E_NOMEM, or the first failing path's E_DOMAIN. */
static int run_blocks(run_t *r, int64_t b_lo, int64_t b_hi, int pcts, int threads,
                      opstwin_output *out, int *diverged)
{
    int64_t blocks = b_hi - b_lo;
    int nt = threads;
    if (nt > blocks) nt = (int)blocks;
    if (nt < 1) nt = 1;
    worker_t ws[MAX_THREADS];
    memset(ws, 0, sizeof(worker_t) * (size_t)nt);
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    int go = 0, rc = OPSTWIN_OK;
    int64_t nb_len = (int64_t)MAX_TILE * (r->n_comp > 0 ? r->n_comp : 1) * BP;
    for (int t = 0; t < nt; t++) {
        worker_t *w = &ws[t];
        w->r = r;
        w->tid = t;
        w->pcts = pcts;
        w->mu = &mu;
        w->cv = &cv;
        w->go = &go;
        w->bad_path = INT64_MAX;
        w->nb = malloc(sizeof(double) * (size_t)nb_len);
        w->rej.idx = malloc(sizeof(int64_t) * (size_t)(nb_len + 1));
        w->rej.word = malloc(sizeof(uint64_t) * (size_t)(nb_len + 1));
        if (!w->nb || !w->rej.idx || !w->rej.word) rc = OPSTWIN_E_NOMEM;
        if (pcts && sel_alloc(&w->sel, r->n) != OPSTWIN_OK) rc = OPSTWIN_E_NOMEM;
    }
    if (rc != OPSTWIN_OK) { free_workers(ws, nt); return rc; }
    /* Threads that cannot be created are simply not used: the split below is made for the
     * threads that exist, and results never depend on it. */
    pthread_t th[MAX_THREADS];
    int started = 1;
    for (int t = 1; t < nt; t++) {
        if (pthread_create(&th[t], NULL, work, &ws[t]) != 0) break;
        started++;
    }
    r->abort = 0;
    if (pcts) barrier_init(&r->bar, started);
    pthread_mutex_lock(&mu);
    for (int t = 0; t < started; t++) {
        ws[t].nt = started;
        ws[t].b_lo = b_lo + blocks * t / started;
        ws[t].b_hi = b_lo + blocks * (t + 1) / started;
        ws[t].chunks = (ws[t].b_hi - ws[t].b_lo + CHUNK_BLOCKS - 1) / CHUNK_BLOCKS;
        ws[t].next_chunk = 0;
        ws[t].all = ws;
    }
    go = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    work(&ws[0]);
    for (int t = 1; t < started; t++) pthread_join(th[t], NULL);
    if (pcts) barrier_destroy(&r->bar);
    int64_t first = INT64_MAX;
    for (int t = 0; t < started; t++) {
        if (ws[t].rc != OPSTWIN_OK && ws[t].bad_path < first) {
            first = ws[t].bad_path;
            rc = ws[t].rc;
            out->error_param = ws[t].bad_param;
        }
        if (ws[t].diverged) *diverged = 1;
    }
    free_workers(ws, nt);
    return rc;
}

/* ------------------------------------------------------------------ statistics */

static double mean_std(const double *v, int64_t n, double *std)
{
    double s = 0, ss = 0;
    for (int64_t i = 0; i < n; i++) s += v[i];
    double mu = s / n;
    for (int64_t i = 0; i < n; i++) ss += (v[i] - mu) * (v[i] - mu);
    *std = sqrt(ss / n);
    return mu;
}

static double prob_rse(double p, int64_t n) { return p > 0 ? sqrt(p * (1 - p) / n) / p : INFINITY; }

static double mean_rse(double mu, double sd, int64_t n)
{
    return mu != 0 ? sd / sqrt((double)n) / fabs(mu) : INFINITY;
}

/* KPI f (0 final, 1 max, 2 min, 3 mean) of output o, path i */
static double kpi_value(const run_t *r, int o, int f, int64_t i)
{
    const double *acc = r->acc + (int64_t)o * 4 * r->npad;
    return f == 3 ? acc[K_SUM * r->npad + i] / r->ns : acc[f * r->npad + i];
}

/* RSE that drives adaptive mode: first constraint's probability, else the chosen KPI's mean. */
static double driving_rse(const run_t *r, int64_t n, double *tmp)
{
    if (r->s->n_constraints > 0) {
        int64_t hits = 0;
        for (int64_t i = 0; i < n; i++) hits += r->fv[i] >= 0;
        return prob_rse((double)hits / n, n);
    }
    for (int64_t i = 0; i < n; i++)
        tmp[i] = kpi_value(r, r->s->driving_output, r->s->driving_kpi, i);
    double sd, mu = mean_std(tmp, n, &sd);
    return mean_rse(mu, sd, n);
}

static int summarise(const run_t *r, opstwin_output *o, double *tmp, sel_t *sel)
{
    static const double KQ[3] = {5, 50, 95};
    const int64_t n = r->n;
    const int nc = r->s->n_constraints;
    for (int out = 0; out < r->n_out; out++)
        for (int f = 0; f < 4; f++) {
            for (int64_t i = 0; i < n; i++) tmp[i] = kpi_value(r, out, f, i);
            double sd, *row = o->kpi + out * 20 + f * 5;
            row[0] = mean_std(tmp, n, &sd);
            row[1] = sd;
            if (percentiles_of(tmp, n, KQ, 3, row + 2, sel, r->avx2, NULL))
                return OPSTWIN_E_DIVERGED;
            o->kpi_rse[out * 4 + f] = mean_rse(row[0], sd, n);
        }
    for (int c = 0; c < nc; c++) {
        int64_t hits = 0;
        double s = 0;
        for (int64_t i = 0; i < n; i++) {
            int32_t k = r->fv[c * r->npad + i];
            if (k >= 0) { tmp[hits++] = (k + 1) * r->s->dt; s += (k + 1) * r->s->dt; }
        }
        double p = (double)hits / n;
        o->violation_prob[c] = p;
        o->violation_rse[c] = prob_rse(p, n);
        double *fvo = o->first_violation + c * 4;
        if (hits > 0) {
            percentiles_of(tmp, hits, KQ, 3, fvo, sel, r->avx2, NULL);
            fvo[3] = s / hits;
        } else {
            fvo[0] = fvo[1] = fvo[2] = fvo[3] = NAN;
        }
    }
    return OPSTWIN_OK;
}

/* The per-path KPIs and first violations the summaries were made from, for the caller's joint
 * questions; the KPIs through kpi_value, so each is the very number summarised. */
static void copy_paths(const run_t *r, opstwin_output *o)
{
    const int64_t n = r->n;
    if (o->path_kpi)
        for (int out = 0; out < r->n_out; out++)
            for (int f = 0; f < 4; f++) {
                double *dst = o->path_kpi + ((int64_t)out * 4 + f) * n;
                for (int64_t i = 0; i < n; i++) dst[i] = kpi_value(r, out, f, i);
            }
    if (o->path_violation)
        for (int c = 0; c < r->s->n_constraints; c++)
            memcpy(o->path_violation + (int64_t)c * n, r->fv + (int64_t)c * r->npad,
                   sizeof(int32_t) * (size_t)n);
}

/* ------------------------------------------------------------------ public: run */

static int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

static void free_run(run_t *r)
{
    free(r->u);
    for (int j = 0; j < N_SLOTS; j++) free(r->slot[j]);
    free(r->delay);
    free(r->acc);
    free(r->fv);
    free(r->rng);
    for (int j = 0; j < 2; j++) {
        free(r->ybuf[j]);
        free(r->brange[j]);
    }
    free(r->pct_next);
}

static int setup(run_t *r, const opstwin_model *m, const opstwin_scenario *s, int64_t paths)
{
    const int ns = s->n_steps;
    r->m = m;
    r->s = s;
    r->ns = ns;
    r->n_out = n_outputs_of(m);
    r->avx2 = !s->portable && cpu_has_avx2();
    r->comp_w = r->comp_v = -1;
    if (m->kind == OPSTWIN_MODEL_FOPDT || m->kind == OPSTWIN_MODEL_TANK) {
        int iw = m->kind == OPSTWIN_MODEL_FOPDT ? 3 : 4;
        if (noisy(&m->params[iw])) r->comp_w = r->n_comp++;
        if (noisy(&m->params[iw + 1])) r->comp_v = r->n_comp++;
    } else if (m->kind == OPSTWIN_MODEL_STATESPACE) {
        for (int j = 0; j < m->n; j++) {
            r->comp_q[j] = m->q[j] > 0 ? r->n_comp++ : -1;
            r->sq[j] = sqrt(m->q[j]);
        }
        for (int j = 0; j < m->p; j++) {
            r->comp_r[j] = m->r[j] > 0 ? r->n_comp++ : -1;
            r->sr[j] = sqrt(m->r[j]);
        }
    }
    r->npad = round_up(paths, BP);
    r->n_blocks = r->npad / BP;
    int slots = m->kind == OPSTWIN_MODEL_STATESPACE ? m->n
                : (m->kind == OPSTWIN_MODEL_WEIBULL ? 1 : S_SV + 1);
    for (int j = 0; j < slots; j++)
        if (!(r->slot[j] = malloc(sizeof(double) * (size_t)r->npad))) return OPSTWIN_E_NOMEM;
    if (m->kind == OPSTWIN_MODEL_FOPDT &&
        !(r->delay = malloc(sizeof(int32_t) * (size_t)r->npad)))
        return OPSTWIN_E_NOMEM;
    r->acc = malloc(sizeof(double) * (size_t)(r->n_out * 4 * r->npad));
    r->fv = malloc(sizeof(int32_t) * (size_t)((s->n_constraints > 0 ? s->n_constraints : 1) * r->npad));
    r->rng = malloc(sizeof(block_rng_t) * (size_t)r->n_blocks);
    if (!r->acc || !r->fv || !r->rng) return OPSTWIN_E_NOMEM;

    /* inputs, precomputed for every step */
    if (m->kind == OPSTWIN_MODEL_FOPDT) {
        if (!(r->u = malloc(sizeof(double) * 2 * (size_t)ns))) return OPSTWIN_E_NOMEM;
        for (int k = 0; k < ns; k++) {
            r->u[k] = m->inputs[0].u0; /* u[j] = u0 for j < 0 (steady state before now) */
            r->u[ns + k] = input_at(&m->inputs[0], k * s->dt);
        }
        /* A hold or a step (the usual what-if) makes u[] two-valued with one switch: the
         * delayed input is then a comparison per path instead of a load from u[]. */
        int32_t sw = 2 * ns;
        for (int32_t j = 0; j < 2 * ns; j++)
            if (r->u[j] != r->u[0]) { sw = j; break; }
        r->u_switch = sw;
        for (int32_t j = sw; j < 2 * ns; j++)
            if (r->u[j] != r->u[2 * ns - 1]) { r->u_switch = -1; break; }
    } else if (m->kind == OPSTWIN_MODEL_TANK) {
        if (!(r->u = malloc(sizeof(double) * (size_t)ns))) return OPSTWIN_E_NOMEM;
        for (int k = 0; k < ns; k++) r->u[k] = input_at(&m->inputs[0], k * s->dt);
    } else if (m->kind == OPSTWIN_MODEL_STATESPACE) {
        if (!(r->u = malloc(sizeof(double) * (size_t)ns * m->n))) return OPSTWIN_E_NOMEM;
        for (int k = 0; k < ns; k++)
            for (int a = 0; a < m->n; a++) {
                double acc = 0;
                for (int b = 0; b < m->m; b++) acc += m->B[a * m->m + b] * input_at(&m->inputs[b], k * s->dt);
                r->u[(int64_t)k * m->n + a] = acc;
            }
    }
    return OPSTWIN_OK;
}

int opstwin_sim_run(const opstwin_model *model, const opstwin_scenario *scen, opstwin_output *out)
{
    if (!model || !scen || !out) return OPSTWIN_E_NULL;
    out->error_param = -1;
    out->n_paths_run = 0;
    int rc = validate(model, scen, out);
    if (rc != OPSTWIN_OK) return rc;

    run_t r;
    memset(&r, 0, sizeof r);
    int64_t paths = scen->adaptive ? round_up(scen->max_paths, BP) : scen->n_paths;
    double *tmp = NULL;
    sel_t sel;
    memset(&sel, 0, sizeof sel);
    int diverged = 0;
    const int nthreads = resolve_threads(scen->threads);
    if ((rc = setup(&r, model, scen, paths)) != OPSTWIN_OK) goto done;
    if (!(tmp = malloc(sizeof(double) * (size_t)paths))) { rc = OPSTWIN_E_NOMEM; goto done; }

    int64_t n = scen->n_paths;
    if (scen->adaptive) {
        /* Batches run summaries only, until the target is met; then every path run is run
         * again with per-step percentiles (same seed, same blocks: the same paths), so the
         * trajectory is never held in memory. */
        int64_t batch = round_up(scen->batch, BP), done_paths = 0;
        while (done_paths < scen->max_paths) {
            int64_t hi = done_paths + batch > scen->max_paths ? scen->max_paths : done_paths + batch;
            rc = run_blocks(&r, done_paths / BP, round_up(hi, BP) / BP, 0, nthreads, out, &diverged);
            if (rc != OPSTWIN_OK) goto done;
            done_paths = hi;
            if (driving_rse(&r, done_paths, tmp) <= scen->rse_target) break;
        }
        n = done_paths;
    }
    r.n = n;
    r.ystride = round_up(n, BP);
    int64_t per_step = (int64_t)r.n_out * r.ystride * (int64_t)sizeof(double);
    int64_t tile = TILE_BYTES / per_step;
    r.tile = (int)(tile < 1 ? 1 : (tile > MAX_TILE ? MAX_TILE : tile));
    if (r.tile > r.ns) r.tile = r.ns;
    r.pct_out = out->percentiles;
    r.raw = out->raw_paths;
    int64_t n_tiles = (r.ns + r.tile - 1) / r.tile;
    r.pct_next = calloc((size_t)n_tiles, sizeof(int64_t));
    if (!r.pct_next) { rc = OPSTWIN_E_NOMEM; goto done; }
    for (int j = 0; j < 2; j++) {
        r.ybuf[j] = malloc((size_t)(per_step * r.tile));
        r.brange[j] = malloc(sizeof(double) * 3 * (size_t)(r.n_out * r.tile * r.n_blocks));
        if (!r.ybuf[j] || !r.brange[j]) { rc = OPSTWIN_E_NOMEM; goto done; }
    }
    rc = run_blocks(&r, 0, r.ystride / BP, 1, nthreads, out, &diverged);
    if (rc != OPSTWIN_OK) goto done;
    for (int o = 0; o < r.n_out && !diverged; o++)
        for (int64_t i = 0; i < n; i++)
            if (!isfinite(r.acc[((int64_t)o * 4 + K_SUM) * r.npad + i])) { diverged = 1; break; }
    if (diverged) { rc = OPSTWIN_E_DIVERGED; goto done; }
    if ((rc = sel_alloc(&sel, n)) != OPSTWIN_OK) goto done;
    if ((rc = summarise(&r, out, tmp, &sel)) != OPSTWIN_OK) goto done;
    copy_paths(&r, out);
    out->n_paths_run = n;

done:
    sel_free(&sel);
    free(tmp);
    free_run(&r);
    return rc;
}

/* ------------------------------------------------------------------ public: RNG */

typedef struct {
    uint64_t seed;
    int64_t n, n_blocks;
    int tid, nthreads, avx2;
    double *sums;
} fjob_t;

static void *run_floor(void *arg)
{
    fjob_t *j = arg;
    double buf[FLOOR_CHUNK];
    int64_t idx[FLOOR_CHUNK + 1];
    uint64_t word[FLOOR_CHUNK + 1];
    rejects_t rej = {idx, word, 0};
    for (int64_t b = j->tid; b < j->n_blocks; b += j->nthreads) {
        block_rng_t br;
        block_rng_seed(&br, j->seed, b);
        int64_t left = j->n - b * FLOOR_BLOCK;
        if (left > FLOOR_BLOCK) left = FLOOR_BLOCK;
        double s = 0;
        while (left > 0) {
            int64_t take = left < FLOOR_CHUNK ? left : FLOOR_CHUNK;
            block_normals(&br, buf, round_up(take, LANES), &rej, j->avx2);
            for (int64_t i = 0; i < take; i++) s += buf[i];
            left -= take;
        }
        j->sums[b] = s;
    }
    return NULL;
}

double opstwin_rng_floor(uint64_t seed, int64_t n, int threads)
{
    if (n < 0 || threads < 0) return NAN;
    if (n == 0) return 0.0;
    int64_t nb = (n + FLOOR_BLOCK - 1) / FLOOR_BLOCK;
    double *sums = malloc(sizeof(double) * (size_t)nb);
    if (!sums) return NAN;
    int nt = resolve_threads(threads);
    if (nt > nb) nt = (int)nb;
    fjob_t jobs[MAX_THREADS];
    pthread_t th[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < nt; t++) jobs[t] = (fjob_t){seed, n, nb, t, nt, cpu_has_avx2(), sums};
    for (int t = 1; t < nt; t++) started[t] = pthread_create(&th[t], NULL, run_floor, &jobs[t]) == 0;
    run_floor(&jobs[0]);
    for (int t = 1; t < nt; t++) {
        if (started[t]) pthread_join(th[t], NULL);
        else run_floor(&jobs[t]);
    }
    double total = 0;
    for (int64_t b = 0; b < nb; b++) total += sums[b];
    free(sums);
    return total;
}

int opstwin_rng_normals(uint64_t seed, int64_t block, int64_t n, double *out, int portable)
{
    if (!out) return OPSTWIN_E_NULL;
    if (block < 0 || n < 0 || n % LANES != 0) return OPSTWIN_E_PATHS;
    if (n == 0) return OPSTWIN_OK;
    rejects_t rej = {malloc(sizeof(int64_t) * (size_t)(n + 1)),
                     malloc(sizeof(uint64_t) * (size_t)(n + 1)), 0};
    if (!rej.idx || !rej.word) { free(rej.idx); free(rej.word); return OPSTWIN_E_NOMEM; }
    block_rng_t br;
    block_rng_seed(&br, seed, block);
    block_normals(&br, out, n, &rej, !portable && cpu_has_avx2());
    free(rej.idx);
    free(rej.word);
    return OPSTWIN_OK;
}
