"""Reading and chunking a source folder: each file kind, what is skipped, and errors that name the file."""

import pytest
from survey_corpus import GLIMMERFISH, QUILLON, ZORBLAX, build_sources

from minicpm4.apps.survey.sources import chunk, list_sources, passages, read_document
from minicpm4.errors import InputError


def test_every_kind_is_read_and_hidden_files_are_skipped(tmp_path):
    root = build_sources(tmp_path / "src")
    names = [p.relative_to(root).as_posix() for p in list_sources(root)]
    assert "notes/marmots.md" in names and "reactor.pdf" in names and ".hidden.txt" not in names
    texts = {p.source: p.text for p in passages(root)}
    assert ZORBLAX in texts["zorblax.txt"]
    assert QUILLON in texts["reactor.pdf"]  # pypdf reads the page drawn by survey_corpus.write_pdf
    assert GLIMMERFISH in texts["fish.html"]


def test_html_keeps_the_main_body_only(tmp_path):
    root = build_sources(tmp_path / "src")
    doc = read_document(root / "fish.html", root)
    assert doc.title == "Lagoon fauna"
    assert GLIMMERFISH in doc.text and "Nested block inside main." in doc.text
    assert "Navigation link" not in doc.text and "Footer words" not in doc.text and "color" not in doc.text


def test_sphinx_title_suffix_is_dropped(tmp_path):
    (tmp_path / "t.html").write_text("<title>threading \u2014 Thread-based parallelism \u2014 Python 3.11.2 "
                                     "documentation</title><div role='main'><p>x</p></div>")
    assert read_document(tmp_path / "t.html", tmp_path).title == "threading \u2014 Thread-based parallelism"


def test_chunks_pack_paragraphs_and_window_long_ones():
    paras = [" ".join(f"p{i}w{j}" for j in range(n)) for i, n in enumerate((30, 30, 30, 250))]
    out = chunk("\n\n".join(paras), words=100, overlap=20)
    assert out[0].split() == (paras[0] + " " + paras[1] + " " + paras[2]).split()  # 90 words: one passage
    long_words = paras[3].split()
    windows = [c.split() for c in out[1:]]
    assert all(len(w) <= 100 for w in windows)
    assert windows[0][:3] == long_words[:3] and windows[-1][-1] == long_words[-1]
    assert windows[1][:20] == windows[0][-20:]  # consecutive windows share `overlap` words
    with pytest.raises(InputError, match="overlap"):
        chunk("x", words=10, overlap=10)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        list_sources(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="no .* files"):
        list_sources(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf body")
    with pytest.raises(InputError, match="broken.pdf: not a readable PDF"):
        passages(bad)
    (bad / "broken.pdf").unlink()
    (bad / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
    with pytest.raises(InputError, match="latin1.txt: not UTF-8"):
        passages(bad)
