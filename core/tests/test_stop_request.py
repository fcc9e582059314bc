"""Clean stops on a signal: the handler records the first signal and restores what was there; training
finishes its step, writes a checkpoint and raises; the resumed run reproduces the uninterrupted losses; a
process that asked for it gets SIGTERM when its parent dies; data workers leave the signals to the trainer."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from selfflow.core.checkpoint import list_checkpoints
from selfflow.core.data.shard_format import shard_urls
from selfflow.core.data.shard_stream import ShardStream
from selfflow.core.data.shard_writer import write_shards
from selfflow.core.faults import RunInterrupted
from selfflow.core.metrics import read_metrics
from selfflow.core.stop_request import STOP_SIGNALS, StopRequest, stop_with_parent
from selfflow.core.trainer import Trainer

from .test_distributed import assert_same_losses, train_process
from .test_trainer import _cfg


@pytest.fixture(autouse=True)
def _live_sigint():
    """Ctrl-C as a terminal delivers it. A test run started as a background job of a non-interactive shell
    inherits SIGINT ignored, and our handler rightly leaves an ignored SIGINT alone (tested below): these tests'
    own SIGINTs, and their training subprocesses' (Python's handler becomes the default at exec), would then
    vanish and the Ctrl-C tests fail though the code is right."""
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_the_first_signal_is_recorded_and_the_handlers_restored():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    with stop.installed():
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning ahead of its time limit
        os.kill(os.getpid(), signal.SIGTERM)  # a later one changes nothing
        assert stop.signal == signal.SIGUSR1
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_handler_installed_in_c_comes_back(tmp_path):
    """``faulthandler.register`` installs its handler in C, where Python sees only the default: after fit, a
    SIGUSR1 must dump the stacks as before, not kill the process (the default action)."""
    script = textwrap.dedent(f"""
        import faulthandler, os, signal, time
        from selfflow.core.stop_request import StopRequest
        dump = open({str(tmp_path / "stacks.txt")!r}, "w")
        faulthandler.register(signal.SIGUSR1, file=dump)
        stop = StopRequest()
        with stop.installed():
            os.kill(os.getpid(), signal.SIGUSR1)  # during fit: a stop request
            time.sleep(0.1)
        assert stop.signal == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGUSR1)  # after fit: faulthandler's again
        time.sleep(0.1)
        print("alive")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "alive", done.stderr
    assert "most recent call first" in (tmp_path / "stacks.txt").read_text()


def test_a_second_ctrl_c_stops_at_once():
    stop = StopRequest()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs in this thread, at the next bytecode


def test_an_inherited_ignored_sigint_stays_ignored_and_a_new_fit_starts_unasked():
    """A background job of a non-interactive shell starts with SIGINT ignored: the shell's Ctrl-C is not meant
    for it. SIGTERM and SIGUSR1 are still caught."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = StopRequest()
        with stop.installed():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
        with stop.installed():  # the same trainer fitting again
            assert not stop.requested
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_agreed_signal_is_the_one_the_asked_ranks_received():
    assert StopRequest.agreed_signal(1, signal.SIGUSR1) == signal.SIGUSR1  # one rank of any number (sums)
    assert StopRequest.agreed_signal(0.5, signal.SIGUSR1 / 2) == signal.SIGUSR1  # … or means
    assert StopRequest.agreed_signal(2, signal.SIGINT * 2) == signal.SIGINT
    assert StopRequest.agreed_signal(2, signal.SIGINT + signal.SIGUSR1) == signal.SIGTERM  # different: the usual


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def body():
        with StopRequest().installed():
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before]


def test_fit_stops_after_the_step_with_its_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    sets = ("train.steps=6", "train.batch_size=2", "checkpoint.every=4", "sample.every=0")
    full = Trainer(_cfg(tmp_path, "full", *sets), progress=False)
    full.fit()
    monkeypatch.setenv("SELFFLOW_FAULT_SIGNAL_AT", "3:SIGUSR1")
    trainer = Trainer(_cfg(tmp_path, "cut", *sets), progress=False)
    with pytest.raises(RunInterrupted, match=r"SIGUSR1 at step 3 of 6: wrote .*step_00000003\.pt") as stopped:
        trainer.fit()
    assert stopped.value.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored
    ckpts = tmp_path / "cut" / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [3]
    assert not (tmp_path / "cut" / "ema.safetensors").exists()  # not finished: no final outputs
    resumed = Trainer(_cfg(tmp_path, "cut", *sets), progress=False)  # the hook fired once for this run
    assert resumed.step == 3
    resumed.fit()
    assert_same_losses(read_metrics(tmp_path / "full" / "metrics.jsonl"),
                       read_metrics(tmp_path / "cut" / "metrics.jsonl"), tol=0)


def test_a_stop_keeps_the_steps_preview_and_its_periodic_checkpoint_and_a_new_fit_goes_on(tmp_path, monkeypatch):
    """The stop comes last in a step: its preview is written (a rerun starts at the next step and would never
    write it) and a periodic checkpoint of the same step is not written twice. Fitting the same trainer again
    starts unasked (the old signal used to stop it after one step)."""
    monkeypatch.setenv("SELFFLOW_FAULT_SIGNAL_AT", "2")
    trainer = Trainer(_cfg(tmp_path, "prev", "train.steps=4", "train.batch_size=2", "checkpoint.every=2",
                           "sample.every=2", "sample.num_samples=2"), progress=False)
    with pytest.raises(RunInterrupted, match="SIGTERM at step 2 of 4"):
        trainer.fit()
    assert (tmp_path / "prev" / "samples" / "step_00000002.png").is_file()
    assert [s for s, _ in list_checkpoints(tmp_path / "prev" / "checkpoints")] == [2]
    trainer.fit()
    assert trainer.step == 4 and (tmp_path / "prev" / "ema.safetensors").is_file()


EVAL_SETS = ("train.steps=4", "train.batch_size=2", "sample.every=0", "eval.every=2", "eval.num_samples=3",
             "eval.batch_size=1")


def _losses_and_scores(run_dir):
    records = read_metrics(run_dir / "metrics.jsonl")
    return [r for r in records if "loss" in r], [r for r in records if "loss" not in r]


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_stop_defers_the_steps_evaluation_to_the_resumed_run(tmp_path, monkeypatch, when):
    """A stop asked before a due evaluation, or during it (between two batches of samples), does not wait for
    it — a long evaluation could outlast the grace a scheduler gives before its kill: the step's checkpoint says
    the evaluation is pending, and the resumed run does it first. Losses and scores are the uninterrupted run's."""
    from selfflow.core import previewer as previewer_module

    Trainer(_cfg(tmp_path, "full", *EVAL_SETS), progress=False).fit()
    if when == "before":
        monkeypatch.setenv("SELFFLOW_FAULT_SIGNAL_AT", "2")
    else:
        real = previewer_module.generate_share_batches

        def stopping(*args, **kwargs):  # SIGTERM once the first batch of samples is made
            for i, made in enumerate(real(*args, **kwargs)):
                yield made
                if i == 0:
                    os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(previewer_module, "generate_share_batches", stopping)
    cut = tmp_path / "cut"
    with pytest.raises(RunInterrupted, match="SIGTERM at step 2 of 4"):
        Trainer(_cfg(tmp_path, "cut", *EVAL_SETS), progress=False).fit()
    state = torch.load(cut / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert state["trainer"]["eval_pending"] is True
    assert _losses_and_scores(cut)[1] == []  # not scored yet
    monkeypatch.undo()
    resumed = Trainer(_cfg(tmp_path, "cut", *EVAL_SETS), progress=False)
    assert resumed.step == 2 and resumed.eval_pending
    resumed.fit()
    (full_losses, full_scores), (cut_losses, cut_scores) = _losses_and_scores(tmp_path / "full"), _losses_and_scores(cut)
    assert_same_losses(full_losses, cut_losses, tol=0)
    assert [r["step"] for r in cut_scores] == [2, 4] and len(full_scores) == 2
    for a, b in zip(full_scores, cut_scores):
        assert b == pytest.approx(a, rel=1e-9)


def test_the_cli_exits_with_the_signal_code_and_says_how_to_go_on(tmp_path):
    proc = train_process(tmp_path, "cli", 1, "train.steps=5", "train.batch_size=2",
                         env={"SELFFLOW_FAULT_SIGNAL_AT": "2:SIGINT"}, timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    assert "selfflow: SIGINT received: stopping after this step with a checkpoint (Ctrl-C again" in proc.stderr
    assert "selfflow: stopped: SIGINT at step 2 of 5: wrote" in proc.stderr and "Traceback" not in proc.stderr
    assert "stopped: SIGINT at step 2 of 5" in (tmp_path / "cli" / "train.log").read_text()


PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", '''
    import signal, sys, time
    from selfflow.core.stop_request import stop_with_parent
    signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], "w").write("SIGTERM"), sys.exit(0)))
    assert stop_with_parent()
    open(sys.argv[1] + ".ready", "w").close()
    time.sleep(60)
    ''', sys.argv[1]], start_new_session=True)  # a session of its own, as torchrun starts its workers
    time.sleep(60)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_process_that_asked_gets_sigterm_when_its_parent_is_killed(tmp_path):
    mark = tmp_path / "got"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(mark)])
    deadline = time.time() + 60
    while not (tmp_path / "got.ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    parent.kill()  # SIGKILL: the parent cannot pass anything on
    parent.wait()
    while not (mark.exists() and mark.read_text() == "SIGTERM") and time.time() < deadline:
        time.sleep(0.05)  # (created a moment before it is written)
    assert mark.exists() and mark.read_text() == "SIGTERM"
    assert stop_with_parent() in (True, False)  # callable here too (it only sets a flag for this process)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_data_workers_ignore_the_stop_signals(tmp_path):
    """A terminal's Ctrl-C or SLURM's SIGTERM reaches the DataLoader workers too; one that died of it would
    fail the batch being fetched ("worker exited unexpectedly") before the trainer could stop cleanly."""
    write_shards(list(range(16)), _sample, tmp_path, shard_size=4)
    stream = ShardStream(shard_urls(tmp_path), 2, num_workers=2)
    earlier = set(multiprocessing.active_children())  # a child of an earlier test may not be reaped yet
    it = iter(stream)
    next(it)
    workers = [w for w in multiprocessing.active_children() if w not in earlier]
    assert len(workers) == 2
    deadline = time.time() + 30  # each worker's init has run (in training the trainer's handlers cover the start)
    while not all(_ignores_stop_signals(w.pid) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        for w in workers:
            os.kill(w.pid, sig)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    assert sum(len(next(it)["captions"]) for _ in range(7)) == 14  # the rest of the epoch, from the same workers


CRASH_WITH_LIVE_WORKERS = """
import sys
from selfflow.core.data.shard_format import shard_urls
from selfflow.core.data.shard_stream import ShardStream
it = iter(ShardStream(shard_urls(sys.argv[1]), 2, num_workers=2))
next(it)
raise RuntimeError("boom")  # the traceback holds the live loader: its workers ignore SIGTERM
"""


def test_a_crash_with_live_data_workers_exits_at_once(tmp_path):
    """multiprocessing's exit hook stops daemonic workers with SIGTERM, which ours ignore, and then joins them:
    a run that failed with a live loader hung at exit (a SLURM job sat on its GPUs until its time limit)."""
    write_shards(list(range(16)), _sample, tmp_path, shard_size=4)
    start = time.time()
    r = subprocess.run([sys.executable, "-c", CRASH_WITH_LIVE_WORKERS, str(tmp_path)], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "RuntimeError: boom" in r.stderr, r.stderr
    assert time.time() - start < 30  # it hung for good before


def _ignores_stop_signals(pid: int) -> bool:
    """Whether the process ignores all of them: its init sets one after the other, and a signal sent between two
    would kill it."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return all(mask >> (s - 1) & 1 for s in STOP_SIGNALS)


def _sample(i):
    return {"latent": np.full((2, 3), float(i), dtype=np.float32), "caption": f"item {i}", "label": 0}
