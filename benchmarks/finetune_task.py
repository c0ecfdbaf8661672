"""The fine-tuning proof task: extract four fields from short contracts as one exact JSON line.

Each example is a short contract, in English or Chinese (50/50), from which the model must
answer exactly `{"party_a":...,"party_b":...,"amount":...,"date":...}`: keys in that order,
compact separators, names copied verbatim, the amount as plain digits with two decimals and no
currency or thousands separators ("USD 12,500" -> "12500.00"), the date as YYYY-MM-DD. The
texts vary: 10 templates per language with their sentences shuffled, amounts in several
currencies and groupings, dates in several formats, and distractor numbers (contract numbers,
payment terms, copies, penalty rates, warranty months) that must be ignored.

Generalisation is what the held-out split measures: no company or person name of the test split
occurs in the training split (names are generated from syllable/character lists and assigned to
a split by a hash of the whole name), and two templates per language appear only in test.

    python benchmarks/finetune_task.py --out runs/finetune_task --train 2000 --test 200
    python benchmarks/finetune_task.py --show 4                 # print a few examples
    python benchmarks/finetune_task.py --check --tokenizer ~/.cache/pagoda/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

Records are OpenAI chat records (`{"messages": [system, user, assistant]}`, readable by
`pagoda.train.sft_data.read_conversations`) plus `"meta": {"lang", "template"}` for per-language
scores. Score a model's reply with `exact_match(reply, gold)`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import zlib
from datetime import date, timedelta
from pathlib import Path
from typing import Any

# The canonical answer form, stated to the model: amounts as plain digits with two decimals.
SYSTEM = "Extract party_a, party_b, amount (digits, 2 decimals), date (YYYY-MM-DD) as JSON."
SPLITS = ("train", "test")
KEYS = ("party_a", "party_b", "amount", "date")  # the answer's keys, in this order
TEST_NAME_SHARE = 3  # of 10 hash buckets: the share of generated names kept for the test split

# ------------------------------------------------------------------ templates
# (head, body): the head stays first, the body's sentences are shuffled. {a} is party A (the
# seller, lessor, lender, client ... as the text says), {b} party B; {no} a contract number.
EN_TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "en1": (["Contract {no}."], ["Party A: {a}.", "Party B: {b}.", "Amount: {amount}.",
                                 "Signed on {date}."]),
    "en2": (["This agreement is made on {date} between {a} (Party A) and {b} (Party B)."],
            ["Party B shall pay {amount}."]),
    "en3": ([], ["Seller (Party A): {a}.", "Buyer (Party B): {b}.", "Price: {amount}.",
                 "Date: {date}."]),
    "en4": (["{a} (Party A, the Lessor) leases the premises to {b} (Party B, the Lessee)."],
            ["Total rent: {amount}.", "Signed {date}."]),
    "en5": ([], ["On {date}, {a} (\"Party A\") and {b} (\"Party B\") agreed on a service fee "
                 "of {amount}."]),
    "en6": (["Service agreement {no} between {a} as Party A and {b} as Party B."],
            ["Total fee: {amount}.", "Effective date: {date}."]),
    "en7": (["Purchase order {no}:"], ["{b} (Party B) buys goods from {a} (Party A) for {amount}.",
                                       "Order date: {date}."]),
    "en8": (["Loan agreement."], ["Lender (Party A): {a}.", "Borrower (Party B): {b}.",
                                  "Principal: {amount}.", "Date of signing: {date}."]),
    # Only in the test split:
    "en9": (["Dated {date}."], ["Party B, {b}, agrees to pay Party A, {a}, the sum of {amount}."]),
    "en10": (["Consulting contract {no} | Party A {a} | Party B {b} | Value {amount} | "
              "Signed {date}"], []),
}
ZH_TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "zh1": ([], ["甲方：{a}。", "乙方：{b}。", "合同金额：{amount}。", "签订日期：{date}。"]),
    "zh2": (["本合同由{a}（甲方）与{b}（乙方）于{date}签订。"], ["合同总价{amount}。"]),
    "zh3": (["合同编号{no}。"], ["出卖人（甲方）：{a}。", "买受人（乙方）：{b}。", "货款{amount}。",
                            "{date}签署。"]),
    "zh4": ([], ["{date}，甲方{a}与乙方{b}签订服务协议，服务费{amount}。"]),
    "zh5": ([], ["出租方（甲方）：{a}。", "承租方（乙方）：{b}。", "租金总额{amount}。",
                 "签约日期{date}。"]),
    "zh6": ([], ["乙方{b}向甲方{a}采购设备，价款{amount}。", "合同于{date}签订。"]),
    "zh7": (["借款合同。"], ["出借人（甲方）：{a}。", "借款人（乙方）：{b}。", "本金{amount}。",
                         "签订于{date}。"]),
    "zh8": ([], ["委托方（甲方）：{a}；", "受托方（乙方）：{b}；", "费用：{amount}；",
                 "日期：{date}。"]),
    # Only in the test split:
    "zh9": (["经双方协商，{b}（乙方）同意向{a}（甲方）支付{amount}。"], ["本协议签订日期为{date}。"]),
    "zh10": (["技术开发合同 {no} 甲方 {a} 乙方 {b} 金额 {amount} 日期 {date}"], []),
}
TEST_ONLY = {"en9", "en10", "zh9", "zh10"}

EN_FILLERS = ["Payment is due within {days} days.", "Made in {copies} copies.",
              "Late payment costs {rate}% per day.", "Warranty: {months} months.",
              "Disputes: see Article {article}."]
ZH_FILLERS = ["付款期限{days}日。", "本合同一式{copies}份。", "逾期每日按{rate}%计违约金。",
              "质保期{months}个月。", "争议见第{article}条。"]

# ------------------------------------------------------------------ names
EN_ONSETS = ["b", "br", "d", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t",
             "tr", "v", "z", "sh", "th"]
EN_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
EN_CODAS = ["", "", "n", "r", "x", "l", "s", "m"]
EN_INDUSTRIES = ["", "", "Labs", "Logistics", "Foods", "Systems", "Energy", "Media", "Motors"]
EN_COMPANY_SUFFIXES = ["Ltd.", "Inc.", "LLC", "Group", "Holdings", "Co."]
ZH_CITIES = ["上海", "北京", "深圳", "杭州", "广州", "成都", "南京", "武汉", "苏州", "西安",
             "天津", "重庆"]
ZH_NAME_CHARS = "星辰华泰宏远博瑞鑫源恒通嘉禾天启明德创新汇丰润佳盛世中科云海智达金诚信安永兴长虹东方"
ZH_INDUSTRIES = ["科技", "贸易", "物流", "建设", "医药", "食品", "传媒", "机械", "能源"]
ZH_COMPANY_SUFFIXES = ["有限公司", "有限公司", "有限公司", "公司", "股份有限公司"]
ZH_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高"
ZH_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华建国志红"

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def name_split(name: str) -> str:
    """The split a generated name belongs to: a fixed hash bucket, so the splits never share one."""
    return "test" if zlib.crc32(name.encode()) % 10 < TEST_NAME_SHARE else "train"


def _en_word(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(EN_ONSETS) + rng.choice(EN_VOWELS) for _ in range(syllables))
    return (word + rng.choice(EN_CODAS)).capitalize()


def _en_party(rng: random.Random) -> str:
    if rng.random() < 0.3:  # a person
        return f"{_en_word(rng, rng.randint(1, 2))} {_en_word(rng, rng.randint(2, 3))}"
    words = [_en_word(rng, rng.randint(2, 3)), rng.choice(EN_INDUSTRIES),
             rng.choice(EN_COMPANY_SUFFIXES)]
    return " ".join(w for w in words if w)


def _zh_party(rng: random.Random) -> str:
    if rng.random() < 0.4:  # a person
        return rng.choice(ZH_SURNAMES) + "".join(rng.choices(ZH_GIVEN, k=rng.randint(1, 2)))
    city = rng.choice(ZH_CITIES) if rng.random() < 0.4 else ""
    return (city + "".join(rng.sample(ZH_NAME_CHARS, 2)) + rng.choice(ZH_INDUSTRIES)
            + rng.choice(ZH_COMPANY_SUFFIXES))


def _parties(rng: random.Random, lang: str, split: str) -> tuple[str, str]:
    """Two different names, both from `split`'s share of the name space."""
    make = _en_party if lang == "en" else _zh_party
    names: list[str] = []
    while len(names) < 2:
        name = make(rng)
        if name_split(name) == split and name not in names:
            names.append(name)
    return names[0], names[1]


# ------------------------------------------------------------------ amounts and dates
def canonical_amount(cents: int) -> str:
    """The answer's form: digits, a point, two decimals ("12500.00")."""
    return f"{cents // 100}.{cents % 100:02d}"


def _draw_cents(rng: random.Random) -> int:
    units = rng.choice([1, 10, 100, 1000]) * rng.randint(1, 9999)
    units = max(units, 100)
    cents = rng.randint(1, 99) if rng.random() < 0.2 else 0
    return units * 100 + cents


def _number(cents: int, rng: random.Random) -> str:
    """The amount as the text writes it: with or without commas and (for whole sums) decimals."""
    whole = cents // 100
    text = f"{whole:,}" if rng.random() < 0.7 else str(whole)
    if cents % 100 or rng.random() < 0.3:
        text += f".{cents % 100:02d}"
    return text


def _en_amount(cents: int, rng: random.Random) -> str:
    n = _number(cents, rng)
    return rng.choice([f"USD {n}", f"${n}", f"{n} US dollars", f"EUR {n}", f"€{n}", f"GBP {n}",
                       f"£{n}", f"RMB {n}"])


def _zh_amount(cents: int, rng: random.Random) -> str:
    n = _number(cents, rng)
    return rng.choice([f"人民币{n}元", f"¥{n}", f"￥{n}元", f"{n}元", f"人民币 {n} 元",
                       f"RMB {n}", f"{n}美元", f"USD {n}"])


def _draw_date(rng: random.Random) -> date:
    return date(2015, 1, 1) + timedelta(days=rng.randrange((date(2030, 12, 31) - date(2015, 1, 1)).days))


def _ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _en_date(d: date, rng: random.Random) -> str:
    month = MONTHS[d.month - 1]
    return rng.choice([f"{month} {d.day}, {d.year}", f"{d.day} {month} {d.year}", d.isoformat(),
                       f"{month[:3]}. {d.day}, {d.year}", f"the {_ordinal(d.day)} of {month}, {d.year}"])


def _zh_date(d: date, rng: random.Random) -> str:
    return rng.choice([f"{d.year}年{d.month}月{d.day}日", f"{d.year}年{d.month:02d}月{d.day:02d}日",
                       d.isoformat(), f"{d.year}/{d.month}/{d.day}", f"{d.year}.{d.month:02d}.{d.day:02d}"])


# ------------------------------------------------------------------ examples
def _contract_no(rng: random.Random, year: int) -> str:
    return rng.choice([f"No. HT-{year}-{rng.randint(1, 9999):04d}", f"No. {rng.randint(10000, 99999)}",
                       f"HT{year}{rng.randint(100, 999)}", f"#{rng.randint(100, 9999)}"])


def _fillers(rng: random.Random, lang: str) -> list[str]:
    """0-2 distractor sentences full of numbers that are not the answer."""
    count = rng.choices([0, 1, 2], weights=[5, 4, 1])[0]
    pool = EN_FILLERS if lang == "en" else ZH_FILLERS
    return [f.format(days=rng.choice([7, 10, 15, 30, 45, 60, 90]), copies=rng.randint(2, 4),
                     rate=rng.choice(["0.05", "0.1", "0.3", "0.5"]), months=rng.choice([6, 12, 18, 24, 36]),
                     article=rng.randint(3, 15))
            for f in rng.sample(pool, count)]


def make_example(rng: random.Random, lang: str, split: str) -> dict[str, Any]:
    """One contract record: system, user (the contract text), assistant (the gold JSON)."""
    templates = EN_TEMPLATES if lang == "en" else ZH_TEMPLATES
    names = sorted(t for t in templates if split == "test" or t not in TEST_ONLY)
    template = rng.choice(names)
    head, body = templates[template]
    a, b = _parties(rng, lang, split)
    cents, day = _draw_cents(rng), _draw_date(rng)
    body = list(body)
    rng.shuffle(body)
    sentences = head + body
    for filler in _fillers(rng, lang):
        sentences.insert(rng.randint(min(len(head), len(sentences)), len(sentences)), filler)
    fields = {"a": a, "b": b, "no": _contract_no(rng, rng.randint(2015, 2030)),
              "amount": (_en_amount if lang == "en" else _zh_amount)(cents, rng),
              "date": (_en_date if lang == "en" else _zh_date)(day, rng)}
    text = ("" if lang == "zh" else " ").join(s.format(**fields) for s in sentences)
    answer = dict(zip(KEYS, (a, b, canonical_amount(cents), day.isoformat()), strict=True))
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": text},
                         {"role": "assistant", "content": gold_text(answer)}],
            "meta": {"lang": lang, "template": template}}


def gold_text(answer: dict[str, str]) -> str:
    """The exact reply: fixed key order, compact separators, non-ASCII kept as is."""
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":"))


def make_examples(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """n records of `split` ("train" or "test"), half English and half Chinese, in seeded order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    rng = random.Random(f"contracts-{seed}-{split}")
    records = [make_example(rng, "en" if i % 2 == 0 else "zh", split) for i in range(n)]
    rng.shuffle(records)
    return records


# ------------------------------------------------------------------ scoring
def first_json_object(text: str) -> dict[str, Any] | None:
    """The first `{...}` in text that parses as a JSON object, or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def exact_match(prediction: str, gold: str) -> bool:
    """True when the first JSON object in the prediction equals the gold one (all four fields)."""
    predicted = first_json_object(prediction)
    return predicted is not None and predicted == json.loads(gold)


# ------------------------------------------------------------------ files
def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Atomic: a temporary file, fsynced, renamed over the old one."""
    from pagoda.paths import fsync_path

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_task(folder: str | Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    """Write folder/train.jsonl and folder/test.jsonl; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "test.jsonl"
    _write_jsonl(paths[0], make_examples(n_train, seed, "train"))
    _write_jsonl(paths[1], make_examples(n_test, seed, "test"))
    return paths


# ------------------------------------------------------------------ self-checks
def _answer(record: dict[str, Any]) -> dict[str, str]:
    return json.loads(record["messages"][-1]["content"])


def _require(ok: bool, what: object) -> None:
    """An assertion that `python -O` keeps."""
    if not ok:
        raise AssertionError(f"self-check failed: {what}")


def check(tokenizer_path: str | None = None) -> dict[str, Any]:
    """Self-checks of the generator (determinism, disjointness, scoring); returns statistics."""
    train, test = make_examples(2000, 0, "train"), make_examples(400, 0, "test")
    _require(train == make_examples(2000, 0, "train"), "the same seed gave other examples")
    _require(make_examples(50, 1, "train") != train[:50], "another seed gave the same examples")
    names = {split: {_answer(r)[k] for r in records for k in ("party_a", "party_b")}
             for split, records in (("train", train), ("test", test))}
    _require(not names["train"] & names["test"], "a name occurs in both splits")
    templates = {split: {r["meta"]["template"] for r in records}
                 for split, records in (("train", train), ("test", test))}
    _require(not templates["train"] & TEST_ONLY, "a test-only template is in train")
    _require(TEST_ONLY <= templates["test"], "a test-only template never appears in test")
    langs = [r["meta"]["lang"] for r in train]
    _require(langs.count("en") == langs.count("zh"), "languages are not 50/50")
    for record in train + test:
        text, answer = record["messages"][1]["content"], _answer(record)
        gold = record["messages"][-1]["content"]
        _require(list(answer) == list(KEYS) and gold == gold_text(answer), f"gold form: {gold}")
        _require(answer["party_a"] in text and answer["party_b"] in text, f"names: {text}")
        _require(re.fullmatch(r"\d+\.\d\d", answer["amount"]) is not None, f"amount: {gold}")
        _require(date.fromisoformat(answer["date"]).isoformat() == answer["date"], f"date: {gold}")
        _require("{" not in text, f"a placeholder left in: {text}")
        _require(exact_match(f"Sure! {gold} Done.", gold), f"wrapped gold not matched: {gold}")
        _require(not exact_match(gold[:-1], gold), f"truncated gold matched: {gold}")
    gold = gold_text({"party_a": "A", "party_b": "B", "amount": "1.00", "date": "2024-01-02"})
    cases = {'{"date":"2024-01-02","amount":"1.00","party_b":"B","party_a":"A"}': True,
             '{bad} then {"party_a":"A","party_b":"B","amount":"1.00","date":"2024-01-02"}': True,
             '{"party_a":"A","party_b":"B","amount":"1","date":"2024-01-02"}': False,
             '{"party_a":"A","party_b":"B","amount":"1.00"}': False,
             "no json here {": False, "[1, 2]": False, "": False}
    for prediction, expected in cases.items():
        _require(exact_match(prediction, gold) is expected, f"exact_match({prediction!r})")
    stats: dict[str, Any] = {"train": len(train), "test": len(test),
                             "train_names": len(names["train"]), "test_names": len(names["test"])}
    if tokenizer_path:
        stats.update(_token_stats(tokenizer_path, train[:400]))
    return stats


def _token_stats(path: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and max tokens per example (whole chat) under a real tokenizer, per language."""
    from pagoda.model.gguf_io import read_gguf_metadata
    from pagoda.tokenizer import Tokenizer, encode_chat

    tok = (Tokenizer.from_gguf_metadata(read_gguf_metadata(path)) if path.endswith(".gguf")
           else Tokenizer.from_file(path))
    stats: dict[str, Any] = {}
    for lang in ("en", "zh"):
        lengths = [len(encode_chat(tok, r["messages"]).ids) for r in records
                   if r["meta"]["lang"] == lang]
        stats[f"tokens_{lang}_mean"] = round(sum(lengths) / len(lengths), 1)
        stats[f"tokens_{lang}_max"] = max(lengths)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate the contract-extraction fine-tuning task (train/test JSONL).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python benchmarks/finetune_task.py --out runs/finetune_task "
               "--train 2000 --test 200 --seed 0\n  python benchmarks/finetune_task.py --check")
    parser.add_argument("--out", default="runs/finetune_task", help="folder for train/test.jsonl")
    parser.add_argument("--train", type=int, default=2000, help="training examples (default 2000)")
    parser.add_argument("--test", type=int, default=200, help="held-out examples (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, metavar="N", help="print N test examples and exit")
    parser.add_argument("--check", action="store_true", help="run the generator's self-checks")
    parser.add_argument("--tokenizer", help="with --check: a GGUF file or tokenizer folder to "
                                            "report tokens per example")
    args = parser.parse_args(argv)
    if args.check:
        print(json.dumps({"check": "ok", **check(args.tokenizer)}))
        return 0
    if args.show:
        for record in make_examples(args.show, args.seed, "test"):
            print(f"[{record['meta']['template']}] {record['messages'][1]['content']}\n"
                  f"  -> {record['messages'][2]['content']}")
        return 0
    train, test = write_task(args.out, args.train, args.test, args.seed)
    print(json.dumps({"train": str(train), "test": str(test), "n_train": args.train,
                      "n_test": args.test, "seed": args.seed}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # pagoda without installing
    sys.exit(main())
