"""A fork server for the tests' command-line runs: ``python -m finetune.X ARGS`` without paying for the imports.

Every command starts with ~7 s of imports (torch, torchvision, Lightning, torchmetrics, Hydra) on a small CPU, and the
tests start the commands many times: most of the suite's time went there. This server imports those third-party
packages once, then forks one child per command. The child is a real process, with its own pid, pipes, environment,
working folder, signal handlers and exit status, that runs the module as ``python -m`` does (``runpy``, ``__main__``,
``sys.argv``, ``sys.path[0]`` the working folder, threads joined and ``atexit`` run at the end); only the
interpreter's start and the third-party imports are shared. ``finetune`` itself is imported fresh by every child (the
server never imports it), so no state of one run reaches the next. Processes a command starts itself (DDP ranks,
loader workers) start as they always do.

``FINETUNE_TEST_CLI=subprocess`` runs every command as a plain subprocess instead (``tests/conftest.py``).

Protocol (one ``AF_UNIX`` ``SOCK_SEQPACKET`` socket to the server): the client sends a JSON request (module, argv,
cwd, env) with three file descriptors: the write ends of the child's stdout and stderr pipes, and one end of a stream
socket on which the server answers ``<pid>\\n`` when the child starts and ``<wait status>\\n`` when it ends.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

# What every command imports before it does anything of its own (the server imports these, never finetune).
PRELOAD = ("numpy", "PIL.Image", "torch", "torchvision", "pytorch_lightning", "torchmetrics", "hydra", "omegaconf")


# --- the server ----------------------------------------------------------------------------------------------------


def serve(control: socket.socket) -> None:
    """Fork a child for each request until the client closes the control socket; report each child's exit."""
    for name in PRELOAD:
        __import__(name)
    status_of: dict[int, socket.socket] = {}
    while True:
        ready, _, _ = select.select([control], [], [], 0.05)
        _reap(status_of)
        if not ready:
            continue
        message, fds, _, _ = socket.recv_fds(control, 1 << 20, 3)
        if not message:
            break  # the client has gone: its children run on as orphans, as a subprocess would
        out, err, status_fd = fds
        pid = os.fork()
        if pid == 0:
            control.close()
            for other in status_of.values():
                other.close()
            os.close(status_fd)
            _run_child(json.loads(message), out, err)  # does not return
        os.close(out)
        os.close(err)
        status = socket.socket(fileno=status_fd)
        status.sendall(f"{pid}\n".encode())
        status_of[pid] = status


def _reap(status_of: dict[int, socket.socket]) -> None:
    while status_of:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status = status_of.pop(pid, None)
        if status is not None:
            try:
                status.sendall(f"{wait_status}\n".encode())
            except OSError:
                pass  # the client stopped waiting (it killed the child after a timeout)
            status.close()


def _run_child(request: dict, out: int, err: int) -> None:
    """Become ``python -m MODULE ARGS`` in ``cwd`` with ``env``, then exit as that interpreter would."""
    code = 1
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams, never closed
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = request["cwd"]  # python -m puts the working folder first
        sys.argv = [request["module"], *request["args"]]
        code = _exit_code_of(request["module"])
    except BaseException:  # noqa: BLE001 - the child must never return into the server's loop
        traceback.print_exc()
    finally:
        _finish()
        os._exit(code)


def _exit_code_of(module: str) -> int:
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as stop:
        if stop.code is None:
            return 0
        if isinstance(stop.code, int):
            return stop.code & 0xFF
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # die of SIGINT, as the interpreter does
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        return 1


def _finish() -> None:
    """What the interpreter does on its way out: join non-daemon threads, run ``atexit``, flush the streams."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


# --- the client ----------------------------------------------------------------------------------------------------


class CliServer:
    """One server per test process, started on first use; ``run`` is ``subprocess.run(..., capture_output=True,
    text=True, timeout=...)`` for ``python -m MODULE ARGS``."""

    def __init__(self, repo: Path, env: dict[str, str]) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_server", str(theirs.fileno())],
            cwd=repo,
            env=env,
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        atexit.register(self.close)

    def close(self) -> None:
        self.control.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def run(
        self, command: list[str], module: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        if self.process.poll() is not None:
            raise RuntimeError(f"the tests' command server exited ({self.process.returncode}); see its stderr above")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        request = {"module": module, "args": list(args), "cwd": str(cwd), "env": dict(env)}
        try:
            socket.send_fds(self.control, [json.dumps(request).encode()], [out_w, err_w, theirs.fileno()])
        finally:
            os.close(out_w)
            os.close(err_w)
            theirs.close()
        with mine, os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
            deadline = time.monotonic() + timeout
            answers = _Lines(mine)
            pid = int(answers.next(deadline, command, timeout))
            chunks: dict[int, list[bytes]] = {out.fileno(): [], err.fileno(): []}
            open_fds = set(chunks)
            try:
                while open_fds:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise subprocess.TimeoutExpired(command, timeout)
                    ready, _, _ = select.select(list(open_fds), [], [], left)
                    for fd in ready:
                        data = os.read(fd, 1 << 16)
                        if data:
                            chunks[fd].append(data)
                        else:
                            open_fds.discard(fd)
                wait_status = int(answers.next(deadline, command, timeout))
            except subprocess.TimeoutExpired:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                raise
            stdout, stderr = (b"".join(chunks[f.fileno()]).decode(errors="replace") for f in (out, err))
        return subprocess.CompletedProcess(command, os.waitstatus_to_exitcode(wait_status), stdout, stderr)


class _Lines:
    """Newline-ended answers on the status socket, each read before a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def next(self, deadline: float, command: list[str], timeout: float) -> str:
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(command, timeout)
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                data = self.sock.recv(4096)
                if not data:
                    raise RuntimeError("the tests' command server closed the status socket without an exit status")
                self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
