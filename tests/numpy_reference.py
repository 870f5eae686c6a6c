"""The periodic algorithms' equations (DESIGN sections 4 to 6) in float64 NumPy.

Each function takes the initial params x0 (D,) and the gradients (T, N, D)
and returns, after every step, the workers' params (N, D) and the center (D,).
The inner optimizer is plain SGD, SGD with momentum or Adam, written out here too.
"""

import numpy as np


class Inner:
  """SGD (``"sgd"``), SGD with momentum 0.5 (``"momentum"``, optax's trace:
  ``m <- g + 0.5 m``) or Adam (``"adam"``) on one array, with its own state."""

  def __init__(self, kind, shape, lr=0.1, b1=0.9, b2=0.99, eps=1e-8, momentum=0.5):
    self.kind, self.lr, self.b1, self.b2, self.eps = kind, lr, b1, b2, eps
    self.momentum = momentum
    self.mu, self.nu, self.t = np.zeros(shape), np.zeros(shape), 0

  def __call__(self, g):
    """The update (to add to the params) for gradient g."""
    if self.kind == "sgd":
      return -self.lr * g
    if self.kind == "momentum":
      self.mu = g + self.momentum * self.mu
      return -self.lr * self.mu
    self.t += 1
    self.mu = self.b1 * self.mu + (1 - self.b1) * g
    self.nu = self.b2 * self.nu + (1 - self.b2) * g**2
    mu_hat = self.mu / (1 - self.b1**self.t)
    nu_hat = self.nu / (1 - self.b2**self.t)
    return -self.lr * mu_hat / (np.sqrt(nu_hat) + self.eps)


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
  """Elastic averaging (DESIGN section 3); ``alpha=None``: the default 0.9 / p / N."""
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
  """The flag of call t (1-based): DESIGN section 10.1 and 10.2."""
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
  x0, grads, *, n, p, inner, outer_lr=0.7, momentum=0.9, warmup=0, labels=None, flags=None
):
  """DiLoCo with Nesterov momentum SGD as the outer optimizer.

  optax.sgd(lr, momentum, nesterov=True): m <- delta + momentum * m, update
  -lr * (delta + momentum * m). With lr 1 and no momentum: model averaging.

  ``labels`` (D,) gives each coordinate's fragment (each with its own
  momentum); ``warmup`` calls average the gradients before the inner step
  (the center follows the params); ``flags`` (one per call) override the
  schedule.
  """
  x0 = np.asarray(x0, np.float64)
  labels = np.zeros(x0.shape, int) if labels is None else np.asarray(labels)
  num = int(labels.max()) + 1
  x = np.repeat(x0[None], n, axis=0)
  c = x0.copy()
  local = [Inner(inner, c.shape) for _ in range(n)]
  m = np.zeros_like(c)
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
    x = x + np.stack([local[k](g[k]) for k in range(n)])
    synced = [] if flag is False else list(range(num)) if flag is True else [flag]
    for f in synced:
      idx = labels == f
      delta = c[idx] - x[:, idx].mean(0)
      m[idx] = delta + momentum * m[idx]
      c[idx] = c[idx] - outer_lr * (delta + momentum * m[idx])
      x[:, idx] = c[idx]
    out.append((x.copy(), c.copy()))
  return out
