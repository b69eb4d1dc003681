"""Safe outputs: `save.overwrite` replaces only llmc's own outputs (never a file, a foreign folder or
the input model), a kill at any point of the replace leaves one complete output, stale temporary
folders of killed runs are removed at start, SIGTERM is handled like Ctrl-C, permissions follow
the umask."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

from llmc.cli import main
from llmc.errors import ConfigError
from llmc.save import _HOST, atomic_output_dir, check_output_path, is_llmc_output

SAFE = pytest.mark.reliability("safe output")
RTN_W4 = {"method": "RTN", "weight": {"bit": 4, "granularity": "per_group", "group_size": 32}}
ROOT = Path(__file__).resolve().parents[1]


def llmc_output(folder: Path, run: str) -> Path:
    """A folder as llmc leaves it: a weight file and results.json (written last) with llmc_version."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.bin").write_bytes(run.encode() * 1000)
    (folder / "results.json").write_text(json.dumps({"llmc_version": "0.1.0", "run": run}), encoding="utf-8")
    return folder


def run_of(folder: Path) -> str:
    assert is_llmc_output(folder), sorted(p.name for p in folder.iterdir())
    run = json.loads((folder / "results.json").read_text(encoding="utf-8"))["run"]
    assert (folder / "weights.bin").read_bytes() == run.encode() * 1000  # complete, not a mix
    return run


def work_leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*") if not p.name.endswith(".llmc-resume"))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A stand-in input model folder (the checks only look at paths)."""
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}", encoding="utf-8")
    return model


# ---------------------------------------------------------------- overwrite rules


@SAFE
def test_overwrite_refuses_a_foreign_folder(tmp_path, model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious", encoding="utf-8")
    (out / "sub").mkdir()
    (out / "sub" / "results.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        check_output_path(str(out), True, str(model_dir))
    msg = str(info.value)
    assert str(out) in msg and "not an llmc output" in msg and "choose a new folder" in msg
    assert tree(out) == {"keep.txt": b"precious", "sub/results.json": b"{}"}


@SAFE
@pytest.mark.parametrize("results", ["{}", '{"version": "1"}', "not json", '["llmc_version"]'])
def test_overwrite_refuses_a_folder_whose_results_json_is_not_llmc(tmp_path, results):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(results, encoding="utf-8")
    with pytest.raises(ConfigError, match="not an llmc output"):
        check_output_path(str(out), True)
    assert tree(out) == {"results.json": results.encode()}


@SAFE
@pytest.mark.parametrize("overwrite", [True, False])
def test_overwrite_refuses_a_regular_file(tmp_path, overwrite):
    out = tmp_path / "out"
    out.write_text("data", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        check_output_path(str(out), overwrite)
    assert str(out) in str(info.value) and "is a file" in str(info.value)
    assert "choose another save.save_path" in str(info.value)
    assert out.read_text(encoding="utf-8") == "data"


@SAFE
@pytest.mark.parametrize("where", ["is", "lies inside", "contains"])
def test_overwrite_refuses_the_model_folder(tmp_path, model_dir, where):
    """The model folder itself, a folder inside it, or one of its parents: never replaced, even
    when it looks like an llmc output."""
    out = {"is": model_dir, "lies inside": model_dir / "out", "contains": model_dir.parent}[where]
    llmc_output(out, "old")
    before = tree(tmp_path)
    for spelling in (str(out), str(out) + "/", os.path.relpath(out)):
        with pytest.raises(ConfigError) as info:
            check_output_path(spelling, True, str(model_dir))
        msg = str(info.value)
        assert f"{out} {where} the input model {model_dir}" in msg, msg
        assert "outside the model folder" in msg
    assert tree(tmp_path) == before


@SAFE
def test_model_path_through_a_symlink_is_resolved(tmp_path, model_dir):
    link = tmp_path / "link"
    link.symlink_to(model_dir.parent)
    llmc_output(model_dir, "old")
    with pytest.raises(ConfigError, match="input model"):
        check_output_path(str(model_dir), True, str(link / model_dir.name))


@SAFE
def test_overwrite_accepts_an_earlier_llmc_output(tmp_path, model_dir):
    out = llmc_output(tmp_path / "out", "old")
    assert check_output_path(str(out), True, str(model_dir)) == out
    with pytest.raises(ConfigError, match="already exists; choose a new folder or set save.overwrite: true"):
        check_output_path(str(out), False, str(model_dir))
    with atomic_output_dir(out, True, str(model_dir)) as tmp:
        llmc_output(tmp, "new")
    assert run_of(out) == "new" and work_leftovers(out) == []


@SAFE
def test_cli_refuses_before_loading_the_model(capsys, tmp_path, tiny_llama_dir, monkeypatch):
    """Through `llmc run`: one error line, exit 2, before the model is loaded; nothing deleted."""
    import llmc.runner

    def forbidden(*_a, **_k):
        raise AssertionError("the model was loaded before save_path was checked")

    monkeypatch.setattr(llmc.runner, "load_model", forbidden)
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    before = tree(model)
    cfg = tiny_config(model, quant=RTN_W4, save={"save_fake": True, "save_path": str(model), "overwrite": True})
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    capsys.readouterr()
    code = main(["run", str(config), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [
        f"llmc: error: save.save_path {model} is the input model {model}; llmc never replaces it "
        f"(not even with save.overwrite: true): choose a save.save_path outside the model folder"
    ]
    assert tree(model) == before


# ---------------------------------------------------------------- kill during the replace

STEPS = {  # kill point -> the output at save_path after the next start's recovery
    "writing": "old", "replace:written": "old", "replace:aside": "old", "replace:renamed": "new",
    "replace:done": "new",
}


def _replace_in_child(out: Path, model: Path, step: str) -> int:
    """Run the replace in a forked child that SIGKILLs itself at `step`; returns its wait status."""
    pid = os.fork()
    if pid == 0:  # child: no pytest, no logging, just the replace
        try:
            os.environ["LLMC_TEST_KILL_AT"] = step
            with atomic_output_dir(out, True, str(model)) as tmp:
                (tmp / "weights.bin").write_bytes(b"new" * 1000)
                if step == "writing":
                    os.kill(os.getpid(), signal.SIGKILL)
                (tmp / "results.json").write_text(json.dumps({"llmc_version": "0.1.0", "run": "new"}))
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


@SAFE
@pytest.mark.parametrize("step", list(STEPS))
def test_kill_during_replace_leaves_one_complete_output(tmp_path, model_dir, step, caplog):
    out = llmc_output(tmp_path / "out", "old")
    (tmp_path / "keep.txt").write_text("foreign", encoding="utf-8")
    resume = tmp_path / ".out.llmc-resume"
    resume.mkdir()
    (resume / "block_0.pt").write_bytes(b"ckpt")
    status = _replace_in_child(out, model_dir, step)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    # Right after the kill: save_path is complete, or (only between the two renames) missing with
    # the complete old output set aside.
    if out.exists():
        run_of(out)
    else:
        assert step == "replace:aside"
        olds = list(tmp_path.glob(".out.old-*"))
        assert len(olds) == 1 and run_of(olds[0]) == "old"
    # The next run's start recovers: one complete output, no temporary folder, nothing foreign touched.
    with caplog.at_level(logging.INFO, logger="llmc"):
        assert check_output_path(str(out), True, str(model_dir)) == out
    assert run_of(out) == STEPS[step]
    assert work_leftovers(out) == []
    assert (tmp_path / "keep.txt").read_text(encoding="utf-8") == "foreign"
    assert tree(resume) == {"block_0.pt": b"ckpt"} and tree(model_dir) == {"config.json": b"{}"}
    if step == "replace:aside":
        assert any("restored" in r.getMessage() for r in caplog.records)


@SAFE
def test_kill_before_the_first_output_leaves_nothing(tmp_path, model_dir):
    out = tmp_path / "out"
    status = _replace_in_child(out, model_dir, "replace:written")
    assert os.WIFSIGNALED(status)
    assert not out.exists() and len(work_leftovers(out)) == 1
    check_output_path(str(out), False, str(model_dir))
    assert not out.exists() and work_leftovers(out) == []


@SAFE
def test_sigterm_between_the_renames_is_held_until_the_output_is_complete(tmp_path, monkeypatch):
    """A SIGTERM during the renames waits for the commit; then it interrupts, saying the output is there."""
    import llmc.save
    from llmc.cli import Interrupted, _interrupted, _raise_interrupted

    def sigterm_at(point: str) -> None:
        if point == "replace:aside":
            os.kill(os.getpid(), signal.SIGTERM)  # held back: the handler must not run yet
            assert not out.exists()

    out = llmc_output(tmp_path / "out", "old")
    monkeypatch.setattr(llmc.save, "kill_point", sigterm_at)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        with pytest.raises(Interrupted) as info, atomic_output_dir(out, True) as tmp:
            llmc_output(tmp, "new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert run_of(out) == "new" and work_leftovers(out) == []
    assert info.value.llmc_output == out and _interrupted(info.value) == 143


# ---------------------------------------------------------------- stale temporary folders


@SAFE
def test_stale_temporary_folders_are_named_and_removed(tmp_path, caplog):
    out = llmc_output(tmp_path / "out", "old")
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale = [f".out.tmp-{dead.pid}-{_HOST}-a1b2c3", f".out.old-{dead.pid}-{_HOST}-d4e5"]
        kept = [
            f".out.tmp-{live.pid}-{_HOST}-x9y8",  # a live run's folder
            f".out.tmp-{dead.pid}-0000zzzz-q1",  # another host's: its pid means nothing here
            ".out.llmc-resume",  # resume checkpoints
            ".out.tmp-abcdefgh",  # not llmc's naming
            f".outer.tmp-{dead.pid}-{_HOST}-r2",  # another save_path's
        ]
        for name in stale + kept:
            llmc_output(tmp_path / name, name)
        with caplog.at_level(logging.INFO, logger="llmc"):
            check_output_path(str(out), True)
        lines = [r.getMessage() for r in caplog.records if "temporary folder" in r.getMessage()]
        assert len(lines) == 1 and all(name in lines[0] for name in stale), lines
        assert not any(name in lines[0] for name in kept)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(kept + ["out"]) and run_of(out) == "old"
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------- SIGTERM

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import llmc.runner
    from llmc.cli import main

    real = llmc.runner.save_hf_model

    def save_then_sigterm(*args, **kwargs):
        real(*args, **kwargs)  # the temporary folder holds a model now
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)

    llmc.runner.save_hf_model = save_then_sigterm
    before = signal.getsignal(signal.SIGTERM)
    code = main(["run", sys.argv[1], "-q"])
    assert signal.getsignal(signal.SIGTERM) is before, "main() did not restore the SIGTERM handler"
    sys.exit(code)
""")


def _config(tmp_path: Path, model: Path, evaluate: bool, **save) -> Path:
    cfg = tiny_config(model, quant=RTN_W4, save={"save_path": str(tmp_path / "out"), **save})
    cfg["eval"]["max_windows"] = 2
    if not evaluate:
        del cfg["eval"]
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@SAFE
def test_sigterm_while_saving(tmp_path, tiny_llama_dir):
    config = _config(tmp_path, tiny_llama_dir, False, save_fake=True, save_trans=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(config)], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.splitlines() == ["llmc: interrupted (SIGTERM); no output was written"], proc.stderr
    assert not (tmp_path / "out").exists() and work_leftovers(tmp_path / "out") == []


@SAFE
def test_sigterm_from_outside(tmp_path, tiny_llama_dir):
    """`llmc run` (not quiet) gets SIGTERM from another process once it has started loading."""
    config = _config(tmp_path, tiny_llama_dir, True, save_fake=True)
    proc = subprocess.Popen([sys.executable, "-m", "llmc.cli", "run", str(config)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=_env())
    seen = b""
    while b"llmc: " not in seen:  # a first log line (after the pretrain perplexity): the run is under way
        chunk = proc.stderr.read1(4096)
        assert chunk, seen.decode()
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    err = (seen + proc.stderr.read()).decode()
    assert proc.wait(timeout=120) == 143, err
    assert "Traceback" not in err
    assert err.rstrip("\n").endswith("\nllmc: interrupted (SIGTERM); no output was written"), err
    assert err.count("interrupted") == 1
    assert not (tmp_path / "out").exists() and work_leftovers(tmp_path / "out") == []


# ---------------------------------------------------------------- permissions


@pytest.fixture
def umask():
    def set_umask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


def _modes(folder: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [folder, *folder.rglob("*")]}


@SAFE
def test_output_permissions_follow_umask_022(tmp_path, tiny_llama_dir, umask):
    from llmc import compress

    umask(0o022)
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, eval=None,
                      save={"save_trans": True, "save_fake": True, "save_path": str(tmp_path / "out")})
    compress(cfg, progress=False)
    out = tmp_path / "out"
    assert list(out.glob("fake_quant_model/*.safetensors")) and (out / "transformed_model/tokenizer.json").exists()
    assert _modes(out) == {("dir", 0o755), ("file", 0o644)}


@SAFE
def test_output_permissions_follow_umask_027(tmp_path, umask):
    umask(0o027)
    out = tmp_path / "out"
    with atomic_output_dir(out, False) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"x")
        (tmp / "results.json").write_text('{"llmc_version": "0.1.0"}', encoding="utf-8")
    assert _modes(out) == {("dir", 0o750), ("file", 0o640)}
