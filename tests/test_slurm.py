"""Real-cluster tests: the committed job scripts, multi-node DDP, submitit, job arrays and requeue.

They need a Slurm cluster whose nodes share this machine's filesystem (`bash tests/slurm/cluster-up.sh`
as root starts one: 2 nodes x 12 CPUs, 2 fake GPUs each). Without one they skip with the reason;
with `CI` set they fail instead, so CI cannot pass without having run them. Every training here is
tiny (32 px images, at most 3 batches per epoch, 1-2 epochs) on CPU ranks over gloo.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from zoobot_hpc.slurm import clean_environment

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
}
# tiny, fast training: these overrides go through the job scripts' ZOOBOT_SET
LIMITS = '{"limit_train_batches":2,"limit_val_batches":1,"limit_test_batches":1}'
TINY = (
    "accelerator=cpu num_workers=0 resize_size=32 batch_size=4 epochs=1 prefetch_factor=2 "
    f"trainer_kwargs={LIMITS}"
)


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "no Slurm here (sinfo not found); start one with `sudo bash tests/slurm/cluster-up.sh`"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15, env=clean_environment()
        )
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    states = out.stdout.split()
    if out.returncode != 0 or not states:
        return f"Slurm is not reachable: {out.stderr.strip() or 'no nodes'} (run tests/slurm/cluster-up.sh)"
    if not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        return f"no usable Slurm node (states: {' '.join(states)})"
    return None


@pytest.fixture(scope="session")
def cluster() -> int:
    """Number of nodes; skips (or fails under CI) when no cluster is reachable."""
    problem = _cluster_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the Slurm tests cannot run: {problem}")
        pytest.skip(problem)
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True)
    return len(set(out.stdout.split()))


def job_env(**extra: str) -> dict[str, str]:
    """The submitting shell: no parent-job variables, this interpreter as the job's Python."""
    env = clean_environment()
    env["ZOOBOT_PYTHON"] = sys.executable
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def sbatch(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=ROOT, env=env or job_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, f"sbatch {' '.join(args)} failed: {result.stderr}"
    return result.stdout.strip().split(";")[0]


def sbatch_rendered(config: Path, env: dict[str, str] | None = None) -> str:
    """Render the train job script of `config` beside it and submit it; the job id. The job is named
    after the config, and its log is `{config.stem}-{job_id}.out` in the same folder."""
    from zoobot_hpc.config import hardware_spec, load_config
    from zoobot_hpc.slurm import render_train_script

    script = config.with_suffix(".sh")
    script.write_text(
        render_train_script(config, hardware_spec(load_config(config)), log_dir=str(config.parent))
    )
    return sbatch(str(script), env=env)


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    match = re.search(r"JobState=(\S+)", out.stdout)
    if match:
        return match.group(1)
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True
    )
    return (out.stdout.split() or ["UNKNOWN"])[0]


def wait_job(job_id: str, timeout: float, log: Path | None = None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in TERMINAL:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} still {job_state(job_id)} after {timeout:.0f}s\n{tail(log)}")


def tail(log: Path | None, lines: int = 60) -> str:
    if log is None or not log.exists():
        return f"(no log at {log})"
    return f"--- {log.name} tail\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def tails(logs: list[Path]) -> str:
    return "\n".join(tail(log, 150) for log in logs)


def submitit_logs(job) -> list[Path]:
    """Both ranks' stdout and stderr of a two-rank submitit job (rank 0's stdout is job.paths.stdout)."""
    folder = Path(job.paths.folder)
    return [folder / f"{job.job_id}_{rank}_log.{kind}" for rank in (0, 1) for kind in ("out", "err")]


def assert_completed(job_id: str, log: Path, timeout: float) -> str:
    state = wait_job(job_id, timeout, log)
    assert state == "COMPLETED", f"job {job_id} ended {state}\n{tail(log)}"
    return log.read_text(errors="replace")


def ranks_seen(log_text: str) -> set[str]:
    """'MEMBER: k/n' lines that Lightning prints once per rank when DDP initialises."""
    return set(re.findall(r"MEMBER: (\d+/\d+)", log_text))


@pytest.fixture(scope="module")
def dr5_catalog(tmp_path_factory) -> Path:
    """A tiny DR5-format catalog: demo galaxies, demo votes mapped onto the DR5 questions.

    The three demo questions map onto their -dr5 twins; every other question gets all the votes
    of the answer that leads to it (all on one answer, chosen per galaxy), and the root
    question `merging-dr5` gets every volunteer, so the counts are consistent down the tree.
    """
    from zoobot_hpc.demo import demo_catalog
    from zoobot_hpc.schema import load_schema

    schema = load_schema("gz_decals_dr5")
    demo = pd.read_csv(demo_catalog()).head(40)
    base = demo_catalog().parent
    out = pd.DataFrame({"id_str": demo["id_str"], "file_loc": [str(base / f) for f in demo["file_loc"]]})
    for column in demo.columns[2:]:
        question, _, answer = column.partition("_")
        out[f"{question}-dr5_{answer}"] = demo[column].astype(int)
    total = sum(out[f"smooth-or-featured-dr5_{a}"] for a in ("smooth", "featured-or-disk", "artifact"))
    for question in schema.questions:
        columns = [f"{question.name}_{a}" for a in question.answers]
        if all(c in out for c in columns):
            continue
        reaching = (total if question.asked_after is None else out[question.asked_after]).to_numpy()
        chosen = [k % len(columns) for k in range(len(out))]  # each galaxy: one answer gets all votes
        for i, column in enumerate(columns):
            out[column] = [n if c == i else 0 for n, c in zip(reaching, chosen, strict=True)]
    out = out[["id_str", "file_loc", *schema.label_cols]]
    path = tmp_path_factory.mktemp("dr5") / "catalog.csv"
    out.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def dr5_run(cluster, dr5_catalog, tmp_path_factory):
    """`sbatch jobs/train_dr5.sh` as committed, with environment overrides only."""
    save_dir = tmp_path_factory.mktemp("train_dr5") / "run"
    env = job_env(ZOOBOT_CATALOG=str(dr5_catalog), ZOOBOT_SAVE_DIR=str(save_dir), ZOOBOT_SET=TINY)
    start = time.monotonic()
    job_id = sbatch("jobs/train_dr5.sh", env=env)
    log = ROOT / "jobs" / "logs" / f"train_dr5-{job_id}.out"
    text = assert_completed(job_id, log, timeout=240)
    return {"save_dir": save_dir, "log": text, "seconds": time.monotonic() - start}


def test_train_dr5_script_as_committed(dr5_run):
    save_dir = dr5_run["save_dir"]
    assert ranks_seen(dr5_run["log"]) == {"1/2", "2/2"}, dr5_run["log"][-3000:]  # both ranks ran
    assert "preflight ok: 1 node(s) x 2 rank(s) on cpu, world size 2" in dr5_run["log"]
    assert (save_dir / "checkpoints" / "last.ckpt").is_file()
    resolved = (save_dir / "config.yaml").read_text()
    assert "gz_decals_dr5" in resolved or "smooth-or-featured-dr5" in resolved
    assert "resize_size: 32" in resolved
    assert list((save_dir / "tensorboard").rglob("events.out.tfevents*"))


def test_missing_catalog_fails_in_seconds(cluster):
    env = job_env(ZOOBOT_CATALOG="/nonexistent/catalog.parquet", ZOOBOT_SET=TINY)
    start = time.monotonic()
    job_id = sbatch("jobs/train_dr5.sh", env=env)
    log = ROOT / "jobs" / "logs" / f"train_dr5-{job_id}.out"
    state = wait_job(job_id, 90, log)
    text = log.read_text()
    assert state == "FAILED", text
    assert "catalog '/nonexistent/catalog.parquet' does not exist" in text
    assert "ZOOBOT_CATALOG" in text and "Traceback" not in text
    assert time.monotonic() - start < 60


def test_two_nodes_four_ranks(cluster, dr5_catalog, tmp_path):
    if cluster < 2:
        pytest.skip("needs 2 nodes: SLURM_CI_NODES=2 bash tests/slurm/cluster-up.sh")
    config = tmp_path / "multinode.yaml"
    save_dir = tmp_path / "run"
    config.write_text(
        f"save_dir: {save_dir}\nschema: gz_decals_dr5\ncatalog: {dr5_catalog}\nnodes: 2\ngpus: 2\n"
        "accelerator: cpu\nnum_workers: 0\nresize_size: 32\nbatch_size: 2\nepochs: 1\nprefetch_factor: 2\n"
        f"trainer_kwargs: {LIMITS}\nslurm:\n  time: '15:00'\n  mem: 3G\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "zoobot_hpc", "submit", "--executor", "sbatch", "--config", str(config)],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"submitted job (\d+)", out.stdout).group(1)
    log = save_dir / "logs" / f"multinode-{job_id}.out"
    text = assert_completed(job_id, log, timeout=300)
    assert ranks_seen(text) == {"1/4", "2/4", "3/4", "4/4"}
    assert "on node[1-2]: 2 node(s) x 2 task(s), rendezvous node1:" in text
    assert (save_dir / "checkpoints" / "last.ckpt").is_file()


def test_submitit_training_returns_result(cluster, dr5_catalog, tmp_path):
    from zoobot_hpc import launch

    config = {
        "save_dir": str(tmp_path / "run"),
        "schema": "gz_decals_dr5",
        "catalog": str(dr5_catalog),
        "gpus": 2,
        "accelerator": "cpu",
        "num_workers": 0,
        "resize_size": 32,
        "batch_size": 4,
        "epochs": 1,
        "prefetch_factor": 2,
        "trainer_kwargs": {"limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 1},
        "slurm": {"time": "15:00", "mem": "3G"},
    }
    job = launch.train(config, executor="slurm")
    submission = Path(job.paths.submission_file).read_text()
    assert "#SBATCH --signal=USR1@" in submission and "USR2" not in submission  # one requeue owner
    assert "#SBATCH --ntasks-per-node=2" in submission
    results = job.results()  # one per rank
    assert [r["global_rank"] for r in results] == [0, 1]
    result = launch.result(job)
    assert result["world_size"] == 2 and result["global_rank"] == 0
    assert Path(result["best_checkpoint"]).is_file()


REQUEUE_EPOCHS = 4  # the interrupt lands after epoch 0 is saved; three more epochs are the margin
REQUEUE_STEPS_PER_EPOCH = 6  # limit_train_batches (each rank has 14 galaxies: 7 batches of 2)


def requeue_config(path: Path, save_dir: Path, catalog: Path, slurm_extra: str = "") -> Path:
    """Two CPU ranks with a loader worker each (Slurm signals the workers too), long enough to interrupt."""
    path.write_text(
        f"save_dir: {save_dir}\nschema: gz_decals_dr5\ncatalog: {catalog}\ngpus: 2\naccelerator: cpu\n"
        f"num_workers: 1\nresize_size: 32\nbatch_size: 2\nepochs: {REQUEUE_EPOCHS}\npatience: 100\n"
        "prefetch_factor: 2\nhang_report_after: 30\n"  # a hung rank shows its stacks in its log
        "trainer_kwargs: {limit_train_batches: 6, limit_val_batches: 1, limit_test_batches: 1}\n"
        f"slurm:\n  time: '20:00'\n  mem: 3G\n{slurm_extra}"
    )
    return path


def wait_for_first_checkpoint(job_id: str, save_dir: Path, logs: list[Path]) -> Path:
    """last.ckpt once epoch 0 is saved; the job's logs (hang reports included) if it never comes."""
    last = save_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while not last.exists():  # (an assert's message is only built when it fails)
        assert time.monotonic() < deadline, f"no last.ckpt after 180 s\n{tails(logs)}"
        assert job_state(job_id) not in TERMINAL, tails(logs)
        time.sleep(0.2)
    return last


def interrupt_after_first_checkpoint(job_id: str, save_dir: Path, interrupt: str, logs: list[Path]) -> int:
    """Interrupt the job once its first last.ckpt exists; wait until it left the node; the saved step."""
    import torch

    last = wait_for_first_checkpoint(job_id, save_dir, logs)
    if interrupt == "scontrol-requeue":
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    else:  # what --signal=USR1@N delivers to the job steps before the time limit
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    # the interrupted run's last.ckpt is where the rerun must continue
    while job_state(job_id) == "RUNNING" or job_state(job_id) == "COMPLETING":
        time.sleep(0.5)
    saved_step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert saved_step < (REQUEUE_EPOCHS - 1) * REQUEUE_STEPS_PER_EPOCH, "the requeue came too late"
    return saved_step


def assert_every_step_done_once(save_dir: Path) -> None:
    import torch

    final = torch.load(save_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["epoch"] == REQUEUE_EPOCHS - 1
    assert final["global_step"] == REQUEUE_EPOCHS * REQUEUE_STEPS_PER_EPOCH  # none lost, none repeated


def interrupt_and_check_resume(job_id: str, log: Path, save_dir: Path, interrupt: str) -> str:
    """Interrupt a job of the rendered train script after its first checkpoint; check that it is
    requeued and that the rerun continues from the saved step and does every step once. The log."""
    saved_step = interrupt_after_first_checkpoint(job_id, save_dir, interrupt, [log])
    text = assert_completed(job_id, log, timeout=300)
    assert "(restart 1)" in text, tail(log)
    first_run, second_run = text.split("(restart 1)", 1)
    if interrupt == "usr1-signal":  # (after a requeue srun stops forwarding the ranks' output)
        assert "stopped by the requeue signal at epoch" in first_run, first_run[-3000:]
        assert f"zoobot job {job_id}: requeueing" in first_run, first_run[-3000:]  # by the batch shell
    assert "Restored all states from the checkpoint" in second_run or "resuming from" in second_run
    # the rerun continued (not restarted) and lost no step
    first_epoch = re.search(r"Epoch (\d+):", second_run)
    assert first_epoch and int(first_epoch.group(1)) >= saved_step // REQUEUE_STEPS_PER_EPOCH >= 1, (
        second_run[-3000:]
    )
    assert_every_step_done_once(save_dir)
    return text


@pytest.mark.parametrize("interrupt", ["scontrol-requeue", "usr1-signal"])
def test_requeue_resumes_from_last_checkpoint(cluster, dr5_catalog, tmp_path, interrupt):
    """Requeue mid-training, by an admin (`scontrol requeue`, as on preemption: SIGTERM) or by the
    USR1 that Slurm sends before the time limit: both ranks save last.ckpt at the same step, the job
    is requeued, and the rerun continues from that step and finishes the requested epochs."""
    config = requeue_config(tmp_path / "requeue.yaml", tmp_path / "run", dr5_catalog)
    job_id = sbatch_rendered(config)
    interrupt_and_check_resume(job_id, tmp_path / f"requeue-{job_id}.out", tmp_path / "run", interrupt)


def test_submitit_job_requeues_at_the_signal_and_returns_its_result(cluster, dr5_catalog, tmp_path):
    """submitit's batch shell runs the requeue too (its teardown), and the requeued job's result is
    the finished run's: the interrupted run leaves no error result behind."""
    from zoobot_hpc import launch

    save_dir = tmp_path / "run"
    job = launch.train(requeue_config(tmp_path / "requeue.yaml", save_dir, dr5_catalog), executor="slurm")
    submission = Path(job.paths.submission_file).read_text()
    assert submission.index("srun") < submission.index('scontrol requeue "$SLURM_JOB_ID"')  # after the ranks
    interrupt_after_first_checkpoint(job.job_id, save_dir, "usr1-signal", submitit_logs(job))
    result = launch.result(job)  # waits through the requeue
    assert result["restart_count"] == 1 and result["world_size"] == 2
    assert_every_step_done_once(save_dir)


def rank_pid(job_id: str, rank: int, timeout: float = 120) -> int:
    """The process of one rank of a one-node job's first step (srun's), as soon as it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
        node = re.search(r"BatchHost=(\S+)", info.stdout)  # its slurmd (both test nodes run here)
        if node is None:
            time.sleep(0.1)
            continue
        listing = subprocess.run(
            ["scontrol", "listpids", job_id, node.group(1)], capture_output=True, text=True
        ).stdout
        # PID JOBID STEPID LOCALID GLOBALID; a rank's own children (loader workers) have GLOBALID "-".
        # A task being launched is listed with PID -1: os.kill(-1, SIGKILL) would kill every process
        for line in listing.splitlines()[1:]:
            pid, _, step, _, global_rank = line.split()
            if step == "0" and global_rank == str(rank) and int(pid) > 1:
                return int(pid)
        assert job_state(job_id) not in TERMINAL, f"job {job_id} ended before rank {rank} started"
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} of job {job_id} did not start in {timeout:.0f} s")


@pytest.mark.parametrize("launcher", ["job-script", "submitit"])
def test_a_rank_that_dies_ends_the_job_at_once(cluster, dr5_catalog, tmp_path, launcher):
    """Rank 1 killed as it starts, as the out-of-memory killer would (SIGKILL: no traceback, no exit
    handler), before it reaches the DDP rendezvous: rank 0 would wait there for the process group's
    30-minute timeout. srun --kill-on-bad-exit ends the step instead, and the job ends FAILED in
    seconds. (Mid-training, gloo notices the closed connection itself; NCCL need not.)"""
    from zoobot_hpc import launch

    config = requeue_config(tmp_path / "dies.yaml", tmp_path / "run", dr5_catalog)
    if launcher == "submitit":
        job = launch.train(config, executor="slurm")
        job_id, log = job.job_id, Path(job.paths.stdout)
        assert "srun --unbuffered" in (submission := Path(job.paths.submission_file).read_text())
        assert "--kill-on-bad-exit=1" in submission.split("srun --unbuffered", 1)[1].splitlines()[0]
    else:
        job_id = sbatch_rendered(config)
        log = tmp_path / f"dies-{job_id}.out"
    os.kill(rank_pid(job_id, 1), 9)
    killed = time.monotonic()
    state = wait_job(job_id, 120, log)
    assert state == "FAILED", f"job {job_id} ended {state}\n{tail(log)}"
    assert time.monotonic() - killed < 60, f"the job outlived its dead rank by a minute\n{tail(log)}"


def test_train_job_ranks_run_inside_the_image_and_requeue(cluster, dr5_catalog, tmp_path):
    """srun → one container per rank → python: the project's image, exported to a directory and run
    by Charliecloud's ch-run (Apptainer's exec model: no daemon, host network, SLURM_* passed
    through). The image has no Slurm client, so the requeue at USR1 must come from the batch shell.
    .ci/container.sh builds and exports the image, then runs this test."""
    image = os.environ.get("ZOOBOT_HPC_CHRUN_IMAGE")
    if not image:
        pytest.skip("no exported image: .ci/container.sh exports one (ZOOBOT_HPC_CHRUN_IMAGE) and runs this")
    assert shutil.which("ch-run"), "ch-run not found: apt-get install charliecloud-runtime"
    assert (Path(image) / "opt" / "venv" / "bin" / "python3").exists(), f"{image} is not an exported image"
    assert not (Path(image) / "usr" / "bin" / "scontrol").exists()  # what makes the host's requeue necessary
    # the ranks see the host's /tmp (ch-run binds it), so images, catalog and outputs live there
    catalog = pd.read_csv(dr5_catalog)
    (tmp_path / "images").mkdir()
    for i, source in enumerate(catalog["file_loc"]):
        target = tmp_path / "images" / Path(source).name
        shutil.copyfile(source, target)
        catalog.loc[i, "file_loc"] = str(target)
    catalog.to_csv(tmp_path / "catalog.csv", index=False)
    in_image = f"  container: {image}\n  container_runtime: charliecloud\n"
    config = requeue_config(tmp_path / "in_image.yaml", tmp_path / "run", tmp_path / "catalog.csv", in_image)
    job_env_outside = job_env()
    job_env_outside.pop("ZOOBOT_PYTHON")  # the image's Python, not this one
    job_id = sbatch_rendered(config, env=job_env_outside)
    text = interrupt_and_check_resume(
        job_id, tmp_path / f"in_image-{job_id}.out", tmp_path / "run", "usr1-signal"
    )
    inside = set(re.findall(r"train, rank (\d+): Python ([^,\s]+),", text))
    assert inside == {("0", "/opt/venv/bin/python3"), ("1", "/opt/venv/bin/python3")}, text[-3000:]
    assert ranks_seen(text) == {"1/2", "2/2"}  # SLURM_* reached Lightning inside the containers


def test_fake_gpu_without_cuda_fails_fast(cluster, dr5_catalog, tmp_path):
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True).stdout
    if "gpu" not in gres:
        pytest.skip("the cluster has no (fake) GPUs: SLURM_CI_GPUS=2 bash tests/slurm/cluster-up.sh")
    config = tmp_path / "gpu.yaml"
    config.write_text(
        f"save_dir: {tmp_path / 'run'}\nschema: gz_decals_dr5\ncatalog: {dr5_catalog}\ngpus: 1\n"
        "num_workers: 0\nslurm:\n  time: '10:00'\n  mem: 2G\n"
    )
    start = time.monotonic()
    job_id = sbatch_rendered(config)
    log = tmp_path / f"gpu-{job_id}.out"
    state = wait_job(job_id, 120, log)
    text = log.read_text()
    assert state == "FAILED", text
    assert "CUDA_VISIBLE_DEVICES=0), but CUDA cannot use any of them" in text
    assert "srun nvidia-smi" in text and "Traceback" not in text
    assert time.monotonic() - start < 90


def test_mismatched_spec_refused_before_submission(cluster, dr5_catalog, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        f"save_dir: {tmp_path / 'run'}\nschema: gz_decals_dr5\ncatalog: {dr5_catalog}\ngpus: 2\n"
        "slurm:\n  extra_sbatch: ['--ntasks-per-node=1']\n"
    )
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    out = subprocess.run(
        [sys.executable, "-m", "zoobot_hpc", "submit", "--executor", "sbatch", "--config", str(config)],
        env=job_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--ntasks-per-node" in out.stderr and "must equal the devices per node" in out.stderr
    from zoobot_hpc import launch
    from zoobot_hpc.hardware import HardwareError

    with pytest.raises(HardwareError, match="must equal the devices per node"):
        launch.train(config, executor="slurm")
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before)


def test_sbatch_override_of_ntasks_fails_at_job_start(cluster, dr5_catalog):
    """`sbatch --ntasks-per-node=1 jobs/train_dr5.sh` would freeze DDP; the job stops with why."""
    env = job_env(ZOOBOT_CATALOG=str(dr5_catalog), ZOOBOT_SET=TINY)
    job_id = sbatch("--ntasks-per-node=1", "jobs/train_dr5.sh", env=env)
    log = ROOT / "jobs" / "logs" / f"train_dr5-{job_id}.out"
    state = wait_job(job_id, 90, log)
    text = log.read_text()
    assert state == "FAILED", text
    assert "--ntasks-per-node=1 but the spec has 2 device(s) per node" in text


def test_submitting_from_inside_a_job_does_not_leak(cluster, tmp_path):
    """A job that submits a job: the child sees its own allocation, not the parent's."""
    child = tmp_path / "child.sh"
    child.write_text(
        f"#!/bin/bash\n#SBATCH --ntasks=1 --output={tmp_path}/child-%j.out\necho CHILD_NTASKS=$SLURM_NTASKS\n"
    )
    code = f"from zoobot_hpc.slurm import sbatch; print('CHILD', sbatch({str(child)!r}))"
    parent = sbatch(
        "--ntasks-per-node=3",
        f"--output={tmp_path}/parent-%j.out",
        f'--wrap={sys.executable} -c "{code}"',
    )
    log = tmp_path / f"parent-{parent}.out"
    text = assert_completed(parent, log, timeout=60)
    child_id = re.search(r"CHILD (\d+)", text).group(1)
    child_text = assert_completed(child_id, tmp_path / f"child-{child_id}.out", timeout=60)
    assert "CHILD_NTASKS=1" in child_text


def test_pinned_submission_drops_the_shells_run_overrides(cluster, tmp_path):
    """`zoobot-hpc submit` bakes the config into the job: a ZOOBOT_SAVE_DIR or ZOOBOT_SET left exported
    from an earlier run must not redirect it; other variables (ZOOBOT_BIND, ...) still pass."""
    from zoobot_hpc.slurm import sbatch as submit

    script = tmp_path / "env.sh"
    script.write_text(
        f"#!/bin/bash\n#SBATCH --ntasks=1 --output={tmp_path}/env-%j.out\nenv | grep ^ZOOBOT_\n"
    )
    shell = {"ZOOBOT_SAVE_DIR": "/old/run", "ZOOBOT_SET": "epochs=1", "ZOOBOT_BIND": "/data"}
    pinned = submit(script, env=shell, pinned=True)
    free = submit(script, env=shell)
    pinned_env = assert_completed(pinned, tmp_path / f"env-{pinned}.out", timeout=60)
    free_env = assert_completed(free, tmp_path / f"env-{free}.out", timeout=60)
    assert "ZOOBOT_BIND=/data" in pinned_env and "ZOOBOT_SAVE_DIR" not in pinned_env
    assert "ZOOBOT_SET" not in pinned_env
    assert "ZOOBOT_SAVE_DIR=/old/run" in free_env  # what a plain `sbatch jobs/train_dr5.sh` is meant to see


def _prediction_available() -> str | None:
    try:
        from zoobot_hpc import prediction

        if not hasattr(prediction, "merge_parts"):
            return "zoobot_hpc.prediction has no merge_parts yet"
    except ImportError as err:
        return f"zoobot_hpc.prediction is not available yet ({err})"
    return None


def test_prediction_job_array_and_merge(dr5_run, dr5_catalog, tmp_path):
    problem = _prediction_available()
    if problem:
        pytest.skip(problem)
    best = sorted((dr5_run["save_dir"] / "checkpoints").glob("epoch=*.ckpt"))[-1]
    output = tmp_path / "predictions.parquet"
    env = job_env(
        ZOOBOT_CHECKPOINT=str(best),
        ZOOBOT_IMAGES=str(dr5_catalog),
        ZOOBOT_PREDICTIONS=str(tmp_path / "parts"),
        ZOOBOT_OUTPUT=str(output),
        ZOOBOT_SHARDS="3",
        ZOOBOT_N_SAMPLES="2",
        ZOOBOT_GPUS="0",
        ZOOBOT_NUM_WORKERS="0",
    )
    out = subprocess.run(["bash", "jobs/predict_array.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    array_id, merge_id = out.stdout.strip().splitlines()[-1].split()
    tasks = subprocess.run(["scontrol", "show", "job", "-o", array_id], capture_output=True, text=True).stdout
    assert tasks and "gpu:1" not in tasks, tasks  # ZOOBOT_GPUS=0 replaced the script's --gpus-per-node=1
    log = ROOT / "jobs" / "logs" / f"predict_array-merge-{merge_id}.out"
    assert_completed(merge_id, log, timeout=240)
    assert len(list((tmp_path / "parts").glob("part-*-of-*.parquet"))) == 3
    merged = pd.read_parquet(output)
    assert set(merged["id_str"]) == set(pd.read_csv(dr5_catalog)["id_str"])


def test_submitit_prediction_map_array(dr5_run, dr5_catalog, tmp_path):
    problem = _prediction_available()
    if problem:
        pytest.skip(problem)
    from zoobot_hpc import launch
    from zoobot_hpc.hardware import HardwareSpec

    best = sorted((dr5_run["save_dir"] / "checkpoints").glob("epoch=*.ckpt"))[-1]
    output = tmp_path / "merged.parquet"
    jobs = launch.predict(
        best,
        dr5_catalog,
        tmp_path / "parts",
        num_shards=3,
        spec=HardwareSpec(gpus=0, num_workers=0, time="10:00", mem="2G"),
        output=output,
        n_samples=2,
    )
    assert len(jobs) == 3
    merged = pd.read_parquet(output)
    assert len(merged) == len(pd.read_csv(dr5_catalog))
