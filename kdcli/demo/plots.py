"""The LM demo's eval curves: KL and perplexity against steps from a run's metrics.jsonl, drawn
as a PNG by a small pure-Python writer (zlib + struct; no matplotlib)."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path


def eval_curves(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """{"kl": [(step, value)...], "perplexity": [...]} from a run's metrics.jsonl eval records."""
    out: dict[str, list[tuple[int, float]]] = {"kl": [], "perplexity": []}
    if not metrics_file.is_file():
        return out
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        for name, points in out.items():
            value = record.get(f"eval/{name}")
            if isinstance(value, (int, float)) and math.isfinite(value):
                points.append((int(record["step"]), float(value)))
    return out


#: 3 x 5 pixel glyphs (rows of 3 bits) for the plot's labels
_GLYPHS = {
    "0": "111101101101111",
    "1": "010110010010111",
    "2": "111001111100111",
    "3": "111001111001111",
    "4": "101101111001001",
    "5": "111100111001111",
    "6": "111100111101111",
    "7": "111001001001001",
    "8": "111101111101111",
    "9": "111101111001111",
    ".": "000000000000010",
    "-": "000000111000000",
    " ": "000000000000000",
    "(": "010100100100010",
    ")": "010001001001010",
    "|": "010010010010010",
    "A": "010101111101101",
    "B": "110101110101110",
    "F": "111100110100100",
    "H": "101101111101101",
    "M": "101111111101101",
    "W": "101101111111101",
    "X": "101101010101101",
    "Y": "101101010010010",
    "C": "111100100100111",
    "D": "110101101101110",
    "E": "111100111100111",
    "G": "111100101101111",
    "I": "111010010010111",
    "K": "101101110101101",
    "L": "100100100100111",
    "N": "110101101101101",
    "O": "111101101101111",
    "P": "111101111100100",
    "R": "110101110101101",
    "S": "111100111001111",
    "T": "111010010010010",
    "U": "101101101101111",
    "V": "101101101101010",
}


class Canvas:
    """An RGB raster with lines, rectangles and 3 x 5 pixel text, saved as PNG (zlib + struct)."""

    def __init__(self, width: int, height: int, background=(255, 255, 255)) -> None:
        self.width, self.height = width, height
        self.pixels = [bytearray(bytes(background) * width) for _ in range(height)]

    def dot(self, x: int, y: int, color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            self.pixels[y][3 * x : 3 * x + 3] = bytes(color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
        steps = max(1, int(max(abs(x1 - x0), abs(y1 - y0))))
        for i in range(steps + 1):
            x, y = x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps
            for dx in range(width):
                for dy in range(width):
                    self.dot(round(x) + dx - width // 2, round(y) + dy - width // 2, color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        for y in range(y0, y1):
            for x in range(x0, x1):
                self.dot(x, y, color)

    def text(self, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 2) -> None:
        for k, ch in enumerate(s.upper()):
            glyph = _GLYPHS.get(ch, _GLYPHS[" "])
            for i, bit in enumerate(glyph):
                if bit == "1":
                    gx, gy = x + k * 4 * scale + (i % 3) * scale, y + (i // 3) * scale
                    self.rect(gx, gy, gx + scale, gy + scale, color)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        raw = b"".join(b"\x00" + bytes(row) for row in self.pixels)
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        )


COLORS = {"student": (214, 39, 40), "control": (31, 119, 180), "control2": (120, 170, 220), "teacher": (90, 90, 90)}


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path, teacher_ppl: float | None) -> None:
    """Two panels, eval KL and eval perplexity against the step, one line per run (the
    controls have no teacher in their runs, so no KL curve); the teacher's perplexity dashed."""
    width, height, panel_w = 900, 380, 400
    canvas = Canvas(width, height)
    for p, metric in enumerate(("kl", "perplexity")):
        x0, y0, w, h = 60 + p * (panel_w + 50), 40, panel_w - 40, height - 110
        series = {k: c[metric] for k, c in curves.items() if c[metric]}
        values = [v for pts in series.values() for _, v in pts]
        if metric == "perplexity" and teacher_ppl is not None:
            values.append(teacher_ppl)
        steps = [s for pts in series.values() for s, _ in pts]
        canvas.text(x0, 12, "EVAL KL (TEACHER|MODEL)" if metric == "kl" else "EVAL PERPLEXITY")
        canvas.line(x0, y0, x0, y0 + h, (0, 0, 0))
        canvas.line(x0, y0 + h, x0 + w, y0 + h, (0, 0, 0))
        canvas.text(x0 + w - 40, y0 + h + 22, "STEP")
        if not values:
            continue
        lo, hi = 0.0, max(values) * 1.1
        if metric == "perplexity":
            lo = min(values) * 0.9
        last = max(steps) if steps else 1

        def xy(step: float, v: float, x0=x0, y0=y0, w=w, h=h, lo=lo, hi=hi, last=last) -> tuple[float, float]:
            return x0 + w * step / max(last, 1), y0 + h - h * (v - lo) / max(hi - lo, 1e-12)

        for i in range(5):  # y ticks
            v = lo + (hi - lo) * i / 4
            _, y = xy(0, v)
            canvas.line(x0 - 4, y, x0, y, (0, 0, 0))
            canvas.text(x0 - 56, int(y) - 5, f"{v:.2f}"[:5])
        for s in sorted(set(steps)):
            x, _ = xy(s, lo)
            canvas.line(x, y0 + h, x, y0 + h + 4, (0, 0, 0))
            canvas.text(int(x) - 6, y0 + h + 8, str(s))
        if metric == "perplexity" and teacher_ppl is not None:
            _, y = xy(0, teacher_ppl)
            for x in range(x0, x0 + w, 12):
                canvas.line(x, y, x + 6, y, COLORS["teacher"])
        for key, pts in series.items():
            color = COLORS.get(key, (0, 0, 0))
            for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
                canvas.line(*xy(s0, v0), *xy(s1, v1), color, width=3)
            for s, v in pts:
                x, y = xy(s, v)
                canvas.rect(int(x) - 3, int(y) - 3, int(x) + 4, int(y) + 4, color)
    legend = [("student", "DISTILLED"), ("control", "CONTROL"), ("control2", "CONTROL SEED 1"), ("teacher", "TEACHER")]
    x = 60
    for key, label in legend:
        canvas.rect(x, height - 30, x + 16, height - 20, COLORS[key])
        canvas.text(x + 22, height - 30, label)
        x += 40 + len(label) * 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canvas.png())


# --- main -------------------------------------------------------------------------------
