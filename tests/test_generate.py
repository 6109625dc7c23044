"""`model.generate` on factorized GPT-2 models.

For OIALR (right after its conversion, and after cuts), InRank (after growth and freeze) and svd: greedy
decoding with the KV cache equals step-by-step argmax decoding without a cache (the whole sequence fed each
step), and equals the generation of the same model merged to dense. Some cases keep a few layers dense
(rank at or above break-even), so mixed models are covered too.

    python -m pytest -q tests/test_generate.py
"""

import copy

import pytest
import torch
from transformers import DynamicCache

import hf_lowrank
from hf_lowrank import LowRankConfig, LowRankController, LowRankLinear, get_lowrank_model, lowrank_summary

from conftest import tiny_gpt2

NEW_TOKENS = 12
PROMPT_LENGTH = 20
ATOL = 2e-5  # same function by another path or association: float32 differences seen are <= 1e-6
MARGIN = 10 * ATOL  # a top-1 / top-2 gap above this cannot be flipped by that rounding

# delay_steps=0 converts at injection (that first update may already cut). The tiny model's random weights
# have flat spectra: with a lower cutoff every layer stays above break-even, so held dense.
OIALR = LowRankConfig(method="oialr", delay_steps=0, sigma_cutoff=0.6, update_every=2)
CASES = {
    "oialr-converted": (OIALR, 0),
    "oialr-cut": (OIALR, 4),
    "inrank": (LowRankConfig(method="inrank", init_rank=2, buffer_rank=4, rank_warmup_steps=2, check_every=2,
                             freeze_step=6), 8),
    "svd": (LowRankConfig(method="svd", rank_fraction=0.5), 0),
}


def _ranks(model):
    return {name: layer.rank for name, layer in lowrank_summary(model).layers.items()}


def _build(config, steps, vocab_size, train_blocks):
    # eos_token_id=None: no early stop, so every decoding runs exactly NEW_TOKENS steps on raw argmax
    model = get_lowrank_model(tiny_gpt2(vocab_size=vocab_size, eos_token_id=None), copy.deepcopy(config))
    start = _ranks(model)
    if steps:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        controller = LowRankController(model, optimizer=optimizer, num_training_steps=steps)
        for i in range(steps):
            ids = torch.tensor(train_blocks[4 * i:4 * i + 4]["input_ids"])
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            controller.step()
    model.eval()
    return model, start


@pytest.fixture(scope="module", params=list(CASES))
def factorized(request, tokenizer, lm_data):
    config, steps = CASES[request.param]
    model, start = _build(config, steps, len(tokenizer), lm_data[0])
    ranks = _ranks(model)
    assert ranks, f"{request.param}: no layer factorized, the case would test a dense model"
    if request.param == "oialr-cut":  # the schedule really cut below the conversion's ranks
        assert all(ranks[n] <= r for n, r in start.items()) and any(ranks[n] < r for n, r in start.items())
    if request.param == "inrank":  # grown past init_rank
        assert max(ranks.values()) > config.init_rank, ranks
    return model


@pytest.fixture(scope="module")
def prompts(lm_data):
    """Two real-text prompts of equal length (no padding, so cached and uncached positions agree)."""
    return torch.tensor(lm_data[1][:2]["input_ids"])[:, :PROMPT_LENGTH]


def stepwise_greedy(model, ids, steps=NEW_TOKENS):
    """Greedy decoding without a cache: `(sequences, logits of each step (batch, steps, vocab))`."""
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            last = model(input_ids=ids, use_cache=False).logits[:, -1]
            logits.append(last)
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(logits, dim=1)


def cached_greedy(model, ids, steps=NEW_TOKENS, **kwargs):
    """`model.generate` greedy with the KV cache: `(sequences, raw logits of each step)`."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                         max_new_tokens=steps, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                         **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def min_margin(logits):
    top2 = logits.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).min().item()


def assert_same_decoding(expected, actual):
    """Same logits within ATOL and, where the argmax is unambiguous, identical tokens."""
    (seq_e, logits_e), (seq_a, logits_a) = expected, actual
    # precondition of an exact token comparison on this prompt, not a property of the model under test
    assert min_margin(logits_e) > MARGIN, "argmax nearly tied: pick another prompt/seed"
    assert logits_a.shape == logits_e.shape
    torch.testing.assert_close(logits_a, logits_e, atol=ATOL, rtol=0)
    assert torch.equal(seq_a, seq_e)


def test_cached_generate_equals_stepwise_argmax(factorized, prompts):
    expected = stepwise_greedy(factorized, prompts)
    assert expected[0].shape == (2, PROMPT_LENGTH + NEW_TOKENS)
    assert_same_decoding(expected, cached_greedy(factorized, prompts))


def test_generate_equals_merged_model(factorized, prompts):
    merged = hf_lowrank.merge_and_unload(copy.deepcopy(factorized))
    assert not any(isinstance(m, LowRankLinear) for m in merged.modules())
    assert_same_decoding(cached_greedy(merged, prompts), cached_greedy(factorized, prompts))


class _StaleKeysCache(DynamicCache):
    """A broken cache: on decode steps the cached keys of past positions come back zeroed."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if key_states.shape[-2] == 1:
            keys = torch.cat([torch.zeros_like(keys[..., :-1, :]), keys[..., -1:, :]], dim=-2)
        return keys, values


def test_comparison_detects_a_broken_cache(tokenizer, lm_data, prompts):
    model, _ = _build(*CASES["svd"], len(tokenizer), lm_data[0])
    expected = stepwise_greedy(model, prompts)
    broken = cached_greedy(model, prompts, cache=_StaleKeysCache(config=model.config))
    assert min_margin(expected[1]) > MARGIN
    with pytest.raises(AssertionError, match="not close"):
        assert_same_decoding(expected, broken)
