"""Device choice (injected availability check), host/device moves and product precisions on the CPU."""

from __future__ import annotations

import logging
import threading
import types

import array_api_strict as xps
import dask
import numpy as np
import pytest

import dask_cosim as dcs
from dask_cosim import _backend
from dask_cosim._backend import (
    NoGPUError,
    bfloat16_bits,
    bfloat16_bits_to_float32,
    block_namespace,
    choose_backend,
    gpu_available,
    to_numpy,
)
from dask_cosim._kernels import normalize_rows, reduce_precision, similarity_block
from dask_cosim.testing import reference_cosine

from ._graphs import npartitions

# ------------------------------------------------------------------ the availability probe


class _FakeRuntime:
    def __init__(self, count):
        self._count = count

    def getDeviceCount(self):  # noqa: N802 - CuPy's name
        if isinstance(self._count, Exception):
            raise self._count
        return self._count


def _fake_cupy(count, kernel_error: Exception | None = None):
    """A stand-in exposing only what the probe asks of CuPy (device count, one tiny kernel)."""

    def zeros(n):
        if kernel_error is not None:
            raise kernel_error
        raise AssertionError("the probe must not run a kernel when no device is visible")

    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=_FakeRuntime(count)), zeros=zeros)


def _raise(exc):
    def importer():
        raise exc

    return importer


@pytest.mark.parametrize(
    "importer",
    [
        _raise(ImportError("No module named 'cupy'")),  # cupy missing
        _raise(OSError("libcudart.so.12: cannot open shared object file")),  # broken install
        lambda: _fake_cupy(0),  # cupy present, no device visible
        lambda: _fake_cupy(RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")),
        lambda: _fake_cupy(1, kernel_error=RuntimeError("cudaErrorInsufficientDriver")),  # device unusable
    ],
    ids=["cupy-missing", "cupy-broken", "no-device", "runtime-error", "kernel-fails"],
)
def test_probe_says_no_gpu_and_never_raises(importer):
    assert _backend._probe_gpu(importer) is False


def test_probe_says_yes_when_a_device_runs_a_kernel():
    calls = []

    class _Scalar:
        def sum(self):
            return self

        def item(self):
            calls.append("kernel")
            return 0.0

    fake = types.SimpleNamespace(
        cuda=types.SimpleNamespace(runtime=_FakeRuntime(2)), zeros=lambda n: _Scalar()
    )
    assert _backend._probe_gpu(lambda: fake) is True
    assert calls == ["kernel"]


def test_real_probe_is_cached_and_consistent():
    first = _backend._cached_probe()
    assert _backend._cached_probe() is first
    assert _backend._cached_probe.cache_info().currsize == 1
    assert gpu_available() is first


def test_gpu_available_never_raises_even_if_the_check_does(monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(_backend, "gpu_check", broken)
    assert gpu_available() is False
    monkeypatch.setattr(_backend, "gpu_check", lambda: 1)
    assert gpu_available() is True


# ------------------------------------------------------------------ the decision per block

HOST = np.ones((2, 3))
STRICT = xps.asarray(np.ones((2, 3)))


@pytest.mark.parametrize(
    "x, device, available, expected",
    [
        (HOST, "cpu", True, "numpy"),
        (HOST, "cpu", False, "numpy"),
        (STRICT, "cpu", True, "numpy"),
        (HOST, "auto", False, "numpy"),  # cupy missing or no device: NumPy
        (HOST, "auto", True, "cupy"),  # device present: CuPy
        (STRICT, "auto", True, "native"),  # other array-API arrays keep their namespace
        (STRICT, "auto", False, "native"),
        (HOST, "gpu", True, "cupy"),
        (STRICT, "gpu", True, "cupy"),
    ],
)
def test_choose_backend(x, device, available, expected):
    assert choose_backend(x, device, available=available) == expected


def test_choose_backend_asks_the_injected_check(monkeypatch):
    monkeypatch.setattr(_backend, "gpu_check", lambda: True)
    assert choose_backend(HOST, "auto") == "cupy"
    monkeypatch.setattr(_backend, "gpu_check", lambda: False)
    assert choose_backend(HOST, "auto") == "numpy"


@pytest.mark.parametrize("x", [HOST, STRICT])
def test_gpu_without_device_raises_clearly(x):
    with pytest.raises(NoGPUError, match=r"device='gpu'.*no usable CUDA GPU.*--resources GPU=1"):
        choose_backend(x, "gpu", available=False)


def test_gpu_fallback_runs_numpy_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(_backend, "_fallback_warned", False)
    with dask.config.set({"cosine.gpu-fallback": True}), caplog.at_level(logging.WARNING, "dask_cosim"):
        assert choose_backend(HOST, "gpu", available=False) == "numpy"
        assert choose_backend(HOST, "gpu", available=False) == "numpy"
    assert sum("cosine.gpu-fallback" in r.getMessage() for r in caplog.records) == 1
    with dask.config.set({"cosine.gpu-fallback": "false"}), pytest.raises(NoGPUError):
        choose_backend(HOST, "gpu", available=False)


def test_kernels_raise_on_gpu_without_device(monkeypatch):
    monkeypatch.setattr(_backend, "gpu_check", lambda: False)
    x = np.ones((3, 4))
    with pytest.raises(NoGPUError):
        normalize_rows(x, device="gpu")
    with pytest.raises(NoGPUError):
        similarity_block(x, x, device="gpu")


def test_block_namespace_moves_to_host(monkeypatch):
    monkeypatch.setattr(_backend, "gpu_check", lambda: False)
    xp, y = block_namespace(STRICT, "cpu")
    assert isinstance(y, np.ndarray) and xp.__name__.endswith("numpy")
    xp, y = block_namespace(HOST, "auto")
    assert y is HOST
    xp, y = block_namespace(STRICT, "auto")
    assert y is STRICT


def test_device_decided_in_the_task_not_when_building(monkeypatch):
    """device='auto' asks the availability check inside each task, on the thread that runs it."""
    seen = []

    def check():
        seen.append(threading.get_ident())
        return False

    monkeypatch.setattr(_backend, "gpu_check", check)
    a = np.random.default_rng(0).standard_normal((40, 6))
    S = dcs.cosine_similarity(a, chunks=(10, 10))
    assert seen == []  # building the graph asked nothing
    got = S.compute(scheduler="threads")
    assert len(seen) >= npartitions(S)  # every product task decided for itself
    np.testing.assert_allclose(got, reference_cosine(a), atol=1e-12)


def test_to_numpy():
    assert to_numpy(HOST) is HOST
    y = to_numpy(STRICT)
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, np.ones((2, 3)))


# ------------------------------------------------------------------ precision: rounding


def _wide_float32(n=200_000, seed=0):
    gen = np.random.default_rng(seed)
    x = gen.standard_normal(n) * np.exp2(gen.uniform(-140, 120, n))
    return x.astype(np.float32)


def _special():
    ties = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-8)])
    edge = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 2.0**-149, 2.0**-126, 2.0**-25, 3 * 2.0**-26])
    return np.concatenate([ties, edge, np.nextafter(np.float32(1), np.float32(2)) + np.zeros(1)]).astype(
        np.float32
    )


def test_float16_rounding_equals_numpy_float16():
    x = np.concatenate([_wide_float32(), _special()])
    got = reduce_precision(x, "float16")
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    finite = np.abs(want) < np.inf  # beyond float16's range NumPy says inf; unit vectors never get there
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan(got[np.isnan(x)]).all()


def test_bfloat16_rounding_numpy_twin_equals_generic():
    x = np.concatenate([_wide_float32(seed=1), _special()])
    twin = bfloat16_bits_to_float32(bfloat16_bits(x))
    generic = reduce_precision(x, "bfloat16")
    np.testing.assert_array_equal(twin, generic)  # NaN == NaN for assert_array_equal


def test_bfloat16_bits_round_trip_every_pattern():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    values = bfloat16_bits_to_float32(bits)
    keep = ~np.isnan(values)
    np.testing.assert_array_equal(bfloat16_bits(values)[keep], bits[keep])
    np.testing.assert_array_equal(reduce_precision(values[keep], "bfloat16"), values[keep])


@pytest.mark.parametrize("precision, bits", [("tf32", 10), ("bfloat16", 7), ("float16", 10)])
def test_rounding_is_nearest_with_the_format_spacing(precision, bits):
    x = np.random.default_rng(2).uniform(-1, 1, 100_000).astype(np.float32)
    r = reduce_precision(x, precision).astype(np.float64)
    x = x.astype(np.float64)
    mag = np.abs(x)
    spacing = np.exp2(np.floor(np.log2(mag)) - bits)
    if precision == "float16":
        spacing = np.maximum(spacing, 2.0**-24)
    assert np.all(np.abs(r - x) <= spacing / 2)  # nearest
    assert np.all(np.mod(r, spacing) == 0)  # on the format's grid
    assert np.any(r != x)  # it really rounds


def test_tf32_keeps_float32_exponent_range_float16_does_not():
    tiny = np.array([2.0**-100, 2.0**-20], dtype=np.float32)
    np.testing.assert_array_equal(reduce_precision(tiny, "tf32"), tiny)
    np.testing.assert_array_equal(reduce_precision(tiny, "float16"), [0.0, 2.0**-20])


# ------------------------------------------------------------------ precision: errors vs float64

EPS = {"tf32": 2.0**-11, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def _bound(precision, dim):
    """|rounded a . rounded b - a . b| <= (2u + u^2) |a||b| plus float32 accumulation."""
    if precision == "float32":
        return 2e-6
    u = EPS[precision]
    return 2 * u + u * u + dim * 2.0**-24 + (dim * 2.0**-24 if precision == "float16" else 0)


@pytest.mark.parametrize("precision", ["float32", "tf32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    "shape_a, shape_b, chunks",
    [
        ((3, 40, 24), (3, 30, 24), (2, 16, 16)),
        ((50, 64), (45, 64), (20, 25)),
        ((40, 8), (2, 33, 8), (1, 40, 11)),
    ],
)
def test_precision_errors_within_bound(precision, shape_a, shape_b, chunks):
    gen = np.random.default_rng(3)
    a = gen.standard_normal(shape_a).astype(np.float32)
    b = gen.standard_normal(shape_b).astype(np.float32)
    S = dcs.cosine_similarity(a, b, chunks=chunks, precision=precision)
    got = S.compute()
    assert got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - reference_cosine(a, b))
    assert err.max() <= _bound(precision, shape_a[-1])
    if precision != "float32":
        assert err.max() > 10 * 2.0**-24  # the operands really were rounded
    assert np.abs(got).max() <= 1.0


def test_precision_equals_rounded_operands_then_float32_product():
    gen = np.random.default_rng(4)
    a = gen.standard_normal((30, 16)).astype(np.float32)
    b = gen.standard_normal((20, 16)).astype(np.float32)
    for precision in ("tf32", "bfloat16", "float16"):
        got = dcs.cosine_similarity(a, b, chunks=(10, 10), precision=precision).compute()
        an = normalize_rows(a, compute_dtype="float32")
        bn = normalize_rows(b, compute_dtype="float32")
        want = np.clip(reduce_precision(an, precision) @ reduce_precision(bn, precision).T, -1, 1)
        np.testing.assert_allclose(got, want, rtol=0, atol=16 * 2.0**-24)


def test_float64_stays_float64_unless_asked():
    gen = np.random.default_rng(5)
    a = gen.standard_normal((25, 12))
    ref = reference_cosine(a)
    exact = dcs.cosine_similarity(a, chunks=(10, 10)).compute()
    assert exact.dtype == np.float64
    np.testing.assert_allclose(exact, ref, rtol=0, atol=1e-13)
    fast = dcs.cosine_similarity(a, chunks=(10, 10), precision="tf32").compute()
    assert fast.dtype == np.float64  # output dtype kept, products reduced as asked
    err = np.abs(fast - ref).max()
    assert 1e-7 < err <= _bound("tf32", 12)


def test_zero_and_nan_rows_in_reduced_precision():
    a = np.random.default_rng(6).standard_normal((6, 5)).astype(np.float32)
    a[1] = 0
    a[3, 2] = np.nan
    for precision in ("tf32", "bfloat16", "float16"):
        got = dcs.cosine_similarity(a, chunks=(3, 3), precision=precision).compute()
        finite = [0, 1, 2, 4, 5]  # zero x NaN row is NaN
        assert np.all(got[1, finite] == 0) and np.all(got[finite, 1] == 0)
        assert np.isnan(got[3]).all() and np.isnan(got[:, 3]).all()


# ------------------------------------------------------------------ options: validation, meta


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"precision": "fp8"}, r"precision: expected one of 'float32', 'tf32', 'bfloat16', 'float16'.*'fp8'"),
        ({"precision": None}, r"precision: expected one of"),
        ({"like": "torch"}, r"like: expected one of 'numpy', 'cupy', received 'torch'"),
        ({"like": "cupy", "device": "cpu"}, r"like='cupy'.*needs device='gpu'.*device='cpu'"),
        ({"like": "cupy", "device": "auto"}, r"like='cupy'.*received device='auto' with host inputs"),
    ],
)
def test_option_errors_are_raised_at_call_time(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dcs.cosine_similarity(np.ones((4, 3)), **kwargs)


def test_graphs_stay_numpy_backed_without_a_gpu(monkeypatch):
    monkeypatch.setattr(_backend, "gpu_check", lambda: False)
    a = np.random.default_rng(7).standard_normal((20, 4))
    for kwargs in ({"device": "gpu"}, {"device": "gpu", "like": "cupy"}, {"device": "auto"}):
        S = dcs.cosine_similarity(a, chunks=(10, 10), **kwargs)
        assert type(S._meta) is np.ndarray  # a GPU-less client builds NumPy meta
    from dask_cosim.core import prepare

    prep = prepare(a, device="gpu", precision="bfloat16", chunks=(10, 10))
    assert prep.product_kwargs()["precision"] == "bfloat16"
    assert prep.product_kwargs()["like"] == "numpy"
    assert prepare(a, device="gpu", like="cupy").product_kwargs()["like"] == "input"


def test_auto_normalises_on_host_gpu_on_device(monkeypatch):
    """device='auto' keeps normalised blocks portable (NumPy); 'gpu' normalises on the GPU workers."""
    from dask_cosim import core

    seen = []

    def recording(x, **kwargs):
        seen.append(kwargs["device"])
        return normalize_rows(x, **kwargs)

    monkeypatch.setattr(core, "normalize_rows", recording)
    a = np.random.default_rng(8).standard_normal((20, 4))
    dcs.cosine_similarity(a, chunks=(10, 10), device="auto").compute(scheduler="sync")
    assert seen and set(seen) == {"cpu"}
    seen.clear()
    with dask.config.set({"cosine.gpu-fallback": True}):
        dcs.cosine_similarity(a, chunks=(10, 10), device="gpu").compute(scheduler="sync")
    assert seen and set(seen) == {"gpu"}
