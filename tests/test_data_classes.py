"""Class lists, presets, split parsing by names/indices and their errors."""
import json
import re
from pathlib import Path

import pytest
import torch

from data_loader import ClassSplit, load_split_and_embeddings, parse_class_split, prepare_data
from data_loader.classes import CONTEXT_CLASSES, CONTEXT_PNG_CLASSES, VOC_CLASSES, load_class_names
from model.predictor import class_mask
from tests.test_data_helpers import standard_voc, voc_cfg, write_embeddings
from utils.errors import ConfigError
from utils.parse_config import load_config
from utils.settings import Settings


def split_of(unseen, classes="voc", **extra):
    return parse_class_split({"type": "VOC", "classes": classes, "unseen_classes": unseen, **extra}, "configs/x.json")


def test_builtin_lists():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[1] == "aeroplane" and VOC_CLASSES[20] == "tvmonitor"
    assert len(CONTEXT_CLASSES) == 60 and CONTEXT_CLASSES[:21] == VOC_CLASSES
    assert (CONTEXT_CLASSES[21], CONTEXT_CLASSES[32], CONTEXT_CLASSES[38], CONTEXT_CLASSES[59]) == \
        ("bag", "fence", "keyboard", "wood")
    assert len(CONTEXT_PNG_CLASSES) == 60
    assert (CONTEXT_PNG_CLASSES[1], CONTEXT_PNG_CLASSES[20], CONTEXT_PNG_CLASSES[50], CONTEXT_PNG_CLASSES[59]) == \
        ("aeroplane", "cow", "table", "wood")


@pytest.mark.parametrize("preset,expected", [
    ("zs3-2", (10, 14)),
    ("zs3-4", (1, 10, 14, 18)),
    ("zs3-6", (1, 8, 10, 14, 18, 20)),
    ("zs3-8", (1, 5, 8, 10, 14, 18, 19, 20)),
    ("zs3-10", (1, 5, 8, 9, 10, 14, 16, 18, 19, 20)),
    ("spnet", (16, 17, 18, 19, 20)),
])
def test_voc_presets(preset, expected):
    assert split_of(preset).unseen == expected


@pytest.mark.parametrize("preset,expected", [
    ("zs3-2", (10, 14)),
    ("zs3-4", (8, 10, 14, 18)),
    ("zs3-6", (4, 8, 10, 14, 18, 32)),
    ("zs3-8", (3, 4, 8, 10, 14, 18, 20, 32)),
    ("zs3-10", (1, 3, 4, 8, 10, 14, 18, 20, 32, 38)),
])
def test_context_presets(preset, expected):
    split = parse_class_split({"type": "Context", "classes": "context", "unseen_classes": preset})
    assert split.unseen == expected and split.num_classes == 60


def test_names_aliases_and_indices():
    split = split_of(["Airplane", "TV", "potted_plant", 10, "motor-bike"])
    assert split.unseen == (1, 10, 14, 16, 20)
    assert split.unseen_names == ("aeroplane", "cow", "motorbike", "pottedplant", "tvmonitor")


def test_split_properties_and_round_trip():
    split = split_of("zs3-2", ignore_bg=True)
    assert split.seen[0] == 0 and 10 not in split.seen and len(split.seen) == 19
    assert split.seen_object == split.seen[1:]
    assert class_mask(split.num_classes, split.unseen).tolist() == [i in (10, 14) for i in range(21)]
    assert class_mask(split.num_classes, split.unseen).dtype == torch.bool
    data = json.loads(json.dumps(split.to_dict()))
    assert ClassSplit.from_dict(data) == split and data["ignore_bg"] is True


@pytest.mark.parametrize("unseen,message", [
    (["cowz"], "data.unseen_classes: unknown class 'cowz' (file configs/x.json); valid: background, aeroplane,"),
    (["cow", 10], "data.unseen_classes: duplicate class 10 (cow) (file configs/x.json)"),
    (["cow", "cow"], "duplicate class 'cow'"),
    ([21], "class index 21 out of range 0..20"),
    (["background"], "is the background (index 0) and cannot be unseen"),
    ("zs3-3", "unknown preset 'zs3-3' (file configs/x.json); valid: zs3-2, zs3-4"),
    ([True], "unknown class True"),
])
def test_split_errors(unseen, message):
    with pytest.raises(ConfigError) as err:
        split_of(unseen)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_class_list_sources(tmp_path):
    txt = tmp_path / "classes.txt"
    txt.write_text("background\nred cube\nblue ball\n")
    js = tmp_path / "classes.json"
    js.write_text(json.dumps(["background", "red cube", "blue ball"]))
    for spec in (str(txt), str(js), ["background", "red cube", "blue ball"]):
        split = split_of(["Blue_Ball"], classes=spec)
        assert split.names == ("background", "red cube", "blue ball") and split.unseen == (2,)
    dup = tmp_path / "dup.txt"
    dup.write_text("background\nairplane\naeroplane\n")
    with pytest.raises(ConfigError, match=r"data.classes: duplicate class 'aeroplane' \(same as 'airplane'\)"):
        load_class_names(str(dup))
    with pytest.raises(ConfigError, match=r"data.classes: duplicate class 'cow' \(same as 'cow'\)"):
        load_class_names(["background", "cow", "cow"])
    with pytest.raises(ConfigError, match="neither a built-in class list"):
        load_class_names("nope.txt")


def test_embedding_row_count_error_names_file(tmp_path):
    root, _ = standard_voc(tmp_path)
    bad = write_embeddings(tmp_path / "emb20.npy", 20)
    with pytest.raises(ConfigError, match=r"emb20.npy: has 20 rows but the class list has 21 classes"):
        prepare_data(voc_cfg(root, bad), train=False, val=False)


def test_unknown_data_key(tmp_path):
    root, emb = standard_voc(tmp_path)
    with pytest.raises(ConfigError, match=r"data.ignore_bgg: unknown key \(file c.json\)"):
        prepare_data(voc_cfg(root, emb, ignore_bgg=True), train=False, val=False, source="c.json")
    with pytest.raises(ConfigError, match=r"data.crop_size: invalid value '24'"):
        prepare_data(voc_cfg(root, emb, crop_size="24"), val=False)


def test_published_embeddings(tmp_path, shared_dir):
    root, _ = standard_voc(tmp_path)
    emb = shared_dir / "embeddings"
    voc = prepare_data(voc_cfg(root, str(emb / "pascal/ZS3/norm_embed_arr_300_airplane.pkl")), train=False, val=False)
    assert voc.embeddings.shape == (21, 300) and voc.embeddings.dtype == torch.float32
    assert voc.embeddings.norm(dim=1).max().item() == pytest.approx(1.0, abs=1e-5)
    spnet = voc_cfg(root, "", unseen_classes="spnet", ignore_bg=True)
    spnet["embeddings"] = {"paths": [str(emb / "pascal/SPNet/word2vec.pkl"), str(emb / "pascal/SPNet/fasttext.pkl")],
                           "normalize": "l2"}
    bundle = prepare_data(spnet, train=False, val=False)
    assert bundle.embeddings.shape == (21, 600) and bundle.split.ignore_bg
    context = voc_cfg(root, str(emb / "context/ZS3/pascalcontext_class_w2c.npy"), classes="context")
    assert prepare_data(context, train=False, val=False).embeddings.shape == (60, 300)
    cagnet = voc_cfg(root, str(emb / "context/CaGNet/word2vec.pkl"), classes="context")
    with pytest.raises(ConfigError, match=r"CaGNet/word2vec.pkl: has 34 rows but the class list has 60"):
        prepare_data(cagnet, train=False, val=False)


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs(path):
    data = Settings.from_config(load_config(path), str(path)).data   # every section checked
    if data.type == "Synthetic":
        assert len(data.unseen_classes) == 3
        return
    split = parse_class_split(data, str(path))
    if data.type == "Custom":  # CamVid: 10 of the 11 classes (pole has no word vector), no background
        assert split.num_classes == 10 and split.unseen_names == ("pavement", "bicyclist")
        assert not split.has_background and split.seen_object == split.seen
        return
    number = re.search(r"unseen(\d+)", path.stem)
    assert len(split.unseen) == (5 if path.stem == "spnet" else int(number.group(1)) if number else 2)
    assert split.num_classes == (60 if data.type == "Context" else 21)
    assert split.ignore_bg == (path.stem == "spnet")


def test_shipped_config_embeddings(shared_dir):
    for path in SHIPPED:
        data = load_config(path)["data"]
        if data["type"] == "Synthetic":
            continue
        files = [str(shared_dir / p.replace("data/", "", 1)) for p in data["embeddings"]["paths"]]
        data["embeddings"]["paths"] = files
        split, emb = load_split_and_embeddings(data, str(path))
        assert emb.shape == (split.num_classes, 300 * len(files))
