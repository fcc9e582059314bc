"""examples/slurm/train.sbatch on one CPU node, with stand-ins for ``srun`` and ``scontrol``: a SIGUSR1 (SLURM's
``--signal=USR1@…``) stops both ranks with a checkpoint and the script requeues the job; the requeued script
finishes the run; a run that fails for another reason is not requeued."""

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


def _stand_ins(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tools = {
        "srun": '#!/bin/bash\nexec "$@"\n',  # one node, one task: the command itself
        "scontrol": f'#!/bin/bash\n[ "$1" = show ] && echo localhost && exit 0\necho "$@" >> {tmp_path}/scontrol.log\n',
        "torchrun": f'#!/bin/bash\nexec {sys.executable} -m torch.distributed.run "$@"\n',
    }
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


def _sbatch(tmp_path: Path, *sets: str, fault: str = "") -> subprocess.CompletedProcess:
    args = [a for s in [*TINY, f"output_dir={tmp_path}", "name=job", "sample.every=0", "train.num_threads=1",
                        "train.batch_size=2", "train.steps=6", *sets] for a in ("--set", s)]
    env = {**os.environ, "PATH": f"{_stand_ins(tmp_path)}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "4242", "CONFIG": "configs/tiny/image.yaml", "GPUS_PER_NODE": "2",
           "OMP_NUM_THREADS": "1", "SELFFLOW_FAULT_SIGNAL_AT": fault}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_a_clean_stop_is_requeued_and_the_requeued_job_finishes(tmp_path):
    first = _sbatch(tmp_path, fault="3@0:SIGUSR1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "requeueing job 4242" in first.stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert [s for s, _ in list_checkpoints(tmp_path / "job" / "checkpoints")] == [4]
    again = _sbatch(tmp_path)  # what SLURM runs after the requeue
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # not again
    assert (tmp_path / "job" / "ema.safetensors").is_file()


def test_another_failure_is_not_requeued(tmp_path):
    proc = _sbatch(tmp_path, "train.no_such_key=1")
    assert proc.returncode != 0 and "no_such_key" in proc.stderr
    assert not (tmp_path / "scontrol.log").exists()
