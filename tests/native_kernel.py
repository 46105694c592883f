"""Test helper: compile native/build_sim.py into a temp dir and call the kernel from NumPy.

The tests compile the kernel themselves, with -Werror, instead of importing the installed
`gateway._simkernel`: they check the sources in the tree, not whatever the last install built.
conftest.py compiles it once per session (the `simkernel` fixture).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tests_support import import_file

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native"
HAVE_GCC = shutil.which("gcc") is not None
PCTS = (5, 25, 50, 75, 95, 99)


def build(tmpdir: Path, sanitize: bool = False) -> ModuleType:
    """Compile gateway._simkernel with -Werror into tmpdir and import it from there."""
    builder = load_build_script().make_ffibuilder(
        sanitize=sanitize, extra_compile_args=["-Werror"], absolute_paths=True
    )
    return import_file(Path(builder.compile(tmpdir=str(tmpdir))), "_simkernel")


def load_build_script() -> ModuleType:
    """Import native/build_sim.py (not a package: setup.py names it by path)."""
    return import_file(NATIVE / "build_sim.py")


class Kernel:
    """Thin NumPy wrapper over the compiled module, for tests only."""

    def __init__(self, mod: ModuleType) -> None:
        self.ffi, self.lib = mod.ffi, mod.lib

    def model(self, kind: str, **kw: Any) -> Any:
        """A model struct; `sigma_w` / `sigma_v` (FOPDT, tank) fill the noise parameters, which
        follow the model's own in params[] (fixed 0 when not given)."""
        ffi, lib = self.ffi, self.lib
        m = ffi.new("opstwin_model *")
        m.kind = getattr(lib, "OPSTWIN_MODEL_" + kind.upper())
        params = list(kw.pop("params", []))
        if kind in ("fopdt", "tank"):
            own = 3 if kind == "fopdt" else 4
            params += [0.0] * (own - len(params))
            params += [kw.pop("sigma_w", 0.0), kw.pop("sigma_v", 0.0)]
        for i, p in enumerate(params):
            if isinstance(p, (int, float)):
                p = ("fixed", p)
            m.params[i].kind = getattr(lib, "OPSTWIN_DIST_" + p[0].upper())
            vals = list(p[1:]) + [0.0] * (4 - len(p))
            m.params[i].a, m.params[i].b, m.params[i].c = vals[:3]
        inputs = kw.pop("inputs", [])
        m.n_inputs = kw.pop("n_inputs", len(inputs))
        for j, (k, u0, u1, t0, t1) in enumerate(inputs):
            m.inputs[j].kind = getattr(lib, "OPSTWIN_INPUT_" + k.upper())
            m.inputs[j].u0, m.inputs[j].u1, m.inputs[j].t0, m.inputs[j].t1 = u0, u1, t0, t1
        for name in ("A", "B", "C", "x0", "q", "r"):
            if name in kw:
                arr = np.asarray(kw.pop(name), dtype=float).ravel()
                for i, v in enumerate(arr):
                    getattr(m, name)[i] = float(v)
        for k, v in kw.items():
            setattr(m, k, v)
        return m

    def run(
        self,
        model: Any,
        *,
        dt: float = 1.0,
        n_steps: int = 10,
        n_paths: int = 100,
        seed: int = 1,
        threads: int = 1,
        constraints: Sequence[tuple[int, str, float]] = (),
        raw: bool = False,
        adaptive: bool = False,
        batch: int = 1000,
        max_paths: int = 100_000,
        rse_target: float = 0.01,
        driving_kpi: int = 0,
        driving_output: int = 0,
        portable: bool = False,
        path_stats: bool = False,
    ) -> tuple[int, dict[str, Any]]:
        """Run; results of a one-output model have no output axis (percentiles (steps, 6),
        kpi (4, 5), raw (paths, steps), path_kpi (4, paths)); with p outputs they lead with it
        ((p, steps, 6), (p, 4, 5), (p, 4), (p, 4, paths)) and raw is (paths, steps, p).
        `path_stats` adds path_kpi and path_violation (n_constraints, paths)."""
        ffi, lib = self.ffi, self.lib
        n_out = model.p if model.kind == lib.OPSTWIN_MODEL_STATESPACE else 1
        n_out = max(n_out, 1)
        s = ffi.new("opstwin_scenario *")
        s.dt, s.n_steps, s.seed, s.n_paths, s.threads = dt, n_steps, seed, n_paths, threads
        s.portable = int(portable)
        s.adaptive, s.batch, s.max_paths, s.rse_target = int(adaptive), batch, max_paths, rse_target
        s.driving_kpi, s.driving_output = driving_kpi, driving_output
        nc = len(constraints)
        cons = ffi.new("opstwin_constraint[]", max(nc, 1))
        for i, (o, kind, lim) in enumerate(constraints):
            cons[i].output = o
            cons[i].kind = lib.OPSTWIN_UPPER if kind == "upper" else lib.OPSTWIN_LOWER
            cons[i].limit = lim
        s.n_constraints, s.constraints = nc, cons
        res = {
            "percentiles": np.full((n_out, n_steps, 6), np.nan),
            "violation_prob": np.full(max(nc, 1), np.nan),
            "violation_rse": np.full(max(nc, 1), np.nan),
            "first_violation": np.full((max(nc, 1), 4), np.nan),
            "kpi": np.full((n_out, 4, 5), np.nan),
            "kpi_rse": np.full((n_out, 4), np.nan),
        }
        paths = -(-max_paths // 64) * 64 if adaptive else n_paths
        total = paths if raw else 0
        raw_arr = np.full(max(total, 1) * n_steps * n_out, np.nan)
        o = ffi.new("opstwin_output *")
        keep = []
        for name, arr in res.items():
            buf = ffi.from_buffer("double[]", arr)
            keep.append(buf)
            setattr(o, name, buf)
            setattr(o, name + "_len", arr.size)
        if raw:
            rbuf = ffi.from_buffer("double[]", raw_arr)
            keep.append(rbuf)
            o.raw_paths, o.raw_paths_len = rbuf, raw_arr.size
        if path_stats:
            pk = np.full(n_out * 4 * paths, np.nan)
            pv = np.full(max(nc * paths, 1), -2, dtype=np.int32)
            pkb = ffi.from_buffer("double[]", pk)
            pvb = ffi.from_buffer("int32_t[]", pv)
            keep += [pkb, pvb]
            o.path_kpi, o.path_kpi_len = pkb, pk.size
            o.path_violation, o.path_violation_len = pvb, nc * paths
        rc = lib.opstwin_sim_run(model, s, o)
        res["n_paths_run"] = n = o.n_paths_run
        if path_stats:
            res["path_kpi"] = pk[: n_out * 4 * n].reshape(n_out, 4, n)
            res["path_violation"] = pv[: nc * n].reshape(nc, n)
        res["error_param"] = o.error_param
        if raw:
            res["raw"] = raw_arr[: o.n_paths_run * n_steps * n_out].reshape(
                o.n_paths_run, n_steps, n_out
            )
        if n_out == 1:
            for key in ("percentiles", "kpi", "kpi_rse", "path_kpi"):
                if key in res:
                    res[key] = res[key][0]
            if raw:
                res["raw"] = res["raw"][:, :, 0]
        return rc, res

    def strerror(self, rc: int) -> str:
        return self.ffi.string(self.lib.opstwin_sim_strerror(rc)).decode()
