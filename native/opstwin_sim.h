/* OpsTwin what-if Monte Carlo kernel: the public C API.
 *
 * Implements native/SPEC.md (the model contract shared with gateway/sim/reference.py).
 * C99 + libm + pthreads. Every entry point validates its input and returns a negative
 * OPSTWIN_E_* code on bad input or allocation failure; nothing asserts or aborts.
 *
 * Layout conventions
 *   - All matrices are row-major and compact: A is n*n, B is n*m, C is p*n.
 *   - percentiles[k*6 + j]      step k, j over OPSTWIN_PERCENTILES (5,25,50,75,95,99).
 *   - first_violation[c*4 + j]  constraint c, j = p5, p50, p95, mean of t_{k+1} (NaN if none).
 *   - kpi[i*5 + j]              i = final, max, min, mean; j = mean, std (ddof 0), p5, p50, p95.
 *   - raw_paths[i*n_steps + k]  optional debug copy of every path's recorded output.
 *
 * Random numbers: xoshiro256++ seeded by splitmix64(seed); path block b (paths 64b..64b+63)
 * uses the generator state after b jump()s, paths of a block consume it in order, so the
 * result depends on the seed only, never on the thread count. Adaptive batches are rounded
 * up to a multiple of 64 so a block never straddles two batches.
 */
#ifndef OPSTWIN_SIM_H
#define OPSTWIN_SIM_H

#include <stdint.h>

#define OPSTWIN_MAX_STATES 8
#define OPSTWIN_MAX_INPUTS 4
#define OPSTWIN_MAX_OUTPUTS 4
#define OPSTWIN_MAX_PARAMS 4
#define OPSTWIN_MAX_STEPS 1000000
#define OPSTWIN_MAX_CONSTRAINTS 64
#define OPSTWIN_MAX_VALUES 134217728 /* paths * steps held in memory (1 GiB of doubles) */
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
#define OPSTWIN_MODEL_FOPDT 1      /* params: K, tau > 0, theta >= 0; y0; inputs[0]; sigma_w, sigma_v */
#define OPSTWIN_MODEL_STATESPACE 2 /* n, m, p, A, B, C, x0, q[n], r[p]; inputs[0..m-1] */
#define OPSTWIN_MODEL_TANK 3       /* params: area > 0, c_in >= 0, c_out >= 0, h_max > 0; y0 = h0; inputs[0] (%) */
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
    double sigma_w; /* process noise sd (FOPDT, tank) */
    double sigma_v; /* measurement noise sd (FOPDT, tank) */
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
    int output_index;  /* output summarised by percentiles / KPIs (state-space), else 0 */
    int n_constraints;
    const opstwin_constraint *constraints;
    int adaptive;      /* nonzero: batches until rse_target or max_paths */
    int64_t batch;     /* rounded up to a multiple of 64 */
    int64_t max_paths;
    double rse_target;
} opstwin_scenario;

typedef struct {
    double *percentiles;     int64_t percentiles_len;     /* >= n_steps * 6 */
    double *violation_prob;  int64_t violation_prob_len;  /* >= n_constraints */
    double *violation_rse;   int64_t violation_rse_len;   /* >= n_constraints */
    double *first_violation; int64_t first_violation_len; /* >= n_constraints * 4 */
    double *kpi;             int64_t kpi_len;             /* >= 20 */
    double *kpi_rse;         int64_t kpi_rse_len;         /* >= 4 */
    double *raw_paths;       int64_t raw_paths_len;       /* optional; >= paths * n_steps (max_paths if adaptive) */
    /* written by the kernel */
    int64_t n_paths_run;
    int error_param;         /* parameter index for OPSTWIN_E_DOMAIN / E_DIST, else -1 */
} opstwin_output;

/* Run a simulation; returns OPSTWIN_OK or a negative OPSTWIN_E_* code. */
int opstwin_sim_run(const opstwin_model *model, const opstwin_scenario *scenario, opstwin_output *out);

/* Static message for a return code (never NULL). */
const char *opstwin_sim_strerror(int code);

/* Benchmark floor: n standard normals drawn exactly as the kernel does (blocks of 64 * 1024
 * numbers, block b on the state after b jumps); returns their sum, NaN on bad arguments. */
double opstwin_rng_floor(uint64_t seed, int64_t n, int threads);

#endif
