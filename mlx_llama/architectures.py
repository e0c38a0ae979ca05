"""What a GGUF file's architecture asks of the model: one table row per architecture, and the
settings of one file read from its `{arch}.*` keys and the tensors it holds.

One set of `mlx.nn` modules (`model.py`) runs every architecture here; what differs between
them is data:

    arch    RoPE   q/k norm  norms     FFN            embeddings  sliding window
    llama   pairs  -         pre       SiLU-gated     -           -
    qwen2   NEOX   -         pre       SiLU-gated     -           -
    qwen3   NEOX   yes       pre       SiLU-gated     -           -
    phi3    NEOX   -         pre       SiLU, gate+up fused         -           (not applied, as llama.cpp)
    gemma3  NEOX   yes       sandwich  GELU-tanh-gated  × √hidden  local layers: own window, RoPE base

What a file may add whatever its architecture, read from its tensors: biases on any projection
(Qwen2's q/k/v), fused QKV (`attn_qkv`), an untied output (and its bias), RoPE frequency factors
(`rope_freqs`: Llama-3.1/3.2; `rope_factors_long`/`_short`: Phi-3 long context). Nothing in a
file is silently ignored: a tensor the model does not use, or a `{arch}.*` key that would change
the computation and is not honoured, is a one-line `GGUFError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

from .errors import GGUFError


@dataclass(frozen=True)
class Arch:
    """How one architecture differs from Llama (see the table above)."""

    rope_neox: bool = False  # rotate the two halves of the head (NEOX) instead of adjacent pairs
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (attn_q_norm, attn_k_norm)
    sandwich_norms: bool = False  # post_attention_norm / post_ffw_norm on each sublayer's output
    activation: str = "silu"  # of the FFN gate: "silu" or "gelu_tanh"
    embed_scale: bool = False  # embeddings × √hidden
    fused_gate_up: bool = False  # ffn_up holds [gate; up] (2 × feed_forward_length rows)
    sliding_window: bool = False  # honour attention.sliding_window on the local layers
    extra_keys: tuple[str, ...] = ()  # further {arch}.* keys this architecture reads


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch(),
    "qwen2": Arch(rope_neox=True),
    "qwen3": Arch(rope_neox=True, qk_norm=True),
    # llama.cpp disables Phi-3's sliding window ("Phi SWA is currently disabled"); so do we.
    "phi3": Arch(rope_neox=True, fused_gate_up=True, extra_keys=("attention.sliding_window",)),
    "gemma3": Arch(rope_neox=True, qk_norm=True, sandwich_norms=True, activation="gelu_tanh", embed_scale=True,
                   sliding_window=True, extra_keys=("attention.sliding_window", "attention.sliding_window_pattern",
                                                    "rope.freq_base_swa", "final_logit_softcapping")),
}

# {arch}.* keys every architecture reads (in `read_config`), or that change nothing we compute.
COMMON_KEYS = (
    "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.key_length", "attention.value_length", "attention.layer_norm_rms_epsilon",
    "rope.dimension_count", "rope.freq_base", "rope.scaling.type", "rope.scaling.factor", "rope.scale_linear",
    "rope.scaling.attn_factor", "rope.scaling.original_context_length", "rope.scaling.finetuned", "vocab_size",
)
# Keys that change nothing at these values (converters write them for plain models).
NEUTRAL_VALUES = {"expert_count": 0, "expert_used_count": 0, "attention.causal": True}

# The linear layers, by GGUF name; any of them may carry a bias (`<name>.bias`).
ATTENTION_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output")
FFN_LINEARS = ("ffn_gate", "ffn_up", "ffn_down")


@dataclass
class ModelConfig:
    """One file's model: sizes and settings from its `{arch}.*` keys and its tensors."""

    architecture: str
    context_length: int
    hidden_size: int  # embedding_length
    num_layers: int  # block_count
    intermediate_size: int  # feed_forward_length
    num_heads: int  # attention.head_count
    num_kv_heads: int  # attention.head_count_kv
    head_dim: int  # attention.key_length (default embedding_length / head_count)
    rope_dims: int  # rope.dimension_count (default head_dim)
    rope_theta: float  # rope.freq_base
    rms_norm_eps: float  # attention.layer_norm_rms_epsilon
    vocab_size: int
    rope_scale: float = 1.0  # positions × this: 1 / rope.scaling.factor for linear scaling
    rope_attn_factor: float = 1.0  # rotated dimensions × this (rope.scaling.attn_factor)
    rope_factors: str = "none"  # frequency factors used: "rope_freqs", "rope_factors_short"/"_long"
    attention_scale: float = 0.0  # of q·k; 0: 1/√head_dim
    sliding_window: int = 0  # local layers see this many positions (0: none)
    swa_layers: tuple[bool, ...] = ()  # which layers are local
    rope_theta_swa: float = 10000.0  # rope.freq_base_swa, the local layers' base
    final_logit_softcap: float = 0.0  # logits = cap · tanh(logits / cap) (0: none)
    fused_qkv: bool = False  # attn_qkv instead of attn_q, attn_k, attn_v
    fused_qk: bool = False  # attn_qk ([q; k]) and attn_v: fused at load on NVIDIA GPUs where v's form differs (Q4_K_M)
    fused_gate_up: bool = False  # ffn_up holds [gate; up] (Phi-3's files; fused at load on NVIDIA GPUs)
    gate_up_interleaved: bool = False  # that fused ffn_up's rows alternate gate, up (fused at load for `cuda_affine`'s epilogue)
    biases: tuple[str, ...] = ()  # the linear layers that carry a bias (GGUF names, "output" included)
    tied_embeddings: bool = True  # no output.weight: the embedding table projects onto the vocabulary

    def __post_init__(self):  # tuples come back as lists from JSON (converted directories)
        self.swa_layers, self.biases = tuple(self.swa_layers), tuple(self.biases)

    @property
    def arch(self) -> Arch:
        return ARCHITECTURES[self.architecture]

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def query_scale(self) -> float:
        return self.attention_scale or self.head_dim**-0.5

    def is_local(self, layer: int) -> bool:
        return bool(self.sliding_window) and self.swa_layers[layer]


def config_fields() -> set[str]:
    return {f.name for f in fields(ModelConfig) if f.init}


# ---------------------------------------------------------------------------------------------
# reading a file's config
# ---------------------------------------------------------------------------------------------


class _Keys:
    """Typed, validated access to one architecture's `{arch}.*` keys."""

    def __init__(self, f, arch: str):
        self.f, self.arch = f, arch

    def int(self, key: str, default=..., low: int = 1, high: int = 1 << 31) -> int:
        value = self.f.get(f"{self.arch}.{key}", int, default)
        if value is not default and not low <= value <= high:
            raise GGUFError(self.f.path, f"metadata key '{self.arch}.{key}' = {value} is out of range [{low}, {high}]")
        return value

    def float(self, key: str, default=..., positive: bool = True) -> float:
        value = self.f.get(f"{self.arch}.{key}", float, default)
        if value is not default and (not math.isfinite(value) or (positive and value <= 0)):
            raise GGUFError(self.f.path, f"metadata key '{self.arch}.{key}' = {value} must be a finite positive number")
        return value

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.f.metadata


def read_config(f) -> ModelConfig:
    """The `ModelConfig` of an open `GGUFFile`, every key and tensor accounted for."""
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f.path, f"unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    _refuse_unknown_keys(f, arch)
    k = _Keys(f, arch)
    hidden, heads = k.int("embedding_length"), k.int("attention.head_count", high=1 << 16)
    kv_heads = k.int("attention.head_count_kv", heads, high=heads)
    if heads % kv_heads:
        raise GGUFError(f.path, f"head_count {heads} is not a multiple of head_count_kv {kv_heads}")
    if not k.has("attention.key_length") and hidden % heads:
        raise GGUFError(f.path, f"embedding_length {hidden} is not divisible by head_count {heads}")
    head_dim = k.int("attention.key_length", hidden // heads, high=1 << 16)
    if k.int("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f.path, f"attention.value_length differs from key_length {head_dim}: not supported")
    rope_dims = k.int("rope.dimension_count", head_dim, high=head_dim)
    if rope_dims % 2:
        raise GGUFError(f.path, f"rope.dimension_count {rope_dims} must be even")
    cfg = ModelConfig(
        architecture=arch,
        context_length=k.int("context_length"),
        hidden_size=hidden,
        num_layers=_layer_count(f, k),
        intermediate_size=k.int("feed_forward_length"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_dims=rope_dims,
        rope_theta=k.float("rope.freq_base", 10000.0),
        rms_norm_eps=k.float("attention.layer_norm_rms_epsilon"),
        vocab_size=_vocab_size(f, k),
        rope_scale=_rope_scale(f, k),
        rope_attn_factor=k.float("rope.scaling.attn_factor", 1.0),
        tied_embeddings="output.weight" not in f.tensors,
        fused_qkv="blk.0.attn_qkv.weight" in f.tensors,
        fused_gate_up=ARCHITECTURES[arch].fused_gate_up,
        biases=tuple(n for n in (*ATTENTION_LINEARS, *FFN_LINEARS) if f"blk.0.{n}.bias" in f.tensors)
        + (("output",) if "output.bias" in f.tensors else ()),
    )
    cfg.rope_factors = _rope_factors(f, cfg, k)
    _read_arch_settings(f, cfg, k)
    return cfg


def _refuse_unknown_keys(f, arch: str) -> None:
    known = set(COMMON_KEYS) | set(ARCHITECTURES[arch].extra_keys)
    prefix = arch + "."
    for key, value in f.metadata.items():
        name = key[len(prefix):]
        if not key.startswith(prefix) or name in known:
            continue
        if name in NEUTRAL_VALUES and value == NEUTRAL_VALUES[name]:
            continue
        raise GGUFError(f.path, f"metadata key {key!r} = {_short(value)} is not supported for architecture {arch!r}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _layer_count(f, k: _Keys) -> int:
    """block_count, checked against the layers the tensors hold (before anything is built per layer)."""
    held = {int(m.group(1)) for name in f.tensors if (m := re.match(r"blk\.(\d+)\.", name))}
    n = k.int("block_count", high=1 << 16)
    if held != set(range(len(held))) or n != len(held):
        raise GGUFError(f.path, f"block_count is {n} but the file holds tensors for layers "
                                f"{_ranges(sorted(held))}" if held else f"block_count is {n} but the file holds no layers")
    return n


def _ranges(ids: list[int]) -> str:
    return f"0-{ids[-1]}" if ids == list(range(len(ids))) else ", ".join(map(str, ids[:8])) + (" …" if len(ids) > 8 else "")


def _vocab_size(f, k: _Keys) -> int:
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if k.has("vocab_size"):
        return k.int("vocab_size")
    if tokens is None:
        raise GGUFError(f.path, f"missing metadata key '{k.arch}.vocab_size' (and no tokenizer.ggml.tokens)")
    return len(tokens)


def _rope_scale(f, k: _Keys) -> float:
    kind = f.get(f"{k.arch}.rope.scaling.type", str, "linear")
    factor = k.float("rope.scaling.factor", 0.0, positive=False) or k.float("rope.scale_linear", 0.0, positive=False)
    if factor < 0:
        raise GGUFError(f.path, f"metadata key '{k.arch}.rope.scaling.factor' = {factor} must not be negative")
    if kind == "none" or factor == 0:  # as llama.cpp: a missing factor means no scaling
        return 1.0
    if kind == "linear":
        return 1.0 / factor
    if kind == "longrope" and "rope_factors_long.weight" in f.tensors:
        return 1.0  # the factors do the work
    raise GGUFError(f.path, f"unsupported rope scaling type {kind!r} (supported: none, linear, "
                            "and long-context frequency factors)")


def _rope_factors(f, cfg: ModelConfig, k: _Keys) -> str:
    """Which frequency-factor tensor RoPE uses: llama.cpp's rule (short factors while the
    context fits in the original one; the model's full context here, so long when it is longer)."""
    if "rope_freqs.weight" in f.tensors:
        return "rope_freqs"
    if "rope_factors_long.weight" in f.tensors or "rope_factors_short.weight" in f.tensors:
        original = k.int("rope.scaling.original_context_length", cfg.context_length)
        return "rope_factors_long" if cfg.context_length > original else "rope_factors_short"
    return "none"


def _read_arch_settings(f, cfg: ModelConfig, k: _Keys) -> None:
    if cfg.architecture == "gemma3":
        # gemma_pytorch: query_pre_attn_scalar is hidden / heads for the 27B model (62 layers)
        cfg.attention_scale = (cfg.hidden_size / cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim) ** -0.5
        cfg.final_logit_softcap = k.float("final_logit_softcapping", 0.0, positive=False)
    if cfg.arch.sliding_window and k.int("attention.sliding_window", 0, low=0) > 0:
        cfg.sliding_window = k.int("attention.sliding_window", low=1)
        cfg.swa_layers = _swa_layers(f, cfg, k)
        cfg.rope_theta_swa = k.float("rope.freq_base_swa", 10000.0)


def _swa_layers(f, cfg: ModelConfig, k: _Keys) -> tuple[bool, ...]:
    """llama.cpp's pattern: an array of per-layer flags, or every n-th layer global (default 6)."""
    key = f"{k.arch}.attention.sliding_window_pattern"
    value = f.metadata.get(key, 6)
    if isinstance(value, list):
        if len(value) != cfg.num_layers or not all(isinstance(v, bool) for v in value):
            raise GGUFError(f.path, f"metadata key {key!r} must hold one bool per layer ({cfg.num_layers})")
        return tuple(value)
    n = k.int("attention.sliding_window_pattern", 6, low=0, high=1 << 16)
    return tuple(n == 0 or i % n < n - 1 for i in range(cfg.num_layers))


# ---------------------------------------------------------------------------------------------
# the tensors a config needs
# ---------------------------------------------------------------------------------------------


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model of `cfg` reads, with its numpy-order shape (out, in)."""
    d, f_, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (v, d)
    if "output" in cfg.biases:
        shapes["output.bias"] = (v,)
    if cfg.rope_factors != "none":
        shapes[f"{cfg.rope_factors}.weight"] = (cfg.rope_dims // 2,)
    outs = {"attn_q": cfg.q_dim, "attn_k": cfg.kv_dim, "attn_v": cfg.kv_dim, "attn_qkv": cfg.q_dim + 2 * cfg.kv_dim,
            "attn_qk": cfg.q_dim + cfg.kv_dim,
            "attn_output": d, "ffn_gate": f_, "ffn_up": 2 * f_ if cfg.fused_gate_up else f_, "ffn_down": d}
    ins = {"attn_output": cfg.q_dim, "ffn_down": f_}
    for i in range(cfg.num_layers):
        for name in layer_linears(cfg):
            shapes[f"blk.{i}.{name}.weight"] = (outs[name], ins.get(name, d))
            if name in cfg.biases:
                shapes[f"blk.{i}.{name}.bias"] = (outs[name],)
        for norm in layer_norms(cfg):
            shapes[f"blk.{i}.{norm}.weight"] = (cfg.head_dim,) if norm in ("attn_q_norm", "attn_k_norm") else (d,)
    return shapes


def layer_linears(cfg: ModelConfig) -> tuple[str, ...]:
    attention = ("attn_qkv",) if cfg.fused_qkv else ("attn_qk", "attn_v") if cfg.fused_qk else ("attn_q", "attn_k", "attn_v")
    ffn = ("ffn_up", "ffn_down") if cfg.fused_gate_up else FFN_LINEARS
    return (*attention, "attn_output", *ffn)


def layer_norms(cfg: ModelConfig) -> tuple[str, ...]:
    norms = ("attn_norm", "ffn_norm")
    if cfg.arch.qk_norm:
        norms += ("attn_q_norm", "attn_k_norm")
    if cfg.arch.sandwich_norms:
        norms += ("post_attention_norm", "post_ffw_norm")
    return norms


def check_tensors(f, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """`tensor_shapes(cfg)`, each present with its shape, and no other tensor in the file
    (the long-context factors not chosen for this context excepted: llama.cpp keeps both)."""
    shapes = tensor_shapes(cfg)
    for name, shape in shapes.items():
        if name not in f.tensors:
            raise GGUFError(f.path, f"missing tensor {name!r}")
        if f.tensors[name].shape != shape:
            raise GGUFError(f.path, f"tensor {name!r} has shape {f.tensors[name].shape}, expected {shape} from the config")
    spare = {"rope_factors_long.weight", "rope_factors_short.weight"}
    for name in f.tensors:
        if name not in shapes and name not in spare:
            raise GGUFError(f.path, f"tensor {name!r} is not used by architecture {cfg.architecture!r}")
    return shapes


def settings(cfg: ModelConfig, metadata: dict) -> dict:
    """The settings a file gets, for `mlx_llama info`."""
    a = cfg.arch
    out = {
        "rope": f"{'NEOX halves' if a.rope_neox else 'adjacent pairs'}, {cfg.rope_dims} of {cfg.head_dim} dims, "
                f"base {cfg.rope_theta:g}" + (f", positions × {cfg.rope_scale:g}" if cfg.rope_scale != 1 else "")
                + (f", factors {cfg.rope_factors}" if cfg.rope_factors != "none" else "")
                + (f", rotated dims × {cfg.rope_attn_factor:g}" if cfg.rope_attn_factor != 1 else ""),
        "attention": f"{cfg.num_heads} heads, {cfg.num_kv_heads} kv heads, head size {cfg.head_dim}, "
                     f"{'fused QKV' if cfg.fused_qkv else 'separate Q/K/V'}, scale {cfg.query_scale:.6g}"
                     + (", q/k RMSNorm" if a.qk_norm else ""),
        "norms": "sandwich (pre and post each sublayer)" if a.sandwich_norms else "pre",
        "ffn": f"{a.activation}-gated{', gate+up fused' if cfg.fused_gate_up else ''}, {cfg.intermediate_size} wide",
        "biases": ", ".join(cfg.biases) or "none",
        "embeddings": ("× √hidden, " if a.embed_scale else "") + ("tied to the output" if cfg.tied_embeddings else "separate output"),
    }
    if cfg.sliding_window:
        local = sum(cfg.swa_layers)
        out["sliding window"] = (f"{cfg.sliding_window} positions on {local} of {cfg.num_layers} layers "
                                 f"(RoPE base {cfg.rope_theta_swa:g} there)")
    elif f"{cfg.architecture}.attention.sliding_window" in metadata:
        out["sliding window"] = (f"{metadata[f'{cfg.architecture}.attention.sliding_window']} in the file, "
                                 "not applied (as llama.cpp, for this architecture)")
    if cfg.final_logit_softcap:
        out["logit soft-capping"] = f"{cfg.final_logit_softcap:g}"
    return out
