"""MoE routers: ``topk``, ``switch``, ``sigmoid``, ``sigmoid_topk`` and ``noisy_topk``.

A router maps flattened tokens ``x: [N, D]`` to a :class:`RouterOutput`:
the ``k`` chosen experts per token, their combine weights, the clean logits
(for the z-loss) and per-token probabilities over all experts (for the
load-balancing loss and the entropy statistic).

Router maths always runs in float32 (float64 if the input is float64), with
autocast disabled, so a bf16 run picks the same experts as an fp32 run
(``F.linear(x.float(), w.float())``).

Weight conventions, per router (``k`` = ``top_k``):

``topk``        softmax over all expert logits, top-k; ``renormalize: true``
                divides the k weights by their sum (Mixtral), ``false`` keeps
                the full-softmax probabilities (OLMoE).
``switch``      top-1 (Switch Transformer); weight = full-softmax probability.
                Optional multiplicative jitter ``x * U(1-eps, 1+eps)`` on the
                router input, training only.
``sigmoid``     DeepSeek-V3: affinities ``s = sigmoid(logits)``; experts chosen
                by ``s + bias`` (a per-expert balancing bias, a persistent fp32
                buffer updated by :meth:`SigmoidRouter.update_bias`, never by
                the optimizer); weights = selected ``s`` (without bias)
                normalised to sum 1, times ``routed_scaling_factor``.
``sigmoid_topk`` Llama 4: top-k of the raw logits; weights = sigmoid of the k
                chosen logits, not normalised (so also at k = 1 the router
                learns); no balancing bias.  Llama 4's MoE multiplies each
                expert's input by this weight (``weight_input``).
``noisy_topk``  Shazeer et al. 2017: in training, logits + softplus(x W_noise)
                * N(0, 1); top-k of the noisy logits; weights = softmax over
                the k selected noisy logits.  Never noisy in eval.

At ``k = 1`` no router normalises its single weight (it would be the constant
1 and the router would get no gradient from the task loss): ``topk`` ignores
``renormalize``, ``noisy_topk`` uses the full-softmax probability of its noisy
logits (Switch style) and ``sigmoid`` uses the raw affinity.

``probs`` (the P_i of the load-balancing loss) is the softmax of the clean
logits, or for ``sigmoid`` the affinities normalised per token to sum 1.

Shapes: N tokens (B*T flattened), D d_model, E experts, K top_k; sigmoid's
group-limited routing: G groups (``n_group``) of X = E / G experts; the
load-balancing loss: G groups of tokens (sequences) of A assignments each.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config.declare import PARENT, Kind, context, declared, divisors, param
from .base import Component
from .contracts import FP32, INDEX, RouterKind
from .init import DEFAULT_INIT, init_tensor


class RouterOutput(NamedTuple):
    indices: torch.Tensor  # [N, K] int64: chosen experts (order: descending score)
    weights: torch.Tensor  # [N, K] float32+: combine weights of the chosen experts
    logits: torch.Tensor   # [N, E] float32+: clean router logits (z-loss)
    probs: torch.Tensor    # [N, E] float32+: per-token probabilities, sum 1 (lb loss, entropy)


def router_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the input is float64 (for reference checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def no_autocast(x: torch.Tensor):
    """Disable autocast for the router maths (keeps the router in fp32 under bf16 autocast)."""
    if x.device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


class Router(Component):
    """Base router: a linear map ``[D] -> [E]`` (weight ``[E, D]``, optional bias ``[E]``, fp32).

    Subclasses extend ``Spec`` (whose ``dim``, ``n_experts`` and ``top_k`` come
    from the enclosing MoE layer) and implement ``route``.
    """

    @declared
    class Spec(RouterKind):
        bias: bool = param(False, doc="A learned bias on the router projection (GPT-OSS); it enters the logits, "
                                      "unlike sigmoid's balancing bias.")
        dim: int = context("d_model")
        n_experts: int = context()
        top_k: int = context()

        @property
        def n_params(self) -> int:
            return self.n_experts * (self.dim + (1 if self.bias else 0))

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.n_experts, spec.dim, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(spec.n_experts, dtype=torch.float32)) if spec.bias else None
        self.initialize(DEFAULT_INIT)

    @torch.no_grad()
    def initialize(self, init) -> None:
        """Called by ``MoE.init_weights``: gpt2 normal(0, std) or switch fan_in = d_model; the bias zero."""
        init_tensor(self.weight, init, self.spec.dim)
        if getattr(self, "bias", None) is not None:
            self.bias.zero_()

    def linear(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Router logits ``[N, E]`` in the router dtype, stored expert-major for a 2-D ``x``.

        The result is the transposed view of ``w @ x.T`` (``[E, N]`` in memory):
        with a handful of experts, a softmax along the contiguous token axis
        (:func:`expert_softmax`) is ~15x faster on the CPU than one over a last
        dimension of size E, and the skinny GEMM is quicker this way round too.
        """
        dt = router_dtype(x)
        w, b = (self.weight, self.bias) if weight is None else (weight, None)
        b = None if b is None else b.to(dt)
        if x.dim() != 2:
            return F.linear(x.to(dt), w.to(dt), b)
        logits_EN = w.to(dt) @ x.to(dt).t()
        return (logits_EN if b is None else logits_EN + b[:, None]).t()

    def forward(self, x_ND: torch.Tensor) -> RouterOutput:
        with no_autocast(x_ND):
            return self.route(x_ND)

    def route(self, x_ND: torch.Tensor) -> RouterOutput:  # pragma: no cover - abstract
        raise NotImplementedError


class TopKRouter(Router):
    """Softmax over all expert logits, top-k."""

    @declared
    class Spec(Router.Spec):
        EXAMPLES = ({}, {"renormalize": False, "bias": True})
        renormalize: bool = param(True, doc="Divide the k selected probabilities by their sum (Mixtral) or keep "
                                            "the full-softmax probabilities (OLMoE). Ignored for top_k 1 (the "
                                            "full-softmax probability is used so the router learns).")

        def saved_bytes_per_token(self) -> float:
            """Its fp32 input, the probabilities, the chosen indices (and renormalised: the k weights and sum)."""
            k = self.top_k
            renormalised = (k + 1) * FP32 if self.renormalize and k > 1 else 0
            return (self.dim + self.n_experts) * FP32 + k * INDEX + renormalised

    def route(self, x_ND):
        logits_NE = self.linear(x_ND)
        probs_NE = expert_softmax(logits_NE)
        weights_NK, indices_NK = probs_NE.topk(self.spec.top_k, dim=-1)
        if self.spec.renormalize and self.spec.top_k > 1:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        return RouterOutput(indices_NK, weights_NK, logits_NE, probs_NE)


class SwitchRouter(Router):
    """Switch Transformer top-1 router; the weight is the full-softmax probability. Needs top_k 1."""

    @declared
    class Spec(Router.Spec):
        jitter: float = param(0.0, doc="Multiplicative noise on the router input, uniform in [1-jitter, "
                                       "1+jitter], training only (0: off; Switch used 0.01).",
                              minimum=0, exclusive_maximum=1)

        HOST = {"top_k": 1}
        EXAMPLES = ({}, {"jitter": 0.01})

        def saved_bytes_per_token(self) -> float:
            """Its fp32 input (and with jitter the jittered copy), the probabilities, the chosen index."""
            return (self.dim * (2 if self.jitter else 1) + self.n_experts) * FP32 + INDEX

        def check(self):
            if self.top_k != 1:
                yield (PARENT, "top_k"), (f"router 'switch' sends each token to one expert, so top_k must be 1 "
                                          f"(got {self.top_k}); for top_k > 1 use router kind 'topk'")

    def route(self, x_ND):
        eps = self.spec.jitter
        xr_ND = x_ND.to(router_dtype(x_ND))
        if self.training and eps > 0:
            xr_ND = xr_ND * torch.empty_like(xr_ND).uniform_(1.0 - eps, 1.0 + eps)
        logits_NE = self.linear(xr_ND)
        probs_NE = expert_softmax(logits_NE)
        weights_N1, indices_N1 = probs_NE.topk(1, dim=-1)
        return RouterOutput(indices_N1, weights_N1, logits_NE, probs_NE)


class SigmoidRouter(Router):
    """DeepSeek-V3 router: sigmoid affinities, experts chosen by affinity + a per-expert balancing bias (updated
    once per optimizer step, not by the optimizer); weights = chosen affinities normalised to sum 1 (raw affinity
    for top_k 1) times routed_scaling_factor.

    The bias (``expert_bias``, persistent fp32 buffer) only changes which
    experts are chosen, never the weights.  In training mode each forward adds
    the chosen experts' counts to ``load_counts`` (non-persistent, so gradient
    accumulation micro-steps add up); :meth:`update_bias` applies them once
    per optimizer step.
    """

    @declared
    class Spec(Router.Spec):
        routed_scaling_factor: float = param(1.0, doc="Scale of the routed weights.", exclusive_minimum=0)
        n_group: int = param(1, doc="Group-limited routing (DeepSeek-V3: 8): the experts form n_group equal groups, "
                                    "a group scores the sum of its top-2 affinities + bias, and a token picks its "
                                    "top_k experts only inside its topk_group best groups; 1: no groups.", minimum=1)
        topk_group: int = param(1, doc="Groups a token may route into (DeepSeek-V3: 4); with n_group 1 it has no "
                                       "effect.", minimum=1)

        def check(self):
            if self.n_group == 1:
                return
            if self.n_experts % self.n_group:
                yield ("n_group",), (f"n_experts ({self.n_experts}) must be divisible by n_group ({self.n_group}); "
                                     f"choose n_group among {divisors(self.n_experts)}")
            elif self.topk_group > self.n_group:
                yield ("topk_group",), f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})"
            elif self.top_k > self.topk_group * (self.n_experts // self.n_group):
                yield ("topk_group",), (f"top_k ({self.top_k}) experts do not fit in topk_group ({self.topk_group}) "
                                        f"groups of {self.n_experts // self.n_group}")
        bias_update_speed: float = param(0.001, doc="Bias update speed gamma: bias += gamma * sign(mean load - "
                                                    "load), centred, per optimizer step (0 freezes the bias).",
                                         minimum=0)

        EXAMPLES = ({}, {"n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5},
                    {"n_group": 4, "topk_group": 2})

        def saved_bytes_per_token(self) -> float:
            """Its fp32 input, the affinities, the chosen indices, the gathered weights (with top_k > 1 their sum
            and the normalised and scaled copies); group-limited routing adds each group's top-2 indices, the
            chosen groups and the [N, E] mask of the experts outside them."""
            k, E = self.top_k, self.n_experts
            weights = (k + 3) * FP32 if k > 1 else FP32
            groups = (self.n_group * min(2, E // self.n_group) + self.topk_group) * INDEX + E \
                if self.n_group > 1 else 0
            return (self.dim + E) * FP32 + k * INDEX + weights + groups

    def __init__(self, spec):
        super().__init__(spec)
        self.register_buffer("expert_bias", torch.zeros(spec.n_experts, dtype=torch.float32), persistent=True)
        self.register_buffer("load_counts", torch.zeros(spec.n_experts, dtype=torch.int64), persistent=False)

    @torch.no_grad()
    def initialize(self, init) -> None:
        """Router weight as usual; bias and counts zero (also after ``to_empty``)."""
        super().initialize(init)
        if hasattr(self, "expert_bias"):
            self.expert_bias.zero_()
            self.load_counts.zero_()

    def route(self, x_ND):
        logits_NE = self.linear(x_ND)
        scores_NE = logits_NE.sigmoid()
        choice_NE = scores_NE + self.expert_bias.to(scores_NE.dtype)
        if self.spec.n_group > 1:
            choice_NE = self.within_best_groups(choice_NE)
        _, indices_NK = choice_NE.topk(self.spec.top_k, dim=-1)
        weights_NK = scores_NE.gather(-1, indices_NK)
        if self.spec.top_k > 1:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights_NK.dtype).tiny)
        weights_NK = weights_NK * self.spec.routed_scaling_factor
        if self.training:
            with torch.no_grad():
                chosen = indices_NK.reshape(-1)                              # [N*K]
                self.load_counts.scatter_add_(0, chosen, torch.ones_like(chosen))
        probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
        return RouterOutput(indices_NK, weights_NK, logits_NE, probs_NE)

    def within_best_groups(self, choice_NE: torch.Tensor) -> torch.Tensor:
        """``choice`` with the experts outside each token's ``topk_group`` best groups set to -inf."""
        s = self.spec
        grouped_NGX = rearrange(choice_NE, "n (g x) -> n g x", g=s.n_group)
        group_NG = grouped_NGX.topk(min(2, grouped_NGX.shape[-1]), dim=-1).values.sum(dim=-1)
        best_NG = torch.zeros_like(group_NG, dtype=torch.bool).scatter_(
            1, group_NG.topk(s.topk_group, dim=-1).indices, True)
        keep_NE = rearrange(best_NG[..., None].expand_as(grouped_NGX), "n g x -> n (g x)")
        return choice_NE.masked_fill(~keep_NE, float("-inf"))

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias += γ·sign(mean_load - load), centred; counts all-reduced first; counts reset.

        Every rank must call this (it all-reduces when torch.distributed is
        initialised), so the bias stays identical on all ranks.  A step with
        no routed tokens since the last call leaves the bias unchanged.
        """
        counts_E = self.load_counts.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts_E)
        self.load_counts.zero_()
        total = int(counts_E.sum())
        if total == 0 or self.spec.bias_update_speed == 0:
            return
        load_E = counts_E.double() / total
        delta_E = self.spec.bias_update_speed * torch.sign(1.0 / self.spec.n_experts - load_E)
        delta_E = delta_E - delta_E.mean()
        self.expert_bias.add_(delta_E.to(self.expert_bias.dtype))


class SigmoidTopKRouter(Router):
    """Llama 4 router: the k largest logits choose the experts; their weights are the sigmoids of those logits,
    not normalised."""

    @declared
    class Spec(Router.Spec):
        EXAMPLES = ({},)

        def saved_bytes_per_token(self) -> float:
            """Its fp32 input, the probabilities (softmax of the logits), the chosen indices and the k sigmoids."""
            return (self.dim + self.n_experts) * FP32 + self.top_k * (INDEX + FP32)

    def route(self, x_ND):
        logits_NE = self.linear(x_ND)
        top_NK, indices_NK = logits_NE.topk(self.spec.top_k, dim=-1)
        return RouterOutput(indices_NK, top_NK.sigmoid(), logits_NE, expert_softmax(logits_NE))


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017): logits + softplus(x W_noise) * N(0,1) in training only; weights
    = softmax over the k selected noisy logits (full-softmax probability for top_k 1).

    ``noise_weight`` starts at zero as in the paper, so the initial noise std
    is softplus(0) = ln 2 for every expert (zero noise weights do NOT mean
    zero noise); in eval the router equals ``topk`` (renormalised for k >= 2,
    full-softmax weight for k = 1).
    """

    @declared
    class Spec(Router.Spec):
        @property
        def n_params(self) -> int:
            return super().n_params + self.n_experts * self.dim          # + the noise projection

        def saved_bytes_per_token(self) -> float:
            """Its fp32 input, the noise scale's input and the noise, the probabilities, the chosen indices and
            (top_k > 1) weights; with top_k 1 also the full softmax the weight is taken from."""
            k, E = self.top_k, self.n_experts
            if k == 1:
                return (self.dim + 4 * E) * FP32 + INDEX
            return (self.dim + 3 * E) * FP32 + k * (INDEX + FP32)

    def __init__(self, spec):
        super().__init__(spec)
        self.noise_weight = nn.Parameter(torch.zeros(spec.n_experts, spec.dim, dtype=torch.float32))

    @torch.no_grad()
    def initialize(self, init) -> None:
        super().initialize(init)
        if hasattr(self, "noise_weight"):
            self.noise_weight.zero_()

    def sample_noise(self, like: torch.Tensor) -> torch.Tensor:
        """Standard-normal noise, one draw per (token, expert), drawn in token-major order."""
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)

    def route(self, x_ND):
        logits_NE = self.linear(x_ND)
        noisy_NE = logits_NE
        if self.training:
            noise_std_NE = F.softplus(self.linear(x_ND, self.noise_weight))
            noisy_NE = logits_NE + noise_std_NE * self.sample_noise(logits_NE)
        k = self.spec.top_k
        top_NK, indices_NK = noisy_NE.topk(k, dim=-1)
        if k > 1:
            weights_NK = top_NK.softmax(dim=-1)
        else:
            weights_NK = expert_softmax(noisy_NE).gather(-1, indices_NK)
        return RouterOutput(indices_NK, weights_NK, logits_NE, expert_softmax(logits_NE))




def expert_softmax(logits_NE: torch.Tensor) -> torch.Tensor:
    """Softmax over the experts (last dim) of ``[N, E]`` logits, fast for expert-major storage."""
    if logits_NE.dim() == 2 and logits_NE.stride(0) == 1 and logits_NE.shape[0] > 1:
        return logits_NE.t().softmax(dim=0).t()
    return logits_NE.softmax(dim=-1)


def load_balancing_loss(probs_NE: torch.Tensor, indices_NK: torch.Tensor, n_experts: int,
                        n_groups: int = 1, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_i f_i * P_i``, equal to 1 at perfect balance.

    ``f_i``: fraction of routed assignments (all k choices, before capacity
    dropping) that went to expert i; ``P_i``: mean of ``probs[:, i]``.  With
    ``n_groups = B`` the tokens are split into B sequences (rows in order),
    f and P are computed per sequence and the losses averaged (the
    sequence-wise loss of DeepSeek-V3).  ``f`` carries no gradient.  ``counts``
    (``[E]``, only with ``n_groups = 1``): assignments per expert, if the
    caller has them already.
    """
    n, k = indices_NK.shape
    if n % n_groups:
        raise ValueError(f"{n} tokens cannot be split into {n_groups} sequences")
    per_group = (n // n_groups) * k                        # assignments of one sequence (or of the batch)
    if counts is None or n_groups != 1:
        indices_GA = indices_NK.reshape(n_groups, per_group)
        counts = torch.zeros(n_groups, n_experts, dtype=probs_NE.dtype, device=probs_NE.device)
        counts.scatter_add_(1, indices_GA, torch.ones_like(indices_GA, dtype=probs_NE.dtype))
    f_GE = counts.to(probs_NE.dtype).view(n_groups, n_experts) / per_group
    p_GE = probs_NE.reshape(n_groups, n // n_groups, n_experts).mean(dim=1)
    return n_experts * (f_GE * p_GE).sum(dim=-1).mean()


def router_z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (in the router's fp32+)."""
    return torch.logsumexp(logits_NE.to(router_dtype(logits_NE)), dim=-1).square().mean()


def mean_entropy(probs_NE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of each token's router distribution."""
    return torch.special.entr(probs_NE).sum(dim=-1).mean()
