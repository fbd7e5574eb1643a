"""`v4d serve examples/local-tiny.yaml` as a user runs it: answers, then exits cleanly on SIGINT."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[2]
PORT = 8160


def _ray_processes() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "ray/core/src/ray/raylet/raylet|gcs_server"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def test_v4d_serve_answers_and_exits_cleanly_on_sigint(cache_dir):
    before = _ray_processes()
    env = {**os.environ, "V4D_CACHE": str(cache_dir)}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "v4d"), "serve", str(ROOT / "examples/local-tiny.yaml"), "--port", str(PORT)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
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
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    assert "stopped" in rest
    time.sleep(1)
    assert not (_ray_processes() - before), "Ray processes left behind"
