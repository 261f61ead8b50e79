"""hyperlora.tools.download against a local HTTP server (http.server in a thread) serving fake model files."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import socket
import struct
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from hyperlora.tools import download as dl
from hyperlora.errors import DownloadError


def _safetensors(seed: int, n: int = 40_000) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return st_save({"w": torch.randn(n, generator=g, dtype=torch.float32).half(), "b": torch.zeros(3)},
                   metadata={"format": "pt"})


def _antelope_zip(nested: bool) -> bytes:
    buf = io.BytesIO()
    prefix = "antelopev2/antelopev2/" if nested else "antelopev2/"
    with zipfile.ZipFile(buf, "w") as z:
        for name in dl.ANTELOPEV2_FILES:
            z.writestr(prefix + name, b"onnx-" + name.encode() * 50)
        z.writestr("__MACOSX/._junk", b"x")
    return buf.getvalue()


class FakeHub:
    """Serves ``files`` (url path -> bytes) with Range support; can cut connections and announce ETags."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.cut_once: set[str] = set()      # paths whose first full answer stops at half
        self.etags: dict[str, str] = {}
        self.linked: dict[str, tuple[str, int]] = {}   # HEAD -> 302 with X-Linked-Etag / X-Linked-Size
        self.requests: list[tuple[str, str | None]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                path = self.path.lstrip("/")
                hub.requests.append((path, "HEAD"))
                if path not in hub.linked:
                    self.send_error(405)
                    return
                sha, size = hub.linked[path]
                self.send_response(302)
                self.send_header("Location", "/" + path)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(size))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.lstrip("/")
                rng = self.headers.get("Range")
                hub.requests.append((path, rng))
                if path not in hub.files:
                    self.send_error(404)
                    return
                data = hub.files[path]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                if path in hub.etags:
                    self.send_header("ETag", f'"{hub.etags[path]}"')
                self.end_headers()
                body = data[start:]
                if path in hub.cut_once:
                    hub.cut_once.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *a: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _release(nested_zip: bool = True) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for i, f in enumerate(dl.plan(model="all")):
        if f.kind == "json":
            files[f.path] = json.dumps({"file": f.dest}).encode()
        elif f.kind == "safetensors":
            files[f.path] = _safetensors(i)
        else:
            files[f.path] = _antelope_zip(nested_zip)
    return files


CHECKSUMS = "hyperlora_checksums.json"
FOLDERS = ("hyper_lora/clip_processor/clip_vit_large_14_processor", "hyper_lora/clip_vit/clip_vit_large_14",
           "hyper_lora/hyper_lora/sdxl_hyper_id_lora_v1_fidelity", "hyper_lora/hyper_lora/sdxl_hyper_id_lora_v1_edit",
           "insightface/models/antelopev2")
EXPECTED_TREE = {
    "hyper_lora/clip_processor/clip_vit_large_14_processor/preprocessor_config.json",
    "hyper_lora/clip_vit/clip_vit_large_14/config.json",
    "hyper_lora/clip_vit/clip_vit_large_14/model.safetensors",
    *(f"hyper_lora/hyper_lora/sdxl_hyper_id_lora_v1_{m}/{n}" for m in ("fidelity", "edit")
      for n in ("hyper_lora_modules.json", "hyper_lora_modules.safetensors", "resampler.safetensors",
                "id_projector.safetensors")),
    *(f"insightface/models/antelopev2/{n}" for n in ("scrfd_10g_bnkps.onnx", "2d106det.onnx", "1k3d68.onnx",
                                                     "genderage.onnx", "glintr100.onnx")),
    *(f"{folder}/{CHECKSUMS}" for folder in FOLDERS),       # the verified hashes, beside each folder's files
}


def _model_file(name: str, model: str = "fidelity") -> dl.RemoteFile:
    return next(f for f in dl.plan(model=model, clip=False, antelopev2=False) if f.dest.endswith("/" + name))


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_plan_urls_point_at_the_released_repos():
    urls = {f.url(None) for f in dl.plan(model="fidelity")}
    assert ("https://huggingface.co/bytedance-research/HyperLoRA/resolve/main/sdxl_hyper_id_lora_v1_fidelity/"
            "resampler.safetensors") in urls
    assert "https://huggingface.co/openai/clip-vit-large-patch14/resolve/main/model.safetensors" in urls
    assert "https://github.com/deepinsight/insightface/releases/download/v0.7/antelopev2.zip" in urls
    assert not any("_edit" in u for u in urls)
    assert len(dl.plan(model="edit", clip=False, antelopev2=False)) == 4
    # the file that makes a folder appear in ComfyUI's dropdown comes last in its folder
    assert [f.dest.rsplit("/", 1)[1] for f in dl.plan(model="edit", clip=False, antelopev2=False)][-1] == \
        "hyper_lora_modules.json"
    clip_files = [f.dest for f in dl.plan(model="edit", antelopev2=False) if "clip_vit/" in f.dest]
    assert clip_files[-1].endswith("/config.json")
    with pytest.raises(DownloadError, match="fidelity, edit or all"):
        dl.plan(model="both")


def test_full_download_builds_the_released_layout(tmp_path, caplog):
    files = _release(nested_zip=True)
    with FakeHub(files) as hub, caplog.at_level(logging.INFO, logger="hyperlora.tools.download"):
        paths = dl.download_all(tmp_path, model="all", base_url=hub.url, backoff=0)
    assert _tree(tmp_path) == EXPECTED_TREE          # no .part, no zip, no nested antelopev2 folder left
    assert len(paths) == len(EXPECTED_TREE) - len(FOLDERS)
    for f in dl.plan(model="all", antelopev2=False):
        assert (tmp_path / f.dest).read_bytes() == files[f.path]
    onnx = tmp_path / "insightface/models/antelopev2/glintr100.onnx"
    assert onnx.read_bytes() == b"onnx-" + b"glintr100.onnx" * 50
    percent_lines = [r.getMessage() for r in caplog.records if "%" in r.getMessage()]
    assert any("100%" in m for m in percent_lines)

    # second run: nothing fetched again
    with FakeHub(files) as hub2:
        dl.download_all(tmp_path, model="all", base_url=hub2.url, backoff=0)
    assert hub2.requests == []
    assert ("HEAD" in {r for _, r in hub.requests})       # the first run asked for the announced hash


def test_resume_after_cut_connection_uses_range(tmp_path):
    files = _release()
    target = _model_file("hyper_lora_modules.safetensors")
    with FakeHub(files) as hub:
        hub.cut_once.add(target.path)
        out = dl.fetch(target, tmp_path, base_url=hub.url, backoff=0)
    reqs = [r for p, r in hub.requests if p == target.path and r != "HEAD"]
    assert reqs[0] is None and reqs[1] is not None
    half = len(files[target.path]) // 2
    assert reqs[1] == f"bytes={half}-"
    assert out.read_bytes() == files[target.path]
    assert not out.with_name(out.name + ".part").exists()


def test_resume_across_runs_keeps_the_part_file(tmp_path):
    files = _release()
    target = _model_file("resampler.safetensors")
    with FakeHub(files) as hub:
        hub.cut_once.add(target.path)
        with pytest.raises(DownloadError, match="run again to resume"):
            dl.fetch(target, tmp_path, base_url=hub.url, retries=0, backoff=0)
        part = tmp_path / (target.dest + ".part")
        assert part.stat().st_size == len(files[target.path]) // 2
        out = dl.fetch(target, tmp_path, base_url=hub.url, retries=0, backoff=0)
    assert out.read_bytes() == files[target.path]
    assert [r for r in hub.requests if r[1] != "HEAD"][-1] == (target.path, f"bytes={len(files[target.path]) // 2}-")


def test_corrupt_safetensors_is_detected_and_kept_aside(tmp_path):
    files = _release()
    target = _model_file("resampler.safetensors")
    good = files[target.path]
    files[target.path] = good[:-100]          # truncated tensor data: header promises more
    with FakeHub(files) as hub:
        with pytest.raises(DownloadError, match=r"corrupt.*truncated or padded"):
            dl.fetch(target, tmp_path, base_url=hub.url, backoff=0)
    assert not (tmp_path / target.dest).exists()
    assert (tmp_path / (target.dest + ".corrupt")).stat().st_size == len(good) - 100


def test_sha256_announced_by_the_server_is_checked(tmp_path):
    files = _release()
    target = _model_file("id_projector.safetensors")
    with FakeHub(files) as hub:
        hub.etags[target.path] = hashlib.sha256(b"something else").hexdigest()
        with pytest.raises(DownloadError, match="does not have the SHA-256"):
            dl.fetch(target, tmp_path, base_url=hub.url, backoff=0)
        (tmp_path / (target.dest + ".corrupt")).unlink()
        hub.etags[target.path] = hashlib.sha256(files[target.path]).hexdigest()
        assert dl.fetch(target, tmp_path, base_url=hub.url, backoff=0).read_bytes() == files[target.path]


def test_check_safetensors_accepts_real_files_and_rejects_garbage(tmp_path):
    ok = tmp_path / "ok.safetensors"
    ok.write_bytes(_safetensors(1))
    dl.check_safetensors(ok)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"\0" * 10)
    with pytest.raises(DownloadError, match="corrupt safetensors header"):
        dl.check_safetensors(bad)
    html = tmp_path / "html.safetensors"
    html.write_bytes(b"<!DOCTYPE html><html>rate limited</html>")
    with pytest.raises(DownloadError, match="not a safetensors file"):
        dl.check_safetensors(html)


def test_server_down_names_the_url(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as ei:
        dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False,
                        base_url=f"http://127.0.0.1:{port}", retries=1, backoff=0)
    msg = str(ei.value)
    assert f"http://127.0.0.1:{port}/bytedance-research/HyperLoRA/resolve/main/" in msg
    assert "internet connection" in msg and "HYPERLORA_DOWNLOAD_BASE" in msg


def test_http_404_is_reported(tmp_path):
    with FakeHub({}) as hub:
        with pytest.raises(DownloadError, match="HTTP 404"):
            dl.download_all(tmp_path, model="edit", clip=False, antelopev2=False, base_url=hub.url)


def test_existing_nested_antelopev2_is_fixed_without_download(tmp_path):
    nested = tmp_path / "insightface/models/antelopev2/antelopev2"
    nested.mkdir(parents=True)
    for n in dl.ANTELOPEV2_FILES:
        (nested / n).write_bytes(b"x")
    files = _release()
    with FakeHub(files) as hub:
        dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=True, base_url=hub.url)
    assert all(p != dl.ANTELOPEV2_ZIP for p, _ in hub.requests)   # the zip was not fetched again
    tree = _tree(tmp_path)
    assert {f"insightface/models/antelopev2/{n}" for n in dl.ANTELOPEV2_FILES} <= tree
    assert not any("antelopev2/antelopev2" in t for t in tree)
    assert not nested.exists()


def test_zip_without_the_onnx_files_is_rejected(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("antelopev2/readme.txt", b"nothing")
    files = _release()
    files[dl.ANTELOPEV2_ZIP] = buf.getvalue()
    with FakeHub(files) as hub:
        with pytest.raises(DownloadError, match="scrfd_10g_bnkps.onnx"):
            dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=True, base_url=hub.url)
    assert (tmp_path / "insightface/models/antelopev2.zip").exists()   # kept, nothing lost


def test_cli_list_and_env_base(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYPERLORA_DOWNLOAD_BASE", "http://mirror.invalid")
    assert dl.main(["--models-dir", str(tmp_path), "--list", "--skip-antelopev2", "--base-url", "http://m"]) == 0
    out = capsys.readouterr().out
    assert "http://m/openai/clip-vit-large-patch14/resolve/main/config.json" in out
    assert "antelopev2" not in out
    files = _release()
    with FakeHub(files) as hub:
        monkeypatch.setenv("HYPERLORA_DOWNLOAD_BASE", hub.url)
        assert dl.main(["--models-dir", str(tmp_path), "--model", "edit", "--skip-clip"]) == 0
    assert _tree(tmp_path) == {e for e in EXPECTED_TREE if "_edit" in e or "antelopev2" in e}
    assert dl.main(["--models-dir", str(tmp_path), "--model", "edit", "--skip-clip", "--checksums-only"]) == 0


def test_hugging_face_linked_sha256_and_size_are_checked(tmp_path):
    files = _release()
    target = _model_file("hyper_lora_modules.safetensors")
    data = files[target.path]
    with FakeHub(files) as hub:
        assert dl.probe(f"{hub.url}/{target.path}") == (None, None)        # no announcement: nothing claimed
        hub.linked[target.path] = (hashlib.sha256(data).hexdigest(), len(data))
        assert dl.probe(f"{hub.url}/{target.path}") == (hashlib.sha256(data).hexdigest(), len(data))
        assert dl.fetch(target, tmp_path, base_url=hub.url, backoff=0).read_bytes() == data
        (tmp_path / target.dest).unlink()
        hub.linked[target.path] = (hashlib.sha256(b"other").hexdigest(), len(data))
        with pytest.raises(DownloadError, match="does not have the SHA-256"):
            dl.fetch(target, tmp_path, base_url=hub.url, backoff=0)
        (tmp_path / (target.dest + ".corrupt")).unlink()
        hub.linked[target.path] = (hashlib.sha256(data).hexdigest(), len(data) + 10)   # a proxy cut the file
        with pytest.raises(DownloadError, match=f"has {len(data)} bytes, the repository lists {len(data) + 10}"):
            dl.fetch(target, tmp_path, base_url=hub.url, backoff=0)
