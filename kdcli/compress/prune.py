"""A smaller Llama / Mistral / Qwen2 sliced out of a model by measured importance (Minitron).

`prune_model(source, spec, batches)` measures the source (`compress.importance`; the depth
ranking from `compress.blocks.choose_blocks` when blocks go), chooses what stays (`choose`), and
builds the student from the source's config with the pruned sizes (`kdcli.recipe.prune_schema`, the
rule check-recipe and `kdcli plan` use) and the source's tensors sliced (`slice_state`):

- embedding channels: the same kept channels in the embeddings, every RMSNorm weight, every
  projection's input or output side, and the head (tied or not);
- attention: whole KV groups are kept or dropped together with their query heads; inside a
  kept group the most important query heads stay; head_dim is the source's, so the rotary
  embeddings are untouched;
- MLP: the kept channels of gate, up and down.

Every kept set is in the source's order, so a prune that keeps everything is the source.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kdcli.compress.importance import Importance, measure_importance
from kdcli.models import ModelError, apply_overrides, encoder_blocks
from kdcli.recipe.prune_schema import PRUNE_MODEL_TYPES, PRUNE_SIZES, PruneSpec, prune_targets


@dataclass
class PrunePlan:
    """What a pruned student keeps of its source, in the source's indices (0-based, except
    `layers`: 1-based source blocks). Per kept block: query heads (in the student's order),
    KV groups, MLP channels."""

    sizes: dict[str, int]
    layers: tuple[int, ...]
    hidden: list[int]
    heads: list[list[int]]
    kv: list[list[int]]
    mlp: list[list[int]]
    importance: Importance
    depth: object = None  # a BlockRanking when blocks were dropped
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """What summary.json and `kdcli prune --json` carry."""
        return {
            "sizes": self.sizes,
            "layers": list(self.layers),
            "hidden": self.hidden,
            "heads": self.heads,
            "kv_groups": self.kv,
            "mlp": self.mlp,
            "depth": self.depth.to_dict() if self.depth is not None else None,
            "importance": self.summary,
            "tokens": self.importance.tokens,
            "seconds": round(self.seconds, 3),
        }


def _top(scores: Tensor, k: int) -> list[int]:
    """The k highest scores' indices, ascending (ties: the earlier index)."""
    order = torch.argsort(-scores, stable=True)[:k]
    return sorted(order.tolist())


def _kept_share(scores: Tensor, kept: Sequence[int]) -> float:
    total = float(scores.sum())
    return round(float(scores[list(kept)].sum()) / total, 6) if total > 0 else 1.0


def choose(importance: Importance, sizes: dict[str, int], source_heads: int, source_kv: int, layers) -> PrunePlan:
    """The kept channels, heads and groups of `layers` (1-based) for the target `sizes`."""
    group = source_heads // source_kv
    per_group = sizes["num_attention_heads"] // sizes["num_key_value_heads"]
    hidden = _top(importance.hidden, sizes["hidden_size"])
    heads, kv, mlp = [], [], []
    for layer in layers:
        h = importance.heads[layer - 1]
        groups = _top(h.view(source_kv, group).sum(1), sizes["num_key_value_heads"])
        kept_heads = [g * group + q for g in groups for q in _top(h[g * group : (g + 1) * group], per_group)]
        heads.append(kept_heads)
        kv.append(groups)
        mlp.append(_top(importance.mlp[layer - 1], sizes["intermediate_size"]))
    summary = {
        "hidden_kept_share": _kept_share(importance.hidden, hidden),
        "heads_kept_share": [_kept_share(importance.heads[x - 1], k) for x, k in zip(layers, heads)],
        "mlp_kept_share": [_kept_share(importance.mlp[x - 1], k) for x, k in zip(layers, mlp)],
        "hidden_scores": [round(float(v), 6) for v in importance.hidden],
        "head_scores": [[round(float(v), 6) for v in importance.heads[x - 1]] for x in layers],
    }
    return PrunePlan(dict(sizes), tuple(layers), hidden, heads, kv, mlp, importance, summary=summary)


#: (output side, input side) of each parameter by its name's ending: E embedding channels,
#: Q query-head rows, KV key/value-group rows, C MLP channels, None all
_SLICES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens.weight": (None, "E"),
    "lm_head.weight": (None, "E"),
    "norm.weight": ("E",),
    "layernorm.weight": ("E",),
    "q_proj.weight": ("Q", "E"),
    "q_proj.bias": ("Q",),
    "k_proj.weight": ("KV", "E"),
    "k_proj.bias": ("KV",),
    "v_proj.weight": ("KV", "E"),
    "v_proj.bias": ("KV",),
    "o_proj.weight": ("E", "Q"),
    "o_proj.bias": ("E",),
    "gate_proj.weight": ("C", "E"),
    "gate_proj.bias": ("C",),
    "up_proj.weight": ("C", "E"),
    "up_proj.bias": ("C",),
    "down_proj.weight": ("E", "C"),
    "down_proj.bias": ("E",),
}


def _rows(heads: Sequence[int], head_dim: int) -> list[int]:
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def slice_state(source: nn.Module, student: nn.Module, plan: PrunePlan, head_dim: int) -> dict[str, Tensor]:
    """The student's state dict cut out of the source's (`ModelError` for a tensor it has no rule for)."""
    t_state = source.state_dict()
    s_path, t_path = encoder_blocks(student).path + ".", encoder_blocks(source).path + "."
    out: dict[str, Tensor] = {}
    for key in student.state_dict():
        index, t_key, layer = None, key, None
        if key.startswith(s_path):
            index, rest = key[len(s_path) :].split(".", 1)
            layer = int(index)
            t_key = f"{t_path}{plan.layers[layer] - 1}.{rest}"
        rule = next((r for end, r in _SLICES.items() if key.endswith(end)), None)
        if rule is None or t_key not in t_state:
            raise ModelError(
                f"student.prune: no rule to slice {key} (source {t_key}); kdcli prunes {PRUNE_MODEL_TYPES}"
            )
        index_of = {
            "E": plan.hidden,
            "Q": _rows(plan.heads[layer], head_dim) if layer is not None else None,
            "KV": _rows(plan.kv[layer], head_dim) if layer is not None else None,
            "C": plan.mlp[layer] if layer is not None else None,
        }
        tensor = t_state[t_key]
        for dim, kind in enumerate(rule):
            if kind is not None:
                tensor = tensor.index_select(dim, torch.tensor(index_of[kind], device=tensor.device))
        out[key] = tensor.contiguous()
    return out


def pruned_config(source: nn.Module, sizes: dict[str, int], layers: Sequence[int], overrides: dict | None):
    """The source's config with the pruned sizes (head_dim kept), per-layer types of the kept
    blocks, then any other `overrides`."""
    config = copy.deepcopy(source.config)
    types = getattr(config, "layer_types", None)
    for key, value in sizes.items():
        setattr(config, key, value)
    if isinstance(types, list) and len(types) >= max(layers, default=0):
        config.layer_types = [types[i - 1] for i in layers]
    others = {k: v for k, v in (overrides or {}).items() if k not in PRUNE_SIZES}
    apply_overrides(config, others)
    return config


def prune_model(
    source: nn.Module,
    spec: PruneSpec,
    batches: Callable[[], Iterator[dict[str, Tensor]]],
    overrides: dict | None = None,
) -> tuple[nn.Module, PrunePlan]:
    """The student pruned from `source` by `spec`, measured on `batches()`, and its plan."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    start = time.perf_counter()
    config = source.config
    sizes, problems = prune_targets(config.to_dict(), spec)
    if problems:
        p = problems[0]
        raise ModelError(f"student.prune.{p.field}: {p.message}. Fix: {p.fix}")
    importance = measure_importance(source, batches())
    layers, depth = tuple(range(1, config.num_hidden_layers + 1)), None
    if sizes["num_hidden_layers"] < config.num_hidden_layers:
        from kdcli.compress.blocks import choose_blocks

        depth = choose_blocks(source, batches, sizes["num_hidden_layers"], spec.depth_by)
        layers = tuple(depth.kept)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    plan = choose(importance, sizes, config.num_attention_heads, kv, layers)
    plan.depth = depth
    student_config = pruned_config(source, sizes, layers, overrides)
    dtype = next(source.parameters()).dtype
    with no_init_weights():  # every tensor is overwritten by the source's slices
        student = AutoModelForCausalLM.from_config(student_config, dtype=dtype, attn_implementation="sdpa")
    student.tie_weights()  # no_init_weights skips the tying too
    state = slice_state(source, student, plan, sizes["head_dim"])
    with torch.no_grad():
        student.load_state_dict(state, strict=True)
    if getattr(source, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(source.generation_config)
    plan.seconds = time.perf_counter() - start
    return student, plan
