/* OpsTwin what-if Monte Carlo kernel: the public C API.
 *
 * Implements native/SPEC.md (the model contract shared with gateway/sim/reference.py).
 * C99 + libm + pthreads (AVX2 code paths chosen at run time on x86-64 with GCC or Clang).
 * Every entry point validates its input and returns a negative OPSTWIN_E_* code on bad input
 * or allocation failure; nothing asserts or aborts.
 *
 * Layout conventions (o = model output, 0..n_out-1; every output is summarised in one pass)
 *   - All matrices are row-major and compact: A is n*n, B is n*m, C is p*n.
 *   - percentiles[(o*n_steps + k)*6 + j]  step k, j over OPSTWIN_PERCENTILES (5,25,50,75,95,99).
 *   - first_violation[c*4 + j]  constraint c, j = p5, p50, p95, mean of t_{k+1} (NaN if none).
 *   - kpi[o*20 + i*5 + j]       i = final, max, min, mean; j = mean, std (ddof 0), p5, p50, p95.
 *   - kpi_rse[o*4 + i]
 *   - raw_paths[(i*n_steps + k)*n_out + o]  optional debug copy of every path's outputs.
 *   - path_kpi[(o*4 + f)*n + i]   optional: path i's KPI f (final, max, min, mean) of output o.
 *   - path_violation[c*n + i]     optional: step k of path i's first violation of constraint c
 *                                 (its time is t_{k+1}), -1 if it never violates it.
 *   (n = n_paths_run, the stride of both.)
 *
 * Random numbers (SPEC.md, "Random numbers"): every 64-path block has its own nine xoshiro256++
 * streams (eight noise lanes and one auxiliary stream), seeded from (seed, block) alone, so a
 * result depends on the seed only, never on the thread count, the tile size or the CPU's
 * vector unit. Adaptive batches are rounded up to a multiple of 64 paths.
 */
#ifndef OPSTWIN_SIM_H
#define OPSTWIN_SIM_H

#include <stdint.h>

#define OPSTWIN_MAX_STATES 8
#define OPSTWIN_MAX_INPUTS 4
#define OPSTWIN_MAX_OUTPUTS 4
#define OPSTWIN_MAX_PARAMS 6
#define OPSTWIN_MAX_STEPS 1000000
#define OPSTWIN_MAX_CONSTRAINTS 64
#define OPSTWIN_MAX_VALUES 268435456 /* paths * steps * outputs (2 GiB of doubles, as models.py) */
#define OPSTWIN_BLOCK_PATHS 64
#define OPSTWIN_N_PERCENTILES 6

/* Error codes (0 = success). */
#define OPSTWIN_OK 0
#define OPSTWIN_E_NULL (-1)        /* a required pointer is NULL */
#define OPSTWIN_E_MODEL_KIND (-2)  /* unknown model kind */
#define OPSTWIN_E_DIST (-3)        /* bad distribution spec (unknown kind, NaN, sd < 0, lo > hi) */
#define OPSTWIN_E_DOMAIN (-4)      /* parameter outside its domain (fixed, or 100 redraws failed); see error_param */
#define OPSTWIN_E_DIMS (-5)        /* state-space n/m/p out of range */
#define OPSTWIN_E_NONFINITE (-6)   /* NaN/inf in a matrix, initial value, input or limit */
#define OPSTWIN_E_NOISE (-7)       /* negative or non-finite noise level */
#define OPSTWIN_E_INPUT (-8)       /* bad input profile (kind, count, ramp t1 < t0) */
#define OPSTWIN_E_PATHS (-9)       /* path count < 1 */
#define OPSTWIN_E_STEPS (-10)      /* n_steps < 1 or > OPSTWIN_MAX_STEPS */
#define OPSTWIN_E_DT (-11)         /* dt <= 0 or not finite */
#define OPSTWIN_E_CONSTRAINT (-12) /* bad constraint (count, kind, output index) */
#define OPSTWIN_E_OUTPUT (-13)     /* output buffer NULL or shorter than required */
#define OPSTWIN_E_TOO_LARGE (-14)  /* paths * steps exceeds OPSTWIN_MAX_VALUES */
#define OPSTWIN_E_NOMEM (-15)      /* allocation failed */
#define OPSTWIN_E_DIVERGED (-16)   /* a path produced a non-finite output */
#define OPSTWIN_E_ADAPTIVE (-17)   /* bad adaptive settings (batch, max_paths, rse_target) */
#define OPSTWIN_E_THREADS (-18)    /* threads < 0 */

/* Distribution of one parameter, drawn once per path. */
#define OPSTWIN_DIST_FIXED 0      /* value a */
#define OPSTWIN_DIST_NORMAL 1     /* mean a, sd b */
#define OPSTWIN_DIST_UNIFORM 2    /* lo a, hi b */
#define OPSTWIN_DIST_TRIANGULAR 3 /* lo a, mode b, hi c */
#define OPSTWIN_DIST_LOGNORMAL 4  /* mu a, sigma b of the underlying normal */

/* Model kinds and the meaning of params[]. */
#define OPSTWIN_MODEL_FOPDT 1      /* params: K, tau > 0, theta >= 0, sigma_w >= 0, sigma_v >= 0; y0; inputs[0] */
#define OPSTWIN_MODEL_STATESPACE 2 /* n, m, p, A, B, C, x0, q[n], r[p]; inputs[0..m-1] */
#define OPSTWIN_MODEL_TANK 3       /* params: area > 0, c_in >= 0, c_out >= 0, h_max > 0, sigma_w >= 0, sigma_v >= 0; y0 = h0; inputs[0] (%) */
#define OPSTWIN_MODEL_WEIBULL 4    /* params: beta > 0, eta > 0, a0 >= 0 */

/* Input profiles u(t). */
#define OPSTWIN_INPUT_HOLD 0 /* u0 */
#define OPSTWIN_INPUT_STEP 1 /* u0 for t < t0, u1 after */
#define OPSTWIN_INPUT_RAMP 2 /* u0 until t0, linear to u1 at t1, u1 after */

#define OPSTWIN_UPPER 1 /* violated when y > limit */
#define OPSTWIN_LOWER 0 /* violated when y < limit */

typedef struct {
    int kind; /* OPSTWIN_DIST_* */
    double a, b, c;
} opstwin_param;

typedef struct {
    int kind; /* OPSTWIN_INPUT_* */
    double u0, u1, t0, t1;
} opstwin_input;

typedef struct {
    int kind; /* OPSTWIN_MODEL_* */
    opstwin_param params[OPSTWIN_MAX_PARAMS];
    double y0;      /* FOPDT initial output, tank initial level */
    int n, m, p;    /* state-space dimensions */
    double A[OPSTWIN_MAX_STATES * OPSTWIN_MAX_STATES];
    double B[OPSTWIN_MAX_STATES * OPSTWIN_MAX_INPUTS];
    double C[OPSTWIN_MAX_OUTPUTS * OPSTWIN_MAX_STATES];
    double x0[OPSTWIN_MAX_STATES];
    double q[OPSTWIN_MAX_STATES];  /* process noise variances */
    double r[OPSTWIN_MAX_OUTPUTS]; /* measurement noise variances */
    int n_inputs;                  /* 1 for FOPDT/tank, m for state-space, 0 allowed for Weibull */
    opstwin_input inputs[OPSTWIN_MAX_INPUTS];
} opstwin_model;

typedef struct {
    int output; /* output index (state-space), else 0 */
    int kind;   /* OPSTWIN_UPPER or OPSTWIN_LOWER */
    double limit;
} opstwin_constraint;

typedef struct {
    double dt;
    int n_steps;
    uint64_t seed;
    int64_t n_paths;   /* fixed mode: paths to run */
    int threads;       /* 0 = number of online CPUs; capped at 64 */
    int portable;      /* nonzero: never use the AVX2 code (same numbers, for tests) */
    int n_constraints;
    const opstwin_constraint *constraints;
    int adaptive;      /* nonzero: batches until rse_target or max_paths */
    int64_t batch;     /* rounded up to a multiple of 64 */
    int64_t max_paths;
    double rse_target;
    int driving_kpi;    /* adaptive without constraints: KPI (0 final .. 3 mean) whose mean's */
    int driving_output; /* RSE is targeted, of this output */
} opstwin_scenario;

typedef struct {
    double *percentiles;     int64_t percentiles_len;     /* >= n_out * n_steps * 6 */
    double *violation_prob;  int64_t violation_prob_len;  /* >= n_constraints */
    double *violation_rse;   int64_t violation_rse_len;   /* >= n_constraints */
    double *first_violation; int64_t first_violation_len; /* >= n_constraints * 4 */
    double *kpi;             int64_t kpi_len;             /* >= n_out * 20 */
    double *kpi_rse;         int64_t kpi_rse_len;         /* >= n_out * 4 */
    double *raw_paths;       int64_t raw_paths_len;       /* optional; >= paths * n_steps * n_out (paths rounded up to 64 if adaptive) */
    /* written by the kernel */
    int64_t n_paths_run;
    int error_param;         /* parameter index for OPSTWIN_E_DOMAIN / E_DIST, else -1 */
    /* Optional per-path results (NULL: not wanted, no cost), for joint questions the marginal
     * summaries above cannot answer ("on how many paths did every constraint hold?"). Appended
     * at the end so that every earlier field keeps its offset. Lengths count `paths` as
     * raw_paths does: n_paths, or max_paths rounded up to 64 if adaptive (n_paths_run never
     * exceeds max_paths); the stride of both is n_paths_run. */
    double *path_kpi;        int64_t path_kpi_len;        /* >= n_out * 4 * paths */
    int32_t *path_violation; int64_t path_violation_len;  /* >= n_constraints * paths */
} opstwin_output;

/* Run a simulation; returns OPSTWIN_OK or a negative OPSTWIN_E_* code. */
int opstwin_sim_run(const opstwin_model *model, const opstwin_scenario *scenario, opstwin_output *out);

/* Static message for a return code (never NULL). */
const char *opstwin_sim_strerror(int code);

/* Benchmark floor: n standard normals drawn exactly as the kernel draws its noise (block b's
 * noise lanes, 65,536 normals per block); returns their sum, NaN on bad arguments. */
double opstwin_rng_floor(uint64_t seed, int64_t n, int threads);

/* The first n normals (n a multiple of 8) of block `block`'s noise stream, in the order the
 * kernel consumes them, into out[0..n); nonzero `portable` forces the non-AVX2 code.
 * Returns OPSTWIN_OK or a negative code. For tests of the two code paths. */
int opstwin_rng_normals(uint64_t seed, int64_t block, int64_t n, double *out, int portable);

/* 1 if this build and CPU run the AVX2 code paths, else 0. */
int opstwin_simd_level(void);

#endif
