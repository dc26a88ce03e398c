"""HardwareSpec renders Trainer settings, #SBATCH lines and submitit parameters that agree; the
committed job scripts equal what `zoobot-hpc render` prints; pre-flight checks refuse bad jobs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from zoobot_hpc.config import hardware_spec, load_config
from zoobot_hpc.hardware import HardwareError, HardwareSpec, time_limit_seconds
from zoobot_hpc.slurm import clean_environment, render_predict_array, render_train_script

ROOT = Path(__file__).resolve().parents[1]
DR5_CONFIG = "jobs/configs/train_dr5.yaml"


def directives(spec: HardwareSpec) -> dict[str, str]:
    out = {}
    for line in spec.sbatch_directives(job_name="job"):
        key, _, value = line.lstrip("-").partition("=")
        out[key] = value
    return out


# ---------------------------------------------------------------- rendering
def test_one_node_two_gpus():
    spec = HardwareSpec(nodes=1, gpus=2, num_workers=4, mem="64G", partition="gpu")
    d = directives(spec)
    assert d["nodes"] == "1"
    assert d["ntasks-per-node"] == "2"  # one task per GPU: what Lightning's DDP expects
    assert d["gpus-per-node"] == "2"
    assert d["cpus-per-task"] == "5"
    assert d["mem"] == "64G"
    assert d["partition"] == "gpu"
    assert d["signal"] == "USR1@120"
    assert "requeue" in d and "no-requeue" not in d
    assert d["open-mode"] == "append"
    assert d["output"] == "logs/%x-%j.out"
    tk = spec.trainer_kwargs()
    assert (tk["devices"], tk["num_nodes"], tk["accelerator"]) == (2, 1, "gpu")
    assert type(tk["strategy"]).__name__ == "DDPStrategy"


def test_two_nodes_four_gpus():
    spec = HardwareSpec(nodes=2, gpus=4, num_workers=8, time="2-00:00:00")
    d = directives(spec)
    assert (d["nodes"], d["ntasks-per-node"], d["gpus-per-node"], d["cpus-per-task"]) == ("2", "4", "4", "9")
    assert d["time"] == "2-00:00:00"
    assert spec.world_size == 8
    tk = spec.trainer_kwargs()
    assert (tk["devices"], tk["num_nodes"]) == (4, 2)
    assert tk["strategy"]._process_group_backend == "nccl"
    params = spec.submitit_parameters()
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 4, 4)
    assert params["timeout_min"] == 2 * 24 * 60
    assert params["slurm_additional_parameters"]["signal"] == "USR1@120"  # one requeue owner


def test_cpu_ddp_spec_has_no_gpu_lines():
    spec = HardwareSpec(nodes=1, gpus=2, num_workers=0, accelerator="cpu", time="30:00")
    d = directives(spec)
    assert "gpus-per-node" not in d
    assert (d["ntasks-per-node"], d["cpus-per-task"]) == ("2", "1")
    assert int(d["signal"].split("@")[1]) < time_limit_seconds("30:00")
    tk = spec.trainer_kwargs()
    assert tk["accelerator"] == "cpu" and tk["strategy"]._process_group_backend == "gloo"
    assert "gpus_per_node" not in spec.submitit_parameters()


def test_plain_cpu_run_is_one_task():
    spec = HardwareSpec(gpus=0, num_workers=2)
    assert directives(spec)["ntasks-per-node"] == "1"
    assert spec.trainer_kwargs()["strategy"] == "auto"


@pytest.mark.parametrize(
    "spec",
    [
        HardwareSpec(nodes=1, gpus=2, num_workers=4),
        HardwareSpec(nodes=2, gpus=4, num_workers=8, partition="gpu", account="proj", qos="high"),
        HardwareSpec(nodes=1, gpus=2, num_workers=0, accelerator="cpu", container="img.sif"),
        HardwareSpec(gpus=1, num_workers=0, container="/img", container_runtime="charliecloud"),
    ],
    ids=["1x2", "2x4", "cpu", "charliecloud"],
)
def test_rendered_train_script(spec, tmp_path):
    script = render_train_script("cfg.yaml", spec, env={"NCCL_SOCKET_IFNAME": "ib0"}, job_name="run")
    for line in spec.sbatch_directives(job_name="run"):
        assert f"#SBATCH {line}\n" in script
    assert "srun --kill-on-bad-exit=1" in script
    assert "MASTER_ADDR=$(scontrol show hostnames" in script
    assert "export PYTHONFAULTHANDLER=" in script and "export NCCL_SOCKET_IFNAME=ib0" in script
    assert ("apptainer exec --nv" in script) == (spec.resolved_accelerator == "gpu")
    assert "29500" not in script  # never a hard-coded port
    if spec.container:
        assert f'IMAGE=${{ZOOBOT_IMAGE:-"{spec.container}"}}' in script
        assert f"RUNTIME=${{ZOOBOT_RUNTIME:-{spec.container_runtime}}}" in script
    # all #SBATCH lines come before the first command, or sbatch ignores them
    lines = script.splitlines()
    first_command = next(i for i, x in enumerate(lines) if x and not x.startswith("#"))
    assert max(i for i, x in enumerate(lines) if x.startswith("#SBATCH")) < first_command
    if shutil.which("shellcheck"):
        path = tmp_path / "job.sh"
        path.write_text(script)
        subprocess.run(["shellcheck", str(path)], check=True)


def test_unknown_container_runtime_is_refused():
    with pytest.raises(HardwareError, match="container_runtime='docker': use one of apptainer, charliecloud"):
        HardwareSpec(container="x", container_runtime="docker")


@pytest.mark.parametrize(
    ("spec", "channels_last"),
    [
        (HardwareSpec(gpus=0), True),  # the CPU: oneDNN works in NHWC
        (HardwareSpec(gpus=2, accelerator="cpu"), True),
        (HardwareSpec(gpus=2), False),  # full-precision GPU training stays contiguous
        (HardwareSpec(gpus=2, mixed_precision=True), True),  # tensor cores under AMP
    ],
)
def test_channels_last_auto_follows_the_hardware(spec, channels_last):
    assert spec.channels_last("auto") is channels_last
    assert spec.channels_last(True) is True and spec.channels_last(False) is False


def test_channels_last_must_be_true_false_or_auto():
    with pytest.raises(HardwareError, match="channels_last='yes please': use true, false or auto"):
        HardwareSpec(gpus=0).channels_last("yes please")


def test_predict_array_script():
    script = render_predict_array(HardwareSpec(gpus=1, num_workers=2), num_shards=5, log_dir="L")
    assert "#SBATCH --ntasks=1" in script and "ntasks-per-node" not in script
    assert "#SBATCH --gpus-per-node=1" in script
    assert "#SBATCH --output=L/%x-%A_%a.out" in script
    assert "--signal" not in script  # a shard has nothing to save mid-way; USR1 would only kill it early
    assert '--dependency="afterok:$array_id"' in script
    assert "SHARDS=${ZOOBOT_SHARDS:-5}" in script
    with pytest.raises(Exception, match="one node"):
        render_predict_array(HardwareSpec(nodes=2, gpus=1))


# ---------------------------------------------------------------- committed scripts do not drift
def _render_cli(capsys, *args: str) -> str:
    """`zoobot-hpc ARGS` in this process, from the repository root (relative paths as committed)."""
    from zoobot_hpc.cli import main

    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        capsys.readouterr()
        assert main(list(args)) == 0
        return capsys.readouterr().out
    finally:
        os.chdir(cwd)


def test_committed_train_script_matches_render(capsys):
    rendered = _render_cli(
        capsys,
        "render",
        "--config",
        DR5_CONFIG,
        "--log-dir",
        "jobs/logs",
        "--script-name",
        "jobs/train_dr5.sh",
    )
    committed = (ROOT / "jobs/train_dr5.sh").read_text()
    assert committed == rendered, (
        "jobs/train_dr5.sh drifted from its config/template; re-render with "
        "`zoobot-hpc render --config jobs/configs/train_dr5.yaml --log-dir jobs/logs "
        "--script-name jobs/train_dr5.sh -o jobs/train_dr5.sh`"
    )
    spec = hardware_spec(load_config(ROOT / DR5_CONFIG))
    assert (spec.nodes, spec.gpus) == (1, 2)  # the seed's defaults: 1 node x 2 GPUs, DDP


def test_committed_predict_script_matches_render(capsys):
    rendered = _render_cli(
        capsys,
        "render-predict",
        "--gpus",
        "1",
        "--job-name",
        "predict_array",
        "--log-dir",
        "jobs/logs",
        "--script-name",
        "jobs/predict_array.sh",
    )
    assert (ROOT / "jobs/predict_array.sh").read_text() == rendered, (
        "jobs/predict_array.sh drifted; re-render with `zoobot-hpc render-predict --gpus 1 "
        "--job-name predict_array --log-dir jobs/logs --script-name jobs/predict_array.sh "
        "-o jobs/predict_array.sh`"
    )


def test_committed_scripts_are_executable_bash():
    for name in ("train_dr5.sh", "predict_array.sh"):
        path = ROOT / "jobs" / name
        assert path.read_text().startswith("#!/bin/bash\n")
        subprocess.run(["bash", "-n", str(path)], check=True)


# ---------------------------------------------------------------- pre-flight: before submission
def test_ntasks_override_in_extra_sbatch_is_refused():
    spec = HardwareSpec(gpus=2, extra_sbatch=("--ntasks-per-node=1",))
    with pytest.raises(HardwareError, match=r"ntasks-per-node.*remove the line and set gpus"):
        spec.preflight()


def test_more_workers_than_node_cpus_is_refused():
    with pytest.raises(HardwareError, match=r"lower num_workers to at most 7"):
        HardwareSpec(gpus=4, num_workers=16).preflight(node_cpus=32)
    HardwareSpec(gpus=4, num_workers=7).preflight(node_cpus=32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"time": "forever"}, "time='forever'"),
        ({"mem": "lots"}, "mem='lots'"),
        ({"nodes": 2, "gpus": 0}, "multi-node"),
        ({"extra_sbatch": "--exclusive"}, "list of sbatch options"),
    ],
)
def test_bad_job_settings(kwargs, message):
    with pytest.raises(HardwareError, match=message):
        HardwareSpec(**kwargs)


def test_time_formats():
    assert time_limit_seconds("30") == 1800
    assert time_limit_seconds("10:30") == 630
    assert time_limit_seconds("24:00:00") == 86400
    assert time_limit_seconds("1-12") == 129600
    assert time_limit_seconds("1-00:30:00") == 88200


# ---------------------------------------------------------------- pre-flight: at job start
BATCH = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NTASKS": "2"}
STEP = {
    **BATCH,
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_NUM_NODES": "1",
}


def test_job_with_wrong_ntasks_per_node_is_refused():
    spec = HardwareSpec(gpus=2, num_workers=0, accelerator="cpu")
    spec.check_job(BATCH)
    with pytest.raises(HardwareError, match=r"--ntasks-per-node=1 .* must be equal"):
        spec.check_job({**BATCH, "SLURM_NTASKS_PER_NODE": "1", "SLURM_NTASKS": "1"})
    with pytest.raises(HardwareError, match=r"2 node\(s\) but the spec asks for nodes=1"):
        spec.check_job({**BATCH, "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "4"})


def test_step_world_size_must_match_spec():
    spec = HardwareSpec(nodes=2, gpus=2, num_workers=0, accelerator="cpu")
    with pytest.raises(HardwareError, match=r"runs 2 task\(s\) but the spec needs world size 4"):
        spec.check_job(STEP)
    HardwareSpec(gpus=2, num_workers=0, accelerator="cpu").check_job(STEP)


def test_distributed_run_without_srun_is_refused():
    spec = HardwareSpec(nodes=2, gpus=2, accelerator="cpu")
    with pytest.raises(HardwareError, match="without srun"):
        spec.check_launch(BATCH)
    spec.check_launch({**BATCH, "SLURM_STEP_ID": "0"})
    spec.check_launch({})  # not in Slurm: Lightning starts the ranks itself


def test_more_workers_than_allocated_cpus_is_refused():
    spec = HardwareSpec(gpus=2, num_workers=8, accelerator="cpu")
    with pytest.raises(HardwareError, match=r"num_workers=8 but each rank has 3 CPU"):
        spec.check_job({**STEP, "SLURM_CPUS_PER_TASK": "3"})


def test_gpus_requested_but_not_usable():
    spec = HardwareSpec(gpus=2, num_workers=0)
    env = {**STEP, "CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(HardwareError, match=r"CUDA_VISIBLE_DEVICES=0,1\), but CUDA cannot use any"):
        spec.check_job(env, cuda=(False, 0))
    with pytest.raises(HardwareError, match=r"sees 1 CUDA device"):
        spec.check_job(env, cuda=(True, 1))
    spec.check_job(env, cuda=(True, 2))
    # in the batch shell the (slow) CUDA probe runs only when asked for
    spec.check_job({**BATCH, "CUDA_VISIBLE_DEVICES": "0,1"}, cuda=(False, 0))
    with pytest.raises(HardwareError, match="cannot use any"):
        spec.check_job({**BATCH, "CUDA_VISIBLE_DEVICES": "0,1"}, cuda=(False, 0), gpus_in_batch_shell=True)


def test_no_checks_outside_slurm():
    HardwareSpec(nodes=2, gpus=8, num_workers=64).check_job({}, cuda=(False, 0))


def test_cluster_environment_only_in_a_step(monkeypatch):
    from lightning_fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    spec = HardwareSpec(gpus=2, num_workers=0, accelerator="cpu")
    for key in list(STEP):
        monkeypatch.delenv(key, raising=False)
    assert isinstance(spec.cluster_environment(), LightningEnvironment)
    for key, value in STEP.items():
        monkeypatch.setenv(key, value)
    env = spec.cluster_environment()
    assert isinstance(env, SLURMEnvironment) and not env.auto_requeue  # StopOnSignal owns requeue
    assert spec.requeue_signal() == signal.SIGUSR1


# ---------------------------------------------------------------- submitting from inside a job
def test_parent_job_environment_is_not_leaked():
    env = clean_environment({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", "SLURM_CONF": "/etc/x", "HOME": "/h"})
    assert env == {"SLURM_CONF": "/etc/x", "HOME": "/h"}


def test_cli_render_refuses_contradicting_config(tmp_path, capsys):
    from zoobot_hpc.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(
        "save_dir: out\nschema: gz_decals_dr5\ngpus: 2\nslurm:\n  extra_sbatch: ['--ntasks-per-node=1']\n"
    )
    assert main(["render", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "ntasks-per-node" in err and "Traceback" not in err


# ---------------------------------------------------------------- submitit on a laptop
@pytest.mark.slow
def test_launch_debug_executor_trains_in_process(tmp_path):
    """`launch.train(..., executor='debug')`: the same code path as Slurm, without a cluster."""
    from zoobot_hpc import launch
    from zoobot_hpc.demo import DEMO_SCHEMA, demo_catalog

    config = {
        "save_dir": str(tmp_path / "run"),
        "schema": DEMO_SCHEMA,
        "catalog": str(demo_catalog()),
        "gpus": 0,
        "num_workers": 0,
        "resize_size": 32,
        "batch_size": 16,
        "epochs": 1,
        "trainer_kwargs": {"limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 1},
        "slurm": {"time": "10:00"},
    }
    job = launch.train(config, executor="debug")
    result = launch.result(job)
    assert result["world_size"] == 1 and Path(result["best_checkpoint"]).is_file()
    with pytest.raises(Exception, match="needs 'slurm'"):
        launch.train({**config, "nodes": 2, "gpus": 1}, executor="local")


def test_node_cpus_reads_the_default_partition_unless_one_is_named():
    """Jobs without `partition` run in the default one: a small debug partition must not cap workers."""
    from zoobot_hpc.slurm import smallest_node

    sinfo = "gpu* 64\ngpu* 48+\ndebug 8\n"
    assert smallest_node(sinfo, default_only=True) == 48
    assert smallest_node(sinfo, default_only=False) == 8  # `sinfo -p NAME` lists only that partition
    assert smallest_node("debug 8\n", default_only=True) is None  # no default: no check


def test_submitit_jobs_get_the_job_scripts_environment(monkeypatch):
    """Like the rendered scripts: diagnostics are defaults the shell may override, `slurm.env` wins."""
    import faulthandler

    from zoobot_hpc import launch

    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    monkeypatch.delenv("PYTHONFAULTHANDLER", raising=False)
    was_enabled = faulthandler.is_enabled()
    try:
        launch._job_environment({"NCCL_SOCKET_IFNAME": "ib0"})
        assert os.environ["NCCL_DEBUG"] == "INFO"
        assert os.environ["NCCL_SOCKET_IFNAME"] == "ib0"
        assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert faulthandler.is_enabled()  # PYTHONFAULTHANDLER is read only at start-up
    finally:
        if not was_enabled:
            faulthandler.disable()


def test_a_slurm_time_written_without_quotes_stays_a_time(tmp_path):
    """YAML 1.1 (PyYAML's default) reads 20:00:00 as the base-60 integer 72000, which Slurm would take
    as 72000 minutes, and 0123 as the octal 83; configs and --set read both as written."""
    config = tmp_path / "cfg.yaml"
    config.write_text("save_dir: run\nschema: decals_rings\nslurm:\n  time: 20:00:00\n  account: 0123\n")
    loaded = load_config(config)
    assert loaded["slurm"] == {"time": "20:00:00", "account": "0123"}
    spec = hardware_spec(loaded)
    assert "--time=20:00:00" in spec.sbatch_directives() and "--account=0123" in spec.sbatch_directives()
    overridden = load_config(config, ["slurm.time=1:30:00", "epochs=12", "learning_rate=0.5"])
    assert overridden["slurm"]["time"] == "1:30:00"
    assert (overridden["epochs"], overridden["learning_rate"]) == (12, 0.5)


@pytest.mark.parametrize("setting", ["partition: on", "qos: no", "account: off"])
def test_a_name_that_yaml_reads_as_a_boolean_is_refused(tmp_path, setting):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"save_dir: run\nschema: decals_rings\nslurm:\n  {setting}\n")
    name = setting.split(":")[0]
    with pytest.raises(HardwareError, match=f"{name}=(True|False): a name, not a boolean.*quote it"):
        hardware_spec(load_config(config))
    quoted = setting.replace(": ", ": '") + "'"
    config.write_text(f"save_dir: run\nschema: decals_rings\nslurm:\n  {quoted}\n")
    value = setting.split(": ")[1]
    assert f"--{name}={value}" in hardware_spec(load_config(config)).sbatch_directives()
