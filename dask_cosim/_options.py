"""The options of the public API and of the ``dask-cosim`` command: one table, one validation.

Every entry point checks its options with these functions, and the command line converts
its flags with the same functions (:func:`cli_type`), so a bad value gets the same message
from ``dcs.topk(a, zero_vector="skip")`` and from ``dask-cosim run --zero-vector skip``
(there under the flag's name). :data:`JOB_OPTIONS` says which options each kind of job
takes; the command refuses a flag whose option the job's function does not take.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

#: The options that take one of a few strings.
CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "gpu"),
    "zero_vector": ("zero", "nan", "error"),
    "precision": ("float32", "tf32", "bfloat16", "float16"),
    "like": ("numpy", "cupy"),
    "label_pairs": ("different", "same"),
    "codec": ("auto", "none", "zstd", "blosc-lz4"),
}

#: Output dtypes ``dtype=`` accepts (any spelling NumPy understands, e.g. ``np.float32``).
DTYPES = ("float16", "float32", "float64")

_COMMON = frozenset({"chunks", "device"})
_PRODUCT = _COMMON | {"dtype", "zero_vector", "check_finite", "precision"}
_MASK = frozenset({"labels", "label_pairs"})

#: The keyword options of each kind of job: ``cosine_similarity`` ("similarity"), ``topk``,
#: ``pairs_above`` ("pairs") and ``duplicate_groups`` ("groups"); tests check them against
#: the signatures.
JOB_OPTIONS: dict[str, frozenset[str]] = {
    "similarity": _PRODUCT | {"like"},
    "topk": _PRODUCT | _MASK | {"k", "exclude_self", "like"},
    "pairs": _PRODUCT | _MASK | {"threshold", "exclude_self"},
    "groups": _COMMON | _MASK | {"threshold"},
}

#: The writer options of each kind of job (zarr for arrays, Parquet for tables).
WRITER_OPTIONS: dict[str, frozenset[str]] = {
    "similarity": frozenset({"codec"}),
    "topk": frozenset({"codec"}),
    "pairs": frozenset(),
    "groups": frozenset(),
}


def check_choice(name: str, value) -> str:
    """``value`` if it is one of ``CHOICES[name]``, else a ``ValueError`` naming the option.

    >>> check_choice("device", "cpu")
    'cpu'
    >>> check_choice("zero_vector", "skip")
    Traceback (most recent call last):
    ...
    ValueError: zero_vector: expected one of 'zero', 'nan', 'error', received 'skip'
    """
    choices = CHOICES[name]
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, received {value!r}")
    return value


def check_dtype(requested) -> np.dtype | None:
    """The user's ``dtype=``: a float dtype of at most 64 bits, or ``None`` (the default).

    >>> check_dtype("f4")
    dtype('float32')
    >>> check_dtype("int32")
    Traceback (most recent call last):
    ...
    TypeError: dtype: expected float16, float32 or float64, received int32
    """
    if requested is None:
        return None
    try:
        dtype = np.dtype(requested)
    except TypeError as err:
        raise TypeError(f"dtype: cannot interpret {requested!r} as a dtype") from err
    if dtype.kind != "f" or dtype.itemsize > 8:
        raise TypeError(f"dtype: expected float16, float32 or float64, received {dtype}")
    return dtype


def check_k(k) -> int:
    """``k`` of ``topk``: a positive integer.

    >>> check_k(3)
    3
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k: expected a positive integer, received {k!r} ({type(k).__name__})")
    if k < 1:
        raise ValueError(f"k: expected a positive integer (k >= 1), received {k}")
    return int(k)


def check_threshold(threshold) -> float:
    """A similarity threshold: a real number in [-1, 1].

    >>> check_threshold(0.9)
    0.9
    >>> check_threshold(1.5)
    Traceback (most recent call last):
    ...
    ValueError: threshold: expected a similarity in [-1, 1], received 1.5; no pair could reach it
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold: expected a real number, received {threshold!r}")
    if math.isnan(threshold):
        raise ValueError("threshold: received NaN; expected a real number (similarities lie in [-1, 1])")
    if not -1.0 <= threshold <= 1.0:
        hint = f" (a percentage? use {threshold / 100:g})" if 5 <= threshold <= 100 else ""
        raise ValueError(
            f"threshold: expected a similarity in [-1, 1], received {threshold!r}{hint}"
            + ("; no pair could reach it" if threshold > 1 else "; pass -1 to keep every pair")
        )
    return float(threshold)


def check_flag(name: str, value) -> bool:
    """A boolean option (``exclude_self``, ``check_finite``).

    >>> check_flag("exclude_self", np.True_)
    True
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, received {value!r}")
    return bool(value)


def check_axis_chunk(spec, axis: str):
    """One axis of ``chunks=`` before the axis length is known: ``"auto"``, ``None``, ``-1``,
    a positive int or a tuple of non-negative ints (their sum is checked by the planner).

    >>> check_axis_chunk(0, "N")
    Traceback (most recent call last):
    ...
    ValueError: chunks: N chunk must be a positive int, received 0
    """
    if isinstance(spec, str):
        if spec == "auto":
            return spec
    elif _is_int(spec):
        if int(spec) <= 0 and int(spec) != -1:
            raise ValueError(f"chunks: {axis} chunk must be a positive int, received {spec}")
        return int(spec)
    elif isinstance(spec, (tuple, list)) and all(_is_int(c) for c in spec):
        return tuple(int(c) for c in spec)
    elif spec is None:
        return spec
    raise ValueError(
        f"chunks: {axis} chunk {spec!r} is not understood; expected an int, -1, 'auto' or a tuple"
    )


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_applies(kind: str, option: str) -> None:
    """Refuse an option the job's function does not take.

    >>> check_applies("groups", "dtype")
    Traceback (most recent call last):
    ...
    ValueError: dtype does not apply to groups jobs (they take chunks, device, label_pairs, labels, threshold)
    """
    if option not in JOB_OPTIONS[kind] | WRITER_OPTIONS[kind]:
        takes = ", ".join(sorted(JOB_OPTIONS[kind] | WRITER_OPTIONS[kind]))
        raise ValueError(f"{option} does not apply to {kind} jobs (they take {takes})")


# --------------------------------------------------------------------------- the command line


def cli_type(name: str, parse: Callable[[str], Any] = str, check: Callable[[Any], Any] | None = None):
    """An argparse ``type=`` for option ``name``: ``parse`` the text, then run the API's check
    (``check``, default :func:`check_choice` of ``name``); its message, less the ``name: ``
    prefix that argparse's ``argument --flag:`` replaces, is the usage error."""
    import argparse

    check = check if check is not None else (lambda value: check_choice(name, value))

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_expected(parse)}, received {text!r}") from None
        try:
            return check(value)
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{name}: ")) from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


def _expected(parse) -> str:
    return {int: "an integer", float: "a number"}.get(parse, "a value")


def metavar(name: str) -> str:
    """``{a,b,c}``: the choices of option ``name``, as argparse shows ``choices=``."""
    return "{" + ",".join(CHOICES.get(name, DTYPES if name == "dtype" else ())) + "}"
