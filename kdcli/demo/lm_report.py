"""The LM demo's figures and how they are shown: one model's row, the targets it is judged by
(student vs controls, the spread between control seeds), and the rich tables."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table

#: tokens each greedy answer may have (the table says it)
MAX_NEW_TOKENS = 60


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
    file_mb: float | None
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


# --- stages -----------------------------------------------------------------------------


def targets(figures: dict[str, Figures]) -> dict[str, dict]:
    """Issue 11's targets: the distilled student beats the control on KL and top-1 agreement by
    more than the spread between the two control seeds; perplexity is reported, not a target."""
    s, c1, c2 = figures["student"], figures["control"], figures["control2"]
    out = {}
    for name, lower in (("kl", True), ("top1_agreement", False)):
        a, b1, b2 = getattr(s, name), getattr(c1, name), getattr(c2, name)
        spread = abs(b1 - b2)
        margin = (min(b1, b2) - a) if lower else (a - max(b1, b2))
        out[f"beats_controls_on_{name}"] = {
            "student": a,
            "controls": [b1, b2],
            "margin": margin,
            "control_spread": spread,
            "met": margin > spread,
        }
    return out


def table(figures: dict[str, Figures], rows: int, max_new_tokens: int = MAX_NEW_TOKENS) -> Table:
    out = Table(
        title=f"GSM8K eval rows ({rows} conversations, {figures['teacher'].tokens} answer tokens): teacher vs students",
        caption="KL: mean per-token KL(teacher || model) on the reference answers; top-1: share of answer tokens "
        "where the model's most likely next token is the teacher's; ppl: perplexity of the reference answers; "
        f"tok/s: CPU greedy generation, batch 1, at most {max_new_tokens} new tokens",
    )
    for name, justify in (
        ("model", "left"),
        ("KL", "right"),
        ("top-1", "right"),
        ("ppl", "right"),
        ("params", "right"),
        ("file MB", "right"),
        ("tok/s", "right"),
        ("trained", "right"),
    ):
        out.add_column(name, justify=justify, no_wrap=name == "model")
    for f in figures.values():
        out.add_row(
            f.title,
            "-" if f.kl is None else f"{f.kl:.3f}",
            "-" if f.top1_agreement is None else f"{100 * f.top1_agreement:.1f}%",
            f"{f.perplexity:.2f}",
            f"{f.parameters / 1e6:.1f} M",
            "-" if f.file_mb is None else f"{f.file_mb:.0f}",
            "-" if f.tokens_per_s is None else f"{f.tokens_per_s:.1f}",
            "reused" if f.reused else ("-" if f.train_s is None else f"{f.train_s:.0f} s"),
        )
    return out


def answers_table(answers: Answers, titles: dict[str, str]) -> Table:
    out = Table(
        title=f"Greedy answers to {len(answers.questions)} eval questions (at most {answers.max_new_tokens} tokens)"
    )
    out.add_column("question", ratio=2)
    for key in answers.by_model:
        out.add_column(titles[key], ratio=3)
    for i, question in enumerate(answers.questions):
        out.add_row(question, *(answers.by_model[k][i] for k in answers.by_model))
    return out
