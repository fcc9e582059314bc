"""examples/slurm/train.sbatch on one CPU node, with stand-ins for ``srun`` and ``scontrol``. The ``srun`` stand-in
does what SLURM does with ``--signal=USR1@…``: SIGUSR1 to every process of the step (the torchrun agent and its
workers), and SIGKILL to what is left once the task has exited. Both ranks stop with a checkpoint and the script
requeues the job; the requeued script finishes the run; a run that fails for another reason is not requeued."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from selfflow.core.checkpoint import list_checkpoints

from .test_trainer import TINY

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "slurm" / "train.sbatch"

SRUN = """#!/bin/bash
"$@" &
task=$!
tree() { local p; for p in $(pgrep -P "$1"); do echo "$p"; tree "$p"; done; }
step=""
if [ -n "${FAKE_SIGNAL_AFTER:-}" ]; then  # --signal=USR1@T: every process of the step, once the run is going
    while kill -0 $task 2>/dev/null && [ "$(cat "$FAKE_METRICS" 2>/dev/null | wc -l)" -lt "$FAKE_SIGNAL_AFTER" ]; do
        sleep 0.1
    done
    step=$(tree $task)
    kill -USR1 $task $step 2>/dev/null
fi
wait $task
status=$?
kill -9 $step 2>/dev/null  # slurmstepd: what is left of the step once its task has exited
exit $status
"""


def _stand_ins(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tools = {
        "srun": SRUN,
        "scontrol": f'#!/bin/bash\n[ "$1" = show ] && echo localhost && exit 0\necho "$@" >> {tmp_path}/scontrol.log\n',
        "torchrun": f'#!/bin/bash\nexec {sys.executable} -m torch.distributed.run "$@"\n',
    }
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


def _sbatch(tmp_path: Path, *sets: str, signal_after: int | None = None) -> subprocess.CompletedProcess:
    args = [a for s in [*TINY, f"output_dir={tmp_path}", "name=job", "sample.every=0", "train.num_threads=1",
                        "train.batch_size=2", "train.steps=300", "checkpoint.every=1000", *sets]
            for a in ("--set", s)]
    env = {**os.environ, "PATH": f"{_stand_ins(tmp_path)}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "4242", "CONFIG": "configs/tiny/image.yaml", "GPUS_PER_NODE": "2",
           "OMP_NUM_THREADS": "1", "FAKE_SIGNAL_AFTER": str(signal_after or ""),
           "FAKE_METRICS": str(tmp_path / "job" / "metrics.jsonl")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_a_clean_stop_is_requeued_and_the_requeued_job_finishes(tmp_path):
    first = _sbatch(tmp_path, signal_after=5)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "selfflow: stopped: SIGUSR1 at step" in first.stderr and "requeueing job 4242" in first.stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    steps = [s for s, _ in list_checkpoints(tmp_path / "job" / "checkpoints")]
    assert len(steps) == 1 and 5 <= steps[0] < 300, steps  # the stop's checkpoint, not the end
    again = _sbatch(tmp_path)  # what SLURM runs after the requeue
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {tmp_path}/job/checkpoints/step_{steps[0]:08d}.pt" in again.stdout + again.stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # not again
    assert (tmp_path / "job" / "ema.safetensors").is_file()


def test_another_failure_is_not_requeued(tmp_path):
    proc = _sbatch(tmp_path, "train.no_such_key=1")
    assert proc.returncode != 0 and "no_such_key" in proc.stderr
    assert not (tmp_path / "scontrol.log").exists()
