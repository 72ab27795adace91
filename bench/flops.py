"""The machine's limit for a distillation step: FLOPs of the work and a measured matmul rate.

Used by `bench/distill.py` to print how close each side comes to what the CPU can do.

FLOP model of one BERT block for one real (unpadded) token in a sequence of `n` real tokens
(a multiply-add counts 2 FLOPs):

* dense parts: Q, K, V and output projections (4 h^2 multiply-adds) plus the feed-forward
  h -> 4h -> h (8 h^2) = 12 h^2 multiply-adds = 24 h^2 FLOPs;
* attention: Q K^T and probs @ V, each n h multiply-adds per token = 4 h n FLOPs.

Embeddings, layer norms, softmax, GELU and the classification head are left out (each is
linear in h, well under 1% here). The distillation step costs one teacher forward plus one
student forward and backward; a backward costs about twice its forward, so the student counts
3 times: per token, (layers_T + 3 layers_S) * (24 h^2 + 4 h n).

The limit is that count divided by the rate of a large fp32 matrix product
(`matmul_rate`, FLOP/s) on the same threads: no step can run faster than its matmuls at the
best rate the BLAS reaches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass


def block_flops_per_token(hidden: int, seq_len: int) -> float:
    """FLOPs of one transformer block's forward for one token of a sequence of `seq_len`
    real tokens: 24 h^2 (dense) + 4 h n (attention scores and weighted sum)."""
    return 24.0 * hidden * hidden + 4.0 * hidden * seq_len


def sequence_flops(seq_len: int, hidden: int, teacher_layers: int, student_layers: int) -> float:
    """FLOPs of one distillation step's share for one sequence of `seq_len` real tokens:
    teacher forward (teacher_layers blocks) + student forward and backward (3x its forward)."""
    passes = teacher_layers + 3 * student_layers
    return passes * seq_len * block_flops_per_token(hidden, seq_len)


@dataclass(frozen=True)
class WorkFlops:
    """FLOP count of a distillation workload over a list of sequences."""

    total: float  # FLOPs for all sequences
    samples: int
    tokens: int

    @property
    def per_sample(self) -> float:
        return self.total / max(self.samples, 1)

    def limit_samples_per_s(self, rate: float) -> float:
        """Samples/s the machine could reach if every FLOP ran at `rate` FLOP/s."""
        return rate / self.per_sample


def work_flops(lengths: Iterable[int], *, hidden: int, teacher_layers: int, student_layers: int) -> WorkFlops:
    """Total FLOPs of distilling over sequences of the given real (unpadded) lengths."""
    lengths = list(lengths)
    total = sum(sequence_flops(n, hidden, teacher_layers, student_layers) for n in lengths)
    return WorkFlops(total=total, samples=len(lengths), tokens=sum(lengths))


def matmul_rate(n: int = 2048, repeats: int = 7, warmup: int = 2) -> float:
    """Median fp32 FLOP/s of an (n x n) @ (n x n) product on torch's current threads.

    Each product is 2 n^3 FLOPs; the median of `repeats` timed products after `warmup`
    untimed ones is returned (the median resists other processes' bursts)."""
    import torch

    a = torch.randn(n, n, dtype=torch.float32)
    b = torch.randn(n, n, dtype=torch.float32)
    out = torch.empty(n, n, dtype=torch.float32)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times)


if __name__ == "__main__":
    import torch

    rate = matmul_rate()
    print(f"fp32 matmul 2048^3 on {torch.get_num_threads()} threads: {rate / 1e9:.1f} GFLOP/s")
