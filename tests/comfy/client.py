"""A ComfyUI server started for the tests, and a small HTTP client for it (standard library only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVER_FLAGS = ("--cpu", "--disable-auto-launch", "--dont-print-server", "--preview-method", "none")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PromptError(AssertionError):
    """A prompt was refused (HTTP 400) or failed; ``body`` holds ComfyUI's answer."""

    def __init__(self, message: str, body: Any) -> None:
        super().__init__(message)
        self.body = body


@dataclass
class ComfyServer:
    """A running ``main.py`` process with its base directory and log."""

    root: Path
    base: Path
    port: int
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 180.0) -> "ComfyServer":
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), *SERVER_FLAGS, *self.extra_args]
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # ------------------------------------------------------------------ HTTP

    def get_json(self, path: str, *, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def get_bytes(self, path: str, *, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def post_prompt(self, prompt: dict[str, Any]) -> str:
        """POST /prompt; returns the prompt id, or raises :class:`PromptError` with ComfyUI's answer."""
        data = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode("utf-8")
        req = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read().decode("utf-8"))["prompt_id"]
        except urllib.error.HTTPError as e:
            body = json.loads(e.read().decode("utf-8") or "{}")
            raise PromptError(f"prompt refused ({e.code}): {json.dumps(body)[:2000]}", body) from e

    def free(self, *, settle: float = 3.0) -> None:
        """POST /free: unload every model and clear the node cache (the worker acts on it within a second when
        idle; ``settle`` seconds are waited for that), so the next prompt starts from an empty server."""
        data = json.dumps({"unload_models": True, "free_memory": True}).encode("utf-8")
        req = urllib.request.Request(self.url + "/free", data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30):
            pass
        time.sleep(settle)

    def wait(self, prompt_id: str, *, timeout: float = 600.0) -> dict[str, Any]:
        """Poll /history until the prompt finished; returns its history entry (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                hist = self.get_json(f"/history/{prompt_id}", timeout=60)
            except (TimeoutError, socket.timeout, urllib.error.URLError):
                continue  # the server can be slow to answer while it loads a big model
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("status_str") in ("success", "error")):
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log_tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict[str, Any], *, timeout: float = 600.0) -> dict[str, Any]:
        """Queue ``prompt`` and wait; raises with the error message and log tail when it failed."""
        entry = self.wait(self.post_prompt(prompt), timeout=timeout)
        if entry["status"]["status_str"] != "success":
            raise PromptError(f"prompt failed: {execution_error(entry)}\n{self.log_tail(30)}", entry)
        return entry

    def view(self, image: dict[str, str]) -> bytes:
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                        "type": image.get("type", "output")})
        return self.get_bytes(f"/view?{query}")


def execution_error(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The ``execution_error`` message of a history entry (node_type, exception_message, ...) or None."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def raised(err: dict[str, Any], cls: type[BaseException]) -> bool:
    """Whether an ``execution_error`` was raised as exactly the pack's ``cls`` (compared by class, not a name typed in).

    Over HTTP ComfyUI sends only ``exception_type``, the raised class's ``module.qualname``
    (``execution.full_type_name``). The server imports the pack under its folder's path, so its
    module ends with ours (``....hyperlora.errors``): the full name of ``cls`` must end the string,
    after a dot, and a renamed or moved class breaks this at import time, not silently.
    """
    name = f"{cls.__module__}.{cls.__qualname__}"
    return err["exception_type"] == name or err["exception_type"].endswith("." + name)
