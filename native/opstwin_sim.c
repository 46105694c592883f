/* OpsTwin Monte Carlo kernel: see opstwin_sim.h and SPEC.md. */
#define _POSIX_C_SOURCE 200809L

#include "opstwin_sim.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_THREADS 64
#define MAX_REDRAWS 100
#define FLOOR_BLOCK 65536

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

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
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

static void rng_jump(rng_t *r)
{
    static const uint64_t JUMP[] = {0x180ec6d33cfd0abaULL, 0xd5a61266f0c9392cULL,
                                    0xa9582618e03fc9aaULL, 0x39abdc4529b1661cULL};
    uint64_t t[4] = {0, 0, 0, 0};
    for (int i = 0; i < 4; i++)
        for (int b = 0; b < 64; b++) {
            if (JUMP[i] & (1ULL << b)) {
                t[0] ^= r->s[0]; t[1] ^= r->s[1]; t[2] ^= r->s[2]; t[3] ^= r->s[3];
            }
            rng_next(r);
        }
    memcpy(r->s, t, sizeof t);
}

static void rng_seed(rng_t *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

/* [0, 1) */
static double rng_uniform(rng_t *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }
/* (0, 1] */
static double rng_uniform_pos(rng_t *r) { return (double)((rng_next(r) >> 11) + 1) * 0x1.0p-53; }

/* Ziggurat (Marsaglia & Tsang 2000), 128 layers; layer i spans x in [0, zx[i]]. */
#define ZIG_R 3.442619855899
#define ZIG_V 9.91256303526217e-3
static double zx[129], zf[129];
static pthread_once_t zig_once = PTHREAD_ONCE_INIT;

static void zig_init(void)
{
    double f = exp(-0.5 * ZIG_R * ZIG_R);
    zx[0] = ZIG_V / f;
    zx[1] = ZIG_R;
    for (int i = 2; i < 128; i++)
        zx[i] = sqrt(-2.0 * log(ZIG_V / zx[i - 1] + exp(-0.5 * zx[i - 1] * zx[i - 1])));
    zx[128] = 0.0;
    for (int i = 0; i <= 128; i++) zf[i] = exp(-0.5 * zx[i] * zx[i]);
}

static double rng_normal(rng_t *r)
{
    for (;;) {
        uint64_t bits = rng_next(r);
        int i = (int)(bits & 127);
        double sign = (bits & 128) ? -1.0 : 1.0;
        double x = (double)(bits >> 11) * 0x1.0p-53 * zx[i];
        if (x < zx[i + 1]) return sign * x;
        if (i == 0) { /* exact tail beyond R (Marsaglia 1964) */
            double xt, y;
            do {
                xt = -log(rng_uniform_pos(r)) / ZIG_R;
                y = -log(rng_uniform_pos(r));
            } while (y + y < xt * xt);
            return sign * (ZIG_R + xt);
        }
        if (zf[i] + rng_uniform(r) * (zf[i + 1] - zf[i]) < exp(-0.5 * x * x)) return sign * x;
    }
}

/* ------------------------------------------------------------------ validation */

typedef struct {
    const opstwin_model *m;
    const opstwin_scenario *s;
    int n_out;       /* outputs of the model */
    int n_params;
    double *u;       /* inputs: u[j*n_steps + k] */
    rng_t *blocks;   /* per-block start state */
    int64_t n_blocks;
    /* per-path storage, grows with adaptive batches */
    double *y;       /* y[i*n_steps + k] (summarised output) */
    double *kv;      /* kv[i*4 + j]: final, max, min, mean */
    int32_t *fv;     /* fv[i*nc + c]: first violation step or -1 */
} ctx_t;

static int n_params_of(int kind)
{
    switch (kind) {
    case OPSTWIN_MODEL_FOPDT: return 3;
    case OPSTWIN_MODEL_TANK: return 4;
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

static int validate(const opstwin_model *m, const opstwin_scenario *s, opstwin_output *o,
                    int *n_out)
{
    int rc;
    if (m->kind < OPSTWIN_MODEL_FOPDT || m->kind > OPSTWIN_MODEL_WEIBULL) return OPSTWIN_E_MODEL_KIND;
    if (!isfinite(s->dt) || s->dt <= 0) return OPSTWIN_E_DT;
    if (s->n_steps < 1 || s->n_steps > OPSTWIN_MAX_STEPS) return OPSTWIN_E_STEPS;
    if (s->threads < 0) return OPSTWIN_E_THREADS;
    int64_t paths;
    if (s->adaptive) {
        if (s->batch < 1 || s->max_paths < 1 || !(s->rse_target > 0) || !isfinite(s->rse_target))
            return OPSTWIN_E_ADAPTIVE;
        paths = s->max_paths;
    } else {
        if (s->n_paths < 1) return OPSTWIN_E_PATHS;
        paths = s->n_paths;
    }
    if (paths > OPSTWIN_MAX_VALUES / s->n_steps) return OPSTWIN_E_TOO_LARGE;

    int n_in = 1;
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
        *n_out = m->p;
    } else {
        *n_out = 1;
        int np = n_params_of(m->kind);
        for (int i = 0; i < np; i++) {
            const opstwin_param *p = &m->params[i];
            if ((rc = check_dist(p)) != OPSTWIN_OK) { o->error_param = i; return rc; }
            if (p->kind == OPSTWIN_DIST_FIXED && !param_ok(m->kind, i, p->a)) {
                o->error_param = i;
                return OPSTWIN_E_DOMAIN;
            }
        }
        if (m->kind == OPSTWIN_MODEL_WEIBULL) {
            n_in = 0;
        } else {
            if (!isfinite(m->y0)) return OPSTWIN_E_NONFINITE;
            if (!isfinite(m->sigma_w) || m->sigma_w < 0 || !isfinite(m->sigma_v) || m->sigma_v < 0)
                return OPSTWIN_E_NOISE;
        }
    }
    if (n_in > 0 && m->n_inputs != n_in) return OPSTWIN_E_INPUT;
    for (int j = 0; j < n_in; j++)
        if ((rc = check_input(&m->inputs[j])) != OPSTWIN_OK) return rc;

    if (s->output_index < 0 || s->output_index >= *n_out) return OPSTWIN_E_CONSTRAINT;
    if (s->n_constraints < 0 || s->n_constraints > OPSTWIN_MAX_CONSTRAINTS) return OPSTWIN_E_CONSTRAINT;
    if (s->n_constraints > 0 && s->constraints == NULL) return OPSTWIN_E_NULL;
    for (int c = 0; c < s->n_constraints; c++) {
        const opstwin_constraint *k = &s->constraints[c];
        if (k->output < 0 || k->output >= *n_out) return OPSTWIN_E_CONSTRAINT;
        if (k->kind != OPSTWIN_UPPER && k->kind != OPSTWIN_LOWER) return OPSTWIN_E_CONSTRAINT;
        if (!isfinite(k->limit)) return OPSTWIN_E_NONFINITE;
    }

    int nc = s->n_constraints;
    if (!o->percentiles || o->percentiles_len < (int64_t)s->n_steps * OPSTWIN_N_PERCENTILES)
        return OPSTWIN_E_OUTPUT;
    if (nc > 0 && (!o->violation_prob || o->violation_prob_len < nc || !o->violation_rse ||
                   o->violation_rse_len < nc || !o->first_violation ||
                   o->first_violation_len < 4 * (int64_t)nc))
        return OPSTWIN_E_OUTPUT;
    if (!o->kpi || o->kpi_len < 20 || !o->kpi_rse || o->kpi_rse_len < 4) return OPSTWIN_E_OUTPUT;
    if (o->raw_paths && o->raw_paths_len < paths * s->n_steps) return OPSTWIN_E_OUTPUT;
    return OPSTWIN_OK;
}

/* ------------------------------------------------------------------ paths */

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

/* Simulates path i with generator r; records y, KPIs and first violations. Returns an error
 * code (and the offending parameter in *bad_param). */
static int sim_path(const ctx_t *c, rng_t *r, int64_t i, int *bad_param)
{
    const opstwin_model *m = c->m;
    const opstwin_scenario *s = c->s;
    const int ns = s->n_steps, nc = s->n_constraints, oi = s->output_index;
    const double dt = s->dt;
    double pv[OPSTWIN_MAX_PARAMS] = {0, 0, 0, 0};
    for (int j = 0; j < c->n_params; j++) {
        int tries = 0;
        do {
            if (tries++ >= MAX_REDRAWS) { *bad_param = j; return OPSTWIN_E_DOMAIN; }
            pv[j] = draw(&m->params[j], r);
        } while (!param_ok(m->kind, j, pv[j]));
    }
    double *yrow = c->y + i * (int64_t)ns;
    int32_t *fv = c->fv + i * (int64_t)nc;
    for (int k = 0; k < nc; k++) fv[k] = -1;
    double yo[OPSTWIN_MAX_OUTPUTS];
    double ymax = -INFINITY, ymin = INFINITY, sum = 0.0;

    /* model state */
    double x = m->y0, a = 0, gain = 0, sw = m->sigma_w, sv = m->sigma_v, life = 0, u0 = 0;
    int64_t d = 0;
    double xs[OPSTWIN_MAX_STATES], xn[OPSTWIN_MAX_STATES], sq[OPSTWIN_MAX_STATES], sr[OPSTWIN_MAX_OUTPUTS];
    switch (m->kind) {
    case OPSTWIN_MODEL_FOPDT: {
        a = exp(-dt / pv[1]);
        gain = pv[0];
        u0 = m->inputs[0].u0;
        double dd = nearbyint(pv[2] / dt);
        d = dd > ns ? ns : (int64_t)dd;
        break;
    }
    case OPSTWIN_MODEL_WEIBULL: {
        double beta = pv[0], eta = pv[1], a0 = pv[2];
        life = eta * pow(pow(a0 / eta, beta) - log(rng_uniform_pos(r)), 1.0 / beta) - a0;
        break;
    }
    case OPSTWIN_MODEL_STATESPACE:
        for (int j = 0; j < m->n; j++) { xs[j] = m->x0[j]; sq[j] = sqrt(m->q[j]); }
        for (int j = 0; j < m->p; j++) sr[j] = sqrt(m->r[j]);
        break;
    default: break;
    }

    for (int k = 0; k < ns; k++) {
        switch (m->kind) {
        case OPSTWIN_MODEL_FOPDT: {
            double uu = k - d < 0 ? u0 : c->u[k - d];
            x = a * x + (1 - a) * (m->y0 + gain * (uu - u0));
            if (sw > 0) x += sw * rng_normal(r);
            yo[0] = sv > 0 ? x + sv * rng_normal(r) : x;
            break;
        }
        case OPSTWIN_MODEL_TANK: {
            double h = x + dt / pv[0] * (pv[1] * c->u[k] / 100.0 - pv[2] * sqrt(x > 0 ? x : 0));
            if (sw > 0) h += sw * rng_normal(r);
            x = h < 0 ? 0 : (h > pv[3] ? pv[3] : h);
            yo[0] = sv > 0 ? x + sv * rng_normal(r) : x;
            break;
        }
        case OPSTWIN_MODEL_WEIBULL:
            yo[0] = life <= (k + 1) * dt ? 1.0 : 0.0;
            break;
        default: { /* state-space */
            const int n = m->n, mm = m->m;
            for (int a1 = 0; a1 < n; a1++) {
                double acc = 0;
                for (int b1 = 0; b1 < n; b1++) acc += m->A[a1 * n + b1] * xs[b1];
                for (int b1 = 0; b1 < mm; b1++) acc += m->B[a1 * mm + b1] * c->u[(int64_t)b1 * ns + k];
                if (sq[a1] > 0) acc += sq[a1] * rng_normal(r);
                xn[a1] = acc;
            }
            memcpy(xs, xn, sizeof(double) * n);
            for (int a1 = 0; a1 < m->p; a1++) {
                double acc = 0;
                for (int b1 = 0; b1 < n; b1++) acc += m->C[a1 * n + b1] * xs[b1];
                if (sr[a1] > 0) acc += sr[a1] * rng_normal(r);
                yo[a1] = acc;
            }
            break;
        }
        }
        double y = yo[oi];
        yrow[k] = y;
        sum += y;
        if (y > ymax) ymax = y;
        if (y < ymin) ymin = y;
        for (int j = 0; j < nc; j++) {
            const opstwin_constraint *cs = &s->constraints[j];
            if (fv[j] < 0) {
                double v = yo[cs->output];
                if (cs->kind == OPSTWIN_UPPER ? v > cs->limit : v < cs->limit) fv[j] = k;
            }
        }
    }
    if (!isfinite(sum)) return OPSTWIN_E_DIVERGED;
    double *kv = c->kv + i * 4;
    kv[0] = yrow[ns - 1];
    kv[1] = ymax;
    kv[2] = ymin;
    kv[3] = sum / ns;
    return OPSTWIN_OK;
}

typedef struct {
    const ctx_t *c;
    int64_t p_lo, p_hi; /* paths of this batch */
    int tid, nthreads;
    int rc, bad_param;
    int64_t err_path;
} job_t;

static void *run_paths(void *arg)
{
    job_t *j = arg;
    int64_t b_lo = j->p_lo / OPSTWIN_BLOCK_PATHS;
    int64_t b_hi = (j->p_hi + OPSTWIN_BLOCK_PATHS - 1) / OPSTWIN_BLOCK_PATHS;
    for (int64_t b = b_lo + j->tid; b < b_hi; b += j->nthreads) {
        rng_t r = j->c->blocks[b];
        int64_t lo = b * OPSTWIN_BLOCK_PATHS, hi = lo + OPSTWIN_BLOCK_PATHS;
        if (hi > j->p_hi) hi = j->p_hi;
        for (int64_t i = lo; i < hi; i++) {
            int bad = -1;
            int rc = sim_path(j->c, &r, i, &bad);
            if (rc != OPSTWIN_OK) {
                j->rc = rc; j->bad_param = bad; j->err_path = i;
                return NULL;
            }
        }
    }
    return NULL;
}

/* Runs thread_fn over jobs[0..n) with jobs 1.. on new threads; a failed pthread_create falls
 * back to running that job in the caller, so results never depend on thread availability. */
static void run_parallel(void *(*fn)(void *), void *jobs, size_t job_size, int n)
{
    pthread_t th[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 1; t < n; t++)
        started[t] = pthread_create(&th[t], NULL, fn, (char *)jobs + t * job_size) == 0;
    fn(jobs);
    for (int t = 1; t < n; t++) {
        if (started[t]) pthread_join(th[t], NULL);
        else fn((char *)jobs + t * job_size);
    }
}

static int resolve_threads(int threads)
{
    if (threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        threads = n > 0 ? (int)n : 1;
    }
    return threads > MAX_THREADS ? MAX_THREADS : threads;
}

/* ------------------------------------------------------------------ statistics */

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

/* Percentiles q[0..nq) (ascending) of a[0..n); a is reordered. */
static void percentiles(double *a, int64_t n, const double *q, int nq, double *res)
{
    int64_t start = 0;
    for (int j = 0; j < nq; j++) {
        double pos = q[j] / 100.0 * (double)(n - 1);
        int64_t lo = (int64_t)floor(pos);
        if (lo > n - 1) lo = n - 1;
        double frac = pos - (double)lo;
        select_k(a, start, n - 1, lo);
        double v = a[lo];
        if (lo + 1 < n) {
            double nx = a[lo + 1];
            for (int64_t i = lo + 2; i < n; i++)
                if (a[i] < nx) nx = a[i];
            v = lerp(v, nx, frac);
        }
        res[j] = v;
        start = lo;
    }
}

typedef struct {
    const ctx_t *c;
    int64_t n;
    int tid, nthreads, tile;
    double *col; /* tile columns of n values */
    double *out;
} pjob_t;

/* Steps go to threads in tiles of adjacent steps: gathering a tile reads whole cache lines of
 * the path-major storage instead of one double per line. */
static void *run_pcts(void *arg)
{
    pjob_t *j = arg;
    const int ns = j->c->s->n_steps, tile = j->tile;
    const int64_t n = j->n;
    for (int k0 = j->tid * tile; k0 < ns; k0 += j->nthreads * tile) {
        int w = ns - k0 < tile ? ns - k0 : tile;
        for (int64_t i = 0; i < n; i++) {
            const double *row = j->c->y + i * ns + k0;
            for (int t = 0; t < w; t++) j->col[t * n + i] = row[t];
        }
        for (int t = 0; t < w; t++)
            percentiles(j->col + t * n, n, PCTS, OPSTWIN_N_PERCENTILES,
                        j->out + (int64_t)(k0 + t) * OPSTWIN_N_PERCENTILES);
    }
    return NULL;
}

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

/* RSE that drives adaptive mode: first constraint's probability, else the first KPI mean. */
static double driving_rse(const ctx_t *c, int64_t n)
{
    if (c->s->n_constraints > 0) {
        int64_t hits = 0;
        for (int64_t i = 0; i < n; i++) hits += c->fv[i * c->s->n_constraints] >= 0;
        return prob_rse((double)hits / n, n);
    }
    double s = 0, ss = 0;
    for (int64_t i = 0; i < n; i++) s += c->kv[i * 4];
    double mu = s / n;
    for (int64_t i = 0; i < n; i++) ss += (c->kv[i * 4] - mu) * (c->kv[i * 4] - mu);
    return mean_rse(mu, sqrt(ss / n), n);
}

static int summarise(const ctx_t *c, int64_t n, int nthreads, opstwin_output *o)
{
    const int ns = c->s->n_steps, nc = c->s->n_constraints;
    int64_t tmp_len = n > 4 ? n : 4;
    double *tmp = malloc(sizeof(double) * tmp_len);
    if (!tmp) return OPSTWIN_E_NOMEM;

    /* KPIs */
    static const double KQ[3] = {5, 50, 95};
    for (int j = 0; j < 4; j++) {
        double sd, *row = o->kpi + j * 5;
        for (int64_t i = 0; i < n; i++) tmp[i] = c->kv[i * 4 + j];
        row[0] = mean_std(tmp, n, &sd);
        row[1] = sd;
        percentiles(tmp, n, KQ, 3, row + 2);
        o->kpi_rse[j] = mean_rse(row[0], sd, n);
    }
    /* constraints */
    for (int j = 0; j < nc; j++) {
        int64_t hits = 0;
        double s = 0;
        for (int64_t i = 0; i < n; i++) {
            int32_t k = c->fv[i * nc + j];
            if (k >= 0) { tmp[hits++] = (k + 1) * c->s->dt; s += (k + 1) * c->s->dt; }
        }
        double p = (double)hits / n;
        o->violation_prob[j] = p;
        o->violation_rse[j] = prob_rse(p, n);
        double *fvo = o->first_violation + j * 4;
        if (hits > 0) {
            percentiles(tmp, hits, KQ, 3, fvo);
            fvo[3] = s / hits;
        } else {
            fvo[0] = fvo[1] = fvo[2] = fvo[3] = NAN;
        }
    }
    free(tmp);

    /* per-step percentiles, steps spread over threads */
    int tile = n <= (1 << 20) ? 8 : 1;
    int n_tiles = (ns + tile - 1) / tile;
    if (nthreads > n_tiles) nthreads = n_tiles;
    pjob_t jobs[MAX_THREADS];
    int ok = 1;
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = (pjob_t){c, n, t, nthreads, tile, malloc(sizeof(double) * n * tile), o->percentiles};
        if (!jobs[t].col) ok = 0;
    }
    if (ok) run_parallel(run_pcts, jobs, sizeof(pjob_t), nthreads);
    for (int t = 0; t < nthreads; t++) free(jobs[t].col);
    if (!ok) return OPSTWIN_E_NOMEM;

    if (o->raw_paths) memcpy(o->raw_paths, c->y, sizeof(double) * n * ns);
    return OPSTWIN_OK;
}

/* ------------------------------------------------------------------ public: run */

static int grow(ctx_t *c, int64_t n)
{
    const int ns = c->s->n_steps, nc = c->s->n_constraints;
    double *y = realloc(c->y, sizeof(double) * n * ns);
    if (!y) return OPSTWIN_E_NOMEM;
    c->y = y;
    double *kv = realloc(c->kv, sizeof(double) * n * 4);
    if (!kv) return OPSTWIN_E_NOMEM;
    c->kv = kv;
    int32_t *fv = realloc(c->fv, sizeof(int32_t) * n * (nc > 0 ? nc : 1));
    if (!fv) return OPSTWIN_E_NOMEM;
    c->fv = fv;
    int64_t nb = (n + OPSTWIN_BLOCK_PATHS - 1) / OPSTWIN_BLOCK_PATHS;
    if (nb > c->n_blocks) {
        rng_t *bl = realloc(c->blocks, sizeof(rng_t) * nb);
        if (!bl) return OPSTWIN_E_NOMEM;
        c->blocks = bl;
        for (int64_t b = c->n_blocks; b < nb; b++) {
            bl[b] = bl[b - 1];
            rng_jump(&bl[b]);
        }
        c->n_blocks = nb;
    }
    return OPSTWIN_OK;
}

int opstwin_sim_run(const opstwin_model *model, const opstwin_scenario *scen, opstwin_output *out)
{
    if (!model || !scen || !out) return OPSTWIN_E_NULL;
    out->error_param = -1;
    out->n_paths_run = 0;
    ctx_t c;
    memset(&c, 0, sizeof c);
    int rc = validate(model, scen, out, &c.n_out);
    if (rc != OPSTWIN_OK) return rc;
    pthread_once(&zig_once, zig_init);

    c.m = model;
    c.s = scen;
    c.n_params = model->kind == OPSTWIN_MODEL_STATESPACE ? 0 : n_params_of(model->kind);
    const int ns = scen->n_steps;
    int n_in = model->kind == OPSTWIN_MODEL_STATESPACE ? model->m
               : (model->kind == OPSTWIN_MODEL_WEIBULL ? 0 : 1);
    c.u = malloc(sizeof(double) * ns * (n_in > 0 ? n_in : 1));
    c.blocks = malloc(sizeof(rng_t));
    if (!c.u || !c.blocks) { rc = OPSTWIN_E_NOMEM; goto done; }
    for (int j = 0; j < n_in; j++)
        for (int k = 0; k < ns; k++) c.u[(int64_t)j * ns + k] = input_at(&model->inputs[j], k * scen->dt);
    rng_seed(&c.blocks[0], scen->seed);
    c.n_blocks = 1;

    int64_t target = scen->adaptive ? scen->max_paths : scen->n_paths;
    int64_t batch = target;
    if (scen->adaptive)
        batch = (scen->batch + OPSTWIN_BLOCK_PATHS - 1) / OPSTWIN_BLOCK_PATHS * OPSTWIN_BLOCK_PATHS;
    int nthreads = resolve_threads(scen->threads);
    int64_t done_paths = 0;
    while (done_paths < target) {
        int64_t hi = done_paths + batch > target ? target : done_paths + batch;
        if ((rc = grow(&c, hi)) != OPSTWIN_OK) goto done;
        int64_t blocks = (hi - done_paths + OPSTWIN_BLOCK_PATHS - 1) / OPSTWIN_BLOCK_PATHS;
        int nt = blocks < nthreads ? (int)blocks : nthreads;
        job_t jobs[MAX_THREADS];
        for (int t = 0; t < nt; t++)
            jobs[t] = (job_t){&c, done_paths, hi, t, nt, OPSTWIN_OK, -1, INT64_MAX};
        run_parallel(run_paths, jobs, sizeof(job_t), nt);
        int64_t first = INT64_MAX;
        for (int t = 0; t < nt; t++)
            if (jobs[t].rc != OPSTWIN_OK && jobs[t].err_path < first) {
                first = jobs[t].err_path;
                rc = jobs[t].rc;
                out->error_param = jobs[t].bad_param;
            }
        if (rc != OPSTWIN_OK) goto done;
        done_paths = hi;
        if (scen->adaptive && driving_rse(&c, done_paths) <= scen->rse_target) break;
    }
    out->n_paths_run = done_paths;
    rc = summarise(&c, done_paths, nthreads, out);

done:
    free(c.u);
    free(c.blocks);
    free(c.y);
    free(c.kv);
    free(c.fv);
    return rc;
}

/* ------------------------------------------------------------------ public: RNG floor */

typedef struct {
    const rng_t *blocks;
    int64_t n, n_blocks;
    int tid, nthreads;
    double *sums;
} fjob_t;

static void *run_floor(void *arg)
{
    fjob_t *j = arg;
    for (int64_t b = j->tid; b < j->n_blocks; b += j->nthreads) {
        rng_t r = j->blocks[b];
        int64_t lo = b * FLOOR_BLOCK, hi = lo + FLOOR_BLOCK > j->n ? j->n : lo + FLOOR_BLOCK;
        double s = 0;
        for (int64_t i = lo; i < hi; i++) s += rng_normal(&r);
        j->sums[b] = s;
    }
    return NULL;
}

double opstwin_rng_floor(uint64_t seed, int64_t n, int threads)
{
    if (n < 0 || threads < 0) return NAN;
    if (n == 0) return 0.0;
    pthread_once(&zig_once, zig_init);
    int64_t nb = (n + FLOOR_BLOCK - 1) / FLOOR_BLOCK;
    rng_t *blocks = malloc(sizeof(rng_t) * nb);
    double *sums = malloc(sizeof(double) * nb);
    if (!blocks || !sums) { free(blocks); free(sums); return NAN; }
    rng_seed(&blocks[0], seed);
    for (int64_t b = 1; b < nb; b++) { blocks[b] = blocks[b - 1]; rng_jump(&blocks[b]); }
    int nt = resolve_threads(threads);
    if (nt > nb) nt = (int)nb;
    fjob_t jobs[MAX_THREADS];
    for (int t = 0; t < nt; t++) jobs[t] = (fjob_t){blocks, n, nb, t, nt, sums};
    run_parallel(run_floor, jobs, sizeof(fjob_t), nt);
    double total = 0;
    for (int64_t b = 0; b < nb; b++) total += sums[b];
    free(blocks);
    free(sums);
    return total;
}
