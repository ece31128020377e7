#!/usr/bin/env python3
"""Runs the Python client example against a fresh identity server: what CI calls.

    python3 examples/python/run.py        # from the repository root

1. creates examples/python/.venv (reused when present) and installs
   requirements.txt into it (skipped while the file is unchanged);
2. generates the gRPC stubs from proto/ into examples/python/generated;
3. starts `${IDENTITY_BIN:-target/debug/identity} serve` with a fresh
   DATA_DIR and KEYS_DIR, LISTEN_ADDR=127.0.0.1:0 and JSON logs, and waits
   for its "identity ready" log line, which carries the address;
4. runs client.py against it;
5. creates a superuser with `identity createsuperuser` (beside the running
   server, on its embedded cluster) and runs `watch.py --check` as it: the
   change feed watcher sees the changes it makes;
6. stops the server with SIGTERM and checks it exits with 0.

Exits non-zero on any failure, printing the server's last log lines.
Standard library only: it runs on the system python3 (3.8 or newer).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV = HERE / ".venv"
GENERATED = HERE / "generated"
REQUIREMENTS = HERE / "requirements.txt"
PROTO_ROOT = REPO / "proto"

READY_TIMEOUT = 180  # s: first start runs initdb and migrations; a slow CI box may be busy
CLIENT_TIMEOUT = 300  # s
STOP_TIMEOUT = 90  # s: SHUTDOWN_GRACE (30 s) plus stopping the embedded PostgreSQL
LOG_TAIL = 40  # server lines shown on failure
SUPERUSER = "watcher-admin"  # created for watch.py --check


class Failure(Exception):
    pass


def say(message: str) -> None:
    print(f"[run.py] {message}", flush=True)


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv() -> None:
    """Creates .venv when missing; installs requirements.txt when it changed since the last install."""
    python = venv_python()
    if not python.exists():
        say(f"creating {VENV.relative_to(REPO)}")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    stamp = VENV / ".requirements.sha256"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == digest:
        say("requirements already installed")
        return
    say("installing requirements.txt")
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
         "-r", str(REQUIREMENTS)],
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise Failure(f"pip install failed with exit code {result.returncode}")
    stamp.write_text(digest + "\n")


def generate_stubs() -> None:
    """python -m grpc_tools.protoc -I proto --python_out --grpc_python_out (into a fresh folder)."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("identity/v1/*.proto"))
    if not protos:
        raise Failure(f"no .proto files under {PROTO_ROOT}/identity/v1")
    staging = Path(tempfile.mkdtemp(prefix="generated.", dir=HERE))
    try:
        # grpc_tools ships google/protobuf/*.proto and adds them to the include path itself.
        result = subprocess.run(
            [str(venv_python()), "-m", "grpc_tools.protoc", "-I", str(PROTO_ROOT),
             f"--python_out={staging}", f"--pyi_out={staging}", f"--grpc_python_out={staging}",
             *protos],
            cwd=PROTO_ROOT, stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise Failure(f"protoc failed with exit code {result.returncode}")
        staging.chmod(0o755)  # mkdtemp made it 0700
        shutil.rmtree(GENERATED, ignore_errors=True)
        staging.rename(GENERATED)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"generated stubs for {', '.join(protos)} in {GENERATED.relative_to(REPO)}")


class Server:
    """`identity serve` as a child process, its log read by a thread from start to exit."""

    def __init__(self, binary: Path):
        self.binary = binary
        self.tmp = Path(tempfile.mkdtemp(prefix="identity-example-"))
        # The embedded PostgreSQL runs as the `postgres` user when we are root:
        # it must be able to pass through this folder (not list it).
        self.tmp.chmod(0o711)
        self.data_dir = self.tmp / "data"
        self.data_dir.mkdir()
        self.data_dir.chmod(0o711)  # whatever the umask
        self.keys_dir = self.tmp / "keys"
        self.keys_dir.mkdir(mode=0o700)
        self.log = collections.deque(maxlen=LOG_TAIL)
        self.addr: str | None = None
        self.ready_or_gone = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None

    def env(self) -> dict:
        """The server's environment; admin commands run with it too."""
        env = dict(os.environ)
        # A fresh embedded cluster and fresh keys, whatever the caller's shell has.
        for name in ("DATABASE_URL", "TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA", "IDENTITY_PASSWORD"):
            env.pop(name, None)
        env.update(
            DATA_DIR=str(self.data_dir),
            KEYS_DIR=str(self.keys_dir),
            LISTEN_ADDR="127.0.0.1:0",
            LOG_FORMAT="json",
            ALLOW_REGISTRATION="true",
        )
        return env

    def create_superuser(self, username: str, password: str) -> None:
        """`identity createsuperuser` beside the running server (it uses the server's cluster)."""
        env = self.env()
        env["IDENTITY_PASSWORD"] = password  # never on the command line
        result = subprocess.run(
            [str(self.binary), "createsuperuser", "--username", username,
             "--email", f"{username}@example.com"],
            cwd=self.tmp, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=CLIENT_TIMEOUT,
        )
        if result.returncode != 0:
            raise Failure(f"createsuperuser exited with {result.returncode}: {result.stdout.strip()}")

    def start(self) -> str:
        env = self.env()
        say(f"starting {self.binary} serve (DATA_DIR and KEYS_DIR under {self.tmp})")
        self.proc = subprocess.Popen(
            [str(self.binary), "serve"],
            cwd=self.tmp, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # logs go to stderr; keep both
            text=True, encoding="utf-8", errors="replace", bufsize=1,
        )
        self.reader = threading.Thread(target=self._drain, name="server-log", daemon=True)
        self.reader.start()
        # Woken by the reader: at the ready line, or when the log ends (the server died).
        if not self.ready_or_gone.wait(READY_TIMEOUT):
            raise Failure(f"the server did not log 'identity ready' within {READY_TIMEOUT}s")
        if self.addr is None:
            raise Failure(f"the server exited before it was ready (exit code {self.proc.wait()})")
        return self.addr

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.log.append(line)
            if self.addr is None:
                self.addr = ready_address(line)
                if self.addr is not None:
                    self.ready_or_gone.set()
        self.ready_or_gone.set()

    def stop(self) -> int:
        """SIGTERM, then the exit code (SIGKILL if it does not exit in time)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise Failure(f"the server did not exit within {STOP_TIMEOUT}s of SIGTERM; killed it")
        finally:
            if self.reader is not None:
                self.reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop()
            except Failure as e:
                say(str(e))

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def print_log_tail(self) -> None:
        print(f"--- last {len(self.log)} server log lines ---", file=sys.stderr)
        for line in self.log:
            print(line, file=sys.stderr)
        print("---", file=sys.stderr, flush=True)


def ready_address(line: str) -> str | None:
    """The listen address from the JSON log line {"fields": {"message": "identity ready", ...}}."""
    if not line.startswith("{"):
        return None
    try:
        fields = json.loads(line).get("fields", {})
    except ValueError:
        return None
    if isinstance(fields, dict) and fields.get("message") == "identity ready":
        return str(fields.get("listen_addr") or "") or None
    return None


def main() -> int:
    started = time.monotonic()
    binary = Path(os.environ.get("IDENTITY_BIN", "target/debug/identity"))
    if not binary.is_absolute():
        binary = REPO / binary
    server = None
    try:
        if not os.access(binary, os.X_OK):
            raise Failure(f"no server binary at {binary}: build it first (cargo build, or cargo test), "
                          "or point IDENTITY_BIN at one")
        ensure_venv()
        generate_stubs()
        say(f"environment ready after {time.monotonic() - started:.1f}s")
        server = Server(binary)
        booting = time.monotonic()
        addr = server.start()
        say(f"server ready on {addr} in {time.monotonic() - booting:.1f}s")
        client = subprocess.run([str(venv_python()), str(HERE / "client.py"), addr],
                                stdin=subprocess.DEVNULL, timeout=CLIENT_TIMEOUT)
        if client.returncode != 0:
            raise Failure(f"client.py exited with {client.returncode}")
        password = secrets.token_urlsafe(24)
        server.create_superuser(SUPERUSER, password)
        say(f"created superuser {SUPERUSER}; running watch.py --check")
        watcher = subprocess.run([str(venv_python()), str(HERE / "watch.py"), "--check",
                                  "--username", SUPERUSER, addr],
                                 env={**os.environ, "IDENTITY_PASSWORD": password},
                                 stdin=subprocess.DEVNULL, timeout=CLIENT_TIMEOUT)
        if watcher.returncode != 0:
            raise Failure(f"watch.py --check exited with {watcher.returncode}")
        code = server.stop()
        if code != 0:
            raise Failure(f"the server exited with {code} after SIGTERM (expected 0)")
        say("server stopped cleanly (exit 0)")
    except (Failure, subprocess.TimeoutExpired, OSError) as e:
        say(f"FAILED: {e}")
        if server is not None:
            server.kill()
            server.print_log_tail()
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        if server is not None:
            server.kill()
        return 130
    finally:
        if server is not None:
            server.cleanup()
    say(f"passed in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
