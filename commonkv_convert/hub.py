"""`commonkv push`: publish a converted checkpoint to the Hugging Face Hub.

Only complete, validated CommonKV checkpoints are pushed (a half-converted or unvalidated directory on the Hub
would be found and loaded by others). The model card is refreshed first (load snippet → the repo id,
evaluation results from commonkv_eval.json), then `HfApi.create_repo(exist_ok=True)` and `upload_folder`.
The token comes from --token, then HF_TOKEN, then the stored login (`hf auth login`); it is passed to the
client and never printed: messages name only where it came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint.card import refresh_card, update_card
from .checkpoint.format import (CARD_FILE, CONFIG_FILE, INDEX_FILE, REPORT_FILE, RUNTIME_FILES, SINGLE_SHARD,
                                TOKENIZER_FILES, shard_problem, shard_tensors)
from .errors import HubError, UserInputError
from .runtime.configuration_commonkv import CommonKVConfig

IGNORE = [".*", "**/.*", "*.tmp"]  # temporary files of an interrupted write, editor files, .git


@dataclass
class PushPlan:
    path: Path
    repo_id: str
    files: list[str]
    bytes: int
    token_source: str | None
    card_changed: bool
    revision: str | None = None
    create_pr: bool = False
    private: bool = False
    result: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "repo_id": self.repo_id, "files": self.files, "bytes": self.bytes,
                "token_source": self.token_source, "card_refreshed": self.card_changed, "revision": self.revision,
                "create_pr": self.create_pr, "private": self.private, **self.result}


def check_checkpoint_dir(path: Path) -> dict:
    """The config of a complete, loadable, validated CommonKV checkpoint at `path`, or a one-line UserInputError.

    Reads headers only: the config block's schema, every runtime file, each shard's safetensors header against
    its size and against the index, the validation record."""
    if not path.is_dir():
        raise UserInputError(f"{path} is not a directory. To resolve, pass the output directory of commonkv convert.")
    config = _read_json(path / CONFIG_FILE, path)
    if config.get("model_type") != "commonkv" or "commonkv" not in config:
        raise UserInputError(f"{path} is not a CommonKV checkpoint (config.json has no commonkv block). "
                             f"To resolve, convert it first: commonkv convert MODEL {path}.")
    try:
        CommonKVConfig(**{k: v for k, v in config.items() if k != "model_type"}).check_block()
    except (ValueError, TypeError) as err:
        raise UserInputError(f"{path}/{CONFIG_FILE}: {err}") from None
    missing = [name for name in (*RUNTIME_FILES, CARD_FILE, REPORT_FILE) if not (path / name).is_file()]
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer files")
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, path).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing += [s for s in shards if not (path / s).is_file()]
        if not shards:
            missing.append(f"shards listed in {INDEX_FILE}")
    elif (path / SINGLE_SHARD).is_file():
        weight_map, shards = None, [SINGLE_SHARD]
    else:
        missing.append(f"{SINGLE_SHARD} (or an index and its shards)")
    if missing:
        raise UserInputError(f"{path} is an incomplete CommonKV checkpoint: missing {', '.join(missing)}. "
                             "To resolve, convert again into an empty directory and push that.")
    for shard in shards:
        problem = shard_problem(path / shard)
        absent = [] if problem or weight_map is None else \
            sorted({n for n, s in weight_map.items() if s == shard} - shard_tensors(path / shard))
        if problem or absent:
            why = problem or f"lacks {len(absent)} tensor(s) the index places there ({absent[0]})"
            raise UserInputError(f"{path}/{shard} is damaged: {why}. To resolve, convert again into an empty "
                                 "directory and push that.")
    validation = _read_json(path / REPORT_FILE, path).get("validation")
    if not validation:
        raise UserInputError(f"{path} was never validated (converted with --no-validate). To resolve, convert it "
                             "again without --no-validate so the logits and cache bytes are checked before publishing.")
    if not validation.get("bytes_match"):
        raise UserInputError(f"{path} failed validation (cache bytes differ from the plan). To resolve, convert "
                             "again; report the bug if it persists.")
    if validation.get("passed") is False:
        raise UserInputError(f"{path} failed validation (its logits differ from the source's by more than --max-kl). "
                             "To resolve, convert again at a lower --ratio.")
    return config


def resolve_token(token: str | None) -> tuple[str | None, str | None]:
    """(token, where it came from): --token, then HF_TOKEN, then the stored login; (None, None) if none."""
    if token:
        return token, "--token"
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        return None, None
    return found, "HF_TOKEN" if os.environ.get("HF_TOKEN") == found else "stored login"


def push(path: Path, repo_id: str, *, private: bool = False, token: str | None = None, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, dry_run: bool = False,
         endpoint: str | None = None) -> PushPlan:
    """Refresh the card and upload the checkpoint at `path` to `repo_id` (or only plan it with dry_run)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserInputError(f"{repo_id!r} is not a valid repo id. To resolve, pass NAMESPACE/NAME, "
                             "e.g. my-org/SmolLM2-135M-commonkv-0.5.") from None
    if "/" not in repo_id:
        raise UserInputError(f"{repo_id!r} has no namespace. To resolve, pass NAMESPACE/NAME "
                             "(your user name or an organization).")
    if create_pr and revision not in (None, "main"):
        raise UserInputError("--create-pr opens a pull request against the default branch, so it cannot be combined "
                             "with --revision. To resolve, drop one of them.")
    path = Path(path)
    check_checkpoint_dir(path)
    card = refresh_card(path, repo_id)
    card_changed = card != (path / CARD_FILE).read_text()
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and not _ignored(p, path))
    size = sum((path / f).stat().st_size for f in files)
    token, source = resolve_token(token)
    plan = PushPlan(path, repo_id, files, size, source, card_changed, revision, create_pr, private)
    if dry_run:
        return plan
    if token is None:
        raise HubError("No Hugging Face token found. To resolve, run `hf auth login` with a write token, "
                       "set HF_TOKEN, or pass --token.")
    if card_changed:
        update_card(path, repo_id)
    plan.result = _upload(path, repo_id, token=token, source=source, private=private, revision=revision,
                          create_pr=create_pr, commit_message=commit_message or _default_message(path),
                          endpoint=endpoint)
    return plan


def _upload(path: Path, repo_id: str, *, token: str, source: str, private: bool, revision: str | None,
            create_pr: bool, commit_message: str, endpoint: str | None) -> dict:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(repo_id, source, api.endpoint, revision):
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=path, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr, ignore_patterns=list(IGNORE))
    return {"repo_url": str(url), "commit_url": info.commit_url, "commit": info.oid, "pr_url": info.pr_url}


@contextmanager
def hub_errors(repo_id: str, source: str, endpoint: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one-line HubErrors that name the fix (never the token)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed. To resolve, unset HF_HUB_OFFLINE "
                       "and rerun with network access.") from None
    except RevisionNotFoundError:
        raise HubError(f"Revision {revision!r} does not exist in {repo_id}. To resolve, pass an existing branch "
                       "or omit --revision.") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise HubError(f"The Hub rejected the token from {source} (401 Unauthorized). To resolve, run "
                           "`hf auth login` with a write token, set HF_TOKEN, or pass --token.") from None
        if status == 403 or isinstance(error, RepositoryNotFoundError):
            raise HubError(f"The token from {source} may not write to {repo_id} ({status}). To resolve, use a "
                           "token with write access to that namespace, or push to your own namespace.") from None
        raise HubError(f"The Hub answered {status} for {repo_id}: {_first_line(error)}. To resolve, retry later "
                       "or check the repo id and options.") from None
    except Exception as error:
        if isinstance(error, (ConnectionError, TimeoutError)) or _is_transport_error(error):
            raise HubError(f"Cannot reach {endpoint} ({type(error).__name__}: {_first_line(error)}). To resolve, "
                           "check the network connection (and HF_ENDPOINT if set), then rerun.") from None
        raise


def _is_transport_error(error: BaseException) -> bool:
    """httpx-style network errors (huggingface_hub's HTTP client), without importing a specific client."""
    return any(cls.__name__ in ("TransportError", "RequestError") for cls in type(error).__mro__)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _ignored(file: Path, root: Path) -> bool:
    parts = file.relative_to(root).parts
    return any(p.startswith(".") for p in parts) or file.name.endswith(".tmp")


def _default_message(path: Path) -> str:
    ratio = json.loads((path / CONFIG_FILE).read_text())["commonkv"].get("ratio", {})
    achieved = ratio.get("achieved")
    return f"Upload CommonKV checkpoint ({achieved:.1%} of the KV cache removed)" if achieved is not None \
        else "Upload CommonKV checkpoint"


def _read_json(file: Path, root: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserInputError(f"{root} has no {file.name}. To resolve, pass the output directory of commonkv convert.") from None
    except (OSError, ValueError) as err:
        raise UserInputError(f"{file} is unreadable ({err}). To resolve, convert again.") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{file} is not a JSON object. To resolve, convert again.")
    return data
