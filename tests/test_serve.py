"""`layerscope serve` over real HTTP: loopback only, two files and nothing else, interpretations
merged and saved atomically, concurrent saves losing nothing, bounded bodies, clean Ctrl-C."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from layerscope.errors import LayerScopeError
from layerscope.web import interpretations as interp
from layerscope.web.serve import make_server

PAGE = b"<!DOCTYPE html><title>page</title>\n"
SEED = {"interpretations": {"layer_10_gate_proj_positive": {"text": "Activates on mathematical operators and symbols",
                                                            "starred": True, "lastModified": "2024-01-20T10:30:00Z"}}}
# documents both the server and the page refuse, and what their message says
BAD_DOCS = [
    ([1, 2], "not an interpretations file"),
    ({"interpretations": []}, "not an interpretations file"),
    ({"layer_1_q_proj_positive": {"text": "", "starred": False}}, "not an interpretations file"),
    ({"interpretations": {"__proto__": {"text": "x", "starred": False}}}, "not a panel key"),
    ({"interpretations": {"layer_1_q_proj_sideways": {"text": "x", "starred": False}}}, "not a panel key"),
    ({"interpretations": {"layer_1_q_proj_positive": {"text": 5, "starred": False}}}, "expected {\"text\": string"),
    ({"interpretations": {"layer_1_q_proj_positive": {"text": "x", "starred": "yes"}}}, "expected {\"text\": string"),
    ({"interpretations": {"layer_1_q_proj_positive": {"text": "x" * 20001, "starred": False}}}, "longer than 20000"),
    ({"interpretations": {"layer_1_q_proj_positive": {"text": "x", "starred": True, "lastModified": "yesterday"}}},
     "lastModified is not an ISO 8601 time"),
    ({"interpretations": {"layer_1_q_proj_positive": {"text": "x", "starred": True,
                                                      "lastModified": "2024-01-20T10:30:00"}}},
     "lastModified is not an ISO 8601 time"),
]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    (tmp_path / "dashboard").mkdir()
    (tmp_path / "dashboard" / "index.html").write_bytes(PAGE)
    (tmp_path / "metadata.json").write_text("{}")
    return tmp_path


class Served:
    """A server on a free port, running in a thread until the test ends."""

    def __init__(self, run_dir: Path, **kw) -> None:
        self.server = make_server(run_dir, port=0, quiet=True, **kw)
        self.port = self.server.port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                host: str | None = None) -> tuple[int, dict, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            h = {"Host": host or f"127.0.0.1:{self.port}", **(headers or {})}
            c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.items():
                c.putheader(k, v)
            if body is not None and "Transfer-Encoding" not in h:
                c.putheader("Content-Length", str(len(body)))
            c.endheaders()
            if body is not None:
                c.send(body)
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def put(self, doc, **kw) -> tuple[int, dict, bytes]:
        return self.request("PUT", "/interpretations.json", json.dumps(doc).encode(),
                            {"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(run_dir):
    s = Served(run_dir)
    yield s
    s.close()


def entry(text: str, t: str = "2026-01-01T00:00:00.000Z", starred: bool = False) -> dict:
    return {"text": text, "starred": starred, "lastModified": t}


def test_binds_the_loopback_address_only(served):
    assert served.server.server_address[0] == "127.0.0.1"
    others = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            others.add(info[4][0])
    except OSError:
        pass
    others = {a for a in others if not a.startswith("127.")}
    for addr in others:  # the machine's other addresses do not reach the server
        with pytest.raises(OSError):
            socket.create_connection((addr, served.port), timeout=2).close()
    status, _, body = served.request("GET", "/")
    assert status == 200 and body == PAGE


def test_serves_the_page_and_the_file_and_nothing_else(served, run_dir):
    for path in ("/", "/index.html", "/?x=1#y"):
        status, headers, body = served.request("GET", path)
        assert status == 200 and body == PAGE and headers["Content-Type"] == "text/html; charset=utf-8"
        assert "connect-src 'self'" in headers["Content-Security-Policy"] and headers["Cache-Control"] == "no-store"
    status, headers, body = served.request("GET", "/interpretations.json")
    assert status == 200 and json.loads(body) == {"interpretations": {}}
    assert headers["X-LayerScope"] == "interpretations"
    (run_dir / "secret.txt").write_text("secret")
    for path in ("/metadata.json", "/../metadata.json", "/dashboard/index.html", "/dashboard/../metadata.json",
                 "/%2e%2e/metadata.json", "/..%2fmetadata.json", "/interpretations.json/../metadata.json",
                 "//etc/passwd", "/index.html/..", "/secret.txt", "/%2E%2E%2Fsecret.txt", "/.interpretations.lock",
                 "/dashboard/", "/index.html%00", f"{run_dir}/secret.txt", "http://127.0.0.1/../secret.txt"):
        status, _, body = served.request("GET", path)
        assert status == 404 and b"secret" not in body, path
    for method, path in (("PUT", "/"), ("PUT", "/index.html"), ("POST", "/interpretations.json"),
                         ("DELETE", "/interpretations.json")):
        assert served.request(method, path, b"{}", {"Content-Type": "application/json"})[0] == 405, (method, path)
    assert served.request("PUT", "/../secret.txt", b"{}", {"Content-Type": "application/json"})[0] == 404
    assert (run_dir / "secret.txt").read_text() == "secret"


def test_only_its_own_host_and_origin(served, run_dir):
    # a page elsewhere that rebinds its name to 127.0.0.1 still sends its own Host
    assert served.request("GET", "/", host=f"evil.example:{served.port}")[0] == 421
    assert served.request("GET", "/interpretations.json", host="evil.example")[0] == 421
    assert served.request("GET", "/", host=f"localhost:{served.port}")[0] == 200
    doc = {"interpretations": {"layer_1_q_proj_positive": entry("x")}}
    assert served.put(doc, headers={"Origin": "http://evil.example"})[0] == 403
    assert not (run_dir / "interpretations.json").exists()
    assert served.put(doc, headers={"Origin": f"http://127.0.0.1:{served.port}"})[0] == 200


def test_put_merges_key_by_key_and_saves_atomically(served, run_dir):
    path = run_dir / "interpretations.json"
    status, _, body = served.put(SEED)
    assert status == 200 and json.loads(body) == SEED and json.loads(path.read_text()) == SEED  # seed 002's format
    ino = path.stat().st_ino
    new = {"interpretations": {"layer_10_up_proj_negative": entry("negation", starred=True)}}
    status, _, body = served.put(new)
    assert json.loads(body)["interpretations"] == SEED["interpretations"] | new["interpretations"]
    assert path.stat().st_ino != ino  # written beside and renamed into place, never rewritten in place
    # an older copy of a panel does not overwrite a newer one; a cleared panel stays cleared
    served.put({"interpretations": {"layer_10_up_proj_negative": entry("", "2026-02-01T00:00:00Z")}})
    _, _, body = served.put({"interpretations": {"layer_10_up_proj_negative": entry("stale", "2026-01-15T00:00:00Z")}})
    assert json.loads(body)["interpretations"]["layer_10_up_proj_negative"]["text"] == ""
    # an entry without a time is a new edit, stamped by the server
    _, _, body = served.put({"interpretations": {"layer_3_q_proj_2_positive": {"text": "t", "starred": False}}})
    assert json.loads(body)["interpretations"]["layer_3_q_proj_2_positive"]["lastModified"] > "2026-11"
    assert sorted(p.name for p in run_dir.iterdir()) == [".interpretations.lock", "dashboard", "interpretations.json",
                                                         "metadata.json"]  # no temporary file left


def test_readers_never_see_a_partial_file(served, run_dir):
    path, stop, seen, bad = run_dir / "interpretations.json", threading.Event(), [], []

    def read() -> None:
        while not stop.is_set():
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            try:
                seen.append(len(interp.validate(json.loads(text))))
            except ValueError as e:
                bad.append(str(e))

    t = threading.Thread(target=read)
    t.start()
    try:
        for i in range(60):
            served.put({"interpretations": {f"layer_{i}_down_proj_positive": entry("x" * 5000)}})
    finally:
        stop.set()
        t.join()
    assert bad == [] and len(seen) > 10 and max(seen) == 60


def test_concurrent_puts_lose_nothing(run_dir):
    """Threads saving at once, through two servers on the same run: every key arrives, and where
    they all wrote one key the newest edit wins."""
    servers = [Served(run_dir), Served(run_dir)]
    try:
        errors = []

        def work(t: int) -> None:
            s = servers[t % 2]
            for i in range(15):
                stamp = f"2026-03-01T00:{t:02d}:{i:02d}.000Z"
                doc = {"interpretations": {f"layer_{t}_q_proj_{i}_positive": entry(f"{t}/{i}", stamp),
                                           "layer_0_shared_negative": entry(f"{t}/{i}", stamp)}}
                status, _, body = s.put(doc)
                if status != 200 or f"layer_{t}_q_proj_{i}_positive" not in json.loads(body)["interpretations"]:
                    errors.append((t, i, status))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        final = interp.load(run_dir / "interpretations.json")
        assert len(final) == 8 * 15 + 1
        assert all(final[f"layer_{t}_q_proj_{i}_positive"]["text"] == f"{t}/{i}" for t in range(8) for i in range(15))
        assert final["layer_0_shared_negative"]["text"] == "7/14"  # the latest lastModified
    finally:
        for s in servers:
            s.close()


def test_bodies_are_bounded_and_checked(run_dir):
    s = Served(run_dir, max_body=1000)
    try:
        big = json.dumps({"interpretations": {"layer_1_q_proj_positive": entry("x" * 2000)}}).encode()
        status, headers, body = s.request("PUT", "/interpretations.json", big, {"Content-Type": "application/json"})
        assert status == 413 and b"at most 1000" in body and headers["Connection"] == "close"
        # refused from its Content-Length alone, before any of the body is read
        c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        c.sendall(f"PUT /interpretations.json HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\nContent-Type: application/json"
                  f"\r\nContent-Length: {10 ** 12}\r\n\r\n".encode())
        assert c.recv(100).startswith(b"HTTP/1.1 413")
        c.close()
        status, _, _ = s.request("PUT", "/interpretations.json", b"{}",
                                 {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        assert status == 411
        assert s.request("PUT", "/interpretations.json", b"{}", {"Content-Type": "text/plain"})[0] == 415
        status, _, body = s.request("PUT", "/interpretations.json", b"{nope", {"Content-Type": "application/json"})
        assert status == 400 and b"not JSON" in body
        for doc, message in BAD_DOCS:
            if len(json.dumps(doc)) > 1000:
                continue  # over this server's limit: 413 before any check
            status, _, body = s.put(doc)
            assert status == 400 and message.encode() in body, doc
        assert not (run_dir / "interpretations.json").exists()
    finally:
        s.close()


@pytest.mark.parametrize("doc,message", BAD_DOCS)
def test_validation_names_the_problem(doc, message):
    with pytest.raises(interp.InterpretationsError, match=None) as e:
        interp.validate(doc)
    assert message in str(e.value)


def test_seed_002_file_is_read_as_it_is():
    from layerscope.analysis.lora import key_stem

    assert interp.validate(SEED) == SEED["interpretations"]
    assert key_stem(10, "gate_proj", 0, 1) == "layer_10_gate_proj"  # rank 1: seed 002's keys
    assert key_stem(10, "gate_proj", 3, 8) == "layer_10_gate_proj_3"
    assert all(interp.KEY.fullmatch(key_stem(3, m, 2, 4) + "_negative") for m in ("c_attn", "attn_c_proj", "fc1"))


def test_refuses_a_damaged_file_and_a_missing_dashboard(run_dir, tmp_path_factory):
    (run_dir / "interpretations.json").write_text('{"interpretations": {"bad key": {}}}')
    with pytest.raises(LayerScopeError, match="not a panel key"):
        make_server(run_dir, port=0)
    assert (run_dir / "interpretations.json").read_text() == '{"interpretations": {"bad key": {}}}'  # untouched
    with pytest.raises(LayerScopeError, match="no dashboard"):
        make_server(tmp_path_factory.mktemp("empty"), port=0)


def _listening(port: int) -> list[str]:
    """Local addresses of sockets listening on ``port`` (from /proc/net/tcp, hex little-endian IPv4)."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:
            out.append(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


def test_cli_serves_until_ctrl_c(run_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "layerscope", "serve", str(run_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "Ctrl-C stops" in line, line + proc.stderr.read()
        url = line.split(" at ", 1)[1].split()[0]
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert url == f"http://127.0.0.1:{port}/"
        if Path("/proc/net/tcp").exists():
            assert _listening(port) == ["127.0.0.1"]
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("PUT", "/interpretations.json", json.dumps(SEED), {"Content-Type": "application/json"})
        assert c.getresponse().status == 200
        c.close()
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and out.strip() == "stopped" and "Traceback" not in err, err
    assert interp.load(run_dir / "interpretations.json") == SEED["interpretations"]
    res = subprocess.run([sys.executable, "-m", "layerscope", "serve", str(run_dir / "dashboard")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no dashboard" in res.stderr
