"""Memory per device, FLOPs per optimizer step, and what to change when a run does not fit:
arithmetic on `ModelShape`s (torch-free). docs/plan.md gives every formula and its error.

How kdcli runs (kdcli/engine/devices.py, kdcli/models/loading.py): every model's weights are
fp32; bf16/fp16 is autocast, so the student keeps fp32 weights, fp32 gradients and AdamW's two
fp32 moments (16 bytes a trainable parameter) and autocast caches a 2-byte copy of each
student weight for the forward; teachers hold fp32 weights only (inference mode, no
gradients). `ddp` replicates everything; `fsdp` shards the student's weights, gradients and
moments and the teachers' weights over the processes, and gathers one block at a time.
`training.batch_size` is per process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from kdcli.plan.params import ModelShape

#: live (rows, V) fp32 tensors of the KD loss per row besides the teachers' logits: the
#: student's logits, both log-softmaxes, the probabilities, the gradient (rough)
LOGIT_COPIES = 5
FP32 = 4


@dataclass(frozen=True)
class Setup:
    """One run as the estimates see it (every size per process)."""

    task: str
    teachers: tuple[ModelShape, ...]
    student: ModelShape
    projection_parameters: int
    batch_size: int
    max_length: int
    accumulation: int
    chunk_size: int  # causal-lm: target rows per chunk of the KD loss
    precision: str  # "fp32", "bf16" or "fp16"
    world_size: int
    parallel: str  # "ddp" or "fsdp"
    device: str = "cuda"  # "cuda" or "cpu" (SDPA falls back to its math kernel on CPU with dropout)
    classes: int = 2  # encoders: the classification head's size
    teacher_hidden_layers: int = 0  # teacher hidden states kept for intermediate matches
    attention_matches: int = 0  # (B, H, L, L) score tensors kept, per side

    @property
    def act_bytes(self) -> int:
        return FP32 if self.precision == "fp32" else 2

    @property
    def trainable(self) -> int:
        return self.student.parameters + self.projection_parameters

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_length


def block_activation_bytes(shape: ModelShape, act: int, math_attention: bool = False, length: int = 0) -> int:
    """Bytes one block saves for the backward pass, per token, fitted to what transformers 5
    saves (tests/test_plan.py counts it with saved-tensor hooks; docs/plan.md).

    BERT family (GELU MLP, dropout): act (8d + 2ff) + 2d (1-byte dropout masks), Korthikanti
    et al. 2022's 34 d at act = 2 and ff = 4d less its 5 a L attention-matrix term: SDPA's
    fused kernels keep no L x L matrix. GPT-2: its tanh GELU is composed of elementwise ops
    that keep ~5 ff: act (8d + 5ff) + 2d. Llama family (SwiGLU, no dropout): act (10d + 2 kv hd
    + 4ff): norms' inputs and outputs, q/k/v before and after the rotation, the GQA-repeated
    k and v, the attention output, gate, up, silu(gate) and their product. `math_attention`
    (SDPA's math fallback: CPU with attention dropout) adds the probabilities, the dropout
    mask and output and the scaled q, k: act (3 a L + 2d).
    """
    d, ff = shape.hidden, shape.intermediate
    if shape.family == "decoder":
        per_token = act * (10 * d + 2 * shape.kv_heads * shape.head_dim + 4 * ff)
    else:
        per_token = act * (8 * d + (5 if shape.family == "gpt2" else 2) * ff) + 2 * d
    if math_attention and shape.attention_dropout:
        per_token += act * (3 * shape.heads * length + 2 * d)
    return per_token


def student_activation_bytes(setup: Setup) -> int:
    """The student's saved activations: every block, the embeddings' and final outputs. The
    gradients formed during the backward pass take about what it frees (measured: docs/plan.md)."""
    s, act = setup.student, setup.act_bytes
    block = block_activation_bytes(s, act, setup.device == "cpu", setup.max_length)
    per_token = s.layers * block + 2 * act * s.hidden
    scores = setup.attention_matches * setup.batch_size * s.heads * setup.max_length**2 * act
    return setup.tokens * per_token + scores


def teacher_activation_bytes(setup: Setup) -> int:
    """The teachers' forward under inference mode: one block's working set (the largest
    teacher), the hidden states kept for matches, and (causal-lm) each final hidden state."""
    if not setup.teachers:
        return 0
    act = setup.act_bytes
    working = max(act * (4 * t.hidden + 3 * t.intermediate) for t in setup.teachers)
    widest = max(t.hidden for t in setup.teachers)
    kept = setup.teacher_hidden_layers * widest * act
    if setup.task == "causal-lm":
        kept += sum(t.hidden for t in setup.teachers) * FP32
    scores = setup.attention_matches * setup.batch_size * max(t.heads for t in setup.teachers) * setup.max_length**2
    return setup.tokens * (working + kept) + scores * act


def kd_logit_bytes(setup: Setup) -> dict[str, int | None]:
    """The KD term's logits. causal-lm, chunked (kdcli): chunk_size rows x V x 4 bytes x
    (5 + teachers) live copies, plus the fp32 accumulators of the student head's and hidden
    states' gradients; a full-logits implementation: every row at once. Encoders: full
    logits of C classes (a row per example, or per token for token classification)."""
    n_teachers = max(len(setup.teachers), 1)
    copies = LOGIT_COPIES + n_teachers
    if setup.task == "causal-lm":
        s = setup.student
        rows = min(setup.chunk_size, setup.tokens)
        chunked = rows * s.vocab * FP32 * copies + FP32 * s.hidden * (s.vocab + setup.tokens)
        return {"chunked": chunked, "full": setup.tokens * s.vocab * FP32 * copies}
    rows = setup.tokens if setup.task == "token-classification" else setup.batch_size
    return {"chunked": None, "full": rows * setup.classes * FP32 * copies}


def memory(setup: Setup) -> dict[str, int]:
    """Bytes per device by part, and their `total`."""
    shard = setup.world_size if setup.parallel == "fsdp" else 1
    trainable = math.ceil(setup.trainable / shard)
    teachers = math.ceil(sum(t.parameters for t in setup.teachers) / shard)
    parts = {
        "student_weights": FP32 * trainable,
        "student_gradients": FP32 * trainable,
        "optimizer_states": 2 * FP32 * trainable,
        "teacher_weights": FP32 * teachers,
        "autocast_weight_copies": 0 if setup.precision == "fp32" else 2 * trainable,
        "fsdp_gathered_block": 0,
        "student_activations": student_activation_bytes(setup),
        "teacher_activations": teacher_activation_bytes(setup),
    }
    if setup.parallel == "fsdp" and setup.world_size > 1:
        biggest_teacher_block = max((t.block_parameters for t in setup.teachers), default=0)
        parts["fsdp_gathered_block"] = FP32 * (2 * setup.student.block_parameters + biggest_teacher_block)
    logits = kd_logit_bytes(setup)
    parts["kd_logits"] = logits["chunked"] if logits["chunked"] is not None else logits["full"]
    parts["total"] = sum(parts.values())
    return parts


def flops(setup: Setup) -> dict[str, int | bool]:
    """FLOPs of one optimizer step: 2 N_T per token for each teacher's forward, 6 N_S for the
    student's forward and backward (N: parameters a token multiplies by, embeddings and LM
    heads apart), and causal-lm heads on target tokens: 2 V d per teacher, 6 V d for the
    student. Every position counts as a target: an upper bound (padding, prompts)."""
    tokens = setup.tokens * setup.accumulation
    teacher = sum(2 * t.body_parameters for t in setup.teachers) * tokens
    student = 6 * (setup.student.body_parameters + setup.projection_parameters) * tokens
    heads = 0
    if setup.task == "causal-lm":
        heads = (
            sum(2 * t.vocab * t.hidden for t in setup.teachers) + 6 * setup.student.vocab * setup.student.hidden
        ) * tokens
    per_device = teacher + student + heads
    return {
        "tokens_per_device": tokens,
        "tokens": tokens * setup.world_size,
        "teacher_forward": teacher * setup.world_size,
        "student_forward_backward": student * setup.world_size,
        "heads": heads * setup.world_size,
        "per_device": per_device,
        "total": per_device * setup.world_size,
        "upper_bound": True,
    }


def _fits(setup: Setup, limit: int) -> bool:
    return memory(setup)["total"] <= limit


def _largest(low: int, high: int, fits) -> int | None:
    """The largest n in [low, high] with fits(n) (fits is monotone: true up to some n)."""
    if high < low or not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def suggestions(setup: Setup, limit: int) -> list[dict]:
    """What to change, in order, when the run does not fit `limit` bytes per device: each with
    the value that makes it fit alone, or `fits: false` when none does."""
    out: list[dict] = []
    b = _largest(1, setup.batch_size - 1, lambda n: _fits(replace(setup, batch_size=n), limit))
    examples = setup.batch_size * setup.accumulation
    if b is not None:
        out.append(
            {
                "change": "batch_size",
                "fits": True,
                "batch_size": b,
                "gradient_accumulation_steps": math.ceil(examples / b),
                "text": f"training.batch_size {b} with gradient_accumulation_steps {math.ceil(examples / b)}"
                f" (about the same {examples} examples a step)",
            }
        )
    else:
        out.append({"change": "batch_size", "fits": False, "text": "no batch_size fits alone, not even 1"})
    length = _largest(1, setup.max_length - 1, lambda n: _fits(replace(setup, max_length=n), limit))
    out.append(
        {"change": "max_length", "fits": True, "max_length": length, "text": f"data.max_length {length}"}
        if length is not None
        else {"change": "max_length", "fits": False, "text": "no max_length fits alone"}
    )
    start = max(setup.world_size, 2) if setup.parallel == "fsdp" else max(setup.world_size, 1)
    procs = next(
        (n for n in range(start, 4097) if _fits(replace(setup, parallel="fsdp", world_size=n), limit)),
        None,
    )
    out.append(
        {"change": "fsdp", "fits": True, "world_size": procs, "text": f"fsdp over {procs} processes"}
        if procs is not None
        else {"change": "fsdp", "fits": False, "text": "fsdp does not fit on up to 4096 processes"}
    )
    if setup.task == "causal-lm" and setup.chunk_size > 1:
        chunk = _largest(1, setup.chunk_size - 1, lambda n: _fits(replace(setup, chunk_size=n), limit))
        out.append(
            {"change": "chunk_size", "fits": True, "chunk_size": chunk, "text": f"distillation.chunk_size {chunk}"}
            if chunk is not None
            else {"change": "chunk_size", "fits": False, "text": "no chunk_size fits alone"}
        )
    return out
