#!/usr/bin/env bash
# Fetch llama.cpp's tokenizer test vocabularies into tests/.cache/vocab/ (gitignored).
#
# llama.cpp keeps small vocab-only GGUF files with test inputs and the ids its tokenizer gives
# for them (models/ggml-vocab-*.gguf, .gguf.inp, .gguf.out). They ship inside the
# llama-cpp-python 0.3.36 source distribution, the only copy reachable through PyPI.
# The tests fetch them on first use (tests/resources.py); this does it ahead of time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/tests"
python3 -c "import resources; d = resources.vocab_dir(); print(f'llama.cpp vocab test files in {d}')"
