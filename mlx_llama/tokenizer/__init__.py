"""Tokenizer built from GGUF metadata alone, matching llama.cpp token for token.

Two vocabulary kinds are supported, named by `tokenizer.ggml.model`:

* ``gpt2``  – byte-level BPE. The text is cut into words by the regexes llama.cpp picks for
  `tokenizer.ggml.pre` (run on Python's `re` with llama.cpp's own Unicode tables), and each
  word is merged by a Hugging Face `tokenizers` BPE model.
* ``llama`` – SentencePiece BPE. Encoding runs on a `sentencepiece` processor built from a
  ModelProto assembled from the tokens, scores and token types.

What makes the result identical to llama.cpp rather than to the original HF/SP tokenizer is
the code around those engines, which follows `llama-vocab.cpp`: which tokens count as special
(including llama.cpp's text heuristics that promote e.g. `<|im_end|>` to a control token), how
special tokens are cut out of the text before the engine sees it, when BOS/EOS are added, how
pieces are rendered back to bytes and the clean-up llama.cpp applies when detokenizing.

The modules, along the data path:

* `vocab`         – `Tokenizer`: reads the vocabulary, ties the steps below together.
* `checks`        – the vocabulary checked first: key types, array lengths, ids, duplicates, byte tokens.
* `alphabet`      – token attributes (`Attr`), `<0xXX>` byte tokens, GPT-2's byte alphabet.
* `specials`      – special tokens: roles, end of generation, quirks, cutting them out of text.
* `pretokenizers` – the regexes that cut BPE text into words, per `tokenizer.ggml.pre`.
* `unicode_data`  – llama.cpp's Unicode category tables those regexes are spelled out with.
* `engines`       – BPE (HF `tokenizers`) and SentencePiece (a ModelProto written by hand).
* `detokenize`    – ids → text one token at a time, and the clean-up of spaces.
"""

from .detokenize import StreamingDetokenizer
from .vocab import Tokenizer

__all__ = ["Tokenizer", "StreamingDetokenizer"]
