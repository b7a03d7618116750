"""Bad input gets a clear error at call time, naming the argument and the offending value."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import dask_cosim as dcs

A = np.ones((2, 5, 4))


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.ones(4), A, r"a: expected a 2-D \(N, D\) or 3-D \(batch, N, D\) array, received shape \(4,\)"),
        (A, np.ones((1, 2, 5, 4)), r"b: expected a 2-D .* received shape \(1, 2, 5, 4\) \(ndim=4\)"),
        (A, np.ones((2, 5, 3)), r"same vector length D: a has shape \(2, 5, 4\) \(D=4\), b has .*\(D=3\)"),
        (A, np.ones((3, 5, 4)), r"batch sizes differ: a has batch 2 .* b has batch 3"),
        (np.ones((2, 5, 0)), np.ones((2, 3, 0)), r"a: vectors of length D=0"),
    ],
)
def test_shape_errors(a, b, match):
    with pytest.raises(ValueError, match=match):
        dcs.cosine_similarity(a, b)


@pytest.mark.parametrize(
    "bad, kind",
    [
        (np.ones((3, 2), dtype=complex), "complex"),
        (np.array([["a", "b"]]), "string"),
        (np.array([[object(), object()]]), "object"),
        (np.ones((3, 2), dtype="datetime64[s]"), "datetime"),
        (np.ones((3, 2), dtype="timedelta64[s]"), "timedelta"),
        ([[1, "x"]], "string"),
    ],
)
def test_dtype_errors_are_type_errors(bad, kind):
    with pytest.raises(TypeError, match=rf"a: {kind} dtype .* not supported"):
        dcs.cosine_similarity(bad, np.ones((2, 2)))


@pytest.mark.parametrize(
    "chunks, match",
    [
        ((1, 2), r"output is 3-D, so chunks needs 3 entries"),
        ((1, 2, 3, 4), r"needs 3 entries"),
        ((0, 2, 2), r"batch chunk must be a positive int, received 0"),
        ((1, -3, 2), r"N chunk must be a positive int, received -3"),
        ((1, (2, 2), 2), r"N block sizes \(2, 2\) must .* sum to the axis length 5"),
        ((1, "big", 2), r"N chunk 'big' is not understood"),
        ({"a": 1}, r"chunks: expected 'auto' or a tuple"),
        ("fast", r"chunks: expected 'auto' or a tuple"),
    ],
)
def test_chunk_errors(chunks, match):
    with pytest.raises(ValueError, match=match):
        dcs.cosine_similarity(A, A, chunks=chunks)


def test_chunks_for_2d_output_take_two_entries():
    with pytest.raises(ValueError, match=r"output is 2-D, so chunks needs 2 entries \(\(n, m\)\)"):
        dcs.cosine_similarity(np.ones((5, 3)), chunks=(1, 2, 2))


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"device": "tpu"}, ValueError, r"device: expected one of 'auto', 'cpu', 'gpu', received 'tpu'"),
        ({"zero_vector": "skip"}, ValueError, r"zero_vector: expected one of 'zero', 'nan', 'error'"),
        ({"dtype": "int32"}, TypeError, r"dtype: expected float16, float32 or float64, received int32"),
        ({"dtype": "nonsense"}, TypeError, r"dtype: cannot interpret 'nonsense'"),
    ],
)
def test_option_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        dcs.cosine_similarity(A, A, **kw)


def test_missing_paths_are_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"a: no such file or zarr store: .*nope.zarr"):
        dcs.cosine_similarity(str(tmp_path / "nope.zarr"))
    with pytest.raises(FileNotFoundError, match=r"b: no such file"):
        dcs.cosine_similarity(A, tmp_path / "missing.npy")


def test_zarr_group_is_not_an_array(tmp_path):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("emb", shape=(4, 3), dtype="f4")
    with pytest.raises(ValueError, match=r"is a zarr group, not an array; .*g.zarr/emb"):
        dcs.cosine_similarity(str(tmp_path / "g.zarr"))


def test_plan_over_budget_is_refused_before_running():
    import dask

    big = np.ones((1, 20000, 8), dtype="float32")
    with dask.config.set({"cosine.max-task-memory": "64MiB"}):
        with pytest.raises(
            dcs.PlanError,
            match=r"need about .* per task, above the budget "
            r"cosine.max-task-memory=64.00 MiB; chunks that fit: \(1, \d+, \d+\)",
        ):
            dcs.cosine_similarity(big, big, chunks=(1, 20000, 20000))
        S = dcs.cosine_similarity(big[:, :5000], big[:, :5000])  # auto always fits
        assert max(S.chunks[1]) * max(S.chunks[2]) * 4 <= 64 * 2**20


@pytest.mark.parametrize("key", ["cosine.max-task-memory", "cosine.gpu-block-bytes"])
@pytest.mark.parametrize("value", ["lots", "0", -5])
def test_bad_byte_settings_name_the_config_key(key, value):
    import dask

    with dask.config.set({key: value}), pytest.raises(ValueError, match=rf"dask config {key}: .*{value!r}"):
        dcs.topk(np.ones((4, 3)), k=1, device="gpu")


@pytest.mark.parametrize("shape", [(20_000, 64), (2, 20_000, 64)])
def test_refused_plan_suggests_chunks_that_are_accepted(shape):
    """The suggestion has the output's own dimensionality and passes back as chunks=."""
    import re

    import dask

    x = np.ones(shape, dtype="float32")
    explicit = (20_000, 20_000) if len(shape) == 2 else (2, 20_000, 20_000)
    with dask.config.set({"cosine.max-task-memory": "64MiB"}):
        with pytest.raises(dcs.PlanError, match=r"chunks that fit: \(") as info:
            dcs.cosine_similarity(x, x.copy(), chunks=explicit)
        fits = tuple(
            int(v) for v in re.search(r"chunks that fit: \(([\d, ]+)\)", str(info.value))[1].split(",")
        )
        assert len(fits) == len(shape)
        S = dcs.cosine_similarity(x, x.copy(), chunks=fits)
    assert max(S.chunks[-2]) == fits[-2] and max(S.chunks[-1]) == fits[-1]


def test_every_config_key_is_documented_in_the_readme():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    keys = yaml.safe_load((root / "dask_cosim" / "cosine.yaml").read_text())["cosine"]
    readme = (root / "README.md").read_text()
    assert [k for k in keys if f"| `cosine.{k}` |" not in readme] == []


def test_config_defaults_are_cosine_yaml_and_the_code_reads_them():
    from pathlib import Path

    import dask
    import yaml
    from dask.utils import parse_timedelta

    from dask_cosim._backend import gpu_fallback_allowed
    from dask_cosim._resources import gpu_worker_timeout

    keys = yaml.safe_load((Path(dcs.__file__).parent / "cosine.yaml").read_text())["cosine"]
    assert {"gpu-worker-timeout", "gpu-fallback", "blas-threads"} <= set(keys)
    with dask.config.set({}):  # (nothing overridden)
        assert {k: dask.config.get(f"cosine.{k}") for k in keys} == keys
        assert gpu_worker_timeout() == parse_timedelta(keys["gpu-worker-timeout"]) == 60
        assert gpu_fallback_allowed() is keys["gpu-fallback"] is False
