"""Shared by the serve tests: a tiny random-weight checkpoint with its own BPE tokenizer, a real
`moeflow serve` process on a free port, and small HTTP/SSE helpers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["def hello(name):\n    return 'hello ' + name\n",
         "The quick brown fox jumps over the lazy dog.",
         "import os\nimport sys\nprint(sys.argv)\n",
         "Ünïcödé text: naïve café, 東京, emoji 🎉 — done"] * 5
CONTEXT = 512
MODEL_VOCAB = 320   # larger than the tokenizer's 300: ids 300..319 are valid but unnamed


def tiny_config():
    from moeflow import ModelConfig

    return ModelConfig.from_name("tiny").replace(
        name="tiny-serve", vocab_size=MODEL_VOCAB, n_layers=2, d_model=64, n_heads=4,
        max_seq_len=CONTEXT, num_experts=(4,))


def tiny_tokenizer():
    from moeflow.data.tokenizer import BPETokenizer

    return BPETokenizer.train(TEXTS, vocab_size=300)


def save_training_checkpoint(run_dir: Path, seed: int = 0) -> Path:
    """A moeflow training run directory holding one checkpoint (weights, config, tokenizer)."""
    from moeflow import Transformer
    from moeflow.train.checkpoint import save_checkpoint
    from moeflow.train.run_config import TrainConfig

    torch.manual_seed(seed)
    cfg = tiny_config()
    model = Transformer(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(run_dir, 1, model=model, optimizers=[opt],
                    state={}, tokenizer=tiny_tokenizer(), model_config=cfg,
                    run_config=TrainConfig())
    return run_dir


class ServerProcess:
    """`python -m moeflow serve` in a subprocess; `url`, `get`, `post`, `stop`. `launch`: what
    runs the `moeflow` module (e.g. torchrun's `-m torch.distributed.run ... -m`). The server
    binds port 0 and the test reads the port it got from its start line: a port picked here and
    handed over could be taken by another test process in between."""

    def __init__(self, model_dir: Path, *args: str, name: str = "tiny",
                 launch: tuple[str, ...] = ("-m",)) -> None:
        self.port: int | None = None
        self.url = ""
        self.name = name
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "PYTHONUNBUFFERED": "1"}
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            "w+", dir=model_dir.parent, prefix="serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, *launch, "moeflow", "serve", "--model", str(model_dir), "--port",
             "0", "--served-model-name", name, *args],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if self.port is None:
                bound = re.search(r"^moeflow serve: .* on http://[^\s]*:(\d+)$", self.output(),
                                  re.MULTILINE)
                if bound:
                    self.port = int(bound.group(1))
                    self.url = f"http://127.0.0.1:{self.port}"
            else:
                try:
                    if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, body=None, content: bytes | None = None, **kw) -> httpx.Response:
        if content is None:
            content = json.dumps(body).encode()
        return httpx.post(self.url + path, content=content, timeout=60,
                          headers={"Content-Type": "application/json"}, **kw)

    def health(self) -> dict:
        return self.get("/health").json()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of metric `name` whose labels include `labels`."""
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, value = line.rsplit(" ", 1)
            metric, _, rest = key.partition("{")
            have = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",") if kv)
            have = {k: v.strip('"') for k, v in have.items()}
            if metric == name and all(have.get(k) == str(v) for k, v in labels.items()):
                total += float(value)
        return total

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def parse_sse(raw: str) -> list:
    """Events of an SSE body: parsed JSON objects, and the final "[DONE]" as a string.
    Asserts the framing: each event is one `data: ` line followed by a blank line."""
    assert raw.endswith("\n\n"), raw[-200:]
    events = []
    for block in raw[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def raw_request(port: int, path: str, body: bytes, headers: dict | None = None) -> socket.socket:
    """Send a POST on a plain socket (for framing httpx will not produce) and return it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = {"Host": "127.0.0.1", "Content-Type": "application/json",
            "Content-Length": str(len(body)), **(headers or {})}
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items() if v is not None)
    s.sendall(f"POST {path} HTTP/1.1\r\n{lines}\r\n".encode() + body)
    return s


def read_status(s: socket.socket) -> int:
    buf = b""
    while b"\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return int(buf.split(b" ", 2)[1])
