"""Word-vector reader and build_embeddings.py on tiny vector files made here."""
import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import build_embeddings
from data_loader.classes import load_class_names
from data_loader.embeddings import classes_sidecar, load_class_embeddings
from data_loader.word_vectors import (
    detect_layout,
    gensim_available,
    lookup_words,
    read_word_vectors,
    resolve_class_embeddings,
)
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
VOCAB = {
    "background": [1, 0, 0, 0],
    "aeroplane": [0, 1, 0, 0],
    "potted": [0, 0, 1, 0],
    "plant": [0, 0, 0, 1],
    "potted_plant": [5, 5, 5, 5],
    "TV": [2, 0, 0, 0],  # case-sensitive like GoogleNews: no lower-case "tv"
    "monitor": [0, 2, 0, 0],
    "dining": [0, 0, 2, 0],
    "table": [0, 0, 0, 2],
    "Cat": [0.5, -1.5, 2.25, 3],
}


def write_w2v_bin(path, vocab, newline=True):
    with open(path, "wb") as handle:
        handle.write(f"{len(vocab)} {len(next(iter(vocab.values())))}\n".encode())
        for word, vector in vocab.items():
            handle.write(word.encode() + b" " + np.asarray(vector, "<f4").tobytes() + (b"\n" if newline else b""))


def write_text(path, vocab, header=True, opener=open):
    dim = len(next(iter(vocab.values())))
    with opener(path, "wt", encoding="utf-8") as handle:
        if header:
            handle.write(f"{len(vocab)} {dim}\n")
        for word, vector in vocab.items():
            handle.write(word + " " + " ".join(repr(float(v)) for v in vector) + " \n")


@pytest.fixture
def files(tmp_path):
    """One file per format, all holding VOCAB: {name: (path, detected format)}."""
    out = {}
    write_w2v_bin(tmp_path / "a.bin", VOCAB)
    out["w2v-bin"] = (tmp_path / "a.bin", "word2vec-bin")
    write_w2v_bin(tmp_path / "b.bin", VOCAB, newline=False)
    out["w2v-bin-no-newline"] = (tmp_path / "b.bin", "word2vec-bin")
    write_text(tmp_path / "a.txt", VOCAB)
    out["w2v-text"] = (tmp_path / "a.txt", "word2vec-text")
    write_text(tmp_path / "glove.txt", VOCAB, header=False)
    out["glove"] = (tmp_path / "glove.txt", "glove")
    write_text(tmp_path / "wiki.vec", VOCAB)
    out["fasttext"] = (tmp_path / "wiki.vec", "fasttext")
    with open(tmp_path / "a.bin", "rb") as src, gzip.open(tmp_path / "a.bin.gz", "wb") as dst:
        dst.write(src.read())
    out["w2v-bin-gz"] = (tmp_path / "a.bin.gz", "word2vec-bin")
    write_text(tmp_path / "glove.txt.gz", VOCAB, header=False, opener=gzip.open)
    out["glove-gz"] = (tmp_path / "glove.txt.gz", "glove")
    return out


def test_builtin_reader_every_format(files):
    for name, (path, fmt) in files.items():
        assert detect_layout(path).fmt == fmt, name
        vectors = read_word_vectors(path, reader="builtin")
        assert set(vectors) == set(VOCAB), name
        for word, vector in VOCAB.items():
            assert vectors[word].dtype == np.float32 and np.array_equal(vectors[word], np.float32(vector)), name
        some = read_word_vectors(path, {"TV", "plant", "absent"}, fmt=fmt, reader="builtin")
        assert set(some) == {"TV", "plant"}, name


@pytest.mark.skipif(not gensim_available(), reason="gensim is not installed (optional dependency)")
def test_gensim_reader_matches_builtin(files):
    for name, (path, _) in files.items():
        builtin = read_word_vectors(path, set(VOCAB), reader="builtin")
        via_gensim = read_word_vectors(path, set(VOCAB), reader="gensim")
        assert builtin.keys() == via_gensim.keys(), name
        assert all(np.array_equal(builtin[w], via_gensim[w]) for w in builtin), name


def test_layout_errors(tmp_path, files):
    (tmp_path / "model.bin").write_bytes(struct.pack("<ii", 793712314, 12) + b"\0" * 32)
    with pytest.raises(ConfigError, match="fastText .bin model"):
        detect_layout(tmp_path / "model.bin")
    with pytest.raises(ConfigError, match="header"):
        detect_layout(files["w2v-text"][0], "glove")
    with pytest.raises(ConfigError, match="needs a 'count dim' header"):
        detect_layout(files["glove"][0], "word2vec-bin")
    with pytest.raises(ConfigError, match="not found"):
        read_word_vectors(tmp_path / "nope.vec")
    (tmp_path / "short.bin").write_bytes(b"5 4\nab " + b"\0" * 16)
    with pytest.raises(ConfigError, match="ends early"):
        read_word_vectors(tmp_path / "short.bin", reader="builtin")
    (tmp_path / "bad.vec").write_text("2 3\ncat 1 2 3\ndog 1 2\n")
    with pytest.raises(ConfigError, match="line 3: expected a word and 3 values"):
        read_word_vectors(tmp_path / "bad.vec", {"dog"}, reader="builtin")
    (tmp_path / "long.vec").write_text("2 3\ncat 1 2 3\ndog 1 2 3 4\n")
    with pytest.raises(ConfigError, match="line 3"):
        read_word_vectors(tmp_path / "long.vec", {"dog"}, reader="builtin")


def test_spaced_token_is_not_its_first_word(tmp_path):
    (tmp_path / "g.txt").write_text("potted plant 9 9\npotted 1 2\n")
    assert read_word_vectors(tmp_path / "g.txt", {"potted"}, reader="builtin")["potted"].tolist() == [1, 2]
    assert set(read_word_vectors(tmp_path / "g.txt", reader="builtin")) == {"potted plant", "potted"}


def test_names_average_case_phrase_alias(files):
    path = files["w2v-bin"][0]
    names = ["background", "Aeroplane", "potted plant", "tv-monitor", "tvmonitor", "Dining_Table", "cat",
             "pottedplant"]
    array, [report] = resolve_class_embeddings(path, names, reader="builtin")
    expected = [[1, 0, 0, 0], [0, 1, 0, 0], [5, 5, 5, 5], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1],
                VOCAB["Cat"], [5, 5, 5, 5]]
    assert array.dtype == np.float32 and np.allclose(array, expected)
    notes = {m.name: (m.keys, m.notes) for m in report.matches}
    assert notes["potted plant"] == (("potted_plant",), ("phrase",))  # phrase preferred over the mean
    assert notes["tv-monitor"] == (("TV", "monitor"), ("case 'TV'",))
    assert notes["tvmonitor"][1][0] == "alias 'tv monitor'"
    assert notes["cat"] == (("Cat",), ("case 'Cat'",))
    assert notes["Aeroplane"] == (("aeroplane",), ("case 'aeroplane'",))
    assert {"potted_plant", "Potted_Plant", "pottedplant", "tv", "TV"} <= lookup_words(names)


def test_missing_words_one_error(files):
    with pytest.raises(ConfigError) as err:
        resolve_class_embeddings(files["fasttext"][0], ["plant", "xyzzy thing", "qux"], reader="builtin")[0]
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"{files['fasttext'][0]}: no vector for 'xyzzy' (class 'xyzzy thing'), "
                       "'thing' (class 'xyzzy thing'), 'qux' (class 'qux')")
    with pytest.raises(ConfigError, match="listed twice"):
        resolve_class_embeddings(files["glove"][0], ["plant", "plant"])[0]
    with pytest.raises(ConfigError, match="unknown normalization"):
        resolve_class_embeddings(files["glove"][0], ["plant"], normalize="l1")[0]


def test_concatenation_and_normalisation(files):
    paths = [files["w2v-bin"][0], files["glove-gz"][0]]
    names = ["background", "tv monitor", "cat"]
    raw = resolve_class_embeddings(paths, names, reader="builtin")[0]
    assert raw.shape == (3, 8) and np.array_equal(raw[:, :4], raw[:, 4:])
    l2 = resolve_class_embeddings(paths, names, normalize="l2", reader="builtin")[0]
    assert np.allclose(np.linalg.norm(l2[:, :4], axis=1), 1) and np.allclose(np.linalg.norm(l2[:, 4:], axis=1), 1)
    max_norm = resolve_class_embeddings(paths, names, normalize="max_norm", reader="builtin")[0]
    assert np.allclose(max_norm[:, :4], raw[:, :4] / np.linalg.norm(raw[:, :4], axis=1).max())


def test_cli_writes_loadable_file_and_sidecar(files, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("background\naeroplane\n\npotted plant\ntvmonitor\n")
    out = tmp_path / "emb" / "pascal.npy"
    argv = ["--vectors", str(files["w2v-bin"][0]), "--vectors", str(files["fasttext"][0]),
            "--classes", str(classes), "--out", str(out), "--normalize", "l2"]
    assert build_embeddings.main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 classes x 8 dims" in printed and "'potted plant' <- potted_plant (phrase)" in printed
    loaded = load_class_embeddings(out)
    assert loaded.shape == (4, 8) and torch.allclose(loaded[:, :4].norm(dim=1), torch.ones(4))
    assert classes_sidecar(out) == tmp_path / "emb" / "pascal.classes.txt"
    assert classes_sidecar(out).read_text().splitlines() == ["background", "aeroplane", "potted plant", "tvmonitor"]
    assert load_class_names("background, aeroplane,potted plant") == ("background", "aeroplane", "potted plant")
    pt = tmp_path / "pascal.pt"
    assert build_embeddings.main(["--vectors", str(files["glove"][0]), "--classes", "plant,cat",
                                  "--out", str(pt)]) == 0
    assert torch.equal(load_class_embeddings(pt), torch.tensor([VOCAB["plant"], VOCAB["Cat"]]))
    assert (tmp_path / "pascal.classes.txt").read_text() == "plant\ncat\n"


def test_cli_error_leaves_output_untouched(files, tmp_path, capsys):
    out = tmp_path / "o" / "out.npy"
    out.parent.mkdir()
    out.write_bytes(b"old")
    argv = ["--vectors", str(files["glove"][0]), "--classes", "background,xyzzy thing,qux", "--out", str(out)]
    assert build_embeddings.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "'qux' (class 'qux')" in err
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.npy"]  # no sidecar, no temp file
    assert build_embeddings.main(argv[:-1] + [str(tmp_path / "out.csv")]) == 2
    assert build_embeddings.main(argv[:3] + ["missing.txt", "--out", str(out)]) == 2
    assert build_embeddings.main(argv + ["--normalize", "l1"]) == 2


def test_script_exit_code(files, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "build_embeddings.py"), "--vectors", str(files["glove"][0]),
                             "--classes", "qux", "--out", str(tmp_path / "o.npy")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "'qux'" in result.stderr
    assert not (tmp_path / "o.npy").exists()
