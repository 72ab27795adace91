"""kdcli.losses.divergences and kdcli.losses.chunked: hand values, gradients, top-k, the ends of
the skewed and generalized divergences, precision, and chunked == full logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcli import registry
from kdcli.losses.chunked import IGNORE_INDEX, chunked_kd_loss
from kdcli.losses.divergences import (
    forward_kl,
    jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    top_k_log_probs,
    tvd,
)

F64 = torch.float64


def per_token(name: str):
    """The per-token form of a kd loss, as the run looks it up (the registry)."""
    return registry.get_loss(name).token_fn()


#: (name, options) covering every divergence and its parameters
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.2, "normalise": True}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.3}),
    ("tvd", {}),
]
IDS = [f"{n}{o}" for n, o in CASES]


def _pair(n=4, v=6, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=dtype) * 2, torch.randn(n, v, generator=g, dtype=dtype) * 2


# ---- hand values ----------------------------------------------------------------------------

ZS, ZT, T = [1.0, -0.5, 2.0], [0.3, 1.2, -1.0], 2.0


def _softmax(z, t):
    e = [math.exp(x / t) for x in z]
    return [x / sum(e) for x in e]


def _kl_py(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def _hand(name, opts):
    p, q = _softmax(ZT, T), _softmax(ZS, T)
    if name == "forward_kl":
        return _kl_py(p, q)
    if name == "reverse_kl":
        return _kl_py(q, p)
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if name == "skew_kl":
        a = opts["alpha"]
        return _kl_py(p, [a * x + (1 - a) * y for x, y in zip(p, q)])
    if name == "skew_reverse_kl":
        a = opts["alpha"]
        return _kl_py(q, [(1 - a) * x + a * y for x, y in zip(p, q)])
    b = opts["beta"]
    if b == 0:
        return _kl_py(p, q)
    if b == 1:
        return _kl_py(q, p)
    m = [b * x + (1 - b) * y for x, y in zip(p, q)]
    value = b * _kl_py(p, m) + (1 - b) * _kl_py(q, m)
    return value / (b * (1 - b)) if opts.get("normalise") else value


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@pytest.mark.parametrize("t_squared", [False, True])
def test_hand_values(name, opts, t_squared):
    got = per_token(name)(
        torch.tensor([ZS], dtype=F64), torch.tensor([ZT], dtype=F64), temperature=T, t_squared=t_squared, **opts
    )
    want = _hand(name, opts) * (T**2 if t_squared else 1)
    assert got.shape == (1,) and got.dtype == F64
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@pytest.mark.parametrize("top_k", [None, (3, "renormalise"), (3, "tail")])
def test_gradcheck(name, opts, top_k):
    S, Tt = _pair()
    S.requires_grad_(True)
    kw = {} if top_k is None else {"top_k": top_k[0], "top_k_mode": top_k[1]}
    assert torch.autograd.gradcheck(lambda s: per_token(name)(s, Tt, temperature=1.5, **opts, **kw), (S,))


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_zero_when_equal_and_nonnegative(name, opts):
    S, Tt = _pair(n=8, v=10)
    fn = per_token(name)
    assert (fn(S, Tt, **opts) >= 0).all()
    assert fn(Tt, Tt, **opts).abs().max() < 1e-14


# ---- ends and limits ------------------------------------------------------------------------


def test_jsd_ends_are_trl_and_normalised_form_is_continuous():
    S, Tt = _pair(n=5, v=7)
    fkl, rkl = forward_kl(S, Tt), reverse_kl(S, Tt)
    assert torch.equal(jsd(S, Tt, beta=0.0), fkl) and torch.equal(jsd(S, Tt, beta=1.0), rkl)
    for normalise in (False, True):
        assert torch.equal(jsd(S, Tt, beta=0.0, normalise=normalise), fkl)
        assert torch.equal(jsd(S, Tt, beta=1.0, normalise=normalise), rkl)
    # the normalised form differs from its ends by O(beta) (here ~1e-5 relative at 1e-6)
    for eps, rtol in ((1e-6, 1e-4), (1e-10, 1e-8)):
        torch.testing.assert_close(jsd(S, Tt, beta=eps, normalise=True), fkl, rtol=rtol, atol=0)
        torch.testing.assert_close(jsd(S, Tt, beta=1 - eps, normalise=True), rkl, rtol=rtol, atol=0)
    eps = 1e-6
    # TRL's form is discontinuous at the ends: J(beta) ~ beta KL(p || q) near 0.
    torch.testing.assert_close(jsd(S, Tt, beta=eps), eps * fkl, rtol=1e-4, atol=0)
    torch.testing.assert_close(jsd(S, Tt, beta=1 - eps), eps * rkl, rtol=1e-4, atol=0)
    # continuity also holds in float32 (the logaddexp form has no cancellation)
    S32, T32 = S.float(), Tt.float()
    torch.testing.assert_close(jsd(S32, T32, beta=eps, normalise=True), fkl.float(), rtol=1e-4, atol=0)


def test_jsd_is_trl_generalized_jsd_inside():
    """TRL GKDTrainer.generalized_jsd_loss for beta in (0, 1), written out (per token, no reduction)."""
    S, Tt = _pair(n=5, v=7)
    for beta in (0.1, 0.5, 0.9):
        lq, lp = F.log_softmax(S / 2, -1), F.log_softmax(Tt / 2, -1)
        b = torch.tensor(beta, dtype=F64)
        lm = torch.logsumexp(torch.stack([lq + torch.log1p(-b), lp + torch.log(b)]), dim=0)
        kl_t = F.kl_div(lm, lp, reduction="none", log_target=True).sum(-1)
        kl_s = F.kl_div(lm, lq, reduction="none", log_target=True).sum(-1)
        torch.testing.assert_close(jsd(S, Tt, beta=beta, temperature=2.0), beta * kl_t + (1 - beta) * kl_s)
        torch.testing.assert_close(
            jsd(S, Tt, beta=beta, temperature=2.0, normalise=True), (beta * kl_t + (1 - beta) * kl_s) / (b * (1 - b))
        )


def test_skew_ends():
    S, Tt = _pair(n=5, v=7)
    assert torch.equal(skew_kl(S, Tt, alpha=1.0), torch.zeros(5, dtype=F64))
    assert torch.equal(skew_reverse_kl(S, Tt, alpha=1.0), torch.zeros(5, dtype=F64))
    torch.testing.assert_close(skew_kl(S, Tt, alpha=0.0), forward_kl(S, Tt), rtol=0, atol=0)
    torch.testing.assert_close(skew_reverse_kl(S, Tt, alpha=0.0), reverse_kl(S, Tt), rtol=0, atol=0)
    torch.testing.assert_close(skew_kl(S, Tt, alpha=1e-9), forward_kl(S, Tt), rtol=1e-7, atol=0)
    torch.testing.assert_close(skew_kl(S, Tt, alpha=1 - 1e-9), torch.zeros(5, dtype=F64), rtol=0, atol=1e-8)
    S.requires_grad_(True)
    skew_kl(S, Tt, alpha=1.0).sum().backward()  # still a graph: a zero gradient, no error
    assert torch.equal(S.grad, torch.zeros_like(S))


def test_forward_kl_is_torchtune_cross_entropy_minus_teacher_entropy():
    """torchtune's ForwardKLLoss computes -sum p log q (the cross-entropy, with p = 0 terms
    dropped): it differs from forward KL by the teacher's entropy, a constant in the student."""
    S, Tt = _pair(n=5, v=7)
    p = F.softmax(Tt, dim=-1)
    prod = torch.masked_fill(p * F.log_softmax(S, dim=-1), torch.isinf(S), 0)  # torchtune's formula
    torchtune_style = -prod.sum(-1)
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(forward_kl(S, Tt), torchtune_style - entropy)


def test_minus_inf_logits_give_finite_losses_and_gradients():
    S, Tt = _pair(n=3, v=6)
    S[:, -2:] = float("-inf")  # a padded vocabulary, in both models
    Tt[:, -2:] = float("-inf")
    for name, opts in CASES:
        s = S.clone().requires_grad_(True)
        loss = per_token(name)(s, Tt, **opts)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all(), name
        torch.testing.assert_close(loss, per_token(name)(S[:, :-2], Tt[:, :-2], **opts), msg=name)


# ---- top-k ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["renormalise", "tail"])
def test_top_k_equal_to_vocab_is_the_full_divergence(name, opts, mode):
    S, Tt = _pair(n=4, v=6)
    fn = per_token(name)
    full = fn(S, Tt, temperature=1.3, **opts)
    for k in (6, 100):
        torch.testing.assert_close(fn(S, Tt, temperature=1.3, top_k=k, top_k_mode=mode, **opts), full)


def test_top_k_log_probs_by_hand():
    S = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=F64)
    Tt = torch.tensor([[4.0, 0.0, 3.0, 1.0]], dtype=F64)  # teacher's top 2: ids 0, 2
    lq, lp = top_k_log_probs(S, Tt, 2, "renormalise")
    torch.testing.assert_close(lq.exp(), F.softmax(torch.tensor([[0.0, 2.0]], dtype=F64), -1))
    torch.testing.assert_close(lp.exp(), F.softmax(torch.tensor([[4.0, 3.0]], dtype=F64), -1))
    lq, lp = top_k_log_probs(S, Tt, 2, "tail", temperature=2.0)
    q, p = F.softmax(S / 2, -1)[0], F.softmax(Tt / 2, -1)[0]
    torch.testing.assert_close(lq.exp()[0], torch.stack([q[0], q[2], q[1] + q[3]]))
    torch.testing.assert_close(lp.exp()[0], torch.stack([p[0], p[2], p[1] + p[3]]))
    got = forward_kl(S, Tt, temperature=2.0, top_k=2, top_k_mode="tail")
    want = sum(a * math.log(a / b) for a, b in zip([p[0], p[2], p[1] + p[3]], [q[0], q[2], q[1] + q[3]]))
    assert got.item() == pytest.approx(float(want), rel=1e-12)


# ---- precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_half_inputs_give_float32(name, opts, dtype):
    S, Tt = _pair(n=4, v=50, dtype=torch.float32)
    S, Tt = S.to(dtype), Tt.to(dtype)
    for kw in ({}, {"top_k": 5, "top_k_mode": "tail"}):
        got = per_token(name)(S, Tt, **opts, **kw)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, per_token(name)(S.float(), Tt.float(), **opts, **kw))


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("jsd", {"beta": -0.1}, "jsd: beta must be in"),
        ("jsd", {"beta": 1.5}, "jsd: beta must be in"),
        ("skew_kl", {"alpha": 2}, "skew_kl: alpha must be in"),
        ("skew_reverse_kl", {"alpha": -1}, "skew_reverse_kl: alpha must be in"),
        ("forward_kl", {"temperature": 0}, "forward_kl: temperature must be"),
        ("tvd", {"temperature": -1.0}, "tvd: temperature must be"),
        ("reverse_kl", {"top_k": 0}, "reverse_kl: top_k must be"),
        ("forward_kl", {"top_k": 2, "top_k_mode": "bucket"}, "top_k_mode must be one of"),
        ("forward_kl", {"t_squared": 1}, "t_squared must be a bool"),
    ],
)
def test_range_errors(name, kwargs, match):
    S, Tt = _pair()
    with pytest.raises(ValueError, match=match):
        per_token(name)(S, Tt, **kwargs)


def test_shape_errors():
    S, Tt = _pair()
    with pytest.raises(ValueError, match=r"forward_kl: student_logits has shape \(4, 6\) but teacher_logits"):
        forward_kl(S, Tt[:, :5])
    with pytest.raises(ValueError, match=r"tvd: student_logits has shape \(6,\); expected \(N, V\)"):
        tvd(S[0], Tt[0])


# ---- chunked --------------------------------------------------------------------------------


def _model_inputs(n=11, v=9, d_s=5, d_t=4, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 3, 4]] = IGNORE_INDEX
    return r(n, d_s), r(v, d_s), r(v), r(n, d_t), r(v, d_t), r(v), labels


def _full(h_S, W_S, b_S, h_T, W_T, b_T, labels, name, opts, temperature, weight, normaliser=None):
    """The plain implementation: full (N, V) logits, masked mean."""
    z_S, z_T = F.linear(h_S, W_S, b_S), F.linear(h_T, W_T, b_T).detach()
    keep = labels != IGNORE_INDEX
    per = per_token(name)(z_S, z_T, temperature=temperature, **opts)
    total = per[keep].sum() + weight * F.cross_entropy(z_S.to(per.dtype), labels, reduction="sum")
    return total / (keep.sum() if normaliser is None else normaliser)


CHUNKED_CASES = [
    *CASES[:4],
    CASES[6],
    ("tvd", {}),
    ("forward_kl", {"top_k": 4, "top_k_mode": "tail", "t_squared": True}),
]


@pytest.mark.parametrize("name,opts", CHUNKED_CASES, ids=[f"{n}{o}" for n, o in CHUNKED_CASES])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11, 50])
def test_chunked_equals_full_logits(name, opts, chunk_size):
    h_S, W_S, b_S, h_T, W_T, b_T, labels = _model_inputs()
    leaves = [x.clone().requires_grad_(True) for x in (h_S, W_S, b_S)]
    ref = _full(*leaves, h_T, W_T, b_T, labels, name, opts, 2.0, 0.5)
    ref_grads = torch.autograd.grad(ref, leaves)
    mine = [x.clone().requires_grad_(True) for x in (h_S, W_S, b_S)]
    got = chunked_kd_loss(
        mine[0], mine[1], h_T, W_T, bias_S=mine[2], bias_T=b_T, divergence=per_token(name), divergence_options=opts,
        chunk_size=chunk_size, temperature=2.0, hard_label_weight=0.5, labels=labels,
    )  # fmt: skip
    got_grads = torch.autograd.grad(got, mine)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_chunked_float32_and_bf16():
    h_S, W_S, b_S, h_T, W_T, b_T, labels = _model_inputs(dtype=torch.float32)
    leaves = [x.clone().requires_grad_(True) for x in (h_S, W_S)]
    ref = _full(*leaves, None, h_T, W_T, None, labels, "forward_kl", {}, 1.0, 0.0)
    ref_grads = torch.autograd.grad(ref, leaves)
    mine = [x.clone().requires_grad_(True) for x in (h_S, W_S)]
    got = chunked_kd_loss(mine[0], mine[1], h_T, W_T, chunk_size=4, labels=labels)
    torch.testing.assert_close(got, ref)  # float32 rounding
    for a, b in zip(torch.autograd.grad(got, mine), ref_grads):
        torch.testing.assert_close(a, b)
    half = [x.to(torch.bfloat16).requires_grad_(True) for x in (h_S, W_S)]
    got = chunked_kd_loss(half[0], half[1], h_T.bfloat16(), W_T.bfloat16(), chunk_size=4, labels=labels)
    assert got.dtype == torch.float32
    got.backward()
    assert half[0].grad.dtype == torch.bfloat16 and half[1].grad.dtype == torch.bfloat16


def test_chunked_gradcheck():
    h_S, W_S, b_S, h_T, W_T, b_T, labels = _model_inputs(n=7, v=6, d_s=3, d_t=2)
    leaves = tuple(x.requires_grad_(True) for x in (h_S, W_S, b_S))

    def f(h, W, b):
        return chunked_kd_loss(
            h, W, h_T, W_T, bias_S=b, divergence=jsd, divergence_options={"beta": 0.3, "top_k": 4},
            chunk_size=3, temperature=1.5, hard_label_weight=0.7, labels=labels,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, leaves)


def test_chunked_ignored_rows_and_normaliser():
    h_S, W_S, b_S, h_T, W_T, b_T, labels = _model_inputs()
    h = h_S.clone().requires_grad_(True)
    loss = chunked_kd_loss(h, W_S, h_T, W_T, chunk_size=4, labels=labels, hard_label_weight=1.0)
    loss.backward()
    ignored = labels == IGNORE_INDEX
    assert torch.equal(h.grad[ignored], torch.zeros_like(h.grad[ignored])) and h.grad[~ignored].abs().min() > 0
    h_other = h_S.clone()
    h_other[ignored] = 1e3  # anything: ignored rows contribute nothing
    other = chunked_kd_loss(h_other, W_S, h_T, W_T, chunk_size=4, labels=labels, hard_label_weight=1.0)
    torch.testing.assert_close(other, loss.detach(), rtol=1e-12, atol=0)
    step = chunked_kd_loss(h_S, W_S, h_T, W_T, chunk_size=4, labels=labels, hard_label_weight=1.0, normaliser=40)
    torch.testing.assert_close(step, loss.detach() * int((~ignored).sum()) / 40)
    everything = chunked_kd_loss(h_S, W_S, h_T, W_T, chunk_size=5)  # no labels: every row, mean over N
    z_S, z_T = F.linear(h_S, W_S), F.linear(h_T, W_T)
    torch.testing.assert_close(everything, forward_kl(z_S, z_T).mean())
    all_ignored = torch.full_like(labels, IGNORE_INDEX)
    assert chunked_kd_loss(h_S, W_S, h_T, W_T, labels=all_ignored).item() == 0.0


@pytest.mark.parametrize(
    "change,match",
    [
        ({"hidden_T": torch.zeros(10, 4, dtype=F64)}, "hidden_T has N = 10 but 11"),
        ({"bias_T": torch.zeros(8, dtype=F64)}, "bias_T has V_T = 8 but 9"),
        ({"vocab": 10}, "vocab must be an int from 1 to the smallest head's 9 rows"),
        ({"head_S": torch.zeros(9, 6, dtype=F64)}, "head_S has D_S = 6 but 5"),
        ({"bias_S": torch.zeros(8, dtype=F64)}, "bias_S has V = 8 but 9"),
        ({"hidden_S": torch.zeros(11, dtype=F64)}, r"hidden_S has shape \(11,\); expected \(N, D_S\)"),
        ({"chunk_size": 0}, "chunk_size must be an int >= 1"),
        ({"divergence": "forward_kl"}, "divergence must be a per-token function"),
        ({"hard_label_weight": 1.0, "labels": None}, "hard_label_weight = 1.0 needs labels"),
        ({"hard_label_weight": -1.0}, "hard_label_weight must be a number >= 0"),
        ({"labels": torch.zeros(11)}, "labels must be integer of shape"),
        ({"normaliser": 0}, "normaliser must be > 0"),
        ({"temperature": 0.0}, "forward_kl: temperature must be"),
    ],
)
def test_chunked_errors(change, match):
    h_S, W_S, b_S, h_T, W_T, b_T, labels = _model_inputs()
    kwargs = dict(hidden_S=h_S, head_S=W_S, hidden_T=h_T, head_T=W_T, labels=labels) | change
    with pytest.raises(ValueError, match=f"chunked_kd_loss: {match}" if "temperature" not in change else match):
        chunked_kd_loss(**kwargs)


def test_chunked_holds_one_chunk_of_logits_and_takes_a_callable():
    """The divergence only ever sees chunk_size rows of logits; a callable works as a name does;
    only the inputs that require grad get one."""
    h_S, W_S, b_S, h_T, W_T, b_T, labels = _model_inputs()
    seen = []

    def recording(z_S, z_T, **kwargs):
        seen.append((tuple(z_S.shape), tuple(z_T.shape)))
        return reverse_kl(z_S, z_T, **kwargs)

    W = W_S.clone().requires_grad_(True)
    got = chunked_kd_loss(h_S, W, h_T, W_T, divergence=recording, chunk_size=4, labels=labels, temperature=1.5)
    got.backward()
    assert seen == [((4, 9), (4, 9)), ((4, 9), (4, 9)), ((3, 9), (3, 9))]
    W_ref = W_S.clone().requires_grad_(True)
    ref = _full(h_S, W_ref, None, h_T, W_T, None, labels, "reverse_kl", {}, 1.5, 0.0)
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(W.grad, W_ref.grad)


# ---- padded vocabularies: the KD term compares the ids both heads have -------------------------


def _hand_kd(z_S, z_T, name, opts, temperature):
    """Per-token KD of (N, V) logits on equal ids, written out in float64 (no kdcli function)."""
    z_S, z_T = z_S.double() / temperature, z_T.double() / temperature
    k = opts.get("top_k")
    if k is not None:  # the teacher's top-k ids, renormalised on both sides
        idx = z_T.topk(k, dim=-1).indices
        z_S, z_T = z_S.gather(-1, idx), z_T.gather(-1, idx)
    log_q, log_p = z_S.log_softmax(-1), z_T.log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    if name == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    b = opts["beta"]  # jsd
    log_m = (b * p + (1 - b) * q).log()
    return b * (p * (log_p - log_m)).sum(-1) + (1 - b) * (q * (log_q - log_m)).sum(-1)


PADDED_CASES = [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("forward_kl", {"top_k": 3})]


@pytest.mark.parametrize("name,opts", PADDED_CASES, ids=["forward_kl", "jsd", "top_k"])
@pytest.mark.parametrize("v_S,v_T", [(12, 9), (9, 12)], ids=["student>teacher", "teacher>student"])
def test_padded_heads_compare_the_shared_ids(name, opts, v_S, v_T):
    """A student head of 12 rows against a teacher's 9 (and the other way round) was a
    ValueError; the KD term is the divergence on the first min(V_S, V_T) ids, the hard-label
    term the student's whole head, and the gradients those of that reference."""
    h_S, W_S, b_S, h_T, W_T, b_T, labels = _model_inputs(v=12)
    W_S, b_S, W_T, b_T = W_S[:v_S], b_S[:v_S], W_T[:v_T], b_T[:v_T]
    shared, keep = min(v_S, v_T), labels != IGNORE_INDEX
    labels = torch.where(keep, labels % shared, labels)  # token ids: the tokenizer's, below both sizes
    leaves = [x.clone().requires_grad_(True) for x in (h_S, W_S, b_S)]
    z_S, z_T = F.linear(leaves[0], leaves[1], leaves[2]), F.linear(h_T, W_T, b_T)
    kd = _hand_kd(z_S[:, :shared], z_T[:, :shared], name, opts, 2.0)[keep].sum()
    ce = F.cross_entropy(z_S, labels, reduction="sum")
    want = (kd + 0.5 * ce) / keep.sum()
    want.backward()
    got_leaves = [x.clone().requires_grad_(True) for x in (h_S, W_S, b_S)]
    got = chunked_kd_loss(
        got_leaves[0], got_leaves[1], h_T, W_T, bias_S=got_leaves[2], bias_T=b_T, divergence=per_token(name),
        divergence_options=opts, chunk_size=4, temperature=2.0, hard_label_weight=0.5, labels=labels,
    )  # fmt: skip
    got.backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    for mine, ref in zip(got_leaves, leaves):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["renormalise", "tail"])
def test_cached_top_k_ids_beyond_the_students_vocabulary_are_not_used(mode):
    """The teacher cache stores top-k ids of the teacher's whole (padded) head: ids >= the
    student's compared vocabulary were an index error; they now count on neither side, their
    mass joining the teacher's tail bucket in tail mode."""
    from kdcli.losses.divergences import CachedTopK

    z_S, z_T = _pair(n=5, v=12, seed=4)
    z_T[0, 10:] = 9.0  # row 0: the teacher's two most likely ids are padding rows
    z_T[1, :] = -9.0
    z_T[1, 9:] = 9.0  # row 1: all three of them
    k, shared, t = 3, 9, 2.0
    log_p_full = (z_T / t).log_softmax(-1)
    ids = log_p_full.topk(k, dim=-1).indices
    log_p_k = log_p_full.gather(-1, ids)
    tail = log_p_full.scatter(-1, ids, float("-inf")).logsumexp(-1)
    cached = CachedTopK(ids.int(), log_p_k, tail)
    got = forward_kl(z_S[:, :shared], cached, temperature=t, top_k=k, top_k_mode=mode)
    assert torch.isfinite(got).all()
    log_q_full = (z_S[:, :shared] / t).log_softmax(-1)
    for row in range(5):
        keep = ids[row] < shared
        p, q = log_p_k[row][keep], log_q_full[row][ids[row][keep]]
        if mode == "tail":
            p_tail = torch.logaddexp(tail[row], log_p_k[row][~keep].logsumexp(0)) if (~keep).any() else tail[row]
            taken = torch.zeros(shared, dtype=torch.bool)
            taken[ids[row][keep]] = True
            p, q = torch.cat([p, p_tail[None]]), torch.cat([q, log_q_full[row][~taken].logsumexp(0)[None]])
        else:
            p, q = p.log_softmax(0), q.log_softmax(0)
        want = (p.exp() * (p - q)).sum() if keep.any() or mode == "tail" else torch.zeros((), dtype=F64)
        torch.testing.assert_close(got[row], want, rtol=1e-10, atol=1e-12)
