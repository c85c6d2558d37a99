"""The trainer as a new user meets it: a run that says what it did from its first step to its
last line, mistakes answered in one line with exit status 2 (under torchrun too), and no
checkpoint replaced without being asked."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from images import rgb, save
from torchrun import torchrun

from pipeline.errors import UsageError
from trainer.config import Config
from trainer.train import _epoch_use, check_usage
from trainer.train import train as train_here

REPO = Path(__file__).resolve().parent.parent


def train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "trainer/train.py", "--num-workers=0", "--batch-size=4", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def refused(done: subprocess.CompletedProcess, *named: str) -> str:
    """The one error line a refused run prints, with exit status 2; it names all of `named`."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, done.stderr
    for name in named:
        assert name in errors[0], errors[0]
    return errors[0]


def test_a_short_run_reports_its_first_step_and_ends_with_what_it_wrote(prepared, tmp_path):
    out = tmp_path / "run"
    done = train(f"--data={prepared}", f"--out-dir={out}", "--max-steps=2", "--log-every=100")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("epoch 0 step 1 loss") for line in lines), done.stdout
    summary = lines[-1]
    assert summary.startswith("done: 2 optimizer steps (8 images on 1 rank)"), summary
    assert str(out / "checkpoint.pt") in summary and (out / "checkpoint.pt").exists()


def test_the_epoch_use_warning_says_which_batch_size_would_not_leave_images_out():
    assert _epoch_use(31, 7, 4, 2) == (
        "an epoch at batch size 4 x world size 2 uses 24 of 31 images: every rank needs whole "
        "batches: --batch-size 3 would use 30"
    )
    assert _epoch_use(12, 0, 2, 2) is None and _epoch_use(100, 4, 32, 3) is None  # 4% out
    with pytest.raises(UsageError, match="--batch-size 64 x world size 1 needs at least 64"):
        _epoch_use(31, 31, 64, 1)


@pytest.mark.slow
def test_an_epoch_that_leaves_images_out_is_warned_about_before_step_one(prepared, tmp_path):
    # 31 images, 2 ranks of 4: an epoch uses 24; batches of 3 would use 30
    done = torchrun(
        2,
        "trainer/train.py",
        f"--data={prepared}",
        f"--out-dir={tmp_path / 'o'}",
        "--num-workers=0",
        "--batch-size=4",
        "--max-steps=1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: an epoch at batch size 4 x world size 2 uses 24 of 31 images: every rank "
        "needs whole batches: --batch-size 3 would use 30"
    ], done.stderr[-3000:]
    assert done.stdout.index("epoch 0 step 1") < done.stdout.index("done:")


def test_each_kind_of_wrong_data_gets_its_own_answer(prepared, tmp_path):
    images = tmp_path / "photos"
    save(rgb(64, 48, 0), images / "cat.jpg")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(prepared, unfinished)
    (unfinished / "manifest.json").unlink()
    answers = {
        tmp_path / "nowhere": ("no such folder", "jobs/prepare.py"),
        unfinished: ("did not finish", "rerun"),
    }
    for data, named in answers.items():
        with pytest.raises(UsageError) as refusal:
            check_usage(Config(data=(str(data),), out_dir=str(tmp_path / "out")))
        assert all(name in str(refusal.value) for name in (str(data), *named)), refusal.value
    # the command line: one line, exit status 2, nothing written
    refused(
        train(f"--data={images}", f"--out-dir={tmp_path / 'out'}"),
        str(images),
        "holds images",
        f"jobs/prepare.py --input {images} --output OUT",
    )
    assert not (tmp_path / "out").exists()


def test_a_missing_or_broken_config_file_is_named(tmp_path):
    refused(train("--config", str(tmp_path / "run.toml")), "run.toml", "no such file")
    (tmp_path / "bad.toml").write_text("batch_size = = 3\n")
    refused(train("--config", str(tmp_path / "bad.toml")), "bad.toml", "not valid TOML")


def test_an_out_dir_with_a_checkpoint_is_continued_or_overwritten_never_replaced(
    prepared, tmp_path
):
    config = Config(
        data=(str(prepared),), out_dir=str(tmp_path / "run"), num_workers=0, max_steps=1
    )
    train_here(config)
    written = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(UsageError, match=r"holds the checkpoint .* --resume .* --overwrite"):
        train_here(config)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == written
    other = dataclasses.replace(config, resume=True, channels=16)
    with pytest.raises(UsageError) as refusal:
        train_here(other)
    message = str(refusal.value)
    assert "another model configuration" in message and "--channels 32 (this run: 16)" in message
    assert f"--config {tmp_path / 'run' / 'config.toml'} --resume" in message
    assert "--resume" not in message.split("which ran with")[1].split(":")[0], "not a setting"
    train_here(dataclasses.replace(config, overwrite=True))


@pytest.mark.slow
def test_a_checkpoint_is_never_replaced_without_being_asked(prepared, tmp_path):
    out = tmp_path / "run"
    first = train(f"--data={prepared}", f"--out-dir={out}", "--epochs=2")
    assert first.returncode == 0, first.stderr
    checkpoint = (out / "checkpoint.pt").read_bytes()

    again = train(f"--data={prepared}", f"--out-dir={out}", "--epochs=1")
    refused(again, str(out), "--resume", "--overwrite", str(out / "config.toml"))
    finished = train(f"--data={prepared}", f"--out-dir={out}", "--epochs=2", "--resume")
    assert finished.returncode == 0, finished.stderr
    assert "nothing left to train" in finished.stdout and "epoch 2 of --epochs 2" in finished.stdout
    assert (out / "checkpoint.pt").read_bytes() == checkpoint, "neither run touched it"

    over = train(f"--data={prepared}", f"--out-dir={out}", "--epochs=1", "--overwrite")
    assert over.returncode == 0, over.stderr
    assert (out / "checkpoint.pt").read_bytes() != checkpoint
    refused(
        train(f"--data={prepared}", f"--out-dir={tmp_path / 'new'}", "--resume"),
        "--resume",
        "does not exist",
    )


@pytest.mark.slow
def test_resuming_with_other_settings_names_them_and_the_way_out(prepared, tmp_path):
    out = tmp_path / "run"
    assert train(f"--data={prepared}", f"--out-dir={out}", "--max-steps=1").returncode == 0
    line = refused(
        train(f"--data={prepared}", f"--out-dir={out}", "--resume", "--channels=16"),
        "another model configuration",
        "--channels 32 (this run: 16)",
        f"--config {out / 'config.toml'} --resume",
    )
    assert "--resume True" not in line, "how a run is run is not a difference"
    resumed = train("--config", str(out / "config.toml"), "--resume")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
def test_under_torchrun_a_mistake_is_said_once_by_rank_zero(tmp_path):
    done = torchrun(2, "trainer/train.py", f"--data={tmp_path / 'nowhere'}", "--num-workers=0")
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if "no such folder" in line]
    assert len(said) == 1 and said[0].startswith("train.py: error: --data"), done.stderr
    assert "exitcode  : 2" in done.stderr, "every rank exits with status 2"


@pytest.mark.slow
def test_arb_train_launches_ranks_and_answers_a_mistake_before_any_starts(prepared, tmp_path):
    command = shutil.which("arb-train")
    assert command, "pip install -e . puts arb-train on the PATH"
    environment = os.environ | {"PYTHONUNBUFFERED": "1"}
    run = [command, "--nproc-per-node=2", "--num-workers=0", "--batch-size=4"]
    wrong = subprocess.run(
        [*run, f"--data={tmp_path / 'nowhere'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    refused(wrong, "no such folder")
    done = subprocess.run(
        [*run, f"--data={prepared}", f"--out-dir={tmp_path / 'o'}", "--max-steps=1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 ranks" in done.stdout and (tmp_path / "o" / "checkpoint.pt").exists()
