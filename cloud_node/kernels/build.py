"""Compile and load the small-M GEMM kernel (`smallm_gemm.c`) on first use.

Guarantees:
- The shared library is cached under `tandem_home() / "kernels"`, named by a hash of the source,
  the compiler path and the flags, so a changed source or flag set never loads a stale build.
- The file appears atomically: it is compiled under a temporary name and moved into place with
  `os.replace`, so concurrent processes never load a half-written library.
- `load_kernel()` returns None, after logging one warning, when the CPU lacks AVX2 or FMA, when
  no C compiler is found, or when anything else fails (a missing source file in an install,
  a failed compile or load). Callers then stay on torch.
- The source ships in the wheel (package data), so a non-editable install compiles it too.
- With `$TANDEM_SMALLM_KERNEL` naming a library compiled ahead of time (the image's build stage),
  that file is loaded and no compiler is looked for; the operator vouches that it matches.
- Nothing happens on import; the first `load_kernel()` call does the work and caches the result.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from tandem.paths import tandem_home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("smallm_gemm.c")
# Names a library compiled ahead of time (the container image's build stage); it is loaded as is
# and no compiler is needed.
PREBUILT_ENV = "TANDEM_SMALLM_KERNEL"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")
REQUIRED_CPU_FLAGS = frozenset({"avx2", "fma"})


def cpu_supported() -> bool:
    """True on x86-64 Linux when /proc/cpuinfo lists every flag in REQUIRED_CPU_FLAGS."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return cpu_flags() >= REQUIRED_CPU_FLAGS


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def library_path(compiler: str) -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update("\0".join((compiler, *FLAGS)).encode())
    return tandem_home() / "kernels" / f"smallm_gemm-{digest.hexdigest()[:16]}.so"


def compile_library(compiler: str, out: Path) -> None:
    """Compile SOURCE into `out`, atomically; raises CalledProcessError on a compiler error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    # smallm_linear(x, ldx, x_bf16, w, bias, w_bf16, y, y_bf16, M, N, K, nthreads) -> 0 | -1;
    # pointers travel as integers (tensor.data_ptr()), None for no bias.
    p, i64, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.smallm_linear.argtypes = [p, i64, flag, p, p, flag, p, flag, i64, i64, i64, flag]
    lib.smallm_linear.restype = ctypes.c_int
    return lib


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The loaded library (function `smallm_linear`, see smallm_gemm.c), or None."""
    if not cpu_supported():
        log.warning("small-M kernel off: this CPU lacks %s", "/".join(sorted(REQUIRED_CPU_FLAGS)))
        return None
    prebuilt = os.environ.get(PREBUILT_ENV)
    compiler = None if prebuilt else find_compiler()
    if not prebuilt and compiler is None:
        log.warning("small-M kernel off: no C compiler (cc, gcc or $CC) found and no $%s", PREBUILT_ENV)
        return None
    try:
        path = Path(prebuilt) if prebuilt else library_path(compiler)  # type: ignore[arg-type]
        if compiler is not None and not path.exists():
            log.info("compiling %s with %s", SOURCE.name, compiler)
            compile_library(compiler, path)
        # Load after torch: the library's libgomp.so.1 then resolves to the copy torch already
        # loaded, so both share one OpenMP thread pool instead of two pools fighting for cores.
        import torch  # noqa: F401

        return _declare(ctypes.CDLL(str(path)))
    except subprocess.CalledProcessError as e:
        log.warning("small-M kernel off: compiling failed: %s", (e.stderr or "").strip()[-2000:])
    except Exception as e:  # noqa: BLE001 - the promise: any failure means no kernel, logged
        log.warning("small-M kernel off: %s: %s", type(e).__name__, e)
    return None
