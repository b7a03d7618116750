"""What the benchmarks report about the machine they ran on (shared by the bench scripts)."""

from __future__ import annotations

#: Names of the hashers dask's ``tokenize`` picks from, fastest first (``dask.hashing``).
TOKENIZE_HASHES = ("cityhash", "xxhash", "murmurhash", "sha1")


def tokenize_hash() -> str:
    """The hash dask's ``tokenize`` uses on this machine: the first of its fast hashers
    installed, else SHA-1 (it sets the cost of any graph name that hashes input data).

    >>> tokenize_hash() in TOKENIZE_HASHES
    True
    """
    from dask import hashing

    hasher = hashing.hashers[0] if hashing.hashers else None
    return getattr(hasher, "__name__", str(hasher)).removeprefix("_hash_")
