"""Muon with the Newton-Schulz iterations batched: ``train.optimizer.newton_schulz: batched``.

torch.optim.Muon orthogonalises one 2-D matrix at a time.  On a small model that
is many tiny matmuls (the speedrun's 16 matrices of 128 x 128 to 128 x 512: five
iterations of three matmuls each), and it cannot take MoE experts, which are
3-D ``[n_experts, A, B]`` tensors of one matrix per expert.  :class:`BatchedMuon`
computes exactly torch's update -- the same momentum, the same quintic iteration
in bfloat16 with the same coefficients, the same per-shape learning-rate
adjustment and decoupled weight decay -- but stacks every matrix of one shape
(the 2-D parameters and each expert's slice of a 3-D one) and runs the
iterations on the stack with batched matmuls.  Its state (``momentum_buffer``
per parameter) and groups are torch.optim.Muon's, so checkpoints read either way.
``tests/train/test_muon.py`` checks it against torch.optim.Muon matrix by matrix.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch


def newton_schulz_batched(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                          eps: float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Orthogonalise each matrix of ``g: [n, A, B]`` (torch.optim.Muon's quintic iteration, in bfloat16;
    ``dtype`` only for tests that compare two layouts without bfloat16's rounding).

    Per matrix this is torch's ``_zeropower_via_newtonschulz``: tall matrices are transposed, the matrix is
    divided by its Frobenius norm (at least ``eps``), then ``X <- a X + (b G + c G G) X`` with ``G = X X^T``."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's learning rate for one ``A x B`` matrix (torch.optim.Muon's rule): 'original'
    ``sqrt(max(1, A/B))``, 'match_rms_adamw' ``0.2 sqrt(max(A, B))``."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def evaluate_closure(closure):
    """An optimizer's ``step(closure)`` protocol: the closure's loss, computed with gradients on (or None)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class BatchedMuon(torch.optim.Optimizer):
    """torch.optim.Muon's update for 2-D matrices and stacks of them (3-D MoE experts: one matrix per expert),
    with the Newton-Schulz iterations of all matrices of one shape done together."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None):
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"batched Muon updates 2-D matrices and 3-D stacks of them, not a "
                                     f"parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            orthogonal = self._orthogonalise(updates, group)
            lr = group["lr"]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            for p, o in zip(params, orthogonal):
                p.add_(o.view_as(p), alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss

    @staticmethod
    def _orthogonalise(updates: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """The orthogonalised update of each parameter, the matrices of one shape iterated as one stack."""
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, u in enumerate(updates):
            by_shape[(tuple(u.shape[-2:]), u.device)].append(i)
        out: list[torch.Tensor | None] = [None] * len(updates)
        for indices in by_shape.values():
            stack = [updates[i].reshape(-1, *updates[i].shape[-2:]) for i in indices]
            sizes = [s.shape[0] for s in stack]
            result = newton_schulz_batched(torch.cat(stack) if len(stack) > 1 else stack[0],
                                           group["ns_coefficients"], group["ns_steps"], group["eps"])
            for i, part in zip(indices, result.split(sizes)):
                out[i] = part
        return out
