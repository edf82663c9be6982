#!/usr/bin/python3
"""The API scenario every client runs against a real VMM (tests/api_clients.rs drives it).

Two VMMs started with only --api-socket: the sender, which creates and boots the probe guest
from a cloud-hypervisor-style VmConfig, and an empty receiver, which takes the VM over by a
local migration. Each step is one API call with the status code and body cloud-hypervisor's
API documents; clients that show the status code (curl, requests, the OpenAPI client) are held
to it, ch-remote to its exit status and output, and every client that shows headers to
`Server: Cloud Hypervisor API`.

Usage: scenario.py CLIENT --sender SOCKET --receiver SOCKET --kernel PROBE --dir SCRATCH
       [--ch-remote PATH] [--spec OPENAPI.yaml] [--go-src DIR] [--go-cache DIR]
CLIENT: ch-remote | curl | requests | openapi. At `checkpoint booted`, `checkpoint migrated` and
`checkpoint restored` on stdout it waits for a line on stdin (the driver checks the guest meanwhile). Exit status 0 when every step passed; 3 when the
client is not installed (the message names the Debian package).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

SERVER = "Cloud Hypervisor API"
TIMEOUT = 60


class Missing(Exception):
    """A client's package is not installed."""


class Answer:
    """What a client saw: `ok` always, the status, body text and Server header where it shows them."""

    def __init__(self, ok, body, status=None, server=None, error=""):
        self.ok = ok
        self.body = body
        self.status = status
        self.server = server
        self.error = error

    def __repr__(self):
        return f"Answer(ok={self.ok}, status={self.status}, body={self.body!r}, server={self.server!r}, error={self.error!r})"


class Call:
    """One API call, with its ch-remote spelling."""

    def __init__(self, method, endpoint, body=None, ch_remote=None):
        self.method = method
        self.endpoint = endpoint
        self.body = None if body is None else json.dumps(body)
        self.ch_remote = ch_remote

    def __repr__(self):
        return f"{self.method} {self.endpoint}"


class ChRemote:
    name = "ch-remote"

    def __init__(self, args):
        self.binary = args.ch_remote
        self.dir = args.dir
        if not self.binary or not os.access(self.binary, os.X_OK):
            raise Missing(f"ch-remote not found at {self.binary!r} (cargo builds it)")

    def call(self, socket, call):
        argv = list(call.ch_remote)
        if argv[0] == "create":
            # ch-remote create takes a file.
            path = os.path.join(self.dir, "vm.json")
            with open(path, "w") as f:
                f.write(call.body)
            argv = ["create", path]
        done = subprocess.run(
            [self.binary, "--api-socket", socket, *argv],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        return Answer(done.returncode == 0, done.stdout.strip(), error=done.stderr.strip())


class Curl:
    name = "curl"

    def __init__(self, args):
        if shutil.which("curl") is None:
            raise Missing("curl not found: install the Debian package curl")
        self.dir = args.dir

    def call(self, socket, call):
        with tempfile.TemporaryDirectory(dir=self.dir) as scratch:
            headers = os.path.join(scratch, "headers")
            body = os.path.join(scratch, "body")
            argv = ["curl", "--silent", "--show-error", "--http1.1", "--unix-socket", socket,
                    "-X", call.method, "-D", headers, "-o", body, "-w", "%{http_code}",
                    "--max-time", str(TIMEOUT)]
            if call.body is not None:
                argv += ["-H", "Content-Type: application/json", "--data-binary", call.body]
            argv.append(f"http://localhost/api/v1/{call.endpoint}")
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                return Answer(False, "", error=f"curl exit {done.returncode}: {done.stderr}")
            status = int(done.stdout)
            with open(body) as f:
                text = f.read()
            with open(headers) as f:
                server = next((line.split(":", 1)[1].strip() for line in f
                               if line.lower().startswith("server:")), None)
            return Answer(200 <= status < 300, text, status, server)


class Requests:
    name = "requests"

    def __init__(self, args):
        try:
            import requests  # noqa: F401
        except ImportError:
            raise Missing("python3 cannot import requests: install the Debian package python3-requests")
        try:
            import requests_unixsocket
        except ImportError:
            raise Missing("python3 cannot import requests_unixsocket: install the Debian package "
                          "python3-requests-unixsocket")
        self.module = requests_unixsocket
        # One session per socket, so calls reuse the kept-alive connection as a long-lived
        # client does; a call that blocks (receive-migration) gets a session of its own.
        self.sessions = {}
        self.lock = threading.Lock()

    def call(self, socket, call, own_session=False):
        with self.lock:
            if own_session:
                session = self.module.Session()
            else:
                session = self.sessions.setdefault(socket, self.module.Session())
        url = f"http+unix://{urllib.parse.quote(socket, safe='')}/api/v1/{call.endpoint}"
        headers = {} if call.body is None else {"Content-Type": "application/json"}
        try:
            response = session.request(call.method, url, data=call.body, headers=headers, timeout=TIMEOUT)
        except Exception as e:  # the transport's own failure is the step's failure
            return Answer(False, "", error=f"{type(e).__name__}: {e}")
        return Answer(response.ok, response.text, response.status_code, response.headers.get("Server"))


class OpenApi:
    """The Go client of tests/clients/openapi, built here, checking calls against the document."""

    name = "openapi"

    def __init__(self, args):
        if shutil.which("go") is None:
            raise Missing("go not found: install the Debian package golang-go")
        gopath = "/usr/share/gocode"
        if not os.path.isdir(os.path.join(gopath, "src/github.com/getkin/kin-openapi")):
            raise Missing("kin-openapi not found: install the Debian package "
                          "golang-github-getkin-kin-openapi-dev")
        binary = os.path.join(args.dir, "openapi-client")
        env = dict(os.environ, GO111MODULE="off", GOPATH=gopath, GOFLAGS="",
                   GOCACHE=args.go_cache or os.path.join(args.dir, "go-cache"))
        built = subprocess.run(["go", "build", "-o", binary, "main.go"], cwd=args.go_src, env=env,
                               capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"go build failed:\n{built.stderr}")
        self.process = subprocess.Popen([binary, args.spec], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        self.next_id = 0
        self.answers = {}
        self.ready = threading.Condition()
        threading.Thread(target=self.read_answers, daemon=True).start()

    def read_answers(self):
        for line in self.process.stdout:
            answer = json.loads(line)
            with self.ready:
                self.answers[answer["id"]] = answer
                self.ready.notify_all()

    def call(self, socket, call):
        with self.ready:
            self.next_id += 1
            ident = self.next_id
            line = json.dumps({"id": ident, "socket": socket, "method": call.method,
                               "endpoint": call.endpoint, "body": call.body})
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
            if not self.ready.wait_for(lambda: ident in self.answers, timeout=TIMEOUT):
                return Answer(False, "", error="no answer from the OpenAPI client")
            got = self.answers.pop(ident)
        if got["proto"] and got["proto"] != "HTTP/1.1":
            got["error"] += f" (protocol {got['proto']})"
        ok = 200 <= got["status"] < 300 and not got["error"]
        return Answer(ok, got["body"], got["status"] or None, got["server"], got["error"])


CLIENTS = {c.name: c for c in (ChRemote, Curl, Requests, OpenApi)}


class Failed(Exception):
    pass


def expect(client, answer, call, status):
    """Checks an answer against the documented status: the code where the client shows it,
    success or failure where it does not; the body's shape; the Server header."""
    print(f"{client.name}: {call} -> {answer.status if answer.status is not None else ('ok' if answer.ok else 'failed')}",
          flush=True)
    # ch-remote's stderr is how it reports an expected failure; anything else a client reports
    # (a transport error, a mismatch with the OpenAPI document) fails the step.
    if answer.error and not (client.name == "ch-remote" and status >= 400):
        raise Failed(f"{call}: {answer.error}")
    if answer.status is not None and answer.status != status:
        raise Failed(f"{call}: expected {status}, got {answer}")
    if answer.ok != (status < 300):
        raise Failed(f"{call}: expected {'success' if status < 300 else 'failure'} ({status}), got {answer}")
    if answer.server is not None and answer.server != SERVER:
        raise Failed(f"{call}: Server header {answer.server!r}, expected {SERVER!r}")
    if status == 204 and answer.body != "":
        raise Failed(f"{call}: a 204 with a body: {answer}")
    if status == 200:
        try:
            return json.loads(answer.body)
        except ValueError as e:
            raise Failed(f"{call}: the body is not JSON ({e}): {answer}")
    if status >= 400:
        if client.name == "ch-remote":
            if str(status) not in answer.error:
                raise Failed(f"{call}: ch-remote's error does not name {status}: {answer}")
            return None
        try:
            messages = json.loads(answer.body)
        except ValueError as e:
            raise Failed(f"{call}: the error body is not JSON ({e}): {answer}")
        if not (isinstance(messages, list) and messages and all(isinstance(m, str) for m in messages)):
            raise Failed(f"{call}: the error body is not a non-empty array of strings: {answer}")
        return messages
    return None


def checkpoint(name):
    """Lets the driver check the guest (its serial lines are the VMM's stdout, which only the
    driver reads): says `checkpoint NAME` and waits for a line on stdin."""
    print(f"checkpoint {name}", flush=True)
    if sys.stdin.readline() == "":
        raise Failed(f"the driver went away at checkpoint {name}")


def check(condition, what):
    if not condition:
        raise Failed(what)


def wait_for(what, predicate):
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise Failed(f"timed out waiting for {what}")
        time.sleep(0.05)


def run(client, args):
    sender, receiver = args.sender, args.receiver
    vsock_socket = os.path.join(args.dir, "vsock.sock")
    migration_socket = os.path.join(args.dir, "migration.sock")
    config = {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256 << 20, "shared": True},
        "payload": {"kernel": args.kernel, "cmdline": "fill=1 status_ms=200 hotplug=1"},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    }

    def step(socket, call, status):
        return expect(client, client.call(socket, call), call, status)

    def info(socket):
        return step(socket, Call("GET", "vm.info", ch_remote=["info"]), 200)

    ping = step(sender, Call("GET", "vmm.ping", ch_remote=["ping"]), 200)
    for key in ("build_version", "version", "pid", "features"):
        check(key in ping, f"vmm.ping lacks {key}: {ping}")

    step(sender, Call("PUT", "vm.create", config, ch_remote=["create"]), 204)
    created = info(sender)
    check(created["state"] == "Created", f"state after create: {created['state']}")
    check(created["config"]["payload"]["kernel"] == args.kernel, f"config: {created['config']}")
    check(created["config"]["memory"]["size"] == 256 << 20, f"config: {created['config']}")

    step(sender, Call("PUT", "vm.boot", ch_remote=["boot"]), 204)
    check(info(sender)["state"] == "Running", "state after boot")
    checkpoint("booted")

    step(sender, Call("PUT", "vm.pause", ch_remote=["pause"]), 204)
    check(info(sender)["state"] == "Paused", "state after pause")
    step(sender, Call("PUT", "vm.resume", ch_remote=["resume"]), 204)
    check(info(sender)["state"] == "Running", "state after resume")

    counters = step(sender, Call("GET", "vm.counters", ch_remote=["counters"]), 200)
    check(isinstance(counters, dict), f"vm.counters is not an object: {counters}")

    vsock = {"cid": 3, "socket": vsock_socket, "id": "vsock0"}
    added = step(sender, Call("PUT", "vm.add-vsock", vsock,
                              ch_remote=["add-vsock", f"cid=3,socket={vsock_socket},id=vsock0"]), 200)
    check(added.get("id") == "vsock0" and "bdf" in added, f"vm.add-vsock answer: {added}")
    check(info(sender)["config"].get("vsock", {}).get("cid") == 3, "vsock in vm.info after add")
    step(sender, Call("PUT", "vm.remove-device", {"id": "vsock0"},
                      ch_remote=["remove-device", "vsock0"]), 204)
    # The device leaves once the guest has ejected it.
    wait_for("the vsock device to leave vm.info", lambda: info(sender)["config"].get("vsock") is None)

    # A snapshot of the running guest, restored into the receiver at the end.
    snapshot_dir = os.path.join(args.dir, "snapshot")
    os.makedirs(snapshot_dir, exist_ok=True)
    snapshot_url = f"file://{snapshot_dir}"
    step(sender, Call("PUT", "vm.snapshot", {"destination_url": snapshot_url},
                      ch_remote=["snapshot", snapshot_url]), 204)
    check(info(sender)["state"] == "Running", "state after a snapshot of the running VM")
    check(os.path.exists(os.path.join(snapshot_dir, "manifest.json")), "no manifest.json in the snapshot")

    # The receiver has no VM yet: a 404 with the error chain.
    step(receiver, Call("GET", "vm.info", ch_remote=["info"]), 404)

    url = f"unix:{migration_socket}"
    receive_call = Call("PUT", "vm.receive-migration", {"receiver_url": url},
                        ch_remote=["receive-migration", f"receiver_url={url}"])
    received = {}

    def receive():
        if isinstance(client, Requests):
            received["answer"] = client.call(receiver, receive_call, own_session=True)
        else:
            received["answer"] = client.call(receiver, receive_call)

    receiving = threading.Thread(target=receive)
    receiving.start()
    wait_for(f"{migration_socket} to be served", lambda: os.path.exists(migration_socket))
    step(sender, Call("PUT", "vm.send-migration", {"destination_url": url, "local": True},
                      ch_remote=["send-migration", f"destination_url={url},local=on"]), 204)
    receiving.join(TIMEOUT)
    check(not receiving.is_alive(), "vm.receive-migration did not return")
    expect(client, received["answer"], receive_call, 204)

    migrated = info(receiver)
    check(migrated["state"] == "Running", f"state after migration: {migrated['state']}")
    check(migrated["config"]["payload"]["kernel"] == args.kernel, f"config: {migrated['config']}")
    checkpoint("migrated")

    step(receiver, Call("PUT", "vm.shutdown", ch_remote=["shutdown"]), 204)
    check(info(receiver)["state"] == "Shutdown", "state after shutdown")
    step(receiver, Call("PUT", "vm.delete", ch_remote=["delete"]), 204)
    step(receiver, Call("GET", "vm.info", ch_remote=["info"]), 404)

    # The snapshot of before the migration, restored and resumed in the now empty receiver.
    step(receiver, Call("PUT", "vm.restore", {"source_url": snapshot_url, "resume": True},
                        ch_remote=["restore", f"source_url={snapshot_url},resume=true"]), 204)
    restored = info(receiver)
    check(restored["state"] == "Running", f"state after restore: {restored['state']}")
    checkpoint("restored")
    step(receiver, Call("PUT", "vm.delete", ch_remote=["delete"]), 204)
    step(receiver, Call("PUT", "vmm.shutdown", ch_remote=["shutdown-vmm"]), 204)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("client", choices=sorted(CLIENTS))
    parser.add_argument("--sender", required=True)
    parser.add_argument("--receiver", required=True)
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--ch-remote")
    parser.add_argument("--spec")
    parser.add_argument("--go-src")
    parser.add_argument("--go-cache")
    args = parser.parse_args()
    try:
        client = CLIENTS[args.client](args)
    except Missing as e:
        print(f"{args.client}: {e}", file=sys.stderr)
        return 3
    try:
        run(client, args)
    except Failed as e:
        print(f"{args.client}: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"{args.client}: every step passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
