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
   back to token order (gathers only, see ``moe_dispatch.py``); with
   ``weight_input`` (Llama 4) each expert's input rows are weighted instead
   and the outputs summed with weight 1;
4. ``n_shared_experts`` always-on experts (DeepSeek style, same hidden size)
   run on every token and are added.

Experts (routed and shared) are of any registered ``mlp`` kind but an MoE
(``expert_kind``, plug-ins included): a built-in dense kind's are 3-D tensors
(``moe_experts.Experts``), any other kind's one module each built from its
spec (``moe_experts.ExpertModules``), with ``expert_hidden`` /
``expert_hidden_mult`` handed down as its ``hidden_size`` and ``bias`` as its
``bias``.  The plan asks the expert kind's own contract (``MoE.Spec.expert``).

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

Shapes: B sequences of T tokens, N = B*T tokens, D d_model, E routed experts,
K top_k, M rows of the sorted buffer (kept assignments, at most N*K).
"""
from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange

from ..config.declare import BuildError, Kind, choice, context, declared, kind_name, param, params, required, \
    round_up, yaml_key
from .base import Component
from .contracts import FP32, INDEX, MLPKind
from .mlp import batched_activation
from .moe_dispatch import DropPolicy, combine, expert_capacity, gather_tokens, plan_dispatch, weigh_rows
from .moe_experts import CPU_LOW_PRECISION_ROWS, ExpertKernel, ExpertModules, Experts, grouped_mm_shapes_ok
from .routers import load_balancing_loss, mean_entropy, router_z_loss


def _expert_capable(impl) -> bool:
    """Whether the mlp kind ``impl`` may be an MoE's ``expert_kind`` (every kind but an MoE)."""
    return impl.Spec.expert_capable

class MoE(Component):
    """Mixture-of-Experts feed-forward layer: a router picks top_k of n_experts routed experts per token;
    optional always-on shared experts."""

    @declared
    class Spec(MLPKind):
        n_experts: int = param(doc="Number of routed experts E.", minimum=1)
        top_k: int = param(doc="Experts per token k (at most n_experts; the router 'switch' needs 1).", minimum=1)
        expert_kind: str = kind_name(
            "mlp", default="swiglu", allow=_expert_capable,
            doc="Kind of every expert (routed and shared): any registered mlp kind but an MoE, plug-ins included, "
                "at its default parameters. A built-in dense kind computes as the dense MLP of the same name, its "
                "experts stored as 3-D tensors; any other kind runs as one module per expert.")
        expert_hidden: int | None = param(None, doc="Hidden size of each expert, handed to expert_kind as its "
                                                    "hidden_size (excludes expert_hidden_mult).", minimum=1)
        expert_hidden_mult: float | None = param(
            None, doc="Hidden size as a multiple of d_model, rounded up to a multiple of 16 (null: the default of "
                      "expert_kind, 8/3 x d_model for swiglu, 4 x d_model for gelu).", exclusive_minimum=0)
        n_shared_experts: int = param(0, doc="Always-on experts of the same hidden size applied to every token "
                                             "and added to the routed output (DeepSeek style).", minimum=0)
        router: Kind = choice("router", default="topk", doc="The router.")
        capacity_factor: float | None = param(
            None, doc="Training capacity per expert = max(min_capacity, ceil(factor * tokens * top_k / "
                      "n_experts)), tokens = B*T of the forward; NOT rounded to even. null: dropless. With a "
                      "capacity, whether a token is dropped depends on other tokens of the batch, later ones "
                      "included.", exclusive_minimum=0)
        eval_capacity_factor: float | Literal["train"] | None = param(
            "train", doc="Capacity factor in eval mode; 'train': the same as capacity_factor; null: dropless in "
                         "eval (causal inference).", exclusive_minimum=0)
        min_capacity: int = param(4, doc="Lower bound of the capacity per expert.", minimum=0)
        drop_policy: DropPolicy = param(
            "priority", doc="Who is dropped when an expert overflows. priority: every token's first choice is "
                            "served before any second choice, and so on; within a choice rank earlier tokens of "
                            "the flattened B*T batch first. position: earlier tokens first, each token's choices "
                            "in rank order.")
        lb_loss_coef: float = param(0.01, doc="Weight of the load-balancing loss in aux['loss'] (0 still logs it).",
                                    minimum=0)
        lb_loss_type: Literal["batch", "sequence"] = param(
            "batch", doc="Load-balancing loss n_experts * sum_i f_i * P_i (1 at perfect balance) over the whole "
                         "batch or per sequence then averaged (DeepSeek-V3).")
        z_loss_coef: float = param(0.001, doc="Weight of the router z-loss, mean over tokens of logsumexp(logits)^2 "
                                              "in fp32.", minimum=0)
        bias: bool = param(False, doc="Biases in the expert projections.")
        weight_input: bool = param(
            False, doc="Multiply each routed expert's input by the token's routing weight and sum the outputs with "
                       "weight 1 (Llama 4), instead of weighing the outputs (which, for a nonlinear expert, is "
                       "another function).")
        dispatch: ExpertKernel = param(
            "auto", doc="Expert compute path, same weights and results either way: grouped_mm (torch._grouped_mm; "
                        "needs d_model and the expert hidden size to be multiples of 4), loop (one matmul per "
                        "expert on its contiguous slice; on the CPU in bf16/fp16 each slice padded to a multiple "
                        "of 32 rows so oneDNN reuses its kernels), auto (grouped_mm where torch can run it, else "
                        "loop; the loop on the CPU in bf16/fp16, where torch's grouped_mm builds a new kernel per "
                        "call). "
                        "grouped_mm falls back to the loop where torch cannot run it: fp32 under torch.compile, "
                        "bf16 with sizes not multiples of 8, CUDA in anything but bf16.")
        dim: int = context("d_model")

        EXAMPLES = ({"n_experts": 4, "top_k": 2, "expert_hidden": 32},
                    {"n_experts": 4, "top_k": 1, "expert_hidden": 32, "n_shared_experts": 1, "expert_kind": "gelu",
                     "bias": True, "lb_loss_type": "sequence"},
                    {"n_experts": 4, "top_k": 2, "expert_hidden": 32, "capacity_factor": 1.25,
                     "eval_capacity_factor": None},
                    {"n_experts": 4, "top_k": 2, "expert_hidden": 32, "n_shared_experts": 1, "weight_input": True,
                     "router": {"kind": "sigmoid_topk"}})

        expert_capable = False          # an MoE is no expert kind (contracts.MLPKind)

        @property
        def handed_hidden(self) -> int | None:
            """The hidden size handed to the expert kind as its ``hidden_size`` (None: the kind's own default)."""
            if self.expert_hidden is not None:
                return self.expert_hidden
            if self.expert_hidden_mult is not None:
                return round_up(self.expert_hidden_mult * self.dim, 16)
            return None

        @property
        def expert(self) -> MLPKind:
            """The spec of one expert, routed or shared: ``expert_kind`` with the hidden size and bias handed down
            as its ``hidden_size`` and ``bias`` where it declares them (:meth:`check` refuses a size or a bias it
            cannot take; a BuildError where it has other required parameters)."""
            given = {"hidden_size": self.handed_hidden, "bias": self.bias or None}
            declared_keys = {yaml_key(f) for f, _ in params(self.expert_kind.impl.Spec)}
            return self.expert_kind.spec({k: v for k, v in given.items() if v is not None and k in declared_keys})

        @property
        def batched(self) -> bool:
            """The experts are 3-D tensors (a built-in dense kind), not one module each."""
            return batched_activation(self.expert) is not None

        @property
        def hidden(self) -> int | None:
            """The expert hidden size H: the one handed down, else a built-in dense kind's own default
            (hidden_mult x d_model, rounded up to 16); None for another kind that sizes itself."""
            if self.handed_hidden is None and self.batched:
                return self.expert.hidden
            return self.handed_hidden

        @property
        def routed_params(self) -> int:
            return self.n_experts * self.expert.n_params

        @property
        def n_params(self) -> int:
            shared = self.n_shared_experts * self.expert.n_params
            return self.router.n_params + self.routed_params + shared

        @property
        def n_active(self) -> float:
            """Parameters one token uses: routed experts count top_k of n_experts."""
            return self.n_params - self.routed_params * (1.0 - self.top_k / self.n_experts)

        @property
        def router_params(self) -> float:
            return self.router.n_params

        @property
        def expert_params(self) -> float:
            return self.n_params - self.router.n_params

        def saved_bytes_per_token(self, c: int, device: str) -> float:
            """The router's (fp32), then for each of the k assignments what its expert saves (the expert kind's
            own contract: its gathered input and activations), its output and its weight (with weight_input: its
            unscaled fp32 input row and fp32 weight, for the weight's gradient), and four index entries; and the
            shared experts'."""
            D, expert = self.dim, self.expert
            weighed = (D + 1) * FP32 if self.weight_input else (D + 1) * c
            routed = self.router.saved_bytes_per_token() + self.top_k * (
                expert.saved_bytes_per_token(c, device) + weighed + FP32 + 4 * INDEX)
            if not self.n_shared_experts:
                return routed
            if self.batched:
                # one matmul of all of them: its input once, a copy only under autocast; a bias (fp32) added to
                # the up-projection promotes their activations to fp32
                a = FP32 if self.bias else c
                shared = self.n_shared_experts * (expert.saved_bytes_per_token(a, device) - D * a)
                return routed + shared + (D * c if c < FP32 else 0)
            # one module each, each keeping its input: in fp32 the MoE's own, which the router keeps already
            return routed + self.n_shared_experts * (expert.saved_bytes_per_token(c, device) - (D * c if c == FP32
                                                                                                else 0))

        def saved_bytes_per_batch(self, c: int, device: str) -> float:
            """3-D experts: the zero rows of a CPU bf16/fp16 expert loop, each expert's rows padded to a multiple of
            ``CPU_LOW_PRECISION_ROWS``, (multiple - 1) / 2 rows on average, each keeping what the expert saves per
            token.  One module per expert: what each module saves per batch."""
            if not self.batched:
                return (self.n_experts + self.n_shared_experts) * self.expert.saved_bytes_per_batch(c, device)
            if device != "cpu" or c == FP32 or self.dispatch == "grouped_mm":
                return 0.0
            return self.n_experts * (CPU_LOW_PRECISION_ROWS - 1) / 2 * self.expert.saved_bytes_per_token(c, device)

        @property
        def eval_factor(self) -> float | None:
            return self.capacity_factor if self.eval_capacity_factor == "train" else self.eval_capacity_factor

        def check(self):
            if self.top_k > self.n_experts:
                yield ("top_k",), (f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts}); each token picks "
                                   "top_k distinct experts")
            if self.expert_hidden is not None and self.expert_hidden_mult is not None:
                yield ("expert_hidden_mult",), "give 'expert_hidden' or 'expert_hidden_mult', not both"
                return
            problem = self.expert_problem()
            if problem:
                yield problem
            elif self.dispatch == "grouped_mm" and not self.batched:
                yield ("dispatch",), (f"grouped_mm runs experts stored as 3-D tensors (the built-in dense kinds); "
                                      f"expert_kind '{self.expert_kind}' runs one module per expert: use dispatch: "
                                      "auto or loop")
            elif self.dispatch == "grouped_mm" and not grouped_mm_shapes_ok(self.dim, self.hidden, torch.float32):
                yield ("dispatch",), (f"grouped_mm needs d_model ({self.dim}) and the expert hidden size "
                                      f"({self.hidden}) to be multiples of 4; use dispatch: auto or loop")

        def expert_problem(self) -> tuple[tuple, str] | None:
            """``(path, message)`` where ``expert_kind`` cannot be built as this MoE's experts, else None."""
            kind = self.expert_kind
            keys = {yaml_key(f): f for f, _ in params(kind.impl.Spec)}
            if self.handed_hidden is not None and "hidden_size" not in keys:
                key = "expert_hidden" if self.expert_hidden is not None else "expert_hidden_mult"
                return (key,), (f"expert_kind '{kind}' declares no hidden_size, so {key} cannot size its experts; "
                                f"remove {key} (each expert then has the width of {kind}'s defaults)")
            if self.bias and "bias" not in keys:
                return ("bias",), (f"expert_kind '{kind}' declares no bias, so its experts cannot take bias: true; "
                                   "remove bias")
            if "hidden_size" in keys and required(keys["hidden_size"]) and self.handed_hidden is None:
                return ("expert_kind",), (f"expert_kind '{kind}' has no default hidden_size; give expert_hidden or "
                                          "expert_hidden_mult")
            needed = [k for k, f in keys.items() if required(f) and k != "hidden_size"]
            if needed:
                return ("expert_kind",), (f"expert_kind '{kind}' requires {', '.join(map(repr, needed))}, which an "
                                          "MoE cannot give its experts (it hands them only hidden_size and bias); "
                                          "choose a kind whose other parameters have defaults")
            try:
                problems = list(self.expert.check()) if hasattr(self.expert, "check") else []
            except BuildError as e:
                return ("expert_kind",), f"expert_kind '{kind}' cannot be built as an expert: {e}"
            if problems:
                return ("expert_kind",), f"expert_kind '{kind}' as an expert of this MoE: {problems[0][1]}"
            return None

    def __init__(self, spec: "MoE.Spec"):
        super().__init__()
        self.spec = spec
        self.router = spec.router.build()
        self.experts = self.make_experts(spec.n_experts, spec.dispatch)
        self.shared = self.make_experts(spec.n_shared_experts) if spec.n_shared_experts else None

    def make_experts(self, n: int, dispatch: str = "auto") -> Experts | ExpertModules:
        """``n`` experts of the spec's expert kind: 3-D tensors for a built-in dense kind, else one module each."""
        s = self.spec
        expert = s.expert
        act = batched_activation(expert)
        if act is None:
            return ExpertModules(n, expert)
        return Experts(n, s.dim, s.hidden, act, s.bias, dispatch)

    @torch.no_grad()
    def init_weights(self, init) -> None:
        """Experts (3-D: down-projections residual; one module each: as the scheme does a model's; switch: routed
        use ``expert=True``), shared experts, router (fan_in d_model) and noise weights (zero)."""
        self.experts.initialize(init, routed=True)
        if self.shared is not None:
            self.shared.initialize(init, routed=False)
        self.router.initialize(init)

    def capacity(self, n_tokens: int) -> int | None:
        """Slots per expert for a forward of ``n_tokens`` tokens in the current mode."""
        s = self.spec
        factor = s.capacity_factor if self.training else s.eval_factor
        return expert_capacity(factor, n_tokens, s.top_k, s.n_experts, s.min_capacity)

    def forward(self, x_BTD: torch.Tensor):
        s = self.spec
        x_ND = rearrange(x_BTD, "b t d -> (b t) d")                          # N = B*T tokens
        r = self.router(x_ND)                       # indices, weights: [N, K]; logits, probs: [N, E]
        plan = plan_dispatch(r.indices, s.n_experts, self.capacity(x_ND.shape[0]), s.drop_policy)
        xs_MD = gather_tokens(x_ND, plan, s.drop_policy)
        if s.weight_input:
            xs_MD = weigh_rows(xs_MD, r.weights, plan, s.drop_policy)
        ys_MD = self.experts.forward_sorted(xs_MD, plan.counts)
        y_ND = combine(ys_MD, r.weights, plan, s.drop_policy, weigh=not s.weight_input)
        if self.shared is not None:
            y_ND = y_ND + self.shared.forward_all(x_ND)
        return rearrange(y_ND, "(b t) d -> b t d", b=x_BTD.shape[0]), self._aux(r, plan, x_BTD.shape[0])

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
        routed_E = plan.routed.float()
        return {"loss": loss, "lb_loss": lb.detach().float(), "z_loss": z.detach().float(),
                "load": routed_E / routed_E.sum(),
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
        return f"n_experts={s.n_experts}, top_k={s.top_k}, router={s.router.kind}, {cap}"


def _data_parallel() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _lb_over_ranks(probs_NE: torch.Tensor, routed_E: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The batch load-balancing loss of the GLOBAL batch under data parallelism.

    ``f`` and ``P`` are averaged over the ranks (one all-reduce of ``[2, E]``),
    so every rank's loss value is the one a single process would compute on
    the whole batch.  The gradient flows through the local ``P`` with weight
    one; the data-parallel gradient average (DDP, FSDP) then turns it into
    the gradient of the global ``P`` -- no differentiable collective needed.
    (Sequence-wise losses are means of per-sequence terms: the gradient
    average already makes them exact.)
    """
    f_E = routed_E.to(probs_NE.dtype) / routed_E.sum().clamp_min(1)
    local_p_E = probs_NE.mean(dim=0)
    both_2E = torch.stack([f_E, local_p_E.detach()])
    torch.distributed.all_reduce(both_2E)
    both_2E = both_2E / torch.distributed.get_world_size()
    p_E = local_p_E + (both_2E[1] - local_p_E).detach()
    return n_experts * (both_2E[0] * p_E).sum()


__all__ = ["MoE"]
