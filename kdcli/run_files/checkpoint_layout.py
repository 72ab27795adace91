"""Where checkpoints live inside an output folder, and which of them are complete. Torch-free:
the output-folder guard (kdcli.run_files.outdir) and the checkpoint writer (kdcli.run_files.checkpoint) both read it.

    <output>/checkpoints/step-N/state.pt    the state (torch.save, read with weights_only=True)
    <output>/checkpoints/step-N/meta.json   the data position, written last

A folder is complete when it holds both files; temporary folders (`.step-N.*`) never match.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders are ignored)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file() and (child / META_FILE).is_file():
            found.append((int(m.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None
