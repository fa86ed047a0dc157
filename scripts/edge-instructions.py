#!/usr/bin/env python3
"""Instructions Envoy spends per request on one edge path, counted by callgrind.

wrk's requests/s swing by up to 30% between rounds on 2 shared cores; instruction counts do
not. This runs Envoy (1 worker) under `valgrind --tool=callgrind` from an Envoy template of
this repository, sends warm-up requests, zeroes the counters, sends the measured requests on
one keep-alive connection, and prints the whole process's instructions per request.

    python3 scripts/edge-instructions.py native            # Envoy's local_ratelimit (429)
    python3 scripts/edge-instructions.py fast               # the gate's sold-out route (409)
    python3 scripts/edge-instructions.py native fast --requests 2000
    python3 scripts/edge-instructions.py plain winner --connections 8

Each scenario is a template, its values and the request; see SCENARIOS. Needs valgrind, the
release wasm build (for the gate's template) and the debug or release syncer (for the routes).

`plain` and `winner` reach a stub shop, and `winner` a stub deduct endpoint that lets every
attempt win (both served by `seckill-edge-stubs`, outside callgrind; cargo build -p
seckill-bench --bin seckill-edge-stubs): what Envoy and the filter spend on a winner, apart
from the stock service. With one connection every winner is a callout of
its own; `--connections N` lets the filter batch up to N attempts per callout, as under load.
"""

import argparse
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The binary itself: .venv/bin/envoy is a Python launcher, which callgrind would measure.
VENV_ENVOY = next(iter(glob.glob(os.path.join(ROOT, ".venv", "lib", "python3*", "site-packages", "envoy", "_bin", "envoy"))), "envoy")

WASM = os.path.join(ROOT, "target", "wasm32-wasip1", "release", "seckill_filter.wasm")

# The stack's default plugin configuration (tests/src/stack.rs, default_plugin_config).
PLUGIN_CONFIG = {
    "route": {"methods": ["POST"], "path_template": "/seckill/{goods_id}/buy"},
    "goods_id": {"path": "goods_id"},
    "user_id": {"header": "x-user-id"},
    "quantity": {"source": {"query": "qty"}, "default": 1, "max": 5},
    "request_id": {"header": "x-request-id"},
    "deduct": {"cluster": "seckill_syncer", "timeout_ms": 10000, "secret_env": "SECKILL_EDGE_SECRET"},
    "rate_limit": {"default": {"per_second": 1000000.0, "burst": 1000000}},
    "sold_out_cache_ms": 60000,
}

# name: (template, expected status, runtime keys set through the admin API, request path)
SCENARIOS = {
    "native": ("bench/envoy/native-ratelimit.yaml", 429, {}, "/seckill/gone/buy"),
    "plain": ("bench/envoy/plain.yaml", 200, {}, "/seckill/win/buy"),
    "fast": ("envoy/local.yaml", 409, {"seckill.sold_out.gone": "100"}, "/seckill/gone/buy"),
    "winner": ("envoy/local.yaml", 200, {}, "/seckill/win/buy"),
}


class Stubs:
    """The shop (200 to anything) and the deduct endpoint (every attempt wins), served by
    `seckill-edge-stubs` (over HTTP/1.1 and h2c, as the templates' clusters need): Envoy's
    upstreams, outside what callgrind counts."""

    def __init__(self):
        self.process = subprocess.Popen([newest_build("seckill-edge-stubs", "seckill-bench")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ports = json.loads(self.process.stdout.readline() or "null")
        if not ports:
            sys.exit("seckill-edge-stubs did not start")
        self.shop, self.deduct = ports["shop"], ports["deduct"]

    def counters(self):
        """Deduct calls and the attempts they carried, so far."""
        self.process.stdin.write("counters\n")
        self.process.stdin.flush()
        counters = json.loads(self.process.stdout.readline())
        return counters["calls"], counters["attempts"]

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def newest_build(binary, package):
    # The newest build is the code as it is now (the syncer prints the routes it makes).
    builds = [os.path.join(ROOT, "target", profile, binary) for profile in ("release", "debug")]
    builds = [path for path in builds if os.path.exists(path)]
    if not builds:
        sys.exit(f"no {binary} build: cargo build -p {package} --bin {binary}")
    return max(builds, key=os.path.getmtime)


def render(template, values):
    with open(template if os.path.isabs(template) else os.path.join(ROOT, template)) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.search(r"\{\{[A-Z_]+\}\}", text)
    if left:
        sys.exit(f"{template}: no value for {left.group(0)}")
    return text


def values_for(name, ports, stubs, wasm):
    values = {
        "ADMIN_PORT": str(ports["admin"]),
        "LISTEN_PORT": str(ports["listen"]),
        "SHOP_PORT": str(stubs.shop),
        "SYNCER_PORT": str(stubs.deduct),
        "SHOP_TIMEOUT": "5s",
        "WASM_PATH": wasm,
        "PLUGIN_CONFIG": json.dumps(json.dumps(PLUGIN_CONFIG)),
        "FAST_ROUTES": "",
    }
    if name == "fast" or name.endswith(".yaml"):
        values["FAST_ROUTES"] = subprocess.run(
            [newest_build("seckill-syncer", "seckill-syncer"), "fast-path-routes", "--indent", "14", "--goods", "gone"],
            check=True, capture_output=True, text=True).stdout
    return values


def wait_for(what, deadline_s, probe):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        result = probe()
        if result is not None:
            return result
        time.sleep(0.2)  # the poll's interval; the deadline above bounds the wait
    sys.exit(f"timed out waiting for {what}")


def ready(admin):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as r:
            return True if r.status == 200 else None
    except OSError:
        return None


class Client:
    """One keep-alive HTTP/1.1 connection sending the benchmark's buy request."""

    def __init__(self, port, name=""):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buffer = b""
        self.count = 0
        self.name = name

    def request(self, path):
        self.count += 1
        body = b""
        buyer = f"{self.name}{self.count}"
        head = (f"POST {path} HTTP/1.1\r\nHost: gate\r\nx-user-id: u{buyer}\r\n"
                f"x-request-id: r{buyer}\r\ncontent-length: {len(body)}\r\n\r\n")
        self.sock.sendall(head.encode() + body)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(self.buffer) < length:
            self.buffer += self.recv()
        self.buffer = self.buffer[length:]
        return status

    def recv(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            sys.exit("Envoy closed the connection")
        return chunk


def send(port, path, requests, connections, name_prefix):
    """Sends `requests` requests spread over `connections` keep-alive connections, each
    waiting for its answer before the next; returns the count of each status."""
    statuses = {}
    lock = threading.Lock()

    def one_connection(index, count):
        client = Client(port, f"{name_prefix}c{index}-")
        for _ in range(count):
            status = client.request(path)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1

    shares = [requests // connections + (1 if i < requests % connections else 0)
              for i in range(connections)]
    threads = [threading.Thread(target=one_connection, args=(i, n)) for i, n in enumerate(shares)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def measure(name, requests, warmup, envoy, wasm, connections=1, keep=None):
    if name.endswith(".yaml"):
        # An ad hoc template (exploring a variant): the fast path's answer and runtime key.
        template, expected, runtime, path = (name,) + SCENARIOS["fast"][1:]
    else:
        template, expected, runtime, path = SCENARIOS[name]
    ports = {k: free_port() for k in ("admin", "listen")}
    stubs = Stubs()
    with tempfile.TemporaryDirectory() as scratch:
        config = os.path.join(scratch, "envoy.yaml")
        with open(config, "w") as f:
            f.write(render(template, values_for(name, ports, stubs, wasm)))
        out = os.path.join(scratch, "callgrind.out")
        env = dict(os.environ, SECKILL_EDGE_SECRET="bench-secret")
        process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=yes",
             envoy, "-c", config, "--concurrency", "1", "--base-id", str(ports["admin"]),
             "-l", "error"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(scratch, "log"), "w"), env=env)
        try:
            def started():
                if process.poll() is not None:
                    with open(os.path.join(scratch, "log")) as log:
                        sys.exit(f"{name}: Envoy exited: {log.read()[-2000:]}")
                return ready(ports["admin"])
            wait_for(f"{name}: Envoy under callgrind to be ready", 600, started)
            for key, value in runtime.items():
                urllib.request.urlopen(urllib.request.Request(
                    f"http://127.0.0.1:{ports['admin']}/runtime_modify?{key}={value}", method="POST"),
                    timeout=10).read()
            send(ports["listen"], path, warmup, connections, "warm")
            subprocess.run(["callgrind_control", "-z", str(process.pid)], check=True,
                           capture_output=True)
            callouts, attempts = stubs.counters()
            statuses = send(ports["listen"], path, requests, connections, "")
            after = stubs.counters()
            callouts, attempts = after[0] - callouts, after[1] - attempts
            subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True,
                           capture_output=True)
        finally:
            process.terminate()
            process.wait(timeout=120)
            stubs.close()
        if expected is not None and statuses != {expected: requests}:
            sys.exit(f"{name}: answers {statuses}, expected {requests} x {expected}")
        total = 0
        for dump in os.listdir(scratch):
            if dump.startswith("callgrind.out") and not dump.endswith(".log"):
                with open(os.path.join(scratch, dump)) as f:
                    dumped = [int(line.split()[1]) for line in f
                              if line.startswith("summary:")]
                # The dump taken on request (callgrind_control -d) holds the measured part.
                if dump.endswith(".1"):
                    total += sum(dumped)
        if total == 0:
            sys.exit(f"{name}: no callgrind dump found")
        if keep:
            os.makedirs(keep, exist_ok=True)
            for dump in os.listdir(scratch):
                if dump.endswith(".1") or dump == "envoy.yaml":
                    shutil.copy(os.path.join(scratch, dump), os.path.join(keep, f"{name}-{dump}"))
        if callouts:
            print(f"{name}: {attempts} attempts in {callouts} deduct calls "
                  f"({attempts / callouts:.2f} a call)", flush=True)
        return total / requests


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="+", metavar="SCENARIO",
                        help=f"one of {', '.join(sorted(SCENARIOS))}, or an Envoy template "
                             "(/absolute/path.yaml) answering /seckill/gone/buy with 409")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--connections", type=int, default=1,
                        help="keep-alive connections the requests are spread over")
    parser.add_argument("--envoy", default=VENV_ENVOY)
    parser.add_argument("--wasm", default=WASM, help="the filter build the gate's template loads")
    parser.add_argument("--keep", metavar="DIR", help="copy each scenario's dump and config here")
    args = parser.parse_args()
    for name in args.scenarios:
        per_request = measure(name, args.requests, args.warmup, args.envoy, args.wasm, args.connections,
                              args.keep)
        print(f"{name}: {per_request / 1000:.1f}k instructions per request", flush=True)


if __name__ == "__main__":
    main()
