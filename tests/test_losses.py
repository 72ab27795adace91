"""kdcli.losses: hand-computed values, loop references on every branch, gradients, precision,
non-finite masks, bad shapes, and parity with TextBrewer 0.2.1 when it is installed."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from kdcli import losses
from kdcli.losses.kernels import _squared_error_sum

F64 = torch.float64


# --- loop references (plain Python floats, written from the reference's formulas) ----------


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


def _softmax(row: list[float]) -> list[float]:
    return [math.exp(x) for x in _log_softmax(row)]


def _heads(x: torch.Tensor) -> list:
    """(B, H, L, L) -> nested lists; (B, L, L) -> one head."""
    x = x.tolist()
    return x if isinstance(x[0][0][0], list) else [[b] for b in x]


def ref_att_mse(S, T, mask, reduce_heads=None):
    S, T = _heads(S), _heads(T)
    if reduce_heads:
        S, T = _reduce_heads(S, reduce_heads), _reduce_heads(T, reduce_heads)
    num = den = 0.0
    if mask is None:
        zero = lambda v: 0.0 if v <= -1e-3 else v  # noqa: E731
        for bs, bt in zip(S, T):
            for hs, ht in zip(bs, bt):
                for rs, rt in zip(hs, ht):
                    for s, t in zip(rs, rt):
                        num += (zero(s) - zero(t)) ** 2
                        den += 1
        return num / den
    m = mask.tolist()
    for b, (bs, bt) in enumerate(zip(S, T)):
        for hs, ht in zip(bs, bt):
            den += sum(m[b]) ** 2
            for i, (rs, rt) in enumerate(zip(hs, ht)):
                for j, (s, t) in enumerate(zip(rs, rt)):
                    num += m[b][i] * m[b][j] * (s - t) ** 2
    return num / den


def _reduce_heads(x: list, reduce) -> list:
    """[b][h][i][j] -> [b][0][i][j] with reduce(values over h)."""
    out = []
    for heads in x:
        rows = len(heads[0])
        out.append([[[reduce(*(h[i][j] for h in heads)) for j in range(len(heads[0][i]))] for i in range(rows)]])
    return out


def _sum_heads(*vals):
    return sum(vals)


def _mean_heads(*vals):
    return sum(vals) / len(vals)


def ref_att_ce(S, T, mask, reduce_heads=None):
    S, T = _heads(S), _heads(T)
    if reduce_heads:
        S, T = _reduce_heads(S, reduce_heads), _reduce_heads(T, reduce_heads)
    num = den = 0.0
    m = None if mask is None else mask.tolist()
    for b, (bs, bt) in enumerate(zip(S, T)):
        for hs, ht in zip(bs, bt):
            for i, (rs, rt) in enumerate(zip(hs, ht)):
                p, lq = _softmax(rt), _log_softmax(rs)
                if m is None:
                    num -= sum(pj * qj for pj, qj, tj in zip(p, lq, rt) if tj > -1e-3)
                    den += 1
                else:
                    num -= m[b][i] * sum(m[b][j] * p[j] * lq[j] for j in range(len(p)))
                    den += m[b][i]
    return num / den


def ref_hid_mse(S, T, mask):
    S, T = S.tolist(), T.tolist()
    if mask is None:
        flat = [(s - t) ** 2 for bs, bt in zip(S, T) for rs, rt in zip(bs, bt) for s, t in zip(rs, rt)]
        return sum(flat) / len(flat)
    m = mask.tolist()
    num = sum(
        m[b][l] * sum((s - t) ** 2 for s, t in zip(S[b][l], T[b][l])) for b in range(len(S)) for l in range(len(S[0]))
    )
    return num / (sum(map(sum, m)) * len(S[0][0]))


def ref_cos(S, T, mask):
    S, T = S.tolist(), T.tolist()
    vals = []
    for b in range(len(S)):
        for l in range(len(S[0])):
            if mask is not None and mask[b, l] == 0:
                continue
            s, t = S[b][l], T[b][l]
            dot = sum(x * y for x, y in zip(s, t))
            den = math.sqrt((sum(x * x for x in s) + 1e-12) * (sum(y * y for y in t) + 1e-12))
            vals.append(1 - dot / den)
    return sum(vals) / len(vals)


def ref_pkd(S, T, mask=None):
    S = S[:, 0] if S.dim() == 3 else S
    T = T[:, 0] if T.dim() == 3 else T
    total = 0.0
    for s, t in zip(S.tolist(), T.tolist()):
        ns, nt = math.sqrt(sum(x * x for x in s)), math.sqrt(sum(x * x for x in t))
        ns, nt = ns or 1.0, nt or 1.0  # kdcli: a zero vector stays zero
        total += sum((x / ns - y / nt) ** 2 for x, y in zip(s, t))
    return total / len(S)


def _gram_dd(X0, X1, weights):  # weights[l]: the factor of position l
    D0, D1 = len(X0[0]), len(X1[0])
    return [[sum(w * X0[l][d] * X1[l][e] for l, w in enumerate(weights)) for e in range(D1)] for d in range(D0)]


def ref_fsp(S, T, mask):
    (S0, S1), (T0, T1) = [x.tolist() for x in S], [x.tolist() for x in T]
    sq = n = 0.0
    for b in range(len(S0)):
        L = len(S0[b])
        if mask is None:
            w = [1.0 / L] * L
        else:
            mb = mask[b].tolist()
            w = [x * x / sum(mb) for x in mb]  # zeroing both layers: m^2, divided by the length
        GS, GT = _gram_dd(S0[b], S1[b], w), _gram_dd(T0[b], T1[b], w)
        for rs, rt in zip(GS, GT):
            for gs, gt in zip(rs, rt):
                sq += (gs - gt) ** 2
                n += 1
    return sq / n


def ref_mmd(S, T, mask):
    (S0, S1), (T0, T1) = [x.tolist() for x in S], [x.tolist() for x in T]
    B, L = len(S0), len(S0[0])
    num = den = 0.0
    for b in range(B):
        dS, dT = (len(S0[b][0]), len(T0[b][0])) if mask is None else (L, L)
        for i in range(L):
            for j in range(L):
                gs = sum(x * y for x, y in zip(S0[b][i], S1[b][j])) / dS
                gt = sum(x * y for x, y in zip(T0[b][i], T1[b][j])) / dT
                w = 1.0 if mask is None else float(mask[b, i] * mask[b, j])
                num += w * (gs - gt) ** 2
        den += L * L if mask is None else float(mask[b].sum()) ** 2
    return num / den


def _temps(temperature, rows_shape):
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        return temperature.reshape(-1).tolist()
    return [float(temperature)] * math.prod(rows_shape)  # a float or a 0-dim tensor


def ref_kd_mse(S, T, temperature=1):
    temps = _temps(temperature, S.shape[:-1])
    rows = zip(S.reshape(-1, S.shape[-1]).tolist(), T.reshape(-1, T.shape[-1]).tolist(), temps)
    return sum(sum((s / t_ - t / t_) ** 2 for s, t in zip(rs, rt)) for rs, rt, t_ in rows) / S.numel()


def ref_kd_ce(S, T, temperature=1):
    temps = _temps(temperature, S.shape[:-1])
    rows = list(zip(S.reshape(-1, S.shape[-1]).tolist(), T.reshape(-1, T.shape[-1]).tolist(), temps))
    total = 0.0
    for rs, rt, t_ in rows:
        p, lq = _softmax([x / t_ for x in rt]), _log_softmax([x / t_ for x in rs])
        total -= sum(a * b for a, b in zip(p, lq))
    return total / len(rows)


# --- the branches --------------------------------------------------------------------------

B, H, L, D = 2, 2, 4, 3
LENGTHS = (4, 2)


def make_mask(lengths=LENGTHS, length=L, dtype=torch.long) -> torch.Tensor:
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def padded_scores(heads=H, seed=0, fill=-10000.0, mask=None) -> torch.Tensor:
    """(B, heads, L, L) scores with `fill` added at padded keys (the BERT additive mask)."""
    mask = make_mask() if mask is None else mask
    x = rand(B, heads, L, L, seed=seed)
    pad = (mask == 0)[:, None, None, :].expand_as(x)
    return x.masked_fill(pad, fill) if math.isinf(fill) else x + pad * fill


@dataclass(frozen=True)
class Case:
    id: str
    fn: str
    make: Callable[[], tuple]  # -> (student, teacher, mask or None)
    ref: Callable

    def args(self):
        return self.make()


def _att_cases(fn, ref, ids, reduce_heads=None, heads_may_differ=False):
    r = (lambda S, T, m: ref(S, T, m, reduce_heads)) if reduce_heads else ref
    out = []
    for masked in (False, True):
        m = (lambda: make_mask()) if masked else (lambda: None)
        tag = "mask" if masked else "nomask"
        out.append(
            Case(f"{ids}-{tag}-padded4d", fn, lambda m=m: (padded_scores(seed=1), padded_scores(seed=2), m()), r)
        )
        out.append(
            Case(f"{ids}-{tag}-raw4d", fn, lambda m=m: (rand(B, H, L, L, seed=3), rand(B, H, L, L, seed=4), m()), r)
        )
        out.append(Case(f"{ids}-{tag}-raw3d", fn, lambda m=m: (rand(B, L, L, seed=5), rand(B, L, L, seed=6), m()), ref))
        if heads_may_differ:
            out.append(
                Case(
                    f"{ids}-{tag}-heads2vs3",
                    fn,
                    lambda m=m: (padded_scores(2, seed=7), padded_scores(3, seed=8), m()),
                    r,
                )
            )
    return out


def _pair_states(dim_S=D, dim_T=D, seed=0):
    return (
        [rand(B, L, dim_S, seed=seed), rand(B, L, dim_S, seed=seed + 1)],
        [rand(B, L, dim_T, seed=seed + 2), rand(B, L, dim_T, seed=seed + 3)],
    )


CASES: list[Case] = [
    *_att_cases("att_mse_loss", ref_att_mse, "att_mse"),
    *_att_cases("att_mse_sum_loss", ref_att_mse, "att_mse_sum", _sum_heads, heads_may_differ=True),
    *_att_cases("att_ce_loss", ref_att_ce, "att_ce"),
    *_att_cases("att_ce_mean_loss", ref_att_ce, "att_ce_mean", _mean_heads, heads_may_differ=True),
]
for _fn, _ref, _id in (("hid_mse_loss", ref_hid_mse, "hid_mse"), ("cos_loss", ref_cos, "cos")):
    CASES.append(Case(f"{_id}-nomask", _fn, lambda: (rand(B, L, D, seed=1), rand(B, L, D, seed=2), None), _ref))
    CASES.append(Case(f"{_id}-mask", _fn, lambda: (rand(B, L, D, seed=3), rand(B, L, D, seed=4), make_mask()), _ref))
CASES += [
    Case("pkd-3d", "pkd_loss", lambda: (rand(B, L, D, seed=1), rand(B, L, D, seed=2), None), ref_pkd),
    Case("pkd-2d", "pkd_loss", lambda: (rand(B, D, seed=3), rand(B, D, seed=4), None), ref_pkd),
    Case("pkd-2d-vs-3d", "pkd_loss", lambda: (rand(B, D, seed=5), rand(B, L, D, seed=6), make_mask()), ref_pkd),
    Case("fsp-nomask", "fsp_loss", lambda: (*_pair_states(seed=1), None), ref_fsp),
    Case("fsp-mask", "fsp_loss", lambda: (*_pair_states(seed=2), make_mask()), ref_fsp),
    Case("mmd-nomask", "mmd_loss", lambda: (*_pair_states(3, 5, seed=3), None), ref_mmd),
    Case("mmd-mask", "mmd_loss", lambda: (*_pair_states(3, 5, seed=4), make_mask()), ref_mmd),
]
KD_CASES = [
    ("kd-2d-float", (B, 5), 2.5),
    ("kd-3d-float", (B, L, 5), 0.7),
    ("kd-2d-tensor", (B, 5), "rows"),
    ("kd-3d-tensor", (B, L, 5), "rows"),
    ("kd-2d-scalar-tensor", (B, 5), "scalar"),
]


def _kd_inputs(shape, temp):
    S, T = rand(*shape, seed=11), rand(*shape, seed=12) * 2
    if temp == "rows":
        temp = rand(*shape[:-1], seed=13).abs() + 0.5
    elif temp == "scalar":
        temp = torch.tensor(1.7, dtype=F64)
    return S, T, temp


def _leaves(x):
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _with_grad(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone().requires_grad_(True)
    return [t.detach().clone().requires_grad_(True) for t in x]


# --- hand-computed values ------------------------------------------------------------------


def test_hand_att_mse_no_mask_zeroes_scores_at_or_below_minus_1e3():
    S = torch.tensor([[[[1.0, -2e4], [3.0, 0.5]]]], dtype=F64)
    T = torch.tensor([[[[0.0, -1e4], [1.0, -0.5]]]], dtype=F64)
    # -2e4, -1e4 and -0.5 count as padding (set to 0): diffs 1, 0, 2, 0.5
    assert losses.att_mse_loss(S, T).item() == pytest.approx((1 + 0 + 4 + 0.25) / 4, rel=1e-12)


def test_hand_att_mse_mask_counts_pairs_per_head():
    S = torch.zeros(1, 2, 2, 2, dtype=F64)
    T = torch.tensor([[[[1.0, 5.0], [7.0, 9.0]], [[2.0, 0.0], [0.0, 0.0]]]], dtype=F64)
    mask = torch.tensor([[1, 0]])
    # only entry (0, 0) of each head counts: (1 + 4) / (heads * 1^2)
    assert losses.att_mse_loss(S, T, mask).item() == pytest.approx(5 / 2, rel=1e-12)
    # _sum variant: heads summed first -> (0 - 3)^2 / 1
    assert losses.att_mse_sum_loss(S, T, mask).item() == pytest.approx(9.0, rel=1e-12)


def test_hand_att_ce_uniform_student():
    # student scores all equal: log q = -log 2 everywhere, so every row gives log 2
    S = torch.zeros(1, 1, 2, 2, dtype=F64)
    T = torch.tensor([[[[0.0, 1.0], [3.0, -2.0]]]], dtype=F64)
    assert losses.att_ce_loss(S, T, torch.tensor([[1, 1]])).item() == pytest.approx(math.log(2), rel=1e-12)
    # no mask: the teacher's -2.0 is <= -1e-3, so its probability is dropped in row 2
    p = 1 / (1 + math.exp(-5.0))  # softmax([3, -2])[0]
    expected = (math.log(2) + p * math.log(2)) / 2
    assert losses.att_ce_loss(S, T).item() == pytest.approx(expected, rel=1e-12)
    # mask [1, 0]: row 1 only, column 1 dropped: softmax([0, 1])[0] * log 2
    assert losses.att_ce_mean_loss(S[:, 0], T[:, 0], torch.tensor([[1, 0]])).item() == pytest.approx(
        math.log(2) / (1 + math.e), rel=1e-12
    )


def test_hand_hidden_losses():
    S = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=F64)
    T = torch.tensor([[[0.0, 1.0], [0.0, 4.0]]], dtype=F64)
    assert losses.hid_mse_loss(S, T).item() == pytest.approx((1 + 1 + 0 + 4) / 4, rel=1e-12)
    assert losses.hid_mse_loss(S, T, torch.tensor([[0, 1]])).item() == pytest.approx(4 / 2, rel=1e-12)
    # cos: orthogonal at position 0 (1 - 0), parallel at position 1 (1 - 1)
    assert losses.cos_loss(S, T).item() == pytest.approx(0.5, rel=1e-9)
    assert losses.cos_loss(S, T, torch.tensor([[1, 0]])).item() == pytest.approx(1.0, rel=1e-9)
    # pkd: position 0, unit vectors (1, 0) and (0, 1): squared distance 2
    assert losses.pkd_loss(S, T).item() == pytest.approx(2.0, rel=1e-12)


def test_hand_gram_losses():
    X = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=F64)  # (1, 2, 2)
    Z = torch.zeros_like(X)
    # fsp: X^T X / L = diag(1, 4) / 2; mean of squares over 4 entries = (0.25 + 4) / 4
    assert losses.fsp_loss([X, X], [Z, Z]).item() == pytest.approx((0.25 + 4) / 4, rel=1e-12)
    # masked (position 0 only): X0^T X0 / 1 = [[1, 0], [0, 0]] -> 1 / 4
    assert losses.fsp_loss([X, X], [Z, Z], torch.tensor([[1, 0]])).item() == pytest.approx(0.25, rel=1e-12)
    # mmd: X X^T / D = diag(1, 4) / 2 -> (0.25 + 4) / 4 without a mask ...
    assert losses.mmd_loss([X, X], [Z, Z]).item() == pytest.approx((0.25 + 4) / 4, rel=1e-12)
    # ... and divided by L (=2) with a mask: only (0, 0) counts, (1/2)^2 / 1^2
    assert losses.mmd_loss([X, X], [Z, Z], torch.tensor([[1, 0]])).item() == pytest.approx(0.25, rel=1e-12)
    # mmd: teacher hidden size differs (3 vs 2); its Gram divides by 3
    Y = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=F64)
    assert losses.mmd_loss([Z, Z], [Y, Y]).item() == pytest.approx(9.0 / 4, rel=1e-12)


def test_hand_kd_losses():
    S = torch.tensor([[1.0, 2.0]], dtype=F64)
    T = torch.tensor([[3.0, 2.0]], dtype=F64)
    assert losses.kd_mse_loss(S, T, 2).item() == pytest.approx((1.0**2 + 0) / 2, rel=1e-12)
    # ce without a T^2 factor: -sum p_T log q_S at T = 1
    p = [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]
    lq = [1 - math.log(math.exp(1) + math.exp(2)), 2 - math.log(math.exp(1) + math.exp(2))]
    assert losses.kd_ce_loss(S, T).item() == pytest.approx(-(p[0] * lq[0] + p[1] * lq[1]), rel=1e-12)
    # a per-example temperature: row 2 at T = 1 equals the float case at T = 1
    S2, T2 = torch.cat([S, S]), torch.cat([T, T])
    both = losses.kd_ce_loss(S2, T2, torch.tensor([2.0, 1.0], dtype=F64))
    assert both.item() == pytest.approx(
        (losses.kd_ce_loss(S, T, 2.0).item() + losses.kd_ce_loss(S, T, 1.0).item()) / 2, rel=1e-12
    )


# --- every branch against the loop references ----------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_loop_reference(case: Case):
    S, T, mask = case.args()
    got = getattr(losses, case.fn)(S, T, mask)
    assert got.dtype == F64 and got.dim() == 0
    assert got.item() == pytest.approx(case.ref(S, T, mask), rel=1e-10)


@pytest.mark.parametrize("name,shape,temp", KD_CASES, ids=[c[0] for c in KD_CASES])
def test_kd_matches_loop_reference(name, shape, temp):
    S, T, temp = _kd_inputs(shape, temp)
    assert losses.kd_mse_loss(S, T, temp).item() == pytest.approx(ref_kd_mse(S, T, temp), rel=1e-10)
    assert losses.kd_ce_loss(S, T, temp).item() == pytest.approx(ref_kd_ce(S, T, temp), rel=1e-10)


def test_float_mask_values_are_weights_like_the_reference():
    w = torch.tensor([[1.0, 0.5, 2.0, 0.0], [0.3, 1.0, 0.0, 0.0]], dtype=F64)
    S, T = rand(B, H, L, L, seed=1), rand(B, H, L, L, seed=2)
    assert losses.att_mse_loss(S, T, w).item() == pytest.approx(ref_att_mse(S, T, w), rel=1e-10)
    assert losses.att_ce_loss(S, T, w).item() == pytest.approx(ref_att_ce(S, T, w), rel=1e-10)
    hs, ht = rand(B, L, D, seed=3), rand(B, L, D, seed=4)
    assert losses.hid_mse_loss(hs, ht, w).item() == pytest.approx(ref_hid_mse(hs, ht, w), rel=1e-10)
    assert losses.fsp_loss([hs, ht], [ht, hs], w).item() == pytest.approx(ref_fsp([hs, ht], [ht, hs], w), rel=1e-10)
    # cos selects non-zero positions (masked_select), it does not weight them
    assert losses.cos_loss(hs, ht, w).item() == pytest.approx(ref_cos(hs, ht, w != 0), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.long, torch.float32, F64])
def test_binary_masks_of_any_dtype_agree(dtype):
    mask = make_mask(dtype=dtype)
    base = make_mask(dtype=F64)
    for case in CASES:
        S, T, m = case.args()
        if m is None:
            continue
        fn = getattr(losses, case.fn)
        assert fn(S, T, mask).item() == pytest.approx(fn(S, T, base).item(), rel=1e-12), case.id


# --- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "both"])
def test_gradcheck(case: Case, teacher_grad: bool):
    S, T, mask = case.args()
    fn = getattr(losses, case.fn)
    S = _with_grad(S)
    T = _with_grad(T) if teacher_grad else T
    inputs = (*_leaves(S), *(_leaves(T) if teacher_grad else ()))

    def f(*flat):
        s = flat[0] if isinstance(S, torch.Tensor) else list(flat[: len(S)])
        rest = flat[1:] if isinstance(S, torch.Tensor) else flat[len(S) :]
        t = (rest[0] if isinstance(T, torch.Tensor) else list(rest)) if teacher_grad else T
        return fn(s, t, mask)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("name,shape,temp", KD_CASES, ids=[c[0] for c in KD_CASES])
def test_kd_gradcheck(name, shape, temp):
    S, T, temp = _kd_inputs(shape, temp)
    S = S.requires_grad_(True)
    for fn in (losses.kd_ce_loss, losses.kd_mse_loss):
        assert torch.autograd.gradcheck(lambda s, fn=fn: fn(s, T, temp), (S,), fast_mode=True)


WEIGHTS = torch.tensor([[1.0, 0.5, 2.0, 0.0], [0.3, 1.0, 0.0, 0.0]], dtype=F64)


@pytest.mark.parametrize(
    "fn,make",
    [
        ("att_mse_loss", lambda: (rand(B, H, L, L, seed=1), rand(B, H, L, L, seed=2))),
        ("att_mse_sum_loss", lambda: (rand(B, 2, L, L, seed=1), rand(B, 3, L, L, seed=2))),
        ("att_ce_loss", lambda: (rand(B, H, L, L, seed=1), rand(B, H, L, L, seed=2))),
        ("att_ce_mean_loss", lambda: (rand(B, 2, L, L, seed=1), rand(B, 3, L, L, seed=2))),
        ("hid_mse_loss", lambda: (rand(B, L, D, seed=1), rand(B, L, D, seed=2))),
        ("cos_loss", lambda: (rand(B, L, D, seed=1), rand(B, L, D, seed=2))),
        ("fsp_loss", lambda: _pair_states(seed=1)),
        ("mmd_loss", lambda: _pair_states(3, 5, seed=1)),
    ],
)
def test_full_gradcheck_with_weighted_masks(fn, make):
    S, T = make()
    f = getattr(losses, fn)
    if isinstance(S, torch.Tensor):
        assert torch.autograd.gradcheck(lambda s: f(s, T, WEIGHTS), (_with_grad(S),))
    else:
        assert torch.autograd.gradcheck(lambda a, b: f([a, b], T, WEIGHTS), tuple(_with_grad(S)))


def test_binary_and_weighted_kernels_agree_on_0_1_masks():
    """On an accelerator an int/float 0/1 mask takes the general-weights path; same result."""
    S, T = rand(B, H, L, L, seed=1), rand(B, H, L, L, seed=2)
    w = make_mask(dtype=F64)
    rows, cols = w[:, None, :], w[:, None, None, :]
    results = []
    for binary in (True, False):
        s = _with_grad(S)
        total = _squared_error_sum(s, T, rows, cols, binary, clean=True)
        total.backward()
        results.append((total.item(), s.grad))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-14)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-14, atol=0)


# --- precision -----------------------------------------------------------------------------


def _cast(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) else [t.to(dtype) for t in x]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_half_inputs_reduce_in_float32(case: Case, dtype):
    S, T, mask = case.args()
    S, T = _cast(S, dtype), _cast(T, dtype)
    fn = getattr(losses, case.fn)
    got = fn(S, T, mask)
    assert got.dtype == torch.float32
    assert torch.isfinite(got)
    expected = fn(_cast(S, torch.float32), _cast(T, torch.float32), mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_half_gram_matrices_do_not_overflow():
    # entries of 30 over 128 positions: X^T X sums to 115200 > float16's 65504
    X = torch.full((1, 128, 4), 30.0, dtype=torch.float16)
    Z = torch.zeros_like(X)
    assert torch.isfinite(losses.fsp_loss([X, X], [Z, Z]))
    W = torch.full((1, 4, 128), 30.0, dtype=torch.float16)
    assert torch.isfinite(losses.mmd_loss([W, W], [W * 0, W * 0]))
    got = losses.fsp_loss([X, X], [Z, Z])
    assert got.item() == pytest.approx((900.0**2), rel=1e-6)  # X^T X / L = 900 everywhere


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,shape,temp", KD_CASES, ids=[c[0] for c in KD_CASES])
def test_half_kd_losses_reduce_in_float32(name, shape, temp, dtype):
    S, T, temp = _kd_inputs(shape, temp)
    S, T = S * 8, T * 8  # float16 softmax would flush the small probabilities to zero
    for fn in (losses.kd_ce_loss, losses.kd_mse_loss):
        got = fn(S.to(dtype), T.to(dtype), temp if not isinstance(temp, torch.Tensor) else temp.float())
        assert got.dtype == torch.float32
        expected = fn(
            S.to(dtype).float(), T.to(dtype).float(), temp if not isinstance(temp, torch.Tensor) else temp.float()
        )
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    "fn,shape",
    [
        ("att_mse_loss", (2, 12, 128, 128)),
        ("att_ce_loss", (2, 12, 128, 128)),
        ("att_mse_sum_loss", (4, 12, 128, 128)),
        ("hid_mse_loss", (4, 128, 768)),
        ("cos_loss", (4, 128, 768)),
    ],
)
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_float32_sums_stay_accurate_on_large_inputs(fn, shape, masked):
    """Large float32 reductions (chunked dots) agree with the float64 loss to ~1e-6."""
    gen = torch.Generator().manual_seed(0)
    S, T = torch.rand(*shape, generator=gen, dtype=F64) * 4, torch.rand(*shape, generator=gen, dtype=F64) * 4
    length = shape[-1] if fn.startswith("att") else shape[1]
    mask = make_mask(tuple(length // 2 + 7 * i for i in range(shape[0])), length) if masked else None
    exact = getattr(losses, fn)(S, T, mask).item()
    assert getattr(losses, fn)(S.float(), T.float(), mask).item() == pytest.approx(exact, rel=2e-6)


def test_kd_ce_on_large_float32_logits_under_autograd():
    S, T = rand(40, 20, 100, seed=1), rand(40, 20, 100, seed=2)  # 80000 > one dot chunk
    s32 = S.float().requires_grad_(True)
    s64 = S.clone().requires_grad_(True)
    l32, l64 = losses.kd_ce_loss(s32, T.float(), 2.0), losses.kd_ce_loss(s64, T, 2.0)
    l32.backward()
    l64.backward()
    assert l32.item() == pytest.approx(l64.item(), rel=1e-6)
    assert torch.allclose(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-9)


def test_float64_stays_float64_and_mixed_dtypes_promote():
    S, T = rand(B, L, D), rand(B, L, D, seed=1)
    assert losses.hid_mse_loss(S, T).dtype == F64
    assert losses.hid_mse_loss(S.half(), T.float()).dtype == torch.float32
    assert losses.cos_loss(S.bfloat16(), T).dtype == F64


# --- non-finite masks and zero vectors -----------------------------------------------------

ATT_FNS = ["att_mse_loss", "att_mse_sum_loss", "att_ce_loss", "att_ce_mean_loss"]


@pytest.mark.parametrize("fn", ATT_FNS)
@pytest.mark.parametrize("fill", ["-inf", "finfo.min"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("rows_too", [False, True], ids=["keys", "rows+keys"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_infinite_padding_gives_the_finite_10000_result(fn, fill, masked, rows_too, dtype):
    mask = make_mask()

    def scores(seed, value):
        x = rand(B, H, L, L, seed=seed).to(dtype)
        pad = (mask == 0)[:, None, None, :]
        if rows_too:
            pad = pad | (mask == 0)[:, None, :, None]
        return x.masked_fill(pad.expand_as(x), value)

    value = -math.inf if fill == "-inf" else torch.finfo(dtype).min
    f = getattr(losses, fn)
    m = mask if masked else None
    S = scores(1, value).requires_grad_(True)
    got = f(S, scores(2, value), m)
    got.backward()
    assert torch.isfinite(got)
    assert torch.isfinite(S.grad).all()
    if rows_too and not masked:
        return  # without a mask, a padded query row of -10000 is an ordinary row; nothing to compare
    S0 = scores(1, -10000.0).requires_grad_(True)
    expected = f(S0, scores(2, -10000.0), m)
    expected.backward()
    rel = 1e-12 if dtype == F64 else 1e-5
    assert got.item() == pytest.approx(expected.item(), rel=rel)
    keep = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
    if fn in ("att_mse_loss", "att_ce_loss") and masked:
        # the gradient agrees where both positions are real
        assert torch.allclose(S.grad[keep.expand_as(S)], S0.grad[keep.expand_as(S0)], rtol=rel, atol=1e-12)


def test_pkd_zero_vector_is_finite_and_stays_zero():
    S = torch.zeros(2, 3, 4, dtype=F64, requires_grad=True)
    T = rand(2, 3, 4)
    got = losses.pkd_loss(S, T)
    got.backward()
    assert got.item() == pytest.approx(1.0, rel=1e-12)  # || 0 - unit ||^2 = 1 for each example
    assert torch.isfinite(S.grad).all()


def test_cos_zero_vectors_and_empty_mask():
    S, T = torch.zeros(1, 2, 3, dtype=F64), rand(1, 2, 3)
    assert losses.cos_loss(S, T).item() == pytest.approx(1.0)  # cos = 0 / sqrt(eps * ...) = 0
    assert losses.cos_loss(rand(1, 2, 3), T, torch.zeros(1, 2)).item() == 0.0


# --- bad inputs ----------------------------------------------------------------------------

BAD = [
    (
        "att_mse_loss",
        (torch.zeros(2, 12, 5, 5), torch.zeros(2, 4, 5, 5)),
        "attention_S",
        "(2, 12, 5, 5)",
        "(2, 4, 5, 5)",
    ),
    ("att_ce_loss", (torch.zeros(2, 2, 5, 5), torch.zeros(2, 2, 6, 6)), "attention_T", "(2, 2, 5, 5)", "(2, 2, 6, 6)"),
    (
        "att_mse_sum_loss",
        (torch.zeros(2, 2, 5, 5), torch.zeros(2, 3, 4, 4)),
        "attention_S",
        "(2, 2, 5, 5)",
        "(2, 3, 4, 4)",
    ),
    ("att_ce_mean_loss", (torch.zeros(2, 2, 5, 5), torch.zeros(2, 5, 5)), "attention_T", "(2, 2, 5, 5)", "(2, 5, 5)"),
    ("hid_mse_loss", (torch.zeros(2, 5, 384), torch.zeros(2, 5, 768)), "state_T", "(2, 5, 384)", "(2, 5, 768)"),
    ("cos_loss", (torch.zeros(2, 5, 8), torch.zeros(2, 4, 8)), "state_S", "(2, 5, 8)", "(2, 4, 8)"),
    ("pkd_loss", (torch.zeros(2, 5, 8), torch.zeros(2, 7)), "state_T", "(2, 5, 8)", "(2, 7)"),
    ("fsp_loss", ([torch.zeros(2, 5, 8)] * 2, [torch.zeros(2, 5, 6)] * 2), "state_T[0]", "(2, 5, 8)", "(2, 5, 6)"),
    ("mmd_loss", ([torch.zeros(2, 5, 8)] * 2, [torch.zeros(2, 4, 8)] * 2), "state_T[0]", "(2, 5, 8)", "(2, 4, 8)"),
    ("kd_ce_loss", (torch.zeros(4, 3), torch.zeros(4, 2)), "logits_T", "(4, 3)", "(4, 2)"),
    ("kd_mse_loss", (torch.zeros(4, 3), torch.zeros(3, 3)), "logits_T", "(4, 3)", "(3, 3)"),
]


@pytest.mark.parametrize("fn,args,arg,shape_S,shape_T", BAD, ids=[b[0] for b in BAD])
def test_mismatched_shapes_raise_value_error_naming_loss_argument_and_shapes(fn, args, arg, shape_S, shape_T):
    with pytest.raises(ValueError) as info:
        getattr(losses, fn)(*args)
    message = str(info.value)
    assert message.startswith(fn + ":")
    assert arg in message and shape_S in message and shape_T in message


@pytest.mark.parametrize(
    "fn,args,fragment",
    [
        ("att_mse_loss", (torch.zeros(2, 1, 5, 5), torch.zeros(2, 1, 5, 5), torch.ones(2, 4)), "mask has shape (2, 4)"),
        ("hid_mse_loss", (torch.zeros(2, 5, 3), torch.zeros(2, 5, 3), torch.ones(5, 2)), "(batch, length) = (2, 5)"),
        ("hid_mse_loss", (torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)), "when a mask is given"),
        ("att_mse_loss", (torch.zeros(2, 5, 5), torch.zeros(2, 1, 5, 5)), "both 3-D"),
        ("att_ce_loss", (torch.zeros(5, 5), torch.zeros(5, 5)), "expected (batch, heads, length, length)"),
        ("att_mse_loss", (torch.zeros(2, 1, 5, 4), torch.zeros(2, 1, 5, 4), torch.ones(2, 4)), "must be square"),
        ("fsp_loss", (torch.zeros(2, 5, 3), [torch.zeros(2, 5, 3)] * 2), "state_S must be a list of two tensors"),
        ("mmd_loss", ([torch.zeros(2, 5, 3)] * 3, [torch.zeros(2, 5, 3)] * 2), "got list of length 3"),
        (
            "mmd_loss",
            ([torch.zeros(2, 5, 3), torch.zeros(2, 5, 4)], [torch.zeros(2, 5, 3)] * 2),
            "state_S[1] has shape (2, 5, 4)",
        ),
        ("kd_ce_loss", (torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(3)), "temperature has shape (3,)"),
        ("kd_mse_loss", (torch.zeros(4, 5, 3), torch.zeros(4, 5, 3), torch.ones(4)), "(4, 5)"),
        ("kd_ce_loss", (torch.zeros(4, 3), torch.zeros(4, 3), "4"), "temperature must be a float"),
        ("cos_loss", (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), [[1, 1, 1]] * 2), "mask must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_value_error(fn, args, fragment):
    with pytest.raises(ValueError) as info:
        getattr(losses, fn)(*args)
    assert fragment in str(info.value)
    assert str(info.value).startswith(fn + ":")


# --- parity with TextBrewer 0.2.1 (optional) -----------------------------------------------


def _reference():
    return pytest.importorskip("textbrewer.losses")


def _value_and_grad(fn, S, T, mask, kwargs=None):
    S = _with_grad(S)
    out = fn(S, T, **kwargs) if kwargs is not None else fn(S, T, mask)
    out.backward()
    return out.detach(), torch.cat([t.grad.reshape(-1) for t in _leaves(S)])


def _assert_parity(ours, theirs):
    (v1, g1), (v2, g2) = ours, theirs
    assert torch.isfinite(v2), "the reference is not finite on this input; pick another"
    assert v1.item() == pytest.approx(v2.item(), rel=1e-6)
    assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-6 * g2.abs().max().item() + 1e-300)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_parity_with_textbrewer(case: Case):
    reference = _reference()
    S, T, mask = case.args()
    if case.fn == "pkd_loss":
        mask = None
    if case.fn in ("att_mse_loss", "att_ce_loss") and mask is not None and S.dim() == 3:
        pytest.skip("the reference broadcasts a (B, L) mask wrongly against 3-D scores (kdcli: one head)")
    ours = _value_and_grad(getattr(losses, case.fn), S, T, mask)
    theirs = _value_and_grad(getattr(reference, case.fn), S, T, mask)
    _assert_parity(ours, theirs)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "fn",
    ["att_mse_loss", "att_mse_sum_loss", "att_ce_loss", "att_ce_mean_loss", "hid_mse_loss", "fsp_loss", "mmd_loss"],
)
def test_parity_with_textbrewer_random_float_masks(fn, seed):
    reference = _reference()
    gen = torch.Generator().manual_seed(seed)
    Bx, Hx, Lx, Dx = 3, 4, 7, 5
    mask = torch.rand(Bx, Lx, generator=gen, dtype=F64) * (torch.rand(Bx, Lx, generator=gen) > 0.3)
    mask[:, 0] = 1.0
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64) * 3  # noqa: E731
    if fn.startswith("att"):
        S, T = r(Bx, Hx, Lx, Lx), r(Bx, Hx, Lx, Lx)
    elif fn == "hid_mse_loss":
        S, T = r(Bx, Lx, Dx), r(Bx, Lx, Dx)
    else:
        dim_T = Dx + 2 if fn == "mmd_loss" else Dx
        S, T = [r(Bx, Lx, Dx), r(Bx, Lx, Dx)], [r(Bx, Lx, dim_T), r(Bx, Lx, dim_T)]
    for m in (mask, (mask > 0).long(), None):
        ours = _value_and_grad(getattr(losses, fn), S, T, m)
        theirs = _value_and_grad(getattr(reference, fn), S, T, m)
        _assert_parity(ours, theirs)


@pytest.mark.parametrize("name,shape,temp", KD_CASES, ids=[c[0] for c in KD_CASES])
def test_kd_parity_with_textbrewer(name, shape, temp):
    reference = _reference()
    S, T, temp = _kd_inputs(shape, temp)
    for fn in ("kd_ce_loss", "kd_mse_loss"):
        ours = _value_and_grad(getattr(losses, fn), S, T, None, {"temperature": temp})
        theirs = _value_and_grad(getattr(reference, fn), S, T, None, {"temperature": temp})
        _assert_parity(ours, theirs)


def test_pkd_parity_on_tiny_vectors():
    """The norm floor (finfo.tiny) leaves tiny but non-zero vectors exactly as the reference."""
    reference = _reference()
    S, T = rand(3, 4, seed=1) * 1e-160, rand(3, 4, seed=2) * 1e-150
    _assert_parity(_value_and_grad(losses.pkd_loss, S, T, None), _value_and_grad(reference.pkd_loss, S, T, None))


def test_reference_is_not_finite_where_kdcli_is():
    """The cases kdcli fixes really are broken in the reference (so the tests above mean something)."""
    reference = _reference()
    mask = make_mask()
    S, T = padded_scores(seed=1, fill=-math.inf), padded_scores(seed=2, fill=-math.inf)
    assert not torch.isfinite(reference.att_ce_loss(S, T, mask))
    assert not torch.isfinite(reference.att_mse_loss(S, T, mask))
    assert torch.isfinite(losses.att_ce_loss(S, T, mask)) and torch.isfinite(losses.att_mse_loss(S, T, mask))
    Z = torch.zeros(2, 3, dtype=F64)
    assert not torch.isfinite(reference.pkd_loss(Z, rand(2, 3)))


# --- on a GPU (skipped without one) --------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else [t.to(device) for t in x]


@cuda
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool], ids=["int-mask", "bool-mask"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cuda_matches_cpu(case: Case, mask_dtype):
    """On a GPU an int mask takes the general-weights path (no host check); same results."""
    S, T, mask = case.args()
    mask = None if mask is None else mask.to(mask_dtype)
    fn = getattr(losses, case.fn)
    on_cpu = _value_and_grad(fn, S, T, mask)
    on_gpu = _value_and_grad(fn, _to(S, "cuda"), _to(T, "cuda"), None if mask is None else mask.cuda())
    assert on_gpu[0].item() == pytest.approx(on_cpu[0].item(), rel=1e-10)
    assert torch.allclose(on_gpu[1].cpu(), on_cpu[1], rtol=1e-9, atol=1e-12)


@cuda
@pytest.mark.parametrize("fn", ATT_FNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_infinite_padding_and_half(fn, dtype):
    mask = make_mask().cuda()
    pad = (mask == 0)[:, None, None, :] | (mask == 0)[:, None, :, None]
    S = rand(B, H, L, L, seed=1).to("cuda", dtype).masked_fill(pad, -math.inf).requires_grad_(True)
    T = rand(B, H, L, L, seed=2).to("cuda", dtype).masked_fill(pad, torch.finfo(dtype).min)
    for m in (mask, None):
        got = getattr(losses, fn)(S, T, m)
        got.backward()
        assert got.dtype == torch.float32 and torch.isfinite(got)
        assert torch.isfinite(S.grad).all()
        S.grad = None


@cuda
def test_cuda_kd_and_schedules():
    from kdcli.schedules import build_temperature_scheduler

    S, T = rand(6, 4, 5, seed=1).cuda().requires_grad_(True), rand(6, 4, 5, seed=2).cuda()
    tau = build_temperature_scheduler(["flsw", 1, 2])(S, T, 4.0)
    assert tau.device.type == "cuda" and tau.shape == (6, 4)
    for fn in (losses.kd_ce_loss, losses.kd_mse_loss):
        got = fn(S, T, tau)
        expected = fn(S.detach().cpu(), T.cpu(), tau.cpu())
        assert got.item() == pytest.approx(expected.item(), rel=1e-10)
