"""A non-finite loss, explained: whose outputs were not finite, and the one message to print.

When a step's loss is NaN or infinite, `teacher_blame` looks at the teachers' outputs of that
micro-batch. If one teacher's are not finite, the student is not to blame (lowering
`training.learning_rate` cannot help): the message names that teacher (its recipe path and
model) or, when the outputs were read from `distillation.teacher_cache` and the teacher
computes finite ones for the same rows, the cache's folder. Only the failing step pays for it.
"""

from __future__ import annotations

from torch import Tensor

from kdcli.engine.devices import autocast
from kdcli.errors import NonFiniteLossError


def _tensors(feats) -> list[tuple[str, Tensor]]:
    """(name, tensor) of everything a teacher's `Features` carries."""
    out = [("logits", feats.logits), ("final hidden states", feats.final_hidden)]
    out += [(f"hidden layer {k}", v) for k, v in feats.hidden.items()]
    out += [(f"attention scores of block {k}", v) for k, v in feats.scores.items()]
    if feats.head is not None:
        out += [("output head", t) for t in feats.head]
    if feats.top_k is not None:  # cached log-probabilities may be -inf (underflow), never NaN or +inf
        out += [("cached top-k log-probabilities", -t) for t in (feats.top_k.log_p, feats.top_k.tail)]
    mask = feats.mask.bool() if isinstance(feats.mask, Tensor) else None
    return [
        (name, t[mask] if mask is not None and t.dim() >= 2 and t.shape[:2] == mask.shape else t)  # real tokens
        for name, t in out
        if isinstance(t, Tensor) and t.is_floating_point()
    ]


def non_finite_part(feats) -> str | None:
    """The first of a teacher's outputs holding NaN or an infinity (None when all are finite)."""
    for name, tensor in _tensors(feats):
        if name.startswith("cached"):
            bad = bool(tensor.isnan().any() or tensor.isneginf().any())
        else:
            bad = not bool(tensor.isfinite().all())
        if bad:
            return name
    return None


def teacher_name(recipe, i: int) -> str:
    path = f"teacher[{i}].model" if isinstance(recipe.teacher, list) else "teacher.model"
    return f"the teacher {recipe.teachers[i].model!r} ({path})"


def teacher_blame(run, feats_T: list, batch: dict[str, Tensor]) -> str | None:
    """Why the loss is not finite when a teacher's outputs are not (None when they are)."""
    bad = [(i, part) for i, f in enumerate(feats_T) if (part := non_finite_part(f)) is not None]
    if not bad:
        return None
    i, part = bad[0]
    who = teacher_name(run.recipe, i)
    folder = getattr(run.cache, "folder", None)  # the on-disk teacher cache (distillation.teacher_cache)
    if folder is not None and not run.sharded:  # a sharded teacher's forward needs every rank
        with autocast(run.device, run.autocast_precision):
            fresh = run.captures_T[i].run_teacher(batch)
        if non_finite_part(fresh) is None:
            return (
                f"the teacher outputs read from distillation.teacher_cache.dir ({folder}) are not finite "
                f"(its {part}), while {who} computes finite ones for the same rows. Fix: delete {folder} "
                "(the run fills it again), or fill it again with kdcli cache-teacher"
            )
    elif folder is not None:
        who += f" (or distillation.teacher_cache.dir {folder}, which stores its outputs)"
    return (
        f"{who} produces non-finite outputs (its {part} hold NaN or an infinity), so no loss can be "
        "computed from them. Fix: check the teacher's weights (a NaN or inf in its checkpoint), or "
        "run it in fp32/bf16 if it overflows in fp16; training.learning_rate plays no part"
    )


def non_finite_error(run, bad, epoch: int) -> NonFiniteLossError:
    """The message of a non-finite step (`bad`: the `NonFinite` record; None: another rank's)."""
    step = run.position.step + 1
    where = (
        f"term {bad.term} = {bad.value} at step {step}, batch {bad.batch + 1} of epoch {epoch + 1}"
        if bad is not None
        else f"on another process at step {step}"
    )
    kept = f"the last good checkpoint is {run.last_saved}" if run.last_saved else "no checkpoint had been written yet"
    if bad is not None and bad.teacher is not None:
        return NonFiniteLossError(f"the loss became non-finite ({where}): {bad.teacher}; the run stopped and {kept}")
    return NonFiniteLossError(
        f"the loss became non-finite ({where}); the run stopped and {kept}. Fix: lower "
        "training.learning_rate, raise max_grad_norm clipping, use fp32/bf16, or check the data"
        + (f"; then continue with `{run.command}`" if run.last_saved else "")
    )
