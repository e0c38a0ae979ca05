"""Files the tests need that the repository does not hold, fetched once and cached.

* The default model: `mlx_llama.default_model()` (the user's cache, ~/.cache/mlx_llama).
* llama.cpp's tokenizer test vocabularies (models/ggml-vocab-*.gguf with their .inp/.out test
  cases), which ship inside llama-cpp-python's source distribution on PyPI: the sdist is
  downloaded once (76 MB, pinned digest) and the files extracted into tests/.cache/vocab/.
  `scripts/fetch_vocab_tests.sh` does the same by hand.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

VOCAB_DIR = Path(__file__).resolve().parent / ".cache" / "vocab"
VOCAB_SDIST_URL = ("https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
                   "llama_cpp_python-0.3.36.tar.gz")
VOCAB_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_COMPLETE = ".complete"  # written last: the directory holds every file


def vocab_dir() -> Path:
    """tests/.cache/vocab/, fetched on first use; raises `MlxLlamaError` when it cannot be."""
    if (VOCAB_DIR / _COMPLETE).exists():
        return VOCAB_DIR
    from mlx_llama.download import download_url

    VOCAB_DIR.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=VOCAB_DIR.parent) as tmp:
        sdist = Path(tmp) / "sdist.tar.gz"
        download_url(VOCAB_SDIST_URL, VOCAB_SDIST_SHA256, sdist, "llama.cpp's vocab test files (llama-cpp-python 0.3.36 sdist)")
        out = Path(tmp) / "vocab"
        out.mkdir()
        with tarfile.open(sdist) as tar:
            for member in tar:
                name = os.path.basename(member.name)
                if member.isfile() and "/vendor/llama.cpp/models/" in member.name and name.startswith("ggml-vocab-"):
                    with tar.extractfile(member) as src, open(out / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        (out / _COMPLETE).write_text(VOCAB_SDIST_URL + "\n")
        if VOCAB_DIR.exists():
            shutil.rmtree(VOCAB_DIR)
        os.replace(out, VOCAB_DIR)
    return VOCAB_DIR
