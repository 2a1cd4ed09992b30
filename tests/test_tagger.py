"""WD tagger: the model contract, preprocessing against independently computed tensors, post-processing,
caption policies, and the real `loratrain tag` CLI on tiny ONNX models the tests build themselves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loratrain.cli import main
from loratrain.core.errors import ConfigError
from loratrain.dataset_tools.tagger.config import TagConfig
from loratrain.dataset_tools.tagger.labels import TagLabels
from loratrain.dataset_tools.tagger.model import TaggerModel, onnxruntime_install_problem, resolve_model_dir
from loratrain.dataset_tools.tagger.postprocess import TagPostprocessor, mcut_threshold
from loratrain.dataset_tools.tagger.preprocess import prepare_image
from loratrain.dataset_tools.tagger.tiny import build_tagger, linear_probabilities

NAMES = ["general", "sensitive", "questionable", "explicit", "red_hair", "green_eyes", "blue_sky", "^_^",
         "hatsune_miku_(vocaloid)", "smile"]
CATS = [9, 9, 9, 9, 0, 0, 0, 0, 4, 0]


def weights() -> tuple[np.ndarray, np.ndarray]:
    """Rows are mean B, G, R in 0..1. Red images: red_hair and the character; green: green_eyes; blue: blue_sky."""
    w = np.zeros((3, len(NAMES)), np.float32)
    b = np.zeros(len(NAMES), np.float32)
    w[2, 4], b[4] = 8, -4
    w[1, 5], b[5] = 8, -4
    w[0, 6], b[6] = 8, -4
    b[7] = 2.0           # ^_^ everywhere (p = 0.88)
    w[2, 8], b[8] = 10, -6
    w[:, 9], b[9] = -2, 0.2  # smile on dark images only
    w[0, 0], w[2, 1] = 2, 2  # rating: blue-ish general, red-ish sensitive
    return w, b


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    w, b = weights()
    return build_tagger(tmp_path_factory.mktemp("tagger") / "wd-tiny", NAMES, CATS, w, b, size=32)


def colour_set(root: Path) -> dict[str, Image.Image]:
    root.mkdir(parents=True, exist_ok=True)
    images = {"red": Image.new("RGB", (48, 30), (255, 0, 0)), "green": Image.new("RGB", (30, 48), (0, 255, 0)),
              "blue": Image.new("RGB", (40, 40), (0, 0, 255)), "dark": Image.new("RGB", (40, 40), (10, 10, 10))}
    for name, img in images.items():
        img.save(root / f"{name}.png")
    return images


def expected_tags(img: Image.Image, threshold: float = 0.35, char_threshold: float = 0.85) -> list[str]:
    """Independent of the package: numpy padding, PIL resize, the linear model, `>=` thresholds, sort by score."""
    arr = np.asarray(img.convert("RGB"))
    h, w, _ = arr.shape
    side = max(h, w)
    canvas = np.full((side, side, 3), 255, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = arr
    resized = np.asarray(Image.fromarray(canvas).resize((32, 32), Image.Resampling.BICUBIC), np.float32)[:, :, ::-1]
    p = linear_probabilities(resized[None], *weights())[0]
    general = sorted((i for i in range(4, len(NAMES)) if CATS[i] == 0 and p[i] >= threshold), key=lambda i: -p[i])
    chars = sorted((i for i in range(4, len(NAMES)) if CATS[i] == 4 and p[i] >= char_threshold), key=lambda i: -p[i])
    return [NAMES[i] if NAMES[i] == "^_^" else NAMES[i].replace("_", " ") for i in general + chars]


def read_caption(path: Path) -> list[str]:
    return [t.strip() for t in path.read_text(encoding="utf-8").split(",") if t.strip()]


# ---------------------------------------------------------------- preprocessing


def test_preprocessing_pads_white_centres_and_flips_to_bgr():
    rgba = np.array([[[200, 10, 20, 255], [0, 100, 50, 128], [30, 60, 90, 0], [1, 2, 3, 255]]], np.uint8)  # 4x1
    out = prepare_image(Image.fromarray(rgba, "RGBA"), size=4)
    assert out.shape == (4, 4, 3) and out.dtype == np.float32
    a = rgba[..., 3:4].astype(np.float64) / 255
    flat = rgba[..., :3] * a + 255 * (1 - a)  # alpha onto white
    want = np.full((4, 4, 3), 255.0)
    want[1:2] = flat  # side 4, margin 3: one row on top, two below
    np.testing.assert_allclose(out, want[:, :, ::-1], atol=1.0)
    assert out[0].min() == 255 and out[2:].min() == 255


def test_preprocessing_resize_matches_canonical_pipeline():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (20, 31, 3), dtype=np.uint8)
    canvas = np.full((31, 31, 3), 255, np.uint8)
    canvas[5:25] = arr  # (31 - 20) // 2 = 5 above, 6 below
    golden = np.asarray(Image.fromarray(canvas).resize((16, 16), Image.Resampling.BICUBIC), np.float32)[:, :, ::-1]
    np.testing.assert_array_equal(prepare_image(Image.fromarray(arr), 16), golden)
    assert not np.array_equal(prepare_image(Image.fromarray(arr), 16, "area_lanczos"), golden)


# ---------------------------------------------------------------- post-processing


def labels() -> TagLabels:
    return TagLabels(NAMES, np.asarray(CATS))


def post(**kw) -> TagPostprocessor:
    return TagPostprocessor(TagConfig(dataset_dir="x", **kw), labels(), model_threshold=0.2614)


def probs(**named: float) -> np.ndarray:
    p = np.zeros(len(NAMES), np.float32)
    for k, v in named.items():
        p[NAMES.index(k.replace("KAO", "^_^"))] = v
    return p


def test_thresholds_are_inclusive_and_per_category():
    p = probs(general=0.9, red_hair=0.375, green_eyes=0.37, smile=0.8)
    p[NAMES.index("hatsune_miku_(vocaloid)")] = 0.875
    pred = post(general_threshold=0.375, character_threshold=0.875)(p)  # values exact in float32
    assert pred.tags == ["smile", "red hair", "hatsune miku (vocaloid)"]
    assert pred.rating == "general"
    assert "hatsune miku (vocaloid)" not in post(character_threshold=0.88)(p).tags
    assert post(thresholds="model")(p).tags == ["smile", "red hair", "green eyes", "hatsune miku (vocaloid)"]  # P=R 0.2614 for both


def test_mcut_and_its_character_floor():
    assert mcut_threshold(np.array([0.9, 0.85, 0.3, 0.2])) == pytest.approx(0.575)
    p = probs(red_hair=0.9, green_eyes=0.85, blue_sky=0.3, smile=0.2)
    assert post(general_mcut=True)(p).tags == ["red hair", "green eyes"]
    p[NAMES.index("hatsune_miku_(vocaloid)")] = 0.12  # one candidate: MCut gives 0, the floor keeps it out
    assert "hatsune miku (vocaloid)" not in post(character_mcut=True)(p).tags
    p[NAMES.index("hatsune_miku_(vocaloid)")] = 0.2
    assert "hatsune miku (vocaloid)" in post(character_mcut=True)(p).tags


def test_tag_cleanups():
    p = probs(red_hair=0.9, KAO=0.8, smile=0.5, explicit=0.7)
    p[NAMES.index("hatsune_miku_(vocaloid)")] = 0.95
    assert post()(p).tags == ["red hair", "^_^", "smile", "hatsune miku (vocaloid)"]
    assert post(remove_underscore=False)(p).tags == ["red_hair", "^_^", "smile", "hatsune_miku_(vocaloid)"]
    assert post(escape_brackets=True)(p).tags[-1] == r"hatsune miku \(vocaloid\)"
    assert post(character_tags_first=True, character_tag_expand=True)(p).tags == ["hatsune miku", "vocaloid", "red hair", "^_^", "smile"]
    assert post(undesired_tags=["red_hair"], undesired_regex=[r"hatsune.*"])(p).tags == ["^_^", "smile"]
    assert post(trigger_words=["sks"], always_first_tags=["smile"], rating="last")(p).tags == [
        "sks", "smile", "red hair", "^_^", "hatsune miku (vocaloid)", "explicit"]
    assert post(rating="first")(p).tags[0] == "explicit"
    assert post(tag_replacement=r"red_hair,crimson hair;smile,grin\, wide")(p).tags[:3] == ["crimson hair", "^_^", "grin, wide"]
    with pytest.raises(ConfigError, match="no published"):
        TagPostprocessor(TagConfig(dataset_dir="x", thresholds="model"), labels(), None)


# ---------------------------------------------------------------- model files


def test_model_contract_checks(tagger, tmp_path):
    model = TaggerModel.open(tagger, "cpu")
    assert (model.input_name, model.size, model.fixed_batch, model.provider) == ("input_1:0", 32, None, "CPUExecutionProvider")
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(model(x), linear_probabilities(x, *weights()), atol=1e-5)

    bad = tmp_path / "bad"
    build_tagger(bad, NAMES[:5], CATS[:5], np.zeros((3, 5)), np.zeros(5), size=32)
    (bad / "selected_tags.csv").write_text((tagger / "selected_tags.csv").read_text())
    with pytest.raises(ConfigError, match="5 outputs but selected_tags.csv lists 10"):
        TaggerModel.open(bad)
    (bad / "selected_tags.csv").write_text("id,tag\n1,x\n")
    with pytest.raises(ConfigError, match="tag_id,name,category"):
        TaggerModel.open(bad)


def test_model_found_in_local_folder_and_hf_cache(tagger, tmp_path, monkeypatch):
    assert resolve_model_dir(str(tagger)) == tagger
    cache = tmp_path / "hub"
    snap = cache / "models--SmilingWolf--wd-vit-tagger-v3" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in ("model.onnx", "selected_tags.csv"):
        (snap / f).write_bytes((tagger / f).read_bytes())
    (cache / "models--SmilingWolf--wd-vit-tagger-v3" / "refs").mkdir()
    (cache / "models--SmilingWolf--wd-vit-tagger-v3" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model_dir("SmilingWolf/wd-vit-tagger-v3") == snap
    assert resolve_model_dir("wd-vit-v3") == snap
    assert resolve_model_dir(str(cache / "models--SmilingWolf--wd-vit-tagger-v3")) == snap
    assert post(thresholds="model").general_threshold == pytest.approx(0.2614)
    with pytest.raises(ConfigError, match="--download"):
        resolve_model_dir("SmilingWolf/wd-eva02-large-tagger-v3")
    with pytest.raises(ConfigError, match="not found"):
        resolve_model_dir(str(tmp_path / "nope"))


def test_cuda_fallback_and_double_install_are_reported(tagger, monkeypatch):
    import onnxruntime

    real = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    model = TaggerModel.open(tagger, "auto")  # CPU-only onnxruntime: the CUDA request silently falls back
    assert model.provider == "CPUExecutionProvider"
    assert any("did not load" in w for w in model.warnings)
    with pytest.raises(RuntimeError, match="did not load"):
        TaggerModel.open(tagger, "cuda")

    class Dist:
        def __init__(self, name):
            self.metadata = {"Name": name}

    from importlib import metadata
    monkeypatch.setattr(metadata, "distributions", lambda: [Dist("onnxruntime"), Dist("onnxruntime-gpu"), Dist("numpy")])
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in onnxruntime_install_problem()
    monkeypatch.setattr(metadata, "distributions", lambda: [Dist("onnxruntime-gpu")])
    assert onnxruntime_install_problem() is None


# ---------------------------------------------------------------- the CLI end to end


def test_tag_cli_writes_expected_captions_and_policies(tagger, tmp_path, capsys):
    data = tmp_path / "data"
    images = colour_set(data)
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (data / "green.txt").write_text("existing, green eyes\n", encoding="utf-8")
    assert main(["tag", str(data), "--model", str(tagger), "--batch_size", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "provider: CPUExecutionProvider" in out and "1 unreadable" in out and "broken.jpg" in out
    for name in ("red", "blue", "dark"):
        assert read_caption(data / f"{name}.txt") == expected_tags(images[name]), name
    assert "hatsune miku (vocaloid)" in read_caption(data / "red.txt")
    assert read_caption(data / "green.txt") == ["existing", "green eyes"]  # skip is the default
    assert not (data / "broken.txt").exists()

    assert main(["tag", str(data), "--model", str(tagger), "--existing", "append", "--quiet"]) == 0
    assert read_caption(data / "green.txt") == ["existing", "green eyes"] + [t for t in expected_tags(images["green"]) if t != "green eyes"]
    assert main(["tag", str(data), "--model", str(tagger), "--existing", "prepend", "--trigger_words", "sks", "--quiet"]) == 0
    assert read_caption(data / "green.txt")[:2] == ["sks", expected_tags(images["green"])[0]]
    assert "existing" in read_caption(data / "green.txt")
    assert main(["tag", str(data), "--model", str(tagger), "--existing", "overwrite", "--quiet"]) == 0
    assert read_caption(data / "green.txt") == expected_tags(images["green"])

    # every run is journalled: three undos bring back the hand-written caption byte for byte
    for _ in range(3):
        assert main(["tags", "undo", str(data)]) == 0
    assert (data / "green.txt").read_bytes() == b"existing, green eyes\n"
    assert main(["tag", str(data), "--model", str(tagger), "--on_bad_image", "error", "--existing", "overwrite", "--quiet"]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_fixed_batch_model_is_fed_one_at_a_time(tmp_path, capsys):
    w, b = weights()
    v2 = build_tagger(tmp_path / "v2", NAMES, CATS, w, b, size=32, batch=1)
    data = tmp_path / "data"
    images = colour_set(data)
    assert main(["tag", str(data), "--model", str(v2), "--batch_size", "4", "--caption_extension", "caption"]) == 0
    assert "fixed batch of 1" in capsys.readouterr().out
    assert read_caption(data / "blue.caption") == expected_tags(images["blue"])
    assert not list(data.glob("*.txt"))
