"""What a real cluster asks of a job, on this machine: config files, precision choices, live
progress in a batch log, TensorBoard curves read back by TensorBoard, a stop in the middle of
an epoch resumed bit for bit, and workers restarted by torchrun continuing the same run.

    .venv/bin/python -m pytest -q tests/test_cluster.py
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from dd_mpi.checkpoint import checkpoint_path, load
from dd_mpi.config import RunConfig, config_yaml, parse_config
from dd_mpi.errors import UsageError
from dd_mpi.launch import detect_launch
from dd_mpi.rendezvous import pick_device, pick_precision

from helpers import BIN, TINY, explain, launcher_free_env, python_path, read_metrics, read_report, run_dd


# --- config files: defaults < preset < file < flags ---------------------------------------
def test_a_config_file_sits_between_the_preset_and_the_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: cifar10-resnet56\nsubnet-epochs: 7\nlr: 0.05\ntensorboard: true\nlevels: null\n"
                    "weight-decay: 5e-4\n")  # YAML 1.1 reads 5e-4 (no dot) as text: still a number
    cfg = parse_config(["--config", str(path), "--lr", "0.2"])
    assert cfg.weight_decay == 5e-4
    assert (cfg.arch, cfg.shortcut, cfg.subnet_data) == ("resnet56", "B", "shard")  # from the preset
    assert cfg.subnet_epochs == 7 and cfg.tensorboard is True  # the file beats the preset
    assert cfg.lr == 0.2  # the flags beat the file


def test_print_config_round_trips_through_config(tmp_path):
    cfg = parse_config(["--preset", "food101-resnet50-n8", "--seed", "3", "--levels", "8,2,1", "--no-nesterov"])
    path = tmp_path / "effective.yaml"
    path.write_text(config_yaml(cfg))
    again = parse_config(["--config", str(path)])
    assert again.config == str(path)
    assert RunConfig(**{**again.to_dict(), "config": None}) == cfg  # nothing lost on the way


def test_a_run_s_config_json_reads_back_as_its_settings(tmp_path):
    """config.json holds every RunConfig key, "config" and "print_config" too: it was refused
    as a config file ("unknown key 'config'"). Its job's own keys are left out: an array task's
    --only-group, and --out with --resume, would have continued that run, not started one."""
    first = tmp_path / "first.yaml"
    first.write_text("seed: 3\n")
    cfg = parse_config(["--preset", "cifar10-resnet56", "--config", str(first), "--out", "run", "--resume",
                        "--only-group", "1", "--nproc", "2"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict(), indent=2))
    again = parse_config(["--config", str(path)])
    assert again == RunConfig(**{**cfg.to_dict(), "config": str(path), "out": None, "resume": False,
                                 "only_group": None, "nproc": None})
    path.write_text("print-config: true\n")  # a file of the user's: no setting a file gives
    with pytest.raises(UsageError, match="unknown key 'print-config'"):
        parse_config(["--config", str(path)])


def test_print_config_prints_the_effective_yaml_and_exits(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dd_mpi", "--preset", "cifar10-resnet32", "--subnet-epochs", "9",
                             "--print-config", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=launcher_free_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "subnet_epochs: 9\n" in result.stdout and "shortcut: B\n" in result.stdout
    assert "arch: resnet32\n" in result.stdout and not (tmp_path / "run").exists()
    # the preset's global batch wins over batch_size (an edit of batch_size alone did nothing): said where it is
    assert "# global_batch_size wins over batch_size: make it null to give a batch per rank\nglobal_batch_size: 128\n" \
        in result.stdout


@pytest.mark.parametrize("text, needle", [
    ("widht: 2\n", "unknown key 'widht'"),
    ("subnets: four\n", "subnets: 'four' is not an integer"),
    ("resume: 1\n", "resume: '1' is not true or false"),
    ("tensorboard: yes\n", "tensorboard: 'yes' is not true or false"),  # YAML 1.1's true: say true
    ("lr: [0.1]\n", "lr: ['0.1'] is not a number"),
    ("lr: fast\n", "lr: 'fast' is not a number"),
    ("- a\n- b\n", "must hold a mapping"),
    ("lr: 0.1\n  x: : y\n", "is not valid YAML"),
    ("subnets: 010\n", "subnets: '010' has a leading zero (an octal number in YAML 1.1)"),  # was 8
    ("batch-size: 8\nbatch_size: 16\n", "the key batch_size is given twice (line 2)"),  # the last one won
    ("lr: 0.1\nseed: 1\nlr: 0.2\n", "the key lr is given twice (line 3)"),
    ("subnet-lr: -1\n", "--subnet-lr -1.0 is invalid: use a positive learning rate (given as subnet_lr in --config"),
])
def test_a_bad_config_file_is_one_line_naming_key_and_file(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as error:
        parse_config(["--config", str(path)])
    message = str(error.value)
    assert needle in message and "\n" not in message and str(path) in message
    assert "(given as" not in str(pytest.raises(UsageError, parse_config, ["--subnet-lr", "-1"]).value)  # a flag's


def test_a_config_file_s_text_is_read_as_written(tmp_path):
    """PyYAML reads YAML 1.1, where 0755 is 493 (octal), 12:30 is 750 (base 60) and 2024-06-01 a
    date: a folder named so became another, or was refused. Numbers are read as the key's type."""
    path = tmp_path / "run.yaml"
    path.write_text("out: 0755\ndata-dir: 12:30\ncache_dir: 2024-06-01\ndataset: food101\n"
                    "seed: +3\nwidth: 2\nweight_decay: 5e-4\ntensorboard: True\nlevels: null\n")
    cfg = parse_config(["--config", str(path)])
    assert (cfg.out, cfg.data_dir, cfg.cache_dir) == ("0755", "12:30", "2024-06-01")
    assert (cfg.seed, cfg.width, cfg.weight_decay, cfg.tensorboard, cfg.levels) == (3, 2.0, 5e-4, True, None)
    # YAML's own typing still reads: tagged values, and a merge key (whose keys are given again on purpose)
    path.write_text("subnets: !!int 4\nwidth: !!float 1\n<<: {lr: 0.05, seed: 4}\nseed: 5\n")
    cfg = parse_config(["--config", str(path)])
    assert (cfg.subnets, cfg.width, cfg.lr, cfg.seed) == (4, 1.0, 0.05, 5)


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("lr: 0.1  # réglé\n".encode("latin-1"))
    with pytest.raises(UsageError, match=f"--config {path} is not UTF-8 text: save it as UTF-8"):
        parse_config(["--config", str(path)])


def test_tensorboard_without_its_package_is_refused_at_start(monkeypatch):
    """Not after the first epoch (hours into a cluster job), when the leaders would first
    import it."""
    assert parse_config(["--tensorboard"]).tensorboard  # installed here (the test extra)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not
    with pytest.raises(UsageError, match=r"--tensorboard needs the tensorboard package: pip install"):
        parse_config(["--tensorboard"])


# --- precision ------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_gpu_for_device_cuda_is_said_by_every_rank_that_sees_none():
    """GPUs are a node's: a rank on a GPU-less node must print it, not leave it to rank 0."""
    with pytest.raises(UsageError) as error:
        pick_device("cuda", detect_launch({}))
    assert "--device cuda" in str(error.value) and not error.value.everywhere


def test_fp16_without_a_gpu_is_said_by_each_rank_only_where_the_device_was_the_nodes_choice():
    with pytest.raises(UsageError) as error:
        pick_precision("fp16", torch.device("cpu"), "auto")  # other nodes may have a GPU
    assert not error.value.everywhere
    with pytest.raises(UsageError) as error:
        pick_precision("fp16", torch.device("cpu"), "cpu")  # every rank alike: rank 0 says it
    assert error.value.everywhere


@pytest.mark.slow
def test_fp16_on_the_cpu_is_refused_in_one_line(tmp_path):
    result = run_dd([*TINY, "--precision", "fp16", "--out", str(tmp_path / "run")], nproc=2, timeout=120)
    assert result.returncode == 2, explain(result)
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "--precision fp16 needs a GPU" in lines[0], explain(result)
    assert not (tmp_path / "run").exists()


# --- monitoring -------------------------------------------------------------------------------
@pytest.mark.slow
def test_progress_lines_and_tensorboard_curves_as_the_run_goes(tmp_path):
    """Without a terminal, a line every --log-every seconds from rank 0 and each group's
    leader; TensorBoard event files per phase and net, read back by TensorBoard's reader."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    result = run_dd([*TINY, "--subnets", "2", "--strategy", "both", "--subnet-epochs", "2", "--train-samples", "512",
                     "--batch-size", "8", "--log-every", "0.2", "--tensorboard", "--out", str(out)], nproc=4, timeout=600)
    assert result.returncode == 0, explain(result)
    lines = re.findall(r"^\[(subnet\d|finetune|baseline)\] epoch (\d)/(\d) step (\d+)/(\d+) (\d+) img/s loss "
                       r"([\d.]+) ETA (\d+m\d\ds)$", result.stdout, re.M)
    assert {name for name, *_ in lines} == {"subnet0", "subnet1", "finetune", "baseline"}, result.stdout[-3000:]
    for name, epoch, epochs, step, steps, *_ in lines:
        assert 1 <= int(epoch) <= int(epochs) and 1 <= int(step) <= int(steps)
    rows = read_metrics(out)
    for phase, net, count in (("subnet", "subnet0", 2), ("subnet", "subnet1", 2), ("finetune", "finetune", 1),
                              ("baseline", "baseline", 1)):
        events = event_accumulator.EventAccumulator(str(out / "tensorboard" / phase / net))
        events.Reload()
        assert {"train/loss", "test/top1", "lr", "images_per_s"} <= set(events.Tags()["scalars"])
        losses = events.Scalars("train/loss")
        assert [e.step for e in losses] == list(range(1, count + 1))
        group = None if phase in ("finetune", "baseline") else int(net[-1])
        mine = [r for r in rows if r["phase"] == phase and r["group"] == group]
        assert [e.value for e in losses] == pytest.approx([r["loss"] for r in mine], rel=1e-6)


@pytest.mark.slow
def test_tensorboard_at_a_resume_draws_every_epoch_once(tmp_path):
    """--tensorboard given only at --resume draws the epochs trained before it, finished phases
    too; a phase resumed after a kill between its last checkpoint and its final one (so after
    its curve was drawn) draws each epoch once, not twice."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    args = [*TINY, "--subnets", "2", "--subnet-epochs", "2", "--finetune-epochs", "2", "--strategy", "dd",
            "--train-samples", "128", "--test-samples", "64", "--out", str(out)]
    assert run_dd(args, nproc=2).returncode == 0
    assert not (out / "tensorboard").exists()
    rows = read_metrics(out)

    def curves():
        drawn = {}
        for phase, net in (("subnet", "subnet0"), ("subnet", "subnet1"), ("finetune", "finetune")):
            events = event_accumulator.EventAccumulator(str(out / "tensorboard" / phase / net))
            events.Reload()
            drawn[net] = [(e.step, e.value) for e in events.Scalars("train/loss")]
        return drawn

    expected = {net: [(r["epoch"], pytest.approx(r["loss"], rel=1e-6)) for r in rows
                      if r["phase"] == phase and r["group"] == group]
                for phase, net, group in (("subnet", "subnet0", 0), ("subnet", "subnet1", 1),
                                          ("finetune", "finetune", None))}
    assert all(len(points) == 2 for points in expected.values())
    result = run_dd([*args, "--resume", "--tensorboard"], nproc=2)
    assert result.returncode == 0, explain(result)
    assert curves() == expected
    checkpoint_path(out, "finetune", "final").unlink()  # as if killed before writing it
    result = run_dd([*args, "--resume", "--tensorboard"], nproc=2)
    assert result.returncode == 0, explain(result)
    assert re.search(r"^finetune: resuming after epoch 2$", result.stdout, re.M), explain(result)
    assert curves() == expected


# --- stops and restarts -----------------------------------------------------------------------
RESUME_RUN = [*TINY, "--subnets", "2", "--subnet-epochs", "2", "--finetune-epochs", "2", "--baseline-epochs", "0",
              "--train-samples", "512", "--test-samples", "64", "--strategy", "dd", "--deterministic"]


def finals_equal(a, b, names) -> None:
    for name in names:
        x, y = load(checkpoint_path(a, name, "final"))["model"], load(checkpoint_path(b, name, "final"))["model"]
        assert all(torch.equal(x[k], y[k]) for k in x), f"{name} differs"


@pytest.mark.slow
@pytest.mark.timing
def test_a_stop_in_the_middle_of_an_epoch_resumes_at_that_step_bit_for_bit(tmp_path):
    reference = tmp_path / "reference"
    assert run_dd([*RESUME_RUN, "--out", str(reference)], nproc=4, timeout=600).returncode == 0
    out = tmp_path / "run"
    with open(tmp_path / "stop.log", "w") as log:
        job = subprocess.Popen([sys.executable, "-m", "dd_mpi", "--nproc", "4", *RESUME_RUN, "--signal-check-steps",
                                "1", "--out", str(out)], stdout=log, stderr=subprocess.STDOUT, env=launcher_free_env())
    try:
        deadline = time.monotonic() + 300
        while not checkpoint_path(out, "composed", "").exists():  # stop as the fine-tune begins
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "stop.log").read_text()
            time.sleep(0.02)
        job.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=300) == 75, (tmp_path / "stop.log").read_text()
    finally:
        if job.poll() is None:
            job.kill()
    stopped = load(checkpoint_path(out, "finetune", "last"))
    assert stopped["epoch"] == 0 and stopped["progress"]["step"] >= 1  # inside its first epoch
    assert len(stopped["rank_buffers"]) == 4  # each rank's own BN statistics
    result = run_dd([*RESUME_RUN, "--resume", "--out", str(out)], nproc=4, timeout=600)
    assert result.returncode == 0, explain(result)
    assert re.search(r"^finetune: resuming after epoch 0, at step \d+ of epoch 1$", result.stdout, re.M)
    finals_equal(reference, out, ["subnet0", "subnet1", "finetune"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "elapsed", "images_per_s")}  # noqa: E731
                          for r in rows]
    assert strip(read_metrics(out)) == strip(read_metrics(reference))  # the cut epoch reports the same sums


KILL_ONCE = """\
import os, signal
import dd_mpi.train as train
original = train.train_epoch
calls = []

def dies_once(*args, **kwargs):  # worker 1, its second epoch of phase 1, first attempt only
    calls.append(1)
    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)

train.train_epoch = dies_once
"""


@pytest.mark.slow
@pytest.mark.timing
def test_torchrun_max_restarts_continues_the_same_run(tmp_path):
    """A worker killed under `torchrun --max-restarts 1`: torchrun restarts the whole worker
    group, and the restarted workers resume the run in --out instead of starting anew."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILL_ONCE)
    out = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m", "dd_mpi",
           *TINY, "--subnets", "2", "--subnet-epochs", "3", "--strategy", "both", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env=launcher_free_env(PYTHONPATH=python_path(tmp_path / "site")))
    assert result.returncode == 0, explain(result)
    assert re.search(r"subnet1: resuming after epoch 1$", result.stdout, re.M), explain(result)
    report = read_report(out)
    assert report["transfer_T"]["top1"] >= 0 and report["random_T"]["top1"] >= 0
    rows = read_metrics(out)
    for group in (0, 1):  # every epoch once, none lost to the restart
        assert [r["epoch"] for r in rows if r["phase"] == "subnet" and r["group"] == group] == [1, 2, 3]
