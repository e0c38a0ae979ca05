"""Tokenizers across formats (`mlx_llama.convert.vocab_to_hf`, `vocab_from_hf`), on llama.cpp's
own vocabulary test files: the tokenizer.json written from a GGUF vocabulary encodes llama.cpp's
test texts to llama.cpp's ids under Hugging Face's `tokenizers` (what mlx-lm runs), and read back
into GGUF metadata it gives mlx_llama's tokenizer the same ids, roles and end-of-generation set.
"""

import json

import pytest
from test_tokenizer import SUPPORTED_VOCAB_TESTS, read_vocab_tests, vocab_path

from mlx_llama import MlxLlamaError
from mlx_llama.convert.vocab_from_hf import gguf_vocab, read_sentencepiece
from mlx_llama.convert.vocab_to_hf import write_tokenizer_files
from mlx_llama.gguf_file import GGUFFile
from mlx_llama.tokenizer import Tokenizer

ROLES = ("bos_id", "eos_id", "eot_id", "unk_id", "pad_id", "add_bos", "add_eos", "add_space_prefix", "clean_spaces")


# SentencePiece and GPT-2 byte-level BPE by default; every vocabulary llama.cpp tests (~2 minutes) with -m slow
QUICK = ("llama-spm", "gpt-2")


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in SUPPORTED_VOCAB_TESTS])
def test_vocabulary_round_trip_encodes_as_llama_cpp(name, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    path = vocab_path(name, ".inp", ".out")
    original = GGUFFile(path).metadata
    write_tokenizer_files(original, tmp_path, 4096)
    cases = read_vocab_tests(path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf_bad = [(t, ids) for t, ids in cases if hf.encode(t, add_special_tokens=False).ids != ids]
    assert not hf_bad, f"tokenizers: {len(hf_bad)}/{len(cases)} differ from llama.cpp, first: {hf_bad[:2]}"

    back = gguf_vocab(tmp_path, len(original["tokenizer.ggml.tokens"]))
    assert back["tokenizer.ggml.tokens"] == original["tokenizer.ggml.tokens"]
    if "tokenizer.ggml.merges" in original:
        assert back["tokenizer.ggml.merges"] == original["tokenizer.ggml.merges"]
    tok, ref = Tokenizer(str(path), back), Tokenizer(str(path), original)
    assert [getattr(tok, a) for a in ROLES] == [getattr(ref, a) for a in ROLES]
    assert tok.stop_ids == ref.stop_ids
    bad = [(t, ids) for t, ids in cases if tok.encode(t, add_special=False) != ids]
    assert not bad, f"read back: {len(bad)}/{len(cases)} differ from llama.cpp, first: {bad[:2]}"
    for key in ("tokenizer.chat_template", "tokenizer.chat_template.tool_use"):
        assert back.get(key) == original.get(key)


def test_tokenizer_config_names_the_special_tokens(smol_gguf, tmp_path):
    write_tokenizer_files(smol_gguf.metadata, tmp_path, 8192)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert config["add_bos_token"] is False and config["model_max_length"] == 8192
    assert config["chat_template"] == smol_gguf.metadata["tokenizer.chat_template"]


def test_sentencepiece_model_read_without_protobuf(tmp_path):
    """tokenizer.model (a SentencePiece BPE model trained here) read field by field: the same
    pieces, scores and types sentencepiece reports, and mlx_llama's tokenizer of the GGUF
    metadata made from it encodes as sentencepiece does."""
    import sentencepiece as spm
    from resources import botchan

    text = botchan().read_text(encoding="utf-8")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()[:2000]), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=600, model_type="bpe", byte_fallback=True, user_defined_symbols=["<tool>"],
                                   control_symbols=["<ctl>"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    pieces, bpe, prefix = read_sentencepiece(tmp_path / "sp.model")
    assert bpe and prefix and len(pieces) == sp.get_piece_size()
    kinds = {2: sp.is_unknown, 3: sp.is_control, 5: sp.is_unused, 6: sp.is_byte}
    for i, (piece, score, kind) in enumerate(pieces):
        assert (piece, score) == (sp.id_to_piece(i), pytest.approx(sp.get_score(i)))
        assert all(check(i) == (kind == k) for k, check in kinds.items())
    assert pieces[sp.piece_to_id("<tool>")][2] == 4  # user-defined

    (tmp_path / "sp.model").rename(tmp_path / "tokenizer.model")
    tok = Tokenizer("sp", gguf_vocab(tmp_path))
    sample = text.splitlines()[2000:2300]
    assert [tok.encode(s, add_special=False) for s in sample] == [sp.encode(s) for s in sample]


def test_unsupported_tokenizers_are_one_line_errors(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(MlxLlamaError, match="unsupported tokenizer \\(WordPiece model"):
        gguf_vocab(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(MlxLlamaError, match="no tokenizer.json or tokenizer.model"):
        gguf_vocab(tmp_path)
