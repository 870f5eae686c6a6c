"""The float64 NumPy Muon of tests/numpy_reference.py against optax.contrib.muon alone.

DiLoCo with Muon inside (MuLoCo) is a case of the contract suite
(tests/test_contract.py: the optax wrappers, the static flags, fragments and
the float64 equations under vmap, shard_map and pmap); this checks the
reference it is held to, on one worker, so that a mismatch shows here first.
"""

import math

import jax
import numpy as np
import numpy_reference
import optax

STEPS = 8
# A vector (Adam), a tall matrix (iterated transposed), a wide one (scaled by
# sqrt(fan_out / fan_in)) and a 3-D leaf (Adam: Muon takes matrices only).
SHAPES = ((6,), (8, 6), (2, 3), (3, 4, 2))


def test_reference_muon_matches_optax_muon_step_by_step():
  rng = np.random.default_rng(0)
  params = {f"p{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(SHAPES)}
  tx = optax.contrib.muon(0.1)
  update = jax.jit(tx.update)
  state = tx.init(params)
  size = sum(math.prod(s) for s in SHAPES)
  reference = numpy_reference.Inner("muon", (size,), shapes=SHAPES)

  def flat(tree):  # The leaves' flatten order is p0, p1, p2, p3.
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)

  for step in range(STEPS):
    grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    expected = reference(flat(grads))
    # Steps of about 0.1 (the learning rate times an orthogonalized entry or
    # Adam's normalized moment); float32's Newton-Schulz (5 steps of a map of
    # slope up to 3.4445) leaves up to ~3e-5 of an entry, 3e-6 of a step: it
    # measures 1.3e-6 absolute, 2e-5 relative.
    np.testing.assert_allclose(flat(updates), expected, rtol=5e-5, atol=5e-6, err_msg=f"{step}")


def test_newton_schulz_nearly_orthogonalizes():
  # An odd matrix polynomial keeps the singular vectors: U^T O V is
  # diagonal. The quintic's coefficients trade exactness for speed: after 5
  # steps the singular values lie in about (0.68, 1.14), whatever the input's
  # scale (optax's docstring: roughly Uniform(0.5, 1.5)).
  g = np.random.default_rng(1).normal(size=(8, 6)) * 3.0
  o = numpy_reference.newton_schulz(g)
  u, _, vt = np.linalg.svd(g, full_matrices=False)
  inner = u.T @ o @ vt.T
  np.testing.assert_allclose(inner - np.diag(np.diag(inner)), 0, atol=1e-12)
  assert 0.6 < np.diag(inner).min() and np.diag(inner).max() < 1.25, np.diag(inner)
