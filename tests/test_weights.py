"""``rsna19 weights list|check|fetch`` against a loopback Hugging Face hub (no internet anywhere).

The hub is a real ``http.server`` on 127.0.0.1 that answers what ``hf_hub_download`` asks for: ``HEAD`` and
``GET /{repo_id}/resolve/{revision}/{filename}`` with ``ETag`` (the sha256, as the hub gives for LFS files),
``X-Repo-Commit`` and ``Content-Length``; a missing file is a 404 with ``X-Error-Code: EntryNotFound``.
``HF_ENDPOINT`` points the client at it.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from rsna19.cli import main
from rsna19.tools.weights import MANIFEST_NAME, WeightNeed, locate, pipeline_needs

REPO = "timm/test_resnet.r160_in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """The two requests ``hf_hub_download`` makes, per file: HEAD (metadata) and GET (content)."""

    server: _Hub

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.server.requests.append((self.command, path))
        data = self.server.files.get(path)
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class _Hub(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    requests: list[tuple[str, str]]


def _weights_bytes(tmp: Path, state: dict[str, torch.Tensor]) -> bytes:
    path = tmp / "src.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path.read_bytes()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Hub]:
    """A loopback hub serving test_resnet's weights; HF cache, torch hub and endpoint pointed at tmp_path."""
    import huggingface_hub.constants as hc

    server = _Hub(("127.0.0.1", 0), _HubHandler)
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    server.files = {f"/{REPO}/resolve/main/model.safetensors": _weights_bytes(tmp_path, state)}
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("RSNA19_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_HUB_DISABLE_PROGRESS_BARS", True, raising=False)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _snapshot(root: Path) -> Path:
    return root / "models--timm--test_resnet.r160_in1k" / "snapshots" / COMMIT / "model.safetensors"


def test_fetch_check_and_a_damaged_file(hub: _Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing local yet: check fails offline and says what to run; list shows the tag and the hub repository.
    assert main(["weights", "check", "test_resnet"]) == 1
    out = capsys.readouterr().out
    assert "not found locally" in out and "rsna19 weights fetch test_resnet" in out
    assert hub.requests == []  # check and list never touch the network
    assert main(["weights", "list", "tu-test_resnet"]) == 0
    out = capsys.readouterr().out
    assert "test_resnet.r160_in1k" in out and REPO in out and "MISSING" in out

    # fetch downloads into the Hugging Face cache training reads, verifies it and records its sha256.
    assert main(["weights", "fetch", "test_resnet"]) == 0
    assert "fetched test_resnet" in capsys.readouterr().out
    assert ("GET", f"/{REPO}/resolve/main/model.safetensors") in hub.requests
    file = _snapshot(tmp_path / "hf")
    assert file.is_file()
    manifest = json.loads((file.parents[2] / MANIFEST_NAME).read_text())
    entry = manifest["files"][f"snapshots/{COMMIT}/model.safetensors"]
    assert entry["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert entry["repo"] == REPO and entry["tag"] == "test_resnet.r160_in1k"
    assert main(["weights", "check", "test_resnet"]) == 0
    assert "ok    test_resnet" in capsys.readouterr().out

    # Training finds the fetched file offline and loads it.
    from rsna19.nets import build_model

    n_requests = len(hub.requests)
    model = build_model("clf2d", backbone="test_resnet", n_windows=3, pretrained=True)
    served = timm.create_model("test_resnet").state_dict()
    key = "layer1.0.bn1.running_var"
    torch.testing.assert_close(model.backbone.state_dict()[key], served[key])
    assert len(hub.requests) == n_requests

    # A damaged file: check fails and says how to repair it; a second fetch without --force refuses too.
    file.resolve().write_bytes(b"\0" * 100)
    assert main(["weights", "check", "test_resnet"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  test_resnet" in out and "damaged" in out and "rsna19 weights fetch --force test_resnet" in out
    assert main(["weights", "fetch", "test_resnet"]) == 1
    capsys.readouterr()
    assert main(["weights", "fetch", "--force", "test_resnet"]) == 0
    assert "fetched test_resnet" in capsys.readouterr().out
    assert main(["weights", "check", "test_resnet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["present"] and report[0]["problem"] is None and report[0]["hf_repo"] == REPO


def test_damage_caught_by_manifest_and_by_keys(hub: _Hub, tmp_path: Path) -> None:
    # A file replaced by another valid safetensors file: the manifest's sha256 catches it, and without a manifest
    # (a copied cache, or a flat blob name) the tensor names do.
    assert main(["weights", "fetch", "test_resnet"]) == 0
    file = _snapshot(tmp_path / "hf")
    blob = file.resolve()
    other = _weights_bytes(tmp_path, {"conv.weight": torch.zeros(2, 3, 3, 3)})
    blob.write_bytes(other)
    status = locate(WeightNeed("test_resnet"))
    from rsna19.tools.weights import verify

    assert "recorded when it was fetched" in (verify(status).problem or "")
    (file.parents[2] / MANIFEST_NAME).unlink()
    renamed = blob.with_name("plainname")
    blob.rename(renamed)
    file.unlink()
    file.symlink_to(renamed)
    problem = verify(locate(WeightNeed("test_resnet"))).problem or ""
    assert "does not fit timm's test_resnet.r160_in1k" in problem and "missing" in problem


def test_fetch_rejects_weights_of_another_model(hub: _Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    hub.files[f"/{REPO}/resolve/main/model.safetensors"] = _weights_bytes(tmp_path, wrong)
    assert main(["weights", "fetch", "test_resnet"]) == 1
    out = capsys.readouterr().out
    assert "fails verification" in out and "does not fit timm's test_resnet.r160_in1k" in out
    assert not (_snapshot(tmp_path / "hf").parents[2] / MANIFEST_NAME).exists()


def test_fetch_into_dir_and_weights_dir_env(
    hub: _Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "shared_weights"
    assert main(["weights", "fetch", "test_resnet", "--dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"export RSNA19_WEIGHTS_DIR={target}" in out
    assert _snapshot(target).is_file() and not (tmp_path / "hf").exists()
    # Training does not look there until the variable names it.
    assert not locate(WeightNeed("test_resnet")).present
    monkeypatch.setenv("RSNA19_WEIGHTS_DIR", str(target))
    assert locate(WeightNeed("test_resnet")).path == _snapshot(target)
    assert main(["weights", "check", "test_resnet"]) == 0
    from rsna19.nets import build_model

    build_model("clf2d", backbone="test_resnet", n_windows=1, pretrained=True)  # loads from the folder


def test_fetch_with_the_hub_unreachable(hub: _Hub, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    import time
    import types

    import huggingface_hub.utils._http as hf_http

    # huggingface_hub retries a refused connection 5 times with back-off (23 s): no waiting here.
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=lambda _s: None, time=time.time))
    assert main(["weights", "fetch", "test_resnet"]) == 1
    out = capsys.readouterr().out
    assert f"cannot reach http://127.0.0.1:{port} to download {REPO}" in out


def test_fetch_refuses_in_offline_mode(hub: _Hub, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert main(["weights", "fetch", "test_resnet"]) == 1
    assert "HF_HUB_OFFLINE=0 rsna19 weights fetch" in capsys.readouterr().out
    assert hub.requests == []


def _pipeline(tmp_path: Path, models: dict[str, str]) -> Path:
    paths = []
    for name, body in models.items():
        p = tmp_path / f"{name}.yaml"
        p.write_text(body)
        paths.append(str(p))
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(
        json.dumps({"models": paths, "stack": str(CONFIGS / "stack" / "tiny.yaml"), "n_folds": 2, "device": "cpu"})
    )
    return pipe


def test_pipeline_needs_and_list(hub: _Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rsna19.pipeline.config import load_pipeline

    pipe = _pipeline(
        tmp_path,
        {
            "a": "model: {name: clf2d, backbone: test_resnet, pretrained: true}\n",
            "b": "model: {name: clf2dc, backbone: test_resnet, pretrained: true}\ndata: {slices: 3}\n",
            "c": "model: {name: seg_aux, backbone: tu-test_resnet, pretrained: true}\n",
            "d": "model: {name: clf2d, backbone: test_resnet}\n",  # from scratch: needs nothing
            "e": "model: {name: seg_aux, backbone: resnet18, pretrained: true}\n",  # smp encoder: not looked up
        },
    )
    needs = pipeline_needs(load_pipeline(pipe))
    by_name = {(n.backbone, bool(n.problem)): n for n in needs}
    assert by_name[("test_resnet", False)].models == ("a", "b", "c")
    assert "tu-resnet18" in (by_name[("resnet18", True)].problem or "")
    assert len(needs) == 2
    assert main(["weights", "list", "--pipeline", str(pipe)]) == 0
    out = capsys.readouterr().out
    assert "a +2 more" in out and REPO in out
    assert main(["weights", "check", "--pipeline", str(pipe)]) == 1
    assert main(["weights", "list"]) == 1  # neither a pipeline nor names
    assert "name a pipeline" in capsys.readouterr().err
