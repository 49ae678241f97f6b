"""A receiver that costs little CPU: nginx answering 200, else a multi-process asyncio server."""

# `python -m bench.receiver --port N` runs the fallback server (the benchmark starts it).

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from bench import procs

HOST = "127.0.0.1"
NGINX_WORKERS = 1
PYTHON_PROCESSES = 2
MAX_LIFETIME_S = 4 * 3600
_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
_MAX_HEAD = 64 * 1024


@dataclass
class Receiver:
    """A running receiver: where to POST, what it is, and its process (for CPU and stopping)."""

    kind: str
    description: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def cpu_seconds(self) -> float | None:
        """CPU used so far by every process of the receiver."""
        return procs.cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL); safe to call twice."""
        procs.stop(self.proc, timeout=10)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def start_receiver(choice: str, workdir: Path, *, allow_install: bool) -> tuple[Receiver, str]:
    """Start the receiver `choice` (auto, nginx or python); returns it and a note on the choice."""
    note = ""
    if choice in ("auto", "nginx"):
        nginx = find_nginx()
        if nginx is None and allow_install:
            nginx, note = install_nginx(workdir / "apt.log")
        if nginx is not None:
            return _start_nginx(nginx, workdir), note
        if choice == "nginx":
            raise RuntimeError(f"nginx is not available {note}".strip())
        note = note or "nginx not found (not installing it in this mode)"
    return _start_python(workdir), note


def find_nginx() -> str | None:
    """The nginx binary on PATH or in /usr/sbin, if any."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def install_nginx(log_path: Path) -> tuple[str | None, str]:
    """Try Debian's nginx-light (then nginx) as root with apt-get; returns the binary and a note."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "nginx not found and apt-get is not usable here"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    attempts = [
        ["apt-get", "install", "-y", "-q", "nginx-light"],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "nginx-light"],
        ["apt-get", "install", "-y", "-q", "nginx"],
    ]
    with log_path.open("ab") as log:
        for argv in attempts:
            try:
                subprocess.run(
                    argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300, check=False
                )
            except (OSError, subprocess.TimeoutExpired):
                continue
            found = find_nginx()
            if found is not None:
                return found, "nginx installed with apt-get"
    return None, f"apt-get could not install nginx (see {log_path})"


def _nginx_conf(workdir: Path, port: int) -> str:
    user = ""
    if os.geteuid() == 0:
        try:
            nobody = pwd.getpwnam("nobody")
            user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
        except KeyError:
            user = "user root;"
    temp = "\n".join(
        f"    {kind}_temp_path {workdir}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
{user}
worker_processes {NGINX_WORKERS};
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{temp}
    client_body_buffer_size 1m;
    client_max_body_size 2m;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{
            return 200 "ok";
        }}
    }}
}}
"""


def _start_nginx(nginx: str, workdir: Path) -> Receiver:
    root = workdir / "nginx"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(_nginx_conf(root, port))
    version = subprocess.run(
        [nginx, "-v"], capture_output=True, text=True, timeout=10, check=False
    ).stderr.strip()
    log_path = root / "nginx.out"
    argv = [nginx, "-p", str(root), "-c", str(conf), "-e", str(root / "nginx-error.log")]
    proc = procs.spawn(argv, log_path=log_path)
    _wait_listening(proc, port, log_path)
    workers = "worker" if NGINX_WORKERS == 1 else "workers"
    description = f"{version.rpartition(' ')[2] or 'nginx'} ({NGINX_WORKERS} {workers})"
    return Receiver("nginx", description, f"http://{HOST}:{port}/hook", proc, log_path)


def _start_python(workdir: Path) -> Receiver:
    port = free_port()
    log_path = workdir / "receiver.out"
    argv = [sys.executable, "-m", "bench.receiver", "--port", str(port)]
    argv += ["--processes", str(PYTHON_PROCESSES)]
    proc = procs.spawn(argv, log_path=log_path)
    _wait_listening(proc, port, log_path)
    description = f"python asyncio server ({PYTHON_PROCESSES} processes, uvloop)"
    return Receiver("python", description, f"http://{HOST}:{port}/hook", proc, log_path)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"receiver exited with {proc.returncode}:\n{procs.log_tail(log_path)}"
            )
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    procs.stop(proc)
    raise RuntimeError(f"receiver not listening on {HOST}:{port} after 15s")


# The fallback server --------------------------------------------------------------------------


class RequestProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 keep-alive server side: frames each request by its Content-Length and
    writes what `answer` makes of its body (the whole response, as bytes)."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self._answer = answer
        self._buf = bytearray()
        self._body_at = -1
        self._end = -1
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        transport = self._transport
        assert transport is not None
        while True:
            if self._end < 0:
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    if len(buf) > _MAX_HEAD:
                        transport.close()
                    return
                length = _content_length(bytes(buf[:head_end]).lower())
                if length is None:
                    transport.close()  # chunked or malformed: not something we are sent
                    return
                self._body_at = head_end + 4
                self._end = self._body_at + length
            if len(buf) < self._end:
                return
            body = bytes(buf[self._body_at : self._end])
            del buf[: self._end]
            self._end = -1
            transport.write(self._answer(body))


def _ok(body: bytes) -> bytes:
    return _RESPONSE


def _content_length(head: bytes) -> int | None:
    if b"\r\ntransfer-encoding:" in head:
        return None
    name = b"\r\ncontent-length:"
    at = head.find(name)
    if at < 0:
        return 0
    start = at + len(name)
    end = head.find(b"\r\n", start)
    value = head[start:] if end < 0 else head[start:end]
    try:
        return int(value.strip())
    except ValueError:
        return None


async def _serve(sock: socket.socket, parent: int, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: RequestProtocol(_ok), sock=sock, backlog=4096)
    deadline = time.monotonic() + max_seconds
    # Bounded: stop on a signal, when orphaned, or after max_seconds, whichever comes first.
    while not stop.is_set() and os.getppid() == parent and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    server.close()


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of the fallback receiver process."""
    parser = argparse.ArgumentParser(prog="python -m bench.receiver")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=PYTHON_PROCESSES)
    parser.add_argument("--max-seconds", type=float, default=MAX_LIFETIME_S)
    args = parser.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, args.port))
    sock.listen(4096)
    sock.setblocking(False)
    children: list[int] = []
    for _ in range(max(0, args.processes - 1)):
        pid = os.fork()
        if pid == 0:
            procs.die_with_parent()
            _run(sock, os.getppid(), args.max_seconds)
            os._exit(0)
        children.append(pid)
    try:
        _run(sock, os.getppid(), args.max_seconds)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return 0


def _run(sock: socket.socket, parent: int, max_seconds: float) -> None:
    try:
        import uvloop

        uvloop.run(_serve(sock, parent, max_seconds))
    except ImportError:
        asyncio.run(_serve(sock, parent, max_seconds))


if __name__ == "__main__":
    raise SystemExit(serve_main())
