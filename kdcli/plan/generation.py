"""`distillation.on_policy` in `kdcli plan`: the KV cache and the FLOPs of a step's generation
(torch-free). Generation runs before the step's forward and backward passes (its KV cache is
freed by then), so its memory is a peak of its own, reported beside the training peak.

Per process and optimizer step, a model generating for `rows` rows (at most
ceil(share x batch_size x accumulation): the rows are drawn per step) holds, with every row at
its longest (prompt + completion = data.max_length):

    KV cache   = 2 (keys, values) x layers x kv_heads x head_dim x max_length x rows x act bytes
    logits     = rows x V x 4 bytes x 2 (the last position's logits and the sampling's copy)
    FLOPs      = rows x [2 N_body x max_length                      (every position once, KV cache)
                         + 2 V d x max_new_tokens                   (the head on each new token)
                         + 2 x 2 x layers x heads x head_dim x max_length^2 / 2]  (attention to the cache)

an upper bound: completions that end before max_new_tokens cost less.
"""

from __future__ import annotations

import math

from kdcli.plan.params import ModelShape

FP32 = 4


def rows_generated(share: float, batch_size: int, accumulation: int) -> int:
    """The most rows of one process's step a share of rows gets."""
    return math.ceil(share * batch_size * accumulation)


def kv_cache_bytes(shape: ModelShape, rows: int, length: int, act_bytes: int) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * length * rows * act_bytes


def generation_flops(shape: ModelShape, rows: int, length: int, new_tokens: int) -> int:
    body = 2 * shape.body_parameters * length
    head = 2 * shape.vocab * shape.hidden * new_tokens
    attention = 2 * shape.layers * shape.heads * shape.head_dim * length * length
    return rows * (body + head + attention)


def generation_plan(
    on_policy,
    student: ModelShape,
    teacher: ModelShape | None,
    *,
    batch_size: int,
    accumulation: int,
    max_length: int,
    act_bytes: int,
    world_size: int,
) -> dict | None:
    """The generation block of the plan (None without on_policy or with both shares 0)."""
    if on_policy is None or not on_policy.generates:
        return None
    out: dict = {"max_new_tokens": on_policy.max_new_tokens, "models": []}
    total_flops = 0
    peak = 0
    for role, shape, share in (
        ("student", student, on_policy.student_share),
        ("teacher", teacher, on_policy.teacher_share),
    ):
        if shape is None or share <= 0:
            continue
        rows = rows_generated(share, batch_size, accumulation)
        kv = kv_cache_bytes(shape, rows, max_length, act_bytes)
        logits = rows * shape.vocab * FP32 * 2
        flops = generation_flops(shape, rows, max_length, on_policy.max_new_tokens)
        out["models"].append(
            {
                "role": role,
                "rows_per_process": rows,
                "kv_cache_bytes": kv,
                "logits_bytes": logits,
                "flops_per_process": flops,
            }
        )
        peak = max(peak, kv + logits)
        total_flops += flops
    out["peak_bytes"] = peak
    out["flops_per_step"] = total_flops * world_size
    return out
