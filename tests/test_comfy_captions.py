"""DiffSegmenter's caption prompt and class filtering with tiny randomly
initialised transformers models (BLIP captioner, CLIP) written to model folders
the way a user places them in models/."""

import pytest
import torch

from comfy_env import comfyui_path, import_pack, recorded_progress

pack = import_pack()
import folder_paths  # noqa: E402
import transformers  # noqa: E402

from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.attnseg.vocabulary import classes_in_caption, confident_classes, singular  # noqa: E402
from attnseg_pack.nodes.captions import CAPTIONERS, CLIP_MODELS  # noqa: E402

NODE = pack.NODE_CLASS_MAPPINGS["AttnSegCaptionPrompt"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photograph", "of", "and", "cat", "dog", "sofa", "on",
         "the", "sitting", "grass", "red", "blue", "##s"]


def tiny_blip(folder):
    torch.manual_seed(0)
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    text = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=2,
                sep_token_id=3, eos_token_id=3, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    transformers.BlipForConditionalGeneration(transformers.BlipConfig(text_config=text, vision_config=vision,
                                                                      projection_dim=32)).save_pretrained(folder)
    image_processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    transformers.BlipProcessor(image_processor, tokenizer).save_pretrained(folder)


def tiny_clip_model(folder):
    torch.manual_seed(1)
    vocab = comfyui_path() / "comfy" / "sd1_tokenizer"
    tokenizer = transformers.CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"))
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=tokenizer.vocab_size + 2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16), projection_dim=32)
    transformers.CLIPModel(config).save_pretrained(folder)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor, tokenizer).save_pretrained(folder)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_blip(root / CAPTIONERS / "tiny-blip")
    tiny_clip_model(root / CLIP_MODELS / "tiny-clip")
    saved = {k: folder_paths.folder_names_and_paths[k] for k in (CAPTIONERS, CLIP_MODELS)}
    for kind in (CAPTIONERS, CLIP_MODELS):
        folder_paths.folder_names_and_paths[kind] = ([str(root / kind)], set())
    yield root
    folder_paths.folder_names_and_paths.update(saved)


def image():
    return torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(0))


def test_caption_nouns_match_candidates_with_plurals():
    assert singular("ponies") == "pony" and singular("boxes") == "box" and singular("glass") == "glass"
    caption = "two cats sitting on a red sofa next to dining tables"
    assert classes_in_caption(caption, ["dog", "sofa", "cat", "dining table", "table lamp"]) == [
        "sofa", "cat", "dining table"]


def test_clip_filter_keeps_the_confident_candidates():
    assert confident_classes(torch.tensor([0.98, 0.015, 0.005]), ["cat", "dog", "sofa"], 0.97) == ["cat"]
    with pytest.raises(AttnSegError, match="clip_threshold"):
        confident_classes(torch.tensor([1.0]), ["cat"], 1.5)


def test_the_node_lists_the_placed_models(model_folders):
    inputs = NODE.INPUT_TYPES()["required"]
    assert inputs["captioner"][0] == ["none", "tiny-blip"]
    assert inputs["clip_filter"][0] == ["none", "tiny-clip"]


def test_caption_continues_the_class_prefix(model_folders):
    prompt, classes = NODE().build(image(), "cat, sofa", "tiny-blip", "none", False, 0.97, 8)
    assert classes == "cat, sofa"
    assert prompt.startswith("a photograph of cat and sofa ")
    continuation = prompt.removeprefix("a photograph of cat and sofa ").split()
    assert 0 < len(continuation) <= 8 and set(continuation) <= set(WORDS)  # BLIP's own (random) words
    assert NODE().build(image(), "cat, sofa", "tiny-blip", "none", False, 0.97, 8)[0] == prompt  # greedy


def test_clip_filter_on_real_clip_scores(model_folders):
    keep_all = NODE().build(image(), "cat, dog, sofa", "none", "tiny-clip", False, 0.0, 8)
    assert keep_all == ("a photograph of cat and dog and sofa", "cat, dog, sofa")
    from attnseg_pack.hosts.captioning import clip_probabilities
    probabilities = clip_probabilities(model_folders / CLIP_MODELS / "tiny-clip", image(), ["cat", "dog", "sofa"],
                                       torch.device("cpu"))
    torch.testing.assert_close(probabilities.sum(), torch.tensor(1.0))
    best = ["cat", "dog", "sofa"][int(probabilities.argmax())]
    threshold = float(probabilities.max()) - 1e-4
    assert NODE().build(image(), "cat, dog, sofa", "none", "tiny-clip", False, threshold, 8)[1] == best
    with pytest.raises(AttnSegError, match="none of the 3 candidate classes"):
        NODE().build(image(), "cat, dog, sofa", "none", "tiny-clip", False, 1.0, 8)


def test_caption_filter_keeps_what_the_unconditional_caption_names(model_folders):
    from attnseg_pack.hosts.captioning import caption
    candidates = ["cat", "dog", "sofa", "grass", "red", "blue", "photograph"]
    plain = caption(model_folders / CAPTIONERS / "tiny-blip", image(), "", torch.device("cpu"), 8)
    named = classes_in_caption(plain, candidates)
    run = lambda: NODE().build(image(), ", ".join(candidates), "tiny-blip", "tiny-clip", True, 1.0, 8)  # noqa: E731
    if named:  # CLIP at threshold 1 adds nothing: exactly the caption's classes
        prompt, classes = run()
        assert classes == ", ".join(named) and prompt.startswith("a photograph of " + " and ".join(named))
    else:
        with pytest.raises(AttnSegError, match="caption filter on"):
            run()


def test_missing_models_and_bad_combinations(model_folders, tmp_path):
    with pytest.raises(AttnSegError, match="captioner: no model folder 'blip-large'"):
        NODE().build(image(), "cat", "blip-large", "none", False, 0.97, 8)
    with pytest.raises(AttnSegError, match="filter_by_caption: needs a captioner"):
        NODE().build(image(), "cat", "none", "none", True, 0.97, 8)
    with pytest.raises(AttnSegError, match="classes: the class list is empty"):
        NODE().build(image(), " , ", "none", "none", False, 0.97, 8)
    broken = model_folders / CAPTIONERS / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(AttnSegError, match="captioner: broken could not be loaded"):
        NODE().build(image(), "cat", "broken", "none", False, 0.97, 8)


def test_the_node_reports_progress_per_generated_token_and_stops_on_the_interrupt(model_folders):
    """Caption filter, CLIP filter and the prompt's caption: one bar over the planned
    runs (each caption's tokens, one step for CLIP), rising to its total; ComfyUI's
    interrupt is checked before every run and at every token."""
    import comfy.model_management

    with recorded_progress() as updates:
        NODE().build(image(), "cat, dog, sofa", "tiny-blip", "tiny-clip", True, 0.0, 8)
    values = [value for value, _ in updates]
    assert {total for _, total in updates} == {8 + 1 + 8}
    assert values == sorted(set(values)) and values[-1] == 17
    assert len(values) > 3  # finer than one step per run: the captions' tokens
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            NODE().build(image(), "cat, dog, sofa", "tiny-blip", "tiny-clip", True, 0.0, 8)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    def interrupt_at_the_third_token(value):
        if value == 3:
            comfy.model_management.interrupt_current_processing(True)

    with recorded_progress(interrupt_at_the_third_token) as stopped:
        try:
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                NODE().build(image(), "cat, dog, sofa", "tiny-blip", "none", True, 0.0, 8)
        finally:
            comfy.model_management.interrupt_current_processing(False)
    assert [value for value, _ in stopped] == [1, 2, 3]  # stopped inside the first caption, at the next token
