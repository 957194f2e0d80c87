"""Per-script split of held-out documents (issue #21, item 3) on a hand-made set of known scripts."""
import numpy as np

from blt_dist.evaluation.scripts import INVALID, MIXED, NO_LETTERS, document_script, per_script

KNOWN = {
    "The quick brown fox, 42 times.": "Latin",
    "Съешь же ещё этих мягких французских булок": "Cyrillic",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία": "Greek",
    "صِف خَلقَ خَودِ كَمِثلِ الشَمسِ": "Arabic",
    "דג סקרן שט בים מאוכזב": "Hebrew",
    "ऋषियों को सताने वाले दुष्ट राक्षसों": "Devanagari",
    "我能吞下玻璃而不伤身体": "CJK",
    "いろはにほへと": "CJK",
    "다람쥐 헌 쳇바퀴에 타고파": "Hangul",
    "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า": "Thai",
    "Большая статья про новости в Москве и области сегодня: https://ria.ru": "Cyrillic",  # a Latin URL stays a minority
    "Hello world привет мир": MIXED,
    "1234 + 5678 = 6912 !!": NO_LETTERS,
}


def test_known_scripts():
    for text, script in KNOWN.items():
        assert document_script(text.encode("utf-8")) == script, text
    assert document_script(b"abc \xff\xfe def") == INVALID
    assert document_script("привет".encode("utf-8")[:-1]) == INVALID  # a cut multi-byte character


def test_per_script_rows_keep_invalid_and_mixed():
    docs = [b"plain english text"] * 6 + ["чистый русский текст".encode()] * 6 + [b"\xc3\x28 bad"] + \
        ["mixed русский english текст words".encode()]
    nbytes = np.array([len(d) for d in docs], dtype=float)
    rng = np.random.default_rng(0)
    bpe = nbytes * np.log(2) * (2.0 + 0.1 * rng.random(len(docs)))  # ~2 bpb everywhere
    blt = bpe.copy()
    blt[6:12] = nbytes[6:12] * np.log(2) * 9.0  # BLT worse than uniform on Cyrillic
    rows = {r["script"]: r for r in per_script(docs, nbytes, {"blt": blt, "bpe": bpe})}
    assert set(rows) == {"Latin", "Cyrillic", INVALID, MIXED}
    assert rows["Latin"]["documents"] == 6 and rows[INVALID]["documents"] == 1
    assert rows["Latin"]["verdict"] == "tie" and rows["Latin"]["blt_minus_bpe"] == 0
    assert rows["Cyrillic"]["worse_than_uniform"] == ["blt"] and rows["Latin"]["worse_than_uniform"] == []
    assert rows["Cyrillic"]["verdict"] == "bpe" and abs(rows["Cyrillic"]["bpb"]["blt"] - 9.0) < 1e-9
    assert rows[INVALID]["verdict"] == "n/a"  # one document: no winner called
