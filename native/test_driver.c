/* Standalone driver for the sanitizer run (tests/unit/test_native_sanitizers.py): exercises
 * every model, adaptive mode, several thread counts and the error paths. Exit 0 = all good. */
#include "opstwin_sim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STEPS 200
#define PATHS 300

static int failures = 0;

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                    \
        }                                                                  \
    } while (0)

#define RAW_PATHS 320 /* PATHS rounded up to whole 64-path blocks (adaptive mode) */
#define OUTS 4
static double pct[OUTS * STEPS * 6], vp[4], vr[4], fv[16], kpi[OUTS * 20], krse[OUTS * 4];
static double raw[RAW_PATHS * STEPS * OUTS];
static double pkpi[OUTS * 4 * RAW_PATHS];
static int32_t pviol[4 * RAW_PATHS];

static opstwin_output outputs(int with_raw)
{
    opstwin_output o;
    memset(&o, 0, sizeof o);
    o.percentiles = pct; o.percentiles_len = OUTS * STEPS * 6;
    o.violation_prob = vp; o.violation_prob_len = 4;
    o.violation_rse = vr; o.violation_rse_len = 4;
    o.first_violation = fv; o.first_violation_len = 16;
    o.kpi = kpi; o.kpi_len = OUTS * 20;
    o.kpi_rse = krse; o.kpi_rse_len = OUTS * 4;
    if (with_raw) { o.raw_paths = raw; o.raw_paths_len = RAW_PATHS * STEPS * OUTS; }
    return o;
}

static opstwin_scenario scenario(int threads, const opstwin_constraint *c, int nc)
{
    opstwin_scenario s;
    memset(&s, 0, sizeof s);
    s.dt = 0.5; s.n_steps = STEPS; s.seed = 12345; s.n_paths = PATHS; s.threads = threads;
    s.constraints = c; s.n_constraints = nc;
    return s;
}

static void set_param(opstwin_param *p, int kind, double a, double b, double c)
{
    p->kind = kind; p->a = a; p->b = b; p->c = c;
}

static void with_path_stats(opstwin_output *o)
{
    o->path_kpi = pkpi; o->path_kpi_len = OUTS * 4 * RAW_PATHS;
    o->path_violation = pviol; o->path_violation_len = 4 * RAW_PATHS;
}

/* The per-path KPIs and first violations of the last run with raw paths and path stats equal
 * what those raw paths give (the mean summed step by step, as the kernel does). */
static void check_path_stats(const opstwin_scenario *s, int64_t n, int n_out)
{
    for (int o = 0; o < n_out; o++)
        for (int64_t i = 0; i < n; i++) {
            const double *y = raw + i * STEPS * n_out + o;
            double mx = -INFINITY, mn = INFINITY, sum = 0;
            for (int k = 0; k < STEPS; k++) {
                double v = y[(int64_t)k * n_out];
                mx = v > mx ? v : mx;
                mn = v < mn ? v : mn;
                sum += v;
            }
            const double *got = pkpi + (int64_t)o * 4 * n + i;
            CHECK(got[0] == y[(int64_t)(STEPS - 1) * n_out]);
            CHECK(got[n] == mx);
            CHECK(got[2 * n] == mn);
            CHECK(got[3 * n] == sum / STEPS);
        }
    for (int c = 0; c < s->n_constraints; c++)
        for (int64_t i = 0; i < n; i++) {
            const opstwin_constraint *k = &s->constraints[c];
            int32_t want = -1;
            for (int step = 0; step < STEPS && want < 0; step++) {
                double v = raw[(i * STEPS + step) * n_out + k->output];
                if (k->kind == OPSTWIN_UPPER ? v > k->limit : v < k->limit) want = step;
            }
            CHECK(pviol[c * n + i] == want);
        }
}

/* Every thread count, and the portable code beside the vector code: the same numbers, with or
 * without the per-path results. */
static void run_all_threads(const opstwin_model *m, const opstwin_constraint *c, int nc)
{
    static double first[OUTS * STEPS * 6], first_kpi[OUTS * 20];
    for (int t = 0; t <= 4; t++) {
        opstwin_scenario s = scenario(t < 4 ? t : 2, c, nc);
        s.portable = t == 4;
        opstwin_output o = outputs(t == 2);
        if (t >= 2) with_path_stats(&o);
        int rc = opstwin_sim_run(m, &s, &o);
        CHECK(rc == OPSTWIN_OK);
        CHECK(o.n_paths_run == PATHS);
        if (t == 0) {
            memcpy(first, pct, sizeof first);
            memcpy(first_kpi, kpi, sizeof first_kpi);
        } else {
            CHECK(memcmp(first, pct, sizeof first) == 0);
            CHECK(memcmp(first_kpi, kpi, sizeof first_kpi) == 0);
        }
        if (t == 2) check_path_stats(&s, PATHS, m->kind == OPSTWIN_MODEL_STATESPACE ? m->p : 1);
    }
}

int main(void)
{
    opstwin_constraint cons[2] = {{0, OPSTWIN_UPPER, 52.0}, {0, OPSTWIN_LOWER, 49.0}};
    opstwin_model m;

    /* FOPDT with every distribution and noise */
    memset(&m, 0, sizeof m);
    m.kind = OPSTWIN_MODEL_FOPDT;
    set_param(&m.params[0], OPSTWIN_DIST_NORMAL, 2.0, 0.3, 0);
    set_param(&m.params[1], OPSTWIN_DIST_LOGNORMAL, log(10.0), 0.3, 0);
    set_param(&m.params[2], OPSTWIN_DIST_TRIANGULAR, 0, 2, 5);
    set_param(&m.params[3], OPSTWIN_DIST_FIXED, 0.05, 0, 0);            /* sigma_w */
    set_param(&m.params[4], OPSTWIN_DIST_UNIFORM, 0.1, 0.3, 0);         /* sigma_v */
    m.y0 = 50;
    m.n_inputs = 1; m.inputs[0] = (opstwin_input){OPSTWIN_INPUT_RAMP, 1, 3, 5, 20};
    run_all_threads(&m, cons, 2);

    /* tank */
    memset(&m, 0, sizeof m);
    m.kind = OPSTWIN_MODEL_TANK;
    set_param(&m.params[0], OPSTWIN_DIST_UNIFORM, 1.5, 2.5, 0);
    set_param(&m.params[1], OPSTWIN_DIST_FIXED, 0.05, 0, 0);
    set_param(&m.params[2], OPSTWIN_DIST_NORMAL, 0.02, 0.002, 0);
    set_param(&m.params[3], OPSTWIN_DIST_FIXED, 3.0, 0, 0);
    set_param(&m.params[4], OPSTWIN_DIST_FIXED, 0.001, 0, 0);
    set_param(&m.params[5], OPSTWIN_DIST_FIXED, 0.01, 0, 0);
    m.y0 = 0.5;
    m.n_inputs = 1; m.inputs[0] = (opstwin_input){OPSTWIN_INPUT_STEP, 40, 80, 10, 0};
    opstwin_constraint tc = {0, OPSTWIN_UPPER, 2.0};
    run_all_threads(&m, &tc, 1);

    /* state-space, full size */
    memset(&m, 0, sizeof m);
    m.kind = OPSTWIN_MODEL_STATESPACE;
    m.n = 8; m.m = 4; m.p = 4; m.n_inputs = 4;
    for (int i = 0; i < 8; i++) {
        m.A[i * 8 + i] = 0.9;
        if (i + 1 < 8) m.A[i * 8 + i + 1] = 0.05;
        m.x0[i] = i;
        m.q[i] = 0.01;
        for (int j = 0; j < 4; j++) m.B[i * 4 + j] = 0.1 * (i + j);
    }
    for (int i = 0; i < 4; i++) {
        m.r[i] = 0.04;
        m.C[i * 8 + 2 * i] = 1.0;
        m.inputs[i] = (opstwin_input){OPSTWIN_INPUT_HOLD, 1.0 * i, 0, 0, 0};
    }
    opstwin_constraint sc[2] = {{3, OPSTWIN_UPPER, 10.0}, {1, OPSTWIN_LOWER, 0.0}};
    run_all_threads(&m, sc, 2);

    /* Weibull */
    memset(&m, 0, sizeof m);
    m.kind = OPSTWIN_MODEL_WEIBULL;
    set_param(&m.params[0], OPSTWIN_DIST_UNIFORM, 1.5, 2.5, 0);
    set_param(&m.params[1], OPSTWIN_DIST_FIXED, 100.0, 0, 0);
    set_param(&m.params[2], OPSTWIN_DIST_FIXED, 40.0, 0, 0);
    opstwin_constraint wc = {0, OPSTWIN_UPPER, 0.5};
    run_all_threads(&m, &wc, 1);

    /* adaptive, odd batch size, with raw paths sized for max_paths */
    {
        opstwin_scenario s = scenario(3, &wc, 1);
        s.adaptive = 1; s.batch = 70; s.max_paths = PATHS; s.rse_target = 1e-9;
        opstwin_output o = outputs(1);
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_OK);
        CHECK(o.n_paths_run == PATHS);
        s.rse_target = 0.5;
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_OK);
        CHECK(o.n_paths_run == 128);
        with_path_stats(&o); /* every path run, at stride n_paths_run */
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_OK);
        CHECK(o.n_paths_run == 128);
        check_path_stats(&s, o.n_paths_run, 1);
        o.path_violation_len = RAW_PATHS - 1; /* counts max_paths rounded up, as raw_paths */
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_E_OUTPUT);
        o.path_violation_len = RAW_PATHS;
        o.path_kpi_len = 4 * RAW_PATHS - 1;
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_E_OUTPUT);
        o.path_kpi = NULL; /* one without the other */
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_OK);
        o.path_kpi = pkpi; o.path_kpi_len = 4 * RAW_PATHS;
        s.n_constraints = 0; /* drives on a KPI mean */
        s.driving_kpi = 3;
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_OK);
        s.driving_kpi = 4;
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_E_ADAPTIVE);
    }

    /* error paths */
    {
        opstwin_scenario s = scenario(2, NULL, 0);
        opstwin_output o = outputs(0);
        CHECK(opstwin_sim_run(NULL, &s, &o) == OPSTWIN_E_NULL);
        CHECK(opstwin_sim_run(&m, NULL, &o) == OPSTWIN_E_NULL);
        CHECK(opstwin_sim_run(&m, &s, NULL) == OPSTWIN_E_NULL);
        s.n_constraints = 1;
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_E_NULL);
        s.n_constraints = 0;
        s.n_paths = 0;
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_E_PATHS);
        s.n_paths = 10; s.dt = NAN;
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_E_DT);
        s.dt = 1.0; s.n_steps = OPSTWIN_MAX_STEPS + 1;
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_E_STEPS);
        s.n_steps = 10;
        opstwin_model bad = m;
        set_param(&bad.params[1], OPSTWIN_DIST_UNIFORM, -2, -1, 0);
        CHECK(opstwin_sim_run(&bad, &s, &o) == OPSTWIN_E_DOMAIN && o.error_param == 1);
        bad.kind = 77;
        CHECK(opstwin_sim_run(&bad, &s, &o) == OPSTWIN_E_MODEL_KIND);
        bad.kind = OPSTWIN_MODEL_STATESPACE; bad.n = 9; bad.m = 1; bad.p = 1;
        CHECK(opstwin_sim_run(&bad, &s, &o) == OPSTWIN_E_DIMS);
        o.kpi_len = 19;
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_E_OUTPUT);
        o.kpi_len = OUTS * 20;
        with_path_stats(&o);
        o.path_kpi_len = 4 * 10 - 1; /* one output x 4 KPIs x 10 paths */
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_E_OUTPUT);
        o.path_kpi_len = 4 * 10;
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_OK);
        s.constraints = &wc; s.n_constraints = 1;
        o.path_violation_len = 9;
        CHECK(opstwin_sim_run(&m, &s, &o) == OPSTWIN_E_OUTPUT);
        for (int c = 1; c >= -20; c--) CHECK(opstwin_sim_strerror(c) != NULL);
    }

    double f1 = opstwin_rng_floor(3, 200000, 1), f3 = opstwin_rng_floor(3, 200000, 3);
    CHECK(f1 == f3);
    CHECK(isnan(opstwin_rng_floor(3, -1, 1)));
    {
        static double a[40000], b[40000];
        CHECK(opstwin_rng_normals(9, 5, 40000, a, 0) == OPSTWIN_OK);
        CHECK(opstwin_rng_normals(9, 5, 40000, b, 1) == OPSTWIN_OK);
        CHECK(memcmp(a, b, sizeof a) == 0);
        CHECK(opstwin_rng_normals(9, 5, 7, a, 0) == OPSTWIN_E_PATHS);
        CHECK(opstwin_rng_normals(9, 5, 8, NULL, 0) == OPSTWIN_E_NULL);
    }

    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("test_driver: all checks passed\n");
    return 0;
}
