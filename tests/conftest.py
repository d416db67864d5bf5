"""Shared fixtures: tiny randomly initialised models built from configs, a tiny
character-level tokenizer with a chat template, and paths to ../shared data."""

from __future__ import annotations

import os
import string
from pathlib import Path

# Tests never touch the network: the Hugging Face libraries fail at once instead of
# retrying for a minute (set before they are imported; subprocesses inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"

@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and probes run faster on one torch thread, and far faster on a busy
    shared CPU (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat_template: bool = True, extra_specials: tuple[str, ...] = ()):
    """A character-level fast tokenizer (printable ASCII) with chat special tokens.

    ``extra_specials`` (e.g. a VLM's image tokens) get the ids right after the chat
    specials, before the characters."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", *extra_specials]
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   additional_special_tokens=specials[3:])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


VOCAB = 7 + 98


def tiny_config(family: str):
    """Config of a 3-layer model of the given family (hidden 32, d_ff 48)."""
    from transformers import AutoConfig

    common = dict(vocab_size=VOCAB + 8, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=3, n_head=4, n_inner=48, n_positions=512,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, **common)
    if family in ("gemma", "gemma2", "gemma3_text"):
        kw["head_dim"] = 8
    if family == "phi3":
        kw.pop("num_key_value_heads")
    return AutoConfig.for_model(family, **kw)


FAMILIES = ["llama", "qwen2", "gemma", "gpt2", "phi3", "mistral", "gemma2", "qwen3"]


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny random llama with the tiny tokenizer (a model directory the CLI and
    ``load_model`` read); shared by a module's tests, so they must not write into it."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


#: A main-job config sized for a tiny model: every stage runs in seconds.
TINY_RUN = """
# layered over the packaged main job (configs/default.toml): the keys below keep the tiny run at the stages'
# own defaults where the main job sets a budget
model = "{model}"
quick = true
modes = ["safeneuron", "dpo"]
[identify]
max_prompts = 16
batch_size = 8
tau_es = 0.5
by_category = false
verify = false
[prefs]
n_harmful = 6
n_harmless = 4
max_new_tokens = 8
batch_size = 8
[align]
lora = false
learning_rate = 5e-6
num_train_epochs = 3.0
max_pairs = 8
max_steps = 2
per_device_train_batch_size = 2
gradient_accumulation_steps = 1
max_length = {max_length}
save_steps = 1
tau_es = 0.5
[evaluate]
n_harmful = 6
n_harmless = 4
n_xstest = 4
templates = ["prefix_injection", "refusal_suppression", "role_play", "payload_splitting"]
n_template_prompts = 3
n_sweep_prompts = 4
n_redteam = 2
identify_prompts = 12
max_new_tokens = 6
n_ppl = 4
dtype = "auto"
[evaluate.attacks]
kinds = []
[analyze]
max_prompts = 12
n_splits = 3
n_orders = 10
"""


def write_tiny_run_config(folder: Path, model, *, max_length: int = 96) -> Path:
    """``folder/run.toml``: :data:`TINY_RUN` for ``model`` (align's ``max_length`` must fit its pairs)."""
    cfg = Path(folder) / "run.toml"
    cfg.write_text(TINY_RUN.format(model=model, max_length=max_length))
    return cfg


def keep_tiny_run_sizes(monkeypatch) -> None:
    """In-process runs of :data:`TINY_RUN`: the quick profile keeps only its quick flags, so the
    config's own (tiny) sizes stand."""
    from safeneuron import pipeline

    for stage in ("identify", "evaluate", "analyze"):
        monkeypatch.setitem(pipeline.QUICK, stage, {})
    for stage in ("prefs", "align"):
        monkeypatch.setitem(pipeline.QUICK, stage, {"quick": True})


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/data not available ({path})")
    return path
