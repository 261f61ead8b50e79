"""The downloader keeps the verified hashes beside the files, puts a folder's marker last, repairs
damaged files on a re-run and cleans the leftovers of failed attempts."""

from __future__ import annotations

import hashlib
import json

import pytest

from hyperlora import integrity as ig
from hyperlora.checkpoint import is_model_folder
from hyperlora.errors import DownloadError, ModelFileError
from hyperlora.tools import download as dl
from tests.core.test_download import CHECKSUMS, FakeHub, _release, _tree

FIDELITY = "hyper_lora/hyper_lora/sdxl_hyper_id_lora_v1_fidelity"


def _get_paths(hub: FakeHub) -> list[str]:
    return [p for p, r in hub.requests if r != "HEAD"]


def test_checksums_record_what_was_verified(tmp_path):
    files = _release()
    basis = "bytedance-research/HyperLoRA/resolve/main/sdxl_hyper_id_lora_v1_fidelity/hyper_lora_modules.safetensors"
    with FakeHub(files) as hub:
        hub.linked[basis] = (hashlib.sha256(files[basis]).hexdigest(), len(files[basis]))
        dl.download_all(tmp_path, model="fidelity", base_url=hub.url, backoff=0)
    record = json.loads((tmp_path / FIDELITY / CHECKSUMS).read_text())["files"]
    assert set(record) == {"hyper_lora_modules.json", "hyper_lora_modules.safetensors", "resampler.safetensors",
                           "id_projector.safetensors"}
    for name, entry in record.items():
        data = (tmp_path / FIDELITY / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
    assert record["hyper_lora_modules.safetensors"]["source"] == "server"     # announced and matched
    assert record["resampler.safetensors"]["source"] == "download"            # nothing announced
    onnx = json.loads((tmp_path / "insightface/models/antelopev2" / CHECKSUMS).read_text())["files"]
    assert len(onnx) == 5 and {e["source"] for e in onnx.values()} == {"zip"}
    assert ig.verify_folder(tmp_path / FIDELITY).state == "verified"


def test_marker_comes_last_and_a_stopped_download_does_not_look_finished(tmp_path):
    files = _release()
    resampler = "bytedance-research/HyperLoRA/resolve/main/sdxl_hyper_id_lora_v1_fidelity/resampler.safetensors"
    gone = files.pop(resampler)
    with FakeHub(files) as hub:
        with pytest.raises(DownloadError, match="HTTP 404"):
            dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False, base_url=hub.url, backoff=0)
    folder = tmp_path / FIDELITY
    assert (folder / "hyper_lora_modules.safetensors").is_file()          # what came before the failure is kept
    assert not (folder / "hyper_lora_modules.json").exists() and not is_model_folder(folder)   # not in the list
    assert not (folder / CHECKSUMS).exists()
    files[resampler] = gone
    with FakeHub(files) as hub:
        dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False, base_url=hub.url, backoff=0)
    order = [p.rsplit("/", 1)[1] for p in _get_paths(hub)]
    assert order == ["resampler.safetensors", "id_projector.safetensors", "hyper_lora_modules.json"]   # basis kept
    assert is_model_folder(folder) and ig.verify_folder(folder).state == "verified"


def test_a_file_damaged_later_is_fetched_again_and_the_folder_hidden_meanwhile(tmp_path):
    files = _release()
    with FakeHub(files) as hub:
        dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False, base_url=hub.url, backoff=0)
    basis = tmp_path / FIDELITY / "hyper_lora_modules.safetensors"
    good = basis.read_bytes()
    damaged = bytearray(good)
    damaged[-600:-100] = bytes(500)                     # zeros in the tensor data: same size, valid format
    basis.write_bytes(bytes(damaged))
    dl.check_safetensors(basis)                         # the format check alone does not see it
    with pytest.raises(ModelFileError, match="does not have the SHA-256 recorded"):
        ig.verify_folder(basis.parent)
    url = "bytedance-research/HyperLoRA/resolve/main/sdxl_hyper_id_lora_v1_fidelity/hyper_lora_modules.safetensors"
    with FakeHub({k: v for k, v in files.items() if k != url}) as hub:   # the server fails: stop half-way
        with pytest.raises(DownloadError):
            dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False, base_url=hub.url, backoff=0)
    assert not is_model_folder(basis.parent)            # hidden: it is not complete
    assert basis.with_name(basis.name + ".bad").read_bytes() == bytes(damaged)
    with FakeHub(files) as hub:
        dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False, base_url=hub.url, backoff=0)
    assert basis.read_bytes() == good and is_model_folder(basis.parent)
    assert [p.rsplit("/", 1)[1] for p in _get_paths(hub)] == ["hyper_lora_modules.safetensors",
                                                              "hyper_lora_modules.json"]
    assert not basis.with_name(basis.name + ".bad").exists()            # cleaned once the file is good
    assert ig.verify_folder(basis.parent).state == "verified"


def test_corrupt_leftovers_are_removed_after_a_good_rerun(tmp_path):
    files = _release()
    target = next(f for f in dl.plan(model="fidelity", clip=False, antelopev2=False)
                  if f.dest.endswith("id_projector.safetensors"))
    with FakeHub(files) as hub:
        hub.etags[target.path] = hashlib.sha256(b"not it").hexdigest()
        with pytest.raises(DownloadError, match="Kept as"):
            dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False, base_url=hub.url, backoff=0)
    corrupt = tmp_path / (target.dest + ".corrupt")
    assert corrupt.is_file()
    with FakeHub(files) as hub:
        dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False, base_url=hub.url, backoff=0)
    assert not corrupt.exists()
    assert not any(p.endswith((".corrupt", ".bad", ".part")) for p in _tree(tmp_path))


def test_checksums_only_records_a_hand_copied_folder_and_refuses_a_damaged_one(tmp_path, capsys):
    files = _release()
    with FakeHub(files) as hub:
        dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False, base_url=hub.url, backoff=0)
    folder = tmp_path / FIDELITY
    (folder / CHECKSUMS).unlink()                       # as if copied by hand
    assert dl.main(["--models-dir", str(tmp_path), "--skip-clip", "--skip-antelopev2", "--checksums-only"]) == 0
    assert capsys.readouterr().out.strip() == str(folder / CHECKSUMS)
    record = ig.read_checksums(folder)
    assert record is not None and {r.source for r in record.values()} == {"local"}
    # with a record, a damaged file is refused, never recorded as good
    with open(folder / "resampler.safetensors", "r+b") as f:
        f.seek(-64, 2)
        f.write(bytes(32))
    assert dl.main(["--models-dir", str(tmp_path), "--skip-clip", "--skip-antelopev2", "--checksums-only"]) == 1
    err = capsys.readouterr().err
    assert "resampler.safetensors' does not have the SHA-256" in err
    assert f'--models-dir "{tmp_path}" --model fidelity' in err


def test_redownload_hint_names_the_command_for_the_released_layout(tmp_path):
    hint = ig.redownload_hint(tmp_path / FIDELITY)
    assert hint.startswith(f'run python -m hyperlora.tools.download --models-dir "{tmp_path}" --model fidelity from ')
    assert ig.redownload_hint(tmp_path / "insightface/models/antelopev2").startswith(
        f'run python -m hyperlora.tools.download --models-dir "{tmp_path}" from')
    assert ig.redownload_hint(tmp_path / "somewhere/else") == ig.GENERIC_FIX
    assert not hasattr(dl, "redownload_hint") or dl.redownload_hint is ig.redownload_hint   # one definition


def test_the_verify_command_checks_a_hand_copied_folder_against_the_server(tmp_path):
    """Issue 18: the command the Loader names for an unverified (hand-copied) folder must tell a zeroed region:
    files without a record are compared with the SHA-256 the server announces and fetched again if they differ."""
    files = _release()
    prefix = "bytedance-research/HyperLoRA/resolve/main/sdxl_hyper_id_lora_v1_fidelity/"
    with FakeHub(files) as hub:
        dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False, base_url=hub.url, backoff=0)
    folder = tmp_path / FIDELITY
    (folder / CHECKSUMS).unlink()                                   # as if copied by hand ...
    with open(folder / "resampler.safetensors", "r+b") as f:        # ... with a zeroed region
        f.seek(-64, 2)
        f.write(bytes(32))
    assert ig.verify_folder(folder).state == "unverified"
    with FakeHub(files) as hub:
        for name in ("resampler.safetensors", "hyper_lora_modules.safetensors"):
            hub.linked[prefix + name] = (hashlib.sha256(files[prefix + name]).hexdigest(), len(files[prefix + name]))
        dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False, base_url=hub.url, backoff=0)
    assert [p.rsplit("/", 1)[1] for p in _get_paths(hub)] == ["resampler.safetensors", "hyper_lora_modules.json"]
    assert (folder / "resampler.safetensors").read_bytes() == files[prefix + "resampler.safetensors"]
    record = ig.read_checksums(folder)
    assert record is not None and record["hyper_lora_modules.safetensors"].source == "server"
    assert record["resampler.safetensors"].source == "server" and record["id_projector.safetensors"].source == "local"
    assert ig.verify_folder(folder).state == "verified"


def test_a_damaged_checksum_file_does_not_stop_the_downloader(tmp_path):
    files = _release()
    with FakeHub(files) as hub:
        dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False, base_url=hub.url, backoff=0)
    (tmp_path / FIDELITY / CHECKSUMS).write_text("{broken")
    with FakeHub(files) as hub:
        dl.download_all(tmp_path, model="fidelity", clip=False, antelopev2=False, base_url=hub.url, backoff=0)
    assert _get_paths(hub) == []                        # the files are good: kept, recorded again
    assert ig.verify_folder(tmp_path / FIDELITY).state == "verified"
