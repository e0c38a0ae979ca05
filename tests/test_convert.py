"""GGUF ⇄ mlx-lm directories (`mlx_llama.convert`), on tiny random files of every architecture:
the directory is the GGUF file's model (mlx_llama loads it to the same logits, bit for bit),
mlx-lm runs it (same logits, same greedy tokens), and converted back it is the same file.
"""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_llama
from mlx_llama.convert import gguf_to_mlx, to_gguf
from mlx_llama.gguf_file import GGUFFile

TESTS = Path(__file__).resolve().parent
ARCHES = ["llama", "qwen2", "qwen3", "phi3", "gemma3"]
MIXED = {"default": "Q4_1", "token_embd": "Q8_0", "blk.0.ffn_down": "F16"}
TOKENS = list(range(5, 45))
PROMPT = [1, 504, 3458, 282, 4649, 314]


def tiny(tiny_gguf, arch, **kw):
    # mlx-lm's Gemma-3 indexes its caches by the sliding-window pattern (3 here): it needs that many layers
    return tiny_gguf(MIXED, arch=arch, tied=False, n_layers=4 if arch == "gemma3" else 2, **kw)


def logits(path, tokens=TOKENS, **kw) -> np.ndarray:
    model, _ = mlx_llama.load(path, cpu_dequantize=kw.pop("cpu_dequantize", True), **kw)
    return np.array(model(mx.array([tokens]))[0])


def greedy(path, prompt, n):
    """mlx_llama's greedy continuation of `prompt` (end-of-generation excluded) and each step's top-2 gap."""
    model, tokenizer = mlx_llama.load(path, cpu_dequantize=True)
    cache, ids, gaps = model.make_cache(), [], []
    out = model(mx.array([prompt]), cache)[0, -1]
    for _ in range(n):
        top2 = np.sort(np.array(out))[-2:]
        token = int(mx.argmax(out).item())
        gaps.append(float(top2[1] - top2[0]))
        if token in tokenizer.stop_ids:
            break
        ids.append(token)
        out = model(mx.array([[token]]), cache)[0, -1]
    return ids, gaps


def assert_same_greedy(ours, gaps, theirs, tolerance):
    """Equal, or diverging only where mlx_llama's top-2 logits were within `tolerance`."""
    n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    if n < min(len(ours), len(theirs)) or len(ours) != len(theirs):
        assert n < len(gaps) and gaps[n] < tolerance, f"diverge at {n} (top-2 gap {gaps[n]:.3f}): {ours} vs {theirs}"


def run_mlx_lm(runs: list[dict], tmp_path) -> dict:
    """`mlx_lm_run.py` in its own process (mlx-lm imports transformers)."""
    pytest.importorskip("mlx_lm", reason="mlx-lm runs the converted directories (pip install mlx-lm)")
    spec, out = tmp_path / "spec.json", tmp_path / "out.npz"
    spec.write_text(json.dumps([{**r, "dir": str(r["dir"])} for r in runs]))
    r = subprocess.run([sys.executable, str(TESTS / "mlx_lm_run.py"), str(spec), str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(np.load(out))


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    """arch → (GGUF file, its mlx-lm directory in float32: every value kept)."""
    root, out = tmp_path_factory.mktemp("converted"), {}
    for arch in ARCHES:
        gguf_to_mlx(tiny(tiny_gguf, arch), root / arch, dtype="float32")
        out[arch] = tiny(tiny_gguf, arch), root / arch
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_directory_is_the_gguf_model(converted, arch, tmp_path):
    path, directory = converted[arch]
    np.testing.assert_array_equal(logits(directory), logits(path))  # weights as gguf computes them
    if arch == "llama":  # the same for every architecture: MLX's quantized kernels, other scale dtype
        compact, reference = logits(directory, cpu_dequantize=False), logits(path, cpu_dequantize=False)
        np.testing.assert_allclose(compact, reference, atol=1e-4)
    assert {p.name for p in directory.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}

    reports = to_gguf(directory, tmp_path / "back.gguf")
    assert all(r.max_error == 0 for r in reports), reports
    original, back = GGUFFile(path), GGUFFile(tmp_path / "back.gguf")
    assert back.tensors.keys() == original.tensors.keys()
    for name, t in original.tensors.items():
        assert back.tensors[name].ggml_type == t.ggml_type, name
        np.testing.assert_array_equal(np.asarray(back.tensors[name].data), np.asarray(t.data), err_msg=name)
    # the vocabulary, special tokens and chat template, through tokenizer.json and back
    tokenizer = [k for k in original.metadata if k.startswith("tokenizer.") and k != "tokenizer.ggml.add_space_prefix"]
    assert {k: back.metadata[k] for k in tokenizer} == {k: original.metadata[k] for k in tokenizer}
    assert {k: v for k, v in back.metadata.items() if k.startswith(arch)} == {
        k: v for k, v in original.metadata.items() if k.startswith(arch)}


@pytest.fixture(scope="module")
def mlx_lm_outputs(converted, tiny_gguf, tmp_path_factory):
    """mlx-lm on every architecture's directory, a float16 one and a sharded one: one process."""
    root = tmp_path_factory.mktemp("mlx_lm")
    llama = tiny(tiny_gguf, "llama")
    gguf_to_mlx(llama, root / "float16")
    gguf_to_mlx(llama, root / "sharded", dtype="float32", max_shard_bytes=300_000)
    dirs = [converted[a][1] for a in ARCHES] + [root / "float16", root / "sharded"]
    return run_mlx_lm([{"dir": d, "tokens": TOKENS, "prompt": PROMPT, "max_tokens": 12} for d in dirs], root)


@pytest.mark.slow  # mlx-lm's start-up and its runs: ~1 minute
@pytest.mark.parametrize("arch", ARCHES)
def test_mlx_lm_runs_every_architecture(converted, mlx_lm_outputs, arch):
    i = ARCHES.index(arch)
    path = converted[arch][0]
    np.testing.assert_allclose(mlx_lm_outputs[f"logits_{i}"], logits(path), atol=1e-4)
    ours, gaps = greedy(path, PROMPT, 12)
    assert_same_greedy(ours, gaps, list(mlx_lm_outputs[f"generated_{i}"]), tolerance=1e-3)


@pytest.mark.slow
def test_mlx_lm_runs_float16_and_sharded_directories(tiny_gguf, mlx_lm_outputs):
    reference = logits(tiny(tiny_gguf, "llama"))
    # float16 (the default): norms and scales in float16 as mlx-lm keeps them, computed in float16
    # (~2⁻¹¹ per operation); a wrong weight would move logits by their whole size
    half = mlx_lm_outputs[f"logits_{len(ARCHES)}"]
    assert np.abs(half - reference).max() < 0.02 * np.abs(reference).max()
    assert np.mean(half.argmax(-1) == reference.argmax(-1)) >= 0.95
    np.testing.assert_allclose(mlx_lm_outputs[f"logits_{len(ARCHES) + 1}"], reference, atol=1e-4)


def test_sharded_directory(tiny_gguf, tmp_path):
    path = tiny(tiny_gguf, "llama")
    gguf_to_mlx(path, tmp_path / "sharded", dtype="float32", max_shard_bytes=300_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    np.testing.assert_array_equal(logits(tmp_path / "sharded"), logits(path))


def test_quantized_types_keep_their_values(tmp_path, tiny_gguf):
    """Q4_K (scales d·sc: float32 in a float32 directory, rounded in float16) and Q2_K/Q6_K (no
    MLX quantized form: dequantized, the size cost reported; refused with --strict)."""
    pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) makes the K-quant file")
    from make_quant_fixtures import requantize

    path = tmp_path / "k.gguf"
    # K-quants need rows of 256; tied embeddings: one 49152 × 256 matrix, not two
    requantize(str(tiny_gguf("F32", hidden=256, ffn=512)), str(path), {"attn_output": "Q2_K", "ffn_down": "Q6_K"}, "Q4_K_M")
    reports = {r.ggml_type: r for r in gguf_to_mlx(path, tmp_path / "f32", dtype="float32")}
    assert {"Q4_K", "Q6_K", "Q2_K"} <= reports.keys() and all(r.max_error == 0 for r in reports.values())
    q6_k_weights = reports["Q6_K"].file_bytes // 210 * 256  # 210 bytes per 256 weights
    assert reports["Q6_K"].dequantized and reports["Q6_K"].bytes == 4 * q6_k_weights
    np.testing.assert_array_equal(logits(tmp_path / "f32"), logits(path))
    half = {r.ggml_type: r for r in gguf_to_mlx(path, tmp_path / "f16")}
    assert 0 < half["Q4_K"].max_error < 1e-3 and half["Q6_K"].bytes == 2 * q6_k_weights
    assert half["Q4_K"].form == "affine 4-bit, group 32 (float16 scales)" and not half["Q4_K"].dequantized

    r = subprocess.run([sys.executable, "-m", "mlx_llama", "convert", "gguf-to-mlx", str(path), str(tmp_path / "s"), "--strict"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "has no MLX quantized form" in r.stderr and "refused (--strict)" in r.stderr
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.partial-*"))


def test_rope_factors_and_biases(tiny_gguf, tmp_path):
    """Llama-3.1's frequency factors are config.json's "llama3" scaling (other factors: "longrope"
    holding them); biases on some projections only are completed with zeros for mlx-lm."""
    from mlx_llama.architectures import ModelConfig
    from mlx_llama.convert.hf_config import from_hf, llama3_factors, to_hf

    cfg = ModelConfig("llama", 8192, 64, 2, 128, 4, 2, 16, 16, 500000.0, 1e-5, 100, rope_factors="rope_freqs")
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf = to_hf(cfg, {"rope_freqs.weight": llama3_factors(16, 500000.0, scaling)}, "x")
    assert hf["rope_scaling"] == scaling
    np.testing.assert_array_equal(from_hf(hf, {"lm_head.weight"}, "x")[1]["rope_freqs.weight"], llama3_factors(16, 500000.0, scaling))

    for kw in ({"rope_freqs": True}, {"biases": ("attn_q", "ffn_up")}):
        path = tiny_gguf("Q8_0", arch="llama", **kw)
        gguf_to_mlx(path, tmp_path / "d", dtype="float32", force=True)
        config = json.loads((tmp_path / "d" / "config.json").read_text())
        np.testing.assert_array_equal(logits(tmp_path / "d"), logits(path))
        if "biases" in kw:
            assert config["attention_bias"] and config["mlp_bias"]
        else:
            assert config["rope_scaling"]["rope_type"] == "longrope"


@pytest.mark.parametrize("kw, message", [
    ({"arch": "gemma3", "softcap": 30.0, "n_layers": 3}, "final logit soft-capping (30): mlx-lm's gemma3_text does not apply it"),
    ({"arch": "phi3", "long_rope": True}, "RoPE attention factor 1.19 is not the one mlx-lm derives"),
    ({"arch": "qwen3", "biases": ("attn_q",)}, "biases on attn_q: mlx-lm's qwen3 has none there"),
])
def test_what_mlx_lm_cannot_run_is_a_one_line_error(tiny_gguf, tmp_path, kw, message):
    r = subprocess.run([sys.executable, "-m", "mlx_llama", "convert", "gguf-to-mlx", str(tiny_gguf("F32", **kw)),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_directories_mlx_llama_cannot_load_are_one_line_errors(tmp_path, converted):
    old = tmp_path / "old"  # the format mlx_llama's first converter wrote
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"dtype": "float16", "model": {}, "quantization": {}}))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in converted["llama"][1].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = mx.load(str(broken / "model.safetensors"))
    for part in ("weight", "scales", "biases"):  # a whole quantized layer gone
        weights.pop(f"model.layers.1.mlp.down_proj.{part}")
    mx.save_safetensors(str(broken / "model.safetensors"), weights)
    for directory, message in ((old, "no 'model_type'"), (broken, "missing tensor for 'blk.1.ffn_down.weight'")):
        r = subprocess.run([sys.executable, "-m", "mlx_llama", "generate", "-m", str(directory), "hi", "-n", "1"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def mlx_quantize(src: Path, out: Path, default: tuple[int, int], layers: dict[str, tuple[int, int]]) -> None:
    """The float directory `src` quantized as `mlx_lm convert -q` does: every matrix whose rows
    are whole groups through `mx.quantize`, with (bits, group size) `default` or its module's in
    `layers`, as config.json's "quantization" says (per-layer entries as mlx-lm's mixed recipes)."""
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    weights = mx.load(str(src / "model.safetensors"))
    for name, w in list(weights.items()):
        module = name[: -len(".weight")]
        bits, group_size = layers.get(module, default)
        if w.ndim == 2 and w.shape[-1] % group_size == 0:
            weights[name], weights[f"{module}.scales"], weights[f"{module}.biases"] = mx.quantize(w, group_size, bits)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = {"group_size": default[1], "bits": default[0], "mode": "affine",
                              **{m: {"group_size": g, "bits": b} for m, (b, g) in layers.items()}}
    (out / "config.json").write_text(json.dumps(config))


def test_mlx_quantized_directory_to_gguf(tiny_gguf, tmp_path):
    """MLX affine weights of ≤ 5 bits keep their numbers in Q4_1/Q5_1 (and from groups of 32 come
    back as the same arrays); 8-bit ones become Q8_0, the error measured and reported."""
    gguf_to_mlx(tiny_gguf("F32", tied=False), tmp_path / "f16")  # float16, as mlx-lm quantizes
    layers = {"model.layers.0.mlp.down_proj": (3, 64), "model.layers.0.self_attn.o_proj": (2, 64),
              "model.layers.0.mlp.up_proj": (5, 32), "model.layers.0.mlp.gate_proj": (8, 32)}
    mlx_quantize(tmp_path / "f16", tmp_path / "q", (4, 32), layers)
    reports = {r.source: r for r in to_gguf(tmp_path / "q", tmp_path / "q.gguf")}
    targets = {source: (r.target, r.tensors) for source, r in reports.items() if source.startswith("affine")}
    assert targets == {"affine 4-bit, group 32": ("Q4_1", 12), "affine 3-bit, group 64": ("Q4_1", 1),
                       "affine 2-bit, group 64": ("Q4_1", 1), "affine 5-bit, group 32": ("Q5_1", 1),
                       "affine 8-bit, group 32": ("Q8_0", 1)}
    assert all(r.max_error == 0 for source, r in reports.items() if "8-bit" not in source)
    assert 0 < reports["affine 8-bit, group 32"].max_error and reports["affine 8-bit, group 32"].relative_rms < 0.01
    model, _ = mlx_llama.load(tmp_path / "q", cpu_dequantize=True)
    ours = np.array(model(mx.array([TOKENS]))[0])
    np.testing.assert_allclose(logits(tmp_path / "q.gguf"), ours, atol=0.01 * np.abs(ours).max())

    gguf_to_mlx(tmp_path / "q.gguf", tmp_path / "back")
    original, back = mx.load(str(tmp_path / "q" / "model.safetensors")), mx.load(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == original.keys()
    changed = {m for m, (bits, _) in layers.items() if bits not in (4, 5)}  # 2/3-bit now 4-bit, 8-bit Q8_0's
    for name, a in original.items():
        if name.rsplit(".", 1)[0] not in changed:
            assert back[name].dtype == a.dtype and mx.array_equal(back[name], a).item(), name


@pytest.mark.parametrize("outtype", ["q4_0"])
def test_float_directory_to_gguf_is_llama_cpp_quantization(tiny_gguf, tmp_path, outtype):
    """Float weights (a float32 directory holding the F32 file's values): each GGUF tensor is
    llama.cpp's reference quantization of the file's own tensor, byte for byte (Llama's Q/K rows
    back in GGUF's order, norms F32)."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    path = tiny_gguf("F32", tied=False)
    gguf_to_mlx(path, tmp_path / "f32", dtype="float32")
    to_gguf(tmp_path / "f32", tmp_path / "out.gguf", outtype=outtype)
    original, out = GGUFFile(path), GGUFFile(tmp_path / "out.gguf")
    assert out.tensors.keys() == original.tensors.keys()
    for name, t in original.tensors.items():
        target = T.F32 if len(t.shape) == 1 else T[outtype.upper()]
        assert out.tensors[name].ggml_type == target, name
        expected = quants.quantize(np.asarray(t.data).view(np.float32).reshape(t.shape), target)
        np.testing.assert_array_equal(np.asarray(out.tensors[name].data).reshape(-1).view(np.uint8),
                                      expected.reshape(-1).view(np.uint8), err_msg=name)
