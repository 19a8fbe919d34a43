"""The synthetic colour x texture benchmark: determinism, attributes, embeddings, caching."""
import threading
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from data_loader import prepare_data
from data_loader.synthetic import (
    PALETTE,
    attribute_projection,
    cache_folder,
    class_attributes,
    class_embeddings,
    class_names,
    ensure_synthetic,
    render,
)
from utils.errors import ConfigError
from utils.schema import SyntheticSection
from utils.sections import parse_section
from utils.util import read_json

SMALL = {"num_train": 12, "num_val": 4, "image_size": 32}


def params(tmp_path, **extra) -> SyntheticSection:
    return parse_section(SyntheticSection, {**SMALL, "cache_dir": str(tmp_path / "cache"), **extra}, "data.synthetic")


def tree_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_and_hashed(tmp_path):
    a = ensure_synthetic(params(tmp_path / "a"), progress=False)
    b = ensure_synthetic(params(tmp_path / "b"), progress=False)
    assert a.name == b.name and a.name.startswith("synthetic-")
    files = tree_bytes(a)
    assert files == tree_bytes(b) and len(files) == 2 * 16 + 2 + 3  # images, labels, lists, classes/emb/params
    assert cache_folder(params(tmp_path, seed=1)) != cache_folder(params(tmp_path))
    assert cache_folder(params(tmp_path, cache_dir="elsewhere")).name == cache_folder(params(tmp_path)).name
    other = ensure_synthetic(params(tmp_path, seed=1), progress=False)
    assert tree_bytes(other)["JPEGImages/train_000000.png"] != files["JPEGImages/train_000000.png"]
    assert (a / "classes.txt").read_text().splitlines()[:3] == ["background", "red solid", "red hstripe"]


def test_concurrent_generation(tmp_path):
    p = params(tmp_path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_synthetic(p, progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [cache_folder(p)] * 3
    assert sorted(q.name for q in cache_folder(p).parent.iterdir()) == [cache_folder(p).name]  # no temp folders left
    assert len(list((cache_folder(p) / "JPEGImages").iterdir())) == 16


def test_rendered_attributes():
    p = SyntheticSection(image_size=64)
    n_tex = len(p.textures)
    checked = set()
    for i in range(30):
        image, label = render(p, np.random.default_rng([7, i]))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and 0 in label
        for cls in set(np.unique(label).tolist()) - {0}:
            mask = label == cls
            interior = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
            if interior.sum() < 40:
                continue
            colour, texture = divmod(cls - 1, n_tex)
            pixels = image[mask].astype(float)
            bright = pixels[pixels.sum(1) >= np.median(pixels.sum(1))].mean(0)
            palette = np.array([PALETTE[c] for c in p.colours], float)
            assert np.argmin(np.abs(palette - bright).sum(1)) == colour
            grey = image.astype(float).sum(-1)
            dy = np.abs(grey[2:, 1:-1] - grey[:-2, 1:-1])[interior].mean()  # change across rows
            dx = np.abs(grey[1:-1, 2:] - grey[1:-1, :-2])[interior].mean()  # change across columns
            name = p.textures[texture]
            if name == "solid":
                assert max(dx, dy) < 60
            elif name == "hstripe":
                assert dy > 2 * dx
            elif name == "vstripe":
                assert dx > 2 * dy
            else:
                assert min(dx, dy) > 100
            checked.add(name)
    assert checked == set(p.textures)


def test_embeddings_compose(tmp_path):
    p = params(tmp_path)
    emb = class_embeddings(p).astype(np.float64)
    names = class_names(p)
    assert emb.shape == (17, 300) and len(names) == 17
    q = attribute_projection(p)
    assert np.allclose(q.T @ q, np.eye(9), atol=1e-10)
    assert np.abs(emb @ q - class_attributes(p)).max() < 0.05  # noise of norm ~0.05 on norm-sqrt(2) rows

    def row(colour, texture):
        return emb[names.index(f"{colour} {texture}")]
    for colour, texture in (("green", "hstripe"), ("blue", "vstripe"), ("yellow", "checker")):
        composed = row(colour, "solid") + row("red", texture) - row("red", "solid")
        assert np.linalg.norm(composed - row(colour, texture)) < 0.2
        cosine = emb @ composed / np.linalg.norm(emb, axis=1) / np.linalg.norm(composed)
        assert names[int(np.argmax(cosine))] == f"{colour} {texture}"


def test_prepare_synthetic_config(tmp_path):
    config = read_json("configs/config_synthetic_zs3setting.json")
    data = dict(config["data"], synthetic={**config["data"]["synthetic"], **SMALL,
                                           "cache_dir": str(tmp_path / "cache")})
    bundle = prepare_data(data, source="configs/config_synthetic_zs3setting.json")
    assert bundle.split.unseen_names == ("green hstripe", "blue vstripe", "yellow checker")
    assert bundle.split.unseen == (6, 11, 16) and bundle.split.num_classes == 17
    norms = bundle.embeddings.norm(dim=1)  # max_norm: the largest row has norm 1 (official scaling)
    assert abs(norms.max().item() - 1) < 1e-6 and norms.min() < 0.9
    folder = cache_folder(params(tmp_path))
    with_unseen = sum(bool(np.isin(np.array(Image.open(f)), [6, 11, 16]).any())
                      for f in sorted((folder / "SegmentationClass").glob("train_*.png")))
    assert 0 < with_unseen < 12 and len(bundle.train_set) == 12 - with_unseen and len(bundle.val_set) == 4
    item = bundle.train_set[0]
    assert item["image"].shape == (3, 64, 64) and item["label"].max() <= 255
    assert not set(item["label"].unique().tolist()) & {6, 11, 16}
    with pytest.raises(ConfigError, match=r"data.root: not used by Synthetic"):
        prepare_data(dict(data, root="x"))


@pytest.mark.parametrize("cfg,message", [
    ({"colour": ["red"]}, "data.synthetic.colour: unknown key"),
    ({"textures": ["solid", "dots"]}, r"data.synthetic.textures: \('solid', 'dots'\) must be distinct names from"),
    ({"objects_per_image": [2, 1]}, "objects_per_image"),
    ({"num_train": 1e12}, "data.synthetic.num_train: invalid value"),
])
def test_param_errors(cfg, message):
    with pytest.raises(ConfigError, match=message):
        cache_folder(parse_section(SyntheticSection, cfg, "data.synthetic"))
    assert cache_folder(replace(SyntheticSection(), seed=3)) != cache_folder(SyntheticSection())
