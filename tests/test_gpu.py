"""CuPy against NumPy: cosine_similarity, topk and pairs_above in every precision (GPU only).

Every ``@pytest.mark.gpu`` test is skipped when no usable CUDA GPU is visible (CuPy
missing, no device, or CUDA failing); ``pytest -m gpu`` runs just these, as
``benchmarks/gpu_check.py`` does. The last test runs everywhere: the check script's
no-GPU path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest

import dask_cosim as dcs
from dask_cosim import _backend
from dask_cosim._backend import gpu_available
from dask_cosim.reductions import pairs_above, topk
from dask_cosim.testing import assert_topk_indices, reference_cosine

REPO = Path(__file__).resolve().parents[1]
HAVE_GPU = gpu_available()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(
    not HAVE_GPU, reason="no usable CUDA GPU (cupy missing, no device or CUDA fails)"
)

PRECISIONS = ["float32", "tf32", "bfloat16", "float16"]
D = 48
#: |GPU - NumPy emulation of the same precision| (same rounded operands, float32 accumulation
#: in another order); tf32 is compared with float64 instead (the GPU's tf32 conversion may
#: truncate), with bound 2u + u^2 + D 2^-24 for u = 2^-10. float16 products are exact in
#: float32, but tensor cores add several at once and truncate while aligning them (Fasi et al.,
#: "Numerical behavior of NVIDIA tensor cores", 2021): an H200 differed from the emulation by
#: 1.4e-5 = 4.9 D 2^-24 here, so float16 gets 16 D 2^-24.
EMULATION_TOL = {"float32": 2e-6, "bfloat16": 4 * D * 2.0**-24, "float16": 16 * D * 2.0**-24}
TF32_BOUND = 2 * 2.0**-10 + 2.0**-20 + D * 2.0**-24
REFERENCE_TOL = {"float32": 2e-6, "tf32": TF32_BOUND, "float16": 2.0**-10 + 2 * D * 2.0**-24}
REFERENCE_TOL["bfloat16"] = 2.0**-7 + 2.0**-16 + D * 2.0**-24


def _inputs(seed=0, n=70, m=50, batch=None, dtype=np.float32):
    gen = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    a = gen.standard_normal((*lead, n, D)).astype(dtype)
    b = gen.standard_normal((*lead, m, D)).astype(dtype)
    a[..., 3, :] = 0  # a zero vector
    return a, b


def _check_against_numpy(got, a, b, precision, **kw):
    want = dcs.cosine_similarity(a, b, device="cpu", precision=precision, **kw).compute()
    assert got.shape == want.shape and got.dtype == want.dtype
    if precision == "tf32":
        np.testing.assert_allclose(got, reference_cosine(a, b), rtol=0, atol=TF32_BOUND)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=EMULATION_TOL[precision])
    np.testing.assert_allclose(got, reference_cosine(a, b), rtol=0, atol=REFERENCE_TOL[precision])


@gpu
@needs_gpu
def test_the_probe_finds_the_gpu():
    assert _backend._probe_gpu() is True
    assert _backend.choose_backend(np.ones(2), "auto") == "cupy"


@gpu
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("inputs", ["numpy", "cupy"])
@pytest.mark.parametrize("device", ["gpu", "auto"])
@pytest.mark.parametrize("batch", [None, 3])
def test_cosine_similarity_cupy_vs_numpy(precision, inputs, device, batch):
    import cupy

    a, b = _inputs(1, batch=batch)
    x, y = (cupy.asarray(a), cupy.asarray(b)) if inputs == "cupy" else (a, b)
    chunks = (16, 20) if batch is None else (2, 16, 20)
    S = dcs.cosine_similarity(x, y, chunks=chunks, device=device, precision=precision)
    got = S.compute()
    assert isinstance(got, cupy.ndarray) == (inputs == "cupy")  # CuPy in, CuPy out; NumPy in, NumPy out
    _check_against_numpy(cupy.asnumpy(got), a, b, precision)


@gpu
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_float64_inputs(precision):
    a, b = _inputs(2, dtype=np.float64)
    got = dcs.cosine_similarity(a, b, chunks=(32, 25), device="gpu", precision=precision).compute()
    assert got.dtype == np.float64
    tol = 1e-12 if precision == "float32" else REFERENCE_TOL[precision]
    np.testing.assert_allclose(got, reference_cosine(a, b), rtol=0, atol=tol)


@gpu
@needs_gpu
def test_like_cupy_keeps_blocks_on_the_device_and_normalised_blocks_stay_there():
    import cupy

    from dask_cosim._compat import column_blocks
    from dask_cosim.core import prepare

    a, b = _inputs(3)
    prep = prepare(a, b, chunks=(16, 20), device="gpu")
    first = column_blocks(prep.an, 0, slice(0, 1))  # .blocks[0] (legacy mode only)
    assert isinstance(first.compute(), cupy.ndarray)  # normalised on, and left on, the GPU
    S = dcs.cosine_similarity(a, b, chunks=(16, 20), device="gpu", like="cupy")
    assert isinstance(S._meta, cupy.ndarray)  # this client has a GPU, so CuPy meta
    got = S.compute()
    assert isinstance(got, cupy.ndarray)
    _check_against_numpy(cupy.asnumpy(got), a, b, "float32")


@gpu
@needs_gpu
def test_auto_runs_products_on_cupy(monkeypatch):
    from dask_cosim import _kernels

    calls = []
    real = _kernels.device_matmul

    def counting(an, bn, precision="float32"):
        calls.append(precision)
        return real(an, bn, precision)

    monkeypatch.setattr(_kernels, "device_matmul", counting)
    a, b = _inputs(4)
    got = dcs.cosine_similarity(a, b, chunks=(35, 25), device="auto", precision="bfloat16").compute()
    assert isinstance(got, np.ndarray) and calls == ["bfloat16"] * 4
    _check_against_numpy(got, a, b, "bfloat16")


@gpu
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape_a, shape_b", [((9, D), (7, D)), ((2, 9, D), (2, 7, D)), ((9, D), (3, 7, D))])
def test_device_matmul_matches_numpy_emulation(precision, shape_a, shape_b):
    import cupy

    from dask_cosim._backend import device_matmul
    from dask_cosim._kernels import normalize_rows, similarity_block

    gen = np.random.default_rng(5)
    an = normalize_rows(gen.standard_normal(shape_a), compute_dtype="float32")
    bn = normalize_rows(gen.standard_normal(shape_b), compute_dtype="float32")
    got = cupy.asnumpy(device_matmul(cupy.asarray(an), cupy.asarray(bn), precision))
    want = similarity_block(an, bn, device="cpu", precision=precision)
    assert got.shape == want.shape and got.dtype == np.float32
    tol = TF32_BOUND if precision == "tf32" else EMULATION_TOL[precision]
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


@gpu
@needs_gpu
def test_bfloat16_bits_cupy_equals_numpy_twin():
    import cupy

    from dask_cosim._backend import bfloat16_bits

    x = np.random.default_rng(6).standard_normal(100_000).astype(np.float32)
    x[:4] = [np.nan, np.inf, 0.0, 1 + 2.0**-8]
    np.testing.assert_array_equal(cupy.asnumpy(bfloat16_bits(cupy.asarray(x))), bfloat16_bits(x))


@gpu
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("self_similar", [False, True])
def test_topk_cupy_vs_numpy(precision, self_similar):
    a, b = _inputs(7, n=80, m=80)
    b = None if self_similar else b
    kw = {"k": 5, "chunks": (20, 20), "precision": precision, "exclude_self": self_similar}
    vals, idx = dask.compute(*topk(a, b, device="gpu", **kw))
    want_vals, _ = dask.compute(*topk(a, b, device="cpu", **kw))
    tol = REFERENCE_TOL[precision]
    np.testing.assert_allclose(vals, want_vals, rtol=0, atol=tol)  # the same k best values
    ref = reference_cosine(a, a if b is None else b)
    picked = np.take_along_axis(ref, idx, axis=-1)
    np.testing.assert_allclose(picked, vals, rtol=0, atol=tol)  # indices consistent with values
    assert_topk_indices(idx, ref, atol=tol, exclude_self=self_similar)  # the reference's, up to near-ties


@gpu
@needs_gpu
def test_topk_device_resident_inputs_give_cupy_results():
    import cupy

    a, b = _inputs(8)
    vals, idx = dask.compute(*topk(cupy.asarray(a), cupy.asarray(b), k=4, chunks=(16, 20), device="gpu"))
    assert isinstance(vals, cupy.ndarray) and isinstance(idx, cupy.ndarray)
    want_vals, want_idx = dask.compute(*topk(a, b, k=4, chunks=(16, 20), device="cpu"))
    np.testing.assert_allclose(cupy.asnumpy(vals), want_vals, rtol=0, atol=2e-6)
    ref = reference_cosine(a, b)
    for got in (cupy.asnumpy(idx), want_idx):  # both the float64 ranking, up to float32 near-ties
        assert_topk_indices(got, ref, atol=2e-6)


@gpu
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("self_similar", [False, True])
def test_pairs_above_cupy_vs_numpy(precision, self_similar):
    a, b = _inputs(9, n=60, m=60)
    b = None if self_similar else b
    threshold, tol = 0.25, REFERENCE_TOL[precision]
    kw = {"threshold": threshold, "chunks": (20, 20), "precision": precision}
    got = pairs_above(a, b, device="gpu", **kw).compute()
    ref = reference_cosine(a, a if b is None else b)
    np.testing.assert_allclose(got["score"], ref[got["i"], got["j"]], rtol=0, atol=tol)
    found = set(zip(got["i"], got["j"], strict=True))
    clear = {(i, j) for i, j in zip(*np.nonzero(ref >= threshold + tol), strict=True)}
    if self_similar:
        clear = {(i, j) for i, j in clear if i <= j}
    assert clear <= found  # every pair clearly above the threshold is there
    assert all(ref[i, j] >= threshold - tol for i, j in found)  # nothing clearly below


@gpu
@needs_gpu
def test_gpu_workers_on_a_local_cluster():
    import cupy
    import distributed

    a, b = _inputs(10)
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
            dashboard_address="127.0.0.1:0", resources={"GPU": 1},
        ) as cluster,
        distributed.Client(cluster),
    ):  # fmt: skip
        got = dcs.cosine_similarity(a, b, chunks=(16, 20), device="gpu", like="cupy").compute()
        assert isinstance(got, cupy.ndarray)
        _check_against_numpy(cupy.asnumpy(got), a, b, "float32")
        vals, idx = dask.compute(*topk(a, b, k=3, chunks=(16, 20), device="gpu"))
        want, _ = dask.compute(*topk(a, b, k=3, chunks=(16, 20), device="cpu"))
        np.testing.assert_allclose(vals, want, rtol=0, atol=2e-6)
        assert_topk_indices(idx, reference_cosine(a, b), atol=2e-6)


# ------------------------------------------------------------------ runs everywhere


def test_gpu_check_script_exits_cleanly_without_a_gpu():
    """``benchmarks/gpu_check.py`` with no visible GPU: a clear message, exit status 0, nothing run."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU from CuPy
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no usable CUDA GPU visible" in proc.stdout
    assert "GPU tests" not in proc.stdout and "TFLOP/s" not in proc.stdout


@gpu
@needs_gpu
@pytest.mark.parametrize("shape", [(37, 53), (3, 21, 17)])
@pytest.mark.parametrize("exclude_self, r0, c0", [(False, 0, 0), (True, 0, 0), (True, 5, 2), (True, 0, 9)])
def test_cupy_keys_kernel_equals_the_numpy_twin(shape, exclude_self, r0, c0):
    """The fused CuPy kernel of similarity_keys against NumPy's clip/copyto path, bit for bit."""
    import cupy

    from dask_cosim._select import similarity_keys

    levels = np.array([-np.inf, -1.5, -1.0, -0.0, 0.0, 0.3, 1.0, 1.0000002, 7.0, np.inf, np.nan])
    for dtype in (np.float32, np.float64):
        s = levels[np.random.default_rng(r0 + c0).integers(0, len(levels), size=shape)].astype(dtype)
        kw = {"row_offset": r0, "col_offset": c0, "exclude_self": exclude_self}
        got = similarity_keys(cupy.asarray(s), **kw)
        want = similarity_keys(s, **kw)
        assert isinstance(got, cupy.ndarray) and got.dtype == want.dtype
        np.testing.assert_array_equal(cupy.asnumpy(got), want)
        np.testing.assert_array_equal(np.signbit(cupy.asnumpy(got)), np.signbit(want))


@gpu
@needs_gpu
@pytest.mark.parametrize("self_similar", [False, True])
def test_topk_auto_blocks_on_the_gpu_equal_numpy(self_similar):
    """Auto blocks on a GPU (whole rows of S, or the self-similarity triangle) with NaN and
    zero vectors: the same neighbours as the CPU."""
    a, b = _inputs(seed=7, n=300, m=260)
    a[5, 2] = np.nan
    b = None if self_similar else b
    kw = {"k": 6, "exclude_self": self_similar}
    vals, idx = dask.compute(*topk(a, b, device="gpu", **kw))
    want_vals, want_idx = dask.compute(*topk(a, b, device="cpu", **kw))
    np.testing.assert_allclose(vals, want_vals, rtol=0, atol=2e-6, equal_nan=True)
    ref = reference_cosine(a, a if b is None else b)  # the NaN row: NaN similarities, ranked last
    for got in (idx, want_idx):  # float32 rounding may swap near-equal neighbours, nothing else
        assert_topk_indices(got, ref, atol=2e-6, exclude_self=self_similar)
