"""A model's settings as Hugging Face's config.json holds them (what transformers and mlx-lm read)
↔ mlx_llama's `ModelConfig` (what a GGUF file's `{arch}.*` keys say).

    GGUF arch   model_type     mlx-lm module            what config.json cannot say (refused)
    llama       llama          models/llama.py          partial RoPE, a subset of biases (filled with zeros)
    qwen2       qwen2          models/qwen2.py          head size ≠ hidden / heads, biases beyond q/k/v
    qwen3       qwen3          models/qwen3.py          biases
    phi3        phi3           models/phi3.py           separate q/k/v, separate gate/up, biases
    gemma3      gemma3_text    models/gemma3_text.py    logit soft-capping, irregular sliding-window layers

RoPE: a linear scaling factor is `rope_scaling` {"type": "linear"}; Llama-3's frequency factors
(`rope_freqs`) are {"rope_type": "llama3"} when they are that formula's, else "longrope" with the
factors as they are; Phi-3's long/short factors are "longrope". `from_hf` computes the factors
back, as llama.cpp's converter does. `gguf_keys` writes a `ModelConfig` as the `{arch}.*` keys
`architectures.read_config` reads back to it.
"""

from __future__ import annotations

import math

import numpy as np

from ..architectures import ARCHITECTURES, ATTENTION_LINEARS, FFN_LINEARS, ModelConfig
from ..errors import MlxLlamaError

MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma3": "gemma3_text"}
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "phi3": "Phi3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# model_type → GGUF architecture (mistral's checkpoints are Llama's, as llama.cpp converts them)
ARCHES = {**{v: k for k, v in MODEL_TYPES.items()}, "mistral": "llama", "gemma3": "gemma3"}
QKV = ("attn_q", "attn_k", "attn_v")


class ConfigError(MlxLlamaError):
    """A model's settings that the other format cannot hold (one line, naming the file)."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")


# -- ModelConfig → config.json -------------------------------------------------------------------


def to_hf(cfg: ModelConfig, factors: dict[str, np.ndarray], path, original_context: int | None = None) -> dict:
    """config.json for mlx-lm's module of `cfg.architecture`; `factors`: the file's RoPE factor
    tensors by GGUF name; `original_context`: Phi-3's rope.scaling.original_context_length.
    Raises `ConfigError` where mlx-lm's module cannot run `cfg` as is."""
    a = cfg.architecture
    _check_biases(cfg, path)
    if cfg.final_logit_softcap:
        raise ConfigError(path, f"final logit soft-capping ({cfg.final_logit_softcap:g}): mlx-lm's {MODEL_TYPES[a]} does not apply it")
    if cfg.fused_qkv != (a == "phi3"):
        raise ConfigError(path, f"{'fused' if cfg.fused_qkv else 'separate'} Q/K/V: mlx-lm's {MODEL_TYPES[a]} has the other form")
    if a in ("qwen2", "phi3") and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ConfigError(path, f"head size {cfg.head_dim} ≠ hidden / heads: mlx-lm's {MODEL_TYPES[a]} derives it")
    if cfg.rope_dims != cfg.head_dim and a != "phi3":
        raise ConfigError(path, f"RoPE on {cfg.rope_dims} of {cfg.head_dim} dims: mlx-lm's {MODEL_TYPES[a]} rotates all")
    hf = {"architectures": [CLASSES[a]], "model_type": MODEL_TYPES[a], "hidden_size": cfg.hidden_size,
          "num_hidden_layers": cfg.num_layers, "intermediate_size": cfg.intermediate_size,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "rms_norm_eps": cfg.rms_norm_eps, "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
          "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tied_embeddings, "rope_scaling": None}
    if a == "llama":
        hf["attention_bias"] = any(n in cfg.biases for n in ATTENTION_LINEARS)
        hf["mlp_bias"] = any(n in cfg.biases for n in FFN_LINEARS)
    if cfg.rope_scale != 1.0:
        hf["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": 1.0 / cfg.rope_scale}
    if a == "phi3":
        _phi3(cfg, factors, hf, original_context, path)
    elif cfg.rope_attn_factor != 1.0:
        raise ConfigError(path, f"RoPE attention factor {cfg.rope_attn_factor:g}: mlx-lm's {MODEL_TYPES[a]} has none")
    elif "rope_freqs.weight" in factors:
        if cfg.rope_scale != 1.0:
            raise ConfigError(path, "both linear RoPE scaling and frequency factors: config.json holds one")
        hf["rope_scaling"] = _llama3_scaling(factors["rope_freqs.weight"], cfg)
    if a == "gemma3":
        _gemma3(cfg, hf, path)
    return hf


def _check_biases(cfg: ModelConfig, path) -> None:
    allowed = {"llama": (*ATTENTION_LINEARS, *FFN_LINEARS), "qwen2": QKV}.get(cfg.architecture, ())
    extra = [b for b in cfg.biases if b not in allowed or b == "attn_qkv"]
    if extra:
        raise ConfigError(path, f"biases on {', '.join(extra)}: mlx-lm's {MODEL_TYPES[cfg.architecture]} has none there")


def zero_biases(cfg: ModelConfig) -> list[str]:
    """The biases (GGUF layer names) mlx-lm's module has that the file lacks: written as zeros."""
    if cfg.architecture == "qwen2":
        wanted = QKV
    elif cfg.architecture == "llama":
        attn = ("attn_q", "attn_k", "attn_v", "attn_output")
        wanted = (attn if any(n in cfg.biases for n in attn) else ()) + \
            (FFN_LINEARS if any(n in cfg.biases for n in FFN_LINEARS) else ())
    else:
        wanted = ()
    return [n for n in wanted if n not in cfg.biases]


def _phi3(cfg: ModelConfig, factors: dict, hf: dict, original: int | None, path) -> None:
    hf["partial_rotary_factor"] = cfg.rope_dims / cfg.head_dim
    long, short = factors.get("rope_factors_long.weight"), factors.get("rope_factors_short.weight")
    if long is None and short is None:
        if cfg.rope_attn_factor != 1.0:
            raise ConfigError(path, f"RoPE attention factor {cfg.rope_attn_factor:g} without long-context factors")
        return
    if cfg.rope_factors != "rope_factors_long" or long is None or short is None:
        raise ConfigError(path, "long-context RoPE factors not in use (context within the original): mlx-lm always uses them")
    original = original or cfg.context_length
    if abs(phi3_attn_factor(cfg.context_length, original) - cfg.rope_attn_factor) > 1e-4:
        raise ConfigError(path, f"RoPE attention factor {cfg.rope_attn_factor:g} is not the one mlx-lm derives "
                                f"from the context lengths ({phi3_attn_factor(cfg.context_length, original):g})")
    hf["original_max_position_embeddings"] = original
    hf["rope_scaling"] = {"type": "longrope", "rope_type": "longrope",
                          "long_factor": [float(x) for x in long], "short_factor": [float(x) for x in short]}


def phi3_attn_factor(context: int, original: int) -> float:
    """The attention factor transformers and mlx-lm derive for long-context RoPE (llama.cpp's
    converter writes the same as `rope.scaling.attn_factor`)."""
    if context <= original:
        return 1.0
    return math.sqrt(1 + math.log(context / original) / math.log(original))


def _gemma3(cfg: ModelConfig, hf: dict, path) -> None:
    scalar = cfg.query_scale ** -2
    hf["query_pre_attn_scalar"] = round(scalar) if math.isclose(scalar, round(scalar), rel_tol=1e-9) else scalar  # transformers wants an int
    hf["hidden_activation"] = "gelu_pytorch_tanh"
    hf["rope_local_base_freq"] = cfg.rope_theta_swa
    if not cfg.sliding_window:  # every layer global
        hf["sliding_window"], hf["sliding_window_pattern"] = cfg.context_length, 1
        return
    pattern = swa_pattern(cfg)
    if pattern is None:
        raise ConfigError(path, "sliding-window layers do not follow a pattern (every n-th layer global) mlx-lm can hold")
    hf["sliding_window"], hf["sliding_window_pattern"] = cfg.sliding_window, pattern


def swa_pattern(cfg: ModelConfig) -> int | None:
    """n where every n-th layer is global and the others local (Gemma's rule), or None."""
    global_layers = [i for i, local in enumerate(cfg.swa_layers) if not local]
    pattern = global_layers[0] + 1 if global_layers else cfg.num_layers + 1
    return pattern if tuple((i + 1) % pattern != 0 for i in range(cfg.num_layers)) == cfg.swa_layers else None


def llama3_factors(dims: int, base: float, scaling: dict) -> np.ndarray:
    """Llama-3's RoPE frequency factors, as llama.cpp's converter computes them (float32)."""
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    original = scaling.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float32) / dims))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _llama3_scaling(factors: np.ndarray, cfg: ModelConfig) -> dict:
    """rope_scaling for frequency factors: Llama-3.1's formula when they are its values (its
    published settings, the factor being the largest), else "longrope" holding them as they are
    (mlx-lm's SuScaledRoPE: periods × factors, no attention scale when the lengths are equal)."""
    factors = np.asarray(factors, dtype=np.float32)
    guess = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if np.allclose(llama3_factors(cfg.rope_dims, cfg.rope_theta, guess), factors, rtol=1e-6, atol=0):
        return guess
    values = [float(x) for x in factors]
    return {"rope_type": "longrope", "type": "longrope", "factor": 1.0, "long_factor": values, "short_factor": values,
            "original_max_position_embeddings": cfg.context_length}


# -- config.json → ModelConfig -------------------------------------------------------------------


def from_hf(config: dict, weight_names: set[str], path) -> tuple[ModelConfig, dict[str, np.ndarray], int | None]:
    """The `ModelConfig` of a Hugging Face / mlx-lm config.json, the RoPE factor tensors it
    implies (GGUF names, float32) and Phi-3's original context length (None otherwise).
    `weight_names`: the checkpoint's parameter names (biases and the output are read off them)."""
    from .names import hf_name

    config = text_config(config)
    arch = ARCHES.get(config.get("model_type"))
    if arch is None:
        raise ConfigError(path, f"unsupported model_type {config.get('model_type')!r} "
                                f"(supported: {', '.join(sorted(ARCHES))})")
    need = _Required(config, path)
    hidden, heads = need.int("hidden_size"), need.int("num_attention_heads")
    head_dim = hidden // heads if arch in ("qwen2", "phi3") else (config.get("head_dim") or hidden // heads)
    _check_activation(config, arch, path)
    cfg = ModelConfig(
        architecture=arch, context_length=need.int("max_position_embeddings"), hidden_size=hidden,
        num_layers=need.int("num_hidden_layers"), intermediate_size=need.int("intermediate_size"), num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
        rope_dims=int(head_dim * config.get("partial_rotary_factor", 1.0)), rope_theta=10000.0,
        rms_norm_eps=float(need.value("rms_norm_eps")), vocab_size=need.int("vocab_size"), fused_qkv=arch == "phi3",
        fused_gate_up=ARCHITECTURES[arch].fused_gate_up,
        tied_embeddings=bool(config.get("tie_word_embeddings")) or "lm_head.weight" not in weight_names,
        biases=tuple(n for n in (*ATTENTION_LINEARS, *FFN_LINEARS) if hf_name(arch, f"blk.0.{n}.bias") in weight_names)
        + (("output",) if "lm_head.bias" in weight_names else ()))
    if arch == "llama" and config.get("sliding_window") and config["sliding_window"] < cfg.context_length:
        raise ConfigError(path, f"sliding window {config['sliding_window']}: GGUF's llama architecture has none")
    theta, scaling, local_theta = _rope_parameters(config, arch)
    cfg.rope_theta = float(theta)
    factors, original = _rope_scaling(cfg, scaling, config, path)
    if arch == "gemma3":
        _gemma3_from_hf(cfg, config, local_theta)
    return cfg, factors, original


def text_config(config: dict) -> dict:
    """A multimodal Gemma-3 config's language model part, as a gemma3_text config."""
    if config.get("model_type") == "gemma3" and "text_config" in config:
        return {**config["text_config"], "model_type": "gemma3_text",
                "vocab_size": config["text_config"].get("vocab_size", config.get("vocab_size"))}
    return config


class _Required:
    def __init__(self, config: dict, path):
        self.config, self.path = config, path

    def value(self, key: str):
        if self.config.get(key) is None:
            raise ConfigError(self.path, f"config.json has no {key!r}")
        return self.config[key]

    def int(self, key: str) -> int:
        value = self.value(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(self.path, f"config.json's {key!r} = {value!r} is not a positive integer")
        return value


def _check_activation(config: dict, arch: str, path) -> None:
    wanted = ("gelu_pytorch_tanh",) if arch == "gemma3" else ("silu",)
    act = config.get("hidden_activation") or config.get("hidden_act") or wanted[0]
    if act not in wanted:
        raise ConfigError(path, f"activation {act!r}: the {arch} architecture uses {wanted[0]}")


def _rope_parameters(config: dict, arch: str) -> tuple[float, dict | None, float]:
    """(base, scaling of the global layers or None, base of Gemma's local layers), from the
    top-level keys or transformers 5's `rope_parameters` (per layer type for Gemma-3)."""
    params = config.get("rope_parameters") or {}
    if "full_attention" in params:
        local = params.get("sliding_attention", {}).get("rope_theta", config.get("rope_local_base_freq", 10000.0))
        params = params["full_attention"]
    else:
        local = config.get("rope_local_base_freq", 10000.0)
    theta = config.get("rope_theta") or params.get("rope_theta") or (1e6 if arch == "gemma3" else 10000.0)
    scaling = config.get("rope_scaling") or params
    if (scaling.get("rope_type") or scaling.get("type") or "default") == "default":
        scaling = None
    return theta, scaling, local


def _rope_scaling(cfg: ModelConfig, scaling: dict | None, config: dict, path) -> tuple[dict, int | None]:
    """Sets cfg's RoPE scaling; returns the factor tensors and Phi-3's original context."""
    if scaling is None:
        return {}, None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        cfg.rope_scale = 1.0 / float(scaling["factor"])
        return {}, None
    if kind == "llama3":
        cfg.rope_factors = "rope_freqs"
        return {"rope_freqs.weight": llama3_factors(cfg.rope_dims, cfg.rope_theta, scaling)}, None
    if kind in ("longrope", "su"):
        long = np.array(scaling["long_factor"], dtype=np.float32)
        short = np.array(scaling["short_factor"], dtype=np.float32)
        original = config.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
        if cfg.architecture == "phi3":
            cfg.rope_factors = "rope_factors_long" if cfg.context_length > original else "rope_factors_short"
            cfg.rope_attn_factor = float(scaling.get("attention_factor") or phi3_attn_factor(cfg.context_length, original))
            return {"rope_factors_long.weight": long, "rope_factors_short.weight": short}, original
        if np.array_equal(long, short) and (original or cfg.context_length) >= cfg.context_length:
            cfg.rope_factors = "rope_freqs"  # frequency factors held as longrope (see _llama3_scaling)
            return {"rope_freqs.weight": long}, None
    raise ConfigError(path, f"unsupported rope_scaling {kind!r} (supported: linear, llama3, longrope)")


def _gemma3_from_hf(cfg: ModelConfig, config: dict, local_theta: float) -> None:
    cfg.attention_scale = float(config.get("query_pre_attn_scalar", 256)) ** -0.5
    cfg.final_logit_softcap = float(config.get("final_logit_softcapping") or 0.0)
    cfg.rope_theta_swa = float(local_theta)
    types = config.get("layer_types")
    if types:
        local = tuple(t == "sliding_attention" for t in types)
    else:
        pattern = config.get("sliding_window_pattern", 6)
        local = tuple((i + 1) % pattern != 0 for i in range(cfg.num_layers))
    if any(local) and config.get("sliding_window"):
        cfg.sliding_window, cfg.swa_layers = int(config["sliding_window"]), local


# -- ModelConfig → the {arch}.* keys of a GGUF file ------------------------------------------------


def gguf_keys(cfg: ModelConfig, original_context: int | None, path) -> dict:
    """The `{arch}.*` metadata `architectures.read_config` reads back to `cfg` (ints, floats,
    bool lists); raises `ConfigError` for settings GGUF files cannot state."""
    keys = {"context_length": cfg.context_length, "embedding_length": cfg.hidden_size, "block_count": cfg.num_layers,
            "feed_forward_length": cfg.intermediate_size, "attention.head_count": cfg.num_heads,
            "attention.head_count_kv": cfg.num_kv_heads, "rope.dimension_count": cfg.rope_dims,
            "rope.freq_base": float(cfg.rope_theta), "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
            "vocab_size": cfg.vocab_size}
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        keys["attention.key_length"] = keys["attention.value_length"] = cfg.head_dim
    if cfg.rope_scale != 1.0:
        keys["rope.scaling.type"], keys["rope.scaling.factor"] = "linear", float(1.0 / cfg.rope_scale)
    if cfg.rope_attn_factor != 1.0:
        keys["rope.scaling.attn_factor"] = float(cfg.rope_attn_factor)
    if original_context:
        keys["rope.scaling.original_context_length"] = int(original_context)
    if cfg.architecture == "gemma3":
        # llama.cpp (and `read_config`) derive Gemma's query scale from the layer count
        rule = (cfg.hidden_size / cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim) ** -0.5
        if not math.isclose(cfg.query_scale, rule, rel_tol=1e-6):
            raise ConfigError(path, f"query_pre_attn_scalar {cfg.query_scale ** -2:g}: GGUF files imply {rule ** -2:g}")
        keys["rope.freq_base_swa"] = float(cfg.rope_theta_swa)
        if cfg.final_logit_softcap:
            keys["final_logit_softcapping"] = float(cfg.final_logit_softcap)
        if cfg.sliding_window:
            keys["attention.sliding_window"] = cfg.sliding_window
            # llama.cpp's forms: every n-th layer global, or a flag per layer
            keys["attention.sliding_window_pattern"] = swa_pattern(cfg) or list(cfg.swa_layers)
    return {f"{cfg.architecture}.{k}": v for k, v in keys.items()}
