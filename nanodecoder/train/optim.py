"""Optimizers, looked up by ``train.optimizer.kind`` in the ``optimizer`` registry.

A registered optimizer is a class with a declared ``Spec`` (its YAML
parameters and ``states_per_param``, the tensors of parameter size it keeps,
for memory plans) and ``build(spec, model, lr, device)`` returning an
optimizer (``param_groups``, ``step``, ``zero_grad``, ``state_dict``,
``load_state_dict``).

Parameter groups come from one mechanism, used by every kind: each parameter
has *roles* (:func:`param_roles`: embedding, head, norm, bias, expert, router,
matrix, not_matrix) and a name; the blueprint's ``rules`` (read in order,
then the kind's standard rules) match roles and/or name patterns and set a
parameter's ``optimizer``, ``lr`` and ``weight_decay``; for each of the three
the first matching rule that sets it gives it (:func:`place`).

Weight decay (documented decision): parameters with two or more dimensions
(linear weights, 3-D expert tensors, router weights) are decayed; biases, norm
gains and other vectors are not.  Embedding tables (and an output head tied to
them) are decayed by default, as in nanoGPT, so its recipes reproduce; set
``decay_embeddings: false`` for the litgpt/OLMo convention.  A rule's
``weight_decay`` overrides this for the parameters it matches.

Learning rates: ``train.lr`` is the peak learning rate of the main optimizer
(AdamW, or Muon for ``kind: muon``); another peak (a rule's ``lr``, the AdamW
part's ``lr``) is stored as the group's ``lr_scale`` (that peak / ``train.lr``),
so the schedule scales every group in proportion (:func:`.schedule.set_lr`).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn

from ..components.base import module_role
from ..config.declare import Kind, context, declared, param
from .newton_schulz import BatchedMuon, evaluate_closure


class OptimizerSetupError(Exception):
    """``train.optimizer`` cannot be set up for this model or runtime (the message says what to change)."""


# ---------------------------------------------------------------- roles and rules
Role = Literal["embedding", "head", "norm", "bias", "expert", "router", "matrix", "not_matrix"]

ROLES_DOC = ("embedding (nn.Embedding tables: token embedding, learned positions, and a head tied to the token "
             "embedding), head (the untied output head, model.tie_embeddings: false), norm (norm gains and biases), "
             "bias (any parameter named *bias), expert (MoE expert weights and biases, routed and shared), router "
             "(MoE router weights), matrix (any 2-D parameter), not_matrix (any parameter that is not 2-D: vectors, "
             "scalars, 3-D expert tensors)")

def embedding_param_ids(model: nn.Module) -> set[int]:
    """ids of the weights of every ``nn.Embedding`` (a tied head shares one of them)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def param_roles(model: nn.Module) -> dict[int, frozenset[str]]:
    """``{id(parameter): roles}`` of every parameter of ``model`` (see ``ROLES_DOC``)."""
    emb = embedding_param_ids(model)
    head = getattr(model, "head", None)
    head_ids = {id(p) for p in head.parameters()} - emb if isinstance(head, nn.Module) else set()
    roles: dict[int, set[str]] = defaultdict(set)
    for module in model.modules():
        part = module_role(module)      # from the kinds: any norm kind is a norm, plug-ins included
        for name, p in module.named_parameters(recurse=False):
            found = roles[id(p)]
            found.add("matrix" if p.ndim == 2 else "not_matrix")
            if part:
                found.add(part)
            if name.endswith("bias"):
                found.add("bias")
            if id(p) in emb:
                found.add("embedding")
            if id(p) in head_ids:
                found.add("head")
    return {k: frozenset(v) for k, v in roles.items()}


@declared
class ParamRule:
    """Which parameters a rule matches (roles and/or name patterns) and what it sets for them."""
    SCHEMA_NAME = "optimizer_rule"

    roles: tuple[Role, ...] = param((), doc=f"Roles a parameter must have one of: {ROLES_DOC}. Empty: any role.")
    names: tuple[str, ...] = param((), doc="Shell-style patterns a parameter's name must match one of (fnmatch, "
                                           "'*' also crosses dots), e.g. 'blocks.*.mlp.router.weight' or "
                                           "'blocks.0.*'; python tools/param_count.py lists the model's parts. "
                                           "With roles, a parameter must match both.")
    optimizer: Literal["muon", "adamw"] | None = param(
        None, doc="Which optimizer updates the matched parameters ('muon' only with kind: muon, and only for 2-D "
                  "parameters); null: the next matching rule's choice.")
    lr: float | None = param(None, doc="Peak learning rate of the matched parameters (the schedule scales it in "
                                       "proportion to train.lr), e.g. a separate rate for the untied head; null: "
                                       "that of their optimizer.", exclusive_minimum=0)
    weight_decay: float | None = param(None, doc="Decoupled weight decay of the matched parameters; null: that of "
                                                 "their optimizer (AdamW: none for vectors).", minimum=0)

    def check(self) -> Iterator[tuple[tuple, str]]:
        if not self.roles and not self.names:
            yield (), "a rule needs roles or names (or both) to say which parameters it matches"
        if self.optimizer is None and self.lr is None and self.weight_decay is None:
            yield (), "the rule sets nothing: give it optimizer, lr or weight_decay"

    def matches(self, name: str, roles: frozenset[str]) -> bool:
        return (not self.roles or not roles.isdisjoint(self.roles)) and \
            (not self.names or any(fnmatchcase(name, pattern) for pattern in self.names))

    def describe(self) -> str:
        parts = ([f"roles {list(self.roles)}"] if self.roles else []) + \
                ([f"names {list(self.names)}"] if self.names else [])
        return " and ".join(parts)


@dataclass(frozen=True)
class Placement:
    """Where one parameter goes: optimizer, lr and weight decay (None: its optimizer's), and which rule chose
    the optimizer (an index into ``rules``, or None for the standard rules)."""
    name: str
    param: nn.Parameter
    roles: frozenset[str]
    optimizer: str | None
    lr: float | None
    weight_decay: float | None
    chosen_by: int | None = None


def place(model: nn.Module, rules: Sequence[ParamRule], standard: Sequence[ParamRule] = (),
          where: str = "train.optimizer") -> list[Placement]:
    """Each trainable parameter once (``named_parameters`` order, a tied weight once) with the values the
    first matching rule that sets them gives; a rule of ``rules`` that matches nothing is an error."""
    roles = param_roles(model)
    used = [False] * len(rules)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        got: dict[str, Any] = {"optimizer": None, "lr": None, "weight_decay": None, "chosen_by": None}
        for i, rule in enumerate((*rules, *standard)):
            if not rule.matches(name, roles[id(p)]):
                continue
            if i < len(rules):
                used[i] = True
            for key in ("optimizer", "lr", "weight_decay"):
                if got[key] is None and getattr(rule, key) is not None:
                    got[key] = getattr(rule, key)
                    if key == "optimizer" and i < len(rules):
                        got["chosen_by"] = i
        out.append(Placement(name, p, roles[id(p)], **got))
    for i, rule in enumerate(rules):
        if not used[i]:
            raise OptimizerSetupError(f"{where}.rules[{i}] ({rule.describe()}) matches no parameter of this model; "
                                      "fix its roles or names (python tools/param_count.py lists the model's "
                                      "parts) or remove it")
    return out


@declared
class ParamGroups:
    """The ``rules`` of an optimizer kind (a mixin of its Spec)."""
    rules: tuple[ParamRule, ...] = param(
        (), doc="Parameter-group rules, read in order before the kind's standard ones: each matches parameters by "
                "role and/or name and sets their optimizer, lr and/or weight_decay; for each of the three the first "
                "matching rule that sets it gives it. E.g. [{roles: [head], lr: 0.004}] gives an untied head its "
                "own learning rate. A rule that matches no parameter is an error.")
    tie_embeddings: bool | None = context("model.tie_embeddings")

    #: whether ``optimizer: muon`` is allowed in a rule
    MUON = False

    def check(self) -> Iterator[tuple[tuple, str]]:
        for i, rule in enumerate(self.rules):
            if rule.optimizer == "muon" and not self.MUON:
                yield ("rules", i, "optimizer"), f"'muon' needs train.optimizer.kind: muon (this is {self.kind})"
            if "head" in rule.roles and self.tie_embeddings:
                yield (("rules", i, "roles"), "the head is tied to the token embedding (model.tie_embeddings: "
                                              "true), so it has no parameters of its own; set model.tie_embeddings: "
                                              "false to give it its own learning rate, or match role embedding")
            if rule.optimizer == "muon" and rule.roles and set(rule.roles) <= {"not_matrix", "norm"} \
                    and not rule.names:
                yield (("rules", i, "optimizer"), f"torch.optim.Muon updates only 2-D matrices, and roles "
                                                  f"{list(rule.roles)} are never 2-D; use optimizer: adamw")


# ---------------------------------------------------------------- AdamW
@declared
class AdamWParams:
    """AdamW's parameters (shared by ``kind: adamw`` and the AdamW part of ``kind: muon``)."""
    betas: tuple[float, float] = param((0.9, 0.95), doc="Coefficients of the running averages of the gradient "
                                                        "and its square.", minimum=0, exclusive_maximum=1)
    eps: float = param(1e-8, doc="Added to the denominator for numerical stability.", exclusive_minimum=0)
    weight_decay: float = param(0.1, doc="Decoupled weight decay of the decayed parameter group.", minimum=0)
    decay_embeddings: bool = param(True, doc="Whether embedding tables (and a head tied to them) are "
                                             "weight-decayed, as in nanoGPT; false follows litgpt/OLMo.")
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = param(
        "auto", doc="Kernel choice: 'auto' is the fused kernel where torch has one (CUDA, CPU) and foreach "
                    "elsewhere.")


def _group(params: list, lr: float, base_lr: float, weight_decay: float, **extra) -> dict:
    return {"params": params, "lr": lr, "lr_scale": lr / base_lr, "weight_decay": weight_decay, **extra}


def adamw_groups(placed: Sequence[Placement], spec: AdamWParams, lr: float, base_lr: float, **extra) -> list[dict]:
    """AdamW's groups over ``placed``: decayed (ndim >= 2) and not decayed, in a fixed order, then one group per
    other (lr, weight decay) that rules set; ``lr``: the peak of the first two."""
    decay, no_decay = [], []
    others: dict[tuple[float, float], list] = {}
    for pl in placed:
        decayed = pl.param.ndim >= 2 and (spec.decay_embeddings or "embedding" not in pl.roles)
        if pl.lr is None and pl.weight_decay is None:
            (decay if decayed else no_decay).append(pl.param)
            continue
        wd = pl.weight_decay if pl.weight_decay is not None else spec.weight_decay if decayed else 0.0
        others.setdefault((pl.lr if pl.lr is not None else lr, wd), []).append(pl.param)
    return [_group(decay, lr, base_lr, spec.weight_decay, **extra), _group(no_decay, lr, base_lr, 0.0, **extra),
            *(_group(ps, group_lr, base_lr, wd, **extra) for (group_lr, wd), ps in others.items())]


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """Two AdamW groups: decayed (ndim >= 2) and not decayed; each parameter once, in a fixed order."""
    spec = AdamWParams(weight_decay=weight_decay, decay_embeddings=decay_embeddings)
    return [{"params": g["params"], "weight_decay": g["weight_decay"]}
            for g in adamw_groups(place(model, ()), spec, 1.0, 1.0)]


def param_names(model: nn.Module, optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own index order (for checkpoints)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def fused_devices() -> tuple[str, ...]:
    """Device types with a fused AdamW kernel in this torch (``cuda`` only if it cannot tell)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - private helper moved
        return ("cuda",)


class AdamW:
    """AdamW (decoupled weight decay). Weight decay applies to parameters with two or more dimensions (matrices,
    expert tensors and, unless decay_embeddings is false, embeddings); biases and norm weights are never decayed.

    ``auto`` picks the fused (single-kernel) AdamW on every device type torch
    ships one for (CUDA and the CPU among them) and ``foreach`` elsewhere.  On
    the 2-core CPU the fused step is about 7x faster than ``foreach``
    (2.6 vs 18.3 ms for the 5.7M parameters of moe_gpt.yaml).
    """

    @declared
    class Spec(ParamGroups, AdamWParams, Kind):
        #: state the optimizer keeps per parameter, in the parameter's dtype (memory plans): exp_avg, exp_avg_sq
        states_per_param = 2

    @staticmethod
    def kernel_flags(implementation: str, device: torch.device) -> dict[str, bool]:
        if implementation == "auto":
            implementation = "fused" if device.type in fused_devices() else "foreach"
        return {"fused": {"fused": True}, "foreach": {"foreach": True},
                "for-loop": {"foreach": False}}[implementation]

    @classmethod
    def build(cls, spec: "AdamW.Spec", model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
        placed = place(model, spec.rules)
        groups = adamw_groups(placed, spec, lr, lr)
        return torch.optim.AdamW(groups, lr=lr, betas=spec.betas, eps=spec.eps,
                                 **cls.kernel_flags(spec.implementation, device))


# ---------------------------------------------------------------- Muon
@declared
class MuonAdamWPart(AdamWParams):
    """The AdamW part of kind muon: the optimizer of the parameters the rules do not give to Muon (embeddings,
    head, norms, biases, MoE experts and everything that is not 2-D, by the standard rules)."""
    SCHEMA_NAME = "muon_adamw"

    lr: float | None = param(None, doc="Peak learning rate of the AdamW parameters (the schedule scales it in "
                                       "proportion to train.lr, which is Muon's); null: train.lr. With "
                                       "adjust_lr_fn 'original' Muon usually wants a larger lr (~0.02) than "
                                       "AdamW (~1e-3 to 8e-3).", exclusive_minimum=0)


#: The standard split of kind muon, applied after ``rules`` (unless ``default_rules: false``)
MUON_STANDARD_RULES = (
    ParamRule(roles=("embedding", "head"), optimizer="adamw"),
    ParamRule(roles=("expert", "norm", "bias", "not_matrix"), optimizer="adamw"),
    ParamRule(roles=("matrix",), optimizer="muon"),
)


class MuonWithAdamW:
    """torch.optim.Muon and torch.optim.AdamW stepped as one optimizer.

    ``param_groups`` lists Muon's groups, then AdamW's (the schedule and gradient clipping see them all);
    ``state_dict()`` is one ``torch.optim.Optimizer``-style dict over that order (parameter indices run through
    Muon's then AdamW's), so checkpoints, ``param_names`` and resume treat it like a single optimizer."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return self.muon, self.adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def _n_params(self) -> int:
        return sum(len(g["params"]) for g in self.muon.param_groups)

    def state_dict(self) -> dict[str, Any]:
        m, a = self.muon.state_dict(), self.adamw.state_dict()
        shift = self._n_params()
        return {"state": {**m["state"], **{int(i) + shift: s for i, s in a["state"].items()}},
                "param_groups": m["param_groups"] + [{**g, "params": [i + shift for i in g["params"]]}
                                                     for g in a["param_groups"]]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = state["param_groups"]
        n_muon = len(self.muon.param_groups)
        tags = [g.get("optimizer") for g in groups]
        want = [g["optimizer"] for g in self.param_groups]
        if tags != want:
            raise ValueError(f"the saved optimizer groups are {tags}, this optimizer has {want}")
        shift = self._n_params()
        muon_ids = {i for g in groups[:n_muon] for i in g["params"]}
        self.muon.load_state_dict({"state": {i: s for i, s in state["state"].items() if int(i) in muon_ids},
                                   "param_groups": groups[:n_muon]})
        self.adamw.load_state_dict({
            "state": {int(i) - shift: s for i, s in state["state"].items() if int(i) not in muon_ids},
            "param_groups": [{**g, "params": [i - shift for i in g["params"]]} for g in groups[n_muon:]]})


def _sharded(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


@declared
class MuonParams:
    """torch.optim.Muon's parameters (with its defaults)."""
    weight_decay: float = param(0.1, doc="Decoupled weight decay of the Muon parameters (p -= lr * "
                                         "weight_decay * p before the update).", minimum=0)
    momentum: float = param(0.95, doc="Momentum factor of the gradient average Muon orthogonalises.",
                            minimum=0, exclusive_maximum=1)
    nesterov: bool = param(True, doc="Nesterov momentum: orthogonalise gradient + momentum * buffer.")
    ns_coefficients: tuple[float, float, float] = param(
        (3.4445, -4.775, 2.0315), doc="Coefficients (a, b, c) of the quintic Newton-Schulz iteration.")
    ns_steps: int = param(5, doc="Newton-Schulz iterations per update.", minimum=1, maximum=99)
    eps: float = param(1e-7, doc="Lower bound of the norm the update is divided by before the iterations.",
                       exclusive_minimum=0)
    adjust_lr_fn: Literal["original", "match_rms_adamw"] = param(
        "original", doc="Learning-rate scaling per matrix shape (A x B): 'original' (Keller Jordan) "
                        "sqrt(max(1, A/B)); 'match_rms_adamw' (Moonshot) 0.2 * sqrt(max(A, B)), which lets Muon "
                        "reuse AdamW's learning rate and weight decay.")
    newton_schulz: Literal["torch", "batched"] = param(
        "torch", doc="'torch': torch.optim.Muon, one matrix at a time; 'batched': the same update with the "
                     "Newton-Schulz iterations of all matrices of one shape stacked into batched matmuls "
                     "(train/newton_schulz.py; faster for many small matrices), which also takes 3-D MoE experts "
                     "(one matrix per expert) when a rule gives them to muon, e.g. "
                     "{roles: [expert], optimizer: muon}.")


class Muon:
    """Muon (torch.optim.Muon: momentum, then the update orthogonalised by Newton-Schulz iterations) for the 2-D
    hidden matrices and AdamW for the rest, split by parameter-group rules.

    The standard rules (after the blueprint's ``rules``) give embeddings, the
    untied head, MoE experts, norms, biases and every parameter that is not
    2-D to AdamW, and the other 2-D matrices (attention, dense MLP, router
    weights) to Muon; each parameter goes to exactly one.  ``train.lr`` is
    Muon's peak learning rate; ``adamw.lr`` the AdamW part's.  Replicated
    gradients (one process, DDP) give every rank the same update; FSDP's
    sharded parameters are refused (torch's Muon orthogonalises whole matrices).
    """

    @declared
    class Spec(ParamGroups, MuonParams, Kind):
        default_rules: bool = param(True, doc="Apply the standard split after rules: embeddings, the untied head, "
                                              "MoE experts, norms, biases and every parameter that is not 2-D to "
                                              "AdamW, the other 2-D matrices to Muon; false: only rules apply, and "
                                              "a parameter no rule gives an optimizer is an error.")
        adamw: MuonAdamWPart = param(factory=MuonAdamWPart, doc="The AdamW optimizer of the parameters that do "
                                                                "not go to Muon.")

        #: state per parameter, at most (memory plans): AdamW's two moments; Muon keeps one momentum buffer
        states_per_param = 2
        MUON = True

        def check(self) -> Iterator[tuple[tuple, str]]:
            yield from super().check()
            if not hasattr(torch.optim, "Muon"):
                yield ("kind",), (f"torch.optim.Muon needs torch 2.9 or newer (this is torch {torch.__version__}); "
                                  "upgrade torch or use kind: adamw")

    @classmethod
    def build(cls, spec: "Muon.Spec", model: nn.Module, lr: float, device: torch.device) -> MuonWithAdamW:
        where = "train.optimizer"
        if not hasattr(torch.optim, "Muon"):
            raise OptimizerSetupError(f"{where}.kind: muon needs torch.optim.Muon (torch 2.9 or newer; this is torch "
                                      f"{torch.__version__}); upgrade torch or use {where}.kind: adamw")
        placed = place(model, spec.rules, MUON_STANDARD_RULES if spec.default_rules else (), where)
        for pl in placed:
            origin = (f"{where}.rules[{pl.chosen_by}] gives" if pl.chosen_by is not None
                      else "the standard rules give")
            if pl.optimizer is None:
                raise OptimizerSetupError(
                    f"{where}: parameter '{pl.name}' (shape {tuple(pl.param.shape)}) matches no rule that sets its "
                    f"optimizer; add one to {where}.rules, e.g. {{names: ['{pl.name}'], optimizer: adamw}}, or set "
                    f"{where}.default_rules: true")
            batched = spec.newton_schulz == "batched"
            if pl.optimizer == "muon" and pl.param.ndim not in ((2, 3) if batched else (2,)):
                also = "" if batched or pl.param.ndim != 3 else (
                    f", or set {where}.newton_schulz: batched, which orthogonalises each matrix of a 3-D stack")
                raise OptimizerSetupError(
                    f"{where}: {origin} parameter '{pl.name}' (shape {tuple(pl.param.shape)}) to Muon, which "
                    f"updates only 2-D matrices{' and 3-D stacks of them' if batched else ''}; give it to adamw "
                    f"with a rule before, e.g. {{names: ['{pl.name}'], optimizer: adamw}}{also}")
            if pl.optimizer == "muon" and _sharded(pl.param):
                raise OptimizerSetupError(
                    f"{where}.kind: muon cannot update parameters sharded by FSDP (runtime data_parallel: fsdp, "
                    f"e.g. --profile fsdp): torch.optim.Muon orthogonalises each whole matrix and has no support "
                    f"for sharded ones; use DDP (--profile multi_gpu_compile or --set runtime.data_parallel=ddp) or "
                    f"{where}.kind: adamw")
        to_muon = [pl for pl in placed if pl.optimizer == "muon"]
        if not to_muon:
            raise OptimizerSetupError(f"{where}: the rules give no parameter to Muon; use {where}.kind: adamw")
        base, others = [], {}
        for pl in to_muon:
            if pl.lr is None and pl.weight_decay is None:
                base.append(pl.param)
            else:
                key = (pl.lr if pl.lr is not None else lr,
                       pl.weight_decay if pl.weight_decay is not None else spec.weight_decay)
                others.setdefault(key, []).append(pl.param)
        groups = [_group(base, lr, lr, spec.weight_decay, optimizer="muon"),
                  *(_group(ps, group_lr, lr, wd, optimizer="muon") for (group_lr, wd), ps in others.items())]
        muon_cls = BatchedMuon if spec.newton_schulz == "batched" else torch.optim.Muon
        muon = muon_cls(groups, lr=lr, weight_decay=spec.weight_decay, momentum=spec.momentum,
                                nesterov=spec.nesterov, ns_coefficients=spec.ns_coefficients, eps=spec.eps,
                                ns_steps=spec.ns_steps, adjust_lr_fn=spec.adjust_lr_fn)
        part = spec.adamw
        adamw_lr = part.lr if part.lr is not None else lr
        adamw = torch.optim.AdamW(
            adamw_groups([pl for pl in placed if pl.optimizer == "adamw"], part, adamw_lr, lr, optimizer="adamw"),
            lr=adamw_lr, betas=part.betas, eps=part.eps, **AdamW.kernel_flags(part.implementation, device))
        return MuonWithAdamW(muon, adamw)


def build_optimizer(spec, model: nn.Module, lr: float, device: torch.device):
    """The optimizer ``spec`` (the built ``train.optimizer`` block) describes, over ``model``'s parameters."""
    return spec.impl.build(spec, model, lr, device)
