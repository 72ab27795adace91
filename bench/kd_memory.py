"""Peak memory and time of the causal-LM KD loss: `chunked_kd_loss` vs plain full logits.

    .venv/bin/python bench/kd_memory.py                      # N 1024 and 2048, V 49152, D 576, chunks 256, 1024
    .venv/bin/python bench/kd_memory.py --sizes 4096 --chunks 128 512

One forward and one backward (gradients w.r.t. the student's hidden states and head) of the
mean forward KL over N tokens, float32, teacher and student both with hidden size D and a
vocabulary of V (SmolLM-135M's shapes by default). "full" builds the (N, V) logits of both
models and calls `forward_kl` on them; "chunked" is `chunked_kd_loss` with the given chunk
size. Each case runs in a fresh subprocess: on CPU the peak is the process's max RSS
(`resource.getrusage`) after the loss minus the max RSS once the inputs exist; on CUDA,
`torch.cuda.max_memory_allocated` minus the memory allocated before the loss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcli.losses.chunked import chunked_kd_loss  # noqa: E402
from kdcli.losses.divergences import forward_kl  # noqa: E402


def _peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_case(kind: str, n: int, vocab: int, dim: int, chunk: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    make = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(device)  # noqa: E731
    h_S, W_S, h_T, W_T = (
        make(n, dim).requires_grad_(True),
        make(vocab, dim).requires_grad_(True),
        make(n, dim),
        make(vocab, dim),
    )
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_bytes()
    start = time.perf_counter()
    if kind == "full":
        loss = forward_kl(h_S @ W_S.T, h_T @ W_T.T).mean()
    else:
        loss = chunked_kd_loss(h_S, W_S, h_T, W_T, chunk_size=chunk)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_bytes()) - base
    return {"loss": loss.item(), "seconds": seconds, "peak_mib": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="token counts N")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--chunks", type=int, nargs="+", default=[256, 1024], help="chunk sizes of the chunked path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--case", nargs=5, metavar=("KIND", "N", "V", "D", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        kind, *numbers = args.case
        print(json.dumps(run_case(kind, *map(int, numbers), device=args.device)))
        return
    print(f"V = {args.vocab}, D = {args.dim}, float32, {args.device}, torch {torch.__version__}, forward + backward")
    print("| N | path | peak MiB | seconds | loss |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        for kind, chunk in [("full", 0)] + [("chunked", c) for c in args.chunks]:
            case = [kind, str(n), str(args.vocab), str(args.dim), str(chunk)]
            cmd = [sys.executable, __file__, "--device", args.device, "--case", *case]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            path = "full logits" if kind == "full" else f"chunked ({chunk})"
            print(f"| {n} | {path} | {r['peak_mib']:.0f} | {r['seconds']:.2f} | {r['loss']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
