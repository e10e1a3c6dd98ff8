"""Flow-matching ODE solvers with one interface.

    solver = make_solver("euler" | "unipc" | "unipc_bh1", sigmas)
    for i in range(solver.num_steps):
        v = model(x, sigmas[i] * 1000)        # velocity: dx/dsigma = noise - x0
        x = solver.step(i, x, v)

Convention (the official InfiniteTalk/Wan one): x_sigma = (1 - sigma) * x0 + sigma * noise, the model
predicts v = noise - x0, so x0 = x - sigma * v and one Euler step is x + v * (sigma_next - sigma).

UniPC is the flow-matching variant that Wan ships (FlowUniPCMultistepScheduler: predict x0,
alpha = 1 - sigma, lambda = log(alpha / sigma), B(h) = expm1(-h) for "bh2"), order 2 by default,
lower order at the first step (warm-up) and at the last step. Coefficients are computed in Python
floats (float64) once per step; tensors are combined in the dtype of x. The solver keeps only
the previous x0 predictions it needs; it is deterministic (no noise is drawn).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .schedules import validate_sigmas

SOLVERS = ("euler", "unipc", "unipc_bh1")

# log(alpha/sigma) is -inf at sigma == 1; like the reference implementation, move that one point
# an epsilon down so the multistep coefficients stay finite.
_SIGMA_ONE_EPS = 1e-6


class Solver:
    """Base class: `step(i, x, v)` advances x from sigmas[i] to sigmas[i + 1]."""

    name = "base"

    def __init__(self, sigmas: Sequence[float]):
        self.sigmas = validate_sigmas(sigmas)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def reset(self) -> None:
        """Forget any multistep history (start a new trajectory)."""

    def denoised(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The x0 estimate at step i (for previews)."""
        return x - self.sigmas[i] * v.to(x.dtype)

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step {i} outside 0..{self.num_steps - 1}")


class EulerSolver(Solver):
    """First-order flow-matching Euler: x <- x + v * (sigma_next - sigma)."""

    name = "euler"

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._check_index(i)
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * v.to(x.dtype)


def _lambda(sigma: float) -> float:
    """log-SNR for flow matching: log((1 - sigma) / sigma)."""
    if sigma <= 0.0:
        return math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the tiny (order x order) UniPC systems."""
    n = len(b)
    m = [row[:] + [b[r]] for r, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        if m[col][col] == 0.0:
            raise ZeroDivisionError("singular UniPC system")
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (m[r][n] - sum(m[r][c] * out[c] for c in range(r + 1, n))) / m[r][r]
    return out


class UniPCSolver(Solver):
    """UniPC (predictor UniP + corrector UniC) for flow-matching models, x0 parametrisation."""

    def __init__(self, sigmas: Sequence[float], order: int = 2, variant: str = "bh2",
                 lower_order_final: bool = True, disable_corrector: Sequence[int] = ()):
        super().__init__(sigmas)
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
        if order < 1:
            raise ValueError("UniPC order must be >= 1")
        self.name = "unipc" if variant == "bh2" else "unipc_bh1"
        self.order = int(order)
        self.variant = variant
        self.lower_order_final = lower_order_final
        self.disable_corrector = set(int(k) for k in disable_corrector)
        work = list(self.sigmas)
        if abs(work[0] - 1.0) < _SIGMA_ONE_EPS:
            work[0] -= _SIGMA_ONE_EPS
        self._sig = work
        self._lam = [_lambda(s) for s in work]
        self.reset()

    def reset(self) -> None:
        self._x0s: list[torch.Tensor] = []   # x0 predictions, oldest first, at most `order`
        self._x0_steps: list[int] = []       # step index of each stored prediction
        self._last_sample: torch.Tensor | None = None
        self._this_order = 0
        self._warm = 0                       # predictions seen so far (capped at order)
        self._next = 0

    def denoised(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return x - self._sig[i] * v.to(x.dtype)

    def _coefficients(self, s0: int, t: int, hist: list[int], order: int, corrector: bool):
        """Scalars of one UniP (corrector=False) or UniC update from sigma index s0 to t.

        hist: sigma indices of the older predictions (newest first), len == order - 1.
        Returns (a, c0, rhos, rks, bh) with x_t = a*x + c0*m0 - bh * sum(rho_k * D_k), where
        D_k = (m_k - m0) / rk_k for the history, and for the corrector a last D = m_t - m0.
        """
        sig_t, sig_s0 = self._sig[t], self._sig[s0]
        alpha_t = 1.0 - sig_t
        h = self._lam[t] - self._lam[s0]
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = hh if self.variant == "bh1" else math.expm1(hh)
        rks = [(self._lam[k] - self._lam[s0]) / h for k in hist] + [1.0]
        rows, b = [], []
        h_phi_k = h_phi_1 / hh - 1.0
        factorial = 1
        for n in range(1, order + 1):
            rows.append([rk ** (n - 1) for rk in rks])
            b.append(h_phi_k * factorial / b_h)
            factorial *= n + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        if corrector:
            rhos = [0.5] if order == 1 else _solve(rows, b)
        elif order == 1:
            rhos = []
        elif order == 2:
            rhos = [0.5]
        else:
            rhos = _solve([r[:-1] for r in rows[:-1]], b[:-1])
        a = sig_t / sig_s0
        c0 = -alpha_t * h_phi_1
        return a, c0, rhos, rks[:-1], alpha_t * b_h

    def _update(self, x, m0, history, coeffs, m_t=None):
        a, c0, rhos, rks, bh = coeffs
        out = a * x + c0 * m0
        res = None
        for rho, rk, mk in zip(rhos, rks, history):
            term = (rho / rk) * (mk - m0)
            res = term if res is None else res + term
        if m_t is not None:
            term = rhos[-1] * (m_t - m0)
            res = term if res is None else res + term
        if res is not None:   # skipped when empty: bh * 0 would be nan where bh is infinite
            out = out - bh * res
        return out

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._check_index(i)
        if i == 0:
            self.reset()
        elif i != self._next:
            raise ValueError(f"UniPC steps must run in order: expected step {self._next}, got {i}")
        x0 = x - self._sig[i] * v.to(x.dtype)

        if i > 0 and self._last_sample is not None and (i - 1) not in self.disable_corrector:
            p = self._this_order
            m0 = self._x0s[-1]
            hist_idx = self._x0_steps[-p:-1][::-1] if p > 1 else []
            history = self._x0s[-p:-1][::-1] if p > 1 else []
            coeffs = self._coefficients(i - 1, i, hist_idx, p, corrector=True)
            x = self._update(self._last_sample, m0, history, coeffs, m_t=x0)

        self._x0s.append(x0)
        self._x0_steps.append(i)
        if len(self._x0s) > self.order:
            self._x0s.pop(0)
            self._x0_steps.pop(0)

        order = min(self.order, self.num_steps - i) if self.lower_order_final else self.order
        order = min(order, self._warm + 1)
        self._this_order = order
        self._last_sample = x
        hist_idx = self._x0_steps[-order:-1][::-1] if order > 1 else []
        history = self._x0s[-order:-1][::-1] if order > 1 else []
        coeffs = self._coefficients(i, i + 1, hist_idx, order, corrector=False)
        out = self._update(x, x0, history, coeffs)
        self._warm = min(self._warm + 1, self.order)
        self._next = i + 1
        return out.to(x.dtype)


def make_solver(name: str, sigmas: Sequence[float], **options) -> Solver:
    """Build a solver by name: "euler", "unipc" (bh2, order 2) or "unipc_bh1"."""
    key = name.lower()
    if key == "euler":
        return EulerSolver(sigmas)
    if key in ("unipc", "unipc_bh2"):
        return UniPCSolver(sigmas, variant="bh2", **options)
    if key == "unipc_bh1":
        return UniPCSolver(sigmas, variant="bh1", **options)
    raise ValueError(f"unknown solver {name!r}; expected one of {SOLVERS}")
