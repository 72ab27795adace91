"""The LM demo's figures and how they are shown: one model's row, the targets it is judged by
(issue 20: KD arms vs the control seeds' spread, on-policy vs off-policy generation, size,
GGUF fidelity, time), and the rich tables."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table

#: tokens each greedy answer may have (the table says it)
MAX_NEW_TOKENS = 96
#: the demo's size and fidelity targets
MAX_PARAMETER_SHARE = 0.6
MAX_GGUF_KL_GAP = 0.02
MAX_WALL_S = 20 * 60
KD_ARMS = ("offpolicy", "onpolicy")
CONTROLS = ("control", "control2")


@dataclass
class Figures:
    """What the table shows for one model."""

    key: str
    title: str
    kl: float | None
    top1_agreement: float | None
    perplexity: float
    tokens: int
    parameters: int
    non_embedding_parameters: int
    file_mb: float | None = None
    gguf_mb: float | None = None
    on_policy_kl: float | None = None
    repetition_4gram: float | None = None
    ended: float | None = None
    mean_length: float | None = None
    tokens_per_s: float | None = None
    train_s: float | None = None
    reused: bool = False
    folder: str | None = None


@dataclass
class Answers:
    max_new_tokens: int = MAX_NEW_TOKENS
    questions: list[str] = field(default_factory=list)
    by_model: dict[str, list[str]] = field(default_factory=dict)
    #: the untrained student and the teacher on the rows of the runs' evals (the curves' start)
    step0: dict[str, float] = field(default_factory=dict)
    teacher_curve: dict[str, float] = field(default_factory=dict)


def _beyond(arm: float, controls: list[float], lower: bool) -> dict:
    spread = abs(controls[0] - controls[1])
    margin = (min(controls) - arm) if lower else (arm - max(controls))
    return {"arm": arm, "versus": controls, "margin": margin, "spread": spread, "met": margin > spread}


def targets(figures: dict[str, Figures], wall_s: float, *, trained: bool = True) -> dict[str, dict]:
    """Issue 20's targets, each with its figures and `met`. The noise measure of every
    comparison is the spread between the two control seeds (the only repeated arm). Without
    `trained` (some runs reused) the wall time leaves training out and is not judged."""
    out: dict[str, dict] = {}
    controls = [figures[k] for k in CONTROLS]
    for arm in KD_ARMS:
        for name, lower in (("kl", True), ("top1_agreement", False)):
            out[f"{arm}_beats_controls_on_{name}"] = _beyond(
                getattr(figures[arm], name), [getattr(c, name) for c in controls], lower
            )
    on, off = figures["onpolicy"], figures["offpolicy"]
    for name, lower in (("repetition_4gram", True), ("ended", False)):
        spread = abs(getattr(controls[0], name) - getattr(controls[1], name))
        a, b = getattr(on, name), getattr(off, name)
        margin = (b - a) if lower else (a - b)
        out[f"onpolicy_beats_offpolicy_on_{name}"] = {
            "arm": a,
            "versus": [b],
            "margin": margin,
            "spread": spread,
            "met": margin > spread,
        }
    share = on.non_embedding_parameters / figures["teacher"].non_embedding_parameters
    out["student_non_embedding_share"] = {
        "arm": share,
        "limit": MAX_PARAMETER_SHARE,
        "met": share <= MAX_PARAMETER_SHARE,
    }
    if "gguf" in figures:
        gap = abs(figures["gguf"].kl - on.kl)
        out["gguf_q8_0_kl_gap"] = {"arm": gap, "limit": MAX_GGUF_KL_GAP, "met": gap <= MAX_GGUF_KL_GAP}
    out["wall_s"] = {"arm": wall_s, "limit": MAX_WALL_S, "met": trained and wall_s <= MAX_WALL_S}
    if not trained:
        out["wall_s"]["note"] = "runs reused (--reuse): the training time is not in this figure"
    return out


def target_line(name: str, result: dict) -> str:
    """One target as a line: its figures and met / missed."""
    mark = "[green]met[/]" if result["met"] else "[bold red]missed[/]"
    if "versus" in result:
        versus = " / ".join(f"{v:.4f}" for v in result["versus"])
        return (
            f"target {name.replace('_', ' ')}: {mark} ({result['arm']:.4f} vs {versus}: margin "
            f"{result['margin']:.4f}, control seeds' spread {result['spread']:.4f})"
        )
    note = f"; {result['note']}" if "note" in result else ""
    return f"target {name.replace('_', ' ')}: {mark} ({result['arm']:.4f}, limit {result['limit']}{note})"


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = (
    "model",
    "KL",
    "top-1",
    "ppl",
    "on-pol KL",
    "rep 4g",
    "ended",
    "len",
    "params",
    "non-emb",
    "MB",
    "tok/s",
    "trained",
)


def table(figures: dict[str, Figures], rows: int, gen_rows: int, max_new_tokens: int = MAX_NEW_TOKENS) -> Table:
    out = Table(
        title=f"GSM8K eval rows ({rows} conversations, {figures['teacher'].tokens} answer tokens): teacher vs students",
        caption="KL: mean per-token KL(teacher || model) on the reference answers; top-1: share of answer tokens "
        "where the model's most likely next token is the teacher's; ppl: perplexity of the reference answers; "
        f"on the first {gen_rows} eval prompts, at most {max_new_tokens} new tokens: on-pol KL on the model's own "
        "sampled completions, rep 4g / ended / len of its greedy ones; non-emb: parameters outside the embeddings; "
        "MB: the file (bf16 safetensors; GGUF); tok/s: CPU greedy generation of those prompts, one batch",
    )
    for name in COLUMNS:
        out.add_column(name, justify="left" if name == "model" else "right", no_wrap=name == "model")
    for f in figures.values():
        size = f.gguf_mb if f.gguf_mb is not None else f.file_mb
        out.add_row(
            f.title,
            _cell(f.kl, ".3f"),
            "-" if f.top1_agreement is None else f"{100 * f.top1_agreement:.1f}%",
            f"{f.perplexity:.2f}",
            _cell(f.on_policy_kl, ".3f"),
            _cell(f.repetition_4gram, ".3f"),
            "-" if f.ended is None else f"{100 * f.ended:.0f}%",
            _cell(f.mean_length, ".0f"),
            f"{f.parameters / 1e6:.1f} M",
            f"{f.non_embedding_parameters / 1e6:.1f} M",
            _cell(size, ".0f"),
            _cell(f.tokens_per_s, ".1f"),
            "reused" if f.reused else ("-" if f.train_s is None else f"{f.train_s:.0f} s"),
        )
    return out


def answers_table(answers: Answers, titles: dict[str, str]) -> Table:
    """The questions and the greedy answers of the models named in `titles`."""
    out = Table(
        title=f"Greedy answers to {len(answers.questions)} eval questions (at most {answers.max_new_tokens} tokens)"
    )
    out.add_column("question", ratio=2)
    keys = [k for k in titles if k in answers.by_model]
    for key in keys:
        out.add_column(titles[key], ratio=3)
    for i, question in enumerate(answers.questions):
        out.add_row(question, *(answers.by_model[k][i] for k in keys))
    return out
