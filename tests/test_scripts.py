"""End-to-end tests of the training scripts (training_scripts/run_*.py) on tiny local data, in-process.

Each script's `main(argv)` runs the real command line, with a tiny model (`--config_overrides`), a few
optimizer steps and `--cache_dir` in the test's temporary directory (datasets cache, trained tokenizers).
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "training_scripts"
sys.path.insert(0, str(SCRIPTS))

import lowrank_args  # noqa: E402
import run_classification  # noqa: E402
import run_clm  # noqa: E402
import run_image_classification  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification, AutoTokenizer,
    HfArgumentParser, Trainer, TrainingArguments,
)

import hf_lowrank  # noqa: E402,F401
from hf_lowrank import LowRankConfig, LowRankLinear, LowRankTrainer, lowrank_summary  # noqa: E402
from conftest import write_text_split  # noqa: E402

TINY_GPT2 = "n_embd=32,n_layer=2,n_head=2,n_positions=64,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
TINY_BERT = ("hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
             "max_position_embeddings=64")
TINY_VIT = "image_size=16,patch_size=4,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
COMMON = ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--log_level", "error",
          "--seed", "0", "--dataloader_pin_memory", "false"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """Real English text: standard-library docstrings, ~40 KB train / 8 KB validation."""
    return write_text_split(tmp_path_factory.mktemp("text"), 40000, 8000)


def _clm_args(tmp_path, text_files, *extra, out="out"):
    train, validation = text_files
    return ["--model_type", "gpt2", "--config_overrides", TINY_GPT2, "--train_tokenizer_vocab_size", "300",
            "--train_file", str(train), "--validation_file", str(validation), "--block_size", "32",
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / out),
            "--do_train", "--do_eval", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
            "--learning_rate", "3e-3", "--max_eval_samples", "16", *COMMON, *extra]


def _same_logits(model, reloaded, batch):
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


# --- the low-rank arguments -------------------------------------------------------------------------------
def test_lowrank_arguments_mirror_the_config():
    config_fields = {f.name: f for f in dataclasses.fields(LowRankConfig)}
    arg_fields = {f.name: f for f in dataclasses.fields(lowrank_args.LowRankArguments)}
    expected = {("lowrank_method" if name == "method" else name) for name in config_fields}
    assert set(arg_fields) == expected
    assert not set(arg_fields) & {f.name for f in dataclasses.fields(TrainingArguments)}
    for name, f in config_fields.items():
        arg = arg_fields["lowrank_method" if name == "method" else name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        got = arg.default_factory() if arg.default_factory is not dataclasses.MISSING else arg.default
        assert got == default, name
    # every script parses them next to TrainingArguments without a clash
    for script in (run_clm, run_classification, run_image_classification):
        HfArgumentParser((script.ModelArguments, script.DataTrainingArguments, lowrank_args.LowRankArguments,
                          TrainingArguments))


def test_lowrank_arguments_parse_into_a_config():
    parser = HfArgumentParser((lowrank_args.LowRankArguments,))
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--lowrank_method", "inrank", "--rank_warmup_steps", "0.1", "--check_every", "5", "--freeze_step", "none",
        "--target_modules", "c_attn,c_fc", "--exclude_modules", r"transformer\.h\.0\..*",
        "--rank_pattern", '{"c_attn": 0.25, "c_fc": 8}', "--init_rank", "4", "--explained_ratio", "0.8"])
    config = lowrank_args.lowrank_config_from_args(args)
    assert config.method == "inrank" and config.rank_warmup_steps == 0.1 and config.check_every == 5
    assert config.freeze_step is None and config.init_rank == 4 and config.explained_ratio == 0.8
    assert config.target_modules == ["c_attn", "c_fc"] and config.exclude_modules == r"transformer\.h\.0\..*"
    assert config.rank_pattern == {"c_attn": 0.25, "c_fc": 8}
    (args,) = parser.parse_args_into_dataclasses(args=["--lowrank_method", "none"])
    assert lowrank_args.lowrank_config_from_args(args) is None
    with pytest.raises(SystemExit):  # argparse rejects a fraction ≥ 1
        parser.parse_args_into_dataclasses(args=["--delay_steps", "1.5"])


# --- run_clm.py ---------------------------------------------------------------------------------------------
def test_run_clm_oialr_end_to_end(tmp_path, text_files, capsys):
    result = run_clm.main(_clm_args(tmp_path, text_files, "--lowrank_method", "oialr", "--delay_steps", "0.4",
                                    "--update_every", "0.2", "--sigma_cutoff", "0.9", "--max_steps", "10",
                                    "--logging_steps", "5"))
    trainer, out = result["trainer"], tmp_path / "out"
    assert type(trainer) is LowRankTrainer
    metrics = result["metrics"]
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0

    # the summary shows the perplexity next to the dense and compressed sizes
    printed = capsys.readouterr().out
    model = trainer.model
    summary = lowrank_summary(model)
    # converted and cut; the 32x32 attention projections stay dense until below break-even
    assert summary.layers and len(summary.layers) + len(summary.dense_layers) == 8 and summary.rank_fraction < 1.0
    assert all(layer.params < layer.dense_params for layer in summary.layers.values())
    assert f"{summary.dense_params:,}" in printed and f"{summary.params:,}" in printed
    assert f"{metrics['perplexity']:.2f}" in printed and "eval perplexity" in printed
    assert "step 4 convert" in printed

    # the final model and its tokenizer reload as a new user would load them
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hf_lowrank"
    assert not (out / ".incomplete-final-model").exists()
    assert (out / "README.md").is_file() and (out / "all_results.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert {n: l.rank for n, l in lowrank_summary(reloaded).layers.items()} == {
        n: l.rank for n, l in summary.layers.items()}
    batch = tokenizer(["Return the number of items in a container."], return_tensors="pt")
    _same_logits(model, reloaded, {"input_ids": batch["input_ids"]})

    # evaluating the saved model with the script gives the same perplexity (eval only: nothing is written)
    train, validation = text_files
    again = run_clm.main(["--model_name_or_path", str(out), "--validation_file", str(validation), "--block_size", "32",
                          "--do_eval", "--lowrank_method", "none", "--per_device_eval_batch_size", "16",
                          "--max_eval_samples", "16", "--cache_dir", str(tmp_path / "cache"),
                          "--output_dir", str(tmp_path / "eval"), *COMMON])
    assert again["metrics"]["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-5)
    assert not (tmp_path / "eval" / "config.json").exists()


def test_run_clm_dense_baseline_with_local_tokenizer(tmp_path, text_files):
    """--lowrank_method none is the plain HF run (Trainer, no quantization_config); --tokenizer_name takes a
    local tokenizer directory; a json file with a named text column."""
    from demo_corpus import train_tokenizer

    tokenizer_dir = tmp_path / "tok"
    train_tokenizer([str(text_files[0])], vocab_size=300, model_max_length=64).save_pretrained(tokenizer_dir)
    rows = [{"id": i, "body": para} for i, para in enumerate(text_files[0].read_text().split("\n\n"))]
    data = tmp_path / "train.json"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = _clm_args(tmp_path, text_files, "--lowrank_method", "none", "--max_steps", "3")
    args = [a for a in args if a not in ("--train_tokenizer_vocab_size", "300")]
    args[args.index("--train_file") + 1] = str(data)
    args[args.index("--validation_file") + 1] = str(data)
    result = run_clm.main(args + ["--tokenizer_name", str(tokenizer_dir), "--text_column_name", "body"])
    assert type(result["trainer"]) is Trainer
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 300
    assert not any(isinstance(m, LowRankLinear) for m in AutoModelForCausalLM.from_pretrained(tmp_path / "out").modules())


def test_run_clm_demo_defaults(tmp_path, monkeypatch, capsys):
    """`run_clm.py` without arguments = the demo: stdlib corpus, trained tokenizer, GPT-2 + OIALR with a schedule
    given as fractions of the run. Run here with `--demo` overrides (tiny model, 6 steps, a small pre-written
    corpus in the cache) to keep it fast."""
    parser = HfArgumentParser((run_clm.ModelArguments, run_clm.DataTrainingArguments, lowrank_args.LowRankArguments,
                               TrainingArguments))
    model_args, data_args, low, training = parser.parse_args_into_dataclasses(args=run_clm.DEMO_ARGS)
    config = lowrank_args.lowrank_config_from_args(low)
    assert config.method == "oialr" and 0 < config.delay_steps < 1 and 0 < config.update_every < 1
    assert model_args.model_type == "gpt2" and training.do_train and training.do_eval
    assert training.output_dir == "outputs/gpt2-oialr-stdlib"

    from demo_corpus import stdlib_docstrings

    corpus = tmp_path / "cache" / "hf_lowrank" / f"stdlib_corpus_py{sys.version_info.major}.{sys.version_info.minor}"
    corpus.mkdir(parents=True)
    text = stdlib_docstrings(max_chars=30_000)
    (corpus / "train.txt").write_text(text[:25_000])
    (corpus / "validation.txt").write_text(text[25_000:])
    monkeypatch.chdir(tmp_path)
    result = run_clm.main(["--demo", "--config_overrides", TINY_GPT2, "--train_tokenizer_vocab_size", "300",
                           "--block_size", "32", "--max_steps", "6", "--cache_dir", str(tmp_path / "cache"),
                           "--disable_tqdm", "true"])
    printed = capsys.readouterr().out
    assert "running the offline demo" in printed and "hf_lowrank summary" in printed
    # 0.75 of 6 steps, rounded up: converted, or kept dense where the rank is still above break-even
    assert "step 5 convert" in printed or "kept dense" in printed
    assert (tmp_path / "outputs" / "gpt2-oialr-stdlib" / "config.json").is_file()
    assert math.isfinite(result["metrics"]["perplexity"])


# --- run_classification.py ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classification_files(tmp_path_factory):
    import csv

    folder = tmp_path_factory.mktemp("cls")
    good = ["a fine and useful function", "returns the right value", "works well and fast", "clear helpful docs"]
    bad = ["raises an error on bad input", "fails when the file is missing", "slow and broken", "wrong result"]
    for name, repeat in (("train.csv", 6), ("validation.csv", 2)):
        with open(folder / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["review", "sentiment"])
            for _ in range(repeat):
                writer.writerows([[t, "positive"] for t in good] + [[t, "negative"] for t in bad])
    return folder / "train.csv", folder / "validation.csv"


def _classification_args(tmp_path, files, *extra):
    return ["--model_type", "bert", "--config_overrides", TINY_BERT, "--train_tokenizer_vocab_size", "200",
            "--train_file", str(files[0]), "--validation_file", str(files[1]), "--text_column_names", "review",
            "--label_column_name", "sentiment", "--max_seq_length", "16", "--cache_dir", str(tmp_path / "cache"),
            "--output_dir", str(tmp_path / "out"), "--do_train", "--do_eval", "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-3", *COMMON, *extra]


@pytest.mark.parametrize("method", ["svd", "inrank"])
def test_run_classification_end_to_end(tmp_path, classification_files, method):
    knobs = {"svd": ["--rank_fraction", "0.5"],
             "inrank": ["--init_rank", "2", "--buffer_rank", "2", "--rank_warmup_steps", "2", "--check_every", "1",
                        "--freeze_step", "3"]}[method]
    result = run_classification.main(_classification_args(
        tmp_path, classification_files, "--lowrank_method", method, *knobs, "--max_steps", "4"))
    trainer, out = result["trainer"], tmp_path / "out"
    assert type(trainer) is LowRankTrainer and 0.0 <= result["metrics"]["eval_accuracy"] <= 1.0
    assert trainer.model.lowrank_config.method == method
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.id2label == {0: "negative", 1: "positive"}
    ranks = {n: l.rank for n, l in lowrank_summary(reloaded).layers.items()}
    assert ranks == {n: l.rank for n, l in lowrank_summary(trainer.model).layers.items()}
    assert all(r <= 16 for r in ranks.values())  # svd: half of min(in, out) = 32; inrank: small ranks
    assert not any("classifier" in n for n in ranks)
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["clear helpful docs"], return_tensors="pt")
    _same_logits(trainer.model, reloaded, dict(batch))


# --- run_image_classification.py ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    colors = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    for split, count in (("train", 8), ("validation", 3)):
        for label, color in colors.items():
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                shade = tuple(max(0, c - 12 * i) for c in color)
                Image.new("RGB", (20, 20), shade).save(root / split / label / f"{i}.png")
    return root


def test_run_image_classification_end_to_end(tmp_path, image_folder):
    result = run_image_classification.main([
        "--model_type", "vit", "--config_overrides", TINY_VIT, "--train_dir", str(image_folder / "train"),
        "--validation_dir", str(image_folder / "validation"), "--cache_dir", str(tmp_path / "cache"),
        "--output_dir", str(tmp_path / "out"), "--do_train", "--do_eval", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--max_steps", "6", "--lowrank_method", "oialr", "--delay_steps", "2",
        "--update_every", "2", "--sigma_cutoff", "0.9", *COMMON])
    trainer, out = result["trainer"], tmp_path / "out"
    assert type(trainer) is LowRankTrainer and 0.0 <= result["metrics"]["eval_accuracy"] <= 1.0
    assert (out / "preprocessor_config.json").is_file()
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    assert set(reloaded.config.id2label.values()) == {"red", "blue"}
    summary = lowrank_summary(trainer.model)
    assert summary.layers and {n: l.rank for n, l in lowrank_summary(reloaded).layers.items()} == {
        n: l.rank for n, l in summary.layers.items()}
    _same_logits(trainer.model, reloaded, {"pixel_values": torch.rand(2, 3, 16, 16)})


# --- bad input: one clear line, before training, nothing written ---------------------------------------------
def _fails(main, args, tmp_path, match):
    with pytest.raises(SystemExit, match=match) as error:
        main(args)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message
    assert not (tmp_path / "out").exists()  # no output directory, let alone a model in it
    return message


def test_clm_missing_data_file(tmp_path, text_files):
    args = _clm_args(tmp_path, text_files, "--max_steps", "2")
    args[args.index("--train_file") + 1] = str(tmp_path / "nope.txt")
    _fails(run_clm.main, args, tmp_path, r"--train_file .*nope\.txt.* does not exist")


def test_clm_unknown_text_column(tmp_path, text_files):
    _fails(run_clm.main, _clm_args(tmp_path, text_files, "--text_column_name", "body", "--max_steps", "2"),
           tmp_path, r"--text_column_name 'body' is not a column .*\['text'\]")


def test_clm_block_size_beyond_context(tmp_path, text_files):
    args = _clm_args(tmp_path, text_files, "--max_steps", "2")
    args[args.index("--block_size") + 1] = "128"  # the tiny model has n_positions=64
    _fails(run_clm.main, args, tmp_path, r"--block_size 128 is larger than the model's context of 64 .*n_positions=128")


def test_clm_hub_dataset_offline(tmp_path, text_files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = _clm_args(tmp_path, text_files, "--max_steps", "2")
    for flag in ("--train_file", "--validation_file"):
        i = args.index(flag)
        del args[i:i + 2]
    args += ["--dataset_name", "Salesforce/wikitext", "--dataset_config_name", "wikitext-103-raw-v1"]
    _fails(run_clm.main, args, tmp_path, r"cannot load dataset 'Salesforce/wikitext': .*offline.*--train_file")


def test_clm_invalid_lowrank_argument_and_missing_tokenizer(tmp_path, text_files):
    _fails(run_clm.main, _clm_args(tmp_path, text_files, "--sigma_cutoff", "1.5"), tmp_path, r"sigma_cutoff=1\.5")
    args = [a for a in _clm_args(tmp_path, text_files) if a not in ("--train_tokenizer_vocab_size", "300")]
    _fails(run_clm.main, args, tmp_path, r"--tokenizer_name .*--train_tokenizer_vocab_size")
    # a Hub model and a push while offline (the test suite runs with HF_HUB_OFFLINE=1)
    args = [a for a in _clm_args(tmp_path, text_files) if a not in ("--model_type", "gpt2", "--config_overrides",
                                                                       TINY_GPT2)]
    _fails(run_clm.main, args + ["--model_name_or_path", "openai-community/gpt2"], tmp_path,
           r"cannot load the model config 'openai-community/gpt2': the Hub is in offline mode")
    _fails(run_clm.main, _clm_args(tmp_path, text_files, "--push_to_hub", "--hub_model_id", "me/x"), tmp_path,
           r"--push_to_hub while the Hub is in offline mode")


def test_classification_and_image_bad_input(tmp_path, classification_files):
    args = _classification_args(tmp_path, classification_files)
    args[args.index("--label_column_name") + 1] = "stars"
    _fails(run_classification.main, args, tmp_path, r"--label_column_name 'stars' is not a column .*'sentiment'")
    args = _classification_args(tmp_path, classification_files, "--max_steps", "2")
    args[args.index("--max_seq_length") + 1] = "512"
    _fails(run_classification.main, args, tmp_path, r"--max_seq_length 512 is larger than the model's context of 64")
    _fails(run_image_classification.main, [
        "--model_type", "vit", "--train_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out"),
        "--do_train", *COMMON], tmp_path, r"--train_dir .*missing.* is not a directory")


def test_push_to_hub_uses_the_hf_lowrank_helper(tmp_path, text_files, monkeypatch):
    """--push_to_hub uploads the final directory with hf_lowrank.push_to_hub (our card), not the Trainer's push."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(hf_lowrank, "push_to_hub", lambda directory, repo_id, **kw: calls.append((directory, repo_id, kw)))
    result = run_clm.main(_clm_args(tmp_path, text_files, "--lowrank_method", "svd", "--max_steps", "2",
                                    "--push_to_hub", "--hub_model_id", "me/tiny-gpt2", "--hub_private_repo", "true"))
    assert result["trainer"].args.push_to_hub is False  # the Trainer never created a repo or pushed checkpoints
    (directory, repo_id, kwargs), = calls
    assert (directory, repo_id) == (str(tmp_path / "out"), "me/tiny-gpt2") and kwargs["private"] is True
    assert (tmp_path / "out" / "config.json").is_file()  # pushed after the final model was in place


def test_failed_training_leaves_no_model(tmp_path, text_files, monkeypatch):
    """A crash during training leaves no config.json/weights in output_dir, and keeps an earlier model intact."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"earlier": "model"}')

    def crash(self, *args, **kwargs):
        raise RuntimeError("simulated crash during training")

    monkeypatch.setattr(LowRankTrainer, "train", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_clm.main(_clm_args(tmp_path, text_files, "--max_steps", "2"))
    assert json.loads((out / "config.json").read_text()) == {"earlier": "model"}
    assert not any(name.endswith(".safetensors") for name in os.listdir(out))


def test_error_is_one_line_from_the_command_line(tmp_path):
    """As a user sees it: exit status 1, one line on stderr, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPTS / "run_clm.py"), "--model_type", "gpt2",
                           "--train_tokenizer_vocab_size", "300", "--train_file", str(tmp_path / "missing.txt"),
                           "--do_train", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: --train_file") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["run_clm.py", "run_classification.py", "run_image_classification.py"])
def test_help_lists_every_lowrank_knob_with_its_default(script):
    """`--help` must work (argparse %-formats help texts: "5% of the run" once crashed it) and show each knob."""
    result = subprocess.run([sys.executable, str(SCRIPTS / script), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "(default: 5% of the run)" in text
    for f in dataclasses.fields(LowRankConfig):
        if f.init and f.name != "method":
            assert f"--{f.name}" in text, f.name
    assert f"(default: {LowRankConfig().sigma_cutoff})" in text
