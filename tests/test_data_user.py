"""Your own data with no code (data.type "Custom"): pair lists and two-folder splits, label
remapping by name, ignored values and names, no-background splits, embeddings picked by row
name (sidecar, built-in list, aliases), verify's tables, and the folded class-name helpers."""
import json

import numpy as np
import pytest
import torch

from data_loader import ClassSplit, load_split_and_embeddings, parse_class_split, prepare_data
from data_loader.classes import CONTEXT_CLASSES, alias_spellings, canonical_name, load_class_names, match_names
from data_loader.embeddings import classes_sidecar
from data_loader.verify import main as verify_main
from data_loader.word_vectors import match_class
from tests.test_data_helpers import image_for, write_image, write_label
from utils.errors import ConfigError, DataError

# Raw label values of the tiny road-scene data: 0..5 named, 9 = void.
RAW = ["sky", "road", "pole", "pavement", "car", "pedestrian"]
VOID = 9
CLASSES = ["sky", "road", "pavement", "car", "pedestrian"]  # pole has no embedding: ignored
ROWS = ["background", "car", "person", "sky", "road", "sidewalk", "tree"]  # the embedding file's rows


def scene(pedestrian: bool = False, height: int = 16, width: int = 24) -> np.ndarray:
    label = np.zeros((height, width), dtype=np.uint8)  # sky
    label[8:] = 1  # road
    label[8:, :4] = 3  # pavement
    label[2:8, 6] = 2  # a pole
    label[9:12, 10:16] = 4  # a car
    label[0, :] = VOID
    if pedestrian:
        label[4:8, 18:20] = 5
    return label


def write_scene(root, image_rel: str, label_rel: str, label: np.ndarray) -> None:
    write_image(root / image_rel, image_for(label))
    write_label(root / label_rel, label, palette=False)


@pytest.fixture
def camvid_like(tmp_path):
    """CamVid-style tree: images/ + annot/ with pair lists, and the same files as two folders."""
    root = tmp_path / "roads"
    train = {"a": scene(), "b": scene(pedestrian=True), "c": scene()}
    val = {"d": scene(pedestrian=True), "e": scene(height=20)}
    for split, labels in (("train", train), ("val", val)):
        lines = []
        for stem, label in labels.items():
            write_scene(root, f"{split}/{stem}.png", f"{split}annot/{stem}.png", label)
            lines.append(f"{split}/{stem}.png {split}annot/{stem}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    emb = tmp_path / "emb" / "roads.npy"
    emb.parent.mkdir()
    table = np.random.default_rng(0).standard_normal((len(ROWS), 6)).astype(np.float32)
    table[ROWS.index("tree")] *= 10  # the largest row is not one of ours: max_norm uses it all the same
    np.save(emb, table)
    classes_sidecar(emb).write_text("\n".join(ROWS) + "\n")
    return root, emb, table


def custom_cfg(root, emb, **overrides) -> dict:
    cfg = {
        "type": "Custom", "root": str(root), "classes": CLASSES, "label_classes": RAW,
        "ignore_labels": ["pole", VOID], "unseen_classes": ["pavement"],
        "embeddings": {"paths": [str(emb)], "normalize": "max_norm",
                       "aliases": {"pavement": "sidewalk", "pedestrian": "person"}},
        "train_split": "train.txt", "val_split": "val.txt", "base_size": 16, "crop_size": 16,
        "scale_range": [1.0, 1.0], "remove_unseen_images": False, "ignore_unseen": True,
    }
    cfg.update(overrides)
    return cfg


def expected_label(raw: np.ndarray) -> np.ndarray:
    lut = np.full(256, 255, dtype=np.int64)
    for value, name in enumerate(RAW):
        if name in CLASSES:
            lut[value] = CLASSES.index(name)
    return lut[raw]


def test_pair_list_remap_and_ignore(camvid_like):
    root, emb, _ = camvid_like
    bundle = prepare_data(custom_cfg(root, emb))
    assert [s.name for s in bundle.train_set.samples] == ["a", "b", "c"]
    assert bundle.train_set.samples[0].label == root / "trainannot" / "a.png"
    assert bundle.split.names == tuple(CLASSES) and not bundle.split.has_background
    val = bundle.val_set[1]
    assert val["name"] == "e" and val["label"].shape == (20, 24)
    assert np.array_equal(val["label"].numpy(), expected_label(scene(height=20)))
    train = bundle.train_set[0]["label"]  # a random 16x16 crop; ignore_unseen: pavement (2) -> 255 in training only
    assert train.shape == (16, 16) and set(train.unique().tolist()) <= {0, 1, 3, 255}
    assert 2 in bundle.val_set[0]["label"]


def test_two_folders(camvid_like):
    root, emb, _ = camvid_like
    folders = {"train_split": {"images": "train", "labels": "trainannot"},
               "val_split": {"images": "val", "labels": "valannot"}}
    bundle = prepare_data(custom_cfg(root, emb, **folders))
    assert [s.name for s in bundle.train_set.samples] == ["a", "b", "c"]
    assert bundle.val_set.samples[1].image == root / "val" / "e.png"
    assert np.array_equal(bundle.val_set[0]["label"].numpy(), expected_label(scene(pedestrian=True)))
    (root / "train" / "notes.txt").write_text("not an image")  # other extensions are not samples
    (root / ".DS_Store").write_text("")
    assert len(prepare_data(custom_cfg(root, emb, **folders), val=False).train_set) == 3
    with pytest.raises(ConfigError, match=r"data.train_split.images: no .jpg files in .*train"):
        prepare_data(custom_cfg(root, emb, image_ext=".jpg", **folders), val=False)
    write_image(root / "train" / "z.jpg", image_for(scene()))
    write_image(root / "train" / "y.jpg", image_for(scene()))
    with pytest.raises(ConfigError) as err:
        prepare_data(custom_cfg(root, emb, **folders), val=False)
    assert str(err.value) == (f"data.train_split: image {root / 'train' / 'y.jpg'} has no label in "
                              f"{root / 'trainannot'} (and 1 more) (file config)")
    (root / "train" / "y.jpg").unlink()
    (root / "train" / "z.jpg").unlink()
    write_label(root / "trainannot" / "x.png", scene())
    with pytest.raises(ConfigError, match=r"label .*trainannot/x.png has no image in .*train \(file config\)$"):
        prepare_data(custom_cfg(root, emb, **folders), val=False)
    write_image(root / "train" / "x.png", image_for(scene()))
    write_image(root / "train" / "x.jpg", image_for(scene()))
    with pytest.raises(ConfigError, match=r"two image files with stem 'x'"):
        prepare_data(custom_cfg(root, emb, **folders), val=False)
    with pytest.raises(ConfigError, match=r"data.val_split.labels: folder .*nope not found"):
        prepare_data(custom_cfg(root, emb, val_split={"images": "val", "labels": "nope"}), train=False)
    with pytest.raises(ConfigError, match=r"data.val_split: expected \{\"images\""):
        prepare_data(custom_cfg(root, emb, val_split={"images": "val"}), train=False)


def test_list_errors(camvid_like):
    root, emb, _ = camvid_like
    (root / "stems.txt").write_text("a\n")
    with pytest.raises(ConfigError, match=r"stems.txt:1: a stem line \('a'\) needs data.image_dir and data.label_dir"):
        prepare_data(custom_cfg(root, emb, train_split="stems.txt"), val=False)
    bundle = prepare_data(custom_cfg(root, emb, train_split="stems.txt", image_dir="train", label_dir="trainannot",
                                     image_ext=".png"), val=False)
    assert bundle.train_set.samples[0].image == root / "train" / "a.png"
    with pytest.raises(ConfigError, match=r"data.train_split: list file .*missing.txt not found"):
        prepare_data(custom_cfg(root, emb, train_split="missing.txt"), val=False)


def test_ignore_labels_and_remap_errors(camvid_like):
    root, emb, _ = camvid_like
    cases = [
        ({"ignore_labels": [VOID]}, "data.label_classes (file config): label class 'pole' is not in the class list "
                                    "(sky, road, pavement, car, pedestrian); to ignore its pixels, add it to "
                                    "data.ignore_labels"),
        ({"ignore_labels": ["pole", "car"]}, "data.ignore_labels: 'car' is the class 'car' of data.classes"),
        ({"ignore_labels": ["pole", "tree"]}, "data.ignore_labels: 'tree' is neither a label value nor a label class"),
        ({"ignore_labels": ["pole", 255]}, "data.ignore_labels: value 255 out of range 0..254"),
        ({"ignore_labels": ["pole", 2]}, "data.ignore_labels: 2 is listed twice"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as err:
            prepare_data(custom_cfg(root, emb, **overrides), train=False, val=False)
        assert message in str(err.value) and "\n" not in str(err.value)
    write_label(root / "valannot" / "d.png", np.full((16, 24), 7))  # 7: neither a class nor ignored
    with pytest.raises(DataError, match=r"d.png: label values \[7\] are neither class indices 0..5, 9 nor 255"):
        prepare_data(custom_cfg(root, emb), train=False)   # the val split is checked at start
    write_label(root / "valannot" / "d.png", np.zeros((16, 24)))
    # without label_classes the raw values are the classes themselves
    np.save(emb.parent / "six.npy", np.eye(6, dtype=np.float32))  # no row names: one row per class, in order
    plain = prepare_data(custom_cfg(root, emb, classes=RAW, label_classes=None, ignore_labels=[VOID],
                                    embeddings={"paths": [str(emb.parent / "six.npy")], "normalize": None}),
                         train=False)
    assert plain.val_set[1]["label"].unique().tolist() == [0, 1, 2, 3, 4, 255]


def test_no_background_split():
    data = {"type": "Custom", "classes": "sky,road,car", "unseen_classes": ["sky"]}
    split = parse_class_split(data)
    assert not split.has_background and split.unseen == (0,)
    assert split.seen == (1, 2) and split.seen_object == split.seen
    assert ClassSplit.from_dict(json.loads(json.dumps(split.to_dict()))) == split
    old = {"names": ["background", "cat"], "unseen": [1], "ignore_bg": False}  # a checkpoint from before the flag
    assert ClassSplit.from_dict(old).has_background and ClassSplit.from_dict(old).seen_object == ()
    assert parse_class_split({**data, "classes": "bg,road,car", "unseen_classes": ["car"]}).has_background
    assert parse_class_split({"type": "VOC", "classes": "voc"}).has_background
    assert not parse_class_split({"type": "VOC", "classes": "voc", "background": False}).has_background
    errors = [
        ({**data, "ignore_bg": True}, "data.ignore_bg: true needs a background class, but data.background is false "
                                      "(class 0 is 'sky')"),
        ({**data, "background": True}, "data.unseen_classes: class 'sky' is the background (index 0)"),
        ({**data, "background": "no"}, "data.background: invalid value 'no'"),
        ({**data, "classes": "sky"}, "data.classes: 'sky' is neither a built-in class list"),
    ]
    for cfg, message in errors:
        with pytest.raises(ConfigError) as err:
            parse_class_split(cfg)
        assert message in str(err.value)
    with pytest.raises(ConfigError, match="an ignored background needs a background class"):
        ClassSplit(("sky", "road"), (), ignore_bg=True, has_background=False)


def test_embeddings_by_name_from_sidecar(camvid_like):
    root, emb, table = camvid_like
    split, embeddings = load_split_and_embeddings(custom_cfg(root, emb))  # no dataset folder needed
    scaled = table / np.linalg.norm(table, axis=1).max()  # the whole file, before picking rows
    rows = [ROWS.index(name) for name in ("sky", "road", "sidewalk", "car", "person")]
    assert torch.allclose(embeddings, torch.from_numpy(scaled[rows]))
    assert embeddings.norm(dim=1).max() < 0.5  # the largest row (tree) is not selected
    # explicit row names win over the sidecar; several files are concatenated
    np.save(emb.parent / "other.npy", table[::-1].copy())
    spec = {"paths": [str(emb), str(emb.parent / "other.npy")], "normalize": None, "names": ROWS[::-1],
            "aliases": {"pavement": "sidewalk", "pedestrian": "person"}}
    both = load_split_and_embeddings(custom_cfg(root, emb, embeddings=spec))[1]
    reversed_rows = [len(ROWS) - 1 - r for r in rows]
    assert torch.allclose(both, torch.from_numpy(np.concatenate([table[reversed_rows], table[rows]], axis=1)))


def test_embeddings_from_builtin_list_and_errors(camvid_like, tmp_path):
    root, emb, _ = camvid_like
    context = np.random.default_rng(1).standard_normal((60, 4)).astype(np.float32)
    np.save(tmp_path / "context.npy", context)
    spec = {"paths": [str(tmp_path / "context.npy")], "normalize": None, "names": "context",
            "aliases": {"pavement": "sidewalk", "pedestrian": "person"}}
    embeddings = load_split_and_embeddings(custom_cfg(root, emb, embeddings=spec))[1]
    for name, row in zip(("sky", "road", "sidewalk", "car", "person"), embeddings):
        assert torch.equal(row, torch.from_numpy(context[CONTEXT_CLASSES.index(name)]))
    # every class without a row, in one line naming the file and where the names come from
    bad = {**spec, "aliases": {"pavement": "sidewlk"}}
    with pytest.raises(ConfigError) as err:
        load_split_and_embeddings(custom_cfg(root, emb, embeddings=bad, classes=CLASSES + ["pole"],
                                             ignore_labels=[VOID]), "c.json")
    assert str(err.value) == (f"data.embeddings: no row for 'pavement' (alias 'sidewlk'), 'pedestrian', 'pole' in "
                              f"{tmp_path / 'context.npy'} (rows named by the built-in list 'context'); add "
                              f"data.embeddings.aliases, or leave such a class out of data.classes and ignore its "
                              f"pixels with data.ignore_labels (file c.json)")
    cases = [
        ({**spec, "aliases": {"pavment": "sidewalk"}}, "data.embeddings.aliases: 'pavment' not in the class list"),
        ({**spec, "aliases": ["sidewalk"]}, "data.embeddings.aliases: invalid value ['sidewalk']"),
        ({**spec, "names": ROWS}, "context.npy: has 60 rows but 7 row names in data.embeddings.names"),
        ({**spec, "weights": 1}, "data.embeddings.weights: unknown key"),
        ({"paths": [str(tmp_path / "context.npy")], "normalize": None, "aliases": {"pavement": "sidewalk"}},
         "context.npy: has 60 rows but the class list has 5 classes (name its rows"),
    ]
    for embeddings_spec, message in cases:
        with pytest.raises(ConfigError) as err:
            load_split_and_embeddings(custom_cfg(root, emb, embeddings=embeddings_spec))
        assert message in str(err.value) and "\n" not in str(err.value)
    np.save(tmp_path / "five.npy", context[:5])
    unnamed = {"paths": [str(tmp_path / "five.npy")], "normalize": None, "aliases": {"pavement": "sidewalk"}}
    with pytest.raises(ConfigError, match="data.embeddings.aliases: the embedding files have no row names"):
        load_split_and_embeddings(custom_cfg(root, emb, embeddings=unnamed))
    del unnamed["aliases"]  # no names anywhere: rows in class-list order, as before
    assert torch.equal(load_split_and_embeddings(custom_cfg(root, emb, embeddings=unnamed))[1],
                       torch.from_numpy(context[:5]))


def test_verify_tables(camvid_like, tmp_path, capsys):
    root, emb, _ = camvid_like
    config = tmp_path / "roads.json"
    cfg = custom_cfg(root, emb, val_split={"images": "val", "labels": "valannot"},
                     expected_counts={"train.txt": 3, "val": 2})
    config.write_text(json.dumps({"data": cfg}))
    assert verify_main(["-c", str(config), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Custom at {root}: 5 classes, embeddings (5, 6), unseen: pavement"
    assert [line.split() for line in lines[2:4]] == [["train.txt", "3", "0", "3", "3", "3"],
                                                    ["val", "2", "0", "2", "2", "2"]]
    assert lines[4] == "label values found (as stored; ignored: 2 pole, 9, 255):"
    assert [line.split() for line in lines[5:7]] == [["train.txt", "0..5,", "9"], ["val", "0..5,", "9"]]
    assert lines[7] == "images containing each class (* = unseen):"
    assert lines[8].split() == ["class", "train.txt", "val"]
    table = {line[:12].strip(): line[12:].split() for line in lines[9:14]}
    assert table == {"sky": ["3", "2"], "road": ["3", "2"], "pavement *": ["3", "2"], "car": ["3", "2"],
                     "pedestrian": ["1", "1"]}
    assert lines[14] == "data OK"


def test_folded_readers_and_aliases(tmp_path):
    assert load_class_names("background, cat,dog") == ("background", "cat", "dog")
    assert load_class_names("cat", "--unseen", None) == ("cat",)  # one name (predict.py --unseen cat)
    assert load_class_names("voc")[16] == "pottedplant"
    (tmp_path / "names.json").write_text('["sky", "road"]')
    assert load_class_names(str(tmp_path / "names.json")) == ("sky", "road")
    with pytest.raises(ConfigError) as err:
        load_class_names("background,tv,TV-monitor", "--classes", None)
    assert str(err.value) == "--classes: duplicate class 'TV-monitor' (same as 'tv')"
    with pytest.raises(ConfigError, match=r"'lists/none.txt' is neither a built-in class list .* nor a file$"):
        load_class_names("lists/none.txt", "--classes", None)
    assert canonical_name("Potted Plant") == canonical_name("plant") == "pottedplant"
    assert alias_spellings("pottedplant") == ("potted plant", "plant")
    assert alias_spellings("airplane")[0] == "aeroplane" and alias_spellings("cat") == ()
    assert match_names(["Airplane", "pavement", "zebra"], ["background", "aeroplane", "sidewalk"],
                       {canonical_name("pavement"): "sidewalk"}) == [1, 2, None]
    # word lookup tries the other spellings of the name's alias group, in table order
    match, missing = match_class("airplane", {"aeroplane": 1})
    assert missing == [] and match.keys == ("aeroplane",) and match.notes == ("alias 'aeroplane'",)
    match, missing = match_class("pottedplant", {"potted": 1, "plant": 2})
    assert match.keys == ("potted", "plant") and match.notes == ("alias 'potted plant'",)
    assert match_class("zebra", {"aeroplane": 1}) == (None, ["zebra"])
