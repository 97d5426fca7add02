"""torchrun entry point: ``python -m torch.distributed.run ... -m cbtm.training JOB.json`` runs
:func:`cbtm.training.train_experts` with the arguments in JOB.json in every process."""

import sys

from ..rundir import read_json
from .launch import train_experts

if __name__ == "__main__":
    job = read_json(sys.argv[1])
    train_experts(job.pop("run"), job.pop("total_tokens"), **job)
