"""The container pieces: apptainer.def's checker, the Dockerfile, `selftest`, and the built image.

Tests marked `docker` need a reachable Docker engine (DOCKER_HOST) with the image built (tag in
ZOOBOT_HPC_IMAGE, default zoobot-hpc:latest); they skip with the reason otherwise, and fail instead of
skipping when ZOOBOT_HPC_REQUIRE_DOCKER=1, which is how .ci/container.sh runs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TAG = "zoobot-hpc:latest"  # the documented tag, and the one CI builds


def _load_checker():
    spec = importlib.util.spec_from_file_location(
        "check_apptainer_def", ROOT / "scripts" / "check_apptainer_def.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


checker = _load_checker()

GOOD_DEF = """\
Bootstrap: docker-daemon
From: zoobot-hpc:latest

%environment
    export PYTHONNOUSERSITE=1

%runscript
    exec zoobot-hpc "$@"

%test
    zoobot-hpc selftest --train-step

%labels
    maintainer someone

%help
    Some help.
"""


def run_checker(tmp_path: Path, text: str, *args: str, capsys) -> tuple[int, str]:
    path = tmp_path / "test.def"
    path.write_text(text)
    status = checker.main([str(path), *args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


# -- apptainer.def and its checker -------------------------------------------------------------------


def test_checker_accepts_the_project_definition(capsys):
    status = checker.main([str(ROOT / "apptainer.def"), "--image", IMAGE_TAG])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "ok (Bootstrap: docker-daemon, From: zoobot-hpc:latest" in out


def test_checker_accepts_a_minimal_good_file(tmp_path, capsys):
    status, out = run_checker(tmp_path, GOOD_DEF, "--image", IMAGE_TAG, capsys=capsys)
    assert status == 0, out


def test_checker_accepts_docker_archive_and_header_comments(tmp_path, capsys):
    text = GOOD_DEF.replace(
        "Bootstrap: docker-daemon\nFrom: zoobot-hpc:latest",
        "# built from `docker save`\nbootstrap: docker-archive  # lower case is fine\nFrom: zoobot-hpc.tar",
    )
    status, out = run_checker(tmp_path, text, capsys=capsys)
    assert status == 0, out


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        ("From: zoobot-hpc:latest", "From: zoobot-hpc:old", 2, "is not the image the Dockerfile is built as"),
        ("Bootstrap: docker-daemon", "Bootstrap: docker", 1, "must be one of docker-daemon, docker-archive"),
        (
            "From: zoobot-hpc:latest",
            "Frm: zoobot-hpc:latest",
            2,
            "unknown header keyword 'frm' (did you mean 'From'?)",
        ),
        ("From: zoobot-hpc:latest\n", "", 1, "no 'From:' header"),
        ("From: zoobot-hpc:latest", "From: zoobot-hpc", 2, "docker-daemon needs NAME:TAG"),
        ("%labels", "%label", 13, "unknown section %label (did you mean '%labels'?)"),
        ("%labels", "%post\n    pip install x\n%labels", 13, "%post: this definition is a thin wrapper"),
        ("%test\n    zoobot-hpc selftest --train-step\n", "", 1, "the %test section is missing"),
        ("    zoobot-hpc selftest --train-step", "    # nothing", 10, "the %test section is empty"),
        ('exec zoobot-hpc "$@"', "exec zoobot-hpc", 7, 'does not pass its arguments on: use "$@"'),
        ("    maintainer someone", "    maintainer", 14, "label 'maintainer' has no value"),
        ("zoobot-hpc selftest --train-step", "if true; then echo", 10, "%test is not valid sh"),
        ("%help\n    Some help.", "%help\n    Some help.\n%help\n    More.", 18, "%help appears twice"),
        ("%help", "%apphelp\n    x\n%help", 16, "%apphelp needs an app name"),
        (
            "%help\n",
            "%help\nBootstrap: docker-daemon\n",
            17,
            "a second 'Bootstrap:' starts another build stage",
        ),
        ("Bootstrap: docker-daemon\n", "Bootstrap: docker-daemon\nStage one\n", 2, "is not 'Keyword: value'"),
    ],
)
def test_checker_rejects_bad_definitions(tmp_path, capsys, old, new, line, message):
    assert old in GOOD_DEF
    status, out = run_checker(tmp_path, GOOD_DEF.replace(old, new, 1), "--image", IMAGE_TAG, capsys=capsys)
    assert status == 1
    assert f"test.def:{line}: " in out and message in out, out


def test_checker_rejects_an_empty_file(tmp_path, capsys):
    status, out = run_checker(tmp_path, "# only a comment\n\n", capsys=capsys)
    assert status == 1
    assert "empty definition file" in out


def test_indented_percent_line_starts_a_section_as_in_apptainer(tmp_path, capsys):
    # Apptainer starts a new section at any line whose first word begins with '%', indented or not
    text = GOOD_DEF.replace("    Some help.", "    Some help.\n    %d percent")
    status, out = run_checker(tmp_path, text, capsys=capsys)
    assert status == 1
    assert "unknown section %d" in out


def test_section_extraction_prints_the_body(tmp_path, capsys):
    status, out = run_checker(tmp_path, GOOD_DEF, "--section", "runscript", capsys=capsys)
    assert status == 0
    assert out == '    exec zoobot-hpc "$@"\n'
    status, out = run_checker(tmp_path, GOOD_DEF, "--section", "%startscript", capsys=capsys)
    assert status == 1
    assert "no %startscript section" in out


def test_project_definition_runs_the_selftest_and_the_cli():
    definition = checker.parse((ROOT / "apptainer.def").read_text())
    assert "zoobot-hpc selftest --train-step" in definition.section("test").body
    assert 'exec zoobot-hpc "$@"' in definition.section("runscript").body
    assert "PYTHONNOUSERSITE=1" in definition.section("environment").body


# -- Dockerfile ---------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(ins.upper(), rest.strip()) for ins, _, rest in (x.strip().partition(" ") for x in logical)]


def test_dockerfile_has_the_required_pieces():
    text = (ROOT / "Dockerfile").read_text()
    instructions = dockerfile_instructions()
    names = [name for name, _ in instructions]
    assert not re.search(r"(?im)^#\s*syntax\s*=", text), "a syntax line makes BuildKit pull a frontend image"
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm")
    assert instructions[1] == ("FROM", "${BASE_IMAGE}")
    env = " ".join(rest for name, rest in instructions if name == "ENV")
    for setting in ("PYTHONNOUSERSITE=1", "PYTHONUNBUFFERED=1", "PATH=/opt/venv/bin:$PATH"):
        assert setting in env
    assert ("ENTRYPOINT", '["zoobot-hpc"]') in instructions
    runs = " ".join(rest for name, rest in instructions if name == "RUN")
    assert "-c /tmp/constraints.txt torch torchvision" in runs  # torch pinned by constraints.txt
    assert "pip install -c /tmp/src/constraints.txt /tmp/src" in runs  # the package from the context
    user = [rest for name, rest in instructions if name == "USER"]
    assert user and re.fullmatch(r"[1-9]\d*(:\d+)?", user[-1]), "the image must not run as root by default"
    assert names.index("USER") > max(i for i, n in enumerate(names) if n == "RUN")


def test_constraints_pin_torch_and_torchvision():
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert set(pins) >= {"torch", "torchvision"}


def test_dockerignore_keeps_data_and_outputs_out_of_the_context():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the context is an allowlist"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "constraints.txt", "zoobot_hpc"} <= allowed
    assert not allowed & {".git", ".venv", "data", "outputs", "runs"}


def test_hadolint_config_gives_a_reason_for_each_ignored_rule():
    text = (ROOT / ".hadolint.yaml").read_text()
    rules = re.findall(r"^\s*-\s*(DL\d+|SC\d+)", text, flags=re.M)
    assert rules
    for rule in rules:
        assert re.search(rf"#\s*{rule}\b.+", text), f"{rule} is ignored without a reason"


def test_documented_image_tag_is_the_one_apptainer_builds_from():
    definition = checker.parse((ROOT / "apptainer.def").read_text())
    assert definition.header["from"][0] == IMAGE_TAG
    docs = (ROOT / "README.md").read_text()
    assert f"docker build -t {IMAGE_TAG} ." in docs
    assert f"docker build -t {IMAGE_TAG} ." in (ROOT / "Dockerfile").read_text()
    assert f"IMAGE={IMAGE_TAG}" in (ROOT / ".ci" / "container.sh").read_text()


# -- selftest in-process --------------------------------------------------------------------------------


def test_selftest_runs_a_cpu_training_step(capsys, monkeypatch, tmp_path):
    from zoobot_hpc.cli import main

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    status = main(["selftest", "--train-step"])
    out = capsys.readouterr().out
    assert status == 0, out
    for name in ("torch", "gpus", "schemas", "demo data", "train step", "prediction"):
        assert re.search(rf"^  (ok|warn|skip) +{name} ", out, flags=re.M), out
    assert "CPU training step(s)" in out
    assert out.rstrip().endswith("selftest: OK")


def test_selftest_fails_clearly_when_gpus_are_requested_but_missing(capsys, monkeypatch):
    import torch

    from zoobot_hpc.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs; the failure path needs a machine without")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    status = main(["selftest", "--gpus", "2"])
    out = capsys.readouterr().out
    assert status == 1
    assert "2 GPU(s) requested but only 0 visible" in out
    assert "CUDA_VISIBLE_DEVICES=''" in out
    assert "selftest: FAILED: gpus" in out


def test_selftest_json_report(capsys):
    from zoobot_hpc.cli import main

    assert main(["selftest", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["torch"]["data"]["torch"].startswith(__import__("torch").__version__.split("+")[0])
    assert checks["gpus"]["data"]["requested"] == 0


def test_selftest_reports_the_slurm_step(capsys, monkeypatch):
    from zoobot_hpc.selftest import check_slurm

    for key, value in {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
    }.items():
        monkeypatch.setenv(key, value)
    result = check_slurm()
    assert "job 7 step 0: rank 1 of 2" in result.detail


# -- the built image ----------------------------------------------------------------------------------


def _docker() -> list[str]:
    client = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
    reason = None
    if client is None:
        reason = "no docker client installed"
    else:
        try:
            info = subprocess.run([client, "info"], capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            info = None
        if info is None or info.returncode != 0:
            reason = "no Docker engine reachable (set DOCKER_HOST; .ci/container.sh starts one)"
        elif subprocess.run([client, "image", "inspect", DOCKER_IMAGE], capture_output=True).returncode:
            reason = f"image {DOCKER_IMAGE} not built (bash .ci/container.sh builds it)"
    if reason:
        if os.environ.get("ZOOBOT_HPC_REQUIRE_DOCKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return [client]


DOCKER_IMAGE = os.environ.get("ZOOBOT_HPC_IMAGE", IMAGE_TAG)


@pytest.fixture(scope="module")
def docker() -> list[str]:
    return _docker()


def docker_run(
    docker: list[str], *args: str, options: tuple[str, ...] = (), entrypoint: str | None = None
) -> subprocess.CompletedProcess:
    command = [*docker, "run", "--rm", "--network=none", "--shm-size=1g", *options]
    if entrypoint:
        command += ["--entrypoint", entrypoint]
    return subprocess.run([*command, DOCKER_IMAGE, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.docker
def test_image_metadata(docker):
    config = json.loads(
        subprocess.run([*docker, "image", "inspect", DOCKER_IMAGE], capture_output=True, check=True).stdout
    )[0]["Config"]
    assert config["Entrypoint"] == ["zoobot-hpc"]
    assert {"PYTHONNOUSERSITE=1", "PYTHONUNBUFFERED=1"} <= set(config["Env"])
    assert config["User"] not in ("", "root", "0", "0:0")


@pytest.mark.docker
def test_image_has_the_pinned_torch_and_ignores_user_site(docker):
    pins = dict(
        line.strip().split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    code = (
        "import site, torch, torchvision; "
        "print(torch.__version__, torchvision.__version__, site.ENABLE_USER_SITE)"
    )
    result = docker_run(docker, "-c", code, entrypoint="python")
    assert result.returncode == 0, result.stderr
    torch_version, vision_version, user_site = result.stdout.split()
    assert torch_version.split("+")[0] == pins["torch"]
    assert vision_version.split("+")[0] == pins["torchvision"]
    assert user_site == "False"


@pytest.mark.docker
def test_image_runs_as_an_unknown_uid_without_warnings(docker):
    code = "import matplotlib.pyplot, torch, zoobot_hpc.training; print('imported')"
    result = docker_run(docker, "-c", code, options=("--user", "4321:4321"), entrypoint="python")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"
    assert "Matplotlib created a temporary cache directory" not in result.stderr
