"""kdcli.compress.block_ranking: choosing a shallower student's teacher blocks.

Tiny causal LMs (Llama, Qwen2, GPT-2) are built offline from a config with seeded weights.
Blocks made the identity (output projections zeroed, so the residual passes unchanged) must be
the ones dropped: BI = 0 (ShortGPT, arXiv:2403.03853) and the angular run covering exactly them
at distance 0 (Gromov et al., arXiv:2403.17887). Scores are also checked against a direct
computation from `output_hidden_states` (blocks 1..L-1) and the final norm's input (block L).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from torch import Tensor, nn

from kdcli.compress.block_ranking import BY, BlockRanking, evenly_spaced, rank_blocks
from kdcli.models import encoder_blocks

VOCAB = 64
PAD = 0


def _llama(layers: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _qwen2(layers: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _gpt2(layers: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


MODELS = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2}


def _make_identity(model: nn.Module, blocks: list[int]) -> None:
    """Zero the output projections of blocks (1-based): the block adds 0 to its residual."""
    layers = encoder_blocks(model).modules
    names = (
        ("attn.c_proj", "mlp.c_proj") if model.config.model_type == "gpt2" else ("self_attn.o_proj", "mlp.down_proj")
    )
    with torch.no_grad():
        for b in blocks:
            for name in names:
                proj = layers[b - 1].get_submodule(name)
                proj.weight.zero_()
                if getattr(proj, "bias", None) is not None:
                    proj.bias.zero_()


def _rows(n: int = 8, seed: int = 1) -> list[Tensor]:
    """n token rows of lengths 5..12 (ids 1.., never the pad id)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 13, (n,), generator=g).tolist()
    return [torch.randint(1, VOCAB, (k,), generator=g) for k in lengths]


def _collate(rows: list[Tensor], pad_to: int | None = None) -> dict[str, Tensor]:
    """Right-padded batch: input_ids (B, L), attention_mask (B, L)."""
    width = max(pad_to or 0, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = r
        mask[j, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _batches(rows: list[Tensor], size: int) -> list[dict[str, Tensor]]:
    return [_collate(rows[i : i + size]) for i in range(0, len(rows), size)]


def _close(a: dict[str, float], b: dict[str, float], rel: float, abs_: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=rel, abs=abs_), key


# -- identity blocks: hand-checked -------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_identity_blocks_have_zero_influence_and_are_dropped_first(arch: str) -> None:
    model = MODELS[arch]()
    _make_identity(model, [3, 4])
    ranking = rank_blocks(model, _batches(_rows(), 4), keep=4, by="block_influence")
    assert ranking.scores["3"] == pytest.approx(0.0, abs=1e-6)
    assert ranking.scores["4"] == pytest.approx(0.0, abs=1e-6)
    assert min(v for k, v in ranking.scores.items() if k not in ("3", "4")) > 1e-4
    assert ranking.dropped == (3, 4)
    assert ranking.kept == (1, 2, 5, 6)
    assert set(ranking.scores) == {"1", "2", "3", "4", "5", "6"}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_identity_run_has_zero_angular_distance_and_is_chosen(arch: str) -> None:
    model = MODELS[arch]()
    _make_identity(model, [2, 3, 4])
    ranking = rank_blocks(model, _batches(_rows(), 4), keep=3, by="angular_distance")
    assert list(ranking.scores) == ["1-3", "2-4", "3-5", "4-6"]
    assert ranking.scores["2-4"] == pytest.approx(0.0, abs=1e-6)
    assert min(v for k, v in ranking.scores.items() if k != "2-4") > 1e-4
    assert ranking.dropped == (2, 3, 4)
    assert ranking.kept == (1, 5, 6)


def test_influence_drops_non_contiguous_blocks() -> None:
    model = _llama()
    _make_identity(model, [2, 5])
    ranking = rank_blocks(model, _batches(_rows(), 8), keep=4, by="block_influence")
    assert ranking.dropped == (2, 5)
    assert ranking.kept == (1, 3, 4, 6)


def test_angular_single_block_is_identity_block() -> None:
    model = _gpt2()
    _make_identity(model, [6])
    ranking = rank_blocks(model, _batches(_rows(), 8), keep=5)
    assert list(ranking.scores) == ["1-1", "2-2", "3-3", "4-4", "5-5", "6-6"]
    assert ranking.scores["6-6"] == pytest.approx(0.0, abs=1e-6)
    assert ranking.dropped == (6,)


# -- against a direct computation ------------------------------------------------------------


def _direct_states(model: nn.Module, batch: dict[str, Tensor]) -> list[Tensor]:
    """h_0..h_L from `output_hidden_states` (0..L-1) and the final norm's input (L)."""
    norm = model.model.norm if model.config.model_type != "gpt2" else model.transformer.ln_f
    seen: list[Tensor] = []
    handle = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            out = model(**batch, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    states = list(out.hidden_states)
    assert not torch.equal(states[-1], seen[0])  # hidden_states[L] is the final norm's output
    return [*states[:-1], seen[0]]


def _direct_mean(states: list[Tensor], mask: Tensor, a: int, b: int, angular: bool) -> float:
    real = mask.bool()
    x, y = states[a][real].double(), states[b][real].double()
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    values = torch.arccos(cos.clamp(-1, 1)) / math.pi if angular else cos
    return float(values.mean())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scores_match_output_hidden_states(arch: str) -> None:
    model = MODELS[arch](seed=3)
    batch = _collate(_rows(6, seed=4))
    states = _direct_states(model, batch)
    layers = model.config.num_hidden_layers
    influence = rank_blocks(model, [batch], keep=4, by="block_influence")
    for i in range(1, layers + 1):
        expected = 1.0 - _direct_mean(states, batch["attention_mask"], i - 1, i, angular=False)
        assert influence.scores[str(i)] == pytest.approx(expected, rel=1e-9, abs=1e-12), i
    angular = rank_blocks(model, [batch], keep=4, by="angular_distance")
    for start in range(layers - 2 + 1):
        expected = _direct_mean(states, batch["attention_mask"], start, start + 2, angular=True)
        assert angular.scores[f"{start + 1}-{start + 2}"] == pytest.approx(expected, rel=1e-6, abs=1e-9), start
    best = min(angular.scores, key=angular.scores.__getitem__)
    first, last = (int(x) for x in best.split("-"))
    assert angular.dropped == tuple(range(first, last + 1))


def test_last_block_is_measured_before_the_final_norm() -> None:
    """BI_L uses block L's raw output; with hidden_states[L] (after the norm) it would differ.
    (An RMSNorm with its initial unit weight only rescales, which no cosine sees: give it others.)"""
    model = _llama(seed=5)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.2, 2.0, generator=torch.Generator().manual_seed(0))
    batch = _collate(_rows(4, seed=6))
    with torch.inference_mode():
        states = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
    after_norm = 1.0 - _direct_mean(list(states), batch["attention_mask"], 5, 6, angular=False)
    ranking = rank_blocks(model, [batch], keep=6, by="block_influence")
    assert abs(ranking.scores["6"] - after_norm) > 1e-3


# -- invariances -----------------------------------------------------------------------------


@pytest.mark.parametrize("by", BY)
def test_batching_does_not_change_scores(by: str) -> None:
    """One batch of 8 vs 4 of 2 (other padding widths). The model runs in float64 so that its
    own float32 rounding, which depends on the batch shape, does not hide the accumulation's."""
    model = _llama(seed=7).double()
    rows = _rows(8, seed=8)
    whole = rank_blocks(model, [_collate(rows)], keep=3, by=by)
    split = rank_blocks(model, _batches(rows, 2), keep=3, by=by)
    assert whole.tokens == split.tokens == sum(len(r) for r in rows)
    _close(whole.scores, split.scores, rel=1e-9)
    assert whole.kept == split.kept


@pytest.mark.parametrize("by", BY)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padding_does_not_change_scores(by: str, dtype: torch.dtype) -> None:
    """Rows padded with 28+ extra pad tokens (mask 0): exact up to the model's own rounding."""
    model = _gpt2(seed=9).to(dtype)
    rows = _rows(4, seed=10)
    plain = rank_blocks(model, [_collate(rows)], keep=4, by=by)
    padded = rank_blocks(model, [_collate(rows, pad_to=40)], keep=4, by=by)
    assert plain.tokens == padded.tokens
    rel = 1e-9 if dtype == torch.float64 else 1e-5
    _close(plain.scores, padded.scores, rel=rel, abs_=rel / 100)
    assert plain.kept == padded.kept


def test_all_padding_batches_and_extra_keys_are_ignored() -> None:
    model = _llama(seed=11)
    rows = _rows(4, seed=12)
    plain = rank_blocks(model, [_collate(rows)], keep=4, by="block_influence")
    empty = _collate(rows[:2])
    empty["attention_mask"].zero_()
    labelled = {**_collate(rows), "labels": torch.zeros(4, dtype=torch.long)}
    mixed = rank_blocks(model, [empty, labelled], keep=4, by="block_influence")
    assert mixed.tokens == plain.tokens
    _close(plain.scores, mixed.scores, rel=1e-9)


def test_no_attention_mask_means_all_tokens() -> None:
    model = _llama(seed=13)
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(14))
    bare = rank_blocks(model, [{"input_ids": ids}], keep=5, by="block_influence")
    masked = rank_blocks(
        model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], keep=5, by="block_influence"
    )
    assert bare.tokens == 21
    _close(bare.scores, masked.scores, rel=1e-9)


def test_batches_may_be_a_generator_and_keep_any_integer() -> None:
    model = _llama(seed=16)
    rows = _rows(6, seed=17)
    listed = rank_blocks(model, _batches(rows, 3), keep=4, by="block_influence")
    streamed = rank_blocks(model, iter(_batches(rows, 3)), keep=torch.tensor(4).item(), by="block_influence")
    assert streamed == listed
    assert rank_blocks(model, _batches(rows, 3), keep=torch.tensor(4), by="block_influence").kept == listed.kept


def test_model_state_is_restored_and_hooks_removed() -> None:
    model = _llama(seed=15).train()
    blocks = encoder_blocks(model).modules
    before = [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks]
    rank_blocks(model, [_collate(_rows(2))], keep=3)
    assert model.training
    assert [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks] == before


# -- keep = L, errors ------------------------------------------------------------------------


@pytest.mark.parametrize("by", BY)
def test_keep_all_drops_nothing(by: str) -> None:
    model = _llama()
    ranking = rank_blocks(model, [_collate(_rows(3))], keep=6, by=by)
    assert ranking.kept == (1, 2, 3, 4, 5, 6)
    assert ranking.dropped == ()
    assert ranking.tokens > 0
    if by == "block_influence":
        assert set(ranking.scores) == {str(i) for i in range(1, 7)}
    else:
        assert ranking.scores == {}
    assert "all blocks kept" in ranking.describe()


def test_keep_one() -> None:
    model = _llama()
    ranking = rank_blocks(model, [_collate(_rows(3))], keep=1)
    assert list(ranking.scores) == ["1-5", "2-6"]
    assert len(ranking.kept) == 1 and len(ranking.dropped) == 5


@pytest.mark.parametrize("keep", [0, -1, 7, 2.0, True])
def test_keep_out_of_range_is_a_value_error(keep) -> None:
    with pytest.raises(ValueError, match="keep must be a whole number from 1 to 6"):
        rank_blocks(_llama(), [_collate(_rows(2))], keep=keep)


def test_unknown_measure_is_a_value_error() -> None:
    with pytest.raises(
        ValueError, match="unknown block ranking 'cosine'; choose one of angular_distance, block_influence"
    ):
        rank_blocks(_llama(), [_collate(_rows(2))], keep=3, by="cosine")


@pytest.mark.parametrize("by", BY)
def test_no_real_tokens_is_a_value_error(by: str) -> None:
    batch = _collate(_rows(2))
    batch["attention_mask"].zero_()
    for batches in ([], [batch]):
        with pytest.raises(ValueError, match="no real tokens"):
            rank_blocks(_llama(), batches, keep=3, by=by)


# -- evenly_spaced ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_blocks", "keep", "expected"),
    [
        (12, 4, (3, 6, 9, 12)),
        (12, 6, (2, 4, 6, 8, 10, 12)),
        (12, 3, (4, 8, 12)),
        (6, 1, (6,)),
        (6, 6, (1, 2, 3, 4, 5, 6)),
        (24, 16, (2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24)),
        (30, 25, (1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 22, 23, 24, 25, 26, 28, 29, 30)),
        (30, 20, (2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24, 26, 27, 29, 30)),
        (28, 8, (4, 7, 11, 14, 18, 21, 25, 28)),
    ],
)
def test_evenly_spaced(num_blocks: int, keep: int, expected: tuple[int, ...]) -> None:
    assert evenly_spaced(num_blocks, keep) == expected


@pytest.mark.parametrize("num_blocks", [1, 2, 7, 12, 30, 64])
def test_evenly_spaced_properties(num_blocks: int) -> None:
    for keep in range(1, num_blocks + 1):
        blocks = evenly_spaced(num_blocks, keep)
        assert len(blocks) == keep
        assert blocks[-1] == num_blocks
        assert blocks[0] >= 1
        assert all(a < b for a, b in zip(blocks, blocks[1:]))


@pytest.mark.parametrize(("num_blocks", "keep"), [(12, 0), (12, 13), (12, -2)])
def test_evenly_spaced_rejects_bad_keep(num_blocks: int, keep: int) -> None:
    with pytest.raises(ValueError, match=f"from 1 to {num_blocks}"):
        evenly_spaced(num_blocks, keep)


# -- the record ------------------------------------------------------------------------------


@pytest.mark.parametrize("by", BY)
def test_to_dict_is_json_and_describe_is_one_line(by: str) -> None:
    model = _llama()
    _make_identity(model, [4])
    ranking = rank_blocks(model, _batches(_rows(), 4), keep=5, by=by)
    data = json.loads(json.dumps(ranking.to_dict()))
    assert data == {
        "by": by,
        "num_blocks": 6,
        "keep": 5,
        "kept": [1, 2, 3, 5, 6],
        "dropped": [4],
        "scores": ranking.scores,
        "tokens": ranking.tokens,
    }
    assert BlockRanking(**{**data, "kept": tuple(data["kept"]), "dropped": tuple(data["dropped"])}) == ranking
    line = ranking.describe()
    assert "\n" not in line
    assert "keeping teacher blocks 1-3, 5-6 of 6" in line
    assert f"{ranking.tokens} tokens" in line
    assert ("run 4-4" if by == "angular_distance" else "4: 0") in line


def test_ranking_is_frozen() -> None:
    ranking = BlockRanking("block_influence", 2, 1, (2,), (1,), {"1": 0.0, "2": 0.5}, 3)
    with pytest.raises(AttributeError):
        ranking.keep = 2  # type: ignore[misc]
