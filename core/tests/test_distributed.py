"""Multi-process training with the gloo backend: DDP and FSDP2 against a single process."""

import os
import subprocess
import sys

import pytest
import torch

from selfflow.core.metrics import read_metrics

from .test_trainer import TINY

pytestmark = pytest.mark.distributed


def train_process(tmp_path, name, nproc, *extra, env=None, timeout=600) -> subprocess.CompletedProcess:
    """``selfflow train`` on the tiny model, plain or under torchrun with ``nproc`` gloo ranks."""
    sets = [a for s in [*TINY, f"output_dir={tmp_path}", f"name={name}", "sample.every=0",
                        "train.num_threads=1", *extra] for a in ("--set", s)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "selfflow.core.cli", "train", "--no-progress", *sets]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "selfflow.core.cli", "train", "--no-progress", *sets]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def run_train(tmp_path, name, nproc, *extra, env=None, check=True):
    proc = train_process(tmp_path, name, nproc, *extra, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_metrics(tmp_path / name / "metrics.jsonl")


def assert_same_losses(a, b, tol=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_fm", "loss_rep", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=tol, abs=tol), (ra["step"], key, ra[key], rb[key])


def test_ddp_and_fsdp2_match_one_rank(tmp_path):
    """Same global batch of 4: 1 rank × 4 vs 2 ranks × 2, 20 steps, fp32; the online evaluation at the end
    (5 samples: shares of 3 on 2 ranks, one padded) scores as one process does."""
    evaluation = ("eval.every=20", "eval.num_samples=5")
    one = run_train(tmp_path, "one", 1, "train.steps=20", "train.batch_size=4", *evaluation)
    ddp = run_train(tmp_path, "ddp", 2, "train.steps=20", "train.batch_size=2", "train.parallel=ddp", *evaluation)
    fsdp = run_train(tmp_path, "fsdp", 2, "train.steps=20", "train.batch_size=2", "train.parallel=fsdp2",
                     *evaluation)
    scores = [[r for r in records if "probe_fd" in r] for records in (one, ddp, fsdp)]
    assert [len(s) for s in scores] == [1, 1, 1]
    for other in scores[1:]:
        assert other[0]["probe_acc"] == scores[0][0]["probe_acc"]
        assert other[0]["probe_fd"] == pytest.approx(scores[0][0]["probe_fd"], rel=1e-4)
    one, ddp, fsdp = ([r for r in records if "loss" in r] for records in (one, ddp, fsdp))
    assert len(one) == 20
    for name in ("ddp", "fsdp"):
        state = torch.load(tmp_path / name / "checkpoints/step_00000020.pt", weights_only=True)
        assert state["trainer"]["world_size"] == 2
    assert_same_losses(one, ddp)
    assert_same_losses(one, fsdp)


def test_compiled_checkpointed_blocks_under_fsdp2_match_one_eager_rank(tmp_path):
    """What a paper-scale GPU run combines and one GPU cannot show: blocks compiled (student and EMA teacher), then
    sharded by FSDP2 over 2 ranks, recomputed in backward (activation checkpointing) — the same losses and gradient
    norms as one plain eager process with the same global batch (compile's fusions round differently: ~3e-7)."""
    one = run_train(tmp_path, "one", 1, "train.steps=4", "train.batch_size=4")
    fsdp = run_train(tmp_path, "fsdp", 2, "train.steps=4", "train.batch_size=2", "train.parallel=fsdp2",
                     "train.compile=true", "train.activation_checkpointing=true")
    one, fsdp = ([r for r in records if "loss" in r] for records in (one, fsdp))
    assert len(one) == 4
    assert_same_losses(one, fsdp, tol=1e-5)


def test_two_rank_resume_matches_uninterrupted(tmp_path):
    full = run_train(tmp_path, "full", 2, "train.steps=6", "train.batch_size=2", "train.parallel=fsdp2")
    run_train(tmp_path, "split", 2, "train.steps=3", "train.batch_size=2", "train.parallel=fsdp2")
    # resume the FSDP2 checkpoint under DDP: checkpoints hold full state dicts, any strategy loads them
    split = run_train(tmp_path, "split", 2, "train.steps=6", "train.batch_size=2", "train.parallel=ddp")
    assert_same_losses(full, split, tol=1e-6)


def test_fsdp2_in_bf16_resumes_and_matches_ddp(tmp_path):
    """The paper's recipe on 2 gloo ranks: FSDP2 with bf16 parameters and fp32 gradient reduction (its
    MixedPrecisionPolicy; the EMA teacher sharded the same way), 6 steps, against 3 FSDP2 steps resumed under
    DDP with bf16 autocast: the first 3 losses identical, the last 3 within 1e-5 (resumed in fp32: ~2e-4 off)."""
    bf16 = ("train.batch_size=2", "train.precision=bf16")
    full = run_train(tmp_path, "full", 2, "train.steps=6", *bf16, "train.parallel=fsdp2")
    run_train(tmp_path, "split", 2, "train.steps=3", *bf16, "train.parallel=fsdp2")
    split = run_train(tmp_path, "split", 2, "train.steps=6", *bf16, "train.parallel=ddp")
    assert len(full) == 6
    assert_same_losses(full[:3], split[:3], tol=1e-6)
    assert_same_losses(full[3:], split[3:], tol=1e-5)


@pytest.mark.timeout(300)
def test_fsdp2_a_rank_failing_inside_the_sharded_gather_stops_the_run(tmp_path):
    """Under FSDP2 gathering a checkpoint's state is a collective: a rank failing inside it stops with the
    message (instead of joining the save's agreement, which would pair with the others' all-gather: gloo
    aborts, NCCL hangs), torchrun stops the others, the previous checkpoint is intact and a rerun resumes."""
    from selfflow.core.checkpoint import list_checkpoints

    sets = ("train.steps=6", "train.batch_size=2", "train.parallel=fsdp2", "checkpoint.every=2")
    proc = train_process(tmp_path, "run", 2, *sets, env={"SELFFLOW_FAULT_SAVE_ERROR": "4@1"}, timeout=240)
    text = proc.stdout + proc.stderr
    path = tmp_path / "run" / "checkpoints" / "step_00000004.pt"
    assert proc.returncode != 0
    assert (f"selfflow: stopped: cannot write checkpoint {path}: rank 1 failed gathering the sharded state: "
            "ValueError: injected fault (SELFFLOW_FAULT_SAVE_ERROR=4@1)") in text, text[-3000:]
    assert "terminate called" not in text  # no gloo abort from mismatched collectives
    assert [s for s, _ in list_checkpoints(path.parent)] == [2]
    resumed = run_train(tmp_path, "run", 2, *sets)
    assert [r["step"] for r in resumed if "loss" in r][-1] == 6 and [s for s, _ in list_checkpoints(path.parent)][-1] == 6


def test_an_error_on_rank_0_alone_under_fsdp2_ends_the_job_with_its_message(tmp_path):
    """Rank 0 writes data_facts.json alone; its failure used to leave it in the teardown barrier while rank 1
    waited in FSDP2's all-gather: no message, both silent until the group's 30-minute timeout."""
    (tmp_path / "df" / "data_facts.json").mkdir(parents=True)  # a folder where the file goes
    proc = train_process(tmp_path, "df", 2, "train.steps=4", "train.batch_size=2", "train.parallel=fsdp2",
                         timeout=240)
    assert proc.returncode != 0
    assert "selfflow: error: Is a directory" in proc.stderr and "data_facts.json" in proc.stderr, proc.stderr[-3000:]


def test_a_stop_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGUSR1 reaches rank 1 after step 3; the flag (and the signal's number) ride in step 4's loss reduction,
    so both ranks stop after step 4 with one checkpoint (each exits 128 + 10, rank 0 naming the signal), and the
    rerun reproduces the uninterrupted losses."""
    from selfflow.core.checkpoint import list_checkpoints

    sets = ("train.steps=6", "train.batch_size=2", "train.parallel=fsdp2", "checkpoint.every=5")
    full = run_train(tmp_path, "full", 2, *sets)
    proc = train_process(tmp_path, "cut", 2, *sets, env={"SELFFLOW_FAULT_SIGNAL_AT": "3@1:SIGUSR1"}, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and text.count("exitcode  : 138") == 2, text[-3000:]
    assert "selfflow: stopped: SIGUSR1 (on another rank) at step 4 of 6: wrote" in text, text[-3000:]
    assert [s for s, _ in list_checkpoints(tmp_path / "cut" / "checkpoints")] == [4]
    assert_same_losses(full, run_train(tmp_path, "cut", 2, *sets), tol=1e-6)


def test_a_stop_signal_during_an_evaluation_defers_it_on_every_rank(tmp_path):
    """SIGUSR1 reaches rank 1 after step 3, whose evaluation is due: before each batch of samples the ranks agree
    whether to go on (a signal may arrive during a long evaluation), so both leave it at once and stop at step 3
    with a checkpoint that says the evaluation is pending; the resumed run scores step 3 first, then trains on."""
    from selfflow.core.checkpoint import list_checkpoints

    sets = ("train.steps=6", "train.batch_size=2", "train.parallel=ddp", "checkpoint.every=5", "eval.every=3",
            "eval.num_samples=2")
    proc = train_process(tmp_path, "cut", 2, *sets, env={"SELFFLOW_FAULT_SIGNAL_AT": "3@1:SIGUSR1"}, timeout=240)
    text = proc.stdout + proc.stderr
    assert "selfflow: stopped: SIGUSR1 (on another rank) at step 3 of 6: wrote" in text, text[-3000:]
    assert "selfflow: a stop came before the evaluation of step 3 ended: the resumed run does it first" in text
    ckpts = tmp_path / "cut" / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [3]
    assert torch.load(ckpts / "step_00000003.pt", weights_only=True)["trainer"]["eval_pending"] is True
    assert not [r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "probe_fd" in r]
    again = train_process(tmp_path, "cut", 2, *sets, timeout=240)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-3000:]
    assert "online evaluation every 3 steps: image: shapes_probe; 2 samples, 1 per rank, in batches of 64" in text
    assert "(step 3; its evaluation first, left pending by a stop)" in text
    resumed = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in resumed if "probe_fd" in r] == [3, 6]
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(300)
def test_killing_the_torchrun_agent_stops_its_workers_cleanly(tmp_path):
    """torchrun starts its workers in sessions of their own: a kill -9 of the agent used to leave them
    training. Each worker asks for SIGTERM on its parent's death, so they stop with a checkpoint."""
    import signal
    import time

    from selfflow.core.checkpoint import list_checkpoints

    sets = [a for s in [*TINY, f"output_dir={tmp_path}", "name=orphan", "sample.every=0", "train.num_threads=1",
                        "train.steps=100000", "train.batch_size=2", "checkpoint.every=100000"] for a in ("--set", s)]
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "selfflow.core.cli", "train", "--no-progress", *sets],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    metrics, deadline = tmp_path / "orphan" / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(read_metrics(metrics)) >= 3):
        assert agent.poll() is None, "torchrun ended early"
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    try:
        log = tmp_path / "orphan" / "train.log"
        while time.time() < deadline and "stopped: SIGTERM" not in log.read_text():
            time.sleep(0.2)
        steps = [s for s, _ in list_checkpoints(tmp_path / "orphan" / "checkpoints")]
        assert len(steps) == 1 and steps[0] >= 3, log.read_text()[-2000:]
        time.sleep(2)  # no worker trains on
        assert read_metrics(metrics)[-1]["step"] == steps[0]
    finally:  # a failure here must not leave the workers training
        subprocess.run(["kill", "-9", *workers], capture_output=True)
