"""The LM demo's eval curves: KL and perplexity against the step from each run's metrics.jsonl,
drawn with matplotlib (kdcli.plots; optional: without it the demo says how to get the picture)."""

from __future__ import annotations

from pathlib import Path

from kdcli.plots import Panel, PlotsUnavailable, draw, save_png
from kdcli.run_files.run_metrics import read_runs

#: the metrics drawn, and their panels' titles
METRICS = {"kl": "eval KL(teacher || model)", "perplexity": "eval perplexity of the reference answers"}
COLORS = {
    "onpolicy": "#d62728",
    "offpolicy": "#ff7f0e",
    "control": "#1f77b4",
    "control2": "#7fb0dc",
    "teacher": "#5a5a5a",
}


def eval_curves(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """{"kl": [(step, value)...], "perplexity": [...]} from a run's metrics.jsonl evaluations
    (empty lists when the file is not there)."""
    if not metrics_file.is_file():
        return {name: [] for name in METRICS}
    (run,) = read_runs([metrics_file.parent])
    return {name: run.series(f"eval/{name}") for name in METRICS}


def run_curves(metrics_files: dict[str, Path], step0: dict[str, float]) -> dict[str, dict]:
    """Each run's eval curves, starting at step 0 from the untrained student's `step0` figures
    (every run starts from it)."""
    curves = {key: eval_curves(path) for key, path in metrics_files.items()}
    for curve in curves.values():
        for name, points in curve.items():
            if points and points[0][0] != 0 and name in step0:
                points.insert(0, (0, step0[name]))
    return curves


def control_kl_curves(output_dir: Path, bench, step0: dict[str, float]) -> list[tuple[int, float]]:
    """A run without a teacher (a control) has no eval KL: its checkpoints (checkpoints/step-N),
    scored against the teacher on the runs' eval rows, from step 0 (the untrained student)."""
    from kdcli.demo.lm_bench import load_checkpoint_weights, load_folder, score
    from kdcli.run_files.checkpoint_layout import list_checkpoints

    points = [(0, step0["kl"])] if "kl" in step0 else []
    model = load_folder(output_dir)
    for folder in list_checkpoints(output_dir):
        step = int(folder.name.split("-")[1])
        points.append((step, score(load_checkpoint_weights(model, folder), bench, curve_rows=True)["kl"]))
    return points


def plot_curves(
    curves: dict[str, dict[str, list[tuple[int, float]]]],
    path: Path,
    teacher_ppl: float | None,
    names: dict[str, str] | None = None,
) -> Path:
    """Two panels, eval KL and eval perplexity against the step, one line per run (the controls'
    KL from their checkpoints), the teacher's perplexity dashed; `names`: legend text by run key."""
    panels = [
        Panel(title, {key: c.get(metric, []) for key, c in curves.items()}, markers=True)
        for metric, title in METRICS.items()
    ]
    if teacher_ppl is not None:
        panels[1].levels["teacher"] = teacher_ppl
    fig = draw(panels, colors=COLORS, names=names, level_name="teacher" if teacher_ppl is not None else "", columns=2)
    return save_png(fig, path)


def plot_or_say_why(curves: dict, path: Path, teacher_ppl: float | None, names: dict[str, str], say) -> bool:
    """`plot_curves`, or (without matplotlib) `say` how to get the picture; whether it drew."""
    try:
        plot_curves(curves, path, teacher_ppl, names)
    except PlotsUnavailable as exc:
        say(f"no curves picture: {exc}")
        return False
    return True
