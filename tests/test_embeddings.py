"""Class-embedding loader: formats, safety, normalisation, concatenation, errors."""
import pickle

import numpy as np
import pytest
import torch

from data_loader.embeddings import class_embeddings, load_class_embeddings
from utils.errors import ConfigError


def test_formats_roundtrip(tmp_path):
    array = np.random.RandomState(0).randn(4, 6).astype(np.float64)
    np.save(tmp_path / "e.npy", array)
    torch.save(torch.from_numpy(array).float(), tmp_path / "e.pt")
    for protocol in (2, 5):
        with open(tmp_path / f"e{protocol}.pkl", "wb") as handle:
            pickle.dump(array, handle, protocol=protocol)
    for name in ("e.npy", "e.pt", "e2.pkl", "e5.pkl"):
        loaded = load_class_embeddings(tmp_path / name)
        assert loaded.dtype == torch.float32 and loaded.shape == (4, 6)
        assert torch.allclose(loaded, torch.from_numpy(array).float())


def test_normalisation_and_concatenation(tmp_path):
    a = np.array([[3.0, 4.0], [0.0, 1.0]], dtype=np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", 2 * a)
    l2 = load_class_embeddings(tmp_path / "a.npy", "l2")
    assert torch.allclose(l2.norm(dim=1), torch.ones(2))
    max_norm = load_class_embeddings(tmp_path / "a.npy", "max_norm")
    assert torch.allclose(max_norm, torch.from_numpy(a) / 5)
    both = class_embeddings({"paths": [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")], "normalize": "max_norm"},
                            ["one", "two"])
    assert both.shape == (2, 4) and torch.allclose(both[:, :2], both[:, 2:])


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_refuses_non_numeric_content_and_bad_files(tmp_path):
    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump(_Evil(), handle)
    with pytest.raises(ConfigError, match=r"evil\.pkl.*not a numeric array"):
        load_class_embeddings(tmp_path / "evil.pkl")
    np.save(tmp_path / "strings.npy", np.array([["a", "b"]]))
    with pytest.raises(ConfigError, match="numeric"):
        load_class_embeddings(tmp_path / "strings.npy")
    np.save(tmp_path / "vec.npy", np.zeros(5))
    with pytest.raises(ConfigError, match="2-D"):
        load_class_embeddings(tmp_path / "vec.npy")
    with pytest.raises(ConfigError, match="not found"):
        load_class_embeddings(tmp_path / "missing.npy")
    np.save(tmp_path / "ok.npy", np.zeros((3, 2)))
    with pytest.raises(ConfigError, match=r"ok\.npy: has 3 rows but the class list has 21"):
        class_embeddings({"paths": [str(tmp_path / "ok.npy")], "normalize": "none"}, [f"c{i}" for i in range(21)])
    with pytest.raises(ConfigError, match="unknown normalization"):
        load_class_embeddings(tmp_path / "ok.npy", normalize="zscore")


def test_published_embeddings(shared_dir):
    root = shared_dir / "embeddings"
    voc = load_class_embeddings(root / "pascal/ZS3/norm_embed_arr_300_airplane.pkl", "max_norm")
    assert voc.shape == (21, 300) and abs(voc.norm(dim=1).max().item() - 1) < 1e-6
    old = load_class_embeddings(root / "pascal/ZS3/norm_embed_arr_300.pkl")
    assert old.shape == (21, 300)
    assert torch.allclose(old[2:], voc[2:], atol=1e-5) and not torch.allclose(old[1], voc[1])
    context = load_class_embeddings(root / "context/ZS3/pascalcontext_class_w2c.npy", "max_norm")
    assert context.shape[0] == 60
    assert abs(context.norm(dim=1).max().item() - 1) < 1e-6 and context.norm(dim=1).min() < 0.9
    cagnet = class_embeddings({"paths": [str(root / "context/CaGNet/word2vec.pkl"),
                                         str(root / "context/CaGNet/fasttext.pkl")], "normalize": "l2"},
                              [f"c{i}" for i in range(34)])
    assert cagnet.shape == (34, 600)
