import json
import logging
import os
import re
import shutil
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import OfflineModeIsEnabled
from transformers import AutoModelForCausalLM

import hf_lowrank
from hf_lowrank import LowRankConfig, get_lowrank_model, lowrank_summary
from hf_lowrank.hub import CARD_MARKER, make_model_card, push_to_hub, save_model_card

from conftest import tiny_bert, tiny_gpt2

TOKEN = "hf_SECRETtoken0123456789abcdef"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def trained_lowrank_gpt2(steps=3):
    """A factorized tiny GPT-2 after a few optimizer steps (so factors differ from their SVD init)."""
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd", rank_fraction=0.5,
                                                         rank_pattern={"h.0.mlp.c_fc": 3, "h.1.attn.c_attn": 7}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def fake_history(model):
    """A `lowrank_history.json` in the contract's format, ending at the model's ranks."""
    summary = lowrank_summary(model)
    final = {name: layer.rank for name, layer in summary.layers.items()}
    start = {name: layer.max_rank for name, layer in summary.layers.items()}
    middle = {name: (start[name] + final[name]) // 2 for name in final}
    return {"method": "oialr", "history": [
        {"step": 10, "event": "convert", "ranks": start, "params": summary.dense_params + 500,
         "dense_params": summary.dense_params},
        {"step": 20, "event": "update", "ranks": middle, "params": summary.params + 200,
         "dense_params": summary.dense_params},
        {"step": 30, "event": "update", "ranks": final, "params": summary.params, "dense_params": summary.dense_params},
    ]}


def _int(text):
    return int(text.replace(",", ""))


def layer_table(content):
    """{layer: (rank, max_rank, params, dense_params)} and the totals row, parsed from the card's markdown."""
    rows, totals = {}, None
    for line in content.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("`") and "→" in cells[1]:
            rows[cells[0].strip("`")] = tuple(_int(c) for c in cells[2:6])
        elif len(cells) == 7 and cells[0] == "**total**":
            totals = tuple(_int(c) for c in cells[2:6])
    return rows, totals


def size_row(content, label):
    line = next(l for l in content.splitlines() if l.startswith(f"| {label} |"))
    return [c.strip().split(" ")[0] for c in line.strip().strip("|").split("|")[1:]]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    model = trained_lowrank_gpt2()
    directory = tmp_path_factory.mktemp("trained") / "gpt2-lowrank"
    model.save_pretrained(directory)
    (directory / "lowrank_history.json").write_text(json.dumps(fake_history(model)))
    (directory / "all_results.json").write_text(json.dumps(
        {"eval_loss": 3.25, "perplexity": 25.79, "eval_runtime": 1.5, "eval_samples_per_second": 10.0,
         "train_loss": 4.0, "epoch": 1.0}))
    return model, directory


@pytest.fixture
def saved_model(trained_dir, tmp_path):
    """The trained model and a fresh copy of its directory (tests write cards into it)."""
    model, directory = trained_dir
    return model, shutil.copytree(directory, tmp_path / directory.name)


def test_card_for_trained_model_matches_summary_and_parses(saved_model):
    model, directory = saved_model
    path = save_model_card(directory, datasets=["Salesforce/wikitext"], dataset_config="wikitext-103-raw-v1",
                           dataset_split="validation", base_model="gpt2", license="apache-2.0",
                           eval_results={"accuracy": 0.41})
    assert path == os.path.join(directory, "README.md")
    card = ModelCard.load(path)
    content = card.content

    # metadata: parses with huggingface_hub, carries our library, tags, base model, datasets and model-index
    data = card.data
    assert data.library_name == "hf_lowrank"
    assert {"hf_lowrank", "transformers", "low-rank", "svd"} <= set(data.tags)
    assert data.base_model == "gpt2" and data.datasets == ["Salesforce/wikitext"]
    assert data.pipeline_tag == "text-generation" and data.license == "apache-2.0"
    metrics = {r.metric_name: r.metric_value for r in data.eval_results}
    assert metrics == {"eval_loss": 3.25, "perplexity": 25.79, "accuracy": 0.41}  # bookkeeping keys left out
    assert {r.dataset_type for r in data.eval_results} == {"Salesforce/wikitext"}
    assert {r.dataset_config for r in data.eval_results} == {"wikitext-103-raw-v1"}
    assert "model-index" in data.to_dict()

    # numbers equal lowrank_summary, of the model in memory and of the reloaded one
    summary = lowrank_summary(model)
    assert lowrank_summary(AutoModelForCausalLM.from_pretrained(directory)).to_dict() == summary.to_dict()
    meta = data.to_dict()["hf_lowrank"]
    assert (meta["params"], meta["dense_params"]) == (summary.params, summary.dense_params)
    assert meta["compression"] == pytest.approx(summary.compression, abs=1e-6)
    rows, totals = layer_table(content)
    assert rows == {n: (l.rank, l.max_rank, l.params, l.dense_params) for n, l in summary.layers.items()}
    assert totals == (sum(l.rank for l in summary.layers.values()), sum(l.max_rank for l in summary.layers.values()),
                      summary.params, summary.dense_params)
    before, after = size_row(content, "parameters (whole model)")
    assert _int(after) == summary.model_params
    assert _int(before) == summary.model_params - summary.params + summary.dense_params
    assert f"{summary.compression:.1%}" in content

    # method, results, loading instructions with the loud warning
    assert "rank_fraction" in content and "delay_steps" not in content  # only the svd knobs
    assert "| eval_loss | 3.25 |" in content and "| perplexity | 25.79 |" in content
    assert "eval_runtime" not in content and "train_loss" not in content
    assert "pip install hf_lowrank" in content and "import hf_lowrank" in content
    assert "AutoModelForCausalLM.from_pretrained" in content
    assert "randomly initialized dense layers" in content
    assert CARD_MARKER in content and "{{" not in content and "{%" not in content

    # the plots it links exist, are PNGs, and the rank-over-training plot is among them
    links = IMAGE_LINK.findall(content)
    assert "lowrank_rank_history.png" in links
    for link in links:
        assert (directory / link).read_bytes().startswith(PNG_MAGIC)
    assert "Rank over training" in content and "3 points between optimizer steps 10 and 30" in content


def test_card_renders_to_html(saved_model):
    from markdown_it import MarkdownIt

    _, directory = saved_model
    card = make_model_card(directory)
    html = MarkdownIt("commonmark").enable("table").render(card.text)
    assert html.count("<table>") >= 4  # size, settings, layers, evaluation
    assert '<img src="lowrank_rank_history.png"' in html
    assert "<h2>Rank of each layer</h2>" in html


def test_card_without_history_or_output_dir(tmp_path):
    model = trained_lowrank_gpt2(steps=1)
    in_memory = make_model_card(model)  # nowhere to write plots: none linked
    assert IMAGE_LINK.findall(in_memory.content) == []
    assert in_memory.data.eval_results is None

    path = save_model_card(model, tmp_path, eval_results={"eval_loss": 2.0})  # no dataset: table only
    content = open(path).read()
    assert IMAGE_LINK.findall(content) == ["lowrank_layer_ranks.png"]
    assert (tmp_path / "lowrank_layer_ranks.png").read_bytes().startswith(PNG_MAGIC)
    assert "No rank history" in content and "| eval_loss | 2 |" in content
    assert ModelCard.load(path).data.eval_results is None


def test_card_of_dense_model_is_plain_transformers(tmp_path):
    card = make_model_card(tiny_bert())
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-classification"
    assert "no factorized layers" in card.content and "randomly initialized" not in card.content
    assert "AutoModelForSequenceClassification" in card.content


def test_save_model_card_keeps_a_handwritten_readme(saved_model):
    _, directory = saved_model
    readme = directory / "README.md"
    readme.write_text("# My notes\nhand-written\n")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model_card(directory)
    assert readme.read_text() == "# My notes\nhand-written\n"
    # a Trainer-generated card is replaced, and so is our own
    readme.write_text("---\ntags:\n- generated_from_trainer\n---\n# trainer card\n")
    save_model_card(directory)
    assert CARD_MARKER in readme.read_text()
    save_model_card(directory)
    readme.write_text("# My notes\n")
    save_model_card(directory, overwrite=True)
    assert CARD_MARKER in readme.read_text()


# --- push -----------------------------------------------------------------------------------------------

@pytest.fixture
def online(monkeypatch):
    """Lift the suite's offline tripwire for code that only reaches the (mocked) HfApi boundary."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub_calls():
    """Mocks HfApi.create_repo / upload_folder; records the uploaded folder's files before it is deleted."""
    uploaded = {}

    def fake_upload(*args, folder_path, **kwargs):
        for name in os.listdir(folder_path):
            uploaded[name] = open(os.path.join(folder_path, name), "rb").read()
        return mock.Mock(commit_url="https://huggingface.co/me/repo/commit/abc")

    with mock.patch.object(HfApi, "create_repo") as create_repo, \
            mock.patch.object(HfApi, "upload_folder", side_effect=fake_upload) as upload_folder:
        yield create_repo, upload_folder, uploaded


def small_tokenizer(tmp_path):
    from demo_corpus import train_tokenizer

    text = tmp_path / "text.txt"
    text.write_text("low rank training of small language models on plain text\n" * 50)
    return train_tokenizer([str(text)], vocab_size=300)


def test_push_uploads_model_tokenizer_and_our_card_in_one_commit(online, hub_calls, saved_model, tmp_path, caplog,
                                                                  capsys):
    create_repo, upload_folder, uploaded = hub_calls
    model, directory = saved_model
    tokenizer = small_tokenizer(tmp_path)
    caplog.set_level(logging.DEBUG)
    info = hf_lowrank.hub.push_to_hub(model, "me/gpt2-lowrank", processing_class=tokenizer, token=TOKEN,
                                      private=True, source_dir=directory, datasets="Salesforce/wikitext")
    assert info.commit_url.endswith("abc")

    create_repo.assert_called_once()
    assert create_repo.call_args.args[0] == "me/gpt2-lowrank"
    assert create_repo.call_args.kwargs == {"token": TOKEN, "private": True, "exist_ok": True}
    upload_folder.assert_called_once()
    kwargs = upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/gpt2-lowrank" and kwargs["token"] == TOKEN
    assert "hf_lowrank" in kwargs["commit_message"]

    assert set(uploaded) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                             "tokenizer_config.json", "README.md", "lowrank_history.json",
                             "lowrank_rank_history.png"}
    config = json.loads(uploaded["config.json"])
    summary = lowrank_summary(model)
    assert config["quantization_config"]["rank_pattern"] == {n: l.rank for n, l in summary.layers.items()}
    card = ModelCard(uploaded["README.md"].decode())
    assert CARD_MARKER in card.content and card.data.library_name == "hf_lowrank"
    assert 'from_pretrained("me/gpt2-lowrank")' in card.content
    assert {r.metric_name for r in card.data.eval_results} == {"eval_loss", "perplexity"}  # from source_dir
    for link in IMAGE_LINK.findall(card.content):
        assert uploaded[link].startswith(PNG_MAGIC)

    # the token goes to the two API calls and nowhere else
    out = capsys.readouterr()
    assert all(TOKEN.encode() not in body for body in uploaded.values())
    assert TOKEN not in out.out + out.err + caplog.text


def test_push_sends_nothing_when_offline(hub_calls, saved_model):
    create_repo, upload_folder, _ = hub_calls
    model, _ = saved_model
    assert constants.is_offline_mode()  # conftest's tripwire
    with mock.patch.object(type(model), "save_pretrained") as save:
        with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
            push_to_hub(model, "me/repo", token=TOKEN)
    create_repo.assert_not_called()
    upload_folder.assert_not_called()
    save.assert_not_called()


def test_push_surfaces_the_hubs_offline_error(online, saved_model):
    model, _ = saved_model
    api = mock.Mock(spec=HfApi)
    api.create_repo.side_effect = OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode")
    with pytest.raises(OfflineModeIsEnabled, match="nothing was uploaded"):
        push_to_hub(model, "me/repo", api=api)
    api.upload_folder.assert_not_called()
