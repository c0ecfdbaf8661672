"""`pagoda data prepare`'s runner: every stage end to end on a crafted corpus, counts in the
manifest, byte-identical reruns (and across worker counts), no partial output after a failure
or a kill, mixing weights, token shards, and the config file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest

from pagoda.data import pipeline
from pagoda.data.pii import luhn_ok, validate_cn_id
from pagoda.data.pipeline import load_pipeline_config, manifest_table, prepare
from pagoda.errors import ConfigError, DocumentError, ModelNotFoundError

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO.parent / "shared/data/tinyshakespeare/input.txt"

# Boilerplate: long lines (>= 20 characters) on many distinct documents.
BANNER = "Subscribe to our newsletter for the latest news about plays, poems and the theatre."
COOKIES = "We use cookies to improve your experience of the site; by staying you accept them."
FOLLOW = "Follow the company on social media and share your favourite scenes with your friends."
TICKETS = "Tickets for every performance are sold at the box office and online at fair prices."


def footer(year: int) -> str:
    """A copyright footer; digits compare as 0, so every year is the same boilerplate line."""
    return f"Copyright {year} Example Press and its authors. All rights reserved worldwide."


BOILERPLATE = (BANNER, COOKIES, FOLLOW, TICKETS, footer(2024))
NOTE = "A note from the editor that is found in one document and in its exact copies."
TWICE = "This scene was proofread by two volunteers in the spring of that year."
SHORT_LINE = "Exeunt all."  # repeated everywhere, but below the 20 characters boilerplate needs
ZH = (
    "春天到了，公园里的花都开了。我和朋友们在湖边散步，看见很多孩子在草地上放风筝。天气很好，"
    "阳光照在水面上，闪闪发光。我们找了一个安静的地方坐下来，一边喝茶一边聊天。朋友说，这是他"
    "第一次来这个城市，他觉得这里的人很热情，生活也很方便。下午我们又去了附近的博物馆，看了很多"
    "有意思的展品。回家的路上，大家都说今天过得很愉快，希望以后还有机会一起出来玩。",
    "我的家乡是一个靠海的小镇。小时候，我每天放学以后都会跑到海边去捡贝壳。夏天的傍晚，渔船一艘"
    "一艘地回到港口，码头上到处都是卖鱼的人。奶奶常常带我去市场买菜，她会跟每个摊主聊上几句，所以"
    "镇上的人几乎都认识她。后来我去外地读大学，很少有时间回家。去年春节我终于回去了一趟，发现镇上"
    "盖了很多新楼，老街也重新修过了，可是海风的味道还是和以前一样。",
    "学习一门外语需要耐心和坚持。刚开始的时候，很多人觉得语法太难，单词也记不住，于是就放弃了。"
    "其实，语言是用来交流的工具，不必一开始就追求完美。每天花半个小时听一听广播，读一篇短文，再"
    "试着用新学的词写几句话，慢慢地就会有进步。我有一位同事，他用了两年的时间自学日语，现在已经"
    "可以和客户直接谈生意了。他说最重要的是不怕犯错，敢开口说。如有问题，请拨打13912345678咨询。",
)


# ------------------------------------------------------------------------------- helpers
def completed(prefix: str, valid) -> str:
    """`prefix` and the one check character that makes `valid` accept it (the checksums have
    their own tests in test_pii.py)."""
    return next(prefix + c for c in "0123456789X" if valid(prefix + c))


CN_ID = completed("44030419850719123", validate_cn_id)
CARD = completed("453201511283036", luhn_ok)
CARD_GROUPED = " ".join(CARD[i:i + 4] for i in range(0, 16, 4))
PII_LINES = (f"Write to the steward at john.doe@example.com or ring him on 138 1234 5678.\n"
             f"His resident ID is {CN_ID} and his card number is {CARD_GROUPED}.")
MASKED_LINES = ("Write to the steward at [EMAIL] or ring him on [PHONE].\n"
                "His resident ID is [CN_ID] and his card number is [BANK_CARD].")


@cache
def passages(size: int = 3000) -> tuple[str, ...]:
    """Tiny Shakespeare as prose documents of about `size` characters each, the speakers'
    names ("ROMEO:") left out: the quality rules drop texts whose lines repeat too much."""
    lines = [line for line in SHAKESPEARE.read_text().split("\n")
             if line.strip() and not re.fullmatch(r"[A-Z][A-Za-z' ]*:", line)]
    docs, current, length = [], [], 0
    for line in lines:
        current.append(line)
        length += len(line) + 1
        if length >= size:
            docs.append("\n".join(current))
            current, length = [], 0
    return tuple(docs)


def near_copy(text: str) -> str:
    """`text` with 5 of its ~500 words changed: about 90% of its 5-word shingles shared."""
    words = text.split(" ")
    for k in range(40, 440, 90):
        words[k] = "zounds"
    return " ".join(words)


def write_jsonl(path: Path, rows: list) -> Path:
    """One line per row: a dict as JSON, a str as it is (a malformed or blank line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else
                             json.dumps(row, ensure_ascii=False)) + "\n" for row in rows))
    return path


# Each line of docs.jsonl: (name, row). Names say what should become of the record.
def corpus_rows() -> list[tuple[str, dict | str]]:
    e = passages()
    rows: list[tuple[str, dict | str]] = []
    for i in range(12):
        text = e[i]
        if i % 2 == 0:  # boilerplate around six documents
            text = f"{BANNER}\n{COOKIES}\n{text}\n{FOLLOW}\n{TICKETS}\n{footer(2010 + i)}"
        if i % 2 == 1:
            text = f"{text}\n{SHORT_LINE}"
        if i == 5:
            text = f"{NOTE}\n{text}"
        if i in (7, 9):
            text = f"{text}\n{TWICE}"
        rows.append((f"e{i}", {"text": text, "id": f"e{i}"}))
    rows += [
        ("copy-e5", {"text": rows[5][1]["text"], "id": "copy-e5"}),
        ("broken", '{"text": "a line cut short'),
        ("no-text", {"title": "a row without text"}),
        ("blank", ""),
        ("near-e3", {"text": near_copy(rows[3][1]["text"]), "id": "near-e3"}),
        ("pii", {"text": f"{e[12]}\n{PII_LINES}", "id": "pii"}),
        ("repeated", {"text": "\n".join(["All the world's a stage, and all the men and women "
                                         "merely players."] * 12)}),
        ("short", {"text": "Too short to be kept as a document."}),
        ("lorem", {"text": f"Lorem ipsum dolor sit amet.\n{e[13]}"}),
        ("empty-html", {"text": "<html><body><script>var a = 1;</script></body></html>"}),
        ("copy2-e5", {"text": rows[5][1]["text"], "id": "copy2-e5"}),
        ("only-boilerplate", {"text": "\n".join([*BOILERPLATE[:4], footer(1999)])}),
        *((f"zh{i}", {"text": text, "id": f"zh{i}"}) for i, text in enumerate(ZH)),
    ]
    return rows


def html_page(text: str, end: str = "") -> str:
    """A page with one <p> per line of `text`, and `end` as its footer."""
    paragraphs = "".join(f"<p>{line}</p>" for line in text.split("\n"))
    return ("<!doctype html><html><head><title>Act one</title><script>var seen = 1;</script>"
            f"</head><body><nav>Home | Plays | Poems</nav><main>{paragraphs}</main>"
            f"<footer><p>{end}</p></footer></body></html>")


def build_corpus(root: Path) -> Path:
    """The crafted corpus: docs.jsonl (see `corpus_rows`) and page.html, in `root`."""
    write_jsonl(root / "docs.jsonl", [row for _, row in corpus_rows()])
    (root / "page.html").write_text(html_page(passages()[14]))
    return root


def line_of(name: str) -> int:
    return next(i for i, (n, _) in enumerate(corpus_rows(), 1) if n == name)


def run(inputs, out: Path, *overrides: str, **kwargs) -> dict:
    """`prepare` in this process (one worker unless overridden)."""
    config = load_pipeline_config(None, ["output.workers=1", *overrides])
    return prepare([str(i) for i in inputs], out, config, **kwargs)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]


def stage(manifest: dict, name: str) -> dict:
    return next(row for row in manifest["stages"] if row["stage"] == name)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> tuple[Path, dict]:
    """One default run over the crafted corpus: (out folder, returned manifest)."""
    out = tmp_path_factory.mktemp("prepared") / "out"
    return out, run([corpus], out)


# ------------------------------------------------------------------------ end to end
def test_manifest_counts_every_stage_and_reason(prepared):
    _, manifest = prepared
    expected = [
        ("collect", 27, {"invalid JSON": 1, "no string field 'text'": 1}),
        ("clean", 25, {"empty after cleaning": 1}),
        ("quality", 24, {"duplicate lines": 1, "lorem ipsum": 1, "too few words": 1}),
        ("dedup", 21, {"exact duplicate": 2, "near duplicate": 1}),
        ("boilerplate", 18, {"only boilerplate lines": 1}),
        ("pii", 17, {}),
        ("balance", 17, {}),
    ]
    assert [(r["stage"], r["in"], r["dropped"]) for r in manifest["stages"]] == expected
    for row, after in zip(manifest["stages"], manifest["stages"][1:], strict=False):
        assert row["kept"] == row["in"] - sum(row["dropped"].values()) == after["in"]
    assert manifest["stages"][-1]["kept"] == manifest["output"]["records"] == 17
    assert manifest["input_records"] == 25  # collected (the two bad lines never were)
    assert manifest["skipped_inputs"] == [[f"{manifest['inputs'][0]}/docs.jsonl:{line_of(n)}", why]
                                          for n, why in (("broken", "invalid JSON"),
                                                         ("no-text", "no string field 'text'"))]


def test_output_keeps_the_right_documents_in_input_order(prepared, corpus):
    out, _ = prepared
    docs = str(corpus / "docs.jsonl")
    kept = [*(f"e{i}" for i in range(12)), "pii", "zh0", "zh1", "zh2"]
    assert [r["source"] for r in rows_of(out)] == [
        *(f"{docs}:{line_of(name)}" for name in kept), str(corpus / "page.html")]
    assert [r.get("id") for r in rows_of(out)] == [*kept, None]


def test_output_records_carry_hash_lineage_and_stage_meta(prepared):
    out, _ = prepared
    rows = rows_of(out)
    for row in rows:
        assert row["hash"] == hashlib.sha256(row["text"].encode("utf-8")).hexdigest()
        assert row["steps"] == ["clean", "quality", "dedup", "boilerplate", "pii"]
        assert list(row)[:4] == ["text", "source", "hash", "steps"]
    by_id = {row.get("id"): row for row in rows}
    assert by_id["e0"]["format"] == "jsonl" and by_id["e0"]["lang"] == "en"
    assert by_id["e0"]["boilerplate_lines"] == 5 and "boilerplate_lines" not in by_id["e1"]
    assert by_id["zh1"]["lang"] == "zh" and by_id["zh1"]["text"] == ZH[1]
    assert by_id[None]["format"] == "html"
    assert len(set(row["hash"] for row in rows)) == len(rows)


def test_pii_is_masked_and_counted_by_type(prepared):
    out, manifest = prepared
    rows = {row.get("id"): row for row in rows_of(out)}
    assert rows["pii"]["text"].endswith(MASKED_LINES)
    assert rows["pii"]["pii"] == {"email": 1, "cn_id": 1, "bank_card": 1, "phone": 1}
    assert rows["zh2"]["text"].endswith("如有问题，请拨打[PHONE]咨询。")
    assert manifest["pii_masked"] == {"bank_card": 1, "cn_id": 1, "email": 1, "phone": 2}
    text = (out / "data.jsonl").read_text()
    for secret in ("john.doe@example.com", CN_ID, CARD_GROUPED, "1234 5678", "13912345678"):
        assert secret not in text


def test_boilerplate_lines_are_removed_from_every_document(prepared, corpus):
    out, manifest = prepared
    rows = rows_of(out)
    assert manifest["boilerplate_lines_removed"] == 6 * 5
    for row in rows:
        lines = row["text"].split("\n")
        assert not set(lines) & {BANNER, COOKIES, FOLLOW, TICKETS}
        assert not any(line.startswith("Copyright ") for line in lines)
    page = rows[-1]
    assert page["source"].endswith("page.html") and "boilerplate_lines" not in page
    assert page["text"].split()[:20] == passages()[14].split()[:20]
    assert "<" not in page["text"] and "var seen" not in page["text"] and "Home |" not in page["text"]
    # kept: a line in one document (whatever its exact copies), in two, and a short one
    text = "\n".join(row["text"] for row in rows)
    assert text.count(NOTE) == 1 and text.count(TWICE) == 2 and text.count(SHORT_LINE) == 6


def test_manifest_files_are_written(prepared):
    out, manifest = prepared
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl", "manifest.json", "manifest.md"]
    written = json.loads((out / "manifest.json").read_text())
    assert written == {k: v for k, v in manifest.items() if k != "elapsed_s"}
    assert manifest["elapsed_s"] >= 0
    data = (out / "data.jsonl").read_bytes()
    assert written["output"] == {"file": "data.jsonl", "records": 17, "bytes": len(data),
                                 "sha256": hashlib.sha256(data).hexdigest()}
    table = (out / "manifest.md").read_text()
    assert table == manifest_table(written)
    assert table.startswith("| stage | in | kept | dropped (reason: count) |\n|---|---:|---:|---|\n")
    assert "| dedup | 21 | 18 | exact duplicate: 2, near duplicate: 1 |" in table
    assert "| pii | 17 | 17 | – |" in table
    assert "PII masked: bank_card 1, cn_id 1, email 1, phone 2; boilerplate lines removed: 30." \
        in table
    assert written["config"]["dedup"]["threshold"] == 0.8  # the config, as JSON


def test_html_pages_keep_their_lines_and_lose_their_boilerplate(tmp_path):
    for i in range(3):
        (tmp_path / "corpus" / f"page{i}.html").parent.mkdir(exist_ok=True)
        (tmp_path / "corpus" / f"page{i}.html").write_text(html_page(passages()[i], footer(i)))
    manifest = run([tmp_path / "corpus"], tmp_path / "out", "stages.dedup=false")
    assert manifest["output"]["records"] == 3
    for i, row in enumerate(rows_of(tmp_path / "out")):  # one <p> per line, blank-separated
        assert row["text"].split("\n\n") == passages()[i].split("\n")
    assert manifest["boilerplate_lines_removed"] == 3


# ----------------------------------------------------------------------- determinism
def test_rerun_gives_byte_identical_outputs(corpus, prepared, tmp_path):
    out, _ = prepared
    run([corpus], tmp_path / "again")
    assert snapshot(tmp_path / "again") == snapshot(out)


def test_two_workers_write_the_same_bytes_as_one(corpus, prepared, tmp_path, monkeypatch):
    out, _ = prepared
    monkeypatch.setattr(pipeline, "BATCH_CHARS", 10_000)  # many batches for the two workers
    run([corpus], tmp_path / "two", "output.workers=2")
    two, one = snapshot(tmp_path / "two"), snapshot(out)
    assert two["data.jsonl"] == one["data.jsonl"] and two["manifest.md"] == one["manifest.md"]
    manifests = [json.loads(files["manifest.json"]) for files in (two, one)]
    assert manifests[0]["config"]["output"].pop("workers") == 2  # what the run was told
    assert manifests[1]["config"]["output"].pop("workers") == 1
    assert manifests[0] == manifests[1]


# ---------------------------------------------------------------------- crash safety
def failing(step, after: int, parent: Path, seen: list[str]):
    """`step`, raising once `after` records went through it; notes the work folders then."""
    calls = []

    def call(record):
        calls.append(record)
        if len(calls) > after:
            seen.extend(leftovers(parent))
            raise RuntimeError("stage failed")
        return step(record)

    return call


@pytest.mark.parametrize("where", ["quality", "pii", "manifest"])
@pytest.mark.parametrize("previous", [False, True], ids=["first-run", "rerun"])
def test_a_failing_stage_leaves_no_partial_output(corpus, tmp_path, monkeypatch, where,
                                                  previous):
    out = tmp_path / "out"
    if previous:
        run([corpus], out)
    before = snapshot(out) if previous else None
    seen: list[str] = []
    monkeypatch.setattr(pipeline, "BATCH_CHARS", 4000)  # a record or so per batch
    if where == "quality":
        quality = pipeline.QualityStep
        monkeypatch.setattr(pipeline, "QualityStep",
                            lambda config: failing(quality(config), 8, tmp_path, seen))
    elif where == "pii":
        pii = pipeline.pii_step
        monkeypatch.setattr(pipeline, "pii_step",
                            lambda config: failing(pii(config), 8, tmp_path, seen))
    else:
        def broken_table(manifest):
            seen.extend(leftovers(tmp_path))
            raise KeyboardInterrupt  # not only Exceptions: Ctrl-C cleans up as well

        monkeypatch.setattr(pipeline, "manifest_table", broken_table)
    with pytest.raises(KeyboardInterrupt if where == "manifest" else RuntimeError):
        run([corpus], out)
    assert any(name.startswith(".out.tmp-") for name in seen)  # there was partial work
    assert leftovers(tmp_path) == []
    if previous:
        assert snapshot(out) == before
    else:
        assert not out.exists()


def test_a_run_killed_inside_the_swap_gets_its_previous_output_back(corpus, tmp_path,
                                                                     monkeypatch):
    """Killed between moving the old output aside and moving the new one in: the next run
    puts the old output back first, so if that run fails too, nothing is lost."""
    out = tmp_path / "out"
    run([corpus], out)
    before = snapshot(out)
    out.rename(tmp_path / ".out.tmp-old-12345")
    monkeypatch.setattr(pipeline, "manifest_table", lambda manifest: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run([corpus], out)
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_the_work_folder_of_a_live_run_is_left_alone(corpus, tmp_path):
    """Leftovers of killed runs are removed, but not the folder of a run still working."""
    out = tmp_path / "out"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".out.tmp-{alive.pid}").mkdir()
        (tmp_path / ".out.tmp-999999999").mkdir()  # no such process: a leftover
        run([corpus], out)
        assert (tmp_path / f".out.tmp-{alive.pid}").is_dir()
        assert not (tmp_path / ".out.tmp-999999999").exists()
    finally:
        alive.kill()
        alive.wait()


def big_corpus(root: Path) -> Path:
    """~2 MB of documents, enough for a run of a couple of seconds."""
    text = SHAKESPEARE.read_text()
    rows = [{"text": text[i:i + 3000], "copy": copy}
            for copy in range(2) for i in range(0, len(text), 3000)]
    write_jsonl(root / "big.jsonl", rows)
    return root


def test_a_killed_run_keeps_the_previous_output_and_is_cleaned_up(tmp_path):
    corpus, out = big_corpus(tmp_path / "big"), tmp_path / "out"
    run([corpus], out, "stages.quality=false")  # a clean run: the previous output
    before = snapshot(out)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pagoda.cli", "data", "prepare", str(corpus), "--out",
             str(out), "--workers", "1", "--set", "stages.quality=false", "--json"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline, spool = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:  # until pass one writes
            spool = next(tmp_path.glob(".out.tmp-*/spool.jsonl"), None)
            if spool is not None and spool.stat().st_size > 0:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed: " + \
            (tmp_path / "stderr.txt").read_text()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert spool is not None and spool.parent.is_dir()  # its partial work is left behind
    assert snapshot(out) == before  # and the previous output is whole
    run([corpus], out, "stages.quality=false")
    assert snapshot(out) == before and not spool.parent.exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- balance
def weighted_corpus(root: Path, order=slice(None)) -> Path:
    """Four JSONL sources of 20 distinct documents each, and e.json with 10 more."""
    docs = passages()
    for k, name in enumerate("abcd"):
        write_jsonl(root / f"{name}.jsonl",
                    [{"text": text} for text in docs[20 * k:20 * k + 20]][order])
    (root / "e.json").write_text(json.dumps([{"text": text} for text in docs[80:90]]))
    return root


WEIGHTS = json.dumps({"*a.jsonl:*": 0, "*b.jsonl:*": 0.5, "*c.jsonl:*": 2, "*.jsonl:*": 1.5})


def by_source(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(Path(row["source"].split(":")[0].split("[")[0]).stem, []).append(row)
    return groups


def test_balance_weights_drop_keep_and_repeat_by_source(tmp_path):
    corpus = weighted_corpus(tmp_path / "corpus")
    manifest = run([corpus], tmp_path / "out", f"balance.weights={WEIGHTS}")
    rows = rows_of(tmp_path / "out")
    groups = by_source(rows)
    assert "a" not in groups  # weight 0
    b = [row["text"] for row in groups["b"]]
    assert 3 <= len(b) <= 17 and len(set(b)) == len(b)  # about half, each once
    c = [row["text"] for row in groups["c"]]
    assert len(c) == 40 and all(c.count(text) == 2 for text in c)  # each twice, in a row
    assert [row["balance_copy"] for row in groups["c"]] == [1, 2] * 20
    d = [row["text"] for row in groups["d"]]  # 1.5 via the catch-all: the first match wins
    twice = {text for text in d if d.count(text) == 2}
    assert len(set(d)) == 20 and 3 <= len(twice) <= 17 and len(d) == 20 + len(twice)
    assert {row["balance_weight"] for row in groups["d"]} == {1.5}
    assert len(groups["e"]) == 10  # no pattern: weight 1, untouched
    assert all("balance" not in row["steps"] and "balance_copy" not in row for row in groups["e"])
    assert all(row["steps"][-1] == "balance" for name in "bcd" for row in groups[name])
    row = stage(manifest, "balance")
    assert row == {"stage": "balance", "in": 90, "kept": len(rows),
                   "dropped": {"down-sampled (weight 0)": 20,
                               "down-sampled (weight 0.5)": 20 - len(b)}}
    assert len(rows) == len(b) + 40 + len(d) + 10 == manifest["output"]["records"]


def test_balance_depends_on_content_and_seed_not_position(tmp_path):
    def kept(corpus: Path, out: str, *extra: str) -> list[str]:
        run([corpus], tmp_path / out, f"balance.weights={WEIGHTS}", *extra)
        return sorted(row["text"] for row in by_source(rows_of(tmp_path / out))["b"])

    forward = weighted_corpus(tmp_path / "forward")
    first = kept(forward, "out")
    backward = weighted_corpus(tmp_path / "backward", slice(None, None, -1))
    assert kept(backward, "reversed") == first
    assert kept(forward, "seeded", "balance.seed=7") != first


# ----------------------------------------------------------------------- token shards
def test_token_shards_are_written_and_repeatable(tmp_path):
    from pagoda.tokenizer.train import train_tokenizer

    corpus = write_jsonl(tmp_path / "corpus" / "docs.jsonl",
                         [{"text": text} for text in passages()[:30]])
    train_tokenizer([SHAKESPEARE], None, tmp_path / "tok", kind="char", held_out_fraction=0)
    outs = [tmp_path / "one", tmp_path / "two"]
    manifests = [run([corpus], out, f"output.tokenizer={tmp_path / 'tok'}",
                     "output.val_fraction=0.1") for out in outs]
    index = json.loads((outs[0] / "shards" / "index.json").read_text())
    assert manifests[0]["shards"] == index
    texts = [row["text"] for row in rows_of(outs[0])]
    splits = index["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(texts) == 30
    separators = 0 if index["eot_id"] is None else len(texts)  # one character, one token
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == sum(map(len, texts)) + separators
    assert splits["val"]["tokens"] > 0
    assert "Token shards: train " in (outs[0] / "manifest.md").read_text()
    assert snapshot(outs[0]) == snapshot(outs[1])


# ----------------------------------------------------------------------------- config
def test_config_file_sections_and_overrides(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("collect:\n  text_field: body\n"
                    "crawl:\n  max_pages: 5\n"
                    "clean:\n  boilerplate_min_docs: 4\n"
                    "quality:\n  languages: [en, zh]\n  min_words: 40\n"
                    "dedup:\n  threshold: 0.7\n"
                    "pii:\n  types: [email, phone]\n"
                    "balance:\n  weights: {'web/*': 0.5}\n  seed: 3\n"
                    "stages:\n  boilerplate: false\n"
                    "output:\n  workers: 2\n")
    config = load_pipeline_config(path, ["dedup.threshold=0.9", "quality.min_words=30"])
    assert config.collect.text_field == "body" and config.collect.crawl.max_pages == 5
    assert config.clean.boilerplate_min_docs == 4
    assert config.quality.languages == ("en", "zh") and config.quality.min_words == 30
    assert config.dedup.threshold == 0.9  # the override wins over the file
    assert config.pii.types == ("email", "phone")
    assert config.balance.weights == {"web/*": 0.5} and config.balance.seed == 3
    assert not config.stages.boilerplate and config.stages.pii
    assert config.output.workers == 2
    assert load_pipeline_config() == pipeline.PipelineConfig()


@pytest.mark.parametrize(("overrides", "message"), [
    (["tokenizer.vocab=8"], "unknown config section(s) tokenizer (allowed: collect, crawl,"),
    (["dedup.thresh=0.5"], "unknown key dedup.thresh (allowed: exact, near, threshold,"),
    (["dedup.threshold=abc"], "dedup.threshold must be float, got 'abc'"),
    (["stages.pii=maybe"], "stages.pii must be bool, got 'maybe'"),
    (["balance.weights=0.5"], "balance.weights must be a mapping, got 0.5"),
    (["dedup.threshold=1.5"], "dedup: dedup threshold must be between 0 and 1, got 1.5"),
    (["balance.weights={'*': -1}"], "balance: weights must be between 0 and 100"),
    (["pii.types=email,ssn"], "pii: unknown PII type(s) 'ssn'"),
    (["quality.max_digit_ratio=2"], "quality: max_digit_ratio must be a fraction"),
    (["dedup"], "override 'dedup' must look like section.key=value"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_pipeline_config(None, overrides)
    assert str(caught.value).startswith(message), str(caught.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_pipeline_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("colect:\n  text_field: body\n")
    with pytest.raises(ConfigError, match=r"unknown config section\(s\) colect"):
        load_pipeline_config(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("dedup: 0.7\n")
    with pytest.raises(ConfigError, match="section dedup must be a mapping"):
        load_pipeline_config(tmp_path / "bad.yaml")


def test_pii_stage_off_leaves_pii_and_drops_its_row(corpus, tmp_path):
    manifest = run([corpus], tmp_path / "out", "stages.pii=false")
    assert "pii" not in [row["stage"] for row in manifest["stages"]]
    assert stage(manifest, "balance")["in"] == stage(manifest, "boilerplate")["kept"] == 17
    assert manifest["pii_masked"] == {}
    rows = {row.get("id"): row for row in rows_of(tmp_path / "out")}
    assert rows["pii"]["text"].endswith(PII_LINES) and "pii" not in rows["pii"]
    assert all(row["steps"] == ["clean", "quality", "dedup", "boilerplate"]
               for row in rows.values())
    assert "| pii |" not in (tmp_path / "out" / "manifest.md").read_text()


def test_stages_can_be_switched_off(corpus, tmp_path):
    manifest = run([corpus], tmp_path / "out", "stages.quality=false", "stages.dedup=false",
                   "stages.boilerplate=false")
    assert [row["stage"] for row in manifest["stages"]] == ["collect", "clean", "pii", "balance"]
    assert manifest["output"]["records"] == 24 and manifest["boilerplate_lines_removed"] == 0
    assert {tuple(row["steps"]) for row in rows_of(tmp_path / "out")} == {("clean", "pii")}


def test_language_allow_list_drops_chinese(corpus, tmp_path):
    manifest = run([corpus], tmp_path / "out", "quality.languages=en")
    assert stage(manifest, "quality")["dropped"]["language"] == 3
    assert {row["lang"] for row in rows_of(tmp_path / "out")} == {"en"}
    assert manifest["output"]["records"] == 14


# ------------------------------------------------------------------------ bad inputs
def test_a_missing_input_fails_before_anything_is_written(tmp_path):
    with pytest.raises(DocumentError, match="no such file or folder"):
        run([tmp_path / "nothing"], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_out_path_that_is_a_file_is_refused(corpus, tmp_path):
    (tmp_path / "out").write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        run([corpus], tmp_path / "out")
    assert (tmp_path / "out").read_text() == "keep me"


def test_input_fields_named_like_stage_meta_do_not_break_the_counts(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus" / "docs.jsonl", [
        {"text": passages()[0], "pii": True, "boilerplate_lines": "none"},
        {"text": f"{passages()[1]}\nMail me at someone@example.org please.", "pii": "yes"}])
    manifest = run([corpus], tmp_path / "out")
    assert manifest["pii_masked"] == {"email": 1}
    assert manifest["boilerplate_lines_removed"] == 0 and manifest["output"]["records"] == 2


@pytest.mark.parametrize(("source", "out"), [(".", "."), ("docs.jsonl", "."), (".", "sub/out")],
                         ids=["same", "out-holds-input", "out-inside-input"])
def test_an_out_folder_overlapping_an_input_is_refused(corpus, source, out):
    """Replacing such a folder whole would delete the inputs (or read the output back next run)."""
    before = snapshot(corpus)
    with pytest.raises(ConfigError, match="overlaps the input"):
        run([corpus / source], corpus / out)
    assert snapshot(corpus) == before and leftovers(corpus) == leftovers(corpus.parent) == []


def test_a_bad_tokenizer_or_output_setting_fails_before_the_stages_run(corpus, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(pipeline, "_first_pass", lambda *args: pytest.fail("the stages ran"))
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        run([corpus], tmp_path / "out", f"output.tokenizer={tmp_path / 'no-tokenizer'}")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="output: workers must be >= 0"):
        load_pipeline_config(None, ["output.workers=-1"])
    with pytest.raises(ConfigError, match=r"output: val_fraction must be in \[0, 1\)"):
        load_pipeline_config(None, ["output.val_fraction=1"])
