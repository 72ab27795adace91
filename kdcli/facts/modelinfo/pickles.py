"""Pickled weights (pytorch_model.bin) inspected without unpickling: what they call."""

from __future__ import annotations

from pathlib import Path

from kdcli.facts.modelinfo.weights import MAX_HEADER_BYTES, SAFETENSORS_FILE, SAFETENSORS_INDEX, WeightsUnreadable

#: what a plain tensor pickle calls (torch's weights-only loader accepts these and little else)
_SAFE_GLOBAL_MODULES = ("torch", "collections", "_codecs")
_SAFE_BUILTINS = {
    "set",
    "frozenset",
    "bytearray",
    "bytes",
    "dict",
    "list",
    "tuple",
    "int",
    "float",
    "bool",
    "complex",
    "slice",
}


def pickle_calls(path: str | Path) -> list[str]:
    """The callables (`module.name`) a PyTorch zip checkpoint's pickle would import beyond
    plain tensors, found by reading its opcodes (`pickletools`: nothing is unpickled); [] for a
    plain tensor pickle. `WeightsUnreadable` when the file is neither a zip checkpoint nor a
    legacy pickle (damaged, truncated, random bytes)."""
    import pickletools
    import zipfile

    path = Path(path)
    try:
        with open(path, "rb") as f:
            start = f.read(2)
        if not zipfile.is_zipfile(path):
            if start[:1] == b"\x80":  # a legacy (pre-zip) torch.save pickle: not inspected
                return []
            raise WeightsUnreadable(f"{path} is damaged or not a PyTorch checkpoint (not a zip archive)")
        with zipfile.ZipFile(path) as archive:
            infos = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
            if not infos:
                raise WeightsUnreadable(f"{path} is not a PyTorch checkpoint (no data.pkl inside)")
            if infos[0].file_size > MAX_HEADER_BYTES:  # tensors are stored beside it, not in it
                raise WeightsUnreadable(
                    f"{path} is not a plain PyTorch checkpoint (its data.pkl is {infos[0].file_size} bytes)"
                )
            data = archive.read(infos[0])
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise WeightsUnreadable(f"{path} is damaged or truncated ({type(exc).__name__})") from None
    calls: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                module, name = strings[-2], strings[-1]
            else:
                continue
            safe = module.split(".")[0] in _SAFE_GLOBAL_MODULES or (module == "builtins" and name in _SAFE_BUILTINS)
            if not safe and f"{module}.{name}" not in calls:
                calls.append(f"{module}.{name}")
    except Exception:  # pickletools' errors on damaged opcodes are of several kinds
        raise WeightsUnreadable(f"{path} is damaged (its pickle cannot be read)") from None
    return calls


def pickled_weight_files(folder: str | Path) -> list[Path]:
    """The pytorch_model*.bin files of a folder without safetensors weights (what transformers
    would unpickle)."""
    folder = Path(folder)
    if (folder / SAFETENSORS_FILE).is_file() or (folder / SAFETENSORS_INDEX).is_file():
        return []
    return sorted(folder.glob("pytorch_model*.bin"))


#: how to fix weights kdcli refuses to unpickle
PICKLE_FIX = (
    "convert it to model.safetensors where you trust it (save_pretrained(..., "
    "safe_serialization=True)), or get model.safetensors from its source"
)


def refused_pickle(name: str, calls: list[str]) -> str:
    """The clause for a pickle that calls more than tensor constructors."""
    shown = ", ".join(calls[:3]) + (", ..." if len(calls) > 3 else "")
    return f"refused to unpickle {name}: it calls {shown} beyond plain tensors, and a pickle runs what it calls when it is loaded"


def check_pickles(folder: str | Path) -> None:
    """`WeightsUnreadable` for a folder whose pickled weights are damaged or call more than
    tensor constructors (no unpickling: `pickle_calls`); nothing for safetensors folders."""
    for path in pickled_weight_files(folder):
        calls = pickle_calls(path)
        if calls:
            error = WeightsUnreadable(refused_pickle(path.name, calls))
            error.fix = PICKLE_FIX
            raise error
