"""Build and load the C integer kernels (quant/csrc/int8_gemm.c) through ctypes.

The library is compiled once per source version into a cache directory with the system C
compiler; no torch headers are needed, so the build takes about a second. Set
EDGEWEAVE_CACHE to move the cache, or EDGEWEAVE_CC to choose the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first so the kernels share its OpenMP runtime)

__all__ = ["load_kernels", "KernelBuildError"]

_SOURCE = Path(__file__).parent / "csrc" / "int8_gemm.c"
_I64, _F32 = ctypes.c_int64, ctypes.c_float
_PTR = ctypes.c_void_p

_SIGNATURES = {
    "ew_gemm_s8s8s32": [_I64, _I64, _I64, _PTR, _PTR, _PTR],
    "ew_gemm_s8s8s32_ld": [_I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64],
    "ew_quantize_rows": [_I64, _I64, _PTR, _F32, _PTR, _PTR],
    "ew_rescale": [_I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR],
    "ew_linear_w8a8": [_I64, _I64, _I64, _PTR, _F32, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "ew_linear_w4a8": [_I64, _I64, _I64, _PTR, _F32, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR],
    "ew_unpack_int4": [_I64, _I64, _PTR, _PTR, _I64, _PTR],
}


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled; the message says which command failed."""


def _cache_dir() -> Path:
    root = os.environ.get("EDGEWEAVE_CACHE") or os.path.join(Path.home(), ".cache", "edgeweave")
    return Path(root) / "kernels"


def _compile(source: Path, target: Path) -> None:
    cc = os.environ.get("EDGEWEAVE_CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise KernelBuildError(
            "no C compiler found to build edgeweave's int8 kernels; install one "
            "(Debian: apt-get install gcc) or set EDGEWEAVE_CC"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name, then rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cc, "-O3", "-shared", "-fPIC", "-fopenmp", str(source), "-o", tmp, "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"building int8 kernels failed: {' '.join(cmd)}\n{done.stderr}")
    os.replace(tmp, target)


@functools.lru_cache(maxsize=1)
def load_kernels() -> ctypes.CDLL:
    """Compile (if needed) and load the kernel library; cached for the process."""
    digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:16]
    target = _cache_dir() / f"edgeweave_int8_{digest}.so"
    if not target.exists():
        _compile(_SOURCE, target)
    lib = ctypes.CDLL(str(target))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    return lib
