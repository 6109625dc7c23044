"""Issue #12, reliability and security: every bad input a clear error, nothing silently wrong, no secret written.

One test (or a few) per item of the issue, numbered as there. Errors are checked for their type and for a message
that names the problem and the fix.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_lowrank  # noqa: F401  (registers the quantizer)
from hf_lowrank import LowRankConfig, LowRankController, LowRankLinear, LowRankTrainer, get_lowrank_model
from hf_lowrank.cli import main as cli_main
from hf_lowrank.hub.loading import copy_processor_files
from hf_lowrank.serialization import CheckpointError
from hf_lowrank.trainer import COMPLETE_MARKER, last_complete_checkpoint

from conftest import tiny_gpt2, write_text_split

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training_scripts"))

import run_clm  # noqa: E402
import script_utils  # noqa: E402

TINY_GPT2 = "n_embd=32,n_layer=2,n_head=2,n_positions=64,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--log_level", "error", "--seed", "0",
          "--dataloader_pin_memory", "false"]
SECRET = "hf_THISISNOTAREALTOKEN1234567890"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    return write_text_split(tmp_path_factory.mktemp("text"), 20000, 4000)


def _clm_args(tmp_path, text_files, *extra, out="out", overrides=TINY_GPT2):
    train, validation = text_files
    return ["--model_type", "gpt2", "--config_overrides", overrides, "--train_tokenizer_vocab_size", "300",
            "--train_file", str(train), "--validation_file", str(validation), "--block_size", "32",
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / out), "--do_train",
            "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--save_strategy", "no", *COMMON, *extra]


def _script_fails(args, tmp_path, match):
    """A script error: SystemExit with one line starting with 'error: ', before output_dir or the cache exist."""
    with pytest.raises(SystemExit, match=match) as error:
        run_clm.main(args)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    return message


def _cli(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _svd_dir(path, **config):
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd", rank_fraction=0.25, **config))
    model.save_pretrained(path)
    return model


def _lm_dataset(n=32, length=16, vocab=128):
    from datasets import Dataset

    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


# --- 1. a tied output head ---------------------------------------------------------------------------------
def test_1_tied_output_head_is_refused_naming_the_tied_module():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with \['transformer\.wte'\].*exclude_modules"):
        get_lowrank_model(model, LowRankConfig(method="svd", target_modules=["lm_head"]))
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())  # refused before any change
    assert getattr(model, "lowrank_config", None) is None


def test_1_untied_output_head_saves_and_loads(tmp_path):
    model = get_lowrank_model(tiny_gpt2(tie_word_embeddings=False),
                              LowRankConfig(method="svd", target_modules=["lm_head"], rank_fraction=0.25))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.lm_head, LowRankLinear)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


# --- 2. a saved model missing a tensor of a factorized layer -----------------------------------------------
@pytest.mark.parametrize("tensor", ["bias", "base", "V"])
def test_2_missing_tensor_of_a_factorized_layer_fails_loudly_naming_it(tensor, tmp_path, capsys):
    if tensor == "base":  # cumulative InRank holds a frozen dense W0
        model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="inrank", inrank_mode="cumulative", init_rank=2,
                                                             buffer_rank=2))
        model.save_pretrained(tmp_path)
    else:
        _svd_dir(tmp_path)
    key = f"transformer.h.0.attn.c_attn.{tensor}"
    weights = load_file(tmp_path / "model.safetensors")
    del weights[key]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"holds no '{tensor}' tensor .*\({key}\).*Save the model again"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    code, _, err = _cli(capsys, "inspect", tmp_path)
    assert code == 1 and key in err and "Traceback" not in err


# --- 3. one module under two names -------------------------------------------------------------------------
class _SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = self.a  # the same layer used in two places

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("targets", [["a", "b"], ["b"], "all-linear"])
def test_3_module_registered_under_two_names_is_refused(targets):
    model = _SharedLinear()
    with pytest.raises(ValueError, match=r"is the same module as .*several names.*exclude_modules"):
        get_lowrank_model(model, LowRankConfig(method="svd", target_modules=targets, rank_fraction=0.25))
    assert type(model.a) is nn.Linear and model.a is model.b


# --- 4. a frozen target ------------------------------------------------------------------------------------
def test_4_frozen_target_is_skipped_with_a_warning_and_stays_frozen_through_training():
    model = tiny_gpt2()
    frozen = model.transformer.h[0].mlp.c_fc
    frozen.weight.requires_grad_(False)  # the bias still trains (BitFit-style): its flag is kept
    weight = frozen.weight.detach().clone()
    config = LowRankConfig(method="oialr", delay_steps=1, update_every=1, sigma_cutoff=0.5,
                           rank_pattern={"c_attn|c_proj|c_fc": 0.25})
    with pytest.warns(UserWarning, match=r"transformer\.h\.0\.mlp\.c_fc.*frozen.*left as they are"):
        get_lowrank_model(model, config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.warns(UserWarning, match="frozen"):
        controller = LowRankController(model, optimizer=optimizer)
    for step in range(3):
        ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step()
    layer = model.transformer.h[0].mlp.c_fc
    assert layer is frozen and not layer.weight.requires_grad and layer.bias.requires_grad
    assert torch.equal(layer.weight, weight)  # three steps (conversion included) did not move it
    assert isinstance(model.transformer.h[0].mlp.c_proj, LowRankLinear)  # the others were converted


def test_4_only_frozen_targets_is_an_error():
    model = tiny_gpt2()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"selects only frozen layers .*unfreeze them"), pytest.warns(UserWarning):
        get_lowrank_model(model, LowRankConfig(method="svd"))


# --- 5. the final save: atomic, in the use form ------------------------------------------------------------
def _earlier_output(out: Path, outside: Path) -> dict:
    """An output_dir as an earlier run leaves it: a sharded model, its rank history, a checkpoint, logs,
    results, a README and a symlink. Returns {relative path: bytes} of what is not the earlier model."""
    dense = tiny_gpt2(seed=5)
    dense.save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    (out / "lowrank_history.json").write_text('{"history": [{"step": 3, "event": "update", "ranks": {}}]}')
    (out / "all_results.json").write_text('{"eval_loss": 9.0}')
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "model.safetensors").write_bytes(b"checkpoint weights")
    (out / "checkpoint-5" / "config.json").write_text('{"checkpoint": 5}')
    (out / "runs" / "Jan01").mkdir(parents=True)
    (out / "runs" / "Jan01" / "events.out").write_bytes(b"tensorboard")
    (out / "README.md").write_text("# my notes\n")
    outside.write_text("outside output_dir")
    (out / "link-to-outside").symlink_to(outside)
    return {"checkpoint-5/model.safetensors": b"checkpoint weights", "checkpoint-5/config.json": b'{"checkpoint": 5}',
            "runs/Jan01/events.out": b"tensorboard", "README.md": b"# my notes\n"}


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


def _oialr_trainer(out: Path, tokenizer=None):
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=0,
                                                         rank_pattern={"c_attn|c_proj|c_fc": 0.25}))
    args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, save_strategy="no")
    return LowRankTrainer(model=model, args=args, processing_class=tokenizer)


def test_5_final_save_writes_the_use_form_and_keeps_everything_else(tmp_path, tokenizer):
    out = tmp_path / "out"
    kept = _earlier_output(out, tmp_path / "secret.txt")
    trainer = _oialr_trainer(out, tokenizer)
    script_utils.save_final_model(trainer, str(out))
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["rank_pattern"] and not quant["sigma_layers"]  # Σ folded into the bases: the use form
    assert all(isinstance(m.S, torch.Tensor) for m in trainer.model.modules() if isinstance(m, LowRankLinear))
    names = set(os.listdir(out))
    assert {"model.safetensors", "tokenizer.json", "lowrank_history.json", "training_args.bin"} <= names
    assert not {"model.safetensors.index.json", "all_results.json"} & names  # of the earlier model
    assert not any(n.startswith("model-") for n in names)
    snapshot = _snapshot(out)
    assert all(snapshot[path] == data for path, data in kept.items())  # checkpoints, logs, README kept
    assert snapshot["link-to-outside"] == str(tmp_path / "secret.txt")  # a symlink stays a symlink
    assert json.loads((out / "lowrank_history.json").read_text())["history"] == []  # this run's (untrained)
    assert sorted(os.listdir(tmp_path)) == ["out", "secret.txt"]  # no staging folder left beside output_dir
    ids = torch.randint(0, 128, (1, 8))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-4)


class _Killed(BaseException):
    """Stands for SIGKILL: no `except Exception` and no cleanup runs."""


@pytest.mark.parametrize("where", ["writing", "linking", "before_swap", "after_swap", "no_exchange"])
def test_5_a_kill_at_any_point_leaves_a_complete_model(where, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _earlier_output(out, tmp_path / "secret.txt")
    before = _snapshot(out)
    trainer = _oialr_trainer(out)
    real_exchange = script_utils._exchange
    if where == "writing":
        def kill(trainer, directory):
            trainer.model.save_pretrained(directory)  # half of the files are there
            raise _Killed
        monkeypatch.setattr(script_utils, "_write_final_model", kill)
    elif where == "linking":
        def kill(src, dst):
            raise _Killed
        monkeypatch.setattr(script_utils, "_link_or_copy", kill)
    elif where == "before_swap":
        def kill(first, second):
            raise _Killed
        monkeypatch.setattr(script_utils, "_exchange", kill)
    elif where == "after_swap":
        def kill(first, second):
            real_exchange(first, second)
            raise _Killed
        monkeypatch.setattr(script_utils, "_exchange", kill)
    else:  # a platform without the atomic exchange: two renames
        monkeypatch.setattr(script_utils, "_exchange", lambda first, second: False)
    if where == "no_exchange":
        script_utils.save_final_model(trainer, str(out))
    else:
        with pytest.raises(_Killed):
            script_utils.save_final_model(trainer, str(out))
    if where in ("writing", "linking", "before_swap"):
        assert _snapshot(out) == before  # the earlier model, untouched
        AutoModelForCausalLM.from_pretrained(out)
    else:
        assert json.loads((out / "config.json").read_text())["quantization_config"]["rank_pattern"]  # the new one
        assert not (out / "model.safetensors.index.json").exists()
        assert (out / "checkpoint-5" / "config.json").read_text() == '{"checkpoint": 5}'
        AutoModelForCausalLM.from_pretrained(out)
    monkeypatch.undo()  # the next save finishes the job and clears what the kill left beside output_dir
    script_utils.save_final_model(trainer, str(out))
    assert sorted(os.listdir(tmp_path)) == ["out", "secret.txt"]
    assert (out / "checkpoint-5" / "model.safetensors").read_bytes() == b"checkpoint weights"
    assert isinstance(AutoModelForCausalLM.from_pretrained(out).transformer.h[0].mlp.c_fc, LowRankLinear)


# --- 6, 7, 12c. the scripts: a dense rerun, the Hub token, resuming into another architecture --------------
def test_6_7_12_scripts_token_never_written_resume_checked_stale_history_removed(tmp_path, text_files):
    out = tmp_path / "out"
    run_clm.main(_clm_args(tmp_path, text_files, "--lowrank_method", "svd", "--rank_fraction", "0.25",
                           "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--hub_token", SECRET))
    saved = [out / "training_args.bin", out / "checkpoint-2" / "training_args.bin"]
    for path in saved:  # 7: the Trainer pickles its arguments into both
        assert path.is_file() and SECRET.encode() not in path.read_bytes()
    assert (out / "lowrank_history.json").is_file()
    model_bytes = (out / "model.safetensors").read_bytes()

    # 12c: resuming into another architecture: a one-line error before training; the earlier model intact
    wider = TINY_GPT2.replace("n_embd=32", "n_embd=48")
    with pytest.raises(SystemExit, match=r"^error: cannot resume from .*checkpoint-2.*different architecture.*"
                                         r"model configuration of the run that wrote it") as error:
        run_clm.main(_clm_args(tmp_path, text_files, "--lowrank_method", "svd", "--max_steps", "4",
                               "--resume_from_checkpoint", str(out / "checkpoint-2"), overrides=wider))
    assert "\n" not in str(error.value)
    assert (out / "model.safetensors").read_bytes() == model_bytes

    # 6: a dense rerun into the same folder: no stale rank history; the earlier checkpoint is kept
    result = run_clm.main(_clm_args(tmp_path, text_files, "--lowrank_method", "none", "--max_steps", "1"))
    assert type(result["trainer"]) is Trainer
    assert not (out / "lowrank_history.json").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "checkpoint-2" / COMPLETE_MARKER).is_file()


def test_7_push_settings_keep_the_token_training_args_do_not(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), push_to_hub=True, hub_model_id="me/x",
                             hub_token=SECRET, report_to=[])
    push = script_utils.check_push(args)
    assert push["token"] == SECRET and args.hub_token is None and args.push_to_hub is False
    args = TrainingArguments(output_dir=str(tmp_path / "out"), hub_token=SECRET, report_to=[])
    assert script_utils.check_push(args) is None and args.hub_token is None  # also without --push_to_hub


# --- 8. symlinks are never followed when copying -----------------------------------------------------------
def test_8_symlinks_are_not_copied_by_push_merge_or_export(tmp_path, capsys, monkeypatch):
    from unittest import mock

    from huggingface_hub import HfApi, constants

    model_dir, secret = tmp_path / "model", tmp_path / "secret.txt"
    _svd_dir(model_dir)
    secret.write_text("password=hunter2")
    (model_dir / "tokenizer.json").symlink_to(secret)
    (model_dir / "vocab.txt").write_text("a\nb\n")
    (model_dir / "lowrank_history.json").symlink_to(secret)
    target = tmp_path / "copy"
    target.mkdir()
    assert copy_processor_files(model_dir, target) == ["vocab.txt"]
    for command in ("merge", "export"):
        code, _, _ = _cli(capsys, command, model_dir, tmp_path / command)
        assert code == 0
        assert not (tmp_path / command / "tokenizer.json").exists() and (tmp_path / command / "vocab.txt").is_file()
        assert not (tmp_path / command / "lowrank_history.json").exists()
    (model_dir / "lowrank_history.json").unlink()  # (push reads the history as JSON, never copies the file)
    uploaded = {}

    def fake_upload(*args, folder_path, **kwargs):
        uploaded.update({name: Path(folder_path, name).read_bytes() for name in os.listdir(folder_path)})
        return mock.Mock(commit_url="https://huggingface.co/me/x/commit/1")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with mock.patch.object(HfApi, "create_repo"), mock.patch.object(HfApi, "upload_folder", side_effect=fake_upload):
        code, _, err = _cli(capsys, "push", model_dir, "me/x")
    assert code == 0, err
    assert "tokenizer.json" not in uploaded and "vocab.txt" in uploaded
    assert not any(b"hunter2" in data for data in uploaded.values())


# --- 9. an invalid regex -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("target_modules", "(("), ("exclude_modules", "h.0.(("),
                                          ("rank_pattern", {"((": 2})])
def test_9_invalid_regex_is_a_clear_error_before_the_model_changes(field, value):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"is not a valid regular expression .*Fix the regex"):
        get_lowrank_model(model, LowRankConfig(method="svd", **{field: value}))
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


@pytest.mark.parametrize("flag, value", [("--target_modules", "(("), ("--rank_pattern", '{"((": 2}')])
def test_9_scripts_check_the_regex_before_loading_anything(flag, value, tmp_path, text_files):
    _script_fails(_clm_args(tmp_path, text_files, "--lowrank_method", "svd", flag, value), tmp_path,
                  r"invalid low-rank argument: .*'\(\(.* is not a valid regular expression")


# --- 10. --resume_from_checkpoint that does not exist ------------------------------------------------------
def test_10_missing_checkpoint_fails_before_output_dir_is_created(tmp_path, text_files):
    missing = str(tmp_path / "nonexistent")
    _script_fails(_clm_args(tmp_path, text_files, "--resume_from_checkpoint", missing), tmp_path,
                  r"--resume_from_checkpoint .*nonexistent' does not exist: pass a checkpoint-N folder")
    (tmp_path / "notes").mkdir()
    _script_fails(_clm_args(tmp_path, text_files, "--resume_from_checkpoint", str(tmp_path / "notes")), tmp_path,
                  r"is not a Trainer checkpoint \(no trainer_state\.json\)")


def test_10_trainer_names_a_missing_checkpoint(tmp_path):
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=1)
    trainer = LowRankTrainer(model=model, args=args, train_dataset=_lm_dataset())
    with pytest.raises(CheckpointError, match=r"'/nonexistent' does not exist: pass a checkpoint-N folder"):
        trainer.train(resume_from_checkpoint="/nonexistent")


# --- 11. a stray checkpoint-20-backup folder ---------------------------------------------------------------
def test_11_last_complete_checkpoint_ignores_other_folders(tmp_path):
    for name, complete in (("checkpoint-10", True), ("checkpoint-20-backup", True), ("checkpoint-abc", True),
                           ("checkpoint-", True), ("checkpoint-30", False)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / COMPLETE_MARKER).touch()
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")


# --- 12. messages that help --------------------------------------------------------------------------------
@pytest.mark.parametrize("lowrank", [True, False])
def test_12_truncated_weights_are_named_by_inspect_load_and_scripts(lowrank, tmp_path, capsys, text_files):
    model_dir = tmp_path / "model"
    if lowrank:
        _svd_dir(model_dir)
    else:
        tiny_gpt2().save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, out, err = _cli(capsys, "inspect", model_dir)
    assert code == 1 and out == "" and "Traceback" not in err
    assert f"{weights} is truncated or corrupt" in err and "download the model again" in err
    if lowrank:  # a plain from_pretrained goes through the quantizer's check
        with pytest.raises(ValueError, match="truncated or corrupt"):
            AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        args = [a for a in _clm_args(tmp_path, text_files) if a not in ("--model_type", "gpt2", "--config_overrides",
                                                                        TINY_GPT2)]
        _script_fails(args + ["--model_name_or_path", str(model_dir)], tmp_path,
                      r"--model_name_or_path .*model\.safetensors is truncated or corrupt.*download the model again")


@pytest.mark.parametrize("edit, match", [
    (("rank", "16"), r"rank_pattern\['transformer\.h\.0\.mlp\.c_fc'\] is '16' \(str\): a rank must be a whole number"),
    (("rank", None), r"is None \(NoneType\): a rank must be a whole number"),
    (("rank", 16.0), r"is 16\.0 \(float\): a rank must be a whole number"),
    (("list", None), r"rank_pattern must be a dict \{layer name: rank\}, got a list"),
    (("layer", "transformer.ln_f"), r"'transformer\.ln_f' as a factorized linear layer, but .* it is a LayerNorm"),
    (("layer", "transformer.h.7.mlp.c_fc"), r"'transformer\.h\.7\.mlp\.c_fc' that this GPT2LMHeadModel does not have"),
])
def test_12_bad_quantization_config_is_a_clear_value_error(edit, match, tmp_path, capsys):
    _svd_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    pattern = config["quantization_config"]["rank_pattern"]
    kind, value = edit
    if kind == "rank":
        pattern["transformer.h.0.mlp.c_fc"] = value
    elif kind == "list":
        config["quantization_config"]["rank_pattern"] = list(pattern)
    else:
        pattern[value] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    code, _, err = _cli(capsys, "inspect", tmp_path)
    assert code == 1 and "Traceback" not in err and ("config.json" in err or "quantization_config" in err)


def test_12_resuming_into_another_architecture_is_a_checkpoint_error(tmp_path):
    out = tmp_path / "run"
    args = dict(output_dir=str(out), report_to=[], use_cpu=True, max_steps=2, save_strategy="steps", save_steps=2,
                per_device_train_batch_size=8, disable_tqdm=True)
    config = LowRankConfig(method="svd", rank_fraction=0.25)
    LowRankTrainer(model=get_lowrank_model(tiny_gpt2(), config), args=TrainingArguments(**args),
                   train_dataset=_lm_dataset()).train()
    checkpoint = str(out / "checkpoint-2")
    for overrides, match in ((dict(n_embd=48), r"different architecture .*c_attn\.U: checkpoint \(96, 8\), model "
                                               r"\(144, 8\).*Resume with the model configuration"),
                             (dict(n_layer=3), r"different architecture .*h\.2\..*not in the checkpoint"),
                             (dict(n_layer=1), r"'transformer\.h\.1\.attn\.c_attn' that this GPT2LMHeadModel does "
                                               r"not have: it was saved from a different architecture")):
        trainer = LowRankTrainer(model=get_lowrank_model(tiny_gpt2(**overrides), config),
                                 args=TrainingArguments(**{**args, "max_steps": 4}), train_dataset=_lm_dataset())
        with pytest.raises(CheckpointError, match=match):
            trainer.train(resume_from_checkpoint=checkpoint)
    (out / "checkpoint-2" / COMPLETE_MARKER).unlink()
    trainer = LowRankTrainer(model=get_lowrank_model(tiny_gpt2(), config), args=TrainingArguments(**args),
                             train_dataset=_lm_dataset())
    with pytest.raises(CheckpointError, match="incomplete checkpoint .*resume from an earlier one"):
        trainer.train(resume_from_checkpoint=checkpoint)


def test_12_svd_of_a_meta_device_model_names_the_fix():
    with torch.device("meta"):
        model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"meta device: materialize the model's weights first"):
        get_lowrank_model(model, LowRankConfig(method="svd"))


# --- 13. merge onto a link to DIR, and onto a sharded model ------------------------------------------------
def test_13_merge_onto_a_symlink_to_dir_is_refused(tmp_path, capsys):
    model_dir, link = tmp_path / "model", tmp_path / "link"
    _svd_dir(model_dir)
    link.symlink_to(model_dir)
    before = _snapshot(model_dir)
    for command in ("merge", "export"):
        code, _, err = _cli(capsys, command, model_dir, link, "--overwrite")
        assert code == 1 and "OUT must differ from DIR" in err and "Choose another OUT" in err
    assert _snapshot(model_dir) == before
    assert isinstance(AutoModelForCausalLM.from_pretrained(model_dir).transformer.h[0].mlp.c_fc, LowRankLinear)


def test_13_merge_overwrite_onto_a_sharded_model_leaves_no_stale_shards(tmp_path, capsys):
    model_dir, out = tmp_path / "model", tmp_path / "out"
    _svd_dir(model_dir)
    tiny_gpt2(seed=3).save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    code, _, err = _cli(capsys, "merge", model_dir, out, "--overwrite")
    assert code == 0, err
    names = os.listdir(out)
    assert "model.safetensors" in names and "model.safetensors.index.json" not in names
    assert not any(n.startswith("model-") for n in names)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, LowRankLinear) for m in merged.modules())


def test_13_merge_from_an_unloadable_dir_keeps_the_existing_output(tmp_path, capsys):
    model_dir, out = tmp_path / "model", tmp_path / "out"
    _svd_dir(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"broken")
    tiny_gpt2().save_pretrained(out)
    before = _snapshot(out)
    code, _, err = _cli(capsys, "merge", model_dir, out, "--overwrite")
    assert code == 1 and "truncated or corrupt" in err
    assert _snapshot(out) == before  # nothing removed before the source loaded


# --- 14. loading without `import hf_lowrank` ---------------------------------------------------------------
def test_14_plain_load_without_the_package_is_what_the_readme_says(tmp_path):
    """transformers 5 offers no hook for an unknown quant_method (it logs a warning and loads dense, randomly
    initialized layers); the README says so and points to `hf-lowrank merge`. This pins that behaviour."""
    _svd_dir(tmp_path)
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
            "assert 'hf_lowrank' not in sys.modules\n"
            "print(type(m.transformer.h[0].mlp.c_fc).__name__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "Conv1D"
    assert "Unknown quantization type, got hf_lowrank" in result.stderr
