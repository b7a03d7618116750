"""The original Keras question's check, with dask_cosim.

The accepted answer built a (batch, n, m) cosine-similarity tensor with keras.backend and
checked it against scikit-learn's ``cosine_similarity`` in a loop over the batch. The same
data and the same check, with ``dask_cosim.cosine_similarity``:

    python examples/keras_question.py
"""

import time

import numpy as np
from sklearn.metrics.pairwise import cosine_similarity

import dask_cosim as dcs

# set up test data (as in the question)
n_batch = 100
n = 400  # number of points in the first set
m = 500  # number of points in the second set
d = 200  # number of dimensions

A = np.random.rand(n_batch, n, d)  # noqa: NPY002 (the question's own data)
B = np.random.rand(n_batch, m, d)  # noqa: NPY002

t0 = time.perf_counter()
S = dcs.cosine_similarity(A, B)  # lazy (batch, n, m) dask array
ours = S.compute()
t_ours = time.perf_counter() - t0

t0 = time.perf_counter()
sk_dist = np.zeros((n_batch, n, m))
for i in range(n_batch):
    sk_dist[i, ...] = cosine_similarity(A[i, ...], B[i, ...])
t_sk = time.perf_counter() - t0

print("shape", ours.shape, ours.dtype)
print("np.allclose(sk_dist, ours):", np.allclose(sk_dist, ours))
print(f"max abs difference: {np.abs(sk_dist - ours).max():.2e}")
print(f"dask_cosim {t_ours:.3f} s, sklearn loop {t_sk:.3f} s")
assert np.allclose(sk_dist, ours)
