"""The plan as rich tables: models, memory per device by part (ddp vs fsdp), FLOPs, fits?"""

from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdcli.errors import printable


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def human_count(n: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def render_plan(doc: dict, console: Console) -> None:
    if not console.is_terminal and not os.environ.get("COLUMNS"):  # a file or pipe: wide tables
        console = Console(width=160, soft_wrap=True)
    s = doc["settings"]
    models = Table(title=f"kdcli plan: {escape(printable(doc['recipe']))} ({doc['task']})", title_justify="left")
    for column in ("role", "model", "type", "layers x hidden", "heads (kv)", "ffn", "vocab", "parameters"):
        models.add_column(column, overflow="fold")
    for m in doc["models"]:
        models.add_row(
            m["role"],
            escape(printable(str(m["ref"]))),
            m["model_type"],
            f"{m['layers']} x {m['hidden_size']}",
            f"{m['heads']} ({m['kv_heads']})",
            str(m["intermediate_size"]),
            str(m["vocab_size"]),
            f"{m['parameters']:,}",
        )
    console.print(models)
    head = (
        f"Memory per device: {s['world_size']} process(es), batch {s['batch_size_per_process']} x "
        f"{s['max_length']} tokens, {s['precision']} autocast (fp32 weights), {s['attention']}"
    )
    memory = Table(title=head, title_justify="left")
    memory.add_column("part")
    for strategy in ("ddp", "fsdp"):
        memory.add_column(strategy + (" (chosen)" if strategy == s["parallel"] else ""), justify="right")
    for part in doc["memory_per_device"]["ddp"]:
        memory.add_row(
            part.replace("_", " "), *(human_bytes(doc["memory_per_device"][p][part]) for p in ("ddp", "fsdp"))
        )
    console.print(memory)
    kd = doc["kd_logits"]
    console.print(f"KD logits: chunked (kdcli) {human_bytes(kd['chunked'])}, full logits {human_bytes(kd['full'])}")
    f = doc["flops_per_step"]
    console.print(
        f"FLOPs per optimizer step (upper bound, every position a target): {human_count(f['total'])} "
        f"(teacher forward {human_count(f['teacher_forward'])}, student fwd+bwd "
        f"{human_count(f['student_forward_backward'])}, heads {human_count(f['heads'])}; "
        f"{f['tokens']:,} tokens)"
    )
    generation = doc.get("generation")
    if generation is not None:
        parts = ", ".join(
            f"{m['role']} {m['rows_per_process']} rows: KV cache {human_bytes(m['kv_cache_bytes'])}, "
            f"{human_count(m['flops_per_process'])} FLOPs"
            for m in generation["models"]
        )
        console.print(
            f"On-policy generation per step (upper bound, {generation['max_new_tokens']} new tokens each, before "
            f"the forward passes): {parts}; peak {human_bytes(generation['peak_bytes'])}, "
            f"{human_count(generation['flops_per_step'])} FLOPs in all"
        )
    if doc.get("teacher_cache_bytes") is not None:
        console.print(f"Teacher cache on disk: at most {human_bytes(doc['teacher_cache_bytes'])}")
    if doc["fits"] is None:
        console.print("Fits? pass --device-memory (e.g. 80GiB) to know.")
        return
    total = doc["memory_per_device"][s["parallel"]]["total"]
    verdict = "[green]fits[/]" if doc["fits"] else "[red]does not fit[/]"
    console.print(f"Fits? {verdict}: {human_bytes(total)} of {human_bytes(doc['device_memory'])} per device")
    for i, sug in enumerate(doc["suggestions"], 1):
        console.print(f"  {i}. {sug['text']}")
