"""Quality: language identification and allow-list, every Gopher / C4 rule failing and passing in
English and Chinese, CJK word counting, the n-gram rules against a plain Python reference, drop
reasons, the picklable step, config errors, and Shakespeare kept by the defaults."""

from __future__ import annotations

import collections
import pickle
import random
from pathlib import Path

import pytest

from pagoda.data.clean import clean_text
from pagoda.data.quality import (
    QualityConfig,
    Words,
    _duplicate_ngrams_exceed,
    _top_ngram_exceeds,
    detect_language,
    quality_problem,
    quality_step,
)
from pagoda.data.record import Drop, Record
from pagoda.errors import ConfigError

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare/input.txt"

EN = ("The old lighthouse stood at the edge of the cliff for more than a hundred years. Every "
      "evening the keeper climbed the narrow stairs to light the lamp, and every morning he "
      "wrote a few lines in a leather notebook about the weather, the ships that passed and the "
      "birds that nested in the rocks below. When the keeper finally retired, the town decided "
      "to turn the building into a small museum. Visitors now read his notes behind a glass "
      "case and try to imagine the long winter nights he spent alone with the sound of the sea.")
ZH = ("春天到了，公园里的花都开了。我和朋友们在湖边散步，看见很多孩子在草地上放风筝。天气很好，"
      "阳光照在水面上，闪闪发光。我们找了一个安静的地方坐下来，一边喝茶一边聊天。朋友说，这是他"
      "第一次来这个城市，他觉得这里的人很热情，生活也很方便。下午我们又去了附近的博物馆，看了很多"
      "有意思的展品。回家的路上，大家都说今天过得很愉快，希望以后还有机会一起出来玩。")
FR = ("Le petit village se trouvait au bord d'une rivière tranquille. Chaque matin, les habitants "
      "se rendaient au marché pour acheter du pain frais, des fruits et des légumes. Les enfants "
      "jouaient sur la place pendant que leurs parents discutaient des nouvelles de la semaine. "
      "En automne, les arbres changeaient de couleur et le vent apportait une odeur de feuilles "
      "mouillées. C'était un endroit simple, mais tout le monde y vivait heureux.")
ZH_NO_STOP = ("山高月小，水落石出。天清气朗，风轻云淡。江河湖海，日月星辰。春夏秋冬，四季轮回。"
              "东南西北，五湖四海。花红柳绿，鸟语花香。千山万水，百川归海。晨钟暮鼓，细雨微风。")
TAGS = " ".join(f"#{a}{b}" for a, b in zip("春夏秋冬东南西北山水花鸟风云日月星辰江河湖海",
                                            "天地人和美好新旧大小多少高低长短远近明暗冷热",
                                            strict=True))


def letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


RNG = random.Random(0)
LONG_WORDS = " ".join(letters(RNG, 14) for _ in range(60)) + " the and"
SHORT_WORDS = " ".join(letters(RNG, 2) for _ in range(60)) + " the and"
NO_STOP_WORDS = "Cats sleep. Dogs bark. " + " ".join(letters(RNG, 5) for _ in range(50))
BUY_NOW = " ".join(f"buy now {letters(RNG, 5)}" for _ in range(30)) + " the and"

# (rule, language, failing text, the config field that turns the rule off)
FAILING = [
    ("too few words", "en", "The cat sat on the mat and that was all.", "min_words"),
    ("too few words", "zh", "今天天气很好，我们去公园。", "min_words"),
    ("too many words", "en", EN, "max_words"),
    ("mean word length", "en", LONG_WORDS, "max_mean_word_length"),
    ("mean word length", "en", SHORT_WORDS, "min_mean_word_length"),
    ("symbol ratio", "en", " ".join(f"#{w}" for w in EN.split()[:30]) + " " + EN,
     "max_symbol_ratio"),
    ("symbol ratio", "zh", TAGS + " " + ZH[:120], "max_symbol_ratio"),
    ("bullet lines", "en", "\n".join(f"- {w} item for the list and more" for w in EN.split()[:20]),
     "max_bullet_lines"),
    ("ellipsis lines", "en", "\n".join(s.strip() + "..." for s in EN.split(".") if s.strip()),
     "max_ellipsis_lines"),
    ("duplicate lines", "en", EN + "\n" + "\n".join(["Subscribe to our newsletter!"] * 6),
     "max_duplicate_lines"),
    ("duplicate lines", "zh", "\n".join([ZH[:60]] + ["欢迎关注我们的公众号！"] * 5),
     "max_duplicate_lines"),
    ("duplicate line characters", "en",
     "\n".join([EN[:200]] * 2 + [f"short line {w}" for w in EN.split()[:6]]),
     "max_duplicate_line_chars"),
    ("alphabetic words", "en", EN + " " + " ".join(f"{1000 + i}." for i in range(60)),
     "min_alphabetic_words"),
    ("digit ratio", "en", " ".join(f"a{i}b{i * 7}c" for i in range(100, 160)) + " the and",
     "max_digit_ratio"),
    ("no stop words", "en", NO_STOP_WORDS, "min_stop_words"),
    ("no stop words", "zh", ZH_NO_STOP, "min_stop_words"),
    ("top n-gram", "en", BUY_NOW, "top_ngrams"),
    ("duplicate n-grams", "en", " ".join([EN[:300]] * 3), "duplicate_ngrams"),
    ("duplicate n-grams", "zh", ZH[:80] + "".join([ZH[80:160]] * 2), "duplicate_ngrams"),
    ("lorem ipsum", "en", "Lorem ipsum dolor sit amet. " + EN, "drop_lorem_ipsum"),
]


@pytest.mark.parametrize("rule, lang, text, field", FAILING,
                         ids=[f"{rule}-{lang}" for rule, lang, *_ in FAILING])
def test_each_rule_fails_its_example_and_can_be_turned_off(rule, lang, text, field):
    config = QualityConfig(max_words=60) if rule == "too many words" else QualityConfig()
    assert quality_problem(text, lang, config) == rule
    off = {"top_ngrams": (), "duplicate_ngrams": (), "drop_lorem_ipsum": False}.get(field)
    relaxed = QualityConfig(**{field: off}) if field != "max_words" else QualityConfig()
    assert quality_problem(text, lang, relaxed) != rule


@pytest.mark.parametrize("text, lang", [(EN, "en"), (ZH, "zh"), (FR, "fr")])
def test_real_prose_passes_every_rule(text, lang):
    assert quality_problem(text, lang) is None
    assert quality_problem(clean_text(text), lang) is None


def test_chinese_prose_is_not_dropped_by_word_length_rules():
    # every CJK character is a word, so the mean length (1) would fail a 3-10 rule
    strict = QualityConfig(min_mean_word_length=3.5, max_mean_word_length=8)
    assert quality_problem(ZH, "zh", strict) is None
    assert quality_problem(EN, "en", QualityConfig(min_mean_word_length=5)) == "mean word length"


def test_stop_word_rule_applies_to_the_detected_language_only():
    assert quality_problem(NO_STOP_WORDS, "de") is None  # no German list: rule skipped
    assert quality_problem(ZH_NO_STOP, "ja") is None
    assert quality_problem(FR, "fr") is None


def test_c4_rules_in_config():
    code = EN + " In code we write if (x) { return y; } often."
    assert quality_problem(code, "en") is None
    assert quality_problem(code, "en", QualityConfig(drop_curly_braces=True)) == "curly braces"
    step = quality_step(QualityConfig(drop_lines_without_terminal_punctuation=True))
    out = step(Record("Home | News | Sport\n" + EN + "\nShare this", "x"))
    assert out.text == EN
    assert step(Record("Menu\nShare this\nLogin", "y")) == Drop("quality",
                                                                "no terminal punctuation")


def test_words_count_cjk_characters_and_keep_punctuation_with_them():
    text = "我们在2023年用Python写了，程序。 hello, world"
    words = Words(text)
    padded = f" {text} "
    spans = [padded[s:e] for s, e in zip(words.starts.tolist(), words.ends.tolist(), strict=True)]
    assert spans == ["我", "们", "在", "2023", "年", "用", "Python", "写", "了，", "程", "序。",
                     "hello,", "world"]
    assert words.count == 13 and words.digits == 4
    assert words.spaced == (4, 4 + 6 + 6 + 5)  # the words that are not CJK characters
    assert words.alphabetic() == 12  # all but "2023"
    english = Words("one  two\n\nthree 4 !")
    assert (english.count, english.chars, english.digits, english.alphabetic()) == (5, 13, 1, 3)


def reference_top(words: list[str], n: int, length: int) -> float:
    grams = collections.Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0.0
    best = max(grams.values())
    return max(len(gram) * count for gram, count in grams.items() if count == best) / length


def reference_duplicate(words: list[str], n: int, length: int) -> float:
    seen, covered = set(), [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            covered[i:i + n] = [True] * n
        seen.add(gram)
    return sum(len(word) for word, hit in zip(words, covered, strict=True) if hit) / length


def test_ngram_rules_match_a_plain_python_reference():
    rng = random.Random(1)
    vocabulary = "a bb ccc the of and dog cat run x yy".split()
    top_rules = QualityConfig().top_ngrams
    duplicate_rules = QualityConfig().duplicate_ngrams
    for _ in range(300):
        pool = vocabulary[:rng.randint(2, len(vocabulary))]
        text = " ".join(rng.choice(pool) for _ in range(rng.randint(1, 60)))
        words, split = Words(text), text.split()
        assert _top_ngram_exceeds(words, len(text), top_rules) == any(
            reference_top(split, n, len(text)) > limit for n, limit in top_rules)
        assert _duplicate_ngrams_exceed(words, len(text), duplicate_rules) == any(
            reference_duplicate(split, n, len(text)) > limit for n, limit in duplicate_rules)


@pytest.mark.parametrize("text, lang", [(EN, "en"), (ZH, "zh"), (FR, "fr"),
                                        ("ROMEO: WHAT SAY YOU TO THIS, GOOD FRIAR?", "en")])
def test_language_detection(text, lang):
    detected, score = detect_language(text)
    assert detected == lang and 0.5 < score <= 1.0


def test_step_adds_language_meta_and_applies_the_allow_list():
    english_only = quality_step(QualityConfig(languages=["en"]))
    out = english_only(Record(EN, "en.txt", steps=("clean",)))
    assert out.steps == ("clean", "quality") and out.text == EN
    assert out.meta["lang"] == "en" and 0.5 < out.meta["lang_score"] <= 1.0
    assert english_only(Record(ZH, "zh.txt")) == Drop("quality", "language")
    assert english_only(Record(FR, "fr.txt")) == Drop("quality", "language")
    everything = quality_step()
    assert everything(Record(ZH, "zh.txt")).meta["lang"] == "zh"
    assert everything(Record(FR, "fr.txt")).meta["lang"] == "fr"


def test_step_drop_reasons():
    step = quality_step()
    junk = Record("12 34 56 78 90 !! ?? ## %% &&", "junk")
    assert step(junk) == Drop("quality", "language score")
    assert step(Record("The cat sat on the mat.", "short")) == Drop("quality", "too few words")
    assert step(Record(BUY_NOW, "spam")) == Drop("quality", "top n-gram")
    lenient = quality_step(QualityConfig(min_language_score=None))
    assert lenient(junk) == Drop("quality", "too few words")


def test_step_pickles_and_gives_the_same_result():
    step = quality_step(QualityConfig(languages=("en", "zh"), min_words=20))
    copy = pickle.loads(pickle.dumps(step))
    assert copy.config == step.config
    for text in (EN, ZH, FR, BUY_NOW):
        assert copy(Record(text, "x")) == step(Record(text, "x"))


@pytest.mark.parametrize("values", [
    {"languages": "en"}, {"languages": []}, {"min_language_score": 1.5},
    {"max_symbol_ratio": -0.1}, {"min_words": 100, "max_words": 10},
    {"min_mean_word_length": 11.0}, {"max_words": 0}, {"top_ngrams": ((0, 0.2),)},
    {"duplicate_ngrams": ((5, 1.5),)}, {"language_sample_chars": 0}, {"min_stop_words": -1},
])
def test_bad_config_values_raise_config_error(values):
    with pytest.raises(ConfigError):
        QualityConfig(**values)


def shakespeare_documents(size: int = 4096) -> list[str]:
    """tinyshakespeare cut at line ends into documents of about `size` characters."""
    documents, lines, length = [], [], 0
    for line in SHAKESPEARE.read_text(encoding="utf-8").split("\n"):
        lines.append(line)
        length += len(line) + 1
        if length >= size:
            documents.append("\n".join(lines))
            lines, length = [], 0
    return documents


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="needs shared/data/tinyshakespeare")
def test_default_thresholds_keep_shakespeare():
    step = quality_step()
    results = [step(Record(clean_text(text), "s")) for text in shakespeare_documents()]
    kept = [result for result in results if isinstance(result, Record)]
    assert len(kept) >= 0.95 * len(results)
    assert {result.meta["lang"] for result in kept} == {"en"}
