"""Mixture-of-Experts feed-forward layer (``mlp`` kind ``moe``).

``forward(x: [B, T, D]) -> (y: [B, T, D], aux)``:

1. the router (``routers.py``; fp32 maths) picks ``top_k`` of ``n_experts``
   experts per token and their combine weights (normalisation per router:
   see ``routers.py``);
2. the ``B*T*k`` assignments are sorted by expert, cut at the expert capacity
   in the order of ``drop_policy`` and gathered into one buffer
   (``moe_dispatch.py``);
3. every routed expert runs on its contiguous slice (``torch._grouped_mm`` or
   a per-expert loop, ``moe_experts.py``), outputs are weighted and summed
   back to token order (gathers only, see ``moe_dispatch.py``);
4. ``n_shared_experts`` always-on experts (DeepSeek style, same hidden size)
   run on every token and are added.

``aux``: ``loss`` = ``lb_loss_coef * lb_loss + z_loss_coef * z_loss``
(differentiable, add it to the objective); ``lb_loss`` (Switch, normalised to
1 at perfect balance; per batch or per sequence; under data parallelism the
batch is the global one, as in one process), ``z_loss`` (mean squared
logsumexp of the router logits) unweighted and detached; ``load`` ([E],
fraction of the routed assignments per expert before dropping, sums to 1),
``dropped_frac`` (fraction of assignments dropped by capacity) and
``router_entropy`` (mean entropy in nats of the per-token router
distribution), all detached.

A router with a balancing bias (``sigmoid``) is updated by
:meth:`MoE.after_optimizer_step`, which the trainer calls once per optimizer
step on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..model.init import InitSpec
from ..registry import suggest
from .base import Component, ModelContext
from .mlp import ACTIVATIONS, DEFAULT_MULT, hidden_size
from .moe_dispatch import DROP_POLICIES, combine, expert_capacity, gather_tokens, plan_dispatch
from .moe_experts import DISPATCH_KINDS, Experts, grouped_mm_shapes_ok
from .routers import ROUTERS, load_balancing_loss, mean_entropy, router_z_loss

LB_LOSS_TYPES = ("batch", "sequence")
_PARAMS = ("kind", "n_experts", "top_k", "expert_kind", "expert_hidden", "expert_hidden_mult",
           "n_shared_experts", "router", "capacity_factor", "eval_capacity_factor", "min_capacity",
           "drop_policy", "lb_loss_coef", "lb_loss_type", "z_loss_coef", "bias", "dispatch")


class MoEConfigError(ValueError):
    """An ``mlp: {kind: moe}`` block that passed the schema but is inconsistent."""


def resolve_router(kind: str):
    """Built-in routers come from ``ROUTERS``; other names from the (plug-in) registry."""
    if kind in ROUTERS:
        return ROUTERS[kind]
    from ..registry import get
    return get("router", kind)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MoEConfigError(message)


class MoE(Component):
    """Routed experts (+ optional shared experts) with capacity, aux losses and statistics."""

    @dataclass(frozen=True)
    class Spec:
        dim: int
        n_experts: int
        top_k: int
        hidden: int                       # expert hidden size H
        router: Any                       # the router's own frozen spec
        router_kind: str = "topk"
        expert_kind: str = "swiglu"
        n_shared_experts: int = 0
        capacity_factor: float | None = None       # None: dropless in training
        eval_capacity_factor: float | None = None  # None: dropless in eval
        min_capacity: int = 4
        drop_policy: str = "priority"
        lb_loss_coef: float = 0.01
        lb_loss_type: str = "batch"
        z_loss_coef: float = 0.001
        bias: bool = False
        dispatch: str = "auto"

    @classmethod
    def make_spec(cls, params: dict[str, Any], ctx: ModelContext) -> "MoE.Spec":
        """Turn the validated ``mlp`` block into a spec (derived sizes computed here, once).

        ``eval_capacity_factor`` absent: same as ``capacity_factor``; given as
        ``null``: dropless in eval even when training drops.
        """
        unknown = [k for k in params if k not in _PARAMS]
        _check(not unknown, "; ".join(f"moe: unknown parameter '{k}'{suggest(k, _PARAMS)}" for k in unknown))
        _check("n_experts" in params and "top_k" in params, "moe: 'n_experts' and 'top_k' are required")
        n, k = int(params["n_experts"]), int(params["top_k"])
        _check(n >= 1, f"n_experts: {n} must be >= 1")
        _check(1 <= k <= n, f"top_k: {k} must be between 1 and n_experts ({n})")
        kind = params.get("expert_kind", "swiglu")
        _check(kind in ACTIVATIONS, f"expert_kind: unknown '{kind}'{suggest(kind, ACTIVATIONS)} "
                                    f"(available: {', '.join(sorted(ACTIVATIONS))})")
        _check(not ("expert_hidden" in params and "expert_hidden_mult" in params),
               "moe: give expert_hidden or expert_hidden_mult, not both")
        hidden = hidden_size({"hidden_size": params.get("expert_hidden"),
                              "hidden_mult": params.get("expert_hidden_mult", DEFAULT_MULT[kind]),
                              "multiple_of": 16}, ctx.d_model, DEFAULT_MULT[kind])
        _check(hidden >= 1, f"expert hidden size must be >= 1 (got {hidden})")
        factor = params.get("capacity_factor")
        eval_factor = params.get("eval_capacity_factor", factor)
        for name, f in (("capacity_factor", factor), ("eval_capacity_factor", eval_factor)):
            _check(f is None or f > 0, f"{name}: {f} must be > 0 (or null for dropless)")
        choices = {"drop_policy": DROP_POLICIES, "lb_loss_type": LB_LOSS_TYPES, "dispatch": DISPATCH_KINDS}
        for name, allowed in choices.items():
            value = params.get(name, allowed[0] if name != "dispatch" else "auto")
            _check(value in allowed, f"{name}: '{value}' is not one of {', '.join(allowed)}")
        dispatch = params.get("dispatch", "auto")
        _check(dispatch != "grouped_mm" or grouped_mm_shapes_ok(ctx.d_model, hidden, torch.float32),
               f"dispatch: grouped_mm needs d_model ({ctx.d_model}) and the expert hidden size "
               f"({hidden}) to be multiples of 4; use dispatch: auto or loop")
        for name in ("lb_loss_coef", "z_loss_coef", "min_capacity", "n_shared_experts"):
            _check(params.get(name, 0) >= 0, f"{name}: {params.get(name)} must be >= 0")
        router_params = dict(params.get("router") or {"kind": "topk"})
        router_kind = router_params.get("kind", "topk")
        router_params.update(kind=router_kind, n_experts=n, top_k=k)
        try:
            router_spec = resolve_router(router_kind).make_spec(router_params, ctx)
        except (ValueError, TypeError) as e:
            raise MoEConfigError(str(e)) from None
        return cls.Spec(
            dim=ctx.d_model, n_experts=n, top_k=k, hidden=hidden, router=router_spec,
            router_kind=router_kind, expert_kind=kind,
            n_shared_experts=int(params.get("n_shared_experts", 0)),
            capacity_factor=factor, eval_capacity_factor=eval_factor,
            min_capacity=int(params.get("min_capacity", 4)),
            drop_policy=params.get("drop_policy", "priority"),
            lb_loss_coef=float(params.get("lb_loss_coef", 0.01)),
            lb_loss_type=params.get("lb_loss_type", "batch"),
            z_loss_coef=float(params.get("z_loss_coef", 0.001)),
            bias=bool(params.get("bias", False)), dispatch=dispatch)

    def __init__(self, spec: "MoE.Spec"):
        super().__init__()
        self.spec = spec
        self.router = resolve_router(spec.router_kind)(spec.router)
        self.experts = Experts(spec.n_experts, spec.dim, spec.hidden, spec.expert_kind,
                               spec.bias, spec.dispatch)
        self.shared = (Experts(spec.n_shared_experts, spec.dim, spec.hidden, spec.expert_kind,
                               spec.bias) if spec.n_shared_experts else None)

    @torch.no_grad()
    def init_weights(self, init: InitSpec) -> None:
        """Experts (3-D, down-projections residual; switch: routed use ``expert=True``),
        shared experts, router (fan_in d_model) and noise weights (zero)."""
        self.experts.initialize(init, routed=True)
        if self.shared is not None:
            self.shared.initialize(init, routed=False)
        self.router.initialize(init)

    def capacity(self, n_tokens: int) -> int | None:
        """Slots per expert for a forward of ``n_tokens`` tokens in the current mode."""
        s = self.spec
        factor = s.capacity_factor if self.training else s.eval_capacity_factor
        return expert_capacity(factor, n_tokens, s.top_k, s.n_experts, s.min_capacity)

    def forward(self, x: torch.Tensor):
        s = self.spec
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        r = self.router(flat)
        plan = plan_dispatch(r.indices, s.n_experts, self.capacity(b * t), s.drop_policy)
        ys = self.experts.forward_sorted(gather_tokens(flat, plan, s.drop_policy), plan.counts)
        y = combine(ys, r.weights, plan, s.drop_policy)
        if self.shared is not None:
            y = y + self.shared.forward_all(flat)
        return y.view(b, t, d), self._aux(r, plan, b)

    def _aux(self, r, plan, n_seqs: int) -> dict[str, torch.Tensor]:
        s = self.spec
        if s.lb_loss_type == "batch" and self.training and _data_parallel():
            lb = _lb_over_ranks(r.probs, plan.routed, s.n_experts)
        else:
            lb = load_balancing_loss(r.probs, r.indices, s.n_experts,
                                     n_seqs if s.lb_loss_type == "sequence" else 1, counts=plan.routed)
        z = router_z_loss(r.logits)
        loss = r.logits.new_zeros((), dtype=torch.float32)
        if s.lb_loss_coef:
            loss = loss + s.lb_loss_coef * lb.float()
        if s.z_loss_coef:
            loss = loss + s.z_loss_coef * z.float()
        routed = plan.routed.float()
        return {"loss": loss, "lb_loss": lb.detach().float(), "z_loss": z.detach().float(),
                "load": routed / routed.sum(),
                "dropped_frac": plan.n_dropped.float() / r.indices.numel(),
                "router_entropy": mean_entropy(r.probs.detach()).float()}

    def inactive_params_per_token(self) -> float:
        """Routed-expert parameters a token does not use: P_routed * (1 - k / n_experts)."""
        return self.experts.num_params() * (1.0 - self.spec.top_k / self.spec.n_experts)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Apply the balancing-bias update of routers that have one (call on every rank)."""
        update = getattr(self.router, "update_bias", None)
        if update is not None:
            update()

    def extra_repr(self) -> str:
        s = self.spec
        cap = "dropless" if s.capacity_factor is None else f"capacity_factor={s.capacity_factor}"
        return f"n_experts={s.n_experts}, top_k={s.top_k}, router={s.router_kind}, {cap}"


def _data_parallel() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _lb_over_ranks(probs: torch.Tensor, routed: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The batch load-balancing loss of the GLOBAL batch under data parallelism.

    ``f`` and ``P`` are averaged over the ranks (one all-reduce of ``[2, E]``),
    so every rank's loss value is the one a single process would compute on
    the whole batch.  The gradient flows through the local ``P`` with weight
    one; the data-parallel gradient average (DDP, FSDP) then turns it into
    the gradient of the global ``P`` -- no differentiable collective needed.
    (Sequence-wise losses are means of per-sequence terms: the gradient
    average already makes them exact.)
    """
    local_f = routed.to(probs.dtype) / routed.sum().clamp_min(1)
    local_p = probs.mean(dim=0)
    both = torch.stack([local_f, local_p.detach()])
    torch.distributed.all_reduce(both)
    both = both / torch.distributed.get_world_size()
    p = local_p + (both[1] - local_p).detach()
    return n_experts * (both[0] * p).sum()


def register(regs) -> None:
    """Add ``mlp: moe`` and every built-in router kind to the registries."""
    regs["mlp"].add("moe", MoE)
    for name, cls in ROUTERS.items():
        regs["router"].add(name, cls)


__all__ = ["MoE", "MoEConfigError", "register", "resolve_router"]
