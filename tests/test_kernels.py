"""Per-block kernels: normalisation edge cases and the NumPy product fast path vs its generic twin."""

from __future__ import annotations

import numpy as np
import pytest

from dask_cosim import _kernels
from dask_cosim._kernels import matmul_clip_numpy, normalize_rows


def generic(an, bn, out_dtype=None):
    s = np.clip(np.matmul(an, np.swapaxes(bn, -1, -2)), -1.0, 1.0)
    return s.astype(out_dtype) if out_dtype else s


@pytest.mark.parametrize("panel_bytes", [64, 1000, 2**22])  # many panels, a few, one per batch
@pytest.mark.parametrize(
    "shape_a, shape_b",
    [((3, 37, 5), (3, 29, 5)), ((37, 5), (3, 29, 5)), ((3, 37, 5), (29, 5)), ((1, 37, 5), (4, 29, 5)),
     ((37, 5), (29, 5)), ((0, 5), (4, 5)), ((2, 3, 5), (2, 0, 5))],
)  # fmt: skip
@pytest.mark.parametrize("dtype, out", [("float64", None), ("float32", None), ("float32", "float16"),
                                        ("float64", "float32")])  # fmt: skip
def test_numpy_fast_path_equals_generic_product(monkeypatch, panel_bytes, shape_a, shape_b, dtype, out):
    monkeypatch.setattr(_kernels, "PANEL_BYTES", panel_bytes)
    gen = np.random.default_rng(0)
    an = normalize_rows(gen.standard_normal(shape_a), compute_dtype=dtype)
    bn = normalize_rows(gen.standard_normal(shape_b), compute_dtype=dtype)
    got = matmul_clip_numpy(an, bn, out)
    want = generic(an, bn, out)
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = {"float16": 1e-3, "float32": 1e-6, "float64": 1e-14}[str(got.dtype)]
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert not np.any(got > 1)


def test_normalize_fast_and_careful_paths_agree():
    gen = np.random.default_rng(1)
    x = gen.standard_normal((50, 7))
    fast = normalize_rows(x)
    x_with_zero = np.vstack([x, np.zeros((1, 7))])
    careful = normalize_rows(x_with_zero)[:50]  # the zero row sends the block down the careful path
    np.testing.assert_allclose(fast, careful, rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-15)


@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e160, 1e300])
def test_normalize_any_finite_magnitude(scale):
    x = np.array([[3.0, 4.0], [-1.0, 0.0]]) * scale
    np.testing.assert_allclose(normalize_rows(x), [[0.6, 0.8], [-1.0, 0.0]], atol=1e-15)


def test_normalize_float32_overflow_and_subnormal():
    x = np.array([[3e30, 4e30], [3e-40, 4e-40]], dtype=np.float32)
    got = normalize_rows(x, compute_dtype="float32")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.6, 0.8]], atol=1e-6)
