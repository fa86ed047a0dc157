#!/usr/bin/env python3
"""Instructions Envoy spends per request on one edge path, counted by callgrind.

wrk's requests/s swing by up to 30% between rounds on 2 shared cores; instruction counts do
not. This runs Envoy (1 worker) under `valgrind --tool=callgrind` from an Envoy template of
this repository, sends warm-up requests, zeroes the counters, sends the measured requests on
one keep-alive connection, and prints the whole process's instructions per request.

    python3 scripts/edge-instructions.py native            # Envoy's local_ratelimit (429)
    python3 scripts/edge-instructions.py fast               # the gate's sold-out route (409)
    python3 scripts/edge-instructions.py native fast --requests 2000

Each scenario is a template, its values and the request; see SCENARIOS. Needs valgrind, the
release wasm build (for the gate's template) and the debug or release syncer (for the routes).
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
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The binary itself: .venv/bin/envoy is a Python launcher, which callgrind would measure.
VENV_ENVOY = next(iter(glob.glob(os.path.join(ROOT, ".venv", "lib", "python3*", "site-packages", "envoy", "_bin", "envoy"))), "envoy")

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

# name: (template, expected status, runtime keys set through the admin API)
SCENARIOS = {
    "native": ("bench/envoy/native-ratelimit.yaml", 429, {}),
    "plain": ("bench/envoy/plain.yaml", None, {}),
    "fast": ("envoy/local.yaml", 409, {"seckill.sold_out.gone": "100"}),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def syncer_binary():
    # The newest build prints the routes the code now makes.
    builds = [os.path.join(ROOT, "target", profile, "seckill-syncer") for profile in ("release", "debug")]
    builds = [path for path in builds if os.path.exists(path)]
    if not builds:
        sys.exit("no seckill-syncer build: cargo build -p seckill-syncer")
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


def values_for(name, ports):
    values = {
        "ADMIN_PORT": str(ports["admin"]),
        "LISTEN_PORT": str(ports["listen"]),
        "SHOP_PORT": str(ports["shop"]),
        "SYNCER_PORT": str(ports["syncer"]),
        "SHOP_TIMEOUT": "5s",
        "WASM_PATH": os.path.join(ROOT, "target", "wasm32-wasip1", "release", "seckill_filter.wasm"),
        "PLUGIN_CONFIG": json.dumps(json.dumps(PLUGIN_CONFIG)),
        "FAST_ROUTES": "",
    }
    if name == "fast" or name.endswith(".yaml"):
        values["FAST_ROUTES"] = subprocess.run(
            [syncer_binary(), "fast-path-routes", "--indent", "14", "--goods", "gone"],
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

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buffer = b""
        self.count = 0

    def request(self, path):
        self.count += 1
        body = b""
        head = (f"POST {path} HTTP/1.1\r\nHost: gate\r\nx-user-id: u{self.count}\r\n"
                f"x-request-id: r{self.count}\r\ncontent-length: {len(body)}\r\n\r\n")
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


def measure(name, requests, warmup, envoy, keep=None):
    if name.endswith(".yaml"):
        # An ad hoc template (exploring a variant): the fast path's answer and runtime key.
        template, expected, runtime = name, 409, SCENARIOS["fast"][2]
    else:
        template, expected, runtime = SCENARIOS[name]
    ports = {k: free_port() for k in ("admin", "listen", "shop", "syncer")}
    with tempfile.TemporaryDirectory() as scratch:
        config = os.path.join(scratch, "envoy.yaml")
        with open(config, "w") as f:
            f.write(render(template, values_for(name, ports)))
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
            client = Client(ports["listen"])
            path = "/seckill/gone/buy"
            for _ in range(warmup):
                client.request(path)
            subprocess.run(["callgrind_control", "-z", str(process.pid)], check=True,
                           capture_output=True)
            statuses = {}
            for _ in range(requests):
                status = client.request(path)
                statuses[status] = statuses.get(status, 0) + 1
            subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True,
                           capture_output=True)
        finally:
            process.terminate()
            process.wait(timeout=120)
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
        return total / requests


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="+", metavar="SCENARIO",
                        help=f"one of {', '.join(sorted(SCENARIOS))}, or an Envoy template "
                             "(/absolute/path.yaml) answering /seckill/gone/buy with 409")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--envoy", default=VENV_ENVOY)
    parser.add_argument("--keep", metavar="DIR", help="copy each scenario's dump and config here")
    args = parser.parse_args()
    for name in args.scenarios:
        per_request = measure(name, args.requests, args.warmup, args.envoy, args.keep)
        print(f"{name}: {per_request / 1000:.1f}k instructions per request", flush=True)


if __name__ == "__main__":
    main()
