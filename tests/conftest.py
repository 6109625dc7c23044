import os

# Tripwire: nothing in the test suite may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The demo corpus and tokenizer trainer live with the training scripts (not in the wheel).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training_scripts"))


def tiny_gpt2(seed=0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    kw = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    kw.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**kw))


def tiny_bert(seed=0, num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128,
        max_position_embeddings=64, num_labels=num_labels))


def tiny_vit(seed=0, num_labels=3):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
        patch_size=4, num_channels=3, num_labels=num_labels))


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A real English text file: docstrings of the installed standard library."""
    from demo_corpus import stdlib_docstrings

    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text(stdlib_docstrings(max_chars=120_000))
    return path


@pytest.fixture(scope="session")
def tokenizer(text_file):
    from demo_corpus import train_tokenizer

    return train_tokenizer([str(text_file)], vocab_size=512)


def lm_blocks(tokenizer, text, block_size=32, limit=None):
    """A `datasets.Dataset` of consecutive `block_size`-token blocks (input_ids = labels)."""
    from datasets import Dataset

    ids = tokenizer(text)["input_ids"]
    blocks = [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)][:limit]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


@pytest.fixture(scope="session")
def lm_data(tokenizer, text_file):
    """(train, eval) datasets of 32-token blocks from the real text file."""
    text = text_file.read_text()
    cut = int(len(text) * 0.9)
    return lm_blocks(tokenizer, text[:cut]), lm_blocks(tokenizer, text[cut:], limit=64)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run as fast on one thread, and much faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_text_split(folder, train_chars, validation_chars):
    """`train.txt` and `validation.txt` of real English (standard-library docstrings) in `folder`; their paths."""
    from demo_corpus import stdlib_docstrings

    text = stdlib_docstrings(max_chars=train_chars + validation_chars)
    (folder / "train.txt").write_text(text[:train_chars])
    (folder / "validation.txt").write_text(text[train_chars:])
    return folder / "train.txt", folder / "validation.txt"
