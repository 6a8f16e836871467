"""Fetch a zipped dataset once: download to a ``.part`` file, check its sha1, extract into place atomically."""

from __future__ import annotations

import glob
import hashlib
import http.client
import logging
import os
import shutil
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from finetune.atomic import disk_full_error, remove_stale, temp_name
from finetune.errors import DownloadError, SettingError
from finetune.progress import copy_with_progress

log = logging.getLogger(__name__)


def file_digest(path: str | Path, algorithm: str, chunk_size: int = 1 << 20) -> str:
    """The file's hex digest (``"sha1"``, ``"sha256"``, ...), read in chunks: files can outgrow memory."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download_and_extract(url: str, sha1: str, root: Path, timeout: float = 60.0) -> Path:
    """Make ``root`` hold the archive's extracted folder, downloading and verifying it only if needed.

    The archive is downloaded to a ``.part`` file, checked against ``sha1`` and only then renamed; a file that
    fails the check is deleted and never extracted. Extraction goes to a temporary folder that is renamed into
    place, so an existing ``root`` is always complete. Temporary files of dead processes are removed first.
    """
    root = Path(root)
    archive = root.parent / Path(urllib.parse.urlparse(url).path).name
    if root.parent.is_dir():  # leftovers of runs killed mid-download or mid-extraction
        remove_stale(root.parent, glob.escape(f"{archive.name}."), ".part")
        remove_stale(root.parent, glob.escape(f".{root.name}."), ".extracting")
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    if archive.exists() and file_digest(archive, "sha1") != sha1:
        log.warning("Existing %s does not match sha1 %s (partial or corrupt); downloading it again.", archive, sha1)
        archive.unlink()
    if not archive.exists():
        _download_verified(url, sha1, archive, root, timeout)

    tmp = root.parent / temp_name(f".{root.name}.", ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a dead process that had our pid
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        except OSError as err:
            full = disk_full_error(err, root)
            if full is not None:
                raise full from err
            raise
        extracted = tmp / root.name
        if not extracted.is_dir():
            top = sorted(p.name for p in tmp.iterdir())
            raise SettingError(f"{archive} does not contain a top-level folder {root.name!r} (it holds {top}).")
        try:
            extracted.rename(root)
        except OSError:
            if not root.is_dir():  # another process (a rank on another node) may have won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _download_verified(url: str, sha1: str, archive: Path, root: Path, timeout: float) -> None:
    part = archive.with_name(temp_name(f"{archive.name}.", ".part"))  # per process: ranks may race
    log.info("Downloading %s to %s", url, archive)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            expected_size = response.headers.get("Content-Length")
            size = int(expected_size) if expected_size and expected_size.isdigit() else None
            copy_with_progress(response, out, size, f"Downloading {archive.name}")
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, refused or cut connections
        part.unlink(missing_ok=True)
        full = disk_full_error(err, archive)
        if full is not None:
            raise full from err  # not a network problem: retrying would fail the same way
        raise DownloadError(
            f"Could not download {url} ({err}). Offline, put the extracted dataset at {root} yourself, "
            "or point the run at a local copy: data=folder data.root=PATH (a folder with train/<class>/ and "
            "test/<class>/). Pretrained weights need the same care offline: model.weights=PATH to a local "
            "state_dict, or a pre-filled $TORCH_HOME/hub/checkpoints (see docs/configuration.md, 'Working offline')."
        ) from err
    actual = file_digest(part, "sha1")
    if actual != sha1:
        size = part.stat().st_size
        part.unlink()
        raise DownloadError(
            f"Downloaded {url} is corrupt or incomplete: sha1 {actual} ({size} bytes"
            + (f" of {expected_size} announced" if expected_size else "")
            + f"), expected {sha1}. The file was deleted; run again to retry the download."
        )
    os.replace(part, archive)
