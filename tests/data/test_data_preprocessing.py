"""UltraClean preprocessing on literal strings: whitespace, diacritics, case, subword pieces joined by spaces."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from minicpm4.data.preprocessing import Preprocessor, normalize, normalize_whitespace, strip_diacritics


def test_whitespace_collapse():
    assert normalize_whitespace("a  b\t\tc   d") == "a b c d"
    assert normalize_whitespace("line one   \nline two\t\n") == "line one\nline two"
    assert normalize_whitespace("para one\n\n\n\n\npara two") == "para one\n\npara two"
    assert normalize_whitespace("x\n  \n\t\n \ny") == "x\n\ny"  # blank lines holding spaces are blank too
    assert normalize_whitespace("a\r\nb") == "a\nb"
    assert normalize_whitespace("keep\tone tab") == "keep\tone tab"  # the paper keeps \t as a token
    assert normalize_whitespace("  \n\n  ") == ""


def test_diacritics_and_case():
    assert strip_diacritics("naïve café, Ångström, façade, jalapeño") == "naive cafe, Angstrom, facade, jalapeno"
    assert strip_diacritics("日本語") == "日本語"  # not Latin: nothing to strip
    assert normalize("  Crème   Brûlée\n\n\nRÉSUMÉ  ") == "creme brulee\n\nresume"


def test_pieces_with_a_word_level_tokenizer(tmp_path):
    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", "!", "cafe", "au", "lait"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    pre = Preprocessor(tmp_path / "tokenizer.json")
    assert pre("Hello,   WORLD!") == "hello , world !"
    assert pre("Café  au\tLait") == "cafe au lait"
    assert pre.batch(["A", "", "B c"]) == ["a", "", "b c"]


def test_default_tokenizer_pieces_and_escapes():
    pre = Preprocessor()  # the default model's byte-level BPE
    assert pre("Hello   World") == "hello world"
    out = pre("The  CAFÉ\n\n\n\nopens\tat nine")
    assert "\n" not in out and "\t" not in out  # one fastText example = one line
    assert out.count("\\n") == 2 and out.count("\\t") == 1  # one blank line kept, the tab kept
    # the pieces are exactly the normalised text: removing the joins gives it back
    assert out.replace(" ", "").replace("\\n", "\n").replace("\\t", "\t") == \
        normalize("The  CAFÉ\n\n\n\nopens\tat nine").replace(" ", "")


@pytest.mark.parametrize("text", ["😀 emoji", "日本語のテキスト", "Ωμέγα ñ 🇫🇷"])
def test_split_characters_appear_once(text):
    # byte-level BPE splits these characters across tokens; each character must still appear exactly once
    out = Preprocessor()(text)
    assert out.replace(" ", "") == normalize(text).replace(" ", "")
