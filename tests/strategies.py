"""Hypothesis strategies for shapes and chunk specs."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def axis_chunks(draw, size: int):
    """A chunk spec for one axis: 'auto', -1, an int, or explicit block sizes summing to size."""
    kind = draw(st.sampled_from(["auto", "whole", "int", "explicit"]))
    if kind == "auto":
        return "auto"
    if kind == "whole" or size == 0:
        return -1
    if kind == "int":
        return draw(st.integers(1, max(1, size)))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, size - 1)), max_size=4))) if size > 1 else []
    edges = [0, *cuts, size]
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:], strict=True))


@st.composite
def problems(draw, max_rows: int = 12, max_dim: int = 6):
    """(shape_a, shape_b, chunks) with matmul-style batch broadcasting and mixed 2-D/3-D."""
    d = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_rows))
    m = draw(st.integers(1, max_rows))
    batch = draw(st.integers(1, 4))
    nd_a, nd_b = draw(st.sampled_from([(2, 2), (3, 3), (2, 3), (3, 2)]))
    ba = draw(st.sampled_from([batch, 1])) if nd_a == 3 else None
    bb = (batch if ba == 1 else draw(st.sampled_from([ba, 1]))) if nd_b == 3 and ba else batch
    shape_a = (ba, n, d) if nd_a == 3 else (n, d)
    shape_b = (bb, m, d) if nd_b == 3 else (m, d)
    out_batch = max(ba or 1, bb if nd_b == 3 else 1)
    if nd_a == 2 and nd_b == 2:
        chunks = (draw(axis_chunks(n)), draw(axis_chunks(m)))
    else:
        chunks = (draw(axis_chunks(out_batch)), draw(axis_chunks(n)), draw(axis_chunks(m)))
    return shape_a, shape_b, chunks
