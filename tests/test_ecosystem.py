"""The Hugging Face ecosystem around a low-rank run (issue #13): the example scripts' own flow writes and pushes our
card, one log line per rank change, no silent change of a pretrained model's function, raw `accelerate` loops that
count their optimizer steps, and the reference cards of `model_cards/`."""

import json
import logging
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from transformers import AutoModelForCausalLM, TrainingArguments, default_data_collator

import hf_lowrank
from hf_lowrank import LowRankConfig, LowRankController, LowRankTrainer, get_lowrank_model, lowrank_summary
from hf_lowrank.hub import CARD_MARKER, save_model_card
from hf_lowrank.layers import linear_shape

from conftest import tiny_gpt2
from test_hub import layer_table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "model_cards"))
import regenerate  # noqa: E402


def _pretrained_dir(tmp_path, **overrides):
    """A tiny GPT-2 saved like a Hub checkpoint, so that loading it flags its weights as pretrained."""
    directory = tmp_path / "pretrained"
    tiny_gpt2(**overrides).save_pretrained(directory)
    return directory


def _load(directory):
    return AutoModelForCausalLM.from_pretrained(directory)


# --- 1 + 2: the HF example flow with LowRankTrainer: our card, pushed; a log line per rank change ---------------
class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def example_run(tmp_path_factory, tokenizer, lm_data):
    """A copy of the end of HF's run_clm.py with `Trainer` replaced: train, save_model, log/save metrics, evaluate,
    then `create_model_card(**kwargs)` with the kwargs the example builds."""
    tmp = tmp_path_factory.mktemp("example")
    train, evaluation = lm_data
    model = get_lowrank_model(tiny_gpt2(vocab_size=len(tokenizer), n_embd=64),
                              LowRankConfig(method="oialr", delay_steps=4, update_every=2, sigma_cutoff=0.5))
    args = TrainingArguments(output_dir=str(tmp / "out"), per_device_train_batch_size=8, learning_rate=3e-3,
                             max_steps=10, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True)
    trainer = LowRankTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                             processing_class=tokenizer, data_collator=default_data_collator)
    records = Records()
    logger = logging.getLogger("hf_lowrank")
    logger.addHandler(records)
    try:
        train_result = trainer.train()
    finally:
        logger.removeHandler(records)
    trainer.save_model()
    metrics = train_result.metrics
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    metrics = trainer.evaluate()
    metrics["perplexity"] = math.exp(metrics["eval_loss"])
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    kwargs = {"finetuned_from": "openai-community/gpt2", "tasks": "text-generation",
              "dataset_tags": "Salesforce/wikitext", "dataset_args": "wikitext-2-raw-v1",
              "dataset": "Salesforce/wikitext wikitext-2-raw-v1"}
    trainer.create_model_card(**kwargs)
    return SimpleNamespace(trainer=trainer, model=model, out=tmp / "out", metrics=metrics, records=records.records,
                           kwargs=kwargs)


def test_example_flow_writes_our_card(example_run):
    card = ModelCard.load(example_run.out / "README.md")
    summary = lowrank_summary(example_run.model)
    assert summary.layers  # the run did factorize
    assert CARD_MARKER in card.content and card.data.library_name == "hf_lowrank"
    assert {"hf_lowrank", "oialr", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.base_model == "openai-community/gpt2" and card.data.datasets == ["Salesforce/wikitext"]
    rows, _ = layer_table(card.content)
    assert rows == {n: (l.rank, l.max_rank, l.params, l.dense_params) for n, l in summary.layers.items()}
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["perplexity"] == pytest.approx(example_run.metrics["perplexity"])
    assert {r.dataset_config for r in card.data.eval_results} == {"wikitext-2-raw-v1"}
    assert (example_run.out / "lowrank_rank_history.png").is_file()


def test_trainer_push_uploads_our_card_with_the_trainers_arguments(example_run, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # lift the suite's tripwire: HfApi is mocked
    uploaded = {}

    def fake_upload(*args, folder_path, **kwargs):
        uploaded.update({name: (Path(folder_path) / name).read_bytes() for name in os.listdir(folder_path)})
        return mock.Mock(commit_url="https://huggingface.co/me/tiny/commit/1")

    trainer = example_run.trainer
    with mock.patch.object(HfApi, "create_repo", return_value=mock.Mock(repo_id="me/tiny-oialr")) as create_repo, \
            mock.patch.object(HfApi, "upload_folder", side_effect=fake_upload) as upload_folder:
        info = trainer.push_to_hub(token="hf_token", private=True, language="en", license="mit", **example_run.kwargs)
    assert info.commit_url.endswith("/1")
    assert create_repo.call_args.args[0] == "out"  # the output directory's name, as with the Trainer
    assert create_repo.call_args.kwargs == {"token": "hf_token", "private": True, "exist_ok": True}
    assert upload_folder.call_args.kwargs["repo_id"] == "me/tiny-oialr"  # the namespace the Hub gave
    assert upload_folder.call_args.kwargs["commit_message"] == "End of training"
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.library_name == "hf_lowrank" and card.data.license == "mit" and card.data.language == "en"
    assert 'from_pretrained("me/tiny-oialr")' in card.content
    assert {"config.json", "model.safetensors", "tokenizer.json", "lowrank_history.json"} <= set(uploaded)
    # the pushed card describes the pushed (smallest) form
    rows, _ = layer_table(card.content)
    ranks = json.loads(uploaded["config.json"])["quantization_config"]["rank_pattern"]
    assert {n: r[0] for n, r in rows.items()} == ranks
    # and the local output directory carries our card too
    assert ModelCard.load(example_run.out / "README.md").data.library_name == "hf_lowrank"


def test_one_log_line_per_rank_change(example_run):
    history = [h for h in example_run.trainer.lowrank.history if h["event"] != "start"]
    assert history, "the run made rank changes"
    lines = [r for r in example_run.records if r.getMessage().startswith("step ")]
    assert len(lines) == len(history)
    targets = example_run.trainer.lowrank.targets
    max_rank = {n: min(linear_shape(example_run.model.get_submodule(n))) for n in targets}
    for record, change in zip(lines, history):
        # WARNING: shown at Python's and transformers' default level, and at the scripts' --log_level warning
        assert record.name == "hf_lowrank" and record.levelno == logging.WARNING
        message = record.getMessage()
        assert message.startswith(f"step {change['step']}: oialr {change['event']}: ")
        held = sum(max_rank[n] for n in change["ranks"])
        rank_fraction = sum(change["ranks"].values()) / held if change["ranks"] else 1.0
        assert f"{len(change['ranks'])} of {len(targets)} target layers factorized" in message
        assert f"rank fraction {100 * rank_fraction:.1f}%" in message and "% of dense" in message


def test_the_last_log_line_matches_the_logged_metrics(example_run):
    last = [r.getMessage() for r in example_run.records if r.getMessage().startswith("step ")][-1]
    metrics = example_run.trainer.lowrank.metrics()
    assert f"rank fraction {100 * metrics['lowrank/rank_fraction']:.1f}%" in last
    assert f"target-layer parameters {100 * metrics['lowrank/param_fraction']:.1f}% of dense" in last


# --- 3: no silent change of a pretrained model's function ----------------------------------------------------
def _warnings_of(model, config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_lowrank_model(model, config)
    return [str(w.message) for w in caught if "factorizing changed" in str(w.message)]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pretrained_inrank_efficient_warns_and_cumulative_keeps_the_function(tmp_path):
    directory = _pretrained_dir(tmp_path)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = _logits(_load(directory), ids)

    efficient = _load(directory)
    messages = _warnings_of(efficient, LowRankConfig(method="inrank", init_rank=2, buffer_rank=4))
    assert len(messages) == 1 and 'inrank_mode="cumulative"' in messages[0]
    assert "transformer.h.0.mlp.c_fc" in messages[0]
    assert not torch.allclose(_logits(efficient, ids), reference, atol=1e-3)

    cumulative = _load(directory)
    assert _warnings_of(cumulative, LowRankConfig(method="inrank", init_rank=2, buffer_rank=4,
                                                  inrank_mode="cumulative")) == []
    torch.testing.assert_close(_logits(cumulative, ids), reference)
    assert all(l.approximation_error is None for l in lowrank_summary(cumulative).layers.values())


def test_svd_error_is_the_dropped_energy_and_is_reported_everywhere(tmp_path):
    directory = _pretrained_dir(tmp_path)
    dense = _load(directory)
    model = _load(directory)
    messages = _warnings_of(model, LowRankConfig(method="svd", rank_fraction=0.25))
    assert len(messages) == 1 and "rank_fraction" in messages[0]
    summary = lowrank_summary(model)
    for name, layer in summary.layers.items():
        weight = dense.get_submodule(name).weight.detach().double()
        s = torch.linalg.svdvals(weight)
        expected = float(s[layer.rank:].norm() / s.norm())  # Eckart–Young: the dropped singular values
        assert layer.approximation_error == pytest.approx(expected, rel=1e-4)
    assert "approx. error" in str(summary)

    # config.json records the errors: a reload reports the same, and so does the card
    model.save_pretrained(tmp_path / "svd")
    reloaded = lowrank_summary(_load(tmp_path / "svd"))
    assert {n: l.approximation_error for n, l in reloaded.layers.items()} == {
        n: l.approximation_error for n, l in summary.layers.items()}
    content = open(save_model_card(tmp_path / "svd")).read()
    assert regenerate.card_figures(content)["errors"] == {
        n: hf_lowrank.summary.format_error(l.approximation_error) for n, l in summary.layers.items()}
    # a dense export has no errors left to report
    merged = hf_lowrank.merge_and_unload(_load(tmp_path / "svd"))
    assert not hasattr(merged, "lowrank_approximation_errors")


def test_a_fresh_initialization_is_measured_but_not_warned_about():
    model = tiny_gpt2()
    assert _warnings_of(model, LowRankConfig(method="svd", rank_fraction=0.25)) == []
    assert all(l.approximation_error > 0.1 for l in lowrank_summary(model).layers.values())


def test_scripts_default_to_cumulative_inrank_from_pretrained(capsys, tmp_path):
    import lowrank_args
    import script_utils

    def parse(*extra, model="gpt2"):
        args = lowrank_args.LowRankArguments(lowrank_method="inrank")
        model_args = SimpleNamespace(model_name_or_path=model)
        given = {a[2:] for a in extra if a.startswith("--")}
        for flag, value in zip(extra[::2], extra[1::2]):
            setattr(args, flag[2:], value)
        script_utils.inrank_mode_for_pretrained((model_args, args), given)
        return args.inrank_mode

    assert parse() == "cumulative" and "--inrank_mode cumulative" in capsys.readouterr().out
    assert parse("--inrank_mode", "efficient") == "efficient"  # the user's choice stands
    assert parse(model=None) == "efficient"  # from scratch: the library default
    # a checkpoint trained with InRank continues in its own mode
    get_lowrank_model(tiny_gpt2(), LowRankConfig(method="inrank", init_rank=2, buffer_rank=4)).save_pretrained(
        tmp_path / "inrank")
    assert parse(model=str(tmp_path / "inrank")) == "efficient"


def test_script_log_lines_and_inrank_default_at_default_verbosity(tmp_path, text_file):
    """run_clm.py as a user runs it (its demo's `--log_level warning`): the InRank-from-pretrained default is said,
    the rank changes show one line each, no approximation warning (cumulative keeps the function)."""
    from demo_corpus import train_tokenizer

    pretrained = _pretrained_dir(tmp_path, vocab_size=300)
    train_tokenizer([str(text_file)], vocab_size=300).save_pretrained(pretrained)
    text = text_file.read_text()[:30_000]
    (tmp_path / "train.txt").write_text(text[:25_000])
    (tmp_path / "valid.txt").write_text(text[25_000:])
    command = [sys.executable, str(ROOT / "training_scripts" / "run_clm.py"), "--model_name_or_path", str(pretrained),
               "--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "valid.txt"),
               "--block_size", "32", "--do_train", "--max_steps", "6", "--per_device_train_batch_size", "4",
               "--lowrank_method", "inrank", "--init_rank", "1", "--buffer_rank", "2", "--rank_warmup_steps", "2",
               "--check_every", "2", "--freeze_step", "5", "--output_dir", str(tmp_path / "out"),
               "--cache_dir", str(tmp_path / "cache"), "--report_to", "none", "--save_strategy", "no",
               "--log_level", "warning", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "--inrank_mode cumulative" in output
    assert re.search(r"hf_lowrank - step 5: inrank freeze: 8 of 8 target layers factorized, rank fraction "
                     r"[0-9.]+%, target-layer parameters [0-9.]+% of dense", output)
    assert "factorizing changed" not in output
    history = json.loads((tmp_path / "out" / "lowrank_history.json").read_text())
    assert history["config"]["inrank_mode"] == "cumulative"


# --- 4: raw accelerate loops ----------------------------------------------------------------------------------
def _loader(batches, batch_size=2):
    ids = torch.randint(0, 128, (batches * batch_size, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


@pytest.mark.parametrize("accumulation,epochs", [(1, 1), (3, 2)])
def test_controller_counts_the_optimizer_steps_of_the_loop(accumulation, epochs):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=0.5, update_every=0.25))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, _loader(7))
    controller = LowRankController(model, optimizer=optimizer, accelerator=accelerator, dataloader=loader,
                                   epochs=epochs)
    expected = epochs * math.ceil(7 / accumulation)
    assert controller.num_training_steps == expected
    for _ in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                optimizer.step()
                optimizer.zero_grad()
            if controller.step():
                model = controller.reprepare(model)
    assert controller.global_step == expected  # the loop took exactly the counted steps


def test_controller_warns_when_the_given_count_disagrees():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=0.5, update_every=0.25))
    loader = accelerator.prepare(_loader(5))
    with pytest.warns(UserWarning, match=r"num_training_steps=10, but the dataloader gives 5 optimizer steps.*"
                                         r"2\.00x the loop's length \(changes scheduled past its end never happen\)"):
        controller = LowRankController(model, accelerator=accelerator, dataloader=loader, num_training_steps=10)
    assert controller.num_training_steps == 10  # the explicit count is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LowRankController(model, accelerator=accelerator, dataloader=loader,
                                 num_training_steps=5).num_training_steps == 5


def test_controller_warns_about_an_unprepared_loader_on_many_processes():
    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(num_processes=2, gradient_accumulation_steps=1,
                                  distributed_type=DistributedType.MULTI_CPU,
                                  gradient_state=SimpleNamespace(sync_with_dataloader=True))
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=2))
    with pytest.warns(UserWarning, match="not prepared by the accelerator"):
        LowRankController(model, accelerator=accelerator, dataloader=_loader(4))


def test_readme_raw_loop_trains_saves_and_reloads(tmp_path):
    """The README's complete raw loop, as printed there."""
    from accelerate import Accelerator

    loader = _loader(6)
    num_epochs = 2
    # --- README: begin ---
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=0.5, update_every=0.25,
                                                         sigma_cutoff=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    controller = LowRankController(model, optimizer=optimizer, accelerator=accelerator, dataloader=loader,
                                   epochs=num_epochs)  # counts the optimizer steps: 2 x ceil(6 / 2) = 6
    for epoch in range(num_epochs):
        model.train()
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                optimizer.step()
                optimizer.zero_grad()
            if controller.step():                  # a rank change replaced parameters
                model = controller.reprepare(model)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        hf_lowrank.save_for_use(final, tmp_path / "final")   # the smallest form, config.json records the ranks
        controller.save_history(tmp_path / "final")          # lowrank_history.json: ranks over training
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")   # after `import hf_lowrank`
    # --- README: end ---
    assert controller.num_training_steps == 6 and controller.global_step == 6
    assert lowrank_summary(reloaded).layers
    history = json.loads((tmp_path / "final" / "lowrank_history.json").read_text())
    assert history["history"][0]["event"] == "start" and len(history["history"]) >= 2
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(final, ids), atol=1e-4, rtol=1e-4)


# --- 6: model_cards/ ------------------------------------------------------------------------------------------
def test_card_figures_equal_the_runs_summary(tmp_path):
    """Build a tiny model (svd from a pretrained checkpoint: some layers approximate, one kept dense), write its
    card, parse every figure back with the parser `model_cards/regenerate.py` checks the reference cards with."""
    directory = _pretrained_dir(tmp_path)
    model = _load(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_lowrank_model(model, LowRankConfig(method="svd", rank_fraction=0.25,
                                               rank_pattern={"h.0.attn.c_proj": 32, "h.1.mlp.c_fc": 5}))
    summary = lowrank_summary(model)
    assert summary.dense_layers and any(l.approximation_error for l in summary.layers.values())
    model.save_pretrained(tmp_path / "run")
    content = open(save_model_card(tmp_path / "run")).read()
    assert regenerate.check_card(content, summary.to_dict()) == []
    # the check is not vacuous: a changed figure is caught
    wrong = summary.to_dict()
    first = next(iter(wrong["layers"]))
    wrong["layers"][first]["rank"] += 1
    assert regenerate.check_card(content, wrong)


def test_reference_cards_match_their_runs():
    cards = sorted((ROOT / "model_cards").glob(f"*/{regenerate.SUMMARY_NAME}"))
    if not cards:
        pytest.skip("no reference cards yet: python model_cards/regenerate.py writes them")
    for summary_path in cards:
        content = (summary_path.parent / "README.md").read_text()
        assert regenerate.check_card(content, json.loads(summary_path.read_text())) == [], summary_path.parent.name
        for link in regenerate.IMAGE_LINK.findall(content):
            assert (summary_path.parent / link).is_file()


def test_regenerate_plans_the_five_reference_runs(tmp_path):
    runs = regenerate.plan(tmp_path, quick=True)
    assert [r.name for r in runs if r.card] == list(regenerate.CARDS)
    assert set(regenerate.CARDS) == {"gpt2-oialr", "gpt2-dense", "gpt2-inrank", "bert-svd-finetune",
                                     "vit-oialr-finetune"}
    for run in runs:  # every run goes through one of the training scripts, with real arguments
        assert run.script in ("run_clm.py", "run_classification.py", "run_image_classification.py")
        assert "--output_dir" in run.args
