"""Causal-LM KD loss, one step: peak memory, time and agreement of kdcli vs plain logits vs Liger.

    .venv/bin/python bench/lm_loss.py                       # the default plan (docs/benchmarks-lm.md)
    .venv/bin/python bench/lm_loss.py --shapes smollm2 --sizes 1024 2048 --repeats 3
    .venv/bin/python bench/lm_loss.py --cases smollm2:16384:kdcli:jsd:0 llama3:1024:kdcli:jsd:0  # an explicit plan
    .venv/bin/python bench/lm_loss.py --quick               # a tiny smoke run (tests/test_bench_lm_loss.py)
    .venv/bin/python bench/lm_loss.py --device cuda         # where a GPU exists

One step is the KD term of a causal LM from the two models' final hidden states (N, D) through
their output heads (V, D) to the mean loss over the N tokens and its gradients w.r.t. the
student's hidden states and head (the teacher side is constant), float32, forward + backward:

* ``kdcli``: `kdcli.losses.chunked.chunked_kd_loss` at its default chunk size (``--kdcli-chunk``);
* ``plain``: both full (N, V) logits in float32, ``log_softmax``, then ``F.kl_div`` (forward KL,
  as torchtune's and DistillKit's dense paths) or TRL's ``generalized_jsd_loss`` formula (JSD);
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (``compiled=False``, its default chunk
  size, hard-loss weight 0, soft-loss weight 1; it divides the summed loss by the number of
  target tokens, here N), when ``liger_kernel`` is installed (``make bench-lm`` installs it).

Divergences: forward KL (kdcli vs plain) and the generalized JSD with beta = 0.5 and
temperature 1 (all three; kdcli's ``jsd`` with ``normalise=False`` is TRL's and Liger's J(beta):
``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``).

Each (implementation, divergence, shape, N) runs in a fresh process (forked on CPU, spawned on
CUDA) that builds the inputs (``torch.manual_seed``, identical for every implementation), runs
one warm-up step and ``--repeats`` timed ones (the median is reported). Peak memory on CPU is
the process's peak RSS (VmHWM, what ``getrusage`` reports as ru_maxrss; reset with
``/proc/self/clear_refs`` after the inputs exist) minus the RSS after set-up; on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated after set-up. The peak includes
the gradients the step returns (hidden_S.grad, head_S.grad). The loss and d hidden_S of every
case are saved and compared afterwards: kdcli vs plain and kdcli vs Liger, |loss diff| / |ref|
and max |d hidden_S diff| / max |ref d hidden_S|.

A case whose step is estimated above ``--max-gib`` (`estimate_gib`) is skipped ("skip: estimated
..."), and each child process runs under an RLIMIT_DATA of that many GiB above its size once the
inputs exist, so that an underestimate fails the case ("oom") instead of the machine. Threads: ``torch.set_num_threads``
= the cores this process may use. The parent process runs no torch operation before its
children are done (a fork after OpenMP started can hang the child).
"""

from __future__ import annotations

import argparse
import inspect
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcli import registry  # noqa: E402
from kdcli.losses.chunked import chunked_kd_loss  # noqa: E402

try:
    import liger_kernel
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
except ImportError:  # the Liger column is skipped
    liger_kernel = LigerFusedLinearJSDLoss = None

#: name -> (vocabulary V, student hidden D_S, teacher hidden D_T)
SHAPES = {
    "smollm2": (49_152, 576, 576),  # SmolLM2-135M (the demo's shapes; student = teacher width)
    "llama3": (128_256, 4_096, 4_096),  # a Llama-3-8B-like head
    "tiny": (1_000, 32, 48),  # --quick
}
#: (implementation, divergence) in the order of the table
CASES = [("kdcli", "forward_kl"), ("plain", "forward_kl"), ("kdcli", "jsd"), ("plain", "jsd"), ("liger", "jsd")]
BETA = 0.5
TEMPERATURE = 1.0
KDCLI_CHUNK = inspect.signature(chunked_kd_loss).parameters["chunk_size"].default
LIGER_CHUNK = (
    inspect.signature(LigerFusedLinearJSDLoss.__init__).parameters["chunk_size"].default
    if LigerFusedLinearJSDLoss is not None
    else None
)
#: logits' standard deviations: student, teacher (order-one nats of divergence per token, as real models)
LOGIT_STD = (2.0, 3.0)
GIB = 2**30
MIB = 2**20


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- the implementations


def plain_loss(h_S, W_S, h_T, W_T, divergence: str):
    """Both full logits in float32, then log_softmax and F.kl_div (TRL's JSD formula for "jsd")."""
    z_S = h_S @ W_S.T
    with torch.no_grad():
        z_T = h_T @ W_T.T
    log_q = F.log_softmax(z_S / TEMPERATURE, dim=-1)
    log_p = F.log_softmax(z_T / TEMPERATURE, dim=-1)
    if divergence == "forward_kl":
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    # TRL GKDTrainer.generalized_jsd_loss, beta in (0, 1), reduction "batchmean"
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - BETA), log_p + math.log(BETA)]), dim=0)
    kl_teacher = F.kl_div(log_m, log_p, reduction="none", log_target=True)
    kl_student = F.kl_div(log_m, log_q, reduction="none", log_target=True)
    return (BETA * kl_teacher + (1 - BETA) * kl_student).sum() / h_S.shape[0]


def make_step(impl: str, divergence: str, h_S, W_S, h_T, W_T, chunk: int = KDCLI_CHUNK):
    """A closure computing the loss (a 0-dim tensor whose backward fills h_S.grad and W_S.grad)."""
    if impl == "kdcli":
        options = {"beta": BETA} if divergence == "jsd" else {}
        return lambda: chunked_kd_loss(
            h_S,
            W_S,
            h_T,
            W_T,
            divergence=registry.get_loss(divergence).token_fn(),
            divergence_options=options,
            temperature=TEMPERATURE,
            chunk_size=chunk,
        )
    if impl == "plain":
        return lambda: plain_loss(h_S, W_S, h_T, W_T, divergence)
    if impl == "liger":
        assert divergence == "jsd"
        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, temperature=TEMPERATURE, compiled=False
        )
        # every row a target: Liger divides the summed loss by their number, N
        labels = torch.zeros(h_S.shape[0], dtype=torch.long, device=h_S.device)
        return lambda: liger(h_S, W_S, h_T, W_T, labels)
    raise ValueError(impl)


# --------------------------------------------------------------------------- one case (child process)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def make_inputs(shape: str, n: int, device: str):
    """Identical for every implementation: seeded, logits of std LOGIT_STD, built in place (no temporaries)."""
    vocab, d_S, d_T = SHAPES[shape]
    torch.manual_seed(0)
    h_S = torch.empty(n, d_S).normal_()
    W_S = torch.empty(vocab, d_S).normal_(0.0, LOGIT_STD[0] / math.sqrt(d_S))
    h_T = torch.empty(n, d_T).normal_()
    W_T = torch.empty(vocab, d_T).normal_(0.0, LOGIT_STD[1] / math.sqrt(d_T))
    return [x.to(device) for x in (h_S, W_S, h_T, W_T)]


def run_case(impl, divergence, shape, n, device, repeats, max_gib, threads, chunk, grad_path, conn) -> None:
    """In a fresh process: set up, warm up, time; send a dict through conn."""
    try:
        torch.set_num_threads(threads)
        cuda = device.startswith("cuda")
        h_S, W_S, h_T, W_T = make_inputs(shape, n, device)
        if not cuda and max_gib:
            try:  # a cap on the heap + anonymous mappings: an underestimated case fails, not the machine
                cap = _status_kib("VmData") * 1024 + int(max_gib * GIB)
                resource.setrlimit(resource.RLIMIT_DATA, (cap, resource.getrlimit(resource.RLIMIT_DATA)[1]))
            except (OSError, KeyError, ValueError):
                pass
        h_S.requires_grad_(True)
        W_S.requires_grad_(True)
        step = make_step(impl, divergence, h_S, W_S, h_T, W_T, chunk)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            base = _status_kib("VmRSS") * 1024 if sys.platform.startswith("linux") else _peak_rss()

        def one() -> tuple[float, float]:
            h_S.grad = W_S.grad = None
            start = time.perf_counter()
            loss = step()
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start, loss.item()

        warm_seconds, value = one()
        # the first step's gradient, saved before the timed steps replace it
        torch.save(h_S.grad.detach().cpu(), grad_path)
        seconds = [one()[0] for _ in range(repeats)]
        peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss()) - base
        conn.send(
            {
                "status": "ok",
                "loss": value,
                "seconds": statistics.median(seconds) if seconds else warm_seconds,
                "timed": len(seconds),
                "warm_seconds": warm_seconds,
                "peak_mib": peak / MIB,
            }
        )
    except (RuntimeError, MemoryError) as e:
        memory = isinstance(e, MemoryError) or "memory" in str(e).lower()
        conn.send({"status": "oom" if memory else "error", "error": str(e).splitlines()[0][:200]})
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        conn.send({"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    finally:
        conn.close()


def spawn_case(ctx, *args) -> dict:
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_case, args=(*args, send))
    proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        result = None
    proc.join()
    if result is None:
        killed = proc.exitcode is not None and proc.exitcode < 0
        return {"status": "oom" if killed else "error", "error": f"child exit code {proc.exitcode}"}
    return result


# --------------------------------------------------------------------------- memory estimate (skip)


def estimate_gib(impl: str, divergence: str, shape: str, n: int, chunk: int = KDCLI_CHUNK) -> float:
    """A rough estimate of the step's peak above the inputs (GiB), to skip cases that cannot fit.

    Counted in (rows x V) float32 temporaries alive at the peak, as measured at the SmolLM2
    shape (peak minus the head copies, over one rows x V float32 array, rounded up): plain ~7
    (forward KL) or ~14 (JSD: the stacked pair and the mixture), on all N rows; kdcli ~6 / ~13
    on its chunks; Liger ~16 on its chunks (>= its chunk size: torch.chunk into N // chunk
    pieces). Plus the (V, D_S) head-gradient copies (kdcli 3: the accumulator, its division by
    the normaliser and the backward's product; Liger 3: its accumulator, the chunk's gradient and
    the result; plain 1) and a few (N, D_S) hidden-state gradients.
    """
    vocab, d_S, _ = SHAPES[shape]
    jsd_ = divergence == "jsd"
    if impl == "plain":
        rows, per, heads = n, (14 if jsd_ else 7), 1
    elif impl == "kdcli":
        rows, per, heads = min(n, chunk), (13 if jsd_ else 6), 3
    else:
        chunk = LIGER_CHUNK or 1024
        rows, per, heads = -(-n // max(1, n // chunk)), 16, 3
    return 4 * (per * rows * vocab + heads * vocab * d_S + 4 * n * d_S) / GIB


# --------------------------------------------------------------------------- the report


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a - b)


def parse_case(spec: str, repeats: int) -> tuple[str, int, str, str, int]:
    """``shape:N:impl:divergence[:repeats]`` -> (shape, N, impl, divergence, repeats)."""
    parts = spec.split(":")
    if len(parts) not in (4, 5) or parts[0] not in SHAPES or (parts[2], parts[3]) not in CASES:
        raise ValueError(
            f"--cases: {spec!r} is not shape:N:impl:divergence[:repeats] with shape in {sorted(SHAPES)} "
            f"and impl:divergence in {[f'{i}:{d}' for i, d in CASES]}"
        )
    return parts[0], int(parts[1]), parts[2], parts[3], int(parts[4]) if len(parts) == 5 else repeats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run: V 1000, N 256 and 512, one thread")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["smollm2", "llama3"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384], help="token counts N")
    ap.add_argument("--impls", nargs="+", default=[f"{i}:{d}" for i, d in CASES], help="implementation:divergence")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up (median); 0: the warm-up")
    ap.add_argument(
        "--cases",
        nargs="+",
        metavar="SHAPE:N:IMPL:DIV[:REPEATS]",
        help="an explicit plan instead of shapes x sizes x impls, e.g. smollm2:16384:kdcli:jsd:0",
    )
    ap.add_argument(
        "--max-gib", type=float, default=12.0, help="skip cases whose step is estimated above this (GiB); child cap"
    )
    ap.add_argument("--threads", type=int, default=cores(), help="torch threads (default: the usable cores)")
    ap.add_argument(
        "--kdcli-chunk", type=int, default=KDCLI_CHUNK, help=f"kdcli's chunk_size (default: its own, {KDCLI_CHUNK})"
    )
    args = ap.parse_args(argv)
    if args.quick:  # one thread: tiny ops on a busy machine are otherwise dominated by OpenMP barriers
        args.shapes, args.sizes, args.repeats, args.threads, args.cases = ["tiny"], [256, 512], 1, 1, None
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    try:
        if args.cases:
            plan = [parse_case(c, args.repeats) for c in args.cases]
        else:
            pairs = [parse_case(f"tiny:0:{c}", 0)[2:4] for c in args.impls]
            plan = [(sh, n, i, d, args.repeats) for sh in args.shapes for n in args.sizes for i, d in pairs]
    except ValueError as e:
        ap.error(str(e))
    if LigerFusedLinearJSDLoss is None and any(c[2] == "liger" for c in plan):
        print("# liger_kernel is not installed: the Liger column is skipped (make bench-lm installs it)")
        plan = [c for c in plan if c[2] != "liger"]

    ctx = mp.get_context("spawn" if cuda or sys.platform != "linux" else "fork")
    liger_version = None
    if liger_kernel is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            liger_version = version("liger-kernel")
        except PackageNotFoundError:
            liger_version = getattr(liger_kernel, "__version__", "?")
    where = torch.cuda.get_device_name(args.device) if cuda else f"{cores()} cores, {args.threads} threads"
    print(
        f"# causal-LM KD loss, one step (forward + backward), float32, {args.device} ({where}), "
        f"torch {torch.__version__}, liger-kernel {liger_version or 'absent'}"
    )
    print(
        f"# kdcli chunk_size {args.kdcli_chunk}, Liger chunk_size {LIGER_CHUNK}, JSD beta {BETA}, T {TEMPERATURE}; "
        f"s / step: median of the timed steps after 1 warm-up (timed 0: the warm-up step alone); "
        f"step memory cap {args.max_gib} GiB"
    )
    print(
        "| shape | impl | divergence | N | peak MiB | s / step | timed | loss |\n|---|---|---|---:|---:|---:|---:|---:|"
    )
    results: dict[tuple[str, int, str, str], dict] = {}
    tmp = tempfile.TemporaryDirectory(prefix="lm_loss_")
    t0 = time.perf_counter()
    for shape, n, impl, div, repeats in plan:
        grad_path = os.path.join(tmp.name, f"{shape}-{n}-{impl}-{div}.pt")
        estimate = estimate_gib(impl, div, shape, n, args.kdcli_chunk)
        if not cuda and args.max_gib and estimate > args.max_gib:
            r = {"status": "skip", "error": f"estimated {estimate:.1f} GiB > --max-gib"}
        else:
            r = spawn_case(
                ctx, impl, div, shape, n, args.device, repeats, args.max_gib, args.threads, args.kdcli_chunk, grad_path
            )
        r["grad"] = grad_path if r["status"] == "ok" else None
        results[(shape, n, impl, div)] = r
        if r["status"] == "ok":
            cells = [f"{r['peak_mib']:,.0f}", f"{r['seconds']:.3f}", str(r["timed"]), f"{r['loss']:.6f}"]
        else:
            cells = [f"{r['status']}: {r.get('error', '')}", "-", "-", "-"]
        print(f"| {shape} | {impl} | {div} | {n:,} | " + " | ".join(cells) + " |", flush=True)
    print(f"# wall time {time.perf_counter() - t0:.0f} s")

    # ---- agreement (the children are done: the parent may run torch operations now)
    print("\n## agreement: |loss - ref| / |ref| and max |d hidden_S - ref| / max |ref d hidden_S|")
    print("| shape | N | compared | loss rel diff | grad rel diff |\n|---|---:|---|---:|---:|")
    compared = [("kdcli", "plain", "forward_kl"), ("kdcli", "plain", "jsd"), ("kdcli", "liger", "jsd")]
    compared.append(("liger", "plain", "jsd"))
    points = sorted({(shape, n) for shape, n, *_ in plan}, key=lambda p: (list(SHAPES).index(p[0]), p[1]))
    for shape, n in points:
        for a, b, div in compared:
            ra, rb = results.get((shape, n, a, div)), results.get((shape, n, b, div))
            if not (ra and rb and ra["grad"] and rb["grad"]):
                continue
            ga, gb = torch.load(ra["grad"]), torch.load(rb["grad"])
            grad_rel = ((ga - gb).abs().max() / gb.abs().max()).item()
            print(f"| {shape} | {n:,} | {a} vs {b} ({div}) | {_rel(ra['loss'], rb['loss']):.1e} | {grad_rel:.1e} |")
    tmp.cleanup()

    # ---- ratios against the goals
    print("\n## ratios (goals: kdcli peak growth 1k -> 16k tokens <= 20%, kdcli/Liger peak <= 1 and time <= 1.0,")
    print("## kdcli/plain time at the smallest N <= 1.1)")

    def ok(shape, n, impl, div):
        r = results.get((shape, n, impl, div))
        return r if r and r["status"] == "ok" else None

    for shape in SHAPES:
        for div in ("forward_kl", "jsd"):
            sizes = sorted(n for sh, n, i, d in results if sh == shape and i == "kdcli" and d == div)
            a, b = (ok(shape, sizes[0], "kdcli", div), ok(shape, sizes[-1], "kdcli", div)) if sizes else (None, None)
            if a and b and sizes[-1] > sizes[0]:
                print(
                    f"- {shape} kdcli {div}: peak {a['peak_mib']:,.0f} MiB at N {sizes[0]:,} -> "
                    f"{b['peak_mib']:,.0f} MiB at N {sizes[-1]:,}: {b['peak_mib'] / a['peak_mib'] - 1:+.0%}"
                )
            p = ok(shape, sizes[0], "plain", div) if sizes else None
            if a and p:
                print(
                    f"- {shape} kdcli/plain {div} at N {sizes[0]:,}: time {a['seconds'] / p['seconds']:.2f}, "
                    f"peak {a['peak_mib'] / p['peak_mib']:.2f}"
                )
        for n in sorted({n for sh, n, *_ in results if sh == shape}):
            k, g = ok(shape, n, "kdcli", "jsd"), ok(shape, n, "liger", "jsd")
            if k and g:
                print(
                    f"- {shape} kdcli/Liger jsd at N {n:,}: peak {k['peak_mib'] / g['peak_mib']:.2f}, "
                    f"time {k['seconds'] / g['seconds']:.2f}"
                )
    return 1 if any(r["status"] == "error" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
