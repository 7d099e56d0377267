"""A fork server for tests that start `python script.py ...` as separate processes.

Each such start would import torch, torchvision and open_clip again (4-10 s on a 2-core
machine, most of a tiny run). The server imports them once, then forks one child per call: the
child is a real separate process running the script (or `-m module`, or `-` for stdin) as
`__main__` with the caller's argv, working directory, environment, stdin/stdout/stderr, thread
count and file-size limit, and the caller exits with its exit status (or dies by its signal).
What the scripts do is unchanged; only the interpreter start is shared.

    with ForkServer(tmp_path) as python:   # an executable to use in place of sys.executable
        subprocess.run([python, "train.py", ...])

The caller is a small process that stands for the child: SIGINT, SIGTERM and SIGHUP sent to it
are forwarded, and when it is killed (kill -9) the server kills the child and reaps it before it
serves the next call, so the child is gone as a real process would be. Inside the child
`sys.executable` is the caller, so launchers such as torchrun fork their workers here too.
Options other than `-u` and `-m` exec the real interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "torchvision", "open_clip", "numpy", "scipy", "sklearn", "PIL", "yaml", "tqdm")

CLIENT = """#!{python} -S
import json, os, resource, signal, socket, struct, sys
arguments, unbuffered, module = sys.argv[1:], False, None
while arguments[:1] == ["-u"]:
    arguments, unbuffered = arguments[1:], True
if arguments[:1] == ["-m"] and len(arguments) > 1:
    module, arguments = arguments[1], arguments[2:]
elif arguments and arguments[0].startswith("-") and arguments[0] != "-":
    os.execv({python!r}, [{python!r}, *sys.argv[1:]])
request = json.dumps({{
    "argv": arguments, "module": module, "unbuffered": unbuffered, "cwd": os.getcwd(),
    "env": dict(os.environ), "executable": os.path.abspath(__file__),
    "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
}}).encode()
connection = socket.socket(socket.AF_UNIX)
connection.connect({address!r})
socket.send_fds(connection, [struct.pack("!I", len(request)) + request], [0, 1, 2])
def read(size):
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            sys.exit("fork server: gone before the child's exit status")
        data += chunk
    return struct.unpack("!i", data)[0]
child = read(4)
for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(number, lambda number, frame: os.kill(child, number))
status = read(4)
if status < 0 and -status != signal.SIGKILL:
    signal.signal(-status, signal.SIG_DFL)
if status < 0:
    os.kill(os.getpid(), -status)
sys.exit(status if status >= 0 else 128 - status)
"""


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    """The request (argv, cwd, env, ...) and the caller's fds 0-2."""
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    (size,) = struct.unpack("!I", message[:4])
    body = message[4:]
    while len(body) < size:
        body += connection.recv(size - len(body))
    return json.loads(body), fds


def _run(request: dict) -> int:
    """Become the caller's process (directory, environment, limits, argv) and run its code."""
    import resource
    import runpy
    import traceback

    import torch

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "OMP_NUM_THREADS" in os.environ:  # the OpenMP runtime read it when the server started
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, tuple(request["fsize"]))
    sys.executable = request["executable"]
    if request["unbuffered"]:
        sys.stdout.reconfigure(line_buffering=True, write_through=True)
        sys.stderr.reconfigure(line_buffering=True, write_through=True)
    argv = request["argv"]
    try:
        if request["module"]:
            sys.argv = ["-m", *argv]
            sys.path[0] = os.getcwd()
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        elif not argv or argv[0] == "-":
            sys.argv = ["-", *argv[1:]]
            sys.path[0] = ""
            code = compile(sys.stdin.read(), "<stdin>", "exec")
            exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(argv)
            sys.path[0] = str(Path(argv[0]).resolve().parent)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _peek(connection: socket.socket) -> bytes:
    """What a caller sent after its request: nothing but EOF (or a reset) when it died."""
    try:
        return connection.recv(1)
    except OSError:
        return b""


def _child(request: dict, fds: list[int], closing: list) -> None:
    """In the forked child: drop the server's files, take the caller's fds 0-2, run, exit."""
    import atexit

    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for item in closing:
        item.close()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    status = _run(request)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status & 0xFF)


def serve(address: str) -> None:
    """Import the heavy modules, then fork one child per connection until stdin closes."""
    import importlib
    import selectors

    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX)
    Path(address).unlink(missing_ok=True)
    listener.bind(address)
    listener.listen()
    wake_read, wake_write = socket.socketpair()
    wake_read.setblocking(False)
    wake_write.setblocking(False)
    signal.set_wakeup_fd(wake_write.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_read, selectors.EVENT_READ, "reap")
    selector.register(sys.stdin, selectors.EVENT_READ, "stop")
    children: dict[socket.socket, int] = {}  # caller's connection -> child's PID
    print("ready", flush=True)

    def finish(connection: socket.socket, status: int) -> None:
        selector.unregister(connection)
        del children[connection]
        try:
            connection.sendall(struct.pack("!i", status))
        except OSError:
            pass  # the caller is gone
        connection.close()

    while True:
        # Reaping and callers' deaths are handled before a new call is accepted, so a call made
        # after a caller was killed never sees that caller's child still running.
        order = {"stop": 0, "reap": 1, "caller": 2, "accept": 3}
        events = sorted(selector.select(), key=lambda event: order[event[0].data])
        for key, _ in events:
            if key.data == "stop":
                return
            if key.data == "reap":
                try:
                    while wake_read.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                for connection, pid in list(children.items()):
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        finish(connection, os.waitstatus_to_exitcode(status))
            elif key.data == "accept":
                connection, _ = listener.accept()
                request, fds = _receive(connection)
                pid = os.fork()
                if pid == 0:
                    inherited = [selector, listener, wake_read, wake_write, connection, *children]
                    _child(request, fds, inherited)
                for fd in fds:
                    os.close(fd)
                connection.sendall(struct.pack("!i", pid))
                children[connection] = pid
                selector.register(connection, selectors.EVENT_READ, "caller")
            elif key.fileobj in children and not _peek(key.fileobj):  # the caller died
                pid = children[key.fileobj]
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                finish(key.fileobj, os.waitstatus_to_exitcode(status))


class ForkServer:
    """Context manager: starts the server and writes its caller executable into `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def __enter__(self) -> Path:
        address = str(self.folder / "forkserver.sock")
        self.process = subprocess.Popen(
            [sys.executable, __file__, address],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the fork server did not start")
        client = self.folder / "python"
        client.write_text(CLIENT.format(python=sys.executable, address=address))
        client.chmod(0o755)
        return client

    def __exit__(self, *exc_info) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


if __name__ == "__main__":
    serve(sys.argv[1])
    os._exit(0)  # skip tearing down torch: nothing is left to flush
