import hashlib
import http.server
import io
import threading
import zipfile
from functools import partial

import pytest

from dpo4rec.data import load_dataset
from dpo4rec.data.download import download_dataset
from dpo4rec.errors import InputError

RATINGS = "1::10::5::978300760\n1::20::3::978300100\n2::10::4::978300000\n2::30::1::978300001\n"
MOVIES = "10::Toy Story (1995)::Animation|Children's|Comedy\n20::Jumanji (1995)::Adventure\n30::Café Society (1995)::Drama\n"
USERS = "1::F::1::10::48067\n2::M::56::16::70072\n"


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", RATINGS)
        zf.writestr("ml-1m/movies.dat", MOVIES.encode("latin-1"))
        zf.writestr("ml-1m/users.dat", USERS)
    return buffer.getvalue()


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "ml-1m.zip").write_bytes(_zip_bytes())
    (root / "broken.zip").write_bytes(b"not a zip")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_verifies_and_the_loader_reads_raw_files(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO4REC_CACHE", str(tmp_path / "cache"))
    md5 = hashlib.md5(_zip_bytes()).hexdigest()
    folder = download_dataset("ml-1m", url=f"{server}/ml-1m.zip", md5=md5)
    assert (folder / "ratings.dat").is_file()
    data = load_dataset("ml-1m")  # the cache wins over the packaged copy
    assert len(data.interactions) == 4
    assert data.interactions["item_id"].tolist() == [20, 10, 10, 30]
    assert data.items.set_index("item_id").loc[30, "title"] == "Café Society (1995)"
    assert data.users.set_index("user_id").loc[2, "occupation"] == "self-employed"


def test_bad_checksum_or_archive_leaves_nothing(server, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DPO4REC_CACHE", str(cache))
    with pytest.raises(InputError, match="checksum mismatch"):
        download_dataset("ml-1m", url=f"{server}/ml-1m.zip", md5="0" * 32)
    with pytest.raises(InputError, match="not a zip"):
        download_dataset("ml-1m", url=f"{server}/broken.zip", md5="")
    with pytest.raises(InputError, match="download failed"):
        download_dataset("ml-1m", url=f"{server}/missing.zip", md5="")
    assert list(cache.iterdir()) == []
    with pytest.raises(InputError, match="no download source"):
        download_dataset("ml-20m")
