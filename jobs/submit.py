"""Submit DR5 training with submitit from Python, with the resources of jobs/configs/train_dr5.yaml.

    python jobs/submit.py                                   # Slurm, waits for the result
    python jobs/submit.py --executor local --set gpus=0     # on this machine
    python jobs/submit.py --set catalog=/data/dr5.parquet --set epochs=50 --no-wait

The same `HardwareSpec` that renders jobs/train_dr5.sh gives submitit its nodes, tasks per node
(= GPUs per node), CPUs, time limit and the USR1 requeue signal, which zoobot-hpc handles.
"""

from __future__ import annotations

import argparse
import json
import sys

from zoobot_hpc import launch
from zoobot_hpc.errors import InputError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/train_dr5.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--executor", choices=launch.EXECUTORS, default="slurm")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    args = parser.parse_args()
    try:
        job = launch.train(args.config, executor=args.executor, overrides=args.overrides)
    except InputError as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 2
    print(f"submitted job {job.job_id} (submitit files: {job.paths.folder})", flush=True)
    if not args.no_wait:
        print(json.dumps(launch.result(job), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
