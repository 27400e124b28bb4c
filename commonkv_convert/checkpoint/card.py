"""Model card of a converted checkpoint, with the Hub's front matter so the result is found and loads."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

KV-cache-compressed version of `{{ base_model }}` made with [commonkv](https://pypi.org/project/commonkv/)
(CommonKV: cross-layer parameter sharing of the K/V projections via SVD).

- KV cache removed: **{{ achieved_pct }}** of the full cache per token (requested {{ requested_pct }}),
  {{ elements }} cache elements per token instead of {{ full_elements }}.
- Groups: {{ n_merged }} merged, {{ n_per_layer }} per-layer latent, {{ n_keep }} unchanged layers.

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ repo_hint }}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{{ repo_hint }}")
```

The modeling code ships with the checkpoint (`modeling_commonkv.py`, needs only torch and transformers).
With `pip install commonkv`, `trust_remote_code` is not needed.

## Plan

| layers | mode | rank | elements/token | est. key err | est. value err |
|---|---|---|---|---|---|
{% for g in groups %}| {{ g.layers | join(",") }} | {{ g.mode }} | {{ g.rank }} | {{ g.elements }} | {{ g.key_error }} | {{ g.value_error }} |
{% endfor %}
## Reproduce

```bash
{{ command }}
```
"""


def render_card(config_block: dict, base_model: str, name: str, command: str, full_elements: int,
                elements: int) -> str:
    """Markdown model card for a converted checkpoint directory."""
    groups = config_block["groups"]
    rows = []
    for g in groups:
        errs = g.get("est_error", {})
        rows.append({
            "layers": g["layers"], "mode": g["mode"], "rank": g.get("rank", "-"),
            "elements": g.get("elements", "-"),
            "key_error": f"{errs['key']:.4f}" if errs else "-",
            "value_error": f"{errs['value']:.4f}" if errs else "-",
        })
    data = ModelCardData(
        base_model=base_model if "/" in base_model else None,
        tags=["commonkv", "kv-cache-compression"],
        library_name="transformers",
        pipeline_tag="text-generation",
    )
    ratio = config_block["ratio"]
    card = ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        name=name,
        base_model=base_model,
        achieved_pct=f"{ratio['achieved']:.1%}",
        requested_pct=f"{ratio['requested']:.1%}",
        elements=elements,
        full_elements=full_elements,
        n_merged=sum(g["mode"] == "merged" for g in groups),
        n_per_layer=sum(g["mode"] == "per_layer" for g in groups),
        n_keep=sum(len(g["layers"]) for g in groups if g["mode"] == "keep"),
        repo_hint=name,
        groups=rows,
        command=command,
    )
    return str(card)
