"""VLMs: the language backbone's MLPs, image+text recording, pruning, freezing with images,
the typographic renderer and multimodal prompt files, on tiny random VLMs built from configs.

No small real VLM can be had offline here (no PyPI package ships one; no hub): the real
code paths (processor chat templates, image token expansion, left padding, pixel inputs)
are exercised by tiny randomly initialised Qwen2-VL, LLaVA and Idefics3 models with
processors built from their own classes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tokenizer
from safeneuron.activations import ActivationStats, record_activations
from safeneuron.arch import find_mlps
from safeneuron.data.images import (
    FIGSTEP_REQUEST,
    MultimodalPrompt,
    MultimodalPromptError,
    harmless_scene_prompts,
    load_multimodal_prompts,
    render_text_image,
    typographic_prompts,
)
from safeneuron.data.prompts import PromptSet
from safeneuron.generation import generate, read_cache
from safeneuron.inputs import prompt_batches, render_image_text_chat
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import LoadedModel, is_vlm

IMAGE_SPECIALS = ("<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                  "<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
VOCAB = 7 + len(IMAGE_SPECIALS) + 98
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB + 8, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=1)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)
# Where each family's chat template puts the image; its processor expands the placeholder.
IMAGE_PLACEHOLDER = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>",
                     "idefics3": "<image>"}
VLM_FAMILIES = list(IMAGE_PLACEHOLDER)


def chat_template(image: str) -> str:
    return ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image +
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_vlm(family: str, seed: int = 0):
    """(model, processor): a 3-layer language backbone (d_ff 48) behind a 1-layer vision tower."""
    tok = make_tokenizer(extra_specials=IMAGE_SPECIALS)
    ids = tok.get_vocab()
    template = chat_template(IMAGE_PLACEHOLDER[family])
    torch.manual_seed(seed)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
            """Without torchvision there is no video processor class to check None against."""

            def check_argument_for_proper_class(self, name, arg):
                if name == "video_processor" and arg is None:
                    return None
                return super().check_argument_for_proper_class(name, arg)

        config = Qwen2VLConfig(
            text_config=dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        model = Qwen2VLForConditionalGeneration(config)
        # 56x56 pixels: a 4x4 grid of 14-pixel patches, 4 image tokens after the 2x2 merge
        images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
        processor = ImageOnlyQwen2VLProcessor(image_processor=images, tokenizer=tok, chat_template=template)
    elif family == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        config = LlavaConfig(text_config=dict(TEXT, model_type="llama"),
                             vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=16),
                             image_token_id=ids["<image>"], vision_feature_layer=-1)
        model = LlavaForConditionalGeneration(config)
        images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=template)
    elif family == "idefics3":
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        config = Idefics3Config(text_config=dict(TEXT, model_type="llama"), vision_config=VISION,
                                image_token_id=ids["<image>"], scale_factor=2)
        model = Idefics3ForConditionalGeneration(config)
        images = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                           do_image_splitting=False)
        processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=template)
    else:
        raise ValueError(family)
    return model.eval(), processor


pytestmark = pytest.mark.usefixtures("one_thread")


def small_sets(n=6, size=(64, 64)):
    """Typographic harmful prompts and drawn harmless scenes, with categories (small images: fast)."""
    harmful = PromptSet([f"harmful instruction number {i}: do something bad {'x' * i}" for i in range(n)],
                        ["a" if i % 2 else "b" for i in range(n)])
    return {"harmful": typographic_prompts(harmful, size=size), "harmless": harmless_scene_prompts(n, size=size)}


def direct_stats(model, processor, prompts, position):
    """One prompt at a time, no padding, a plain pre-hook on each down_proj: the reference."""
    sites = find_mlps(model)
    captured, pooled = {}, {s.name: [] for s in sites}
    handles = [s.down.register_forward_pre_hook(lambda m, a, name=s.name: captured.__setitem__(name, a[0]))
               for s in sites]
    try:
        for p in prompts:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.text}]}]
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = processor(text=[text], images=[[p.load_image()]], return_tensors="pt")
            with torch.no_grad():
                model(**inputs)
            for name, acts in captured.items():
                a = acts[0].double().numpy()  # [seq, d_ff], image tokens included
                pooled[name].append({"max": a.max(0), "last": a[-1], "mean": a.mean(0)}[position])
    finally:
        for h in handles:
            h.remove()
    return {k: np.stack(v) for k, v in pooled.items()}


# --------------------------------------------------------------------------- architecture
ALL_FAMILIES = {
    "qwen2_vl": dict(text_config=dict(TEXT), vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2)),
    "qwen2_5_vl": dict(text_config=dict(TEXT), vision_config=dict(depth=1, hidden_size=16, intermediate_size=32,
                                                                   out_hidden_size=32, num_heads=2,
                                                                   fullatt_block_indexes=[0])),
    "llava": dict(text_config=dict(TEXT, model_type="qwen2"), vision_config=dict(VISION, model_type="clip_vision_model")),
    "llava_next": dict(text_config=dict(TEXT, model_type="mistral"),
                       vision_config=dict(VISION, model_type="clip_vision_model")),
    "idefics3": dict(text_config=dict(TEXT, model_type="llama"), vision_config=VISION),
    "smolvlm": dict(text_config=dict(TEXT, model_type="llama"), vision_config=VISION),
    "gemma3": dict(text_config=dict(TEXT, head_dim=8), vision_config=VISION, mm_tokens_per_image=4),
}


@pytest.mark.parametrize("model_type", list(ALL_FAMILIES))
def test_find_mlps_returns_the_language_backbone(model_type):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(model_type, **ALL_FAMILIES[model_type])
    model = AutoModelForImageTextToText.from_config(config)
    assert is_vlm(model) and is_vlm(config) and is_vlm(config.to_dict())
    sites = find_mlps(model)
    prefix = "model.text_model" if model_type in ("idefics3", "smolvlm") else "model.language_model"
    assert [s.name for s in sites] == [f"{prefix}.layers.{i}.mlp" for i in range(3)]
    assert [s.layer for s in sites] == [0, 1, 2] and all(s.d_ff == 48 for s in sites)
    modules = dict(model.named_modules())
    assert all(modules[s.name] is s.module and s.down is s.module.down_proj for s in sites)
    # Qwen2.5-VL's vision blocks have gated MLPs too; they are not the language model's neurons
    gated = [n for n, m in model.named_modules() if hasattr(m, "down_proj") and hasattr(m, "gate_proj")]
    assert set(gated) - {s.name for s in sites} <= {n for n in gated if ".visual." in f".{n}."}


def test_text_models_are_not_vlms():
    from conftest import tiny_model

    assert not is_vlm(tiny_model("llama")) and not is_vlm({"model_type": "llama"})


# --------------------------------------------------------------------------- recording
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_streaming_stats_equal_a_direct_computation(family):
    model, processor = tiny_vlm(family)
    sets = small_sets()
    for position in ("last", "max"):
        stats = record_activations(model, processor, sets, position=position, batch_size=4,
                                              by_category=("harmful",), progress=False)
        assert stats.position == position and stats.count("harmful") == 6 and stats.count("harmful/a") == 3
        for label, prompts in [*sets.items(), ("harmful/a", sets["harmful"][1::2])]:
            ref = direct_stats(model, processor, prompts, position)
            for name, acts in ref.items():
                s = stats.groups[label][name]
                np.testing.assert_allclose(s.mean.numpy(), acts.mean(0), rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(s.var.numpy(), acts.var(0, ddof=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_batches_are_left_padded_and_end_with_the_generation_prompt(family):
    model, processor = tiny_vlm(family)
    prompts = small_sets(3)["harmless"]
    batch = next(prompt_batches(processor, prompts, 3, model=model))
    mask = batch.inputs["attention_mask"]
    assert mask[:, -1].all() and not mask.all(), "rows of different lengths, padded on the left"
    assistant = processor.tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert (batch.inputs["input_ids"][:, -1] == assistant).all()
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>" if family == "qwen2_vl" else "<image>")
    last_image = max(int(torch.nonzero(row == image_token).max()) for row in batch.inputs["input_ids"])
    assert last_image < mask.shape[1] - 1, "the pooled last position comes after the image tokens"
    assert batch.inputs["pixel_values"].dtype == next(model.parameters()).dtype


def test_resume_from_a_checkpoint_gives_the_same_statistics():
    model, processor = tiny_vlm("llava")
    sets = small_sets(4)
    saved, seen = {}, []

    def checkpoint(batches_done, stats):
        seen.append(batches_done)
        if batches_done == 1:
            saved.update(stats.to_tensors())

    full = record_activations(model, processor, sets, batch_size=3, by_category=True, progress=False,
                                         on_batch=checkpoint)
    assert seen == [1, 2, 3]
    resumed = record_activations(model, processor, sets, batch_size=3, by_category=True, progress=False,
                                            stats=ActivationStats.from_tensors(saved, "last"), skip_batches=1)
    assert set(resumed.groups) == set(full.groups)
    for group, per_mlp in full.groups.items():
        for name, s in per_mlp.items():
            r = resumed.groups[group][name]
            assert r.count == s.count
            torch.testing.assert_close(r.mean, s.mean)
            torch.testing.assert_close(r.m2, s.m2)


def test_identify_runs_on_a_vlm_with_typographic_prompts(tmp_path):
    from safeneuron.config import IdentifyConfig
    from safeneuron.stages.identify import Identification, identify

    model, processor = tiny_vlm("idefics3")
    loaded = LoadedModel(model, processor.tokenizer, "tiny-idefics3", "<memory>", processor=processor)
    config = IdentifyConfig(max_prompts=6, batch_size=4, position="last", tau_es=0.5, by_category=True)
    result = identify(config, tmp_path / "id", loaded=loaded, progress=False)
    names = [s.name for s in find_mlps(model)]
    assert list(result.union.masks) == names and names[0].startswith("model.text_model.layers.")
    assert result.manifest["n_harmful"] == 6 and result.manifest["model_type"] == "idefics3"
    again = Identification.load(tmp_path / "id")
    assert torch.equal(again.union.masks[names[1]], result.union.masks[names[1]])


def test_a_vlm_loaded_without_its_processor_is_a_clear_error(tmp_path):
    from safeneuron.config import IdentifyConfig
    from safeneuron.stages.identify import identify
    from safeneuron.models import LoadedModel, ModelLoadError

    model, processor = tiny_vlm("llava")
    with pytest.raises(ModelLoadError, match="needs its processor"):
        identify(IdentifyConfig(max_prompts=4), tmp_path / "id", loaded=LoadedModel(model, processor.tokenizer, "x", "y"),
                 progress=False)


def test_load_model_opens_a_saved_vlm_with_its_processor(tmp_path):
    from safeneuron.models import load_model

    model, processor = tiny_vlm("llava")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    for loaded in (load_model(str(tmp_path), dtype="float32", device="cpu"),):  # one loader for LMs and VLMs
        assert loaded.is_vlm and loaded.tokenizer is loaded.processor.tokenizer
        assert loaded.processor.chat_template and find_mlps(loaded.model)[0].name == "model.language_model.layers.0.mlp"
        prompt = small_sets(1)["harmless"][0]
        assert render_image_text_chat(loaded.processor, [prompt]) == render_image_text_chat(processor, [prompt])


# --------------------------------------------------------------------------- pruning, generation, freezing
def logits(model, processor, prompts):
    batch = next(prompt_batches(processor, prompts, len(prompts), model=model))
    with torch.no_grad():
        return model(**batch.inputs).logits


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_pruning_hooks_are_reversible_bit_exactly(family):
    from safeneuron.hooks import prune_neurons

    model, processor = tiny_vlm(family)
    prompts = small_sets(2)["harmful"]
    before = logits(model, processor, prompts)
    mask = SafetyNeuronMask.random(model, frac=0.3, seed=2)
    with prune_neurons(model, mask):
        pruned = logits(model, processor, prompts)
    after = logits(model, processor, prompts)
    assert not torch.allclose(pruned, before)
    assert torch.equal(after, before)
    with prune_neurons(model, SafetyNeuronMask.empty_like(model)):
        assert torch.equal(logits(model, processor, prompts), before)


def test_generate_multimodal_is_deterministic_and_cached(tmp_path):
    model, processor = tiny_vlm("llava")
    prompts = small_sets(3)["harmless"]
    cache = tmp_path / "gen.jsonl"
    first = generate(model, processor, prompts, max_new_tokens=4, batch_size=2, cache=cache, progress=False)
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["image_sha256"]) == 64 for r in rows)
    again = generate(model, processor, prompts, max_new_tokens=4, batch_size=2, cache=cache, progress=False)
    assert again == first and len(cache.read_text().splitlines()) == 3, "the second call is served from the cache"
    assert generate(model, processor, prompts, max_new_tokens=4, batch_size=3, progress=False) == first
    # a run killed halfway through a cache line: the next run starts a new line and reuses the rest
    with open(cache, "a") as fh:
        fh.write('{"key": "torn", "prom')
    more = small_sets(4)["harmless"]
    assert generate(model, processor, more, max_new_tokens=4, batch_size=2, cache=cache,
                               progress=False)[:3] == first
    assert len(read_cache(cache)) == 4 and len(cache.read_text().splitlines()) == 5


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_freezing_is_bit_exact_after_dpo_steps_with_images(family, tmp_path):
    import copy

    from trl import DPOConfig

    from safeneuron.trainer import SafeNeuronDPOTrainer
    from safeneuron.data.images import image_preference_dataset

    model, processor = tiny_vlm(family)
    prompts = small_sets(4, size=(40, 40))["harmful"]
    # the records align() gives TRL for pairs with an ``image`` column (a path there; an image here)
    data = image_preference_dataset([{"image": p.load_image(), "prompt": p.text[:40],
                                      "chosen": "I can't help with that.", "rejected": "Sure, here is how"}
                                     for p in prompts])
    mask = SafetyNeuronMask.random(model, frac=0.25, seed=1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                     weight_decay=0.1, use_cpu=True, report_to=[], save_strategy="no", max_length=None,
                     disable_tqdm=True, logging_steps=1)
    trainer = SafeNeuronDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                                   processing_class=processor, frozen=mask)
    trainer.train()
    summary = trainer.remove_freezing()
    assert summary["exact"] and summary["neurons_frozen"] == mask.count() > 0
    params = dict(model.named_parameters())
    for site in find_mlps(model):
        neurons = mask.indices(site.name)
        for s in site.slices:
            p, own = params[s.param_name], neurons + s.offset
            assert torch.equal(p.detach().index_select(s.dim, own), start[s.param_name].index_select(s.dim, own))
            keep = torch.ones(p.shape[s.dim], dtype=torch.bool)
            keep[own] = False
            rest = torch.nonzero(keep).flatten()
            assert not torch.equal(p.detach().index_select(s.dim, rest), start[s.param_name].index_select(s.dim, rest))
    projector = [n for n in params if "multi_modal_projector" in n or ".visual.merger" in n]
    assert projector and any(not torch.equal(params[n], start[n]) for n in projector), "images reached the loss"


# --------------------------------------------------------------------------- images and prompt files
def test_typographic_renderer_is_fixed_size_nonblank_and_deterministic():
    text = "Explain how to pick a lock.\n1.\n2.\n3."
    a, b = render_text_image(text), render_text_image(text)
    assert a.size == (448, 448) and a.mode == "RGB"
    pixels = np.asarray(a)
    dark = (pixels < 128).all(-1).mean()
    assert 0.005 < dark < 0.5, "some black type on a mostly white page"
    assert (pixels[:8] == 255).all() and (pixels[:, :8] == 255).all(), "a white margin"
    assert np.array_equal(pixels, np.asarray(b))
    assert not np.array_equal(pixels, np.asarray(render_text_image("Explain how to bake bread.\n1.\n2.\n3.")))
    small = render_text_image(text, size=(200, 120))
    assert small.size == (200, 120)
    long = render_text_image("a very long instruction " * 60 + "supercalifragilisticexpialidocious" * 5)
    assert long.size == (448, 448) and (np.asarray(long) < 128).any()


def test_typographic_and_scene_prompts():
    ps = PromptSet(["make a bomb", "steal a car"], ["weapons", "crime"])
    prompts = typographic_prompts(ps)
    assert [p.category for p in prompts] == ["weapons", "crime"] and all(p.text == FIGSTEP_REQUEST for p in prompts)
    assert np.array_equal(np.asarray(prompts[0].load_image()), np.asarray(render_text_image("make a bomb\n1.\n2.\n3.")))
    scenes, again = harmless_scene_prompts(6), harmless_scene_prompts(6)
    assert [p.category for p in scenes] == ["shapes", "chart", "scene"] * 2
    assert all(p.load_image().size == (448, 448) for p in scenes)
    assert [p.text for p in scenes] == [p.text for p in again]
    assert np.array_equal(np.asarray(scenes[1].load_image()), np.asarray(again[1].load_image()))
    assert len({np.asarray(p.load_image()).tobytes() for p in scenes}) == 6
    builtin = load_multimodal_prompts("builtin:harmful", limit=5)
    assert len(builtin) == 5 and all(p.category for p in builtin)
    assert len(load_multimodal_prompts("builtin:harmless", limit=4)) == 4


def test_jsonl_prompts_load_with_relative_images(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 10), "red").save(tmp_path / "img" / "a.png")
    Image.new("RGB", (10, 20), "blue").save(tmp_path / "b.png")
    rows = [{"image": "img/a.png", "prompt": "What colour?", "category": "colour"},
            {"image_path": str(tmp_path / "b.png"), "prompt": "Describe it."}]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n\n")
    prompts = load_multimodal_prompts(path)
    assert prompts == [MultimodalPrompt("What colour?", tmp_path / "img" / "a.png", "colour")]
    assert prompts[0].load_image().size == (20, 10)
    path.write_text(json.dumps(rows[1]))
    assert load_multimodal_prompts(path)[0].load_image().mode == "RGB"


@pytest.mark.parametrize("content, match", [
    ('{"image": "missing.png", "text": "hi"}', r"set.jsonl:1: image .*missing.png not found"),
    ('{"text": "hi"}', r"no image column \(looked for image/image_path/img/file; found text\)"),
    ('{"image": "ok.png"}', r"no text column"),
    ('{"image": "ok.png", "text": "hi"}\n{"image": "ok.png", "text": ', r"set.jsonl:2: malformed JSON line"),
    ('', r"no prompts \(empty file\)"),
])
def test_bad_multimodal_files_are_one_line_errors(tmp_path, content, match):
    from safeneuron.errors import SafeneuronError

    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    path = tmp_path / "set.jsonl"
    path.write_text(content)
    with pytest.raises(MultimodalPromptError, match=match) as err:
        load_multimodal_prompts(path)
    assert isinstance(err.value, SafeneuronError) and "\n" not in str(err.value)


def test_missing_file_unknown_builtin_and_unreadable_image(tmp_path):
    with pytest.raises(MultimodalPromptError, match="not found"):
        load_multimodal_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(MultimodalPromptError, match="unknown built-in"):
        load_multimodal_prompts("builtin:nope")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(MultimodalPromptError, match="cannot read image"):
        MultimodalPrompt("x", tmp_path / "bad.png").load_image()
