"""hyperlora.integrity: recorded SHA-256 beside a model, checked once and then cached by the file's identity and its
modification and status-change times (what ``stat`` gives; the ctime cannot be put back without root).

A file with a region overwritten by zeros keeps its size and stays finite: only the hash tells."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from hyperlora import integrity as ig
from hyperlora.checkpoint import load_hyper_lora
from hyperlora.errors import ModelFileError
from hyperlora.spec import BASIS_FILE, CHECKSUM_FILE, MARKER_FILE, MODEL_FILES, RESAMPLER_FILE
from tests.fixtures.hyperlora_models import write_hyperlora_folder


def _record(folder: Path, source: str = "server") -> dict[str, ig.FileRecord]:
    names = [n for n in MODEL_FILES if (folder / n).is_file()]
    records = ig.record_files(folder, names, source=source)
    ig.write_checksums(folder, records)
    return records


def _zero_region(path: Path, offset_from_end: int = 4096, length: int = 1024) -> None:
    """Overwrite ``length`` bytes with zeros, keeping the size (the damage no format check sees)."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - offset_from_end)
        f.write(b"\0" * length)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return write_hyperlora_folder(tmp_path / "models" / "tiny_model", base=True)


@pytest.fixture()
def cache(tmp_path: Path) -> ig.VerifiedCache:
    return ig.VerifiedCache(tmp_path / "cache" / "integrity.json")


@pytest.fixture()
def hashing(monkeypatch) -> list[str]:
    """Names of the files hashed (the real hash still runs)."""
    seen: list[str] = []
    real = ig.sha256_file

    def counted(path, **kw):
        seen.append(Path(path).name)
        return real(path, **kw)

    monkeypatch.setattr(ig, "sha256_file", counted)
    return seen


def test_checksum_file_round_trip_and_layout(folder):
    records = _record(folder)
    data = json.loads((folder / CHECKSUM_FILE).read_text())
    assert data["format"] == "hyperlora-checksums" and data["version"] == 1
    entry = data["files"][BASIS_FILE]
    assert entry == {"sha256": hashlib.sha256((folder / BASIS_FILE).read_bytes()).hexdigest(),
                     "size": (folder / BASIS_FILE).stat().st_size, "source": "server"}
    assert ig.read_checksums(folder) == records
    assert ig.read_checksums(folder.parent) is None


def test_first_check_hashes_then_the_cache_only_stats(folder, cache, hashing):
    _record(folder)
    hashing.clear()
    first = ig.verify_folder(folder, uses=MODEL_FILES, cache=cache)
    assert first.state == "verified" and set(first.hashed) == set(hashing) and len(hashing) == 5
    assert "SHA-256 checked now" in first.describe()
    second = ig.verify_folder(folder, uses=MODEL_FILES, cache=ig.VerifiedCache(cache.path))   # another process
    assert len(hashing) == 5 and second.hashed == () and set(second.cached) == set(first.hashed)
    assert second.describe().startswith(f"verified: 5 file(s) match {CHECKSUM_FILE} (unchanged since")


def test_zeroed_region_is_refused_naming_the_file_and_the_fix(folder, cache):
    _record(folder)
    ig.verify_folder(folder, cache=cache)                     # cached as good ...
    _zero_region(folder / BASIS_FILE)                         # ... then damaged: same size, new mtime
    load_hyper_lora(folder)                                   # every format and NaN check still passes
    with pytest.raises(ModelFileError) as ei:
        ig.verify_folder(folder, cache=cache, fix="run the downloader again")
    msg = str(ei.value)
    assert f"'{folder / BASIS_FILE}' does not have the SHA-256 recorded for it" in msg
    assert "would give wrong LoRAs" in msg and msg.endswith("To repair it, run the downloader again.")


def test_damage_with_the_mtime_put_back_is_hashed_again_and_refused(folder, cache, hashing):
    """Issue 18: the cache key was (path, size, mtime_ns), so a file damaged after its first check whose
    modification time was restored stayed "verified".  The status-change time moves on every write and
    ``utime`` (only root can set it back), so the file is hashed again."""
    _record(folder)
    assert ig.verify_folder(folder, cache=cache).state == "verified"
    st = (folder / RESAMPLER_FILE).stat()
    _zero_region(folder / RESAMPLER_FILE)
    os.utime(folder / RESAMPLER_FILE, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = (folder / RESAMPLER_FILE).stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns) and after.st_ctime_ns != st.st_ctime_ns
    hashing.clear()
    with pytest.raises(ModelFileError, match=f"{RESAMPLER_FILE}' does not have the SHA-256"):
        ig.verify_folder(folder, cache=ig.VerifiedCache(cache.path))     # a later load (another process)
    assert hashing == [RESAMPLER_FILE]                                   # only the changed file is hashed again


def test_a_damaged_copy_renamed_over_the_file_with_its_times_is_refused(folder, cache):
    """Another inode (a copy put in place with the old times, as ``cp -p`` + ``mv`` does) is hashed again."""
    _record(folder)
    ig.verify_folder(folder, cache=cache)
    target = folder / BASIS_FILE
    st = target.stat()
    copy = folder / "copy.tmp"
    copy.write_bytes(target.read_bytes())
    _zero_region(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(copy, target)
    assert target.stat().st_ino != st.st_ino and target.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ModelFileError, match=f"{BASIS_FILE}' does not have the SHA-256"):
        ig.verify_folder(folder, cache=cache)


def test_file_state_is_what_the_cache_compares(folder, cache):
    _record(folder)
    ig.verify_folder(folder, cache=cache)
    entry = json.loads(cache.path.read_text())["entries"][str((folder / BASIS_FILE).resolve())]
    st = (folder / BASIS_FILE).stat()
    assert ig.file_state(st) == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                                 "ino": st.st_ino, "dev": st.st_dev}
    assert {k: entry[k] for k in ig.file_state(st)} == ig.file_state(st)
    assert cache.get(folder / BASIS_FILE, {**ig.file_state(st), "ctime_ns": st.st_ctime_ns + 1}) is None
    assert cache.get(folder / BASIS_FILE, ig.file_state(st)) == entry["sha256"]


def test_an_old_cache_keyed_by_mtime_only_is_dropped(folder, cache, hashing):
    _record(folder)
    ig.verify_folder(folder, cache=cache)
    data = json.loads(cache.path.read_text())
    old = {k: {"size": v["size"], "mtime_ns": v["mtime_ns"], "sha256": v["sha256"], "checked": 1.0}
           for k, v in data["entries"].items()}
    cache.path.write_text(json.dumps({"version": 1, "entries": old}))
    hashing.clear()
    report = ig.verify_folder(folder, cache=ig.VerifiedCache(cache.path))
    assert len(hashing) == 5 and len(report.hashed) == 5 and json.loads(cache.path.read_text())["version"] == 2


def test_other_size_missing_file_and_unused_files(folder, cache):
    _record(folder)
    with open(folder / RESAMPLER_FILE, "ab") as f:
        f.write(b"x")
    with pytest.raises(ModelFileError, match=r"has \d+ bytes where \d+ were recorded"):
        ig.verify_folder(folder, cache=cache)
    _record(folder)
    (folder / "base_resampler.safetensors").unlink()
    with pytest.raises(ModelFileError, match="is missing, but .* records it as part of this model"):
        ig.verify_folder(folder, uses=MODEL_FILES, cache=cache)
    # a recorded file the caller does not use may be gone
    report = ig.verify_folder(folder, uses=[n for n in MODEL_FILES if n != "base_resampler.safetensors"], cache=cache)
    assert report.state == "verified" and "base_resampler.safetensors" not in report.hashed + report.cached


def test_unrecorded_folder_loads_unverified_with_one_warning_naming_the_command(tmp_path, cache, caplog):
    """Issue 18: a hand-copied folder with a zeroed region loads; the info and a logged warning say it is
    unverified and which command verifies it."""
    folder = write_hyperlora_folder(tmp_path / "ComfyUI" / "models" / "hyper_lora" / "hyper_lora" /
                                    "sdxl_hyper_id_lora_v1_fidelity", base=True)
    _zero_region(folder / RESAMPLER_FILE)
    command = f'python -m hyperlora.tools.download --models-dir "{tmp_path / "ComfyUI" / "models"}" --model fidelity'
    with caplog.at_level(logging.INFO, logger="hyperlora.integrity"):
        a = ig.verify_folder(folder, uses=MODEL_FILES, cache=cache)
        b = ig.verify_folder(folder, uses=MODEL_FILES, cache=cache)
    assert a.state == b.state == "unverified"
    text = a.describe()
    assert text.startswith("UNVERIFIED (no hyperlora_checksums.json") and f"To verify it, run {command} from" in text
    warnings = [r for r in caplog.records if "loaded UNVERIFIED" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING and command in warnings[0].getMessage()
    assert set(a.unlisted) == {n for n in MODEL_FILES if (folder / n).exists()}


def test_verify_and_repair_hints_outside_the_released_layout(tmp_path):
    assert ig.redownload_hint(tmp_path / "somewhere" / "else") == ig.GENERIC_FIX
    hint = ig.verify_hint(tmp_path / "somewhere" / "else")
    assert "models/hyper_lora/hyper_lora/<model>" in hint and "python -m hyperlora.tools.download --models-dir" in hint


def test_a_file_the_record_lacks_is_reported(folder, cache):
    records = _record(folder)
    del records["base_resampler.safetensors"]
    ig.write_checksums(folder, records)
    report = ig.verify_folder(folder, uses=MODEL_FILES, cache=cache)
    assert report.state == "partly verified" and report.unlisted == ("base_resampler.safetensors",)
    assert "not recorded: base_resampler.safetensors" in report.describe()


@pytest.mark.parametrize("text,why", [
    ("{not json", "not readable JSON"),
    ('{"format": "other", "files": {}}', "not a hyperlora-checksums file"),
    ('{"format": "hyperlora-checksums", "version": 1, "files": {"x": {"sha256": "abc", "size": 1}}}',
     "the entry for 'x'"),
    ('{"format": "hyperlora-checksums", "version": 1, "files": {"../x": {"sha256": "' + "a" * 64 + '", "size": 1}}}',
     "the entry for '../x'"),
])
def test_damaged_checksum_file_is_refused_with_the_fix(folder, text, why):
    (folder / CHECKSUM_FILE).write_text(text)
    with pytest.raises(ModelFileError) as ei:
        ig.verify_folder(folder)
    assert why in str(ei.value) and "Delete it, then download the model again" in str(ei.value)


def test_newer_checksum_format_asks_for_an_update(folder):
    (folder / CHECKSUM_FILE).write_text('{"format": "hyperlora-checksums", "version": 9, "files": {}}')
    with pytest.raises(ModelFileError, match="newer HyperLoRA Studio"):
        ig.read_checksums(folder)


def test_corrupt_cache_file_is_rebuilt(folder, cache, hashing):
    _record(folder)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text("]]] garbage")
    hashing.clear()
    assert ig.verify_folder(folder, cache=cache).state == "verified" and len(hashing) == 5
    data = json.loads(cache.path.read_text())
    assert data["version"] == 2 and len(data["entries"]) == 5
    assert not list(cache.path.parent.glob("*.tmp"))          # written atomically (temp file renamed)


def test_unwritable_cache_still_verifies(folder, tmp_path, caplog):
    _record(folder)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    cache = ig.VerifiedCache(blocker / "integrity.json")
    with caplog.at_level(logging.WARNING, logger="hyperlora.integrity"):
        assert ig.verify_folder(folder, cache=cache).state == "verified"
    assert "cannot write the integrity cache" in caplog.text


def test_two_caches_merge_on_save(folder, tmp_path):
    _record(folder)
    other = write_hyperlora_folder(tmp_path / "models" / "other", seed=3)
    _record(other)
    path = tmp_path / "shared.json"
    a, b = ig.VerifiedCache(path), ig.VerifiedCache(path)
    a._loaded(), b._loaded()                        # both read the (empty) file first
    ig.verify_folder(folder, cache=a)
    ig.verify_folder(other, cache=b)
    assert len(json.loads(path.read_text())["entries"]) == 9     # 5 + 4 files, neither lost


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "c"))
    assert ig.cache_path() == tmp_path / "c" / "integrity.json" and ig.default_cache().path == ig.cache_path()
    monkeypatch.delenv("HYPERLORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ig.cache_path() == tmp_path / "xdg" / "hyperlora" / "integrity.json"


def test_hashing_checks_for_an_interrupt(folder, monkeypatch):
    monkeypatch.setattr(ig, "CHUNK", 1024)
    calls = []
    ig.sha256_file(folder / BASIS_FILE, check_interrupt=lambda: calls.append(1))
    assert len(calls) >= (folder / BASIS_FILE).stat().st_size // 1024


def test_marker_file_is_part_of_the_record(folder, cache):
    _record(folder)
    (folder / MARKER_FILE).write_text((folder / MARKER_FILE).read_text().replace("hidden_size", "hidden_size "))
    with pytest.raises(ModelFileError, match=MARKER_FILE):
        ig.verify_folder(folder, cache=cache)
