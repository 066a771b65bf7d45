"""The MLX backend's BLAS choice on Linux (backends/mlx/device.py): made once, before mlx loads, overridable with
TRMLX_BLAS, reported by `trmlx env`, and the same numbers whichever BLAS multiplies. Each case runs in a fresh process,
since the choice can only be made before mlx.core is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'trmlx[mlx]')")
if not sys.platform.startswith("linux"):
    pytest.skip("the BLAS choice applies to MLX's Linux CPU build only", allow_module_level=True)

PROBE = """
import json, sys
import numpy as np
from trmlx.backends.mlx.device import BLAS, describe_device, mx
a = mx.random.normal((192, 320), key=mx.random.key(0)); b = mx.random.normal((320, 96), key=mx.random.key(1))
np.save(sys.argv[1], np.array(a @ b))
print(json.dumps({"blas": BLAS, "device": describe_device()}))
"""


def probe(tmp_path, blas: str | None) -> tuple[dict, np.ndarray]:
    env = {k: v for k, v in os.environ.items() if k != "TRMLX_BLAS"}
    if blas is not None:
        env["TRMLX_BLAS"] = blas
    out = tmp_path / f"product-{len(list(tmp_path.iterdir()))}.npy"
    result = subprocess.run([sys.executable, "-c", PROBE, str(out)], env=env, capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(out)


def test_reference_on_request_and_the_same_product_with_the_chosen_blas(tmp_path):
    reference, ref_product = probe(tmp_path, "reference")
    assert reference["blas"] == {"blas": "reference (netlib)"}
    chosen, product = probe(tmp_path, None)
    assert chosen["device"]["blas"] == chosen["blas"]["blas"]  # what `trmlx env` shows
    # OpenBLAS sums in another order: equal within fp32 rounding over 320-term dot products.
    assert np.abs(product - ref_product).max() < 1e-4 * np.abs(ref_product).max()


def test_a_blas_that_does_not_load_is_reported_and_mlx_keeps_its_own(tmp_path):
    info, product = probe(tmp_path, str(tmp_path / "missing" / "libblas.so"))
    assert info["blas"]["blas"] == "reference (netlib)"
    assert info["blas"]["blas_problems"].startswith(f"TRMLX_BLAS {tmp_path / 'missing' / 'libblas.so'}: ")
    assert np.isfinite(product).all()


def test_mlx_imported_first_cannot_be_switched(tmp_path):
    code = "import mlx.core, json; from trmlx.backends.mlx.device import BLAS; print(json.dumps(BLAS))"
    env = {k: v for k, v in os.environ.items() if k != "TRMLX_BLAS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"blas": "reference (mlx was imported before trmlx could choose)"}


def test_a_build_for_a_cpu_this_machine_lacks_is_skipped_with_the_reason(monkeypatch):
    """cmeel-openblas 0.3.31 is built for SKYLAKEX only: on an AVX2-only CPU it would die with SIGILL inside MLX."""
    from trmlx.backends.mlx import device

    monkeypatch.setattr(device, "_cpu_flags", lambda: {"sse4_2", "avx", "avx2", "fma"})
    assert device._unrunnable("OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4") == \
        "built for SKYLAKEX only, and this CPU lacks avx512f"
    assert device._unrunnable("OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64") is None
    assert device._unrunnable("OpenBLAS 0.3.31 NO_AFFINITY HASWELL MAX_THREADS=4") is None
    monkeypatch.setattr(device, "_cpu_flags", lambda: {"sse4_2", "avx", "avx2", "avx512f"})
    assert device._unrunnable("OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4") is None
