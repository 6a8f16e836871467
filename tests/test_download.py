"""The download-verify-extract path, for real, against a zip served from 127.0.0.1."""

import hashlib
import http.server
import os
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from finetune.data import ImageFolderDataModule, download_and_extract

from .conftest import make_image_folder


class _ZipServer:
    """Serves ``payload`` at /hotdog.zip and counts the requests."""

    def __init__(self, payload: bytes, announce: int | None = None):
        self.payload, self.requests = payload, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(announce or len(server.payload)))
                self.end_headers()
                self.wfile.write(server.payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hotdog.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hotdog_zip(tmp_path) -> bytes:
    """A zip laid out like d2l's hotdog.zip: hotdog/{train,test}/{hotdog,not-hotdog}/N.png."""
    source = make_image_folder(tmp_path / "src" / "hotdog", classes=("hotdog", "not-hotdog"), n_train=3, n_test=2)
    archive = tmp_path / "hotdog.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*.png")):
            zf.write(path, path.relative_to(source.parent))
    return archive.read_bytes()


@pytest.fixture
def serve():
    servers = []

    def start(payload: bytes, announce: int | None = None) -> _ZipServer:
        servers.append(_ZipServer(payload, announce))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_good_download_is_verified_extracted_once_and_reused(tmp_path, hotdog_zip, serve):
    server = serve(hotdog_zip)
    sha1 = hashlib.sha1(hotdog_zip).hexdigest()
    root = tmp_path / "data" / "hotdog"
    download = {"url": server.url, "sha1": sha1}
    dm = ImageFolderDataModule(root, download=download, num_workers=0, val_fraction=0.34, image_size=32)
    dm.prepare_data()
    assert (root / "train" / "hotdog").is_dir() and len(list((root / "test").rglob("*.png"))) == 4
    assert (tmp_path / "data" / "hotdog.zip").read_bytes() == hotdog_zip
    dm.prepare_data()
    download_and_extract(server.url, sha1, root)
    assert server.requests == 1
    dm.setup("fit")
    assert dm.classes == ["hotdog", "not-hotdog"]
    assert not list((tmp_path / "data").glob(".*"))  # no temporary files left behind


def test_bad_checksum_deletes_the_file_and_extracts_nothing(tmp_path, hotdog_zip, serve):
    server = serve(hotdog_zip)
    root = tmp_path / "data" / "hotdog"
    with pytest.raises(RuntimeError, match="corrupt or incomplete: sha1 .* expected 0{40}.*deleted"):
        download_and_extract(server.url, "0" * 40, root)
    assert not root.exists()
    assert list((tmp_path / "data").iterdir()) == []


def test_truncated_download_is_detected_and_never_used(tmp_path, hotdog_zip, serve):
    sha1 = hashlib.sha1(hotdog_zip).hexdigest()
    half = hotdog_zip[: len(hotdog_zip) // 2]
    server = serve(half, announce=len(hotdog_zip))  # the connection ends early, as a broken transfer does
    root = tmp_path / "data" / "hotdog"
    with pytest.raises(RuntimeError) as info:
        download_and_extract(server.url, sha1, root)
    assert "hotdog.zip" in str(info.value)
    assert not root.exists()
    assert list((tmp_path / "data").iterdir()) == []


def test_corrupt_archive_left_on_disk_is_downloaded_again(tmp_path, hotdog_zip, serve):
    server = serve(hotdog_zip)
    sha1 = hashlib.sha1(hotdog_zip).hexdigest()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "hotdog.zip").write_bytes(hotdog_zip[:100])  # an earlier, interrupted download
    root = download_and_extract(server.url, sha1, tmp_path / "data" / "hotdog")
    assert server.requests == 1
    assert (tmp_path / "data" / "hotdog.zip").read_bytes() == hotdog_zip
    assert len(list(root.rglob("*.png"))) == 10


def test_unreachable_server_says_how_to_work_offline(tmp_path, serve):
    server = serve(b"")
    server.close()  # nothing listens on that port any more
    with pytest.raises(RuntimeError, match="Could not download .*data=folder data.root=PATH"):
        download_and_extract(server.url, "0" * 40, tmp_path / "data" / "hotdog", timeout=5)
    assert list((tmp_path / "data").iterdir()) == []


def test_leftovers_of_dead_processes_are_removed_and_a_live_download_is_kept(tmp_path, hotdog_zip, serve):
    server = serve(hotdog_zip)
    data, host = tmp_path / "data", socket.gethostname()
    data.mkdir()
    pid_max = Path("/proc/sys/kernel/pid_max")
    dead = int(pid_max.read_text()) + 1 if pid_max.exists() else 2**22 + 1  # no process can have it
    dead_part = data / f"hotdog.zip.{host}.{dead}.part"
    live_part = data / f"hotdog.zip.{host}.{os.getppid()}.part"  # the process that started pytest
    dead_extraction = data / f".hotdog.{host}.{dead}.extracting"
    for part in (dead_part, live_part):
        part.write_bytes(hotdog_zip[:100])
    (dead_extraction / "hotdog").mkdir(parents=True)
    root = download_and_extract(server.url, hashlib.sha1(hotdog_zip).hexdigest(), data / "hotdog")
    assert len(list(root.rglob("*.png"))) == 10
    assert sorted(p.name for p in data.iterdir()) == sorted(["hotdog", "hotdog.zip", live_part.name])
