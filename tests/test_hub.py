"""`commonkv push` against a fake Hub on 127.0.0.1, driven by huggingface_hub's real client.

The server below answers the endpoints `create_repo`, `create_branch`, `upload_folder` (preupload, then the
NDJSON commit, and the README metadata check; every file is declared "regular" so contents travel inside the commit) and the pull-request
calls of `--create-pr`, and records every request. Tests check what was sent: the repo created, each file's
bytes committed, the token in the Authorization header only — never in our output or logs.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
from typer.testing import CliRunner

from commonkv_convert.cli import app
from commonkv_convert.errors import HubError, UserInputError
from commonkv_convert.hub import check_checkpoint_dir, push

from .helpers import convert_tiny

TOKEN = "hf_fakeSecretToken0123456789"


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {branch: {path: bytes}}}
        self.commits: list[dict] = []
        self.valid_token = TOKEN

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        path = urlparse(self.path).path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append({"method": method, "path": path, "query": urlparse(self.path).query,
                                     "auth": self.headers.get("Authorization"), "body": body})
        if self.headers.get("Authorization") != f"Bearer {self.server.valid_token}":
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        parts = path.strip("/").split("/")
        if path == "/api/validate-yaml":  # the Hub checks a README's front matter before it is committed
            content = json.loads(body)["content"]
            ok = content.startswith("---\n") and "library_name: transformers" in content
            return self._json(200 if ok else 400, {"warnings": [], "errors": [] if ok else [{"message": "bad"}]})
        if path == "/api/repos/create":
            data = json.loads(body)
            repo = f"{data['organization']}/{data['name']}"
            if repo in self.server.repos:
                return self._json(409, {"error": "You already created this model repo", "url": f"{self.server.url}/{repo}"})
            self.server.repos[repo] = {"visibility": data.get("visibility"), "files": {"main": {}}}
            return self._json(200, {"url": f"{self.server.url}/{repo}"})
        if parts[:2] == ["api", "models"] and len(parts) >= 5:
            repo, action, rest = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if repo not in self.server.repos:
                return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            files = self.server.repos[repo]["files"]
            if action == "branch":
                files.setdefault(rest, dict(files["main"]))
                return self._json(200, {})
            if action == "preupload":
                listed = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in listed]})
            if action == "commit":
                branch = rest.replace("%2F", "/")
                if branch not in files:
                    return self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                added = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                         for item in lines if item["key"] == "file"}
                files[branch].update(added)
                self.server.commits.append({"repo": repo, "branch": branch, "header": lines[0]["value"],
                                            "files": added})
                oid = f"{len(self.server.commits):040x}"
                return self._json(200, {"commitUrl": f"{self.server.url}/{repo}/commit/{oid}", "commitOid": oid,
                                        "success": True})
            if action == "discussions" and method == "POST":
                files.setdefault("refs/pr/1", dict(files["main"]))
                return self._json(200, {"num": 1, "url": f"{self.server.url}/{repo}/discussions/1"})
            if action == "discussions" and method == "GET":
                return self._json(200, {
                    "title": "PR", "num": 1, "author": {"name": "me"}, "createdAt": "2026-01-01T00:00:00.000Z",
                    "status": "draft", "repo": {"name": repo, "type": "model"}, "isPullRequest": True,
                    "events": [], "changes": {"base": "refs/heads/main"}, "filesWithConflicts": []})
        return self._json(404, {"error": f"fake hub: no route for {method} {path}"})

    def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.url)  # read once at import: patch the constant
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", "/nonexistent/token")  # no stored login
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_PROGRESS_BARS", True)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def converted(tiny_model_dirs, tmp_path_factory) -> Path:
    return convert_tiny(tiny_model_dirs["llama"], tmp_path_factory.mktemp("hub") / "ckpt", ratio=0.5, group_size=2)


@pytest.fixture
def ckpt(converted, tmp_path) -> Path:
    """A private copy: pushing refreshes the card in place."""
    return Path(shutil.copytree(converted, tmp_path / "tiny-commonkv"))


def _local_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_push_creates_repo_and_commits_every_file(hub, ckpt, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(ckpt.parent)
    result = CliRunner().invoke(app, ["push", str(ckpt), "me/tiny-commonkv", "--private", "--token", TOKEN])
    assert result.exit_code == 0, result.output
    assert "Pushed" in result.output and "me/tiny-commonkv" in result.output
    creates = [r for r in hub.requests if r["path"] == "/api/repos/create"]
    assert len(creates) == 1 and json.loads(creates[0]["body"]) == {
        "name": "tiny-commonkv", "organization": "me", "visibility": "private", "type": "model"}
    assert hub.repos["me/tiny-commonkv"]["visibility"] == "private"
    local = _local_files(ckpt)
    assert hub.repos["me/tiny-commonkv"]["files"]["main"] == local  # every file, byte for byte
    assert {"config.json", "commonkv_report.json", "modeling_commonkv.py", "README.md"} <= set(local)
    assert any(r["path"] == "/api/validate-yaml" for r in hub.requests)  # the card's metadata was checked
    assert len(hub.commits) == 1 and hub.commits[0]["header"]["summary"].startswith("Upload CommonKV checkpoint")
    # the card now says how to load it from the Hub
    assert 'from_pretrained("me/tiny-commonkv", trust_remote_code=True)' in local["README.md"].decode()
    # the token went to the server, and nowhere else
    # (huggingface_hub itself may GET its public agent registry, /api/agent-harnesses, without a token)
    assert [r["path"] for r in hub.requests if r["auth"] != f"Bearer {TOKEN}"] in ([], ["/api/agent-harnesses"])
    assert TOKEN not in result.output and TOKEN not in caplog.text


def test_token_from_env_then_rejected_token_is_one_line(hub, ckpt, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    plan = push(ckpt, "me/from-env")
    assert plan.token_source == "HF_TOKEN" and plan.result["commit"]
    monkeypatch.setenv("HF_TOKEN", "hf_wrongToken")
    result = CliRunner().invoke(app, ["push", str(ckpt), "me/other"])
    assert result.exit_code == HubError.exit_code
    assert "401 Unauthorized" in result.output and "HF_TOKEN" in result.output and "hf_wrongToken" not in result.output
    assert len(result.output.strip().splitlines()) <= 2  # the "Pushing ..." line and the error


def test_no_token_at_all_fails_before_any_request(hub, ckpt):
    with pytest.raises(HubError, match="No Hugging Face token"):
        push(ckpt, "me/x")
    assert hub.requests == []


def test_existing_repo_branch_and_pull_request(hub, ckpt):
    push(ckpt, "me/repo", token=TOKEN)
    push(ckpt, "me/repo", token=TOKEN, revision="ratio-0.5", commit_message="second")
    assert sum(r["path"] == "/api/repos/create" for r in hub.requests) == 2  # exist_ok: the 409 is fine
    assert hub.commits[-1]["branch"] == "ratio-0.5" and hub.commits[-1]["header"]["summary"] == "second"
    plan = push(ckpt, "me/repo", token=TOKEN, create_pr=True)
    assert plan.result["pr_url"].endswith("/discussions/1") and hub.commits[-1]["branch"] == "refs/pr/1"


def test_dry_run_lists_files_and_touches_nothing(hub, ckpt):
    before = _local_files(ckpt)
    result = CliRunner().invoke(app, ["push", str(ckpt), "me/dry", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["files"] == sorted(before) and data["token_source"] is None and data["card_refreshed"] is True
    assert hub.requests == [] and _local_files(ckpt) == before


def test_unreachable_hub_is_one_line(ckpt, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HubError, match=r"Cannot reach http://127\.0\.0\.1:\d+ .*network connection"):
        push(ckpt, "me/x", token=TOKEN, endpoint=f"http://127.0.0.1:{port}")


def test_eval_results_are_rendered_into_the_card_on_push(hub, ckpt):
    (ckpt / "commonkv_eval.json").write_text(json.dumps({
        "target": {"name": "tiny"}, "settings": {"context": 512},
        "tasks": {"ctx-ppl": {"ppl": 23.456, "tokens": 128}, "memory": {"rows": [{"removed": 0.5}]}}}))
    push(ckpt, "me/evaluated", token=TOKEN)
    card = hub.repos["me/evaluated"]["files"]["main"]["README.md"].decode()
    assert "| ctx-ppl | ppl | 23.46 |" in card and "| memory | rows[-1].removed | 0.5 |" in card
    assert "Not evaluated yet" not in card and card.count("## Evaluation") == 1
    assert card.startswith("---\n") and "kv-cache-compression" in card  # front matter kept


@pytest.mark.parametrize("breakage, message", [
    (lambda p: (p / "commonkv_report.json").write_text(json.dumps({"ratio": {}})), "never validated"),
    (lambda p: (p / "modeling_commonkv.py").unlink(), "missing modeling_commonkv.py"),
    (lambda p: next(p.glob("*.safetensors")).unlink(), "incomplete CommonKV checkpoint"),
    (lambda p: (p / "config.json").write_text(json.dumps({"model_type": "llama"})), "not a CommonKV checkpoint"),
    (lambda p: (p / "quantization.py").unlink(), "missing quantization.py"),
    (lambda p: (p / "eviction.py").unlink(), "missing eviction.py"),
    (lambda p: _truncate(next(p.glob("*.safetensors")), 100), "truncated or damaged"),
    (lambda p: next(p.glob("*.safetensors")).write_bytes(b"\xff" * 64), "damaged: header longer than the file"),
    (lambda p: _edit_config(p, lambda c: c.pop("commonkv") and c), "not a CommonKV checkpoint"),
    (lambda p: _edit_config(p, lambda c: c["commonkv"]["groups"].pop() and c), "not each of the 4 layers"),
    (lambda p: _edit_config(p, lambda c: c["commonkv"].update(format_version=9) or c), "format_version 9"),
    (lambda p: _edit_report(p, lambda v: v.update(passed=False)), "failed validation"),
])
def test_refuses_incomplete_or_unvalidated_checkpoints(hub, ckpt, breakage, message):
    breakage(ckpt)
    with pytest.raises(UserInputError, match=message):
        push(ckpt, "me/x", token=TOKEN)
    assert hub.requests == []


def _truncate(file: Path, drop: int) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:-drop])


def _edit_config(path: Path, change) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(change(config)))


def _edit_report(path: Path, change) -> None:
    report = json.loads((path / "commonkv_report.json").read_text())
    change(report["validation"])
    (path / "commonkv_report.json").write_text(json.dumps(report))


def test_runtime_file_list_is_the_runtime_package(ckpt):
    """One list: every runtime module ships with the checkpoint, and push checks exactly those."""
    from commonkv_convert.checkpoint.format import RUNTIME_DIR, RUNTIME_FILES

    modules = {p.name for p in RUNTIME_DIR.glob("*.py")} - {"__init__.py"}
    assert set(RUNTIME_FILES) == modules and {"quantization.py", "eviction.py"} <= modules
    assert all((ckpt / name).read_bytes() == (RUNTIME_DIR / name).read_bytes() for name in RUNTIME_FILES)


def test_refuses_a_plain_model_directory(tiny_model_dirs):
    with pytest.raises(UserInputError, match="not a CommonKV checkpoint"):
        check_checkpoint_dir(tiny_model_dirs["llama"])


def test_verbose_turns_on_hub_logging_and_never_logs_the_token(hub, ckpt, capfd, caplog):
    import logging as std_logging

    from huggingface_hub.utils import logging as hub_logging

    caplog.set_level(std_logging.DEBUG)
    try:
        result = CliRunner().invoke(app, ["push", str(ckpt), "me/verbose", "--token", TOKEN, "--verbose", "--json"])
        assert result.exit_code == 0, result.output
        assert hub_logging.get_verbosity() == hub_logging.INFO
    finally:
        hub_logging.set_verbosity_warning()  # the library default, for the tests that follow
    assert json.loads(result.stdout)["commit"]
    captured = capfd.readouterr()
    assert TOKEN not in result.output + captured.out + captured.err + caplog.text
