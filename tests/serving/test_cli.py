"""`v4d serve examples/local-tiny.yaml` as a user runs it: answers, then exits cleanly on SIGTERM + SIGINT."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from v4d.operator.cli import main

ROOT = Path(__file__).resolve().parents[2]
PORT = 8160


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc): the Ray processes `v4d serve` started."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(p)
    return alive


@pytest.mark.ray
def test_v4d_serve_answers_and_exits_cleanly_on_sigint(cache_dir):
    env = {**os.environ, "V4D_CACHE": str(cache_dir)}
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "v4d"),
            "serve",
            str(ROOT / "examples/local-tiny.yaml"),
            "--port",
            str(PORT),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines: list[str] = []
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        out = "".join(lines)
        assert f"http://127.0.0.1:{PORT}/v1" in out, out
        metrics = re.findall(r"http://127\.0\.0\.1:\d+/metrics", out)
        assert metrics, out
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="v4-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens == 4
        assert "ray_" in httpx.get(metrics[0], timeout=10).text
        ray_pids = _descendants(proc.pid)
        assert len(ray_pids) >= 3, "expected gcs, raylets and workers under v4d serve"
    finally:
        # a supervisor's SIGTERM and a Ctrl-C back to back: both are v4d's to handle (ray.init installs a
        # SIGTERM handler of its own that exits at once), the second means stop now, and the handler must
        # survive being re-entered
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    assert "stopped" in rest
    deadline = time.time() + 30
    while _alive(ray_pids) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive(ray_pids), "Ray processes left behind"


def test_v4d_serve_names_a_taken_port_before_starting_anything(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:  # the pool "npu"'s metrics port (head first, then gpu, npu): refused at once, Ray never started
        out = CliRunner().invoke(main, ["serve", str(ROOT / "examples/local-tiny.yaml"), "--port", str(port - 3)])
    finally:
        taken.close()
    assert out.exit_code == 1, out.output
    assert "port already in use on 127.0.0.1: " in out.stderr, out.stderr
    assert f"{port} (Ray metrics of pool npu)" in out.stderr, out.stderr
    assert "--port P serves the APIs on P and Ray's metrics on the 3 ports after it" in out.stderr
    assert "starting a local Ray cluster" not in out.output


def test_v4d_serve_refuses_weights_it_cannot_read_before_starting_anything(tmp_path):
    out = CliRunner().invoke(main, ["serve", str(ROOT / "examples/flash-h200.yaml"), "--port", "8170"])
    assert out.exit_code == 1, out.output  # a PVC exists only in the cluster
    assert "error: spec.model.weights.uri: 'pvc://deepseek-v4-flash/checkpoint' is mounted only in the" in out.stderr
    manifest = (
        (ROOT / "examples/flash-h200.yaml")
        .read_text()
        .replace("pvc://deepseek-v4-flash/checkpoint", f"file://{tmp_path}")
    )
    (tmp_path / "v4d.yaml").write_text(manifest)
    out = CliRunner().invoke(main, ["serve", str(tmp_path / "v4d.yaml"), "--port", "8170"])
    assert out.exit_code == 1, out.output
    assert f"no config.json in {tmp_path} (not a checkpoint directory)" in out.stderr
    assert "starting a local Ray cluster" not in out.output
