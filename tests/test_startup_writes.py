"""What `train` writes at its start fails like a checkpoint that cannot be saved (issue 28, item 2): one
line naming the file and the reason, exit code 4, nothing half-written left behind, and the run then
starts (or resumes) once the disk has room. Real `python -m mlx_coach` processes on a small tmpfs filled
by the test and on a read-only bind mount, both mounted by the test (skipped where mounting is not
permitted). The writes, in order: the run directory's lock, its marker, a builtin base model's copy,
the starting weights, config.yaml."""

import errno
import json
import os
import shutil
import subprocess

import pytest
from test_reliability import SMALL, cli, ends_in_one_line, mount, mounted_tmpfs, steps_logged

PAGE = 4096  # tmpfs charges whole pages


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-step run on a roomy disk: what a start writes, file by file, and a run to resume."""
    run = tmp_path_factory.mktemp("roomy") / "run"
    proc = cli("train", *SMALL, "--output", str(run), "--steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def fill(disk, leave=0):
    """Write a file on `disk` until it is full, then give back `leave` bytes. Unbuffered: a last chunk
    written in part leaves nothing in a buffer for close() to fail on."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def charged(paths):
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in paths if p.is_file())


def room_before(write, reference):
    """Bytes to leave free so that the start-up write `write` meets a full disk half-way: room for every
    write before it (the lock and the marker take a page each) and half of its own."""
    base = charged((reference / "base_model").rglob("*"))
    initial = charged([reference / "initial_trainable.safetensors"])
    return {".lock": 0, "base_model": 2 * PAGE + base // 2, "initial_trainable.safetensors": 2 * PAGE + base + initial // 2}[write]


def nothing_half_written(run, reference):
    """Every file in `run` is the lock, a whole marker, or the same size as the finished run's file at the
    same place; no temporary file or folder is left."""
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run)
        assert not any(part.startswith(".") for part in rel.parts) or rel.name == ".lock", f"{rel} left behind"
        if path.is_dir() or rel.name == ".lock":
            continue
        if rel.name == "run.json":
            assert json.loads(path.read_text())["format"] == 1
        else:
            assert path.stat().st_size == (reference / rel).stat().st_size, f"{rel} is half-written"


@pytest.mark.parametrize("write", [".lock", "base_model", "initial_trainable.safetensors"])
def test_a_full_disk_at_the_start_ends_in_one_line_and_the_run_starts_once_there_is_room(tmp_path, finished_run,
                                                                                          write):
    with mounted_tmpfs(tmp_path / "disk", "32m") as disk:
        run = disk / "run"
        filler = fill(disk, room_before(write, finished_run))
        proc = cli("train", *SMALL, "--output", str(run), "--steps", "1")
        line = ends_in_one_line(proc, proc.stderr, 4, "mlx-coach: write failed:")
        assert f"cannot write {run / write} (No space left on device)" in line
        assert f"the run did not start; once {run} can be written, start again with --output {run}" in line
        nothing_half_written(run, finished_run)
        assert not (run / "config.yaml").exists()  # written last, once the run has started cleanly
        filler.unlink()
        again = cli("train", *SMALL, "--output", str(run), "--steps", "1")
        assert again.returncode == 0, again.stderr[-3000:]
        assert steps_logged(run) == [1]


def test_a_full_disk_at_a_resume_ends_in_one_line_and_leaves_the_run_as_it_was(tmp_path, finished_run):
    with mounted_tmpfs(tmp_path / "disk", "32m") as disk:
        run = disk / "run"
        shutil.copytree(finished_run, run)
        before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
        filler = fill(disk)
        proc = cli("train", "--resume", str(run), "--steps", "2")
        line = ends_in_one_line(proc, proc.stderr, 4, "mlx-coach: write failed:")
        assert "No space left on device" in line and str(run) in line
        assert f"the run did not start; once {run} can be written, continue with --resume {run}" in line
        after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before  # no file changed, none added (no temporary file left)
        filler.unlink()
        again = cli("train", "--resume", str(run), "--steps", "2")
        assert again.returncode == 0, again.stderr[-3000:]
        assert steps_logged(run) == [1, 2]


@pytest.mark.parametrize("resume", [False, True], ids=["start", "resume"])
def test_a_read_only_run_directory_ends_in_one_line(tmp_path, finished_run, resume):
    run = tmp_path / "run"
    if resume:
        shutil.copytree(finished_run, run)
    else:
        run.mkdir()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    mount("--bind", run, run)
    try:
        mount("-o", "remount,bind,ro", run)  # root ignores permissions, not a read-only mount
        args = ["--resume", str(run), "--steps", "2"] if resume else [*SMALL, "--output", str(run), "--steps", "1"]
        proc = cli("train", *args)
    finally:
        subprocess.run(["umount", "-l", str(run)], capture_output=True)
    line = ends_in_one_line(proc, proc.stderr, 4, "mlx-coach: write failed:")
    assert f"cannot write {run / '.lock'} (Read-only file system)" in line
    then = f"continue with --resume {run}" if resume else f"start again with --output {run}"
    assert f"once {run} can be written, {then}" in line
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_config_yaml_on_a_full_disk_is_left_as_it_was(tmp_path, finished_run):
    """config.yaml, the last write of a start, is replaced whole or not at all. A resume whose rows files
    are gone (their rewrite at a resume would meet the full disk first) reaches it on a full disk."""
    with mounted_tmpfs(tmp_path / "disk", "32m") as disk:
        run = disk / "run"
        shutil.copytree(finished_run, run)
        for rows in run.glob("*.jsonl"):
            rows.unlink()
        before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
        filler = fill(disk)
        proc = cli("train", "--resume", str(run), "--steps", "2")
        line = ends_in_one_line(proc, proc.stderr, 4, "mlx-coach: write failed:")
        assert f"cannot write {run / 'config.yaml'} (No space left on device)" in line
        assert f"continue with --resume {run}" in line
        assert {p: (run / p).read_bytes() for p in before} == before  # config.yaml as it was
        assert not [p for p in run.rglob(".*") if p.name != ".lock"]  # no temporary file or folder left
        filler.unlink()
        again = cli("train", "--resume", str(run), "--steps", "2")
        assert again.returncode == 0, again.stderr[-3000:]
