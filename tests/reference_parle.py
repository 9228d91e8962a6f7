"""Independent float64 NumPy references written from docs/algorithm.md.

Nothing here imports parle_jax: these are the numbers the library must match.
The test problem is linear least squares, one replica per row:

  f_batch(w) = 0.5 * mean_i (x_i . w - t_i)^2,  grad = X^T (X w - t) / B,

with the bias folded into w (the last input column is 1).
"""

import numpy as np


def least_squares_grad(w, inputs, targets):
  residual = inputs @ w - targets
  return inputs.T @ residual / len(targets), 0.5 * np.mean(residual ** 2)


def parle(x0, inputs, targets, *, L, rounds, lr, gamma, rho, alpha=0.75, mu=0.9,
          mu_outer=0.9, weight_decay=0.0, eta_inner=0.1):
  """docs/algorithm.md, "One round, for replica a". Schedules are functions of k.

  Args:
    x0: [n, d] initial weights (one row per replica).
    inputs: [n, rounds * L, B, d]; targets: [n, rounds * L, B].

  Returns:
    A list with one dict per round: params (what each replica holds after the
    round, the new anchors), anchors, reference (their mean), and the losses
    [n, L] measured at each inner step.
  """
  x = np.array(x0, np.float64)
  n = x.shape[0]
  v_y = np.zeros_like(x)
  v_x = np.zeros_like(x)
  history = []
  for k in range(rounds):
    y, z = x.copy(), x.copy()
    losses = np.zeros((n, L))
    for t in range(L):
      for a in range(n):
        step = k * L + t
        g, losses[a, t] = least_squares_grad(y[a], inputs[a, step], targets[a, step])
        d = g + weight_decay * y[a] + gamma(k) * (y[a] - x[a])
        v_y[a] = mu * v_y[a] + d
        d = d + mu * v_y[a]
        y[a] = y[a] - eta_inner * d
        z[a] = alpha * z[a] + (1 - alpha) * y[a]
    zbar = z.mean(axis=0)
    D = (x - z) + rho(k) * (x - zbar)
    v_x = mu_outer * v_x + D
    D = D + mu_outer * v_x
    x = x - lr(k) * D
    history.append(dict(params=x.copy(), anchors=x.copy(), reference=x.mean(axis=0),
                        losses=losses))
  return history


def entropy_sgd(x0, inputs, targets, *, L, rounds, lr, gamma, alpha=0.75, mu=0.9,
                eta_inner=0.1):
  """Entropy-SGD without noise (Chaudhari et al. 2017; docs/algorithm.md's n=1, rho=0).

  Inner loop: Nesterov SGD on f(y) + gamma/2 |y - x|^2, averaging y into z;
  outer step: Nesterov on the local-entropy gradient (x - z).
  """
  x = np.array(x0, np.float64)
  inner_velocity = np.zeros_like(x)
  outer_velocity = np.zeros_like(x)
  anchors = []
  for k in range(rounds):
    y, z = x.copy(), x.copy()
    for t in range(L):
      g, _ = least_squares_grad(y, inputs[k * L + t], targets[k * L + t])
      d = g + gamma(k) * (y - x)
      inner_velocity = mu * inner_velocity + d
      y = y - eta_inner * (d + mu * inner_velocity)
      z = alpha * z + (1 - alpha) * y
    outer_velocity = mu * outer_velocity + (x - z)
    x = x - lr(k) * ((x - z) + mu * outer_velocity)
    anchors.append(x.copy())
  return anchors


def _nesterov_sgd_step(w, velocity, grad, *, lr, mu, weight_decay):
  """One step of Nesterov SGD with L2 weight decay; returns (w, velocity)."""
  d = grad + weight_decay * w
  velocity = mu * velocity + d
  return w - lr * (d + mu * velocity), velocity


def local_sgd(x0, inputs, targets, *, L, rounds, lr, mu=0.9, weight_decay=0.0):
  """Local SGD (Lin et al. 2018): L local Nesterov steps per replica, then the params averaged.

  Every replica starts from `x0` ([d]); local momentum buffers are never
  averaged. Returns the averaged params after every round ([rounds, d]).
  """
  n = inputs.shape[0]
  x = np.tile(np.array(x0, np.float64), (n, 1))
  velocity = np.zeros_like(x)
  means = []
  for k in range(rounds):
    for t in range(L):
      for a in range(n):
        g, _ = least_squares_grad(x[a], inputs[a, k * L + t], targets[a, k * L + t])
        x[a], velocity[a] = _nesterov_sgd_step(x[a], velocity[a], g, lr=lr, mu=mu,
                                               weight_decay=weight_decay)
    x[:] = x.mean(axis=0)
    means.append(x[0].copy())
  return np.stack(means)


def data_parallel_sgd(x0, inputs, targets, *, steps, lr, mu=0.9, weight_decay=0.0):
  """One model, the gradients of the n replicas' batches averaged every step ([steps, d])."""
  n = inputs.shape[0]
  x, velocity, history = np.array(x0, np.float64), np.zeros(len(x0)), []
  for t in range(steps):
    g = np.mean([least_squares_grad(x, inputs[a, t], targets[a, t])[0] for a in range(n)], 0)
    x, velocity = _nesterov_sgd_step(x, velocity, g, lr=lr, mu=mu, weight_decay=weight_decay)
    history.append(x.copy())
  return np.stack(history)


def diloco(x0, inputs, targets, *, L, rounds, inner_lr, outer_lr, mu=0.9, outer_mu=0.9):
  """DiLoCo (Douillard et al. 2023) with an inner Nesterov SGD.

  Every round each replica runs L inner steps from the shared params theta
  (its inner momentum kept across rounds); the mean of theta - x^a is the
  outer gradient of a Nesterov step on theta. Returns theta after every round.
  """
  n = inputs.shape[0]
  theta = np.array(x0, np.float64)
  inner_velocity = np.zeros((n, len(theta)))
  outer_velocity = np.zeros_like(theta)
  history = []
  for k in range(rounds):
    x = np.tile(theta, (n, 1))
    for t in range(L):
      for a in range(n):
        g, _ = least_squares_grad(x[a], inputs[a, k * L + t], targets[a, k * L + t])
        x[a], inner_velocity[a] = _nesterov_sgd_step(x[a], inner_velocity[a], g, lr=inner_lr,
                                                     mu=mu, weight_decay=0.0)
    delta = (theta - x).mean(axis=0)
    outer_velocity = outer_mu * outer_velocity + delta
    theta = theta - outer_lr * (delta + outer_mu * outer_velocity)
    history.append(theta.copy())
  return np.stack(history)
