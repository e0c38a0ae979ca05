"""Tiny random Hugging Face checkpoints made with `transformers`, and their logits: the reference
for the Hugging Face → GGUF tests (`test_convert_hf.py`). Run as a script, in its own process
(torch and transformers stay out of the test process):

    python tests/hf_models.py OUT_DIR BOTCHAN.txt

For each model OUT_DIR/<name>/ is a checkpoint as `save_pretrained` writes it (config.json,
model.safetensors in float32, the tokenizer files) and OUT_DIR/<name>.npz holds `ids` (the first
256 tokens of botchan.txt as the checkpoint's tokenizer encodes it) and transformers' float32
logits for them: `logits` with the checkpoint's weights, `logits_f16` with every weight rounded
to float16 first (what an F16 GGUF file holds). The tokenizers are trained here on botchan.txt:
SentencePiece BPE (with tokenizer.model, as Llama-2's checkpoints) and byte-level BPE.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HIDDEN, HEADS, KV_HEADS, FFN, CONTEXT = 64, 4, 2, 128, 512
# Embeddings this large make the top token mostly the input's (~75%), with wide top-2 gaps; the
# final norm this small keeps logits within ±7 (llama.cpp's float16 activations err ~1e-3 of them)
EMBED, FINAL_NORM = 0.5, 0.25
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")


def spm_tokenizer(text: str, out: Path):
    """A SentencePiece BPE tokenizer (byte fallback, BOS added) as Llama-2 ships one."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    lines = text.splitlines()[:3000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out / "sp"), vocab_size=800,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    (out / "sp.model").rename(out / "tokenizer.model")
    (out / "sp.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"}))
    return AutoTokenizer.from_pretrained(str(out))


def bpe_tokenizer(text: str, regex: str | None = None):
    """A byte-level BPE tokenizer with ChatML special tokens, as SmolLM2's and Qwen2's: GPT-2's
    pre-tokenizer, or `regex` (Hugging Face's spelling) before a regex-less byte level."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    tok.pre_tokenizer = byte_level if regex is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), "isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", chat_template=CHATML)


def model_config(arch: str, vocab: int):
    import transformers as t

    common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return t.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False), t.LlamaForCausalLM
    if arch == "llama-tied":
        return t.LlamaConfig(**common, rope_theta=50000.0, tie_word_embeddings=True), t.LlamaForCausalLM
    if arch == "qwen2":
        return t.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True), t.Qwen2ForCausalLM
    if arch == "qwen3":
        return t.Qwen3Config(**common, head_dim=32, rope_theta=1e6, tie_word_embeddings=False), t.Qwen3ForCausalLM
    if arch == "phi3":
        return t.Phi3Config(**common, partial_rotary_factor=0.5, tie_word_embeddings=False, pad_token_id=0), t.Phi3ForCausalLM
    if arch == "gemma3":
        return t.Gemma3TextConfig(**{**common, "num_hidden_layers": 4}, head_dim=16, query_pre_attn_scalar=16,
                                  sliding_window=8, layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"],
                                  tie_word_embeddings=True, pad_token_id=0), t.Gemma3ForCausalLM
    raise ValueError(arch)


def randomize(model, arch: str, seed: int) -> None:
    """Weights that make the logits peaked: embeddings large next to what the layers add (rows
    ~ N(0, EMBED²)), the output equal to them (tied or a copy), so each position's top token is
    often its input's (the layers decide the rest); matrices ~ N(0, 1/in); norms near 1 (near 0
    for Gemma, which adds 1), the final one ~FINAL_NORM to keep logits within a few units."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        offset = 1.0 if arch == "gemma3" else 0.0  # Gemma's norms multiply by 1 + w
        for name, p in model.named_parameters():
            if p.ndim == 1:
                scale = FINAL_NORM if name == "model.norm.weight" else 1.0
                p.copy_(scale * (1 + 0.1 * torch.randn(p.shape, generator=g)) - offset)
            elif "embed_tokens" in name:
                p.copy_(EMBED * torch.randn(p.shape, generator=g))
            elif "lm_head" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)


def logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


MODELS = {  # name: (architecture, tokenizer)
    "llama-spm": ("llama", "spm"), "llama-bpe": ("llama-tied", "bpe"), "qwen2": ("qwen2", "qwen2-regex"),
    "qwen3": ("qwen3", "bpe"), "phi-mini": ("phi3", "bpe"), "gemma3": ("gemma3", "bpe"),
}


def make(name: str, out: Path, text: str) -> None:
    arch, kind = MODELS[name]
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    tok = spm_tokenizer(text, d) if kind == "spm" else bpe_tokenizer(text, QWEN2_REGEX if kind == "qwen2-regex" else None)
    vocab = len(tok) + (16 if kind == "spm" else 0)  # the SPM model's table is padded, as many checkpoints'
    config, cls = model_config(arch, vocab)
    torch.manual_seed(0)
    model = cls(config).eval()
    randomize(model, arch, seed=len(name))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    ids = tok(text[:4000]).input_ids[:256]
    reference = logits(model, ids)
    with torch.no_grad():  # what an F16 GGUF file holds: matrices in float16, vectors in float32
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(p.half().float())
    np.savez(out / f"{name}.npz", ids=np.array(ids), logits=reference, logits_f16=logits(model, ids))


def main(out: str, botchan: str) -> None:
    torch.set_num_threads(2)
    text = Path(botchan).read_text(encoding="utf-8")
    for name in (sys.argv[3:] or MODELS):
        make(name, Path(out), text)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
