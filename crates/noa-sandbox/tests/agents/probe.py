#!/usr/bin/env python3
# A test agent for the sandbox tests: it does what each request asks, to exercise the protocol and the limits.
import json
import os
import subprocess
import sys
import time

MODE = sys.argv[1] if len(sys.argv) > 1 else "normal"
next_id = [1000]
waiting = {}


def send(m):
    sys.stdout.write(json.dumps(m) + "\n")
    sys.stdout.flush()


def call(method, params):
    """Calls the kernel and waits for the answer, buffering anything else that arrives meanwhile."""
    next_id[0] += 1
    my = next_id[0]
    send({"jsonrpc": "2.0", "id": my, "method": method, "params": params})
    backlog = []
    for line in sys.stdin:
        m = json.loads(line)
        if m.get("id") == my and "method" not in m:
            for b in backlog:
                handle(b)
            return m
        backlog.append(m)
    return None


def handle(m):
    method, mid, p = m.get("method"), m.get("id"), m.get("params") or {}
    if method == "initialize":
        if MODE == "no-init":
            return
        send({"jsonrpc": "2.0", "id": mid, "result": {}})
    elif method == "shutdown":
        if MODE == "hang":
            sys.stderr.write("ignoring shutdown\n")
            sys.stderr.flush()
            import signal
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        send({"jsonrpc": "2.0", "id": mid, "result": {}})
        sys.exit(0)
    elif method == "message":
        d = p.get("data") or {}
        cmd = d.get("cmd")
        result = None
        if cmd == "env":
            result = sorted(os.environ.keys())
        elif cmd == "call":
            result = call(d["method"], d["params"])
        elif cmd == "raw":
            for line in d["lines"]:
                sys.stdout.write(line + "\n")
            sys.stdout.flush()
            result = "sent"
        elif cmd == "alloc":
            blob = bytearray(d["mb"] * 1024 * 1024)
            result = len(blob)
        elif cmd == "spin":
            while True:
                pass
        elif cmd == "grandchild":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
            result = child.pid
        elif cmd == "publish_and_exit":
            # The last words of an agent: written, then gone without waiting for the answer.
            send({"jsonrpc": "2.0", "id": 1, "method": "publish", "params": {"subject": d["subject"], "data": "last words"}})
            os._exit(0)
        elif cmd == "flood_calls":
            # Calls the kernel without ever reading its answers (stdin is never read again).
            for i in range(d["n"]):
                send({"jsonrpc": "2.0", "id": 10_000 + i, "method": "log", "params": {"message": "x"}})
            time.sleep(60)
        elif cmd == "exit":
            sys.exit(d.get("code", 0))
        elif cmd == "stderr":
            for i in range(d["n"]):
                sys.stderr.write(f"line {i}\n")
            sys.stderr.flush()
            result = d["n"]
        else:
            result = d
        if mid is not None:
            send({"jsonrpc": "2.0", "id": mid, "result": result})


for line in sys.stdin:
    handle(json.loads(line))
