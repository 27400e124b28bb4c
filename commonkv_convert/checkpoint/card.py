"""Model card of a converted checkpoint, with the Hub's front matter so the result is found and loads.

Written at convert time; `refresh_card` later rewrites the two parts that change after conversion — how to
load it (the Hub repo id once pushed) and the evaluation results (`commonkv_eval.json`, written by
`commonkv eval`) — between HTML-comment markers, leaving everything else (and any user edits) alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..decode_cost import CPU_MACS_PER_BYTE, config_predictions
from ..runtime.cache_options import KVCacheOptions
from .format import CARD_FILE, CONFIG_FILE, EVAL_FILE, bits_label

TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

KV-cache-compressed version of {{ source }} made with [commonkv](https://pypi.org/project/commonkv/)
(CommonKV: cross-layer parameter sharing of the K/V projections via SVD).

- KV cache removed: **{{ achieved_pct }}** of the full cache per token (requested {{ requested_pct }}),
  {{ elements }} cache elements per token instead of {{ full_elements }}.
- Groups: {{ n_merged }} merged, {{ n_per_layer }} per-layer latent, {% if n_latent_values %}{{ n_latent_values }} with raw keys and a value latent, {% endif %}{{ n_keep }} layers caching their own keys and values (no latent).

## Load

{{ load }}
The modeling code ships with the checkpoint (`modeling_commonkv.py`, needs only torch and transformers).
With `pip install commonkv`, `trust_remote_code` is not needed.

## Evaluation

{{ evaluation }}
## Decode cost

{{ decode }}
## Plan

| layers | mode | rank |{% if bits %} bits |{% endif %} elements/token | est. key err | est. value err |
|---|---|---|{% if bits %}---|{% endif %}---|---|---|
{% for g in groups %}| {{ g.layers | join(",") }} | {{ g.mode }} | {{ g.rank }} |{% if bits %} {{ g.bits }} |{% endif %} {{ g.elements }} | {{ g.key_error }} | {{ g.value_error }} |
{% endfor %}{% if bits %}
bits: the precision a group's cache is stored at (packed codes with a float16 minimum and step per
{{ layout.group }} values{% if layout.residual %}, the {{ layout.residual }} most recent tokens in the model dtype{% endif %}{% if layout.sink %}, the first {{ layout.sink }} in the model dtype and out of their group's range{% endif %}{% if layout.clip %}, each group's range chosen for the least squared error{% endif %};
"-": the model dtype{% if tails %}; "4, 2 from 96": latent channels 0-95 at 4 bits, the rest at 2{% endif %}).
Load with `kv_cache={"bits": 16}` to store every group unquantized, or 8, 4, 2 to store every group at that
precision.
{% endif %}
## Reproduce

```bash
{{ command }}
```
"""


def render_card(config_block: dict, source: str, name: str, command: str, full_elements: int,
                elements: int, evaluation: dict | None = None, *, base_model: str | None = None,
                model_config: dict | None = None) -> str:
    """Markdown model card for a checkpoint converted from `source` (a path or Hub id, as given). `base_model` is
    the Hub id of what was converted (see `hub_base_model`): the Hub links the card to it through the front matter.
    `model_config` (the checkpoint's config.json) gives the predicted decode cost; without it `refresh_card` adds
    it later from the written config.
    """
    groups = config_block["groups"]
    rows = []
    for g in groups:
        errs = g.get("est_error", {})
        rows.append({
            "layers": g["layers"], "mode": g["mode"], "rank": g.get("rank", "-"),
            "bits": bits_label(g),
            "elements": g.get("elements", "-"),
            "key_error": f"{errs['key']:.4f}" if errs else "-",
            "value_error": f"{errs['value']:.4f}" if errs else "-",
        })
    data = ModelCardData(
        base_model=base_model,
        tags=["commonkv", "kv-cache-compression"],
        library_name="transformers",
        pipeline_tag="text-generation",
    )
    ratio = config_block["ratio"]
    card = ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        name=name,
        source=f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else f"`{source}`",
        achieved_pct=f"{ratio['achieved']:.1%}",
        requested_pct=f"{ratio['requested']:.1%}",
        elements=elements,
        full_elements=full_elements,
        n_merged=sum(g["mode"] == "merged" for g in groups),
        n_per_layer=sum(g["mode"] == "per_layer" for g in groups),
        n_latent_values=sum(g["mode"] == "latent_values" for g in groups),
        n_keep=sum(len(g["layers"]) for g in groups if g["mode"] == "keep"),
        load=_section("load", _load_snippet(name, base_model)),
        evaluation=_section("eval", evaluation_markdown(evaluation)),
        decode=_section("decode", decode_markdown(model_config)),
        groups=rows,
        bits=any("bits" in g for g in groups),  # a bits column only for plans that quantize a group
        tails=any("tail" in g for g in groups),
        layout=KVCacheOptions.from_entry(config_block.get("quantization")),
        command=command,
    )
    return str(card)


def refresh_card(checkpoint: Path, repo_id: str | None = None) -> str:
    """The checkpoint's README.md with its title and load snippet naming `repo_id` (when given), its evaluation
    section re-rendered from commonkv_eval.json and its decode-cost section from config.json (each when present).
    Returns the new text; writes nothing."""
    card = ModelCard.load(checkpoint / CARD_FILE)
    text = card.content
    if repo_id is not None:
        text = _replace_section(text, "load", _load_snippet(repo_id, card.data.base_model))
        text = re.sub(r"^# .*$", lambda _: f"# {repo_id.split('/')[-1]}", text, count=1, flags=re.MULTILINE)  # the title
    eval_path = checkpoint / EVAL_FILE
    if eval_path.is_file():
        text = _replace_section(text, "eval", evaluation_markdown(json.loads(eval_path.read_text())))
    config_path = checkpoint / CONFIG_FILE
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if isinstance(config.get("commonkv"), dict):
            text = _replace_section(text, "decode", decode_markdown(config))
    return text


def update_card(checkpoint: Path, repo_id: str | None = None) -> bool:
    """Rewrite the checkpoint's README.md in place as `refresh_card` renders it (atomic); True if it changed.
    `commonkv eval` can call this after writing commonkv_eval.json; `commonkv push` does before uploading."""
    card = checkpoint / CARD_FILE
    text = refresh_card(checkpoint, repo_id)
    if text == card.read_text():
        return False
    tmp = checkpoint / f".{CARD_FILE}.tmp"
    tmp.write_text(text)
    tmp.replace(card)
    return True


def evaluation_markdown(evaluation: dict | None) -> str:
    """A task | metric | value table from `commonkv eval` output ({"tasks": {task: metrics}} or the bare map)."""
    if not evaluation:
        return "Not evaluated yet. Run `commonkv eval DIR` to measure it; `commonkv push` then adds the results here.\n"
    tasks = evaluation.get("tasks", evaluation)
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in tasks.items():
        for metric, value in _scalars(metrics):
            lines.append(f"| {task} | {metric} | {_format(value)} |")
    settings = evaluation.get("settings")
    note = ""
    if isinstance(settings, dict) and settings:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items() if isinstance(v, (int, float, str)))
        note = f"\nSettings: {shown}.\n" if shown else ""
    return "Measured with `commonkv eval`:\n\n" + "\n".join(lines) + "\n" + note


def decode_markdown(config: dict | None) -> str:
    """The predicted decode step against the full cache's, per context length and batch size (decode_cost.py)."""
    if config is None:
        return "Not predicted yet: `commonkv eval` or `commonkv push` add it from config.json.\n"
    batches = (1, 8)
    rows = config_predictions(config, batches=batches)
    lines = ["| cached tokens | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for t in sorted({r.tokens for r in rows}):
        cells = [f"{r.cost:.2f}× (MACs {r.macs:.2f}×, bytes {r.bytes:.2f}×)" for r in rows if r.tokens == t]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return ("Predicted time of one decode step relative to the full cache (> 1: slower), from the plan alone "
            f"(`commonkv_convert/decode_cost.py`: multiply-adds plus bytes moved at {CPU_MACS_PER_BYTE:g} MACs per "
            "byte, a 2-core CPU's balance; the rest of the model included). Latent layers rebuild every cached "
            "key at every step, so the cost grows with the context.\n\n" + "\n".join(lines) + "\n")


def _scalars(metrics) -> list[tuple[str, object]]:
    """Scalar metrics of a task; for a list of rows (e.g. per context length) the last row's scalars."""
    if not isinstance(metrics, dict):
        return [("value", metrics)] if isinstance(metrics, (int, float, str)) else []
    out = []
    for key, value in metrics.items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            out.append((key, value))
        elif isinstance(value, list) and value and isinstance(value[-1], dict):
            out.extend((f"{key}[-1].{k}", v) for k, v in _scalars(value[-1]))
    return out


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _load_snippet(repo: str, base_model: str | None) -> str:
    what = f"{base_model} with a smaller KV cache" if base_model else "the converted model"
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

# {what}
model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)  # reads the shipped config
```
"""


def _section(name: str, body: str) -> str:
    return f"<!-- commonkv:{name} -->\n{body}<!-- /commonkv:{name} -->\n"


def _replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"<!-- commonkv:{name} -->\n.*?<!-- /commonkv:{name} -->\n", re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: _section(name, body), text, count=1)
    heading = {"eval": "Evaluation", "load": "Load", "decode": "Decode cost"}[name]
    return text.rstrip("\n") + f"\n\n## {heading}\n\n" + _section(name, body)


def hub_base_model(model: str, config: dict) -> str | None:
    """The Hub id a card names as base_model: MODEL itself when it is one (what was downloaded and converted),
    else the id a local copy's config still records in `_name_or_path`, else None (a path is no base_model)."""
    for name in (model, config.get("_name_or_path")):
        if isinstance(name, str) and is_hub_id(name):
            return name
    return None


def is_hub_id(name: str) -> bool:
    """`namespace/name` as the Hub spells repo ids (what base_model accepts), and not an existing local path."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return "/" in name and not Path(name).expanduser().exists()
