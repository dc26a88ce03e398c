"""The one description of the hardware a run uses, and the owner of the Slurm contract.

`HardwareSpec` renders the Lightning Trainer settings, the `#SBATCH` directives and submitit's
executor parameters, so the three can never disagree: Lightning's DDP freezes when
`--ntasks-per-node` differs from `devices`, and that mismatch is impossible when both come from
the same object. `preflight()` checks a spec before submission and `check_job()` checks the
running job against it, so a wrong allocation is an error that names the setting, never a hang.

Requeue has exactly one owner: `zoobot_hpc.interruptions.StopOnSignal`. Slurm sends SIGUSR1 to
every rank `REQUEUE_SIGNAL_LEAD_S` seconds before the time limit; all ranks save `last.ckpt` at the
same step, rank 0 asks for the requeue (`REQUEUE_FLAG_ENV`: the batch shell of the job scripts and
of submitit jobs runs `scontrol requeue` on the host), and the restarted job resumes from it. Lightning's own
requeue handler is off (`auto_requeue=False`: it saves inside the signal handler, which can deadlock
DDP). The same handler works for `sbatch` scripts and submitit jobs (submitit's own USR2
checkpoint/requeue is never signalled: its signal is replaced by USR1), so the behaviour does not
depend on how the job was launched.
"""

from __future__ import annotations

import os
import re
import signal
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from zoobot_hpc.errors import InputError, InputWarning, check_whole

ACCELERATORS = ("auto", "cpu", "gpu")
CONTAINER_RUNTIMES = ("apptainer", "charliecloud")  # a .sif file; an image directory run by ch-run
# ch-run as Apptainer behaves: the image's ENV on top of the host's (SLURM_* pass), $HOME bound
CHRUN_OPTIONS = "--home --set-env --unset-env=PYTHONPATH"
# srun for the ranks, in the job scripts and submitit jobs alike: a rank that dies (OOM-killed, say)
# ends the whole step at once, instead of leaving the others waiting in their next collective until
# the process group's timeout (30 min) while the allocation burns.
SRUN_RANK_OPTIONS = ("--kill-on-bad-exit=1",)
REQUEUE_SIGNAL = "USR1"  # what StopOnSignal listens for inside Slurm jobs
# Rank 0 asks for the requeue by writing this file; the batch shell runs `scontrol requeue` after srun,
# on the host (ranks in a container have no Slurm client). Rank 0 runs on the batch node, and
# Apptainer and Charliecloud share the host's /tmp.
REQUEUE_FLAG_ENV = "ZOOBOT_REQUEUE_FLAG"
REQUEUE_SETUP = [
    f"export {REQUEUE_FLAG_ENV}=/tmp/zoobot-requeue-$SLURM_JOB_ID",
    f'rm -f "${REQUEUE_FLAG_ENV}"',
]
REQUEUE_TEARDOWN = [
    f'if [ -f "${REQUEUE_FLAG_ENV}" ]; then',
    f'  rm -f "${REQUEUE_FLAG_ENV}"',
    '  echo "zoobot job $SLURM_JOB_ID: requeueing; the rerun resumes from last.ckpt"',
    '  scontrol requeue "$SLURM_JOB_ID" || echo "zoobot job $SLURM_JOB_ID: scontrol requeue failed;'
    ' submit the job again to resume" >&2',
    "fi",
]
REQUEUE_SIGNAL_LEAD_S = 120  # Slurm may signal up to 60 s early; a checkpoint needs the rest
# sbatch options the spec renders itself: setting them in extra_sbatch would contradict it
OWNED_SBATCH_OPTIONS = {
    "nodes": "nodes",
    "N": "nodes",
    "ntasks-per-node": "gpus (ranks per node)",
    "ntasks": "nodes x gpus",
    "n": "nodes x gpus",
    "gpus-per-node": "gpus",
    "gpus": "gpus",
    "G": "gpus",
    "gres": "gpus",
    "gpus-per-task": "gpus",
    "cpus-per-task": "num_workers",
    "c": "num_workers",
    "signal": "(fixed: the requeue signal)",
    "no-requeue": "(fixed: jobs are requeued)",
    "requeue": "(fixed: jobs are requeued)",
    "open-mode": "(fixed: append)",
    "time": "time",
    "t": "time",
    "mem": "mem",
    "partition": "partition",
    "p": "partition",
    "account": "account",
    "A": "account",
    "qos": "qos",
    "q": "qos",
    "constraint": "constraint",
    "C": "constraint",
}
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^\d+[KMGT]?B?$", re.IGNORECASE)


class HardwareError(InputError):
    """A hardware setting cannot work; the message says which setting to change."""


@dataclass(frozen=True)
class HardwareSpec:
    """Nodes, devices and job-level settings of one run.

    `gpus` is the number of devices per node. With `accelerator='cpu'` and `gpus=N>1`, N CPU
    processes per node train with DDP over gloo: the multi-rank path, testable without GPUs.
    """

    nodes: int = 1
    gpus: int = 2
    num_workers: int = 4
    mixed_precision: bool = False
    accelerator: str = "auto"
    # job-level settings, used when the run is submitted to Slurm
    time: str = "24:00:00"
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra_sbatch: tuple[str, ...] = field(default_factory=tuple)
    container: str | None = None
    container_runtime: str = "apptainer"

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise HardwareError(f"accelerator={self.accelerator!r}: use one of {', '.join(ACCELERATORS)}")
        if self.container_runtime not in CONTAINER_RUNTIMES:
            raise HardwareError(
                f"container_runtime={self.container_runtime!r}: use one of {', '.join(CONTAINER_RUNTIMES)}"
            )
        check_whole(0, HardwareError, nodes=self.nodes, gpus=self.gpus, num_workers=self.num_workers)
        if self.nodes < 1:
            raise HardwareError(f"nodes={self.nodes}: must be at least 1")
        if self.resolved_accelerator == "gpu" and self.gpus == 0:
            raise HardwareError("accelerator='gpu' with gpus=0: set gpus to the GPUs per node, or use 'cpu'")
        if self.nodes > 1 and self.gpus == 0:
            raise HardwareError(
                f"nodes={self.nodes} with gpus=0: multi-node runs need gpus (ranks per node) >= 1"
            )
        for name in ("partition", "account", "qos", "constraint", "container"):
            if isinstance(getattr(self, name), bool):  # YAML 1.1 reads unquoted on/off/yes/no so
                raise HardwareError(
                    f"{name}={getattr(self, name)!r}: a name, not a boolean; an unquoted on, off, yes or "
                    f"no in YAML is one: quote it, e.g. {name}: 'on'"
                )
        if isinstance(self.extra_sbatch, str):
            raise HardwareError("extra_sbatch must be a list of sbatch options, e.g. ['--exclusive']")
        object.__setattr__(self, "extra_sbatch", tuple(str(line) for line in self.extra_sbatch))
        time_limit_seconds(self.time)  # raises on a malformed time
        if self.mem is not None and not _MEM.match(str(self.mem)):
            raise HardwareError(f"mem={self.mem!r}: use Slurm's form, e.g. '32G' or '64000M'")

    @property
    def resolved_accelerator(self) -> str:
        if self.accelerator == "auto":
            return "gpu" if self.gpus > 0 else "cpu"
        return self.accelerator

    @property
    def ranks_per_node(self) -> int:
        """Processes per node: one per device, and one in total for a plain CPU run."""
        return max(self.gpus, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        if not self.mixed_precision:
            return "32-true"
        return "16-mixed" if self.resolved_accelerator == "gpu" else "bf16-mixed"

    def channels_last(self, requested: bool | str) -> bool:
        """The encoder's memory format for `train(channels_last=...)`: `"auto"` is
        `channels_last_suits` this hardware."""
        if requested == "auto":
            return channels_last_suits(self.resolved_accelerator == "cpu", self.mixed_precision)
        if isinstance(requested, bool):
            return requested
        raise HardwareError(f"channels_last={requested!r}: use true, false or auto")

    def trainer_kwargs(self) -> dict[str, Any]:
        """Settings for `lightning.Trainer`: accelerator, devices, nodes, strategy, precision, plugins.

        Inside a Slurm job, the job is first checked against the spec (`check_job`), because a
        mismatch would otherwise surface as a DDP hang or a cryptic CUDA error.
        """
        if "SLURM_JOB_ID" in os.environ:
            self.check_launch()
            self.check_job()
        kwargs: dict[str, Any] = {
            "accelerator": self.resolved_accelerator,
            "devices": self.ranks_per_node,
            "num_nodes": self.nodes,
            "precision": self.precision,
        }
        if self.distributed:
            from pytorch_lightning.strategies import DDPStrategy

            backend = "nccl" if self.resolved_accelerator == "gpu" else "gloo"
            kwargs["strategy"] = DDPStrategy(process_group_backend=backend)
        else:
            kwargs["strategy"] = "auto"
        kwargs["plugins"] = [self.cluster_environment()]
        return kwargs

    def cluster_environment(self):
        """Slurm's environment inside a Slurm job step, Lightning's own launcher elsewhere.

        Lightning's requeue handler is off: `StopOnSignal` owns the requeue signal (module docstring).
        """
        from lightning_fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

        if _inside_slurm_step(os.environ):
            return SLURMEnvironment(auto_requeue=False)
        return LightningEnvironment()

    def requeue_signal(self) -> signal.Signals | None:
        """The signal that asks this run to save and requeue itself: USR1 inside a Slurm job step."""
        return signal.Signals[f"SIG{REQUEUE_SIGNAL}"] if _inside_slurm_step(os.environ) else None

    # ------------------------------------------------------------------ Slurm rendering
    @property
    def cpus_per_task(self) -> int:
        """One CPU for the training process plus one per DataLoader worker."""
        return self.num_workers + 1

    @property
    def signal_lead_s(self) -> int:
        """Seconds before the time limit that the requeue signal is sent (less for very short jobs)."""
        return min(REQUEUE_SIGNAL_LEAD_S, max(10, time_limit_seconds(self.time) // 4))

    def sbatch_directives(self, job_name: str = "zoobot", log_dir: str = "logs") -> list[str]:
        """The `#SBATCH` options of this spec, one `--key=value` per item, in a stable order.

        Logs go to `log_dir/{job_name}-%j.out` (`%A_%a` for array tasks is the caller's choice via
        `log_name`), appended across requeues so one file tells the whole story of a job.
        """
        lines = [
            f"--job-name={job_name}",
            f"--nodes={self.nodes}",
            f"--ntasks-per-node={self.ranks_per_node}",
            f"--cpus-per-task={self.cpus_per_task}",
        ]
        if self.resolved_accelerator == "gpu":
            lines.append(f"--gpus-per-node={self.gpus}")
        if self.mem is not None:
            lines.append(f"--mem={self.mem}")
        lines += [
            f"--time={self.time}",
            f"--signal={REQUEUE_SIGNAL}@{self.signal_lead_s}",
            "--requeue",
            "--open-mode=append",
            f"--output={log_dir}/%x-%j.out",
        ]
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"--{key}={value}")
        lines += list(self.extra_sbatch)
        return lines

    def submitit_parameters(self) -> dict[str, Any]:
        """Parameters for `submitit.AutoExecutor.update_parameters` (its `slurm_` names).

        submitit's default USR2 signal is replaced by USR1, so `StopOnSignal` alone checkpoints and
        requeues (one owner); `--requeue` lets Slurm requeue on preemption.
        """
        params: dict[str, Any] = {
            "nodes": self.nodes,
            "tasks_per_node": self.ranks_per_node,
            "cpus_per_task": self.cpus_per_task,
            "timeout_min": max(1, time_limit_seconds(self.time) // 60),
        }
        if self.resolved_accelerator == "gpu":
            params["gpus_per_node"] = self.gpus
        params["slurm_srun_args"] = list(SRUN_RANK_OPTIONS)
        params["slurm_setup"] = list(REQUEUE_SETUP)
        # the batch shell exits with srun's status, not the teardown's last command's: a job whose rank
        # failed ends FAILED in sacct, as the job scripts' do
        params["slurm_teardown"] = ["ranks_status=$?", *REQUEUE_TEARDOWN, 'exit "$ranks_status"']
        additional: dict[str, Any] = {
            "signal": f"{REQUEUE_SIGNAL}@{self.signal_lead_s}",
            "requeue": True,
        }
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(self, key)
            if value is not None:
                params[f"slurm_{key}"] = value
        if self.mem is not None:
            params["slurm_mem"] = str(self.mem)
        for line in self.extra_sbatch:
            key, _, value = line.lstrip("-").partition("=")
            additional[key] = value if value else True
        params["slurm_additional_parameters"] = additional
        return params

    # ------------------------------------------------------------------ checks
    def preflight(self, node_cpus: int | None = None) -> None:
        """Refuse a spec before submission: contradicting sbatch lines, impossible CPU requests.

        `node_cpus` (CPUs of one node of the partition, from `sinfo`) enables the CPU check.
        """
        for line in self.extra_sbatch:
            if not line.startswith("-"):
                raise HardwareError(
                    f"extra_sbatch line {line!r}: write it as an sbatch option, e.g. '--exclusive'"
                )
            key = line.lstrip("-").partition("=")[0].partition(" ")[0]
            if key in OWNED_SBATCH_OPTIONS:
                owner = OWNED_SBATCH_OPTIONS[key]
                raise HardwareError(
                    f"extra_sbatch line {line!r} contradicts the spec, which renders --{key} itself "
                    f"from {owner}; remove the line and set {owner} instead (ntasks-per-node must equal "
                    f"the devices per node, {self.ranks_per_node}, or DDP waits forever)"
                )
        if node_cpus is not None and self.cpus_per_task * self.ranks_per_node > node_cpus:
            raise HardwareError(
                f"num_workers={self.num_workers} needs {self.cpus_per_task} CPUs per rank x "
                f"{self.ranks_per_node} ranks per node = {self.cpus_per_task * self.ranks_per_node} CPUs, "
                f"but a node has {node_cpus}; lower num_workers to at most "
                f"{max(0, node_cpus // self.ranks_per_node - 1)}"
            )

    def check_job(
        self,
        environ: Mapping[str, str] | None = None,
        cuda: tuple[bool, int] | None = None,
        gpus_in_batch_shell: bool = False,
    ) -> None:
        """Refuse to start when the running Slurm job disagrees with the spec (no-op outside Slurm).

        Run at job start, before the model is built: by the job scripts in the batch shell
        (allocation-level checks) and by `trainer_kwargs()` in each rank. `cuda` = (available,
        device count) for tests; by default torch is asked, only when the spec wants GPUs (in the
        batch shell only with `gpus_in_batch_shell`, as it costs a torch import).
        """
        env = os.environ if environ is None else environ
        if "SLURM_JOB_ID" not in env:
            return
        in_step = "SLURM_STEP_ID" in env
        job_nodes = _int(env, "SLURM_JOB_NUM_NODES") or _int(env, "SLURM_NNODES")
        per_node = _first_count(env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"))
        if not in_step:
            # the batch shell: check the allocation, which sbatch command-line options can change
            if self.distributed and job_nodes is not None and per_node is not None:
                if job_nodes != self.nodes:
                    raise HardwareError(
                        f"the job has {job_nodes} node(s) but the spec asks for nodes={self.nodes}; "
                        "submit with the rendered script's --nodes, or change nodes in the config"
                    )
                if per_node != self.ranks_per_node:
                    raise HardwareError(
                        f"the job has --ntasks-per-node={per_node} but the spec has {self.ranks_per_node} "
                        f"device(s) per node (gpus={self.gpus}); they must be equal or DDP waits forever. "
                        "Re-render the script (`zoobot-hpc render`) instead of overriding --ntasks-per-node"
                    )
            self._check_cpus(env)
            if gpus_in_batch_shell and self.resolved_accelerator == "gpu":
                self._check_gpus(env, cuda)
            return
        if self.distributed or _int(env, "SLURM_NTASKS") not in (None, 1):
            world = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
            step_nodes = _int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_NNODES")
            rank = _int(env, "SLURM_PROCID")
            if world is not None and world != self.world_size:
                raise HardwareError(
                    f"this job step runs {world} task(s) but the spec needs world size {self.world_size} "
                    f"(nodes={self.nodes} x gpus/ranks per node={self.ranks_per_node}); launch it with "
                    f"`srun` in a job with --nodes={self.nodes} --ntasks-per-node={self.ranks_per_node}"
                )
            if step_nodes is not None and step_nodes != self.nodes:
                raise HardwareError(
                    f"this job step spans {step_nodes} node(s) but the spec has nodes={self.nodes}; "
                    "change nodes in the config or the job's --nodes"
                )
            if rank is not None and not 0 <= rank < self.world_size:
                raise HardwareError(f"SLURM_PROCID={rank} is outside world size {self.world_size}")
        self._check_cpus(env)
        if self.resolved_accelerator == "gpu":
            self._check_gpus(env, cuda)

    def check_launch(self, environ: Mapping[str, str] | None = None) -> None:
        """In a Slurm job, a distributed run must be started by `srun` (one task per rank).

        Without srun, Lightning's Slurm environment expects SLURM_NTASKS processes that never
        start and the run hangs at "initializing ddp"; this turns that into an error.
        """
        env = os.environ if environ is None else environ
        if self.distributed and "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env:
            raise HardwareError(
                f"a distributed run (nodes={self.nodes} x {self.ranks_per_node} ranks) was started in "
                "the batch shell of a Slurm job without srun; launch it as "
                "`srun --kill-on-bad-exit=1 python -m zoobot_hpc train ...` (the rendered job scripts do)"
            )

    def check_machine(self, environ: Mapping[str, str] | None = None) -> None:
        """Outside Slurm (where `check_job` checks the allocation): this machine against the spec.

        Refuses more GPUs per node than this machine shows (Lightning would stop later with "No
        supported gpu backend found"); warns when the loader workers of all ranks outnumber the CPUs.
        """
        env = os.environ if environ is None else environ
        if "SLURM_JOB_ID" in env:
            return
        if self.resolved_accelerator == "gpu":
            visible = _visible_gpus()
            if visible < self.ranks_per_node:
                fewer = f"gpus to at most {visible}, or " if visible else ""
                raise HardwareError(
                    f"gpus={self.gpus} but this machine shows {visible} GPU(s) "
                    f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')}); set {fewer}gpus=0 "
                    "to train on the CPU (or check `nvidia-smi` and that torch is a CUDA build)"
                )
        cpus = _available_cpus(env)
        workers = self.num_workers * self.ranks_per_node
        if cpus is not None and workers > cpus:
            warnings.warn(
                f"num_workers={self.num_workers} x {self.ranks_per_node} rank(s) = {workers} loader "
                f"processes but this process may use {cpus} CPU(s); they will compete. Set num_workers "
                f"to at most {max(0, cpus // self.ranks_per_node - 1)}",
                InputWarning,
                stacklevel=2,
            )

    def _check_cpus(self, env: Mapping[str, str]) -> None:
        cpus = _available_cpus(env)
        if cpus is not None and self.num_workers > cpus:
            raise HardwareError(
                f"num_workers={self.num_workers} but each rank has {cpus} CPU(s) in this job; lower "
                f"num_workers to {max(0, cpus - 1)} or request --cpus-per-task={self.cpus_per_task} "
                "(the rendered scripts do)"
            )

    def _check_gpus(self, env: Mapping[str, str], cuda: tuple[bool, int] | None) -> None:
        if cuda is None:
            import torch

            available = torch.cuda.is_available()
            cuda = (available, torch.cuda.device_count() if available else 0)
        available, count = cuda
        visible = env.get("CUDA_VISIBLE_DEVICES", "<unset>")
        if not available:
            raise HardwareError(
                f"the spec asks for gpus={self.gpus} per node and Slurm gave this job GPUs "
                f"(CUDA_VISIBLE_DEVICES={visible}), but CUDA cannot use any of them. Check the "
                "NVIDIA driver on the node (`srun nvidia-smi`), pass --nv to apptainer (set "
                "ZOOBOT_IMAGE so the job script does), and that torch is a CUDA build; or train on "
                "CPU with --set accelerator=cpu"
            )
        if count < self.ranks_per_node:
            raise HardwareError(
                f"the spec asks for gpus={self.gpus} per node but this rank sees {count} CUDA device(s) "
                f"(CUDA_VISIBLE_DEVICES={visible}); request --gpus-per-node={self.gpus} (not "
                "--gpus-per-task) or lower gpus"
            )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["extra_sbatch"] = list(self.extra_sbatch)
        return data


def channels_last_suits(on_cpu: bool, mixed_precision: bool) -> bool:
    """Whether the encoder runs faster channels-last: on the CPU (oneDNN's convolutions work in it:
    an EfficientNet-B0 training step here made 1.46-1.60x the images/s of contiguous, inference 1.4x)
    and with mixed precision on GPUs (tensor cores work in NHWC; NVIDIA's EfficientNet recipe trains
    in it under AMP); contiguous for full-precision GPU work."""
    return on_cpu or mixed_precision


def time_limit_seconds(time: str) -> int:
    """Seconds of a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    match = _TIME.match(str(time).strip())
    if not match:
        raise HardwareError(f"time={time!r}: use Slurm's form, e.g. '24:00:00', '2-00:00:00' or '30'")
    days, a, b, c = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:  # MM
        seconds = int(a) * 60
    if seconds <= 0:
        raise HardwareError(f"time={time!r}: the time limit must be positive")
    return seconds


def _int(env: Mapping[str, str], key: str) -> int | None:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        return None


def _first_count(value: str | None) -> int | None:
    """Tasks on the first node from Slurm's compressed form, e.g. '2(x2)' or '2,1'."""
    if not value:
        return None
    match = re.match(r"^(\d+)", value)
    return int(match.group(1)) if match else None


def _available_cpus(env: Mapping[str, str]) -> int | None:
    """CPUs each rank was allocated: Slurm's --cpus-per-task, else this process's CPU affinity."""
    count = _int(env, "SLURM_CPUS_PER_TASK")
    if count is None and env is os.environ and hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    return count


def _visible_gpus() -> int:
    """CUDA devices torch can use, or 1 for Apple's MPS (Lightning's "gpu" accelerator takes either)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return int(torch.backends.mps.is_available())


def _inside_slurm_step(env: Mapping[str, str]) -> bool:
    """True for a task launched by srun, or a single-task batch shell, in a Slurm job.

    A multi-task batch shell is not a step: Lightning would wait there for ranks that never start.
    """
    if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return False
    return "SLURM_STEP_ID" in env or env.get("SLURM_NTASKS") == "1"
