"""`opstwin sim run` and `opstwin sim fit`: what-if runs and models fitted from the twin."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from gateway.config.load import read_config_text
from gateway.config.yamlpos import format_path, parse_yaml
from gateway.errors import ConfigError, GatewayError
from gateway.twin_cli import count_arg, known_point, positive_arg, reading_twin, twin_db_path

__all__ = ["add_sim_commands"]


def add_sim_commands(sub: Any) -> None:
    """Register `sim run` and `sim fit` on the CLI's subparsers."""
    sim = sub.add_parser("sim", help="what-if simulation: run a scenario, fit a model from history")
    simsub = sim.add_subparsers(title="sim commands", metavar="SIMCOMMAND")

    run = simsub.add_parser("run", help="run a what-if scenario (YAML or JSON) and print results")
    run.add_argument("scenario", help="scenario file (see README: What-if simulation)")
    run.add_argument(
        "--backend",
        choices=("native", "numpy"),
        default="native",
        help="the C kernel (default) or the NumPy reference",
    )
    run.add_argument(
        "--threads", type=count_arg(0, 1024), default=0, help="C kernel threads (0 = all CPUs)"
    )
    run.add_argument("--json", action="store_true", help="print the full result as JSON")
    run.set_defaults(handler=cmd_sim_run)

    fit = simsub.add_parser(
        "fit", help="fit gain, time constant and dead time of an input→output pair from history"
    )
    fit.add_argument("--config", "-c", required=True, help="site config YAML file")
    fit.add_argument("input", help="input point id (e.g. a setpoint)")
    fit.add_argument("output", help="output point id (e.g. a temperature)")
    fit.add_argument(
        "--minutes", type=positive_arg, default=60.0, help="history window (default 60)"
    )
    fit.add_argument(
        "--dt", type=positive_arg, default=1.0, help="resampling step in s (default 1)"
    )
    fit.add_argument("--json", action="store_true", help="print the fit as JSON")
    fit.set_defaults(handler=cmd_sim_fit)
    sim.set_defaults(handler=lambda args: sim.print_help() or 2)


def cmd_sim_run(args: argparse.Namespace) -> int:
    """Run a scenario file and print its results."""
    from gateway.sim import SimulationError, simulate
    from gateway.sim.models import Scenario

    path = Path(args.scenario)
    # The config's reader and parser: a FIFO, a binary file or an alias bomb is refused in one
    # line here too.
    text = read_config_text(path, what="scenario")
    try:
        data = parse_yaml(text).data
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{path}{where}: cannot read scenario: {problem}") from None
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: {exc.error_count()} problem(s):"]
        lines += [f"  {format_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    started = time.perf_counter()
    try:
        if args.backend == "native":
            from gateway.sim import native

            result = native.simulate(scenario, threads=args.threads)
        else:
            result = simulate(scenario, backend="numpy")
    except SimulationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    elapsed = time.perf_counter() - started
    if args.json:
        print(json.dumps({**result.summary(), "elapsed_s": elapsed}))
        return 0
    steps = scenario.n_steps
    print(
        f"{path}: {scenario.model.kind}, {result.paths_run} paths x {steps} steps "
        f"on {result.backend} in {elapsed * 1000:.0f} ms "
        f"({result.paths_run * steps / elapsed / 1e6:.1f} M path-steps/s)"
    )
    for c in result.constraints:
        first = c.first_violation
        when = f", first violation p50 at {first['p50']:.0f} s" if first else ""
        print(
            f"  {c.constraint.kind} limit {c.constraint.limit:g} (output {c.constraint.output}):"
            f" P(violation) = {c.violation_probability:.4f} (RSE {c.rse:.3f}){when}"
        )
    for k in result.kpis:
        print(
            f"  {k.kpi.kind} (output {k.kpi.output}): mean {k.mean:.4g} sd {k.std:.3g} "
            f"p5 {k.p5:.4g} p50 {k.p50:.4g} p95 {k.p95:.4g}"
        )
    print("  fan (output 0):   t        p5       p50       p95")
    for i in np.unique(np.linspace(0, steps - 1, 7).astype(int)):
        p = result.percentiles[:, i]
        print(f"  {result.times[i]:20.0f} {p[0]:9.4g} {p[2]:9.4g} {p[4]:9.4g}")
    return 0


def cmd_sim_fit(args: argparse.Namespace) -> int:
    """Fit an FOPDT model to a point pair's history and print it with its uncertainty."""
    from gateway.sim import SimulationError
    from gateway.sim.fit import fit_histories, usable_rows
    from gateway.twin.history import HistoryReader

    path = twin_db_path(args.config)
    reader = HistoryReader(path)
    end = time.time()
    start = end - args.minutes * 60
    try:
        with reading_twin(path):
            with known_point(args.input, path):
                u_rows = usable_rows(reader.history(args.input, start, end, limit=1_000_000))
            with known_point(args.output, path):
                y_rows = usable_rows(reader.history(args.output, start, end, limit=1_000_000))
    finally:
        reader.close()
    if len(u_rows) < 1 or len(y_rows) < 10:
        raise GatewayError(
            f"not enough GOOD history in the last {args.minutes:g} min: {len(u_rows)} samples of "
            f"{args.input}, {len(y_rows)} of {args.output} (need 1 and 10)"
        )
    try:
        # One grid from the first output sample; the input holds its value between changes.
        fit = fit_histories(u_rows, y_rows, args.dt)
    except (SimulationError, ValueError) as exc:
        raise GatewayError(f"cannot fit {args.input} -> {args.output}: {exc}") from exc
    n = fit.n
    model = fit.as_uncertain_model()
    if args.json:
        print(
            json.dumps(
                {
                    "gain": fit.gain,
                    "gain_stderr": fit.gain_stderr,
                    "tau": fit.tau,
                    "tau_stderr": fit.tau_stderr,
                    "theta": fit.theta,
                    "sigma_v": fit.sigma_v,
                    "samples": fit.n,
                    "model": model.model_dump(),
                }
            )
        )
        return 0
    print(f"FOPDT fit of {args.input} -> {args.output} over {n} samples ({n * args.dt:.0f} s):")
    print(f"  gain  {fit.gain:10.4g} ± {fit.gain_stderr:.3g}")
    print(f"  tau   {fit.tau:10.4g} ± {fit.tau_stderr:.3g} s")
    print(f"  theta {fit.theta:10.4g} s (best on the dead-time grid)")
    print(f"  residual sd {fit.sigma_v:.4g}")
    print("  as a scenario model (uncertainty sampled by the Monte Carlo):")
    print(
        "    "
        + yaml.safe_dump({"model": model.model_dump()}, sort_keys=False)
        .replace("\n", "\n    ")
        .rstrip()
    )
    return 0
