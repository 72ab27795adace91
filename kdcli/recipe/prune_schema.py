"""`student.prune` (torch-free): the spec, and the one rule that turns a source config plus the
spec into the pruned student's sizes. check-recipe, `kdcli plan` and the run all call
`prune_targets`, so they agree on the student to the parameter.

A pruned student keeps the source's head_dim (so rotary embeddings are untouched); its query
heads come in `num_key_value_heads` groups of `num_attention_heads / num_key_value_heads`,
each group taken from one of the source's KV groups (so a group can shrink or be dropped
whole, never mixed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from kdcli.recipe.validation import Section

#: model types whose students can be pruned (same module names and shapes)
PRUNE_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: how blocks are chosen when num_hidden_layers shrinks (`kdcli.compress.block_ranking`)
DEPTH_MEASURES = ("block_influence", "angular_distance", "evenly_spaced")
#: calibration rows when `rows` is not given (all of them when the training set has fewer)
DEFAULT_ROWS = 64
#: the sizes a prune spec may set, in the order they are checked
PRUNE_SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


class PruneSpec(Section):
    """A student sliced out of a model by measured importance (Minitron, arXiv 2407.14679)."""

    source: str | None = Field(
        None,
        alias="from",
        description="Model to prune (hub id, folder or pkg:); default the first teacher. It becomes student.config.",
    )
    num_hidden_layers: int | None = Field(None, ge=1, description="Blocks kept (default: all).")
    hidden_size: int | None = Field(None, ge=1, description="Embedding channels kept (default: all).")
    intermediate_size: int | None = Field(None, ge=1, description="MLP channels kept per block (default: all).")
    num_attention_heads: int | None = Field(None, ge=1, description="Query heads kept per block (default: all).")
    num_key_value_heads: int | None = Field(
        None, ge=1, description="KV groups kept per block (default: the source's when it divides the heads)."
    )
    by: Literal["activation"] = Field(
        "activation",
        description="Width importance: mean absolute activation per head, MLP channel and embedding channel "
        "over the calibration rows (Minitron).",
    )
    depth_by: Literal[DEPTH_MEASURES] = Field(  # type: ignore[valid-type]
        "block_influence",
        description="Which blocks stay when num_hidden_layers shrinks: block_influence (ShortGPT), "
        "angular_distance (Gromov et al.) or evenly_spaced.",
    )
    rows: int | None = Field(
        None, ge=1, le=10_000, description="Calibration rows: the first N training rows (default 64, or all if fewer)."
    )

    def sizes(self) -> dict[str, int]:
        """The sizes the spec sets (config field -> value)."""
        return {k: getattr(self, k) for k in PRUNE_SIZES if getattr(self, k) is not None}


@dataclass(frozen=True)
class PruneProblem:
    """A size the source cannot give: the spec field, what is wrong, the fix."""

    field: str
    message: str
    fix: str


def source_sizes(config: dict) -> dict[str, int | None]:
    """The sizes of a config dict a prune is measured against (None where it says nothing)."""

    def get(key: str) -> int | None:
        value = config.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    heads = get("num_attention_heads")
    hidden = get("hidden_size")
    head_dim = get("head_dim") or (hidden // heads if hidden and heads else None)
    return {
        "num_hidden_layers": get("num_hidden_layers"),
        "hidden_size": hidden,
        "intermediate_size": get("intermediate_size"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("num_key_value_heads") or heads,
        "head_dim": head_dim,
    }


def prune_targets(config: dict, spec: PruneSpec) -> tuple[dict[str, int], list[PruneProblem]]:
    """The pruned student's sizes (the five of `PRUNE_SIZES` plus head_dim) from the source's
    config dict, and the problems (an architecture that cannot be pruned, a size above the
    source's, heads that do not split into KV groups). Unknown source sizes are left out."""
    problems: list[PruneProblem] = []
    mt = config.get("model_type")
    if mt is not None and mt not in PRUNE_MODEL_TYPES:
        problems.append(
            PruneProblem(
                "prune",
                f"kdcli prunes {', '.join(PRUNE_MODEL_TYPES)} models; the source is a {mt!r} model",
                f"prune a model of one of those types, or remove student.prune and use overrides "
                f"(with init_from_teacher for depth) on the {mt} model",
            )
        )
    src = source_sizes(config)
    out: dict[str, int] = {}
    for key in PRUNE_SIZES[:3]:
        want, have = getattr(spec, key), src[key]
        if want is not None and have is not None and want > have:
            problems.append(PruneProblem(key, f"{key} {want} is above the source's {have}", f"use at most {have}"))
        if want is not None or have is not None:
            out[key] = want if want is not None else have  # type: ignore[assignment]
    problems += _head_targets(src, spec, out)
    hidden, heads = out.get("hidden_size"), out.get("num_attention_heads")
    if mt == "llama" and hidden and heads and hidden % heads and not problems:
        near = max(heads, hidden - hidden % heads)
        problems.append(
            PruneProblem(
                "hidden_size",
                f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                "(transformers refuses such a llama config, even with head_dim kept)",
                f"use a multiple of {heads}, e.g. {near}",
            )
        )
    if src["head_dim"] is not None:
        out["head_dim"] = src["head_dim"]
    return out, problems


def _head_targets(src: dict, spec: PruneSpec, out: dict[str, int]) -> list[PruneProblem]:
    """Query heads and KV groups: each student group is a share of one source group."""
    h_t, kv_t = src["num_attention_heads"], src["num_key_value_heads"]
    h_s, kv_s = spec.num_attention_heads, spec.num_key_value_heads
    if h_t is None or kv_t is None:
        out.update({k: v for k, v in (("num_attention_heads", h_s), ("num_key_value_heads", kv_s)) if v})
        return []
    group = h_t // kv_t
    if h_s is None:
        h_s = h_t if kv_s is None or kv_s == kv_t else kv_s * group
    if kv_s is None:
        kv_s = kv_t if h_s % kv_t == 0 else None
        if kv_s is None:
            return [
                PruneProblem(
                    "num_attention_heads",
                    f"num_attention_heads {h_s} does not split into the source's {kv_t} KV groups",
                    f"set num_key_value_heads to a divisor of {h_s} (at most {kv_t}), or use a multiple of {kv_t} heads",
                )
            ]
    problems = []
    if h_s > h_t:
        problems.append(
            PruneProblem(
                "num_attention_heads", f"num_attention_heads {h_s} is above the source's {h_t}", f"use at most {h_t}"
            )
        )
    if kv_s > kv_t:
        problems.append(
            PruneProblem(
                "num_key_value_heads", f"num_key_value_heads {kv_s} is above the source's {kv_t}", f"use at most {kv_t}"
            )
        )
    elif h_s % kv_s:
        problems.append(
            PruneProblem(
                "num_attention_heads",
                f"num_attention_heads {h_s} is not a multiple of num_key_value_heads {kv_s}",
                "choose heads = KV groups x heads per group",
            )
        )
    elif h_s // kv_s > group:
        problems.append(
            PruneProblem(
                "num_attention_heads",
                f"{h_s} heads in {kv_s} KV groups is {h_s // kv_s} per group, but the source's groups hold {group}",
                f"use at most {kv_s * group} heads, or more KV groups",
            )
        )
    out["num_attention_heads"], out["num_key_value_heads"] = h_s, kv_s
    return problems
