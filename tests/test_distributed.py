"""The parts of distributed runs that need no other process: how layers, heads, FFN units and
vocabulary rows are split, and reading a share of a tensor in every weight form.

The runs themselves (several processes on the ring backend) are in test_distributed_runs.py.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama.architectures import ModelConfig
from mlx_llama.distributed import SameOnEveryRank
from mlx_llama.distributed.base import Part
from mlx_llama.distributed.load import read_part, trim_columns
from mlx_llama.distributed.pipeline import split_layers
from mlx_llama.distributed.tensor import TensorSplit
from mlx_llama.gguf_file import TensorInfo
from mlx_llama.quants import Affine, Blocks, dequantize_blocks
from test_quants import T, decode, random_blocks

# SmolLM2-135M's shape: 9 query heads, 3 key/value heads of 64, FFN 1536, vocabulary 49152
SMOL = ModelConfig(architecture="llama", context_length=8192, hidden_size=576, num_layers=30, intermediate_size=1536,
                   num_heads=9, num_kv_heads=3, head_dim=64, rope_dims=64, rope_theta=1e5, rms_norm_eps=1e-5,
                   vocab_size=49152)


# -- pipeline: layers by bytes ------------------------------------------------------------------


def test_layers_split_evenly_when_equal():
    assert split_layers([10] * 6, 0, 3) == [range(0, 2), range(2, 4), range(4, 6)]


def test_rank0_takes_fewer_layers_for_the_vocabulary():
    # rank 0 holds 25 more: 2 layers (45) against 4 (40) is the smallest maximum (1: 35/50, 3: 55/30)
    assert split_layers([10] * 6, 25, 2) == [range(0, 2), range(2, 6)]


def test_uneven_layers_minimise_the_largest_rank():
    # loads: [50 | 10 10 10 | 40 10] → 50, 30, 50; any other cut has a rank above 50
    layers = split_layers([50, 10, 10, 10, 40, 10], 0, 3)
    loads = [sum([50, 10, 10, 10, 40, 10][i] for i in r) for r in layers]
    assert max(loads) == 50 and [len(r) for r in layers] == [1, 3, 2]


def test_every_rank_gets_a_layer():
    assert split_layers([1, 1, 100], 1000, 3) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(SameOnEveryRank, match="a pipeline over 4 ranks needs at least 4 layers; the model has 3"):
        split_layers([1, 1, 1], 0, 4)


# -- tensor parallel: heads, units, vocabulary rows -----------------------------------------------


@pytest.mark.parametrize("reduce", ["gather", "sum"])
def test_smollm2_over_3_ranks(reduce):
    s = TensorSplit(SMOL, 1, 3, reduce=reduce)
    assert (s.kv_heads, s.heads, s.units, s.vocab, s.hidden) == ((1, 2), (3, 6), (512, 1024), (16384, 32768), (192, 384))
    assert s.part("blk.4.attn_q.weight") == Part(rows=((192, 384),))
    assert s.part("blk.4.attn_k.weight") == s.part("blk.4.attn_v.weight") == Part(rows=((64, 128),))
    assert s.part("blk.4.ffn_gate.weight") == s.part("blk.4.ffn_up.weight") == Part(rows=((512, 1024),))
    assert s.part("token_embd.weight") == s.part("output.weight") == Part(rows=((16384, 32768),))
    for whole in ("blk.4.attn_norm.weight", "output_norm.weight"):
        assert s.part(whole) is None
    if reduce == "sum":  # the matching input columns; the biases added once, after the sum
        assert s.part("blk.4.attn_output.weight") == Part(cols=(192, 384))
        assert s.part("blk.4.ffn_down.weight") == Part(cols=(512, 1024))
        assert s.part("blk.4.attn_output.bias") is s.part("blk.4.ffn_down.bias") is None
    else:  # this rank's outputs of the hidden vector, weights and biases
        for name in ("attn_output.weight", "attn_output.bias", "ffn_down.weight", "ffn_down.bias"):
            assert s.part(f"blk.4.{name}") == Part(rows=((192, 384),))
        assert s.widths("attn_output") == [192] * 3 and s.widths("ffn_down") == [512] * 3
    local = s.local_config()
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (3, 1, 512, 16384)


def test_uneven_ffn_shares_are_gathered_in_rank_order():
    odd = dataclasses.replace(SMOL, intermediate_size=1280, num_kv_heads=9)
    assert TensorSplit(odd, 0, 3, unit=256).widths("ffn_down") == [256, 512, 512]
    assert [TensorSplit(odd, r, 3).hidden for r in range(3)] == [(0, 192), (192, 384), (384, 576)]


def test_unknown_reduction_is_refused():
    with pytest.raises(SameOnEveryRank, match="unknown tensor-parallel reduction 'max'"):
        TensorSplit(SMOL, 0, 3, reduce="max")


def test_gqa_heads_that_do_not_divide_are_refused():
    with pytest.raises(SameOnEveryRank) as e:
        TensorSplit(SMOL, 0, 2)
    assert str(e.value) == ("tensor parallelism over 2 ranks needs a key/value head count divisible by 2; this model "
                            "has 3 key/value heads (9 query heads): use 3 ranks, or --pipeline")
    assert "\n" not in str(e.value)


def test_fused_projections_take_each_segment():
    cfg = dataclasses.replace(SMOL, architecture="phi3", num_heads=6, num_kv_heads=2, fused_qkv=True)
    s = TensorSplit(cfg, 1, 2)  # query heads 3-5, kv head 1, FFN units 768-1535
    q, kv = cfg.q_dim, cfg.kv_dim  # 384, 128
    assert s.part("blk.0.attn_qkv.weight") == Part(rows=((192, 384), (q + 64, q + 128), (q + kv + 64, q + kv + 128)))
    assert s.part("blk.0.attn_qkv.bias") == s.part("blk.0.attn_qkv.weight")
    assert s.part("blk.0.ffn_up.weight") == Part(rows=((768, 1536), (1536 + 768, 1536 + 1536)))


def test_ffn_units_split_at_super_blocks_when_asked():
    assert [TensorSplit(SMOL, r, 3, unit=256).units for r in range(3)] == [(0, 512), (512, 1024), (1024, 1536)]
    odd = dataclasses.replace(SMOL, intermediate_size=1280, num_kv_heads=9)  # 5 super-blocks over 3 ranks
    assert [TensorSplit(odd, r, 3, unit=256).units for r in range(3)] == [(0, 256), (256, 768), (768, 1280)]
    assert [TensorSplit(odd, r, 3, unit=32).units for r in range(3)] == [(0, 416), (416, 832), (832, 1280)]


def test_uneven_vocabulary_pads_only_the_last_share():
    cfg = dataclasses.replace(SMOL, vocab_size=100)
    assert [TensorSplit(cfg, r, 3).vocab for r in range(3)] == [(0, 34), (34, 68), (68, 100)]


# -- reading a share of a tensor ------------------------------------------------------------------


def values(w) -> np.ndarray:
    """The float32 values a layer computes with, for each form (Affine: its compact form)."""
    if isinstance(w, Affine):
        w = dataclasses.replace(w, exact=None).dequantize()
    elif isinstance(w, Blocks):
        w = dequantize_blocks(w.ggml_type, w.fields, mx.float32)
    return np.array(w.astype(mx.float32))


TYPES = [T.F16, T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K]
ROWS, COLS = 7, 768


def tensor(qtype) -> TensorInfo:
    if qtype == T.F16:
        data = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float16).view(np.uint8)
    else:
        block = 256 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K) else 32
        data = random_blocks(qtype, ROWS, COLS // block)
    return TensorInfo("blk.0.ffn_down.weight", int(qtype), (ROWS, COLS), data)


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
@pytest.mark.parametrize("cols", [(256, 512), (64, 192), (0, 100), None], ids=["super-block", "group", "unaligned", "all"])
@pytest.mark.parametrize("expand", [False, True], ids=["compact", "expanded"])
def test_a_share_is_the_slice_of_the_whole(qtype, cols, expand):
    t = tensor(qtype)
    whole = values(decode(qtype, t.data, t.shape, expand=expand, dense_dtype=mx.float32))
    rows = ((1, 3), (4, 7))
    got = read_part("t.gguf", t, Part(rows=rows, cols=cols), mx.float32, expand)
    a, b = cols or (0, COLS)
    np.testing.assert_array_equal(values(got), np.concatenate([whole[r0:r1, a:b] for r0, r1 in rows]))
    # the compact form is kept where the bounds fall on its blocks
    kept = not expand and qtype != T.F16 and (a % 32 == 0 and b % 32 == 0)
    if qtype in (T.Q6_K, T.Q2_K):
        kept = kept and a % 256 == 0 and b % 256 == 0
    assert isinstance(got, mx.array) != kept


def test_vector_rows_are_its_elements():
    v = np.arange(12, dtype=np.float32)
    t = TensorInfo("blk.0.attn_q.bias", int(T.F32), (12,), v.view(np.uint8))
    got = read_part("t.gguf", t, Part(rows=((2, 5), (8, 10))), mx.float32, False)
    np.testing.assert_array_equal(np.array(got), [2, 3, 4, 8, 9])


def test_trimmed_affine_keeps_whole_words():
    # 5-bit values straddle bytes: a group of 32 is 5 whole words, so cutting at groups is exact
    t = tensor(T.Q5_K)
    whole = decode(T.Q5_K, t.data, t.shape)
    part = trim_columns(whole, 96, 160, mx.float32)
    assert isinstance(part, Affine) and part.bits == 5
    assert part.weight.shape == (ROWS, 64 * 5 // 32) and part.scales.shape == (ROWS, 2)
    np.testing.assert_array_equal(values(part), values(whole)[:, 96:160])
