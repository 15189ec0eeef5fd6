#!/usr/bin/env python3
# Run: noa spawn --name echo --restart permanent -- python3 examples/agents/echo.py
"""An echo agent speaking NOA agent protocol v0 (docs/specs/agent-protocol.md), standard library only.

The kernel writes newline-delimited JSON-RPC 2.0 to our stdin; we answer on stdout. Everything we print
to stderr is our log (`noa logs echo`). Every request that reaches our inbox (agent.<name>.inbox) is
answered with the data it carried, so `noa req agent.echo.inbox '{"text":"hi"}'` prints {"text": "hi"}.
"""
import json
import os
import sys


def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def log(text):
    print(text, file=sys.stderr, flush=True)


def main():
    name = "?"
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            log(f"ignoring a line that is not JSON: {line[:80]!r}")
            continue
        method = message.get("method")
        request_id = message.get("id")
        params = message.get("params") or {}
        if method == "initialize":
            name = params.get("name", "?")
            send({"jsonrpc": "2.0", "id": request_id, "result": {"agent": "echo", "version": "0.1.0"}})
            log(f"echo agent {name!r} ready (os pid {os.getpid()}, inbox {params.get('inbox')})")
        elif method == "message":
            # A request carries an id and wants a result; a plain publish is a notification.
            data = params["data"] if "data" in params else params.get("text")
            if request_id is not None:
                send({"jsonrpc": "2.0", "id": request_id, "result": data})
        elif method == "shutdown":
            send({"jsonrpc": "2.0", "id": request_id, "result": {}})
            log(f"echo agent {name!r} shutting down")
            return
        elif method is None:
            pass  # a response to a request of ours; this agent makes none
        elif request_id is not None:
            send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": f"unknown method {method}"}})


if __name__ == "__main__":
    main()
