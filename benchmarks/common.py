"""Shared helpers of the benchmarks: the peer's Python, a line-based JSON channel to a peer process,
interleaved repetitions and medians. Standard library only, so peer-side scripts import it too.

Every benchmark runs ours in this process and the peer (Zoobot + galaxy-datasets from PyPI, in its own
virtual environment made by `setup_peer.sh`) in a subprocess that waits for "go" messages, so the two
are timed in alternation, seconds apart, on the same machine state.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED_RINGS = Path(os.environ.get("ZOOBOT_SHARED_DATA", REPO.parent / "shared" / "data")) / "decals_rings"
PEER_VENV = Path(os.environ.get("PEER_VENV", HERE / ".peer-venv"))
PEER_PYTHON = PEER_VENV / "bin" / "python"
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/zoobot-hpc-bench"))


def peer_python() -> str:
    if not PEER_PYTHON.is_file():
        sys.exit(f"no peer venv at {PEER_VENV}: run `bash benchmarks/setup_peer.sh` first")
    return str(PEER_PYTHON)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


class Peer:
    """A peer-side script (`python peer_script.py`) that answers one JSON line per JSON line sent."""

    def __init__(self, script: str, config: dict, env: dict | None = None) -> None:
        full_env = {**os.environ, "PYTHONPATH": str(HERE), **(env or {})}
        full_env.pop("VIRTUAL_ENV", None)
        self.proc = subprocess.Popen(
            [peer_python(), str(HERE / script), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.ready = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"peer process ended (rc={self.proc.wait()}); see its stderr above")
            if line.startswith("@@"):  # our protocol lines; anything else the peer's libraries printed
                return json.loads(line[2:])

    def call(self, **message) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=120)


def serve(handlers: dict, ready: dict | None = None) -> None:
    """Peer side: answer {"cmd": name, ...} lines with handlers[name](**rest) until "quit"."""
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not break the protocol
    out.write("@@" + json.dumps(ready or {}) + "\n")
    out.flush()
    for line in sys.stdin:
        message = json.loads(line)
        cmd = message.pop("cmd")
        if cmd == "quit":
            break
        out.write("@@" + json.dumps(handlers[cmd](**message)) + "\n")
        out.flush()


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """min-max of the repetitions, for the noise of a shared machine."""
    return f"[{min(values):.4g}-{max(values):.4g}]"


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
