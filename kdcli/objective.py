"""The distillation objective: KD on logits + intermediate matches + hard-label CE.

    total = w_kd * KD(z_S, z_T, T) + sum_i w_i * match_i(f_S, f_T, mask_S) + w_hl * CE(z_S, y)

as TextBrewer 0.2.1's `GeneralDistiller.compute_loss` (distiller_general.py) and
`MultiTeacherDistiller` (distiller_multiteacher.py) define it:

- KD: `registry.get_loss(kd_loss_type).fn()(z_S, z_T, T)`; the temperature comes from the
  temperature scheduler `sched(z_S, z_T, T)` when one is configured (a float or a per-example
  tensor), else the configured temperature.
- Weight schedulers: a scheduled weight *replaces* the configured `kd_loss_weight` /
  `hard_label_weight` with `scheduler(step_fraction)`, `step_fraction = optimizer steps done /
  total steps`. (The reference updates the weight only after the first optimizer step, so its
  very first batch uses the unscheduled weight; kdcli applies the schedule from step 0.)
- `probability_shift`: the teacher's largest logit and the label's logit swap places, so the
  label is the teacher's argmax. Unlike the reference (`probability_shift_`, in place) this
  never writes into the teacher's tensor (which may be a cached logit), and for token
  classification the labels are selected with the same mask as the logits (the reference
  passed unselected (B, L) labels against selected (N, C) logits).
- Multi-teacher: the teachers' logits are averaged (after selection) before KD, as the
  reference's MultiTeacherDistiller. Intermediate matches use the **first** teacher's features
  (the reference's multi-teacher distiller has no intermediate matches at all).
- Token classification: logits (B, L, C) are reduced to the labelled tokens (labels != -100),
  shape (N, C), before KD, as the reference's `select_logits_with_mask`.
- Every intermediate loss gets the **student's** attention mask (B, L), as the reference
  (`inputs_mask_S`). Student features pass through the match's projection when it has one
  (the teacher's never do).
- The hard-label term is `F.cross_entropy(z_S, y, ignore_index=-100)` (mean over labelled
  examples / tokens), what Hugging Face models return as `loss` when given labels.

Logits are upcast to float32; the loss functions reduce bf16/fp16 features in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli import registry
from kdcli.errors import RunError
from kdcli.recipe.messages import dotted
from kdcli.recipe.model_rules import proj_size_findings
from kdcli.tasks import CHUNK_SIZE, IGNORE_INDEX, task_for


@dataclass(frozen=True)
class MatchPlan:
    """One intermediate match, resolved: which features, which loss, its weight, its name."""

    index: int  # position in `intermediate_matches`
    name: str  # stable term name, e.g. "hidden_mse[4->1]" or "nst[8,8->2,2]"
    feature: str  # "hidden" or "attention"
    layers_T: tuple[int, ...]
    layers_S: tuple[int, ...]
    is_pair: bool  # True when the recipe wrote lists (fsp/mmd): the loss takes lists
    weight: float
    loss_fn: Callable[..., Tensor]
    has_proj: bool


def term_name(loss: str, layer_T: int | Sequence[int], layer_S: int | Sequence[int]) -> str:
    """The stable name of a match term: `loss[T->S]`, lists joined by commas.

    >>> term_name("nst", [8, 8], [2, 2])
    'nst[8,8->2,2]'
    """

    def spell(layer: int | Sequence[int]) -> str:
        return ",".join(map(str, layer)) if isinstance(layer, (list, tuple)) else str(layer)

    return f"{loss}[{spell(layer_T)}->{spell(layer_S)}]"


def select_labelled(logits: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Token-level logits (B, L, C) -> (N, C) at the N positions where labels != -100.

    Sequence-level logits (B, C) pass through unchanged (the reference's
    `select_logits_with_mask`). Returns the selected labels (N,) too, or (B,) unchanged.
    The task is told by the logits' shape; an `Objective` given its `task` asks it instead.
    """
    task = "token-classification" if logits.dim() == 3 else "sequence-classification"
    return task_for(task).kd_logits(logits, labels)


def probability_shift(logits_T: Tensor, labels: Tensor) -> Tensor:
    """Swap each row's largest logit with the label's logit (out of place).

    logits_T: (N, C); labels: (N,) class ids (negative ids leave the row unchanged).
    Wen et al. 2019, "Preparing Lessons", arXiv:1911.07471; reference: `probability_shift_`.
    """
    if logits_T.dim() != 2:
        raise ValueError(f"probability_shift expects (N, C) logits, got {tuple(logits_T.shape)}")
    top = logits_T.argmax(dim=-1)
    target = torch.where(labels < 0, top, labels)
    rows = torch.arange(logits_T.size(0), device=logits_T.device)
    top_value = logits_T[rows, top]
    target_value = logits_T[rows, target]
    shifted = logits_T.clone()
    shifted[rows, top] = target_value
    shifted[rows, target] = top_value
    return shifted


def hard_label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits (B, C) or (B, L, C) against labels (B,) or (B, L).

    Positions labelled -100 are ignored; mean over the rest (Hugging Face's `loss`).
    """
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _as_tuple(layer: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(layer) if isinstance(layer, (list, tuple)) else (int(cast(int, layer)),)


class Objective(nn.Module):
    """The total loss of one step, every term reported by name; owns the projections.

    Built from the recipe's `distillation` section (`None` for `kdcli train`: hard-label CE
    only, weight 1). `hidden_S` / `hidden_T`, the models' hidden sizes, when given, are checked
    against every `proj` and every loss that needs equal sizes (a `RunError` names the match). Call it as `objective(step_fraction, feats_S, feats_T, labels)` with
    `feats_*` carrying `.logits`, `.hidden` {layer: (B, L, D)}, `.scores` {block: (B, H, L, L)}
    and `.mask` (B, L); `feats_T` is one `Features` per teacher (an empty list in train mode).
    Returns `(total, terms)`: `total` a scalar tensor with gradient, `terms` the unweighted
    value of each term by name (`kd`, `hidden_mse[4->1]`, ..., `hard_label`).
    `weights(step_fraction)` gives the weight each term has at that point of training.
    """

    def __init__(
        self, distillation=None, *, hidden_S: int | None = None, hidden_T: int | None = None, task=None
    ) -> None:
        super().__init__()
        self.config = distillation
        # the task's choice of the logits the KD and hard-label terms compare (kdcli.tasks)
        self._kd_logits = task.kd_logits if task is not None else select_labelled
        # causal LMs: terms summed over the step's target tokens, from hidden states and heads
        self.token_level = bool(getattr(task, "token_level", False))
        self.kd_per_token: Callable[..., Tensor] | None = None
        #: causal LMs: the token ids the KD term compares (the smallest output head's rows; None:
        #: the heads' own sizes), so a padded vocabulary's extra rows are left out
        self.shared_vocab: int | None = None
        self.kd_options: dict = {}
        self.projections = nn.ModuleDict()
        self.matches: list[MatchPlan] = []
        self.kd_fn: Callable[..., Tensor] | None = None
        self.temperature_scheduler = None
        self.kd_weight_scheduler = None
        self.hl_weight_scheduler = None
        if distillation is None:
            return

        from kdcli.schedules import build_temperature_scheduler, build_weight_scheduler

        self.kd_fn = registry.get_loss(distillation.kd_loss_type).fn()
        self.kd_options = dict(distillation.kd_loss_options)
        if self.token_level:
            from kdcli.losses.divergences import DIVERGENCES

            self.kd_per_token = DIVERGENCES[distillation.kd_loss_type]
            self.kd_options = distillation.kd_options
        self.temperature_scheduler = build_temperature_scheduler(distillation.temperature_scheduler)
        self.kd_weight_scheduler = build_weight_scheduler(distillation.kd_loss_weight_scheduler)
        self.hl_weight_scheduler = build_weight_scheduler(distillation.hard_label_weight_scheduler)

        seen: dict[str, int] = {}
        for i, match in enumerate(distillation.intermediate_matches):
            name = term_name(match.loss, match.layer_T, match.layer_S)
            if name in seen:  # the same loss on the same layers twice: keep both, distinctly
                seen[name] += 1
                name = f"{name}#{seen[name]}"
            else:
                seen[name] = 0
            proj = getattr(match, "proj", None)
            _check_sizes(i, match, hidden_S, hidden_T)
            if proj is not None:
                from kdcli.projections import build_projection

                self.projections[str(i)] = build_projection(proj.kind, proj.dim_S, proj.dim_T)
            self.matches.append(
                MatchPlan(
                    index=i,
                    name=name,
                    feature=match.feature,
                    layers_T=_as_tuple(match.layer_T),
                    layers_S=_as_tuple(match.layer_S),
                    is_pair=isinstance(match.layer_S, (list, tuple)),
                    weight=float(match.weight),
                    loss_fn=registry.get_loss(match.loss).fn(),
                    has_proj=proj is not None,
                )
            )

    # -- what the loop needs to know ---------------------------------------------------------

    def hidden_layers(self, side: str) -> list[int]:
        """The hidden-state indices the matches read on one side ("S" or "T")."""
        return self._layers(side, "hidden")

    def attention_layers(self, side: str) -> list[int]:
        """The attention blocks whose scores the matches read on one side ("S" or "T")."""
        return self._layers(side, "attention")

    def _layers(self, side: str, feature: str) -> list[int]:
        found: set[int] = set()
        for m in self.matches:
            if m.feature == feature:
                found.update(m.layers_S if side == "S" else m.layers_T)
        return sorted(found)

    def projection_param_groups(self) -> list[dict]:
        """One optimizer parameter group per projection, with the options from `proj[3]`
        (e.g. {"lr": 1e-3}); options not given follow the optimizer's defaults."""
        groups = []
        for m in self.matches:
            if m.has_proj:
                match = self.config.intermediate_matches[m.index]
                options = dict(match.proj.options or {})
                groups.append({"params": list(self.projections[str(m.index)].parameters()), **options})
        return groups

    def weights(self, step_fraction: float) -> dict[str, float]:
        """The weight of every term at `step_fraction` (optimizer steps done / total)."""
        if self.config is None:
            return {"hard_label": 1.0}
        out = {"kd": self._kd_weight(step_fraction)}
        for m in self.matches:
            out[m.name] = m.weight
        out["hard_label"] = self._hl_weight(step_fraction)
        return out

    def _kd_weight(self, step_fraction: float) -> float:
        if self.kd_weight_scheduler is not None:
            return float(self.kd_weight_scheduler(step_fraction))
        return float(self.config.kd_loss_weight)

    def _hl_weight(self, step_fraction: float) -> float:
        if self.hl_weight_scheduler is not None:
            return float(self.hl_weight_scheduler(step_fraction))
        return float(self.config.hard_label_weight)

    # -- the loss ----------------------------------------------------------------------------

    def forward(
        self,
        step_fraction: float,
        feats_S,
        feats_T: Sequence,
        labels: Tensor | None,
        *,
        micro_batches: int = 1,
        normaliser: float | None = None,
        generated: Tensor | None = None,
    ):
        """This micro-batch's share of the step's loss: `(total, terms)` such that summing over
        the step's `micro_batches` gives the step's value. Encoders: each term is its batch mean
        divided by `micro_batches`. Causal LMs: the KD and hard-label terms are sums over the
        batch's target tokens divided by `normaliser`, the step's target tokens (over every
        micro-batch and process, divided by the process count as DDP averages), default this
        batch's; the intermediate matches are batch means divided by `micro_batches`.
        `generated` (B,) bool, causal LMs: rows whose completion was generated (on_policy); the
        hard-label term leaves their tokens out (a CE on a model's own samples teaches nothing)."""
        if feats_S.final_hidden is not None:
            hard_rows = _dataset_targets(labels, generated)
            return self._token_level(step_fraction, feats_S, feats_T, labels, micro_batches, normaliser, hard_rows)
        total, terms = self._mean_terms(step_fraction, feats_S, feats_T, labels)
        if micro_batches == 1:
            return total, terms
        return total / micro_batches, {k: v / micro_batches for k, v in terms.items()}

    def _token_level(self, step_fraction, feats_S, feats_T, labels, micro_batches: int, normaliser, hard_rows):
        from kdcli.tasks.causal_lm import target_rows

        if labels is None:
            raise RunError("causal-lm training needs the rows' labels (the target tokens), but the batch has none")
        hidden_S, targets = target_rows(feats_S, labels)
        weight_S, bias_S = feats_S.head
        distil = self.config is not None
        if distil and not feats_T:
            raise ValueError("distillation needs at least one teacher's features")
        cached = feats_T[0].top_k if distil else None  # the teacher cache's top-k, for the target rows
        teachers = [(target_rows(f, labels)[0], *f.head) for f in feats_T] if distil and cached is None else []
        settings = {
            "bias_S": bias_S,
            "divergence": self.kd_per_token or "forward_kl",
            "divergence_options": self.kd_options,
            "chunk_size": self.config.chunk_size if distil else CHUNK_SIZE,
            "temperature": float(self.config.temperature) if distil else 1.0,
            "kd_weight": self._kd_weight(step_fraction) if distil else 0.0,
            "normaliser": normaliser if normaliser is not None else max(int(targets.numel()), 1),
            "return_parts": True,
            "vocab": self.shared_vocab,
        }
        hard_weight = self._hl_weight(step_fraction) if distil else 1.0
        total, parts = _kd_and_hard_labels(
            hidden_S, weight_S, teachers, targets, hard_rows, hard_weight, cached, settings
        )
        terms = {"kd": parts["kd"]} if distil else {}
        for m in self.matches:
            value = self._match_value(m, feats_S, feats_T[0]) / micro_batches
            terms[m.name] = value
            total = total + m.weight * value
        terms["hard_label"] = parts["hard_label"]
        return total, terms

    def _match_value(self, m: MatchPlan, feats_S, first) -> Tensor:
        inter_S = [_feature(feats_S, m.feature, layer, "student") for layer in m.layers_S]
        inter_T = [_feature(first, m.feature, layer, "teacher") for layer in m.layers_T]
        if m.has_proj:
            proj = self.projections[str(m.index)]
            inter_S = [proj(s) for s in inter_S]
        if m.is_pair:
            return m.loss_fn(inter_S, inter_T, mask=feats_S.mask)
        return m.loss_fn(inter_S[0], inter_T[0], mask=feats_S.mask)

    def _mean_terms(self, step_fraction: float, feats_S, feats_T: Sequence, labels: Tensor | None):
        terms: dict[str, Tensor] = {}
        if self.config is None:
            if labels is None:
                raise RunError("training needs labels, but the batch has none")
            ce = hard_label_loss(feats_S.logits, labels)
            terms["hard_label"] = ce
            return ce, terms

        if not feats_T:
            raise ValueError("distillation needs at least one teacher's features")
        logits_S, labels_sel = self._kd_logits(feats_S.logits.float(), labels)
        teacher_logits = [self._kd_logits(f.logits.float(), labels)[0] for f in feats_T]
        logits_T = (
            teacher_logits[0] if len(teacher_logits) == 1 else cast(Tensor, sum(teacher_logits)) / len(teacher_logits)
        )
        if self.config.probability_shift:
            if labels_sel is None:
                raise RunError("probability_shift needs labels, but the batch has none")
            logits_T = probability_shift(logits_T, labels_sel)
        if self.temperature_scheduler is not None:
            temperature = self.temperature_scheduler(logits_S, logits_T, self.config.temperature)
        else:
            temperature = self.config.temperature
        assert self.kd_fn is not None  # set with the config, from the same `distillation`
        kd = self.kd_fn(logits_S, logits_T, temperature, **self.kd_options)
        terms["kd"] = kd
        total = self._kd_weight(step_fraction) * kd

        for m in self.matches:
            value = self._match_value(m, feats_S, feats_T[0])
            terms[m.name] = value
            total = total + m.weight * value

        hl_weight = self._hl_weight(step_fraction)
        if labels is not None:
            ce = hard_label_loss(feats_S.logits, labels)
            terms["hard_label"] = ce
            if hl_weight != 0.0:
                total = total + hl_weight * ce
        return total, terms


def _dataset_targets(labels: Tensor | None, generated: Tensor | None) -> Tensor | None:
    """(N,) bool over a batch's target tokens: from a dataset row (not generated); None when
    every row is a dataset row."""
    if labels is None or generated is None or not bool(generated.any()):
        return None
    from kdcli.tasks.lm_rows import next_token_labels

    keep = next_token_labels(labels) != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    return ~generated.to(labels.device)[rows[keep]]


def _kd_and_hard_labels(hidden_S, weight_S, teachers, targets, hard_rows, hard_weight, cached, settings):
    """`chunked_kd_loss` over the target rows; with generated rows (`hard_rows` False there), the
    dataset rows and the generated rows in two calls, the hard-label term on the former only
    (same normaliser: the sum is the step's)."""
    from kdcli.losses.chunked import chunked_kd_loss

    def call(rows, weight):
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        return chunked_kd_loss(
            pick(hidden_S),
            weight_S,
            [pick(h) for h, _, _ in teachers],
            [w for _, w, _ in teachers],
            bias_T=[b for _, _, b in teachers],
            hard_label_weight=weight,
            labels=pick(targets),
            cached_T=cached,
            **settings,
        )

    if hard_rows is None:
        return call(None, hard_weight)
    if cached is not None:
        raise ValueError("the teacher cache serves dataset rows only; a batch with generated rows runs the teachers")
    total, parts = call(~hard_rows, 0.0)
    if bool(hard_rows.any()):
        total_d, parts_d = call(hard_rows, hard_weight)
        return total + total_d, {"kd": parts["kd"] + parts_d["kd"], "hard_label": parts_d["hard_label"]}
    return total, {"kd": parts["kd"], "hard_label": torch.zeros_like(parts["hard_label"])}


def _check_sizes(i: int, match, hidden_S: int | None, hidden_T: int | None) -> None:
    """The models' hidden sizes against the match's proj: check-recipe's rule, refused as it words it."""
    if hidden_S is None or hidden_T is None:
        return
    at = ("distillation", "intermediate_matches", i)
    for f in proj_size_findings(at, match, hidden_S, hidden_T):
        raise RunError(f"{dotted(f.path)}: {f.message}. Fix: {f.fix}")


def _feature(feats, feature: str, layer: int, side: str) -> Tensor:
    table = feats.hidden if feature == "hidden" else feats.scores
    try:
        value = table[layer]
    except KeyError:
        raise RunError(
            f"the {side}'s {feature} layer {layer} was not captured (captured: {sorted(table)}); "
            "this is a bug in kdcli's feature capture"
        ) from None
    return value
