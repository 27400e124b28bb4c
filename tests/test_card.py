"""The model card: Hub front matter that parses, the plan and ratio, and sections later refreshed in place."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from commonkv_convert.checkpoint.card import evaluation_markdown, hub_base_model, refresh_card, render_card, update_card

BLOCK = {
    "ratio": {"requested": 0.5, "achieved": 0.5104},
    "groups": [
        {"layers": [0], "mode": "keep", "elements": 256},
        {"layers": [1, 2], "mode": "merged", "rank": 96, "elements": 96, "est_error": {"key": 0.0123, "value": 0.0456}},
        {"layers": [3], "mode": "per_layer", "rank": 64, "elements": 64, "est_error": {"key": 0.01, "value": 0.02}},
    ],
}
COMMAND = "commonkv convert HuggingFaceTB/SmolLM2-135M-Instruct out --ratio 0.5"


HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _card(source: str = HUB_ID, base_model: str | None = HUB_ID) -> str:
    return render_card(BLOCK, source, "smol-ckv", COMMAND, full_elements=1024, elements=416, base_model=base_model)


def test_front_matter_and_body(tmp_path):
    (tmp_path / "README.md").write_text(_card())
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["tags"] == ["commonkv", "kv-cache-compression"]
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    text = card.text
    assert "**51.0%**" in text and "416 cache elements per token instead of 1024" in text
    assert "| 1,2 | merged | 96 | 96 | 0.0123 | 0.0456 |" in text and "| 0 | keep | - | 256 | - | - |" in text
    assert COMMAND in text and 'from_pretrained("smol-ckv", trust_remote_code=True)' in text
    assert "Not evaluated yet" in text


def test_local_source_has_no_base_model(tmp_path):
    card = _card(str(tmp_path), base_model=None)
    assert "base_model" not in card.split("---")[1] and f"version of `{tmp_path}`" in card


def test_local_source_with_a_hub_id_links_it(tmp_path):
    card = _card(str(tmp_path))
    assert ModelCard(card).data.base_model == HUB_ID
    assert f"[`{HUB_ID}`](https://huggingface.co/{HUB_ID})" in card and str(tmp_path) not in card
    assert f"# {HUB_ID} with a smaller KV cache" in card


@pytest.mark.parametrize(("model", "config", "expected"), [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", {}, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("org/finetune", {"_name_or_path": "org/parent"}, "org/finetune"),  # what was downloaded wins
    ("/models/smol", {"_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("/models/smol", {"_name_or_path": "/home/me/checkpoints/smol"}, None),
    ("/models/smol", {"_name_or_path": "./smol"}, None),
    ("/models/smol", {}, None),
])
def test_hub_base_model(model, config, expected):
    assert hub_base_model(model, config) == expected


def test_refresh_points_at_repo_and_renders_eval_once(tmp_path):
    (tmp_path / "README.md").write_text(_card())
    assert refresh_card(tmp_path) == _card()  # nothing to change
    (tmp_path / "commonkv_eval.json").write_text(json.dumps({"tasks": {"ctx-ppl": {"ppl": 24.912, "context": 512}}}))
    assert update_card(tmp_path, "org/SmolLM2-ckv-0.5") is True
    text = (tmp_path / "README.md").read_text()
    assert 'from_pretrained("org/SmolLM2-ckv-0.5", trust_remote_code=True)' in text
    assert f"# {HUB_ID} with a smaller KV cache" in text  # the base model read back from the front matter
    assert "\n# SmolLM2-ckv-0.5\n" in text and "# smol-ckv" not in text  # the title names the repo
    assert "| ctx-ppl | ppl | 24.91 |" in text and "| ctx-ppl | context | 512 |" in text
    assert update_card(tmp_path, "org/SmolLM2-ckv-0.5") is False  # idempotent
    assert text.count("## Evaluation") == 1 and ModelCard.load(tmp_path / "README.md").data.library_name == "transformers"


def test_evaluation_table_accepts_the_bare_task_map():
    assert "| needle | accuracy | 1 |" in evaluation_markdown({"needle": {"accuracy": 1}})
