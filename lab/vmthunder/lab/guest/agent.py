"""Exec agent inside a lab guest: serves requests on the virtio-serial ports named vmt.exec.*.

Runs under the guest's /usr/bin/python3 (the host's, seen over 9p), stdlib only. One request at a
time per port; the host side locks a port per request, so ports give concurrency. Protocol: one
JSON object per line each way.

  {"id": "...", "op": "run", "cmd": "..." | [...], "timeout": 30, "stdin": b64, "env": {...}}
    -> {"id", "rc", "stdout": b64, "stderr": b64, "timed_out", "seconds"}
  {"id": "...", "op": "spawn", "cmd": ..., "log": "/path"}  -> {"id", "pid"}
  {"id": "...", "op": "ping"}                                -> {"id", "uptime"}
  {"id": "...", "op": "wait", "paths": [...], "timeout": 20}  -> {"id", "found": path | null}
Errors: {"id", "error": "..."}.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time

TYPE_CHECKING = False  # not from typing: importing it costs startup time under TCG

if TYPE_CHECKING:
    from typing import Any

PORT_PREFIX = "vmt.exec."
wakeups: list[threading.Event] = []


def find_ports() -> list[str]:
    ports = []
    base = "/sys/class/virtio-ports"
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(f"{base}/{entry}/name") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith(PORT_PREFIX):
            ports.append(f"/dev/{entry}")
    return ports


def b64(data: bytes | None) -> str:
    return base64.b64encode(data or b"").decode()


def _pump(pipe: Any, acc: list[bytes]) -> None:
    with contextlib.suppress(OSError, ValueError):
        while chunk := pipe.read1(1 << 16):
            acc.append(chunk)


def run(req: dict[str, Any]) -> dict[str, Any]:
    """Runs a command and answers, whatever it does: a command that leaves a daemon holding
    its stdout, or that sits in uninterruptible I/O after its timeout, must not wedge the port."""
    cmd = req["cmd"]
    env = dict(os.environ)
    env.update(req.get("env") or {})
    stdin = base64.b64decode(req["stdin"]) if req.get("stdin") else None
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        shell=isinstance(cmd, str),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=req.get("cwd") or "/",
        start_new_session=True,
    )
    out: list[bytes] = []
    err: list[bytes] = []
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, out), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, err), daemon=True),
    ]
    for t in pumps:
        t.start()
    if stdin is not None and proc.stdin is not None:

        def feed() -> None:
            with contextlib.suppress(OSError):
                proc.stdin.write(stdin)  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]

        threading.Thread(target=feed, daemon=True).start()
    timed_out = False
    try:
        proc.wait(timeout=req.get("timeout"))
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)  # a process in D state may not die: answer anyway
    for t in pumps:  # a daemon it started may hold the pipes open: don't wait for EOF
        t.join(timeout=2)
    rc = proc.returncode
    return {
        "rc": -9 if rc is None else rc,
        "stdout": b64(b"".join(out)),
        "stderr": b64(b"".join(err)),
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - t0, 3),
    }


def spawn(req: dict[str, Any]) -> dict[str, Any]:
    cmd = req["cmd"]
    env = dict(os.environ)
    env.update(req.get("env") or {})
    log = req.get("log") or "/dev/null"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            shell=isinstance(cmd, str),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=req.get("cwd") or "/",
            start_new_session=True,
        )
    # Reap it whenever it ends, so it does not stay a zombie (init reaps only orphans).
    threading.Thread(target=proc.wait, daemon=True).start()
    return {"pid": proc.pid}


def wait(req: dict[str, Any]) -> dict[str, Any]:
    """Until one of the paths exists: a stat each 0.2 s, where the host polling with `run`
    forked a shell and a cat in the guest each time."""
    deadline = time.monotonic() + float(req.get("timeout") or 0)
    while True:
        for path in req["paths"]:
            if os.path.exists(path):
                return {"found": path}
        if time.monotonic() >= deadline:
            return {"found": None}
        time.sleep(0.2)


def handle(line: bytes) -> dict[str, Any]:
    try:
        req = json.loads(line)
    except ValueError as e:
        return {"id": None, "error": f"bad request: {e}"}
    rid = req.get("id")
    try:
        op = req.get("op")
        if op == "run":
            res = run(req)
        elif op == "spawn":
            res = spawn(req)
        elif op == "wait":
            res = wait(req)
        elif op == "ping":
            with open("/proc/uptime") as f:
                res = {"uptime": float(f.read().split()[0])}
        else:
            res = {"error": f"unknown op {op!r}"}
    except Exception as e:  # report, never die: the host waits for an answer
        res = {"error": f"{type(e).__name__}: {e}"}
    res["id"] = rid
    return res


def write_all(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def serve(path: str, wake: threading.Event) -> None:
    fd = os.open(path, os.O_RDWR)
    # SIGIO tells us a host client connected: no polling while nobody is there.
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    buf = b""
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except OSError:
            data = b""
        if not data:  # no host client connected: drop any partial request, wait
            buf = b""
            wake.wait(2.0)
            wake.clear()
            continue
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                with contextlib.suppress(OSError):
                    write_all(fd, json.dumps(handle(line)).encode() + b"\n")


def main() -> None:
    ports = find_ports()
    if not ports:
        print("vmt-agent: no vmt.exec ports", flush=True)
        time.sleep(5)
        sys.exit(1)

    # SIGIO (a host client connected) must reach the main thread, which waits for it: a signal
    # that lands on a port thread would leave its Python handler pending until the next one.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})
    for p in ports:
        ev = threading.Event()
        wakeups.append(ev)
        threading.Thread(target=serve, args=(p, ev), daemon=True).start()
    with open("/proc/uptime") as f:
        up = f.read().split()[0]
    print(f"VMT-AGENT-READY {os.uname().nodename} uptime={up}", flush=True)
    while True:
        signal.sigwait({signal.SIGIO})
        for w in wakeups:
            w.set()


if __name__ == "__main__":
    main()
