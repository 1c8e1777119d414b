"""Data folder resolution and downloads (served from a loopback HTTP server made in the test)."""

import hashlib
import http.server
import threading
from functools import partial

import pytest

from metatl.data import files


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files and honours 'Range: bytes=N-' (to exercise resume)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        try:
            data = open(path, "rb").read()
        except OSError:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_resumes_and_verifies(server, tmp_path):
    root, url = server
    payload = bytes(range(256)) * 1000
    (root / "blob.bin").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "out" / "blob.bin"
    dest.parent.mkdir()
    dest.with_name("blob.bin.part").write_bytes(payload[:1000])  # an interrupted earlier download
    files.download(f"{url}/blob.bin", dest, [sha], progress=False)
    assert dest.read_bytes() == payload and not dest.with_name("blob.bin.part").exists()


def test_download_rejects_a_wrong_checksum_and_leaves_no_file(server, tmp_path):
    root, url = server
    (root / "blob.bin").write_bytes(b"tampered")
    dest = tmp_path / "blob.bin"
    with pytest.raises(ValueError, match="not an accepted checksum"):
        files.download(f"{url}/blob.bin", dest, ["0" * 64], progress=False)
    assert not dest.exists() and not dest.with_name("blob.bin.part").exists()


def test_download_without_network_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="copy the file to .* by hand"):
        files.download("http://127.0.0.1:9/none.zip", tmp_path / "none.zip", ["0" * 64], progress=False)


def test_md5_of_official_files_is_accepted(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    files.verify(p, [hashlib.md5(b"abc").hexdigest()])
    with pytest.raises(ValueError, match="download it again"):
        files.verify(p, [hashlib.md5(b"abd").hexdigest()])


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv(files.ENV_VAR, str(tmp_path / "env"))
    assert files.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert files.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv(files.ENV_VAR)
    monkeypatch.setattr(files, "_beside_checkout", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert files.resolve_data_dir() == tmp_path / "cache" / "metatl"
