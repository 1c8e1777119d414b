"""iMAML: implicit MAML (Rajeswaran, Finn, Kakade and Levine, NeurIPS 2019, "Meta-Learning with
Implicit Gradients").

Inner problem, per task i, from the meta-parameters theta::

    phi*_i = argmin_phi  L_i^support(phi) + lam/2 ||phi - theta||^2

solved approximately by ``inner_steps`` steps of gradient descent on that regularised objective
(the :class:`Proximal` rule in the one :func:`~metatl.meta.adapt.adapt`), started from theta, with
no graph kept through the steps. Outer objective, as MAML's, the mean query loss
``1/|B| sum_i L_i^query(phi*_i)``. Its gradient comes from the implicit function theorem: at the
inner solution ``grad L_i^support(phi*) + lam (phi* - theta) = 0``, so
``d phi*_i / d theta = (I + H_i / lam)^{-1}`` with ``H_i`` the Hessian of ``L_i^support`` at
``phi*_i``, and the task's meta-gradient is::

    g_i = (I + H_i / lam)^{-1} grad_phi L_i^query(phi*_i)

found by ``cg_steps`` iterations of conjugate gradient on Hessian-vector products (double backward
through the support loss at ``phi*_i``). Memory does not grow with ``inner_steps``: one support
graph is kept, and only while the meta-gradient is computed.

``phi*_i`` enters autograd through :class:`ImplicitSolution`, whose backward is the linear solve
above. Every executor that differentiates the adapted parameters (``loop``, ``threads``, and
``auto``, which picks one of them) thus computes ``g_i`` without knowing about iMAML; the vmap
executors refuse it (its CG stops on data-dependent tests).

Where this differs from the paper's code (aravindr93/imaml_dev): that code takes the inner steps on
the support loss alone and then one step on the proximal term, and its CG solves
``((1 + d) I + H / (lam + 10)) x = g`` (damping ``d = 1``); here both are the paper's equations
by default, and ``cg_damping=1, lam_damping=10`` give that code's damped system (a better
conditioned solve, no longer the exact implicit gradient; with BatchNorm on a 1-shot support set
``I + H / lam`` need not be positive definite).
The defaults are the paper's Omniglot settings (Table 2: lam = 2, 16 inner steps for 5-way, 25 for
20-way, 5 CG steps; the README's inner step size 0.1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..registry import ALGORITHMS
from ._types import Params
from .base import GradientMetaLearner


class Proximal:
    """Gradient descent on ``L(phi) + lam/2 ||phi - theta||^2``, where theta (the anchor) is the
    point the rule starts from: ``phi <- phi - lr * (g + lam (phi - theta))``."""

    def __init__(self, lr: float, lam: float):
        self.lr, self.lam = lr, lam

    def init(self, params: Params) -> Params:
        return {k: p.detach() for k, p in params.items()}  # the anchor theta

    def update(self, grads: Params, anchor: Params, params: Params) -> tuple[Params, Params]:
        return {k: -self.lr * (g + self.lam * (params[k] - anchor[k])) for k, g in grads.items()}, anchor


def conjugate_gradient(matvec, b: Tensor, steps: int, tol: float = 0.0) -> Tensor:
    """An approximate solution of ``A x = b`` for symmetric ``A`` given as ``matvec(v) = A v``:
    at most ``steps`` iterations of conjugate gradient from ``x = 0``, stopping once the residual
    ``||b - A x|| <= tol ||b||``, or where ``A`` shows a direction of non-positive curvature
    (``p^T A p <= 0``: the Hessian of a non-convex loss; the iterate so far is returned)."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rs = r @ r
    stop = (tol * torch.linalg.vector_norm(b)) ** 2
    for _ in range(steps):
        if rs <= stop:
            break
        ap = matvec(p)
        curvature = p @ ap
        if curvature <= 0:
            break
        alpha = rs / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rs, rs_old = r @ r, rs
        p = r + (rs / rs_old) * p
    return x


class ImplicitSolution(torch.autograd.Function):
    """``phi*`` as a function of theta for autograd: the forward returns the inner solution
    (computed already, without a graph), the backward maps a cotangent ``v`` on ``phi*`` to
    ``(I + H / lam)^{-1} v`` on theta (``solve``)."""

    @staticmethod
    def forward(ctx, solve, solution: tuple, *theta):
        ctx.solve = solve
        return tuple(s.detach().clone() for s in solution)

    @staticmethod
    def backward(ctx, *cotangents):
        return (None, None, *ctx.solve(cotangents))


@ALGORITHMS.register("imaml")
class IMAML(GradientMetaLearner):
    """iMAML with a gradient-descent inner solver and conjugate-gradient meta-gradients.

    Parameters
    ----------
    model : the base learner, a plain ``nn.Module``.
    task_type : ``"classification"`` (cross-entropy) or ``"regression"`` (MSE).
    lam : lambda, the strength of the proximal term that ties phi to theta (> 0).
    inner_lr : the step size of gradient descent on the regularised inner objective.
    inner_steps : its steps during meta-training.
    inner_steps_test : its steps when adapting at test time (default ``inner_steps``).
    cg_steps : conjugate-gradient iterations for each task's meta-gradient.
    cg_tol : stop CG earlier once the relative residual is below this.
    cg_damping, lam_damping : solve ``((1 + cg_damping) I + H / (lam + lam_damping)) x = v``
        instead of the exact ``(I + H / lam) x = v``; 0 and 0 (the default) is the paper's
        equation, 1 and 10 the authors' code.
    """

    vmappable = False  # CG stops on data-dependent tests

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        lam: float = 2.0,
        inner_lr: float = 0.1,
        inner_steps: int = 16,
        inner_steps_test: int | None = None,
        cg_steps: int = 5,
        cg_tol: float = 1e-10,
        cg_damping: float = 0.0,
        lam_damping: float = 0.0,
    ):
        if not lam > 0:
            raise ValueError(f"lam must be > 0 (the proximal term's strength, e.g. 2.0), got {lam!r}.")
        if not (isinstance(cg_steps, int) and cg_steps >= 1):
            raise ValueError(f"cg_steps must be a whole number >= 1 (e.g. 5), got {cg_steps!r}.")
        super().__init__(model, task_type, Proximal(inner_lr, lam), inner_steps, inner_steps_test)
        if not (cg_damping >= 0 and lam_damping >= 0):
            raise ValueError(
                f"cg_damping and lam_damping must be >= 0 (0 and 0: the exact implicit gradient; 1 and 10: "
                f"the authors' code), got {cg_damping!r} and {lam_damping!r}."
            )
        self.lam, self.inner_lr, self.cg_steps, self.cg_tol = lam, inner_lr, cg_steps, cg_tol
        self.cg_damping, self.lam_damping = cg_damping, lam_damping

    def adapted(
        self,
        params: Params,
        support_x: Tensor,
        support_y: Tensor,
        *,
        batched: bool = False,
        generator: torch.Generator | None = None,
    ) -> Params:
        """``phi*``: the inner steps from ``stopgrad(theta)``, attached to theta by the implicit
        gradient (:class:`ImplicitSolution`)."""
        fixed = [k for k in params if not self.adapts(k)]
        if fixed:
            raise NotImplementedError(
                f"{type(self).__name__} leaves {', '.join(fixed[:3])} out of the inner loop (adapts()); the "
                f"implicit meta-gradient here assumes every parameter is adapted (a fixed part would add a "
                f"mixed second-derivative term). Let adapts() return True for every parameter."
            )
        start = {k: p.detach() for k, p in params.items()}
        solution = self.adapt_params(start, support_x, support_y, self.inner_steps, batched=batched)
        names = [k for k, p in params.items() if p.requires_grad]
        if not names or not torch.is_grad_enabled():
            return solution
        buffers = {k: b.detach().clone() for k, b in self.model.named_buffers()}
        phi = {k: solution[k] for k in names}

        def solve(cotangents):
            return self.implicit_gradient(phi, buffers, support_x, support_y, cotangents)

        attached = ImplicitSolution.apply(solve, tuple(phi.values()), *(params[k] for k in names))
        return {**solution, **dict(zip(names, attached))}

    def implicit_gradient(
        self, phi: Params, buffers: Params, x: Tensor, y: Tensor, cotangents: Sequence[Tensor | None]
    ) -> list[Tensor]:
        """``(I + H / lam)^{-1} v`` for the cotangents ``v`` on ``phi``, with ``H`` the Hessian of
        the support loss at ``phi``, by conjugate gradient on Hessian-vector products (with
        ``cg_damping`` / ``lam_damping``: ``((1 + cg_damping) I + H / (lam + lam_damping))^{-1} v``)."""
        v = [torch.zeros_like(p) if c is None else c for p, c in zip(phi.values(), cotangents)]
        matvec = self._system(phi, buffers, x, y)
        with torch.no_grad():
            b = torch.cat([t.reshape(-1) for t in v])
            return _unflatten(conjugate_gradient(matvec, b, self.cg_steps, self.cg_tol), v)

    def _system(self, phi: Params, buffers: Params, x: Tensor, y: Tensor):
        """The matrix of :meth:`implicit_gradient`'s system at ``phi``, as a function on flat vectors."""
        with torch.enable_grad():
            leaves = {k: p.detach().requires_grad_(True) for k, p in phi.items()}
            loss = self.loss_fn(self.functional({**buffers, **leaves}, x), y)
            grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        curved = [i for i, g in enumerate(grads) if g.requires_grad]
        inputs = list(leaves.values())

        def matvec(flat):
            vs = _unflatten(flat, inputs)
            hv = [torch.zeros_like(t) for t in vs]
            if curved:
                with torch.enable_grad():
                    parts = torch.autograd.grad(
                        [grads[i] for i in curved],
                        inputs,
                        [vs[i] for i in curved],
                        retain_graph=True,
                        allow_unused=True,
                    )
                hv = [h if h is not None else z for h, z in zip(parts, hv)]
            hv = torch.cat([h.reshape(-1) for h in hv])
            return (1 + self.cg_damping) * flat + hv / (self.lam + self.lam_damping)

        return matvec

    def system_eigenvalues(
        self, params: Params, support_x: Tensor, support_y: Tensor, tol: float = 1e-3
    ) -> tuple[float, float]:
        """The smallest and largest eigenvalue of the matrix :meth:`implicit_gradient` inverts for
        this task, ``(1 + cg_damping) I + H / (lam + lam_damping)`` at the inner solution from
        ``params`` (Lanczos on Hessian-vector products, scipy's ``eigsh``, to relative tolerance
        ``tol``). Conjugate gradient needs it positive definite: where the smallest is not
        positive, the meta-gradient is not the implicit gradient (CG stops at the first direction
        of non-positive curvature), and damping (``cg_damping``, ``lam_damping``) or a larger
        ``lam`` is needed."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator, eigsh

        with torch.no_grad():
            solution = self.adapt_params(
                {k: p.detach() for k, p in params.items()}, support_x, support_y, self.inner_steps
            )
        phi = {k: solution[k] for k, p in params.items() if p.requires_grad}
        buffers = {k: b.detach().clone() for k, b in self.model.named_buffers()}
        matvec = self._system(phi, buffers, support_x, support_y)
        like = next(iter(phi.values()))
        n = sum(p.numel() for p in phi.values())

        def apply(v):
            with torch.no_grad():
                flat = torch.as_tensor(np.asarray(v).reshape(-1), dtype=like.dtype, device=like.device)
                return matvec(flat).cpu().numpy().astype(np.float64)

        op = LinearOperator((n, n), matvec=apply, dtype=np.float64)
        ends = [eigsh(op, k=1, which=w, tol=tol, return_eigenvectors=False)[0] for w in ("SA", "LA")]
        return float(ends[0]), float(ends[1])


def _unflatten(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out
