"""cffi out-of-line API-mode build of the Monte Carlo kernel (``gateway._simkernel``).

Used by the package build (``setup.py``: ``cffi_modules=["native/build_sim.py:ffibuilder"]``)
and by the tests, which call :func:`make_ffibuilder` and compile into a temporary directory.
``OPSTWIN_SIM_SANITIZE=1`` (or ``sanitize=True``) adds ASan/UBSan flags.
"""

from __future__ import annotations

import math
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "opstwin_sim.h")
SOURCES = ["opstwin_sim.c"]
MODULE = "gateway._simkernel"
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
BASE_FLAGS = ["-std=c99", "-O3", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wextra"]


def _cdef() -> str:
    """The public declarations of opstwin_sim.h, with #define values left to the compiler."""
    with open(HEADER, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        m = re.match(r"#define\s+(OPSTWIN_\w+)\s+\S", line)
        if m:
            lines.append(f"#define {m.group(1)} ...")
        elif not line.startswith("#"):
            lines.append(line)
    # array sizes in struct members must be literal for cdef; resolve them from the header
    consts = dict(re.findall(r"#define\s+(OPSTWIN_MAX_\w+)\s+(\d+)", text))
    body = "\n".join(lines)
    body = re.sub(
        r"\[([A-Z_ *]+)\]",
        lambda m: "[" + str(math.prod(int(consts[n.strip()]) for n in m.group(1).split("*"))) + "]",
        body,
    )
    return body


def _path(p: str, absolute: bool) -> str:
    """Relative to the cwd for setuptools (it prefers relative sources); absolute for
    ``ffibuilder.compile(tmpdir=...)``, which compiles from inside tmpdir."""
    full = os.path.join(HERE, p)
    rel = os.path.relpath(full)
    return full if absolute or rel.startswith("..") else rel


def make_ffibuilder(
    sanitize: bool = False,
    extra_compile_args: list[str] | None = None,
    absolute_paths: bool = False,
) -> FFI:
    """A configured FFI builder; ``sanitize`` adds ASan/UBSan compile and link flags."""
    builder = FFI()
    builder.cdef(_cdef())
    flags = BASE_FLAGS + list(extra_compile_args or [])
    link: list[str] = []
    if sanitize:
        flags += SANITIZE_FLAGS
        link += SANITIZE_FLAGS
    builder.set_source(
        MODULE,
        '#include "opstwin_sim.h"',
        sources=[_path(s, absolute_paths) for s in SOURCES],
        include_dirs=[_path("", absolute_paths).rstrip("/") or "."],
        extra_compile_args=flags,
        extra_link_args=link,
        libraries=["m", "pthread"],
    )
    return builder


ffibuilder = make_ffibuilder(sanitize=os.environ.get("OPSTWIN_SIM_SANITIZE") == "1")

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
