"""The periodic algorithms' equations (each one's page in docs/algorithms/) in float64 NumPy.

Each function takes the initial params x0 (D,) and the gradients (T, N, D)
and returns, after every step, the workers' params (N, D) and the center (D,).
The inner optimizer is plain SGD, SGD with momentum, Adam or Muon, written out
here too.
"""

import math

import numpy as np

# optax.contrib.muon's defaults: the quintic Newton-Schulz coefficients, its
# number of steps, the momentum of the matrices and Adam's for the rest.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MUON_BETA = 0.95
MUON_ADAM_B1, MUON_ADAM_B2 = 0.9, 0.999


def newton_schulz(g, *, steps=NS_STEPS, eps=1e-8):
  """Muon's orthogonalization of a matrix g: about U V^T for g = U S V^T.

  The wide orientation (rows <= columns) is iterated; the matrix is first
  divided by its Frobenius norm (plus eps), then, with A = X X^T,
  X <- a X + (b A + c A^2) X, ``steps`` times.
  """
  x = np.asarray(g, np.float64)
  tall = x.shape[0] > x.shape[1]
  x = x.T if tall else x
  x = x / (np.linalg.norm(x) + eps)
  a, b, c = NS_COEFFS
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


class Inner:
  """SGD (``"sgd"``), SGD with momentum 0.5 (``"momentum"``, optax's trace:
  ``m <- g + 0.5 m``), Adam (``"adam"``) or Muon (``"muon"``) on one array,
  with its own state.

  Muon needs ``shapes``, the shapes of the params' leaves in flatten order
  (the array is their concatenation, each leaf row-major): the 2-D leaves
  take Muon's step, the others Adam's, as ``optax.contrib.muon`` does.
  """

  def __init__(self, kind, shape, lr=0.1, b1=0.9, b2=0.99, eps=1e-8, momentum=0.5, shapes=None):
    self.kind, self.lr, self.b1, self.b2, self.eps = kind, lr, b1, b2, eps
    self.momentum = momentum
    self.mu, self.nu, self.t = np.zeros(shape), np.zeros(shape), 0
    if kind == "muon":
      if shapes is None or sum(math.prod(s) for s in shapes) != math.prod(shape):
        raise ValueError(f"Muon needs the leaves' shapes, adding up to {shape}; got {shapes}.")
      self.shapes = [tuple(s) for s in shapes]

  def __call__(self, g):
    """The update (to add to the params) for gradient g."""
    if self.kind == "sgd":
      return -self.lr * g
    if self.kind == "momentum":
      self.mu = g + self.momentum * self.mu
      return -self.lr * self.mu
    if self.kind == "muon":
      return self._muon(g)
    self.t += 1
    self.mu = self.b1 * self.mu + (1 - self.b1) * g
    self.nu = self.b2 * self.nu + (1 - self.b2) * g**2
    mu_hat = self.mu / (1 - self.b1**self.t)
    nu_hat = self.nu / (1 - self.b2**self.t)
    return -self.lr * mu_hat / (np.sqrt(nu_hat) + self.eps)

  def _muon(self, g):
    """optax.contrib.muon(lr) with its defaults, leaf by leaf.

    Both halves use Nesterov momentum with bias correction: with m the new
    first moment after t steps, the step uses
    ``beta m / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t)``. A matrix
    (fan_in, fan_out) then steps by -lr * sqrt(max(1, fan_out / fan_in))
    times the Newton-Schulz orthogonalization of that; any other leaf by
    Adam's -lr * mu_hat / (sqrt(nu_hat) + eps) (b1 0.9, b2 0.999).
    """
    self.t += 1
    t, out, start = self.t, np.empty_like(self.mu), 0
    for shape in self.shapes:
      sl = slice(start, start + math.prod(shape))
      start = sl.stop
      beta = MUON_BETA if len(shape) == 2 else MUON_ADAM_B1
      self.mu[sl] = beta * self.mu[sl] + (1 - beta) * g[sl]
      mu_hat = beta * self.mu[sl] / (1 - beta ** (t + 1)) + (1 - beta) * g[sl] / (1 - beta**t)
      if len(shape) == 2:
        scale = math.sqrt(max(1.0, shape[1] / shape[0]))
        out[sl] = -self.lr * scale * newton_schulz(mu_hat.reshape(shape)).ravel()
      else:
        self.nu[sl] = MUON_ADAM_B2 * self.nu[sl] + (1 - MUON_ADAM_B2) * g[sl] ** 2
        nu_hat = self.nu[sl] / (1 - MUON_ADAM_B2**t)
        out[sl] = -self.lr * mu_hat / (np.sqrt(nu_hat) + self.eps)
    return out


def agn(x0, grads, *, n, p, ordering, inner, center_reduction="sum"):
  x = np.repeat(np.asarray(x0, np.float64)[None], n, axis=0)
  c = np.asarray(x0, np.float64).copy()
  local = [Inner(inner, c.shape) for _ in range(n)]
  center_opt = Inner(inner, c.shape)
  acc = np.zeros_like(x)
  out = []
  for t, g in enumerate(np.asarray(grads, np.float64), start=1):
    acc += g
    x = x + np.stack([local[k](g[k]) for k in range(n)])
    if t % p == 0:
      normalized = acc / p / (n if center_reduction == "mean" else 1)
      if ordering == "simultaneous":
        c = c + center_opt(normalized.sum(0))
        x[:] = c
      else:
        for k in range(n):
          c = c + center_opt(normalized[k])
          x[k] = c
      acc[:] = 0
    out.append((x.copy(), c.copy()))
  return out


def elastic(x0, grads, *, n, p, inner, alpha=None, rho=0.0, ordering="simultaneous"):
  """Elastic averaging (docs/algorithms/elastic_average.md); ``alpha=None``: 0.9 / p / N."""
  alpha = 0.9 / p / n if alpha is None else alpha
  x = np.repeat(np.asarray(x0, np.float64)[None], n, axis=0)
  c = np.asarray(x0, np.float64).copy()
  snap = np.repeat(c[None], n, axis=0)
  local = [Inner(inner, c.shape) for _ in range(n)]
  out = []
  for t, g in enumerate(np.asarray(grads, np.float64), start=1):
    g = g + rho * (x - snap)
    x = x + np.stack([local[k](g[k]) for k in range(n)])
    if t % p == 0:
      if ordering == "simultaneous":
        snap = np.repeat(c[None], n, axis=0)
        d = x - snap
        x = x - alpha * d
        c = c + alpha * d.sum(0)
      else:
        for k in range(n):
          snap[k] = c
          d = x[k] - c
          x[k] = x[k] - alpha * d
          c = c + alpha * d
    out.append((x.copy(), c.copy()))
  return out


def schedule_flag(t, *, period, warmup=0, fragments=1):
  """The flag of call t (1-based), as ``optax_dist.SyncSchedule``'s docstring gives it."""
  if t <= warmup:
    return "warmup"
  r = t - warmup
  width = period // fragments
  if r % width:
    return False
  if fragments == 1:
    return True
  return ((r % period) // width - 1) % fragments


def model_average(x0, grads, *, n, p, inner, **kwargs):
  return diloco(x0, grads, n=n, p=p, inner=inner, outer_lr=1.0, momentum=0.0, **kwargs)


def diloco(
  x0,
  grads,
  *,
  n,
  p,
  inner,
  outer_lr=0.7,
  momentum=0.9,
  nesterov=True,
  warmup=0,
  labels=None,
  flags=None,
  delay=0,
  blend=0.0,
  shapes=None,
):
  """DiLoCo with momentum SGD as the outer optimizer (Nesterov's by default).

  optax.sgd(lr, momentum, nesterov=True): m <- delta + momentum * m, update
  -lr * (delta + momentum * m); without Nesterov, -lr * m. With lr 1 and no
  momentum: model averaging.

  ``labels`` (D,) gives each coordinate's fragment (each with its own
  momentum); ``warmup`` calls average the gradients before the inner step
  (the center follows the params); ``flags`` (one per call, without a
  delay) override the schedule; ``shapes`` are the leaves' shapes (Muon).

  ``delay`` tau and ``blend``: the pseudo-gradient of a sync scheduled on
  call s is taken from the params after s - tau inner steps (those that call
  s - tau + 1 receives) over the workers whose fragment is finite; its outer
  step lands on call s, after that call's inner step, and the workers merge:
  x <- blend * x + (1 - blend) * center (a left-out worker, or a non-finite
  number, lands on the center; a worker that came into the call non-finite
  stays so, since the updates are ``target - params``). With tau 0 and blend
  0 that is the undelayed sync.
  """
  x0 = np.asarray(x0, np.float64)
  labels = np.zeros(x0.shape, int) if labels is None else np.asarray(labels)
  num = int(labels.max()) + 1
  if flags is not None and delay:
    raise ValueError("flags override the schedule of undelayed syncs only")
  x = np.repeat(x0[None], n, axis=0)
  c = x0.copy()
  local = [Inner(inner, c.shape, shapes=shapes) for _ in range(n)]
  m = np.zeros_like(c)
  pending = {}  # Fragment: (the call it lands on, pseudo-gradient, workers in the mean).
  out = []
  for t, g in enumerate(np.asarray(grads, np.float64), start=1):
    flag = (
      schedule_flag(t, period=p, warmup=warmup, fragments=num) if flags is None else flags[t - 1]
    )
    if flag == "warmup":
      mean = g.mean(0)
      x = x + np.stack([local[k](mean) for k in range(n)])
      c = x[0].copy()
      out.append((x.copy(), c.copy()))
      continue
    before = x
    x = x + np.stack([local[k](g[k]) for k in range(n)])
    if delay:  # What the sync landing tau calls from now sends: these params.
      flag = schedule_flag(t + delay, period=p, warmup=warmup, fragments=num)
    synced = [] if flag is False else list(range(num)) if flag is True else [flag]
    for f in synced:
      idx = labels == f
      mine = np.isfinite(x[:, idx]).all(1)
      mean = x[mine][:, idx].mean(0) if mine.any() else np.zeros(idx.sum())
      pending[f] = (t + delay, c[idx] - mean, mine)
    for f in [f for f, (due, _, _) in pending.items() if due == t]:
      _, delta, mine = pending.pop(f)
      idx = labels == f
      if mine.any():
        m[idx] = delta + momentum * m[idx]
        step = delta + momentum * m[idx] if nesterov else m[idx]
        c[idx] = c[idx] - outer_lr * step
      xf = x[:, idx]
      land = np.where(np.isfinite(xf) & mine[:, None], blend * xf + (1 - blend) * c[idx], c[idx])
      x[:, idx] = np.where(np.isfinite(before[:, idx]), land, np.nan)
    out.append((x.copy(), c.copy()))
  return out
