"""The command line's datasets: VOC's palette and layout, the demo VOC dataset,
COCO-Object from a COCO json (polygons, plain and compressed run lengths, crowd
ignored), image-level label files and image lists."""

import json

import numpy as np
import pytest
from PIL import Image

from comfy_env import import_pack

pack = import_pack()
from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.demo import voc_dataset  # noqa: E402
from attnseg_pack.hosts.diffusers import datasets  # noqa: E402


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    voc_dataset.write(root, train=4, val=2)
    return root


def test_the_voc_palette_has_voc_colours():
    palette = datasets.voc_palette()
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]          # aeroplane
    assert palette[15].tolist() == [192, 128, 128]     # person
    assert palette[255].tolist() == [224, 224, 192]    # the border colour
    assert len({tuple(c) for c in palette.tolist()}) == 256


def test_label_pngs_round_trip_as_palette_and_as_rgb(tmp_path):
    labels = np.array([[0, 1, 15], [20, 255, 3]], dtype=np.uint8)
    datasets.save_label_png(tmp_path / "a.png", labels)
    with Image.open(tmp_path / "a.png") as picture:
        assert picture.mode == "P"
        assert np.array(picture.convert("RGB"))[0, 1].tolist() == [128, 0, 0]
        picture.convert("RGB").save(tmp_path / "rgb.png")
    assert datasets.read_label_png(tmp_path / "a.png").tolist() == labels.tolist()
    assert datasets.read_label_png(tmp_path / "rgb.png").tolist() == labels.tolist()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_the_demo_dataset_reads_as_voc_with_borders_ignored(demo_root):
    names = datasets.read_class_names(demo_root / "class_names.txt")
    assert names == voc_dataset.CLASS_NAMES and len(names) == 25
    train = datasets.voc(demo_root, "train", names)
    assert [s.id for s in train.samples] == [f"scene_{i:06d}" for i in range(4)]
    assert len(datasets.voc(demo_root, "val", names).samples) == 2
    labels = datasets.read_image_labels(demo_root / "image_labels.json")
    assert datasets.read_image_labels(demo_root / "image_labels.csv") == labels
    for seed, sample in enumerate(train.samples):
        scene = voc_dataset.scene(seed)
        truth = train.truth(sample)
        assert truth.shape == scene.image.shape[:2]
        assert datasets.read_image(sample.image).tolist() == scene.image.tolist()
        assert set(np.unique(truth)) <= set(range(25)) | {255}
        # The ignore band covers every edge between two labels, and nothing else.
        inner = truth != 255
        local = scene.label_map()
        assert (inner & (np.roll(local, 1, 0) != local))[1:].sum() == 0
        assert 0 < (~inner).sum() < 0.4 * truth.size
        assert [names[i] for i in train.truth_classes(sample)] == sorted(labels[sample.id], key=names.index)


def test_image_labels_name_unknown_classes(tmp_path):
    (tmp_path / "labels.csv").write_text("image,classes\n2007_000032.jpg,aeroplane;person\nb,kitty\n")
    labels = datasets.read_image_labels(tmp_path / "labels.csv")
    assert labels == {"2007_000032": ["aeroplane", "person"], "b": ["kitty"]}
    assert datasets.class_ids(labels["2007_000032"], datasets.VOC_CLASSES, "2007_000032", "--labels") == (1, 15)
    with pytest.raises(AttnSegError, match="--labels: image b lists 'kitty', which is not one of"):
        datasets.class_ids(labels["b"], datasets.VOC_CLASSES, "b", "--labels")
    (tmp_path / "labels.json").write_text('[{"image": "x", "classes": ["cat"]}]')
    assert datasets.read_image_labels(tmp_path / "labels.json") == {"x": ["cat"]}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(AttnSegError, match="--labels: .*bad.json is not valid JSON"):
        datasets.read_image_labels(tmp_path / "bad.json")


def test_bad_voc_folders_are_named(tmp_path, demo_root):
    with pytest.raises(AttnSegError, match="--voc: .*missing is not a folder"):
        datasets.voc(tmp_path / "missing")
    with pytest.raises(AttnSegError, match="--split: .*test.txt does not exist; the splits here are train, trainval"):
        datasets.voc(demo_root, "test")


def _encode_runs(runs):
    """COCO's compressed run-length string, the inverse of decode_rle_string."""
    text = ""
    for index, run in enumerate(runs):
        value = run - runs[index - 2] if index > 2 else run
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            text += chr(group + (0x20 if more else 0) + 48)
    return text


def test_compressed_run_lengths_decode():
    assert datasets.decode_rle_string("5321") == [5, 3, 2, 4]
    assert datasets.decode_rle_string("532N") == [5, 3, 2, 1]   # the fourth run is 1 = 3 - 2
    assert datasets.decode_rle_string("X1") == [40]
    runs = np.random.default_rng(0).integers(0, 5000, 200).tolist()
    assert datasets.decode_rle_string(_encode_runs(runs)) == runs


def test_coco_object_paints_instances_and_ignores_crowds(tmp_path):
    Image.new("RGB", (6, 4)).save(tmp_path / "000001.jpg")
    crowd = np.zeros((4, 6), dtype=bool)
    crowd[3, 4:] = True
    column_major = crowd.T.flatten()
    runs, value, length = [], False, 0
    for pixel in column_major:
        if pixel != value:
            runs.append(length)
            value, length = pixel, 0
        length += 1
    runs.append(length)
    annotation = {"images": [{"id": 1, "file_name": "000001.jpg", "height": 4, "width": 6}],
                  "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
                  "annotations": [
                      {"image_id": 1, "category_id": 1, "area": 2, "iscrowd": 0,
                       "segmentation": {"size": [4, 6], "counts": _encode_runs([1, 2, 21])}},
                      {"image_id": 1, "category_id": 18, "area": 9, "iscrowd": 0,
                       "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
                      {"image_id": 1, "category_id": 18, "area": 2, "iscrowd": 1,
                       "segmentation": {"size": [4, 6], "counts": runs}}]}
    (tmp_path / "instances.json").write_text(json.dumps(annotation))
    dataset = datasets.coco_object(tmp_path / "instances.json", tmp_path)
    assert dataset.class_names == ("background", "person", "dog")   # categories in id order
    sample = dataset.samples[0]
    truth = dataset.truth(sample)
    expected = np.zeros((4, 6), dtype=np.uint8)
    expected[:3, :3] = 2                    # the dog polygon (Pillow fills its edges)
    expected[1:3, 0] = 1                    # the person: rows 1-2 of column 0, painted over the larger dog
    expected[3, 4:] = 255                   # the crowd
    assert truth.tolist() == expected.tolist()
    assert dataset.truth_classes(sample) == (1, 2)
    with pytest.raises(AttnSegError, match="--images: .* is not a folder"):
        datasets.coco_object(tmp_path / "instances.json", tmp_path / "val2017")


def test_image_lists_take_files_folders_and_globs(tmp_path):
    for name in ("b.png", "a.jpg", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(b"")
    assert [p.name for p in datasets.image_files([str(tmp_path)])] == ["a.jpg", "b.png"]
    assert [p.name for p in datasets.image_files([str(tmp_path / "*" / "*.png"), str(tmp_path / "a.jpg")])] == [
        "d.png", "a.jpg"]
    with pytest.raises(AttnSegError, match="images: .*nothing.png is not a file"):
        datasets.image_files([str(tmp_path / "nothing.png")])
    (tmp_path / "sub" / "b.png").write_bytes(b"")
    with pytest.raises(AttnSegError, match="several images are named b"):
        datasets.image_files([str(tmp_path), str(tmp_path / "sub")])
