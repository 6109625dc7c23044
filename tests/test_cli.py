import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants

from hf_lowrank import LowRankConfig, get_lowrank_model, lowrank_summary
from hf_lowrank.cli import main
from hf_lowrank.hub import CARD_MARKER

from conftest import tiny_gpt2, tiny_vit

SUBCOMMANDS = ("inspect", "merge", "card", "push")


@pytest.fixture(scope="module")
def lowrank_dir(tmp_path_factory):
    """A saved factorized GPT-2 with a tokenizer beside it."""
    from demo_corpus import train_tokenizer

    directory = tmp_path_factory.mktemp("gpt2-lowrank")
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd", rank_fraction=0.4,
                                                         rank_pattern={"h.1.mlp.c_proj": 5}))
    model.save_pretrained(directory)
    text = directory / "corpus.txt"
    text.write_text("a tiny corpus for a tiny tokenizer\n" * 40)
    train_tokenizer([str(text)], vocab_size=280).save_pretrained(directory)
    text.unlink()
    return directory


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vit-dense")
    tiny_vit().save_pretrained(directory)
    return directory


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: hf-lowrank {command}" in capsys.readouterr().out


def test_inspect_prints_the_rank_table(lowrank_dir, capsys):
    from transformers import AutoModelForCausalLM

    summary = lowrank_summary(AutoModelForCausalLM.from_pretrained(lowrank_dir))
    code, out, _ = run(capsys, "inspect", lowrank_dir)
    assert code == 0
    assert "method svd, 8 factorized layers" in out
    for name, layer in summary.layers.items():
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert f"{layer.rank}/{layer.max_rank}" in line and f"{layer.params:,}" in line
    assert "transformer.h.1.mlp.c_proj" in out and "5/32" in out
    assert f"{summary.compression:.1%}" in out

    code, out, _ = run(capsys, "inspect", lowrank_dir, "--json")
    assert code == 0
    assert json.loads(out) == {"architecture": "GPT2LMHeadModel", **json.loads(json.dumps(summary.to_dict()))}


def test_inspect_dense_model_says_so(dense_dir, capsys):
    code, out, _ = run(capsys, "inspect", dense_dir)
    assert code == 0
    assert "ViTForImageClassification with no factorized layers" in out and "dense model" in out


@pytest.mark.parametrize("case", ["empty", "missing", "tokenizer_only", "no_weights", "file"])
def test_inspect_rejects_what_is_not_a_saved_model(case, lowrank_dir, tmp_path, capsys):
    target = tmp_path / "x"
    if case == "empty":
        target.mkdir()
    elif case == "tokenizer_only":
        target.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(lowrank_dir / name, target)
    elif case == "no_weights":
        target.mkdir()
        shutil.copy(lowrank_dir / "config.json", target)
    elif case == "file":
        target.write_text("hello")
    expected = {"empty": "not a saved model", "missing": "does not exist", "tokenizer_only": "not a saved model",
                "no_weights": "no weights file", "file": "not a directory"}[case]
    code, out, err = run(capsys, "inspect", target)
    assert code != 0
    assert out == ""
    assert err.startswith("hf-lowrank inspect: error:") and expected in err
    assert "Traceback" not in err


def test_console_script_points_at_main():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name == "hf-lowrank"}
    if not scripts:
        pytest.skip("hf_lowrank is not installed (pip install -e .)")
    assert scripts["hf-lowrank"].load() is main


def test_merge_loads_without_hf_lowrank_and_gives_the_same_outputs(lowrank_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "dense"
    code, out, _ = run(capsys, "merge", lowrank_dir, out_dir)
    assert code == 0 and "8 factorized layers merged" in out
    config = json.loads((out_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out_dir / "tokenizer.json").read_bytes() == (lowrank_dir / "tokenizer.json").read_bytes()
    assert (out_dir / "tokenizer_config.json").exists()

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(lowrank_dir).eval()(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(expected, tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out_dir)!r}).eval()\n"
        "assert type(m.transformer.h[0].mlp.c_fc).__name__ == 'Conv1D'\n"
        f"AutoTokenizer.from_pretrained({str(out_dir)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"exp = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(m(input_ids=ids).logits, exp, atol=1e-5, rtol=1e-4)\n"
        "assert 'hf_lowrank' not in sys.modules, 'hf_lowrank was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


def test_merge_protects_existing_output(lowrank_dir, tmp_path, capsys):
    out_dir = tmp_path / "busy"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "merge", lowrank_dir, out_dir)
    assert code == 1 and "--overwrite" in err
    assert os.listdir(out_dir) == ["keep.txt"]
    code, _, err = run(capsys, "merge", lowrank_dir, lowrank_dir)
    assert code == 1 and "OUT must differ" in err
    code, _, _ = run(capsys, "merge", lowrank_dir, out_dir, "--overwrite")
    assert code == 0 and (out_dir / "model.safetensors").exists()


def test_card_writes_and_refreshes_readme(lowrank_dir, tmp_path, capsys):
    directory = tmp_path / "model"
    shutil.copytree(lowrank_dir, directory)
    (directory / "eval_results.json").write_text(json.dumps({"eval_loss": 1.5, "eval_runtime": 3.0}))
    code, out, _ = run(capsys, "card", directory, "--dataset", "Salesforce/wikitext", "--base_model", "gpt2",
                       "--repo_id", "me/gpt2-lowrank")
    assert code == 0 and "README.md" in out
    card = ModelCard.load(directory / "README.md")
    assert card.data.library_name == "hf_lowrank" and card.data.base_model == "gpt2"
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [("eval_loss", 1.5)]
    assert 'from_pretrained("me/gpt2-lowrank")' in card.content
    assert (directory / "lowrank_layer_ranks.png").exists()

    (directory / "README.md").write_text("# hand-written\n")
    code, _, err = run(capsys, "card", directory)
    assert code == 1 and "--overwrite" in err
    assert (directory / "README.md").read_text() == "# hand-written\n"
    assert run(capsys, "card", directory, "--overwrite")[0] == 0
    assert CARD_MARKER in (directory / "README.md").read_text()


def test_push_uploads_the_directory(lowrank_dir, tmp_path, capsys, monkeypatch):
    uploaded = {}

    def fake_upload(*args, folder_path, **kwargs):
        uploaded.update({name: (folder_path, kwargs) for name in os.listdir(folder_path)})
        return mock.Mock(commit_url="https://huggingface.co/me/x/commit/1")

    directory = tmp_path / "model"
    shutil.copytree(lowrank_dir, directory)
    (directory / "training_args.bin").write_bytes(b"pickled arguments with a token")  # must not be uploaded
    with mock.patch.object(HfApi, "create_repo") as create_repo, \
            mock.patch.object(HfApi, "upload_folder", side_effect=fake_upload):
        code, _, err = run(capsys, "push", directory, "me/x")  # offline (conftest): refused, nothing sent
        assert code == 1 and "offline mode" in err and not uploaded
        create_repo.assert_not_called()

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        code, out, _ = run(capsys, "push", directory, "me/x", "--private")
    assert code == 0 and "me/x" in out
    assert create_repo.call_args.kwargs["private"] is True
    assert set(uploaded) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                             "tokenizer_config.json", "README.md", "lowrank_layer_ranks.png"}
