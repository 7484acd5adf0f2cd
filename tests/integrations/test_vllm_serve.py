"""The README's vLLM serve command, run as written (on a free port), answers an OpenAI-style
completion request through topkphi. Runs where vLLM is installed (``bash .ci/vllm``)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; its tests run in their own environment "
                                   "(bash .ci/vllm)")

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
STARTUP_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode()
    return json.loads(text) if text else {}


def test_the_readme_serve_command_answers_through_topkphi(tmp_path):
    block = re.search(r"<!-- vllm-serve -->\n```bash\n(.*?)\n```", README, re.S).group(1)
    assert "--attention-backend CUSTOM" in block and "--port 8000" in block
    port = _free_port()
    # the README's environment is activated: its `python` is this interpreter's
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(["bash", "-c", block.replace("--port 8000", f"--port {port}")], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                _get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start in time"
                time.sleep(2)
        model = _get(f"http://127.0.0.1:{port}/v1/models")["data"][0]["id"]
        reply = _get(f"http://127.0.0.1:{port}/v1/completions",
                     {"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
        assert "Paris" in reply["choices"][0]["text"]
        log.flush()
        text = (tmp_path / "server.log").read_text()
        assert "topkphi decodes with its torch backend" in text  # logged by the worker at its first decode
    finally:
        _stop(server)
        log.close()


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (bash, the API server, the engine), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
