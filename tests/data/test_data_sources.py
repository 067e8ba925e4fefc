"""Sources: text files (file, folder, glob), the Python stdlib corpus, and their splits."""
from __future__ import annotations

import pytest

from nanodecoder.data import DataError, PythonStdlibSource, TextSource
from nanodecoder.data.sources import split_documents
from nanodecoder.data.stdlib import in_validation, list_stdlib_files, stdlib_root


def test_single_text_last_fraction_is_validation_cut_at_a_line():
    text = "".join(f"line {i:03d}\n" for i in range(100))    # 100 lines of 9 characters
    train, val = split_documents([text], 0.1)
    assert "".join(train + val) == text
    assert train[0].endswith("\n") and val[0].startswith("line 090")
    assert len(val[0]) == 90


def test_split_without_newlines_cuts_at_the_character():
    train, val = split_documents(["a" * 1000], 0.25)
    assert (len(train[0]), len(val[0])) == (750, 250)


def test_many_documents_split_at_document_or_line_boundary():
    docs = ["a\n" * 50, "b\n" * 50, "c\n" * 25, "d\n" * 25]      # 300 characters
    train, val = split_documents(docs, 0.2)                        # target: the last 60 characters
    assert train == ["a\n" * 50, "b\n" * 50, "c\n" * 20] and val == ["c\n" * 5, "d\n" * 25]
    train, val = split_documents(docs, 1 / 3)                      # a document boundary is the cut
    assert train == docs[:2] and val == docs[2:]


def test_split_keeps_both_sides_non_empty():
    assert split_documents(["ab"], 0.01) == (["a"], ["b"])
    assert split_documents(["x", "", "y"], 0.5) == (["x"], ["y"])
    with pytest.raises(DataError, match="enough to split"):
        split_documents(["z", ""], 0.1)


def _text(spec_path, base, cache, val_fraction=0.1):
    return TextSource(TextSource.Spec(path=spec_path, val_fraction=val_fraction), base_dir=base, cache_root=cache)


def test_text_paths_resolve_from_the_blueprint_folder(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("bee\n" * 10)
    (tmp_path / "corpus" / "a.txt").write_text("ay\n" * 10)
    (tmp_path / "corpus" / "sub" / "c.md").write_text("sea\n" * 10)
    (tmp_path / "corpus" / ".hidden").write_text("secret")
    (tmp_path / "corpus" / "sub" / "d.txt").write_text("")
    names = lambda src: [p.relative_to(tmp_path / "corpus").as_posix() for p in src.files()]  # noqa: E731
    assert names(_text("corpus", tmp_path, tmp_path)) == ["a.txt", "b.txt", "sub/c.md", "sub/d.txt"]
    assert names(_text("corpus/*.txt", tmp_path, tmp_path)) == ["a.txt", "b.txt"]
    assert names(_text("corpus/**/*.txt", tmp_path, tmp_path)) == ["a.txt", "b.txt", "sub/d.txt"]
    assert names(_text(str(tmp_path / "corpus" / "a.txt"), tmp_path / "elsewhere", tmp_path)) == ["a.txt"]
    corpus = _text("corpus/*.txt", tmp_path, tmp_path).load()
    # 70 characters, target 63 lies in b.txt at 33: the nearest line boundary is 32
    assert corpus.train == ("ay\n" * 10, "bee\n" * 8) and corpus.val == ("bee\n" * 2,)
    assert corpus.info == {"n_files": 2}


@pytest.mark.parametrize("path, message", [
    ("missing.txt", "'missing.txt' does not exist"),
    ("nothing/*.txt", "the glob 'nothing/\\*.txt' matched no files"),
    ("empty", "holds no files"),
    ("bad.txt", "bad.txt: not valid UTF-8 \\(byte 1\\)"),
])
def test_text_mistakes_are_clear(tmp_path, path, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.txt").write_bytes(b"a\xff\xfe")
    with pytest.raises(DataError, match=message) as e:
        _text(path, tmp_path, tmp_path).load()
    assert "\n" not in str(e.value)


def test_text_fingerprint_follows_content_not_time(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello\nworld\n")
    first = _text("t.txt", tmp_path, tmp_path).fingerprint()
    assert _text("t.txt", tmp_path, tmp_path).fingerprint() == first
    f.write_text("hello\nthere\n")
    assert _text("t.txt", tmp_path, tmp_path).fingerprint() != first


def test_stdlib_files_follow_the_documented_rules():
    files = list_stdlib_files(stdlib_root())
    assert files == sorted(files) and "os.py" in files and "json/decoder.py" in files
    assert not any(part in ("site-packages", "dist-packages", "__pycache__") for f in files for part in f.split("/"))
    assert not any(f.split("/")[-1].startswith("_sysconfigdata_") for f in files)
    assert "pydoc_data/topics.py" not in files
    assert not any(f.startswith(("lib2to3/tests/data/", "test/tokenizedata/", "config-")) for f in files)


def test_stdlib_split_is_a_stable_hash_of_the_path():
    assert in_validation("os.py", 0.5) == in_validation("os.py", 0.5)
    files = list_stdlib_files(stdlib_root())
    val = [f for f in files if in_validation(f, 0.05)]
    assert 0 < len(val) < len(files) * 0.1
    assert [f for f in files if in_validation(f, 0.05)] == val   # no randomness involved


def test_stdlib_capped_corpus_is_deterministic_and_honours_max_bytes(tmp_path):
    spec = PythonStdlibSource.Spec(val_fraction=0.05, max_bytes=40_000)
    corpus = PythonStdlibSource(spec, base_dir=tmp_path, cache_root=tmp_path).load()
    sizes = {s: sum(len(d.encode()) for d in corpus.split(s)) for s in ("train", "val")}
    assert 0 < sizes["val"] <= 2000 and 0 < sizes["train"] <= 38_000 and sizes["train"] > 30_000
    assert corpus.train[0].startswith('"""Record of phased-in incompatible language changes.')  # __future__.py
    assert not any("gencodec.py" in d[:400] for d in corpus.train + corpus.val)
    again = PythonStdlibSource(spec, base_dir=tmp_path, cache_root=tmp_path).load()
    assert again == corpus
    assert PythonStdlibSource(spec, tmp_path, tmp_path).fingerprint() == \
        PythonStdlibSource(spec, tmp_path, tmp_path).fingerprint()


def test_stdlib_gencodec_tables_are_left_out(tmp_path):
    from nanodecoder.data.stdlib import read_source
    root = stdlib_root()
    assert read_source(root / "encodings" / "cp1252.py", "encodings/cp1252.py") is None
    assert read_source(root / "encodings" / "utf_8.py", "encodings/utf_8.py")
