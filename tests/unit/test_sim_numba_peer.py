"""The Numba peer of the simulation benchmark (bench/sim_numba.py) checked against the C kernel.

The peer is what the C kernel's speed is measured against, so it must compute the same thing:
the same output fields and shapes as `gateway.sim.native.simulate` on bench/sim.py's reference
oven, and the same statistics within tolerances from the sample size (their random streams
differ). The same check must reject a peer with a wrong parameter. Skipped without numba (the
optional `bench` extra); compiling the peer takes most of this module's ~15 s.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from tests_support import import_file

from gateway.sim import native
from gateway.sim.results import SimResult

pytest.importorskip("numba")

BENCH = Path(__file__).resolve().parents[2] / "bench"
PATHS = 4000
SEED = 7


@pytest.fixture(scope="module")
def peer() -> ModuleType:
    """bench/sim_numba.py, compiled (bench/ is scripts, not a package)."""
    module = import_file(BENCH / "sim_numba.py")
    module.compile_seconds()
    return module


@pytest.fixture(scope="module")
def c_result(simkernel: ModuleType) -> SimResult:
    """The C kernel on bench/sim.py's reference oven, 1 thread."""
    before = os.environ.get("OPENBLAS_NUM_THREADS")
    bench_sim = import_file(BENCH / "sim.py", "bench_sim")
    if before is None:  # bench/sim.py pins it for its own process; leave the tests' env as it was
        os.environ.pop("OPENBLAS_NUM_THREADS", None)
    return native.simulate(bench_sim.oven(PATHS, SEED), threads=1, kernel=simkernel)


def test_the_peer_gives_the_c_kernels_fields_and_shapes(peer, c_result):
    nb = peer.run(PATHS, SEED, 1)
    assert set(nb) == {"percentiles", "violation_probability", "first_violation", "kpi"}
    assert nb["percentiles"].shape == c_result.percentiles.shape == (6, 600)
    assert np.all(np.diff(nb["percentiles"], axis=0) >= 0), "p5 <= p25 <= ... <= p99 each step"
    assert isinstance(nb["violation_probability"], float)
    assert len(c_result.constraints) == 1
    first = c_result.constraints[0].first_violation
    assert first is not None
    assert nb["first_violation"].shape == (len(first),)  # p5, p50, p95, mean
    assert nb["kpi"].shape == (len(c_result.kpis), 5)  # final, max x mean, std, p5, p50, p95
    assert [k.kpi.kind for k in c_result.kpis] == ["final", "max"]


def test_the_peer_agrees_with_the_c_kernel(peer, c_result):
    assert disagreements(peer.run(PATHS, SEED, 1), c_result, PATHS) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("gain_mean", 1.3), ("gain_sd", 0.14), ("tau_hi", 120.0), ("sigma_v", 0.45)],
)
def test_a_peer_with_a_wrong_parameter_disagrees(peer, c_result, field, value):
    wrong = peer.OVEN._replace(**{field: value})
    assert disagreements(peer.run(PATHS, SEED, 1, oven=wrong), c_result, PATHS) != []


def test_the_peers_result_depends_on_the_seed_not_the_thread_count(peer):
    if peer.numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba runs one thread here (NUMBA_NUM_THREADS)")
    one, two = peer.run(1000, SEED, 1), peer.run(1000, SEED, 2)
    for key in one:
        np.testing.assert_array_equal(one[key], two[key])
    other = peer.run(1000, SEED + 1, 2)
    assert not np.array_equal(one["percentiles"], other["percentiles"])


def test_no_violation_gives_probability_zero_and_nan_times(peer):
    nb = peer.run(256, SEED, 1, steps=50, oven=peer.OVEN._replace(limit=1e9))
    assert nb["violation_probability"] == 0.0
    assert np.isnan(nb["first_violation"]).all()
    assert nb["percentiles"].shape == (6, 50)


def disagreements(nb: dict[str, Any], c: SimResult, n: int) -> list[str]:
    """What differs between the peer and the C kernel by more than sampling explains.

    Tolerances are about 4 standard errors of the difference of two independent runs of n paths.
    Over 30 seeds of each, a correct peer used at most 69 % of any tolerance; a gain mean of 1.25
    instead of 1.2 exceeded the KPI means' by 5x and the fan chart's by 2.2x.
    """
    found = []
    p_nb, p_c = nb["violation_probability"], c.constraints[0].violation_probability
    p = (p_nb + p_c) / 2
    if abs(p_nb - p_c) > 4 * math.sqrt(max(p * (1 - p), 1 / n) * 2 / n):
        found.append(f"violation probability {p_nb:.4f} vs {p_c:.4f}")
    first = c.constraints[0].first_violation
    assert first is not None
    # The spread of first-violation times from its p5..p95 (3.29 sd for a normal), for the SE.
    sd = (first["p95"] - first["p5"]) / 3.29
    if abs(nb["first_violation"][3] - first["mean"]) > 4 * sd * math.sqrt(2 / (p * n)):
        found.append(f"first-violation mean {nb['first_violation'][3]:.1f} vs {first['mean']:.1f}")
    for row, kpi in enumerate(c.kpis):
        mean, std = nb["kpi"][row, :2]
        if abs(mean - kpi.mean) > 4 * math.sqrt((std**2 + kpi.std**2) / n):
            found.append(f"KPI {kpi.kpi.kind} mean {mean:.3f} vs {kpi.mean:.3f}")
        # A sample std's relative SE is about 1 / sqrt(2n); of the ratio of two, 1 / sqrt(n).
        if abs(std / kpi.std - 1) > 4 / math.sqrt(n):
            found.append(f"KPI {kpi.kpi.kind} std {std:.3f} vs {kpi.std:.3f}")
    # Fan chart: the mean over steps of |difference| in units of that step's interquartile range;
    # at n = 4000 expected ~0.02 for p50 and ~0.03 for p5/p95 (their SE is larger).
    iqr = c.percentiles[3] - c.percentiles[1]
    for j, name in ((0, "p5"), (2, "p50"), (4, "p95")):
        off = float(np.mean(np.abs(nb["percentiles"][j] - c.percentiles[j]) / iqr))
        if off > 0.12:
            found.append(f"{name} off by {off:.3f} IQR on average over the steps")
    return found
