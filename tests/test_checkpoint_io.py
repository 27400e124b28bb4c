"""Round trips through CheckpointWriter and open_model, and every way a model source is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hub_errors
from safetensors import safe_open

from commonkv_convert.checkpoint import reader
from commonkv_convert.checkpoint.reader import open_model
from commonkv_convert.checkpoint.writer import INDEX_NAME, WEIGHTS_NAME, CheckpointWriter, parse_size
from commonkv_convert.errors import ModelSourceError, UserInputError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _no_stray_files():
    """Fail a test that leaves anything in the repository root (everything belongs under tmp_path)."""
    before = set(REPO_ROOT.iterdir())
    yield
    assert set(REPO_ROOT.iterdir()) == before


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=generator)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=generator),
        "model.layers.0.self_attn.q_proj.weight": base.t(),  # non-contiguous view
        "model.layers.0.self_attn.k_proj.weight": base[:3],  # shares storage with the next one
        "model.layers.0.self_attn.v_proj.weight": base[3:],
        "model.layers.1.mlp.gate_proj.weight": torch.randn(4, 8, generator=generator).to(torch.bfloat16),
        "model.layers.1.input_layernorm.weight": torch.ones(8, dtype=torch.float16),
        "position_ids": torch.arange(10, dtype=torch.int64),
        "model.kv_groups.0.mask": torch.tensor([1, 0, 1], dtype=torch.int8),
    }


def _write(out: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str = 200, **kwargs) -> Path:
    with CheckpointWriter(out, max_shard_size=max_shard_size, **kwargs) as writer:
        writer.write_json("config.json", CONFIG)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor)
        return writer.finalize()


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# --- writer -------------------------------------------------------------------------------------


def test_round_trip_through_several_shards(tmp_path: Path) -> None:
    tensors = _tensors()
    out = _write(tmp_path / "out", tensors)
    with open_model(str(out)) as model:
        assert model.revision is None and model.config == CONFIG
        assert sorted(model.tensor_names()) == sorted(tensors)
        for name, tensor in tensors.items():
            loaded = model.get_tensor(name)
            assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor)
        assert model.get_tensor("model.layers.1.mlp.gate_proj.weight", torch.float32).dtype == torch.float32
        shards = {path for path in out.iterdir() if path.suffix == ".safetensors"}
        assert len(shards) > 2
        assert model.weights_bytes() == sum(path.stat().st_size for path in shards)
        assert not model.has_tensor("missing")
        with pytest.raises(KeyError):
            model.get_tensor("missing")


def test_index_matches_shards(tmp_path: Path) -> None:
    tensors = _tensors()
    out = _write(tmp_path / "out", tensors)
    index = json.loads((out / INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    assert list(weight_map) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    files = sorted(set(weight_map.values()))
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert sorted(path.name for path in out.iterdir()) == sorted([*files, INDEX_NAME, "config.json"])
    for file in files:
        with safe_open(str(out / file), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert sorted(handle.keys()) == sorted(n for n, f in weight_map.items() if f == file)


def test_single_shard_has_no_index(tmp_path: Path) -> None:
    out = _write(tmp_path / "out", _tensors(), max_shard_size="1GB")
    assert sorted(path.name for path in out.iterdir()) == ["config.json", WEIGHTS_NAME]
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_tensor_larger_than_limit_gets_its_own_shard(tmp_path: Path) -> None:
    out = _write(tmp_path / "out", {"a": torch.zeros(4), "big": torch.zeros(100), "b": torch.zeros(4)}, 64)
    assert json.loads((out / INDEX_NAME).read_text())["weight_map"] == {
        "a": "model-00001-of-00003.safetensors",
        "b": "model-00003-of-00003.safetensors",
        "big": "model-00002-of-00003.safetensors",
    }


def test_writes_are_deterministic(tmp_path: Path) -> None:
    first = _write(tmp_path / "first", _tensors())
    second = _write(tmp_path / "second", _tensors())
    assert _digests(first) == _digests(second)
    assert len(_digests(first)) > 3


def test_side_files(tmp_path: Path) -> None:
    src = tmp_path / "tokenizer.json"
    src.write_text('{"version": "1.0"}')
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.write_json("sub/report.json", {"b": 1, "a": [1, 2]})
        writer.write_text("README.md", "# card\n")
        writer.copy_file(src)
        writer.copy_file(src, "copy.json")
        for bad in ("../escape.json", "/abs.json", "model.safetensors", INDEX_NAME):
            with pytest.raises(ValueError):
                writer.write_text(bad, "x")
        out = writer.finalize()
    assert (out / "sub/report.json").read_text() == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    assert (out / "README.md").read_text() == "# card\n"
    assert (out / "tokenizer.json").read_bytes() == (out / "copy.json").read_bytes() == src.read_bytes()
    assert not (tmp_path / "escape.json").exists()


def test_duplicate_tensor_name_is_refused(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "out", max_shard_size=8) as writer:
        writer.add_tensor("a", torch.zeros(4))
        writer.add_tensor("b", torch.zeros(4))  # flushes "a" into its own shard
        with pytest.raises(ValueError):
            writer.add_tensor("a", torch.zeros(4))


def test_exception_leaves_no_trace(tmp_path: Path) -> None:
    out = tmp_path / "new" / "nested" / "out"
    with pytest.raises(RuntimeError, match="boom"), CheckpointWriter(out, max_shard_size=8) as writer:
        writer.write_json("config.json", CONFIG)
        for name, tensor in _tensors().items():
            writer.add_tensor(name, tensor)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_leaving_without_finalize_discards(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add_tensor("a", torch.zeros(4))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        writer.add_tensor("b", torch.zeros(4))


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    out = _write(tmp_path / "out", {"old": torch.zeros(2)})
    before = _digests(out)
    with pytest.raises(UserInputError, match="--overwrite"):
        _write(out, {"new": torch.ones(2)})
    assert _digests(out) == before
    with pytest.raises(RuntimeError), CheckpointWriter(out, overwrite=True) as writer:
        writer.add_tensor("new", torch.ones(2))
        raise RuntimeError("failed half way")
    assert _digests(out) == before
    _write(out, {"new": torch.ones(2)}, overwrite=True)
    with open_model(str(out)) as model:
        assert model.tensor_names() == ["new"]
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("not a directory")
    for overwrite in (False, True):
        with pytest.raises(UserInputError, match="not a directory"):
            _write(out, {"a": torch.zeros(2)}, overwrite=overwrite)
    assert out.read_text() == "not a directory"


@pytest.mark.parametrize(
    ("text", "size"),
    [("1000", 1000), (1000, 1000), ("500MB", 500 * 10**6), ("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29), ("64kib", 65536)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "2 GBs", "-1", "0", 0, "1e9", "2 parsecs"])
def test_parse_size_refuses(text: str | int) -> None:
    with pytest.raises(UserInputError, match="To resolve"):
        parse_size(text)


# --- reader -------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo[ModelSourceError]) -> str:
    message = str(err.value)
    assert "\n" not in message and "To resolve" in message
    return message


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local-path errors must be decided before anything asks the Hub."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Hub was consulted for a local path")

    monkeypatch.setattr(reader, "snapshot_download", fail)


@pytest.mark.usefixtures("no_hub")
def test_missing_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for missing in (str(tmp_path / "nope"), "./nope", "deep/er/nope", "~/surely-not-here-commonkv"):
        with pytest.raises(ModelSourceError) as err:
            open_model(missing)
        assert "No model directory" in _one_line(err)


@pytest.mark.usefixtures("no_hub")
def test_file_instead_of_directory(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelSourceError) as err:
        open_model(str(weights))
    assert "No model directory" in _one_line(err)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as err:
        open_model(str(tmp_path))
    assert "config.json is missing" in _one_line(err)


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    for allow_pickle in (False, True):
        with pytest.raises(ModelSourceError) as err:
            open_model(str(tmp_path), allow_pickle=allow_pickle)
        assert "no model weights" in _one_line(err)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    out = _write(tmp_path / "out", _tensors())
    sorted(out.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(ModelSourceError) as err:
        open_model(str(out))
    assert "missing" in _one_line(err)


def test_revision_with_local_directory_is_refused(tmp_path: Path) -> None:
    out = _write(tmp_path / "out", {"a": torch.zeros(2)})
    with pytest.raises(UserInputError, match="--revision"):
        open_model(str(out), revision="main")


def _pickle_model(root: Path, tensors: dict[str, torch.Tensor], sharded: bool) -> None:
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    names = list(tensors)
    if not sharded:
        torch.save({n: tensors[n].clone() for n in names}, root / "pytorch_model.bin")
        return
    halves = {"pytorch_model-00001-of-00002.bin": names[:4], "pytorch_model-00002-of-00002.bin": names[4:]}
    for file, part in halves.items():
        torch.save({n: tensors[n].clone() for n in part}, root / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    (root / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("sharded", [False, True])
def test_pickle_weights_need_allow_pickle(tmp_path: Path, sharded: bool) -> None:
    tensors = _tensors()
    _pickle_model(tmp_path / "m", tensors, sharded)
    with pytest.raises(ModelSourceError) as err:
        open_model(str(tmp_path / "m"))
    assert "--allow-pickle" in _one_line(err)
    with open_model(str(tmp_path / "m"), allow_pickle=True) as model:
        assert sorted(model.tensor_names()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(model.get_tensor(name), tensor)
        model.get_tensor("position_ids").zero_()  # a caller's in-place edit must not stick
        assert torch.equal(model.get_tensor("position_ids"), tensors["position_ids"])


def test_safetensors_preferred_over_pickle(tmp_path: Path) -> None:
    _pickle_model(tmp_path / "m", {"from_pickle": torch.zeros(2)}, sharded=False)
    _write(tmp_path / "st", {"from_safetensors": torch.ones(2)})
    (tmp_path / "st" / WEIGHTS_NAME).rename(tmp_path / "m" / WEIGHTS_NAME)
    with open_model(str(tmp_path / "m"), allow_pickle=True) as model:
        assert model.tensor_names() == ["from_safetensors"]


def test_tokenizer_files(tmp_path: Path) -> None:
    out = _write(tmp_path / "out", {"a": torch.zeros(2)})
    for name in ("tokenizer.json", "generation_config.json", "unrelated.txt"):
        (out / name).write_text("{}")
    with open_model(str(out)) as model:
        assert model.tokenizer_files() == [out / "tokenizer.json", out / "generation_config.json"]


def test_offline_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: patch the constant as well as the env.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError) as err:
        open_model("nonexistent-org/nonexistent-model")
    message = _one_line(err)
    assert "offline" in message and "hf download nonexistent-org/nonexistent-model" in message


def _http_error(kind: type[hub_errors.HfHubHTTPError], status: int) -> hub_errors.HfHubHTTPError:
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return kind(f"{status} Client Error", response=response)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_http_error(hub_errors.RepositoryNotFoundError, 404), "not found"),
        (_http_error(hub_errors.GatedRepoError, 403), "gated"),
        (_http_error(hub_errors.RevisionNotFoundError, 404), "Revision v9"),
        (_http_error(hub_errors.HfHubHTTPError, 401), "401 Client Error"),
        (hub_errors.LocalEntryNotFoundError("not cached"), "offline"),
        (hub_errors.OfflineModeIsEnabled("offline"), "offline"),
        (hub_errors.HFValidationError("bad id"), "valid Hub id"),
        (TimeoutError("timed out"), "offline"),
    ],
)
def test_hub_errors_are_one_liners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, expected: str
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(reader, "snapshot_download", fail)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError) as err:
        open_model("some-org/some-model", revision="v9")
    assert expected in _one_line(err)


def test_hub_download_fetches_only_what_transformers_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _write(tmp_path / "repo", _tensors())  # stands in for the Hub repo, with an index
    (repo / "consolidated.safetensors").write_bytes(b"never downloaded")
    snapshot = tmp_path / "cache" / "snapshots" / COMMIT
    calls: list[tuple[str | None, list[str]]] = []

    def fake_download(repo_id: str, *, revision: str | None, token: str | None, allow_patterns: list[str]) -> str:
        assert repo_id == "org/tiny" and token == "secret"
        calls.append((revision, allow_patterns))
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            if (repo / name).is_file():
                (snapshot / name).write_bytes((repo / name).read_bytes())
        return str(snapshot)

    monkeypatch.setattr(reader, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    with open_model("org/tiny", revision="main", token="secret") as model:
        assert (model.model_id, model.revision, model.path) == ("org/tiny", COMMIT, snapshot)
        assert torch.equal(model.get_tensor("position_ids"), torch.arange(10))
    shards = sorted(path.name for path in repo.glob("model-*.safetensors"))
    assert calls[0][0] == "main" and "config.json" in calls[0][1] and INDEX_NAME in calls[0][1]
    assert calls[1:] == [(COMMIT, shards)]
    assert not (snapshot / "consolidated.safetensors").exists()
