"""C kernel under AddressSanitizer + UndefinedBehaviorSanitizer (and ThreadSanitizer).

ASan inside a Python host needs LD_PRELOAD games, so the sanitized build is a standalone C
driver (native/test_driver.c) exercising every model, adaptive mode, 0-3 threads and the error
paths, run as a subprocess: it must exit 0 with no sanitizer report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import native_kernel
import pytest
from native_kernel import HAVE_GCC, NATIVE

pytestmark = [
    pytest.mark.skipif(not HAVE_GCC, reason="gcc not found: cannot build the C kernel"),
    pytest.mark.slow,  # three sanitized builds, each run under its sanitizer
]

SOURCES = [str(NATIVE / "test_driver.c"), str(NATIVE / "opstwin_sim.c")]
BASE = ["gcc", "-std=c99", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fno-omit-frame-pointer"]


def _build_and_run(
    tmp_path: Path, sanitize: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    exe = tmp_path / "driver"
    cc = subprocess.run(
        [*BASE, *sanitize, *SOURCES, "-I", str(NATIVE), "-o", str(exe), "-lm", "-lpthread"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cc.returncode == 0, cc.stderr
    assert "warning" not in cc.stderr, cc.stderr
    return subprocess.run(
        [str(exe)], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_driver_clean_under_asan_ubsan(tmp_path: Path) -> None:
    run = _build_and_run(
        tmp_path,
        ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
        {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "runtime error" not in run.stderr and "Sanitizer" not in run.stderr, run.stderr
    assert "all checks passed" in run.stdout


def test_driver_clean_under_tsan(tmp_path: Path) -> None:
    probe = subprocess.run(
        ["gcc", "-fsanitize=thread", "-x", "c", "-", "-o", str(tmp_path / "p")],
        input="int main(void){return 0;}",
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0 or subprocess.run([str(tmp_path / "p")]).returncode != 0:
        pytest.skip("gcc ThreadSanitizer runtime unavailable here")
    run = _build_and_run(tmp_path, ["-fsanitize=thread"], {"TSAN_OPTIONS": "halt_on_error=1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ThreadSanitizer" not in run.stderr, run.stderr


HOSTED = r"""
import math, sys
sys.path.insert(0, {helpers!r})
import native_kernel as nk
mod = nk.build(__import__("pathlib").Path({tmp!r}), sanitize=True)
k = nk.Kernel(mod)
hold = [("hold", 1.0, 0, 0, 0)]
models = [
    k.model("fopdt", params=[("normal", 2, 0.2), ("lognormal", 2, 0.3), ("triangular", 0, 1, 3)],
            y0=50.0, sigma_w=0.1, sigma_v=0.2, inputs=[("ramp", 1, 3, 2, 9)]),
    k.model("tank", params=[("uniform", 1, 2), 0.05, 0.02, 3.0], y0=0.5, sigma_v=0.01, inputs=hold),
    k.model("statespace", n=2, m=1, p=2, A=[[0.9, 0.1], [0, 0.8]], B=[1, 0.5], C=[[1, 0], [0, 1]],
            q=[0.01, 0.01], r=[0.1, 0.1], inputs=hold),
    k.model("weibull", params=[2.0, 100.0, 10.0]),
]
for m in models:
    for t in (1, 3):
        cons = [(0, "upper", 0.5)]
        rc, r = k.run(m, n_steps=50, n_paths=500, threads=t, constraints=cons, raw=True)
        assert rc == 0, rc
    kw = dict(adaptive=True, batch=100, max_paths=2000, rse_target=0.05, threads=2)
    rc, r = k.run(m, n_steps=20, **kw)
    assert rc == 0, rc
assert k.run(models[0], n_paths=0)[0] == k.lib.OPSTWIN_E_PATHS
assert math.isfinite(k.lib.opstwin_rng_floor(1, 100000, 2))
print("hosted ok")
"""


def test_cffi_module_clean_under_asan_in_python(tmp_path: Path) -> None:
    # the real cffi module, built by build_sim.make_ffibuilder(sanitize=True), in a Python host
    libasan = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True
    ).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip("libasan.so not found for LD_PRELOAD")
    script = HOSTED.format(helpers=str(Path(native_kernel.__file__).parent), tmp=str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        env={
            **os.environ,
            "LD_PRELOAD": libasan,
            "ASAN_OPTIONS": "detect_leaks=0",
            "UBSAN_OPTIONS": "halt_on_error=1",
        },
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "hosted ok" in run.stdout
    assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr, run.stderr
