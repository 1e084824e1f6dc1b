"""The data registry: files fetched by name through a real HTTP server on 127.0.0.1 serving our mirror, verified by
sha256, cached, atomic; every shipped config resolves its data by name; bad input is one line."""

import glob
import hashlib
import http.server
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading

import pytest

from s2d_jax import datasets
from s2d_jax.cli import main
from s2d_jax.config import load_config
from s2d_jax.errors import S2DError
from s2d_jax.stages.preflight import data_keys

REPO = pathlib.Path(__file__).resolve().parent.parent
MIRROR = os.environ.get("S2D_DATA_MIRROR", "")


def _sha(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the mirror directory; counts requests per path; can cut a file short or hold requests together."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        state = self.server.state
        path = self.path.lstrip("/")
        state["requests"].append(path)
        local = os.path.join(state["root"], path)
        if path in state["together"]:
            state["together"][path].wait()
        if path in state["cut"] and os.path.isfile(local):
            body = open(local, "rb").read()
            honest = state["cut"][path] == "short"  # a short file, announced as short; else the full length, cut
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) // 2 if honest else len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP mirror on 127.0.0.1 serving a copy of ../shared/data (S2D_DATA_MIRROR), and a fresh cache."""
    if not os.path.isdir(MIRROR):
        pytest.skip("the mirror tests serve ../shared/data (S2D_DATA_MIRROR, set in CI)")
    state = {"root": MIRROR, "requests": [], "cut": {}, "together": {}}
    handler = lambda *a, **k: _Handler(*a, directory=MIRROR, **k)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.state = state
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("S2D_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("S2D_DATA_MIRROR", url)
    monkeypatch.setenv("S2D_DATA_OFFLINE", "1")
    yield state | {"url": url, "cache": tmp_path / "cache"}
    httpd.shutdown()


def test_every_entry_is_fetched_verified_and_then_read_from_the_cache(server):
    served = [d for d in datasets.REGISTRY.values() if all(os.path.isfile(os.path.join(MIRROR, f.path))
                                                           for f in d.files)]
    # OASST2 is the one entry we hold no copy of (fetched from the hub by revision; see datasets.py)
    assert {d.name for d in datasets.REGISTRY.values()} - {d.name for d in served} == {"oasst2"}
    for d in served:
        local = datasets.resolve(datasets.PREFIX + d.name)
        assert os.path.exists(local) and os.path.abspath(local).startswith(str(server["cache"]))
        for f in d.files:
            cached = server["cache"] / f.path
            assert _sha(cached) == f.sha256 and cached.stat().st_size == f.size
    fetched = len(server["requests"])
    assert fetched == sum(len(d.files) for d in served)
    for d in served:  # a second fetch touches no network
        datasets.resolve(datasets.PREFIX + d.name)
    assert len(server["requests"]) == fetched
    assert main(["data", "list"]) == 0


def test_fetching_everything_goes_on_past_what_it_cannot_reach_and_counts_it(server, capsys):
    """`s2d data fetch` with no names: the mirror lacks OASST2 and the network is off. Every other entry is fetched
    (a named list goes on past it too), OASST2 is one line, and the exit is non-zero with a count."""
    assert main(["data", "fetch", "oasst2", "coin_flip"]) == 2  # named: past the failure to the next one
    out, err = capsys.readouterr()
    said = lambda err: [line for line in err.splitlines() if line.startswith("s2d:")]  # (not the progress bars)
    assert out.split() == [datasets.resolve("data:coin_flip")] and len(said(err)) == 2
    assert "1 of 2 data entries not fetched" in err
    names = list(datasets.REGISTRY)
    assert main(["data", "fetch"]) == 2
    out, err = capsys.readouterr()
    assert out.split() == [datasets.resolve(datasets.PREFIX + n) for n in names if n != "oasst2"]
    lines = said(err)
    assert len(lines) == 2 and lines[0].startswith("s2d: cannot fetch oasst2: oasst2/")
    assert lines[1] == (f"s2d: error: 1 of {len(names)} data entries not fetched (one line each above); the others "
                        f"are in the cache ({server['cache']})")
    for d in datasets.REGISTRY.values():  # complete entries, and nothing of the one that failed
        assert all(datasets.cached(f) for f in d.files) == (d.name != "oasst2")
    assert not any(datasets.cached(f) for f in datasets.REGISTRY["oasst2"].files)


def test_a_name_with_a_path_fetches_that_file_alone(server):
    local = datasets.resolve("data:mt_bench/judge_prompts.jsonl")
    assert local == str(server["cache"] / "mt_bench" / "judge_prompts.jsonl")
    assert server["requests"] == ["mt_bench/judge_prompts.jsonl"]
    with pytest.raises(S2DError, match=r"^data:mt_bench/nope.jsonl: 'mt_bench' has no file 'nope.jsonl' \(it has: "):
        datasets.resolve("data:mt_bench/nope.jsonl")


def test_a_corrupted_cached_file_is_detected_and_fetched_again(server, caplog):
    local = pathlib.Path(datasets.resolve("data:coin_flip"))
    good = local.read_bytes()
    local.write_bytes(good[:-10] + b"0123456789")  # same size, other bytes
    assert datasets.resolve("data:coin_flip") == str(local)
    assert local.read_bytes() == good and server["requests"].count("coin_flip/coin_flip.json") == 2
    assert "fails its checksum; fetching it again" in caplog.text


@pytest.mark.parametrize("how", ["cut", "short"])
def test_a_truncated_download_leaves_nothing_that_looks_complete(server, how):
    server["cut"]["gsm8k/test.jsonl"] = how
    with pytest.raises(S2DError) as e:
        datasets.resolve("data:gsm8k_test")
    message = str(e.value)
    assert "\n" not in message and message.startswith("gsm8k/test.jsonl: ")
    if how == "short":  # a complete-looking short file fails its checksum, and is not kept
        assert "checksum mismatch" in message and "expected sha256 3730d312f6e3" in message
    assert os.listdir(server["cache"] / "gsm8k") == []  # neither the file nor a temporary one
    server["cut"].clear()
    assert _sha(datasets.resolve("data:gsm8k_test")) == datasets.REGISTRY["gsm8k_test"].files[0].sha256


def test_two_processes_fetching_the_same_file_at_once_end_with_one_good_copy(server):
    server["together"]["gsm8k/train.jsonl"] = threading.Barrier(2, timeout=60)  # both requests in flight at once
    env = dict(os.environ)
    code = "from s2d_jax import datasets; print(datasets.resolve('data:gsm8k_train'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert server["requests"].count("gsm8k/train.jsonl") == 2
    assert os.listdir(server["cache"] / "gsm8k") == ["train.jsonl"]
    assert _sha(server["cache"] / "gsm8k" / "train.jsonl") == datasets.REGISTRY["gsm8k_train"].files[0].sha256


def test_a_mirror_with_a_wrong_file_is_refused_and_nothing_is_kept(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "coin_flip").mkdir(parents=True)
    (mirror / "coin_flip" / "coin_flip.json").write_text('{"examples": []}')
    monkeypatch.setenv("S2D_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("S2D_DATA_MIRROR", str(mirror))
    monkeypatch.setenv("S2D_DATA_OFFLINE", "1")
    with pytest.raises(S2DError) as e:
        datasets.resolve("data:coin_flip")
    got = _sha(mirror / "coin_flip" / "coin_flip.json")
    assert str(e.value) == (f"coin_flip/coin_flip.json: checksum mismatch from {mirror}/coin_flip/coin_flip.json: "
                            f"expected sha256 68cf201737a1463ef6bed5419622805a8934d92bff6a28a9dfbf83be3135ba5a, "
                            f"got {got}; the file was not kept")
    assert os.listdir(tmp_path / "cache" / "coin_flip") == []


def test_a_mirror_that_lacks_a_file_and_no_network_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("S2D_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("S2D_DATA_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("S2D_DATA_OFFLINE", "1")
    assert main(["data", "fetch", "last_letters"]) == 2
    err = capsys.readouterr().err
    assert err == (f"s2d: cannot fetch last_letters: last_letters/last_letters.json: cannot fetch ({tmp_path}/mirror/"
                   f"last_letters/last_letters.json: no such file); S2D_DATA_MIRROR={tmp_path}/mirror lacks it or "
                   f"could not serve it [cache: {tmp_path}/cache/last_letters/last_letters.json]\n"
                   f"s2d: error: 1 of 1 data entries not fetched (one line each above); the others are in the cache "
                   f"({tmp_path}/cache)\n")
    # no mirror, and upstream unreachable: which URL failed, and how to set the mirror
    monkeypatch.delenv("S2D_DATA_MIRROR")
    monkeypatch.delenv("S2D_DATA_OFFLINE")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/notes.txt"
    f = datasets.File("extra/notes.txt", closed, "0" * 64, 5)
    with pytest.raises(S2DError) as e:
        datasets.fetch_file(f)
    assert str(e.value) == (f"extra/notes.txt: cannot fetch ({closed}: cannot connect (no network, or the host is "
                            f"unreachable)); set S2D_DATA_MIRROR to a directory or http(s) URL holding it (or copy it "
                            f"to that path) [cache: {tmp_path}/cache/extra/notes.txt]")
    assert main(["data", "fetch", "gsm9k"]) == 2
    assert capsys.readouterr().err.startswith("s2d: error: no data named 'gsm9k' (names: last_letters, coin_flip, ")


def test_a_file_without_a_known_checksum_is_fetched_and_says_so(tmp_path, monkeypatch, caplog):
    (tmp_path / "mirror" / "extra").mkdir(parents=True)
    (tmp_path / "mirror" / "extra" / "notes.txt").write_text("hello")
    monkeypatch.setenv("S2D_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("S2D_DATA_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("S2D_DATA_OFFLINE", "1")
    local = datasets.fetch_file(datasets.File("extra/notes.txt", "https://example.invalid/notes.txt", None, 5))
    assert open(local).read() == "hello"
    assert "extra/notes.txt: no checksum is known for this file; fetched unverified" in caplog.text
    assert hashlib.sha256(b"hello").hexdigest() in caplog.text


def test_a_run_with_missing_data_stops_before_any_work(tmp_path, monkeypatch, capsys):
    """No mirror, no network: the held-out set is missing, so `s2d run` stops at once, before the rollouts."""
    monkeypatch.setenv("S2D_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("S2D_DATA_MIRROR", raising=False)
    monkeypatch.setenv("S2D_DATA_OFFLINE", "1")
    workdir = tmp_path / "run"
    assert main(["run", "--config", "configs/rar2_last_letters.py", "--workdir", str(workdir),
                 "--config.model.path=", "--config.model.preset=tiny", "--config.tokenizer=bytes",
                 "--config.task.n=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("s2d: error: config key 'eval.path': last_letters/last_letters.json: cannot fetch (")
    assert "S2D_DATA_OFFLINE is set and there is no mirror" in err and "\n" not in err
    assert not glob.glob(str(workdir / "rollouts*"))


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "*.py"))), ids=os.path.basename)
def test_every_shipped_config_names_its_data_and_resolves_it(path):
    if not MIRROR:
        pytest.skip("resolving needs S2D_DATA_MIRROR (../shared/data, set in CI)")
    config = load_config(path)
    for key, value in data_keys(config):
        assert datasets.is_name(value), f"{path}: {key} = {value!r} is a path, not a data name"
        entry, _, _ = datasets.lookup(value)
        if entry.name != "oasst2":  # the one entry without a copy in our mirror
            assert os.path.exists(datasets.resolve(value))


def test_nothing_in_the_package_or_the_configs_names_the_shared_directory():
    files = glob.glob(str(REPO / "s2d_jax" / "**" / "*"), recursive=True) + glob.glob(str(REPO / "configs" / "*"))
    named = [p for p in files if os.path.isfile(p) and "__pycache__" not in p and "../shared" in open(p).read()]
    assert named == []
    table = json.load(open(REPO / "s2d_jax" / "paper_results.json"))
    assert set(table["tasks"]) == {"last_letters", "coin_flip", "sycophancy", "mt_bench_judge", "gsm8k"}
