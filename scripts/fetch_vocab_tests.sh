#!/usr/bin/env bash
# Fetch llama.cpp's tokenizer test vocabularies into tests/.cache/vocab/ (gitignored).
#
# llama.cpp keeps small vocab-only GGUF files with test inputs and the ids its tokenizer gives
# for them (models/ggml-vocab-*.gguf, .gguf.inp, .gguf.out). They ship inside the
# llama-cpp-python source distribution, which is the only copy reachable through PyPI.
#
# Usage: scripts/fetch_vocab_tests.sh [path/to/llama_cpp_python-X.Y.Z.tar.gz]
#   With no argument the sdist is downloaded with pip (version: $LLAMA_CPP_PYTHON_VERSION,
#   default 0.3.36, the version whose llama.cpp the tests compare against).
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/tests/.cache/vocab"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

sdist="${1:-}"
if [[ -z "$sdist" ]]; then
    python3 -m pip download --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$tmp"
    sdist="$(ls "$tmp"/llama_cpp_python-*.tar.gz)"
fi

tar -xzf "$sdist" -C "$tmp" --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*'
mkdir -p "$dest"
cp "$tmp"/llama_cpp_python-*/vendor/llama.cpp/models/ggml-vocab-* "$dest"/
echo "llama.cpp vocab test files in $dest:"
ls "$dest"
