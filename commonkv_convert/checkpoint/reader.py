"""Open a source model (local directory or Hub id) and read its tensors one at a time.

Nothing here materializes the model: tensor names come from the index or the safetensors header,
and each tensor is read from the one shard that holds it when a later stage asks for it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open

from commonkv_convert.errors import ModelSourceError, UserInputError

CONFIG_NAME = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
# A Hub id is `name` or `namespace/name`; anything else with a path separator is a local path.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


@dataclass(frozen=True)
class _WeightFormat:
    """Where transformers looks for one serialization: a single file, or shards listed by an index."""

    single: str
    index: str


SAFETENSORS = _WeightFormat("model.safetensors", "model.safetensors.index.json")
PICKLE = _WeightFormat("pytorch_model.bin", "pytorch_model.bin.index.json")


class _Shard(Protocol):
    """What SourceModel needs from an open weight file; `safe_open` handles already fit."""

    def keys(self) -> Any: ...

    def get_tensor(self, name: str) -> torch.Tensor: ...

    def __exit__(self, *exc_info: object) -> Any: ...


class _PickleShard:
    """A pickle state dict, loaded once and memory-mapped, behind the same methods as `safe_open`."""

    def __init__(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, OSError) as err:
            raise ModelSourceError(
                f"{path} cannot be loaded safely ({_first_line(err)}). To resolve, convert it to safetensors."
            ) from err
        if not isinstance(state, dict):
            raise ModelSourceError(f"{path} does not hold a state dict. To resolve, convert it to safetensors.")
        self._state: dict[str, torch.Tensor] = state

    def keys(self) -> Any:
        return self._state.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        # A copy, as safe_open gives: an in-place edit by a caller must not change later reads.
        return self._state[name].clone()

    def __exit__(self, *exc_info: object) -> None:
        self._state = {}


def _open_shard(path: Path) -> _Shard:
    if path.suffix != ".safetensors":
        return _PickleShard(path)
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise ModelSourceError(
            f"{path} is not a readable safetensors file ({_first_line(err)}). To resolve, download the model again."
        ) from err


@dataclass
class SourceModel:
    """A source checkpoint on local disk whose tensors are read lazily, one shard handle per file."""

    path: Path
    model_id: str
    revision: str | None
    config: dict
    weight_map: dict[str, Path] = field(default_factory=dict, repr=False)
    _shards: dict[Path, _Shard] = field(default_factory=dict, repr=False)

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def has_tensor(self, name: str) -> bool:
        return name in self.weight_map

    def get_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor from its shard; `dtype` casts it (e.g. to fp32 for the math)."""
        if name not in self.weight_map:
            raise KeyError(f"{name} is not a tensor of {self.model_id}")
        file = self.weight_map[name]
        if file.suffix == ".safetensors":
            # A fresh memory map per read, unmapped right after: pages of tensors already read do not stay
            # resident in this process, so peak memory does not grow with the model's size.
            with _open_shard(file) as shard:
                tensor = shard.get_tensor(name)
        else:
            tensor = self._shard(file).get_tensor(name)
        return tensor if dtype is None else tensor.to(dtype)

    def tokenizer(self):
        """The source's tokenizer (calibration text is tokenized with it), or a one-line ModelSourceError."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError, TypeError) as err:
            raise ModelSourceError(f"{self.path} has no usable tokenizer ({str(err).splitlines()[0][:120]}). "
                                   "To resolve, add the tokenizer files of the base model to the directory.") from None

    def tokenizer_files(self) -> list[Path]:
        """Files to ship next to the converted weights so the checkpoint tokenizes and generates alike."""
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]

    def weights_bytes(self) -> int:
        return sum(file.stat().st_size for file in set(self.weight_map.values()))

    def close(self) -> None:
        for shard in self._shards.values():
            shard.__exit__(None, None, None)
        self._shards.clear()

    def _shard(self, file: Path) -> _Shard:
        if file not in self._shards:
            self._shards[file] = _open_shard(file)
        return self._shards[file]

    def __enter__(self) -> SourceModel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_model(
    model: str, *, revision: str | None = None, allow_pickle: bool = False, token: str | None = None
) -> SourceModel:
    """Resolve MODEL (directory or Hub id) to a local snapshot and index its tensors without reading them."""
    local = _local_dir(model)
    if local is not None and revision is not None:
        raise UserInputError(
            f"--revision {revision} only applies to Hub ids, and {model} is a local directory. "
            "To resolve, drop --revision or pass a Hub id."
        )
    root = local or _download_snapshot(model, revision=revision, allow_pickle=allow_pickle, token=token)
    config = _read_config(root)
    shards: dict[Path, _Shard] = {}
    weight_map = _resolve_weights(root, allow_pickle, shards)
    commit = None if local else root.name  # the Hub cache names each snapshot folder by its commit
    return SourceModel(root, model, commit, config, weight_map, shards)


def read_model_config(model: str, *, revision: str | None = None, token: str | None = None) -> dict:
    """config.json of a directory or Hub id, fetching nothing else (for `commonkv inspect`)."""
    local = _local_dir(model)
    return _read_config(local or _snapshot(model, revision, token, [CONFIG_NAME]))


def _local_dir(model: str) -> Path | None:
    """The directory MODEL names, or None when MODEL should be read as a Hub id."""
    if not model.strip():
        raise ModelSourceError("No model was given. To resolve, pass a local directory or a Hub id like org/name.")
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    looks_local = model.startswith((".", "/", "~")) or (os.sep in model and not _HUB_ID.fullmatch(model))
    if looks_local or path.exists():
        raise ModelSourceError(
            f"No model directory at {model}. To resolve, pass a directory that holds config.json and "
            "*.safetensors, or a Hub id like org/name."
        )
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelSourceError(
            f"{path} is not readable JSON ({_first_line(err)}). To resolve, download or save the model again."
        ) from err


def _read_config(root: Path) -> dict:
    path = root / CONFIG_NAME
    if not path.is_file():
        raise ModelSourceError(
            f"{root} is not a model directory: config.json is missing. To resolve, pass the directory "
            "written by save_pretrained() (it holds config.json and the weights)."
        )
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ModelSourceError(f"{path} is not a JSON object. To resolve, download or save the model again.")
    return config


def _resolve_weights(root: Path, allow_pickle: bool, shards: dict[Path, _Shard]) -> dict[str, Path]:
    """Map each tensor name to its file, preferring safetensors; pickle only when the user allowed it."""
    weight_map = _weight_map(root, SAFETENSORS, shards)
    if weight_map is None and not allow_pickle and _has_format(root, PICKLE):
        raise ModelSourceError(
            f"{root} holds only pickle weights (pytorch_model.bin), which can run code when loaded. "
            "To resolve, pass --allow-pickle if you trust the source, or convert it to safetensors."
        )
    if weight_map is None and allow_pickle:
        weight_map = _weight_map(root, PICKLE, shards)
    if not weight_map:
        raise ModelSourceError(
            f"{root} holds no model weights (model.safetensors or model.safetensors.index.json). To resolve, "
            "pass a directory written by save_pretrained(), or --allow-pickle for a Hub repo that has only "
            "pytorch_model.bin and that you trust."
        )
    return weight_map


def _has_format(root: Path, fmt: _WeightFormat) -> bool:
    return (root / fmt.index).is_file() or (root / fmt.single).is_file()


def _weight_map(root: Path, fmt: _WeightFormat, shards: dict[Path, _Shard]) -> dict[str, Path] | None:
    """Tensor name → file for one format, or None when the directory has no weights in it.

    Without an index the single file is opened to list its names; the handle is kept in `shards`
    so that the first `get_tensor` does not open it again.
    """
    if (root / fmt.index).is_file():
        return _map_from_index(root, root / fmt.index)
    single = root / fmt.single
    if not single.is_file():
        return None
    shards[single] = _open_shard(single)
    return dict.fromkeys(shards[single].keys(), single)


def _index_entries(index: Path) -> dict[str, str]:
    data = _read_json(index)
    entries = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ModelSourceError(f"{index} has no weight_map. To resolve, download or save the model again.")
    return entries


def _map_from_index(root: Path, index: Path) -> dict[str, Path]:
    entries = _index_entries(index)
    missing = sorted({file for file in entries.values() if not (root / file).is_file()})
    if missing:
        raise ModelSourceError(
            f"{index} lists {missing[0]}, which is missing ({len(missing)} shard(s) missing in all). "
            "To resolve, download the model again: the copy is incomplete."
        )
    return {name: root / file for name, file in entries.items()}


def _download_snapshot(repo_id: str, *, revision: str | None, allow_pickle: bool, token: str | None) -> Path:
    """Fetch config, tokenizer and only the weight files transformers would load.

    Metadata comes first so the weights can be chosen from the index: a repo that also ships a
    `consolidated.safetensors` or pickle copy costs no extra download. Later calls are pinned to the
    commit of the first, so a push in between cannot mix two revisions.
    """
    metadata = [CONFIG_NAME, *TOKENIZER_FILES, SAFETENSORS.index, PICKLE.index]
    root = _snapshot(repo_id, revision, token, metadata)
    for fmt in (SAFETENSORS, PICKLE) if allow_pickle else (SAFETENSORS,):
        files = _weight_files(root, fmt)
        root = _snapshot(repo_id, root.name, token, files)
        if all((root / file).is_file() for file in files):
            break
    return root


def _weight_files(root: Path, fmt: _WeightFormat) -> list[str]:
    if (root / fmt.index).is_file():
        return sorted(set(_index_entries(root / fmt.index).values()))
    return [fmt.single]


_OFFLINE = (
    "{repo} is not (fully) in the local Hugging Face cache and the Hub cannot be reached (offline). "
    "To resolve, download it once with network access (hf download {repo}) or pass a local directory."
)
_OFFLINE_SET = (
    "{repo} is not (fully) in the local Hugging Face cache and HF_HUB_OFFLINE is set, so the Hub is not "
    "contacted (offline). To resolve, unset HF_HUB_OFFLINE and download it once (hf download {repo}), "
    "or pass a local directory."
)
# Checked in order: the first class that matches gives the message (subclasses before their bases).
_HUB_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (
        hub_errors.RevisionNotFoundError,
        "Revision {revision} does not exist in {repo}. To resolve, pass an existing branch, tag or commit "
        "with --revision.",
    ),
    (
        hub_errors.GatedRepoError,
        "{repo} is gated and your token has no access to it. To resolve, accept its terms on "
        "https://huggingface.co/{repo}, then log in with `hf auth login` or pass --token.",
    ),
    (
        hub_errors.RepositoryNotFoundError,
        "{repo} was not found on the Hub, or it is private. To resolve, check the id, or log in with "
        "`hf auth login` (or pass --token) if it is private.",
    ),
    (
        hub_errors.HFValidationError,
        "{repo} is neither a local directory nor a valid Hub id. To resolve, pass an existing directory "
        "or a Hub id like org/name.",
    ),
    (
        hub_errors.HfHubHTTPError,
        "The Hub refused to serve {repo} ({reason}). To resolve, check your access (`hf auth login` or "
        "--token) or retry later.",
    ),
    (hub_errors.LocalEntryNotFoundError, _OFFLINE),
    (ConnectionError, _OFFLINE),
    (TimeoutError, _OFFLINE),
)


def _snapshot(repo_id: str, revision: str | None, token: str | None, patterns: list[str]) -> Path:
    """One `snapshot_download`, with every Hub failure turned into a one-line ModelSourceError."""
    try:
        folder = snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns)
    except tuple(kind for kind, _ in _HUB_ERRORS) as err:
        message = next(text for kind, text in _HUB_ERRORS if isinstance(err, kind))
        if message is _OFFLINE and hub_constants.HF_HUB_OFFLINE:
            message = _OFFLINE_SET
        reason = _first_line(err)
        raise ModelSourceError(message.format(repo=repo_id, revision=revision or "main", reason=reason)) from err
    return Path(folder)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
