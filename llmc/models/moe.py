"""Mixture-of-experts blocks: fused 3-D experts as per-expert linears, and calibration of every expert.

transformers 5 stores the experts of Mixtral, Qwen2-MoE and Qwen3-MoE as one module with 3-D
parameters (`gate_up_proj` `[E, 2I, H]`, `down_proj` `[E, H, I]`), called as
`experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])` by the sparse block after its
router (`mlp.gate`, a float module with a 2-D weight). Nothing in it is an `nn.Linear`, so a
quantizer that looks for linears skips every expert silently.

`fused_expert_steps(names)` gives an adapter's `prepare` and `restore` steps: `prepare` replaces
each fused experts module by `RoutedExperts`, a module list of `ExpertMLP`s with three
`nn.Linear`s each, named as the checkpoint names its per-expert tensors (`w1`/`w3`/`w2` for
Mixtral, `gate_proj`/`up_proj`/`down_proj` for Qwen), with the same forward signature and the
same arithmetic as transformers' eager experts loop (bit-identical outputs); `restore(model,
weight_of)` puts the fused module back with its 3-D parameters stacked from `weight_of(linear)`,
so `save_pretrained` writes the checkpoint's own per-expert keys through transformers' own
conversion, and returns the undo. Because the per-expert names are the checkpoint's, a writer
that reads the prepared model's `state_dict()` (compressed-tensors) writes the per-expert keys
transformers and vLLM load (`.mlp.` becomes Mixtral's `.block_sparse_moe.` on saving).

Calibration. The router sends each token to its top-k experts only, so a rarely chosen expert
would be quantized from a handful of tokens (or none: GPTQ would then see a zero Hessian).
`moe_calibration(model, calib, batches)` is the switch the runner turns on around the
compression: with `calib.moe_all_experts` (default) every calibration token runs through every
expert's linears, so hooks on them (GPTQ/SparseGPT Hessians, AWQ and SmoothQuant statistics,
static activation ranges) see all calibration tokens, while the block output still combines only
the routed experts with the router's weights (recomputed on the routed tokens alone, hooks
bypassed: the output is bit-identical to the switch off). It also counts the tokens the router
sends to each expert; the counts go into results.json (`moe_routing`) and experts routed fewer
than `calib.moe_min_tokens` are named in a warning, one line per block.

Linear groups (`moe_groups`; `LinearGroup.when` picks them from the experts' state). While every
token runs through every expert, every expert's gate/up (and the shared expert's) read the same
tensor, the post-attention norm's output: one group `moe_in`, one Hessian, one AWQ/SmoothQuant
scale searched on the whole sparse block's output and folded into the norm, and through
`also_reads` into the router and the shared-expert gate. Otherwise (`calib.moe_all_experts:
false`, or outside `moe_calibration`) each expert reads its own subset of tokens: its gate/up
form a group of their own (`expert_in.#`, a Hessian per expert) and that input is not scaled (no
single set of tokens could choose the norm's scale for experts that read different ones). Each
expert's down_proj is always its own group (`expert_down.#`, its input is that expert's
activation, scaled into its up_proj); an expert no token reached gets no statistics: GPTQ uses an
identity Hessian (round to nearest) and AWQ leaves it unscaled and unclipped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmc.errors import ModelError
from llmc.models.adapter import LinearGroup

log = logging.getLogger("llmc")


class ExpertMLP(nn.Module):
    """One expert: `down(act(gate(x)) * up(x))` with three bias-free linears named as in the checkpoint."""

    def __init__(self, names: tuple[str, str, str], gate: nn.Linear, up: nn.Linear, down: nn.Linear,
                 act_fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.names = names
        for name, linear in zip(names, (gate, up, down)):
            self.add_module(name, linear)
        self.act_fn = act_fn

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return tuple(getattr(self, n) for n in self.names)  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        gate, up, down = self.projections()
        return down(self.act_fn(gate(x)) * up(x))

    def unhooked(self, x: Tensor) -> Tensor:
        """The same computation without firing any module hook (this module's or its linears')."""
        gate, up, down = self.projections()
        return down.forward(self.act_fn(gate.forward(x)) * up.forward(x))


class RoutedExperts(nn.ModuleList):
    """Per-expert stand-in for a fused experts module (same call, same outputs); see the module doc."""

    def __init__(self, experts: list[ExpertMLP], fused: nn.Module) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.calibrating = False
        """Set by `moe_calibration`: count the routed tokens, and (with `all_experts`) run every token
        through every expert."""
        self.all_experts = True
        """Whether calibration runs every token through every expert (`calib.moe_all_experts`)."""
        self.register_buffer("routed", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)
        self.seen = 0
        """Tokens the router saw while calibrating (over every calibration forward of the block)."""
        self.calib_tokens = 0
        self.min_tokens = 0
        self.top_k = 0
        self.calibrated_all = True
        object.__setattr__(self, "fused", fused)  # not a submodule: its 3-D parameters are rebuilt by `restore`

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # transformers' eager loop: `num_experts + 1` classes (an out-of-range index means no expert)
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hits = expert_mask.sum(dim=(-1, -2))[: self.num_experts]
        if self.calibrating:
            self.routed += hits.to(self.routed.device)
            self.seen += hidden_states.shape[0]
            self.top_k = top_k_index.shape[-1]
        every = self.calibrating and self.all_experts
        for index, count in enumerate(hits.tolist()):
            expert = self[index]
            if every:
                expert(hidden_states)  # for the hooks: every calibration token through this expert
            if count == 0:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[index])
            current = hidden_states[token_idx]
            current = expert.unhooked(current) if every else expert(current)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, current.to(final.dtype))
        return final

    def routed_per_pass(self) -> list[int] | None:
        """Tokens the router sent to each expert in one pass over the calibration set (the average
        over the block's calibration forwards; None if none ran)."""
        if not self.seen or not self.calib_tokens:
            return None
        return [round(r * self.calib_tokens / self.seen) for r in self.routed.tolist()]

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, from {type(self.fused).__name__}"


def is_fused_experts(module: nn.Module) -> bool:
    params = module._parameters
    return all(isinstance(params.get(n), Tensor) and params[n].dim() == 3 for n in ("gate_up_proj", "down_proj"))


def _linear(weight: Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return linear


def split_experts(fused: nn.Module, names: tuple[str, str, str]) -> RoutedExperts:
    """`RoutedExperts` holding copies of the fused module's weights; the fused 3-D parameters are dropped."""
    layout = {k: getattr(fused, k, d) for k, d in
              (("is_transposed", False), ("has_bias", False), ("is_concatenated", True), ("has_gate", True))}
    if layout != {"is_transposed": False, "has_bias": False, "is_concatenated": True, "has_gate": True}:
        raise ModelError(f"{type(fused).__name__} stores its experts in a layout llmc does not split ({layout})")
    gate_up, down = fused.gate_up_proj, fused.down_proj
    inter = gate_up.shape[1] // 2
    experts = [
        ExpertMLP(names, _linear(gate_up[e, :inter]), _linear(gate_up[e, inter:]), _linear(down[e]), fused.act_fn)
        for e in range(gate_up.shape[0])
    ]
    del fused.gate_up_proj, fused.down_proj
    return RoutedExperts(experts, fused)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def fused_expert_steps(names: tuple[str, str, str]):
    """An adapter's `prepare` and `restore` steps for fused experts; `names` are the per-expert
    linears (gate, up, down) as the checkpoint names them."""

    def prepare(model: nn.Module) -> None:
        for name, module in list(model.named_modules()):
            if is_fused_experts(module):
                parent, attr = _owner(model, name)
                setattr(parent, attr, split_experts(module, names))

    def restore(model: nn.Module, weight_of: Callable[[nn.Module], Tensor]) -> Callable[[], None]:
        swapped = []
        for name, module in list(model.named_modules()):
            if not isinstance(module, RoutedExperts):
                continue
            fused = module.fused
            with torch.no_grad():
                gate_up, down = [], []
                for expert in module:
                    gate, up, proj = expert.projections()
                    dtype = gate.weight.dtype
                    gate_up.append(torch.cat([weight_of(gate).to(dtype), weight_of(up).to(dtype)]))
                    down.append(weight_of(proj).to(dtype))
                fused.gate_up_proj = nn.Parameter(torch.stack(gate_up), requires_grad=False)
                fused.down_proj = nn.Parameter(torch.stack(down), requires_grad=False)
            parent, attr = _owner(model, name)
            setattr(parent, attr, fused)
            swapped.append((parent, attr, module))

        def undo() -> None:
            for parent, attr, module in swapped:
                setattr(parent, attr, module)
                del module.fused.gate_up_proj, module.fused.down_proj

        return undo

    return prepare, restore


# ---- linear groups ----------------------------------------------------------------------


def _routed_experts(block: nn.Module) -> list[RoutedExperts]:
    return [m for m in block.modules() if isinstance(m, RoutedExperts)]


def all_tokens_through_experts(block: nn.Module) -> bool:
    """Whether every token runs through every expert of the block now (calibrating, with
    `calib.moe_all_experts`); otherwise each expert sees only its routed tokens."""
    return all(m.calibrating and m.all_experts for m in _routed_experts(block))


def routed_tokens_only(block: nn.Module) -> bool:
    return not all_tokens_through_experts(block)


def moe_groups(
    expert: tuple[str, str, str],
    shared: str | None = None,
    router: str = "mlp.gate",
    shared_gate: str | None = None,
    sparse: str = "mlp",
    norm: str = "post_attention_layernorm",
) -> tuple[LinearGroup, ...]:
    """The linear groups of a sparse MoE block at `sparse` (router `router`, per-expert linears
    `expert` = (gate, up, down) under `<sparse>.experts.#`, an optional shared expert MLP `shared`
    with its sigmoid gate `shared_gate`), fed by `norm`; see the module doc for the two layouts."""
    experts = f"{sparse}.experts.{'#'}"
    gate, up, down = (f"{experts}.{n}" for n in expert)
    shared_in = (f"{shared}.gate_proj", f"{shared}.up_proj") if shared else ()
    readers = (router, shared_gate) if shared_gate else (router,)
    groups = [
        LinearGroup("moe_in", (*shared_in, gate, up), prev_op=norm, inspect=sparse, also_reads=readers,
                    when=all_tokens_through_experts),
    ]
    if shared:
        groups += [
            LinearGroup("shared_in", shared_in, prev_op=None, inspect=shared, when=routed_tokens_only),
            LinearGroup("shared_down", (f"{shared}.down_proj",), prev_op=f"{shared}.up_proj",
                        inspect=f"{shared}.down_proj"),
        ]
    groups += [
        LinearGroup("expert_in", (gate, up), prev_op=None, inspect=experts, when=routed_tokens_only),
        LinearGroup("expert_down", (down,), prev_op=up, inspect=down),
    ]
    return tuple(groups)


# ---- calibration switch and routing report ------------------------------------------------


@contextlib.contextmanager
def moe_calibration(model: nn.Module, calib: object | None = None, batches: list[dict] | None = None) -> Iterator[None]:
    """Inside: every `RoutedExperts` of `model` counts its routed tokens and, with
    `calib.moe_all_experts` (default true), runs every token through every expert. On a normal exit,
    experts routed fewer than `calib.moe_min_tokens` tokens per pass are named in a warning."""
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedExperts)]
    if not experts:
        yield
        return
    all_experts = bool(getattr(calib, "moe_all_experts", True))
    min_tokens = int(getattr(calib, "moe_min_tokens", 0))
    tokens = sum(int(b["input_ids"].numel()) for b in batches or [])
    for _, m in experts:
        m.routed.zero_()
        m.seen, m.calib_tokens, m.min_tokens, m.calibrated_all = 0, tokens, min_tokens, all_experts
        m.all_experts, m.calibrating = all_experts, True
    try:
        yield
    finally:
        for _, m in experts:
            m.calibrating, m.all_experts = False, True
    for name, m in experts:
        _warn_starved(name, m)


def _warn_starved(name: str, m: RoutedExperts) -> None:
    counts = m.routed_per_pass()
    if counts is None:
        return
    starved = [(i, c) for i, c in enumerate(counts) if c < m.min_tokens]
    if not starved:
        return
    which = ", ".join(f"{i} ({c})" for i, c in starved)
    if m.calibrated_all:
        fix = ("they were still quantized from all calibration tokens (calib.moe_all_experts: true); "
               "if the model needs them, calibrate on more or more varied data (calib.n_samples, calib.seq_len)")
    else:
        fix = ("they were quantized from only those tokens: set calib.moe_all_experts: true to quantize every "
               "expert from all calibration tokens, or calibrate on more data (calib.n_samples, calib.seq_len)")
    log.warning("%s: the router sent experts %s fewer than calib.moe_min_tokens=%d tokens (of %d calibration "
                "tokens, top-%d); %s", name, which, m.min_tokens, m.calib_tokens, m.top_k, fix)


def moe_routing(model: nn.Module) -> dict | None:
    """The per-expert routed token counts of the last calibration, for results.json (None: no MoE
    block was calibrated)."""
    blocks = {}
    first = None
    for name, m in model.named_modules():
        if isinstance(m, RoutedExperts) and (counts := m.routed_per_pass()) is not None:
            first = first or m
            blocks[name] = {"routed_tokens": counts,
                            "below_min_tokens": [i for i, c in enumerate(counts) if c < m.min_tokens]}
    if first is None:
        return None
    return {"all_experts": first.calibrated_all, "min_tokens": first.min_tokens,
            "calib_tokens": first.calib_tokens, "experts": blocks}
